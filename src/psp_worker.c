/*-------------------------------------------------------------------------
 *
 * psp_worker.c
 *	  The PSP worker: a static background worker (market.psp_worker) in
 *	  market.database that drains the outbox's 'psp' jobs, calls the PSPs
 *	  through the adapters (psp_stripe.c, psp_adyen.c, psp_paypal.c) with
 *	  the libcurl multi interface, and records the outcomes.  Also: the
 *	  market.psp_* GUCs, the per-account circuit breakers in shared memory,
 *	  market.psp_breakers(), and the helpers the adapters share.
 *
 * One cycle:
 *	 1. a short transaction runs market.psp_claim(): claims rows (SKIP
 *		LOCKED), plans each job and commits its intent (an attempt row
 *		'pending' with its idempotency key);
 *	 2. outside any transaction, every job's requests are sent with curl
 *		multi: at most market.psp_concurrency in flight, each with its own
 *		timeout counted from its own dispatch, CURLOPT_NOSIGNAL;
 *	 3. a second transaction runs market.psp_record() with the outcomes.
 * The cycles are pipelined (market_psp_worker_main): while a batch's
 * requests travel, the worker records the previous batch and claims the
 * next one, so the database work and the PSPs' latency overlap.  Each
 * batch has a memory context of its own, deleted once it is recorded.
 * A crash between 1 and 3 leaves 'pending' attempts; when their rows are
 * claimed again (at once after a restart: the worker releases its own
 * leases when it starts) psp_plan replays them with the same key.
 *
 * Locking rules: the shared struct (PspShared) is created under
 * AddinShmemInitLock and afterwards only read or written with atomics; the
 * worker is its only writer.  The worker takes no lock of its own; its two
 * transactions lock outbox, payment and order rows through the SQL
 * functions (payment row before order rows, as psp_plan/psp_record do).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "common/jsonapi.h"
#include "executor/spi.h"
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
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "market.h"
#include "psp.h"

PGDLLEXPORT void market_psp_worker_main(Datum main_arg);

PG_FUNCTION_INFO_V1(market_psp_breakers);

#define PSP_CONSUMER			"market psp worker"
#define PSP_MAX_BREAKERS		64
#define PSP_MAX_BODY			(1024 * 1024)
#define NO_EXTENSION_RETRY_MS	5000
#define STATS_CHECK_MS			500

/* breaker states */
#define BREAKER_CLOSED		0
#define BREAKER_OPEN		1
#define BREAKER_HALF_OPEN	2

/* GUCs (docs/payments.md) */
static bool psp_worker_enabled = true;
static int	psp_concurrency = 128;
static int	psp_batch_size = 100;
static int	psp_timeout_ms = 10000;
static int	psp_connect_timeout_ms = 2000;
static int	psp_poll_interval_ms = 100;
static int	psp_lease_s = 60;
static int	psp_breaker_threshold = 5;
static int	psp_breaker_cooldown_ms = 5000;
static int	psp_max_retries = 3;
static int	psp_retry_base_ms = 200;
static int	psp_retry_max_backoff_ms = 30000;
static char *psp_soft_decline_codes = NULL;

/* one account's breaker, in shared memory (the worker writes, anyone reads) */
typedef struct PspBreaker
{
	pg_atomic_uint32 account_id;	/* 0: free slot */
	pg_atomic_uint32 state;
	pg_atomic_uint32 failures;		/* technical failures in a row */
	pg_atomic_uint32 in_flight;
	pg_atomic_uint64 opened_at;		/* TimestampTz */
} PspBreaker;

typedef struct PspShared
{
	pg_atomic_uint32 pid;
	PspBreaker	breakers[PSP_MAX_BREAKERS];
} PspShared;

/*
 * A batch: the jobs of one claim, in a memory context of their own that
 * lives until their outcomes are recorded, and the ring of those waiting
 * to send (a job is in it at most once).
 */
typedef struct PspBatch
{
	MemoryContext cxt;
	PspJob	  **jobs;
	int			njobs;
	PspJob	  **ring;
	int			rhead;
	int			rcount;
	int			active;			/* requests on the wire */
} PspBatch;

static PspShared *psp_shared = NULL;
static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* ------------------------------------------------------------------------
 * Set-up: GUCs, shared memory, registration
 * ------------------------------------------------------------------------
 */

/* psp_shmem_request asks for the shared struct. */
static void
psp_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(PspShared)));
}

/* psp_shmem_startup creates or attaches the shared struct. */
static void
psp_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	psp_shared = ShmemInitStruct("market psp", sizeof(PspShared), &found);
	if (!found)
	{
		pg_atomic_init_u32(&psp_shared->pid, 0);
		for (int i = 0; i < PSP_MAX_BREAKERS; i++)
		{
			PspBreaker *b = &psp_shared->breakers[i];

			pg_atomic_init_u32(&b->account_id, 0);
			pg_atomic_init_u32(&b->state, BREAKER_CLOSED);
			pg_atomic_init_u32(&b->failures, 0);
			pg_atomic_init_u32(&b->in_flight, 0);
			pg_atomic_init_u64(&b->opened_at, 0);
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * market_psp_init defines the market.psp_* GUCs and, when preloaded with
 * market.psp_worker on, the shared struct and the worker.  Called from
 * _PG_init before the market.* prefix is reserved.
 */
void
market_psp_init(void)
{
	DefineCustomBoolVariable("market.psp_worker",
							 "Starts the PSP worker.",
							 "Only effective when market is in shared_preload_libraries.",
							 &psp_worker_enabled, true,
							 PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_concurrency",
							"PSP requests the worker keeps in flight at once.",
							NULL, &psp_concurrency, 128, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_batch_size",
							"PSP jobs the worker claims per cycle.",
							NULL, &psp_batch_size, 100, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_timeout",
							"Time allowed to one PSP request, from its own dispatch.",
							"An account's options.timeout_ms overrides it.",
							&psp_timeout_ms, 10000, 100, 300000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_connect_timeout",
							"Time allowed to connect to a PSP.",
							NULL, &psp_connect_timeout_ms, 2000, 100, 60000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_poll_interval",
							"Longest the PSP worker sleeps when the queue is empty.",
							NULL, &psp_poll_interval_ms, 100, 10, 60000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_lease",
							"Lease of the PSP jobs the worker claims.",
							"Longer than the longest chain of requests of one job.",
							&psp_lease_s, 60, 5, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_breaker_threshold",
							"Technical failures in a row that open an account's circuit breaker.",
							NULL, &psp_breaker_threshold, 5, 1, 1000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_breaker_cooldown",
							"How long an open breaker stays open before a probe.",
							NULL, &psp_breaker_cooldown_ms, 5000, 100, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_max_retries",
							"Replays of an authorization with an unknown outcome before the payment moves on.",
							"The abandoned account is reconciled later.",
							&psp_max_retries, 3, 0, 100,
							PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_retry_base",
							"First backoff before a PSP job is retried; doubles per retry.",
							NULL, &psp_retry_base_ms, 200, 0, 3600000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomIntVariable("market.psp_retry_max_backoff",
							"Longest backoff before a PSP job is retried.",
							NULL, &psp_retry_max_backoff_ms, 30000, 0, 3600000,
							PGC_SUSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomStringVariable("market.psp_soft_decline_codes",
							   "Decline codes worth trying at another PSP account.",
							   "Comma-separated; any other decline is hard.",
							   &psp_soft_decline_codes,
							   "insufficient_funds,processing_error,do_not_honor,try_again_later,"
							   "issuer_not_available,reenter_transaction,card_velocity_exceeded",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);

	if (!process_shared_preload_libraries_in_progress || IsBinaryUpgrade)
		return;
	if (!psp_worker_enabled)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = psp_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = psp_shmem_startup;

	market_register_static_worker("market_psp_worker_main", "market psp worker");
}

/* ------------------------------------------------------------------------
 * Helpers for the adapters
 * ------------------------------------------------------------------------
 */

/* jsonb_scalar_text renders a scalar JsonbValue as text (NULL for null and containers). */
static char *
jsonb_scalar_text(JsonbValue *v)
{
	switch (v->type)
	{
		case jbvString:
			return pnstrdup(v->val.string.val, v->val.string.len);
		case jbvNumeric:
			return DatumGetCString(DirectFunctionCall1(numeric_out,
													   NumericGetDatum(v->val.numeric)));
		case jbvBool:
			return pstrdup(v->val.boolean ? "true" : "false");
		default:
			return NULL;
	}
}

/*
 * psp_jstr returns the scalar at a dotted path ("error.decline_code",
 * "purchase_units.0.payments.authorizations.0.id") as text, or NULL.
 */
char *
psp_jstr(Jsonb *j, const char *path)
{
	JsonbContainer *c;
	JsonbValue	buf;
	JsonbValue *v = NULL;
	char	   *copy;
	char	   *seg;
	char	   *save = NULL;

	if (j == NULL)
		return NULL;
	c = &j->root;
	copy = pstrdup(path);
	for (seg = strtok_r(copy, ".", &save); seg != NULL; seg = strtok_r(NULL, ".", &save))
	{
		if (c == NULL)
			return NULL;
		if (JsonContainerIsObject(c))
			v = getKeyJsonValueFromContainer(c, seg, strlen(seg), &buf);
		else if (JsonContainerIsArray(c) && !JsonContainerIsScalar(c) && isdigit((unsigned char) seg[0]))
			v = getIthJsonbValueFromContainer(c, (uint32) atoi(seg));
		else
			return NULL;
		if (v == NULL)
			return NULL;
		c = (v->type == jbvBinary) ? v->val.binary.data : NULL;
	}
	if (v == NULL)
		return NULL;
	return jsonb_scalar_text(v);
}

/* psp_cred returns a credential of the job's account. */
char *
psp_cred(PspJob *job, const char *name)
{
	char		path[128];

	snprintf(path, sizeof(path), "credentials.%s", name);
	return psp_jstr(job->credentials, path);
}

/* psp_add_header adds one "Name: value" header to a request. */
void
psp_add_header(PspRequest *req, const char *fmt,...)
{
	va_list		ap;
	StringInfoData buf;

	if (req->nheaders >= PSP_MAX_HEADERS)
		elog(ERROR, "market: too many headers in a PSP request");
	initStringInfo(&buf);
	for (;;)
	{
		int			needed;

		va_start(ap, fmt);
		needed = appendStringInfoVA(&buf, fmt, ap);
		va_end(ap);
		if (needed == 0)
			break;
		enlargeStringInfo(&buf, needed);
	}
	req->headers[req->nheaders++] = buf.data;
}

/* form_escape appends s, application/x-www-form-urlencoded. */
static void
form_escape(StringInfo buf, const char *s)
{
	for (; *s; s++)
	{
		unsigned char ch = (unsigned char) *s;

		if (isalnum(ch) || ch == '-' || ch == '_' || ch == '.' || ch == '~')
			appendStringInfoChar(buf, ch);
		else if (ch == ' ')
			appendStringInfoChar(buf, '+');
		else
			appendStringInfo(buf, "%%%02X", ch);
	}
}

/* psp_form_add appends name=value to a form body. */
void
psp_form_add(StringInfo buf, const char *name, const char *value)
{
	if (buf->len > 0)
		appendStringInfoChar(buf, '&');
	form_escape(buf, name);
	appendStringInfoChar(buf, '=');
	form_escape(buf, value);
}

/* currency_exponent: the number of decimals of a currency's minor unit. */
static int
currency_exponent(const char *currency)
{
	static const char *const zero[] = {"BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW",
	"PYG", "RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"};
	static const char *const three[] = {"BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"};

	for (int i = 0; i < lengthof(zero); i++)
		if (strcmp(currency, zero[i]) == 0)
			return 0;
	for (int i = 0; i < lengthof(three); i++)
		if (strcmp(currency, three[i]) == 0)
			return 3;
	return 2;
}

/* psp_amount_decimal renders minor units as a decimal string ("10.50", "1500", "1.250"). */
char *
psp_amount_decimal(int64 minor, const char *currency)
{
	int			exp = currency_exponent(currency);
	int64		div = 1;

	if (exp == 0)
		return psprintf(INT64_FORMAT, minor);
	for (int i = 0; i < exp; i++)
		div *= 10;
	return psprintf(INT64_FORMAT ".%0*lld", minor / div, exp, (long long) (minor % div));
}

/* psp_is_soft_decline says whether a decline code is in market.psp_soft_decline_codes. */
bool
psp_is_soft_decline(const char *code)
{
	const char *p;
	size_t		n;

	if (code == NULL || psp_soft_decline_codes == NULL)
		return false;
	n = strlen(code);
	p = psp_soft_decline_codes;
	while (*p)
	{
		const char *e = strchr(p, ',');
		size_t		len = e ? (size_t) (e - p) : strlen(p);

		while (len > 0 && *p == ' ')
			p++, len--;
		while (len > 0 && p[len - 1] == ' ')
			len--;
		if (len == n && strncmp(p, code, n) == 0)
			return true;
		if (!e)
			break;
		p = e + 1;
	}
	return false;
}

/* psp_set_outcome ends the current operation of a job with an outcome. */
void
psp_set_outcome(PspJob *job, const char *outcome, PspResponse *resp, const char *error)
{
	job->outcome = outcome;
	job->http_status = resp ? resp->status : 0;
	job->latency_ms = resp ? resp->latency_ms : 0;
	job->error = error ? pstrdup(error) : NULL;
	job->technical_failure = (strcmp(outcome, PSP_UNKNOWN) == 0 ||
							  strcmp(outcome, PSP_UNREACHABLE) == 0);
}

/*
 * psp_transport_outcome classifies an answer no adapter rule covers: no
 * answer (unreachable when nothing was sent, else unknown), 5xx, 409, a
 * body that is not JSON (unknown: the PSP may have acted), 429 (nothing
 * done: unreachable), any other 4xx (rejected).
 */
void
psp_transport_outcome(PspJob *job, PspResponse *resp)
{
	if (resp->status == 0)
		psp_set_outcome(job, resp->sent ? PSP_UNKNOWN : PSP_UNREACHABLE, resp,
						resp->curl_error ? resp->curl_error : "no answer");
	else if (resp->status >= 500 || resp->status == 409)
		psp_set_outcome(job, PSP_UNKNOWN, resp,
						psprintf("HTTP %ld%s", resp->status,
								 resp->status == 409 ? " (request in progress)" : ""));
	else if (resp->status == 429)
		psp_set_outcome(job, PSP_UNREACHABLE, resp, "HTTP 429 (rate limited)");
	else if (resp->json == NULL && resp->status < 300 && resp->len > 0)
		psp_set_outcome(job, PSP_UNKNOWN, resp, psprintf("HTTP %ld with a body that is not JSON", resp->status));
	else
		psp_set_outcome(job, PSP_REJECTED, resp, psprintf("HTTP %ld", resp->status));
}

/* psp_note_call records an intermediate call of a job (its own attempt row). */
void
psp_note_call(PspJob *job, const char *operation, const char *key, PspResponse *resp,
			  const char *outcome, const char *reference, const char *summary)
{
	StringInfo	b = &job->calls;

	if (b->len > 0)
		appendStringInfoChar(b, ',');
	appendStringInfoString(b, "{\"operation\":");
	escape_json(b, operation);
	if (key)
	{
		appendStringInfoString(b, ",\"key\":");
		escape_json(b, key);
	}
	appendStringInfo(b, ",\"http_status\":%ld,\"latency_ms\":%.3f,\"outcome\":",
					 resp ? resp->status : 0L, resp ? resp->latency_ms : 0.0);
	escape_json(b, outcome);
	if (reference)
	{
		appendStringInfoString(b, ",\"psp_reference\":");
		escape_json(b, reference);
	}
	if (summary)
	{
		appendStringInfoString(b, ",\"request\":");
		escape_json(b, summary);
	}
	if (resp && resp->curl_error)
	{
		appendStringInfoString(b, ",\"error\":");
		escape_json(b, resp->curl_error);
	}
	appendStringInfoChar(b, '}');
}

/* psp_base64 encodes data (for HTTP Basic authentication). */
char *
psp_base64(const char *data, size_t len)
{
	static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	StringInfoData out;
	size_t		i;

	initStringInfo(&out);
	for (i = 0; i + 2 < len; i += 3)
	{
		uint32		v = ((unsigned char) data[i] << 16) | ((unsigned char) data[i + 1] << 8) |
			(unsigned char) data[i + 2];

		appendStringInfoChar(&out, tbl[(v >> 18) & 63]);
		appendStringInfoChar(&out, tbl[(v >> 12) & 63]);
		appendStringInfoChar(&out, tbl[(v >> 6) & 63]);
		appendStringInfoChar(&out, tbl[v & 63]);
	}
	if (i < len)
	{
		uint32		v = (unsigned char) data[i] << 16;

		if (i + 1 < len)
			v |= (unsigned char) data[i + 1] << 8;
		appendStringInfoChar(&out, tbl[(v >> 18) & 63]);
		appendStringInfoChar(&out, tbl[(v >> 12) & 63]);
		appendStringInfoChar(&out, i + 1 < len ? tbl[(v >> 6) & 63] : '=');
		appendStringInfoChar(&out, '=');
	}
	return out.data;
}

/*
 * parse_json parses an answer body into a Jsonb without ever raising: the
 * body is checked with the non-throwing JSON parser first, and jsonb_in is
 * run under PG_TRY for what that check does not cover.
 */
static Jsonb *
parse_json(char *body, size_t len)
{
	JsonLexContext *lex;
	Jsonb	   *result = NULL;
	MemoryContext cxt = CurrentMemoryContext;

	if (body == NULL || len == 0 || strlen(body) != len)
		return NULL;
	if (pg_verifymbstr(body, (int) len, true) == false)
		return NULL;
	lex = makeJsonLexContextCstringLen(body, (int) len, GetDatabaseEncoding(), false);
	if (pg_parse_json(lex, &nullSemAction) != JSON_SUCCESS)
		return NULL;
	PG_TRY();
	{
		result = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(body)));
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		FlushErrorState();
		result = NULL;
	}
	PG_END_TRY();
	return result;
}

/* ------------------------------------------------------------------------
 * Breakers
 * ------------------------------------------------------------------------
 */

/* breaker_for returns the shared breaker of an account, taking a free slot if needed. */
static PspBreaker *
breaker_for(int account_id)
{
	PspBreaker *free_slot = NULL;

	if (psp_shared == NULL)
		return NULL;
	for (int i = 0; i < PSP_MAX_BREAKERS; i++)
	{
		PspBreaker *b = &psp_shared->breakers[i];
		uint32		id = pg_atomic_read_u32(&b->account_id);

		if (id == (uint32) account_id)
			return b;
		if (id == 0 && free_slot == NULL)
			free_slot = b;
	}
	if (free_slot)
	{
		pg_atomic_write_u32(&free_slot->state, BREAKER_CLOSED);
		pg_atomic_write_u32(&free_slot->failures, 0);
		pg_atomic_write_u32(&free_slot->in_flight, 0);
		pg_atomic_write_u64(&free_slot->opened_at, 0);
		pg_atomic_write_u32(&free_slot->account_id, (uint32) account_id);
	}
	return free_slot;
}

/*
 * breaker_lists writes the accounts whose breaker is open ("{1,2}") and
 * those that are due for a half-open probe; an open breaker whose
 * cool-down has passed becomes half-open here.  A half-open account that
 * already has a job of the batch in flight (its probe) counts as open.
 */
static void
breaker_lists(StringInfo open, StringInfo probe, PspBatch *in_flight)
{
	TimestampTz now = GetCurrentTimestamp();

	appendStringInfoChar(open, '{');
	appendStringInfoChar(probe, '{');
	for (int i = 0; psp_shared && i < PSP_MAX_BREAKERS; i++)
	{
		PspBreaker *b = &psp_shared->breakers[i];
		uint32		id = pg_atomic_read_u32(&b->account_id);
		uint32		state = pg_atomic_read_u32(&b->state);
		bool		probing = false;

		if (id == 0 || state == BREAKER_CLOSED)
			continue;
		if (state == BREAKER_OPEN &&
			now - (TimestampTz) pg_atomic_read_u64(&b->opened_at) >= (int64) psp_breaker_cooldown_ms * 1000)
		{
			pg_atomic_write_u32(&b->state, BREAKER_HALF_OPEN);
			state = BREAKER_HALF_OPEN;
		}
		for (int j = 0; in_flight && j < in_flight->njobs; j++)
			if (in_flight->jobs[j]->account_id == (int) id)
				probing = true;
		if (state == BREAKER_OPEN || probing)
			appendStringInfo(open, "%s%u", open->len > 1 ? "," : "", id);
		else
			appendStringInfo(probe, "%s%u", probe->len > 1 ? "," : "", id);
	}
	appendStringInfoChar(open, '}');
	appendStringInfoChar(probe, '}');
}

/* breaker_note feeds one finished operation's outcome to its account's breaker. */
static void
breaker_note(int account_id, bool technical_failure)
{
	PspBreaker *b = breaker_for(account_id);

	if (b == NULL)
		return;
	if (!technical_failure)
	{
		pg_atomic_write_u32(&b->failures, 0);
		if (pg_atomic_read_u32(&b->state) != BREAKER_CLOSED)
			ereport(LOG, (errmsg("market psp worker: circuit breaker of PSP account %d closed", account_id)));
		pg_atomic_write_u32(&b->state, BREAKER_CLOSED);
		return;
	}
	pg_atomic_fetch_add_u32(&b->failures, 1);
	if (pg_atomic_read_u32(&b->state) == BREAKER_HALF_OPEN ||
		(pg_atomic_read_u32(&b->state) == BREAKER_CLOSED &&
		 pg_atomic_read_u32(&b->failures) >= (uint32) psp_breaker_threshold))
	{
		if (pg_atomic_read_u32(&b->state) == BREAKER_CLOSED)
			ereport(LOG, (errmsg("market psp worker: circuit breaker of PSP account %d opened after %u failures in a row",
								 account_id, pg_atomic_read_u32(&b->failures))));
		pg_atomic_write_u64(&b->opened_at, (uint64) GetCurrentTimestamp());
		pg_atomic_write_u32(&b->state, BREAKER_OPEN);
	}
}

/* ------------------------------------------------------------------------
 * The HTTP engine: curl multi
 * ------------------------------------------------------------------------
 */

/* one request on the wire */
typedef struct Transfer
{
	PspJob	   *job;
	PspRequest	req;
	CURL	   *easy;
	struct curl_slist *headers;
	StringInfoData body;
	bool		too_big;
	TimestampTz started;
	char		errbuf[CURL_ERROR_SIZE];
} Transfer;

static CURLM *multi = NULL;

/* adapter_for returns the adapter of an account kind. */
static const PspAdapter *
adapter_for(const char *kind)
{
	if (strcmp(kind, "stripe") == 0)
		return &psp_stripe_adapter;
	if (strcmp(kind, "adyen") == 0)
		return &psp_adyen_adapter;
	if (strcmp(kind, "paypal") == 0)
		return &psp_paypal_adapter;
	return NULL;
}

/* write_cb collects an answer's body (at most PSP_MAX_BODY bytes). */
static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	Transfer   *t = (Transfer *) userdata;
	size_t		n = size * nmemb;

	if (t->body.len + n > PSP_MAX_BODY)
	{
		t->too_big = true;
		return 0;
	}
	appendBinaryStringInfo(&t->body, ptr, (int) n);
	return n;
}

/* start_transfer puts one request on the wire. */
static Transfer *
start_transfer(PspJob *job, PspRequest *req)
{
	Transfer   *t = palloc0(sizeof(Transfer));
	CURL	   *e = curl_easy_init();
	int			timeout = job->timeout_ms > 0 ? job->timeout_ms : psp_timeout_ms;

	if (e == NULL)
		elog(ERROR, "market: curl_easy_init failed");
	t->job = job;
	t->req = *req;
	t->easy = e;
	initStringInfo(&t->body);
	curl_easy_setopt(e, CURLOPT_URL, req->url);
	curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long) timeout);
	curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long) Min(psp_connect_timeout_ms, timeout));
	curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(e, CURLOPT_WRITEDATA, t);
	curl_easy_setopt(e, CURLOPT_PRIVATE, t);
	curl_easy_setopt(e, CURLOPT_ERRORBUFFER, t->errbuf);
	curl_easy_setopt(e, CURLOPT_USERAGENT, "market-psp-worker/0.3");
	if (strcmp(req->method, "POST") == 0)
	{
		curl_easy_setopt(e, CURLOPT_POST, 1L);
		curl_easy_setopt(e, CURLOPT_POSTFIELDS, req->body ? req->body : "");
		curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long) (req->body ? strlen(req->body) : 0));
	}
	else
		curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
	for (int i = 0; i < req->nheaders; i++)
		t->headers = curl_slist_append(t->headers, req->headers[i]);
	t->headers = curl_slist_append(t->headers, "Expect:");
	curl_easy_setopt(e, CURLOPT_HTTPHEADER, t->headers);
	t->started = GetCurrentTimestamp();
	curl_multi_add_handle(multi, e);
	return t;
}

/* finish_transfer turns a completed transfer into a PspResponse for the adapter. */
static void
finish_transfer(Transfer *t, CURLcode rc, PspResponse *resp)
{
	long		status = 0;
	curl_off_t	sent = 0;

	memset(resp, 0, sizeof(*resp));
	curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);
	curl_easy_getinfo(t->easy, CURLINFO_REQUEST_SIZE, &sent);
	resp->latency_ms = (double) (GetCurrentTimestamp() - t->started) / 1000.0;
	resp->sent = sent > 0;
	if (rc != CURLE_OK || t->too_big)
	{
		resp->status = 0;
		resp->curl_error = pstrdup(t->too_big ? "answer too large" :
								   (t->errbuf[0] ? t->errbuf : curl_easy_strerror(rc)));
		/* a connection that timed out before it was made sent nothing */
		if (rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST)
			resp->sent = false;
	}
	else
	{
		resp->status = status;
		resp->body = t->body.data;
		resp->len = t->body.len;
		resp->json = parse_json(t->body.data, t->body.len);
	}
	curl_multi_remove_handle(multi, t->easy);
	curl_easy_cleanup(t->easy);
	curl_slist_free_all(t->headers);
	t->easy = NULL;
}

/*
 * next_request asks the job's adapter for its next request; returns it, or
 * NULL when the job is over.  A reconcile job runs the replay of the
 * authorization, then, if that shows a late success, the void.
 */
static bool
next_request(PspJob *job, PspRequest *req)
{
	const PspAdapter *ad = adapter_for(job->kind);

	memset(req, 0, sizeof(*req));
	if (ad == NULL)
	{
		psp_set_outcome(job, PSP_REJECTED, NULL, "unknown PSP kind");
		job->done = true;
		return false;
	}
	if (job->outcome == NULL && ad->build(job, req))
		return true;
	job->done = true;
	return false;
}

/*
 * after_outcome: the current operation of a job is over.  For a reconcile
 * job whose replay shows a late authorization, the void follows.
 */
static void
after_outcome(PspJob *job)
{
	if (strcmp(job->op, "reconcile") != 0)
		return;
	if (strcmp(job->cur_op, "authorize") == 0 &&
		strcmp(job->outcome, PSP_SUCCEEDED) == 0 &&
		job->result_reference != NULL &&
		(job->winner_reference == NULL || strcmp(job->result_reference, job->winner_reference) != 0))
	{
		/* keep the replay's outcome; run the void of that authorization */
		job->cur_op = "void";
		job->step = 0;
		job->psp_reference = job->result_reference;
		job->outcome = NULL;
		job->summary = NULL;
		return;
	}
	if (strcmp(job->cur_op, "void") == 0)
	{
		PspResponse r;

		memset(&r, 0, sizeof(r));
		r.status = job->http_status;
		r.latency_ms = job->latency_ms;
		psp_note_call(job, "void", job->void_key, &r, job->outcome, job->result_reference,
					  job->summary);
		job->voided = (strcmp(job->outcome, PSP_SUCCEEDED) == 0);
		job->outcome = PSP_SUCCEEDED;
		job->error = job->voided ? NULL : pstrdup("the void of a late authorization failed");
	}
}

/* batch_start puts every job of a batch in its ring. */
static void
batch_start(PspBatch *batch)
{
	MemoryContext old = MemoryContextSwitchTo(batch->cxt);

	batch->ring = palloc(sizeof(PspJob *) * Max(batch->njobs, 1));
	batch->rhead = 0;
	batch->rcount = 0;
	batch->active = 0;
	for (int i = 0; i < batch->njobs; i++)
	{
		PspJob	   *job = batch->jobs[i];

		job->cur_op = strcmp(job->op, "reconcile") == 0 ? "authorize" : job->op;
		batch->ring[batch->rcount++] = job;
	}
	MemoryContextSwitchTo(old);
}

/* batch_done says whether every job of a batch has its outcome. */
static bool
batch_done(PspBatch *batch)
{
	return batch->active == 0 && batch->rcount == 0;
}

/*
 * batch_step moves a batch's requests on: sends what the concurrency limit
 * allows (each request's timeout counts from its own dispatch), lets curl
 * work, hands every answer to its adapter, then waits at most wait_ms for
 * the sockets when requests are on the wire.  Allocations go to the
 * batch's context.
 */
static void
batch_step(PspBatch *batch, int wait_ms)
{
	MemoryContext old = MemoryContextSwitchTo(batch->cxt);
	int			n = Max(batch->njobs, 1);
	int			running;
	CURLMsg    *msg;
	int			left;

	/* dispatch what the concurrency limit allows */
	while (batch->active < psp_concurrency && batch->rcount > 0)
	{
		PspJob	   *job = batch->ring[batch->rhead];
		PspRequest	req;
		PspBreaker *b;

		batch->rhead = (batch->rhead + 1) % n;
		batch->rcount--;
		if (!next_request(job, &req))
			continue;
		start_transfer(job, &req);
		batch->active++;
		b = breaker_for(job->account_id);
		if (b)
			pg_atomic_fetch_add_u32(&b->in_flight, 1);
	}

	curl_multi_perform(multi, &running);
	while ((msg = curl_multi_info_read(multi, &left)) != NULL)
	{
		Transfer   *t;
		PspJob	   *job;
		PspResponse resp;
		PspBreaker *b;

		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **) &t);
		job = t->job;
		finish_transfer(t, msg->data.result, &resp);
		batch->active--;
		b = breaker_for(job->account_id);
		if (b && pg_atomic_read_u32(&b->in_flight) > 0)
			pg_atomic_fetch_sub_u32(&b->in_flight, 1);

		job->summary = t->req.summary;
		adapter_for(job->kind)->handle(job, &resp);
		if (job->outcome != NULL)
			after_outcome(job);
		if (job->outcome == NULL)
		{
			/* another request follows: back in the ring */
			batch->ring[(batch->rhead + batch->rcount) % n] = job;
			batch->rcount++;
		}
		else
			job->done = true;
	}
	if (batch->active > 0 && wait_ms > 0)
		curl_multi_poll(multi, NULL, 0, wait_ms, NULL);
	MemoryContextSwitchTo(old);
}

/* batch_finish runs a batch's requests until every job has its outcome. */
static void
batch_finish(PspBatch *batch)
{
	while (!batch_done(batch))
	{
		batch_step(batch, 50);
		CHECK_FOR_INTERRUPTS();
	}
}

/* ------------------------------------------------------------------------
 * The two transactions
 * ------------------------------------------------------------------------
 */

/* job_from_plan builds a job from one element of psp_claim()'s answer. */
static PspJob *
job_from_plan(Jsonb *plan)
{
	PspJob	   *job = palloc0(sizeof(PspJob));
	char	   *s;

	job->outbox_id = atoll(psp_jstr(plan, "outbox_id"));
	job->attempt_id = atoll(psp_jstr(plan, "attempt_id"));
	job->op = psp_jstr(plan, "op");
	job->payment_id = atoll(psp_jstr(plan, "payment_id"));
	job->key = psp_jstr(plan, "key");
	job->void_key = psp_jstr(plan, "void_key");
	job->amount_minor = atoll(psp_jstr(plan, "amount_minor"));
	job->currency = psp_jstr(plan, "currency");
	job->method = psp_jstr(plan, "method");
	job->reference = psp_jstr(plan, "reference");
	job->psp_reference = psp_jstr(plan, "psp_reference");
	job->winner_reference = psp_jstr(plan, "winner_reference");
	job->capture_reference = psp_jstr(plan, "capture_reference");
	s = psp_jstr(plan, "final_capture");
	job->final_capture = (s != NULL && strcmp(s, "true") == 0);
	job->account_id = atoi(psp_jstr(plan, "account_id"));
	job->account = psp_jstr(plan, "account");
	job->kind = psp_jstr(plan, "kind");
	job->base_url = psp_jstr(plan, "base_url");
	job->credentials = plan;
	s = psp_jstr(plan, "timeout_ms");
	job->timeout_ms = s ? atoi(s) : 0;
	initStringInfo(&job->calls);
	return job;
}

/*
 * any_account_enabled tells whether some PSP account is enabled.  Without
 * one, claiming would only reschedule every job again and again (each with
 * "no PSP account"), spending the worker on nothing.  Caller is inside SPI,
 * at 0.3 or later.
 */
static bool
any_account_enabled(void)
{
	static SPIPlanPtr plan = NULL;
	bool		isnull;

	market_prepare(&plan, "SELECT EXISTS (SELECT FROM market.psp_accounts WHERE enabled)", 0, NULL);
	if (SPI_execute_plan(plan, NULL, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "market: could not read the PSP accounts");
	return DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * claim_batch runs market.psp_claim() in a transaction of its own and
 * returns the planned jobs as a batch with a memory context of its own
 * (NULL when there is no job).  in_flight: the batch whose requests are on
 * the wire meanwhile (its half-open accounts get no second probe).  *missing is set when the
 * extension (0.3) is not installed, *old_sql when it is at 0.3 (whose
 * claim and record need fresh planner statistics: refresh_stats).
 */
static PspBatch *
claim_batch(PspBatch *in_flight, bool *missing, bool *old_sql)
{
	MemoryContext caller = CurrentMemoryContext;
	PspBatch   *batch = NULL;
	StringInfoData open,
				probe;

	*old_sql = false;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "market psp worker: claiming");

	*missing = !OidIsValid(get_extension_oid("market", true));
	if (!*missing)
	{
		static SPIPlanPtr check_plan = NULL;
		int			ret;
		bool		isnull;
		char	   *version;

		/* psp_claim exists from 0.3; its set-based body from 0.4 */
		market_prepare(&check_plan,
					   "SELECT to_regprocedure('market.psp_claim(text,int,int[],int[],interval)') IS NOT NULL,"
					   " (SELECT e.extversion FROM pg_catalog.pg_extension e WHERE e.extname = 'market')",
					   0, NULL);
		ret = SPI_execute_plan(check_plan, NULL, NULL, true, 1);
		*missing = !(ret == SPI_OK_SELECT && SPI_processed == 1 &&
					 DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull)));
		version = (ret == SPI_OK_SELECT && SPI_processed == 1) ?
			SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2) : NULL;
		*old_sql = (version != NULL && strcmp(version, "0.3") == 0);
	}
	/* with no account enabled nothing can be sent: the jobs wait untouched */
	if (!*missing && any_account_enabled())
	{
		static SPIPlanPtr claim_plan = NULL;
		Oid			types[4] = {TEXTOID, INT4OID, TEXTOID, TEXTOID};
		Datum		values[4];
		bool		isnull;
		int			ret;

		initStringInfo(&open);
		initStringInfo(&probe);
		breaker_lists(&open, &probe, in_flight);
		values[0] = CStringGetTextDatum(PSP_CONSUMER);
		values[1] = Int32GetDatum(psp_batch_size);
		values[2] = CStringGetTextDatum(open.data);
		values[3] = CStringGetTextDatum(probe.data);
		market_prepare(&claim_plan, "SELECT market.psp_claim($1, $2, $3::int[], $4::int[])", 4, types);
		ret = SPI_execute_plan(claim_plan, values, NULL, false, 1);
		if (ret != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "market: psp_claim failed");
		{
			Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
			Jsonb	   *arr = isnull ? NULL : DatumGetJsonbP(d);

			if (arr != NULL && JsonContainerIsArray(&arr->root) && JsonContainerSize(&arr->root) > 0)
			{
				int			n = JsonContainerSize(&arr->root);
				MemoryContext cxt = AllocSetContextCreate(TopMemoryContext, "market psp batch",
														  ALLOCSET_DEFAULT_SIZES);
				MemoryContext old = MemoryContextSwitchTo(cxt);

				arr = DatumGetJsonbPCopy(d);
				batch = palloc0(sizeof(PspBatch));
				batch->cxt = cxt;
				batch->jobs = palloc0(sizeof(PspJob *) * (n + 1));
				for (int i = 0; i < n; i++)
				{
					JsonbValue *v = getIthJsonbValueFromContainer(&arr->root, i);

					if (v == NULL)
						continue;
					batch->jobs[batch->njobs++] = job_from_plan(JsonbValueToJsonb(v));
				}
				MemoryContextSwitchTo(old);
			}
		}
	}

	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	/* the commit leaves CurrentMemoryContext at TopMemoryContext */
	MemoryContextSwitchTo(caller);
	pgstat_report_activity(STATE_IDLE, NULL);
	return batch;
}

/*
 * refresh_stats runs ANALYZE on the tables the claim and the record search
 * (outbox, payment_attempts, payments) when their statistics are far behind
 * their contents, at most once per STATS_CHECK_MS.  A burst of jobs queued
 * faster than autovacuum analyzes leaves the planner thinking the outbox's
 * pending rows are a handful; outbox_claim's and outbox_ack's anti-joins
 * then scan every pending row for every row (quadratic in the queue).
 * Runs in a transaction of its own; only while the extension is at 0.3
 * (0.4's statements do not depend on fresh statistics).
 */
static void
refresh_stats(void)
{
	static TimestampTz last_check = 0;
	TimestampTz now = GetCurrentTimestamp();

	if (last_check != 0 && !TimestampDifferenceExceeds(last_check, now, STATS_CHECK_MS))
		return;
	last_check = now;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (OidIsValid(get_extension_oid("market", true)))
	{
		int			ret;

		pgstat_report_activity(STATE_RUNNING, "market psp worker: checking statistics");
		ret = SPI_execute("SELECT s.relid::regclass::text FROM pg_catalog.pg_stat_user_tables s"
						  " WHERE s.schemaname = 'market'"
						  "   AND s.relname IN ('outbox', 'payment_attempts', 'payments')"
						  "   AND s.n_mod_since_analyze > greatest(1000, s.n_live_tup / 2)",
						  true, 0);
		if (ret == SPI_OK_SELECT && SPI_processed > 0)
		{
			uint64		n = SPI_processed;
			char	  **rels = palloc(sizeof(char *) * n);
			SPITupleTable *tt = SPI_tuptable;

			for (uint64 i = 0; i < n; i++)
				rels[i] = SPI_getvalue(tt->vals[i], tt->tupdesc, 1);
			for (uint64 i = 0; i < n; i++)
			{
				char	   *sql = psprintf("ANALYZE %s", rels[i]);

				elog(DEBUG1, "market psp worker: %s", sql);
				SPI_execute(sql, false, 0);
			}
		}
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}


/* append_optional_string adds ,"key":"value" to a JSON object, unless value is NULL. */
static void
append_optional_string(StringInfo b, const char *key, const char *value)
{
	if (value == NULL)
		return;
	appendStringInfo(b, ",\"%s\":", key);
	escape_json(b, value);
}
/* append_result writes one job's outcome as a psp_record() result object. */
static void
append_result(StringInfo b, PspJob *job)
{
	if (b->len > 1)
		appendStringInfoChar(b, ',');
	appendStringInfo(b, "{\"attempt_id\":" INT64_FORMAT ",\"outcome\":", job->attempt_id);
	escape_json(b, job->outcome ? job->outcome : PSP_UNKNOWN);
	appendStringInfo(b, ",\"http_status\":%ld,\"latency_ms\":%.3f", job->http_status, job->latency_ms);
	append_optional_string(b, "error", job->error);
	append_optional_string(b, "decline_code", job->decline_code);
	append_optional_string(b, "psp_reference", job->result_reference);
	append_optional_string(b, "capture_reference", job->result_capture);
	append_optional_string(b, "request", job->summary);
	appendStringInfo(b, ",\"voided\":%s,\"calls\":[%s]}", job->voided ? "true" : "false",
					 job->calls.data);
}

/*
 * record_batch runs market.psp_record() with the outcomes of a batch, in a
 * transaction of its own, after feeding them to the breakers; then frees
 * the batch.
 */
static void
record_batch(PspBatch *batch)
{
	PspJob	  **jobs = batch->jobs;
	int			njobs = batch->njobs;
	MemoryContext caller = CurrentMemoryContext;
	static SPIPlanPtr record_plan = NULL;
	StringInfoData b;
	Oid			types[2] = {TEXTOID, TEXTOID};
	Datum		values[2];

	MemoryContextSwitchTo(batch->cxt);
	for (int i = 0; i < njobs; i++)
		breaker_note(jobs[i]->account_id, jobs[i]->technical_failure);
	initStringInfo(&b);
	appendStringInfoChar(&b, '[');
	for (int i = 0; i < njobs; i++)
		append_result(&b, jobs[i]);
	appendStringInfoChar(&b, ']');

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "market psp worker: recording");
	values[0] = CStringGetTextDatum(PSP_CONSUMER);
	values[1] = CStringGetTextDatum(b.data);
	market_prepare(&record_plan, "SELECT market.psp_record($1, $2::jsonb)", 2, types);
	if (SPI_execute_plan(record_plan, values, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "market: psp_record failed");
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	MemoryContextDelete(batch->cxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* release_own_leases hands back the rows an earlier life of this worker held. */
static void
release_own_leases(void)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (OidIsValid(get_extension_oid("market", true)))
	{
		values[0] = CStringGetTextDatum(PSP_CONSUMER);
		SPI_execute_with_args("UPDATE market.outbox SET lease_until = clock_timestamp()"
							  " WHERE topic = 'psp' AND lease_owner = $1"
							  "   AND acked_at IS NULL AND dead_at IS NULL",
							  1, types, values, NULL, false, 0);
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
}

/* psp_worker_detach clears the worker's pid on exit. */
static void
psp_worker_detach(int code, Datum arg)
{
	if (psp_shared)
	{
		pg_atomic_write_u32(&psp_shared->pid, 0);
		for (int i = 0; i < PSP_MAX_BREAKERS; i++)
			pg_atomic_write_u32(&psp_shared->breakers[i].in_flight, 0);
	}
	if (multi)
		curl_multi_cleanup(multi);
	multi = NULL;
}

/* market_psp_worker_main is the worker's entry point and loop. */
void
market_psp_worker_main(Datum main_arg)
{
	PspBatch   *cur = NULL;		/* the batch whose requests are on the wire */
	PspBatch   *prev = NULL;	/* the batch done but not recorded yet */
	bool		old_sql = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	BackgroundWorkerInitializeConnection(market_database, NULL, 0);
	pgstat_report_appname("market psp worker");
	/* short statements only: compiling them would cost more than it saves */
	SetConfigOption("jit", "off", PGC_SUSET, PGC_S_SESSION);

	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		elog(ERROR, "market: curl_global_init failed");
	multi = curl_multi_init();
	if (multi == NULL)
		elog(ERROR, "market: curl_multi_init failed");
	curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long) Max(psp_concurrency, 8));

	pg_atomic_write_u32(&psp_shared->pid, (uint32) MyProcPid);
	before_shmem_exit(psp_worker_detach, (Datum) 0);
	ereport(LOG, (errmsg("market psp worker started in database \"%s\"", market_database)));

	release_own_leases();

	/*
	 * The cycle, pipelined: while a batch's requests are on the wire, the
	 * worker records the previous batch's outcomes and, when the batch was
	 * full (the queue likely holds more), claims the next one.  A batch is
	 * recorded before the next claim after it, so a job handed back by the
	 * record (a failover) is claimed again at once.
	 */
	for (;;)
	{
		bool		missing = false;
		bool		full;
		PspBatch   *next = NULL;
		TimestampTz t0,
					t1,
					t2,
					t3;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		if (cur == NULL)
		{
			/* only 0.3's claim and record need fresh statistics */
			if (old_sql)
				refresh_stats();
			cur = claim_batch(NULL, &missing, &old_sql);
			if (cur == NULL)
			{
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 missing ? NO_EXTENSION_RETRY_MS : psp_poll_interval_ms,
								 PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
				continue;
			}
		}

		/* the requests out, then the database work while they travel */
		t0 = GetCurrentTimestamp();
		batch_start(cur);
		batch_step(cur, 0);
		if (prev != NULL)
		{
			record_batch(prev);
			prev = NULL;
		}
		t1 = GetCurrentTimestamp();
		if (cur->njobs >= psp_batch_size)
		{
			if (old_sql)
				refresh_stats();
			next = claim_batch(cur, &missing, &old_sql);
		}
		t2 = GetCurrentTimestamp();
		batch_finish(cur);
		t3 = GetCurrentTimestamp();
		elog(DEBUG1, "market psp worker: %d jobs; ms: record of the previous batch %ld, claim of the next %ld (%d jobs), calls left after that %ld",
			 cur->njobs, (long) (t1 - t0) / 1000, (long) (t2 - t1) / 1000,
			 next ? next->njobs : 0, (long) (t3 - t2) / 1000);

		full = cur->njobs >= psp_batch_size;
		prev = cur;
		cur = next;
		if (cur == NULL)
		{
			/* nothing in flight: record now, and wait when the queue is short */
			record_batch(prev);
			prev = NULL;
			if (!full)
			{
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 psp_poll_interval_ms, PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
			}
		}
	}
}

/* market.psp_breakers(): the breakers and in-flight counts from shared memory. */
Datum
market_psp_breakers(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	uint32		pid;

	InitMaterializedSRF(fcinfo, 0);
	if (psp_shared == NULL)
		PG_RETURN_VOID();
	pid = pg_atomic_read_u32(&psp_shared->pid);
	for (int i = 0; i < PSP_MAX_BREAKERS; i++)
	{
		PspBreaker *b = &psp_shared->breakers[i];
		uint32		id = pg_atomic_read_u32(&b->account_id);
		uint32		state = pg_atomic_read_u32(&b->state);
		uint64		opened = pg_atomic_read_u64(&b->opened_at);
		Datum		values[6];
		bool		nulls[6] = {0};

		if (id == 0)
			continue;
		values[0] = Int32GetDatum((int32) id);
		values[1] = CStringGetTextDatum(state == BREAKER_OPEN ? "open" :
										state == BREAKER_HALF_OPEN ? "half-open" : "closed");
		values[2] = Int32GetDatum((int32) pg_atomic_read_u32(&b->failures));
		values[3] = TimestampTzGetDatum((TimestampTz) opened);
		nulls[3] = (opened == 0 || state == BREAKER_CLOSED);
		values[4] = Int32GetDatum((int32) pg_atomic_read_u32(&b->in_flight));
		values[5] = Int32GetDatum((int32) pid);
		nulls[5] = (pid == 0);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	PG_RETURN_VOID();
}
