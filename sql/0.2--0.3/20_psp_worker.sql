-- ===========================================================================
-- market 0.3, the PSP worker's side in SQL: planning (psp_claim), recording
-- (psp_record) and the status (psp_status).  src/psp_worker.c calls the
-- first two, each in a short transaction of its own, and makes the HTTP
-- calls in between, outside any transaction.  docs/payments.md has the
-- design; the rules in short:
--
--   * idempotency keys are derived, never drawn: mk-<payment>-<op>-<outbox
--     row>[-<account>], so a replay after any crash sends the same key;
--   * the intent (an attempt row 'pending') is committed before the call;
--     a row claimed again with a 'pending' last attempt replays it;
--   * an authorization whose outcome is unknown (timeout, 5xx, 409, cut
--     answer) is replayed on the same account with the same key, up to
--     market.psp_max_retries times; only then does the payment move on to
--     the next account, and the abandoned one is reconciled later (a
--     'payment.reconcile' job replays it and voids a late success);
--   * soft declines, refusals and unreachable accounts move on to the next
--     account by priority at once; a hard decline fails the payment;
--   * capture, void and refund stay on the account that authorized and are
--     retried with backoff until they resolve.
-- ===========================================================================

-- the backoff before retry n (1, 2, ...): base * 2^(n-1), at most the
-- maximum, with jitter (50 % to 100 %)
CREATE FUNCTION market.psp_backoff(n int) RETURNS interval
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
	SELECT least(
			coalesce(current_setting('market.psp_retry_max_backoff', true), '30s')::interval,
			coalesce(current_setting('market.psp_retry_base', true), '200ms')::interval
				* power(2, least(greatest(coalesce(n, 1), 1) - 1, 20)))
		   * (0.5 + random() / 2)
$$;

-- hand a row back to the queue until now + delay; a voluntary hand-back
-- does not count as a lost hand-out (attempts goes back down)
CREATE FUNCTION market.psp_reschedule(outbox_id bigint, delay interval, error text)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
	UPDATE market.outbox o
	   SET lease_owner = NULL, lease_until = clock_timestamp() + psp_reschedule.delay,
		   attempts = greatest(o.attempts - 1, 0),
		   last_error = left(psp_reschedule.error, 2000)
	 WHERE o.id = psp_reschedule.outbox_id AND o.acked_at IS NULL AND o.dead_at IS NULL
$$;

-- dead-letter a job that cannot succeed (an admin may outbox_retry it)
CREATE FUNCTION market.psp_dead(outbox_id bigint, error text)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
	UPDATE market.outbox o
	   SET dead_at = clock_timestamp(), lease_until = NULL, last_error = left(psp_dead.error, 2000)
	 WHERE o.id = psp_dead.outbox_id AND o.acked_at IS NULL AND o.dead_at IS NULL
$$;

-- the orders of a group that wait for their payment move on
CREATE FUNCTION market.psp_orders_to(group_id bigint, to_state text, note text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	o bigint;
BEGIN
	FOR o IN SELECT x.id FROM market.orders x
			  WHERE x.group_id = psp_orders_to.group_id AND x.status = 'created'
			  ORDER BY x.id FOR UPDATE
	LOOP
		PERFORM market.order_transition(o, psp_orders_to.to_state, psp_orders_to.note);
	END LOOP;
END
$$;

-- after an authorization ended (success or failure): a reconcile job for
-- every account whose outcome was left unknown when the payment moved on
CREATE FUNCTION market.psp_queue_reconcile(payment_id bigint, outbox_id bigint, winner int)
RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
	INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
	SELECT 'psp', 'payment.reconcile', 'psp_reconcile', psp_queue_reconcile.payment_id,
		   jsonb_build_object('payment_id', psp_queue_reconcile.payment_id,
							  'account_id', l.psp_account_id,
							  'authorize_outbox_id', psp_queue_reconcile.outbox_id)
	  FROM (SELECT DISTINCT ON (a.psp_account_id) a.psp_account_id, a.outcome
			  FROM market.payment_attempts a
			 WHERE a.outbox_id = psp_queue_reconcile.outbox_id AND a.operation = 'authorize'
			 ORDER BY a.psp_account_id, a.id DESC) l
	 WHERE l.outcome = 'unknown'
	   AND l.psp_account_id IS DISTINCT FROM psp_queue_reconcile.winner
	 ORDER BY l.psp_account_id
$$;

-- ---------------------------------------------------------------------------
-- psp_plan: what to do with one claimed row.  Returns the job for the
-- worker (with the attempt row written 'pending'), or NULL when the row was
-- settled here without a call (acked, rescheduled or dead-lettered).
-- skip: accounts the worker's circuit breaker keeps closed to new work.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_plan(m market.outbox_message, consumer text, skip int[])
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_max_retries int := coalesce(current_setting('market.psp_max_retries', true), '3')::int;
	v_cooldown interval := coalesce(current_setting('market.psp_breaker_cooldown', true), '5s')::interval;
	p market.payments;
	a market.psp_accounts;
	last market.payment_attempts;
	v_op text;
	v_key text;
	v_amount bigint;
	v_order bigint := (m.payload ->> 'order_id')::bigint;
	v_unknown int;
	v_final boolean := false;
	v_capref text;
	v_void_key text;
	v_attempt bigint;
	v_orig bigint;
BEGIN
	v_op := CASE m.event_type
		WHEN 'payment.authorize' THEN 'authorize'
		WHEN 'payment.capture' THEN 'capture'
		WHEN 'payment.void' THEN 'void'
		WHEN 'payment.refund' THEN 'refund'
		WHEN 'payment.reconcile' THEN 'reconcile' END;
	IF v_op IS NULL THEN
		PERFORM market.psp_dead(m.id, format('unknown PSP job type "%s"', m.event_type));
		RETURN NULL;
	END IF;
	SELECT * INTO p FROM market.payments x WHERE x.id = (m.payload ->> 'payment_id')::bigint FOR UPDATE;
	IF NOT FOUND THEN
		PERFORM market.psp_dead(m.id, 'unknown payment');
		RETURN NULL;
	END IF;

	-- the last attempt of this row: a 'pending' one means the worker stopped
	-- between its intent and its record; the outcome is unknown
	SELECT * INTO last FROM market.payment_attempts t
	 WHERE t.outbox_id = m.id ORDER BY t.id DESC LIMIT 1;
	IF FOUND AND last.outcome = 'pending' THEN
		UPDATE market.payment_attempts t
		   SET outcome = 'unknown', error = 'the worker stopped before recording the outcome',
			   finished_at = clock_timestamp()
		 WHERE t.id = last.id;
		last.outcome := 'unknown';
	END IF;

	IF v_op = 'authorize' THEN
		IF p.status <> 'pending' THEN
			PERFORM market.outbox_ack(ARRAY[m.id], consumer);
			RETURN NULL;
		END IF;
		v_amount := p.amount_minor;
		-- an unknown outcome is replayed on the same account, same key
		IF last.id IS NOT NULL AND last.outcome = 'unknown' THEN
			SELECT count(*) INTO v_unknown FROM market.payment_attempts t
			 WHERE t.outbox_id = m.id AND t.psp_account_id = last.psp_account_id
			   AND t.outcome = 'unknown';
			IF v_unknown <= v_max_retries THEN
				SELECT * INTO a FROM market.psp_accounts x WHERE x.id = last.psp_account_id;
				v_key := last.idempotency_key;
			END IF;
		END IF;
		IF v_key IS NULL THEN
			-- the next account by priority (the payment's own choice first)
			-- that this row has not tried yet
			SELECT * INTO a FROM market.psp_accounts x
			 WHERE x.enabled
			   AND x.id <> ALL (coalesce(skip, '{}'))
			   AND NOT EXISTS (SELECT FROM market.payment_attempts t
								WHERE t.outbox_id = m.id AND t.psp_account_id = x.id)
			 ORDER BY (x.name = p.psp) DESC NULLS LAST, x.priority, x.id
			 LIMIT 1;
			IF NOT FOUND THEN
				IF EXISTS (SELECT FROM market.psp_accounts x
							WHERE x.enabled AND x.id = ANY (coalesce(skip, '{}'))
							  AND NOT EXISTS (SELECT FROM market.payment_attempts t
											   WHERE t.outbox_id = m.id AND t.psp_account_id = x.id)) THEN
					-- only accounts whose breaker is open are left: wait
					PERFORM market.psp_reschedule(m.id, v_cooldown, 'every remaining PSP account is unavailable');
					RETURN NULL;
				END IF;
				IF last.id IS NULL THEN
					PERFORM market.psp_reschedule(m.id, interval '10 seconds', 'no PSP account is registered and enabled');
					RETURN NULL;
				END IF;
				-- every account was tried: the payment failed
				UPDATE market.payments x
				   SET status = 'failed', updated_at = now(),
					   decline_code = coalesce(last.decline_code, x.decline_code),
					   last_error = format('every PSP account declined or failed; last: %s', coalesce(last.decline_code, last.error, last.outcome))
				 WHERE x.id = p.id;
				PERFORM market.psp_orders_to(p.group_id, 'payment_failed', 'payment failed at every PSP account');
				PERFORM market.psp_queue_reconcile(p.id, m.id, NULL);
				PERFORM market.outbox_ack(ARRAY[m.id], consumer);
				RETURN NULL;
			END IF;
			v_key := format('mk-%s-authorize-%s-%s', p.id, m.id, a.id);
		END IF;

	ELSIF v_op = 'reconcile' THEN
		v_orig := (m.payload ->> 'authorize_outbox_id')::bigint;
		SELECT * INTO a FROM market.psp_accounts x WHERE x.id = (m.payload ->> 'account_id')::int;
		SELECT t.idempotency_key INTO v_key FROM market.payment_attempts t
		 WHERE t.outbox_id = v_orig AND t.psp_account_id = a.id AND t.operation = 'authorize'
		 ORDER BY t.id LIMIT 1;
		IF a.id IS NULL OR v_key IS NULL THEN
			PERFORM market.psp_dead(m.id, 'nothing to reconcile');
			RETURN NULL;
		END IF;
		v_amount := p.amount_minor;
		v_void_key := format('mk-%s-void-%s', p.id, m.id);

	ELSE
		-- capture, void, refund: on the account that holds the authorization
		v_amount := coalesce((m.payload ->> 'amount_minor')::bigint, p.amount_minor);
		IF last.id IS NOT NULL AND last.outcome = 'succeeded' THEN
			PERFORM market.outbox_ack(ARRAY[m.id], consumer);
			RETURN NULL;
		END IF;
		IF v_op = 'void' AND p.status IN ('failed', 'voided', 'pending') THEN
			PERFORM market.outbox_ack(ARRAY[m.id], consumer);
			RETURN NULL;
		END IF;
		SELECT * INTO a FROM market.psp_accounts x WHERE x.id = p.psp_account_id;
		IF a.id IS NULL OR p.psp_reference IS NULL THEN
			PERFORM market.psp_dead(m.id, format('payment %s has no authorization to %s', p.id, v_op));
			UPDATE market.payments x SET last_error = format('%s: no authorization', v_op) WHERE x.id = p.id;
			RETURN NULL;
		END IF;
		IF v_op = 'capture' THEN
			IF v_amount <= 0 OR p.captured_minor + v_amount > p.authorized_minor THEN
				PERFORM market.psp_dead(m.id, format('capture of %s exceeds what is left of the authorization (%s)',
													 v_amount, p.authorized_minor - p.captured_minor));
				UPDATE market.payments x SET last_error = 'capture exceeds the authorization' WHERE x.id = p.id;
				RETURN NULL;
			END IF;
			-- final when no other capture can follow
			v_final := NOT EXISTS (SELECT FROM market.orders o
									WHERE o.group_id = p.group_id AND o.id IS DISTINCT FROM v_order
									  AND o.status IN ('created', 'confirmed'))
					   AND NOT EXISTS (SELECT FROM market.outbox x
										WHERE x.topic = 'psp' AND x.aggregate_type = 'payment'
										  AND x.aggregate_id = p.id AND x.id > m.id
										  AND x.event_type = 'payment.capture'
										  AND x.acked_at IS NULL AND x.dead_at IS NULL);
		ELSIF v_op = 'void' THEN
			-- an authorization is released whole: only when nothing was
			-- captured and no other order of the group still needs it
			IF p.captured_minor > 0 OR EXISTS (
					SELECT FROM market.orders o
					 WHERE o.group_id = p.group_id AND o.id IS DISTINCT FROM v_order
					   AND o.status NOT IN ('cancelled', 'payment_failed')) THEN
				INSERT INTO market.payment_attempts (payment_id, order_id, outbox_id, psp_account_id, psp,
					operation, amount_minor, outcome, error, finished_at)
				VALUES (p.id, v_order, m.id, a.id, a.name, 'void', v_amount, 'skipped',
						'other orders of the group still use the authorization; the final capture releases the rest',
						clock_timestamp());
				PERFORM market.outbox_ack(ARRAY[m.id], consumer);
				RETURN NULL;
			END IF;
		ELSE
			IF v_amount <= 0 OR p.refunded_minor + v_amount > p.captured_minor THEN
				PERFORM market.psp_dead(m.id, format('refund of %s exceeds what is left of the capture (%s)',
													 v_amount, p.captured_minor - p.refunded_minor));
				UPDATE market.payments x SET last_error = 'refund exceeds the capture' WHERE x.id = p.id;
				RETURN NULL;
			END IF;
			SELECT t.psp_reference INTO v_capref FROM market.payment_attempts t
			 WHERE t.payment_id = p.id AND t.operation = 'capture' AND t.outcome = 'succeeded'
			   AND t.order_id IS NOT DISTINCT FROM v_order
			 ORDER BY t.id DESC LIMIT 1;
			v_capref := coalesce(v_capref, p.psp_capture_reference);
		END IF;
		v_key := CASE WHEN last.id IS NOT NULL AND last.outcome = 'unknown' THEN last.idempotency_key
					  ELSE format('mk-%s-%s-%s', p.id, v_op, m.id) END;
	END IF;

	INSERT INTO market.payment_attempts (payment_id, order_id, outbox_id, psp_account_id, psp,
		operation, idempotency_key, amount_minor, request)
	VALUES (p.id, v_order, m.id, a.id, a.name,
			CASE v_op WHEN 'reconcile' THEN 'authorize' ELSE v_op END,
			v_key, v_amount, format('%s %s %s', v_op, v_amount, p.currency))
	RETURNING id INTO v_attempt;

	RETURN jsonb_build_object(
		'outbox_id', m.id,
		'attempt_id', v_attempt,
		'op', v_op,
		'payment_id', p.id,
		'order_id', v_order,
		'key', v_key,
		'void_key', v_void_key,
		'amount_minor', v_amount,
		'currency', p.currency,
		'method', coalesce(p.method, ''),
		'reference', format('mk-pay-%s', p.id),
		'psp_reference', CASE WHEN v_op = 'reconcile' THEN NULL ELSE p.psp_reference END,
		'winner_reference', p.psp_reference,
		'capture_reference', v_capref,
		'final_capture', v_final,
		'account_id', a.id,
		'account', a.name,
		'kind', a.kind,
		'base_url', a.base_url,
		'credentials', a.credentials,
		'timeout_ms', (a.options ->> 'timeout_ms')::int);
END
$$;

-- ---------------------------------------------------------------------------
-- psp_claim: the worker's first transaction.  Claims up to max 'psp' rows
-- (SKIP LOCKED, through outbox_claim), keeps the first row of each
-- aggregate (the rest go back: an aggregate's jobs run one at a time) and
-- plans each.  skip: accounts whose breaker is open; probe: accounts whose
-- breaker is half-open, which get at most one new job.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_claim(consumer text, max int, skip int[] DEFAULT '{}',
	probe int[] DEFAULT '{}', lease interval DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	m market.outbox_message;
	v_seen text[] := '{}';
	v_back bigint[] := '{}';
	v_skip int[] := coalesce(psp_claim.skip, '{}') || coalesce(psp_claim.probe, '{}');
	v_probe int[] := coalesce(psp_claim.probe, '{}');
	v_jobs jsonb := '[]';
	j jsonb;
	v_lease interval := coalesce(psp_claim.lease,
		coalesce(current_setting('market.psp_lease', true), '60s')::interval);
BEGIN
	FOR m IN SELECT * FROM market.outbox_claim(psp_claim.consumer, psp_claim.max, 'psp', v_lease)
	LOOP
		IF (m.aggregate_type || ':' || m.aggregate_id) = ANY (v_seen) THEN
			v_back := v_back || m.id;
			CONTINUE;
		END IF;
		v_seen := v_seen || (m.aggregate_type || ':' || m.aggregate_id);
		-- a half-open account gets one probe: offer it to one job at a time
		j := market.psp_plan(m, psp_claim.consumer,
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
	IF cardinality(v_back) > 0 THEN
		UPDATE market.outbox o
		   SET lease_owner = NULL, lease_until = NULL, attempts = greatest(o.attempts - 1, 0)
		 WHERE o.id = ANY (v_back);
	END IF;
	RETURN v_jobs;
END
$$;

-- ---------------------------------------------------------------------------
-- psp_record: the worker's second transaction.  results is an array of
-- {attempt_id, outcome, http_status, latency_ms, error, decline_code,
--  psp_reference, capture_reference, request, voided, calls: [...]}.
-- Returns how many results were applied (a result whose attempt is no
-- longer pending, e.g. after its row was claimed again, is ignored).
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_record(consumer text, results jsonb)
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
BEGIN
	IF results IS NULL OR jsonb_typeof(results) <> 'array' THEN
		RAISE EXCEPTION 'results must be a JSON array' USING ERRCODE = 'MK021';
	END IF;
	FOR r IN SELECT * FROM jsonb_array_elements(results)
	LOOP
		v_outcome := r ->> 'outcome';
		IF v_outcome IS NULL OR v_outcome NOT IN ('succeeded', 'hard_decline', 'soft_decline',
				'rejected', 'unreachable', 'unknown') THEN
			RAISE EXCEPTION 'invalid outcome "%"', v_outcome USING ERRCODE = 'MK021';
		END IF;
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
-- Status
-- ---------------------------------------------------------------------------

-- the worker's shared-memory view: one row per account it has called
CREATE FUNCTION market.psp_breakers(
	OUT account_id int, OUT state text, OUT failures int, OUT opened_at timestamptz,
	OUT in_flight int, OUT worker_pid int)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'market_psp_breakers'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- per account: breaker, calls in flight, success rate and latency over the
-- last five minutes, and the age of the oldest undelivered PSP job
CREATE FUNCTION market.psp_status()
RETURNS TABLE (account text, kind text, priority int, enabled boolean, breaker text,
	failures_in_row int, in_flight int, calls_5min bigint, success_rate numeric,
	avg_latency_ms numeric, oldest_pending_job interval, worker_pid int)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
	WITH b AS (SELECT * FROM market.psp_breakers()),
	w AS (SELECT max(b.worker_pid) AS pid FROM b),
	s AS (SELECT t.psp_account_id,
				 count(*) AS calls,
				 count(*) FILTER (WHERE t.outcome IN ('succeeded', 'hard_decline', 'soft_decline')) AS answered,
				 avg(t.latency_ms) AS latency
			FROM market.payment_attempts t
		   WHERE t.started_at > clock_timestamp() - interval '5 minutes'
			 AND t.outcome NOT IN ('pending', 'skipped')
		   GROUP BY t.psp_account_id)
	SELECT a.name, a.kind, a.priority, a.enabled,
		   coalesce(b.state, 'closed'), coalesce(b.failures, 0), coalesce(b.in_flight, 0),
		   coalesce(s.calls, 0),
		   CASE WHEN s.calls > 0 THEN round(s.answered::numeric / s.calls, 3) END,
		   round(s.latency::numeric, 1),
		   (SELECT clock_timestamp() - min(o.created_at) FROM market.outbox o
			 WHERE o.topic = 'psp' AND o.acked_at IS NULL AND o.dead_at IS NULL),
		   (SELECT w.pid FROM w)
	  FROM market.psp_accounts a
	  LEFT JOIN b ON b.account_id = a.id
	  LEFT JOIN s ON s.psp_account_id = a.id
	 ORDER BY a.priority, a.id
$$;

-- ---------------------------------------------------------------------------
-- Privileges: admins register accounts and read the status; the app reads
-- its payments; the worker's functions are for no role at all.
-- ---------------------------------------------------------------------------

REVOKE ALL ON FUNCTION
	market.psp_register(text, text, text, jsonb, int, jsonb),
	market.psp_set_enabled(text, boolean),
	market.payment_view(bigint),
	market.psp_backoff(int),
	market.psp_reschedule(bigint, interval, text),
	market.psp_dead(bigint, text),
	market.psp_orders_to(bigint, text, text),
	market.psp_queue_reconcile(bigint, bigint, int),
	market.psp_plan(market.outbox_message, text, int[]),
	market.psp_claim(text, int, int[], int[], interval),
	market.psp_record(text, jsonb),
	market.psp_breakers(),
	market.psp_status()
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
	market.psp_register(text, text, text, jsonb, int, jsonb),
	market.psp_set_enabled(text, boolean),
	market.psp_status()
TO market_admin;
GRANT EXECUTE ON FUNCTION market.payment_view(bigint) TO market_app, market_admin;
