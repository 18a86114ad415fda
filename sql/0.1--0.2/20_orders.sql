-- ===========================================================================
-- Orders: the state machine on market.orders (docs/orders.md).
--
-- The graph lives in one place, the table of edges in src/orders.c, and is
-- shown read-only by market.order_transitions().  Two C triggers enforce it
-- and carry out each transition whoever writes the row:
--   orders_guard       BEFORE INSERT OR UPDATE: MK003 for anything but an
--                      INSERT in 'created' or an UPDATE along an edge;
--                      stamps updated_at.
--   orders_created     AFTER INSERT, and
--   orders_transition  AFTER UPDATE when status changed: history row in
--                      order_events, domain event 'order.<status>' in the
--                      outbox, PSP job for the group's payment, units back
--                      on hand for cancelled / payment_failed / returned.
-- ===========================================================================

-- The ledger gets two more kinds: units an order gave back when it was
-- cancelled (or its payment failed), and units a return brought back.
ALTER TABLE market.stock_ledger DROP CONSTRAINT stock_ledger_kind_check;
ALTER TABLE market.stock_ledger ADD CONSTRAINT stock_ledger_kind_check
	CHECK (kind IN ('set', 'adjust', 'sale', 'cancel', 'return'));

CREATE FUNCTION market.order_guard() RETURNS trigger
AS 'MODULE_PATHNAME', 'market_order_guard'
LANGUAGE C SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.order_effects() RETURNS trigger
AS 'MODULE_PATHNAME', 'market_order_effects'
LANGUAGE C SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE TRIGGER orders_guard
	BEFORE INSERT OR UPDATE ON market.orders
	FOR EACH ROW EXECUTE FUNCTION market.order_guard();
CREATE TRIGGER orders_created
	AFTER INSERT ON market.orders
	FOR EACH ROW EXECUTE FUNCTION market.order_effects();
CREATE TRIGGER orders_transition
	AFTER UPDATE ON market.orders
	FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
	EXECUTE FUNCTION market.order_effects();

CREATE FUNCTION market.order_transitions()
RETURNS TABLE (from_status text, to_status text)
AS 'MODULE_PATHNAME', 'market_order_transitions'
LANGUAGE C STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION market.order_transition(order_id bigint, to_state text, note text DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'market_order_transition'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- One order as a document: header, lines, history, the group's payment.
CREATE FUNCTION market.order_view(order_id bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	o market.orders;
BEGIN
	IF order_view.order_id IS NULL THEN
		RAISE EXCEPTION 'order_id must not be null' USING ERRCODE = 'MK020';
	END IF;
	SELECT * INTO o FROM market.orders WHERE id = order_view.order_id;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown order'
			USING ERRCODE = 'MK017', DETAIL = format('No order has id %s.', order_view.order_id);
	END IF;
	RETURN jsonb_build_object(
		'order_id', o.id,
		'group_id', o.group_id,
		'seller_id', o.seller_id,
		'customer_id', o.customer_id,
		'status', o.status,
		'currency', o.currency,
		'subtotal_minor', o.subtotal_minor,
		'created_at', o.created_at,
		'updated_at', o.updated_at,
		'lines', coalesce((
			SELECT jsonb_agg(jsonb_build_object(
						'sku_id', l.sku_id,
						'sku_code', k.sku_code,
						'warehouse_id', l.warehouse_id,
						'qty', l.qty,
						'unit_price_minor', l.unit_price_minor,
						'line_total_minor', l.qty * l.unit_price_minor)
					ORDER BY l.sku_id, l.warehouse_id)
			  FROM market.order_lines l
			  JOIN market.skus k ON k.id = l.sku_id
			 WHERE l.order_id = o.id), '[]'::jsonb),
		'history', coalesce((
			SELECT jsonb_agg(jsonb_build_object(
						'from', e.from_status,
						'to', e.to_status,
						'at', e.at,
						'actor', e.actor,
						'note', e.note)
					ORDER BY e.id)
			  FROM market.order_events e
			 WHERE e.order_id = o.id), '[]'::jsonb),
		'payment', (SELECT to_jsonb(p) FROM market.payments p WHERE p.group_id = o.group_id));
END
$$;

REVOKE ALL ON FUNCTION market.order_guard(), market.order_effects(),
	market.order_transitions(), market.order_transition(bigint, text, text),
	market.order_view(bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
	market.order_transitions(),
	market.order_transition(bigint, text, text),
	market.order_view(bigint)
TO market_app, market_admin;
