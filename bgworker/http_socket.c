/*-------------------------------------------------------------------------
 *
 * http_socket.c
 *	  The HTTP listening socket, opened once by the postmaster.
 *
 * Like the DICOM port (listen_socket.c): every HTTP worker is forked from
 * the postmaster and inherits this non-blocking socket; each one's
 * libmicrohttpd waits on it, and whichever wins accepts a connection and
 * serves it to the end.  If the port cannot be bound the server still
 * starts; the log says why the HTTP service is off.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "http.h"
#include "workers.h"

int			mdd_http_listen_fd = -1;

void
mdd_open_http_socket(void)
{
	bool		tls;

	if (mdd_http_port == 0)
		return;					/* off by default: nothing to say */
	tls = mdd_http_tls_cert_file[0] != '\0' || mdd_http_tls_key_file[0] != '\0';
	if (tls && (mdd_http_tls_cert_file[0] == '\0' || mdd_http_tls_key_file[0] == '\0'))
	{
		ereport(LOG,
				(errmsg("mdd: HTTP service off: mdd.http_tls_cert_file and mdd.http_tls_key_file must be set together")));
		return;
	}
	mdd_http_listen_fd = mdd_open_tcp_port(mdd_http_listen_address, "mdd.http_listen_address",
										   mdd_http_port, "mdd.http_port", "HTTP service", 128);
	if (mdd_http_listen_fd >= 0)
		ereport(LOG,
				(errmsg("mdd: HTTP service listening on %s:%d (%s)",
						mdd_http_listen_address, mdd_http_port, tls ? "HTTPS" : "HTTP")));
}
