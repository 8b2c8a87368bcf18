/*-------------------------------------------------------------------------
 *
 * http_api.c
 *	  The route /api/<name>: the JSON API of the web pages.  It calls
 *	  mdd.web_api(name text, params jsonb) RETURNS jsonb as the
 *	  authenticated role, params being the query-string arguments (as
 *	  strings; of a repeated name the last) merged with the request body,
 *	  which must be a JSON object (its keys win).  The route knows no API
 *	  name: mdd.web_api answers them, or raises (42704 for a name it does
 *	  not know: 404).  Without mdd.web_api the route answers 404.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/json.h"

#include "http.h"

#define API_SQL \
	"SELECT jsonb_typeof(b), CASE WHEN jsonb_typeof(b) = 'object' " \
	"THEN mdd.web_api($1, $2::jsonb || b)::text END " \
	"FROM (SELECT coalesce($3::jsonb, '{}') AS b) AS x"

void
mdd_http_api(MddHttpRequest *req)
{
	const char *name = req->subpath;
	const char **names;
	const char **values;
	int			nargs = mdd_http_args(req, &names, &values);
	StringInfoData params;
	Oid			types[3] = {TEXTOID, TEXTOID, TEXTOID};
	Datum		args[3];
	char		nulls[3] = {' ', ' ', ' '};
	char	   *kind;
	char	   *result;

	if (name[0] == '\0' || strlen(name) > 63 ||
		strspn(name, "abcdefghijklmnopqrstuvwxyz_0123456789") != strlen(name))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("no such API: \"%s\"", name),
				 errhint("API names are lower-case letters, digits and underscores.")));
	if (SPI_execute("SELECT 1 WHERE to_regprocedure('mdd.web_api(text,jsonb)') IS NOT NULL",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "could not look up mdd.web_api");
	if (SPI_processed == 0)
	{
		req->error_status = 404;
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_FUNCTION),
				 errmsg("the web API is not installed: there is no function mdd.web_api(text, jsonb)")));
	}

	initStringInfo(&params);
	appendStringInfoChar(&params, '{');
	for (int i = 0; i < nargs; i++)
	{
		(void) pg_verifymbstr(names[i], strlen(names[i]), false);
		(void) pg_verifymbstr(values[i], strlen(values[i]), false);
		if (i > 0)
			appendStringInfoString(&params, ", ");
		escape_json(&params, names[i]);
		appendStringInfoString(&params, ": ");
		escape_json(&params, values[i]);
	}
	appendStringInfoChar(&params, '}');

	if (req->body_len > 0)
	{
		const char *type = mdd_http_header(req, "Content-Type");

		if (type == NULL || pg_strncasecmp(type, "application/json", 16) != 0)
		{
			req->error_status = 415;
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("an API request body must be application/json, not %s",
							type ? type : "without a Content-Type")));
		}
		(void) pg_verifymbstr(req->body, req->body_len, false);
	}
	args[0] = CStringGetTextDatum(name);
	args[1] = CStringGetTextDatum(params.data);
	args[2] = CStringGetTextDatum(req->body);
	if (req->body_len == 0)
		nulls[2] = 'n';
	if (SPI_execute_with_args(API_SQL, 3, types, args, nulls, false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "the API query of %s returned no row", name);
	kind = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	if (kind == NULL || strcmp(kind, "object") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("an API request body must be a JSON object, not %s", kind ? kind : "null")));
	result = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
	mdd_http_reply_json(req, 200, result ? result : "null");
	mdd_http_add_header(req, "Cache-Control", "no-store");
}
