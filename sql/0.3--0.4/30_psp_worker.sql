-- ===========================================================================
-- market 0.4, the PSP worker's two transactions made set-based
-- (docs/payments.md, "Worker design").
--
-- psp_claim and psp_record keep their signatures, their answers and every
-- rule of 0.3 (sql/0.2--0.3/20_psp_worker.sql); what changes is how the
-- work is done:
--
--   * the common case is handled a batch at a time: a first authorization
--     (a 'payment.authorize' row with no attempt yet, its payment pending,
--     no half-open breaker to probe) is planned by one INSERT for the whole
--     batch, and a successful authorization of a pending payment is
--     recorded by one statement per table (attempts, payments, orders,
--     reconcile jobs, outbox acks) for the whole batch;
--   * every other row (a replay, a failover, a decline, a capture, a void,
--     a refund, a reconcile, a probe) goes through the 0.3 per-row logic
--     (psp_plan, and the per-result body of psp_record), unchanged;
--   * the statements on the queue have plans that do not depend on fresh
--     planner statistics: the head of an aggregate is found by a correlated
--     min() over the partial index outbox_pending_idx, rows are reached by
--     primary key (id = ANY), the scan of the queue is a LIMITed SKIP
--     LOCKED walk of the partial index outbox_topic_pending_idx.  The
--     worker no longer needs to ANALYZE anything (it still does for a
--     database left at 0.3).
--
-- Lock order, in both transactions: attempt rows, then outbox rows, then
-- payment rows, each set in id order, then order rows (group by group, in
-- id order within a group), as the per-row 0.3 code did for one row.  The
-- orders are then moved together by order_transition_many
-- (50_orders.sql), which locks them again in id order (they are held
-- already, so it waits for nothing).
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- outbox_ack, same contract as 0.2, with the ordering check as a correlated
-- probe of outbox_pending_idx (an anti-join could be planned as a scan of
-- every pending row when the statistics lag behind a burst of inserts).
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION market.outbox_ack(ids bigint[], consumer text DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_ids bigint[] := outbox_ack.ids;
	v_consumer text := outbox_ack.consumer;
	v_n int;
BEGIN
	IF v_ids IS NULL THEN
		RAISE EXCEPTION 'ids must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF array_position(v_ids, NULL) IS NOT NULL THEN
		RAISE EXCEPTION 'ids must not contain null' USING ERRCODE = 'MK020';
	END IF;
	IF cardinality(v_ids) > 10000 THEN
		RAISE EXCEPTION 'too many ids'
			USING ERRCODE = 'MK051', DETAIL = format('%s ids were given; at most 10000 are allowed per call.', cardinality(v_ids));
	END IF;
	IF v_consumer IS NOT NULL AND length(v_consumer) NOT BETWEEN 1 AND 200 THEN
		RAISE EXCEPTION 'consumer must be 1 to 200 characters' USING ERRCODE = 'MK020';
	END IF;
	IF cardinality(v_ids) = 0 THEN
		RETURN 0;
	END IF;

	-- lock in id order, then ack those that are not held back by an earlier
	-- undelivered row of their aggregate outside this call
	PERFORM FROM market.outbox x WHERE x.id = ANY (v_ids) ORDER BY x.id FOR UPDATE OF x;
	UPDATE market.outbox o
	   SET acked_at = clock_timestamp(), lease_until = NULL
	 WHERE o.id = ANY (v_ids)
	   AND coalesce(o.acked_at, o.dead_at) IS NULL
	   AND (v_consumer IS NULL OR o.lease_owner = v_consumer)
	   AND (SELECT e.id FROM market.outbox e
			 WHERE e.topic = o.topic
			   AND e.aggregate_type = o.aggregate_type
			   AND e.aggregate_id = o.aggregate_id
			   AND e.id < o.id
			   AND e.acked_at IS NULL AND e.dead_at IS NULL
			   AND e.id <> ALL (v_ids)
			 ORDER BY e.topic, e.aggregate_type, e.aggregate_id, e.id
			 LIMIT 1) IS NULL;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------
-- psp_claim: the worker's first transaction (contract of 0.3).  Claims the
-- heads of up to max 'psp' aggregates (SKIP LOCKED), dead-letters a head
-- handed out market.outbox_max_attempts times without an answer (poison,
-- as outbox_claim does), plans the first authorizations of the batch in
-- one INSERT and every other row with psp_plan.  skip: accounts whose
-- breaker is open; probe: accounts whose breaker is half-open, which get at
-- most one new job (with a probe due, every row takes the per-row path).
-- Returns the jobs, a JSON array in outbox id order.
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION market.psp_claim(consumer text, max int, skip int[] DEFAULT '{}',
	probe int[] DEFAULT '{}', lease interval DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_consumer text := psp_claim.consumer;
	v_max int := psp_claim.max;
	v_skip int[] := coalesce(psp_claim.skip, '{}') || coalesce(psp_claim.probe, '{}');
	v_probe int[] := coalesce(psp_claim.probe, '{}');
	v_lease interval := coalesce(psp_claim.lease,
		coalesce(current_setting('market.psp_lease', true), '60s')::interval);
	v_max_attempts int := current_setting('market.outbox_max_attempts')::int;
	v_now timestamptz := clock_timestamp();
	v_window int := 2 * psp_claim.max + 100;
	v_after bigint := 0;
	v_last bigint;
	v_seen bigint;
	v_heads bigint[] := '{}';
	v_dead bigint[];
	v_got bigint[];
	v_msgs market.outbox_message[];
	v_fast bigint[];
	v_jobs jsonb := '[]';
	m market.outbox_message;
	j jsonb;
BEGIN
	-- the checks of outbox_claim, which 0.3 called
	IF v_consumer IS NULL THEN
		RAISE EXCEPTION 'consumer must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF length(v_consumer) NOT BETWEEN 1 AND 200 THEN
		RAISE EXCEPTION 'consumer must be 1 to 200 characters'
			USING ERRCODE = 'MK020', DETAIL = format('It has %s.', length(v_consumer));
	END IF;
	IF v_max IS NULL THEN
		RAISE EXCEPTION 'max must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF v_max NOT BETWEEN 1 AND 10000 THEN
		RAISE EXCEPTION 'claim size out of range'
			USING ERRCODE = 'MK051', DETAIL = format('max is %s; it must be between 1 and 10000.', v_max);
	END IF;
	IF v_lease < interval '1 second' OR v_lease > interval '1 day' THEN
		RAISE EXCEPTION 'lease out of range'
			USING ERRCODE = 'MK051', DETAIL = format('lease is %s; it must be between 1 second and 1 day.', v_lease);
	END IF;

	-- 1. the heads: the oldest undelivered row of each aggregate, its lease
	--    free or run out, oldest first, nobody else's lock on it.  The queue
	--    is walked in windows of claimable rows in id order (a LIMITed scan);
	--    the rows of a window that come first in their aggregate among all
	--    undelivered rows up to the window's end (read once, numbered per
	--    aggregate) are its heads.  No statement probes the queue once per
	--    row (a probe a stale plan could turn into a walk of the queue from
	--    its start, per row): whatever the plan, a statement reads the queue
	--    up to the end of one window.  A window that yields too few heads
	--    (rows behind a head in backoff, rows others hold) is followed by the
	--    next one.
	LOOP
		EXECUTE $q$
		WITH w AS MATERIALIZED (
			SELECT c.id
			  FROM market.outbox c
			 WHERE c.topic = 'psp' AND c.acked_at IS NULL AND c.dead_at IS NULL
			   AND (c.lease_until IS NULL OR c.lease_until <= $1)
			   AND c.id > $2
			 ORDER BY c.id
			 LIMIT $3),
		front AS (
			SELECT e.id,
				   (e.lease_until IS NULL OR e.lease_until <= $1) AND e.id > $2 AS in_window,
				   row_number() OVER (PARTITION BY e.aggregate_type, e.aggregate_id ORDER BY e.id) AS k
			  FROM market.outbox e
			 WHERE e.topic = 'psp' AND e.acked_at IS NULL AND e.dead_at IS NULL
			   AND e.id <= (SELECT max(w.id) FROM w)),
		heads AS (
			SELECT f.id FROM front f WHERE f.k = 1 AND f.in_window)
		SELECT (SELECT array_agg(h.id ORDER BY h.id)
				  FROM (SELECT o.id FROM market.outbox o
						 WHERE o.id IN (SELECT heads.id FROM heads)
						   AND coalesce(o.acked_at, o.dead_at) IS NULL
						   AND (o.lease_until IS NULL OR o.lease_until <= $1)
						 ORDER BY o.id
						 LIMIT $4
						   FOR UPDATE OF o SKIP LOCKED) h),
			   (SELECT max(w.id) FROM w),
			   (SELECT count(*) FROM w)
		$q$
		INTO v_got, v_last, v_seen
		USING v_now, v_after, v_window, v_max - cardinality(v_heads);
		v_heads := v_heads || coalesce(v_got, '{}');
		EXIT WHEN cardinality(v_heads) >= v_max OR v_seen < v_window;
		v_after := v_last;
	END LOOP;
	IF cardinality(v_heads) = 0 THEN
		RETURN v_jobs;
	END IF;

	-- 2. poison: handed out max_attempts times, never answered
	SELECT array_agg(o.id ORDER BY o.id) INTO v_dead
	  FROM market.outbox o WHERE o.id = ANY (v_heads) AND o.attempts >= v_max_attempts;
	IF v_dead IS NOT NULL THEN
		UPDATE market.outbox o
		   SET dead_at = v_now, lease_until = NULL,
			   last_error = format('lease expired after attempt %s', o.attempts)
							|| coalesce('; last error: ' || o.last_error, '')
		 WHERE o.id = ANY (v_dead);
		UPDATE market.outbox o
		   SET attempts = 0
		  FROM market.outbox d
		 WHERE d.id = ANY (v_dead)
		   AND o.topic = d.topic AND o.aggregate_type = d.aggregate_type
		   AND o.aggregate_id = d.aggregate_id AND o.id > d.id
		   AND o.acked_at IS NULL AND o.dead_at IS NULL AND o.attempts > 0;
		SELECT array_agg(x ORDER BY x) INTO v_heads FROM unnest(v_heads) x WHERE x <> ALL (v_dead);
		IF v_heads IS NULL THEN
			RETURN v_jobs;
		END IF;
	END IF;

	-- 3. the lease
	WITH leased AS (
		UPDATE market.outbox o
		   SET lease_owner = v_consumer, lease_until = v_now + v_lease, attempts = o.attempts + 1
		 WHERE o.id = ANY (v_heads)
		RETURNING o.id, o.topic, o.event_type, o.aggregate_type, o.aggregate_id,
				  o.payload, o.created_at, o.attempts)
	SELECT array_agg(ROW(l.id, l.topic, l.event_type, l.aggregate_type, l.aggregate_id,
						 l.payload, l.created_at, l.attempts)::market.outbox_message ORDER BY l.id)
	  INTO v_msgs
	  FROM leased l;

	-- 4. the payments of the batch, locked in id order (psp_plan locks each
	--    again, which costs nothing)
	EXECUTE $q$
	SELECT FROM market.payments p
	 WHERE p.id IN (SELECT (x.payload ->> 'payment_id')::bigint FROM unnest($1) x
					 WHERE x.payload ->> 'payment_id' ~ '^[0-9]{1,18}$')
	 ORDER BY p.id
	   FOR UPDATE OF p
	$q$
	USING v_msgs;

	-- 5. first authorizations, all at once: the account is the first
	--    enabled one by priority (the payment's own choice first) whose
	--    breaker is closed; the intent is written 'pending' as psp_plan does
	IF cardinality(v_probe) = 0 THEN
		EXECUTE $q$
		WITH f AS (
			SELECT m1.id AS outbox_id, p.id AS payment_id, p.amount_minor, p.currency,
				   p.method, p.psp_reference,
				   (m1.payload ->> 'order_id')::bigint AS order_id,
				   a.id AS account_id, a.name AS account, a.kind, a.base_url, a.credentials,
				   (a.options ->> 'timeout_ms')::int AS timeout_ms
			  FROM unnest($1) m1
			 CROSS JOIN LATERAL (
					SELECT x.* FROM market.payments x
					 WHERE x.id = (m1.payload ->> 'payment_id')::bigint
					 LIMIT 1) p
			 CROSS JOIN LATERAL (
					SELECT x.* FROM market.psp_accounts x
					 WHERE x.enabled AND x.id <> ALL ($2)
					 ORDER BY (x.name = p.psp) DESC NULLS LAST, x.priority, x.id
					 LIMIT 1) a
			 WHERE m1.event_type = 'payment.authorize'
			   AND m1.payload ->> 'payment_id' ~ '^[0-9]{1,18}$'
			   AND coalesce(m1.payload ->> 'order_id', '0') ~ '^[0-9]{1,18}$'
			   AND p.status = 'pending'
			   AND (SELECT t.id FROM market.payment_attempts t
					 WHERE t.outbox_id = m1.id ORDER BY t.outbox_id, t.id LIMIT 1) IS NULL),
		ins AS (
			INSERT INTO market.payment_attempts (payment_id, order_id, outbox_id, psp_account_id,
				psp, operation, idempotency_key, amount_minor, request)
			SELECT f.payment_id, f.order_id, f.outbox_id, f.account_id, f.account, 'authorize',
				   format('mk-%s-authorize-%s-%s', f.payment_id, f.outbox_id, f.account_id),
				   f.amount_minor, format('authorize %s %s', f.amount_minor, f.currency)
			  FROM f
			 ORDER BY f.outbox_id
			RETURNING id, outbox_id, idempotency_key)
		SELECT array_agg(f.outbox_id),
			   coalesce(jsonb_agg(jsonb_build_object(
					'outbox_id', f.outbox_id,
					'attempt_id', i.id,
					'op', 'authorize',
					'payment_id', f.payment_id,
					'order_id', f.order_id,
					'key', i.idempotency_key,
					'void_key', NULL,
					'amount_minor', f.amount_minor,
					'currency', f.currency,
					'method', coalesce(f.method, ''),
					'reference', format('mk-pay-%s', f.payment_id),
					'psp_reference', f.psp_reference,
					'winner_reference', f.psp_reference,
					'capture_reference', NULL,
					'final_capture', false,
					'account_id', f.account_id,
					'account', f.account,
					'kind', f.kind,
					'base_url', f.base_url,
					'credentials', f.credentials,
					'timeout_ms', f.timeout_ms) ORDER BY f.outbox_id), '[]')
		  FROM f JOIN ins i ON i.outbox_id = f.outbox_id
		$q$
		INTO v_fast, v_jobs
		USING v_msgs, v_skip;
	END IF;

	-- 6. every other row, one at a time, as in 0.3; a half-open account
	--    gets one probe: it is offered to one job at a time
	FOREACH m IN ARRAY v_msgs LOOP
		CONTINUE WHEN v_fast IS NOT NULL AND m.id = ANY (v_fast);
		j := market.psp_plan(m, v_consumer,
			 CASE WHEN cardinality(v_probe) > 0
				  THEN array(SELECT x FROM unnest(v_skip) x WHERE x <> v_probe[1])
				  ELSE v_skip END);
		IF j IS NOT NULL THEN
			IF cardinality(v_probe) > 0 AND (j ->> 'account_id')::int = v_probe[1] THEN
				v_probe := v_probe[2:];
			END IF;
			v_jobs := v_jobs || jsonb_build_array(j);
		END IF;
	END LOOP;

	IF v_fast IS NOT NULL AND cardinality(v_fast) < cardinality(v_msgs) THEN
		SELECT jsonb_agg(x ORDER BY (x ->> 'outbox_id')::bigint) INTO v_jobs
		  FROM jsonb_array_elements(v_jobs) x;
	END IF;
	RETURN coalesce(v_jobs, '[]');
END
$$;

-- ---------------------------------------------------------------------------
-- psp_record: the worker's second transaction (contract of 0.3).  results
-- is an array of {attempt_id, outcome, http_status, latency_ms, error,
-- decline_code, psp_reference, capture_reference, request, voided, calls}.
-- Successful authorizations of pending payments are recorded together;
-- every other result goes through the 0.3 per-result logic, in the order
-- given.  Returns how many results were applied.
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION market.psp_record(consumer text, results jsonb)
RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	r jsonb;
	c jsonb;
	t market.payment_attempts;
	m market.outbox;
	p market.payments;
	v_op text;
	v_outcome text;
	v_n int := 0;
	v_unknown int;
	v_err text;
	v_bad text;
	v_atts bigint[];
	v_f jsonb;			-- the results recorded by the set-based path
	v_fast bigint[];	-- their attempt ids
	v_fast_pos bigint[];	-- their positions in results
	v_pos bigint;
BEGIN
	IF results IS NULL OR jsonb_typeof(results) <> 'array' THEN
		RAISE EXCEPTION 'results must be a JSON array' USING ERRCODE = 'MK021';
	END IF;
	-- every outcome is checked before anything is written
	SELECT coalesce(x ->> 'outcome', '<NULL>') INTO v_bad
	  FROM jsonb_array_elements(results) x
	 WHERE (x ->> 'outcome') IS NULL
		OR (x ->> 'outcome') NOT IN ('succeeded', 'hard_decline', 'soft_decline',
									 'rejected', 'unreachable', 'unknown')
	 LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION 'invalid outcome "%"', v_bad USING ERRCODE = 'MK021';
	END IF;
	IF jsonb_array_length(results) = 0 THEN
		RETURN 0;
	END IF;

	-- the set-based path: successful authorizations of pending payments.
	-- A result takes it when it is the first result given for its attempt
	-- and for its payment; any later one takes the per-result path below,
	-- which then sees the attempt recorded and the payment decided.
	SELECT array_agg(DISTINCT (x ->> 'attempt_id')::bigint) INTO v_atts
	  FROM jsonb_array_elements(results) x
	 WHERE x ->> 'attempt_id' ~ '^[0-9]{1,18}$';
	IF v_atts IS NOT NULL AND EXISTS (SELECT FROM jsonb_array_elements(results) x
									 WHERE x ->> 'outcome' = 'succeeded') THEN
		EXECUTE $q$
		SELECT FROM market.payment_attempts x WHERE x.id = ANY ($1) ORDER BY x.id FOR UPDATE OF x
		$q$
		USING v_atts;
		EXECUTE $q$
		SELECT FROM market.outbox x
		 WHERE x.id IN (SELECT a.outbox_id FROM market.payment_attempts a WHERE a.id = ANY ($1))
		 ORDER BY x.id FOR UPDATE OF x
		$q$
		USING v_atts;
		EXECUTE $q$
		SELECT FROM market.payments x
		 WHERE x.id IN (SELECT a.payment_id FROM market.payment_attempts a WHERE a.id = ANY ($1))
		 ORDER BY x.id FOR UPDATE OF x
		$q$
		USING v_atts;
		EXECUTE $q$
		SELECT jsonb_agg(jsonb_build_object(
					'pos', y.pos, 'attempt_id', y.attempt_id, 'outbox_id', y.outbox_id,
					'payment_id', y.payment_id, 'group_id', y.group_id, 'account_id', y.account_id,
					'psp', y.psp, 'amount_minor', y.amount_minor, 'r', y.r) ORDER BY y.pos),
			   array_agg(y.attempt_id ORDER BY y.pos), array_agg(y.pos ORDER BY y.pos)
		  FROM (SELECT x.pos, x.r, t1.id AS attempt_id, t1.outbox_id, t1.payment_id, p1.group_id,
					   t1.psp_account_id AS account_id, t1.psp, t1.amount_minor,
					   t1.outcome AS was, m1.acked_at, m1.dead_at, m1.event_type, p1.status,
					   row_number() OVER (PARTITION BY t1.id ORDER BY x.pos) AS first_of_attempt,
					   row_number() OVER (PARTITION BY t1.payment_id ORDER BY x.pos) AS first_of_payment
				  FROM jsonb_array_elements($1) WITH ORDINALITY AS x(r, pos)
				 CROSS JOIN LATERAL (SELECT a.* FROM market.payment_attempts a
									  WHERE a.id = (x.r ->> 'attempt_id')::bigint
										AND x.r ->> 'attempt_id' ~ '^[0-9]{1,18}$' LIMIT 1) t1
				 CROSS JOIN LATERAL (SELECT b.* FROM market.outbox b WHERE b.id = t1.outbox_id LIMIT 1) m1
				 CROSS JOIN LATERAL (SELECT c.* FROM market.payments c WHERE c.id = t1.payment_id LIMIT 1) p1) y
		 WHERE y.first_of_attempt = 1 AND y.first_of_payment = 1
		   AND y.r ->> 'outcome' = 'succeeded'
		   AND y.was = 'pending'
		   AND y.acked_at IS NULL AND y.dead_at IS NULL
		   AND y.event_type = 'payment.authorize'
		   AND y.status = 'pending'
		$q$
		INTO v_f, v_fast, v_fast_pos
		USING results;
	END IF;

	IF v_fast IS NOT NULL THEN
		IF consumer IS NOT NULL AND length(consumer) NOT BETWEEN 1 AND 200 THEN
			RAISE EXCEPTION 'consumer must be 1 to 200 characters' USING ERRCODE = 'MK020';
		END IF;
		-- the intermediate calls (only when a result has any: the statement
		-- costs a plan and a scan of the batch even when it inserts nothing),
		-- then the attempts themselves
		IF jsonb_path_exists(v_f, '$[*].r.calls[*]') THEN
		EXECUTE $q$
		INSERT INTO market.payment_attempts (payment_id, order_id, outbox_id, psp_account_id, psp,
			operation, idempotency_key, amount_minor, request, http_status, outcome, decline_code,
			psp_reference, latency_ms, error, started_at, finished_at)
		SELECT t1.payment_id, t1.order_id, t1.outbox_id, t1.psp_account_id, t1.psp,
			   c1 ->> 'operation', c1 ->> 'key', (c1 ->> 'amount_minor')::bigint, left(c1 ->> 'request', 500),
			   (c1 ->> 'http_status')::int, c1 ->> 'outcome', c1 ->> 'decline_code',
			   c1 ->> 'psp_reference', (c1 ->> 'latency_ms')::float8, left(c1 ->> 'error', 2000),
			   clock_timestamp(), clock_timestamp()
		  FROM jsonb_to_recordset($1) AS f(pos bigint, attempt_id bigint, r jsonb)
		  JOIN market.payment_attempts t1 ON t1.id = f.attempt_id
		 CROSS JOIN LATERAL jsonb_array_elements(coalesce(f.r -> 'calls', '[]')) WITH ORDINALITY AS c(c1, n)
		 ORDER BY f.pos, c.n
		$q$
		USING v_f;
		END IF;
		EXECUTE $q$
		UPDATE market.payment_attempts x
		   SET outcome = 'succeeded',
			   http_status = (f.r ->> 'http_status')::int,
			   latency_ms = (f.r ->> 'latency_ms')::float8,
			   error = left(f.r ->> 'error', 2000),
			   decline_code = f.r ->> 'decline_code',
			   psp_reference = coalesce(f.r ->> 'capture_reference', f.r ->> 'psp_reference'),
			   request = coalesce(left(f.r ->> 'request', 500), x.request),
			   finished_at = clock_timestamp()
		  FROM jsonb_to_recordset($1) AS f(attempt_id bigint, r jsonb)
		 WHERE x.id = f.attempt_id
		$q$
		USING v_f;
		EXECUTE $q$
		UPDATE market.payments x
		   SET status = 'authorized', authorized_minor = f.amount_minor,
			   psp_account_id = f.account_id, psp_reference = f.r ->> 'psp_reference',
			   decline_code = NULL, last_error = NULL, updated_at = now()
		  FROM jsonb_to_recordset($1) AS f(payment_id bigint, account_id int, amount_minor bigint, r jsonb)
		 WHERE x.id = f.payment_id
		$q$
		USING v_f;
		-- the orders of each group that wait for the payment: confirmed, all
		-- in one UPDATE (locked here group by group as before, then moved
		-- together by order_transition_many)
		EXECUTE $q$
		SELECT market.order_transition_many(
				   coalesce(array_agg(o.id ORDER BY f.pos, o.id), '{}'), 'confirmed',
				   coalesce(array_agg(format('payment authorized at %s', f.psp) ORDER BY f.pos, o.id), '{}'))
		   FROM jsonb_to_recordset($1) AS f(pos bigint, group_id bigint, psp text)
		  CROSS JOIN LATERAL (
				SELECT x.id FROM market.orders x
				 WHERE x.group_id = f.group_id AND x.status = 'created'
				 ORDER BY x.id
				   FOR UPDATE OF x) o
		$q$
		USING v_f;
		-- a reconcile job for every other account left with an unknown outcome
		-- (the authorizations that have no unknown attempt at all, nearly
		-- every one, are left out by one probe of payment_attempts_outbox_idx
		-- before the per-account look at their attempts)
		EXECUTE $q$
		INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
		SELECT 'psp', 'payment.reconcile', 'psp_reconcile', f.payment_id,
			   jsonb_build_object('payment_id', f.payment_id, 'account_id', l.psp_account_id,
								  'authorize_outbox_id', f.outbox_id)
		  FROM jsonb_to_recordset($1) AS f(pos bigint, outbox_id bigint, payment_id bigint, account_id int)
		 CROSS JOIN LATERAL (
				SELECT DISTINCT ON (a.psp_account_id) a.psp_account_id, a.outcome
				  FROM market.payment_attempts a
				 WHERE a.outbox_id = f.outbox_id AND a.operation = 'authorize'
				 ORDER BY a.psp_account_id, a.id DESC) l
		 WHERE l.outcome = 'unknown' AND l.psp_account_id IS DISTINCT FROM f.account_id
		   AND EXISTS (SELECT FROM market.payment_attempts u
						WHERE u.outbox_id = f.outbox_id AND u.outcome = 'unknown')
		 ORDER BY f.pos, l.psp_account_id
		$q$
		USING v_f;
		-- the rows are delivered, each held by consumer and the head of its
		-- aggregate (as outbox_ack checks; the heads are numbered among the
		-- undelivered rows up to the batch's last row, read once)
		EXECUTE $q$
		WITH f AS (SELECT x.outbox_id FROM jsonb_to_recordset($1) AS x(outbox_id bigint)),
		front AS (
			SELECT e.id,
				   row_number() OVER (PARTITION BY e.topic, e.aggregate_type, e.aggregate_id ORDER BY e.id) AS k
			  FROM market.outbox e
			 WHERE e.topic = 'psp' AND e.acked_at IS NULL AND e.dead_at IS NULL
			   AND e.id <= (SELECT max(f.outbox_id) FROM f))
		UPDATE market.outbox o
		   SET acked_at = clock_timestamp(), lease_until = NULL
		 WHERE o.id IN (SELECT front.id FROM front WHERE front.k = 1
						   AND front.id IN (SELECT f.outbox_id FROM f))
		   AND coalesce(o.acked_at, o.dead_at) IS NULL
		   AND ($2::text IS NULL OR o.lease_owner = $2)
		$q$
		USING v_f, consumer;
		v_n := cardinality(v_fast);
	END IF;

	-- every other result, in the order given, as in 0.3
	FOR r, v_pos IN SELECT x.r, x.pos FROM jsonb_array_elements(results) WITH ORDINALITY AS x(r, pos)
	LOOP
		CONTINUE WHEN v_fast_pos IS NOT NULL AND v_pos = ANY (v_fast_pos);
		v_outcome := r ->> 'outcome';
		SELECT * INTO t FROM market.payment_attempts x WHERE x.id = (r ->> 'attempt_id')::bigint FOR UPDATE;
		CONTINUE WHEN NOT FOUND OR t.outcome <> 'pending';
		SELECT * INTO m FROM market.outbox x WHERE x.id = t.outbox_id FOR UPDATE;
		CONTINUE WHEN NOT FOUND OR m.acked_at IS NOT NULL OR m.dead_at IS NOT NULL;
		SELECT * INTO p FROM market.payments x WHERE x.id = t.payment_id FOR UPDATE;
		v_err := left(r ->> 'error', 2000);
		v_n := v_n + 1;

		-- the intermediate calls, then the attempt itself
		FOR c IN SELECT * FROM jsonb_array_elements(coalesce(r -> 'calls', '[]'))
		LOOP
			INSERT INTO market.payment_attempts (payment_id, order_id, outbox_id, psp_account_id, psp,
				operation, idempotency_key, amount_minor, request, http_status, outcome, decline_code,
				psp_reference, latency_ms, error, started_at, finished_at)
			VALUES (t.payment_id, t.order_id, t.outbox_id, t.psp_account_id, t.psp,
				c ->> 'operation', c ->> 'key', (c ->> 'amount_minor')::bigint, left(c ->> 'request', 500),
				(c ->> 'http_status')::int, c ->> 'outcome', c ->> 'decline_code',
				c ->> 'psp_reference', (c ->> 'latency_ms')::float8, left(c ->> 'error', 2000),
				clock_timestamp(), clock_timestamp());
		END LOOP;
		UPDATE market.payment_attempts x
		   SET outcome = v_outcome,
			   http_status = (r ->> 'http_status')::int,
			   latency_ms = (r ->> 'latency_ms')::float8,
			   error = v_err,
			   decline_code = r ->> 'decline_code',
			   psp_reference = coalesce(r ->> 'capture_reference', r ->> 'psp_reference'),
			   request = coalesce(left(r ->> 'request', 500), x.request),
			   finished_at = clock_timestamp()
		 WHERE x.id = t.id;

		v_op := CASE m.event_type
			WHEN 'payment.authorize' THEN 'authorize' WHEN 'payment.capture' THEN 'capture'
			WHEN 'payment.void' THEN 'void' WHEN 'payment.refund' THEN 'refund'
			ELSE 'reconcile' END;
		SELECT count(*) INTO v_unknown FROM market.payment_attempts x
		 WHERE x.outbox_id = m.id AND x.psp_account_id IS NOT DISTINCT FROM t.psp_account_id
		   AND x.outcome IN ('unknown', 'unreachable');

		IF v_op = 'authorize' THEN
			IF p.status <> 'pending' THEN
				-- decided meanwhile (cannot happen with one worker): a success
				-- here is a second authorization and is reconciled away
				IF v_outcome = 'succeeded' THEN
					UPDATE market.payment_attempts x SET outcome = 'unknown',
						error = 'authorized after the payment was decided; reconciled'
					 WHERE x.id = t.id;
					PERFORM market.psp_queue_reconcile(p.id, m.id, p.psp_account_id);
				END IF;
				PERFORM market.outbox_ack(ARRAY[m.id], consumer);
			ELSIF v_outcome = 'succeeded' THEN
				UPDATE market.payments x
				   SET status = 'authorized', authorized_minor = t.amount_minor,
					   psp_account_id = t.psp_account_id, psp_reference = r ->> 'psp_reference',
					   decline_code = NULL, last_error = NULL, updated_at = now()
				 WHERE x.id = p.id;
				PERFORM market.psp_orders_to(p.group_id, 'confirmed', format('payment authorized at %s', t.psp));
				PERFORM market.psp_queue_reconcile(p.id, m.id, t.psp_account_id);
				PERFORM market.outbox_ack(ARRAY[m.id], consumer);
			ELSIF v_outcome = 'hard_decline' THEN
				UPDATE market.payments x
				   SET status = 'failed', decline_code = r ->> 'decline_code',
					   last_error = format('declined at %s: %s', t.psp, coalesce(r ->> 'decline_code', v_err)),
					   updated_at = now()
				 WHERE x.id = p.id;
				PERFORM market.psp_orders_to(p.group_id, 'payment_failed',
					format('payment declined at %s (%s)', t.psp, coalesce(r ->> 'decline_code', 'declined')));
				PERFORM market.psp_queue_reconcile(p.id, m.id, NULL);
				PERFORM market.outbox_ack(ARRAY[m.id], consumer);
			ELSIF v_outcome = 'unknown' THEN
				-- same account, same key, after a backoff
				UPDATE market.payments x SET last_error = format('%s: outcome unknown: %s', t.psp, v_err)
				 WHERE x.id = p.id;
				PERFORM market.psp_reschedule(m.id, market.psp_backoff(v_unknown), v_err);
			ELSE
				-- soft decline, refusal, unreachable: the next account, now
				UPDATE market.payments x
				   SET decline_code = coalesce(r ->> 'decline_code', x.decline_code),
					   last_error = format('%s at %s: %s', v_outcome, t.psp, coalesce(r ->> 'decline_code', v_err))
				 WHERE x.id = p.id;
				PERFORM market.psp_reschedule(m.id, interval '0', v_err);
			END IF;

		ELSIF v_op = 'reconcile' THEN
			IF v_outcome = 'succeeded' AND NOT coalesce((r ->> 'voided')::boolean, false)
			   AND (r ->> 'psp_reference') IS DISTINCT FROM p.psp_reference THEN
				-- a late authorization that is not voided yet: again
				PERFORM market.psp_reschedule(m.id, market.psp_backoff(v_unknown + 1),
											  coalesce(v_err, 'late authorization not voided yet'));
			ELSIF v_outcome IN ('unknown', 'unreachable') THEN
				PERFORM market.psp_reschedule(m.id, market.psp_backoff(v_unknown), v_err);
			ELSE
				PERFORM market.outbox_ack(ARRAY[m.id], consumer);
			END IF;

		ELSIF v_outcome = 'succeeded' THEN
			IF v_op = 'capture' THEN
				IF p.captured_minor + t.amount_minor > p.authorized_minor THEN
					RAISE EXCEPTION 'capture exceeds the authorization'
						USING ERRCODE = 'MK078',
							  DETAIL = format('Payment %s: %s captured of %s authorized; %s more asked.',
											  p.id, p.captured_minor, p.authorized_minor, t.amount_minor);
				END IF;
				UPDATE market.payments x
				   SET status = 'captured', captured_minor = x.captured_minor + t.amount_minor,
					   psp_capture_reference = coalesce(r ->> 'capture_reference', x.psp_capture_reference),
					   last_error = NULL, updated_at = now()
				 WHERE x.id = p.id;
			ELSIF v_op = 'void' THEN
				UPDATE market.payments x SET status = 'voided', last_error = NULL, updated_at = now()
				 WHERE x.id = p.id;
			ELSE
				IF p.refunded_minor + t.amount_minor > p.captured_minor THEN
					RAISE EXCEPTION 'refund exceeds the capture'
						USING ERRCODE = 'MK079',
							  DETAIL = format('Payment %s: %s refunded of %s captured; %s more asked.',
											  p.id, p.refunded_minor, p.captured_minor, t.amount_minor);
				END IF;
				UPDATE market.payments x
				   SET refunded_minor = x.refunded_minor + t.amount_minor,
					   status = CASE WHEN x.refunded_minor + t.amount_minor = x.captured_minor
									 THEN 'refunded' ELSE x.status END,
					   last_error = NULL, updated_at = now()
				 WHERE x.id = p.id;
			END IF;
			PERFORM market.outbox_ack(ARRAY[m.id], consumer);
		ELSIF v_outcome IN ('unknown', 'unreachable') THEN
			-- capture, void and refund never move: retry with the same key
			UPDATE market.payments x SET last_error = format('%s at %s: %s', v_op, t.psp, v_err)
			 WHERE x.id = p.id;
			PERFORM market.psp_reschedule(m.id, market.psp_backoff(v_unknown), v_err);
		ELSE
			UPDATE market.payments x SET last_error = format('%s refused at %s: %s', v_op, t.psp, v_err)
			 WHERE x.id = p.id;
			PERFORM market.psp_dead(m.id, format('%s refused at %s: %s', v_op, t.psp, v_err));
		END IF;
	END LOOP;
	RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------
-- psp_orders_to (0.3): the orders of a group that wait for their payment
-- move on, now in one order_transition_many call (50_orders.sql)
-- ---------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION market.psp_orders_to(group_id bigint, to_state text, note text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_ids bigint[];
BEGIN
	SELECT coalesce(array_agg(x.id ORDER BY x.id), '{}') INTO v_ids
	  FROM (SELECT o.id FROM market.orders o
			 WHERE o.group_id = psp_orders_to.group_id AND o.status = 'created'
			 ORDER BY o.id FOR UPDATE OF o) x;
	PERFORM market.order_transition_many(v_ids, psp_orders_to.to_state,
		array_fill(psp_orders_to.note, ARRAY[cardinality(v_ids)]));
END
$$;
