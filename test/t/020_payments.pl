# Copyright: the market project.
#
# The PSP worker end to end, against the test PSP (test/psp/):
#
#   1. success at the first account by priority (Stripe): authorized, the
#      order confirmed; then capture, void and refund through the orders
#   2. a hard decline: the payment fails, the order is payment_failed, no
#      other account is tried
#   3. a soft decline at Stripe fails over to Adyen, which authorizes
#   4. Stripe down (connection refused): payments fail over at once, the
#      breaker opens, and once Stripe is back a probe closes it (recovery)
#   5. a timeout where the charge did happen (hold): the worker replays the
#      same key, gives up after market.psp_max_retries, fails over to Adyen,
#      and the reconcile job voids the late Stripe authorization
#   6. kill -9 of the worker while its request is in flight, and before it
#      sends (intent committed): after the restart the same key is replayed
#   7. PayPal: token, order, authorization, capture
#
# Each ends with exactly one live authorization per authorized payment on
# the test PSP's ledger, none for a failed one, and every PSP outbox row
# acked.  Run with test/tools/run-tap.sh (as the postgres OS user when root).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use HTTP::Tiny;
use JSON::PP;
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use Time::HiRes qw(usleep time);

my $PSPDIR = abs_path(dirname(__FILE__) . '/../psp');
my $BIN = "$PSPDIR/market-test-psp";
if (!-x $BIN)
{
	system('make', '-s', '-C', $PSPDIR) == 0 or BAIL_OUT("cannot build $BIN");
}

# ---------------------------------------------------------------------------
# the test PSP
# ---------------------------------------------------------------------------
my $psp_pid = open(my $srv, '-|', $BIN, '--seed', '7', '--stripe-port', '0', '--adyen-port', '0',
	'--paypal-port', '0') or BAIL_OUT("cannot start $BIN: $!");
my $ports = decode_json(scalar <$srv>);
my $CB = "http://127.0.0.1:$ports->{control_port}/_control";
END { if ($psp_pid) { kill 'TERM', $psp_pid; waitpid($psp_pid, 0); } }

my $http = HTTP::Tiny->new(timeout => 10);
sub control
{
	my ($method, $path, $body) = @_;
	my $r = $http->request($method, "$CB/$path",
		{ headers => { 'Content-Type' => 'application/json' },
		  defined $body ? (content => encode_json($body)) : () });
	die "control $method $path: $r->{status} $r->{content}" unless $r->{success};
	return length($r->{content}) ? decode_json($r->{content}) : undef;
}

# ---------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------
my $node = PostgreSQL::Test::Cluster->new('market_payments');
$node->init;
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'market'
market.database = 'postgres'
market.expiry_worker = off
# kill -9 of the PSP worker restarts the server (the test relies on it)
restart_after_crash = on
market.psp_timeout = '1s'
market.psp_connect_timeout = '500ms'
market.psp_poll_interval = '50ms'
market.psp_lease = '5s'
market.psp_max_retries = 5
market.psp_retry_base = '100ms'
market.psp_retry_max_backoff = '1s'
market.psp_breaker_threshold = 3
market.psp_breaker_cooldown = '3s'
});
$node->start;

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub wait_until
{
	my ($query, $timeout) = @_;
	my $start = time;
	while (time - $start < $timeout)
	{
		my ($ret, $out) = $node->psql('postgres', $query);
		return 1 if $ret == 0 && $out eq 't';
		usleep(100_000);
	}
	diag "timed out after ${timeout}s waiting for: $query";
	return 0;
}

sql("CREATE EXTENSION market");
sql(qq{
	SELECT market.seller_create('Pay TAP Seller');
	SELECT market.psp_register('stripe-a', 'stripe', 'http://127.0.0.1:$ports->{stripe_port}',
		'{"secret_key": "sk_test_tap"}', 10);
	SELECT market.psp_register('adyen-b', 'adyen', 'http://127.0.0.1:$ports->{adyen_port}',
		'{"api_key": "tapkey", "merchant_account": "TapMA"}', 20);
	CREATE FUNCTION public.pay(method text, amount bigint, psp text DEFAULT NULL) RETURNS bigint
	LANGUAGE plpgsql AS \$\$
	DECLARE g bigint; p bigint;
	BEGIN
		INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
		VALUES (gen_random_uuid(), 'tap', 'USD', amount) RETURNING id INTO g;
		INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
		VALUES (g, (SELECT min(id) FROM market.sellers), 'tap', 'USD', amount);
		INSERT INTO market.payments (group_id, customer_id, currency, amount_minor, method, psp)
		VALUES (g, 'tap', 'USD', amount, method, psp) RETURNING id INTO p;
		INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
		VALUES ('psp', 'payment.authorize', 'payment', p,
				jsonb_build_object('payment_id', p, 'group_id', g, 'amount_minor', amount,
								   'currency', 'USD', 'method', method, 'psp', psp));
		RETURN p;
	END \$\$;
	CREATE FUNCTION public.order_of(p bigint) RETURNS bigint LANGUAGE sql AS
		\$\$ SELECT o.id FROM market.orders o JOIN market.payments x ON x.group_id = o.group_id WHERE x.id = p \$\$;
});

ok(wait_until("SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'market psp worker'", 20),
	'the PSP worker runs');

sub status { return sql("SELECT p.status || '/' || coalesce(a.name, '-') || '/' || o.status
	FROM market.payments p LEFT JOIN market.psp_accounts a ON a.id = p.psp_account_id
	JOIN market.orders o ON o.group_id = p.group_id WHERE p.id = $_[0]"); }
sub settled { return wait_until("SELECT status <> 'pending' FROM market.payments WHERE id = $_[0]", $_[1] // 20); }

# the live authorizations of a payment on the PSP's ledger
sub live_charges
{
	my ($p) = @_;
	my $l = control('GET', "ledger?reference=mk-pay-$p");
	return scalar grep { $_->{authorized} > 0 && $_->{state} ne 'voided' } @{ $l->{payments} };
}
sub all_charges
{
	my ($p) = @_;
	my $l = control('GET', "ledger?reference=mk-pay-$p");
	return scalar grep { $_->{authorized} > 0 } @{ $l->{payments} };
}

my %expect;    # payment id => live charges expected at the end

# ---------------------------------------------------------------------------
# 1. success, then capture, void and refund
# ---------------------------------------------------------------------------
my $p1 = sql("SELECT pay('pm_card_visa', 1500)");
ok(settled($p1), 'payment 1 decided');
is(status($p1), 'authorized/stripe-a/confirmed', 'success: authorized at stripe-a, order confirmed');
is(live_charges($p1), 1, 'success: one authorization on the ledger');
$expect{$p1} = 1;
sql("SELECT market.order_transition(order_of($p1), 'shipped')");
ok(wait_until("SELECT status = 'captured' AND captured_minor = 1500 FROM market.payments WHERE id = $p1", 20),
	'shipping captures');
sql("SELECT market.order_transition(order_of($p1), s) FROM unnest(ARRAY['delivered', 'returned', 'refunded']) s");
ok(wait_until("SELECT status = 'refunded' AND refunded_minor = 1500 FROM market.payments WHERE id = $p1", 20),
	'a return refunds');
my $l1 = control('GET', "ledger?reference=mk-pay-$p1")->{payments}[0];
is("$l1->{captured}/$l1->{refunded}/$l1->{state}", '1500/1500/refunded', 'the ledger agrees');

my $p1v = sql("SELECT pay('pm_card_visa', 1600)");
ok(settled($p1v), 'payment 1v decided');
sql("SELECT market.order_transition(order_of($p1v), 'cancelled')");
ok(wait_until("SELECT status = 'voided' FROM market.payments WHERE id = $p1v", 20), 'cancelling voids');
is(control('GET', "ledger?reference=mk-pay-$p1v")->{payments}[0]{state}, 'voided', 'voided on the ledger');
$expect{$p1v} = 0;

# ---------------------------------------------------------------------------
# 2. hard decline
# ---------------------------------------------------------------------------
my $p2 = sql("SELECT pay('pm_card_chargeDeclined', 700)");
ok(settled($p2), 'payment 2 decided');
is(status($p2), 'failed/-/payment_failed', 'hard decline: failed, order payment_failed');
is(sql("SELECT string_agg(psp, ',') FROM market.payment_attempts WHERE payment_id = $p2"), 'stripe-a',
	'hard decline: no other account tried');
$expect{$p2} = 0;

# ---------------------------------------------------------------------------
# 3. soft decline at Stripe -> Adyen
# ---------------------------------------------------------------------------
control('POST', 'faults', { type => 'decline', psp => 'stripe', amount => 1313, code => 'insufficient_funds' });
my $p3 = sql("SELECT pay('pm_card_visa', 1313)");
ok(settled($p3), 'payment 3 decided');
is(status($p3), 'authorized/adyen-b/confirmed', 'soft decline at stripe-a: authorized at adyen-b');
is(sql("SELECT string_agg(psp || ':' || outcome, ',' ORDER BY id) FROM market.payment_attempts WHERE payment_id = $p3"),
	'stripe-a:soft_decline,adyen-b:succeeded', 'soft decline: the attempts');
$expect{$p3} = 1;
control('DELETE', 'faults');

# ---------------------------------------------------------------------------
# 4. Stripe down: failover, breaker, recovery
# ---------------------------------------------------------------------------
control('POST', 'faults', { type => 'down', psp => 'stripe', mode => 'refuse' });
my @p4 = map { sql("SELECT pay('pm_card_visa', 2000 + $_)") } 1 .. 4;
ok(settled($_), "outage: payment $_ decided") for @p4;
is(scalar(grep { status($_) eq 'authorized/adyen-b/confirmed' } @p4), 4, 'outage: all four authorized at adyen-b');
is(sql("SELECT breaker FROM market.psp_status() WHERE account = 'stripe-a'"), 'open',
	'outage: the breaker of stripe-a is open');
my $p4b = sql("SELECT pay('pm_card_visa', 2100)");
ok(settled($p4b), 'payment during the open breaker decided');
is(sql("SELECT count(*) FROM market.payment_attempts WHERE payment_id = $p4b AND psp = 'stripe-a'"), '0',
	'open breaker: stripe-a is not even tried');
$expect{$_} = 1 for @p4, $p4b;
control('DELETE', 'faults');
sleep 4;    # the cool-down
my $p4c = sql("SELECT pay('pm_card_visa', 2200)");
ok(settled($p4c), 'payment after the outage decided');
is(status($p4c), 'authorized/stripe-a/confirmed', 'recovery: the probe goes to stripe-a and succeeds');
is(sql("SELECT breaker FROM market.psp_status() WHERE account = 'stripe-a'"), 'closed', 'recovery: breaker closed');
$expect{$p4c} = 1;

# ---------------------------------------------------------------------------
# 5. a timeout where the charge happened, with a late success
# ---------------------------------------------------------------------------
control('POST', 'faults', { type => 'hold', psp => 'stripe', op => 'authorize', count => 1, ms => 8000 });
my $p5 = sql("SELECT pay('pm_card_visa', 2500)");
ok(settled($p5, 30), 'payment 5 decided');
is(status($p5), 'authorized/adyen-b/confirmed', 'timeout: after the retries, authorized at adyen-b');
is(sql("SELECT count(DISTINCT idempotency_key) || '/' || count(*) FROM market.payment_attempts
	WHERE payment_id = $p5 AND psp = 'stripe-a' AND operation = 'authorize' AND outcome = 'unknown'
	  AND outbox_id = (SELECT min(id) FROM market.outbox WHERE event_type = 'payment.authorize' AND aggregate_id = $p5)"),
	'1/6',
	'timeout: six unknown outcomes at stripe-a (market.psp_max_retries + 1), all with one key');
ok(wait_until("SELECT acked_at IS NOT NULL FROM market.outbox WHERE event_type = 'payment.reconcile' AND aggregate_id = $p5", 30),
	'the reconcile job ends');
is(all_charges($p5), 2, 'timeout: the late Stripe authorization happened');
is(live_charges($p5), 1, 'timeout: and it was voided; one live authorization');
$expect{$p5} = 1;

# ---------------------------------------------------------------------------
# 6. kill -9 of the worker with a request in flight, and after its intent
# ---------------------------------------------------------------------------
sub worker_pid { return sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'market psp worker'"); }
control('POST', 'faults', { type => 'latency', psp => 'stripe', op => 'authorize', count => 1, ms => 600 });
my $p6 = sql("SELECT pay('pm_card_visa', 2600)");
ok(wait_until("SELECT count(*) > 0 FROM market.payment_attempts WHERE payment_id = $p6 AND outcome = 'pending'", 10),
	'kill -9 after the send: the intent is committed');
usleep(200_000);    # the request is at the PSP, its answer delayed
kill 'KILL', worker_pid();
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'market psp worker'")
  or die 'the worker did not come back';
ok(settled($p6, 30), 'payment 6 decided after the crash');
is(status($p6), 'authorized/stripe-a/confirmed', 'kill -9 after the send: authorized at stripe-a');
is(sql("SELECT count(DISTINCT idempotency_key) FROM market.payment_attempts WHERE payment_id = $p6"), '1',
	'kill -9 after the send: one key for every try');
is(all_charges($p6), 1, 'kill -9 after the send: one charge');
$expect{$p6} = 1;

# before the send: stop the PSP answering at all (connection refused is
# fast), commit an intent by hand as psp_claim would, crash, restore
sql("ALTER SYSTEM SET market.psp_poll_interval = '60s'");
sql("SELECT pg_reload_conf()");
usleep(300_000);
my $p7 = sql("SELECT pay('pm_card_visa', 2700)");
my $claimed = sql("SELECT jsonb_array_length(market.psp_claim('market psp worker', 10))");
is($claimed, '1', 'before the send: the intent is committed (by hand, as the worker does)');
kill 'KILL', worker_pid();
$node->poll_query_until('postgres', "SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'market psp worker'")
  or die 'the worker did not come back';
sql("ALTER SYSTEM RESET market.psp_poll_interval");
sql("SELECT pg_reload_conf()");
ok(settled($p7, 90), 'payment 7 decided after the crash');
is(status($p7), 'authorized/stripe-a/confirmed', 'kill -9 before the send: authorized at stripe-a');
is(sql("SELECT count(DISTINCT idempotency_key) || '/' || count(*) FILTER (WHERE outcome = 'unknown')
	FROM market.payment_attempts WHERE payment_id = $p7"), '1/1', 'kill -9 before the send: the intent replayed with its key');
is(all_charges($p7), 1, 'kill -9 before the send: one charge');
$expect{$p7} = 1;

# ---------------------------------------------------------------------------
# 7. PayPal
# ---------------------------------------------------------------------------
sql(qq{SELECT market.psp_register('paypal-c', 'paypal', 'http://127.0.0.1:$ports->{paypal_port}',
	'{"client_id": "tapclient", "client_secret": "tapsecret"}', 30)});
my $p8 = sql("SELECT pay('pm_card_visa', 1050, 'paypal-c')");
ok(settled($p8), 'payment 8 decided');
is(status($p8), 'authorized/paypal-c/confirmed', 'paypal: authorized');
sql("SELECT market.order_transition(order_of($p8), 'shipped')");
ok(wait_until("SELECT status = 'captured' AND captured_minor = 1050 FROM market.payments WHERE id = $p8", 20),
	'paypal: captured');
is(control('GET', "ledger?reference=mk-pay-$p8")->{payments}[0]{captured}, 1050, 'paypal: on the ledger');
$expect{$p8} = 1;

# ---------------------------------------------------------------------------
# 8. no account enabled: the worker leaves the jobs alone (no claim, no
#    reschedule, no attempt) until one is enabled again
# ---------------------------------------------------------------------------
sql("SELECT count(market.psp_set_enabled(name, false)) FROM market.psp_accounts");
my $p9 = sql("SELECT pay('pm_card_visa', 1090)");
sleep 2;
is(sql("SELECT attempts || '/' || (lease_owner IS NULL) FROM market.outbox
	 WHERE topic = 'psp' AND aggregate_id = $p9"), '0/true', 'no account enabled: the job is not claimed');
is(sql("SELECT count(*) FROM market.payment_attempts WHERE payment_id = $p9"), '0',
	'no account enabled: no attempt');
sql("SELECT count(market.psp_set_enabled(name, true)) FROM market.psp_accounts");
ok(settled($p9), 'payment 9 decided once the accounts are enabled again');
like(status($p9), qr{^authorized/[a-z-]+/confirmed$}, 'and authorized');
$expect{$p9} = 1;

# ---------------------------------------------------------------------------
# the end state
# ---------------------------------------------------------------------------
ok(wait_until("SELECT count(*) = 0 FROM market.outbox WHERE topic = 'psp' AND acked_at IS NULL", 30),
	'every PSP outbox row is acked');
is(sql("SELECT count(*) FROM market.outbox WHERE topic = 'psp' AND dead_at IS NOT NULL"), '0', 'none is dead');
my @bad = grep { live_charges($_) != $expect{$_} } sort { $a <=> $b } keys %expect;
is("@bad", '', 'exactly one live authorization per authorized payment, none for the others');
is(sql("SELECT count(*) FROM market.payments WHERE status = 'pending'"), '0', 'no payment left pending');
is(sql("SELECT count(*) FROM market.payment_attempts WHERE outcome = 'pending'"), '0', 'no attempt left pending');
like(sql("SELECT string_agg(account || ':' || breaker, ',') FROM market.psp_status()"),
	qr/^stripe-a:closed,adyen-b:closed,paypal-c:closed$/, 'psp_status shows every account');

$node->stop;
# stop the test PSP here: left to END, prove waits for it
kill 'TERM', $psp_pid;
waitpid($psp_pid, 0);
$psp_pid = 0;
done_testing();
