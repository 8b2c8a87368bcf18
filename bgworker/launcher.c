/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The mdd launcher: one static background worker that keeps the DICOM
 *	  listeners, the job runners, the rule scheduler and the HTTP workers
 *	  running.
 *
 * It connects to mdd.database, waits until the extension exists there,
 * then starts mdd.dicom_workers listeners (when the DICOM port is open),
 * mdd.job_workers runners and one rule scheduler as dynamic workers, and
 * starts again any that exits.  It learns of exits through its latch (it is the workers'
 * bgw_notify_pid), so it never polls them in a tight loop.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "../extension/mdd.h"
#include "http.h"
#include "workers.h"

#define MDD_MAX_LISTENERS 64

typedef struct WorkerSlot
{
	BackgroundWorkerHandle *handle;
	TimestampTz started_at;
} WorkerSlot;

/* one kind of worker the launcher keeps running */
typedef struct WorkerKind
{
	const char *function;		/* entry point in mdd.so */
	const char *name;			/* "mdd dicom listener", numbered from 1 */
	WorkerSlot *slots;
	int			max;
} WorkerKind;

static WorkerSlot listener_slots[MDD_MAX_LISTENERS];
static WorkerSlot runner_slots[MDD_MAX_RUNNERS];
static WorkerSlot scheduler_slot[1];
static WorkerSlot http_slots[64];
static WorkerKind listeners = {"mdd_listener_main", "mdd dicom listener", listener_slots, MDD_MAX_LISTENERS};
static WorkerKind runners = {"mdd_runner_main", "mdd job runner", runner_slots, MDD_MAX_RUNNERS};
static WorkerKind scheduler = {"mdd_scheduler_main", "mdd rule scheduler", scheduler_slot, 1};
static WorkerKind http_workers = {"mdd_http_main", "mdd http", http_slots, 64};

/* register the launcher from _PG_init (shared_preload_libraries only) */
void
mdd_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "mdd");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "mdd_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "mdd launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "mdd launcher");
	RegisterBackgroundWorker(&worker);
}

/* true once CREATE EXTENSION mdd has been run in mdd.database */
static bool
extension_exists(void)
{
	bool		exists;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "looking for extension mdd");
	if (SPI_execute("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'mdd'", true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not look up extension mdd");
	exists = SPI_processed > 0;
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	return exists;
}

static void
start_worker(WorkerKind *kind, int slot)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;	/* the launcher restarts it */
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "mdd");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "%s", kind->function);
	snprintf(worker.bgw_name, BGW_MAXLEN, "%s %d", kind->name, slot + 1);
	snprintf(worker.bgw_type, BGW_MAXLEN, "%s", kind->name);
	worker.bgw_main_arg = Int32GetDatum(slot + 1);
	worker.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&worker, &kind->slots[slot].handle))
	{
		kind->slots[slot].handle = NULL;
		ereport(LOG,
				(errmsg("mdd: could not start %s %d", kind->name, slot + 1),
				 errhint("Raise max_worker_processes (mdd needs 2 + mdd.dicom_workers + mdd.job_workers + mdd.http_workers).")));
		return;
	}
	kind->slots[slot].started_at = GetCurrentTimestamp();
}

/*
 * Start the workers of a kind that are not running, n of them.  A worker
 * that died less than a second after it started is given a second's pause
 * first, so that a worker failing at once cannot make the launcher spin.
 * Returns the milliseconds until the launcher should look again.
 */
static long
keep_running(WorkerKind *kind, int n)
{
	long		next = 60000;

	n = Min(n, kind->max);
	for (int i = 0; i < n; i++)
	{
		WorkerSlot *slot = &kind->slots[i];
		pid_t		pid;

		if (slot->handle != NULL && GetBackgroundWorkerPid(slot->handle, &pid) != BGWH_STOPPED)
			continue;
		if (slot->handle != NULL)
		{
			long		ran = (GetCurrentTimestamp() - slot->started_at) / 1000;

			if (ran < 1000)
			{
				next = Min(next, 1000 - ran);
				continue;
			}
			ereport(LOG, (errmsg("mdd: %s %d exited, starting it again", kind->name, i + 1)));
			pfree(slot->handle);
			slot->handle = NULL;
		}
		start_worker(kind, i);
		if (slot->handle == NULL)
			next = Min(next, 10000);
	}
	return next;
}

static void
stop_all(WorkerKind *kind)
{
	for (int i = 0; i < kind->max; i++)
		if (kind->slots[i].handle != NULL)
			TerminateBackgroundWorker(kind->slots[i].handle);
}

void
mdd_launcher_main(Datum arg)
{
	bool		ready = false;

	mdd_worker_setup_signals();
	BackgroundWorkerInitializeConnection(mdd_database, NULL, 0);
	pgstat_report_appname("mdd launcher");

	while (!mdd_got_sigterm)
	{
		long		timeout = 5000;

		CHECK_FOR_INTERRUPTS();
		mdd_worker_reload_if_asked();

		if (!ready)
		{
			ready = extension_exists();
			if (ready)
				ereport(LOG, (errmsg("mdd launcher: extension found in database \"%s\"",
									 mdd_database)));
		}
		if (ready)
		{
			timeout = keep_running(&runners, mdd_job_workers);
			timeout = Min(timeout, keep_running(&scheduler, 1));
			if (mdd_listen_fd >= 0)
				timeout = Min(timeout, keep_running(&listeners, mdd_dicom_workers));
			if (mdd_http_listen_fd >= 0)
				timeout = Min(timeout, keep_running(&http_workers, mdd_http_workers));
		}

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	stop_all(&listeners);
	stop_all(&runners);
	stop_all(&scheduler);
	stop_all(&http_workers);
	proc_exit(0);
}
