/*-------------------------------------------------------------------------
 *
 * orders.c
 *	  The order state machine: the graph of legal status changes (the one
 *	  table of edges below), the triggers on market.orders that enforce it
 *	  whoever writes the row, what each transition does (history row, domain
 *	  event, PSP job, units back to stock), market.order_transition() and
 *	  market.order_transitions().
 *
 * Enforcement.  A BEFORE ROW trigger (market.order_guard) refuses an INSERT
 * in any status but 'created' and an UPDATE whose status change is not an
 * edge of the graph (MK003), and stamps updated_at.  The effects of every
 * creation and status change (the history row in market.order_events, the
 * domain event and the PSP job in market.outbox, units back on hand) are
 * written by an AFTER trigger: from 0.4 a statement-level one
 * (market.order_effects_set, with transition tables) that writes the
 * history and the events of all the statement's orders with one INSERT and
 * their PSP jobs with another; up to 0.3 a row-level one
 * (market.order_effects, kept in the library for databases still at 0.3).
 * Both fire for every writer: our functions, checkout's INSERTs, a
 * superuser's direct UPDATE.
 *
 * Locking.  The UPDATE of the order row is the arbiter: two concurrent
 * transitions of one order queue on its row lock, and under READ COMMITTED
 * the second one's BEFORE trigger sees the winner's status as OLD, so it
 * is checked against the graph again (cancel vs ship: exactly one wins).
 * Units go back with the order row held, pair by pair in ascending (sku,
 * warehouse) order, through market_change_on_hand (src/stock.c): the
 * pair's advisory lock, then its slot rows in slot order, as stock_adjust
 * does (rule 5 in market.h).
 *
 * order_transition_many() moves a set of orders in one UPDATE: it first
 * locks them in ascending id order (so two callers with overlapping sets
 * queue instead of deadlocking), then updates them all; an unknown id is
 * MK017 and an illegal edge MK003 before anything is left half done (the
 * statement fails as a whole).
 *
 * The note.  order_transition() and order_transition_many() leave their
 * orders and notes in a backend-local variable (sorted by order id) for the
 * triggers of their own UPDATE; the AFTER trigger takes each note once.
 * The variable is restored when the call ends, even on error.  A direct
 * UPDATE finds no note for its orders and records NULL.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "market.h"

PG_FUNCTION_INFO_V1(market_order_guard);
PG_FUNCTION_INFO_V1(market_order_effects);
PG_FUNCTION_INFO_V1(market_order_effects_set);
PG_FUNCTION_INFO_V1(market_order_transition_many);
PG_FUNCTION_INFO_V1(market_order_transition);
PG_FUNCTION_INFO_V1(market_order_transitions);

/* longest note order_transition() accepts, in characters */
#define ORDER_NOTE_MAX_CHARS	1000

/*
 * The states, and what entering each one does besides the history row and
 * the domain event 'order.<state>': restock_kind names the ledger kind of
 * the units put back on hand (NULL: none), psp_job the outbox event_type
 * of the PSP job for the group's payment (NULL: none).
 */
typedef struct OrderState
{
	const char *name;
	const char *restock_kind;
	const char *psp_job;
} OrderState;

static const OrderState order_states[] = {
	{"created", NULL, NULL},
	{"confirmed", NULL, NULL},
	{"shipped", NULL, "payment.capture"},
	{"delivered", NULL, NULL},
	{"returned", "return", NULL},
	{"refunded", NULL, "payment.refund"},
	{"cancelled", "cancel", "payment.void"},
	{"payment_failed", "cancel", NULL},
};

/* The graph: every legal (from, to).  A state with no edge out is final. */
typedef struct OrderEdge
{
	const char *from;
	const char *to;
} OrderEdge;

static const OrderEdge order_edges[] = {
	{"created", "confirmed"},
	{"created", "cancelled"},
	{"created", "payment_failed"},
	{"confirmed", "shipped"},
	{"confirmed", "cancelled"},
	{"shipped", "delivered"},
	{"delivered", "returned"},
	{"returned", "refunded"},
};

/* the state every order is created in */
#define ORDER_INITIAL_STATE "created"

/* most orders order_transition_many() moves in one call */
#define ORDER_MANY_MAX			10000

/*
 * What order_transition() or order_transition_many() left for the triggers
 * of its own UPDATE: the orders it moves, ascending, and their notes.
 */
typedef struct PendingTransition
{
	bool		active;
	int			n;
	int64	   *order_ids;		/* n ids, ascending, distinct */
	char	  **notes;			/* n notes; NULL: none, or already taken */
} PendingTransition;

static PendingTransition pending = {false, 0, NULL, NULL};

static void check_note(const char *note, int64 order_id, bool many);

/* cmp_int64 orders int64 values ascending (qsort, bsearch). */
static int
cmp_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return (x > y) - (x < y);
}

/* pending_index returns the position of order_id among the pending orders, or -1. */
static int
pending_index(int64 order_id)
{
	int64	   *hit;

	if (!pending.active || pending.n == 0)
		return -1;
	hit = bsearch(&order_id, pending.order_ids, pending.n, sizeof(int64), cmp_int64);
	return hit ? (int) (hit - pending.order_ids) : -1;
}

/* pending_take_note returns the pending note of order_id once, or NULL. */
static char *
pending_take_note(int64 order_id)
{
	int			i = pending_index(order_id);
	char	   *note;

	if (i < 0)
		return NULL;
	note = pending.notes[i];
	pending.notes[i] = NULL;
	return note;
}

/* find_state returns the state called name, or NULL. */
static const OrderState *
find_state(const char *name)
{
	if (name == NULL)
		return NULL;
	for (int i = 0; i < lengthof(order_states); i++)
		if (strcmp(order_states[i].name, name) == 0)
			return &order_states[i];
	return NULL;
}

/* is_edge says whether from -> to is in the graph. */
static bool
is_edge(const char *from, const char *to)
{
	for (int i = 0; i < lengthof(order_edges); i++)
		if (strcmp(order_edges[i].from, from) == 0 && strcmp(order_edges[i].to, to) == 0)
			return true;
	return false;
}

/*
 * next_states_hint is the errhint of a refused transition: the states an
 * order in status from may move to, or that from is final.
 */
static char *
next_states_hint(const char *from)
{
	StringInfoData buf;
	int			n = 0;
	int			total = 0;

	if (find_state(from) == NULL)
		return psprintf("Status \"%s\" is not an order status.", from);
	for (int i = 0; i < lengthof(order_edges); i++)
		if (strcmp(order_edges[i].from, from) == 0)
			total++;
	if (total == 0)
		return psprintf("Status \"%s\" is final: no transition leaves it.", from);

	initStringInfo(&buf);
	appendStringInfo(&buf, "From \"%s\" an order may go to ", from);
	for (int i = 0; i < lengthof(order_edges); i++)
	{
		if (strcmp(order_edges[i].from, from) != 0)
			continue;
		n++;
		if (n > 1)
			appendStringInfoString(&buf, n == total ? " or " : ", ");
		appendStringInfo(&buf, "\"%s\"", order_edges[i].to);
	}
	appendStringInfoChar(&buf, '.');
	return buf.data;
}

/* column_number returns the attribute number of a column of the trigger's table. */
static int
column_number(TupleDesc desc, const char *name)
{
	int			attnum = SPI_fnumber(desc, name);

	if (attnum <= 0)
		elog(ERROR, "market: market.orders has no column \"%s\"", name);
	return attnum;
}

/* column_text returns a text column of a row as a C string, or NULL. */
static char *
column_text(HeapTuple tup, TupleDesc desc, const char *name)
{
	bool		isnull;
	Datum		d = heap_getattr(tup, column_number(desc, name), desc, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* column_int64 returns a bigint column of a row (0 when NULL). */
static int64
column_int64(HeapTuple tup, TupleDesc desc, const char *name)
{
	bool		isnull;
	Datum		d = heap_getattr(tup, column_number(desc, name), desc, &isnull);

	return isnull ? 0 : DatumGetInt64(d);
}

/* check_trigger makes sure a trigger function is fired the way it is meant to be. */
static TriggerData *
check_trigger(FunctionCallInfo fcinfo, const char *name, bool before)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "market: %s() must be called as a trigger", name);
	if (!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		TRIGGER_FIRED_BEFORE(trigdata->tg_event) != before ||
		!(TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) ||
		  TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event)))
		elog(ERROR, "market: %s() must fire %s INSERT or UPDATE for each row",
			 name, before ? "BEFORE" : "AFTER");
	return trigdata;
}

/*
 * market.order_guard(): BEFORE INSERT OR UPDATE ON market.orders FOR EACH
 * ROW.  Refuses what the graph does not allow (MK003) and stamps
 * updated_at on every update.  An UPDATE that leaves status as it is is
 * not a transition and passes, except the UPDATE of order_transition(),
 * which asked for a transition.
 */
Datum
market_order_guard(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = check_trigger(fcinfo, "order_guard", true);
	TupleDesc	desc = trigdata->tg_relation->rd_att;
	HeapTuple	newtup;
	int64		order_id;
	char	   *from;
	char	   *to;
	int			attnum;
	Datum		stamp;
	bool		stamp_null = false;

	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
	{
		newtup = trigdata->tg_trigtuple;
		to = column_text(newtup, desc, "status");
		if (to == NULL || strcmp(to, ORDER_INITIAL_STATE) != 0)
			ereport(ERROR,
					(errcode(MK_ILLEGAL_TRANSITION),
					 errmsg("illegal order transition"),
					 errdetail("Order %lld was inserted with status \"%s\".",
							   (long long) column_int64(newtup, desc, "id"),
							   to ? to : "NULL"),
					 errhint("Every order is created in status \"%s\".", ORDER_INITIAL_STATE)));
		return PointerGetDatum(newtup);
	}

	newtup = trigdata->tg_newtuple;
	order_id = column_int64(newtup, desc, "id");
	from = column_text(trigdata->tg_trigtuple, desc, "status");
	to = column_text(newtup, desc, "status");

	if (from != NULL && to != NULL && strcmp(from, to) == 0)
	{
		/* not a transition, unless order_transition(_many)() asked for one */
		if (pending_index(order_id) >= 0)
			ereport(ERROR,
					(errcode(MK_ILLEGAL_TRANSITION),
					 errmsg("illegal order transition"),
					 errdetail("Order %lld is already in status \"%s\".",
							   (long long) order_id, from),
					 errhint("%s", next_states_hint(from))));
	}
	else if (find_state(to) == NULL)
		ereport(ERROR,
				(errcode(MK_ILLEGAL_TRANSITION),
				 errmsg("unknown order status"),
				 errdetail("Order %lld cannot go from \"%s\" to \"%s\": \"%s\" is not an order status.",
						   (long long) order_id, from ? from : "NULL",
						   to ? to : "NULL", to ? to : "NULL"),
				 errhint("%s", next_states_hint(from ? from : "NULL"))));
	else if (from == NULL || !is_edge(from, to))
		ereport(ERROR,
				(errcode(MK_ILLEGAL_TRANSITION),
				 errmsg("illegal order transition"),
				 errdetail("Order %lld cannot go from \"%s\" to \"%s\".",
						   (long long) order_id, from ? from : "NULL", to),
				 errhint("%s", next_states_hint(from ? from : "NULL"))));

	attnum = column_number(desc, "updated_at");
	stamp = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	newtup = heap_modify_tuple_by_cols(newtup, desc, 1, &attnum, &stamp, &stamp_null);
	return PointerGetDatum(newtup);
}

/*
 * record_event appends the history row and writes the domain event
 * 'order.<to>' in one statement; the event's "at" is the history row's.
 */
static void
record_event(int64 order_id, int64 group_id, int64 seller_id,
			 const char *from, const char *to, const char *note)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[6] = {INT8OID, TEXTOID, TEXTOID, TEXTOID, INT8OID, INT8OID};
	Datum		values[6];
	char		nulls[6] = "      ";

	market_prepare(&plan,
				   "WITH ev AS ("
				   "  INSERT INTO market.order_events (order_id, from_status, to_status, note)"
				   "  VALUES ($1, $2, $3, $4) RETURNING at)"
				   " INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)"
				   " SELECT 'events', 'order.' || $3, 'order', $1,"
				   "        jsonb_build_object('order_id', $1, 'group_id', $5, 'seller_id', $6,"
				   "                           'from', $2, 'to', $3, 'at', ev.at)"
				   " FROM ev",
				   6, types);
	values[0] = Int64GetDatum(order_id);
	values[1] = from ? CStringGetTextDatum(from) : (Datum) 0;
	values[2] = CStringGetTextDatum(to);
	values[3] = note ? CStringGetTextDatum(note) : (Datum) 0;
	values[4] = Int64GetDatum(group_id);
	values[5] = Int64GetDatum(seller_id);
	if (!from)
		nulls[1] = 'n';
	if (!note)
		nulls[3] = 'n';
	if (SPI_execute_plan(plan, values, nulls, false, 0) != SPI_OK_INSERT || SPI_processed != 1)
		elog(ERROR, "market: could not record the event of order %lld", (long long) order_id);
}

/*
 * queue_psp_job writes the PSP job event_type for the payment of the
 * order's group, if it has one: {payment_id, order_id, amount_minor,
 * currency} with the order's subtotal as the amount.
 */
static void
queue_psp_job(const char *event_type, int64 order_id, int64 group_id,
			  int64 amount_minor, const char *currency)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[5] = {TEXTOID, INT8OID, INT8OID, INT8OID, TEXTOID};
	Datum		values[5];

	market_prepare(&plan,
				   "INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)"
				   " SELECT 'psp', $1, 'payment', p.id,"
				   "        jsonb_build_object('payment_id', p.id, 'order_id', $2,"
				   "                           'amount_minor', $4, 'currency', $5)"
				   " FROM market.payments p WHERE p.group_id = $3",
				   5, types);
	values[0] = CStringGetTextDatum(event_type);
	values[1] = Int64GetDatum(order_id);
	values[2] = Int64GetDatum(group_id);
	values[3] = Int64GetDatum(amount_minor);
	values[4] = CStringGetTextDatum(currency);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "market: could not queue the PSP job of order %lld", (long long) order_id);
}

/*
 * restock puts every unit of the order back on hand (and free), one ledger
 * row of the given kind per (sku, warehouse), visiting the pairs in
 * ascending (sku, warehouse) order.
 */
static void
restock(int64 order_id, const char *kind, const char *to)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(order_id)};
	int			n;
	int64	   *skus;
	int32	   *whs;
	int64	   *qtys;
	text	   *reason;

	market_prepare(&plan,
				   "SELECT sku_id, warehouse_id, sum(qty)::int8 FROM market.order_lines"
				   " WHERE order_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
				   1, types);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "market: could not read the lines of order %lld", (long long) order_id);

	/* copy out: the SPI result is gone after the next statement */
	n = (int) SPI_processed;
	skus = palloc(sizeof(int64) * Max(n, 1));
	whs = palloc(sizeof(int32) * Max(n, 1));
	qtys = palloc(sizeof(int64) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;

		skus[i] = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		whs[i] = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
		qtys[i] = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
	}

	reason = cstring_to_text(psprintf("order %lld %s", (long long) order_id, to));
	for (int i = 0; i < n; i++)
		market_change_on_hand(skus[i], whs[i], false, qtys[i], 0, kind, reason);
}

/*
 * market.order_effects(): AFTER INSERT ON market.orders FOR EACH ROW, and
 * AFTER UPDATE ... WHEN (OLD.status IS DISTINCT FROM NEW.status).  Writes
 * what a creation or a transition entails, in the writer's transaction.
 */
Datum
market_order_effects(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = check_trigger(fcinfo, "order_effects", false);
	TupleDesc	desc = trigdata->tg_relation->rd_att;
	bool		inserted = TRIGGER_FIRED_BY_INSERT(trigdata->tg_event);
	HeapTuple	row = inserted ? trigdata->tg_trigtuple : trigdata->tg_newtuple;
	int64		order_id = column_int64(row, desc, "id");
	char	   *from = inserted ? NULL : column_text(trigdata->tg_trigtuple, desc, "status");
	char	   *to = column_text(row, desc, "status");
	const OrderState *state = find_state(to);
	char	   *note = NULL;

	if (state == NULL)
		elog(ERROR, "market: order %lld has unknown status \"%s\"",
			 (long long) order_id, to ? to : "NULL");
	if (from != NULL && strcmp(from, to) == 0)
		return PointerGetDatum(NULL);	/* not a transition */

	/* the note of order_transition(), for its own order, once */
	note = pending_take_note(order_id);

	SPI_connect();
	record_event(order_id, column_int64(row, desc, "group_id"),
				 column_int64(row, desc, "seller_id"), from, to, note);
	if (state->restock_kind != NULL)
		restock(order_id, state->restock_kind, to);
	if (state->psp_job != NULL)
		queue_psp_job(state->psp_job, order_id, column_int64(row, desc, "group_id"),
					  column_int64(row, desc, "subtotal_minor"),
					  column_text(row, desc, "currency"));
	SPI_finish();
	return PointerGetDatum(NULL);
}

/*
 * market.order_transition(order_id bigint, to_state text, note text
 * DEFAULT NULL) returns text: moves the order to to_state and returns its
 * new status.  The UPDATE locks the row; the triggers check the graph
 * (MK003) and do the rest.  Unknown order: MK017.
 */
Datum
market_order_transition(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT8OID, TEXTOID};
	Datum		values[2];
	int64		order_id;
	text	   *to_state;
	char	   *note = NULL;
	PendingTransition saved = pending;
	Datum		result = (Datum) 0;
	bool		found = false;

	market_require_arg(fcinfo, 0, "order_id");
	market_require_arg(fcinfo, 1, "to_state");
	order_id = PG_GETARG_INT64(0);
	to_state = PG_GETARG_TEXT_PP(1);
	if (!PG_ARGISNULL(2))
	{
		note = text_to_cstring(PG_GETARG_TEXT_PP(2));
		check_note(note, order_id, false);
	}

	pending.active = true;
	pending.n = 1;
	pending.order_ids = palloc(sizeof(int64));
	pending.order_ids[0] = order_id;
	pending.notes = palloc(sizeof(char *));
	pending.notes[0] = note;
	PG_TRY();
	{
		SPI_connect();
		market_prepare(&plan,
					   "UPDATE market.orders SET status = $2 WHERE id = $1 RETURNING status",
					   2, types);
		values[0] = Int64GetDatum(order_id);
		values[1] = PointerGetDatum(to_state);
		if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_UPDATE_RETURNING)
			elog(ERROR, "market: could not update order %lld", (long long) order_id);
		if (SPI_processed == 1)
		{
			bool		isnull;

			found = true;
			result = SPI_datumTransfer(SPI_getbinval(SPI_tuptable->vals[0],
													 SPI_tuptable->tupdesc, 1, &isnull),
									   false, -1);
		}
		SPI_finish();
	}
	PG_FINALLY();
	{
		pending = saved;
	}
	PG_END_TRY();

	if (!found)
		ereport(ERROR,
				(errcode(MK_UNKNOWN_ORDER),
				 errmsg("unknown order"),
				 errdetail("No order has id %lld.", (long long) order_id)));
	PG_RETURN_DATUM(result);
}

/*
 * One creation or status change seen by market.order_effects_set(): the
 * new row's columns and the status it left (NULL for a creation).
 */
typedef struct OrderChange
{
	int64		order_id;
	int64		group_id;
	int64		seller_id;
	int64		subtotal_minor;
	char	   *currency;
	char	   *from;
	char	   *to;
	const OrderState *state;
	char	   *note;
} OrderChange;

/* an order id and its status, from the OLD transition table */
typedef struct OrderOld
{
	int64		order_id;
	char	   *status;
} OrderOld;

/* cmp_change orders OrderChanges by order id. */
static int
cmp_change(const void *a, const void *b)
{
	return cmp_int64(&((const OrderChange *) a)->order_id, &((const OrderChange *) b)->order_id);
}

/* cmp_old orders OrderOlds by order id. */
static int
cmp_old(const void *a, const void *b)
{
	return cmp_int64(&((const OrderOld *) a)->order_id, &((const OrderOld *) b)->order_id);
}

/*
 * transition_slot prepares to read a transition table from its start, with
 * a read pointer of its own (other triggers may read the same table), and
 * returns a slot for its rows.
 */
static TupleTableSlot *
transition_slot(Tuplestorestate *ts, TupleDesc desc)
{
	int			ptr = tuplestore_alloc_read_pointer(ts, EXEC_FLAG_REWIND);

	tuplestore_select_read_pointer(ts, ptr);
	tuplestore_rescan(ts);
	return MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
}

/* slot_text returns a text column of a slot as a C string, or NULL. */
static char *
slot_text(TupleTableSlot *slot, int attnum)
{
	bool		isnull;
	Datum		d = slot_getattr(slot, attnum, &isnull);

	return isnull ? NULL : TextDatumGetCString(d);
}

/* slot_int64 returns a bigint column of a slot (0 when NULL). */
static int64
slot_int64(TupleTableSlot *slot, int attnum)
{
	bool		isnull;
	Datum		d = slot_getattr(slot, attnum, &isnull);

	return isnull ? 0 : DatumGetInt64(d);
}

/* text_array builds a text[] of n C strings (NULL elements allowed). */
static Datum
text_array(char **items, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *nulls = palloc(sizeof(bool) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
	{
		nulls[i] = (items[i] == NULL);
		elems[i] = nulls[i] ? (Datum) 0 : CStringGetTextDatum(items[i]);
	}
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs, TEXTOID, -1, false, TYPALIGN_INT));
}

/* int8_array builds a bigint[] of n values. */
static Datum
int8_array(int64 *items, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		elems[i] = Int64GetDatum(items[i]);
	return PointerGetDatum(construct_array(elems, n, INT8OID, sizeof(int64), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/*
 * record_events_many appends the history rows of the changes and writes
 * their domain events 'order.<to>', one INSERT each for all of them, in
 * order id order (the changes are sorted); each event's "at" is its
 * history row's.
 */
static void
record_events_many(OrderChange *ch, int n)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[6] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
	INT8ARRAYOID, INT8ARRAYOID};
	Datum		values[6];
	int64	   *ids = palloc(sizeof(int64) * n);
	int64	   *groups = palloc(sizeof(int64) * n);
	int64	   *sellers = palloc(sizeof(int64) * n);
	char	  **froms = palloc(sizeof(char *) * n);
	char	  **tos = palloc(sizeof(char *) * n);
	char	  **notes = palloc(sizeof(char *) * n);

	market_prepare(&plan,
				   "WITH c AS ("
				   "  SELECT * FROM unnest($1, $2, $3, $4, $5, $6)"
				   "    WITH ORDINALITY AS c(order_id, from_status, to_status, note, group_id, seller_id, ord)),"
				   " ev AS ("
				   "  INSERT INTO market.order_events (order_id, from_status, to_status, note)"
				   "  SELECT c.order_id, c.from_status, c.to_status, c.note FROM c ORDER BY c.ord"
				   "  RETURNING id, order_id, from_status, to_status, at)"
				   " INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)"
				   " SELECT 'events', 'order.' || ev.to_status, 'order', ev.order_id,"
				   "        jsonb_build_object('order_id', ev.order_id, 'group_id', c.group_id,"
				   "                           'seller_id', c.seller_id, 'from', ev.from_status,"
				   "                           'to', ev.to_status, 'at', ev.at)"
				   " FROM ev JOIN c ON c.order_id = ev.order_id"
				   " ORDER BY ev.id",
				   6, types);
	for (int i = 0; i < n; i++)
	{
		ids[i] = ch[i].order_id;
		groups[i] = ch[i].group_id;
		sellers[i] = ch[i].seller_id;
		froms[i] = ch[i].from;
		tos[i] = ch[i].to;
		notes[i] = ch[i].note;
	}
	values[0] = int8_array(ids, n);
	values[1] = text_array(froms, n);
	values[2] = text_array(tos, n);
	values[3] = text_array(notes, n);
	values[4] = int8_array(groups, n);
	values[5] = int8_array(sellers, n);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_INSERT || SPI_processed != (uint64) n)
		elog(ERROR, "market: could not record the events of %d orders", n);
}

/*
 * queue_psp_jobs_many writes, for every change whose state has a PSP job,
 * that job for the payment of the order's group (if it has one: at most
 * one, payments_one_per_group), with the order's subtotal as the amount;
 * one INSERT, in order id order.  The payment is a LATERAL lookup by
 * group, so no plan can turn it into a scan of every payment.
 */
static void
queue_psp_jobs_many(OrderChange *ch, int n)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[5] = {TEXTARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, TEXTARRAYOID};
	Datum		values[5];
	char	  **jobs = palloc(sizeof(char *) * n);
	int64	   *ids = palloc(sizeof(int64) * n);
	int64	   *groups = palloc(sizeof(int64) * n);
	int64	   *amounts = palloc(sizeof(int64) * n);
	char	  **currencies = palloc(sizeof(char *) * n);
	int			k = 0;

	for (int i = 0; i < n; i++)
	{
		if (ch[i].state->psp_job == NULL)
			continue;
		jobs[k] = (char *) ch[i].state->psp_job;
		ids[k] = ch[i].order_id;
		groups[k] = ch[i].group_id;
		amounts[k] = ch[i].subtotal_minor;
		currencies[k] = ch[i].currency;
		k++;
	}
	if (k == 0)
		return;

	market_prepare(&plan,
				   "INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)"
				   " SELECT 'psp', c.event_type, 'payment', p.id,"
				   "        jsonb_build_object('payment_id', p.id, 'order_id', c.order_id,"
				   "                           'amount_minor', c.amount_minor, 'currency', c.currency)"
				   " FROM unnest($1, $2, $3, $4, $5)"
				   "      WITH ORDINALITY AS c(event_type, order_id, group_id, amount_minor, currency, ord)"
				   " CROSS JOIN LATERAL (SELECT x.id FROM market.payments x"
				   "                      WHERE x.group_id = c.group_id LIMIT 1) p"
				   " ORDER BY c.ord",
				   5, types);
	values[0] = text_array(jobs, k);
	values[1] = int8_array(ids, k);
	values[2] = int8_array(groups, k);
	values[3] = int8_array(amounts, k);
	values[4] = text_array(currencies, k);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "market: could not queue the PSP jobs of %d orders", k);
}

/*
 * market.order_effects_set(): AFTER INSERT ON market.orders REFERENCING NEW
 * TABLE, and AFTER UPDATE REFERENCING OLD TABLE and NEW TABLE, FOR EACH
 * STATEMENT.  Finds the statement's creations and real status changes
 * (old and new rows joined by id: a statement trigger has no WHEN) and
 * writes what they entail, in the writer's transaction: the history rows
 * and domain events in one INSERT, units back on hand order by order, the
 * PSP jobs in one INSERT; everything in order id order.
 */
Datum
market_order_effects_set(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	TupleDesc	desc;
	bool		inserted;
	Tuplestorestate *newts;
	Tuplestorestate *oldts;
	TupleTableSlot *slot;
	OrderOld   *olds = NULL;
	int			nold = 0;
	OrderChange *ch;
	int			n = 0;
	int			cap = 16;
	int			a_id,
				a_group,
				a_seller,
				a_subtotal,
				a_currency,
				a_status;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "market: order_effects_set() must be called as a trigger");
	if (TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!(TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) ||
		  TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event)))
		elog(ERROR, "market: order_effects_set() must fire AFTER INSERT or UPDATE for each statement");
	inserted = TRIGGER_FIRED_BY_INSERT(trigdata->tg_event);
	newts = trigdata->tg_newtable;
	oldts = trigdata->tg_oldtable;
	if (trigdata->tg_trigger->tgnewtable == NULL ||
		(!inserted && trigdata->tg_trigger->tgoldtable == NULL))
		elog(ERROR, "market: order_effects_set() needs REFERENCING NEW TABLE (and OLD TABLE for UPDATE)");
	if (newts == NULL)
		return PointerGetDatum(NULL);	/* no row */

	desc = trigdata->tg_relation->rd_att;
	a_id = column_number(desc, "id");
	a_group = column_number(desc, "group_id");
	a_seller = column_number(desc, "seller_id");
	a_subtotal = column_number(desc, "subtotal_minor");
	a_currency = column_number(desc, "currency");
	a_status = column_number(desc, "status");

	/* the statuses before, by order id */
	if (!inserted && oldts != NULL)
	{
		int			ocap = 16;

		olds = palloc(sizeof(OrderOld) * ocap);
		slot = transition_slot(oldts, desc);
		while (tuplestore_gettupleslot(oldts, true, false, slot))
		{
			if (nold == ocap)
			{
				ocap *= 2;
				olds = repalloc(olds, sizeof(OrderOld) * ocap);
			}
			olds[nold].order_id = slot_int64(slot, a_id);
			olds[nold].status = slot_text(slot, a_status);
			nold++;
		}
		ExecDropSingleTupleTableSlot(slot);
		qsort(olds, nold, sizeof(OrderOld), cmp_old);
	}

	/* the creations and real status changes */
	ch = palloc(sizeof(OrderChange) * cap);
	slot = transition_slot(newts, desc);
	while (tuplestore_gettupleslot(newts, true, false, slot))
	{
		OrderChange *c;
		char	   *from = NULL;
		char	   *to = slot_text(slot, a_status);
		int64		order_id = slot_int64(slot, a_id);

		if (!inserted)
		{
			OrderOld	key;
			OrderOld   *old;

			key.order_id = order_id;
			old = nold > 0 ? bsearch(&key, olds, nold, sizeof(OrderOld), cmp_old) : NULL;
			if (old == NULL)
				elog(ERROR, "market: order %lld has no row before the update", (long long) order_id);
			from = old->status;
			if (from != NULL && to != NULL && strcmp(from, to) == 0)
				continue;		/* not a transition */
		}
		if (n == cap)
		{
			cap *= 2;
			ch = repalloc(ch, sizeof(OrderChange) * cap);
		}
		c = &ch[n++];
		c->order_id = order_id;
		c->group_id = slot_int64(slot, a_group);
		c->seller_id = slot_int64(slot, a_seller);
		c->subtotal_minor = slot_int64(slot, a_subtotal);
		c->currency = slot_text(slot, a_currency);
		c->from = from;
		c->to = to;
		c->state = find_state(to);
		if (c->state == NULL)
			elog(ERROR, "market: order %lld has unknown status \"%s\"",
				 (long long) order_id, to ? to : "NULL");
	}
	ExecDropSingleTupleTableSlot(slot);
	if (n == 0)
		return PointerGetDatum(NULL);

	qsort(ch, n, sizeof(OrderChange), cmp_change);
	/* the notes of order_transition(_many)(), for their own orders, once */
	for (int i = 0; i < n; i++)
		ch[i].note = pending_take_note(ch[i].order_id);

	SPI_connect();
	record_events_many(ch, n);
	for (int i = 0; i < n; i++)
		if (ch[i].state->restock_kind != NULL)
			restock(ch[i].order_id, ch[i].state->restock_kind, ch[i].to);
	queue_psp_jobs_many(ch, n);
	SPI_finish();
	return PointerGetDatum(NULL);
}

/* check_note raises MK020 when a note is longer than the limit. */
static void
check_note(const char *note, int64 order_id, bool many)
{
	int			len = pg_mbstrlen(note);

	if (len > ORDER_NOTE_MAX_CHARS)
	{
		if (many)
			ereport(ERROR,
					(errcode(MK_INVALID_ARGUMENT),
					 errmsg("note too long"),
					 errdetail("Order %lld: the note has %d characters; the limit is %d.",
							   (long long) order_id, len, ORDER_NOTE_MAX_CHARS)));
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("note too long"),
				 errdetail("The note has %d characters; the limit is %d.",
						   len, ORDER_NOTE_MAX_CHARS)));
	}
}

/* IdNote pairs an order id with its note while order_transition_many sorts them. */
typedef struct IdNote
{
	int64		order_id;
	char	   *note;
} IdNote;

/* cmp_id_note orders IdNotes by order id. */
static int
cmp_id_note(const void *a, const void *b)
{
	return cmp_int64(&((const IdNote *) a)->order_id, &((const IdNote *) b)->order_id);
}

/*
 * market.order_transition_many(order_ids bigint[], to_state text, notes
 * text[] DEFAULT NULL) returns int: moves every order of order_ids to
 * to_state in one UPDATE, notes[i] being the note of order_ids[i], and
 * returns how many orders moved (all of them, or an error).  The orders
 * are locked in ascending id order first.  MK020: a NULL argument or
 * element, a duplicate id, notes not as long as order_ids, a note over
 * the limit, more than ORDER_MANY_MAX ids; MK017: an unknown order; MK003
 * (from the guard): an order for which to_state is not a next state.
 */
Datum
market_order_transition_many(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr lock_plan = NULL;
	static SPIPlanPtr update_plan = NULL;
	Oid			types[2] = {INT8ARRAYOID, TEXTOID};
	Datum		values[2];
	ArrayType  *ids_arr;
	Datum	   *id_datums;
	bool	   *id_nulls;
	int			n;
	Datum	   *note_datums = NULL;
	bool	   *note_nulls = NULL;
	int			nnotes = 0;
	IdNote	   *items;
	PendingTransition saved = pending;
	bool		unknown = false;
	int64		missing = 0;
	uint64		moved = 0;

	market_require_arg(fcinfo, 0, "order_ids");
	market_require_arg(fcinfo, 1, "to_state");
	ids_arr = PG_GETARG_ARRAYTYPE_P(0);
	if (ARR_NDIM(ids_arr) > 1)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("order_ids must be a one-dimensional array")));
	deconstruct_array(ids_arr, INT8OID, sizeof(int64), FLOAT8PASSBYVAL, TYPALIGN_DOUBLE,
					  &id_datums, &id_nulls, &n);
	if (n > ORDER_MANY_MAX)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("too many orders"),
				 errdetail("%d order ids were given; at most %d are allowed per call.",
						   n, ORDER_MANY_MAX)));
	if (!PG_ARGISNULL(2))
	{
		ArrayType  *notes_arr = PG_GETARG_ARRAYTYPE_P(2);

		if (ARR_NDIM(notes_arr) > 1)
			ereport(ERROR,
					(errcode(MK_INVALID_ARGUMENT),
					 errmsg("notes must be a one-dimensional array")));
		deconstruct_array(notes_arr, TEXTOID, -1, false, TYPALIGN_INT,
						  &note_datums, &note_nulls, &nnotes);
		if (nnotes != n)
			ereport(ERROR,
					(errcode(MK_INVALID_ARGUMENT),
					 errmsg("notes and order_ids differ in length"),
					 errdetail("%d order ids and %d notes were given.", n, nnotes),
					 errhint("Give one note per order (NULL for none), or no notes at all.")));
	}

	items = palloc(sizeof(IdNote) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		if (id_nulls[i])
			ereport(ERROR,
					(errcode(MK_INVALID_ARGUMENT),
					 errmsg("order_ids must not contain null"),
					 errdetail("Element %d is null.", i + 1)));
		items[i].order_id = DatumGetInt64(id_datums[i]);
		items[i].note = NULL;
		if (note_datums != NULL && !note_nulls[i])
		{
			items[i].note = TextDatumGetCString(note_datums[i]);
			check_note(items[i].note, items[i].order_id, true);
		}
	}
	if (n == 0)
		PG_RETURN_INT32(0);
	qsort(items, n, sizeof(IdNote), cmp_id_note);
	for (int i = 1; i < n; i++)
		if (items[i].order_id == items[i - 1].order_id)
			ereport(ERROR,
					(errcode(MK_INVALID_ARGUMENT),
					 errmsg("order_ids must not contain duplicates"),
					 errdetail("Order %lld is given more than once.", (long long) items[i].order_id)));

	pending.active = true;
	pending.n = n;
	pending.order_ids = palloc(sizeof(int64) * n);
	pending.notes = palloc(sizeof(char *) * n);
	for (int i = 0; i < n; i++)
	{
		pending.order_ids[i] = items[i].order_id;
		pending.notes[i] = items[i].note;
	}
	PG_TRY();
	{
		SPI_connect();
		values[0] = int8_array(pending.order_ids, n);
		values[1] = PointerGetDatum(PG_GETARG_TEXT_PP(1));

		/* lock them, ascending; an unknown id stops everything */
		market_prepare(&lock_plan,
					   "SELECT o.id FROM market.orders o WHERE o.id = ANY ($1)"
					   " ORDER BY o.id FOR UPDATE OF o",
					   1, types);
		if (SPI_execute_plan(lock_plan, values, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "market: could not lock %d orders", n);
		if (SPI_processed < (uint64) n)
		{
			/* the first id (ascending) that was not found: a merge of two sorted lists */
			uint64		r = 0;

			for (int i = 0; i < n && !unknown; i++)
			{
				bool		isnull;

				if (r < SPI_processed &&
					DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc,
												1, &isnull)) == pending.order_ids[i])
					r++;
				else
				{
					unknown = true;
					missing = pending.order_ids[i];
				}
			}
		}
		if (!unknown)
		{
			market_prepare(&update_plan,
						   "UPDATE market.orders SET status = $2 WHERE id = ANY ($1)",
						   2, types);
			if (SPI_execute_plan(update_plan, values, NULL, false, 0) != SPI_OK_UPDATE)
				elog(ERROR, "market: could not update %d orders", n);
			moved = SPI_processed;
		}
		SPI_finish();
	}
	PG_FINALLY();
	{
		pending = saved;
	}
	PG_END_TRY();

	if (unknown)
		ereport(ERROR,
				(errcode(MK_UNKNOWN_ORDER),
				 errmsg("unknown order"),
				 errdetail("No order has id %lld.", (long long) missing)));
	if (moved != (uint64) n)
		elog(ERROR, "market: %llu of %d orders moved", (unsigned long long) moved, n);
	PG_RETURN_INT32(n);
}

/*
 * market.order_transitions() returns table (from_status text, to_status
 * text): the graph, edge by edge, in the order of the table above.
 */
Datum
market_order_transitions(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < lengthof(order_edges); i++)
	{
		Datum		values[2];
		bool		nulls[2] = {false, false};

		values[0] = CStringGetTextDatum(order_edges[i].from);
		values[1] = CStringGetTextDatum(order_edges[i].to);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
