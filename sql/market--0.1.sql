/*
 * market 0.1: catalog minimum, stock in slots, reservations with a TTL,
 * the stock ledger and the inventory audit.
 *
 * Privilege model: PUBLIC gets nothing.  market_app may call the
 * reservation API; market_admin manages the catalog and stock and may read
 * every table.  Nobody but the extension owner writes a table directly:
 * every write goes through a SECURITY DEFINER function with a pinned
 * search_path.
 */

\echo Use "CREATE EXTENSION market" to load this file. \quit

DO $roles$
BEGIN
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'market_admin') THEN
		CREATE ROLE market_admin NOLOGIN;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'market_app') THEN
		CREATE ROLE market_app NOLOGIN;
	END IF;
END
$roles$;

REVOKE ALL ON SCHEMA market FROM PUBLIC;
GRANT USAGE ON SCHEMA market TO market_admin, market_app;

-- ---------------------------------------------------------------------------
-- Catalog
-- ---------------------------------------------------------------------------

CREATE TABLE market.sellers (
	id			bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	name		text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
	created_at	timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE market.products (
	id			bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	seller_id	bigint NOT NULL REFERENCES market.sellers (id),
	title		text NOT NULL CHECK (length(title) BETWEEN 1 AND 500),
	description text NOT NULL DEFAULT '',
	brand		text,
	category	text CHECK (category ~ '^[a-z0-9_-]+(/[a-z0-9_-]+)*$'),
	attributes	jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(attributes) = 'object'),
	created_at	timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX products_seller_idx ON market.products (seller_id);

CREATE TABLE market.skus (
	id			bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	product_id	bigint NOT NULL REFERENCES market.products (id),
	sku_code	text NOT NULL UNIQUE CHECK (length(sku_code) BETWEEN 1 AND 100),
	price_minor bigint NOT NULL CHECK (price_minor >= 0),
	currency	text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
	attributes	jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(attributes) = 'object'),
	created_at	timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX skus_product_idx ON market.skus (product_id);

CREATE TABLE market.warehouses (
	id			int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	code		text NOT NULL UNIQUE CHECK (length(code) BETWEEN 1 AND 64),
	name		text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
	priority	int NOT NULL DEFAULT 100,
	created_at	timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------
-- Inventory
--
-- stock holds one row per (SKU, warehouse) and says how many slots its units
-- are spread over.  stock_slots holds the counters: on_hand (units physically
-- there) and free (units neither reserved nor sold).  on_hand - free is what
-- live reservations hold in that slot.  The SKU's on-hand in a warehouse is
-- the sum over its slots.  Slots are updated in place and kept HOT-friendly
-- (no indexed column changes, fillfactor 50).
-- ---------------------------------------------------------------------------

CREATE TABLE market.stock (
	sku_id		 bigint NOT NULL REFERENCES market.skus (id),
	warehouse_id int NOT NULL REFERENCES market.warehouses (id),
	slots		 int NOT NULL CHECK (slots BETWEEN 1 AND 1024),
	created_at	 timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (sku_id, warehouse_id)
);
CREATE INDEX stock_warehouse_idx ON market.stock (warehouse_id);

CREATE TABLE market.stock_slots (
	sku_id		 bigint NOT NULL,
	warehouse_id int NOT NULL,
	slot		 int NOT NULL,
	on_hand		 bigint NOT NULL,
	free		 bigint NOT NULL,
	-- the one CHECK of the hot path: 0 <= free <= on_hand (so on_hand >= 0 too).
	-- PostgreSQL re-reads a table's CHECK constraints for every statement that
	-- writes it, so the rest of the shape is left to verify_inventory().
	CONSTRAINT stock_slots_counters_check CHECK (free >= 0 AND free <= on_hand),
	PRIMARY KEY (sku_id, warehouse_id, slot),
	FOREIGN KEY (sku_id, warehouse_id) REFERENCES market.stock (sku_id, warehouse_id)
) WITH (fillfactor = 50);

-- A reservation keeps its lines in parallel arrays: one row per reservation
-- is one insert and one index entry on the hot path.  Line i took qtys[i]
-- units of sku_ids[i] from slot slots[i] of warehouse warehouse_ids[i].
-- slots[i] = -1 marks a line of an expired reservation whose units were
-- already given back early (see market_reclaim_expired in src/inventory.c).
-- Only the extension's C code writes this table, on the hottest path, so its
-- shape (a known status, finished_at set exactly when not held, four arrays
-- of one length) is checked by verify_inventory() rather than by CHECK
-- constraints, which PostgreSQL would re-read on every insert and update.
CREATE TABLE market.reservations (
	id			  uuid PRIMARY KEY,
	owner		  text,
	status		  text NOT NULL DEFAULT 'held',
	created_at	  timestamptz NOT NULL,
	expires_at	  timestamptz NOT NULL,
	finished_at	  timestamptz,
	sku_ids		  bigint[] NOT NULL,
	warehouse_ids int[] NOT NULL,
	slots		  int[] NOT NULL,
	qtys		  bigint[] NOT NULL
);
CREATE INDEX reservations_live_expiry_idx ON market.reservations (expires_at)
	WHERE status = 'held';
CREATE INDEX reservations_finished_idx ON market.reservations (finished_at)
	WHERE status <> 'held';

CREATE VIEW market.reservation_lines AS
	SELECT r.id AS reservation_id, r.owner, r.status, r.expires_at,
		   l.sku_id, l.warehouse_id, l.slot, l.qty
	  FROM market.reservations r,
		   unnest(r.sku_ids, r.warehouse_ids, r.slots, r.qtys)
			   AS l(sku_id, warehouse_id, slot, qty);

-- Every change of on-hand is a row here: receiving and cycle counts
-- (stock_set), adjustments (stock_adjust) and sales (reservation_commit).
CREATE TABLE market.stock_ledger (
	id			   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	at			   timestamptz NOT NULL DEFAULT clock_timestamp(),
	sku_id		   bigint NOT NULL,
	warehouse_id   int NOT NULL,
	delta		   bigint NOT NULL,
	kind		   text NOT NULL CHECK (kind IN ('set', 'adjust', 'sale')),
	reason		   text,
	reservation_id uuid,
	actor		   name NOT NULL DEFAULT session_user
);
CREATE INDEX stock_ledger_sku_idx ON market.stock_ledger (sku_id, warehouse_id);

CREATE FUNCTION market.ledger_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
	RAISE EXCEPTION 'the stock ledger is append-only'
		USING ERRCODE = 'MK030',
			  DETAIL = format('%s on market.stock_ledger was refused.', TG_OP),
			  HINT = 'Correct stock with market.stock_adjust(), which appends a row.';
END
$$;
CREATE TRIGGER stock_ledger_append_only
	BEFORE UPDATE OR DELETE ON market.stock_ledger
	FOR EACH ROW EXECUTE FUNCTION market.ledger_append_only();
CREATE TRIGGER stock_ledger_no_truncate
	BEFORE TRUNCATE ON market.stock_ledger
	FOR EACH STATEMENT EXECUTE FUNCTION market.ledger_append_only();

CREATE VIEW market.stock_levels AS
	SELECT sku_id, warehouse_id,
		   sum(on_hand)::bigint AS on_hand,
		   sum(on_hand - free)::bigint AS held,
		   sum(free)::bigint AS free,
		   count(*)::int AS slots
	  FROM market.stock_slots
	 GROUP BY sku_id, warehouse_id;

-- ---------------------------------------------------------------------------
-- Catalog functions
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.seller_create(name text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	new_id bigint;
BEGIN
	IF name IS NULL OR length(btrim(name)) = 0 OR length(name) > 200 THEN
		RAISE EXCEPTION 'invalid seller name'
			USING ERRCODE = 'MK020', DETAIL = 'A seller name is 1 to 200 characters, not blank.';
	END IF;
	INSERT INTO market.sellers (name) VALUES (seller_create.name) RETURNING id INTO new_id;
	RETURN new_id;
END
$$;

CREATE FUNCTION market.product_create(seller_id bigint, title text,
									  description text DEFAULT '',
									  brand text DEFAULT NULL,
									  category text DEFAULT NULL,
									  attributes jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	new_id bigint;
BEGIN
	IF seller_id IS NULL THEN
		RAISE EXCEPTION 'seller_id must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF NOT EXISTS (SELECT 1 FROM market.sellers s WHERE s.id = product_create.seller_id) THEN
		RAISE EXCEPTION 'unknown seller'
			USING ERRCODE = 'MK013', DETAIL = format('No seller has id %s.', seller_id);
	END IF;
	IF title IS NULL OR length(btrim(title)) = 0 OR length(title) > 500 THEN
		RAISE EXCEPTION 'invalid product title'
			USING ERRCODE = 'MK020', DETAIL = 'A title is 1 to 500 characters, not blank.';
	END IF;
	IF category IS NOT NULL AND category !~ '^[a-z0-9_-]+(/[a-z0-9_-]+)*$' THEN
		RAISE EXCEPTION 'invalid category path'
			USING ERRCODE = 'MK020', DETAIL = format('"%s" is not a path such as electronics/phones.', category),
				  HINT = 'Use lower-case segments of letters, digits, "-" or "_" separated by "/".';
	END IF;
	IF attributes IS NOT NULL AND jsonb_typeof(attributes) <> 'object' THEN
		RAISE EXCEPTION 'invalid product attributes'
			USING ERRCODE = 'MK021', DETAIL = 'attributes must be a JSON object.';
	END IF;
	INSERT INTO market.products (seller_id, title, description, brand, category, attributes)
	VALUES (product_create.seller_id, product_create.title, coalesce(product_create.description, ''),
			product_create.brand, product_create.category, coalesce(product_create.attributes, '{}'))
	RETURNING id INTO new_id;
	RETURN new_id;
END
$$;

CREATE FUNCTION market.sku_create(product_id bigint, sku_code text, price_minor bigint,
								  currency text, attributes jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	new_id bigint;
BEGIN
	IF product_id IS NULL THEN
		RAISE EXCEPTION 'product_id must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF NOT EXISTS (SELECT 1 FROM market.products p WHERE p.id = sku_create.product_id) THEN
		RAISE EXCEPTION 'unknown product'
			USING ERRCODE = 'MK012', DETAIL = format('No product has id %s.', product_id);
	END IF;
	IF sku_code IS NULL OR length(btrim(sku_code)) = 0 OR length(sku_code) > 100 THEN
		RAISE EXCEPTION 'invalid sku code'
			USING ERRCODE = 'MK020', DETAIL = 'A SKU code is 1 to 100 characters, not blank.';
	END IF;
	IF price_minor IS NULL OR price_minor < 0 THEN
		RAISE EXCEPTION 'invalid price'
			USING ERRCODE = 'MK020', DETAIL = format('price_minor must be a non-negative integer number of minor units, not %s.', coalesce(price_minor::text, 'NULL'));
	END IF;
	IF currency IS NULL OR currency !~ '^[A-Z]{3}$' THEN
		RAISE EXCEPTION 'invalid currency code'
			USING ERRCODE = 'MK022', DETAIL = format('"%s" is not an ISO 4217 code.', coalesce(currency, 'NULL')),
				  HINT = 'Use three upper-case letters, such as USD or EUR.';
	END IF;
	IF attributes IS NOT NULL AND jsonb_typeof(attributes) <> 'object' THEN
		RAISE EXCEPTION 'invalid sku attributes'
			USING ERRCODE = 'MK021', DETAIL = 'attributes must be a JSON object.';
	END IF;
	BEGIN
		INSERT INTO market.skus (product_id, sku_code, price_minor, currency, attributes)
		VALUES (sku_create.product_id, sku_create.sku_code, sku_create.price_minor,
				sku_create.currency, coalesce(sku_create.attributes, '{}'))
		RETURNING id INTO new_id;
	EXCEPTION WHEN unique_violation THEN
		RAISE EXCEPTION 'duplicate sku code'
			USING ERRCODE = 'MK014', DETAIL = format('SKU code "%s" is already taken.', sku_code);
	END;
	RETURN new_id;
END
$$;

CREATE FUNCTION market.warehouse_create(code text, name text, priority int DEFAULT 100)
RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	new_id int;
BEGIN
	IF code IS NULL OR length(btrim(code)) = 0 OR length(code) > 64 THEN
		RAISE EXCEPTION 'invalid warehouse code'
			USING ERRCODE = 'MK020', DETAIL = 'A warehouse code is 1 to 64 characters, not blank.';
	END IF;
	IF name IS NULL OR length(btrim(name)) = 0 OR length(name) > 200 THEN
		RAISE EXCEPTION 'invalid warehouse name'
			USING ERRCODE = 'MK020', DETAIL = 'A warehouse name is 1 to 200 characters, not blank.';
	END IF;
	IF priority IS NULL THEN
		RAISE EXCEPTION 'invalid warehouse priority'
			USING ERRCODE = 'MK020', DETAIL = 'priority must not be NULL.';
	END IF;
	BEGIN
		INSERT INTO market.warehouses (code, name, priority)
		VALUES (warehouse_create.code, warehouse_create.name, warehouse_create.priority)
		RETURNING id INTO new_id;
	EXCEPTION WHEN unique_violation THEN
		RAISE EXCEPTION 'duplicate warehouse code'
			USING ERRCODE = 'MK014', DETAIL = format('Warehouse code "%s" is already taken.', code);
	END;
	RETURN new_id;
END
$$;

-- ---------------------------------------------------------------------------
-- Inventory functions (C, src/stock.c and src/reservation.c)
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.stock_set(sku_id bigint, warehouse_id int, on_hand bigint,
								 slots int DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'market_stock_set'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.stock_adjust(sku_id bigint, warehouse_id int, delta bigint, reason text)
RETURNS bigint
AS 'MODULE_PATHNAME', 'market_stock_adjust'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.available(sku_id bigint, warehouse_id int DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'market_available'
LANGUAGE C STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.reserve(items jsonb, ttl interval DEFAULT NULL, owner text DEFAULT NULL)
RETURNS uuid
AS 'MODULE_PATHNAME', 'market_reserve'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.reservation_extend(reservation uuid, ttl interval)
RETURNS timestamptz
AS 'MODULE_PATHNAME', 'market_reservation_extend'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.reservation_release(reservation uuid)
RETURNS boolean
AS 'MODULE_PATHNAME', 'market_reservation_release'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.reservation_commit(reservation uuid)
RETURNS bigint
AS 'MODULE_PATHNAME', 'market_reservation_commit'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.expire_reservations(max_reservations int DEFAULT 1000)
RETURNS int
AS 'MODULE_PATHNAME', 'market_expire_reservations'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.worker_status(
	OUT running boolean, OUT pid int, OUT database text,
	OUT expired_total bigint, OUT purged_total bigint,
	OUT last_run timestamptz, OUT next_wakeup timestamptz)
RETURNS record
AS 'MODULE_PATHNAME', 'market_worker_status'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- ---------------------------------------------------------------------------
-- Audit: one row per violated invariant, none when consistent.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.verify_inventory()
RETURNS TABLE (invariant text, sku_id bigint, warehouse_id int, detail text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
	-- counters out of range (constraints forbid it; the audit checks anyway)
	SELECT 'slot_counters_in_range', s.sku_id, s.warehouse_id,
		   format('slot %s: on_hand %s, free %s', s.slot, s.on_hand, s.free)
	  FROM market.stock_slots s
	 WHERE s.free < 0 OR s.on_hand < 0 OR s.free > s.on_hand
	UNION ALL
	-- each stock row has exactly slots rows numbered 0..slots-1
	SELECT 'stock_has_its_slots', st.sku_id, st.warehouse_id,
		   format('stock says %s slots, found %s', st.slots, count(s.slot))
	  FROM market.stock st
	  LEFT JOIN market.stock_slots s USING (sku_id, warehouse_id)
	 GROUP BY st.sku_id, st.warehouse_id, st.slots
	HAVING count(s.slot) <> st.slots
		OR coalesce(max(s.slot), -1) <> st.slots - 1
		OR coalesce(min(s.slot), 0) <> 0
	UNION ALL
	-- a reservation row is well formed
	SELECT 'reservation_well_formed', r.sku_ids[1], r.warehouse_ids[1],
		   format('reservation %s: status %s, finished_at %s, %s/%s/%s/%s lines',
				  r.id, r.status, coalesce(r.finished_at::text, 'NULL'),
				  cardinality(r.sku_ids), cardinality(r.warehouse_ids),
				  cardinality(r.slots), cardinality(r.qtys))
	  FROM market.reservations r
	 WHERE r.status NOT IN ('held', 'committed', 'released', 'expired')
		OR (r.status = 'held') <> (r.finished_at IS NULL)
		OR cardinality(r.sku_ids) < 1
		OR cardinality(r.sku_ids) <> cardinality(r.warehouse_ids)
		OR cardinality(r.sku_ids) <> cardinality(r.slots)
		OR cardinality(r.sku_ids) <> cardinality(r.qtys)
		OR EXISTS (SELECT 1 FROM unnest(r.slots, r.qtys) AS l(slot, qty)
				    WHERE l.qty < 1 OR l.slot < -1)
	UNION ALL
	-- what a slot holds back (on_hand - free) is exactly what live
	-- reservations took from it
	SELECT 'slot_held_matches_reservations', coalesce(s.sku_id, h.sku_id),
		   coalesce(s.warehouse_id, h.warehouse_id),
		   format('slot %s: on_hand - free = %s, live reservations hold %s',
				  coalesce(s.slot, h.slot), coalesce(s.on_hand - s.free, 0), coalesce(h.qty, 0))
	  FROM market.stock_slots s
	  FULL JOIN (SELECT l.sku_id, l.warehouse_id, l.slot, sum(l.qty) AS qty
				   FROM market.reservation_lines l
				  WHERE l.status = 'held' AND l.slot >= 0
				  GROUP BY 1, 2, 3) h
		ON h.sku_id = s.sku_id AND h.warehouse_id = s.warehouse_id AND h.slot = s.slot
	 WHERE coalesce(s.on_hand - s.free, 0) <> coalesce(h.qty, 0)
	UNION ALL
	-- the ledger adds up to what is on hand
	SELECT 'ledger_matches_on_hand', coalesce(o.sku_id, g.sku_id),
		   coalesce(o.warehouse_id, g.warehouse_id),
		   format('on hand %s, ledger sums to %s', coalesce(o.on_hand, 0), coalesce(g.total, 0))
	  FROM (SELECT s.sku_id, s.warehouse_id, sum(s.on_hand) AS on_hand
			  FROM market.stock_slots s GROUP BY 1, 2) o
	  FULL JOIN (SELECT g.sku_id, g.warehouse_id, sum(g.delta) AS total
				   FROM market.stock_ledger g GROUP BY 1, 2) g
		ON g.sku_id = o.sku_id AND g.warehouse_id = o.warehouse_id
	 WHERE coalesce(o.on_hand, 0) <> coalesce(g.total, 0)
	UNION ALL
	-- every committed reservation left stock through exactly its sale rows
	SELECT 'sale_matches_ledger', l.sku_id, l.warehouse_id,
		   format('reservation %s sold %s, ledger records %s', l.reservation_id, l.qty,
				  coalesce(g.sold, 0))
	  FROM (SELECT l.reservation_id, l.sku_id, l.warehouse_id, sum(l.qty) AS qty
			  FROM market.reservation_lines l
			 WHERE l.status = 'committed'
			 GROUP BY 1, 2, 3) l
	  LEFT JOIN (SELECT g.reservation_id, g.sku_id, g.warehouse_id, -sum(g.delta) AS sold
				   FROM market.stock_ledger g
				  WHERE g.kind = 'sale'
				  GROUP BY 1, 2, 3) g
		ON g.reservation_id = l.reservation_id AND g.sku_id = l.sku_id
	   AND g.warehouse_id = l.warehouse_id
	 WHERE coalesce(g.sold, 0) <> l.qty
$$;

-- ---------------------------------------------------------------------------
-- Privileges
-- ---------------------------------------------------------------------------

REVOKE ALL ON ALL TABLES IN SCHEMA market FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA market FROM PUBLIC;

GRANT SELECT ON ALL TABLES IN SCHEMA market TO market_admin;

GRANT EXECUTE ON FUNCTION
	market.seller_create(text),
	market.product_create(bigint, text, text, text, text, jsonb),
	market.sku_create(bigint, text, bigint, text, jsonb),
	market.warehouse_create(text, text, int),
	market.stock_set(bigint, int, bigint, int),
	market.stock_adjust(bigint, int, bigint, text),
	market.expire_reservations(int),
	market.worker_status(),
	market.verify_inventory()
TO market_admin;

GRANT EXECUTE ON FUNCTION
	market.available(bigint, int),
	market.reserve(jsonb, interval, text),
	market.reservation_extend(uuid, interval),
	market.reservation_release(uuid),
	market.reservation_commit(uuid)
TO market_app, market_admin;
