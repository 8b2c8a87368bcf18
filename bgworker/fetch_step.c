/*-------------------------------------------------------------------------
 *
 * fetch_step.c
 *	  The network step of retrieve and move jobs (sql/fetch.sql), run by a
 *	  job runner outside any transaction.
 *
 * mdd._job_step answers 'network' when a retrieve or move job is to ask
 * its node for something.  The runner then calls mdd_fetch_step, which
 *
 *	1. reads what to ask for from mdd._fetch_plan, in a short transaction;
 *	2. asks the node (extension/dicom_fetch.cpp) with no transaction open:
 *	   a C-FIND of what it holds, or C-MOVE or C-GET requests on one
 *	   association.  Meanwhile the DICOM listeners commit what a C-MOVE
 *	   brings; about once a second (and at once when a commit woke the
 *	   runner, as mdd.cancel does) mdd._fetch_progress counts it and says
 *	   whether the job goes on; each object a C-GET brings is archived by
 *	   mdd._fetch_stored in a transaction of its own;
 *	3. records the answer with mdd._fetch_listed, mdd._fetch_list_failed
 *	   or mdd._fetch_result, in another transaction, whose answer ('more',
 *	   'wait', 'finished') the runner acts on as on a step's.
 *
 * The socket of the association is kept in mdd_connection_fd while it is
 * open, so that SIGTERM (runner.c) shuts it down at once under whatever
 * read DCMTK is blocked in; the runner then exits at the interrupt check
 * that follows, and the job resumes with whoever claims it next.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "../extension/dicom.h"
#include "../extension/tls.h"
#include "workers.h"

/* what mdd._fetch_plan says to ask for */
typedef struct FetchPlan
{
	char	   *operation;		/* 'list', 'move', 'get'; NULL: nothing */
	char	   *ae_title;
	char	   *host;
	int			port;
	char	   *destination;	/* C-MOVE destination */
	int			nrequests;
	char	  **levels;
	char	  **studies;
	char	  **series;
	char	  **instances;
	int			nclasses;		/* -1: the node did not say them all */
	char	  **classes;
	bool		tls;			/* the node's tls option */
	int			associations;	/* C-MOVE associations at once */
} FetchPlan;

/* one network step of a job, what its callbacks share */
typedef struct FetchStep
{
	int64		job;
	MemoryContext cxt;			/* lives as long as the step */
	MemoryContext caller;		/* where errors are copied to */
	FetchPlan	plan;
	char	   *activity;		/* shown in pg_stat_activity meanwhile */
	TimestampTz last_progress;
	bool		poked;			/* a commit set our latch: look at once */
	int		   *seen;			/* per request: completed + warning so far */
	int		   *seen_failed;
} FetchStep;

/* ---------------------------------------------------------------------
 * transactions
 * ---------------------------------------------------------------------
 */

/* text[] of a result column as C strings in cxt (NULL elements as NULL) */
static int
column_strings(HeapTuple tuple, TupleDesc desc, int col, MemoryContext cxt, char ***out)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tuple, desc, col, &isnull);
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	*out = NULL;
	if (isnull)
		return -1;
	deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	*out = MemoryContextAllocZero(cxt, sizeof(char *) * Max(n, 1));
	for (int i = 0; i < n; i++)
		(*out)[i] = nulls[i] ? NULL : MemoryContextStrdup(cxt, TextDatumGetCString(elems[i]));
	return n;
}

/* a text column as a string in cxt, or NULL */
static char *
column_string(HeapTuple tuple, TupleDesc desc, int col, MemoryContext cxt)
{
	char	   *v = SPI_getvalue(tuple, desc, col);

	return v ? MemoryContextStrdup(cxt, v) : NULL;
}

static void
plan_work(void *ctx)
{
	FetchStep  *fs = (FetchStep *) ctx;
	FetchPlan  *p = &fs->plan;
	Oid			types[1] = {INT8OID};
	Datum		values[1] = {Int64GetDatum(fs->job)};
	HeapTuple	t;
	TupleDesc	desc;
	char	   *port;
	int			n[4];
	char	  **arrays[4];

	if (SPI_execute_with_args("SELECT operation, ae_title, host, port, destination, levels, studies,"
							  " series, instances, classes, tls, associations FROM mdd._fetch_plan($1)",
							  1, types, values, NULL, false, 0) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "mdd._fetch_plan returned no row");
	t = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	memset(p, 0, sizeof(*p));
	p->operation = column_string(t, desc, 1, fs->cxt);
	if (p->operation == NULL)
		return;
	p->ae_title = column_string(t, desc, 2, fs->cxt);
	p->host = column_string(t, desc, 3, fs->cxt);
	port = column_string(t, desc, 4, fs->cxt);
	p->port = port ? atoi(port) : 0;
	p->destination = column_string(t, desc, 5, fs->cxt);
	for (int k = 0; k < 4; k++)
		n[k] = column_strings(t, desc, 6 + k, fs->cxt, &arrays[k]);
	if (n[0] < 0 || n[0] != n[1] || n[0] != n[2] || n[0] != n[3])
		elog(ERROR, "mdd._fetch_plan returned requests of different lengths");
	p->nrequests = n[0];
	p->levels = arrays[0];
	p->studies = arrays[1];
	p->series = arrays[2];
	p->instances = arrays[3];
	p->nclasses = column_strings(t, desc, 10, fs->cxt, &p->classes);
	port = column_string(t, desc, 11, fs->cxt);
	p->tls = port != NULL && strcmp(port, "t") == 0;
	port = column_string(t, desc, 12, fs->cxt);
	p->associations = port ? Max(atoi(port), 1) : 1;
}

/* SQL with arguments whose first column of the only row is text, into cxt */
typedef struct SqlWork
{
	const char *sql;
	int			nargs;
	Oid		   *types;
	Datum	   *values;
	const char *nulls;
	MemoryContext cxt;
	char	   *result;
} SqlWork;

static void
sql_work(void *ctx)
{
	SqlWork    *w = (SqlWork *) ctx;

	if (SPI_execute_with_args(w->sql, w->nargs, w->types, w->values, w->nulls, false, 0) < 0)
		elog(ERROR, "SPI_execute_with_args failed for \"%s\"", w->sql);
	if (SPI_processed == 1)
		w->result = column_string(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, w->cxt);
}

/*
 * Run sql in a transaction of its own; its text result, or NULL with
 * *error set (the transaction aborted).
 */
static char *
run_sql(FetchStep *fs, const char *activity, const char *sql, int nargs, Oid *types,
		Datum *values, const char *nulls, ErrorData **error)
{
	SqlWork		w = {sql, nargs, types, values, nulls, fs->cxt, NULL};
	MemoryContext old = MemoryContextSwitchTo(fs->caller);

	*error = mdd_worker_in_transaction(activity, sql_work, &w);
	MemoryContextSwitchTo(old);
	pgstat_report_activity(STATE_RUNNING, fs->activity);
	return *error ? NULL : w.result;
}

/* a text[] datum of n strings (NULL pointers as NULL elements) */
static Datum
text_array(char **strings, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *nulls = palloc(sizeof(bool) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
	{
		nulls[i] = strings[i] == NULL;
		elems[i] = nulls[i] ? (Datum) 0 : mdd_wire_text_datum(strings[i]);
	}
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs, TEXTOID, -1, false,
											  TYPALIGN_INT));
}

/* an int4[] datum of n values, negative ones as NULL */
static Datum
int_array(const int *v, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));
	bool	   *nulls = palloc(sizeof(bool) * Max(n, 1));
	int			dims[1] = {n};
	int			lbs[1] = {1};

	for (int i = 0; i < n; i++)
	{
		nulls[i] = v[i] < 0;
		elems[i] = Int32GetDatum(v[i]);
	}
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs, INT4OID, 4, true,
											  TYPALIGN_INT));
}

/* ---------------------------------------------------------------------
 * callbacks of the fetch functions
 * ---------------------------------------------------------------------
 */

/*
 * A wait for the node must end now: the runner is being terminated (or
 * its query cancelled), or the postmaster died.  Only flags are looked
 * at; the interrupt is acted on once the fetch function returned.
 */
static int
should_stop(void *arg)
{
	if (InterruptPending && (ProcDiePending || QueryCancelPending))
		return 1;
	return PostmasterIsAlive() ? 0 : 1;
}

static int
wait_readable(void *arg, int fd, int timeout_ms)
{
	FetchStep  *fs = (FetchStep *) arg;
	int			rc;

	rc = WaitLatchOrSocket(MyLatch, WL_LATCH_SET | WL_SOCKET_READABLE | WL_TIMEOUT |
						   WL_EXIT_ON_PM_DEATH, fd, timeout_ms, PG_WAIT_EXTENSION);
	if (rc & WL_LATCH_SET)
	{
		/* SIGTERM, SIGHUP, or a commit that queued or cancelled work */
		ResetLatch(MyLatch);
		fs->poked = true;
	}
	return (rc & WL_SOCKET_READABLE) ? 1 : 0;
}

/* the sockets of a parallel C-MOVE, the latch and the postmaster */
static int
wait_any_readable(void *arg, const int *fds, int nfds, int timeout_ms)
{
	FetchStep  *fs = (FetchStep *) arg;
	WaitEventSet *set = CreateWaitEventSet(CurrentMemoryContext, nfds + 2);
	WaitEvent	event;
	int			readable = -1;

	AddWaitEventToSet(set, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(set, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	for (int i = 0; i < nfds; i++)
		AddWaitEventToSet(set, WL_SOCKET_READABLE, fds[i], NULL, (void *) (intptr_t) i);
	if (WaitEventSetWait(set, timeout_ms, &event, 1, PG_WAIT_EXTENSION) == 1)
	{
		if (event.events & WL_LATCH_SET)
		{
			/* SIGTERM, SIGHUP, or a commit that queued or cancelled work */
			ResetLatch(MyLatch);
			fs->poked = true;
		}
		else if (event.events & WL_SOCKET_READABLE)
			readable = (int) (intptr_t) event.user_data;
	}
	FreeWaitEventSet(set);
	return readable;
}

static void
socket_hook(void *arg, int fd)
{
	mdd_connection_fd = fd;
}

/*
 * How the C-MOVE or C-GET goes: the counts of the pending responses are
 * noted; once a second, or at once after a commit set our latch, the
 * database says what arrived and whether the job goes on.
 */
static int
progress(void *arg, const MddFetchProgress *p)
{
	FetchStep  *fs = (FetchStep *) arg;
	TimestampTz now = GetCurrentTimestamp();
	Oid			types[3] = {INT8OID, INT4OID, INT4OID};
	Datum		values[3];
	int			completed = 0;
	int			failed = 0;
	ErrorData  *error;
	char	   *result;

	if (p->response && p->request >= 0 && p->request < fs->plan.nrequests)
	{
		fs->seen[p->request] = Max(p->completed, 0) + Max(p->warning, 0);
		fs->seen_failed[p->request] = Max(p->failed, 0);
	}
	if (!fs->poked && !TimestampDifferenceExceeds(fs->last_progress, now, 1000))
		return 0;
	fs->poked = false;
	fs->last_progress = now;
	for (int i = 0; i < fs->plan.nrequests; i++)
	{
		completed += fs->seen[i];
		failed += fs->seen_failed[i];
	}
	values[0] = Int64GetDatum(fs->job);
	values[1] = Int32GetDatum(completed);
	values[2] = Int32GetDatum(failed);
	result = run_sql(fs, "counting what arrived", "SELECT mdd._fetch_progress($1, $2, $3)",
					 3, types, values, NULL, &error);
	if (error)
	{
		ereport(LOG,
				(errmsg("mdd job runner: job " INT64_FORMAT ": could not count what arrived: %s",
						fs->job, error->message)));
		FreeErrorData(error);
		return 0;
	}
	return result ? atoi(result) : 0;
}

typedef struct StoredWork
{
	FetchStep  *fs;
	const unsigned char *data;
	size_t		len;
	const char *sop_instance_uid;
} StoredWork;

static void
stored_work(void *ctx)
{
	StoredWork *w = (StoredWork *) ctx;
	Oid			types[5] = {INT8OID, BYTEAOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[5];
	bytea	   *bytes;

	if (w->len > MaxAllocSize - VARHDRSZ)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("object of %zu bytes is too large", w->len)));
	bytes = (bytea *) palloc(VARHDRSZ + w->len);
	SET_VARSIZE(bytes, VARHDRSZ + w->len);
	memcpy(VARDATA(bytes), w->data, w->len);
	values[0] = Int64GetDatum(w->fs->job);
	values[1] = PointerGetDatum(bytes);
	values[2] = mdd_wire_text_datum(w->fs->plan.ae_title);
	values[3] = mdd_wire_text_datum(w->fs->plan.host);
	values[4] = mdd_wire_text_datum(w->sop_instance_uid);
	if (SPI_execute_with_args("SELECT mdd._fetch_stored($1, $2, $3, $4, $5)", 5, types, values,
							  NULL, false, 0) < 0)
		elog(ERROR, "mdd._fetch_stored failed");
}

/*
 * C-GET: archive an object as it arrived, in a transaction of its own;
 * when that fails, keep the reason with the instance and answer a failure.
 */
static unsigned short
store(void *arg, const unsigned char *data, size_t len, const char *sop_class_uid,
	  const char *sop_instance_uid, char *comment, size_t comment_len)
{
	FetchStep  *fs = (FetchStep *) arg;
	StoredWork	w = {fs, data, len, sop_instance_uid};
	MemoryContext old = MemoryContextSwitchTo(fs->cxt);
	ErrorData  *error = mdd_worker_in_transaction("archiving an object of a C-GET", stored_work, &w);
	unsigned short status = 0x0000;

	if (error)
	{
		Oid			types[3] = {INT8OID, TEXTOID, TEXTOID};
		Datum		values[3];
		ErrorData  *again;

		status = mdd_store_failure_status(error->sqlerrcode);
		snprintf(comment, comment_len, "%s", error->message);
		ereport(LOG,
				(errmsg("mdd job runner: job " INT64_FORMAT ": C-GET of %s from \"%s\" could not be archived: %s",
						fs->job, sop_instance_uid, fs->plan.ae_title, error->message)));
		values[0] = Int64GetDatum(fs->job);
		values[1] = mdd_wire_text_datum(sop_instance_uid);
		values[2] = CStringGetTextDatum(error->message);
		(void) run_sql(fs, "recording a failed C-GET object", "SELECT mdd._fetch_store_failed($1, $2, $3)",
					   3, types, values, NULL, &again);
		if (again)
			FreeErrorData(again);
		FreeErrorData(error);
	}
	pgstat_report_activity(STATE_RUNNING, fs->activity);
	MemoryContextSwitchTo(old);
	return status;
}

/* ---------------------------------------------------------------------
 * the step
 * ---------------------------------------------------------------------
 */

static void
setup(FetchStep *fs, MddFetchPeer *peer, MddFetchCallbacks *cb)
{
	peer->our_ae = mdd_ae_title;
	peer->peer_ae = fs->plan.ae_title;
	peer->host = fs->plan.host;
	peer->port = fs->plan.port;
	peer->acse_timeout = mdd_dicom_acse_timeout;
	peer->dimse_timeout = mdd_dicom_dimse_timeout;
	peer->tls = mdd_tls_if(fs->plan.tls);
	memset(cb, 0, sizeof(*cb));
	cb->arg = fs;
	cb->should_stop = should_stop;
	cb->wait_readable = wait_readable;
	cb->wait_any_readable = wait_any_readable;
	cb->socket = socket_hook;
	cb->progress = progress;
	cb->store = store;
}

/* the C-FIND of what the node holds, and its recording */
static char *
list_step(FetchStep *fs, ErrorData **error)
{
	MddFetchPeer peer;
	MddFetchCallbacks cb;
	MddRemoteInstances list;
	MddDicomStatus status;
	unsigned short dimse_status = 0;
	char		errbuf[1024];

	setup(fs, &peer, &cb);
	status = mdd_dicom_list_instances(&peer, &cb, fs->plan.studies[0], fs->plan.series[0],
									  fs->plan.instances[0], &list, &dimse_status,
									  errbuf, sizeof(errbuf));
	mdd_connection_fd = -1;
	CHECK_FOR_INTERRUPTS();

	if (status == MDD_DICOM_OK)
	{
		char	  **series = palloc(sizeof(char *) * Max(list.n, 1));
		char	  **sops = palloc(sizeof(char *) * Max(list.n, 1));
		char	  **classes = palloc(sizeof(char *) * Max(list.n, 1));
		Oid			types[4] = {INT8OID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID};
		Datum		values[4];

		for (int i = 0; i < list.n; i++)
		{
			series[i] = pstrdup(list.items[i].series_instance_uid);
			sops[i] = pstrdup(list.items[i].sop_instance_uid);
			classes[i] = pstrdup(list.items[i].sop_class_uid);
		}
		values[0] = Int64GetDatum(fs->job);
		values[1] = text_array(series, list.n);
		values[2] = text_array(sops, list.n);
		values[3] = text_array(classes, list.n);
		mdd_dicom_free_instances(&list);
		return run_sql(fs, "recording what the node holds", "SELECT mdd._fetch_listed($1, $2, $3, $4)",
					   4, types, values, NULL, error);
	}
	if (status == MDD_DICOM_NETWORK || status == MDD_DICOM_REFUSED)
	{
		Oid			types[3] = {INT8OID, INT4OID, TEXTOID};
		Datum		values[3];

		values[0] = Int64GetDatum(fs->job);
		values[1] = Int32GetDatum(dimse_status);
		values[2] = CStringGetTextDatum(errbuf);
		return run_sql(fs, "recording a failed C-FIND", "SELECT mdd._fetch_list_failed($1, $2, $3)",
					   3, types, values, status == MDD_DICOM_REFUSED ? "   " : " n ", error);
	}
	ereport(ERROR,
			(errcode(status == MDD_DICOM_OUT_OF_MEMORY ? ERRCODE_OUT_OF_MEMORY : ERRCODE_INTERNAL_ERROR),
			 errmsg("cannot list what node \"%s\" holds: %s", fs->plan.ae_title, errbuf)));
	return NULL;
}

/* C-MOVE or C-GET requests on one association, and their recording */
static char *
fetch_step(FetchStep *fs, ErrorData **error)
{
	FetchPlan  *p = &fs->plan;
	MddFetchPeer peer;
	MddFetchCallbacks cb;
	MddFetchRequest *requests = palloc0(sizeof(MddFetchRequest) * Max(p->nrequests, 1));
	MddDicomStatus status;
	int			associated = 0;
	char		errbuf[1024];
	bool		get = strcmp(p->operation, "get") == 0;
	bool	   *answered;
	int		   *statuses;
	int		   *completed;
	int		   *failed;
	int		   *warning;
	char	  **comments;
	char	  **failed_uids;
	Oid			types[10] = {INT8OID, BOOLOID, TEXTOID, BOOLARRAYOID, INT4ARRAYOID, INT4ARRAYOID,
	INT4ARRAYOID, INT4ARRAYOID, TEXTARRAYOID, TEXTARRAYOID};
	Datum		values[10];
	char		nulls[11] = "          ";
	Datum	   *elems;
	int			dims[1];
	int			lbs[1] = {1};

	if (!get && p->destination == NULL)
		elog(ERROR, "a C-MOVE step without a destination");
	for (int i = 0; i < p->nrequests; i++)
	{
		requests[i].level = p->levels[i];
		requests[i].study = p->studies[i];
		requests[i].series = p->series[i];
		requests[i].sops = p->instances[i];
	}
	fs->seen = palloc0(sizeof(int) * Max(p->nrequests, 1));
	fs->seen_failed = palloc0(sizeof(int) * Max(p->nrequests, 1));
	fs->last_progress = GetCurrentTimestamp();
	setup(fs, &peer, &cb);
	status = mdd_dicom_fetch(&peer, &cb, get ? NULL : p->destination,
							 (const char *const *) p->classes, Max(p->nclasses, 0),
							 requests, p->nrequests, p->associations, &associated,
							 errbuf, sizeof(errbuf));
	mdd_connection_fd = -1;
	CHECK_FOR_INTERRUPTS();
	if (status != MDD_DICOM_OK && status != MDD_DICOM_NETWORK)
	{
		mdd_dicom_free_fetch(requests, p->nrequests);
		ereport(ERROR,
				(errcode(status == MDD_DICOM_OUT_OF_MEMORY ? ERRCODE_OUT_OF_MEMORY : ERRCODE_INTERNAL_ERROR),
				 errmsg("C-%s from node \"%s\" failed: %s", get ? "GET" : "MOVE", p->ae_title, errbuf)));
	}

	answered = palloc(sizeof(bool) * Max(p->nrequests, 1));
	statuses = palloc(sizeof(int) * Max(p->nrequests, 1));
	completed = palloc(sizeof(int) * Max(p->nrequests, 1));
	failed = palloc(sizeof(int) * Max(p->nrequests, 1));
	warning = palloc(sizeof(int) * Max(p->nrequests, 1));
	comments = palloc(sizeof(char *) * Max(p->nrequests, 1));
	failed_uids = palloc(sizeof(char *) * Max(p->nrequests, 1));
	for (int i = 0; i < p->nrequests; i++)
	{
		MddFetchRequest *r = &requests[i];

		answered[i] = r->answered != 0;
		statuses[i] = r->answered ? r->status : -1;
		completed[i] = r->completed;
		failed[i] = r->failed;
		warning[i] = r->warning;
		comments[i] = r->comment[0] ? pstrdup(r->comment) : NULL;
		failed_uids[i] = r->failed_uids ? pstrdup(r->failed_uids) : NULL;
	}
	mdd_dicom_free_fetch(requests, p->nrequests);

	values[0] = Int64GetDatum(fs->job);
	values[1] = BoolGetDatum(associated != 0);
	if (status == MDD_DICOM_OK)
		nulls[2] = 'n';
	values[2] = CStringGetTextDatum(errbuf);
	elems = palloc(sizeof(Datum) * Max(p->nrequests, 1));
	for (int i = 0; i < p->nrequests; i++)
		elems[i] = BoolGetDatum(answered[i]);
	dims[0] = p->nrequests;
	values[3] = PointerGetDatum(construct_md_array(elems, NULL, 1, dims, lbs, BOOLOID, 1, true,
												   TYPALIGN_CHAR));
	values[4] = int_array(statuses, p->nrequests);
	values[5] = int_array(completed, p->nrequests);
	values[6] = int_array(failed, p->nrequests);
	values[7] = int_array(warning, p->nrequests);
	values[8] = text_array(comments, p->nrequests);
	values[9] = text_array(failed_uids, p->nrequests);
	return run_sql(fs, "recording what the node answered",
				   "SELECT mdd._fetch_result($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
				   10, types, values, nulls, error);
}

/* plan the step, then ask the node and record its answer */
static char *
step(FetchStep *fs, ErrorData **error)
{
	MemoryContext old = MemoryContextSwitchTo(fs->caller);

	*error = mdd_worker_in_transaction("planning a network step", plan_work, fs);
	MemoryContextSwitchTo(old);
	if (*error)
		return NULL;
	if (fs->plan.operation == NULL)
		return "more";			/* the job ended meanwhile: the next step says so */
	fs->activity = psprintf("job " INT64_FORMAT ": %s %s at %s:%d", fs->job,
							strcmp(fs->plan.operation, "list") == 0 ? "C-FIND of what is on"
							: strcmp(fs->plan.operation, "get") == 0 ? "C-GET from" : "C-MOVE from",
							fs->plan.ae_title, fs->plan.host, fs->plan.port);
	pgstat_report_activity(STATE_RUNNING, fs->activity);
	if (strcmp(fs->plan.operation, "list") == 0)
		return list_step(fs, error);
	return fetch_step(fs, error);
}

/*
 * The network step of a retrieve or move job: 'more', 'wait' or
 * 'finished' (palloc'd in the caller's context), or NULL with *error set
 * (a failure of the database work, which the runner reports to
 * mdd._job_error like a failed step).
 */
char *
mdd_fetch_step(int64 job, ErrorData **error)
{
	MemoryContext caller = CurrentMemoryContext;
	FetchStep  *fs = palloc0(sizeof(FetchStep));
	char	   *volatile result = NULL;

	*error = NULL;
	fs->job = job;
	fs->caller = caller;
	fs->cxt = AllocSetContextCreate(caller, "mdd fetch step", ALLOCSET_DEFAULT_SIZES);
	PG_TRY();
	{
		MemoryContextSwitchTo(fs->cxt);
		result = step(fs, error);
	}
	PG_CATCH();
	{
		mdd_connection_fd = -1;
		MemoryContextSwitchTo(caller);
		*error = CopyErrorData();
		FlushErrorState();
		result = NULL;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(caller);
	pgstat_report_activity(STATE_IDLE, NULL);
	if (result)
		result = pstrdup(result);
	MemoryContextDelete(fs->cxt);
	pfree(fs);
	return result;
}
