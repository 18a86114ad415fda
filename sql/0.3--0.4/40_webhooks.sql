
-- ===========================================================================
-- market 0.4: webhooks fold every payment event (docs/payments.md,
-- "Webhooks").
--
-- 0.3 folded successful authorizations only.  Here every Stripe and Adyen
-- event about a payment is normalised into one row of
-- market.psp_webhook_events (what it proves: an authorization, a capture, a
-- cancellation, a refund, or the failure of one of them, with its amounts
-- and references) and then applied to the payment by the rules the PSP
-- worker itself follows (sql/0.2--0.3/20_psp_worker.sql, psp_record):
--
--   * captured <= authorized and refunded <= captured always; an event that
--     would break them is recorded 'rejected' and not applied;
--   * an event proves what came before it: a capture or a cancellation of
--     a payment still pending is first folded as its authorization;
--   * events never move a payment backwards: a failure after the success
--     of the same operation is recorded and ignored;
--   * when the worker has a call of the same operation in flight (or with
--     an unknown outcome), the webhook settles that attempt the way
--     psp_record would (the attempt's outcome, the outbox job acked,
--     rescheduled or dead-lettered), so the worker's own record of it is
--     ignored afterwards (psp_record skips attempts no longer 'pending');
--     an operation the worker already recorded is recognised by its PSP
--     reference or by the PSP's running totals and not applied twice;
--   * a success at an account that is not the payment's winner is a late
--     authorization: a reconcile job voids it, as for the worker;
--   * an event that cannot be applied yet (payment unknown, a refund before
--     its capture) is stored 'deferred' and retried whenever another event
--     of that payment is applied, or by psp_webhook_retry();
--   * an event that was verified never raises: the PSP would retry it
--     forever.  Only bad signatures and malformed documents raise.
--
-- Lock order of a fold (the same as psp_record): the worker's open
-- attempts of the payment, their outbox rows, the payment, its orders.
--
-- SQLSTATEs: MK077 bad signature or stale timestamp, MK021 malformed body or
-- headers, MK070 unknown provider and PayPal (not verified in this
-- release), MK020 NULL argument.
-- ===========================================================================

-- what each event proved, and what became of it
ALTER TABLE market.psp_webhook_events
	ADD COLUMN kind text NOT NULL DEFAULT 'other'
		CHECK (kind IN ('authorization', 'authorization_failed', 'capture', 'capture_failed',
						'cancellation', 'cancellation_failed', 'refund', 'refund_failed', 'other')),
	ADD COLUMN merchant_reference text,
	ADD COLUMN operation_reference text,
	ADD COLUMN currency text,
	ADD COLUMN amount_minor bigint,
	ADD COLUMN authorized_total bigint,
	ADD COLUMN captured_total bigint,
	ADD COLUMN refunded_total bigint,
	ADD COLUMN decline_code text,
	ADD COLUMN payment_status text,
	ADD COLUMN applied_at timestamptz,
	DROP CONSTRAINT psp_webhook_events_status_check,
	ADD CONSTRAINT psp_webhook_events_status_check
		CHECK (status IN ('processed', 'applied', 'ignored', 'deferred', 'rejected'));
-- the deferred events, looked up after every applied event
CREATE INDEX psp_webhook_events_deferred_idx ON market.psp_webhook_events (payment_id, id)
	WHERE status = 'deferred';

DROP FUNCTION market.psp_webhook_fold(text, text, text, int, text, text, boolean, bigint, text);

-- ---------------------------------------------------------------------------
-- psp_webhook_settle: a webhook settles the worker's attempt of the same
-- operation as psp_record would have: the attempt's outcome, then the
-- outbox job acked ('ack'), handed back at once ('reschedule'), or
-- dead-lettered ('dead').  Callers hold the attempt, the job and the
-- payment locked.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_webhook_settle(attempt_id bigint, outcome text, reference text,
	decline_code text, note text, job_action text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_outbox bigint;
BEGIN
	UPDATE market.payment_attempts t
	   SET outcome = psp_webhook_settle.outcome,
		   psp_reference = coalesce(psp_webhook_settle.reference, t.psp_reference),
		   decline_code = coalesce(psp_webhook_settle.decline_code, t.decline_code),
		   error = left(psp_webhook_settle.note, 2000),
		   finished_at = clock_timestamp()
	 WHERE t.id = psp_webhook_settle.attempt_id
	RETURNING t.outbox_id INTO v_outbox;
	IF job_action = 'ack' THEN
		PERFORM market.outbox_ack(ARRAY[v_outbox], NULL);
	ELSIF job_action = 'reschedule' THEN
		PERFORM market.psp_reschedule(v_outbox, interval '0', psp_webhook_settle.note);
	ELSIF job_action = 'dead' THEN
		PERFORM market.psp_dead(v_outbox, psp_webhook_settle.note);
	END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- psp_webhook_reconcile: reconcile jobs for the accounts a payment's
-- authorize job left with an unknown outcome (or, with late_account, for
-- that account's late success), except the winner and accounts that have
-- one already.  Returns how many jobs were queued.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_webhook_reconcile(payment_id bigint, winner int, late_account int)
RETURNS int
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
	WITH l AS (
		SELECT DISTINCT ON (a.outbox_id, a.psp_account_id) a.outbox_id, a.psp_account_id, a.outcome
		  FROM market.payment_attempts a
		  JOIN market.outbox m ON m.id = a.outbox_id
		 WHERE a.payment_id = psp_webhook_reconcile.payment_id AND a.operation = 'authorize'
		   AND m.event_type = 'payment.authorize'
		 ORDER BY a.outbox_id, a.psp_account_id, a.id DESC),
	ins AS (
		INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
		SELECT 'psp', 'payment.reconcile', 'psp_reconcile', psp_webhook_reconcile.payment_id,
			   jsonb_build_object('payment_id', psp_webhook_reconcile.payment_id,
								  'account_id', l.psp_account_id,
								  'authorize_outbox_id', l.outbox_id)
		  FROM l
		 WHERE (l.outcome = 'unknown' OR l.psp_account_id = psp_webhook_reconcile.late_account)
		   AND l.psp_account_id IS DISTINCT FROM psp_webhook_reconcile.winner
		   AND NOT EXISTS (SELECT FROM market.outbox r
							WHERE r.topic = 'psp' AND r.aggregate_type = 'psp_reconcile'
							  AND r.aggregate_id = psp_webhook_reconcile.payment_id
							  AND r.event_type = 'payment.reconcile'
							  AND (r.payload ->> 'account_id')::int = l.psp_account_id
							  AND (r.payload ->> 'authorize_outbox_id')::bigint = l.outbox_id)
		 ORDER BY l.outbox_id, l.psp_account_id
		RETURNING 1)
	SELECT count(*)::int FROM ins
$$;

-- ---------------------------------------------------------------------------
-- psp_webhook_apply: apply one recorded event to its payment.  Sets the
-- event row's status ('applied', 'ignored', 'deferred', 'rejected'), note,
-- payment_id and payment_status, and returns
-- {applied, payment_id, status, event_status, reason}.  Never raises for a
-- verified event's content.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_webhook_apply(event_row bigint)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	e market.psp_webhook_events;
	p market.payments;
	w market.psp_accounts;
	v_pid bigint;
	v_status text;
	v_note text;
	v_winner boolean;
	v_soft text[];
	v_job bigint;
	v_att market.payment_attempts;
	v_jobtype text;
	v_delta bigint;
	v_op text;
	v_auth_amount bigint;
	v_changed boolean := false;
BEGIN
	SELECT * INTO e FROM market.psp_webhook_events x WHERE x.id = event_row FOR UPDATE;
	SELECT * INTO w FROM market.psp_accounts a WHERE a.id = e.psp_account_id;

	-- the payment: by the authorization's reference at this account, else
	-- by our reference mk-pay-<id>
	SELECT x.id INTO v_pid FROM market.payments x
	 WHERE x.psp_reference = e.psp_reference AND x.psp_account_id = e.psp_account_id
	 ORDER BY x.id LIMIT 1;
	IF v_pid IS NULL AND e.merchant_reference ~ '^mk-pay-[0-9]{1,18}$' THEN
		SELECT x.id INTO v_pid FROM market.payments x WHERE x.id = substr(e.merchant_reference, 8)::bigint;
	END IF;
	IF v_pid IS NULL THEN
		IF e.kind = 'other' THEN
			v_status := 'ignored';
			v_note := 'event type not folded';
		ELSE
			v_status := 'deferred';
			v_note := 'no payment has this reference yet; kept until one does';
		END IF;
		UPDATE market.psp_webhook_events x SET status = v_status, note = v_note WHERE x.id = e.id;
		RETURN jsonb_build_object('applied', false, 'payment_id', NULL, 'status', NULL,
								  'event_status', v_status, 'reason', v_note);
	END IF;

	-- locks, in psp_record's order: the worker's open attempts of this
	-- payment (the last of each open job, when still pending or unknown),
	-- their outbox rows, then the payment
	PERFORM 1 FROM market.payment_attempts a
	  JOIN market.outbox m ON m.id = a.outbox_id
	 WHERE m.topic = 'psp' AND m.aggregate_type = 'payment' AND m.aggregate_id = v_pid
	   AND m.acked_at IS NULL AND m.dead_at IS NULL
	   AND a.outcome IN ('pending', 'unknown')
	   AND a.id = (SELECT max(b.id) FROM market.payment_attempts b WHERE b.outbox_id = m.id)
	 ORDER BY a.id
	   FOR UPDATE OF a;
	PERFORM 1 FROM market.outbox m
	 WHERE m.topic = 'psp' AND m.aggregate_type = 'payment' AND m.aggregate_id = v_pid
	   AND m.acked_at IS NULL AND m.dead_at IS NULL
	 ORDER BY m.id
	   FOR UPDATE;
	SELECT * INTO p FROM market.payments x WHERE x.id = v_pid FOR UPDATE;

	v_soft := string_to_array(replace(coalesce(current_setting('market.psp_soft_decline_codes', true),
		'insufficient_funds,processing_error,do_not_honor,try_again_later,issuer_not_available,reenter_transaction,card_velocity_exceeded'),
		' ', ''), ',');
	v_winner := coalesce(p.psp_account_id = e.psp_account_id AND p.psp_reference = e.psp_reference, false);

	<<decide>>
	BEGIN
		IF e.kind = 'other' THEN
			v_status := 'ignored';
			v_note := 'event type not folded';
			EXIT decide;
		END IF;
		IF e.currency IS NOT NULL AND upper(e.currency) <> p.currency THEN
			v_status := 'rejected';
			v_note := format('currency %s differs from the payment''s %s', upper(e.currency), p.currency);
			EXIT decide;
		END IF;

		-- the worker's open job of this event's operation and its last
		-- attempt, when that attempt is at this account and unresolved
		v_jobtype := CASE
			WHEN e.kind IN ('authorization', 'authorization_failed') THEN 'payment.authorize'
			WHEN e.kind IN ('capture', 'capture_failed') THEN 'payment.capture'
			WHEN e.kind IN ('cancellation', 'cancellation_failed') THEN 'payment.void'
			ELSE 'payment.refund' END;

		-- ---------------------------------------------------------------
		-- an event that proves the authorization: fold that first when
		-- the payment is still pending
		-- ---------------------------------------------------------------
		IF p.status = 'pending'
		   AND (e.kind IN ('authorization', 'capture', 'cancellation')
				OR (e.kind = 'refund' AND e.captured_total IS NOT NULL)) THEN
			v_auth_amount := coalesce(e.authorized_total, p.amount_minor);
			IF v_auth_amount <> p.amount_minor THEN
				v_status := 'rejected';
				v_note := format('authorized amount %s differs from the payment''s %s', v_auth_amount, p.amount_minor);
				EXIT decide;
			END IF;
			IF e.psp_reference IS NULL THEN
				v_status := 'rejected';
				v_note := 'the event names no authorization reference';
				EXIT decide;
			END IF;
			UPDATE market.payments x
			   SET status = 'authorized', authorized_minor = p.amount_minor,
				   psp_account_id = e.psp_account_id, psp_reference = e.psp_reference,
				   decline_code = NULL, last_error = NULL, updated_at = now()
			 WHERE x.id = p.id;
			PERFORM market.psp_orders_to(p.group_id, 'confirmed',
				format('payment authorized at %s (webhook)', w.name));
			-- the worker's authorize job: its attempt here is this
			-- authorization; a call in flight elsewhere is left to
			-- psp_record (a late success there is reconciled)
			v_job := NULL;
			SELECT m.id INTO v_job FROM market.outbox m
			 WHERE m.topic = 'psp' AND m.aggregate_type = 'payment' AND m.aggregate_id = p.id
			   AND m.event_type = 'payment.authorize' AND m.acked_at IS NULL AND m.dead_at IS NULL
			 ORDER BY m.id LIMIT 1;
			IF v_job IS NOT NULL THEN
				v_att := NULL;
				SELECT * INTO v_att FROM market.payment_attempts a WHERE a.outbox_id = v_job
				 ORDER BY a.id DESC LIMIT 1;
				IF v_att.id IS NOT NULL AND v_att.psp_account_id = e.psp_account_id
				   AND v_att.outcome IN ('pending', 'unknown') THEN
					PERFORM market.psp_webhook_settle(v_att.id, 'succeeded', e.psp_reference, NULL,
						'authorization confirmed by webhook', 'ack');
				ELSIF v_att.id IS NULL OR v_att.outcome <> 'pending' THEN
					PERFORM market.outbox_ack(ARRAY[v_job], NULL);
				END IF;
			END IF;
			PERFORM market.psp_webhook_reconcile(p.id, e.psp_account_id, NULL);
			SELECT * INTO p FROM market.payments x WHERE x.id = p.id;
			v_winner := true;
			v_changed := true;
			v_status := 'applied';
			v_note := 'payment authorized';
			IF e.kind = 'authorization' THEN
				EXIT decide;
			END IF;
		END IF;

		-- ---------------------------------------------------------------
		-- authorizations
		-- ---------------------------------------------------------------
		IF e.kind = 'authorization' THEN
			IF coalesce(e.authorized_total, p.amount_minor) <> p.amount_minor THEN
				v_status := 'rejected';
				v_note := format('authorized amount %s differs from the payment''s %s', e.authorized_total, p.amount_minor);
			ELSIF v_winner THEN
				v_status := 'ignored';
				v_note := format('payment already %s by this authorization', p.status);
			ELSIF market.psp_webhook_reconcile(p.id, p.psp_account_id, e.psp_account_id) > 0 THEN
				v_status := 'ignored';
				v_note := format('late authorization at %s: the payment is %s elsewhere; a reconcile job voids it', w.name, p.status);
			ELSIF EXISTS (SELECT FROM market.outbox r
						   WHERE r.topic = 'psp' AND r.aggregate_type = 'psp_reconcile' AND r.aggregate_id = p.id
							 AND (r.payload ->> 'account_id')::int = e.psp_account_id) THEN
				v_status := 'ignored';
				v_note := format('late authorization at %s: the payment is %s elsewhere; its reconcile job is queued already', w.name, p.status);
			ELSE
				v_status := 'rejected';
				v_note := format('late authorization at %s that the worker did not make: the payment is %s elsewhere; void it at the PSP', w.name, p.status);
			END IF;
			EXIT decide;
		END IF;

		IF e.kind = 'authorization_failed' THEN
			IF p.status <> 'pending' THEN
				v_status := 'ignored';
				v_note := CASE WHEN v_winner OR (p.psp_account_id = e.psp_account_id AND e.psp_reference IS NULL)
							   THEN format('failure after the authorization succeeded (payment %s): ignored', p.status)
							   ELSE format('payment already %s', p.status) END;
				EXIT decide;
			END IF;
			v_job := NULL;
			SELECT m.id INTO v_job FROM market.outbox m
			 WHERE m.topic = 'psp' AND m.aggregate_type = 'payment' AND m.aggregate_id = p.id
			   AND m.event_type = 'payment.authorize' AND m.acked_at IS NULL AND m.dead_at IS NULL
			 ORDER BY m.id LIMIT 1;
			v_att := NULL;
			IF v_job IS NOT NULL THEN
				SELECT * INTO v_att FROM market.payment_attempts a WHERE a.outbox_id = v_job
				 ORDER BY a.id DESC LIMIT 1;
			END IF;
			IF v_job IS NOT NULL AND v_att.id IS NOT NULL AND (v_att.psp_account_id <> e.psp_account_id
									  OR v_att.outcome NOT IN ('pending', 'unknown')) THEN
				-- the worker drives this authorization and is not (or no
				-- longer) at this account
				v_status := 'ignored';
				v_note := format('the worker''s authorization is not at %s now; the failure there changes nothing', w.name);
			ELSIF v_job IS NOT NULL AND v_att.id IS NULL AND e.decline_code = ANY (v_soft) THEN
				-- the worker has not called yet; a soft decline would send
				-- it on to the next account, which it does by itself
				v_status := 'ignored';
				v_note := format('soft decline (%s) before the worker''s first call: the worker tries the accounts in turn', e.decline_code);
			ELSIF v_job IS NOT NULL AND e.decline_code = ANY (v_soft) THEN
				-- a soft decline: the worker moves on to the next account
				PERFORM market.psp_webhook_settle(v_att.id, 'soft_decline', e.psp_reference, e.decline_code,
					'declined (webhook)', 'reschedule');
				UPDATE market.payments x
				   SET decline_code = e.decline_code,
					   last_error = format('soft_decline at %s: %s (webhook)', w.name, e.decline_code)
				 WHERE x.id = p.id;
				v_status := 'applied';
				v_note := 'soft decline: the worker tries the next account';
			ELSE
				-- a hard decline (or no worker job): the payment fails, its
				-- orders go to payment_failed and return their units
				IF v_att.id IS NOT NULL THEN
					PERFORM market.psp_webhook_settle(v_att.id, 'hard_decline', e.psp_reference, e.decline_code,
						'declined (webhook)', 'ack');
				ELSIF v_job IS NOT NULL THEN
					PERFORM market.outbox_ack(ARRAY[v_job], NULL);
				END IF;
				UPDATE market.payments x
				   SET status = 'failed', decline_code = coalesce(e.decline_code, x.decline_code),
					   last_error = format('declined at %s: %s (webhook)', w.name, coalesce(e.decline_code, 'declined')),
					   updated_at = now()
				 WHERE x.id = p.id;
				PERFORM market.psp_orders_to(p.group_id, 'payment_failed',
					format('payment declined at %s (%s, webhook)', w.name, coalesce(e.decline_code, 'declined')));
				PERFORM market.psp_webhook_reconcile(p.id, NULL, NULL);
				v_status := 'applied';
				v_note := 'payment failed';
			END IF;
			EXIT decide;
		END IF;

		-- ---------------------------------------------------------------
		-- modifications: only of the payment's own authorization
		-- ---------------------------------------------------------------
		IF p.status = 'pending' THEN
			-- a refund (or a failure) before anything it needs
			v_status := 'deferred';
			v_note := format('%s before the authorization is known; kept until it is', replace(e.kind, '_', ' '));
			EXIT decide;
		END IF;
		IF NOT v_winner THEN
			IF e.kind = 'cancellation' THEN
				v_status := 'ignored';
				v_note := 'cancellation of an authorization that is not the payment''s (a late one being voided)';
			ELSIF e.kind IN ('capture', 'refund') THEN
				v_status := 'rejected';
				v_note := format('%s of an authorization that is not the payment''s (payment %s, its reference %s)',
								 e.kind, p.status, coalesce(p.psp_reference, 'none'));
			ELSE
				v_status := 'ignored';
				v_note := format('%s of an authorization that is not the payment''s', replace(e.kind, '_', ' '));
			END IF;
			EXIT decide;
		END IF;

		v_op := CASE WHEN e.kind LIKE 'capture%' THEN 'capture'
					 WHEN e.kind LIKE 'cancellation%' THEN 'void' ELSE 'refund' END;
		-- the worker's call of this operation, in flight or unknown, here
		v_att := NULL;
		SELECT a.* INTO v_att
		  FROM market.outbox m
		  JOIN market.payment_attempts a ON a.id = (SELECT max(b.id) FROM market.payment_attempts b WHERE b.outbox_id = m.id)
		 WHERE m.topic = 'psp' AND m.aggregate_type = 'payment' AND m.aggregate_id = p.id
		   AND m.event_type = v_jobtype AND m.acked_at IS NULL AND m.dead_at IS NULL
		   AND a.psp_account_id = e.psp_account_id AND a.outcome IN ('pending', 'unknown')
		 ORDER BY m.id LIMIT 1;

		IF e.kind IN ('capture_failed', 'cancellation_failed', 'refund_failed') THEN
			IF e.operation_reference IS NOT NULL AND (
				EXISTS (SELECT FROM market.payment_attempts a
						 WHERE a.payment_id = p.id AND a.operation = v_op AND a.outcome = 'succeeded'
						   AND a.psp_reference = e.operation_reference)
				OR EXISTS (SELECT FROM market.psp_webhook_events x
							WHERE x.payment_id = p.id AND x.status = 'applied' AND x.id <> e.id
							  AND x.kind = CASE v_op WHEN 'void' THEN 'cancellation' ELSE v_op END
							  AND x.operation_reference = e.operation_reference))
			   OR (v_op = 'void' AND p.status = 'voided') THEN
				v_status := 'ignored';
				v_note := format('failure after the %s succeeded: ignored', v_op);
			ELSE
				IF v_att.id IS NOT NULL THEN
					PERFORM market.psp_webhook_settle(v_att.id, 'rejected', e.operation_reference, NULL,
						format('%s failed (webhook)', v_op), 'dead');
				END IF;
				UPDATE market.payments x
				   SET last_error = format('%s refused at %s (webhook)', v_op, w.name), updated_at = now()
				 WHERE x.id = p.id;
				v_status := 'applied';
				v_note := format('%s failed: recorded in the payment''s last_error', v_op);
			END IF;
			EXIT decide;
		END IF;

		IF e.kind = 'cancellation' THEN
			IF p.status = 'voided' THEN
				v_status := CASE WHEN v_status = 'applied' THEN 'applied' ELSE 'ignored' END;
				v_note := 'payment already voided';
			ELSIF p.captured_minor > 0 THEN
				v_status := 'rejected';
				v_note := format('cancellation of a payment with %s captured', p.captured_minor);
			ELSE
				IF v_att.id IS NOT NULL THEN
					PERFORM market.psp_webhook_settle(v_att.id, 'succeeded', e.operation_reference, NULL,
						'void confirmed by webhook', 'ack');
				END IF;
				UPDATE market.payments x SET status = 'voided', last_error = NULL, updated_at = now()
				 WHERE x.id = p.id;
				v_status := 'applied';
				v_note := CASE WHEN v_note IS NULL THEN 'payment voided' ELSE 'payment authorized and voided' END;
			END IF;
			EXIT decide;
		END IF;

		-- captures and refunds: by operation reference or running total
		IF e.kind = 'refund' AND e.captured_total IS NOT NULL AND e.captured_total > p.captured_minor THEN
			-- a Stripe charge shows its capture too: fold that first
			v_delta := e.captured_total - p.captured_minor;
			IF e.captured_total > p.authorized_minor THEN
				v_status := 'rejected';
				v_note := format('captured total %s exceeds the authorization (%s)', e.captured_total, p.authorized_minor);
				EXIT decide;
			END IF;
			SELECT a.* INTO v_att
			  FROM market.outbox m
			  JOIN market.payment_attempts a ON a.id = (SELECT max(b.id) FROM market.payment_attempts b WHERE b.outbox_id = m.id)
			 WHERE m.topic = 'psp' AND m.aggregate_type = 'payment' AND m.aggregate_id = p.id
			   AND m.event_type = 'payment.capture' AND m.acked_at IS NULL AND m.dead_at IS NULL
			   AND a.psp_account_id = e.psp_account_id AND a.outcome IN ('pending', 'unknown')
			 ORDER BY m.id LIMIT 1;
			IF v_att.id IS NOT NULL THEN
				IF v_att.amount_minor <> v_delta THEN
					v_status := 'rejected';
					v_note := format('captured total %s does not match the worker''s capture of %s in flight', e.captured_total, v_att.amount_minor);
					EXIT decide;
				END IF;
				PERFORM market.psp_webhook_settle(v_att.id, 'succeeded', NULL, NULL, 'capture confirmed by webhook', 'ack');
			END IF;
			UPDATE market.payments x
			   SET status = 'captured', captured_minor = e.captured_total, last_error = NULL, updated_at = now()
			 WHERE x.id = p.id
			RETURNING * INTO p;
			-- then the refund job, if any
			v_att := NULL;
			SELECT a.* INTO v_att
			  FROM market.outbox m
			  JOIN market.payment_attempts a ON a.id = (SELECT max(b.id) FROM market.payment_attempts b WHERE b.outbox_id = m.id)
			 WHERE m.topic = 'psp' AND m.aggregate_type = 'payment' AND m.aggregate_id = p.id
			   AND m.event_type = 'payment.refund' AND m.acked_at IS NULL AND m.dead_at IS NULL
			   AND a.psp_account_id = e.psp_account_id AND a.outcome IN ('pending', 'unknown')
			 ORDER BY m.id LIMIT 1;
			v_changed := true;
			v_status := 'applied';
			v_note := concat_ws('; ', v_note, format('captured total %s', e.captured_total));
		END IF;

		IF e.operation_reference IS NOT NULL AND (
			EXISTS (SELECT FROM market.payment_attempts a
					 WHERE a.payment_id = p.id AND a.operation = v_op AND a.outcome = 'succeeded'
					   AND a.psp_reference = e.operation_reference)
			OR EXISTS (SELECT FROM market.psp_webhook_events x
						WHERE x.payment_id = p.id AND x.status = 'applied' AND x.id <> e.id
						  AND x.kind = e.kind AND x.operation_reference = e.operation_reference)) THEN
			v_status := CASE WHEN v_status = 'applied' THEN 'applied' ELSE 'ignored' END;
			v_note := concat_ws('; ', v_note, format('%s %s already recorded', v_op, e.operation_reference));
			EXIT decide;
		END IF;

		IF e.provider = 'stripe' AND e.kind = 'refund' AND e.refunded_total IS NULL AND v_att.id IS NULL THEN
			-- a Stripe Refund object confirms the worker's refund call; any
			-- other refund is folded from charge.refunded's running total
			-- (folding both would count it twice)
			v_status := CASE WHEN v_status = 'applied' THEN 'applied' ELSE 'ignored' END;
			v_note := concat_ws('; ', v_note, 'a Stripe refund the worker has no call for: charge.refunded''s running total folds it');
			EXIT decide;
		END IF;

		IF e.kind = 'capture' THEN
			v_delta := CASE WHEN e.captured_total IS NOT NULL THEN e.captured_total - p.captured_minor
							ELSE e.amount_minor END;
		ELSE
			v_delta := CASE WHEN e.refunded_total IS NOT NULL THEN e.refunded_total - p.refunded_minor
							ELSE e.amount_minor END;
		END IF;
		IF v_delta < 0 AND coalesce(e.captured_total, e.refunded_total) IS NOT NULL THEN
			-- an older running total arriving after a newer one
			v_status := CASE WHEN v_status = 'applied' THEN 'applied' ELSE 'ignored' END;
			v_note := concat_ws('; ', v_note, format('an older running total (%s) than the one recorded', v_op));
			EXIT decide;
		END IF;
		IF v_delta IS NULL OR v_delta < 0 OR (v_delta = 0 AND e.captured_total IS NULL AND e.refunded_total IS NULL) THEN
			v_status := 'rejected';
			v_note := format('the event gives no usable %s amount', v_op);
			EXIT decide;
		END IF;
		IF v_delta = 0 THEN
			v_status := CASE WHEN v_status = 'applied' THEN 'applied' ELSE 'ignored' END;
			v_note := concat_ws('; ', v_note, format('%s total %s already recorded', CASE v_op WHEN 'capture' THEN 'captured' ELSE 'refunded' END,
						CASE v_op WHEN 'capture' THEN p.captured_minor ELSE p.refunded_minor END));
			EXIT decide;
		END IF;

		IF v_op = 'capture' AND p.captured_minor + v_delta > p.authorized_minor THEN
			v_status := 'rejected';
			v_note := format('capture of %s exceeds what is left of the authorization (%s)', v_delta, p.authorized_minor - p.captured_minor);
			EXIT decide;
		END IF;
		IF v_op = 'refund' AND p.refunded_minor + v_delta > p.captured_minor THEN
			IF e.refunded_total IS NULL AND p.refunded_minor + v_delta <= p.authorized_minor
			   AND v_status IS DISTINCT FROM 'applied' THEN
				-- the capture may not be known yet
				v_status := 'deferred';
				v_note := format('refund of %s before its capture (%s captured, %s refunded); kept until the capture is recorded',
								 v_delta, p.captured_minor, p.refunded_minor);
			ELSE
				v_status := CASE WHEN v_status = 'applied' THEN 'applied' ELSE 'rejected' END;
				v_note := concat_ws('; ', v_note, format('refund of %s exceeds what is left of the capture (%s)', v_delta, p.captured_minor - p.refunded_minor));
			END IF;
			EXIT decide;
		END IF;

		IF v_att.id IS NOT NULL THEN
			IF v_att.amount_minor <> v_delta THEN
				v_status := CASE WHEN v_status = 'applied' THEN 'applied' ELSE 'rejected' END;
				v_note := concat_ws('; ', v_note, format('%s of %s does not match the worker''s %s of %s in flight', v_op, v_delta, v_op, v_att.amount_minor));
				EXIT decide;
			END IF;
			PERFORM market.psp_webhook_settle(v_att.id, 'succeeded', e.operation_reference, NULL,
				format('%s confirmed by webhook', v_op), 'ack');
		END IF;
		IF v_op = 'capture' THEN
			UPDATE market.payments x
			   SET status = CASE WHEN x.refunded_minor > 0 AND x.refunded_minor = x.captured_minor + v_delta
								 THEN 'refunded' ELSE 'captured' END,
				   captured_minor = x.captured_minor + v_delta,
				   last_error = NULL, updated_at = now()
			 WHERE x.id = p.id;
		ELSE
			UPDATE market.payments x
			   SET refunded_minor = x.refunded_minor + v_delta,
				   status = CASE WHEN x.refunded_minor + v_delta = x.captured_minor THEN 'refunded' ELSE x.status END,
				   last_error = NULL, updated_at = now()
			 WHERE x.id = p.id;
		END IF;
		v_status := 'applied';
		v_note := concat_ws('; ', CASE WHEN v_status = 'applied' THEN v_note END,
			format('%s %s', CASE v_op WHEN 'capture' THEN 'captured' ELSE 'refunded' END, v_delta));
	END;

	-- what was folded on the way (an authorization, a capture) counts even
	-- when the rest is not
	IF v_changed AND v_status <> 'applied' THEN
		v_note := format('payment authorized; the rest not applied (%s): %s', v_status, v_note);
		v_status := 'applied';
	END IF;
	SELECT * INTO p FROM market.payments x WHERE x.id = v_pid;
	UPDATE market.psp_webhook_events x
	   SET status = v_status, note = v_note, payment_id = p.id, payment_status = p.status,
		   applied_at = CASE WHEN v_status = 'applied' THEN clock_timestamp() END
	 WHERE x.id = e.id;
	RETURN jsonb_build_object('applied', v_status = 'applied', 'payment_id', p.id, 'status', p.status,
							  'event_status', v_status, 'reason', CASE WHEN v_status <> 'applied' THEN v_note END,
							  'note', v_note);
END
$$;

-- ---------------------------------------------------------------------------
-- psp_webhook_retry_deferred: retry a payment's deferred events (and those
-- that name its references without a payment yet) until none applies.
-- Returns how many were applied.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_webhook_retry_deferred(payment_id bigint)
RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_n int := 0;
	v_more boolean := true;
	v_id bigint;
	v_ref text;
	v_acct int;
	v_pass int := 0;
BEGIN
	WHILE v_more AND v_pass < 10 LOOP
		v_more := false;
		v_pass := v_pass + 1;
		SELECT x.psp_reference, x.psp_account_id INTO v_ref, v_acct FROM market.payments x
		 WHERE x.id = psp_webhook_retry_deferred.payment_id;
		FOR v_id IN
			SELECT e.id FROM market.psp_webhook_events e
			 WHERE e.status = 'deferred' AND e.payment_id = psp_webhook_retry_deferred.payment_id
			UNION
			SELECT e.id FROM market.psp_webhook_events e
			 WHERE e.status = 'deferred' AND e.payment_id IS NULL
			   AND ((e.psp_reference = v_ref AND e.psp_account_id = v_acct)
					OR e.merchant_reference = 'mk-pay-' || psp_webhook_retry_deferred.payment_id)
			ORDER BY 1
		LOOP
			IF (market.psp_webhook_apply(v_id) ->> 'applied')::boolean THEN
				v_n := v_n + 1;
				v_more := true;
			END IF;
		END LOOP;
	END LOOP;
	RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------
-- psp_webhook_record: record one verified, normalised event (the
-- deduplication) and apply it; then the payment's deferred events.
-- Returns the answer of psp_webhook for this event.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_webhook_record(provider text, event_id text, event_type text,
	account_id int, kind text, psp_reference text, merchant_reference text,
	operation_reference text, currency text, amount_minor bigint, authorized_total bigint,
	captured_total bigint, refunded_total bigint, decline_code text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_id bigint;
	e market.psp_webhook_events;
	r jsonb;
	v_retried int := 0;
BEGIN
	INSERT INTO market.psp_webhook_events (provider, event_id, event_type, psp_account_id,
		psp_reference, status, kind, merchant_reference, operation_reference, currency,
		amount_minor, authorized_total, captured_total, refunded_total, decline_code)
	VALUES (psp_webhook_record.provider, left(psp_webhook_record.event_id, 200),
		left(psp_webhook_record.event_type, 100), account_id, left(psp_webhook_record.psp_reference, 200),
		'ignored', psp_webhook_record.kind, left(psp_webhook_record.merchant_reference, 200),
		left(psp_webhook_record.operation_reference, 200), left(psp_webhook_record.currency, 10),
		psp_webhook_record.amount_minor, psp_webhook_record.authorized_total,
		psp_webhook_record.captured_total, psp_webhook_record.refunded_total,
		left(psp_webhook_record.decline_code, 100))
	ON CONFLICT ON CONSTRAINT psp_webhook_events_unique DO NOTHING
	RETURNING id INTO v_id;
	IF v_id IS NULL THEN
		SELECT * INTO e FROM market.psp_webhook_events x
		 WHERE x.provider = psp_webhook_record.provider AND x.event_id = left(psp_webhook_record.event_id, 200);
		RETURN jsonb_build_object('event_id', psp_webhook_record.event_id, 'duplicate', true,
			'applied', false, 'payment_id', e.payment_id,
			'status', (SELECT x.status FROM market.payments x WHERE x.id = e.payment_id),
			'event_status', e.status,
			'reason', format('duplicate delivery: the event was received before (%s)', e.status));
	END IF;
	r := market.psp_webhook_apply(v_id);
	IF (r ->> 'applied')::boolean THEN
		v_retried := market.psp_webhook_retry_deferred((r ->> 'payment_id')::bigint);
		IF v_retried > 0 THEN
			r := r || jsonb_build_object('status',
				(SELECT x.status FROM market.payments x WHERE x.id = (r ->> 'payment_id')::bigint));
		END IF;
	END IF;
	RETURN jsonb_build_object('event_id', psp_webhook_record.event_id, 'duplicate', false)
		   || (r - 'note') || jsonb_build_object('deferred_applied', v_retried)
		   || CASE WHEN (r ->> 'applied')::boolean THEN jsonb_build_object('note', r -> 'note') ELSE '{}' END;
END
$$;

-- ---------------------------------------------------------------------------
-- psp_webhook_retry: an admin retries deferred events (of one payment, or
-- every deferred event when payment_id is NULL).  Returns how many were
-- applied.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_webhook_retry(payment_id bigint DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_n int := 0;
	v_id bigint;
	r jsonb;
BEGIN
	IF psp_webhook_retry.payment_id IS NOT NULL THEN
		IF NOT EXISTS (SELECT FROM market.payments x WHERE x.id = psp_webhook_retry.payment_id) THEN
			RAISE EXCEPTION 'unknown payment'
				USING ERRCODE = 'MK075', DETAIL = format('No payment has id %s.', psp_webhook_retry.payment_id);
		END IF;
		RETURN market.psp_webhook_retry_deferred(psp_webhook_retry.payment_id);
	END IF;
	FOR v_id IN SELECT e.id FROM market.psp_webhook_events e WHERE e.status = 'deferred' ORDER BY e.id LOOP
		-- an earlier retry may have applied it already
		CONTINUE WHEN NOT EXISTS (SELECT FROM market.psp_webhook_events e WHERE e.id = v_id AND e.status = 'deferred');
		r := market.psp_webhook_apply(v_id);
		IF (r ->> 'applied')::boolean THEN
			v_n := v_n + 1 + market.psp_webhook_retry_deferred((r ->> 'payment_id')::bigint);
		END IF;
	END LOOP;
	RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------
-- psp_webhook: the entry point for the application's webhook endpoint:
-- verify, normalise, record (deduplicate) and apply.
-- ---------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION market.psp_webhook(provider text, headers jsonb, body text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_prov text := lower(psp_webhook.provider);
	v_sig text;
	v_t text;
	v_v1 text[] := '{}';
	v_part text;
	v_mac bytea;
	v_acct int;
	a record;
	v_doc jsonb;
	v_obj jsonb;
	v_item jsonb;
	v_items jsonb := '[]';
	v_res jsonb;
	v_first jsonb;
	v_all jsonb := '[]';
	v_signing text;
	v_type text;
	v_code text;
	v_ok boolean;
	v_kind text;
	v_tol int := extract(epoch FROM coalesce(current_setting('market.psp_webhook_tolerance', true), '300s')::interval)::int;
BEGIN
	IF psp_webhook.provider IS NULL OR psp_webhook.headers IS NULL OR psp_webhook.body IS NULL THEN
		RAISE EXCEPTION 'psp_webhook arguments must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF v_prov = 'paypal' THEN
		RAISE EXCEPTION 'paypal webhooks are not supported'
			USING ERRCODE = 'MK070',
				  DETAIL = 'Verifying a PayPal webhook needs a call back to PayPal (verify-webhook-signature) or a check of its certificate chain; this release does neither.',
				  HINT = 'The PSP worker''s own answers record PayPal payments; do not route PayPal webhooks here.';
	END IF;
	IF v_prov NOT IN ('stripe', 'adyen') THEN
		RAISE EXCEPTION 'unknown webhook provider "%"', left(psp_webhook.provider, 50)
			USING ERRCODE = 'MK070', HINT = 'The providers are stripe and adyen.';
	END IF;
	IF jsonb_typeof(headers) <> 'object' THEN
		RAISE EXCEPTION 'webhook headers must be a JSON object' USING ERRCODE = 'MK021';
	END IF;

	IF v_prov = 'stripe' THEN
		SELECT h.value INTO v_sig FROM jsonb_each_text(headers) h
		 WHERE lower(h.key) = 'stripe-signature' LIMIT 1;
		IF v_sig IS NULL THEN
			RAISE EXCEPTION 'webhook signature invalid' USING ERRCODE = 'MK077',
				DETAIL = 'There is no Stripe-Signature header.';
		END IF;
		FOREACH v_part IN ARRAY string_to_array(v_sig, ',') LOOP
			v_part := btrim(v_part);
			IF v_part LIKE 't=%' THEN
				v_t := substr(v_part, 3);
			ELSIF v_part ~ '^v1=[0-9a-fA-F]{64}$' THEN
				v_v1 := v_v1 || substr(v_part, 4);
			END IF;
		END LOOP;
		IF v_t IS NULL OR v_t !~ '^[0-9]{1,12}$' OR cardinality(v_v1) = 0 THEN
			RAISE EXCEPTION 'webhook signature invalid' USING ERRCODE = 'MK077',
				DETAIL = 'The Stripe-Signature header has no valid t= and v1= elements.';
		END IF;
		IF abs(extract(epoch FROM now()) - v_t::bigint) > v_tol THEN
			RAISE EXCEPTION 'webhook timestamp outside the tolerance' USING ERRCODE = 'MK077',
				DETAIL = format('The signed timestamp is more than %s seconds from now.', v_tol),
				HINT = 'See market.psp_webhook_tolerance.';
		END IF;
		FOR a IN SELECT x.id, x.credentials ->> 'webhook_secret' AS secret FROM market.psp_accounts x
				  WHERE x.kind = 'stripe' AND x.credentials ? 'webhook_secret' ORDER BY x.id
		LOOP
			FOREACH v_part IN ARRAY v_v1 LOOP
				IF market.psp_hmac_verify(convert_to(a.secret, 'UTF8'),
						convert_to(v_t || '.' || body, 'UTF8'), decode(v_part, 'hex')) THEN
					v_acct := a.id;
				END IF;
			END LOOP;
			EXIT WHEN v_acct IS NOT NULL;
		END LOOP;
		IF v_acct IS NULL THEN
			RAISE EXCEPTION 'webhook signature invalid' USING ERRCODE = 'MK077',
				DETAIL = 'No Stripe account''s webhook secret gives this signature.';
		END IF;
		BEGIN
			v_doc := body::jsonb;
		EXCEPTION WHEN invalid_text_representation THEN
			RAISE EXCEPTION 'malformed webhook body' USING ERRCODE = 'MK021', DETAIL = 'The body is not JSON.';
		END;
		v_obj := v_doc #> '{data,object}';
		IF jsonb_typeof(v_doc) <> 'object' OR jsonb_typeof(v_doc -> 'id') IS DISTINCT FROM 'string'
		   OR jsonb_typeof(v_doc -> 'type') IS DISTINCT FROM 'string'
		   OR jsonb_typeof(v_obj) IS DISTINCT FROM 'object' THEN
			RAISE EXCEPTION 'malformed webhook body' USING ERRCODE = 'MK021',
				DETAIL = 'A Stripe event has a string id, a string type and an object data.object.';
		END IF;
		v_type := v_doc ->> 'type';
		-- what the event proves (docs/payments.md, the event table)
		v_kind := CASE
			WHEN v_obj ->> 'object' = 'payment_intent' THEN CASE v_type
				WHEN 'payment_intent.amount_capturable_updated' THEN 'authorization'
				WHEN 'payment_intent.succeeded' THEN 'capture'
				WHEN 'payment_intent.payment_failed' THEN 'authorization_failed'
				WHEN 'payment_intent.canceled' THEN 'cancellation'
				ELSE 'other' END
			WHEN v_obj ->> 'object' = 'charge' AND v_type = 'charge.refunded' THEN 'refund'
			WHEN v_obj ->> 'object' = 'refund'
				 AND v_type IN ('refund.created', 'refund.updated', 'refund.failed', 'charge.refund.updated') THEN
				CASE v_obj ->> 'status' WHEN 'succeeded' THEN 'refund'
					 WHEN 'failed' THEN 'refund_failed' WHEN 'canceled' THEN 'refund_failed'
					 ELSE 'other' END
			ELSE 'other' END;
		IF v_kind <> 'other' THEN
			-- the numbers of a folded event must be numbers
			FOREACH v_part IN ARRAY ARRAY['amount', 'amount_received', 'amount_captured', 'amount_refunded'] LOOP
				IF v_obj ? v_part AND (v_obj ->> v_part) !~ '^[0-9]{1,18}$' THEN
					RAISE EXCEPTION 'malformed webhook body' USING ERRCODE = 'MK021',
						DETAIL = format('data.object.%s is not a non-negative integer.', v_part);
				END IF;
			END LOOP;
			IF jsonb_typeof(v_obj -> CASE WHEN v_obj ->> 'object' = 'payment_intent' THEN 'id' ELSE 'payment_intent' END)
			   IS DISTINCT FROM 'string' OR NOT v_obj ? 'amount' THEN
				RAISE EXCEPTION 'malformed webhook body' USING ERRCODE = 'MK021',
					DETAIL = 'A payment event''s data.object names its PaymentIntent and has an amount.';
			END IF;
		END IF;
		RETURN market.psp_webhook_record('stripe', v_doc ->> 'id', v_type, v_acct, v_kind,
			CASE WHEN v_obj ->> 'object' = 'payment_intent' THEN v_obj ->> 'id' ELSE v_obj ->> 'payment_intent' END,
			v_obj #>> '{metadata,reference}',
			CASE WHEN v_obj ->> 'object' = 'refund' THEN v_obj ->> 'id' END,
			v_obj ->> 'currency',
			CASE WHEN v_obj ->> 'object' = 'refund' THEN (v_obj ->> 'amount')::bigint END,
			CASE WHEN v_obj ->> 'object' IN ('payment_intent', 'charge') AND v_kind <> 'other'
				 THEN (v_obj ->> 'amount')::bigint END,
			CASE WHEN v_kind = 'capture' THEN (v_obj ->> 'amount_received')::bigint
				 WHEN v_obj ->> 'object' = 'charge' THEN (v_obj ->> 'amount_captured')::bigint END,
			CASE WHEN v_obj ->> 'object' = 'charge' THEN (v_obj ->> 'amount_refunded')::bigint END,
			coalesce(v_obj #>> '{last_payment_error,decline_code}', v_obj #>> '{last_payment_error,code}',
					 v_obj ->> 'failure_reason'));
	END IF;

	-- Adyen: every item carries its own signature; all are checked first
	BEGIN
		v_doc := body::jsonb;
	EXCEPTION WHEN invalid_text_representation THEN
		RAISE EXCEPTION 'malformed webhook body' USING ERRCODE = 'MK021', DETAIL = 'The body is not JSON.';
	END;
	IF jsonb_typeof(v_doc -> 'notificationItems') IS DISTINCT FROM 'array'
	   OR jsonb_array_length(v_doc -> 'notificationItems') = 0 THEN
		RAISE EXCEPTION 'malformed webhook body' USING ERRCODE = 'MK021',
			DETAIL = 'An Adyen notification has a non-empty notificationItems array.';
	END IF;
	FOR v_item IN SELECT i -> 'NotificationRequestItem' FROM jsonb_array_elements(v_doc -> 'notificationItems') i
	LOOP
		IF jsonb_typeof(v_item) IS DISTINCT FROM 'object'
		   OR jsonb_typeof(v_item -> 'pspReference') IS DISTINCT FROM 'string'
		   OR jsonb_typeof(v_item -> 'eventCode') IS DISTINCT FROM 'string'
		   OR jsonb_typeof(v_item -> 'success') IS DISTINCT FROM 'string'
		   OR jsonb_typeof(v_item -> 'amount') IS DISTINCT FROM 'object' THEN
			RAISE EXCEPTION 'malformed webhook body' USING ERRCODE = 'MK021',
				DETAIL = 'Each item is a NotificationRequestItem with pspReference, eventCode, success and amount.';
		END IF;
		v_signing := concat_ws(':', coalesce(v_item ->> 'pspReference', ''),
			coalesce(v_item ->> 'originalReference', ''), coalesce(v_item ->> 'merchantAccountCode', ''),
			coalesce(v_item ->> 'merchantReference', ''), coalesce(v_item #>> '{amount,value}', ''),
			coalesce(v_item #>> '{amount,currency}', ''), coalesce(v_item ->> 'eventCode', ''),
			coalesce(v_item ->> 'success', ''));
		v_sig := v_item #>> '{additionalData,hmacSignature}';
		v_mac := NULL;
		IF v_sig ~ '^[A-Za-z0-9+/]{43}=$' THEN
			v_mac := decode(v_sig, 'base64');
		END IF;
		v_acct := NULL;
		IF v_mac IS NOT NULL THEN
			FOR a IN SELECT x.id, x.credentials ->> 'hmac_key' AS k FROM market.psp_accounts x
					  WHERE x.kind = 'adyen' AND x.credentials ? 'hmac_key' ORDER BY x.id
			LOOP
				IF market.psp_hmac_verify(decode(a.k, 'hex'), convert_to(v_signing, 'UTF8'), v_mac) THEN
					v_acct := a.id;
					EXIT;
				END IF;
			END LOOP;
		END IF;
		IF v_acct IS NULL THEN
			RAISE EXCEPTION 'webhook signature invalid' USING ERRCODE = 'MK077',
				DETAIL = format('The hmacSignature of item %s is missing or no Adyen account''s HMAC key gives it.',
								v_item ->> 'pspReference');
		END IF;
		IF (v_item #>> '{amount,value}') !~ '^[0-9]{1,18}$' THEN
			RAISE EXCEPTION 'malformed webhook body' USING ERRCODE = 'MK021',
				DETAIL = format('The amount value of item %s is not a non-negative integer.', v_item ->> 'pspReference');
		END IF;
		v_items := v_items || jsonb_build_object('item', v_item, 'account', v_acct);
	END LOOP;
	FOR v_item IN SELECT * FROM jsonb_array_elements(v_items) LOOP
		v_obj := v_item -> 'item';
		v_type := v_obj ->> 'eventCode';
		v_ok := v_obj ->> 'success' = 'true';
		v_kind := CASE v_type
			WHEN 'AUTHORISATION' THEN CASE WHEN v_ok THEN 'authorization' ELSE 'authorization_failed' END
			WHEN 'CAPTURE' THEN CASE WHEN v_ok THEN 'capture' ELSE 'capture_failed' END
			WHEN 'CAPTURE_FAILED' THEN 'capture_failed'
			WHEN 'CANCELLATION' THEN CASE WHEN v_ok THEN 'cancellation' ELSE 'cancellation_failed' END
			WHEN 'REFUND' THEN CASE WHEN v_ok THEN 'refund' ELSE 'refund_failed' END
			WHEN 'REFUND_FAILED' THEN 'refund_failed'
			ELSE 'other' END;
		-- Adyen's refusal reason codes, as the adapter maps them
		v_code := CASE v_obj #>> '{additionalData,refusalReasonCode}'
			WHEN '2' THEN 'generic_decline' WHEN '4' THEN 'processing_error' WHEN '5' THEN 'blocked_card'
			WHEN '6' THEN 'expired_card' WHEN '7' THEN 'invalid_card_details'
			WHEN '9' THEN 'issuer_not_available' WHEN '12' THEN 'insufficient_funds'
			WHEN '20' THEN 'fraudulent' WHEN '27' THEN 'do_not_honor'
			ELSE CASE WHEN v_kind = 'authorization_failed' THEN 'generic_decline' END END;
		v_res := market.psp_webhook_record('adyen',
			concat_ws(':', v_type, v_obj ->> 'pspReference', v_obj ->> 'success'),
			v_type, (v_item ->> 'account')::int, v_kind,
			CASE WHEN v_type = 'AUTHORISATION' THEN v_obj ->> 'pspReference'
				 ELSE coalesce(v_obj ->> 'originalReference', v_obj ->> 'pspReference') END,
			v_obj ->> 'merchantReference',
			CASE WHEN v_type <> 'AUTHORISATION' THEN v_obj ->> 'pspReference' END,
			v_obj #>> '{amount,currency}',
			CASE WHEN v_kind IN ('capture', 'refund', 'capture_failed', 'refund_failed') THEN (v_obj #>> '{amount,value}')::bigint END,
			CASE WHEN v_type = 'AUTHORISATION' THEN (v_obj #>> '{amount,value}')::bigint END,
			NULL, NULL, v_code);
		v_first := coalesce(v_first, v_res);
		v_all := v_all || jsonb_build_array(v_res);
	END LOOP;
	-- the first item's answer; every item's when there are several
	IF jsonb_array_length(v_all) > 1 THEN
		RETURN v_first || jsonb_build_object('items', v_all);
	END IF;
	RETURN v_first;
END
$$;

REVOKE ALL ON FUNCTION
	market.psp_webhook_settle(bigint, text, text, text, text, text),
	market.psp_webhook_reconcile(bigint, int, int),
	market.psp_webhook_apply(bigint),
	market.psp_webhook_retry_deferred(bigint),
	market.psp_webhook_record(text, text, text, int, text, text, text, text, text, bigint, bigint, bigint, bigint, text),
	market.psp_webhook_retry(bigint)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION market.psp_webhook_retry(bigint) TO market_admin;
