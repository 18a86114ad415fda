/*-------------------------------------------------------------------------
 *
 * psp_paypal.c
 *	  The PayPal adapter: OAuth2 client credentials, Orders v2, Payments v2.
 *
 *	  token		 POST /v1/oauth2/token (Basic client_id:client_secret,
 *				 grant_type=client_credentials); the token is cached per
 *				 account in the worker until shortly before it expires
 *	  authorize  POST /v2/checkout/orders {intent: AUTHORIZE, purchase_units:
 *				 [{custom_id: <reference>, amount: {currency_code, value}}],
 *				 payment_source: {card: {vault_id: <method>}}}, then
 *				 POST /v2/checkout/orders/{id}/authorize
 *	  capture	 POST /v2/payments/authorizations/{id}/capture {amount,
 *				 final_capture}
 *	  void		 POST /v2/payments/authorizations/{id}/void
 *	  refund	 POST /v2/payments/captures/{capture id}/refund {amount}
 *
 * Idempotency: PayPal-Request-Id is the job's key (the order creation uses
 * the key with "-order" appended), so a replay finds the same order and the
 * same authorization.  Amounts are decimal strings with the currency's
 * exponent of decimals.  A 422 INSTRUMENT_DECLINED is a soft decline,
 * TRANSACTION_REFUSED a hard one; 5xx and PREVIOUS_REQUEST_IN_PROGRESS are
 * unknown.
 *
 * No locks, no transaction: only requests built and answers read.  The
 * token cache lives in TopMemoryContext of the worker.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "psp.h"

#define TOKEN_CACHE_SIZE	32
#define TOKEN_MARGIN_S		60

/* steps of every operation */
#define STEP_TOKEN		0
#define STEP_MAIN		1
#define STEP_AUTHORIZE	2		/* authorize: after the order is created */

typedef struct TokenEntry
{
	int			account_id;
	char	   *token;
	TimestampTz expires;
} TokenEntry;

static TokenEntry tokens[TOKEN_CACHE_SIZE];

/* token_get returns the cached token of an account, or NULL. */
static TokenEntry *
token_slot(int account_id, bool create)
{
	TokenEntry *oldest = &tokens[0];

	for (int i = 0; i < TOKEN_CACHE_SIZE; i++)
	{
		if (tokens[i].account_id == account_id)
			return &tokens[i];
		if (tokens[i].expires < oldest->expires)
			oldest = &tokens[i];
	}
	if (!create)
		return NULL;
	if (oldest->token)
		pfree(oldest->token);
	oldest->token = NULL;
	oldest->account_id = account_id;
	oldest->expires = 0;
	return oldest;
}

/* token_valid returns a usable token of the account, or NULL. */
static const char *
token_valid(int account_id)
{
	TokenEntry *t = token_slot(account_id, false);

	if (t == NULL || t->token == NULL || t->expires <= GetCurrentTimestamp())
		return NULL;
	return t->token;
}

/* token_forget drops an account's token (after a 401). */
static void
token_forget(int account_id)
{
	TokenEntry *t = token_slot(account_id, false);

	if (t)
		t->expires = 0;
}

/* current_key is the idempotency key of the operation being carried out. */
static const char *
current_key(PspJob *job)
{
	if (strcmp(job->op, "reconcile") == 0 && strcmp(job->cur_op, "void") == 0)
		return job->void_key;
	return job->key;
}

/* add_amount appends "amount": {"currency_code", "value"}. */
static void
add_amount(StringInfo b, PspJob *job)
{
	appendStringInfoString(b, "\"amount\":{\"currency_code\":");
	escape_json(b, job->currency);
	appendStringInfoString(b, ",\"value\":");
	escape_json(b, psp_amount_decimal(job->amount_minor, job->currency));
	appendStringInfoChar(b, '}');
}

/* paypal_build builds the request of the job's current step. */
static bool
paypal_build(PspJob *job, PspRequest *req)
{
	StringInfoData b;
	const char *op = job->cur_op;
	const char *token;

	initStringInfo(&b);
	req->method = "POST";
	if (job->step == STEP_TOKEN)
	{
		if (token_valid(job->account_id) == NULL)
		{
			char	   *id = psp_cred(job, "client_id");
			char	   *secret = psp_cred(job, "client_secret");
			char	   *pair = psprintf("%s:%s", id ? id : "", secret ? secret : "");

			req->url = psprintf("%s/v1/oauth2/token", job->base_url);
			req->body = pstrdup("grant_type=client_credentials");
			psp_add_header(req, "Authorization: Basic %s", psp_base64(pair, strlen(pair)));
			psp_add_header(req, "Content-Type: application/x-www-form-urlencoded");
			req->summary = pstrdup("POST /v1/oauth2/token");
			return true;
		}
		job->step = (strcmp(op, "authorize") == 0 && job->order_id_at_psp) ? STEP_AUTHORIZE : STEP_MAIN;
	}
	token = token_valid(job->account_id);
	psp_add_header(req, "Authorization: Bearer %s", token ? token : "");
	psp_add_header(req, "Content-Type: application/json");

	if (strcmp(op, "authorize") == 0 && job->step == STEP_MAIN)
	{
		req->url = psprintf("%s/v2/checkout/orders", job->base_url);
		appendStringInfoString(&b, "{\"intent\":\"AUTHORIZE\",\"purchase_units\":[{\"custom_id\":");
		escape_json(&b, job->reference);
		appendStringInfoChar(&b, ',');
		add_amount(&b, job);
		appendStringInfoString(&b, "}],\"payment_source\":{\"card\":{\"vault_id\":");
		escape_json(&b, job->method);
		appendStringInfoString(&b, "}}}");
		psp_add_header(req, "PayPal-Request-Id: %s-order", current_key(job));
		req->summary = psprintf("POST /v2/checkout/orders value=%s currency=%s vault_id=%s",
								psp_amount_decimal(job->amount_minor, job->currency),
								job->currency, job->method);
	}
	else if (strcmp(op, "authorize") == 0)
	{
		req->url = psprintf("%s/v2/checkout/orders/%s/authorize", job->base_url, job->order_id_at_psp);
		appendStringInfoString(&b, "{}");
		psp_add_header(req, "PayPal-Request-Id: %s", current_key(job));
		req->summary = psprintf("POST /v2/checkout/orders/%s/authorize", job->order_id_at_psp);
	}
	else if (strcmp(op, "capture") == 0)
	{
		req->url = psprintf("%s/v2/payments/authorizations/%s/capture", job->base_url, job->psp_reference);
		appendStringInfoChar(&b, '{');
		add_amount(&b, job);
		appendStringInfo(&b, ",\"final_capture\":%s}", job->final_capture ? "true" : "false");
		psp_add_header(req, "PayPal-Request-Id: %s", current_key(job));
		req->summary = psprintf("POST /v2/payments/authorizations/%s/capture value=%s final_capture=%s",
								job->psp_reference, psp_amount_decimal(job->amount_minor, job->currency),
								job->final_capture ? "true" : "false");
	}
	else if (strcmp(op, "void") == 0)
	{
		req->url = psprintf("%s/v2/payments/authorizations/%s/void", job->base_url, job->psp_reference);
		appendStringInfoString(&b, "{}");
		psp_add_header(req, "PayPal-Request-Id: %s", current_key(job));
		req->summary = psprintf("POST /v2/payments/authorizations/%s/void", job->psp_reference);
	}
	else if (strcmp(op, "refund") == 0)
	{
		if (job->capture_reference == NULL)
		{
			psp_set_outcome(job, PSP_REJECTED, NULL, "no PayPal capture to refund");
			return false;
		}
		req->url = psprintf("%s/v2/payments/captures/%s/refund", job->base_url, job->capture_reference);
		appendStringInfoChar(&b, '{');
		add_amount(&b, job);
		appendStringInfoChar(&b, '}');
		psp_add_header(req, "PayPal-Request-Id: %s", current_key(job));
		req->summary = psprintf("POST /v2/payments/captures/%s/refund value=%s", job->capture_reference,
								psp_amount_decimal(job->amount_minor, job->currency));
	}
	else
	{
		psp_set_outcome(job, PSP_REJECTED, NULL, "operation not supported by the PayPal adapter");
		return false;
	}
	req->body = b.data;
	return true;
}

/* decline_from reads the decline code of a 422 (the description names it), or the issue. */
static char *
decline_from(Jsonb *json, const char *issue)
{
	char	   *desc = psp_jstr(json, "details.0.description");
	char	   *p = desc ? strstr(desc, "decline code ") : NULL;

	if (p)
	{
		char	   *code = pstrdup(p + strlen("decline code "));
		char	   *e = strpbrk(code, ").");

		if (e)
			*e = '\0';
		return code;
	}
	return issue ? pstrdup(issue) : NULL;
}

/* paypal_handle reads PayPal's answer to the current step. */
static void
paypal_handle(PspJob *job, PspResponse *resp)
{
	const char *op = job->cur_op;
	char	   *issue;

	if (job->step == STEP_TOKEN)
	{
		char	   *token = psp_jstr(resp->json, "access_token");

		if (resp->status == 200 && token != NULL)
		{
			TokenEntry *t = token_slot(job->account_id, true);
			char	   *exp = psp_jstr(resp->json, "expires_in");
			int			secs = exp ? atoi(exp) : 300;

			t->token = MemoryContextStrdup(TopMemoryContext, token);
			t->expires = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													 (int64) Max(secs - TOKEN_MARGIN_S, 1) * 1000);
			job->step = STEP_MAIN;
			return;
		}
		/* no token: nothing was attempted at PayPal */
		if (resp->status == 0 || resp->status >= 500 || resp->status == 429)
			psp_set_outcome(job, PSP_UNREACHABLE, resp,
							resp->curl_error ? resp->curl_error : psprintf("token: HTTP %ld", resp->status));
		else
			psp_set_outcome(job, PSP_REJECTED, resp, psprintf("token: HTTP %ld", resp->status));
		return;
	}
	if (resp->status == 401)
	{
		token_forget(job->account_id);
		psp_set_outcome(job, PSP_UNKNOWN, resp, "HTTP 401: access token refused");
		return;
	}
	if (strcmp(op, "authorize") == 0 && job->step == STEP_MAIN)
	{
		char	   *id = psp_jstr(resp->json, "id");

		psp_note_call(job, "create_order", psprintf("%s-order", current_key(job)), resp,
					  (resp->status == 200 || resp->status == 201) && id ? PSP_SUCCEEDED : PSP_UNKNOWN,
					  id, job->summary);
		if ((resp->status == 200 || resp->status == 201) && id != NULL)
		{
			job->order_id_at_psp = id;
			job->step = STEP_AUTHORIZE;
			return;
		}
		psp_transport_outcome(job, resp);
		return;
	}
	if ((resp->status == 200 || resp->status == 201 || resp->status == 204))
	{
		if (strcmp(op, "authorize") == 0)
		{
			char	   *auth = psp_jstr(resp->json, "purchase_units.0.payments.authorizations.0.id");
			char	   *status = psp_jstr(resp->json, "purchase_units.0.payments.authorizations.0.status");

			job->result_reference = auth;
			if (auth && status && (strcmp(status, "CREATED") == 0 || strcmp(status, "PENDING") == 0 ||
								   strcmp(status, "CAPTURED") == 0))
				psp_set_outcome(job, PSP_SUCCEEDED, resp, NULL);
			else if (auth == NULL)
				psp_set_outcome(job, PSP_UNKNOWN, resp, "authorization missing from the answer");
			else
				psp_set_outcome(job, PSP_HARD_DECLINE, resp, psprintf("authorization %s", status ? status : "?"));
			return;
		}
		if (strcmp(op, "capture") == 0)
		{
			job->result_capture = psp_jstr(resp->json, "id");
			job->result_reference = job->result_capture;
		}
		else if (strcmp(op, "refund") == 0)
			job->result_reference = psp_jstr(resp->json, "id");
		psp_set_outcome(job, PSP_SUCCEEDED, resp, NULL);
		return;
	}
	issue = psp_jstr(resp->json, "details.0.issue");
	if (resp->status == 422 && issue != NULL)
	{
		if (strcmp(issue, "INSTRUMENT_DECLINED") == 0 || strcmp(issue, "TRANSACTION_REFUSED") == 0)
		{
			job->decline_code = decline_from(resp->json, issue);
			psp_set_outcome(job, strcmp(issue, "INSTRUMENT_DECLINED") == 0 ? PSP_SOFT_DECLINE : PSP_HARD_DECLINE,
							resp, psp_jstr(resp->json, "details.0.description"));
			return;
		}
		if (strcmp(issue, "PREVIOUS_REQUEST_IN_PROGRESS") == 0)
		{
			psp_set_outcome(job, PSP_UNKNOWN, resp, "HTTP 422 PREVIOUS_REQUEST_IN_PROGRESS");
			return;
		}
		psp_set_outcome(job, PSP_REJECTED, resp, psprintf("HTTP 422 %s", issue));
		return;
	}
	psp_transport_outcome(job, resp);
}

const PspAdapter psp_paypal_adapter = {"paypal", paypal_build, paypal_handle};
