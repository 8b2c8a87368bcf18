/*
 * dicom_find.cpp
 *	  C-FIND as a service user, for mdd.find (the finder functions of
 *	  dicom.h): an association in the Study Root model, and queries on it
 *	  whose matches come back as UTF-8 text, decoded from each answer's
 *	  Specific Character Set.
 *
 * Waits are cut into short polls of the association's socket, so that a
 * stop request (should_stop) ends a query within a quarter of a second;
 * before the association is up, the caller's on_socket hook lets its
 * signal handler shut the socket down instead.  The node's time limit is
 * a deadline for the whole query, not for each message.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes.
 */
#include "dicom_common.hpp"
#include "dicom_scu.hpp"

#include <dcmtk/dcmdata/dctk.h>

#include <poll.h>

#include <chrono>
#include <memory>
#include <new>
#include <string>
#include <vector>

struct MddDicomFinder
{
	MddScuAssociation association;
	MddDicomFinderConfig config;
	T_ASC_PresentationContextID presID;
	DIC_US		nextMessageID;
	bool		broken;
};

namespace
{

typedef std::chrono::steady_clock Clock;

/* the observer of the association's socket: hands it on to the C side */
void
observeSocket(void *arg, int fd)
{
	MddDicomFinder *f = static_cast<MddDicomFinder *>(arg);

	if (f->config.on_socket)
		f->config.on_socket(f->config.arg, fd);
}

bool
shouldStop(const MddDicomFinder *f)
{
	return f->config.should_stop && f->config.should_stop(f->config.arg);
}

long
millisecondsLeft(Clock::time_point deadline)
{
	return (long) std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
}

/* whole seconds for a DCMTK timeout: what is left, rounded up, at least 1 */
int
secondsLeft(Clock::time_point deadline)
{
	long		ms = millisecondsLeft(deadline);

	return ms <= 1000 ? 1 : (int) ((ms + 999) / 1000);
}

enum WaitResult
{
	WAIT_READY,
	WAIT_TIMED_OUT,
	WAIT_STOP
};

/* wait until a message can be read, the deadline passes or a stop is asked */
WaitResult
waitForMessage(MddDicomFinder *f, Clock::time_point deadline)
{
	int			fd = f->association.socket();

	for (;;)
	{
		long		left;
		struct pollfd pfd;

		if (shouldStop(f))
			return WAIT_STOP;
		/* DCMTK may already hold data it read ahead */
		if (ASC_dataWaiting(f->association.get(), 0))
			return WAIT_READY;
		left = millisecondsLeft(deadline);
		if (left <= 0)
			return WAIT_TIMED_OUT;
		if (fd < 0)
		{
			/* no socket known: let DCMTK wait, a second at a time */
			if (ASC_dataWaiting(f->association.get(), 1))
				return WAIT_READY;
			continue;
		}
		pfd.fd = fd;
		pfd.events = POLLIN;
		pfd.revents = 0;
		if (poll(&pfd, 1, (int) std::min(left, 250L)) > 0)
			return WAIT_READY;
	}
}

/* text without the padding (spaces, NULs) around it */
std::string
trimmed(const OFString &value)
{
	std::string s(value.c_str(), value.length());
	size_t		b = s.find_first_not_of(std::string(" \0", 2));

	if (b == std::string::npos)
		return "";
	return s.substr(b, s.find_last_not_of(std::string(" \0", 2)) - b + 1);
}

/*
 * Replace what is not well-formed UTF-8 (a value DCMTK could not decode)
 * by '?', so that the C side always receives valid text.
 */
void
makeValidUtf8(std::string &s)
{
	size_t		i = 0;

	while (i < s.size())
	{
		unsigned char c = (unsigned char) s[i];
		size_t		n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
		bool		good = n > 0 && i + n <= s.size() && c != 0;

		for (size_t k = 1; good && k < n; k++)
			good = ((unsigned char) s[i + k] >> 6) == 0x2;
		/* no overlong two-byte forms */
		if (good && n == 2 && c < 0xC2)
			good = false;
		if (!good)
		{
			s[i] = '?';
			i++;
		}
		else
			i += n;
	}
}

std::string
hex4(unsigned v)
{
	char		buf[8];

	snprintf(buf, sizeof(buf), "%04X", v & 0xFFFF);
	return buf;
}

}								/* namespace */

extern "C" MddDicomStatus
mdd_dicom_finder_open(const MddDicomFinderConfig *config, MddDicomFinder **finder,
					  MddFindFailure *failure, char *errbuf, size_t errbuf_len)
{
	*finder = NULL;
	*failure = MDD_FIND_BROKEN;
	mddSetError(errbuf, errbuf_len, "");
	try
	{
		std::unique_ptr<MddDicomFinder> f(new MddDicomFinder());
		MddProposedContext find;
		std::string error;
		int			timeout = config->timeout_ms <= 1000 ? 1 : (config->timeout_ms + 999) / 1000;

		f->config = *config;
		f->presID = 0;
		f->nextMessageID = 1;
		f->broken = false;
		find.abstractSyntax = UID_FINDStudyRootQueryRetrieveInformationModel;
		find.transferSyntaxes = {UID_LittleEndianExplicitTransferSyntax,
		UID_LittleEndianImplicitTransferSyntax};
		f->association.observeSocket(observeSocket, f.get());
		f->association.useTls(config->tls);
		if (!f->association.open(config->our_ae, config->peer_ae, config->host, config->port,
								 timeout, {find}, error))
		{
			std::string lower(error);

			for (char &c : lower)
				c = (char) tolower((unsigned char) c);
			if (shouldStop(f.get()))
				*failure = MDD_FIND_STOPPED;
			else if (f->association.rejected() || f->association.acceptedNone())
				*failure = MDD_FIND_REFUSED;
			else if (lower.find("timeout") != std::string::npos ||
					 lower.find("timed out") != std::string::npos)
				*failure = MDD_FIND_TIMEOUT;
			else if (!f->association.connected())
				*failure = MDD_FIND_UNREACHABLE;
			else
				*failure = MDD_FIND_BROKEN;
			mddSetError(errbuf, errbuf_len, error);
			return MDD_DICOM_NETWORK;
		}
		f->presID = ASC_findAcceptedPresentationContextID(f->association.get(),
														  UID_FINDStudyRootQueryRetrieveInformationModel);
		if (f->presID == 0)
		{
			*failure = MDD_FIND_REFUSED;
			mddSetError(errbuf, errbuf_len, std::string(config->peer_ae) +
						" did not accept Study Root C-FIND");
			return MDD_DICOM_NETWORK;
		}
		*failure = MDD_FIND_DONE;
		*finder = f.release();
		return MDD_DICOM_OK;
	}
	catch (const std::bad_alloc &)
	{
		mddSetError(errbuf, errbuf_len, "out of memory opening the association");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "opening the association failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}

extern "C" MddDicomStatus
mdd_dicom_finder_query(MddDicomFinder *f, const char *level, int nkeys,
					   const char *const *keywords, const char *const *values,
					   int timeout_ms, MddFindAnswer answer, void *answer_arg,
					   MddFindFailure *failure, char *errbuf, size_t errbuf_len)
{
	*failure = MDD_FIND_BROKEN;
	mddSetError(errbuf, errbuf_len, "");
	try
	{
		Clock::time_point deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
		DcmDataset	ids;
		std::vector<DcmTagKey> tags;
		T_DIMSE_Message req;
		DIC_US		messageID;
		OFCondition cond;

		if (f->broken)
		{
			mddSetError(errbuf, errbuf_len, "the association failed before");
			return MDD_DICOM_NETWORK;
		}
		ids.putAndInsertString(DCM_SpecificCharacterSet, "ISO_IR 192");
		ids.putAndInsertString(DCM_QueryRetrieveLevel, level);
		for (int i = 0; i < nkeys; i++)
		{
			DcmTag		tag;

			if (DcmTag::findTagFromName(keywords[i], tag).bad())
			{
				mddSetError(errbuf, errbuf_len, std::string("unknown DICOM keyword ") + keywords[i]);
				return MDD_DICOM_INTERNAL;
			}
			tags.push_back(tag.getXTag());
			if (values[i] && values[i][0])
				cond = ids.putAndInsertString(tag, values[i]);
			else
				cond = ids.insertEmptyElement(tag);
			if (cond.bad())
			{
				mddSetError(errbuf, errbuf_len, std::string("cannot put ") + keywords[i] +
							" in the identifier: " + cond.text());
				return MDD_DICOM_INTERNAL;
			}
		}

		memset(&req, 0, sizeof(req));
		messageID = f->nextMessageID++;
		req.CommandField = DIMSE_C_FIND_RQ;
		req.msg.CFindRQ.MessageID = messageID;
		req.msg.CFindRQ.Priority = DIMSE_PRIORITY_MEDIUM;
		req.msg.CFindRQ.DataSetType = DIMSE_DATASET_PRESENT;
		OFStandard::strlcpy(req.msg.CFindRQ.AffectedSOPClassUID,
							UID_FINDStudyRootQueryRetrieveInformationModel,
							sizeof(req.msg.CFindRQ.AffectedSOPClassUID));
		cond = DIMSE_sendMessageUsingMemoryData(f->association.get(), f->presID, &req, NULL,
												&ids, NULL, NULL);
		if (cond.bad())
		{
			f->broken = true;
			mddSetError(errbuf, errbuf_len, std::string("sending the C-FIND request failed: ") + cond.text());
			return MDD_DICOM_NETWORK;
		}

		for (;;)
		{
			T_DIMSE_Message rsp;
			T_ASC_PresentationContextID rspID = 0;
			DcmDataset *detail = NULL;
			DcmDataset *match = NULL;
			OFString	comment;
			DIC_US		status;

			switch (waitForMessage(f, deadline))
			{
				case WAIT_READY:
					break;
				case WAIT_TIMED_OUT:
					f->broken = true;
					*failure = MDD_FIND_TIMEOUT;
					mddSetError(errbuf, errbuf_len, "no C-FIND response in time");
					return MDD_DICOM_NETWORK;
				case WAIT_STOP:
					f->broken = true;
					*failure = MDD_FIND_STOPPED;
					mddSetError(errbuf, errbuf_len, "stopped");
					return MDD_DICOM_NETWORK;
			}
			cond = DIMSE_receiveCommand(f->association.get(), DIMSE_NONBLOCKING, secondsLeft(deadline),
										&rspID, &rsp, &detail);
			if (detail)
				detail->findAndGetOFString(DCM_ErrorComment, comment);
			delete detail;
			if (cond == DIMSE_NODATAAVAILABLE)
				continue;
			if (cond.bad())
			{
				f->broken = true;
				*failure = shouldStop(f) ? MDD_FIND_STOPPED : MDD_FIND_BROKEN;
				mddSetError(errbuf, errbuf_len, std::string("no C-FIND response: ") + cond.text());
				return MDD_DICOM_NETWORK;
			}
			if (rsp.CommandField != DIMSE_C_FIND_RSP ||
				rsp.msg.CFindRSP.MessageIDBeingRespondedTo != messageID)
			{
				f->broken = true;
				mddSetError(errbuf, errbuf_len, "unexpected DIMSE message 0x" +
							hex4(rsp.CommandField) + " instead of a C-FIND response");
				return MDD_DICOM_NETWORK;
			}
			status = rsp.msg.CFindRSP.DimseStatus;
			if (rsp.msg.CFindRSP.DataSetType != DIMSE_DATASET_NULL)
			{
				T_ASC_PresentationContextID dataID = 0;

				cond = DIMSE_receiveDataSetInMemory(f->association.get(), DIMSE_NONBLOCKING,
													secondsLeft(deadline), &dataID, &match,
													NULL, NULL);
				if (cond.bad())
				{
					f->broken = true;
					*failure = shouldStop(f) ? MDD_FIND_STOPPED
						: cond == DIMSE_NODATAAVAILABLE ? MDD_FIND_TIMEOUT : MDD_FIND_BROKEN;
					mddSetError(errbuf, errbuf_len, std::string("no C-FIND identifier: ") + cond.text());
					return MDD_DICOM_NETWORK;
				}
			}
			std::unique_ptr<DcmDataset> owner(match);

			if (DICOM_PENDING_STATUS(status))
			{
				std::vector<std::string> texts;
				std::vector<const char *> pointers;

				if (match == NULL)
					continue;	/* a pending answer without a match: nothing to report */
				(void) match->convertToUTF8();
				for (const DcmTagKey &tag : tags)
				{
					DcmElement *e = NULL;
					OFString	v;

					if (match->findAndGetElement(tag, e).good() && e != NULL)
						e->getOFStringArray(v, OFTrue);
					texts.push_back(trimmed(v));
					makeValidUtf8(texts.back());
				}
				for (const std::string &t : texts)
					pointers.push_back(t.c_str());
				if (!answer(answer_arg, (int) texts.size(), pointers.data()))
				{
					(void) DIMSE_sendCancelRequest(f->association.get(), f->presID, messageID);
					f->broken = true;
					*failure = MDD_FIND_STOPPED;
					mddSetError(errbuf, errbuf_len, "cancelled");
					return MDD_DICOM_NETWORK;
				}
				continue;
			}
			if (status == STATUS_Success)
			{
				*failure = MDD_FIND_DONE;
				return MDD_DICOM_OK;
			}
			*failure = MDD_FIND_REFUSED;
			{
				std::string text = "C-FIND answered status 0x" + hex4(status);

				if (!comment.empty())
				{
					std::string c = trimmed(comment);

					makeValidUtf8(c);
					text += " (" + c + ")";
				}
				mddSetError(errbuf, errbuf_len, text);
			}
			return MDD_DICOM_NETWORK;
		}
	}
	catch (const std::bad_alloc &)
	{
		f->broken = true;
		mddSetError(errbuf, errbuf_len, "out of memory during the C-FIND");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	catch (...)
	{
		f->broken = true;
		mddSetError(errbuf, errbuf_len, "C-FIND failed with an exception");
		return MDD_DICOM_INTERNAL;
	}
}

extern "C" void
mdd_dicom_finder_close(MddDicomFinder *finder, int release)
{
	mddCloseHandle(finder, release);
}
