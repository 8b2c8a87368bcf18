/*-------------------------------------------------------------------------
 *
 * remote.h
 *	  What the files of the "http" and "s3" storage kinds share: the
 *	  description of a storage, one request and its outcome, and the
 *	  functions that run requests (remote_transfer.c) and undo the writes
 *	  of aborted transactions (remote_undo.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_REMOTE_H
#define MDD_REMOTE_H

#include "postgres.h"

#include <curl/curl.h>

/* CURLOPT_AWS_SIGV4 came with libcurl 7.75 */
#if LIBCURL_VERSION_NUM < 0x074b00
#error "mdd needs libcurl 7.75 or later"
#endif

/* largest blob: what fits in one bytea */
#define MDD_MAX_BLOB_SIZE ((Size) MaxAllocSize - VARHDRSZ)

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

/* remote_transfer.c */
extern void mdd_remote_perform(RemoteStorage *rs, Transfer *t);
extern void mdd_remote_run(RemoteStorage *rs, Transfer *t);
extern bool mdd_remote_status_ok(Transfer *t);
extern int	mdd_remote_failure_sqlstate(Transfer *t);
extern void mdd_remote_report_failure(int elevel, RemoteStorage *rs, Transfer *t);

/* remote_undo.c */
extern void mdd_remote_remember_put(RemoteStorage *rs, const char *locator);

#endif							/* MDD_REMOTE_H */
