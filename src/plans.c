/*-------------------------------------------------------------------------
 *
 * plans.c
 *	  The saved SPI plans of the extension (market_prepare) and keeping
 *	  them, and every other cached plan of the process, fit for the size
 *	  the tables have grown to (replan_if_grown).
 *
 * Why: a cached generic plan is made once, for the table sizes of that
 * moment, and is kept until something invalidates it.  A process that
 * planned while market.orders or market.idempotency_keys were nearly
 * empty (a new shop, or the first minute of a benchmark) kept sequential
 * scans for key lookups as the tables grew, so every checkout got slower
 * than the one before: the batch workers fell from 624 to 182 checkouts/s
 * within 30 s on a fresh database (docs/benchmarks.md).  The worst were not
 * our own statements but the foreign-key checks PostgreSQL runs for every
 * inserted row ("SELECT 1 FROM ONLY market.orders x WHERE id = $1 FOR KEY
 * SHARE"), whose plans live in the same plan cache.  Autovacuum's ANALYZE would invalidate
 * them eventually, but only once it gets to the table, which can take
 * minutes while it vacuums a freshly loaded catalog.
 *
 * So, at most once a second per process, the first market_prepare of a
 * transaction compares the size in blocks of each table of the market
 * schema with its size when the plans were last reset, and when one of
 * them has doubled (and reached REPLAN_MIN_BLOCKS) calls ResetPlanCache():
 * every cached plan of this process is made again on its next use, for
 * the sizes of now.  Growth by doubling bounds the resets to a few dozen
 * over a table's life.
 *
 * Locking: each table's size is read under AccessShareLock, taken only
 * if it is free at once (a table being altered or VACUUM FULLed is left
 * for the next look) and released at once (as pg_relation_size does), so
 * that no lock on a table the transaction does not use is waited for or
 * kept to its end; the state is private to the process.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/relation.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "storage/bufmgr.h"
#include "storage/lmgr.h"
#include "utils/lsyscache.h"
#include "utils/plancache.h"
#include "utils/rel.h"
#include "utils/timestamp.h"

#include "market.h"

/* a table smaller than this never causes a reset: a scan of it is cheap */
#define REPLAN_MIN_BLOCKS		8
/* how often a process looks at the sizes at most */
#define REPLAN_CHECK_US			1000000

/* the tables whose growth can make a cached plan wrong (schema market) */
static const char *const growing_tables[] = {
	"sellers", "products", "skus", "warehouses", "stock", "stock_slots",
	"reservations", "stock_ledger", "carts", "cart_items", "order_groups",
	"orders", "order_lines", "order_events", "payments", "outbox",
	"checkouts", "idempotency_keys", "payment_attempts", "psp_webhook_events"
};

#define NUM_GROWING_TABLES	lengthof(growing_tables)

/* sizes at the last reset (or first look), in blocks */
static BlockNumber sizes_at_reset[NUM_GROWING_TABLES];
static bool sizes_known = false;
static TimestampTz last_check = 0;
static uint64 plan_resets = 0;

/*
 * table_blocks returns the size in blocks of market.<name>, or
 * InvalidBlockNumber if there is no such table or its lock is not free
 * right now: a checkout must not queue behind an administrator's VACUUM
 * FULL or ALTER TABLE of a table it does not even use.
 */
static BlockNumber
table_blocks(Oid nsp, const char *name)
{
	Oid			relid = get_relname_relid(name, nsp);
	Relation	rel;
	BlockNumber blocks = InvalidBlockNumber;

	if (!OidIsValid(relid) || !ConditionalLockRelationOid(relid, AccessShareLock))
		return InvalidBlockNumber;
	rel = try_relation_open(relid, NoLock);
	if (rel != NULL)
	{
		blocks = RelationGetNumberOfBlocks(rel);
		relation_close(rel, NoLock);
	}
	UnlockRelationOid(relid, AccessShareLock);
	return blocks;
}

/*
 * replan_if_grown resets this process's plan cache when a table of
 * the market schema has doubled in size since the plans were last reset
 * (see the file header).  Cheap when called often: it looks at most once
 * a second.  A table whose size cannot be read now is left for the next
 * look.  Must run inside a transaction.
 */
static void
replan_if_grown(void)
{
	TimestampTz now = GetCurrentTransactionStartTimestamp();
	Oid			nsp;
	bool		grown = false;
	BlockNumber sizes[NUM_GROWING_TABLES];

	if (sizes_known && now - last_check < REPLAN_CHECK_US)
		return;
	last_check = now;
	nsp = get_namespace_oid("market", true);
	if (!OidIsValid(nsp))
		return;

	for (int i = 0; i < (int) NUM_GROWING_TABLES; i++)
	{
		sizes[i] = table_blocks(nsp, growing_tables[i]);
		if (sizes_known && sizes[i] != InvalidBlockNumber && sizes[i] >= REPLAN_MIN_BLOCKS &&
			sizes[i] >= 2 * (uint64) Max(sizes_at_reset[i], 1))
			grown = true;
	}

	if (grown)
	{
		ResetPlanCache();
		plan_resets++;
		elog(DEBUG1, "market: tables have grown, cached plans will be made again (reset %llu)",
			 (unsigned long long) plan_resets);
	}
	for (int i = 0; i < (int) NUM_GROWING_TABLES; i++)
	{
		if (sizes[i] == InvalidBlockNumber)
		{
			if (!sizes_known)
				sizes_at_reset[i] = 0;
			continue;
		}
		/* a table that shrank (purge, truncate) lowers its mark, so growth counts again */
		if (grown || !sizes_known || sizes[i] < sizes_at_reset[i] / 2)
			sizes_at_reset[i] = sizes[i];
	}
	sizes_known = true;
}

/*
 * market_prepare returns the saved plan in *cache, preparing and keeping it
 * on first use.  Plans live for the backend's lifetime.  They are generic
 * plans: every statement prepared here looks rows up by key, so a plan made
 * for the actual parameter values would be the same plan, but the plan cache
 * would keep making it anew on every call whenever its estimate for the
 * generic plan comes out higher (it does for "= ANY ($1)" and unnest($1),
 * whose array length it cannot know), which cost a batched checkout a
 * seventh of its time.  Before it returns, replan_if_grown may mark
 * every cached plan for re-planning, this one included.
 */
SPIPlanPtr
market_prepare(SPIPlanPtr *cache, const char *sql, int nargs, Oid *argtypes)
{
	replan_if_grown();
	if (*cache == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);

		if (plan == NULL)
			elog(ERROR, "market: SPI_prepare failed for \"%s\": %s",
				 sql, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "market: SPI_keepplan failed");
		*cache = plan;
	}
	return *cache;
}
