# market: PGXS build of the extension, plus the project's own targets.
#
#   make demo     a local cluster, a sample catalog, a flash sale (test/tools/demo.sh)
#   make test     every suite on throwaway clusters (test/tools/run-tests.sh)
#   make bench    the pgbench benchmarks (test/bench/run.sh), not part of CI
#   make test-psp the local test PSP the payment tests start (test/psp/)
#
# The PGXS targets (all, install, installcheck) work as usual; installcheck
# starts its own temporary cluster with the library preloaded.

EXTENSION  = market
MODULE_big = market
OBJS = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))

# Install and update scripts.  0.1 is a released script and never changes;
# each later release is an update script concatenated, in file-name order,
# from the parts in sql/<from>--<to>/.  CREATE EXTENSION runs the 0.1
# script and then the updates, so fresh and upgraded databases are alike.
UPDATE_SCRIPTS = sql/market--0.1--0.2.sql
UPDATE_SCRIPTS += sql/market--0.2--0.3.sql
UPDATE_SCRIPTS += sql/market--0.3--0.4.sql
UPDATE_SCRIPTS += sql/market--0.4--0.5.sql
DATA = sql/market--0.1.sql
DATA_built = $(UPDATE_SCRIPTS)
EXTRA_CLEAN = $(UPDATE_SCRIPTS)

PG_CPPFLAGS = -Isrc
PG_CFLAGS = -Werror -Wmissing-prototypes -Wshadow=compatible-local
# the PSP worker's HTTP client (src/psp_worker.c)
SHLIB_LINK += -lcurl

# pg_regress suites: behaviour and bad input (sql/ + expected/)
# (listed in run order; a name without its sql/<name>.sql is left out)
REGRESS_ORDER = catalog stock reserve reservation_lifecycle expiry privileges verify \
	upgrade cart checkout orders references outbox payments psp_batch webhooks batch batch_checkout
REGRESS = $(filter $(basename $(notdir $(wildcard sql/*.sql))),$(REGRESS_ORDER))
REGRESS_OPTS = --temp-instance=./tmp_check/regress --temp-config=test/regress.conf

# isolation specs (test/isolation/specs + test/isolation/expected)
ISOLATION = $(basename $(notdir $(wildcard test/isolation/specs/*.spec)))
ISOLATION_OPTS = --inputdir=test/isolation --outputdir=output_iso \
	--temp-instance=./tmp_check/isolation --temp-config=test/isolation.conf

# pg_regress creates --temp-instance but not its parent directory
REGRESS_PREP = tmp_check_dir

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# every object (and its JIT bitcode) is rebuilt when a header changes: PGXS
# tracks no header dependencies unless PostgreSQL was built with them
$(OBJS) $(OBJS:.o=.bc): $(wildcard src/*.h)

sql/market--0.1--0.2.sql: $(sort $(wildcard sql/0.1--0.2/*.sql))
	cat $^ > $@

sql/market--0.2--0.3.sql: $(sort $(wildcard sql/0.2--0.3/*.sql))
	cat $^ > $@

sql/market--0.3--0.4.sql: $(sort $(wildcard sql/0.3--0.4/*.sql))
	cat $^ > $@

sql/market--0.4--0.5.sql: $(sort $(wildcard sql/0.4--0.5/*.sql))
	cat $^ > $@

.PHONY: test demo bench test-psp tmp_check_dir
tmp_check_dir:
	@mkdir -p tmp_check

test:
	bash test/tools/run-tests.sh

demo:
	bash test/tools/demo.sh

bench:
	bash test/bench/run.sh

test-psp:
	$(MAKE) -C test/psp
