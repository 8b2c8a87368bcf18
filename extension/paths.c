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

#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "utils/builtins.h"
#include "utils/varlena.h"

#include "mdd.h"

PG_FUNCTION_INFO_V1(mdd_check_path_sql);

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

/*
 * Return the resolved form of path after checking that the calling role may
 * use it.  The caller is the role outside any SECURITY DEFINER function, so
 * that mdd's own functions cannot be used to reach files their caller could
 * not name.
 */
char *
mdd_checked_path(const char *path, bool for_write)
{
	char	   *resolved;
	char	   *roots;
	List	   *rootlist = NIL;
	ListCell   *lc;

	if (path == NULL || path[0] != '/')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("file path \"%s\" is not absolute", path ? path : ""),
				 errhint("Give an absolute path under one of mdd.allowed_paths.")));

	resolved = resolve(path, for_write);

	if (mdd_superuser_any_path && superuser_arg(GetOuterUserId()))
		return resolved;

	roots = pstrdup(mdd_allowed_paths ? mdd_allowed_paths : "");
	if (!SplitDirectoriesString(roots, ',', &rootlist))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid list syntax in setting \"mdd.allowed_paths\"")));

	foreach(lc, rootlist)
	{
		char	   *root = (char *) lfirst(lc);
		char		rootres[PATH_MAX];

		if (root[0] != '/' || realpath(root, rootres) == NULL)
			continue;
		if (path_is_under(resolved, rootres))
			return resolved;
	}

	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("file path \"%s\" is outside the allowed directories", path),
			 errdetail("It resolves to \"%s\".", resolved),
			 errhint("An administrator can add its directory to mdd.allowed_paths.")));
	return NULL;				/* keep compiler quiet */
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
