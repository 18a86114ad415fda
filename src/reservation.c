/*-------------------------------------------------------------------------
 *
 * reservation.c
 *	  The SQL-callable reservation API: reserve, extend, release, commit and
 *	  available, plus parsing and validation of the items document.
 *
 * A reservation is one row of market.reservations whose parallel arrays
 * record every slot it took units from.  Ending it (commit, release,
 * expire) is a single "UPDATE ... WHERE status = 'held'" on that row, so
 * exactly one of any number of concurrent enders wins; the row lock is
 * taken before any slot lock (see market.h).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "market.h"

PG_FUNCTION_INFO_V1(market_reserve);
PG_FUNCTION_INFO_V1(market_reservation_extend);
PG_FUNCTION_INFO_V1(market_reservation_release);
PG_FUNCTION_INFO_V1(market_reservation_commit);
PG_FUNCTION_INFO_V1(market_available);

#define MAX_TTL_USECS	(USECS_PER_DAY)
#define MIN_TTL_USECS	(USECS_PER_SEC)

/*
 * ttl_to_usecs checks an interval TTL against 1 s .. 24 h and returns it in
 * microseconds.  Months count as 30 days (they are out of range anyway).
 */
static int64
ttl_to_usecs(Interval *ttl)
{
	int64		usecs;
	bool		overflow = false;

	if (ttl->month != 0 || ttl->day > 1 || ttl->day < -1)
		overflow = true;
	usecs = ttl->time + (int64) ttl->day * USECS_PER_DAY;
	if (overflow || usecs < MIN_TTL_USECS || usecs > MAX_TTL_USECS)
		ereport(ERROR,
				(errcode(MK_TTL_OUT_OF_RANGE),
				 errmsg("reservation ttl out of range"),
				 errdetail("The ttl was %s.",
						   DatumGetCString(DirectFunctionCall1(interval_out,
															   IntervalPGetDatum(ttl)))),
				 errhint("A ttl lies between 1 second and 24 hours.")));
	return usecs;
}

/* market_resolve_ttl returns the TTL argument in microseconds, or the GUC default. */
int64
market_resolve_ttl(FunctionCallInfo fcinfo, int argno)
{
	if (PG_ARGISNULL(argno))
		return (int64) market_reservation_ttl_s * USECS_PER_SEC;
	return ttl_to_usecs(PG_GETARG_INTERVAL_P(argno));
}

/*
 * market_generate_uuid7 makes a time-ordered UUID (version 7): 48 bits of
 * Unix milliseconds, then random bits.  Time order keeps the primary key's
 * inserts on the right edge of the B-tree.
 */
void
market_generate_uuid7(pg_uuid_t *uuid, TimestampTz now)
{
	uint64		unix_ms = (uint64) (now / 1000) +
		(uint64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY * 1000;

	if (!pg_strong_random(uuid->data + 6, UUID_LEN - 6))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random values")));
	for (int i = 0; i < 6; i++)
		uuid->data[i] = (unsigned char) (unix_ms >> (40 - 8 * i));
	uuid->data[6] = (uuid->data[6] & 0x0f) | 0x70;	/* version 7 */
	uuid->data[8] = (uuid->data[8] & 0x3f) | 0x80;	/* RFC 4122 variant */
}

/*
 * json_integer reads a JSON number that must be a whole number fitting an
 * int64; returns false otherwise.
 */
static bool
json_integer(JsonbValue *v, int64 *out)
{
	char	   *text;
	char	   *end;
	long long	val;

	if (v->type != jbvNumeric)
		return false;
	text = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
	errno = 0;
	val = strtoll(text, &end, 10);
	if (errno != 0 || *end != '\0' || end == text)
		return false;
	*out = (int64) val;
	return true;
}

/* is_big_whole_number says whether a JSON value is an integer too large for int64. */
static bool
is_big_whole_number(JsonbValue *v)
{
	char	   *text;

	if (v->type != jbvNumeric)
		return false;
	text = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
	return strspn(text, "-0123456789") == strlen(text);
}

/* parse_item reads one element of the items array into a ReserveLine. */
static void
parse_item(JsonbValue *elem, int index, ReserveLine *line)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	bool		have_sku = false;
	bool		have_qty = false;

	if (elem->type != jbvBinary || !JsonContainerIsObject(elem->val.binary.data))
		ereport(ERROR,
				(errcode(MK_INVALID_DOCUMENT),
				 errmsg("invalid reservation items"),
				 errdetail("Item %d is not a JSON object.", index + 1),
				 errhint("Each item looks like {\"sku_id\": 1, \"qty\": 2}.")));

	line->warehouse_id = 0;
	it = JsonbIteratorInit(elem->val.binary.data);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		char	   *key;
		int64		num;

		if (tok != WJB_KEY)
			continue;
		key = pnstrdup(v.val.string.val, v.val.string.len);
		tok = JsonbIteratorNext(&it, &v, true);
		Assert(tok == WJB_VALUE);

		if (strcmp(key, "qty") == 0)
		{
			if (!json_integer(&v, &num))
			{
				if (is_big_whole_number(&v))
					ereport(ERROR,
							(errcode(MK_INVALID_ARGUMENT),
							 errmsg("invalid quantity"),
							 errdetail("Item %d asks for %s units.", index + 1,
									   DatumGetCString(DirectFunctionCall1(numeric_out,
																		   NumericGetDatum(v.val.numeric)))),
							 errhint("A quantity is a whole number from 1 to market.max_line_qty (%d).",
									 market_max_line_qty)));
				ereport(ERROR,
						(errcode(MK_INVALID_DOCUMENT),
						 errmsg("invalid reservation items"),
						 errdetail("\"qty\" of item %d is not a whole JSON number.", index + 1)));
			}
			if (num < 1 || num > market_max_line_qty)
				ereport(ERROR,
						(errcode(MK_INVALID_ARGUMENT),
						 errmsg("invalid quantity"),
						 errdetail("Item %d asks for %lld units.", index + 1, (long long) num),
						 errhint("A quantity is a whole number from 1 to market.max_line_qty (%d).",
								 market_max_line_qty)));
			line->qty = num;
			have_qty = true;
		}
		else if (strcmp(key, "sku_id") == 0)
		{
			if (!json_integer(&v, &num) || num < 1)
				ereport(ERROR,
						(errcode(MK_INVALID_DOCUMENT),
						 errmsg("invalid reservation items"),
						 errdetail("\"sku_id\" of item %d is not a positive whole JSON number.", index + 1)));
			line->sku_id = num;
			have_sku = true;
		}
		else if (strcmp(key, "warehouse_id") == 0)
		{
			if (v.type == jbvNull)
				continue;
			if (!json_integer(&v, &num) || num < 1 || num > INT_MAX)
				ereport(ERROR,
						(errcode(MK_INVALID_DOCUMENT),
						 errmsg("invalid reservation items"),
						 errdetail("\"warehouse_id\" of item %d is not a positive whole JSON number.", index + 1)));
			line->warehouse_id = (int32) num;
		}
		else
			ereport(ERROR,
					(errcode(MK_INVALID_DOCUMENT),
					 errmsg("invalid reservation items"),
					 errdetail("Item %d has an unknown key \"%s\".", index + 1, key),
					 errhint("The keys are \"sku_id\", \"qty\" and \"warehouse_id\".")));
	}
	if (!have_sku || !have_qty)
		ereport(ERROR,
				(errcode(MK_INVALID_DOCUMENT),
				 errmsg("invalid reservation items"),
				 errdetail("Item %d has no \"%s\".", index + 1, have_sku ? "qty" : "sku_id")));
}

/* compare_lines orders lines by (sku, warehouse): the lock order. */
static int
compare_lines(const void *a, const void *b)
{
	const ReserveLine *x = a;
	const ReserveLine *y = b;

	if (x->sku_id != y->sku_id)
		return x->sku_id < y->sku_id ? -1 : 1;
	if (x->warehouse_id != y->warehouse_id)
		return x->warehouse_id < y->warehouse_id ? -1 : 1;
	return 0;
}

/*
 * market_parse_items validates the items document and returns its lines
 * sorted by (sku, warehouse) with duplicates summed.
 */
ReserveLine *
market_parse_items(Jsonb *items, int *nlines)
{
	int			n;
	int			merged = 0;
	ReserveLine *lines;

	if (!JB_ROOT_IS_ARRAY(items) || JB_ROOT_IS_SCALAR(items))
		ereport(ERROR,
				(errcode(MK_INVALID_DOCUMENT),
				 errmsg("invalid reservation items"),
				 errdetail("items must be a JSON array of objects."),
				 errhint("Pass '[{\"sku_id\": 1, \"qty\": 2}]'.")));
	n = JB_ROOT_COUNT(items);
	if (n == 0)
		ereport(ERROR,
				(errcode(MK_INVALID_DOCUMENT),
				 errmsg("invalid reservation items"),
				 errdetail("items is an empty array.")));
	if (n > market_max_reservation_lines)
		ereport(ERROR,
				(errcode(MK_INVALID_ARGUMENT),
				 errmsg("too many reservation lines"),
				 errdetail("items has %d lines; the limit is %d.", n, market_max_reservation_lines),
				 errhint("See market.max_reservation_lines.")));

	lines = palloc0(sizeof(ReserveLine) * n);
	for (int i = 0; i < n; i++)
	{
		JsonbValue *elem = getIthJsonbValueFromContainer(&items->root, i);

		parse_item(elem, i, &lines[i]);
	}

	qsort(lines, n, sizeof(ReserveLine), compare_lines);
	for (int i = 0; i < n; i++)
	{
		if (merged > 0 && compare_lines(&lines[i], &lines[merged - 1]) == 0)
		{
			lines[merged - 1].qty += lines[i].qty;
			if (lines[merged - 1].qty > market_max_line_qty)
				ereport(ERROR,
						(errcode(MK_INVALID_ARGUMENT),
						 errmsg("invalid quantity"),
						 errdetail("The lines for SKU %lld add up to %lld units.",
								   (long long) lines[i].sku_id,
								   (long long) lines[merged - 1].qty),
						 errhint("A quantity is a whole number from 1 to market.max_line_qty (%d).",
								 market_max_line_qty)));
			continue;
		}
		lines[merged++] = lines[i];
	}
	*nlines = merged;
	return lines;
}

/*
 * insert_reservation writes the reservation row with its takes, held until
 * expires_at.
 */
static void
insert_reservation(pg_uuid_t *id, text *owner, TimestampTz now,
				   TimestampTz expires_at, TakeList *takes)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[8] = {UUIDOID, TEXTOID, TIMESTAMPTZOID, TIMESTAMPTZOID,
		INT8ARRAYOID, INT4ARRAYOID, INT4ARRAYOID, INT8ARRAYOID};
	Datum		values[8];
	char		nulls[8] = "        ";
	int			rc;

	market_prepare(&plan,
				   "INSERT INTO market.reservations"
				   " (id, owner, status, created_at, expires_at, sku_ids, warehouse_ids, slots, qtys)"
				   " VALUES ($1, $2, 'held', $3, $4, $5, $6, $7, $8)",
				   8, types);
	values[0] = UUIDPGetDatum(id);
	values[1] = owner ? PointerGetDatum(owner) : (Datum) 0;
	if (!owner)
		nulls[1] = 'n';
	values[2] = TimestampTzGetDatum(now);
	values[3] = TimestampTzGetDatum(expires_at);
	market_takes_to_arrays(takes->items, takes->count, &values[4]);
	rc = SPI_execute_plan(plan, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "market: could not record reservation: %s", SPI_result_code_string(rc));
}

/*
 * market_reserve_lines is the reservation core, callable for a batch: it
 * reserves every line (all or nothing, raising on the first that cannot be
 * served) and records one reservation, held until now + ttl.  takes_out,
 * when given, receives what was taken (allocated in the current, SPI,
 * memory context); expires_out the reservation's expires_at.  Caller is
 * inside SPI.  (buy_now takes its lines with market_take_line and records
 * the sold reservation together with its orders, src/checkout.c.)
 */
void
market_reserve_lines(ReserveLine *lines, int nlines, int64 ttl_usecs,
					 text *owner, pg_uuid_t *id_out,
					 TimestampTz *expires_out, TakeList *takes_out)
{
	TakeList	takes = {0};
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz expires_at = now + ttl_usecs;

	for (int i = 0; i < nlines; i++)
		market_take_line(&lines[i], &takes);
	market_generate_uuid7(id_out, now);
	insert_reservation(id_out, owner, now, expires_at, &takes);
	market_note_expiry(expires_at);
	if (expires_out)
		*expires_out = expires_at;
	if (takes_out)
		*takes_out = takes;
}

/* market.reserve(items jsonb, ttl interval, owner text) returns uuid */
Datum
market_reserve(PG_FUNCTION_ARGS)
{
	Jsonb	   *items;
	ReserveLine *lines;
	int			nlines;
	int64		ttl_usecs;
	text	   *owner = NULL;
	pg_uuid_t  *id = palloc(sizeof(pg_uuid_t));

	market_require_arg(fcinfo, 0, "items");
	items = PG_GETARG_JSONB_P(0);
	ttl_usecs = market_resolve_ttl(fcinfo, 1);
	if (!PG_ARGISNULL(2))
	{
		owner = PG_GETARG_TEXT_PP(2);
		if (VARSIZE_ANY_EXHDR(owner) > MARKET_MAX_OWNER_LEN)
			ereport(ERROR,
					(errcode(MK_INVALID_ARGUMENT),
					 errmsg("reservation owner too long"),
					 errdetail("owner has %d bytes; the limit is %d.",
							   (int) VARSIZE_ANY_EXHDR(owner), MARKET_MAX_OWNER_LEN)));
	}
	lines = market_parse_items(items, &nlines);

	if (market_batch_try_reserve(lines, nlines, ttl_usecs, owner, id))
		PG_RETURN_UUID_P(id);

	SPI_connect();
	market_reserve_lines(lines, nlines, ttl_usecs, owner, id, NULL, NULL);
	SPI_finish();
	PG_RETURN_UUID_P(id);
}

/* reservation_state looks up why a reservation is not live, for MK002. */
static void
raise_not_live(pg_uuid_t *id, const char *action)
{
	static SPIPlanPtr plan = NULL;
	Oid			types[1] = {UUIDOID};
	Datum		values[1] = {UUIDPGetDatum(id)};
	char	   *idtext = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(id)));
	char	   *state = "unknown";

	market_prepare(&plan, "SELECT status, expires_at <= clock_timestamp()"
				   " FROM market.reservations WHERE id = $1", 1, types);
	if (SPI_execute_plan(plan, values, NULL, false, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		bool		isnull;
		bool		past = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
													  SPI_tuptable->tupdesc, 2, &isnull));

		state = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		if (strcmp(state, "held") == 0 && past)
			state = "expired";
	}
	ereport(ERROR,
			(errcode(MK_RESERVATION_NOT_LIVE),
			 errmsg("reservation is not live"),
			 errdetail("Cannot %s reservation %s: it is %s.", action, idtext, state),
			 strcmp(state, "unknown") == 0 ? 0 :
			 errhint("Only a held reservation that has not expired can be changed.")));
}

/*
 * finish_reservation ends a held reservation with the given status and
 * returns its takes; only_if_unexpired refuses expired ones.  Returns
 * false when no held row matched.  The UPDATE is the arbiter between
 * concurrent enders.
 */
static bool
finish_reservation(pg_uuid_t *id, const char *status, bool only_if_unexpired,
				   TimestampTz now, TakeList *takes, char **final_status)
{
	static SPIPlanPtr live_plan = NULL;
	static SPIPlanPtr any_plan = NULL;
	Oid			types[3] = {UUIDOID, TEXTOID, TIMESTAMPTZOID};
	Datum		values[3];
	HeapTuple	tup;
	TupleDesc	desc;

	market_prepare(&live_plan,
				   "UPDATE market.reservations SET status = $2, finished_at = $3"
				   " WHERE id = $1 AND status = 'held' AND expires_at > $3"
				   " RETURNING status, sku_ids, warehouse_ids, slots, qtys",
				   3, types);
	/* releasing an expired-but-not-returned reservation expires it */
	market_prepare(&any_plan,
				   "UPDATE market.reservations"
				   " SET status = CASE WHEN expires_at > $3 THEN $2 ELSE 'expired' END,"
				   "     finished_at = $3"
				   " WHERE id = $1 AND status = 'held'"
				   " RETURNING status, sku_ids, warehouse_ids, slots, qtys",
				   3, types);

	values[0] = UUIDPGetDatum(id);
	values[1] = CStringGetTextDatum(status);
	values[2] = TimestampTzGetDatum(now);
	if (SPI_execute_plan(only_if_unexpired ? live_plan : any_plan, values, NULL, false, 0)
		!= SPI_OK_UPDATE_RETURNING)
		elog(ERROR, "market: could not finish reservation");
	if (SPI_processed == 0)
		return false;

	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	*final_status = SPI_getvalue(tup, desc, 1);
	market_takes_from_tuple(tup, desc, 2, takes);
	return true;
}

/*
 * market_commit_reservation sells a held, unexpired reservation: marks it
 * committed, takes its units out of stock and writes the sale rows.  Its
 * lines are appended to takes.  Returns false, changing nothing, when the
 * reservation is not live (unknown, expired, released or committed).
 * Caller is inside SPI.
 */
bool
market_commit_reservation(pg_uuid_t *id, TakeList *takes)
{
	char	   *status;

	if (!finish_reservation(id, "committed", true, GetCurrentTimestamp(), takes, &status))
		return false;
	market_return_units(takes->items, takes->count, true, id);
	return true;
}

/* market.reservation_commit(reservation uuid) returns bigint: the sale */
Datum
market_reservation_commit(PG_FUNCTION_ARGS)
{
	pg_uuid_t  *id;
	TakeList	takes = {0};
	int64		sold = 0;

	market_require_arg(fcinfo, 0, "reservation");
	id = PG_GETARG_UUID_P(0);

	SPI_connect();
	if (!market_commit_reservation(id, &takes))
		raise_not_live(id, "commit");
	for (int i = 0; i < takes.count; i++)
		sold += takes.items[i].qty;
	SPI_finish();					/* frees takes */
	PG_RETURN_INT64(sold);
}

/* market.reservation_release(reservation uuid) returns boolean */
Datum
market_reservation_release(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr state_plan = NULL;
	pg_uuid_t  *id;
	TakeList	takes = {0};
	char	   *status = NULL;
	bool		released = false;

	market_require_arg(fcinfo, 0, "reservation");
	id = PG_GETARG_UUID_P(0);

	SPI_connect();
	if (finish_reservation(id, "released", false, GetCurrentTimestamp(), &takes, &status))
	{
		market_return_units(takes.items, takes.count, false, NULL);
		released = (strcmp(status, "released") == 0);
	}
	else
	{
		Oid			types[1] = {UUIDOID};
		Datum		values[1] = {UUIDPGetDatum(id)};

		/* already released or expired: harmless; unknown or sold: an error */
		market_prepare(&state_plan,
					   "SELECT 1 FROM market.reservations"
					   " WHERE id = $1 AND status IN ('released', 'expired')",
					   1, types);
		if (SPI_execute_plan(state_plan, values, NULL, false, 1) != SPI_OK_SELECT ||
			SPI_processed == 0)
			raise_not_live(id, "release");
	}
	SPI_finish();
	PG_RETURN_BOOL(released);
}

/* market.reservation_extend(reservation uuid, ttl interval) returns timestamptz */
Datum
market_reservation_extend(PG_FUNCTION_ARGS)
{
	static SPIPlanPtr plan = NULL;
	pg_uuid_t  *id;
	int64		ttl_usecs;
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz expires_at;
	Oid			types[3] = {UUIDOID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[3];

	market_require_arg(fcinfo, 0, "reservation");
	market_require_arg(fcinfo, 1, "ttl");
	id = PG_GETARG_UUID_P(0);
	ttl_usecs = ttl_to_usecs(PG_GETARG_INTERVAL_P(1));
	expires_at = now + ttl_usecs;

	SPI_connect();
	market_prepare(&plan,
				   "UPDATE market.reservations SET expires_at = $2"
				   " WHERE id = $1 AND status = 'held' AND expires_at > $3",
				   3, types);
	values[0] = UUIDPGetDatum(id);
	values[1] = TimestampTzGetDatum(expires_at);
	values[2] = TimestampTzGetDatum(now);
	if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_UPDATE)
		elog(ERROR, "market: could not extend reservation");
	if (SPI_processed == 0)
		raise_not_live(id, "extend");
	SPI_finish();
	market_note_expiry(expires_at);
	PG_RETURN_TIMESTAMPTZ(expires_at);
}

/* market.available(sku_id bigint, warehouse_id int) returns bigint */
Datum
market_available(PG_FUNCTION_ARGS)
{
	int64		sku_id;
	int32		warehouse_id = 0;
	int64		avail;

	market_require_arg(fcinfo, 0, "sku_id");
	sku_id = PG_GETARG_INT64(0);
	if (!PG_ARGISNULL(1))
	{
		warehouse_id = PG_GETARG_INT32(1);
		if (warehouse_id <= 0)
			ereport(ERROR,
					(errcode(MK_UNKNOWN_WAREHOUSE),
					 errmsg("unknown warehouse"),
					 errdetail("No warehouse has id %d.", warehouse_id),
					 errhint("Pass NULL (the default) to count every warehouse.")));
	}

	SPI_connect();
	avail = market_available_units(sku_id, warehouse_id);
	SPI_finish();
	PG_RETURN_INT64(avail);
}
