--
-- reservation_lifecycle: reservation_extend, reservation_release and
-- reservation_commit on live, unknown, released, committed and expired
-- reservations; the sale rows of the ledger.
--
\set VERBOSITY sqlstate

SELECT market.seller_create('Lifecycle Seller') AS seller \gset
SELECT market.product_create(:seller, 'Lifecycle product') AS product \gset
SELECT market.sku_create(:product, 'LC-A', 100, 'USD') AS a \gset
SELECT market.sku_create(:product, 'LC-B', 100, 'USD') AS b \gset
SELECT market.warehouse_create('lc-w1', 'Lifecycle W1', 10) AS w1 \gset
SELECT market.warehouse_create('lc-w2', 'Lifecycle W2', 20) AS w2 \gset
SELECT market.stock_set(:a, :w1, 20) AS a_w1, market.stock_set(:b, :w1, 10) AS b_w1,
       market.stock_set(:b, :w2, 5) AS b_w2;
SELECT gen_random_uuid() AS unknown \gset

-- ---------------------------------------------------------------------------
-- reservation_extend
-- ---------------------------------------------------------------------------
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2}]', :a)::jsonb) AS r1 \gset
SELECT market.reservation_extend(:'r1', '2 hours') AS new_expiry \gset
SELECT :'new_expiry'::timestamptz = expires_at AS returns_new_expiry,
       expires_at BETWEEN now() + interval '119 min' AND now() + interval '2 hours' AS two_hours,
       status
  FROM market.reservations WHERE id = :'r1';
-- extend may also shorten
SELECT market.reservation_extend(:'r1', '1 min') AS new_expiry \gset
SELECT :'new_expiry'::timestamptz = expires_at AS returns_new_expiry,
       expires_at BETWEEN now() AND now() + interval '1 min' AS one_minute
  FROM market.reservations WHERE id = :'r1';
SELECT market.reservation_extend(:'r1', '24 hours') > now() + interval '23 hours 59 min' AS max_ttl_ok;
SELECT market.reservation_extend(:'r1', '15 min') > now() AS extended;
-- the shortest ttl, on a reservation of its own
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb) AS r1b \gset
SELECT market.reservation_extend(:'r1b', '1 second') AS new_expiry \gset
SELECT :'new_expiry'::timestamptz <= now() + interval '1 second' AS min_ttl_ok;
SELECT market.reservation_release(:'r1b') IS NOT NULL AS ended;
SELECT market.reservation_extend(:'r1', '0 s');             -- MK023
SELECT market.reservation_extend(:'r1', '-1 s');            -- MK023
SELECT market.reservation_extend(:'r1', '25 hours');        -- MK023
SELECT market.reservation_extend(:'r1', '1 mon');           -- MK023
SELECT market.reservation_extend(:'r1', NULL);              -- MK020
SELECT market.reservation_extend(NULL, '1 min');            -- MK020
SELECT market.reservation_extend(:'unknown', '1 min');      -- MK002
SELECT market.reservation_extend('not-a-uuid', '1 min');    -- 22P02
-- the failed calls left it alone
SELECT status, expires_at BETWEEN now() + interval '14 min' AND now() + interval '15 min' AS still_15_min
  FROM market.reservations WHERE id = :'r1';
SELECT market.available(:a) AS avail_a;                     -- 20 - 2

-- ---------------------------------------------------------------------------
-- reservation_release
-- ---------------------------------------------------------------------------
SELECT market.reservation_release(:'r1') AS released;
SELECT status, finished_at IS NOT NULL AS finished FROM market.reservations WHERE id = :'r1';
SELECT market.available(:a) AS avail_a;                     -- back to 20
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
SELECT market.reservation_release(:'r1') AS released_again; -- harmless: false
SELECT market.available(:a) AS avail_a;                     -- not returned twice
SELECT market.reservation_extend(:'r1', '1 min');           -- MK002
SELECT market.reservation_commit(:'r1');                    -- MK002
SELECT market.reservation_release(NULL);                    -- MK020
SELECT market.reservation_release(:'unknown');              -- MK002
SELECT status FROM market.reservations WHERE id = :'r1';

-- ---------------------------------------------------------------------------
-- reservation_commit
-- ---------------------------------------------------------------------------
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}, {"sku_id": %s, "qty": 4}, {"sku_id": %s, "qty": 2, "warehouse_id": %s}]',
                             :a, :b, :b, :w2)::jsonb, '10 min', 'order-1') AS r2 \gset
SELECT market.available(:a) AS avail_a, market.available(:b) AS avail_b;   -- 17, 9
SELECT market.reservation_extend(:'r2', '20 min') > now() AS extended;
SELECT market.reservation_commit(:'r2') AS units_sold;                     -- 9
SELECT status, finished_at IS NOT NULL AS finished, owner FROM market.reservations WHERE id = :'r2';
-- the units left stock: on-hand fell, nothing is held, available is unchanged
SELECT market.available(:a) AS avail_a, market.available(:b) AS avail_b;   -- 17, 9
SELECT s.sku_code, h.code AS warehouse, l.on_hand, l.held, l.free
  FROM market.stock_levels l
  JOIN market.skus s ON s.id = l.sku_id
  JOIN market.warehouses h ON h.id = l.warehouse_id
 WHERE l.sku_id IN (:a, :b) ORDER BY 1, 2;
-- one sale row per SKU and warehouse
SELECT s.sku_code, h.code AS warehouse, g.delta
  FROM market.stock_ledger g
  JOIN market.skus s ON s.id = g.sku_id
  JOIN market.warehouses h ON h.id = g.warehouse_id
 WHERE g.kind = 'sale' AND g.reservation_id = :'r2' ORDER BY 1, 2;
SELECT count(*) AS sale_rows_elsewhere FROM market.stock_ledger
 WHERE kind = 'sale' AND sku_id IN (:a, :b) AND reservation_id IS DISTINCT FROM :'r2';
-- a committed reservation is final
SELECT market.reservation_commit(:'r2');                    -- MK002
SELECT market.reservation_release(:'r2');                   -- MK002
SELECT market.reservation_extend(:'r2', '1 min');           -- MK002
SELECT market.reservation_commit(NULL);                     -- MK020
SELECT market.reservation_commit(:'unknown');               -- MK002
SELECT status FROM market.reservations WHERE id = :'r2';
SELECT count(*) AS sale_rows FROM market.stock_ledger WHERE kind = 'sale' AND reservation_id = :'r2';

-- commit right after reserve, no extend
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb) AS r3 \gset
SELECT market.reservation_commit(:'r3') AS units_sold;
SELECT market.available(:a) AS avail_a;                     -- 16
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;

-- ---------------------------------------------------------------------------
-- expired but not yet cleaned up (the expiry worker is off here)
-- ---------------------------------------------------------------------------
SELECT market.reserve(format('[{"sku_id": %s, "qty": 5}]', :a)::jsonb, '1 second') AS rc \gset
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '1 second') AS re \gset
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '1 second') AS rr \gset
SELECT market.available(:a) AS avail_a;                     -- 16 - 7
SELECT pg_sleep(1.2);
SELECT market.available(:a) AS avail_a;                     -- expired units count at once: 16
SELECT market.reservation_commit(:'rc');                    -- MK002
SELECT market.reservation_extend(:'re', '10 min');          -- MK002
SELECT market.reservation_release(:'rr') AS released;       -- false
SELECT market.reservation_release(:'rr') AS released;       -- false
SELECT market.reservation_commit(:'rr');                    -- MK002
SELECT count(*) AS sale_rows FROM market.stock_ledger
 WHERE reservation_id IN (:'rc', :'re', :'rr');
SELECT market.available(:a) AS avail_a;
SELECT on_hand FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;  -- no sale: 16
SELECT market.expire_reservations() >= 2 AS cleaned_up;
SELECT id = :'rc' AS is_rc, status FROM market.reservations
 WHERE id IN (:'rc', :'re') ORDER BY 1;
SELECT status <> 'held' AS finished FROM market.reservations WHERE id = :'rr';
-- once cleaned up, the same answers
SELECT market.reservation_commit(:'rc');                    -- MK002
SELECT market.reservation_extend(:'re', '10 min');          -- MK002
SELECT market.reservation_release(:'re') AS released;       -- false
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
SELECT market.available(:a) AS avail_a;

SELECT * FROM market.verify_inventory();
