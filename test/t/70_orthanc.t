#!/usr/bin/python3
# mdd against a real PACS: Debian's Orthanc (1.10), started by this test on
# 127.0.0.1 with a configuration of its own (free ports, storage under
# MDD_TEST_DIR, no plugins, no remote access, TCP_NODELAY=1, run as an
# unprivileged user) and registered in mdd as node 'orthanc':
#   1. C-ECHO both ways: mdd.echo('orthanc'), Orthanc's /modalities/mdd/echo;
#   2. C-STORE from Orthanc: a generated patient (two studies: planning CT,
#      RT Structure Set, RT Plan, RT Dose; CBCT) and pydicom test files
#      (explicit and implicit VR, JPEG 2000, RLE) are uploaded to Orthanc's
#      REST API and sent to mdd with /modalities/mdd/store; every instance is
#      archived with source 'dicom:ORTHANC', in the transfer syntax of the
#      upload, with the same data set element by element and the same pixel
#      data bytes (DCMTK re-encodes on sending: sequences get explicit
#      lengths, group lengths and trailing padding go), with audit rows;
#      sending them again adds nothing;
#   3. C-FIND from Orthanc (/modalities/mdd/query) at STUDY, SERIES and
#      IMAGE level, answers compared with mdd's catalog: return keys and
#      counts, a Latin-1 person name both ways, wildcards, date ranges;
#   4. C-MOVE after the instances were deleted in Orthanc: Orthanc's
#      /modalities/mdd/move at SERIES, IMAGE and STUDY level (one study, then
#      several in one request), /queries/ID/answers/N/retrieve, an unknown
#      destination refused, PATIENT level in the Study Root model refused
#      (Orthanc 1.10 always moves in Study Root), DCMTK's movescu in Patient
#      Root at PATIENT level with Orthanc as destination: Orthanc holds every
#      instance again, received from AE MDD, with a data set byte-identical
#      to what mdd stored; the C-MOVEs are in mdd's audit log.
# Orthanc's log is shown as diagnostics when anything fails.
import io
import os
import re
import signal
import subprocess
import sys
import time
import warnings

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
import dicomwire as w  # noqa: E402
from orthanc import ORTHANC, Orthanc  # noqa: E402

warnings.simplefilter("ignore")
import pydicom  # noqa: E402

test_dir = env("MDD_TEST_DIR")
pydicom_dir = env("MDD_PYDICOM_DIR")
DICOM_PORT = int(env("MDD_DICOM_PORT"))
HOST = "127.0.0.1"
if not os.access(ORTHANC, os.X_OK):
    skip_all(f"{ORTHANC} is not installed (Debian package orthanc)")

PATIENT = "T70ORTHANC"
PATIENT_NAME = "Müller^Jürgen"      # Latin-1: Orthanc queries in ISO_IR 100
SLICES = 10
PYDICOM_FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "rtstruct.dcm",
                 "JPEG2000.dcm", "SC_rgb_rle.dcm"]
MOVE_SOP_CLASSES = {"Study Root": "1.2.840.10008.5.1.4.1.2.2.2",
                    "Patient Root": "1.2.840.10008.5.1.4.1.2.1.2"}
TIME_LIMIT = 110        # seconds for the whole test; Orthanc is stopped in any case
started = time.monotonic()


def _too_long(signum, frame):
    raise TimeoutError(f"70_orthanc.t still running after {TIME_LIMIT} s")


signal.signal(signal.SIGALRM, _too_long)
signal.alarm(TIME_LIMIT)

# ---------------------------------------------------------------------------
# helpers


def wait_for(fn, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def now(conn):
    return query_value(conn, "SELECT clock_timestamp()")


def short(body, n=600):
    text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else repr(body)
    return text if len(text) <= n else text[:n] + " ..."


def dataset_of(data):
    """(data set bytes, transfer syntax) of a Part 10 file; a file without a
    meta header (rtstruct.dcm) is all data set, implicit VR little endian."""
    try:
        _, dataset, ts = w.split_part10(data)
        return dataset, ts
    except w.ProtocolError:
        return bytes(data), w.IMPLICIT_VR_LE


def _value(v):
    if isinstance(v, (bytes, bytearray)):
        return ("bytes", len(v), sha256_bytes(bytes(v)))
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(_value(x) for x in v)
    return str(v)


def elements(ds, prefix=()):
    """Every element of a data set as (path, VR, value), into sequences;
    group lengths (gggg,0000) and Data Set Trailing Padding (FFFC,FFFC) are
    left out: DCMTK drops them when it sends."""
    out = []
    for elem in ds:
        tag = elem.tag
        if tag.element == 0 or tag == 0xFFFCFFFC:
            continue
        path = prefix + (f"({tag.group:04X},{tag.element:04X})",)
        if elem.VR == "SQ":
            out.append((path, "SQ", len(elem.value)))
            for i, item in enumerate(elem.value):
                out += elements(item, path + (f"item {i}",))
        else:
            out.append((path, elem.VR, _value(elem.value)))
    return out


def first_difference(a, b):
    for x, y in zip(a, b):
        if x != y:
            return f"{x!r} / {y!r}"
    return f"{len(a)} / {len(b)} elements"


def read_ds(data):
    return pydicom.dcmread(io.BytesIO(bytes(data)), force=True)


def first_byte_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def movescu(args):
    """DCMTK's movescu to mdd, calling as ORTHANC, destination ORTHANC;
    returns (exit status, output)."""
    p = subprocess.run(["movescu", "-v", "-aet", "ORTHANC", "-aec", "MDD", "-aem", "ORTHANC",
                        *args, HOST, str(DICOM_PORT)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, env=dict(os.environ, TCP_NODELAY="1"), timeout=60)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def mdd_accepts_move():
    """The C-MOVE information models mdd accepts in an association from
    ORTHANC (raw A-ASSOCIATE-RQ, released at once)."""
    accepted = []
    try:
        a = w.Association.connect(DICOM_PORT, HOST, timeout=10)
        try:
            contexts = [(1 + 2 * i, uid, [w.IMPLICIT_VR_LE, w.EXPLICIT_VR_LE])
                        for i, uid in enumerate(MOVE_SOP_CLASSES.values())]
            kind, _ = a.request("MDD", "ORTHANC", contexts)
            if kind == "AC":
                accepted = [name for i, name in enumerate(MOVE_SOP_CLASSES)
                            if a.accepted_syntax(1 + 2 * i)]
                a.release()
        finally:
            a.sock.close()
    except (OSError, w.ProtocolError, w.Closed) as e:
        note(f"C-MOVE probe failed: {e!r}")
    return accepted


# ---------------------------------------------------------------------------
# the data: a generated patient and some of pydicom's test files

conn = connect()
gen_dir = make_server_dir(os.path.join(test_dir, "t70-patient"), mode=0o755)
manifest = generate_patient(gen_dir, PATIENT, 70, slices=SLICES,
                            extra=("--no-pdf", "--patient-name", PATIENT_NAME))
files = {}          # SOP Instance UID -> what the test knows of the file
for f in manifest["files"]:
    if f["kind"] != "dicom":
        continue
    with open(os.path.join(gen_dir, f["path"]), "rb") as fh:
        files[f["sop_instance_uid"]] = dict(name=f["path"], data=fh.read(), generated=True,
                                            study=f["study_instance_uid"],
                                            series=f["series_instance_uid"],
                                            modality=f["modality"])
gen_uids = set(files)
for name in PYDICOM_FILES:
    path = os.path.join(pydicom_dir, name)
    if not os.path.exists(path):
        note(f"{name} is not in {pydicom_dir}: left out")
        continue
    with open(path, "rb") as fh:
        data = fh.read()
    ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    uid = str(ds.SOPInstanceUID)
    if uid in files or query_value(conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = %s",
                                   (uid,)):
        note(f"{name}: SOP Instance UID {uid} is already known (another file or mdd): left out")
        continue
    files[uid] = dict(name=name, data=data, generated=False, study=str(ds.StudyInstanceUID),
                      series=str(ds.SeriesInstanceUID), modality=str(ds.get("Modality", "")),
                      patient_id=str(ds.get("PatientID", "")))
for uid, f in files.items():
    f["dataset"], f["ts"] = dataset_of(f["data"])
    f["parsed"] = read_ds(f["data"])
    f["sop_class"] = str(f["parsed"].SOPClassUID)
pyd_uids = set(files) - gen_uids
ALL = set(files)
N = len(ALL)
plan_study = next(f["study"] for f in files.values() if f["generated"] and f["modality"] == "RTPLAN")
tx_study = next(f["study"] for f in files.values() if f["generated"] and f["study"] != plan_study)
ct_uids = {u for u, f in files.items() if f["generated"] and f["modality"] == "CT"
           and f["study"] == plan_study}
ct_series = files[next(iter(ct_uids))]["series"]
plan_uid = next(u for u, f in files.items() if f["generated"] and f["modality"] == "RTPLAN")
plan_study_uids = {u for u, f in files.items() if f["study"] == plan_study}
tx_uids = {u for u, f in files.items() if f["study"] == tx_study}
note(f"{len(gen_uids)} generated instances ({PATIENT}: {len(plan_study_uids)} in the planning "
     f"study, {len(tx_uids)} CBCT), {len(pyd_uids)} pydicom files")

# ---------------------------------------------------------------------------
# Orthanc

orthanc_dir = make_server_dir(os.path.join(test_dir, "t70-orthanc"), mode=0o755)
orthanc = Orthanc(orthanc_dir, aet="ORTHANC",
                  modalities={"mdd": ["MDD", HOST, DICOM_PORT]})
server_log = os.path.join(os.environ.get("MDD_DATADIR", ""), "server.log")
server_log_start = os.path.getsize(server_log) if os.path.exists(server_log) else 0
orthanc_mark = 0


def check(cond, desc, *diagnostics):
    """ok(), with Orthanc's log since the section began when it fails."""
    extra = ()
    if not cond:
        extra = ("    Orthanc's log of this section:\n"
                 + "\n".join("      " + l for l in orthanc.log_since(orthanc_mark).splitlines()[-40:]),)
    return ok(cond, desc, *diagnostics, *extra)


def section(title):
    global orthanc_mark
    orthanc_mark = orthanc.log_size()
    note(f"--- {title}")


def held(uids):
    """Which of uids Orthanc holds (by the Orthanc IDs of the upload)."""
    return {u for u in uids if files[u].get("orthanc")
            and orthanc.get(f"/instances/{files[u]['orthanc']}")[0] == 200}


def orthanc_find(level, keys, **options):
    """C-FIND of Orthanc to mdd; (HTTP status, [answers, simplified] or the error)."""
    body = dict(Level=level, Query=keys, **options)
    status, res = orthanc.post("/modalities/mdd/query", body)
    if status != 200 or not isinstance(res, dict):
        return status, res
    path = res["Path"]
    status, numbers = orthanc.get(f"{path}/answers")
    if status != 200:
        return status, numbers
    answers = []
    for n in numbers:
        st, content = orthanc.get(f"{path}/answers/{n}/content?simplify")
        answers.append(content if st == 200 else {"error": st})
    return 200, answers


def values(answer, key):
    return sorted(v for v in str(answer.get(key, "")).split("\\") if v)


def run():
    section("Orthanc starts")
    try:
        system = orthanc.start()
    except (RuntimeError, OSError) as e:
        ok(False, "Orthanc starts and its REST API answers", str(e))
        return
    check(system.get("DicomAet") == "ORTHANC" and system.get("DicomPort") == orthanc.dicom_port,
          f"Orthanc {system.get('Version')} answers GET /system on 127.0.0.1:{orthanc.http_port}, "
          f"AE title ORTHANC, DICOM port {orthanc.dicom_port}", f"    {system}")
    note(f"Orthanc runs as user {orthanc.user}, work dir {orthanc_dir}")
    execute(conn, "DELETE FROM mdd.node WHERE name = 'orthanc'")
    execute(conn, "SELECT mdd.add_node('orthanc', 'ORTHANC', %s, %s)", (HOST, orthanc.dicom_port))

    # =======================================================================
    # 1. C-ECHO both ways

    section("1. C-ECHO")
    del conn.notices[:]
    check(query_value(conn, "SELECT mdd.echo('orthanc')") is True,
          "mdd.echo('orthanc'): mdd's C-ECHO to Orthanc succeeds", "".join(conn.notices))
    like((query(conn, """SELECT detail FROM mdd.audit_log WHERE action = 'echo'
                         ORDER BY at DESC LIMIT 1""") or [[None]])[0][0],
         rf"^orthanc \(ORTHANC at 127\.0\.0\.1:{orthanc.dicom_port}\): success$",
         "the audit log records the C-ECHO to Orthanc as a success")
    mark = now(conn)
    status, body = orthanc.post("/modalities/mdd/echo", {})
    check(status == 200, "POST /modalities/mdd/echo: Orthanc's C-ECHO to mdd succeeds",
          f"    HTTP {status}: {short(body)}")
    audit = query_dicts(conn, """SELECT action, detail FROM mdd.audit_log
                                 WHERE at >= %s AND client = 'ORTHANC@127.0.0.1'""", (mark,))
    is_deeply([(a["action"], a["detail"]) for a in audit],
              [("associate", "ORTHANC -> MDD: node orthanc")],
              "mdd's audit log: one association from ORTHANC@127.0.0.1, as node orthanc")

    # =======================================================================
    # 2. upload to Orthanc, C-STORE from Orthanc to mdd

    section("2. C-STORE from Orthanc")
    bad = []
    for uid, f in sorted(files.items(), key=lambda kv: kv[1]["name"]):
        status, res = orthanc.post("/instances", f["data"])
        if status == 200 and isinstance(res, dict) and res.get("Status") == "Success":
            f["orthanc"], f["orthanc_study"] = res["ID"], res["ParentStudy"]
            f["orthanc_patient"] = res["ParentPatient"]
        else:
            bad.append(f"{f['name']}: HTTP {status}: {short(res, 300)}")
    check(not bad, f"Orthanc accepts all {N} files (POST /instances, status Success)", "\n".join(bad))
    status, stats = orthanc.get("/statistics")
    is_(stats.get("CountInstances") if isinstance(stats, dict) else stats, N,
        f"Orthanc holds {N} instances")

    resources = sorted({files[u]["orthanc_patient"] for u in gen_uids if "orthanc" in files[u]}
                       | {files[u]["orthanc"] for u in pyd_uids if "orthanc" in files[u]})
    mark = now(conn)
    t0 = time.monotonic()
    status, res = orthanc.post("/modalities/mdd/store",
                               {"Resources": resources, "Synchronous": True, "Timeout": 60},
                               timeout=90)
    note(f"Orthanc's C-STORE of {N} instances to mdd: {time.monotonic() - t0:.2f} s")
    check(status == 200, "POST /modalities/mdd/store (the generated patient and each pydicom "
          "instance) succeeds", f"    HTTP {status}: {short(res)}")
    res = res if isinstance(res, dict) else {}
    is_((res.get("InstancesCount"), res.get("FailedInstancesCount"), res.get("RemoteAet")),
        (N, 0, "MDD"), f"Orthanc reports {N} instances sent to MDD, none failed")

    objects = query_dicts(conn, """SELECT id, sop_instance_uid, sop_class_uid, patient_id,
                                          transfer_syntax_uid, source, size, sha256
                                   FROM mdd.objects WHERE sop_instance_uid = ANY(%s)""",
                          (sorted(ALL),))
    by_uid = {o["sop_instance_uid"]: o for o in objects}
    is_deeply(set(by_uid), ALL, f"mdd.objects holds all {N} instances")
    is_deeply({o["source"] for o in objects}, {"dicom:ORTHANC"}, "each with source 'dicom:ORTHANC'")
    is_deeply({u: o["sop_class_uid"] for u, o in by_uid.items()},
              {u: files[u]["sop_class"] for u in by_uid}, "with the SOP class of its file")
    is_deeply({u: o["transfer_syntax_uid"] for u, o in by_uid.items()},
              {u: files[u]["ts"] for u in by_uid},
              "in the transfer syntax of the file uploaded (Orthanc sent what it stored: explicit "
              "and implicit VR little endian, JPEG 2000, RLE)")
    is_(sorted(u for u, o in by_uid.items() if o["patient_id"] == PATIENT), sorted(gen_uids),
        f"the generated instances belong to patient {PATIENT}")

    # the bytes mdd stored, against the files uploaded
    stored = {}
    meta_bad, ds_diff, pixel_diff, hash_bad, identical = [], [], [], [], 0
    for uid, o in sorted(by_uid.items()):
        f = files[uid]
        data = bytes(query_value(conn, "SELECT mdd.read(%s)", (o["id"],)))
        stored[uid] = data
        if len(data) != o["size"] or sha256_bytes(data) != o["sha256"]:
            hash_bad.append(f"{f['name']}: size {o['size']}/{len(data)} or sha256 differs")
        try:
            meta, dataset, ts = w.split_part10(data)
        except w.ProtocolError as e:
            meta_bad.append(f"{f['name']}: {e}")
            continue
        ds = read_ds(data)
        fm = ds.file_meta
        got = {k: str(fm.get(k, "")).strip() for k in
               ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID",
                "SourceApplicationEntityTitle")}
        want = {"MediaStorageSOPClassUID": f["sop_class"], "MediaStorageSOPInstanceUID": uid,
                "TransferSyntaxUID": f["ts"], "SourceApplicationEntityTitle": "ORTHANC"}
        if got != want or ts != f["ts"]:
            meta_bad.append(f"{f['name']}: {got}")
        if dataset == f["dataset"]:
            identical += 1
        a, b = elements(ds), elements(f["parsed"])
        if a != b:
            ds_diff.append(f"{f['name']}: first difference (mdd / file) {first_difference(a, b)}")
        if "PixelData" in f["parsed"]:
            if "PixelData" not in ds or ds.PixelData != f["parsed"].PixelData:
                pixel_diff.append(f"{f['name']}: pixel data of {len(ds.get('PixelData', b''))} "
                                  f"bytes, the file's {len(f['parsed'].PixelData)}")
    images = sum(1 for f in files.values() if "PixelData" in f["parsed"])
    ok(not hash_bad, "mdd.read gives bytes matching each object's size and sha256", "\n".join(hash_bad[:10]))
    ok(not meta_bad and len(stored) == N,
       "mdd's meta header names the SOP class and instance, the transfer syntax of the upload "
       "and source AE ORTHANC", "\n".join(meta_bad[:10]))
    ok(not ds_diff and len(stored) == N,
       f"for all {N} instances the data set mdd stored equals the uploaded file's, element by "
       "element (into sequences; group lengths and trailing padding aside)",
       "\n".join(ds_diff[:10]))
    ok(not pixel_diff and len(stored) == N,
       f"the pixel data of the {images} images is byte-identical to the files'",
       "\n".join(pixel_diff[:10]))
    note(f"{identical} of {N} data sets are byte-identical to the file's after the meta header "
         "(DCMTK re-encodes the others: explicit sequence lengths, no group lengths)")

    audit = query_dicts(conn, """SELECT action, object_id, detail FROM mdd.audit_log
                                 WHERE at >= %s AND client = 'ORTHANC@127.0.0.1'""", (mark,))
    assoc = [a for a in audit if a["action"] == "associate"]
    ok(len(assoc) >= 1 and all(a["detail"] == "ORTHANC -> MDD: node orthanc" for a in assoc),
       "the audit log shows the association from ORTHANC@127.0.0.1 (node orthanc)", f"    {audit[:5]}")
    is_deeply(sorted(a["object_id"] for a in audit if a["action"] == "store"),
              sorted(o["id"] for o in objects),
              f"and {N} audit rows 'store' from ORTHANC@127.0.0.1, one per object")

    # the same again: nothing new
    count = query_value(conn, "SELECT count(*) FROM mdd.objects")
    status, res = orthanc.post("/modalities/mdd/store",
                               {"Resources": resources, "Synchronous": True, "Timeout": 60},
                               timeout=90)
    res = res if isinstance(res, dict) else {}
    check(status == 200 and res.get("InstancesCount") == N and res.get("FailedInstancesCount") == 0,
          "the same instances sent again: success for each",
          f"    HTTP {status}: {short(res)}")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects"), count, "and no new object in mdd")

    # =======================================================================
    # 3. C-FIND from Orthanc

    section("3. C-FIND from Orthanc")
    catalog = {r["study_instance_uid"]: r for r in query_dicts(conn, """
        SELECT study_instance_uid, min(patient_name) AS patient_name,
               min(study_description) AS study_description,
               to_char(min(study_date), 'YYYYMMDD') AS study_date,
               min(accession_number) AS accession_number,
               count(*) AS instances, count(DISTINCT series_instance_uid) AS series,
               array_agg(DISTINCT modality ORDER BY modality) AS modalities
        FROM mdd.objects WHERE patient_id = %s GROUP BY study_instance_uid""", (PATIENT,))}
    is_deeply(set(catalog), {plan_study, tx_study}, "mdd's catalog: the two studies of the patient")

    status, answers = orthanc_find("Study", {
        "PatientID": PATIENT, "StudyDescription": "*", "PatientName": "", "StudyDate": "",
        "AccessionNumber": "", "NumberOfStudyRelatedInstances": "",
        "NumberOfStudyRelatedSeries": "", "ModalitiesInStudy": ""})
    check(status == 200, "POST /modalities/mdd/query, STUDY level by Patient ID, succeeds",
          f"    HTTP {status}: {short(answers)}")
    answers = answers if status == 200 else []
    got = {a.get("StudyInstanceUID"): (a.get("PatientName"), a.get("StudyDescription"),
                                       a.get("StudyDate"), a.get("AccessionNumber"),
                                       a.get("NumberOfStudyRelatedInstances"),
                                       a.get("NumberOfStudyRelatedSeries"),
                                       values(a, "ModalitiesInStudy"))
           for a in answers}
    want = {s: (r["patient_name"], r["study_description"], r["study_date"], r["accession_number"],
                str(r["instances"]), str(r["series"]), sorted(r["modalities"]))
            for s, r in catalog.items()}
    is_deeply(got, want, "the answers (Study UID, patient name, description, date, accession "
              "number, instance and series counts, modalities) are mdd's catalog")
    is_(sorted({a.get("PatientName") for a in answers}), [PATIENT_NAME],
        f"the Latin-1 patient name reaches Orthanc intact ({PATIENT_NAME})")
    is_deeply({s: v[4] for s, v in got.items()},
              {plan_study: str(len(plan_study_uids)), tx_study: str(len(tx_uids))},
              "NumberOfStudyRelatedInstances counts what Orthanc sent")

    status, answers = orthanc_find("Study", {"PatientName": "Mül*", "StudyInstanceUID": ""})
    is_(sorted(a.get("StudyInstanceUID") for a in answers) if status == 200 else (status, answers),
        sorted([plan_study, tx_study]),
        "a wildcard on a Latin-1 patient name (PatientName=Mül*, sent in ISO_IR 100) finds the "
        "patient's two studies")
    compressed = sorted({f["study"] for u, f in files.items() if not f["generated"]
                         and str(f["parsed"].get("PatientName", "")).startswith("CompressedSamples")})
    status, answers = orthanc_find("Study", {"PatientName": "compressedsamples^*",
                                             "StudyInstanceUID": ""})
    want = sorted(r[0] for r in query(conn, """SELECT DISTINCT study_instance_uid FROM mdd.objects
                                               WHERE lower(patient_name) LIKE 'compressedsamples^%%'"""))
    ok(status == 200 and sorted(a.get("StudyInstanceUID") for a in answers) == want
       and set(compressed) <= set(want) and compressed,
       "PatientName=compressedsamples^* (case-insensitive) finds the studies of the pydicom "
       "'CompressedSamples^...' patients", f"    got {answers if status == 200 else (status, answers)}"
       f"\n    expected {want}")

    d_plan = catalog[plan_study]["study_date"]
    status, answers = orthanc_find("Study", {"PatientID": PATIENT, "StudyDate": f"{d_plan}-{d_plan}"})
    is_([a.get("StudyInstanceUID") for a in answers] if status == 200 else (status, answers),
        [plan_study], f"StudyDate={d_plan}-{d_plan} selects the planning study")
    status, answers = orthanc_find("Study", {"PatientID": PATIENT,
                                             "StudyDate": f"{catalog[tx_study]['study_date']}-"})
    is_([a.get("StudyInstanceUID") for a in answers] if status == 200 else (status, answers),
        [tx_study], "an open-end date range selects the later (treatment) study")
    status, answers = orthanc_find("Study", {"StudyDate": "20040101-20041231", "StudyInstanceUID": ""})
    want = sorted(r[0] for r in query(conn, """SELECT DISTINCT study_instance_uid FROM mdd.objects
                                               WHERE study_date BETWEEN '2004-01-01' AND '2004-12-31'"""))
    in_2004 = sorted({f["study"] for f in files.values() if not f["generated"]
                      and str(f["parsed"].get("StudyDate", "")).startswith("2004")})
    ok(status == 200 and sorted(a.get("StudyInstanceUID") for a in answers) == want
       and set(in_2004) <= set(want),
       "StudyDate=20040101-20041231 finds exactly the catalog's studies of 2004 "
       "(CT_small, MR_small, JPEG2000 among them)",
       f"    got {sorted(a.get('StudyInstanceUID') for a in answers) if status == 200 else (status, answers)}"
       f"\n    expected {want}")

    status, answers = orthanc_find("Series", {"StudyInstanceUID": plan_study, "SeriesInstanceUID": "",
                                              "Modality": "", "NumberOfSeriesRelatedInstances": ""})
    want = {r[0]: (r[1], str(r[2])) for r in query(conn, """
        SELECT series_instance_uid, min(modality), count(*) FROM mdd.objects
        WHERE study_instance_uid = %s GROUP BY 1""", (plan_study,))}
    is_deeply({a.get("SeriesInstanceUID"): (a.get("Modality"), a.get("NumberOfSeriesRelatedInstances"))
               for a in answers} if status == 200 else (status, answers), want,
              "SERIES level: every series of the planning study with modality and instance count")
    status, answers = orthanc_find("Instance", {"StudyInstanceUID": plan_study,
                                                "SeriesInstanceUID": ct_series,
                                                "SOPInstanceUID": "", "SOPClassUID": ""})
    is_deeply({a.get("SOPInstanceUID"): a.get("SOPClassUID") for a in answers}
              if status == 200 else (status, answers),
              {u: files[u]["sop_class"] for u in ct_uids},
              f"IMAGE level: the {len(ct_uids)} slices of the CT series with their SOP class")

    # =======================================================================
    # 4. C-MOVE from Orthanc

    section("4. C-MOVE from Orthanc")
    mark = now(conn)
    is_(mdd_accepts_move(), list(MOVE_SOP_CLASSES),
        "mdd accepts C-MOVE presentation contexts from ORTHANC, Study Root and Patient Root")

    studies = sorted({f["orthanc_study"] for f in files.values() if "orthanc_study" in f})
    failed = [s for s in studies if orthanc.delete(f"/studies/{s}")[0] != 200]
    is_(failed, [], f"DELETE /studies/ID of the {len(studies)} studies in Orthanc")
    is_(held(ALL), set(), "Orthanc holds none of the instances any more")

    def move(level, resources, target="ORTHANC"):
        return orthanc.post("/modalities/mdd/move",
                            {"Level": level, "Resources": resources, "TargetAet": target,
                             "Timeout": 60}, timeout=120)

    def arrived(uids, timeout=10):
        return wait_for(lambda: (lambda h: h if h == uids else None)(held(uids)), timeout) or held(uids)

    log_mark = orthanc.log_size()
    status, res = move("Study", [{"StudyInstanceUID": plan_study}], target="T70NOWHERE")
    check(status != 200 and re.search(r"0xA801", orthanc.log_since(log_mark) + short(res, 2000)),
          "C-MOVE to a destination that is not a registered node (T70NOWHERE) fails with 0xA801 "
          "(move destination unknown)", f"    HTTP {status}: {short(res)}")
    time.sleep(0.5)
    is_(held(ALL), set(), "and nothing arrives in Orthanc")

    status, res = move("Series", [{"StudyInstanceUID": plan_study, "SeriesInstanceUID": ct_series}])
    check(status == 200, "C-MOVE at SERIES level (the planning CT) succeeds", f"    HTTP {status}: {short(res)}")
    is_deeply(arrived(ct_uids), ct_uids, f"Orthanc holds the {len(ct_uids)} CT slices again")
    is_deeply(held(ALL), ct_uids, "and nothing else")

    status, res = move("Instance", [{"StudyInstanceUID": plan_study,
                                     "SeriesInstanceUID": files[plan_uid]["series"],
                                     "SOPInstanceUID": plan_uid}])
    check(status == 200, "C-MOVE at IMAGE level (the RT Plan) succeeds", f"    HTTP {status}: {short(res)}")
    is_deeply(arrived(ct_uids | {plan_uid}), ct_uids | {plan_uid}, "Orthanc now holds the RT Plan too")
    is_deeply(held(ALL), ct_uids | {plan_uid}, "and nothing else")

    status, res = move("Study", [{"StudyInstanceUID": plan_study}])
    check(status == 200, "C-MOVE at STUDY level (the planning study) succeeds",
          f"    HTTP {status}: {short(res)}")
    is_deeply(arrived(plan_study_uids), plan_study_uids,
              f"Orthanc holds all {len(plan_study_uids)} instances of the planning study "
              "(CT, RT Structure Set, RT Plan, RT Dose)")

    # the other study through a query's answer: /queries/ID/answers/N/retrieve
    status, res = orthanc.post("/modalities/mdd/query",
                               {"Level": "Study", "Query": {"StudyInstanceUID": tx_study}})
    retrieved = None
    if status == 200 and isinstance(res, dict):
        retrieved = orthanc.post(f"{res['Path']}/answers/0/retrieve",
                                 {"TargetAet": "ORTHANC", "Synchronous": True, "Timeout": 60},
                                 timeout=120)
    check(retrieved is not None and retrieved[0] == 200,
          "C-MOVE of the treatment study through POST /queries/ID/answers/0/retrieve succeeds",
          f"    query HTTP {status}: {short(res)}; retrieve: {retrieved and retrieved[0]} "
          f"{short(retrieved and retrieved[1])}")
    is_deeply(arrived(tx_uids, 20), tx_uids, f"Orthanc holds the {len(tx_uids)} CBCT slices again")

    # the pydicom files: several studies in one request
    pyd_studies = sorted({files[u]["study"] for u in pyd_uids})
    status, res = move("Study", [{"StudyInstanceUID": s} for s in pyd_studies])
    check(status == 200, f"C-MOVE at STUDY level of the {len(pyd_studies)} pydicom studies in one "
          "request succeeds", f"    HTTP {status}: {short(res)}")
    is_deeply(arrived(pyd_uids), pyd_uids, f"Orthanc holds the {len(pyd_uids)} pydicom instances again")
    audit = query_dicts(conn, """SELECT action, detail FROM mdd.audit_log
                                 WHERE at >= %s AND client = 'ORTHANC@127.0.0.1'
                                   AND action ~* 'move' ORDER BY at""", (mark,))
    ok(any(re.search(rf"STUDY.*{re.escape(plan_study)}.*\b{len(plan_study_uids)} objects to ORTHANC",
                     a["detail"] or "") for a in audit),
       "mdd's audit log records the C-MOVEs from ORTHANC@127.0.0.1 (the planning study: "
       f"{len(plan_study_uids)} objects to ORTHANC)", f"    {audit[:8]}")

    # PATIENT level: Orthanc 1.10 sends it in the Study Root model, which has
    # no PATIENT level (PS3.4 C.6.2), and mdd refuses it; DCMTK's movescu
    # asks in the Patient Root model, with Orthanc as the destination.
    patients = sorted({files[u]["patient_id"] for u in pyd_uids})
    failed = [s for s in sorted({files[u]["orthanc_study"] for u in pyd_uids})
              if orthanc.delete(f"/studies/{s}")[0] != 200]
    ok(not failed and not held(pyd_uids), "the pydicom studies deleted in Orthanc again", f"    {failed}")
    log_mark = orthanc.log_size()
    status, res = move("Patient", [{"PatientID": patients[0]}])
    ok(status != 200 and re.search(r"0xA900", orthanc.log_since(log_mark) + short(res, 2000)),
       "Orthanc's C-MOVE at PATIENT level (sent in the Study Root model) is refused with 0xA900",
       f"    HTTP {status}: {short(res)}")
    bad = []
    for p in patients:
        rc, out = movescu(["-P", "-k", "QueryRetrieveLevel=PATIENT", "-k", f"PatientID={p}"])
        if rc != 0 or not re.search(r"Received Final Move Response \(Success\)", out):
            bad.append(f"PatientID={p}: exit {rc}\n{out[-600:]}")
    ok(not bad, f"movescu -P (Patient Root) at PATIENT level, destination ORTHANC, for each of the "
       f"{len(patients)} pydicom patients: success", "\n".join(bad[:3]))
    is_deeply(arrived(pyd_uids), pyd_uids, f"Orthanc holds the {len(pyd_uids)} pydicom instances again")

    # what Orthanc received, against what mdd stored
    missing = ALL - held(ALL)
    is_deeply(missing, set(), f"in all, Orthanc holds every one of the {N} instances again")
    not_identical, wrong_source = [], []
    for uid in sorted(ALL - missing):
        f = files[uid]
        status, data = orthanc.get(f"/instances/{f['orthanc']}/file")
        status2, remote = orthanc.get(f"/instances/{f['orthanc']}/metadata/RemoteAET")
        if status2 != 200 or (remote.decode() if isinstance(remote, bytes) else remote) != "MDD":
            wrong_source.append(f"{f['name']}: RemoteAET HTTP {status2} {short(remote, 80)}")
        try:
            _, got, ts = w.split_part10(data)
            _, mine, mts = w.split_part10(stored[uid])
        except (w.ProtocolError, KeyError, TypeError) as e:
            not_identical.append(f"{f['name']}: {e!r}")
            continue
        if ts != mts or got != mine:
            not_identical.append(f"{f['name']}: transfer syntax {ts} (mdd {mts}), data set of "
                                 f"{len(got)} bytes (mdd {len(mine)}), first difference at byte "
                                 f"{first_byte_difference(got, mine)}; element by element "
                                 f"{'equal' if elements(read_ds(data)) == elements(read_ds(stored[uid])) else 'different'}")
    ok(not wrong_source and not missing,
       "Orthanc received each from AE MDD (metadata RemoteAET)", "\n".join(wrong_source[:10]))
    ok(not not_identical and not missing,
       "the file Orthanc returns (GET /instances/ID/file) has the transfer syntax and, byte for "
       "byte, the data set that mdd.read gives", "\n".join(not_identical[:10]))



died = True
try:
    run()
    died = False
finally:
    signal.alarm(0)
    failures = failed_count()
    orthanc.stop()
    if failures or died:
        diag("Orthanc's log (last 80 lines):", orthanc.log_tail(80))
        try:
            with open(server_log, encoding="utf-8", errors="replace") as fh:
                fh.seek(server_log_start)
                tail = fh.read().splitlines()[-40:]
            diag("mdd's server log during this test (last 40 lines):", "\n".join(tail))
        except OSError:
            pass
    conn.close()

signal.alarm(0)
ok(not orthanc.running(), "Orthanc is stopped")
note(f"runtime {time.monotonic() - started:.1f} s")
done_testing()
