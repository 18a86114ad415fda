
-- ---------------------------------------------------------------------------
-- References without a row lock per reference.  The foreign keys of the
-- order tables checked every new row with a SELECT ... FOR KEY SHARE of its
-- parent (about 17 per three-line checkout, on rows that every checkout
-- shares: the seller, the warehouse, popular SKUs).  They are replaced by
-- BEFORE ROW triggers that look the parent up without locking it
-- (references_check) and by triggers on the parents that, before a DELETE,
-- a change of key or a TRUNCATE, lock the child tables in SHARE mode and
-- look for referring rows (references_guard).  Violations still raise
-- 23503.  The triggers are named <table>_references on the referring side
-- (after <table>_guard: BEFORE triggers fire in name order) and
-- <table>_referenced on the referenced side.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.references_check() RETURNS trigger
AS 'MODULE_PATHNAME', 'market_references_check'
LANGUAGE C;

CREATE FUNCTION market.references_guard() RETURNS trigger
AS 'MODULE_PATHNAME', 'market_references_guard'
LANGUAGE C;

REVOKE ALL ON FUNCTION market.references_check(), market.references_guard() FROM PUBLIC;

ALTER TABLE market.orders
	DROP CONSTRAINT orders_group_id_fkey,
	DROP CONSTRAINT orders_seller_id_fkey;
ALTER TABLE market.order_lines
	DROP CONSTRAINT order_lines_order_id_fkey,
	DROP CONSTRAINT order_lines_sku_id_fkey,
	DROP CONSTRAINT order_lines_warehouse_id_fkey;
ALTER TABLE market.order_events
	DROP CONSTRAINT order_events_order_id_fkey;
ALTER TABLE market.payments
	DROP CONSTRAINT payments_group_id_fkey;

-- the referring side: (column, referenced table) pairs; the referenced
-- column is that table's primary key
CREATE TRIGGER orders_references
	BEFORE INSERT OR UPDATE OF group_id, seller_id ON market.orders
	FOR EACH ROW EXECUTE FUNCTION market.references_check(
		'group_id', 'market.order_groups', 'seller_id', 'market.sellers');
CREATE TRIGGER order_lines_references
	BEFORE INSERT OR UPDATE OF order_id, sku_id, warehouse_id ON market.order_lines
	FOR EACH ROW EXECUTE FUNCTION market.references_check(
		'order_id', 'market.orders', 'sku_id', 'market.skus', 'warehouse_id', 'market.warehouses');
CREATE TRIGGER order_events_references
	BEFORE INSERT OR UPDATE OF order_id ON market.order_events
	FOR EACH ROW EXECUTE FUNCTION market.references_check('order_id', 'market.orders');
CREATE TRIGGER payments_references
	BEFORE INSERT OR UPDATE OF group_id ON market.payments
	FOR EACH ROW EXECUTE FUNCTION market.references_check('group_id', 'market.order_groups');

-- the referenced side: (referring table, its column) pairs
CREATE TRIGGER order_groups_referenced
	BEFORE DELETE OR UPDATE OF id ON market.order_groups
	FOR EACH ROW EXECUTE FUNCTION market.references_guard(
		'market.orders', 'group_id', 'market.payments', 'group_id');
CREATE TRIGGER order_groups_referenced_truncate
	BEFORE TRUNCATE ON market.order_groups
	FOR EACH STATEMENT EXECUTE FUNCTION market.references_guard(
		'market.orders', 'group_id', 'market.payments', 'group_id');
CREATE TRIGGER orders_referenced
	BEFORE DELETE OR UPDATE OF id ON market.orders
	FOR EACH ROW EXECUTE FUNCTION market.references_guard(
		'market.order_lines', 'order_id', 'market.order_events', 'order_id');
CREATE TRIGGER orders_referenced_truncate
	BEFORE TRUNCATE ON market.orders
	FOR EACH STATEMENT EXECUTE FUNCTION market.references_guard(
		'market.order_lines', 'order_id', 'market.order_events', 'order_id');
CREATE TRIGGER sellers_referenced
	BEFORE DELETE OR UPDATE OF id ON market.sellers
	FOR EACH ROW EXECUTE FUNCTION market.references_guard('market.orders', 'seller_id');
CREATE TRIGGER sellers_referenced_truncate
	BEFORE TRUNCATE ON market.sellers
	FOR EACH STATEMENT EXECUTE FUNCTION market.references_guard('market.orders', 'seller_id');
CREATE TRIGGER skus_referenced
	BEFORE DELETE OR UPDATE OF id ON market.skus
	FOR EACH ROW EXECUTE FUNCTION market.references_guard('market.order_lines', 'sku_id');
CREATE TRIGGER skus_referenced_truncate
	BEFORE TRUNCATE ON market.skus
	FOR EACH STATEMENT EXECUTE FUNCTION market.references_guard('market.order_lines', 'sku_id');
CREATE TRIGGER warehouses_referenced
	BEFORE DELETE OR UPDATE OF id ON market.warehouses
	FOR EACH ROW EXECUTE FUNCTION market.references_guard('market.order_lines', 'warehouse_id');
CREATE TRIGGER warehouses_referenced_truncate
	BEFORE TRUNCATE ON market.warehouses
	FOR EACH STATEMENT EXECUTE FUNCTION market.references_guard('market.order_lines', 'warehouse_id');

-- ---------------------------------------------------------------------------
-- Idempotency keys: a key is inserted when claimed (about 150 bytes) and
-- updated once with the response (the row grows to about 600).  With
-- fillfactor 80 only about a third of those updates found room on their
-- page; with 15 all of them do, as heap-only tuples that add no index
-- entries (measured in the checkout benchmark: 0.59 of updates HOT at 50,
-- 0.90 at 20, 1.00 at 15).
-- ---------------------------------------------------------------------------

ALTER TABLE market.idempotency_keys SET (fillfactor = 15);

-- ---------------------------------------------------------------------------
-- The audit of the references: rows of the referring tables whose parent
-- is missing.  The triggers above keep it empty; it finds what got in with
-- triggers off (session_replication_role = replica, DISABLE TRIGGER), as
-- verify_inventory() does for stock.  One row per (table, column, missing
-- key), with how many rows refer to it.  The references are read from the
-- references_check triggers' own arguments, so that the audit covers
-- exactly what the triggers check.  Scans the referring tables: an
-- administrator's check, not for the hot path.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.verify_references()
RETURNS TABLE (table_name text, column_name text, missing_key bigint, rows_referring bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	ref record;
BEGIN
	FOR ref IN
		SELECT c.relname::text AS child, a.args[2 * i - 1] AS child_column,
			   a.args[2 * i] AS parent,
			   (SELECT pa.attname::text FROM pg_index x
				  JOIN pg_attribute pa ON pa.attrelid = x.indrelid AND pa.attnum = x.indkey[0]
				 WHERE x.indrelid = a.args[2 * i]::regclass AND x.indisprimary) AS parent_column
		  FROM pg_trigger t
		  JOIN pg_class c ON c.oid = t.tgrelid
		 CROSS JOIN LATERAL (SELECT string_to_array(rtrim(encode(t.tgargs, 'escape'), '\000'), '\000')) AS a(args)
		 CROSS JOIN LATERAL generate_series(1, t.tgnargs / 2) AS i
		 WHERE t.tgfoid = 'market.references_check()'::regprocedure
		   AND c.relnamespace = 'market'::regnamespace
		 ORDER BY 1, 2
	LOOP
		RETURN QUERY EXECUTE format(
			'SELECT %L::text, %L::text, r.%I::bigint, count(*) FROM market.%I r'
			' WHERE r.%I IS NOT NULL AND NOT EXISTS (SELECT 1 FROM %s p WHERE p.%I = r.%I)'
			' GROUP BY r.%I ORDER BY 3',
			ref.child, ref.child_column, ref.child_column, ref.child,
			ref.child_column, ref.parent, ref.parent_column, ref.child_column,
			ref.child_column);
	END LOOP;
END
$$;

REVOKE ALL ON FUNCTION market.verify_references() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION market.verify_references() TO market_admin;
