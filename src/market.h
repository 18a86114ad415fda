/*-------------------------------------------------------------------------
 *
 * market.h
 *	  Declarations shared by the market extension's C files: SQLSTATEs,
 *	  GUC variables, the shared-memory state and the inventory core.
 *
 * Locking protocol (the whole extension keeps to it; docs/architecture.md
 * explains it and names the one narrow window it leaves):
 *
 *	1. A reservation touches (sku, warehouse) pairs in ascending sku order,
 *	   and for one SKU the warehouses in (priority, id) order.
 *	2. Within one pair a session either try-locks slot advisory locks and
 *	   takes from the first slot it gets, waits for exactly one slot's
 *	   advisory lock, or takes the "exact path" in a subtransaction: the
 *	   pair's advisory lock, then every slot row FOR UPDATE in slot order.
 *	   The exact path changes only slots whose advisory lock it can take
 *	   without waiting, and a failed exact path is rolled back so no rows of
 *	   that pair stay locked.  Stock changes that may lower a slot first wait
 *	   for every slot's advisory lock in slot order.
 *	3. Reservation rows are locked before slot rows by the functions that end
 *	   a reservation (commit, release, expire), which lock slots sorted by
 *	   (sku, warehouse, slot); reserve never waits for a reservation row (it
 *	   uses SKIP LOCKED on them) and never locks another pair's rows.
 *	4. The shared-memory state below is only read or written with atomics;
 *	   no LWLock is involved.
 *	5. An order transition that puts units back (cancel, payment failure,
 *	   return; src/orders.c) holds the order row (its UPDATE) and then
 *	   takes each pair of the order's lines in ascending (sku, warehouse)
 *	   order the way stock_adjust does (pair lock, then every slot row).
 *	   No function of the extension waits for an order row while it holds
 *	   slot rows.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MARKET_H
#define MARKET_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "port/atomics.h"
#include "utils/jsonb.h"
#include "utils/uuid.h"

/* SQLSTATEs of class MK (listed in docs/sqlstates.md) */
#define MK_INSUFFICIENT_STOCK		MAKE_SQLSTATE('M','K','0','0','1')
#define MK_RESERVATION_NOT_LIVE		MAKE_SQLSTATE('M','K','0','0','2')
#define MK_UNKNOWN_SKU				MAKE_SQLSTATE('M','K','0','1','0')
#define MK_UNKNOWN_WAREHOUSE		MAKE_SQLSTATE('M','K','0','1','1')
#define MK_INVALID_ARGUMENT			MAKE_SQLSTATE('M','K','0','2','0')
#define MK_INVALID_DOCUMENT			MAKE_SQLSTATE('M','K','0','2','1')
#define MK_TTL_OUT_OF_RANGE			MAKE_SQLSTATE('M','K','0','2','3')
#define MK_BELOW_RESERVED			MAKE_SQLSTATE('M','K','0','2','4')
#define MK_NEGATIVE_STOCK			MAKE_SQLSTATE('M','K','0','2','5')

/* 0.2: orders, checkout, outbox (docs/sqlstates.md) */
#define MK_BATCH_INTERRUPTED		MAKE_SQLSTATE('M','K','0','0','6')
#define MK_ILLEGAL_TRANSITION		MAKE_SQLSTATE('M','K','0','0','3')
#define MK_IDEMPOTENCY_MISMATCH		MAKE_SQLSTATE('M','K','0','0','4')
#define MK_IDEMPOTENCY_IN_USE		MAKE_SQLSTATE('M','K','0','0','5')
#define MK_UNKNOWN_CART				MAKE_SQLSTATE('M','K','0','1','5')
#define MK_UNKNOWN_CHECKOUT			MAKE_SQLSTATE('M','K','0','1','6')
#define MK_UNKNOWN_ORDER			MAKE_SQLSTATE('M','K','0','1','7')
#define MK_CURRENCY_MISMATCH		MAKE_SQLSTATE('M','K','0','2','6')
#define MK_EMPTY_CART				MAKE_SQLSTATE('M','K','0','2','7')
#define MK_NOT_YOUR_CHECKOUT		MAKE_SQLSTATE('M','K','0','2','8')
#define MK_CHECKOUT_NOT_OPEN		MAKE_SQLSTATE('M','K','0','2','9')

/* limits that are not settings */
#define MARKET_MAX_ON_HAND			INT64CONST(1000000000000)
#define MARKET_MAX_SLOTS			1024
#define MARKET_MAX_OWNER_LEN		200

/* GUC variables (src/market.c) */
extern int	market_reservation_ttl_s;
extern int	market_max_line_qty;
extern int	market_max_reservation_lines;
extern int	market_stock_slots;
extern int	market_expiry_batch_size;
extern int	market_expiry_max_naptime_ms;
extern int	market_reservation_retention_s;
extern bool market_expiry_worker_enabled;
extern char *market_database;

/*
 * Shared state between backends and the expiry worker.  Everything is an
 * atomic: backends only ever read planned_wakeup and lower requested_wakeup.
 */
typedef struct MarketShared
{
	pg_atomic_uint32 worker_pid;		/* 0 when no worker runs */
	pg_atomic_uint32 worker_procno;		/* PGPROC number, for its latch */
	pg_atomic_uint64 planned_wakeup;	/* when the worker will next look */
	pg_atomic_uint64 requested_wakeup;	/* earliest expiry a backend created */
	pg_atomic_uint64 expired_total;
	pg_atomic_uint64 purged_total;
	pg_atomic_uint64 last_run;			/* TimestampTz of the last pass */
} MarketShared;

extern MarketShared *market_shared;

/* one unit of demand: qty of a SKU, from a given warehouse or any (0) */
typedef struct ReserveLine
{
	int64		sku_id;
	int32		warehouse_id;	/* 0: the engine picks */
	int64		qty;
} ReserveLine;

/* what the engine took: qty units from one slot */
typedef struct SlotTake
{
	int64		sku_id;
	int32		warehouse_id;
	int32		slot;
	int64		qty;
} SlotTake;

/*
 * a growing array of takes; sell (set by buy_now before the first take)
 * takes the units off hand in the same slot UPDATE, instead of holding
 * them for a reservation that a second UPDATE of the same rows sells
 */
typedef struct TakeList
{
	SlotTake   *items;
	int			count;
	int			capacity;
	bool		sell;
} TakeList;

/* src/market.c */
extern void market_require_arg(FunctionCallInfo fcinfo, int argno, const char *name);
extern void market_note_expiry(TimestampTz expires_at);
extern void market_register_static_worker(const char *function_name, const char *name);
extern void market_register_static_worker_arg(const char *function_name, const char *name,
											  Datum main_arg);

/* src/plans.c: saved plans, re-planned as the tables grow */
extern SPIPlanPtr market_prepare(SPIPlanPtr *cache, const char *sql,
								 int nargs, Oid *argtypes);

/* src/inventory.c: the slot engine; callers are inside SPI_connect */
extern void market_take_line(const ReserveLine *line, TakeList *takes);
extern void market_lock_all_slots(int64 sku_id, int32 warehouse_id);
extern void market_lock_slot_guards(int64 sku_id, int32 warehouse_id, int32 nslots);
extern int	market_reclaim_expired(int64 sku_id, int32 warehouse_id);
extern void market_takes_from_tuple(HeapTuple tup, TupleDesc desc, int first,
									TakeList *takes);
extern void market_rebalance(int64 sku_id, int32 warehouse_id, int64 add,
							 bool respread, int64 *on_hand_out, int64 *held_out);
extern void market_return_units(const SlotTake *takes, int ntakes, bool sold,
								pg_uuid_t *reservation);
extern int	market_compare_takes(const void *a, const void *b);
extern int	market_takes_to_arrays(SlotTake *takes, int ntakes, Datum *arrays);
extern void takes_append(TakeList *list, int64 sku_id, int32 warehouse_id,
						 int32 slot, int64 qty);
extern bool market_sku_exists(int64 sku_id);
extern bool market_warehouse_exists(int32 warehouse_id);
extern int64 market_available_units(int64 sku_id, int32 warehouse_id);

/* src/reservation.c: the reservation core, reused by checkout */
extern int64 market_resolve_ttl(FunctionCallInfo fcinfo, int argno);
extern void market_generate_uuid7(pg_uuid_t *uuid, TimestampTz now);
extern ReserveLine *market_parse_items(Jsonb *items, int *nlines);
extern void market_reserve_lines(ReserveLine *lines, int nlines, int64 ttl_usecs,
								 text *owner, pg_uuid_t *id_out,
								 TimestampTz *expires_out, TakeList *takes_out);
extern bool market_commit_reservation(pg_uuid_t *id, TakeList *takes);

/* src/checkout.c */

/*
 * A validated buy_now request: what market.buy_now() checked and what
 * market_buy_now_apply() needs; the batch queue carries it to its worker.
 */
typedef struct MarketBuyNow
{
	text	   *customer;
	text	   *key;
	text	   *currency;
	char	   *method;			/* NULL: not given */
	char	   *psp;			/* NULL: not given */
	ReserveLine *lines;			/* sorted by SKU */
	int			nlines;
	bytea	   *fingerprint;	/* sha256 of the request */
	/* set by the batch worker for a chunk of checkouts; false / NULL otherwise */
	bool		key_claimed;	/* its key row is inserted already (market_claim_keys) */
	struct HTAB *prices;		/* the chunk's price book (market_price_book) */
} MarketBuyNow;

#define MARKET_MAX_CUSTOMER_CHARS	200
#define MARKET_MAX_KEY_CHARS		255
#define MARKET_MAX_PAYMENT_CHARS	100

extern void market_checkout_define_gucs(void);
extern Datum market_buy_now_apply(MarketBuyNow *req);

/* a buy_now whose stock is sold and whose orders are still to be written */
typedef struct MarketBuyNowPending MarketBuyNowPending;
extern bool market_buy_now_prepare(MarketBuyNow *req, MarketBuyNowPending **pending,
								   Datum *response);
extern void market_buy_now_write(MarketBuyNowPending **pending, int n, Datum *responses);
extern struct HTAB *market_price_book(MarketBuyNow **reqs, int n, MemoryContext cxt);
extern void market_claim_keys(MarketBuyNow **reqs, int n);
extern void market_release_keys(MarketBuyNow **reqs, int n);

/* src/batch.c: the batched reservation path and its worker */
extern bool market_batch_reserve;
extern bool market_batch_worker_enabled;
extern int	market_batch_max;
extern int	market_batch_workers;
extern Size market_batch_shmem_size(void);
extern void market_batch_shmem_init(void);
extern void market_define_batch_gucs(void);
extern void market_register_batch_worker(void);
extern bool market_batch_try_reserve(const ReserveLine *lines, int nlines, int64 ttl_usecs,
									 text *owner, pg_uuid_t *id_out);
extern bool market_batch_checkout;
extern bool market_batch_try_buy_now(MarketBuyNow *req, Datum *response);

/* src/stock.c */
extern int64 market_change_on_hand(int64 sku_id, int32 warehouse_id, bool absolute,
								   int64 value, int32 new_slots, const char *kind,
								   text *reason);

/* src/expiry.c */
extern int	market_expire_batch(int max_reservations, bool skip_busy, int *skipped);
extern int64 market_purge_finished(int max_rows);
extern TimestampTz market_next_expiry(void);

/* src/worker.c */
extern void market_register_worker(void);

/* src/outbox.c */
extern void market_outbox_init(void);

/* src/psp_worker.c */
extern void market_psp_init(void);

/* src/psp_webhook.c */
extern void market_psp_webhook_define_gucs(void);

#endif							/* MARKET_H */
