/*-------------------------------------------------------------------------
 *
 * mdd.c
 *	  Entry point of the mdd extension: settings and subsystem start-up.
 *
 * _PG_init only registers: the mdd.* settings and the transaction
 * callbacks of the file storage.  Everything else happens when SQL calls
 * the extension's functions.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "fmgr.h"
#include "utils/guc.h"

#include "mdd.h"

PG_MODULE_MAGIC;

char	   *mdd_allowed_paths = NULL;
bool		mdd_superuser_any_path = true;
static char *mdd_default_storage = NULL;
static int	mdd_import_progress_every = 1000;

void		_PG_init(void);

void
_PG_init(void)
{
	DefineCustomStringVariable("mdd.allowed_paths",
							   "Directories under which mdd may read and write files.",
							   "A comma-separated list of absolute directories. "
							   "mdd.store_file, mdd.import and mdd.export refuse any path "
							   "outside them.",
							   &mdd_allowed_paths,
							   "",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomBoolVariable("mdd.superuser_any_path",
							 "Lets superusers use file paths outside mdd.allowed_paths.",
							 NULL,
							 &mdd_superuser_any_path,
							 true,
							 PGC_SUSET,
							 0,
							 NULL, NULL, NULL);

	DefineCustomStringVariable("mdd.default_storage",
							   "Storage that receives newly stored objects.",
							   "The name of a storage of mdd.storages.",
							   &mdd_default_storage,
							   "online",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("mdd.import_progress_every",
							"mdd.import reports progress after this many files.",
							NULL,
							&mdd_import_progress_every,
							1000,
							1, INT_MAX,
							PGC_USERSET,
							0,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("mdd");

	mdd_storage_file_init();
}
