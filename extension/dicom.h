/*-------------------------------------------------------------------------
 *
 * dicom.h
 *	  The only door between mdd's C code and DCMTK (C++).
 *
 * Everything behind this header lives in dicom_*.cpp, which include no
 * PostgreSQL header.  Functions here never throw and never longjmp: they
 * return a status code and, on failure, a message in the caller's buffer.
 * Memory handed back is malloc()ed and released with the matching
 * mdd_dicom_free_*() function.
 *
 *-------------------------------------------------------------------------
 */
#ifndef MDD_DICOM_H
#define MDD_DICOM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C"
{
#endif

/* status codes returned by the functions of this header */
typedef enum MddDicomStatus
{
	MDD_DICOM_OK = 0,
	MDD_DICOM_EMPTY,			/* no bytes at all */
	MDD_DICOM_NOT_DICOM,		/* bytes are not a DICOM file or data set */
	MDD_DICOM_MALFORMED,		/* DICOM, but truncated or unreadable */
	MDD_DICOM_MISSING_UID,		/* readable, but without SOP class/instance UID */
	MDD_DICOM_OUT_OF_MEMORY,
	MDD_DICOM_INTERNAL			/* anything else (a caught C++ exception) */
} MddDicomStatus;

/*
 * Parse one DICOM object (a Part 10 file or a bare data set in any transfer
 * syntax) held in memory.  On success *json_out receives a NUL-terminated
 * JSON document (malloc()ed, free with mdd_dicom_free_json) describing the
 * object: the catalog attributes as UTF-8 text, the references it makes to
 * other objects, and the rest of its top-level header.  On failure *json_out
 * is NULL and errbuf holds a one-line reason.
 */
extern MddDicomStatus mdd_dicom_parse(const unsigned char *data, size_t len,
									  char **json_out,
									  char *errbuf, size_t errbuf_len);

extern void mdd_dicom_free_json(char *json);

#ifdef __cplusplus
}
#endif

#endif							/* MDD_DICOM_H */
