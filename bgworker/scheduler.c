/*-------------------------------------------------------------------------
 *
 * scheduler.c
 *	  The rule scheduler: starts the runs of archive rules when their cron
 *	  schedule fires inside their window (sql/rules.sql).
 *
 * One scheduler runs per cluster, kept running by the launcher.  Each time
 * it wakes it calls mdd._schedule_rules(), in its own transaction, which
 * queues a job for every rule that is due (or notes why it did not) and
 * returns the seconds until the next rule is due.  What the scheduler keeps
 * between wake-ups is only that time: a transaction that creates or drops
 * a rule wakes it at commit (extension/job_wake.c), and it reads the rules
 * again.  The schedules are read in the server's time zone, which is the
 * scheduler's own (it has no client to set another).
 *
 * Since each rule remembers when it is next due, runs missed while the
 * server was down are due at once when it starts again: they run once, if
 * the rule's window is open.  SIGTERM ends the scheduler at once; a
 * transaction cut short is rolled back and nothing was queued.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"

#include "../extension/mdd.h"
#include "workers.h"

void
mdd_scheduler_main(Datum arg)
{
	mdd_worker_setup_signals();
	pqsignal(SIGTERM, die);
	BackgroundWorkerInitializeConnection(mdd_database, NULL, 0);
	pgstat_report_appname("mdd rule scheduler");
	mdd_scheduler_attach();

	for (;;)
	{
		ErrorData  *error;
		char	   *due;
		long		timeout = -1;

		CHECK_FOR_INTERRUPTS();
		mdd_worker_reload_if_asked();

		due = mdd_worker_run_sql("scheduling rules", "SELECT mdd._schedule_rules()", 0, false, &error);
		if (error)
		{
			ereport(LOG,
					(errmsg("mdd rule scheduler: %s (SQLSTATE %s)", error->message,
							unpack_sql_state(error->sqlerrcode))));
			FreeErrorData(error);
			timeout = 10000;
		}
		else if (due)
		{
			/* a little late rather than early: a rule fires at its minute */
			timeout = (long) Min(ceil(strtod(due, NULL) * 1000.0) + 20, 3600 * 1000.0);
			pfree(due);
		}

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_EXIT_ON_PM_DEATH | (timeout >= 0 ? WL_TIMEOUT : 0),
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}
