-- pgTAP: the SQL API contract of market 0.1 (docs/functions.md and
-- sql/market--0.1.sql): objects, exact signatures with argument names and
-- defaults, result types, SECURITY DEFINER with a pinned search_path, no
-- STRICT function, and every documented SQLSTATE raised where it should be.
--
-- Runs under pg_regress (see test/tools/run-tests.sh); like every file here
-- it creates the extensions inside a transaction that it rolls back, so the
-- files do not depend on each other or on their order.
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

SELECT plan(404);

-- ---------------------------------------------------------------------------
-- extension, schema, roles
-- ---------------------------------------------------------------------------
SELECT has_extension('market');
SELECT is((SELECT extversion FROM pg_extension WHERE extname = 'market'), '0.5', 'market is at version 0.5');
SELECT is((SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
			WHERE e.extname = 'market'), 'market', 'the extension lives in schema market');
SELECT has_schema('market');
SELECT has_role('market_admin');
SELECT has_role('market_app');
SELECT isnt_superuser('market_admin');
SELECT isnt_superuser('market_app');
SELECT is((SELECT rolcanlogin FROM pg_roles WHERE rolname = 'market_admin'), false, 'market_admin is NOLOGIN');
SELECT is((SELECT rolcanlogin FROM pg_roles WHERE rolname = 'market_app'), false, 'market_app is NOLOGIN');
SELECT is(pg_has_role('market_app', 'market_admin', 'MEMBER'), false, 'market_app is not a member of market_admin');
SELECT is(pg_has_role('market_admin', 'market_app', 'MEMBER'), false, 'market_admin is not a member of market_app');

-- ---------------------------------------------------------------------------
-- tables and views, with their columns
-- ---------------------------------------------------------------------------
SELECT tables_are('market', ARRAY['sellers', 'products', 'skus', 'warehouses', 'stock',
	'stock_slots', 'reservations', 'stock_ledger', 'carts', 'cart_items', 'order_groups',
	'orders', 'order_lines', 'order_events', 'payments', 'outbox', 'checkouts', 'idempotency_keys',
	'psp_accounts', 'payment_attempts', 'psp_webhook_events']);
SELECT views_are('market', ARRAY['reservation_lines', 'stock_levels']);
SELECT columns_are('market', 'sellers', ARRAY['id', 'name', 'created_at']);
SELECT columns_are('market', 'products', ARRAY['id', 'seller_id', 'title', 'description', 'brand',
	'category', 'attributes', 'created_at']);
SELECT columns_are('market', 'skus', ARRAY['id', 'product_id', 'sku_code', 'price_minor', 'currency',
	'attributes', 'created_at']);
SELECT columns_are('market', 'warehouses', ARRAY['id', 'code', 'name', 'priority', 'created_at']);
SELECT columns_are('market', 'stock', ARRAY['sku_id', 'warehouse_id', 'slots', 'created_at']);
SELECT columns_are('market', 'stock_slots', ARRAY['sku_id', 'warehouse_id', 'slot', 'on_hand', 'free']);
SELECT columns_are('market', 'reservations', ARRAY['id', 'owner', 'status', 'created_at', 'expires_at',
	'finished_at', 'sku_ids', 'warehouse_ids', 'slots', 'qtys']);
SELECT columns_are('market', 'stock_ledger', ARRAY['id', 'at', 'sku_id', 'warehouse_id', 'delta', 'kind',
	'reason', 'reservation_id', 'actor']);
SELECT columns_are('market', 'reservation_lines', ARRAY['reservation_id', 'owner', 'status', 'expires_at',
	'sku_id', 'warehouse_id', 'slot', 'qty']);
SELECT columns_are('market', 'stock_levels', ARRAY['sku_id', 'warehouse_id', 'on_hand', 'held', 'free', 'slots']);
SELECT columns_are('market', 'checkouts', ARRAY['id', 'cart_id', 'customer_id', 'currency', 'reservation_id',
	'status', 'sku_ids', 'qtys', 'unit_prices', 'seller_ids', 'total_minor', 'created_at', 'expires_at',
	'completed_at', 'group_id']);
SELECT columns_are('market', 'idempotency_keys', ARRAY['customer_id', 'key', 'operation', 'fingerprint',
	'response', 'created_at']);
SELECT col_is_pk('market', 'idempotency_keys', ARRAY['customer_id', 'key']::name[], 'idempotency keys are keyed by (customer_id, key)');
SELECT col_is_unique('market', 'order_groups', 'checkout_id'::name, 'one order group per checkout');
SELECT col_type_is('market', 'skus', 'id', 'bigint', 'skus.id is bigint');
SELECT col_type_is('market', 'warehouses', 'id', 'integer', 'warehouses.id is integer');
SELECT col_type_is('market', 'reservations', 'id', 'uuid', 'reservations.id is uuid');
SELECT col_type_is('market', 'skus', 'price_minor', 'bigint', 'skus.price_minor is bigint');
SELECT col_type_is('market', 'stock_slots', 'on_hand', 'bigint', 'stock_slots.on_hand is bigint');
SELECT col_type_is('market', 'stock_slots', 'free', 'bigint', 'stock_slots.free is bigint');
SELECT col_type_is('market', 'stock_ledger', 'delta', 'bigint', 'stock_ledger.delta is bigint');
SELECT col_type_is('market', 'stock_levels', 'on_hand', 'bigint', 'stock_levels.on_hand is bigint');
SELECT col_type_is('market', 'stock_levels', 'held', 'bigint', 'stock_levels.held is bigint');
SELECT col_type_is('market', 'stock_levels', 'free', 'bigint', 'stock_levels.free is bigint');
SELECT col_is_pk('market', 'stock', ARRAY['sku_id', 'warehouse_id']::name[], 'stock is keyed by (sku_id, warehouse_id)');
SELECT col_is_pk('market', 'stock_slots', ARRAY['sku_id', 'warehouse_id', 'slot']::name[], 'stock_slots is keyed by (sku_id, warehouse_id, slot)');
SELECT col_is_pk('market', 'reservations', 'id'::name, 'reservations are keyed by id');
SELECT col_is_unique('market', 'skus', 'sku_code'::name, 'sku codes are unique');
SELECT col_is_unique('market', 'warehouses', 'code'::name, 'warehouse codes are unique');
-- the ledger is append-only
SELECT trigger_is('market', 'stock_ledger', 'stock_ledger_append_only', 'market', 'ledger_append_only');
SELECT trigger_is('market', 'stock_ledger', 'stock_ledger_no_truncate', 'market', 'ledger_append_only');
-- the order state machine is enforced on the table
SELECT trigger_is('market', 'orders', 'orders_guard', 'market', 'order_guard');
SELECT trigger_is('market', 'orders', 'orders_created', 'market', 'order_effects_set');
SELECT trigger_is('market', 'orders', 'orders_transition', 'market', 'order_effects_set');
-- the order tables' references (0.5: triggers, not foreign keys)
SELECT trigger_is('market', t, t || '_references', 'market', 'references_check')
  FROM unnest(ARRAY['orders', 'order_lines', 'order_events', 'payments']) AS t;
SELECT trigger_is('market', t, t || '_referenced', 'market', 'references_guard')
  FROM unnest(ARRAY['order_groups', 'orders', 'sellers', 'skus', 'warehouses']) AS t;

-- ---------------------------------------------------------------------------
-- functions: exactly these, with the documented signatures
-- ---------------------------------------------------------------------------
SELECT functions_are('market', ARRAY['seller_create', 'product_create', 'sku_create', 'warehouse_create',
	'stock_set', 'stock_adjust', 'available', 'reserve', 'reservation_extend', 'reservation_release',
	'reservation_commit', 'expire_reservations', 'worker_status', 'verify_inventory', 'ledger_append_only',
	'order_transition', 'order_transitions', 'order_view', 'order_guard', 'order_effects_set',
	'order_transition_many', 'references_check', 'references_guard', 'verify_references',
	'outbox_claim', 'outbox_ack', 'outbox_fail', 'outbox_retry', 'outbox_cleanup', 'outbox_status',
	'outbox_notifier', 'outbox_wake', 'batch_status',
	'cart_create', 'cart_set_item', 'cart_view', 'checkout_begin', 'checkout_complete', 'buy_now',
	'idempotency_purge',
	'psp_register', 'psp_set_enabled', 'payment_view', 'psp_status', 'psp_breakers', 'psp_claim',
	'psp_record', 'psp_plan', 'psp_backoff', 'psp_reschedule', 'psp_dead', 'psp_orders_to',
	'psp_queue_reconcile', 'psp_webhook', 'psp_hmac_verify',
	'psp_webhook_settle', 'psp_webhook_reconcile', 'psp_webhook_apply', 'psp_webhook_retry_deferred',
	'psp_webhook_record', 'psp_webhook_retry']);
SELECT columns_are('market', 'psp_accounts', ARRAY['id', 'name', 'kind', 'base_url', 'credentials',
	'priority', 'options', 'enabled', 'created_at']);

-- payments (docs/payments.md)
SELECT has_function('market', 'psp_register', ARRAY['text', 'text', 'text', 'jsonb', 'integer', 'jsonb']);
SELECT has_function('market', 'psp_set_enabled', ARRAY['text', 'boolean']);
SELECT has_function('market', 'payment_view', ARRAY['bigint']);
SELECT has_function('market', 'psp_status', '{}'::name[]);
SELECT function_returns('market', 'psp_register', ARRAY['text', 'text', 'text', 'jsonb', 'integer', 'jsonb'], 'integer');
SELECT function_returns('market', 'psp_set_enabled', ARRAY['text', 'boolean'], 'void');
SELECT function_returns('market', 'payment_view', ARRAY['bigint'], 'jsonb');
SELECT function_returns('market', 'psp_status', '{}'::name[], 'setof record');
SELECT is(pg_get_function_arguments('market.psp_register(text, text, text, jsonb, integer, jsonb)'::regprocedure),
	'name text, kind text, base_url text, credentials jsonb, priority integer DEFAULT 100, options jsonb DEFAULT ''{}''::jsonb',
	'psp_register arguments');
SELECT is(pg_get_function_arguments('market.payment_view(bigint)'::regprocedure),
	'payment_id bigint', 'payment_view arguments');
SELECT is(pg_get_function_result('market.psp_status()'::regprocedure),
	'TABLE(account text, kind text, priority integer, enabled boolean, breaker text, failures_in_row integer, in_flight integer, calls_5min bigint, success_rate numeric, avg_latency_ms numeric, oldest_pending_job interval, worker_pid integer)',
	'psp_status result columns');

-- webhooks (docs/payments.md, "Webhooks")
SELECT has_function('market', 'psp_webhook', ARRAY['text', 'jsonb', 'text']);
SELECT function_returns('market', 'psp_webhook', ARRAY['text', 'jsonb', 'text'], 'jsonb');
SELECT is(pg_get_function_arguments('market.psp_webhook(text, jsonb, text)'::regprocedure),
	'provider text, headers jsonb, body text', 'psp_webhook arguments');
SELECT columns_are('market', 'psp_webhook_events', ARRAY['id', 'provider', 'event_id', 'event_type',
	'psp_account_id', 'psp_reference', 'payment_id', 'status', 'note', 'received_at',
	'kind', 'merchant_reference', 'operation_reference', 'currency', 'amount_minor', 'authorized_total',
	'captured_total', 'refunded_total', 'decline_code', 'payment_status', 'applied_at']);
SELECT has_function('market', 'psp_webhook_retry', ARRAY['bigint']);
SELECT function_returns('market', 'psp_webhook_retry', ARRAY['bigint'], 'integer');
SELECT is(pg_get_function_arguments('market.psp_webhook_retry(bigint)'::regprocedure),
	'payment_id bigint DEFAULT NULL::bigint', 'psp_webhook_retry arguments');

SELECT has_function('market', 'seller_create', ARRAY['text']);
SELECT has_function('market', 'product_create', ARRAY['bigint', 'text', 'text', 'text', 'text', 'jsonb']);
SELECT has_function('market', 'sku_create', ARRAY['bigint', 'text', 'bigint', 'text', 'jsonb']);
SELECT has_function('market', 'warehouse_create', ARRAY['text', 'text', 'integer']);
SELECT has_function('market', 'stock_set', ARRAY['bigint', 'integer', 'bigint', 'integer']);
SELECT has_function('market', 'stock_adjust', ARRAY['bigint', 'integer', 'bigint', 'text']);
SELECT has_function('market', 'available', ARRAY['bigint', 'integer']);
SELECT has_function('market', 'reserve', ARRAY['jsonb', 'interval', 'text']);
SELECT has_function('market', 'reservation_extend', ARRAY['uuid', 'interval']);
SELECT has_function('market', 'reservation_release', ARRAY['uuid']);
SELECT has_function('market', 'reservation_commit', ARRAY['uuid']);
SELECT has_function('market', 'expire_reservations', ARRAY['integer']);
SELECT has_function('market', 'worker_status', '{}'::name[]);
SELECT has_function('market', 'batch_status', '{}'::name[]);
SELECT has_function('market', 'verify_inventory', '{}'::name[]);
SELECT has_function('market', 'order_transition', ARRAY['bigint', 'text', 'text']);
SELECT has_function('market', 'order_transitions', '{}'::name[]);
SELECT has_function('market', 'order_transition_many', ARRAY['bigint[]', 'text', 'text[]']);
SELECT has_function('market', 'order_view', ARRAY['bigint']);

-- the outbox (docs/outbox.md)
SELECT has_function('market', 'outbox_claim', ARRAY['text', 'integer', 'text', 'interval']);
SELECT has_function('market', 'outbox_ack', ARRAY['bigint[]', 'text']);
SELECT has_function('market', 'outbox_fail', ARRAY['bigint', 'text', 'text', 'interval']);
SELECT has_function('market', 'outbox_retry', ARRAY['bigint']);
SELECT has_function('market', 'outbox_cleanup', ARRAY['integer']);
SELECT has_function('market', 'outbox_status', '{}'::name[]);
SELECT has_function('market', 'outbox_notifier', '{}'::name[]);
SELECT has_function('market', 'outbox_wake', '{}'::name[]);
SELECT has_type('market', 'outbox_message', 'outbox_claim returns rows of type market.outbox_message');
SELECT trigger_is('market', 'outbox', 'outbox_wake', 'market', 'outbox_wake');
SELECT has_function('market', 'cart_create', ARRAY['text', 'text']);
SELECT has_function('market', 'cart_set_item', ARRAY['uuid', 'bigint', 'integer']);
SELECT has_function('market', 'cart_view', ARRAY['uuid']);
SELECT has_function('market', 'checkout_begin', ARRAY['uuid', 'interval']);
SELECT has_function('market', 'checkout_complete', ARRAY['uuid', 'text', 'jsonb', 'text']);
SELECT has_function('market', 'buy_now', ARRAY['text', 'jsonb', 'text', 'jsonb', 'text']);
SELECT has_function('market', 'idempotency_purge', ARRAY['integer']);

SELECT function_returns('market', 'seller_create', ARRAY['text'], 'bigint');
SELECT function_returns('market', 'product_create', ARRAY['bigint', 'text', 'text', 'text', 'text', 'jsonb'], 'bigint');
SELECT function_returns('market', 'sku_create', ARRAY['bigint', 'text', 'bigint', 'text', 'jsonb'], 'bigint');
SELECT function_returns('market', 'warehouse_create', ARRAY['text', 'text', 'integer'], 'integer');
SELECT function_returns('market', 'stock_set', ARRAY['bigint', 'integer', 'bigint', 'integer'], 'bigint');
SELECT function_returns('market', 'stock_adjust', ARRAY['bigint', 'integer', 'bigint', 'text'], 'bigint');
SELECT function_returns('market', 'available', ARRAY['bigint', 'integer'], 'bigint');
SELECT function_returns('market', 'reserve', ARRAY['jsonb', 'interval', 'text'], 'uuid');
SELECT function_returns('market', 'reservation_extend', ARRAY['uuid', 'interval'], 'timestamp with time zone');
SELECT function_returns('market', 'reservation_release', ARRAY['uuid'], 'boolean');
SELECT function_returns('market', 'reservation_commit', ARRAY['uuid'], 'bigint');
SELECT function_returns('market', 'expire_reservations', ARRAY['integer'], 'integer');
SELECT function_returns('market', 'worker_status', '{}'::name[], 'record');
SELECT function_returns('market', 'batch_status', '{}'::name[], 'record');
SELECT function_returns('market', 'verify_inventory', '{}'::name[], 'setof record');
SELECT function_returns('market', 'order_transition', ARRAY['bigint', 'text', 'text'], 'text');
SELECT function_returns('market', 'order_transitions', '{}'::name[], 'setof record');
SELECT function_returns('market', 'order_transition_many', ARRAY['bigint[]', 'text', 'text[]'], 'integer');
SELECT function_returns('market', 'order_view', ARRAY['bigint'], 'jsonb');

SELECT function_returns('market', 'outbox_claim', ARRAY['text', 'integer', 'text', 'interval'], 'setof market.outbox_message');
SELECT function_returns('market', 'outbox_ack', ARRAY['bigint[]', 'text'], 'integer');
SELECT function_returns('market', 'outbox_fail', ARRAY['bigint', 'text', 'text', 'interval'], 'text');
SELECT function_returns('market', 'outbox_retry', ARRAY['bigint'], 'void');
SELECT function_returns('market', 'outbox_cleanup', ARRAY['integer'], 'bigint');
SELECT function_returns('market', 'outbox_status', '{}'::name[], 'setof record');
SELECT function_returns('market', 'outbox_notifier', '{}'::name[], 'setof record');
SELECT function_returns('market', 'outbox_wake', '{}'::name[], 'trigger');
SELECT function_returns('market', 'cart_create', ARRAY['text', 'text'], 'uuid');
SELECT function_returns('market', 'cart_set_item', ARRAY['uuid', 'bigint', 'integer'], 'integer');
SELECT function_returns('market', 'cart_view', ARRAY['uuid'], 'jsonb');
SELECT function_returns('market', 'checkout_begin', ARRAY['uuid', 'interval'], 'uuid');
SELECT function_returns('market', 'checkout_complete', ARRAY['uuid', 'text', 'jsonb', 'text'], 'jsonb');
SELECT function_returns('market', 'buy_now', ARRAY['text', 'jsonb', 'text', 'jsonb', 'text'], 'jsonb');
SELECT function_returns('market', 'idempotency_purge', ARRAY['integer'], 'bigint');

-- argument names and defaults, so that named notation works as documented
SELECT is(pg_get_function_arguments('market.seller_create(text)'::regprocedure),
	'name text', 'seller_create arguments');
SELECT is(pg_get_function_arguments('market.product_create(bigint, text, text, text, text, jsonb)'::regprocedure),
	'seller_id bigint, title text, description text DEFAULT ''''::text, brand text DEFAULT NULL::text, category text DEFAULT NULL::text, attributes jsonb DEFAULT ''{}''::jsonb',
	'product_create arguments');
SELECT is(pg_get_function_arguments('market.sku_create(bigint, text, bigint, text, jsonb)'::regprocedure),
	'product_id bigint, sku_code text, price_minor bigint, currency text, attributes jsonb DEFAULT ''{}''::jsonb',
	'sku_create arguments');
SELECT is(pg_get_function_arguments('market.warehouse_create(text, text, integer)'::regprocedure),
	'code text, name text, priority integer DEFAULT 100', 'warehouse_create arguments');
SELECT is(pg_get_function_arguments('market.stock_set(bigint, integer, bigint, integer)'::regprocedure),
	'sku_id bigint, warehouse_id integer, on_hand bigint, slots integer DEFAULT NULL::integer',
	'stock_set arguments');
SELECT is(pg_get_function_arguments('market.stock_adjust(bigint, integer, bigint, text)'::regprocedure),
	'sku_id bigint, warehouse_id integer, delta bigint, reason text', 'stock_adjust arguments');
SELECT is(pg_get_function_arguments('market.available(bigint, integer)'::regprocedure),
	'sku_id bigint, warehouse_id integer DEFAULT NULL::integer', 'available arguments');
SELECT is(pg_get_function_arguments('market.reserve(jsonb, interval, text)'::regprocedure),
	'items jsonb, ttl interval DEFAULT NULL::interval, owner text DEFAULT NULL::text', 'reserve arguments');
SELECT is(pg_get_function_arguments('market.reservation_extend(uuid, interval)'::regprocedure),
	'reservation uuid, ttl interval', 'reservation_extend arguments');
SELECT is(pg_get_function_arguments('market.reservation_release(uuid)'::regprocedure),
	'reservation uuid', 'reservation_release arguments');
SELECT is(pg_get_function_arguments('market.reservation_commit(uuid)'::regprocedure),
	'reservation uuid', 'reservation_commit arguments');
SELECT is(pg_get_function_arguments('market.expire_reservations(integer)'::regprocedure),
	'max_reservations integer DEFAULT 1000', 'expire_reservations arguments');
SELECT is(pg_get_function_arguments('market.worker_status()'::regprocedure),
	'OUT running boolean, OUT pid integer, OUT database text, OUT expired_total bigint, OUT purged_total bigint, OUT last_run timestamp with time zone, OUT next_wakeup timestamp with time zone',
	'worker_status result columns');
SELECT is(pg_get_function_result('market.verify_inventory()'::regprocedure),
	'TABLE(invariant text, sku_id bigint, warehouse_id integer, detail text)', 'verify_inventory result columns');
SELECT is(pg_get_function_arguments('market.order_transition(bigint, text, text)'::regprocedure),
	'order_id bigint, to_state text, note text DEFAULT NULL::text', 'order_transition arguments');
SELECT is(pg_get_function_arguments('market.order_transition_many(bigint[], text, text[])'::regprocedure),
	'order_ids bigint[], to_state text, notes text[] DEFAULT NULL::text[]', 'order_transition_many arguments');
SELECT is(pg_get_function_arguments('market.order_view(bigint)'::regprocedure),
	'order_id bigint', 'order_view arguments');
SELECT is(pg_get_function_result('market.order_transitions()'::regprocedure),
	'TABLE(from_status text, to_status text)', 'order_transitions result columns');

SELECT is(pg_get_function_arguments('market.outbox_claim(text, integer, text, interval)'::regprocedure),
	'consumer text, max integer DEFAULT 100, topic text DEFAULT ''events''::text, lease interval DEFAULT NULL::interval',
	'outbox_claim arguments');
SELECT is(pg_get_function_arguments('market.outbox_ack(bigint[], text)'::regprocedure),
	'ids bigint[], consumer text DEFAULT NULL::text', 'outbox_ack arguments');
SELECT is(pg_get_function_arguments('market.outbox_fail(bigint, text, text, interval)'::regprocedure),
	'id bigint, error text, consumer text DEFAULT NULL::text, retry_after interval DEFAULT NULL::interval',
	'outbox_fail arguments');
SELECT is(pg_get_function_arguments('market.outbox_retry(bigint)'::regprocedure),
	'id bigint', 'outbox_retry arguments');
SELECT is(pg_get_function_arguments('market.outbox_cleanup(integer)'::regprocedure),
	'max integer DEFAULT 10000', 'outbox_cleanup arguments');
SELECT is(pg_get_function_result('market.outbox_status()'::regprocedure),
	'TABLE(topic text, pending bigint, leased bigint, dead bigint, oldest_pending_age interval, notifier_pid integer, last_notify timestamp with time zone, notifies bigint, last_cleanup timestamp with time zone)',
	'outbox_status result columns');
SELECT is(pg_get_function_arguments('market.outbox_notifier()'::regprocedure),
	'OUT topic text, OUT pid integer, OUT notifies bigint, OUT last_notify timestamp with time zone, OUT last_cleanup timestamp with time zone, OUT cleaned_total bigint',
	'outbox_notifier result columns');
SELECT is(pg_get_function_arguments('market.cart_create(text, text)'::regprocedure),
	'customer_id text, currency text DEFAULT ''USD''::text', 'cart_create arguments');
SELECT is(pg_get_function_arguments('market.cart_set_item(uuid, bigint, integer)'::regprocedure),
	'cart uuid, sku_id bigint, qty integer', 'cart_set_item arguments');
SELECT is(pg_get_function_arguments('market.cart_view(uuid)'::regprocedure),
	'cart uuid', 'cart_view arguments');
SELECT is(pg_get_function_arguments('market.checkout_begin(uuid, interval)'::regprocedure),
	'cart uuid, ttl interval DEFAULT NULL::interval', 'checkout_begin arguments');
SELECT is(pg_get_function_arguments('market.checkout_complete(uuid, text, jsonb, text)'::regprocedure),
	'checkout uuid, idempotency_key text, payment jsonb DEFAULT ''{}''::jsonb, customer_id text DEFAULT NULL::text',
	'checkout_complete arguments');
SELECT is(pg_get_function_arguments('market.buy_now(text, jsonb, text, jsonb, text)'::regprocedure),
	'customer_id text, items jsonb, idempotency_key text, payment jsonb DEFAULT ''{}''::jsonb, currency text DEFAULT ''USD''::text',
	'buy_now arguments');
SELECT is(pg_get_function_arguments('market.idempotency_purge(integer)'::regprocedure),
	'max integer DEFAULT 10000', 'idempotency_purge arguments');

-- every documented function is SECURITY DEFINER, not STRICT, and pins
-- search_path = pg_catalog, pg_temp
SELECT is_definer('market', 'seller_create', ARRAY['text']);
SELECT is_definer('market', 'product_create', ARRAY['bigint', 'text', 'text', 'text', 'text', 'jsonb']);
SELECT is_definer('market', 'sku_create', ARRAY['bigint', 'text', 'bigint', 'text', 'jsonb']);
SELECT is_definer('market', 'warehouse_create', ARRAY['text', 'text', 'integer']);
SELECT is_definer('market', 'stock_set', ARRAY['bigint', 'integer', 'bigint', 'integer']);
SELECT is_definer('market', 'stock_adjust', ARRAY['bigint', 'integer', 'bigint', 'text']);
SELECT is_definer('market', 'available', ARRAY['bigint', 'integer']);
SELECT is_definer('market', 'reserve', ARRAY['jsonb', 'interval', 'text']);
SELECT is_definer('market', 'reservation_extend', ARRAY['uuid', 'interval']);
SELECT is_definer('market', 'reservation_release', ARRAY['uuid']);
SELECT is_definer('market', 'reservation_commit', ARRAY['uuid']);
SELECT is_definer('market', 'expire_reservations', ARRAY['integer']);
SELECT is_definer('market', 'worker_status', '{}'::name[]);
SELECT is_definer('market', 'batch_status', '{}'::name[]);
SELECT is_definer('market', 'verify_inventory', '{}'::name[]);
SELECT is_definer('market', 'cart_create', ARRAY['text', 'text']);
SELECT is_definer('market', 'cart_set_item', ARRAY['uuid', 'bigint', 'integer']);
SELECT is_definer('market', 'cart_view', ARRAY['uuid']);
SELECT is_definer('market', 'checkout_begin', ARRAY['uuid', 'interval']);
SELECT is_definer('market', 'checkout_complete', ARRAY['uuid', 'text', 'jsonb', 'text']);
SELECT is_definer('market', 'buy_now', ARRAY['text', 'jsonb', 'text', 'jsonb', 'text']);
SELECT is_definer('market', 'idempotency_purge', ARRAY['integer']);
SELECT isnt_definer('market', 'ledger_append_only', '{}'::name[]);
SELECT isnt_definer('market', 'references_check', '{}'::name[]);
SELECT isnt_definer('market', 'references_guard', '{}'::name[]);
SELECT is_definer('market', 'verify_references', '{}'::name[]);
SELECT is(pg_get_function_result('market.verify_references()'::regprocedure),
	'TABLE(table_name text, column_name text, missing_key bigint, rows_referring bigint)',
	'verify_references result columns');
SELECT is_definer('market', 'order_transition', ARRAY['bigint', 'text', 'text']);
SELECT is_definer('market', 'order_transitions', '{}'::name[]);
SELECT is_definer('market', 'order_view', ARRAY['bigint']);
-- the order triggers write history, outbox and stock whoever fires them
SELECT is_definer('market', 'order_guard', '{}'::name[]);
SELECT is_definer('market', 'order_effects_set', '{}'::name[]);
SELECT is_definer('market', 'order_transition_many', ARRAY['bigint[]', 'text', 'text[]']);
SELECT is_definer('market', 'outbox_claim', ARRAY['text', 'integer', 'text', 'interval']);
SELECT is_definer('market', 'outbox_ack', ARRAY['bigint[]', 'text']);
SELECT is_definer('market', 'outbox_fail', ARRAY['bigint', 'text', 'text', 'interval']);
SELECT is_definer('market', 'outbox_retry', ARRAY['bigint']);
SELECT is_definer('market', 'outbox_cleanup', ARRAY['integer']);
SELECT is_definer('market', 'outbox_status', '{}'::name[]);
SELECT is_definer('market', 'outbox_notifier', '{}'::name[]);
SELECT isnt_definer('market', 'outbox_wake', '{}'::name[]);
SELECT is_definer('market', 'psp_register', ARRAY['text', 'text', 'text', 'jsonb', 'integer', 'jsonb']);
SELECT is_definer('market', 'psp_set_enabled', ARRAY['text', 'boolean']);
SELECT is_definer('market', 'payment_view', ARRAY['bigint']);
SELECT is_definer('market', 'psp_status', '{}'::name[]);
SELECT is_definer('market', 'psp_breakers', '{}'::name[]);
SELECT is_definer('market', 'psp_claim', ARRAY['text', 'integer', 'integer[]', 'integer[]', 'interval']);
SELECT is_definer('market', 'psp_record', ARRAY['text', 'jsonb']);
SELECT is_definer('market', 'psp_plan', ARRAY['market.outbox_message', 'text', 'integer[]']);
SELECT is_definer('market', 'psp_backoff', ARRAY['integer']);
SELECT is_definer('market', 'psp_reschedule', ARRAY['bigint', 'interval', 'text']);
SELECT is_definer('market', 'psp_dead', ARRAY['bigint', 'text']);
SELECT is_definer('market', 'psp_orders_to', ARRAY['bigint', 'text', 'text']);
SELECT is_definer('market', 'psp_queue_reconcile', ARRAY['bigint', 'bigint', 'integer']);
SELECT is_definer('market', 'psp_webhook', ARRAY['text', 'jsonb', 'text']);
SELECT is_definer('market', 'psp_webhook_settle', ARRAY['bigint', 'text', 'text', 'text', 'text', 'text']);
SELECT is_definer('market', 'psp_webhook_reconcile', ARRAY['bigint', 'integer', 'integer']);
SELECT is_definer('market', 'psp_webhook_apply', ARRAY['bigint']);
SELECT is_definer('market', 'psp_webhook_retry_deferred', ARRAY['bigint']);
SELECT is_definer('market', 'psp_webhook_record', ARRAY['text', 'text', 'text', 'integer', 'text', 'text', 'text', 'text', 'text', 'bigint', 'bigint', 'bigint', 'bigint', 'text']);
SELECT is_definer('market', 'psp_webhook_retry', ARRAY['bigint']);
SELECT is_definer('market', 'psp_hmac_verify', ARRAY['bytea', 'bytea', 'bytea']);
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p
			WHERE p.pronamespace = 'market'::regnamespace AND p.proisstrict),
		  NULL, 'no market function is STRICT');
-- except the two reference triggers (0.5): C, run per row, no SQL inside,
-- every name they resolve schema-qualified; a SET clause would cost a
-- configuration save and restore per row written
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p
			WHERE p.pronamespace = 'market'::regnamespace
			  AND p.proname NOT IN ('references_check', 'references_guard')
			  AND p.proconfig IS DISTINCT FROM ARRAY['search_path=pg_catalog, pg_temp']),
		  NULL, 'every market function but the reference triggers has exactly search_path = pg_catalog, pg_temp');
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p
			WHERE p.pronamespace = 'market'::regnamespace AND p.proconfig IS NULL),
		  ARRAY['references_check', 'references_guard'], 'the reference triggers set nothing per call');
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p
			WHERE p.pronamespace = 'market'::regnamespace AND p.provolatile = 'i'),
		  NULL, 'no market function claims to be IMMUTABLE');
SELECT is((SELECT array_agg(p.proname::text ORDER BY p.proname) FROM pg_proc p
			WHERE p.pronamespace = 'market'::regnamespace AND p.provolatile = 's'),
		  ARRAY['available', 'cart_view', 'order_transitions', 'order_view', 'payment_view', 'verify_inventory',
				'verify_references'],
		  'only the read-only functions are STABLE');
SELECT is((SELECT count(*)::int FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
			WHERE p.pronamespace = 'market'::regnamespace AND NOT r.rolsuper),
		  0, 'every market function is owned by the (superuser) extension owner');

-- ---------------------------------------------------------------------------
-- behaviour at the edges: every documented SQLSTATE
-- ---------------------------------------------------------------------------
SELECT market.seller_create('TAP Seller') AS seller \gset
SELECT market.product_create(:seller, 'TAP product') AS product \gset
SELECT market.sku_create(:product, 'TAP-A', 1000, 'EUR') AS sku \gset
SELECT market.sku_create(:product, 'TAP-B', 1000, 'EUR') AS sku_b \gset
SELECT market.warehouse_create('tap-w1', 'TAP W1') AS wh \gset

SELECT is(market.available(:sku), 0::bigint, 'a SKU without stock has 0 available');
SELECT is(market.stock_set(:sku, :wh, 10), 10::bigint, 'stock_set returns the new on-hand');
SELECT is(market.stock_adjust(:sku, :wh, 2, 'found'), 12::bigint, 'stock_adjust returns the new on-hand');
SELECT is(market.available(:sku), 12::bigint, 'available over all warehouses');
SELECT is(market.available(:sku, :wh), 12::bigint, 'available in one warehouse');
SELECT results_eq(format('SELECT kind, delta, reason FROM market.stock_ledger WHERE sku_id = %s ORDER BY id', :sku),
	$$VALUES ('set'::text, 10::bigint, NULL::text), ('adjust', 2, 'found')$$,
	'stock_set and stock_adjust append to the ledger');

SELECT market.reserve(format('[{"sku_id": %s, "qty": 4}]', :sku)::jsonb, '10 min', 'tap-cart') AS r \gset
SELECT isnt(:'r'::uuid, NULL, 'reserve returns a reservation id');
SELECT is(market.available(:sku), 8::bigint, 'reserve lowers available');
SELECT is((SELECT status FROM market.reservations WHERE id = :'r'), 'held', 'a new reservation is held');
SELECT is((SELECT sum(qty)::bigint FROM market.reservation_lines WHERE reservation_id = :'r'), 4::bigint,
	'reservation_lines shows what was reserved');
SELECT ok(market.reservation_extend(:'r', '1 hour') > now() + interval '59 min', 'reservation_extend returns the new expiry');
SELECT is(market.reservation_commit(:'r'), 4::bigint, 'reservation_commit returns the units sold');
SELECT is((SELECT on_hand FROM market.stock_levels WHERE sku_id = :sku), 8::bigint, 'the sale lowered on-hand');
SELECT results_eq(format('SELECT kind, delta FROM market.stock_ledger WHERE reservation_id = %L', :'r'),
	$$VALUES ('sale'::text, -4::bigint)$$, 'the sale is one ledger row');
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :sku)::jsonb) AS r2 \gset
SELECT is(market.reservation_release(:'r2'), true, 'reservation_release answers true');
SELECT is(market.reservation_release(:'r2'), false, 'releasing again answers false');
SELECT is(market.available(:sku), 8::bigint, 'the released unit is available again');
SELECT is(market.expire_reservations(), 0, 'nothing to expire');
SELECT is_empty('SELECT * FROM market.verify_inventory()', 'verify_inventory finds nothing');
SELECT market.reserve(format('[{"sku_id": %s, "qty": 5}]', :sku)::jsonb) AS live \gset

-- MK001 insufficient stock
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 4}]'')', :sku),
	'MK001', NULL, 'reserve: more than available raises MK001');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1}]'')', :sku_b),
	'MK001', NULL, 'reserve: a SKU without stock raises MK001');
-- MK002 reservation not live
SELECT throws_ok(format('SELECT market.reservation_extend(%L, ''1 min'')', gen_random_uuid()),
	'MK002', NULL, 'reservation_extend: unknown reservation raises MK002');
SELECT throws_ok(format('SELECT market.reservation_release(%L)', gen_random_uuid()),
	'MK002', NULL, 'reservation_release: unknown reservation raises MK002');
SELECT throws_ok(format('SELECT market.reservation_commit(%L)', gen_random_uuid()),
	'MK002', NULL, 'reservation_commit: unknown reservation raises MK002');
SELECT throws_ok(format('SELECT market.reservation_commit(%L)', :'r'),
	'MK002', NULL, 'reservation_commit: a committed reservation raises MK002');
SELECT throws_ok(format('SELECT market.reservation_release(%L)', :'r'),
	'MK002', NULL, 'reservation_release: a committed reservation raises MK002');
SELECT throws_ok(format('SELECT market.reservation_commit(%L)', :'r2'),
	'MK002', NULL, 'reservation_commit: a released reservation raises MK002');
SELECT throws_ok(format('SELECT market.reservation_extend(%L, ''1 min'')', :'r2'),
	'MK002', NULL, 'reservation_extend: a released reservation raises MK002');
-- MK010 unknown sku
SELECT throws_ok(format('SELECT market.stock_set(999999999, %s, 1)', :wh),
	'MK010', NULL, 'stock_set: unknown SKU raises MK010');
SELECT throws_ok(format('SELECT market.stock_adjust(999999999, %s, 1, ''x'')', :wh),
	'MK010', NULL, 'stock_adjust: unknown SKU raises MK010');
SELECT throws_ok('SELECT market.available(999999999)',
	'MK010', NULL, 'available: unknown SKU raises MK010');
SELECT throws_ok('SELECT market.reserve(''[{"sku_id": 999999999, "qty": 1}]'')',
	'MK010', NULL, 'reserve: unknown SKU raises MK010');
-- MK011 unknown warehouse
SELECT throws_ok(format('SELECT market.stock_set(%s, 999999, 1)', :sku),
	'MK011', NULL, 'stock_set: unknown warehouse raises MK011');
SELECT throws_ok(format('SELECT market.stock_adjust(%s, 999999, 1, ''x'')', :sku),
	'MK011', NULL, 'stock_adjust: unknown warehouse raises MK011');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1, "warehouse_id": 999999}]'')', :sku),
	'MK011', NULL, 'reserve: unknown warehouse raises MK011');
-- MK012 unknown product, MK013 unknown seller, MK014 duplicate code
SELECT throws_ok('SELECT market.sku_create(999999999, ''TAP-X'', 1, ''EUR'')',
	'MK012', NULL, 'sku_create: unknown product raises MK012');
SELECT throws_ok('SELECT market.product_create(999999999, ''Ghost'')',
	'MK013', NULL, 'product_create: unknown seller raises MK013');
SELECT throws_ok(format('SELECT market.sku_create(%s, ''TAP-A'', 1, ''EUR'')', :product),
	'MK014', NULL, 'sku_create: duplicate code raises MK014');
SELECT throws_ok('SELECT market.warehouse_create(''tap-w1'', ''Again'')',
	'MK014', NULL, 'warehouse_create: duplicate code raises MK014');
-- MK020 invalid argument
SELECT throws_ok('SELECT market.seller_create(NULL)', 'MK020', NULL, 'seller_create: NULL name raises MK020');
SELECT throws_ok('SELECT market.seller_create(''  '')', 'MK020', NULL, 'seller_create: blank name raises MK020');
SELECT throws_ok(format('SELECT market.product_create(%s, '''')', :seller),
	'MK020', NULL, 'product_create: blank title raises MK020');
SELECT throws_ok(format('SELECT market.product_create(%s, ''T'', '''', NULL, ''Bad Category'')', :seller),
	'MK020', NULL, 'product_create: a category that is not a lower-case path raises MK020');
SELECT throws_ok(format('SELECT market.sku_create(%s, ''TAP-NEG'', -1, ''EUR'')', :product),
	'MK020', NULL, 'sku_create: negative price raises MK020');
SELECT throws_ok('SELECT market.warehouse_create(''tap-w9'', '''')', 'MK020', NULL, 'warehouse_create: blank name raises MK020');
SELECT throws_ok('SELECT market.reserve(NULL)', 'MK020', NULL, 'reserve: NULL items raises MK020');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 0}]'')', :sku),
	'MK020', NULL, 'reserve: qty 0 raises MK020');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": -3}]'')', :sku),
	'MK020', NULL, 'reserve: negative qty raises MK020');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": %s}]'')', :sku,
		current_setting('market.max_line_qty')::bigint + 1),
	'MK020', NULL, 'reserve: qty above market.max_line_qty raises MK020');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1}]'', NULL, repeat(''o'', 201))', :sku),
	'MK020', NULL, 'reserve: owner over 200 characters raises MK020');
SELECT throws_ok(format('SELECT market.stock_set(NULL, %s, 1)', :wh), 'MK020', NULL, 'stock_set: NULL sku_id raises MK020');
SELECT throws_ok(format('SELECT market.stock_set(%s, %s, NULL)', :sku, :wh), 'MK020', NULL, 'stock_set: NULL on_hand raises MK020');
SELECT throws_ok(format('SELECT market.stock_set(%s, %s, 1000000000001)', :sku, :wh),
	'MK020', NULL, 'stock_set: on-hand above 10^12 raises MK020');
SELECT throws_ok(format('SELECT market.stock_set(%s, %s, 10, 1025)', :sku, :wh),
	'MK020', NULL, 'stock_set: 1025 slots raises MK020');
SELECT throws_ok(format('SELECT market.stock_adjust(%s, %s, 0, ''zero'')', :sku, :wh),
	'MK020', NULL, 'stock_adjust: delta 0 raises MK020');
SELECT throws_ok(format('SELECT market.stock_adjust(%s, %s, 1, '' '')', :sku, :wh),
	'MK020', NULL, 'stock_adjust: blank reason raises MK020');
SELECT throws_ok('SELECT market.available(NULL)', 'MK020', NULL, 'available: NULL sku_id raises MK020');
SELECT throws_ok('SELECT market.reservation_release(NULL)', 'MK020', NULL, 'reservation_release: NULL raises MK020');
SELECT throws_ok('SELECT market.reservation_commit(NULL)', 'MK020', NULL, 'reservation_commit: NULL raises MK020');
SELECT throws_ok('SELECT market.reservation_extend(NULL, ''1 min'')', 'MK020', NULL, 'reservation_extend: NULL reservation raises MK020');
SELECT throws_ok('SELECT market.expire_reservations(NULL)', 'MK020', NULL, 'expire_reservations: NULL raises MK020');
-- MK021 malformed document
SELECT throws_ok('SELECT market.reserve(''[]'')', 'MK021', NULL, 'reserve: an empty array raises MK021');
SELECT throws_ok(format('SELECT market.reserve(''{"sku_id": %s, "qty": 1}'')', :sku),
	'MK021', NULL, 'reserve: an object instead of an array raises MK021');
SELECT throws_ok('SELECT market.reserve(''[5]'')', 'MK021', NULL, 'reserve: an element that is not an object raises MK021');
SELECT throws_ok('SELECT market.reserve(''[{"qty": 1}]'')', 'MK021', NULL, 'reserve: a missing sku_id raises MK021');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1.5}]'')', :sku),
	'MK021', NULL, 'reserve: a fractional qty raises MK021');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": "2"}]'')', :sku),
	'MK021', NULL, 'reserve: a string qty raises MK021');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1, "size": "L"}]'')', :sku),
	'MK021', NULL, 'reserve: an unknown key raises MK021');
SELECT throws_ok(format('SELECT market.product_create(%s, ''T'', '''', NULL, NULL, ''[]'')', :seller),
	'MK021', NULL, 'product_create: attributes that are not an object raise MK021');
SELECT throws_ok(format('SELECT market.sku_create(%s, ''TAP-ATTR'', 1, ''EUR'', ''"x"'')', :product),
	'MK021', NULL, 'sku_create: attributes that are not an object raise MK021');
-- 22P02: not JSON at all
SELECT throws_ok('SELECT market.reserve(''this is not json'')', '22P02', NULL, 'reserve: text that is not JSON raises 22P02');
-- MK022 bad currency
SELECT throws_ok(format('SELECT market.sku_create(%s, ''TAP-CUR'', 1, ''eur'')', :product),
	'MK022', NULL, 'sku_create: lower-case currency raises MK022');
SELECT throws_ok(format('SELECT market.sku_create(%s, ''TAP-CUR'', 1, ''EURO'')', :product),
	'MK022', NULL, 'sku_create: four-letter currency raises MK022');
-- MK023 ttl out of range
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1}]'', ''0 s'')', :sku),
	'MK023', NULL, 'reserve: ttl 0 raises MK023');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1}]'', ''25 hours'')', :sku),
	'MK023', NULL, 'reserve: ttl 25 h raises MK023');
SELECT throws_ok(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 1}]'', ''-1 min'')', :sku),
	'MK023', NULL, 'reserve: negative ttl raises MK023');
SELECT throws_ok(format('SELECT market.reservation_extend(%L, ''25 hours'')', :'live'),
	'MK023', NULL, 'reservation_extend: ttl 25 h raises MK023');
-- MK024 below reserved (5 held by the live reservation, 8 on hand)
SELECT throws_ok(format('SELECT market.stock_set(%s, %s, 4)', :sku, :wh),
	'MK024', NULL, 'stock_set: on-hand below what is reserved raises MK024');
SELECT throws_ok(format('SELECT market.stock_adjust(%s, %s, -4, ''shrink'')', :sku, :wh),
	'MK024', NULL, 'stock_adjust: on-hand below what is reserved raises MK024');
-- MK025 negative
SELECT throws_ok(format('SELECT market.stock_set(%s, %s, -1)', :sku, :wh),
	'MK025', NULL, 'stock_set: negative on-hand raises MK025');
SELECT throws_ok(format('SELECT market.stock_adjust(%s, %s, -1, ''phantom'')', :sku_b, :wh),
	'MK025', NULL, 'stock_adjust: below zero raises MK025');
-- MK030 the ledger is append-only
SELECT throws_ok('UPDATE market.stock_ledger SET delta = delta', 'MK030', NULL, 'UPDATE on the ledger raises MK030');
SELECT throws_ok('DELETE FROM market.stock_ledger', 'MK030', NULL, 'DELETE on the ledger raises MK030');
SELECT throws_ok('TRUNCATE market.stock_ledger', 'MK030', NULL, 'TRUNCATE on the ledger raises MK030');

-- the outbox: claim, ack and its SQLSTATEs (MK020, MK050-MK054)
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id)
VALUES ('events', 'tap.event', 'tap', 1);
SELECT is((SELECT array_agg(event_type) FROM market.outbox_claim('tap-consumer')), ARRAY['tap.event'],
	'outbox_claim hands out the new row');
SELECT is(market.outbox_ack((SELECT array_agg(id) FROM market.outbox WHERE event_type = 'tap.event'), 'tap-consumer'),
	1, 'outbox_ack marks it delivered');
SELECT throws_ok('SELECT * FROM market.outbox_claim(NULL)', 'MK020', NULL, 'outbox_claim: NULL consumer raises MK020');
SELECT throws_ok('SELECT market.outbox_ack(NULL)', 'MK020', NULL, 'outbox_ack: NULL ids raises MK020');
SELECT throws_ok('SELECT * FROM market.outbox_claim(''c'', 10, ''nope'')', 'MK050', NULL,
	'outbox_claim: unknown topic raises MK050');
SELECT throws_ok('SELECT * FROM market.outbox_claim(''c'', 0)', 'MK051', NULL, 'outbox_claim: max 0 raises MK051');
SELECT throws_ok('SELECT * FROM market.outbox_claim(''c'', 10, ''events'', ''2 days'')', 'MK051', NULL,
	'outbox_claim: a lease of 2 days raises MK051');
SELECT throws_ok('SELECT market.outbox_ack(array_fill(1::bigint, ARRAY[10001]))', 'MK051', NULL,
	'outbox_ack: 10001 ids raises MK051');
SELECT throws_ok('SELECT market.outbox_fail(-1, ''x'')', 'MK052', NULL, 'outbox_fail: unknown row raises MK052');
SELECT throws_ok('SELECT market.outbox_retry(-1)', 'MK052', NULL, 'outbox_retry: unknown row raises MK052');
SELECT throws_ok(format('SELECT market.outbox_fail(%s, ''x'', ''tap-consumer'')',
		(SELECT id FROM market.outbox WHERE event_type = 'tap.event')),
	'MK053', NULL, 'outbox_fail: an acked row raises MK053');
SELECT throws_ok(format('SELECT market.outbox_retry(%s)', (SELECT id FROM market.outbox WHERE event_type = 'tap.event')),
	'MK054', NULL, 'outbox_retry: a row that is not dead raises MK054');
-- MK003 illegal order transition, MK017 unknown order (and MK020 for NULLs)
INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
VALUES (gen_random_uuid(), 'tap-customer', 'EUR', 0) RETURNING id AS tap_group \gset
INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
VALUES (:tap_group, :seller, 'tap-customer', 'EUR', 0) RETURNING id AS tap_order \gset
SELECT throws_ok(format('SELECT market.order_transition(%s, ''shipped'')', :tap_order),
	'MK003', NULL, 'order_transition: created -> shipped raises MK003');
SELECT throws_ok('SELECT market.order_transition(-1, ''confirmed'')',
	'MK017', NULL, 'order_transition: unknown order raises MK017');
SELECT throws_ok(format('SELECT market.order_transition_many(ARRAY[%s, -1], ''cancelled'')', :tap_order),
	'MK017', NULL, 'order_transition_many: an unknown order raises MK017');
SELECT throws_ok(format('SELECT market.order_transition_many(ARRAY[%s], ''shipped'')', :tap_order),
	'MK003', NULL, 'order_transition_many: created -> shipped raises MK003');
SELECT throws_ok('SELECT market.order_transition_many(NULL, ''confirmed'')',
	'MK020', NULL, 'order_transition_many: NULL order_ids raises MK020');
SELECT throws_ok(format('SELECT market.order_transition_many(ARRAY[%s], ''cancelled'', ARRAY[''a'', ''b''])', :tap_order),
	'MK020', NULL, 'order_transition_many: notes of another length raise MK020');
SELECT throws_ok('SELECT market.order_view(-1)', 'MK017', NULL, 'order_view: unknown order raises MK017');
SELECT throws_ok('SELECT market.order_transition(NULL, ''confirmed'')',
	'MK020', NULL, 'order_transition: NULL order_id raises MK020');
SELECT throws_ok('SELECT market.order_view(NULL)', 'MK020', NULL, 'order_view: NULL order_id raises MK020');

-- none of the failures above changed anything
SELECT is(market.available(:sku), 3::bigint, 'available is unchanged by the failed calls');
SELECT is((SELECT count(*)::int FROM market.stock_ledger WHERE sku_id = :sku), 3, 'the ledger is unchanged by the failed calls');
SELECT is(market.reservation_release(:'live'), true, 'the live reservation is still live');
SELECT is_empty('SELECT * FROM market.verify_inventory()', 'verify_inventory still finds nothing');

-- ---------------------------------------------------------------------------
-- carts and checkout (docs/checkout.md): every SQLSTATE they document
-- ---------------------------------------------------------------------------
SELECT market.sku_create(:product, 'TAP-C', 700, 'EUR') AS sku_c \gset
SELECT market.sku_create(:product, 'TAP-U', 100, 'USD') AS sku_u \gset
SELECT market.stock_set(:sku_c, :wh, 10) AS c_on_hand \gset
SELECT market.cart_create('tap-customer', 'EUR') AS cart \gset
SELECT is((SELECT currency FROM market.carts WHERE id = :'cart'), 'EUR', 'cart_create makes a cart in its currency');
SELECT throws_ok('SELECT market.cart_create(NULL)', 'MK020', NULL, 'cart_create: NULL customer raises MK020');
SELECT throws_ok('SELECT market.cart_create(''c'', ''eur'')', 'MK022', NULL, 'cart_create: a bad currency raises MK022');
SELECT throws_ok(format('SELECT market.cart_set_item(%L, %s, 1)', gen_random_uuid(), :sku_c),
	'MK015', NULL, 'cart_set_item: unknown cart raises MK015');
SELECT throws_ok(format('SELECT market.cart_set_item(%L, 999999999, 1)', :'cart'),
	'MK010', NULL, 'cart_set_item: unknown SKU raises MK010');
SELECT throws_ok(format('SELECT market.cart_set_item(%L, %s, 1)', :'cart', :sku_u),
	'MK026', NULL, 'cart_set_item: a SKU in another currency raises MK026');
SELECT throws_ok(format('SELECT market.cart_set_item(%L, %s, -1)', :'cart', :sku_c),
	'MK020', NULL, 'cart_set_item: a negative quantity raises MK020');
SELECT throws_ok(format('SELECT market.cart_view(%L)', gen_random_uuid()),
	'MK015', NULL, 'cart_view: unknown cart raises MK015');
SELECT throws_ok(format('SELECT market.checkout_begin(%L)', :'cart'), 'MK027', NULL, 'checkout_begin: empty cart raises MK027');
SELECT throws_ok(format('SELECT market.checkout_begin(%L)', gen_random_uuid()), 'MK015', NULL, 'checkout_begin: unknown cart raises MK015');
SELECT is(market.cart_set_item(:'cart', :sku_c, 3), 3, 'cart_set_item returns the quantity');
SELECT is((market.cart_view(:'cart')->>'total_minor')::bigint, 2100::bigint, 'cart_view totals the lines');
SELECT throws_ok(format('SELECT market.checkout_begin(%L, ''0 s'')', :'cart'), 'MK023', NULL, 'checkout_begin: ttl 0 raises MK023');
SELECT market.cart_set_item(:'cart', :sku_c, 11) AS too_many \gset
SELECT throws_ok(format('SELECT market.checkout_begin(%L)', :'cart'), 'MK001', NULL, 'checkout_begin: short stock raises MK001');
SELECT market.cart_set_item(:'cart', :sku_c, 3) AS three \gset
SELECT market.checkout_begin(:'cart') AS co \gset
SELECT is(market.checkout_begin(:'cart'), :'co'::uuid, 'checkout_begin again returns the live checkout');
SELECT is(market.available(:sku_c), 7::bigint, 'checkout_begin reserves the lines');
SELECT throws_ok(format('SELECT market.checkout_complete(%L, ''k'')', gen_random_uuid()), 'MK016', NULL, 'checkout_complete: unknown checkout raises MK016');
SELECT throws_ok(format('SELECT market.checkout_complete(%L, NULL)', :'co'), 'MK020', NULL, 'checkout_complete: NULL key raises MK020');
SELECT throws_ok(format('SELECT market.checkout_complete(%L, %L)', :'co', repeat('k', 256)), 'MK020', NULL, 'checkout_complete: a 256-character key raises MK020');
SELECT throws_ok(format('SELECT market.checkout_complete(%L, ''k'', ''{"x": 1}'')', :'co'), 'MK021', NULL, 'checkout_complete: a malformed payment raises MK021');
SELECT throws_ok(format('SELECT market.checkout_complete(%L, ''k'', ''{}'', ''someone'')', :'co'), 'MK028', NULL, 'checkout_complete: someone else''s checkout raises MK028');
SELECT market.checkout_complete(:'co', 'tap-k1') AS res \gset
SELECT is(jsonb_array_length(:'res'::jsonb->'orders'), 1, 'checkout_complete makes one order per seller');
SELECT is((:'res'::jsonb->'payment'->>'amount_minor')::bigint, 2100::bigint, 'the payment is the total');
SELECT is(market.checkout_complete(:'co', 'tap-k1'), :'res'::jsonb, 'checkout_complete: the same key answers the same result');
SELECT throws_ok(format('SELECT market.checkout_complete(%L, ''tap-k1'', ''{"method": "card"}'')', :'co'), 'MK004', NULL, 'checkout_complete: the same key for another request raises MK004');
SELECT throws_ok(format('SELECT market.checkout_complete(%L, ''tap-k2'')', :'co'), 'MK029', NULL, 'checkout_complete: a completed checkout raises MK029');
SELECT is((SELECT count(*)::int FROM market.order_groups WHERE checkout_id = :'co'), 1, 'one order group for the checkout');
SELECT market.cart_set_item(:'cart', :sku_c, 1) AS one \gset
SELECT market.checkout_begin(:'cart', '1 s') AS co2 \gset
UPDATE market.reservations SET expires_at = clock_timestamp() - interval '1 s'
 WHERE id = (SELECT reservation_id FROM market.checkouts WHERE id = :'co2');
SELECT throws_ok(format('SELECT market.checkout_complete(%L, ''tap-k3'')', :'co2'), 'MK002', NULL, 'checkout_complete: an expired checkout raises MK002');
SELECT throws_ok(format('SELECT market.buy_now(''tap-customer'', ''[{"sku_id": %s, "qty": 1}]'', ''b1'')', :sku_c),
	'MK026', NULL, 'buy_now: a SKU in another currency raises MK026');
SELECT throws_ok(format('SELECT market.buy_now(''tap-customer'', ''[{"sku_id": %s, "qty": 1}]'', NULL, ''{}'', ''EUR'')', :sku_c),
	'MK020', NULL, 'buy_now: NULL key raises MK020');
SELECT throws_ok(format('SELECT market.buy_now(''tap-customer'', ''[{"sku_id": %s, "qty": 100}]'', ''b1'', ''{}'', ''EUR'')', :sku_c),
	'MK001', NULL, 'buy_now: short stock raises MK001');
SELECT is((market.buy_now('tap-customer', format('[{"sku_id": %s, "qty": 2}]', :sku_c)::jsonb, 'b1', '{}', 'EUR'))->'payment'->>'amount_minor',
	'1400', 'buy_now sells at the current price');
SELECT throws_ok(format('SELECT market.buy_now(''tap-customer'', ''[{"sku_id": %s, "qty": 1}]'', ''b1'', ''{}'', ''EUR'')', :sku_c),
	'MK004', NULL, 'buy_now: the same key for another request raises MK004');
SELECT throws_ok('SELECT market.idempotency_purge(0)', 'MK020', NULL, 'idempotency_purge: max 0 raises MK020');
SELECT is(market.idempotency_purge(), 0::bigint, 'idempotency_purge keeps young keys');
SELECT is_empty('SELECT * FROM market.verify_inventory()', 'verify_inventory is clean after checkouts');
-- 0.3 payments: MK070 .. MK076 from psp_register, payment_view, psp_set_enabled
SELECT throws_ok('SELECT market.psp_register(''tap-x'', ''worldpay'', ''https://x.example'', ''{"secret_key": "sk_1"}'')',
	'MK070', NULL, 'psp_register: an unknown kind raises MK070');
SELECT throws_ok('SELECT market.psp_register(''tap-x'', ''stripe'', ''ftp://x.example'', ''{"secret_key": "sk_1"}'')',
	'MK071', NULL, 'psp_register: a bad URL raises MK071');
SELECT throws_ok('SELECT market.psp_register(''tap-x'', ''adyen'', ''https://x.example'', ''{"api_key": "k"}'')',
	'MK072', NULL, 'psp_register: missing credentials raise MK072');
SELECT lives_ok('SELECT market.psp_register(''tap-x'', ''stripe'', ''https://x.example'', ''{"secret_key": "sk_1"}'')',
	'psp_register: a good account');
SELECT throws_ok('SELECT market.psp_register(''tap-x'', ''stripe'', ''https://x.example'', ''{"secret_key": "sk_1"}'')',
	'MK073', NULL, 'psp_register: a duplicate name raises MK073');
SELECT throws_ok('SELECT market.psp_set_enabled(''tap-none'', false)',
	'MK074', NULL, 'psp_set_enabled: an unknown account raises MK074');
SELECT throws_ok('SELECT market.payment_view(-1)', 'MK075', NULL, 'payment_view: an unknown payment raises MK075');
SELECT throws_ok('SELECT market.psp_register(''tap-y'', ''stripe'', ''https://x.example'', ''{"secret_key": "sk_1"}'', -5)',
	'MK076', NULL, 'psp_register: a bad priority raises MK076');
-- webhooks: MK070 unknown provider, MK077 bad signature, MK021 malformed, MK020 NULL
SELECT throws_ok('SELECT market.psp_webhook(''worldpay'', ''{}'', ''{}'')',
	'MK070', NULL, 'psp_webhook: an unknown provider raises MK070');
SELECT throws_ok('SELECT market.psp_webhook(''stripe'', ''{"Stripe-Signature": "t=1,v1=00"}'', ''{}'')',
	'MK077', NULL, 'psp_webhook: a bad Stripe signature raises MK077');
SELECT throws_ok('SELECT market.psp_webhook(''adyen'', ''{}'', ''not json'')',
	'MK021', NULL, 'psp_webhook: a malformed body raises MK021');
SELECT throws_ok('SELECT market.psp_webhook(NULL, ''{}'', ''{}'')',
	'MK020', NULL, 'psp_webhook: NULL raises MK020');

SELECT * FROM finish();
ROLLBACK;
