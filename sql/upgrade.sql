--
-- upgrade: a database created at 0.1, holding data, updated to the current
-- version with ALTER EXTENSION ... UPDATE, ends with exactly the objects of
-- a fresh CREATE EXTENSION (this regression database), keeps its data, and
-- works.  Runs in a database of its own.
--

-- what a market installation consists of, as one comparable text (kept in a
-- psql variable, so that both databases' sessions can create it)
SELECT $create$CREATE FUNCTION pg_temp.market_shape() RETURNS text
LANGUAGE sql AS $$
	SELECT md5(string_agg(x, E'\n' ORDER BY x)) FROM (
		SELECT format('function %s(%s) definer=%s volatile=%s strict=%s returns %s config=%s',
					  p.proname, pg_get_function_identity_arguments(p.oid), p.prosecdef,
					  p.provolatile, p.proisstrict, pg_get_function_result(p.oid), p.proconfig)
		  FROM pg_proc p WHERE p.pronamespace = 'market'::regnamespace
		UNION ALL
		SELECT format('column %s.%s %s notnull=%s default=%s', c.relname, a.attname,
					  format_type(a.atttypid, a.atttypmod), a.attnotnull,
					  pg_get_expr(d.adbin, d.adrelid))
		  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
		  LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
		 WHERE c.relnamespace = 'market'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
		UNION ALL
		SELECT format('constraint %s %s', conname, pg_get_constraintdef(oid))
		  FROM pg_constraint WHERE connamespace = 'market'::regnamespace
		UNION ALL
		SELECT format('index %s', pg_get_indexdef(indexrelid))
		  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
		 WHERE c.relnamespace = 'market'::regnamespace
		UNION ALL
		SELECT format('trigger %s', pg_get_triggerdef(t.oid))
		  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
		 WHERE c.relnamespace = 'market'::regnamespace AND NOT t.tgisinternal
		UNION ALL
		SELECT format('acl %s %s', c.relname, c.relacl)
		  FROM pg_class c WHERE c.relnamespace = 'market'::regnamespace
		UNION ALL
		SELECT format('acl %s(%s) %s', p.proname, pg_get_function_identity_arguments(p.oid), p.proacl)
		  FROM pg_proc p WHERE p.pronamespace = 'market'::regnamespace
		UNION ALL
		SELECT format('reloptions %s %s', c.relname, c.reloptions)
		  FROM pg_class c WHERE c.relnamespace = 'market'::regnamespace AND c.reloptions IS NOT NULL
		UNION ALL
		SELECT format('type %s', t.typname)
		  FROM pg_type t WHERE t.typnamespace = 'market'::regnamespace
	) s(x)
$$$create$ AS create_shape \gset
:create_shape;
SELECT pg_temp.market_shape() AS fresh_shape \gset
SELECT extversion AS current_version FROM pg_extension WHERE extname = 'market' \gset

CREATE DATABASE market_upgrade;
\c market_upgrade
CREATE EXTENSION market VERSION '0.1';
SELECT extversion FROM pg_extension WHERE extname = 'market';

-- a 0.1 shop with stock, a sale, a live and a released reservation
SELECT market.seller_create('Upgrade seller') AS seller \gset
SELECT market.product_create(:seller, 'Upgrade product') AS product \gset
SELECT market.warehouse_create('up-w', 'Upgrade warehouse') AS wh \gset
SELECT market.sku_create(:product, 'UP-1', 1000, 'EUR') AS sku \gset
SELECT market.stock_set(:sku, :wh, 20);
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}]', :sku)::jsonb) AS sold \gset
SELECT market.reservation_commit(:'sold');
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2}]', :sku)::jsonb) AS live \gset
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :sku)::jsonb) AS gone \gset
SELECT market.reservation_release(:'gone');

-- the update path is the one the packaging promises
SELECT source, target, path FROM pg_extension_update_paths('market')
 WHERE source = '0.1' AND target = :'current_version';

ALTER EXTENSION market UPDATE TO :'current_version';
:create_shape;
SELECT extversion = :'current_version' AS updated FROM pg_extension WHERE extname = 'market';

-- same objects, owners' grants included, as a fresh install
SELECT pg_temp.market_shape() = :'fresh_shape' AS same_shape_as_fresh_install;

-- the data survived and is consistent
SELECT market.available(:sku) AS available;
SELECT status, count(*) FROM market.reservations GROUP BY status ORDER BY status;
SELECT kind, sum(delta) FROM market.stock_ledger GROUP BY kind ORDER BY kind;
SELECT * FROM market.verify_inventory();

-- the old reservation still ends normally, and 0.2 works on old data
SELECT market.reservation_commit(:'live');
SELECT count(*) > 0 AS has_transitions FROM market.order_transitions();
SELECT * FROM market.verify_inventory();

\c contrib_regression
DROP DATABASE market_upgrade;

-- 0.4 to 0.5 with orders in the database: the foreign keys of the order
-- tables give way to reference triggers, which then hold for old rows too
CREATE DATABASE market_upgrade;
\c market_upgrade
SET client_min_messages = warning;
CREATE EXTENSION market VERSION '0.4';
SELECT market.seller_create('Upgrade seller') AS seller \gset
SELECT market.product_create(:seller, 'Upgrade product') AS product \gset
SELECT market.warehouse_create('up-w', 'Upgrade warehouse') AS wh \gset
SELECT market.sku_create(:product, 'UP-1', 1000, 'EUR') AS sku \gset
SELECT market.stock_set(:sku, :wh, 20);
SELECT market.buy_now('up-cust', format('[{"sku_id": %s, "qty": 2}]', :sku)::jsonb, 'up-key', '{}', 'EUR')
	   -> 'order_group' AS grp \gset
SELECT count(*) AS foreign_keys_at_0_4 FROM pg_constraint
 WHERE contype = 'f' AND conrelid = 'market.order_lines'::regclass;
ALTER EXTENSION market UPDATE TO :'current_version';
:create_shape;
SELECT pg_temp.market_shape() = :'fresh_shape' AS same_shape_as_fresh_install;
SELECT count(*) AS foreign_keys_now FROM pg_constraint
 WHERE contype = 'f' AND conrelid = 'market.order_lines'::regclass;
\set VERBOSITY terse
DELETE FROM market.sellers WHERE id = :seller;                           -- 23503
DELETE FROM market.order_groups WHERE id = :grp;                         -- 23503
INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)
SELECT id, -1, :wh, 1, 1 FROM market.orders WHERE group_id = :grp;       -- 23503
\set VERBOSITY default
-- and the shop goes on selling
SELECT jsonb_array_length(market.buy_now('up-cust', format('[{"sku_id": %s, "qty": 1}]', :sku)::jsonb,
										 'up-key-2', '{}', 'EUR') -> 'orders') AS orders;
SELECT * FROM market.verify_inventory();
\c contrib_regression
DROP DATABASE market_upgrade;
