/*-------------------------------------------------------------------------
 *
 * http_reply.c
 *	  What route handlers call (http.h): the request's headers and
 *	  arguments, the replies (buffer, file, stream), the HTTP status of an
 *	  SQLSTATE; and the libmicrohttpd response built from a reply.
 *
 * Replies are kept in the request's memory context until the handler's
 * transaction has committed; only then does the core turn them into a
 * response, so that a handler that raises after replying leaves nothing
 * behind but the error.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <unistd.h>

#include "access/xact.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"

#include "http_internal.h"
#include "workers.h"

PG_FUNCTION_INFO_V1(mdd_http_client_sql);

/* the client of the request being served, for mdd._http_client() */
const char *mdd_http_current_client = NULL;

/*
 * mdd._http_client() RETURNS text: the address:port of the HTTP client
 * whose request this process serves, NULL elsewhere.
 */
Datum
mdd_http_client_sql(PG_FUNCTION_ARGS)
{
	if (mdd_http_current_client == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(mdd_http_current_client));
}

/* act as the role (like SET ROLE: current_user and mdd._caller()) */
void
mdd_http_become(Oid roleid)
{
	SetCurrentRoleId(roleid, superuser_arg(roleid));
}

/* back to the worker's own role (like RESET ROLE) */
void
mdd_http_unbecome(void)
{
	SetCurrentRoleId(InvalidOid, false);
}

const char *
mdd_http_header(MddHttpRequest *req, const char *name)
{
	HttpState  *st = (HttpState *) req;

	return MHD_lookup_connection_value(st->conn, MHD_HEADER_KIND, name);
}

const char *
mdd_http_arg(MddHttpRequest *req, const char *name)
{
	HttpState  *st = (HttpState *) req;

	for (int i = 0; i < st->nargs; i++)
		if (strcmp(st->arg_names[i], name) == 0)
			return st->arg_values[i];
	return NULL;
}

int
mdd_http_args(MddHttpRequest *req, const char ***names, const char ***values)
{
	HttpState  *st = (HttpState *) req;

	*names = st->arg_names;
	*values = st->arg_values;
	return st->nargs;
}

char *
mdd_http_base_url(MddHttpRequest *req)
{
	const char *host = mdd_http_header(req, "Host");
	const char *scheme = req->tls ? "https" : "http";

	/* a Host header with anything but host name and port characters is ignored */
	if (host == NULL || host[0] == '\0' || strlen(host) > 255 ||
		strspn(host, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]") != strlen(host))
		return psprintf("%s://%s:%d", scheme,
						strcmp(mdd_http_listen_address, "*") == 0 ? "localhost" : mdd_http_listen_address,
						mdd_http_port);
	return psprintf("%s://%s", scheme, host);
}

void
mdd_http_require_role(MddHttpRequest *req, const char *rolename)
{
	if (!is_member_of_role(req->roleid, get_role_oid(rolename, false)))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("role \"%s\" is not a member of %s", req->role, rolename)));
}

/* forget the reply made so far (files closed, streams freed) */
void
mdd_http_drop_reply(HttpState *st)
{
	if (st->kind == REPLY_FILE && st->fd >= 0)
		close(st->fd);
	st->fd = -1;
	if (st->stream != NULL && st->stream->free != NULL)
		st->stream->free(st->stream->ctx);
	st->stream = NULL;
	if (st->stream_mcxt != NULL)
		MemoryContextDelete(st->stream_mcxt);
	st->stream_mcxt = NULL;
	st->kind = REPLY_NONE;
	st->data = NULL;
	st->len = 0;
	st->nheaders = 0;
}

static void
set_reply(HttpState *st, ReplyKind kind, int status, const char *content_type)
{
	/* a reply replaces the one before, but not the headers added */
	if (st->kind == REPLY_FILE && st->fd >= 0)
		close(st->fd);
	st->fd = -1;
	if (st->stream != NULL && st->stream->free != NULL)
		st->stream->free(st->stream->ctx);
	st->stream = NULL;
	/* the context of a stream about to be made may already hold its ctx */
	if (kind != REPLY_STREAM && st->stream_mcxt != NULL)
	{
		MemoryContextDelete(st->stream_mcxt);
		st->stream_mcxt = NULL;
	}
	st->kind = kind;
	st->status = status;
	st->data = NULL;
	st->len = 0;
	st->content_type = content_type ? MemoryContextStrdup(st->req.mcxt, content_type) : NULL;
}

void
mdd_http_reply(MddHttpRequest *req, int status, const char *content_type, const void *data,
			   size_t len)
{
	HttpState  *st = (HttpState *) req;

	set_reply(st, REPLY_BUFFER, status, content_type);
	st->data = MemoryContextAllocHuge(req->mcxt, len + 1);
	if (len > 0)
		memcpy(st->data, data, len);
	st->data[len] = '\0';
	st->len = len;
}

void
mdd_http_reply_json(MddHttpRequest *req, int status, const char *json)
{
	mdd_http_reply(req, status, "application/json", json, strlen(json));
}

char *
mdd_http_json_string(const char *s)
{
	StringInfoData buf;

	initStringInfo(&buf);
	escape_json(&buf, s);
	return buf.data;
}

static char *
error_json(const char *message, const char *sqlstate, const char *detail, const char *hint)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfoString(&buf, "{\"error\": ");
	escape_json(&buf, message ? message : "");
	appendStringInfo(&buf, ", \"sqlstate\": \"%s\"", sqlstate);
	if (detail)
	{
		appendStringInfoString(&buf, ", \"detail\": ");
		escape_json(&buf, detail);
	}
	if (hint)
	{
		appendStringInfoString(&buf, ", \"hint\": ");
		escape_json(&buf, hint);
	}
	appendStringInfoString(&buf, "}\n");
	return buf.data;
}

void
mdd_http_reply_error(MddHttpRequest *req, int status, const char *sqlstate, const char *fmt,...)
{
	HttpState  *st = (HttpState *) req;
	MemoryContext old = MemoryContextSwitchTo(req->mcxt);
	StringInfoData msg;

	initStringInfo(&msg);
	for (;;)
	{
		va_list		args;
		int			needed;

		va_start(args, fmt);
		needed = appendStringInfoVA(&msg, fmt, args);
		va_end(args);
		if (needed == 0)
			break;
		enlargeStringInfo(&msg, needed);
	}
	st->note = msg.data;
	mdd_http_reply_json(req, status, error_json(msg.data, sqlstate, NULL, NULL));
	MemoryContextSwitchTo(old);
}

void
mdd_http_reply_file(MddHttpRequest *req, int status, const char *content_type, int fd,
					uint64 offset, uint64 size)
{
	HttpState  *st = (HttpState *) req;

	set_reply(st, REPLY_FILE, status, content_type);
	st->fd = fd;
	st->offset = offset;
	st->size = size;
}

MemoryContext
mdd_http_stream_memory(MddHttpRequest *req)
{
	HttpState  *st = (HttpState *) req;

	if (st->stream_mcxt == NULL)
		st->stream_mcxt = AllocSetContextCreate(TopMemoryContext, "mdd http stream",
												ALLOCSET_DEFAULT_SIZES);
	return st->stream_mcxt;
}

void
mdd_http_reply_stream(MddHttpRequest *req, int status, const char *content_type, int64 size,
					  MddHttpStreamRead read, MddHttpStreamFree free, void *ctx)
{
	HttpState  *st = (HttpState *) req;
	MemoryContext mcxt = mdd_http_stream_memory(req);
	HttpStream *s;

	set_reply(st, REPLY_STREAM, status, content_type);
	s = MemoryContextAllocZero(mcxt, sizeof(HttpStream));
	s->mcxt = mcxt;
	s->read = read;
	s->free = free;
	s->ctx = ctx;
	s->roleid = req->roleid;
	s->client = MemoryContextStrdup(mcxt, req->client);
	s->what = MemoryContextStrdup(mcxt, psprintf("%s %s from %s", req->method, req->path, req->client));
	st->stream = s;
	st->size = size;
}

void
mdd_http_add_header(MddHttpRequest *req, const char *name, const char *value)
{
	HttpState  *st = (HttpState *) req;

	if (st->nheaders == st->maxheaders)
	{
		int			n = st->maxheaders ? st->maxheaders * 2 : 8;

		st->headers = st->headers ? repalloc(st->headers, n * sizeof(ReplyHeader))
			: MemoryContextAlloc(req->mcxt, n * sizeof(ReplyHeader));
		st->maxheaders = n;
	}
	st->headers[st->nheaders].name = MemoryContextStrdup(req->mcxt, name);
	st->headers[st->nheaders].value = MemoryContextStrdup(req->mcxt, value);
	st->nheaders++;
}

int
mdd_http_status_for_sqlstate(int sqlerrcode)
{
	int			category = ERRCODE_TO_CATEGORY(sqlerrcode);

	if (sqlerrcode == ERRCODE_INSUFFICIENT_PRIVILEGE ||
		category == ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION)
		return 403;
	if (sqlerrcode == ERRCODE_UNDEFINED_OBJECT || sqlerrcode == ERRCODE_NO_DATA_FOUND ||
		category == ERRCODE_NO_DATA)
		return 404;
	if (category == ERRCODE_DATA_EXCEPTION || sqlerrcode == ERRCODE_RAISE_EXCEPTION ||
		sqlerrcode == ERRCODE_INVALID_PARAMETER_VALUE || sqlerrcode == ERRCODE_NULL_VALUE_NOT_ALLOWED)
		return 400;
	if (category == ERRCODE_INTEGRITY_CONSTRAINT_VIOLATION ||
		category == ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE ||
		sqlerrcode == ERRCODE_DUPLICATE_OBJECT || sqlerrcode == ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST)
		return 409;
	if (category == ERRCODE_PROGRAM_LIMIT_EXCEEDED)
		return 413;
	if (category == ERRCODE_FEATURE_NOT_SUPPORTED)
		return 501;
	if (category == ERRCODE_INSUFFICIENT_RESOURCES || category == ERRCODE_TRANSACTION_ROLLBACK ||
		category == ERRCODE_OPERATOR_INTERVENTION)
		return 503;
	return 500;
}

/* the reply for an error a handler raised */
void
mdd_http_reply_from_error(HttpState *st, ErrorData *edata)
{
	int			status = st->req.error_status;

	if (status < 400 || status > 599)
		status = mdd_http_status_for_sqlstate(edata->sqlerrcode);
	set_reply(st, REPLY_NONE, status, NULL);
	st->nheaders = 0;
	mdd_http_reply_json(&st->req, status,
						error_json(edata->message, unpack_sql_state(edata->sqlerrcode),
								   edata->detail, edata->hint));
	st->note = psprintf("%s (SQLSTATE %s)", edata->message ? edata->message : "",
						unpack_sql_state(edata->sqlerrcode));
}

/* a piece of a streamed reply, read in a transaction as the request's role */
static ssize_t
stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
	HttpStream *s = (HttpStream *) cls;
	MemoryContext caller = CurrentMemoryContext;
	volatile size_t n = 0;
	bool		end = false;

	if (s->ended)
		return MHD_CONTENT_READER_END_OF_STREAM;
	if (mdd_got_sigterm)
		return MHD_CONTENT_READER_END_WITH_ERROR;
	mdd_http_busy = true;
	PG_TRY();
	{
		mdd_worker_begin_transaction(s->what);
		mdd_http_become(s->roleid);
		mdd_http_current_client = s->client;
		n = s->read(s->ctx, pos, buf, max, &end);
		mdd_http_current_client = NULL;
		mdd_http_unbecome();
		mdd_worker_commit_transaction();
		pgstat_report_activity(STATE_IDLE, NULL);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		mdd_http_current_client = NULL;
		mdd_http_unbecome();
		pgstat_report_activity(STATE_IDLE, NULL);
		ereport(LOG,
				(errmsg("mdd http %d: reply to %s ended early: %s (SQLSTATE %s)",
						mdd_http_worker_number, s->what, edata->message,
						unpack_sql_state(edata->sqlerrcode))));
		FreeErrorData(edata);
		s->ended = true;
		mdd_http_busy = false;
		return MHD_CONTENT_READER_END_WITH_ERROR;
	}
	PG_END_TRY();
	mdd_http_busy = false;
	if (end)
		s->ended = true;
	if (n == 0)
	{
		if (!end)
			ereport(LOG,
					(errmsg("mdd http %d: reply to %s ended early: the reader gave no bytes",
							mdd_http_worker_number, s->what)));
		return end ? MHD_CONTENT_READER_END_OF_STREAM : MHD_CONTENT_READER_END_WITH_ERROR;
	}
	return (ssize_t) n;
}

static void
stream_free(void *cls)
{
	HttpStream *s = (HttpStream *) cls;

	if (s->free)
		s->free(s->ctx);
	MemoryContextDelete(s->mcxt);
}

/* the libmicrohttpd response of the reply; NULL if it cannot be made */
struct MHD_Response *
mdd_http_make_response(HttpState *st)
{
	struct MHD_Response *resp = NULL;

	switch (st->kind)
	{
		case REPLY_NONE:
			resp = MHD_create_response_from_buffer(0, "", MHD_RESPMEM_PERSISTENT);
			break;
		case REPLY_BUFFER:
			resp = MHD_create_response_from_buffer(st->len, st->data, MHD_RESPMEM_PERSISTENT);
			break;
		case REPLY_FILE:
			resp = MHD_create_response_from_fd_at_offset64(st->size, st->fd, st->offset);
			if (resp == NULL)
				close(st->fd);
			st->fd = -1;		/* MHD closes it */
			break;
		case REPLY_STREAM:
			resp = MHD_create_response_from_callback(st->size < 0 ? MHD_SIZE_UNKNOWN : (uint64_t) st->size,
													 256 * 1024, stream_read, st->stream, stream_free);
			if (resp == NULL)
				stream_free(st->stream);
			st->stream = NULL;	/* MHD frees it */
			st->stream_mcxt = NULL;
			break;
	}
	st->kind = REPLY_NONE;
	if (resp == NULL)
		return NULL;
	if (st->content_type)
		(void) MHD_add_response_header(resp, "Content-Type", st->content_type);
	(void) MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
	for (int i = 0; i < st->nheaders; i++)
		(void) MHD_add_response_header(resp, st->headers[i].name, st->headers[i].value);
	return resp;
}
