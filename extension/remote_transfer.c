/*-------------------------------------------------------------------------
 *
 * remote_transfer.c
 *	  One request to a WebDAV server or an S3 bucket with libcurl, and the
 *	  error that its failure raises (remote.h).
 *
 * libcurl is used the way a PostgreSQL backend must: one easy handle per
 * backend, reset before every request (so the connection is kept but no
 * option of a previous request, credentials included, is); no signals;
 * connect and total time-outs; no redirects; the status read here rather
 * than through CURLOPT_FAILONERROR; the response collected in palloc'ed
 * memory without raising errors; nothing that can ereport(ERROR) runs
 * while curl_easy_perform is on the stack.  A progress callback stops a
 * transfer when a query cancel or termination is pending, and the
 * interrupt is then served once libcurl has returned.
 *
 * s3 requests are signed by libcurl (CURLOPT_AWS_SIGV4) and carry the
 * SHA-256 of their body (x-amz-content-sha256).  Credentials travel only
 * in libcurl options, never in a URL, and appear in no message.
 *
 * Failures carry an SQLSTATE that tells a job runner whether to retry:
 * class 08 for what may pass (no connection, time-out, HTTP 5xx other
 * than 507, 408, 429), 53100 for a full storage (HTTP 507), 42501 for
 * refused credentials (401, 403), 58P01 for a missing blob (404 on GET)
 * and 58030 for any other answer.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/memutils.h"

#include "remote.h"

/* how much of an error response is kept (for the S3 error code) */
#define MDD_ERROR_BODY_MAX 4096

/* the most a connect may take */
#define MDD_MAX_CONNECT_TIMEOUT_MS 10000L

/* SHA-256 of no bytes, the payload hash of requests without a body */
#define MDD_EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

static CURL *curl = NULL;

/* libcurl write callback: keep the response in palloc'ed memory */
static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *arg)
{
	Transfer   *t = (Transfer *) arg;
	size_t		n = size * nmemb;
	size_t		limit = t->keep_body ? MDD_MAX_BLOB_SIZE : MDD_ERROR_BODY_MAX;

	if (t->len + n > limit)
	{
		if (!t->keep_body)
			n = limit - t->len; /* only the start of an error document */
		else
		{
			t->too_large = true;
			return 0;
		}
	}
	if (t->len + n > t->cap)
	{
		size_t		cap = Max(Max(t->cap * 2, t->len + n), (size_t) 65536);
		char	   *buf;

		if (t->announced > 0 && (size_t) t->announced >= t->len + n)
			cap = (size_t) t->announced;
		cap = Min(cap, limit);
		/* no error may be raised here: ask for NULL when out of memory */
		buf = MemoryContextAllocExtended(CurrentMemoryContext, VARHDRSZ + cap,
										 MCXT_ALLOC_HUGE | MCXT_ALLOC_NO_OOM);
		if (buf == NULL)
		{
			t->out_of_memory = true;
			return 0;
		}
		if (t->len > 0)
			memcpy(buf + VARHDRSZ, t->buf + VARHDRSZ, t->len);
		if (t->buf != NULL)
			pfree(t->buf);
		t->buf = buf;
		t->cap = cap;
	}
	memcpy(t->buf + VARHDRSZ + t->len, ptr, n);
	t->len += n;
	return size * nmemb;
}

/* libcurl header callback: note Content-Length, to size the buffer once */
static size_t
header_cb(char *buffer, size_t size, size_t nitems, void *arg)
{
	Transfer   *t = (Transfer *) arg;
	size_t		n = size * nitems;

	if (n > 15 && pg_strncasecmp(buffer, "content-length:", 15) == 0)
	{
		curl_off_t	value = 0;
		size_t		i = 15;

		while (i < n && (buffer[i] == ' ' || buffer[i] == '\t'))
			i++;
		for (; i < n && buffer[i] >= '0' && buffer[i] <= '9'; i++)
		{
			if (value > (curl_off_t) MDD_MAX_BLOB_SIZE)
				break;
			value = value * 10 + (buffer[i] - '0');
		}
		t->announced = value;
	}
	return n;
}

/* libcurl progress callback: stop on a pending cancel or termination */
static int
progress_cb(void *arg, curl_off_t dltotal, curl_off_t dlnow,
			curl_off_t ultotal, curl_off_t ulnow)
{
	Transfer   *t = (Transfer *) arg;

	if (t->interruptible && InterruptPending && (QueryCancelPending || ProcDiePending))
	{
		t->interrupted = true;
		return 1;
	}
	return 0;
}

/* the backend's easy handle, created on first use */
static bool
curl_handle(void)
{
	if (curl == NULL)
	{
		if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
			return false;
		curl = curl_easy_init();
	}
	return curl != NULL;
}

/*
 * Run one request of rs.  Raises no error, whatever happens: the outcome
 * is left in t (code, status, body) for the caller to judge once libcurl
 * has returned.
 */
void
mdd_remote_perform(RemoteStorage *rs, Transfer *t)
{
	struct curl_slist *headers = NULL;
	struct curl_slist *h;
	char	   *url;
	char		line[128];
	bool		setup_ok = true;

	t->code = CURLE_OK;
	t->status = 0;
	t->buf = NULL;
	t->len = t->cap = 0;
	t->announced = -1;
	t->too_large = t->out_of_memory = t->interrupted = false;
	t->errbuf[0] = '\0';

	url = MemoryContextAllocExtended(CurrentMemoryContext,
									 strlen(rs->url_prefix) + strlen(t->path) + 1,
									 MCXT_ALLOC_NO_OOM);
	if (url == NULL || !curl_handle())
	{
		t->code = CURLE_OUT_OF_MEMORY;
		return;
	}
	strcpy(url, rs->url_prefix);
	strcat(url, t->path);

	curl_easy_reset(curl);
	curl_easy_setopt(curl, CURLOPT_URL, url);
#if LIBCURL_VERSION_NUM >= 0x075500
	curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
#else
	curl_easy_setopt(curl, CURLOPT_PROTOCOLS, (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
	curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(curl, CURLOPT_FAILONERROR, 0L);
	curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, t->timeout_ms);
	curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS,
					 Min(t->timeout_ms, MDD_MAX_CONNECT_TIMEOUT_MS));
	curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, t->errbuf);
	curl_easy_setopt(curl, CURLOPT_USERAGENT, "mdd");
	curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(curl, CURLOPT_WRITEDATA, t);
	curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(curl, CURLOPT_HEADERDATA, t);
	curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, progress_cb);
	curl_easy_setopt(curl, CURLOPT_XFERINFODATA, t);

	if (strcmp(t->method, "PUT") == 0)
	{
		curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, "PUT");
		curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) t->body_len);
		curl_easy_setopt(curl, CURLOPT_POSTFIELDS, t->body);
		headers = curl_slist_append(headers, "Content-Type: application/octet-stream");
		setup_ok &= headers != NULL;
		if (t->content_md5 != NULL)
		{
			snprintf(line, sizeof(line), "Content-MD5: %s", t->content_md5);
			setup_ok &= (h = curl_slist_append(headers, line)) != NULL;
			headers = h ? h : headers;
		}
	}
	else if (strcmp(t->method, "GET") == 0)
		curl_easy_setopt(curl, CURLOPT_HTTPGET, 1L);
	else if (strcmp(t->method, "HEAD") == 0)
		curl_easy_setopt(curl, CURLOPT_NOBODY, 1L);
	else
		curl_easy_setopt(curl, CURLOPT_CUSTOMREQUEST, t->method);

	if (rs->s3)
	{
		snprintf(line, sizeof(line), "x-amz-content-sha256: %s",
				 t->payload_sha256 ? t->payload_sha256 : MDD_EMPTY_SHA256);
		setup_ok &= (h = curl_slist_append(headers, line)) != NULL;
		headers = h ? h : headers;
		curl_easy_setopt(curl, CURLOPT_AWS_SIGV4, rs->sigv4);
		curl_easy_setopt(curl, CURLOPT_USERNAME, rs->user);
		curl_easy_setopt(curl, CURLOPT_PASSWORD, rs->secret);
	}
	else if (rs->user != NULL)
	{
		curl_easy_setopt(curl, CURLOPT_HTTPAUTH, (long) CURLAUTH_BASIC);
		curl_easy_setopt(curl, CURLOPT_USERNAME, rs->user);
		curl_easy_setopt(curl, CURLOPT_PASSWORD, rs->secret);
	}
	curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);

	if (!setup_ok)
		t->code = CURLE_OUT_OF_MEMORY;
	else
	{
		t->code = curl_easy_perform(curl);
		if (t->code == CURLE_OK)
		{
			curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &t->status);
			if (strcmp(t->method, "HEAD") == 0)
			{
				curl_off_t	cl = -1;

				curl_easy_getinfo(curl, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
				t->announced = cl;
			}
		}
	}

	/* forget the credentials and headers; the connection stays open */
	curl_easy_reset(curl);
	curl_slist_free_all(headers);
	pfree(url);
}

/* the request went through and the server answered 2xx */
bool
mdd_remote_status_ok(Transfer *t)
{
	return t->code == CURLE_OK && t->status >= 200 && t->status < 300;
}

/* the text between <tag> and </tag> of an S3 error document, cleaned */
static char *
s3_error_field(Transfer *t, const char *tag)
{
	char	   *doc;
	char	   *open;
	char	   *start;
	char	   *end;
	char	   *p;

	if (t->buf == NULL || t->len == 0)
		return NULL;
	doc = pnstrdup(t->buf + VARHDRSZ, t->len);
	open = psprintf("<%s>", tag);
	start = strstr(doc, open);
	if (start == NULL)
		return NULL;
	start += strlen(open);
	end = strstr(start, psprintf("</%s>", tag));
	if (end == NULL)
		return NULL;
	*end = '\0';
	if (end - start > 200)
		start[200] = '\0';
	for (p = start; *p; p++)
		if ((unsigned char) *p < 0x20 || (unsigned char) *p > 0x7e)
			*p = ' ';
	return start;
}

/* the SQLSTATE a failed transfer deserves (see the file header) */
int
mdd_remote_failure_sqlstate(Transfer *t)
{
	if (t->code != CURLE_OK)
	{
		switch (t->code)
		{
			case CURLE_COULDNT_RESOLVE_HOST:
			case CURLE_COULDNT_RESOLVE_PROXY:
			case CURLE_COULDNT_CONNECT:
				return ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION;
			case CURLE_OPERATION_TIMEDOUT:
			case CURLE_SEND_ERROR:
			case CURLE_RECV_ERROR:
			case CURLE_GOT_NOTHING:
			case CURLE_PARTIAL_FILE:
			case CURLE_SSL_CONNECT_ERROR:
			case CURLE_HTTP2:
			case CURLE_HTTP2_STREAM:
				return ERRCODE_CONNECTION_FAILURE;
			case CURLE_WEIRD_SERVER_REPLY:
				return ERRCODE_PROTOCOL_VIOLATION;
			case CURLE_OUT_OF_MEMORY:
				return ERRCODE_OUT_OF_MEMORY;
			case CURLE_WRITE_ERROR:
				if (t->too_large)
					return ERRCODE_PROGRAM_LIMIT_EXCEEDED;
				if (t->out_of_memory)
					return ERRCODE_OUT_OF_MEMORY;
				return ERRCODE_IO_ERROR;
			default:
				return ERRCODE_IO_ERROR;
		}
	}
	if (t->status == 401 || t->status == 403)
		return ERRCODE_INSUFFICIENT_PRIVILEGE;
	if (t->status == 404 &&
		(strcmp(t->method, "GET") == 0 || strcmp(t->method, "HEAD") == 0))
		return ERRCODE_UNDEFINED_FILE;
	if (t->status == 507)
		return ERRCODE_DISK_FULL;
	if (t->status == 408 || t->status == 429 || t->status >= 500)
		return ERRCODE_CONNECTION_FAILURE;
	return ERRCODE_IO_ERROR;
}

/*
 * Report a failed transfer at elevel (ERROR, or WARNING while undoing an
 * aborted transaction's writes).  Names the storage, method and locator,
 * never a credential.
 */
void
mdd_remote_report_failure(int elevel, RemoteStorage *rs, Transfer *t)
{
	int			sqlstate = mdd_remote_failure_sqlstate(t);
	bool		transient = ERRCODE_TO_CATEGORY(sqlstate) ==
		ERRCODE_TO_CATEGORY(ERRCODE_CONNECTION_FAILURE);

	if (t->code != CURLE_OK)
	{
		const char *why = t->errbuf[0] ? t->errbuf : curl_easy_strerror(t->code);

		if (t->too_large)
			why = "the response is larger than the largest object mdd keeps";
		else if (t->out_of_memory)
			why = "out of memory for the response";
		ereport(elevel,
				(errcode(sqlstate),
				 errmsg("%s %s on storage \"%s\" failed: %s",
						t->method, t->path, rs->name, why),
				 transient ?
				 errhint("The storage may be unreachable or overloaded; the operation can be retried.") : 0));
	}
	else
	{
		char	   *code = rs->s3 ? s3_error_field(t, "Code") : NULL;
		char	   *message = rs->s3 ? s3_error_field(t, "Message") : NULL;

		ereport(elevel,
				(errcode(sqlstate),
				 code ?
				 errmsg("%s %s on storage \"%s\" failed: HTTP status %ld (%s)",
						t->method, t->path, rs->name, t->status, code) :
				 errmsg("%s %s on storage \"%s\" failed: HTTP status %ld",
						t->method, t->path, rs->name, t->status),
				 message ? errdetail("The server says: %s", message) :
				 sqlstate == ERRCODE_UNDEFINED_FILE ? errdetail("The blob does not exist on the server.") :
				 t->status == 409 && strcmp(t->method, "MKCOL") == 0 ?
				 errdetail("The collection above it does not exist: the storage's url must name an existing collection.") : 0,
				 sqlstate == ERRCODE_INSUFFICIENT_PRIVILEGE ?
				 errhint("Check the credentials of storage \"%s\" (mdd.alter_storage).", rs->name) :
				 sqlstate == ERRCODE_DISK_FULL ?
				 errhint("The server has no room left for storage \"%s\".", rs->name) :
				 transient ?
				 errhint("The storage may be unreachable or overloaded; the operation can be retried.") : 0));
	}
}

/*
 * Run a request whose outcome decides the statement: serve an interrupt
 * that stopped it, raise the errors the caller does not handle.
 */
void
mdd_remote_run(RemoteStorage *rs, Transfer *t)
{
	t->interruptible = true;
	t->timeout_ms = rs->timeout_ms;
	mdd_remote_perform(rs, t);
	if (t->interrupted)
	{
		CHECK_FOR_INTERRUPTS();
		ereport(ERROR,
				(errcode(ERRCODE_QUERY_CANCELED),
				 errmsg("%s %s on storage \"%s\" was interrupted",
						t->method, t->path, rs->name)));
	}
}

