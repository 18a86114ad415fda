-- ===========================================================================
-- market 0.2, outbox part: claim/ack with leases, per-aggregate order, poison
-- rows, wake-ups and clean-up of market.outbox (the table itself is in
-- 10_schema.sql).  docs/outbox.md describes the design.
--
-- Delivery rules, enforced by the functions below:
--   * a row is "undelivered" while acked_at and dead_at are both NULL;
--   * a row is handed out only when no earlier undelivered row of the same
--     (topic, aggregate_type, aggregate_id) exists, except that one claim
--     may hand out several consecutive rows of one aggregate, in id order;
--   * a claimed row carries a lease (lease_owner, lease_until); when the
--     lease runs out the row may be claimed again (at least once delivery);
--   * a row claimed market.outbox_max_attempts times without an ack is
--     dead-lettered (dead_at), so it stops holding back its aggregate.
--
-- SQLSTATEs of this part (docs/sqlstates.md): MK020 NULL/invalid argument,
-- MK050 unknown topic, MK051 argument out of range, MK052 unknown outbox row,
-- MK053 row not held by this consumer, MK054 row not dead.
--
-- The known topics are those of the CHECK on market.outbox.topic ('events',
-- 'psp'); src/outbox.c keeps the same list for its notifier.
-- ===========================================================================

-- Claimable rows, oldest first within a topic: the claim walks this index.
-- (New index on the shared table market.outbox.)
CREATE INDEX outbox_topic_pending_idx ON market.outbox (topic, id)
	WHERE acked_at IS NULL AND dead_at IS NULL;
-- Dead-lettered rows, for outbox_status() and admins.
-- (New index on the shared table market.outbox.)
CREATE INDEX outbox_dead_idx ON market.outbox (topic, id)
	WHERE dead_at IS NOT NULL;

-- What outbox_claim() hands out.
CREATE TYPE market.outbox_message AS (
	id				bigint,
	topic			text,
	event_type		text,
	aggregate_type	text,
	aggregate_id	bigint,
	payload			jsonb,
	created_at		timestamptz,
	attempts		int
);

-- ---------------------------------------------------------------------------
-- Wake-ups: a statement-level trigger notes which topics the transaction
-- wrote; at commit the notifier worker is told (or, without the preloaded
-- library, a NOTIFY is queued in the writing transaction itself).
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.outbox_wake() RETURNS trigger
AS 'MODULE_PATHNAME', 'market_outbox_wake'
LANGUAGE C SET search_path = pg_catalog, pg_temp;

CREATE TRIGGER outbox_wake
	AFTER INSERT ON market.outbox
	REFERENCING NEW TABLE AS inserted
	FOR EACH STATEMENT EXECUTE FUNCTION market.outbox_wake();

-- ---------------------------------------------------------------------------
-- outbox_claim: hand out up to max undelivered rows of a topic, in order per
-- aggregate, under a lease.  Never waits for a row lock (SKIP LOCKED), so
-- concurrent consumers get disjoint rows and do not block each other.  Call
-- it in a short transaction of its own and commit before the work.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.outbox_claim(consumer text, max int DEFAULT 100,
	topic text DEFAULT 'events', lease interval DEFAULT NULL)
RETURNS SETOF market.outbox_message
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_consumer text := outbox_claim.consumer;
	v_max int := outbox_claim.max;
	v_topic text := outbox_claim.topic;
	v_lease interval := outbox_claim.lease;
	v_now timestamptz := clock_timestamp();
	v_max_attempts int := current_setting('market.outbox_max_attempts')::int;
	v_heads bigint[];
	v_dead bigint[];
	v_take bigint[];
	v_locked bigint[];
	v_cand_head bigint[];
	v_cand_id bigint[];
	v_left int;
	v_stop bigint := NULL;	-- the head whose run of followers ended
	i int;
BEGIN
	IF v_consumer IS NULL THEN
		RAISE EXCEPTION 'consumer must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF length(v_consumer) NOT BETWEEN 1 AND 200 THEN
		RAISE EXCEPTION 'consumer must be 1 to 200 characters'
			USING ERRCODE = 'MK020', DETAIL = format('It has %s.', length(v_consumer));
	END IF;
	IF v_max IS NULL THEN
		RAISE EXCEPTION 'max must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF v_max NOT BETWEEN 1 AND 10000 THEN
		RAISE EXCEPTION 'claim size out of range'
			USING ERRCODE = 'MK051', DETAIL = format('max is %s; it must be between 1 and 10000.', v_max);
	END IF;
	IF v_topic IS NULL THEN
		RAISE EXCEPTION 'topic must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF v_topic NOT IN ('events', 'psp') THEN
		RAISE EXCEPTION 'unknown outbox topic "%"', v_topic
			USING ERRCODE = 'MK050', HINT = 'The topics are events and psp.';
	END IF;
	v_lease := coalesce(v_lease, current_setting('market.outbox_lease')::interval);
	IF v_lease < interval '1 second' OR v_lease > interval '1 day' THEN
		RAISE EXCEPTION 'lease out of range'
			USING ERRCODE = 'MK051', DETAIL = format('lease is %s; it must be between 1 second and 1 day.', v_lease);
	END IF;

	-- 1. The head (oldest undelivered row) of each aggregate whose lease is
	--    free or ran out, oldest first, that nobody else has locked.  A row
	--    that an uncommitted claim holds is skipped, and so are the rows
	--    behind it (they are not heads).
	SELECT array_agg(h.id ORDER BY h.id),
		   array_agg(h.id ORDER BY h.id) FILTER (WHERE h.attempts >= v_max_attempts)
	  INTO v_heads, v_dead
	  FROM (SELECT o.id, o.attempts
			  FROM market.outbox o
			 WHERE o.topic = v_topic AND o.acked_at IS NULL AND o.dead_at IS NULL
			   AND (o.lease_until IS NULL OR o.lease_until <= v_now)
			   AND NOT EXISTS (SELECT FROM market.outbox e
								WHERE e.topic = o.topic
								  AND e.aggregate_type = o.aggregate_type
								  AND e.aggregate_id = o.aggregate_id
								  AND e.id < o.id
								  AND e.acked_at IS NULL AND e.dead_at IS NULL)
			 ORDER BY o.id
			 LIMIT v_max
			   FOR UPDATE OF o SKIP LOCKED) h;
	IF v_heads IS NULL THEN
		RETURN;
	END IF;

	-- 2. A head handed out max_attempts times whose lease ran out without an
	--    ack or a fail is poison that kills its consumer: dead-letter it.
	IF v_dead IS NOT NULL THEN
		UPDATE market.outbox o
		   SET dead_at = v_now, lease_until = NULL,
			   last_error = format('lease expired after attempt %s', o.attempts)
							|| coalesce('; last error: ' || o.last_error, '')
		 WHERE o.id = ANY (v_dead);
		-- the rows queued behind it were only handed out alongside it
		UPDATE market.outbox o
		   SET attempts = 0
		  FROM market.outbox d
		 WHERE d.id = ANY (v_dead)
		   AND o.topic = d.topic AND o.aggregate_type = d.aggregate_type
		   AND o.aggregate_id = d.aggregate_id AND o.id > d.id
		   AND o.acked_at IS NULL AND o.dead_at IS NULL AND o.attempts > 0;
		SELECT array_agg(x ORDER BY x) INTO v_heads
		  FROM unnest(v_heads) x WHERE x <> ALL (v_dead);
		IF v_heads IS NULL THEN
			RETURN;
		END IF;
	END IF;

	-- 3. With what is left of max, the rows that follow each head in its
	--    aggregate: locked (never waiting), then kept while they form an
	--    unbroken run behind the head.
	v_take := v_heads;
	v_left := v_max - cardinality(v_heads);
	IF v_left > 0 THEN
		SELECT array_agg(c.head ORDER BY c.head, c.id), array_agg(c.id ORDER BY c.head, c.id)
		  INTO v_cand_head, v_cand_id
		  FROM (SELECT h.id AS head, f.id
				  FROM market.outbox h
				  CROSS JOIN LATERAL (
						SELECT o.id FROM market.outbox o
						 WHERE o.topic = h.topic AND o.aggregate_type = h.aggregate_type
						   AND o.aggregate_id = h.aggregate_id AND o.id > h.id
						   AND o.acked_at IS NULL AND o.dead_at IS NULL
						 ORDER BY o.id
						 LIMIT v_left) f
				 WHERE h.id = ANY (v_heads)) c;
		IF v_cand_id IS NOT NULL THEN
			SELECT array_agg(l.id) INTO v_locked
			  FROM (SELECT o.id FROM market.outbox o
					 WHERE o.id = ANY (v_cand_id)
					   AND o.acked_at IS NULL AND o.dead_at IS NULL
					   AND (o.lease_until IS NULL OR o.lease_until <= v_now)
					   AND o.attempts < v_max_attempts
					 ORDER BY o.id
					   FOR UPDATE OF o SKIP LOCKED) l;
			FOR i IN 1 .. cardinality(v_cand_id) LOOP
				EXIT WHEN v_left = 0;
				CONTINUE WHEN v_cand_head[i] = v_stop;
				IF v_locked IS NOT NULL AND v_cand_id[i] = ANY (v_locked) THEN
					v_take := v_take || v_cand_id[i];
					v_left := v_left - 1;
				ELSE
					v_stop := v_cand_head[i];	-- a gap: the rest of this run waits
				END IF;
			END LOOP;
		END IF;
	END IF;

	-- 4. Lease them to the consumer.
	RETURN QUERY
	WITH leased AS (
		UPDATE market.outbox o
		   SET lease_owner = v_consumer, lease_until = v_now + v_lease,
			   attempts = o.attempts + 1
		 WHERE o.id = ANY (v_take)
		RETURNING o.id, o.topic, o.event_type, o.aggregate_type, o.aggregate_id,
				  o.payload, o.created_at, o.attempts)
	SELECT l.id, l.topic, l.event_type, l.aggregate_type, l.aggregate_id,
		   l.payload, l.created_at, l.attempts
	  FROM leased l
	 ORDER BY l.id;
END
$$;

-- ---------------------------------------------------------------------------
-- outbox_ack: mark rows delivered.  Idempotent; returns how many rows this
-- call marked.  Ignored (not counted): unknown ids, rows already acked or
-- dead, rows whose lease another consumer holds (when consumer is given),
-- and rows that an earlier undelivered row of their aggregate, not acked in
-- the same call, still holds back (acking out of order).
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.outbox_ack(ids bigint[], consumer text DEFAULT NULL)
RETURNS int
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_ids bigint[] := outbox_ack.ids;
	v_consumer text := outbox_ack.consumer;
	v_n int;
BEGIN
	IF v_ids IS NULL THEN
		RAISE EXCEPTION 'ids must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF array_position(v_ids, NULL) IS NOT NULL THEN
		RAISE EXCEPTION 'ids must not contain null' USING ERRCODE = 'MK020';
	END IF;
	IF cardinality(v_ids) > 10000 THEN
		RAISE EXCEPTION 'too many ids'
			USING ERRCODE = 'MK051', DETAIL = format('%s ids were given; at most 10000 are allowed per call.', cardinality(v_ids));
	END IF;
	IF v_consumer IS NOT NULL AND length(v_consumer) NOT BETWEEN 1 AND 200 THEN
		RAISE EXCEPTION 'consumer must be 1 to 200 characters' USING ERRCODE = 'MK020';
	END IF;
	IF cardinality(v_ids) = 0 THEN
		RETURN 0;
	END IF;

	UPDATE market.outbox o
	   SET acked_at = clock_timestamp(), lease_until = NULL
	 WHERE o.id IN (SELECT x.id FROM market.outbox x
					 WHERE x.id = ANY (v_ids)
					 ORDER BY x.id
					   FOR UPDATE OF x)
	   AND o.acked_at IS NULL AND o.dead_at IS NULL
	   AND (v_consumer IS NULL OR o.lease_owner = v_consumer)
	   AND NOT EXISTS (SELECT FROM market.outbox e
					    WHERE e.topic = o.topic
						  AND e.aggregate_type = o.aggregate_type
						  AND e.aggregate_id = o.aggregate_id
						  AND e.id < o.id
						  AND e.acked_at IS NULL AND e.dead_at IS NULL
						  AND e.id <> ALL (v_ids));
	GET DIAGNOSTICS v_n = ROW_COUNT;
	RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------
-- outbox_fail: a consumer could not deliver a row.  Records the error and
-- releases the lease with a backoff ('retry'), or dead-letters the row once
-- it was handed out market.outbox_max_attempts times ('dead').  The later
-- rows of the aggregate that the same consumer holds are released too, so
-- they come back behind this one.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.outbox_fail(id bigint, error text, consumer text DEFAULT NULL,
	retry_after interval DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_id bigint := outbox_fail.id;
	v_error text := outbox_fail.error;
	v_consumer text := outbox_fail.consumer;
	v_after interval := outbox_fail.retry_after;
	v_now timestamptz := clock_timestamp();
	v_row market.outbox;
	v_backoff interval;
	v_result text;
BEGIN
	IF v_id IS NULL THEN
		RAISE EXCEPTION 'id must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF v_error IS NULL THEN
		RAISE EXCEPTION 'error must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF v_consumer IS NOT NULL AND length(v_consumer) NOT BETWEEN 1 AND 200 THEN
		RAISE EXCEPTION 'consumer must be 1 to 200 characters' USING ERRCODE = 'MK020';
	END IF;
	IF v_after IS NOT NULL AND (v_after < interval '0' OR v_after > interval '1 day') THEN
		RAISE EXCEPTION 'retry_after out of range'
			USING ERRCODE = 'MK051', DETAIL = format('retry_after is %s; it must be between 0 and 1 day.', v_after);
	END IF;

	SELECT * INTO v_row FROM market.outbox o WHERE o.id = v_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown outbox row %', v_id USING ERRCODE = 'MK052';
	END IF;
	IF v_row.acked_at IS NOT NULL OR v_row.dead_at IS NOT NULL THEN
		RAISE EXCEPTION 'outbox row % is not held by this consumer', v_id
			USING ERRCODE = 'MK053',
				  DETAIL = format('The row is already %s.', CASE WHEN v_row.acked_at IS NOT NULL THEN 'acked' ELSE 'dead' END);
	END IF;
	IF v_consumer IS NOT NULL AND v_row.lease_owner IS DISTINCT FROM v_consumer THEN
		RAISE EXCEPTION 'outbox row % is not held by this consumer', v_id
			USING ERRCODE = 'MK053',
				  DETAIL = format('Its lease is held by %s.', coalesce(quote_literal(v_row.lease_owner), 'nobody')),
				  HINT = 'The lease ran out and another consumer claimed the row; leave it to them.';
	END IF;

	IF v_row.attempts >= current_setting('market.outbox_max_attempts')::int THEN
		UPDATE market.outbox o
		   SET dead_at = v_now, lease_until = NULL, last_error = left(v_error, 2000)
		 WHERE o.id = v_id;
		-- the rows queued behind it were only handed out alongside it
		UPDATE market.outbox o
		   SET attempts = 0
		 WHERE o.topic = v_row.topic AND o.aggregate_type = v_row.aggregate_type
		   AND o.aggregate_id = v_row.aggregate_id AND o.id > v_id
		   AND o.acked_at IS NULL AND o.dead_at IS NULL AND o.attempts > 0;
		v_result := 'dead';
	ELSE
		v_backoff := coalesce(v_after,
			least(current_setting('market.outbox_backoff')::interval
					* power(2, greatest(v_row.attempts, 1) - 1),
				  current_setting('market.outbox_max_backoff')::interval));
		UPDATE market.outbox o
		   SET lease_owner = NULL, lease_until = v_now + v_backoff,
			   last_error = left(v_error, 2000)
		 WHERE o.id = v_id;
		v_result := 'retry';
	END IF;

	-- release the rows behind it that the same consumer holds
	IF v_row.lease_owner IS NOT NULL THEN
		UPDATE market.outbox o
		   SET lease_owner = NULL, lease_until = NULL
		 WHERE o.topic = v_row.topic AND o.aggregate_type = v_row.aggregate_type
		   AND o.aggregate_id = v_row.aggregate_id AND o.id > v_id
		   AND o.acked_at IS NULL AND o.dead_at IS NULL
		   AND o.lease_owner = v_row.lease_owner AND o.lease_until > v_now;
	END IF;
	RETURN v_result;
END
$$;

-- ---------------------------------------------------------------------------
-- outbox_retry: an admin puts a dead row back in the queue (attempts start
-- again from 0).  It is then the head of its aggregate again and holds back
-- the later rows still undelivered.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.outbox_retry(id bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_id bigint := outbox_retry.id;
	v_dead timestamptz;
BEGIN
	IF v_id IS NULL THEN
		RAISE EXCEPTION 'id must not be null' USING ERRCODE = 'MK020';
	END IF;
	SELECT o.dead_at INTO v_dead FROM market.outbox o WHERE o.id = v_id FOR UPDATE;
	IF NOT FOUND THEN
		RAISE EXCEPTION 'unknown outbox row %', v_id USING ERRCODE = 'MK052';
	END IF;
	IF v_dead IS NULL THEN
		RAISE EXCEPTION 'outbox row % is not dead', v_id
			USING ERRCODE = 'MK054', DETAIL = 'Only a dead-lettered row can be retried.';
	END IF;
	UPDATE market.outbox o
	   SET dead_at = NULL, attempts = 0, lease_owner = NULL, lease_until = NULL
	 WHERE o.id = v_id;
END
$$;

-- ---------------------------------------------------------------------------
-- outbox_cleanup: delete up to max acked rows older than
-- market.outbox_retention (0 keeps them); returns how many.  The notifier
-- worker calls it every market.outbox_cleanup_interval.  Dead rows are kept.
-- ---------------------------------------------------------------------------

CREATE FUNCTION market.outbox_cleanup(max int DEFAULT 10000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
	v_max int := outbox_cleanup.max;
	v_retention interval := current_setting('market.outbox_retention')::interval;
	v_n bigint;
BEGIN
	IF v_max IS NULL THEN
		RAISE EXCEPTION 'max must not be null' USING ERRCODE = 'MK020';
	END IF;
	IF v_max NOT BETWEEN 1 AND 1000000 THEN
		RAISE EXCEPTION 'clean-up batch out of range'
			USING ERRCODE = 'MK051', DETAIL = format('max is %s; it must be between 1 and 1000000.', v_max);
	END IF;
	IF v_retention = interval '0' THEN
		RETURN 0;
	END IF;
	DELETE FROM market.outbox o
	 WHERE o.id IN (SELECT x.id FROM market.outbox x
					 WHERE x.acked_at < clock_timestamp() - v_retention
					 ORDER BY x.acked_at
					 LIMIT v_max
					   FOR UPDATE OF x SKIP LOCKED);
	GET DIAGNOSTICS v_n = ROW_COUNT;
	RETURN v_n;
END
$$;

-- ---------------------------------------------------------------------------
-- Status
-- ---------------------------------------------------------------------------

-- outbox_notifier: what the notifier worker reports, one row per topic
-- (pid NULL when it does not run).
CREATE FUNCTION market.outbox_notifier(
	OUT topic text, OUT pid int, OUT notifies bigint, OUT last_notify timestamptz,
	OUT last_cleanup timestamptz, OUT cleaned_total bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'market_outbox_notifier'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- outbox_status: per topic, what waits, what is leased, what is dead, how
-- old the oldest undelivered row is, and the notifier's state.
CREATE FUNCTION market.outbox_status()
RETURNS TABLE (topic text, pending bigint, leased bigint, dead bigint,
	oldest_pending_age interval, notifier_pid int, last_notify timestamptz,
	notifies bigint, last_cleanup timestamptz)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
	SELECT n.topic,
		   (SELECT count(*) FROM market.outbox o
			 WHERE o.topic = n.topic AND o.acked_at IS NULL AND o.dead_at IS NULL
			   AND (o.lease_owner IS NULL OR o.lease_until IS NULL OR o.lease_until <= clock_timestamp())),
		   (SELECT count(*) FROM market.outbox o
			 WHERE o.topic = n.topic AND o.acked_at IS NULL AND o.dead_at IS NULL
			   AND o.lease_owner IS NOT NULL AND o.lease_until > clock_timestamp()),
		   (SELECT count(*) FROM market.outbox o
			 WHERE o.topic = n.topic AND o.dead_at IS NOT NULL),
		   (SELECT clock_timestamp() - min(o.created_at) FROM market.outbox o
			 WHERE o.topic = n.topic AND o.acked_at IS NULL AND o.dead_at IS NULL),
		   n.pid, n.last_notify, n.notifies, n.last_cleanup
	  FROM market.outbox_notifier() n
	 ORDER BY n.topic
$$;

-- ---------------------------------------------------------------------------
-- Privileges: consumers claim, ack and fail; admins also retry, clean up and
-- look at the status.
-- ---------------------------------------------------------------------------

REVOKE ALL ON FUNCTION
	market.outbox_wake(),
	market.outbox_claim(text, int, text, interval),
	market.outbox_ack(bigint[], text),
	market.outbox_fail(bigint, text, text, interval),
	market.outbox_retry(bigint),
	market.outbox_cleanup(int),
	market.outbox_notifier(),
	market.outbox_status()
FROM PUBLIC;

GRANT EXECUTE ON FUNCTION
	market.outbox_claim(text, int, text, interval),
	market.outbox_ack(bigint[], text),
	market.outbox_fail(bigint, text, text, interval)
TO market_app, market_admin;

GRANT EXECUTE ON FUNCTION
	market.outbox_retry(bigint),
	market.outbox_cleanup(int),
	market.outbox_notifier(),
	market.outbox_status()
TO market_admin;
