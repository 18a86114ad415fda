/*-------------------------------------------------------------------------
 *
 * outbox.c
 *	  Wake-ups and upkeep for the transactional outbox (market.outbox): the
 *	  outbox GUCs, the statement-level trigger that notes which topics a
 *	  transaction wrote, the commit callback that tells the notifier, the
 *	  "market outbox notifier" background worker (NOTIFY per topic, clean-up
 *	  of acked rows, purge of idempotency keys) and market.outbox_notifier().
 *	  Claim, ack, fail, retry and clean-up themselves are SQL functions in
 *	  sql/0.1--0.2/30_outbox.sql; docs/outbox.md has the whole design.
 *
 * Why not NOTIFY in each writing transaction: the commit of a transaction
 * that did NOTIFY takes a database-wide lock (PreCommit_Notify) held across
 * its WAL flush, which would serialise every checkout.  Instead a writing
 * transaction only bumps a per-topic counter in shared memory at commit and
 * sets the notifier's latch; the notifier sends one NOTIFY per topic per
 * wake, in its own short transaction, so many commits share one.
 *
 * Locking rules: the shared struct (OutboxShared) is created under
 * AddinShmemInitLock in the shmem startup hook and afterwards only read or
 * written with atomics; no LWLock, no heavyweight lock.  The trigger and the
 * commit callback touch only backend-local state and those atomics.  The
 * notifier's clean-up runs the SQL function market.outbox_cleanup(), which
 * locks acked rows with SKIP LOCKED.
 *
 * Without shared_preload_libraries (or with market.outbox_worker = off)
 * there is no shared state and no notifier: the trigger then queues a plain
 * NOTIFY in the writing transaction, and clean-up is left to pg_cron.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/extension.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "market.h"

PGDLLEXPORT void market_outbox_notifier_main(Datum main_arg);

PG_FUNCTION_INFO_V1(market_outbox_wake);
PG_FUNCTION_INFO_V1(market_outbox_notifier);

/*
 * The topics the CHECK on market.outbox.topic allows; the notifier sends
 * NOTIFY market_outbox_<topic>.  sql/0.1--0.2/30_outbox.sql checks topics
 * against the same list.
 */
#define OUTBOX_NTOPICS 2
static const char *const outbox_topics[OUTBOX_NTOPICS] = {"events", "psp"};

#define OUTBOX_CHANNEL_PREFIX	"market_outbox_"
#define CLEANUP_BATCH			10000
#define CLEANUP_MAX_BATCHES		100		/* per pass: at most 1M rows */
#define IDEMPOTENCY_PURGE_BATCH 10000
#define NO_DATABASE_RETRY_MS	5000

/* Shared between committing backends and the notifier; atomics only. */
typedef struct OutboxShared
{
	pg_atomic_uint32 pid;		/* notifier's pid, 0 when it does not run */
	pg_atomic_uint32 procno;	/* its PGPROC number, for its latch */
	pg_atomic_uint32 look_planned;	/* 1: it will look at the counters soon anyway */
	pg_atomic_uint64 commits[OUTBOX_NTOPICS];	/* commits that wrote topic */
	pg_atomic_uint64 notifies[OUTBOX_NTOPICS];	/* NOTIFYs sent */
	pg_atomic_uint64 last_notify[OUTBOX_NTOPICS];	/* TimestampTz, 0 = never */
	pg_atomic_uint64 last_cleanup;	/* TimestampTz, 0 = never */
	pg_atomic_uint64 cleaned_total; /* rows market.outbox_cleanup() deleted */
} OutboxShared;

static OutboxShared *outbox_shared = NULL;

/* GUCs (docs/outbox.md) */
static int	outbox_lease_s = 30;
static int	outbox_max_attempts = 10;
static int	outbox_backoff_s = 1;
static int	outbox_max_backoff_s = 600;
static int	outbox_retention_s = 3600;
static int	outbox_cleanup_interval_s = 60;
static int	outbox_notify_interval_ms = 10;
static bool outbox_worker_enabled = true;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* topics (bit i = outbox_topics[i]) this transaction wrote */
static uint32 xact_topics = 0;

/* outbox_shmem_request asks the postmaster for the shared struct. */
static void
outbox_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(OutboxShared)));
}

/* outbox_shmem_startup creates or attaches the shared struct. */
static void
outbox_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	outbox_shared = ShmemInitStruct("market outbox", sizeof(OutboxShared), &found);
	if (!found)
	{
		int			i;

		pg_atomic_init_u32(&outbox_shared->pid, 0);
		pg_atomic_init_u32(&outbox_shared->procno, 0);
		pg_atomic_init_u32(&outbox_shared->look_planned, 0);
		for (i = 0; i < OUTBOX_NTOPICS; i++)
		{
			pg_atomic_init_u64(&outbox_shared->commits[i], 0);
			pg_atomic_init_u64(&outbox_shared->notifies[i], 0);
			pg_atomic_init_u64(&outbox_shared->last_notify[i], 0);
		}
		pg_atomic_init_u64(&outbox_shared->last_cleanup, 0);
		pg_atomic_init_u64(&outbox_shared->cleaned_total, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* register_notifier registers the static notifier worker. */
static void
register_notifier(void)
{
	market_register_static_worker("market_outbox_notifier_main", "market outbox notifier");
}

/*
 * market_outbox_init defines the outbox GUCs and, when the library is being
 * preloaded and market.outbox_worker is on, the shared struct and the
 * notifier.  Called first thing from _PG_init (before the market.* prefix
 * is reserved).
 */
void
market_outbox_init(void)
{
	DefineCustomIntVariable("market.outbox_lease",
							"Default lease of a row handed out by market.outbox_claim().",
							"When it runs out without an ack the row may be claimed again.",
							&outbox_lease_s, 30, 1, 86400,
							PGC_USERSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("market.outbox_max_attempts",
							"Times an outbox row is handed out before it is dead-lettered.",
							NULL,
							&outbox_max_attempts, 10, 1, 1000,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.outbox_backoff",
							"First wait before a failed outbox row is handed out again.",
							"It doubles with every attempt, up to market.outbox_max_backoff.",
							&outbox_backoff_s, 1, 0, 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("market.outbox_max_backoff",
							"Longest wait before a failed outbox row is handed out again.",
							NULL,
							&outbox_max_backoff_s, 600, 0, 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("market.outbox_retention",
							"How long acked outbox rows are kept before clean-up deletes them.",
							"0 keeps them forever.",
							&outbox_retention_s, 3600, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("market.outbox_cleanup_interval",
							"How often the outbox notifier cleans up acked rows.",
							"It also purges idempotency keys when market.idempotency_purge(int) exists.",
							&outbox_cleanup_interval_s, 60, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("market.outbox_notify_interval",
							"Shortest time between two NOTIFYs of one topic by the outbox notifier.",
							"Commits within it share one notification.",
							&outbox_notify_interval_ms, 10, 0, 10000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomBoolVariable("market.outbox_worker",
							 "Starts the outbox notifier worker.",
							 "Only effective when market is in shared_preload_libraries.",
							 &outbox_worker_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);

	if (!process_shared_preload_libraries_in_progress || IsBinaryUpgrade)
		return;
	if (!outbox_worker_enabled)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = outbox_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = outbox_shmem_startup;

	register_notifier();
}

/* ------------------------------------------------------------------------
 * Backends: the trigger and the commit callback
 * ------------------------------------------------------------------------
 */

/*
 * outbox_xact_callback runs after our commit is visible: it bumps the
 * counter of every topic the transaction wrote and sets the notifier's
 * latch.  Nothing here can fail.  A rolled-back or prepared transaction
 * wakes nobody.
 */
static void
outbox_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
			if (xact_topics != 0 && outbox_shared != NULL)
			{
				int			i;
				uint32		pid;

				for (i = 0; i < OUTBOX_NTOPICS; i++)
					if (xact_topics & (1U << i))
						pg_atomic_fetch_add_u64(&outbox_shared->commits[i], 1);

				/*
				 * The adds above are full barriers, so a notifier that
				 * planned a look reads them after clearing look_planned.
				 * A stale procno (the notifier restarting) only sets some
				 * other process's latch: a spurious wake, harmless.  A
				 * notifier that is down sees the counters when it starts.
				 */
				pid = pg_atomic_read_u32(&outbox_shared->pid);
				if (pid != 0 && pg_atomic_read_u32(&outbox_shared->look_planned) == 0)
				{
					uint32		procno = pg_atomic_read_u32(&outbox_shared->procno);

					if (procno < ProcGlobal->allProcCount)
						SetLatch(&ProcGlobal->allProcs[procno].procLatch);
				}
			}
			xact_topics = 0;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			xact_topics = 0;
			break;
		default:
			break;
	}
}

/* topic_index returns the position of topic in outbox_topics, or -1. */
static int
topic_index(const char *topic, int len)
{
	int			i;

	for (i = 0; i < OUTBOX_NTOPICS; i++)
		if (strlen(outbox_topics[i]) == (size_t) len &&
			memcmp(outbox_topics[i], topic, len) == 0)
			return i;
	return -1;
}

/* notify_now queues NOTIFY market_outbox_<topic> in the current transaction. */
static void
notify_now(const char *topic)
{
	char		channel[NAMEDATALEN];

	if (strlen(OUTBOX_CHANNEL_PREFIX) + strlen(topic) >= NAMEDATALEN)
		return;					/* cannot be a channel name; nobody listens */
	snprintf(channel, sizeof(channel), "%s%s", OUTBOX_CHANNEL_PREFIX, topic);
	Async_Notify(channel, topic);
}

/*
 * market.outbox_wake(): AFTER INSERT ... REFERENCING NEW TABLE ... FOR EACH
 * STATEMENT on market.outbox.  Reads the topics of the inserted rows from
 * the transition table and remembers them for the commit callback; without
 * the notifier (library not preloaded, or market.outbox_worker = off) it
 * queues a NOTIFY per topic in this transaction instead.
 */
Datum
market_outbox_wake(PG_FUNCTION_ARGS)
{
	static bool registered = false;
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Tuplestorestate *rows;
	TupleDesc	desc;
	TupleTableSlot *slot;
	AttrNumber	topic_att;
	uint32		seen = 0;
	uint32		all = (1U << OUTBOX_NTOPICS) - 1;
	int			readptr;

	if (!CALLED_AS_TRIGGER(fcinfo))
		elog(ERROR, "market.outbox_wake() must be called as a trigger");
	if (!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) ||
		trigdata->tg_newtable == NULL)
		elog(ERROR, "market.outbox_wake() must be an AFTER INSERT statement trigger with a NEW TABLE");

	desc = RelationGetDescr(trigdata->tg_relation);
	topic_att = SPI_fnumber(desc, "topic");
	if (topic_att <= 0)
		elog(ERROR, "market.outbox_wake(): the table has no column \"topic\"");

	/* our own read pointer on the transition table, as a tuplestore scan does */
	rows = trigdata->tg_newtable;
	readptr = tuplestore_alloc_read_pointer(rows, EXEC_FLAG_REWIND);
	tuplestore_select_read_pointer(rows, readptr);
	tuplestore_rescan(rows);
	slot = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
	while (seen != all && tuplestore_gettupleslot(rows, true, false, slot))
	{
		bool		isnull;
		Datum		d = slot_getattr(slot, topic_att, &isnull);
		text	   *t;
		int			i;

		if (isnull)
			continue;
		t = DatumGetTextPP(d);
		i = topic_index(VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
		if (i >= 0)
		{
			if ((seen & (1U << i)) == 0 && outbox_shared == NULL)
				notify_now(outbox_topics[i]);
			seen |= 1U << i;
		}
		else
		{
			/* a topic this build does not know: wake its listeners directly */
			char	   *name = text_to_cstring(t);

			notify_now(name);
			pfree(name);
		}
	}
	ExecDropSingleTupleTableSlot(slot);

	if (seen != 0 && outbox_shared != NULL)
	{
		if (!registered)
		{
			RegisterXactCallback(outbox_xact_callback, NULL);
			registered = true;
		}
		xact_topics |= seen;
	}
	return PointerGetDatum(NULL);
}

/* ------------------------------------------------------------------------
 * The notifier worker
 * ------------------------------------------------------------------------
 */

/* notifier_detach clears the notifier's identity on exit. */
static void
notifier_detach(int code, Datum arg)
{
	pg_atomic_write_u32(&outbox_shared->pid, 0);
}

/*
 * send_notifies sends NOTIFY market_outbox_<topic> for every topic in mask,
 * in one short transaction, and records when.
 */
static void
send_notifies(uint32 mask)
{
	TimestampTz now;
	int			i;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	pgstat_report_activity(STATE_RUNNING, "market: outbox notify");
	for (i = 0; i < OUTBOX_NTOPICS; i++)
		if (mask & (1U << i))
			notify_now(outbox_topics[i]);
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);

	now = GetCurrentTimestamp();
	for (i = 0; i < OUTBOX_NTOPICS; i++)
		if (mask & (1U << i))
		{
			pg_atomic_fetch_add_u64(&outbox_shared->notifies[i], 1);
			pg_atomic_write_u64(&outbox_shared->last_notify[i], (uint64) now);
		}
}

/* the notifier's view of the counters (notifier process only) */
static uint64 seen_commits[OUTBOX_NTOPICS];
static bool notified_once = false;
static TimestampTz last_sent = 0;

/*
 * notify_if_due sends a NOTIFY for every topic whose commit counter moved
 * since the last one, unless the last was less than
 * market.outbox_notify_interval ago: then commits wait for the next one,
 * which they share.  On the first call every topic is notified, since
 * consumers may have missed wake-ups while no notifier ran.  Returns 0 when
 * nothing waits, else the time at which the waiting topics are due.
 */
static TimestampTz
notify_if_due(void)
{
	uint32		mask = 0;
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz due = TimestampTzPlusMilliseconds(last_sent, outbox_notify_interval_ms);
	int			i;

	for (i = 0; i < OUTBOX_NTOPICS; i++)
		if (!notified_once ||
			pg_atomic_read_u64(&outbox_shared->commits[i]) != seen_commits[i])
			mask |= 1U << i;
	if (mask == 0)
		return 0;
	if (notified_once && now < due)
		return due;

	/* read before sending: every commit counted here is visible to consumers */
	for (i = 0; i < OUTBOX_NTOPICS; i++)
		if (mask & (1U << i))
			seen_commits[i] = pg_atomic_read_u64(&outbox_shared->commits[i]);
	send_notifies(mask);
	last_sent = now;
	notified_once = true;
	return 0;
}

/*
 * run_sql runs one statement in a transaction of its own and returns the
 * first column of its first row as int64 (0 when there is none).  An error
 * is logged and swallowed, so that a failing clean-up never stops the
 * wake-ups; *ok says whether it worked.  *missing is set when the extension
 * is not installed in this database (nothing is run then).
 */
static int64
run_sql(const char *what, const char *sql, bool *ok, bool *missing)
{
	MemoryContext cxt = CurrentMemoryContext;
	int64		result = 0;

	*ok = false;
	*missing = false;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, what);
		if (!OidIsValid(get_extension_oid("market", true)))
			*missing = true;
		else if (SPI_execute(sql, false, 1) >= 0 && SPI_processed > 0 &&
				 SPI_tuptable != NULL && SPI_tuptable->tupdesc->natts >= 1)
		{
			bool		isnull;
			Datum		d = SPI_getbinval(SPI_tuptable->vals[0],
										  SPI_tuptable->tupdesc, 1, &isnull);

			if (!isnull)
			{
				Oid			typ = SPI_gettypeid(SPI_tuptable->tupdesc, 1);

				if (typ == INT8OID)
					result = DatumGetInt64(d);
				else if (typ == INT4OID)
					result = DatumGetInt32(d);
			}
		}
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
		*ok = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		ereport(LOG,
				(errmsg("market outbox notifier: %s failed: %s", what, edata->message)));
		FreeErrorData(edata);
	}
	PG_END_TRY();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	return result;
}

/*
 * run_cleanup deletes old acked rows in batches of CLEANUP_BATCH, one
 * transaction each, and purges idempotency keys when the function that does
 * it exists.  Returns false when the extension is not installed.
 */
static bool
run_cleanup(void)
{
	bool		ok;
	bool		missing;
	int			batches;
	char		sql[128];

	snprintf(sql, sizeof(sql), "SELECT market.outbox_cleanup(%d)", CLEANUP_BATCH);
	for (batches = 0; batches < CLEANUP_MAX_BATCHES; batches++)
	{
		int64		n = run_sql("market: outbox clean-up", sql, &ok, &missing);

		if (missing)
			return false;
		if (n > 0)
			pg_atomic_fetch_add_u64(&outbox_shared->cleaned_total, (uint64) n);
		if (!ok || n < CLEANUP_BATCH)
			break;
		CHECK_FOR_INTERRUPTS();
		(void) notify_if_due();		/* a long clean-up does not hold up wake-ups */
	}

	/* idempotency keys: another part of the extension owns the function */
	snprintf(sql, sizeof(sql), "SELECT market.idempotency_purge(%d)",
			 IDEMPOTENCY_PURGE_BATCH);
	if (run_sql("market: idempotency purge check",
				"SELECT count(*) FROM pg_catalog.pg_proc"
				" WHERE oid = pg_catalog.to_regprocedure('market.idempotency_purge(int)')"
				"   AND prokind = 'f'", &ok, &missing) > 0)
		(void) run_sql("market: idempotency purge", sql, &ok, &missing);

	pg_atomic_write_u64(&outbox_shared->last_cleanup, (uint64) GetCurrentTimestamp());
	return true;
}

/* market_outbox_notifier_main is the notifier's entry point and loop. */
void
market_outbox_notifier_main(Datum main_arg)
{
	TimestampTz next_cleanup;
	MemoryContext loop_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(market_database, NULL, 0);
	pgstat_report_appname("market outbox notifier");

	/*
	 * Nothing this worker commits must survive a crash: a lost NOTIFY or a
	 * lost clean-up batch is simply done again.  So it need not wait for
	 * its WAL to reach disk.
	 */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	pg_atomic_write_u32(&outbox_shared->procno, MyProc->pgprocno);
	pg_atomic_write_u32(&outbox_shared->pid, (uint32) MyProcPid);
	before_shmem_exit(notifier_detach, (Datum) 0);

	ereport(LOG,
			(errmsg("market outbox notifier started in database \"%s\"", market_database)));

	next_cleanup = GetCurrentTimestamp();
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "market outbox notifier loop",
									 ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		TimestampTz now;
		TimestampTz wake;
		TimestampTz due;
		long		sleep_ms;
		MemoryContext old;

		/*
		 * Reset the latch and clear look_planned before looking, so that a
		 * commit after the look wakes us.
		 */
		ResetLatch(MyLatch);
		pg_atomic_exchange_u32(&outbox_shared->look_planned, 0);
		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		old = MemoryContextSwitchTo(loop_cxt);
		due = notify_if_due();

		now = GetCurrentTimestamp();
		if (now >= next_cleanup)
		{
			int			wait_ms = outbox_cleanup_interval_s * 1000;

			if (!run_cleanup())
				wait_ms = Min(wait_ms, NO_DATABASE_RETRY_MS);
			now = GetCurrentTimestamp();
			next_cleanup = TimestampTzPlusMilliseconds(now, wait_ms);
		}
		MemoryContextSwitchTo(old);
		MemoryContextReset(loop_cxt);

		wake = next_cleanup;
		if (due != 0)
		{
			/* commits wait for their NOTIFY: look again when it is due */
			wake = Min(wake, due);
			pg_atomic_write_u32(&outbox_shared->look_planned, 1);
		}
		sleep_ms = (wake > now) ? (long) ((wake - now + 999) / 1000) : 0;
		if (sleep_ms > 0)
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 sleep_ms, PG_WAIT_EXTENSION);
	}
}

/* ------------------------------------------------------------------------
 * market.outbox_notifier(): one row per topic
 * ------------------------------------------------------------------------
 */

/* market_outbox_notifier reports the notifier's pid, NOTIFYs and clean-up. */
Datum
market_outbox_notifier(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int			i;

	InitMaterializedSRF(fcinfo, 0);
	for (i = 0; i < OUTBOX_NTOPICS; i++)
	{
		Datum		values[6];
		bool		nulls[6] = {0};

		values[0] = CStringGetTextDatum(outbox_topics[i]);
		nulls[1] = nulls[2] = nulls[3] = nulls[4] = nulls[5] = true;
		if (outbox_shared != NULL)
		{
			uint32		pid = pg_atomic_read_u32(&outbox_shared->pid);
			uint64		last = pg_atomic_read_u64(&outbox_shared->last_notify[i]);
			uint64		cleanup = pg_atomic_read_u64(&outbox_shared->last_cleanup);

			values[1] = Int32GetDatum((int32) pid);
			nulls[1] = (pid == 0);
			values[2] = Int64GetDatum((int64) pg_atomic_read_u64(&outbox_shared->notifies[i]));
			nulls[2] = false;
			values[3] = TimestampTzGetDatum((TimestampTz) last);
			nulls[3] = (last == 0);
			values[4] = TimestampTzGetDatum((TimestampTz) cleanup);
			nulls[4] = (cleanup == 0);
			values[5] = Int64GetDatum((int64) pg_atomic_read_u64(&outbox_shared->cleaned_total));
			nulls[5] = false;
		}
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}
