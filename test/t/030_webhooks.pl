# Copyright: the market project.
#
# market.psp_webhook against webhooks signed by the test PSP (test/psp/,
# POST /_control/webhook), which shares no code with the extension:
#
#   1. Stripe: a PaymentIntent authorized at the test PSP whose answer the
#      extension never saw (made here directly); the signed
#      amount_capturable_updated event authorizes the pending payment and
#      confirms its order; the same event again is a duplicate; an older
#      event arriving late is ignored and moves nothing back
#   2. Stripe: a stale timestamp and a wrong secret raise MK077
#   3. Adyen: the AUTHORISATION notification of a payment authorized at the
#      test PSP authorizes the pending payment; a duplicate is harmless; a
#      notification signed with another key raises MK077
#
# The PSP worker is off: the payments are driven by the webhooks alone.
# Run with test/tools/run-tap.sh (as the postgres OS user when root).

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use HTTP::Tiny;
use JSON::PP;
use File::Basename qw(dirname);
use Cwd qw(abs_path);

my $PSPDIR = abs_path(dirname(__FILE__) . '/../psp');
my $BIN = "$PSPDIR/market-test-psp";
if (!-x $BIN)
{
	system('make', '-s', '-C', $PSPDIR) == 0 or BAIL_OUT("cannot build $BIN");
}

my $HMAC_KEY = '44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056';
my $psp_pid = open(my $srv, '-|', $BIN, '--seed', '11', '--stripe-webhook-secret', 'whsec_tap_secret',
	'--adyen-hmac-key', $HMAC_KEY) or BAIL_OUT("cannot start $BIN: $!");
my $ports = decode_json(scalar <$srv>);
my $BASE = "http://127.0.0.1:$ports->{port}";
my $CB = "http://127.0.0.1:$ports->{control_port}/_control";
END { if ($psp_pid) { kill 'TERM', $psp_pid; waitpid($psp_pid, 0); } }

my $http = HTTP::Tiny->new(timeout => 10);
sub post
{
	my ($url, $headers, $content) = @_;
	my $r = $http->request('POST', $url, { headers => $headers, content => $content });
	die "POST $url: $r->{status} $r->{content}" unless $r->{success};
	return decode_json($r->{content});
}
sub control { return post("$CB/$_[0]", { 'Content-Type' => 'application/json' }, encode_json($_[1])); }

my $node = PostgreSQL::Test::Cluster->new('market_webhooks');
$node->init;
$node->append_conf('postgresql.conf', q{
shared_preload_libraries = 'market'
market.database = 'postgres'
market.expiry_worker = off
market.psp_worker = off
});
$node->start;
sub sql { return $node->safe_psql('postgres', $_[0]); }

sql("CREATE EXTENSION market");
sql(qq{
	SELECT market.seller_create('Webhook TAP Seller');
	SELECT market.psp_register('stripe-w', 'stripe', '$BASE',
		'{"secret_key": "sk_test_wh", "webhook_secret": "whsec_tap_secret"}', 10);
	SELECT market.psp_register('adyen-w', 'adyen', '$BASE',
		'{"api_key": "whkey", "merchant_account": "WhMA", "hmac_key": "$HMAC_KEY"}', 20);
	CREATE FUNCTION public.pay(amount bigint) RETURNS bigint LANGUAGE plpgsql AS \$\$
	DECLARE g bigint; p bigint;
	BEGIN
		INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
		VALUES (gen_random_uuid(), 'tap', 'USD', amount) RETURNING id INTO g;
		INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
		VALUES (g, (SELECT min(id) FROM market.sellers), 'tap', 'USD', amount);
		INSERT INTO market.payments (group_id, customer_id, currency, amount_minor, method)
		VALUES (g, 'tap', 'USD', amount, 'pm_card_visa') RETURNING id INTO p;
		RETURN p;
	END \$\$;
	CREATE FUNCTION public.state(p bigint) RETURNS text LANGUAGE sql AS \$\$
		SELECT x.status || '/' || coalesce(a.name, '-') || '/' || coalesce(x.psp_reference, '-') || '/'
			   || (SELECT string_agg(o.status, ',') FROM market.orders o WHERE o.group_id = x.group_id)
		  FROM market.payments x LEFT JOIN market.psp_accounts a ON a.id = x.psp_account_id
		 WHERE x.id = p \$\$;
});

sub pstate { return sql("SELECT state($_[0])"); }

# delivers a webhook from the test PSP: the answer, or {error => SQLSTATE}
sub webhook
{
	my ($w) = @_;
	my $q = sprintf("SELECT market.psp_webhook(\$p\$%s\$p\$, \$h\$%s\$h\$, \$b\$%s\$b\$)",
		$w->{provider}, encode_json($w->{headers}), $w->{body});
	my ($ret, $out, $err) = $node->psql('postgres', "\\set VERBOSITY sqlstate\n$q");
	return $ret == 0 ? decode_json($out) : { error => ($err =~ /ERROR:\s+(\w{5})/ ? $1 : $err) };
}

# ---------------------------------------------------------------------------
# 1. Stripe
# ---------------------------------------------------------------------------
my $p1 = sql("SELECT pay(1500)");
my $pi = post("$BASE/v1/payment_intents",
	{ 'Authorization' => 'Bearer sk_test_wh', 'Content-Type' => 'application/x-www-form-urlencoded' },
	"amount=1500&currency=usd&payment_method=pm_card_visa&capture_method=manual&confirm=true"
	  . "&metadata%5Breference%5D=mk-pay-$p1");
is($pi->{status}, 'requires_capture', 'stripe: the PaymentIntent is authorized at the test PSP');
is(pstate($p1), "pending/-/-/created", 'stripe: the payment is still pending');

my $old = control('webhook', { provider => 'stripe', type => 'payment_intent.created', payment_intent => $pi->{id} });
my $auth = control('webhook', { provider => 'stripe', type => 'payment_intent.amount_capturable_updated',
	payment_intent => $pi->{id} });
my $r = webhook($auth);
is($r->{status}, 'processed', 'stripe: the authorization event is processed');
is($r->{event_id}, $auth->{event_id}, 'stripe: the answer names the event');
is(pstate($p1), "authorized/stripe-w/$pi->{id}/confirmed", 'stripe: payment authorized, order confirmed');
is(webhook($auth)->{status}, 'duplicate', 'stripe: the same event again is a duplicate');
is(webhook($old)->{status}, 'ignored', 'stripe: an older event arriving late is ignored');
is(pstate($p1), "authorized/stripe-w/$pi->{id}/confirmed", 'stripe: nothing moved back');

# ---------------------------------------------------------------------------
# 2. Stripe: stale timestamp, wrong secret
# ---------------------------------------------------------------------------
my $stale = control('webhook', { provider => 'stripe', type => 'payment_intent.succeeded',
	payment_intent => $pi->{id}, timestamp => time - 3600 });
is(webhook($stale)->{error}, 'MK077', 'stripe: a stale timestamp raises MK077');
my $forged = control('webhook', { provider => 'stripe', type => 'payment_intent.succeeded',
	payment_intent => $pi->{id}, secret => 'whsec_other' });
is(webhook($forged)->{error}, 'MK077', 'stripe: another secret raises MK077');
is(sql("SELECT count(*) FROM market.psp_webhook_events"), '2', 'stripe: refused events are not recorded');

# ---------------------------------------------------------------------------
# 3. Adyen
# ---------------------------------------------------------------------------
my $p2 = sql("SELECT pay(2500)");
my $ad = post("$BASE/v71/payments", { 'X-API-Key' => 'whkey', 'Content-Type' => 'application/json' },
	encode_json({ merchantAccount => 'WhMA', reference => "mk-pay-$p2",
		amount => { value => 2500, currency => 'USD' },
		paymentMethod => { type => 'scheme', storedPaymentMethodId => 'pm_card_visa' } }));
is($ad->{resultCode}, 'Authorised', 'adyen: authorised at the test PSP');
my $note = control('webhook', { provider => 'adyen', psp_reference => $ad->{pspReference} });
$r = webhook($note);
is($r->{status}, 'processed', 'adyen: the AUTHORISATION notification is processed');
is(pstate($p2), "authorized/adyen-w/$ad->{pspReference}/confirmed", 'adyen: payment authorized, order confirmed');
is(webhook($note)->{status}, 'duplicate', 'adyen: a duplicate is harmless');
my $bad = control('webhook', { provider => 'adyen', psp_reference => $ad->{pspReference},
	hmac_key => '00' x 32 });
is(webhook($bad)->{error}, 'MK077', 'adyen: another key raises MK077');
is(sql("SELECT string_agg(status, ',' ORDER BY id) FROM market.psp_webhook_events"),
	'processed,ignored,processed', 'the events recorded');

$node->stop;
kill 'TERM', $psp_pid;
waitpid($psp_pid, 0);
$psp_pid = 0;
done_testing();
