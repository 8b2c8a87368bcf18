/*-------------------------------------------------------------------------
 *
 * file_io.c
 *	  Whole-file reading and crash-safe writing, and the directory walk of
 *	  mdd.import.
 *
 * A file is written under a temporary name, made durable, then renamed
 * over its final name and its directory made durable: a crash leaves
 * either the old state or the complete new file, never a torn one.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "storage/fd.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"

#include "mdd.h"

PG_FUNCTION_INFO_V1(mdd_read_file_sql);
PG_FUNCTION_INFO_V1(mdd_write_file_sql);
PG_FUNCTION_INFO_V1(mdd_list_files_sql);

/* largest object mdd keeps: what fits in one bytea */
#define MDD_MAX_OBJECT_SIZE ((Size) MaxAllocSize - VARHDRSZ)

/*
 * Read a whole regular file into a new bytea.
 */
bytea *
mdd_read_whole_file(const char *path)
{
	struct stat st;
	bytea	   *result;
	Size		done = 0;
	int			fd;

	/*
	 * Look before opening: opening a named pipe would block until someone
	 * writes to it.  O_NONBLOCK covers a file swapped in between.
	 */
	if (stat(path, &st) == 0 && !S_ISREG(st.st_mode))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is not a regular file", path)));
	fd = OpenTransientFile(path, O_RDONLY | O_NONBLOCK | PG_BINARY);
	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open file \"%s\" for reading: %m", path)));
	if (fstat(fd, &st) < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not stat file \"%s\": %m", path)));
	if (!S_ISREG(st.st_mode))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is not a regular file", path)));
	if ((Size) st.st_size > MDD_MAX_OBJECT_SIZE)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("file \"%s\" is too large (%lld bytes)", path,
						(long long) st.st_size),
				 errdetail("The largest object mdd stores is %zu bytes.",
						   MDD_MAX_OBJECT_SIZE)));

	result = (bytea *) palloc(VARHDRSZ + st.st_size);
	while (done < (Size) st.st_size)
	{
		ssize_t		n = read(fd, VARDATA(result) + done, st.st_size - done);

		if (n < 0)
		{
			if (errno == EINTR)
				continue;
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not read file \"%s\": %m", path)));
		}
		if (n == 0)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("file \"%s\" shrank while being read", path)));
		done += n;
	}
	CloseTransientFile(fd);
	SET_VARSIZE(result, VARHDRSZ + done);
	return result;
}

/*
 * Flush a file or a directory to disk.
 */
void
mdd_fsync_path(const char *path, bool is_dir)
{
	int			fd = OpenTransientFile(path, (is_dir ? O_RDONLY : O_RDWR) | PG_BINARY);

	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open \"%s\" to flush it: %m", path)));
	if (pg_fsync(fd) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not fsync \"%s\": %m", path)));
	CloseTransientFile(fd);
}

/*
 * Create the directory path and any missing parents.  Each directory
 * created is appended to *created (when not NULL), so that the caller can
 * make the new entries durable.
 */
void
mdd_make_directories(const char *path, List **created)
{
	char	   *buf = pstrdup(path);
	char	   *p;

	for (p = buf + 1;; p++)
	{
		if (*p == '/' || *p == '\0')
		{
			char		saved = *p;

			*p = '\0';
			if (mkdir(buf, S_IRWXU | S_IRGRP | S_IXGRP) == 0)
			{
				if (created)
					*created = lappend(*created, pstrdup(buf));
			}
			else if (errno != EEXIST)
				ereport(ERROR,
						(errcode_for_file_access(),
						 errmsg("could not create directory \"%s\": %m", buf)));
			*p = saved;
			if (saved == '\0')
				break;
		}
	}
	pfree(buf);
}

/*
 * Write len bytes to path through a temporary file renamed over it: tmp,
 * or "path.tmp.PID" when tmp is NULL.  With durable, the file and its
 * directory are flushed before returning; without, the caller flushes them
 * later (see storage_file.c).
 */
void
mdd_write_file_atomically(const char *path, const char *tmp_path, const char *data,
						  Size len, bool durable)
{
	char	   *tmp = tmp_path ? pstrdup(tmp_path) : psprintf("%s.tmp.%d", path, MyProcPid);
	Size		done = 0;
	int			fd;

	fd = OpenTransientFile(tmp, O_WRONLY | O_CREAT | O_TRUNC | PG_BINARY);
	if (fd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create file \"%s\": %m", tmp)));
	while (done < len)
	{
		ssize_t		n = write(fd, data + done, len - done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
		{
			int			save_errno = errno ? errno : ENOSPC;

			CloseTransientFile(fd);
			unlink(tmp);
			errno = save_errno;
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not write file \"%s\": %m", tmp)));
		}
		done += n;
	}
	if (durable && pg_fsync(fd) != 0)
	{
		int			save_errno = errno;

		CloseTransientFile(fd);
		unlink(tmp);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not fsync file \"%s\": %m", tmp)));
	}
	if (CloseTransientFile(fd) != 0)
	{
		int			save_errno = errno;

		unlink(tmp);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not close file \"%s\": %m", tmp)));
	}
	if (rename(tmp, path) != 0)
	{
		int			save_errno = errno;

		unlink(tmp);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not rename \"%s\" to \"%s\": %m", tmp, path)));
	}
	if (durable)
	{
		char	   *dir = pstrdup(path);

		*strrchr(dir, '/') = '\0';
		mdd_fsync_path(dir[0] ? dir : "/", true);
		pfree(dir);
	}
	pfree(tmp);
}

/*
 * mdd._read_file(path text) RETURNS bytea
 *
 * The bytes of a file that the caller may read (mdd.allowed_paths).
 */
Datum
mdd_read_file_sql(PG_FUNCTION_ARGS)
{
	char	   *path;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("file path must not be NULL")));
	path = mdd_checked_path(text_to_cstring(PG_GETARG_TEXT_PP(0)), false);
	PG_RETURN_BYTEA_P(mdd_read_whole_file(path));
}

/*
 * mdd._write_file(path text, data bytea, overwrite boolean) RETURNS bigint
 *
 * Write data durably to a path the caller may write; returns the bytes
 * written.  An existing file is only replaced with overwrite.
 */
Datum
mdd_write_file_sql(PG_FUNCTION_ARGS)
{
	char	   *path;
	bytea	   *data;
	struct stat st;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("file path and data must not be NULL")));
	path = mdd_checked_path(text_to_cstring(PG_GETARG_TEXT_PP(0)), true);
	data = PG_GETARG_BYTEA_PP(1);

	if (stat(path, &st) == 0)
	{
		if (S_ISDIR(st.st_mode))
			ereport(ERROR,
					(errcode(ERRCODE_WRONG_OBJECT_TYPE),
					 errmsg("\"%s\" is a directory", path),
					 errhint("Give the path of the file to write.")));
		if (PG_ARGISNULL(2) || !PG_GETARG_BOOL(2))
			ereport(ERROR,
					(errcode(ERRCODE_DUPLICATE_FILE),
					 errmsg("file \"%s\" already exists", path),
					 errhint("Pass overwrite => true to replace it.")));
	}
	mdd_write_file_atomically(path, NULL, VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data), true);
	PG_RETURN_INT64((int64) VARSIZE_ANY_EXHDR(data));
}

static int
compare_strings(const ListCell *a, const ListCell *b)
{
	return strcmp((const char *) lfirst(a), (const char *) lfirst(b));
}

/* append the regular files below dir to *files, depth first, sorted */
static void
walk_directory(const char *dir, List **files)
{
	DIR		   *d = AllocateDir(dir);
	struct dirent *de;
	List	   *entries = NIL;
	ListCell   *lc;

	if (d == NULL)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open directory \"%s\": %m", dir)));
	while ((de = ReadDir(d, dir)) != NULL)
	{
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		entries = lappend(entries, psprintf("%s/%s", dir, de->d_name));
	}
	FreeDir(d);
	list_sort(entries, compare_strings);

	foreach(lc, entries)
	{
		char	   *path = (char *) lfirst(lc);
		struct stat st;

		CHECK_FOR_INTERRUPTS();
		if (lstat(path, &st) != 0)
			continue;			/* vanished meanwhile */
		if (S_ISDIR(st.st_mode))
			walk_directory(path, files);
		else if (S_ISREG(st.st_mode) || S_ISLNK(st.st_mode))
			*files = lappend(*files, path);
	}
}

/*
 * mdd._list_files(directory text) RETURNS SETOF text
 *
 * Every file below an allowed directory, recursively, in a stable order.
 * Symbolic links to files are listed (each is checked again when read);
 * symbolic links to directories are not followed.
 */
Datum
mdd_list_files_sql(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *dir = mdd_checked_directory(PG_ARGISNULL(0) ? NULL : PG_GETARG_TEXT_PP(0), false);
	List	   *files = NIL;
	ListCell   *lc;

	InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
	walk_directory(dir, &files);
	foreach(lc, files)
	{
		Datum		value = CStringGetTextDatum((char *) lfirst(lc));
		bool		isnull = false;

		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, &value, &isnull);
	}
	return (Datum) 0;
}
