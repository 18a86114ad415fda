/*-------------------------------------------------------------------------
 *
 * expiry.c
 *	  Returning the units of expired reservations, in bounded batches, and
 *	  purging long-finished reservations.  Used by the expiry worker and by
 *	  market.expire_reservations() (for clusters without the worker, e.g.
 *	  scheduled with pg_cron).
 *
 * A batch locks up to N expired, still-held reservations with SKIP LOCKED
 * (so two expirers, or an expirer and a committer, never fight over one
 * reservation: whoever holds the row decides), returns their units with the
 * slots locked in (sku, warehouse, slot) order, and marks them expired.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "market.h"

PG_FUNCTION_INFO_V1(market_expire_reservations);

/*
 * lock_free_slots locks, without waiting, the slots of takes that nobody
 * else holds, and returns them sorted (for bsearch) in *locked.
 */
static int
lock_free_slots(TakeList *takes, SlotTake **locked)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {INT8ARRAYOID, INT4ARRAYOID, INT4ARRAYOID};
	Datum		arrays[4];
	int			n;

	market_prepare(&plan,
				   "SELECT s.sku_id, s.warehouse_id, s.slot FROM market.stock_slots s"
				   " JOIN (SELECT DISTINCT * FROM unnest($1, $2, $3)) AS v(sku_id, warehouse_id, slot)"
				   "   ON s.sku_id = v.sku_id AND s.warehouse_id = v.warehouse_id AND s.slot = v.slot"
				   " ORDER BY 1, 2, 3 FOR UPDATE OF s SKIP LOCKED",
				   3, types);
	market_takes_to_arrays(takes->items, takes->count, arrays);
	if (SPI_execute_plan(plan, arrays, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "market: could not lock slots");
	n = (int) SPI_processed;
	*locked = palloc(sizeof(SlotTake) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		bool		isnull;
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;

		(*locked)[i].sku_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		(*locked)[i].warehouse_id = DatumGetInt32(SPI_getbinval(tup, desc, 2, &isnull));
		(*locked)[i].slot = DatumGetInt32(SPI_getbinval(tup, desc, 3, &isnull));
		(*locked)[i].qty = 0;
	}
	return n;
}

/*
 * market_expire_batch expires up to max_reservations reservations whose
 * time is up, oldest first, and returns how many it expired.  With
 * skip_busy, reservations whose slots another session has locked (a hot
 * SKU being reserved) are left for a later pass and counted in *skipped,
 * so they do not hold up the rest of the batch; without it, the batch
 * waits for those slots.  Caller is inside SPI and a transaction.
 */
int
market_expire_batch(int max_reservations, bool skip_busy, int *skipped)
{
	static SPIPlanPtr pick_plan = NULL;
	static SPIPlanPtr mark_plan = NULL;
	Oid			pick_types[2] = {TIMESTAMPTZOID, INT4OID};
	Oid			mark_types[2] = {UUIDARRAYOID, TIMESTAMPTZOID};
	Datum		values[2];
	TimestampTz now = GetCurrentTimestamp();
	TakeList	all = {0};
	TakeList	takes = {0};
	int		   *first;
	Datum	   *ids;
	int			n;
	int			nexpire = 0;
	SlotTake   *locked = NULL;
	int			nlocked = 0;

	if (skipped)
		*skipped = 0;
	market_prepare(&pick_plan,
				   "SELECT id, sku_ids, warehouse_ids, slots, qtys FROM market.reservations"
				   " WHERE status = 'held' AND expires_at <= $1"
				   " ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED",
				   2, pick_types);
	market_prepare(&mark_plan,
				   "UPDATE market.reservations SET status = 'expired', finished_at = $2"
				   " WHERE id = ANY ($1)",
				   2, mark_types);

	values[0] = TimestampTzGetDatum(now);
	values[1] = Int32GetDatum(max_reservations);
	if (SPI_execute_plan(pick_plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "market: could not pick expired reservations");
	n = (int) SPI_processed;
	if (n == 0)
		return 0;

	/* all lines, with where each reservation's lines start */
	ids = palloc(sizeof(Datum) * n);
	first = palloc(sizeof(int) * (n + 1));
	for (int r = 0; r < n; r++)
	{
		bool		isnull;

		ids[r] = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull);
		first[r] = all.count;
		market_takes_from_tuple(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &all);
	}
	first[n] = all.count;

	if (skip_busy)
		nlocked = lock_free_slots(&all, &locked);

	for (int r = 0; r < n; r++)
	{
		bool		ready = true;

		for (int i = first[r]; skip_busy && i < first[r + 1]; i++)
		{
			if (all.items[i].slot < 0)
				continue;		/* returned earlier */
			if (bsearch(&all.items[i], locked, nlocked, sizeof(SlotTake),
						market_compare_takes) == NULL)
			{
				ready = false;
				break;
			}
		}
		if (!ready)
		{
			if (skipped)
				(*skipped)++;
			continue;
		}
		for (int i = first[r]; i < first[r + 1]; i++)
			takes_append(&takes, all.items[i].sku_id, all.items[i].warehouse_id,
						 all.items[i].slot, all.items[i].qty);
		ids[nexpire++] = ids[r];
	}
	if (nexpire == 0)
		return 0;

	market_return_units(takes.items, takes.count, false, NULL);

	values[0] = PointerGetDatum(construct_array(ids, nexpire, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[1] = TimestampTzGetDatum(now);
	if (SPI_execute_plan(mark_plan, values, NULL, false, 0) != SPI_OK_UPDATE ||
		SPI_processed != (uint64) nexpire)
		elog(ERROR, "market: could not mark reservations expired");

	if (market_shared != NULL)
		pg_atomic_fetch_add_u64(&market_shared->expired_total, nexpire);
	return nexpire;
}

/*
 * market_purge_finished deletes up to max_rows reservations that ended
 * more than market.reservation_retention ago; returns how many.
 */
int64
market_purge_finished(int max_rows)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TIMESTAMPTZOID, INT4OID};
	Datum		values[2];

	if (market_reservation_retention_s <= 0)
		return 0;
	market_prepare(&plan,
				   "DELETE FROM market.reservations WHERE id IN"
				   " (SELECT id FROM market.reservations"
				   "   WHERE status <> 'held' AND finished_at < $1"
				   "   ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
				   2, types);
	values[0] = TimestampTzGetDatum(GetCurrentTimestamp() -
									(int64) market_reservation_retention_s * USECS_PER_SEC);
	values[1] = Int32GetDatum(max_rows);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "market: could not purge finished reservations");
	if (market_shared != NULL)
		pg_atomic_fetch_add_u64(&market_shared->purged_total, SPI_processed);
	return (int64) SPI_processed;
}

/* market_next_expiry returns when the next held reservation expires, or 0. */
TimestampTz
market_next_expiry(void)
{
	static SPIPlanPtr plan = NULL;
	bool		isnull;
	Datum		d;

	market_prepare(&plan,
				   "SELECT min(expires_at) FROM market.reservations WHERE status = 'held'",
				   0, NULL);
	if (SPI_execute_plan(plan, NULL, NULL, true, 1) != SPI_OK_SELECT)
		elog(ERROR, "market: could not read the next expiry");
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return isnull ? 0 : DatumGetTimestampTz(d);
}

/* market.expire_reservations(max_reservations int) returns int */
Datum
market_expire_reservations(PG_FUNCTION_ARGS)
{
	int			max_reservations;
	int			expired;

	market_require_arg(fcinfo, 0, "max_reservations");
	max_reservations = PG_GETARG_INT32(0);
	if (max_reservations < 1 || max_reservations > 1000000)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("invalid batch size"),
				 errdetail("max_reservations was %d.", max_reservations),
				 errhint("Use 1 to 1000000.")));

	SPI_connect();
	expired = market_expire_batch(max_reservations, false, NULL);
	SPI_finish();
	PG_RETURN_INT32(expired);
}
