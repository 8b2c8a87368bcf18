/*
 * dicom_rt.cpp
 *	  Reads the geometry of RT Dose grids and RT Structure Set contours with
 *	  DCMTK (mdd_dicom_read_dose and mdd_dicom_read_structure_set of
 *	  dicom.h), for the dose-volume histograms computed in dvh.c.
 *
 * The dose grid comes back as doses (stored value x Dose Grid Scaling) with
 * the position, orientation and spacing of the grid and each frame's offset
 * along the grid normal; the structure set as its ROIs with their closed
 * planar contours in patient coordinates.  Every attribute is checked
 * before it is used, so that a damaged object gives a message naming what
 * is wrong rather than a wrong histogram.
 *
 * Boundary rules: no PostgreSQL header here; nothing thrown escapes; the
 * caller's bytes are never modified and never kept; what is handed back is
 * malloc()ed.
 */
#include "dicom.h"
#include "dicom_common.hpp"
#include "dicom_stream.hpp"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dctk.h>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <new>
#include <string>
#include <vector>

#define RT_DOSE_STORAGE "1.2.840.10008.5.1.4.1.1.481.2"
#define RT_STRUCTURE_SET_STORAGE "1.2.840.10008.5.1.4.1.1.481.3"

/* positions farther than this from the origin (mm) are refused */
#define MDD_RT_MAX_POSITION 1.0e6
/* Pixel Spacing outside these bounds (mm) is refused */
#define MDD_RT_MIN_SPACING 1.0e-3
#define MDD_RT_MAX_SPACING 1.0e4

namespace
{

/* a failure with its status, thrown inside this file only */
struct RtError
{
	MddDicomStatus status;
	std::string message;
};

[[noreturn]] void
fail(MddDicomStatus status, const std::string &message)
{
	throw RtError{status, message};
}

/* "(gggg,eeee)" of a tag, for messages */
std::string
tagText(const DcmTagKey &key)
{
	char		buf[16];

	snprintf(buf, sizeof(buf), "(%04X,%04X)", key.getGroup(), key.getElement());
	return buf;
}

/* "Keyword (gggg,eeee)", for messages */
std::string
attributeName(const DcmTagKey &key)
{
	DcmTag		tag(key);
	const char *name = tag.getTagName();

	return std::string(name ? name : "attribute") + " " + tagText(key);
}

/* a text value (all of its values), or "" when absent */
std::string
getString(DcmItem *item, const DcmTagKey &key)
{
	OFString	value;

	if (item->findAndGetOFStringArray(key, value, OFFalse).bad())
		return std::string();
	return std::string(value.c_str(), value.length());
}

/* copy text into a fixed buffer of the C structs, cut to fit */
void
copyText(char *dst, size_t size, const std::string &src)
{
	snprintf(dst, size, "%s", src.c_str());
}

/*
 * The numbers of a DS or IS value ("1.5\\-2\\+3e1"): each one whole, with
 * nothing but spaces around it; false when one is not a number.  Parsed
 * here rather than by DCMTK, which accepts a number followed by garbage.
 */
bool
parseNumbers(const std::string &text, std::vector<double> &out)
{
	size_t		pos = 0;

	while (true)
	{
		size_t		end = text.find('\\', pos);
		size_t		stop = (end == std::string::npos) ? text.size() : end;
		size_t		a = pos,
					b = stop;
		double		v;

		while (a < b && text[a] == ' ')
			a++;
		while (b > a && (text[b - 1] == ' ' || text[b - 1] == '\0'))
			b--;
		if (a < b && text[a] == '+')
			a++;
		if (a == b)
			return false;

		std::from_chars_result r = std::from_chars(text.data() + a, text.data() + b, v);

		if (r.ec != std::errc() || r.ptr != text.data() + b)
			return false;
		out.push_back(v);
		if (end == std::string::npos)
			return true;
		pos = end + 1;
	}
}

/*
 * The numbers of a DS (or IS) attribute: absent gives an empty vector when
 * !required, an error otherwise; a value that is no finite number is an
 * error naming the attribute and where it is.
 */
std::vector<double>
getNumbers(DcmItem *item, const DcmTagKey &key, bool required, const std::string &where)
{
	DcmElement *e = NULL;
	std::vector<double> out;

	if (item->findAndGetElement(key, e, OFFalse).bad() || e == NULL || e->getLength() == 0)
	{
		if (required)
			fail(MDD_DICOM_INVALID, where + "no " + attributeName(key));
		return out;
	}
	if (e->ident() == EVR_DS || e->ident() == EVR_IS)
	{
		OFString	text;

		if (e->getOFStringArray(text, OFFalse).bad() ||
			!parseNumbers(std::string(text.c_str(), text.length()), out))
			fail(MDD_DICOM_INVALID, where + attributeName(key) + " holds a value that is not a number");
	}
	else
	{
		unsigned long n = e->getVM();

		for (unsigned long i = 0; i < n; i++)
		{
			Float64		v;
			Sint32		iv;

			if (e->ident() == EVR_SL || e->ident() == EVR_SS)
			{
				if (e->getSint32(iv, i).bad())
					fail(MDD_DICOM_INVALID, where + attributeName(key) + " holds a value that is not a number");
				v = iv;
			}
			else if (e->getFloat64(v, i).bad())
				fail(MDD_DICOM_INVALID, where + attributeName(key) + " holds a value that is not a number");
			out.push_back(v);
		}
	}
	for (double v : out)
		if (!std::isfinite(v))
			fail(MDD_DICOM_INVALID, where + attributeName(key) + " holds a value that is not finite");
	return out;
}

/* one number of an attribute that must hold exactly one */
double
getNumber(DcmItem *item, const DcmTagKey &key, const std::string &where)
{
	std::vector<double> v = getNumbers(item, key, true, where);

	if (v.size() != 1)
		fail(MDD_DICOM_INVALID, where + attributeName(key) + " holds " +
			 std::to_string(v.size()) + " values, not 1");
	return v[0];
}

/* an unsigned short attribute (Rows, Columns, Bits Allocated ...) */
long
getUnsigned(DcmItem *item, const DcmTagKey &key, bool required, long absent)
{
	Uint16		v;

	if (item->findAndGetUint16(key, v).bad())
	{
		if (required)
			fail(MDD_DICOM_INVALID, "no " + attributeName(key));
		return absent;
	}
	return v;
}

/* an integer that must be one of the data set's values, e.g. ROI Number */
long
getInteger(DcmItem *item, const DcmTagKey &key, const std::string &where)
{
	double		v = getNumber(item, key, where);

	if (v != std::floor(v) || v < INT32_MIN || v > INT32_MAX)
		fail(MDD_DICOM_INVALID, where + attributeName(key) + " is not an integer");
	return static_cast<long>(v);
}

/* read a DICOM object from memory, or fail with a status */
void
readObject(DcmFileFormat &ff, const unsigned char *data, size_t len, const char *sopClass,
		   const char *what)
{
	OFCondition cond;

	mddInitialiseDcmtk();
	if (!dcmDataDict.isDictionaryLoaded())
		fail(MDD_DICOM_INTERNAL, "the DICOM data dictionary of DCMTK is not loaded");
	if (data == NULL || len == 0)
		fail(MDD_DICOM_EMPTY, "empty input");
	cond = mddReadFromMemory(ff, data, len);
	if (cond == EC_MemoryExhausted)
		fail(MDD_DICOM_OUT_OF_MEMORY, "out of memory while reading the DICOM object");
	if (cond.bad() || ff.getDataset() == NULL || ff.getDataset()->card() == 0)
		fail(MDD_DICOM_MALFORMED, std::string("truncated or malformed DICOM: ") +
			 (cond.bad() ? cond.text() : "no data set"));

	mddRetypeUnknownText(ff.getDataset());

	std::string cls = getString(ff.getDataset(), DCM_SOPClassUID);

	if (cls != sopClass)
		fail(MDD_DICOM_INVALID, std::string("not an ") + what + " object (SOP Class UID \"" +
			 cls + "\")");
}

/* a unit vector of three values, or fail naming the attribute */
void
unitVector(const double *in, double *out, const std::string &name)
{
	double		n = std::sqrt(in[0] * in[0] + in[1] * in[1] + in[2] * in[2]);

	if (std::fabs(n - 1.0) > 1e-3)
		fail(MDD_DICOM_INVALID, name + " is not a unit vector");
	for (int i = 0; i < 3; i++)
		out[i] = in[i] / n;
}

/*
 * The doses of the pixel data: each stored value (BitsAllocated 16 or 32,
 * BitsStored of them meaningful, signed or not) times the scaling.  DCMTK
 * hands OW values over as 16-bit words in the host's order; a 32-bit value
 * is two such words, low word first in little endian transfer syntaxes and
 * high word first in big endian ones.
 */
void
readDoses(DcmDataset *ds, MddDoseGrid *g, size_t voxels, double scaling, bool bigEndian)
{
	long		allocated = getUnsigned(ds, DCM_BitsAllocated, true, 0);
	long		stored = getUnsigned(ds, DCM_BitsStored, false, allocated);
	long		sign = getUnsigned(ds, DCM_PixelRepresentation, false, 0);
	long		samples = getUnsigned(ds, DCM_SamplesPerPixel, false, 1);
	DcmElement *e = NULL;
	Uint16	   *words = NULL;
	size_t		bytes = static_cast<size_t>(allocated / 8);

	if (allocated != 16 && allocated != 32)
		fail(MDD_DICOM_UNSUPPORTED, attributeName(DCM_BitsAllocated) + " is " + std::to_string(allocated) +
			 "; RT Dose grids of 16 or 32 bits can be read");
	if (stored < 1 || stored > allocated)
		fail(MDD_DICOM_INVALID, attributeName(DCM_BitsStored) + " is " + std::to_string(stored) +
			 " with Bits Allocated " + std::to_string(allocated));
	if (sign != 0 && sign != 1)
		fail(MDD_DICOM_INVALID, attributeName(DCM_PixelRepresentation) + " is " + std::to_string(sign));
	if (samples != 1)
		fail(MDD_DICOM_INVALID, attributeName(DCM_SamplesPerPixel) + " is " + std::to_string(samples) +
			 ", not 1");
	if (ds->findAndGetElement(DCM_PixelData, e, OFFalse).bad() || e == NULL)
		fail(MDD_DICOM_INVALID, "no " + attributeName(DCM_PixelData));
	if (e->getLength() / bytes < voxels)
		fail(MDD_DICOM_INVALID, attributeName(DCM_PixelData) + " holds " + std::to_string(e->getLength()) +
			 " bytes, fewer than the " + std::to_string(voxels * bytes) + " of " +
			 std::to_string(g->frames) + " frames of " + std::to_string(g->rows) + " x " +
			 std::to_string(g->columns) + " voxels");
	if (e->getUint16Array(words).bad() || words == NULL)
		fail(MDD_DICOM_MALFORMED, attributeName(DCM_PixelData) + " cannot be read");

	uint64_t	mask = (stored == 64) ? ~UINT64_C(0) : ((UINT64_C(1) << stored) - 1);
	uint64_t	top = UINT64_C(1) << (stored - 1);

	g->dose = static_cast<double *>(malloc(voxels * sizeof(double)));
	if (g->dose == NULL)
		throw std::bad_alloc();
	for (size_t i = 0; i < voxels; i++)
	{
		uint64_t	raw;
		double		v;

		if (allocated == 16)
			raw = words[i];
		else if (bigEndian)
			raw = (static_cast<uint64_t>(words[2 * i]) << 16) | words[2 * i + 1];
		else
			raw = (static_cast<uint64_t>(words[2 * i + 1]) << 16) | words[2 * i];
		raw &= mask;
		if (sign == 1 && (raw & top))
			v = static_cast<double>(static_cast<int64_t>(raw) - static_cast<int64_t>(mask) - 1);
		else
			v = static_cast<double>(raw);
		g->dose[i] = v * scaling;
		if (!std::isfinite(g->dose[i]))
			fail(MDD_DICOM_INVALID, "the doses overflow: " + attributeName(DCM_DoseGridScaling) +
				 " is too large");
	}
}

/*
 * The offsets of the frames along the grid normal.  Grid Frame Offset
 * Vector is relative to Image Position (Patient) when its first value is
 * 0; otherwise (an old form for axial grids) its values are z coordinates
 * and the first one is the Image Position's z.
 */
void
readFrameOffsets(DcmDataset *ds, MddDoseGrid *g)
{
	std::vector<double> gfov = getNumbers(ds, DCM_GridFrameOffsetVector, g->frames > 1, "");

	if (gfov.empty())
		gfov.push_back(0.0);
	if (gfov.size() != static_cast<size_t>(g->frames))
		fail(MDD_DICOM_INVALID, attributeName(DCM_GridFrameOffsetVector) + " holds " +
			 std::to_string(gfov.size()) + " values for " + std::to_string(g->frames) + " frames");
	g->frame_offsets = static_cast<double *>(malloc(g->frames * sizeof(double)));
	if (g->frame_offsets == NULL)
		throw std::bad_alloc();
	if (gfov[0] == 0.0)
	{
		for (int k = 0; k < g->frames; k++)
			g->frame_offsets[k] = gfov[k];
	}
	else if (std::fabs(gfov[0] - g->position[2]) < 1e-3 && std::fabs(g->normal[2]) > 0.999)
	{
		for (int k = 0; k < g->frames; k++)
			g->frame_offsets[k] = (gfov[k] - g->position[2]) / g->normal[2];
	}
	else
		fail(MDD_DICOM_INVALID, attributeName(DCM_GridFrameOffsetVector) + " starts at " +
			 std::to_string(gfov[0]) +
			 ", neither 0 (offsets) nor the z of ImagePositionPatient (positions of axial frames)");
	for (int k = 0; k < g->frames; k++)
		if (std::fabs(g->frame_offsets[k]) > MDD_RT_MAX_POSITION)
			fail(MDD_DICOM_INVALID, attributeName(DCM_GridFrameOffsetVector) + " places frame " +
				 std::to_string(k + 1) + " more than 1 km away");
	for (int k = 0; k < g->frames; k++)
		for (int j = 0; j < k; j++)
			if (g->frame_offsets[j] == g->frame_offsets[k])
				fail(MDD_DICOM_INVALID, attributeName(DCM_GridFrameOffsetVector) + " places frames " +
					 std::to_string(j + 1) + " and " + std::to_string(k + 1) + " at the same offset");
}

/* the whole dose grid of a data set, see mdd_dicom_read_dose */
void
readDose(const unsigned char *data, size_t len, size_t maxVoxels, MddDoseGrid *g)
{
	DcmFileFormat ff;

	readObject(ff, data, len, RT_DOSE_STORAGE, "RT Dose");

	DcmDataset *ds = ff.getDataset();
	DcmXfer		xfer(ds->getOriginalXfer());

	if (xfer.isEncapsulated())
		fail(MDD_DICOM_UNSUPPORTED, std::string("the dose grid is compressed (") + xfer.getXferName() +
			 "); only uncompressed RT Dose grids can be read");

	g->rows = static_cast<int>(getUnsigned(ds, DCM_Rows, true, 0));
	g->columns = static_cast<int>(getUnsigned(ds, DCM_Columns, true, 0));
	if (g->rows < 1 || g->columns < 1)
		fail(MDD_DICOM_INVALID, "the dose grid has " + std::to_string(g->rows) + " rows and " +
			 std::to_string(g->columns) + " columns");
	{
		std::vector<double> nf = getNumbers(ds, DCM_NumberOfFrames, false, "");

		if (nf.empty())
			g->frames = 1;
		else if (nf.size() != 1 || nf[0] < 1 || nf[0] > INT32_MAX || nf[0] != std::floor(nf[0]))
			fail(MDD_DICOM_INVALID, attributeName(DCM_NumberOfFrames) + " is not a positive integer");
		else
			g->frames = static_cast<int>(nf[0]);
	}
	size_t		plane = static_cast<size_t>(g->rows) * g->columns;

	if (static_cast<size_t>(g->frames) > maxVoxels / plane)
		fail(MDD_DICOM_UNSUPPORTED, "the dose grid has " + std::to_string(g->frames) +
			 " frames of " + std::to_string(g->rows) + " x " + std::to_string(g->columns) +
			 " voxels, more than the " + std::to_string(maxVoxels) + " voxels mdd reads");

	std::vector<double> spacing = getNumbers(ds, DCM_PixelSpacing, true, "");
	std::vector<double> position = getNumbers(ds, DCM_ImagePositionPatient, true, "");
	std::vector<double> orientation = getNumbers(ds, DCM_ImageOrientationPatient, true, "");

	if (spacing.size() != 2)
		fail(MDD_DICOM_INVALID, attributeName(DCM_PixelSpacing) + " does not hold 2 numbers");
	for (double v : spacing)
		if (!(v >= MDD_RT_MIN_SPACING && v <= MDD_RT_MAX_SPACING))
			fail(MDD_DICOM_INVALID, attributeName(DCM_PixelSpacing) + " holds " + std::to_string(v) +
				 " mm, outside 0.001 to 10000 mm");
	if (position.size() != 3)
		fail(MDD_DICOM_INVALID, attributeName(DCM_ImagePositionPatient) + " does not hold 3 numbers");
	for (double v : position)
		if (std::fabs(v) > MDD_RT_MAX_POSITION)
			fail(MDD_DICOM_INVALID, attributeName(DCM_ImagePositionPatient) + " lies more than 1 km from the origin");
	if (orientation.size() != 6)
		fail(MDD_DICOM_INVALID, attributeName(DCM_ImageOrientationPatient) + " does not hold 6 numbers");
	g->row_spacing = spacing[0];
	g->column_spacing = spacing[1];
	for (int i = 0; i < 3; i++)
		g->position[i] = position[i];
	unitVector(&orientation[0], g->row_direction, "the row direction of " + attributeName(DCM_ImageOrientationPatient));
	unitVector(&orientation[3], g->column_direction, "the column direction of " + attributeName(DCM_ImageOrientationPatient));

	const double *r = g->row_direction;
	const double *c = g->column_direction;

	if (std::fabs(r[0] * c[0] + r[1] * c[1] + r[2] * c[2]) > 1e-3)
		fail(MDD_DICOM_INVALID, "the directions of " + attributeName(DCM_ImageOrientationPatient) + " are not orthogonal");
	g->normal[0] = r[1] * c[2] - r[2] * c[1];
	g->normal[1] = r[2] * c[0] - r[0] * c[2];
	g->normal[2] = r[0] * c[1] - r[1] * c[0];

	readFrameOffsets(ds, g);

	double		scaling = getNumber(ds, DCM_DoseGridScaling, "");

	if (!(scaling > 0.0))
		fail(MDD_DICOM_INVALID, attributeName(DCM_DoseGridScaling) + " is not positive");

	copyText(g->frame_of_reference_uid, sizeof(g->frame_of_reference_uid),
			 getString(ds, DCM_FrameOfReferenceUID));
	copyText(g->dose_units, sizeof(g->dose_units), getString(ds, DCM_DoseUnits));
	copyText(g->dose_type, sizeof(g->dose_type), getString(ds, DCM_DoseType));
	copyText(g->summation_type, sizeof(g->summation_type), getString(ds, DCM_DoseSummationType));
	if (g->frame_of_reference_uid[0] == '\0')
		fail(MDD_DICOM_INVALID, "no " + attributeName(DCM_FrameOfReferenceUID));

	readDoses(ds, g, plane * g->frames, scaling, xfer.isBigEndian());
}

/* a ROI while the structure set is read */
struct RoiBuild
{
	long		number;
	std::string name;
	std::string frameOfReference;
	std::vector<std::pair<size_t, size_t>> contours;	/* first point, points */
};

/* "item i of Name (gggg,eeee)", 1-based, for messages */
std::string
itemText(const DcmTagKey &seq, unsigned long i)
{
	return "item " + std::to_string(i + 1) + " of " + attributeName(seq);
}

/* the whole structure set, see mdd_dicom_read_structure_set */
MddStructureSet *
readStructureSet(const unsigned char *data, size_t len)
{
	DcmFileFormat ff;

	readObject(ff, data, len, RT_STRUCTURE_SET_STORAGE, "RT Structure Set");

	DcmDataset *ds = ff.getDataset();
	DcmSequenceOfItems *seq = NULL;
	std::vector<RoiBuild> rois;
	std::map<long, size_t> byNumber;
	std::vector<double> points;
	std::string setFrame;
	int			skipped = 0;
	size_t		ncontours = 0;

	/* names to UTF-8; an unknown character set leaves them as they are */
	(void) ds->convertToUTF8();

	if (ds->findAndGetSequence(DCM_ReferencedFrameOfReferenceSequence, seq).good() &&
		seq != NULL && seq->card() > 0)
		setFrame = getString(seq->getItem(0), DCM_FrameOfReferenceUID);

	seq = NULL;
	if (ds->findAndGetSequence(DCM_StructureSetROISequence, seq).bad() || seq == NULL)
		fail(MDD_DICOM_INVALID, "no " + attributeName(DCM_StructureSetROISequence));
	for (unsigned long i = 0; i < seq->card(); i++)
	{
		DcmItem    *item = seq->getItem(i);
		std::string where = itemText(DCM_StructureSetROISequence, i) + ": ";
		RoiBuild	roi;

		roi.number = getInteger(item, DCM_ROINumber, where);
		roi.name = getString(item, DCM_ROIName);
		roi.frameOfReference = getString(item, DCM_ReferencedFrameOfReferenceUID);
		if (byNumber.count(roi.number))
			fail(MDD_DICOM_INVALID, where + "ROI Number " + std::to_string(roi.number) +
				 " is used by an earlier item too");
		byNumber[roi.number] = rois.size();
		rois.push_back(roi);
	}

	seq = NULL;
	if (ds->findAndGetSequence(DCM_ROIContourSequence, seq).good() && seq != NULL)
	{
		for (unsigned long i = 0; i < seq->card(); i++)
		{
			DcmItem    *item = seq->getItem(i);
			std::string where = itemText(DCM_ROIContourSequence, i) + ": ";
			long		number = getInteger(item, DCM_ReferencedROINumber, where);
			DcmSequenceOfItems *contours = NULL;

			if (!byNumber.count(number))
				fail(MDD_DICOM_INVALID, where + "Referenced ROI Number " + std::to_string(number) +
					 " is not defined in " + attributeName(DCM_StructureSetROISequence));
			RoiBuild   &roi = rois[byNumber[number]];

			if (item->findAndGetSequence(DCM_ContourSequence, contours).bad() || contours == NULL)
				continue;
			for (unsigned long j = 0; j < contours->card(); j++)
			{
				DcmItem    *c = contours->getItem(j);
				std::string cwhere = where + "contour " + std::to_string(j + 1) + ": ";
				std::string type = getString(c, DCM_ContourGeometricType);

				if (type.empty())
					fail(MDD_DICOM_INVALID, cwhere + "no " + attributeName(DCM_ContourGeometricType));
				if (type != "CLOSED_PLANAR" && type != "CLOSEDPLANAR_XOR")
				{
					skipped++;
					continue;
				}

				std::vector<double> xyz = getNumbers(c, DCM_ContourData, true, cwhere);
				std::vector<double> declared = getNumbers(c, DCM_NumberOfContourPoints, false, cwhere);

				if (xyz.size() % 3 != 0)
					fail(MDD_DICOM_INVALID, cwhere + attributeName(DCM_ContourData) + " holds " +
						 std::to_string(xyz.size()) + " values, not (x, y, z) triples");
				for (double v : xyz)
					if (std::fabs(v) > MDD_RT_MAX_POSITION)
						fail(MDD_DICOM_INVALID, cwhere + attributeName(DCM_ContourData) +
							 " holds a point more than 1 km from the origin");
				if (declared.size() == 1 && declared[0] != static_cast<double>(xyz.size() / 3))
					fail(MDD_DICOM_INVALID, cwhere + attributeName(DCM_NumberOfContourPoints) +
						 " says " + std::to_string(static_cast<long long>(declared[0])) +
						 " points, " + attributeName(DCM_ContourData) + " holds " +
						 std::to_string(xyz.size() / 3));
				roi.contours.push_back(std::make_pair(points.size() / 3, xyz.size() / 3));
				points.insert(points.end(), xyz.begin(), xyz.end());
				ncontours++;
			}
		}
	}

	/* hand over in malloc()ed memory: the set, ROIs, contours, points, names */
	size_t		textSize = 1;

	for (const RoiBuild &roi : rois)
		textSize += roi.name.size() + roi.frameOfReference.size() + 2;

	MddStructureSet *set = static_cast<MddStructureSet *>(calloc(1, sizeof(MddStructureSet)));

	if (set == NULL)
		throw std::bad_alloc();
	set->rois = static_cast<MddRoi *>(calloc(rois.size() + 1, sizeof(MddRoi)));
	set->contour_store = static_cast<MddContour *>(calloc(ncontours + 1, sizeof(MddContour)));
	set->point_store = static_cast<double *>(malloc((points.size() + 1) * sizeof(double)));
	set->string_store = static_cast<char *>(malloc(textSize));
	if (set->rois == NULL || set->contour_store == NULL || set->point_store == NULL ||
		set->string_store == NULL)
	{
		mdd_dicom_free_structure_set(set);
		throw std::bad_alloc();
	}
	if (!points.empty())
		memcpy(set->point_store, points.data(), points.size() * sizeof(double));

	char	   *text = set->string_store;
	size_t		nextContour = 0;

	set->nrois = static_cast<int>(rois.size());
	set->skipped_contours = skipped;
	copyText(set->frame_of_reference_uid, sizeof(set->frame_of_reference_uid), setFrame);
	for (size_t i = 0; i < rois.size(); i++)
	{
		MddRoi	   *out = &set->rois[i];

		out->number = static_cast<int>(rois[i].number);
		memcpy(text, rois[i].name.c_str(), rois[i].name.size() + 1);
		out->name = text;
		text += rois[i].name.size() + 1;
		memcpy(text, rois[i].frameOfReference.c_str(), rois[i].frameOfReference.size() + 1);
		out->frame_of_reference_uid = text;
		text += rois[i].frameOfReference.size() + 1;
		out->contours = &set->contour_store[nextContour];
		out->ncontours = static_cast<int>(rois[i].contours.size());
		for (const auto &c : rois[i].contours)
		{
			set->contour_store[nextContour].npoints = static_cast<int>(c.second);
			set->contour_store[nextContour].points = set->point_store + 3 * c.first;
			nextContour++;
		}
	}
	return set;
}

/*
 * Run body, turning what it throws into a status and a message: the entry
 * points of this file never let an exception out.
 */
template <typename Body>
MddDicomStatus
guarded(Body body, char *errbuf, size_t errbuf_len)
{
	if (errbuf && errbuf_len > 0)
		errbuf[0] = '\0';
	try
	{
		body();
		return MDD_DICOM_OK;
	}
	catch (const RtError &e)
	{
		mddSetError(errbuf, errbuf_len, e.message);
		return e.status;
	}
	catch (const std::bad_alloc &)
	{
		mddSetError(errbuf, errbuf_len, "out of memory while reading the RT object");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	catch (const std::exception &ex)
	{
		mddSetError(errbuf, errbuf_len, std::string("reading the RT object failed: ") + ex.what());
		return MDD_DICOM_INTERNAL;
	}
	catch (...)
	{
		mddSetError(errbuf, errbuf_len, "reading the RT object failed with an unknown exception");
		return MDD_DICOM_INTERNAL;
	}
}

}								/* namespace */

extern "C" MddDicomStatus
mdd_dicom_read_dose(const unsigned char *data, size_t len, size_t max_voxels,
					MddDoseGrid **grid, char *errbuf, size_t errbuf_len)
{
	MddDoseGrid *g;
	MddDicomStatus status;

	if (grid == NULL)
		return MDD_DICOM_INTERNAL;
	*grid = NULL;
	g = static_cast<MddDoseGrid *>(calloc(1, sizeof(MddDoseGrid)));
	if (g == NULL)
	{
		mddSetError(errbuf, errbuf_len, "out of memory while reading the RT Dose");
		return MDD_DICOM_OUT_OF_MEMORY;
	}
	status = guarded([&]() { readDose(data, len, max_voxels, g); }, errbuf, errbuf_len);
	if (status != MDD_DICOM_OK)
	{
		mdd_dicom_free_dose(g);
		return status;
	}
	*grid = g;
	return MDD_DICOM_OK;
}

extern "C" void
mdd_dicom_free_dose(MddDoseGrid *grid)
{
	if (grid == NULL)
		return;
	free(grid->frame_offsets);
	free(grid->dose);
	free(grid);
}

extern "C" MddDicomStatus
mdd_dicom_read_structure_set(const unsigned char *data, size_t len, MddStructureSet **set,
							 char *errbuf, size_t errbuf_len)
{
	if (set == NULL)
		return MDD_DICOM_INTERNAL;
	*set = NULL;
	return guarded([&]() { *set = readStructureSet(data, len); }, errbuf, errbuf_len);
}

extern "C" void
mdd_dicom_free_structure_set(MddStructureSet *set)
{
	if (set == NULL)
		return;
	free(set->rois);
	free(set->contour_store);
	free(set->point_store);
	free(set->string_store);
	free(set);
}
