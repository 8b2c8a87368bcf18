/*
 * dicom_service.hpp
 *	  What the DIMSE handlers of one served association share: the
 *	  association, what the C side granted it, and small helpers for
 *	  identifiers, status comments and waits that a stop request interrupts.
 *
 * C++ only; includes no PostgreSQL header.
 */
#ifndef MDD_DICOM_SERVICE_HPP
#define MDD_DICOM_SERVICE_HPP

#include "dicom.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dimse.h>

#include <string>
#include <vector>

/* one association being served, with what the C side granted it */
struct MddServedAssociation
{
	T_ASC_Association *assoc;
	int			fd;
	const MddDicomServerConfig *config;
	const MddDicomCallbacks *cb;
	int			permits;
	std::string callingAE;

	void log(int level, const std::string &msg) const
	{
		if (cb->log)
			cb->log(cb->arg, level, msg.c_str());
	}
};

/*
 * The keys of a query or retrieve identifier as a JSON object keyword ->
 * value (UTF-8), and the tags asked, in order; sequences, private and
 * command-level elements are left out.  level receives Query/Retrieve Level.
 */
std::string mddIdentifierKeys(DcmDataset *ids, std::vector<DcmTagKey> *asked,
							  OFString *level);

/* a status detail with the comment, cut to the 64 characters of LO */
void		mddPutErrorComment(DcmDataset &detail, const char *comment);

/* a DcmConsumer that keeps everything written to it in memory */
class MddMemoryConsumer : public DcmConsumer
{
public:
	OFBool good() const override { return true; }
	OFCondition status() const override { return EC_Normal; }
	OFBool isFlushed() const override { return true; }
	offile_off_t avail() const override { return 1 << 30; }
	offile_off_t write(const void *buf, offile_off_t buflen) override
	{
		const unsigned char *p = static_cast<const unsigned char *>(buf);

		bytes.insert(bytes.end(), p, p + buflen);
		return buflen;
	}
	void flush() override {}

	std::vector<unsigned char> bytes;
};

/*
 * The output stream DIMSE_receiveDataSetInFile writes a received data set
 * to: its bytes exactly as they arrived, kept in memory.
 */
class MddMemoryOutputStream : public DcmOutputStream
{
public:
	MddMemoryOutputStream() : DcmOutputStream(&consumer_) {}
	std::vector<unsigned char> &bytes() { return consumer_.bytes; }

private:
	MddMemoryConsumer consumer_;
};

/*
 * A Part 10 file: preamble, "DICM", a file meta information group written
 * by mdd for this object (Source AE Title when sourceAE is not empty), then
 * the data set bytes exactly as received.
 */
std::vector<unsigned char> mddPart10File(const std::vector<unsigned char> &dataset,
										 const std::string &sopClass,
										 const std::string &sopInstance,
										 const std::string &transferSyntax,
										 const std::string &sourceAE);

/*
 * Wait until a DIMSE message can be read on assoc or timeout seconds
 * passed; false on timeout or when the service must stop.  With the
 * association's socket fd the wait wakes at once on a stop request;
 * without (fd -1) it looks again every second.
 */
bool		mddWaitForMessage(T_ASC_Association *assoc, int fd, int timeout,
							  const MddDicomCallbacks *cb);

/* C-MOVE and C-GET as SCP (dicom_retrieve.cpp); false when the association must be aborted */
/* N-ACTION of the Storage Commitment Push Model (dicom_commit.cpp) */
bool		mddHandleCommitAction(MddServedAssociation &sa, T_ASC_PresentationContextID presID,
								  T_DIMSE_N_ActionRQ &req);

bool		mddHandleMove(MddServedAssociation &sa, T_ASC_PresentationContextID presID,
						  T_DIMSE_C_MoveRQ &req);
bool		mddHandleGet(MddServedAssociation &sa, T_ASC_PresentationContextID presID,
						 T_DIMSE_C_GetRQ &req);

#endif
