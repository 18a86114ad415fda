/*-------------------------------------------------------------------------
 *
 * market.c
 *	  Module entry: GUC definitions, the shared-memory state the backends
 *	  share with the expiry worker, and the worker's registration.
 *
 * Shared memory is one MarketShared struct, created in the shmem startup
 * hook under AddinShmemInitLock and afterwards touched only through
 * atomics (see market.h).  Without shared_preload_libraries there is no
 * shared state and no worker: every function still works, and expiry is
 * then driven by market.expire_reservations() (for instance from pg_cron).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "market.h"

PG_MODULE_MAGIC;

int			market_reservation_ttl_s = 900;
int			market_max_line_qty = 1000000;
int			market_max_reservation_lines = 500;
int			market_stock_slots = 32;
int			market_expiry_batch_size = 1000;
int			market_expiry_max_naptime_ms = 10000;
int			market_reservation_retention_s = 7 * 86400;
bool		market_expiry_worker_enabled = true;
char	   *market_database = NULL;

MarketShared *market_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* earliest expiry this transaction created; the worker hears of it at commit */
static TimestampTz pending_expiry = 0;

void		_PG_init(void);

/* market_shmem_request asks the postmaster for our shared struct. */
static void
market_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(MarketShared)));
	RequestAddinShmemSpace(market_batch_shmem_size());
}

/* market_shmem_startup creates or attaches the shared struct. */
static void
market_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	market_shared = ShmemInitStruct("market", sizeof(MarketShared), &found);
	if (!found)
	{
		pg_atomic_init_u32(&market_shared->worker_pid, 0);
		pg_atomic_init_u32(&market_shared->worker_procno, 0);
		pg_atomic_init_u64(&market_shared->planned_wakeup, PG_INT64_MAX);
		pg_atomic_init_u64(&market_shared->requested_wakeup, PG_INT64_MAX);
		pg_atomic_init_u64(&market_shared->expired_total, 0);
		pg_atomic_init_u64(&market_shared->purged_total, 0);
		pg_atomic_init_u64(&market_shared->last_run, 0);
	}
	market_batch_shmem_init();
	LWLockRelease(AddinShmemInitLock);
}

/* define_gucs declares every market.* setting (documented in docs/gucs.md). */
static void
define_gucs(void)
{
	DefineCustomIntVariable("market.reservation_ttl",
							"Default time to live of a reservation.",
							"Used by market.reserve() when no ttl is given.",
							&market_reservation_ttl_s, 900, 1, 86400,
							PGC_USERSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("market.max_line_qty",
							"Largest quantity one reservation line may ask for.",
							NULL,
							&market_max_line_qty, 1000000, 1, INT_MAX,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.max_reservation_lines",
							"Largest number of lines in one reservation.",
							NULL,
							&market_max_reservation_lines, 500, 1, 100000,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.stock_slots",
							"Number of slots new stock is spread over.",
							"More slots let more sessions reserve one SKU at once.",
							&market_stock_slots, 32, 1, MARKET_MAX_SLOTS,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.expiry_batch_size",
							"Reservations the expiry worker returns per transaction.",
							NULL,
							&market_expiry_batch_size, 1000, 1, 100000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.expiry_max_naptime",
							"Longest the expiry worker sleeps between passes.",
							"It normally sleeps until the next expiry; this is a safety net.",
							&market_expiry_max_naptime_ms, 10000, 10, 3600 * 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("market.reservation_retention",
							"How long finished reservations are kept before the worker purges them.",
							"0 keeps them forever.",
							&market_reservation_retention_s, 7 * 86400, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomBoolVariable("market.expiry_worker",
							 "Starts the reservation expiry worker.",
							 "Only effective when market is in shared_preload_libraries.",
							 &market_expiry_worker_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("market.database",
							   "Database the expiry worker serves.",
							   NULL,
							   &market_database, "postgres",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	market_define_batch_gucs();
	MarkGUCPrefixReserved("market");
}

/* _PG_init defines the GUCs and, when preloaded, shared memory and the worker. */
void
_PG_init(void)
{
	market_outbox_init();		/* outbox GUCs, notifier (src/outbox.c) */
	market_checkout_define_gucs();	/* before define_gucs reserves the prefix */
	market_psp_init();			/* PSP GUCs, PSP worker (src/psp_worker.c) */
	market_psp_webhook_define_gucs();	/* webhook tolerance (src/psp_webhook.c) */
	define_gucs();

	if (!process_shared_preload_libraries_in_progress || IsBinaryUpgrade)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = market_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = market_shmem_startup;

	if (market_expiry_worker_enabled)
		market_register_worker();
	if (market_batch_worker_enabled)
		market_register_batch_worker();
}

/*
 * wake_worker_if_needed lowers requested_wakeup to expires_at and sets the
 * worker's latch, unless the worker already plans to look by then.  It
 * costs one atomic read in the common case.
 */
static void
wake_worker_if_needed(TimestampTz expires_at)
{
	uint64		cur;
	uint32		pid;

	if ((uint64) expires_at >= pg_atomic_read_u64(&market_shared->planned_wakeup))
		return;

	cur = pg_atomic_read_u64(&market_shared->requested_wakeup);
	while ((uint64) expires_at < cur &&
		   !pg_atomic_compare_exchange_u64(&market_shared->requested_wakeup,
										   &cur, (uint64) expires_at))
		;

	pid = pg_atomic_read_u32(&market_shared->worker_pid);
	if (pid != 0)
	{
		uint32		procno = pg_atomic_read_u32(&market_shared->worker_procno);

		if (procno < ProcGlobal->allProcCount)
			SetLatch(&ProcGlobal->allProcs[procno].procLatch);
	}
}

/*
 * market_xact_callback tells the worker, once our commit is visible, about
 * the earliest expiry the transaction created.  Doing it at commit (the
 * callback runs after the commit is visible to other sessions) closes the
 * window in which the worker could plan its sleep from a snapshot that
 * does not yet show our reservation.
 */
static void
market_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
			if (pending_expiry != 0 && market_shared != NULL)
				wake_worker_if_needed(pending_expiry);
			pending_expiry = 0;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			pending_expiry = 0;
			break;
		default:
			break;
	}
}

/*
 * market_note_expiry records that this transaction created or moved a
 * reservation expiring at expires_at; the worker is told at commit.
 */
void
market_note_expiry(TimestampTz expires_at)
{
	static bool registered = false;

	if (market_shared == NULL)
		return;
	if (!registered)
	{
		RegisterXactCallback(market_xact_callback, NULL);
		registered = true;
	}
	if (pending_expiry == 0 || expires_at < pending_expiry)
		pending_expiry = expires_at;
}

/*
 * market_register_static_worker registers one of the extension's static
 * background workers: connected to market.database once recovery is over,
 * restarted one second after it exits, named the same in pg_stat_activity.
 */
void
market_register_static_worker(const char *function_name, const char *name)
{
	market_register_static_worker_arg(function_name, name, (Datum) 0);
}

/*
 * market_register_static_worker_arg is market_register_static_worker for
 * workers of which several run: main_arg tells each which one it is.
 */
void
market_register_static_worker_arg(const char *function_name, const char *name, Datum main_arg)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 1;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "market");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "%s", function_name);
	snprintf(worker.bgw_name, BGW_MAXLEN, "%s", name);
	snprintf(worker.bgw_type, BGW_MAXLEN, "%s", name);
	worker.bgw_main_arg = main_arg;
	RegisterBackgroundWorker(&worker);
}

/* market_require_arg raises MK020 when a required argument is NULL. */
void
market_require_arg(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("%s must not be null", name)));
}
