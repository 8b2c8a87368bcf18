#!/usr/bin/python3
# mdd's DICOMweb with a client nobody here wrote: the npm package
# dicomweb-client (version pinned in scripts/peers/dicomweb-client/,
# installed by scripts/peers/dicomweb-client.sh into the npm cache of the
# tests) running in headless Chromium (test/t/lib/browser.py).  A private
# cluster (port PGPORT+107, HTTP on PGPORT+108, chromedriver on PGPORT+109)
# holds a generated patient; the page comes from a small HTTP server of the
# test on 127.0.0.1:PGPORT+110 (a secure context: crypto.subtle hashes what
# the client received) and Chromium runs with --disable-web-security, since
# mdd's service is another origin.  The page, as a reader:
#   searchForStudies (by PatientID), searchForSeries, searchForInstances,
#   retrieveInstance and retrieveSeries (the SHA-256 of each part against
#   the stored bytes, mdd.read), retrieveInstanceMetadata, and
#   retrieveInstanceFrames of a CT slice (length and SHA-256 against the
#   pixel data read by pydicom); storeInstances refused (403);
# and as an operator, storeInstances of another generated patient, then in
# the catalog with source 'dicomweb', byte for byte.
import base64
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
import browser  # noqa: E402

import pydicom  # noqa: E402

TIME_LIMIT = 150


def _too_long(signum, frame):
    raise TimeoutError(f"93_dicomweb_client.t still running after {TIME_LIMIT} s")


signal.signal(signal.SIGALRM, _too_long)
signal.alarm(TIME_LIMIT)

why = browser.available()
if why:
    skip_all(why)

test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
pgport = int(env("PGPORT"))
port, http_port, driver_port, page_port = pgport + 107, pgport + 108, pgport + 109, pgport + 110
datadir = os.path.join(test_dir, "dicomweb93c")
work = make_server_dir(os.path.join(test_dir, "t93c"), mode=0o755)
ROOT = f"http://127.0.0.1:{http_port}/dicomweb"
READER = ("t93c_reader", "reader pass")
OPERATOR = ("t93c_operator", "operator pass")


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def dicom_files(d):
    out = []
    for root, _, files in os.walk(d):
        out += [os.path.join(root, f) for f in files if f.endswith(".dcm")]
    return sorted(out)


# the client, from npm: a failure here fails the test (no skip)
r = subprocess.run([os.path.join(top, "scripts", "peers", "dicomweb-client.sh"), "path"],
                   capture_output=True, text=True, timeout=120)
client_js = r.stdout.strip()
if not ok(r.returncode == 0 and os.path.isfile(client_js), "dicomweb-client is installed from npm",
          f"    {r.stderr.strip()[-800:]}"):
    done_testing()
    sys.exit()

# the page: the client's UMD build, the script below, the files to store
page_dir = os.path.join(work, "page")
os.makedirs(os.path.join(page_dir, "stow"))
shutil.copy(client_js, os.path.join(page_dir, "dicomweb-client.js"))
PAGE_JS = r"""
'use strict';
async function sha256(buf) {
  const d = await crypto.subtle.digest('SHA-256', buf);
  return Array.from(new Uint8Array(d), b => b.toString(16).padStart(2, '0')).join('');
}
async function part(buf) { return {length: buf.byteLength, sha256: await sha256(buf)}; }
function first(obj, tag) { const e = obj && obj[tag]; return e && e.Value ? e.Value[0] : null; }
function describe(e) {
  if (e && e.status !== undefined) return {status: e.status, message: String(e.message)};
  return {exception: String(e && e.stack || e)};
}
async function run(cfg) {
  const DW = DICOMwebClient.api.DICOMwebClient;
  const reader = new DW({url: cfg.root, headers: {Authorization: cfg.reader}});
  const operator = new DW({url: cfg.root, headers: {Authorization: cfg.operator}});
  const ids = {studyInstanceUID: cfg.study, seriesInstanceUID: cfg.series};
  const inst = Object.assign({sopInstanceUID: cfg.sop}, ids);
  const out = {};
  async function step(name, fn) {
    try { out[name] = {value: await fn()}; } catch (e) { out[name] = {error: describe(e)}; }
  }
  await step('studies', async () => (await reader.searchForStudies({queryParams: {PatientID: cfg.patient}}))
    .map(s => ({study: first(s, '0020000D'), patientName: first(s, '00100010'),
                instances: first(s, '00201208')})));
  await step('series', async () => (await reader.searchForSeries({studyInstanceUID: cfg.study}))
    .map(s => [first(s, '0020000E'), first(s, '00080060')]));
  await step('instances', async () => (await reader.searchForInstances(ids)).map(i => first(i, '00080018')));
  await step('instance', async () => part(await reader.retrieveInstance(inst)));
  await step('seriesParts', async () => {
    const parts = await reader.retrieveSeries(ids);
    const out = [];
    for (const p of parts) out.push(await part(p));
    return out;
  });
  await step('metadata', async () => {
    const m = await reader.retrieveInstanceMetadata(inst);
    return {count: m.length, sop: first(m[0], '00080018'), modality: first(m[0], '00080060'),
            rows: first(m[0], '00280010'), columns: first(m[0], '00280011'),
            patientId: first(m[0], '00100020'), pixelVr: m[0]['7FE00010'] && m[0]['7FE00010'].vr};
  });
  await step('frames', async () => {
    const frames = await reader.retrieveInstanceFrames(Object.assign({frameNumbers: [1]}, inst));
    const out = [];
    for (const f of frames) out.push(await part(f));
    return out;
  });
  const datasets = [];
  for (const name of cfg.stow) datasets.push(await (await fetch('stow/' + name)).arrayBuffer());
  await step('readerStore', async () => { await reader.storeInstances({datasets}); return 'stored'; });
  await step('store', async () => {
    const answer = await operator.storeInstances({datasets});
    const json = typeof answer === 'string' ? JSON.parse(answer) : answer;
    const refs = (json['00081199'] && json['00081199'].Value) || [];
    return {referenced: refs.map(r => first(r, '00081155')), failed: '00081198' in json};
  });
  return out;
}
window.__start = function (cfg) {
  run(cfg).then(r => { window.__result = r; },
                e => { window.__result = {fatal: describe(e)}; });
};
"""
with open(os.path.join(page_dir, "test.js"), "w") as fh:
    fh.write(PAGE_JS)
with open(os.path.join(page_dir, "index.html"), "w") as fh:
    fh.write("<!doctype html><html><head><meta charset='utf-8'><title>mdd dicomweb-client</title>"
             "<script src='dicomweb-client.js'></script><script src='test.js'></script>"
             "</head><body>dicomweb-client against mdd</body></html>")

patient_dir = os.path.join(work, "patient")
stow_dir = os.path.join(work, "stow")
generate_patient(patient_dir, "T93CLIENT", 96, slices=4, extra=["--no-pdf"])
generate_patient(stow_dir, "T93CSTOW", 97, slices=2, extra=["--no-pdf"])
stow_files = [f for f in dicom_files(stow_dir) if "/ct/" in f]
stow_names = []
for i, f in enumerate(stow_files):
    stow_names.append(f"{i}.dcm")
    shutil.copy(f, os.path.join(page_dir, "stow", stow_names[-1]))
ct_file = sorted(f for f in dicom_files(patient_dir) if "/ct/" in f)[0]
ct = pydicom.dcmread(ct_file)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


cluster("start", datadir, str(port), "mdd.dicom_port = 0", "mdd.job_workers = 1",
        f"mdd.allowed_paths = '{work}'", f"mdd.http_port = {http_port}", "mdd.http_workers = 2")
conn = None
pages = None
b = None
try:
    conn = connect_when_up(port)
    execute(conn, "CREATE EXTENSION mdd")
    execute(conn, f"CREATE ROLE {READER[0]} LOGIN PASSWORD %s IN ROLE mdd_reader", (READER[1],))
    execute(conn, f"CREATE ROLE {OPERATOR[0]} LOGIN PASSWORD %s IN ROLE mdd_operator", (OPERATOR[1],))
    n_files = len(dicom_files(patient_dir))
    is_(query_value(conn, "SELECT count(object_id) FROM mdd.import(%s)", (patient_dir,)), n_files,
        "the generated patient is imported")

    pages = http.server.ThreadingHTTPServer(
        ("127.0.0.1", page_port), functools.partial(QuietHandler, directory=page_dir))
    threading.Thread(target=pages.serve_forever, daemon=True).start()

    b = browser.Browser(driver_port, work, extra_args=["--disable-web-security"])
    b.get(f"http://127.0.0.1:{page_port}/index.html")
    loaded = b.wait_for("return typeof window.__start === 'function' && typeof DICOMwebClient === 'object'",
                        timeout=20, what="the page and its scripts")
    ok(loaded, "the page loads dicomweb-client's UMD build (global DICOMwebClient)")
    cfg = {"root": ROOT, "reader": basic(*READER), "operator": basic(*OPERATOR), "patient": "T93CLIENT",
           "study": ct.StudyInstanceUID, "series": ct.SeriesInstanceUID, "sop": ct.SOPInstanceUID,
           "stow": stow_names}
    b.js("window.__start(arguments[0])", cfg)
    res = b.wait_for("return window.__result", timeout=60, what="the client's results")
    ok("fatal" not in res, "the page ran to its end", f"    {res.get('fatal')}")

    def value(name):
        """The step's value; its error, if any, as a diagnostic."""
        step = res.get(name) or {}
        if "error" in step:
            diag(f"{name}: {step['error']}")
        return step.get("value")

    # QIDO-RS
    studies = value("studies") or []
    is_deeply(sorted(s["study"] for s in studies),
              sorted(r[0] for r in query(conn, "SELECT DISTINCT study_instance_uid FROM mdd.objects "
                                               "WHERE patient_id = 'T93CLIENT'")),
              "searchForStudies by PatientID: the catalog's studies")
    mine = [s for s in studies if s["study"] == ct.StudyInstanceUID]
    ok(mine and mine[0]["patientName"] == {"Alphabetic": str(ct.PatientName)}
       and mine[0]["instances"] == query_value(conn, "SELECT count(*) FROM mdd.objects WHERE study_instance_uid = %s",
                                               (ct.StudyInstanceUID,)),
       "the study's PatientName and NumberOfStudyRelatedInstances", f"    {mine}")
    is_deeply(sorted(tuple(s) for s in value("series") or []),
              sorted(tuple(r) for r in query(conn, "SELECT DISTINCT series_instance_uid, modality FROM mdd.objects "
                                                   "WHERE study_instance_uid = %s", (ct.StudyInstanceUID,))),
              "searchForSeries of the study: its series and modalities")
    is_deeply(sorted(value("instances") or []),
              sorted(r[0] for r in query(conn, "SELECT sop_instance_uid FROM mdd.objects "
                                               "WHERE series_instance_uid = %s", (ct.SeriesInstanceUID,))),
              "searchForInstances of the CT series: its instances")

    # WADO-RS
    stored = {r[0]: bytes(r[1]) for r in query(
        conn, "SELECT sop_instance_uid, mdd.read(id) FROM mdd.objects WHERE series_instance_uid = %s",
        (ct.SeriesInstanceUID,))}
    is_(len(stored), len([f for f in dicom_files(patient_dir) if "/ct/" in f]),
        "the CT series holds the generated slices")
    ct_bytes = stored.get(ct.SOPInstanceUID, b"")
    is_(value("instance"), {"length": len(ct_bytes), "sha256": sha256_bytes(ct_bytes)},
        "retrieveInstance: the stored bytes (length, SHA-256)")
    is_(ct_bytes, open(ct_file, "rb").read(), "which are the imported file's")
    is_deeply(sorted((p["length"], p["sha256"]) for p in value("seriesParts") or []),
              sorted((len(d), sha256_bytes(d)) for d in stored.values()),
              "retrieveSeries: one part per instance, each the stored bytes")
    is_(value("metadata"), {"count": 1, "sop": ct.SOPInstanceUID, "modality": "CT", "rows": int(ct.Rows),
                            "columns": int(ct.Columns), "patientId": "T93CLIENT",
                            "pixelVr": ct["PixelData"].VR},
        "retrieveInstanceMetadata: SOPInstanceUID, Modality, Rows, Columns, PatientID, PixelData's VR")
    ok(ct.file_meta.TransferSyntaxUID in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"),
       "the CT slice is uncompressed", f"    {ct.file_meta.TransferSyntaxUID}")
    is_deeply(value("frames"), [{"length": len(ct.PixelData), "sha256": sha256_bytes(ct.PixelData)}],
              "retrieveInstanceFrames 1: the pixel data (length, SHA-256 from pydicom)")

    # STOW-RS
    is_((res.get("readerStore") or {}).get("error", {}).get("status"), 403, "storeInstances as a reader: 403")
    stow_uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in stow_files]
    store = value("store") or {}
    is_deeply(sorted(store.get("referenced") or []), sorted(stow_uids),
              "storeInstances as an operator: ReferencedSOPSequence lists every instance")
    is_(store.get("failed"), False, "and no FailedSOPSequence")
    rows = {r[0]: (r[1], bytes(r[2])) for r in query(
        conn, "SELECT sop_instance_uid, source, mdd.read(id) FROM mdd.objects WHERE patient_id = 'T93CSTOW'")}
    is_(sorted(rows), sorted(stow_uids), "the stored instances are in mdd.objects")
    ok(all(rows.get(u, (None, b""))[0] == "dicomweb" for u in stow_uids), "with source 'dicomweb'")
    ok(all(rows.get(u, (None, b""))[1] == open(f, "rb").read() for u, f in zip(stow_uids, stow_files)),
       "byte-identical to the files the page sent")
except Exception:
    if b:
        try:
            diag(*[m.get("message", "") for m in b.console()][-10:])
        except Exception:
            pass
    raise
finally:
    if b:
        b.quit()
    if pages:
        pages.shutdown()
        pages.server_close()
    if conn is not None:
        conn.close()
    if failed_count():
        diag(server_log_tail(datadir, 40))
    cluster("stop", datadir)
done_testing()
