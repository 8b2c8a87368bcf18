/*-------------------------------------------------------------------------
 *
 * worker_common.c
 *	  What every mdd background worker does the same way: signal handling,
 *	  configuration reloads, transactions around SPI calls, and one SQL
 *	  statement run in its own transaction with its errors caught.
 *
 * SIGTERM sets a flag and the latch: workers check the flag in their loops
 * (and the DICOM association loop between messages), so that work is never
 * cut in the middle of a transaction.  A DICOM connection being served is
 * also shut down, see handle_sigterm.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>
#include <sys/socket.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "workers.h"

volatile sig_atomic_t mdd_got_sigterm = false;
volatile sig_atomic_t mdd_connection_fd = -1;
volatile sig_atomic_t mdd_got_sighup = false;

static void
handle_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	mdd_got_sigterm = true;

	/*
	 * A connection being served is shut down at once, so that a peer that
	 * stalls in the middle of a message cannot hold up the stop: DCMTK's
	 * blocked read returns, and a half-received object is not stored.
	 * shutdown() is async-signal-safe.
	 */
	if (mdd_connection_fd >= 0)
		(void) shutdown(mdd_connection_fd, SHUT_RDWR);
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

/* start a transaction with SPI and a snapshot, showing activity */
void
mdd_worker_begin_transaction(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

/* commit what mdd_worker_begin_transaction began */
void
mdd_worker_commit_transaction(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
}

/*
 * Run one SQL statement, with one bigint argument when has_arg, in its own
 * transaction; its first column as text (palloc'd in the caller's
 * context), or NULL.  On error *error receives the error and the
 * transaction is aborted, so that the worker goes on.
 */
char *
mdd_worker_run_sql(const char *activity, const char *sql, int64 arg, bool has_arg,
				   ErrorData **error)
{
	MemoryContext caller = CurrentMemoryContext;
	char	   *volatile result = NULL;

	*error = NULL;
	PG_TRY();
	{
		Oid			types[1] = {INT8OID};
		Datum		values[1] = {Int64GetDatum(arg)};

		mdd_worker_begin_transaction(activity);
		if (SPI_execute_with_args(sql, has_arg ? 1 : 0, types, values, NULL, false, 1) < 0)
			elog(ERROR, "SPI_execute_with_args failed for \"%s\"", sql);
		if (SPI_processed == 1)
		{
			char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

			if (v)
				result = MemoryContextStrdup(caller, v);
		}
		mdd_worker_commit_transaction();
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(caller);
		*error = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	PG_END_TRY();
	return result;
}

/*
 * Run work(ctx) in a transaction of its own (with SPI and a snapshot),
 * inside PG_TRY, so that no error unwinds into the caller's frames (DCMTK,
 * when the caller is a callback).  Returns NULL once it committed; after
 * an error the transaction is aborted and the error returned, copied into
 * the memory context that was current at the call.
 */
ErrorData *
mdd_worker_in_transaction(const char *activity, void (*work) (void *ctx), void *ctx)
{
	MemoryContext caller = CurrentMemoryContext;
	ErrorData  *volatile edata = NULL;

	PG_TRY();
	{
		mdd_worker_begin_transaction(activity);
		work(ctx);
		mdd_worker_commit_transaction();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
	return edata;
}

/*
 * Text that came from the wire (AE titles, UIDs, identifiers) as a text
 * datum that is valid in the database encoding: if it is not, every byte
 * outside printable ASCII becomes '?'.  AE titles and UIDs are ASCII by
 * definition; a peer sending other bytes must not put invalid text into
 * the catalog or the audit trail.
 */
Datum
mdd_wire_text_datum(const char *s)
{
	size_t		len = strlen(s);
	char	   *copy;

	if (pg_verifymbstr(s, len, true))
		return CStringGetTextDatum(s);
	copy = pstrdup(s);
	for (char *p = copy; *p; p++)
		if ((unsigned char) *p < 0x20 || (unsigned char) *p > 0x7E)
			*p = '?';
	return CStringGetTextDatum(copy);
}

/* the DIMSE status answering a C-STORE whose archiving failed with this error */
unsigned short
mdd_store_failure_status(int sqlerrcode)
{
	if (sqlerrcode == ERRCODE_UNIQUE_VIOLATION)
		return 0x0111;			/* Duplicate SOP Instance */
	if (ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_INSUFFICIENT_RESOURCES ||
		ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_PROGRAM_LIMIT_EXCEEDED ||
		sqlerrcode == ERRCODE_DISK_FULL)
		return 0xA700;			/* Refused: Out of Resources */
	if (ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_DATA_EXCEPTION ||
		ERRCODE_TO_CATEGORY(sqlerrcode) == ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION)
		return 0xC000;			/* Error: Cannot Understand */
	return 0x0110;				/* Processing Failure */
}
