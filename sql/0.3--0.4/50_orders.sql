-- ===========================================================================
-- market 0.4, orders: set-based transitions (docs/orders.md).
--
--   * market.order_transition_many(order_ids, to_state, notes) moves many
--     orders in one UPDATE, a note per order (the PSP worker confirms the
--     orders of a whole batch of authorized payments with one call);
--   * the effects of creations and status changes (history row, domain
--     event, PSP job, units back on hand) are written by a statement-level
--     trigger with transition tables, market.order_effects_set(): one
--     INSERT for all the history rows and events of a statement, one for
--     its PSP jobs.  It replaces the row-level orders_created and
--     orders_transition triggers (same names, same effects, whoever
--     writes: order_transition, order_transition_many, checkout's INSERT,
--     a direct UPDATE).  The row-level market.order_effects() goes; its C
--     symbol stays in the library for databases still at 0.3.
--   * the BEFORE ROW guard (orders_guard, MK003) is unchanged.
-- ===========================================================================

CREATE FUNCTION market.order_effects_set() RETURNS trigger
AS 'MODULE_PATHNAME', 'market_order_effects_set'
LANGUAGE C SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

DROP TRIGGER orders_created ON market.orders;
DROP TRIGGER orders_transition ON market.orders;
DROP FUNCTION market.order_effects();

-- statement triggers have no WHEN and transition tables allow no column
-- list: the function itself keeps the real status changes
CREATE TRIGGER orders_created
	AFTER INSERT ON market.orders
	REFERENCING NEW TABLE AS created_orders
	FOR EACH STATEMENT EXECUTE FUNCTION market.order_effects_set();
CREATE TRIGGER orders_transition
	AFTER UPDATE ON market.orders
	REFERENCING OLD TABLE AS orders_before NEW TABLE AS orders_after
	FOR EACH STATEMENT EXECUTE FUNCTION market.order_effects_set();

CREATE FUNCTION market.order_transition_many(order_ids bigint[], to_state text,
	notes text[] DEFAULT NULL)
RETURNS int
AS 'MODULE_PATHNAME', 'market_order_transition_many'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

REVOKE ALL ON FUNCTION market.order_effects_set(),
	market.order_transition_many(bigint[], text, text[]) FROM PUBLIC;
-- an admin tool (and the PSP worker's, through psp_record): applications
-- move orders one at a time with order_transition
GRANT EXECUTE ON FUNCTION market.order_transition_many(bigint[], text, text[]) TO market_admin;
