/*
 * dicom_common.cpp
 *	  Helpers shared by the C++ files of the DCMTK boundary (dicom_common.hpp).
 *
 * C++ only; includes no PostgreSQL header.
 */
#include "dicom_common.hpp"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/oflog/oflog.h>

#include <cstdio>
#include <cstdlib>
#include <string>

void
mddSetError(char *errbuf, size_t len, const std::string &msg)
{
	if (errbuf && len > 0)
		snprintf(errbuf, len, "%s", msg.c_str());
}

void
mddInitialiseDcmtk()
{
	static bool done = false;

	if (!done)
	{
		OFLog::configure(OFLogger::OFF_LOG_LEVEL);
		setenv("TCP_NODELAY", "1", 0);
		done = true;
	}
}

void
mddRetypeUnknownText(DcmItem *item, int depth)
{
	if (depth > 32)
		return;
	for (unsigned long i = 0; i < item->card(); i++)
	{
		DcmElement *e = item->getElement(i);
		DcmEVR		vr = e->getTag().getEVR();

		if (vr == EVR_SQ)
		{
			DcmSequenceOfItems *sq = static_cast<DcmSequenceOfItems *>(static_cast<DcmObject *>(e));

			for (unsigned long j = 0; j < sq->card(); j++)
				mddRetypeUnknownText(sq->getItem(j), depth + 1);
			continue;
		}
		if (vr != EVR_UN || e->getTag().isPrivate())
			continue;

		DcmTag		dictTag(e->getTag().getXTag());
		DcmVR		dictVR(dictTag.getEVR());
		Uint8	   *bytes = NULL;

		if (!dictVR.isaString() || dictVR.getEVR() == EVR_UN)
			continue;
		if (e->getUint8Array(bytes).bad() || (bytes == NULL && e->getLength() > 0))
			continue;

		std::string text(reinterpret_cast<const char *>(bytes), e->getLength());
		DcmElement *typed = NULL;

		while (!text.empty() && (text.back() == ' ' || text.back() == '\0'))
			text.pop_back();
		if (DcmItem::newDicomElement(typed, dictTag.getXTag()).bad() || typed == NULL)
			continue;
		if (typed->putOFStringArray(OFString(text.data(), text.size())).bad() ||
			item->insert(typed, OFTrue).bad())
		{
			delete typed;
			continue;
		}
	}
}
