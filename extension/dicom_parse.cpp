/*
 * dicom_parse.cpp
 *	  Reads one DICOM object from memory with DCMTK and describes it as JSON
 *	  (the implementation of mdd_dicom_parse in dicom.h).
 *
 * The description holds the attributes the catalog keeps in columns (as
 * UTF-8, after Specific Character Set decoding), the references the object
 * makes to other objects (structure set -> images, plan -> structure set,
 * dose -> plan, ...) and the rest of the header for reporting.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes; the
 * caller's bytes are never modified and never kept.
 */
#include "dicom.h"
#include "dicom_common.hpp"
#include "dicom_stream.hpp"
#include "dicom_json.hpp"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <set>
#include <string>
#include <utility>

/* header values with more values than this are left out of the JSON */
#define MDD_HEADER_MAX_VM 256
/* sequences deeper than this are left out of the JSON */
#define MDD_HEADER_MAX_DEPTH 8

namespace
{

/* one reference from the parsed object to another object, series or frame */
struct Reference
{
	std::string kind;			/* instance | series | frame_of_reference */
	std::string uid;
	std::string sopClass;		/* for instance references, when given */
	std::string via;			/* keyword of the sequence holding it */

	bool operator<(const Reference &o) const
	{
		if (kind != o.kind)
			return kind < o.kind;
		return uid < o.uid;
	}
};

typedef std::set<Reference> ReferenceSet;

/* what the reference walker needs to know about the object itself */
struct Self
{
	std::string sopInstanceUid;
	std::string seriesInstanceUid;
	std::string frameOfReferenceUid;
};


std::string
getString(DcmItem *item, const DcmTagKey &key)
{
	DcmElement *e = NULL;
	OFString	value;

	if (item->findAndGetElement(key, e, OFFalse).bad() || e == NULL)
		return std::string();
	if (e->getOFStringArray(value, OFTrue).good())
		return std::string(value.c_str(), value.length());
	return std::string();
}

/* "YYYYMMDD" (or the old "YYYY.MM.DD") as ISO 8601, or "" if not a date */
std::string
isoDate(const std::string &raw)
{
	std::string d;

	for (char c : raw)
		if (c != '.')
			d += c;
	if (d.size() != 8)
		return "";
	for (char c : d)
		if (!isdigit(static_cast<unsigned char>(c)))
			return "";
	int			y = atoi(d.substr(0, 4).c_str());
	int			m = atoi(d.substr(4, 2).c_str());
	int			day = atoi(d.substr(6, 2).c_str());
	static const int mdays[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};

	if (y < 1 || m < 1 || m > 12 || day < 1 || day > mdays[m - 1])
		return "";
	if (m == 2 && day == 29 && !((y % 4 == 0 && y % 100 != 0) || y % 400 == 0))
		return "";
	return d.substr(0, 4) + "-" + d.substr(4, 2) + "-" + d.substr(6, 2);
}

/* "HHMMSS.FFFFFF" (or "HH:MM:SS", or shorter forms) as ISO time, or "" */
std::string
isoTime(const std::string &raw)
{
	std::string digits,
				frac;
	size_t		i = 0;

	for (; i < raw.size() && raw[i] != '.'; i++)
	{
		if (raw[i] == ':')
			continue;
		if (!isdigit(static_cast<unsigned char>(raw[i])))
			return "";
		digits += raw[i];
	}
	if (i < raw.size())
	{
		for (i++; i < raw.size(); i++)
		{
			if (!isdigit(static_cast<unsigned char>(raw[i])))
				return "";
			frac += raw[i];
		}
	}
	if (digits.size() != 2 && digits.size() != 4 && digits.size() != 6)
		return "";
	while (digits.size() < 6)
		digits += "00";
	int			h = atoi(digits.substr(0, 2).c_str());
	int			mi = atoi(digits.substr(2, 2).c_str());
	int			s = atoi(digits.substr(4, 2).c_str());

	if (h > 23 || mi > 59 || s > 60)
		return "";
	std::string out = digits.substr(0, 2) + ":" + digits.substr(2, 2) + ":" +
		(s == 60 ? std::string("59") : digits.substr(4, 2));

	if (!frac.empty())
		out += "." + frac.substr(0, 6);
	return out;
}

/* the JSON member name of a header element: its keyword, or "GGGGEEEE" */
std::string
headerKey(const DcmTag &tagIn)
{
	DcmTag		tag(tagIn);
	char		hex[16];

	if (tag.getGroup() % 2 == 0)
	{
		const char *name = tag.getTagName();

		if (name && strcmp(name, DcmTag_ERROR_TagName) != 0)
			return name;
	}
	snprintf(hex, sizeof(hex), "%04X%04X", tag.getGroup(), tag.getElement());
	return hex;
}

bool
isBinaryVR(DcmEVR vr)
{
	switch (vr)
	{
		case EVR_OB:
		case EVR_OW:
		case EVR_OF:
		case EVR_OD:
		case EVR_OL:
		case EVR_OV:
		case EVR_UN:
		case EVR_ox:
		case EVR_px:
		case EVR_pixelSQ:
		case EVR_lt:
		case EVR_up:
		case EVR_na:
		case EVR_xs:
			return true;
		default:
			return false;
	}
}

/* write value number pos of element e as a JSON scalar */
void
writeValue(MddJsonWriter &w, DcmElement *e, unsigned long pos)
{
	DcmEVR		vr = e->getTag().getEVR();
	char		buf[64];

	switch (vr)
	{
		case EVR_US:
			{
				Uint16		v;

				if (e->getUint16(v, pos).good())
				{
					snprintf(buf, sizeof(buf), "%u", (unsigned) v);
					w.rawNumber(buf);
					return;
				}
				break;
			}
		case EVR_SS:
			{
				Sint16		v;

				if (e->getSint16(v, pos).good())
				{
					snprintf(buf, sizeof(buf), "%d", (int) v);
					w.rawNumber(buf);
					return;
				}
				break;
			}
		case EVR_UL:
			{
				Uint32		v;

				if (e->getUint32(v, pos).good())
				{
					snprintf(buf, sizeof(buf), "%lu", (unsigned long) v);
					w.rawNumber(buf);
					return;
				}
				break;
			}
		case EVR_SL:
			{
				Sint32		v;

				if (e->getSint32(v, pos).good())
				{
					snprintf(buf, sizeof(buf), "%ld", (long) v);
					w.rawNumber(buf);
					return;
				}
				break;
			}
		case EVR_FL:
		case EVR_FD:
			{
				Float64		v;
				Float32		f;
				bool		ok;

				if (vr == EVR_FL)
				{
					ok = e->getFloat32(f, pos).good();
					v = f;
				}
				else
					ok = e->getFloat64(v, pos).good();
				if (ok && std::isfinite(v))
				{
					snprintf(buf, sizeof(buf), vr == EVR_FL ? "%.9g" : "%.17g", v);
					w.rawNumber(buf);
					return;
				}
				if (ok)
				{
					w.null();
					return;
				}
				break;
			}
		default:
			break;
	}

	OFString	s;

	if (e->getOFString(s, pos, OFTrue).bad())
	{
		w.null();
		return;
	}
	std::string value(s.c_str(), s.length());

	if ((vr == EVR_IS || vr == EVR_DS))
	{
		size_t		start = value.find_first_not_of(' ');
		std::string trimmed = start == std::string::npos ? "" : value.substr(start);

		if (!trimmed.empty() && trimmed[0] == '+')
			trimmed = trimmed.substr(1);
		if (MddJsonWriter::isJsonNumber(trimmed))
		{
			w.rawNumber(trimmed);
			return;
		}
	}
	w.string(value);
}

void writeItem(MddJsonWriter &w, DcmItem *item, int depth);

/* write one element as a JSON member, unless it is left out */
void
writeElement(MddJsonWriter &w, DcmElement *e, int depth)
{
	const DcmTag &tag = e->getTag();
	DcmEVR		vr = tag.getEVR();

	if (tag.getElement() == 0x0000 || tag.getGroup() == 0x7FE0 ||
		tag.getGroup() == 0xFFFE)
		return;
	if (isBinaryVR(vr))
		return;

	if (vr == EVR_SQ)
	{
		DcmSequenceOfItems *sq = static_cast<DcmSequenceOfItems *>(static_cast<DcmObject *>(e));

		if (depth >= MDD_HEADER_MAX_DEPTH)
			return;
		w.key(headerKey(tag));
		w.beginArray();
		for (unsigned long i = 0; i < sq->card(); i++)
			writeItem(w, sq->getItem(i), depth + 1);
		w.endArray();
		return;
	}

	unsigned long vm = e->getLength() == 0 ? 0 : e->getVM();

	if (vm > MDD_HEADER_MAX_VM)
		return;
	w.key(headerKey(tag));
	if (vm == 0)
		w.null();
	else if (vm == 1 || vr == EVR_LT || vr == EVR_ST || vr == EVR_UT)
		writeValue(w, e, 0);
	else
	{
		w.beginArray();
		for (unsigned long i = 0; i < vm; i++)
			writeValue(w, e, i);
		w.endArray();
	}
}

void
writeItem(MddJsonWriter &w, DcmItem *item, int depth)
{
	w.beginObject();
	for (unsigned long i = 0; i < item->card(); i++)
		writeElement(w, item->getElement(i), depth);
	w.endObject();
}

/*
 * Sequences whose items point at another SOP instance (Referenced SOP
 * Instance UID), at a series (Series Instance UID) or at a frame of
 * reference.  Image references at the top level of an image (a CT slice
 * naming its localizer) are not followed: they do not make the localizer
 * travel with the CT.
 */
bool
isInstanceReferenceSequence(const DcmTagKey &seq, int depth)
{
	return seq == DCM_ReferencedStructureSetSequence ||
		seq == DCM_ReferencedDoseSequence ||
		seq == DCM_ReferencedRTPlanSequence ||
		seq == DCM_ContourImageSequence ||
		seq == DCM_ReferencedInstanceSequence ||
		seq == DCM_ReferencedTreatmentRecordSequence ||
		seq == DCM_SourceImageSequence ||
		seq == DCM_ReferencedSOPSequence ||
		(seq == DCM_ReferencedImageSequence && depth > 0);
}

bool
isSeriesReferenceSequence(const DcmTagKey &seq)
{
	return seq == DCM_RTReferencedSeriesSequence ||
		seq == DCM_ReferencedSeriesSequence;
}

bool
isFrameReferenceSequence(const DcmTagKey &seq)
{
	return seq == DCM_ReferencedFrameOfReferenceSequence ||
		seq == DCM_RegistrationSequence;
}

void
addReference(ReferenceSet &refs, const Self &self, const char *kind,
			 const std::string &uid, const std::string &sopClass,
			 const DcmTagKey &via)
{
	Reference	r;

	if (uid.empty() || uid == self.sopInstanceUid ||
		uid == self.seriesInstanceUid || uid == self.frameOfReferenceUid)
		return;
	r.kind = kind;
	r.uid = uid;
	r.sopClass = sopClass;
	r.via = headerKey(DcmTag(via));
	refs.insert(r);
}

void collectReferences(DcmItem *item, const Self &self, ReferenceSet &refs,
					   int depth);

/* look at the items of one sequence for the references they carry */
void
collectFromSequence(DcmSequenceOfItems *sq, const Self &self,
					ReferenceSet &refs, int depth)
{
	const DcmTagKey key = sq->getTag();

	for (unsigned long i = 0; i < sq->card(); i++)
	{
		DcmItem    *item = sq->getItem(i);

		if (isInstanceReferenceSequence(key, depth))
			addReference(refs, self, "instance",
						 getString(item, DCM_ReferencedSOPInstanceUID),
						 getString(item, DCM_ReferencedSOPClassUID), key);
		if (isSeriesReferenceSequence(key))
			addReference(refs, self, "series",
						 getString(item, DCM_SeriesInstanceUID), "", key);
		if (isFrameReferenceSequence(key))
			addReference(refs, self, "frame_of_reference",
						 getString(item, DCM_FrameOfReferenceUID), "", key);
		addReference(refs, self, "frame_of_reference",
					 getString(item, DCM_ReferencedFrameOfReferenceUID), "", key);
		collectReferences(item, self, refs, depth + 1);
	}
}

void
collectReferences(DcmItem *item, const Self &self, ReferenceSet &refs,
				  int depth)
{
	if (depth > 32)
		return;
	for (unsigned long i = 0; i < item->card(); i++)
	{
		DcmElement *e = item->getElement(i);

		if (e->getTag().getEVR() == EVR_SQ)
			collectFromSequence(static_cast<DcmSequenceOfItems *>(static_cast<DcmObject *>(e)),
								self, refs, depth);
	}
}

bool
hasPart10Preamble(const unsigned char *data, size_t len)
{
	return len >= 132 && memcmp(data + 128, "DICM", 4) == 0;
}

/* the whole description of a parsed object, see mdd_dicom_parse */
std::string
describe(DcmFileFormat &ff, bool part10)
{
	DcmDataset *ds = ff.getDataset();
	DcmMetaInfo *meta = ff.getMetaInfo();
	MddJsonWriter w;
	Self		self;
	ReferenceSet refs;
	std::string tsuid;

	self.sopInstanceUid = getString(ds, DCM_SOPInstanceUID);
	self.seriesInstanceUid = getString(ds, DCM_SeriesInstanceUID);
	self.frameOfReferenceUid = getString(ds, DCM_FrameOfReferenceUID);

	if (meta)
		tsuid = getString(meta, DCM_TransferSyntaxUID);
	if (tsuid.empty())
	{
		DcmXfer		xfer(ds->getOriginalXfer());

		if (xfer.getXfer() != EXS_Unknown)
			tsuid = xfer.getXferID();
	}

	w.beginObject();
	w.member("patient_id", getString(ds, DCM_PatientID));
	w.member("patient_name", getString(ds, DCM_PatientName));
	w.member("patient_birth_date", isoDate(getString(ds, DCM_PatientBirthDate)));
	w.member("patient_sex", getString(ds, DCM_PatientSex));
	w.member("study_instance_uid", getString(ds, DCM_StudyInstanceUID));
	w.member("study_date", isoDate(getString(ds, DCM_StudyDate)));
	w.member("study_time", isoTime(getString(ds, DCM_StudyTime)));
	w.member("study_description", getString(ds, DCM_StudyDescription));
	w.member("study_id", getString(ds, DCM_StudyID));
	w.member("accession_number", getString(ds, DCM_AccessionNumber));
	w.member("referring_physician", getString(ds, DCM_ReferringPhysicianName));
	w.member("series_instance_uid", self.seriesInstanceUid);
	w.member("series_number", getString(ds, DCM_SeriesNumber));
	w.member("series_description", getString(ds, DCM_SeriesDescription));
	w.member("series_date", isoDate(getString(ds, DCM_SeriesDate)));
	w.member("modality", getString(ds, DCM_Modality));
	w.member("body_part_examined", getString(ds, DCM_BodyPartExamined));
	w.member("frame_of_reference_uid", self.frameOfReferenceUid);
	w.member("sop_class_uid", getString(ds, DCM_SOPClassUID));
	w.member("sop_instance_uid", self.sopInstanceUid);
	w.member("instance_number", getString(ds, DCM_InstanceNumber));
	w.member("image_type", getString(ds, DCM_ImageType));
	w.member("manufacturer", getString(ds, DCM_Manufacturer));
	w.member("manufacturer_model_name", getString(ds, DCM_ManufacturerModelName));
	w.member("station_name", getString(ds, DCM_StationName));
	w.member("content_date", isoDate(getString(ds, DCM_ContentDate)));
	w.member("transfer_syntax_uid", tsuid);
	w.member("number_of_frames", getString(ds, DCM_NumberOfFrames));
	w.member("specific_character_set", getString(ds, DCM_SpecificCharacterSet));
	w.key("part10");
	w.boolean(part10);

	collectReferences(ds, self, refs, 0);
	w.key("references");
	w.beginArray();
	for (const Reference &r : refs)
	{
		w.beginObject();
		w.member("kind", r.kind);
		w.member("uid", r.uid);
		w.member("sop_class_uid", r.sopClass);
		w.member("via", r.via);
		w.endObject();
	}
	w.endArray();

	w.key("header");
	writeItem(w, ds, 0);
	w.endObject();
	return w.text();
}

MddDicomStatus
parse(const unsigned char *data, size_t len, char **json_out,
	  char *errbuf, size_t errbuf_len)
{
	bool		part10 = hasPart10Preamble(data, len);
	DcmFileFormat ff;
	OFCondition cond;

	mddInitialiseDcmtk();
	if (!dcmDataDict.isDictionaryLoaded())
	{
		mddSetError(errbuf, errbuf_len, "the DICOM data dictionary of DCMTK is not loaded");
		return MDD_DICOM_INTERNAL;
	}

	cond = mddReadFromMemory(ff, data, len);

	DcmDataset *ds = ff.getDataset();

	if (cond.bad())
	{
		if (cond == EC_MemoryExhausted)
		{
			mddSetError(errbuf, errbuf_len, "out of memory while reading the DICOM object");
			return MDD_DICOM_OUT_OF_MEMORY;
		}
		if (!part10 && (ds == NULL || ds->card() == 0 ||
						(!ds->tagExists(DCM_SOPClassUID) && !ds->tagExists(DCM_SOPInstanceUID))))
		{
			mddSetError(errbuf, errbuf_len, "not a DICOM file or data set");
			return MDD_DICOM_NOT_DICOM;
		}
		mddSetError(errbuf, errbuf_len,
				 std::string("truncated or malformed DICOM: ") + cond.text());
		return MDD_DICOM_MALFORMED;
	}
	if (ds == NULL || ds->card() == 0)
	{
		mddSetError(errbuf, errbuf_len, "not a DICOM file or data set");
		return MDD_DICOM_NOT_DICOM;
	}

	mddRetypeUnknownText(ds);

	std::string sopInstance = getString(ds, DCM_SOPInstanceUID);
	std::string sopClass = getString(ds, DCM_SOPClassUID);

	if (sopInstance.empty() || sopClass.empty())
	{
		if (!part10 && sopInstance.empty() && sopClass.empty() &&
			!ds->tagExists(DCM_PatientID) && !ds->tagExists(DCM_StudyInstanceUID))
		{
			mddSetError(errbuf, errbuf_len, "not a DICOM file or data set");
			return MDD_DICOM_NOT_DICOM;
		}
		mddSetError(errbuf, errbuf_len, sopInstance.empty()
				 ? "DICOM object has no SOP Instance UID (0008,0018)"
				 : "DICOM object has no SOP Class UID (0008,0016)");
		return MDD_DICOM_MISSING_UID;
	}

	/*
	 * Decode text to UTF-8 for the catalog.  An unknown character set is no
	 * reason to refuse the object (its bytes are kept as they are): the
	 * JSON writer then replaces what is not valid UTF-8.
	 */
	(void) ds->convertToUTF8();

	std::string json = describe(ff, part10);
	char	   *out = static_cast<char *>(malloc(json.size() + 1));

	if (out == NULL)
	{
		mddSetError(errbuf, errbuf_len, "out of memory while describing the DICOM object");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	memcpy(out, json.c_str(), json.size() + 1);
	*json_out = out;
	return MDD_DICOM_OK;
}

}								/* namespace */

extern "C" MddDicomStatus
mdd_dicom_parse(const unsigned char *data, size_t len, char **json_out,
				char *errbuf, size_t errbuf_len)
{
	if (json_out == NULL)
		return MDD_DICOM_INTERNAL;
	*json_out = NULL;
	if (errbuf && errbuf_len > 0)
		errbuf[0] = '\0';
	if (data == NULL || len == 0)
	{
		mddSetError(errbuf, errbuf_len, "empty input");
		return MDD_DICOM_EMPTY;
	}
	try
	{
		return parse(data, len, json_out, errbuf, errbuf_len);
	}
	catch (const std::bad_alloc &)
	{
		mddSetError(errbuf, errbuf_len, "out of memory while reading the DICOM object");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	catch (const std::exception &ex)
	{
		mddSetError(errbuf, errbuf_len, std::string("DICOM parser failed: ") + ex.what());
		return MDD_DICOM_INTERNAL;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "DICOM parser failed with an unknown exception");
		return MDD_DICOM_INTERNAL;
	}
}

extern "C" void
mdd_dicom_free_json(char *json)
{
	free(json);
}
