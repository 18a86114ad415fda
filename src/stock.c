/*-------------------------------------------------------------------------
 *
 * stock.c
 *	  Receiving, cycle counts and adjustments: market.stock_set() and
 *	  market.stock_adjust(), and the creation and resizing of a pair's
 *	  slots.
 *
 * Both functions take the pair's exact-path locks (advisory lock, then
 * every slot in order; see market.h), return expired reservations first so
 * they do not count as held, check the new on-hand against what live
 * reservations hold, re-spread the free units and append one ledger row.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "utils/builtins.h"

#include "market.h"

PG_FUNCTION_INFO_V1(market_stock_set);
PG_FUNCTION_INFO_V1(market_stock_adjust);

/* check_pair_exists raises MK010/MK011 for an unknown SKU or warehouse. */
static void
check_pair_exists(int64 sku_id, int32 warehouse_id)
{
	if (!market_sku_exists(sku_id))
		ereport(ERROR,
				(errcode(MK_UNKNOWN_SKU),
				 errmsg("unknown sku"),
				 errdetail("No SKU has id %lld.", (long long) sku_id)));
	if (!market_warehouse_exists(warehouse_id))
		ereport(ERROR,
				(errcode(MK_UNKNOWN_WAREHOUSE),
				 errmsg("unknown warehouse"),
				 errdetail("No warehouse has id %d.", warehouse_id)));
}

/* stock_slot_count returns the pair's slot count, or 0 if it has no stock. */
static int32
stock_slot_count(int64 sku_id, int32 warehouse_id)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2] = {Int64GetDatum(sku_id), Int32GetDatum(warehouse_id)};
	bool		isnull;

	market_prepare(&plan, "SELECT slots FROM market.stock WHERE sku_id = $1 AND warehouse_id = $2",
				   2, types);
	if (SPI_execute_plan(plan, values, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "market: could not read stock");
	if (SPI_processed == 0)
		return 0;
	return DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/* add_slots creates slot rows [from, to) holding nothing. */
static void
add_slots(int64 sku_id, int32 warehouse_id, int32 from, int32 to)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[4] = {INT8OID, INT4OID, INT4OID, INT4OID};
	Datum		values[4] = {Int64GetDatum(sku_id), Int32GetDatum(warehouse_id),
	Int32GetDatum(from), Int32GetDatum(to)};

	market_prepare(&plan,
				   "INSERT INTO market.stock_slots (sku_id, warehouse_id, slot, on_hand, free)"
				   " SELECT $1, $2, g, 0, 0 FROM generate_series($3, $4 - 1) AS g",
				   4, types);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "market: could not create slots");
}

/* set_slot_count records the pair's slot count. */
static void
set_slot_count(int64 sku_id, int32 warehouse_id, int32 slots)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {INT8OID, INT4OID, INT4OID};
	Datum		values[3] = {Int64GetDatum(sku_id), Int32GetDatum(warehouse_id),
	Int32GetDatum(slots)};

	market_prepare(&plan,
				   "UPDATE market.stock SET slots = $3 WHERE sku_id = $1 AND warehouse_id = $2",
				   3, types);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "market: could not update stock");
}

/* create_stock gives a pair its stock row and empty slots. */
static void
create_stock(int64 sku_id, int32 warehouse_id, int32 slots)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {INT8OID, INT4OID, INT4OID};
	Datum		values[3] = {Int64GetDatum(sku_id), Int32GetDatum(warehouse_id),
	Int32GetDatum(slots)};

	market_prepare(&plan,
				   "INSERT INTO market.stock (sku_id, warehouse_id, slots) VALUES ($1, $2, $3)"
				   " ON CONFLICT DO NOTHING",
				   3, types);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "market: could not create stock");
	if (SPI_processed == 1)
		add_slots(sku_id, warehouse_id, 0, slots);
}

/*
 * remove_slots deletes slots [from, ...) once they hold nothing for
 * reservations, and returns the free units they had (the caller re-spreads
 * them over the remaining slots).
 */
static int64
remove_slots(int64 sku_id, int32 warehouse_id, int32 from)
{
	static SPIPlanPtr held_plan = NULL;
	static SPIPlanPtr delete_plan = NULL;
	Oid			types[3] = {INT8OID, INT4OID, INT4OID};
	Datum		values[3] = {Int64GetDatum(sku_id), Int32GetDatum(warehouse_id),
	Int32GetDatum(from)};
	bool		isnull;
	int64		held;
	int64		freed = 0;

	market_prepare(&held_plan,
				   "SELECT coalesce(sum(on_hand - free), 0)::int8 FROM market.stock_slots"
				   " WHERE sku_id = $1 AND warehouse_id = $2 AND slot >= $3",
				   3, types);
	market_prepare(&delete_plan,
				   "DELETE FROM market.stock_slots"
				   " WHERE sku_id = $1 AND warehouse_id = $2 AND slot >= $3 RETURNING free",
				   3, types);
	SPI_execute_plan(held_plan, values, NULL, false, 1);
	held = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (held > 0)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("cannot remove slots that hold reservations"),
				 errdetail("Slots %d and up of SKU %lld hold %lld reserved units.",
						   from, (long long) sku_id, (long long) held),
				 errhint("Keep the slot count, or retry once those reservations have ended.")));
	if (SPI_execute_plan(delete_plan, values, NULL, false, 0) != SPI_OK_DELETE_RETURNING)
		elog(ERROR, "market: could not remove slots");
	for (uint64 i = 0; i < SPI_processed; i++)
		freed += DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
	return freed;
}

/* pair_totals sums on-hand and held over the pair's (locked) slots. */
static void
pair_totals(int64 sku_id, int32 warehouse_id, int64 *on_hand, int64 *held)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {INT8OID, INT4OID};
	Datum		values[2] = {Int64GetDatum(sku_id), Int32GetDatum(warehouse_id)};
	bool		isnull;

	market_prepare(&plan,
				   "SELECT coalesce(sum(on_hand), 0)::int8, coalesce(sum(on_hand - free), 0)::int8"
				   " FROM market.stock_slots WHERE sku_id = $1 AND warehouse_id = $2",
				   2, types);
	SPI_execute_plan(plan, values, NULL, false, 1);
	*on_hand = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	*held = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
}

/* append_ledger writes one set/adjust row. */
static void
append_ledger(int64 sku_id, int32 warehouse_id, int64 delta, const char *kind, text *reason)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[5] = {INT8OID, INT4OID, INT8OID, TEXTOID, TEXTOID};
	Datum		values[5];
	char		nulls[5] = "     ";

	market_prepare(&plan,
				   "INSERT INTO market.stock_ledger (sku_id, warehouse_id, delta, kind, reason)"
				   " VALUES ($1, $2, $3, $4, $5)",
				   5, types);
	values[0] = Int64GetDatum(sku_id);
	values[1] = Int32GetDatum(warehouse_id);
	values[2] = Int64GetDatum(delta);
	values[3] = CStringGetTextDatum(kind);
	values[4] = reason ? PointerGetDatum(reason) : (Datum) 0;
	if (!reason)
		nulls[4] = 'n';
	if (SPI_execute_plan(plan, values, nulls, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "market: could not append to the stock ledger");
}

/*
 * market_change_on_hand is the common core: with the pair locked, move
 * on-hand to new_on_hand (computed by the caller from the current on-hand),
 * optionally resizing the slots, and record the change.  Returns the new
 * on-hand.  Also used by src/orders.c to put the units of a cancelled or
 * returned order back (kinds 'cancel' and 'return').
 */
int64
market_change_on_hand(int64 sku_id, int32 warehouse_id, bool absolute, int64 value,
					  int32 new_slots, const char *kind, text *reason)
{
	int32		slots = stock_slot_count(sku_id, warehouse_id);
	int64		on_hand;
	int64		held;
	int64		target;
	int64		moved = 0;

	if (slots == 0)
	{
		if (!absolute && value < 0)
			ereport(ERROR,
					(errcode(MK_NEGATIVE_STOCK),
					 errmsg("on-hand stock cannot go negative"),
					 errdetail("SKU %lld has no stock in warehouse %d; the adjustment is %lld.",
							   (long long) sku_id, warehouse_id, (long long) value)));
		create_stock(sku_id, warehouse_id, new_slots > 0 ? new_slots : market_stock_slots);
	}
	else
	{
		/*
		 * Lowering stock or resizing may lower a slot's free count: take the
		 * slots' guards first.  Additions only ever raise slots and need
		 * none, so bulk receiving keeps no lock-table entry per slot.
		 */
		bool		may_lower = (new_slots > 0 && new_slots != slots) ||
			(!absolute && value < 0);

		if (absolute && !may_lower)
		{
			pair_totals(sku_id, warehouse_id, &on_hand, &held);
			may_lower = (value < on_hand);
		}
		if (may_lower)
			market_lock_slot_guards(sku_id, warehouse_id, slots);
	}

	market_lock_all_slots(sku_id, warehouse_id);
	market_reclaim_expired(sku_id, warehouse_id);
	pair_totals(sku_id, warehouse_id, &on_hand, &held);

	target = absolute ? value : on_hand + value;
	if (target < 0)
		ereport(ERROR,
				(errcode(MK_NEGATIVE_STOCK),
				 errmsg("on-hand stock cannot go negative"),
				 errdetail("SKU %lld in warehouse %d has %lld on hand; the adjustment is %lld.",
						   (long long) sku_id, warehouse_id, (long long) on_hand, (long long) value)));
	if (target > MARKET_MAX_ON_HAND)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("on-hand stock out of range"),
				 errdetail("The result would be %lld units; the limit is %lld.",
						   (long long) target, (long long) MARKET_MAX_ON_HAND)));
	if (target < held)
		ereport(ERROR,
				(errcode(MK_BELOW_RESERVED),
				 errmsg("on-hand stock cannot drop below what is reserved"),
				 errdetail("SKU %lld in warehouse %d: live reservations hold %lld units; the new on-hand would be %lld.",
						   (long long) sku_id, warehouse_id, (long long) held, (long long) target),
				 errhint("Release or commit those reservations first.")));

	slots = stock_slot_count(sku_id, warehouse_id);
	if (new_slots > 0 && new_slots != slots)
	{
		if (new_slots > slots)
			add_slots(sku_id, warehouse_id, slots, new_slots);
		else
			moved = remove_slots(sku_id, warehouse_id, new_slots);
		set_slot_count(sku_id, warehouse_id, new_slots);
	}

	/* the removed slots' free units come back through the re-spread */
	market_rebalance(sku_id, warehouse_id, target - on_hand + moved,
					 new_slots > 0 && new_slots != slots, NULL, NULL);
	append_ledger(sku_id, warehouse_id, target - on_hand, kind, reason);
	return target;
}

/* market.stock_set(sku_id, warehouse_id, on_hand, slots) returns bigint */
Datum
market_stock_set(PG_FUNCTION_ARGS)
{
	int64		sku_id;
	int32		warehouse_id;
	int64		on_hand;
	int32		slots = 0;
	int64		result;

	market_require_arg(fcinfo, 0, "sku_id");
	market_require_arg(fcinfo, 1, "warehouse_id");
	market_require_arg(fcinfo, 2, "on_hand");
	sku_id = PG_GETARG_INT64(0);
	warehouse_id = PG_GETARG_INT32(1);
	on_hand = PG_GETARG_INT64(2);
	if (!PG_ARGISNULL(3))
	{
		slots = PG_GETARG_INT32(3);
		if (slots < 1 || slots > MARKET_MAX_SLOTS)
			ereport(ERROR,
					(errcode(MK_INVALID_ARGUMENT),
					 errmsg("invalid slot count"),
					 errdetail("slots was %d.", slots),
					 errhint("Use 1 to %d slots.", MARKET_MAX_SLOTS)));
	}
	if (on_hand < 0)
		ereport(ERROR,
				(errcode(MK_NEGATIVE_STOCK),
				 errmsg("on-hand stock cannot go negative"),
				 errdetail("on_hand was %lld.", (long long) on_hand)));

	SPI_connect();
	check_pair_exists(sku_id, warehouse_id);
	result = market_change_on_hand(sku_id, warehouse_id, true, on_hand, slots, "set", NULL);
	SPI_finish();
	PG_RETURN_INT64(result);
}

/* market.stock_adjust(sku_id, warehouse_id, delta, reason) returns bigint */
Datum
market_stock_adjust(PG_FUNCTION_ARGS)
{
	int64		sku_id;
	int32		warehouse_id;
	int64		delta;
	text	   *reason;
	char	   *reason_str;
	int64		result;

	market_require_arg(fcinfo, 0, "sku_id");
	market_require_arg(fcinfo, 1, "warehouse_id");
	market_require_arg(fcinfo, 2, "delta");
	market_require_arg(fcinfo, 3, "reason");
	sku_id = PG_GETARG_INT64(0);
	warehouse_id = PG_GETARG_INT32(1);
	delta = PG_GETARG_INT64(2);
	reason = PG_GETARG_TEXT_PP(3);
	reason_str = text_to_cstring(reason);

	if (delta == 0 || delta > MARKET_MAX_ON_HAND || delta < -MARKET_MAX_ON_HAND)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("invalid stock adjustment"),
				 errdetail("delta was %lld.", (long long) delta),
				 errhint("An adjustment is a non-zero number of units, at most %lld either way.",
						 (long long) MARKET_MAX_ON_HAND)));
	if (strspn(reason_str, " \t\r\n") == strlen(reason_str))
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("an adjustment needs a reason"),
				 errdetail("reason was blank.")));

	SPI_connect();
	check_pair_exists(sku_id, warehouse_id);
	result = market_change_on_hand(sku_id, warehouse_id, false, delta, 0, "adjust", reason);
	SPI_finish();
	PG_RETURN_INT64(result);
}
