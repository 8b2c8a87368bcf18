/*
 * dicom_common.cpp
 *	  Helpers shared by the C++ files of the DCMTK boundary (dicom_common.hpp).
 *
 * C++ only; includes no PostgreSQL header.
 */
#include "dicom_common.hpp"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/oflog/oflog.h>

#include <cstdio>
#include <cstdlib>

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
