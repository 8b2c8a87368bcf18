#!/usr/bin/python3
"""Generate a deterministic synthetic radiotherapy patient for mdd tests and demos.

Writes a planning CT series, an RT Structure Set drawn on it, an RT Plan, an
RT Dose grid, a CBCT series from the first treatment day, optional small
Secondary Capture objects, a one-page PDF treatment summary and a
manifest.json that describes every file and the references between them.

The same arguments always produce byte-identical output: pixel noise comes
from a seeded numpy generator and every UID is derived from a hash of the
seed, the patient ID, a purpose string and an index.  The anatomy is a crude
analytic thorax phantom (body, fat layer, lungs, spine, sternum, couch and a
tumour in the right lung) so that contours and dose match the images.

Usage (Debian's python3-pydicom and python3-numpy are enough):

    /usr/bin/python3 scripts/generate_patient.py --out DIR [--slices 100]
        [--small 0] [--seed 1] [--patient-id MDD0001]
        [--patient-name "Demo^Patient"] [--no-pdf]
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
STUDY_COMPONENT_CLASS = "1.2.840.10008.3.1.2.3.1"  # used in RTReferencedStudySequence

MANUFACTURER = "MDD Synthetic"
INSTITUTION = "MDD Demo Clinic"
SOFTWARE_VERSION = "generate_patient 1.0"

# Planning CT geometry.
CT_SIZE = 512
CT_PIXEL_SPACING = 500.0 / CT_SIZE  # 0.9765625 mm, 500 mm field of view
CT_SLICE_THICKNESS = 2.5
CT_NOISE_HU = 15.0

# CBCT geometry (first treatment fraction).
CBCT_SIZE = 256
CBCT_SLICES = 40
CBCT_PIXEL_SPACING = 450.0 / CBCT_SIZE  # 1.7578125 mm
CBCT_SLICE_THICKNESS = 3.0
CBCT_NOISE_HU = 40.0
CBCT_SETUP_ERROR = (2.0, -1.5, 3.0)  # mm, patient offset seen on the CBCT

# Dose grid.
DOSE_COLUMNS = 64
DOSE_ROWS = 64
DOSE_MAX_FRAMES = 40
DOSE_COLUMN_SPACING = 6.0  # x, mm
DOSE_ROW_SPACING = 4.0  # y, mm
DOSE_FRAME_SPACING = 5.0  # z, mm

# Prescription and beams.
FRACTIONS = 30
DOSE_PER_FRACTION = 2.0  # Gy
GANTRY_ANGLES = (200.0, 250.0, 290.0, 330.0, 20.0)
SOURCE_AXIS_DISTANCE = 1000.0

# Small objects.
SMALL_SIZE = 64
SMALL_PER_SERIES = 500


# --------------------------------------------------------------------------
# Small helpers


def ds_str(value, decimals=6):
    """Format a number as a short DICOM DS string (at most 16 characters)."""
    text = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.8e}"
    return text


def ds_list(values, decimals=6):
    """Format a sequence of numbers as DS strings."""
    return [ds_str(v, decimals) for v in values]


def da(date):
    """Format a datetime.date as a DICOM DA string."""
    return date.strftime("%Y%m%d")


class UidFactory:
    """Derive stable "2.25.<int>" UIDs from the seed, patient ID and a purpose."""

    def __init__(self, seed, patient_id):
        self.key = f"mdd-synthetic|{seed}|{patient_id}"

    def __call__(self, purpose, index=0):
        """Return the UID for `purpose` (e.g. "ct-instance") and `index`."""
        digest = hashlib.sha256(f"{self.key}|{purpose}|{index}".encode()).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))


@dataclass
class Study:
    """Identifying attributes of one study."""

    uid: str
    date: datetime.date
    time: str
    description: str
    accession: str
    study_id: str


@dataclass
class Series:
    """Identifying attributes of one series."""

    uid: str
    number: int
    description: str
    modality: str


# --------------------------------------------------------------------------
# Anatomy


def _in_ellipse(X, Y, cx, cy, a, b):
    """Boolean mask of grid points inside an axis-aligned ellipse."""
    return ((X - cx) / a) ** 2 + ((Y - cy) / b) ** 2 <= 1.0


def _blur3(img):
    """3x3 box blur giving edges a little partial-volume softness."""
    p = np.pad(img, 1, mode="edge")
    acc = np.zeros_like(img)
    for dy in range(3):
        for dx in range(3):
            acc += p[dy:dy + img.shape[0], dx:dx + img.shape[1]]
    return acc / 9.0


@dataclass
class Phantom:
    """Analytic thorax in DICOM patient coordinates (mm, head-first supine).

    +x points to the patient's left, +y posterior, +z superior.
    """

    body_a: float
    body_b: float
    lung_dx: float
    lung_cy: float
    lung_a: float
    lung_b: float
    lung_zc: float
    lung_hz: float
    tumor: tuple
    gtv_r: float
    ptv_r: float

    @classmethod
    def from_rng(cls, rng):
        """Build a phantom with small seed-dependent variations."""
        j = rng.uniform(-1.0, 1.0, size=8)
        return cls(
            body_a=165.0 + 8.0 * j[0],
            body_b=110.0 + 5.0 * j[1],
            lung_dx=75.0 + 3.0 * j[2],
            lung_cy=-5.0,
            lung_a=52.0 + 3.0 * j[3],
            lung_b=72.0 + 3.0 * j[4],
            lung_zc=20.0,
            lung_hz=110.0,
            tumor=(round(-72.0 + 6.0 * j[5], 1), round(-8.0 + 6.0 * j[6], 1),
                   round(5.0 * j[7], 1)),
            gtv_r=15.0,
            ptv_r=25.0,
        )

    def body(self, z):
        """Body outline ellipse (cx, cy, a, b) at height z."""
        return (0.0, 0.0, self.body_a + 6.0 * math.sin(z / 80.0),
                self.body_b + 4.0 * math.cos(z / 110.0))

    @property
    def couch_top(self):
        """y coordinate of the couch top surface (below the patient)."""
        return self.body_b + 10.0

    def lung(self, side, z):
        """Lung ellipse (cx, cy, a, b) for side "L" or "R", or None if absent."""
        u = (z - self.lung_zc) / self.lung_hz
        if abs(u) >= 1.0:
            return None
        s = (1.0 - u * u) ** 0.5
        if s < 0.25:
            return None
        cx = self.lung_dx if side == "L" else -self.lung_dx
        return (cx, self.lung_cy, self.lung_a * s ** 0.5, self.lung_b * s ** 0.5)

    def _sphere(self, r, z):
        """Cross-section (cx, cy, radius) of a tumour-centred sphere, or None."""
        dz = z - self.tumor[2]
        if abs(dz) >= r - 0.5:
            return None
        return (self.tumor[0], self.tumor[1], math.sqrt(r * r - dz * dz))

    def gtv(self, z):
        """Gross tumour cross-section at z."""
        return self._sphere(self.gtv_r, z)

    def ptv(self, z):
        """Planning target volume cross-section at z (GTV + 10 mm)."""
        return self._sphere(self.ptv_r, z)

    @staticmethod
    def cord(z):
        """Spinal cord cross-section (cx, cy, radius) at z."""
        return (0.0, 68.0 + 0.02 * z, 6.0)

    def hu(self, xs, ys, z):
        """Noise-free Hounsfield units on the grid xs (columns) x ys (rows)."""
        X = xs[None, :]
        Y = ys[:, None]
        img = np.full((len(ys), len(xs)), -1000.0, dtype=np.float32)
        top = self.couch_top
        img[(Y >= top) & (Y <= top + 8.0) & (np.abs(X) <= 240.0)] = -250.0
        cx, cy, a, b = self.body(z)
        img[_in_ellipse(X, Y, cx, cy, a, b)] = -90.0  # subcutaneous fat
        img[_in_ellipse(X, Y, cx, cy, a - 14.0, b - 12.0)] = 40.0  # soft tissue
        for side in ("L", "R"):
            lung = self.lung(side, z)
            if lung:
                img[_in_ellipse(X, Y, *lung)] = -820.0
        gtv = self.gtv(z)
        if gtv:
            img[_in_ellipse(X, Y, gtv[0], gtv[1], gtv[2], gtv[2])] = 35.0
        img[_in_ellipse(X, Y, 0.0, -b + 22.0, 16.0, 6.0)] = 550.0  # sternum
        ccx, ccy, cr = self.cord(z)
        img[_in_ellipse(X, Y, ccx, ccy - 30.0, 17.0, 15.0)] = 700.0  # vertebral body
        img[_in_ellipse(X, Y, ccx, ccy, cr + 7.0, cr + 7.0)] = 700.0  # arch
        img[_in_ellipse(X, Y, ccx, ccy + 14.0, 4.0, 9.0)] = 700.0  # spinous process
        img[_in_ellipse(X, Y, ccx, ccy, cr + 1.5, cr + 1.5)] = 15.0  # canal (CSF)
        img[_in_ellipse(X, Y, ccx, ccy, cr, cr)] = 35.0  # cord
        return _blur3(img)


def ellipse_polygon(cx, cy, a, b, z, n):
    """Closed planar polygon (flat x,y,z list) approximating an ellipse."""
    t = np.arange(n) * (2.0 * math.pi / n)
    pts = np.empty((n, 3))
    pts[:, 0] = cx + a * np.cos(t)
    pts[:, 1] = cy + b * np.sin(t)
    pts[:, 2] = z
    return pts.ravel().tolist()


# --------------------------------------------------------------------------
# Generator


class Generator:
    """Builds and writes all objects of one synthetic patient."""

    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.uid = UidFactory(args.seed, args.patient_id)
        self.phantom = Phantom.from_rng(np.random.default_rng([args.seed, 0]))
        self.files = []
        self.references = []
        self.impl_uid = self.uid("implementation")

        digest = hashlib.sha256(f"{args.seed}|{args.patient_id}".encode()).digest()
        self.sex = "MF"[digest[0] % 2]
        self.birth_date = datetime.date(1940, 1, 1) + datetime.timedelta(
            days=int.from_bytes(digest[1:3], "big") % (40 * 365))
        plan_day = datetime.date(2024, 1, 8) + datetime.timedelta(days=(args.seed * 37) % 300)
        self.ct_study = Study(self.uid("study", 1), plan_day, "091500",
                              "RT planning CT thorax", f"A{args.seed:06d}1", "1")
        self.tx_study = Study(self.uid("study", 2), plan_day + datetime.timedelta(days=14),
                              "074500", "Treatment imaging", f"A{args.seed:06d}2", "2")
        self.ct_series = Series(self.uid("series", "ct"), 1, "Planning CT 2.5mm", "CT")
        self.struct_series = Series(self.uid("series", "rtstruct"), 2, "Structures", "RTSTRUCT")
        self.plan_series = Series(self.uid("series", "rtplan"), 3, "Plan", "RTPLAN")
        self.dose_series = Series(self.uid("series", "rtdose"), 4, "Dose", "RTDOSE")
        self.cbct_series = Series(self.uid("series", "cbct"), 1, "CBCT Fx1", "CT")
        self.for_ct = self.uid("frame-of-reference", "ct")
        self.for_cbct = self.uid("frame-of-reference", "cbct")
        self.ct_slices = []  # (sop_instance_uid, z) per written CT slice
        self.isocenter = tuple(float(round(v)) for v in self.phantom.tumor)

    # ---- common DICOM plumbing -------------------------------------------

    def base_dataset(self, study, series, sop_class, sop_uid, station, content_date,
                     content_time):
        """Dataset with SOP common, patient, study, series and equipment modules."""
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.InstanceCreationDate = da(content_date)
        ds.InstanceCreationTime = content_time
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = da(study.date)
        ds.SeriesDate = da(content_date)
        ds.ContentDate = da(content_date)
        ds.StudyTime = study.time
        ds.SeriesTime = content_time
        ds.ContentTime = content_time
        ds.AccessionNumber = study.accession
        ds.Modality = series.modality
        ds.Manufacturer = MANUFACTURER
        ds.InstitutionName = INSTITUTION
        ds.ReferringPhysicianName = "Referrer^Demo"
        ds.StationName = station
        ds.StudyDescription = study.description
        ds.SeriesDescription = series.description
        ds.OperatorsName = "Operator^Demo"
        ds.ManufacturerModelName = "Synthetic"
        ds.PatientName = self.args.patient_name
        ds.PatientID = self.args.patient_id
        ds.PatientBirthDate = da(self.birth_date)
        ds.PatientSex = self.sex
        ds.DeviceSerialNumber = "0001"
        ds.SoftwareVersions = SOFTWARE_VERSION
        ds.StudyInstanceUID = study.uid
        ds.SeriesInstanceUID = series.uid
        ds.StudyID = study.study_id
        ds.SeriesNumber = series.number
        return ds

    def write(self, relpath, ds, kind="dicom"):
        """Write `ds` as Explicit VR Little Endian Part 10 and record it."""
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = self.impl_uid
        meta.ImplementationVersionName = "MDD_SYNTH_1"
        ds.file_meta = meta
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        path = os.path.join(self.out, relpath)
        ds.save_as(path, write_like_original=False)
        self.files.append({
            "path": relpath,
            "kind": kind,
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "sop_class_uid": str(ds.SOPClassUID),
            "series_instance_uid": str(ds.SeriesInstanceUID),
            "study_instance_uid": str(ds.StudyInstanceUID),
            "modality": str(ds.Modality),
            "size": os.path.getsize(path),
        })

    def reference(self, from_uid, kind, uid):
        """Record one reference for the manifest."""
        self.references.append({"from": from_uid, "kind": kind, "uid": uid})

    @staticmethod
    def set_pixels(ds, array):
        """Store a numpy array as native (OW) pixel data."""
        ds[0x7FE00010] = DataElement(0x7FE00010, "OW", array.tobytes())

    # ---- image series ------------------------------------------------------

    def image_template(self, study, series, frame_uid, station, size, spacing, thickness,
                       content_time):
        """CT Image Storage template shared by all slices of one series."""
        ds = self.base_dataset(study, series, CT_IMAGE_STORAGE, "", station, study.date,
                               content_time)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionDate = da(study.date)
        ds.AcquisitionTime = content_time
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = ds_str(thickness)
        ds.KVP = "120"
        ds.ReconstructionDiameter = ds_str(size * spacing)
        ds.GantryDetectorTilt = "0"
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.PixelSpacing = [ds_str(spacing, 8), ds_str(spacing, 8)]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        return ds

    @staticmethod
    def to_stored(hu):
        """Convert HU to 12-bit unsigned stored values (intercept -1024)."""
        return np.clip(np.rint(hu) + 1024.0, 0, 4095).astype("<u2")

    def write_ct(self):
        """Write the planning CT series into ct/."""
        n = self.args.slices
        ds = self.image_template(self.ct_study, self.ct_series, self.for_ct, "CTSIM1",
                                 CT_SIZE, CT_PIXEL_SPACING, CT_SLICE_THICKNESS, "092000")
        ds.ManufacturerModelName = "SynthCT 64"
        ds.XRayTubeCurrent = 250
        ds.ExposureTime = 1000
        coords = (np.arange(CT_SIZE) - (CT_SIZE - 1) / 2.0) * CT_PIXEL_SPACING
        rng = np.random.default_rng([self.args.seed, 1])
        for i in range(n):
            z = (i - (n - 1) / 2.0) * CT_SLICE_THICKNESS
            hu = self.phantom.hu(coords, coords, z)
            hu += rng.standard_normal(hu.shape, dtype=np.float32) * CT_NOISE_HU
            uid = self.uid("ct-instance", i + 1)
            ds.SOPInstanceUID = uid
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = ds_list([coords[0], coords[0], z], 8)
            ds.SliceLocation = ds_str(z)
            self.set_pixels(ds, self.to_stored(hu))
            self.write(f"ct/CT_{i + 1:04d}.dcm", ds)
            self.ct_slices.append((uid, z))

    def write_cbct(self):
        """Write the day-1 CBCT series (own study and frame of reference) into cbct/."""
        ds = self.image_template(self.tx_study, self.cbct_series, self.for_cbct, "LINAC1",
                                 CBCT_SIZE, CBCT_PIXEL_SPACING, CBCT_SLICE_THICKNESS,
                                 "075000")
        ds.ManufacturerModelName = "SynthLinac OBI"
        ds.KVP = "100"
        ds.ConvolutionKernel = "CBCT"
        # as linac imaging systems mark their cone-beam CTs
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "CBCT"]
        coords = (np.arange(CBCT_SIZE) - (CBCT_SIZE - 1) / 2.0) * CBCT_PIXEL_SPACING
        # CBCT coordinates have the isocentre at the origin; the patient is a
        # little off the planned position (setup error).
        ox, oy, oz = (i + e for i, e in zip(self.isocenter, CBCT_SETUP_ERROR))
        r2 = coords[None, :] ** 2 + coords[:, None] ** 2
        fov_r2 = (CBCT_SIZE * CBCT_PIXEL_SPACING / 2.0) ** 2
        cupping = (-45.0 * (1.0 - r2 / fov_r2)).astype(np.float32)
        outside = r2 > fov_r2
        rng = np.random.default_rng([self.args.seed, 2])
        for i in range(CBCT_SLICES):
            z = (i - (CBCT_SLICES - 1) / 2.0) * CBCT_SLICE_THICKNESS
            hu = self.phantom.hu(coords + ox, coords + oy, z + oz)
            hu += np.where(hu > -500.0, cupping, 0.0)
            hu += rng.standard_normal(hu.shape, dtype=np.float32) * CBCT_NOISE_HU
            hu[outside] = -1000.0
            ds.SOPInstanceUID = self.uid("cbct-instance", i + 1)
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = ds_list([coords[0], coords[0], z], 8)
            ds.SliceLocation = ds_str(z)
            self.set_pixels(ds, self.to_stored(hu))
            self.write(f"cbct/CBCT_{i + 1:04d}.dcm", ds)

    # ---- RT objects --------------------------------------------------------

    def roi_definitions(self):
        """(number, name, interpreted type, colour, cross-section fn, points)."""
        p = self.phantom
        return [
            (1, "BODY", "EXTERNAL", [0, 255, 0], p.body, 96),
            (2, "PTV", "PTV", [255, 0, 0], lambda z: self._circle(p.ptv(z)), 48),
            (3, "SpinalCord", "ORGAN", [255, 255, 0], lambda z: self._circle(p.cord(z)), 24),
            (4, "Lung_L", "ORGAN", [0, 128, 255], lambda z: p.lung("L", z), 64),
        ]

    @staticmethod
    def _circle(c):
        """Turn (cx, cy, r) into an ellipse tuple (cx, cy, r, r)."""
        return None if c is None else (c[0], c[1], c[2], c[2])

    def write_rtstruct(self):
        """Write rtstruct.dcm with four ROIs contoured on every CT slice."""
        uid = self.uid("rtstruct-instance")
        date = self.ct_study.date + datetime.timedelta(days=2)
        ds = self.base_dataset(self.ct_study, self.struct_series, RT_STRUCT_STORAGE, uid,
                               "TPS1", date, "140000")
        ds.InstanceNumber = 1
        ds.StructureSetLabel = "RTLUNG"
        ds.StructureSetName = "Thorax structures"
        ds.StructureSetDate = da(date)
        ds.StructureSetTime = "140000"

        contour_images = []
        for sop_uid, _ in self.ct_slices:
            item = Dataset()
            item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
            item.ReferencedSOPInstanceUID = sop_uid
            contour_images.append(item)
        series_item = Dataset()
        series_item.SeriesInstanceUID = self.ct_series.uid
        series_item.ContourImageSequence = contour_images
        study_item = Dataset()
        study_item.ReferencedSOPClassUID = STUDY_COMPONENT_CLASS
        study_item.ReferencedSOPInstanceUID = self.ct_study.uid
        study_item.RTReferencedSeriesSequence = [series_item]
        frame_item = Dataset()
        frame_item.FrameOfReferenceUID = self.for_ct
        frame_item.RTReferencedStudySequence = [study_item]
        ds.ReferencedFrameOfReferenceSequence = [frame_item]

        rois, roi_contours, observations = [], [], []
        for number, name, rtype, colour, section, npts in self.roi_definitions():
            roi = Dataset()
            roi.ROINumber = number
            roi.ReferencedFrameOfReferenceUID = self.for_ct
            roi.ROIName = name
            roi.ROIGenerationAlgorithm = "AUTOMATIC" if number in (1, 4) else "MANUAL"
            rois.append(roi)

            contours = []
            for sop_uid, z in self.ct_slices:
                shape = section(z)
                if shape is None:
                    continue
                image = Dataset()
                image.ReferencedSOPClassUID = CT_IMAGE_STORAGE
                image.ReferencedSOPInstanceUID = sop_uid
                contour = Dataset()
                contour.ContourNumber = len(contours) + 1
                contour.ContourImageSequence = [image]
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = npts
                contour.ContourData = ds_list(ellipse_polygon(*shape, z, npts), 2)
                contours.append(contour)
            roi_contour = Dataset()
            roi_contour.ROIDisplayColor = colour
            if contours:
                roi_contour.ContourSequence = contours
            roi_contour.ReferencedROINumber = number
            roi_contours.append(roi_contour)

            obs = Dataset()
            obs.ObservationNumber = number
            obs.ReferencedROINumber = number
            obs.ROIObservationLabel = name
            obs.RTROIInterpretedType = rtype
            obs.ROIInterpreter = ""
            observations.append(obs)
        ds.StructureSetROISequence = rois
        ds.ROIContourSequence = roi_contours
        ds.RTROIObservationsSequence = observations
        ds.ApprovalStatus = "APPROVED"
        ds.ReviewDate = da(date)
        ds.ReviewTime = "150000"
        ds.ReviewerName = "Physician^Demo"
        self.write("rtstruct.dcm", ds)

        self.reference(uid, "series", self.ct_series.uid)
        for sop_uid, _ in self.ct_slices:
            self.reference(uid, "instance", sop_uid)
        self.reference(uid, "frame_of_reference", self.for_ct)
        self.rtstruct_uid = uid

    def beam_geometry(self, gantry):
        """Return (unit direction source->iso, source point, SSD) for a gantry angle."""
        th = math.radians(gantry)
        iso = np.array(self.isocenter)
        d = np.array([-math.sin(th), math.cos(th), 0.0])
        src = iso - SOURCE_AXIS_DISTANCE * d
        cx, cy, a, b = self.phantom.body(iso[2])
        # Solve |((src + t d) - c) / (a, b)| = 1 for the entry point.
        px, py = (src[0] - cx) / a, (src[1] - cy) / b
        qx, qy = d[0] / a, d[1] / b
        qa, qb, qc = qx * qx + qy * qy, 2 * (px * qx + py * qy), px * px + py * py - 1
        t = (-qb - math.sqrt(max(qb * qb - 4 * qa * qc, 0.0))) / (2 * qa)
        return d, src, t

    @staticmethod
    def depth_dose(depth):
        """Crude 6 MV depth dose (relative), zero upstream of the surface."""
        depth = np.asarray(depth, dtype=np.float64)
        pdd = (1.0 - 0.75 * np.exp(-np.maximum(depth, 0.0) / 6.0)) * np.exp(
            -0.0046 * (depth - 15.0))
        return np.where(depth > 0.0, pdd, 0.0)

    @staticmethod
    def mlc_boundaries():
        """Leaf boundaries of a 120-leaf MLC (60 pairs, 5 mm centre leaves)."""
        return ([-200.0 + 10.0 * k for k in range(10)] + [-100.0 + 5.0 * k for k in range(40)]
                + [100.0 + 10.0 * k for k in range(11)])

    def field_radius(self):
        """Radius of the conformal field at isocentre: PTV + 5 mm."""
        return self.phantom.ptv_r + 5.0

    def write_rtplan(self):
        """Write rtplan.dcm: five static 6 MV photon beams, 30 fractions."""
        uid = self.uid("rtplan-instance")
        date = self.ct_study.date + datetime.timedelta(days=5)
        ds = self.base_dataset(self.ct_study, self.plan_series, RT_PLAN_STORAGE, uid,
                               "TPS1", date, "110000")
        ds.InstanceNumber = 1
        ds.FrameOfReferenceUID = self.for_ct
        ds.PositionReferenceIndicator = ""
        ds.RTPlanLabel = "LUNG_R_60Gy"
        ds.RTPlanName = "Right lung 60Gy/30"
        ds.RTPlanDate = da(date)
        ds.RTPlanTime = "110000"
        ds.PlanIntent = "CURATIVE"
        ds.RTPlanGeometry = "PATIENT"
        ref_ss = Dataset()
        ref_ss.ReferencedSOPClassUID = RT_STRUCT_STORAGE
        ref_ss.ReferencedSOPInstanceUID = self.rtstruct_uid
        ds.ReferencedStructureSetSequence = [ref_ss]

        dose_ref = Dataset()
        dose_ref.DoseReferenceNumber = 1
        dose_ref.DoseReferenceUID = self.uid("dose-reference")
        dose_ref.DoseReferenceStructureType = "SITE"
        dose_ref.DoseReferenceDescription = "PTV"
        dose_ref.DoseReferenceType = "TARGET"
        dose_ref.TargetPrescriptionDose = ds_str(FRACTIONS * DOSE_PER_FRACTION)
        ds.DoseReferenceSequence = [dose_ref]

        tol = Dataset()
        tol.ToleranceTableNumber = 1
        tol.ToleranceTableLabel = "T1"
        tol.GantryAngleTolerance = "1"
        tol.BeamLimitingDeviceAngleTolerance = "1"
        tol.PatientSupportAngleTolerance = "1"
        tol.TableTopVerticalPositionTolerance = "10"
        tol.TableTopLongitudinalPositionTolerance = "10"
        tol.TableTopLateralPositionTolerance = "10"
        ds.ToleranceTableSequence = [tol]

        beam_dose = DOSE_PER_FRACTION / len(GANTRY_ANGLES)
        ref_beams, beams = [], []
        self.beams = []
        boundaries = self.mlc_boundaries()
        w = self.field_radius()
        jaw = float(math.ceil(w))
        for number, gantry in enumerate(GANTRY_ANGLES, start=1):
            d, src, ssd = self.beam_geometry(gantry)
            depth = SOURCE_AXIS_DISTANCE - ssd
            meterset = round(100.0 * beam_dose / float(self.depth_dose(depth)), 2)
            self.beams.append((gantry, d, src, ssd))

            ref = Dataset()
            ref.BeamDose = ds_str(beam_dose)
            ref.BeamMeterset = ds_str(meterset)
            ref.ReferencedBeamNumber = number
            ref_beams.append(ref)

            beam = Dataset()
            beam.Manufacturer = MANUFACTURER
            beam.InstitutionName = INSTITUTION
            beam.TreatmentMachineName = "LINAC1"
            beam.PrimaryDosimeterUnit = "MU"
            beam.SourceAxisDistance = ds_str(SOURCE_AXIS_DISTANCE)
            devices = []
            for kind, pairs in (("ASYMX", 1), ("ASYMY", 1), ("MLCX", 60)):
                dev = Dataset()
                dev.RTBeamLimitingDeviceType = kind
                dev.NumberOfLeafJawPairs = pairs
                if kind == "MLCX":
                    dev.LeafPositionBoundaries = ds_list(boundaries)
                devices.append(dev)
            beam.BeamLimitingDeviceSequence = devices
            beam.BeamNumber = number
            beam.BeamName = f"G{int(gantry):03d}"
            beam.BeamDescription = f"6MV static field gantry {int(gantry)}"
            beam.BeamType = "STATIC"
            beam.RadiationType = "PHOTON"
            beam.TreatmentDeliveryType = "TREATMENT"
            beam.NumberOfWedges = 0
            beam.NumberOfCompensators = 0
            beam.NumberOfBoli = 0
            beam.NumberOfBlocks = 0
            beam.FinalCumulativeMetersetWeight = "1"
            beam.NumberOfControlPoints = 2

            cp0 = Dataset()
            cp0.ControlPointIndex = 0
            cp0.NominalBeamEnergy = "6"
            cp0.DoseRateSet = "600"
            positions = []
            for kind, values in (("ASYMX", [-jaw, jaw]), ("ASYMY", [-jaw, jaw]),
                                 ("MLCX", self.leaf_positions(boundaries, w))):
                pos = Dataset()
                pos.RTBeamLimitingDeviceType = kind
                pos.LeafJawPositions = ds_list(values, 1)
                positions.append(pos)
            cp0.BeamLimitingDevicePositionSequence = positions
            cp0.GantryAngle = ds_str(gantry)
            cp0.GantryRotationDirection = "NONE"
            cp0.BeamLimitingDeviceAngle = "0"
            cp0.BeamLimitingDeviceRotationDirection = "NONE"
            cp0.PatientSupportAngle = "0"
            cp0.PatientSupportRotationDirection = "NONE"
            cp0.TableTopEccentricAngle = "0"
            cp0.TableTopEccentricRotationDirection = "NONE"
            cp0.IsocenterPosition = ds_list(self.isocenter, 1)
            cp0.SourceToSurfaceDistance = ds_str(ssd, 1)
            cp0.CumulativeMetersetWeight = "0"
            cp1 = Dataset()
            cp1.ControlPointIndex = 1
            cp1.CumulativeMetersetWeight = "1"
            beam.ControlPointSequence = [cp0, cp1]
            beam.ReferencedPatientSetupNumber = 1
            beam.ReferencedToleranceTableNumber = 1
            beams.append(beam)

        fg = Dataset()
        fg.FractionGroupNumber = 1
        fg.NumberOfFractionsPlanned = FRACTIONS
        fg.NumberOfBeams = len(beams)
        fg.NumberOfBrachyApplicationSetups = 0
        fg.ReferencedBeamSequence = ref_beams
        ds.FractionGroupSequence = [fg]
        ds.BeamSequence = beams
        setup = Dataset()
        setup.PatientPosition = "HFS"
        setup.PatientSetupNumber = 1
        setup.SetupTechnique = "ISOCENTRIC"
        ds.PatientSetupSequence = [setup]
        ds.ApprovalStatus = "APPROVED"
        ds.ReviewDate = da(date)
        ds.ReviewTime = "160000"
        ds.ReviewerName = "Physician^Demo"
        self.write("rtplan.dcm", ds)
        self.reference(uid, "instance", self.rtstruct_uid)
        self.rtplan_uid = uid

    @staticmethod
    def leaf_positions(boundaries, radius):
        """MLC bank A then bank B positions conforming to a circle of `radius`."""
        bank_a, bank_b = [], []
        for lo, hi in zip(boundaries[:-1], boundaries[1:]):
            if hi <= -radius or lo >= radius:
                half = 0.0  # closed, hidden behind the jaws
            elif lo <= 0.0 <= hi:
                half = radius
            else:
                near = min(abs(lo), abs(hi))
                half = math.sqrt(radius * radius - near * near)
            bank_a.append(-round(half, 1))
            bank_b.append(round(half, 1))
        return bank_a + bank_b

    def dose_grid_geometry(self):
        """Return (x coords, y coords, z coords) of the dose grid voxel centres."""
        xs = (np.arange(DOSE_COLUMNS) - (DOSE_COLUMNS - 1) / 2.0) * DOSE_COLUMN_SPACING
        ys = (np.arange(DOSE_ROWS) - (DOSE_ROWS - 1) / 2.0) * DOSE_ROW_SPACING
        z_lo, z_hi = self.ct_slices[0][1], self.ct_slices[-1][1]
        frames = max(1, min(DOSE_MAX_FRAMES, int((z_hi - z_lo) // DOSE_FRAME_SPACING) + 1))
        extent = (frames - 1) * DOSE_FRAME_SPACING
        z0 = min(max(self.isocenter[2] - extent / 2.0, z_lo), z_hi - extent)
        zs = z0 + np.arange(frames) * DOSE_FRAME_SPACING
        return xs, ys, zs

    def compute_dose(self, xs, ys, zs):
        """Total plan dose (Gy) on the grid: sum of simple pencil-free beam models."""
        Z, Y, X = np.meshgrid(zs, ys, xs, indexing="ij")
        pts = np.stack([X, Y, Z], axis=-1)
        iso = np.array(self.isocenter)
        w = self.field_radius()
        total = np.zeros(X.shape)
        per_beam = FRACTIONS * DOSE_PER_FRACTION / len(self.beams)

        def beam_dose(p, d, ssd):
            along = (p - iso) @ d  # signed distance past the isocentre plane
            lateral = np.linalg.norm((p - iso) - along[..., None] * d, axis=-1)
            dist = SOURCE_AXIS_DISTANCE + along
            half = w * dist / SOURCE_AXIS_DISTANCE
            profile = 1.0 / (1.0 + np.exp((lateral - half) / 2.5))
            profile += 0.04 * np.exp(-np.maximum(lateral - half, 0.0) / 25.0)
            depth = dist - ssd
            return self.depth_dose(depth) * profile * (SOURCE_AXIS_DISTANCE / dist) ** 2

        for _, d, _, ssd in self.beams:
            at_iso = beam_dose(iso[None, :], d, ssd)[0]
            total += per_beam * beam_dose(pts, d, ssd) / at_iso
        for k, z in enumerate(zs):
            cx, cy, a, b = self.phantom.body(z)
            total[k][~_in_ellipse(xs[None, :], ys[:, None], cx, cy, a, b)] = 0.0
        return total

    def write_rtdose(self):
        """Write rtdose.dcm: a 3D plan dose grid referencing the plan."""
        uid = self.uid("rtdose-instance")
        date = self.ct_study.date + datetime.timedelta(days=5)
        ds = self.base_dataset(self.ct_study, self.dose_series, RT_DOSE_STORAGE, uid,
                               "TPS1", date, "111500")
        xs, ys, zs = self.dose_grid_geometry()
        dose = self.compute_dose(xs, ys, zs)
        scaling = float(f"{dose.max() / 4.0e6:.6e}") if dose.max() > 0 else 1.0e-5
        stored = np.rint(dose / scaling).astype("<u4")

        ds.InstanceNumber = 1
        ds.FrameOfReferenceUID = self.for_ct
        ds.PositionReferenceIndicator = ""
        ds.SliceThickness = ds_str(DOSE_FRAME_SPACING)
        ds.ImagePositionPatient = ds_list([xs[0], ys[0], zs[0]])
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.NumberOfFrames = len(zs)
        ds.FrameIncrementPointer = Tag("GridFrameOffsetVector")
        ds.Rows = DOSE_ROWS
        ds.Columns = DOSE_COLUMNS
        ds.PixelSpacing = [ds_str(DOSE_ROW_SPACING), ds_str(DOSE_COLUMN_SPACING)]
        ds.BitsAllocated = 32
        ds.BitsStored = 32
        ds.HighBit = 31
        ds.PixelRepresentation = 0
        ds.DoseUnits = "GY"
        ds.DoseType = "PHYSICAL"
        ds.DoseComment = "Synthetic plan dose"
        ds.DoseSummationType = "PLAN"
        ds.GridFrameOffsetVector = ds_list(zs - zs[0])
        ds.DoseGridScaling = f"{scaling:.6e}"
        ds.TissueHeterogeneityCorrection = "IMAGE"
        ref_plan = Dataset()
        ref_plan.ReferencedSOPClassUID = RT_PLAN_STORAGE
        ref_plan.ReferencedSOPInstanceUID = self.rtplan_uid
        ds.ReferencedRTPlanSequence = [ref_plan]
        self.set_pixels(ds, stored)
        self.write("rtdose.dcm", ds)
        self.reference(uid, "instance", self.rtplan_uid)
        self.rtdose_uid = uid
        self.max_dose = float(dose.max())

    # ---- small objects and document ----------------------------------------

    def write_small(self):
        """Write --small Secondary Capture snapshots (64x64, ~10 KiB) into small/."""
        n = self.args.small
        if n <= 0:
            return
        # Thumbnail of the central CBCT anatomy, 4x4 block-averaged to 64x64.
        coords = (np.arange(CBCT_SIZE) - (CBCT_SIZE - 1) / 2.0) * CBCT_PIXEL_SPACING
        iso = self.isocenter
        base = self.phantom.hu(coords + iso[0], coords + iso[1], iso[2])
        f = CBCT_SIZE // SMALL_SIZE
        base = base.reshape(SMALL_SIZE, f, SMALL_SIZE, f).mean(axis=(1, 3))
        rng = np.random.default_rng([self.args.seed, 3])
        ds = None
        for i in range(n):
            if i % SMALL_PER_SERIES == 0:
                k = i // SMALL_PER_SERIES + 1
                series = Series(self.uid("series", f"small-{k}"), 100 + k,
                                f"Snapshots {k}", "OT")
                ds = self.base_dataset(self.tx_study, series, SECONDARY_CAPTURE_STORAGE, "",
                                       "LINAC1", self.tx_study.date, "080000")
                ds.ConversionType = "WSD"
                ds.PatientOrientation = ["L", "P"]
                ds.ImageType = ["DERIVED", "SECONDARY"]
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.Rows = SMALL_SIZE
                ds.Columns = SMALL_SIZE
                ds.BitsAllocated = 16
                ds.BitsStored = 12
                ds.HighBit = 11
                ds.PixelRepresentation = 0
                ds.WindowCenter = "1064"
                ds.WindowWidth = "400"
            img = base + rng.standard_normal(base.shape, dtype=np.float32) * 20.0
            ds.SOPInstanceUID = self.uid("small-instance", i + 1)
            ds.InstanceNumber = i % SMALL_PER_SERIES + 1
            ds.ImageComments = f"Synthetic snapshot {i + 1} of {n}"
            self.set_pixels(ds, self.to_stored(img))
            self.write(f"small/SMALL_{i + 1:05d}.dcm", ds)

    def write_pdf(self):
        """Write document.pdf, a one-page treatment summary."""
        a = self.args
        iso = ", ".join(ds_str(v, 1) for v in self.isocenter)
        lines = [
            f"Patient ID: {a.patient_id}    Birth date: {da(self.birth_date)}    Sex: {self.sex}",
            f"Planning CT: {da(self.ct_study.date)}, {a.slices} axial slices of "
            f"{CT_SLICE_THICKNESS} mm",
            f"Plan LUNG_R_60Gy: {FRACTIONS * DOSE_PER_FRACTION:g} Gy in {FRACTIONS} fractions "
            f"of {DOSE_PER_FRACTION:g} Gy",
            f"Beams: {len(GANTRY_ANGLES)} x 6 MV photons, gantry "
            + ", ".join(f"{g:g}" for g in GANTRY_ANGLES),
            f"Target: PTV (right lung), isocentre ({iso}) mm",
            f"Maximum plan dose: {self.max_dose:.1f} Gy",
            f"First fraction with CBCT: {da(self.tx_study.date)}",
            "Synthetic data generated for testing; not a real patient.",
        ]
        data = build_pdf(f"Treatment summary for {a.patient_name}", lines)
        with open(os.path.join(self.out, "document.pdf"), "wb") as fh:
            fh.write(data)
        self.files.append({
            "path": "document.pdf",
            "kind": "document",
            "mime_type": "application/pdf",
            "sop_instance_uid": None,
            "sop_class_uid": None,
            "series_instance_uid": None,
            "study_instance_uid": None,
            "modality": None,
            "size": len(data),
        })

    # ---- manifest ----------------------------------------------------------

    def related(self):
        """Objects reaching each key object by following references backwards."""
        members = defaultdict(list)
        for f in self.files:
            if f["series_instance_uid"]:
                members[f["series_instance_uid"]].append(f["sop_instance_uid"])
        referrers = defaultdict(set)
        for ref in self.references:
            if ref["kind"] == "instance":
                referrers[ref["uid"]].add(ref["from"])
            elif ref["kind"] == "series":
                for member in members[ref["uid"]]:
                    referrers[member].add(ref["from"])
        result = {}
        for key in (self.ct_slices[0][0], self.rtstruct_uid, self.rtplan_uid,
                    self.rtdose_uid):
            seen, todo = set(), [key]
            while todo:
                for r in referrers[todo.pop()]:
                    if r not in seen and r != key:
                        seen.add(r)
                        todo.append(r)
            result[key] = sorted(seen)
        return result

    def write_manifest(self):
        """Write manifest.json describing files, references and relations."""
        manifest = {
            "patient_id": self.args.patient_id,
            "patient_name": self.args.patient_name,
            "seed": self.args.seed,
            "files": self.files,
            "references": self.references,
            "related": self.related(),
        }
        with open(os.path.join(self.out, "manifest.json"), "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2)
            fh.write("\n")

    # ---- driver -------------------------------------------------------------

    def prepare_output(self):
        """Create the output tree and remove files left by an earlier run."""
        patterns = {"ct": r"CT_\d+\.dcm", "cbct": r"CBCT_\d+\.dcm", "small": r"SMALL_\d+\.dcm"}
        os.makedirs(self.out, exist_ok=True)
        for sub, pattern in patterns.items():
            path = os.path.join(self.out, sub)
            os.makedirs(path, exist_ok=True)
            for name in os.listdir(path):
                if re.fullmatch(pattern, name):
                    os.remove(os.path.join(path, name))
        stale = os.path.join(self.out, "document.pdf")
        if os.path.exists(stale):
            os.remove(stale)

    def run(self):
        """Generate everything and return the list of written files."""
        self.prepare_output()
        self.write_ct()
        self.write_rtstruct()
        self.write_rtplan()
        self.write_rtdose()
        self.write_cbct()
        self.write_small()
        if not self.args.no_pdf:
            self.write_pdf()
        self.write_manifest()
        return self.files


def pdf_escape(text):
    """Escape a string for a PDF literal and encode it as Latin-1."""
    text = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return text.encode("latin-1", errors="replace")


def build_pdf(title, lines):
    """Build a minimal one-page PDF 1.4 (Helvetica text) with a correct xref table."""
    content = b"BT\n/F1 16 Tf\n72 760 Td\n(" + pdf_escape(title) + b") Tj\n/F1 11 Tf\n"
    for i, line in enumerate(lines):
        content += (b"0 -30 Td\n" if i == 0 else b"0 -16 Td\n") + b"(" + pdf_escape(line) + b") Tj\n"
    content += b"ET\n"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length " + str(len(content)).encode() + b" >>\nstream\n" + content
        + b"endstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Title (" + pdf_escape(title) + b") /Producer (mdd generate_patient.py) >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n".encode()
    out += b"0000000000 65535 f \n"
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info {len(objects)} 0 R >>\n"
            f"startxref\n{xref}\n%%EOF\n").encode()
    return bytes(out)


def parse_args(argv):
    """Parse and validate the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (created if needed)")
    parser.add_argument("--slices", type=int, default=100, help="planning CT slices")
    parser.add_argument("--small", type=int, default=0,
                        help="number of small (~10 KiB) Secondary Capture objects")
    parser.add_argument("--seed", type=int, default=1, help="seed for pixels and UIDs")
    parser.add_argument("--patient-id", default="MDD0001")
    parser.add_argument("--patient-name", default="Demo^Patient")
    parser.add_argument("--no-pdf", action="store_true", help="do not write document.pdf")
    args = parser.parse_args(argv)
    if args.slices < 1:
        parser.error("--slices must be at least 1")
    if args.small < 0:
        parser.error("--small must not be negative")
    if args.seed < 0:
        parser.error("--seed must not be negative")
    for name in ("patient_id", "patient_name"):
        value = getattr(args, name)
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            parser.error(f"--{name.replace('_', '-')} must be Latin-1 (ISO_IR 100)")
    return args


def main(argv=None):
    """Command-line entry point."""
    args = parse_args(argv)
    started = time.monotonic()
    files = Generator(args).run()
    dicom = sum(1 for f in files if f["kind"] == "dicom")
    total = sum(f["size"] for f in files)
    print(f"{args.out}: {args.slices} CT + {CBCT_SLICES} CBCT slices, RTSTRUCT, RTPLAN, "
          f"RTDOSE, {args.small} small, {len(files) - dicom} document(s); "
          f"{len(files)} files ({dicom} DICOM), {total / 1e6:.1f} MB "
          f"in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
