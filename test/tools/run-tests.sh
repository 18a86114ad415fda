#!/usr/bin/env bash
# Run every test suite of the market extension on throwaway clusters.
# This is what `make test` runs.  It works on a fresh Debian 12 machine, as
# root or as a user with sudo, with no PostgreSQL server running.
#
#   1. install the Debian packages (test/tools/install-deps.sh)
#   2. build (`make`, warnings are errors) and install (`make install`)
#   3. copy the tree to a scratch directory owned by the user that runs the
#      servers (the `postgres` OS user when we are root: PostgreSQL refuses
#      to run as root) and, there:
#        regress    make installcheck, pg_regress part   (sql/, expected/)
#        isolation  make installcheck, isolation part    (test/isolation/)
#        pgtap      pg_regress over test/pgtap/*.sql      (test/pgtap/expected/)
#        tap        prove over test/t/*.pl with PostgreSQL::Test::Cluster,
#                   run from test/ as PGXS does (logs: test/tmp_check/log)
#
# Every suite runs even when an earlier one failed.  A suite with no files
# is skipped.  Tests are counted per test file (one pg_regress test, one
# isolation spec, one pgTAP file, one TAP script); a suite that fails before
# running any test counts as one failure.  The last line is
# "N passed, M failed" and the exit status is non-zero if anything failed.
#
# Environment:
#   SUITES="regress isolation pgtap tap"   the suites to run (default: all)
#   SUITE_TIMEOUT=1200                     seconds allowed to each suite
#   KEEP_SCRATCH=1                         keep the scratch directory
#   MARKET_TEST_LOCK=/tmp/market-test.lock  lock held from install to the end
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

SUITES=${SUITES:-regress isolation pgtap tap}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-1200}
T0=$(date +%s)

PASSED=0
FAILED=0
SKIPPED=0
SUMMARY=()      # one line per suite
FAILED_NAMES=() # suite/test of each failure

say() { printf '\n=== %s\n' "$*"; }
note() { SUMMARY+=("$(printf '%-10s %-8s %5ss  %s' "$1" "$2" "$3" "$4")"); }

finish() {
	local total=$(( $(date +%s) - T0 ))
	printf '\n==================== summary (%ss) ====================\n' "$total"
	local l
	for l in "${SUMMARY[@]}"; do printf '%s\n' "$l"; done
	if [ ${#FAILED_NAMES[@]} -gt 0 ]; then
		printf 'failed: %s\n' "${FAILED_NAMES[*]}"
	fi
	if [ "$SKIPPED" -gt 0 ]; then
		printf 'skipped: %s (no files yet)\n' "$SKIPPED"
	fi
	printf '%s passed, %s failed\n' "$PASSED" "$FAILED"
	[ "$FAILED" -eq 0 ]
	exit $?
}

# ---------------------------------------------------------------------------
# who runs what
# ---------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ]; then
	SUDO=()
	PGUSER_OS=postgres
	as_pg() { runuser -u postgres -- "$@"; }
else
	SUDO=(sudo)
	PGUSER_OS=$(id -un)
	as_pg() { "$@"; }
fi

# ---------------------------------------------------------------------------
# 1. dependencies
# ---------------------------------------------------------------------------
say "dependencies"
if ! bash test/tools/install-deps.sh; then
	note deps FAILED 0 "test/tools/install-deps.sh failed"
	FAILED=$((FAILED + 1)); FAILED_NAMES+=(deps)
	finish
fi

PG_CONFIG=${PG_CONFIG:-pg_config}
BINDIR=$("$PG_CONFIG" --bindir)
PKGLIBDIR=$("$PG_CONFIG" --pkglibdir)
PGXS_DIR=$PKGLIBDIR/pgxs
PG_REGRESS=$PGXS_DIR/src/test/regress/pg_regress
PERL_LIB=$PGXS_DIR/src/test/perl
echo "PostgreSQL: $("$PG_CONFIG" --version) ($BINDIR)"

# ---------------------------------------------------------------------------
# 2. build and install
#
# The servers load the installed library, so two runs from different
# working trees on one machine must not interleave: hold a lock from the
# install to the end of the run.
# ---------------------------------------------------------------------------
exec 9>"${MARKET_TEST_LOCK:-/tmp/market-test.lock}"
if ! flock -n 9; then
	echo "waiting for another test run on this machine to finish"
	flock 9
fi
say "build (make)"
t=$(date +%s)
if ! make -j"$(nproc)" PG_CONFIG="$PG_CONFIG" 2>&1 | tee /tmp/market-build.$$.log; then
	echo "--- build failed; the compiler said:"
	grep -iE 'error|warning|\*\*\*' /tmp/market-build.$$.log | head -50
	rm -f /tmp/market-build.$$.log
	note build FAILED $(( $(date +%s) - t )) "make failed (warnings are errors); no suite ran"
	FAILED=$((FAILED + 1)); FAILED_NAMES+=(build)
	finish
fi
rm -f /tmp/market-build.$$.log
note build ok $(( $(date +%s) - t )) "make"
# the test PSP (test/psp/) that TAP tests start; plain C, libc only
if ! make -s test-psp; then
	note test-psp FAILED 0 "make test-psp failed"
	FAILED=$((FAILED + 1)); FAILED_NAMES+=(test-psp)
fi

say "install (make install)"
t=$(date +%s)
if ! "${SUDO[@]}" make install PG_CONFIG="$PG_CONFIG"; then
	note install FAILED $(( $(date +%s) - t )) "make install failed; no suite ran"
	FAILED=$((FAILED + 1)); FAILED_NAMES+=(install)
	finish
fi
note install ok $(( $(date +%s) - t )) "make install"

# ---------------------------------------------------------------------------
# 3. scratch copy owned by the server's OS user
# ---------------------------------------------------------------------------
SCRATCH=$(mktemp -d /tmp/market-test.XXXXXX)
cleanup() {
	# stop any server a killed suite left behind in the scratch directory
	local pid
	for pid in $(find "$SCRATCH" -name postmaster.pid 2>/dev/null); do
		as_pg "$BINDIR/pg_ctl" stop -D "$(dirname "$pid")" -m immediate >/dev/null 2>&1 || true
	done
	if [ -n "${KEEP_SCRATCH:-}" ]; then
		echo "scratch directory kept: $SCRATCH"
	else
		rm -rf "$SCRATCH"
	fi
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 130' INT TERM

tar -C "$ROOT" -cf - \
	--exclude=./.git --exclude=./tmp_check --exclude=./results \
	--exclude=./output_iso --exclude=./output_pgtap --exclude=./log \
	--exclude=./regression.diffs --exclude=./regression.out . \
	| tar -C "$SCRATCH" -xf -
if [ "$(id -u)" -eq 0 ]; then
	chown -R postgres:postgres "$SCRATCH"
fi
cd "$SCRATCH"
as_pg mkdir -p tmp_check
echo "scratch directory: $SCRATCH (servers run as $PGUSER_OS)"

# environment for everything that runs as the server's user
PGENV=(env "PATH=$BINDIR:/usr/local/bin:/usr/bin:/bin" "HOME=$SCRATCH" "LANG=${LANG:-C.UTF-8}"
	"PG_CONFIG=$PG_CONFIG")

# run "$@" as the server's user with a time limit; output to the terminal
# and to $1 (the log file)
run_logged() {
	local log=$1; shift
	as_pg "${PGENV[@]}" timeout --kill-after=30 "$SUITE_TIMEOUT" "$@" 2>&1 | tee "$log"
	return "${PIPESTATUS[0]}"
}

# names of the tests a pg_regress log reports as ok / as failed
pg_regress_ok() { grep -E '^(test |     ).* \.\.\. ok' "$1" | sed -E 's/^(test |     ) *([^ ]+).*/\2/'; }
pg_regress_failed() { grep -E '^(test |     ).* \.\.\. (FAILED|failed)' "$1" | sed -E 's/^(test |     ) *([^ ]+).*/\2/'; }

# show why a pg_regress run failed
explain_pg_regress() {
	local diffs=$1 instance=$2
	if [ -s "$diffs" ]; then
		echo "--- $diffs (first 300 lines):"
		head -n 300 "$diffs"
	fi
	local f
	for f in "$instance"/log/initdb.log "$instance"/log/postmaster.log; do
		[ -f "$f" ] || continue
		if grep -qE 'terminated by signal|PANIC|TRAP:|server process .* exited' "$f"; then
			echo "--- crashes in $f:"
			grep -E -B2 -A2 'terminated by signal|PANIC|TRAP:|server process .* exited' "$f" | head -n 60
		fi
		if [ ! -s "$diffs" ]; then
			echo "--- tail of $f:"
			tail -n 40 "$f"
		fi
	done
}

# record a pg_regress-style suite result.  Tests named in the global
# EXTRA_FAILED (e.g. pgTAP files whose output says "not ok") count as failed
# even when their output matched.
EXTRA_FAILED=()
record_pg_regress() {
	local suite=$1 rc=$2 secs=$3 log=$4 diffs=$5 instance=$6 noexp=${7:-0} p=0 f=0 name x bad
	for name in $(pg_regress_ok "$log"); do
		bad=
		for x in "${EXTRA_FAILED[@]}"; do [ "$x" = "$name" ] && bad=1; done
		if [ -n "$bad" ]; then
			f=$((f + 1)); FAILED_NAMES+=("$suite/$name(not ok)")
		else
			p=$((p + 1))
		fi
	done
	for name in $(pg_regress_failed "$log"); do
		f=$((f + 1)); FAILED_NAMES+=("$suite/$name")
	done
	if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
		echo "--- $suite timed out after ${SUITE_TIMEOUT}s (SUITE_TIMEOUT)"
	fi
	if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
		f=1
		if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
			FAILED_NAMES+=("$suite(timeout after ${SUITE_TIMEOUT}s)")
		else
			FAILED_NAMES+=("$suite(exit $rc)")
		fi
	fi
	EXTRA_FAILED=()
	PASSED=$((PASSED + p)); FAILED=$((FAILED + f))
	if [ "$rc" -ne 0 ] || [ "$f" -ne 0 ] || [ "$noexp" -ne 0 ]; then
		note "$suite" FAILED "$secs" "$p passed, $((f + noexp)) failed$( [ "$noexp" -ne 0 ] && echo " ($noexp without expected output)")"
		explain_pg_regress "$diffs" "$instance"
	else
		note "$suite" ok "$secs" "$p passed"
	fi
}

# the value of a Makefile variable
make_var() {
	printf '_print_var:\n\t@echo $(%s)\n' "$1" \
		| make -s --no-print-directory -f Makefile -f - _print_var PG_CONFIG="$PG_CONFIG"
}

# split test names into RUNNABLE (expected output exists) and the rest,
# which count as failures: pg_regress stops the whole run at the first test
# without an expected file, so they are left out of the run.
#   split_expected SUITE EXPECTED_DIR NAME...
split_expected() {
	local suite=$1 dir=$2 n; shift 2
	RUNNABLE=()
	for n in "$@"; do
		if compgen -G "$dir/$n.out" >/dev/null || compgen -G "$dir/${n}_[0-9].out" >/dev/null; then
			RUNNABLE+=("$n")
		else
			echo "FAIL: $suite test $n has no expected output ($dir/$n.out)"
			FAILED=$((FAILED + 1)); FAILED_NAMES+=("$suite/$n(no expected output)")
			NOEXP=$((NOEXP + 1))
		fi
	done
}

want() { case " $SUITES " in *" $1 "*) return 0 ;; esac; return 1; }

# ---------------------------------------------------------------------------
# (a1) pg_regress suite: make installcheck with only the REGRESS part
# ---------------------------------------------------------------------------
if want regress; then
	say "regress (make installcheck, REGRESS)"
	have=() missing=()
	for n in $(make_var REGRESS); do
		if [ -f "sql/$n.sql" ]; then have+=("$n"); else missing+=("$n"); fi
	done
	if [ ${#missing[@]} -gt 0 ]; then
		echo "WARNING: listed in REGRESS but sql/NAME.sql does not exist yet: ${missing[*]}"
		SKIPPED=$((SKIPPED + ${#missing[@]}))
	fi
	if [ ${#have[@]} -eq 0 ]; then
		echo "skipped: no sql/*.sql test named in REGRESS exists yet"
		note regress skipped 0 "no files"
	else
		NOEXP=0
		split_expected regress expected "${have[@]}"
		if [ ${#RUNNABLE[@]} -gt 0 ]; then
			t=$(date +%s)
			run_logged regress.log make installcheck PG_CONFIG="$PG_CONFIG" \
				REGRESS="${RUNNABLE[*]}" ISOLATION=
			rc=$?
			record_pg_regress regress "$rc" $(( $(date +%s) - t )) regress.log \
				regression.diffs tmp_check/regress "$NOEXP"
		else
			note regress FAILED 0 "0 passed, $NOEXP failed (no expected output)"
		fi
	fi
fi

# ---------------------------------------------------------------------------
# (a2) isolation specs: make installcheck with only the ISOLATION part
# ---------------------------------------------------------------------------
if want isolation; then
	say "isolation (make installcheck, ISOLATION)"
	specs=$(make_var ISOLATION)
	if [ -z "$specs" ]; then
		echo "skipped: no test/isolation/specs/*.spec yet"
		note isolation skipped 0 "no files"
	else
		NOEXP=0
		split_expected isolation test/isolation/expected $specs
		if [ ${#RUNNABLE[@]} -gt 0 ]; then
			t=$(date +%s)
			run_logged isolation.log make installcheck PG_CONFIG="$PG_CONFIG" \
				REGRESS= ISOLATION="${RUNNABLE[*]}"
			rc=$?
			record_pg_regress isolation "$rc" $(( $(date +%s) - t )) isolation.log \
				output_iso/regression.diffs tmp_check/isolation "$NOEXP"
		else
			note isolation FAILED 0 "0 passed, $NOEXP failed (no expected output)"
		fi
	fi
fi

# ---------------------------------------------------------------------------
# (b) pgTAP: test/pgtap/NAME.sql against test/pgtap/expected/NAME.out with
#     pg_regress on its own temporary instance.  pg_regress wants
#     INPUTDIR/sql and INPUTDIR/expected, so the files are staged first.
# ---------------------------------------------------------------------------
if want pgtap; then
	say "pgtap (pg_regress over test/pgtap)"
	names=()
	for f in test/pgtap/*.sql; do
		[ -f "$f" ] && names+=("$(basename "$f" .sql)")
	done
	if [ ${#names[@]} -eq 0 ]; then
		echo "skipped: no test/pgtap/*.sql yet"
		note pgtap skipped 0 "no files"
	else
		NOEXP=0
		split_expected pgtap test/pgtap/expected "${names[@]}"
		if [ ${#RUNNABLE[@]} -eq 0 ]; then
			note pgtap FAILED 0 "0 passed, $NOEXP failed (no expected output)"
		else
			as_pg mkdir -p pgtap_input/sql pgtap_input/expected output_pgtap
			for n in "${RUNNABLE[@]}"; do
				as_pg cp "test/pgtap/$n.sql" pgtap_input/sql/
				for f in test/pgtap/expected/"$n".out test/pgtap/expected/"$n"_[0-9].out; do
					[ -f "$f" ] && as_pg cp "$f" pgtap_input/expected/
				done
			done
			t=$(date +%s)
			run_logged pgtap.log "$PG_REGRESS" --bindir="$BINDIR" \
				--temp-instance=./tmp_check/pgtap --temp-config=test/regress.conf \
				--inputdir=pgtap_input --outputdir=output_pgtap \
				--dbname=contrib_regression "${RUNNABLE[@]}"
			rc=$?
			# a pgTAP "not ok" counts as a failure even if the expected
			# output has it too
			for f in output_pgtap/results/*.out; do
				[ -f "$f" ] || continue
				if grep -qE '^not ok' "$f"; then
					echo "--- $f has failing assertions:"
					grep -E -A3 '^not ok' "$f" | head -n 40
					EXTRA_FAILED+=("$(basename "$f" .out)")
				fi
			done
			record_pg_regress pgtap "$rc" $(( $(date +%s) - t )) pgtap.log \
				output_pgtap/regression.diffs tmp_check/pgtap "$NOEXP"
		fi
	fi
fi

# ---------------------------------------------------------------------------
# (c) TAP: prove test/t/*.pl, one file at a time
# ---------------------------------------------------------------------------
if want tap; then
	say "tap (prove test/t/*.pl)"
	scripts=()
	for f in test/t/*.pl; do
		# TAP_ONLY="001 005" runs only the files whose names start so
		if [ -n "${TAP_ONLY:-}" ]; then
			keep=
			for o in $TAP_ONLY; do case "$(basename "$f")" in "$o"*) keep=1 ;; esac; done
			[ -n "$keep" ] || continue
		fi
		[ -f "$f" ] && scripts+=("$f")
	done
	if [ ${#scripts[@]} -eq 0 ]; then
		echo "skipped: no test/t/*.pl yet"
		note tap skipped 0 "no files"
	else
		# as PGXS's prove_installcheck does it: from the directory holding
		# t/ (test/), which is also TESTDIR (logs in test/tmp_check/log)
		t=$(date +%s)
		p=0; f=0
		as_pg mkdir -p test/tmp_check
		for s in "${scripts[@]}"; do
			name=$(basename "$s" .pl)
			ts=$(date +%s)
			( cd test && run_logged "../tap-$name.log" env \
				TESTDIR="$SCRATCH/test" PG_REGRESS="$PG_REGRESS" \
				prove -I "$PERL_LIB" -I . "t/$name.pl" )
			rc=$?
			echo "    ($name: $(( $(date +%s) - ts ))s)"
			if [ "$rc" -eq 0 ]; then
				p=$((p + 1))
			else
				f=$((f + 1))
				if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
					echo "--- $name timed out after ${SUITE_TIMEOUT}s (SUITE_TIMEOUT)"
					FAILED_NAMES+=("tap/$name(timeout after ${SUITE_TIMEOUT}s)")
				else
					FAILED_NAMES+=("tap/$name")
				fi
				for l in test/tmp_check/log/regress_log_"$name" test/tmp_check/log/"$name"_*.log; do
					[ -f "$l" ] || continue
					echo "--- tail of $l:"
					tail -n 60 "$l"
				done
			fi
		done
		PASSED=$((PASSED + p)); FAILED=$((FAILED + f))
		if [ "$f" -ne 0 ]; then
			note tap FAILED $(( $(date +%s) - t )) "$p passed, $f failed"
		else
			note tap ok $(( $(date +%s) - t )) "$p passed"
		fi
	fi
fi

finish
