-- pgTAP: the privilege model of market 0.1.  PUBLIC gets nothing;
-- market_app may call the reservation API (available, reserve, extend,
-- release, commit) and touch no table; market_admin may call every
-- documented function and only read the tables and views.  Checked both in
-- the catalogs (schema_privs_are, table_privs_are, function_privs_are) and
-- by trying as each role (SET ROLE).
--
-- Creates the extensions inside a transaction that it rolls back.
\set ECHO none
\set QUIET 1
\pset format unaligned
\pset tuples_only true
\pset pager off
\set ON_ERROR_STOP true
SET client_min_messages = warning;

BEGIN;
CREATE EXTENSION pgtap;
CREATE EXTENSION market;
CREATE ROLE regress_market_nobody NOLOGIN;

SELECT plan(397);

-- ---------------------------------------------------------------------------
-- the schema
-- ---------------------------------------------------------------------------
SELECT schema_privs_are('market', 'market_app', ARRAY['USAGE']);
SELECT schema_privs_are('market', 'market_admin', ARRAY['USAGE']);
SELECT schema_privs_are('market', 'public', '{}'::text[], 'PUBLIC has no privilege on schema market');
SELECT schema_privs_are('market', 'regress_market_nobody', '{}'::text[], 'a role without grants has no privilege on schema market');

-- ---------------------------------------------------------------------------
-- tables and views: market_admin reads, nobody writes
-- ---------------------------------------------------------------------------
SELECT table_privs_are('market', t, 'market_admin', ARRAY['SELECT'],
		format('market_admin may only SELECT from market.%s', t))
  FROM unnest(ARRAY['sellers', 'products', 'skus', 'warehouses', 'stock', 'stock_slots',
					'reservations', 'stock_ledger', 'reservation_lines', 'stock_levels',
					'checkouts', 'idempotency_keys']) AS t;
SELECT table_privs_are('market', t, 'market_app', '{}'::text[],
		format('market_app has no privilege on market.%s', t))
  FROM unnest(ARRAY['sellers', 'products', 'skus', 'warehouses', 'stock', 'stock_slots',
					'reservations', 'stock_ledger', 'reservation_lines', 'stock_levels',
					'checkouts', 'idempotency_keys']) AS t;
SELECT table_privs_are('market', t, 'public', '{}'::text[],
		format('PUBLIC has no privilege on market.%s', t))
  FROM unnest(ARRAY['sellers', 'products', 'skus', 'warehouses', 'stock', 'stock_slots',
					'reservations', 'stock_ledger', 'reservation_lines', 'stock_levels',
					'checkouts', 'idempotency_keys']) AS t;
-- the outbox: read by market_admin, written only through the functions
SELECT table_privs_are('market', 'outbox', 'market_admin', ARRAY['SELECT'], 'market_admin may only SELECT from market.outbox');
SELECT table_privs_are('market', 'outbox', 'market_app', '{}'::text[], 'market_app has no privilege on market.outbox');
SELECT table_privs_are('market', 'outbox', 'public', '{}'::text[], 'PUBLIC has no privilege on market.outbox');
-- payments: the attempts are read by market_admin; the PSP accounts only
-- column by column, never the credentials
SELECT table_privs_are('market', 'payment_attempts', 'market_admin', ARRAY['SELECT'], 'market_admin may only SELECT from market.payment_attempts');
SELECT table_privs_are('market', t, r, '{}'::text[], format('%s has no privilege on market.%s', r, t))
  FROM unnest(ARRAY['payment_attempts', 'psp_accounts']) t, unnest(ARRAY['market_app', 'public']) r
 WHERE NOT (t = 'payment_attempts' AND r = 'market_admin');
SELECT table_privs_are('market', 'psp_accounts', 'market_admin', '{}'::text[], 'market_admin has no table-wide privilege on market.psp_accounts');
SELECT table_privs_are('market', 'psp_webhook_events', 'market_admin', ARRAY['SELECT'], 'market_admin may only SELECT from market.psp_webhook_events');
SELECT table_privs_are('market', 'psp_webhook_events', r, '{}'::text[], format('%s has no privilege on market.psp_webhook_events', r))
  FROM unnest(ARRAY['market_app', 'public']) r;
SELECT column_privs_are('market', 'psp_accounts', 'credentials', r, '{}'::text[], format('%s may not read the PSP credentials', r))
  FROM unnest(ARRAY['market_admin', 'market_app', 'public']) r;
SELECT column_privs_are('market', 'psp_accounts', 'name', 'market_admin', ARRAY['SELECT'], 'market_admin may read the account names');
SELECT is((SELECT array_agg(c.relname::text ORDER BY c.relname) FROM pg_class c
			WHERE c.relnamespace = 'market'::regnamespace AND c.relkind = 'S'
			  AND (has_sequence_privilege('market_app', c.oid, 'USAGE, UPDATE, SELECT')
				   OR has_sequence_privilege('market_admin', c.oid, 'USAGE, UPDATE')
				   OR has_sequence_privilege('public', c.oid, 'USAGE, UPDATE, SELECT'))),
		  NULL, 'no role may draw from or set a market sequence');
SELECT is((SELECT array_agg(c.relname::text || '.' || a.attname ORDER BY 1) FROM pg_class c
			JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
			WHERE c.relnamespace = 'market'::regnamespace AND c.relkind IN ('r', 'v')
			  AND (has_column_privilege('market_app', c.oid, a.attnum, 'SELECT, INSERT, UPDATE, REFERENCES')
				   OR has_column_privilege('market_admin', c.oid, a.attnum, 'INSERT, UPDATE, REFERENCES')
				   OR has_column_privilege('public', c.oid, a.attnum, 'SELECT, INSERT, UPDATE, REFERENCES'))),
		  NULL, 'no column grant opens a door the table grants keep shut');

-- ---------------------------------------------------------------------------
-- functions
-- ---------------------------------------------------------------------------
CREATE TEMP TABLE fn (name name, args name[], app boolean, admin boolean);
INSERT INTO fn VALUES
	('seller_create', ARRAY['text'], false, true),
	('product_create', ARRAY['bigint', 'text', 'text', 'text', 'text', 'jsonb'], false, true),
	('sku_create', ARRAY['bigint', 'text', 'bigint', 'text', 'jsonb'], false, true),
	('warehouse_create', ARRAY['text', 'text', 'integer'], false, true),
	('stock_set', ARRAY['bigint', 'integer', 'bigint', 'integer'], false, true),
	('stock_adjust', ARRAY['bigint', 'integer', 'bigint', 'text'], false, true),
	('available', ARRAY['bigint', 'integer'], true, true),
	('reserve', ARRAY['jsonb', 'interval', 'text'], true, true),
	('reservation_extend', ARRAY['uuid', 'interval'], true, true),
	('reservation_release', ARRAY['uuid'], true, true),
	('reservation_commit', ARRAY['uuid'], true, true),
	('expire_reservations', ARRAY['integer'], false, true),
	('worker_status', '{}', false, true),
	('verify_inventory', '{}', false, true),
	('ledger_append_only', '{}', false, false),
	('order_transition', ARRAY['bigint', 'text', 'text'], true, true),
	('order_transitions', '{}', true, true),
	('order_view', ARRAY['bigint'], true, true),
	('order_guard', '{}', false, false),
	('order_effects_set', '{}', false, false),
	('order_transition_many', ARRAY['bigint[]', 'text', 'text[]'], false, true),
	('references_check', '{}', false, false),
	('references_guard', '{}', false, false),
	('verify_references', '{}', false, true),
	('outbox_claim', ARRAY['text', 'integer', 'text', 'interval'], true, true),
	('outbox_ack', ARRAY['bigint[]', 'text'], true, true),
	('outbox_fail', ARRAY['bigint', 'text', 'text', 'interval'], true, true),
	('outbox_retry', ARRAY['bigint'], false, true),
	('outbox_cleanup', ARRAY['integer'], false, true),
	('outbox_status', '{}', false, true),
	('outbox_notifier', '{}', false, true),
	('outbox_wake', '{}', false, false),
	('batch_status', '{}', false, true),
	('cart_create', ARRAY['text', 'text'], true, true),
	('cart_set_item', ARRAY['uuid', 'bigint', 'integer'], true, true),
	('cart_view', ARRAY['uuid'], true, true),
	('checkout_begin', ARRAY['uuid', 'interval'], true, true),
	('checkout_complete', ARRAY['uuid', 'text', 'jsonb', 'text'], true, true),
	('buy_now', ARRAY['text', 'jsonb', 'text', 'jsonb', 'text'], true, true),
	('idempotency_purge', ARRAY['integer'], false, true),
	('psp_register', ARRAY['text', 'text', 'text', 'jsonb', 'integer', 'jsonb'], false, true),
	('psp_set_enabled', ARRAY['text', 'boolean'], false, true),
	('payment_view', ARRAY['bigint'], true, true),
	('psp_status', '{}', false, true),
	('psp_breakers', '{}', false, false),
	('psp_claim', ARRAY['text', 'integer', 'integer[]', 'integer[]', 'interval'], false, false),
	('psp_record', ARRAY['text', 'jsonb'], false, false),
	('psp_plan', ARRAY['market.outbox_message', 'text', 'integer[]'], false, false),
	('psp_backoff', ARRAY['integer'], false, false),
	('psp_reschedule', ARRAY['bigint', 'interval', 'text'], false, false),
	('psp_dead', ARRAY['bigint', 'text'], false, false),
	('psp_orders_to', ARRAY['bigint', 'text', 'text'], false, false),
	('psp_queue_reconcile', ARRAY['bigint', 'bigint', 'integer'], false, false),
	('psp_webhook', ARRAY['text', 'jsonb', 'text'], true, true),
	('psp_webhook_settle', ARRAY['bigint', 'text', 'text', 'text', 'text', 'text'], false, false),
	('psp_webhook_reconcile', ARRAY['bigint', 'integer', 'integer'], false, false),
	('psp_webhook_apply', ARRAY['bigint'], false, false),
	('psp_webhook_retry_deferred', ARRAY['bigint'], false, false),
	('psp_webhook_record', ARRAY['text', 'text', 'text', 'integer', 'text', 'text', 'text', 'text', 'text', 'bigint', 'bigint', 'bigint', 'bigint', 'text'], false, false),
	('psp_webhook_retry', ARRAY['bigint'], false, true),
	('psp_hmac_verify', ARRAY['bytea', 'bytea', 'bytea'], false, false);
SELECT is((SELECT count(*)::int FROM fn), (SELECT count(*)::int FROM pg_proc WHERE pronamespace = 'market'::regnamespace),
	'the list below covers every market function');
SELECT function_privs_are('market', name, args, 'market_app',
		CASE WHEN app THEN ARRAY['EXECUTE'] ELSE '{}' END::name[],
		format('market_app %s execute market.%s', CASE WHEN app THEN 'may' ELSE 'may not' END, name))
  FROM fn ORDER BY name;
SELECT function_privs_are('market', name, args, 'market_admin',
		CASE WHEN admin THEN ARRAY['EXECUTE'] ELSE '{}' END::name[],
		format('market_admin %s execute market.%s', CASE WHEN admin THEN 'may' ELSE 'may not' END, name))
  FROM fn ORDER BY name;
SELECT function_privs_are('market', name, args, 'public', '{}'::name[],
		format('PUBLIC may not execute market.%s', name))
  FROM fn ORDER BY name;
SELECT function_privs_are('market', name, args, 'regress_market_nobody', '{}'::name[],
		format('a role without grants may not execute market.%s', name))
  FROM fn ORDER BY name;
SELECT isnt_superuser('market_app');
SELECT isnt_superuser('market_admin');
SELECT is((SELECT rolbypassrls OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = 'market_app'),
	false, 'market_app has no role attribute beyond its grants');
SELECT is((SELECT rolbypassrls OR rolcreaterole OR rolcreatedb FROM pg_roles WHERE rolname = 'market_admin'),
	false, 'market_admin has no role attribute beyond its grants');

-- ---------------------------------------------------------------------------
-- tried for real
-- ---------------------------------------------------------------------------
SELECT market.seller_create('TAP Seller') AS seller \gset
SELECT market.product_create(:seller, 'TAP product') AS product \gset
SELECT market.sku_create(:product, 'TAP-PRIV', 1000, 'EUR') AS sku \gset
SELECT market.warehouse_create('tap-priv', 'TAP W') AS wh \gset
SELECT market.stock_set(:sku, :wh, 10) AS on_hand \gset
-- an order, written as checkout writes it (as the owner)
INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
VALUES (gen_random_uuid(), 'tap-priv', 'EUR', 0) RETURNING id AS grp \gset
INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
VALUES (:grp, :seller, 'tap-priv', 'EUR', 0) RETURNING id AS ord \gset
SELECT market.sku_create(:product, 'TAP-PRIV-CART', 500, 'USD') AS cart_sku \gset
SELECT market.stock_set(:cart_sku, :wh, 10) AS cart_on_hand \gset

-- market_app
SET ROLE market_app;
SELECT is(market.available(:sku), 10::bigint, 'market_app: available');
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2}]', :sku)::jsonb) AS r \gset
SELECT isnt(:'r'::uuid, NULL, 'market_app: reserve');
SELECT ok(market.reservation_extend(:'r', '30 min') > now(), 'market_app: reservation_extend');
SELECT is(market.reservation_commit(:'r'), 2::bigint, 'market_app: reservation_commit');
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :sku)::jsonb) AS r2 \gset
SELECT is(market.reservation_release(:'r2'), true, 'market_app: reservation_release');
SELECT throws_ok(format('SELECT market.stock_set(%s, %s, 100)', :sku, :wh), '42501', NULL, 'market_app: stock_set is denied');
SELECT throws_ok(format('SELECT market.stock_adjust(%s, %s, 1, ''x'')', :sku, :wh), '42501', NULL, 'market_app: stock_adjust is denied');
SELECT throws_ok('SELECT market.seller_create(''x'')', '42501', NULL, 'market_app: seller_create is denied');
SELECT throws_ok('SELECT market.expire_reservations()', '42501', NULL, 'market_app: expire_reservations is denied');
SELECT throws_ok('SELECT * FROM market.verify_inventory()', '42501', NULL, 'market_app: verify_inventory is denied');
SELECT throws_ok('SELECT * FROM market.worker_status()', '42501', NULL, 'market_app: worker_status is denied');
SELECT throws_ok('SELECT * FROM market.batch_status()', '42501', NULL, 'market_app: batch_status is denied');
SELECT throws_ok('SELECT * FROM market.reservations', '42501', NULL, 'market_app: reading reservations is denied');
SELECT throws_ok('SELECT * FROM market.stock_levels', '42501', NULL, 'market_app: reading stock_levels is denied');
SELECT throws_ok('SELECT * FROM market.reservation_lines', '42501', NULL, 'market_app: reading reservation_lines is denied');
SELECT throws_ok('INSERT INTO market.sellers (name) VALUES (''x'')', '42501', NULL, 'market_app: INSERT is denied');
SELECT throws_ok('UPDATE market.stock_slots SET free = on_hand', '42501', NULL, 'market_app: UPDATE is denied');
SELECT throws_ok('DELETE FROM market.reservations', '42501', NULL, 'market_app: DELETE is denied');
SELECT is(market.order_transition(:ord, 'confirmed'), 'confirmed', 'market_app: order_transition');
SELECT is(market.order_view(:ord)->>'status', 'confirmed', 'market_app: order_view');
SELECT throws_ok(format('UPDATE market.orders SET status = ''shipped'' WHERE id = %s', :ord), '42501', NULL,
	'market_app: UPDATE of an order is denied');
SELECT throws_ok('SELECT * FROM market.order_events', '42501', NULL, 'market_app: reading order_events is denied');
RESET ROLE;
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id)
VALUES ('psp', 'tap.priv', 'tap-priv', 1);
SET ROLE market_app;
SELECT market.outbox_claim('tap-app', 1, 'psp') AS claimed \gset
SELECT is((:'claimed'::market.outbox_message).event_type, 'tap.priv', 'market_app: outbox_claim');
SELECT is(market.outbox_ack(ARRAY[(:'claimed'::market.outbox_message).id], 'tap-app'), 1, 'market_app: outbox_ack');
SELECT throws_ok('SELECT market.outbox_retry(1)', '42501', NULL, 'market_app: outbox_retry is denied');
SELECT throws_ok('SELECT market.outbox_cleanup()', '42501', NULL, 'market_app: outbox_cleanup is denied');
SELECT throws_ok('SELECT * FROM market.outbox_status()', '42501', NULL, 'market_app: outbox_status is denied');
SELECT throws_ok('SELECT * FROM market.outbox', '42501', NULL, 'market_app: reading the outbox is denied');
-- carts and checkout
SELECT market.cart_create('tap-app-customer') AS cart \gset
SELECT is(market.cart_set_item(:'cart', :cart_sku, 2), 2, 'market_app: cart_set_item');
SELECT is((market.cart_view(:'cart')->>'total_minor')::bigint, 1000::bigint, 'market_app: cart_view');
SELECT market.checkout_begin(:'cart') AS co \gset
SELECT isnt(:'co'::uuid, NULL, 'market_app: checkout_begin');
SELECT is((market.checkout_complete(:'co', 'app-k1'))->'payment'->>'amount_minor', '1000', 'market_app: checkout_complete');
SELECT is((market.buy_now('tap-app-customer', format('[{"sku_id": %s, "qty": 1}]', :cart_sku)::jsonb, 'app-k2'))->'payment'->>'status',
	'pending', 'market_app: buy_now');
SELECT throws_ok('SELECT market.idempotency_purge()', '42501', NULL, 'market_app: idempotency_purge is denied');
SELECT throws_ok('SELECT * FROM market.checkouts', '42501', NULL, 'market_app: reading checkouts is denied');
SELECT throws_ok('SELECT * FROM market.idempotency_keys', '42501', NULL, 'market_app: reading idempotency_keys is denied');
SELECT throws_ok('DELETE FROM market.idempotency_keys', '42501', NULL, 'market_app: deleting idempotency keys is denied');
SELECT throws_ok(format('UPDATE market.checkouts SET status = ''open'' WHERE id = %L', :'co'), '42501', NULL, 'market_app: UPDATE of checkouts is denied');
RESET ROLE;

-- market_admin
SET ROLE market_admin;
SELECT lives_ok('SELECT market.seller_create(''Admin seller'')', 'market_admin: seller_create');
SELECT lives_ok(format('SELECT market.stock_adjust(%s, %s, 5, ''count'')', :sku, :wh), 'market_admin: stock_adjust');
SELECT is(market.stock_set(:sku, :wh, 20), 20::bigint, 'market_admin: stock_set');
SELECT is(market.expire_reservations(), 0, 'market_admin: expire_reservations');
SELECT is_empty('SELECT * FROM market.verify_inventory()', 'market_admin: verify_inventory');
SELECT lives_ok('SELECT * FROM market.worker_status()', 'market_admin: worker_status');
SELECT lives_ok('SELECT * FROM market.batch_status()', 'market_admin: batch_status');
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :sku)::jsonb) AS r3 \gset
SELECT is(market.reservation_release(:'r3'), true, 'market_admin: reserve and reservation_release');
SELECT is((SELECT on_hand FROM market.stock_levels WHERE sku_id = :sku), 20::bigint, 'market_admin: reads stock_levels');
SELECT is((SELECT count(*)::int FROM market.stock_ledger WHERE sku_id = :sku), 4, 'market_admin: reads stock_ledger');
SELECT is((SELECT status FROM market.reservations WHERE id = :'r3'), 'released', 'market_admin: reads reservations');
SELECT lives_ok('SELECT * FROM market.reservation_lines', 'market_admin: reads reservation_lines');
SELECT lives_ok('SELECT market.outbox_cleanup()', 'market_admin: outbox_cleanup');
SELECT is((SELECT count(*)::int FROM market.outbox_status()), 2, 'market_admin: outbox_status');
SELECT is((SELECT count(*)::int FROM market.outbox WHERE event_type = 'tap.priv'), 1, 'market_admin: reads the outbox');
SELECT throws_ok('UPDATE market.outbox SET acked_at = NULL', '42501', NULL, 'market_admin: writing the outbox directly is denied');
SELECT throws_ok('INSERT INTO market.sellers (name) VALUES (''x'')', '42501', NULL, 'market_admin: INSERT is denied');
SELECT throws_ok(format('UPDATE market.stock_slots SET free = on_hand WHERE sku_id = %s', :sku), '42501', NULL, 'market_admin: UPDATE is denied');
SELECT throws_ok(format('DELETE FROM market.reservations WHERE id = %L', :'r3'), '42501', NULL, 'market_admin: DELETE is denied');
SELECT throws_ok('TRUNCATE market.stock', '42501', NULL, 'market_admin: TRUNCATE is denied');
SELECT throws_ok(format('INSERT INTO market.stock_ledger (sku_id, warehouse_id, delta, kind) VALUES (%s, %s, 1, ''adjust'')', :sku, :wh),
	'42501', NULL, 'market_admin: writing the ledger directly is denied');
SELECT is(market.order_transition(:ord, 'shipped'), 'shipped', 'market_admin: order_transition');
SELECT is(market.order_transition_many(ARRAY[:ord]::bigint[], 'delivered', ARRAY['admin']),
	1, 'market_admin: order_transition_many');
SELECT is((SELECT count(*)::int FROM market.order_events WHERE order_id = :ord), 4, 'market_admin: reads order_events');
SELECT throws_ok(format('UPDATE market.orders SET status = ''delivered'' WHERE id = %s', :ord), '42501', NULL,
	'market_admin: UPDATE of an order is denied');
SELECT is(market.idempotency_purge(), 0::bigint, 'market_admin: idempotency_purge');
SELECT is((SELECT status FROM market.checkouts WHERE id = :'co'), 'completed', 'market_admin: reads checkouts');
SELECT is((SELECT count(*)::int FROM market.idempotency_keys WHERE customer_id = 'tap-app-customer'), 2, 'market_admin: reads idempotency_keys');
SELECT throws_ok('DELETE FROM market.idempotency_keys', '42501', NULL, 'market_admin: deleting idempotency keys directly is denied');
SELECT throws_ok(format('UPDATE market.checkouts SET status = ''open'' WHERE id = %L', :'co'), '42501', NULL, 'market_admin: UPDATE of checkouts is denied');
SELECT market.cart_create('tap-admin-customer') AS admin_cart \gset
SELECT is(market.cart_set_item(:'admin_cart', :cart_sku, 1), 1, 'market_admin: cart functions');
RESET ROLE;

-- a role without grants (PUBLIC only)
SET ROLE regress_market_nobody;
SELECT throws_ok(format('SELECT market.available(%s)', :sku), '42501', NULL, 'no grants: available is denied');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1}]'')', :sku), '42501', NULL, 'no grants: reserve is denied');
SELECT throws_ok('SELECT * FROM market.skus', '42501', NULL, 'no grants: reading skus is denied');
SELECT throws_ok('SELECT market.cart_create(''nobody'')', '42501', NULL, 'no grants: cart_create is denied');
SELECT throws_ok(format('SELECT market.checkout_complete(%L, ''k'')', :'co'), '42501', NULL, 'no grants: checkout_complete is denied');
RESET ROLE;
GRANT USAGE ON SCHEMA market TO regress_market_nobody;
SET ROLE regress_market_nobody;
SELECT throws_ok(format('SELECT market.available(%s)', :sku), '42501', NULL, 'no grants but USAGE: available is denied');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1}]'')', :sku), '42501', NULL, 'no grants but USAGE: reserve is denied');
SELECT throws_ok(format('SELECT market.reservation_release(%L)', :'r3'), '42501', NULL, 'no grants but USAGE: reservation_release is denied');
SELECT throws_ok('SELECT * FROM market.stock_levels', '42501', NULL, 'no grants but USAGE: reading stock_levels is denied');
SELECT throws_ok(format('SELECT market.order_transition(%s, ''delivered'')', :ord), '42501', NULL,
	'no grants but USAGE: order_transition is denied');
SELECT throws_ok(format('SELECT market.order_view(%s)', :ord), '42501', NULL, 'no grants but USAGE: order_view is denied');
SELECT throws_ok('SELECT * FROM market.outbox_claim(''nobody'')', '42501', NULL, 'no grants but USAGE: outbox_claim is denied');
SELECT throws_ok('SELECT market.cart_create(''nobody'')', '42501', NULL, 'no grants but USAGE: cart_create is denied');
SELECT throws_ok(format('SELECT market.cart_view(%L)', :'cart'), '42501', NULL, 'no grants but USAGE: cart_view is denied');
SELECT throws_ok(format('SELECT market.checkout_begin(%L)', :'cart'), '42501', NULL, 'no grants but USAGE: checkout_begin is denied');
SELECT throws_ok(format('SELECT market.buy_now(''nobody'', ''[{"sku_id": %s, "qty": 1}]'', ''k'')', :cart_sku), '42501', NULL, 'no grants but USAGE: buy_now is denied');
SELECT throws_ok('SELECT market.idempotency_purge()', '42501', NULL, 'no grants but USAGE: idempotency_purge is denied');
SELECT throws_ok('SELECT * FROM market.checkouts', '42501', NULL, 'no grants but USAGE: reading checkouts is denied');
RESET ROLE;

SELECT is(market.available(:sku), 20::bigint, 'nothing the roles tried changed the stock');
SELECT is(market.available(:cart_sku), 7::bigint, 'the checkout and the buy_now sold 3 units');
SELECT is_empty('SELECT * FROM market.verify_inventory()', 'the inventory is consistent');

SELECT * FROM finish();
ROLLBACK;
