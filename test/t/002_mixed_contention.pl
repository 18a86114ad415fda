
# Copyright: the market project.
#
# Mixed contention: many sessions reserve, commit and release two-line
# reservations of three SKUs stocked in two warehouses (the preferred one
# has the higher id, so warehouse priority and id order disagree), with
# little stock so the exact path and the reclaiming of expired units run
# all the time, a 1-second TTL so the expiry worker works alongside, and a
# session receiving and writing off stock of every pair now and then.
#
# Proves: no transaction fails (no deadlock, no error but "sold out" or
# "not live", which the script absorbs), the server log has no deadlock,
# and market.verify_inventory() is clean afterwards.
#
# Run it with test/tools/run-tap.sh (as the postgres OS user when root).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('market_contention');
$node->init;
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'market'
market.database = 'postgres'
market.expiry_max_naptime = 200ms
max_connections = 60
});
$node->start;

$node->safe_psql(
	'postgres', q{
CREATE EXTENSION market;
SELECT market.seller_create('s');
SELECT market.product_create(1, 'p');
-- created first: lower id, lower priority
SELECT market.warehouse_create('wb', 'second choice', 200);
SELECT market.warehouse_create('wa', 'first choice', 100);
SELECT market.sku_create(1, 'MC-' || g, 100, 'EUR') FROM generate_series(1, 3) AS g;
SELECT market.stock_set(1, 1, 40, 4), market.stock_set(1, 2, 40, 32),
       market.stock_set(2, 1, 30, 2), market.stock_set(2, 2, 30, 8),
       market.stock_set(3, 2, 50, 8);
-- a shopper: reserve two lines, then pay, walk away or cancel;
-- "sold out" (MK001) and "not live" (MK002) are answers, not failures
CREATE FUNCTION shop(a int, b int, q int, act int) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	r uuid;
BEGIN
	r := market.reserve(jsonb_build_array(jsonb_build_object('sku_id', a, 'qty', q),
										  jsonb_build_object('sku_id', b, 'qty', 1)),
						'1 second');
	IF act = 1 THEN
		PERFORM market.reservation_commit(r);
	ELSIF act = 2 THEN
		PERFORM market.reservation_release(r);
	END IF;
	RETURN 'ok';
EXCEPTION WHEN SQLSTATE 'MK001' OR SQLSTATE 'MK002' THEN
	RETURN SQLSTATE;
END
$$;
});

my $log_offset = -s $node->logfile;

# a stock keeper in the background: every pair in one transaction, 6 times,
# receiving 20 units and then writing off 5 (a write-off lowers slots while
# shoppers are queued on them; it may be refused when too much is held)
my $restock = $node->background_psql('postgres');
$restock->query_until(
	qr/restocking/, q{
\echo restocking
DO $$
DECLARE
	p record;
BEGIN
	FOR i IN 1 .. 6 LOOP
		FOR p IN SELECT * FROM (VALUES (1, 1), (1, 2), (2, 1), (2, 2), (3, 2)) AS v(s, w) LOOP
			BEGIN
				PERFORM market.stock_adjust(p.s, p.w, CASE WHEN i % 2 = 0 THEN -5 ELSE 20 END,
											'cycle count');
			EXCEPTION WHEN SQLSTATE 'MK024' OR SQLSTATE 'MK025' THEN
				NULL;
			END;
		END LOOP;
		COMMIT;
		PERFORM pg_sleep(1);
	END LOOP;
END
$$;
});

$node->pgbench(
	'-n -c 32 -j 2 -T 8',
	0,
	[qr{number of failed transactions: 0 \(0\.000%\)}],
	[qr{^$}],
	'32 shoppers for 8 s: no transaction fails',
	{
		'002_shop' => q{
\set a random(1, 3)
\set b random(1, 3)
\set q random(1, 3)
\set act random(1, 4)
SELECT shop(:a, :b, :q, :act);
}
	});

$restock->quit;

my $log = slurp_file($node->logfile, $log_offset);
unlike($log, qr/deadlock detected/, 'no deadlock in the server log');

my $sold = $node->safe_psql('postgres',
	"SELECT count(*) FROM market.reservations WHERE status = 'committed'");
cmp_ok($sold, '>', 0, "shoppers bought something ($sold sales)");

# let the 1-second reservations expire and be returned
$node->poll_query_until('postgres',
	"SELECT count(*) = 0 FROM market.reservations WHERE status = 'held'")
  or die 'reservations still held';

is($node->safe_psql('postgres', 'SELECT count(*) FROM market.verify_inventory()'),
	'0', 'audit clean after the storm');
is( $node->safe_psql(
		'postgres',
		'SELECT sum(on_hand - free) FROM market.stock_slots'),
	'0',
	'nothing held once every reservation has ended');

$node->stop;
done_testing();
