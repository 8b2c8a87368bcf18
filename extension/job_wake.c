/*-------------------------------------------------------------------------
 *
 * job_wake.c
 *	  Waking the job runners when a transaction that queued work commits,
 *	  and the rule scheduler when one that changed the rules commits.
 *
 * Each runner, and the scheduler, puts its PGPROC number in a small shared
 * array when it starts.  mdd._wake_runners() and mdd._wake_scheduler()
 * mark the calling transaction; at its commit the latches are set, so
 * these workers sleep until there is work instead of polling tables.
 * Without shared_preload_libraries there is no array and no worker, and
 * waking does nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"

#include "mdd.h"

typedef struct RunnerLatches
{
	int			pgprocno[MDD_MAX_RUNNERS];	/* -1: slot not running */
	int			scheduler_pgprocno; /* -1: not running */
} RunnerLatches;

static RunnerLatches *runner_latches = NULL;
static bool wake_at_commit = false;
static bool wake_scheduler_at_commit = false;

static void
init_latches(void *region)
{
	RunnerLatches *latches = region;

	for (int i = 0; i < MDD_MAX_RUNNERS; i++)
		latches->pgprocno[i] = -1;
	latches->scheduler_pgprocno = -1;
}

static void
wake_procno(int procno)
{
	if (procno >= 0)
		SetLatch(&ProcGlobal->allProcs[procno].procLatch);
}

static void
wake_all(void)
{
	if (runner_latches == NULL)
		return;
	for (int i = 0; i < MDD_MAX_RUNNERS; i++)
		wake_procno(runner_latches->pgprocno[i]);
}

static void
job_wake_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_at_commit)
				wake_all();
			if (wake_scheduler_at_commit && runner_latches != NULL)
				wake_procno(runner_latches->scheduler_pgprocno);
			wake_at_commit = false;
			wake_scheduler_at_commit = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			wake_at_commit = false;
			wake_scheduler_at_commit = false;
			break;
		default:
			break;
	}
}

/* from _PG_init; the shared array only when preloading */
void
mdd_job_wake_init(bool preloading)
{
	RegisterXactCallback(job_wake_xact_callback, NULL);
	if (preloading)
		mdd_shmem_region("mdd job runners", sizeof(RunnerLatches), (void **) &runner_latches,
						 init_latches);
}

static void
detach_runner(int code, Datum arg)
{
	if (runner_latches != NULL)
		runner_latches->pgprocno[DatumGetInt32(arg)] = -1;
}

/* a runner (slot from 0) makes its latch known; undone when it exits */
void
mdd_runner_attach(int slot)
{
	if (runner_latches == NULL || slot < 0 || slot >= MDD_MAX_RUNNERS)
		return;
	runner_latches->pgprocno[slot] = MyProc->pgprocno;
	on_shmem_exit(detach_runner, Int32GetDatum(slot));
}

static void
detach_scheduler(int code, Datum arg)
{
	if (runner_latches != NULL)
		runner_latches->scheduler_pgprocno = -1;
}

/* the rule scheduler makes its latch known; undone when it exits */
void
mdd_scheduler_attach(void)
{
	if (runner_latches == NULL)
		return;
	runner_latches->scheduler_pgprocno = MyProc->pgprocno;
	on_shmem_exit(detach_scheduler, (Datum) 0);
}

PG_FUNCTION_INFO_V1(mdd_wake_runners_sql);
PG_FUNCTION_INFO_V1(mdd_wake_scheduler_sql);

Datum
mdd_wake_runners_sql(PG_FUNCTION_ARGS)
{
	wake_at_commit = true;
	PG_RETURN_VOID();
}

Datum
mdd_wake_scheduler_sql(PG_FUNCTION_ARGS)
{
	wake_scheduler_at_commit = true;
	PG_RETURN_VOID();
}
