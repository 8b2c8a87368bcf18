#!/usr/bin/python3
# C-FIND SCP against DCMTK's findscu: Patient Root and Study Root at every
# level, universal matching, wildcards (also case-insensitive for person
# names), date ranges, lists of UIDs, the count and modality return keys,
# and the refusals (unknown AE, a node without query permission, a level
# the model does not have).
import glob
import re
import os
import subprocess
import sys
import tempfile

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

import pydicom  # noqa: E402

PORT = env("MDD_DICOM_PORT")
PATIENT = "TAP60"
AE = "TAP60FIND"
test_dir = env("MDD_TEST_DIR")
out = os.path.join(test_dir, "allowed", "p60")
make_server_dir(out, mode=0o755)
manifest = generate_patient(out, PATIENT, 60, slices=8)

conn = connect()
query_dicts(conn, "SELECT * FROM mdd.import(%s)", (out,))
execute(conn, """SELECT mdd.add_node('tap60', %s, '127.0.0.1', NULL)
                 WHERE NOT EXISTS (SELECT 1 FROM mdd.nodes WHERE name = 'tap60')""", (AE,))
execute(conn, """SELECT mdd.add_node('tap60noquery', 'TAP60NOQ', '127.0.0.1', NULL, '{"query": false}')
                 WHERE NOT EXISTS (SELECT 1 FROM mdd.nodes WHERE name = 'tap60noquery')""")

dicom = [f for f in manifest["files"] if f["kind"] == "dicom"]
studies = sorted({f["study_instance_uid"] for f in dicom})
ct = [f for f in dicom if f["path"].startswith("ct/")]
plan_study = ct[0]["study_instance_uid"]


def find(keys, root="-S", aet=AE):
    """Run findscu; returns (exit status, [response data sets], output)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = ["findscu", "-v", root, "-X", "-od", d, "-aet", aet, "-aec", "MDD"]
        for k in keys:
            cmd += ["-k", k]
        cmd += ["127.0.0.1", str(PORT)]
        p = subprocess.run(cmd, capture_output=True, text=True,
                           env=dict(os.environ, TCP_NODELAY="1"), timeout=60)
        rsps = [pydicom.dcmread(f) for f in sorted(glob.glob(os.path.join(d, "rsp*.dcm")))]
    return p.returncode, rsps, p.stdout + p.stderr


# --- STUDY level, Study Root
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT}", "StudyInstanceUID",
                      "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                      "NumberOfStudyRelatedInstances", "PatientName"])
is_(sorted(r.StudyInstanceUID for r in rsps), studies, "STUDY by Patient ID: both studies of the patient")
expected = {}
for s in studies:
    fs = [f for f in dicom if f["study_instance_uid"] == s]
    expected[s] = (len(fs), len({f["series_instance_uid"] for f in fs}),
                   sorted({f["modality"] for f in fs}))
got = {r.StudyInstanceUID: (int(r.NumberOfStudyRelatedInstances), int(r.NumberOfStudyRelatedSeries),
                            sorted(r.ModalitiesInStudy if isinstance(r.ModalitiesInStudy, (list, pydicom.multival.MultiValue))
                                   else [r.ModalitiesInStudy]))
       for r in rsps}
is_deeply(got, expected, "instance and series counts and modalities in study are right")
ok(all(str(r.PatientName) == "Demo^Patient" for r in rsps), "the patient name is returned")
ok(all(r.SpecificCharacterSet == "ISO_IR 192" for r in rsps), "answers are UTF-8 (ISO_IR 192)")

rc, rsps, log = find(["QueryRetrieveLevel=STUDY", "PatientName=demo*", f"PatientID={PATIENT}",
                      "StudyInstanceUID"])
is_(len(rsps), 2, "a person-name wildcard matches regardless of case")
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT[:-1]}?", "StudyInstanceUID"])
is_(len(rsps), 2, "'?' matches one character")
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT.lower()}", "StudyInstanceUID"])
is_(len(rsps), 0, "Patient ID matching is exact")

dates = {r["study_instance_uid"]: None for r in dicom}
study_dates = dict(query(conn, """SELECT study_instance_uid, to_char(study_date, 'YYYYMMDD')
                                  FROM mdd.study WHERE study_instance_uid = ANY(%s)""", (studies,)))
d_plan = study_dates[plan_study]
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT}", f"StudyDate={d_plan}-{d_plan}",
                      "StudyInstanceUID"])
is_([r.StudyInstanceUID for r in rsps], [plan_study], "a closed date range selects the planning study")
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT}", f"StudyDate=-{d_plan}",
                      "StudyInstanceUID"])
is_([r.StudyInstanceUID for r in rsps], [plan_study], "an open-start range too")
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT}",
                      f"StudyDate={max(study_dates.values())}-", "StudyInstanceUID"])
is_(len(rsps), 1 if min(study_dates.values()) != max(study_dates.values()) else 2,
    "an open-end range selects the later study")
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={studies[0]}\\{studies[1]}"])
is_(sorted(r.StudyInstanceUID for r in rsps), studies, "a list of UIDs matches each")

# --- SERIES and IMAGE levels
rc, rsps, log = find(["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={plan_study}", "SeriesInstanceUID",
                      "Modality", "NumberOfSeriesRelatedInstances"])
series = {f["series_instance_uid"]: f["modality"] for f in dicom if f["study_instance_uid"] == plan_study}
is_(sorted(r.SeriesInstanceUID for r in rsps), sorted(series), "SERIES: every series of the study")
ct_rows = [r for r in rsps if r.Modality == "CT"]
ok(ct_rows and int(ct_rows[0].NumberOfSeriesRelatedInstances) == len(ct),
   f"the CT series counts its {len(ct)} slices")
rc, rsps, log = find(["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={plan_study}", "Modality=RT*",
                      "SeriesInstanceUID"])
is_(sorted(r.Modality for r in rsps), ["RTDOSE", "RTPLAN", "RTSTRUCT"], "a modality wildcard")
rc, rsps, log = find(["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={plan_study}",
                      f"SeriesInstanceUID={ct[0]['series_instance_uid']}", "SOPInstanceUID", "SOPClassUID",
                      "InstanceNumber"])
is_(sorted(r.SOPInstanceUID for r in rsps), sorted(f["sop_instance_uid"] for f in ct),
    "IMAGE: every slice of the CT series")
ok(all(r.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for r in rsps), "with its SOP class")

# --- Patient Root
rc, rsps, log = find(["QueryRetrieveLevel=PATIENT", f"PatientID={PATIENT}", "PatientName",
                      "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances"], root="-P")
is_(len(rsps), 1, "PATIENT level (Patient Root): one patient")
ok(rsps and int(rsps[0].NumberOfPatientRelatedStudies) == 2
   and int(rsps[0].NumberOfPatientRelatedInstances) == len(dicom),
   "with its study and instance counts")
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", f"PatientID={PATIENT}", "StudyInstanceUID"], root="-P")
is_(len(rsps), 2, "STUDY level in the Patient Root model")

# --- refusals
rc, rsps, log = find(["QueryRetrieveLevel=PATIENT", "PatientID"], root="-S")
ok(not rsps and re.search(r"(?i)0xa900|DataSetDoesNotMatchSOPClass", log),
   "PATIENT level in the Study Root model fails with 0xA900", log[-300:])
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], aet="TAP60NOQ")
ok(not rsps and re.search(r"(?i)status: 0x0?124\b", log),
   "a node without query permission is refused (0x0124)", log[-300:])
rc, rsps, log = find(["QueryRetrieveLevel=STUDY", "StudyInstanceUID"], aet="TAP60UNKNOWN")
ok(rc != 0 and not rsps, "an unknown AE title cannot query")

done_testing()
