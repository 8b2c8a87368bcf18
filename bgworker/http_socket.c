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

#include <fcntl.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include "http.h"

int			mdd_http_listen_fd = -1;

void
mdd_open_http_socket(void)
{
	struct addrinfo hints,
			   *res = NULL,
			   *ai;
	char		port[16];
	int			rc;
	int			last_errno = 0;
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
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = strchr(mdd_http_listen_address, ':') ? AF_INET6 : AF_INET;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE;
	snprintf(port, sizeof(port), "%d", mdd_http_port);
	rc = getaddrinfo(strcmp(mdd_http_listen_address, "*") == 0 ? NULL : mdd_http_listen_address,
					 port, &hints, &res);
	if (rc != 0)
	{
		ereport(LOG,
				(errmsg("mdd: HTTP service off: cannot resolve mdd.http_listen_address \"%s\": %s",
						mdd_http_listen_address, gai_strerror(rc))));
		return;
	}
	for (ai = res; ai != NULL; ai = ai->ai_next)
	{
		int			fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
		int			one = 1;

		if (fd < 0)
		{
			last_errno = errno;
			continue;
		}
		(void) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0 &&
			fcntl(fd, F_SETFL, O_NONBLOCK) == 0 &&
			fcntl(fd, F_SETFD, FD_CLOEXEC) == 0)
		{
			mdd_http_listen_fd = fd;
			break;
		}
		last_errno = errno;
		close(fd);
	}
	freeaddrinfo(res);

	if (mdd_http_listen_fd < 0)
	{
		errno = last_errno;
		ereport(LOG,
				(errmsg("mdd: HTTP service off: cannot listen on %s:%d: %m",
						mdd_http_listen_address, mdd_http_port),
				 errhint("Free the port or set mdd.http_port to another one, then restart the server.")));
	}
	else
		ereport(LOG,
				(errmsg("mdd: HTTP service listening on %s:%d (%s)",
						mdd_http_listen_address, mdd_http_port, tls ? "HTTPS" : "HTTP")));
}
