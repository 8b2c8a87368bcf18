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

/*
 * Wait until a DIMSE message can be read on assoc or timeout seconds
 * passed; false on timeout or when the service must stop.  With the
 * association's socket fd the wait wakes at once on a stop request;
 * without (fd -1) it looks again every second.
 */
bool		mddWaitForMessage(T_ASC_Association *assoc, int fd, int timeout,
							  const MddDicomCallbacks *cb);

/* C-MOVE and C-GET as SCP (dicom_retrieve.cpp); false when the association must be aborted */
bool		mddHandleMove(MddServedAssociation &sa, T_ASC_PresentationContextID presID,
						  T_DIMSE_C_MoveRQ &req);
bool		mddHandleGet(MddServedAssociation &sa, T_ASC_PresentationContextID presID,
						 T_DIMSE_C_GetRQ &req);

#endif
