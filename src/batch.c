/*-------------------------------------------------------------------------
 *
 * batch.c
 *	  The batched paths for flash sales: a shared-memory request queue, the
 *	  "market batch worker" processes that drain it, and the backend side of
 *	  market.reserve() and market.buy_now() that hands a request over and
 *	  waits for the answer.
 *
 * Why: with synchronous_commit = on every reservation made by its own
 * session costs a transaction with an XID, a WAL flush and a commit, and
 * hundreds of sessions doing that on one SKU spend the machine on commits
 * and lock traffic.  With market.batch_reserve = on, market.reserve() called
 * outside a transaction block puts its (already validated) lines in a slot
 * of shared memory and sleeps on its latch.  The batch worker takes every
 * queued request, applies them one after the other in ONE transaction
 * (the reservation core of src/reservation.c, so the slot engine's rules
 * and audit hold unchanged), commits once, and only then hands each
 * backend its reservation id or its error.  The caller's own transaction
 * writes nothing and commits without a WAL flush.
 *
 * Semantics: the reservation is committed by the worker, so it is durable
 * when market.reserve() returns, exactly as with the direct path; what
 * differs is that it does not roll back with the caller's transaction.
 * That is why only calls outside a transaction block are batched (a
 * single-statement call has nothing else to roll back with); inside
 * BEGIN ... COMMIT the direct path runs.  An answer that cannot be given
 * (the worker stopped while holding the request) raises MK006; the
 * reservation then either never happened or expires by its TTL.
 *
 * Workers: market.batch_workers of them, all serving market.database and
 * popping the same ring, so that one applies or commits a batch while
 * another takes what arrived meanwhile.  A backend wakes one idle worker; a
 * busy one looks at the ring again before it sleeps.
 *
 * Lock waits.  A batch holds the slot locks of all its requests until it
 * commits, so two batches that take scarce SKUs in different orders (carts
 * of several lines) could wait for each other for good.  So a batch never
 * waits long: its transaction runs with lock_timeout =
 * BATCH_LOCK_TIMEOUT_MS, and a checkout or reservation whose lock wait
 * times out is undone (its subtransaction, or the whole chunk for a
 * reservation) and applied again on its own once the batch has committed:
 * alone in its transaction, holding nothing else, with no lock_timeout,
 * like a direct call.  A cycle of waits therefore always contains a batch
 * waiter, which gives up within the timeout; the retried request waits in
 * lock order, as the direct path does.  This also keeps a session that
 * holds a SKU's slots from stalling the other checkouts of the batch.
 *
 * Requests: market.reserve() (market.batch_reserve) and, from 0.4,
 * market.buy_now() (market.batch_checkout).  A checkout runs in a
 * subtransaction of the batch, as the calling role, so that its error
 * undoes only itself; at most BATCH_MAX_CHECKOUTS checkouts share one
 * transaction, so that their subtransactions and the chunk's key claim fit
 * the PGPROC cache of subtransaction ids.
 *
 * Shared memory (one struct created in the shmem startup hook, see
 * market.c) holds:
 *	  - one BatchRequest per backend, indexed by PGPROC number.  Its state
 *		word moves FREE -> QUEUED (backend) -> TAKEN (worker) -> DONE
 *		(worker, after commit) -> FREE (backend), or QUEUED -> ABANDONED
 *		(backend cancelled before the worker took it) -> FREE (worker).
 *		Each transition is one atomic compare-and-swap or write by the
 *		single party allowed to make it; the payload is written before
 *		the state that publishes it, behind a memory barrier.  taken_by
 *		names the worker that took it, so that a restarted worker answers
 *		only its predecessor's requests (MK006).
 *	  - a ring of queued PGPROC numbers, protected by a spinlock held only
 *		to push or pop (no other lock is ever taken while holding it).
 *	  - one BatchWorkerSlot per worker (pid, latch owner, database served,
 *		idle flag), as atomics; counters, as atomics.
 * The worker takes locks in the database exactly as a reserving session
 * does (market.h); it never holds a row lock across a wait for a backend.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "common/sha2.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "market.h"

PGDLLEXPORT void market_batch_worker_main(Datum main_arg);

PG_FUNCTION_INFO_V1(market_batch_status);

#define BATCH_MAX_LINES			8
#define BATCH_RESPONSE_LEN		4096	/* a buy_now response (jsonb) up to this size */
#define BATCH_MAX_SUBXACTS		PGPROC_MAX_CACHED_SUBXIDS
/* checkouts per batch: each is a subtransaction, and so is the chunk's key claim */
#define BATCH_MAX_CHECKOUTS		(BATCH_MAX_SUBXACTS - 1)
#define BATCH_LOCK_TIMEOUT_MS	"50"	/* longest lock wait inside a batch */
#define CUSTOMER_BYTES			(MARKET_MAX_CUSTOMER_CHARS * MAX_MULTIBYTE_CHAR_LEN)
#define KEY_BYTES				(MARKET_MAX_KEY_CHARS * MAX_MULTIBYTE_CHAR_LEN)
#define PAYMENT_BYTES			(MARKET_MAX_PAYMENT_CHARS * MAX_MULTIBYTE_CHAR_LEN)
#define BATCH_MSG_LEN			256
#define BATCH_DETAIL_LEN		512
#define MAX_BATCH_WORKERS		8
#define NO_EXTENSION_RETRY_MS	1000
#define IDLE_WAIT_MS			1000

typedef enum BatchRequestState
{
	BR_FREE = 0,
	BR_QUEUED,
	BR_TAKEN,
	BR_DONE,
	BR_ABANDONED
} BatchRequestState;

typedef enum BatchRequestKind
{
	BK_RESERVE = 0,				/* market.reserve() */
	BK_BUY_NOW					/* market.buy_now() */
} BatchRequestKind;

/* one backend's request and, once DONE, its answer */
typedef struct BatchRequest
{
	pg_atomic_uint32 state;
	int32		taken_by;		/* the worker that took it (index) */
	int32		kind;			/* BatchRequestKind */
	int32		nlines;
	ReserveLine lines[BATCH_MAX_LINES];
	/* reserve */
	int64		ttl_usecs;
	int32		owner_len;		/* -1: no owner */
	char		owner[MARKET_MAX_OWNER_LEN + 1];
	/* buy_now: what MarketBuyNow holds, and who asked */
	Oid			session_user;
	int32		customer_len;
	int32		key_len;
	int32		method_len;		/* -1: not given */
	int32		psp_len;		/* -1: not given */
	char		currency[4];
	uint8		fingerprint[PG_SHA256_DIGEST_LENGTH];
	char		customer[CUSTOMER_BYTES];
	char		key[KEY_BYTES];
	char		method[PAYMENT_BYTES];
	char		psp[PAYMENT_BYTES];
	/* answer */
	pg_uuid_t	id;
	int32		response_len;	/* buy_now: -1 if it did not fit */
	char		response[BATCH_RESPONSE_LEN];	/* buy_now: the jsonb varlena */
	int			sqlerrcode;		/* 0: reserved */
	char		message[BATCH_MSG_LEN];
	char		detail[BATCH_DETAIL_LEN];
	char		hint[BATCH_MSG_LEN];
} BatchRequest;

/* one batch worker, as backends see it */
typedef struct BatchWorkerSlot
{
	pg_atomic_uint32 pid;		/* 0: not running */
	pg_atomic_uint32 procno;
	pg_atomic_uint32 ready_db;	/* database served; 0 when not ready */
	pg_atomic_uint32 idle;		/* 1 while it sleeps on its latch */
} BatchWorkerSlot;

typedef struct BatchShared
{
	slock_t		mutex;			/* protects head and count */
	int			head;
	int			count;
	int			capacity;		/* MaxBackends: requests[] and ring[] */
	BatchWorkerSlot workers[MAX_BATCH_WORKERS];
	pg_atomic_uint64 batches;
	pg_atomic_uint64 requests;
	pg_atomic_uint64 fallbacks; /* batches replayed request by request */
	pg_atomic_uint64 retried_alone; /* requests re-applied alone after a lock timeout */
	pg_atomic_uint64 largest;
	/* followed by int ring[capacity] and BatchRequest requests[capacity] */
} BatchShared;

bool		market_batch_reserve = false;
bool		market_batch_checkout = false;
bool		market_batch_worker_enabled = true;
int			market_batch_max = 256;
int			market_batch_workers = 2;

/* this process's worker slot, in a batch worker */
static int	my_worker = -1;

static BatchShared *batch = NULL;
static int *batch_ring = NULL;
static BatchRequest *batch_requests = NULL;

/* layout helpers: the ring and the requests follow the header */
static Size
ring_offset(void)
{
	return MAXALIGN(sizeof(BatchShared));
}

static Size
requests_offset(int capacity)
{
	return MAXALIGN(ring_offset() + sizeof(int) * capacity);
}

/* market_batch_shmem_size is what the queue needs for MaxBackends backends. */
Size
market_batch_shmem_size(void)
{
	return add_size(requests_offset(MaxBackends),
					mul_size(sizeof(BatchRequest), MaxBackends));
}

/* market_batch_shmem_init creates or attaches the queue (AddinShmemInitLock held). */
void
market_batch_shmem_init(void)
{
	bool		found;
	char	   *base;

	base = ShmemInitStruct("market batch queue", market_batch_shmem_size(), &found);
	batch = (BatchShared *) base;
	batch_ring = (int *) (base + ring_offset());
	batch_requests = (BatchRequest *) (base + requests_offset(MaxBackends));
	if (found)
		return;

	SpinLockInit(&batch->mutex);
	batch->head = 0;
	batch->count = 0;
	batch->capacity = MaxBackends;
	for (int i = 0; i < MAX_BATCH_WORKERS; i++)
	{
		pg_atomic_init_u32(&batch->workers[i].pid, 0);
		pg_atomic_init_u32(&batch->workers[i].procno, 0);
		pg_atomic_init_u32(&batch->workers[i].ready_db, InvalidOid);
		pg_atomic_init_u32(&batch->workers[i].idle, 0);
	}
	pg_atomic_init_u64(&batch->batches, 0);
	pg_atomic_init_u64(&batch->requests, 0);
	pg_atomic_init_u64(&batch->fallbacks, 0);
	pg_atomic_init_u64(&batch->retried_alone, 0);
	pg_atomic_init_u64(&batch->largest, 0);
	for (int i = 0; i < MaxBackends; i++)
		pg_atomic_init_u32(&batch_requests[i].state, BR_FREE);
}

/* market_define_batch_gucs declares the batch path's settings. */
void
market_define_batch_gucs(void)
{
	DefineCustomBoolVariable("market.batch_reserve",
							 "Hands market.reserve() calls made outside a transaction block to the batch worker.",
							 "The worker applies many reservations in one transaction; see docs/architecture.md.",
							 &market_batch_reserve, false,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("market.batch_checkout",
							 "Hands market.buy_now() calls made outside a transaction block to the batch worker.",
							 "The worker applies many checkouts in one transaction; see docs/checkout.md.",
							 &market_batch_checkout, false,
							 PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("market.batch_worker",
							 "Starts the batch reservation worker.",
							 "Only effective when market is in shared_preload_libraries.",
							 &market_batch_worker_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.batch_workers",
							"Number of batch workers.",
							"Each takes what is queued when it is free, so one commits while another works.",
							&market_batch_workers, 2, 1, MAX_BATCH_WORKERS,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.batch_max",
							"Most reservations the batch worker applies in one transaction.",
							NULL,
							&market_batch_max, 256, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
}

/* market_register_batch_worker registers the static batch workers. */
void
market_register_batch_worker(void)
{
	for (int i = 0; i < market_batch_workers; i++)
		market_register_static_worker_arg("market_batch_worker_main", "market batch worker",
										  Int32GetDatum(i));
}

/* ---------------------------------------------------------------------------
 * Backend side
 * ---------------------------------------------------------------------------
 */

/*
 * wake_batch_worker sets the latch of one idle worker, if any; a busy
 * worker takes the queue again before it sleeps.  The caller pushed its
 * request first; the barrier pairs with the one a worker passes between
 * saying it is idle and looking at the queue a last time.
 */
static void
wake_batch_worker(void)
{
	pg_memory_barrier();
	for (int i = 0; i < MAX_BATCH_WORKERS; i++)
	{
		BatchWorkerSlot *w = &batch->workers[i];

		if (pg_atomic_read_u32(&w->pid) != 0 && pg_atomic_read_u32(&w->idle) != 0)
		{
			SetLatch(&ProcGlobal->allProcs[pg_atomic_read_u32(&w->procno)].procLatch);
			return;
		}
	}
}

/* batch_serves tells whether a batch worker is ready for database db. */
static bool
batch_serves(Oid db)
{
	for (int i = 0; i < MAX_BATCH_WORKERS; i++)
		if (pg_atomic_read_u32(&batch->workers[i].ready_db) == db)
			return true;
	return false;
}

/*
 * abandon_request is run when the waiting backend errors out (cancel,
 * statement timeout, termination).  A request the worker has not taken is
 * withdrawn; one it is applying is waited for, so that the answer slot is
 * not reused while the worker still writes it.
 */
static void
abandon_request(BatchRequest *req)
{
	uint32		expected = BR_QUEUED;

	if (pg_atomic_compare_exchange_u32(&req->state, &expected, BR_ABANDONED))
		return;
	while (pg_atomic_read_u32(&req->state) == BR_TAKEN &&
		   pg_atomic_read_u32(&batch->workers[req->taken_by].pid) != 0)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 10, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
	if (pg_atomic_read_u32(&req->state) == BR_DONE)
		pg_atomic_write_u32(&req->state, BR_FREE);
}

/*
 * own_free_request returns this backend's request slot if it can take a
 * new request, else NULL (the batch path then does not apply).
 */
static BatchRequest *
own_free_request(void)
{
	BatchRequest *req;
	int			procno;
	uint32		state;

	if (batch == NULL || IsTransactionBlock() || !batch_serves(MyDatabaseId))
		return NULL;
	procno = MyProc->pgprocno;
	if (procno < 0 || procno >= batch->capacity)
		return NULL;
	req = &batch_requests[procno];

	state = pg_atomic_read_u32(&req->state);
	if (state == BR_DONE)		/* the answer to an abandoned request */
	{
		pg_atomic_write_u32(&req->state, BR_FREE);
		state = BR_FREE;
	}
	if (state != BR_FREE)		/* an abandoned request still queued */
		return NULL;
	return req;
}

/*
 * queue_and_wait publishes a filled request, wakes the worker and sleeps
 * until the answer is there.  Raises the worker's error (the slot is then
 * free again); on success the caller reads the answer and frees the slot.
 */
static void
queue_and_wait(BatchRequest *req)
{
	uint32		state;

	req->sqlerrcode = 0;
	pg_write_barrier();
	pg_atomic_write_u32(&req->state, BR_QUEUED);

	SpinLockAcquire(&batch->mutex);
	batch_ring[(batch->head + batch->count) % batch->capacity] = MyProc->pgprocno;
	batch->count++;
	SpinLockRelease(&batch->mutex);
	wake_batch_worker();

	PG_TRY();
	{
		for (;;)
		{
			state = pg_atomic_read_u32(&req->state);
			if (state == BR_DONE)
				break;
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 IDLE_WAIT_MS, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			CHECK_FOR_INTERRUPTS();
		}
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		abandon_request(req);
		RESUME_INTERRUPTS();
		PG_RE_THROW();
	}
	PG_END_TRY();

	pg_read_barrier();
	if (req->sqlerrcode != 0)
	{
		int			code = req->sqlerrcode;
		char	   *message = pstrdup(req->message);
		char	   *detail = req->detail[0] ? pstrdup(req->detail) : NULL;
		char	   *hint = req->hint[0] ? pstrdup(req->hint) : NULL;

		pg_atomic_write_u32(&req->state, BR_FREE);
		ereport(ERROR,
				(errcode(code),
				 errmsg_internal("%s", message),
				 detail ? errdetail_internal("%s", detail) : 0,
				 hint ? errhint("%s", hint) : 0));
	}
}

/*
 * market_batch_try_reserve hands a validated reservation to the batch
 * worker and waits for it.  Returns false, having done nothing, when the
 * batch path does not apply (setting off, inside a transaction block, no
 * worker for this database, too many lines); then the caller reserves
 * directly.  Raises the worker's error if the reservation failed.
 */
bool
market_batch_try_reserve(const ReserveLine *lines, int nlines, int64 ttl_usecs,
						 text *owner, pg_uuid_t *id_out)
{
	BatchRequest *req;

	if (!market_batch_reserve || nlines > BATCH_MAX_LINES ||
		(req = own_free_request()) == NULL)
		return false;

	req->kind = BK_RESERVE;
	req->nlines = nlines;
	memcpy(req->lines, lines, sizeof(ReserveLine) * nlines);
	req->ttl_usecs = ttl_usecs;
	req->owner_len = -1;
	if (owner)
	{
		req->owner_len = VARSIZE_ANY_EXHDR(owner);
		memcpy(req->owner, VARDATA_ANY(owner), req->owner_len);
	}
	queue_and_wait(req);
	*id_out = req->id;
	pg_atomic_write_u32(&req->state, BR_FREE);
	return true;
}

/* copy_optional copies an optional string into a request field (-1: NULL). */
static int32
copy_optional(char *dst, const char *src)
{
	if (src == NULL)
		return -1;
	memcpy(dst, src, strlen(src));
	return (int32) strlen(src);
}

/*
 * stored_response reads the response of a finished buy_now back from its
 * idempotency key (when it was too large for the answer slot).  In READ
 * COMMITTED the query sees the worker's commit.
 */
static Datum
stored_response(MarketBuyNow *mb)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];
	bool		isnull = true;
	Datum		doc = (Datum) 0;

	SPI_connect();
	market_prepare(&plan,
				   "SELECT response FROM market.idempotency_keys WHERE customer_id = $1 AND key = $2",
				   2, types);
	values[0] = PointerGetDatum(mb->customer);
	values[1] = PointerGetDatum(mb->key);
	if (SPI_execute_plan(plan, values, NULL, false, 1) == SPI_OK_SELECT && SPI_processed == 1)
		doc = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		elog(ERROR, "market: the batched checkout's response is missing");
	doc = SPI_datumTransfer(doc, false, -1);
	SPI_finish();
	return doc;
}

/*
 * market_batch_try_buy_now hands a validated buy_now to the batch worker
 * and waits for its response.  Returns false, having done nothing, when
 * the batch path does not apply (market.batch_checkout off, inside a
 * transaction block, not READ COMMITTED, no worker for this database, too
 * many lines); then the caller runs it directly.  Raises the error the
 * direct path would have raised.
 */
bool
market_batch_try_buy_now(MarketBuyNow *mb, Datum *response)
{
	BatchRequest *req;

	if (!market_batch_checkout || mb->nlines > BATCH_MAX_LINES ||
		XactIsoLevel != XACT_READ_COMMITTED ||
		(req = own_free_request()) == NULL)
		return false;

	req->kind = BK_BUY_NOW;
	req->nlines = mb->nlines;
	memcpy(req->lines, mb->lines, sizeof(ReserveLine) * mb->nlines);
	req->session_user = GetSessionUserId();
	req->customer_len = VARSIZE_ANY_EXHDR(mb->customer);
	memcpy(req->customer, VARDATA_ANY(mb->customer), req->customer_len);
	req->key_len = VARSIZE_ANY_EXHDR(mb->key);
	memcpy(req->key, VARDATA_ANY(mb->key), req->key_len);
	memcpy(req->currency, VARDATA_ANY(mb->currency), 3);
	req->currency[3] = '\0';
	req->method_len = copy_optional(req->method, mb->method);
	req->psp_len = copy_optional(req->psp, mb->psp);
	memcpy(req->fingerprint, VARDATA_ANY(mb->fingerprint), PG_SHA256_DIGEST_LENGTH);

	queue_and_wait(req);
	if (req->response_len >= 0)
	{
		char	   *copy = palloc(req->response_len);

		memcpy(copy, req->response, req->response_len);
		*response = PointerGetDatum(copy);
		pg_atomic_write_u32(&req->state, BR_FREE);
	}
	else
	{
		pg_atomic_write_u32(&req->state, BR_FREE);
		*response = stored_response(mb);
	}
	return true;
}

/* ---------------------------------------------------------------------------
 * Worker side
 * ---------------------------------------------------------------------------
 */

/* what the worker decided for one request, published after the commit */
typedef struct BatchAnswer
{
	int			procno;
	bool		retry_alone;	/* a lock wait timed out: apply it on its own */
	pg_uuid_t	id;
	Jsonb	   *response;		/* buy_now: the response document */
	int			sqlerrcode;
	char	   *message;
	char	   *detail;
	char	   *hint;
} BatchAnswer;

/* publish_answer copies an answer into the backend's slot and wakes it. */
static void
publish_answer(BatchAnswer *ans)
{
	BatchRequest *req = &batch_requests[ans->procno];

	req->id = ans->id;
	req->sqlerrcode = ans->sqlerrcode;
	req->response_len = -1;
	if (ans->response != NULL && VARSIZE(ans->response) <= BATCH_RESPONSE_LEN)
	{
		req->response_len = VARSIZE(ans->response);
		memcpy(req->response, ans->response, req->response_len);
	}
	strlcpy(req->message, ans->message ? ans->message : "", BATCH_MSG_LEN);
	strlcpy(req->detail, ans->detail ? ans->detail : "", BATCH_DETAIL_LEN);
	strlcpy(req->hint, ans->hint ? ans->hint : "", BATCH_MSG_LEN);
	pg_write_barrier();
	pg_atomic_write_u32(&req->state, BR_DONE);
	SetLatch(&ProcGlobal->allProcs[ans->procno].procLatch);
}

/* answer_error fills an answer from a caught error. */
static void
answer_error(BatchAnswer *ans, ErrorData *edata)
{
	ans->sqlerrcode = edata->sqlerrcode;
	ans->message = edata->message;
	ans->detail = edata->detail;
	ans->hint = edata->hint;
}

/* request_owner rebuilds the owner text of a request (NULL: none). */
static text *
request_owner(BatchRequest *req)
{
	if (req->owner_len < 0)
		return NULL;
	return cstring_to_text_with_len(req->owner, req->owner_len);
}

/* what the batch believes a (sku, warehouse or 0) can still serve */
typedef struct PairEstimate
{
	int64		sku_id;
	int32		warehouse_id;
	int64		available;
} PairEstimate;

/*
 * estimate_for returns the batch's estimate for a line's pair, counting it
 * (market_available_units: free units plus what expired reservations hold)
 * the first time the batch meets the pair, or again when refresh is set.
 */
static PairEstimate *
estimate_for(HTAB *estimates, ReserveLine *line, bool refresh)
{
	PairEstimate key;
	PairEstimate *e;
	bool		found;

	memset(&key, 0, sizeof(key));
	key.sku_id = line->sku_id;
	key.warehouse_id = line->warehouse_id;
	e = hash_search(estimates, &key, HASH_ENTER, &found);
	if (!found || refresh)
		e->available = market_available_units(line->sku_id, line->warehouse_id);
	return e;
}

/*
 * short_line returns the index of the first line that cannot be served,
 * or -1.  It lets the batch answer "sold out" without raising, which would
 * abort the whole batch.  The estimates are counted once per pair and
 * batch, lowered by what the batch reserves, and counted again before a
 * line is refused.  An estimate that is too high (another session took
 * units meanwhile) only means the slot engine raises MK001 itself and the
 * batch is replayed request by request.
 */
static int
short_line(HTAB *estimates, BatchRequest *req, int64 *available)
{
	for (int i = 0; i < req->nlines; i++)
	{
		PairEstimate *e = estimate_for(estimates, &req->lines[i], false);

		if (e->available < req->lines[i].qty)
			e = estimate_for(estimates, &req->lines[i], true);
		if (e->available < req->lines[i].qty)
		{
			*available = e->available;
			return i;
		}
	}
	return -1;
}

/* note_reserved lowers the estimates by what a request reserved. */
static void
note_reserved(HTAB *estimates, BatchRequest *req)
{
	for (int i = 0; i < req->nlines; i++)
		estimate_for(estimates, &req->lines[i], false)->available -= req->lines[i].qty;
}

/* answer_short fills the MK001 answer the direct path would have raised. */
static void
answer_short(BatchAnswer *ans, ReserveLine *line, int64 available, MemoryContext cxt)
{
	ans->sqlerrcode = MK_INSUFFICIENT_STOCK;
	ans->message = "insufficient stock";
	ans->detail = MemoryContextStrdup(cxt,
									  psprintf("SKU %lld: %lld requested, %lld available%s.",
											   (long long) line->sku_id, (long long) line->qty,
											   (long long) available,
											   line->warehouse_id != 0 ?
											   " in the requested warehouse" : ""));
	ans->hint = NULL;
}

/* request_to_buy_now rebuilds a MarketBuyNow from a queued request. */
static void
request_to_buy_now(BatchRequest *req, MarketBuyNow *mb)
{
	mb->customer = cstring_to_text_with_len(req->customer, req->customer_len);
	mb->key = cstring_to_text_with_len(req->key, req->key_len);
	mb->currency = cstring_to_text(req->currency);
	mb->method = req->method_len >= 0 ? pnstrdup(req->method, req->method_len) : NULL;
	mb->psp = req->psp_len >= 0 ? pnstrdup(req->psp, req->psp_len) : NULL;
	mb->nlines = req->nlines;
	mb->lines = palloc(sizeof(ReserveLine) * req->nlines);
	memcpy(mb->lines, req->lines, sizeof(ReserveLine) * req->nlines);
	mb->key_claimed = false;
	mb->prices = NULL;
	mb->fingerprint = palloc(VARHDRSZ + PG_SHA256_DIGEST_LENGTH);
	SET_VARSIZE(mb->fingerprint, VARHDRSZ + PG_SHA256_DIGEST_LENGTH);
	memcpy(VARDATA(mb->fingerprint), req->fingerprint, PG_SHA256_DIGEST_LENGTH);
}

/*
 * act_as makes session_user the session user (what the order events record
 * as their actor) and current_user, with sec_context, the current user.
 * apply_buy_now passes the worker's own role with
 * SECURITY_LOCAL_USERID_CHANGE to run a request as a SECURITY DEFINER
 * function would, and the saved identity to undo it.
 */
static void
act_as(Oid session_user, Oid current_user, int sec_context)
{
	if (session_user != GetSessionUserId())
		SetSessionAuthorization(session_user, superuser_arg(session_user));
	SetUserIdAndSecContext(current_user, sec_context);
}

/* same_customer_key says whether two queued requests have the same customer and key. */
static bool
same_customer_key(const BatchRequest *a, const BatchRequest *b)
{
	return a->customer_len == b->customer_len && a->key_len == b->key_len &&
		memcmp(a->customer, b->customer, a->customer_len) == 0 &&
		memcmp(a->key, b->key, a->key_len) == 0;
}

/*
 * prepare_chunk does for the chunk's checkouts what is cheaper done once for
 * all of them: it rebuilds each buy_now request (mbs[i]; NULL for a
 * reservation), reads the prices of all their SKUs into one price book,
 * and claims all their idempotency keys with one statement (the first
 * request of each customer and key only).  The claim runs in a
 * subtransaction: if it fails, for instance because another session's
 * unfinished request holds one of the keys past the lock_timeout, nothing
 * is claimed and every checkout claims its own key when it is applied.
 * Caller is inside SPI, in the batch's transaction.
 */
static void
prepare_chunk(BatchAnswer *answers, int n, MarketBuyNow **mbs, MemoryContext cxt)
{
	MemoryContext outer = CurrentMemoryContext;
	ResourceOwner outer_owner = CurrentResourceOwner;
	MarketBuyNow **buys = palloc(sizeof(MarketBuyNow *) * Max(n, 1));
	MarketBuyNow **claims = palloc(sizeof(MarketBuyNow *) * Max(n, 1));
	BatchRequest **claimed_by = palloc(sizeof(BatchRequest *) * Max(n, 1));
	int			nbuys = 0;
	int			nclaims = 0;
	HTAB	   *book;

	for (int i = 0; i < n; i++)
	{
		BatchRequest *req = &batch_requests[answers[i].procno];
		bool		repeated = false;

		mbs[i] = NULL;
		if (req->kind != BK_BUY_NOW)
			continue;
		mbs[i] = MemoryContextAlloc(cxt, sizeof(MarketBuyNow));
		MemoryContextSwitchTo(cxt);
		request_to_buy_now(req, mbs[i]);
		MemoryContextSwitchTo(outer);
		buys[nbuys++] = mbs[i];
		for (int c = 0; c < nclaims && !repeated; c++)
			repeated = same_customer_key(claimed_by[c], req);
		if (!repeated)
		{
			claimed_by[nclaims] = req;
			claims[nclaims++] = mbs[i];
		}
	}
	if (nbuys == 0)
		return;

	book = market_price_book(buys, nbuys, cxt);
	for (int b = 0; b < nbuys; b++)
		buys[b]->prices = book;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(outer);
	PG_TRY();
	{
		market_claim_keys(claims, nclaims);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(outer);
		CurrentResourceOwner = outer_owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(outer);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(outer);
		CurrentResourceOwner = outer_owner;
		for (int c = 0; c < nclaims; c++)
			claims[c]->key_claimed = false;
		ereport(DEBUG1,
				(errmsg_internal("market batch worker: claiming %d idempotency keys at once failed, each checkout claims its own: %s",
								 nclaims, edata->message)));
		FreeErrorData(edata);
	}
	PG_END_TRY();
}

/*
 * apply_buy_now runs one buy_now in a subtransaction of the batch's
 * transaction, as its requester: success leaves its rows in the batch and
 * the response in the answer; an error is the answer and undoes only this
 * request, except a lock wait that ran out of the batch's lock_timeout: that
 * marks the answer retry_alone instead.  With pending, it stops once the
 * stock is sold and returns true
 * with what is left to write in *pending (a replay or an error is answered
 * and returns false): write_pending then writes the orders of every such
 * checkout of the chunk in one statement.
 */
static bool
apply_buy_now(BatchAnswer *ans, BatchRequest *req, MarketBuyNow *mb, MemoryContext cxt,
			  MarketBuyNowPending **pending)
{
	volatile bool prepared = false;
	MemoryContext outer = CurrentMemoryContext;
	ResourceOwner outer_owner = CurrentResourceOwner;
	Oid			own_session = GetSessionUserId();
	Oid			save_userid;
	int			save_sec;

	GetUserIdAndSecContext(&save_userid, &save_sec);
	if (mb == NULL)
	{
		mb = MemoryContextAlloc(cxt, sizeof(MarketBuyNow));
		MemoryContextSwitchTo(cxt);
		request_to_buy_now(req, mb);
		MemoryContextSwitchTo(outer);
	}

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(outer);
	PG_TRY();
	{
		Jsonb	   *doc;

		act_as(req->session_user, save_userid, save_sec | SECURITY_LOCAL_USERID_CHANGE);
		if (pending != NULL)
		{
			Datum		replay;

			MemoryContextSwitchTo(cxt);
			prepared = market_buy_now_prepare(mb, pending, &replay);
			MemoryContextSwitchTo(outer);
			doc = prepared ? NULL : DatumGetJsonbP(replay);
		}
		else
			doc = DatumGetJsonbP(market_buy_now_apply(mb));
		if (doc != NULL)
		{
			ans->response = MemoryContextAlloc(cxt, VARSIZE(doc));
			memcpy(ans->response, doc, VARSIZE(doc));
		}
		act_as(own_session, save_userid, save_sec);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(outer);
		CurrentResourceOwner = outer_owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(outer);
		CurrentResourceOwner = outer_owner;
		act_as(own_session, save_userid, save_sec);
		ans->response = NULL;
		if (edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE && LockTimeout > 0)
			ans->retry_alone = true;	/* the batch's bounded wait ran out */
		else
			answer_error(ans, edata);
		prepared = false;
	}
	PG_END_TRY();
	return prepared;
}

/*
 * same_key_pending says whether an earlier checkout of the chunk, still
 * waiting for its orders, has the request's customer and key: the request
 * is then applied after the chunk's orders are written, and replays (or
 * MK004s) like any duplicate, instead of finding the key claimed and
 * unanswered.
 */
static bool
same_key_pending(BatchRequest *req, BatchAnswer *answers, int *pending_at, int npending)
{
	for (int i = 0; i < npending; i++)
		if (same_customer_key(&batch_requests[answers[pending_at[i]].procno], req))
			return true;
	return false;
}

/*
 * write_pending writes the orders of the chunk's prepared checkouts, one
 * statement per requesting role (normally one), as that role, and puts each
 * response in its answer.  An error here fails the whole chunk, which is
 * then applied request by request; the worker's own identity is restored
 * first.
 */
static void
write_pending(BatchAnswer *answers, MarketBuyNowPending **pending, int *pending_at,
			  int npending, MemoryContext cxt)
{
	Oid			own_session = GetSessionUserId();
	Oid			save_userid;
	int			save_sec;
	bool	   *done = palloc0(sizeof(bool) * Max(npending, 1));
	MarketBuyNowPending **group = palloc(sizeof(MarketBuyNowPending *) * Max(npending, 1));
	int		   *group_at = palloc(sizeof(int) * Max(npending, 1));
	Datum	   *responses = palloc(sizeof(Datum) * Max(npending, 1));

	GetUserIdAndSecContext(&save_userid, &save_sec);
	for (int first = 0; first < npending; first++)
	{
		Oid			role = batch_requests[answers[pending_at[first]].procno].session_user;
		int			m = 0;

		if (done[first])
			continue;
		for (int i = first; i < npending; i++)
			if (!done[i] && batch_requests[answers[pending_at[i]].procno].session_user == role)
			{
				done[i] = true;
				group[m] = pending[i];
				group_at[m++] = pending_at[i];
			}
		PG_TRY();
		{
			act_as(role, save_userid, save_sec | SECURITY_LOCAL_USERID_CHANGE);
			market_buy_now_write(group, m, responses);
		}
		PG_FINALLY();
		{
			act_as(own_session, save_userid, save_sec);
		}
		PG_END_TRY();
		for (int i = 0; i < m; i++)
		{
			Jsonb	   *doc = DatumGetJsonbP(responses[i]);
			BatchAnswer *ans = &answers[group_at[i]];

			ans->response = MemoryContextAlloc(cxt, VARSIZE(doc));
			memcpy(ans->response, doc, VARSIZE(doc));
		}
	}
}

/*
 * apply_batch applies every request in one transaction.  Returns false if
 * anything raised; the transaction is then rolled back and nothing of it
 * was published.
 */
static bool
apply_batch(BatchAnswer *answers, int n, MemoryContext cxt)
{
	volatile bool ok = true;
	HASHCTL		ctl;
	HTAB	   *estimates;
	MarketBuyNowPending **pending;
	MarketBuyNow **mbs;
	int		   *pending_at;
	int		   *deferred;
	int			npending = 0;
	int			ndeferred = 0;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = offsetof(PairEstimate, available);
	ctl.entrysize = sizeof(PairEstimate);
	ctl.hcxt = cxt;
	estimates = hash_create("market batch estimates", 64, &ctl,
							HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	pending = MemoryContextAlloc(cxt, sizeof(MarketBuyNowPending *) * Max(n, 1));
	pending_at = MemoryContextAlloc(cxt, sizeof(int) * Max(n, 1));
	deferred = MemoryContextAlloc(cxt, sizeof(int) * Max(n, 1));
	mbs = MemoryContextAlloc(cxt, sizeof(MarketBuyNow *) * Max(n, 1));

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "market: applying a batch of reservations and checkouts");
		prepare_chunk(answers, n, mbs, cxt);

		for (int i = 0; i < n; i++)
		{
			BatchRequest *req = &batch_requests[answers[i].procno];
			int64		available = 0;
			int			shortl;

			if (req->kind == BK_BUY_NOW)
			{
				if (same_key_pending(req, answers, pending_at, npending))
					deferred[ndeferred++] = i;
				else if (apply_buy_now(&answers[i], req, mbs[i], cxt, &pending[npending]))
					pending_at[npending++] = i;
				else if (mbs[i]->key_claimed)
					market_release_keys(&mbs[i], 1);	/* failed: free the key for a retry */
				continue;
			}
			shortl = short_line(estimates, req, &available);
			if (shortl >= 0)
				answer_short(&answers[i], &req->lines[shortl], available, cxt);
			else
			{
				market_reserve_lines(req->lines, req->nlines, req->ttl_usecs,
									 request_owner(req), &answers[i].id,
									 NULL, NULL);
				note_reserved(estimates, req);
			}
		}
		write_pending(answers, pending, pending_at, npending, cxt);
		for (int d = 0; d < ndeferred; d++)
			apply_buy_now(&answers[deferred[d]], &batch_requests[answers[deferred[d]].procno],
						  mbs[deferred[d]], cxt, NULL);

		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		EmitErrorReport();
		AbortCurrentTransaction();
		FlushErrorState();
		RESUME_INTERRUPTS();
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/* set_lock_timeout sets the worker's lock_timeout (milliseconds, "0": none). */
static void
set_lock_timeout(const char *ms)
{
	SetConfigOption("lock_timeout", ms, PGC_SUSET, PGC_S_OVERRIDE);
}

/*
 * apply_one applies a single request in its own transaction, catching its
 * error for the answer, and waiting for locks as long as it takes (it holds
 * nothing else).  Used for a request whose lock wait timed out in a batch,
 * and to replay a batch that failed as a whole.
 */
static void
apply_one(BatchAnswer *ans, MemoryContext cxt)
{
	BatchRequest *req = &batch_requests[ans->procno];

	memset(&ans->id, 0, sizeof(pg_uuid_t));
	ans->sqlerrcode = 0;
	ans->response = NULL;
	ans->retry_alone = false;
	set_lock_timeout("0");
	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		if (req->kind == BK_BUY_NOW)
			apply_buy_now(ans, req, NULL, cxt, NULL);
		else
			market_reserve_lines(req->lines, req->nlines, req->ttl_usecs,
								 request_owner(req), &ans->id, NULL, NULL);
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		AbortCurrentTransaction();
		FlushErrorState();
		RESUME_INTERRUPTS();
		answer_error(ans, edata);
	}
	PG_END_TRY();
	set_lock_timeout(BATCH_LOCK_TIMEOUT_MS);
}

/* queue_length is the number of queued requests. */
static int
queue_length(void)
{
	int			n;

	SpinLockAcquire(&batch->mutex);
	n = batch->count;
	SpinLockRelease(&batch->mutex);
	return n;
}

/*
 * take_queued pops up to max queued backends off the ring, stopping before
 * the (BATCH_MAX_CHECKOUTS + 1)th checkout, so that what it takes is one
 * transaction's worth: each checkout is a subtransaction, and so is the
 * chunk's key claim (prepare_chunk); with at most BATCH_MAX_SUBXACTS of
 * them the worker's subtransaction ids stay in its PGPROC cache and other
 * sessions' snapshots stay cheap (past it, every snapshot is marked
 * overflowed and visibility checks read pg_subtrans).  The rest of the
 * queue is left to the other workers rather than applied as further
 * transactions in a row while they sit idle.  *left is what stays queued.
 */
static int
take_queued(int *procnos, int max, int *left)
{
	int			n = 0;
	int			checkouts = 0;

	SpinLockAcquire(&batch->mutex);
	while (n < Min(batch->count, max))
	{
		int			procno = batch_ring[(batch->head + n) % batch->capacity];

		if (batch_requests[procno].kind == BK_BUY_NOW && ++checkouts > BATCH_MAX_CHECKOUTS)
			break;
		procnos[n++] = procno;
	}
	batch->head = (batch->head + n) % batch->capacity;
	batch->count -= n;
	*left = batch->count;
	SpinLockRelease(&batch->mutex);
	return n;
}

/* run_batch takes what is queued, applies it and answers every backend. */
static int
run_batch(int *procnos, BatchAnswer *answers, MemoryContext cxt)
{
	int			left;
	int			queued = take_queued(procnos, market_batch_max, &left);
	int			n = 0;

	/* what this worker left queued is for an idle one */
	if (left > 0)
		wake_batch_worker();

	for (int i = 0; i < queued; i++)
	{
		BatchRequest *req = &batch_requests[procnos[i]];
		uint32		expected = BR_QUEUED;

		req->taken_by = my_worker;	/* read by the backend only once TAKEN */
		if (pg_atomic_compare_exchange_u32(&req->state, &expected, BR_TAKEN))
		{
			memset(&answers[n], 0, sizeof(BatchAnswer));
			answers[n++].procno = procnos[i];
		}
		else if (expected == BR_ABANDONED)
			pg_atomic_write_u32(&req->state, BR_FREE);
	}

	if (n > 0)
	{
		if (!apply_batch(answers, n, cxt))
		{
			pg_atomic_fetch_add_u64(&batch->fallbacks, 1);
			for (int i = 0; i < n; i++)
				apply_one(&answers[i], cxt);
		}
		/* counted before answering, so that a caller sees its own request counted */
		pg_atomic_fetch_add_u64(&batch->batches, 1);
		pg_atomic_fetch_add_u64(&batch->requests, n);
		if ((uint64) n > pg_atomic_read_u64(&batch->largest))
			pg_atomic_write_u64(&batch->largest, n);
		for (int i = 0; i < n; i++)
			if (!answers[i].retry_alone)
				publish_answer(&answers[i]);
		/* the batch is committed: what timed out waiting now waits alone */
		for (int i = 0; i < n; i++)
			if (answers[i].retry_alone)
			{
				pg_atomic_fetch_add_u64(&batch->retried_alone, 1);
				apply_one(&answers[i], cxt);
				publish_answer(&answers[i]);
			}
		pgstat_report_stat(false);
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	return queued;
}

/*
 * answer_orphans tells backends whose request a previous worker in this
 * worker's place took but never answered that the outcome is unknown (MK006).
 */
static void
answer_orphans(void)
{
	for (int i = 0; i < batch->capacity; i++)
	{
		if (pg_atomic_read_u32(&batch_requests[i].state) == BR_TAKEN &&
			batch_requests[i].taken_by == my_worker)
		{
			BatchAnswer ans = {0};

			ans.procno = i;
			ans.sqlerrcode = MK_BATCH_INTERRUPTED;
			if (batch_requests[i].kind == BK_BUY_NOW)
			{
				ans.message = "batched checkout interrupted";
				ans.detail = "The batch worker stopped while applying this checkout.";
				ans.hint = "Retry with the same idempotency key: it returns the checkout if it was made, and makes it otherwise.";
			}
			else
			{
				ans.message = "batched reservation interrupted";
				ans.detail = "The batch worker stopped while applying this reservation.";
				ans.hint = "The reservation was not made or expires by its ttl; retry.";
			}
			publish_answer(&ans);
		}
	}
}

/* extension_installed checks, in a transaction, that market is installed here. */
static bool
extension_installed(void)
{
	bool		installed;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	installed = OidIsValid(get_extension_oid("market", true));
	CommitTransactionCommand();
	return installed;
}

/* batch_worker_detach withdraws the worker from shared memory on exit. */
static void
batch_worker_detach(int code, Datum arg)
{
	pg_atomic_write_u32(&batch->workers[my_worker].ready_db, InvalidOid);
	pg_atomic_write_u32(&batch->workers[my_worker].pid, 0);
}

/* market_batch_worker_main is the batch worker's entry point and loop. */
void
market_batch_worker_main(Datum main_arg)
{
	MemoryContext cxt;
	int		   *procnos;
	BatchAnswer *answers;
	BatchWorkerSlot *me;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(market_database, NULL, 0);
	pgstat_report_appname("market batch worker");
	set_lock_timeout(BATCH_LOCK_TIMEOUT_MS);

	my_worker = DatumGetInt32(main_arg);
	Assert(my_worker >= 0 && my_worker < MAX_BATCH_WORKERS);
	me = &batch->workers[my_worker];
	pg_atomic_write_u32(&me->idle, 0);
	pg_atomic_write_u32(&me->procno, MyProc->pgprocno);
	pg_atomic_write_u32(&me->pid, (uint32) MyProcPid);
	before_shmem_exit(batch_worker_detach, (Datum) 0);
	answer_orphans();

	ereport(LOG,
			(errmsg("market batch worker started in database \"%s\"", market_database)));

	procnos = MemoryContextAlloc(TopMemoryContext, sizeof(int) * batch->capacity);
	answers = MemoryContextAlloc(TopMemoryContext, sizeof(BatchAnswer) * batch->capacity);
	cxt = AllocSetContextCreate(TopMemoryContext, "market batch worker loop",
								ALLOCSET_DEFAULT_SIZES);
	for (;;)
	{
		MemoryContext old;
		int			taken;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		if (pg_atomic_read_u32(&me->ready_db) != MyDatabaseId)
		{
			if (!extension_installed())
			{
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 NO_EXTENSION_RETRY_MS, PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
				continue;
			}
			pg_atomic_write_u32(&me->ready_db, MyDatabaseId);
		}

		old = MemoryContextSwitchTo(cxt);
		taken = run_batch(procnos, answers, cxt);
		MemoryContextSwitchTo(old);
		MemoryContextReset(cxt);
		if (taken > 0)
			continue;

		/* idle: say so, then look once more (pairs with wake_batch_worker) */
		pg_atomic_write_u32(&me->idle, 1);
		pg_memory_barrier();
		if (queue_length() == 0)
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 IDLE_WAIT_MS, PG_WAIT_EXTENSION);
		pg_atomic_write_u32(&me->idle, 0);
		ResetLatch(MyLatch);
	}
}

/*
 * market.batch_status() reports on the batch worker and its queue: seven
 * columns up to release 0.3, eight (retried_alone) from 0.4; it fills what
 * the installed definition declares.
 */
Datum
market_batch_status(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[8];
	bool		nulls[8] = {0};

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE ||
		desc->natts < 7 || desc->natts > 8)
		elog(ERROR, "market: batch_status must return a record of 7 or 8 columns");
	desc = BlessTupleDesc(desc);

	if (batch == NULL)
	{
		values[0] = BoolGetDatum(false);
		for (int i = 1; i < 8; i++)
			nulls[i] = true;
	}
	else
	{
		uint32		pid = pg_atomic_read_u32(&batch->workers[0].pid);
		int			queued = queue_length();

		values[0] = BoolGetDatum(batch_serves(MyDatabaseId));
		values[1] = Int32GetDatum((int32) pid);
		nulls[1] = (pid == 0);
		values[2] = Int32GetDatum(queued);
		values[3] = Int64GetDatum((int64) pg_atomic_read_u64(&batch->batches));
		values[4] = Int64GetDatum((int64) pg_atomic_read_u64(&batch->requests));
		values[5] = Int64GetDatum((int64) pg_atomic_read_u64(&batch->fallbacks));
		values[6] = Int64GetDatum((int64) pg_atomic_read_u64(&batch->largest));
		values[7] = Int64GetDatum((int64) pg_atomic_read_u64(&batch->retried_alone));
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(desc, values, nulls)));
}
