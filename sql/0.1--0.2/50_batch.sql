
-- ---------------------------------------------------------------------------
-- The batched reservation path (src/batch.c): with market.batch_reserve = on,
-- market.reserve() calls outside a transaction block are applied by the
-- batch worker, many per transaction.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.batch_status(
	OUT running boolean, OUT pid int, OUT queued int, OUT batches bigint,
	OUT requests bigint, OUT fallbacks bigint, OUT largest_batch bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'market_batch_status'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION market.batch_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION market.batch_status() TO market_admin;
