/*-------------------------------------------------------------------------
 *
 * remote_undo.c
 *	  PUTs to a remote storage belong to the transaction that makes them,
 *	  as far as a remote server allows (remote.h).
 *
 * The blobs written by a transaction (or subtransaction) that aborts are
 * deleted again, best effort, within a few seconds; a server that cannot
 * be reached then keeps them, and a WARNING says so.  At commit they are
 * simply forgotten.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "nodes/pg_list.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "remote.h"

/* deleting the blobs of an aborted transaction: per request, in all */
#define MDD_UNDO_TIMEOUT_MS 5000L
#define MDD_UNDO_BUDGET_MS 30000L

/* a blob written by the current transaction */
typedef struct PendingPut
{
	RemoteStorage *storage;		/* in TopMemoryContext, shared */
	char	   *locator;
	SubTransactionId subid;
} PendingPut;

static bool callbacks_registered = false;
static List *pending_puts = NIL;	/* of PendingPut *, in TopMemoryContext */
static List *pending_storages = NIL;	/* of RemoteStorage *, the same */

static void remote_xact_callback(XactEvent event, void *arg);
static void remote_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
									SubTransactionId parentSubid, void *arg);

/* a copy in TopMemoryContext (NULL stays NULL) */
static char *
top_strdup(const char *s)
{
	return s ? MemoryContextStrdup(TopMemoryContext, s) : NULL;
}

/* equal strings, or both NULL */
static bool
same_string(const char *a, const char *b)
{
	return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* a long-lived copy of rs, shared by the pending blobs of one storage */
static RemoteStorage *
pending_storage(RemoteStorage *rs)
{
	ListCell   *lc;
	RemoteStorage *c;
	MemoryContext old;

	foreach(lc, pending_storages)
	{
		c = (RemoteStorage *) lfirst(lc);
		if (strcmp(c->name, rs->name) == 0 && strcmp(c->url_prefix, rs->url_prefix) == 0 &&
			same_string(c->user, rs->user) && same_string(c->secret, rs->secret) &&
			same_string(c->sigv4, rs->sigv4))
			return c;
	}
	c = MemoryContextAlloc(TopMemoryContext, sizeof(RemoteStorage));
	c->name = top_strdup(rs->name);
	c->s3 = rs->s3;
	c->url_prefix = top_strdup(rs->url_prefix);
	c->user = top_strdup(rs->user);
	c->secret = top_strdup(rs->secret);
	c->sigv4 = top_strdup(rs->sigv4);
	c->timeout_ms = rs->timeout_ms;
	old = MemoryContextSwitchTo(TopMemoryContext);
	pending_storages = lappend(pending_storages, c);
	MemoryContextSwitchTo(old);
	return c;
}

/* note a blob written by the current (sub)transaction */
void
mdd_remote_remember_put(RemoteStorage *rs, const char *locator)
{
	PendingPut *p;
	MemoryContext old;

	if (!callbacks_registered)
	{
		RegisterXactCallback(remote_xact_callback, NULL);
		RegisterSubXactCallback(remote_subxact_callback, NULL);
		callbacks_registered = true;
	}
	p = MemoryContextAlloc(TopMemoryContext, sizeof(PendingPut));
	p->storage = pending_storage(rs);
	p->locator = top_strdup(locator);
	p->subid = GetCurrentSubTransactionId();
	old = MemoryContextSwitchTo(TopMemoryContext);
	pending_puts = lappend(pending_puts, p);
	MemoryContextSwitchTo(old);
}

/* forget every pending blob, at the end of the transaction */
static void
forget_all(void)
{
	ListCell   *lc;

	foreach(lc, pending_puts)
	{
		PendingPut *p = (PendingPut *) lfirst(lc);

		pfree(p->locator);
		pfree(p);
	}
	list_free(pending_puts);
	pending_puts = NIL;
	foreach(lc, pending_storages)
	{
		RemoteStorage *c = (RemoteStorage *) lfirst(lc);

		pfree(c->name);
		pfree(c->url_prefix);
		if (c->user)
			pfree(c->user);
		if (c->secret)
		{
			memset(c->secret, 0, strlen(c->secret));
			pfree(c->secret);
		}
		if (c->sigv4)
			pfree(c->sigv4);
		pfree(c);
	}
	list_free(pending_storages);
	pending_storages = NIL;
}

/*
 * Delete the blobs written by the aborting (sub)transaction.  Best effort
 * and bounded in time: a storage that cannot be reached is given up after
 * its first failure, and everything after MDD_UNDO_BUDGET_MS.
 */
static void
undo_puts(SubTransactionId subid, bool all)
{
	TimestampTz start = GetCurrentTimestamp();
	List	   *unreachable = NIL;
	int			left = 0;
	ListCell   *lc;

	foreach(lc, pending_puts)
	{
		PendingPut *p = (PendingPut *) lfirst(lc);
		Transfer	t;

		if (!all && p->subid != subid)
			continue;
		pending_puts = foreach_delete_current(pending_puts, lc);

		if (list_member_ptr(unreachable, p->storage) ||
			TimestampDifferenceExceeds(start, GetCurrentTimestamp(), MDD_UNDO_BUDGET_MS))
			left++;
		else
		{
			memset(&t, 0, sizeof(t));
			t.method = "DELETE";
			t.path = p->locator;
			t.interruptible = false;
			t.timeout_ms = Min(p->storage->timeout_ms, MDD_UNDO_TIMEOUT_MS);
			mdd_remote_perform(p->storage, &t);
			if (!mdd_remote_status_ok(&t) && !(t.code == CURLE_OK && t.status == 404))
			{
				mdd_remote_report_failure(WARNING, p->storage, &t);
				if (ERRCODE_TO_CATEGORY(mdd_remote_failure_sqlstate(&t)) ==
					ERRCODE_TO_CATEGORY(ERRCODE_CONNECTION_FAILURE))
					unreachable = lappend(unreachable, p->storage);
			}
			if (t.buf)
				pfree(t.buf);
		}
		pfree(p->locator);
		pfree(p);
	}
	if (left > 0)
		ereport(WARNING,
				(errcode(ERRCODE_WARNING),
				 errmsg("%d blobs written by an aborted transaction stay on remote storages", left),
				 errdetail("No present copy refers to them; a copy still recorded as being written is cleaned up with its job or at a runner's start.")));
	list_free(unreachable);
}

/* end of transaction: forget the blobs written (commit) or delete them (abort) */
static void
remote_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_PREPARE:
			if (pending_puts != NIL)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot PREPARE a transaction that wrote to a remote storage")));
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
			forget_all();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			undo_puts(InvalidSubTransactionId, true);
			forget_all();
			break;
		default:
			break;
	}
}

/* end of subtransaction: hand its blobs to the parent, or delete them */
static void
remote_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	ListCell   *lc;

	if (event == SUBXACT_EVENT_ABORT_SUB)
		undo_puts(mySubid, false);
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		foreach(lc, pending_puts)
		{
			PendingPut *p = (PendingPut *) lfirst(lc);

			if (p->subid == mySubid)
				p->subid = parentSubid;
		}
}

