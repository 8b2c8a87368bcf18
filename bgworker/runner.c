/*-------------------------------------------------------------------------
 *
 * runner.c
 *	  A job runner: takes jobs from the durable queue (mdd.job) and works
 *	  through them one bounded step at a time (sql/lifecycle.sql).
 *
 * A runner holds a session advisory lock on the job it works on, so no two
 * runners take the same job, and a runner that dies releases it.  Each
 * step runs in its own transaction.  A step that fails is reported to
 * mdd._job_error, which retries transient failures later with back-off
 * and fails the job for permanent ones.  Between jobs the runner sleeps on
 * its latch: a commit that queues work wakes it (extension/job_wake.c), or
 * the time of the next retry.  SIGTERM ends it at once (die): a step cut
 * short is rolled back and done again by whoever resumes the job.  The
 * network steps of retrieve and move jobs run outside any transaction
 * (fetch_step.c); SIGTERM shuts their connection down as well.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>
#include <sys/socket.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "../extension/mdd.h"
#include "workers.h"

static int	runner_number;

/*
 * SIGTERM: PostgreSQL's die, after shutting down the connection of a
 * network step (fetch_step.c), so that a read DCMTK is blocked in returns
 * at once (shutdown() is async-signal-safe).
 */
static void
runner_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	if (mdd_connection_fd >= 0)
		(void) shutdown(mdd_connection_fd, SHUT_RDWR);
	errno = save_errno;
	die(postgres_signal_arg);
}

/* tell the queue a step of the job failed; it decides retry or failure */
static void
report_failure(int64 job, ErrorData *edata)
{
	MemoryContext caller = CurrentMemoryContext;

	ereport(LOG,
			(errmsg("mdd job runner %d: job " INT64_FORMAT ": %s (SQLSTATE %s)",
					runner_number, job, edata->message, unpack_sql_state(edata->sqlerrcode))));
	PG_TRY();
	{
		Oid			types[3] = {INT8OID, TEXTOID, TEXTOID};
		Datum		values[3];

		values[0] = Int64GetDatum(job);
		values[1] = CStringGetTextDatum(unpack_sql_state(edata->sqlerrcode));
		values[2] = CStringGetTextDatum(edata->message);
		mdd_worker_begin_transaction("recording a job failure");
		if (SPI_execute_with_args("SELECT mdd._job_error($1, $2, $3)", 3, types, values,
								  NULL, false, 0) < 0)
			elog(ERROR, "could not record the failure of job " INT64_FORMAT, job);
		mdd_worker_commit_transaction();
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	PG_CATCH();
	{
		ErrorData  *again;

		MemoryContextSwitchTo(caller);
		again = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		ereport(LOG,
				(errmsg("mdd job runner %d: could not record the failure of job " INT64_FORMAT ": %s",
						runner_number, job, again->message)));
	}
	PG_END_TRY();
}

/* work on a claimed job until it finishes, waits or fails a step */
static void
work_on(int64 job)
{
	char	   *activity = psprintf("job " INT64_FORMAT, job);
	ErrorData  *error;
	char	   *result;

	ereport(DEBUG1, (errmsg("mdd job runner %d: working on job " INT64_FORMAT,
							runner_number, job)));
	for (;;)
	{
		CHECK_FOR_INTERRUPTS();
		result = mdd_worker_run_sql(activity, "SELECT mdd._job_step($1)", job, true, &error);
		if (!error && result && strcmp(result, "network") == 0)
		{
			/* a retrieve or move job asks its node: no transaction open */
			pfree(result);
			result = mdd_fetch_step(job, &error);
		}
		if (error)
		{
			report_failure(job, error);
			FreeErrorData(error);
			break;
		}
		if (result == NULL || strcmp(result, "more") != 0)
		{
			if (result && strcmp(result, "finished") == 0)
				ereport(LOG,
						(errmsg("mdd job runner %d: job " INT64_FORMAT " ended",
								runner_number, job)));
			break;
		}
		pfree(result);
	}
	(void) mdd_worker_run_sql(activity, "SELECT mdd._release_job($1)", job, true, &error);
	if (error)
	{
		/* the lock ends with the session at worst; say so and go on */
		ereport(LOG, (errmsg("mdd job runner %d: %s", runner_number, error->message)));
		FreeErrorData(error);
	}
	pfree(activity);
}

/* milliseconds until the next retry is due, or -1 when none is waiting */
static long
next_due_ms(void)
{
	ErrorData  *error;
	char	   *due = mdd_worker_run_sql("looking for work", "SELECT mdd._next_job_due()", 0, false, &error);
	long		ms = -1;

	if (error)
	{
		ereport(LOG, (errmsg("mdd job runner %d: %s", runner_number, error->message)));
		FreeErrorData(error);
		return 10000;
	}
	if (due)
		ms = (long) Min(ceil(strtod(due, NULL) * 1000.0) + 10, 3600 * 1000.0);
	return ms;
}

void
mdd_runner_main(Datum arg)
{
	ErrorData  *error;
	char	   *result;

	runner_number = DatumGetInt32(arg);
	mdd_worker_setup_signals();
	pqsignal(SIGTERM, runner_sigterm);
	BackgroundWorkerInitializeConnection(mdd_database, NULL, 0);
	pgstat_report_appname(psprintf("mdd job runner %d", runner_number));
	mdd_runner_attach(runner_number - 1);

	/* what a crash left half done and no job will finish */
	result = mdd_worker_run_sql("recovering copies", "SELECT mdd._recover_copies()", 0, false, &error);
	if (error)
	{
		ereport(LOG, (errmsg("mdd job runner %d: recovery of copies failed: %s",
							 runner_number, error->message)));
		FreeErrorData(error);
	}
	else if (result && strcmp(result, "0") != 0)
		ereport(LOG, (errmsg("mdd job runner %d: removed %s copies left half done",
							 runner_number, result)));

	for (;;)
	{
		long		timeout;
		int64		job = 0;

		CHECK_FOR_INTERRUPTS();
		mdd_worker_reload_if_asked();

		result = mdd_worker_run_sql("looking for work", "SELECT mdd._claim_job()", 0, false, &error);
		if (error)
		{
			ereport(LOG, (errmsg("mdd job runner %d: %s", runner_number, error->message)));
			FreeErrorData(error);
		}
		else if (result)
			job = strtoll(result, NULL, 10);
		if (job > 0)
		{
			work_on(job);
			continue;
		}

		timeout = error ? 10000 : next_due_ms();
		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_EXIT_ON_PM_DEATH | (timeout >= 0 ? WL_TIMEOUT : 0),
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
