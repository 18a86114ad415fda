-- ===========================================================================
-- market 0.2, part 40: carts, checkout, buy_now and idempotency keys
-- (docs/checkout.md).
--
-- The cart functions are SQL/PL/pgSQL: they are not on the hot path.
-- checkout_begin, checkout_complete, buy_now and idempotency_purge are C
-- (src/checkout.c) with saved SPI plans.
--
-- Lock order of this part (it extends the protocol of src/market.h):
--   cart row  ->  checkout row  ->  idempotency key  ->  reservation row  ->  slots
-- checkout_begin and cart_set_item lock the cart row first; checkout_complete
-- locks the checkout row first; buy_now starts at the idempotency key.
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Checkouts: a cart's lines frozen at checkout_begin (prices, quantities,
-- sellers) and the reservation that holds their units.  It lives as long as
-- the reservation.  status: open -> completed (checkout_complete) or
-- open -> abandoned (the cart changed, or a new checkout_begin found it
-- expired).  buy_now writes its checkout row already completed.
-- ---------------------------------------------------------------------------

CREATE TABLE market.checkouts (
	id				uuid PRIMARY KEY,
	cart_id			uuid REFERENCES market.carts (id),	-- NULL for buy_now
	customer_id		text NOT NULL,
	currency		text NOT NULL,
	reservation_id	uuid NOT NULL,
	status			text NOT NULL DEFAULT 'open'
		CHECK (status IN ('open', 'completed', 'abandoned')),
	-- the frozen lines, one element per SKU
	sku_ids			bigint[] NOT NULL,
	qtys			bigint[] NOT NULL,
	unit_prices		bigint[] NOT NULL,	-- price_minor of each SKU when checkout began
	seller_ids		bigint[] NOT NULL,
	total_minor		bigint NOT NULL CHECK (total_minor >= 0),
	created_at		timestamptz NOT NULL DEFAULT now(),
	expires_at		timestamptz NOT NULL,	-- the reservation's, when checkout began
	completed_at	timestamptz,
	group_id		bigint,					-- the order group, once completed
	CONSTRAINT checkouts_lines_shape CHECK (
		cardinality(sku_ids) >= 1
		AND cardinality(qtys) = cardinality(sku_ids)
		AND cardinality(unit_prices) = cardinality(sku_ids)
		AND cardinality(seller_ids) = cardinality(sku_ids)),
	CONSTRAINT checkouts_completed_has_group CHECK ((status = 'completed') = (group_id IS NOT NULL))
);
-- at most one open checkout per cart (and the lookup of it)
CREATE UNIQUE INDEX checkouts_one_open_per_cart ON market.checkouts (cart_id)
	WHERE status = 'open';

-- ---------------------------------------------------------------------------
-- Idempotency keys (Stripe's semantics), scoped to the customer.  The row is
-- inserted at the start of checkout_complete / buy_now, so a duplicate
-- request waits on it (unique index) until the first one ends; it gets the
-- response in the same transaction.  A failed request rolls its key back.
-- fingerprint: sha256 of the operation and its arguments.
-- ---------------------------------------------------------------------------

CREATE TABLE market.idempotency_keys (
	customer_id		text NOT NULL,
	key				text NOT NULL,
	operation		text NOT NULL CHECK (operation IN ('checkout_complete', 'buy_now')),
	fingerprint		bytea NOT NULL,
	response		jsonb,
	created_at		timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (customer_id, key)
) WITH (fillfactor = 80);	-- room for the response update to stay HOT
CREATE INDEX idempotency_keys_created_idx ON market.idempotency_keys (created_at);

REVOKE ALL ON market.checkouts, market.idempotency_keys FROM PUBLIC;
GRANT SELECT ON market.checkouts, market.idempotency_keys TO market_admin;

-- ---------------------------------------------------------------------------
-- Carts
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.cart_create(customer_id text, currency text DEFAULT 'USD')
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	new_id uuid := gen_random_uuid();
BEGIN
	IF customer_id IS NULL OR length(btrim(customer_id)) = 0 OR length(customer_id) > 200 THEN
		RAISE EXCEPTION 'invalid customer id'
			USING ERRCODE = 'MK020', DETAIL = 'A customer id is 1 to 200 characters, not blank.';
	END IF;
	IF currency IS NULL OR currency !~ '^[A-Z]{3}$' THEN
		RAISE EXCEPTION 'invalid currency code'
			USING ERRCODE = 'MK022', DETAIL = format('"%s" is not an ISO 4217 code.', coalesce(currency, 'NULL')),
				  HINT = 'Use three upper-case letters, such as USD or EUR.';
	END IF;
	INSERT INTO market.carts (id, customer_id, currency)
	VALUES (new_id, cart_create.customer_id, cart_create.currency);
	RETURN new_id;
END
$$;

-- cart_set_item sets the quantity of a SKU in a cart (0 removes the line)
-- and returns it.  Changing a cart that has an open checkout abandons that
-- checkout and releases its reservation: the next checkout_begin reserves
-- the cart as it is now, and completing the old checkout raises MK029.
CREATE FUNCTION market.cart_set_item(cart uuid, sku_id bigint, qty int)
RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	cart_currency text;
	sku_currency text;
	old_reservation uuid;
	nlines int;
BEGIN
	IF cart IS NULL THEN
		RAISE EXCEPTION 'cart must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF sku_id IS NULL THEN
		RAISE EXCEPTION 'sku_id must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF qty IS NULL OR qty < 0 OR qty > coalesce(current_setting('market.max_line_qty', true), '1000000')::int THEN
		RAISE EXCEPTION 'invalid quantity'
			USING ERRCODE = 'MK020',
				  DETAIL = format('The quantity was %s.', coalesce(qty::text, 'NULL')),
				  HINT = format('A quantity is a whole number from 0 (remove the line) to market.max_line_qty (%s).',
								coalesce(current_setting('market.max_line_qty', true), '1000000'));
	END IF;
	-- lock the cart row: serialises with checkout_begin on this cart
	UPDATE market.carts c SET updated_at = now() WHERE c.id = cart
	RETURNING c.currency INTO cart_currency;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown cart'
			USING ERRCODE = 'MK015', DETAIL = format('No cart has id %s.', cart);
	END IF;
	SELECT s.currency INTO sku_currency FROM market.skus s WHERE s.id = cart_set_item.sku_id;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown sku'
			USING ERRCODE = 'MK010', DETAIL = format('No SKU has id %s.', sku_id);
	END IF;
	IF sku_currency <> cart_currency THEN
		RAISE EXCEPTION 'currency mismatch'
			USING ERRCODE = 'MK026',
				  DETAIL = format('SKU %s is priced in %s; the cart is in %s.', sku_id, sku_currency, cart_currency),
				  HINT = 'A cart holds SKUs of its own currency only.';
	END IF;

	-- the cart changes: an open checkout of it is abandoned
	UPDATE market.checkouts c SET status = 'abandoned'
	 WHERE c.cart_id = cart AND c.status = 'open'
	RETURNING c.reservation_id INTO old_reservation;
	IF old_reservation IS NOT NULL
	   AND EXISTS (SELECT 1 FROM market.reservations r
				    WHERE r.id = old_reservation AND r.status = 'held') THEN
		PERFORM market.reservation_release(old_reservation);
	END IF;

	IF qty = 0 THEN
		DELETE FROM market.cart_items i WHERE i.cart_id = cart AND i.sku_id = cart_set_item.sku_id;
		RETURN 0;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM market.cart_items i
				    WHERE i.cart_id = cart AND i.sku_id = cart_set_item.sku_id) THEN
		SELECT count(*) INTO nlines FROM market.cart_items i WHERE i.cart_id = cart;
		IF nlines >= coalesce(current_setting('market.max_reservation_lines', true), '500')::int THEN
			RAISE EXCEPTION 'too many cart lines'
				USING ERRCODE = 'MK020',
					  DETAIL = format('The cart has %s lines; the limit is %s.', nlines,
									  coalesce(current_setting('market.max_reservation_lines', true), '500')),
					  HINT = 'See market.max_reservation_lines.';
		END IF;
	END IF;
	INSERT INTO market.cart_items AS i (cart_id, sku_id, qty)
	VALUES (cart, cart_set_item.sku_id, cart_set_item.qty)
	ON CONFLICT ON CONSTRAINT cart_items_pkey DO UPDATE SET qty = EXCLUDED.qty;
	RETURN qty;
END
$$;

-- cart_view: every line at the current price with its availability, the
-- subtotal per seller, the total (minor units) and the live checkout.
CREATE FUNCTION market.cart_view(cart uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	c market.carts;
	-- (the settings exist once the library is loaded; their defaults otherwise)
	low bigint := coalesce(current_setting('market.low_stock_threshold', true), '5')::bigint;
	lines jsonb;
	sellers jsonb;
	total bigint;
	live jsonb;
BEGIN
	IF cart IS NULL THEN
		RAISE EXCEPTION 'cart must not be null' USING ERRCODE = 'MK020';
	END IF;
	SELECT * INTO c FROM market.carts WHERE id = cart;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown cart'
			USING ERRCODE = 'MK015', DETAIL = format('No cart has id %s.', cart);
	END IF;

	WITH l AS (
		SELECT i.sku_id, k.sku_code, p.seller_id, i.qty, k.price_minor,
			   i.qty::bigint * k.price_minor AS line_total,
			   market.available(i.sku_id) AS avail
		  FROM market.cart_items i
		  JOIN market.skus k ON k.id = i.sku_id
		  JOIN market.products p ON p.id = k.product_id
		 WHERE i.cart_id = cart
	)
	SELECT coalesce(jsonb_agg(jsonb_build_object(
				'sku_id', l.sku_id, 'sku_code', l.sku_code, 'seller_id', l.seller_id,
				'qty', l.qty, 'unit_price_minor', l.price_minor, 'line_total_minor', l.line_total,
				'availability', CASE WHEN l.avail <= 0 THEN 'out_of_stock'
									 WHEN l.avail <= low THEN 'only_n_left'
									 ELSE 'in_stock' END)
			|| CASE WHEN l.avail > 0 AND l.avail <= low
					THEN jsonb_build_object('n', l.avail) ELSE '{}' END
			ORDER BY l.sku_id), '[]'),
		   coalesce(sum(l.line_total), 0)::bigint
	  INTO lines, total
	  FROM l;

	SELECT coalesce(jsonb_agg(jsonb_build_object('seller_id', s.seller_id, 'subtotal_minor', s.subtotal)
							  ORDER BY s.seller_id), '[]')
	  INTO sellers
	  FROM (SELECT p.seller_id, sum(i.qty::bigint * k.price_minor)::bigint AS subtotal
			  FROM market.cart_items i
			  JOIN market.skus k ON k.id = i.sku_id
			  JOIN market.products p ON p.id = k.product_id
			 WHERE i.cart_id = cart
			 GROUP BY p.seller_id) s;

	-- the live checkout: open, and its reservation still held and unexpired
	SELECT jsonb_build_object('checkout_id', co.id, 'expires_at', r.expires_at,
							  'total_minor', co.total_minor)
	  INTO live
	  FROM market.checkouts co
	  JOIN market.reservations r ON r.id = co.reservation_id
	 WHERE co.cart_id = cart AND co.status = 'open'
	   AND r.status = 'held' AND r.expires_at > clock_timestamp();

	RETURN jsonb_build_object('cart_id', c.id, 'customer_id', c.customer_id,
							  'currency', c.currency, 'lines', lines, 'sellers', sellers,
							  'total_minor', total, 'checkout', live);
END
$$;

-- ---------------------------------------------------------------------------
-- Checkout (C, src/checkout.c)
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.checkout_begin(cart uuid, ttl interval DEFAULT NULL)
RETURNS uuid
AS 'MODULE_PATHNAME', 'market_checkout_begin'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.checkout_complete(checkout uuid, idempotency_key text,
										 payment jsonb DEFAULT '{}',
										 customer_id text DEFAULT NULL)
RETURNS jsonb
AS 'MODULE_PATHNAME', 'market_checkout_complete'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.buy_now(customer_id text, items jsonb, idempotency_key text,
							   payment jsonb DEFAULT '{}', currency text DEFAULT 'USD')
RETURNS jsonb
AS 'MODULE_PATHNAME', 'market_buy_now'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.idempotency_purge(max int DEFAULT 10000)
RETURNS bigint
AS 'MODULE_PATHNAME', 'market_idempotency_purge'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION
	market.cart_create(text, text),
	market.cart_set_item(uuid, bigint, int),
	market.cart_view(uuid),
	market.checkout_begin(uuid, interval),
	market.checkout_complete(uuid, text, jsonb, text),
	market.buy_now(text, jsonb, text, jsonb, text),
	market.idempotency_purge(int)
FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
	market.cart_create(text, text),
	market.cart_set_item(uuid, bigint, int),
	market.cart_view(uuid),
	market.checkout_begin(uuid, interval),
	market.checkout_complete(uuid, text, jsonb, text),
	market.buy_now(text, jsonb, text, jsonb, text)
TO market_app, market_admin;

GRANT EXECUTE ON FUNCTION market.idempotency_purge(int) TO market_admin;
