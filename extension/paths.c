/*-------------------------------------------------------------------------
 *
 * paths.c
 *	  Keeps file paths given to mdd inside the directories an administrator
 *	  allowed (mdd.allowed_paths).
 *
 * A path is resolved with realpath() first, so "..", symbolic links and
 * repeated slashes cannot lead outside an allowed directory.  For a file
 * about to be written, which does not exist yet, its directory is
 * resolved instead.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "utils/builtins.h"
#include "utils/varlena.h"

#include "mdd.h"

PG_FUNCTION_INFO_V1(mdd_check_path_sql);
PG_FUNCTION_INFO_V1(mdd_check_directory_sql);

/* true when path equals root or lies below it (both already resolved) */
static bool
path_is_under(const char *path, const char *root)
{
	size_t		rootlen = strlen(root);

	if (rootlen > 1 && root[rootlen - 1] == '/')
		rootlen--;
	if (strncmp(path, root, rootlen) != 0)
		return false;
	return path[rootlen] == '\0' || path[rootlen] == '/' ||
		(rootlen == 1 && root[0] == '/');
}

/* resolve path, or for a file to be written the directory that will hold it */
static char *
resolve(const char *path, bool for_write)
{
	char		resolved[PATH_MAX];

	if (realpath(path, resolved) != NULL)
		return pstrdup(resolved);

	if (for_write && errno == ENOENT)
	{
		char	   *dir = pstrdup(path);
		char	   *slash = strrchr(dir, '/');
		const char *base = slash + 1;

		*slash = '\0';
		if (*base == '\0' || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid file path \"%s\"", path),
					 errdetail("The path must name a file.")));
		if (realpath(dir[0] ? dir : "/", resolved) == NULL)
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not resolve directory of \"%s\": %m", path)));
		return psprintf("%s/%s", strcmp(resolved, "/") == 0 ? "" : resolved, base);
	}
	ereport(ERROR,
			(errcode_for_file_access(),
			 errmsg("could not access file \"%s\": %m", path)));
	return NULL;				/* keep compiler quiet */
}

/* the directories of mdd.allowed_paths, each as written and as resolved */
static List *
allowed_roots(void)
{
	char	   *raw = pstrdup(mdd_allowed_paths ? mdd_allowed_paths : "");
	List	   *rootlist = NIL;
	List	   *roots = NIL;
	ListCell   *lc;

	if (!SplitDirectoriesString(raw, ',', &rootlist))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid list syntax in setting \"mdd.allowed_paths\"")));
	foreach(lc, rootlist)
	{
		char	   *root = (char *) lfirst(lc);
		char		rootres[PATH_MAX];

		if (root[0] != '/' || realpath(root, rootres) == NULL)
			continue;
		roots = lappend(roots, root);
		roots = lappend(roots, pstrdup(rootres));
	}
	return roots;
}

static bool
under_any(const char *path, List *roots)
{
	ListCell   *lc;

	foreach(lc, roots)
		if (path_is_under(path, (const char *) lfirst(lc)))
			return true;
	return false;
}

static void
refuse_path(const char *path)
{
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("file path \"%s\" is outside the allowed directories", path),
			 errhint("An administrator can add its directory to mdd.allowed_paths.")));
}

/*
 * Return the resolved form of path after checking that the calling role may
 * use it.  The caller is the role outside any SECURITY DEFINER function, so
 * that mdd's own functions cannot be used to reach files their caller could
 * not name.  A path is checked as written before it is resolved, so that
 * nobody learns from the error whether a file outside the allowed
 * directories exists; then it is checked again once resolved, so that no
 * symbolic link leads out.
 */
char *
mdd_checked_path(const char *path, bool for_write)
{
	bool		unrestricted;
	List	   *roots = NIL;
	char	   *resolved;

	if (path == NULL || path[0] != '/')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file path \"%s\" is not absolute", path ? path : ""),
				 errhint("Give an absolute path under one of mdd.allowed_paths.")));

	unrestricted = mdd_superuser_any_path && superuser_arg(GetOuterUserId());
	if (!unrestricted)
	{
		char	   *lexical = pstrdup(path);

		canonicalize_path(lexical);
		roots = allowed_roots();
		if (!under_any(lexical, roots))
			refuse_path(path);
	}

	resolved = resolve(path, for_write);
	if (!unrestricted && !under_any(resolved, roots))
		refuse_path(path);
	return resolved;
}

/*
 * mdd._check_path(path text, for_write boolean) RETURNS text
 *
 * SQL face of mdd_checked_path, for the PL/pgSQL parts of the extension.
 */
Datum
mdd_check_path_sql(PG_FUNCTION_ARGS)
{
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("file path must not be NULL")));
	PG_RETURN_TEXT_P(cstring_to_text(mdd_checked_path(text_to_cstring(PG_GETARG_TEXT_PP(0)),
													  PG_GETARG_BOOL(1))));
}

/*
 * The resolved form of an allowed directory (path may be NULL: an error),
 * refusing what is not a directory and, with writable, what the server
 * cannot write into.
 */
char *
mdd_checked_directory(text *path, bool writable)
{
	char	   *dir;
	struct stat st;

	if (path == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("directory must not be NULL")));
	dir = mdd_checked_path(text_to_cstring(path), false);
	if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("\"%s\" is not a directory", dir)));
	if (writable && access(dir, W_OK | X_OK) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("the server cannot write into directory \"%s\"", dir),
				 errhint("Make it writable by the operating system user that runs PostgreSQL.")));
	return dir;
}

/*
 * mdd._check_directory(path text, writable boolean) RETURNS text
 */
Datum
mdd_check_directory_sql(PG_FUNCTION_ARGS)
{
	PG_RETURN_TEXT_P(cstring_to_text(mdd_checked_directory(PG_ARGISNULL(0) ? NULL : PG_GETARG_TEXT_PP(0),
														   PG_GETARG_BOOL(1))));
}
