/*-------------------------------------------------------------------------
 *
 * dicomweb_wado.c
 *	  WADO-RS (PS3.18 10.4): instances, series and studies as
 *	  multipart/related application/dicom bodies holding the exact stored
 *	  bytes (mdd.read, whatever tier holds them), streamed one object at a
 *	  time; metadata as DICOM JSON; frames of uncompressed images and bulk
 *	  values as multipart/related application/octet-stream.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "lib/stringinfo.h"
#include "access/detoast.h"
#include "utils/builtins.h"

#include "dicomweb.h"
#include "../extension/dicom.h"

#define INSTANCES_SQL \
	"SELECT object_id, size, transfer_syntax_uid, series_instance_uid, sop_instance_uid " \
	"FROM mdd.dicom_instances($1, $2, $3)"

/* a read transaction of a streamed retrieval takes objects up to this size */
#define WADO_BATCH_BYTES (16 * 1024 * 1024)

typedef struct WadoObject
{
	int64		id;
	int64		size;
	char	   *series;
	char	   *instance;
} WadoObject;

/* a streamed multipart body of objects */
typedef struct WadoStream
{
	WadoObject *objects;
	int			count;
	int			next;			/* the next object to read */
	char	   *boundary;
	char	   *buf;			/* the current part: header and bytes */
	size_t		buf_len;
	size_t		buf_pos;
	bool		closed;			/* the closing delimiter was written */
} WadoStream;

bytea *
mdd_dicomweb_read_object(int64 id)
{
	Oid			types[1] = {INT8OID};
	Datum		args[1] = {Int64GetDatum(id)};
	bool		isnull;
	Datum		d;

	if (SPI_execute_with_args("SELECT mdd.read($1)", 1, types, args, NULL, false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "could not read object " INT64_FORMAT, id);
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		elog(ERROR, "object " INT64_FORMAT " read as NULL", id);
	return DatumGetByteaPCopy(d);
}

static char *
part_header(const char *boundary, const char *type)
{
	return psprintf("\r\n--%s\r\nContent-Type: %s\r\n\r\n", boundary, type);
}

static char *
new_boundary(void)
{
	return psprintf("mdd-%08x%08x", (unsigned) random(), (unsigned) random());
}

/*
 * Read the next objects of the stream into its buffer, as many as make
 * WADO_BATCH_BYTES (at least one), with one query: each read call runs in
 * a transaction of its own, and the audit rows of the reads commit with
 * it, so a batch costs one commit instead of one per object.
 */
static void
wado_fill(WadoStream *s)
{
	MemoryContext m = GetMemoryChunkContext(s);
	StringInfoData ids;
	int			first = s->next;
	int64		bytes = 0;
	size_t		need = 0;
	char	   *out;
	Oid			types[1] = {TEXTOID};
	Datum		args[1];

	initStringInfo(&ids);
	appendStringInfoChar(&ids, '{');
	while (s->next < s->count && (s->next == first || bytes + s->objects[s->next].size <= WADO_BATCH_BYTES))
	{
		if (s->next > first)
			appendStringInfoChar(&ids, ',');
		appendStringInfo(&ids, INT64_FORMAT, s->objects[s->next].id);
		bytes += s->objects[s->next].size;
		s->next++;
	}
	appendStringInfoChar(&ids, '}');
	args[0] = CStringGetTextDatum(ids.data);
	if (SPI_execute_with_args("SELECT mdd.read(i) FROM unnest($1::bigint[]) WITH ORDINALITY AS x(i, n) ORDER BY n",
							  1, types, args, NULL, false, 0) != SPI_OK_SELECT ||
		SPI_processed != (uint64) (s->next - first))
		elog(ERROR, "could not read objects %s", ids.data);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		Datum		d = SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull);

		if (isnull)
			elog(ERROR, "an object of %s read as NULL", ids.data);
		need += strlen(s->boundary) + 48 + toast_raw_datum_size(d);
	}
	out = MemoryContextAlloc(m, need + 1);
	s->buf_len = 0;
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		bool		isnull;
		bytea	   *data = DatumGetByteaPP(SPI_getbinval(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 1, &isnull));
		char	   *head = part_header(s->boundary, "application/dicom");
		size_t		hl;

		if (first + r == 0)
			head += 2;			/* the body starts with the first delimiter */
		hl = strlen(head);
		memcpy(out + s->buf_len, head, hl);
		memcpy(out + s->buf_len + hl, VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data));
		s->buf_len += hl + VARSIZE_ANY_EXHDR(data);
	}
	s->buf = out;
	s->buf_pos = 0;
}

static size_t
wado_read(void *ctx, uint64 pos, char *out, size_t max, bool *end)
{
	WadoStream *s = ctx;
	size_t		n;

	if (s->buf == NULL || s->buf_pos == s->buf_len)
	{
		if (s->buf)
		{
			pfree(s->buf);
			s->buf = NULL;
		}
		if (s->next < s->count)
			wado_fill(s);
		else
		{
			MemoryContext old;
			char	   *tail = psprintf("\r\n--%s--\r\n", s->boundary);

			if (s->closed)
			{
				*end = true;
				return 0;
			}
			old = MemoryContextSwitchTo(GetMemoryChunkContext(s));
			s->buf = pstrdup(tail);
			s->buf_len = strlen(tail);
			MemoryContextSwitchTo(old);
			s->closed = true;
			s->buf_pos = 0;
		}
	}
	n = Min(max, s->buf_len - s->buf_pos);
	memcpy(out, s->buf + s->buf_pos, n);
	s->buf_pos += n;
	if (s->closed && s->buf_pos == s->buf_len)
		*end = true;
	return n;
}

/* 406 unless the Accept header allows type (in multipart/related or alone) */
static void
check_accept(MddHttpRequest *req, const char *type, bool multipart)
{
	const char *accept = mdd_http_header(req, "Accept");

	if (accept == NULL || strstr(accept, "*/*") || strstr(accept, type))
		return;
	if (multipart && strstr(accept, "multipart/related") && strstr(accept, "type=") == NULL)
		return;
	req->error_status = 406;
	ereport(ERROR,
			(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
			 errmsg("this resource is served as %s%s, which the Accept header (%s) does not allow",
					multipart ? "multipart/related; type=" : "", type, accept)));
}

static void
metadata(MddHttpRequest *req, const DicomwebTarget *t, WadoObject *objs, int count)
{
	StringInfoData out;
	char	   *root = mdd_dicomweb_root(req);

	check_accept(req, "application/dicom+json", false);
	initStringInfo(&out);
	appendStringInfoChar(&out, '[');
	for (int i = 0; i < count; i++)
	{
		bytea	   *data = mdd_dicomweb_read_object(objs[i].id);
		char	   *prefix = psprintf("%s/studies/%s/series/%s/instances/%s/bulk",
									  root, t->study, objs[i].series, objs[i].instance);
		char	   *json;
		char		errbuf[256];
		MddDicomStatus st;

		CHECK_FOR_INTERRUPTS();
		st = mdd_dicomweb_metadata((unsigned char *) VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data),
								   (size_t) mdd_dicomweb_bulk_threshold, prefix,
								   &json, errbuf, sizeof(errbuf));
		if (st != MDD_DICOM_OK)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("could not write the metadata of object " INT64_FORMAT ": %s",
							objs[i].id, errbuf)));
		if (i > 0)
			appendStringInfoChar(&out, ',');
		appendStringInfoString(&out, json);
		mdd_dicomweb_free(json);
		pfree(data);
	}
	appendStringInfoChar(&out, ']');
	mdd_http_reply(req, 200, "application/dicom+json", out.data, out.len);
}

/* frames "1,3" or a bulk value of one instance, multipart octet-stream */
static void
octets(MddHttpRequest *req, const DicomwebTarget *t, WadoObject *obj)
{
	bytea	   *data;
	unsigned char *bytes = NULL;
	size_t		part_len = 0;
	int			nparts = 1;
	int		   *numbers = NULL;
	char		errbuf[256];
	MddDicomStatus st;
	StringInfoData body;
	char	   *boundary = new_boundary();

	check_accept(req, "application/octet-stream", true);
	if (t->frames)
	{
		char	   *list = pstrdup(t->frames);
		char	   *save = NULL;

		nparts = 0;
		numbers = palloc(sizeof(int) * (strlen(list) / 2 + 1));
		for (char *f = strtok_r(list, ",", &save); f; f = strtok_r(NULL, ",", &save))
		{
			char	   *end;
			long		v = strtol(f, &end, 10);

			if (*end != '\0' || end == f || v < 1 || v > INT_MAX)
			{
				req->error_status = 400;
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("\"%s\" is not a frame number (frames count from 1)", f)));
			}
			numbers[nparts++] = (int) v;
		}
		if (nparts == 0)
		{
			req->error_status = 400;
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("no frame numbers in \"%s\"", t->frames)));
		}
	}
	data = mdd_dicomweb_read_object(obj->id);
	if (t->frames)
		st = mdd_dicomweb_frames((unsigned char *) VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data),
								 numbers, nparts, &bytes, &part_len, errbuf, sizeof(errbuf));
	else
		st = mdd_dicomweb_bulk((unsigned char *) VARDATA_ANY(data), VARSIZE_ANY_EXHDR(data),
							   t->bulk_tag, &bytes, &part_len, errbuf, sizeof(errbuf));
	if (st != MDD_DICOM_OK)
	{
		req->error_status = st == MDD_DICOM_REFUSED ? 404 :
			st == MDD_DICOM_UNSUPPORTED ? 406 : 500;
		ereport(ERROR,
				(errcode(st == MDD_DICOM_REFUSED ? ERRCODE_UNDEFINED_OBJECT :
						 st == MDD_DICOM_UNSUPPORTED ? ERRCODE_FEATURE_NOT_SUPPORTED :
						 ERRCODE_DATA_CORRUPTED),
				 errmsg("%s of instance %s: %s", t->frames ? "frames" : "bulk data",
						t->instance, errbuf)));
	}
	initStringInfo(&body);
	PG_TRY();
	{
		for (int i = 0; i < nparts; i++)
		{
			appendStringInfoString(&body, part_header(boundary, "application/octet-stream") + 2);
			appendBinaryStringInfo(&body, (char *) bytes + part_len * i, part_len);
			appendStringInfoString(&body, "\r\n");
		}
	}
	PG_FINALLY();
	{
		mdd_dicomweb_free(bytes);
	}
	PG_END_TRY();
	appendStringInfo(&body, "--%s--\r\n", boundary);
	mdd_http_reply(req, 200,
				   psprintf("multipart/related; type=\"application/octet-stream\"; boundary=%s",
							boundary),
				   body.data, body.len);
}

void
mdd_dicomweb_retrieve(MddHttpRequest *req, const DicomwebTarget *t)
{
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		args[3];
	char		nulls[3] = {' ', ' ', ' '};
	WadoObject *objs;
	int			count;
	int64		total = 0;
	char	   *boundary;

	args[0] = CStringGetTextDatum(t->study);
	args[1] = t->series ? CStringGetTextDatum(t->series) : (Datum) 0;
	args[2] = t->instance ? CStringGetTextDatum(t->instance) : (Datum) 0;
	if (!t->series)
		nulls[1] = 'n';
	if (!t->instance)
		nulls[2] = 'n';
	if (SPI_execute_with_args(INSTANCES_SQL, 3, types, args, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not list the instances to retrieve");
	count = (int) SPI_processed;
	if (count == 0)
	{
		req->error_status = 404;
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no %s %s in the archive", t->instance ? "instance" : t->series ? "series" : "study",
						t->instance ? t->instance : t->series ? t->series : t->study)));
	}
	objs = palloc(sizeof(WadoObject) * count);
	for (int i = 0; i < count; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	td = SPI_tuptable->tupdesc;

		objs[i].id = strtoll(SPI_getvalue(tup, td, 1), NULL, 10);
		objs[i].size = strtoll(SPI_getvalue(tup, td, 2), NULL, 10);
		objs[i].series = SPI_getvalue(tup, td, 4);
		objs[i].instance = SPI_getvalue(tup, td, 5);
	}

	if (t->metadata)
		return metadata(req, t, objs, count);
	if (t->frames || t->bulk_tag)
		return octets(req, t, &objs[0]);

	check_accept(req, "application/dicom", true);
	{
		const char *accept = mdd_http_header(req, "Accept");
		const char *ts = accept ? strstr(accept, "transfer-syntax=") : NULL;

		if (ts && ts[16] != '*')
		{
			/* no transcoding: only the stored transfer syntaxes can be had */
			char	   *want = pstrdup(ts + 16);

			want[strcspn(want, ";, \"")] = '\0';
			for (int i = 0; i < count; i++)
			{
				if (strcmp(SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 3), want) != 0)
				{
					req->error_status = 406;
					ereport(ERROR,
							(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
							 errmsg("instance %s is stored in transfer syntax %s, not %s",
									objs[i].instance,
									SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 3),
									want),
							 errhint("mdd serves the stored bytes; ask with transfer-syntax=*.")));
				}
			}
		}
	}
	{
		MemoryContext m = mdd_http_stream_memory(req);
		WadoStream *s = MemoryContextAllocZero(m, sizeof(WadoStream));

		boundary = new_boundary();
		s->objects = MemoryContextAlloc(m, sizeof(WadoObject) * count);
		memcpy(s->objects, objs, sizeof(WadoObject) * count);
		for (int i = 0; i < count; i++)
		{
			s->objects[i].series = NULL;
			s->objects[i].instance = NULL;
			total += strlen(part_header(boundary, "application/dicom")) + objs[i].size;
		}
		s->count = count;
		s->boundary = MemoryContextStrdup(m, boundary);
		total += strlen(boundary) + 8 - 2;	/* "\r\n--" boundary "--\r\n", no first CRLF */
		mdd_http_reply_stream(req, 200,
							  psprintf("multipart/related; type=\"application/dicom\"; boundary=%s",
									   boundary),
							  total, wado_read, NULL, s);
	}
}
