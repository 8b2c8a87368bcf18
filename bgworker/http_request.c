/*-------------------------------------------------------------------------
 *
 * http_request.c
 *	  One HTTP request from libmicrohttpd's first call to its last: the
 *	  client's credentials, the route, the body, the handler in a
 *	  transaction as the authenticated role, the audit row, the response.
 *
 * libmicrohttpd calls mdd_http_access several times per request: first
 * with the headers, then with pieces of the body, then once more when the
 * body is complete.  The first call authenticates the client, finds the
 * route and checks role, method and Content-Length, so that a refused
 * client never gets to send a body.  The last call runs the handler.
 *
 * These callbacks run inside MHD_run, between libmicrohttpd's own frames:
 * no ERROR may unwind through them.  Everything that can raise one runs
 * inside PG_TRY here, and every database access in a transaction of its
 * own that is rolled back on error; the error becomes the reply.
 *
 * Every request leaves a row in mdd.audit (mdd._http_audit): in the
 * handler's transaction when it succeeds, so that what it did and its
 * audit row commit together; in a transaction of its own otherwise.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <netdb.h>
#include <stdlib.h>

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "http_internal.h"
#include "workers.h"

#define MAX_AUDITED_URL 2000

/* the request as text for the log: "GET /web/x from 127.0.0.1:5555" */
static char *
describe(HttpState *st)
{
	return psprintf("%s %s from %s", st->req.method, st->req.path, st->req.client);
}

static enum MHD_Result
collect_arg(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	HttpState  *st = (HttpState *) cls;

	st->nargs++;
	return MHD_YES;
}

typedef struct ArgFill
{
	HttpState  *st;
	int			i;
} ArgFill;

static enum MHD_Result
fill_arg(void *cls, enum MHD_ValueKind kind, const char *key, const char *value)
{
	ArgFill    *f = (ArgFill *) cls;
	HttpState  *st = f->st;

	if (f->i >= st->nargs)
		return MHD_NO;
	st->arg_names[f->i] = pstrdup(key ? key : "");
	st->arg_values[f->i] = pstrdup(value ? value : "");
	if (strlen(st->query) < MAX_AUDITED_URL)
		st->query = psprintf("%s%s%s%s%s", st->query, f->i == 0 ? "?" : "&", key ? key : "",
							 value ? "=" : "", value ? value : "");
	f->i++;
	return MHD_YES;
}

static void
client_address(HttpState *st)
{
	const union MHD_ConnectionInfo *info =
		MHD_get_connection_info(st->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
	char		host[NI_MAXHOST];
	char		port[NI_MAXSERV];

	if (info == NULL || info->client_addr == NULL ||
		getnameinfo(info->client_addr,
					info->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
					: sizeof(struct sockaddr_in),
					host, sizeof(host), port, sizeof(port), NI_NUMERICHOST | NI_NUMERICSERV) != 0)
		st->req.client = "unknown";
	else
		st->req.client = psprintf("%s:%s", host, port);
}

/* the state of a new request, in a memory context of its own */
static HttpState *
begin_request(struct MHD_Connection *conn, const char *url, const char *method)
{
	MemoryContext mcxt = AllocSetContextCreate(TopMemoryContext, "mdd http request",
											   ALLOCSET_DEFAULT_SIZES);
	MemoryContext old = MemoryContextSwitchTo(mcxt);
	HttpState  *st = palloc0(sizeof(HttpState));
	const union MHD_ConnectionInfo *info;
	ArgFill		fill;

	st->req.mcxt = mcxt;
	st->req.method = pstrdup(method);
	st->req.path = pstrdup(url);
	st->req.subpath = "";
	st->req.body = "";
	st->req.internal = st;
	st->conn = conn;
	st->fd = -1;
	info = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_PROTOCOL);
	st->req.tls = info != NULL && info->protocol != 0;
	client_address(st);
	st->query = "";
	(void) MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, collect_arg, st);
	st->arg_names = palloc0(sizeof(char *) * (st->nargs + 1));
	st->arg_values = palloc0(sizeof(char *) * (st->nargs + 1));
	fill.st = st;
	fill.i = 0;
	(void) MHD_get_connection_values(conn, MHD_GET_ARGUMENT_KIND, fill_arg, &fill);
	st->nargs = fill.i;
	MemoryContextSwitchTo(old);
	return st;
}

/*
 * Write the audit row of the request (inside a transaction, as the
 * worker's own role, SPI connected): the role authenticated (the worker's
 * own when none was), 'http' or 'http refused', what was asked and the
 * status, and the client.
 */
static void
audit(HttpState *st)
{
	Oid			types[4] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[4];
	StringInfoData detail;
	bool		refused = st->status == 401 || st->status == 403;

	initStringInfo(&detail);
	appendStringInfo(&detail, "%s %s%s -> %d", st->req.method, st->req.path, st->query, st->status);
	if (st->req.role == NULL && st->user != NULL)
		appendStringInfo(&detail, " (user \"%s\")", st->user);
	if (st->note)
		appendStringInfo(&detail, ": %s", st->note);
	values[0] = mdd_wire_text_datum(st->req.role ? st->req.role
									: GetUserNameFromId(GetSessionUserId(), false));
	values[1] = CStringGetTextDatum(refused ? "http refused" : "http");
	values[2] = mdd_wire_text_datum(detail.data);
	values[3] = CStringGetTextDatum(st->req.client);
	if (SPI_execute_with_args("SELECT mdd._http_audit($1::name, $2, $3, $4)", 4, types, values,
							  NULL, false, 0) != SPI_OK_SELECT)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not write the audit row of an HTTP request")));
}

/* the audit row of a request that was refused or failed, in its own transaction */
static void
audit_alone_work(void *ctx)
{
	audit((HttpState *) ctx);
}

static void
audit_alone(HttpState *st)
{
	ErrorData  *edata = mdd_worker_in_transaction("mdd http audit", audit_alone_work, st);

	if (edata)
	{
		ereport(LOG,
				(errmsg("mdd http %d: could not write the audit row of %s: %s (SQLSTATE %s)",
						mdd_http_worker_number, describe(st), edata->message,
						unpack_sql_state(edata->sqlerrcode))));
		FreeErrorData(edata);
	}
	pgstat_report_activity(STATE_IDLE, NULL);
}

/* queue the reply as the response; the request is answered */
static enum MHD_Result
answer(HttpState *st)
{
	struct MHD_Response *resp;
	enum MHD_Result rc;

	if (st->status >= 500)
		ereport(LOG,
				(errmsg("mdd http %d: %s failed (%d): %s", mdd_http_worker_number,
						describe(st), st->status, st->note ? st->note : "")));
	else
		ereport(DEBUG1,
				(errmsg("mdd http %d: %s -> %d%s%s", mdd_http_worker_number, describe(st),
						st->status, st->note ? ": " : "", st->note ? st->note : "")));
	st->answered = true;
	resp = mdd_http_make_response(st);
	if (resp == NULL)
		return MHD_NO;
	rc = MHD_queue_response(st->conn, st->status, resp);
	MHD_destroy_response(resp);
	return rc;
}

static void
refuse(HttpState *st, int status, const char *sqlstate, const char *message)
{
	mdd_http_reply_error(&st->req, status, sqlstate, "%s", message);
}

/* the route of the path, or NULL; sets the subpath */
static const MddHttpRoute *
find_route(HttpState *st)
{
	const char *path = st->req.path;

	for (int i = 0; i < mdd_http_route_count; i++)
	{
		const MddHttpRoute *r = &mdd_http_routes[i];
		size_t		plen = strlen(r->prefix);

		if (r->exact)
		{
			if (strcmp(path, r->prefix) == 0)
				return r;
			continue;
		}
		if (strncmp(path, r->prefix, plen) == 0)
		{
			st->req.subpath = path + plen;
			return r;
		}
		/* "/web" for the route "/web/" */
		if (plen > 1 && r->prefix[plen - 1] == '/' && strlen(path) == plen - 1 &&
			strncmp(path, r->prefix, plen - 1) == 0)
		{
			st->req.subpath = "";
			return r;
		}
	}
	return NULL;
}

static bool
method_allowed(const char *methods, const char *method)
{
	size_t		len = strlen(method);

	for (const char *p = methods; (p = strstr(p, method)) != NULL; p += len)
		if ((p == methods || p[-1] == ' ' || p[-1] == ',') &&
			(p[len] == '\0' || p[len] == ',' || p[len] == ' '))
			return true;
	return false;
}

/*
 * The checks of the first call, in a transaction as the worker: the
 * credentials, the route, the role, the method.  A refusal becomes the
 * reply (status set) and is audited here.
 */
static void
admit_work(void *ctx)
{
	HttpState  *st = (HttpState *) ctx;
	MemoryContext old = MemoryContextSwitchTo(st->req.mcxt);
	char	   *password = NULL;
	char	   *user = MHD_basic_auth_get_username_password(st->conn, &password);
	Oid			roleid;
	char	   *why = NULL;

	if (user == NULL)
	{
		refuse(st, 401, "28000", "authentication required");
		st->note = "no credentials";
	}
	else
	{
		st->user = pstrdup(user);
		why = mdd_http_check_password(st->user, password ? password : "", &roleid);
		if (password)
		{
			explicit_bzero(password, strlen(password));
			MHD_free(password);
		}
		if (why)
		{
			refuse(st, 401, "28P01", "authentication failed");
			st->note = why;
		}
	}
	if (user)
		MHD_free(user);
	if (st->status == 0)
	{
		st->req.role = st->user;
		st->req.roleid = roleid;
		st->route = find_route(st);
		if (st->route == NULL)
			mdd_http_reply_error(&st->req, 404, "42704", "no such resource: %s", st->req.path);
		else if (!is_member_of_role(roleid, get_role_oid(st->route->role, false)))
			mdd_http_reply_error(&st->req, 403, "42501", "role \"%s\" is not a member of %s",
								 st->req.role, st->route->role);
		else if (!method_allowed(st->route->methods, st->req.method))
		{
			mdd_http_reply_error(&st->req, 405, "0A000", "%s is not served at %s",
								 st->req.method, st->route->prefix);
			mdd_http_add_header(&st->req, "Allow", st->route->methods);
		}
	}
	if (st->status == 401)
		mdd_http_add_header(&st->req, "WWW-Authenticate", "Basic realm=\"mdd\", charset=\"UTF-8\"");
	if (st->status != 0)
		audit(st);
	MemoryContextSwitchTo(old);
}

static enum MHD_Result
first_call(HttpState *st)
{
	ErrorData  *edata;
	const char *length;

	edata = mdd_worker_in_transaction(describe(st), admit_work, st);
	pgstat_report_activity(STATE_IDLE, NULL);
	if (edata)
	{
		mdd_http_reply_from_error(st, edata);
		return answer(st);
	}
	if (st->status != 0)
		return answer(st);

	length = MHD_lookup_connection_value(st->conn, MHD_HEADER_KIND, "Content-Length");
	if (length && strtoull(length, NULL, 10) > (uint64) mdd_http_max_body * 1024)
	{
		mdd_http_reply_error(&st->req, 413, "54000",
							 "request body of %s bytes is larger than mdd.http_max_body (%d kB)",
							 length, mdd_http_max_body);
		audit_alone(st);
		return answer(st);
	}
	initStringInfo(&st->body);
	return MHD_YES;
}

/* a piece of the body; a body over the limit closes the connection */
static enum MHD_Result
take_body(HttpState *st, const char *data, size_t *size)
{
	if (st->answered)
	{
		*size = 0;				/* answered already: the rest is dropped */
		return MHD_YES;
	}
	if ((uint64) st->body.len + *size > (uint64) mdd_http_max_body * 1024)
	{
		ereport(LOG,
				(errmsg("mdd http %d: %s: body larger than mdd.http_max_body, connection closed",
						mdd_http_worker_number, describe(st))));
		st->status = 413;
		st->note = "body larger than mdd.http_max_body, connection closed";
		audit_alone(st);
		return MHD_NO;
	}
	appendBinaryStringInfo(&st->body, data, *size);
	*size = 0;
	return MHD_YES;
}

/* the last call: the handler, in a transaction as the role */
static enum MHD_Result
last_call(HttpState *st)
{
	MemoryContext caller = CurrentMemoryContext;
	ErrorData  *volatile edata = NULL;

	if (st->answered)
		return MHD_YES;
	st->req.body = st->body.data ? st->body.data : "";
	st->req.body_len = st->body.len;
	PG_TRY();
	{
		mdd_worker_begin_transaction(describe(st));
		mdd_http_become(st->req.roleid);
		mdd_http_current_client = st->req.client;
		st->route->handler(&st->req);
		mdd_http_current_client = NULL;
		mdd_http_unbecome();
		if (st->kind == REPLY_NONE && st->status == 0)
			elog(ERROR, "the handler of %s made no reply", st->route->prefix);
		audit(st);
		mdd_worker_commit_transaction();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		mdd_http_current_client = NULL;
		mdd_http_unbecome();
	}
	PG_END_TRY();
	pgstat_report_activity(STATE_IDLE, NULL);
	if (edata)
	{
		mdd_http_reply_from_error(st, edata);
		FreeErrorData(edata);
		audit_alone(st);
	}
	return answer(st);
}

enum MHD_Result
mdd_http_access(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
				const char *version, const char *upload_data, size_t *upload_data_size,
				void **con_cls)
{
	MemoryContext caller = CurrentMemoryContext;
	volatile enum MHD_Result result = MHD_NO;

	/* nothing may unwind into libmicrohttpd's frames */
	mdd_http_busy = true;
	if (mdd_got_sigterm)
	{
		mdd_http_busy = false;
		return MHD_NO;			/* stopping: no new work */
	}
	PG_TRY();
	{
		HttpState  *st = (HttpState *) *con_cls;

		if (st == NULL)
		{
			st = begin_request(conn, url, method);
			*con_cls = st;
			result = first_call(st);
		}
		else if (*upload_data_size > 0)
			result = take_body(st, upload_data, upload_data_size);
		else
			result = last_call(st);
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(caller);
		EmitErrorReport();
		FlushErrorState();
		if (IsTransactionState() || IsAbortedTransactionBlockState())
			AbortCurrentTransaction();
		mdd_http_current_client = NULL;
		mdd_http_unbecome();
		result = MHD_NO;		/* the connection is closed */
	}
	PG_END_TRY();
	mdd_http_busy = false;
	MemoryContextSwitchTo(caller);
	return result;
}

void
mdd_http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
				   enum MHD_RequestTerminationCode toe)
{
	HttpState  *st = (HttpState *) *con_cls;

	if (st == NULL)
		return;
	*con_cls = NULL;
	PG_TRY();
	{
		mdd_http_drop_reply(st);
	}
	PG_CATCH();
	{
		EmitErrorReport();
		FlushErrorState();
	}
	PG_END_TRY();
	MemoryContextDelete(st->req.mcxt);
}
