
-- ---------------------------------------------------------------------------
-- Batch worker status: from 0.4 it also counts the requests whose lock wait
-- timed out inside a batch and that were applied again on their own once
-- the batch had committed (docs/checkout.md, "Batched checkouts").
-- ---------------------------------------------------------------------------

DROP FUNCTION market.batch_status();
CREATE FUNCTION market.batch_status(
	OUT running boolean, OUT pid int, OUT queued int, OUT batches bigint,
	OUT requests bigint, OUT fallbacks bigint, OUT largest_batch bigint,
	OUT retried_alone bigint)
RETURNS record
AS 'MODULE_PATHNAME', 'market_batch_status'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION market.batch_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION market.batch_status() TO market_admin;
