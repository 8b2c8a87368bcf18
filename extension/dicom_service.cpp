/*
 * dicom_service.cpp
 *	  Helpers the DIMSE handlers of a served association share
 *	  (dicom_service.hpp): identifier keys as JSON, error comments, and a
 *	  wait for the next message that a stop request interrupts.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes.
 */
#include "dicom_service.hpp"
#include "dicom_json.hpp"

#include <ctime>

std::string
mddIdentifierKeys(DcmDataset *ids, std::vector<DcmTagKey> *asked, OFString *level)
{
	MddJsonWriter keys;

	(void) ids->convertToUTF8();
	ids->findAndGetOFString(DCM_QueryRetrieveLevel, *level);
	keys.beginObject();
	for (unsigned long i = 0; i < ids->card(); i++)
	{
		DcmElement *e = ids->getElement(i);
		DcmTag		tag(e->getTag());
		OFString	value;

		if (tag.getElement() == 0x0000 || tag == DCM_QueryRetrieveLevel ||
			tag == DCM_SpecificCharacterSet || tag.getEVR() == EVR_SQ || tag.isPrivate())
			continue;
		if (asked)
			asked->push_back(tag.getXTag());
		e->getOFStringArray(value, OFTrue);
		keys.key(tag.getTagName());
		keys.string(std::string(value.c_str(), value.length()));
	}
	keys.endObject();
	return keys.text();
}

void
mddPutErrorComment(DcmDataset &detail, const char *comment)
{
	std::string c(comment);

	if (c.size() > 64)			/* Error Comment is LO */
		c.resize(64);
	detail.putAndInsertString(DCM_ErrorComment, c.c_str());
}

bool
mddWaitForMessage(T_ASC_Association *assoc, int fd, int timeout, const MddDicomCallbacks *cb)
{
	time_t		deadline = time(NULL) + timeout;

	for (;;)
	{
		/* a stop request first: it shuts the served connection down */
		if (cb->should_stop(cb->arg))
			return false;
		/* DCMTK may already hold data it read ahead */
		if (ASC_dataWaiting(assoc, 0))
			return true;
		if (fd >= 0 ? cb->wait_readable(cb->arg, fd, 1000) : ASC_dataWaiting(assoc, 1))
			return true;
		if (time(NULL) >= deadline)
			return false;
	}
}
