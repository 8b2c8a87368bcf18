/*-------------------------------------------------------------------------
 *
 * network.c
 *	  SQL functions that act as a DICOM SCU (dicom_net.cpp does the work):
 *	  mdd._echo, behind mdd.echo.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"

#include "dicom.h"
#include "mdd.h"
#include "tls.h"
#include "../bgworker/workers.h"

PG_FUNCTION_INFO_V1(mdd_echo_sql);

/*
 * mdd._echo(ae_title text, host text, port int, timeout int, tls bool) RETURNS text
 *
 * C-ECHO from mdd.ae_title to a peer: NULL when it answered success,
 * otherwise why not.
 */
Datum
mdd_echo_sql(PG_FUNCTION_ARGS)
{
	char		errbuf[512];
	MddDicomStatus status;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("AE title, host and port of the peer must not be NULL")));
	status = mdd_dicom_echo(mdd_ae_title,
							text_to_cstring(PG_GETARG_TEXT_PP(0)),
							text_to_cstring(PG_GETARG_TEXT_PP(1)),
							PG_GETARG_INT32(2),
							PG_ARGISNULL(3) ? 10 : PG_GETARG_INT32(3),
							mdd_tls_if(PG_NARGS() > 4 && !PG_ARGISNULL(4) && PG_GETARG_BOOL(4)),
							errbuf, sizeof(errbuf));
	CHECK_FOR_INTERRUPTS();
	if (status == MDD_DICOM_OK)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(errbuf));
}
