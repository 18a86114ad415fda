#!/usr/bin/env bash
# Run the TAP tests (test/t/*.pl) against the installed extension, the way
# PGXS's prove_installcheck does: PostgreSQL::Test::Cluster from the server
# dev package, PG_REGRESS and TESTDIR set, the server binaries first on PATH.
#
#   test/tools/run-tap.sh                 every test in test/t
#   test/tools/run-tap.sh t/001_expiry_worker.pl
#   PROVE_FLAGS=--verbose test/tools/run-tap.sh
#
# Needs `make install` first (the clusters load market.so from pkglibdir).
# PostgreSQL refuses to run as root: when started as root, the tests are
# copied to a directory owned by the postgres OS user and run as that user;
# the logs are copied back to test/tmp_check/log afterwards.
#
# Environment: PG_CONFIG (default pg_config), PROVE_FLAGS, TAP_USER (the OS
# user when root, default postgres), PG_TEST_NOCLEAN (keep the data dirs).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
testdir=$(cd "$here/.." && pwd)          # the directory holding t/

PG_CONFIG=${PG_CONFIG:-pg_config}
bindir=$("$PG_CONFIG" --bindir)
pkglibdir=$("$PG_CONFIG" --pkglibdir)
pgxs_dir="$pkglibdir/pgxs"
perl_lib="$pgxs_dir/src/test/perl"
pg_regress="$pgxs_dir/src/test/regress/pg_regress"

for f in "$perl_lib/PostgreSQL/Test/Cluster.pm" "$pg_regress"; do
	if [ ! -e "$f" ]; then
		echo "run-tap: $f not found (install postgresql-server-dev-*)" >&2
		exit 1
	fi
done
if ! perl -MIPC::Run -e 1 2>/dev/null; then
	echo "run-tap: perl module IPC::Run missing (install libipc-run-perl)" >&2
	exit 1
fi
if [ ! -e "$pkglibdir/market.so" ]; then
	echo "run-tap: $pkglibdir/market.so not found: run 'make install' first" >&2
	exit 1
fi

# test files, relative to $testdir (default: all of t/)
tests=()
for a in "$@"; do
	a=${a#test/}
	tests+=("$a")
done
if [ ${#tests[@]} -eq 0 ]; then
	for f in "$testdir"/t/*.pl; do
		tests+=("t/$(basename "$f")")
	done
fi

run_prove() {
	# $1: the directory that plays TESTDIR (holds t/, gets tmp_check/)
	local dir=$1
	shift
	cd "$dir"
	rm -rf "$dir/tmp_check"
	mkdir -p "$dir/tmp_check"
	TESTDIR="$dir" PATH="$bindir:$PATH" PG_REGRESS="$pg_regress" \
		prove -I "$perl_lib" -I "$dir" ${PROVE_FLAGS:-} "$@"
}

if [ "$(id -u)" -ne 0 ]; then
	run_prove "$testdir" "${tests[@]}"
	exit $?
fi

# root: run as the postgres OS user from a copy it owns
user=${TAP_USER:-postgres}
if ! id "$user" >/dev/null 2>&1; then
	echo "run-tap: running as root and OS user '$user' does not exist" >&2
	exit 1
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/market-tap.XXXXXX")
cleanup() {
	if [ -n "${PG_TEST_NOCLEAN:-}" ]; then
		echo "run-tap: PG_TEST_NOCLEAN set, keeping $work"
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT
cp -r "$testdir/t" "$work/t"
chown -R "$user" "$work"
chmod 700 "$work"

rc=0
runuser -u "$user" -- env \
	PG_CONFIG="$PG_CONFIG" PROVE_FLAGS="${PROVE_FLAGS:-}" \
	PG_TEST_NOCLEAN="${PG_TEST_NOCLEAN:-}" \
	bash -c "$(declare -f run_prove); bindir='$bindir'; perl_lib='$perl_lib'; pg_regress='$pg_regress'; \
		[ -n \"\$PG_TEST_NOCLEAN\" ] || unset PG_TEST_NOCLEAN; run_prove \"\$@\"" \
	run-tap "$work" "${tests[@]}" || rc=$?

# keep the logs where a developer looks for them
if [ -d "$work/tmp_check/log" ]; then
	rm -rf "$testdir/tmp_check/log"
	mkdir -p "$testdir/tmp_check"
	cp -r "$work/tmp_check/log" "$testdir/tmp_check/log"
	echo "run-tap: logs in $testdir/tmp_check/log"
fi
exit $rc
