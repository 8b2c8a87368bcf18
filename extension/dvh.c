/*-------------------------------------------------------------------------
 *
 * dvh.c
 *	  Dose-volume histograms of the ROIs of an RT Structure Set over an RT
 *	  Dose grid: mdd._dvh(), the C behind mdd.dvh (sql/dvh.sql).
 *
 * The method is the one dicompyler-core published, computed here in the
 * dose grid's own index space:
 *
 *	- the contours of a ROI are grouped into planes by their position along
 *	  the dose grid's normal; the ROI's slice thickness is the smallest
 *	  distance between two of its planes;
 *	- for each plane, the dose plane at that position is the nearest dose
 *	  frame when one lies within half a millimetre, else the linear
 *	  interpolation of the two frames around it; a plane outside the frames
 *	  of the grid adds nothing;
 *	- the dose grid points of the plane (voxel centres) inside the plane's
 *	  contours count, by the even-odd rule over all of the plane's contours
 *	  together, so that a contour inside another cuts a hole;
 *	- each counted point stands for a voxel of pixel area x slice thickness
 *	  and adds its dose to a differential histogram, from which the
 *	  cumulative DVH, the volume and the dose statistics follow.
 *
 * Contours are rasterised by scanlines: for each row of the grid, the
 * crossings of the plane's contour edges with the row are sorted and the
 * columns between pairs of crossings are inside.  That is the even-odd
 * point-in-polygon test of every grid point, at a cost proportional to
 * rows x edges instead of points x edges.
 *
 * Reading the DICOM objects is dicom_rt.cpp's job (behind dicom.h); this
 * file turns its statuses into errors and does the geometry.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <math.h>

#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"

#include "dicom.h"
#include "mdd.h"

PG_FUNCTION_INFO_V1(mdd_dvh_sql);

/* largest dose grid read, in voxels (doubles: 512 MiB) */
#define DVH_MAX_VOXELS ((size_t) 1 << 26)
/* most histogram bins, from 0 Gy (or the lowest dose) to the highest dose */
#define DVH_MAX_BINS 1000000
/* contours closer than this along the grid normal share a plane (mm) */
#define DVH_SAME_PLANE_MM 0.01
/* a contour's points may lie this far from its plane (mm) */
#define DVH_FLATNESS_MM 0.5
/* a plane this close to a dose frame takes that frame's doses (mm) */
#define DVH_FRAME_SNAP_MM 0.5
/* the dose of the V20 column (Gy) */
#define DVH_V_DOSE_GY 20.0

#define DVH_COLUMNS 14

/* one contour in grid index space */
typedef struct GridContour
{
	double		w;				/* mm along the grid normal */
	int			npoints;
	double	   *u;				/* column index of each point */
	double	   *v;				/* row index of each point */
} GridContour;

/* what is accumulated for one ROI */
typedef struct RoiTally
{
	int64		voxels;
	double		sum;
	double		min;
	double		max;
	int64		at_v_dose;		/* voxels receiving DVH_V_DOSE_GY or more */
	int64	   *hist;			/* per bin */
} RoiTally;

/* the C++ results, freed when the function's memory context goes */
typedef struct DvhInputs
{
	MddDoseGrid *grid;
	MddStructureSet *set;
	MemoryContextCallback callback;
} DvhInputs;

/*
 * Free what dicom_rt.cpp malloc()ed; runs when the memory context of the
 * call is reset or deleted, on success and on error alike.
 */
static void
free_inputs(void *arg)
{
	DvhInputs  *in = (DvhInputs *) arg;

	mdd_dicom_free_dose(in->grid);
	mdd_dicom_free_structure_set(in->set);
	in->grid = NULL;
	in->set = NULL;
}

/*
 * Turn a failed read of an RT object into an error naming the object.
 */
static void
report_read_failure(MddDicomStatus status, const char *what, int64 id, const char *errbuf)
{
	switch (status)
	{
		case MDD_DICOM_EMPTY:
		case MDD_DICOM_NOT_DICOM:
		case MDD_DICOM_MALFORMED:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_BINARY_REPRESENTATION),
					 errmsg("%s " INT64_FORMAT " cannot be read", what, id),
					 errdetail("%s.", errbuf)));
			break;
		case MDD_DICOM_INVALID:
		case MDD_DICOM_MISSING_UID:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("%s " INT64_FORMAT " is malformed", what, id),
					 errdetail("%s.", errbuf)));
			break;
		case MDD_DICOM_UNSUPPORTED:
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("%s " INT64_FORMAT " is in a form mdd cannot compute a DVH from", what, id),
					 errdetail("%s.", errbuf)));
			break;
		case MDD_DICOM_OUT_OF_MEMORY:
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("out of memory while reading %s " INT64_FORMAT, what, id),
					 errdetail("%s.", errbuf)));
			break;
		default:
			ereport(ERROR,
					(errcode(ERRCODE_INTERNAL_ERROR),
					 errmsg("reading %s " INT64_FORMAT " failed", what, id),
					 errdetail("%s.", errbuf)));
			break;
	}
}

/*
 * The ROI name as text of the database encoding: DCMTK gave UTF-8 where it
 * knew the character set; bytes that are not valid UTF-8 become '?'.
 */
static text *
roi_name_text(const char *name)
{
	int			len = strlen(name);
	char	   *copy = pstrdup(name);

	if (!pg_verify_mbstr(PG_UTF8, copy, len, true))
	{
		for (char *p = copy; *p; p++)
			if ((unsigned char) *p >= 0x80)
				*p = '?';
	}
	return cstring_to_text(pg_any_to_server(copy, len, PG_UTF8));
}

/* qsort comparators */
static int
cmp_double(const void *a, const void *b)
{
	double		x = *(const double *) a;
	double		y = *(const double *) b;

	return (x > y) - (x < y);
}

static int
cmp_contour_w(const void *a, const void *b)
{
	return cmp_double(&((const GridContour *) a)->w, &((const GridContour *) b)->w);
}

/*
 * The contours of a ROI in grid index space, sorted along the normal.
 * Contours of fewer than three points enclose nothing and are left out; a
 * contour that is not parallel to the dose frames is an error, since its
 * plane has no single dose plane.
 */
static GridContour *
grid_contours(const MddDoseGrid *g, const MddRoi *roi, int64 set_id, int *ncontours)
{
	GridContour *out = palloc0(sizeof(GridContour) * Max(roi->ncontours, 1));
	int			n = 0;

	for (int c = 0; c < roi->ncontours; c++)
	{
		const MddContour *src = &roi->contours[c];
		GridContour *gc = &out[n];
		double		wsum = 0.0,
					wmin = 0.0,
					wmax = 0.0;

		if (src->npoints < 3)
			continue;
		gc->npoints = src->npoints;
		gc->u = palloc(sizeof(double) * src->npoints);
		gc->v = palloc(sizeof(double) * src->npoints);
		for (int k = 0; k < src->npoints; k++)
		{
			double		d[3],
						ru = 0.0,
						cv = 0.0,
						nw = 0.0;

			for (int i = 0; i < 3; i++)
			{
				d[i] = src->points[3 * k + i] - g->position[i];
				ru += d[i] * g->row_direction[i];
				cv += d[i] * g->column_direction[i];
				nw += d[i] * g->normal[i];
			}
			gc->u[k] = ru / g->column_spacing;
			gc->v[k] = cv / g->row_spacing;
			wsum += nw;
			if (k == 0 || nw < wmin)
				wmin = nw;
			if (k == 0 || nw > wmax)
				wmax = nw;
		}
		if (wmax - wmin > 2.0 * DVH_FLATNESS_MM)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("contour %d of ROI %d \"%s\" of RT Structure Set " INT64_FORMAT " is not parallel to the dose grid's frames",
							c + 1, roi->number, roi->name, set_id),
					 errdetail("Its points lie %.2f mm apart along the normal of the dose grid.",
							   wmax - wmin)));
		gc->w = wsum / src->npoints;
		n++;
	}
	qsort(out, n, sizeof(GridContour), cmp_contour_w);
	*ncontours = n;
	return out;
}

/*
 * The frames of the grid in the order of their offsets: order[k] is the
 * frame with the k-th smallest offset.
 */
static int *
sorted_frames(const MddDoseGrid *g)
{
	int		   *order = palloc(sizeof(int) * g->frames);

	for (int k = 0; k < g->frames; k++)
		order[k] = k;
	/* insertion sort: frames are usually sorted already */
	for (int k = 1; k < g->frames; k++)
	{
		int			f = order[k];
		int			j = k;

		while (j > 0 && g->frame_offsets[order[j - 1]] > g->frame_offsets[f])
		{
			order[j] = order[j - 1];
			j--;
		}
		order[j] = f;
	}
	return order;
}

/*
 * The dose plane at w: frames *f0 and *f1 (the same frame when one lies
 * within DVH_FRAME_SNAP_MM) mixed as (1 - *frac) f0 + *frac f1.  False
 * when w lies outside the grid's frames.
 */
static bool
dose_plane_at(const MddDoseGrid *g, const int *order, double w, int *f0, int *f1, double *frac)
{
	int			nearest = 0;
	double		best = fabs(g->frame_offsets[order[0]] - w);

	for (int k = 1; k < g->frames; k++)
	{
		double		dist = fabs(g->frame_offsets[order[k]] - w);

		if (dist < best)
		{
			best = dist;
			nearest = k;
		}
	}
	if (best < DVH_FRAME_SNAP_MM)
	{
		*f0 = *f1 = order[nearest];
		*frac = 0.0;
		return true;
	}
	if (w < g->frame_offsets[order[0]] || w > g->frame_offsets[order[g->frames - 1]])
		return false;
	for (int k = 0; k + 1 < g->frames; k++)
	{
		double		lo = g->frame_offsets[order[k]];
		double		hi = g->frame_offsets[order[k + 1]];

		if (lo <= w && w <= hi)
		{
			*f0 = order[k];
			*f1 = order[k + 1];
			*frac = (w - lo) / (hi - lo);
			return true;
		}
	}
	return false;
}

/*
 * Add the voxels of one plane of a ROI (contours[first .. first+count-1])
 * to its tally.
 */
static void
tally_plane(const MddDoseGrid *g, const int *order, GridContour *contours, int first, int count,
			double w, double bin_width, int64 base_bin, int nbins, RoiTally *t)
{
	int			f0,
				f1;
	double		frac;
	int			edges = 0;
	double	   *xs;
	double		vmin = 0.0,
				vmax = -1.0;
	const double *d0,
			   *d1;
	size_t		plane_size = (size_t) g->rows * g->columns;

	if (!dose_plane_at(g, order, w, &f0, &f1, &frac))
		return;
	d0 = g->dose + plane_size * f0;
	d1 = g->dose + plane_size * f1;

	for (int c = first; c < first + count; c++)
	{
		edges += contours[c].npoints;
		for (int k = 0; k < contours[c].npoints; k++)
		{
			if ((c == first && k == 0) || contours[c].v[k] < vmin)
				vmin = contours[c].v[k];
			if ((c == first && k == 0) || contours[c].v[k] > vmax)
				vmax = contours[c].v[k];
		}
	}
	if (vmax < 0.0 || vmin > g->rows - 1)
		return;					/* beside the grid */
	xs = palloc(sizeof(double) * edges);

	for (int row = (vmin < 0.0) ? 0 : (int) floor(vmin); row < g->rows && row <= vmax; row++)
	{
		int			n = 0;
		const double *dr0 = d0 + (size_t) row * g->columns;
		const double *dr1 = d1 + (size_t) row * g->columns;

		/* crossings of the edges with this row: half-open in v */
		for (int c = first; c < first + count; c++)
		{
			const GridContour *gc = &contours[c];

			for (int k = 0; k < gc->npoints; k++)
			{
				int			k2 = (k + 1 == gc->npoints) ? 0 : k + 1;
				double		va = gc->v[k],
							vb = gc->v[k2];

				if ((va > row) != (vb > row))
					xs[n++] = gc->u[k] + (row - va) * (gc->u[k2] - gc->u[k]) / (vb - va);
			}
		}
		if (n < 2)
			continue;
		qsort(xs, n, sizeof(double), cmp_double);

		/* a column j is inside when an odd number of crossings lie beyond it */
		for (int p = 0; p + 1 < n; p += 2)
		{
			double		lo = ceil(xs[p]);
			double		hi = ceil(xs[p + 1]) - 1.0;

			if (lo < 0.0)
				lo = 0.0;
			if (hi > g->columns - 1)
				hi = g->columns - 1;
			if (!(lo <= hi))
				continue;
			for (int j = (int) lo; j <= (int) hi; j++)
			{
				double		dose = (f0 == f1) ? dr0[j] : (1.0 - frac) * dr0[j] + frac * dr1[j];
				int64		bin = (int64) floor(dose / bin_width) - base_bin;

				if (bin < 0)
					bin = 0;
				if (bin >= nbins)
					bin = nbins - 1;
				t->hist[bin]++;
				if (t->voxels == 0 || dose < t->min)
					t->min = dose;
				if (t->voxels == 0 || dose > t->max)
					t->max = dose;
				t->voxels++;
				t->sum += dose;
				if (dose >= DVH_V_DOSE_GY)
					t->at_v_dose++;
			}
		}
	}
	pfree(xs);
}

/*
 * The dose that at least pct percent of the voxels receive: the highest
 * bin edge with at least that share of the voxels at or above it.
 */
static double
dose_covering(const int64 *cumulative, int nedges, int64 voxels, double pct,
			  int64 base_bin, double bin_width)
{
	int			k = 0;

	for (int e = 0; e < nedges; e++)
		if ((double) cumulative[e] * 100.0 >= pct * (double) voxels)
			k = e;
	return (double) (base_bin + k) * bin_width;
}

/* a float8[] of n values */
static Datum
float8_array(const double *values, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(n, 1));

	for (int i = 0; i < n; i++)
		d[i] = Float8GetDatum(values[i]);
	return PointerGetDatum(construct_array(d, n, FLOAT8OID, sizeof(float8),
										   FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/*
 * Compute and emit the row of one ROI.
 */
static void
roi_row(ReturnSetInfo *rsinfo, const MddDoseGrid *g, const int *order, const MddRoi *roi,
		int64 set_id, double bin_width, int64 base_bin, int nbins)
{
	Datum		values[DVH_COLUMNS];
	bool		nulls[DVH_COLUMNS];
	RoiTally	t;
	int			ncontours;
	GridContour *contours = grid_contours(g, roi, set_id, &ncontours);
	double		thickness = 0.0;
	int			nplanes = 0;
	int		   *plane_first = palloc(sizeof(int) * (ncontours + 1));

	memset(&t, 0, sizeof(t));
	memset(nulls, 0, sizeof(nulls));
	t.hist = palloc0(sizeof(int64) * nbins);

	/* planes: runs of contours at the same position along the normal */
	for (int c = 0; c < ncontours; c++)
		if (c == 0 || contours[c].w - contours[plane_first[nplanes - 1]].w > DVH_SAME_PLANE_MM)
			plane_first[nplanes++] = c;
	plane_first[nplanes] = ncontours;

	/* slice thickness: the smallest distance between two planes */
	for (int p = 1; p < nplanes; p++)
	{
		double		gap = contours[plane_first[p]].w - contours[plane_first[p - 1]].w;

		if (p == 1 || gap < thickness)
			thickness = gap;
	}
	if (nplanes == 1 && g->frames > 1)
	{
		/* one plane only: as thick as the dose frames are apart */
		for (int k = 1; k < g->frames; k++)
		{
			double		gap = g->frame_offsets[order[k]] - g->frame_offsets[order[k - 1]];

			if (k == 1 || gap < thickness)
				thickness = gap;
		}
	}

	for (int p = 0; p < nplanes; p++)
	{
		CHECK_FOR_INTERRUPTS();
		tally_plane(g, order, contours, plane_first[p], plane_first[p + 1] - plane_first[p],
					contours[plane_first[p]].w, bin_width, base_bin, nbins, &t);
	}

	values[0] = Int32GetDatum(roi->number);
	values[1] = PointerGetDatum(roi_name_text(roi->name));
	values[2] = Float8GetDatum((double) t.voxels * g->row_spacing * g->column_spacing * thickness / 1000.0);
	values[13] = Int64GetDatum(t.voxels);
	if (t.voxels == 0)
	{
		for (int i = 3; i < 13; i++)
			nulls[i] = true;
		values[7] = float8_array(NULL, 0);
		values[8] = float8_array(NULL, 0);
		nulls[7] = nulls[8] = false;
	}
	else
	{
		int			last = nbins - 1;
		int			nedges;
		int64	   *cumulative;
		double	   *edges;
		double	   *pct;

		while (last > 0 && t.hist[last] == 0)
			last--;
		nedges = last + 2;
		cumulative = palloc(sizeof(int64) * nedges);
		edges = palloc(sizeof(double) * nedges);
		pct = palloc(sizeof(double) * nedges);
		cumulative[nedges - 1] = 0;
		for (int e = nedges - 2; e >= 0; e--)
			cumulative[e] = cumulative[e + 1] + t.hist[e];
		for (int e = 0; e < nedges; e++)
		{
			edges[e] = (double) (base_bin + e) * bin_width;
			pct[e] = 100.0 * (double) cumulative[e] / (double) t.voxels;
		}
		values[3] = Float8GetDatum(t.min);
		values[4] = Float8GetDatum(t.sum / (double) t.voxels);
		values[5] = Float8GetDatum(t.max);
		values[6] = Float8GetDatum(dose_covering(cumulative, nedges, t.voxels, 95.0, base_bin, bin_width));
		values[7] = float8_array(edges, nedges);
		values[8] = float8_array(pct, nedges);
		values[9] = Float8GetDatum(dose_covering(cumulative, nedges, t.voxels, 2.0, base_bin, bin_width));
		values[10] = Float8GetDatum(dose_covering(cumulative, nedges, t.voxels, 50.0, base_bin, bin_width));
		values[11] = Float8GetDatum(dose_covering(cumulative, nedges, t.voxels, 98.0, base_bin, bin_width));
		values[12] = Float8GetDatum(100.0 * (double) t.at_v_dose / (double) t.voxels);
	}
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/*
 * mdd._dvh(dose_id bigint, dose bytea, structure_set_id bigint,
 *			structure_set bytea, bin_width double precision)
 * RETURNS TABLE(roi_number, roi_name, volume_cc, min_gy, mean_gy, max_gy,
 *				 d95_gy, dose_gy, volume_pct, d2_gy, d50_gy, d98_gy, v20_pct,
 *				 voxels)
 *
 * One row per ROI of the structure set, in its order.  The ids only name
 * the objects in messages; mdd.dvh fetched the bytes and checked the
 * request.
 */
Datum
mdd_dvh_sql(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	int64		dose_id = PG_GETARG_INT64(0);
	bytea	   *dose = PG_GETARG_BYTEA_PP(1);
	int64		set_id = PG_GETARG_INT64(2);
	bytea	   *set = PG_GETARG_BYTEA_PP(3);
	double		bin_width = PG_GETARG_FLOAT8(4);
	DvhInputs  *in;
	char		errbuf[512];
	MddDicomStatus status;
	MddDoseGrid *g;
	double		dmin,
				dmax;
	size_t		nvoxels;
	int64		base_bin,
				top_bin;
	int		   *order;

	if (!(bin_width > 0.0) || isinf(bin_width))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("bin width %g Gy is not a positive number", bin_width)));

	InitMaterializedSRF(fcinfo, 0);

	in = palloc0(sizeof(DvhInputs));
	in->callback.func = free_inputs;
	in->callback.arg = in;
	MemoryContextRegisterResetCallback(CurrentMemoryContext, &in->callback);

	status = mdd_dicom_read_dose((const unsigned char *) VARDATA_ANY(dose), VARSIZE_ANY_EXHDR(dose),
								 DVH_MAX_VOXELS, &in->grid, errbuf, sizeof(errbuf));
	if (status != MDD_DICOM_OK)
		report_read_failure(status, "RT Dose", dose_id, errbuf);
	g = in->grid;
	if (strcmp(g->dose_units, "GY") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("RT Dose " INT64_FORMAT " has dose units \"%s\", not GY", dose_id, g->dose_units),
				 errdetail("A dose-volume histogram in Gy needs an absolute dose grid.")));

	status = mdd_dicom_read_structure_set((const unsigned char *) VARDATA_ANY(set), VARSIZE_ANY_EXHDR(set),
										  &in->set, errbuf, sizeof(errbuf));
	if (status != MDD_DICOM_OK)
		report_read_failure(status, "RT Structure Set", set_id, errbuf);

	/* every ROI must be drawn in the dose grid's frame of reference */
	for (int r = 0; r < in->set->nrois; r++)
	{
		const MddRoi *roi = &in->set->rois[r];
		const char *frame = roi->frame_of_reference_uid[0] ? roi->frame_of_reference_uid
			: in->set->frame_of_reference_uid;

		if (frame[0] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
					 errmsg("RT Structure Set " INT64_FORMAT " is malformed", set_id),
					 errdetail("ROI %d \"%s\" names no frame of reference.", roi->number, roi->name)));
		if (strcmp(frame, g->frame_of_reference_uid) != 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("RT Structure Set " INT64_FORMAT " and RT Dose " INT64_FORMAT " are in different frames of reference",
							set_id, dose_id),
					 errdetail("ROI %d \"%s\" is drawn in frame of reference %s, the dose grid is in %s.",
							   roi->number, roi->name, frame, g->frame_of_reference_uid)));
	}

	/* the bins span the doses of the whole grid */
	nvoxels = (size_t) g->rows * g->columns * g->frames;
	dmin = dmax = g->dose[0];
	for (size_t i = 1; i < nvoxels; i++)
	{
		if (g->dose[i] < dmin)
			dmin = g->dose[i];
		if (g->dose[i] > dmax)
			dmax = g->dose[i];
	}
	if (floor(dmax / bin_width) - floor(Min(dmin, 0.0) / bin_width) + 1.0 > DVH_MAX_BINS)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("bin width %g Gy is too small for RT Dose " INT64_FORMAT, bin_width, dose_id),
				 errdetail("Doses from %g Gy to %g Gy would need more than %d bins.",
						   Min(dmin, 0.0), dmax, DVH_MAX_BINS)));
	base_bin = (int64) floor(Min(dmin, 0.0) / bin_width);
	top_bin = (int64) floor(dmax / bin_width);

	order = sorted_frames(g);
	for (int r = 0; r < in->set->nrois; r++)
		roi_row(rsinfo, g, order, &in->set->rois[r], set_id, bin_width, base_bin,
				(int) (top_bin - base_bin + 1));

	return (Datum) 0;
}
