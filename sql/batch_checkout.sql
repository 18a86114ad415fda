--
-- batch_checkout: market.buy_now() through the batch worker
-- (market.batch_checkout = on).  Each check reads market.batch_status()
-- before and after, so it proves which path served the call; results and
-- errors must be those of the direct path.
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
SELECT running FROM market.batch_status();

SELECT market.warehouse_create('bc-w', 'Batch checkout warehouse') AS wh \gset
SELECT market.seller_create('BC seller 1') AS seller1 \gset
SELECT market.seller_create('BC seller 2') AS seller2 \gset
SELECT market.product_create(:seller1, 'BC product 1') AS product1 \gset
SELECT market.product_create(:seller2, 'BC product 2') AS product2 \gset
-- SKU ids of their own, whatever ran before: the error details name them
SELECT setval(pg_get_serial_sequence('market.skus', 'id'), 20000) AS sku_ids_from;
SELECT market.sku_create(:product1, 'BC-1', 1000, 'EUR') AS sku1 \gset
SELECT market.sku_create(:product2, 'BC-2', 250, 'EUR') AS sku2 \gset
SELECT market.sku_create(:product2, 'BC-USD', 900, 'USD') AS sku_usd \gset
SELECT market.stock_set(:sku1, :wh, 5), market.stock_set(:sku2, :wh, 10),
       market.stock_set(:sku_usd, :wh, 10);

CREATE TEMP TABLE seen AS SELECT requests FROM market.batch_status();
-- requests the worker answered since the last look
CREATE FUNCTION pg_temp.batched() RETURNS bigint
LANGUAGE sql AS $$
	WITH now_ AS (SELECT requests FROM market.batch_status()),
		 upd AS (UPDATE seen SET requests = (SELECT requests FROM now_)
				  RETURNING (SELECT requests FROM now_) - (SELECT requests FROM seen) AS delta)
	SELECT delta FROM upd
$$;
-- a response with its ids replaced by their kind, so the output is stable
CREATE FUNCTION pg_temp.shape(doc jsonb) RETURNS jsonb
LANGUAGE sql AS $$
	SELECT jsonb_build_object(
		'orders', (SELECT jsonb_agg(o - 'order_id' - 'seller_id'
		                              || jsonb_build_object('seller', s.name) ORDER BY s.name)
		             FROM jsonb_array_elements(doc -> 'orders') AS o
		             JOIN market.sellers s ON s.id = (o ->> 'seller_id')::bigint),
		'payment', (doc -> 'payment') - 'payment_id'::text,
		'has_group', doc ? 'order_group')
$$;

-- the calls below run as an application role, as in production
CREATE ROLE bc_app LOGIN IN ROLE market_app;
SET market.batch_checkout = on;

-- 1. a checkout made by the worker: two sellers, two orders, one payment
SET SESSION AUTHORIZATION bc_app;
SELECT market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 2}, {"sku_id": %s, "qty": 1}]',
                      :sku1, :sku2)::jsonb, 'bc-key-1', '{"method": "pm_card_visa"}', 'EUR') AS r1 \gset
RESET SESSION AUTHORIZATION;
SELECT pg_temp.batched() AS batched;
SELECT pg_temp.shape(:'r1'::jsonb);
SELECT g.customer_id, g.total_minor, g.currency,
       (SELECT count(*) FROM market.orders o WHERE o.group_id = g.id) AS orders,
       (SELECT count(*) FROM market.outbox b JOIN market.payments p ON p.id = b.aggregate_id
         WHERE p.group_id = g.id AND b.event_type = 'payment.authorize') AS authorize_jobs
  FROM market.order_groups g WHERE g.id = (:'r1'::jsonb ->> 'order_group')::bigint;
-- the order events name the caller, not the worker
SELECT DISTINCT e.actor, e.to_status
  FROM market.order_events e JOIN market.orders o ON o.id = e.order_id
 WHERE o.group_id = (:'r1'::jsonb ->> 'order_group')::bigint;
SELECT market.available(:sku1) AS sku1_left, market.available(:sku2) AS sku2_left;

-- 2. a replay returns the first response unchanged, through either path
SELECT market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 2}, {"sku_id": %s, "qty": 1}]',
                      :sku1, :sku2)::jsonb, 'bc-key-1', '{"method": "pm_card_visa"}', 'EUR') = :'r1'::jsonb
       AS same_response;
SELECT pg_temp.batched() AS batched;
BEGIN;
SELECT market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 2}, {"sku_id": %s, "qty": 1}]',
                      :sku1, :sku2)::jsonb, 'bc-key-1', '{"method": "pm_card_visa"}', 'EUR') = :'r1'::jsonb
       AS same_response_direct;
COMMIT;
SELECT pg_temp.batched() AS batched;
SELECT count(*) AS groups_of_bc_cust FROM market.order_groups WHERE customer_id = 'bc-cust';

-- 3. errors found by the worker come back with the direct path's SQLSTATE,
--    message and detail, and nothing of the failed checkout stays
-- the same key for a different request: MK004 (terse: the detail holds a time)
\set VERBOSITY terse
SELECT market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 1}]', :sku1)::jsonb,
                      'bc-key-1', '{"method": "pm_card_visa"}', 'EUR');
\set VERBOSITY default
\echo :LAST_ERROR_SQLSTATE
SELECT pg_temp.batched() AS batched;
-- sold out: MK001 naming the short line
SELECT market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 4}]',
                      :sku2, :sku1)::jsonb, 'bc-key-2', '{}', 'EUR');
\echo :LAST_ERROR_SQLSTATE
SELECT pg_temp.batched() AS batched;
-- unknown SKU: MK010
SELECT market.buy_now('bc-cust', '[{"sku_id": 999999, "qty": 1}]', 'bc-key-3', '{}', 'EUR');
\echo :LAST_ERROR_SQLSTATE
SELECT pg_temp.batched() AS batched;
-- a SKU in another currency: MK026
SELECT market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 1}]', :sku_usd)::jsonb,
                      'bc-key-4', '{}', 'EUR');
\echo :LAST_ERROR_SQLSTATE
SELECT pg_temp.batched() AS batched;
-- none of them left a key, an order group or a held unit behind
SELECT count(*) AS keys_left FROM market.idempotency_keys
 WHERE customer_id = 'bc-cust' AND key IN ('bc-key-2', 'bc-key-3', 'bc-key-4');
SELECT count(*) AS groups_of_bc_cust FROM market.order_groups WHERE customer_id = 'bc-cust';
SELECT market.available(:sku1) AS sku1_left, market.available(:sku2) AS sku2_left;
-- a failed key can be used again once the stock is there
SELECT market.stock_set(:sku1, :wh, 7);
SELECT pg_temp.shape(market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 4}]',
                      :sku2, :sku1)::jsonb, 'bc-key-2', '{}', 'EUR'));
SELECT pg_temp.batched() AS batched;

-- 4. bad arguments are refused before anything is queued
SELECT market.buy_now(NULL, '[{"sku_id": 1, "qty": 1}]', 'k', '{}', 'EUR');
\echo :LAST_ERROR_SQLSTATE
SELECT market.buy_now('bc-cust', '[]', 'k', '{}', 'EUR');
\echo :LAST_ERROR_SQLSTATE
SELECT market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 1}]', :sku1)::jsonb, NULL, '{}', 'EUR');
\echo :LAST_ERROR_SQLSTATE
SELECT market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 1}]', :sku1)::jsonb, 'k', '{"x": 1}', 'EUR');
\echo :LAST_ERROR_SQLSTATE
SELECT market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 1}]', :sku1)::jsonb, 'k', '{}', 'eur');
\echo :LAST_ERROR_SQLSTATE
SELECT pg_temp.batched() AS batched;

-- 5. the direct path runs inside a transaction block, and with more lines
--    than a queue slot holds (8)
BEGIN;
SELECT pg_temp.shape(market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 1}]', :sku2)::jsonb,
                                    'bc-key-5', '{}', 'EUR'));
COMMIT;
SELECT pg_temp.batched() AS batched;
SELECT market.stock_set(s, :wh, 1) FROM unnest(ARRAY(
         SELECT market.sku_create(:product1, 'BC-MANY-' || g, 10, 'EUR') FROM generate_series(1, 9) AS g)) AS s;
SELECT jsonb_array_length(market.buy_now('bc-cust',
         (SELECT jsonb_agg(jsonb_build_object('sku_id', id, 'qty', 1)) FROM market.skus WHERE sku_code LIKE 'BC-MANY-%'),
         'bc-key-6', '{}', 'EUR') -> 'orders') AS orders;
SELECT pg_temp.batched() AS batched;

-- 6. with the setting off, the direct path
SET market.batch_checkout = off;
SELECT pg_temp.shape(market.buy_now('bc-cust', format('[{"sku_id": %s, "qty": 1}]', :sku2)::jsonb,
                                    'bc-key-7', '{}', 'EUR'));
SELECT pg_temp.batched() AS batched;

-- the audit is clean whichever path sold
SELECT count(*) AS violations FROM market.verify_inventory();
DROP OWNED BY bc_app;
DROP ROLE bc_app;
