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
#   4. Every event kind (release 0.4), duplicated and reordered, for real
#      checkouts: captures, refunds and cancellations made at the test PSP
#      and a declined authorization; at the end each payment has exactly one
#      charge on the PSP's ledger (none when declined), its amounts equal
#      the ledger's, every order is in the state it should be, the units of
#      cancelled and failed orders are back and market.verify_inventory()
#      is clean
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
ok($r->{applied} && !$r->{duplicate}, 'stripe: the authorization event is applied');
is($r->{status}, 'authorized', 'stripe: the answer gives the payment status');
is($r->{payment_id}, $p1, 'stripe: the answer names the payment');
is($r->{event_id}, $auth->{event_id}, 'stripe: the answer names the event');
is(pstate($p1), "authorized/stripe-w/$pi->{id}/confirmed", 'stripe: payment authorized, order confirmed');
ok(webhook($auth)->{duplicate}, 'stripe: the same event again is a duplicate');
is(webhook($old)->{event_status}, 'ignored', 'stripe: an older event arriving late is ignored');
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
ok($r->{applied}, 'adyen: the AUTHORISATION notification is applied');
is(pstate($p2), "authorized/adyen-w/$ad->{pspReference}/confirmed", 'adyen: payment authorized, order confirmed');
ok(webhook($note)->{duplicate}, 'adyen: a duplicate is harmless');
my $bad = control('webhook', { provider => 'adyen', psp_reference => $ad->{pspReference},
	hmac_key => '00' x 32 });
is(webhook($bad)->{error}, 'MK077', 'adyen: another key raises MK077');
is(sql("SELECT string_agg(status, ',' ORDER BY id) FROM market.psp_webhook_events"),
	'applied,ignored,applied', 'the events recorded');

# ---------------------------------------------------------------------------
# 4. Every event kind, duplicated and reordered, for real checkouts
# ---------------------------------------------------------------------------
sql(q{
	CREATE FUNCTION public.buy(n int, method text) RETURNS bigint LANGUAGE plpgsql AS $$
	DECLARE
		c uuid := market.cart_create('cust-' || n, 'USD');
		r jsonb;
	BEGIN
		PERFORM market.cart_set_item(c, (SELECT id FROM market.skus WHERE sku_code = 'WH-SKU'), 2);
		r := market.checkout_complete(market.checkout_begin(c, '10 min'), 'wh-key-' || n,
									  jsonb_build_object('method', method));
		RETURN (r #>> '{payment,payment_id}')::bigint;
	END $$;
	CREATE FUNCTION public.order_of(p bigint) RETURNS bigint LANGUAGE sql AS $$
		SELECT o.id FROM market.orders o JOIN market.payments x ON x.group_id = o.group_id WHERE x.id = p $$;
	DO $$
	DECLARE
		w int := market.warehouse_create('WH-W', 'Webhook warehouse');
		s bigint := market.sku_create(market.product_create((SELECT min(id) FROM market.sellers), 'Webhook product'),
									  'WH-SKU', 1000, 'USD');
	BEGIN
		PERFORM market.stock_set(s, w, 50);
	END $$;
});
my $avail = sub { sql("SELECT market.available((SELECT id FROM market.skus WHERE sku_code = 'WH-SKU'))") };
is($avail->(), '50', 'part 4: 50 units on hand');

my %pay;
$pay{$_} = sql("SELECT buy($_, 'pm_card_visa')") for (1 .. 4, 6);
$pay{5} = sql("SELECT buy(5, 'pm_card_chargeDeclined')");
is($avail->(), '38', 'part 4: six checkouts of 2 units each');

my $sh = { 'Authorization' => 'Bearer sk_test_wh', 'Content-Type' => 'application/x-www-form-urlencoded' };
my $ah = { 'X-API-Key' => 'whkey', 'Content-Type' => 'application/json' };
sub stripe_pi
{
	my ($p, $method) = @_;
	my $r = $http->request('POST', "$BASE/v1/payment_intents", { headers => $sh,
		content => "amount=2000&currency=usd&payment_method=$method&capture_method=manual&confirm=true"
		  . "&metadata%5Breference%5D=mk-pay-$p" });
	my $j = decode_json($r->{content});
	return $j->{id} // $j->{error}{payment_intent}{id};
}
sub adyen_pay
{
	my ($p) = @_;
	return post("$BASE/v71/payments", $ah, encode_json({ merchantAccount => 'WhMA', reference => "mk-pay-$p",
		amount => { value => 2000, currency => 'USD' },
		paymentMethod => { type => 'scheme', storedPaymentMethodId => 'pm_card_visa' } }))->{pspReference};
}
sub adyen_mod
{
	my ($ref, $what, $amount) = @_;
	return post("$BASE/v71/payments/$ref/$what", $ah, encode_json({ merchantAccount => 'WhMA',
		defined $amount ? (amount => { value => $amount, currency => 'USD' }) : () }))->{pspReference};
}
sub stripe_wh { return control('webhook', { provider => 'stripe', @_ }); }
sub adyen_wh { return control('webhook', { provider => 'adyen', psp_reference => $_[0] }); }

# what happens at the PSPs, and the webhooks they send, in a shuffled order
my (@hooks, %pi);
# 1: Stripe authorized, captured, partly refunded
$pi{1} = stripe_pi($pay{1}, 'pm_card_visa');
my $a1 = stripe_wh(type => 'payment_intent.amount_capturable_updated', payment_intent => $pi{1});
post("$BASE/v1/payment_intents/$pi{1}/capture", $sh, 'amount_to_capture=2000');
my $c1 = stripe_wh(type => 'payment_intent.succeeded', payment_intent => $pi{1});
my $re1 = post("$BASE/v1/refunds", $sh, "payment_intent=$pi{1}&amount=500");
my $r1 = stripe_wh(payment_intent => $pi{1}, charge => JSON::PP::true);
my $ro1 = stripe_wh(refund => $re1->{id});
# 2: Stripe authorized, the order cancelled, the authorization cancelled
$pi{2} = stripe_pi($pay{2}, 'pm_card_visa');
my $a2 = stripe_wh(type => 'payment_intent.amount_capturable_updated', payment_intent => $pi{2});
sql("SELECT market.order_transition(order_of($pay{2}), 'cancelled')");
post("$BASE/v1/payment_intents/$pi{2}/cancel", $sh, '');
my $x2 = stripe_wh(type => 'payment_intent.canceled', payment_intent => $pi{2});
# 3: Adyen authorised, captured, refunded in full
my $ad3 = adyen_pay($pay{3});
my $a3 = adyen_wh($ad3);
my $c3 = adyen_wh(adyen_mod($ad3, 'captures', 2000));
my $r3 = adyen_wh(adyen_mod($ad3, 'refunds', 2000));
# 4: Adyen authorised, the order cancelled, the authorization cancelled
my $ad4 = adyen_pay($pay{4});
my $a4 = adyen_wh($ad4);
sql("SELECT market.order_transition(order_of($pay{4}), 'cancelled')");
my $x4 = adyen_wh(adyen_mod($ad4, 'cancels'));
# 5: Stripe declines
$pi{5} = stripe_pi($pay{5}, 'pm_card_chargeDeclined');
my $f5 = stripe_wh(type => 'payment_intent.payment_failed', payment_intent => $pi{5});
# 6: Stripe authorized only
$pi{6} = stripe_pi($pay{6}, 'pm_card_visa');
my $a6 = stripe_wh(type => 'payment_intent.amount_capturable_updated', payment_intent => $pi{6});

# later events first, every event twice, the authorizations last
my @order = ($r3, $c1, $x2, $r1, $x4, $f5, $c3, $ro1, $a6, $r3, $c1, $f5, $a1, $a2, $a3, $a4, $r1, $x2,
	$c3, $a6, $a1, $a3, $x4, $a2, $a4, $ro1);
my (%seen, $errors, $dups);
for my $w (@order)
{
	my $res = webhook($w);
	$errors++ if $res->{error};
	$dups++ if $res->{duplicate};
	diag("webhook $w->{event_id}: error $res->{error}") if $res->{error};
}
ok(!$errors, 'part 4: no verified webhook raised');
is($dups, 13, 'part 4: every second delivery is a duplicate');
is(sql("SELECT count(*) FROM market.psp_webhook_events WHERE status = 'deferred'"), '0',
	'part 4: nothing left deferred');

# exactly one charge per paid payment at the PSPs, none for the declined one,
# and the payment's amounts are the ledger's
my $ledger = decode_json($http->get("$CB/ledger")->{content});
for my $n (sort keys %pay)
{
	my $ref = "mk-pay-$pay{$n}";
	is($ledger->{charges_by_reference}{$ref} // 0, $n == 5 ? 0 : 1, "part 4: payment $n charged "
		. ($n == 5 ? 'never' : 'exactly once'));
	my ($lp) = grep { $_->{reference} eq $ref } @{ $ledger->{payments} };
	my $db = sql("SELECT format('%s/%s/%s', captured_minor, refunded_minor,
		CASE WHEN status IN ('failed', 'voided') THEN 0 ELSE authorized_minor END)
		FROM market.payments WHERE id = $pay{$n}");
	my $psp = sprintf('%d/%d/%d', $lp->{captured}, $lp->{refunded},
		($lp->{state} =~ /declin|cancel|void/i) ? 0 : $lp->{authorized});
	is($db, $psp, "part 4: payment $n amounts (captured/refunded/held) equal the ledger's ($lp->{state})");
}
my %want = (1 => 'captured confirmed', 2 => 'voided cancelled', 3 => 'refunded confirmed',
	4 => 'voided cancelled', 5 => 'failed payment_failed', 6 => 'authorized confirmed');
for my $n (sort keys %want)
{
	is(sql("SELECT p.status || ' ' || o.status FROM market.payments p JOIN market.orders o ON o.group_id = p.group_id
		WHERE p.id = $pay{$n}"), $want{$n}, "part 4: payment $n and its order: $want{$n}");
}
is($avail->(), '44', 'part 4: the units of the cancelled and the failed orders are back');
is(sql("SELECT count(*) FROM market.verify_inventory()"), '0', 'part 4: audit clean');
is(sql("SELECT count(*) FROM market.payments
		 WHERE captured_minor > authorized_minor OR refunded_minor > captured_minor"), '0',
	'part 4: captured <= authorized and refunded <= captured');

$node->stop;
kill 'TERM', $psp_pid;
waitpid($psp_pid, 0);
$psp_pid = 0;
done_testing();
