/*-------------------------------------------------------------------------
 *
 * tally.c
 *	  Object counts of series and studies, kept ready for queries
 *	  (C-FIND's Number of ... Related Instances) without serialising stores.
 *
 * Counting each object with its own UPDATE would make concurrent stores
 * into one study wait for each other, and would make a long import (one
 * subtransaction per file) walk ever longer chains of row versions.  So a
 * store only notes its object here (mdd._tally), in backend memory, and the
 * counts are added with one UPDATE per touched series and study just before
 * the transaction commits, in id order so that concurrent commits cannot
 * deadlock.  Tallies of aborted subtransactions are dropped.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "mdd.h"

PG_FUNCTION_INFO_V1(mdd_tally_sql);

typedef struct Tally
{
	int64		series;
	int64		study;
	SubTransactionId subid;
	Oid			owner;			/* role that owns the catalog (the definer) */
} Tally;

static List *tallies = NIL;		/* of Tally *, in TopMemoryContext */

static int
compare_int64(const void *a, const void *b)
{
	int64		x = *(const int64 *) a;
	int64		y = *(const int64 *) b;

	return (x > y) - (x < y);
}

/* add the counts of one column (0 = series, 1 = study) */
static void
apply_counts(bool study)
{
	int			n = list_length(tallies);
	int64	   *ids = palloc(sizeof(int64) * n);
	ListCell   *lc;
	int			i = 0;
	SPIPlanPtr	plan;
	Oid			types[2] = {INT8OID, INT4OID};

	foreach(lc, tallies)
	{
		Tally	   *t = (Tally *) lfirst(lc);

		ids[i++] = study ? t->study : t->series;
	}
	qsort(ids, n, sizeof(int64), compare_int64);

	plan = SPI_prepare(study
					   ? "UPDATE mdd.study SET object_count = object_count + $2 WHERE id = $1"
					   : "UPDATE mdd.series SET object_count = object_count + $2 WHERE id = $1",
					   2, types);
	if (plan == NULL)
		elog(ERROR, "could not prepare the count update: %s", SPI_result_code_string(SPI_result));
	for (i = 0; i < n;)
	{
		int			j = i;
		Datum		values[2];

		while (j < n && ids[j] == ids[i])
			j++;
		values[0] = Int64GetDatum(ids[i]);
		values[1] = Int32GetDatum(j - i);
		if (SPI_execute_plan(plan, values, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "could not update object counts");
		i = j;
	}
	SPI_freeplan(plan);
	pfree(ids);
}

/*
 * Apply the tallies.  This runs at commit as whoever committed, so it
 * takes the identity of the catalog's owner that _tally recorded (mdd's
 * SECURITY DEFINER functions call it), as those functions would.
 */
static void
flush_tallies(void)
{
	Oid			save_userid;
	int			save_sec_context;

	if (tallies == NIL)
		return;
	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(((Tally *) linitial(tallies))->owner,
						   save_sec_context | SECURITY_LOCAL_USERID_CHANGE);
	PushActiveSnapshot(GetTransactionSnapshot());
	SPI_connect();
	apply_counts(false);
	apply_counts(true);
	SPI_finish();
	PopActiveSnapshot();
	SetUserIdAndSecContext(save_userid, save_sec_context);
	list_free_deep(tallies);
	tallies = NIL;
}

static void
tally_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
			flush_tallies();
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			list_free_deep(tallies);
			tallies = NIL;
			break;
		default:
			break;
	}
}

static void
tally_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
					   SubTransactionId parentSubid, void *arg)
{
	ListCell   *lc;

	foreach(lc, tallies)
	{
		Tally	   *t = (Tally *) lfirst(lc);

		if (t->subid != mySubid)
			continue;
		if (event == SUBXACT_EVENT_COMMIT_SUB)
			t->subid = parentSubid;
		else if (event == SUBXACT_EVENT_ABORT_SUB)
		{
			pfree(t);
			tallies = foreach_delete_current(tallies, lc);
		}
	}
}

void
mdd_tally_init(void)
{
	RegisterXactCallback(tally_xact_callback, NULL);
	RegisterSubXactCallback(tally_subxact_callback, NULL);
}

/*
 * mdd._tally(series bigint, study bigint) RETURNS void
 *
 * Count one new object in its series and study at commit.
 */
Datum
mdd_tally_sql(PG_FUNCTION_ARGS)
{
	MemoryContext old;
	Tally	   *t;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_VOID();
	old = MemoryContextSwitchTo(TopMemoryContext);
	t = palloc(sizeof(Tally));
	t->series = PG_GETARG_INT64(0);
	t->study = PG_GETARG_INT64(1);
	t->subid = GetCurrentSubTransactionId();
	t->owner = GetUserId();
	tallies = lappend(tallies, t);
	MemoryContextSwitchTo(old);
	PG_RETURN_VOID();
}
