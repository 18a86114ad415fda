/*-------------------------------------------------------------------------
 *
 * psp.h
 *	  What the PSP worker (psp_worker.c) and its adapters (psp_stripe.c,
 *	  psp_adyen.c, psp_paypal.c) share: a job as psp_claim() planned it,
 *	  one HTTP request, one answer, and the adapter interface.
 *
 * Adapters run in the worker process outside any transaction: they only
 * build requests and read answers in memory (no catalog access, no SPI),
 * and never raise an ERROR on anything a PSP sends.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MARKET_PSP_H
#define MARKET_PSP_H

#include "postgres.h"

#include "lib/stringinfo.h"
#include "utils/jsonb.h"

/* outcomes, as market.payment_attempts.outcome spells them */
#define PSP_SUCCEEDED		"succeeded"
#define PSP_HARD_DECLINE	"hard_decline"
#define PSP_SOFT_DECLINE	"soft_decline"
#define PSP_REJECTED		"rejected"
#define PSP_UNREACHABLE		"unreachable"
#define PSP_UNKNOWN			"unknown"

#define PSP_MAX_HEADERS		8

/* one HTTP request an adapter wants sent */
typedef struct PspRequest
{
	const char *method;			/* "POST", "GET" */
	char	   *url;
	char	   *body;			/* NULL: none */
	int			nheaders;
	char	   *headers[PSP_MAX_HEADERS];	/* "Name: value" */
	char	   *summary;		/* for the attempt row: no secrets */
	const char *call_op;		/* operation of this call (attempt row) */
	const char *call_key;		/* its idempotency key */
} PspRequest;

/* the answer to it */
typedef struct PspResponse
{
	long		status;			/* 0: no HTTP answer */
	bool		sent;			/* did any byte of the request leave? */
	char	   *body;
	size_t		len;
	Jsonb	   *json;			/* the body parsed, or NULL */
	const char *curl_error;		/* NULL: transfer completed */
	double		latency_ms;
} PspResponse;

/* one job, as market.psp_claim() planned it, and where it is */
typedef struct PspJob
{
	/* from the plan */
	int64		outbox_id;
	int64		attempt_id;
	char	   *op;				/* authorize, capture, void, refund, reconcile */
	int64		payment_id;
	char	   *key;
	char	   *void_key;
	int64		amount_minor;
	char	   *currency;
	char	   *method;
	char	   *reference;
	char	   *psp_reference;
	char	   *winner_reference;
	char	   *capture_reference;
	bool		final_capture;
	int			account_id;
	char	   *account;
	char	   *kind;
	char	   *base_url;
	Jsonb	   *credentials;
	int			timeout_ms;		/* 0: market.psp_timeout */

	/* progress */
	const char *cur_op;			/* the operation being carried out now */
	int			step;			/* adapter's step within cur_op */
	bool		done;
	char	   *order_id_at_psp; /* PayPal order */

	/* outcome */
	const char *outcome;
	long		http_status;
	double		latency_ms;
	char	   *error;
	char	   *decline_code;
	char	   *result_reference;	/* authorization id at the PSP */
	char	   *result_capture;		/* capture id (PayPal) */
	char	   *summary;
	bool		voided;
	StringInfoData calls;		/* JSON objects of intermediate calls, comma-separated */
	bool		technical_failure;	/* for the breaker */
} PspJob;

/*
 * An adapter.  build() fills the request for the job's current step
 * (job->cur_op, job->step) and returns true, or returns false when there is
 * nothing to send (the job's outcome is then set).  handle() reads the
 * answer: it either sets job->outcome (the operation is over) or advances
 * job->step (another request follows).
 */
typedef struct PspAdapter
{
	const char *kind;
	bool		(*build) (PspJob *job, PspRequest *req);
	void		(*handle) (PspJob *job, PspResponse *resp);
} PspAdapter;

extern const PspAdapter psp_stripe_adapter;
extern const PspAdapter psp_adyen_adapter;
extern const PspAdapter psp_paypal_adapter;

/* helpers (psp_worker.c) */
extern char *psp_jstr(Jsonb *j, const char *path);
extern char *psp_cred(PspJob *job, const char *name);
extern void psp_add_header(PspRequest *req, const char *fmt,...) pg_attribute_printf(2, 3);
extern void psp_form_add(StringInfo buf, const char *name, const char *value);
extern char *psp_amount_decimal(int64 minor, const char *currency);
extern bool psp_is_soft_decline(const char *code);
extern void psp_set_outcome(PspJob *job, const char *outcome, PspResponse *resp,
							const char *error);
extern void psp_transport_outcome(PspJob *job, PspResponse *resp);
extern void psp_note_call(PspJob *job, const char *operation, const char *key,
						  PspResponse *resp, const char *outcome, const char *reference,
						  const char *summary);
extern char *psp_base64(const char *data, size_t len);

#endif							/* MARKET_PSP_H */
