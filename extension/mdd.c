/*-------------------------------------------------------------------------
 *
 * mdd.c
 *	  Entry point of the mdd extension: settings and subsystem start-up.
 *
 * _PG_init only registers: the mdd.* settings, the transaction callbacks
 * (file storage, counts, runner wake-up), and when preloaded the shared
 * memory of the worker wake-up and the rule bandwidth cap, and the
 * launcher.  Everything else happens
 * when SQL calls the extension's functions or in the workers.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

#include "mdd.h"
#include "../bgworker/http.h"
#include "tls.h"
#include "../bgworker/dicomweb.h"
#include "../bgworker/workers.h"

PG_MODULE_MAGIC;

char	   *mdd_allowed_paths = NULL;
bool		mdd_superuser_any_path = true;
static char *mdd_default_storage = NULL;

char	   *mdd_database = NULL;
char	   *mdd_ae_title = NULL;
int			mdd_dicom_port = 11112;
char	   *mdd_dicom_listen_address = NULL;
int			mdd_dicom_workers = 4;
bool		mdd_accept_unknown_nodes = false;
int			mdd_dicom_max_pdu = 65536;
int			mdd_dicom_acse_timeout = 30;
int			mdd_dicom_dimse_timeout = 60;
int			mdd_job_workers = 2;
int			mdd_find_timeout = 10000;
bool		mdd_forward_keep = true;
int			mdd_http_port = 0;
char	   *mdd_http_listen_address = NULL;
int			mdd_http_workers = 2;
int			mdd_http_max_body = 102400;
char	   *mdd_http_tls_cert_file = NULL;
char	   *mdd_http_tls_key_file = NULL;
static char *mdd_archive_storage = NULL;
static int	mdd_import_progress_every = 1000;

void		_PG_init(void);

/* the settings of the background workers and the DICOM service */
static void
define_network_settings(void)
{
	DefineCustomStringVariable("mdd.database",
							   "Database where the mdd extension lives and its workers connect.",
							   NULL, &mdd_database, "postgres",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("mdd.ae_title",
							   "DICOM AE title of this archive.",
							   NULL, &mdd_ae_title, "MDD",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mdd.dicom_port",
							"TCP port of the DICOM service; 0 turns it off.",
							NULL, &mdd_dicom_port, 11112, 0, 65535,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("mdd.dicom_listen_address",
							   "Address the DICOM service listens on (\"*\" for all IPv4 addresses).",
							   NULL, &mdd_dicom_listen_address, "localhost",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mdd.dicom_workers",
							"DICOM listener processes, that is, associations served at once.",
							NULL, &mdd_dicom_workers, 4, 1, 64,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("mdd.accept_unknown_nodes",
							 "Accept associations from AE titles that are not in mdd.nodes.",
							 NULL, &mdd_accept_unknown_nodes, false,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mdd.dicom_max_pdu",
							"Largest PDU the DICOM service receives, in bytes.",
							NULL, &mdd_dicom_max_pdu, 65536, 4096, 131072,
							PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mdd.dicom_acse_timeout",
							"Seconds allowed for DICOM association negotiation.",
							NULL, &mdd_dicom_acse_timeout, 30, 1, 3600,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("mdd.dicom_dimse_timeout",
							"Seconds a DICOM peer may stay silent within an association.",
							NULL, &mdd_dicom_dimse_timeout, 60, 1, 86400,
							PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
	DefineCustomIntVariable("mdd.find_timeout",
							"Time a node may take to answer mdd.find, unless its node option find_timeout says otherwise.",
							NULL, &mdd_find_timeout, 10000, 1, 86400000,
							PGC_USERSET, GUC_UNIT_MS, NULL, NULL, NULL);
	DefineCustomBoolVariable("mdd.forward_keep",
							 "Keep in the archive the objects fetched from span nodes to forward a C-MOVE or C-GET; off removes them once passed on.",
							 NULL, &mdd_forward_keep, true,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);
}

/* the settings of the HTTP service (bgworker/http_*.c) */
static void
define_http_settings(void)
{
	DefineCustomIntVariable("mdd.http_port",
							"TCP port of the HTTP service (web viewer, JSON API, DICOMweb); 0 turns it off.",
							NULL, &mdd_http_port, 0, 0, 65535,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("mdd.http_listen_address",
							   "Address the HTTP service listens on (\"*\" for all IPv4 addresses).",
							   NULL, &mdd_http_listen_address, "localhost",
							   PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mdd.http_workers",
							"HTTP worker processes sharing the HTTP port.",
							NULL, &mdd_http_workers, 2, 1, 64,
							PGC_POSTMASTER, 0, NULL, NULL, NULL);
	DefineCustomIntVariable("mdd.http_max_body",
							"Largest request body the HTTP service accepts.",
							NULL, &mdd_http_max_body, 102400, 1, (int) (MaxAllocSize / 1024) - 1,
							PGC_SIGHUP, GUC_UNIT_KB, NULL, NULL, NULL);
	DefineCustomStringVariable("mdd.http_tls_cert_file",
							   "PEM certificate (chain) of the HTTP service; with mdd.http_tls_key_file it serves HTTPS only.",
							   NULL, &mdd_http_tls_cert_file, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);
	DefineCustomStringVariable("mdd.http_tls_key_file",
							   "PEM private key of the HTTP service's certificate.",
							   NULL, &mdd_http_tls_key_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);
}

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

	DefineCustomIntVariable("mdd.job_workers",
							"Number of job runner processes (archive, restore ...).",
							NULL,
							&mdd_job_workers,
							2,
							0, MDD_MAX_RUNNERS,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);

	DefineCustomStringVariable("mdd.archive_storage",
							   "Storage that mdd.archive uses when none is named.",
							   "The name of an archive-tier storage; empty: the only one there is.",
							   &mdd_archive_storage,
							   "",
							   PGC_SUSET,
							   0,
							   NULL, NULL, NULL);

	DefineCustomRealVariable("mdd.rule_bandwidth",
							 "Cap on the bandwidth of work that archive rules start, in MB/s; 0: no cap.",
							 "Shared by every job runner; jobs that users queue themselves are not held back.",
							 &mdd_rule_bandwidth,
							 0, 0, 1000000,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);

	define_network_settings();
	define_http_settings();
	mdd_define_tls_settings();
	mdd_dicomweb_define_settings();
	MarkGUCPrefixReserved("mdd");

	mdd_storage_file_init();
	mdd_tally_init();
	mdd_job_wake_init(process_shared_preload_libraries_in_progress && !IsUnderPostmaster);
	if (process_shared_preload_libraries_in_progress && !IsUnderPostmaster)
		mdd_throttle_init();

	/*
	 * The workers run only when mdd is preloaded; then the postmaster also
	 * opens the DICOM port, which every listener inherits.
	 */
	if (process_shared_preload_libraries_in_progress && !IsUnderPostmaster)
	{
		mdd_open_listen_socket();
		mdd_open_http_socket();
		mdd_register_launcher();
	}
}
