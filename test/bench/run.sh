#!/usr/bin/env bash
# market benchmarks (make bench): pgbench against a throwaway cluster.
#
# Scenarios, one table at the end:
#   hot       market.reserve of 1 unit of one hot SKU (stock 1e9, never sells out)
#   flash     the same on a second SKU prepared for a flash sale: 256 slots
#             (stock_set(..., slots => 256)) instead of the default
#   batch     the hot SKU again with market.batch_reserve = on: the batch
#             worker applies the reservations, many per transaction
#   zipfbatch the zipf scenario with market.batch_reserve = on
#   buynow    market.buy_now of a cart of 1-5 Zipf-popular SKUs (several sellers),
#             a fresh idempotency key each time: one call per checkout, its cart
#             document built from the statement's parameters (jsonb_build_array)
#   buynowbatch  the buynow scenario with market.batch_checkout = on: the batch
#             worker applies the checkouts, up to 64 per transaction
#   checkout  the same cart through cart_create, cart_set_item per line,
#             checkout_begin and checkout_complete: one pgbench transaction is
#             a whole checkout of 4 calls
#             (both at BENCH_ZIPF_CLIENTS; successes = order groups created)
#   baseline  the textbook hot row in plain SQL:
#             UPDATE bench_stock SET qty = qty - 1 WHERE sku = 1 AND qty >= 1
#   zipf      market.reserve over $BENCH_SKUS SKUs with Zipf popularity
#   expiry    Zipf reservations with a 2 s TTL at BENCH_EXPIRY_CLIENTS clients, nobody
#             commits: afterwards, how late the worker returned them (finished_at -
#             expires_at), p50/p99, for those that expired while the load ran
#   psp       the PSP worker draining BENCH_PSP_JOBS payment.authorize jobs against the
#             local test PSP answering in 20 ms (test/psp/): PSP calls per second
#             (jobs queued in one transaction, then timed until no payment is pending)
#   insert1   INSERT of one row: the ceiling for a one-row write transaction
#   select1   SELECT 1, the ceiling of this machine for a one-statement transaction
#
# Successes are counted in the database, not taken from pgbench: reservations
# created (count of market.reservations, emptied before each run), units the
# baseline UPDATE took off (qty before - qty after), transactions for SELECT 1.
# Rate = successes / the run time pgbench measured (without connection set-up).
# Latency percentiles come from pgbench's per-transaction logs (-l).
# CPU per success: the machine's busy time (/proc/stat) over a window inside
# the measured one, over the successes completed in it; steadier than the
# rate on a shared machine.
# After each market run, SELECT count(*) FROM market.verify_inventory().
#
# Settings (environment):
#   BENCH_SECONDS       seconds per point (20)
#   BENCH_CLIENTS       client counts for hot, baseline, select1 ("16 64 256")
#   BENCH_ZIPF_CLIENTS  client counts for zipf ("64 256")
#   BENCH_SCENARIOS     which scenarios ("hot flash batch baseline zipf zipfbatch buynow
#                       buynowbatch checkout expiry insert1 select1"; psp only when asked;
#                       without psp the PSP worker is off, so that the checkout figures
#                       exclude the PSP, as the targets say)
#   BENCH_PSP_JOBS      jobs of the psp scenario (20000); BENCH_PSP_BIN the test PSP
#                       (test/psp/market-test-psp, built by make test-psp)
#   BENCH_EXPIRY_CLIENTS  client count of the expiry scenario (64)
#   BENCH_SKUS          SKUs for zipf (100000)
#   BENCH_SELLERS       sellers the SKUs are spread over (8)
#   BENCH_ZIPF_S        Zipf exponent (1.1)
#   BENCH_THREADS       pgbench -j (2)
#   BENCH_PROTOCOL      pgbench -M: prepared (default: what an application server's
#                       driver does, each statement parsed and planned once per
#                       connection) or simple (every call parsed and planned anew);
#                       the checkout scenario always runs simple (its \gset variables
#                       inside quoted literals do not work as parameters)
#   BENCH_WARMUP        seconds of warm-up per point (5): pgbench runs BENCH_WARMUP +
#                       BENCH_SECONDS; the rate and the percentiles count only the
#                       transactions that completed BENCH_WARMUP s or more after the
#                       point's first one (a new connection's first calls load
#                       caches and plans: at 256 clients they took the first seconds)
#   BENCH_PORT          port of the throwaway cluster (55432)
#   BENCH_SYNC_COMMIT   synchronous_commit of the cluster (on; "off" shows
#                       what is left when the disk flush is not waited for)
#   BENCH_OUT           markdown result (test/bench/results/latest.md)
#   BENCH_PG_CONF       extra postgresql.conf lines, e.g. "deadlock_timeout = 10s"
#   BENCH_KEEP=1        keep the cluster directory afterwards
#   BENCH_USER          OS user to run as when started as root (postgres)
#   PG_CONFIG           pg_config to use (pg_config)
#
# Needs `make install` first. PostgreSQL refuses to run as root: started as
# root, the script runs itself as $BENCH_USER in a directory that user owns
# and copies the result back.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

BENCH_SECONDS=${BENCH_SECONDS:-20}
BENCH_CLIENTS=${BENCH_CLIENTS:-"16 64 256"}
BENCH_ZIPF_CLIENTS=${BENCH_ZIPF_CLIENTS:-"64 256"}
BENCH_SCENARIOS=${BENCH_SCENARIOS:-"hot flash batch baseline zipf zipfbatch buynow buynowbatch checkout expiry insert1 select1"}
BENCH_EXPIRY_CLIENTS=${BENCH_EXPIRY_CLIENTS:-64}
BENCH_SKUS=${BENCH_SKUS:-100000}
BENCH_SELLERS=${BENCH_SELLERS:-8}
BENCH_PSP_JOBS=${BENCH_PSP_JOBS:-20000}
BENCH_PSP_BIN=${BENCH_PSP_BIN:-$repo/test/psp/market-test-psp}
BENCH_ZIPF_S=${BENCH_ZIPF_S:-1.1}
BENCH_THREADS=${BENCH_THREADS:-2}
BENCH_PROTOCOL=${BENCH_PROTOCOL:-prepared}
BENCH_WARMUP=${BENCH_WARMUP:-5}
case $BENCH_PROTOCOL in
simple | prepared) ;;
*) echo "bench: BENCH_PROTOCOL must be simple or prepared, not '$BENCH_PROTOCOL'" >&2; exit 2 ;;
esac
BENCH_PORT=${BENCH_PORT:-55432}
BENCH_SYNC_COMMIT=${BENCH_SYNC_COMMIT:-on}
BENCH_OUT=${BENCH_OUT:-$repo/test/bench/results/latest.md}
BENCH_USER=${BENCH_USER:-postgres}
PG_CONFIG=${PG_CONFIG:-pg_config}
export BENCH_PSP_JOBS BENCH_PSP_BIN BENCH_PG_CONF BENCH_SECONDS BENCH_CLIENTS BENCH_ZIPF_CLIENTS BENCH_SCENARIOS BENCH_SKUS BENCH_SELLERS \
	BENCH_ZIPF_S BENCH_THREADS BENCH_PROTOCOL BENCH_WARMUP BENCH_PORT BENCH_SYNC_COMMIT BENCH_KEEP PG_CONFIG

bindir=$("$PG_CONFIG" --bindir)
pkglibdir=$("$PG_CONFIG" --pkglibdir)
if [ ! -e "$pkglibdir/market.so" ]; then
	echo "bench: $pkglibdir/market.so not found: run 'make install' first" >&2
	exit 1
fi
for lib in pg_cron; do
	if [ ! -e "$pkglibdir/$lib.so" ]; then
		echo "bench: $lib not installed (test/tools/install-deps.sh)" >&2
		exit 1
	fi
done

# which source was measured (computed before any user switch)
if [ -z "${BENCH_REV:-}" ]; then
	BENCH_REV=$(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)
fi
export BENCH_REV

# pgbench with 256 clients needs a few hundred descriptors
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 65536 ]; then
	ulimit -n 65536 2>/dev/null || true
else
	ulimit -n "$hard" 2>/dev/null || true
fi

# ---------------------------------------------------------------------------
# root: run the rest as $BENCH_USER from a directory it owns
# ---------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ] && [ -z "${BENCH_INNER:-}" ]; then
	if ! id "$BENCH_USER" >/dev/null 2>&1; then
		echo "bench: running as root and OS user '$BENCH_USER' does not exist" >&2
		exit 1
	fi
	work=$(mktemp -d "${TMPDIR:-/tmp}/market-bench.XXXXXX")
	cp "$here/run.sh" "$work/run.sh"
	chown -R "$BENCH_USER" "$work"
	chmod 700 "$work"
	rc=0
	runuser -u "$BENCH_USER" -- env BENCH_INNER=1 BENCH_WORK="$work" \
		BENCH_OUT="$work/latest.md" bash "$work/run.sh" || rc=$?
	if [ -s "$work/latest.md" ]; then
		mkdir -p "$(dirname "$BENCH_OUT")"
		cp "$work/latest.md" "$BENCH_OUT"
		echo "bench: table written to $BENCH_OUT"
	fi
	if [ -n "${BENCH_KEEP:-}" ]; then
		echo "bench: kept $work"
	else
		rm -rf "$work"
	fi
	exit $rc
fi

# ---------------------------------------------------------------------------
# the cluster
# ---------------------------------------------------------------------------
work=${BENCH_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/market-bench.XXXXXX")}
data="$work/data"
logs="$work/pgbench"
mkdir -p "$logs"
db=bench

PSQL=("$bindir/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h "$work" -p "$BENCH_PORT")
sql() { "${PSQL[@]}" -d "$db" -c "$1"; }

stop_cluster() {
	if [ -f "$data/postmaster.pid" ]; then
		"$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
	fi
	if [ -z "${BENCH_KEEP:-}" ]; then
		rm -rf "$data"
	else
		echo "bench: kept $work"
	fi
}
trap stop_cluster EXIT

echo "bench: cluster in $work, port $BENCH_PORT"
"$bindir/initdb" -D "$data" -A trust -U postgres --no-sync >"$work/initdb.log" 2>&1
cat >>"$data/postgresql.conf" <<EOF

# market benchmark
port = $BENCH_PORT
listen_addresses = ''
unix_socket_directories = '$work'
shared_preload_libraries = 'market,pg_cron'
market.database = '$db'
cron.database_name = '$db'
synchronous_commit = $BENCH_SYNC_COMMIT
fsync = on
max_connections = 400
shared_buffers = 1GB
max_wal_size = 8GB
checkpoint_timeout = 30min
log_min_messages = warning
$(case " $BENCH_SCENARIOS " in *" psp "*) ;; *) echo "market.psp_worker = off" ;; esac)
${BENCH_PG_CONF:-}
EOF
"$bindir/pg_ctl" -D "$data" -l "$work/server.log" -w -t 120 start >/dev/null
"${PSQL[@]}" -d postgres -c "CREATE DATABASE $db"

echo "bench: catalog: $BENCH_SKUS SKUs, stock 1e9 each"
t0=$(date +%s)
sql "CREATE EXTENSION market"
wh=$(sql "SELECT market.warehouse_create('bench-w1', 'Bench warehouse')")
# $BENCH_SELLERS sellers with one product each; SKUs go round-robin over
# them, so a cart of several SKUs is split into several sellers' orders
sql "SELECT count(market.product_create(market.seller_create('Bench seller ' || g), 'Bench product ' || g))
       FROM generate_series(1, $BENCH_SELLERS) AS g" >/dev/null
product=$(sql "SELECT min(id) FROM market.products")
sql "SELECT count(market.sku_create($product + (g - 1) % $BENCH_SELLERS, 'bench-' || g, 100, 'EUR'))
       FROM generate_series(1, $BENCH_SKUS) AS g" >/dev/null
base=$(sql "SELECT min(id) FROM market.skus")
# in chunks of 1000, one transaction each: stock_set takes a transaction-level
# lock per (SKU, warehouse), and 100K of them overflow the lock table
sql "DO \$\$
     DECLARE lo bigint;
     BEGIN
         FOR lo IN SELECT g FROM generate_series($base, $base + $BENCH_SKUS - 1, 1000) AS g LOOP
             PERFORM market.stock_set(id, $wh, 1000000000) FROM market.skus
               WHERE id >= lo AND id < lo + 1000;
             COMMIT;
         END LOOP;
     END \$\$"
nstock=$(sql "SELECT count(*) FROM market.stock")
if [ "$nstock" -ne "$BENCH_SKUS" ]; then
	echo "bench: expected $BENCH_SKUS stock rows, found $nstock" >&2
	exit 1
fi
# the flash-sale SKU: the next one, re-spread over 256 slots
sql "SELECT market.stock_set($base + 1, $wh, 1000000000, slots => 256)" >/dev/null
sql "CREATE TABLE bench_stock (sku bigint PRIMARY KEY, qty bigint NOT NULL);
     INSERT INTO bench_stock VALUES (1, 1000000000);
     CREATE TABLE bench_insert (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"
sql "VACUUM ANALYZE" >/dev/null
sql "CHECKPOINT"
echo "bench: catalog ready in $(($(date +%s) - t0)) s (hot SKU id $base)"

# the disk's flush rate: every committed transaction waits for one
fsync_rate=$("$bindir/pg_test_fsync" -s 2 -f "$work/fsync.test" 2>/dev/null |
	awk '/^Compare file sync methods using one/ { one = 1 } one && $1 == "fdatasync" { print $2; exit }')
rm -f "$work/fsync.test"

slots=$(sql "SELECT current_setting('market.stock_slots', true)")
expiry=$(sql "SELECT running FROM market.worker_status()")

# ---------------------------------------------------------------------------
# the scripts
# ---------------------------------------------------------------------------
cat >"$work/hot.sql" <<'EOF'
SELECT market.reserve('[{"sku_id": :sku, "qty": 1}]');
EOF
cat >"$work/baseline.sql" <<'EOF'
UPDATE bench_stock SET qty = qty - 1 WHERE sku = 1 AND qty >= 1;
EOF
cat >"$work/zipf.sql" <<EOF
\\set r random_zipfian(1, :nskus, $BENCH_ZIPF_S)
\\set sku :base + :r - 1
SELECT market.reserve('[{"sku_id": :sku, "qty": 1}]');
EOF
cat >"$work/flash.sql" <<'EOF'
SELECT market.reserve('[{"sku_id": :flash, "qty": 1}]');
EOF
cat >"$work/expiry.sql" <<EOF
\\set r random_zipfian(1, :nskus, $BENCH_ZIPF_S)
\\set sku :base + :r - 1
SELECT market.reserve('[{"sku_id": :sku, "qty": 1}]', '2 seconds');
EOF
# sku_vars N: the pgbench lines that draw SKUs s1..sN with Zipf popularity
sku_vars() {
	for i in $(seq 1 "$1"); do
		printf '\\set r%s random_zipfian(1, :nskus, %s)\n\\set s%s :base + :r%s - 1\n' \
			"$i" "$BENCH_ZIPF_S" "$i" "$i"
	done
}
# a cart: n in 1..5 SKUs drawn with Zipf popularity
cart_vars="\\set n random(1, 5)
$(sku_vars 5)"
# buy_now: the cart document is built from the statement's parameters, as an
# application server sends it; five scripts of 1..5 lines, equally likely
for n in 1 2 3 4 5; do
	items=""
	for i in $(seq 1 "$n"); do
		items="$items${items:+, }jsonb_build_object('sku_id', :s$i::int8, 'qty', 1)"
	done
	cat >"$work/buynow$n.sql" <<EOF
$(sku_vars "$n")
SELECT market.buy_now('bench-' || :client_id, jsonb_build_array($items),
       gen_random_uuid()::text, '{"method": "pm_card_visa"}', 'EUR');
EOF
done
buynow_scripts="buynow1.sql@1 buynow2.sql@1 buynow3.sql@1 buynow4.sql@1 buynow5.sql@1"
cat >"$work/checkout.sql" <<EOF
$cart_vars
SELECT market.cart_create('bench-' || :client_id, 'EUR') AS cart \\gset
SELECT count(market.cart_set_item(':cart'::uuid, s, 1))
  FROM unnest((ARRAY[:s1, :s2, :s3, :s4, :s5]::bigint[])[1:(:n)]) AS s;
SELECT market.checkout_begin(':cart'::uuid) AS co \\gset
SELECT market.checkout_complete(':co'::uuid, gen_random_uuid()::text, '{"method": "pm_card_visa"}');
EOF
cat >"$work/insert1.sql" <<'EOF'
INSERT INTO bench_insert DEFAULT VALUES;
EOF
cat >"$work/select1.sql" <<'EOF'
SELECT 1;
EOF

# ---------------------------------------------------------------------------
# one point
# ---------------------------------------------------------------------------
results="$work/results.tsv"
: >"$results"

clean_reservations() {
	sql "SELECT count(market.reservation_release(id)) FROM market.reservations
	      WHERE status = 'held'" >/dev/null
	sql "DELETE FROM market.reservations WHERE status IN ('released', 'expired')"
	sql "VACUUM ANALYZE market.reservations, market.stock_slots" >/dev/null
}

# The measured window of a point: its transactions that completed at least
# BENCH_WARMUP seconds after the first one did (pgbench -l: column 3 the
# latency in us, columns 5-6 the completion time).  Prints the window's
# p50 p95 p99 (ms), its transactions and its length (s).
window_stats() {
	local warmup=$1 times latencies secs
	shift
	times=$(mktemp)
	latencies=$(mktemp)
	cat "$@" | awk '$3 ~ /^[0-9]+$/ { printf "%d.%06d %s\n", $5, $6, $3 }' | sort -n >"$times"
	# one pass: the window's latencies to a file, its length to stdout
	secs=$(awk -v w="$warmup" -v out="$latencies" '
		NR == 1 { start = $1 + w }
		$1 >= start { print $2 > out; last = $1 }
		END { printf "%.3f", (last > start) ? last - start : 0 }' "$times")
	sort -n "$latencies" |
		awk -v secs="$secs" '{ a[NR] = $1 }
		     function pct(q,   i) { i = int(q * NR + 0.999999); if (i < 1) i = 1; return a[i] / 1000 }
		     END { if (NR == 0) print "- - - 0 0"; else printf "%.3f %.3f %.3f %d %s\n", pct(0.50), pct(0.95), pct(0.99), NR, secs }'
	rm -f "$times" "$latencies"
}

# The machine's busy CPU time so far, in clock ticks (/proc/stat: user, nice,
# system, irq, softirq, steal; idle and iowait left out).
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# cpu_window DELAY LENGTH: after DELAY seconds prints "epoch busy_ticks",
# and again LENGTH seconds later: the CPU window of a point, sampled while
# pgbench runs (started in the background beside it).
cpu_window() {
	sleep "$1"
	echo "$(date +%s.%N) $(busy_ticks)"
	sleep "$2"
	echo "$(date +%s.%N) $(busy_ticks)"
}

# cpu_per_success CPUFILE SUCCESS_RATIO LOG...: the machine's CPU time in
# microseconds per success over the CPU window: busy ticks between its two
# samples over the transactions that completed between them (pgbench -l),
# times the successes per transaction.  "-" when the window is empty.
cpu_per_success() {
	local cpufile=$1 ratio=$2 t1 b1 t2 b2 n
	shift 2
	read -r t1 b1 < <(sed -n 1p "$cpufile")
	read -r t2 b2 < <(sed -n 2p "$cpufile")
	if [ -z "${b2:-}" ]; then echo -; return; fi
	n=$(cat "$@" | awk -v a="$t1" -v b="$t2" '$3 ~ /^[0-9]+$/ { t = $5 + $6 / 1e6; if (t >= a && t < b) n++ } END { print n + 0 }')
	awk -v db="$((b2 - b1))" -v hz="$(getconf CLK_TCK)" -v n="$n" -v r="$ratio" \
		'BEGIN { if (n * r > 0) printf "%.0f", db / hz * 1e6 / (n * r); else print "-" }'
}

run_point() {
	local scenario=$1 clients=$2 script=$3
	local name="${scenario}-${clients}"
	local dir="$logs/$name"
	mkdir -p "$dir"
	local before=0
	case $scenario in
	hot | flash | zipf | expiry | batch | zipfbatch)
		clean_reservations
		before=$(sql "SELECT count(*) FROM market.reservations")
		;;
	baseline) before=$(sql "SELECT qty FROM bench_stock WHERE sku = 1") ;;
	buynow | buynowbatch | checkout) before=$(sql "SELECT count(*) FROM market.order_groups") ;;
	esac
	sql "CHECKPOINT"

	local threads=$BENCH_THREADS
	[ "$clients" -lt "$threads" ] && threads=$clients
	echo "bench: $name: pgbench -c $clients -j $threads -T $((BENCH_WARMUP + BENCH_SECONDS))"
	local rc=0 options="" protocol=$BENCH_PROTOCOL
	[ "$scenario" = checkout ] && protocol=simple
	case $scenario in
	batch | zipfbatch) options="-c market.batch_reserve=on" ;;
	buynowbatch) options="-c market.batch_checkout=on" ;;
	esac
	# the CPU window: from 1 s after the warm-up (connections take time) to
	# 1 s before the end
	cpu_window "$((BENCH_WARMUP + 1))" "$((BENCH_SECONDS > 3 ? BENCH_SECONDS - 2 : 1))" >"$dir/cpu" &
	local sampler=$!
	PGOPTIONS="$options" "$bindir/pgbench" -n -h "$work" -p "$BENCH_PORT" -M "$protocol" \
		-c "$clients" -j "$threads" -T "$((BENCH_WARMUP + BENCH_SECONDS))" \
		-l --log-prefix="$dir/log" \
		-D sku="$base" -D flash="$((base + 1))" -D base="$base" -D nskus="$BENCH_SKUS" \
		$(for f in $script; do printf -- '-f %s ' "$work/$f"; done) "$db" >"$dir/out" 2>"$dir/err" || rc=$?
	wait "$sampler" 2>/dev/null || true

	local processed tps aborted successes audit=-
	processed=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$dir/out")
	tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p' "$dir/out")
	aborted=$(grep -c 'aborted in command' "$dir/err" || true)
	if [ -z "$processed" ] || [ -z "$tps" ]; then
		echo "bench: $name: pgbench failed (rc $rc):" >&2
		tail -5 "$dir/err" >&2
		processed=0 tps=0
	elif [ "$rc" -ne 0 ]; then
		echo "bench: $name: pgbench exited $rc, $aborted clients aborted:" >&2
		grep -m3 'aborted\|ERROR' "$dir/err" >&2 || true
	fi

	case $scenario in
	hot | flash | zipf | expiry | batch | zipfbatch)
		successes=$(($(sql "SELECT count(*) FROM market.reservations") - before))
		audit=$(sql "SELECT count(*) FROM market.verify_inventory()")
		;;
	baseline)
		successes=$(($(sql "SELECT qty FROM bench_stock WHERE sku = 1") - before))
		successes=${successes#-}
		;;
	buynow | buynowbatch | checkout)
		successes=$(($(sql "SELECT count(*) FROM market.order_groups") - before))
		audit=$(sql "SELECT count(*) FROM market.verify_inventory()")
		;;
	select1 | insert1) successes=$processed ;;
	esac

	# the window's rate: its transactions, scaled by the run's successes per
	# transaction (1 in every scenario whose clients did not abort)
	local rate whole p50 p95 p99 nwin secs
	read -r p50 p95 p99 nwin secs < <(window_stats "$BENCH_WARMUP" "$dir"/log*)
	rate=$(awk -v s="$successes" -v n="$processed" -v w="$nwin" -v t="$secs" \
		'BEGIN { if (n > 0 && t > 0) printf "%.0f", w * (s / n) / t; else print 0 }')
	whole=$(awk -v s="$successes" -v n="$processed" -v t="$tps" \
		'BEGIN { if (n > 0 && t > 0) printf "%.0f", s / (n / t); else print 0 }')
	local cpu_us
	cpu_us=$(cpu_per_success "$dir/cpu" \
		"$(awk -v s="$successes" -v n="$processed" 'BEGIN { if (n > 0) print s / n; else print 0 }')" \
		"$dir"/log*)
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
		"$scenario" "$clients" "$rate" "$p50" "$p95" "$p99" "$audit" "$aborted" \
		"$successes" "$processed" "$whole" "$cpu_us" >>"$results"
	echo "bench: $name: $successes successes, $processed transactions; after the ${BENCH_WARMUP} s warm-up" \
		"$nwin transactions in $secs s: $rate/s, p50 $p50 ms, p95 $p95 ms, p99 $p99 ms;" \
		"whole run $whole/s; machine CPU per success $cpu_us us; audit violations $audit"
	[ -n "${BENCH_KEEP:-}" ] || rm -f "$dir"/log*
}

for scenario in $BENCH_SCENARIOS; do
	case $scenario in
	hot) for c in $BENCH_CLIENTS; do run_point hot "$c" hot.sql; done ;;
	flash) for c in $BENCH_CLIENTS; do run_point flash "$c" flash.sql; done ;;
	batch) for c in $BENCH_CLIENTS; do run_point batch "$c" hot.sql; done ;;
	zipfbatch) for c in $BENCH_ZIPF_CLIENTS; do run_point zipfbatch "$c" zipf.sql; done ;;
	buynow) for c in $BENCH_ZIPF_CLIENTS; do run_point buynow "$c" "$buynow_scripts"; done ;;
	buynowbatch) for c in $BENCH_ZIPF_CLIENTS; do run_point buynowbatch "$c" "$buynow_scripts"; done ;;
	checkout) for c in $BENCH_ZIPF_CLIENTS; do run_point checkout "$c" checkout.sql; done ;;
	insert1) for c in $BENCH_CLIENTS; do run_point insert1 "$c" insert1.sql; done ;;
	expiry)
		run_point expiry "$BENCH_EXPIRY_CLIENTS" expiry.sql
		t_end=$(sql "SELECT now()")
		# let the last ones (TTL 2 s) expire and be returned
		for _ in $(seq 1 100); do
			[ "$(sql "SELECT count(*) FROM market.reservations WHERE status = 'held'")" = 0 ] && break
			sleep 0.1
		done
		expiry_lag=$(sql "SELECT format('%s reservations expired while the load ran; lag of the worker (finished_at - expires_at): p50 %s ms, p99 %s ms, max %s ms; still held afterwards: %s',
				count(*) FILTER (WHERE status = 'expired' AND expires_at <= '$t_end'),
				round((percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - expires_at))
				       FILTER (WHERE status = 'expired' AND expires_at <= '$t_end'))::numeric * 1000, 1),
				round((percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - expires_at))
				       FILTER (WHERE status = 'expired' AND expires_at <= '$t_end'))::numeric * 1000, 1),
				round((max(extract(epoch FROM finished_at - expires_at))
				       FILTER (WHERE status = 'expired' AND expires_at <= '$t_end'))::numeric * 1000, 1),
				count(*) FILTER (WHERE status = 'held'))
			FROM market.reservations")
		echo "bench: expiry: $expiry_lag"
		;;
	baseline) for c in $BENCH_CLIENTS; do run_point baseline "$c" baseline.sql; done ;;
	psp)
		"$BENCH_PSP_BIN" --stripe-port 0 >"$work/psp.out" 2>"$work/psp.err" &
		psp_pid=$!
		for _ in $(seq 1 50); do [ -s "$work/psp.out" ] && break; sleep 0.1; done
		stripe_port=$(sed -nE 's/.*"stripe_port": *([0-9]+).*/\1/p' "$work/psp.out")
		control_port=$(sed -nE 's/.*"control_port": *([0-9]+).*/\1/p' "$work/psp.out")
		perl -MHTTP::Tiny -e 'HTTP::Tiny->new->post($ARGV[0], { content => q({"type": "latency", "psp": "all", "ms": 20}) })->{success} or exit 1' \
			"http://127.0.0.1:$control_port/_control/faults"
		sql "SELECT market.psp_register('bench-stripe', 'stripe', 'http://127.0.0.1:$stripe_port',
		       '{\"secret_key\": \"sk_bench\"}', 10)" >/dev/null
		sql "DO \$\$
		     DECLARE g bigint; p bigint; seller bigint := (SELECT min(id) FROM market.sellers);
		     BEGIN
		         FOR i IN 1 .. $BENCH_PSP_JOBS LOOP
		             INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)
		             VALUES (gen_random_uuid(), 'bench', 'EUR', 1000) RETURNING id INTO g;
		             INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)
		             VALUES (g, seller, 'bench', 'EUR', 1000);
		             INSERT INTO market.payments (group_id, customer_id, currency, amount_minor, method)
		             VALUES (g, 'bench', 'EUR', 1000, 'pm_card_visa') RETURNING id INTO p;
		             INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)
		             VALUES ('psp', 'payment.authorize', 'payment', p,
		                     jsonb_build_object('payment_id', p, 'group_id', g, 'amount_minor', 1000,
		                                        'currency', 'EUR', 'method', 'pm_card_visa'));
		         END LOOP;
		     END \$\$"
		t0=$(date +%s%N)
		for _ in $(seq 1 6000); do
			[ "$(sql "SELECT count(*) FROM market.payments WHERE status = 'pending'")" = 0 ] && break
			sleep 0.1
		done
		t1=$(date +%s%N)
		calls=$(sql "SELECT count(*) FROM market.payment_attempts WHERE outcome = 'succeeded'")
		psp_line=$(awk -v n="$calls" -v t0="$t0" -v t1="$t1" -v jobs="$BENCH_PSP_JOBS" \
			'BEGIN { s = (t1 - t0) / 1e9; printf "%d payment.authorize jobs, %d successful PSP calls in %.1f s: %.0f PSP calls/s (test PSP answering in 20 ms)", jobs, n, s, n / s }')
		psp_line="$psp_line; still pending: $(sql "SELECT count(*) FROM market.payments WHERE status = 'pending'"), audit violations $(sql "SELECT count(*) FROM market.verify_inventory()")"
		# exactly once: the test PSP's ledger has one successful authorization
		# per payment reference (mk-pay-<id>), and every PSP job is acked
		ledger=$(perl -MHTTP::Tiny -MJSON::PP -e '
			my $r = HTTP::Tiny->new->get($ARGV[0]); $r->{success} or exit 1;
			my $l = JSON::PP->new->decode($r->{content});
			my $by = $l->{charges_by_reference};
			my $refs = scalar keys %$by; my $twice = grep { $by->{$_} != 1 } keys %$by;
			print "$l->{charges} $refs $twice";' "http://127.0.0.1:$control_port/_control/ledger")
		read -r led_charges led_refs led_twice <<<"$ledger"
		authorized=$(sql "SELECT count(*) FROM market.payments WHERE status = 'authorized'")
		open_jobs=$(sql "SELECT count(*) FROM market.outbox WHERE topic = 'psp' AND acked_at IS NULL AND dead_at IS NULL")
		dead_jobs=$(sql "SELECT count(*) FROM market.outbox WHERE topic = 'psp' AND dead_at IS NOT NULL")
		psp_line="$psp_line; authorized $authorized, PSP ledger: $led_charges charges for $led_refs payments, $led_twice charged other than once; PSP jobs not acked $open_jobs, dead $dead_jobs"
		echo "bench: psp: $psp_line"
		kill "$psp_pid" 2>/dev/null || true
		;;
	zipf) for c in $BENCH_ZIPF_CLIENTS; do run_point zipf "$c" zipf.sql; done ;;
	select1)
		# at every client count used above
		for c in $(printf '%s\n' $BENCH_CLIENTS $BENCH_ZIPF_CLIENTS | sort -un); do
			run_point select1 "$c" select1.sql
		done
		;;
	*) echo "bench: unknown scenario $scenario" >&2; exit 1 ;;
	esac
done

# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------
pgver=$("$bindir/postgres" --version)
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
mem=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
ncpu=$(nproc)

awk -F'\t' -v zs="$BENCH_ZIPF_S" -v nskus="$BENCH_SKUS" '
	{ rows[NR] = $0; if ($1 == "baseline") bl[$2] = $3; if ($1 == "select1") s1[$2] = $3 }
	function label(s) {
		if (s == "hot") return "market.reserve, 1 hot SKU"
		if (s == "flash") return "market.reserve, 1 hot SKU with 256 slots"
		if (s == "insert1") return "INSERT of one row (write ceiling)"
		if (s == "expiry") return sprintf("market.reserve, Zipf, TTL 2 s (expiry under load)")
		if (s == "baseline") return "baseline UPDATE, 1 hot row"
		if (s == "zipf") return sprintf("market.reserve, %d SKUs, Zipf s=%s", nskus, zs)
		if (s == "select1") return "SELECT 1 (ceiling)"
		if (s == "batch") return "market.reserve, 1 hot SKU, batch_reserve = on"
		if (s == "zipfbatch") return sprintf("market.reserve, %d SKUs, Zipf s=%s, batch_reserve = on", nskus, zs)
		if (s == "buynow") return sprintf("buy_now, carts of 1-5 SKUs (Zipf), checkouts/s", nskus)
		if (s == "buynowbatch") return "buy_now, carts of 1-5 SKUs (Zipf), batch_checkout = on, checkouts/s"
		if (s == "checkout") return "cart + checkout_begin + checkout_complete, checkouts/s"
		return s
	}
	function ratio(v, b) { return (b > 0) ? sprintf("%.2f", v / b) : "-" }
	END {
		print "| scenario | clients | successful/s | p50 ms | p95 ms | p99 ms | audit violations | aborted clients | vs baseline | vs SELECT 1 | whole run/s | CPU µs/success |"
		print "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
		for (i = 1; i <= NR; i++) {
			split(rows[i], f, "\t")
			printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
				label(f[1]), f[2], f[3], f[4], f[5], f[6], f[7], f[8],
				ratio(f[3], bl[f[2]]), ratio(f[3], s1[f[2]]), f[11], f[12]
		}
	}' "$results" >"$work/table.md"

{
	echo "# market benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo
	echo "- machine: $ncpu CPUs ($cpu), $mem RAM"
	echo "- market.so sha256 $(sha256sum "$pkglibdir/market.so" | cut -c1-12)"
	echo "- disk: fdatasync of one 8 kB write ${fsync_rate:-?} ops/s (pg_test_fsync)"
	echo "- $pgver; market at $BENCH_REV; pgbench -j $BENCH_THREADS, $BENCH_WARMUP + $BENCH_SECONDS s per point, $BENCH_PROTOCOL protocol"
	echo "- server: synchronous_commit = $BENCH_SYNC_COMMIT, fsync = on, shared_buffers = 1GB, max_connections = 400,"
	echo "  shared_preload_libraries = 'market,pg_cron', market.stock_slots = ${slots:-default}, expiry worker running: ${expiry:-?}"
	echo "- successful/s, p50/p95/p99: over the transactions that completed after a ${BENCH_WARMUP} s warm-up (pgbench -l),"
	echo "  the rate scaled by the run's successes counted in the database per transaction; whole run/s: the"
	echo "  run's successes / its time measured by pgbench (warm-up included)"
	echo "- vs baseline, vs SELECT 1: successful/s over that scenario's at the same client count"
	echo "- CPU µs/success: the whole machine's busy CPU time (/proc/stat) from 1 s after the warm-up to 1 s"
	echo "  before the end, over the successes completed in that time (pgbench, server, everything else)"
	echo
	cat "$work/table.md"
	if [ -n "${expiry_lag:-}" ]; then
		echo
		echo "Expiry under load: $expiry_lag."
	fi
	if [ -n "${psp_line:-}" ]; then
		echo
		echo "PSP worker: $psp_line."
	fi
} >"$work/report.md"

echo
cat "$work/report.md"
mkdir -p "$(dirname "$BENCH_OUT")"
cp "$work/report.md" "$BENCH_OUT"
[ -n "${BENCH_INNER:-}" ] || echo "bench: table written to $BENCH_OUT"
