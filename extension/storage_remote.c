/*-------------------------------------------------------------------------
 *
 * storage_remote.c
 *	  The "http" and "s3" storage kinds: blobs as resources of a WebDAV
 *	  server or as objects of an S3 bucket, moved with libcurl.
 *
 * A blob lives at a URL made of the storage's options and its locator
 * (see sql/storage.sql for the locators):
 *
 *	http				url + locator ("url" ends in "/")
 *	s3, path style		endpoint/bucket/[prefix/]locator
 *	s3, virtual host	scheme://bucket.host[:port]/[prefix/]locator
 *
 * http speaks plain WebDAV: PUT (creating missing parent collections
 * with MKCOL when the server answers 409 Conflict), GET, HEAD, DELETE,
 * with HTTP basic authentication when the storage has a username.  s3
 * signs every request with AWS Signature Version 4, computed by libcurl
 * (CURLOPT_AWS_SIGV4), and sends the SHA-256 of the body it signs
 * (x-amz-content-sha256) and, with every PUT, its MD5 (Content-MD5), both
 * of which an S3 server checks against the bytes it receives.
 *
 * Credentials travel only in libcurl options, never in a URL, and appear
 * in no message: errors name the storage, the method, the locator and the
 * HTTP status or libcurl's error (whose text may hold the host and port),
 * and from an S3 error document only its Code and Message.
 *
 * Failures carry an SQLSTATE that tells a job runner whether to retry:
 * class 08 for what may pass (no connection, time-out, HTTP 5xx other
 * than 507, 408, 429), 53100 for a full storage (HTTP 507), 42501 for
 * refused credentials (401, 403), 58P01 for a missing blob (404 on GET)
 * and 58030 for any other answer.
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
 * PUTs belong to the transaction that makes them, as far as a remote
 * server allows: the blobs written by a transaction (or subtransaction)
 * that aborts are deleted again, best effort, within a few seconds; a
 * server that cannot be reached then keeps them (a WARNING says so).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "access/htup_details.h"
#include "access/xact.h"
#include "common/base64.h"
#include "common/cryptohash.h"
#include "common/md5.h"
#include "common/sha2.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

/* CURLOPT_AWS_SIGV4 came with libcurl 7.75 */
#if LIBCURL_VERSION_NUM < 0x074b00
#error "mdd needs libcurl 7.75 or later"
#endif

PG_FUNCTION_INFO_V1(mdd_remote_put_sql);
PG_FUNCTION_INFO_V1(mdd_remote_get_sql);
PG_FUNCTION_INFO_V1(mdd_remote_head_sql);
PG_FUNCTION_INFO_V1(mdd_remote_delete_sql);

/* largest blob: what fits in one bytea */
#define MDD_MAX_BLOB_SIZE ((Size) MaxAllocSize - VARHDRSZ)

/* how much of an error response is kept (for the S3 error code) */
#define MDD_ERROR_BODY_MAX 4096

/* default total time-out of a request, and the most a connect may take */
#define MDD_DEFAULT_TIMEOUT_MS 30000L
#define MDD_MAX_CONNECT_TIMEOUT_MS 10000L

/* deleting the blobs of an aborted transaction: per request, in all */
#define MDD_UNDO_TIMEOUT_MS 5000L
#define MDD_UNDO_BUDGET_MS 30000L

/* SHA-256 of no bytes, the payload hash of requests without a body */
#define MDD_EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

/* what a request needs to know of its storage */
typedef struct RemoteStorage
{
	char	   *name;			/* for messages */
	bool		s3;
	char	   *url_prefix;		/* URL of a blob = url_prefix + locator */
	char	   *user;			/* http username or S3 access key id, or NULL */
	char	   *secret;			/* http password or S3 secret access key */
	char	   *sigv4;			/* s3: CURLOPT_AWS_SIGV4 parameter */
	long		timeout_ms;
} RemoteStorage;

/* one request and its outcome */
typedef struct Transfer
{
	const char *method;			/* PUT, GET, HEAD, DELETE, MKCOL */
	const char *path;			/* locator, or a collection for MKCOL */
	const char *body;			/* request body (PUT) */
	size_t		body_len;
	const char *content_md5;	/* base64, PUT only */
	const char *payload_sha256; /* hex, s3 only */
	bool		keep_body;		/* keep the whole response body (GET) */
	bool		interruptible;	/* stop on a pending cancel or termination */
	long		timeout_ms;

	CURLcode	code;
	long		status;
	char	   *buf;			/* response body, after VARHDRSZ bytes */
	size_t		len;
	size_t		cap;
	curl_off_t	announced;		/* Content-Length of the response, or -1 */
	bool		too_large;
	bool		out_of_memory;
	bool		interrupted;
	char		errbuf[CURL_ERROR_SIZE];
} Transfer;

/* a blob written by the current transaction */
typedef struct PendingPut
{
	RemoteStorage *storage;		/* in TopMemoryContext, shared */
	char	   *locator;
	SubTransactionId subid;
} PendingPut;

static CURL *curl = NULL;
static bool callbacks_registered = false;
static List *pending_puts = NIL;	/* of PendingPut *, in TopMemoryContext */
static List *pending_storages = NIL;	/* of RemoteStorage *, the same */

/* ----------------------------------------------------------------------
 * storage options
 * ----------------------------------------------------------------------
 */

/* the value of a top-level key of the options, or NULL */
static JsonbValue *
option_value(Jsonb *options, const char *key)
{
	return getKeyJsonValueFromContainer(&options->root, key, strlen(key), NULL);
}

/* a string option, palloc'ed; NULL when absent or not a string */
static char *
option_string(Jsonb *options, const char *key)
{
	JsonbValue *v = option_value(options, key);

	if (v == NULL || v->type != jbvString)
		return NULL;
	return pnstrdup(v->val.string.val, v->val.string.len);
}

/* a boolean option, or otherwise */
static bool
option_bool(Jsonb *options, const char *key, bool otherwise)
{
	JsonbValue *v = option_value(options, key);

	if (v == NULL || v->type != jbvBool)
		return otherwise;
	return v->val.boolean;
}

/* a number option, or otherwise */
static double
option_number(Jsonb *options, const char *key, double otherwise)
{
	JsonbValue *v = option_value(options, key);

	if (v == NULL || v->type != jbvNumeric)
		return otherwise;
	return DatumGetFloat8(DirectFunctionCall1(numeric_float8,
											  NumericGetDatum(v->val.numeric)));
}

/* a string option the storage cannot do without */
static char *
required_option(Jsonb *options, const char *key, const char *name)
{
	char	   *value = option_string(options, key);

	if (value == NULL || value[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("storage \"%s\" has no option \"%s\"", name, key),
				 errhint("Storages are declared with mdd.add_storage, which checks their options.")));
	return value;
}

/*
 * The remote storage described by a row of mdd.storage.  Its options were
 * checked by mdd.add_storage; this only builds the URL prefix.
 */
static RemoteStorage *
remote_storage(HeapTupleHeader row)
{
	RemoteStorage *rs = palloc0(sizeof(RemoteStorage));
	bool		isnull_name,
				isnull_kind,
				isnull_options;
	Datum		name = GetAttributeByName(row, "name", &isnull_name);
	Datum		kind_d = GetAttributeByName(row, "kind", &isnull_kind);
	Datum		options_d = GetAttributeByName(row, "options", &isnull_options);
	char	   *kind;
	Jsonb	   *options;
	double		timeout;

	if (isnull_name || isnull_kind || isnull_options)
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("storage name, kind and options must not be NULL")));
	rs->name = TextDatumGetCString(name);
	kind = TextDatumGetCString(kind_d);
	options = DatumGetJsonbP(options_d);

	if (strcmp(kind, "http") == 0)
	{
		char	   *url = required_option(options, "url", rs->name);

		rs->url_prefix = url[strlen(url) - 1] == '/' ? url : psprintf("%s/", url);
		rs->user = option_string(options, "username");
		if (rs->user != NULL)
		{
			rs->secret = option_string(options, "password");
			if (rs->secret == NULL)
				rs->secret = "";
		}
	}
	else if (strcmp(kind, "s3") == 0)
	{
		char	   *endpoint = required_option(options, "endpoint", rs->name);
		char	   *bucket = required_option(options, "bucket", rs->name);
		char	   *region = option_string(options, "region");
		char	   *prefix = option_string(options, "prefix");
		char	   *slash_prefix;
		size_t		len = strlen(endpoint);

		rs->s3 = true;
		if (len > 0 && endpoint[len - 1] == '/')
			endpoint[len - 1] = '\0';
		slash_prefix = (prefix != NULL && prefix[0] != '\0') ? psprintf("%s/", prefix) : "";
		if (option_bool(options, "path_style", true))
			rs->url_prefix = psprintf("%s/%s/%s", endpoint, bucket, slash_prefix);
		else
		{
			char	   *host = strstr(endpoint, "://");

			if (host == NULL)
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("option \"endpoint\" of storage \"%s\" has no scheme", rs->name)));
			*host = '\0';
			rs->url_prefix = psprintf("%s://%s.%s/%s", endpoint, bucket, host + 3,
									  slash_prefix);
		}
		rs->user = required_option(options, "access_key_id", rs->name);
		rs->secret = required_option(options, "secret_access_key", rs->name);
		rs->sigv4 = psprintf("aws:amz:%s:s3",
							 (region != NULL && region[0] != '\0') ? region : "us-east-1");
	}
	else
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("storage \"%s\" of kind \"%s\" is not a remote storage",
						rs->name, kind)));

	timeout = option_number(options, "timeout", MDD_DEFAULT_TIMEOUT_MS / 1000.0);
	rs->timeout_ms = (timeout >= 0.001 && timeout <= 86400) ? (long) (timeout * 1000) :
		MDD_DEFAULT_TIMEOUT_MS;
	return rs;
}

/*
 * Locators are made by mdd._locator: refuse anything else that could
 * climb out of the storage's base or need escaping in a URL.
 */
static void
check_locator(RemoteStorage *rs, const char *locator)
{
	const char *p;

	if (locator[0] == '\0' || locator[0] == '/' || strstr(locator, "..") != NULL ||
		strstr(locator, "//") != NULL || strlen(locator) > 1024)
		goto bad;
	for (p = locator; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
			  (*p >= '0' && *p <= '9') || *p == '.' || *p == '_' || *p == '-' ||
			  *p == '/'))
			goto bad;
	return;
bad:
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("invalid blob locator \"%s\" for storage \"%s\"", locator, rs->name)));
}

/* ----------------------------------------------------------------------
 * one request
 * ----------------------------------------------------------------------
 */

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
static void
perform(RemoteStorage *rs, Transfer *t)
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
static bool
status_ok(Transfer *t)
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
static int
failure_sqlstate(Transfer *t)
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
static void
report_failure(int elevel, RemoteStorage *rs, Transfer *t)
{
	int			sqlstate = failure_sqlstate(t);
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
static void
run(RemoteStorage *rs, Transfer *t)
{
	t->interruptible = true;
	t->timeout_ms = rs->timeout_ms;
	perform(rs, t);
	if (t->interrupted)
	{
		CHECK_FOR_INTERRUPTS();
		ereport(ERROR,
				(errcode(ERRCODE_QUERY_CANCELED),
				 errmsg("%s %s on storage \"%s\" was interrupted",
						t->method, t->path, rs->name)));
	}
}

/* ----------------------------------------------------------------------
 * undoing the writes of an aborted transaction
 * ----------------------------------------------------------------------
 */

/* a copy in TopMemoryContext (NULL stays NULL) */
static char *
top_strdup(const char *s)
{
	return s ? MemoryContextStrdup(TopMemoryContext, s) : NULL;
}

/* equal strings, or both NULL */
static bool
same_string(const char *a, const char *b)
{
	return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* a long-lived copy of rs, shared by the pending blobs of one storage */
static RemoteStorage *
pending_storage(RemoteStorage *rs)
{
	ListCell   *lc;
	RemoteStorage *c;
	MemoryContext old;

	foreach(lc, pending_storages)
	{
		c = (RemoteStorage *) lfirst(lc);
		if (strcmp(c->name, rs->name) == 0 && strcmp(c->url_prefix, rs->url_prefix) == 0 &&
			same_string(c->user, rs->user) && same_string(c->secret, rs->secret) &&
			same_string(c->sigv4, rs->sigv4))
			return c;
	}
	c = MemoryContextAlloc(TopMemoryContext, sizeof(RemoteStorage));
	c->name = top_strdup(rs->name);
	c->s3 = rs->s3;
	c->url_prefix = top_strdup(rs->url_prefix);
	c->user = top_strdup(rs->user);
	c->secret = top_strdup(rs->secret);
	c->sigv4 = top_strdup(rs->sigv4);
	c->timeout_ms = rs->timeout_ms;
	old = MemoryContextSwitchTo(TopMemoryContext);
	pending_storages = lappend(pending_storages, c);
	MemoryContextSwitchTo(old);
	return c;
}

/* note a blob written by the current (sub)transaction */
static void
remember_put(RemoteStorage *rs, const char *locator)
{
	PendingPut *p = MemoryContextAlloc(TopMemoryContext, sizeof(PendingPut));
	MemoryContext old;

	p->storage = pending_storage(rs);
	p->locator = top_strdup(locator);
	p->subid = GetCurrentSubTransactionId();
	old = MemoryContextSwitchTo(TopMemoryContext);
	pending_puts = lappend(pending_puts, p);
	MemoryContextSwitchTo(old);
}

/* forget every pending blob, at the end of the transaction */
static void
forget_all(void)
{
	ListCell   *lc;

	foreach(lc, pending_puts)
	{
		PendingPut *p = (PendingPut *) lfirst(lc);

		pfree(p->locator);
		pfree(p);
	}
	list_free(pending_puts);
	pending_puts = NIL;
	foreach(lc, pending_storages)
	{
		RemoteStorage *c = (RemoteStorage *) lfirst(lc);

		pfree(c->name);
		pfree(c->url_prefix);
		if (c->user)
			pfree(c->user);
		if (c->secret)
		{
			memset(c->secret, 0, strlen(c->secret));
			pfree(c->secret);
		}
		if (c->sigv4)
			pfree(c->sigv4);
		pfree(c);
	}
	list_free(pending_storages);
	pending_storages = NIL;
}

/*
 * Delete the blobs written by the aborting (sub)transaction.  Best effort
 * and bounded in time: a storage that cannot be reached is given up after
 * its first failure, and everything after MDD_UNDO_BUDGET_MS.
 */
static void
undo_puts(SubTransactionId subid, bool all)
{
	TimestampTz start = GetCurrentTimestamp();
	List	   *unreachable = NIL;
	int			left = 0;
	ListCell   *lc;

	foreach(lc, pending_puts)
	{
		PendingPut *p = (PendingPut *) lfirst(lc);
		Transfer	t;

		if (!all && p->subid != subid)
			continue;
		pending_puts = foreach_delete_current(pending_puts, lc);

		if (list_member_ptr(unreachable, p->storage) ||
			TimestampDifferenceExceeds(start, GetCurrentTimestamp(), MDD_UNDO_BUDGET_MS))
			left++;
		else
		{
			memset(&t, 0, sizeof(t));
			t.method = "DELETE";
			t.path = p->locator;
			t.interruptible = false;
			t.timeout_ms = Min(p->storage->timeout_ms, MDD_UNDO_TIMEOUT_MS);
			perform(p->storage, &t);
			if (!status_ok(&t) && !(t.code == CURLE_OK && t.status == 404))
			{
				report_failure(WARNING, p->storage, &t);
				if (ERRCODE_TO_CATEGORY(failure_sqlstate(&t)) ==
					ERRCODE_TO_CATEGORY(ERRCODE_CONNECTION_FAILURE))
					unreachable = lappend(unreachable, p->storage);
			}
			if (t.buf)
				pfree(t.buf);
		}
		pfree(p->locator);
		pfree(p);
	}
	if (left > 0)
		ereport(WARNING,
				(errcode(ERRCODE_WARNING),
				 errmsg("%d blobs written by an aborted transaction stay on remote storages", left),
				 errdetail("No present copy refers to them; a copy still recorded as being written is cleaned up with its job or at a runner's start.")));
	list_free(unreachable);
}

/* end of transaction: forget the blobs written (commit) or delete them (abort) */
static void
remote_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_PREPARE:
			if (pending_puts != NIL)
				ereport(ERROR,
						(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
						 errmsg("cannot PREPARE a transaction that wrote to a remote storage")));
			break;
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_PREPARE:
			forget_all();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			undo_puts(InvalidSubTransactionId, true);
			forget_all();
			break;
		default:
			break;
	}
}

/* end of subtransaction: hand its blobs to the parent, or delete them */
static void
remote_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
						SubTransactionId parentSubid, void *arg)
{
	ListCell   *lc;

	if (event == SUBXACT_EVENT_ABORT_SUB)
		undo_puts(mySubid, false);
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		foreach(lc, pending_puts)
		{
			PendingPut *p = (PendingPut *) lfirst(lc);

			if (p->subid == mySubid)
				p->subid = parentSubid;
		}
}

/* ----------------------------------------------------------------------
 * the SQL functions
 * ----------------------------------------------------------------------
 */

/* the storage row and locator arguments, checked */
static RemoteStorage *
storage_and_locator(FunctionCallInfo fcinfo, char **locator)
{
	RemoteStorage *rs;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("storage and locator must not be NULL")));
	rs = remote_storage(PG_GETARG_HEAPTUPLEHEADER(0));
	*locator = text_to_cstring(PG_GETARG_TEXT_PP(1));
	check_locator(rs, *locator);
	return rs;
}

/* WebDAV: create the collections above locator, from the top down */
static void
make_collections(RemoteStorage *rs, const char *locator)
{
	const char *slash;

	for (slash = strchr(locator, '/'); slash != NULL; slash = strchr(slash + 1, '/'))
	{
		Transfer	t;

		memset(&t, 0, sizeof(t));
		t.method = "MKCOL";
		t.path = pnstrdup(locator, slash - locator + 1);
		run(rs, &t);
		/* 405: the collection exists already */
		if (!status_ok(&t) && !(t.code == CURLE_OK && t.status == 405))
			report_failure(ERROR, rs, &t);
	}
}

/*
 * mdd._remote_put(s mdd.storage, locator text, data bytea,
 *				   content_md5 bytea DEFAULT NULL) RETURNS bigint
 *
 * Write a blob of an http or s3 storage; returns its size.  The request
 * carries the MD5 of data (Content-MD5), or content_md5 when given: a
 * test hook that shows the server checks it.  If the transaction aborts,
 * the blob is deleted again.
 */
Datum
mdd_remote_put_sql(PG_FUNCTION_ARGS)
{
	char	   *locator;
	RemoteStorage *rs = storage_and_locator(fcinfo, &locator);
	bytea	   *data;
	uint8		md5[MD5_DIGEST_LENGTH];
	const char *md5_bytes = (const char *) md5;
	char		md5_b64[64];
	char		sha_hex[PG_SHA256_DIGEST_STRING_LENGTH];
	const char *errstr = NULL;
	Transfer	t;
	int			n;

	if (PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("data must not be NULL")));
	data = PG_GETARG_BYTEA_PP(2);

	if (!PG_ARGISNULL(3))
	{
		bytea	   *given = PG_GETARG_BYTEA_PP(3);

		if (VARSIZE_ANY_EXHDR(given) != MD5_DIGEST_LENGTH)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("content_md5 must be %d bytes", MD5_DIGEST_LENGTH)));
		md5_bytes = VARDATA_ANY(given);
	}
	else if (!pg_md5_binary(VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data), md5, &errstr))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not compute the MD5 of a blob: %s", errstr)));
	n = pg_b64_encode(md5_bytes, MD5_DIGEST_LENGTH, md5_b64, sizeof(md5_b64) - 1);
	if (n < 0)
		elog(ERROR, "could not encode an MD5 digest in base64");
	md5_b64[n] = '\0';

	memset(&t, 0, sizeof(t));
	if (rs->s3)
	{
		pg_cryptohash_ctx *ctx = pg_cryptohash_create(PG_SHA256);
		uint8		sha[PG_SHA256_DIGEST_LENGTH];

		if (ctx == NULL || pg_cryptohash_init(ctx) < 0 ||
			pg_cryptohash_update(ctx, (const uint8 *) VARDATA_ANY(data),
								 VARSIZE_ANY_EXHDR(data)) < 0 ||
			pg_cryptohash_final(ctx, sha, sizeof(sha)) < 0)
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("could not compute the SHA-256 of a blob: %s",
							pg_cryptohash_error(ctx))));
		pg_cryptohash_free(ctx);
		hex_encode((const char *) sha, sizeof(sha), sha_hex);
		sha_hex[PG_SHA256_DIGEST_LENGTH * 2] = '\0';
		t.payload_sha256 = sha_hex;
	}

	t.method = "PUT";
	t.path = locator;
	t.body = VARDATA_ANY(data);
	t.body_len = VARSIZE_ANY_EXHDR(data);
	t.content_md5 = md5_b64;
	run(rs, &t);
	if (!rs->s3 && t.code == CURLE_OK && t.status == 409 && strchr(locator, '/') != NULL)
	{
		/* a WebDAV server that does not create parent collections itself */
		make_collections(rs, locator);
		run(rs, &t);
	}
	if (!status_ok(&t))
		report_failure(ERROR, rs, &t);

	if (!callbacks_registered)
	{
		RegisterXactCallback(remote_xact_callback, NULL);
		RegisterSubXactCallback(remote_subxact_callback, NULL);
		callbacks_registered = true;
	}
	remember_put(rs, locator);
	PG_RETURN_INT64((int64) VARSIZE_ANY_EXHDR(data));
}

/*
 * mdd._remote_get(s mdd.storage, locator text) RETURNS bytea
 *
 * The bytes of a blob as stored (compressed blobs are not decompressed
 * here).  A missing blob is an error (58P01).
 */
Datum
mdd_remote_get_sql(PG_FUNCTION_ARGS)
{
	char	   *locator;
	RemoteStorage *rs = storage_and_locator(fcinfo, &locator);
	Transfer	t;
	bytea	   *result;

	memset(&t, 0, sizeof(t));
	t.method = "GET";
	t.path = locator;
	t.keep_body = true;
	run(rs, &t);
	if (!status_ok(&t))
		report_failure(ERROR, rs, &t);
	result = (bytea *) (t.buf ? t.buf : palloc(VARHDRSZ));
	SET_VARSIZE(result, VARHDRSZ + t.len);
	PG_RETURN_BYTEA_P(result);
}

/*
 * mdd._remote_head(s mdd.storage, locator text) RETURNS bigint
 *
 * The stored size of a blob (as the server gives it in Content-Length,
 * -1 if it gives none), or NULL when the blob does not exist.
 */
Datum
mdd_remote_head_sql(PG_FUNCTION_ARGS)
{
	char	   *locator;
	RemoteStorage *rs = storage_and_locator(fcinfo, &locator);
	Transfer	t;

	memset(&t, 0, sizeof(t));
	t.method = "HEAD";
	t.path = locator;
	run(rs, &t);
	if (t.code == CURLE_OK && t.status == 404)
		PG_RETURN_NULL();
	if (!status_ok(&t))
		report_failure(ERROR, rs, &t);
	PG_RETURN_INT64((int64) t.announced);
}

/*
 * mdd._remote_delete(s mdd.storage, locator text) RETURNS boolean
 *
 * Delete a blob: true if it existed, false if there was nothing to
 * delete.  S3 answers a DELETE the same whether the object existed or
 * not, so an s3 storage asks with HEAD first.
 */
Datum
mdd_remote_delete_sql(PG_FUNCTION_ARGS)
{
	char	   *locator;
	RemoteStorage *rs = storage_and_locator(fcinfo, &locator);
	Transfer	t;

	memset(&t, 0, sizeof(t));
	if (rs->s3)
	{
		t.method = "HEAD";
		t.path = locator;
		run(rs, &t);
		if (t.code == CURLE_OK && t.status == 404)
			PG_RETURN_BOOL(false);
		if (!status_ok(&t))
			report_failure(ERROR, rs, &t);
	}
	t.method = "DELETE";
	t.path = locator;
	run(rs, &t);
	if (t.code == CURLE_OK && t.status == 404)
		PG_RETURN_BOOL(false);
	if (!status_ok(&t))
		report_failure(ERROR, rs, &t);
	PG_RETURN_BOOL(true);
}
