/*-------------------------------------------------------------------------
 *
 * storage_remote.c
 *	  The "http" and "s3" storage kinds: blobs as resources of a WebDAV
 *	  server or as objects of an S3 bucket; their options and the SQL
 *	  functions mdd._remote_put/get/head/delete.  Requests are run by
 *	  remote_transfer.c, aborted writes undone by remote_undo.c.
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
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
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

#include "remote.h"

PG_FUNCTION_INFO_V1(mdd_remote_put_sql);
PG_FUNCTION_INFO_V1(mdd_remote_get_sql);
PG_FUNCTION_INFO_V1(mdd_remote_head_sql);
PG_FUNCTION_INFO_V1(mdd_remote_delete_sql);

/* default total time-out of a request */
#define MDD_DEFAULT_TIMEOUT_MS 30000L

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
		mdd_remote_run(rs, &t);
		/* 405: the collection exists already */
		if (!mdd_remote_status_ok(&t) && !(t.code == CURLE_OK && t.status == 405))
			mdd_remote_report_failure(ERROR, rs, &t);
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
	mdd_remote_run(rs, &t);
	if (!rs->s3 && t.code == CURLE_OK && t.status == 409 && strchr(locator, '/') != NULL)
	{
		/* a WebDAV server that does not create parent collections itself */
		make_collections(rs, locator);
		mdd_remote_run(rs, &t);
	}
	if (!mdd_remote_status_ok(&t))
		mdd_remote_report_failure(ERROR, rs, &t);

	mdd_remote_remember_put(rs, locator);
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
	mdd_remote_run(rs, &t);
	if (!mdd_remote_status_ok(&t))
		mdd_remote_report_failure(ERROR, rs, &t);
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
	mdd_remote_run(rs, &t);
	if (t.code == CURLE_OK && t.status == 404)
		PG_RETURN_NULL();
	if (!mdd_remote_status_ok(&t))
		mdd_remote_report_failure(ERROR, rs, &t);
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
		mdd_remote_run(rs, &t);
		if (t.code == CURLE_OK && t.status == 404)
			PG_RETURN_BOOL(false);
		if (!mdd_remote_status_ok(&t))
			mdd_remote_report_failure(ERROR, rs, &t);
	}
	t.method = "DELETE";
	t.path = locator;
	mdd_remote_run(rs, &t);
	if (t.code == CURLE_OK && t.status == 404)
		PG_RETURN_BOOL(false);
	if (!mdd_remote_status_ok(&t))
		mdd_remote_report_failure(ERROR, rs, &t);
	PG_RETURN_BOOL(true);
}
