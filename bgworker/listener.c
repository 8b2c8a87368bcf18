/*-------------------------------------------------------------------------
 *
 * listener.c
 *	  A DICOM listener worker: accepts associations on the shared DICOM
 *	  socket and serves each to its end (extension/dicom_net.cpp), with the
 *	  database work done here in C.
 *
 * Each call from the C++ association loop into this file (admit an
 * association, store an object) runs in its own transaction inside
 * PG_TRY: an error is caught, its transaction aborted, and turned into a
 * refusal or a DIMSE failure status, so that no longjmp ever crosses
 * DCMTK's frames.  An object is answered with success only after its
 * transaction committed.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/pmsignal.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "../extension/dicom.h"
#include "../extension/tls.h"
#include "workers.h"

/* what the callbacks know about the association being served */
typedef struct Peer
{
	int			listener;		/* our number, for the log */
	char		host[64];
	char		calling_ae[20];
	MemoryContext scratch;		/* reset after each callback */
	char	   *forward_jobs;	/* the retrieve jobs of the C-MOVE or C-GET being
								 * served, '{...}' (malloc), or NULL */
} Peer;

/* show the association served in pg_stat_activity */
static void
report_association(Peer *peer)
{
	pgstat_report_activity(STATE_RUNNING, psprintf("DICOM association with %s at %s",
												   peer->calling_ae, peer->host));
}

/* run an SQL statement with arguments inside the current transaction */
static void
run_sql(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls)
{
	int			rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);

	if (rc < 0)
		elog(ERROR, "SPI_execute_with_args failed: %s", SPI_result_code_string(rc));
}

/* the database work of one callback, run by run_in_transaction */
typedef void (*PeerWork) (Peer *peer, void *ctx);

/*
 * Run work(peer, ctx) in a transaction of its own, inside PG_TRY, so that
 * no error unwinds into DCMTK's frames.  Returns NULL once it committed;
 * after an error, the transaction is aborted and the error returned,
 * copied into the peer's scratch context.  The callback then ends with
 * end_callback.
 */
static ErrorData *
run_in_transaction(Peer *peer, const char *activity, PeerWork work, void *ctx)
{
	MemoryContext old = CurrentMemoryContext;
	ErrorData  *volatile edata = NULL;

	PG_TRY();
	{
		mdd_worker_begin_transaction(activity);
		work(peer, ctx);
		mdd_worker_commit_transaction();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(peer->scratch);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(old);
	return edata;
}

/* after a callback: release its scratch memory, show the association again */
static void
end_callback(Peer *peer)
{
	MemoryContextReset(peer->scratch);
	report_association(peer);
}

typedef struct AdmitWork
{
	const char *calling_ae;
	const char *called_ae;
	const char *transport;		/* NULL: plain TCP */
	int			permits;
	char	   *reason;
	size_t		reason_len;
} AdmitWork;

static void
admit_work(Peer *peer, void *ctx)
{
	AdmitWork  *w = (AdmitWork *) ctx;
	Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', w->transport ? ' ' : 'n'};
	bool		isnull;

	values[0] = mdd_wire_text_datum(w->calling_ae);
	values[1] = mdd_wire_text_datum(w->called_ae);
	values[2] = mdd_wire_text_datum(peer->host);	/* what the socket says */
	values[3] = w->transport ? mdd_wire_text_datum(w->transport) : (Datum) 0;
	run_sql("SELECT permits, reason FROM mdd._dicom_admit($1, $2, $3, $4)", 4, types, values, nulls);
	if (SPI_processed == 1)
	{
		Datum		p = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		char	   *r = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);

		w->permits = isnull ? 0 : DatumGetInt32(p);
		if (r)
			strlcpy(w->reason, r, w->reason_len);
	}
}

static int
admit_callback(void *arg, const char *calling_ae, const char *called_ae,
			   const char *peer_host, const char *transport, char *reason, size_t reason_len)
{
	Peer	   *peer = (Peer *) arg;
	AdmitWork	w = {calling_ae, called_ae, transport, 0, reason, reason_len};
	ErrorData  *edata;

	strlcpy(peer->calling_ae, calling_ae, sizeof(peer->calling_ae));
	for (char *p = peer->calling_ae; *p; p++)
		if ((unsigned char) *p < 0x20 || (unsigned char) *p > 0x7E)
			*p = '?';
	edata = run_in_transaction(peer, "DICOM association request", admit_work, &w);
	if (edata)
	{
		w.permits = 0;
		snprintf(reason, reason_len, "archive error: %s", edata->message);
		ereport(LOG,
				(errmsg("mdd dicom listener %d: could not check association from \"%s\" at %s: %s",
						peer->listener, peer->calling_ae, peer->host, edata->message)));
	}
	if (w.permits == 0)
		ereport(LOG,
				(errmsg("mdd dicom listener %d: refused association from \"%s\" at %s to \"%s\": %s",
						peer->listener, peer->calling_ae, peer->host, called_ae, reason)));
	end_callback(peer);
	return w.permits;
}

typedef struct StoreWork
{
	const unsigned char *data;
	size_t		len;
	const char *sop_instance_uid;
} StoreWork;

static void
store_work(Peer *peer, void *ctx)
{
	StoreWork  *w = (StoreWork *) ctx;
	Oid			types[4] = {BYTEAOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[4];
	bytea	   *bytes;

	if (w->len > MaxAllocSize - VARHDRSZ)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("object of %zu bytes is too large", w->len)));
	bytes = (bytea *) palloc(VARHDRSZ + w->len);
	SET_VARSIZE(bytes, VARHDRSZ + w->len);
	memcpy(VARDATA(bytes), w->data, w->len);
	values[0] = PointerGetDatum(bytes);
	values[1] = mdd_wire_text_datum(peer->calling_ae);
	values[2] = mdd_wire_text_datum(peer->host);
	values[3] = mdd_wire_text_datum(w->sop_instance_uid);
	run_sql("SELECT mdd._store_received($1, $2, $3, $4)", 4, types, values, NULL);
}

static unsigned short
store_callback(void *arg, const unsigned char *data, size_t len,
			   const char *sop_class_uid, const char *sop_instance_uid,
			   char *comment, size_t comment_len)
{
	Peer	   *peer = (Peer *) arg;
	StoreWork	w = {data, len, sop_instance_uid};
	ErrorData  *edata = run_in_transaction(peer, "DICOM C-STORE", store_work, &w);
	unsigned short status = 0x0000;

	if (edata)
	{
		status = mdd_store_failure_status(edata->sqlerrcode);
		snprintf(comment, comment_len, "%s", edata->message);
		ereport(LOG,
				(errmsg("mdd dicom listener %d: C-STORE of %s from \"%s\" at %s failed with status 0x%04X: %s",
						peer->listener, sop_instance_uid, peer->calling_ae, peer->host,
						status, edata->message)));
	}
	end_callback(peer);
	return status;
}

typedef struct CommitWork
{
	const char *transaction_uid;
	const char *const *classes;
	const char *const *instances;
	int			n;
} CommitWork;

/* a text[] of wire strings */
static Datum
wire_text_array(const char *const *strings, int n)
{
	Datum	   *elems = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		elems[i] = mdd_wire_text_datum(strings[i]);
	return PointerGetDatum(construct_array(elems, n, TEXTOID, -1, false, TYPALIGN_INT));
}

static void
commit_work(Peer *peer, void *ctx)
{
	CommitWork *w = (CommitWork *) ctx;
	Oid			types[5] = {TEXTOID, TEXTOID, TEXTOID, TEXTARRAYOID, TEXTARRAYOID};
	Datum		values[5];

	values[0] = mdd_wire_text_datum(peer->calling_ae);
	values[1] = mdd_wire_text_datum(peer->host);
	values[2] = mdd_wire_text_datum(w->transaction_uid);
	values[3] = wire_text_array(w->classes, w->n);
	values[4] = wire_text_array(w->instances, w->n);
	run_sql("SELECT mdd._dicom_commit($1, $2, $3, $4, $5)", 5, types, values, NULL);
}

/* Storage Commitment N-ACTION: the report is queued as a job (sql/commitment.sql) */
static unsigned short
commit_callback(void *arg, const char *transaction_uid, const char *const *classes,
				const char *const *instances, int n, char *comment, size_t comment_len)
{
	Peer	   *peer = (Peer *) arg;
	CommitWork	w = {transaction_uid, classes, instances, n};
	ErrorData  *edata = run_in_transaction(peer, "DICOM N-ACTION", commit_work, &w);
	unsigned short status = 0x0000;

	if (edata)
	{
		status = 0x0110;		/* Processing failure */
		snprintf(comment, comment_len, "%s", edata->message);
		ereport(LOG,
				(errmsg("mdd dicom listener %d: storage commitment %s from \"%s\" at %s refused: %s",
						peer->listener, transaction_uid, peer->calling_ae, peer->host,
						edata->message)));
	}
	end_callback(peer);
	return status;
}

/* the elements of a text[] (NULL elements as NULL pointers) */
static int
text_array_elements(HeapTuple tuple, TupleDesc desc, char ***values)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tuple, desc, 1, &isnull);
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	*values = NULL;
	if (isnull)
		return 0;
	deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &n);
	*values = palloc(sizeof(char *) * Max(n, 1));
	for (int i = 0; i < n; i++)
		(*values)[i] = nulls[i] ? NULL : TextDatumGetCString(elems[i]);
	return n;
}

/* malloc(), or an out-of-memory error */
static void *
malloc_or_error(size_t size)
{
	void	   *p = malloc(Max(size, 1));

	if (p == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	return p;
}

/* copy s to *p and move *p past it; returns the copy */
static const char *
append_string(char **p, const char *s)
{
	char	   *copy = *p;

	*p += strlen(strcpy(copy, s)) + 1;
	return copy;
}

typedef struct FindWork
{
	const char *model;
	const char *level;
	const char *keys_json;
	MddFindResult *result;
	bool		remote;			/* the span nodes' matches, not the catalog's */
} FindWork;

/*
 * The matches of mdd._dicom_find (a row of keywords, then a row of values
 * per match), flattened to (row, keyword, value) items in malloc()ed
 * memory that the C++ side frees.  NULL values are left out.
 */
static void
find_work(Peer *peer, void *ctx)
{
	FindWork   *w = (FindWork *) ctx;
	MddFindResult *result = w->result;
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		values[3];
	size_t		total = 0;
	size_t		nitems = 0;
	char	  **names;
	const char **keywords;
	int			nnames;
	char	 ***rows;
	char	   *p;

	values[0] = mdd_wire_text_datum(w->remote ? peer->calling_ae : w->model);
	values[1] = mdd_wire_text_datum(w->level);
	values[2] = mdd_wire_text_datum(w->keys_json);
	if (w->remote)
		run_sql("SELECT * FROM mdd._dicom_find_remote($1, $2, $3::jsonb)", 3, types, values, NULL);
	else
		run_sql("SELECT * FROM mdd._dicom_find($1, $2, $3::jsonb)", 3, types, values, NULL);
	if (SPI_processed < 1)
		elog(ERROR, "the C-FIND matches came without their keyword row");
	nnames = text_array_elements(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, &names);

	/* the values, converted once; then one allocation for all */
	rows = palloc0(sizeof(char **) * Max(SPI_processed, 1));
	for (uint64 r = 1; r < SPI_processed; r++)
	{
		int			n = text_array_elements(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, &rows[r]);

		for (int k = 0; k < Min(n, nnames); k++)
			if (rows[r][k] != NULL)
			{
				total += strlen(rows[r][k]) + 1;
				nitems++;
			}
	}
	for (int k = 0; k < nnames; k++)
		total += strlen(names[k]) + 1;

	result->items = malloc_or_error(sizeof(MddFindItem) * nitems);
	result->strings = malloc_or_error(total);
	p = result->strings;
	keywords = palloc(sizeof(char *) * Max(nnames, 1));
	for (int k = 0; k < nnames; k++)
		keywords[k] = append_string(&p, names[k]);	/* one string per keyword */
	for (uint64 r = 1; r < SPI_processed; r++)
		for (int k = 0; k < nnames; k++)
		{
			MddFindItem *item;

			if (rows[r] == NULL || rows[r][k] == NULL)
				continue;
			item = &result->items[result->nitems++];
			item->row = (int) (r - 1);
			item->keyword = keywords[k];
			item->value = append_string(&p, rows[r][k]);
		}
	result->nrows = (int) (SPI_processed - 1);

	/* the query served, in the audit trail (in this transaction) */
	if (!w->remote)
	{
		Oid			atypes[6] = {TEXTOID, TEXTOID, TEXTOID, INT8OID, TEXTOID, TEXTOID};
		Datum		avalues[6];

		avalues[0] = values[0];
		avalues[1] = values[1];
		avalues[2] = values[2];
		avalues[3] = Int64GetDatum(result->nrows);
		avalues[4] = mdd_wire_text_datum(peer->calling_ae);
		avalues[5] = mdd_wire_text_datum(peer->host);
		run_sql("SELECT mdd._dicom_find_audit($1, $2, $3::jsonb, $4, $5, $6)", 6, atypes, avalues, NULL);
	}
}

static unsigned short
find_matches(Peer *peer, const char *model, const char *level, const char *keys_json,
			 MddFindResult *result, bool remote, char *comment, size_t comment_len)
{
	FindWork	w = {model, level, keys_json, result, remote};
	ErrorData  *edata;
	unsigned short status = 0x0000;

	memset(result, 0, sizeof(*result));
	edata = run_in_transaction(peer, remote ? "DICOM C-FIND, spanned nodes" : "DICOM C-FIND",
							   find_work, &w);
	if (edata)
	{
		free(result->items);
		free(result->strings);
		memset(result, 0, sizeof(*result));
		status = edata->sqlerrcode == ERRCODE_INVALID_PARAMETER_VALUE ? 0xA900 : 0xC000;
		snprintf(comment, comment_len, "%s", edata->message);
		ereport(LOG,
				(errmsg("mdd dicom listener %d: C-FIND from \"%s\" at %s failed%s: %s",
						peer->listener, peer->calling_ae, peer->host,
						remote ? " on the spanned nodes" : "", edata->message)));
	}
	end_callback(peer);
	return status;
}

/* C-FIND: the catalog's matches */
static unsigned short
find_callback(void *arg, const char *model, const char *level, const char *keys_json,
			  MddFindResult *result, char *comment, size_t comment_len)
{
	return find_matches((Peer *) arg, model, level, keys_json, result, false,
						comment, comment_len);
}

/* C-FIND, query spanning: the span nodes' matches, sent after the catalog's */
static unsigned short
find_remote_callback(void *arg, const char *model, const char *level, const char *keys_json,
					 MddFindResult *result, char *comment, size_t comment_len)
{
	return find_matches((Peer *) arg, model, level, keys_json, result, true,
						comment, comment_len);
}

typedef struct RetrieveWork
{
	const char *operation;
	const char *model;
	const char *level;
	const char *keys_json;
	const char *destination;
	MddRetrieveList *list;
	const char *forward_jobs;	/* move forwarding: the retrieve jobs, '{...}', or NULL */
} RetrieveWork;

/* the objects mdd._dicom_retrieve selects, in malloc()ed memory the C++ side frees */
static void
retrieve_work(Peer *peer, void *ctx)
{
	RetrieveWork *w = (RetrieveWork *) ctx;
	MddRetrieveList *list = w->list;
	Oid			types[7] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[7];
	char		nulls[7] = "       ";
	size_t		total = 0;
	char	   *p;

	values[0] = mdd_wire_text_datum(w->operation);
	values[1] = mdd_wire_text_datum(w->model);
	values[2] = mdd_wire_text_datum(w->level);
	values[3] = mdd_wire_text_datum(w->keys_json);
	values[4] = mdd_wire_text_datum(w->destination ? w->destination : "");
	if (w->destination == NULL)
		nulls[4] = 'n';
	values[5] = mdd_wire_text_datum(peer->calling_ae);
	values[6] = mdd_wire_text_datum(peer->host);
	run_sql("SELECT object_id, sop_class_uid, sop_instance_uid, transfer_syntax_uid"
			" FROM mdd._dicom_retrieve($1, $2, $3, $4::jsonb, $5, $6, $7)",
			7, types, values, nulls);

	for (uint64 i = 0; i < SPI_processed; i++)
		for (int col = 2; col <= 4; col++)
		{
			char	   *v = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, col);

			total += (v ? strlen(v) : 0) + 1;
		}
	list->items = malloc_or_error(sizeof(MddRetrieveItem) * SPI_processed);
	list->strings = malloc_or_error(total);
	p = list->strings;
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		MddRetrieveItem *item = &list->items[list->nitems++];
		const char **fields[3] = {&item->sop_class_uid, &item->sop_instance_uid,
		&item->transfer_syntax_uid};
		bool		isnull;

		item->object_id = DatumGetInt64(SPI_getbinval(t, SPI_tuptable->tupdesc, 1, &isnull));
		for (int col = 2; col <= 4; col++)
		{
			char	   *v = SPI_getvalue(t, SPI_tuptable->tupdesc, col);

			*fields[col - 2] = append_string(&p, v ? v : "");
		}
	}

	/* move forwarding: what the jobs were to bring and did not */
	if (w->forward_jobs)
	{
		Oid			ftypes[1] = {TEXTOID};
		Datum		fvalues[1];
		char	  **missing;
		StringInfoData joined;

		fvalues[0] = CStringGetTextDatum(w->forward_jobs);
		run_sql("SELECT mdd._forward_missing($1::bigint[])", 1, ftypes, fvalues, NULL);
		list->nmissing = text_array_elements(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, &missing);
		initStringInfo(&joined);
		for (int i = 0; i < list->nmissing; i++)
			appendStringInfo(&joined, "%s%s", i > 0 ? "\\" : "", missing[i]);
		if (list->nmissing > 0)
		{
			list->missing_uids = malloc_or_error(joined.len + 1);
			memcpy(list->missing_uids, joined.data, joined.len + 1);
		}
	}
}

typedef struct ForwardWork
{
	const char *level;
	const char *keys_json;
	char	   *jobs;			/* out: '{...}' in the peer's scratch context, or NULL */
} ForwardWork;

/*
 * Move forwarding, first part: retrieve jobs for what the identifier names
 * and only span nodes hold (mdd._forward_queue); committed at once, so
 * that the job runners start on them.
 */
static void
forward_queue_work(Peer *peer, void *ctx)
{
	ForwardWork *w = (ForwardWork *) ctx;
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		values[3];
	char	   *jobs;

	values[0] = mdd_wire_text_datum(peer->calling_ae);
	values[1] = mdd_wire_text_datum(w->level);
	values[2] = mdd_wire_text_datum(w->keys_json);
	run_sql("SELECT mdd._forward_queue($1, $2, $3::jsonb)::text", 3, types, values, NULL);
	jobs = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	if (jobs && strcmp(jobs, "{}") != 0)
		w->jobs = MemoryContextStrdup(peer->scratch, jobs);
}

/* second part: wait for those jobs, at most mdd.dicom_dimse_timeout */
static void
forward_wait_work(Peer *peer, void *ctx)
{
	ForwardWork *w = (ForwardWork *) ctx;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	values[0] = CStringGetTextDatum(w->jobs);
	run_sql("SELECT mdd._forward_wait($1::bigint[], current_setting('mdd.dicom_dimse_timeout')::interval)",
			1, types, values, NULL);
}

/*
 * Move forwarding: before a C-MOVE or C-GET is served from the catalog,
 * bring what only span nodes hold.  Returns the jobs queued, or NULL; a
 * failure here leaves the request to be served with what is here.
 */
static const char *
forward(Peer *peer, const char *operation, const char *level, const char *keys_json)
{
	ForwardWork w = {level, keys_json, NULL};
	ErrorData  *edata;

	edata = run_in_transaction(peer, "DICOM move forwarding", forward_queue_work, &w);
	if (edata == NULL && w.jobs != NULL)
	{
		ereport(LOG,
				(errmsg("mdd dicom listener %d: %s from \"%s\": fetching from the span nodes (jobs %s)",
						peer->listener, operation, peer->calling_ae, w.jobs)));
		edata = run_in_transaction(peer, "DICOM move forwarding, waiting", forward_wait_work, &w);
	}
	if (edata)
		ereport(LOG,
				(errmsg("mdd dicom listener %d: %s from \"%s\": forwarding from the span nodes failed: %s",
						peer->listener, operation, peer->calling_ae, edata->message)));
	return w.jobs;
}

static unsigned short
retrieve_callback(void *arg, const char *operation, const char *model, const char *level,
				  const char *keys_json, const char *destination, MddRetrieveList *list,
				  char *comment, size_t comment_len)
{
	Peer	   *peer = (Peer *) arg;
	RetrieveWork w = {operation, model, level, keys_json, destination, list, NULL};
	ErrorData  *edata;
	unsigned short status = 0x0000;

	memset(list, 0, sizeof(*list));
	w.forward_jobs = forward(peer, operation, level, keys_json);
	free(peer->forward_jobs);
	peer->forward_jobs = w.forward_jobs ? strdup(w.forward_jobs) : NULL;
	edata = run_in_transaction(peer, operation, retrieve_work, &w);
	if (edata)
	{
		free(list->items);
		free(list->strings);
		free(list->missing_uids);
		memset(list, 0, sizeof(*list));
		status = edata->sqlerrcode == ERRCODE_INVALID_PARAMETER_VALUE ? 0xA900 : 0xC000;
		snprintf(comment, comment_len, "%s", edata->message);
		ereport(LOG,
				(errmsg("mdd dicom listener %d: %s from \"%s\" at %s failed: %s",
						peer->listener, operation, peer->calling_ae, peer->host,
						edata->message)));
	}
	end_callback(peer);
	return status;
}

/* remove what was fetched only to be passed on (mdd.forward_keep off) */
static void
forward_release_work(Peer *peer, void *ctx)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	values[0] = CStringGetTextDatum(peer->forward_jobs);
	run_sql("SELECT mdd._forward_release($1::bigint[])", 1, types, values, NULL);
}

/* a C-MOVE or C-GET ended: its forwarded objects go unless they are kept */
static void
retrieve_done_callback(void *arg)
{
	Peer	   *peer = (Peer *) arg;

	if (peer->forward_jobs == NULL)
		return;
	if (!mdd_forward_keep)
	{
		ErrorData  *edata = run_in_transaction(peer, "DICOM move forwarding, release",
											   forward_release_work, NULL);

		if (edata)
			ereport(LOG,
					(errmsg("mdd dicom listener %d: the objects forwarded to \"%s\" could not be removed: %s",
							peer->listener, peer->calling_ae, edata->message)));
		end_callback(peer);
	}
	free(peer->forward_jobs);
	peer->forward_jobs = NULL;
}

typedef struct DestinationWork
{
	const char *ae_title;
	char	   *host;
	size_t		host_len;
	int		   *port;
	int		   *tls;
} DestinationWork;

static void
destination_work(Peer *peer, void *ctx)
{
	DestinationWork *w = (DestinationWork *) ctx;
	Oid			types[1] = {TEXTOID};
	Datum		values[1];
	bool		isnull;

	values[0] = mdd_wire_text_datum(w->ae_title);
	run_sql("SELECT host, port, tls FROM mdd._dicom_destination($1)", 1, types, values, NULL);
	strlcpy(w->host, SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1), w->host_len);
	*w->port = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	*w->tls = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull)) && !isnull;
}

/* C-MOVE: where the destination listens (a registered node) */
static unsigned short
destination_callback(void *arg, const char *ae_title, char *host, size_t host_len, int *port,
					 int *tls, char *comment, size_t comment_len)
{
	Peer	   *peer = (Peer *) arg;
	DestinationWork w = {ae_title, host, host_len, port, tls};
	ErrorData  *edata = run_in_transaction(peer, "DICOM C-MOVE", destination_work, &w);
	unsigned short status = 0x0000;

	if (edata)
	{
		status = edata->sqlerrcode == ERRCODE_UNDEFINED_OBJECT ? 0xA801 : 0xC000;
		snprintf(comment, comment_len, "%s", edata->message);
		ereport(LOG,
				(errmsg("mdd dicom listener %d: C-MOVE from \"%s\" at %s refused: %s",
						peer->listener, peer->calling_ae, peer->host, edata->message)));
	}
	end_callback(peer);
	return status;
}

typedef struct FetchWork
{
	long long	object_id;
	unsigned char **data;
	size_t	   *len;
} FetchWork;

static void
fetch_work(Peer *peer, void *ctx)
{
	FetchWork  *w = (FetchWork *) ctx;
	Oid			types[1] = {INT8OID};
	Datum		values[1];
	bool		isnull;
	bytea	   *bytes;

	values[0] = Int64GetDatum(w->object_id);
	run_sql("SELECT mdd._dicom_fetch($1)", 1, types, values, NULL);
	bytes = DatumGetByteaPP(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	*w->len = VARSIZE_ANY_EXHDR(bytes);
	*w->data = malloc_or_error(*w->len);
	memcpy(*w->data, VARDATA_ANY(bytes), *w->len);
}

/* C-MOVE / C-GET: the checked stored bytes of one object, malloc()ed */
static int
fetch_callback(void *arg, long long object_id, const char *operation,
			   unsigned char **data, size_t *len, char *error, size_t error_len)
{
	Peer	   *peer = (Peer *) arg;
	FetchWork	w = {object_id, data, len};
	ErrorData  *edata;

	*data = NULL;
	*len = 0;
	edata = run_in_transaction(peer, operation, fetch_work, &w);
	if (edata)
	{
		free(*data);
		*data = NULL;
		*len = 0;
		snprintf(error, error_len, "%s", edata->message);
		ereport(LOG,
				(errmsg("mdd dicom listener %d: %s for \"%s\": cannot read object %lld: %s",
						peer->listener, operation, peer->calling_ae, object_id, edata->message)));
	}
	end_callback(peer);
	return edata == NULL;
}

typedef struct AuditWork
{
	const char *action;
	const char *detail;
} AuditWork;

static void
audit_work(Peer *peer, void *ctx)
{
	AuditWork  *w = (AuditWork *) ctx;
	Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[4];

	values[0] = mdd_wire_text_datum(w->action);
	values[1] = mdd_wire_text_datum(w->detail);
	values[2] = mdd_wire_text_datum(peer->calling_ae);
	values[3] = mdd_wire_text_datum(peer->host);
	run_sql("SELECT mdd._dicom_audit($1, $2, $3, $4)", 4, types, values, NULL);
}

/* an audit row for the peer, in a transaction of its own */
static void
audit_callback(void *arg, const char *action, const char *detail)
{
	Peer	   *peer = (Peer *) arg;
	AuditWork	w = {action, detail};
	ErrorData  *edata = run_in_transaction(peer, "DICOM audit", audit_work, &w);

	if (edata)
		ereport(LOG,
				(errmsg("mdd dicom listener %d: could not write the audit row \"%s\" for \"%s\": %s",
						peer->listener, action, peer->calling_ae, edata->message)));
	end_callback(peer);
}

static int
should_stop_callback(void *arg)
{
	if (!PostmasterIsAlive())
		return 1;
	return mdd_got_sigterm ? 1 : 0;
}

static int
wait_readable_callback(void *arg, int fd, int timeout_ms)
{
	int			rc;

	if (mdd_got_sigterm)
		return 0;
	rc = WaitLatchOrSocket(MyLatch, WL_LATCH_SET | WL_SOCKET_READABLE | WL_TIMEOUT |
						   WL_EXIT_ON_PM_DEATH, fd, timeout_ms, PG_WAIT_EXTENSION);
	if (rc & WL_LATCH_SET)
	{
		ResetLatch(MyLatch);
		mdd_worker_reload_if_asked();
	}
	return (rc & WL_SOCKET_READABLE) ? 1 : 0;
}

static void
log_callback(void *arg, int level, const char *message)
{
	Peer	   *peer = (Peer *) arg;

	/* ereport below ERROR does not longjmp */
	ereport(level == MDD_LOG_DEBUG ? DEBUG1 : LOG,
			(errmsg("mdd dicom listener %d: %s", peer->listener, message)));
}

/* the address of the peer as text */
static void
peer_address(int fd, char *buf, size_t len)
{
	struct sockaddr_storage addr;
	socklen_t	alen = sizeof(addr);

	strlcpy(buf, "unknown", len);
	if (getpeername(fd, (struct sockaddr *) &addr, &alen) == 0)
		(void) getnameinfo((struct sockaddr *) &addr, alen, buf, len, NULL, 0, NI_NUMERICHOST);
}

/* serve one accepted connection (of the TLS port when tls) */
static void
serve_connection(int fd, Peer *peer, bool tls)
{
	MddDicomServerConfig config;
	MddDicomCallbacks callbacks;
	char		errbuf[512];
	struct stat before;
	struct stat after;
	int			one = 1;
	int			rc;
	TimestampTz deadline;
	MddDicomStatus status;

	(void) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
	(void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	peer_address(fd, peer->host, sizeof(peer->host));
	peer->calling_ae[0] = '\0';
	pgstat_report_activity(STATE_RUNNING, psprintf("DICOM association request from %s",
												   peer->host));

	config.ae_title = mdd_ae_title;
	config.max_pdu = mdd_dicom_max_pdu;
	config.acse_timeout = mdd_dicom_acse_timeout;
	config.dimse_timeout = mdd_dicom_dimse_timeout;
	config.tls = tls ? mdd_tls_settings() : NULL;
	config.client_tls = mdd_tls_settings();
	callbacks.arg = peer;
	callbacks.admit = admit_callback;
	callbacks.store = store_callback;
	callbacks.find = find_callback;
	callbacks.find_remote = find_remote_callback;
	callbacks.retrieve = retrieve_callback;
	callbacks.retrieve_done = retrieve_done_callback;
	callbacks.destination = destination_callback;
	callbacks.fetch = fetch_callback;
	callbacks.commit = commit_callback;
	callbacks.audit = audit_callback;
	callbacks.should_stop = should_stop_callback;
	callbacks.wait_readable = wait_readable_callback;
	callbacks.log = log_callback;

	/*
	 * Wait for the association request here, where a stop request is seen
	 * at once, rather than inside DCMTK for the whole ACSE timeout.
	 */
	deadline = GetCurrentTimestamp() + mdd_dicom_acse_timeout * USECS_PER_SEC;
	for (;;)
	{
		long		left = (deadline - GetCurrentTimestamp()) / 1000;

		if (mdd_got_sigterm || left <= 0)
		{
			ereport(LOG,
					(errmsg("mdd dicom listener %d: connection from %s closed: %s",
							peer->listener, peer->host,
							mdd_got_sigterm ? "server shutting down"
							: "no association request within the ACSE timeout")));
			close(fd);
			pgstat_report_activity(STATE_IDLE, NULL);
			return;
		}
		rc = WaitLatchOrSocket(MyLatch, WL_LATCH_SET | WL_SOCKET_READABLE | WL_TIMEOUT |
							   WL_EXIT_ON_PM_DEATH, fd, left, PG_WAIT_EXTENSION);
		if (rc & WL_SOCKET_READABLE)
			break;
		if (rc & WL_LATCH_SET)
		{
			ResetLatch(MyLatch);
			mdd_worker_reload_if_asked();
		}
	}

	(void) fstat(fd, &before);
	mdd_connection_fd = fd;
	if (mdd_got_sigterm)
		(void) shutdown(fd, SHUT_RDWR);
	status = mdd_dicom_serve(fd, &config, &callbacks, errbuf, sizeof(errbuf));
	mdd_connection_fd = -1;
	if (status != MDD_DICOM_OK && peer->calling_ae[0] == '\0')
		ereport(LOG,
				(errmsg("mdd dicom listener %d: connection from %s%s closed: %s",
						peer->listener, peer->host, tls ? " to the TLS port" : "", errbuf)));
	else if (status != MDD_DICOM_OK)
		ereport(LOG,
				(errmsg("mdd dicom listener %d: association from \"%s\" at %s ended: %s",
						peer->listener, peer->calling_ae, peer->host, errbuf)));

	/*
	 * DCMTK closes the connection when it drops the association.  Close it
	 * here only if it is still the same socket, never a descriptor that
	 * was reused meanwhile.
	 */
	if (fstat(fd, &after) == 0 && after.st_ino == before.st_ino &&
		after.st_dev == before.st_dev && S_ISSOCK(after.st_mode))
		close(fd);
	pgstat_report_activity(STATE_IDLE, NULL);
}

void
mdd_listener_main(Datum arg)
{
	Peer		peer;
	WaitEventSet *events;
	int			sockets = 0;

	memset(&peer, 0, sizeof(peer));
	peer.listener = DatumGetInt32(arg);
	mdd_worker_setup_signals();
	BackgroundWorkerInitializeConnection(mdd_database, NULL, 0);
	pgstat_report_appname(psprintf("mdd dicom listener %d", peer.listener));
	peer.scratch = AllocSetContextCreate(TopMemoryContext, "mdd listener scratch",
										 ALLOCSET_DEFAULT_SIZES);

	if (mdd_listen_fd < 0 && mdd_tls_listen_fd < 0)
	{
		ereport(LOG, (errmsg("mdd dicom listener %d: no listening socket, exiting",
							 peer.listener)));
		proc_exit(0);
	}
	pgstat_report_activity(STATE_IDLE, NULL);

	/* wait on the plain port and the TLS port, whichever there is */
	events = CreateWaitEventSet(TopMemoryContext, 4);
	AddWaitEventToSet(events, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(events, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	if (mdd_listen_fd >= 0)
		AddWaitEventToSet(events, WL_SOCKET_READABLE, mdd_listen_fd, NULL, &mdd_listen_fd);
	if (mdd_tls_listen_fd >= 0)
		AddWaitEventToSet(events, WL_SOCKET_READABLE, mdd_tls_listen_fd, NULL, &mdd_tls_listen_fd);
	sockets = (mdd_listen_fd >= 0) + (mdd_tls_listen_fd >= 0);

	while (!mdd_got_sigterm)
	{
		WaitEvent	occurred[3];
		int			n;

		n = WaitEventSetWait(events, -1, occurred, 1 + sockets, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		mdd_worker_reload_if_asked();

		for (int i = 0; i < n && !mdd_got_sigterm; i++)
		{
			int			listen_fd;
			int			fd;

			if (!(occurred[i].events & WL_SOCKET_READABLE))
				continue;
			listen_fd = *(int *) occurred[i].user_data;
			fd = accept(listen_fd, NULL, NULL);
			if (fd < 0)
			{
				if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
					errno != ECONNABORTED)
					ereport(LOG,
							(errcode_for_socket_access(),
							 errmsg("mdd dicom listener %d: accept failed: %m", peer.listener)));
				continue;
			}
			serve_connection(fd, &peer, listen_fd == mdd_tls_listen_fd);
		}
	}
	proc_exit(0);
}
