/*
 * dicom_common.hpp
 *	  Helpers shared by the C++ files of the DCMTK boundary.
 *
 * C++ only; includes no PostgreSQL header.
 */
#ifndef MDD_DICOM_COMMON_HPP
#define MDD_DICOM_COMMON_HPP

#include <cstddef>
#include <string>

/* copy a message into a caller's error buffer (which may be NULL) */
void		mddSetError(char *errbuf, size_t len, const std::string &msg);

/*
 * Set DCMTK up for use inside a server process, once: no logging of its
 * own (errors come back as statuses) and TCP_NODELAY on every socket it
 * opens (DCMTK reads the environment variable).
 */
void		mddInitialiseDcmtk();

class DcmItem;

/*
 * Give text attributes of item (and of the items of its sequences) that
 * arrived with VR UN (from a converter that did not know them) their
 * dictionary VR, so that they are read and decoded like any other text,
 * Specific Character Set included.  Only the in-memory copy changes; the
 * stored bytes stay as received.
 */
void		mddRetypeUnknownText(DcmItem *item, int depth = 0);

#endif
