--
-- checkout: checkout_begin, checkout_complete, buy_now and
-- idempotency_purge with good and bad input: the marketplace split, frozen
-- prices, the sale, the payment and its outbox row, idempotent retries,
-- expiry, keys scoped to the customer, the purge.
--
-- Errors are shown by SQLSTATE only (sometimes with their detail); ids are
-- kept in psql variables and compared, never printed.
--
\set VERBOSITY sqlstate

-- the SQLSTATE a statement raises, or 'ok'
CREATE FUNCTION pg_temp.sqlstate_of(cmd text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE cmd;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE;
END
$$;
-- the SQLSTATE and DETAIL of the error a statement raises
CREATE FUNCTION pg_temp.error_of(cmd text, OUT state text, OUT detail text)
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE cmd;
	state := 'ok';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, detail = PG_EXCEPTION_DETAIL;
END
$$;

SELECT market.seller_create('Checkout Seller One') AS s1 \gset
SELECT market.seller_create('Checkout Seller Two') AS s2 \gset
SELECT market.product_create(:s1, 'Checkout product one') AS p1 \gset
SELECT market.product_create(:s2, 'Checkout product two') AS p2 \gset
SELECT market.sku_create(:p1, 'CHK-X', 1000, 'USD') AS x \gset
SELECT market.sku_create(:p1, 'CHK-Y', 250, 'USD') AS y \gset
SELECT market.sku_create(:p2, 'CHK-Z', 5000, 'USD') AS z \gset
SELECT market.sku_create(:p2, 'CHK-E', 700, 'EUR') AS e \gset
SELECT market.sku_create(:p2, 'CHK-S', 100, 'USD') AS scarce \gset
SELECT market.warehouse_create('chk-w1', 'Checkout W1', 10) AS w1 \gset
SELECT market.warehouse_create('chk-w2', 'Checkout W2', 20) AS w2 \gset
SELECT market.stock_set(:x, :w1, 20) AS x_w1;
SELECT market.stock_set(:x, :w2, 20) AS x_w2;
SELECT market.stock_set(:y, :w1, 50) AS y_w1;
SELECT market.stock_set(:z, :w2, 5) AS z_w2;
SELECT market.stock_set(:e, :w1, 5) AS e_w1;
SELECT market.stock_set(:scarce, :w1, 1) AS scarce_w1;

-- ---------------------------------------------------------------------------
-- checkout_begin(cart, ttl)
-- ---------------------------------------------------------------------------
SELECT market.cart_create('alice') AS cart \gset
SELECT pg_temp.sqlstate_of('SELECT market.checkout_begin(NULL)') AS null_cart;                       -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_begin(%L)', gen_random_uuid())) AS unknown_cart; -- MK015
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_begin(%L)', :'cart')) AS empty_cart;        -- MK027
SELECT market.cart_set_item(:'cart', :x, 3), market.cart_set_item(:'cart', :y, 4),
	   market.cart_set_item(:'cart', :z, 2);
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_begin(%L, ''0 s'')', :'cart')) AS ttl_zero;   -- MK023
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_begin(%L, ''25 h'')', :'cart')) AS ttl_25h;  -- MK023

-- all or nothing: one short line and nothing is reserved
SELECT market.cart_set_item(:'cart', :z, 6);
SELECT * FROM pg_temp.error_of(format('SELECT market.checkout_begin(%L)', :'cart'))
	\gset short_
SELECT :'short_state' AS state, :'short_detail' = format('SKU %s: 6 requested, 5 available.', :z) AS detail_names_sku;
SELECT market.available(:x) AS x, market.available(:y) AS y, market.available(:z) AS z;
SELECT count(*) AS checkouts FROM market.checkouts WHERE cart_id = :'cart';
SELECT market.cart_set_item(:'cart', :z, 2);

SELECT market.checkout_begin(:'cart', '10 min') AS co \gset
SELECT market.available(:x) AS x, market.available(:y) AS y, market.available(:z) AS z;
SELECT c.status, c.customer_id, c.currency, c.cart_id = :'cart' AS cart_ok,
	   c.sku_ids = ARRAY[:x, :y, :z]::bigint[] AS skus_ok, c.qtys, c.unit_prices,
	   c.seller_ids = ARRAY[:s1, :s1, :s2]::bigint[] AS sellers_ok, c.total_minor,
	   c.expires_at = r.expires_at AS expires_with_reservation,
	   r.expires_at BETWEEN now() + interval '9 min' AND now() + interval '11 min' AS ttl_ok,
	   r.status AS reservation, r.owner = 'checkout ' || c.id AS owner_ok
  FROM market.checkouts c JOIN market.reservations r ON r.id = c.reservation_id
 WHERE c.id = :'co';
-- beginning again returns the live checkout and reserves nothing more
SELECT market.checkout_begin(:'cart') = :'co' AS same_checkout;
SELECT market.checkout_begin(:'cart', '1 min') = :'co' AS same_checkout_any_ttl;
SELECT market.available(:x) AS x, market.available(:y) AS y, market.available(:z) AS z;
SELECT count(*) AS reservations FROM market.reservations WHERE owner = 'checkout ' || :'co';

-- prices are frozen once checkout began
UPDATE market.skus SET price_minor = 1111 WHERE id = :x;
SELECT (market.cart_view(:'cart')->>'total_minor')::bigint AS live_total,
	   (market.cart_view(:'cart')->'checkout'->>'total_minor')::bigint AS frozen_total;

-- ---------------------------------------------------------------------------
-- checkout_complete(checkout, idempotency_key, payment, customer_id): bad input
-- ---------------------------------------------------------------------------
SELECT pg_temp.sqlstate_of('SELECT market.checkout_complete(NULL, ''k'')') AS null_checkout;               -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, NULL)', :'co')) AS null_key;         -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, '''')', :'co')) AS empty_key;        -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, %L)', :'co', repeat('k', 256))) AS key_256; -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''k'', NULL)', :'co')) AS null_payment; -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''k'', ''[]'')', :'co')) AS payment_array; -- MK021
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''k'', ''{"card": "x"}'')', :'co')) AS payment_unknown_key; -- MK021
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''k'', ''{"method": 4}'')', :'co')) AS method_number; -- MK021
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''k'', ''{"psp": ""}'')', :'co')) AS psp_empty; -- MK021
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''k'')', gen_random_uuid())) AS unknown_checkout; -- MK016
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''k'', ''{}'', ''mallory'')', :'co')) AS not_yours; -- MK028
-- none of that completed anything or kept a key
SELECT status FROM market.checkouts WHERE id = :'co';
SELECT count(*) AS keys FROM market.idempotency_keys WHERE customer_id = 'alice';

-- ---------------------------------------------------------------------------
-- checkout_complete: the orders
-- ---------------------------------------------------------------------------
SELECT on_hand AS x_on_hand_before FROM market.stock_levels WHERE sku_id = :x AND warehouse_id = :w1;
SELECT market.checkout_complete(:'co', 'alice-order-1', '{"method": "card", "psp": "stripe"}', 'alice') AS res \gset
-- the response
SELECT (:'res'::jsonb->>'order_group')::bigint = g.id AS group_ok, g.customer_id, g.currency, g.total_minor,
	   g.total_minor = 3 * 1000 + 4 * 250 + 2 * 5000 AS total_at_frozen_prices
  FROM market.order_groups g WHERE g.checkout_id = :'co';
SELECT (o->>'seller_id')::bigint = :s1 AS seller_one, (o->>'subtotal_minor')::bigint AS subtotal, o->>'status' AS status,
	   (o->>'order_id')::bigint = d.id AS order_ok
  FROM jsonb_array_elements(:'res'::jsonb->'orders') AS o
  JOIN market.orders d ON d.id = (o->>'order_id')::bigint
 ORDER BY 1 DESC;
SELECT :'res'::jsonb->'payment'->>'status' AS payment_status,
	   (:'res'::jsonb->'payment'->>'amount_minor')::bigint AS amount,
	   :'res'::jsonb->'payment'->>'currency' AS currency,
	   (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(:'res'::jsonb) AS k) AS keys,
	   (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(:'res'::jsonb->'payment') AS k) AS payment_keys;
-- one order per seller, its lines at the frozen prices
SELECT o.seller_id = :s1 AS seller_one, o.customer_id, o.currency, o.subtotal_minor, o.status,
	   (SELECT count(*) FROM market.order_lines l WHERE l.order_id = o.id) AS lines
  FROM market.orders o JOIN market.order_groups g ON g.id = o.group_id
 WHERE g.checkout_id = :'co' ORDER BY o.seller_id;
SELECT k.sku_code, l.warehouse_id = :w1 AS from_w1, l.qty, l.unit_price_minor
  FROM market.order_lines l
  JOIN market.orders o ON o.id = l.order_id
  JOIN market.order_groups g ON g.id = o.group_id
  JOIN market.skus k ON k.id = l.sku_id
 WHERE g.checkout_id = :'co' ORDER BY k.sku_code;
-- the payment and its outbox row
SELECT p.id = (:'res'::jsonb->'payment'->>'payment_id')::bigint AS payment_ok, p.customer_id, p.currency,
	   p.amount_minor, p.method, p.psp, p.status, p.authorized_minor, p.captured_minor
  FROM market.payments p JOIN market.order_groups g ON g.id = p.group_id WHERE g.checkout_id = :'co';
SELECT b.topic, b.event_type, b.aggregate_type,
	   b.aggregate_id = (:'res'::jsonb->'payment'->>'payment_id')::bigint AS aggregate_ok,
	   b.payload - 'payment_id' - 'group_id' AS payload,
	   (b.payload->>'group_id')::bigint = (:'res'::jsonb->>'order_group')::bigint AS payload_group_ok,
	   b.acked_at IS NULL AS pending
  FROM market.outbox b
 WHERE b.topic = 'psp' AND b.aggregate_type = 'payment'
   AND b.aggregate_id = (:'res'::jsonb->'payment'->>'payment_id')::bigint;
-- the sale: reservation committed, on hand down for good, sale rows
SELECT r.status FROM market.reservations r JOIN market.checkouts c ON c.reservation_id = r.id WHERE c.id = :'co';
SELECT on_hand AS x_on_hand_after FROM market.stock_levels WHERE sku_id = :x AND warehouse_id = :w1;
SELECT market.available(:x) AS x, market.available(:y) AS y, market.available(:z) AS z;
SELECT k.sku_code, g.delta FROM market.stock_ledger g JOIN market.checkouts c ON c.reservation_id = g.reservation_id
  JOIN market.skus k ON k.id = g.sku_id
 WHERE c.id = :'co' AND g.kind = 'sale' ORDER BY k.sku_code;
-- the checkout is completed and its cart emptied
SELECT c.status, c.group_id = (:'res'::jsonb->>'order_group')::bigint AS group_ok, c.completed_at IS NOT NULL AS completed_at_set
  FROM market.checkouts c WHERE c.id = :'co';
SELECT count(*) AS cart_items_left FROM market.cart_items WHERE cart_id = :'cart';
SELECT market.cart_view(:'cart')->'checkout' AS no_live_checkout;
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_begin(%L)', :'cart')) AS begin_on_emptied_cart; -- MK027

-- ---------------------------------------------------------------------------
-- completing again
-- ---------------------------------------------------------------------------
-- same key, same request: the first result, unchanged, and nothing new
SELECT market.checkout_complete(:'co', 'alice-order-1', '{"psp": "stripe", "method": "card"}') = :'res'::jsonb AS same_result;
SELECT market.checkout_complete(:'co', 'alice-order-1', '{"psp": "stripe", "method": "card"}', 'alice') = :'res'::jsonb AS same_result_with_customer;
SELECT count(*) AS groups FROM market.order_groups WHERE checkout_id = :'co';
SELECT count(*) AS payments FROM market.payments p JOIN market.order_groups g ON g.id = p.group_id WHERE g.checkout_id = :'co';
-- same key, another request
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''alice-order-1'')', :'co')) AS other_payment; -- MK004
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''alice-order-1'', ''{"method": "card", "psp": "adyen"}'')', :'co')) AS other_psp; -- MK004
-- another key: the checkout is not open; the detail names the order group
SELECT * FROM pg_temp.error_of(format('SELECT market.checkout_complete(%L, ''alice-order-2'', ''{"method": "card", "psp": "stripe"}'')', :'co'))
	\gset again_
SELECT :'again_state' AS state,
	   :'again_detail' = format('Checkout %s is already completed: order group %s.', :'co', :'res'::jsonb->>'order_group') AS detail_ok;
-- someone else's checkout, even with the right key
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''alice-order-1'', ''{"method": "card", "psp": "stripe"}'', ''bob'')', :'co')) AS not_yours; -- MK028
SELECT count(*) AS keys, max(length(fingerprint)) AS fingerprint_bytes, bool_and(response IS NOT NULL) AS responses
  FROM market.idempotency_keys WHERE customer_id = 'alice';

-- a 255-character key is fine
SELECT market.cart_set_item(:'cart', :y, 1);
SELECT market.checkout_begin(:'cart') AS co2 \gset
SELECT (market.checkout_complete(:'co2', repeat('k', 255)))->'payment'->>'amount_minor' AS amount;
SELECT method IS NULL AS no_method, psp IS NULL AS no_psp FROM market.payments
 WHERE group_id = (SELECT group_id FROM market.checkouts WHERE id = :'co2');
SELECT b.payload->'method' AS method, b.payload->'psp' AS psp FROM market.outbox b
  JOIN market.payments p ON p.id = b.aggregate_id AND b.aggregate_type = 'payment'
 WHERE p.group_id = (SELECT group_id FROM market.checkouts WHERE id = :'co2');

-- ---------------------------------------------------------------------------
-- an expired checkout
-- ---------------------------------------------------------------------------
SELECT market.cart_create('carol') AS cart3 \gset
SELECT market.cart_set_item(:'cart3', :y, 5);
SELECT market.checkout_begin(:'cart3', '1 second') AS co3 \gset
SELECT r.status, (SELECT sum(q) FROM unnest(r.qtys) AS q) AS units FROM market.reservations r
  JOIN market.checkouts c ON c.reservation_id = r.id WHERE c.id = :'co3';
SELECT pg_sleep(1.2);
SELECT market.available(:y) AS y_back;
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''carol-1'')', :'co3')) AS expired;  -- MK002
SELECT count(*) AS keys_kept FROM market.idempotency_keys WHERE customer_id = 'carol';
SELECT count(*) AS groups FROM market.order_groups WHERE checkout_id = :'co3';
SELECT market.cart_view(:'cart3')->'checkout' AS no_live_checkout;
-- beginning again abandons the expired checkout and starts a new one
SELECT market.checkout_begin(:'cart3') AS co4 \gset
SELECT :'co4' <> :'co3' AS new_checkout;
SELECT id = :'co3' AS old, status FROM market.checkouts WHERE cart_id = :'cart3' ORDER BY created_at, id = :'co4';
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''carol-1'')', :'co3')) AS abandoned;  -- MK029
-- expiry also when the clock is moved (as a superuser), before the worker ran
UPDATE market.reservations SET expires_at = clock_timestamp() - interval '1 second'
 WHERE id = (SELECT reservation_id FROM market.checkouts WHERE id = :'co4');
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''carol-2'')', :'co4')) AS expired;  -- MK002
SELECT market.expire_reservations() >= 1 AS expired_by_hand;
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, ''carol-2'')', :'co4')) AS still_expired;  -- MK002

-- ---------------------------------------------------------------------------
-- buy_now(customer_id, items, idempotency_key, payment, currency)
-- ---------------------------------------------------------------------------
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(NULL, ''[{"sku_id": %s, "qty": 1}]'', ''k'')', :y)) AS null_customer;   -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now('''', ''[{"sku_id": %s, "qty": 1}]'', ''k'')', :y)) AS empty_customer;   -- MK020
SELECT pg_temp.sqlstate_of('SELECT market.buy_now(''dave'', NULL, ''k'')') AS null_items;                                       -- MK020
SELECT pg_temp.sqlstate_of('SELECT market.buy_now(''dave'', ''[]'', ''k'')') AS empty_items;                                    -- MK021
SELECT pg_temp.sqlstate_of('SELECT market.buy_now(''dave'', ''{"sku_id": 1}'', ''k'')') AS items_object;                       -- MK021
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 0}]'', ''k'')', :y)) AS qty_zero;   -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}]'', NULL)', :y)) AS null_key;    -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}]'', %L)', :y, repeat('k', 256))) AS key_256; -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}]'', ''k'', ''"card"'')', :y)) AS payment_string; -- MK021
SELECT pg_temp.sqlstate_of('SELECT market.buy_now(''dave'', ''[{"sku_id": 999999999, "qty": 1}]'', ''k'')') AS unknown_sku;  -- MK010
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}]'', ''k'')', :e)) AS foreign_currency; -- MK026
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 1}]'', ''k'', ''{}'', ''EUR'')', :e, :y)) AS mixed_currency; -- MK026
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}]'', ''k'', ''{}'', ''eur'')', :e)) AS bad_currency; -- MK022
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}]'', ''k'', ''{}'', NULL)', :e)) AS null_currency; -- MK022
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 2}]'', ''k'')', :scarce)) AS sold_out; -- MK001
SELECT count(*) AS keys_kept FROM market.idempotency_keys WHERE customer_id = 'dave';
SELECT count(*) AS checkouts FROM market.checkouts WHERE customer_id = 'dave';

-- in euros
SELECT (market.buy_now('dave', format('[{"sku_id": %s, "qty": 2}]', :e)::jsonb, 'dave-eur', '{}', 'EUR'))->'payment'->>'currency' AS eur_payment;

-- two sellers, one SKU from two warehouses
SELECT market.available(:x) AS x, market.available(:y) AS y, market.available(:z) AS z;
SELECT market.buy_now('dave',
	format('[{"sku_id": %s, "qty": 1, "warehouse_id": %s}, {"sku_id": %s, "qty": 2, "warehouse_id": %s},'
		   ' {"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 2}]', :x, :w1, :x, :w2, :z, :y)::jsonb,
	'dave-1', '{"method": "wallet"}') AS bn \gset
SELECT market.available(:x) AS x, market.available(:y) AS y, market.available(:z) AS z;
SELECT (o->>'seller_id')::bigint = :s1 AS seller_one, (o->>'subtotal_minor')::bigint AS subtotal, o->>'status' AS status
  FROM jsonb_array_elements(:'bn'::jsonb->'orders') AS o ORDER BY 1 DESC;
SELECT (:'bn'::jsonb->'payment'->>'amount_minor')::bigint AS amount,   -- 3 * 1111 (the new price) + 2 * 250 + 5000
	   :'bn'::jsonb->'payment'->>'status' AS status;
SELECT k.sku_code, l.warehouse_id = :w1 AS from_w1, l.qty, l.unit_price_minor
  FROM market.order_lines l JOIN market.orders o ON o.id = l.order_id
  JOIN market.skus k ON k.id = l.sku_id
 WHERE o.group_id = (:'bn'::jsonb->>'order_group')::bigint ORDER BY k.sku_code, 2 DESC;
SELECT c.cart_id IS NULL AS no_cart, c.status, c.customer_id, c.qtys, c.unit_prices, c.total_minor,
	   r.status AS reservation, c.group_id = (:'bn'::jsonb->>'order_group')::bigint AS group_ok
  FROM market.checkouts c JOIN market.reservations r ON r.id = c.reservation_id
  JOIN market.order_groups g ON g.checkout_id = c.id
 WHERE g.id = (:'bn'::jsonb->>'order_group')::bigint;
SELECT p.method, p.psp, b.event_type, b.payload->>'method' AS payload_method
  FROM market.payments p JOIN market.outbox b ON b.aggregate_type = 'payment' AND b.aggregate_id = p.id
 WHERE p.group_id = (:'bn'::jsonb->>'order_group')::bigint;

-- the last unit, then a retry after it is gone: the first result
SELECT market.buy_now('dave', format('[{"sku_id": %s, "qty": 1}]', :scarce)::jsonb, 'dave-last') AS last \gset
SELECT market.available(:scarce) AS scarce_left;
SELECT market.buy_now('dave', format('[{"sku_id": %s, "qty": 1}]', :scarce)::jsonb, 'dave-last') = :'last'::jsonb AS replayed;
-- the lines are compared as a request, not as text
SELECT market.buy_now('dave', format('[{"sku_id": %s, "qty": 2}, {"sku_id": %s, "qty": 1}, {"qty": 2, "sku_id": %s, "warehouse_id": %s}, {"sku_id": %s, "qty": 1, "warehouse_id": %s}]',
	:y, :z, :x, :w2, :x, :w1)::jsonb, 'dave-1', '{"method": "wallet"}') = :'bn'::jsonb AS replayed_reordered;
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}]'', ''dave-1'', ''{"method": "wallet"}'')', :y)) AS other_items; -- MK004
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}]'', ''dave-last'', ''{}'', ''EUR'')', :scarce)) AS other_currency; -- MK004
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''alice'', ''[{"sku_id": %s, "qty": 1}]'', ''alice-order-1'', ''{"method": "card", "psp": "stripe"}'')', :y)) AS key_of_a_checkout; -- MK004
-- keys belong to their customer: erin may use dave's key
SELECT (market.buy_now('erin', format('[{"sku_id": %s, "qty": 1}]', :y)::jsonb, 'dave-1'))->'payment'->>'amount_minor' AS erin_amount;
SELECT market.available(:x) AS x, market.available(:y) AS y, market.available(:z) AS z, market.available(:scarce) AS scarce;
SELECT customer_id, count(*) AS groups FROM market.order_groups WHERE customer_id IN ('dave', 'erin')
 GROUP BY 1 ORDER BY 1;

-- a sale takes its units from a slot's free and on-hand counts in one UPDATE:
-- the exact path (no slot holds 5 units: taken across slots, the rest spread
-- evenly) and the fast path (one slot holds the unit);
-- slot_updates counts the slot rows this backend updated and has not yet
-- reported, so the difference around a call is the call's
SELECT market.sku_create(:p1, 'CHK-SLOTS', 10, 'USD') AS sl \gset
SELECT market.stock_set(:sl, :w1, 8, slots => 4) AS sl_w1;
\set slots_of_sl 'SELECT array_agg(on_hand ORDER BY on_hand) AS on_hand, array_agg(free ORDER BY free) AS free FROM market.stock_slots WHERE sku_id = ' :sl
\set slot_updates '(SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relid = ''market.stock_slots''::regclass)'
:slots_of_sl;
BEGIN;
SELECT :slot_updates AS upd_before \gset
SELECT (market.buy_now('fay', format('[{"sku_id": %s, "qty": 5}]', :sl)::jsonb, 'fay-2'))->'payment'->>'amount_minor' AS exact_amount;
SELECT :slot_updates - :upd_before AS slot_rows_updated;
SELECT :slot_updates AS upd_before \gset
SELECT (market.buy_now('fay', format('[{"sku_id": %s, "qty": 1}]', :sl)::jsonb, 'fay-1'))->'payment'->>'amount_minor' AS fast_amount;
SELECT :slot_updates - :upd_before AS slot_rows_updated;
COMMIT;
:slots_of_sl;
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :sl;

-- ---------------------------------------------------------------------------
-- idempotency_purge(max)
-- ---------------------------------------------------------------------------
SHOW market.idempotency_retention;
SELECT pg_temp.sqlstate_of($$SET market.idempotency_retention = '23h'$$) AS below_minimum;  -- 22023
SELECT pg_temp.sqlstate_of('SELECT market.idempotency_purge(NULL)') AS null_max;  -- MK020
SELECT pg_temp.sqlstate_of('SELECT market.idempotency_purge(0)') AS zero_max;     -- MK020
SELECT count(*) AS keys FROM market.idempotency_keys
 WHERE customer_id IN ('alice', 'carol', 'dave', 'erin');
SELECT market.idempotency_purge() AS nothing_is_old_enough;
UPDATE market.idempotency_keys SET created_at = now() - interval '25 hours' WHERE customer_id = 'dave';
UPDATE market.idempotency_keys SET created_at = now() - interval '23 hours' WHERE customer_id = 'erin';
SELECT count(*) AS old_keys FROM market.idempotency_keys WHERE customer_id = 'dave';
SET market.idempotency_retention = '2d';
SELECT market.idempotency_purge() AS kept_for_two_days;
RESET market.idempotency_retention;
SELECT market.idempotency_purge(2) AS first_batch;
SELECT market.idempotency_purge(2) AS second_batch;
SELECT market.idempotency_purge() AS rest;
SELECT customer_id, count(*) FROM market.idempotency_keys
 WHERE customer_id IN ('alice', 'carol', 'dave', 'erin') GROUP BY 1 ORDER BY 1;
-- a purged key runs afresh: dave-last now meets a sold-out SKU
SELECT pg_temp.sqlstate_of(format('SELECT market.buy_now(''dave'', ''[{"sku_id": %s, "qty": 1}]'', ''dave-last'')', :scarce)) AS after_purge; -- MK001

SELECT * FROM market.verify_inventory();
