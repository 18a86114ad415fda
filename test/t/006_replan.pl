
# Copyright: the market project.
#
# Cached plans follow the tables' growth (src/plans.c).  The batch worker
# is a long-lived process: the plans it makes while market.orders is empty
# (its own statements and the foreign-key checks PostgreSQL runs for every
# row it inserts) are sequential scans, and it used to keep them however
# large the tables grew, so every checkout got slower than the last.
#
# Proves, with auto_explain logging every nested statement's plan and
# autovacuum off (so that no ANALYZE invalidates anything for us):
#   1. on an empty shop, the worker's orders statement finds the
#      idempotency keys it updates by a sequential scan (the situation is
#      real); and no foreign-key query checks the order tables' references
#      (from 0.5 src/references.c probes the parents' primary keys, with no
#      plan to go stale; up to 0.4 those checks were the worst case: they
#      were sequential scans of orders and order_groups for good);
#   2. once the tables have grown past twice their size (thousands of
#      direct checkouts from another session), the worker's next checkouts
#      find the keys by an index scan of idempotency_keys_pkey;
#   3. every checkout of the worker still succeeded and the audit is clean;
#   4. the size check never waits for a lock: while another session holds
#      an ACCESS EXCLUSIVE lock on a market table a checkout does not use,
#      a new session's first checkout (which always looks at the sizes)
#      goes through at once.
#
# Run it with test/tools/run-tap.sh (as the postgres OS user when root).

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('market_replan');
$node->init;
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'market,auto_explain'
market.database = 'postgres'
market.psp_worker = off
market.batch_workers = 1
autovacuum = off
auto_explain.log_min_duration = 0
auto_explain.log_nested_statements = on
log_line_prefix = '%m [%p] '
});
$node->start;

$node->safe_psql(
	'postgres', q{
CREATE EXTENSION market;
SELECT market.seller_create('s1');
SELECT market.product_create(1, 'p1');
SELECT market.warehouse_create('w', 'w');
SELECT market.sku_create(1, 'A', 100, 'EUR');
SELECT market.stock_set(1, 1, 1000000);
VACUUM ANALYZE;
});
$node->poll_query_until('postgres', 'SELECT running FROM market.batch_status()')
  or die 'batch worker not ready';

my $worker_pid = $node->safe_psql('postgres',
	q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'market batch worker'});
like($worker_pid, qr/^\d+$/, 'the batch worker runs');

# one batched checkout; returns the order group
sub batched_buy
{
	my ($key) = @_;
	local $ENV{PGOPTIONS} = '-c market.batch_checkout=on';
	my $out = $node->safe_psql('postgres',
		qq{SELECT market.buy_now('c1', '[{"sku_id": 1, "qty": 1}]', '$key', '{}', 'EUR')->>'order_group'});
	return $out;
}

# the plans the worker logged, from log offset $from on, for the statements
# whose text matches $query: how many there were, and how many of them
# contain a plan node matching each of @nodes
sub worker_plans
{
	my ($query, $from, @nodes) = @_;
	my $log = slurp_file($node->logfile, $from);
	my ($n, @found) = (0, map { 0 } @nodes);
	# one auto_explain entry: a LOG line with the pid, up to the next entry
	for my $entry (split /(?=^\S+ \S+ \S+ \[\d+\] )/m, $log)
	{
		next unless $entry =~ /^\S+ \S+ \S+ \[$worker_pid\] LOG:  duration/;
		next unless $entry =~ /Query Text: .*$query/s;
		$n++;
		for my $i (0 .. $#nodes)
		{
			$found[$i]++ if $entry =~ $nodes[$i];
		}
	}
	return ($n, @found);
}

# the foreign-key check PostgreSQL would run against market.$table
sub fk_check_query { my ($table) = @_; return qr/SELECT 1 FROM ONLY "market"\."$table" x/; }

# the worker's orders statement, and how it finds the idempotency keys
my $orders_statement = qr/UPDATE market\.idempotency_keys k SET response/;
my $keys_seq = qr/Seq Scan on idempotency_keys k/;
my $keys_idx = qr/Index Scan using idempotency_keys_pkey on idempotency_keys k/;

# 1. an empty shop: sequential scans
my $offset = -s $node->logfile;
for my $n (1 .. 8)
{
	like(batched_buy("early-$n"), qr/^\d+$/, "batched checkout $n on the empty shop");
}
my ($n, $seq, $idx) = worker_plans($orders_statement, $offset, $keys_seq, $keys_idx);
cmp_ok($n, '>', 0, "the worker's orders statement was logged ($n)");
ok($seq > 0, "with the shop empty it finds the idempotency keys by a sequential scan ($seq)");
# from 0.5 the order tables' references are checked without a query
for my $table ('orders', 'order_groups', 'sellers', 'skus', 'warehouses')
{
	($n) = worker_plans(fk_check_query($table), $offset);
	is($n, 0, "no foreign-key query checks references to $table");
}

# 2. the tables grow through another session (the direct path)
$node->safe_psql(
	'postgres', q{
SET market.batch_checkout = off;
SET auto_explain.log_min_duration = -1;
SELECT count(market.buy_now('bulk', '[{"sku_id": 1, "qty": 1}]', 'bulk-' || g, '{}', 'EUR'))
  FROM generate_series(1, 3000) AS g;
});
my $blocks = $node->safe_psql('postgres',
	q{SELECT pg_relation_size('market.idempotency_keys') / current_setting('block_size')::int});
cmp_ok($blocks, '>=', 16, "market.idempotency_keys has grown to $blocks blocks");

# the worker looks at the sizes at most once a second
sleep 2;
$offset = -s $node->logfile;
for my $n (1 .. 8)
{
	like(batched_buy("late-$n"), qr/^\d+$/, "batched checkout $n on the grown shop");
}
($n, $seq, $idx) = worker_plans($orders_statement, $offset, $keys_seq, $keys_idx);
cmp_ok($n, '>', 0, "the worker's orders statement was logged again ($n)");
is($seq, 0, 'after the growth the worker no longer scans idempotency_keys sequentially');
ok($idx > 0, "after the growth it finds the keys by idempotency_keys_pkey ($idx)");

# 3. nothing lost
is($node->safe_psql('postgres', q{SELECT count(*) FROM market.order_groups}),
	'3016', 'every checkout made its order group');
is($node->safe_psql('postgres', q{SELECT count(*) FROM market.verify_inventory()}),
	'0', 'audit clean');

# 4. a table locked by an administrator does not hold checkouts up
my ($locker_out, $locker_err) = ('', '');
my $locker = IPC::Run::start(
	[
		'psql', '-X', '-q', '-d', $node->connstr('postgres'), '-c',
		'BEGIN; LOCK TABLE market.psp_webhook_events IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60);'
	],
	'<', \undef, '>', \$locker_out, '2>', \$locker_err);
$node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM pg_locks WHERE relation = 'market.psp_webhook_events'::regclass
	   AND mode = 'AccessExclusiveLock' AND granted})
  or die 'the locker did not get its lock';
my ($rc, $out, $err) = $node->psql('postgres',
	q{SET statement_timeout = '5s'; SET market.batch_checkout = off;
	  SELECT market.buy_now('c2', '[{"sku_id": 1, "qty": 1}]', 'while-locked', '{}', 'EUR')->>'order_group'});
is($rc, 0, 'a checkout goes through while an unrelated market table is locked exclusively');
like($out, qr/^\d+$/, 'and makes its order group') or diag($err);
$locker->kill_kill;

$node->stop;
done_testing();
