#!/usr/bin/python3
# mdd.find (query spanning) and mdd.patient_list against real peers started
# here on 127.0.0.1: two DCMTK dcmqrscp archives with different data (the
# second answers in ISO 8859-1 whatever it is asked), Orthanc as a third
# PACS, a node that is down (nothing listens on its port) and two that
# accept TCP connections but never answer (a listener thread of this test):
#   1. one call returns the local catalog's matches and every peer's, each
#      compared with what the peer holds, within the silent nodes' time
#      limit (they run in parallel: two of them cost one limit), with one
#      status row for the node that is down and one for each silent node;
#   2. STUDY, SERIES and IMAGE levels; person-name wildcards, date ranges,
#      modality and UID filters, on the catalog and the peers alike; a
#      Latin-1 patient name decoded from dcmqrscp and Orthanc;
#   3. the nodes argument ('local' among them), node options find and
#      find_timeout, a refused association, the overall timeout;
#   4. a statement timeout and pg_cancel_backend during a find: the query
#      ends at once and no find worker is left within two seconds;
#   5. bad arguments with their SQLSTATEs; mdd_reader may call mdd.find and
#      mdd.patient_list; audit rows;
#   6. mdd.patient_list: series here online, here archived, and on the nodes.
import datetime
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from orthanc import ORTHANC, Orthanc  # noqa: E402
from qrscp import QRSCP  # noqa: E402
from silent import SilentListener  # noqa: E402

warnings.simplefilter("ignore")
import psycopg2  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

test_dir = env("MDD_TEST_DIR")
HOST = "127.0.0.1"
# a cluster of the test's own: "every node" and the local catalog hold
# exactly what this test put there
PORT = int(env("PGPORT")) + 67
DICOM_PORT = int(env("MDD_DICOM_PORT")) + 67
DATADIR = os.path.join(test_dir, "find67")
if not os.access(ORTHANC, os.X_OK):
    skip_all(f"{ORTHANC} is not installed (Debian package orthanc)")

TIME_LIMIT = 150
SILENT_LIMIT = 2.0          # find_timeout of the silent nodes, seconds


def _too_long(signum, frame):
    raise TimeoutError(f"67_find.t still running after {TIME_LIMIT} s")


signal.signal(signal.SIGALRM, _too_long)
signal.alarm(TIME_LIMIT)

# ---------------------------------------------------------------------------
# test data: small studies written with pydicom


def uid(*parts):
    digest = hashlib.sha256("|".join(("mdd-t67",) + parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


class Study:
    """A study of the test: series of a modality with a number of instances."""

    def __init__(self, key, patient_id, patient_name, date, series, charset="ISO_IR 192",
                 accession=None, description=None):
        self.key = key
        self.patient_id = patient_id
        self.patient_name = patient_name
        self.date = date
        self.charset = charset
        self.accession = accession or "ACC" + key
        self.description = description or f"Study {key}"
        self.uid = uid("study", key)
        self.series = []        # (series UID, modality, description, [SOP UIDs])
        for n, (modality, count) in enumerate(series):
            s_uid = uid("series", key, str(n))
            self.series.append((s_uid, modality, f"{modality} series {n + 1}",
                                [uid("sop", key, str(n), str(i)) for i in range(count)]))

    def instances(self):
        return [(s, i) for s in self.series for i in s[3]]

    def write(self, directory):
        paths = []
        for (s_uid, modality, s_desc, sops) in self.series:
            for number, sop in enumerate(sops):
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
                meta.MediaStorageSOPInstanceUID = sop
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1.67"
                ds = Dataset()
                ds.file_meta = meta
                ds.SpecificCharacterSet = self.charset
                ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
                ds.SOPInstanceUID = sop
                ds.StudyDate = self.date
                ds.SeriesDate = self.date
                ds.StudyTime = "101500"
                ds.AccessionNumber = self.accession
                ds.Modality = modality
                ds.ConversionType = "WSD"
                ds.StudyDescription = self.description
                ds.SeriesDescription = s_desc
                ds.PatientName = self.patient_name
                ds.PatientID = self.patient_id
                ds.PatientBirthDate = "19500101"
                ds.PatientSex = "F"
                ds.StudyInstanceUID = self.uid
                ds.SeriesInstanceUID = s_uid
                ds.StudyID = self.key
                ds.SeriesNumber = str(self.series.index((s_uid, modality, s_desc, sops)) + 1)
                ds.InstanceNumber = str(number + 1)
                ds.Rows = 4
                ds.Columns = 4
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.BitsAllocated = 8
                ds.BitsStored = 8
                ds.HighBit = 7
                ds.PixelRepresentation = 0
                ds.PixelData = bytes(range(16))
                path = os.path.join(directory, f"{sop}.dcm")
                ds.save_as(path, write_like_original=False)
                paths.append(path)
        return paths


LATIN1 = "ISO_IR 100"
studies = {
    # here, in mdd's catalog
    "local": [Study("L1", "P67L", "SMITHSON^LOCAL", "20240110", [("CT", 2), ("RTSTRUCT", 1)]),
              Study("L2", "P67L", "SMITHSON^LOCAL", "20240305", [("MR", 1)]),
              Study("L3", "P67B", "BAKER^LEO", "20230620", [("CT", 1)])],
    # the first dcmqrscp; P67L also has a study there that mdd does not hold
    "qr1": [Study("A1", "P67A1", "SMITH^JOHN", "20240115", [("CT", 2), ("MR", 1)]),
            Study("A2", "P67A2", "SMITHERS^ANNA", "20240203", [("MR", 2)]),
            Study("A3", "P67A3", "JONES^BOB", "20231130", [("CT", 1)]),
            Study("A4", "P67L", "SMITHSON^LOCAL", "20231201", [("PT", 2)])],
    # the second, answering in Latin-1
    "qr2": [Study("B1", "P67B1", "MÜLLER^JÖRG", "20240120", [("CT", 1), ("RTPLAN", 1)], charset=LATIN1),
            Study("B2", "P67B2", "SMITH^JANE", "20220505", [("MR", 3)]),
            Study("B3", "P67B3", "GARÇON^RENÉ", "20240131", [("CT", 2)], charset=LATIN1)],
    # Orthanc
    "orthanc": [Study("C1", "P67C1", "SMITH^KARL", "20240101", [("CT", 1)]),
                Study("C2", "P67C2", "ÅSTRÖM^ÉVA", "20240229", [("MR", 2), ("CT", 1)], charset=LATIN1)],
}
data_dir = make_server_dir(os.path.join(test_dir, "allowed", "t67"), mode=0o755)
paths = {}
for where, ss in studies.items():
    d = os.path.join(data_dir, where)
    os.makedirs(d, exist_ok=True)
    paths[where] = [p for s in ss for p in s.write(d)]
    for p in paths[where]:
        os.chmod(p, 0o644)
    os.chmod(d, 0o755)


def expected_studies(where, pred=lambda s: True):
    return {(where, s.uid) for s in studies[where] if pred(s)}


def everywhere():
    return ["local", "qr1", "qr2", "orthanc"]

# ---------------------------------------------------------------------------
# the peers


cluster("start", DATADIR, str(PORT), f"mdd.dicom_port = {DICOM_PORT}", "mdd.job_workers = 1",
        f"mdd.allowed_paths = '{test_dir}/allowed'")
conn = connect_when_up(PORT)
execute(conn, "CREATE EXTENSION mdd")
execute(conn, "SET mdd.find_timeout = '20s'")
our_ae = query_value(conn, "SHOW mdd.ae_title")
peers_dir = make_server_dir(os.path.join(test_dir, "t67-peers"), mode=0o755)
qr1 = QRSCP(os.path.join(peers_dir, "qr1"), "QR67A")
qr2 = QRSCP(os.path.join(peers_dir, "qr2"), "QR67B", extra=["-Cr", "+L1"])
orthanc = Orthanc(os.path.join(peers_dir, "orthanc"), aet="ORTHANC67",
                  modalities={"mdd": [our_ae, HOST, DICOM_PORT]})
silent = SilentListener()
silent2 = SilentListener()


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


down_port = free_port()


def stop_peers():
    qr1.stop()
    qr2.stop()
    orthanc.stop()
    silent.stop()
    silent2.stop()


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
except Exception:
    stop_peers()
    cluster("stop", DATADIR)
    raise

try:
    ok(len(qr1.indexed()) == len(paths["qr1"]) and len(qr2.indexed()) == len(paths["qr2"]),
       "both dcmqrscp archives hold their instances")
    for p in paths["local"]:
        execute(conn, "SELECT mdd.store_file(%s)", (p,))

    for name, ae, port, options in (
            ("t67qr1", qr1.aet, qr1.port, "{}"),
            ("t67qr2", qr2.aet, qr2.port, "{}"),
            ("t67orthanc", "ORTHANC67", orthanc.dicom_port, "{}"),
            ("t67down", "DOWN67", down_port, "{}"),
            ("t67silent", "SILENT67", silent.port, f'{{"find_timeout": {SILENT_LIMIT}}}'),
            ("t67silent2", "SILENT67B", silent2.port, f'{{"find_timeout": {SILENT_LIMIT}}}'),
            ("t67wrongae", "NOTQR67B", qr2.port, '{"find": false}'),
            ("t67noport", "NOPORT67", None, "{}")):
        execute(conn, "SELECT mdd.add_node(%s, %s, %s, %s, %s)",
                (name, ae, HOST if port else None, port, options))
    # nodes of other tests of this cluster are left out of the calls below
    ALL = ["local", "t67qr1", "t67qr2", "t67orthanc", "t67down", "t67silent", "t67silent2"]
    loc = {"t67qr1": "qr1", "t67qr2": "qr2", "t67orthanc": "orthanc", "local": "local"}

    def find(sql_args="", params=(), nodes=ALL, conn=conn):
        """mdd.find with these arguments over nodes; (rows as dicts, seconds)."""
        args = (sql_args + ", " if sql_args else "") + "nodes => %s"
        t0 = time.monotonic()
        rows = query_dicts(conn, f"SELECT * FROM mdd.find({args})", tuple(params) + (nodes,))
        return rows, time.monotonic() - t0

    def matches(rows):
        return [r for r in rows if r["status"] == "ok"]

    def statuses(rows):
        return {r["location"]: r["status"] for r in rows if r["status"] != "ok"}

    def keyset(rows, key="study_instance_uid"):
        return {(loc.get(r["location"], r["location"]), r[key]) for r in matches(rows)}

    def find_workers(c):
        return query_value(c, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'mdd find worker'")

    def wait_no_workers(c, seconds=2.0):
        deadline = time.monotonic() + seconds
        while True:
            n = find_workers(c)
            if n == 0 or time.monotonic() >= deadline:
                return n
            time.sleep(0.05)

    # --- 1. everything, at STUDY level
    rows, took = find()
    want = set().union(*(expected_studies(w) for w in everywhere()))
    is_deeply(keyset(rows), want, "STUDY level: the studies of the catalog and of each PACS")
    st = statuses(rows)
    like(st.get("t67down"), r"^unreachable: ", "the node that is down: one 'unreachable' row")
    is_(st.get("t67silent"), "timeout after 2 s", "a node that never answers: 'timeout after 2 s'")
    is_(st.get("t67silent2"), "timeout after 2 s", "and so does the second")
    is_(sorted(st), ["t67down", "t67silent", "t67silent2"], "no other node has a status row")
    is_(len([r for r in rows if r["location"] == "t67down"]), 1, "exactly one row for the node that is down")
    ok(SILENT_LIMIT - 0.1 <= took < SILENT_LIMIT + 1.5,
       f"the call returns after the silent nodes' limit, in parallel ({took:.2f} s)")
    ok(silent.accepted >= 1 and silent2.accepted >= 1, "both silent nodes were connected to")
    by_uid = {r["study_instance_uid"]: r for r in matches(rows)}
    a1 = studies["qr1"][0]
    r = by_uid.get(a1.uid, {})
    is_((r.get("location"), r.get("level"), r.get("patient_id"), r.get("patient_name"), r.get("study_date"),
         r.get("description"), r.get("series_instance_uid")),
        ("t67qr1", "STUDY", "P67A1", "SMITH^JOHN", "20240115", "Study A1", None),
        "a dcmqrscp study row: location, level, patient, date, description")
    l1 = studies["local"][0]
    r = by_uid.get(l1.uid, {})
    is_((r.get("location"), r.get("patient_name"), r.get("study_date"), r.get("modality"), r.get("instances")),
        ("local", "SMITHSON^LOCAL", "20240110", "CT\\RTSTRUCT", 3),
        "a local study row: modalities in study and instance count")
    c2 = studies["orthanc"][1]
    r = by_uid.get(c2.uid, {})
    is_((r.get("location"), r.get("patient_name"), r.get("instances")), ("t67orthanc", "ÅSTRÖM^ÉVA", 3),
        "an Orthanc study row: Latin-1 name decoded, instance count")
    b1 = studies["qr2"][0]
    # what the second dcmqrscp sends, asked as mdd asks (in UTF-8): ISO 8859-1
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o777)
        subprocess.run(["findscu", "-S", "-X", "-od", d, "-aet", our_ae, "-aec", qr2.aet,
                        "-k", "QueryRetrieveLevel=STUDY", "-k", "SpecificCharacterSet=ISO_IR 192",
                        "-k", f"StudyInstanceUID={b1.uid}", "-k", "PatientName", HOST, str(qr2.port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=30,
                       env=dict(os.environ, TCP_NODELAY="1"))
        raw = b"".join(open(os.path.join(d, f), "rb").read() for f in os.listdir(d))
    ok(b"ISO_IR 100" in raw and "MÜLLER".encode("latin-1") in raw and "MÜLLER".encode() not in raw,
       "the second dcmqrscp answers in ISO 8859-1 even when asked in UTF-8")
    is_(by_uid.get(b1.uid, {}).get("patient_name"), "MÜLLER^JÖRG",
        "a name dcmqrscp answers in ISO 8859-1 comes back decoded")
    is_(by_uid.get(studies["qr2"][2].uid, {}).get("patient_name"), "GARÇON^RENÉ", "and another")
    is_(wait_no_workers(conn), 0, "no find worker is left within two seconds of the call")

    # --- 2. levels and filters (without the silent nodes, to keep it quick)
    PEERS = ["local", "t67qr1", "t67qr2", "t67orthanc"]
    rows, took = find("level => 'SERIES'", nodes=PEERS)
    want = {(w, s[0]) for w in everywhere() for st_ in studies[w] for s in st_.series}
    is_deeply(keyset(rows, "series_instance_uid"), want, "SERIES level: every series, here and there")
    is_(statuses(rows), {}, "no status rows from nodes that answered")
    a1_ct = a1.series[0]
    r = next((x for x in rows if x["series_instance_uid"] == a1_ct[0]), {})
    is_((r.get("study_instance_uid"), r.get("patient_id"), r.get("patient_name"), r.get("study_date"),
         r.get("modality"), r.get("level")),
        (a1.uid, "P67A1", "SMITH^JOHN", "20240115", "CT", "SERIES"),
        "a series row carries its study's patient and date, and its modality")
    r = next((x for x in rows if x["series_instance_uid"] == c2.series[0][0]), {})
    is_((r.get("description"), r.get("instances"), r.get("patient_name")), (c2.series[0][2], 2, "ÅSTRÖM^ÉVA"),
        "Orthanc gives the description and instance count of a series")

    rows, took = find("level => 'IMAGE'", nodes=PEERS)
    want = {(w, sop) for w in everywhere() for st_ in studies[w] for (_, sop) in st_.instances()}
    is_deeply(keyset(rows, "sop_instance_uid"), want, "IMAGE level: every instance, here and there")
    r = next((x for x in rows if x["sop_instance_uid"] == b1.series[1][3][0]), {})
    is_((r.get("series_instance_uid"), r.get("modality"), r.get("patient_name"), r.get("level")),
        (b1.series[1][0], "RTPLAN", "MÜLLER^JÖRG", "IMAGE"), "an instance row carries its series and patient")

    rows, _ = find("patient_name => 'SMITH*'", nodes=PEERS)
    want = {(w, s.uid) for w in everywhere() for s in studies[w] if s.patient_name.startswith("SMITH")}
    is_deeply(keyset(rows), want, "patient_name 'SMITH*' matches SMITH, SMITHERS and SMITHSON everywhere")
    rows, _ = find("patient_name => 'smithson*'", nodes=["local"])
    is_deeply(keyset(rows), expected_studies("local", lambda s: s.patient_name.startswith("SMITHSON")),
              "the catalog matches person names regardless of case")
    rows, _ = find("patient_name => 'MÜ*LLER^J*'", nodes=PEERS)
    is_deeply(keyset(rows), {("qr2", b1.uid)}, "a wildcard with a Latin-1 letter, on a node that answers in Latin-1")
    rows, _ = find("patient_name => 'SMITH^JO?N'", nodes=PEERS)
    is_deeply(keyset(rows), {("qr1", a1.uid)}, "'?' matches one character")

    rows, _ = find("study_date => '20240101-20240131'", nodes=PEERS)
    want = {(w, s.uid) for w in everywhere() for s in studies[w] if "20240101" <= s.date <= "20240131"}
    is_deeply(keyset(rows), want, "study_date '20240101-20240131': the January 2024 studies everywhere")
    rows, _ = find("study_date => '-20231231'", nodes=PEERS)
    want = {(w, s.uid) for w in everywhere() for s in studies[w] if s.date <= "20231231"}
    is_deeply(keyset(rows), want, "an open-start range")
    rows, _ = find("study_date => '20240201-'", nodes=PEERS)
    want = {(w, s.uid) for w in everywhere() for s in studies[w] if s.date >= "20240201"}
    is_deeply(keyset(rows), want, "an open-end range")
    rows, _ = find("study_date => '20240229'", nodes=PEERS)
    is_deeply(keyset(rows), {("orthanc", c2.uid)}, "a single date")

    rows, _ = find("patient_id => 'P67L'", nodes=PEERS)
    is_deeply(keyset(rows), {("local", studies["local"][0].uid), ("local", studies["local"][1].uid),
                             ("qr1", studies["qr1"][3].uid)}, "patient_id: here and on a PACS")
    rows, _ = find("study_instance_uid => %s", (a1.uid + "\\" + c2.uid,), nodes=PEERS)
    is_deeply(keyset(rows), {("qr1", a1.uid), ("orthanc", c2.uid)}, "a list of study UIDs")
    rows, _ = find("accession_number => 'ACCB2'", nodes=PEERS)
    is_deeply(keyset(rows), {("qr2", studies["qr2"][1].uid)}, "accession_number")
    rows, _ = find("modality => 'MR', level => 'SERIES'", nodes=PEERS)
    want = {(w, s[0]) for w in everywhere() for st_ in studies[w] for s in st_.series if s[1] == "MR"}
    is_deeply(keyset(rows, "series_instance_uid"), want, "modality at SERIES level: the MR series")
    rows, _ = find("modality => 'RT*', level => 'SERIES'", nodes=PEERS)
    want = {(w, s[0]) for w in everywhere() for st_ in studies[w] for s in st_.series if s[1].startswith("RT")}
    is_deeply(keyset(rows, "series_instance_uid"), want, "a modality wildcard at SERIES level")
    rows, _ = find("modality => 'MR'", nodes=["local", "t67orthanc"])
    want = {(w, s.uid) for w in ("local", "orthanc") for s in studies[w] if any(x[1] == "MR" for x in s.series)}
    is_deeply(keyset(rows), want, "modality at STUDY level (Modalities in Study) here and on Orthanc")
    rows, _ = find("patient_id => 'P67A1', modality => 'CT', level => 'IMAGE'", nodes=PEERS)
    is_deeply(keyset(rows, "sop_instance_uid"), {("qr1", sop) for sop in a1.series[0][3]},
              "IMAGE level under patient and modality filters")

    # --- 3. nodes, options, refusals, timeout
    rows, _ = find(nodes=["t67qr1"])
    is_deeply({r["location"] for r in rows}, {"t67qr1"}, "nodes => {t67qr1}: only that node, not the catalog")
    rows, _ = find(nodes=["local", "t67qr2", "t67qr2"])
    is_deeply(keyset(rows), expected_studies("local") | expected_studies("qr2"),
              "nodes => {local, t67qr2, t67qr2}: the catalog and that node, once")
    rows, _ = find(nodes=[])
    is_(rows, [], "nodes => {}: nothing searched, nothing found")
    rows = query_dicts(conn, "SELECT * FROM mdd.find(study_instance_uid => %s)", (a1.uid,))
    ok(("t67qr1", "ok") in {(r["location"], r["status"]) for r in rows}
       and "t67wrongae" not in {r["location"] for r in rows}
       and "t67noport" not in {r["location"] for r in rows},
       "nodes NULL: every node that may be queried, not those with find false or without a port",
       f"{[(r['location'], r['status']) for r in rows]}")
    e = raises(conn, "SELECT * FROM mdd.find(nodes => '{t67wrongae}')", None, "42501",
               "a node with option find false is refused", "may not be queried")
    execute(conn, "UPDATE mdd.node SET options = '{}' WHERE name = 't67wrongae'")
    rows, _ = find(nodes=["t67wrongae"])
    like(statuses(rows).get("t67wrongae"), r"^refused: .*rejected the association",
         "a PACS that rejects the called AE title: 'refused' with the reason")
    rows, took = find("timeout => '1 s'", nodes=["t67qr1", "t67silent"])
    is_(statuses(rows).get("t67silent"), "timeout after 1 s", "the call's timeout caps a node's own")
    ok(took < 2.0, f"and the call returns by then ({took:.2f} s)")
    ok(expected_studies("qr1") <= keyset(rows), "the other node's rows still come back")
    execute(conn, "SET mdd.find_timeout = '700ms'")
    execute(conn, "UPDATE mdd.node SET options = '{}' WHERE name = 't67silent2'")
    rows, took = find(nodes=["t67silent2"])
    is_(statuses(rows).get("t67silent2"), "timeout after 0.7 s", "mdd.find_timeout is the default node limit")
    execute(conn, "SET mdd.find_timeout = '20s'")

    # more nodes than free worker slots: the later ones wait for a slot
    free = query_value(conn, """SELECT current_setting('max_worker_processes')::int - count(*)
                                FROM pg_stat_activity WHERE backend_type NOT IN
                                ('client backend', 'checkpointer', 'background writer', 'walwriter',
                                 'startup', 'archiver', 'autovacuum launcher')""")
    many = [f"t67many{i}" for i in range(max(free, 0) + 3)]
    for name in many:
        execute(conn, "SELECT mdd.add_node(%s, 'ORTHANC67', %s, %s)", (name, HOST, orthanc.dicom_port))
    rows, took = find(nodes=many)
    is_deeply({(r["location"], r["study_instance_uid"]) for r in matches(rows)},
              {(n, s.uid) for n in many for s in studies["orthanc"]},
              f"{len(many)} nodes with {free} free worker slots: every node answers, the later ones after a slot frees",
              )
    is_(statuses(rows), {}, "and none times out")
    execute(conn, "DELETE FROM mdd.node WHERE name LIKE 't67many%'")

    # --- 4. cancel: no worker left behind
    watcher = connect(port=PORT)
    execute(conn, "UPDATE mdd.node SET options = '{\"find_timeout\": 30}' WHERE name IN ('t67silent', 't67silent2')")
    execute(conn, "SET statement_timeout = '800ms'")
    t0 = time.monotonic()
    e = sql_error(conn, "SELECT * FROM mdd.find(nodes => %s, timeout => '60 s')",
                  (["local", "t67qr1", "t67silent", "t67silent2", "t67orthanc"],))
    took = time.monotonic() - t0
    execute(conn, "RESET statement_timeout")
    is_(e.pgcode if e else None, "57014", "a statement timeout cancels mdd.find")
    ok(took < 2.0, f"at once ({took:.2f} s)")
    is_(wait_no_workers(watcher), 0, "no find worker is left within two seconds")

    victim = connect(port=PORT)
    pid = query_value(victim, "SELECT pg_backend_pid()")
    outcome = {}

    def run_victim():
        outcome["error"] = sql_error(victim, "SELECT * FROM mdd.find(nodes => %s, timeout => '60 s')",
                                     (["t67silent", "t67silent2", "t67qr2"],))

    th = threading.Thread(target=run_victim)
    th.start()
    deadline = time.monotonic() + 10
    while find_workers(watcher) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    ok(find_workers(watcher) >= 2, "the find workers show in pg_stat_activity while they run")
    t0 = time.monotonic()
    query_value(watcher, "SELECT pg_cancel_backend(%s)", (pid,))
    th.join(10)
    took = time.monotonic() - t0
    e = outcome.get("error")
    is_(e.pgcode if e else None, "57014", "pg_cancel_backend cancels mdd.find")
    ok(took < 2.0, f"at once ({took:.2f} s)")
    is_(wait_no_workers(watcher), 0, "no find worker is left within two seconds")
    rows, _ = find(nodes=["t67qr1"], conn=victim)
    is_deeply(keyset(rows), expected_studies("qr1"), "the cancelled session finds again")
    victim.close()
    execute(conn, f"UPDATE mdd.node SET options = '{{\"find_timeout\": {SILENT_LIMIT}}}' "
                  "WHERE name IN ('t67silent', 't67silent2')")

    # --- 5. bad arguments, roles, audit
    raises(conn, "SELECT * FROM mdd.find(nodes => '{local,t67nosuch}')", None, "42704",
           "an unknown node: 42704", "t67nosuch")
    raises(conn, "SELECT * FROM mdd.find(level => 'PATIENT')", None, "22023", "level PATIENT: 22023")
    raises(conn, "SELECT * FROM mdd.find(level => 'FOO')", None, "22023", "an unknown level: 22023", "FOO")
    raises(conn, "SELECT * FROM mdd.find(study_date => '2024-01-01')", None, "22007",
           "an ISO date instead of a DICOM one: 22007")
    raises(conn, "SELECT * FROM mdd.find(study_date => '20240230')", None, "22007", "an impossible date: 22007")
    raises(conn, "SELECT * FROM mdd.find(timeout => '0 s')", None, "22023", "a zero timeout: 22023")
    raises(conn, "SELECT * FROM mdd.find(nodes => '{t67noport}')", None, "22023",
           "a node without a port: 22023", "no host and port")
    raises(conn, "SELECT mdd.add_node('local', 'LOCAL67', '127.0.0.1', 1)", None, "22023",
           "no node may be called 'local'")
    raises(conn, "SELECT mdd.add_node('t67bad', 'BAD67', '127.0.0.1', 1, '{\"find_timeout\": \"soon\"}')", None,
           "22023", "find_timeout must be a number of seconds")
    raises(conn, "SELECT * FROM mdd.find(patient_name => repeat('X', 5000), nodes => '{t67qr1}')", None, "22001",
           "a filter too long to send: 22001")
    execute(conn, "SELECT mdd.add_node('t67nohost', 'NOHOST67', 'no-such-host.invalid', 104)")
    rows, _ = find(nodes=["t67nohost", "t67qr1"])
    like(statuses(rows).get("t67nohost"), r"^unreachable: ", "a host name that does not resolve: 'unreachable'")
    ok(expected_studies("qr1") <= keyset(rows), "beside it the other node answers")
    execute(conn, "DELETE FROM mdd.node WHERE name = 't67nohost'")
    is_(query(conn, """SELECT name, may_find, extract(epoch FROM find_timeout)::float FROM mdd.nodes
                       WHERE name IN ('t67qr1', 't67silent', 't67noport') ORDER BY name"""),
        [("t67noport", False, None), ("t67qr1", True, None), ("t67silent", True, SILENT_LIMIT)],
        "mdd.nodes shows may_find and find_timeout")
    rows, _ = find("level => 'series'", nodes=["local"])
    ok(rows and all(r["level"] == "SERIES" for r in rows), "the level may be given in lower case")

    execute(conn, """DO $$ BEGIN
                       IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 't67reader') THEN
                         CREATE ROLE t67reader LOGIN IN ROLE mdd_reader;
                       END IF; END $$""")
    reader = connect(user="t67reader", port=PORT)
    rows, _ = find(nodes=["local", "t67qr1"], conn=reader)
    is_deeply(keyset(rows), expected_studies("local") | expected_studies("qr1"), "mdd_reader may call mdd.find")
    ok(len(query(reader, "SELECT * FROM mdd.patient_list('P67L')")) > 0, "and mdd.patient_list")
    raises(reader, "SELECT * FROM mdd._find_spanning('STUDY', NULL, NULL, NULL, NULL, NULL, NULL, true,"
           " '{}', '{}', '{}', '{}', '{}', 1000)", None, "42501", "but not the internal function")
    reader.close()
    audit = query_value(conn, """SELECT detail FROM mdd.audit_log WHERE action = 'find' AND role = 't67reader'
                                 ORDER BY at DESC LIMIT 1""")
    like(audit, r"level STUDY.*in local, t67qr1", "mdd.find is in the audit log with its nodes")

    # --- 6. patient_list: here online, here archived, on the nodes
    archive_root = make_server_dir(os.path.join(test_dir, "allowed", "archive67"))
    execute(conn, "SELECT mdd.add_storage('archive67', 'file', 'archive', %s)",
            (f'{{"root": "{archive_root}"}}',))
    l1_ct = l1.series[0]
    ids = [r[0] for r in query(conn, "SELECT id FROM mdd.objects WHERE series_instance_uid = %s", (l1_ct[0],))]
    job = query_value(conn, "SELECT mdd.archive(%s, 'archive67', false)", (ids,))
    is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (job,)), "done", "one local series is archived")
    execute(conn, "SELECT mdd.store_document('P67L', 'a report', 'report.txt', 'text/plain', 'Report', %s)",
            (l1.uid,))

    pl = query_dicts(conn, "SELECT * FROM mdd.patient_list('P67L')")
    got = {(r["location"], r["tier"], r["kind"], r["series_instance_uid"], r["objects"]) for r in pl}
    want = {("local", "archive", "dicom", l1_ct[0], 2), ("local", "online", "dicom", l1.series[1][0], 1),
            ("local", "online", "dicom", studies["local"][1].series[0][0], 1),
            ("local", "online", "document", None, 1)}
    is_deeply(got, want, "patient_list: each local series with its tier, and the document")
    r = next((x for x in pl if x["series_instance_uid"] == l1_ct[0]), {})
    is_((r.get("study_instance_uid"), str(r.get("study_date")), r.get("modality"), r.get("series_description"),
         r.get("status")), (l1.uid, "2024-01-10", "CT", l1_ct[2], "ok"), "with its study, date and modality")
    ok(all(r["bytes"] and r["bytes"] > 0 for r in pl), "and the bytes held here")
    doc = next((x for x in pl if x["kind"] == "document"), {})
    is_((doc.get("series_description"), doc.get("study_instance_uid")), ("Report", l1.uid),
        "the document row has its description and study")

    execute(conn, "UPDATE mdd.node SET options = '{\"find\": false}' "
                  "WHERE name IN ('t67silent', 't67silent2', 't67wrongae')")
    pl = query_dicts(conn, "SELECT * FROM mdd.patient_list('P67L', include_remote => true)")
    remote = {(r["location"], r["series_instance_uid"], r["objects"]) for r in pl
              if r["location"] != "local" and r["status"] == "ok"}
    a4 = studies["qr1"][3]
    ok(("t67qr1", a4.series[0][0], None) in remote or ("t67qr1", a4.series[0][0], 2) in remote,
       "include_remote: the series the first dcmqrscp holds of the patient", f"{remote}")
    is_({x[0] for x in remote}, {"t67qr1"}, "and nothing from nodes that do not hold the patient")
    r = next((x for x in pl if x["location"] == "t67qr1"), {})
    is_((r.get("study_instance_uid"), str(r.get("study_date")), r.get("modality"), r.get("tier"), r.get("kind")),
        (a4.uid, "2023-12-01", "PT", None, "dicom"), "a remote row: study, date, modality, no tier")
    like({r["location"]: r["status"] for r in pl}.get("t67down"), r"^unreachable: ",
         "a node that is down gives its status row in the list")
    is_([r["location"] for r in pl if r["study_date"] is not None][0], "t67qr1",
        "the list is in date order: the remote study of December 2023 first")
    is_(wait_no_workers(watcher), 0, "no find worker is left")
    watcher.close()
finally:
    stop_peers()
    conn.close()
    cluster("stop", DATADIR)

done_testing()
