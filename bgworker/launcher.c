/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The mdd launcher: one static background worker that keeps the DICOM
 *	  listener workers running.
 *
 * It connects to mdd.database, waits until the extension exists there,
 * then starts mdd.dicom_workers listeners as dynamic workers and starts
 * again any that exits.  It learns of exits through its latch (it is the
 * listeners' bgw_notify_pid), so it never polls them in a tight loop.
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

#include "workers.h"

#define MDD_MAX_LISTENERS 64

typedef struct ListenerSlot
{
	BackgroundWorkerHandle *handle;
	TimestampTz started_at;
} ListenerSlot;

static ListenerSlot listeners[MDD_MAX_LISTENERS];

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
start_listener(int slot)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;	/* the launcher restarts it */
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "mdd");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "mdd_listener_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "mdd dicom listener %d", slot + 1);
	snprintf(worker.bgw_type, BGW_MAXLEN, "mdd dicom listener");
	worker.bgw_main_arg = Int32GetDatum(slot + 1);
	worker.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&worker, &listeners[slot].handle))
	{
		listeners[slot].handle = NULL;
		ereport(LOG,
				(errmsg("mdd: could not start DICOM listener %d", slot + 1),
				 errhint("Raise max_worker_processes (mdd needs 1 + mdd.dicom_workers).")));
		return;
	}
	listeners[slot].started_at = GetCurrentTimestamp();
}

/*
 * Start listeners that are not running.  A listener that died less than a
 * second after it started is given a second's pause first, so that a
 * listener failing at once cannot make the launcher spin.  Returns the
 * milliseconds until the launcher should look again.
 */
static long
keep_listeners_running(void)
{
	long		next = 60000;
	int			n = Min(mdd_dicom_workers, MDD_MAX_LISTENERS);

	for (int i = 0; i < n; i++)
	{
		pid_t		pid;

		if (listeners[i].handle != NULL &&
			GetBackgroundWorkerPid(listeners[i].handle, &pid) != BGWH_STOPPED)
			continue;
		if (listeners[i].handle != NULL)
		{
			long		ran = (GetCurrentTimestamp() - listeners[i].started_at) / 1000;

			if (ran < 1000)
			{
				next = Min(next, 1000 - ran);
				continue;
			}
			ereport(LOG, (errmsg("mdd: DICOM listener %d exited, starting it again", i + 1)));
			pfree(listeners[i].handle);
			listeners[i].handle = NULL;
		}
		start_listener(i);
		if (listeners[i].handle == NULL)
			next = Min(next, 10000);
	}
	return next;
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
		if (ready && mdd_listen_fd >= 0)
			timeout = keep_listeners_running();
		else if (ready)
			timeout = 60000;

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}

	for (int i = 0; i < MDD_MAX_LISTENERS; i++)
		if (listeners[i].handle != NULL)
			TerminateBackgroundWorker(listeners[i].handle);
	proc_exit(0);
}
