--
-- webhooks: market.psp_webhook() verifies Stripe-Signature (with its
-- timestamp tolerance) and Adyen's item HMAC, deduplicates by (provider,
-- event id) and folds authorization events into pending payments only.
-- Expected signatures come from outside the extension: Stripe's from
-- pgcrypto's hmac() (itself checked against a value computed offline with
-- Perl's Digest::SHA), Adyen's are literals computed offline with Perl.
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
-- a Stripe event about the PaymentIntent pi_wh_1 of payment 900001
CREATE FUNCTION pg_temp.stripe_event(id text, type text, status text, amount int DEFAULT 1500)
RETURNS text LANGUAGE sql AS $$
	SELECT jsonb_build_object('id', id, 'object', 'event', 'type', type, 'created', 1700000000,
		'data', jsonb_build_object('object', jsonb_build_object('id', 'pi_wh_1', 'object', 'payment_intent',
			'status', status, 'amount', amount, 'amount_capturable', amount, 'currency', 'usd',
			'metadata', jsonb_build_object('reference', 'mk-pay-900001'))))::text
$$;

-- accounts with webhook secrets, and bad secrets refused
SELECT market.psp_register('stripe-wh', 'stripe', 'https://api.stripe.com',
	'{"secret_key": "sk_test_wh", "webhook_secret": "whsec_test_secret"}') > 0 AS stripe_wh;
SELECT market.psp_register('adyen-wh', 'adyen', 'https://checkout-test.adyen.com',
	'{"api_key": "AQE_wh", "merchant_account": "MarketMA", "hmac_key": "44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056"}') > 0 AS adyen_wh;
SELECT pg_temp.try(s) FROM unnest(ARRAY[
	$$SELECT market.psp_register('x', 'adyen', 'https://x.example', '{"api_key": "k", "merchant_account": "m", "hmac_key": "xyz"}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "sk_1", "webhook_secret": ""}')$$,
	$$SELECT market.psp_register('x', 'stripe', 'https://x.example', '{"secret_key": "sk_1", "hmac_key": "00"}')$$
]) AS s;

-- two pending payments with known ids (900001 for Stripe, 900002 for Adyen)
SELECT market.seller_create('Webhook Seller') AS seller \gset
CREATE FUNCTION pg_temp.pay(pid bigint, amount bigint) RETURNS void LANGUAGE plpgsql AS $$
DECLARE g bigint;
BEGIN
	INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
	VALUES (gen_random_uuid(), 'wh-customer', 'USD', amount) RETURNING id INTO g;
	INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
	VALUES (g, (SELECT id FROM market.sellers WHERE name = 'Webhook Seller'), 'wh-customer', 'USD', amount);
	INSERT INTO market.payments (id, group_id, customer_id, currency, amount_minor, method)
	OVERRIDING SYSTEM VALUE VALUES (pid, g, 'wh-customer', 'USD', amount, 'pm_card_visa');
END
$$;
SELECT pg_temp.pay(900001, 1500), pg_temp.pay(900002, 2500);
CREATE FUNCTION pg_temp.state(pid bigint) RETURNS text LANGUAGE sql AS $$
	SELECT format('%s %s %s | orders: %s', p.status, p.authorized_minor, coalesce(p.psp_reference, '-'),
		(SELECT string_agg(o.status, ',' ORDER BY o.id) FROM market.orders o WHERE o.group_id = p.group_id))
	  FROM market.payments p WHERE p.id = pid
$$;
SELECT pg_temp.state(900001), pg_temp.state(900002);

-- ---------------------------------------------------------------------------
-- Stripe
-- ---------------------------------------------------------------------------
SELECT pg_temp.stripe_event('evt_auth', 'payment_intent.amount_capturable_updated', 'requires_capture') AS ev_auth \gset
SELECT pg_temp.stripe_event('evt_created', 'payment_intent.created', 'requires_payment_method') AS ev_created \gset
SELECT pg_temp.stripe_event('evt_failed', 'payment_intent.payment_failed', 'requires_payment_method') AS ev_failed \gset
SELECT pg_temp.stripe_event('evt_succ', 'payment_intent.succeeded', 'succeeded') AS ev_succ \gset

-- bad signatures: tampered body, other secret, no header, garbled header
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
SELECT pg_temp.state(900001) AS untouched;

-- an older event arriving first: recorded, ignored
SELECT market.psp_webhook('stripe', pg_temp.stripe_headers(:'ev_created'), :'ev_created');
-- the authorization: processed, payment authorized, order confirmed
SELECT market.psp_webhook('stripe', pg_temp.stripe_headers(:'ev_auth'), :'ev_auth');
SELECT pg_temp.state(900001);
-- the same event again (a Stripe retry): duplicate, nothing changes
SELECT market.psp_webhook('stripe', pg_temp.stripe_headers(:'ev_auth'), :'ev_auth');
-- a failure event arriving late: ignored, the payment does not move back
SELECT market.psp_webhook('stripe', pg_temp.stripe_headers(:'ev_failed'), :'ev_failed');
-- a second authorization-type event: processed, nothing to change
SELECT market.psp_webhook('stripe', pg_temp.stripe_headers(:'ev_succ'), :'ev_succ');
SELECT pg_temp.state(900001);

-- the tolerance is a setting: 301 s old passes with 600
SET market.psp_webhook_tolerance = 600;
SELECT pg_temp.stripe_event('evt_late', 'payment_intent.created', 'requires_payment_method') AS ev_late \gset
SELECT market.psp_webhook('stripe', pg_temp.stripe_headers(:'ev_late', extract(epoch FROM now())::bigint - 301), :'ev_late');
RESET market.psp_webhook_tolerance;

-- malformed bodies, correctly signed
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe',
		pg_temp.stripe_headers('not json'), 'not json'));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe',
		pg_temp.stripe_headers('{"id": 7, "type": "x"}'), '{"id": 7, "type": "x"}'));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'stripe',
		pg_temp.stripe_headers('[1]'), '[1]'));

-- ---------------------------------------------------------------------------
-- Adyen (signatures computed offline with Perl's Digest::SHA)
-- ---------------------------------------------------------------------------
\set ady_ok '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"pspReference": "ADY0001", "merchantAccountCode": "MarketMA", "merchantReference": "mk-pay-900002", "amount": {"value": 2500, "currency": "USD"}, "eventCode": "AUTHORISATION", "success": "true", "additionalData": {"hmacSignature": "RNYbbxJ/LdcN6lCnRDin8LvM+7zlIh0BNAa64TN5N48="}}}]}'
\set ady_fail '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"pspReference": "ADY0001", "merchantAccountCode": "MarketMA", "merchantReference": "mk-pay-900002", "amount": {"value": 2500, "currency": "USD"}, "eventCode": "AUTHORISATION", "success": "false", "additionalData": {"hmacSignature": "DvouagavMYPj2a5yxt2vObZah0tGMBSkFMyLUi0UtAM="}}}]}'
-- tampered amount under the good signature; the good signature on the other success value
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'adyen', '{}',
		replace(:'ady_ok', '"value": 2500', '"value": 2600')));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'adyen', '{}',
		replace(:'ady_ok', '"success": "true"', '"success": "false"')));
SELECT pg_temp.try(format('SELECT market.psp_webhook(%L, %L, %L)', 'adyen', '{}',
		replace(:'ady_ok', '"additionalData": {"hmacSignature": "RNYbbxJ/LdcN6lCnRDin8LvM+7zlIh0BNAa64TN5N48="}', '"x": 1')));
SELECT pg_temp.state(900002) AS untouched;
-- the authorization, then a duplicate, then an older failure (another event id): harmless
SELECT market.psp_webhook('adyen', '{}', :'ady_ok');
SELECT pg_temp.state(900002);
SELECT market.psp_webhook('Adyen', '{}', :'ady_ok');
SELECT market.psp_webhook('adyen', '{}', :'ady_fail');
SELECT pg_temp.state(900002);
-- malformed
SELECT pg_temp.try(s) FROM unnest(ARRAY[
	$$SELECT market.psp_webhook('adyen', '{}', '{"live": "false"')$$,
	$$SELECT market.psp_webhook('adyen', '{}', '{"live": "false", "notificationItems": []}')$$,
	$$SELECT market.psp_webhook('adyen', '{}', '{"notificationItems": [{"NotificationRequestItem": {"eventCode": "AUTHORISATION"}}]}')$$,
	$$SELECT market.psp_webhook('adyen', '[]', '{}')$$
]) AS s;

-- the worker left an authorization unknown at Stripe; Adyen's webhook wins:
-- the Stripe attempt gets a reconcile job, the winner none
\set ady_3 '{"live": "false", "notificationItems": [{"NotificationRequestItem": {"pspReference": "ADY0003", "merchantAccountCode": "MarketMA", "merchantReference": "mk-pay-900003", "amount": {"value": 3500, "currency": "USD"}, "eventCode": "AUTHORISATION", "success": "true", "additionalData": {"hmacSignature": "pooEuZ4cSuAYqBxLja8KRoBxStZtbUdP4mO2W0ZKeJ4="}}}]}'
SELECT pg_temp.pay(900003, 3500);
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
VALUES ('psp', 'payment.authorize', 'payment', 900003, '{"payment_id": 900003}') RETURNING id AS ob3 \gset
INSERT INTO market.payment_attempts (payment_id, outbox_id, psp_account_id, psp, operation,
	idempotency_key, amount_minor, outcome)
VALUES (900003, :ob3, (SELECT id FROM market.psp_accounts WHERE name = 'stripe-wh'), 'stripe-wh',
	'authorize', 'mk-900003-test', 3500, 'unknown');
SELECT market.psp_webhook('adyen', '{}', :'ady_3');
SELECT pg_temp.state(900003);
SELECT a.name AS reconcile_at, (o.payload ->> 'authorize_outbox_id')::bigint = :ob3 AS of_that_job
  FROM market.outbox o JOIN market.psp_accounts a ON a.id = (o.payload ->> 'account_id')::int
 WHERE o.event_type = 'payment.reconcile' AND o.aggregate_id = 900003;

-- ---------------------------------------------------------------------------
-- providers, NULLs, the record, privileges
-- ---------------------------------------------------------------------------
SELECT pg_temp.try(s) FROM unnest(ARRAY[
	$$SELECT market.psp_webhook('worldpay', '{}', '{}')$$,
	$$SELECT market.psp_webhook('paypal', '{}', '{}')$$,
	$$SELECT market.psp_webhook(NULL, '{}', '{}')$$,
	$$SELECT market.psp_webhook('stripe', NULL, '{}')$$,
	$$SELECT market.psp_webhook('stripe', '{}', NULL)$$
]) AS s;
SELECT e.provider, e.event_id, e.event_type, a.name AS account, e.payment_id, e.status, e.note
  FROM market.psp_webhook_events e LEFT JOIN market.psp_accounts a ON a.id = e.psp_account_id
 ORDER BY e.id;
SELECT pg_temp.stripe_headers(:'ev_auth') AS h_auth \gset
SET ROLE market_app;
SELECT market.psp_webhook('stripe', :'h_auth', :'ev_auth');
SELECT market.psp_hmac_verify('k', 'd', 'm');                         -- 42501
SELECT count(*) FROM market.psp_webhook_events;                       -- 42501
RESET ROLE;
SELECT has_function_privilege('public', 'market.psp_webhook(text, jsonb, text)', 'EXECUTE') AS public_may;

DROP SCHEMA wh_test CASCADE;
