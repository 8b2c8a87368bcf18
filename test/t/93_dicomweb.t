#!/usr/bin/python3
# DICOMweb (PS3.18) served by mdd's HTTP workers, on a private cluster
# (port PGPORT+105, HTTP on PGPORT+106):
#   1. QIDO-RS with our own HTTP client: studies, series and instances
#      (nested and top-level), matching by keyword and by tag, wildcards,
#      date ranges, UID lists, limit/offset, includefield (and all),
#      fuzzymatching answered with a Warning, an unknown attribute 400;
#      answers compared with the catalog;
#   2. WADO-RS: a study, a series and an instance as multipart/related
#      application/dicom, each part byte-identical to the file imported;
#      metadata compared with DCMTK's dcm2json on the same files; frames of
#      a CT slice equal to its pixel data (pydicom); a bulk data URI when
#      mdd.dicomweb_bulk_threshold is set, and its bytes; 404 and 406;
#   3. STOW-RS as mdd_operator: a generated patient stored (catalog, bytes,
#      source 'dicomweb'), again (nothing new), a reader refused (403),
#      a body without closing boundary (400), not multipart (415), only a
#      non-DICOM part (409), a part of another study under /studies/{s}
#      (FailedSOPSequence with FailureReason A900), a body over
#      mdd.http_max_body (413): nothing stored by any of them;
#   4. Orthanc with its DICOMweb plugin (Debian orthanc-dicomweb) configured
#      with mdd as a DICOMweb server: QIDO through Orthanc, a study
#      retrieved into Orthanc byte-identical, and a patient uploaded to
#      Orthanc pushed to mdd with Orthanc's STOW client, byte-identical.
import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from orthanc import ORTHANC, Orthanc  # noqa: E402

warnings.simplefilter("ignore")
import pydicom  # noqa: E402

TIME_LIMIT = 240


def _too_long(signum, frame):
    raise TimeoutError(f"93_dicomweb.t still running after {TIME_LIMIT} s")


signal.signal(signal.SIGALRM, _too_long)
signal.alarm(TIME_LIMIT)

test_dir = env("MDD_TEST_DIR")
port = int(env("PGPORT")) + 105
http_port = int(env("PGPORT")) + 106
datadir = os.path.join(test_dir, "dicomweb93")
work = make_server_dir(os.path.join(test_dir, "t93"), mode=0o755)
ROOT = f"http://127.0.0.1:{http_port}/dicomweb"
READER = ("t93_reader", "reader-pass")
OPERATOR = ("t93_operator", "operator-pass")


def http(path, auth=READER, method="GET", data=None, headers=None, root=ROOT):
    """(status, headers as a dict of lower-case names, body bytes)."""
    req = urllib.request.Request(root + path, data=data, method=method, headers=dict(headers or {}))
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def qido(path, **kw):
    status, hdrs, body = http(path, **kw)
    return status, hdrs, (json.loads(body) if body else None)


def value(match, tag):
    v = match.get(tag, {}).get("Value")
    return v[0] if v else None


def multipart(hdrs, body):
    """The parts of a multipart body: (part headers, data)."""
    m = re.search(r'boundary="?([^";]+)"?', hdrs.get("content-type", ""))
    assert m, hdrs
    delim = b"--" + m.group(1).encode()
    chunks = body.split(delim)
    parts = []
    for c in chunks[1:]:
        if c.startswith(b"--"):
            break
        head, _, data = c[2:].partition(b"\r\n\r\n")
        parts.append((head.decode("latin-1"), data[:-2]))
    return parts


def stow_body(blobs, boundary="t93-boundary-x", closing=True, types=None):
    out = b""
    for i, b in enumerate(blobs):
        t = (types or {}).get(i, "application/dicom")
        out += f"--{boundary}\r\nContent-Type: {t}\r\n\r\n".encode() + b + b"\r\n"
    if closing:
        out += f"--{boundary}--\r\n".encode()
    return out, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def dicom_files(d):
    out = []
    for root, _, files in os.walk(d):
        out += [os.path.join(root, f) for f in files if f.endswith(".dcm")]
    return sorted(out)


def uids(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def wait_for(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


patient_dir = os.path.join(work, "patient")
stow_dir = os.path.join(work, "stow")
push_dir = os.path.join(work, "push")
generate_patient(patient_dir, "T93WEB", 93, slices=6, extra=["--no-pdf"])
generate_patient(stow_dir, "T93STOW", 94, slices=3, extra=["--no-pdf"])
generate_patient(push_dir, "T93PUSH", 95, slices=3, extra=["--no-pdf"])
files = dicom_files(patient_dir)
by_sha = {sha256_file(f): f for f in files}

cluster("start", datadir, str(port), "mdd.dicom_port = 0", "mdd.job_workers = 1",
        f"mdd.allowed_paths = '{work}'", f"mdd.http_port = {http_port}", "mdd.http_workers = 2",
        "mdd.http_max_body = 8000")
conn = None
orthanc = None
try:
    conn = connect_when_up(port)
    execute(conn, "CREATE EXTENSION mdd")
    execute(conn, f"CREATE ROLE {READER[0]} LOGIN PASSWORD %s IN ROLE mdd_reader", (READER[1],))
    execute(conn, f"CREATE ROLE {OPERATOR[0]} LOGIN PASSWORD %s IN ROLE mdd_operator", (OPERATOR[1],))
    is_(query_value(conn, "SELECT count(object_id) FROM mdd.import(%s)", (patient_dir,)), len(files),
        "the generated patient is imported")
    ok(wait_for(lambda: http("/studies")[0] == 200), "the DICOMweb service answers",
       server_log_tail(datadir))

    # ------------------------------------------------------------------
    # 1. QIDO-RS
    status, hdrs, studies = qido("/studies?PatientID=T93WEB")
    is_(status, 200, "QIDO studies: 200")
    like(hdrs.get("content-type", ""), r"^application/dicom\+json", "QIDO answers application/dicom+json")
    catalog_studies = sorted(r[0] for r in query(
        conn, "SELECT DISTINCT study_instance_uid FROM mdd.objects WHERE patient_id = 'T93WEB'"))
    is_deeply(sorted(value(s, "0020000D") for s in studies), catalog_studies,
              "QIDO studies by PatientID: the catalog's studies")
    s0 = studies[0]
    is_(s0["00100010"]["vr"], "PN", "PatientName has VR PN")
    ok(isinstance(s0["00100010"]["Value"][0], dict) and "Alphabetic" in s0["00100010"]["Value"][0],
       "a person name is an object with Alphabetic")
    is_(value(s0, "00081190"), f"{ROOT}/studies/{value(s0, '0020000D')}", "RetrieveURL of the study")
    ok(isinstance(value(s0, "00201208"), int), "NumberOfStudyRelatedInstances is a JSON number")
    is_(value(s0, "00201208"), query_value(
        conn, "SELECT count(*) FROM mdd.objects WHERE study_instance_uid = %s", (value(s0, "0020000D"),)),
        "NumberOfStudyRelatedInstances counts the study's objects")

    is_(len(qido("/studies?00100020=T93WEB")[2]), len(studies), "an attribute given by its tag")
    is_(len(qido("/studies?PatientName=Demo*")[2]), len(studies), "wildcard on PatientName")
    is_(len(qido("/studies?PatientID=T93W?B")[2]), len(studies), "? wildcard")
    is_(len(qido("/studies?PatientID=NOBODY")[2]), 0, "no match: an empty array")
    dates = sorted(r[0] for r in query(conn, "SELECT DISTINCT to_char(study_date, 'YYYYMMDD') FROM mdd.objects "
                                             "WHERE patient_id = 'T93WEB'"))
    is_(len(qido(f"/studies?PatientID=T93WEB&StudyDate={dates[0]}-{dates[0]}")[2]), 1, "date range of one day")
    is_(len(qido(f"/studies?PatientID=T93WEB&StudyDate=-{dates[-1]}")[2]), len(studies), "open date range")
    uid_list = ",".join(catalog_studies)
    is_(len(qido(f"/studies?StudyInstanceUID={uid_list}")[2]), len(catalog_studies), "a list of UIDs")
    page = qido("/studies?PatientID=T93WEB&limit=1&offset=1")[2]
    is_(len(page), 1, "limit 1")
    is_(value(page[0], "0020000D"), value(studies[1], "0020000D"), "offset 1: the second match")
    status, hdrs, _ = qido("/studies?PatientID=T93WEB&fuzzymatching=true")
    like(hdrs.get("warning", ""), r"fuzzymatching", "fuzzymatching is ignored, and said so")
    status, _, body = qido("/studies?NoSuchAttribute=1")
    is_(status, 400, "an unknown attribute: 400")
    is_(qido("/studies?limit=-1")[0], 400, "a negative limit: 400")

    ct_file = sorted(f for f in files if "/ct/" in f)[0]
    st, se, sop = uids(ct_file)
    series = qido(f"/studies/{st}/series")[2]
    is_(sorted(value(x, "0020000E") for x in series),
        sorted(r[0] for r in query(conn, "SELECT DISTINCT series_instance_uid FROM mdd.objects "
                                         "WHERE study_instance_uid = %s", (st,))),
        "QIDO series of a study")
    ct_series = qido(f"/studies/{st}/series?Modality=CT")[2]
    is_(len(ct_series), 1, "series by Modality")
    top_series = qido(f"/series?SeriesInstanceUID={se}")[2]
    is_(value(top_series[0], "00100020"), "T93WEB", "top-level /series carries the study's attributes")
    instances = qido(f"/studies/{st}/series/{se}/instances")[2]
    is_(len(instances), query_value(conn, "SELECT count(*) FROM mdd.objects WHERE series_instance_uid = %s",
                                    (se,)), "QIDO instances of a series")
    is_(value(qido(f"/instances?SOPInstanceUID={sop}")[2][0], "00081190"),
        f"{ROOT}/studies/{st}/series/{se}/instances/{sop}", "top-level /instances: RetrieveURL of the instance")
    rows = qido(f"/studies/{st}/series/{se}/instances?SOPInstanceUID={sop}&includefield=00180050")[2]
    is_(value(rows[0], "00180050"), float(pydicom.dcmread(ct_file).SliceThickness),
        "includefield of an attribute outside the catalog's columns (from the header)")
    rows = qido(f"/studies/{st}/series/{se}/instances?SOPInstanceUID={sop}&includefield=all")[2]
    ok("00280030" in rows[0], "includefield=all answers the header's attributes (PixelSpacing)")

    # ------------------------------------------------------------------
    # 2. WADO-RS
    def retrieved(path):
        status, hdrs, body = http(path, headers={"Accept": 'multipart/related; type="application/dicom"'})
        if status != 200:
            return status, hdrs, []
        return status, hdrs, multipart(hdrs, body)

    status, hdrs, parts = retrieved(f"/studies/{st}")
    is_(status, 200, "WADO-RS study: 200")
    like(hdrs.get("content-type", ""), r'^multipart/related; type="application/dicom"; boundary=',
         "multipart/related; type=application/dicom")
    study_files = [f for f in files if uids(f)[0] == st]
    is_(len(parts), len(study_files), "one part per object of the study")
    is_deeply(sorted(hashlib.sha256(d).hexdigest() for _, d in parts),
              sorted(sha256_file(f) for f in study_files), "every part is the exact stored bytes")
    ok(all("application/dicom" in h for h, _ in parts), "each part is application/dicom")
    status, _, parts = retrieved(f"/studies/{st}/series/{se}")
    is_(len(parts), len(instances), "WADO-RS series: its instances")
    status, _, parts = retrieved(f"/studies/{st}/series/{se}/instances/{sop}")
    ok(len(parts) == 1 and parts[0][1] == open(ct_file, "rb").read(), "WADO-RS instance: the file's bytes")
    is_(query_value(conn, "SELECT count(*) FROM mdd.audit WHERE action = 'read' AND object_id = "
                          "(SELECT id FROM mdd.objects WHERE sop_instance_uid = %s)", (sop,)) > 0, True,
        "the reads are audited")
    is_(http(f"/studies/{st}/series/{se}/instances/1.2.3.4")[0], 404, "unknown instance: 404")
    is_(http("/studies/1.2.3/series")[0], 200, "QIDO of an unknown study: 200 (empty)")
    is_(http(f"/studies/{st}", headers={"Accept": "application/zip"})[0], 406, "Accept application/zip: 406")
    is_(http(f"/studies/{st}/bogus")[0], 404, "an unknown resource: 404")
    is_(http(f"/studies/{st}/series/{se}/instances/{sop}",
             headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})[0],
        406, "a transfer syntax other than the stored one: 406 (no transcoding)")

    # metadata against dcm2json
    for f in [ct_file] + [os.path.join(patient_dir, n) for n in ("rtplan.dcm", "rtstruct.dcm", "rtdose.dcm")]:
        fst, fse, fsop = uids(f)
        status, hdrs, body = http(f"/studies/{fst}/series/{fse}/instances/{fsop}/metadata")
        ref = json.loads(subprocess.run(["dcm2json", f], capture_output=True, check=True).stdout)
        got = json.loads(body) if status == 200 else None
        ok(status == 200 and got == [ref], f"metadata of {os.path.basename(f)} equals dcm2json's",
           "" if got is None else "    differing: " + ", ".join(
               k for k in set(got[0]) | set(ref) if got[0].get(k) != ref.get(k))[:300])
    status, hdrs, body = http(f"/studies/{st}/series/{se}/metadata")
    is_(len(json.loads(body)), len(instances), "series metadata: one object per instance")

    # frames
    pixel = pydicom.dcmread(ct_file).PixelData
    status, hdrs, body = http(f"/studies/{st}/series/{se}/instances/{sop}/frames/1",
                              headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    is_(status, 200, "frames: 200")
    fparts = multipart(hdrs, body)
    ok(len(fparts) == 1 and fparts[0][1] == pixel, "frame 1 is the uncompressed pixel data")
    is_(http(f"/studies/{st}/series/{se}/instances/{sop}/frames/2")[0], 404, "frame 2 of one: 404")
    is_(http(f"/studies/{st}/series/{se}/instances/{sop}/frames/x")[0], 400, "a bad frame number: 400")
    dose = os.path.join(patient_dir, "rtdose.dcm")
    dst, dse, dsop = uids(dose)
    dds = pydicom.dcmread(dose)
    nframes = int(dds.NumberOfFrames)
    status, hdrs, body = http(f"/studies/{dst}/series/{dse}/instances/{dsop}/frames/1,{nframes}")
    fparts = multipart(hdrs, body) if status == 200 else []
    fsize = len(dds.PixelData) // nframes
    ok(len(fparts) == 2 and fparts[0][1] == dds.PixelData[:fsize] and fparts[1][1] == dds.PixelData[-fsize:],
       "frames 1 and last of the multi-frame dose")

    # bulk data
    execute(conn, "ALTER SYSTEM SET mdd.dicomweb_bulk_threshold = 1024")
    execute(conn, "SELECT pg_reload_conf()")

    def bulk_uri():
        s, h, b = http(f"/studies/{st}/series/{se}/instances/{sop}/metadata")
        return json.loads(b)[0]["7FE00010"].get("BulkDataURI") if s == 200 else None
    ok(wait_for(bulk_uri, 20), "with mdd.dicomweb_bulk_threshold the pixel data are a BulkDataURI")
    uri = bulk_uri() or ""
    is_(uri, f"{ROOT}/studies/{st}/series/{se}/instances/{sop}/bulk/7FE00010", "the bulk data URI")
    status, hdrs, body = http(uri[len(ROOT):])
    bparts = multipart(hdrs, body) if status == 200 else []
    ok(len(bparts) == 1 and bparts[0][1] == pixel, "the bulk data are the pixel data's bytes")
    execute(conn, "ALTER SYSTEM RESET mdd.dicomweb_bulk_threshold")
    execute(conn, "SELECT pg_reload_conf()")

    # ------------------------------------------------------------------
    # 3. STOW-RS
    def count_objects():
        return query_value(conn, "SELECT count(*) FROM mdd.objects")

    stow_files = dicom_files(stow_dir)
    before = count_objects()
    body, hdrs = stow_body([open(f, "rb").read() for f in stow_files])
    status, _, _ = http("/studies", auth=READER, method="POST", data=body, headers=hdrs)
    is_(status, 403, "STOW as a reader: 403")
    bad, bhdrs = stow_body([open(stow_files[0], "rb").read()], closing=False)
    bad = bad[:-2]
    is_(http("/studies", auth=OPERATOR, method="POST", data=bad, headers=bhdrs)[0], 400,
        "a body without its closing boundary: 400")
    is_(http("/studies", auth=OPERATOR, method="POST", data=open(stow_files[0], "rb").read(),
             headers={"Content-Type": "application/dicom"})[0], 415, "not multipart: 415")
    junk, jhdrs = stow_body([b"this is not DICOM at all" * 10])
    status, _, jbody = http("/studies", auth=OPERATOR, method="POST", data=junk, headers=jhdrs)
    is_(status, 409, "only a non-DICOM part: 409")
    failed = json.loads(jbody).get("00081198", {}).get("Value", [{}])
    is_(value(failed[0], "00081197"), 0xC000, "FailureReason C000 (cannot understand)")
    big, ghdrs = stow_body([b"\0" * (8100 * 1024)])
    big_path = os.path.join(work, "big.mp")
    with open(big_path, "wb") as fh:
        fh.write(big)
    # curl: the answer comes before the body is read (urllib sees a broken pipe)
    r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", ":".join(OPERATOR),
                        "-H", "Content-Type: " + ghdrs["Content-Type"], "--data-binary", "@" + big_path,
                        ROOT + "/studies"], capture_output=True, text=True, timeout=60)
    is_(r.stdout, "413", "a body over mdd.http_max_body: 413")
    other_study = uids(stow_files[0])[0]
    body1, hdrs1 = stow_body([open(stow_files[0], "rb").read()])
    status, _, mbody = http(f"/studies/{st}", auth=OPERATOR, method="POST", data=body1, headers=hdrs1)
    is_(status, 409, "an instance of another study under /studies/{study}: 409")
    is_(value(json.loads(mbody)["00081198"]["Value"][0], "00081197"), 0xA900, "FailureReason A900")
    is_(count_objects(), before, "nothing was stored by the refused requests")

    status, _, sbody = http("/studies", auth=OPERATOR, method="POST", data=body, headers=hdrs)
    is_(status, 200, "STOW of a patient as an operator: 200")
    answer = json.loads(sbody)
    refs = answer.get("00081199", {}).get("Value", [])
    is_(len(refs), len(stow_files), "ReferencedSOPSequence lists every instance")
    ok("00081198" not in answer, "no FailedSOPSequence")
    is_(value(answer, "00081190"), f"{ROOT}/studies/{other_study}", "RetrieveURL of the study")
    is_(count_objects(), before + len(stow_files), "the instances are in the catalog")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects o WHERE o.patient_id = 'T93STOW' "
                          "AND o.source = 'dicomweb'"), len(stow_files), "with source 'dicomweb'")
    good = True
    for f in stow_files:
        data = query_value(conn, "SELECT mdd.read(id) FROM mdd.objects WHERE sop_instance_uid = %s",
                           (uids(f)[2],))
        good = good and bytes(data) == open(f, "rb").read()
    ok(good, "stored byte for byte")
    is_(query_value(conn, "SELECT count(*) FROM mdd.audit WHERE action = 'store' AND role = %s",
                    (OPERATOR[0],)), len(stow_files), "each store audited as the operator")
    status, _, sbody = http("/studies", auth=OPERATOR, method="POST", data=body, headers=hdrs)
    is_(status, 200, "the same again: 200")
    is_(count_objects(), before + len(stow_files), "nothing new")
    mixed, mhdrs = stow_body([open(stow_files[0], "rb").read(), b"junk junk junk"])
    status, _, mbody = http("/studies", auth=OPERATOR, method="POST", data=mixed, headers=mhdrs)
    is_(status, 202, "one good and one bad part: 202")

    # ------------------------------------------------------------------
    # 4. Orthanc's DICOMweb plugin as the client
    plugin = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
    if not (os.access(ORTHANC, os.X_OK) and os.path.exists(plugin)):
        skip("Orthanc or its DICOMweb plugin is not installed (Debian orthanc, orthanc-dicomweb)", 8)
    else:
        orthanc = Orthanc(os.path.join(work, "orthanc"), config={
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {
                "mdd": {"Url": ROOT + "/", "Username": OPERATOR[0], "Password": OPERATOR[1]}}}})
        orthanc.start()
        status, found = orthanc.post("/dicom-web/servers/mdd/qido",
                                     {"Uri": "/studies", "Arguments": {"PatientID": "T93WEB"}})
        is_(status, 200, "Orthanc's QIDO of mdd: 200")
        is_(sorted(m["0020000D"]["Value"] for m in found), catalog_studies, "Orthanc finds the studies")
        status, _ = orthanc.post("/dicom-web/servers/mdd/retrieve", {"Resources": [{"Study": st}]})
        is_(status, 200, "Orthanc retrieves a study from mdd (WADO-RS)")
        ids = orthanc.get("/instances")[1]
        is_(len(ids), len(study_files), "Orthanc holds every instance of the study")
        same = sorted(sha256_bytes(orthanc.get(f"/instances/{i}/file")[1]) for i in ids) == \
            sorted(sha256_file(f) for f in study_files)
        ok(same, "byte-identical to the files mdd imported")
        for i in ids:
            orthanc.delete(f"/instances/{i}")
        push_files = dicom_files(push_dir)
        for f in push_files:
            orthanc.post("/instances", open(f, "rb").read())
        ids = orthanc.get("/instances")[1]
        status, res = orthanc.post("/dicom-web/servers/mdd/stow", {"Resources": ids})
        ok(status == 200, "Orthanc pushes a patient to mdd (STOW-RS)", f"    {res}")
        is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE patient_id = 'T93PUSH' "
                              "AND source = 'dicomweb'"), len(push_files), "mdd holds what Orthanc pushed")
        good = True
        for f in push_files:
            data = query_value(conn, "SELECT mdd.read(id) FROM mdd.objects WHERE sop_instance_uid = %s",
                               (uids(f)[2],))
            good = good and data is not None and bytes(data) == open(f, "rb").read()
        ok(good, "byte-identical to what was uploaded to Orthanc")
finally:
    if orthanc is not None:
        if failed_count():
            diag(orthanc.log_tail(40))
        orthanc.stop()
    if conn is not None:
        conn.close()
    if failed_count():
        diag(server_log_tail(datadir, 40))
    cluster("stop", datadir)

done_testing()
