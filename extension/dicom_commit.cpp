/*
 * dicom_commit.cpp
 *	  Storage Commitment Push Model (PS3.4 annex J), SCP side: the
 *	  N-ACTION a storage SCU sends to ask mdd to take responsibility for
 *	  instances, and the N-EVENT-REPORT mdd sends later, on an association
 *	  of its own, with what it holds and what it does not.
 *
 * The N-ACTION handler only reads the request and hands the UIDs to the C
 * side, which decides and queues the report as a job; the answer to the
 * N-ACTION says the request was taken, not the outcome.  The report goes
 * out from a job runner (mdd_dicom_commit_report), so that it is sent
 * again after a failure, whatever restarts meanwhile.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes.
 */
#include "dicom.h"
#include "dicom_common.hpp"
#include "dicom_scu.hpp"
#include "dicom_service.hpp"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dimse.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace
{

/* the well-known SOP Instance of the Storage Commitment Push Model */
const char *const commitmentInstance = "1.2.840.10008.1.20.1.1";

/* N-ACTION-RSP with a status, and an Error Comment for failures */
bool
sendActionResponse(MddServedAssociation &sa, T_ASC_PresentationContextID presID,
				   const T_DIMSE_N_ActionRQ &req, unsigned short status, const char *comment)
{
	T_DIMSE_Message rsp;
	DcmDataset	detail;

	memset(&rsp, 0, sizeof(rsp));
	rsp.CommandField = DIMSE_N_ACTION_RSP;
	rsp.msg.NActionRSP.MessageIDBeingRespondedTo = req.MessageID;
	rsp.msg.NActionRSP.DimseStatus = status;
	rsp.msg.NActionRSP.DataSetType = DIMSE_DATASET_NULL;
	OFStandard::strlcpy(rsp.msg.NActionRSP.AffectedSOPClassUID, req.RequestedSOPClassUID,
						sizeof(rsp.msg.NActionRSP.AffectedSOPClassUID));
	OFStandard::strlcpy(rsp.msg.NActionRSP.AffectedSOPInstanceUID, req.RequestedSOPInstanceUID,
						sizeof(rsp.msg.NActionRSP.AffectedSOPInstanceUID));
	rsp.msg.NActionRSP.ActionTypeID = req.ActionTypeID;
	rsp.msg.NActionRSP.opts = O_NACTION_AFFECTEDSOPCLASSUID | O_NACTION_AFFECTEDSOPINSTANCEUID |
		O_NACTION_ACTIONTYPEID;
	if (comment && comment[0])
		mddPutErrorComment(detail, comment);
	return DIMSE_sendMessageUsingMemoryData(sa.assoc, presID, &rsp,
											comment && comment[0] ? &detail : NULL,
											NULL, NULL, NULL).good();
}

/* one (SOP Class, SOP Instance) of a Referenced SOP Sequence */
struct Reference
{
	std::string sopClass;
	std::string sopInstance;
};

/* the items of a Referenced SOP Sequence; false when one lacks a UID */
bool
readReferences(DcmDataset &ds, std::vector<Reference> &refs)
{
	DcmSequenceOfItems *seq = NULL;

	if (ds.findAndGetSequence(DCM_ReferencedSOPSequence, seq).bad() || seq == NULL)
		return false;
	for (unsigned long i = 0; i < seq->card(); i++)
	{
		DcmItem    *item = seq->getItem(i);
		OFString	cls,
					inst;

		if (item->findAndGetOFString(DCM_ReferencedSOPClassUID, cls).bad() || cls.empty() ||
			item->findAndGetOFString(DCM_ReferencedSOPInstanceUID, inst).bad() || inst.empty())
			return false;
		refs.push_back({cls.c_str(), inst.c_str()});
	}
	return !refs.empty();
}

}								/* namespace */

/*
 * N-ACTION of the Storage Commitment Push Model: read the Transaction UID
 * and the instances, and let the C side take the request.
 */
bool
mddHandleCommitAction(MddServedAssociation &sa, T_ASC_PresentationContextID presID,
					  T_DIMSE_N_ActionRQ &req)
{
	DcmDataset *ds = NULL;
	T_ASC_PresentationContextID dataPresID = presID;
	OFCondition cond;
	OFString	transaction;
	std::vector<Reference> refs;
	char		comment[256] = "";
	unsigned short status;

	if (req.DataSetType == DIMSE_DATASET_NULL)
		return sendActionResponse(sa, presID, req, 0x0120, "no action information (Missing attribute)");
	cond = DIMSE_receiveDataSetInMemory(sa.assoc, DIMSE_BLOCKING, sa.config->dimse_timeout,
										&dataPresID, &ds, NULL, NULL);
	if (cond.bad() || ds == NULL)
	{
		sa.log(MDD_LOG_WARNING, "N-ACTION from " + sa.callingAE + ": no action information: " +
			   cond.text());
		delete ds;
		return false;
	}
	std::unique_ptr<DcmDataset> owner(ds);

	if (strcmp(req.RequestedSOPClassUID, UID_StorageCommitmentPushModelSOPClass) != 0)
		return sendActionResponse(sa, presID, req, 0x0118, "no such SOP class");
	if (strcmp(req.RequestedSOPInstanceUID, commitmentInstance) != 0)
		return sendActionResponse(sa, presID, req, 0x0117, "invalid object instance: use 1.2.840.10008.1.20.1.1");
	if (req.ActionTypeID != 1)
		return sendActionResponse(sa, presID, req, 0x0123, "no such action type");
	if (!(sa.permits & MDD_PERMIT_STORE))
		return sendActionResponse(sa, presID, req, 0x0124,
								  (sa.callingAE + " may not store to this archive").c_str());
	if (ds->findAndGetOFString(DCM_TransactionUID, transaction).bad() || transaction.empty())
		return sendActionResponse(sa, presID, req, 0x0120, "no Transaction UID (Missing attribute)");
	if (!readReferences(*ds, refs))
		return sendActionResponse(sa, presID, req, 0x0120,
								  "no Referenced SOP Sequence, or an item without its UIDs");

	std::vector<const char *> classes,
				instances;

	for (const Reference &r : refs)
	{
		classes.push_back(r.sopClass.c_str());
		instances.push_back(r.sopInstance.c_str());
	}
	status = sa.cb->commit(sa.cb->arg, transaction.c_str(), classes.data(), instances.data(),
						   (int) refs.size(), comment, sizeof(comment));
	return sendActionResponse(sa, presID, req, status, status == STATUS_Success ? NULL : comment);
}

/*
 * The N-EVENT-REPORT of a storage commitment transaction, on an association
 * from our_ae to the requester, in which mdd takes the SCP role of the
 * Storage Commitment Push Model.  reasons[i] is 0 for an instance mdd
 * holds, else the Failure Reason.
 */
extern "C" MddDicomStatus
mdd_dicom_commit_report(const char *our_ae, const char *peer_ae, const char *host, int port,
						int timeout, const MddTlsSettings *tls, const char *transaction_uid,
						const char *const *classes, const char *const *instances,
						const int *reasons, int n, char *errbuf, size_t errbuf_len)
{
	mddSetError(errbuf, errbuf_len, "");
	try
	{
		MddScuAssociation a;
		MddProposedContext commitment;
		std::string error;
		DcmDataset	report;
		DcmSequenceOfItems *good = new DcmSequenceOfItems(DCM_ReferencedSOPSequence);
		DcmSequenceOfItems *bad = new DcmSequenceOfItems(DCM_FailedSOPSequence);
		T_DIMSE_Message msg;
		T_DIMSE_Message rsp;
		T_ASC_PresentationContextID presID = 0;
		DcmDataset *detail = NULL;
		OFCondition cond;
		int			failures = 0;

		report.putAndInsertString(DCM_TransactionUID, transaction_uid);
		for (int i = 0; i < n; i++)
		{
			DcmItem    *item = new DcmItem();

			item->putAndInsertString(DCM_ReferencedSOPClassUID, classes[i]);
			item->putAndInsertString(DCM_ReferencedSOPInstanceUID, instances[i]);
			if (reasons[i] != 0)
			{
				item->putAndInsertUint16(DCM_FailureReason, (Uint16) reasons[i]);
				failures++;
			}
			(reasons[i] == 0 ? good : bad)->insert(item);
		}
		if (good->card() > 0)
			report.insert(good);
		else
			delete good;
		if (bad->card() > 0)
			report.insert(bad);
		else
			delete bad;

		commitment.abstractSyntax = UID_StorageCommitmentPushModelSOPClass;
		commitment.transferSyntaxes.assign(mddUncompressedTransferSyntaxes,
										   mddUncompressedTransferSyntaxes + 3);
		commitment.role = ASC_SC_ROLE_SCP;
		a.useTls(tls);
		if (!a.open(our_ae, peer_ae, host, port, timeout, {commitment}, error))
		{
			mddSetError(errbuf, errbuf_len, error);
			return MDD_DICOM_NETWORK;
		}
		presID = ASC_findAcceptedPresentationContextID(a.get(), UID_StorageCommitmentPushModelSOPClass);
		if (presID == 0)
		{
			mddSetError(errbuf, errbuf_len, std::string(peer_ae) +
						" did not accept the Storage Commitment Push Model with mdd as its SCP");
			a.abort();
			return MDD_DICOM_NETWORK;
		}

		memset(&msg, 0, sizeof(msg));
		msg.CommandField = DIMSE_N_EVENT_REPORT_RQ;
		msg.msg.NEventReportRQ.MessageID = a.get()->nextMsgID++;
		OFStandard::strlcpy(msg.msg.NEventReportRQ.AffectedSOPClassUID,
							UID_StorageCommitmentPushModelSOPClass,
							sizeof(msg.msg.NEventReportRQ.AffectedSOPClassUID));
		OFStandard::strlcpy(msg.msg.NEventReportRQ.AffectedSOPInstanceUID, commitmentInstance,
							sizeof(msg.msg.NEventReportRQ.AffectedSOPInstanceUID));
		/* 1: every instance committed; 2: some failed */
		msg.msg.NEventReportRQ.EventTypeID = failures > 0 ? 2 : 1;
		msg.msg.NEventReportRQ.DataSetType = DIMSE_DATASET_PRESENT;
		cond = DIMSE_sendMessageUsingMemoryData(a.get(), presID, &msg, NULL, &report, NULL, NULL);
		if (cond.good())
			cond = DIMSE_receiveCommand(a.get(), DIMSE_BLOCKING, timeout, &presID, &rsp, &detail);
		delete detail;
		if (cond.bad())
		{
			mddSetError(errbuf, errbuf_len, std::string("N-EVENT-REPORT to ") + peer_ae +
						" failed: " + cond.text());
			a.abort();
			return MDD_DICOM_NETWORK;
		}
		if (rsp.CommandField != DIMSE_N_EVENT_REPORT_RSP ||
			rsp.msg.NEventReportRSP.MessageIDBeingRespondedTo != msg.msg.NEventReportRQ.MessageID)
		{
			mddSetError(errbuf, errbuf_len, std::string(peer_ae) + " answered the N-EVENT-REPORT with DIMSE message " +
						std::to_string(rsp.CommandField));
			a.abort();
			return MDD_DICOM_NETWORK;
		}
		if (rsp.msg.NEventReportRSP.DataSetType != DIMSE_DATASET_NULL)
		{
			DcmDataset *extra = NULL;

			DIMSE_receiveDataSetInMemory(a.get(), DIMSE_BLOCKING, timeout, &presID, &extra, NULL, NULL);
			delete extra;
		}
		if (rsp.msg.NEventReportRSP.DimseStatus != STATUS_Success)
		{
			char		hex[8];

			snprintf(hex, sizeof(hex), "0x%04X", rsp.msg.NEventReportRSP.DimseStatus);
			mddSetError(errbuf, errbuf_len, std::string(peer_ae) + " answered the N-EVENT-REPORT with status " + hex);
			a.release();
			return MDD_DICOM_REFUSED;
		}
		a.release();
		return MDD_DICOM_OK;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "N-EVENT-REPORT failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}
