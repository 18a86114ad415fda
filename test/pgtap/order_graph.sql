-- pgTAP: the order state machine over every (from, to) pair of states.
--
-- The states and the legal edges are written out here, as docs/orders.md
-- documents them, and compared with market.order_transitions() (the graph
-- the C trigger enforces).  Then, for every ordered pair of states, a fresh
-- order is driven to "from" along a shortest legal path and moved to "to",
-- once by market.order_transition() and once by a superuser's direct
-- UPDATE: a legal pair must succeed (and leave one history row for the
-- step), an illegal pair must raise MK003.  A self-loop is illegal for
-- order_transition(); a direct UPDATE that keeps the status is no
-- transition at all and must pass without a history row.
--
-- Creates the extensions inside a transaction that it rolls back.
\set ECHO none
\set QUIET 1
\pset format unaligned
\pset tuples_only true
\pset pager off
\set ON_ERROR_STOP true
SET client_min_messages = warning;

BEGIN;
CREATE EXTENSION pgtap;
CREATE EXTENSION market;

CREATE TEMP TABLE states (name text PRIMARY KEY);
INSERT INTO states VALUES ('created'), ('confirmed'), ('shipped'), ('delivered'), ('returned'),
	('refunded'), ('cancelled'), ('payment_failed');
CREATE TEMP TABLE edges (from_status text, to_status text, PRIMARY KEY (from_status, to_status));
INSERT INTO edges VALUES
	('created', 'confirmed'), ('created', 'cancelled'), ('created', 'payment_failed'),
	('confirmed', 'shipped'), ('confirmed', 'cancelled'),
	('shipped', 'delivered'), ('delivered', 'returned'), ('returned', 'refunded');
-- every ordered pair of states, and whether the graph allows it
CREATE TEMP VIEW pairs AS
	SELECT f.name AS from_status, t.name AS to_status,
		   EXISTS (SELECT 1 FROM market.order_transitions() g
					WHERE g.from_status = f.name AND g.to_status = t.name) AS legal
	  FROM states f CROSS JOIN states t;

SELECT plan(5 + 2 * (SELECT count(*)::int FROM pairs) + 2);

-- ---------------------------------------------------------------------------
-- the graph
-- ---------------------------------------------------------------------------
SELECT set_eq('SELECT from_status, to_status FROM market.order_transitions()',
	'SELECT from_status, to_status FROM edges',
	'order_transitions() is exactly the documented graph');
SELECT is((SELECT count(*)::int FROM market.order_transitions()),
	(SELECT count(DISTINCT (from_status, to_status))::int FROM market.order_transitions()),
	'order_transitions() lists each edge once');
SELECT is_empty('SELECT from_status FROM market.order_transitions()
				 UNION SELECT to_status FROM market.order_transitions()
				 EXCEPT SELECT name FROM states',
	'every state of the graph is in the list of states');
SELECT set_eq('SELECT to_status FROM market.order_transitions() t
				WHERE NOT EXISTS (SELECT 1 FROM market.order_transitions() u
								   WHERE u.from_status = t.to_status)',
	ARRAY['cancelled', 'payment_failed', 'refunded'],
	'cancelled, payment_failed and refunded are the final states');

-- shortest legal path from 'created' to each state (the states after 'created')
CREATE TEMP TABLE paths AS
	WITH RECURSIVE walk(state, path) AS (
		SELECT 'created'::text, ARRAY[]::text[]
		UNION ALL
		SELECT g.to_status, w.path || g.to_status
		  FROM walk w JOIN market.order_transitions() g ON g.from_status = w.state
		 WHERE NOT g.to_status = ANY (w.path) AND g.to_status <> 'created'
	)
	SELECT DISTINCT ON (state) state, path FROM walk ORDER BY state, cardinality(path);
SELECT set_eq('SELECT state FROM paths', 'SELECT name FROM states',
	'every state can be reached from created');

-- ---------------------------------------------------------------------------
-- orders made the way checkout makes them, one unit each
-- ---------------------------------------------------------------------------
SELECT market.seller_create('Graph Seller') AS seller \gset
SELECT market.product_create(:seller, 'Graph product') AS product \gset
SELECT market.sku_create(:product, 'GRAPH-1', 100, 'EUR') AS sku \gset
SELECT market.warehouse_create('graph-w', 'Graph W') AS wh \gset
SELECT market.stock_set(:sku, :wh, 1000, 4) AS on_hand \gset

-- a new order driven to state along its shortest path
CREATE FUNCTION pg_temp.order_in(state text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
	sku bigint := (SELECT id FROM market.skus WHERE sku_code = 'GRAPH-1');
	r uuid := market.reserve(jsonb_build_array(jsonb_build_object('sku_id', sku, 'qty', 1)));
	g bigint;
	o bigint;
	step text;
BEGIN
	PERFORM market.reservation_commit(r);
	INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
	VALUES (gen_random_uuid(), 'graph-customer', 'EUR', 100) RETURNING id INTO g;
	INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
	SELECT g, p.seller_id, 'graph-customer', 'EUR', 100
	  FROM market.skus k JOIN market.products p ON p.id = k.product_id WHERE k.id = sku
	RETURNING id INTO o;
	INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)
	SELECT o, l.sku_id, l.warehouse_id, l.qty, 100 FROM market.reservation_lines l WHERE l.reservation_id = r;
	INSERT INTO market.payments (group_id, customer_id, currency, amount_minor)
	VALUES (g, 'graph-customer', 'EUR', 100);
	FOREACH step IN ARRAY (SELECT path FROM paths WHERE paths.state = order_in.state) LOOP
		PERFORM market.order_transition(o, step);
	END LOOP;
	IF (SELECT status FROM market.orders WHERE id = o) <> state THEN
		RAISE EXCEPTION 'could not drive an order to %', state;
	END IF;
	RETURN o;
END
$$;

-- the outcome of moving a fresh order in from_status to to_status, by
-- order_transition() (how = 'function') or a direct UPDATE: 'ok' when it
-- moved and left exactly one history row (from, to) for the step,
-- 'unchanged' when an UPDATE kept the status and wrote no history (not a
-- transition), else the SQLSTATE
CREATE FUNCTION pg_temp.attempt(how text, from_status text, to_status text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	o bigint := pg_temp.order_in(from_status);
	steps int;
BEGIN
	BEGIN
		IF how = 'function' THEN
			PERFORM market.order_transition(o, to_status);
		ELSE
			UPDATE market.orders SET status = attempt.to_status WHERE id = o;
		END IF;
	EXCEPTION WHEN OTHERS THEN
		RETURN SQLSTATE;
	END;
	SELECT count(*) INTO steps FROM market.order_events e
	 WHERE e.order_id = o AND e.from_status = attempt.from_status AND e.to_status = attempt.to_status;
	IF (SELECT status FROM market.orders WHERE id = o) = to_status AND steps = 1 THEN
		RETURN 'ok';
	END IF;
	IF from_status = to_status AND steps = 0
	   AND (SELECT status FROM market.orders WHERE id = o) = to_status THEN
		RETURN 'unchanged';
	END IF;
	RETURN format('moved to %s with %s history rows', (SELECT status FROM market.orders WHERE id = o), steps);
END
$$;

-- ---------------------------------------------------------------------------
-- every pair, by function and by direct UPDATE
-- ---------------------------------------------------------------------------
SELECT is(pg_temp.attempt('function', from_status, to_status),
		  CASE WHEN legal THEN 'ok' ELSE 'MK003' END,
		  format('order_transition %s -> %s %s', from_status, to_status,
				 CASE WHEN legal THEN 'is allowed' ELSE 'raises MK003' END))
  FROM pairs ORDER BY from_status, to_status;
-- (an UPDATE that leaves status as it is is no transition: it passes and
-- writes no history; order_transition() to the current status is refused)
SELECT is(pg_temp.attempt('update', from_status, to_status),
		  CASE WHEN legal THEN 'ok' WHEN from_status = to_status THEN 'unchanged' ELSE 'MK003' END,
		  format('UPDATE %s -> %s %s', from_status, to_status,
				 CASE WHEN legal THEN 'is allowed'
					  WHEN from_status = to_status THEN 'is no transition'
					  ELSE 'raises MK003' END))
  FROM pairs ORDER BY from_status, to_status;

-- ---------------------------------------------------------------------------
-- what all of that left behind
-- ---------------------------------------------------------------------------
SELECT is_empty('SELECT e.id FROM market.order_events e
				  WHERE NOT (e.from_status IS NULL AND e.to_status = ''created'')
					AND NOT EXISTS (SELECT 1 FROM market.order_transitions() g
									 WHERE g.from_status = e.from_status AND g.to_status = e.to_status)',
	'every history row is the creation or an edge of the graph');
SELECT is_empty('SELECT * FROM market.verify_inventory()', 'the inventory is consistent');

SELECT * FROM finish();
ROLLBACK;
