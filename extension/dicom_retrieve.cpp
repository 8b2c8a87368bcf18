/*
 * dicom_retrieve.cpp
 *	  C-MOVE and C-GET as SCP (Patient Root and Study Root, every level):
 *	  the objects an identifier selects are sent by C-STORE sub-operations,
 *	  to the move destination on an association of their own (C-MOVE) or
 *	  back on the requesting association (C-GET).
 *
 * The C side selects the objects, says where a destination listens and
 * hands over each object's stored bytes, checked against its checksum.
 * Each sub-operation is reported in a pending response; one that fails is
 * counted, its SOP Instance UID listed in the final response, and the
 * others go on.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes.
 */
#include "dicom_service.hpp"
#include "dicom_scu.hpp"

#include <dcmtk/dcmnet/diutil.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

namespace
{

/* the counts of the sub-operations of one C-MOVE or C-GET */
struct SubOperations
{
	int			remaining = 0;
	int			completed = 0;
	int			failed = 0;
	int			warning = 0;
	std::vector<std::string> failedUIDs;

	static DIC_US clip(int n) { return (DIC_US) std::min(n, 65535); }
};

/* owns the list the retrieve callback filled */
struct RetrieveList : MddRetrieveList
{
	RetrieveList() { nitems = 0; items = NULL; strings = NULL; nmissing = 0; missing_uids = NULL; }
	~RetrieveList() { free(items); free(strings); free(missing_uids); }
};

/* one C-MOVE or C-GET being served */
class Retrieval
{
public:
	/* one of move and get is given */
	Retrieval(MddServedAssociation &sa, T_ASC_PresentationContextID presID,
			  T_DIMSE_C_MoveRQ *move, T_DIMSE_C_GetRQ *get)
		: sa_(sa), presID_(presID), move_(move), get_(get),
		  messageID_(move ? move->MessageID : get->MessageID),
		  sopClass_(move ? move->AffectedSOPClassUID : get->AffectedSOPClassUID),
		  isGet_(get != NULL), operation_(get ? "C-GET" : "C-MOVE") {}

	/* the whole operation; false when the requesting association must be aborted */
	bool		run(const std::string &destination);

private:
	bool		respond(DIC_US status, const std::string &comment, bool final);
	template <typename Response>
	void		fill(Response &rsp, DIC_US status, bool withIdentifier, unsigned opts) const;
	bool		refuse(DIC_US status, const std::string &comment);
	bool		sendAll(T_ASC_Association *target, int fd, const RetrieveList &list);
	std::string model() const;

	MddServedAssociation &sa_;
	T_ASC_PresentationContextID presID_;
	T_DIMSE_C_MoveRQ *move_;
	T_DIMSE_C_GetRQ *get_;
	DIC_US		messageID_;
	std::string sopClass_;
	bool		isGet_;
	std::string operation_;
	std::string destination_;
	std::string level_;
	std::string keys_;
	SubOperations ops_;
	bool		cancelled_ = false;
	bool		broken_ = false;	/* the association sub-operations go on failed */
};

std::string
Retrieval::model() const
{
	if (sopClass_ == UID_MOVEPatientRootQueryRetrieveInformationModel ||
		sopClass_ == UID_GETPatientRootQueryRetrieveInformationModel)
		return "PATIENT";
	if (sopClass_ == UID_MOVEStudyRootQueryRetrieveInformationModel ||
		sopClass_ == UID_GETStudyRootQueryRetrieveInformationModel)
		return "STUDY";
	return "";
}

/*
 * A pending or final response with the counts.  A final response of a
 * retrieval with failures lists the failed SOP Instance UIDs.
 */
bool
Retrieval::respond(DIC_US status, const std::string &comment, bool final)
{
	DcmDataset	detail;
	DcmDataset	failedList;
	DcmDataset *ids = NULL;
	bool		counts = status == STATUS_MOVE_Pending_SubOperationsAreContinuing ||
		status == STATUS_Success || status == STATUS_MOVE_Warning_SubOperationsCompleteOneOrMoreFailures ||
		status == STATUS_MOVE_Cancel_SubOperationsTerminatedDueToCancelIndication ||
		status == STATUS_MOVE_Refused_OutOfResourcesSubOperations;
	bool		remaining = !final ||
		status == STATUS_MOVE_Cancel_SubOperationsTerminatedDueToCancelIndication;
	unsigned	opts = 0;

	if (!comment.empty())
		mddPutErrorComment(detail, comment.c_str());
	if (final && !ops_.failedUIDs.empty())
	{
		std::string uids;

		for (const std::string &u : ops_.failedUIDs)
			uids += (uids.empty() ? "" : "\\") + u;
		failedList.putAndInsertString(DCM_FailedSOPInstanceUIDList, uids.c_str());
		ids = &failedList;
	}
	if (counts)
		opts = (remaining ? O_MOVE_NUMBEROFREMAININGSUBOPERATIONS : 0) |
			O_MOVE_NUMBEROFCOMPLETEDSUBOPERATIONS | O_MOVE_NUMBEROFFAILEDSUBOPERATIONS |
			O_MOVE_NUMBEROFWARNINGSUBOPERATIONS;

	/* the C-GET and C-MOVE response structures and option bits are alike */
	if (isGet_)
	{
		T_DIMSE_C_GetRSP rsp;

		fill(rsp, status, ids != NULL, O_GET_AFFECTEDSOPCLASSUID | opts);
		return DIMSE_sendGetResponse(sa_.assoc, presID_, get_, &rsp, ids,
									 comment.empty() ? NULL : &detail).good();
	}
	T_DIMSE_C_MoveRSP rsp;

	fill(rsp, status, ids != NULL, O_MOVE_AFFECTEDSOPCLASSUID | opts);
	return DIMSE_sendMoveResponse(sa_.assoc, presID_, move_, &rsp, ids,
								  comment.empty() ? NULL : &detail).good();
}

/* the fields a C-MOVE-RSP and a C-GET-RSP share */
template <typename Response>
void
Retrieval::fill(Response &rsp, DIC_US status, bool withIdentifier, unsigned opts) const
{
	memset(&rsp, 0, sizeof(rsp));
	rsp.MessageIDBeingRespondedTo = messageID_;
	rsp.DimseStatus = status;
	rsp.DataSetType = withIdentifier ? DIMSE_DATASET_PRESENT : DIMSE_DATASET_NULL;
	OFStandard::strlcpy(rsp.AffectedSOPClassUID, sopClass_.c_str(), sizeof(rsp.AffectedSOPClassUID));
	rsp.NumberOfRemainingSubOperations = SubOperations::clip(ops_.remaining);
	rsp.NumberOfCompletedSubOperations = SubOperations::clip(ops_.completed);
	rsp.NumberOfFailedSubOperations = SubOperations::clip(ops_.failed);
	rsp.NumberOfWarningSubOperations = SubOperations::clip(ops_.warning);
	rsp.opts = opts;
}

/* a final failure before any sub-operation, written to the audit trail */
bool
Retrieval::refuse(DIC_US status, const std::string &comment)
{
	char		detail[1024];

	snprintf(detail, sizeof(detail), "%s level %s %s to %s refused with status 0x%04X: %s",
			 operation_.c_str(), level_.c_str(), keys_.c_str(), destination_.c_str(), status,
			 comment.c_str());
	if (sa_.cb->audit)
	{
		std::string action = operation_ + " refused";

		for (char &c : action)
			c = (char) tolower((unsigned char) c);
		sa_.cb->audit(sa_.cb->arg, action.c_str(), detail);
	}
	return respond(status, comment, true);
}

/* the contexts to propose to a move destination for the objects of list */
std::vector<MddProposedContext>
contextsFor(const RetrieveList &list)
{
	std::vector<std::pair<std::string, std::string>> objects;

	for (int i = 0; i < list.nitems; i++)
		objects.emplace_back(list.items[i].sop_class_uid, list.items[i].transfer_syntax_uid);
	return mddStoreContexts(objects);
}

/* the sub-operations; false when the requesting association must be aborted */
bool
Retrieval::sendAll(T_ASC_Association *target, int fd, const RetrieveList &list)
{
	DIC_US		nextID = 1;

	for (int i = 0; i < list.nitems; i++)
	{
		const MddRetrieveItem &item = list.items[i];
		MddStoreRequest req;
		unsigned char *data = NULL;
		size_t		len = 0;
		char		error[512] = "";
		std::string failure;
		DIC_US		status = 0;

		if (sa_.cb->should_stop(sa_.cb->arg))
		{
			sa_.log(MDD_LOG_INFO, operation_ + " for " + sa_.callingAE +
					" stopped: server shutting down");
			return false;
		}
		/* a C-GET's cancel arrives among the sub-operation answers */
		if (!isGet_ && DIMSE_checkForCancelRQ(sa_.assoc, presID_, messageID_).good())
			cancelled_ = true;
		if (cancelled_)
			break;

		ops_.remaining--;
		if (!sa_.cb->fetch(sa_.cb->arg, item.object_id, operation_.c_str(), &data, &len,
						   error, sizeof(error)))
			failure = error;
		else
		{
			std::unique_ptr<unsigned char, decltype(&free)> owner(data, free);
			MddStoreOutcome outcome;

			req.data = data;
			req.len = len;
			req.sopClass = item.sop_class_uid;
			req.sopInstance = item.sop_instance_uid;
			req.transferSyntax = item.transfer_syntax_uid;
			req.messageID = nextID++;
			if (!isGet_)
			{
				req.moveOriginatorAE = sa_.callingAE;
				req.moveOriginatorID = messageID_;
			}
			else
				req.moveOriginatorID = 0;
			outcome = mddSendStored(target, fd, isGet_, req, sa_.config->dimse_timeout, sa_.cb,
									messageID_, isGet_ ? &cancelled_ : NULL, &status, failure);
			if (outcome == MDD_STORE_BROKEN)
			{
				/* the object and every one not yet sent failed */
				sa_.log(MDD_LOG_WARNING, operation_ + " to " + destination_ + ": " + failure);
				ops_.failed += ops_.remaining + 1;
				ops_.failedUIDs.push_back(item.sop_instance_uid);
				for (int k = i + 1; k < list.nitems; k++)
					ops_.failedUIDs.push_back(list.items[k].sop_instance_uid);
				ops_.remaining = 0;
				broken_ = true;
				return !isGet_;	/* in a C-GET, that is the requesting association */
			}
			if (outcome == MDD_STORE_ANSWERED && status != STATUS_Success &&
				(status & 0xF000) != 0xB000)
			{
				char		text[32];

				snprintf(text, sizeof(text), "answered status 0x%04X", status);
				failure = text;
			}
		}
		if (!failure.empty())
		{
			ops_.failed++;
			ops_.failedUIDs.push_back(item.sop_instance_uid);
			sa_.log(MDD_LOG_WARNING, operation_ + " of " + item.sop_instance_uid + " to " +
					destination_ + " failed: " + failure);
		}
		else if (status != STATUS_Success)
			ops_.warning++;
		else
			ops_.completed++;
		if (!respond(STATUS_MOVE_Pending_SubOperationsAreContinuing, "", false))
			return false;
	}
	return true;
}

bool
Retrieval::run(const std::string &destination)
{
	DcmDataset *ids = NULL;
	T_ASC_PresentationContextID dataPresID = presID_;
	OFString	level;
	RetrieveList list;
	char		comment[256] = "";
	char		host[256] = "";
	int			port = 0;
	int			destinationTls = 0;
	DIC_US		status;
	OFCondition cond;

	destination_ = isGet_ ? sa_.callingAE : destination;
	cond = DIMSE_receiveDataSetInMemory(sa_.assoc, DIMSE_BLOCKING, sa_.config->dimse_timeout,
										&dataPresID, &ids, NULL, NULL);
	if (cond.bad() || ids == NULL)
	{
		sa_.log(MDD_LOG_WARNING, operation_ + " from " + sa_.callingAE + ": no identifier: " +
				cond.text());
		delete ids;
		return false;
	}
	std::unique_ptr<DcmDataset> owner(ids);

	keys_ = mddIdentifierKeys(ids, NULL, &level);
	level_ = level.c_str();
	if (model().empty())
		return refuse(STATUS_MOVE_Error_DataSetDoesNotMatchSOPClass, "unsupported information model");
	if (!(sa_.permits & MDD_PERMIT_RETRIEVE))
		return refuse(STATUS_MOVE_Refused_NotAuthorized,
					  sa_.callingAE + " may not retrieve from this archive");
	if (!isGet_)
	{
		status = sa_.cb->destination(sa_.cb->arg, destination.c_str(), host, sizeof(host), &port,
									 &destinationTls, comment, sizeof(comment));
		if (status != STATUS_Success)
			return refuse(status, comment);
	}
	status = sa_.cb->retrieve(sa_.cb->arg, operation_.c_str(), model().c_str(), level.c_str(),
							  keys_.c_str(), isGet_ ? NULL : destination.c_str(), &list,
							  comment, sizeof(comment));
	if (status != STATUS_Success)
		return refuse(status, comment);
	ops_.remaining = list.nitems;
	/* forwarded instances that did not come: failed before anything is sent */
	if (list.nmissing > 0)
	{
		std::string uids(list.missing_uids ? list.missing_uids : "");
		size_t		start = 0;

		ops_.failed += list.nmissing;
		while (!uids.empty() && start <= uids.size())
		{
			size_t		end = uids.find('\\', start);

			if (end == std::string::npos)
				end = uids.size();
			ops_.failedUIDs.push_back(uids.substr(start, end - start));
			start = end + 1;
		}
		sa_.log(MDD_LOG_WARNING, operation_ + " for " + sa_.callingAE + ": " +
				std::to_string(list.nmissing) + " instances could not be fetched from the nodes that hold them");
	}
	if (list.nitems == 0)
		return respond(list.nmissing > 0 ? STATUS_MOVE_Failed_UnableToProcess : STATUS_Success, "", true);

	bool		ok;

	if (isGet_)
		ok = sendAll(sa_.assoc, sa_.fd, list);
	else
	{
		MddScuAssociation target;
		std::string error;

		if (destinationTls)
			target.useTls(sa_.config->client_tls);
		if (!target.open(sa_.config->ae_title, destination, host, port,
						 sa_.config->acse_timeout, contextsFor(list), error))
		{
			sa_.log(MDD_LOG_WARNING, "C-MOVE for " + sa_.callingAE + ": " + error);
			ops_.failed = list.nitems;
			ops_.remaining = 0;
			for (int i = 0; i < list.nitems; i++)
				ops_.failedUIDs.push_back(list.items[i].sop_instance_uid);
			return respond(STATUS_MOVE_Refused_OutOfResourcesSubOperations, error, true);
		}
		ok = sendAll(target.get(), -1, list);
		if (ok && !broken_)
			target.release();
	}
	if (!ok)
		return false;

	sa_.log(MDD_LOG_INFO, operation_ + " for " + sa_.callingAE + " to " + destination_ + ": " +
			std::to_string(ops_.completed) + " completed, " + std::to_string(ops_.failed) +
			" failed, " + std::to_string(ops_.warning) + " warnings" +
			(cancelled_ ? ", cancelled" : ""));
	if (cancelled_)
		status = STATUS_MOVE_Cancel_SubOperationsTerminatedDueToCancelIndication;
	else if (ops_.failed > 0 || ops_.warning > 0)
		status = STATUS_MOVE_Warning_SubOperationsCompleteOneOrMoreFailures;
	else
		status = STATUS_Success;
	return respond(status, "", true);
}

}								/* namespace */

bool
mddHandleMove(MddServedAssociation &sa, T_ASC_PresentationContextID presID, T_DIMSE_C_MoveRQ &req)
{
	Retrieval	r(sa, presID, &req, NULL);
	std::string destination(req.MoveDestination);

	while (!destination.empty() && destination.back() == ' ')
		destination.pop_back();
	bool		ok = r.run(destination);

	if (sa.cb->retrieve_done)
		sa.cb->retrieve_done(sa.cb->arg);
	return ok;
}

bool
mddHandleGet(MddServedAssociation &sa, T_ASC_PresentationContextID presID, T_DIMSE_C_GetRQ &req)
{
	Retrieval	r(sa, presID, NULL, &req);
	bool		ok = r.run("");

	if (sa.cb->retrieve_done)
		sa.cb->retrieve_done(sa.cb->arg);
	return ok;
}
