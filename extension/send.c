/*-------------------------------------------------------------------------
 *
 * send.c
 *	  SQL functions behind the send jobs (sql/send.sql): an association
 *	  to a node opened for one step of a job, the C-STORE of each object
 *	  on it, and its release.  dicom_send.cpp does the DICOM work.
 *
 * A backend has at most one such association.  It lives from
 * mdd._send_open to mdd._send_close within one transaction; when the
 * transaction ends first (an error, a cancel, the runner stopped), it is
 * aborted at once, so that no association outlives the step that opened
 * it.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "storage/pmsignal.h"
#include "utils/array.h"
#include "utils/builtins.h"

#include "dicom.h"
#include "mdd.h"
#include "tls.h"
#include "../bgworker/workers.h"

PG_FUNCTION_INFO_V1(mdd_send_open_sql);
PG_FUNCTION_INFO_V1(mdd_send_object_sql);
PG_FUNCTION_INFO_V1(mdd_send_close_sql);

static MddDicomSender *open_sender = NULL;
static bool callback_registered = false;

/* the association must not outlive its transaction, whatever ends it */
static void
send_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			if (open_sender != NULL)
			{
				MddDicomSender *s = open_sender;

				open_sender = NULL;
				mdd_dicom_sender_close(s, 0);
			}
			break;
		default:
			break;
	}
}

/*
 * Whether a wait for the peer must end now: the backend is being
 * terminated or its query cancelled, or the postmaster died.  Called from
 * C++, so it only looks at flags; the caller acts on them afterwards with
 * CHECK_FOR_INTERRUPTS.
 */
static int
send_should_stop(void *arg)
{
	if (InterruptPending && (ProcDiePending || QueryCancelPending))
		return 1;
	return PostmasterIsAlive() ? 0 : 1;
}

/* the elements of a text[] argument as C strings; NULL elements refused */
int
mdd_text_array_strings(ArrayType *array, const char *what, char ***out)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	deconstruct_array(array, TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, &n);
	*out = palloc(sizeof(char *) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not contain NULL", what)));
		(*out)[i] = TextDatumGetCString(elems[i]);
	}
	return n;
}

/*
 * mdd._send_open(ae_title text, host text, port integer,
 *				  sop_classes text[], transfer_syntaxes text[],
 *				  tls boolean DEFAULT false) RETURNS text
 *
 * Open the association of a send step from mdd.ae_title to the node,
 * proposing each SOP class in the transfer syntaxes its objects are stored
 * in (sop_classes[i] with transfer_syntaxes[i]), and the uncompressed ones
 * for uncompressed objects.  NULL once open; the reason when the node
 * associated but accepted none of the contexts (nothing can be sent to it
 * of these objects).  A node that cannot be reached or refuses the
 * association is an error of class 08, which a job retries.
 */
Datum
mdd_send_open_sql(PG_FUNCTION_ARGS)
{
	MddDicomSenderConfig config;
	MddDicomSender *sender = NULL;
	MddDicomStatus status;
	char	  **classes;
	char	  **syntaxes;
	int			nclasses;
	int			nsyntaxes;
	char	   *ae_title;
	char	   *host;
	char		errbuf[512];

	for (int i = 0; i < 5; i++)
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("AE title, host, port, SOP classes and transfer syntaxes must not be NULL")));
	ae_title = text_to_cstring(PG_GETARG_TEXT_PP(0));
	host = text_to_cstring(PG_GETARG_TEXT_PP(1));
	nclasses = mdd_text_array_strings(PG_GETARG_ARRAYTYPE_P(3), "SOP classes", &classes);
	nsyntaxes = mdd_text_array_strings(PG_GETARG_ARRAYTYPE_P(4), "transfer syntaxes", &syntaxes);
	if (nclasses != nsyntaxes || nclasses == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%d SOP classes and %d transfer syntaxes given", nclasses, nsyntaxes),
				 errdetail("Give one or more pairs.")));

	if (!callback_registered)
	{
		RegisterXactCallback(send_xact_callback, NULL);
		callback_registered = true;
	}
	if (open_sender != NULL)
	{
		/* one association per backend: the previous one is of no more use */
		MddDicomSender *s = open_sender;

		open_sender = NULL;
		mdd_dicom_sender_close(s, 0);
	}

	config.our_ae = mdd_ae_title;
	config.peer_ae = ae_title;
	config.host = host;
	config.port = PG_GETARG_INT32(2);
	config.acse_timeout = mdd_dicom_acse_timeout;
	config.dimse_timeout = mdd_dicom_dimse_timeout;
	config.arg = NULL;
	config.should_stop = send_should_stop;
	config.tls = mdd_tls_if(PG_NARGS() > 5 && !PG_ARGISNULL(5) && PG_GETARG_BOOL(5));
	status = mdd_dicom_sender_open(&config, (const char *const *) classes,
								   (const char *const *) syntaxes, nclasses, &sender,
								   errbuf, sizeof(errbuf));
	if (status == MDD_DICOM_OK)
		open_sender = sender;
	CHECK_FOR_INTERRUPTS();

	switch (status)
	{
		case MDD_DICOM_OK:
			PG_RETURN_NULL();
		case MDD_DICOM_NOT_SENDABLE:
			PG_RETURN_TEXT_P(cstring_to_text(errbuf));
		case MDD_DICOM_NETWORK:
			ereport(ERROR,
					(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
					 errmsg("%s", errbuf)));
			break;
		case MDD_DICOM_OUT_OF_MEMORY:
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("%s", errbuf)));
			break;
		default:
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("cannot open an association with \"%s\" at %s:%d: %s",
							ae_title, host, config.port, errbuf)));
			break;
	}
	PG_RETURN_NULL();
}

/*
 * mdd._send_object(data bytea, sop_class_uid text, sop_instance_uid text,
 *					transfer_syntax_uid text,
 *					OUT outcome text, OUT status integer, OUT detail text)
 *
 * C-STORE of one object's stored bytes on the open association.  outcome:
 * 'sent' (the node answered success or a warning), 'refused' (it answered
 * a failure status), 'unsendable' (no accepted context fits the object;
 * nothing was sent) or 'broken' (the association failed; close it).
 * status is the DIMSE status answered; detail the Error Comment of the
 * answer or the reason of the failure.
 */
Datum
mdd_send_object_sql(PG_FUNCTION_ARGS)
{
	TupleDesc	desc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};
	bytea	   *data;
	MddDicomStatus result;
	unsigned short status = 0;
	const char *outcome;
	char		errbuf[512];

	if (get_call_result_type(fcinfo, NULL, &desc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "mdd._send_object must return a record");
	for (int i = 0; i < 4; i++)
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("data, SOP class, SOP instance and transfer syntax must not be NULL")));
	if (open_sender == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("no association is open to send on"),
				 errhint("Call mdd._send_open first, in the same transaction.")));
	data = PG_GETARG_BYTEA_PP(0);

	result = mdd_dicom_sender_store(open_sender,
									(const unsigned char *) VARDATA_ANY(data),
									VARSIZE_ANY_EXHDR(data),
									text_to_cstring(PG_GETARG_TEXT_PP(1)),
									text_to_cstring(PG_GETARG_TEXT_PP(2)),
									text_to_cstring(PG_GETARG_TEXT_PP(3)),
									&status, errbuf, sizeof(errbuf));
	CHECK_FOR_INTERRUPTS();

	if (result == MDD_DICOM_OK)
		outcome = (status == 0x0000 || (status & 0xF000) == 0xB000) ? "sent" : "refused";
	else if (result == MDD_DICOM_NOT_SENDABLE)
		outcome = "unsendable";
	else
		outcome = "broken";
	values[0] = CStringGetTextDatum(outcome);
	values[1] = Int32GetDatum((int32) status);
	if (errbuf[0] != '\0')
		values[2] = CStringGetTextDatum(errbuf);
	else
		nulls[2] = true;
	if (result != MDD_DICOM_OK)
		nulls[1] = true;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(BlessTupleDesc(desc), values, nulls)));
}

/*
 * mdd._send_close(release boolean) RETURNS void
 *
 * End the association of the step: released, or aborted when release is
 * false (after a failure).  Nothing when none is open.
 */
Datum
mdd_send_close_sql(PG_FUNCTION_ARGS)
{
	bool		release = !PG_ARGISNULL(0) && PG_GETARG_BOOL(0);

	if (open_sender != NULL)
	{
		MddDicomSender *s = open_sender;

		open_sender = NULL;
		mdd_dicom_sender_close(s, release ? 1 : 0);
	}
	CHECK_FOR_INTERRUPTS();
	PG_RETURN_VOID();
}
