/*
 * pgrelay's stamp trigger in C.
 *
 * Every write to a replicated table takes a stamp from the region's hybrid
 * logical clock. pgrelay's setup installs the trigger in PL/pgSQL, which
 * works everywhere (managed services included); where this extension can be
 * loaded, setup uses this function instead: the same arithmetic without an
 * interpreter on the path of every written row.
 *
 * The clock (see src/hlc.rs): a stamp is (logical << 6) | region, where
 * logical counts milliseconds since the Unix epoch shifted left by 10 bits.
 * The next logical time is the sequence pgrelay.hlc_logical's next value
 * when that reaches both the wall clock and the row's previous logical time
 * plus one and no locked advance of the clock ran meanwhile (the sequence
 * pgrelay.hlc_gen, odd while one runs, read before and after); otherwise it
 * comes from pgrelay.advance_hlc(target), the locked advance, as in the
 * PL/pgSQL trigger.
 *
 * The trigger fires in the writer's session with pgrelay's rights, as the
 * PL/pgSQL trigger functions (SECURITY DEFINER) do: the clock is read and
 * moved as the owner of pgrelay.hlc_logical (the setup role), so writers
 * need no privilege on anything of pgrelay's.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_namespace.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "parser/parse_func.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/fmgrprotos.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

PG_MODULE_MAGIC;

#define REGION_BITS 6
#define COUNTER_BITS 10
#define DEFAULT_COLUMN "_pgrelay_hlc"

PG_FUNCTION_INFO_V1(pgrelay_stamp_row);
PG_FUNCTION_INFO_V1(pgrelay_fence_guard);
PG_FUNCTION_INFO_V1(pgrelay_check_tombstone);

#define LIMIT ((int64) 1 << (63 - REGION_BITS))

/* What one trigger needs on every call, looked up on its first. */
typedef struct StampCache
{
	Oid			relid;
	Oid			seqid;			/* pgrelay.hlc_logical */
	Oid			genid;			/* pgrelay.hlc_gen */
	Oid			owner;			/* pgrelay.hlc_logical's owner */
	FmgrInfo	advance;		/* pgrelay.advance_hlc(bigint) */
	int			attnum;
	int64		region;
} StampCache;

static Oid
pgrelay_sequence(Oid nsp, const char *name)
{
	Oid			seqid = get_relname_relid(name, nsp);

	if (!OidIsValid(seqid) || get_rel_relkind(seqid) != RELKIND_SEQUENCE)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("pgrelay: sequence pgrelay.%s does not exist; run pgrelay setup", name)));
	return seqid;
}

/* The owner of relation relid. */
static Oid
relation_owner(Oid relid)
{
	HeapTuple	tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
	Oid			owner;

	if (!HeapTupleIsValid(tuple))
		elog(ERROR, "pgrelay: cache lookup failed for relation %u", relid);
	owner = ((Form_pg_class) GETSTRUCT(tuple))->relowner;
	ReleaseSysCache(tuple);
	return owner;
}

/*
 * Function pgrelay.name(argtypes), looked up as owner (the writer may not
 * use schema pgrelay), into flinfo.
 */
static void
pgrelay_function(Oid owner, const char *name, int nargs, Oid *argtypes,
				 FmgrInfo *flinfo, MemoryContext mcxt)
{
	Oid			save_userid;
	int			save_sec_context;
	Oid			fn;

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(owner, save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	fn = LookupFuncName(list_make2(makeString("pgrelay"), makeString(pstrdup(name))),
						nargs, argtypes, true);
	SetUserIdAndSecContext(save_userid, save_sec_context);
	if (!OidIsValid(fn))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("pgrelay: function pgrelay.%s does not exist; run pgrelay setup", name)));
	fmgr_info_cxt(fn, flinfo, mcxt);
}

/* A sequence's last value given out, 0 before its first. */
static int64
sequence_last(Oid seqid)
{
	LOCAL_FCINFO(fcinfo, 1);
	Datum		value;

	InitFunctionCallInfoData(*fcinfo, NULL, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = ObjectIdGetDatum(seqid);
	fcinfo->args[0].isnull = false;
	value = pg_sequence_last_value(fcinfo);
	return fcinfo->isnull ? 0 : DatumGetInt64(value);
}

static StampCache *
stamp_cache(FunctionCallInfo fcinfo, TriggerData *trigdata)
{
	StampCache *cache = (StampCache *) fcinfo->flinfo->fn_extra;
	Relation	rel = trigdata->tg_relation;
	Trigger    *trigger = trigdata->tg_trigger;
	const char *column = DEFAULT_COLUMN;
	char	   *end;
	long		region;
	Oid			nsp;

	if (cache != NULL && cache->relid == RelationGetRelid(rel))
		return cache;
	if (trigger->tgnargs < 1 || trigger->tgnargs > 2)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("pgrelay: trigger %s on %s: pgrelay.stamp_row_c takes the region id and optionally the column",
						trigger->tgname, RelationGetRelationName(rel))));
	region = strtol(trigger->tgargs[0], &end, 10);
	if (end == trigger->tgargs[0] || *end != '\0' || trigger->tgargs[0][0] < '0' ||
		trigger->tgargs[0][0] > '9' || region < 0 || region >= (1 << REGION_BITS))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("pgrelay: trigger %s on %s: region id \"%s\" is not a number from 0 to %d",
						trigger->tgname, RelationGetRelationName(rel),
						trigger->tgargs[0], (1 << REGION_BITS) - 1)));
	if (trigger->tgnargs == 2)
		column = trigger->tgargs[1];

	nsp = get_namespace_oid("pgrelay", false);
	if (cache == NULL)
		cache = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(StampCache));
	/* not valid for any table until every check below passed */
	cache->relid = InvalidOid;
	cache->seqid = pgrelay_sequence(nsp, "hlc_logical");
	cache->genid = pgrelay_sequence(nsp, "hlc_gen");
	cache->owner = relation_owner(cache->seqid);
	{
		Oid			argtypes[1] = {INT8OID};

		pgrelay_function(cache->owner, "advance_hlc", 1, argtypes, &cache->advance,
						 fcinfo->flinfo->fn_mcxt);
	}
	cache->attnum = SPI_fnumber(RelationGetDescr(rel), column);
	if (cache->attnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("pgrelay: table %s has no column %s; run pgrelay setup",
						RelationGetRelationName(rel), column)));
	if (TupleDescAttr(RelationGetDescr(rel), cache->attnum - 1)->atttypid != INT8OID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("pgrelay: column %s of %s must be bigint",
						column, RelationGetRelationName(rel))));
	cache->region = region;
	cache->relid = RelationGetRelid(rel);
	fcinfo->flinfo->fn_extra = cache;
	return cache;
}

Datum
pgrelay_stamp_row(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	StampCache *cache;
	HeapTuple	tuple;
	TupleDesc	desc;
	int64		prev = 0;
	int64		wall_ms;
	int64		target;
	int64		l;
	int64		gen;
	Datum		value;
	bool		isnull = false;
	int			attnum;
	Oid			save_userid;
	int			save_sec_context;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("pgrelay.stamp_row_c: not called by the trigger manager")));
	if (!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_ROW(trigdata->tg_event) ||
		!(TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) ||
		  TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("pgrelay.stamp_row_c: must fire BEFORE INSERT OR UPDATE FOR EACH ROW")));

	cache = stamp_cache(fcinfo, trigdata);
	desc = RelationGetDescr(trigdata->tg_relation);
	attnum = cache->attnum;

	if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		bool		old_null;
		Datum		old = heap_getattr(trigdata->tg_trigtuple, attnum, desc, &old_null);

		if (!old_null)
			prev = DatumGetInt64(old) >> REGION_BITS;
		tuple = trigdata->tg_newtuple;
	}
	else
		tuple = trigdata->tg_trigtuple;

	/*
	 * as the clock's owner, like a SECURITY DEFINER function; an error
	 * restores the writer's identity with the (sub)transaction's abort
	 */
	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(cache->owner, save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	gen = sequence_last(cache->genid);
	l = nextval_internal(cache->seqid, false);
	/* clock_timestamp() in milliseconds since the Unix epoch, floored */
	wall_ms = (GetCurrentTimestamp() +
			   (int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * USECS_PER_DAY);
	wall_ms = wall_ms >= 0 ? wall_ms / 1000 : -((-wall_ms + 999) / 1000);
	target = Max(wall_ms << COUNTER_BITS, prev + 1);

	/*
	 * past the last logical time a stamp can hold: refuse rather than wrap,
	 * and before the sequence is set (setval outlives a rollback)
	 */
	if (Max(l, target) >= LIMIT)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("pgrelay: the region clock is exhausted (logical time " INT64_FORMAT ")",
						Max(l, target))));
	/* a new millisecond, a floor above the clock, or an advance meanwhile */
	if (l < target || gen % 2 == 1 || gen != sequence_last(cache->genid))
		l = DatumGetInt64(FunctionCall1(&cache->advance, Int64GetDatum(target)));
	SetUserIdAndSecContext(save_userid, save_sec_context);

	value = Int64GetDatum((l << REGION_BITS) | cache->region);
	tuple = heap_modify_tuple_by_cols(tuple, desc, 1, &attnum, &value, &isnull);
	return PointerGetDatum(tuple);
}

/*
 * The fence guard: refuses the statement while pgrelay.fence holds a row.
 * The table is read with the latest snapshot, not the transaction's: a
 * REPEATABLE READ or SERIALIZABLE transaction that began before the fence
 * is refused as well. Fires in local sessions only, like every pgrelay
 * trigger (the apply side writes as session_replication_role = replica).
 */
Datum
pgrelay_fence_guard(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Oid			fence;
	Relation	rel;
	Snapshot	snapshot;
	TableScanDesc scan;
	HeapTuple	tuple;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_BEFORE(trigdata->tg_event) ||
		!TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("pgrelay.fence_guard_c: must fire BEFORE ... FOR EACH STATEMENT")));

	fence = get_relname_relid("fence", get_namespace_oid("pgrelay", false));
	if (!OidIsValid(fence))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("pgrelay: table pgrelay.fence does not exist; run pgrelay setup")));

	rel = table_open(fence, AccessShareLock);
	snapshot = RegisterSnapshot(GetLatestSnapshot());
	scan = table_beginscan(rel, snapshot, 0, NULL);
	tuple = heap_getnext(scan, ForwardScanDirection);
	if (tuple != NULL)
	{
		TupleDesc	desc = RelationGetDescr(rel);
		bool		region_null;
		bool		at_null;
		bool		reason_null;
		Datum		region = heap_getattr(tuple, 1, desc, &region_null);
		Datum		at = heap_getattr(tuple, 2, desc, &at_null);
		Datum		reason = heap_getattr(tuple, 3, desc, &reason_null);
		char	   *region_s = region_null ? "" : TextDatumGetCString(region);
		char	   *at_s = at_null ? "" :
			DatumGetCString(DirectFunctionCall1(timestamptz_out, at));
		Relation	target = trigdata->tg_relation;

		ereport(ERROR,
				(errcode(ERRCODE_READ_ONLY_SQL_TRANSACTION),
				 errmsg("region %s is fenced (since %s): local writes to %s.%s are refused",
						region_s, at_s,
						get_namespace_name(RelationGetNamespace(target)),
						RelationGetRelationName(target)),
				 errhint("%s%s%slift it with pgrelay unfence --region %s",
						 reason_null ? "" : "reason: ",
						 reason_null ? "" : TextDatumGetCString(reason),
						 reason_null ? "" : "; ",
						 region_s)));
	}
	table_endscan(scan);
	UnregisterSnapshot(snapshot);
	table_close(rel, AccessShareLock);
	return PointerGetDatum(NULL);
}

/* What the tombstone check needs on every call, looked up on its first. */
typedef struct CheckCache
{
	Oid			relid;
	Oid			tombstones;		/* pgrelay.tombstones */
	Oid			index;			/* its index on (table_name, hlc) */
	AttrNumber	hlc_attnum;		/* tombstones.hlc */
	int			attnum;			/* the row's stamp column */
	text	   *name;			/* the table as tombstones name it */
	FmgrInfo	check;			/* pgrelay.check_tombstone() */
} CheckCache;

static CheckCache *
check_cache(FunctionCallInfo fcinfo, TriggerData *trigdata)
{
	CheckCache *cache = (CheckCache *) fcinfo->flinfo->fn_extra;
	Relation	rel = trigdata->tg_relation;
	MemoryContext mcxt = fcinfo->flinfo->fn_mcxt;
	Oid			nsp;
	char	   *name;

	if (cache != NULL && cache->relid == RelationGetRelid(rel))
		return cache;
	nsp = get_namespace_oid("pgrelay", false);
	if (cache == NULL)
		cache = MemoryContextAllocZero(mcxt, sizeof(CheckCache));
	/* not valid for any table until every check below passed */
	cache->relid = InvalidOid;
	cache->tombstones = get_relname_relid("tombstones", nsp);
	cache->index = get_relname_relid("tombstones_table_hlc", nsp);
	if (!OidIsValid(cache->tombstones) || !OidIsValid(cache->index))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("pgrelay: table pgrelay.tombstones or its index tombstones_table_hlc does not exist; run pgrelay setup")));
	cache->hlc_attnum = get_attnum(cache->tombstones, "hlc");
	cache->attnum = SPI_fnumber(RelationGetDescr(rel), DEFAULT_COLUMN);
	if (cache->hlc_attnum <= 0 || cache->attnum <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("pgrelay: table %s has no column %s; run pgrelay setup",
						RelationGetRelationName(rel), DEFAULT_COLUMN)));
	name = psprintf("%s.%s", get_namespace_name(RelationGetNamespace(rel)),
					RelationGetRelationName(rel));
	if (cache->name != NULL)
		pfree(cache->name);
	cache->name = (text *) MemoryContextAlloc(mcxt, VARHDRSZ + strlen(name));
	SET_VARSIZE(cache->name, VARHDRSZ + strlen(name));
	memcpy(VARDATA(cache->name), name, strlen(name));
	{
		Oid			none[1] = {InvalidOid};

		pgrelay_function(relation_owner(cache->tombstones), "check_tombstone", 0, none,
						 &cache->check, mcxt);
	}
	cache->relid = RelationGetRelid(rel);
	fcinfo->flinfo->fn_extra = cache;
	return cache;
}

/*
 * The newest tombstone stamp of the table, read with the latest snapshot
 * (one backward probe of the index on (table_name, hlc)); false when the
 * table has none.
 */
static bool
newest_tombstone(CheckCache *cache, int64 *newest)
{
	Relation	heap = table_open(cache->tombstones, AccessShareLock);
	Relation	index = index_open(cache->index, AccessShareLock);
	Snapshot	snapshot = RegisterSnapshot(GetLatestSnapshot());
	TupleTableSlot *slot = table_slot_create(heap, NULL);
	ScanKeyData key;
	IndexScanDesc scan;
	bool		found = false;

	ScanKeyEntryInitialize(&key, 0, 1, BTEqualStrategyNumber, InvalidOid,
						   index->rd_indcollation[0], F_TEXTEQ,
						   PointerGetDatum(cache->name));
#if PG_VERSION_NUM >= 180000
	scan = index_beginscan(heap, index, snapshot, NULL, 1, 0);
#else
	scan = index_beginscan(heap, index, snapshot, 1, 0);
#endif
	index_rescan(scan, &key, 1, NULL, 0);
	if (index_getnext_slot(scan, BackwardScanDirection, slot))
	{
		bool		isnull;
		Datum		hlc = slot_getattr(slot, cache->hlc_attnum, &isnull);

		if (!isnull)
		{
			*newest = DatumGetInt64(hlc);
			found = true;
		}
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	UnregisterSnapshot(snapshot);
	index_close(index, AccessShareLock);
	table_close(heap, AccessShareLock);
	return found;
}

/*
 * The insert's tombstone check, the fast path of the PL/pgSQL
 * pgrelay.check_tombstone() (its arguments are the key columns): AFTER
 * INSERT FOR EACH STATEMENT with the new rows as a transition table, or AFTER
 * UPDATE of the key FOR EACH ROW. Rows stamped above their table's newest
 * tombstone pass on one index probe per call; otherwise the PL/pgSQL
 * function, given this trigger's call, compares the keys and refuses the
 * write.
 */
Datum
pgrelay_check_tombstone(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Relation	rel;
	CheckCache *cache;
	int64		oldest = PG_INT64_MAX;
	int64		newest;
	bool		any = false;
	bool		isnull;
	Datum		stamp;

	if (!CALLED_AS_TRIGGER(fcinfo) ||
		!TRIGGER_FIRED_AFTER(trigdata->tg_event) ||
		!(TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event) ?
		  TRIGGER_FIRED_BY_INSERT(trigdata->tg_event) && trigdata->tg_newtable != NULL :
		  TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) || TRIGGER_FIRED_BY_INSERT(trigdata->tg_event)))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("pgrelay.check_tombstone_c: must fire AFTER INSERT FOR EACH STATEMENT "
						"with a NEW TABLE, or AFTER INSERT OR UPDATE FOR EACH ROW")));
	rel = trigdata->tg_relation;
	cache = check_cache(fcinfo, trigdata);
	if (TRIGGER_FIRED_FOR_STATEMENT(trigdata->tg_event))
	{
		/* the oldest stamp among the new rows */
		TupleTableSlot *slot = MakeSingleTupleTableSlot(RelationGetDescr(rel),
														&TTSOpsMinimalTuple);

		tuplestore_rescan(trigdata->tg_newtable);
		while (tuplestore_gettupleslot(trigdata->tg_newtable, true, false, slot))
		{
			stamp = slot_getattr(slot, cache->attnum, &isnull);
			if (!isnull)
			{
				oldest = Min(oldest, DatumGetInt64(stamp));
				any = true;
			}
		}
		ExecDropSingleTupleTableSlot(slot);
	}
	else
	{
		HeapTuple	tuple = TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event) ?
			trigdata->tg_newtuple : trigdata->tg_trigtuple;

		stamp = heap_getattr(tuple, cache->attnum, RelationGetDescr(rel), &isnull);
		if (!isnull)
		{
			oldest = DatumGetInt64(stamp);
			any = true;
		}
	}
	if (!any || !newest_tombstone(cache, &newest) || newest < oldest)
		return PointerGetDatum(NULL);
	{
		LOCAL_FCINFO(check, 0);

		InitFunctionCallInfoData(*check, &cache->check, 0, InvalidOid,
								 (Node *) trigdata, NULL);
		FunctionCallInvoke(check);
	}
	return PointerGetDatum(NULL);
}
