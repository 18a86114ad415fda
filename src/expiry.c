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
 * market_expire_batch expires up to max_reservations reservations whose
 * time is up, oldest first, and returns how many it expired.  Caller is
 * inside SPI and a transaction.
 */
int
market_expire_batch(int max_reservations)
{
	static SPIPlanPtr pick_plan = NULL;
	static SPIPlanPtr mark_plan = NULL;
	Oid			pick_types[2] = {TIMESTAMPTZOID, INT4OID};
	Oid			mark_types[2] = {UUIDARRAYOID, TIMESTAMPTZOID};
	Datum		values[2];
	TimestampTz now = GetCurrentTimestamp();
	TakeList	takes = {0};
	Datum	   *ids;
	int			n;

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

	ids = palloc(sizeof(Datum) * n);
	for (int r = 0; r < n; r++)
	{
		bool		isnull;

		ids[r] = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull);
		market_takes_from_tuple(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2, &takes);
	}

	market_return_units(takes.items, takes.count, false, NULL);

	values[0] = PointerGetDatum(construct_array(ids, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[1] = TimestampTzGetDatum(now);
	if (SPI_execute_plan(mark_plan, values, NULL, false, 0) != SPI_OK_UPDATE ||
		SPI_processed != (uint64) n)
		elog(ERROR, "market: could not mark reservations expired");

	if (market_shared != NULL)
		pg_atomic_fetch_add_u64(&market_shared->expired_total, n);
	return n;
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
	expired = market_expire_batch(max_reservations);
	SPI_finish();
	PG_RETURN_INT32(expired);
}
