/*
 * rt_fuzzer.c
 *	  libFuzzer target for mdd_dicom_read_dose() and
 *	  mdd_dicom_read_structure_set() (extension/dicom.h), the readers
 *	  behind mdd.dvh.
 *
 * Feeds arbitrary bytes to both readers and checks the contract of
 * dicom.h: on MDD_DICOM_OK a grid (or structure set) whose sizes agree
 * with its buffers, every value of which is read here so that the
 * sanitizers see any overrun, with finite doses and coordinates; on any
 * other status no result and a non-empty reason in errbuf.  Any violation
 * abort()s so libFuzzer records it as a crash.  Built and run by
 * fuzz/Makefile (make -C fuzz run-rt).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dicom.h"

#define ERRBUF_LEN 256
#define MAX_VOXELS ((size_t) 1 << 22)

static void
fail(const char *what, int status)
{
	fprintf(stderr, "rt_fuzzer: invariant violated (status %d): %s\n", status, what);
	abort();
}

/* the reason of a failed call: NUL-terminated within the buffer, not empty */
static void
check_reason(const char *errbuf, int status)
{
	if (memchr(errbuf, '\0', ERRBUF_LEN) == NULL)
		fail("errbuf not NUL-terminated", status);
	if (errbuf[0] == '\0')
		fail("failure without a reason", status);
}

/* every voxel and frame offset of a grid the reader accepted */
static void
check_grid(const MddDoseGrid *g)
{
	size_t		n;

	if (g->rows < 1 || g->columns < 1 || g->frames < 1)
		fail("grid without rows, columns or frames", 0);
	n = (size_t) g->rows * g->columns * g->frames;
	if (n > MAX_VOXELS)
		fail("grid larger than max_voxels", 0);
	for (size_t i = 0; i < n; i++)
		if (!isfinite(g->dose[i]))
			fail("dose not finite", 0);
	for (int k = 0; k < g->frames; k++)
		if (!isfinite(g->frame_offsets[k]))
			fail("frame offset not finite", 0);
	if (!(g->row_spacing > 0.0) || !(g->column_spacing > 0.0))
		fail("spacing not positive", 0);
	if (memchr(g->frame_of_reference_uid, '\0', sizeof(g->frame_of_reference_uid)) == NULL ||
		memchr(g->dose_units, '\0', sizeof(g->dose_units)) == NULL)
		fail("text not NUL-terminated", 0);
}

/* every ROI, contour and point of a structure set the reader accepted */
static void
check_set(const MddStructureSet *s)
{
	if (s->nrois < 0 || (s->nrois > 0 && s->rois == NULL))
		fail("ROIs missing", 0);
	for (int r = 0; r < s->nrois; r++)
	{
		const MddRoi *roi = &s->rois[r];

		if (roi->name == NULL || roi->frame_of_reference_uid == NULL)
			fail("ROI text missing", 0);
		(void) strlen(roi->name);
		(void) strlen(roi->frame_of_reference_uid);
		for (int c = 0; c < roi->ncontours; c++)
		{
			const MddContour *contour = &roi->contours[c];

			for (int k = 0; k < 3 * contour->npoints; k++)
				if (!isfinite(contour->points[k]))
					fail("contour point not finite", 0);
		}
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char		errbuf[ERRBUF_LEN];
	MddDoseGrid *grid = NULL;
	MddStructureSet *set = NULL;
	MddDicomStatus status;

	memset(errbuf, 'x', sizeof(errbuf));
	status = mdd_dicom_read_dose(data, size, MAX_VOXELS, &grid, errbuf, sizeof(errbuf));
	if (status == MDD_DICOM_OK)
	{
		if (grid == NULL)
			fail("OK without a grid", status);
		check_grid(grid);
		mdd_dicom_free_dose(grid);
	}
	else
	{
		if (grid != NULL)
			fail("a grid with a failure", status);
		check_reason(errbuf, status);
	}

	memset(errbuf, 'x', sizeof(errbuf));
	status = mdd_dicom_read_structure_set(data, size, &set, errbuf, sizeof(errbuf));
	if (status == MDD_DICOM_OK)
	{
		if (set == NULL)
			fail("OK without a structure set", status);
		check_set(set);
		mdd_dicom_free_structure_set(set);
	}
	else
	{
		if (set != NULL)
			fail("a structure set with a failure", status);
		check_reason(errbuf, status);
	}
	return 0;
}
