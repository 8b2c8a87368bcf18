/*-------------------------------------------------------------------------
 *
 * find.c
 *	  The backend side of mdd.find: one C-FIND per node, each in a find
 *	  worker of its own, all at the same time, while this backend matches
 *	  the local catalog; the merged list comes back as one result set.
 *
 * mdd._find_spanning creates a dynamic shared memory segment with the query
 * and one message queue per node (find.h), starts one dynamic background
 * worker per node with itself as bgw_notify_pid, runs the local query
 * through SPI, then reads the queues and waits on its latch (set by the
 * queues and by the workers' start and exit) until every node has ended or
 * its time is up.  A node that failed or ran out of time gives one status
 * row; its worker is terminated.
 *
 * No worker outlives the call: the segment belongs to the call's resource
 * owner, and detaching it, whether at the end or when an error or a
 * cancel aborts the query, terminates every worker still querying
 * (find_detach).  A worker that has sent its answer is left to release
 * its association, which it does within a second (find_worker.c).  Workers that cannot be started for want of a slot
 * (max_worker_processes) wait for one to free up within the time limit.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/latch.h"
#include "storage/shm_mq.h"
#include "storage/shm_toc.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "dicom.h"
#include "find.h"
#include "mdd.h"
#include "../bgworker/workers.h"

PG_FUNCTION_INFO_V1(mdd_find_spanning_sql);

#define FIND_COLUMNS	(3 + MDD_FIND_NCOLUMNS)
#define LOCAL_BATCH		1000

typedef enum NodeState
{
	NODE_PENDING,				/* no worker slot yet */
	NODE_RUNNING,
	NODE_DONE
} NodeState;

/* what the backend knows of one node's query; lives in TopMemoryContext */
typedef struct FindNode
{
	NodeState	state;
	BackgroundWorkerHandle *handle;
	TimestampTz deadline;
	int			limit_ms;		/* the time it was given */
	bool		answered;		/* its worker said how it ended, and is
								 * releasing the association on its own */
	int64		matches;
	char	   *status;			/* NULL: ended well */
} FindNode;

typedef struct FindRun
{
	int			nnodes;
	FindNode   *nodes;
} FindRun;

/*
 * on_dsm_detach callback: terminate the workers still running and free
 * what the run kept in TopMemoryContext.  Runs at the end of the call or
 * when the call's resource owner is released by an abort.
 */
static void
find_detach(dsm_segment *seg, Datum arg)
{
	FindRun    *run = (FindRun *) DatumGetPointer(arg);

	for (int i = 0; i < run->nnodes; i++)
	{
		if (run->nodes[i].handle != NULL)
		{
			if (!run->nodes[i].answered)
				TerminateBackgroundWorker(run->nodes[i].handle);
			pfree(run->nodes[i].handle);
		}
		if (run->nodes[i].status != NULL)
			pfree(run->nodes[i].status);
	}
	pfree(run->nodes);
	pfree(run);
}

/* the elements of a one-dimensional array argument, NULLs refused */
static int
array_elements(ArrayType *array, Oid type, const char *what, Datum **elems)
{
	bool	   *nulls;
	int			n;
	int16		typlen;
	bool		typbyval;
	char		typalign;

	get_typlenbyvalalign(type, &typlen, &typbyval, &typalign);
	deconstruct_array(array, type, typlen, typbyval, typalign, elems, &nulls, &n);
	for (int i = 0; i < n; i++)
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not contain NULL", what)));
	return n;
}

/* copy text into a fixed buffer of shared memory, refusing what does not fit */
static void
copy_bounded(char *dst, size_t size, const char *src, const char *what)
{
	if (strlen(src) >= size)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("%s is too long: \"%s\"", what, src),
				 errdetail("At most %d bytes are allowed.", (int) size - 1)));
	strlcpy(dst, src, size);
}

/* start the worker of node i; false when no slot is free */
static bool
start_worker(dsm_segment *seg, FindRun *run, shm_mq_handle *mqh, MddFindQuery *query, int i)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	MemoryContext old;
	bool		ok;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_ConsistentState;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "mdd");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "mdd_find_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "mdd find worker for node %s", query->nodes[i].name);
	snprintf(worker.bgw_type, BGW_MAXLEN, "mdd find worker");
	worker.bgw_main_arg = UInt32GetDatum(dsm_segment_handle(seg));
	memcpy(worker.bgw_extra, &i, sizeof(i));
	worker.bgw_notify_pid = MyProcPid;

	old = MemoryContextSwitchTo(TopMemoryContext);
	ok = RegisterDynamicBackgroundWorker(&worker, &handle);
	MemoryContextSwitchTo(old);
	if (!ok)
		return false;
	run->nodes[i].handle = handle;
	run->nodes[i].state = NODE_RUNNING;
	/* a worker that dies before attaching its queue shows as detached */
	shm_mq_set_handle(mqh, handle);
	return true;
}

/* "2", "0.5": seconds for a status text */
static char *
seconds_text(int ms)
{
	char		buf[32];

	snprintf(buf, sizeof(buf), "%g", ms / 1000.0);
	return pstrdup(buf);
}

/*
 * End node i with a status row's text (NULL: it ended well).  Its worker
 * is terminated unless it answered: then it only has the association to
 * release, which it does within a second, without keeping us waiting.
 */
static void
end_node(FindRun *run, int i, const char *status)
{
	FindNode   *node = &run->nodes[i];

	node->state = NODE_DONE;
	if (status != NULL)
		node->status = MemoryContextStrdup(TopMemoryContext, status);
	if (node->handle != NULL && !node->answered)
		TerminateBackgroundWorker(node->handle);
}

/* the status text of a node whose time ran out */
static char *
timeout_text(FindNode *node, const char *why)
{
	StringInfoData s;

	initStringInfo(&s);
	appendStringInfo(&s, "timeout after %s s", seconds_text(node->limit_ms));
	if (why)
		appendStringInfo(&s, ": %s", why);
	if (node->matches > 0)
		appendStringInfo(&s, " (" INT64_FORMAT " matches received before)", node->matches);
	return s.data;
}

/* a match of node i into the result set */
static void
put_match(ReturnSetInfo *rsinfo, const char *location, const char *level,
		  const char *data, Size len)
{
	Datum		values[FIND_COLUMNS];
	bool		nulls[FIND_COLUMNS];
	Size		pos = 1;

	memset(nulls, 0, sizeof(nulls));
	values[0] = CStringGetTextDatum(location);
	values[1] = CStringGetTextDatum("ok");
	values[2] = CStringGetTextDatum(level);
	for (int c = 0; c < MDD_FIND_NCOLUMNS; c++)
	{
		uint32		n;
		char	   *text;

		if (pos + sizeof(n) > len)
			elog(ERROR, "truncated match message from a find worker");
		memcpy(&n, data + pos, sizeof(n));
		pos += sizeof(n);
		if (n == MDD_FIND_NULL)
		{
			nulls[3 + c] = true;
			continue;
		}
		if (n > len - pos)
			elog(ERROR, "truncated match message from a find worker");
		/* the worker sends valid UTF-8; convert to the database's encoding */
		text = pg_any_to_server(data + pos, n, PG_UTF8);
		if (text == data + pos)
			text = pnstrdup(data + pos, n);
		pos += n;
		if (c == MDD_COL_INSTANCES)
		{
			char	   *end;
			long		v;

			errno = 0;
			v = strtol(text, &end, 10);
			if (errno != 0 || end == text || *end != '\0' || v < 0 || v > INT_MAX)
				nulls[3 + c] = true;
			else
				values[3 + c] = Int32GetDatum((int32) v);
		}
		else
			values[3 + c] = CStringGetTextDatum(text);
	}
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/* a status row: location, status, level, the rest NULL */
static void
put_status(ReturnSetInfo *rsinfo, const char *location, const char *status, const char *level)
{
	Datum		values[FIND_COLUMNS];
	bool		nulls[FIND_COLUMNS];

	memset(nulls, true, sizeof(nulls));
	values[0] = CStringGetTextDatum(location);
	values[1] = CStringGetTextDatum(status);
	values[2] = CStringGetTextDatum(level);
	nulls[0] = nulls[1] = nulls[2] = false;
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/* the end message of a worker as a status text (NULL: success) */
static char *
end_text(FindNode *node, const char *data, Size len)
{
	MddFindFailure failure;
	char	   *detail;

	if (len < 2)
		return pstrdup("failed: malformed answer of the find worker");
	failure = (MddFindFailure) (unsigned char) data[1];
	detail = pg_any_to_server(data + 2, len - 2, PG_UTF8);
	if (detail == data + 2)
		detail = pnstrdup(data + 2, len - 2);
	switch (failure)
	{
		case MDD_FIND_DONE:
			return NULL;
		case MDD_FIND_UNREACHABLE:
			return psprintf("unreachable: %s", detail);
		case MDD_FIND_REFUSED:
			return psprintf("refused: %s", detail);
		case MDD_FIND_TIMEOUT:
			return timeout_text(node, NULL);
		case MDD_FIND_BROKEN:
		case MDD_FIND_STOPPED:
			break;
	}
	return psprintf("failed: %s", detail);
}

/*
 * Read what node i's queue holds, without waiting.  Ends the node when its
 * worker said how the query ended or went away.
 */
static void
drain_queue(ReturnSetInfo *rsinfo, FindRun *run, int i, shm_mq_handle *mqh,
			const char *location, const char *level)
{
	FindNode   *node = &run->nodes[i];

	while (node->state == NODE_RUNNING)
	{
		Size		len;
		void	   *data;
		shm_mq_result r = shm_mq_receive(mqh, &len, &data, true);

		if (r == SHM_MQ_WOULD_BLOCK)
			return;
		if (r == SHM_MQ_DETACHED)
		{
			end_node(run, i, "failed: the find worker stopped without an answer (see the server log)");
			return;
		}
		if (len >= 1 && ((char *) data)[0] == MDD_FIND_MSG_MATCH)
		{
			put_match(rsinfo, location, level, data, len);
			node->matches++;
		}
		else if (len >= 1 && ((char *) data)[0] == MDD_FIND_MSG_END)
		{
			node->answered = true;
			end_node(run, i, end_text(node, data, len));
		}
		else
			end_node(run, i, "failed: unknown message from the find worker");
	}
}

/* the local matches, through SPI, in batches; the queues are read between them */
static void
find_local(ReturnSetInfo *rsinfo, Datum *filters, bool *filter_nulls, const char *level,
		   FindRun *run, shm_mq_handle **mqh, MddFindQuery *query, const char *level_name)
{
	Oid			types[1 + MDD_FIND_NFILTERS];
	Datum		values[1 + MDD_FIND_NFILTERS];
	char		nulls[1 + MDD_FIND_NFILTERS];
	Portal		portal;

	types[0] = TEXTOID;
	values[0] = CStringGetTextDatum(level);
	nulls[0] = ' ';
	for (int f = 0; f < MDD_FIND_NFILTERS; f++)
	{
		types[1 + f] = TEXTOID;
		values[1 + f] = filters[f];
		nulls[1 + f] = filter_nulls[f] ? 'n' : ' ';
	}
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	portal = SPI_cursor_open_with_args(NULL,
									   "SELECT * FROM mdd._find_local($1, $2, $3, $4, $5, $6, $7)",
									   1 + MDD_FIND_NFILTERS, types, values, nulls, true, 0);
	for (;;)
	{
		SPI_cursor_fetch(portal, true, LOCAL_BATCH);
		for (uint64 r = 0; r < SPI_processed; r++)
			tuplestore_puttuple(rsinfo->setResult, SPI_tuptable->vals[r]);
		if (SPI_processed < LOCAL_BATCH)
			break;
		SPI_freetuptable(SPI_tuptable);
		/* let the workers go on: their queues are small */
		for (int i = 0; run != NULL && i < run->nnodes; i++)
			drain_queue(rsinfo, run, i, mqh[i], query->nodes[i].name, level_name);
	}
	SPI_cursor_close(portal);
	SPI_finish();
}

/*
 * mdd._find_spanning(level text, patient_id text, patient_name text,
 *                    study_date text, modality text, study_instance_uid text,
 *                    accession_number text, local boolean,
 *                    names text[], ae_titles text[], hosts text[],
 *                    ports integer[], timeouts_ms integer[], timeout_ms integer,
 *                    tls boolean[] DEFAULT NULL)
 *   RETURNS SETOF (the columns of mdd.find)
 *
 * The local matches (when local) and every node's, queried at the same
 * time; one status row for each node that failed or ran out of time.
 * The remote matches are as the nodes answered them: mdd.find filters
 * them again with the local matching rules.
 */
Datum
mdd_find_spanning_sql(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *level_name;
	int			level;
	Datum		filters[MDD_FIND_NFILTERS];
	bool		filter_nulls[MDD_FIND_NFILTERS];
	bool		local;
	Datum	   *names = NULL;
	Datum	   *aes = NULL;
	Datum	   *hosts = NULL;
	Datum	   *ports = NULL;
	Datum	   *timeouts = NULL;
	Datum	   *tls = NULL;
	int			nnodes = 0;
	int			timeout_ms;
	TimestampTz start;
	dsm_segment *seg = NULL;
	MddFindQuery *query = NULL;
	shm_mq_handle **mqh = NULL;
	FindRun    *run = NULL;

	for (int a = 0; a < 14; a++)
		if (PG_ARGISNULL(a) && (a == 0 || a >= 7))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("level, nodes and timeout of mdd._find_spanning must not be NULL")));
	level_name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (strcmp(level_name, "STUDY") == 0)
		level = MDD_FIND_STUDY;
	else if (strcmp(level_name, "SERIES") == 0)
		level = MDD_FIND_SERIES;
	else if (strcmp(level_name, "IMAGE") == 0)
		level = MDD_FIND_IMAGE;
	else
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown find level \"%s\"", level_name),
				 errhint("Use STUDY, SERIES or IMAGE.")));
	for (int f = 0; f < MDD_FIND_NFILTERS; f++)
	{
		filter_nulls[f] = PG_ARGISNULL(1 + f);
		filters[f] = filter_nulls[f] ? (Datum) 0 : PG_GETARG_DATUM(1 + f);
	}
	local = PG_GETARG_BOOL(7);
	nnodes = array_elements(PG_GETARG_ARRAYTYPE_P(8), TEXTOID, "node names", &names);
	if (array_elements(PG_GETARG_ARRAYTYPE_P(9), TEXTOID, "AE titles", &aes) != nnodes ||
		array_elements(PG_GETARG_ARRAYTYPE_P(10), TEXTOID, "hosts", &hosts) != nnodes ||
		array_elements(PG_GETARG_ARRAYTYPE_P(11), INT4OID, "ports", &ports) != nnodes ||
		array_elements(PG_GETARG_ARRAYTYPE_P(12), INT4OID, "timeouts", &timeouts) != nnodes)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("the node arrays of mdd._find_spanning differ in length")));
	timeout_ms = PG_GETARG_INT32(13);
	if (PG_NARGS() > 14 && !PG_ARGISNULL(14) &&
		array_elements(PG_GETARG_ARRAYTYPE_P(14), BOOLOID, "TLS flags", &tls) != nnodes)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("the node arrays of mdd._find_spanning differ in length")));
	if (timeout_ms <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("find timeout must be positive")));

	InitMaterializedSRF(fcinfo, 0);
	start = GetCurrentTimestamp();

	if (nnodes > 0)
	{
		shm_toc_estimator e;
		Size		query_size = add_size(offsetof(MddFindQuery, nodes),
										  mul_size(nnodes, sizeof(MddFindNode)));
		shm_toc    *toc;

		shm_toc_initialize_estimator(&e);
		shm_toc_estimate_chunk(&e, query_size);
		for (int i = 0; i < nnodes; i++)
			shm_toc_estimate_chunk(&e, MDD_FIND_QUEUE_SIZE);
		shm_toc_estimate_keys(&e, 1 + nnodes);

		seg = dsm_create(shm_toc_estimate(&e), 0);
		toc = shm_toc_create(MDD_FIND_MAGIC, dsm_segment_address(seg), shm_toc_estimate(&e));
		query = shm_toc_allocate(toc, query_size);
		memset(query, 0, query_size);
		copy_bounded(query->our_ae, sizeof(query->our_ae), mdd_ae_title, "mdd.ae_title");
		query->level = level;
		for (int f = 0; f < MDD_FIND_NFILTERS; f++)
		{
			query->has_filter[f] = !filter_nulls[f];
			if (!filter_nulls[f])
			{
				char	   *v = text_to_cstring(DatumGetTextPP(filters[f]));

				/* the workers send UTF-8 */
				v = pg_server_to_any(v, strlen(v), PG_UTF8);
				copy_bounded(query->filter[f], sizeof(query->filter[f]), v, "find filter value");
			}
		}
		query->nnodes = nnodes;
		for (int i = 0; i < nnodes; i++)
		{
			MddFindNode *n = &query->nodes[i];

			copy_bounded(n->name, sizeof(n->name), TextDatumGetCString(names[i]), "node name");
			copy_bounded(n->ae_title, sizeof(n->ae_title), TextDatumGetCString(aes[i]), "AE title");
			copy_bounded(n->host, sizeof(n->host), TextDatumGetCString(hosts[i]), "host");
			n->port = DatumGetInt32(ports[i]);
			n->timeout_ms = Max(1, Min(DatumGetInt32(timeouts[i]), timeout_ms));
			n->tls = tls != NULL && DatumGetBool(tls[i]);
		}
		shm_toc_insert(toc, MDD_FIND_KEY_QUERY, query);

		run = MemoryContextAllocZero(TopMemoryContext, sizeof(FindRun));
		run->nodes = MemoryContextAllocZero(TopMemoryContext, sizeof(FindNode) * nnodes);
		run->nnodes = nnodes;
		on_dsm_detach(seg, find_detach, PointerGetDatum(run));

		mqh = palloc(sizeof(shm_mq_handle *) * nnodes);
		for (int i = 0; i < nnodes; i++)
		{
			shm_mq	   *mq = shm_mq_create(shm_toc_allocate(toc, MDD_FIND_QUEUE_SIZE),
										   MDD_FIND_QUEUE_SIZE);

			shm_toc_insert(toc, MDD_FIND_KEY_QUEUE(i), mq);
			shm_mq_set_receiver(mq, MyProc);
			mqh[i] = shm_mq_attach(mq, seg, NULL);
			run->nodes[i].state = NODE_PENDING;
			run->nodes[i].limit_ms = query->nodes[i].timeout_ms;
			run->nodes[i].deadline = TimestampTzPlusMilliseconds(start, query->nodes[i].timeout_ms);
		}
		for (int i = 0; i < nnodes; i++)
			if (!start_worker(seg, run, mqh[i], query, i))
				break;			/* no slot: the others wait for one too */
	}

	if (local)
		find_local(rsinfo, filters, filter_nulls, level_name, run, mqh, query, level_name);

	while (run != NULL)
	{
		TimestampTz now;
		long		wait_ms = 1000;
		bool		pending = false;
		bool		running = false;

		for (int i = 0; i < nnodes; i++)
			drain_queue(rsinfo, run, i, mqh[i], query->nodes[i].name, level_name);

		now = GetCurrentTimestamp();
		for (int i = 0; i < nnodes; i++)
		{
			FindNode   *node = &run->nodes[i];

			/* in order: once one finds no slot, the later ones wait */
			if (node->state == NODE_PENDING && !pending && now < node->deadline)
				(void) start_worker(seg, run, mqh[i], query, i);
			if (node->state != NODE_DONE && now >= node->deadline)
			{
				end_node(run, i, timeout_text(node, node->state == NODE_PENDING
											  ? "no background worker slot was free (max_worker_processes)"
											  : NULL));
				continue;
			}
			if (node->state == NODE_PENDING)
				pending = true;
			if (node->state != NODE_DONE)
			{
				long		secs;
				int			usecs;

				running = running || node->state == NODE_RUNNING;
				TimestampDifference(now, node->deadline, &secs, &usecs);
				wait_ms = Min(wait_ms, secs * 1000 + (usecs + 999) / 1000);
			}
		}
		if (!pending && !running)
			break;
		/* a slot freed by somebody else's worker is not signalled to us */
		if (pending)
			wait_ms = Min(wait_ms, 100);

		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(wait_ms, 1), PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}

	for (int i = 0; run != NULL && i < nnodes; i++)
		if (run->nodes[i].status != NULL)
			put_status(rsinfo, query->nodes[i].name, run->nodes[i].status, level_name);

	/* terminates what still runs (nothing should) and frees the run */
	if (seg != NULL)
		dsm_detach(seg);
	return (Datum) 0;
}
