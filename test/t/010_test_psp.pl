# Copyright: the market project.
#
# Self-test of market-test-psp (test/psp/), the local stand-in for Stripe,
# Adyen and PayPal that the payment worker's tests talk to.  No PostgreSQL
# here: the program is started on loopback ports it picks, driven over
# HTTP with core Perl (HTTP::Tiny, JSON::PP, Digest::SHA), and stopped.
#
#   1. SHA-256 / HMAC: --self-test (FIPS 180, RFC 4231) and the RFC 4231
#      vectors again through POST /_control/hmac, cross-checked with
#      Digest::SHA
#   2. Stripe, Adyen, PayPal: success, hard and soft declines, partial
#      capture, over-capture error, refund, over-refund error, cancel/void,
#      idempotent replay, changed parameters error, concurrent duplicate
#   3. every fault: latency, hold (timeout where the charge happened), drop,
#      reset, 5xx before and after the charge, malformed body, declines by
#      amount and method, a PSP down (503 and connection refused), counts,
#      durations and probabilities
#   4. webhooks signed as Stripe and Adyen sign them, checked with Digest::SHA
#   5. the ledger: exactly one charge per payment reference
#   6. throughput: at least 5,000 requests/s with the bundled load generator
#      (PSP_SKIP_RATE=1 skips it)
#
# Run it with prove from test/ (make test runs it in the tap suite).

use strict;
use warnings;

use Test::More;
use HTTP::Tiny;
use JSON::PP;
use Digest::SHA qw(hmac_sha256_hex hmac_sha256_base64 sha256_hex);
use MIME::Base64 qw(encode_base64);
use IO::Socket::INET;
use IO::Select;
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

my $PSPDIR = abs_path(dirname(__FILE__) . '/../psp');
my $BIN    = "$PSPDIR/market-test-psp";
my $LOAD   = "$PSPDIR/market-test-psp-load";

if (!-x $BIN || !-x $LOAD)
{
	system('make', '-s', '-C', $PSPDIR) == 0
	  or BAIL_OUT("cannot build $BIN");
}

my $json = JSON::PP->new->canonical;

# ---------------------------------------------------------------------------
# 1a. the built-in self-test
# ---------------------------------------------------------------------------
{
	my $out = `"$BIN" --self-test`;
	is($?, 0, '--self-test exits 0');
	my @ok   = ($out =~ /^ok /mg);
	my @fail = ($out =~ /^FAIL /mg);
	is(scalar(@ok),   14, '--self-test: 14 checks pass (6 SHA-256, 7 HMAC, base64)');
	is(scalar(@fail), 0,  '--self-test: no failure');
}

# ---------------------------------------------------------------------------
# start the server
# ---------------------------------------------------------------------------
my $pid = open(my $srv, '-|', $BIN, '--seed', '42', '--stripe-port', '0',
	'--adyen-port', '0', '--paypal-port', '0')
  or BAIL_OUT("cannot start $BIN: $!");
my $line = <$srv>;
BAIL_OUT('market-test-psp printed no port line') unless defined $line;
my $ports = decode_json($line);
ok($ports->{port} > 0 && $ports->{control_port} > 0, "listening: $line");
my $B  = "http://127.0.0.1:$ports->{port}";
my $CB = "http://127.0.0.1:$ports->{control_port}";

END
{
	if ($pid)
	{
		kill 'TERM', $pid;
		waitpid($pid, 0);
	}
}

# one request; returns (response, decoded JSON or undef)
sub req
{
	my ($method, $url, %o) = @_;
	my $h = HTTP::Tiny->new(timeout => $o{timeout} // 10, keep_alive => 0);
	my %hdr = %{ $o{headers} // {} };
	my $content;
	if ($o{form})
	{
		$content = $h->www_form_urlencode($o{form});
		$hdr{'Content-Type'} = 'application/x-www-form-urlencoded';
	}
	elsif ($o{json})
	{
		$content = ref $o{json} ? $json->encode($o{json}) : $o{json};
		$hdr{'Content-Type'} = 'application/json';
	}
	my $r = $h->request($method, $url,
		{ headers => \%hdr, defined $content ? (content => $content) : () });
	my $j = eval { decode_json($r->{content}) };
	return ($r, $j);
}

sub control
{
	my ($method, $what, $body) = @_;
	my ($r, $j) = req($method, "$CB/_control/$what", defined $body ? (json => $body) : ());
	return wantarray ? ($r, $j) : $j;
}

sub fault { my ($r, $j) = control('POST', 'faults', @_); die "fault refused: $r->{content}" unless $r->{status} == 201; return $j; }
sub ledger { my %q = @_; my $qs = join '&', map { "$_=$q{$_}" } sort keys %q; return scalar control('GET', "ledger?$qs"); }
sub charges_for { my ($ref) = @_; return ledger(reference => $ref)->{charges}; }

# ---------------------------------------------------------------------------
# 1b. HMAC-SHA256 through the server against RFC 4231 and Digest::SHA
# ---------------------------------------------------------------------------
{
	my @rfc4231 = (
		[ '0b' x 20, unpack('H*', 'Hi There'),
		  'b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7' ],
		[ unpack('H*', 'Jefe'), unpack('H*', 'what do ya want for nothing?'),
		  '5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843' ],
		[ 'aa' x 20, 'dd' x 50,
		  '773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe' ],
		[ join('', map { sprintf '%02x', $_ } 1 .. 25), 'cd' x 50,
		  '82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b' ],
		[ '0c' x 20, unpack('H*', 'Test With Truncation'),
		  'a3b6167473100ee06e0c796c2955552b' ],
		[ 'aa' x 131, unpack('H*', 'Test Using Larger Than Block-Size Key - Hash Key First'),
		  '60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54' ],
		[ 'aa' x 131,
		  unpack('H*', 'This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.'),
		  '9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2' ],
	);
	my $n = 0;
	for my $v (@rfc4231)
	{
		$n++;
		my ($key, $data, $want) = @$v;
		my $got = control('POST', 'hmac', { key_hex => $key, data_hex => $data });
		is(substr($got->{hmac_sha256_hex}, 0, length $want), $want, "RFC 4231 case $n via /_control/hmac");
		is($got->{hmac_sha256_hex}, hmac_sha256_hex(pack('H*', $data), pack('H*', $key)),
			"RFC 4231 case $n agrees with Digest::SHA");
	}
	my $got = control('POST', 'hmac', { key => 'k', data => 'abc' });
	is($got->{sha256_hex}, 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad',
		'SHA-256("abc") via the server (FIPS 180)');
	my $big = 'x' x 100_000;
	$got = control('POST', 'hmac', { key => 'a key', data => $big });
	is($got->{sha256_hex}, sha256_hex($big), 'SHA-256 of 100,000 bytes agrees with Digest::SHA');
	is($got->{hmac_sha256_hex}, hmac_sha256_hex($big, 'a key'), 'HMAC of 100,000 bytes agrees');
}

# ---------------------------------------------------------------------------
# 2a. Stripe
# ---------------------------------------------------------------------------
my $SK = { Authorization => 'Bearer sk_test_market' };

sub stripe_pi
{
	my (%o) = @_;
	my @form = (
		amount => $o{amount} // 1000, currency => $o{currency} // 'usd',
		payment_method => $o{pm} // 'pm_card_visa', capture_method => 'manual',
		confirm => 'true', 'metadata[payment_id]' => $o{ref} // 'none');
	return req('POST', ($o{base} // $B) . '/v1/payment_intents',
		headers => { %$SK, $o{key} ? ('Idempotency-Key' => $o{key}) : () },
		form => \@form, timeout => $o{timeout});
}

{
	my ($r, $j) = req('POST', "$B/v1/payment_intents", form => [ amount => 100, currency => 'usd' ]);
	is($r->{status}, 401, 'stripe: no API key -> 401');
	like($j->{error}{message}, qr/did not provide an API key/, 'stripe: 401 says why');
	($r, $j) = req('POST', "$B/v1/payment_intents", headers => { Authorization => 'Bearer pk_x' },
		form => [ amount => 100, currency => 'usd' ]);
	is($r->{status}, 401, 'stripe: a key that is not sk_ -> 401');

	($r, $j) = stripe_pi(ref => 's-ok', key => 's-ok-1');
	is($r->{status}, 200, 'stripe: create+confirm 200');
	is($j->{status}, 'requires_capture', 'stripe: status requires_capture');
	is($j->{amount_capturable}, 1000, 'stripe: amount_capturable');
	like($j->{id}, qr/^pi_/, 'stripe: PaymentIntent id');
	is($j->{metadata}{payment_id}, 's-ok', 'stripe: metadata kept');
	is($r->{headers}{'idempotency-key'}, 's-ok-1', 'stripe: Idempotency-Key echoed');
	my $pi = $j->{id};

	# replay, also with the parameters in another order
	my ($r2, $j2) = stripe_pi(ref => 's-ok', key => 's-ok-1');
	is($r2->{status}, 200, 'stripe replay: 200');
	is($j2->{id}, $pi, 'stripe replay: same PaymentIntent');
	is($r2->{headers}{'idempotent-replayed'}, 'true', 'stripe replay: Idempotent-Replayed: true');
	($r2, $j2) = req('POST', "$B/v1/payment_intents", headers => { %$SK, 'Idempotency-Key' => 's-ok-1' },
		form => [ 'metadata[payment_id]' => 's-ok', confirm => 'true', capture_method => 'manual',
			payment_method => 'pm_card_visa', currency => 'usd', amount => 1000 ]);
	is($j2->{id}, $pi, 'stripe replay: parameter order does not matter');
	($r2, $j2) = stripe_pi(ref => 's-ok', key => 's-ok-1', amount => 1001);
	is($r2->{status}, 400, 'stripe: same key, other parameters -> 400');
	is($j2->{error}{type}, 'idempotency_error', 'stripe: ... idempotency_error');
	is(charges_for('s-ok'), 1, 'stripe: one charge after three tries with one key');

	my ($r3, $j3) = req('GET', "$B/v1/payment_intents/$pi", headers => $SK);
	is($j3->{status}, 'requires_capture', 'stripe: GET PaymentIntent');
	($r3, $j3) = req('GET', "$B/v1/payment_intents/pi_nope", headers => $SK);
	is($r3->{status}, 404, 'stripe: unknown PaymentIntent -> 404');
	is($j3->{error}{code}, 'resource_missing', 'stripe: ... resource_missing');
	($r3, $j3) = req('GET', "$B/v1/payment_intents/search?query=" .
		  "metadata%5B%27payment_id%27%5D%3A%27s-ok%27", headers => $SK);
	is(scalar @{ $j3->{data} }, 1, 'stripe: search by metadata finds the payment');

	# partial captures: 400 (not final), over-capture, 300 final, then no more
	my $cap = "$B/v1/payment_intents/$pi/capture";
	($r3, $j3) = req('POST', $cap, headers => $SK, form => [ amount_to_capture => 400, final_capture => 'false' ]);
	is($r3->{status}, 200, 'stripe: partial capture 400 (final_capture=false)');
	is($j3->{amount_received}, 400, 'stripe: amount_received 400');
	is($j3->{amount_capturable}, 600, 'stripe: 600 still capturable');
	($r3, $j3) = req('POST', $cap, headers => $SK, form => [ amount_to_capture => 601 ]);
	is($r3->{status}, 400, 'stripe: over-capture -> 400');
	is($j3->{error}{code}, 'amount_too_large', 'stripe: ... amount_too_large');
	($r3, $j3) = req('POST', $cap, headers => $SK, form => [ amount_to_capture => 300 ]);
	is($j3->{status}, 'succeeded', 'stripe: final partial capture -> succeeded');
	is($j3->{amount_received}, 700, 'stripe: 700 captured, the rest released');
	($r3, $j3) = req('POST', $cap, headers => $SK, form => [ amount_to_capture => 1 ]);
	is($j3->{error}{code}, 'payment_intent_unexpected_state', 'stripe: capture after the final one refused');
	($r3, $j3) = req('POST', "$B/v1/payment_intents/$pi/cancel", headers => $SK);
	is($j3->{error}{code}, 'payment_intent_unexpected_state', 'stripe: cancel after capture refused');

	# refunds
	($r3, $j3) = req('POST', "$B/v1/refunds", headers => $SK, form => [ payment_intent => $pi, amount => 500 ]);
	is($r3->{status}, 200, 'stripe: refund 500');
	is($j3->{object}, 'refund', 'stripe: Refund object');
	($r3, $j3) = req('POST', "$B/v1/refunds", headers => $SK, form => [ payment_intent => $pi, amount => 201 ]);
	is($r3->{status}, 400, 'stripe: over-refund -> 400');
	is($j3->{error}{code}, 'amount_too_large', 'stripe: ... amount_too_large');
	($r3, $j3) = req('POST', "$B/v1/refunds", headers => $SK, form => [ payment_intent => $pi ]);
	is($j3->{amount}, 200, 'stripe: refund without amount refunds the rest');
	($r3, $j3) = req('POST', "$B/v1/refunds", headers => $SK, form => [ payment_intent => $pi ]);
	is($j3->{error}{code}, 'charge_already_refunded', 'stripe: nothing left to refund');
	my $p = ledger(reference => 's-ok')->{payments}[0];
	is_deeply([ @$p{qw(authorized captured refunded state)} ], [ 1000, 700, 700, 'refunded' ],
		'stripe: ledger amounts authorized/captured/refunded');

	# declines
	($r3, $j3) = stripe_pi(ref => 's-hard', pm => 'pm_card_chargeDeclined');
	is($r3->{status}, 402, 'stripe: hard decline -> 402');
	is($j3->{error}{type}, 'card_error', 'stripe: ... card_error');
	is($j3->{error}{code}, 'card_declined', 'stripe: ... card_declined');
	is($j3->{error}{decline_code}, 'generic_decline', 'stripe: ... generic_decline');
	is($j3->{error}{payment_intent}{status}, 'requires_payment_method', 'stripe: declined PI needs a new method');
	($r3, $j3) = stripe_pi(ref => 's-soft', pm => 'pm_card_chargeDeclinedInsufficientFunds');
	is($j3->{error}{decline_code}, 'insufficient_funds', 'stripe: insufficient_funds decline');
	($r3, $j3) = stripe_pi(ref => 's-soft2', pm => 'pm_card_doNotHonor');
	is($j3->{error}{decline_code}, 'do_not_honor', 'stripe: do_not_honor decline');
	is(charges_for('s-hard'), 0, 'stripe: a declined payment is no charge');
	($r3, $j3) = stripe_pi(ref => 's-bad', pm => 'card_1234');
	is($j3->{error}{code}, 'resource_missing', 'stripe: unknown payment method -> resource_missing');

	# cancel before capture
	($r3, $j3) = stripe_pi(ref => 's-void');
	my ($r4, $j4) = req('POST', "$B/v1/payment_intents/$j3->{id}/cancel", headers => $SK);
	is($j4->{status}, 'canceled', 'stripe: cancel before capture');
	is(ledger(reference => 's-void')->{payments}[0]{state}, 'voided', 'stripe: ledger says voided');
}

# ---------------------------------------------------------------------------
# 2b. Adyen
# ---------------------------------------------------------------------------
my $AK = { 'X-API-Key' => 'AQE_test_key' };

sub adyen_pay
{
	my (%o) = @_;
	my $body = {
		amount => { value => $o{amount} // 1500, currency => $o{currency} // 'EUR' },
		reference => $o{ref}, merchantAccount => 'MarketTest',
		paymentMethod => { type => 'scheme', storedPaymentMethodId => $o{pm} // 'pm_card_visa',
			$o{holder} ? (holderName => $o{holder}) : () } };
	return req('POST', "$B/v71/payments",
		headers => { %$AK, $o{key} ? ('Idempotency-Key' => $o{key}) : () }, json => $body,
		timeout => $o{timeout});
}

{
	my ($r, $j) = req('POST', "$B/v71/payments", json => {});
	is($r->{status}, 401, 'adyen: no X-API-Key -> 401');
	($r, $j) = adyen_pay(ref => 'a-ok', key => 'a-ok-1');
	is($r->{status}, 200, 'adyen: /v71/payments 200');
	is($j->{resultCode}, 'Authorised', 'adyen: Authorised');
	is($j->{merchantReference}, 'a-ok', 'adyen: merchantReference');
	my $psp = $j->{pspReference};
	my ($r2, $j2) = adyen_pay(ref => 'a-ok', key => 'a-ok-1');
	is($j2->{pspReference}, $psp, 'adyen replay: same pspReference');
	is($r2->{headers}{'idempotency-key'}, 'a-ok-1', 'adyen replay: Idempotency-Key returned');
	($r2, $j2) = adyen_pay(ref => 'a-ok', key => 'a-ok-1', amount => 1600);
	is($r2->{status}, 422, 'adyen: same key, other body -> 422');
	is(charges_for('a-ok'), 1, 'adyen: one charge');

	my $mod = "$B/v71/payments/$psp";
	($r2, $j2) = req('POST', "$mod/captures", headers => $AK,
		json => { merchantAccount => 'MarketTest', amount => { value => 1000, currency => 'EUR' } });
	is($r2->{status}, 201, 'adyen: partial capture 201');
	is($j2->{status}, 'received', 'adyen: ... status received');
	is($j2->{paymentPspReference}, $psp, 'adyen: ... paymentPspReference');
	($r2, $j2) = req('POST', "$mod/captures", headers => $AK,
		json => { merchantAccount => 'MarketTest', amount => { value => 501, currency => 'EUR' } });
	is($r2->{status}, 422, 'adyen: over-capture -> 422');
	is($j2->{errorCode}, '137', 'adyen: ... errorCode 137');
	($r2, $j2) = req('POST', "$mod/refunds", headers => $AK,
		json => { merchantAccount => 'MarketTest', amount => { value => 1001, currency => 'EUR' } });
	is($r2->{status}, 422, 'adyen: over-refund -> 422');
	($r2, $j2) = req('POST', "$mod/refunds", headers => $AK,
		json => { merchantAccount => 'MarketTest', amount => { value => 400, currency => 'EUR' } });
	is($r2->{status}, 201, 'adyen: refund 201');
	($r2, $j2) = req('POST', "$mod/cancels", headers => $AK, json => { merchantAccount => 'MarketTest' });
	is($r2->{status}, 422, 'adyen: cancel after capture -> 422');
	my $p = ledger(reference => 'a-ok')->{payments}[0];
	is_deeply([ @$p{qw(authorized captured refunded)} ], [ 1500, 1000, 400 ], 'adyen: ledger amounts');

	($r2, $j2) = adyen_pay(ref => 'a-hard', pm => 'pm_card_chargeDeclinedStolenCard');
	is($j2->{resultCode}, 'Refused', 'adyen: hard decline Refused (in a 200)');
	is($r2->{status}, 200, 'adyen: ... HTTP 200');
	is($j2->{refusalReason}, 'Blocked Card', 'adyen: ... refusalReason');
	($r2, $j2) = adyen_pay(ref => 'a-soft', holder => 'NOT_ENOUGH_BALANCE', pm => 'x');
	is($j2->{refusalReason}, 'Not enough balance', 'adyen: holderName test trigger');
	($r2, $j2) = adyen_pay(ref => 'a-err', pm => 'pm_card_chargeDeclinedProcessingError');
	is($j2->{resultCode}, 'Error', 'adyen: processing error -> resultCode Error');
	($r2, $j2) = req('POST', "$B/v71/payments", headers => $AK,
		json => { amount => { value => 5, currency => 'EUR' }, merchantAccount => 'M', paymentMethod => { type => 'scheme' } });
	is($r2->{status}, 422, 'adyen: missing reference -> 422');
	($r2, $j2) = req('POST', "$B/v71/payments", headers => $AK, json => '{"amount":');
	is($r2->{status}, 400, 'adyen: malformed JSON -> 400');

	($r2, $j2) = adyen_pay(ref => 'a-void');
	my ($r3, $j3) = req('POST', "$B/v71/payments/$j2->{pspReference}/cancels", headers => $AK,
		json => { merchantAccount => 'MarketTest', reference => 'c1' });
	is($r3->{status}, 201, 'adyen: cancel 201');
	is(ledger(reference => 'a-void')->{payments}[0]{state}, 'voided', 'adyen: voided');
}

# ---------------------------------------------------------------------------
# 2c. PayPal
# ---------------------------------------------------------------------------
my $PP_BASIC = { Authorization => 'Basic ' . encode_base64('client-1:secret-1', '') };
my $PPT;

sub pp_token
{
	my ($r, $j) = req('POST', "$B/v1/oauth2/token", headers => $PP_BASIC,
		form => [ grant_type => 'client_credentials' ]);
	return ($r, $j);
}

sub pp_order
{
	my (%o) = @_;
	my $body = { intent => 'AUTHORIZE',
		purchase_units => [ { custom_id => $o{ref},
			amount => { currency_code => $o{currency} // 'USD', value => $o{value} // '10.00' } } ],
		payment_source => { card => { vault_id => $o{pm} // 'pm_card_visa' } } };
	return req('POST', "$B/v2/checkout/orders",
		headers => { Authorization => "Bearer $PPT", $o{key} ? ('PayPal-Request-Id' => $o{key}) : () },
		json => $body);
}

sub pp_post
{
	my ($path, $body, %h) = @_;
	return req('POST', "$B$path", headers => { Authorization => "Bearer $PPT", %h },
		json => $body // {});
}

{
	my ($r, $j) = req('POST', "$B/v1/oauth2/token", form => [ grant_type => 'client_credentials' ]);
	is($r->{status}, 401, 'paypal: token without Basic auth -> 401');
	is($j->{error}, 'invalid_client', 'paypal: ... invalid_client');
	($r, $j) = pp_token();
	is($r->{status}, 200, 'paypal: token 200');
	ok($j->{access_token} && $j->{expires_in} > 0, 'paypal: access_token with expires_in');
	$PPT = $j->{access_token};
	($r, $j) = req('POST', "$B/v2/checkout/orders", headers => { Authorization => 'Bearer nope' }, json => {});
	is($r->{status}, 401, 'paypal: unknown bearer token -> 401');

	for my $c ([ 'USD', '10.50', 1050 ], [ 'JPY', '1500', 1500 ], [ 'KWD', '1.25', 1250 ])
	{
		($r, $j) = pp_order(ref => "p-cur-$c->[0]", currency => $c->[0], value => $c->[1]);
		is($r->{status}, 201, "paypal: order in $c->[0]");
		is(ledger(reference => "p-cur-$c->[0]")->{payments}[0]{amount}, $c->[2],
			"paypal: $c->[1] $c->[0] is $c->[2] minor units");
	}
	is($j->{purchase_units}[0]{amount}{value}, '1.250', 'paypal: KWD shown with 3 decimals');
	($r, $j) = pp_order(ref => 'p-prec', currency => 'JPY', value => '10.5');
	is($r->{status}, 422, 'paypal: JPY with decimals -> 422');
	is($j->{details}[0]{issue}, 'DECIMAL_PRECISION', 'paypal: ... DECIMAL_PRECISION');
	($r, $j) = pp_order(ref => 'p-syn', value => '10,00');
	is($r->{status}, 400, 'paypal: bad decimal syntax -> 400');

	($r, $j) = pp_order(ref => 'p-ok', key => 'p-ok-order', value => '20.00');
	is($j->{status}, 'APPROVED', 'paypal: order with a vaulted source is APPROVED');
	my $oid = $j->{id};
	my ($r2, $j2) = pp_order(ref => 'p-ok', key => 'p-ok-order', value => '20.00');
	is($j2->{id}, $oid, 'paypal replay: same order for the same PayPal-Request-Id');
	($r2, $j2) = pp_order(ref => 'p-ok', key => 'p-ok-order', value => '21.00');
	is($r2->{status}, 422, 'paypal: same PayPal-Request-Id, other body -> 422');
	is($j2->{details}[0]{issue}, 'PAYPAL_REQUEST_ID_PREVIOUSLY_USED', 'paypal: ... PAYPAL_REQUEST_ID_PREVIOUSLY_USED');

	($r2, $j2) = pp_post("/v2/checkout/orders/$oid/authorize", {}, 'PayPal-Request-Id' => 'p-ok-auth');
	is($r2->{status}, 201, 'paypal: authorize 201');
	my $auth = $j2->{purchase_units}[0]{payments}{authorizations}[0];
	is($auth->{status}, 'CREATED', 'paypal: authorization CREATED');
	my ($r3, $j3) = pp_post("/v2/checkout/orders/$oid/authorize", {}, 'PayPal-Request-Id' => 'p-ok-auth');
	is($j3->{purchase_units}[0]{payments}{authorizations}[0]{id}, $auth->{id}, 'paypal replay: same authorization');
	($r3, $j3) = pp_post("/v2/checkout/orders/$oid/authorize", {}, 'PayPal-Request-Id' => 'p-ok-auth-2');
	is($j3->{details}[0]{issue}, 'ORDER_ALREADY_AUTHORIZED', 'paypal: a second authorization is refused');
	is(charges_for('p-ok'), 1, 'paypal: one charge');

	my $ap = "/v2/payments/authorizations/$auth->{id}";
	($r3, $j3) = pp_post("$ap/capture", { amount => { currency_code => 'USD', value => '5.00' } });
	is($r3->{status}, 201, 'paypal: partial capture 201');
	is($j3->{status}, 'COMPLETED', 'paypal: capture COMPLETED');
	my $cap = $j3->{id};
	($r3, $j3) = pp_post("$ap/capture", { amount => { currency_code => 'USD', value => '15.01' } });
	is($j3->{details}[0]{issue}, 'MAX_CAPTURE_AMOUNT_EXCEEDED', 'paypal: over-capture -> MAX_CAPTURE_AMOUNT_EXCEEDED');
	($r3, $j3) = pp_post("/v2/payments/captures/$cap/refund", { amount => { currency_code => 'USD', value => '5.01' } });
	is($j3->{details}[0]{issue}, 'REFUND_AMOUNT_EXCEEDED', 'paypal: over-refund -> REFUND_AMOUNT_EXCEEDED');
	($r3, $j3) = pp_post("/v2/payments/captures/$cap/refund", { amount => { currency_code => 'USD', value => '2.00' } });
	is($r3->{status}, 201, 'paypal: refund 201');
	($r3, $j3) = pp_post("$ap/void", undef);
	is($r3->{status}, 204, 'paypal: void of the rest -> 204');
	($r3, $j3) = pp_post("$ap/capture", {});
	is($j3->{details}[0]{issue}, 'AUTHORIZATION_VOIDED', 'paypal: capture after void refused');
	my $p = ledger(reference => 'p-ok')->{payments}[0];
	is_deeply([ @$p{qw(authorized captured refunded)} ], [ 2000, 500, 200 ], 'paypal: ledger amounts');

	($r, $j) = pp_order(ref => 'p-hard', pm => 'pm_card_chargeDeclinedLostCard');
	($r2, $j2) = pp_post("/v2/checkout/orders/$j->{id}/authorize", {});
	is($r2->{status}, 422, 'paypal: hard decline -> 422');
	is($j2->{details}[0]{issue}, 'TRANSACTION_REFUSED', 'paypal: ... TRANSACTION_REFUSED');
	($r, $j) = pp_order(ref => 'p-soft', pm => 'pm_card_tryAgainLater');
	($r2, $j2) = pp_post("/v2/checkout/orders/$j->{id}/authorize", {});
	is($j2->{details}[0]{issue}, 'INSTRUMENT_DECLINED', 'paypal: soft decline -> INSTRUMENT_DECLINED');

	# token lifetime
	control('POST', 'config', { paypal_token_ttl => 1 });
	(undef, my $t) = pp_token();
	sleep 1.2;
	($r, $j) = req('GET', "$B/v2/checkout/orders/$oid", headers => { Authorization => "Bearer $t->{access_token}" });
	is($r->{status}, 401, 'paypal: expired token -> 401');
	control('POST', 'config', { paypal_token_ttl => 32400 });
	($r, $j) = req('GET', "$B/v2/checkout/orders/$oid", headers => { Authorization => "Bearer $PPT" });
	is($j->{status}, 'COMPLETED', 'paypal: GET order');
}

# ---------------------------------------------------------------------------
# 2d. concurrent duplicates while the first is in flight
# ---------------------------------------------------------------------------
sub raw_post
{
	my ($port, $path, $headers, $body) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp')
	  or die "connect: $!";
	my $h = join '', map { "$_: $headers->{$_}\r\n" } sort keys %$headers;
	print $s "POST $path HTTP/1.1\r\nHost: x\r\n${h}Content-Length: " . length($body) .
	  "\r\nConnection: close\r\n\r\n$body";
	return $s;
}

sub raw_read
{
	my ($s) = @_;
	local $/;
	my $all = <$s>;
	return defined $all && $all =~ m{^HTTP/1\.1 (\d+)} ? $1 : 0;
}

{
	fault({ type => 'latency', ms => 700, count => 6 });   # 3 firsts + 3 duplicates
	my $form = 'amount=900&currency=usd&payment_method=pm_card_visa&capture_method=manual&confirm=true&metadata%5Bpayment_id%5D=c-s';
	my $s = raw_post($ports->{port}, '/v1/payment_intents',
		{ %$SK, 'Idempotency-Key' => 'c-s-1', 'Content-Type' => 'application/x-www-form-urlencoded' }, $form);
	sleep 0.2;
	my ($r, $j) = req('POST', "$B/v1/payment_intents", headers => { %$SK, 'Idempotency-Key' => 'c-s-1' },
		form => [ map { split /=/, $_, 2 } split /&/, $form =~ s/%5B/[/gr =~ s/%5D/]/gr ]);
	is($r->{status}, 409, 'stripe: duplicate while the first is in flight -> 409');
	is($j->{error}{code}, 'idempotency_key_in_use', 'stripe: ... idempotency_key_in_use');
	is(raw_read($s), 200, 'stripe: the first request still succeeds');

	my $abody = $json->encode({ amount => { value => 900, currency => 'EUR' }, reference => 'c-a',
		merchantAccount => 'MarketTest', paymentMethod => { type => 'scheme', storedPaymentMethodId => 'pm_card_visa' } });
	$s = raw_post($ports->{port}, '/v71/payments', { %$AK, 'Idempotency-Key' => 'c-a-1', 'Content-Type' => 'application/json' }, $abody);
	sleep 0.2;
	($r, $j) = req('POST', "$B/v71/payments", headers => { %$AK, 'Idempotency-Key' => 'c-a-1' }, json => $abody);
	is($r->{status}, 422, 'adyen: duplicate while the first is in flight -> 422');
	is(raw_read($s), 200, 'adyen: the first request still succeeds');

	my $pbody = $json->encode({ intent => 'AUTHORIZE', purchase_units => [ { custom_id => 'c-p',
		amount => { currency_code => 'USD', value => '9.00' } } ], payment_source => { card => { vault_id => 'pm_card_visa' } } });
	$s = raw_post($ports->{port}, '/v2/checkout/orders',
		{ Authorization => "Bearer $PPT", 'PayPal-Request-Id' => 'c-p-1', 'Content-Type' => 'application/json' }, $pbody);
	sleep 0.2;
	($r, $j) = req('POST', "$B/v2/checkout/orders", headers => { Authorization => "Bearer $PPT", 'PayPal-Request-Id' => 'c-p-1' },
		json => $pbody);
	is($r->{status}, 422, 'paypal: duplicate while the first is in flight -> 422');
	is($j->{details}[0]{issue}, 'PREVIOUS_REQUEST_IN_PROGRESS', 'paypal: ... PREVIOUS_REQUEST_IN_PROGRESS');
	is(raw_read($s), 201, 'paypal: the first request still succeeds');
	is(charges_for('c-s') + charges_for('c-a'), 2, 'one charge each after the duplicates');
	control('DELETE', 'faults');
}

# ---------------------------------------------------------------------------
# 3. faults
# ---------------------------------------------------------------------------
{
	# latency, scoped to one PSP and one operation
	fault({ type => 'latency', psp => 'stripe', op => 'authorize', ms => 300, count => 1 });
	my $t0 = time;
	my ($r, $j) = adyen_pay(ref => 'f-lat-a');
	ok(time - $t0 < 0.25, 'latency on stripe does not slow adyen');
	$t0 = time;
	($r, $j) = stripe_pi(ref => 'f-lat');
	my $dt = time - $t0;
	ok($dt >= 0.29, sprintf('latency 300 ms applied (%.3f s)', $dt));
	$t0 = time;
	stripe_pi(ref => 'f-lat2');
	ok(time - $t0 < 0.25, 'count 1: the next request is fast again');

	# hold: the charge happens, the answer comes after the client gave up
	fault({ type => 'hold', psp => 'stripe', ms => 1500, count => 1 });
	($r, $j) = stripe_pi(ref => 'f-hold', key => 'f-hold-1', timeout => 0.5);
	is($r->{status}, 599, 'hold: the client times out');
	is(charges_for('f-hold'), 1, 'hold: yet the charge was recorded');
	($r, $j) = stripe_pi(ref => 'f-hold', key => 'f-hold-1');
	is($r->{status}, 409, 'hold: a retry while held -> 409 in progress');
	sleep 1.2;
	($r, $j) = stripe_pi(ref => 'f-hold', key => 'f-hold-1');
	is($r->{status}, 200, 'hold: a retry after the hold gets the stored answer');
	is($j->{id}, ledger(reference => 'f-hold')->{payments}[0]{id}, 'hold: ... the same PaymentIntent');
	is(charges_for('f-hold'), 1, 'hold: still one charge');

	# drop: recorded, then the connection closes without an answer
	fault({ type => 'drop', psp => 'adyen', count => 1 });
	($r, $j) = adyen_pay(ref => 'f-drop', key => 'f-drop-1');
	is($r->{status}, 599, 'drop: no answer');
	is(charges_for('f-drop'), 1, 'drop: the charge happened');
	($r, $j) = adyen_pay(ref => 'f-drop', key => 'f-drop-1');
	is($j->{resultCode}, 'Authorised', 'drop: the retry gets the stored Authorised');
	is(charges_for('f-drop'), 1, 'drop: still one charge');

	# reset before the charge
	fault({ type => 'reset', psp => 'paypal', op => 'authorize', count => 1 });
	(undef, $j) = pp_order(ref => 'f-reset');
	my $oid = $j->{id};
	($r, $j) = pp_post("/v2/checkout/orders/$oid/authorize", {}, 'PayPal-Request-Id' => 'f-reset-1');
	is($r->{status}, 599, 'reset: connection reset');
	is(charges_for('f-reset'), 0, 'reset: nothing charged');
	($r, $j) = pp_post("/v2/checkout/orders/$oid/authorize", {}, 'PayPal-Request-Id' => 'f-reset-1');
	is($r->{status}, 201, 'reset: the retry authorizes');
	is(charges_for('f-reset'), 1, 'reset: one charge');

	# 5xx before the charge, then 5xx after it
	fault({ type => 'error', psp => 'stripe', status => 503, count => 1 });
	($r, $j) = stripe_pi(ref => 'f-5xx', key => 'f-5xx-1');
	is($r->{status}, 503, 'error: 503');
	is($j->{error}{type}, 'api_error', 'error: Stripe api_error body');
	is(charges_for('f-5xx'), 0, 'error (not charged): nothing charged');
	($r, $j) = stripe_pi(ref => 'f-5xx', key => 'f-5xx-1');
	is($r->{status}, 200, 'error: the retry with the same key executes');
	fault({ type => 'error', psp => 'adyen', charged => JSON::PP::true, count => 1 });
	($r, $j) = adyen_pay(ref => 'f-5xx-c', key => 'f-5xx-c-1');
	is($r->{status}, 500, 'error (charged): 500');
	is(charges_for('f-5xx-c'), 1, 'error (charged): the charge happened');
	($r, $j) = adyen_pay(ref => 'f-5xx-c', key => 'f-5xx-c-1');
	is($j->{resultCode}, 'Authorised', 'error (charged): the retry replays the success');
	is(charges_for('f-5xx-c'), 1, 'error (charged): one charge');

	# malformed body
	fault({ type => 'malformed', psp => 'stripe', count => 1 });
	($r, $j) = stripe_pi(ref => 'f-mal', key => 'f-mal-1');
	is($r->{status}, 200, 'malformed: 200');
	ok(!defined $j && length $r->{content}, 'malformed: the body is not JSON');
	($r, $j) = stripe_pi(ref => 'f-mal', key => 'f-mal-1');
	is($j->{status}, 'requires_capture', 'malformed: the retry gets a clean stored answer');
	is(charges_for('f-mal'), 1, 'malformed: one charge');

	# declines by amount and by payment method
	fault({ type => 'decline', amount => 4242, code => 'insufficient_funds' });
	fault({ type => 'decline', psp => 'adyen', method => 'pm_card_mastercard', code => 'do_not_honor', count => 1 });
	($r, $j) = stripe_pi(ref => 'f-dec-amt', amount => 4242);
	is($j->{error}{decline_code}, 'insufficient_funds', 'decline by amount (stripe)');
	($r, $j) = adyen_pay(ref => 'f-dec-amt-a', amount => 4242);
	is($j->{refusalReason}, 'Not enough balance', 'decline by amount (adyen)');
	($r, $j) = stripe_pi(ref => 'f-dec-ok', amount => 4243);
	is($j->{status}, 'requires_capture', 'another amount is approved');
	($r, $j) = adyen_pay(ref => 'f-dec-pm', pm => 'pm_card_mastercard');
	is($j->{refusalReason}, 'Declined Non Generic', 'decline by payment method');
	($r, $j) = adyen_pay(ref => 'f-dec-pm2', pm => 'pm_card_mastercard');
	is($j->{resultCode}, 'Authorised', 'count 1: the method works again');
	control('DELETE', 'faults');

	# a PSP down: 503 for one personality, the others unaffected
	fault({ type => 'down', psp => 'adyen', duration_ms => 800 });
	($r, $j) = adyen_pay(ref => 'f-down');
	is($r->{status}, 503, 'down: adyen answers 503');
	($r, $j) = stripe_pi(ref => 'f-down-s');
	is($r->{status}, 200, 'down: stripe still works');
	my $st = control('GET', 'stats');
	ok($st->{psp}{adyen}{down} && !$st->{psp}{stripe}{down}, 'stats: adyen down, stripe up');
	sleep 0.9;
	($r, $j) = adyen_pay(ref => 'f-down');
	is($j->{resultCode}, 'Authorised', 'down: back after duration_ms');

	# connection refused on the personality's own port
	fault({ type => 'down', psp => 'stripe', mode => 'refuse', duration_ms => 800 });
	sleep 0.05;
	my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $ports->{stripe_port}, Proto => 'tcp');
	ok(!$sock, 'down refuse: the stripe port refuses connections');
	($r, $j) = stripe_pi(ref => 'f-refuse', base => "http://127.0.0.1:$ports->{stripe_port}");
	is($r->{status}, 599, 'down refuse: a Stripe call fails to connect');
	($r, $j) = adyen_pay(ref => 'f-refuse-a');
	is($r->{status}, 200, 'down refuse: adyen unaffected');
	sleep 0.9;
	($r, $j) = stripe_pi(ref => 'f-refuse', base => "http://127.0.0.1:$ports->{stripe_port}");
	is($r->{status}, 200, 'down refuse: the stripe port is back');
	is(charges_for('f-refuse'), 1, 'down refuse: one charge');

	# the whole server down: the main port refuses, the control port stays
	fault({ type => 'down', mode => 'refuse', duration_ms => 600 });
	sleep 0.05;
	$sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $ports->{port}, Proto => 'tcp');
	ok(!$sock, 'global down: the main port refuses connections');
	($r, $j) = control('GET', 'health');
	is($r->{status}, 200, 'global down: the control port answers');
	sleep 0.7;
	($r, $j) = req('GET', "$B/_control/health");
	is($r->{status}, 200, 'global down: the main port is back');

	# probability, reproducible with --seed
	fault({ type => 'error', psp => 'paypal', op => 'lookup', probability => 0.5 });
	my $errors = 0;
	for (1 .. 200)
	{
		($r) = req('GET', "$B/v2/checkout/orders/$oid", headers => { Authorization => "Bearer $PPT" });
		$errors++ if $r->{status} == 500;
	}
	ok($errors > 60 && $errors < 140, "probability 0.5: $errors of 200 failed");
	control('DELETE', 'faults');
	($r, $j) = control('POST', 'faults', { type => 'nonsense' });
	is($r->{status}, 400, 'an unknown fault type is refused');
	($r, $j) = control('POST', 'faults', { type => 'error', status => 404 });
	is($r->{status}, 400, 'an error fault must be 5xx');
}

# ---------------------------------------------------------------------------
# 4. webhooks
# ---------------------------------------------------------------------------
{
	my $pi = ledger(reference => 's-void')->{payments}[0]{id};
	my $w = control('POST', 'webhook', { provider => 'stripe', type => 'payment_intent.canceled',
		payment_intent => $pi, secret => 'whsec_abc', timestamp => 1700000000 });
	my ($t, $v1) = $w->{headers}{'Stripe-Signature'} =~ /^t=(\d+),v1=([0-9a-f]{64})$/;
	is($t, 1700000000, 'stripe webhook: t= is the timestamp');
	is($v1, hmac_sha256_hex("$t.$w->{body}", 'whsec_abc'), 'stripe webhook: v1 = HMAC-SHA256(secret, "t.payload")');
	my $ev = decode_json($w->{body});
	is($ev->{type}, 'payment_intent.canceled', 'stripe webhook: type');
	is($ev->{data}{object}{id}, $pi, 'stripe webhook: data.object is the PaymentIntent');
	is($ev->{id}, $w->{event_id}, 'stripe webhook: event id');
	isnt($v1, hmac_sha256_hex("$t.$w->{body}", 'whsec_other'), 'stripe webhook: another secret does not verify');

	my $key = '44782DEF547AAA06C910C43932B1EB0C71FC68D9D0C057550C48EC2ACF6BA056';
	my $psp = ledger(reference => 'a-ok')->{payments}[0]{id};
	$w = control('POST', 'webhook', { provider => 'adyen', psp_reference => $psp, hmac_key => $key });
	my $item = decode_json($w->{body})->{notificationItems}[0]{NotificationRequestItem};
	my $signing = join ':', $item->{pspReference}, $item->{originalReference} // '',
	  $item->{merchantAccountCode}, $item->{merchantReference}, $item->{amount}{value},
	  $item->{amount}{currency}, $item->{eventCode}, $item->{success};
	my $b64 = hmac_sha256_base64($signing, pack('H*', $key));
	$b64 .= '=' while length($b64) % 4;
	is($item->{additionalData}{hmacSignature}, $b64, 'adyen webhook: HMAC of the eight fields, base64');
	is_deeply([ @$item{qw(eventCode success merchantReference)} ], [ 'AUTHORISATION', 'true', 'a-ok' ],
		'adyen webhook: AUTHORISATION of the payment');
	my $capref = (grep { $_->{op} eq 'capture' && $_->{result} eq 'succeeded' } @{ ledger(reference => 'a-ok')->{operations} })[0]{object};
	$w = control('POST', 'webhook', { provider => 'adyen', psp_reference => $capref, hmac_key => $key });
	$item = decode_json($w->{body})->{notificationItems}[0]{NotificationRequestItem};
	is_deeply([ @$item{qw(eventCode originalReference)}, $item->{amount}{value} ], [ 'CAPTURE', $psp, 1000 ],
		'adyen webhook: CAPTURE names the original payment and the captured amount');
	my ($r) = control('POST', 'webhook', { provider => 'paypal' });
	is($r->{status}, 400, 'webhook: paypal is refused with a reason');
}

# ---------------------------------------------------------------------------
# 5. the ledger and stats
# ---------------------------------------------------------------------------
{
	my $l = ledger();
	my %by = %{ $l->{charges_by_reference} };
	my @more = grep { $by{$_} > 1 } keys %by;
	is_deeply(\@more, [], 'ledger: no payment reference was charged twice in this whole run');
	my $auth = grep { $_->{op} eq 'authorize' && $_->{result} eq 'succeeded' } @{ $l->{operations} };
	is($l->{charges}, $auth, 'ledger: charges = succeeded authorizations');
	for my $p (@{ $l->{payments} })
	{
		if ($p->{captured} > $p->{authorized} || $p->{refunded} > $p->{captured})
		{
			fail("ledger: amounts out of order for $p->{id}");
		}
	}
	pass('ledger: captured <= authorized and refunded <= captured for every payment');
	my $st = control('GET', 'stats');
	is_deeply([ @{ $st->{psp}{stripe} }{qw(replays conflicts mismatches)} ], [ 4, 2, 1 ], 'stats: stripe replays, conflicts, mismatches');
	control('POST', 'reset');
	is(ledger()->{charges}, 0, 'reset empties the ledger');
	my ($r, $j) = stripe_pi(ref => 's-ok', key => 's-ok-1');
	isnt($j->{id}, undef, 'reset forgets idempotency keys');
}

# ---------------------------------------------------------------------------
# 6. throughput
# ---------------------------------------------------------------------------
SKIP:
{
	skip 'PSP_SKIP_RATE is set', 1 if $ENV{PSP_SKIP_RATE};
	my $out = `"$LOAD" --port $ports->{port} --connections 16 --seconds 1.5 --endpoint stripe`;
	my ($rate) = $out =~ /rate=(\d+)/;
	diag($out);
	ok(defined $rate && $rate >= 5000, 'at least 5,000 Stripe authorizations/s ' . ($rate // '?'));
}

kill 'TERM', $pid;
waitpid($pid, 0);
is($? >> 8, 0, 'SIGTERM: clean exit');
$pid = 0;

done_testing();
