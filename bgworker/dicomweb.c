/*-------------------------------------------------------------------------
 *
 * dicomweb.c
 *	  The route /dicomweb/ of the HTTP service: DICOMweb (PS3.18) resources
 *	  dispatched to search (QIDO-RS, here), retrieval (WADO-RS,
 *	  dicomweb_wado.c) and storage (STOW-RS, dicomweb_stow.c).
 *
 *	  A search runs mdd.dicom_search (sql/dicomweb.sql: the catalog with
 *	  the matching of the C-FIND service) and writes its matches as DICOM
 *	  JSON with DCMTK's writer (mdd_dicomweb_results, dicom_web.cpp).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/json.h"

#include "dicomweb.h"
#include "../extension/dicom.h"

int			mdd_dicomweb_bulk_threshold = 0;

void
mdd_dicomweb_define_settings(void)
{
	DefineCustomIntVariable("mdd.dicomweb_bulk_threshold",
							"Binary values longer than this are given as BulkDataURI in DICOMweb metadata; 0 gives every value inline.",
							NULL, &mdd_dicomweb_bulk_threshold, 0, 0, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_BYTE, NULL, NULL, NULL);
}

char *
mdd_dicomweb_root(MddHttpRequest *req)
{
	return psprintf("%s/dicomweb", mdd_http_base_url(req));
}

/* a UID of the path: digits and dots, at most 64 characters */
static const char *
check_uid(MddHttpRequest *req, const char *uid)
{
	if (uid[0] == '\0' || strlen(uid) > 64 || strspn(uid, "0123456789.") != strlen(uid))
	{
		req->error_status = 400;
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("\"%s\" is not a UID", uid),
				 errhint("UIDs are digits and dots, at most 64 characters.")));
	}
	return uid;
}

/* the keyword of an attribute given by keyword or tag, or 400 */
static char *
attribute_keyword(MddHttpRequest *req, const char *name)
{
	char		kw[128];

	if (!mdd_dicomweb_keyword(name, kw, sizeof(kw)))
	{
		req->error_status = 400;
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown attribute \"%s\" in the search", name),
				 errhint("Give an attribute by its keyword (PatientID) or its tag (00100020).")));
	}
	return pstrdup(kw);
}

static int
nonnegative_arg(MddHttpRequest *req, const char *name, const char *value)
{
	char	   *end;
	long		v;

	errno = 0;
	v = strtol(value, &end, 10);
	if (errno != 0 || end == value || *end != '\0' || v < 0 || v > INT_MAX)
	{
		req->error_status = 400;
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be a non-negative integer, not \"%s\"", name, value)));
	}
	return (int) v;
}

/* a column of the answer: its position, added when new */
static int
column_of(List **columns, const char *name)
{
	ListCell   *lc;
	int			i = 0;

	foreach(lc, *columns)
	{
		if (strcmp((char *) lfirst(lc), name) == 0)
			return i;
		i++;
	}
	*columns = lappend(*columns, pstrdup(name));
	return i;
}

#define SEARCH_SQL \
	"SELECT s.n::int, r.key, r.value " \
	"FROM mdd.dicom_search($1, $2::jsonb, $3::text[], $4, $5, $6) WITH ORDINALITY AS s(j, n) " \
	"CROSS JOIN LATERAL jsonb_each_text(s.j) AS r ORDER BY s.n"

/*
 * QIDO-RS: the matches at level (STUDY, SERIES, IMAGE) of the query
 * arguments, within study and series when the path names them.
 */
static void
search(MddHttpRequest *req, const char *level, const char *study, const char *series,
	   bool parents)
{
	const char **names;
	const char **values;
	int			nargs = mdd_http_args(req, &names, &values);
	StringInfoData filters;
	StringInfoData include;
	bool		first_filter = true;
	bool		fuzzy = false;
	int			limit = -1;
	int			offset = 0;
	int			nrows = 0;
	List	   *columns = NIL;
	int			ncols;
	Oid			types[6] = {TEXTOID, TEXTOID, TEXTOID, INT4OID, INT4OID, BOOLOID};
	Datum		args[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	char	  **cells;
	const char **colnames;
	char	   *json;
	char		errbuf[256];
	char	   *root = mdd_dicomweb_root(req);
	int			url_col;
	StringInfoData warning;
	const char *accept = mdd_http_header(req, "Accept");

	if (accept && strstr(accept, "application/dicom+json") == NULL &&
		strstr(accept, "application/json") == NULL && strstr(accept, "*/*") == NULL &&
		strstr(accept, "application/*") == NULL)
	{
		req->error_status = 406;
		ereport(ERROR,
				(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
				 errmsg("searches answer application/dicom+json, not %s", accept)));
	}

	initStringInfo(&filters);
	initStringInfo(&include);
	appendStringInfoChar(&filters, '{');
	appendStringInfoChar(&include, '{');
	if (study)
	{
		appendStringInfoString(&filters, "\"StudyInstanceUID\": ");
		escape_json(&filters, study);
		first_filter = false;
	}
	if (series)
	{
		appendStringInfoString(&filters, ", \"SeriesInstanceUID\": ");
		escape_json(&filters, series);
	}
	for (int i = 0; i < nargs; i++)
	{
		(void) pg_verifymbstr(values[i], strlen(values[i]), false);
		if (strcmp(names[i], "limit") == 0)
			limit = nonnegative_arg(req, "limit", values[i]);
		else if (strcmp(names[i], "offset") == 0)
			offset = nonnegative_arg(req, "offset", values[i]);
		else if (strcmp(names[i], "fuzzymatching") == 0)
			fuzzy = (strcmp(values[i], "true") == 0);
		else if (strcmp(names[i], "includefield") == 0)
		{
			char	   *list = pstrdup(values[i]);
			char	   *save = NULL;

			for (char *f = strtok_r(list, ",", &save); f; f = strtok_r(NULL, ",", &save))
			{
				if (include.len > 1)
					appendStringInfoChar(&include, ',');
				if (strcmp(f, "all") == 0)
					escape_json(&include, "all");
				else
					escape_json(&include, attribute_keyword(req, f));
			}
		}
		else
		{
			char	   *kw = attribute_keyword(req, names[i]);

			if ((study && strcmp(kw, "StudyInstanceUID") == 0) ||
				(series && strcmp(kw, "SeriesInstanceUID") == 0))
				continue;		/* the path says it */
			if (!first_filter)
				appendStringInfoString(&filters, ", ");
			escape_json(&filters, kw);
			appendStringInfoString(&filters, ": ");
			/* UID lists: C-FIND separates them with backslashes */
			if (strcmp(kw + strlen(kw) - 3, "UID") == 0)
			{
				char	   *v = pstrdup(values[i]);

				for (char *c = v; *c; c++)
					if (*c == ',')
						*c = '\\';
				escape_json(&filters, v);
			}
			else
				escape_json(&filters, values[i]);
			first_filter = false;
		}
	}
	appendStringInfoChar(&filters, '}');
	appendStringInfoChar(&include, '}');

	args[0] = CStringGetTextDatum(level);
	args[1] = CStringGetTextDatum(filters.data);
	args[2] = CStringGetTextDatum(include.data);
	args[3] = Int32GetDatum(limit);
	if (limit < 0)
		nulls[3] = 'n';
	args[4] = Int32GetDatum(offset);
	args[5] = BoolGetDatum(parents);
	if (SPI_execute_with_args(SEARCH_SQL, 6, types, args, nulls, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "the DICOMweb search failed");

	/* the columns: every keyword any match has, and RetrieveURL */
	for (uint64 r = 0; r < SPI_processed; r++)
		(void) column_of(&columns, SPI_getvalue(SPI_tuptable->vals[r], SPI_tuptable->tupdesc, 2));
	url_col = column_of(&columns, "RetrieveURL");
	ncols = list_length(columns);
	if (SPI_processed > 0)
		nrows = atoi(SPI_getvalue(SPI_tuptable->vals[SPI_processed - 1], SPI_tuptable->tupdesc, 1));
	cells = palloc0(sizeof(char *) * (Size) Max(nrows, 1) * ncols);
	colnames = palloc(sizeof(char *) * ncols);
	for (int c = 0; c < ncols; c++)
		colnames[c] = list_nth(columns, c);
	for (uint64 r = 0; r < SPI_processed; r++)
	{
		HeapTuple	t = SPI_tuptable->vals[r];
		int			row = atoi(SPI_getvalue(t, SPI_tuptable->tupdesc, 1)) - 1;
		int			col = column_of(&columns, SPI_getvalue(t, SPI_tuptable->tupdesc, 2));

		cells[row * ncols + col] = SPI_getvalue(t, SPI_tuptable->tupdesc, 3);
	}
	for (int row = 0; row < nrows; row++)
	{
		int			cs = column_of(&columns, "StudyInstanceUID");
		int			cse = strcmp(level, "STUDY") == 0 ? 0 : column_of(&columns, "SeriesInstanceUID");
		int			ci = strcmp(level, "IMAGE") != 0 ? 0 : column_of(&columns, "SOPInstanceUID");
		char	  **cell = cells + row * ncols;

		if (strcmp(level, "STUDY") == 0)
			cell[url_col] = psprintf("%s/studies/%s", root, cell[cs]);
		else if (strcmp(level, "SERIES") == 0)
			cell[url_col] = psprintf("%s/studies/%s/series/%s", root, cell[cs], cell[cse]);
		else
			cell[url_col] = psprintf("%s/studies/%s/series/%s/instances/%s",
									 root, cell[cs], cell[cse], cell[ci]);
	}
	if (list_length(columns) != ncols)
		elog(ERROR, "the columns of the DICOMweb search changed while it was answered");

	if (mdd_dicomweb_results(nrows, ncols, colnames, (const char *const *) cells,
							 &json, errbuf, sizeof(errbuf)) != MDD_DICOM_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not write the search results: %s", errbuf)));
	PG_TRY();
	{
		mdd_http_reply(req, 200, "application/dicom+json", json, strlen(json));
	}
	PG_FINALLY();
	{
		mdd_dicomweb_free(json);
	}
	PG_END_TRY();

	/* what was not matched on is said in a Warning header */
	initStringInfo(&warning);
	if (fuzzy)
		appendStringInfoString(&warning,
							   "299 mdd \"The fuzzymatching parameter is not supported. "
							   "Only literal matching has been performed.\"");
	{
		Oid			t2[2] = {TEXTOID, TEXTOID};
		Datum		a2[2] = {args[0], args[1]};

		if (SPI_execute_with_args("SELECT array_to_string(mdd.dicom_search_ignored($1, $2::jsonb), ', ')",
								  2, t2, a2, NULL, true, 1) == SPI_OK_SELECT && SPI_processed == 1)
		{
			char	   *ignored = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

			if (ignored && ignored[0])
			{
				if (warning.len)
					appendStringInfoString(&warning, ", ");
				appendStringInfo(&warning,
								 "299 mdd \"The following attributes are not matched on at this level: %s.\"",
								 ignored);
			}
		}
	}
	if (warning.len)
		mdd_http_add_header(req, "Warning", warning.data);
	mdd_http_add_header(req, "Cache-Control", "no-store");
}

static void
not_found(MddHttpRequest *req)
{
	req->error_status = 404;
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("no such DICOMweb resource: %s", req->path),
			 errhint("See docs/dicomweb.md for the resources mdd serves.")));
}

void
mdd_dicomweb_handler(MddHttpRequest *req)
{
	char	   *path = pstrdup(req->subpath);
	char	   *seg[8];
	int			n = 0;
	char	   *save = NULL;
	bool		post = strcmp(req->method, "POST") == 0;
	DicomwebTarget t;

	for (char *s = strtok_r(path, "/", &save); s; s = strtok_r(NULL, "/", &save))
	{
		if (n == lengthof(seg))
			not_found(req);
		seg[n++] = s;
	}
	memset(&t, 0, sizeof(t));

	if (n == 0)
		not_found(req);
	if (post)
	{
		if (strcmp(seg[0], "studies") != 0 || n > 2)
		{
			req->error_status = 405;
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("POST is only for storing: /dicomweb/studies or /dicomweb/studies/{study}")));
		}
		mdd_http_require_role(req, "mdd_operator");
		mdd_dicomweb_store(req, n == 2 ? check_uid(req, seg[1]) : NULL);
		return;
	}

	if (n == 1 && strcmp(seg[0], "studies") == 0)
		return search(req, "STUDY", NULL, NULL, false);
	if (n == 1 && strcmp(seg[0], "series") == 0)
		return search(req, "SERIES", NULL, NULL, true);
	if (n == 1 && strcmp(seg[0], "instances") == 0)
		return search(req, "IMAGE", NULL, NULL, true);
	if (strcmp(seg[0], "studies") != 0 || n < 2)
		not_found(req);

	t.study = check_uid(req, seg[1]);
	if (n == 2)
		return mdd_dicomweb_retrieve(req, &t);
	if (n == 3 && strcmp(seg[2], "metadata") == 0)
	{
		t.metadata = true;
		return mdd_dicomweb_retrieve(req, &t);
	}
	if (n == 3 && strcmp(seg[2], "series") == 0)
		return search(req, "SERIES", t.study, NULL, false);
	if (n == 3 && strcmp(seg[2], "instances") == 0)
		return search(req, "IMAGE", t.study, NULL, true);
	if (strcmp(seg[2], "series") != 0)
		not_found(req);

	t.series = check_uid(req, seg[3]);
	if (n == 4)
		return mdd_dicomweb_retrieve(req, &t);
	if (n == 5 && strcmp(seg[4], "metadata") == 0)
	{
		t.metadata = true;
		return mdd_dicomweb_retrieve(req, &t);
	}
	if (n == 5 && strcmp(seg[4], "instances") == 0)
		return search(req, "IMAGE", t.study, t.series, false);
	if (n < 6 || strcmp(seg[4], "instances") != 0)
		not_found(req);

	t.instance = check_uid(req, seg[5]);
	if (n == 6)
		return mdd_dicomweb_retrieve(req, &t);
	if (n == 7 && strcmp(seg[6], "metadata") == 0)
	{
		t.metadata = true;
		return mdd_dicomweb_retrieve(req, &t);
	}
	if (n == 8 && strcmp(seg[6], "frames") == 0)
	{
		t.frames = seg[7];
		return mdd_dicomweb_retrieve(req, &t);
	}
	if (n == 8 && strcmp(seg[6], "bulk") == 0)
	{
		t.bulk_tag = seg[7];
		return mdd_dicomweb_retrieve(req, &t);
	}
	not_found(req);
}
