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
 * edge of the graph (MK003), and stamps updated_at.  An AFTER ROW trigger
 * (market.order_effects) runs once per creation and per status change: it
 * appends to market.order_events, writes the domain event and the PSP job
 * to market.outbox and puts units back on hand.  Both fire for every
 * writer: our functions, checkout's INSERTs, a superuser's direct UPDATE.
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
 * The note.  order_transition() leaves its note (and the order it is for)
 * in a backend-local variable for the AFTER trigger of its own UPDATE,
 * which takes it; the variable is restored when the call ends, even on
 * error.  A direct UPDATE finds no note for its order and records NULL.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "market.h"

PG_FUNCTION_INFO_V1(market_order_guard);
PG_FUNCTION_INFO_V1(market_order_effects);
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

/* what order_transition() left for the triggers of its own UPDATE */
typedef struct PendingTransition
{
	bool		active;
	int64		order_id;
	char	   *note;			/* NULL: none, or already taken */
} PendingTransition;

static PendingTransition pending = {false, 0, NULL};

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
		/* not a transition, unless order_transition() asked for one */
		if (pending.active && pending.order_id == order_id)
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
	if (pending.active && pending.order_id == order_id)
	{
		note = pending.note;
		pending.note = NULL;
	}

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
		if (pg_mbstrlen(note) > ORDER_NOTE_MAX_CHARS)
			ereport(ERROR,
					(errcode(MK_INVALID_ARGUMENT),
					 errmsg("note too long"),
					 errdetail("The note has %d characters; the limit is %d.",
							   pg_mbstrlen(note), ORDER_NOTE_MAX_CHARS)));
	}

	pending.active = true;
	pending.order_id = order_id;
	pending.note = note;
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
