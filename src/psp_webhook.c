/*-------------------------------------------------------------------------
 *
 * psp_webhook.c
 *	  Webhook signature checks for market.psp_webhook (the SQL side is
 *	  sql/0.2--0.3/20_webhooks.sql, and since 0.4, which folds every
 *	  payment event, sql/0.3--0.4/40_webhooks.sql): market.psp_hmac_verify(), an
 *	  HMAC-SHA256 computed with PostgreSQL's own common/hmac.c and compared
 *	  in constant time, and the setting market.psp_webhook_tolerance.
 *
 * The key is a secret of a PSP account: it is never logged, never put in
 * an error message, and the buffers that held it or the MAC are zeroed
 * before they are released.
 *
 * Locking: none; the function reads only its arguments.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "common/cryptohash.h"
#include "common/hmac.h"
#include "common/sha2.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/guc.h"

#include "market.h"

PG_FUNCTION_INFO_V1(market_psp_hmac_verify);

/* MK020 (0.1's code for a NULL or invalid argument) */
#define MK_HMAC_NULL			MAKE_SQLSTATE('M','K','0','2','0')

/* market.psp_webhook_tolerance: seconds a Stripe timestamp may be off */
static int	psp_webhook_tolerance_s = 300;

/*
 * market_psp_webhook_define_gucs declares market.psp_webhook_tolerance;
 * _PG_init calls it before the market prefix is reserved.
 */
void
market_psp_webhook_define_gucs(void)
{
	DefineCustomIntVariable("market.psp_webhook_tolerance",
							"Largest difference between a webhook's signed timestamp and now.",
							"A Stripe webhook whose t= is further from now than this is refused (MK077).",
							&psp_webhook_tolerance_s, 300, 1, 86400,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
}

/*
 * ct_equal compares two byte strings of the same length in time that
 * depends on the length only.
 */
static bool
ct_equal(const uint8 *a, const uint8 *b, size_t len)
{
	volatile uint8 diff = 0;
	size_t		i;

	for (i = 0; i < len; i++)
		diff |= a[i] ^ b[i];
	return diff == 0;
}

/*
 * market.psp_hmac_verify(key bytea, data bytea, mac bytea) → boolean:
 * true when mac is HMAC-SHA256(key, data).  A mac of another length is
 * false (its length is not secret); a NULL argument raises MK020.
 */
Datum
market_psp_hmac_verify(PG_FUNCTION_ARGS)
{
	bytea	   *key;
	bytea	   *data;
	bytea	   *mac;
	uint8		computed[PG_SHA256_DIGEST_LENGTH];
	pg_hmac_ctx *ctx;
	bool		ok;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(MK_HMAC_NULL),
				 errmsg("psp_hmac_verify arguments must not be null")));
	key = PG_GETARG_BYTEA_PP(0);
	data = PG_GETARG_BYTEA_PP(1);
	mac = PG_GETARG_BYTEA_PP(2);

	ctx = pg_hmac_create(PG_SHA256);
	if (ctx == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory")));
	if (pg_hmac_init(ctx, (const uint8 *) VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key)) < 0 ||
		pg_hmac_update(ctx, (const uint8 *) VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data)) < 0 ||
		pg_hmac_final(ctx, computed, sizeof(computed)) < 0)
	{
		const char *why = pg_hmac_error(ctx);

		pg_hmac_free(ctx);
		explicit_bzero(computed, sizeof(computed));
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute HMAC-SHA256: %s", why)));
	}
	pg_hmac_free(ctx);

	ok = VARSIZE_ANY_EXHDR(mac) == PG_SHA256_DIGEST_LENGTH &&
		ct_equal(computed, (const uint8 *) VARDATA_ANY(mac), PG_SHA256_DIGEST_LENGTH);
	explicit_bzero(computed, sizeof(computed));
	PG_RETURN_BOOL(ok);
}
