/*-------------------------------------------------------------------------
 *
 * find_worker.c
 *	  A find worker: the C-FIND of one mdd.find to one node, started by
 *	  the backend running mdd.find (extension/find.c), which it answers
 *	  through a message queue in that backend's dynamic shared memory.
 *
 * The worker connects to no database: the query, the node and our AE title
 * are in the segment.  It queries the node in the Study Root model from the
 * top down, as a hierarchical C-FIND must: the studies that match the
 * patient and study filters, then at SERIES level the series of each of
 * them, and at IMAGE level the instances of each series, all on one
 * association, so that every match carries its patient and study
 * attributes whatever the node supports.  The node's time limit covers the
 * whole of it.
 *
 * SIGTERM (the backend terminating it: time up, the query cancelled) sets a
 * flag the DICOM code checks between short polls, and shuts the socket down
 * at once, so that no wait inside DCMTK holds the worker up.  An error
 * ends the worker (FATAL in a worker without a transaction): the backend
 * sees its queue detached and reports the node as failed.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <sys/socket.h>

#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/pmsignal.h"
#include "storage/proc.h"
#include "storage/shm_mq.h"
#include "storage/shm_toc.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

#include "../extension/dicom.h"
#include "../extension/find.h"
#include "../extension/tls.h"
#include "workers.h"

/* how long the peer may take to confirm the release, after the answer went */
#define RELEASE_WAIT_MS 1000

/* a study or series found on the way down, with what its matches inherit */
typedef struct Parent
{
	char	   *values[MDD_FIND_NCOLUMNS];
} Parent;

typedef struct FindWorker
{
	shm_mq_handle *mqh;
	MddFindQuery *query;
	MddFindNode *node;
	TimestampTz deadline;
	bool		receiver_gone;
	char	   *error;			/* an error caught in a callback */
	/* what the answers of the current step go to */
	List	   *found;			/* collecting parents: Parent * */
	const Parent *parent;		/* sending matches: inherited values */
	const int  *columns;		/* the column of each key asked, or -1 */
	int			step_level;
	int64		matches;
} FindWorker;

/* the keys of one step: keyword, value (NULL: return key only), column */
typedef struct StepKeys
{
	int			n;
	const char *keywords[16];
	const char *values[16];
	int			columns[16];
} StepKeys;

static void
add_key(StepKeys *k, const char *keyword, const char *value, int column)
{
	Assert(k->n < lengthof(k->keywords));
	k->keywords[k->n] = keyword;
	k->values[k->n] = value ? value : "";
	k->columns[k->n] = column;
	k->n++;
}

/* the value of a filter, or NULL when mdd.find was not given it */
static const char *
filter(FindWorker *w, MddFindFilter f)
{
	return w->query->has_filter[f] ? w->query->filter[f] : NULL;
}

/* a stop is asked: SIGTERM, or the postmaster died (called from C++) */
static int
find_should_stop(void *arg)
{
	return mdd_got_sigterm || !PostmasterIsAlive();
}

/*
 * The association's socket, once connected (called from C++): the SIGTERM
 * handler shuts it down; a SIGTERM that came before is acted on here.
 */
static void
find_on_socket(void *arg, int fd)
{
	mdd_connection_fd = fd;
	if (mdd_got_sigterm)
		(void) shutdown(fd, SHUT_RDWR);
}

/*
 * Send one message to the backend, waiting while its queue is full; false
 * when the backend is gone or a stop is asked.
 */
static bool
send_message(FindWorker *w, const char *data, Size len)
{
	for (;;)
	{
		shm_mq_result r = shm_mq_send(w->mqh, len, data, true, true);

		if (r == SHM_MQ_SUCCESS)
			return true;
		if (r == SHM_MQ_DETACHED || mdd_got_sigterm)
		{
			w->receiver_gone = true;
			return false;
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_EXIT_ON_PM_DEATH, 0, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

static void
append_column(StringInfo msg, const char *value)
{
	uint32		n = value ? (uint32) strlen(value) : MDD_FIND_NULL;

	appendBinaryStringInfo(msg, (char *) &n, sizeof(n));
	if (value)
		appendBinaryStringInfo(msg, value, strlen(value));
}

/* a match: the parent's values, overridden by the answer's non-empty ones */
static bool
send_match(FindWorker *w, int nvalues, const char *const *values)
{
	const char *row[MDD_FIND_NCOLUMNS];
	StringInfoData msg;
	bool		sent;

	for (int c = 0; c < MDD_FIND_NCOLUMNS; c++)
		row[c] = w->parent ? w->parent->values[c] : NULL;
	for (int i = 0; i < nvalues; i++)
		if (w->columns[i] >= 0 && values[i][0] != '\0')
			row[w->columns[i]] = values[i];
	initStringInfo(&msg);
	appendStringInfoChar(&msg, MDD_FIND_MSG_MATCH);
	for (int c = 0; c < MDD_FIND_NCOLUMNS; c++)
		append_column(&msg, row[c]);
	sent = send_message(w, msg.data, msg.len);
	pfree(msg.data);
	if (sent)
		w->matches++;
	return sent;
}

/* a study or series to go down into: the parent's values and the answer's */
static void
keep_parent(FindWorker *w, int nvalues, const char *const *values)
{
	Parent	   *p = palloc0(sizeof(Parent));

	for (int c = 0; c < MDD_FIND_NCOLUMNS; c++)
		if (w->parent && w->parent->values[c])
			p->values[c] = pstrdup(w->parent->values[c]);
	for (int i = 0; i < nvalues; i++)
		if (w->columns[i] >= 0 && values[i][0] != '\0')
			p->values[w->columns[i]] = pstrdup(values[i]);
	w->found = lappend(w->found, p);
}

/*
 * The answer callback of the C-FIND (called from C++): each match is sent
 * to the backend, or kept to go down into.  Errors are caught here, so
 * that none crosses into DCMTK; returns 0 to cancel the query.
 */
static int
find_answer(void *arg, int nvalues, const char *const *values)
{
	FindWorker *w = (FindWorker *) arg;
	MemoryContext old = CurrentMemoryContext;
	volatile int go_on = 0;

	PG_TRY();
	{
		if (w->step_level == w->query->level)
			go_on = send_match(w, nvalues, values) ? 1 : 0;
		else
		{
			keep_parent(w, nvalues, values);
			go_on = 1;
		}
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(old);
		edata = CopyErrorData();
		FlushErrorState();
		w->error = edata->message;
		go_on = 0;
	}
	PG_END_TRY();
	return go_on;
}

/* milliseconds left until the node's deadline (at least 1) */
static int
ms_left(FindWorker *w)
{
	long		secs;
	int			usecs;

	TimestampDifference(GetCurrentTimestamp(), w->deadline, &secs, &usecs);
	return (int) Max(1, Min(secs * 1000 + usecs / 1000, INT_MAX));
}

/* the keys of one level's query under a parent (NULL at STUDY level) */
static void
step_keys(FindWorker *w, int step, const Parent *parent, StepKeys *k)
{
	bool		last = step == w->query->level;

	k->n = 0;
	if (step == MDD_FIND_STUDY)
	{
		add_key(k, "StudyInstanceUID", filter(w, MDD_FILTER_STUDY_UID), MDD_COL_STUDY_UID);
		add_key(k, "PatientID", filter(w, MDD_FILTER_PATIENT_ID), MDD_COL_PATIENT_ID);
		add_key(k, "PatientName", filter(w, MDD_FILTER_PATIENT_NAME), MDD_COL_PATIENT_NAME);
		add_key(k, "StudyDate", filter(w, MDD_FILTER_STUDY_DATE), MDD_COL_STUDY_DATE);
		add_key(k, "AccessionNumber", filter(w, MDD_FILTER_ACCESSION), -1);
		if (last)
		{
			add_key(k, "ModalitiesInStudy", filter(w, MDD_FILTER_MODALITY), MDD_COL_MODALITY);
			add_key(k, "StudyDescription", NULL, MDD_COL_DESCRIPTION);
			add_key(k, "NumberOfStudyRelatedInstances", NULL, MDD_COL_INSTANCES);
		}
	}
	else if (step == MDD_FIND_SERIES)
	{
		add_key(k, "StudyInstanceUID", parent->values[MDD_COL_STUDY_UID], -1);
		add_key(k, "SeriesInstanceUID", NULL, MDD_COL_SERIES_UID);
		add_key(k, "Modality", filter(w, MDD_FILTER_MODALITY), MDD_COL_MODALITY);
		add_key(k, "SeriesDescription", NULL, MDD_COL_DESCRIPTION);
		if (last)
			add_key(k, "NumberOfSeriesRelatedInstances", NULL, MDD_COL_INSTANCES);
	}
	else
	{
		add_key(k, "StudyInstanceUID", parent->values[MDD_COL_STUDY_UID], -1);
		add_key(k, "SeriesInstanceUID", parent->values[MDD_COL_SERIES_UID], -1);
		add_key(k, "SOPInstanceUID", NULL, MDD_COL_SOP_UID);
	}
}

static const char *
level_keyword(int level)
{
	return level == MDD_FIND_STUDY ? "STUDY" : level == MDD_FIND_SERIES ? "SERIES" : "IMAGE";
}

/*
 * Query one level under each parent (one NULL parent at STUDY level),
 * collecting the parents of the next level unless this is the last.
 * MDD_FIND_DONE, or why the node's query ended.
 */
static MddFindFailure
query_level(FindWorker *w, MddDicomFinder *finder, int step, List *parents,
			List **found, char *errbuf, size_t errlen)
{
	ListCell   *lc;

	*found = NIL;
	foreach(lc, parents)
	{
		StepKeys	k;
		MddFindFailure failure = MDD_FIND_DONE;

		w->parent = (const Parent *) lfirst(lc);
		/* a series or instance without a parent UID cannot be asked for */
		if (step > MDD_FIND_STUDY && (w->parent->values[MDD_COL_STUDY_UID] == NULL ||
									  (step == MDD_FIND_IMAGE &&
									   w->parent->values[MDD_COL_SERIES_UID] == NULL)))
			continue;
		step_keys(w, step, w->parent, &k);
		w->columns = k.columns;
		w->step_level = step;
		w->found = NIL;
		(void) mdd_dicom_finder_query(finder, level_keyword(step), k.n, k.keywords, k.values,
									  ms_left(w), find_answer, w, &failure, errbuf, errlen);
		*found = list_concat(*found, w->found);
		if (w->error)
		{
			snprintf(errbuf, errlen, "%s", w->error);
			return MDD_FIND_BROKEN;
		}
		if (failure != MDD_FIND_DONE)
			return failure;
		CHECK_FOR_INTERRUPTS();
	}
	return MDD_FIND_DONE;
}

/*
 * The whole query of the node: MDD_FIND_DONE or why it ended.  *finder is
 * left open for the caller to close once the backend has the answer.
 */
static MddFindFailure
run_find(FindWorker *w, MddDicomFinder **finder, char *errbuf, size_t errlen)
{
	MddDicomFinderConfig config;
	MddFindFailure failure = MDD_FIND_DONE;
	List	   *parents = list_make1(palloc0(sizeof(Parent)));

	memset(&config, 0, sizeof(config));
	config.our_ae = w->query->our_ae;
	config.peer_ae = w->node->ae_title;
	config.host = w->node->host;
	config.port = w->node->port;
	config.timeout_ms = ms_left(w);
	config.arg = w;
	config.should_stop = find_should_stop;
	config.on_socket = find_on_socket;
	config.tls = mdd_tls_if(w->node->tls);

	*finder = NULL;
	if (mdd_dicom_finder_open(&config, finder, &failure, errbuf, errlen) != MDD_DICOM_OK)
		return failure == MDD_FIND_DONE ? MDD_FIND_BROKEN : failure;
	for (int step = MDD_FIND_STUDY; step <= w->query->level; step++)
	{
		List	   *found;

		failure = query_level(w, *finder, step, parents, &found, errbuf, errlen);
		if (failure != MDD_FIND_DONE)
			break;
		parents = found;
	}
	return failure;
}

/* the timer of the release: a peer slow to confirm it is cut off */
static void
release_timeout(void)
{
	if (mdd_connection_fd >= 0)
		(void) shutdown(mdd_connection_fd, SHUT_RDWR);
}

/*
 * Release the association (abort it after a failure that left it unusable),
 * waiting at most RELEASE_WAIT_MS for the peer's confirmation.
 */
static void
close_finder(MddDicomFinder *finder, MddFindFailure failure)
{
	TimeoutId	timer = RegisterTimeout(USER_TIMEOUT, release_timeout);

	enable_timeout_after(timer, RELEASE_WAIT_MS);
	mdd_dicom_finder_close(finder, failure == MDD_FIND_DONE || failure == MDD_FIND_REFUSED);
	disable_timeout(timer, false);
	mdd_connection_fd = -1;
}

/*
 * Entry point of a find worker.  bgw_main_arg is the handle of the
 * backend's segment, bgw_extra the index of the node.
 */
void
mdd_find_worker_main(Datum arg)
{
	dsm_segment *seg;
	shm_toc    *toc;
	shm_mq	   *mq;
	FindWorker	w;
	int			index;
	char		errbuf[1024];
	MddFindFailure failure;
	MddDicomFinder *finder;
	StringInfoData msg;

	mdd_worker_setup_signals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("mdd find worker");
	CurrentResourceOwner = ResourceOwnerCreate(NULL, "mdd find worker");

	seg = dsm_attach(DatumGetUInt32(arg));
	if (seg == NULL)
		proc_exit(0);			/* the backend is gone already */
	toc = shm_toc_attach(MDD_FIND_MAGIC, dsm_segment_address(seg));
	if (toc == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("mdd find worker: bad magic number in dynamic shared memory segment")));
	memset(&w, 0, sizeof(w));
	w.query = shm_toc_lookup(toc, MDD_FIND_KEY_QUERY, false);
	memcpy(&index, MyBgworkerEntry->bgw_extra, sizeof(index));
	if (index < 0 || index >= w.query->nnodes)
		elog(ERROR, "mdd find worker: node index %d out of range", index);
	w.node = &w.query->nodes[index];
	w.deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), w.node->timeout_ms);
	mq = shm_toc_lookup(toc, MDD_FIND_KEY_QUEUE(index), false);
	shm_mq_set_sender(mq, MyProc);
	w.mqh = shm_mq_attach(mq, seg, NULL);

	pgstat_report_activity(STATE_RUNNING,
						   psprintf("C-FIND %s to node %s (%s at %s:%d)",
									level_keyword(w.query->level), w.node->name,
									w.node->ae_title, w.node->host, w.node->port));
	errbuf[0] = '\0';
	failure = run_find(&w, &finder, errbuf, sizeof(errbuf));

	/* the answer first: the backend need not wait for the release */
	if (!w.receiver_gone && !mdd_got_sigterm)
	{
		initStringInfo(&msg);
		appendStringInfoChar(&msg, MDD_FIND_MSG_END);
		appendStringInfoChar(&msg, (char) failure);
		appendStringInfoString(&msg, failure == MDD_FIND_DONE ? "" : errbuf);
		(void) send_message(&w, msg.data, msg.len);
	}
	if (finder != NULL)
	{
		pgstat_report_activity(STATE_RUNNING,
							   psprintf("releasing the association with node %s", w.node->name));
		close_finder(finder, failure);
	}
	mdd_connection_fd = -1;
	pgstat_report_activity(STATE_IDLE, NULL);
	dsm_detach(seg);
	proc_exit(0);
}
