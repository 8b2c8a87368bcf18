/*
 * dicom_fetch.cpp
 *	  mdd asking a node for objects (the fetch functions of dicom.h), for
 *	  the retrieve and move jobs: which instances of a study, series or
 *	  instance the node holds (C-FIND in the Study Root model, level by
 *	  level), and C-MOVE of them to an AE title or C-GET of them on the
 *	  association.
 *
 * Every wait for the node looks at should_stop at least once a second and
 * wakes at once through wait_readable; the socket of the association is
 * handed to the C side as soon as it is connected, so that a stop request
 * can shut it down under a read DCMTK is blocked in.  While a C-MOVE or
 * C-GET runs, the progress callback hears each pending response, and is
 * asked once a second whether the work goes on: that is where a cancelled
 * job stops, and how a node that sends its objects without pending
 * responses is known to be still at work.
 *
 * Objects that a C-GET brings are handed to the C side one by one, as a
 * Part 10 file around the data set bytes exactly as they arrived, as the
 * listener does with a C-STORE.
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

#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <new>
#include <set>
#include <string>
#include <vector>

namespace
{

/* compressed transfer syntaxes a C-GET offers to receive objects in */
const char *const compressedSyntaxes[] = {
	UID_JPEGProcess14SV1TransferSyntax,
	UID_JPEGProcess14TransferSyntax,
	UID_JPEGLSLosslessTransferSyntax,
	UID_JPEG2000LosslessOnlyTransferSyntax,
	UID_RLELosslessTransferSyntax,
	UID_JPEGProcess1TransferSyntax,
	UID_JPEGProcess2_4TransferSyntax,
	UID_JPEGLSLossyTransferSyntax,
	UID_JPEG2000TransferSyntax,
	UID_DeflatedExplicitVRLittleEndianTransferSyntax,
};
const size_t numberOfCompressedSyntaxes = sizeof(compressedSyntaxes) / sizeof(compressedSyntaxes[0]);

/* the storage classes a C-GET proposes when the node did not say which */
const char *const usualClasses[] = {
	UID_CTImageStorage,
	UID_EnhancedCTImageStorage,
	UID_MRImageStorage,
	UID_EnhancedMRImageStorage,
	UID_PositronEmissionTomographyImageStorage,
	UID_EnhancedPETImageStorage,
	UID_NuclearMedicineImageStorage,
	UID_RTImageStorage,
	UID_RTDoseStorage,
	UID_RTStructureSetStorage,
	UID_RTPlanStorage,
	UID_RTIonPlanStorage,
	UID_RTBeamsTreatmentRecordStorage,
	UID_RTIonBeamsTreatmentRecordStorage,
	UID_RTBrachyTreatmentRecordStorage,
	UID_RTTreatmentSummaryRecordStorage,
	UID_SpatialRegistrationStorage,
	UID_DeformableSpatialRegistrationStorage,
	UID_SegmentationStorage,
	UID_SecondaryCaptureImageStorage,
	UID_ComputedRadiographyImageStorage,
	UID_DigitalXRayImageStorageForPresentation,
	UID_UltrasoundImageStorage,
	UID_EncapsulatedPDFStorage,
	UID_BasicTextSRStorage,
	UID_EnhancedSRStorage,
	UID_GrayscaleSoftcopyPresentationStateStorage,
	UID_RawDataStorage,
};

/*
 * Up to this many SOP classes get a context of their own per transfer
 * syntax in a C-GET (1 + 10 x 12 contexts of the 128 an association may
 * have), so that the node can send each object in the syntax it keeps it
 * in; more classes, or classes the node did not name, get three contexts
 * each: explicit VR, implicit VR, and the compressed syntaxes together.
 */
const size_t maxExactClasses = 10;
const size_t maxContexts = 128;

bool
isPending(DIC_US status)
{
	return status == 0xFF00 || status == 0xFF01;
}

/* a UID a node answered: 1 to 64 digits and dots */
bool
plausibleUid(const char *uid)
{
	size_t		n = strlen(uid);

	if (n == 0 || n > 64)
		return false;
	for (size_t i = 0; i < n; i++)
		if (!(uid[i] == '.' || (uid[i] >= '0' && uid[i] <= '9')))
			return false;
	return true;
}

std::string
errorComment(DcmDataset *detail)
{
	OFString	text;

	if (detail && detail->findAndGetOFString(DCM_ErrorComment, text).good())
		return std::string(text.c_str());
	return "";
}

std::string
statusText(DIC_US status)
{
	char		buf[16];

	snprintf(buf, sizeof(buf), "0x%04X", status);
	return buf;
}

/* one association with the node, and the waits on it */
class Session
{
public:
	Session(const MddFetchPeer *peer, const MddFetchCallbacks *cb) : peer_(peer), cb_(cb) {}
	~Session()
	{
		/* the association aborts in its destructor unless released */
		a_.abort();
	}

	bool open(const std::vector<MddProposedContext> &contexts, std::string &error)
	{
		a_.observeSocket(socketHook, this);
		a_.useTls(peer_->tls);
		return a_.open(peer_->our_ae, peer_->peer_ae, peer_->host, peer_->port,
					   peer_->acse_timeout, contexts, error);
	}
	void release() { a_.release(); }
	T_ASC_Association *assoc() const { return a_.get(); }

	/* the accepted context of an abstract syntax (0 when none) */
	T_ASC_PresentationContextID context(const char *abstractSyntax) const
	{
		return ASC_findAcceptedPresentationContextID(assoc(), abstractSyntax);
	}

	bool find(T_ASC_PresentationContextID presID, DcmDataset &keys,
			  std::vector<std::unique_ptr<DcmDataset>> &matches, DIC_US &status,
			  std::string &comment, std::string &error);
	bool		retrieve(int index, MddFetchRequest &req, const char *destination, std::string &error);

	/* what one message of the node did to the request under way */
	enum Step
	{
		STEP_PENDING, STEP_ANSWERED, STEP_FAILED
	};
	bool		startRetrieve(MddFetchRequest &req, const char *destination, std::string &error);
	Step		receiveRetrieve(int index, MddFetchRequest &req, std::string &error);

	/* whether DCMTK holds data it read ahead; the socket, -1 when closed */
	bool		dataWaiting() const { return ASC_dataWaiting(assoc(), 0) != 0; }
	int			socket() const { return fd_; }

private:
	enum Wait
	{
		READY, STOPPED, SILENT
	};

	static void socketHook(void *arg, int fd)
	{
		Session    *s = static_cast<Session *>(arg);

		s->fd_ = fd;
		if (s->cb_->socket)
			s->cb_->socket(s->cb_->arg, fd);
	}

	Wait		waitForMessage(int request, bool ticks);
	bool		receiveCommand(T_ASC_PresentationContextID *presID, T_DIMSE_Message *msg,
							   std::unique_ptr<DcmDataset> &detail, std::string &error);
	bool		receiveStore(T_ASC_PresentationContextID presID, T_DIMSE_C_StoreRQ &req,
							 std::string &error);

	const MddFetchPeer *peer_;
	const MddFetchCallbacks *cb_;
	int			fd_ = -1;
	DIC_US		nextMessageID_ = 1;
	DIC_US		messageID_ = 0;	/* of the C-MOVE or C-GET under way */
	bool		get_ = false;
	MddScuAssociation a_;		/* last: its destructor calls socketHook */
};

/*
 * Wait for the next message from the node, at most the DIMSE timeout of
 * silence.  With ticks, the progress callback is asked each second; what
 * it says arrived meanwhile restarts the timeout.
 */
Session::Wait
Session::waitForMessage(int request, bool ticks)
{
	time_t		deadline = time(NULL) + peer_->dimse_timeout;

	for (;;)
	{
		bool		readable;

		if (cb_->should_stop(cb_->arg))
			return STOPPED;
		/* DCMTK may hold data it read ahead */
		if (ASC_dataWaiting(assoc(), 0))
			return READY;
		readable = fd_ >= 0 ? cb_->wait_readable(cb_->arg, fd_, 1000) != 0
			: ASC_dataWaiting(assoc(), 1) != 0;
		if (readable)
			return READY;
		if (ticks && cb_->progress)
		{
			MddFetchProgress p = {request, 0, -1, -1, -1, -1};
			int			r = cb_->progress(cb_->arg, &p);

			if (r < 0)
				return STOPPED;
			if (r > 0)
				deadline = time(NULL) + peer_->dimse_timeout;
		}
		if (time(NULL) >= deadline)
			return SILENT;
	}
}

bool
Session::receiveCommand(T_ASC_PresentationContextID *presID, T_DIMSE_Message *msg,
						std::unique_ptr<DcmDataset> &detail, std::string &error)
{
	DcmDataset *d = NULL;
	OFCondition cond = DIMSE_receiveCommand(assoc(), DIMSE_NONBLOCKING, peer_->dimse_timeout,
											presID, msg, &d);

	detail.reset(d);
	if (cond.bad())
	{
		error = std::string("no answer from ") + peer_->peer_ae + ": " + cond.text();
		return false;
	}
	return true;
}

/* one C-FIND in the Study Root model; its matches, final status and comment */
bool
Session::find(T_ASC_PresentationContextID presID, DcmDataset &keys,
			  std::vector<std::unique_ptr<DcmDataset>> &matches, DIC_US &status,
			  std::string &comment, std::string &error)
{
	T_DIMSE_Message req;
	OFCondition cond;

	memset(&req, 0, sizeof(req));
	req.CommandField = DIMSE_C_FIND_RQ;
	T_DIMSE_C_FindRQ &rq = req.msg.CFindRQ;

	rq.MessageID = nextMessageID_++;
	OFStandard::strlcpy(rq.AffectedSOPClassUID, UID_FINDStudyRootQueryRetrieveInformationModel,
						sizeof(rq.AffectedSOPClassUID));
	rq.Priority = DIMSE_PRIORITY_MEDIUM;
	rq.DataSetType = DIMSE_DATASET_PRESENT;
	cond = DIMSE_sendMessageUsingMemoryData(assoc(), presID, &req, NULL, &keys, NULL, NULL);
	if (cond.bad())
	{
		error = std::string("sending the C-FIND failed: ") + cond.text();
		return false;
	}
	for (;;)
	{
		T_DIMSE_Message rsp;
		T_ASC_PresentationContextID rspID = 0;
		std::unique_ptr<DcmDataset> detail;

		switch (waitForMessage(-1, false))
		{
			case STOPPED:
				error = "stopped";
				return false;
			case SILENT:
				error = "no C-FIND response within " + std::to_string(peer_->dimse_timeout) + " s";
				return false;
			case READY:
				break;
		}
		if (!receiveCommand(&rspID, &rsp, detail, error))
			return false;
		if (rsp.CommandField != DIMSE_C_FIND_RSP ||
			rsp.msg.CFindRSP.MessageIDBeingRespondedTo != rq.MessageID)
		{
			error = "unexpected DIMSE message " + std::to_string(rsp.CommandField) +
				" instead of a C-FIND response";
			return false;
		}
		status = rsp.msg.CFindRSP.DimseStatus;
		if (rsp.msg.CFindRSP.DataSetType != DIMSE_DATASET_NULL)
		{
			DcmDataset *match = NULL;

			cond = DIMSE_receiveDataSetInMemory(assoc(), DIMSE_NONBLOCKING, peer_->dimse_timeout,
												&rspID, &match, NULL, NULL);
			if (cond.bad())
			{
				delete match;
				error = std::string("receiving a C-FIND match failed: ") + cond.text();
				return false;
			}
			if (isPending(status))
				matches.emplace_back(match);
			else
				delete match;
		}
		if (isPending(status))
			continue;
		comment = errorComment(detail.get());
		return true;
	}
}

/*
 * A C-STORE sub-operation of our C-GET: the data set as it arrives, handed
 * to the C side, and the answer it gives.  False when the association
 * failed.
 */
bool
Session::receiveStore(T_ASC_PresentationContextID presID, T_DIMSE_C_StoreRQ &req,
					  std::string &error)
{
	MddMemoryOutputStream stream;
	T_ASC_PresentationContextID dataPresID = presID;
	T_ASC_PresentationContext pc;
	T_DIMSE_C_StoreRSP rsp;
	DcmDataset	detail;
	char		comment[256] = "";
	OFCondition cond;

	cond = DIMSE_receiveDataSetInFile(assoc(), DIMSE_NONBLOCKING, peer_->dimse_timeout,
									  &dataPresID, &stream, NULL, NULL);
	if (cond.bad())
	{
		error = std::string("the C-STORE of ") + req.AffectedSOPInstanceUID +
			" broke off while receiving the data set: " + cond.text();
		return false;
	}
	rsp = mddStoreResponse(req);
	if (dataPresID != presID ||
		ASC_findAcceptedPresentationContext(assoc()->params, dataPresID, &pc).bad())
	{
		rsp.DimseStatus = STATUS_STORE_Error_CannotUnderstand;
		snprintf(comment, sizeof(comment), "data set on another presentation context");
	}
	else
	{
		std::vector<unsigned char> file =
			mddPart10File(stream.bytes(), req.AffectedSOPClassUID, req.AffectedSOPInstanceUID,
						  pc.acceptedTransferSyntax, peer_->peer_ae);

		stream.bytes().clear();
		stream.bytes().shrink_to_fit();
		rsp.DimseStatus = cb_->store(cb_->arg, file.data(), file.size(), req.AffectedSOPClassUID,
									 req.AffectedSOPInstanceUID, comment, sizeof(comment));
	}
	if (rsp.DimseStatus != STATUS_Success && comment[0])
		mddPutErrorComment(detail, comment);
	cond = DIMSE_sendStoreResponse(assoc(), presID, &req, &rsp,
								   rsp.DimseStatus == STATUS_Success ? NULL : &detail);
	if (cond.bad())
	{
		error = std::string("could not answer the C-STORE of ") + req.AffectedSOPInstanceUID +
			": " + cond.text();
		return false;
	}
	return true;
}

/* the counts of a C-MOVE or C-GET response (-1 where absent) */
void
responseCounts(const T_DIMSE_Message &rsp, bool get, int *remaining, int *completed,
			   int *failed, int *warning)
{
	unsigned int opts = get ? rsp.msg.CGetRSP.opts : rsp.msg.CMoveRSP.opts;

	if (get)
	{
		const T_DIMSE_C_GetRSP &r = rsp.msg.CGetRSP;

		*remaining = (opts & O_GET_NUMBEROFREMAININGSUBOPERATIONS) ? r.NumberOfRemainingSubOperations : -1;
		*completed = (opts & O_GET_NUMBEROFCOMPLETEDSUBOPERATIONS) ? r.NumberOfCompletedSubOperations : -1;
		*failed = (opts & O_GET_NUMBEROFFAILEDSUBOPERATIONS) ? r.NumberOfFailedSubOperations : -1;
		*warning = (opts & O_GET_NUMBEROFWARNINGSUBOPERATIONS) ? r.NumberOfWarningSubOperations : -1;
	}
	else
	{
		const T_DIMSE_C_MoveRSP &r = rsp.msg.CMoveRSP;

		*remaining = (opts & O_MOVE_NUMBEROFREMAININGSUBOPERATIONS) ? r.NumberOfRemainingSubOperations : -1;
		*completed = (opts & O_MOVE_NUMBEROFCOMPLETEDSUBOPERATIONS) ? r.NumberOfCompletedSubOperations : -1;
		*failed = (opts & O_MOVE_NUMBEROFFAILEDSUBOPERATIONS) ? r.NumberOfFailedSubOperations : -1;
		*warning = (opts & O_MOVE_NUMBEROFWARNINGSUBOPERATIONS) ? r.NumberOfWarningSubOperations : -1;
	}
}

/*
 * Send one C-MOVE (to destination) or C-GET (destination NULL) request;
 * its responses are then read by receiveRetrieve.
 */
bool
Session::startRetrieve(MddFetchRequest &req, const char *destination, std::string &error)
{
	bool		get = destination == NULL;
	const char *model = get ? UID_GETStudyRootQueryRetrieveInformationModel
		: UID_MOVEStudyRootQueryRetrieveInformationModel;
	T_ASC_PresentationContextID presID = context(model);
	std::string level(req.level);
	DcmDataset	ids;
	T_DIMSE_Message msg;
	DIC_US		messageID = nextMessageID_++;
	OFCondition cond;

	if (presID == 0)
	{
		error = std::string(peer_->peer_ae) + " accepted no " + (get ? "C-GET" : "C-MOVE") +
			" context of the Study Root model";
		return false;
	}
	ids.putAndInsertString(DCM_QueryRetrieveLevel, req.level);
	ids.putAndInsertString(DCM_StudyInstanceUID, req.study);
	if (level == "SERIES" || level == "IMAGE")
		ids.putAndInsertString(DCM_SeriesInstanceUID, req.series ? req.series : "");
	if (level == "IMAGE")
		ids.putAndInsertString(DCM_SOPInstanceUID, req.sops ? req.sops : "");

	memset(&msg, 0, sizeof(msg));
	if (get)
	{
		msg.CommandField = DIMSE_C_GET_RQ;
		msg.msg.CGetRQ.MessageID = messageID;
		OFStandard::strlcpy(msg.msg.CGetRQ.AffectedSOPClassUID, model,
							sizeof(msg.msg.CGetRQ.AffectedSOPClassUID));
		msg.msg.CGetRQ.Priority = DIMSE_PRIORITY_MEDIUM;
		msg.msg.CGetRQ.DataSetType = DIMSE_DATASET_PRESENT;
	}
	else
	{
		msg.CommandField = DIMSE_C_MOVE_RQ;
		msg.msg.CMoveRQ.MessageID = messageID;
		OFStandard::strlcpy(msg.msg.CMoveRQ.AffectedSOPClassUID, model,
							sizeof(msg.msg.CMoveRQ.AffectedSOPClassUID));
		msg.msg.CMoveRQ.Priority = DIMSE_PRIORITY_MEDIUM;
		msg.msg.CMoveRQ.DataSetType = DIMSE_DATASET_PRESENT;
		OFStandard::strlcpy(msg.msg.CMoveRQ.MoveDestination, destination,
							sizeof(msg.msg.CMoveRQ.MoveDestination));
	}
	cond = DIMSE_sendMessageUsingMemoryData(assoc(), presID, &msg, NULL, &ids, NULL, NULL);
	if (cond.bad())
	{
		error = std::string("sending the ") + (get ? "C-GET" : "C-MOVE") + " failed: " + cond.text();
		return false;
	}
	messageID_ = messageID;
	get_ = get;
	return true;
}

/*
 * Read one message about the request under way, once the node has sent
 * something: a pending response (told to the progress callback), a
 * C-STORE sub-operation of a C-GET (archived through the store callback),
 * or the final response (req filled).
 */
Session::Step
Session::receiveRetrieve(int index, MddFetchRequest &req, std::string &error)
{
	bool		get = get_;
	T_DIMSE_Message rsp;
	T_ASC_PresentationContextID rspID = 0;
	std::unique_ptr<DcmDataset> detail;
	std::unique_ptr<DcmDataset> identifier;
	DIC_US		status;
	int			remaining,
				completed,
				failed,
				warning;
	OFCondition cond;

	if (!receiveCommand(&rspID, &rsp, detail, error))
		return STEP_FAILED;
	if (get && rsp.CommandField == DIMSE_C_STORE_RQ)
		return receiveStore(rspID, rsp.msg.CStoreRQ, error) ? STEP_PENDING : STEP_FAILED;
	if (rsp.CommandField != (get ? DIMSE_C_GET_RSP : DIMSE_C_MOVE_RSP) ||
		(get ? rsp.msg.CGetRSP.MessageIDBeingRespondedTo
		 : rsp.msg.CMoveRSP.MessageIDBeingRespondedTo) != messageID_)
	{
		error = "unexpected DIMSE message " + std::to_string(rsp.CommandField) + " instead of the " +
			(get ? "C-GET" : "C-MOVE") + " response";
		return STEP_FAILED;
	}
	status = get ? rsp.msg.CGetRSP.DimseStatus : rsp.msg.CMoveRSP.DimseStatus;
	responseCounts(rsp, get, &remaining, &completed, &failed, &warning);
	if ((get ? rsp.msg.CGetRSP.DataSetType : rsp.msg.CMoveRSP.DataSetType) != DIMSE_DATASET_NULL)
	{
		DcmDataset *d = NULL;

		cond = DIMSE_receiveDataSetInMemory(assoc(), DIMSE_NONBLOCKING, peer_->dimse_timeout,
											&rspID, &d, NULL, NULL);
		identifier.reset(d);
		if (cond.bad())
		{
			error = std::string("receiving the identifier of a response failed: ") + cond.text();
			return STEP_FAILED;
		}
	}
	if (isPending(status))
	{
		MddFetchProgress p = {index, 1, remaining, completed, failed, warning};

		if (cb_->progress && cb_->progress(cb_->arg, &p) < 0)
		{
			error = "stopped";
			return STEP_FAILED;
		}
		return STEP_PENDING;
	}

	req.answered = 1;
	req.status = status;
	req.remaining = remaining;
	req.completed = completed;
	req.failed = failed;
	req.warning = warning;
	mddSetError(req.comment, sizeof(req.comment), errorComment(detail.get()));
	if (identifier)
	{
		OFString	list;

		if (identifier->findAndGetOFStringArray(DCM_FailedSOPInstanceUIDList, list).good())
		{
			req.failed_uids = strdup(list.c_str());
			if (req.failed_uids == NULL)
				throw std::bad_alloc();
		}
	}
	return STEP_ANSWERED;
}

/*
 * One C-MOVE or C-GET request and its responses, with the C-STORE
 * sub-operations of a C-GET in between.  True once the final response
 * came (req filled); false when the association failed, fell silent or
 * was stopped.
 */
bool
Session::retrieve(int index, MddFetchRequest &req, const char *destination, std::string &error)
{
	if (!startRetrieve(req, destination, error))
		return false;
	for (;;)
	{
		switch (waitForMessage(index, true))
		{
			case STOPPED:
				error = "stopped";
				return false;
			case SILENT:
				error = std::string("no answer to the ") + (get_ ? "C-GET" : "C-MOVE") + " within " +
					std::to_string(peer_->dimse_timeout) + " s";
				return false;
			case READY:
				break;
		}
		switch (receiveRetrieve(index, req, error))
		{
			case STEP_PENDING:
				break;
			case STEP_ANSWERED:
				return true;
			case STEP_FAILED:
				return false;
		}
	}
}

/* the contexts of a C-GET: its model, and storage contexts in the SCP role */
std::vector<MddProposedContext>
getContexts(const char *const *classes, int nclasses)
{
	std::vector<MddProposedContext> contexts;
	std::vector<std::string> known;
	std::set<std::string> seen;
	const std::string ele = UID_LittleEndianExplicitTransferSyntax;
	const std::string ile = UID_LittleEndianImplicitTransferSyntax;

	contexts.push_back({UID_GETStudyRootQueryRetrieveInformationModel, {ele, ile}});
	for (int i = 0; i < nclasses; i++)
		if (classes[i] && classes[i][0] && seen.insert(classes[i]).second)
			known.push_back(classes[i]);

	if (!known.empty() && known.size() <= maxExactClasses)
	{
		/* explicit VR first: a node that takes the first context of a class gets it */
		for (const std::string &cls : known)
		{
			contexts.push_back({cls, {ele}, ASC_SC_ROLE_SCP});
			contexts.push_back({cls, {ile}, ASC_SC_ROLE_SCP});
			for (const char *ts : compressedSyntaxes)
				contexts.push_back({cls, {ts}, ASC_SC_ROLE_SCP});
		}
		return contexts;
	}

	std::vector<std::string> all = known;

	for (const char *cls : usualClasses)
		if (seen.insert(cls).second)
			all.push_back(cls);
	for (const std::string &cls : all)
	{
		if (contexts.size() + 3 > maxContexts)
			break;
		contexts.push_back({cls, {ele}, ASC_SC_ROLE_SCP});
		contexts.push_back({cls, {ile}, ASC_SC_ROLE_SCP});
		contexts.push_back({cls, std::vector<std::string>(compressedSyntaxes,
														  compressedSyntaxes + numberOfCompressedSyntaxes),
							ASC_SC_ROLE_SCP});
	}
	return contexts;
}

const char *
stringOf(DcmDataset *ds, const DcmTagKey &tag, OFString &buf)
{
	buf.clear();
	if (ds->findAndGetOFString(tag, buf).bad())
		buf.clear();
	return buf.c_str();
}

struct Found
{
	std::string series;
	std::string sop;
	std::string sopClass;
};

/* the instances found, in one malloc()ed block of strings */
bool
fillInstances(const std::vector<Found> &found, MddRemoteInstances *list)
{
	size_t		total = 0;
	char	   *p;

	for (const Found &f : found)
		total += f.series.size() + f.sop.size() + f.sopClass.size() + 3;
	list->items = static_cast<MddRemoteInstance *>(malloc(sizeof(MddRemoteInstance) * (found.size() + 1)));
	list->strings = static_cast<char *>(malloc(total + 1));
	if (list->items == NULL || list->strings == NULL)
	{
		free(list->items);
		free(list->strings);
		list->items = NULL;
		list->strings = NULL;
		return false;
	}
	p = list->strings;
	for (const Found &f : found)
	{
		MddRemoteInstance *item = &list->items[list->n++];
		const std::string *fields[3] = {&f.series, &f.sop, &f.sopClass};
		const char **targets[3] = {&item->series_instance_uid, &item->sop_instance_uid,
		&item->sop_class_uid};

		for (int k = 0; k < 3; k++)
		{
			memcpy(p, fields[k]->c_str(), fields[k]->size() + 1);
			*targets[k] = p;
			p += fields[k]->size() + 1;
		}
	}
	return true;
}

MddDicomStatus
listInstances(const MddFetchPeer *peer, const MddFetchCallbacks *cb, const char *study,
			  const char *series, const char *sop, MddRemoteInstances *list,
			  unsigned short *dimseStatus, char *errbuf, size_t errbuf_len)
{
	Session		s(peer, cb);
	MddProposedContext find;
	T_ASC_PresentationContextID presID;
	std::vector<std::string> seriesList;
	std::vector<Found> found;
	std::set<std::string> seen;
	std::string error;
	std::string comment;
	DIC_US		status = 0;
	OFString	buf;

	find.abstractSyntax = UID_FINDStudyRootQueryRetrieveInformationModel;
	find.transferSyntaxes = {UID_LittleEndianExplicitTransferSyntax, UID_LittleEndianImplicitTransferSyntax};
	mddInitialiseDcmtk();
	if (!s.open({find}, error))
	{
		mddSetError(errbuf, errbuf_len, error);
		return MDD_DICOM_NETWORK;
	}
	presID = s.context(UID_FINDStudyRootQueryRetrieveInformationModel);

	if (series)
		seriesList.push_back(series);
	else
	{
		/* the series of the study */
		DcmDataset	keys;
		std::vector<std::unique_ptr<DcmDataset>> matches;

		keys.putAndInsertString(DCM_QueryRetrieveLevel, "SERIES");
		keys.putAndInsertString(DCM_StudyInstanceUID, study);
		keys.putAndInsertString(DCM_SeriesInstanceUID, "");
		if (!s.find(presID, keys, matches, status, comment, error))
		{
			mddSetError(errbuf, errbuf_len, "C-FIND of the series of study " + std::string(study) +
						" on " + peer->peer_ae + " failed: " + error);
			return MDD_DICOM_NETWORK;
		}
		if (status != STATUS_Success)
		{
			*dimseStatus = status;
			mddSetError(errbuf, errbuf_len, "C-FIND at SERIES level answered status " +
						statusText(status) + (comment.empty() ? "" : ": " + comment));
			return MDD_DICOM_REFUSED;
		}
		for (const auto &m : matches)
		{
			std::string uid = stringOf(m.get(), DCM_SeriesInstanceUID, buf);
			std::string st = stringOf(m.get(), DCM_StudyInstanceUID, buf);

			if (plausibleUid(uid.c_str()) && (st.empty() || st == study) && seen.insert(uid).second)
				seriesList.push_back(uid);
		}
		seen.clear();
	}

	for (const std::string &ser : seriesList)
	{
		DcmDataset	keys;
		std::vector<std::unique_ptr<DcmDataset>> matches;

		keys.putAndInsertString(DCM_QueryRetrieveLevel, "IMAGE");
		keys.putAndInsertString(DCM_StudyInstanceUID, study);
		keys.putAndInsertString(DCM_SeriesInstanceUID, ser.c_str());
		keys.putAndInsertString(DCM_SOPInstanceUID, sop ? sop : "");
		keys.putAndInsertString(DCM_SOPClassUID, "");
		if (!s.find(presID, keys, matches, status, comment, error))
		{
			mddSetError(errbuf, errbuf_len, "C-FIND of the instances of series " + ser + " on " +
						peer->peer_ae + " failed: " + error);
			return MDD_DICOM_NETWORK;
		}
		if (status != STATUS_Success)
		{
			*dimseStatus = status;
			mddSetError(errbuf, errbuf_len, "C-FIND at IMAGE level answered status " +
						statusText(status) + (comment.empty() ? "" : ": " + comment));
			return MDD_DICOM_REFUSED;
		}
		for (const auto &m : matches)
		{
			Found		f;
			std::string mseries = stringOf(m.get(), DCM_SeriesInstanceUID, buf);

			f.series = ser;
			f.sop = stringOf(m.get(), DCM_SOPInstanceUID, buf);
			f.sopClass = stringOf(m.get(), DCM_SOPClassUID, buf);
			/* what a node answers that it was not asked for is left out */
			if (!plausibleUid(f.sop.c_str()) || (!mseries.empty() && mseries != ser) ||
				(sop && f.sop != sop) || !seen.insert(f.sop).second)
				continue;
			if (!plausibleUid(f.sopClass.c_str()))
				f.sopClass.clear();
			found.push_back(f);
		}
	}
	s.release();
	if (!fillInstances(found, list))
	{
		mddSetError(errbuf, errbuf_len, "out of memory listing the instances");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	return MDD_DICOM_OK;
}

/*
 * C-MOVE requests on up to `associations` associations at once: each
 * association takes the next request as soon as its own is answered, and
 * one wait covers every socket.  The node's silence is timed per
 * association; the progress callback hears every pending response, and
 * is asked once a second without one.  On any failure the associations
 * still open are aborted (their destructors), as a broken association
 * is: the requests answered before say so.
 */
MddDicomStatus
fetchInParallel(const MddFetchPeer *peer, const MddFetchCallbacks *cb, const char *destination,
				MddFetchRequest *requests, int nrequests, int associations, int *associated,
				std::string &error)
{
	std::vector<MddProposedContext> contexts = {
		{UID_MOVEStudyRootQueryRetrieveInformationModel,
		{UID_LittleEndianExplicitTransferSyntax, UID_LittleEndianImplicitTransferSyntax}}};
	std::vector<std::unique_ptr<Session>> sessions;
	std::vector<int> current;	/* request under way per association, -1: none */
	std::vector<time_t> deadline;
	int			next = 0;
	int			busy = 0;

	for (int k = 0; k < associations && k < nrequests; k++)
	{
		std::unique_ptr<Session> s(new Session(peer, cb));
		std::string why;

		if (!s->open(contexts, why))
		{
			/* the node takes fewer associations: go on with those it took */
			if (sessions.empty())
			{
				error = why;
				return MDD_DICOM_NETWORK;
			}
			break;
		}
		*associated = 1;
		sessions.push_back(std::move(s));
	}
	current.assign(sessions.size(), -1);
	deadline.assign(sessions.size(), 0);
	for (size_t k = 0; k < sessions.size() && next < nrequests; k++)
	{
		if (!sessions[k]->startRetrieve(requests[next], destination, error))
			return MDD_DICOM_NETWORK;
		current[k] = next++;
		deadline[k] = time(NULL) + peer->dimse_timeout;
		busy++;
	}

	while (busy > 0)
	{
		int			ready = -1;

		if (cb->should_stop(cb->arg))
		{
			error = "stopped";
			return MDD_DICOM_NETWORK;
		}
		for (size_t k = 0; k < sessions.size() && ready < 0; k++)
			if (current[k] >= 0 && sessions[k]->dataWaiting())
				ready = (int) k;
		if (ready < 0)
		{
			std::vector<int> fds;
			std::vector<int> owners;
			int			which;

			for (size_t k = 0; k < sessions.size(); k++)
				if (current[k] >= 0 && sessions[k]->socket() >= 0)
				{
					fds.push_back(sessions[k]->socket());
					owners.push_back((int) k);
				}
			which = fds.empty() ? -1 : cb->wait_any_readable(cb->arg, fds.data(), (int) fds.size(), 1000);
			if (which >= 0 && which < (int) owners.size())
				ready = owners[which];
		}
		if (ready < 0)
		{
			/* a second without a message (or a stop request) */
			time_t		now = time(NULL);

			if (cb->should_stop(cb->arg))
			{
				error = "stopped";
				return MDD_DICOM_NETWORK;
			}
			if (cb->progress)
			{
				MddFetchProgress p = {-1, 0, -1, -1, -1, -1};
				int			r = cb->progress(cb->arg, &p);

				if (r < 0)
				{
					error = "stopped";
					return MDD_DICOM_NETWORK;
				}
				if (r > 0)
					for (size_t k = 0; k < sessions.size(); k++)
						deadline[k] = now + peer->dimse_timeout;
			}
			for (size_t k = 0; k < sessions.size(); k++)
				if (current[k] >= 0 && now >= deadline[k])
				{
					error = std::string("no answer to the C-MOVE within ") +
						std::to_string(peer->dimse_timeout) + " s";
					return MDD_DICOM_NETWORK;
				}
			continue;
		}

		switch (sessions[ready]->receiveRetrieve(current[ready], requests[current[ready]], error))
		{
			case Session::STEP_FAILED:
				return MDD_DICOM_NETWORK;
			case Session::STEP_PENDING:
				deadline[ready] = time(NULL) + peer->dimse_timeout;
				break;
			case Session::STEP_ANSWERED:
				if (next < nrequests)
				{
					if (!sessions[ready]->startRetrieve(requests[next], destination, error))
						return MDD_DICOM_NETWORK;
					current[ready] = next++;
					deadline[ready] = time(NULL) + peer->dimse_timeout;
				}
				else
				{
					current[ready] = -1;
					sessions[ready]->release();
					busy--;
				}
				break;
		}
	}
	return MDD_DICOM_OK;
}

}								/* namespace */

extern "C" MddDicomStatus
mdd_dicom_list_instances(const MddFetchPeer *peer, const MddFetchCallbacks *callbacks,
						 const char *study, const char *series, const char *sop,
						 MddRemoteInstances *list, unsigned short *dimse_status,
						 char *errbuf, size_t errbuf_len)
{
	memset(list, 0, sizeof(*list));
	*dimse_status = 0;
	mddSetError(errbuf, errbuf_len, "");
	try
	{
		return listInstances(peer, callbacks, study, series, sop, list, dimse_status,
							 errbuf, errbuf_len);
	}
	catch (const std::bad_alloc &)
	{
		mdd_dicom_free_instances(list);
		mddSetError(errbuf, errbuf_len, "out of memory listing the instances");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	catch (...)
	{
		mdd_dicom_free_instances(list);
		mddSetError(errbuf, errbuf_len, "listing the instances failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}

extern "C" void
mdd_dicom_free_instances(MddRemoteInstances *list)
{
	free(list->items);
	free(list->strings);
	memset(list, 0, sizeof(*list));
}

extern "C" MddDicomStatus
mdd_dicom_fetch(const MddFetchPeer *peer, const MddFetchCallbacks *callbacks,
				const char *move_destination, const char *const *sop_classes, int nclasses,
				MddFetchRequest *requests, int nrequests, int associations, int *associated,
				char *errbuf, size_t errbuf_len)
{
	*associated = 0;
	mddSetError(errbuf, errbuf_len, "");
	for (int i = 0; i < nrequests; i++)
	{
		requests[i].answered = 0;
		requests[i].status = 0;
		requests[i].remaining = requests[i].completed = requests[i].failed = requests[i].warning = -1;
		requests[i].comment[0] = '\0';
		requests[i].failed_uids = NULL;
	}
	try
	{
		Session		s(peer, callbacks);
		std::vector<MddProposedContext> contexts;
		std::string error;

		mddInitialiseDcmtk();
		if (move_destination && associations > 1 && nrequests > 1)
		{
			MddDicomStatus status = fetchInParallel(peer, callbacks, move_destination, requests,
													nrequests, associations, associated, error);

			mddSetError(errbuf, errbuf_len, error);
			return status;
		}
		if (move_destination)
			contexts.push_back({UID_MOVEStudyRootQueryRetrieveInformationModel,
				{UID_LittleEndianExplicitTransferSyntax, UID_LittleEndianImplicitTransferSyntax}});
		else
			contexts = getContexts(sop_classes, nclasses);
		if (!s.open(contexts, error))
		{
			mddSetError(errbuf, errbuf_len, error);
			return MDD_DICOM_NETWORK;
		}
		*associated = 1;
		for (int i = 0; i < nrequests; i++)
			if (!s.retrieve(i, requests[i], move_destination, error))
			{
				mddSetError(errbuf, errbuf_len, error);
				return MDD_DICOM_NETWORK;
			}
		s.release();
		return MDD_DICOM_OK;
	}
	catch (const std::bad_alloc &)
	{
		mddSetError(errbuf, errbuf_len, "out of memory during the retrieve");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "the retrieve failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}

extern "C" void
mdd_dicom_free_fetch(MddFetchRequest *requests, int nrequests)
{
	for (int i = 0; i < nrequests; i++)
	{
		free(requests[i].failed_uids);
		requests[i].failed_uids = NULL;
	}
}
