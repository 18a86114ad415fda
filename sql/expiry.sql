--
-- expiry: market.expire_reservations() run by hand (the worker is off in this
-- suite), max_reservations, oldest first, available() before and after the
-- clean-up, reserve() using expired units, worker_status().
--
\set VERBOSITY sqlstate

SELECT market.seller_create('Expiry Seller') AS seller \gset
SELECT market.product_create(:seller, 'Expiry product') AS product \gset
SELECT market.sku_create(:product, 'EXP-A', 100, 'USD') AS a \gset
SELECT market.warehouse_create('exp-w1', 'Expiry W1') AS w1 \gset
SELECT market.stock_set(:a, :w1, 10) AS on_hand;

-- the worker is not running in this suite
SELECT running FROM market.worker_status();

-- start from no expired reservation anywhere
SELECT market.expire_reservations() >= 0 AS drained;
SELECT market.expire_reservations() AS nothing_left;

-- three short reservations, oldest first, and a long one
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '1 second', 'e1') AS e1 \gset
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '1 second', 'e2') AS e2 \gset
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '1 second', 'e3') AS e3 \gset
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2}]', :a)::jsonb, '1 hour', 'live') AS live \gset
SELECT market.available(:a) AS avail, market.available(:a, :w1) AS avail_w1;  -- 10 - 5
SELECT market.expire_reservations() AS expired;            -- none yet
SELECT pg_sleep(1.2);
-- past expires_at, the units count as available at once, before any clean-up
SELECT market.available(:a) AS avail, market.available(:a, :w1) AS avail_w1;  -- 10 - 2
SELECT owner, status FROM market.reservations WHERE id = :'live';

-- max_reservations, oldest first
SELECT market.expire_reservations(2) AS expired;
SELECT owner, status, finished_at IS NOT NULL AS finished FROM market.reservations
 WHERE id IN (:'e1', :'e2') ORDER BY owner;
SELECT owner, status, expires_at < now() AS past_expiry FROM market.reservations WHERE id = :'e3';
SELECT market.available(:a) AS avail;                      -- still 8
SELECT market.expire_reservations() AS expired;            -- e3
SELECT market.expire_reservations() AS expired;            -- none
SELECT owner, status, finished_at IS NOT NULL AS finished FROM market.reservations
 WHERE id IN (:'e1', :'e2', :'e3', :'live') ORDER BY owner;
-- the units went back to free stock; on-hand did not move; no sale
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
SELECT market.available(:a) AS avail;
SELECT kind, delta FROM market.stock_ledger WHERE sku_id = :a ORDER BY id;

-- an expired reservation is over
SELECT market.reservation_commit(:'e1');                   -- MK002
SELECT market.reservation_extend(:'e2', '5 min');          -- MK002
SELECT market.reservation_release(:'e3') AS released;      -- false
SELECT market.available(:a) AS avail;                      -- still 8

-- bad argument
SELECT market.expire_reservations(NULL);                   -- MK020

-- reserve() can use units whose reservation expired but was not cleaned up
SELECT market.reserve(format('[{"sku_id": %s, "qty": 8}]', :a)::jsonb, '1 second', 'x1') AS x1 \gset
SELECT market.available(:a) AS avail;                      -- 0
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb);   -- MK001
SELECT pg_sleep(1.2);
SELECT market.available(:a) AS avail;                      -- 8
SELECT market.reserve(format('[{"sku_id": %s, "qty": 8}]', :a)::jsonb, '1 hour', 'x2') AS x2 \gset
SELECT market.available(:a) AS avail;                      -- 0
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
SELECT owner, status FROM market.reservations WHERE id = :'x2';
SELECT market.reservation_commit(:'x1');                   -- MK002
SELECT market.reservation_commit(:'x2') AS units_sold;     -- 8
SELECT market.expire_reservations() >= 0 AS tidied;
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
SELECT market.available(:a) AS avail;                      -- 0: 2 on hand, both held by 'live'
SELECT market.reservation_release(:'live') AS released;
SELECT market.available(:a) AS avail;                      -- 2

-- the counters in worker_status() are readable here too
SELECT expired_total >= 0 AS expired_total_ok, purged_total >= 0 AS purged_total_ok
  FROM market.worker_status();

SELECT * FROM market.verify_inventory();
