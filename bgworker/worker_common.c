/*-------------------------------------------------------------------------
 *
 * worker_common.c
 *	  What every mdd background worker does the same way: signal handling
 *	  and configuration reloads.
 *
 * SIGTERM only sets a flag and the latch: workers check the flag in their
 * loops (and the DICOM association loop asks for it every second), so an
 * association in progress is ended cleanly rather than cut in the middle
 * of a transaction.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/latch.h"
#include "utils/guc.h"

#include "workers.h"

volatile sig_atomic_t mdd_got_sigterm = false;
volatile sig_atomic_t mdd_got_sighup = false;

static void
handle_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	mdd_got_sigterm = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

static void
handle_sighup(SIGNAL_ARGS)
{
	int			save_errno = errno;

	mdd_got_sighup = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

/* install the handlers and unblock signals; first thing a worker does */
void
mdd_worker_setup_signals(void)
{
	pqsignal(SIGTERM, handle_sigterm);
	pqsignal(SIGHUP, handle_sighup);
	BackgroundWorkerUnblockSignals();
}

void
mdd_worker_reload_if_asked(void)
{
	if (mdd_got_sighup)
	{
		mdd_got_sighup = false;
		ProcessConfigFile(PGC_SIGHUP);
	}
}
