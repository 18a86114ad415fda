
# Copyright: the market project.
#
# Batched checkouts under a flash sale: 32 sessions with
# market.batch_checkout = on race market.buy_now() over three SKUs of 300
# units each, 40 carts of 1 to 3 lines per session, every call a single
# statement (so every one goes through the batch workers).  Two batch
# workers run, so that their batches take the scarce SKUs in crossing
# orders: the bounded lock waits of a batch (src/batch.c) must keep that
# from ever deadlocking.
#
# Proves:
#   1. zero oversell: per SKU, the units in order lines are exactly what
#      left stock, never more than there was; every call got an order group
#      or "insufficient stock" (MK001), nothing else;
#   2. each successful call's order group exists with its orders, one
#      payment and one payment.authorize outbox row; the groups are exactly
#      those handed out; the worker really batched;
#   3. replaying keys (batched and direct) returns the first response
#      unchanged and writes nothing; the audit is clean; one key sent by
#      sixteen sessions at once makes one checkout and every call succeeds;
#   4. a checkout held up by a session locking a SKU's slots times out its
#      lock wait in the batch and is applied again on its own (the other
#      checkouts of its batch are answered meanwhile); terminating the batch
#      workers while they hold checkouts loses nothing: every call gets an
#      answer (a group, MK001, or MK006 for a checkout a dying worker held,
#      and there are some); retrying each MK006 with its key returns the
#      checkout if it was made and makes it otherwise; no order group lacks
#      its response; the audit is clean.
#
# Run it with test/tools/run-tap.sh (as the postgres OS user when root).

use strict;
use warnings;

use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $SESSIONS = 32;
my $ATTEMPTS = 40;
my $STOCK = 300;

my $node = PostgreSQL::Test::Cluster->new('market_batch_checkout');
$node->init;
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'market'
market.database = 'postgres'
market.psp_worker = off
market.batch_workers = 2
max_connections = 60
fsync = on
});
$node->start;

$node->safe_psql(
	'postgres', qq{
CREATE EXTENSION market;
SELECT market.seller_create('s1'), market.seller_create('s2');
SELECT market.product_create(1, 'p1'), market.product_create(2, 'p2');
SELECT market.warehouse_create('w', 'w');
SELECT market.sku_create(1, 'A', 100, 'EUR'), market.sku_create(2, 'B', 250, 'EUR'),
       market.sku_create(1, 'C', 700, 'EUR');
SELECT market.stock_set(s, 1, $STOCK) FROM generate_series(1, 3) AS s;
CREATE ROLE shopper LOGIN IN ROLE market_app;
});
$node->poll_query_until('postgres', 'SELECT running FROM market.batch_status()')
  or die 'batch worker not ready';

# the carts, in turn: A; A+B; B+C (2 of C); A+B+C
my @carts = (
	'[{"sku_id": 1, "qty": 1}]',
	'[{"sku_id": 1, "qty": 1}, {"sku_id": 2, "qty": 1}]',
	'[{"sku_id": 2, "qty": 1}, {"sku_id": 3, "qty": 2}]',
	'[{"sku_id": 1, "qty": 1}, {"sku_id": 2, "qty": 1}, {"sku_id": 3, "qty": 1}]');

# one script per round: before each call a KEY line goes to stdout (\echo)
# and to stderr (\warn), so that responses and errors can be told apart
# by call
sub write_script
{
	my ($round) = @_;
	my $script = "${PostgreSQL::Test::Utils::tmp_check}/checkout_race_$round.sql";
	my $sql = '';
	for my $n (1 .. $ATTEMPTS)
	{
		my $cart = $carts[ $n % 4 ];
		$sql .= qq{\\echo KEY $round :sess $n\n};
		$sql .= qq{\\warn KEY $round :sess $n\n};
		$sql .= qq{SELECT market.buy_now('c' || :'sess', '$cart', 'r$round-' || :'sess' || '-$n', '{"method": "pm_card_visa"}', 'EUR');\n};
	}
	PostgreSQL::Test::Utils::append_to_file($script, $sql) unless -e $script;
	return $script;
}

sub start_race
{
	my ($round) = @_;
	my $script = write_script($round);
	my @sessions;
	local $ENV{PGOPTIONS} = '-c market.batch_checkout=on';
	for my $i (1 .. $SESSIONS)
	{
		my %s = (out => '', err => '', sess => $i);
		$s{h} = IPC::Run::start(
			[
				'psql', '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=0', '-v', "sess=$i",
				'-d', $node->connstr('postgres') . ' user=shopper', '-f', $script
			],
			'<', \undef, '>', \$s{out}, '2>', \$s{err});
		push @sessions, \%s;
	}
	return \@sessions;
}

# every call's outcome, by key: a group id, or the error's kind
sub finish_race
{
	my ($sessions) = @_;
	my %r = (groups => {}, MK001 => [], MK006 => [], other => []);
	for my $s (@$sessions)
	{
		$s->{h}->finish;
		# stdout: KEY lines followed by the response, if any
		my $key;
		for my $line (split /\n/, $s->{out})
		{
			if ($line =~ /^KEY (\d+) (\d+) (\d+)$/) { $key = "r$1-$2-$3"; next }
			$r{groups}{$key} = $1 if $line =~ /"order_group": (\d+)/;
		}
		# stderr: the same KEY lines (\warn) followed by the error, if any
		undef $key;
		for my $line (split /\n/, $s->{err})
		{
			if ($line =~ /^KEY (\d+) (\d+) (\d+)$/) { $key = "r$1-$2-$3"; next }
			next unless $line =~ /ERROR/;
			if ($line =~ /insufficient stock/) { push @{ $r{MK001} }, $key }
			elsif ($line =~ /batched checkout interrupted/) { push @{ $r{MK006} }, $key }
			else { push @{ $r{other} }, "$key: $line" }
		}
	}
	return \%r;
}

# units that left stock per SKU, and units in order lines per SKU
sub sold_check
{
	my ($label) = @_;
	my $rows = $node->safe_psql(
		'postgres', qq{
SELECT s.sku_id, $STOCK - sum(s.on_hand), coalesce((SELECT sum(l.qty) FROM market.order_lines l
                                                    WHERE l.sku_id = s.sku_id), 0),
       min(s.free), min(s.on_hand)
  FROM market.stock_slots s GROUP BY s.sku_id ORDER BY s.sku_id});
	for my $row (split /\n/, $rows)
	{
		my ($sku, $left, $lines, $min_free, $min_on_hand) = split /\|/, $row;
		is($lines, $left, "$label: SKU $sku: the units in order lines ($lines) are those that left stock");
		cmp_ok($left, '<=', $STOCK, "$label: SKU $sku: no more sold than there was");
		cmp_ok($min_free, '>=', 0, "$label: SKU $sku: no slot below zero");
	}
}

my ($batches0, $requests0) = split /\|/,
  $node->safe_psql('postgres', 'SELECT batches, requests FROM market.batch_status()');

# 1. the race
my $r = finish_race(start_race(1));
my $tries = $SESSIONS * $ATTEMPTS;
my $ok = scalar keys %{ $r->{groups} };
is_deeply($r->{other}, [], 'no error but insufficient stock (no deadlock between the two workers)');
is($ok + scalar @{ $r->{MK001} }, $tries, "every call answered ($ok checkouts)");
cmp_ok($ok, '>', 0, 'some checkouts were made');
cmp_ok(scalar @{ $r->{MK001} }, '>', 0, 'and the sale sold out');
sold_check('race');

# 2. the groups are exactly those handed out, each complete
my $given = join ',', values %{ $r->{groups} };
is($node->safe_psql('postgres', 'SELECT count(*) FROM market.order_groups'),
	$ok, 'one order group per successful call, no other');
is($node->safe_psql('postgres', "SELECT count(*) FROM market.order_groups WHERE id IN ($given)"),
	$ok, 'and they are the ones handed out');
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FROM market.order_groups g
 WHERE NOT EXISTS (SELECT FROM market.orders o WHERE o.group_id = g.id)
    OR (SELECT count(*) FROM market.payments p WHERE p.group_id = g.id) <> 1
    OR (SELECT count(*) FROM market.outbox b JOIN market.payments p ON p.id = b.aggregate_id
         WHERE p.group_id = g.id AND b.event_type = 'payment.authorize') <> 1
    OR (SELECT sum(subtotal_minor) FROM market.orders o WHERE o.group_id = g.id) <> g.total_minor}),
	'0',
	'every group has its orders, one payment and one authorization job, and adds up');
my ($batches, $requests) = split /\|/,
  $node->safe_psql('postgres', 'SELECT batches, requests FROM market.batch_status()');
is($requests - $requests0, $tries, 'the worker answered every call');
cmp_ok($batches - $batches0, '<', $requests - $requests0,
	'in batches (' . ($batches - $batches0) . ' transactions)');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM market.idempotency_keys WHERE response IS NULL}),
	'0', 'no key was left without its response');
is( $node->safe_psql('postgres',
		q{SELECT count(DISTINCT actor) || ' ' || min(actor) FROM market.order_events}),
	'1 shopper', 'the order events name the calling role, not the worker');

# 3. replays: the same key returns the first response and writes nothing
my @sample = (sort keys %{ $r->{groups} })[ 0 .. 9 ];
my $events = $node->safe_psql('postgres', 'SELECT count(*) FROM market.order_events');
for my $mode ('on', 'off')
{
	my $replayed = 0;
	for my $key (@sample)
	{
		my ($round, $sess, $n) = $key =~ /^r(\d+)-(\d+)-(\d+)$/;
		my $cart = $carts[ $n % 4 ];
		my $doc = $node->safe_psql('postgres',
			"SET market.batch_checkout = $mode; SELECT market.buy_now('c$sess', '$cart', '$key', '{\"method\": \"pm_card_visa\"}', 'EUR')");
		$replayed++ if $doc =~ /"order_group": $r->{groups}{$key}\b/;
	}
	is($replayed, scalar @sample, "batch_checkout = $mode: replays return the first order group");
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM market.order_events'),
	$events, 'replays wrote nothing');
is($node->safe_psql('postgres', 'SELECT count(*) FROM market.verify_inventory()'),
	'0', 'audit clean after the race');

# 3b. one key sent by sixteen sessions at once, three times each: the copies
# that share a batch with the first are applied after its orders are written
# and replay them; every call succeeds and one checkout is made
$node->safe_psql('postgres', 'SELECT market.stock_set(2, 1, 100)');
$node->pgbench(
	'-n -c 16 -j 4 -t 3 -U shopper',
	0,
	[qr{processed: 48/48}],
	[],
	'sixteen sessions send one key three times each, every call succeeds',
	{
		'005_dupkey' => q{SET market.batch_checkout = on;
SELECT market.buy_now('dup', '[{"sku_id": 2, "qty": 1}]', 'dup-key', '{"method": "pm_card_visa"}', 'EUR');
}
	});
is( $node->safe_psql('postgres',
		q{SELECT count(*) || ' ' || count(k.response) FROM market.order_groups g
		   LEFT JOIN market.idempotency_keys k ON k.customer_id = 'dup' AND k.key = 'dup-key'
		  WHERE g.customer_id = 'dup'}),
	'1 1', 'one order group for the key, and its response stored');

# 3c. a key held by a direct buy_now that has not committed yet, sent again
# batched from four sessions while eight others buy with keys of their own:
# a batch claims its chunk's keys with one statement, which waits for the
# holder, runs out of the batch's lock_timeout and gives way to a claim per
# checkout; every other checkout is made, and once the holder commits the
# copies of its key replay its response
$node->safe_psql('postgres', 'SELECT market.stock_set(2, 1, 200)');
$node->safe_psql('postgres', 'ALTER SYSTEM SET log_min_messages = debug1');
$node->reload;
my $log_offset = -s $node->logfile;
my $holder = $node->background_psql('postgres');
$holder->query_safe('BEGIN');
my $held_group = $holder->query_safe(
	q{SELECT market.buy_now('held', '[{"sku_id": 2, "qty": 1}]', 'held-key', '{"method": "pm_card_visa"}', 'EUR') ->> 'order_group'});
my @copies;
{
	local $ENV{PGOPTIONS} = '-c market.batch_checkout=on';
	for my $i (1 .. 4)
	{
		my %c = (out => '', err => '');
		$c{h} = IPC::Run::start(
			[
				'psql', '-X', '-A', '-t', '-d', $node->connstr('postgres') . ' user=shopper', '-c',
				q{SELECT market.buy_now('held', '[{"sku_id": 2, "qty": 1}]', 'held-key', '{"method": "pm_card_visa"}', 'EUR') ->> 'order_group'}
			],
			'<', \undef, '>', \$c{out}, '2>', \$c{err});
		push @copies, \%c;
	}
	my $script = "${PostgreSQL::Test::Utils::tmp_check}/held_key_others.sql";
	PostgreSQL::Test::Utils::append_to_file($script,
		q{SELECT market.buy_now('other-' || :client_id, '[{"sku_id": 2, "qty": 1}]', gen_random_uuid()::text, '{"method": "pm_card_visa"}', 'EUR');
});
	my %o = (out => '', err => '');
	$o{h} = IPC::Run::start(
		[ 'pgbench', '-n', '-c', '8', '-j', '2', '-t', '10', '-f', $script, '-U', 'shopper', $node->connstr('postgres') ],
		'<', \undef, '>', \$o{out}, '2>', \$o{err});
	push @copies, \%o;
}
my $fell_back = 0;
for (1 .. 300)
{
	$fell_back = 1 if slurp_file($node->logfile, $log_offset) =~ /claiming \d+ idempotency keys at once failed/;
	last if $fell_back;
	usleep(100_000);
}
ok($fell_back, 'the one-statement claim of a chunk holding the uncommitted key gave way to claims per checkout');
$holder->query_safe('COMMIT');
$holder->quit;
$_->{h}->finish for @copies;
my $others = pop @copies;
like($others->{out}, qr{processed: 80/80}, 'the other checkouts sent meanwhile were all made')
  or diag($others->{err});
is_deeply([ map { $_->{out} =~ s/\s+//gr } @copies ], [ ($held_group) x 4 ],
	'the four batched copies of the held key replay its order group');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM market.order_groups WHERE customer_id = 'held'}),
	'1', 'one checkout for the held key');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM market.idempotency_keys WHERE response IS NULL}),
	'0', 'no key was left without its response');
$node->safe_psql('postgres', 'ALTER SYSTEM RESET log_min_messages');
$node->reload;

# 4. the worker is terminated in the middle of a second race (fresh stock)
$node->safe_psql('postgres',
	"SELECT market.stock_set(s, 1, $STOCK) FROM generate_series(1, 3) AS s");
my $sold_before = $node->safe_psql('postgres', 'SELECT coalesce(sum(qty), 0) FROM market.order_lines');
# A session holds SKU 1's slot rows, so the workers' batches stop at the
# first checkout of SKU 1 while holding others: terminating the workers then
# leaves requests taken and unanswered, which their successors answer MK006.
my $blocker = $node->background_psql('postgres');
$blocker->query_safe('BEGIN');
$blocker->query_safe('SELECT slot FROM market.stock_slots WHERE sku_id = 1 FOR UPDATE');
my $race = start_race(2);
$node->poll_query_until('postgres',
	q{SELECT count(*) > 0 FROM pg_stat_activity
	   WHERE backend_type = 'market batch worker' AND wait_event_type = 'Lock'})
  or die 'no batch worker ever waited for the blocked SKU';
my $old_pids = $node->safe_psql('postgres',
	q{SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE backend_type = 'market batch worker'});
$node->safe_psql('postgres',
	q{SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE backend_type = 'market batch worker'});
ok($node->poll_query_until('postgres', 'SELECT retried_alone > 0 FROM market.batch_status()'),
	'a checkout whose lock wait timed out in a batch was applied again on its own');
$blocker->query_safe('COMMIT');
$blocker->quit;
$r = finish_race($race);
is_deeply($r->{other}, [], 'after terminating the workers: no error but MK001 and MK006');
cmp_ok(scalar @{ $r->{MK006} }, '>', 0,
	'the checkouts the terminated workers held were answered MK006 (' . scalar(@{ $r->{MK006} }) . ')');
is( scalar(keys %{ $r->{groups} }) + @{ $r->{MK001} } + @{ $r->{MK006} },
	$tries,
	'every call got an answer ('
	  . scalar(keys %{ $r->{groups} })
	  . " checkouts, @{[ scalar @{ $r->{MK006} } ]} MK006)");
$node->poll_query_until('postgres',
	"SELECT running AND pid NOT IN ($old_pids) FROM market.batch_status()")
  or die 'batch worker did not come back';

# a retry of each interrupted call with its key settles it, exactly once
my $settled = 0;
for my $key (@{ $r->{MK006} })
{
	my ($round, $sess, $n) = $key =~ /^r(\d+)-(\d+)-(\d+)$/;
	my $cart = $carts[ $n % 4 ];
	my ($ret, $out, $err) = $node->psql('postgres',
		"SET market.batch_checkout = on; SELECT market.buy_now('c$sess', '$cart', '$key', '{\"method\": \"pm_card_visa\"}', 'EUR')");
	if ($out =~ /"order_group": (\d+)/) { $r->{groups}{$key} = $1; $settled++ }
	elsif ($err =~ /insufficient stock/) { $settled++ }
}
is($settled, scalar @{ $r->{MK006} }, 'every interrupted checkout settled on retry');
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM market.idempotency_keys WHERE key LIKE 'r2-%'"),
	scalar(grep { /^r2-/ } keys %{ $r->{groups} }),
	'the keys of round 2 are exactly the checkouts made');
is( $node->safe_psql('postgres',
		q{SELECT count(*) FROM market.idempotency_keys WHERE response IS NULL}),
	'0', 'no key was left without its response');
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FROM market.order_groups g
 WHERE NOT EXISTS (SELECT FROM market.orders o WHERE o.group_id = g.id)
    OR (SELECT count(*) FROM market.payments p WHERE p.group_id = g.id) <> 1}),
	'0', 'no order group is half written');
is( $node->safe_psql('postgres',
		"SELECT coalesce(sum(qty), 0) FROM market.order_lines l JOIN market.orders o ON o.id = l.order_id
		  JOIN market.order_groups g ON g.id = o.group_id
		  JOIN market.idempotency_keys k ON (k.response ->> 'order_group')::bigint = g.id
		 WHERE k.key LIKE 'r2-%'"),
	$node->safe_psql('postgres', "SELECT sum(qty) - $sold_before FROM market.order_lines"),
	'every unit sold in round 2 belongs to a checkout a client holds');
is($node->safe_psql('postgres', 'SELECT count(*) FROM market.verify_inventory()'),
	'0', 'audit clean after the worker was terminated');

$node->stop;
done_testing();
