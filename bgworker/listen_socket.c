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
 * DICOM service is off.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include "workers.h"

int			mdd_listen_fd = -1;

void
mdd_open_listen_socket(void)
{
	struct addrinfo hints,
			   *res = NULL,
			   *ai;
	char		port[16];
	int			rc;
	int			last_errno = 0;

	if (mdd_dicom_port == 0)
	{
		ereport(LOG, (errmsg("mdd: DICOM service off (mdd.dicom_port = 0)")));
		return;
	}
	memset(&hints, 0, sizeof(hints));
	/* IPv4 unless an IPv6 address is given: "localhost" means 127.0.0.1 */
	hints.ai_family = strchr(mdd_dicom_listen_address, ':') ? AF_INET6 : AF_INET;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE;
	snprintf(port, sizeof(port), "%d", mdd_dicom_port);
	rc = getaddrinfo(strcmp(mdd_dicom_listen_address, "*") == 0 ? NULL : mdd_dicom_listen_address,
					 port, &hints, &res);
	if (rc != 0)
	{
		ereport(LOG,
				(errmsg("mdd: DICOM service off: cannot resolve mdd.dicom_listen_address \"%s\": %s",
						mdd_dicom_listen_address, gai_strerror(rc))));
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
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0 &&
			fcntl(fd, F_SETFL, O_NONBLOCK) == 0 &&
			fcntl(fd, F_SETFD, FD_CLOEXEC) == 0)
		{
			mdd_listen_fd = fd;
			break;
		}
		last_errno = errno;
		close(fd);
	}
	freeaddrinfo(res);

	if (mdd_listen_fd < 0)
	{
		errno = last_errno;
		ereport(LOG,
				(errmsg("mdd: DICOM service off: cannot listen on %s:%d: %m",
						mdd_dicom_listen_address, mdd_dicom_port),
				 errhint("Free the port or set mdd.dicom_port to another one, then restart the server.")));
	}
	else
		ereport(LOG,
				(errmsg("mdd: DICOM service listening on %s:%d as AE title \"%s\"",
						mdd_dicom_listen_address, mdd_dicom_port, mdd_ae_title)));
}
