/*-------------------------------------------------------------------------
 *
 * parse.c
 *	  SQL face of the DICOM parser: mdd.parse(bytea) RETURNS jsonb.
 *
 * Turns the status codes of dicom.h into errors with SQLSTATEs; the
 * catalog code (PL/pgSQL, sql/ingest.sql) reads the returned document.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "dicom.h"
#include "mdd.h"

PG_FUNCTION_INFO_V1(mdd_parse_sql);
PG_FUNCTION_INFO_V1(mdd_caller_sql);

/*
 * mdd.parse(data bytea) RETURNS jsonb
 *
 * Describe a DICOM object: catalog attributes, references, header.
 */
Datum
mdd_parse_sql(PG_FUNCTION_ARGS)
{
	bytea	   *data;
	char	   *json = NULL;
	char		errbuf[512];
	MddDicomStatus status;
	Datum		result;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("DICOM data must not be NULL")));
	data = PG_GETARG_BYTEA_PP(0);

	status = mdd_dicom_parse((const unsigned char *) VARDATA_ANY(data),
							 VARSIZE_ANY_EXHDR(data), &json,
							 errbuf, sizeof(errbuf));
	switch (status)
	{
		case MDD_DICOM_OK:
			break;
		case MDD_DICOM_EMPTY:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("DICOM data is empty")));
			break;
		case MDD_DICOM_NOT_DICOM:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
					 errmsg("data is not a DICOM file or data set"),
					 errdetail("%s.", errbuf),
					 errhint("Non-DICOM files are stored with mdd.store_document.")));
			break;
		case MDD_DICOM_MALFORMED:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
					 errmsg("DICOM data is truncated or malformed"),
					 errdetail("%s.", errbuf)));
			break;
		case MDD_DICOM_MISSING_UID:
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("DICOM object lacks a required identifier"),
					 errdetail("%s.", errbuf)));
			break;
		case MDD_DICOM_OUT_OF_MEMORY:
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory while parsing DICOM data"),
					 errdetail("%s.", errbuf)));
			break;
		default:
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("DICOM parser failed"),
					 errdetail("%s.", errbuf)));
			break;
	}

	/* copy out of malloc()ed memory before anything can throw */
	{
		char	   *copy = pstrdup(json);

		mdd_dicom_free_json(json);
		result = DirectFunctionCall1(jsonb_in, CStringGetDatum(copy));
		pfree(copy);
	}
	PG_RETURN_DATUM(result);
}

/*
 * mdd._caller() RETURNS name
 *
 * The role that called into mdd, as seen outside mdd's SECURITY DEFINER
 * functions (current_user inside them is the extension's owner).
 */
Datum
mdd_caller_sql(PG_FUNCTION_ARGS)
{
	PG_RETURN_DATUM(DirectFunctionCall1(namein,
										CStringGetDatum(GetUserNameFromId(GetOuterUserId(), false))));
}
