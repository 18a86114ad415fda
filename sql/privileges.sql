--
-- privileges: what market_app, market_admin and a role with no grant
-- (PUBLIC only) may do, tried for real with SET ROLE.
--
\set VERBOSITY sqlstate

SELECT market.seller_create('Privileges Seller') AS seller \gset
SELECT market.product_create(:seller, 'Privileges product') AS product \gset
SELECT market.sku_create(:product, 'PRV-A', 100, 'USD') AS a \gset
SELECT market.warehouse_create('prv-w1', 'Privileges W1') AS w1 \gset
SELECT market.stock_set(:a, :w1, 10) AS on_hand;
SELECT market.sku_create(:product, 'PRV-CART', 250, 'USD') AS cs \gset
SELECT market.stock_set(:cs, :w1, 10) AS cart_sku_on_hand;
CREATE ROLE regress_market_nobody NOLOGIN;

-- ---------------------------------------------------------------------------
-- market_app: the reservation API, nothing else
-- ---------------------------------------------------------------------------
SET ROLE market_app;
SELECT current_user;
SELECT market.available(:a) AS avail, market.available(:a, :w1) AS avail_w1;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2}]', :a)::jsonb, '10 min', 'app-cart') AS r1 \gset
SELECT market.available(:a) AS avail;
SELECT market.reservation_extend(:'r1', '20 min') > now() AS extended;
SELECT market.reservation_release(:'r1') AS released;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}]', :a)::jsonb) AS r2 \gset
SELECT market.reservation_commit(:'r2') AS units_sold;
SELECT market.available(:a) AS avail;
-- errors still carry their own SQLSTATE for the app
SELECT market.reserve(format('[{"sku_id": %s, "qty": 100}]', :a)::jsonb);   -- MK001
-- the order API is the app's too: an unknown order is MK017, not 42501
SELECT market.order_transition(-1, 'cancelled');                            -- MK017
SELECT market.order_view(-1);                                               -- MK017
SELECT count(*) AS edges FROM market.order_transitions();
-- no admin function
SELECT market.seller_create('App Seller');                                  -- 42501
SELECT market.product_create(:seller, 'App product');                       -- 42501
SELECT market.sku_create(:product, 'PRV-APP', 1, 'USD');                    -- 42501
SELECT market.warehouse_create('prv-app', 'App');                           -- 42501
SELECT market.stock_set(:a, :w1, 100);                                      -- 42501
SELECT market.stock_adjust(:a, :w1, 1, 'app');                              -- 42501
SELECT market.expire_reservations();                                        -- 42501
SELECT market.verify_inventory();                                           -- 42501
SELECT market.worker_status();                                              -- 42501
SELECT market.order_transition_many(ARRAY[-1]::bigint[], 'cancelled');      -- 42501 (admin only)
-- no table or view, not even for reading
SELECT count(*) FROM market.sellers;                                        -- 42501
SELECT count(*) FROM market.skus;                                           -- 42501
SELECT count(*) FROM market.stock;                                          -- 42501
SELECT count(*) FROM market.stock_slots;                                    -- 42501
SELECT count(*) FROM market.reservations;                                   -- 42501
SELECT count(*) FROM market.stock_ledger;                                   -- 42501
SELECT count(*) FROM market.reservation_lines;                              -- 42501
SELECT count(*) FROM market.stock_levels;                                   -- 42501
INSERT INTO market.sellers (name) VALUES ('app');                           -- 42501
UPDATE market.stock_slots SET free = on_hand;                               -- 42501
UPDATE market.reservations SET expires_at = now() + interval '1 year';      -- 42501
DELETE FROM market.reservations;                                            -- 42501
INSERT INTO market.stock_ledger (sku_id, warehouse_id, delta, kind) VALUES (:a, :w1, 1000, 'adjust'); -- 42501
TRUNCATE market.stock_slots;                                                -- 42501
UPDATE market.orders SET status = 'cancelled';                              -- 42501
SELECT count(*) FROM market.order_events;                                   -- 42501
-- carts and checkout: the whole flow, but not the purge or the tables
SELECT market.cart_create('prv-customer') AS cart \gset
SELECT market.cart_set_item(:'cart', :cs, 2) AS qty;
SELECT (market.cart_view(:'cart')->>'total_minor')::bigint AS cart_total;
SELECT market.checkout_begin(:'cart') AS co \gset
SELECT (market.checkout_complete(:'co', 'prv-k1'))->'payment'->>'amount_minor' AS paid;
SELECT (market.buy_now('prv-customer', format('[{"sku_id": %s, "qty": 1}]', :cs)::jsonb, 'prv-k2'))->'payment'->>'amount_minor' AS paid;
SELECT market.idempotency_purge();                                          -- 42501
SELECT count(*) FROM market.checkouts;                                      -- 42501
SELECT count(*) FROM market.idempotency_keys;                               -- 42501
SELECT count(*) FROM market.carts;                                          -- 42501
DELETE FROM market.idempotency_keys;                                        -- 42501
UPDATE market.checkouts SET status = 'open';                                -- 42501
RESET ROLE;
SELECT current_user = session_user AS back_to_superuser;
-- the app's calls are recorded as the session user in the ledger
SELECT kind, delta, actor = session_user AS actor_ok FROM market.stock_ledger
 WHERE sku_id = :a ORDER BY id;

-- ---------------------------------------------------------------------------
-- market_admin: every function, read-only tables
-- ---------------------------------------------------------------------------
SET ROLE market_admin;
SELECT current_user;
SELECT market.seller_create('Admin Seller') IS NOT NULL AS seller_created;
SELECT market.product_create(:seller, 'Admin product') AS admin_product \gset
SELECT market.sku_create(:admin_product, 'PRV-ADMIN', 1, 'USD') AS admin_sku \gset
SELECT market.warehouse_create('prv-admin', 'Admin W') AS admin_wh \gset
SELECT market.stock_set(:admin_sku, :admin_wh, 5) AS on_hand;
SELECT market.stock_adjust(:admin_sku, :admin_wh, 1, 'admin count') AS on_hand;
SELECT market.available(:admin_sku) AS avail;
-- the admin may move orders in bulk: an unknown one is MK017, not 42501
SELECT market.order_transition_many(ARRAY[-1]::bigint[], 'cancelled');      -- MK017
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :admin_sku)::jsonb) AS r3 \gset
SELECT market.reservation_extend(:'r3', '5 min') > now() AS extended;
SELECT market.reservation_commit(:'r3') AS units_sold;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :admin_sku)::jsonb) AS r4 \gset
SELECT market.reservation_release(:'r4') AS released;
SELECT market.expire_reservations() >= 0 AS expired_ok;
SELECT running IS NOT NULL AS status_ok FROM market.worker_status();
SELECT count(*) AS violations FROM market.verify_inventory();
-- every table and view can be read
SELECT sku_code FROM market.skus WHERE id = :admin_sku;
SELECT count(*) > 0 AS sellers FROM market.sellers;
SELECT count(*) > 0 AS products FROM market.products;
SELECT count(*) > 0 AS warehouses FROM market.warehouses;
SELECT count(*) > 0 AS stock FROM market.stock;
SELECT count(*) > 0 AS stock_slots FROM market.stock_slots;
SELECT count(*) > 0 AS reservations FROM market.reservations;
SELECT count(*) > 0 AS stock_ledger FROM market.stock_ledger;
SELECT count(*) > 0 AS reservation_lines FROM market.reservation_lines;
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :admin_sku;
-- but not written
INSERT INTO market.sellers (name) VALUES ('admin');                         -- 42501
INSERT INTO market.warehouses (code, name) VALUES ('prv-x', 'X');           -- 42501
UPDATE market.skus SET price_minor = 0 WHERE id = :admin_sku;               -- 42501
UPDATE market.stock_slots SET free = on_hand WHERE sku_id = :admin_sku;     -- 42501
UPDATE market.reservations SET status = 'released' WHERE id = :'r3';        -- 42501
DELETE FROM market.stock WHERE sku_id = :admin_sku;                         -- 42501
DELETE FROM market.stock_ledger WHERE sku_id = :admin_sku;                  -- 42501
INSERT INTO market.stock_ledger (sku_id, warehouse_id, delta, kind) VALUES (:admin_sku, :admin_wh, 1, 'adjust'); -- 42501
TRUNCATE market.reservations;                                               -- 42501
-- carts and checkout, the purge, and the checkout tables read-only
SELECT market.idempotency_purge() AS purged;
SELECT status FROM market.checkouts WHERE id = :'co';
SELECT operation, response IS NOT NULL AS has_response FROM market.idempotency_keys
 WHERE customer_id = 'prv-customer' ORDER BY operation;
SELECT market.cart_create('prv-admin') IS NOT NULL AS admin_cart;
DELETE FROM market.idempotency_keys;                                        -- 42501
UPDATE market.checkouts SET status = 'open' WHERE id = :'co';               -- 42501
RESET ROLE;

-- ---------------------------------------------------------------------------
-- a role with no grant at all: PUBLIC may do nothing
-- ---------------------------------------------------------------------------
SET ROLE regress_market_nobody;
SELECT market.available(:a);                                                -- 42501
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb);     -- 42501
SELECT market.reservation_release(gen_random_uuid());                       -- 42501
SELECT count(*) FROM market.skus;                                           -- 42501
SELECT market.cart_create('nobody');                                        -- 42501
RESET ROLE;
-- even with USAGE on the schema, no function and no table
GRANT USAGE ON SCHEMA market TO regress_market_nobody;
SET ROLE regress_market_nobody;
SELECT market.available(:a);                                                -- 42501
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb);     -- 42501
SELECT market.reservation_extend(gen_random_uuid(), '1 min');               -- 42501
SELECT market.reservation_release(gen_random_uuid());                       -- 42501
SELECT market.reservation_commit(gen_random_uuid());                        -- 42501
SELECT market.seller_create('Nobody');                                      -- 42501
SELECT market.stock_set(:a, :w1, 1);                                        -- 42501
SELECT market.expire_reservations();                                        -- 42501
SELECT market.verify_inventory();                                           -- 42501
SELECT market.worker_status();                                              -- 42501
SELECT market.order_transition(1, 'cancelled');                             -- 42501
SELECT market.order_transition_many(ARRAY[1]::bigint[], 'cancelled');       -- 42501
SELECT market.order_view(1);                                                -- 42501
SELECT market.order_transitions();                                          -- 42501
SELECT count(*) FROM market.skus;                                           -- 42501
SELECT count(*) FROM market.stock_levels;                                   -- 42501
SELECT count(*) FROM market.reservation_lines;                              -- 42501
INSERT INTO market.sellers (name) VALUES ('nobody');                        -- 42501
SELECT market.cart_create('nobody');                                        -- 42501
SELECT market.cart_set_item(:'cart', :cs, 1);                               -- 42501
SELECT market.cart_view(:'cart');                                           -- 42501
SELECT market.checkout_begin(:'cart');                                      -- 42501
SELECT market.checkout_complete(:'co', 'nobody-k');                         -- 42501
SELECT market.buy_now('nobody', format('[{"sku_id": %s, "qty": 1}]', :cs)::jsonb, 'k'); -- 42501
SELECT market.idempotency_purge();                                          -- 42501
SELECT count(*) FROM market.checkouts;                                      -- 42501
RESET ROLE;
REVOKE USAGE ON SCHEMA market FROM regress_market_nobody;
DROP ROLE regress_market_nobody;

-- nothing above changed the stock behind the functions' back
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
SELECT market.available(:a) AS avail;
SELECT market.available(:cs) AS cart_sku_avail;   -- 10 - 2 - 1 sold
SELECT * FROM market.verify_inventory();

-- ---------------------------------------------------------------------------
-- the outbox: consumers (market_app) claim, ack and fail; market_admin also
-- retries, cleans up and reads the status; nobody writes the table directly
-- ---------------------------------------------------------------------------
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id)
VALUES ('psp', 'prv.job', 'prv', 1), ('psp', 'prv.job', 'prv', 2);
SET ROLE market_app;
SELECT id AS ob1 FROM market.outbox_claim('prv-app', 1, 'psp') \gset
SELECT market.outbox_ack(ARRAY[:ob1], 'prv-app') AS acked;
SELECT id AS ob2 FROM market.outbox_claim('prv-app', 1, 'psp') \gset
SELECT :ob2 > :ob1 AS another_row;
SELECT market.outbox_fail(:ob2, 'prv failure', 'prv-app') AS outcome;
SELECT market.outbox_retry(:ob2);                                           -- 42501
SELECT market.outbox_cleanup();                                             -- 42501
SELECT * FROM market.outbox_status();                                       -- 42501
SELECT * FROM market.outbox_notifier();                                     -- 42501
SELECT count(*) FROM market.outbox;                                         -- 42501
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id)
VALUES ('psp', 'prv.job', 'prv', 3);                                        -- 42501
UPDATE market.outbox SET acked_at = now();                                  -- 42501
RESET ROLE;
SET ROLE market_admin;
SELECT count(*) AS claimed FROM market.outbox_claim('prv-admin', 10, 'events');
SELECT market.outbox_retry(:ob2);                                           -- MK054: allowed, not dead
SELECT market.outbox_cleanup() >= 0 AS cleanup_ok;
SELECT topic FROM market.outbox_status() ORDER BY topic;
SELECT topic FROM market.outbox_notifier() ORDER BY topic;
SELECT lease_owner, attempts, last_error FROM market.outbox WHERE id = :ob2;
DELETE FROM market.outbox WHERE aggregate_type = 'prv';                     -- 42501
RESET ROLE;
CREATE ROLE regress_market_outbox_nobody NOLOGIN;
GRANT USAGE ON SCHEMA market TO regress_market_outbox_nobody;
SET ROLE regress_market_outbox_nobody;
SELECT * FROM market.outbox_claim('nobody');                                -- 42501
SELECT market.outbox_ack(ARRAY[1]);                                         -- 42501
SELECT market.outbox_fail(1, 'x');                                          -- 42501
SELECT * FROM market.outbox_status();                                       -- 42501
RESET ROLE;
REVOKE USAGE ON SCHEMA market FROM regress_market_outbox_nobody;
DROP ROLE regress_market_outbox_nobody;
DELETE FROM market.outbox WHERE aggregate_type = 'prv';
