/*
 * dicom_net.cpp
 *	  The DICOM network side of mdd with DCMTK's dcmnet: serving one
 *	  association on a connection a listener worker accepted
 *	  (mdd_dicom_serve of dicom.h): negotiation, C-ECHO, C-STORE, C-FIND,
 *	  and the dispatch of C-MOVE and C-GET to dicom_retrieve.cpp and of
 *	  Storage Commitment's N-ACTION to dicom_commit.cpp.
 *
 * Received data sets are never parsed and re-encoded here: their bytes are
 * taken as they arrive and wrapped in a Part 10 file meta header, so the
 * archive keeps exactly what the modality sent.  Everything that touches
 * the database happens in the C callbacks.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes.
 */
#include "dicom.h"
#include "dicom_common.hpp"
#include "dicom_pdu_check.hpp"
#include "dicom_json.hpp"
#include "dicom_scu.hpp"
#include "dicom_service.hpp"
#include "dicom_tls.hpp"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dimse.h>
#include <dcmtk/dcmnet/diutil.h>
#include <dcmtk/dcmnet/dul.h>
#include <dcmtk/oflog/oflog.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <ctime>
#include <memory>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace
{

/*
 * The smallest maximum PDU length we accept from a peer: below this DCMTK
 * cannot send our answers (it needs room for a PDV header and data), so an
 * object would be stored without the peer ever hearing so.
 */
#define MDD_MIN_PEER_PDU 14

/*
 * Transfer syntaxes we accept, most preferred first: a compressed syntax the
 * sender offers is taken as it is rather than asking it to decompress.
 */
const char *acceptedTransferSyntaxes[] = {
	UID_JPEGProcess14SV1TransferSyntax,
	UID_JPEGProcess14TransferSyntax,
	UID_JPEGLSLosslessTransferSyntax,
	UID_JPEG2000LosslessOnlyTransferSyntax,
	UID_RLELosslessTransferSyntax,
	UID_JPEGProcess1TransferSyntax,
	UID_JPEGProcess2_4TransferSyntax,
	UID_JPEGLSLossyTransferSyntax,
	UID_JPEG2000TransferSyntax,
	UID_MPEG2MainProfileAtMainLevelTransferSyntax,
	UID_MPEG4HighProfileLevel4_1TransferSyntax,
	UID_DeflatedExplicitVRLittleEndianTransferSyntax,
	UID_LittleEndianExplicitTransferSyntax,
	UID_BigEndianExplicitTransferSyntax,
	UID_LittleEndianImplicitTransferSyntax,
};
const int numberOfAcceptedTransferSyntaxes =
	sizeof(acceptedTransferSyntaxes) / sizeof(acceptedTransferSyntaxes[0]);


std::string
trimAE(const char *ae)
{
	std::string s(ae ? ae : "");

	while (!s.empty() && s.back() == ' ')
		s.pop_back();
	size_t		start = s.find_first_not_of(' ');

	return start == std::string::npos ? "" : s.substr(start);
}

/* the DIMSE loop of one association being served */
class Association
{
public:
	Association(const MddServedAssociation &sa) : sa_(sa), stored_(0), failed_(0) {}

	/* the DIMSE loop; returns false when the association was aborted */
	bool serve();

private:
	void log(int level, const std::string &msg) { sa_.log(level, msg); }
	bool handleStore(T_ASC_PresentationContextID presID, T_DIMSE_C_StoreRQ &req);
	bool handleFind(T_ASC_PresentationContextID presID, T_DIMSE_C_FindRQ &req);
	bool sendFindStatus(T_ASC_PresentationContextID presID, T_DIMSE_C_FindRQ &req,
						unsigned short status, const char *comment);
	bool sendMatches(T_ASC_PresentationContextID presID, T_DIMSE_C_FindRQ &req,
					 const OFString &level, const std::vector<DcmTagKey> &asked,
					 const MddFindResult &result, bool &cancelled);

	MddServedAssociation sa_;
	int			stored_;
	int			failed_;
};

bool
Association::handleStore(T_ASC_PresentationContextID presID, T_DIMSE_C_StoreRQ &req)
{
	MddMemoryOutputStream stream;
	T_ASC_PresentationContextID dataPresID = presID;
	T_ASC_PresentationContext pc;
	T_DIMSE_C_StoreRSP rsp;
	DcmDataset	detail;
	char		comment[256] = "";
	OFCondition cond;

	cond = DIMSE_receiveDataSetInFile(sa_.assoc, DIMSE_BLOCKING, sa_.config->dimse_timeout,
									  &dataPresID, &stream, NULL, NULL);
	if (cond.bad())
	{
		log(MDD_LOG_WARNING, std::string("C-STORE of ") + req.AffectedSOPInstanceUID +
			" from " + sa_.callingAE + " broke off while receiving the data set: " +
			cond.text() + "; nothing was stored");
		return false;
	}

	rsp = mddStoreResponse(req);

	if (!(sa_.permits & MDD_PERMIT_STORE))
	{
		rsp.DimseStatus = 0x0124;	/* Refused: Not Authorized */
		snprintf(comment, sizeof(comment), "%s may not store to this archive",
				 sa_.callingAE.c_str());
	}
	else if (dataPresID != presID ||
			 ASC_findAcceptedPresentationContext(sa_.assoc->params, dataPresID, &pc).bad())
	{
		rsp.DimseStatus = STATUS_STORE_Error_CannotUnderstand;
		snprintf(comment, sizeof(comment), "data set on another presentation context");
	}
	else
	{
		std::vector<unsigned char> file =
			mddPart10File(stream.bytes(), req.AffectedSOPClassUID, req.AffectedSOPInstanceUID,
					   pc.acceptedTransferSyntax, sa_.callingAE);

		stream.bytes().clear();
		stream.bytes().shrink_to_fit();
		rsp.DimseStatus = sa_.cb->store(sa_.cb->arg, file.data(), file.size(),
									 req.AffectedSOPClassUID, req.AffectedSOPInstanceUID,
									 comment, sizeof(comment));
	}

	if (rsp.DimseStatus == STATUS_Success)
		stored_++;
	else
	{
		char		what[1024];

		failed_++;
		if (comment[0])
			mddPutErrorComment(detail, comment);
		/* a refused or failed store leaves no row of its own: audit it */
		snprintf(what, sizeof(what), "C-STORE of %s (%s) refused with status 0x%04X: %s",
				 req.AffectedSOPInstanceUID, req.AffectedSOPClassUID, rsp.DimseStatus, comment);
		if (sa_.cb->audit)
			sa_.cb->audit(sa_.cb->arg, "c-store refused", what);
	}
	cond = DIMSE_sendStoreResponse(sa_.assoc, presID, &req, &rsp,
								   rsp.DimseStatus == STATUS_Success ? NULL : &detail);
	if (cond.bad())
	{
		log(MDD_LOG_WARNING, std::string("could not answer C-STORE to ") + sa_.callingAE +
			": " + cond.text());
		return false;
	}
	return true;
}

/* the final C-FIND response, with an Error Comment for failures */
bool
Association::sendFindStatus(T_ASC_PresentationContextID presID, T_DIMSE_C_FindRQ &req,
							unsigned short status, const char *comment)
{
	T_DIMSE_C_FindRSP rsp;
	DcmDataset	detail;

	memset(&rsp, 0, sizeof(rsp));
	rsp.MessageIDBeingRespondedTo = req.MessageID;
	rsp.DimseStatus = status;
	rsp.DataSetType = DIMSE_DATASET_NULL;
	OFStandard::strlcpy(rsp.AffectedSOPClassUID, req.AffectedSOPClassUID,
						sizeof(rsp.AffectedSOPClassUID));
	rsp.opts = O_FIND_AFFECTEDSOPCLASSUID;
	if (comment && comment[0])
		mddPutErrorComment(detail, comment);
	/* a refused or failed query: the ones served are audited with their matches */
	if (status != STATUS_Success && status != STATUS_FIND_Cancel_MatchingTerminatedDueToCancelRequest &&
		sa_.cb->audit)
	{
		char		what[1024];

		snprintf(what, sizeof(what), "C-FIND (%s) refused with status 0x%04X: %s",
				 req.AffectedSOPClassUID, status, comment ? comment : "");
		sa_.cb->audit(sa_.cb->arg, "c-find refused", what);
	}
	return DIMSE_sendFindResponse(sa_.assoc, presID, &req, &rsp, NULL,
								  comment && comment[0] ? &detail : NULL).good();
}

/*
 * Send the matches of result as pending C-FIND responses, each holding every
 * key that was asked (asked) and the values result has, in UTF-8.  Stops
 * at a C-CANCEL (cancelled set).  False when a response could not be sent.
 */
bool
Association::sendMatches(T_ASC_PresentationContextID presID, T_DIMSE_C_FindRQ &req,
						 const OFString &level, const std::vector<DcmTagKey> &asked,
						 const MddFindResult &result, bool &cancelled)
{
	bool		ok = true;
	int			item = 0;
	std::unordered_map<const char *, std::pair<bool, DcmTag>> tags;

	for (int row = 0; row < result.nrows && ok; row++)
	{
		DcmDataset	match;
		T_DIMSE_C_FindRSP rsp;

		if (DIMSE_checkForCancelRQ(sa_.assoc, presID, req.MessageID).good())
		{
			cancelled = true;
			break;
		}
		match.putAndInsertString(DCM_SpecificCharacterSet, "ISO_IR 192");
		match.putAndInsertString(DCM_QueryRetrieveLevel, level.c_str());
		for (const DcmTagKey &key : asked)
			match.insertEmptyElement(key);
		for (; item < result.nitems && result.items[item].row == row; item++)
		{
			/* a keyword's text is shared by all rows: look its tag up once */
			const char *keyword = result.items[item].keyword;
			auto		known = tags.find(keyword);

			if (known == tags.end())
			{
				DcmTag		tag;
				bool		found = DcmTag::findTagFromName(keyword, tag).good();

				known = tags.emplace(keyword, std::make_pair(found, tag)).first;
			}
			if (known->second.first)
				match.putAndInsertString(known->second.second, result.items[item].value);
		}

		memset(&rsp, 0, sizeof(rsp));
		rsp.MessageIDBeingRespondedTo = req.MessageID;
		rsp.DimseStatus = STATUS_FIND_Pending_MatchesAreContinuing;
		rsp.DataSetType = DIMSE_DATASET_PRESENT;
		OFStandard::strlcpy(rsp.AffectedSOPClassUID, req.AffectedSOPClassUID,
							sizeof(rsp.AffectedSOPClassUID));
		rsp.opts = O_FIND_AFFECTEDSOPCLASSUID;
		ok = DIMSE_sendFindResponse(sa_.assoc, presID, &req, &rsp, &match, NULL).good();
	}
	return ok;
}

/*
 * C-FIND: the identifier's keys go to the C side as JSON; each match comes
 * back as a pending response holding every key that was asked, in UTF-8.
 */
bool
Association::handleFind(T_ASC_PresentationContextID presID, T_DIMSE_C_FindRQ &req)
{
	DcmDataset *ids = NULL;
	T_ASC_PresentationContextID dataPresID = presID;
	OFCondition cond;
	std::string model;
	std::vector<DcmTagKey> asked;
	OFString	level;
	MddFindResult result;
	char		comment[256] = "";
	unsigned short status;

	cond = DIMSE_receiveDataSetInMemory(sa_.assoc, DIMSE_BLOCKING, sa_.config->dimse_timeout,
										&dataPresID, &ids, NULL, NULL);
	if (cond.bad() || ids == NULL)
	{
		log(MDD_LOG_WARNING, "C-FIND from " + sa_.callingAE + ": no identifier: " + cond.text());
		delete ids;
		return false;
	}
	std::unique_ptr<DcmDataset> owner(ids);

	if (strcmp(req.AffectedSOPClassUID, UID_FINDPatientRootQueryRetrieveInformationModel) == 0)
		model = "PATIENT";
	else if (strcmp(req.AffectedSOPClassUID, UID_FINDStudyRootQueryRetrieveInformationModel) == 0)
		model = "STUDY";
	else
		return sendFindStatus(presID, req, 0xA900, "unsupported information model");
	if (!(sa_.permits & MDD_PERMIT_QUERY))
		return sendFindStatus(presID, req, 0x0124,
							  (sa_.callingAE + " may not query this archive").c_str());

	std::string keys = mddIdentifierKeys(ids, &asked, &level);

	memset(&result, 0, sizeof(result));
	status = sa_.cb->find(sa_.cb->arg, model.c_str(), level.c_str(), keys.c_str(),
					   &result, comment, sizeof(comment));
	if (status != STATUS_Success)
		return sendFindStatus(presID, req, status, comment);

	bool		cancelled = false;
	bool		ok = sendMatches(presID, req, level, asked, result, cancelled);

	free(result.items);
	free(result.strings);
	if (!ok)
		return false;

	/* query spanning: the nodes' matches, after the local ones went */
	if (!cancelled && sa_.cb->find_remote)
	{
		memset(&result, 0, sizeof(result));
		status = sa_.cb->find_remote(sa_.cb->arg, model.c_str(), level.c_str(), keys.c_str(),
									 &result, comment, sizeof(comment));
		if (status != STATUS_Success)
			log(MDD_LOG_WARNING, "C-FIND from " + sa_.callingAE +
				": the spanned nodes' matches are left out: " + comment);
		else
		{
			ok = sendMatches(presID, req, level, asked, result, cancelled);
			free(result.items);
			free(result.strings);
			if (!ok)
				return false;
		}
	}
	return sendFindStatus(presID, req,
						  cancelled ? STATUS_FIND_Cancel_MatchingTerminatedDueToCancelRequest
						  : STATUS_Success, NULL);
}

bool
Association::serve()
{
	time_t		lastActivity = time(NULL);

	for (;;)
	{
		T_DIMSE_Message msg;
		T_ASC_PresentationContextID presID = 0;
		DcmDataset *statusDetail = NULL;
		OFCondition cond;

		if (sa_.cb->should_stop(sa_.cb->arg))
		{
			log(MDD_LOG_INFO, "aborting association with " + sa_.callingAE + ": server shutting down");
			ASC_abortAssociation(sa_.assoc);
			return false;
		}

		/*
		 * Wait for the next command where a stop request wakes us at once:
		 * on the socket, unless DCMTK already holds data read ahead.
		 */
		if (!mddWaitForMessage(sa_.assoc, sa_.fd, 1, sa_.cb))
			cond = DIMSE_NODATAAVAILABLE;
		else
		{
			cond = DIMSE_receiveCommand(sa_.assoc, DIMSE_BLOCKING, sa_.config->dimse_timeout,
										&presID, &msg, &statusDetail);
			delete statusDetail;
		}

		if (cond == DIMSE_NODATAAVAILABLE)
		{
			if (time(NULL) - lastActivity >= sa_.config->dimse_timeout)
			{
				log(MDD_LOG_INFO, "aborting association with " + sa_.callingAE +
					": idle for longer than the DIMSE timeout");
				ASC_abortAssociation(sa_.assoc);
				return false;
			}
			continue;
		}
		lastActivity = time(NULL);
		if (cond == DUL_PEERREQUESTEDRELEASE)
		{
			ASC_acknowledgeRelease(sa_.assoc);
			log(MDD_LOG_DEBUG, "association with " + sa_.callingAE + " released: " +
				std::to_string(stored_) + " stored, " + std::to_string(failed_) + " failed");
			return true;
		}
		if (cond == DUL_PEERABORTEDASSOCIATION)
		{
			log(MDD_LOG_INFO, "association with " + sa_.callingAE + " aborted by the peer");
			return false;
		}
		if (cond.bad())
		{
			log(MDD_LOG_WARNING, "association with " + sa_.callingAE + " failed: " + cond.text());
			ASC_abortAssociation(sa_.assoc);
			return false;
		}

		switch (msg.CommandField)
		{
			case DIMSE_C_ECHO_RQ:
				cond = DIMSE_sendEchoResponse(sa_.assoc, presID, &msg.msg.CEchoRQ,
											  STATUS_Success, NULL);
				break;
			case DIMSE_C_FIND_RQ:
				if (!handleFind(presID, msg.msg.CFindRQ))
				{
					ASC_abortAssociation(sa_.assoc);
					return false;
				}
				break;
			case DIMSE_C_STORE_RQ:
				if (!handleStore(presID, msg.msg.CStoreRQ))
				{
					ASC_abortAssociation(sa_.assoc);
					return false;
				}
				break;
			case DIMSE_C_MOVE_RQ:
				if (!mddHandleMove(sa_, presID, msg.msg.CMoveRQ))
				{
					ASC_abortAssociation(sa_.assoc);
					return false;
				}
				break;
			case DIMSE_C_GET_RQ:
				if (!mddHandleGet(sa_, presID, msg.msg.CGetRQ))
				{
					ASC_abortAssociation(sa_.assoc);
					return false;
				}
				break;
			case DIMSE_N_ACTION_RQ:
				if (!mddHandleCommitAction(sa_, presID, msg.msg.NActionRQ))
				{
					ASC_abortAssociation(sa_.assoc);
					return false;
				}
				break;
			default:
				log(MDD_LOG_WARNING, "aborting association with " + sa_.callingAE +
					": unsupported DIMSE command " + std::to_string(msg.CommandField));
				ASC_abortAssociation(sa_.assoc);
				return false;
		}
		if (cond.bad())
		{
			ASC_abortAssociation(sa_.assoc);
			return false;
		}
	}
}

/*
 * Accept the presentation contexts we serve; refuse the rest.  Storage
 * contexts are accepted in the role the peer proposes: a C-GET requestor
 * takes the SCP role to receive what it asked for.
 */
OFCondition
acceptContexts(T_ASC_Parameters *params)
{
	const char *uncompressedServices[] = {
		UID_VerificationSOPClass,
		UID_FINDPatientRootQueryRetrieveInformationModel,
		UID_FINDStudyRootQueryRetrieveInformationModel,
		UID_MOVEPatientRootQueryRetrieveInformationModel,
		UID_MOVEStudyRootQueryRetrieveInformationModel,
		UID_GETPatientRootQueryRetrieveInformationModel,
		UID_GETStudyRootQueryRetrieveInformationModel,
		UID_StorageCommitmentPushModelSOPClass,
	};
	OFCondition cond;
	int			n = ASC_countPresentationContexts(params);

	cond = ASC_acceptContextsWithPreferredTransferSyntaxes(
		params, uncompressedServices, 8, const_cast<const char **>(mddUncompressedTransferSyntaxes), 3);
	for (int i = 0; i < n && cond.good(); i++)
	{
		T_ASC_PresentationContext pc;

		cond = ASC_getPresentationContext(params, i, &pc);
		if (cond.bad() || !dcmIsaStorageSOPClassUID(pc.abstractSyntax))
			continue;

		/*
		 * Our preference decides among the syntaxes proposed.  Where the
		 * peer takes the SCP role (to receive a C-GET's objects), an
		 * uncompressed syntax comes first: any uncompressed object can be
		 * sent in it, while a compressed one fits only objects stored so.
		 */
		bool		receiving = pc.proposedRole == ASC_SC_ROLE_SCP ||
			pc.proposedRole == ASC_SC_ROLE_SCUSCP;
		std::vector<const char *> preference;

		if (receiving)
			preference.assign(mddUncompressedTransferSyntaxes, mddUncompressedTransferSyntaxes + 3);
		preference.insert(preference.end(), acceptedTransferSyntaxes,
						  acceptedTransferSyntaxes + numberOfAcceptedTransferSyntaxes);
		for (const char *ts : preference)
		{
			bool		proposed = false;

			for (int j = 0; j < pc.transferSyntaxCount; j++)
				proposed = proposed || strcmp(pc.proposedTransferSyntaxes[j], ts) == 0;
			if (proposed)
			{
				cond = ASC_acceptPresentationContext(params, pc.presentationContextID, ts,
													 pc.proposedRole);
				break;
			}
		}
	}
	return cond;
}

MddDicomStatus
serve(int fd, const MddDicomServerConfig *config, const MddDicomCallbacks *cb,
	  char *errbuf, size_t errbuf_len)
{
	T_ASC_Network *net = NULL;
	T_ASC_Association *assoc = NULL;
	MddDicomStatus result = MDD_DICOM_OK;
	OFCondition cond;

	mddInitialiseDcmtk();
	dcmExternalSocketHandle.set(fd);
	/*
	 * The network's own timeout is DCMTK's ARTIM timer: how long to wait for
	 * the peer to close the connection after a release or an abort.  A
	 * second is plenty, and keeps a stop request from waiting on a peer
	 * that never closes.  The wait for the association request has its own
	 * timeout (ASC_receiveAssociation below).
	 */
	cond = ASC_initializeNetwork(NET_ACCEPTOR, 0, 1, &net);
	if (cond.good() && config->tls)
	{
		/* the TLS port: DCMTK's TLS layer (dicom_tls.cpp) */
		std::string error;
		DcmTransportLayer *layer = mddNewTlsLayer(true, config->tls, nullptr, error);

		if (layer == NULL)
		{
			dcmExternalSocketHandle.set(DCMNET_INVALID_SOCKET);
			ASC_dropNetwork(&net);
			mddSetError(errbuf, errbuf_len, "cannot use the TLS settings: " + error);
			return MDD_DICOM_NETWORK;
		}
		cond = ASC_setTransportLayer(net, layer, 1);
	}
	else if (cond.good())
		cond = ASC_setTransportLayer(net, mddNewCheckedLayer(config->max_pdu,
															 std::min(config->acse_timeout,
																	  config->dimse_timeout)), 1);
	if (cond.bad())
	{
		dcmExternalSocketHandle.set(DCMNET_INVALID_SOCKET);
		mddSetError(errbuf, errbuf_len, std::string("cannot set up the network: ") + cond.text());
		return MDD_DICOM_NETWORK;
	}

	/* "secure layer" makes DCMTK take the connection from CheckedLayer */
	cond = ASC_receiveAssociation(net, &assoc, config->max_pdu, NULL, NULL, OFTrue,
								  DUL_NOBLOCK, config->acse_timeout);
	dcmExternalSocketHandle.set(DCMNET_INVALID_SOCKET);
	if (cond.good() && mddCheckedConnectionFailed(DUL_getTransportConnection(assoc->DULassociation)))
		cond = DUL_ILLEGALPDU;
	if (cond.bad())
	{
		std::string text = std::string("association request failed: ") + cond.text();

		mddSetError(errbuf, errbuf_len, config->tls ? mddTlsErrorText(text) : text);
		result = MDD_DICOM_NETWORK;
		if (assoc)
			ASC_dropAssociation(assoc);
	}
	else
	{
		char		callingAE[20] = "",
					calledAE[20] = "",
					reason[256] = "";
		DIC_NODENAME peerHost;
		int			permits;

		ASC_getAPTitles(assoc->params, callingAE, sizeof(callingAE), calledAE,
						sizeof(calledAE), NULL, 0);
		ASC_getPresentationAddresses(assoc->params, peerHost, sizeof(peerHost), NULL, 0);

		std::string calling = trimAE(callingAE);
		std::string called = trimAE(calledAE);

		unsigned long theirMax = assoc->params->theirMaxPDUReceiveSize;

		if (theirMax != 0 && theirMax < MDD_MIN_PEER_PDU)
		{
			snprintf(reason, sizeof(reason),
					 "peer announces a maximum PDU length of %lu bytes (at least %d needed)",
					 theirMax, MDD_MIN_PEER_PDU);
			permits = 0;
		}
		else
		{
			std::string transport = config->tls ? "TLS " + mddTlsLastHandshake() : "";

			permits = cb->admit(cb->arg, calling.c_str(), called.c_str(), peerHost,
								config->tls ? transport.c_str() : NULL,
								reason, sizeof(reason));
		}
		if (permits == 0 && cb->log && theirMax != 0 && theirMax < MDD_MIN_PEER_PDU)
			cb->log(cb->arg, MDD_LOG_WARNING, (std::string("refused association from ") +
											   calling + ": " + reason).c_str());
		if (permits == 0)
		{
			T_ASC_RejectParameters rej = {ASC_RESULT_REJECTEDPERMANENT,
				ASC_SOURCE_SERVICEUSER,
				(theirMax != 0 && theirMax < MDD_MIN_PEER_PDU) ? ASC_REASON_SU_NOREASON
				: called != config->ae_title ? ASC_REASON_SU_CALLEDAETITLENOTRECOGNIZED
				: ASC_REASON_SU_CALLINGAETITLENOTRECOGNIZED};

			ASC_rejectAssociation(assoc, &rej);
		}
		else if ((cond = acceptContexts(assoc->params)).bad() ||
				 (cond = ASC_acknowledgeAssociation(assoc)).bad())
		{
			mddSetError(errbuf, errbuf_len, std::string("could not accept association: ") + cond.text());
			result = MDD_DICOM_NETWORK;
			ASC_abortAssociation(assoc);
		}
		else
		{
			MddServedAssociation sa = {assoc, fd, config, cb, permits, calling};
			Association a(sa);

			if (!a.serve())
			{
				mddSetError(errbuf, errbuf_len, "association aborted");
				result = MDD_DICOM_NETWORK;
			}
		}
		ASC_dropSCPAssociation(assoc, 1);
		ASC_destroyAssociation(&assoc);
	}
	if (assoc)
		ASC_destroyAssociation(&assoc);
	ASC_dropNetwork(&net);
	return result;
}

}								/* namespace */

extern "C" MddDicomStatus
mdd_dicom_serve(int fd, const MddDicomServerConfig *config,
				const MddDicomCallbacks *callbacks, char *errbuf, size_t errbuf_len)
{
	if (errbuf && errbuf_len > 0)
		errbuf[0] = '\0';
	try
	{
		return serve(fd, config, callbacks, errbuf, errbuf_len);
	}
	catch (const std::bad_alloc &)
	{
		mddSetError(errbuf, errbuf_len, "out of memory while serving an association");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "DICOM service failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}
