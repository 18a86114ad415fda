-- ===========================================================================
-- market 0.2: carts, checkout, orders, payments-to-be and the outbox.
--
-- This directory is concatenated, in file-name order, into
-- sql/market--0.1--0.2.sql by the Makefile.  CREATE EXTENSION market (0.2)
-- runs market--0.1.sql and then that update script, so a fresh install and
-- an upgraded 0.1 database end up with the same objects.
--
-- This part holds the tables that several parts share.
-- ===========================================================================

-- ---------------------------------------------------------------------------
-- Carts (owned by the cart/checkout part)
-- ---------------------------------------------------------------------------

CREATE TABLE market.carts (
	id			uuid PRIMARY KEY,
	customer_id text NOT NULL CHECK (length(customer_id) BETWEEN 1 AND 200),
	currency	text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
	created_at	timestamptz NOT NULL DEFAULT now(),
	updated_at	timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX carts_customer_idx ON market.carts (customer_id);

CREATE TABLE market.cart_items (
	cart_id		uuid NOT NULL REFERENCES market.carts (id) ON DELETE CASCADE,
	sku_id		bigint NOT NULL REFERENCES market.skus (id),
	qty			int NOT NULL CHECK (qty > 0),
	added_at	timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (cart_id, sku_id)
);

-- ---------------------------------------------------------------------------
-- Orders.  One order group per completed checkout (UNIQUE checkout_id: the
-- constraint that makes "exactly one order group per checkout" hold whatever
-- retries or races happen), one order per seller in it.
-- ---------------------------------------------------------------------------

CREATE TABLE market.order_groups (
	id			 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	checkout_id  uuid NOT NULL,
	customer_id  text NOT NULL,
	currency	 text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
	total_minor  bigint NOT NULL CHECK (total_minor >= 0),
	created_at	 timestamptz NOT NULL DEFAULT now(),
	CONSTRAINT order_groups_one_per_checkout UNIQUE (checkout_id)
);
CREATE INDEX order_groups_customer_idx ON market.order_groups (customer_id);

-- status moves only along the graph of docs/orders.md; a C trigger
-- (src/orders.c) enforces it on every UPDATE, whoever writes.
CREATE TABLE market.orders (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	group_id		bigint NOT NULL REFERENCES market.order_groups (id),
	seller_id		bigint NOT NULL REFERENCES market.sellers (id),
	customer_id		text NOT NULL,
	currency		text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
	subtotal_minor	bigint NOT NULL CHECK (subtotal_minor >= 0),
	status			text NOT NULL DEFAULT 'created',
	created_at		timestamptz NOT NULL DEFAULT now(),
	updated_at		timestamptz NOT NULL DEFAULT now(),
	CONSTRAINT orders_one_per_seller UNIQUE (group_id, seller_id)
);
CREATE INDEX orders_seller_idx ON market.orders (seller_id);

-- What an order sold: qty units of a SKU out of one warehouse, at the price
-- frozen when checkout began.
CREATE TABLE market.order_lines (
	order_id		 bigint NOT NULL REFERENCES market.orders (id),
	sku_id			 bigint NOT NULL REFERENCES market.skus (id),
	warehouse_id	 int NOT NULL REFERENCES market.warehouses (id),
	qty				 bigint NOT NULL CHECK (qty > 0),
	unit_price_minor bigint NOT NULL CHECK (unit_price_minor >= 0),
	PRIMARY KEY (order_id, sku_id, warehouse_id)
);

-- Every status change of an order, written in the same transaction by the
-- trigger: from_status is NULL for the creation row.
CREATE TABLE market.order_events (
	id			bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	order_id	bigint NOT NULL REFERENCES market.orders (id),
	from_status text,
	to_status	text NOT NULL,
	at			timestamptz NOT NULL DEFAULT clock_timestamp(),
	actor		name NOT NULL DEFAULT session_user,
	note		text
);
CREATE INDEX order_events_order_idx ON market.order_events (order_id, id);

-- ---------------------------------------------------------------------------
-- Payments: one per order group.  Checkout records it as 'pending' and
-- queues its authorization in the outbox; the PSP worker of the payments
-- release moves it on.  captured <= authorized and refunded <= captured
-- always.
-- ---------------------------------------------------------------------------

CREATE TABLE market.payments (
	id				 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	group_id		 bigint NOT NULL REFERENCES market.order_groups (id),
	customer_id		 text NOT NULL,
	currency		 text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
	amount_minor	 bigint NOT NULL CHECK (amount_minor >= 0),
	method			 text,
	psp				 text,
	status			 text NOT NULL DEFAULT 'pending'
		CHECK (status IN ('pending', 'authorized', 'failed', 'voided',
						  'captured', 'refunded')),
	authorized_minor bigint NOT NULL DEFAULT 0 CHECK (authorized_minor >= 0),
	captured_minor	 bigint NOT NULL DEFAULT 0 CHECK (captured_minor >= 0),
	refunded_minor	 bigint NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0),
	created_at		 timestamptz NOT NULL DEFAULT now(),
	updated_at		 timestamptz NOT NULL DEFAULT now(),
	CONSTRAINT payments_one_per_group UNIQUE (group_id),
	CONSTRAINT payments_captured_le_authorized CHECK (captured_minor <= authorized_minor),
	CONSTRAINT payments_refunded_le_captured CHECK (refunded_minor <= captured_minor)
);

-- ---------------------------------------------------------------------------
-- The transactional outbox (owned by the outbox part).  A row is written in
-- the same transaction as the change that causes it.  topic 'psp' rows are
-- PSP jobs (the payments release's worker consumes them); topic 'events'
-- rows are domain events (order.created, order.confirmed, ...) for external
-- consumers.  Rows of one aggregate are delivered in id order.
-- ---------------------------------------------------------------------------

CREATE TABLE market.outbox (
	id				bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	topic			text NOT NULL CHECK (topic IN ('events', 'psp')),
	event_type		text NOT NULL CHECK (length(event_type) BETWEEN 1 AND 100),
	aggregate_type	text NOT NULL CHECK (length(aggregate_type) BETWEEN 1 AND 50),
	aggregate_id	bigint NOT NULL,
	payload			jsonb NOT NULL DEFAULT '{}',
	created_at		timestamptz NOT NULL DEFAULT clock_timestamp(),
	attempts		int NOT NULL DEFAULT 0,
	lease_owner		text,
	lease_until		timestamptz,
	acked_at		timestamptz,
	dead_at			timestamptz,
	last_error		text
);
-- the rows still to deliver, per aggregate in order
CREATE INDEX outbox_pending_idx ON market.outbox (topic, aggregate_type, aggregate_id, id)
	WHERE acked_at IS NULL AND dead_at IS NULL;
CREATE INDEX outbox_acked_idx ON market.outbox (acked_at) WHERE acked_at IS NOT NULL;

REVOKE ALL ON market.carts, market.cart_items, market.order_groups, market.orders,
	market.order_lines, market.order_events, market.payments, market.outbox FROM PUBLIC;
GRANT SELECT ON market.carts, market.cart_items, market.order_groups, market.orders,
	market.order_lines, market.order_events, market.payments, market.outbox TO market_admin;
