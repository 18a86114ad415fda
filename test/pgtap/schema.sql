-- pgTAP: the shape of the market 0.1 SQL API (docs/functions.md): the
-- objects exist with the documented signatures, the writing functions are
-- SECURITY DEFINER, PUBLIC can call nothing and the two roles get what the
-- privilege model says.  Behaviour is covered by the pg_regress suite.
--
-- Run by test/tools/run-tests.sh through pg_regress; each file creates the
-- extensions it needs inside a transaction that it rolls back.
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

SELECT plan(61);

-- schema and roles
SELECT has_schema('market');
SELECT has_role('market_admin');
SELECT has_role('market_app');
SELECT is((SELECT extversion FROM pg_extension WHERE extname = 'market'), '0.1', 'extension version is 0.1');

-- tables and views
SELECT tables_are('market', ARRAY['sellers', 'products', 'skus', 'warehouses', 'stock',
	'stock_slots', 'reservations', 'stock_ledger']);
SELECT views_are('market', ARRAY['reservation_lines', 'stock_levels']);
SELECT col_is_pk('market', 'stock_slots', ARRAY['sku_id', 'warehouse_id', 'slot'], 'stock_slots has its primary key');
SELECT col_is_pk('market', 'reservations', 'id', 'reservations are keyed by id');
SELECT col_type_is('market', 'reservations', 'id', 'uuid', 'reservation ids are uuids');
SELECT col_type_is('market', 'skus', 'price_minor', 'bigint', 'prices are integer minor units');
SELECT has_trigger('market', 'stock_ledger', 'stock_ledger_append_only', 'ledger refuses UPDATE and DELETE');
SELECT has_trigger('market', 'stock_ledger', 'stock_ledger_no_truncate', 'ledger refuses TRUNCATE');

-- functions, with the documented signatures and result types
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
SELECT has_function('market', 'verify_inventory', '{}'::name[]);

SELECT function_returns('market', 'reserve', ARRAY['jsonb', 'interval', 'text'], 'uuid');
SELECT function_returns('market', 'reservation_extend', ARRAY['uuid', 'interval'], 'timestamp with time zone');
SELECT function_returns('market', 'reservation_release', ARRAY['uuid'], 'boolean');
SELECT function_returns('market', 'reservation_commit', ARRAY['uuid'], 'bigint');
SELECT function_returns('market', 'available', ARRAY['bigint', 'integer'], 'bigint');
SELECT function_returns('market', 'expire_reservations', ARRAY['integer'], 'integer');

-- the C functions are SECURITY DEFINER and not STRICT (NULL raises MK020)
SELECT is_definer('market', 'stock_set', ARRAY['bigint', 'integer', 'bigint', 'integer']);
SELECT is_definer('market', 'stock_adjust', ARRAY['bigint', 'integer', 'bigint', 'text']);
SELECT is_definer('market', 'reserve', ARRAY['jsonb', 'interval', 'text']);
SELECT is_definer('market', 'reservation_commit', ARRAY['uuid']);
SELECT is_definer('market', 'expire_reservations', ARRAY['integer']);
SELECT isnt_strict('market', 'reserve', ARRAY['jsonb', 'interval', 'text']);
SELECT isnt_strict('market', 'stock_set', ARRAY['bigint', 'integer', 'bigint', 'integer']);
SELECT is((SELECT count(*)::int FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
			WHERE n.nspname = 'market' AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
			  AND (p.proconfig IS NULL
				   OR NOT 'search_path=pg_catalog, pg_temp' = ANY (p.proconfig))),
		  0, 'every C function pins search_path = pg_catalog, pg_temp');

-- privileges: PUBLIC gets nothing
SELECT is((SELECT count(*)::int FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
			WHERE n.nspname = 'market' AND has_function_privilege('public', p.oid, 'EXECUTE')),
		  0, 'PUBLIC may execute no market function');
SELECT is((SELECT count(*)::int FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = 'market' AND c.relkind IN ('r', 'v')
			  AND has_table_privilege('public', c.oid, 'SELECT')),
		  0, 'PUBLIC may read no market table');
SELECT schema_privs_are('market', 'public', '{}'::text[], 'PUBLIC has no privilege on schema market');
SELECT schema_privs_are('market', 'market_app', ARRAY['USAGE']);
SELECT schema_privs_are('market', 'market_admin', ARRAY['USAGE']);

-- market_app: the reservation API, nothing else
SELECT function_privs_are('market', 'reserve', ARRAY['jsonb', 'interval', 'text'], 'market_app', ARRAY['EXECUTE']);
SELECT function_privs_are('market', 'reservation_extend', ARRAY['uuid', 'interval'], 'market_app', ARRAY['EXECUTE']);
SELECT function_privs_are('market', 'reservation_release', ARRAY['uuid'], 'market_app', ARRAY['EXECUTE']);
SELECT function_privs_are('market', 'reservation_commit', ARRAY['uuid'], 'market_app', ARRAY['EXECUTE']);
SELECT function_privs_are('market', 'available', ARRAY['bigint', 'integer'], 'market_app', ARRAY['EXECUTE']);
SELECT function_privs_are('market', 'stock_set', ARRAY['bigint', 'integer', 'bigint', 'integer'], 'market_app', '{}'::text[]);
SELECT function_privs_are('market', 'seller_create', ARRAY['text'], 'market_app', '{}'::text[]);
SELECT function_privs_are('market', 'verify_inventory', '{}'::name[], 'market_app', '{}'::text[]);
SELECT table_privs_are('market', 'reservations', 'market_app', '{}'::text[]);

-- market_admin: catalog, stock, audit, and read access to the tables
SELECT function_privs_are('market', 'stock_set', ARRAY['bigint', 'integer', 'bigint', 'integer'], 'market_admin', ARRAY['EXECUTE']);
SELECT function_privs_are('market', 'expire_reservations', ARRAY['integer'], 'market_admin', ARRAY['EXECUTE']);
SELECT function_privs_are('market', 'verify_inventory', '{}'::name[], 'market_admin', ARRAY['EXECUTE']);
SELECT function_privs_are('market', 'reserve', ARRAY['jsonb', 'interval', 'text'], 'market_admin', ARRAY['EXECUTE']);
SELECT table_privs_are('market', 'reservations', 'market_admin', ARRAY['SELECT']);
SELECT table_privs_are('market', 'stock_ledger', 'market_admin', ARRAY['SELECT']);

-- an empty inventory is consistent
SELECT is_empty('SELECT * FROM market.verify_inventory()', 'verify_inventory() finds nothing in an empty inventory');

SELECT * FROM finish();
ROLLBACK;
