/*-------------------------------------------------------------------------
 *
 * psp_adyen.c
 *	  The Adyen adapter: Checkout API v71, JSON.
 *
 *	  authorize  POST /v71/payments  amount {value, currency}, reference,
 *				 paymentMethod {type: scheme, storedPaymentMethodId:
 *				 <method>}, merchantAccount, additionalData.manualCapture
 *	  capture	 POST /v71/payments/{pspReference}/captures
 *	  void		 POST /v71/payments/{pspReference}/cancels
 *	  refund	 POST /v71/payments/{pspReference}/refunds
 *
 * Headers: X-API-Key, Idempotency-Key.  An authorization answers 200 with
 * resultCode Authorised, Refused (refusalReasonCode, mapped to the decline
 * codes the other adapters use) or Error (a processing error: soft);
 * modifications answer 201 "received".  A 422 is a refusal of the request
 * (errorCode 704, a key in use or reused, is unknown); 5xx unknown.
 * Amounts are minor units, as at Stripe.
 *
 * No locks, no transaction: only requests built and answers read.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "utils/json.h"

#include "psp.h"

/* current_key is the idempotency key of the operation being carried out. */
static const char *
current_key(PspJob *job)
{
	if (strcmp(job->op, "reconcile") == 0 && strcmp(job->cur_op, "void") == 0)
		return job->void_key;
	return job->key;
}

/* refusal_code maps Adyen's refusalReasonCode to the common decline codes. */
static const char *
refusal_code(const char *code)
{
	static const char *const map[][2] = {
		{"2", "generic_decline"}, {"4", "processing_error"}, {"5", "blocked_card"},
		{"6", "expired_card"}, {"7", "invalid_card_details"}, {"9", "issuer_not_available"},
		{"12", "insufficient_funds"}, {"20", "fraudulent"}, {"27", "do_not_honor"},
	};

	if (code == NULL)
		return "generic_decline";
	for (int i = 0; i < lengthof(map); i++)
		if (strcmp(map[i][0], code) == 0)
			return map[i][1];
	return psprintf("adyen_refusal_%s", code);
}

/* add_amount appends "amount": {"currency", "value"}. */
static void
add_amount(StringInfo b, PspJob *job)
{
	appendStringInfoString(b, "\"amount\":{\"currency\":");
	escape_json(b, job->currency);
	appendStringInfo(b, ",\"value\":" INT64_FORMAT "}", job->amount_minor);
}

/* adyen_build builds the request of the job's current operation. */
static bool
adyen_build(PspJob *job, PspRequest *req)
{
	StringInfoData b;
	char	   *merchant = psp_cred(job, "merchant_account");
	char	   *key = psp_cred(job, "api_key");
	const char *op = job->cur_op;

	initStringInfo(&b);
	req->method = "POST";
	appendStringInfoString(&b, "{\"merchantAccount\":");
	escape_json(&b, merchant ? merchant : "");
	appendStringInfoString(&b, ",\"reference\":");
	escape_json(&b, job->reference);
	if (strcmp(op, "authorize") == 0)
	{
		req->url = psprintf("%s/v71/payments", job->base_url);
		appendStringInfoChar(&b, ',');
		add_amount(&b, job);
		appendStringInfoString(&b, ",\"paymentMethod\":{\"type\":\"scheme\",\"storedPaymentMethodId\":");
		escape_json(&b, job->method);
		appendStringInfoString(&b, "},\"additionalData\":{\"manualCapture\":\"true\"}");
		req->summary = psprintf("POST /v71/payments value=" INT64_FORMAT " currency=%s method=%s",
								job->amount_minor, job->currency, job->method);
	}
	else if (strcmp(op, "capture") == 0 || strcmp(op, "refund") == 0)
	{
		const char *what = strcmp(op, "capture") == 0 ? "captures" : "refunds";

		req->url = psprintf("%s/v71/payments/%s/%s", job->base_url, job->psp_reference, what);
		appendStringInfoChar(&b, ',');
		add_amount(&b, job);
		req->summary = psprintf("POST /v71/payments/%s/%s value=" INT64_FORMAT " currency=%s",
								job->psp_reference, what, job->amount_minor, job->currency);
	}
	else if (strcmp(op, "void") == 0)
	{
		req->url = psprintf("%s/v71/payments/%s/cancels", job->base_url, job->psp_reference);
		req->summary = psprintf("POST /v71/payments/%s/cancels", job->psp_reference);
	}
	else
	{
		psp_set_outcome(job, PSP_REJECTED, NULL, "operation not supported by the Adyen adapter");
		return false;
	}
	appendStringInfoChar(&b, '}');
	req->body = b.data;
	psp_add_header(req, "X-API-Key: %s", key ? key : "");
	psp_add_header(req, "Idempotency-Key: %s", current_key(job));
	psp_add_header(req, "Content-Type: application/json");
	return true;
}

/* adyen_handle reads Adyen's answer. */
static void
adyen_handle(PspJob *job, PspResponse *resp)
{
	const char *op = job->cur_op;

	if (strcmp(op, "authorize") == 0 && resp->status == 200 && resp->json != NULL)
	{
		char	   *result = psp_jstr(resp->json, "resultCode");

		job->result_reference = psp_jstr(resp->json, "pspReference");
		if (result && strcmp(result, "Authorised") == 0)
			psp_set_outcome(job, PSP_SUCCEEDED, resp, NULL);
		else if (result && (strcmp(result, "Refused") == 0 || strcmp(result, "Error") == 0))
		{
			const char *code = strcmp(result, "Error") == 0 ? "processing_error" :
				refusal_code(psp_jstr(resp->json, "refusalReasonCode"));

			job->decline_code = pstrdup(code);
			psp_set_outcome(job, psp_is_soft_decline(code) ? PSP_SOFT_DECLINE : PSP_HARD_DECLINE,
							resp, psp_jstr(resp->json, "refusalReason"));
		}
		else if (result && (strcmp(result, "Received") == 0 || strcmp(result, "Pending") == 0))
			psp_set_outcome(job, PSP_UNKNOWN, resp, psprintf("resultCode %s", result));
		else
			psp_set_outcome(job, PSP_HARD_DECLINE, resp,
							psprintf("resultCode %s", result ? result : "missing"));
		return;
	}
	if (strcmp(op, "authorize") != 0 && (resp->status == 200 || resp->status == 201) &&
		resp->json != NULL)
	{
		job->result_reference = psp_jstr(resp->json, "pspReference");
		psp_set_outcome(job, PSP_SUCCEEDED, resp, NULL);
		return;
	}
	if (resp->status == 422 && resp->json != NULL)
	{
		char	   *code = psp_jstr(resp->json, "errorCode");
		char	   *msg = psp_jstr(resp->json, "message");

		psp_set_outcome(job, (code && strcmp(code, "704") == 0) ? PSP_UNKNOWN : PSP_REJECTED, resp,
						psprintf("HTTP 422 errorCode %s: %s", code ? code : "?", msg ? msg : ""));
		return;
	}
	psp_transport_outcome(job, resp);
}

const PspAdapter psp_adyen_adapter = {"adyen", adyen_build, adyen_handle};
