--
-- stock: stock_set, stock_adjust, available, the slots parameter, the
-- stock_levels view, the ledger rows they append and the ledger's
-- append-only trigger.
--
\set VERBOSITY sqlstate

SELECT market.seller_create('Stock Seller') AS seller \gset
SELECT market.product_create(:seller, 'Stock product') AS product \gset
SELECT market.sku_create(:product, 'STK-A', 100, 'USD') AS a \gset
SELECT market.sku_create(:product, 'STK-B', 100, 'USD') AS b \gset
SELECT market.sku_create(:product, 'STK-C', 100, 'USD') AS c \gset
SELECT market.sku_create(:product, 'STK-D', 100, 'USD') AS d \gset
SELECT market.sku_create(:product, 'STK-E', 100, 'USD') AS e \gset
SELECT market.warehouse_create('stk-w1', 'Stock W1') AS w1 \gset
SELECT market.warehouse_create('stk-w2', 'Stock W2') AS w2 \gset

-- a SKU without stock has 0 available, everywhere and per warehouse
SELECT market.available(:a) AS avail, market.available(:a, :w1) AS avail_w1;

-- ---------------------------------------------------------------------------
-- stock_set
-- ---------------------------------------------------------------------------
-- first call creates the stock with market.stock_slots slots
SELECT market.stock_set(:a, :w1, 10) AS on_hand;
SELECT slots = current_setting('market.stock_slots')::int AS default_slots
  FROM market.stock WHERE sku_id = :a AND warehouse_id = :w1;
SELECT count(*) = current_setting('market.stock_slots')::int AS slot_rows,
       min(slot) AS first_slot,
       max(slot) = current_setting('market.stock_slots')::int - 1 AS numbered_from_0,
       sum(on_hand) AS on_hand, sum(free) AS free
  FROM market.stock_slots WHERE sku_id = :a AND warehouse_id = :w1;
SELECT on_hand, held, free, slots = current_setting('market.stock_slots')::int AS default_slots
  FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
SELECT market.available(:a) AS avail, market.available(:a, :w1) AS avail_w1,
       market.available(:a, :w2) AS avail_w2;
-- later calls set on-hand; each appends the difference
SELECT market.stock_set(:a, :w1, 25) AS on_hand;
SELECT market.stock_set(:a, :w1, 5) AS on_hand;
SELECT market.available(:a) AS avail;
SELECT kind, delta, reservation_id IS NULL AS no_reservation, actor = session_user AS actor_ok
  FROM market.stock_ledger WHERE sku_id = :a AND warehouse_id = :w1 ORDER BY id;
-- stock in a second warehouse: available() sums over warehouses
SELECT market.stock_set(:a, :w2, 7) AS on_hand;
SELECT market.available(:a) AS avail, market.available(:a, :w1) AS avail_w1,
       market.available(:a, :w2) AS avail_w2;
SELECT warehouse_id = :w1 AS is_w1, on_hand, held, free
  FROM market.stock_levels WHERE sku_id = :a ORDER BY warehouse_id;

-- bad input
SELECT market.stock_set(NULL, :w1, 1);                  -- MK020
SELECT market.stock_set(:a, NULL, 1);                   -- MK020
SELECT market.stock_set(:a, :w1, NULL);                 -- MK020
SELECT market.stock_set(999999999, :w1, 1);             -- MK010
SELECT market.stock_set(:a, 999999, 1);                 -- MK011
SELECT market.stock_set(:a, :w1, -1);                   -- MK025
SELECT market.stock_set(:a, :w1, 1000000000001);        -- MK020 (above 10^12)
SELECT market.stock_set(:a, :w1, 9223372036854775807);  -- MK020
SELECT market.stock_set(:a, :w1, 5, 0);                 -- MK020 (slots)
SELECT market.stock_set(:a, :w1, 5, -1);                -- MK020
SELECT market.stock_set(:a, :w1, 5, 1025);              -- MK020
SELECT market.stock_set(:e, :w1, 5, 0);                 -- MK020 (and no stock created)
SELECT count(*) AS stock_rows_for_e FROM market.stock WHERE sku_id = :e;
SELECT market.available(:a, :w1) AS avail_w1;           -- still 5
SELECT market.available(NULL);                          -- MK020
SELECT market.available(NULL, :w1);                     -- MK020
SELECT market.available(999999999);                     -- MK010
SELECT market.available(999999999, :w1);                -- MK010
SELECT market.available(:a, 999999);                    -- MK011
SELECT market.available(:a, 0);                         -- MK011 (0 is no warehouse)
-- 10^12 itself is allowed
SELECT market.stock_set(:b, :w1, 1000000000000) AS on_hand;
SELECT market.available(:b) AS avail;
SELECT market.stock_adjust(:b, :w1, 1, 'one more');     -- MK020 (above 10^12)
SELECT market.stock_set(:b, :w1, 0) AS on_hand;
SELECT market.available(:b) AS avail;

-- ---------------------------------------------------------------------------
-- stock_adjust
-- ---------------------------------------------------------------------------
SELECT market.stock_adjust(:a, :w1, 3, 'found in aisle 4') AS on_hand;
SELECT market.stock_adjust(:a, :w1, -2, 'damaged') AS on_hand;
SELECT market.available(:a, :w1) AS avail_w1;
SELECT kind, delta, reason FROM market.stock_ledger
 WHERE sku_id = :a AND warehouse_id = :w1 AND kind = 'adjust' ORDER BY id;
SELECT market.stock_adjust(:a, :w1, 0, 'nothing');      -- MK020
SELECT market.stock_adjust(:a, :w1, 1, NULL);           -- MK020
SELECT market.stock_adjust(:a, :w1, 1, '');             -- MK020
SELECT market.stock_adjust(:a, :w1, 1, '   ');          -- MK020
SELECT market.stock_adjust(NULL, :w1, 1, 'x');          -- MK020
SELECT market.stock_adjust(:a, NULL, 1, 'x');           -- MK020
SELECT market.stock_adjust(:a, :w1, NULL, 'x');         -- MK020
SELECT market.stock_adjust(999999999, :w1, 1, 'x');     -- MK010
SELECT market.stock_adjust(:a, 999999, 1, 'x');         -- MK011
SELECT market.stock_adjust(:a, :w1, -7, 'too many');    -- MK025 (6 - 7 < 0)
SELECT market.stock_adjust(:a, :w1, 1000000000000, 'x');-- MK020 (above 10^12)
SELECT market.available(:a, :w1) AS avail_w1;           -- still 6
-- a first positive adjustment creates the stock; a first negative one cannot
SELECT market.stock_adjust(:d, :w2, 4, 'initial count') AS on_hand;
SELECT slots = current_setting('market.stock_slots')::int AS default_slots
  FROM market.stock WHERE sku_id = :d AND warehouse_id = :w2;
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :d AND warehouse_id = :w2;
SELECT market.stock_adjust(:e, :w2, -1, 'phantom');     -- MK025
SELECT count(*) AS stock_rows_for_e FROM market.stock WHERE sku_id = :e;
SELECT count(*) AS ledger_rows_for_e FROM market.stock_ledger WHERE sku_id = :e;

-- ---------------------------------------------------------------------------
-- live reservations: on-hand cannot drop below what they hold
-- ---------------------------------------------------------------------------
SELECT market.reserve(format('[{"sku_id": %s, "qty": 4, "warehouse_id": %s}]', :a, :w1)::jsonb) AS r \gset
SELECT market.available(:a, :w1) AS avail_w1;           -- 6 - 4
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
SELECT market.stock_set(:a, :w1, 3);                    -- MK024
SELECT market.stock_adjust(:a, :w1, -3, 'shrink');      -- MK024 (3 < 4)
SELECT market.stock_set(:a, :w1, 4) AS on_hand;         -- exactly what is held: fine
SELECT market.available(:a, :w1) AS avail_w1;
SELECT market.stock_adjust(:a, :w1, -1, 'shrink');      -- MK024 (not negative, but below held)
SELECT market.stock_set(:a, :w1, 0);                    -- MK024
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
SELECT market.reservation_release(:'r') AS released;
SELECT market.stock_set(:a, :w1, 0) AS on_hand;
SELECT market.available(:a, :w1) AS avail_w1;

-- expired reservations hold nothing: stock_set / stock_adjust return their units first
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}]', :d)::jsonb, '1 second') AS rx \gset
SELECT market.available(:d) AS avail;                   -- 4 - 3
SELECT pg_sleep(1.2);
SELECT market.stock_set(:d, :w2, 1) AS on_hand;         -- no MK024: the 3 units came back
SELECT status FROM market.reservations WHERE id = :'rx';
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :d AND warehouse_id = :w2;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :d)::jsonb, '1 second') AS ry \gset
SELECT market.available(:d) AS avail;
SELECT pg_sleep(1.2);
SELECT market.stock_adjust(:d, :w2, -1, 'shrink') AS on_hand;
SELECT status FROM market.reservations WHERE id = :'ry';
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :d AND warehouse_id = :w2;

-- ---------------------------------------------------------------------------
-- slots
-- ---------------------------------------------------------------------------
SELECT market.stock_set(:c, :w1, 100, 8) AS on_hand;
SELECT slots FROM market.stock WHERE sku_id = :c AND warehouse_id = :w1;
SELECT count(*) AS slot_rows, min(slot), max(slot), sum(on_hand) AS on_hand, sum(free) AS free
  FROM market.stock_slots WHERE sku_id = :c AND warehouse_id = :w1;
SELECT on_hand, held, free, slots FROM market.stock_levels WHERE sku_id = :c AND warehouse_id = :w1;
-- a later call without slots keeps the slot count
SELECT market.stock_set(:c, :w1, 120) AS on_hand;
SELECT on_hand, held, free, slots FROM market.stock_levels WHERE sku_id = :c AND warehouse_id = :w1;
SELECT market.stock_set(:c, :w1, 100) AS on_hand;
-- with a live reservation, growing works; shrinking is refused (MK020)
-- while the slots that would go hold reserved units.  The reservation takes
-- every unit, so every slot that has units holds some of it.
SELECT sum(on_hand) FILTER (WHERE slot >= 2) > 0 AS slots_2_and_up_have_units
  FROM market.stock_slots WHERE sku_id = :c AND warehouse_id = :w1;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 100}]', :c)::jsonb) AS rc \gset
SELECT market.stock_set(:c, :w1, 100, 2);               -- MK020
SELECT market.stock_set(:c, :w1, 100, 7);               -- MK020
SELECT slots FROM market.stock WHERE sku_id = :c AND warehouse_id = :w1;
SELECT count(*) AS slot_rows, min(slot), max(slot), sum(on_hand) AS on_hand, sum(free) AS free
  FROM market.stock_slots WHERE sku_id = :c AND warehouse_id = :w1;
SELECT on_hand, held, free, slots FROM market.stock_levels WHERE sku_id = :c AND warehouse_id = :w1;
SELECT market.available(:c) AS avail;
SELECT market.stock_set(:c, :w1, 100, 16) AS on_hand;
SELECT slots FROM market.stock WHERE sku_id = :c AND warehouse_id = :w1;
SELECT count(*) AS slot_rows, min(slot), max(slot), sum(on_hand) AS on_hand, sum(free) AS free
  FROM market.stock_slots WHERE sku_id = :c AND warehouse_id = :w1;
SELECT on_hand, held, free, slots FROM market.stock_levels WHERE sku_id = :c AND warehouse_id = :w1;
SELECT * FROM market.verify_inventory();
SELECT market.reservation_release(:'rc') AS released;
SELECT market.available(:c) AS avail;
-- nothing held: shrinking works
SELECT market.stock_set(:c, :w1, 100, 2) AS on_hand;
SELECT count(*) AS slot_rows, min(slot), max(slot), sum(on_hand) AS on_hand, sum(free) AS free
  FROM market.stock_slots WHERE sku_id = :c AND warehouse_id = :w1;
SELECT on_hand, held, free, slots FROM market.stock_levels WHERE sku_id = :c AND warehouse_id = :w1;
SELECT market.available(:c) AS avail;
SELECT * FROM market.verify_inventory();
-- the limits: 1 and 1024 slots
SELECT market.stock_set(:c, :w2, 7, 1024) AS on_hand;
SELECT on_hand, held, free, slots FROM market.stock_levels WHERE sku_id = :c AND warehouse_id = :w2;
SELECT market.stock_set(:c, :w2, 7, 1) AS on_hand;
SELECT on_hand, held, free, slots FROM market.stock_levels WHERE sku_id = :c AND warehouse_id = :w2;
SELECT market.available(:c) AS avail;

-- ---------------------------------------------------------------------------
-- the ledger adds up, and it is append-only (even for a superuser)
-- ---------------------------------------------------------------------------
SELECT warehouse_id = :w1 AS is_w1, sum(delta) AS ledger_sum, count(*) AS ledger_rows
  FROM market.stock_ledger WHERE sku_id = :a GROUP BY warehouse_id ORDER BY warehouse_id;
SELECT warehouse_id = :w1 AS is_w1, on_hand FROM market.stock_levels
 WHERE sku_id = :a ORDER BY warehouse_id;
UPDATE market.stock_ledger SET delta = delta + 1 WHERE sku_id = :a;  -- MK030
DELETE FROM market.stock_ledger WHERE sku_id = :a;                   -- MK030
TRUNCATE market.stock_ledger;                                        -- MK030
SELECT count(*) AS ledger_rows FROM market.stock_ledger WHERE sku_id = :a;

SELECT * FROM market.verify_inventory();
