-- ===========================================================================
-- market 0.3: PSP webhooks (docs/payments.md, "Webhooks").
--
--   market.psp_webhook_events  one row per verified event, UNIQUE
--                              (provider, event_id): the deduplication
--   psp_hmac_verify            HMAC-SHA256 check in C (src/psp_webhook.c);
--                              no role may call it
--   psp_webhook                the API: verify, deduplicate, fold
--
-- Secrets: credentials->>'webhook_secret' (Stripe) and
-- credentials->>'hmac_key' (Adyen, hex) of the PSP accounts; like the other
-- credentials they are readable by the owner only and never appear in a
-- message.  Folding never moves a payment backwards: only a payment still
-- 'pending' is moved (to 'authorized', its waiting orders to 'confirmed').
-- SQLSTATEs: MK077 bad signature or stale timestamp, MK021 malformed body,
-- MK070 unknown provider, MK020 NULL argument.
-- ===========================================================================

CREATE TABLE market.psp_webhook_events (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	provider		text NOT NULL CHECK (provider IN ('stripe', 'adyen')),
	event_id		text NOT NULL,
	event_type		text NOT NULL,
	psp_account_id	int REFERENCES market.psp_accounts (id),
	psp_reference	text,
	payment_id		bigint REFERENCES market.payments (id),
	status			text NOT NULL CHECK (status IN ('processed', 'ignored')),
	note			text,
	received_at		timestamptz NOT NULL DEFAULT now(),
	CONSTRAINT psp_webhook_events_unique UNIQUE (provider, event_id)
);
REVOKE ALL ON market.psp_webhook_events FROM PUBLIC;
GRANT SELECT ON market.psp_webhook_events TO market_admin;

CREATE FUNCTION market.psp_hmac_verify(key bytea, data bytea, mac bytea) RETURNS boolean
AS 'MODULE_PATHNAME', 'market_psp_hmac_verify'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- fold one verified event: dedup row, then (authorization success of a
-- pending payment) the payment and its orders.  Returns the answer.
CREATE FUNCTION market.psp_webhook_fold(provider text, event_id text, event_type text,
	account_id int, psp_reference text, merchant_ref text, authorized boolean,
	amount_minor bigint, currency text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_id bigint;
	p market.payments;
	v_status text := 'ignored';
	v_note text;
	v_pid bigint;
BEGIN
	INSERT INTO market.psp_webhook_events (provider, event_id, event_type, psp_account_id,
		psp_reference, status)
	VALUES (psp_webhook_fold.provider, psp_webhook_fold.event_id, left(psp_webhook_fold.event_type, 100),
		account_id, left(psp_webhook_fold.psp_reference, 200), 'ignored')
	ON CONFLICT ON CONSTRAINT psp_webhook_events_unique DO NOTHING
	RETURNING id INTO v_id;
	IF v_id IS NULL THEN
		RETURN jsonb_build_object('status', 'duplicate', 'event_id', psp_webhook_fold.event_id);
	END IF;

	IF NOT authorized THEN
		v_note := 'event type not folded';
	ELSE
		-- the payment: by its PSP reference, else by our reference mk-pay-<id>
		SELECT x.id INTO v_pid FROM market.payments x
		 WHERE x.psp_reference = psp_webhook_fold.psp_reference
		 ORDER BY x.id LIMIT 1;
		IF v_pid IS NULL AND merchant_ref ~ '^mk-pay-[0-9]{1,18}$' THEN
			v_pid := substr(merchant_ref, 8)::bigint;
		END IF;
		SELECT * INTO p FROM market.payments x WHERE x.id = v_pid FOR UPDATE;
		IF NOT FOUND THEN
			v_note := 'no such payment';
		ELSIF p.amount_minor IS DISTINCT FROM psp_webhook_fold.amount_minor
			  OR p.currency IS DISTINCT FROM upper(psp_webhook_fold.currency) THEN
			v_note := 'amount or currency differs from the payment';
		ELSIF p.status <> 'pending' THEN
			-- already decided (by the worker or an earlier event): never backwards
			v_status := 'processed';
			v_note := format('payment already %s', p.status);
		ELSE
			UPDATE market.payments x
			   SET status = 'authorized', authorized_minor = psp_webhook_fold.amount_minor,
				   psp_account_id = account_id, psp_reference = psp_webhook_fold.psp_reference,
				   decline_code = NULL, last_error = NULL, updated_at = now()
			 WHERE x.id = p.id;
			PERFORM market.psp_orders_to(p.group_id, 'confirmed',
				format('payment authorized at %s (webhook)', psp_webhook_fold.provider));
			-- the worker's authorize job is acked by psp_plan now that the
			-- payment is decided; accounts it left with an unknown outcome
			-- get their reconcile jobs here (the webhook's account is the winner)
			PERFORM market.psp_queue_reconcile(p.id, m.id, account_id)
			   FROM market.outbox m
			  WHERE m.topic = 'psp' AND m.aggregate_type = 'payment' AND m.aggregate_id = p.id
				AND m.event_type = 'payment.authorize';
			v_status := 'processed';
			v_note := 'payment authorized';
		END IF;
	END IF;
	UPDATE market.psp_webhook_events e SET status = v_status, note = v_note, payment_id = p.id
	 WHERE e.id = v_id;
	RETURN jsonb_build_object('status', v_status, 'event_id', psp_webhook_fold.event_id);
END
$$;

-- ---------------------------------------------------------------------------
-- psp_webhook: the entry point for the application's webhook endpoint.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_webhook(provider text, headers jsonb, body text)
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
	v_tol int := extract(epoch FROM coalesce(current_setting('market.psp_webhook_tolerance', true), '300s')::interval)::int;
BEGIN
	IF psp_webhook.provider IS NULL OR psp_webhook.headers IS NULL OR psp_webhook.body IS NULL THEN
		RAISE EXCEPTION 'psp_webhook arguments must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF v_prov NOT IN ('stripe', 'adyen') THEN
		RAISE EXCEPTION 'unknown webhook provider "%"', left(psp_webhook.provider, 50)
			USING ERRCODE = 'MK070', HINT = 'The providers are stripe and adyen; PayPal webhooks are not verified.';
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
		RETURN market.psp_webhook_fold('stripe', v_doc ->> 'id', v_doc ->> 'type', v_acct,
			v_obj ->> 'id', v_obj #>> '{metadata,reference}',
			(v_doc ->> 'type') IN ('payment_intent.amount_capturable_updated', 'payment_intent.succeeded')
				AND v_obj ->> 'object' = 'payment_intent'
				AND v_obj ->> 'status' IN ('requires_capture', 'succeeded'),
			CASE WHEN (v_obj ->> 'amount') ~ '^[0-9]{1,18}$' THEN (v_obj ->> 'amount')::bigint END,
			v_obj ->> 'currency');
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
		v_items := v_items || jsonb_build_object('item', v_item, 'account', v_acct);
	END LOOP;
	FOR v_item IN SELECT * FROM jsonb_array_elements(v_items) LOOP
		v_obj := v_item -> 'item';
		v_res := market.psp_webhook_fold('adyen',
			concat_ws(':', v_obj ->> 'eventCode', v_obj ->> 'pspReference', v_obj ->> 'success'),
			v_obj ->> 'eventCode', (v_item ->> 'account')::int, v_obj ->> 'pspReference',
			v_obj ->> 'merchantReference',
			v_obj ->> 'eventCode' = 'AUTHORISATION' AND v_obj ->> 'success' = 'true',
			CASE WHEN (v_obj #>> '{amount,value}') ~ '^[0-9]{1,18}$' THEN (v_obj #>> '{amount,value}')::bigint END,
			v_obj #>> '{amount,currency}');
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
	market.psp_hmac_verify(bytea, bytea, bytea),
	market.psp_webhook_fold(text, text, text, int, text, text, boolean, bigint, text),
	market.psp_webhook(text, jsonb, text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION market.psp_webhook(text, jsonb, text) TO market_app, market_admin;
