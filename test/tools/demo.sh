#!/usr/bin/env bash
# `make demo`: a throwaway cluster, a small catalog and a flash sale through
# carts, checkout and orders.
#
# Installs the Debian packages, builds and installs the extension, then, as
# the postgres OS user (or as yourself when not root), creates a cluster in
# a scratch directory with market and pg_cron preloaded, loads a catalog and
# lets 32 concurrent pgbench clients fight over one hot SKU: each is a
# customer who fills a cart and begins checkout (which reserves).  About half
# pay (checkout_complete: orders per seller, a payment, outbox rows); the
# rest walk away and their 3-second checkouts expire, so that the expiry
# worker returns their units.  The PSP worker authorizes the payments at the
# local test PSP (Stripe, failing over to Adyen when Stripe goes down 2 s in);
# then some orders are shipped (captured) and some cancelled (voided, their
# units go back).  The report at
# the end checks that nothing was oversold and that market.verify_inventory()
# finds nothing wrong.  The cluster and the scratch directory are removed on
# exit.
#
# Environment: DEMO_UNITS (500), DEMO_CLIENTS (32), DEMO_TX_PER_CLIENT (40),
# KEEP_SCRATCH=1 to keep the scratch directory (the cluster is still stopped).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

UNITS=${DEMO_UNITS:-500}
CLIENTS=${DEMO_CLIENTS:-32}
TX=${DEMO_TX_PER_CLIENT:-40}
TTL_S=3

if [ "$(id -u)" -eq 0 ]; then
	SUDO=()
	as_pg() { runuser -u postgres -- "$@"; }
	OSUSER=postgres
else
	SUDO=(sudo)
	as_pg() { "$@"; }
	OSUSER=$(id -un)
fi

step() { printf '\n--- %s\n' "$*"; }

step "dependencies"
bash test/tools/install-deps.sh

step "build and install"
make -s -j"$(nproc)"
"${SUDO[@]}" make -s install
make -s test-psp

PG_CONFIG=${PG_CONFIG:-pg_config}
BINDIR=$("$PG_CONFIG" --bindir)

SCRATCH=$(mktemp -d /tmp/market-demo.XXXXXX)
[ "$(id -u)" -eq 0 ] && chown postgres:postgres "$SCRATCH"
PGDATA_DIR=$SCRATCH/data

PSP_PID=
cleanup() {
	local rc=$?
	[ -n "$PSP_PID" ] && kill "$PSP_PID" 2>/dev/null
	if [ -f "$PGDATA_DIR/postmaster.pid" ]; then
		as_pg "$BINDIR/pg_ctl" -D "$PGDATA_DIR" stop -m fast >/dev/null 2>&1 \
			|| as_pg "$BINDIR/pg_ctl" -D "$PGDATA_DIR" stop -m immediate >/dev/null 2>&1 || true
	fi
	if [ "$rc" -ne 0 ] && [ -f "$SCRATCH/server.log" ]; then
		echo "--- last lines of the server log:"
		tail -n 30 "$SCRATCH/server.log"
	fi
	if [ -n "${KEEP_SCRATCH:-}" ]; then
		echo "scratch directory kept: $SCRATCH"
	else
		rm -rf "$SCRATCH"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# a port nothing listens on (the server also gets its own socket directory)
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT=
for _ in $(seq 1 50); do
	p=$(( 20000 + RANDOM % 30000 ))
	if ! port_in_use "$p"; then PORT=$p; break; fi
done
[ -n "$PORT" ] || { echo "no free port found" >&2; exit 1; }

step "cluster in $SCRATCH (port $PORT, OS user $OSUSER)"
as_pg "$BINDIR/initdb" -D "$PGDATA_DIR" -U postgres -A trust --no-sync -E UTF8 >"$SCRATCH/initdb.log" 2>&1 \
	|| { cat "$SCRATCH/initdb.log"; exit 1; }
as_pg tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null <<EOF

# market demo
listen_addresses = ''
port = $PORT
unix_socket_directories = '$SCRATCH'
max_connections = 100
fsync = off
EOF

pg_ctl_() { as_pg "$BINDIR/pg_ctl" -D "$PGDATA_DIR" -l "$SCRATCH/server.log" -w -t 60 "$@" >/dev/null; }
PSQL=(as_pg "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$SCRATCH" -p "$PORT" -U postgres)
q() { "${PSQL[@]}" -At -d market_demo -c "$1"; }

# As a DBA would: the database first, then the libraries preloaded (the
# expiry worker serves market.database), a restart, then the extension.
pg_ctl_ start
"${PSQL[@]}" -d postgres -c "CREATE DATABASE market_demo"
as_pg tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null <<EOF
shared_preload_libraries = 'market,pg_cron'
market.database = 'market_demo'
cron.database_name = 'market_demo'
EOF
pg_ctl_ restart
"${PSQL[@]}" -d market_demo -c "CREATE EXTENSION market"
echo "database market_demo with extension market $(q "SELECT extversion FROM pg_extension WHERE extname = 'market'")"

step "catalog"
"${PSQL[@]}" -d market_demo <<'EOF'
CREATE SCHEMA demo;
CREATE TABLE demo.ids (name text PRIMARY KEY, id bigint NOT NULL);

DO $$
DECLARE
	s1 bigint := market.seller_create('Northwind Audio');
	s2 bigint := market.seller_create('Kettle & Co');
	s3 bigint := market.seller_create('Trailhead Outdoor');
	w1 int := market.warehouse_create('fra-1', 'Frankfurt', 10);
	w2 int := market.warehouse_create('ams-1', 'Amsterdam', 20);
	p bigint;
	k bigint;
BEGIN
	-- the hot product of the flash sale
	p := market.product_create(s1, 'Noise-cancelling headphones X1', 'Over-ear, 30 h battery',
							   'Northwind', 'electronics/audio', '{"wireless": true}');
	k := market.sku_create(p, 'NW-X1-BLK', 19900, 'EUR', '{"colour": "black"}');
	INSERT INTO demo.ids VALUES ('hot_sku', k);
	k := market.sku_create(p, 'NW-X1-SLV', 19900, 'EUR', '{"colour": "silver"}');
	PERFORM market.stock_set(k, w1, 40);
	PERFORM market.stock_set(k, w2, 15);

	p := market.product_create(s1, 'Bluetooth speaker mini', category => 'electronics/audio');
	k := market.sku_create(p, 'NW-MINI', 4900, 'EUR');
	PERFORM market.stock_set(k, w1, 120);

	p := market.product_create(s2, 'Gooseneck kettle 1 l', brand => 'Kettle & Co', category => 'home/kitchen');
	k := market.sku_create(p, 'KC-GN-1L', 6900, 'EUR');
	PERFORM market.stock_set(k, w1, 30);
	PERFORM market.stock_set(k, w2, 30);
	p := market.product_create(s2, 'Ceramic pour-over dripper', category => 'home/kitchen');
	k := market.sku_create(p, 'KC-DRIP-WHT', 2500, 'EUR', '{"colour": "white"}');
	PERFORM market.stock_set(k, w2, 75);

	p := market.product_create(s3, 'Trail running shoe', category => 'sports/running');
	FOR size IN 40..45 LOOP
		k := market.sku_create(p, 'TH-TRAIL-' || size, 12900, 'EUR', jsonb_build_object('size', size));
		PERFORM market.stock_set(k, w1, 10 + size % 4);
		PERFORM market.stock_set(k, w2, 5);
	END LOOP;
	p := market.product_create(s3, 'Headlamp 400 lm', category => 'sports/outdoor');
	k := market.sku_create(p, 'TH-LAMP-400', 3900, 'EUR');
	PERFORM market.stock_set(k, w2, 60);
END
$$;
EOF
HOT=$(q "SELECT id FROM demo.ids WHERE name = 'hot_sku'")
# the second line some customers add: another seller's dripper, plenty of it
EXTRA=$(q "SELECT id FROM market.skus WHERE sku_code = 'KC-DRIP-WHT'")
W1=$(q "SELECT id FROM market.warehouses WHERE code = 'fra-1'")
W2=$(q "SELECT id FROM market.warehouses WHERE code = 'ams-1'")
# the hot SKU's units: 70 % in the preferred warehouse, the rest in the other
q "SELECT market.stock_set($HOT, $W1, $(( UNITS * 7 / 10 ))), market.stock_set($HOT, $W2, $(( UNITS - UNITS * 7 / 10 )))" >/dev/null
q "SELECT market.stock_set($EXTRA, $W2, $(( CLIENTS * TX * 2 )))" >/dev/null
echo "$(q "SELECT count(*) FROM market.sellers") sellers, $(q "SELECT count(*) FROM market.products") products, $(q "SELECT count(*) FROM market.skus") SKUs, $(q "SELECT count(*) FROM market.warehouses") warehouses, $(q "SELECT coalesce(sum(on_hand), 0) FROM market.stock_levels") units on hand"
"${PSQL[@]}" -d market_demo -c "SELECT k.sku_code, w.code AS warehouse, l.on_hand, l.free, l.slots
  FROM market.stock_levels l JOIN market.skus k ON k.id = l.sku_id JOIN market.warehouses w ON w.id = l.warehouse_id
 WHERE l.sku_id = $HOT ORDER BY w.priority"

# The shop connects as a market_app member, as an application would.  A
# customer puts one unit of the hot SKU in a cart (with a cheap second SKU
# of another seller half of the time) and begins checkout, which reserves
# the cart; when the hot SKU is sold out that fails with MK001, which the
# shop takes as "sold out", not as an error.
"${PSQL[@]}" -d market_demo <<EOF
CREATE ROLE shop LOGIN IN ROLE market_app;
CREATE FUNCTION demo.try_checkout(customer text, sku bigint, extra bigint, ttl interval) RETURNS text
LANGUAGE plpgsql AS \$\$
DECLARE
	cart uuid := market.cart_create(customer, 'EUR');
BEGIN
	PERFORM market.cart_set_item(cart, sku, 1);
	IF extra IS NOT NULL THEN
		PERFORM market.cart_set_item(cart, extra, 1);
	END IF;
	RETURN market.checkout_begin(cart, ttl)::text;
EXCEPTION WHEN SQLSTATE 'MK001' THEN
	RETURN 'sold-out';
END
\$\$;
-- Paying: checkout_complete turns the checkout into one order per seller, a
-- payment to authorize and the outbox rows for the PSP worker, all in one
-- transaction.  Paying after the checkout expired fails with MK002: the shop
-- tells the customer, and the demo counts it.
CREATE SEQUENCE demo.late_payments;
CREATE FUNCTION demo.try_pay(co text, customer text) RETURNS text
LANGUAGE plpgsql AS \$\$
BEGIN
	IF co = 'sold-out' THEN
		RETURN 'none';
	END IF;
	RETURN market.checkout_complete(co::uuid, 'pay-' || co, '{"method": "pm_card_visa"}', customer)->>'order_group';
EXCEPTION WHEN SQLSTATE 'MK002' THEN
	PERFORM nextval('demo.late_payments');
	RETURN 'late';
END
\$\$;
GRANT USAGE ON SCHEMA demo TO shop;
GRANT EXECUTE ON FUNCTION demo.try_checkout(text, bigint, bigint, interval), demo.try_pay(text, text) TO shop;
GRANT USAGE ON SEQUENCE demo.late_payments TO shop;
EOF

# Every transaction is a customer: cart and checkout_begin; a coin decides
# whether the customer pays (checkout_complete, a separate transaction) or
# walks away and lets the checkout's reservation expire.  pgbench retries a
# transaction that hit a deadlock or a serialization failure (--max-tries).
cat >"$SCRATCH/flash_sale.sql" <<EOF
\\set pay random(0, 1)
\\set two random(0, 1)
SELECT demo.try_checkout('customer-' || :client_id || '-' || random(), $HOT,
       CASE WHEN :two = 1 THEN $EXTRA END, '$TTL_S seconds') AS co \\gset
\\if :pay
SELECT demo.try_pay(':co', NULL);
\\endif
EOF
[ "$(id -u)" -eq 0 ] && chown postgres "$SCRATCH/flash_sale.sql"

# The test PSP (test/psp/, docs/test-psp.md) on loopback, Stripe and Adyen
# each on a port of its own, and the two accounts the PSP worker uses:
# Stripe first, Adyen as the fallback.
step "test PSP"
test/psp/market-test-psp --stripe-port 0 --adyen-port 0 >"$SCRATCH/psp.out" 2>"$SCRATCH/psp.err" &
PSP_PID=$!
for _ in $(seq 1 50); do [ -s "$SCRATCH/psp.out" ] && break; sleep 0.1; done
psp_port() { sed -nE "s/.*\"$1\": *([0-9]+).*/\1/p" "$SCRATCH/psp.out" | head -1; }
STRIPE_PORT=$(psp_port stripe_port)
ADYEN_PORT=$(psp_port adyen_port)
CONTROL="http://127.0.0.1:$(psp_port control_port)/_control"
psp_control() {  # method path [json]
	perl -MHTTP::Tiny -e 'my $r = HTTP::Tiny->new(timeout => 10)->request($ARGV[0], $ARGV[1],
		{ headers => { "Content-Type" => "application/json" }, defined $ARGV[2] ? (content => $ARGV[2]) : () });
		print $r->{content}; exit($r->{success} ? 0 : 1)' "$1" "$CONTROL/$2" "${3:-}"
}
echo "test PSP: stripe on $STRIPE_PORT, adyen on $ADYEN_PORT"
# 20 ms per PSP call, as a real one on a good day
psp_control POST faults '{"type": "latency", "psp": "all", "ms": 20}' >/dev/null
q "SELECT market.psp_register('stripe-main', 'stripe', 'http://127.0.0.1:$STRIPE_PORT', '{\"secret_key\": \"sk_test_demo\"}', 10),
          market.psp_register('adyen-backup', 'adyen', 'http://127.0.0.1:$ADYEN_PORT', '{\"api_key\": \"demo\", \"merchant_account\": \"DemoMA\"}', 20)" >/dev/null
"${PSQL[@]}" -d market_demo -c "SELECT name, kind, priority FROM market.psp_accounts ORDER BY priority"

step "expiry worker"
for _ in $(seq 1 50); do
	[ "$(q "SELECT running FROM market.worker_status()")" = t ] && break
	sleep 0.2
done
"${PSQL[@]}" -d market_demo -c "SELECT running, pid, database FROM market.worker_status()"

BEFORE=$(q "SELECT coalesce(sum(on_hand), 0) FROM market.stock_levels WHERE sku_id = $HOT")
step "flash sale: $CLIENTS clients x $TX attempts on $BEFORE units of SKU $HOT (TTL ${TTL_S}s)"
T_SALE=$(date +%s%N)
# halfway through the sale, Stripe goes down (connections refused)
( sleep 2; psp_control POST faults '{"type": "down", "psp": "stripe", "mode": "refuse"}' >/dev/null \
	&& echo "  (2 s into the sale: Stripe is down)" ) &
as_pg "$BINDIR/pgbench" -n -c "$CLIENTS" -j "$(nproc)" -t "$TX" --max-tries=10 \
	-f "$SCRATCH/flash_sale.sql" \
	-h "$SCRATCH" -p "$PORT" -U shop market_demo >"$SCRATCH/pgbench.log" 2>&1 \
	|| { cat "$SCRATCH/pgbench.log"; echo "pgbench failed" >&2; exit 1; }
grep -E 'number of transactions actually processed|number of failed|retried|retries|latency average|^tps' "$SCRATCH/pgbench.log"
ATTEMPTS=$(sed -nE 's/^number of transactions actually processed: ([0-9]+).*/\1/p' "$SCRATCH/pgbench.log")
RETRIED=$(sed -nE 's/^number of transactions retried: ([0-9]+).*/\1/p' "$SCRATCH/pgbench.log")
DEADLOCKS=$(grep -c 'deadlock detected' "$SCRATCH/server.log" || true)
echo "right after the sale: available $(q "SELECT market.available($HOT)"), held $(q "SELECT count(*) FROM market.reservations WHERE status = 'held'") reservations"

step "waiting for the expiry worker to return the abandoned reservations"
for i in $(seq 1 60); do
	HELD=$(q "SELECT count(*) FROM market.reservations WHERE status = 'held'")
	AVAIL=$(q "SELECT market.available($HOT)")
	ONHAND=$(q "SELECT coalesce(sum(on_hand), 0) FROM market.stock_levels WHERE sku_id = $HOT")
	FREE=$(q "SELECT coalesce(sum(free), 0) FROM market.stock_levels WHERE sku_id = $HOT")
	ms=$(( ($(date +%s%N) - T_SALE) / 1000000 ))
	printf '  %3d.%ds after the sale began: %s held, available %s, free in slots %s\n' \
		$(( ms / 1000 )) $(( ms % 1000 / 100 )) "$HELD" "$AVAIL" "$FREE"
	[ "$HELD" -eq 0 ] && [ "$FREE" -eq "$ONHAND" ] && break
	sleep 1
done
WORKER_OK=yes
[ "$HELD" -eq 0 ] && [ "$FREE" -eq "$ONHAND" ] || WORKER_OK=no

# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------
RESERVED=$(q "SELECT count(*) FROM market.reservations WHERE $HOT = ANY (sku_ids)")
SOLD=$(q "SELECT coalesce(sum(qty), 0) FROM market.reservation_lines WHERE sku_id = $HOT AND status = 'committed'")
SOLD_LEDGER=$(q "SELECT coalesce(-sum(delta), 0) FROM market.stock_ledger WHERE sku_id = $HOT AND kind = 'sale'")
COMMITTED=$(q "SELECT count(*) FROM market.reservations WHERE $HOT = ANY (sku_ids) AND status = 'committed'")
EXPIRED=$(q "SELECT count(*) FROM market.reservations WHERE status = 'expired'")
AFTER_ONHAND=$(q "SELECT coalesce(sum(on_hand), 0) FROM market.stock_levels WHERE sku_id = $HOT")
AFTER_AVAIL=$(q "SELECT market.available($HOT)")
AUDIT=$("${PSQL[@]}" -d market_demo -c "SELECT * FROM market.verify_inventory()" -P footer=off -A -F ' | ' -t)

problems=()
[ "$SOLD" -le "$BEFORE" ] || problems+=("OVERSOLD: $SOLD units sold out of $BEFORE")
[ "$SOLD" -eq "$SOLD_LEDGER" ] || problems+=("committed reservations sold $SOLD units but the ledger records $SOLD_LEDGER")
[ "$AFTER_ONHAND" -eq $(( BEFORE - SOLD )) ] || problems+=("on hand after is $AFTER_ONHAND, expected $BEFORE - $SOLD = $(( BEFORE - SOLD ))")
[ "$AFTER_AVAIL" -eq "$AFTER_ONHAND" ] || problems+=("available after is $AFTER_AVAIL but on hand is $AFTER_ONHAND")
[ "$WORKER_OK" = yes ] || problems+=("the expiry worker had not returned every expired reservation after 60 s ($HELD still held)")
[ -z "$AUDIT" ] || problems+=("verify_inventory() found violations")

cat <<EOF

==================== flash sale report ====================
hot SKU                     $HOT ($(q "SELECT sku_code FROM market.skus WHERE id = $HOT"))
units on hand before        $BEFORE
purchase attempts           ${ATTEMPTS:-?} ($CLIENTS concurrent clients)
reservations made           $RESERVED
turned away (sold out)      $(( ${ATTEMPTS:-0} - RESERVED ))
units sold (committed)      $SOLD in $COMMITTED reservations (ledger: $SOLD_LEDGER)
paid too late (MK002)       $(q "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM demo.late_payments")
deadlocks (retried)         ${DEADLOCKS:-0} in the server log, ${RETRIED:-0} transactions retried
reservations expired        $EXPIRED (the expiry worker's count: $(q "SELECT expired_total FROM market.worker_status()"))
units on hand after         $AFTER_ONHAND
units available after       $AFTER_AVAIL
oversell                    $( [ "$SOLD" -le "$BEFORE" ] && echo "none ($SOLD sold <= $BEFORE in stock)" || echo "YES: $SOLD sold > $BEFORE in stock")
EOF
"${PSQL[@]}" -d market_demo -c "SELECT w.code AS warehouse, l.on_hand, l.held, l.free
  FROM market.stock_levels l JOIN market.warehouses w ON w.id = l.warehouse_id
 WHERE l.sku_id = $HOT ORDER BY w.priority"
"${PSQL[@]}" -d market_demo -c "SELECT running, expired_total, purged_total, last_run FROM market.worker_status()"
if [ -z "$AUDIT" ]; then
	echo "audit: clean (market.verify_inventory() returned no rows)"
else
	echo "audit: VIOLATIONS"
	echo "$AUDIT"
fi

# ---------------------------------------------------------------------------
# orders: what checkout made of the sale, then some fulfilment
# ---------------------------------------------------------------------------
step "orders: one order per seller per paid checkout"
ORDER_GROUPS=$(q "SELECT count(*) FROM market.order_groups")
"${PSQL[@]}" -d market_demo -c "SELECT s.name AS seller, count(*) AS orders, (sum(o.subtotal_minor) / 100.0)::numeric(12, 2) AS revenue_eur
  FROM market.orders o JOIN market.sellers s ON s.id = o.seller_id GROUP BY s.name ORDER BY s.name"
"${PSQL[@]}" -d market_demo -c "SELECT CASE WHEN status = 'open' AND expires_at <= now() THEN 'expired (never paid)' ELSE status END AS checkout,
       count(*) FROM market.checkouts GROUP BY 1 ORDER BY 1"
"${PSQL[@]}" -d market_demo -c "SELECT topic, event_type, count(*) AS outbox_rows FROM market.outbox GROUP BY 1, 2 ORDER BY 1, 2"
[ "$ORDER_GROUPS" -eq "$COMMITTED" ] || problems+=("$ORDER_GROUPS order groups for $COMMITTED committed checkouts of the hot SKU")
[ "$(q "SELECT count(*) FROM market.payments")" -eq "$ORDER_GROUPS" ] \
	|| problems+=("not one payment per order group")
[ "$(q "SELECT count(*) FROM market.outbox WHERE topic = 'psp' AND event_type = 'payment.authorize'")" -eq "$ORDER_GROUPS" ] \
	|| problems+=("not one payment.authorize job per order group")

step "payments: the PSP worker authorizes through the outbox (Stripe went down 2 s in)"
for _ in $(seq 1 90); do
	[ "$(q "SELECT count(*) FROM market.payments WHERE status = 'pending'")" -eq 0 ] && break
	sleep 1
done
"${PSQL[@]}" -d market_demo -c "SELECT p.status, coalesce(a.name, '-') AS psp, count(*) AS payments
  FROM market.payments p LEFT JOIN market.psp_accounts a ON a.id = p.psp_account_id GROUP BY 1, 2 ORDER BY 1, 2"
"${PSQL[@]}" -d market_demo -c "SELECT account, breaker, calls_5min, success_rate, avg_latency_ms FROM market.psp_status()"
"${PSQL[@]}" -d market_demo -c "SELECT status, count(*) AS orders FROM market.orders GROUP BY status ORDER BY status"
AUTHORIZED=$(q "SELECT count(*) FROM market.payments WHERE status = 'authorized'")
PENDING=$(q "SELECT count(*) FROM market.payments WHERE status = 'pending'")
# the test PSP's own ledger: successful authorizations per payment reference
LEDGER=$(psp_control GET ledger | perl -MJSON::PP -e 'my $l = decode_json(join "", <STDIN>);
	my $c = $l->{charges_by_reference} || {}; my @v = values %$c; my $twice = grep { $_ > 1 } @v;
	printf "%d %d\n", scalar(@v), $twice')
read -r CHARGED TWICE <<<"$LEDGER"
echo "authorized payments: $AUTHORIZED; the PSPs' ledgers: $CHARGED payments charged, $TWICE of them more than once"
[ "$PENDING" -eq 0 ] || problems+=("$PENDING payments still pending after 90 s")
[ "$TWICE" -eq 0 ] || problems+=("$TWICE payments were charged twice")
[ "$(q "SELECT count(*) FROM market.orders o JOIN market.payments p ON p.group_id = o.group_id
        WHERE p.status = 'authorized' AND o.status <> 'confirmed'")" -eq 0 ] \
	|| problems+=("orders of authorized payments not confirmed")

# Stripe is back: its breaker lets a probe through and closes again, and the
# captures of the orders it authorized (which never fail over) go through
psp_control DELETE faults >/dev/null
psp_control POST faults '{"type": "latency", "psp": "all", "ms": 20}' >/dev/null
echo "Stripe is back up"

step "fulfilment: 3 confirmed orders shipped (captured), 3 cancelled (voided, units go back)"
AVAIL_BEFORE=$(q "SELECT market.available($HOT)")
"${PSQL[@]}" -d market_demo -c "SELECT o.id AS order_id, market.order_transition(o.id, 'shipped', 'demo: handed to the carrier') AS now
  FROM (SELECT id FROM market.orders WHERE status = 'confirmed' AND seller_id =
          (SELECT seller_id FROM market.orders o JOIN market.order_lines l ON l.order_id = o.id WHERE l.sku_id = $HOT LIMIT 1)
        ORDER BY id LIMIT 3) o"
CANCELLED_UNITS=$(q "WITH c AS (SELECT o.id FROM market.orders o JOIN market.order_lines l ON l.order_id = o.id
                      WHERE o.status = 'confirmed' AND l.sku_id = $HOT ORDER BY o.id DESC LIMIT 3)
  SELECT coalesce(sum(l.qty), 0) FROM c JOIN market.order_lines l ON l.order_id = c.id AND l.sku_id = $HOT
   WHERE market.order_transition(c.id, 'cancelled', 'demo: customer changed their mind') = 'cancelled'")
AVAIL_AFTER=$(q "SELECT market.available($HOT)")
echo "cancelled units of the hot SKU: $CANCELLED_UNITS; available $AVAIL_BEFORE -> $AVAIL_AFTER"
"${PSQL[@]}" -d market_demo -c "SELECT status, count(*) AS orders FROM market.orders GROUP BY status ORDER BY status"
[ "$AVAIL_AFTER" -eq $(( AVAIL_BEFORE + CANCELLED_UNITS )) ] \
	|| problems+=("cancelling $CANCELLED_UNITS units moved available from $AVAIL_BEFORE to $AVAIL_AFTER")
AUDIT=$("${PSQL[@]}" -d market_demo -c "SELECT * FROM market.verify_inventory()" -P footer=off -A -F ' | ' -t)
for _ in $(seq 1 30); do
	[ "$(q "SELECT count(*) FROM market.outbox WHERE topic = 'psp' AND acked_at IS NULL AND dead_at IS NULL")" -eq 0 ] && break
	sleep 1
done
"${PSQL[@]}" -d market_demo -c "SELECT operation, outcome, count(*) FROM market.payment_attempts GROUP BY 1, 2 ORDER BY 1, 2"
if [ -z "$AUDIT" ]; then
	echo "audit after fulfilment: clean"
else
	echo "audit after fulfilment: VIOLATIONS"
	echo "$AUDIT"
	problems+=("verify_inventory() found violations after fulfilment")
fi

if [ ${#problems[@]} -gt 0 ]; then
	printf 'PROBLEM: %s\n' "${problems[@]}"
	exit 1
fi
echo "demo: ok"
