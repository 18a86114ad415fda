--
-- verify: after every suite before it, verify_inventory() finds nothing.
-- Then each invariant is broken on purpose (as superuser, behind the
-- functions' back), reported, and repaired.
--
\set VERBOSITY sqlstate

-- everything the earlier suites did left the inventory consistent
SELECT * FROM market.verify_inventory();
SELECT count(*) > 0 AS earlier_suites_left_stock FROM market.stock_slots;
SELECT count(*) > 0 AS earlier_suites_left_reservations FROM market.reservations;

SELECT market.seller_create('Verify Seller') AS seller \gset
SELECT market.product_create(:seller, 'Verify product') AS product \gset
SELECT market.sku_create(:product, 'VFY-A', 100, 'USD') AS v \gset
SELECT market.warehouse_create('vfy-w1', 'Verify W1') AS w \gset
-- one slot, so the corruption below lands where the reservation is
SELECT market.stock_set(:v, :w, 10, 1) AS on_hand;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}]', :v)::jsonb) AS r \gset
SELECT slot, on_hand, free FROM market.stock_slots WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM market.verify_inventory();

-- the rows reported for VFY-A (ids compared, not printed)
CREATE TEMP VIEW vfy AS
	SELECT invariant, sku_id = :v AS this_sku, warehouse_id = :w AS this_warehouse,
		   CASE WHEN invariant IN ('sale_matches_ledger', 'reservation_well_formed')
				THEN '(names the reservation)' ELSE detail END AS detail
	  FROM market.verify_inventory();

-- 1. on-hand raised in a slot: the ledger and the reservations disagree
UPDATE market.stock_slots SET on_hand = on_hand + 1 WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM vfy ORDER BY invariant;
UPDATE market.stock_slots SET on_hand = on_hand - 1 WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM market.verify_inventory();

-- 2. free lowered: the slot holds back more than the reservations took
UPDATE market.stock_slots SET free = free - 1 WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM vfy ORDER BY invariant;
UPDATE market.stock_slots SET free = free + 1 WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM market.verify_inventory();

-- 3. the stock row claims more slots than there are
UPDATE market.stock SET slots = 2 WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM vfy ORDER BY invariant;
UPDATE market.stock SET slots = 1 WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM market.verify_inventory();

-- 4. a slot row disappears
SELECT on_hand AS saved_on_hand, free AS saved_free
  FROM market.stock_slots WHERE sku_id = :v AND warehouse_id = :w AND slot = 0 \gset
DELETE FROM market.stock_slots WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM vfy ORDER BY invariant;
INSERT INTO market.stock_slots (sku_id, warehouse_id, slot, on_hand, free)
VALUES (:v, :w, 0, :saved_on_hand, :saved_free);
SELECT * FROM market.verify_inventory();

-- 5. a ledger row nobody made: it cannot be deleted, only compensated
INSERT INTO market.stock_ledger (sku_id, warehouse_id, delta, kind, reason)
VALUES (:v, :w, 1, 'adjust', 'regress: deliberate corruption');
SELECT * FROM vfy ORDER BY invariant;
DELETE FROM market.stock_ledger WHERE reason = 'regress: deliberate corruption';  -- MK030
INSERT INTO market.stock_ledger (sku_id, warehouse_id, delta, kind, reason)
VALUES (:v, :w, -1, 'adjust', 'regress: compensation');
SELECT * FROM market.verify_inventory();

-- 6. a reservation marked committed without a sale
UPDATE market.reservations SET status = 'committed', finished_at = now() WHERE id = :'r';
SELECT * FROM vfy ORDER BY invariant;
UPDATE market.reservations SET status = 'held', finished_at = NULL WHERE id = :'r';
SELECT * FROM market.verify_inventory();

-- 7. counters out of range (only possible with the CHECK constraints gone)
BEGIN;
DO $$
DECLARE
	c name;
BEGIN
	FOR c IN SELECT conname FROM pg_constraint
			  WHERE conrelid = 'market.stock_slots'::regclass AND contype = 'c'
	LOOP
		EXECUTE format('ALTER TABLE market.stock_slots DROP CONSTRAINT %I', c);
	END LOOP;
END
$$;
UPDATE market.stock_slots SET free = on_hand + 5 WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM vfy ORDER BY invariant;
ROLLBACK;
SELECT count(*) AS check_constraints FROM pg_constraint
 WHERE conrelid = 'market.stock_slots'::regclass AND contype = 'c';
SELECT * FROM market.verify_inventory();

-- 8. a malformed reservation row: held, yet with a finish time; and lines
-- whose arrays disagree in length (the shape is the audit's to check)
BEGIN;
UPDATE market.reservations SET finished_at = now() WHERE id = :'r';
SELECT * FROM vfy ORDER BY invariant;
UPDATE market.reservations SET finished_at = NULL, qtys = qtys || 1::bigint WHERE id = :'r';
SELECT * FROM vfy ORDER BY invariant;
ROLLBACK;
SELECT * FROM market.verify_inventory();

-- a real sale keeps everything consistent
SELECT market.reservation_commit(:'r') AS units_sold;
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :v AND warehouse_id = :w;
SELECT * FROM market.verify_inventory();
