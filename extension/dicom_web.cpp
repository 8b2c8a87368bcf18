/*
 * dicom_web.cpp
 *	  The DICOM side of DICOMweb (PS3.18): an object's metadata as DICOM
 *	  JSON (DCMTK's writer, the one dcm2json uses), search results as DICOM
 *	  JSON, the keyword of an attribute given by keyword or tag, and the
 *	  uncompressed frames of an image.
 *
 * C++ only; includes no PostgreSQL header.  Nothing thrown escapes.
 */
#include "dicom.h"
#include "dicom_common.hpp"
#include "dicom_stream.hpp"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>
#include <dcmtk/dcmdata/dcjson.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <set>
#include <sstream>
#include <string>

namespace
{

/* a malloc()ed copy of s for the C side */
MddDicomStatus
handOut(const std::string &s, char **out, char *errbuf, size_t errbuf_len)
{
	char	   *copy = static_cast<char *>(malloc(s.size() + 1));

	if (copy == NULL)
	{
		mddSetError(errbuf, errbuf_len, "out of memory while writing DICOM JSON");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	memcpy(copy, s.c_str(), s.size() + 1);
	*out = copy;
	return MDD_DICOM_OK;
}

/*
 * The compact DICOM JSON format, giving top-level binary values longer than
 * a threshold as a BulkDataURI instead of inline: prefix + "/GGGGEEEE".
 */
class BulkFormat : public DcmJsonFormatCompact
{
public:
	BulkFormat(const std::string &prefix, const std::set<Uint32> &tags)
		: DcmJsonFormatCompact(OFTrue), prefix_(prefix), tags_(tags)
	{
	}

	OFBool asBulkDataURI(const DcmTagKey &tag, OFString &uri) override
	{
		char		hex[16];

		if (tags_.count((static_cast<Uint32>(tag.getGroup()) << 16) | tag.getElement()) == 0)
			return OFFalse;
		snprintf(hex, sizeof(hex), "/%04X%04X", tag.getGroup(), tag.getElement());
		uri = (prefix_ + hex).c_str();
		return OFTrue;
	}

private:
	std::string prefix_;
	std::set<Uint32> tags_;
};

bool
isBulkVR(DcmEVR vr)
{
	return vr == EVR_OB || vr == EVR_OW || vr == EVR_OF || vr == EVR_OD ||
		vr == EVR_OL || vr == EVR_OV || vr == EVR_UN || vr == EVR_ox ||
		vr == EVR_px || vr == EVR_pixelSQ || vr == EVR_PixelData || vr == EVR_OverlayData;
}

/* read data into ff, with the statuses of mdd_dicom_parse */
MddDicomStatus
readObject(DcmFileFormat &ff, const unsigned char *data, size_t len,
		   char *errbuf, size_t errbuf_len)
{
	OFCondition cond;

	if (data == NULL || len == 0)
	{
		mddSetError(errbuf, errbuf_len, "empty input");
		return MDD_DICOM_EMPTY;
	}
	cond = mddReadFromMemory(ff, data, len);
	if (cond.bad() || ff.getDataset() == NULL || ff.getDataset()->card() == 0)
	{
		mddSetError(errbuf, errbuf_len,
					std::string("unreadable DICOM: ") + (cond.bad() ? cond.text() : "no data set"));
		return MDD_DICOM_MALFORMED;
	}
	return MDD_DICOM_OK;
}

MddDicomStatus
metadata(const unsigned char *data, size_t len, size_t bulk_threshold,
		 const char *bulk_prefix, char **json_out, char *errbuf, size_t errbuf_len)
{
	DcmFileFormat ff;
	MddDicomStatus st = readObject(ff, data, len, errbuf, errbuf_len);
	DcmDataset *ds = ff.getDataset();
	std::set<Uint32> bulk;
	std::ostringstream out;
	OFString	charset;

	if (st != MDD_DICOM_OK)
		return st;
	mddRetypeUnknownText(ds);
	if (ds->loadAllDataIntoMemory().bad())
	{
		mddSetError(errbuf, errbuf_len, "could not load the values of the DICOM object");
		return MDD_DICOM_MALFORMED;
	}
	/* DICOM JSON is UTF-8: decode other character sets */
	if (ds->findAndGetOFStringArray(DCM_SpecificCharacterSet, charset).good() &&
		!charset.empty() && charset != "ISO_IR 192" && charset != "ISO_IR 6")
		(void) ds->convertToUTF8();
	if (bulk_threshold > 0 && bulk_prefix != NULL)
	{
		for (unsigned long i = 0; i < ds->card(); i++)
		{
			DcmElement *e = ds->getElement(i);

			if (e && isBulkVR(e->ident()) && e->getLength() > bulk_threshold)
				bulk.insert((static_cast<Uint32>(e->getGTag()) << 16) | e->getETag());
		}
	}
	BulkFormat	fmt(bulk_prefix ? bulk_prefix : "", bulk);

	out << "{";
	OFCondition cond = ds->writeJson(out, fmt);

	out << "}";

	if (cond.bad())
	{
		mddSetError(errbuf, errbuf_len, std::string("could not write DICOM JSON: ") + cond.text());
		return MDD_DICOM_INVALID;
	}
	return handOut(out.str(), json_out, errbuf, errbuf_len);
}

/* the tag of a keyword or of "GGGGEEEE"; false when neither */
bool
lookupTag(const char *name, DcmTag &tag)
{
	unsigned int g,
				e;
	char		rest;

	if (strlen(name) == 8 && strspn(name, "0123456789abcdefABCDEF") == 8 &&
		sscanf(name, "%4x%4x%c", &g, &e, &rest) == 2)
	{
		tag = DcmTag(static_cast<Uint16>(g), static_cast<Uint16>(e));
		return true;
	}
	return DcmTag::findTagFromName(name, tag).good();
}

MddDicomStatus
results(int nrows, int ncols, const char *const *names, const char *const *values,
		char **json_out, char *errbuf, size_t errbuf_len)
{
	std::ostringstream out;
	DcmJsonFormatCompact fmt(OFTrue);

	out << "[";
	for (int r = 0; r < nrows; r++)
	{
		DcmDataset	ds;

		for (int c = 0; c < ncols; c++)
		{
			const char *name = names[c];
			const char *value = values[r * ncols + c];
			DcmTag		tag;

			if (name == NULL || !lookupTag(name, tag))
				continue;
			if (tag.getEVR() == EVR_SQ || isBulkVR(tag.getEVR()))
				continue;
			if (value == NULL || value[0] == '\0')
				ds.insertEmptyElement(tag, OFTrue);
			else if (ds.putAndInsertString(tag, value, OFTrue).bad())
			{
				/* a value the VR cannot hold is answered empty */
				ds.insertEmptyElement(tag, OFTrue);
			}
		}
		if (r > 0)
			out << ",";
		/* DcmDataset::writeJson writes the members, not the braces */
		out << "{";
		OFCondition cond = ds.writeJson(out, fmt);

		out << "}";

		if (cond.bad())
		{
			mddSetError(errbuf, errbuf_len, std::string("could not write DICOM JSON: ") + cond.text());
			return MDD_DICOM_INVALID;
		}
	}
	out << "]";
	return handOut(out.str(), json_out, errbuf, errbuf_len);
}

MddDicomStatus
frames(const unsigned char *data, size_t len, const int *numbers, int count,
	   unsigned char **out, size_t *frame_size, char *errbuf, size_t errbuf_len)
{
	DcmFileFormat ff;
	MddDicomStatus st = readObject(ff, data, len, errbuf, errbuf_len);
	DcmDataset *ds = ff.getDataset();
	DcmElement *pixels = NULL;
	long		nframes = 1;
	Uint32		size = 0;

	if (st != MDD_DICOM_OK)
		return st;
	if (ds->findAndGetElement(DCM_PixelData, pixels).bad() || pixels == NULL)
	{
		mddSetError(errbuf, errbuf_len, "the object has no pixel data");
		return MDD_DICOM_INVALID;
	}
	if (DcmXfer(ds->getOriginalXfer()).isEncapsulated())
	{
		mddSetError(errbuf, errbuf_len,
					std::string("the pixel data are compressed (") +
					DcmXfer(ds->getOriginalXfer()).getXferName() + ")");
		return MDD_DICOM_UNSUPPORTED;
	}
	(void) ds->findAndGetLongInt(DCM_NumberOfFrames, nframes);
	if (nframes < 1)
		nframes = 1;
	if (pixels->getUncompressedFrameSize(ds, size).bad() || size == 0)
	{
		mddSetError(errbuf, errbuf_len, "the frame size of the pixel data is unknown");
		return MDD_DICOM_INVALID;
	}
	for (int i = 0; i < count; i++)
		if (numbers[i] < 1 || numbers[i] > nframes)
		{
			mddSetError(errbuf, errbuf_len, "frame " + std::to_string(numbers[i]) +
						" does not exist: the object has " + std::to_string(nframes) +
						(nframes == 1 ? " frame" : " frames"));
			return MDD_DICOM_REFUSED;
		}
	unsigned char *buf = static_cast<unsigned char *>(malloc(static_cast<size_t>(size) * count + 1));

	if (buf == NULL)
	{
		mddSetError(errbuf, errbuf_len, "out of memory while extracting frames");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	for (int i = 0; i < count; i++)
	{
		Uint32		start = 0;
		OFString	colour;
		OFCondition cond = pixels->getUncompressedFrame(ds, numbers[i] - 1, start,
														buf + static_cast<size_t>(size) * i,
														size, colour, NULL);

		if (cond.bad())
		{
			free(buf);
			mddSetError(errbuf, errbuf_len, std::string("could not extract frame ") +
						std::to_string(numbers[i]) + ": " + cond.text());
			return MDD_DICOM_MALFORMED;
		}
	}
	*out = buf;
	*frame_size = size;
	return MDD_DICOM_OK;
}

MddDicomStatus
bulk(const unsigned char *data, size_t len, const char *tagname, unsigned char **out,
	 size_t *out_len, char *errbuf, size_t errbuf_len)
{
	DcmFileFormat ff;
	MddDicomStatus st = readObject(ff, data, len, errbuf, errbuf_len);
	DcmDataset *ds = ff.getDataset();
	DcmElement *e = NULL;
	DcmTag		tag;
	Uint8	   *bytes = NULL;

	if (st != MDD_DICOM_OK)
		return st;
	if (!lookupTag(tagname, tag) || ds->findAndGetElement(tag, e).bad() || e == NULL ||
		!isBulkVR(e->ident()))
	{
		mddSetError(errbuf, errbuf_len, std::string("the object has no binary value ") + tagname);
		return MDD_DICOM_REFUSED;
	}
	if (e->ident() == EVR_pixelSQ || (e->getLength() == DCM_UndefinedLength))
	{
		mddSetError(errbuf, errbuf_len, "the value is encapsulated (compressed pixel data)");
		return MDD_DICOM_UNSUPPORTED;
	}
	if (e->loadAllDataIntoMemory().bad())
	{
		mddSetError(errbuf, errbuf_len, "could not load the value");
		return MDD_DICOM_MALFORMED;
	}
	/* the value in little endian, as the bytes of its VR */
	if (e->getUint8Array(bytes).bad())
	{
		Uint16	   *w = NULL;
		Float32    *f = NULL;
		Float64    *d = NULL;
		Uint32	   *l = NULL;

		if (e->getUint16Array(w).good())
			bytes = reinterpret_cast<Uint8 *>(w);
		else if (e->getFloat32Array(f).good())
			bytes = reinterpret_cast<Uint8 *>(f);
		else if (e->getFloat64Array(d).good())
			bytes = reinterpret_cast<Uint8 *>(d);
		else if (e->getUint32Array(l).good())
			bytes = reinterpret_cast<Uint8 *>(l);
	}
	size_t		n = e->getLength();
	unsigned char *buf = static_cast<unsigned char *>(malloc(n + 1));

	if (buf == NULL)
	{
		mddSetError(errbuf, errbuf_len, "out of memory while copying a bulk value");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	if (n > 0 && bytes == NULL)
	{
		free(buf);
		mddSetError(errbuf, errbuf_len, "could not read the value");
		return MDD_DICOM_MALFORMED;
	}
	if (n > 0)
		memcpy(buf, bytes, n);
	*out = buf;
	*out_len = n;
	return MDD_DICOM_OK;
}

/* run fn, turning exceptions into statuses */
template <typename F>
MddDicomStatus
guarded(F fn, char *errbuf, size_t errbuf_len)
{
	if (errbuf && errbuf_len > 0)
		errbuf[0] = '\0';
	try
	{
		mddInitialiseDcmtk();
		return fn();
	}
	catch (const std::bad_alloc &)
	{
		mddSetError(errbuf, errbuf_len, "out of memory in the DICOMweb writer");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	catch (const std::exception &ex)
	{
		mddSetError(errbuf, errbuf_len, std::string("DICOMweb writer failed: ") + ex.what());
		return MDD_DICOM_INTERNAL;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "DICOMweb writer failed with an unknown exception");
		return MDD_DICOM_INTERNAL;
	}
}

}								/* namespace */

extern "C" MddDicomStatus
mdd_dicomweb_metadata(const unsigned char *data, size_t len, size_t bulk_threshold,
					  const char *bulk_prefix, char **json_out, char *errbuf, size_t errbuf_len)
{
	if (json_out == NULL)
		return MDD_DICOM_INTERNAL;
	*json_out = NULL;
	return guarded([&]() {
		return metadata(data, len, bulk_threshold, bulk_prefix, json_out, errbuf, errbuf_len);
	}, errbuf, errbuf_len);
}

extern "C" MddDicomStatus
mdd_dicomweb_results(int nrows, int ncols, const char *const *names,
					 const char *const *values, char **json_out, char *errbuf, size_t errbuf_len)
{
	if (json_out == NULL)
		return MDD_DICOM_INTERNAL;
	*json_out = NULL;
	return guarded([&]() {
		return results(nrows, ncols, names, values, json_out, errbuf, errbuf_len);
	}, errbuf, errbuf_len);
}

extern "C" int
mdd_dicomweb_keyword(const char *name, char *keyword, size_t keyword_len)
{
	int			found = 0;

	if (name == NULL || keyword == NULL || keyword_len == 0)
		return 0;
	keyword[0] = '\0';
	try
	{
		DcmTag		tag;

		mddInitialiseDcmtk();
		if (lookupTag(name, tag))
		{
			const char *kw = tag.getTagName();

			if (kw && strcmp(kw, DcmTag_ERROR_TagName) != 0 && strlen(kw) < keyword_len)
			{
				strcpy(keyword, kw);
				found = 1;
			}
		}
	}
	catch (...)
	{
		found = 0;
	}
	return found;
}

extern "C" MddDicomStatus
mdd_dicomweb_frames(const unsigned char *data, size_t len, const int *numbers, int count,
					unsigned char **out, size_t *frame_size, char *errbuf, size_t errbuf_len)
{
	if (out == NULL || frame_size == NULL || numbers == NULL || count < 1)
		return MDD_DICOM_INTERNAL;
	*out = NULL;
	*frame_size = 0;
	return guarded([&]() {
		return frames(data, len, numbers, count, out, frame_size, errbuf, errbuf_len);
	}, errbuf, errbuf_len);
}

extern "C" MddDicomStatus
mdd_dicomweb_bulk(const unsigned char *data, size_t len, const char *tag, unsigned char **out,
				  size_t *out_len, char *errbuf, size_t errbuf_len)
{
	if (out == NULL || out_len == NULL || tag == NULL)
		return MDD_DICOM_INTERNAL;
	*out = NULL;
	*out_len = 0;
	return guarded([&]() {
		return bulk(data, len, tag, out, out_len, errbuf, errbuf_len);
	}, errbuf, errbuf_len);
}

extern "C" void
mdd_dicomweb_free(void *p)
{
	free(p);
}
