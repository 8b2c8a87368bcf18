#!/usr/bin/python3
# mdd.dvh: cumulative dose-volume histograms of the ROIs of an RT Structure
# Set over an RT Dose.
#
#  - the synthetic patient (scripts/generate_patient.py) against a port of
#    dicompyler-core's method written here in numpy (points of the dose
#    grid in patient coordinates, even-odd point-in-polygon per contour,
#    XOR of the contours of a plane, dose planes interpolated between
#    frames, voxel = pixel area x smallest plane spacing): volume per bin,
#    volume, min/mean/max and D95;
#  - analytic cases built here with pydicom: a cube and a ring in a
#    uniform dose (exact volumes, step DVH), planes between dose frames
#    (interpolated doses), planes near and beyond the last frame, ROIs
#    outside the grid or without contours; the same grid stored as 16 and
#    32 bits, little and big endian, with absolute frame positions and
#    flipped (feet-first) orientation gives the same rows;
#  - bad requests and damaged objects give clear errors, never a crash;
#  - the same histograms once the dose and structure set are archived to a
#    file storage; roles and the audit trail.
import io
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

PATIENT = "TAP95"
SEED = 95
SLICES = 30
BIN = 0.01  # Gy, the default bin width

RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"

test_dir = env("MDD_TEST_DIR")
pydicom_dir = env("MDD_PYDICOM_DIR")
src = make_server_dir(os.path.join(test_dir, "allowed", "p95"), mode=0o755)
archive_root = make_server_dir(os.path.join(test_dir, "allowed", "archive95"))
manifest = generate_patient(src, PATIENT, SEED, slices=SLICES)

conn = connect()
execute(conn, "SELECT count(*) FROM mdd.import(%s)", (src,))
ids = {r["sop_instance_uid"]: r["id"] for r in query_dicts(
    conn, "SELECT id, sop_instance_uid FROM mdd.objects WHERE patient_id = %s", (PATIENT,))}
files = {f["modality"]: f for f in manifest["files"] if f["kind"] == "dicom"}
rtdose = ids[files["RTDOSE"]["sop_instance_uid"]]
rtstruct = ids[files["RTSTRUCT"]["sop_instance_uid"]]
ct = min(ids[f["sop_instance_uid"]] for f in manifest["files"] if f.get("path", "").startswith("ct/"))

COLUMNS = ["roi_number", "roi_name", "volume_cc", "min_gy", "mean_gy", "max_gy", "d95_gy",
           "dose_gy", "volume_pct", "d2_gy", "d50_gy", "d98_gy", "v20_pct", "voxels"]


def dvh(dose_id, struct_id, *extra, c=None):
    """The rows of mdd.dvh by ROI number."""
    args = ", ".join(["%s"] * (2 + len(extra)))
    rows = query_dicts(c or conn, f"SELECT * FROM mdd.dvh({args})", (dose_id, struct_id, *extra))
    return {r["roi_number"]: r for r in rows}


# ---------------------------------------------------------------------------
# the reference: dicompyler-core's method, in numpy


def inside_polygon(poly, X, Y):
    """Even-odd test of the points (X, Y) against a closed polygon (n x 2):
    a point is inside when a ray towards +x crosses an odd number of edges
    (an edge counts when one end lies above the point's y and the other not)."""
    inside = np.zeros(X.shape, dtype=bool)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for a, b, c, d in zip(x1, y1, x2, y2):
        crosses = (b > Y) != (d > Y)
        if not crosses.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = a + (Y - b) * (c - a) / (d - b)
        inside ^= crosses & (xint > X)
    return inside


def reference_dvh(dose_path, struct_path, bin_width=BIN):
    """Per ROI number: voxels, volume (cc), min/mean/max (Gy), the cumulative
    volume (%) at each bin edge from 0 Gy, and D95."""
    d = pydicom.dcmread(dose_path)
    assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    grid = d.pixel_array.astype(np.float64) * float(d.DoseGridScaling)
    if grid.ndim == 2:
        grid = grid[None]
    ipp = [float(v) for v in d.ImagePositionPatient]
    row_spacing, col_spacing = (float(v) for v in d.PixelSpacing)
    X, Y = np.meshgrid(ipp[0] + np.arange(d.Columns) * col_spacing,
                       ipp[1] + np.arange(d.Rows) * row_spacing)
    offsets = np.array([float(v) for v in d.GridFrameOffsetVector])
    frames_z = ipp[2] + offsets if offsets[0] == 0 else offsets

    def dose_plane(z):
        dist = np.abs(frames_z - z)
        if dist.min() < 0.5:
            return grid[int(dist.argmin())]
        if z < frames_z.min() or z > frames_z.max():
            return None
        below = max((k for k in range(len(frames_z)) if frames_z[k] < z), key=lambda k: frames_z[k])
        above = min((k for k in range(len(frames_z)) if frames_z[k] > z), key=lambda k: frames_z[k])
        f = (z - frames_z[below]) / (frames_z[above] - frames_z[below])
        return (1.0 - f) * grid[below] + f * grid[above]

    s = pydicom.dcmread(struct_path)
    out = {}
    for roi in s.StructureSetROISequence:
        number = int(roi.ROINumber)
        planes = defaultdict(list)
        for rc in s.ROIContourSequence:
            if int(rc.ReferencedROINumber) != number:
                continue
            for c in getattr(rc, "ContourSequence", []):
                if c.ContourGeometricType != "CLOSED_PLANAR":
                    continue
                pts = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
                planes[f"{pts[0, 2]:.2f}"].append(pts[:, :2])
        zs = sorted(float(z) for z in planes)
        gaps = np.diff(zs)
        thickness = float(gaps.min()) if len(gaps) else float(np.diff(np.sort(frames_z)).min())
        doses = []
        for z in zs:
            plane = dose_plane(z)
            if plane is None:
                continue
            mask = np.zeros(X.shape, dtype=bool)
            for poly in planes[f"{z:.2f}"]:
                mask ^= inside_polygon(poly, X, Y)
            doses.append(plane[mask])
        doses = np.concatenate(doses) if doses else np.zeros(0)
        n = len(doses)
        r = {"voxels": n, "volume_cc": n * row_spacing * col_spacing * thickness / 1000.0}
        if n:
            bins = np.floor(doses / bin_width).astype(np.int64)
            hist = np.bincount(bins)
            cumulative = np.concatenate([np.cumsum(hist[::-1])[::-1], [0]])
            pct = 100.0 * cumulative / n
            r.update(min_gy=float(doses.min()), mean_gy=float(doses.mean()),
                     max_gy=float(doses.max()), volume_pct=pct,
                     d95_gy=float(np.nonzero(cumulative * 100.0 >= 95.0 * n)[0].max()) * bin_width)
        out[number] = r
    return out


# ---------------------------------------------------------------------------
# the synthetic patient against the reference

t0 = time.monotonic()
got = dvh(rtdose, rtstruct)
elapsed = time.monotonic() - t0
t0 = time.monotonic()
ref = reference_dvh(os.path.join(src, files["RTDOSE"]["path"]), os.path.join(src, files["RTSTRUCT"]["path"]))
ref_elapsed = time.monotonic() - t0
note(f"mdd.dvh on the synthetic patient ({SLICES} CT slices, 4 ROIs): {elapsed * 1000:.0f} ms "
     f"(the numpy reference: {ref_elapsed * 1000:.0f} ms)")

is_(sorted(got), sorted(ref), "one row per ROI of the structure set")
is_([(n, got[n]["roi_name"]) for n in sorted(got)],
    [(1, "BODY"), (2, "PTV"), (3, "SpinalCord"), (4, "Lung_L")], "ROI numbers and names")
for n in sorted(got):
    g, r = got[n], ref.get(n, {})
    name = g["roi_name"]
    ok(r.get("voxels", 0) > 0 and g["voxels"] > 0, f"{name}: the ROI meets the dose grid",
       f"    mdd {g['voxels']} voxels, reference {r.get('voxels')}")
    if not r.get("voxels"):
        continue
    vol_err = abs(g["volume_cc"] - r["volume_cc"]) / r["volume_cc"]
    ok(vol_err <= 0.01, f"{name}: volume within 1% of the reference",
       f"    mdd {g['volume_cc']:.4f} cc, reference {r['volume_cc']:.4f} cc")
    want = list(r["volume_pct"])
    have = list(g["volume_pct"])
    width = max(len(want), len(have))
    want += [0.0] * (width - len(want))
    have += [0.0] * (width - len(have))
    worst = max(abs(a - b) for a, b in zip(have, want))
    ok(worst <= 1.0, f"{name}: cumulative volume within 1% of the volume at every bin edge",
       f"    largest difference {worst:.4f} percentage points")
    edges_ok = len(g["dose_gy"]) == len(g["volume_pct"]) and all(
        abs(e - k * BIN) < 1e-9 for k, e in enumerate(g["dose_gy"]))
    ok(edges_ok, f"{name}: dose_gy holds the bin edges 0, 0.01, ... Gy, one per volume_pct value")
    ok(g["volume_pct"][0] == 100.0 and g["volume_pct"][-1] == 0.0
       and all(a >= b for a, b in zip(g["volume_pct"], g["volume_pct"][1:])),
       f"{name}: the cumulative volume falls from 100% to 0%")
    stats = {k: (g[k], r[k]) for k in ("min_gy", "mean_gy", "max_gy")}
    bad = {k: v for k, v in stats.items() if abs(v[0] - v[1]) > 0.005 * max(abs(v[1]), 1.0)}
    ok(not bad, f"{name}: min, mean and max dose within 0.5% of the reference", f"    {bad}")
    ok(abs(g["d95_gy"] - r["d95_gy"]) <= BIN + 1e-9, f"{name}: D95 within one bin of the reference",
       f"    mdd {g['d95_gy']}, reference {r['d95_gy']}")
    note(f"{name}: {g['voxels']} voxels ({r['voxels']} in the reference), volume {g['volume_cc']:.3f} cc "
         f"(rel. diff {vol_err:.2e}), largest bin difference {worst:.4f} %, "
         f"min/mean/max {g['min_gy']:.3f}/{g['mean_gy']:.3f}/{g['max_gy']:.3f} Gy, "
         f"D95 {g['d95_gy']:.2f} Gy (reference {r['d95_gy']:.2f})")

ptv = got[2]
ok(ptv["d95_gy"] > 40.0 and ptv["mean_gy"] > 50.0, "the PTV sits in the high dose",
   f"    D95 {ptv['d95_gy']}, mean {ptv['mean_gy']}")
ok(got[4]["mean_gy"] < ptv["mean_gy"] / 2, "the contralateral lung gets much less",
   f"    {got[4]['mean_gy']}")
ok(all(r["d2_gy"] >= r["d50_gy"] >= r["d98_gy"] for r in got.values()),
   "D2 >= D50 >= D98 for every ROI")
v20 = got[2]["v20_pct"]
edge20 = got[2]["volume_pct"][round(20.0 / BIN)]
ok(abs(v20 - edge20) < 1e-9, "v20_pct is the cumulative volume at 20 Gy", f"    {v20} vs {edge20}")

coarse = dvh(rtdose, rtstruct, 0.5)
ok(all(abs(coarse[n]["volume_cc"] - got[n]["volume_cc"]) < 1e-9 for n in got)
   and all(abs(e - k * 0.5) < 1e-9 for k, e in enumerate(coarse[2]["dose_gy"])),
   "a bin width of 0.5 Gy: same volumes, edges every 0.5 Gy")
ok(abs(coarse[2]["volume_pct"][40] - got[2]["volume_pct"][2000]) < 1e-9,
   "and the same cumulative volume at 20 Gy")

# ---------------------------------------------------------------------------
# analytic cases

ANALYTIC_FOR = "2.25.95000000000000000000000000000000001"
OTHER_FOR = "2.25.95000000000000000000000000000000002"
STUDY = "2.25.95000000000000000000000000000000003"
serial = [0]


def uid():
    serial[0] += 1
    return f"2.25.9500000000000000000000000000000{serial[0]:04d}"


def dataset(sop_class, modality):
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid()
    ds.PatientID = "TAP95A"
    ds.PatientName = "Analytic^Phantom"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = uid()
    ds.Modality = modality
    return ds


def encode(ds, syntax=ExplicitVRLittleEndian):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    ds.is_little_endian = syntax != ExplicitVRBigEndian
    ds.is_implicit_VR = syntax == ImplicitVRLittleEndian
    buf = io.BytesIO()
    dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def store(data):
    return query_value(conn, "SELECT mdd.store(%s)", (data,))


# The grid: 20 columns (x = -19 .. 19, 2 mm), 16 rows (y = -22.5 .. 22.5,
# 3 mm), 5 frames (z = -8 .. 8, 4 mm).  10.005 Gy in the box |x|, |y| <= 10,
# 1.005 + k Gy elsewhere in frame k (half a bin above an edge, so that no
# dose falls on one).
XS = -19.0 + 2.0 * np.arange(20)
YS = -22.5 + 3.0 * np.arange(16)
ZS = -8.0 + 4.0 * np.arange(5)
GRID = np.empty((5, 16, 20))
for k in range(5):
    GRID[k] = 1.005 + k
    GRID[k][np.ix_(np.abs(YS) <= 10, np.abs(XS) <= 10)] = 10.005
STORED = np.rint(GRID / 0.001).astype(np.int64)


def dose_object(variant="base"):
    ds = dataset(RT_DOSE, "RTDOSE")
    ds.FrameOfReferenceUID = ANALYTIC_FOR
    stored = STORED
    ds.ImagePositionPatient = [-19, -22.5, -8]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.GridFrameOffsetVector = [0, 4, 8, 12, 16]
    if variant == "abs":
        ds.GridFrameOffsetVector = [-8, -4, 0, 4, 8]
    if variant == "flip":  # feet first: x and the frame order reversed
        ds.ImagePositionPatient = [19, -22.5, 8]
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        stored = STORED[::-1, :, ::-1]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = 5
    ds.FrameIncrementPointer = 0x3004000C
    ds.Rows = 16
    ds.Columns = 20
    ds.PixelSpacing = [3, 2]
    bits = 16 if variant == "u16" else 32
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseGridScaling = "0.001"
    dtype = {"u16": "<u2", "be32": ">u4"}.get(variant, "<u4")
    ds[0x7FE00010] = DataElement(0x7FE00010, "OW", np.ascontiguousarray(stored).astype(dtype).tobytes())
    if variant == "nogfov":
        del ds.GridFrameOffsetVector
    if variant == "short":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    if variant == "noscale":
        del ds.DoseGridScaling
    syntax = {"be32": ExplicitVRBigEndian, "u16": ImplicitVRLittleEndian}.get(variant,
                                                                           ExplicitVRLittleEndian)
    return encode(ds, syntax)


def square(x0, x1, y0, y1, z, reverse=False):
    pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if reverse:
        pts.reverse()
    return [v for x, y in pts for v in (x, y, z)]


ROIS = [
    (1, "Cube", [square(-6, 6, -6, 6, z) for z in (-4, 0, 4)]),
    (2, "Ring", [c for z in (0, 4) for c in (square(-8, 8, -9, 9, z),
                                             square(-4, 4, -3, 3, z, reverse=True))]),
    (3, "Gradient", [square(12, 18, -6, 6, z) for z in (2, 6)]),
    (4, "Edge", [square(12, 18, -6, 6, z) for z in (8.3, 12.3)]),
    (5, "Slab", [square(12, 18, -6, 6, 0)]),
    (6, "Outside", [square(100, 110, -6, 6, z) for z in (0, 4)]),
    (7, "Empty", []),
    (8, "Points", [("POINT", [0, 0, 0])]),
]


def struct_object(rois=ROIS, frame=ANALYTIC_FOR, fix=None):
    ds = dataset(RT_STRUCT, "RTSTRUCT")
    ds.StructureSetLabel = "ANALYTIC"
    ref = Dataset()
    ref.FrameOfReferenceUID = frame
    ds.ReferencedFrameOfReferenceSequence = [ref]
    ds.StructureSetROISequence = []
    ds.ROIContourSequence = []
    for number, name, contours in rois:
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ROIDisplayColor = [255, 0, 0]
        items = []
        for c in contours:
            kind, data = c if isinstance(c, tuple) else ("CLOSED_PLANAR", c)
            item = Dataset()
            item.ContourGeometricType = kind
            item.NumberOfContourPoints = len(data) // 3
            item.ContourData = [f"{v:g}" for v in data]
            items.append(item)
        if items:
            rc.ContourSequence = items
        ds.ROIContourSequence.append(rc)
    if fix:
        fix(ds)
    return encode(ds)


def step(dose, n):
    """Cumulative volume (%) of a ROI that receives `dose` everywhere."""
    k = math.floor(dose / BIN + 1e-9)
    return [100.0] * (k + 1) + [0.0] * (n - k - 1)


base_dose = store(dose_object())
analytic_struct = store(struct_object())
a = dvh(base_dose, analytic_struct)
is_(sorted(a), [1, 2, 3, 4, 5, 6, 7, 8], "analytic: one row per ROI, the empty ones included")


def close(x, y, eps=1e-9):
    return x is not None and y is not None and abs(x - y) <= eps


c = a[1]
is_(c["voxels"], 72, "cube: 6 x 4 voxel centres on 3 planes")
ok(close(c["volume_cc"], 1.728), "cube: 12 x 12 x 12 mm = 1.728 cc", f"    {c['volume_cc']}")
ok(close(c["min_gy"], 10.005) and close(c["max_gy"], 10.005) and close(c["mean_gy"], 10.005),
   "cube: min = mean = max = 10.005 Gy in the uniform region")
ok(len(c["volume_pct"]) == 1002 and c["volume_pct"] == step(10.005, 1002),
   "cube: a step DVH, 100% up to 10.00 Gy and 0% from 10.01 Gy")
ok(close(c["dose_gy"][1000], 10.0) and close(c["dose_gy"][-1], 10.01), "cube: bin edges up to 10.01 Gy")
ok(all(close(c[k], 10.0) for k in ("d95_gy", "d2_gy", "d50_gy", "d98_gy")) and c["v20_pct"] == 0.0,
   "cube: D95 = D2 = D50 = D98 = 10.00 Gy, V20 = 0%")

r = a[2]
is_(r["voxels"], 80, "ring: (8 x 6 - 4 x 2) voxels on 2 planes: the inner contour cuts a hole")
ok(close(r["volume_cc"], 1.92), "ring: 80 x 24 mm3 = 1.92 cc", f"    {r['volume_cc']}")

g = a[3]
is_(g["voxels"], 24, "gradient: 3 x 4 voxels on 2 planes between dose frames")
ok(close(g["min_gy"], 3.505) and close(g["max_gy"], 4.505) and close(g["mean_gy"], 4.005),
   "gradient: doses interpolated to the planes (3.505 and 4.505 Gy)",
   f"    {g['min_gy']}, {g['mean_gy']}, {g['max_gy']}")
ok(g["volume_pct"] == [100.0] * 351 + [50.0] * 100 + [0.0], "gradient: two steps, 100% to 3.50 Gy, 50% to 4.50 Gy",
   f"    {len(g['volume_pct'])} values")
ok(close(g["d95_gy"], 3.5) and close(g["d98_gy"], 3.5) and close(g["d50_gy"], 4.5) and close(g["d2_gy"], 4.5),
   "gradient: D95 = D98 = 3.50 Gy, D50 = D2 = 4.50 Gy")

e = a[4]
is_(e["voxels"], 12, "edge: the plane 0.3 mm beyond the last frame takes it, the plane 4.3 mm beyond adds nothing")
ok(close(e["min_gy"], 5.005) and close(e["max_gy"], 5.005) and close(e["volume_cc"], 0.288),
   "edge: the last frame's dose, 12 voxels of 4 mm", f"    {e}")

s = a[5]
ok(s["voxels"] == 12 and close(s["volume_cc"], 0.288) and close(s["mean_gy"], 3.005),
   "slab: a ROI on one plane is as thick as the dose frames are apart", f"    {s}")

for n in (6, 7, 8):
    z = a[n]
    is_((z["voxels"], z["volume_cc"], z["min_gy"], z["mean_gy"], z["max_gy"], z["d95_gy"],
         z["dose_gy"], z["volume_pct"]),
        (0, 0.0, None, None, None, None, [], []),
        f"{z['roi_name']}: zero volume, no dose statistics, empty arrays")

analytic_dir = make_server_dir(os.path.join(test_dir, "allowed", "analytic95"), mode=0o755)
for name, data in (("dose.dcm", dose_object()), ("struct.dcm", struct_object())):
    with open(os.path.join(analytic_dir, name), "wb") as fh:
        fh.write(data)
ref_a = reference_dvh(os.path.join(analytic_dir, "dose.dcm"), os.path.join(analytic_dir, "struct.dcm"))
is_({n: (a[n]["voxels"], round(a[n]["volume_cc"], 9)) for n in (1, 2, 3, 4)},
    {n: (ref_a[n]["voxels"], round(ref_a[n]["volume_cc"], 9)) for n in (1, 2, 3, 4)},
    "the reference port agrees on the analytic ROIs")


def comparable(rows):
    return {n: tuple(round(v, 9) if isinstance(v, float) else
                     [round(x, 9) for x in v] if isinstance(v, list) else v
                     for v in (r[k] for k in COLUMNS))
            for n, r in rows.items()}


for variant, what in (("u16", "16-bit pixels, implicit VR"),
                      ("be32", "32-bit pixels, explicit VR big endian"),
                      ("abs", "Grid Frame Offset Vector as absolute z positions"),
                      ("flip", "feet-first orientation (x and frames reversed)")):
    other = store(dose_object(variant))
    is_deeply(comparable(dvh(other, analytic_struct)), comparable(a), f"the same grid with {what}: the same rows")

# ---------------------------------------------------------------------------
# bad requests and damaged objects

raises(conn, "SELECT * FROM mdd.dvh(NULL, %s)", (rtstruct,), "22004", "a NULL dose id is refused")
raises(conn, "SELECT * FROM mdd.dvh(%s, 99999999)", (rtdose,), "42704", "an unknown structure set is refused",
       "99999999")
raises(conn, "SELECT * FROM mdd.dvh(99999998, %s)", (rtstruct,), "42704", "an unknown dose is refused",
       "99999998")
raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (ct, rtstruct), "22023", "a CT image is no RT Dose",
       "not an RT Dose")
raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (rtstruct, rtstruct), "22023",
       "a structure set is no RT Dose")
raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (rtdose, rtdose), "22023", "a dose is no RT Structure Set",
       "not an RT Structure Set")
for width in (0, -0.01, float("nan"), float("inf")):
    raises(conn, "SELECT * FROM mdd.dvh(%s, %s, %s)", (rtdose, rtstruct, width), "22023",
           f"a bin width of {width} Gy is refused")
raises(conn, "SELECT * FROM mdd.dvh(%s, %s, 1e-9)", (rtdose, rtstruct), "22023",
       "a bin width giving too many bins is refused", "too small")

e = raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (rtdose, analytic_struct), "22023",
           "a structure set in another frame of reference is refused", "different frames of reference")
like(e.diag.message_detail if e else None, ANALYTIC_FOR.replace(".", r"\.") + r".*" + r"2\.25\.",
     "the detail names both frames of reference")
other_for = store(struct_object(frame=OTHER_FOR))
raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (base_dose, other_for), "22023",
       "an analytic structure set in another frame is refused too", "different frames")



def pydicom_file_new_uid(name):
    """One of pydicom's files with a SOP Instance UID of its own: other tests
    of the run store pydicom's rtdose files, which share their UIDs."""
    ds = pydicom.dcmread(os.path.join(pydicom_dir, name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid()
    buf = io.BytesIO()
    ds.save_as(buf)
    return store(buf.getvalue())


relative = pydicom_file_new_uid("rtdose.dcm")
raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (relative, rtstruct), "22023",
       "a dose grid in RELATIVE units is refused", "RELATIVE")
rle = pydicom_file_new_uid("rtdose_rle.dcm")
raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (rle, rtstruct), "0A000",
       "an RLE-compressed dose grid is refused as unsupported")

for variant, word in (("nogfov", "GridFrameOffsetVector"), ("short", "PixelData"),
                      ("noscale", "DoseGridScaling")):
    e = raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (store(dose_object(variant)), analytic_struct),
               "22P02", f"a dose grid without a usable {word} is malformed", "malformed")
    like(e.diag.message_detail if e else None, word, f"the detail names {word}")


def bad_triples(ds):
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = ["1", "2", "3", "4", "5", "6", "7"]
    ds.ROIContourSequence[0].ContourSequence[0].NumberOfContourPoints = 2


def bad_reference(ds):
    ds.ROIContourSequence[1].ReferencedROINumber = 99


def bad_count(ds):
    ds.ROIContourSequence[0].ContourSequence[1].NumberOfContourPoints = 5


def oblique(ds):
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = square(-6, 6, -6, 6, 0)[:-1] + [5.0]


def no_number(ds):
    del ds.StructureSetROISequence[2].ROINumber


for fix, word, what in ((bad_triples, r"7 values", "contour data that is not (x, y, z) triples"),
                        (bad_reference, r"Referenced ROI Number 99", "a contour of an undefined ROI"),
                        (bad_count, r"NumberOfContourPoints", "a wrong number of contour points"),
                        (no_number, r"item 3 of StructureSetROISequence.*no ROINumber", "an ROI without a number")):
    e = raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (base_dose, store(struct_object(fix=fix))), "22P02",
               f"a structure set with {what} is malformed", "malformed")
    like(e.diag.message_detail if e else None, word, f"the detail says where ({word})")

not_a_number = struct_object(rois=[(1, "Cube", [square(-6, 6, -6, 6, 777.125)])])
not_a_number = not_a_number.replace(b"777.125", b"7x7.125")
e = raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (base_dose, store(not_a_number)), "22P02",
           "contour data that is not a number is malformed", "malformed")
like(e.diag.message_detail if e else None, "not a number", "the detail says so")
raises(conn, "SELECT * FROM mdd.dvh(%s, %s)", (base_dose, store(struct_object(fix=oblique))), "22023",
       "a contour not parallel to the dose frames is refused", "not parallel")
is_(query_value(conn, "SELECT count(*) FROM mdd.dvh(%s, %s)", (base_dose, analytic_struct)), 8,
    "the server still answers after the bad inputs")

# ---------------------------------------------------------------------------
# archived: the same histograms from a file storage of the archive tier

execute(conn, "SELECT mdd.add_storage('archive95', 'file', 'archive', %s)", (f'{{"root": "{archive_root}"}}',))
job = query_value(conn, "SELECT mdd.archive(%s, 'archive95')", ([rtstruct],))
is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (job,)), "done", "the structure set, plan and dose are archived")
is_(dict(query(conn, "SELECT id, tier FROM mdd.objects WHERE id = ANY(%s)", ([rtdose, rtstruct],))),
    {rtdose: "archive", rtstruct: "archive"}, "both now live on the archive tier only")
is_deeply(comparable(dvh(rtdose, rtstruct)), comparable(got), "mdd.dvh of the archived objects: the same rows")

# ---------------------------------------------------------------------------
# roles and audit

execute(conn, "DROP ROLE IF EXISTS tap95reader")
execute(conn, "DROP ROLE IF EXISTS tap95nobody")
execute(conn, "CREATE ROLE tap95reader LOGIN IN ROLE mdd_reader")
execute(conn, "CREATE ROLE tap95nobody LOGIN")
reader = connect(user="tap95reader")
is_(len(dvh(base_dose, analytic_struct, c=reader)), 8, "a reader may compute a DVH")
reader.close()
nobody = connect(user="tap95nobody")
raises(nobody, "SELECT * FROM mdd.dvh(%s, %s)", (base_dose, analytic_struct), "42501",
       "a role without mdd_reader may not")
nobody.close()
is_(query_value(conn, """SELECT count(*) FROM mdd.audit_log WHERE action = 'dvh' AND role = 'tap95reader'
                          AND object_id = ANY(%s)""", ([base_dose, analytic_struct],)), 2,
    "the reader's DVH is in the audit log, once for each object read")
execute(conn, "DROP ROLE tap95reader")
execute(conn, "DROP ROLE tap95nobody")

conn.close()
done_testing()
