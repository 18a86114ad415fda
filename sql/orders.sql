--
-- orders: the order state machine (docs/orders.md).  Orders are made the
-- way checkout makes them (reserve + reservation_commit, then INSERTs into
-- order_groups, orders, order_lines and payments as the extension owner),
-- then moved along every legal path, refused on illegal ones by
-- order_transition() and by a superuser's direct UPDATE, and checked for
-- their history rows, outbox rows and the units that cancellations,
-- payment failures and returns put back.  Ids are compared, not printed.
--
\set VERBOSITY sqlstate

SELECT market.seller_create('Orders Seller One') AS s1 \gset
SELECT market.seller_create('Orders Seller Two') AS s2 \gset
SELECT market.product_create(:s1, 'Orders product one') AS p1 \gset
SELECT market.product_create(:s2, 'Orders product two') AS p2 \gset
SELECT market.sku_create(:p1, 'ORD-A', 500, 'USD') AS a \gset
SELECT market.sku_create(:p1, 'ORD-B', 250, 'USD') AS b \gset
SELECT market.sku_create(:p2, 'ORD-C', 1000, 'USD') AS c \gset
SELECT market.warehouse_create('ord-w1', 'Orders W1', 10) AS w1 \gset
SELECT market.warehouse_create('ord-w2', 'Orders W2', 20) AS w2 \gset
SELECT market.stock_set(:a, :w1, 20) AS a_w1, market.stock_set(:b, :w1, 10) AS b_w1,
       market.stock_set(:b, :w2, 5, 1) AS b_w2, market.stock_set(:c, :w1, 8, 4) AS c_w1;

-- what checkout does, in one transaction: reserve and commit the units,
-- one order group, one order per seller with its lines, one payment
CREATE FUNCTION pg_temp.place_order(customer text, items jsonb, with_payment boolean DEFAULT true)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
	r uuid := market.reserve(items, NULL, customer);
	g bigint;
	o bigint;
	s record;
	total bigint;
BEGIN
	PERFORM market.reservation_commit(r);
	SELECT sum(l.qty * k.price_minor) INTO total
	  FROM market.reservation_lines l JOIN market.skus k ON k.id = l.sku_id
	 WHERE l.reservation_id = r;
	INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
	VALUES (gen_random_uuid(), customer, 'USD', total) RETURNING id INTO g;
	FOR s IN SELECT p.seller_id, sum(l.qty * k.price_minor)::bigint AS subtotal
			   FROM market.reservation_lines l
			   JOIN market.skus k ON k.id = l.sku_id
			   JOIN market.products p ON p.id = k.product_id
			  WHERE l.reservation_id = r
			  GROUP BY p.seller_id ORDER BY p.seller_id
	LOOP
		INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
		VALUES (g, s.seller_id, customer, 'USD', s.subtotal) RETURNING id INTO o;
		INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)
		SELECT o, l.sku_id, l.warehouse_id, sum(l.qty), k.price_minor
		  FROM market.reservation_lines l
		  JOIN market.skus k ON k.id = l.sku_id
		  JOIN market.products p ON p.id = k.product_id
		 WHERE l.reservation_id = r AND p.seller_id = s.seller_id
		 GROUP BY l.sku_id, l.warehouse_id, k.price_minor;
	END LOOP;
	IF with_payment THEN
		INSERT INTO market.payments (group_id, customer_id, currency, amount_minor)
		VALUES (g, customer, 'USD', total);
	END IF;
	RETURN g;
END
$$;

-- the order of a group for a seller
CREATE FUNCTION pg_temp.order_of(g bigint, seller bigint) RETURNS bigint
LANGUAGE sql AS $$ SELECT id FROM market.orders WHERE group_id = g AND seller_id = seller $$;

-- runs a statement and answers 'ok: <result>' or the error: SQLSTATE,
-- message, detail and hint, with order ids written as N
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	r text;
	st text; msg text; det text; hnt text;
BEGIN
	EXECUTE stmt INTO r;
	RETURN 'ok: ' || coalesce(r, 'null');
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT,
		det = PG_EXCEPTION_DETAIL, hnt = PG_EXCEPTION_HINT;
	RETURN st || ': ' || msg
		|| coalesce(' | ' || nullif(regexp_replace(det, '(Order|order has id) -?[0-9]+', '\1 N', 'g'), ''), '')
		|| coalesce(' | ' || nullif(hnt, ''), '');
END
$$;

-- an order's history, ids left out
CREATE FUNCTION pg_temp.history(o bigint)
RETURNS TABLE (from_status text, to_status text, actor_ok boolean, note text)
LANGUAGE sql AS $$
	SELECT from_status, to_status, actor = session_user, note
	  FROM market.order_events WHERE order_id = o ORDER BY id
$$;

-- an order's outbox rows, payload checked against the order
CREATE FUNCTION pg_temp.outbox(ord bigint)
RETURNS TABLE (topic text, event_type text, aggregate_type text, payload_ok boolean, from_to text,
			   amount_minor bigint, currency text)
LANGUAGE sql AS $$
	SELECT x.topic, x.event_type, x.aggregate_type,
		   CASE x.topic
			WHEN 'events' THEN
				x.aggregate_id = o.id AND (x.payload->>'order_id')::bigint = o.id
				AND (x.payload->>'group_id')::bigint = o.group_id
				AND (x.payload->>'seller_id')::bigint = o.seller_id
				AND (x.payload->>'at')::timestamptz = e.at
				AND x.payload ?& ARRAY['order_id', 'group_id', 'seller_id', 'from', 'to', 'at']
			ELSE
				x.aggregate_id = p.id AND (x.payload->>'payment_id')::bigint = p.id
				AND (x.payload->>'order_id')::bigint = o.id
			END,
		   CASE x.topic WHEN 'events'
			THEN coalesce(x.payload->>'from', 'null') || ' -> ' || (x.payload->>'to') END,
		   (x.payload->>'amount_minor')::bigint, x.payload->>'currency'
	  FROM market.orders o
	  LEFT JOIN market.payments p ON p.group_id = o.group_id
	  JOIN market.outbox x
		ON (x.topic = 'events' AND x.aggregate_type = 'order' AND x.aggregate_id = o.id)
		OR (x.topic = 'psp' AND x.aggregate_type = 'payment' AND x.aggregate_id = p.id
			AND (x.payload->>'order_id')::bigint = o.id)
	  LEFT JOIN market.order_events e
		ON x.topic = 'events' AND e.order_id = o.id AND e.to_status = x.payload->>'to'
	 WHERE o.id = ord
	 ORDER BY x.id
$$;

-- on hand, free and what available() says, per SKU code over all warehouses
CREATE FUNCTION pg_temp.stock(code text)
RETURNS TABLE (sku text, on_hand bigint, free bigint, available bigint)
LANGUAGE sql AS $$
	SELECT k.sku_code, sum(l.on_hand)::bigint, sum(l.free)::bigint, market.available(k.id)
	  FROM market.skus k JOIN market.stock_levels l ON l.sku_id = k.id
	 WHERE k.sku_code = code GROUP BY k.id, k.sku_code
$$;

-- the ledger rows of SKUs ORD-*, first ones (set) left out
CREATE FUNCTION pg_temp.ledger(since bigint)
RETURNS TABLE (sku text, warehouse text, delta bigint, kind text, reason text)
LANGUAGE sql AS $$
	SELECT k.sku_code, w.code, g.delta, g.kind, regexp_replace(g.reason, 'order [0-9]+', 'order N')
	  FROM market.stock_ledger g
	  JOIN market.skus k ON k.id = g.sku_id
	  JOIN market.warehouses w ON w.id = g.warehouse_id
	 WHERE g.id > since AND k.sku_code LIKE 'ORD-%'
	 ORDER BY g.id
$$;

-- ---------------------------------------------------------------------------
-- the graph
-- ---------------------------------------------------------------------------
SELECT * FROM market.order_transitions();
-- the final states: no edge out
SELECT DISTINCT t.to_status AS final_state FROM market.order_transitions() t
 WHERE NOT EXISTS (SELECT 1 FROM market.order_transitions() u WHERE u.from_status = t.to_status)
 ORDER BY 1;

-- ---------------------------------------------------------------------------
-- creation: a group of two sellers' orders; each order starts 'created'
-- with one history row and an 'order.created' event
-- ---------------------------------------------------------------------------
SELECT max(id) AS ledger0 FROM market.stock_ledger \gset
SELECT pg_temp.place_order('ord-cust-1',
	format('[{"sku_id": %s, "qty": 2}, {"sku_id": %s, "qty": 1}]', :a, :c)::jsonb) AS g1 \gset
SELECT pg_temp.order_of(:g1, :s1) AS o1, pg_temp.order_of(:g1, :s2) AS o2 \gset
SELECT id FROM market.payments WHERE group_id = :g1 \gset pay1_
SELECT id = :o1 AS is_o1, status, subtotal_minor, currency, updated_at = created_at AS untouched
  FROM market.orders WHERE group_id = :g1 ORDER BY seller_id;
SELECT * FROM pg_temp.history(:o1);
SELECT * FROM pg_temp.outbox(:o1);
SELECT * FROM pg_temp.outbox(:o2);
SELECT * FROM pg_temp.stock('ORD-A');
SELECT * FROM pg_temp.stock('ORD-C');
SELECT * FROM pg_temp.ledger(:ledger0);

-- ---------------------------------------------------------------------------
-- the main path: created -> confirmed -> shipped -> delivered -> returned
-- -> refunded, by order_transition(); each step returns the new status
-- ---------------------------------------------------------------------------
BEGIN;
SELECT market.order_transition(:o1, 'confirmed', 'payment authorized');
SELECT status, updated_at = now() AS updated_now, updated_at > created_at AS later
  FROM market.orders WHERE id = :o1;
COMMIT;
SELECT market.order_transition(:o1, 'shipped', 'tracking 1Z999');
-- shipping queues the capture of the order's amount
SELECT * FROM pg_temp.outbox(:o1) WHERE topic = 'psp';
SELECT market.order_transition(:o1, 'delivered');
SELECT * FROM pg_temp.stock('ORD-A');
SELECT max(id) AS ledger1 FROM market.stock_ledger \gset
-- a return receipt puts the units back on hand
SELECT market.order_transition(:o1, 'returned', 'parcel back in W1');
SELECT * FROM pg_temp.stock('ORD-A');
SELECT * FROM pg_temp.ledger(:ledger1);
SELECT market.order_transition(:o1, 'refunded');
SELECT * FROM pg_temp.history(:o1);
SELECT * FROM pg_temp.outbox(:o1);
-- the events and the history agree one to one
SELECT (SELECT count(*) FROM market.order_events WHERE order_id = :o1) AS history_rows,
       (SELECT count(*) FROM market.outbox WHERE topic = 'events' AND aggregate_id = :o1) AS events;

-- ---------------------------------------------------------------------------
-- cancel before shipment (from created): units back, payment voided
-- ---------------------------------------------------------------------------
SELECT max(id) AS ledger2 FROM market.stock_ledger \gset
SELECT * FROM pg_temp.stock('ORD-C');
SELECT market.order_transition(:o2, 'cancelled', 'customer changed their mind');
SELECT * FROM pg_temp.stock('ORD-C');
SELECT * FROM pg_temp.ledger(:ledger2);
SELECT * FROM pg_temp.history(:o2);
SELECT * FROM pg_temp.outbox(:o2);

-- cancel from confirmed, with lines in two warehouses and a live
-- reservation of another customer on the same SKU
SELECT pg_temp.place_order('ord-cust-2',
	format('[{"sku_id": %s, "qty": 2, "warehouse_id": %s}, {"sku_id": %s, "qty": 3}]', :b, :w2, :a)::jsonb) AS g2 \gset
SELECT pg_temp.order_of(:g2, :s1) AS o3 \gset
SELECT sku_id = :a AS is_a, warehouse_id = :w1 AS in_w1, qty FROM market.order_lines
 WHERE order_id = :o3 ORDER BY sku_id;
SELECT market.reserve(format('[{"sku_id": %s, "qty": 2, "warehouse_id": %s}]', :b, :w2)::jsonb,
	'1 hour', 'someone else') AS other \gset
SELECT * FROM pg_temp.stock('ORD-A');
SELECT * FROM pg_temp.stock('ORD-B');
SELECT max(id) AS ledger3 FROM market.stock_ledger \gset
SELECT market.order_transition(:o3, 'confirmed');
SELECT market.order_transition(:o3, 'cancelled');
SELECT * FROM pg_temp.stock('ORD-A');
SELECT * FROM pg_temp.stock('ORD-B');
SELECT * FROM pg_temp.ledger(:ledger3);
SELECT * FROM pg_temp.outbox(:o3);
SELECT market.reservation_release(:'other') AS released;

-- ---------------------------------------------------------------------------
-- payment failed: units back (a 'cancel' row), no PSP job
-- ---------------------------------------------------------------------------
SELECT pg_temp.place_order('ord-cust-3', format('[{"sku_id": %s, "qty": 4}]', :c)::jsonb) AS g3 \gset
SELECT pg_temp.order_of(:g3, :s2) AS o4 \gset
SELECT max(id) AS ledger4 FROM market.stock_ledger \gset
SELECT * FROM pg_temp.stock('ORD-C');
SELECT market.order_transition(:o4, 'payment_failed', 'card declined');
SELECT * FROM pg_temp.stock('ORD-C');
SELECT * FROM pg_temp.ledger(:ledger4);
SELECT * FROM pg_temp.outbox(:o4);

-- a group without a payment row: transitions work, no PSP job is queued
SELECT pg_temp.place_order('ord-cust-4', format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb, false) AS g4 \gset
SELECT pg_temp.order_of(:g4, :s1) AS o5 \gset
SELECT market.order_transition(:o5, 'confirmed'), market.order_transition(:o5, 'shipped');
SELECT * FROM pg_temp.outbox(:o5);

-- ---------------------------------------------------------------------------
-- illegal transitions by function: MK003, with what was refused and what
-- the legal next states are; nothing is written
-- ---------------------------------------------------------------------------
SELECT pg_temp.place_order('ord-cust-5', format('[{"sku_id": %s, "qty": 1}]', :a)::jsonb) AS g5 \gset
SELECT pg_temp.order_of(:g5, :s1) AS o6 \gset
SELECT (SELECT count(*) FROM market.order_events) AS events0,
       (SELECT count(*) FROM market.outbox) AS outbox0,
       (SELECT max(id) FROM market.stock_ledger) AS ledger5 \gset
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o6, 'shipped'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o6, 'delivered'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o6, 'refunded'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o6, 'created'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o1, 'returned'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o1, 'cancelled'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o2, 'confirmed'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o4, 'cancelled'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o5, 'cancelled'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o5, 'returned'));
-- unknown target states
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o6, 'teleported'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o6, 'Confirmed'));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, %L)', :o6, ''));
-- NULLs, a note too long, unknown orders
SELECT pg_temp.try('SELECT market.order_transition(NULL, ''confirmed'')');
SELECT pg_temp.try(format('SELECT market.order_transition(%s, NULL)', :o6));
SELECT pg_temp.try(format('SELECT market.order_transition(%s, ''confirmed'', repeat(''n'', 1001))', :o6));
SELECT pg_temp.try('SELECT market.order_transition(-1, ''confirmed'')');
SELECT pg_temp.try('SELECT market.order_transition(9223372036854775807, ''cancelled'')');
SELECT pg_temp.try('SELECT market.order_view(NULL)');
SELECT pg_temp.try('SELECT market.order_view(-1)');
-- the one legal move here, then the same move again
SELECT market.order_transition(:o6, 'cancelled', 'x');
SELECT market.order_transition(:o6, 'cancelled');            -- MK003: already cancelled
SELECT market.order_transition(:o6, 'confirmed');            -- MK003
SELECT market.order_transition(NULL, NULL);                  -- MK020
SELECT market.order_transition(-1, 'shipped');               -- MK017
-- nothing but the one legal cancel above was written
SELECT (SELECT count(*) FROM market.order_events) - :events0 AS new_events,
       (SELECT count(*) FROM market.outbox) - :outbox0 AS new_outbox_rows;
SELECT * FROM pg_temp.ledger(:ledger5);
SELECT * FROM pg_temp.history(:o6);

-- ---------------------------------------------------------------------------
-- a superuser's direct writes go through the same guard
-- ---------------------------------------------------------------------------
SELECT pg_temp.place_order('ord-cust-6', format('[{"sku_id": %s, "qty": 2}]', :b)::jsonb) AS g6 \gset
SELECT pg_temp.order_of(:g6, :s1) AS o7 \gset
UPDATE market.orders SET status = 'shipped' WHERE id = :o7;                  -- MK003
UPDATE market.orders SET status = 'lost' WHERE id = :o7;                     -- MK003
UPDATE market.orders SET status = NULL WHERE id = :o7;                       -- MK003
SELECT pg_temp.try(format('UPDATE market.orders SET status = ''delivered'' WHERE id = %s RETURNING status', :o7));
-- one illegal row fails the whole statement
UPDATE market.orders SET status = 'confirmed' WHERE id IN (:o7, :o2);       -- MK003
SELECT id = :o7 AS is_o7, status FROM market.orders WHERE id IN (:o7, :o2) ORDER BY id;
-- a note left by a failed order_transition() is not picked up later
SELECT market.order_transition(:o7, 'shipped', 'must not leak');            -- MK003
-- a legal direct UPDATE is a transition: history (note NULL), event
UPDATE market.orders SET status = 'confirmed' WHERE id = :o7 RETURNING status;
SELECT * FROM pg_temp.history(:o7);
-- an UPDATE that leaves status alone is not a transition: no history,
-- no event, but updated_at moves
SELECT updated_at AS before_update FROM market.orders WHERE id = :o7 \gset
UPDATE market.orders SET customer_id = customer_id WHERE id = :o7;
SELECT updated_at > :'before_update' AS updated_at_moved,
       (SELECT count(*) FROM market.order_events WHERE order_id = :o7) AS history_rows,
       (SELECT count(*) FROM market.outbox WHERE topic = 'events' AND aggregate_id = :o7) AS events
  FROM market.orders WHERE id = :o7;
-- superuser cancels by UPDATE: the units come back as with the function
SELECT * FROM pg_temp.stock('ORD-B');
UPDATE market.orders SET status = 'cancelled' WHERE id = :o7;
SELECT * FROM pg_temp.stock('ORD-B');
SELECT * FROM pg_temp.outbox(:o7);
-- an order can only be inserted as 'created'
INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor, status)
VALUES (:g6, :s2, 'ord-cust-6', 'USD', 0, 'confirmed');                    -- MK003
SELECT pg_temp.try(format($$INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor, status)
	VALUES (%s, %s, 'ord-cust-6', 'USD', 0, 'shipped') RETURNING 'inserted'$$, :g6, :s2));
SELECT count(*) AS orders_in_g6 FROM market.orders WHERE group_id = :g6;

-- ---------------------------------------------------------------------------
-- a transition rolled back leaves no trace: no history, no event, no units
-- ---------------------------------------------------------------------------
SELECT pg_temp.place_order('ord-cust-7', format('[{"sku_id": %s, "qty": 5}]', :a)::jsonb) AS g7 \gset
SELECT pg_temp.order_of(:g7, :s1) AS o8 \gset
SELECT max(id) AS ledger6 FROM market.stock_ledger \gset
SELECT * FROM pg_temp.stock('ORD-A');
BEGIN;
SELECT market.order_transition(:o8, 'cancelled', 'oops');
SELECT * FROM pg_temp.stock('ORD-A');
ROLLBACK;
SELECT status FROM market.orders WHERE id = :o8;
SELECT * FROM pg_temp.stock('ORD-A');
SELECT * FROM pg_temp.ledger(:ledger6);
SELECT * FROM pg_temp.history(:o8);
SELECT * FROM pg_temp.outbox(:o8);
-- two transitions in one transaction, each with its own note
BEGIN;
SELECT market.order_transition(:o8, 'confirmed', 'first');
SELECT market.order_transition(:o8, 'shipped', 'second');
COMMIT;
SELECT * FROM pg_temp.history(:o8);

-- ---------------------------------------------------------------------------
-- order_view
-- ---------------------------------------------------------------------------
SELECT market.order_view(:o3) AS v \gset
SELECT (:'v'::jsonb->>'order_id')::bigint = :o3 AS order_ok,
       (:'v'::jsonb->>'group_id')::bigint = :g2 AS group_ok,
       (:'v'::jsonb->>'seller_id')::bigint = :s1 AS seller_ok,
       :'v'::jsonb->>'customer_id' AS customer,
       :'v'::jsonb->>'status' AS status,
       :'v'::jsonb->>'currency' AS currency,
       :'v'::jsonb->>'subtotal_minor' AS subtotal_minor,
       (:'v'::jsonb->>'created_at')::timestamptz = o.created_at AS created_ok,
       (:'v'::jsonb->>'updated_at')::timestamptz = o.updated_at AS updated_ok
  FROM market.orders o WHERE o.id = :o3;
SELECT l->>'sku_code' AS sku_code, (l->>'sku_id')::bigint IN (:a, :b) AS sku_ok,
       (l->>'warehouse_id')::int = CASE l->>'sku_code' WHEN 'ORD-A' THEN :w1 ELSE :w2 END AS warehouse_ok,
       l->>'qty' AS qty, l->>'unit_price_minor' AS unit_price_minor,
       l->>'line_total_minor' AS line_total_minor
  FROM jsonb_array_elements(:'v'::jsonb->'lines') AS l;
SELECT h->>'from' AS "from", h->>'to' AS "to", h->>'actor' = session_user AS actor_ok,
       h->>'note' AS note, (h->>'at')::timestamptz <= now() AS at_ok
  FROM jsonb_array_elements(:'v'::jsonb->'history') AS h;
SELECT (:'v'::jsonb->'payment'->>'id')::bigint = p.id AS payment_ok,
       :'v'::jsonb->'payment'->>'status' AS payment_status,
       :'v'::jsonb->'payment'->>'amount_minor' AS amount_minor
  FROM market.payments p WHERE p.group_id = :g2;
SELECT jsonb_typeof(market.order_view(:o5)->'payment') AS no_payment;
SELECT array(SELECT jsonb_object_keys(market.order_view(:o1)) ORDER BY 1) AS keys;

-- ---------------------------------------------------------------------------
-- the ledger takes the new kinds and no others
-- ---------------------------------------------------------------------------
SELECT kind, count(*) > 0 AS present FROM market.stock_ledger
 WHERE kind IN ('cancel', 'return') GROUP BY kind ORDER BY kind;
INSERT INTO market.stock_ledger (sku_id, warehouse_id, delta, kind) VALUES (:a, :w1, 0, 'refund'); -- 23514

-- ---------------------------------------------------------------------------
-- market_app may transition and view orders, not write the table; the
-- history names the session user, not the function's owner
-- ---------------------------------------------------------------------------
SELECT pg_temp.place_order('ord-cust-8', format('[{"sku_id": %s, "qty": 1}]', :c)::jsonb) AS g8 \gset
SELECT pg_temp.order_of(:g8, :s2) AS o9 \gset
CREATE ROLE regress_orders_clerk NOLOGIN IN ROLE market_app;
SET SESSION AUTHORIZATION regress_orders_clerk;
SELECT session_user, current_user;
SELECT market.order_transition(:o9, 'confirmed', 'from the app');
SELECT market.order_view(:o9)->>'status' AS status;
SELECT count(*) FROM market.order_transitions();
SELECT market.order_transition(:o9, 'delivered');                            -- MK003
UPDATE market.orders SET status = 'shipped' WHERE id = :o9;                  -- 42501
SELECT count(*) FROM market.order_events;                                    -- 42501
RESET SESSION AUTHORIZATION;
SELECT from_status, to_status,
       CASE actor WHEN session_user THEN '(the superuser running this)' ELSE actor::text END AS actor, note
  FROM market.order_events WHERE order_id = :o9 ORDER BY id;
DROP ROLE regress_orders_clerk;

-- ---------------------------------------------------------------------------
-- order_transition_many: many orders in one UPDATE, a note each; the
-- history rows and events of one statement are written in order id order
-- ---------------------------------------------------------------------------
SELECT pg_temp.place_order('ord-cust-9',
	format('[{"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 1}]', :a, :c)::jsonb) AS g9 \gset
SELECT pg_temp.place_order('ord-cust-10', format('[{"sku_id": %s, "qty": 2}]', :b)::jsonb) AS g10 \gset
SELECT pg_temp.order_of(:g9, :s1) AS m1, pg_temp.order_of(:g9, :s2) AS m2,
       pg_temp.order_of(:g10, :s1) AS m3 \gset
SELECT :m1 < :m2 AND :m2 < :m3 AS ids_ascending;
SELECT max(id) AS ev0 FROM market.order_events \gset
SELECT max(id) AS ob0 FROM market.outbox \gset
SELECT max(id) AS ledger7 FROM market.stock_ledger \gset
-- the ids in any order; each note goes with its order
SELECT market.order_transition_many(ARRAY[:m3, :m1, :m2], 'confirmed',
	ARRAY['note of m3', 'note of m1', NULL]);
SELECT id = :m1 AS is_m1, id = :m2 AS is_m2, status FROM market.orders
 WHERE id IN (:m1, :m2, :m3) ORDER BY id;
-- history rows: one per order, in order id order, notes matched
SELECT CASE order_id WHEN :m1 THEN 'm1' WHEN :m2 THEN 'm2' WHEN :m3 THEN 'm3' END AS ord,
       from_status, to_status, note, actor = session_user AS actor_ok
  FROM market.order_events WHERE id > :ev0 ORDER BY id;
-- events: one per order, in order id order, 'at' equal to the history row's
SELECT CASE x.aggregate_id WHEN :m1 THEN 'm1' WHEN :m2 THEN 'm2' WHEN :m3 THEN 'm3' END AS ord,
       x.topic, x.event_type, x.payload->>'from' AS "from", x.payload->>'to' AS "to",
       (x.payload->>'at')::timestamptz = e.at AS at_ok,
       (x.payload->>'group_id')::bigint = o.group_id AND (x.payload->>'seller_id')::bigint = o.seller_id AS ids_ok
  FROM market.outbox x
  JOIN market.orders o ON o.id = x.aggregate_id
  JOIN market.order_events e ON e.order_id = o.id AND e.id > :ev0
 WHERE x.id > :ob0 ORDER BY x.id;
-- without notes: NULL notes; cancel from confirmed puts units back per
-- order (ledger rows in order id order) and queues each payment's void
SELECT * FROM pg_temp.stock('ORD-A');
SELECT * FROM pg_temp.stock('ORD-B');
SELECT market.order_transition_many(ARRAY[:m3, :m1], 'cancelled');
SELECT * FROM pg_temp.stock('ORD-A');
SELECT * FROM pg_temp.stock('ORD-B');
SELECT * FROM pg_temp.ledger(:ledger7);
SELECT * FROM pg_temp.history(:m1);
SELECT * FROM pg_temp.outbox(:m1);
SELECT * FROM pg_temp.outbox(:m3);
-- bad input: MK020, nothing done
SELECT pg_temp.try('SELECT market.order_transition_many(NULL, ''confirmed'')');
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s], NULL)', :m2));
SELECT pg_temp.try('SELECT market.order_transition_many(''{}'', ''confirmed'')');
SELECT pg_temp.try('SELECT market.order_transition_many(''{}'', ''confirmed'', ''{}'')');
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s, NULL], ''shipped'')', :m2));
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s, %s], ''shipped'')', :m2, :m2));
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s], ''shipped'', ARRAY[''a'', ''b''])', :m2));
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s], ''shipped'', ''{}'')', :m2));
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[[%s]], ''shipped'')', :m2));
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s], ''shipped'', ARRAY[repeat(''n'', 1001)])', :m2));
SELECT pg_temp.try('SELECT market.order_transition_many(array_fill(1::bigint, ARRAY[10001]), ''shipped'')');
-- a note of exactly 1000 characters is fine (multibyte counted as one)
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s], ''shipped'', ARRAY[repeat(''é'', 1000)])', :m2));
SELECT length(note) AS note_chars FROM market.order_events WHERE order_id = :m2 ORDER BY id DESC LIMIT 1;
-- an unknown order (MK017) or an illegal edge (MK003) stops everything:
-- no status moved, no history, no event, no units
SELECT pg_temp.place_order('ord-cust-11',
	format('[{"sku_id": %s, "qty": 1}, {"sku_id": %s, "qty": 1}]', :a, :c)::jsonb) AS g11 \gset
SELECT pg_temp.order_of(:g11, :s1) AS m4, pg_temp.order_of(:g11, :s2) AS m5 \gset
SELECT max(id) AS ev1 FROM market.order_events \gset
SELECT max(id) AS ob1 FROM market.outbox \gset
SELECT max(id) AS ledger8 FROM market.stock_ledger \gset
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s, -1, %s], ''cancelled'')', :m4, :m5));
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s, %s, 9223372036854775807], ''cancelled'')', :m4, :m5));
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s, %s, %s], ''cancelled'', ARRAY[''x'', ''y'', ''z''])', :m4, :m5, :m2));
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s, %s], ''created'')', :m4, :m5));
SELECT pg_temp.try(format('SELECT market.order_transition_many(ARRAY[%s, %s], ''teleported'')', :m4, :m5));
SELECT status, count(*) FROM market.orders WHERE id IN (:m4, :m5) GROUP BY status;
SELECT (SELECT count(*) FROM market.order_events WHERE id > :ev1) AS history_rows,
       (SELECT count(*) FROM market.outbox WHERE id > :ob1) AS outbox_rows,
       (SELECT count(*) FROM market.stock_ledger WHERE id > :ledger8) AS ledger_rows;
-- the notes of a failed call do not leak into a later direct UPDATE
UPDATE market.orders SET status = 'cancelled' WHERE id = :m4;
SELECT * FROM pg_temp.history(:m4);
-- a direct UPDATE of several orders: one history row and event per real
-- status change, in order id order; a row whose status stays gets none
SELECT max(id) AS ev2 FROM market.order_events \gset
SELECT max(id) AS ob2 FROM market.outbox \gset
UPDATE market.orders SET status = CASE id WHEN :m5 THEN 'confirmed' ELSE status END
 WHERE id IN (:m5, :m4, :m2);
SELECT CASE order_id WHEN :m5 THEN 'm5' ELSE 'other' END AS ord, from_status, to_status, note
  FROM market.order_events WHERE id > :ev2 ORDER BY id;
SELECT count(*) AS events FROM market.outbox WHERE id > :ob2 AND topic = 'events';
-- nested in a transaction: a later order_transition gets its own note
BEGIN;
SELECT market.order_transition_many(ARRAY[:m5], 'shipped', ARRAY['many']);
SELECT market.order_transition(:m5, 'delivered', 'single');
COMMIT;
SELECT * FROM pg_temp.history(:m5);
-- market_app may not call it
CREATE ROLE regress_orders_clerk2 NOLOGIN IN ROLE market_app;
SET SESSION AUTHORIZATION regress_orders_clerk2;
SELECT market.order_transition_many(ARRAY[:m5], 'returned');                -- 42501
RESET SESSION AUTHORIZATION;
DROP ROLE regress_orders_clerk2;

-- ---------------------------------------------------------------------------
-- after all of it the inventory is consistent
-- ---------------------------------------------------------------------------
SELECT * FROM market.verify_inventory();
SELECT sku, on_hand, free, available FROM pg_temp.stock('ORD-A')
UNION ALL SELECT * FROM pg_temp.stock('ORD-B')
UNION ALL SELECT * FROM pg_temp.stock('ORD-C');
