/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The reservation expiry worker: a static background worker, started
 *	  when market is in shared_preload_libraries, that returns expired
 *	  reservations in bounded batches and purges old finished ones, and
 *	  market.worker_status() which reports on it.
 *
 * The worker sleeps on its latch until the next reservation expires.  It
 * publishes that time in MarketShared.planned_wakeup; a transaction that
 * commits a reservation expiring earlier lowers requested_wakeup and sets
 * the worker's latch (market_xact_callback in market.c).  While a pass
 * runs, planned_wakeup is "never", so any reservation committed meanwhile
 * wakes it again.
 *
 * Each batch is one short transaction.  An error ends the process and the
 * postmaster starts it again after bgw_restart_time (1 s); nothing is lost
 * because a batch commits or rolls back whole.
 *
 * Lock waits.  The worker locks reservation rows, then slot rows, both with
 * SKIP LOCKED; a reserving session on the exact path holds a pair's slot
 * rows, then locks expired reservation rows with SKIP LOCKED.  SKIP LOCKED
 * does not cover every wait, though: following a row's chain of updated
 * versions still waits for the updater, and the two could then wait for
 * each other.  So the worker never waits long: it runs with lock_timeout =
 * EXPIRY_LOCK_TIMEOUT_MS, and a batch whose wait times out is rolled back
 * (nothing of it is lost) and tried again LOCKED_RETRY_MS later, long
 * before deadlock_timeout would make the session the deadlock's victim.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "market.h"

PGDLLEXPORT void market_expiry_worker_main(Datum main_arg);

PG_FUNCTION_INFO_V1(market_worker_status);

#define PURGE_INTERVAL_USECS	(60 * USECS_PER_SEC)
#define PURGE_BATCH				10000
#define NO_EXTENSION_RETRY_MS	5000
#define LOCKED_RETRY_MS			50
#define EXPIRY_LOCK_TIMEOUT_MS	"100"	/* longest lock wait of a batch */

/* market_register_worker registers the static expiry worker. */
void
market_register_worker(void)
{
	market_register_static_worker("market_expiry_worker_main", "market expiry worker");
}

/* worker_detach clears the worker's identity from shared memory on exit. */
static void
worker_detach(int code, Datum arg)
{
	pg_atomic_write_u32(&market_shared->worker_pid, 0);
	pg_atomic_write_u64(&market_shared->planned_wakeup, PG_INT64_MAX);
}

/*
 * run_batch runs one transaction: expire up to one batch (with skip_busy,
 * leaving reservations whose slots are locked by others, counted in
 * *skipped), and when that was the last batch, purge if due and look up
 * the next expiry.  Returns the number expired; *next is set (0 = none
 * held) when the pass is done, and *missing when the extension is not
 * installed.
 */
static int
run_batch(bool do_purge, bool skip_busy, TimestampTz *next, bool *missing,
		  int *skipped)
{
	volatile int expired = 0;
	MemoryContext cxt = CurrentMemoryContext;

	*skipped = 0;

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "market: expiring reservations");

		*missing = !OidIsValid(get_extension_oid("market", true));
		if (!*missing)
		{
			expired = market_expire_batch(market_expiry_batch_size, skip_busy, skipped);
			if (expired + *skipped < market_expiry_batch_size)
			{
				if (do_purge)
					market_purge_finished(PURGE_BATCH);
				*next = market_next_expiry();
			}
		}

		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		/* a lock wait that timed out: roll back, try again shortly */
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
		{
			RESUME_INTERRUPTS();
			PG_RE_THROW();
		}
		FlushErrorState();
		AbortCurrentTransaction();
		RESUME_INTERRUPTS();
		ereport(DEBUG1,
				(errmsg("market expiry worker: a batch timed out waiting for a lock; retrying")));
		expired = 0;
		*skipped = 0;
		*next = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), LOCKED_RETRY_MS);
	}
	PG_END_TRY();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	return expired;
}

/* market_expiry_worker_main is the worker's entry point and loop. */
void
market_expiry_worker_main(Datum main_arg)
{
	MemoryContext loop_cxt;
	TimestampTz last_purge = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(market_database, NULL, 0);
	pgstat_report_appname("market expiry worker");
	SetConfigOption("lock_timeout", EXPIRY_LOCK_TIMEOUT_MS, PGC_SUSET, PGC_S_OVERRIDE);

	pg_atomic_write_u32(&market_shared->worker_procno, MyProc->pgprocno);
	pg_atomic_write_u32(&market_shared->worker_pid, (uint32) MyProcPid);
	before_shmem_exit(worker_detach, (Datum) 0);

	ereport(LOG,
			(errmsg("market expiry worker started in database \"%s\"", market_database)));

	loop_cxt = AllocSetContextCreate(TopMemoryContext, "market expiry worker loop",
									 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		TimestampTz now;
		TimestampTz next = 0;
		TimestampTz plan;
		uint64		requested;
		bool		missing = false;
		bool		more;
		int			expired = 0;
		int			skipped = 0;
		bool		do_purge;
		long		sleep_ms;
		MemoryContext old;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		/* while we work, every new reservation rings the latch */
		pg_atomic_write_u64(&market_shared->planned_wakeup, PG_INT64_MAX);

		old = MemoryContextSwitchTo(loop_cxt);
		now = GetCurrentTimestamp();
		do_purge = (now - last_purge >= PURGE_INTERVAL_USECS);
		/*
		 * First everything whose slots are free, batch after batch, so that
		 * reservations of hot SKUs (whose slots are nearly always locked by
		 * someone reserving) do not hold up the rest; then one batch that
		 * waits for the busy slots.
		 */
		do
		{
			int			n = run_batch(do_purge, true, &next, &missing, &skipped);

			expired += n;
			more = !missing && n > 0 && n + skipped >= market_expiry_batch_size;
			MemoryContextReset(loop_cxt);
			CHECK_FOR_INTERRUPTS();
		} while (more);
		if (!missing && skipped > 0)
		{
			expired += run_batch(false, false, &next, &missing, &skipped);
			MemoryContextReset(loop_cxt);
		}
		MemoryContextSwitchTo(old);
		if (do_purge)
			last_purge = now;

		now = GetCurrentTimestamp();
		pg_atomic_write_u64(&market_shared->last_run, (uint64) now);
		requested = pg_atomic_exchange_u64(&market_shared->requested_wakeup, PG_INT64_MAX);

		if (missing)
			plan = TimestampTzPlusMilliseconds(now, NO_EXTENSION_RETRY_MS);
		else
		{
			plan = TimestampTzPlusMilliseconds(now, market_expiry_max_naptime_ms);
			if (next != 0 && next < plan)
				plan = next;

			/*
			 * Due reservations that we could not take are being finished by
			 * someone else (commit, release, a reserving session): look
			 * again shortly rather than spin.
			 */
			if (next != 0 && next <= now && expired == 0)
				plan = TimestampTzPlusMilliseconds(now, LOCKED_RETRY_MS);
			if ((TimestampTz) requested < plan)
				plan = (TimestampTz) requested;
		}
		pg_atomic_write_u64(&market_shared->planned_wakeup, (uint64) plan);

		sleep_ms = (plan > now) ? (long) ((plan - now + 999) / 1000) : 0;
		if (sleep_ms > 0)
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 sleep_ms, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/* market.worker_status() reports on the expiry worker. */
Datum
market_worker_status(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[7];
	bool		nulls[7] = {0};
	uint32		pid = 0;
	uint64		last_run = 0;
	uint64		planned = PG_INT64_MAX;

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "market: worker_status must return a record");
	desc = BlessTupleDesc(desc);

	if (market_shared != NULL)
	{
		pid = pg_atomic_read_u32(&market_shared->worker_pid);
		last_run = pg_atomic_read_u64(&market_shared->last_run);
		planned = pg_atomic_read_u64(&market_shared->planned_wakeup);
		values[3] = Int64GetDatum((int64) pg_atomic_read_u64(&market_shared->expired_total));
		values[4] = Int64GetDatum((int64) pg_atomic_read_u64(&market_shared->purged_total));
	}
	else
	{
		nulls[3] = true;
		nulls[4] = true;
	}
	values[0] = BoolGetDatum(pid != 0);
	values[1] = Int32GetDatum((int32) pid);
	nulls[1] = (pid == 0);
	values[2] = CStringGetTextDatum(market_database ? market_database : "");
	values[5] = TimestampTzGetDatum((TimestampTz) last_run);
	nulls[5] = (last_run == 0);
	values[6] = TimestampTzGetDatum((TimestampTz) planned);
	nulls[6] = (pid == 0 || planned == (uint64) PG_INT64_MAX);

	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
