#!/usr/bin/python3
# Query spanning and move forwarding on the wire: DCMTK's findscu, movescu
# and getscu ask mdd's own AE for what only other nodes hold.  Peers started
# here on 127.0.0.1: a DCMTK dcmqrscp and Orthanc marked for spanning (node
# option "span"), a node that is down, one that accepts TCP but never
# answers, a dcmqrscp that is not spanned, and storescp as a move
# destination.
#   1. a C-FIND at STUDY level is answered from the catalog first, then
#      from the span nodes, merged and de-duplicated by Study Instance UID,
#      with Retrieve AE Title saying where each lives, within the silent
#      node's time limit; SERIES and IMAGE levels; the node not spanned and
#      the calling node itself are not asked;
#   2. a C-MOVE to storescp of a series only the dcmqrscp holds: fetched
#      into the archive and passed on, byte-identical to the source, with
#      honest sub-operation counts; a C-GET of a study only Orthanc holds;
#   3. a C-MOVE of a series the node that claims it cannot deliver (its
#      objects withheld): the instances count as failed sub-operations;
#   4. the forwarding is in the audit trail; node option "span" is checked;
#   5. with mdd.forward_keep off, what was fetched only to be passed on is
#      removed from the archive afterwards (and its empty study).
import glob
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from dicomtools import StoreSCP, dimse_responses, run  # noqa: E402
from orthanc import ORTHANC, Orthanc  # noqa: E402
from qrscp import QRSCP  # noqa: E402
from silent import SilentListener  # noqa: E402

warnings.simplefilter("ignore")
import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

test_dir = env("MDD_TEST_DIR")
HOST = "127.0.0.1"
PORT = int(env("PGPORT")) + 69
DICOM_PORT = int(env("MDD_DICOM_PORT")) + 69
DATADIR = os.path.join(test_dir, "span69")
if not os.access(ORTHANC, os.X_OK):
    skip_all(f"{ORTHANC} is not installed (Debian package orthanc)")

TIME_LIMIT = 240
SILENT_LIMIT = 2.0


def _too_long(signum, frame):
    raise TimeoutError(f"69_span_wire.t still running after {TIME_LIMIT} s")


signal.signal(signal.SIGALRM, _too_long)
signal.alarm(TIME_LIMIT)


def uid(*parts):
    digest = hashlib.sha256("|".join(("mdd-t69",) + parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


class Study:
    def __init__(self, key, patient_id, name, series):
        self.key, self.patient_id, self.name = key, patient_id, name
        self.uid = uid("study", key)
        self.series = [(uid("series", key, str(n)), modality,
                        [uid("sop", key, str(n), str(i)) for i in range(count)])
                       for n, (modality, count) in enumerate(series)]

    def write(self, directory):
        paths = []
        for n, (s_uid, modality, sops) in enumerate(self.series):
            for i, sop in enumerate(sops):
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
                meta.MediaStorageSOPInstanceUID = sop
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1.69"
                ds = Dataset()
                ds.file_meta = meta
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
                ds.SOPInstanceUID = sop
                ds.StudyDate = "20240301"
                ds.StudyTime = "090000"
                ds.AccessionNumber = "ACC" + self.key
                ds.Modality = modality
                ds.ConversionType = "WSD"
                ds.StudyDescription = "Study " + self.key
                ds.SeriesDescription = f"{modality} {n + 1}"
                ds.PatientName = self.name
                ds.PatientID = self.patient_id
                ds.StudyInstanceUID = self.uid
                ds.SeriesInstanceUID = s_uid
                ds.StudyID = self.key
                ds.SeriesNumber = str(n + 1)
                ds.InstanceNumber = str(i + 1)
                ds.Rows = ds.Columns = 4
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.BitsAllocated = ds.BitsStored = 8
                ds.HighBit = 7
                ds.PixelRepresentation = 0
                ds.PixelData = bytes((i + k) % 256 for k in range(16))
                path = os.path.join(directory, f"{sop}.dcm")
                ds.save_as(path, write_like_original=False)
                paths.append(path)
        return paths


L1 = Study("L1", "P69", "SPAN^LOCAL", [("CT", 2)])
A1 = Study("A1", "P69", "SPAN^LOCAL", [("CT", 3), ("RTSTRUCT", 1)])
SHARED = Study("S1", "P69", "SPAN^LOCAL", [("MR", 2)])          # on both span nodes
C1 = Study("C1", "P69", "SPAN^LOCAL", [("CT", 2)])
N1 = Study("N1", "P69", "SPAN^LOCAL", [("PT", 1)])              # on the node not spanned
data_dir = make_server_dir(os.path.join(test_dir, "allowed", "t69"), mode=0o755)
paths = {}
for where, ss in {"local": [L1], "qr1": [A1, SHARED, L1], "orthanc": [C1, SHARED],
                  "qr2": [N1]}.items():
    d = os.path.join(data_dir, where)
    os.makedirs(d, exist_ok=True)
    paths[where] = [p for s in ss for p in s.write(d)]
    for p in paths[where]:
        os.chmod(p, 0o644)
    os.chmod(d, 0o755)
source = {}
for ps in paths.values():
    for p in ps:
        ds = pydicom.dcmread(p)
        source[str(ds.SOPInstanceUID)] = ds


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# the forwarding waits for its jobs at most mdd.dicom_dimse_timeout
cluster("start", DATADIR, str(PORT), f"mdd.dicom_port = {DICOM_PORT}", "mdd.job_workers = 2",
        "mdd.dicom_dimse_timeout = 20",
        f"mdd.allowed_paths = '{test_dir}/allowed'")
conn = connect_when_up(PORT)
execute(conn, "CREATE EXTENSION mdd")
our_ae = query_value(conn, "SHOW mdd.ae_title")
peers_dir = make_server_dir(os.path.join(test_dir, "t69-peers"), mode=0o755)
qr1 = QRSCP(os.path.join(peers_dir, "qr1"), "QR69A", peers={our_ae: (HOST, DICOM_PORT)})
qr2 = QRSCP(os.path.join(peers_dir, "qr2"), "QR69B", peers={our_ae: (HOST, DICOM_PORT)})
orthanc = Orthanc(os.path.join(peers_dir, "orthanc"), aet="ORTHANC69",
                  modalities={"mdd": [our_ae, HOST, DICOM_PORT]})
silent = SilentListener()
dest = StoreSCP(peers_dir, "DEST69")
down_port = free_port()


def stop_peers():
    for p in (qr1, qr2, orthanc, silent, dest):
        try:
            p.stop()
        except Exception:  # noqa: BLE001
            pass


try:
    qr1.start()
    qr2.start()
    qr1.load(paths["qr1"])
    qr2.load(paths["qr2"])
    orthanc.start()
    for p in paths["orthanc"]:
        with open(p, "rb") as fh:
            status, body = orthanc.post("/instances", fh.read())
        if status != 200:
            raise RuntimeError(f"Orthanc refused {p}: {status} {body!r}")
    dest.start()
except Exception:
    stop_peers()
    cluster("stop", DATADIR)
    raise

SCU = "SCU69"


def find(keys):
    """findscu (Study Root) to mdd as SCU69: (status, [responses], seconds, output)."""
    with tempfile.TemporaryDirectory() as d:
        cmd = ["findscu", "-v", "-S", "-X", "-od", d, "-aet", SCU, "-aec", our_ae, "-to", "30"]
        for k in keys:
            cmd += ["-k", k]
        t0 = time.monotonic()
        p = subprocess.run(cmd + [HOST, str(DICOM_PORT)], capture_output=True, text=True,
                           env=dict(os.environ, TCP_NODELAY="1"), timeout=60)
        took = time.monotonic() - t0
        rsps = [pydicom.dcmread(f) for f in sorted(glob.glob(os.path.join(d, "rsp*.dcm")))]
    return p.returncode, rsps, took, p.stdout + p.stderr


def move(study_uid, series_uid):
    """movescu (Study Root, SERIES level) to mdd as SCU69, destination storescp:
    (exit status, the final C-MOVE response as a dict, output)."""
    cmd = ["movescu", "-d", "-S", "-aet", SCU, "-aec", our_ae, "-aem", dest.aet, "-ta", "10", "-td", "90",
           "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
           "-k", f"SeriesInstanceUID={series_uid}", HOST, str(DICOM_PORT)]
    rc, text = run(cmd, timeout=150)
    return rc, (dimse_responses(text, "C-MOVE RSP") or [{}])[-1], text


try:
    for p in paths["local"]:
        execute(conn, "SELECT mdd.store_file(%s)", (p,))
    for name, ae, host, port, options in (
            ("t69scu", SCU, None, None, '{"find": false}'),
            ("t69dest", dest.aet, HOST, dest.port, '{"find": false}'),
            ("t69qr1", qr1.aet, HOST, qr1.port, '{"span": true}'),
            ("t69orthanc", "ORTHANC69", HOST, orthanc.dicom_port, '{"span": true}'),
            ("t69qr2", qr2.aet, HOST, qr2.port, '{}'),
            ("t69down", "DOWN69", HOST, down_port, '{"span": true}'),
            ("t69silent", "SILENT69", HOST, silent.port,
             f'{{"span": true, "find_timeout": {SILENT_LIMIT}}}')):
        execute(conn, "SELECT mdd.add_node(%s, %s, %s, %s, %s)", (name, ae, host, port, options))

    # --- 1. C-FIND spanning
    rc, rsps, took, out = find(["QueryRetrieveLevel=STUDY", "PatientID=P69", "StudyInstanceUID",
                                "PatientName", "StudyDate", "ModalitiesInStudy", "RetrieveAETitle"])
    ok(rc == 0, "findscu at STUDY level: success", out[-2000:])
    got = [(str(r.StudyInstanceUID), str(r.get("RetrieveAETitle", ""))) for r in rsps]
    is_(sorted(got), sorted([(L1.uid, our_ae), (A1.uid, "QR69A"), (SHARED.uid, "ORTHANC69"),
                             (C1.uid, "ORTHANC69")]),
        "the archive's study and the span nodes' ones, each once, with the AE that holds it "
        "(the study on both nodes from the first by name, the local one not again from the node)")
    is_(got[0], (L1.uid, our_ae), "the local answer comes first")
    ok(N1.uid not in [g[0] for g in got], "the node without option span is not asked")
    ok(took < SILENT_LIMIT + 4, f"the silent and the down node cost at most the time limit ({took:.1f} s)")
    ok(all(str(r.PatientName) == "SPAN^LOCAL" and r.StudyDate == "20240301" for r in rsps),
       "patient name and study date of every answer")
    mods = {str(r.StudyInstanceUID): sorted(r.ModalitiesInStudy if isinstance(r.ModalitiesInStudy, pydicom.multival.MultiValue)
                                            else [r.ModalitiesInStudy]) for r in rsps}
    is_(mods.get(C1.uid), ["CT"], "modalities in a study of Orthanc (dcmqrscp does not answer them)")

    rc, rsps, took, out = find(["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={A1.uid}",
                                "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"])
    is_(sorted((str(r.SeriesInstanceUID), r.Modality, str(r.get("RetrieveAETitle", ""))) for r in rsps),
        sorted((s[0], s[1], "QR69A") for s in A1.series), "SERIES level: the series of a study only a node holds")
    rc, rsps, took, out = find(["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={C1.uid}",
                                f"SeriesInstanceUID={C1.series[0][0]}", "SOPInstanceUID"])
    is_(sorted(str(r.SOPInstanceUID) for r in rsps), sorted(C1.series[0][2]),
        "IMAGE level: the instances of a series only Orthanc holds")
    rc, rsps, took, out = find(["QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={A1.uid}",
                                f"SeriesInstanceUID={A1.series[0][0]}",
                                f"SOPInstanceUID={A1.series[0][2][1]}"])
    is_([str(r.SOPInstanceUID) for r in rsps], [A1.series[0][2][1]], "IMAGE level with one SOP Instance UID")
    # --- 2. move forwarding: C-MOVE of a series only QR1 holds, to storescp
    series = A1.series[0]
    rc, final, text = move(A1.uid, series[0])
    ok((rc, final.get("status"), final.get("completed"), final.get("failed")) == (0, 0, 3, 0),
       "C-MOVE of a series only a span node holds: success, 3 completed, none failed",
       f"{final}\n{text[-1500:]}")
    received = dest.received()
    is_(sorted(k for k in received if k in series[2]), sorted(series[2]),
        "storescp received the series")
    same = all(pydicom.dcmread(received[s]) == source[s] for s in series[2] if s in received)
    ok(same, "each data set equal to the source")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = ANY (%s)",
                    (series[2],)), 3, "and kept in the archive")
    like(query_value(conn, "SELECT string_agg(detail, ' | ') FROM mdd.audit_log WHERE action = 'forward'"),
         r"SERIES.*SCU69.*retrieve jobs", "the forwarding is in the audit trail")

    # C-GET of a study only Orthanc holds
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o777)
        cmd = ["getscu", "-d", "-S", "+B", "-od", d, "-aet", SCU, "-aec", our_ae, "-ta", "10", "-td", "90",
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={C1.uid}", HOST, str(DICOM_PORT)]
        rc, text = run(cmd, timeout=120)
        final = (dimse_responses(text, "C-GET RSP") or [{}])[-1]
        ok((rc, final.get("status"), final.get("completed"), final.get("failed")) == (0, 0, 2, 0),
           "C-GET of a study only Orthanc holds: success, 2 completed", f"{final}\n{text[-1500:]}")
        got = {}
        for f in glob.glob(os.path.join(d, "*")):
            ds = pydicom.dcmread(f)
            got[str(ds.SOPInstanceUID)] = ds
        is_(sorted(got), sorted(C1.series[0][2]), "getscu received the study")
        ok(all(got[s] == source[s] for s in got), "each equal to the source")

    # mdd.forward_keep off: a series Orthanc holds is passed on, then removed
    execute(conn, "ALTER SYSTEM SET mdd.forward_keep = off")
    execute(conn, "SELECT pg_reload_conf()")
    time.sleep(1)
    shared = SHARED.series[0]
    rc, final, text = move(SHARED.uid, shared[0])
    ok((rc, final.get("status"), final.get("completed"), final.get("failed")) == (0, 0, 2, 0),
       "forward_keep off: the C-MOVE of a series only span nodes hold succeeds", f"{final}\n{text[-1500:]}")
    received = dest.received()
    ok(all(s in received and pydicom.dcmread(received[s]) == source[s] for s in shared[2]),
       "storescp received it, equal to the source")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and query_value(
            conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = ANY (%s)", (shared[2],)):
        time.sleep(0.2)
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = ANY (%s)", (shared[2],)),
        0, "and it is not kept in the archive")
    is_(query_value(conn, "SELECT count(*) FROM mdd.study WHERE study_instance_uid = %s", (SHARED.uid,)), 0,
        "nor its study, left empty")
    is_(query_value(conn, "SELECT count(*) FROM mdd.copy c WHERE NOT EXISTS "
                          "(SELECT 1 FROM mdd.object o WHERE o.id = c.object)"), 0, "no copy row is left behind")
    ok(query_value(conn, "SELECT count(*) FROM mdd.audit_log WHERE action = 'forward released'") == 1,
       "the removal is in the audit trail")
    rc, rsps, took, out = find(["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={SHARED.uid}", "RetrieveAETitle"])
    is_([str(r.get("RetrieveAETitle", "")) for r in rsps], ["ORTHANC69"],
        "a C-FIND finds the study on Orthanc again, not here")
    execute(conn, "ALTER SYSTEM RESET mdd.forward_keep")
    execute(conn, "SELECT pg_reload_conf()")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = ANY (%s)", (series[2],)), 3,
        "what was forwarded with forward_keep on is still here")

    # --- 3. a node that answers the C-FIND but does not deliver: QR1 stops
    # knowing mdd as a move destination
    qr1.stop()
    qr1.peers = {}
    qr1.start()
    rtstruct = A1.series[1]
    rc, final, text = move(A1.uid, rtstruct[0])
    ok(final.get("status") not in (0, None) and final.get("failed") == 1 and final.get("completed") == 0,
       "a series the node cannot deliver: the C-MOVE fails with one failed sub-operation",
       f"{final}\n{text[-1500:]}")

    # --- 4. option span checked
    e = sql_error(conn, "SELECT mdd.add_node('t69bad', 'BAD69', '127.0.0.1', 1, '{\"span\": \"maybe\"}')")
    is_(getattr(e, "pgcode", None), "22P02", "node option span must be a boolean")
finally:
    stop_peers()
    conn.close()
    cluster("stop", DATADIR)

done_testing()
