/*
 * dicom_scu.cpp
 *	  mdd as a DICOM service user (dicom_scu.hpp): requesting associations,
 *	  C-ECHO (mdd_dicom_echo of dicom.h), and C-STORE of stored objects.
 *
 * A stored object goes out as it is kept: its file meta header is skipped
 * and the data set bytes are written in P-DATA as they are, after a
 * C-STORE command built here.  DCMTK's own senders would parse and
 * re-encode the data set, which may change its bytes.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes.
 */
#include "dicom_scu.hpp"
#include "dicom_common.hpp"
#include "dicom_service.hpp"
#include "dicom_stream.hpp"
#include "dicom_tls.hpp"

#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmnet/dcmlayer.h>
#include <dcmtk/dcmnet/dcmtrans.h>
#include <dcmtk/dcmnet/diutil.h>
#include <dcmtk/dcmnet/dul.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <set>

const char *const mddUncompressedTransferSyntaxes[3] = {
	UID_LittleEndianExplicitTransferSyntax,
	UID_LittleEndianImplicitTransferSyntax,
	UID_BigEndianExplicitTransferSyntax,
};

bool
mddIsUncompressed(const std::string &transferSyntax)
{
	for (const char *ts : mddUncompressedTransferSyntaxes)
		if (transferSyntax == ts)
			return true;
	return false;
}

std::vector<MddProposedContext>
mddStoreContexts(const std::vector<std::pair<std::string, std::string>> &classesAndSyntaxes)
{
	std::map<std::string, std::set<std::string>> syntaxes;
	std::vector<MddProposedContext> contexts;

	for (const auto &cs : classesAndSyntaxes)
		syntaxes[cs.first].insert(cs.second);
	for (const auto &cls : syntaxes)
	{
		bool		anyUncompressed = false;

		for (const std::string &ts : cls.second)
		{
			contexts.push_back({cls.first, {ts}});
			anyUncompressed = anyUncompressed || mddIsUncompressed(ts);
		}
		if (anyUncompressed)
			contexts.push_back({cls.first, {mddUncompressedTransferSyntaxes[0],
											mddUncompressedTransferSyntaxes[1]}});
	}
	return contexts;
}

/*
 * The transport layer of an association whose socket is observed: DCMTK
 * hands it each socket it connects, before negotiating on it; plain TCP,
 * as DCMTK's own layer, apart from telling the observer.
 */
class MddObservedTransportLayer : public DcmTransportLayer
{
public:
	explicit MddObservedTransportLayer(MddScuAssociation *owner) : owner_(owner) {}

	DcmTransportConnection *createConnection(DcmNativeSocketType openSocket,
											 OFBool useSecureLayer) override
	{
		if (useSecureLayer)
			return NULL;
		owner_->fd_ = (int) openSocket;
		if (owner_->observer_)
			owner_->observer_(owner_->observerArg_, (int) openSocket);
		return new DcmTCPConnection(openSocket);
	}

private:
	MddScuAssociation *owner_;
};

/* the reasons of a rejection on one line: "Rejected Permanent, Called AE Title Not Recognized" */
static std::string
rejectionText(T_ASC_Association *assoc)
{
	T_ASC_RejectParameters rej;
	OFString	text;
	std::string line;

	if (assoc == NULL || ASC_getRejectParameters(assoc->params, &rej).bad())
		return "";
	ASC_printRejectParameters(text, &rej);
	for (char c : std::string(text.c_str()))
		line += (c == '\n' || c == '\r') ? ' ' : c;
	return line;
}

MddScuAssociation::~MddScuAssociation()
{
	abort();
	if (params_)
		ASC_destroyAssociationParameters(&params_);
	if (net_)
		ASC_dropNetwork(&net_);
}

/* the connection is gone (or never came up): tell the observer */
void
MddScuAssociation::closed()
{
	if (fd_ >= 0 && observer_)
		observer_(observerArg_, -1);
	fd_ = -1;
}

bool
MddScuAssociation::open(const std::string &ourAE, const std::string &peerAE,
						const std::string &host, int port, int timeout,
						const std::vector<MddProposedContext> &contexts, std::string &error)
{
	OFCondition cond;
	std::string address = host + ":" + std::to_string(port);

	mddInitialiseDcmtk();
	acceptedNone_ = false;
	rejected_ = false;
	fd_ = -1;
	if (contexts.empty() || contexts.size() > 128)
	{
		error = "cannot propose " + std::to_string(contexts.size()) +
			" presentation contexts (1 to 128)";
		return false;
	}
	dcmConnectionTimeout.set(timeout);
	cond = ASC_initializeNetwork(NET_REQUESTOR, 0, timeout, &net_);
	if (cond.good())
		cond = ASC_createAssociationParameters(&params_, ASC_DEFAULTMAXPDU);
	if (cond.good() && tls_)
	{
		DcmTransportLayer *layer = mddNewTlsLayer(false, tls_, [this](int fd) {
			fd_ = fd;
			if (observer_)
				observer_(observerArg_, fd);
		}, error);

		if (layer == NULL)
		{
			error = "cannot use the TLS settings: " + error;
			return false;
		}
		cond = ASC_setTransportLayer(net_, layer, 1);
		if (cond.good())
			cond = ASC_setTransportLayerType(params_, OFTrue);
	}
	else if (cond.good() && observer_)
		cond = ASC_setTransportLayer(net_, new MddObservedTransportLayer(this), 1);
	if (cond.bad())
	{
		error = std::string("cannot set up the network: ") + cond.text();
		return false;
	}
	ASC_setAPTitles(params_, ourAE.c_str(), peerAE.c_str(), NULL);
	ASC_setPresentationAddresses(params_, OFStandard::getHostName().c_str(), address.c_str());
	for (size_t i = 0; i < contexts.size() && cond.good(); i++)
	{
		const char *syntaxes[DICOM_MAXTRANSFERSYNTAXES];
		size_t		n = std::min(contexts[i].transferSyntaxes.size(),
								 (size_t) DICOM_MAXTRANSFERSYNTAXES);

		for (size_t k = 0; k < n; k++)
			syntaxes[k] = contexts[i].transferSyntaxes[k].c_str();
		cond = ASC_addPresentationContext(params_, (T_ASC_PresentationContextID) (2 * i + 1),
										  contexts[i].abstractSyntax.c_str(), syntaxes, (int) n,
										  contexts[i].role);
	}
	if (cond.good())
	{
		/* the association owns the parameters from here on, even on failure */
		cond = ASC_requestAssociation(net_, params_, &assoc_);
		params_ = NULL;
	}
	if (cond.bad())
	{
		if (cond == DUL_ASSOCIATIONREJECTED)
		{
			std::string why = rejectionText(assoc_);

			rejected_ = true;
			error = peerAE + " at " + address + " rejected the association" +
				(why.empty() ? "" : " (" + why + ")");
		}
		else if (tls_)
			error = mddTlsErrorText("cannot associate over TLS with " + peerAE + " at " +
									address + ": " + cond.text());
		else
			error = "cannot associate with " + peerAE + " at " + address + ": " + cond.text();
		if (assoc_)
			ASC_destroyAssociation(&assoc_);
		closed();
		return false;
	}
	if (ASC_countAcceptedPresentationContexts(assoc_->params) == 0)
	{
		error = peerAE + " accepted none of the presentation contexts proposed";
		acceptedNone_ = true;
		abort();
		return false;
	}
	return true;
}

void
MddScuAssociation::release()
{
	if (assoc_)
	{
		ASC_releaseAssociation(assoc_);
		ASC_destroyAssociation(&assoc_);
		closed();
	}
}

void
MddScuAssociation::abort()
{
	if (assoc_)
	{
		ASC_abortAssociation(assoc_);
		ASC_destroyAssociation(&assoc_);
		closed();
	}
}

T_DIMSE_C_StoreRSP
mddStoreResponse(const T_DIMSE_C_StoreRQ &req)
{
	T_DIMSE_C_StoreRSP rsp;

	memset(&rsp, 0, sizeof(rsp));
	rsp.MessageIDBeingRespondedTo = req.MessageID;
	rsp.DataSetType = DIMSE_DATASET_NULL;
	OFStandard::strlcpy(rsp.AffectedSOPClassUID, req.AffectedSOPClassUID,
						sizeof(rsp.AffectedSOPClassUID));
	OFStandard::strlcpy(rsp.AffectedSOPInstanceUID, req.AffectedSOPInstanceUID,
						sizeof(rsp.AffectedSOPInstanceUID));
	rsp.opts = O_STORE_AFFECTEDSOPCLASSUID | O_STORE_AFFECTEDSOPINSTANCEUID;
	return rsp;
}

/* ---------------------------------------------------------------------
 * C-ECHO
 * ---------------------------------------------------------------------
 */

extern "C" MddDicomStatus
mdd_dicom_echo(const char *our_ae, const char *peer_ae, const char *host, int port,
			   int timeout, const MddTlsSettings *tls, char *errbuf, size_t errbuf_len)
{
	mddSetError(errbuf, errbuf_len, "");
	try
	{
		MddScuAssociation a;
		MddProposedContext verification;
		std::string error;
		DIC_US		status = 0;
		DcmDataset *detail = NULL;
		OFCondition cond;

		a.useTls(tls);
		verification.abstractSyntax = UID_VerificationSOPClass;
		verification.transferSyntaxes.assign(mddUncompressedTransferSyntaxes,
											 mddUncompressedTransferSyntaxes + 3);
		if (!a.open(our_ae, peer_ae, host, port, timeout, {verification}, error))
		{
			mddSetError(errbuf, errbuf_len, error);
			return MDD_DICOM_NETWORK;
		}
		cond = DIMSE_echoUser(a.get(), 1, DIMSE_BLOCKING, timeout, &status, &detail);
		delete detail;
		if (cond.bad() || status != STATUS_Success)
		{
			mddSetError(errbuf, errbuf_len, cond.bad()
						? std::string("C-ECHO failed: ") + cond.text()
						: "C-ECHO answered status " + std::to_string(status));
			return MDD_DICOM_NETWORK;
		}
		a.release();
		return MDD_DICOM_OK;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "C-ECHO failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}

/* ---------------------------------------------------------------------
 * C-STORE of stored objects
 * ---------------------------------------------------------------------
 */
namespace
{

/* where the data set starts: after the preamble and the group 0002 elements */
bool
datasetOffset(const unsigned char *d, size_t len, size_t *offset)
{
	static const char *const longVRs[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
	"SV", "UC", "UN", "UR", "UT", "UV"};
	size_t		p = 0;

	if (len >= 132 && memcmp(d + 128, "DICM", 4) == 0)
		p = 132;
	while (p + 8 <= len && d[p] == 0x02 && d[p + 1] == 0x00)
	{
		char		vr[3] = {(char) d[p + 4], (char) d[p + 5], '\0'};
		bool		isLong = false;
		unsigned long vlen;

		for (const char *l : longVRs)
			isLong = isLong || strcmp(vr, l) == 0;
		if (isLong)
		{
			if (p + 12 > len)
				return false;
			vlen = d[p + 8] | (d[p + 9] << 8) | (d[p + 10] << 16) | ((unsigned long) d[p + 11] << 24);
			p += 12;
		}
		else
		{
			vlen = d[p + 6] | (d[p + 7] << 8);
			p += 8;
		}
		if (vlen > len - p)
			return false;
		p += vlen;
	}
	*offset = p;
	return p < len;
}

void
put16(std::string &out, unsigned v)
{
	out += (char) (v & 0xFF);
	out += (char) ((v >> 8) & 0xFF);
}

void
put32(std::string &out, unsigned long v)
{
	for (int i = 0; i < 4; i++)
		out += (char) ((v >> (8 * i)) & 0xFF);
}

/* one implicit VR little endian element of the command group */
void
putCommandElement(std::string &out, unsigned element, const std::string &value)
{
	put16(out, 0x0000);
	put16(out, element);
	put32(out, value.size());
	out += value;
}

std::string
us(unsigned v)
{
	std::string s;

	put16(s, v);
	return s;
}

std::string
padded(std::string v, char pad)
{
	if (v.size() % 2)
		v += pad;
	return v;
}

/* the C-STORE-RQ command set, implicit VR little endian with its group length */
std::string
storeCommand(const MddStoreRequest &req)
{
	std::string body;
	std::string out;

	putCommandElement(body, 0x0002, padded(req.sopClass, '\0'));
	putCommandElement(body, 0x0100, us(0x0001));	/* C-STORE-RQ */
	putCommandElement(body, 0x0110, us(req.messageID));
	putCommandElement(body, 0x0700, us(0x0000));	/* medium priority */
	putCommandElement(body, 0x0800, us(0x0000));	/* a data set follows */
	putCommandElement(body, 0x1000, padded(req.sopInstance, '\0'));
	if (!req.moveOriginatorAE.empty())
	{
		putCommandElement(body, 0x1030, padded(req.moveOriginatorAE, ' '));
		putCommandElement(body, 0x1031, us(req.moveOriginatorID));
	}
	put16(out, 0x0000);
	put16(out, 0x0000);
	put32(out, 4);
	put32(out, body.size());
	return out + body;
}

OFCondition
writePDV(T_ASC_Association *assoc, T_ASC_PresentationContextID presID, DUL_DATAPDV type,
		 const void *data, size_t len)
{
	DUL_PDV		pdv;
	DUL_PDVLIST list;

	pdv.fragmentLength = len;
	pdv.presentationContextID = presID;
	pdv.pdvType = type;
	pdv.lastPDV = OFTrue;
	pdv.data = const_cast<void *>(data);
	list.count = 1;
	list.pdv = &pdv;
	/* the upper layer cuts the PDV to the peer's maximum PDU length */
	return DUL_WritePDVs(&assoc->DULassociation, &list);
}

/*
 * The accepted context to send on: the stored transfer syntax if one has
 * it, else an uncompressed one for an uncompressed object (converted).
 */
T_ASC_PresentationContextID
chooseContext(T_ASC_Association *assoc, bool asGetProvider, const MddStoreRequest &req,
			  bool *convert)
{
	T_ASC_PresentationContextID fallback = 0;
	int			n = ASC_countPresentationContexts(assoc->params);

	for (int i = 0; i < n; i++)
	{
		T_ASC_PresentationContext pc;

		if (ASC_getPresentationContext(assoc->params, i, &pc).bad() ||
			pc.resultReason != ASC_P_ACCEPTANCE || req.sopClass != pc.abstractSyntax)
			continue;
		/* in a C-GET, the peer must have taken the storage SCP role */
		if (asGetProvider ? (pc.acceptedRole != ASC_SC_ROLE_SCP &&
							 pc.acceptedRole != ASC_SC_ROLE_SCUSCP)
			: pc.acceptedRole == ASC_SC_ROLE_SCP)
			continue;
		if (req.transferSyntax == pc.acceptedTransferSyntax)
		{
			*convert = false;
			return pc.presentationContextID;
		}
		if (fallback == 0 && mddIsUncompressed(req.transferSyntax) &&
			mddIsUncompressed(pc.acceptedTransferSyntax))
			fallback = pc.presentationContextID;
	}
	*convert = true;
	return fallback;
}

/* send the object converted to the context's (uncompressed) transfer syntax */
MddStoreOutcome
sendConverted(T_ASC_Association *assoc, T_ASC_PresentationContextID presID,
			  const MddStoreRequest &req, std::string &error)
{
	DcmFileFormat ff;
	T_DIMSE_Message msg;
	T_ASC_PresentationContext pc;
	OFCondition cond = mddReadFromMemory(ff, req.data, req.len);

	if (cond.good())
		cond = ff.getDataset()->loadAllDataIntoMemory();
	if (cond.bad())
	{
		error = std::string("cannot read the stored object to convert it: ") + cond.text();
		return MDD_STORE_NOT_SENDABLE;
	}
	if (ASC_findAcceptedPresentationContext(assoc->params, presID, &pc).bad() ||
		!ff.getDataset()->canWriteXfer(DcmXfer(pc.acceptedTransferSyntax).getXfer(),
									   ff.getDataset()->getOriginalXfer()))
	{
		error = "cannot convert the object from " + req.transferSyntax + " to " +
			pc.acceptedTransferSyntax;
		return MDD_STORE_NOT_SENDABLE;
	}
	memset(&msg, 0, sizeof(msg));
	msg.CommandField = DIMSE_C_STORE_RQ;
	T_DIMSE_C_StoreRQ &rq = msg.msg.CStoreRQ;

	rq.MessageID = req.messageID;
	rq.Priority = DIMSE_PRIORITY_MEDIUM;
	rq.DataSetType = DIMSE_DATASET_PRESENT;
	OFStandard::strlcpy(rq.AffectedSOPClassUID, req.sopClass.c_str(), sizeof(rq.AffectedSOPClassUID));
	OFStandard::strlcpy(rq.AffectedSOPInstanceUID, req.sopInstance.c_str(),
						sizeof(rq.AffectedSOPInstanceUID));
	if (!req.moveOriginatorAE.empty())
	{
		OFStandard::strlcpy(rq.MoveOriginatorApplicationEntityTitle, req.moveOriginatorAE.c_str(),
							sizeof(rq.MoveOriginatorApplicationEntityTitle));
		rq.MoveOriginatorID = req.moveOriginatorID;
		rq.opts = O_STORE_MOVEORIGINATORAETITLE | O_STORE_MOVEORIGINATORID;
	}
	cond = DIMSE_sendMessageUsingMemoryData(assoc, presID, &msg, NULL, ff.getDataset(),
											NULL, NULL);
	if (cond.bad())
	{
		error = std::string("sending failed: ") + cond.text();
		return MDD_STORE_BROKEN;
	}
	return MDD_STORE_ANSWERED;
}

}								/* namespace */

MddStoreOutcome
mddSendStored(T_ASC_Association *assoc, int fd, bool asGetProvider,
			  const MddStoreRequest &req, int timeout, const MddDicomCallbacks *cb,
			  DIC_US cancelMessageID, bool *cancelled, DIC_US *status, std::string &error,
			  std::string *comment)
{
	bool		convert = false;
	size_t		offset = 0;
	T_ASC_PresentationContextID presID = chooseContext(assoc, asGetProvider, req, &convert);
	OFCondition cond;

	if (presID == 0)
	{
		error = "no accepted presentation context for " + req.sopClass + " in " +
			req.transferSyntax + (mddIsUncompressed(req.transferSyntax) ? " or another uncompressed syntax" : "");
		return MDD_STORE_NOT_SENDABLE;
	}
	if (convert)
	{
		MddStoreOutcome sent = sendConverted(assoc, presID, req, error);

		if (sent != MDD_STORE_ANSWERED)
			return sent;
	}
	else
	{
		std::string command = storeCommand(req);

		if (!datasetOffset(req.data, req.len, &offset))
		{
			error = "the stored object has no data set after its file meta information";
			return MDD_STORE_NOT_SENDABLE;
		}
		cond = writePDV(assoc, presID, DUL_COMMANDPDV, command.data(), command.size());
		if (cond.good())
			cond = writePDV(assoc, presID, DUL_DATASETPDV, req.data + offset, req.len - offset);
		if (cond.bad())
		{
			error = std::string("sending failed: ") + cond.text();
			return MDD_STORE_BROKEN;
		}
	}

	/* the answer; a C-CANCEL of the C-GET may come first */
	for (;;)
	{
		T_DIMSE_Message rsp;
		T_ASC_PresentationContextID rspID = 0;
		DcmDataset *detail = NULL;

		if (!mddWaitForMessage(assoc, fd, timeout, cb))
		{
			error = "no C-STORE response within the DIMSE timeout";
			return MDD_STORE_BROKEN;
		}
		cond = DIMSE_receiveCommand(assoc, DIMSE_BLOCKING, timeout, &rspID, &rsp, &detail);
		if (comment)
		{
			OFString	text;

			comment->clear();
			if (detail && detail->findAndGetOFString(DCM_ErrorComment, text).good())
				comment->assign(text.c_str());
		}
		delete detail;
		if (cond.bad())
		{
			error = std::string("no C-STORE response: ") + cond.text();
			return MDD_STORE_BROKEN;
		}
		if (rsp.CommandField == DIMSE_C_CANCEL_RQ && cancelled &&
			rsp.msg.CCancelRQ.MessageIDBeingRespondedTo == cancelMessageID)
		{
			*cancelled = true;
			continue;
		}
		if (rsp.CommandField != DIMSE_C_STORE_RSP ||
			rsp.msg.CStoreRSP.MessageIDBeingRespondedTo != req.messageID)
		{
			error = "unexpected DIMSE message " + std::to_string(rsp.CommandField) +
				" instead of the C-STORE response";
			return MDD_STORE_BROKEN;
		}
		*status = rsp.msg.CStoreRSP.DimseStatus;
		return MDD_STORE_ANSWERED;
	}
}
