--
-- outbox: outbox_claim / outbox_ack / outbox_fail / outbox_retry /
-- outbox_cleanup / outbox_status, leases (expired by moving lease_until into
-- the past as superuser, never by sleeping), order per aggregate, poison
-- rows and dead letters, bad input.
--
-- Errors are shown by SQLSTATE only.  Rows are shown by id (the table is
-- emptied and its identity restarted first), never by timestamp.
--
\set VERBOSITY sqlstate

-- earlier suites leave rows in the outbox; this one starts from none
TRUNCATE market.outbox RESTART IDENTITY;

-- the wake-up trigger is in place, per statement, with a transition table
SELECT tgname, tgtype, tgnewtable, tgfoid::regproc AS function
  FROM pg_trigger WHERE tgrelid = 'market.outbox'::regclass AND NOT tgisinternal;
-- the notifier knows the topics the table allows
SELECT array_agg(topic ORDER BY topic) AS notifier_topics FROM market.outbox_notifier();
SELECT pg_get_constraintdef(oid) AS topic_check FROM pg_constraint
 WHERE conrelid = 'market.outbox'::regclass AND conname = 'outbox_topic_check';
-- defaults of the settings
SELECT name, setting, unit, context FROM pg_settings
 WHERE name LIKE 'market.outbox%' ORDER BY name;

-- what the tests look at
CREATE FUNCTION pg_temp.rows() RETURNS TABLE (id bigint, agg text, owner text,
	attempts int, leased boolean, acked boolean, dead boolean, last_error text)
LANGUAGE sql AS $$
	SELECT o.id, o.aggregate_type || o.aggregate_id, o.lease_owner, o.attempts,
		   o.lease_until > clock_timestamp(), o.acked_at IS NOT NULL,
		   o.dead_at IS NOT NULL, o.last_error
	  FROM market.outbox o ORDER BY o.id
$$;
CREATE FUNCTION pg_temp.add(agg text, n int, ev text DEFAULT 'evt', tp text DEFAULT 'events')
RETURNS void LANGUAGE sql AS $$
	INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
	VALUES (tp, ev, agg, n, jsonb_build_object('agg', agg || n))
$$;

-- ---------------------------------------------------------------------------
-- claim and ack, order per aggregate
-- ---------------------------------------------------------------------------
-- 1 A1, 2 B1, 3 A1, 4 C1, 5 A1, 6 B1, 7 P1 (topic psp)
SELECT pg_temp.add('A', 1, 'a.1'), pg_temp.add('B', 1, 'b.1'), pg_temp.add('A', 1, 'a.2'),
	   pg_temp.add('C', 1, 'c.1'), pg_temp.add('A', 1, 'a.3'), pg_temp.add('B', 1, 'b.2'),
	   pg_temp.add('P', 1, 'payment.authorize', 'psp');

-- the heads of A and B, oldest first; max 2 leaves nothing for followers
SELECT id, topic, event_type, aggregate_type, aggregate_id, payload, attempts
  FROM market.outbox_claim('c1', 2);
-- c2 gets C1 only: A and B are held back by their leased heads
SELECT id, event_type, attempts FROM market.outbox_claim('c2', 10);
SELECT id, event_type FROM market.outbox_claim('c2', 10);      -- nothing
SELECT * FROM pg_temp.rows();

-- ack: counts what it marked; again is a no-op; another consumer's row is ignored
SELECT market.outbox_ack(ARRAY[1, 2], 'c1') AS acked;           -- 2
SELECT market.outbox_ack(ARRAY[1, 2], 'c1') AS acked;           -- 0
SELECT market.outbox_ack(ARRAY[4], 'c1') AS acked;              -- 0: c2 holds it
SELECT market.outbox_ack(ARRAY[4, 999999], 'c2') AS acked;      -- 1: unknown ids ignored
SELECT market.outbox_ack('{}') AS acked;                        -- 0

-- now A2 and A3 (consecutive, one claim, id order) and B2
SELECT id, event_type, attempts FROM market.outbox_claim('c2', 10);
-- the psp topic is separate
SELECT id, event_type FROM market.outbox_claim('c3', 10, 'psp');
SELECT id, event_type FROM market.outbox_claim('c3', 10, 'psp');   -- nothing

-- acking out of order is ignored: A3 waits for A2
SELECT market.outbox_ack(ARRAY[5], 'c2') AS acked;              -- 0
SELECT market.outbox_ack(ARRAY[5, 3], 'c2') AS acked;           -- 2: together, fine
SELECT market.outbox_ack(ARRAY[7]) AS acked;                    -- 1: no consumer named
SELECT * FROM pg_temp.rows();

-- max bounds a run of one aggregate too: 8, 9, 10 of D1, claimed 2 at a time
SELECT pg_temp.add('D', 1), pg_temp.add('D', 1), pg_temp.add('D', 1);
SELECT id FROM market.outbox_claim('c1', 2);                     -- 8, 9
SELECT id FROM market.outbox_claim('c2', 2);                     -- nothing: 10 waits
SELECT market.outbox_ack(ARRAY[8, 9], 'c1') AS acked;
SELECT id FROM market.outbox_claim('c2', 2);                     -- 10
SELECT market.outbox_ack(ARRAY[10], 'c2') AS acked;

-- ---------------------------------------------------------------------------
-- leases
-- ---------------------------------------------------------------------------
-- B2 (6) is still leased by c2; its lease runs out (moved into the past)
SELECT id, owner, leased FROM pg_temp.rows() WHERE id = 6;
UPDATE market.outbox SET lease_until = clock_timestamp() - interval '1 second' WHERE id = 6;
SELECT id, attempts FROM market.outbox_claim('c1', 10);          -- c1 gets it, 2nd attempt
SELECT market.outbox_ack(ARRAY[6], 'c2') AS acked;              -- 0: the lease went to c1
SELECT market.outbox_ack(ARRAY[6], 'c1') AS acked;              -- 1

-- a lease that ran out but nobody claimed since: the holder may still ack
SELECT pg_temp.add('E', 1);                                      -- 11
SELECT id FROM market.outbox_claim('c1');
-- (claimed with the default lease, market.outbox_lease = 30 s)
SELECT lease_until - clock_timestamp() BETWEEN interval '25 s' AND interval '30 s' AS default_30s
  FROM market.outbox WHERE id = 11;
UPDATE market.outbox SET lease_until = clock_timestamp() - interval '1 second' WHERE id = 11;
SELECT market.outbox_ack(ARRAY[11], 'c1') AS acked;             -- 1

-- the lease: given, or market.outbox_lease
SELECT pg_temp.add('E', 2), pg_temp.add('E', 3);                 -- 12, 13
SELECT id FROM market.outbox_claim('c1', 1, lease => '5 min');
SELECT lease_until - clock_timestamp() BETWEEN interval '4 min' AND interval '5 min' AS five_minutes
  FROM market.outbox WHERE id = 12;
SET market.outbox_lease = '2min';
SELECT id FROM market.outbox_claim('c1', 1);
SELECT lease_until - clock_timestamp() BETWEEN interval '1 min' AND interval '2 min' AS two_minutes
  FROM market.outbox WHERE id = 13;
RESET market.outbox_lease;
SELECT market.outbox_ack(ARRAY[12, 13]) AS acked;

-- ---------------------------------------------------------------------------
-- poison rows: fail, backoff, dead letter, retry
-- ---------------------------------------------------------------------------
SET market.outbox_max_attempts = 3;
SET market.outbox_backoff = 0;          -- a failed row may come back at once
-- 14 F1 (poison), 15 F1, 16 G1
SELECT pg_temp.add('F', 1, 'poison'), pg_temp.add('F', 1, 'after.poison'), pg_temp.add('G', 1, 'fine');
SELECT id, event_type, attempts FROM market.outbox_claim('c1');  -- 14, 15, 16
SELECT market.outbox_fail(14, 'boom 1', 'c1') AS outcome;        -- retry
-- 15 was released with it (it must come after 14); G1 flows on
SELECT * FROM pg_temp.rows() WHERE id >= 14;
SELECT market.outbox_ack(ARRAY[16], 'c1') AS acked;
SELECT id, attempts FROM market.outbox_claim('c2');              -- 14, 15 again
SELECT market.outbox_ack(ARRAY[15], 'c2') AS acked;              -- 0: 14 comes first
SELECT market.outbox_fail(14, 'boom 2', 'c2') AS outcome;        -- retry
SELECT id, attempts FROM market.outbox_claim('c1');              -- 14 (3rd), 15
SELECT market.outbox_fail(14, 'boom 3', 'c1') AS outcome;        -- dead
-- 14 is dead and holds nothing back; 15 starts its count afresh
SELECT * FROM pg_temp.rows() WHERE id >= 14;
SELECT id, event_type, attempts FROM market.outbox_claim('c1');  -- 15
SELECT market.outbox_ack(ARRAY[15], 'c1') AS acked;
SELECT topic, pending, leased, dead FROM market.outbox_status();

-- a row whose consumer dies every time (its lease runs out, no fail): after
-- max_attempts hand-outs the next claim dead-letters it; H2 flows after it
SELECT pg_temp.add('H', 1, 'kills.consumer'), pg_temp.add('H', 1, 'after.it');   -- 17, 18
SELECT id FROM market.outbox_claim('c1', 1);                     -- 17 (1)
UPDATE market.outbox SET lease_until = clock_timestamp() - interval '1 s' WHERE id = 17;
SELECT id FROM market.outbox_claim('c1', 1);                     -- 17 (2)
UPDATE market.outbox SET lease_until = clock_timestamp() - interval '1 s' WHERE id = 17;
SELECT id FROM market.outbox_claim('c1', 1);                     -- 17 (3)
UPDATE market.outbox SET lease_until = clock_timestamp() - interval '1 s' WHERE id = 17;
SELECT id FROM market.outbox_claim('c1', 1);                     -- nothing: 17 dead now
SELECT * FROM pg_temp.rows() WHERE id >= 17;
SELECT id, attempts FROM market.outbox_claim('c1', 1);           -- 18 (1)
SELECT market.outbox_ack(ARRAY[18], 'c1') AS acked;

-- the backoff: market.outbox_backoff doubled per attempt, or retry_after
SET market.outbox_backoff = '10s';
SELECT pg_temp.add('I', 1);                                      -- 19
SELECT id FROM market.outbox_claim('c1');
SELECT market.outbox_fail(19, 'slow down', 'c1') AS outcome;
SELECT lease_until - clock_timestamp() BETWEEN interval '9 s' AND interval '10 s' AS ten_seconds,
	   lease_owner IS NULL AS released FROM market.outbox WHERE id = 19;
SELECT id FROM market.outbox_claim('c1');                        -- nothing: backing off
UPDATE market.outbox SET lease_until = clock_timestamp() - interval '1 s' WHERE id = 19;
SELECT id, attempts FROM market.outbox_claim('c1');              -- 19 (2)
SELECT market.outbox_fail(19, 'slow down', 'c1') AS outcome;
SELECT lease_until - clock_timestamp() BETWEEN interval '19 s' AND interval '20 s' AS twenty_seconds
  FROM market.outbox WHERE id = 19;
UPDATE market.outbox SET lease_until = clock_timestamp() - interval '1 s' WHERE id = 19;
SELECT id, attempts FROM market.outbox_claim('c1');              -- 19 (3)
SELECT market.outbox_fail(19, 'later', 'c1', retry_after => '0 s') AS outcome;   -- dead (3 of 3)
RESET market.outbox_backoff;
SET market.outbox_max_attempts = 10;

-- retry: a dead row comes back with attempts from 0 and its last error kept
SELECT market.outbox_retry(14);
SELECT * FROM pg_temp.rows() WHERE id = 14;
SELECT id, event_type, attempts FROM market.outbox_claim('c1');  -- 14
SELECT market.outbox_fail(14, 'again', 'c1', retry_after => '1 hour') AS outcome;
SELECT lease_until - clock_timestamp() BETWEEN interval '59 min' AND interval '1 hour' AS one_hour
  FROM market.outbox WHERE id = 14;
-- an admin may fail a row without naming a consumer
SELECT market.outbox_fail(14, 'admin gives up') AS outcome;      -- retry (attempt 1 of 10)

-- fail: bad calls
SELECT pg_temp.add('J', 1);                                      -- 20
SELECT id FROM market.outbox_claim('c1');
SELECT market.outbox_fail(20, 'x', 'c2');                        -- MK053: c1 holds it
SELECT market.outbox_fail(16, 'x', 'c1');                        -- MK053: acked
SELECT market.outbox_fail(17, 'x');                              -- MK053: dead
SELECT market.outbox_fail(999999, 'x');                          -- MK052
SELECT market.outbox_fail(NULL, 'x');                            -- MK020
SELECT market.outbox_fail(20, NULL, 'c1');                       -- MK020
SELECT market.outbox_fail(20, 'x', '');                          -- MK020
SELECT market.outbox_fail(20, 'x', 'c1', '-1 s');                -- MK051
SELECT market.outbox_fail(20, 'x', 'c1', '2 days');              -- MK051
SELECT id, owner, attempts, leased, last_error FROM pg_temp.rows() WHERE id = 20;  -- unchanged
SELECT market.outbox_ack(ARRAY[20], 'c1') AS acked;
-- retry: bad calls
SELECT market.outbox_retry(20);                                  -- MK054: acked, not dead
SELECT market.outbox_retry(14);                                  -- MK054: pending
SELECT market.outbox_retry(999999);                              -- MK052
SELECT market.outbox_retry(NULL);                                -- MK020

-- ---------------------------------------------------------------------------
-- bad input to claim and ack
-- ---------------------------------------------------------------------------
SELECT * FROM market.outbox_claim(NULL);                         -- MK020
SELECT * FROM market.outbox_claim('');                           -- MK020
SELECT * FROM market.outbox_claim(repeat('c', 201));             -- MK020
SELECT * FROM market.outbox_claim('c1', NULL);                   -- MK020
SELECT * FROM market.outbox_claim('c1', 0);                      -- MK051
SELECT * FROM market.outbox_claim('c1', -5);                     -- MK051
SELECT * FROM market.outbox_claim('c1', 10001);                  -- MK051
SELECT * FROM market.outbox_claim('c1', 10, NULL);               -- MK020
SELECT * FROM market.outbox_claim('c1', 10, 'orders');           -- MK050
SELECT * FROM market.outbox_claim('c1', 10, 'EVENTS');           -- MK050
SELECT * FROM market.outbox_claim('c1', 10, 'events', '0 s');    -- MK051
SELECT * FROM market.outbox_claim('c1', 10, 'events', '-1 min'); -- MK051
SELECT * FROM market.outbox_claim('c1', 10, 'events', '2 days'); -- MK051
SELECT market.outbox_ack(NULL);                                  -- MK020
SELECT market.outbox_ack(ARRAY[1, NULL]::bigint[]);              -- MK020
SELECT market.outbox_ack(array_fill(1::bigint, ARRAY[10001]));   -- MK051
SELECT market.outbox_ack(ARRAY[1], '');                          -- MK020
SELECT market.outbox_cleanup(NULL);                              -- MK020
SELECT market.outbox_cleanup(0);                                 -- MK051
SELECT market.outbox_cleanup(1000001);                           -- MK051
-- a topic the table does not allow cannot even be written
INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id)
VALUES ('orders', 'x', 'X', 1);                                  -- 23514

-- ---------------------------------------------------------------------------
-- clean-up: acked rows older than market.outbox_retention, max per call
-- ---------------------------------------------------------------------------
SELECT count(*) FILTER (WHERE acked) AS acked, count(*) FILTER (WHERE dead) AS dead,
	   count(*) FILTER (WHERE NOT acked AND NOT dead) AS undelivered
  FROM pg_temp.rows();
SELECT market.outbox_cleanup() AS deleted;                       -- 0: all acked just now
-- age every acked row but one by two hours
UPDATE market.outbox SET acked_at = acked_at - interval '2 hours'
 WHERE acked_at IS NOT NULL AND id <> 20;
SET market.outbox_retention = 0;
SELECT market.outbox_cleanup() AS deleted;                       -- 0: keep forever
SET market.outbox_retention = '1h';
SELECT market.outbox_cleanup(5) AS deleted;                      -- 5
SELECT market.outbox_cleanup(5) AS deleted;                      -- 5
SELECT market.outbox_cleanup() AS deleted;                       -- the rest
SELECT market.outbox_cleanup() AS deleted;                       -- 0
-- what is left: the young acked row, the dead ones, the undelivered one
SELECT id, acked, dead FROM pg_temp.rows();
RESET market.outbox_retention;

-- ---------------------------------------------------------------------------
-- status
-- ---------------------------------------------------------------------------
SELECT pg_temp.add('K', 1), pg_temp.add('K', 1);
SELECT id FROM market.outbox_claim('c1', 1);
SELECT topic, pending, leased, dead, oldest_pending_age > interval '0' AS has_age,
	   notifier_pid IS NOT NULL AS notifier_running, notifies > 0 AS notified
  FROM market.outbox_status();
DELETE FROM market.outbox;
SELECT topic, pending, leased, dead, oldest_pending_age FROM market.outbox_status();
