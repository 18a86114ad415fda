--
-- webhooks: market.psp_webhook() verifies Stripe-Signature (with its
-- timestamp tolerance) and Adyen's item HMAC, deduplicates by (provider,
-- event id) and folds every payment event into its payment by the PSP
-- worker's rules, whatever order the events come in (release 0.4).
-- Expected signatures come from outside the extension: Stripe's from
-- pgcrypto's hmac() (itself checked against a value computed offline with
-- Perl's Digest::SHA); Adyen's from pgcrypto too, checked against literals
-- computed offline with Perl.
--
\set VERBOSITY sqlstate

CREATE SCHEMA wh_test;
CREATE EXTENSION pgcrypto SCHEMA wh_test;

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

-- pgcrypto agrees with Perl: hmac_sha256_hex("1700000000.{}", "whsec_test_secret")
SELECT encode(wh_test.hmac('1700000000.{}', 'whsec_test_secret', 'sha256'), 'hex')
	= 'ceb8863f7208fa249a6cd8f951e993c7563412aca65866f6272283debe143ab3' AS pgcrypto_agrees;

-- a Stripe-Signature header for body at time t, keyed with secret
CREATE FUNCTION pg_temp.stripe_headers(body text, t bigint DEFAULT extract(epoch FROM now())::bigint,
	secret text DEFAULT 'whsec_test_secret') RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_build_object('Content-Type', 'application/json', 'Stripe-Signature',
		format('t=%s,v1=%s', t, encode(wh_test.hmac(t || '.' || body, secret, 'sha256'), 'hex')))
$$;
-- a Stripe event whose data.object is obj
CREATE FUNCTION pg_temp.sev(id text, type text, obj jsonb) RETURNS text LANGUAGE sql AS $$
	SELECT jsonb_build_object('id', id, 'object', 'event', 'type', type, 'created', 1700000000,
		'data', jsonb_build_object('object', obj))::text
$$;
-- a PaymentIntent of payment pid
CREATE FUNCTION pg_temp.pi(pi text, pid bigint, status text, amount bigint,
	received bigint DEFAULT 0, decline text DEFAULT NULL, currency text DEFAULT 'usd') RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_build_object('id', pi, 'object', 'payment_intent', 'status', status, 'amount', amount,
		'amount_capturable', CASE WHEN status = 'requires_capture' THEN amount ELSE 0 END,
		'amount_received', received, 'currency', currency,
		'last_payment_error', CASE WHEN decline IS NOT NULL
			THEN jsonb_build_object('code', 'card_declined', 'decline_code', decline) END,
		'metadata', jsonb_build_object('reference', 'mk-pay-' || pid))
$$;
-- a Charge of PaymentIntent pi
CREATE FUNCTION pg_temp.charge(pi text, pid bigint, amount bigint, captured bigint, refunded bigint)
RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_build_object('id', 'ch_' || pi, 'object', 'charge', 'payment_intent', pi,
		'amount', amount, 'amount_captured', captured, 'amount_refunded', refunded, 'currency', 'usd',
		'captured', captured > 0, 'refunded', refunded = captured, 'status', 'succeeded',
		'metadata', jsonb_build_object('reference', 'mk-pay-' || pid))
$$;
-- deliver a Stripe event: the answer without its timestamp-dependent parts
CREATE FUNCTION pg_temp.stripe(body text) RETURNS jsonb LANGUAGE sql AS $$
	SELECT market.psp_webhook('stripe', pg_temp.stripe_headers(body), body)
$$;

-- an Adyen notification with one signed item (key: adyen-wh's)
CREATE FUNCTION pg_temp.adyen_item(psp text, orig text, mref text, value bigint, event text,
	success text, currency text DEFAULT 'USD', key text DEFAULT '44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056')
RETURNS jsonb LANGUAGE sql AS $$
	SELECT jsonb_strip_nulls(jsonb_build_object('pspReference', psp, 'originalReference', orig,
		'merchantAccountCode', 'MarketMA', 'merchantReference', mref,
		'amount', jsonb_build_object('value', value, 'currency', currency),
		'eventCode', event, 'success', success,
		'additionalData', jsonb_build_object('hmacSignature', encode(wh_test.hmac(
			convert_to(concat_ws(':', psp, coalesce(orig, ''), 'MarketMA', coalesce(mref, ''), value, currency, event, success), 'UTF8'),
			decode(key, 'hex'), 'sha256'), 'base64'))))
$$;
CREATE FUNCTION pg_temp.adyen(VARIADIC items jsonb[]) RETURNS jsonb LANGUAGE sql AS $$
	SELECT market.psp_webhook('adyen', '{}', jsonb_build_object('live', 'false', 'notificationItems',
		(SELECT jsonb_agg(jsonb_build_object('NotificationRequestItem', i)) FROM unnest(items) i))::text)
$$;
-- pgcrypto's Adyen signatures are those computed offline with Perl
SELECT pg_temp.adyen_item('ADY0001', NULL, 'mk-pay-900002', 2500, 'AUTHORISATION', 'true')
		#>> '{additionalData,hmacSignature}' = 'RNYbbxJ/LdcN6lCnRDin8LvM+7zlIh0BNAa64TN5N48=' AS adyen_ok_agrees,
	   pg_temp.adyen_item('ADY0001', NULL, 'mk-pay-900002', 2500, 'AUTHORISATION', 'false')
		#>> '{additionalData,hmacSignature}' = 'DvouagavMYPj2a5yxt2vObZah0tGMBSkFMyLUi0UtAM=' AS adyen_fail_agrees;

-- accounts with webhook secrets, and bad secrets refused
SELECT market.psp_register('stripe-wh', 'stripe', 'https://api.stripe.com',
	'{"secret_key": "sk_test_wh", "webhook_secret": "whsec_test_secret"}') AS stripe_wh \gset
SELECT market.psp_register('adyen-wh', 'adyen', 'https://checkout-test.adyen.com',
	'{"api_key": "AQE_wh", "merchant_account": "MarketMA", "hmac_key": "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"}') AS adyen_wh \gset
SELECT pg_temp.try(s) FROM unnest(ARRAY[
	$$SELECT market.psp_register('x', 'adyen', 'https://x.example', '{"api_key": "k", "merchant_account": "m", "hmac_key": "xyz"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "sk_1", "webhook_secret": ""}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "sk_1", "hmac_key": "00"}')$$
]) AS s;

-- pending payments with known ids, one order each (no stock lines here:
-- test/t/030_webhooks.pl checks the units a failure returns)
SELECT market.seller_create('Webhook Seller') AS seller \gset
CREATE FUNCTION pg_temp.pay(pid bigint, amount bigint, job boolean DEFAULT false) RETURNS void LANGUAGE plpgsql AS $$
DECLARE g bigint;
BEGIN
	INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
	VALUES (gen_random_uuid(), 'wh-customer', 'USD', amount) RETURNING id INTO g;
	INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
	VALUES (g, (SELECT id FROM market.sellers WHERE name = 'Webhook Seller'), 'wh-customer', 'USD', amount);
	INSERT INTO market.payments (id, group_id, customer_id, currency, amount_minor, method)
	OVERRIDING SYSTEM VALUE VALUES (pid, g, 'wh-customer', 'USD', amount, 'pm_card_visa');
	IF job THEN
		INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
		VALUES ('psp', 'payment.authorize', 'payment', pid, jsonb_build_object('payment_id', pid));
	END IF;
END
$$;
CREATE FUNCTION pg_temp.state(pid bigint) RETURNS text LANGUAGE sql AS $$
	SELECT format('%s auth=%s cap=%s ref=%s %s/%s | orders: %s', p.status, p.authorized_minor, p.captured_minor,
		p.refunded_minor, coalesce(a.name, '-'), coalesce(p.psp_reference, '-'),
		(SELECT string_agg(o.status, ',' ORDER BY o.id) FROM market.orders o WHERE o.group_id = p.group_id))
	  FROM market.payments p LEFT JOIN market.psp_accounts a ON a.id = p.psp_account_id WHERE p.id = pid
$$;
-- the answer's stable parts
CREATE FUNCTION pg_temp.ans(r jsonb) RETURNS text LANGUAGE sql AS $$
	SELECT format('dup=%s applied=%s payment=%s status=%s event=%s%s%s', r ->> 'duplicate', r ->> 'applied',
		coalesce(r ->> 'payment_id', '-'), coalesce(r ->> 'status', '-'), r ->> 'event_status',
		coalesce(' reason: ' || (r ->> 'reason'), ''),
		CASE WHEN (r ->> 'deferred_applied')::int > 0 THEN ' deferred_applied=' || (r ->> 'deferred_applied') ELSE '' END)
$$;
SELECT pg_temp.pay(900001, 1500), pg_temp.pay(900002, 2500);
SELECT pg_temp.state(900001), pg_temp.state(900002);

-- ---------------------------------------------------------------------------
-- Verification (Stripe): nothing of a refused webhook is recorded
-- ---------------------------------------------------------------------------
SELECT pg_temp.sev('evt_auth', 'payment_intent.amount_capturable_updated',
	pg_temp.pi('pi_wh_1', 900001, 'requires_capture', 1500)) AS ev_auth \gset
-- tampered body, other secret, no header, garbled header
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe',
		pg_temp.stripe_headers(:'ev_auth'), replace(:'ev_auth', '1500', '1')));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe',
		pg_temp.stripe_headers(:'ev_auth', secret => 'whsec_other'), :'ev_auth'));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe', '{}', :'ev_auth'));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe',
		'{"Stripe-Signature": "t=abc,v1=zz"}', :'ev_auth'));
-- stale and future timestamps, signed correctly
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe',
		pg_temp.stripe_headers(:'ev_auth', extract(epoch FROM now())::bigint - 301), :'ev_auth'));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe',
		pg_temp.stripe_headers(:'ev_auth', extract(epoch FROM now())::bigint + 400), :'ev_auth'));
-- the tolerance is a setting: 301 s old passes with 600
SET market.psp_webhook_tolerance = 600;
SELECT pg_temp.sev('evt_late', 'payment_intent.created', pg_temp.pi('pi_wh_1', 900001, 'requires_payment_method', 1500)) AS ev_late \gset
SELECT pg_temp.ans(market.psp_webhook('stripe', pg_temp.stripe_headers(:'ev_late', extract(epoch FROM now())::bigint - 301), :'ev_late'));
RESET market.psp_webhook_tolerance;
SELECT pg_temp.state(900001) AS untouched, count(*) AS events FROM market.psp_webhook_events;

-- malformed bodies and documents, correctly signed
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe', pg_temp.stripe_headers(b), b))
  FROM unnest(ARRAY[
	'not json',
	'{"id": 7, "type": "x"}',
	'[1]',
	'{"id": "evt_m1", "type": "payment_intent.succeeded", "data": {"object": {"object": "payment_intent", "id": "pi_m", "amount": "12x"}}}',
	'{"id": "evt_m2", "type": "charge.refunded", "data": {"object": {"object": "charge", "amount": 100}}}'
  ]) AS b;

-- ---------------------------------------------------------------------------
-- Stripe, in order: every event kind, duplicates, a failure after success
-- ---------------------------------------------------------------------------
SELECT pg_temp.ans(pg_temp.stripe(:'ev_auth')) AS authorization;
SELECT pg_temp.state(900001);
SELECT pg_temp.ans(pg_temp.stripe(:'ev_auth')) AS duplicate;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_fail_after', 'payment_intent.payment_failed',
	pg_temp.pi('pi_wh_1', 900001, 'requires_payment_method', 1500, decline => 'card_declined')))) AS failure_after_success;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_capt', 'payment_intent.succeeded',
	pg_temp.pi('pi_wh_1', 900001, 'succeeded', 1500, 1500)))) AS capture;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_capt_again', 'payment_intent.succeeded',
	pg_temp.pi('pi_wh_1', 900001, 'succeeded', 1500, 1500)))) AS capture_other_id;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_ref1', 'charge.refunded',
	pg_temp.charge('pi_wh_1', 900001, 1500, 1500, 500)))) AS refund_partial;
SELECT pg_temp.state(900001);
-- a Refund object without a worker call: charge.refunded's total folds it
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_re1', 'refund.created',
	jsonb_build_object('id', 're_1', 'object', 'refund', 'amount', 500, 'currency', 'usd',
					   'payment_intent', 'pi_wh_1', 'status', 'succeeded')))) AS refund_object;
-- an older running total after a newer one: nothing moves back
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_ref2', 'charge.refunded',
	pg_temp.charge('pi_wh_1', 900001, 1500, 1500, 1500)))) AS refund_rest;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_ref1_late', 'charge.refunded',
	pg_temp.charge('pi_wh_1', 900001, 1500, 1500, 500)))) AS refund_total_older;
SELECT pg_temp.state(900001);

-- ---------------------------------------------------------------------------
-- Stripe, out of order
-- ---------------------------------------------------------------------------
SELECT pg_temp.pay(900004, 4000), pg_temp.pay(900005, 5000), pg_temp.pay(900006, 6000),
	   pg_temp.pay(900007, 7000), pg_temp.pay(900008, 8000);
-- the capture before the authorization: it proves the authorization too
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_4c', 'payment_intent.succeeded',
	pg_temp.pi('pi_wh_4', 900004, 'succeeded', 4000, 4000)))) AS capture_first;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_4a', 'payment_intent.amount_capturable_updated',
	pg_temp.pi('pi_wh_4', 900004, 'requires_capture', 4000)))) AS authorization_late;
SELECT pg_temp.state(900004);
-- the refund before the capture and the authorization (a charge proves both)
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_5r', 'charge.refunded',
	pg_temp.charge('pi_wh_5', 900005, 5000, 5000, 1000)))) AS refund_first;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_5c', 'payment_intent.succeeded',
	pg_temp.pi('pi_wh_5', 900005, 'succeeded', 5000, 5000)))) AS capture_late;
SELECT pg_temp.state(900005);
-- a cancellation before the authorization; the authorization late
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_6x', 'payment_intent.canceled',
	pg_temp.pi('pi_wh_6', 900006, 'canceled', 6000)))) AS cancel_first;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_6a', 'payment_intent.amount_capturable_updated',
	pg_temp.pi('pi_wh_6', 900006, 'requires_capture', 6000)))) AS authorization_late;
SELECT pg_temp.state(900006);
-- a failed authorization (no worker job): the payment fails, its orders too;
-- the success that follows is a late authorization the worker did not make
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_7f', 'payment_intent.payment_failed',
	pg_temp.pi('pi_wh_7', 900007, 'requires_payment_method', 7000, decline => 'insufficient_funds')))) AS failed;
SELECT pg_temp.state(900007), (SELECT decline_code FROM market.payments WHERE id = 900007);
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_7a', 'payment_intent.amount_capturable_updated',
	pg_temp.pi('pi_wh_7', 900007, 'requires_capture', 7000)))) AS success_after_failure;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_7c', 'payment_intent.succeeded',
	pg_temp.pi('pi_wh_7', 900007, 'succeeded', 7000, 7000)))) AS capture_after_failure;
SELECT pg_temp.state(900007);
-- amounts that would break the constraints, and a currency mismatch:
-- recorded 'rejected', not applied, never raised
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_8a', 'payment_intent.amount_capturable_updated',
	pg_temp.pi('pi_wh_8', 900008, 'requires_capture', 8000))));
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_8c', 'payment_intent.succeeded',
	pg_temp.pi('pi_wh_8', 900008, 'succeeded', 8000, 9000)))) AS capture_above;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_8p', 'payment_intent.succeeded',
	pg_temp.pi('pi_wh_8', 900008, 'succeeded', 8000, 3000)))) AS capture_part;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_8r', 'charge.refunded',
	pg_temp.charge('pi_wh_8', 900008, 8000, 3000, 4000)))) AS refund_above;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_8e', 'payment_intent.succeeded',
	pg_temp.pi('pi_wh_8', 900008, 'succeeded', 8000, 8000, currency => 'eur')))) AS currency;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_8x', 'payment_intent.canceled',
	pg_temp.pi('pi_wh_8', 900008, 'canceled', 8000)))) AS cancel_after_capture;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_8y', 'payment_intent.succeeded',
	pg_temp.pi('pi_wh_8', 900008, 'succeeded', 8000, 8000)))) AS capture_rest;
SELECT pg_temp.state(900008);
-- an unknown payment: stored 'deferred' and reported; applied once it exists
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_9a', 'payment_intent.amount_capturable_updated',
	pg_temp.pi('pi_wh_9', 900009, 'requires_capture', 9000)))) AS unknown_payment;
SELECT market.psp_webhook_retry() AS retried_none;
SELECT pg_temp.pay(900009, 9000);
SELECT market.psp_webhook_retry() AS retried, pg_temp.state(900009);
-- other event types: recorded, ignored
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_other', 'customer.created',
	jsonb_build_object('id', 'cus_1', 'object', 'customer'))));

-- ---------------------------------------------------------------------------
-- Adyen: every event code, duplicates, out of order
-- ---------------------------------------------------------------------------
\set ady_ok '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"pspReference": "ADY0001", "merchantAccountCode": "MarketMA", "merchantReference": "mk-pay-900002", "amount": {"value": 2500, "currency": "USD"}, "eventCode": "AUTHORISATION", "success": "true", "additionalData": {"hmacSignature": "RNYbbxJ/LdcN6lCnRDin8LvM+7zlIh0BNAa64TN5N48="}}}]}'
-- tampered amount under the good signature; the good signature on the other success value
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'adyen', '{}',
		replace(:'ady_ok', '"value": 2500', '"value": 2600')));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'adyen', '{}',
		replace(:'ady_ok', '"success": "true"', '"success": "false"')));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'adyen', '{}',
		replace(:'ady_ok', '"additionalData": {"hmacSignature": "RNYbbxJ/LdcN6lCnRDin8LvM+7zlIh0BNAa64TN5N48="}', '"x": 1')));
SELECT pg_temp.state(900002) AS untouched;
-- the authorization, a duplicate, the failure of the same authorization
SELECT pg_temp.ans(market.psp_webhook('adyen', '{}', :'ady_ok')) AS authorisation;
SELECT pg_temp.ans(market.psp_webhook('Adyen', '{}', :'ady_ok')) AS duplicate;
SELECT pg_temp.ans(pg_temp.adyen(pg_temp.adyen_item('ADY0001', NULL, 'mk-pay-900002', 2500, 'AUTHORISATION', 'false'))) AS failure_after_success;
-- a refund before its capture: deferred, applied when the capture comes
SELECT pg_temp.ans(pg_temp.adyen(pg_temp.adyen_item('ADYR01', 'ADY0001', 'mk-pay-900002', 1000, 'REFUND', 'true'))) AS refund_first;
SELECT pg_temp.ans(pg_temp.adyen(pg_temp.adyen_item('ADYC01', 'ADY0001', 'mk-pay-900002', 2500, 'CAPTURE', 'true'))) AS capture;
SELECT pg_temp.state(900002);
-- the failure of that capture and refund after their success: ignored
SELECT pg_temp.ans(pg_temp.adyen(pg_temp.adyen_item('ADYC01', 'ADY0001', 'mk-pay-900002', 2500, 'CAPTURE_FAILED', 'true'))) AS capture_failed_late;
SELECT pg_temp.ans(pg_temp.adyen(pg_temp.adyen_item('ADYR01', 'ADY0001', 'mk-pay-900002', 1000, 'REFUND', 'false'))) AS refund_failed_late;
-- a refund above what is left of the capture: rejected; a failed refund: recorded
SELECT pg_temp.ans(pg_temp.adyen(pg_temp.adyen_item('ADYR02', 'ADY0001', 'mk-pay-900002', 2000, 'REFUND', 'true'))) AS refund_above;
SELECT pg_temp.ans(pg_temp.adyen(pg_temp.adyen_item('ADYR03', 'ADY0001', 'mk-pay-900002', 500, 'REFUND_FAILED', 'true'))) AS refund_failed;
SELECT pg_temp.ans(pg_temp.adyen(pg_temp.adyen_item('ADYR04', 'ADY0001', 'mk-pay-900002', 1500, 'REFUND', 'true'))) AS refund_rest;
SELECT pg_temp.state(900002), (SELECT last_error FROM market.payments WHERE id = 900002);
-- several items in one notification: a cancellation before the
-- authorization, and that authorization
SELECT pg_temp.pay(900003, 3500);
SELECT pg_temp.ans(r), jsonb_array_length(r -> 'items') AS items,
	   (SELECT string_agg(pg_temp.ans(i), ' || ') FROM jsonb_array_elements(r -> 'items') i) AS each
  FROM pg_temp.adyen(pg_temp.adyen_item('ADYX03', 'ADY0003', 'mk-pay-900003', 3500, 'CANCELLATION', 'true'),
					 pg_temp.adyen_item('ADY0003', NULL, 'mk-pay-900003', 3500, 'AUTHORISATION', 'true')) r;
SELECT pg_temp.state(900003);
-- a failed authorization with a refusal code
SELECT pg_temp.pay(900010, 1000);
SELECT pg_temp.ans(market.psp_webhook('adyen', '{}', jsonb_build_object('live', 'false', 'notificationItems',
	jsonb_build_array(jsonb_build_object('NotificationRequestItem',
		jsonb_set(pg_temp.adyen_item('ADY0010', NULL, 'mk-pay-900010', 1000, 'AUTHORISATION', 'false'),
				  '{additionalData,refusalReasonCode}', '"6"'))))::text)) AS refused;
SELECT pg_temp.state(900010), (SELECT decline_code FROM market.payments WHERE id = 900010);
-- malformed
SELECT pg_temp.try(s) FROM unnest(ARRAY[
	$$SELECT market.psp_webhook('adyen', '{}', '{"live": "false"')$$,
	$$SELECT market.psp_webhook('adyen', '{}', '{"live": "false", "notificationItems": []}')$$,
	$$SELECT market.psp_webhook('adyen', '{}', '{"notificationItems": [{"NotificationRequestItem": {"eventCode": "AUTHORISATION"}}]}')$$,
	$$SELECT market.psp_webhook('adyen', '[]', '{}')$$
]) AS s;
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'adyen', '{}',
	jsonb_build_object('notificationItems', jsonb_build_array(jsonb_build_object('NotificationRequestItem',
		pg_temp.adyen_item('ADYBAD', NULL, 'mk-pay-900010', -5, 'AUTHORISATION', 'true'))))::text)) AS negative_amount;

-- ---------------------------------------------------------------------------
-- With the worker: its jobs driven by hand (psp_claim / psp_record)
-- ---------------------------------------------------------------------------
SET market.psp_retry_base = 0;
SET market.psp_max_retries = 0;
-- claim() shows this file's payments (ids 900000 and up) only: on a slow
-- machine (valgrind) a job an earlier file left leased comes due again
CREATE FUNCTION pg_temp.claim() RETURNS text LANGUAGE sql AS $$
	SELECT coalesce(string_agg(format('%s %s at %s', j ->> 'op', j ->> 'payment_id', j ->> 'account'), ', '), 'nothing')
	  FROM jsonb_array_elements(market.psp_claim('regress', 100)) j
	 WHERE (j ->> 'payment_id')::bigint >= 900000
$$;
CREATE FUNCTION pg_temp.last_attempt(pid bigint) RETURNS bigint LANGUAGE sql AS $$
	SELECT max(id) FROM market.payment_attempts WHERE payment_id = pid
$$;
CREATE FUNCTION pg_temp.record(pid bigint, outcome text, ref text DEFAULT NULL, code text DEFAULT NULL)
RETURNS int LANGUAGE sql AS $$
	SELECT market.psp_record('regress', jsonb_build_array(jsonb_build_object('attempt_id', pg_temp.last_attempt(pid),
		'outcome', outcome, 'psp_reference', ref, 'decline_code', code, 'http_status', 200)))
$$;
CREATE FUNCTION pg_temp.attempts(pid bigint) RETURNS text LANGUAGE sql AS $$
	SELECT string_agg(format('%s@%s:%s%s', t.operation, t.psp, t.outcome, coalesce('(' || t.error || ')', '')), ', ' ORDER BY t.id)
	  FROM market.payment_attempts t WHERE t.payment_id = pid
$$;
CREATE FUNCTION pg_temp.jobs(pid bigint) RETURNS text LANGUAGE sql AS $$
	SELECT string_agg(format('%s:%s', o.event_type, CASE WHEN o.acked_at IS NOT NULL THEN 'acked'
		WHEN o.dead_at IS NOT NULL THEN 'dead' ELSE 'open' END || coalesce('@' || a.name, '')), ', ' ORDER BY o.id)
	  FROM market.outbox o LEFT JOIN market.psp_accounts a ON a.id = (o.payload ->> 'account_id')::int
	 WHERE o.topic = 'psp' AND o.aggregate_id = pid
$$;
SELECT pg_temp.pay(900011, 1100, true), pg_temp.pay(900012, 1200, true), pg_temp.pay(900013, 1300, true),
	   pg_temp.pay(900014, 1400, true), pg_temp.pay(900015, 1500, true);
SELECT pg_temp.claim();

-- 900011: the webhook of the authorization in flight comes first: it settles
-- the worker's attempt and job; the worker's record of it is then ignored
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_11a', 'payment_intent.amount_capturable_updated',
	pg_temp.pi('pi_w11', 900011, 'requires_capture', 1100))));
SELECT pg_temp.record(900011, 'succeeded', 'pi_w11') AS recorded;
SELECT pg_temp.state(900011), pg_temp.attempts(900011), pg_temp.jobs(900011);
-- 900012: the worker records first; the webhook changes nothing
SELECT pg_temp.record(900012, 'succeeded', 'pi_w12') AS recorded;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_12a', 'payment_intent.amount_capturable_updated',
	pg_temp.pi('pi_w12', 900012, 'requires_capture', 1200))));
SELECT pg_temp.state(900012), pg_temp.attempts(900012), pg_temp.jobs(900012);
-- 900013: a hard decline by webhook while the call is in flight
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_13f', 'payment_intent.payment_failed',
	pg_temp.pi('pi_w13', 900013, 'requires_payment_method', 1300, decline => 'stolen_card'))));
SELECT pg_temp.record(900013, 'hard_decline', NULL, 'stolen_card') AS recorded;
SELECT pg_temp.state(900013), pg_temp.attempts(900013), pg_temp.jobs(900013);
-- 900014: a soft decline by webhook: the worker moves on to Adyen
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_14f', 'payment_intent.payment_failed',
	pg_temp.pi('pi_w14', 900014, 'requires_payment_method', 1400, decline => 'insufficient_funds'))));
SELECT pg_temp.record(900014, 'soft_decline', NULL, 'insufficient_funds') AS recorded;
-- 900015: Stripe's outcome unknown, the worker moves on to Adyen
SELECT pg_temp.record(900015, 'unknown') AS recorded;
SELECT pg_temp.claim();
SELECT pg_temp.state(900014), pg_temp.attempts(900014), pg_temp.jobs(900014);
-- Adyen authorizes 900015; Stripe's late success by webhook is voided by
-- the one reconcile job the worker queued
SELECT pg_temp.record(900015, 'succeeded', 'ADYW15') AS recorded;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_15a', 'payment_intent.amount_capturable_updated',
	pg_temp.pi('pi_w15', 900015, 'requires_capture', 1500))));
SELECT pg_temp.state(900015), pg_temp.attempts(900015), pg_temp.jobs(900015);
-- the cancellation of that late authorization changes nothing
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_15x', 'payment_intent.canceled',
	pg_temp.pi('pi_w15', 900015, 'canceled', 1500))));
-- 900011 shipped: the capture in flight, confirmed by webhook first
SELECT market.order_transition((SELECT o.id FROM market.orders o JOIN market.payments p ON p.group_id = o.group_id
								 WHERE p.id = 900011), 'shipped');
SELECT pg_temp.claim();
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_11c', 'payment_intent.succeeded',
	pg_temp.pi('pi_w11', 900011, 'succeeded', 1100, 1100))));
SELECT pg_temp.record(900011, 'succeeded', 'pi_w11') AS recorded;
SELECT pg_temp.state(900011), pg_temp.attempts(900011), pg_temp.jobs(900011);
-- 900012 shipped: the worker records the capture first; the webhook agrees
SELECT market.order_transition((SELECT o.id FROM market.orders o JOIN market.payments p ON p.group_id = o.group_id
								 WHERE p.id = 900012), 'shipped');
SELECT pg_temp.claim();
SELECT pg_temp.record(900012, 'succeeded', 'pi_w12') AS recorded;
SELECT pg_temp.ans(pg_temp.stripe(pg_temp.sev('evt_12c', 'payment_intent.succeeded',
	pg_temp.pi('pi_w12', 900012, 'succeeded', 1200, 1200))));
SELECT pg_temp.state(900012), pg_temp.attempts(900012), pg_temp.jobs(900012);
RESET market.psp_retry_base;
RESET market.psp_max_retries;

-- ---------------------------------------------------------------------------
-- providers, NULLs, the record, privileges
-- ---------------------------------------------------------------------------
SELECT pg_temp.try(s) FROM unnest(ARRAY[
	$$SELECT market.psp_webhook('worldpay', '{}', '{}')$$,
	$$SELECT market.psp_webhook('paypal', '{}', '{}')$$,
	$$SELECT market.psp_webhook('PayPal', '{"Paypal-Transmission-Sig": "x"}', '{"id": "WH-1"}')$$,
	$$SELECT market.psp_webhook(NULL, '{}', '{}')$$,
	$$SELECT market.psp_webhook('stripe', NULL, '{}')$$,
	$$SELECT market.psp_webhook('stripe', '{}', NULL)$$,
	$$SELECT market.psp_webhook_retry(424242)$$
]) AS s;
SELECT e.provider, e.event_type, e.kind, a.name AS account, e.payment_id, e.status, e.payment_status, e.note
  FROM market.psp_webhook_events e LEFT JOIN market.psp_accounts a ON a.id = e.psp_account_id
 ORDER BY e.id;
-- the constraints held throughout
SELECT count(*) FILTER (WHERE captured_minor > authorized_minor OR refunded_minor > captured_minor) AS broken
  FROM market.payments;
SELECT pg_temp.stripe_headers(:'ev_auth') AS h_auth \gset
SET ROLE market_app;
SELECT pg_temp.ans(market.psp_webhook('stripe', :'h_auth', :'ev_auth')) AS app_may;
SELECT market.psp_hmac_verify('k', 'd', 'm');                         -- 42501
SELECT market.psp_webhook_retry();                                    -- 42501
SELECT market.psp_webhook_apply(1);                                   -- 42501
SELECT count(*) FROM market.psp_webhook_events;                       -- 42501
RESET ROLE;
SET ROLE market_admin;
SELECT market.psp_webhook_retry() AS admin_may;
RESET ROLE;
SELECT has_function_privilege('public', 'market.psp_webhook(text, jsonb, text)', 'EXECUTE') AS public_may;

DROP SCHEMA wh_test CASCADE;
