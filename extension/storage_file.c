/*-------------------------------------------------------------------------
 *
 * storage_file.c
 *	  The "file" storage kind: object bytes as files below a root directory,
 *	  tied to the fate of the transaction that stores them.
 *
 * A blob is written under a temporary name and renamed to its final name
 * at once, but it is only made durable just before the transaction
 * commits (XACT_EVENT_PRE_COMMIT): every file and every directory touched
 * is flushed then, or the whole file system with syncfs() when there are
 * many, so that a bulk import costs one flush instead of two per object.
 * The catalog row that points at a blob therefore never commits before
 * the blob is on disk.  If the transaction (or the subtransaction that
 * wrote it) aborts, the blob is unlinked.  A crash in between can leave an
 * unreferenced blob behind, never a referenced blob missing.
 *
 * Deleting a blob (mdd._file_delete) is not deferred: the file is
 * unlinked and its directory flushed at once.  Whoever deletes decides
 * when the catalog stops pointing at it (see "Archive and restore" in the
 * design notes).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "mdd.h"

PG_FUNCTION_INFO_V1(mdd_file_put_sql);
PG_FUNCTION_INFO_V1(mdd_file_get_sql);
PG_FUNCTION_INFO_V1(mdd_file_delete_sql);

/* above this many pending blobs, one syncfs() replaces per-file fsyncs */
#define MDD_SYNCFS_THRESHOLD 16

/* a blob written by the current transaction, not yet made durable */
typedef struct PendingBlob
{
	char	   *path;
	char	   *root;
	SubTransactionId subid;		/* subtransaction that wrote it */
} PendingBlob;

static List *pending_blobs = NIL;	/* of PendingBlob *, in TopMemoryContext */
static List *pending_dirs = NIL;	/* directories whose entries changed */

static void
free_pending(void)
{
	ListCell   *lc;

	foreach(lc, pending_blobs)
	{
		PendingBlob *b = (PendingBlob *) lfirst(lc);

		pfree(b->path);
		pfree(b->root);
		pfree(b);
	}
	list_free(pending_blobs);
	pending_blobs = NIL;
	list_free_deep(pending_dirs);
	pending_dirs = NIL;
}

static void
remember_dir(const char *dir)
{
	ListCell   *lc;
	MemoryContext old;

	foreach(lc, pending_dirs)
		if (strcmp((char *) lfirst(lc), dir) == 0)
			return;
	old = MemoryContextSwitchTo(TopMemoryContext);
	pending_dirs = lappend(pending_dirs, pstrdup(dir));
	MemoryContextSwitchTo(old);
}

/* flush one file system through a descriptor on it */
static void
sync_filesystem_of(const char *root)
{
	int			fd = OpenTransientFile(root, O_RDONLY | PG_BINARY);

	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open storage root \"%s\": %m", root)));
	if (syncfs(fd) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not flush the file system of \"%s\": %m", root)));
	CloseTransientFile(fd);
}

/* make every pending blob and directory durable (before commit) */
static void
flush_pending(void)
{
	ListCell   *lc;

	if (list_length(pending_blobs) > MDD_SYNCFS_THRESHOLD)
	{
		List	   *roots = NIL;

		foreach(lc, pending_blobs)
		{
			PendingBlob *b = (PendingBlob *) lfirst(lc);
			ListCell   *r;
			bool		seen = false;

			foreach(r, roots)
				if (strcmp((char *) lfirst(r), b->root) == 0)
					seen = true;
			if (!seen)
			{
				roots = lappend(roots, b->root);
				sync_filesystem_of(b->root);
			}
		}
		list_free(roots);
		return;
	}
	foreach(lc, pending_blobs)
		mdd_fsync_path(((PendingBlob *) lfirst(lc))->path, false);
	foreach(lc, pending_dirs)
		mdd_fsync_path((char *) lfirst(lc), true);
}

/* unlink the blobs of the aborting (sub)transaction */
static void
unlink_pending(SubTransactionId subid, bool all)
{
	ListCell   *lc;

	foreach(lc, pending_blobs)
	{
		PendingBlob *b = (PendingBlob *) lfirst(lc);

		if (!all && b->subid != subid)
			continue;
		if (unlink(b->path) != 0 && errno != ENOENT)
			ereport(WARNING,
					(errcode_for_file_access(),
					 errmsg("could not remove blob \"%s\" of an aborted transaction: %m",
							b->path)));
		pfree(b->path);
		pfree(b->root);
		pfree(b);
		pending_blobs = foreach_delete_current(pending_blobs, lc);
	}
}

static void
file_storage_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PARALLEL_PRE_COMMIT:
			flush_pending();
			break;
		case XACT_EVENT_PRE_PREPARE:
			if (pending_blobs != NIL)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot PREPARE a transaction that stored objects in a file storage")));
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			free_pending();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			unlink_pending(InvalidSubTransactionId, true);
			free_pending();
			break;
		default:
			break;
	}
}

static void
file_storage_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
							  SubTransactionId parentSubid, void *arg)
{
	ListCell   *lc;

	if (event == SUBXACT_EVENT_ABORT_SUB)
		unlink_pending(mySubid, false);
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		foreach(lc, pending_blobs)
		{
			PendingBlob *b = (PendingBlob *) lfirst(lc);

			if (b->subid == mySubid)
				b->subid = parentSubid;
		}
}

void
mdd_storage_file_init(void)
{
	RegisterXactCallback(file_storage_xact_callback, NULL);
	RegisterSubXactCallback(file_storage_subxact_callback, NULL);
}

/*
 * The temporary name a blob is written under before it is renamed to
 * path.  It is the same for every write of that blob (a blob's path names
 * its object, and one transaction at a time writes an object), so what a
 * write cut short by a crash left is found without searching.
 */
static char *
temporary_path(const char *path)
{
	return psprintf("%s.tmp", path);
}

/* remove the temporary file a write of path cut short left, if any */
static void
remove_stale_temporary(const char *path)
{
	char	   *tmp = temporary_path(path);

	if (unlink(tmp) != 0 && errno != ENOENT)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not remove \"%s\": %m", tmp)));
	pfree(tmp);
}

/* root/relpath, refusing relative paths that could climb out of root */
static char *
blob_path(text *root_t, text *rel_t)
{
	char	   *root = text_to_cstring(root_t);
	char	   *rel = text_to_cstring(rel_t);

	if (root[0] != '/')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("storage root \"%s\" is not absolute", root)));
	if (rel[0] == '/' || rel[0] == '\0' || strstr(rel, "..") != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid blob locator \"%s\"", rel)));
	return psprintf("%s/%s", root, rel);
}

/*
 * mdd._file_put(root text, locator text, data bytea) RETURNS bigint
 *
 * Write a blob of the file storage rooted at root; returns its size.  It
 * becomes durable at commit and disappears if the transaction aborts.
 */
Datum
mdd_file_put_sql(PG_FUNCTION_ARGS)
{
	char	   *path;
	char	   *dir;
	bytea	   *data;
	List	   *created = NIL;
	ListCell   *lc;
	PendingBlob *b;
	MemoryContext old;
	struct stat st;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("storage root, locator and data must not be NULL")));
	path = blob_path(PG_GETARG_TEXT_PP(0), PG_GETARG_TEXT_PP(1));
	data = PG_GETARG_BYTEA_PP(2);

	if (lstat(path, &st) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_DUPLICATE_FILE),
				 errmsg("blob \"%s\" already exists", path)));

	dir = pstrdup(path);
	*strrchr(dir, '/') = '\0';
	if (stat(dir, &st) != 0)
		mdd_make_directories(dir, &created);

	{
		char	   *tmp = temporary_path(path);

		mdd_write_file_atomically(path, tmp, VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data), false);
		pfree(tmp);
	}

	old = MemoryContextSwitchTo(TopMemoryContext);
	b = palloc(sizeof(PendingBlob));
	b->path = pstrdup(path);
	b->root = text_to_cstring(PG_GETARG_TEXT_PP(0));
	b->subid = GetCurrentSubTransactionId();
	pending_blobs = lappend(pending_blobs, b);
	MemoryContextSwitchTo(old);

	remember_dir(dir);
	foreach(lc, created)
	{
		char	   *parent = pstrdup((char *) lfirst(lc));

		*strrchr(parent, '/') = '\0';
		remember_dir(parent);
	}
	PG_RETURN_INT64((int64) VARSIZE_ANY_EXHDR(data));
}

/*
 * mdd._file_get(root text, locator text) RETURNS bytea
 */
Datum
mdd_file_get_sql(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("storage root and locator must not be NULL")));
	PG_RETURN_BYTEA_P(mdd_read_whole_file(blob_path(PG_GETARG_TEXT_PP(0),
													PG_GETARG_TEXT_PP(1))));
}

/*
 * mdd._file_delete(root text, locator text) RETURNS boolean
 *
 * Remove a blob of the file storage rooted at root, at once, and flush
 * its directory so that the removal survives a crash.  Returns false when
 * there was no such blob.  A blob written earlier in the same transaction
 * is no longer flushed (nor unlinked again) at its end.
 */
Datum
mdd_file_delete_sql(PG_FUNCTION_ARGS)
{
	char	   *path;
	char	   *dir;
	ListCell   *lc;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("storage root and locator must not be NULL")));
	path = blob_path(PG_GETARG_TEXT_PP(0), PG_GETARG_TEXT_PP(1));

	remove_stale_temporary(path);
	if (unlink(path) != 0)
	{
		if (errno == ENOENT)
			PG_RETURN_BOOL(false);
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not remove blob \"%s\": %m", path)));
	}

	foreach(lc, pending_blobs)
	{
		PendingBlob *b = (PendingBlob *) lfirst(lc);

		if (strcmp(b->path, path) != 0)
			continue;
		pfree(b->path);
		pfree(b->root);
		pfree(b);
		pending_blobs = foreach_delete_current(pending_blobs, lc);
	}

	dir = pstrdup(path);
	*strrchr(dir, '/') = '\0';
	mdd_fsync_path(dir, true);
	PG_RETURN_BOOL(true);
}
