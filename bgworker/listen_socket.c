/*-------------------------------------------------------------------------
 *
 * listen_socket.c
 *	  The DICOM listening socket, opened once by the postmaster.
 *
 * Every listener worker is forked from the postmaster and so inherits this
 * socket: all of them wait on it, and whichever is free accepts the next
 * association (pre-fork, like a web server).  The socket is non-blocking,
 * so a worker that loses the race for a connection just waits again.  If
 * the port cannot be bound the server still starts; the log says why the
 * DICOM service is off.  The TLS port (mdd.dicom_tls_port) is a second
 * socket of the same kind, served by the same workers.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include "workers.h"
#include "../extension/tls.h"

int			mdd_listen_fd = -1;
int			mdd_tls_listen_fd = -1;

/*
 * A non-blocking, close-on-exec listening socket on address:portnum, or -1
 * with the reason logged: what names the service ("DICOM service"), and
 * address_setting and port_setting the settings to correct.  address "*"
 * is every IPv4 address; one with ':' is IPv6; "localhost" means
 * 127.0.0.1.  Shared by the DICOM and the HTTP ports.
 */
int
mdd_open_tcp_port(const char *address, const char *address_setting, int portnum,
				  const char *port_setting, const char *what, int backlog)
{
	struct addrinfo hints,
			   *res = NULL,
			   *ai;
	char		port[16];
	int			rc;
	int			last_errno = 0;
	int			listen_fd = -1;

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = strchr(address, ':') ? AF_INET6 : AF_INET;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE;
	snprintf(port, sizeof(port), "%d", portnum);
	rc = getaddrinfo(strcmp(address, "*") == 0 ? NULL : address, port, &hints, &res);
	if (rc != 0)
	{
		ereport(LOG,
				(errmsg("mdd: %s off: cannot resolve %s \"%s\": %s",
						what, address_setting, address, gai_strerror(rc))));
		return -1;
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
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, backlog) == 0 &&
			fcntl(fd, F_SETFL, O_NONBLOCK) == 0 &&
			fcntl(fd, F_SETFD, FD_CLOEXEC) == 0)
		{
			listen_fd = fd;
			break;
		}
		last_errno = errno;
		close(fd);
	}
	freeaddrinfo(res);

	if (listen_fd < 0)
	{
		errno = last_errno;
		ereport(LOG,
				(errmsg("mdd: %s off: cannot listen on %s:%d: %m", what, address, portnum),
				 errhint("Free the port or set %s to another one, then restart the server.",
						 port_setting)));
	}
	return listen_fd;
}

/* a DICOM port on mdd.dicom_listen_address, or -1 */
static int
open_port(int portnum, const char *what, const char *setting)
{
	return mdd_open_tcp_port(mdd_dicom_listen_address, "mdd.dicom_listen_address", portnum,
							 setting, what, 64);
}

/*
 * The TLS port (mdd.dicom_tls_port), when its settings make a usable TLS
 * layer; the same listener workers serve it.
 */
static void
open_tls_port(void)
{
	const MddTlsSettings *tls = mdd_tls_settings();
	char		errbuf[512];

	if (mdd_dicom_tls_port == 0)
		return;
	if (mdd_dicom_tls_port == mdd_dicom_port)
	{
		ereport(LOG,
				(errmsg("mdd: DICOM TLS service off: mdd.dicom_tls_port is the plain DICOM port %d",
						mdd_dicom_port),
				 errhint("Give the TLS service a port of its own, then restart the server.")));
		return;
	}
	if (mdd_dicom_tls_check(tls, 1, errbuf, sizeof(errbuf)) != MDD_DICOM_OK)
	{
		ereport(LOG,
				(errmsg("mdd: DICOM TLS service off: %s", errbuf),
				 errhint("Correct the mdd.dicom_tls_* settings, then restart the server. Plain DICOM is not affected.")));
		return;
	}
	mdd_tls_listen_fd = open_port(mdd_dicom_tls_port, "DICOM TLS service", "mdd.dicom_tls_port");
	if (mdd_tls_listen_fd >= 0)
		ereport(LOG,
				(errmsg("mdd: DICOM TLS service listening on %s:%d as AE title \"%s\" (profile %s, client certificates %s)",
						mdd_dicom_listen_address, mdd_dicom_tls_port, mdd_ae_title, tls->profile,
						tls->require_client_certificate ? "required" : "optional")));
}

void
mdd_open_listen_socket(void)
{
	open_tls_port();
	if (mdd_dicom_port == 0)
	{
		ereport(LOG, (errmsg("mdd: DICOM service off (mdd.dicom_port = 0)")));
		return;
	}
	mdd_listen_fd = open_port(mdd_dicom_port, "DICOM service", "mdd.dicom_port");
	if (mdd_listen_fd >= 0)
		ereport(LOG,
				(errmsg("mdd: DICOM service listening on %s:%d as AE title \"%s\"",
						mdd_dicom_listen_address, mdd_dicom_port, mdd_ae_title)));
}
