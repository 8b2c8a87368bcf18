#!/usr/bin/python3
"""Write a catalog-sized set of small DICOM studies for bench/find.

--studies N studies of one series of one 16x16 Secondary Capture image each,
spread over N/4 patients (rounded up), with study dates over ten years and
the modality cycling through CT, MR, PT, CR and OT.  Files go to
OUT/NNN/study_NNNNNN.dcm (1,000 per directory), and --manifest FILE lists
one line per study: StudyInstanceUID, PatientID, PatientName, StudyDate,
Modality (the expected C-FIND answer).  The same arguments always give the
same bytes: UIDs are derived from a hash of --seed and the study number.

    /usr/bin/python3 bench/lib/make_studies.py --out DIR --manifest FILE --studies 10000
"""

import argparse
import datetime
import hashlib
import os
import sys

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MODALITIES = ("CT", "MR", "PT", "CR", "OT")
SIZE = 16


def uid(seed, purpose, n):
    digest = hashlib.sha256(f"mdd-bench-find|{seed}|{purpose}|{n}".encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the DICOM files")
    parser.add_argument("--manifest", required=True, help="TSV file of the expected answers")
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.studies < 1:
        parser.error("--studies must be at least 1")

    first_day = datetime.date(2015, 1, 1)
    pixels = bytes(range(256))[: SIZE * SIZE]
    manifest = []
    for n in range(args.studies):
        patient = n // 4
        modality = MODALITIES[n % len(MODALITIES)]
        date = (first_day + datetime.timedelta(days=(n * 37) % 3650)).strftime("%Y%m%d")
        study_uid = uid(args.seed, "study", n)
        sop_uid = uid(args.seed, "instance", n)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1.1"

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = SECONDARY_CAPTURE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = date
        ds.SeriesDate = date
        ds.ContentDate = date
        ds.StudyTime = "093000"
        ds.AccessionNumber = f"A{n + 1:07d}"
        ds.Modality = modality
        ds.ConversionType = "WSD"
        ds.ReferringPhysicianName = "Referrer^Bench"
        ds.StudyDescription = f"Bench study {n + 1}"
        ds.SeriesDescription = f"{modality} series"
        ds.PatientName = f"Bench^Patient{patient + 1:05d}"
        ds.PatientID = f"BP{patient + 1:06d}"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "MF"[patient % 2]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = uid(args.seed, "series", n)
        ds.StudyID = str(n + 1)
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = SIZE
        ds.Columns = SIZE
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = pixels

        directory = os.path.join(args.out, f"{n // 1000:03d}")
        os.makedirs(directory, exist_ok=True)
        ds.save_as(os.path.join(directory, f"study_{n + 1:06d}.dcm"), write_like_original=False)
        manifest.append("\t".join((study_uid, ds.PatientID, str(ds.PatientName), date, modality)))

    with open(args.manifest, "w") as f:
        f.write("\n".join(manifest) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
