/*-------------------------------------------------------------------------
 *
 * commit.c
 *	  The SQL function behind the report of a Storage Commitment
 *	  transaction (sql/commitment.sql): the N-EVENT-REPORT that a job
 *	  runner sends to the node that asked, by dicom_commit.cpp.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "dicom.h"
#include "mdd.h"
#include "tls.h"
#include "../bgworker/workers.h"

PG_FUNCTION_INFO_V1(mdd_commit_report_sql);

/*
 * mdd._commit_report(ae_title text, host text, port integer,
 *					  transaction_uid text, sop_classes text[],
 *					  sop_instances text[], reasons integer[],
 *					  tls boolean DEFAULT false) RETURNS void
 *
 * Send the report from mdd.ae_title: reasons[i] 0 for an instance
 * committed, else its Failure Reason.  A node that cannot be reached, or
 * that refuses or fails the report, is an error of class 08, which the job
 * retries.
 */
Datum
mdd_commit_report_sql(PG_FUNCTION_ARGS)
{
	char	  **classes;
	char	  **instances;
	Datum	   *reason_datums;
	bool	   *reason_nulls;
	int		   *reasons;
	int			n,
				ninstances,
				nreasons;
	char		errbuf[512];
	MddDicomStatus status;

	for (int i = 0; i < 7; i++)
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("the arguments of a storage commitment report must not be NULL")));
	n = mdd_text_array_strings(PG_GETARG_ARRAYTYPE_P(4), "SOP classes", &classes);
	ninstances = mdd_text_array_strings(PG_GETARG_ARRAYTYPE_P(5), "SOP instances", &instances);
	deconstruct_array(PG_GETARG_ARRAYTYPE_P(6), INT4OID, 4, true, TYPALIGN_INT,
					  &reason_datums, &reason_nulls, &nreasons);
	if (ninstances != n || nreasons != n || n == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("a storage commitment report needs as many SOP classes, instances and reasons, at least one")));
	reasons = palloc(sizeof(int) * n);
	for (int i = 0; i < n; i++)
		reasons[i] = reason_nulls[i] ? 0x0110 : DatumGetInt32(reason_datums[i]);

	status = mdd_dicom_commit_report(mdd_ae_title,
									 text_to_cstring(PG_GETARG_TEXT_PP(0)),
									 text_to_cstring(PG_GETARG_TEXT_PP(1)),
									 PG_GETARG_INT32(2),
									 mdd_dicom_acse_timeout,
									 mdd_tls_if(PG_NARGS() > 7 && !PG_ARGISNULL(7) && PG_GETARG_BOOL(7)),
									 text_to_cstring(PG_GETARG_TEXT_PP(3)),
									 (const char *const *) classes,
									 (const char *const *) instances,
									 reasons, n, errbuf, sizeof(errbuf));
	CHECK_FOR_INTERRUPTS();
	if (status != MDD_DICOM_OK)
		ereport(ERROR,
				(errcode(status == MDD_DICOM_REFUSED ? ERRCODE_PROTOCOL_VIOLATION
						 : ERRCODE_CONNECTION_FAILURE),
				 errmsg("storage commitment report: %s", errbuf)));
	PG_RETURN_VOID();
}
