/*-------------------------------------------------------------------------
 *
 * dicomweb_stow.c
 *	  STOW-RS (PS3.18 10.5): POST /dicomweb/studies[/{study}] with a
 *	  multipart/related; type="application/dicom" body.  The body is split
 *	  into parts by a parser of our own, with bounds (parts, part header
 *	  size; the body itself is bounded by mdd.http_max_body), all of it
 *	  before anything is stored: a body that is not well-formed multipart is
 *	  refused whole (400) and nothing is stored.  Each part is then stored
 *	  through mdd.store, the path of C-STORE, in a subtransaction of its
 *	  own; the answer lists the stored instances (ReferencedSOPSequence)
 *	  and the failed ones with a FailureReason (FailedSOPSequence).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "lib/stringinfo.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/resowner.h"

#include "dicomweb.h"

#define STOW_MAX_PARTS 10000
#define STOW_MAX_PART_HEADER 8192

/* FailureReason values (PS3.18 Table 10.5.3-3, PS3.4 C.4.2.1.4) */
#define FAILURE_PROCESSING 0x0110	/* processing failure */
#define FAILURE_DUPLICATE 0x0111	/* a different object with this SOP Instance UID */
#define FAILURE_RESOURCES 0xA700	/* out of resources */
#define FAILURE_MISMATCH 0xA900 /* data set does not match: other study */
#define FAILURE_UNREADABLE 0xC000	/* cannot understand */

typedef struct StowPart
{
	const char *data;
	size_t		len;
	char	   *type;			/* Content-Type of the part, or NULL */
} StowPart;

static void
bad_request(MddHttpRequest *req, int status, const char *msg)
{
	req->error_status = status;
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("%s", msg),
			 errdetail("Nothing was stored.")));
}

/* the value of parameter name of a Content-Type, unquoted; NULL if absent */
static char *
type_parameter(const char *ctype, const char *name)
{
	const char *p = ctype;
	size_t		nl = strlen(name);

	while ((p = strchr(p, ';')) != NULL)
	{
		p++;
		while (*p == ' ' || *p == '\t')
			p++;
		if (pg_strncasecmp(p, name, nl) == 0 && p[nl] == '=')
		{
			const char *v = p + nl + 1;

			if (*v == '"')
			{
				const char *e = strchr(v + 1, '"');

				return e ? pnstrdup(v + 1, e - v - 1) : NULL;
			}
			return pnstrdup(v, strcspn(v, "; \t"));
		}
	}
	return NULL;
}

static const char *
find_bytes(const char *hay, size_t hlen, const char *needle, size_t nlen)
{
	if (nlen == 0 || hlen < nlen)
		return NULL;
	for (const char *p = hay; (p = memchr(p, needle[0], hlen - (p - hay) - nlen + 1)) != NULL; p++)
	{
		if (memcmp(p, needle, nlen) == 0)
			return p;
		if ((size_t) (p - hay) + nlen >= hlen)
			break;
	}
	return NULL;
}

/*
 * Split body into its parts (RFC 2046): a preamble, "--boundary" CRLF,
 * each part's headers, CRLF CRLF, its data up to CRLF "--boundary", and
 * "--boundary--" after the last.  Anything else: 400.
 */
static List *
split_parts(MddHttpRequest *req, const char *body, size_t len, const char *boundary)
{
	char	   *delim = psprintf("--%s", boundary);
	char	   *inner = psprintf("\r\n--%s", boundary);
	size_t		dl = strlen(delim);
	const char *end = body + len;
	const char *p;
	List	   *parts = NIL;

	if (len >= dl && memcmp(body, delim, dl) == 0)
		p = body + dl;
	else
	{
		p = find_bytes(body, len, inner, dl + 2);
		if (p == NULL)
			bad_request(req, 400, "the multipart body has no part with its boundary");
		p += dl + 2;
	}
	for (;;)
	{
		const char *hend;
		const char *next;
		StowPart   *part;

		CHECK_FOR_INTERRUPTS();
		if (end - p >= 2 && p[0] == '-' && p[1] == '-')
			break;				/* the closing delimiter */
		/* transport padding, then CRLF */
		while (p < end && (*p == ' ' || *p == '\t'))
			p++;
		if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
			bad_request(req, 400, "a multipart boundary is not followed by CRLF");
		p += 2;
		hend = find_bytes(p, Min((size_t) (end - p), STOW_MAX_PART_HEADER + 4), "\r\n\r\n", 4);
		if (p < end - 1 && p[0] == '\r' && p[1] == '\n')
			hend = p - 2;		/* a part without headers */
		if (hend == NULL)
			bad_request(req, 400, "a part's headers are unterminated or longer than 8 kB");
		next = find_bytes(hend + 4, end - (hend + 4), inner, dl + 2);
		if (next == NULL)
			bad_request(req, 400, "the multipart body ends inside a part (no closing boundary)");
		if (list_length(parts) >= STOW_MAX_PARTS)
			bad_request(req, 413, "more than 10000 parts in one store request");
		part = palloc0(sizeof(StowPart));
		part->data = hend + 4;
		part->len = next - (hend + 4);
		/* the part's Content-Type */
		for (const char *h = p; h < hend;)
		{
			const char *eol = find_bytes(h, hend + 2 - h, "\r\n", 2);
			size_t		hl = eol ? (size_t) (eol - h) : (size_t) (hend - h);

			if (hl > 13 && pg_strncasecmp(h, "Content-Type:", 13) == 0)
			{
				const char *v = h + 13;

				while (*v == ' ' || *v == '\t')
					v++;
				part->type = pnstrdup(v, hl - (v - h));
			}
			h += hl + 2;
		}
		parts = lappend(parts, part);
		p = next + dl + 2;
	}
	if (parts == NIL)
		bad_request(req, 400, "the multipart body has no part");
	return parts;
}

static void
json_uid(StringInfo out, const char *tag, const char *uid)
{
	appendStringInfo(out, "\"%s\": {\"vr\": \"UI\"", tag);
	if (uid && uid[0])
	{
		appendStringInfoString(out, ", \"Value\": [");
		escape_json(out, uid);
		appendStringInfoChar(out, ']');
	}
	appendStringInfoChar(out, '}');
}

/*
 * Store one part in a subtransaction; on failure, *reason and *message
 * say why.  class_uid/instance_uid receive what the part's header says
 * (when readable), study_uid its study.
 */
static bool
store_part(MddHttpRequest *req, StowPart *part, const char *study, char **class_uid,
		   char **instance_uid, char **study_uid, char **series_uid, int *reason, char **message)
{
	MemoryContext oldcontext = CurrentMemoryContext;
	ResourceOwner oldowner = CurrentResourceOwner;
	bytea	   *data = palloc(VARHDRSZ + part->len);
	Oid			types[1] = {BYTEAOID};
	Datum		args[1];
	volatile int step = 0;
	bool		ok = false;

	SET_VARSIZE(data, VARHDRSZ + part->len);
	memcpy(VARDATA(data), part->data, part->len);
	args[0] = PointerGetDatum(data);
	*class_uid = *instance_uid = *study_uid = *series_uid = NULL;

	if (part->type && pg_strncasecmp(part->type, "application/dicom", 17) != 0)
	{
		*reason = FAILURE_UNREADABLE;
		*message = psprintf("part of type %s: only application/dicom is stored", part->type);
		return false;
	}

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(oldcontext);
	PG_TRY();
	{
		if (SPI_execute_with_args("SELECT p->>'sop_class_uid', p->>'sop_instance_uid', "
								  "p->>'study_instance_uid', p->>'series_instance_uid' FROM mdd.parse($1) p",
								  1, types, args, NULL, true, 1) != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "could not read the part");
		{
			MemoryContext spi = MemoryContextSwitchTo(oldcontext);
			char	   *v;

			v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
			*class_uid = v ? pstrdup(v) : NULL;
			v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
			*instance_uid = v ? pstrdup(v) : NULL;
			v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3);
			*study_uid = v ? pstrdup(v) : NULL;
			v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 4);
			*series_uid = v ? pstrdup(v) : NULL;
			MemoryContextSwitchTo(spi);
		}
		step = 1;
		if (study && (*study_uid == NULL || strcmp(*study_uid, study) != 0))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("the instance belongs to study %s, not %s",
							*study_uid ? *study_uid : "(none)", study)));
		step = 2;
		if (SPI_execute_with_args("SELECT mdd.store($1, 'dicomweb')", 1, types, args, NULL,
								  false, 1) != SPI_OK_SELECT || SPI_processed != 1)
			elog(ERROR, "could not store the part");
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		ok = true;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(oldcontext);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(oldcontext);
		CurrentResourceOwner = oldowner;
		/* a query cancel or shutdown is not one part's failure */
		if (edata->sqlerrcode == ERRCODE_QUERY_CANCELED ||
			edata->sqlerrcode == ERRCODE_ADMIN_SHUTDOWN)
			ReThrowError(edata);
		*message = pstrdup(edata->message);
		if (step == 0)
			*reason = FAILURE_UNREADABLE;
		else if (step == 1)
			*reason = FAILURE_MISMATCH;
		else if (edata->sqlerrcode == ERRCODE_UNIQUE_VIOLATION)
			*reason = FAILURE_DUPLICATE;
		else if (ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_INSUFFICIENT_RESOURCES ||
				 ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_PROGRAM_LIMIT_EXCEEDED)
			*reason = FAILURE_RESOURCES;
		else if (ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_DATA_EXCEPTION)
			*reason = FAILURE_UNREADABLE;
		else
			*reason = FAILURE_PROCESSING;
		FreeErrorData(edata);
	}
	PG_END_TRY();
	pfree(data);
	return ok;
}

void
mdd_dicomweb_store(MddHttpRequest *req, const char *study)
{
	const char *ctype = mdd_http_header(req, "Content-Type");
	char	   *boundary;
	char	   *type;
	List	   *parts;
	ListCell   *lc;
	StringInfoData stored;
	StringInfoData failed;
	StringInfoData out;
	int			nstored = 0;
	int			nfailed = 0;
	char	   *root = mdd_dicomweb_root(req);
	char	   *answer_study = NULL;

	if (ctype == NULL || pg_strncasecmp(ctype, "multipart/related", 17) != 0)
	{
		req->error_status = 415;
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("a store request must be multipart/related; type=\"application/dicom\", not %s",
						ctype ? ctype : "without a Content-Type"),
				 errdetail("Nothing was stored.")));
	}
	type = type_parameter(ctype, "type");
	if (type && pg_strcasecmp(type, "application/dicom") != 0)
	{
		req->error_status = 415;
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("parts of type %s are not stored: mdd takes application/dicom", type),
				 errdetail("Nothing was stored.")));
	}
	boundary = type_parameter(ctype, "boundary");
	if (boundary == NULL || boundary[0] == '\0' || strlen(boundary) > 200)
		bad_request(req, 400, psprintf("the multipart Content-Type has no valid boundary parameter: %s",
									   ctype));

	parts = split_parts(req, req->body, req->body_len, boundary);

	initStringInfo(&stored);
	initStringInfo(&failed);
	foreach(lc, parts)
	{
		StowPart   *part = lfirst(lc);
		char	   *cls,
				   *inst,
				   *stu,
				   *ser,
				   *message = NULL;
		int			reason = 0;

		CHECK_FOR_INTERRUPTS();
		if (store_part(req, part, study, &cls, &inst, &stu, &ser, &reason, &message))
		{
			if (nstored++ > 0)
				appendStringInfoString(&stored, ", ");
			appendStringInfoChar(&stored, '{');
			json_uid(&stored, "00081150", cls);
			appendStringInfoString(&stored, ", ");
			json_uid(&stored, "00081155", inst);
			appendStringInfoString(&stored, ", \"00081190\": {\"vr\": \"UR\", \"Value\": [");
			escape_json(&stored, psprintf("%s/studies/%s/series/%s/instances/%s", root, stu,
										  ser, inst));
			appendStringInfoString(&stored, "]}}");
			if (answer_study == NULL)
				answer_study = stu;
		}
		else
		{
			if (nfailed++ > 0)
				appendStringInfoString(&failed, ", ");
			appendStringInfoChar(&failed, '{');
			json_uid(&failed, "00081150", cls);
			appendStringInfoString(&failed, ", ");
			json_uid(&failed, "00081155", inst);
			appendStringInfo(&failed, ", \"00081197\": {\"vr\": \"US\", \"Value\": [%d]}", reason);
			/* the reason in words: Error Comment (0000,0902) is not in data sets; use TextValue */
			appendStringInfoString(&failed, ", \"0040A160\": {\"vr\": \"UT\", \"Value\": [");
			escape_json(&failed, message ? message : "");
			appendStringInfoString(&failed, "]}}");
		}
	}

	initStringInfo(&out);
	appendStringInfoChar(&out, '{');
	if (study || answer_study)
	{
		appendStringInfoString(&out, "\"00081190\": {\"vr\": \"UR\", \"Value\": [");
		escape_json(&out, psprintf("%s/studies/%s", root, study ? study : answer_study));
		appendStringInfoString(&out, "]}");
	}
	if (nfailed > 0)
		appendStringInfo(&out, "%s\"00081198\": {\"vr\": \"SQ\", \"Value\": [%s]}",
						 out.len > 1 ? ", " : "", failed.data);
	if (nstored > 0)
		appendStringInfo(&out, "%s\"00081199\": {\"vr\": \"SQ\", \"Value\": [%s]}",
						 out.len > 1 ? ", " : "", stored.data);
	appendStringInfoChar(&out, '}');
	mdd_http_reply(req, nfailed == 0 ? 200 : nstored == 0 ? 409 : 202,
				   "application/dicom+json", out.data, out.len);
	mdd_http_add_header(req, "Cache-Control", "no-store");
}
