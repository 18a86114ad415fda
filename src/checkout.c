/*-------------------------------------------------------------------------
 *
 * checkout.c
 *	  Checkout: checkout_begin (reserve a cart and freeze its prices),
 *	  checkout_complete and buy_now (orders per seller, the sale, the
 *	  payment to authorize and its outbox row, in one transaction), the
 *	  idempotency keys that make those two safe to retry, their purge, and
 *	  the settings of this part.  The cart functions themselves are SQL
 *	  (sql/0.1--0.2/40_checkout.sql).
 *
 * Hot path: checkout_complete and buy_now run a handful of saved SPI plans.
 * checkout_complete: lock the checkout, claim the idempotency key, commit
 * the reservation through the reservation core (src/reservation.c), and one
 * statement whose data-modifying CTEs write the order group, the orders,
 * their lines, the payment, the outbox row, the stored response and the
 * checkout row.  buy_now is two steps: market_buy_now_prepare claims the
 * key, freezes prices and takes the units from their slots, free and on
 * hand in one UPDATE per slot (the slot engine, src/inventory.c);
 * market_buy_now_write then writes, for any number of prepared checkouts
 * at once, the sold reservations, the ledger's sale rows and everything
 * checkout_complete's statement writes.  The direct path writes one; the
 * batch worker (src/batch.c) a whole chunk.
 *
 * Locking (extends the protocol of market.h):
 *	cart row -> checkout row -> idempotency key -> reservation row -> slots.
 *	checkout_begin locks the cart row (FOR UPDATE), so begins of one cart
 *	are serialised, as are cart_set_item calls.  checkout_complete locks
 *	the checkout row first, so two completes of one checkout run one after
 *	the other; the second sees it completed.  The idempotency key is a
 *	unique index entry inserted at the start: a duplicate request waits on
 *	it until the first ends (then replays its stored response, or, if the
 *	first rolled back, runs afresh).  Nobody who holds a key waits for a
 *	cart or checkout row, so the order has no cycle.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "catalog/pg_type.h"
#include "common/cryptohash.h"
#include "common/int.h"
#include "common/sha2.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "market.h"

PG_FUNCTION_INFO_V1(market_checkout_begin);
PG_FUNCTION_INFO_V1(market_checkout_complete);
PG_FUNCTION_INFO_V1(market_buy_now);
PG_FUNCTION_INFO_V1(market_idempotency_purge);

/* MK022 (0.1's code for a bad currency code, raised in SQL there) */
#define MK_BAD_CURRENCY			MAKE_SQLSTATE('M','K','0','2','2')

#define MAX_KEY_CHARS			MARKET_MAX_KEY_CHARS
#define MAX_PAYMENT_FIELD_CHARS	MARKET_MAX_PAYMENT_CHARS
#define MAX_CUSTOMER_CHARS		MARKET_MAX_CUSTOMER_CHARS

/* GUC variables of this part (docs/checkout.md) */
static int	idempotency_retention_s = 86400;
static int	low_stock_threshold = 5;

/* what the payment document says */
typedef struct PaymentDoc
{
	char	   *method;			/* NULL when not given */
	char	   *psp;
} PaymentDoc;

/* the frozen lines of a checkout, one per SKU */
typedef struct FrozenLines
{
	int			n;
	Datum	   *sku_ids;
	Datum	   *qtys;
	Datum	   *prices;
	Datum	   *sellers;
	int64		total;
} FrozenLines;

/*
 * market_checkout_define_gucs declares this part's settings; _PG_init calls
 * it before the market prefix is reserved.
 */
void
market_checkout_define_gucs(void)
{
	DefineCustomIntVariable("market.idempotency_retention",
							"How long idempotency keys are kept at least.",
							"market.idempotency_purge() deletes keys older than this.",
							&idempotency_retention_s, 86400, 86400, INT_MAX,
							PGC_SUSET, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("market.low_stock_threshold",
							"Availability at or below which cart_view says \"only_n_left\".",
							NULL,
							&low_stock_threshold, 5, 0, 1000000000,
							PGC_USERSET, 0, NULL, NULL, NULL);
}

/* ---------------------------------------------------------------------------
 * argument checks
 * ---------------------------------------------------------------------------
 */

/* get_key returns the idempotency key argument, or raises MK020. */
static text *
get_key(FunctionCallInfo fcinfo, int argno)
{
	text	   *key;
	int			nchars;

	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("idempotency_key must not be null"),
				 errhint("Send a unique key per intended purchase, such as a UUID, and the same key on every retry.")));
	key = PG_GETARG_TEXT_PP(argno);
	nchars = pg_mbstrlen_with_len(VARDATA_ANY(key), VARSIZE_ANY_EXHDR(key));
	if (nchars < 1 || nchars > MAX_KEY_CHARS)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("invalid idempotency key"),
				 errdetail("The key has %d characters; a key has 1 to %d.", nchars, MAX_KEY_CHARS)));
	return key;
}

/* payment_field reads the string value of "method" or "psp". */
static char *
payment_field(JsonbValue *v, const char *key)
{
	int			nchars;

	if (v->type == jbvNull)
		return NULL;
	if (v->type != jbvString)
		ereport(ERROR,
				(errcode(MK_INVALID_DOCUMENT),
				 errmsg("invalid payment document"),
				 errdetail("\"%s\" is not a JSON string.", key)));
	nchars = pg_mbstrlen_with_len(v->val.string.val, v->val.string.len);
	if (nchars < 1 || nchars > MAX_PAYMENT_FIELD_CHARS)
		ereport(ERROR,
				(errcode(MK_INVALID_DOCUMENT),
				 errmsg("invalid payment document"),
				 errdetail("\"%s\" has %d characters; it has 1 to %d.", key, nchars,
						   MAX_PAYMENT_FIELD_CHARS)));
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/*
 * parse_payment reads {"method": "...", "psp": "..."} (both optional); any
 * other shape raises MK021, NULL MK020.
 */
static void
parse_payment(FunctionCallInfo fcinfo, int argno, PaymentDoc *doc)
{
	Jsonb	   *jb;
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;

	market_require_arg(fcinfo, argno, "payment");
	jb = PG_GETARG_JSONB_P(argno);
	doc->method = NULL;
	doc->psp = NULL;
	if (!JB_ROOT_IS_OBJECT(jb))
		ereport(ERROR,
				(errcode(MK_INVALID_DOCUMENT),
				 errmsg("invalid payment document"),
				 errdetail("payment must be a JSON object."),
				 errhint("Pass '{\"method\": \"card\", \"psp\": \"stripe\"}' or '{}'.")));
	it = JsonbIteratorInit(&jb->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		char	   *key;

		if (tok != WJB_KEY)
			continue;
		key = pnstrdup(v.val.string.val, v.val.string.len);
		tok = JsonbIteratorNext(&it, &v, true);
		if (strcmp(key, "method") == 0)
			doc->method = payment_field(&v, key);
		else if (strcmp(key, "psp") == 0)
			doc->psp = payment_field(&v, key);
		else
			ereport(ERROR,
					(errcode(MK_INVALID_DOCUMENT),
					 errmsg("invalid payment document"),
					 errdetail("The payment document has an unknown key \"%s\".", key),
					 errhint("The keys are \"method\" and \"psp\".")));
	}
}

/* ---------------------------------------------------------------------------
 * fingerprints and idempotency keys
 * ---------------------------------------------------------------------------
 */

/* fp_add appends one length-prefixed field (NULL allowed) to a fingerprint. */
static void
fp_add(StringInfo buf, const char *s)
{
	if (s == NULL)
		appendStringInfoString(buf, "-|");
	else
		appendStringInfo(buf, "%zu:%s|", strlen(s), s);
}

/* fingerprint returns the sha256 of the request text as a bytea. */
static bytea *
fingerprint(StringInfo request)
{
	pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
	bytea	   *out = palloc(VARHDRSZ + PG_SHA256_DIGEST_LENGTH);

	if (pg_cryptohash_init(ctx) < 0 ||
		pg_cryptohash_update(ctx, (uint8 *) request->data, request->len) < 0 ||
		pg_cryptohash_final(ctx, (uint8 *) VARDATA(out), PG_SHA256_DIGEST_LENGTH) < 0)
		elog(ERROR, "market: could not compute a request fingerprint");
	pg_cryptohash_free(ctx);
	SET_VARSIZE(out, VARHDRSZ + PG_SHA256_DIGEST_LENGTH);
	return out;
}

/*
 * claim_key inserts the (customer, key) row of a request.  If another
 * transaction is inserting the same key, the INSERT waits for it to end.
 * Returns true when the key is ours (the request runs); otherwise, when
 * the key was already used by the same request, sets *response to its
 * stored response (copied out of SPI); a different request raises MK004.
 * Caller is inside SPI.
 */
static bool
claim_key(text *customer, text *key, const char *operation, bytea *fp,
		  Datum *response)
{
	static SPIPlanPtr insert_plan = NULL;
	static SPIPlanPtr read_plan = NULL;
	Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, BYTEAOID};
	Datum		values[4];

	market_prepare(&insert_plan,
				   "INSERT INTO market.idempotency_keys (customer_id, key, operation, fingerprint)"
				   " VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id, key) DO NOTHING",
				   4, types);
	market_prepare(&read_plan,
				   "SELECT operation, fingerprint, response, created_at FROM market.idempotency_keys"
				   " WHERE customer_id = $1 AND key = $2",
				   2, types);
	values[0] = PointerGetDatum(customer);
	values[1] = PointerGetDatum(key);
	values[2] = CStringGetTextDatum(operation);
	values[3] = PointerGetDatum(fp);

	/* a key purged between our INSERT and SELECT is tried again */
	for (int attempt = 0; attempt < 3; attempt++)
	{
		HeapTuple	tup;
		TupleDesc	desc;
		bool		isnull;
		bytea	   *stored;
		Datum		resp;

		if (SPI_execute_plan(insert_plan, values, NULL, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "market: could not record the idempotency key");
		if (SPI_processed == 1)
			return true;

		if (SPI_execute_plan(read_plan, values, NULL, false, 1) != SPI_OK_SELECT)
			elog(ERROR, "market: could not read the idempotency key");
		if (SPI_processed == 0)
			continue;
		tup = SPI_tuptable->vals[0];
		desc = SPI_tuptable->tupdesc;
		stored = DatumGetByteaPP(SPI_getbinval(tup, desc, 2, &isnull));
		if (VARSIZE_ANY_EXHDR(stored) != PG_SHA256_DIGEST_LENGTH ||
			memcmp(VARDATA_ANY(stored), VARDATA_ANY(fp), PG_SHA256_DIGEST_LENGTH) != 0)
			ereport(ERROR,
					(errcode(MK_IDEMPOTENCY_MISMATCH),
					 errmsg("idempotency key reused with a different request"),
					 errdetail("Key \"%s\" of this customer was first used at %s for a different %s request.",
							   text_to_cstring(key),
							   SPI_getvalue(tup, desc, 4),
							   SPI_getvalue(tup, desc, 1)),
					 errhint("Use a new key for a new request; resend the same request to replay a key.")));
		resp = SPI_getbinval(tup, desc, 3, &isnull);
		if (isnull)				/* only possible within the transaction that claimed it */
			ereport(ERROR,
					(errcode(MK_IDEMPOTENCY_IN_USE),
					 errmsg("idempotency key in use"),
					 errdetail("Key \"%s\" is in use by a request that has not finished.",
							   text_to_cstring(key))));
		*response = SPI_datumTransfer(resp, false, -1);
		return false;
	}
	ereport(ERROR,
			(errcode(MK_IDEMPOTENCY_IN_USE),
			 errmsg("idempotency key in use"),
			 errdetail("Key \"%s\" kept changing while it was being claimed.", text_to_cstring(key)),
			 errhint("Retry the request.")));
	return false;				/* keep the compiler quiet */
}

/* ---------------------------------------------------------------------------
 * the orders statement
 * ---------------------------------------------------------------------------
 */

/*
 * The CTE that queues the 'payment.authorize' outbox row of each payment
 * written by CTE p, shared by both orders statements below.
 */
#define ORDERS_SQL_AUTHORIZE_JOBS \
	" ob AS (" \
	"  INSERT INTO market.outbox (topic, event_type, aggregate_type, aggregate_id, payload)" \
	"  SELECT 'psp', 'payment.authorize', 'payment', p.id," \
	"         jsonb_build_object('payment_id', p.id, 'group_id', p.group_id," \
	"                            'amount_minor', p.amount_minor, 'currency', p.currency," \
	"                            'method', p.method, 'psp', p.psp)" \
	"    FROM p ORDER BY p.id),"

/*
 * checkout_complete's statement that turns a sold reservation into orders
 * (buy_now has its own, for many checkouts at once, below).  Parameters:
 *	$1 checkout id, $2 customer, $3 currency, $4 total,
 *	$5/$6/$7 what was taken (sku, warehouse, qty; several rows per pair allowed),
 *	$8/$9/$10 frozen lines (sku, unit price, seller; one row per SKU),
 *	$11 payment method, $12 psp, $13 idempotency key,
 *	$14 cart id.
 * One order per seller, its lines per (sku, warehouse) at the frozen price,
 * one payment, one 'payment.authorize' outbox row, the stored response.
 */
#define ORDERS_SQL_HEAD \
	"WITH g AS (" \
	"  INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)" \
	"  VALUES ($1, $2, $3, $4) RETURNING id)," \
	" l AS (" \
	"  SELECT t.sku_id, t.warehouse_id, sum(t.qty)::int8 AS qty, f.unit_price, f.seller_id" \
	"    FROM unnest($5::int8[], $6::int4[], $7::int8[]) AS t(sku_id, warehouse_id, qty)" \
	"    JOIN unnest($8::int8[], $9::int8[], $10::int8[]) AS f(sku_id, unit_price, seller_id)" \
	"      ON f.sku_id = t.sku_id" \
	"   GROUP BY t.sku_id, t.warehouse_id, f.unit_price, f.seller_id)," \
	" o AS (" \
	"  INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)" \
	"  SELECT g.id, l.seller_id, $2, $3, sum(l.qty * l.unit_price)::int8" \
	"    FROM g, l GROUP BY g.id, l.seller_id ORDER BY l.seller_id" \
	"  RETURNING id, seller_id, subtotal_minor, status)," \
	" ol AS (" \
	"  INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)" \
	"  SELECT o.id, l.sku_id, l.warehouse_id, l.qty, l.unit_price" \
	"    FROM o JOIN l ON l.seller_id = o.seller_id)," \
	" p AS (" \
	"  INSERT INTO market.payments (group_id, customer_id, currency, amount_minor, method, psp)" \
	"  SELECT g.id, $2, $3, $4, $11, $12 FROM g" \
	"  RETURNING id, group_id, status, amount_minor, currency, method, psp)," \
	ORDERS_SQL_AUTHORIZE_JOBS \
	" r AS (" \
	"  SELECT g.id AS group_id, jsonb_build_object(" \
	"    'order_group', g.id," \
	"    'orders', (SELECT jsonb_agg(jsonb_build_object('order_id', o.id, 'seller_id', o.seller_id," \
	"                                'subtotal_minor', o.subtotal_minor, 'status', o.status)" \
	"                                ORDER BY o.seller_id) FROM o)," \
	"    'payment', jsonb_build_object('payment_id', p.id, 'status', p.status," \
	"                                  'amount_minor', p.amount_minor, 'currency', p.currency)) AS doc" \
	"    FROM g, p)," \
	" k AS (" \
	"  UPDATE market.idempotency_keys k SET response = r.doc FROM r" \
	"   WHERE k.customer_id = $2 AND k.key = $13),"

/* checkout_complete: the open checkout is completed, its cart emptied */
#define ORDERS_SQL_COMPLETE ORDERS_SQL_HEAD \
	" c AS (" \
	"  UPDATE market.checkouts c SET status = 'completed', group_id = r.group_id," \
	"         completed_at = now()" \
	"    FROM r WHERE c.id = $1)," \
	" ci AS (DELETE FROM market.cart_items WHERE cart_id = $14)" \
	" SELECT doc FROM r"

/* int4_array builds an int4[] of n datums. */
static Datum
int4_array(Datum *elems, int n)
{
	return PointerGetDatum(construct_array(elems, n, INT4OID, 4, true, TYPALIGN_INT));
}

/* int8_array builds an int8[] of n datums. */
static Datum
int8_array(Datum *elems, int n)
{
	return PointerGetDatum(construct_array(elems, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/*
 * write_orders runs checkout_complete's orders statement and returns the
 * response document (copied out of SPI).  Caller is inside SPI.
 */
static Datum
write_orders(pg_uuid_t *checkout_id, text *customer, text *currency,
			 FrozenLines *frozen, TakeList *takes, PaymentDoc *pay, text *key,
			 pg_uuid_t *cart_id)
{
	static SPIPlanPtr complete_plan = NULL;
	Oid			types[14] = {UUIDOID, TEXTOID, TEXTOID, INT8OID,
		INT8ARRAYOID, INT4ARRAYOID, INT8ARRAYOID,
		INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID,
		TEXTOID, TEXTOID, TEXTOID, UUIDOID};
	Datum		values[14];
	char		nulls[14] = "              ";
	Datum		take_arrays[4];
	SPIPlanPtr	plan;
	bool		isnull;
	Datum		doc;

	plan = market_prepare(&complete_plan, ORDERS_SQL_COMPLETE, 14, types);

	market_takes_to_arrays(takes->items, takes->count, take_arrays);
	values[0] = UUIDPGetDatum(checkout_id);
	values[1] = PointerGetDatum(customer);
	values[2] = PointerGetDatum(currency);
	values[3] = Int64GetDatum(frozen->total);
	values[4] = take_arrays[0];
	values[5] = take_arrays[1];
	values[6] = take_arrays[3];
	values[7] = int8_array(frozen->sku_ids, frozen->n);
	values[8] = int8_array(frozen->prices, frozen->n);
	values[9] = int8_array(frozen->sellers, frozen->n);
	values[10] = pay->method ? CStringGetTextDatum(pay->method) : (Datum) 0;
	nulls[10] = pay->method ? ' ' : 'n';
	values[11] = pay->psp ? CStringGetTextDatum(pay->psp) : (Datum) 0;
	nulls[11] = pay->psp ? ' ' : 'n';
	values[12] = PointerGetDatum(key);
	values[13] = cart_id ? UUIDPGetDatum(cart_id) : (Datum) 0;
	nulls[13] = cart_id ? ' ' : 'n';

	if (SPI_execute_plan(plan, values, nulls, false, 0) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "market: could not write the orders");
	doc = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		elog(ERROR, "market: the orders statement returned no response");
	return SPI_datumTransfer(doc, false, -1);
}

/* frozen_init allocates room for n frozen lines. */
static void
frozen_init(FrozenLines *f, int n)
{
	f->n = 0;
	f->total = 0;
	f->sku_ids = palloc(sizeof(Datum) * Max(n, 1));
	f->qtys = palloc(sizeof(Datum) * Max(n, 1));
	f->prices = palloc(sizeof(Datum) * Max(n, 1));
	f->sellers = palloc(sizeof(Datum) * Max(n, 1));
}

/* frozen_add appends a line and adds qty * price to the total (MK020 on overflow). */
static void
frozen_add(FrozenLines *f, int64 sku_id, int64 qty, int64 price, int64 seller_id)
{
	int64		line_total;

	if (pg_mul_s64_overflow(qty, price, &line_total) ||
		pg_add_s64_overflow(f->total, line_total, &f->total))
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("order total out of range"),
				 errdetail("The total of the lines does not fit in a bigint of minor units.")));
	f->sku_ids[f->n] = Int64GetDatum(sku_id);
	f->qtys[f->n] = Int64GetDatum(qty);
	f->prices[f->n] = Int64GetDatum(price);
	f->sellers[f->n] = Int64GetDatum(seller_id);
	f->n++;
}

/* uuid_cstring formats a uuid. */
static char *
uuid_cstring(pg_uuid_t *id)
{
	return DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(id)));
}

/* owner_for names the checkout in its reservation's owner column. */
static text *
owner_for(pg_uuid_t *checkout_id)
{
	return cstring_to_text(psprintf("checkout %s", uuid_cstring(checkout_id)));
}

/* int8_elems deconstructs an int8[] column datum. */
static Datum *
int8_elems(Datum arr, int *n)
{
	Datum	   *elems;

	deconstruct_array(DatumGetArrayTypeP(arr), INT8OID, 8, FLOAT8PASSBYVAL,
					  TYPALIGN_DOUBLE, &elems, NULL, n);
	return elems;
}

/* ---------------------------------------------------------------------------
 * checkout_begin
 * ---------------------------------------------------------------------------
 */

/* market.checkout_begin(cart uuid, ttl interval DEFAULT NULL) returns uuid */
Datum
market_checkout_begin(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr cart_plan = NULL;
	static SPIPlanPtr abandon_plan = NULL;
	static SPIPlanPtr items_plan = NULL;
	static SPIPlanPtr insert_plan = NULL;
	Oid			cart_types[2] = {UUIDOID, TIMESTAMPTZOID};
	Oid			insert_types[11] = {UUIDOID, UUIDOID, TEXTOID, TEXTOID, UUIDOID,
		INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8OID, TIMESTAMPTZOID};
	Datum		values[11];
	pg_uuid_t  *cart;
	pg_uuid_t  *checkout_id = palloc(sizeof(pg_uuid_t));
	pg_uuid_t	reservation_id;
	int64		ttl_usecs;
	TimestampTz expires_at;
	bool		isnull;
	text	   *customer;
	text	   *currency;
	char	   *cart_currency;
	int			n;
	ReserveLine *lines;
	FrozenLines frozen;

	market_require_arg(fcinfo, 0, "cart");
	cart = PG_GETARG_UUID_P(0);
	ttl_usecs = market_resolve_ttl(fcinfo, 1);

	SPI_connect();
	market_prepare(&cart_plan,
				   "SELECT ca.customer_id, ca.currency, co.id,"
				   "       coalesce(r.status = 'held' AND r.expires_at > $2, false)"
				   "  FROM market.carts ca"
				   "  LEFT JOIN market.checkouts co ON co.cart_id = ca.id AND co.status = 'open'"
				   "  LEFT JOIN market.reservations r ON r.id = co.reservation_id"
				   " WHERE ca.id = $1 FOR UPDATE OF ca",
				   2, cart_types);
	market_prepare(&abandon_plan,
				   "UPDATE market.checkouts SET status = 'abandoned' WHERE id = $1",
				   1, cart_types);
	market_prepare(&items_plan,
				   "SELECT i.sku_id, i.qty::int8, k.price_minor, k.currency, p.seller_id"
				   "  FROM market.cart_items i"
				   "  JOIN market.skus k ON k.id = i.sku_id"
				   "  JOIN market.products p ON p.id = k.product_id"
				   " WHERE i.cart_id = $1 ORDER BY i.sku_id",
				   1, cart_types);
	market_prepare(&insert_plan,
				   "INSERT INTO market.checkouts (id, cart_id, customer_id, currency, reservation_id,"
				   "  sku_ids, qtys, unit_prices, seller_ids, total_minor, expires_at)"
				   " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
				   11, insert_types);

	/* lock the cart; an open checkout whose reservation is live is the answer */
	values[0] = UUIDPGetDatum(cart);
	values[1] = TimestampTzGetDatum(GetCurrentTimestamp());
	if (SPI_execute_plan(cart_plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "market: could not read the cart");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(MK_UNKNOWN_CART),
				 errmsg("unknown cart"),
				 errdetail("No cart has id %s.", uuid_cstring(cart))));
	customer = DatumGetTextPP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	currency = DatumGetTextPP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	cart_currency = text_to_cstring(currency);
	{
		Datum		open_id = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull);

		if (!isnull)
		{
			bool		live = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
														  SPI_tuptable->tupdesc, 4, &isnull));

			if (live)
			{
				memcpy(checkout_id, DatumGetUUIDP(open_id), sizeof(pg_uuid_t));
				SPI_finish();
				PG_RETURN_UUID_P(checkout_id);
			}
			/* its reservation ran out (or was ended): the worker returns the units */
			values[0] = open_id;
			if (SPI_execute_plan(abandon_plan, values, NULL, false, 0) != SPI_OK_UPDATE)
				elog(ERROR, "market: could not abandon a checkout");
		}
	}

	/* the cart's lines at today's prices */
	values[0] = UUIDPGetDatum(cart);
	if (SPI_execute_plan(items_plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "market: could not read the cart's items");
	n = (int) SPI_processed;
	if (n == 0)
		ereport(ERROR,
				(errcode(MK_EMPTY_CART),
				 errmsg("empty cart"),
				 errdetail("Cart %s has no items.", uuid_cstring(cart)),
				 errhint("Add items with market.cart_set_item() first.")));
	if (n > market_max_reservation_lines)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("too many cart lines"),
				 errdetail("The cart has %d lines; the limit is %d.", n, market_max_reservation_lines),
				 errhint("See market.max_reservation_lines.")));
	lines = palloc0(sizeof(ReserveLine) * n);
	frozen_init(&frozen, n);
	for (int i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		int64		sku_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		int64		qty = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
		char	   *sku_currency = SPI_getvalue(tup, desc, 4);

		if (strcmp(sku_currency, cart_currency) != 0)
			ereport(ERROR,
					(errcode(MK_CURRENCY_MISMATCH),
					 errmsg("currency mismatch"),
					 errdetail("SKU %lld is priced in %s; the cart is in %s.",
							   (long long) sku_id, sku_currency, cart_currency)));
		if (qty > market_max_line_qty)
			ereport(ERROR,
					(errcode(MK_INVALID_ARGUMENT),
					 errmsg("invalid quantity"),
					 errdetail("The cart asks for %lld units of SKU %lld.", (long long) qty,
							   (long long) sku_id),
					 errhint("A quantity is a whole number from 1 to market.max_line_qty (%d).",
							 market_max_line_qty)));
		lines[i].sku_id = sku_id;
		lines[i].warehouse_id = 0;
		lines[i].qty = qty;
		frozen_add(&frozen, sku_id, qty,
				   DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull)),
				   DatumGetInt64(SPI_getbinval(tup, desc, 5, &isnull)));
	}

	/* one all-or-nothing reservation (MK001 names the short SKU) */
	market_generate_uuid7(checkout_id, GetCurrentTimestamp());
	market_reserve_lines(lines, n, ttl_usecs, owner_for(checkout_id),
						 &reservation_id, &expires_at, NULL);

	values[0] = UUIDPGetDatum(checkout_id);
	values[1] = UUIDPGetDatum(cart);
	values[2] = PointerGetDatum(customer);
	values[3] = PointerGetDatum(currency);
	values[4] = UUIDPGetDatum(&reservation_id);
	values[5] = int8_array(frozen.sku_ids, frozen.n);
	values[6] = int8_array(frozen.qtys, frozen.n);
	values[7] = int8_array(frozen.prices, frozen.n);
	values[8] = int8_array(frozen.sellers, frozen.n);
	values[9] = Int64GetDatum(frozen.total);
	values[10] = TimestampTzGetDatum(expires_at);
	if (SPI_execute_plan(insert_plan, values, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "market: could not record the checkout");
	SPI_finish();
	PG_RETURN_UUID_P(checkout_id);
}

/* ---------------------------------------------------------------------------
 * checkout_complete
 * ---------------------------------------------------------------------------
 */

/*
 * market.checkout_complete(checkout uuid, idempotency_key text,
 *							payment jsonb DEFAULT '{}', customer_id text DEFAULT NULL)
 * returns jsonb
 */
Datum
market_checkout_complete(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr lock_plan = NULL;
	Oid			types[1] = {UUIDOID};
	Datum		values[1];
	pg_uuid_t  *checkout_id;
	text	   *key;
	PaymentDoc	pay;
	HeapTuple	tup;
	TupleDesc	desc;
	bool		isnull;
	text	   *customer;
	text	   *currency;
	pg_uuid_t  *reservation_id;
	char	   *status;
	Datum		cart_datum;
	bool		cart_null;
	FrozenLines frozen;
	Datum	   *skus,
			   *prices,
			   *sellers;
	int			n;
	StringInfoData request;
	Datum		response;
	TakeList	takes = {0};

	market_require_arg(fcinfo, 0, "checkout");
	checkout_id = PG_GETARG_UUID_P(0);
	key = get_key(fcinfo, 1);
	parse_payment(fcinfo, 2, &pay);

	SPI_connect();
	market_prepare(&lock_plan,
				   "SELECT customer_id, currency, reservation_id, status, group_id, cart_id,"
				   "       sku_ids, unit_prices, seller_ids, total_minor"
				   "  FROM market.checkouts WHERE id = $1 FOR UPDATE",
				   1, types);
	values[0] = UUIDPGetDatum(checkout_id);
	if (SPI_execute_plan(lock_plan, values, NULL, false, 0) != SPI_OK_SELECT)
		elog(ERROR, "market: could not read the checkout");
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(MK_UNKNOWN_CHECKOUT),
				 errmsg("unknown checkout"),
				 errdetail("No checkout has id %s.", uuid_cstring(checkout_id))));
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	customer = DatumGetTextPP(SPI_getbinval(tup, desc, 1, &isnull));
	currency = DatumGetTextPP(SPI_getbinval(tup, desc, 2, &isnull));
	reservation_id = DatumGetUUIDP(SPI_getbinval(tup, desc, 3, &isnull));
	status = SPI_getvalue(tup, desc, 4);
	cart_datum = SPI_getbinval(tup, desc, 6, &cart_null);

	/* someone else's checkout: refused before its key space is looked at */
	if (!PG_ARGISNULL(3))
	{
		text	   *claimed = PG_GETARG_TEXT_PP(3);

		if (VARSIZE_ANY_EXHDR(claimed) != VARSIZE_ANY_EXHDR(customer) ||
			memcmp(VARDATA_ANY(claimed), VARDATA_ANY(customer), VARSIZE_ANY_EXHDR(customer)) != 0)
			ereport(ERROR,
					(errcode(MK_NOT_YOUR_CHECKOUT),
					 errmsg("not your checkout"),
					 errdetail("Checkout %s belongs to another customer.", uuid_cstring(checkout_id))));
	}

	/* a request seen before is answered from the key */
	initStringInfo(&request);
	fp_add(&request, "checkout_complete");
	fp_add(&request, uuid_cstring(checkout_id));
	fp_add(&request, pay.method);
	fp_add(&request, pay.psp);
	if (!claim_key(customer, key, "checkout_complete", fingerprint(&request), &response))
	{
		SPI_finish();
		PG_RETURN_DATUM(response);
	}

	if (strcmp(status, "completed") == 0)
		ereport(ERROR,
				(errcode(MK_CHECKOUT_NOT_OPEN),
				 errmsg("checkout not open"),
				 errdetail("Checkout %s is already completed: order group %s.",
						   uuid_cstring(checkout_id), SPI_getvalue(tup, desc, 5)),
				 errhint("Resend the request with the idempotency key that completed it to get its result.")));
	if (strcmp(status, "open") != 0)
		ereport(ERROR,
				(errcode(MK_CHECKOUT_NOT_OPEN),
				 errmsg("checkout not open"),
				 errdetail("Checkout %s was %s: its cart changed, or it expired and a new checkout began.",
						   uuid_cstring(checkout_id), status),
				 errhint("Begin a new checkout.")));

	/* the frozen lines */
	skus = int8_elems(SPI_getbinval(tup, desc, 7, &isnull), &n);
	prices = int8_elems(SPI_getbinval(tup, desc, 8, &isnull), &n);
	sellers = int8_elems(SPI_getbinval(tup, desc, 9, &isnull), &n);
	frozen.n = n;
	frozen.sku_ids = skus;
	frozen.prices = prices;
	frozen.sellers = sellers;
	frozen.qtys = NULL;
	frozen.total = DatumGetInt64(SPI_getbinval(tup, desc, 10, &isnull));

	/* the sale: fails, changing nothing, once the reservation is not live */
	if (!market_commit_reservation(reservation_id, &takes))
		ereport(ERROR,
				(errcode(MK_RESERVATION_NOT_LIVE),
				 errmsg("checkout has expired"),
				 errdetail("The reservation of checkout %s is no longer held: its time ran out.",
						   uuid_cstring(checkout_id)),
				 errhint("Begin a new checkout.")));

	response = write_orders(checkout_id, customer, currency, &frozen, &takes, &pay, key,
							cart_null ? NULL : DatumGetUUIDP(cart_datum));
	SPI_finish();
	PG_RETURN_DATUM(response);
}

/* ---------------------------------------------------------------------------
 * buy_now
 * ---------------------------------------------------------------------------
 */

/*
 * market.buy_now(customer_id text, items jsonb, idempotency_key text,
 *				  payment jsonb DEFAULT '{}', currency text DEFAULT 'USD')
 * returns jsonb
 */
Datum
market_buy_now(PG_FUNCTION_ARGS)
{
	MarketBuyNow req;
	char	   *currency_str;
	int			nchars;
	StringInfoData request;
	PaymentDoc	pay;
	Datum		response;

	/* arguments, all checked before anything is written */
	market_require_arg(fcinfo, 0, "customer_id");
	req.customer = PG_GETARG_TEXT_PP(0);
	nchars = pg_mbstrlen_with_len(VARDATA_ANY(req.customer), VARSIZE_ANY_EXHDR(req.customer));
	if (nchars < 1 || nchars > MAX_CUSTOMER_CHARS)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("invalid customer id"),
				 errdetail("A customer id is 1 to %d characters.", MAX_CUSTOMER_CHARS)));
	market_require_arg(fcinfo, 1, "items");
	req.lines = market_parse_items(PG_GETARG_JSONB_P(1), &req.nlines);
	req.key = get_key(fcinfo, 2);
	parse_payment(fcinfo, 3, &pay);
	req.method = pay.method;
	req.psp = pay.psp;
	req.key_claimed = false;
	req.prices = NULL;
	req.currency = NULL;
	if (PG_ARGISNULL(4))
		currency_str = "NULL";
	else
	{
		req.currency = PG_GETARG_TEXT_PP(4);
		currency_str = text_to_cstring(req.currency);
	}
	if (PG_ARGISNULL(4) || strlen(currency_str) != 3 ||
		strspn(currency_str, "ABCDEFGHIJKLMNOPQRSTUVWXYZ") != 3)
		ereport(ERROR,
				(errcode(MK_BAD_CURRENCY),
				 errmsg("invalid currency code"),
				 errdetail("\"%s\" is not an ISO 4217 code.", currency_str),
				 errhint("Use three upper-case letters, such as USD or EUR.")));

	/* the request, as the key remembers it: lines are sorted and summed */
	initStringInfo(&request);
	fp_add(&request, "buy_now");
	fp_add(&request, currency_str);
	for (int i = 0; i < req.nlines; i++)
		appendStringInfo(&request, "%lld/%d/%lld;", (long long) req.lines[i].sku_id,
						 req.lines[i].warehouse_id, (long long) req.lines[i].qty);
	appendStringInfoChar(&request, '|');
	fp_add(&request, pay.method);
	fp_add(&request, pay.psp);
	req.fingerprint = fingerprint(&request);

	/* a flash-sale setting: the batch worker applies it with others */
	if (market_batch_try_buy_now(&req, &response))
		PG_RETURN_DATUM(response);
	PG_RETURN_DATUM(market_buy_now_apply(&req));
}

/*
 * buy_now's orders statement, for n checkouts at once (the batch worker
 * writes a whole chunk of checkouts with it; the direct path passes one).
 * Parameters, one element per checkout, numbered idx = 0 .. n-1:
 *	$1 idx, $2 checkout id, $3 customer, $4 currency, $5 total,
 *	$6 payment method, $7 psp, $8 idempotency key, $9 reservation id;
 * what was taken from the slots (already off hand), one element
 * per take: $10 idx, $11 sku, $12 warehouse, $13 qty, $19 slot (several
 * per slot allowed); the frozen lines, one element per (checkout, SKU) in
 * SKU order: $14 idx, $15 sku, $16 unit price, $17 seller, $18 qty.
 * Per checkout: the reservation, recorded committed; a sale row per
 * (sku, warehouse) in the ledger; one order per seller, its lines per
 * (sku, warehouse) at the frozen price, one payment, one
 * 'payment.authorize' outbox row, the checkout row written completed and
 * the stored response.  Returns (idx, response) per checkout.  Rows are
 * inserted in idx order, so a checkout's ids and outbox rows come in the
 * order the checkouts were applied.
 */
#define ORDERS_SQL_MANY \
	"WITH c AS (" \
	"  SELECT * FROM unnest($1::int4[], $2::uuid[], $3::text[], $4::text[], $5::int8[]," \
	"                       $6::text[], $7::text[], $8::text[], $9::uuid[])" \
	"    AS c(idx, checkout_id, customer_id, currency, total, method, psp, key, reservation_id))," \
	" g AS (" \
	"  INSERT INTO market.order_groups (checkout_id, customer_id, currency, total_minor)" \
	"  SELECT c.checkout_id, c.customer_id, c.currency, c.total FROM c ORDER BY c.idx" \
	"  RETURNING id, checkout_id)," \
	" gc AS (SELECT c.*, g.id AS group_id FROM c JOIN g ON g.checkout_id = c.checkout_id)," \
	" t AS (" \
	"  SELECT t.idx, t.sku_id, t.warehouse_id, t.slot, sum(t.qty)::int8 AS qty" \
	"    FROM unnest($10::int4[], $11::int8[], $12::int4[], $19::int4[], $13::int8[])" \
	"      AS t(idx, sku_id, warehouse_id, slot, qty)" \
	"   GROUP BY t.idx, t.sku_id, t.warehouse_id, t.slot)," \
	" rs AS (" \
	"  INSERT INTO market.reservations (id, owner, status, created_at, expires_at," \
	"         sku_ids, warehouse_ids, slots, qtys, finished_at)" \
	"  SELECT c.reservation_id, 'checkout ' || c.checkout_id, 'committed', x.at, x.at," \
	"         tr.sku_ids, tr.warehouse_ids, tr.slots, tr.qtys, x.at" \
	"    FROM c CROSS JOIN (SELECT clock_timestamp() AS at) x" \
	"    JOIN (SELECT t.idx, array_agg(t.sku_id ORDER BY t.sku_id, t.warehouse_id, t.slot) AS sku_ids," \
	"                 array_agg(t.warehouse_id ORDER BY t.sku_id, t.warehouse_id, t.slot) AS warehouse_ids," \
	"                 array_agg(t.slot ORDER BY t.sku_id, t.warehouse_id, t.slot) AS slots," \
	"                 array_agg(t.qty ORDER BY t.sku_id, t.warehouse_id, t.slot) AS qtys" \
	"            FROM t GROUP BY t.idx) tr ON tr.idx = c.idx" \
	"   ORDER BY c.idx)," \
	" led AS (" \
	"  INSERT INTO market.stock_ledger (sku_id, warehouse_id, delta, kind, reservation_id)" \
	"  SELECT t.sku_id, t.warehouse_id, -sum(t.qty)::int8, 'sale', c.reservation_id" \
	"    FROM t JOIN c ON c.idx = t.idx" \
	"   GROUP BY c.idx, c.reservation_id, t.sku_id, t.warehouse_id" \
	"   ORDER BY c.idx, t.sku_id, t.warehouse_id)," \
	" f AS (" \
	"  SELECT * FROM unnest($14::int4[], $15::int8[], $16::int8[], $17::int8[], $18::int8[])" \
	"    WITH ORDINALITY AS f(idx, sku_id, unit_price, seller_id, qty, n))," \
	" l AS (" \
	"  SELECT t.idx, t.sku_id, t.warehouse_id, sum(t.qty)::int8 AS qty, f.unit_price, f.seller_id" \
	"    FROM t JOIN f ON f.idx = t.idx AND f.sku_id = t.sku_id" \
	"   GROUP BY t.idx, t.sku_id, t.warehouse_id, f.unit_price, f.seller_id)," \
	" o AS (" \
	"  INSERT INTO market.orders (group_id, seller_id, customer_id, currency, subtotal_minor)" \
	"  SELECT gc.group_id, l.seller_id, gc.customer_id, gc.currency, sum(l.qty * l.unit_price)::int8" \
	"    FROM gc JOIN l ON l.idx = gc.idx" \
	"   GROUP BY gc.idx, gc.group_id, gc.customer_id, gc.currency, l.seller_id" \
	"   ORDER BY gc.idx, l.seller_id" \
	"  RETURNING id, group_id, seller_id, subtotal_minor, status)," \
	" ol AS (" \
	"  INSERT INTO market.order_lines (order_id, sku_id, warehouse_id, qty, unit_price_minor)" \
	"  SELECT o.id, l.sku_id, l.warehouse_id, l.qty, l.unit_price" \
	"    FROM o JOIN gc ON gc.group_id = o.group_id" \
	"    JOIN l ON l.idx = gc.idx AND l.seller_id = o.seller_id)," \
	" p AS (" \
	"  INSERT INTO market.payments (group_id, customer_id, currency, amount_minor, method, psp)" \
	"  SELECT gc.group_id, gc.customer_id, gc.currency, gc.total, gc.method, gc.psp" \
	"    FROM gc ORDER BY gc.idx" \
	"  RETURNING id, group_id, status, amount_minor, currency, method, psp)," \
	ORDERS_SQL_AUTHORIZE_JOBS \
	" oa AS (" \
	"  SELECT o.group_id, jsonb_agg(jsonb_build_object('order_id', o.id, 'seller_id', o.seller_id," \
	"                               'subtotal_minor', o.subtotal_minor, 'status', o.status)" \
	"                               ORDER BY o.seller_id) AS orders" \
	"    FROM o GROUP BY o.group_id)," \
	" r AS (" \
	"  SELECT gc.idx, gc.group_id, gc.customer_id, gc.key, jsonb_build_object(" \
	"    'order_group', gc.group_id," \
	"    'orders', oa.orders," \
	"    'payment', jsonb_build_object('payment_id', p.id, 'status', p.status," \
	"                                  'amount_minor', p.amount_minor, 'currency', p.currency)) AS doc" \
	"    FROM gc JOIN p ON p.group_id = gc.group_id JOIN oa ON oa.group_id = gc.group_id)," \
	" k AS (" \
	"  UPDATE market.idempotency_keys k SET response = r.doc FROM r" \
	"   WHERE k.customer_id = r.customer_id AND k.key = r.key)," \
	" ck AS (" \
	"  INSERT INTO market.checkouts (id, cart_id, customer_id, currency, reservation_id, status," \
	"         sku_ids, qtys, unit_prices, seller_ids, total_minor, expires_at, completed_at, group_id)" \
	"  SELECT gc.checkout_id, NULL, gc.customer_id, gc.currency, gc.reservation_id, 'completed'," \
	"         fa.sku_ids, fa.qtys, fa.unit_prices, fa.seller_ids, gc.total, now(), now(), gc.group_id" \
	"    FROM gc JOIN (SELECT f.idx, array_agg(f.sku_id ORDER BY f.n) AS sku_ids," \
	"                         array_agg(f.qty ORDER BY f.n) AS qtys," \
	"                         array_agg(f.unit_price ORDER BY f.n) AS unit_prices," \
	"                         array_agg(f.seller_id ORDER BY f.n) AS seller_ids" \
	"                    FROM f GROUP BY f.idx) fa ON fa.idx = gc.idx" \
	"   ORDER BY gc.idx)" \
	" SELECT r.idx, r.doc FROM r ORDER BY r.idx"

/* the price, currency and seller of SKUs $1 (bigint[]), in SKU order */
#define SKUS_SQL \
	"SELECT k.id, k.price_minor, k.currency, p.seller_id" \
	"  FROM market.skus k JOIN market.products p ON p.id = k.product_id" \
	" WHERE k.id = ANY ($1) ORDER BY k.id"

/* one SKU of a price book (market_price_book) */
typedef struct PriceEntry
{
	int64		sku_id;			/* hash key */
	int64		price_minor;
	int64		seller_id;
	char		currency[4];
} PriceEntry;

/* what a prepared buy_now leaves for market_buy_now_write */
struct MarketBuyNowPending
{
	MarketBuyNow *req;
	pg_uuid_t	checkout_id;
	pg_uuid_t	reservation_id;
	FrozenLines frozen;
	SlotTake   *takes;
	int			ntakes;
};

/*
 * freeze_sku checks that a SKU of a buy_now is priced in the purchase's
 * currency (MK026 otherwise) and freezes its price, seller and the
 * quantity of all its lines.
 */
static void
freeze_sku(FrozenLines *frozen, MarketBuyNow *req, int64 sku_id, int64 price,
		   const char *sku_currency, int64 seller_id)
{
	const char *currency = VARDATA_ANY(req->currency);
	int64		qty = 0;

	if (VARSIZE_ANY_EXHDR(req->currency) != strlen(sku_currency) ||
		memcmp(currency, sku_currency, strlen(sku_currency)) != 0)
		ereport(ERROR,
				(errcode(MK_CURRENCY_MISMATCH),
				 errmsg("currency mismatch"),
				 errdetail("SKU %lld is priced in %s; the purchase is in %s.",
						   (long long) sku_id, sku_currency, text_to_cstring(req->currency)),
				 errhint("Buy SKUs of one currency at a time, and pass it as currency.")));
	for (int i = 0; i < req->nlines; i++)
		if (req->lines[i].sku_id == sku_id)
			qty += req->lines[i].qty;
	frozen_add(frozen, sku_id, qty, price, seller_id);
}

/*
 * market_buy_now_prepare runs the first part of a validated buy_now:
 * claims the key, freezes prices and sellers, reserves and sells the
 * lines.  On a replay it returns false with the stored response; otherwise
 * true with what market_buy_now_write needs in *pending.  Both are
 * allocated in the caller's memory context.
 */
bool
market_buy_now_prepare(MarketBuyNow *req, MarketBuyNowPending **pending_out, Datum *response)
{
	static SPIPlanPtr skus_plan = NULL;
	Oid			types[1] = {INT8ARRAYOID};
	Datum		values[1];
	MemoryContext caller = CurrentMemoryContext;
	ReserveLine *lines = req->lines;
	int			nlines = req->nlines;
	int			nskus = 0;
	Datum	   *sku_list;
	MarketBuyNowPending *pending = palloc0(sizeof(MarketBuyNowPending));
	TakeList	takes = {0};
	int			row = 0;

	takes.sell = true;			/* the slot UPDATEs take the units off hand */
	pending->req = req;
	frozen_init(&pending->frozen, nlines);

	/* the distinct SKUs (lines are sorted by SKU) */
	sku_list = palloc(sizeof(Datum) * nlines);
	for (int i = 0; i < nlines; i++)
		if (i == 0 || lines[i].sku_id != lines[i - 1].sku_id)
			sku_list[nskus++] = Int64GetDatum(lines[i].sku_id);

	SPI_connect();
	if (!req->key_claimed &&
		!claim_key(req->customer, req->key, "buy_now", req->fingerprint, response))
	{
		SPI_finish();
		return false;
	}

	/*
	 * Prices and sellers, frozen: from the price book the batch worker read
	 * at the start of the chunk when it has every SKU, else read now (which
	 * also names an unknown SKU).
	 */
	for (int s = 0; s < nskus && req->prices != NULL; s++)
	{
		int64		sku_id = DatumGetInt64(sku_list[s]);
		PriceEntry *e = hash_search(req->prices, &sku_id, HASH_FIND, NULL);

		if (e == NULL)
		{
			pending->frozen.n = 0;
			pending->frozen.total = 0;
			break;
		}
		freeze_sku(&pending->frozen, req, sku_id, e->price_minor, e->currency, e->seller_id);
	}
	if (pending->frozen.n < nskus)
	{
		market_prepare(&skus_plan, SKUS_SQL, 1, types);
		values[0] = int8_array(sku_list, nskus);
		if (SPI_execute_plan(skus_plan, values, NULL, false, 0) != SPI_OK_SELECT)
			elog(ERROR, "market: could not read the SKUs");
		for (int s = 0; s < nskus; s++)
		{
			int64		sku_id = DatumGetInt64(sku_list[s]);
			bool		isnull;
			HeapTuple	tup;
			TupleDesc	desc = SPI_tuptable->tupdesc;

			if (row >= (int) SPI_processed ||
				DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[row], desc, 1, &isnull)) != sku_id)
				ereport(ERROR,
						(errcode(MK_UNKNOWN_SKU),
						 errmsg("unknown sku"),
						 errdetail("No SKU has id %lld.", (long long) sku_id)));
			tup = SPI_tuptable->vals[row++];
			freeze_sku(&pending->frozen, req, sku_id,
					   DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull)),
					   SPI_getvalue(tup, desc, 3),
					   DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull)));
		}
	}

	/* the units, taken from their slots; the write sells them */
	for (int i = 0; i < nlines; i++)
		market_take_line(&lines[i], &takes);
	market_generate_uuid7(&pending->checkout_id, GetCurrentTimestamp());
	market_generate_uuid7(&pending->reservation_id, GetCurrentTimestamp());
	pending->takes = MemoryContextAlloc(caller, sizeof(SlotTake) * Max(takes.count, 1));
	memcpy(pending->takes, takes.items, sizeof(SlotTake) * takes.count);
	pending->ntakes = takes.count;
	SPI_finish();
	*pending_out = pending;
	return true;
}

/* text_array builds a text[] of n datums, NULL where isnull says so. */
static Datum
text_array(Datum *elems, bool *isnull, int n)
{
	int			dims[1] = {n};
	int			lbs[1] = {1};

	return PointerGetDatum(construct_md_array(elems, isnull, 1, dims, lbs,
											  TEXTOID, -1, false, TYPALIGN_INT));
}

/*
 * market_buy_now_write writes the orders of n prepared checkouts in one
 * statement and puts each one's response document in responses[i], in the
 * caller's memory context.  All are made by the current user: a caller
 * with checkouts of several users calls it once per user.
 */
void
market_buy_now_write(MarketBuyNowPending **pending, int n, Datum *responses)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[19] = {INT4ARRAYOID, UUIDARRAYOID, TEXTARRAYOID, TEXTARRAYOID, INT8ARRAYOID,
		TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID, UUIDARRAYOID,
		INT4ARRAYOID, INT8ARRAYOID, INT4ARRAYOID, INT8ARRAYOID,
		INT4ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID, INT4ARRAYOID};
	Datum		values[19];
	Datum	   *idx = palloc(sizeof(Datum) * n);
	Datum	   *checkout = palloc(sizeof(Datum) * n);
	Datum	   *customer = palloc(sizeof(Datum) * n);
	Datum	   *currency = palloc(sizeof(Datum) * n);
	Datum	   *total = palloc(sizeof(Datum) * n);
	Datum	   *method = palloc(sizeof(Datum) * n);
	bool	   *method_null = palloc(sizeof(bool) * n);
	Datum	   *psp = palloc(sizeof(Datum) * n);
	bool	   *psp_null = palloc(sizeof(bool) * n);
	Datum	   *key = palloc(sizeof(Datum) * n);
	Datum	   *reservation = palloc(sizeof(Datum) * n);
	int			ntakes = 0;
	int			nfrozen = 0;
	Datum	   *t_idx, *t_sku, *t_wh, *t_qty, *t_slot;
	Datum	   *f_idx, *f_sku, *f_price, *f_seller, *f_qty;
	int			nt = 0;
	int			nf = 0;

	for (int i = 0; i < n; i++)
	{
		ntakes += pending[i]->ntakes;
		nfrozen += pending[i]->frozen.n;
	}
	t_idx = palloc(sizeof(Datum) * Max(ntakes, 1));
	t_sku = palloc(sizeof(Datum) * Max(ntakes, 1));
	t_wh = palloc(sizeof(Datum) * Max(ntakes, 1));
	t_qty = palloc(sizeof(Datum) * Max(ntakes, 1));
	t_slot = palloc(sizeof(Datum) * Max(ntakes, 1));
	f_idx = palloc(sizeof(Datum) * Max(nfrozen, 1));
	f_sku = palloc(sizeof(Datum) * Max(nfrozen, 1));
	f_price = palloc(sizeof(Datum) * Max(nfrozen, 1));
	f_seller = palloc(sizeof(Datum) * Max(nfrozen, 1));
	f_qty = palloc(sizeof(Datum) * Max(nfrozen, 1));

	for (int i = 0; i < n; i++)
	{
		MarketBuyNowPending *p = pending[i];
		MarketBuyNow *req = p->req;

		idx[i] = Int32GetDatum(i);
		checkout[i] = UUIDPGetDatum(&p->checkout_id);
		customer[i] = PointerGetDatum(req->customer);
		currency[i] = PointerGetDatum(req->currency);
		total[i] = Int64GetDatum(p->frozen.total);
		method_null[i] = req->method == NULL;
		method[i] = req->method ? CStringGetTextDatum(req->method) : (Datum) 0;
		psp_null[i] = req->psp == NULL;
		psp[i] = req->psp ? CStringGetTextDatum(req->psp) : (Datum) 0;
		key[i] = PointerGetDatum(req->key);
		reservation[i] = UUIDPGetDatum(&p->reservation_id);
		for (int t = 0; t < p->ntakes; t++, nt++)
		{
			t_idx[nt] = Int32GetDatum(i);
			t_sku[nt] = Int64GetDatum(p->takes[t].sku_id);
			t_wh[nt] = Int32GetDatum(p->takes[t].warehouse_id);
			t_qty[nt] = Int64GetDatum(p->takes[t].qty);
			t_slot[nt] = Int32GetDatum(p->takes[t].slot);
		}
		for (int f = 0; f < p->frozen.n; f++, nf++)
		{
			f_idx[nf] = Int32GetDatum(i);
			f_sku[nf] = p->frozen.sku_ids[f];
			f_price[nf] = p->frozen.prices[f];
			f_seller[nf] = p->frozen.sellers[f];
			f_qty[nf] = p->frozen.qtys[f];
		}
	}

	values[0] = int4_array(idx, n);
	values[1] = PointerGetDatum(construct_array(checkout, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[2] = text_array(customer, NULL, n);
	values[3] = text_array(currency, NULL, n);
	values[4] = int8_array(total, n);
	values[5] = text_array(method, method_null, n);
	values[6] = text_array(psp, psp_null, n);
	values[7] = text_array(key, NULL, n);
	values[8] = PointerGetDatum(construct_array(reservation, n, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	values[9] = int4_array(t_idx, nt);
	values[10] = int8_array(t_sku, nt);
	values[11] = int4_array(t_wh, nt);
	values[12] = int8_array(t_qty, nt);
	values[13] = int4_array(f_idx, nf);
	values[14] = int8_array(f_sku, nf);
	values[15] = int8_array(f_price, nf);
	values[16] = int8_array(f_seller, nf);
	values[17] = int8_array(f_qty, nf);
	values[18] = int4_array(t_slot, nt);

	SPI_connect();
	market_prepare(&plan, ORDERS_SQL_MANY, 19, types);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_SELECT || SPI_processed != (uint64) n)
		elog(ERROR, "market: could not write the orders of %d checkouts", n);
	for (int i = 0; i < n; i++)
	{
		bool		isnull;
		int32		k = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull));
		Datum		doc = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull);

		if (k != i || isnull)
			elog(ERROR, "market: the orders statement returned no response for checkout %d", i);
		responses[i] = SPI_datumTransfer(doc, false, -1);
	}
	SPI_finish();
}

/*
 * market_buy_now_apply runs a validated buy_now: prepares it (key, prices,
 * stock) and writes its orders.  Returns the response document in the
 * caller's memory context.  Used by market.buy_now() and by the batch
 * worker when it applies a checkout on its own.
 */
Datum
market_buy_now_apply(MarketBuyNow *req)
{
	MarketBuyNowPending *pending;
	Datum		response;

	if (market_buy_now_prepare(req, &pending, &response))
		market_buy_now_write(&pending, 1, &response);
	return response;
}

/* ---------------------------------------------------------------------------
 * chunks: what the batch worker does once for many checkouts
 * ---------------------------------------------------------------------------
 */

/*
 * market_price_book reads the price, currency and seller of every SKU the
 * n requests buy, in one statement, and returns them as a hash table keyed
 * by SKU id, allocated in cxt.  A SKU that does not exist is simply not in
 * it (market_buy_now_prepare then reads the request's SKUs itself and
 * names it).  Caller is inside SPI.
 */
HTAB *
market_price_book(MarketBuyNow **reqs, int n, MemoryContext cxt)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {INT8ARRAYOID};
	Datum		values[1];
	HASHCTL		ctl;
	HTAB	   *book;
	Datum	   *skus;
	int			nskus = 0;
	int			total = 0;

	for (int r = 0; r < n; r++)
		total += reqs[r]->nlines;
	skus = palloc(sizeof(Datum) * Max(total, 1));
	for (int r = 0; r < n; r++)
		for (int i = 0; i < reqs[r]->nlines; i++)
			skus[nskus++] = Int64GetDatum(reqs[r]->lines[i].sku_id);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(int64);
	ctl.entrysize = sizeof(PriceEntry);
	ctl.hcxt = cxt;
	book = hash_create("market price book", Max(nskus, 16), &ctl,
					   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	market_prepare(&plan, SKUS_SQL, 1, types);
	values[0] = int8_array(skus, nskus);
	if (SPI_execute_plan(plan, values, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "market: could not read the SKUs of a chunk");
	for (uint64 row = 0; row < SPI_processed; row++)
	{
		HeapTuple	tup = SPI_tuptable->vals[row];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int64		sku_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		PriceEntry *e = hash_search(book, &sku_id, HASH_ENTER, NULL);

		e->price_minor = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
		e->seller_id = DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
		/* three letters: skus.currency has CHECK (currency ~ '^[A-Z]{3}$') */
		strlcpy(e->currency, SPI_getvalue(tup, desc, 3), sizeof(e->currency));
	}
	return book;
}

/* customer_key_arrays builds the text[] of the customers and of the keys of n requests. */
static void
customer_key_arrays(MarketBuyNow **reqs, int n, Datum *customers, Datum *keys)
{
	Datum	   *c = palloc(sizeof(Datum) * Max(n, 1));
	Datum	   *k = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
	{
		c[i] = PointerGetDatum(reqs[i]->customer);
		k[i] = PointerGetDatum(reqs[i]->key);
	}
	*customers = text_array(c, NULL, n);
	*keys = text_array(k, NULL, n);
}

/* same_text says whether two text datums hold the same bytes. */
static bool
same_text(text *a, text *b)
{
	return VARSIZE_ANY_EXHDR(a) == VARSIZE_ANY_EXHDR(b) &&
		memcmp(VARDATA_ANY(a), VARDATA_ANY(b), VARSIZE_ANY_EXHDR(a)) == 0;
}

/*
 * market_claim_keys inserts the idempotency keys of n buy_now requests with
 * one statement and sets key_claimed on each request whose key it
 * inserted; a key that exists already is left alone, for claim_key to
 * replay or refuse.  The (customer, key) pairs must be distinct.  Keys are
 * inserted in (customer, key) order.  Like claim_key's INSERT, it waits for
 * an unfinished transaction that inserted one of the keys, so the batch
 * worker runs it in a subtransaction under its lock_timeout and, if it
 * fails, claims every key one by one instead.  Whoever then fails after
 * its key was claimed here must give the key back (market_release_keys).
 * Caller is inside SPI.
 */
void
market_claim_keys(MarketBuyNow **reqs, int n)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[3] = {TEXTARRAYOID, TEXTARRAYOID, BYTEAARRAYOID};
	Datum		values[3];
	Datum	   *fps = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *claimed = palloc0(sizeof(bool) * Max(n, 1));

	market_prepare(&plan,
				   "INSERT INTO market.idempotency_keys (customer_id, key, operation, fingerprint)"
				   " SELECT u.customer_id, u.key, 'buy_now', u.fingerprint"
				   "   FROM unnest($1, $2, $3) AS u(customer_id, key, fingerprint)"
				   "  ORDER BY u.customer_id, u.key"
				   " ON CONFLICT (customer_id, key) DO NOTHING"
				   " RETURNING customer_id, key",
				   3, types);
	customer_key_arrays(reqs, n, &values[0], &values[1]);
	for (int i = 0; i < n; i++)
		fps[i] = PointerGetDatum(reqs[i]->fingerprint);
	values[2] = PointerGetDatum(construct_array(fps, n, BYTEAOID, -1, false, TYPALIGN_INT));
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "market: could not claim the idempotency keys of a chunk");

	/* which requests were inserted (n is at most a chunk: compare them all) */
	for (uint64 row = 0; row < SPI_processed; row++)
	{
		bool		isnull;
		text	   *customer = DatumGetTextPP(SPI_getbinval(SPI_tuptable->vals[row],
															SPI_tuptable->tupdesc, 1, &isnull));
		text	   *key = DatumGetTextPP(SPI_getbinval(SPI_tuptable->vals[row],
													   SPI_tuptable->tupdesc, 2, &isnull));

		for (int i = 0; i < n; i++)
			if (!claimed[i] && same_text(reqs[i]->key, key) && same_text(reqs[i]->customer, customer))
			{
				claimed[i] = true;
				break;
			}
	}
	/* only once the statement has succeeded: a failure claims nothing */
	for (int i = 0; i < n; i++)
		reqs[i]->key_claimed = claimed[i];
}

/*
 * market_release_keys deletes the unanswered key rows of n requests whose
 * keys market_claim_keys inserted and which then failed (their own
 * subtransaction rolled back, but the key was inserted outside it), so
 * that the key is free again as after any failed request.  Caller is
 * inside SPI.
 */
void
market_release_keys(MarketBuyNow **reqs, int n)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TEXTARRAYOID, TEXTARRAYOID};
	Datum		values[2];

	if (n == 0)
		return;
	market_prepare(&plan,
				   "DELETE FROM market.idempotency_keys k"
				   " USING unnest($1, $2) AS u(customer_id, key)"
				   " WHERE k.customer_id = u.customer_id AND k.key = u.key AND k.response IS NULL",
				   2, types);
	customer_key_arrays(reqs, n, &values[0], &values[1]);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "market: could not release the idempotency keys of %d failed checkouts", n);
	for (int i = 0; i < n; i++)
		reqs[i]->key_claimed = false;
}

/* ---------------------------------------------------------------------------
 * purge
 * ---------------------------------------------------------------------------
 */

/* market.idempotency_purge(max int DEFAULT 10000) returns bigint */
Datum
market_idempotency_purge(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[2] = {TIMESTAMPTZOID, INT4OID};
	Datum		values[2];
	int32		max;
	int64		deleted;

	market_require_arg(fcinfo, 0, "max");
	max = PG_GETARG_INT32(0);
	if (max < 1)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("invalid batch size"),
				 errdetail("max was %d; it must be at least 1.", max)));

	SPI_connect();
	market_prepare(&plan,
				   "DELETE FROM market.idempotency_keys k"
				   " USING (SELECT customer_id, key FROM market.idempotency_keys"
				   "         WHERE created_at < $1 ORDER BY created_at LIMIT $2"
				   "         FOR UPDATE SKIP LOCKED) d"
				   " WHERE k.customer_id = d.customer_id AND k.key = d.key",
				   2, types);
	values[0] = TimestampTzGetDatum(GetCurrentTimestamp() -
									(int64) idempotency_retention_s * USECS_PER_SEC);
	values[1] = Int32GetDatum(max);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_DELETE)
		elog(ERROR, "market: could not purge idempotency keys");
	deleted = (int64) SPI_processed;
	SPI_finish();
	PG_RETURN_INT64(deleted);
}
