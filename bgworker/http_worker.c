/*-------------------------------------------------------------------------
 *
 * http_worker.c
 *	  An HTTP worker: libmicrohttpd without threads of its own, driven from
 *	  the worker's latch loop.
 *
 * libmicrohttpd runs in epoll mode with no internal thread: its epoll
 * descriptor (which holds the shared listening socket and every
 * connection of this worker) is waited on with the latch in one
 * WaitEventSet, and MHD_run serves whatever is ready, calling the request
 * callbacks (http_request.c) in this process's only thread.  So the
 * handlers may use the database like any backend code, and SIGTERM (which
 * sets the latch) stops the worker at the next turn of the loop, or at the
 * next interrupt check of a handler's query; connections in flight are cut.  mdd.http_workers such workers share the port.
 *
 * SIGHUP reloads the settings; when the TLS certificate or key (their
 * file names or their contents) changed, the worker exits so that the
 * launcher starts it again with the new ones.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "libpq/pqsignal.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "utils/memutils.h"
#include "utils/wait_event.h"

#include "http_internal.h"
#include "workers.h"

int			mdd_http_worker_number = 0;
volatile sig_atomic_t mdd_http_busy = false;

static char *tls_cert = NULL;	/* PEM texts in use, or NULL */
static char *tls_key = NULL;

/*
 * SIGTERM: as in every mdd worker, a flag and the latch; but when it comes
 * while a request is being served (a long query of a handler), that
 * request is ended like a backend's (FATAL at the next interrupt check),
 * so that the worker stops at once in every case.
 */
static void
http_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	mdd_got_sigterm = true;
	if (mdd_http_busy)
	{
		ProcDiePending = true;
		InterruptPending = true;
	}
	SetLatch(MyLatch);
	errno = save_errno;
}

/* libmicrohttpd's own complaints, into the server log */
static void
log_mhd_message(void *cls, const char *fmt, va_list ap)
{
	char		buf[512];

	vsnprintf(buf, sizeof(buf), fmt, ap);
	buf[strcspn(buf, "\n")] = '\0';
	ereport(LOG, (errmsg("mdd http %d: %s", mdd_http_worker_number, buf)));
}

static void
mhd_panic(void *cls, const char *file, unsigned int line, const char *reason)
{
	ereport(FATAL,
			(errmsg("mdd http %d: libmicrohttpd failed at %s:%u: %s", mdd_http_worker_number,
					file ? file : "?", line, reason ? reason : "")));
}

/* the text of a PEM file, or NULL (logged) */
static char *
read_pem(const char *setting, const char *path)
{
	int			fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	char	   *text;
	ssize_t		got = 0;

	if (fd < 0 || fstat(fd, &st) != 0 || st.st_size > 1024 * 1024)
	{
		ereport(LOG,
				(errcode_for_file_access(),
				 errmsg("mdd http %d: cannot read %s \"%s\": %m", mdd_http_worker_number, setting, path)));
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	text = MemoryContextAllocZero(TopMemoryContext, st.st_size + 1);
	while (got < st.st_size)
	{
		ssize_t		n = read(fd, text + got, st.st_size - got);

		if (n <= 0)
			break;
		got += n;
	}
	close(fd);
	text[got] = '\0';
	return text;
}

static bool
tls_changed(void)
{
	char	   *cert = NULL,
			   *key = NULL;
	bool		changed;

	if (mdd_http_tls_cert_file[0] != '\0')
		cert = read_pem("mdd.http_tls_cert_file", mdd_http_tls_cert_file);
	if (mdd_http_tls_key_file[0] != '\0')
		key = read_pem("mdd.http_tls_key_file", mdd_http_tls_key_file);
	changed = (cert == NULL) != (tls_cert == NULL) || (key == NULL) != (tls_key == NULL) ||
		(cert && strcmp(cert, tls_cert) != 0) || (key && strcmp(key, tls_key) != 0);
	if (cert)
	{
		explicit_bzero(cert, strlen(cert));
		pfree(cert);
	}
	if (key)
	{
		explicit_bzero(key, strlen(key));
		pfree(key);
	}
	return changed;
}

static struct MHD_Daemon *
start_daemon(void)
{
	unsigned int flags = MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
	struct MHD_OptionItem options[12];
	int			n = 0;
	struct MHD_Daemon *daemon;

	/* the logger first, so that what the other options say goes to the log */
	options[n++] = (struct MHD_OptionItem) {MHD_OPTION_EXTERNAL_LOGGER, (intptr_t) log_mhd_message, NULL};
	if (mdd_http_tls_cert_file[0] != '\0' && mdd_http_tls_key_file[0] != '\0')
	{
		tls_cert = read_pem("mdd.http_tls_cert_file", mdd_http_tls_cert_file);
		tls_key = read_pem("mdd.http_tls_key_file", mdd_http_tls_key_file);
		if (tls_cert == NULL || tls_key == NULL)
			return NULL;
		flags |= MHD_USE_TLS;
		options[n++] = (struct MHD_OptionItem) {MHD_OPTION_HTTPS_MEM_CERT, 0, tls_cert};
		options[n++] = (struct MHD_OptionItem) {MHD_OPTION_HTTPS_MEM_KEY, 0, tls_key};
	}
	options[n++] = (struct MHD_OptionItem) {MHD_OPTION_LISTEN_SOCKET, mdd_http_listen_fd, NULL};
	options[n++] = (struct MHD_OptionItem) {MHD_OPTION_CONNECTION_TIMEOUT, 60, NULL};
	options[n++] = (struct MHD_OptionItem) {MHD_OPTION_CONNECTION_LIMIT, 256, NULL};
	options[n++] = (struct MHD_OptionItem) {MHD_OPTION_NOTIFY_COMPLETED, (intptr_t) mdd_http_completed, NULL};
	options[n++] = (struct MHD_OptionItem) {MHD_OPTION_END, 0, NULL};

	daemon = MHD_start_daemon(flags, 0, NULL, NULL, mdd_http_access, NULL,
							  MHD_OPTION_ARRAY, options, MHD_OPTION_END);
	if (daemon == NULL)
		ereport(LOG,
				(errmsg("mdd http %d: could not start the HTTP service%s", mdd_http_worker_number,
						tls_cert ? " (are the TLS certificate and key valid PEM and do they match?)" : "")));
	return daemon;
}

void
mdd_http_main(Datum arg)
{
	struct MHD_Daemon *daemon;
	const union MHD_DaemonInfo *info;
	WaitEventSet *wes;

	mdd_http_worker_number = DatumGetInt32(arg);
	mdd_worker_setup_signals();
	pqsignal(SIGTERM, http_sigterm);
	BackgroundWorkerInitializeConnection(mdd_database, NULL, 0);
	pgstat_report_appname(psprintf("mdd http %d", mdd_http_worker_number));
	if (mdd_http_listen_fd < 0)
	{
		ereport(LOG, (errmsg("mdd http %d: no listening socket, exiting", mdd_http_worker_number)));
		proc_exit(0);
	}
	MHD_set_panic_func(mhd_panic, NULL);
	daemon = start_daemon();
	if (daemon == NULL)
		proc_exit(1);
	info = MHD_get_daemon_info(daemon, MHD_DAEMON_INFO_EPOLL_FD);
	if (info == NULL || info->epoll_fd < 0)
	{
		ereport(LOG, (errmsg("mdd http %d: libmicrohttpd has no epoll descriptor", mdd_http_worker_number)));
		proc_exit(1);
	}

	wes = CreateWaitEventSet(TopMemoryContext, 3);
	AddWaitEventToSet(wes, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wes, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	AddWaitEventToSet(wes, WL_SOCKET_READABLE, info->epoll_fd, NULL, NULL);
	pgstat_report_activity(STATE_IDLE, NULL);

	while (!mdd_got_sigterm)
	{
		WaitEvent	event;
		MHD_UNSIGNED_LONG_LONG mhd_timeout;
		long		timeout = 60000;

		if (MHD_get_timeout(daemon, &mhd_timeout) == MHD_YES)
			timeout = (long) Min(mhd_timeout, (MHD_UNSIGNED_LONG_LONG) 60000);
		(void) WaitEventSetWait(wes, timeout, &event, 1, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		if (mdd_got_sigterm)
			break;
		if (mdd_got_sighup)
		{
			mdd_worker_reload_if_asked();
			if (tls_changed())
			{
				ereport(LOG,
						(errmsg("mdd http %d: TLS certificate or key changed, restarting",
								mdd_http_worker_number)));
				break;
			}
		}
		(void) MHD_run(daemon);
	}
	MHD_stop_daemon(daemon);
	proc_exit(0);
}
