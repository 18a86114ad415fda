/*-------------------------------------------------------------------------
 *
 * inventory.c
 *	  The slot engine: takes units of a SKU out of its slots for a
 *	  reservation, gives them back, sells them, and re-spreads free units
 *	  evenly over the slots.
 *
 * A (sku, warehouse) pair keeps its units in N slot rows, each with an
 * on_hand and a free counter, and each guarded by an advisory lock of its
 * own.  A reservation of qty units:
 *
 *	fast path	try-locks the backend's home slot (pid mod N) and takes the
 *				units if it has them; else reads which slots hold >= qty free
 *				units and try-locks their advisory locks, starting at a slot
 *				picked by pid so concurrent sessions spread over the slots;
 *				the first one it gets that still has the units is decremented.
 *				Nobody waits.
 *	slot wait	if every fitting slot is busy, queue on one slot's advisory
 *				lock (a plain FIFO lock queue, not a row-lock pile-up) and
 *				re-check once it is ours.
 *	exact path	when no single slot can serve: the pair's advisory lock, then
 *				every slot row FOR UPDATE in slot order, reclaim expired
 *				reservations (SKIP LOCKED), count exactly, take across slots
 *				and re-spread what is left.
 *	sold out	if our snapshot shows fewer free units than asked (counting
 *				expired reservations as free), answer at once, no lock taken.
 *
 * No oversell is possible because a unit is only ever taken by decrementing
 * a slot's free counter on a row this transaction holds locked, and the
 * counter has CHECK (free >= 0).  Lock order is documented in market.h.
 *
 * Every function here runs inside an SPI connection opened by its caller.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "storage/lmgr.h"
#include "storage/lock.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "market.h"

/* the slots of one (sku, warehouse), loaded under lock */
typedef struct SlotSet
{
	int			n;
	int32	   *slot;
	int64	   *on_hand;
	int64	   *free;
	bool	   *usable;			/* may this pass change the slot's free? */
} SlotSet;

/*
 * Our advisory locks put these in the tag's last field, which the SQL-level
 * advisory lock functions set to 1 or 2, so ours never meet a user's.
 */
#define MARKET_PAIR_LOCK_MARKER	0x4D4B
#define MARKET_SLOT_LOCK_BIT	0x8000

/* run_plan executes a saved plan and fails loudly on an SPI error. */
static int
run_plan(SPIPlanPtr plan, Datum *values, int expect, long limit)
{
	int			rc = SPI_execute_plan(plan, values, NULL, false, limit);

	if (rc != expect)
		elog(ERROR, "market: internal query failed: %s", SPI_result_code_string(rc));
	return (int) SPI_processed;
}

/* get_int64 reads column col of result row row (int8 or numeric-free). */
static int64
get_int64(int row, int col, bool *isnull)
{
	bool		null;
	Datum		d = SPI_getbinval(SPI_tuptable->vals[row], SPI_tuptable->tupdesc, col, &null);

	if (isnull)
		*isnull = null;
	if (null)
		return 0;
	switch (SPI_gettypeid(SPI_tuptable->tupdesc, col))
	{
		case INT8OID:
			return DatumGetInt64(d);
		case INT4OID:
			return DatumGetInt32(d);
		default:
			elog(ERROR, "market: unexpected column type");
	}
	return 0;
}

/* takes_append adds one take to a list, growing it as needed. */
void
takes_append(TakeList *list, int64 sku_id, int32 warehouse_id, int32 slot, int64 qty)
{
	if (list->count == list->capacity)
	{
		list->capacity = list->capacity ? list->capacity * 2 : 8;
		if (list->items)
			list->items = repalloc(list->items, sizeof(SlotTake) * list->capacity);
		else
			list->items = palloc(sizeof(SlotTake) * list->capacity);
	}
	list->items[list->count].sku_id = sku_id;
	list->items[list->count].warehouse_id = warehouse_id;
	list->items[list->count].slot = slot;
	list->items[list->count].qty = qty;
	list->count++;
}

/* market_sku_exists says whether a SKU id is in the catalog. */
bool
market_sku_exists(int64 sku_id)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(sku_id)};

	market_prepare(&plan, "SELECT 1 FROM market.skus WHERE id = $1", 1, types);
	return run_plan(plan, values, SPI_OK_SELECT, 1) > 0;
}

/* market_warehouse_exists says whether a warehouse id exists. */
bool
market_warehouse_exists(int32 warehouse_id)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT4OID};
	Datum		values[1] = {Int32GetDatum(warehouse_id)};

	market_prepare(&plan, "SELECT 1 FROM market.warehouses WHERE id = $1", 1, types);
	return run_plan(plan, values, SPI_OK_SELECT, 1) > 0;
}

/* fitting slots claim_slot try-locks before it queues on one */
#define SLOT_PROBES		4

/* slot_locktag fills the advisory lock tag that guards one slot. */
static void
slot_locktag(LOCKTAG *tag, int64 sku_id, int32 warehouse_id, int32 slot)
{
	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) sku_id,
						 (uint32) warehouse_id, MARKET_SLOT_LOCK_BIT | (uint16) slot);
}

/*
 * market_lock_slot_guards waits for the advisory lock of every slot of the
 * pair, in slot order, and keeps them to the end of the transaction.  A
 * change that may lower some slot's free count takes them before locking
 * the rows, so that no fast-path session is queued on a row it lowers
 * (such a session's UPDATE would fail its re-check and keep a stray row
 * lock; see docs/architecture.md).
 */
void
market_lock_slot_guards(int64 sku_id, int32 warehouse_id, int32 nslots)
{
	LOCKTAG		tag;

	for (int32 slot = 0; slot < nslots; slot++)
	{
		slot_locktag(&tag, sku_id, warehouse_id, slot);
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
	}
}

/*
 * take_from_slot takes qty free units from a slot whose advisory lock we
 * hold, if it still has them, and with sell takes them off hand too.
 * Returns false if it does not have them.
 */
static bool
take_from_slot(int64 sku_id, int32 warehouse_id, int32 slot, int64 qty, bool sell)
{
	static SPIPlanPtr hold_plan = NULL;
	static SPIPlanPtr sell_plan = NULL;
	Oid			types[4] = {INT8OID, INT4OID, INT4OID, INT8OID};
	Datum		values[4];

	SPIPlanPtr	plan;

	if (sell)
		plan = market_prepare(&sell_plan,
							  "UPDATE market.stock_slots SET free = free - $4, on_hand = on_hand - $4"
							  " WHERE sku_id = $1 AND warehouse_id = $2 AND slot = $3 AND free >= $4",
							  4, types);
	else
		plan = market_prepare(&hold_plan,
							  "UPDATE market.stock_slots SET free = free - $4"
							  " WHERE sku_id = $1 AND warehouse_id = $2 AND slot = $3 AND free >= $4",
							  4, types);
	values[0] = Int64GetDatum(sku_id);
	values[1] = Int32GetDatum(warehouse_id);
	values[2] = Int32GetDatum(slot);
	values[3] = Int64GetDatum(qty);
	return run_plan(plan, values, SPI_OK_UPDATE, 0) == 1;
}

/*
 * claim_slot is the fast path and the slot wait.  It first tries the
 * backend's home slot (pid modulo the slot count: with as many slots as
 * sessions, every session has a slot of its own).  Failing that, it reads
 * which slots hold at least qty free units and tries the advisory locks of
 * at most SLOT_PROBES of them without waiting, starting at a slot picked by
 * pid so that concurrent sessions spread out; the first slot it locks that
 * still has the units is taken.  When those are busy it queues on one of
 * them.  The probes are bounded because every try-lock goes through the
 * shared lock table's partition locks: with hundreds of sessions on one
 * SKU, scanning every slot made the lock manager itself the bottleneck.
 * With sell the take is a sale (on_hand falls with free).  Returns the
 * slot taken, or -1.
 */
static int32
claim_slot(int64 sku_id, int32 warehouse_id, int32 nslots, int64 qty, bool sell)
{
	static SPIPlanPtr fit_plan = NULL;
	Oid			types[3] = {INT8OID, INT4OID, INT8OID};
	Datum		values[3];
	int			nfit;
	int			start;
	int32	   *fits;
	LOCKTAG		tag;

	market_prepare(&fit_plan,
				   "SELECT slot FROM market.stock_slots"
				   " WHERE sku_id = $1 AND warehouse_id = $2 AND free >= $3",
				   3, types);

	if (nslots > 0)
	{
		int32		home = MyProcPid % nslots;

		slot_locktag(&tag, sku_id, warehouse_id, home);
		if (LockAcquire(&tag, ExclusiveLock, false, true) != LOCKACQUIRE_NOT_AVAIL)
		{
			if (take_from_slot(sku_id, warehouse_id, home, qty, sell))
				return home;
			LockRelease(&tag, ExclusiveLock, false);
		}
	}

	values[0] = Int64GetDatum(sku_id);
	values[1] = Int32GetDatum(warehouse_id);
	values[2] = Int64GetDatum(qty);
	nfit = run_plan(fit_plan, values, SPI_OK_SELECT, 0);
	if (nfit == 0)
		return -1;
	fits = palloc(sizeof(int32) * nfit);
	for (int i = 0; i < nfit; i++)
		fits[i] = (int32) get_int64(i, 1, NULL);

	start = MyProcPid % nfit;
	for (int k = 0; k < Min(nfit, SLOT_PROBES); k++)
	{
		int32		slot = fits[(start + k) % nfit];

		slot_locktag(&tag, sku_id, warehouse_id, slot);
		if (LockAcquire(&tag, ExclusiveLock, false, true) == LOCKACQUIRE_NOT_AVAIL)
			continue;
		if (take_from_slot(sku_id, warehouse_id, slot, qty, sell))
			return slot;
		LockRelease(&tag, ExclusiveLock, false);
	}

	/* every fitting slot is busy: queue behind one holder */
	slot_locktag(&tag, sku_id, warehouse_id, fits[start]);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
	if (take_from_slot(sku_id, warehouse_id, fits[start], qty, sell))
		return fits[start];
	LockRelease(&tag, ExclusiveLock, false);
	return -1;
}

/*
 * market_lock_all_slots serializes on the pair: its advisory lock, then
 * every slot row FOR UPDATE in slot order.  The advisory lock only orders
 * the sessions queueing for the exact path (one FIFO queue instead of a
 * pile-up on N rows); once the rows are ours it is released, so a bulk
 * load touching many pairs in one transaction does not fill the lock
 * table.  The row locks last until the transaction ends.
 */
void
market_lock_all_slots(int64 sku_id, int32 warehouse_id)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2];
	LOCKTAG		tag;

	SET_LOCKTAG_ADVISORY(tag, MyDatabaseId, (uint32) sku_id,
						 (uint32) warehouse_id, MARKET_PAIR_LOCK_MARKER);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);
	market_prepare(&plan,
				   "SELECT slot FROM market.stock_slots"
				   " WHERE sku_id = $1 AND warehouse_id = $2 ORDER BY slot FOR UPDATE",
				   2, types);
	values[0] = Int64GetDatum(sku_id);
	values[1] = Int32GetDatum(warehouse_id);
	run_plan(plan, values, SPI_OK_SELECT, 0);
	LockRelease(&tag, ExclusiveLock, false);
}

/* load_slots reads the pair's slots (which the caller has locked). */
static void
load_slots(int64 sku_id, int32 warehouse_id, SlotSet *set)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2];
	int			n;

	market_prepare(&plan,
				   "SELECT slot, on_hand, free FROM market.stock_slots"
				   " WHERE sku_id = $1 AND warehouse_id = $2 ORDER BY slot",
				   2, types);
	values[0] = Int64GetDatum(sku_id);
	values[1] = Int32GetDatum(warehouse_id);
	n = run_plan(plan, values, SPI_OK_SELECT, 0);

	set->n = n;
	set->slot = palloc(sizeof(int32) * Max(n, 1));
	set->on_hand = palloc(sizeof(int64) * Max(n, 1));
	set->free = palloc(sizeof(int64) * Max(n, 1));
	set->usable = palloc(sizeof(bool) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		set->usable[i] = true;
		set->slot[i] = (int32) get_int64(i, 1, NULL);
		set->on_hand[i] = get_int64(i, 2, NULL);
		set->free[i] = get_int64(i, 3, NULL);
	}
}

/* store_slots writes every slot's counters back in one statement. */
static void
store_slots(int64 sku_id, int32 warehouse_id, SlotSet *set)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[5] = {INT8OID, INT4OID, INT4ARRAYOID, INT8ARRAYOID, INT8ARRAYOID};
	Datum		values[5];
	Datum	   *slots = palloc(sizeof(Datum) * set->n);
	Datum	   *on_hand = palloc(sizeof(Datum) * set->n);
	Datum	   *free_d = palloc(sizeof(Datum) * set->n);

	market_prepare(&plan,
				   "UPDATE market.stock_slots s SET on_hand = v.on_hand, free = v.free"
				   " FROM unnest($3, $4, $5) AS v(slot, on_hand, free)"
				   " WHERE s.sku_id = $1 AND s.warehouse_id = $2 AND s.slot = v.slot"
				   " AND (s.on_hand, s.free) IS DISTINCT FROM (v.on_hand, v.free)",
				   5, types);
	for (int i = 0; i < set->n; i++)
	{
		slots[i] = Int32GetDatum(set->slot[i]);
		on_hand[i] = Int64GetDatum(set->on_hand[i]);
		free_d[i] = Int64GetDatum(set->free[i]);
	}
	values[0] = Int64GetDatum(sku_id);
	values[1] = Int32GetDatum(warehouse_id);
	values[2] = PointerGetDatum(construct_array(slots, set->n, INT4OID, 4, true, TYPALIGN_INT));
	values[3] = PointerGetDatum(construct_array(on_hand, set->n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	values[4] = PointerGetDatum(construct_array(free_d, set->n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	run_plan(plan, values, SPI_OK_UPDATE, 0);
}

/*
 * spread_free gives every slot an even share of total_free, keeping what
 * each slot holds for reservations (on_hand - free) where it is.
 */
static void
spread_free(SlotSet *set, int64 total_free)
{
	int			nusable = 0;
	int64		share;
	int64		extra;
	int			k = 0;

	for (int i = 0; i < set->n; i++)
		nusable += set->usable[i] ? 1 : 0;
	if (nusable == 0)
		return;
	share = total_free / nusable;
	extra = total_free % nusable;
	for (int i = 0; i < set->n; i++)
	{
		int64		held = set->on_hand[i] - set->free[i];

		if (!set->usable[i])
			continue;
		set->free[i] = share + (k++ < extra ? 1 : 0);
		set->on_hand[i] = held + set->free[i];
	}
}

/*
 * add_free spreads add (>= 0) free units over the slots on top of what
 * each has: no slot's free count goes down, so a session queued on a slot
 * for its units still finds them when its turn comes.
 */
static void
add_free(SlotSet *set, int64 add)
{
	for (int i = 0; i < set->n; i++)
	{
		int64		more = add / set->n + (i < add % set->n ? 1 : 0);

		set->free[i] += more;
		set->on_hand[i] += more;
	}
}

/*
 * market_rebalance (slots locked by the caller) adds add units (may be
 * negative) to the pair's free stock and reports the new on-hand and held
 * totals.  An addition is spread on top of what each slot has; a removal,
 * or respread, evens out every slot.  The caller has checked free stays
 * >= 0.
 */
void
market_rebalance(int64 sku_id, int32 warehouse_id, int64 add, bool respread,
				 int64 *on_hand_out, int64 *held_out)
{
	SlotSet		set;
	int64		free_total = 0;
	int64		held_total = 0;

	load_slots(sku_id, warehouse_id, &set);
	if (set.n == 0)
		elog(ERROR, "market: stock of sku %lld has no slots", (long long) sku_id);
	for (int i = 0; i < set.n; i++)
	{
		free_total += set.free[i];
		held_total += set.on_hand[i] - set.free[i];
	}
	Assert(free_total + add >= 0);
	if (add >= 0 && !respread)
		add_free(&set, add);
	else
		spread_free(&set, free_total + add);
	store_slots(sku_id, warehouse_id, &set);
	if (on_hand_out)
		*on_hand_out = held_total + free_total + add;
	if (held_out)
		*held_out = held_total;
}

/*
 * take_exact_locked is the exact path for one pair: serialize, reclaim
 * expired units, and take qty across slots if the pair holds that many
 * free units.  Returns false when it does not.
 *
 * It only changes slots whose advisory lock it can take without waiting.
 * A slot whose lock another session holds belongs to a fast-path
 * reservation that is about to decrement that row (it may be queued on our
 * row lock right now): leaving the row unchanged means its UPDATE goes
 * through when we commit, instead of failing its re-check while keeping
 * the row locked, a stray lock that could close a cycle with this pair's
 * lock.  Those units are spoken for anyway.
 */
static bool
take_exact_locked(int64 sku_id, int32 warehouse_id, int64 qty, TakeList *takes)
{
	SlotSet		set;
	int64		free_total = 0;
	int64		remaining = qty;

	market_lock_all_slots(sku_id, warehouse_id);
	market_reclaim_expired(sku_id, warehouse_id);
	load_slots(sku_id, warehouse_id, &set);
	for (int i = 0; i < set.n; i++)
	{
		LOCKTAG		tag;

		slot_locktag(&tag, sku_id, warehouse_id, set.slot[i]);
		set.usable[i] = (LockAcquire(&tag, ExclusiveLock, false, true) != LOCKACQUIRE_NOT_AVAIL);
		if (set.usable[i])
			free_total += set.free[i];
	}
	if (free_total < qty)
		return false;

	for (int i = 0; i < set.n && remaining > 0; i++)
	{
		int64		t = set.usable[i] ? Min(set.free[i], remaining) : 0;

		if (t <= 0)
			continue;
		set.free[i] -= t;		/* now held by us: on_hand - free grows by t */
		if (takes->sell)
			set.on_hand[i] -= t;	/* or sold: on_hand - free stays */
		remaining -= t;
		takes_append(takes, sku_id, warehouse_id, set.slot[i], t);
	}
	spread_free(&set, free_total - qty);
	store_slots(sku_id, warehouse_id, &set);
	return true;
}

/*
 * take_exact runs the exact path in a subtransaction.  When the pair cannot
 * serve the line, the subtransaction is rolled back, so the slot rows it
 * locked are released before the next warehouse is tried: a session never
 * holds the rows of a pair it did not take from while it waits for
 * another pair, which would let warehouse order (priority) and the
 * worker's order (id) form a cycle.
 */
static bool
take_exact(int64 sku_id, int32 warehouse_id, int64 qty, TakeList *takes)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	int			count_before = takes->count;
	bool		taken;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		taken = take_exact_locked(sku_id, warehouse_id, qty, takes);
	}
	PG_CATCH();
	{
		/* end the subtransaction ourselves, then let the error go on */
		MemoryContextSwitchTo(cxt);
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		PG_RE_THROW();
	}
	PG_END_TRY();
	if (taken)
		ReleaseCurrentSubTransaction();
	else
	{
		RollbackAndReleaseCurrentSubTransaction();
		takes->count = count_before;
	}
	MemoryContextSwitchTo(cxt);
	CurrentResourceOwner = owner;
	return taken;
}

/*
 * snapshot_free returns, without locking, the pair's free units plus what
 * expired-but-not-yet-returned reservations hold there: what the pair
 * could serve if it were counted exactly right now.
 */
static int64
snapshot_available(int64 sku_id, int32 warehouse_id, bool *has_stock)
{
	static SPIPlanPtr free_plan = NULL;
	static SPIPlanPtr expired_plan = NULL;
	Oid			types[3] = {INT8OID, INT4OID, TIMESTAMPTZOID};
	Datum		values[3];
	int64		avail;
	bool		isnull;

	market_prepare(&free_plan,
				   "SELECT sum(free)::int8 FROM market.stock_slots"
				   " WHERE sku_id = $1 AND ($2 = 0 OR warehouse_id = $2)",
				   2, types);
	market_prepare(&expired_plan,
				   "SELECT sum(l.qty)::int8"
				   " FROM market.reservations r,"
				   "      unnest(r.sku_ids, r.warehouse_ids, r.slots, r.qtys) AS l(sku_id, warehouse_id, slot, qty)"
				   " WHERE r.status = 'held' AND r.expires_at <= $3"
				   "   AND l.slot >= 0 AND l.sku_id = $1 AND ($2 = 0 OR l.warehouse_id = $2)",
				   3, types);
	values[0] = Int64GetDatum(sku_id);
	values[1] = Int32GetDatum(warehouse_id);
	values[2] = TimestampTzGetDatum(GetCurrentTimestamp());

	run_plan(free_plan, values, SPI_OK_SELECT, 1);
	avail = get_int64(0, 1, &isnull);
	if (has_stock)
		*has_stock = !isnull;
	run_plan(expired_plan, values, SPI_OK_SELECT, 1);
	avail += get_int64(0, 1, NULL);
	return avail;
}

/* market_available_units is market.available()'s core (0 = all warehouses). */
int64
market_available_units(int64 sku_id, int32 warehouse_id)
{
	bool		has_stock;
	int64		avail = snapshot_available(sku_id, warehouse_id, &has_stock);

	if (!has_stock)
	{
		if (!market_sku_exists(sku_id))
			ereport(ERROR,
					(errcode(MK_UNKNOWN_SKU),
					 errmsg("unknown sku"),
					 errdetail("No SKU has id %lld.", (long long) sku_id)));
		if (warehouse_id != 0 && !market_warehouse_exists(warehouse_id))
			ereport(ERROR,
					(errcode(MK_UNKNOWN_WAREHOUSE),
					 errmsg("unknown warehouse"),
					 errdetail("No warehouse has id %d.", warehouse_id)));
	}
	return avail;
}

/*
 * take_from_pair tries fast path, slot wait and exact path on one pair.
 * Returns false if the pair cannot serve qty units.
 */
static bool
take_from_pair(int64 sku_id, int32 warehouse_id, int32 nslots, int64 qty,
			   TakeList *takes)
{
	int32		slot = claim_slot(sku_id, warehouse_id, nslots, qty, takes->sell);

	if (slot >= 0)
	{
		takes_append(takes, sku_id, warehouse_id, slot, qty);
		return true;
	}

	/* sold out by our snapshot: answer fast, without any lock */
	if (snapshot_available(sku_id, warehouse_id, NULL) < qty)
		return false;
	return take_exact(sku_id, warehouse_id, qty, takes);
}

/*
 * market_take_line reserves one (merged) line, appending what it took to
 * takes, or raises MK001 / MK010 / MK011.
 */
void
market_take_line(const ReserveLine *line, TakeList *takes)
{
	static SPIPlanPtr any_plan = NULL;
	static SPIPlanPtr ordered_plan = NULL;
	static SPIPlanPtr one_plan = NULL;
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2];
	int			n;
	int32	   *warehouses;
	int32	   *nslots;

	/*
	 * Most SKUs are stocked in one warehouse: a plain index lookup finds it,
	 * and only a SKU in several warehouses pays for ordering them.
	 */
	market_prepare(&any_plan,
				   "SELECT warehouse_id, slots FROM market.stock WHERE sku_id = $1",
				   1, types);
	market_prepare(&ordered_plan,
				   "SELECT st.warehouse_id, st.slots FROM market.stock st"
				   " JOIN market.warehouses w ON w.id = st.warehouse_id"
				   " WHERE st.sku_id = $1 ORDER BY w.priority, st.warehouse_id",
				   1, types);
	market_prepare(&one_plan,
				   "SELECT warehouse_id, slots FROM market.stock"
				   " WHERE sku_id = $1 AND warehouse_id = $2",
				   2, types);
	values[0] = Int64GetDatum(line->sku_id);
	values[1] = Int32GetDatum(line->warehouse_id);
	if (line->warehouse_id == 0)
	{
		n = run_plan(any_plan, values, SPI_OK_SELECT, 0);
		if (n > 1)
			n = run_plan(ordered_plan, values, SPI_OK_SELECT, 0);
	}
	else
		n = run_plan(one_plan, values, SPI_OK_SELECT, 1);

	if (n == 0)
	{
		if (!market_sku_exists(line->sku_id))
			ereport(ERROR,
					(errcode(MK_UNKNOWN_SKU),
					 errmsg("unknown sku"),
					 errdetail("No SKU has id %lld.", (long long) line->sku_id)));
		if (line->warehouse_id != 0 && !market_warehouse_exists(line->warehouse_id))
			ereport(ERROR,
					(errcode(MK_UNKNOWN_WAREHOUSE),
					 errmsg("unknown warehouse"),
					 errdetail("No warehouse has id %d.", line->warehouse_id)));
	}

	warehouses = palloc(sizeof(int32) * Max(n, 1));
	nslots = palloc(sizeof(int32) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		warehouses[i] = (int32) get_int64(i, 1, NULL);
		nslots[i] = (int32) get_int64(i, 2, NULL);
	}

	for (int i = 0; i < n; i++)
	{
		if (take_from_pair(line->sku_id, warehouses[i], nslots[i], line->qty, takes))
			return;
	}

	ereport(ERROR,
			(errcode(MK_INSUFFICIENT_STOCK),
			 errmsg("insufficient stock"),
			 errdetail("SKU %lld: %lld requested, %lld available%s.",
					   (long long) line->sku_id, (long long) line->qty,
					   (long long) market_available_units(line->sku_id, line->warehouse_id),
					   line->warehouse_id != 0 ? " in the requested warehouse" : ""),
			 line->warehouse_id == 0 && n > 1 ?
			 errhint("A line is served whole from one warehouse; split it to draw on several.") : 0));
}

/* market_compare_takes orders takes by (sku, warehouse, slot): the lock order. */
int
market_compare_takes(const void *a, const void *b)
{
	const SlotTake *x = a;
	const SlotTake *y = b;

	if (x->sku_id != y->sku_id)
		return x->sku_id < y->sku_id ? -1 : 1;
	if (x->warehouse_id != y->warehouse_id)
		return x->warehouse_id < y->warehouse_id ? -1 : 1;
	if (x->slot != y->slot)
		return x->slot < y->slot ? -1 : 1;
	return 0;
}

/*
 * market_takes_to_arrays builds the sku/warehouse/slot/qty arrays of a list
 * of takes, merging adjacent takes from the same slot; returns their count.
 */
int
market_takes_to_arrays(SlotTake *takes, int ntakes, Datum *arrays)
{
	Datum	   *sku = palloc(sizeof(Datum) * ntakes);
	Datum	   *wh = palloc(sizeof(Datum) * ntakes);
	Datum	   *slot = palloc(sizeof(Datum) * ntakes);
	Datum	   *qty = palloc(sizeof(Datum) * ntakes);
	int			n = 0;

	for (int i = 0; i < ntakes; i++)
	{
		if (n > 0 && market_compare_takes(&takes[i], &takes[i - 1]) == 0)
		{
			qty[n - 1] = Int64GetDatum(DatumGetInt64(qty[n - 1]) + takes[i].qty);
			continue;
		}
		sku[n] = Int64GetDatum(takes[i].sku_id);
		wh[n] = Int32GetDatum(takes[i].warehouse_id);
		slot[n] = Int32GetDatum(takes[i].slot);
		qty[n] = Int64GetDatum(takes[i].qty);
		n++;
	}
	arrays[0] = PointerGetDatum(construct_array(sku, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	arrays[1] = PointerGetDatum(construct_array(wh, n, INT4OID, 4, true, TYPALIGN_INT));
	arrays[2] = PointerGetDatum(construct_array(slot, n, INT4OID, 4, true, TYPALIGN_INT));
	arrays[3] = PointerGetDatum(construct_array(qty, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	return n;
}

/*
 * market_return_units gives the units of finished reservations back to
 * their slots (sold = false), or removes them from stock for good and
 * writes the sale rows of the ledger (sold = true, one reservation).
 * Slots are locked in (sku, warehouse, slot) order before being changed.
 */
void
market_return_units(const SlotTake *takes_in, int ntakes, bool sold,
					pg_uuid_t *reservation)
{
	static SPIPlanPtr lock_plan = NULL;
	static SPIPlanPtr free_plan = NULL;
	static SPIPlanPtr sell_plan = NULL;
	static SPIPlanPtr ledger_plan = NULL;
	Oid			types[5] = {INT8ARRAYOID, INT4ARRAYOID, INT4ARRAYOID, INT8ARRAYOID, UUIDOID};
	Datum		values[5];
	SlotTake   *takes;
	int			n;

	/* lines already returned by a partial reclaim carry slot -1 */
	takes = palloc(sizeof(SlotTake) * Max(ntakes, 1));
	n = 0;
	for (int i = 0; i < ntakes; i++)
		if (takes_in[i].slot >= 0)
			takes[n++] = takes_in[i];
	if (n == 0)
		return;
	qsort(takes, n, sizeof(SlotTake), market_compare_takes);
	n = market_takes_to_arrays(takes, n, values);

	market_prepare(&lock_plan,
				   "SELECT 1 FROM market.stock_slots s"
				   " JOIN unnest($1, $2, $3) AS v(sku_id, warehouse_id, slot)"
				   "   ON s.sku_id = v.sku_id AND s.warehouse_id = v.warehouse_id AND s.slot = v.slot"
				   " ORDER BY s.sku_id, s.warehouse_id, s.slot FOR UPDATE OF s",
				   3, types);
	market_prepare(&free_plan,
				   "UPDATE market.stock_slots s SET free = s.free + v.qty"
				   " FROM unnest($1, $2, $3, $4) AS v(sku_id, warehouse_id, slot, qty)"
				   " WHERE s.sku_id = v.sku_id AND s.warehouse_id = v.warehouse_id AND s.slot = v.slot",
				   4, types);
	market_prepare(&sell_plan,
				   "UPDATE market.stock_slots s SET on_hand = s.on_hand - v.qty"
				   " FROM unnest($1, $2, $3, $4) AS v(sku_id, warehouse_id, slot, qty)"
				   " WHERE s.sku_id = v.sku_id AND s.warehouse_id = v.warehouse_id AND s.slot = v.slot",
				   4, types);
	market_prepare(&ledger_plan,
				   "INSERT INTO market.stock_ledger (sku_id, warehouse_id, delta, kind, reservation_id)"
				   " SELECT v.sku_id, v.warehouse_id, -sum(v.qty)::int8, 'sale', $5"
				   " FROM unnest($1, $2, $4) AS v(sku_id, warehouse_id, qty)"
				   " GROUP BY v.sku_id, v.warehouse_id ORDER BY v.sku_id, v.warehouse_id",
				   5, types);

	if (n > 1)
		run_plan(lock_plan, values, SPI_OK_SELECT, 0);
	if (run_plan(sold ? sell_plan : free_plan, values, SPI_OK_UPDATE, 0) != n)
		elog(ERROR, "market: a reserved slot is missing");
	if (sold)
	{
		values[4] = UUIDPGetDatum(reservation);
		run_plan(ledger_plan, values, SPI_OK_INSERT, 0);
	}
}

/*
 * market_takes_from_tuple appends the lines stored in a reservation row's
 * four arrays (sku_ids, warehouse_ids, slots, qtys at columns first ..
 * first + 3 of an SPI result) to takes.
 */
void
market_takes_from_tuple(HeapTuple tup, TupleDesc desc, int first, TakeList *takes)
{
	bool		isnull;
	Datum	   *skus,
			   *whs,
			   *slots,
			   *qtys;
	int			n;

	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, first, &isnull)),
					  INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &skus, NULL, &n);
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, first + 1, &isnull)),
					  INT4OID, 4, true, TYPALIGN_INT, &whs, NULL, &n);
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, first + 2, &isnull)),
					  INT4OID, 4, true, TYPALIGN_INT, &slots, NULL, &n);
	deconstruct_array(DatumGetArrayTypeP(SPI_getbinval(tup, desc, first + 3, &isnull)),
					  INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE, &qtys, NULL, &n);
	for (int i = 0; i < n; i++)
		takes_append(takes, DatumGetInt64(skus[i]), DatumGetInt32(whs[i]),
					 DatumGetInt32(slots[i]), DatumGetInt64(qtys[i]));
}

/*
 * market_reclaim_expired (every slot of the pair locked by the caller)
 * returns the units that expired reservations hold in this pair, so the
 * exact path can count them.  It never waits and never locks a row of
 * another pair (that would break the lock order of market.h): a
 * reservation another session is finishing is skipped (SKIP LOCKED); one
 * whose lines all lie in this pair is expired whole; for one that also
 * holds units elsewhere, only its lines in this pair are returned and
 * marked returned (slot = -1), and the worker expires the rest.  Returns
 * how many reservations it expired whole.
 */
int
market_reclaim_expired(int64 sku_id, int32 warehouse_id)
{
	static SPIPlanPtr pick_plan = NULL;
	static SPIPlanPtr mark_plan = NULL;
	static SPIPlanPtr partial_plan = NULL;
	Oid			types[3] = {INT8OID, INT4OID, TIMESTAMPTZOID};
	Oid			mark_types[2] = {UUIDOID, TIMESTAMPTZOID};
	Oid			partial_types[2] = {UUIDOID, INT4ARRAYOID};
	Datum		values[3];
	TimestampTz now = GetCurrentTimestamp();
	SPITupleTable *picked;
	int			npicked;
	int			expired = 0;

	market_prepare(&pick_plan,
				   "SELECT r.id, r.sku_ids, r.warehouse_ids, r.slots, r.qtys"
				   " FROM market.reservations r"
				   " WHERE r.status = 'held' AND r.expires_at <= $3 AND $1 = ANY (r.sku_ids)"
				   "   AND $2 = ANY (r.warehouse_ids)"
				   " ORDER BY r.expires_at LIMIT 1000 FOR UPDATE SKIP LOCKED",
				   3, types);
	market_prepare(&mark_plan,
				   "UPDATE market.reservations SET status = 'expired', finished_at = $2"
				   " WHERE id = $1",
				   2, mark_types);
	market_prepare(&partial_plan,
				   "UPDATE market.reservations SET slots = $2 WHERE id = $1",
				   2, partial_types);

	values[0] = Int64GetDatum(sku_id);
	values[1] = Int32GetDatum(warehouse_id);
	values[2] = TimestampTzGetDatum(now);
	npicked = run_plan(pick_plan, values, SPI_OK_SELECT, 0);
	picked = SPI_tuptable;

	for (int r = 0; r < npicked; r++)
	{
		bool		isnull;
		Datum		id = SPI_getbinval(picked->vals[r], picked->tupdesc, 1, &isnull);
		TakeList	lines = {0};
		TakeList	here = {0};
		bool		elsewhere = false;

		market_takes_from_tuple(picked->vals[r], picked->tupdesc, 2, &lines);
		for (int i = 0; i < lines.count; i++)
		{
			SlotTake   *t = &lines.items[i];

			if (t->slot < 0)
				continue;		/* returned earlier */
			if (t->sku_id == sku_id && t->warehouse_id == warehouse_id)
				takes_append(&here, t->sku_id, t->warehouse_id, t->slot, t->qty);
			else
				elsewhere = true;
		}
		if (here.count == 0)
			continue;

		market_return_units(here.items, here.count, false, NULL);
		if (!elsewhere)
		{
			Datum		mv[2] = {id, TimestampTzGetDatum(now)};

			run_plan(mark_plan, mv, SPI_OK_UPDATE, 0);
			expired++;
		}
		else
		{
			Datum	   *slots = palloc(sizeof(Datum) * lines.count);
			Datum		pv[2];

			for (int i = 0; i < lines.count; i++)
			{
				bool		ours = (lines.items[i].sku_id == sku_id &&
									lines.items[i].warehouse_id == warehouse_id);

				slots[i] = Int32GetDatum(ours ? -1 : lines.items[i].slot);
			}
			pv[0] = id;
			pv[1] = PointerGetDatum(construct_array(slots, lines.count, INT4OID, 4, true, TYPALIGN_INT));
			run_plan(partial_plan, pv, SPI_OK_UPDATE, 0);
		}
	}
	if (expired > 0 && market_shared != NULL)
		pg_atomic_fetch_add_u64(&market_shared->expired_total, expired);
	return expired;
}
