/*-------------------------------------------------------------------------
 *
 * http.h
 *	  The HTTP service of mdd: what a route handler sees of a request and
 *	  how it answers.  See /work/coord/http-interface.md and the section
 *	  "HTTP service" of docs/design.md.
 *
 * A handler runs in the HTTP worker, in a transaction of its own with SPI
 * connected, as the authenticated role (current_user and mdd._caller()
 * are that role).  It reads the request, answers with one of the
 * mdd_http_reply* functions, and may raise any ERROR: the transaction is
 * then rolled back, whatever reply it made is dropped, and the client gets
 * a JSON error whose HTTP status follows the SQLSTATE (or req->error_status
 * when the handler set it before raising).
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_HTTP_H
#define MDD_HTTP_H

#include "postgres.h"

#include "utils/memutils.h"

/* settings (extension/mdd.c) */
extern int	mdd_http_port;
extern char *mdd_http_listen_address;
extern int	mdd_http_workers;
extern int	mdd_http_max_body;
extern char *mdd_http_tls_cert_file;
extern char *mdd_http_tls_key_file;

/* http_socket.c: the HTTP port, opened by the postmaster */
extern int	mdd_http_listen_fd;
extern void mdd_open_http_socket(void);

/* http_worker.c */
PGDLLEXPORT void mdd_http_main(Datum arg);

typedef struct MddHttpRequest MddHttpRequest;

/* reads the next piece of a streamed reply, see mdd_http_reply_stream */
typedef size_t (*MddHttpStreamRead) (void *ctx, uint64 pos, char *buf, size_t max, bool *end);
typedef void (*MddHttpStreamFree) (void *ctx);

typedef void (*MddHttpHandler) (MddHttpRequest *req);

struct MddHttpRequest
{
	/* the request; all strings NUL-terminated, valid until the reply is sent */
	const char *method;			/* "GET", "HEAD", "POST", ... */
	const char *path;			/* percent-decoded path, "/api/patients" */
	const char *subpath;		/* the part of path after the route's prefix */
	const char *body;			/* the request body (NUL-terminated), or "" */
	size_t		body_len;
	const char *role;			/* the authenticated role */
	Oid			roleid;
	const char *client;			/* "address:port" of the client */
	bool		tls;			/* came over HTTPS */
	MemoryContext mcxt;			/* lives as long as the request */

	/* set by a handler before it raises: the HTTP status of that error */
	int			error_status;

	/* the core's own state */
	void	   *internal;
};

/* the request's headers and query-string arguments (first value, or NULL) */
extern const char *mdd_http_header(MddHttpRequest *req, const char *name);
extern const char *mdd_http_arg(MddHttpRequest *req, const char *name);
/* every query argument in order (repeated names repeated): their count */
extern int	mdd_http_args(MddHttpRequest *req, const char ***names, const char ***values);
/* "http://host:port" or "https://..." as the client addressed the server */
extern char *mdd_http_base_url(MddHttpRequest *req);

/* ERROR 42501 (HTTP 403) unless the role is a member of this role */
extern void mdd_http_require_role(MddHttpRequest *req, const char *rolename);

/* the answer: data copied; a later call replaces an earlier one */
extern void mdd_http_reply(MddHttpRequest *req, int status, const char *content_type,
						   const void *data, size_t len);
extern void mdd_http_reply_json(MddHttpRequest *req, int status, const char *json);
/* a JSON error {"error": message, "sqlstate": sqlstate} without raising */
extern void mdd_http_reply_error(MddHttpRequest *req, int status, const char *sqlstate,
								 const char *fmt,...) pg_attribute_printf(4, 5);
/* the bytes of an open file, size bytes from offset; the core closes fd */
extern void mdd_http_reply_file(MddHttpRequest *req, int status, const char *content_type,
								int fd, uint64 offset, uint64 size);

/*
 * A reply made piece by piece after the handler returned: read(ctx, pos,
 * buf, max, &end) is called in a transaction of its own as the request's
 * role (SPI connected) to fill buf with up to max bytes from position pos;
 * it returns how many it wrote and sets *end after the last.  size is the
 * body's length, or -1 when unknown (chunked).  ctx, and what it points to,
 * must be allocated in mdd_http_stream_memory(req); free(ctx) (may be NULL)
 * is called once the reply is done or abandoned, outside any transaction;
 * then that memory goes.  An ERROR in read ends the connection (logged).
 */
extern MemoryContext mdd_http_stream_memory(MddHttpRequest *req);
extern void mdd_http_reply_stream(MddHttpRequest *req, int status, const char *content_type,
								  int64 size, MddHttpStreamRead read, MddHttpStreamFree free,
								  void *ctx);

/* add a header to the reply (after mdd_http_reply*; replies keep them) */
extern void mdd_http_add_header(MddHttpRequest *req, const char *name, const char *value);

/* the HTTP status of an error with this SQLSTATE */
extern int	mdd_http_status_for_sqlstate(int sqlerrcode);

/* a JSON string literal of s (quotes and escapes) */
extern char *mdd_http_json_string(const char *s);

/* routes (http_routes.c) */
typedef struct MddHttpRoute
{
	const char *prefix;			/* "/web/": the path is it, or starts with it */
	bool		exact;			/* only the path prefix itself */
	const char *methods;		/* "GET, HEAD, POST": others get 405 */
	const char *role;			/* the caller must be a member: "mdd_reader" */
	MddHttpHandler handler;
} MddHttpRoute;

extern const MddHttpRoute mdd_http_routes[];
extern const int mdd_http_route_count;

/* the handlers of the core */
extern void mdd_http_static(MddHttpRequest *req);	/* http_static.c */
extern void mdd_http_api(MddHttpRequest *req);	/* http_api.c */

/* http_auth.c: check user and password; NULL when they are good */
extern char *mdd_http_check_password(const char *user, const char *password, Oid *roleid);

#endif							/* MDD_HTTP_H */
