--
-- batch: market.reserve() through the batch worker (market.batch_reserve = on).
-- Each check reads market.batch_status() before and after, so it proves which
-- path served the call, not only that a reservation came back.
--
\set VERBOSITY default

-- wait (up to 60 s) for the batch worker to serve this database
DO $$
BEGIN
	FOR i IN 1 .. 600 LOOP
		EXIT WHEN (SELECT running FROM market.batch_status());
		PERFORM pg_sleep(0.1);
	END LOOP;
END
$$;
SELECT running, pid IS NOT NULL AS has_pid, queued FROM market.batch_status();

SELECT market.warehouse_create('batch-w', 'Batch warehouse') AS wh \gset
SELECT market.seller_create('Batch seller') AS seller \gset
SELECT market.product_create(:seller, 'Batch product') AS product \gset
-- SKU ids of their own, whatever ran before: the error details name them
SELECT setval(pg_get_serial_sequence('market.skus', 'id'), 10000) AS sku_ids_from;
SELECT market.sku_create(:product, 'BATCH-1', 500, 'EUR') AS sku1 \gset
SELECT market.sku_create(:product, 'BATCH-2', 700, 'EUR') AS sku2 \gset
SELECT market.stock_set(:sku1, :wh, 3), market.stock_set(:sku2, :wh, 10);

-- the SQLSTATE and DETAIL of the error a statement raises
CREATE FUNCTION pg_temp.error_of(cmd text, OUT state text, OUT message text, OUT detail text)
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE cmd;
	state := 'ok';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT,
		detail = PG_EXCEPTION_DETAIL;
END
$$;

CREATE TEMP TABLE seen AS SELECT requests FROM market.batch_status();
-- requests the worker answered since the last look
CREATE FUNCTION pg_temp.batched() RETURNS bigint
LANGUAGE sql AS $$
	WITH now_ AS (SELECT requests FROM market.batch_status()),
		 upd AS (UPDATE seen SET requests = (SELECT requests FROM now_)
				  RETURNING (SELECT requests FROM now_) - (SELECT requests FROM seen) AS delta)
	SELECT delta FROM upd
$$;

-- 1. a reservation made by the worker: same result as the direct path
SET market.batch_reserve = on;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2}]', :sku1)::jsonb, '5 minutes', 'batch-owner') AS r1 \gset
SELECT pg_temp.batched() AS batched;
SELECT status, owner, sku_ids <@ ARRAY[:sku1]::bigint[] AS sku_ok,
	   (SELECT sum(q) FROM unnest(qtys) AS q) AS units,
	   expires_at - created_at AS ttl
  FROM market.reservations WHERE id = :'r1';
SELECT market.available(:sku1) AS available_sku1;

-- 2. two lines, one per SKU
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 4}]', :sku1, :sku2)::jsonb) AS r2 \gset
SELECT pg_temp.batched() AS batched;
SELECT market.available(:sku1) AS available_sku1, market.available(:sku2) AS available_sku2;

-- 3. sold out: MK001, with the direct path's message and detail (the same
--    call inside an exception block, a subtransaction, takes the direct path)
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :sku1)::jsonb);
\echo :LAST_ERROR_SQLSTATE
SELECT pg_temp.batched() AS batched;
SELECT * FROM pg_temp.error_of(format($$SELECT market.reserve('[{"sku_id": %s, "qty": 1}]')$$, :sku1));
SELECT pg_temp.batched() AS batched;

-- 4. errors found by the worker come back as they are: unknown SKU (MK010)
SELECT market.reserve('[{"sku_id": 999999, "qty": 1}]');
\echo :LAST_ERROR_SQLSTATE
SELECT pg_temp.batched() AS batched;

-- 5. bad documents are refused before anything is queued
SELECT market.reserve('[{"sku_id": 1, "qty": 0}]');
\echo :LAST_ERROR_SQLSTATE
SELECT pg_temp.batched() AS batched;

-- 6. inside a transaction block the direct path runs, so a rollback undoes it
BEGIN;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :sku2)::jsonb) IS NOT NULL AS reserved;
ROLLBACK;
SELECT pg_temp.batched() AS batched;
SELECT market.available(:sku2) AS available_sku2;

-- 7. more lines than a batch request carries (8): the direct path
CREATE TEMP TABLE many AS
	SELECT market.sku_create(:product, 'BATCH-M' || g, 100, 'EUR') AS sku FROM generate_series(1, 9) AS g;
SELECT count(market.stock_set(sku, :wh, 5)) FROM many;
SELECT market.reserve(jsonb_agg(jsonb_build_object('sku_id', sku, 'qty', 1)))
	   IS NOT NULL AS reserved
  FROM many;
SELECT pg_temp.batched() AS batched;

-- 8. with the setting off, the direct path
SET market.batch_reserve = off;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :sku2)::jsonb) IS NOT NULL AS reserved;
SELECT pg_temp.batched() AS batched;
SET market.batch_reserve = on;

-- 9. a batched reservation ends like any other
SELECT market.reservation_release(:'r2');
SELECT market.reservation_commit(:'r1');
SELECT market.available(:sku1) AS available_sku1;

-- 10. the counters of the worker add up, and the audit is clean
SELECT batches >= 1 AS has_batches, requests >= batches AS requests_ge_batches,
	   largest_batch >= 1 AS has_largest
  FROM market.batch_status();
SELECT * FROM market.verify_inventory();
RESET market.batch_reserve;
