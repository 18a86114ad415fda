--
-- cart: cart_create, cart_set_item and cart_view with good and bad input;
-- live prices and availability in the view; what changing a cart does to
-- its open checkout.
--
-- Errors are shown by SQLSTATE only; ids are kept in psql variables and
-- compared, never printed.
--
\set VERBOSITY sqlstate

-- the SQLSTATE a statement raises, or 'ok'
CREATE FUNCTION pg_temp.sqlstate_of(cmd text) RETURNS text
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE cmd;
	RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
	RETURN SQLSTATE;
END
$$;

SELECT market.seller_create('Cart Seller One') AS s1 \gset
SELECT market.seller_create('Cart Seller Two') AS s2 \gset
SELECT market.product_create(:s1, 'Cart product one') AS p1 \gset
SELECT market.product_create(:s2, 'Cart product two') AS p2 \gset
SELECT market.sku_create(:p1, 'CRT-A', 1250, 'USD') AS a \gset
SELECT market.sku_create(:p1, 'CRT-B', 300, 'USD') AS b \gset
SELECT market.sku_create(:p2, 'CRT-C', 9999, 'USD') AS c \gset
SELECT market.sku_create(:p2, 'CRT-E', 500, 'EUR') AS e \gset
SELECT market.warehouse_create('crt-w1', 'Cart W1') AS w1 \gset
SELECT market.stock_set(:a, :w1, 100) AS a_on_hand;
SELECT market.stock_set(:b, :w1, 3) AS b_on_hand;
-- CRT-C has no stock at all

-- the cart's per-line view, without ids
CREATE FUNCTION pg_temp.lines(v jsonb)
RETURNS TABLE (sku text, qty int, unit bigint, line_total bigint, availability text, n int)
LANGUAGE sql AS $$
	SELECT l->>'sku_code', (l->>'qty')::int, (l->>'unit_price_minor')::bigint,
		   (l->>'line_total_minor')::bigint, l->>'availability', (l->>'n')::int
	  FROM jsonb_array_elements(v->'lines') AS l
$$;

-- ---------------------------------------------------------------------------
-- cart_create(customer_id, currency)
-- ---------------------------------------------------------------------------
SELECT market.cart_create('cust-1') AS cart \gset
SELECT customer_id, currency, id = :'cart' AS same_id FROM market.carts WHERE id = :'cart';
SELECT market.cart_create('cust-eur', 'EUR') AS cart_eur \gset
SELECT currency FROM market.carts WHERE id = :'cart_eur';
SELECT market.cart_create('cust-1') <> :'cart' AS every_cart_is_new;
SELECT pg_temp.sqlstate_of($$SELECT market.cart_create(NULL)$$) AS null_customer;       -- MK020
SELECT pg_temp.sqlstate_of($$SELECT market.cart_create('  ')$$) AS blank_customer;      -- MK020
SELECT pg_temp.sqlstate_of($$SELECT market.cart_create(repeat('c', 201))$$) AS long_customer; -- MK020
SELECT pg_temp.sqlstate_of($$SELECT market.cart_create(repeat('c', 200))$$) AS customer_200;  -- ok
SELECT pg_temp.sqlstate_of($$SELECT market.cart_create('cust-1', 'usd')$$) AS lower_currency; -- MK022
SELECT pg_temp.sqlstate_of($$SELECT market.cart_create('cust-1', 'EURO')$$) AS long_currency; -- MK022
SELECT pg_temp.sqlstate_of($$SELECT market.cart_create('cust-1', NULL)$$) AS null_currency;   -- MK022

-- ---------------------------------------------------------------------------
-- an empty cart
-- ---------------------------------------------------------------------------
SELECT market.cart_view(:'cart') AS v \gset
SELECT :'v'::jsonb->>'customer_id' AS customer, :'v'::jsonb->>'currency' AS currency,
	   :'v'::jsonb->'lines' AS lines, :'v'::jsonb->'sellers' AS sellers,
	   :'v'::jsonb->'total_minor' AS total, :'v'::jsonb->'checkout' AS checkout,
	   (:'v'::jsonb->>'cart_id')::uuid = :'cart' AS cart_id_ok;

-- ---------------------------------------------------------------------------
-- cart_set_item(cart, sku_id, qty)
-- ---------------------------------------------------------------------------
SELECT market.cart_set_item(:'cart', :a, 2) AS qty_a;
SELECT market.cart_set_item(:'cart', :b, 1) AS qty_b;
SELECT market.cart_set_item(:'cart', :c, 1) AS qty_c;
SELECT market.cart_set_item(:'cart', :a, 3) AS qty_a_again;  -- replaces, does not add
SELECT k.sku_code, i.qty FROM market.cart_items i JOIN market.skus k ON k.id = i.sku_id
 WHERE i.cart_id = :'cart' ORDER BY k.sku_code;

-- bad input changes nothing
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(NULL, %s, 1)', :a)) AS null_cart;        -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(%L, NULL, 1)', :'cart')) AS null_sku;    -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(%L, %s, NULL)', :'cart', :a)) AS null_qty; -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(%L, %s, -1)', :'cart', :a)) AS negative_qty; -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(%L, %s, %s)', :'cart', :a,
		current_setting('market.max_line_qty')::int + 1)) AS qty_above_max;                           -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(%L, %s, 1)', gen_random_uuid(), :a)) AS unknown_cart; -- MK015
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(%L, 999999999, 1)', :'cart')) AS unknown_sku; -- MK010
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(%L, %s, 1)', :'cart', :e)) AS foreign_currency; -- MK026
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(%L, %s, 1)', :'cart_eur', :a)) AS usd_sku_in_eur_cart; -- MK026
SELECT market.cart_set_item(:'cart_eur', :e, 4) AS eur_sku_in_eur_cart;
SELECT k.sku_code, i.qty FROM market.cart_items i JOIN market.skus k ON k.id = i.sku_id
 WHERE i.cart_id = :'cart' ORDER BY k.sku_code;

-- the number of lines is capped by market.max_reservation_lines
SET market.max_reservation_lines = 3;
SELECT market.cart_create('cust-cap') AS cap \gset
SELECT market.cart_set_item(:'cap', :a, 1), market.cart_set_item(:'cap', :b, 1), market.cart_set_item(:'cap', :c, 1);
SELECT market.product_create(:s1, 'Cart product four') AS p4 \gset
SELECT market.sku_create(:p4, 'CRT-D', 1, 'USD') AS d \gset
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_set_item(%L, %s, 1)', :'cap', :d)) AS fourth_line; -- MK020
SELECT market.cart_set_item(:'cap', :c, 5) AS changing_a_line_is_fine;
SELECT market.cart_set_item(:'cap', :c, 0) AS removed;
SELECT market.cart_set_item(:'cap', :d, 1) AS third_line_again;
RESET market.max_reservation_lines;

-- ---------------------------------------------------------------------------
-- cart_view: current prices, availability, per seller, total
-- ---------------------------------------------------------------------------
SHOW market.low_stock_threshold;
SELECT market.cart_view(:'cart') AS v \gset
SELECT * FROM pg_temp.lines(:'v') ORDER BY sku;
SELECT (s->>'seller_id')::bigint = :s1 AS seller_one, (s->>'subtotal_minor')::bigint AS subtotal
  FROM jsonb_array_elements(:'v'::jsonb->'sellers') AS s ORDER BY 1 DESC;
SELECT (:'v'::jsonb->>'total_minor')::bigint AS total,
	   (:'v'::jsonb->>'total_minor')::bigint = 3 * 1250 + 300 + 9999 AS total_ok;
-- seller ids and SKU ids of the lines
SELECT bool_and((l->>'sku_id')::bigint = k.id AND (l->>'seller_id')::bigint = p.seller_id) AS ids_ok
  FROM jsonb_array_elements(:'v'::jsonb->'lines') AS l
  JOIN market.skus k ON k.sku_code = l->>'sku_code'
  JOIN market.products p ON p.id = k.product_id;

-- availability follows stock and the threshold: others' reservations count
SELECT market.reserve(format('[{"sku_id": %s, "qty": 95}]', :a)::jsonb) AS r_a \gset
SET market.low_stock_threshold = 2;
SELECT sku, availability, n FROM pg_temp.lines(market.cart_view(:'cart')) ORDER BY sku;
SET market.low_stock_threshold = 10;
SELECT sku, availability, n FROM pg_temp.lines(market.cart_view(:'cart')) ORDER BY sku;
SELECT market.reservation_release(:'r_a') AS released;
SET market.low_stock_threshold = 0;
SELECT sku, availability, n FROM pg_temp.lines(market.cart_view(:'cart')) ORDER BY sku;
RESET market.low_stock_threshold;
SELECT pg_temp.sqlstate_of($$SET market.low_stock_threshold = -1$$) AS negative_threshold;  -- 22023

-- prices are live until checkout begins (there is no price-changing
-- function in this release: the catalog owner updates the row)
UPDATE market.skus SET price_minor = 1300 WHERE id = :a;
SELECT sku, unit, line_total FROM pg_temp.lines(market.cart_view(:'cart')) WHERE sku = 'CRT-A';
SELECT (market.cart_view(:'cart')->>'total_minor')::bigint AS total;   -- 3 * 1300 + 300 + 9999

-- removing a line
SELECT market.cart_set_item(:'cart', :c, 0) AS removed;
SELECT market.cart_set_item(:'cart', :c, 0) AS removing_again_is_harmless;
SELECT sku, qty FROM pg_temp.lines(market.cart_view(:'cart')) ORDER BY sku;
SELECT jsonb_array_length(market.cart_view(:'cart')->'sellers') AS sellers_left;

SELECT pg_temp.sqlstate_of($$SELECT market.cart_view(NULL)$$) AS null_cart;                     -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.cart_view(%L)', gen_random_uuid())) AS unknown_cart; -- MK015

-- ---------------------------------------------------------------------------
-- a cart with an open checkout: the view names it; changing the cart
-- abandons it and releases its units
-- ---------------------------------------------------------------------------
SELECT market.available(:a) AS a_before, market.available(:b) AS b_before;
SELECT market.checkout_begin(:'cart') AS co \gset
SELECT market.available(:a) AS a_held, market.available(:b) AS b_held;
SELECT (market.cart_view(:'cart')->'checkout'->>'checkout_id')::uuid = :'co' AS view_names_checkout,
	   (market.cart_view(:'cart')->'checkout'->>'total_minor')::bigint AS frozen_total;
SELECT market.cart_set_item(:'cart', :b, 2) AS qty_b;
SELECT status FROM market.checkouts WHERE id = :'co';
SELECT r.status FROM market.reservations r JOIN market.checkouts c ON c.reservation_id = r.id
 WHERE c.id = :'co';
SELECT market.available(:a) AS a_after, market.available(:b) AS b_after;
SELECT market.cart_view(:'cart')->'checkout' AS no_live_checkout;
SELECT pg_temp.sqlstate_of(format('SELECT market.checkout_complete(%L, %L)', :'co', 'cart-k1')) AS complete_abandoned; -- MK029

SELECT count(*) AS violations FROM market.verify_inventory();
