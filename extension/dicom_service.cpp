/*
 * dicom_service.cpp
 *	  Helpers the DIMSE handlers of a served association share
 *	  (dicom_service.hpp): identifier keys as JSON, error comments, a wait
 *	  for the next message that a stop request interrupts, and the Part 10
 *	  file built around a received data set (also used for what mdd's own
 *	  C-GET receives, dicom_fetch.cpp).
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes.
 */
#include "dicom_service.hpp"
#include "dicom_json.hpp"

#include <ctime>

namespace
{

const char *const MDD_IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1379.1";
const char *const MDD_IMPLEMENTATION_VERSION = "MDD_010";

void
put16(std::vector<unsigned char> &out, unsigned v)
{
	out.push_back(v & 0xFF);
	out.push_back((v >> 8) & 0xFF);
}

void
put32(std::vector<unsigned char> &out, unsigned long v)
{
	for (int i = 0; i < 4; i++)
		out.push_back((v >> (8 * i)) & 0xFF);
}

/* one explicit VR little endian element of group 0002 with a short VR */
void
putMetaElement(std::vector<unsigned char> &out, unsigned element, const char *vr,
			   const std::string &value, char pad)
{
	std::string v = value;

	if (v.size() % 2)
		v += pad;
	put16(out, 0x0002);
	put16(out, element);
	out.push_back(vr[0]);
	out.push_back(vr[1]);
	put16(out, static_cast<unsigned>(v.size()));
	out.insert(out.end(), v.begin(), v.end());
}

}								/* namespace */

std::vector<unsigned char>
mddPart10File(const std::vector<unsigned char> &dataset, const std::string &sopClass,
			  const std::string &sopInstance, const std::string &transferSyntax,
			  const std::string &sourceAE)
{
	std::vector<unsigned char> group;
	std::vector<unsigned char> out(128, 0);

	/* (0002,0001) OB 00\01: OB has the long form */
	put16(group, 0x0002);
	put16(group, 0x0001);
	group.push_back('O');
	group.push_back('B');
	put16(group, 0);
	put32(group, 2);
	group.push_back(0);
	group.push_back(1);
	putMetaElement(group, 0x0002, "UI", sopClass, '\0');
	putMetaElement(group, 0x0003, "UI", sopInstance, '\0');
	putMetaElement(group, 0x0010, "UI", transferSyntax, '\0');
	putMetaElement(group, 0x0012, "UI", MDD_IMPLEMENTATION_CLASS_UID, '\0');
	putMetaElement(group, 0x0013, "SH", MDD_IMPLEMENTATION_VERSION, ' ');
	if (!sourceAE.empty())
		putMetaElement(group, 0x0016, "AE", sourceAE, ' ');

	out.push_back('D');
	out.push_back('I');
	out.push_back('C');
	out.push_back('M');
	put16(out, 0x0002);
	put16(out, 0x0000);
	out.push_back('U');
	out.push_back('L');
	put16(out, 4);
	put32(out, group.size());
	out.insert(out.end(), group.begin(), group.end());
	out.insert(out.end(), dataset.begin(), dataset.end());
	return out;
}

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
