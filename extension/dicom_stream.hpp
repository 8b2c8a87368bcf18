/*
 * dicom_stream.hpp
 *	  Reading a DICOM object held in memory with DCMTK, safely.
 *
 * C++ only; includes no PostgreSQL header.
 */
#ifndef MDD_DICOM_STREAM_HPP
#define MDD_DICOM_STREAM_HPP

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcfilefo.h>

#include <cstddef>

/*
 * Read a Part 10 file or a bare data set from data into ff.  Values longer
 * than DCMTK's read limit are loaded only when asked for, from the same
 * bytes, so data must stay valid as long as ff is used.  Nested sequences
 * deeper than a stack limit and deflated data sets that inflate beyond a
 * size limit make the read fail.
 */
OFCondition mddReadFromMemory(DcmFileFormat &ff, const unsigned char *data, size_t len);

#endif
