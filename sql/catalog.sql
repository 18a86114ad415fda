--
-- catalog: CREATE EXTENSION, then seller_create, product_create, sku_create
-- and warehouse_create with good and bad input.
--
-- Errors are shown by SQLSTATE only (VERBOSITY sqlstate), so the expected
-- output does not depend on the wording of messages.  Ids are kept in psql
-- variables and never printed.
--
CREATE EXTENSION market;
\set VERBOSITY sqlstate

SELECT extversion FROM pg_extension WHERE extname = 'market';
SELECT rolname, rolcanlogin FROM pg_roles
 WHERE rolname IN ('market_admin', 'market_app') ORDER BY rolname;

-- ---------------------------------------------------------------------------
-- seller_create(name)
-- ---------------------------------------------------------------------------
SELECT market.seller_create('Catalog Seller') AS seller \gset
SELECT name FROM market.sellers WHERE id = :seller;
SELECT market.seller_create(repeat('s', 200)) IS NOT NULL AS name_of_200_chars_ok;
SELECT count(*) AS sellers FROM market.sellers;
SELECT market.seller_create(NULL);              -- MK020
SELECT market.seller_create('');                -- MK020
SELECT market.seller_create('   ');             -- MK020 (blank)
SELECT market.seller_create(repeat('s', 201));  -- MK020 (too long)
SELECT count(*) AS sellers FROM market.sellers; -- unchanged

-- ---------------------------------------------------------------------------
-- product_create(seller_id, title, description, brand, category, attributes)
-- ---------------------------------------------------------------------------
SELECT market.product_create(:seller, 'Phone X') AS product \gset
SELECT seller_id = :seller AS right_seller, title, description, brand, category, attributes
  FROM market.products WHERE id = :product;
SELECT market.product_create(:seller, 'Phone Y', 'A phone.', 'Acme',
                             'electronics/phones', '{"color": "black"}') AS product2 \gset
SELECT title, description, brand, category, attributes
  FROM market.products WHERE id = :product2;
-- NULL description and attributes fall back to the defaults
SELECT market.product_create(:seller, 'Kettle', NULL, NULL, 'home-garden/kitchen_tools', NULL) AS product3 \gset
SELECT title, description, brand, category, attributes
  FROM market.products WHERE id = :product3;
SELECT market.product_create(:seller, repeat('t', 500)) IS NOT NULL AS title_of_500_chars_ok;
SELECT count(*) AS products FROM market.products;
-- unknown seller
SELECT market.product_create(999999999, 'Ghost');                   -- MK013
SELECT market.product_create(NULL, 'Ghost');                        -- MK020 (NULL argument)
-- title
SELECT market.product_create(:seller, NULL);                        -- MK020
SELECT market.product_create(:seller, '');                          -- MK020
SELECT market.product_create(:seller, '  ');                        -- MK020
SELECT market.product_create(:seller, repeat('t', 501));            -- MK020
-- category: a lower-case path
SELECT market.product_create(:seller, 'Bad', '', NULL, 'Electronics');          -- MK020
SELECT market.product_create(:seller, 'Bad', '', NULL, 'electronics/Phones');   -- MK020
SELECT market.product_create(:seller, 'Bad', '', NULL, 'electronics//phones');  -- MK020
SELECT market.product_create(:seller, 'Bad', '', NULL, '/electronics');         -- MK020
SELECT market.product_create(:seller, 'Bad', '', NULL, 'electronics/');         -- MK020
SELECT market.product_create(:seller, 'Bad', '', NULL, 'electronics phones');   -- MK020
SELECT market.product_create(:seller, 'Bad', '', NULL, '');                     -- MK020
-- attributes: a JSON object
SELECT market.product_create(:seller, 'Bad', '', NULL, NULL, '[]');             -- MK021
SELECT market.product_create(:seller, 'Bad', '', NULL, NULL, '"red"');          -- MK021
SELECT market.product_create(:seller, 'Bad', '', NULL, NULL, '42');             -- MK021
SELECT market.product_create(:seller, 'Bad', '', NULL, NULL, 'null');           -- MK021
SELECT market.product_create(:seller, 'Bad', '', NULL, NULL, '{"a": ');         -- 22P02 (not JSON)
SELECT count(*) AS products FROM market.products; -- unchanged

-- ---------------------------------------------------------------------------
-- sku_create(product_id, sku_code, price_minor, currency, attributes)
-- ---------------------------------------------------------------------------
SELECT market.sku_create(:product, 'CAT-PHONE-X-BLK', 49900, 'USD') AS sku \gset
SELECT product_id = :product AS right_product, sku_code, price_minor, currency, attributes
  FROM market.skus WHERE id = :sku;
SELECT market.sku_create(:product, 'CAT-PHONE-X-WHT', 0, 'EUR', '{"color": "white"}') AS sku2 \gset
SELECT sku_code, price_minor, currency, attributes FROM market.skus WHERE id = :sku2;
SELECT market.sku_create(:product, repeat('C', 100), 1, 'JPY', NULL) IS NOT NULL AS code_of_100_chars_ok;
SELECT count(*) AS skus FROM market.skus;
-- unknown product
SELECT market.sku_create(999999999, 'CAT-GHOST', 100, 'USD');        -- MK012
SELECT market.sku_create(NULL, 'CAT-GHOST', 100, 'USD');             -- MK020 (NULL argument)
-- code
SELECT market.sku_create(:product, 'CAT-PHONE-X-BLK', 100, 'USD');   -- MK014 (duplicate)
SELECT market.sku_create(:product2, 'CAT-PHONE-X-BLK', 100, 'USD');  -- MK014 (unique across products)
SELECT market.sku_create(:product, NULL, 100, 'USD');                -- MK020
SELECT market.sku_create(:product, '', 100, 'USD');                  -- MK020
SELECT market.sku_create(:product, '   ', 100, 'USD');               -- MK020
SELECT market.sku_create(:product, repeat('C', 101), 100, 'USD');    -- MK020
-- price
SELECT market.sku_create(:product, 'CAT-BAD', -1, 'USD');            -- MK020
SELECT market.sku_create(:product, 'CAT-BAD', NULL, 'USD');          -- MK020
-- currency
SELECT market.sku_create(:product, 'CAT-BAD', 100, 'usd');           -- MK022
SELECT market.sku_create(:product, 'CAT-BAD', 100, 'US');            -- MK022
SELECT market.sku_create(:product, 'CAT-BAD', 100, 'USDX');          -- MK022
SELECT market.sku_create(:product, 'CAT-BAD', 100, 'U1D');           -- MK022
SELECT market.sku_create(:product, 'CAT-BAD', 100, '');              -- MK022
SELECT market.sku_create(:product, 'CAT-BAD', 100, NULL);            -- MK022
-- attributes
SELECT market.sku_create(:product, 'CAT-BAD', 100, 'USD', '[1, 2]'); -- MK021
SELECT market.sku_create(:product, 'CAT-BAD', 100, 'USD', 'true');   -- MK021
SELECT count(*) AS skus FROM market.skus; -- unchanged
SELECT count(*) AS bad_skus FROM market.skus WHERE sku_code = 'CAT-BAD';

-- ---------------------------------------------------------------------------
-- warehouse_create(code, name, priority)
-- ---------------------------------------------------------------------------
SELECT market.warehouse_create('cat-main', 'Main warehouse') AS wh \gset
SELECT code, name, priority FROM market.warehouses WHERE id = :wh;
SELECT market.warehouse_create('cat-east', 'East', 10) AS wh2 \gset
SELECT code, name, priority FROM market.warehouses WHERE id = :wh2;
SELECT :wh2 > :wh AS ids_ascend;
SELECT count(*) AS warehouses FROM market.warehouses;
SELECT market.warehouse_create('cat-main', 'Again');                 -- MK014 (duplicate)
SELECT market.warehouse_create(NULL, 'Nameless');                    -- MK020
SELECT market.warehouse_create('', 'Nameless');                      -- MK020
SELECT market.warehouse_create('  ', 'Nameless');                    -- MK020
SELECT market.warehouse_create(repeat('w', 65), 'Long');             -- MK020
SELECT market.warehouse_create('cat-x', NULL);                       -- MK020
SELECT market.warehouse_create('cat-x', '');                         -- MK020
SELECT market.warehouse_create('cat-x', '   ');                      -- MK020
SELECT market.warehouse_create('cat-x', repeat('n', 201));           -- MK020
SELECT market.warehouse_create('cat-x', 'X', NULL);                  -- MK020
SELECT count(*) AS warehouses FROM market.warehouses; -- unchanged

-- no stock, ledger row or reservation yet
SELECT (SELECT count(*) FROM market.stock) AS stock_rows,
       (SELECT count(*) FROM market.stock_ledger) AS ledger_rows,
       (SELECT count(*) FROM market.reservations) AS reservations;
