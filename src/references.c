/*-------------------------------------------------------------------------
 *
 * references.c
 *	  Referential integrity of the order tables without a row lock per
 *	  reference: market.references_check() on the referencing (child)
 *	  tables, market.references_guard() on the referenced (parent) ones.
 *	  From 0.5 they replace the foreign keys of orders, order_lines,
 *	  order_events and payments (docs/architecture.md, "References").
 *
 * Why.  A foreign key checks each new child row with a SELECT ... FOR KEY
 * SHARE of its parent row, run through SPI as an AFTER trigger: a plan
 * executed per reference, and a row lock that is WAL-logged and, on rows
 * every checkout refers to (the seller, the warehouse, a popular SKU),
 * turns into a multixact shared by all the transactions in flight.  A
 * three-line checkout made about 17 such checks; with them off, the batch
 * workers spent about 30 % less CPU per checkout (docs/benchmarks.md).  Parents
 * here are catalog rows and order heads, which are written once and are
 * not deleted in normal operation, so this file moves the cost of the
 * guarantee from every child write to the rare parent delete.
 *
 * The protocol (both sides must keep to it):
 *	  - A child write holds ROW EXCLUSIVE on the child table from the start
 *		of its statement to the end of its transaction (the executor takes
 *		it).  Its BEFORE ROW trigger looks the parent key up in the
 *		parent's primary key index with SnapshotSelf: rows committed by
 *		anybody as of now, and this transaction's own rows, including those
 *		inserted earlier in the same statement (a checkout inserts its
 *		orders and their lines in one statement).  No row is locked.
 *	  - A parent DELETE, or an UPDATE that changes the key, first takes
 *		SHARE lock on every child table (waiting until every transaction
 *		that wrote to it has ended, and keeping new writers out until this
 *		transaction ends), and then looks for a child row with the key,
 *		again with SnapshotSelf, which now sees every child row there is.
 *		TRUNCATE of a parent takes the same locks and refuses if a child
 *		table has any row.
 *	  So a child row that found its parent was written by a transaction the
 *	  parent's deleter waits for and then sees, and a child write that
 *	  starts after the deleter took its lock waits for the deleter and then
 *	  no longer finds the parent.  The child side locks no row; the parent
 *	  side takes the child tables' locks before it deletes its row.  A
 *	  deleter that itself holds ROW EXCLUSIVE on a child table may deadlock
 *	  with another such deleter, which the deadlock detector resolves.
 *
 * Found parents are remembered for the rest of the transaction, per
 * (child table, parent table, key): the transaction holds ROW EXCLUSIVE on
 * the child table, so by the protocol the parent row cannot go before it
 * ends (and its own delete would find its own child rows).  A lock taken
 * in a subtransaction that aborts is released, so a subtransaction abort
 * forgets everything; so does the end of the transaction, and so does
 * references_guard (this transaction may delete a parent it found, once
 * its own rows that referred to it are gone).  A checkout
 * chunk of the batch worker refers to the same sellers, warehouse and
 * popular SKUs hundreds of times in one statement.
 *
 * Differences from a foreign key, documented: the checks are BEFORE ROW
 * triggers, so they run before AFTER triggers and cannot be deferred;
 * TRUNCATE of a parent and its children in one command is refused (truncate
 * the children first); session_replication_role = replica skips both, as
 * it skips foreign keys.  Violations raise 23503 like a foreign key.
 *
 * Each trigger's arguments are resolved once per backend into a cache
 * keyed by trigger OID, dropped after any relcache invalidation (the
 * callback only marks it stale; callers copy the entry they use).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_index.h"
#include "commands/defrem.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/regproc.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/varlena.h"

#include "market.h"

PG_FUNCTION_INFO_V1(market_references_check);
PG_FUNCTION_INFO_V1(market_references_guard);

#define MAX_REFERENCES		4
#define FOUND_PARENTS_MAX	8192	/* keys remembered per transaction at most */

/*
 * One reference of a trigger: the column of the trigger's table, and the
 * other table, its column and the index that finds a row by it (InvalidOid:
 * none, the other table is scanned).  For references_check the other table
 * is the parent and the column its primary key; for references_guard it is
 * a child.
 */
typedef struct Reference
{
	AttrNumber	own_attnum;		/* column of the trigger's table */
	Oid			other_relid;
	AttrNumber	other_attnum;
	Oid			other_index;
	RegProcedure eq_proc;		/* equality of the key type */
	bool		key_by_value;	/* a by-value key type: found keys are remembered */
} Reference;

typedef struct ReferenceSet
{
	Oid			trigger_oid;	/* hash key */
	int			count;
	Reference	refs[MAX_REFERENCES];
} ReferenceSet;

static HTAB *reference_sets = NULL;
static bool reference_sets_stale = false;

/* a parent key found by this transaction, for one child table */
typedef struct FoundParent
{
	Oid			child_relid;
	Oid			parent_relid;
	Datum		key;			/* by value: the key types are integers */
} FoundParent;

static HTAB *found_parents = NULL;	/* in TopTransactionContext */
static bool found_callbacks_registered = false;

/* forget_found_parents drops what the transaction found, see the header. */
static void
forget_found_parents(void)
{
	found_parents = NULL;		/* its memory goes with TopTransactionContext */
}

static void
found_parents_xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_ABORT ||
		event == XACT_EVENT_PARALLEL_COMMIT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
		forget_found_parents();
}

/* drop_found_parents forgets them within the transaction. */
static void
drop_found_parents(void)
{
	if (found_parents != NULL)
	{
		hash_destroy(found_parents);
		found_parents = NULL;
	}
}

static void
found_parents_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
							   SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		drop_found_parents();
}

/*
 * found_parent_known says whether (child, parent, key) is among the
 * transaction's found parents, and enters it if not (the caller then checks
 * it, and an error aborts the transaction or subtransaction, which forgets
 * it).  At most FOUND_PARENTS_MAX are kept, so that a transaction writing
 * millions of rows does not keep millions of keys: past that, new keys are
 * only looked up.
 */
static bool
found_parent_known(Oid child_relid, Oid parent_relid, Datum key)
{
	FoundParent probe;
	bool		known;

	if (!found_callbacks_registered)
	{
		RegisterXactCallback(found_parents_xact_callback, NULL);
		RegisterSubXactCallback(found_parents_subxact_callback, NULL);
		found_callbacks_registered = true;
	}
	if (found_parents == NULL)
	{
		HASHCTL		ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(FoundParent);
		ctl.entrysize = sizeof(FoundParent);
		ctl.hcxt = TopTransactionContext;
		found_parents = hash_create("market found parents", 256, &ctl,
									HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	memset(&probe, 0, sizeof(probe));
	probe.child_relid = child_relid;
	probe.parent_relid = parent_relid;
	probe.key = key;
	if (hash_get_num_entries(found_parents) >= FOUND_PARENTS_MAX)
		return hash_search(found_parents, &probe, HASH_FIND, NULL) != NULL;
	(void) hash_search(found_parents, &probe, HASH_ENTER, &known);
	return known;
}

/*
 * forget_reference_sets marks the cache stale on any relcache invalidation;
 * the next lookup drops it.
 */
static void
forget_reference_sets(Datum arg, Oid relid)
{
	reference_sets_stale = true;
}

/* trigger_data checks that a function is fired the way it is meant to be. */
static TriggerData *
trigger_data(FunctionCallInfo fcinfo, const char *name)
{
	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("function \"%s\" was not called by the trigger manager", name)));
	return (TriggerData *) fcinfo->context;
}

/* column_of returns the number of a named column of rel, or raises. */
static AttrNumber
column_of(Relation rel, const char *column)
{
	AttrNumber	attnum = get_attnum(RelationGetRelid(rel), column);

	if (attnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("column \"%s\" of relation \"%s\" does not exist",
						column, RelationGetRelationName(rel))));
	return attnum;
}

/*
 * index_leading_with returns a valid, non-partial btree index of rel whose
 * first key column is attnum (the primary key if it qualifies), or
 * InvalidOid.
 */
static Oid
index_leading_with(Relation rel, AttrNumber attnum)
{
	Oid			pk = RelationGetPrimaryKeyIndex(rel);
	List	   *indexes;
	ListCell   *lc;
	Oid			found = InvalidOid;

	indexes = RelationGetIndexList(rel);
	if (OidIsValid(pk))
		indexes = lcons_oid(pk, indexes);
	foreach(lc, indexes)
	{
		Relation	irel = index_open(lfirst_oid(lc), AccessShareLock);
		bool		fits = irel->rd_rel->relam == BTREE_AM_OID &&
			irel->rd_index->indisvalid &&
			irel->rd_index->indkey.values[0] == attnum &&
			heap_attisnull(irel->rd_indextuple, Anum_pg_index_indpred, NULL);

		index_close(irel, AccessShareLock);
		if (fits)
		{
			found = lfirst_oid(lc);
			break;
		}
	}
	list_free(indexes);
	return found;
}

/* open_named opens a table by its schema-qualified name. */
static Relation
open_named(const char *name)
{
	return table_openrv(makeRangeVarFromNameList(stringToQualifiedNameList(name)), AccessShareLock);
}

/*
 * primary_key_column names the single column of rel's primary key, or
 * raises if it has none or a composite one.
 */
static char *
primary_key_column(Relation rel)
{
	Oid			pk = RelationGetPrimaryKeyIndex(rel);
	Relation	irel;
	char	   *column;

	if (!OidIsValid(pk))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TABLE_DEFINITION),
				 errmsg("table \"%s\" has no primary key", RelationGetRelationName(rel))));
	irel = index_open(pk, AccessShareLock);
	if (irel->rd_index->indnkeyatts != 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TABLE_DEFINITION),
				 errmsg("the primary key of \"%s\" has more than one column",
						RelationGetRelationName(rel))));
	column = get_attname(RelationGetRelid(rel), irel->rd_index->indkey.values[0], false);
	index_close(irel, AccessShareLock);
	return column;
}

/*
 * resolve_reference fills ref for the column own_column of rel and the
 * column other_column of the table named other_table (schema-qualified);
 * other_column NULL means that table's primary key column.
 */
static void
resolve_reference(Reference *ref, Relation rel, const char *own_column,
				  const char *other_table, const char *other_column)
{
	Relation	other = open_named(other_table);
	Oid			own_type;
	Oid			other_type;
	Oid			opfamily;
	Oid			eq_op;

	if (other_column == NULL)
		other_column = primary_key_column(other);
	ref->own_attnum = column_of(rel, own_column);
	ref->other_relid = RelationGetRelid(other);
	ref->other_attnum = column_of(other, other_column);
	ref->other_index = index_leading_with(other, ref->other_attnum);
	own_type = TupleDescAttr(RelationGetDescr(rel), ref->own_attnum - 1)->atttypid;
	other_type = TupleDescAttr(RelationGetDescr(other), ref->other_attnum - 1)->atttypid;
	if (own_type != other_type)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("columns \"%s\" of \"%s\" and \"%s\" of \"%s\" differ in type",
						own_column, RelationGetRelationName(rel),
						other_column, RelationGetRelationName(other))));
	opfamily = get_opclass_family(GetDefaultOpClass(own_type, BTREE_AM_OID));
	eq_op = get_opfamily_member(opfamily, own_type, own_type, BTEqualStrategyNumber);
	if (!OidIsValid(eq_op))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("type %s has no btree equality operator", format_type_be(own_type))));
	ref->eq_proc = get_opcode(eq_op);
	ref->key_by_value = get_typbyval(own_type);
	table_close(other, AccessShareLock);
}

/*
 * reference_set returns the resolved references of the firing trigger.
 * references_check's arguments are (column, parent table) pairs, the
 * parent's column being its primary key's single column; references_guard's
 * are (child table, child column) pairs, the own column being the table's
 * primary key.
 */
static ReferenceSet *
reference_set(TriggerData *trigdata, bool parent_side)
{
	Trigger    *trigger = trigdata->tg_trigger;
	Relation	rel = trigdata->tg_relation;
	ReferenceSet *set;
	bool		found;

	if (reference_sets != NULL && reference_sets_stale)
	{
		hash_destroy(reference_sets);
		reference_sets = NULL;
	}
	if (reference_sets == NULL)
	{
		HASHCTL		ctl;
		static bool registered = false;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(ReferenceSet);
		ctl.hcxt = TopMemoryContext;
		reference_sets = hash_create("market references", 16, &ctl,
									 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		reference_sets_stale = false;
		if (!registered)
		{
			CacheRegisterRelcacheCallback(forget_reference_sets, (Datum) 0);
			registered = true;
		}
	}
	set = hash_search(reference_sets, &trigger->tgoid, HASH_FIND, NULL);
	if (set != NULL)
		return set;

	if (trigger->tgnargs < 2 || trigger->tgnargs % 2 != 0 ||
		trigger->tgnargs / 2 > MAX_REFERENCES)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("trigger \"%s\" has an invalid argument list", trigger->tgname),
				 errdetail("It has %d arguments; it takes 1 to %d pairs of names.",
						   trigger->tgnargs, MAX_REFERENCES)));

	{
		ReferenceSet built;
		char	   *key_column = NULL;

		if (parent_side)
			key_column = primary_key_column(rel);
		memset(&built, 0, sizeof(built));
		built.trigger_oid = trigger->tgoid;
		built.count = trigger->tgnargs / 2;
		for (int i = 0; i < built.count; i++)
		{
			char	   *first = trigger->tgargs[2 * i];
			char	   *second = trigger->tgargs[2 * i + 1];

			if (parent_side)
				resolve_reference(&built.refs[i], rel, key_column, first, second);
			else
				resolve_reference(&built.refs[i], rel, first, second, NULL);
		}
		/* an invalidation taken meanwhile only marks it stale: still there */
		set = hash_search(reference_sets, &trigger->tgoid, HASH_ENTER, &found);
		memcpy(set, &built, sizeof(built));
	}
	return set;
}

/*
 * row_with_key says whether relid has a row whose column attnum equals key,
 * as SnapshotSelf sees it: committed by anybody as of now, or written by
 * this transaction, this statement included.  The table is opened with
 * lockmode, which is kept to the end of the transaction.
 */
static bool
row_with_key(const Reference *ref, Datum key, LOCKMODE lockmode)
{
	Relation	rel = table_open(ref->other_relid, lockmode);
	ScanKeyData skey;
	SysScanDesc scan;
	bool		found;

	ScanKeyInit(&skey, ref->other_attnum, BTEqualStrategyNumber, ref->eq_proc, key);
	scan = systable_beginscan(rel, ref->other_index, OidIsValid(ref->other_index),
							  SnapshotSelf, 1, &skey);
	found = HeapTupleIsValid(systable_getnext(scan));
	systable_endscan(scan);
	table_close(rel, NoLock);
	return found;
}

/* table_has_rows says whether relid has any row SnapshotSelf sees. */
static bool
table_has_rows(Oid relid, LOCKMODE lockmode)
{
	Relation	rel = table_open(relid, lockmode);
	SysScanDesc scan = systable_beginscan(rel, InvalidOid, false, SnapshotSelf, 0, NULL);
	bool		found = HeapTupleIsValid(systable_getnext(scan));

	systable_endscan(scan);
	table_close(rel, NoLock);
	return found;
}

/* key_text is a key's value as text, for messages. */
static char *
key_text(Relation rel, AttrNumber attnum, Datum key)
{
	Oid			typoutput;
	bool		varlena;

	getTypeOutputInfo(TupleDescAttr(RelationGetDescr(rel), attnum - 1)->atttypid,
					  &typoutput, &varlena);
	return OidOutputFunctionCall(typoutput, key);
}

/*
 * market.references_check(): BEFORE INSERT OR UPDATE OF <columns> ON a
 * child table FOR EACH ROW, with (column, parent table) pairs.  Refuses a
 * row whose non-NULL reference has no parent row (23503).  An UPDATE that
 * leaves a reference as it was does not look it up again.
 */
Datum
market_references_check(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = trigger_data(fcinfo, "references_check");
	Relation	rel = trigdata->tg_relation;
	TupleDesc	desc = RelationGetDescr(rel);
	bool		is_update = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event);
	HeapTuple	row;
	ReferenceSet set;

	if (!TRIGGER_FIRED_BEFORE(trigdata->tg_event) || !TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!(TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) || is_update))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("market.references_check() must fire BEFORE INSERT OR UPDATE FOR EACH ROW")));
	row = is_update ? trigdata->tg_newtuple : trigdata->tg_trigtuple;
	/* a copy: opening a table may take an invalidation that drops the cache */
	set = *reference_set(trigdata, false);

	for (int i = 0; i < set.count; i++)
	{
		const Reference *ref = &set.refs[i];
		bool		isnull;
		Datum		key = heap_getattr(row, ref->own_attnum, desc, &isnull);

		if (isnull)
			continue;			/* MATCH SIMPLE: a NULL refers to nothing */
		if (is_update)
		{
			bool		old_null;
			Datum		old = heap_getattr(trigdata->tg_trigtuple, ref->own_attnum, desc, &old_null);

			if (!old_null && DatumGetBool(OidFunctionCall2(ref->eq_proc, old, key)))
				continue;
		}
		if (ref->key_by_value &&
			found_parent_known(RelationGetRelid(rel), ref->other_relid, key))
			continue;
		if (!row_with_key(ref, key, AccessShareLock))
		{
			const char *column = NameStr(TupleDescAttr(desc, ref->own_attnum - 1)->attname);
			const char *parent = get_rel_name(ref->other_relid);

			ereport(ERROR,
					(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
					 errmsg("insert or update on table \"%s\" violates its reference to table \"%s\"",
							RelationGetRelationName(rel), parent),
					 errdetail("Key (%s)=(%s) is not present in table \"%s\".",
							   column, key_text(rel, ref->own_attnum, key), parent),
					 errtable(rel)));
		}
	}
	return PointerGetDatum(row);
}

/*
 * market.references_guard(): BEFORE DELETE OR UPDATE OF <key> ON a parent
 * table FOR EACH ROW, and BEFORE TRUNCATE FOR EACH STATEMENT, with (child
 * table, child column) pairs.  Takes SHARE lock on each child table and
 * refuses (23503) to delete or re-key a row that a child row still refers
 * to, or to truncate while a child table has rows.
 */
Datum
market_references_guard(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = trigger_data(fcinfo, "references_guard");
	Relation	rel = trigdata->tg_relation;
	TriggerEvent event = trigdata->tg_event;
	ReferenceSet set;
	Datum		key = (Datum) 0;

	if (!TRIGGER_FIRED_BEFORE(event) ||
		!(TRIGGER_FIRED_BY_TRUNCATE(event) ||
		  (TRIGGER_FIRED_FOR_ROW(event) &&
		   (TRIGGER_FIRED_BY_DELETE(event) || TRIGGER_FIRED_BY_UPDATE(event)))))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("market.references_guard() must fire BEFORE DELETE OR UPDATE FOR EACH ROW or BEFORE TRUNCATE")));
	set = *reference_set(trigdata, true);	/* a copy, as in references_check */

	/*
	 * A parent this transaction found may be the one it now deletes (once
	 * its own referring rows are gone): forget them all, a rare path.
	 */
	drop_found_parents();

	if (!TRIGGER_FIRED_BY_TRUNCATE(event))
	{
		TupleDesc	desc = RelationGetDescr(rel);
		AttrNumber	attnum = set.refs[0].own_attnum;
		bool		isnull;

		key = heap_getattr(trigdata->tg_trigtuple, attnum, desc, &isnull);
		if (isnull)
			return PointerGetDatum(trigdata->tg_trigtuple);
		if (TRIGGER_FIRED_BY_UPDATE(event))
		{
			bool		new_null;
			Datum		new_key = heap_getattr(trigdata->tg_newtuple, attnum, desc, &new_null);

			if (!new_null && DatumGetBool(OidFunctionCall2(set.refs[0].eq_proc, key, new_key)))
				return PointerGetDatum(trigdata->tg_newtuple);
		}
	}

	for (int i = 0; i < set.count; i++)
	{
		const Reference *ref = &set.refs[i];
		const char *child = get_rel_name(ref->other_relid);

		if (TRIGGER_FIRED_BY_TRUNCATE(event))
		{
			if (table_has_rows(ref->other_relid, ShareLock))
				ereport(ERROR,
						(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
						 errmsg("cannot truncate table \"%s\" while table \"%s\" refers to it",
								RelationGetRelationName(rel), child),
						 errhint("Truncate table \"%s\" first, in a command of its own.", child),
						 errtable(rel)));
		}
		else if (row_with_key(ref, key, ShareLock))
		{
			const char *column = NameStr(TupleDescAttr(RelationGetDescr(rel), ref->own_attnum - 1)->attname);

			ereport(ERROR,
					(errcode(ERRCODE_FOREIGN_KEY_VIOLATION),
					 errmsg("update or delete on table \"%s\" violates a reference from table \"%s\"",
							RelationGetRelationName(rel), child),
					 errdetail("Key (%s)=(%s) is still referenced from table \"%s\".",
							   column, key_text(rel, ref->own_attnum, key), child),
					 errtable(rel)));
		}
	}
	if (TRIGGER_FIRED_BY_TRUNCATE(event))
		return PointerGetDatum(NULL);
	return PointerGetDatum(TRIGGER_FIRED_BY_UPDATE(event) ? trigdata->tg_newtuple : trigdata->tg_trigtuple);
}
