--
-- psp_batch: the set-based paths of market.psp_claim() and
-- market.psp_record() (0.4).  Several jobs per claim and several results per
-- record, mixing the batch path (first authorizations, their successes)
-- with the per-row path (replays, declines, duplicates); the walk of the
-- queue in windows; poison heads; bad input.  The PSP worker is off in this
-- cluster.
--
\set VERBOSITY sqlstate

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

-- the PSP rows earlier tests left open are parked (leased to nobody's
-- worker until the end of this test), so the claims below see only ours
CREATE TEMP TABLE parked AS
	SELECT id, lease_owner, lease_until FROM market.outbox
	 WHERE topic = 'psp' AND acked_at IS NULL AND dead_at IS NULL;
UPDATE market.outbox o SET lease_owner = 'psp_batch: parked', lease_until = 'infinity'
  FROM parked p WHERE o.id = p.id;

SELECT market.psp_register('batch-a', 'stripe', 'http://127.0.0.1:9/', '{"secret_key": "sk_test_a"}', 1) AS acc_a \gset
SELECT market.psp_register('batch-b', 'adyen', 'https://checkout-test.adyen.com',
	'{"api_key": "AQE_key", "merchant_account": "MarketMA"}', 2) AS acc_b \gset
-- the accounts of the payments test, if any, out of the way (put back at the end)
CREATE TEMP TABLE accounts_before AS SELECT id, enabled FROM market.psp_accounts WHERE name NOT LIKE 'batch-%';
UPDATE market.psp_accounts SET enabled = false WHERE name NOT LIKE 'batch-%';
SELECT market.seller_create('Batch Seller') AS seller \gset

CREATE FUNCTION pg_temp.pay(method text, amount bigint, psp text DEFAULT NULL, orders int DEFAULT 1)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE g bigint; p bigint; s bigint := (SELECT id FROM market.sellers WHERE name = 'Batch Seller');
BEGIN
	INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
	VALUES (gen_random_uuid(), 'batch-customer', 'EUR', amount) RETURNING id INTO g;
	FOR i IN 1 .. orders LOOP
		INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
		VALUES (g, CASE WHEN i = 1 THEN s ELSE market.seller_create('Batch Seller ' || g || '-' || i) END,
				'batch-customer', 'EUR', amount / orders);
	END LOOP;
	INSERT INTO market.payments (group_id, customer_id, currency, amount_minor, method, psp)
	VALUES (g, 'batch-customer', 'EUR', amount, method, psp) RETURNING id INTO p;
	INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
	VALUES ('psp', 'payment.authorize', 'payment', p,
			jsonb_build_object('payment_id', p, 'group_id', g, 'amount_minor', amount,
							   'currency', 'EUR', 'method', method, 'psp', psp));
	RETURN p;
END
$$;
-- the jobs of one claim, kept for the records below
CREATE TEMP TABLE jobs (n int, payment bigint, j jsonb);
CREATE FUNCTION pg_temp.claim(max int DEFAULT 100) RETURNS SETOF jobs LANGUAGE sql AS $$
	DELETE FROM jobs;
	INSERT INTO jobs SELECT x.n, (x.j ->> 'payment_id')::bigint, x.j
	  FROM jsonb_array_elements(market.psp_claim('regress', max)) WITH ORDINALITY AS x(j, n);
	SELECT * FROM jobs ORDER BY n
$$;
CREATE FUNCTION pg_temp.res(p bigint, outcome text, extra jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE sql AS $$
	SELECT jsonb_build_object('attempt_id', (j ->> 'attempt_id')::bigint, 'outcome', outcome,
							  'http_status', 200, 'latency_ms', 3.5) || extra
	  FROM jobs WHERE payment = p
$$;
CREATE FUNCTION pg_temp.state(p bigint)
RETURNS TABLE (status text, account text, orders text, jobs text, attempts text)
LANGUAGE sql AS $$
	SELECT x.status,
		   (SELECT a.name FROM market.psp_accounts a WHERE a.id = x.psp_account_id),
		   (SELECT string_agg(o.status, ',' ORDER BY o.id) FROM market.orders o WHERE o.group_id = x.group_id),
		   (SELECT string_agg(b.event_type || '=' || CASE WHEN b.acked_at IS NOT NULL THEN 'acked'
					WHEN b.dead_at IS NOT NULL THEN 'dead' WHEN b.lease_owner IS NOT NULL THEN 'leased'
					ELSE 'waiting' END, ',' ORDER BY b.id)
			  FROM market.outbox b WHERE b.topic = 'psp' AND b.aggregate_id = x.id
			   AND b.aggregate_type IN ('payment', 'psp_reconcile')),
		   (SELECT string_agg(t.psp || ':' || t.outcome, ',' ORDER BY t.id)
			  FROM market.payment_attempts t WHERE t.payment_id = x.id)
	  FROM market.payments x WHERE x.id = p
$$;
-- make a waiting job due now
CREATE FUNCTION pg_temp.due() RETURNS void LANGUAGE sql AS $$
	UPDATE market.outbox SET lease_until = NULL WHERE topic = 'psp' AND lease_owner IS NULL
$$;

-- ---------------------------------------------------------------------------
-- 1. bad input of psp_claim (the checks outbox_claim made in 0.3)
-- ---------------------------------------------------------------------------
SELECT pg_temp.try(s) FROM unnest(ARRAY[
	$$SELECT market.psp_claim(NULL, 10)$$,
	$$SELECT market.psp_claim('', 10)$$,
	$$SELECT market.psp_claim(repeat('x', 201), 10)$$,
	$$SELECT market.psp_claim('regress', NULL)$$,
	$$SELECT market.psp_claim('regress', 0)$$,
	$$SELECT market.psp_claim('regress', 10001)$$,
	$$SELECT market.psp_claim('regress', 10, '{}', '{}', '0 seconds')$$,
	$$SELECT market.psp_claim('regress', 10, '{}', '{}', '2 days')$$,
	$$SELECT market.psp_record('regress', '[{"attempt_id": 1, "outcome": "succeeded"}, {"attempt_id": 2}]')$$,
	$$SELECT market.psp_record('regress', '[1, 2]')$$,
	$$SELECT market.psp_record('regress', '[]')$$
]) AS s;

-- ---------------------------------------------------------------------------
-- 2. one claim, five jobs: four first authorizations (the batch path; p4
--    asks for batch-b itself) and a replay (the per-row path), in outbox
--    order, each with its intent written
-- ---------------------------------------------------------------------------
SELECT pg_temp.pay('pm_card_visa', 1000) AS p5 \gset
SELECT n FROM pg_temp.claim();
SELECT market.psp_record('regress', jsonb_build_array(pg_temp.res(:p5, 'unknown', '{"error": "timeout"}'))) AS applied;
SELECT pg_temp.due();
SELECT pg_temp.pay('pm_card_visa', 1100) AS p1 \gset
SELECT pg_temp.pay('pm_card_chargeDeclined', 1200) AS p2 \gset
SELECT pg_temp.pay('pm_card_visa', 1300, orders => 2) AS p3 \gset
SELECT pg_temp.pay('pm_card_visa', 1400, 'batch-b') AS p4 \gset
SELECT count(*) AS jobs FROM pg_temp.claim();
SELECT n, payment - :p5 AS payment, j ->> 'op' AS op, j ->> 'account' AS account,
	   (j ->> 'key') = format('mk-%s-authorize-%s-%s', j ->> 'payment_id', j ->> 'outbox_id', j ->> 'account_id') AS key_ok,
	   (j ->> 'amount_minor')::bigint AS amount, j ->> 'currency' AS currency, j ->> 'method' AS method,
	   j ->> 'reference' = 'mk-pay-' || payment AS ref_ok, j -> 'credentials' IS NOT NULL AS creds,
	   (SELECT t.outcome FROM market.payment_attempts t WHERE t.id = (j ->> 'attempt_id')::bigint) AS intent
  FROM jobs ORDER BY n;
-- the replay kept its key
SELECT count(DISTINCT idempotency_key) AS keys, count(*) AS attempts
  FROM market.payment_attempts WHERE payment_id = :p5;
-- the members of a job, as 0.3's psp_plan builds them
SELECT DISTINCT (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(j) k) AS members FROM jobs;

-- ---------------------------------------------------------------------------
-- 3. one record, seven results: successes (batch path), a hard decline, a
--    soft decline and the replay's success (per-row path), the same result
--    twice, a result for an unknown attempt; applied: one per attempt
-- ---------------------------------------------------------------------------
SELECT market.psp_record('regress', jsonb_build_array(
	pg_temp.res(:p1, 'succeeded', '{"psp_reference": "pi_b1"}'),
	pg_temp.res(:p2, 'hard_decline', '{"decline_code": "generic_decline", "http_status": 402}'),
	pg_temp.res(:p3, 'succeeded', '{"psp_reference": "pi_b3", "calls": [{"operation": "token", "outcome": "succeeded", "http_status": 200, "latency_ms": 1}]}'),
	pg_temp.res(:p3, 'unknown', '{"error": "a duplicate, ignored"}'),
	pg_temp.res(:p4, 'soft_decline', '{"decline_code": "insufficient_funds", "http_status": 402}'),
	pg_temp.res(:p5, 'succeeded', '{"psp_reference": "pi_b5"}'),
	'{"attempt_id": 999999999, "outcome": "succeeded"}'::jsonb)) AS applied;
SELECT p - :p5 AS payment, s.* FROM unnest(ARRAY[:p1, :p2, :p3, :p4, :p5]) p, pg_temp.state(p) s ORDER BY p;
SELECT psp_reference, authorized_minor FROM market.payments WHERE id IN (:p1, :p3, :p5) ORDER BY id;
-- the intermediate call of p3 has its row; the notes of the confirmed orders
SELECT operation, outcome, http_status FROM market.payment_attempts WHERE payment_id = :p3 ORDER BY id;
SELECT e.to_status, e.note FROM market.order_events e JOIN market.orders o ON o.id = e.order_id
 WHERE o.group_id = (SELECT group_id FROM market.payments WHERE id = :p3) AND e.to_status = 'confirmed'
 ORDER BY e.id;
-- recording again changes nothing
SELECT market.psp_record('regress', jsonb_build_array(pg_temp.res(:p1, 'succeeded', '{"psp_reference": "pi_b1"}'))) AS again;

-- p4 moved on to the next account at once: the row has an attempt
-- already, so the claim plans it per row; its success there is recorded by
-- the batch path
SELECT n, payment - :p5 AS payment, j ->> 'account' AS account FROM pg_temp.claim();
SELECT market.psp_record('regress', jsonb_build_array(pg_temp.res(:p4, 'succeeded', '{"psp_reference": "psp_b4"}'))) AS applied;
SELECT * FROM pg_temp.state(:p4);

-- a success whose payment was decided meanwhile (as 0.3: reconciled away);
-- here the payment is failed by hand between the claim and the record
SELECT pg_temp.pay('pm_card_visa', 1500) AS p6 \gset
SELECT count(*) AS jobs FROM pg_temp.claim();
UPDATE market.payments SET status = 'failed' WHERE id = :p6;
SELECT market.psp_record('regress', jsonb_build_array(pg_temp.res(:p6, 'succeeded', '{"psp_reference": "pi_late"}'))) AS applied;
SELECT * FROM pg_temp.state(:p6);
-- its reconcile job (per-row path) replays the authorization at batch-a
SELECT n, payment - :p6 AS payment, j ->> 'op' AS op, j ->> 'account' AS account FROM pg_temp.claim();
SELECT market.psp_record('regress', jsonb_build_array(pg_temp.res(:p6, 'hard_decline'))) AS applied;
SELECT * FROM pg_temp.state(:p6);

-- ---------------------------------------------------------------------------
-- 4. the walk of the queue: 150 rows behind a head in backoff come first;
--    a claim of 1 looks past them (windows of 2 * max + 100 rows)
-- ---------------------------------------------------------------------------
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload, lease_until)
SELECT 'psp', 'payment.capture', 'payment', -1, '{}', CASE WHEN g = 1 THEN clock_timestamp() + interval '1 hour' END
  FROM generate_series(1, 151) g;
SELECT pg_temp.pay('pm_card_visa', 1600) AS p7 \gset
SELECT n, payment - :p7 AS payment FROM pg_temp.claim(1);
SELECT count(*) AS rows_behind_still_waiting FROM market.outbox
 WHERE aggregate_id = -1 AND lease_owner IS NULL AND acked_at IS NULL;
UPDATE market.outbox SET acked_at = clock_timestamp() WHERE aggregate_id = -1;
SELECT market.psp_record('regress', jsonb_build_array(pg_temp.res(:p7, 'succeeded', '{"psp_reference": "pi_b7"}'))) AS applied;

-- ---------------------------------------------------------------------------
-- 5. poison: a head handed out outbox_max_attempts times whose lease ran
--    out is dead-lettered by the claim; the job behind it is then the head
-- ---------------------------------------------------------------------------
SELECT pg_temp.pay('pm_card_visa', 1700) AS p8 \gset
UPDATE market.outbox SET attempts = current_setting('market.outbox_max_attempts')::int,
	   lease_owner = 'regress', lease_until = clock_timestamp() - interval '1 second'
 WHERE topic = 'psp' AND aggregate_id = :p8;
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
VALUES ('psp', 'payment.void', 'payment', :p8, jsonb_build_object('payment_id', :p8));
SELECT count(*) AS jobs FROM pg_temp.claim();
SELECT event_type, dead_at IS NOT NULL AS dead, left(last_error, 30) AS error, attempts
  FROM market.outbox WHERE topic = 'psp' AND aggregate_id = :p8 ORDER BY id;
SELECT count(*) AS jobs FROM pg_temp.claim();
SELECT * FROM pg_temp.state(:p8);

-- nothing is left waiting or leased
SELECT count(*) AS open_jobs FROM market.outbox
 WHERE topic = 'psp' AND acked_at IS NULL AND dead_at IS NULL
   AND aggregate_id IN (:p1, :p2, :p3, :p4, :p5, :p6, :p7);

-- the parked rows as they were
UPDATE market.outbox o SET lease_owner = p.lease_owner, lease_until = p.lease_until
  FROM parked p WHERE o.id = p.id;

-- the accounts as they were, ours out of the way of the tests that follow
UPDATE market.psp_accounts a SET enabled = b.enabled FROM accounts_before b WHERE a.id = b.id;
UPDATE market.psp_accounts SET enabled = false WHERE name LIKE 'batch-%';
