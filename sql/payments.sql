--
-- payments: PSP accounts (every bad input of psp_register), who may read
-- the credentials, payment_view, and the worker's two transactions driven
-- by hand: market.psp_claim() plans jobs (account, idempotency key, the
-- 'pending' intent) and market.psp_record() applies made-up PSP outcomes.
-- No HTTP here (the PSP worker is off in this cluster); the TAP test
-- test/t/020_payments.pl runs the real worker against the test PSP.
--
\set VERBOSITY sqlstate

-- runs a statement and answers 'ok: <result>' or 'SQLSTATE: message'
CREATE FUNCTION pg_temp.try(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	r text;
	st text; msg text;
BEGIN
	EXECUTE stmt INTO r;
	RETURN 'ok: ' || coalesce(r, 'null');
EXCEPTION WHEN OTHERS THEN
	GET STACKED DIAGNOSTICS st = RETURNED_SQLSTATE, msg = MESSAGE_TEXT;
	RETURN st || ': ' || msg;
END
$$;

-- ---------------------------------------------------------------------------
-- psp_register: the good ones
-- ---------------------------------------------------------------------------
SELECT market.psp_register('stripe-a', 'stripe', 'http://127.0.0.1:9/', '{"secret_key": "sk_test_a"}', 10) AS stripe_a \gset
SELECT market.psp_register('adyen-b', 'adyen', 'https://checkout-test.adyen.com',
	'{"api_key": "AQE_key", "merchant_account": "MarketMA"}', 20, '{"timeout_ms": 5000}') AS adyen_b \gset
SELECT market.psp_register('paypal-c', 'paypal', 'https://api-m.sandbox.paypal.com',
	'{"client_id": "cid", "client_secret": "csecret"}') AS paypal_c \gset
SELECT name, kind, base_url, priority, options, enabled FROM market.psp_accounts ORDER BY id;

-- every bad input
SELECT pg_temp.try(s) FROM unnest(ARRAY[
	$$SELECT market.psp_register(NULL, 'stripe', 'https://x.example', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_register('bad name', 'stripe', 'https://x.example', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_register('x', 'worldpay', 'https://x.example', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'ftp://x.example', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://user:pw@x.example', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example/v1?q=1', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example:99999', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'http://api.stripe.com', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'not a url', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '[]')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": ""}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": 42}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "pk_public"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "sk_1", "extra": "y"}')$$,
	$$SELECT market.psp_register('x', 'adyen', 'https://x.example', '{"api_key": "k"}')$$,
	$$SELECT market.psp_register('x', 'paypal', 'https://x.example', '{"client_id": "c"}')$$,
	$$SELECT market.psp_register('x', 'paypal', 'https://x.example', '{"client_id": "c", "client_secret": "has space"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "sk_1"}', -1)$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "sk_1"}', 1, '{"color": "red"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "sk_1"}', 1, '{"timeout_ms": 5}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "sk_1"}', 1, '[]')$$,
	$$SELECT market.psp_register('stripe-a', 'stripe', 'https://x.example', '{"secret_key": "sk_1"}')$$,
	$$SELECT market.psp_set_enabled('nope', false)$$
]) AS s;
-- no error message ever shows a credential's value
SELECT count(*) AS accounts FROM market.psp_accounts;

-- ---------------------------------------------------------------------------
-- credentials: the owner only.  market_admin reads every other column.
-- ---------------------------------------------------------------------------
SET ROLE market_admin;
SELECT name, kind FROM market.psp_accounts ORDER BY id;
SELECT credentials FROM market.psp_accounts;                       -- 42501
SELECT * FROM market.psp_accounts;                                 -- 42501
SELECT market.psp_claim('admin', 1);                               -- 42501
SELECT market.psp_record('admin', '[]');                           -- 42501
RESET ROLE;
SET ROLE market_app;
SELECT name FROM market.psp_accounts;                              -- 42501
SELECT market.psp_register('y', 'stripe', 'https://x.example', '{"secret_key": "sk_1"}'); -- 42501
SELECT count(*) FROM market.payment_attempts;                      -- 42501
RESET ROLE;
SELECT has_column_privilege(r, 'market.psp_accounts', 'credentials', 'SELECT') AS can_read, r
  FROM unnest(ARRAY['market_admin', 'market_app', 'public']) r;

-- ---------------------------------------------------------------------------
-- payments as checkout makes them (group, order, payment, authorize job)
-- ---------------------------------------------------------------------------
SELECT market.seller_create('Payments Seller') AS seller \gset
CREATE FUNCTION pg_temp.pay(method text, amount bigint, psp text DEFAULT NULL, orders int DEFAULT 1)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE g bigint; p bigint; s bigint := (SELECT id FROM market.sellers WHERE name = 'Payments Seller');
BEGIN
	INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
	VALUES (gen_random_uuid(), 'pay-customer', 'USD', amount) RETURNING id INTO g;
	FOR i IN 1 .. orders LOOP
		INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
		VALUES (g, CASE WHEN i = 1 THEN s ELSE market.seller_create('Payments Seller ' || g || '-' || i) END,
				'pay-customer', 'USD', amount / orders);
	END LOOP;
	INSERT INTO market.payments (group_id, customer_id, currency, amount_minor, method, psp)
	VALUES (g, 'pay-customer', 'USD', amount, method, psp) RETURNING id INTO p;
	INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
	VALUES ('psp', 'payment.authorize', 'payment', p,
			jsonb_build_object('payment_id', p, 'group_id', g, 'amount_minor', amount,
							   'currency', 'USD', 'method', method, 'psp', psp));
	RETURN p;
END
$$;
-- the jobs of one claim, without ids
CREATE FUNCTION pg_temp.claim(skip int[] DEFAULT '{}')
RETURNS TABLE (op text, payment bigint, account text, key_ok boolean, amount bigint, final boolean,
			   has_credentials boolean, attempt bigint)
LANGUAGE sql AS $$
	SELECT j ->> 'op', (j ->> 'payment_id')::bigint, j ->> 'account',
		   (j ->> 'key') = format('mk-%s-%s-%s%s', j ->> 'payment_id',
				CASE j ->> 'op' WHEN 'reconcile' THEN 'authorize' ELSE j ->> 'op' END,
				CASE j ->> 'op' WHEN 'reconcile' THEN '' ELSE j ->> 'outbox_id' END,
				CASE j ->> 'op' WHEN 'authorize' THEN '-' || (j ->> 'account_id') ELSE '' END)
			OR j ->> 'op' = 'reconcile',
		   (j ->> 'amount_minor')::bigint, (j ->> 'final_capture')::boolean,
		   j -> 'credentials' IS NOT NULL, (j ->> 'attempt_id')::bigint
	  FROM jsonb_array_elements(market.psp_claim('regress', 100, skip)) j
	 ORDER BY 2, 1
$$;
-- what the worker would send back
CREATE FUNCTION pg_temp.record(attempt bigint, outcome text, extra jsonb DEFAULT '{}')
RETURNS int LANGUAGE sql AS $$
	SELECT market.psp_record('regress',
		jsonb_build_array(jsonb_build_object('attempt_id', attempt, 'outcome', outcome, 'http_status', 200,
											 'latency_ms', 12.5) || extra))
$$;
-- a payment, its orders and its jobs, in short
CREATE FUNCTION pg_temp.state(p bigint)
RETURNS TABLE (status text, authorized bigint, captured bigint, refunded bigint, account text,
			   orders text, jobs text)
LANGUAGE sql AS $$
	SELECT x.status, x.authorized_minor, x.captured_minor, x.refunded_minor,
		   (SELECT a.name FROM market.psp_accounts a WHERE a.id = x.psp_account_id),
		   (SELECT string_agg(o.status, ',' ORDER BY o.id) FROM market.orders o WHERE o.group_id = x.group_id),
		   (SELECT string_agg(b.event_type || '=' || CASE WHEN b.acked_at IS NOT NULL THEN 'acked'
					WHEN b.dead_at IS NOT NULL THEN 'dead' WHEN b.lease_owner IS NOT NULL THEN 'leased'
					ELSE 'waiting' END, ',' ORDER BY b.id)
			  FROM market.outbox b WHERE b.topic = 'psp' AND b.aggregate_id = x.id
			   AND b.aggregate_type IN ('payment', 'psp_reconcile'))
	  FROM market.payments x WHERE x.id = p
$$;
-- make a waiting job due now
CREATE FUNCTION pg_temp.due() RETURNS void LANGUAGE sql AS $$
	UPDATE market.outbox SET lease_until = NULL WHERE topic = 'psp' AND lease_owner IS NULL
$$;

-- 1. success at the first account by priority: authorized, order confirmed
SELECT pg_temp.pay('pm_card_visa', 1500) AS p1 \gset
SELECT op, account, key_ok, amount, has_credentials, attempt AS a1 FROM pg_temp.claim() \gset
SELECT :'op' AS op, :'account' AS account, :'key_ok' AS key_ok, :'amount' AS amount, :'has_credentials' AS creds;
SELECT outcome, idempotency_key = format('mk-%s-authorize-%s-%s', payment_id, outbox_id, psp_account_id) AS key_ok
  FROM market.payment_attempts WHERE id = :a1;
SELECT * FROM pg_temp.claim();                      -- nothing: the row is leased
SELECT pg_temp.record(:a1, 'succeeded', '{"psp_reference": "pi_1"}') AS applied;
SELECT pg_temp.record(:a1, 'succeeded', '{"psp_reference": "pi_1"}') AS applied_again;
SELECT * FROM pg_temp.state(:p1);
SELECT market.payment_view(:p1) - ARRAY['payment_id', 'group_id', 'created_at', 'updated_at', 'attempts'] AS view;
SELECT jsonb_path_query(market.payment_view(:p1), '$.attempts[*] ? (@.operation == "authorize")')
	- ARRAY['id', 'started_at', 'finished_at', 'idempotency_key'] AS attempt;

-- 2. a hard decline: failed, the order payment_failed, no other account
SELECT pg_temp.pay('pm_card_chargeDeclined', 700) AS p2 \gset
SELECT attempt AS a2 FROM pg_temp.claim() \gset
SELECT pg_temp.record(:a2, 'hard_decline', '{"decline_code": "generic_decline", "http_status": 402}');
SELECT * FROM pg_temp.state(:p2);
SELECT decline_code, last_error FROM market.payments WHERE id = :p2;

-- 3. soft decline at stripe-a: the next account (adyen-b) at once, then
--    paypal-c; all three soft: failed
SELECT pg_temp.pay('pm_card_chargeDeclinedInsufficientFunds', 900) AS p3 \gset
SELECT account, attempt AS a3 FROM pg_temp.claim() \gset
SELECT :'account' AS first_account;
SELECT pg_temp.record(:a3, 'soft_decline', '{"decline_code": "insufficient_funds"}');
SELECT * FROM pg_temp.state(:p3);
SELECT account, key_ok, attempt AS a3 FROM pg_temp.claim() \gset
SELECT :'account' AS second_account, :'key_ok' AS key_ok;
SELECT pg_temp.record(:a3, 'unreachable', '{"http_status": 0, "error": "connection refused"}');
SELECT account, attempt AS a3 FROM pg_temp.claim() \gset
SELECT :'account' AS third_account;
SELECT pg_temp.record(:a3, 'soft_decline', '{"decline_code": "do_not_honor"}');
SELECT * FROM pg_temp.claim();                      -- settled inside the claim: failed
SELECT * FROM pg_temp.state(:p3);
SELECT psp, outcome, decline_code FROM market.payment_attempts WHERE payment_id = :p3 ORDER BY id;

-- 4. the payment's own account first; an open breaker is skipped
SELECT pg_temp.pay('pm_card_visa', 1100, 'paypal-c') AS p4 \gset
SELECT account, attempt AS a4 FROM pg_temp.claim(ARRAY[:paypal_c]) \gset
SELECT :'account' AS account_with_paypal_open;
SELECT pg_temp.record(:a4, 'succeeded', '{"psp_reference": "pi_4"}');
SELECT * FROM pg_temp.state(:p4);
SELECT pg_temp.pay('pm_card_visa', 1200, 'paypal-c') AS p4b \gset
SELECT account, attempt AS a4 FROM pg_temp.claim() \gset
SELECT :'account' AS account_preferred;
SELECT pg_temp.record(:a4, 'succeeded', '{"psp_reference": "pp_4"}');
SELECT * FROM pg_temp.state(:p4b);

-- 5. unknown outcome: replayed on the same account with the same key
--    (market.psp_max_retries = 3 times), then abandoned: the next account,
--    and a reconcile job for the abandoned one once the payment is decided
SET market.psp_retry_base = 0;
SELECT pg_temp.pay('pm_card_visa', 1300) AS p5 \gset
SELECT attempt AS a5 FROM pg_temp.claim() \gset
SELECT idempotency_key AS k5 FROM market.payment_attempts WHERE id = :a5 \gset
SELECT pg_temp.record(:a5, 'unknown', '{"http_status": 503, "error": "HTTP 503"}');
SELECT pg_temp.due();
SELECT account, attempt AS a5 FROM pg_temp.claim() \gset
SELECT :'account' AS replay_account, idempotency_key = :'k5' AS same_key FROM market.payment_attempts WHERE id = :a5;
-- the worker died after its intent: the next claim replays it too
UPDATE market.outbox SET lease_until = now() WHERE topic = 'psp' AND aggregate_id = :p5;
SELECT account, attempt AS a5 FROM pg_temp.claim() \gset
SELECT :'account' AS replay_account, idempotency_key = :'k5' AS same_key FROM market.payment_attempts WHERE id = :a5;
SELECT pg_temp.record(:a5, 'unknown', '{"http_status": 0, "error": "timeout"}');
SELECT pg_temp.due();
SELECT attempt AS a5 FROM pg_temp.claim() \gset
SELECT pg_temp.record(:a5, 'unknown', '{"http_status": 409}');
SELECT pg_temp.due();
SELECT account, attempt AS a5 FROM pg_temp.claim() \gset
SELECT :'account' AS after_retries;
SELECT pg_temp.record(:a5, 'succeeded', '{"psp_reference": "ady_5"}');
SELECT * FROM pg_temp.state(:p5);
SELECT psp, outcome, idempotency_key = :'k5' AS first_key, error FROM market.payment_attempts
 WHERE payment_id = :p5 ORDER BY id;
-- the reconcile job replays stripe-a's key; a late success there is voided
SELECT op, account, attempt AS r5 FROM pg_temp.claim() \gset
SELECT :'op' AS op, :'account' AS account, idempotency_key = :'k5' AS same_key
  FROM market.payment_attempts WHERE id = :r5;
SELECT pg_temp.record(:r5, 'succeeded', '{"psp_reference": "pi_late", "voided": false}');
SELECT * FROM pg_temp.state(:p5);                    -- not voided yet: waits
SELECT pg_temp.due();
SELECT attempt AS r5 FROM pg_temp.claim() \gset
SELECT pg_temp.record(:r5, 'succeeded', '{"psp_reference": "pi_late", "voided": true,
	"calls": [{"operation": "void", "key": "k", "http_status": 200, "outcome": "succeeded"}]}');
SELECT * FROM pg_temp.state(:p5);

-- 6. capture, partial: two orders, each captured on its own; the last one
--    is final.  Then an over-capture and an over-refund are refused.
SELECT pg_temp.pay('pm_card_visa', 2000, NULL, 2) AS p6 \gset
SELECT attempt AS a6 FROM pg_temp.claim() \gset
SELECT pg_temp.record(:a6, 'succeeded', '{"psp_reference": "pi_6"}');
SELECT id AS o6a FROM market.orders WHERE group_id = (SELECT group_id FROM market.payments WHERE id = :p6) ORDER BY id LIMIT 1 \gset
SELECT id AS o6b FROM market.orders WHERE group_id = (SELECT group_id FROM market.payments WHERE id = :p6) ORDER BY id DESC LIMIT 1 \gset
SELECT market.order_transition(:o6a, 'shipped');
SELECT op, amount, final, attempt AS c6 FROM pg_temp.claim() \gset
SELECT :'op' AS op, :'amount' AS amount, :'final' AS final;
SELECT pg_temp.record(:c6, 'succeeded');
SELECT market.order_transition(:o6b, 'shipped');
SELECT op, amount, final, attempt AS c6 FROM pg_temp.claim() \gset
SELECT :'op' AS op, :'amount' AS amount, :'final' AS final;
-- unknown: the same key again, never another account
SELECT pg_temp.record(:c6, 'unknown', '{"http_status": 500}');
SELECT pg_temp.due();
SELECT op, account, attempt AS c6 FROM pg_temp.claim() \gset
SELECT :'op' AS op, :'account' AS account, count(DISTINCT idempotency_key) AS keys
  FROM market.payment_attempts WHERE payment_id = :p6 AND operation = 'capture' AND order_id = :o6b;
SELECT pg_temp.record(:c6, 'succeeded');
SELECT * FROM pg_temp.state(:p6);
-- refund of one order, then a return that would refund more than captured
SELECT market.order_transition(:o6a, 'delivered'), market.order_transition(:o6a, 'returned'),
	   market.order_transition(:o6a, 'refunded');
SELECT op, amount, attempt AS f6 FROM pg_temp.claim() \gset
SELECT pg_temp.record(:f6, 'succeeded', '{"psp_reference": "re_6"}');
SELECT * FROM pg_temp.state(:p6);
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
VALUES ('psp', 'payment.refund', 'payment', :p6,
		jsonb_build_object('payment_id', :p6, 'order_id', :o6b, 'amount_minor', 5000, 'currency', 'USD'));
SELECT * FROM pg_temp.claim();                      -- refused without a call
SELECT * FROM pg_temp.state(:p6);
SELECT last_error FROM market.outbox WHERE topic = 'psp' AND aggregate_id = :p6 AND dead_at IS NOT NULL;
-- the constraints hold whoever writes
UPDATE market.payments SET refunded_minor = 999999 WHERE id = :p6;           -- 23514
UPDATE market.payments SET captured_minor = -1 WHERE id = :p6;               -- 23514
UPDATE market.payments SET captured_minor = authorized_minor + 1 WHERE id = :p6; -- 23514

-- 7. void: an order cancelled before capture releases the authorization
--    when no other order of the group needs it
SELECT pg_temp.pay('pm_card_visa', 800) AS p7 \gset
SELECT attempt AS a7 FROM pg_temp.claim() \gset
SELECT pg_temp.record(:a7, 'succeeded', '{"psp_reference": "pi_7"}');
SELECT market.order_transition(id, 'cancelled') FROM market.orders
 WHERE group_id = (SELECT group_id FROM market.payments WHERE id = :p7);
SELECT op, attempt AS v7 FROM pg_temp.claim() \gset
SELECT :'op' AS op;
SELECT pg_temp.record(:v7, 'succeeded');
SELECT * FROM pg_temp.state(:p7);
-- with another order still live, a cancel calls nobody
SELECT pg_temp.pay('pm_card_visa', 1000, NULL, 2) AS p8 \gset
SELECT attempt AS a8 FROM pg_temp.claim() \gset
SELECT pg_temp.record(:a8, 'succeeded', '{"psp_reference": "pi_8"}');
SELECT market.order_transition(min(id), 'cancelled') FROM market.orders
 WHERE group_id = (SELECT group_id FROM market.payments WHERE id = :p8);
SELECT * FROM pg_temp.claim();
SELECT * FROM pg_temp.state(:p8);
SELECT operation, outcome FROM market.payment_attempts WHERE payment_id = :p8 ORDER BY id;

-- 8. a refused capture (the PSP says no) is dead-lettered, not retried
SELECT id AS o8 FROM market.orders WHERE group_id = (SELECT group_id FROM market.payments WHERE id = :p8) AND status = 'confirmed' \gset
SELECT market.order_transition(:o8, 'shipped');
SELECT attempt AS c8 FROM pg_temp.claim() \gset
SELECT pg_temp.record(:c8, 'rejected', '{"http_status": 400, "error": "amount_too_large"}');
SELECT * FROM pg_temp.state(:p8);

-- 9. bad results, bad jobs
SELECT pg_temp.try('SELECT market.psp_record(''regress'', ''{}'')');
SELECT pg_temp.try('SELECT market.psp_record(''regress'', ''[{"attempt_id": 1, "outcome": "maybe"}]'')');
SELECT pg_temp.record(-1, 'succeeded') AS unknown_attempt_ignored;
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
VALUES ('psp', 'payment.teleport', 'payment', :p1, jsonb_build_object('payment_id', :p1)),
	   ('psp', 'payment.capture', 'payment', -5, '{"payment_id": -5}');
SELECT * FROM pg_temp.claim();
SELECT event_type, last_error FROM market.outbox WHERE topic = 'psp' AND dead_at IS NOT NULL ORDER BY id;
-- with every account disabled a new payment waits
SELECT market.psp_set_enabled(name, false) FROM market.psp_accounts;
SELECT pg_temp.pay('pm_card_visa', 100) AS p9 \gset
SELECT * FROM pg_temp.claim();
SELECT * FROM pg_temp.state(:p9);
SELECT last_error FROM market.outbox WHERE topic = 'psp' AND aggregate_id = :p9;

-- payment_view errors
SELECT market.payment_view(NULL);                                   -- MK020
SELECT market.payment_view(-1);                                     -- MK075

-- status: one row per account (no worker here: breakers closed, no pid)
SELECT account, kind, enabled, breaker, failures_in_row, in_flight, calls_5min > 0 AS called,
	   worker_pid FROM market.psp_status();

-- every outbox row of the psp topic is settled or waiting on purpose
SELECT event_type, count(*) FILTER (WHERE acked_at IS NOT NULL) AS acked,
	   count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead,
	   count(*) FILTER (WHERE acked_at IS NULL AND dead_at IS NULL) AS open
  FROM market.outbox WHERE topic = 'psp' GROUP BY event_type ORDER BY event_type;
