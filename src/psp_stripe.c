/*-------------------------------------------------------------------------
 *
 * psp_stripe.c
 *	  The Stripe adapter: PaymentIntents, form-encoded.
 *
 *	  authorize  POST /v1/payment_intents  amount, currency, payment_method,
 *				 capture_method=manual, confirm=true, metadata[reference],
 *				 metadata[market_payment_id]
 *	  capture	 POST /v1/payment_intents/{id}/capture  amount_to_capture,
 *				 final_capture
 *	  void		 POST /v1/payment_intents/{id}/cancel
 *	  refund	 POST /v1/refunds  payment_intent, amount
 *
 * Every request carries Authorization: Bearer <secret_key> and the job's
 * Idempotency-Key.  A 402 is a decline (error.decline_code, soft or hard
 * by market.psp_soft_decline_codes); 409 and 5xx are unknown.  Amounts are
 * Stripe's: integers in the currency's minor unit, currency in lower case.
 *
 * No locks, no transaction: this runs in the worker between its two
 * transactions and only builds requests and reads answers.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "psp.h"

/* current_key is the idempotency key of the operation being carried out. */
static const char *
current_key(PspJob *job)
{
	if (strcmp(job->op, "reconcile") == 0 && strcmp(job->cur_op, "void") == 0)
		return job->void_key;
	return job->key;
}

/* lower returns a lower-case copy of s. */
static char *
lower(const char *s)
{
	char	   *r = pstrdup(s);

	for (char *p = r; *p; p++)
		*p = pg_tolower((unsigned char) *p);
	return r;
}

/* stripe_build builds the request of the job's current operation. */
static bool
stripe_build(PspJob *job, PspRequest *req)
{
	StringInfoData form;
	char	   *secret = psp_cred(job, "secret_key");
	const char *op = job->cur_op;

	initStringInfo(&form);
	req->method = "POST";
	if (strcmp(op, "authorize") == 0)
	{
		req->url = psprintf("%s/v1/payment_intents", job->base_url);
		psp_form_add(&form, "amount", psprintf(INT64_FORMAT, job->amount_minor));
		psp_form_add(&form, "currency", lower(job->currency));
		psp_form_add(&form, "payment_method", job->method);
		psp_form_add(&form, "capture_method", "manual");
		psp_form_add(&form, "confirm", "true");
		psp_form_add(&form, "metadata[reference]", job->reference);
		psp_form_add(&form, "metadata[market_payment_id]", psprintf(INT64_FORMAT, job->payment_id));
		req->summary = psprintf("POST /v1/payment_intents amount=" INT64_FORMAT " currency=%s payment_method=%s",
								job->amount_minor, lower(job->currency), job->method);
	}
	else if (strcmp(op, "capture") == 0)
	{
		req->url = psprintf("%s/v1/payment_intents/%s/capture", job->base_url, job->psp_reference);
		psp_form_add(&form, "amount_to_capture", psprintf(INT64_FORMAT, job->amount_minor));
		psp_form_add(&form, "final_capture", job->final_capture ? "true" : "false");
		req->summary = psprintf("POST /v1/payment_intents/%s/capture amount_to_capture=" INT64_FORMAT " final_capture=%s",
								job->psp_reference, job->amount_minor, job->final_capture ? "true" : "false");
	}
	else if (strcmp(op, "void") == 0)
	{
		req->url = psprintf("%s/v1/payment_intents/%s/cancel", job->base_url, job->psp_reference);
		req->summary = psprintf("POST /v1/payment_intents/%s/cancel", job->psp_reference);
	}
	else if (strcmp(op, "refund") == 0)
	{
		req->url = psprintf("%s/v1/refunds", job->base_url);
		psp_form_add(&form, "payment_intent", job->psp_reference);
		psp_form_add(&form, "amount", psprintf(INT64_FORMAT, job->amount_minor));
		req->summary = psprintf("POST /v1/refunds payment_intent=%s amount=" INT64_FORMAT,
								job->psp_reference, job->amount_minor);
	}
	else
	{
		psp_set_outcome(job, PSP_REJECTED, NULL, "operation not supported by the Stripe adapter");
		return false;
	}
	req->body = form.data;
	psp_add_header(req, "Authorization: Bearer %s", secret ? secret : "");
	psp_add_header(req, "Idempotency-Key: %s", current_key(job));
	psp_add_header(req, "Content-Type: application/x-www-form-urlencoded");
	return true;
}

/* stripe_handle reads Stripe's answer. */
static void
stripe_handle(PspJob *job, PspResponse *resp)
{
	const char *op = job->cur_op;

	if (resp->status == 200 && resp->json != NULL)
	{
		char	   *status = psp_jstr(resp->json, "status");

		if (strcmp(op, "authorize") == 0)
		{
			job->result_reference = psp_jstr(resp->json, "id");
			if (status && (strcmp(status, "requires_capture") == 0 || strcmp(status, "succeeded") == 0))
				psp_set_outcome(job, PSP_SUCCEEDED, resp, NULL);
			else
				psp_set_outcome(job, PSP_SOFT_DECLINE, resp,
								psprintf("PaymentIntent in status %s", status ? status : "?"));
			return;
		}
		if (strcmp(op, "refund") == 0)
			job->result_reference = psp_jstr(resp->json, "id");
		psp_set_outcome(job, PSP_SUCCEEDED, resp, NULL);
		return;
	}
	if (resp->status == 402 && resp->json != NULL)
	{
		char	   *code = psp_jstr(resp->json, "error.decline_code");

		if (code == NULL)
			code = psp_jstr(resp->json, "error.code");
		job->decline_code = code;
		job->result_reference = psp_jstr(resp->json, "error.payment_intent.id");
		psp_set_outcome(job, psp_is_soft_decline(code) ? PSP_SOFT_DECLINE : PSP_HARD_DECLINE, resp,
						psp_jstr(resp->json, "error.message"));
		return;
	}
	psp_transport_outcome(job, resp);
	if (resp->json != NULL && strcmp(job->outcome, PSP_REJECTED) == 0)
	{
		char	   *code = psp_jstr(resp->json, "error.code");
		char	   *msg = psp_jstr(resp->json, "error.message");

		job->error = psprintf("HTTP %ld %s: %s", resp->status, code ? code : "error", msg ? msg : "");
	}
}

const PspAdapter psp_stripe_adapter = {"stripe", stripe_build, stripe_handle};
