/*-------------------------------------------------------------------------
 *
 * http_internal.h
 *	  The HTTP core's own state of a request, shared by http_request.c
 *	  (the libmicrohttpd callbacks), http_reply.c (what handlers call) and
 *	  http_worker.c (the daemon).  Handlers use http.h only.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_HTTP_INTERNAL_H
#define MDD_HTTP_INTERNAL_H

#include <signal.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <microhttpd.h>

#include "lib/stringinfo.h"

#include "http.h"

typedef enum ReplyKind
{
	REPLY_NONE,
	REPLY_BUFFER,
	REPLY_FILE,
	REPLY_STREAM
} ReplyKind;

typedef struct ReplyHeader
{
	char	   *name;
	char	   *value;
} ReplyHeader;

/* a streamed reply; lives in its own memory context until MHD frees it */
typedef struct HttpStream
{
	MemoryContext mcxt;
	MddHttpStreamRead read;
	MddHttpStreamFree free;
	void	   *ctx;
	Oid			roleid;
	char	   *client;
	char	   *what;			/* "GET /x from client", for the log */
	bool		ended;
} HttpStream;

typedef struct HttpState
{
	MddHttpRequest req;			/* first: handlers get &state->req */
	struct MHD_Connection *conn;
	const MddHttpRoute *route;
	StringInfoData body;
	char	   *query;			/* the arguments again, for the audit trail */
	int			nargs;
	const char **arg_names;
	const char **arg_values;
	char	   *user;			/* the user name given, even when refused */
	char	   *note;			/* why refused or failed, for the audit trail */
	bool		answered;		/* a response was queued */

	/* the reply */
	ReplyKind	kind;
	int			status;
	char	   *content_type;
	char	   *data;
	size_t		len;
	int			fd;
	uint64		offset;
	int64		size;
	ReplyHeader *headers;
	int			nheaders;
	int			maxheaders;
	MemoryContext stream_mcxt;
	HttpStream *stream;
} HttpState;

/* http_worker.c */
extern int	mdd_http_worker_number;
extern volatile sig_atomic_t mdd_http_busy;	/* inside a request callback */

/* http_request.c: the callbacks given to MHD_start_daemon */
extern enum MHD_Result mdd_http_access(void *cls, struct MHD_Connection *conn, const char *url,
									   const char *method, const char *version,
									   const char *upload_data, size_t *upload_data_size,
									   void **con_cls);
extern void mdd_http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
							   enum MHD_RequestTerminationCode toe);

/* http_reply.c */
extern void mdd_http_drop_reply(HttpState *st);
extern void mdd_http_reply_from_error(HttpState *st, ErrorData *edata);
extern struct MHD_Response *mdd_http_make_response(HttpState *st);
extern void mdd_http_become(Oid roleid);
extern void mdd_http_unbecome(void);
extern const char *mdd_http_current_client;

#endif							/* MDD_HTTP_INTERNAL_H */
