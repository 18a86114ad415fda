--
-- references: from 0.5 the order tables refer to their parents through
-- triggers that lock no parent row (src/references.c).  Whoever writes,
-- a row that refers to a missing parent is refused with 23503, and so is
-- deleting, re-keying or truncating a parent that rows still refer to.
--
SET client_min_messages = warning;
\set VERBOSITY default

SELECT market.seller_create('Ref seller') AS seller \gset
SELECT market.seller_create('Ref seller, never sold') AS idle_seller \gset
SELECT market.product_create(:seller, 'Ref product') AS product \gset
SELECT market.warehouse_create('ref-w', 'Ref warehouse') AS wh \gset
SELECT market.warehouse_create('ref-idle', 'Ref idle warehouse') AS idle_wh \gset
SELECT market.sku_create(:product, 'REF-1', 500, 'EUR') AS sku \gset
SELECT market.sku_create(:product, 'REF-2', 700, 'EUR') AS sku2 \gset
SELECT market.stock_set(:sku, :wh, 10) IS NOT NULL AS stocked;
SELECT market.stock_set(:sku2, :wh, 10) IS NOT NULL AS stocked;

-- a checkout writes its group, orders, lines, events and payment in one
-- statement: each row finds the parent written just before it
SELECT market.buy_now('ref-cust', format('[{"sku_id": %s, "qty": 2}, {"sku_id": %s, "qty": 1}]', :sku, :sku2)::jsonb,
					  'ref-key-1', '{}', 'EUR') -> 'order_group' AS grp \gset
SELECT id AS ord FROM market.orders WHERE group_id = :grp \gset
SELECT count(*) AS lines FROM market.order_lines WHERE order_id = :ord;
SELECT count(*) AS events FROM market.order_events WHERE order_id = :ord;
SELECT count(*) AS payments FROM market.payments WHERE group_id = :grp;

-- no foreign keys are left on these tables: the triggers are the check
SELECT conrelid::regclass, conname FROM pg_constraint
 WHERE contype = 'f' AND conrelid IN ('market.orders'::regclass, 'market.order_lines'::regclass,
									  'market.order_events'::regclass, 'market.payments'::regclass);

-- ---------------------------------------------------------------------------
-- the referring side: a missing parent is refused, on INSERT and on UPDATE
-- ---------------------------------------------------------------------------
INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)
VALUES (-1, :sku, :wh, 1, 100);                                          -- 23503 order
INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)
VALUES (:ord, -7, :wh, 1, 100);                                          -- 23503 sku
INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)
VALUES (:ord, :sku, -3, 1, 100);                                         -- 23503 warehouse
INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
VALUES (-5, :seller, 'ref-cust', 'EUR', 100);                            -- 23503 group
INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
VALUES (:grp, -9, 'ref-cust', 'EUR', 100);                               -- 23503 seller
INSERT INTO market.order_events (order_id, from_status, to_status)
VALUES (-2, 'created', 'confirmed');                                     -- 23503 order
INSERT INTO market.payments (group_id, customer_id, currency, amount_minor)
VALUES (-4, 'ref-cust', 'EUR', 100);                                     -- 23503 group
UPDATE market.order_lines SET sku_id = -8 WHERE order_id = :ord AND sku_id = :sku;   -- 23503
UPDATE market.orders SET seller_id = -6 WHERE id = :ord;                 -- 23503
-- an UPDATE to another existing parent, or of other columns, goes through
BEGIN;
UPDATE market.order_lines SET warehouse_id = :idle_wh WHERE order_id = :ord AND sku_id = :sku;
UPDATE market.order_lines SET qty = qty WHERE order_id = :ord;
ROLLBACK;
-- a parent and its child written in one transaction
BEGIN;
INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
VALUES (gen_random_uuid(), 'ref-cust', 'EUR', 100) RETURNING id AS grp2 \gset
INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
VALUES (:grp2, :seller, 'ref-cust', 'EUR', 100);
SELECT count(*) AS written FROM market.orders WHERE group_id = :grp2;
ROLLBACK;

-- ---------------------------------------------------------------------------
-- the referenced side: rows still referred to cannot go or change key
-- (terse: the messages' details name generated ids)
-- ---------------------------------------------------------------------------
\set VERBOSITY terse
DELETE FROM market.sellers WHERE id = :seller;                           -- 23503 (orders)
DELETE FROM market.skus WHERE id = :sku;                                 -- 23503 (order_lines)
DELETE FROM market.warehouses WHERE id = :wh;                            -- 23503 (order_lines)
DELETE FROM market.orders WHERE id = :ord;                               -- 23503 (order_lines)
DELETE FROM market.order_groups WHERE id = :grp;                         -- 23503 (orders)
UPDATE market.order_groups SET id = DEFAULT WHERE id = :grp;              -- 23503
TRUNCATE market.order_groups;                                            -- 23503
TRUNCATE market.orders;                                                  -- 23503
-- what nobody refers to can go (and a rolled-back delete leaves it there)
BEGIN;
DELETE FROM market.sellers WHERE id = :idle_seller;
UPDATE market.order_groups SET total_minor = total_minor WHERE id = :grp;
ROLLBACK;
DELETE FROM market.sellers WHERE id = :idle_seller;
SELECT count(*) AS idle_seller_left FROM market.sellers WHERE id = :idle_seller;
-- a parent this transaction found, then deleted once nothing referred to
-- it, is not found again
BEGIN;
SELECT market.sku_create(:product, 'REF-GONE', 100, 'EUR') AS gone_sku \gset
INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)
VALUES (:ord, :gone_sku, :wh, 1, 100);
DELETE FROM market.order_lines WHERE sku_id = :gone_sku;
DELETE FROM market.skus WHERE id = :gone_sku;
INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)
VALUES (:ord, :gone_sku, :wh, 1, 100);                                   -- 23503
ROLLBACK;
-- the protocol: a delete holds SHARE on the referring tables until it ends
BEGIN;
DELETE FROM market.warehouses WHERE id = :idle_wh;
SELECT relation::regclass, mode FROM pg_locks
 WHERE locktype = 'relation' AND pid = pg_backend_pid() AND mode = 'ShareLock'
 ORDER BY 1;
ROLLBACK;

\set VERBOSITY default

-- ---------------------------------------------------------------------------
-- the trigger functions refuse to be used any other way
-- ---------------------------------------------------------------------------
CREATE TABLE public.ref_child (id int PRIMARY KEY, parent_id bigint, label text);
CREATE TRIGGER ref_child_odd BEFORE INSERT ON public.ref_child
	FOR EACH ROW EXECUTE FUNCTION market.references_check('parent_id');
INSERT INTO public.ref_child VALUES (1, 1);                              -- 22023 one name
DROP TRIGGER ref_child_odd ON public.ref_child;
CREATE TRIGGER ref_child_type BEFORE INSERT ON public.ref_child
	FOR EACH ROW EXECUTE FUNCTION market.references_check('id', 'market.sellers');
INSERT INTO public.ref_child VALUES (1, 1);                              -- 42804 int vs bigint
DROP TRIGGER ref_child_type ON public.ref_child;
CREATE TRIGGER ref_child_column BEFORE INSERT ON public.ref_child
	FOR EACH ROW EXECUTE FUNCTION market.references_check('nope', 'market.sellers');
INSERT INTO public.ref_child VALUES (1, 1);                              -- 42703
DROP TRIGGER ref_child_column ON public.ref_child;
CREATE TRIGGER ref_child_after AFTER INSERT ON public.ref_child
	FOR EACH ROW EXECUTE FUNCTION market.references_check('parent_id', 'market.sellers');
INSERT INTO public.ref_child VALUES (1, 1);                              -- 39P01
DROP TRIGGER ref_child_after ON public.ref_child;
-- on a table of one's own, with a NULL reference passing (MATCH SIMPLE)
CREATE TRIGGER ref_child_ok BEFORE INSERT OR UPDATE OF parent_id ON public.ref_child
	FOR EACH ROW EXECUTE FUNCTION market.references_check('parent_id', 'market.sellers');
INSERT INTO public.ref_child VALUES (1, :seller, 'a'), (2, NULL, 'b');
INSERT INTO public.ref_child VALUES (3, -1, 'c');                        -- 23503
SELECT id, parent_id IS NOT NULL AS refers FROM public.ref_child ORDER BY id;
-- the parents a transaction found are remembered up to 8192 keys: one that
-- refers to 30,000 distinct parents keeps its memory small, and what is
-- past the limit is still checked
BEGIN;
INSERT INTO market.sellers (name) SELECT 'Ref bulk ' || g FROM generate_series(1, 30000) AS g;
INSERT INTO public.ref_child SELECT 1000 + row_number() OVER (ORDER BY id), id, 'bulk'
  FROM market.sellers WHERE name LIKE 'Ref bulk %';
SELECT count(*) AS bulk_rows FROM public.ref_child WHERE label = 'bulk';
SELECT total_bytes < 1024 * 1024 AS found_parents_under_1_mb
  FROM pg_backend_memory_contexts WHERE name = 'market found parents';
INSERT INTO public.ref_child VALUES (99999, -2, 'past the limit');      -- 23503
ROLLBACK;
DROP TABLE public.ref_child;

-- the audit finds nothing while the triggers are on; rows written with
-- them off (here as a replica applies them) are what it reports
SELECT * FROM market.verify_references();
BEGIN;
SET LOCAL session_replication_role = replica;
INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)
VALUES (-11, :sku, :wh, 1, 100), (-11, :sku2, :wh, 1, 100), (:ord, -12, :wh, 1, 100);
INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
VALUES (-13, :seller, 'ref-cust', 'EUR', 100);
SELECT * FROM market.verify_references();
ROLLBACK;
SELECT count(*) AS after_rollback FROM market.verify_references();

-- nothing above changed stock
SELECT * FROM market.verify_inventory();
