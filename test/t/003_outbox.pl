
# Copyright: the market project.
#
# The outbox wake-ups and upkeep, with the library preloaded:
#
#   1. the "market outbox notifier" worker runs and shows in outbox_status()
#   2. a session that LISTENs on market_outbox_events / market_outbox_psp is
#      notified after another session commits outbox rows of that topic, by
#      the notifier (not by the writing session, which sends no NOTIFY), and
#      only for that topic
#   3. a rolled-back transaction wakes nobody
#   4. many commits in a row share notifications: at most one per
#      market.outbox_notify_interval, and the last commit is notified too
#   5. SIGTERM: the notifier comes back with a new pid and still notifies;
#      after a restart of the server too
#   6. clean-up with nobody calling: acked rows older than
#      market.outbox_retention disappear; market.idempotency_purge(int) is
#      called when it exists
#   7. market.outbox_worker = off: no notifier, and the writing transaction
#      sends the NOTIFY itself (the fallback)
#
# Run it with test/tools/run-tap.sh (as the postgres OS user when root).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

my $node = PostgreSQL::Test::Cluster->new('market_outbox');
$node->init;
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'market'
market.database = 'postgres'
market.expiry_worker = off
market.outbox_cleanup_interval = '1s'
track_functions = 'all'
max_connections = 30
});
$node->start;

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

sub sql
{
	my ($query) = @_;
	return $node->safe_psql('postgres', $query);
}

# Poll every 100 ms until $query answers 't'; the seconds waited, or undef.
sub wait_until
{
	my ($query, $timeout) = @_;
	my $start = time;
	while (time - $start < $timeout)
	{
		my ($ret, $out, $err) = $node->psql('postgres', $query);
		return time - $start if $ret == 0 && $out eq 't';
		usleep(100_000);
	}
	diag "timed out after ${timeout}s waiting for: $query";
	return undef;
}

sub notifier_pid
{
	return sql(
		"SELECT coalesce(string_agg(pid::text, ','), '') FROM pg_stat_activity
		  WHERE backend_type = 'market outbox notifier'");
}

# Wait until exactly one notifier runs, in database postgres, other than
# $not when given.  Returns its pid or undef.
sub wait_for_notifier
{
	my ($not, $timeout) = @_;
	my $cond = defined $not ? "AND min(pid) <> $not" : '';
	my $waited = wait_until(
		"SELECT count(*) = 1 AND min(datname) = 'postgres' $cond
		   FROM pg_stat_activity WHERE backend_type = 'market outbox notifier'",
		$timeout // 60);
	return undef unless defined $waited;
	return notifier_pid();
}

# The notifications psql printed for a listening background session, as
# [channel, payload, pid]; psql prints them after the next command it runs.
sub collect
{
	my ($bg) = @_;
	my $out = $bg->query('SELECT 1');
	my @got;
	while ($out =~
		/Asynchronous notification "([^"]+)" with payload "([^"]*)" received from server process with PID (\d+)\./g
	  )
	{
		push @got, [ $1, $2, $3 ];
	}
	return @got;
}

# Collect for up to $timeout seconds, until $want notifications arrived
# (or the whole time when $want is 0).
sub listen_for
{
	my ($bg, $timeout, $want) = @_;
	my @got;
	my $start = time;
	while (time - $start < $timeout)
	{
		push @got, collect($bg);
		last if $want && @got >= $want;
		usleep(100_000);
	}
	return @got;
}

sub add_rows
{
	my ($topic, $agg, $n) = @_;
	sql("INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id)
		 SELECT '$topic', 'tap', '$agg', g FROM generate_series(1, $n) g");
}

sub channels
{
	return join(',', map { $_->[0] . '/' . $_->[1] } @_);
}

# ---------------------------------------------------------------------------
# 1. the notifier runs
# ---------------------------------------------------------------------------

sql('CREATE EXTENSION market');
my $npid = wait_for_notifier(undef, 60);
ok(defined $npid && $npid =~ /^\d+$/,
	"one 'market outbox notifier' in pg_stat_activity, database postgres");
BAIL_OUT('no outbox notifier: the other scenarios would only time out')
  unless defined $npid && $npid =~ /^\d+$/;
is(sql("SELECT string_agg(DISTINCT notifier_pid::text, ',') FROM market.outbox_status()"),
	$npid, 'outbox_status() shows its pid for every topic');

my $listener = $node->background_psql('postgres', on_error_stop => 0);
$listener->query_safe('LISTEN market_outbox_events');
$listener->query_safe('LISTEN market_outbox_psp');
listen_for($listener, 1, 0);    # whatever the start-up sent

# ---------------------------------------------------------------------------
# 2. a commit wakes the listener, through the notifier
# ---------------------------------------------------------------------------

{
	my $before = sql("SELECT notifies FROM market.outbox_status() WHERE topic = 'events'");
	add_rows('events', 'tap2', 3);
	my @got = listen_for($listener, 10, 1);
	is(channels(@got), 'market_outbox_events/events',
		'one notification on market_outbox_events, payload "events", after a commit of 3 rows');
	is($got[0][2], $npid, 'sent by the notifier, not by the writing session')
	  if @got;
	cmp_ok(sql("SELECT notifies FROM market.outbox_status() WHERE topic = 'events'"),
		'>', $before, 'outbox_status().notifies counts it');
	is(sql("SELECT count(*) FROM market.outbox_claim('tap', 10)"),
		'3', 'the woken consumer finds the rows');

	add_rows('psp', 'tap2', 1);
	@got = listen_for($listener, 10, 1);
	is(channels(@got), 'market_outbox_psp/psp', 'a psp row wakes market_outbox_psp only');
}

# ---------------------------------------------------------------------------
# 3. a rolled-back transaction wakes nobody
# ---------------------------------------------------------------------------

{
	sql("BEGIN;
		 INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id)
		 VALUES ('events', 'tap', 'tap3', 1), ('psp', 'tap', 'tap3', 1);
		 ROLLBACK;");
	my @got = listen_for($listener, 2, 0);
	is(channels(@got), '', 'no notification within 2 s of a rollback');
	add_rows('events', 'tap3', 1);
	@got = listen_for($listener, 10, 1);
	is(channels(@got), 'market_outbox_events/events',
		'the next commit is notified (the listener was listening all along)');
}

# ---------------------------------------------------------------------------
# 4. many commits: they share notifications (at most one per
#    market.outbox_notify_interval), and the last one is notified too
# ---------------------------------------------------------------------------

{
	my $n = 100;
	my $script = join('',
		map { "INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id) VALUES ('events', 'tap', 'tap4', $_);\n" }
		  1 .. $n);

	# default interval (10 ms)
	my $t0 = time;
	sql($script);
	note sprintf('%d commits in %.2f s', $n, time - $t0);
	my @got = listen_for($listener, 3, 0);
	cmp_ok(scalar(@got), '>=', 1, "$n commits: notified");
	cmp_ok(scalar(@got), '<=', $n, "$n commits: at most one notification each");
	is(join(',', sort keys %{ { map { $_->[0] => 1 } @got } }),
		'market_outbox_events', 'all on market_outbox_events');
	note scalar(@got) . " notifications for $n commits (interval 10 ms)";

	# a long interval: the commits share one or two notifications
	sql("ALTER SYSTEM SET market.outbox_notify_interval = '1s'");
	sql('SELECT pg_reload_conf()');
	ok(wait_until("SELECT current_setting('market.outbox_notify_interval') = '1s'", 10),
		'market.outbox_notify_interval = 1s');
	usleep(500_000);    # the notifier reloads on its next wake
	add_rows('events', 'tap4-reload', 1);    # that wake
	listen_for($listener, 2, 0);
	$t0 = time;
	sql($script);
	my $commit_secs = time - $t0;
	@got = listen_for($listener, 4, 0);
	note sprintf('%d commits in %.2f s: %d notifications (interval 1 s)',
		$n, $commit_secs, scalar(@got));
	cmp_ok(scalar(@got), '>=', 1, "$n commits, interval 1 s: notified");
	cmp_ok(scalar(@got), '<=', 2 + int($commit_secs),
		"$n commits, interval 1 s: no more than one notification per second");
	is( sql(
			"SELECT last_notify >= (SELECT max(created_at) FROM market.outbox WHERE aggregate_type = 'tap4')
			   FROM market.outbox_status() WHERE topic = 'events'"),
		't', 'the last commit was followed by a notification');
	sql('ALTER SYSTEM RESET market.outbox_notify_interval');
	sql('SELECT pg_reload_conf()');
	is(sql("SELECT count(*) FROM market.outbox WHERE aggregate_type = 'tap4'"),
		2 * $n, 'all the rows are there');
}

# ---------------------------------------------------------------------------
# 5. SIGTERM and restart: the notifier comes back and still notifies
# ---------------------------------------------------------------------------

{
	my $old = notifier_pid();
	ok(kill('TERM', $old), "kill TERM notifier $old");
	my $new = wait_for_notifier($old, 60);
	ok(defined $new, 'the notifier is back after SIGTERM');
	isnt($new // '', $old, "with a new pid ($old -> " . ($new // 'none') . ')');
	listen_for($listener, 1, 0);    # the start-up notifications
	add_rows('events', 'tap5', 1);
	my @got = listen_for($listener, 10, 1);
	is(channels(@got), 'market_outbox_events/events', 'the new notifier notifies');
	is($got[0][2], $new, 'from its new pid') if @got;
	is(sql("SELECT string_agg(DISTINCT notifier_pid::text, ',') FROM market.outbox_status()"),
		$new, 'outbox_status() follows the new pid');

	$listener->quit;
	$node->restart;
	$new = wait_for_notifier(undef, 60);
	ok(defined $new, 'the notifier is back after a server restart');
	$listener = $node->background_psql('postgres', on_error_stop => 0);
	$listener->query_safe('LISTEN market_outbox_events');
	listen_for($listener, 1, 0);
	add_rows('events', 'tap5', 1);
	@got = listen_for($listener, 10, 1);
	is(channels(@got), 'market_outbox_events/events', 'and notifies after the restart');
}

# ---------------------------------------------------------------------------
# 6. clean-up with nobody calling
# ---------------------------------------------------------------------------

{
	# the purge of idempotency keys belongs to another part; stand in for
	# it when it is not there, so that the call can be seen
	my $has_purge = sql(
		"SELECT to_regprocedure('market.idempotency_purge(int)') IS NOT NULL");
	if ($has_purge ne 't')
	{
		sql(q{CREATE FUNCTION market.idempotency_purge(max int) RETURNS int
			  LANGUAGE plpgsql AS $$ BEGIN RETURN 0; END $$});
		note 'market.idempotency_purge(int) stood in by the test';
	}

	# everything undelivered so far is delivered now
	sql("SELECT market.outbox_ack(array_agg(id)) FROM market.outbox
		  WHERE acked_at IS NULL AND dead_at IS NULL");
	my $acked = sql('SELECT count(*) FROM market.outbox WHERE acked_at IS NOT NULL');
	cmp_ok($acked, '>', 100, "$acked acked rows");
	add_rows('events', 'tap6-young', 5);    # not acked: must stay
	my $cleaned_before = sql("SELECT max(cleaned_total) FROM market.outbox_notifier()");

	sql("ALTER SYSTEM SET market.outbox_retention = '2s'");
	sql('SELECT pg_reload_conf()');
	ok(wait_until(
			'SELECT count(*) = 0 FROM market.outbox WHERE acked_at IS NOT NULL', 30),
		'the acked rows are deleted by the notifier within seconds of their retention');
	is(sql("SELECT count(*) FROM market.outbox WHERE aggregate_type = 'tap6-young'"),
		'5', 'the undelivered rows are still there');
	cmp_ok(sql("SELECT max(cleaned_total) FROM market.outbox_notifier()"),
		'>=', $cleaned_before + $acked, 'outbox_notifier().cleaned_total counts them');
	ok(sql('SELECT max(last_cleanup) > now() - interval \'10 s\' FROM market.outbox_status()') eq 't',
		'outbox_status().last_cleanup is recent');
	ok(wait_until(
			"SELECT coalesce(sum(calls), 0) > 0 FROM pg_stat_user_functions
			  WHERE schemaname = 'market' AND funcname = 'idempotency_purge'", 30),
		'market.idempotency_purge(int) is called by the notifier');
	if ($has_purge eq 't')
	{
		# the real purge: a key past market.idempotency_retention (24 h) goes,
		# a young one stays
		sql(q{INSERT INTO market.idempotency_keys
				(customer_id, key, operation, fingerprint, response, created_at)
			  VALUES ('tap6', 'old', 'buy_now', '\x00', '{}', now() - interval '3 days'),
					 ('tap6', 'young', 'buy_now', '\x00', '{}', now())});
		ok(wait_until(
				"SELECT count(*) = 0 FROM market.idempotency_keys WHERE customer_id = 'tap6' AND key = 'old'",
				30),
			'an idempotency key past its retention is purged with nobody calling');
		is(sql("SELECT count(*) FROM market.idempotency_keys WHERE customer_id = 'tap6' AND key = 'young'"),
			'1', 'a young idempotency key stays');
	}
	sql('ALTER SYSTEM RESET market.outbox_retention');
	sql('SELECT pg_reload_conf()');
	if ($has_purge ne 't')
	{
		sql('DROP FUNCTION market.idempotency_purge(int)');
	}
}

# ---------------------------------------------------------------------------
# 7. without the notifier: the writing transaction notifies
# ---------------------------------------------------------------------------

{
	$listener->quit;
	$node->append_conf('postgresql.conf', "market.outbox_worker = off\n");
	$node->restart;
	is(sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'market outbox notifier'"),
		'0', 'market.outbox_worker = off: no notifier');
	is(sql("SELECT count(*) FROM market.outbox_status() WHERE notifier_pid IS NULL"),
		'2', 'outbox_status() shows no notifier pid');

	$listener = $node->background_psql('postgres', on_error_stop => 0);
	$listener->query_safe('LISTEN market_outbox_events');
	$listener->query_safe('LISTEN market_outbox_psp');
	my $producer = $node->background_psql('postgres', on_error_stop => 0);
	my $ppid = $producer->query_safe('SELECT pg_backend_pid()');

	$producer->query_safe(
		"INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id)
		 SELECT 'psp', 'tap', 'tap7', g FROM generate_series(1, 3) g");
	my @got = listen_for($listener, 10, 1);
	is(channels(@got), 'market_outbox_psp/psp', 'fallback: one notification for 3 rows');
	is($got[0][2], $ppid, 'sent by the writing session itself') if @got;

	$producer->query_safe('BEGIN');
	$producer->query_safe(
		"INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id)
		 VALUES ('events', 'tap', 'tap7', 1)");
	$producer->query_safe('ROLLBACK');
	@got = listen_for($listener, 2, 0);
	is(channels(@got), '', 'fallback: nothing for a rollback');

	$producer->quit;
	$listener->quit;
}

$node->stop;
done_testing();
