--
-- reserve: the items document, quantities, TTL and owner checks, summing of
-- duplicate lines, all-or-nothing, the MK001 detail and the warehouse rule.
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
-- the SQLSTATE and DETAIL of the error a statement raises
CREATE FUNCTION pg_temp.error_of(cmd text, OUT state text, OUT detail text)
LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE cmd;
	state := 'ok';
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, detail = PG_EXCEPTION_DETAIL;
END
$$;

SELECT market.seller_create('Reserve Seller') AS seller \gset
SELECT market.product_create(:seller, 'Reserve product') AS product \gset
SELECT market.sku_create(:product, 'RSV-A', 100, 'USD') AS a \gset
SELECT market.sku_create(:product, 'RSV-B', 100, 'USD') AS b \gset
SELECT market.sku_create(:product, 'RSV-M', 100, 'USD') AS m \gset
SELECT market.sku_create(:product, 'RSV-N', 100, 'USD') AS n \gset
SELECT market.warehouse_create('rsv-w1', 'Reserve W1') AS w1 \gset
SELECT market.stock_set(:a, :w1, 10) AS a_on_hand;
SELECT market.stock_set(:b, :w1, 2) AS b_on_hand;
SELECT market.stock_set(:m, :w1, 100) AS m_on_hand;
-- RSV-N has no stock at all

-- ---------------------------------------------------------------------------
-- a plain reservation
-- ---------------------------------------------------------------------------
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}]', :a)::jsonb) AS r1 \gset
SELECT status, owner,
       expires_at BETWEEN now() + interval '14 min' AND now() + interval '15 min' AS default_ttl
  FROM market.reservations WHERE id = :'r1';
SELECT sku_id = :a AS sku_ok, warehouse_id = :w1 AS wh_ok, sum(qty) AS qty, min(status) AS status
  FROM market.reservation_lines WHERE reservation_id = :'r1' GROUP BY 1, 2;
SELECT market.available(:a) AS avail_a;                    -- 10 - 3
SELECT on_hand, held, free FROM market.stock_levels WHERE sku_id = :a AND warehouse_id = :w1;
-- ttl, owner
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '30 min', 'cart-42') AS r2 \gset
SELECT owner, expires_at BETWEEN now() + interval '29 min' AND now() + interval '30 min' AS ttl_30_min
  FROM market.reservations WHERE id = :'r2';
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, NULL, NULL) AS r3 \gset
SELECT owner IS NULL AS no_owner,
       expires_at BETWEEN now() + interval '14 min' AND now() + interval '15 min' AS default_ttl
  FROM market.reservations WHERE id = :'r3';
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '24 hours', repeat('o', 200)) AS r4 \gset
SELECT length(owner), expires_at BETWEEN now() + interval '23 hours 59 min' AND now() + interval '24 hours' AS ttl_24h
  FROM market.reservations WHERE id = :'r4';
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '1 second') AS r5 \gset
SELECT expires_at <= now() + interval '1 second' AS ttl_1s FROM market.reservations WHERE id = :'r5';
SELECT market.reservation_release(:'r5') AS released;
SELECT market.available(:a) AS avail_a;                    -- 10 - 3 - 1 - 1 - 1
SELECT count(DISTINCT id) AS distinct_ids FROM market.reservations
 WHERE id IN (:'r1', :'r2', :'r3', :'r4', :'r5');

-- ---------------------------------------------------------------------------
-- bad arguments (nothing is reserved by any of these)
-- ---------------------------------------------------------------------------
SELECT market.reserve(NULL);                                                        -- MK020
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '0 s');        -- MK023
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '500 ms');     -- MK023
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '-5 min');     -- MK023
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '25 hours');   -- MK023
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '24 hours 1 second'); -- MK023
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, '1 mon');      -- MK023
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, NULL, repeat('o', 201)); -- MK020
-- text that is not JSON never reaches the function
SELECT market.reserve('not json');                                                  -- 22P02
SELECT market.reserve('[{"sku_id": 1, "qty": }]');                                  -- 22P02
-- quantities
SELECT market.reserve(format('[{"sku_id": %s, "qty": 0}]', :a)::jsonb);               -- MK020
SELECT market.reserve(format('[{"sku_id": %s, "qty": -1}]', :a)::jsonb);              -- MK020
SELECT market.reserve(format('[{"sku_id": %s, "qty": %s}]', :a,
                             current_setting('market.max_line_qty')::bigint + 1)::jsonb); -- MK020
SELECT market.reserve(format('[{"sku_id": %s, "qty": 9223372036854775807}]', :a)::jsonb); -- MK020
SELECT pg_temp.sqlstate_of(format('SELECT market.reserve(%L::jsonb)',
       format('[{"sku_id": %s, "qty": 100000000000000000000}]', :a)))
       IN ('MK020', 'MK021') AS beyond_bigint_refused;
-- the summed quantity of duplicate lines is bounded too
SELECT market.reserve(format('[{"sku_id": %s, "qty": %s}, {"sku_id": %s, "qty": %s}]',
                             :a, current_setting('market.max_line_qty')::bigint / 2 + 1,
                             :a, current_setting('market.max_line_qty')::bigint / 2 + 1)::jsonb); -- MK020
-- unknown SKU, unknown warehouse, a SKU without stock
SELECT market.reserve('[{"sku_id": 999999999, "qty": 1}]');                         -- MK010
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}, {"sku_id": 999999999, "qty": 1}]', :a)::jsonb); -- MK010
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1, "warehouse_id": 999999}]', :a)::jsonb);          -- MK011
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :n)::jsonb);               -- MK001
SELECT market.available(:a) AS avail_a, market.available(:m) AS avail_m;              -- unchanged

-- malformed documents: MK021 every one
SELECT v.label, pg_temp.sqlstate_of(format('SELECT market.reserve(%L::jsonb)', v.doc)) AS sqlstate
  FROM (VALUES
    ('JSON null',            'null'),
    ('a number',             '42'),
    ('a string',             '"items"'),
    ('an object',            format('{"sku_id": %s, "qty": 1}', :m)),
    ('an empty array',       '[]'),
    ('element a number',     '[1]'),
    ('element a string',     '["x"]'),
    ('element an array',     format('[[%s, 1]]', :m)),
    ('element null',         '[null]'),
    ('second element bad',   format('[{"sku_id": %s, "qty": 1}, 7]', :m)),
    ('sku_id missing',       '[{"qty": 1}]'),
    ('qty missing',          format('[{"sku_id": %s}]', :m)),
    ('sku_id null',          '[{"sku_id": null, "qty": 1}]'),
    ('qty null',             format('[{"sku_id": %s, "qty": null}]', :m)),
    ('sku_id a string',      format('[{"sku_id": "%s", "qty": 1}]', :m)),
    ('sku_id fractional',    format('[{"sku_id": %s.5, "qty": 1}]', :m)),
    ('qty fractional',       format('[{"sku_id": %s, "qty": 1.5}]', :m)),
    ('qty a string',         format('[{"sku_id": %s, "qty": "2"}]', :m)),
    ('qty a boolean',        format('[{"sku_id": %s, "qty": true}]', :m)),
    ('qty an object',        format('[{"sku_id": %s, "qty": {"n": 1}}]', :m)),
    ('warehouse_id a string', format('[{"sku_id": %s, "qty": 1, "warehouse_id": "main"}]', :m)),
    ('unknown key',          format('[{"sku_id": %s, "qty": 1, "color": "red"}]', :m)),
    ('misspelt key',         format('[{"sku_id": %s, "quantity": 1}]', :m))
  ) AS v(label, doc);
-- too many lines: refused as a bad document or a bad argument
SELECT pg_temp.sqlstate_of(format('SELECT market.reserve(%L::jsonb)',
         (SELECT jsonb_agg(jsonb_build_object('sku_id', :m, 'qty', 1))
            FROM generate_series(1, current_setting('market.max_reservation_lines')::int + 1))))
       IN ('MK020', 'MK021') AS too_many_lines_refused;
SELECT market.available(:m) AS avail_m;                     -- nothing was reserved
SELECT count(*) AS live_reservations_of_m FROM market.reservation_lines
 WHERE sku_id = :m AND status = 'held';

-- ---------------------------------------------------------------------------
-- not enough stock; all or nothing; the detail names the SKU, asked, available
-- ---------------------------------------------------------------------------
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}]', :b)::jsonb);               -- MK001
SELECT market.stock_set(:b, :w1, 555) AS b_on_hand;
SELECT state,
       detail ~ ('\m' || :b || '\M') OR strpos(detail, 'RSV-B') > 0 AS names_sku,
       detail ~ '\m777\M' AS names_asked,
       detail ~ '\m555\M' AS names_available
  FROM pg_temp.error_of(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 777}]'')', :b));
-- the first line fits, the second does not: neither is reserved
SELECT state,
       detail ~ ('\m' || :b || '\M') OR strpos(detail, 'RSV-B') > 0 AS names_sku,
       detail ~ '\m777\M' AS names_asked,
       detail ~ '\m555\M' AS names_available
  FROM pg_temp.error_of(format('SELECT market.reserve(''[{"sku_id": %s, "qty": 2}, {"sku_id": %s, "qty": 777}]'')', :a, :b));
SELECT market.available(:a) AS avail_a, market.available(:b) AS avail_b;              -- unchanged
-- same with the short line first
SELECT market.reserve(format('[{"sku_id": %s, "qty": 777}, {"sku_id": %s, "qty": 2}]', :b, :a)::jsonb); -- MK001
SELECT market.available(:a) AS avail_a, market.available(:b) AS avail_b;              -- unchanged
SELECT market.stock_set(:b, :w1, 2) AS b_on_hand;
-- asking exactly what is there works
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2}]', :b)::jsonb) AS rb \gset
SELECT market.available(:b) AS avail_b;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}]', :b)::jsonb);               -- MK001
SELECT market.reservation_release(:'rb') AS released;

-- ---------------------------------------------------------------------------
-- duplicate lines are summed
-- ---------------------------------------------------------------------------
SELECT market.available(:m) AS avail_m;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2}, {"sku_id": %s, "qty": 3}]', :m, :m)::jsonb) AS rd \gset
SELECT market.available(:m) AS avail_m;                     -- 100 - 5
SELECT sum(qty) AS qty, count(DISTINCT warehouse_id) AS warehouses
  FROM market.reservation_lines WHERE reservation_id = :'rd';
-- each line fits alone (2 <= 2), the sum does not: nothing is reserved
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 2}]', :b, :b)::jsonb); -- MK001
SELECT market.available(:b) AS avail_b;
SELECT market.reservation_release(:'rd') AS released;
SELECT market.available(:m) AS avail_m;

-- ---------------------------------------------------------------------------
-- the warehouse rule: priority, then id; a line is never split; an explicit
-- warehouse_id is honoured
-- ---------------------------------------------------------------------------
SELECT market.sku_create(:product, 'RSV-W', 100, 'USD') AS w \gset
SELECT market.warehouse_create('rsv-p30', 'Priority 30', 30) AS p30 \gset
SELECT market.warehouse_create('rsv-p20a', 'Priority 20, older', 20) AS p20a \gset
SELECT market.warehouse_create('rsv-p20b', 'Priority 20, newer', 20) AS p20b \gset
SELECT market.warehouse_create('rsv-p10', 'Priority 10, newest', 10) AS p10 \gset
SELECT market.warehouse_create('rsv-empty', 'No stock of RSV-W', 1) AS pempty \gset
SELECT :p30 < :p20a AND :p20a < :p20b AND :p20b < :p10 AS ids_ascend;
SELECT market.stock_set(:w, :p30, 100), market.stock_set(:w, :p20a, 4),
       market.stock_set(:w, :p20b, 50), market.stock_set(:w, :p10, 5);
-- the warehouses each reservation of RSV-W took its units from
CREATE TEMP VIEW w_taken AS
	SELECT l.reservation_id, h.code, sum(l.qty) AS qty
	  FROM market.reservation_lines l JOIN market.warehouses h ON h.id = l.warehouse_id
	 GROUP BY 1, 2;
-- 3: priority 10 has 5
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}]', :w)::jsonb) AS w1r \gset
SELECT code, qty FROM w_taken WHERE reservation_id = :'w1r';
-- 3: priority 10 has 2 left and the line is not split; the two priority-20
-- warehouses: the lower id (4 free) wins
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}]', :w)::jsonb) AS w2r \gset
SELECT code, qty FROM w_taken WHERE reservation_id = :'w2r';
-- 3 more: p10 has 2, p20a has 1, p20b has 50
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3}]', :w)::jsonb) AS w3r \gset
SELECT code, qty FROM w_taken WHERE reservation_id = :'w3r';
-- 60: only priority 30 holds that many
SELECT market.reserve(format('[{"sku_id": %s, "qty": 60}]', :w)::jsonb) AS w4r \gset
SELECT code, qty FROM w_taken WHERE reservation_id = :'w4r';
SELECT h.code, market.available(:w, h.id) AS avail
  FROM market.warehouses h WHERE h.id IN (:p30, :p20a, :p20b, :p10, :pempty) ORDER BY h.id;
SELECT market.available(:w) AS avail_w;                     -- 40 + 1 + 47 + 2
-- 48: 90 free in all, but no single warehouse has 48
SELECT market.reserve(format('[{"sku_id": %s, "qty": 48}]', :w)::jsonb);             -- MK001
SELECT market.available(:w) AS avail_w;
-- an explicit warehouse is honoured even when a preferred one has room
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1, "warehouse_id": %s}]', :w, :p30)::jsonb) AS w5r \gset
SELECT code, qty FROM w_taken WHERE reservation_id = :'w5r';
-- and it is the only one tried
SELECT market.reserve(format('[{"sku_id": %s, "qty": 3, "warehouse_id": %s}]', :w, :p10)::jsonb);    -- MK001
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1, "warehouse_id": %s}]', :w, :pempty)::jsonb); -- MK001
-- duplicates are summed before the warehouse is chosen: 2 + 2 does not fit p10 (2 free)
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2}, {"sku_id": %s, "qty": 2}]', :w, :w)::jsonb) AS w6r \gset
SELECT code, qty FROM w_taken WHERE reservation_id = :'w6r';
-- a line with a warehouse_id and one without are separate lines
SELECT market.reserve(format('[{"sku_id": %s, "qty": 5, "warehouse_id": %s}, {"sku_id": %s, "qty": 2}]',
                             :w, :p30, :w)::jsonb) AS w7r \gset
SELECT code, qty FROM w_taken WHERE reservation_id = :'w7r' ORDER BY code;
-- two lines naming the same warehouse are summed: 1 + 1 > 1 free in p20a
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1, "warehouse_id": %s}, {"sku_id": %s, "qty": 1, "warehouse_id": %s}]',
                             :w, :p20a, :w, :p20a)::jsonb);                          -- MK001
SELECT h.code, market.available(:w, h.id) AS avail
  FROM market.warehouses h WHERE h.id IN (:p30, :p20a, :p20b, :p10, :pempty) ORDER BY h.id;
SELECT h.code, s.on_hand, s.held, s.free
  FROM market.stock_levels s JOIN market.warehouses h ON h.id = s.warehouse_id
 WHERE s.sku_id = :w ORDER BY h.id;

-- a reservation of several SKUs
SELECT market.reserve(format('[{"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 4}]',
                             :a, :m, :w)::jsonb) AS multi \gset
SELECT s.sku_code, sum(l.qty) AS qty
  FROM market.reservation_lines l JOIN market.skus s ON s.id = l.sku_id
 WHERE l.reservation_id = :'multi' GROUP BY s.sku_code ORDER BY s.sku_code;

SELECT * FROM market.verify_inventory();
