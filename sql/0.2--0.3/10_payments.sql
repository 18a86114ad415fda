-- ===========================================================================
-- market 0.3: payments through PSPs (docs/payments.md).
--
-- This directory is concatenated, in file-name order, into
-- sql/market--0.2--0.3.sql by the Makefile.
--
-- What this part holds:
--   market.psp_accounts      the PSP accounts; credentials are readable by
--                            the owner only (no column grant to any role),
--                            so only the worker and definer functions see
--                            them
--   market.payment_attempts  one row per PSP call (and one per logical
--                            operation written before the call is made)
--   market.payments          new columns (ALTER of the shared table)
--   psp_register, payment_view, psp_status        the API
--   psp_claim, psp_record                          the worker's two
--                            transactions (src/psp_worker.c); no role may
--                            call them
--
-- The worker's cycle: psp_claim (one short transaction) claims 'psp' outbox
-- rows, decides per row which account and which operation, writes the
-- attempt row 'pending' (the intent) and returns the jobs; the worker calls
-- the PSPs outside any transaction; psp_record (a second transaction)
-- writes the outcomes, moves payments and orders, and acks, reschedules or
-- dead-letters each row.  A crash anywhere leaves a 'pending' attempt whose
-- row is claimed again and replayed with the same idempotency key.
--
-- SQLSTATEs of this part (docs/payments.md): MK070 unknown PSP kind, MK071
-- bad base URL, MK072 missing or bad credentials, MK073 PSP account exists,
-- MK074 unknown PSP account, MK075 unknown payment, MK076 bad priority or
-- options, MK077 webhook signature invalid, MK078 capture above the
-- authorization, MK079 refund above the capture.
-- ===========================================================================

CREATE TABLE market.psp_accounts (
	id			int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	name		text NOT NULL CHECK (name ~ '^[A-Za-z0-9_.-]{1,64}$'),
	kind		text NOT NULL CHECK (kind IN ('stripe', 'adyen', 'paypal')),
	base_url	text NOT NULL,
	credentials jsonb NOT NULL,
	priority	int NOT NULL DEFAULT 100 CHECK (priority BETWEEN 0 AND 1000000),
	options		jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(options) = 'object'),
	enabled		boolean NOT NULL DEFAULT true,
	created_at	timestamptz NOT NULL DEFAULT now(),
	CONSTRAINT psp_accounts_name_unique UNIQUE (name)
);

-- One row per PSP call.  The worker writes the row of a logical operation
-- as 'pending' before it calls (its intent), and fills it in afterwards;
-- intermediate calls (a PayPal order before its authorization, the void of
-- a late authorization) get rows of their own.
CREATE TABLE market.payment_attempts (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	payment_id		bigint NOT NULL REFERENCES market.payments (id),
	order_id		bigint,
	outbox_id		bigint,
	psp_account_id	int REFERENCES market.psp_accounts (id),
	psp				text NOT NULL,
	operation		text NOT NULL
		CHECK (operation IN ('authorize', 'capture', 'void', 'refund', 'create_order', 'token')),
	idempotency_key text,
	amount_minor	bigint,
	request			text,
	http_status		int,
	outcome			text NOT NULL DEFAULT 'pending'
		CHECK (outcome IN ('pending', 'succeeded', 'hard_decline', 'soft_decline', 'rejected',
						   'unreachable', 'unknown', 'skipped')),
	decline_code	text,
	psp_reference	text,
	latency_ms		double precision,
	error			text,
	started_at		timestamptz NOT NULL DEFAULT clock_timestamp(),
	finished_at		timestamptz
);
CREATE INDEX payment_attempts_payment_idx ON market.payment_attempts (payment_id, id);
CREATE INDEX payment_attempts_outbox_idx ON market.payment_attempts (outbox_id, id);
CREATE INDEX payment_attempts_recent_idx ON market.payment_attempts (started_at);

-- (ALTER of the shared table market.payments) the account that holds the
-- authorization, its reference there, the last capture's reference (PayPal
-- refunds a capture), the last decline and error.
ALTER TABLE market.payments
	ADD COLUMN psp_account_id int REFERENCES market.psp_accounts (id),
	ADD COLUMN psp_reference text,
	ADD COLUMN psp_capture_reference text,
	ADD COLUMN decline_code text,
	ADD COLUMN last_error text;

REVOKE ALL ON market.psp_accounts, market.payment_attempts FROM PUBLIC;
-- every column but the credentials
GRANT SELECT (id, name, kind, base_url, priority, options, enabled, created_at)
	ON market.psp_accounts TO market_admin;
GRANT SELECT ON market.payment_attempts TO market_admin;

-- ---------------------------------------------------------------------------
-- psp_register: add a PSP account.  Every argument is checked; errors never
-- show a credential's value.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_register(name text, kind text, base_url text, credentials jsonb,
	priority int DEFAULT 100, options jsonb DEFAULT '{}')
RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_name text := psp_register.name;
	v_kind text := psp_register.kind;
	v_url text := psp_register.base_url;
	v_cred jsonb := psp_register.credentials;
	v_prio int := psp_register.priority;
	v_opts jsonb := psp_register.options;
	v_host text;
	v_need text[];
	v_key text;
	v_opt text;
	v_id int;
BEGIN
	IF v_name IS NULL OR v_kind IS NULL OR v_url IS NULL OR v_cred IS NULL
	   OR v_prio IS NULL OR v_opts IS NULL THEN
		RAISE EXCEPTION 'psp_register arguments must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF v_name !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
		RAISE EXCEPTION 'invalid PSP account name'
			USING ERRCODE = 'MK020',
				  DETAIL = 'A name is 1 to 64 letters, digits, ".", "_" or "-".';
	END IF;
	IF v_kind NOT IN ('stripe', 'adyen', 'paypal') THEN
		RAISE EXCEPTION 'unknown PSP kind "%"', left(v_kind, 50)
			USING ERRCODE = 'MK070', HINT = 'The kinds are stripe, adyen and paypal.';
	END IF;

	-- the API root: http(s)://host[:port][/path], no user, query or fragment;
	-- plain http only to a loopback host (a local test server)
	v_url := rtrim(v_url, '/');
	IF length(v_url) > 500
	   OR v_url !~ '^https?://(\[[0-9A-Fa-f:]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$' THEN
		RAISE EXCEPTION 'invalid PSP base URL'
			USING ERRCODE = 'MK071',
				  DETAIL = format('"%s" is not an http(s) URL of the form scheme://host[:port][/path].', left(v_url, 100)),
				  HINT = 'Give the API root, e.g. https://api.stripe.com; the adapter appends the paths.';
	END IF;
	v_host := substring(v_url FROM '^https?://(\[[^]]+\]|[^:/]+)');
	IF (substring(v_url FROM ':([0-9]{1,5})(/|$)'))::int NOT BETWEEN 1 AND 65535 THEN
		RAISE EXCEPTION 'invalid PSP base URL'
			USING ERRCODE = 'MK071', DETAIL = 'The port must be between 1 and 65535.';
	END IF;
	IF v_url LIKE 'http://%' AND lower(v_host) NOT IN ('127.0.0.1', 'localhost', '[::1]') THEN
		RAISE EXCEPTION 'invalid PSP base URL'
			USING ERRCODE = 'MK071', DETAIL = 'Plain http is only allowed to a loopback host.',
				  HINT = 'Use https.';
	END IF;

	-- credentials per kind: exactly these members, each a non-empty string
	IF jsonb_typeof(v_cred) <> 'object' THEN
		RAISE EXCEPTION 'invalid PSP credentials'
			USING ERRCODE = 'MK072', DETAIL = 'Credentials must be a JSON object.';
	END IF;
	v_need := CASE v_kind
		WHEN 'stripe' THEN ARRAY['secret_key']
		WHEN 'adyen' THEN ARRAY['api_key', 'merchant_account']
		ELSE ARRAY['client_id', 'client_secret'] END;
	FOREACH v_key IN ARRAY v_need LOOP
		IF jsonb_typeof(v_cred -> v_key) IS DISTINCT FROM 'string'
		   OR length(v_cred ->> v_key) NOT BETWEEN 1 AND 500
		   OR (v_cred ->> v_key) ~ '[[:space:][:cntrl:]]' THEN
			RAISE EXCEPTION 'missing PSP credential "%"', v_key
				USING ERRCODE = 'MK072',
					  DETAIL = format('A %s account needs %s, each a non-empty string without spaces.',
									  v_kind, array_to_string(v_need, ' and ')),
					  HINT = 'The credentials'' values are never shown in messages.';
		END IF;
	END LOOP;
	-- the optional webhook secret (20_webhooks.sql): Stripe's signing
	-- secret, Adyen's HMAC key in hex
	v_opt := CASE v_kind WHEN 'stripe' THEN 'webhook_secret' WHEN 'adyen' THEN 'hmac_key' END;
	SELECT k INTO v_key FROM jsonb_object_keys(v_cred) k
	 WHERE k <> ALL (v_need) AND k IS DISTINCT FROM v_opt LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION 'unexpected PSP credential "%"', left(v_key, 50)
			USING ERRCODE = 'MK072',
				  DETAIL = format('A %s account takes only %s%s.', v_kind, array_to_string(v_need, ' and '),
								  coalesce(' (and optionally ' || v_opt || ')', ''));
	END IF;
	IF v_opt IS NOT NULL AND v_cred ? v_opt
	   AND (jsonb_typeof(v_cred -> v_opt) <> 'string'
			OR length(v_cred ->> v_opt) NOT BETWEEN 1 AND 500
			OR (v_cred ->> v_opt) ~ '[[:space:][:cntrl:]]'
			OR (v_opt = 'hmac_key' AND (v_cred ->> v_opt) !~ '^([0-9A-Fa-f]{2})+$')) THEN
		RAISE EXCEPTION 'invalid PSP credential "%"', v_opt
			USING ERRCODE = 'MK072',
				  DETAIL = CASE v_opt WHEN 'hmac_key' THEN 'hmac_key is the Adyen HMAC key in hexadecimal.'
						   ELSE 'webhook_secret is a non-empty string without spaces.' END;
	END IF;
	IF v_kind = 'stripe' AND (v_cred ->> 'secret_key') !~ '^(sk|rk)_' THEN
		RAISE EXCEPTION 'invalid PSP credential "secret_key"'
			USING ERRCODE = 'MK072', DETAIL = 'A Stripe secret key starts with sk_ or rk_.';
	END IF;

	IF v_prio NOT BETWEEN 0 AND 1000000 THEN
		RAISE EXCEPTION 'PSP priority out of range'
			USING ERRCODE = 'MK076', DETAIL = format('priority is %s; it must be between 0 and 1000000.', v_prio);
	END IF;
	IF jsonb_typeof(v_opts) <> 'object' THEN
		RAISE EXCEPTION 'invalid PSP options'
			USING ERRCODE = 'MK076', DETAIL = 'Options must be a JSON object.';
	END IF;
	SELECT k INTO v_key FROM jsonb_object_keys(v_opts) k WHERE k <> ALL (ARRAY['timeout_ms']) LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION 'unknown PSP option "%"', left(v_key, 50)
			USING ERRCODE = 'MK076', HINT = 'The only option is timeout_ms.';
	END IF;
	IF v_opts ? 'timeout_ms' AND (jsonb_typeof(v_opts -> 'timeout_ms') <> 'number'
		OR (v_opts ->> 'timeout_ms') !~ '^[0-9]+$'
		OR (v_opts ->> 'timeout_ms')::numeric NOT BETWEEN 100 AND 300000) THEN
		RAISE EXCEPTION 'invalid PSP option "timeout_ms"'
			USING ERRCODE = 'MK076', DETAIL = 'timeout_ms is a whole number of milliseconds between 100 and 300000.';
	END IF;

	BEGIN
		INSERT INTO market.psp_accounts (name, kind, base_url, credentials, priority, options)
		VALUES (v_name, v_kind, v_url, v_cred, v_prio, v_opts)
		RETURNING id INTO v_id;
	EXCEPTION WHEN unique_violation THEN
		RAISE EXCEPTION 'PSP account "%" already exists', v_name USING ERRCODE = 'MK073';
	END;
	RETURN v_id;
END
$$;

-- ---------------------------------------------------------------------------
-- psp_set_enabled: take an account out of (or back into) rotation.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.psp_set_enabled(name text, enabled boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	IF psp_set_enabled.name IS NULL OR psp_set_enabled.enabled IS NULL THEN
		RAISE EXCEPTION 'name and enabled must not be null' USING ERRCODE = 'MK020';
	END IF;
	UPDATE market.psp_accounts a SET enabled = psp_set_enabled.enabled
	 WHERE a.name = psp_set_enabled.name;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown PSP account "%"', left(psp_set_enabled.name, 64) USING ERRCODE = 'MK074';
	END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- payment_view: a payment with every attempt, no credentials.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.payment_view(payment_id bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	p market.payments;
BEGIN
	IF payment_view.payment_id IS NULL THEN
		RAISE EXCEPTION 'payment_id must not be null' USING ERRCODE = 'MK020';
	END IF;
	SELECT * INTO p FROM market.payments WHERE id = payment_view.payment_id;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown payment'
			USING ERRCODE = 'MK075', DETAIL = format('No payment has id %s.', payment_view.payment_id);
	END IF;
	RETURN jsonb_build_object(
		'payment_id', p.id,
		'group_id', p.group_id,
		'customer_id', p.customer_id,
		'status', p.status,
		'currency', p.currency,
		'amount_minor', p.amount_minor,
		'authorized_minor', p.authorized_minor,
		'captured_minor', p.captured_minor,
		'refunded_minor', p.refunded_minor,
		'method', p.method,
		'psp', p.psp,
		'account', (SELECT a.name FROM market.psp_accounts a WHERE a.id = p.psp_account_id),
		'psp_reference', p.psp_reference,
		'decline_code', p.decline_code,
		'last_error', p.last_error,
		'created_at', p.created_at,
		'updated_at', p.updated_at,
		'attempts', coalesce((
			SELECT jsonb_agg(jsonb_build_object(
						'id', t.id,
						'operation', t.operation,
						'account', t.psp,
						'order_id', t.order_id,
						'idempotency_key', t.idempotency_key,
						'amount_minor', t.amount_minor,
						'request', t.request,
						'http_status', t.http_status,
						'outcome', t.outcome,
						'decline_code', t.decline_code,
						'psp_reference', t.psp_reference,
						'latency_ms', round(t.latency_ms::numeric, 1),
						'error', t.error,
						'started_at', t.started_at,
						'finished_at', t.finished_at)
					ORDER BY t.id)
			  FROM market.payment_attempts t
			 WHERE t.payment_id = p.id), '[]'::jsonb));
END
$$;
