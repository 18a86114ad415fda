
# Copyright: the market project.
#
# The batched reservation path under contention: 32 sessions with
# market.batch_reserve = on race for 500 units of one SKU, 100 attempts
# each, as single statements (so every call goes through the batch worker).
#
# Proves:
#   1. exactly 500 reservations succeed, every other attempt is told
#      "insufficient stock" (MK001), and no other error happens;
#   2. the worker really batched (fewer transactions than requests);
#   3. the units held are exactly those of the reservations the clients
#      were given, and the audit is clean;
#   4. terminating the batch worker in the middle of the race loses
#      nothing: every client gets an answer (a reservation, MK001, or MK006
#      for a request the dying worker held), the reservations in the
#      database are exactly those the clients were given, the worker comes
#      back and batches again.
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
my $ATTEMPTS = 100;
my $STOCK = 500;

my $node = PostgreSQL::Test::Cluster->new('market_batch');
$node->init;
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'market'
market.database = 'postgres'
max_connections = 60
# commits wait for the disk, as in production
fsync = on
});
$node->start;

$node->safe_psql(
	'postgres', qq{
CREATE EXTENSION market;
SELECT market.seller_create('s');
SELECT market.product_create(1, 'p');
SELECT market.warehouse_create('w', 'w');
SELECT market.sku_create(1, 'HOT', 100, 'EUR');
SELECT market.stock_set(1, 1, $STOCK);
});
$node->poll_query_until('postgres', 'SELECT running FROM market.batch_status()')
  or die 'batch worker not ready';

# start $SESSIONS psql processes, each running $ATTEMPTS single-statement
# reservations with the batch path on; errors do not stop them
sub start_race
{
	my @sessions;
	# a file, not stdin: IPC::Run feeds a scalar only while it is pumped,
	# which would run the sessions one after the other
	my $script = "${PostgreSQL::Test::Utils::tmp_check}/batch_race.sql";
	PostgreSQL::Test::Utils::append_to_file($script,
		qq{SELECT market.reserve('[{"sku_id": 1, "qty": 1}]');\n} x $ATTEMPTS)
	  unless -e $script;
	local $ENV{PGOPTIONS} = '-c market.batch_reserve=on';
	for my $i (1 .. $SESSIONS)
	{
		my %s = (out => '', err => '');
		$s{h} = IPC::Run::start(
			[
				'psql', '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=0',
				'-d', $node->connstr('postgres'), '-f', $script
			],
			'<', \undef, '>', \$s{out}, '2>', \$s{err});
		push @sessions, \%s;
	}
	return \@sessions;
}

# wait for every session; count reservations handed out and errors by kind
sub finish_race
{
	my ($sessions) = @_;
	my %r = (ids => [], MK001 => 0, MK006 => 0, other => []);
	for my $s (@$sessions)
	{
		$s->{h}->finish;
		push @{ $r{ids} }, ($s->{out} =~ /^([0-9a-f]{8}-[0-9a-f-]{27})$/mg);
		for my $line (grep { /ERROR/ } split /\n/, $s->{err})
		{
			if ($line =~ /insufficient stock/) { $r{MK001}++ }
			elsif ($line =~ /batched reservation interrupted/) { $r{MK006}++ }
			else { push @{ $r{other} }, $line }
		}
	}
	return \%r;
}

my $before = $node->safe_psql('postgres',
	'SELECT batches || \' \' || requests FROM market.batch_status()');
my ($batches0, $requests0) = split / /, $before;

# 1. the race.  A session holds the SKU's slot rows for the first second,
# so the worker's first reservation waits and the others pile up behind it:
# the worker must then take them as a batch.
my $blocker = $node->background_psql('postgres');
$blocker->query_safe('BEGIN');
$blocker->query_safe('SELECT slot FROM market.stock_slots WHERE sku_id = 1 FOR UPDATE');
my $race = start_race();
usleep(1_000_000);
$blocker->query_safe('COMMIT');
$blocker->quit;
my $r = finish_race($race);
my $tries = $SESSIONS * $ATTEMPTS;
is(scalar @{ $r->{ids} }, $STOCK, "exactly $STOCK of $tries attempts got a reservation");
is($r->{MK001}, $tries - $STOCK, 'every other attempt was told insufficient stock');
is_deeply($r->{other}, [], 'no other error');

# 2. it went through the worker, in batches
my ($batches, $requests) = split / /,
  $node->safe_psql('postgres',
	'SELECT batches || \' \' || requests FROM market.batch_status()');
is($requests - $requests0, $tries, 'the worker answered every attempt');
cmp_ok($batches - $batches0, '<', $requests - $requests0,
	'the worker applied them in batches (' . ($batches - $batches0) . ' transactions)');
cmp_ok($node->safe_psql('postgres', 'SELECT largest_batch FROM market.batch_status()'),
	'>', 1, 'one batch held several requests');

# 3. what is held is what the clients were given
my $given = join ',', map { "'$_'" } @{ $r->{ids} };
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM market.reservations WHERE status = 'held' AND id IN ($given)"),
	$STOCK,
	'every reservation handed out is held');
is($node->safe_psql('postgres', "SELECT count(*) FROM market.reservations"),
	$STOCK, 'and there is no other');
is($node->safe_psql('postgres', 'SELECT sum(free) FROM market.stock_slots'),
	'0', 'the SKU is sold out');
is($node->safe_psql('postgres', 'SELECT count(*) FROM market.verify_inventory()'),
	'0', 'audit clean after the race');

# 4. the worker is terminated in the middle of a race
$node->safe_psql('postgres',
	"SELECT count(market.reservation_release(id)) FROM market.reservations WHERE status = 'held'");
my $old_pid = $node->safe_psql('postgres', 'SELECT pid FROM market.batch_status()');
my $sessions = start_race();
usleep(300_000);
$node->safe_psql('postgres', "SELECT pg_terminate_backend($old_pid)");
$r = finish_race($sessions);
is_deeply($r->{other}, [], 'after terminating the worker: no error but MK001 and MK006');
is(scalar(@{ $r->{ids} }) + $r->{MK001} + $r->{MK006},
	$tries, 'every attempt got an answer (' . scalar(@{ $r->{ids} }) . " reservations, $r->{MK006} MK006)");
$given = join ',', map { "'$_'" } @{ $r->{ids} };
is( $node->safe_psql('postgres',
		"SELECT count(*) FROM market.reservations WHERE status = 'held'"),
	scalar @{ $r->{ids} },
	'the reservations held are exactly those handed out');
if (@{ $r->{ids} })
{
	is( $node->safe_psql('postgres',
			"SELECT count(*) FROM market.reservations WHERE status = 'held' AND id IN ($given)"),
		scalar @{ $r->{ids} },
		'and they are the same ones');
}
is($node->safe_psql('postgres', 'SELECT count(*) FROM market.verify_inventory()'),
	'0', 'audit clean after the worker was terminated');

$node->poll_query_until('postgres',
	"SELECT running AND pid <> $old_pid FROM market.batch_status()")
  or die 'batch worker did not come back';
$node->safe_psql('postgres',
	"SELECT count(market.reservation_release(id)) FROM market.reservations WHERE status = 'held'");
my ($requests_before_last) = $node->safe_psql('postgres', 'SELECT requests FROM market.batch_status()');
my $id = $node->safe_psql(
	'postgres', q{SET market.batch_reserve = on;
SELECT market.reserve('[{"sku_id": 1, "qty": 1}]')});
like($id, qr/^[0-9a-f-]{36}$/, 'the restarted worker reserves');
cmp_ok($node->safe_psql('postgres', 'SELECT requests FROM market.batch_status()'),
	'>', $requests_before_last, 'through the batch path');

$node->stop;
done_testing();
