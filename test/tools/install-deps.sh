#!/usr/bin/env bash
# Install the Debian packages needed to build and test the market extension.
#
# Idempotent: when every package is already installed it returns at once
# without touching apt.  Otherwise it runs apt-get update and installs what
# is missing.  Runs as root, or through sudo when not root.
set -euo pipefail

PACKAGES=(
	build-essential            # make, gcc
	postgresql-15              # server, initdb, pg_ctl, pgbench
	postgresql-server-dev-15   # pg_config, PGXS, pg_regress, pg_isolation_regress, TAP perl modules
	postgresql-15-cron         # pg_cron, preloaded next to market in every test cluster
	postgresql-15-pgtap        # the pgtap extension for test/pgtap
	pgtap                      # pg_prove and friends
	libipc-run-perl            # IPC::Run, needed by PostgreSQL::Test::Cluster
	libcurl4-openssl-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	if [ "$status" != "install ok installed" ]; then
		missing+=("$p")
	fi
done

if [ ${#missing[@]} -eq 0 ]; then
	echo "install-deps: all ${#PACKAGES[@]} packages already installed"
	exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
	SUDO=()
elif command -v sudo >/dev/null 2>&1; then
	SUDO=(sudo)
else
	echo "install-deps: missing packages (${missing[*]}) and not root, and sudo is not available" >&2
	exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	"${missing[@]}"
echo "install-deps: done"
