#!/usr/bin/python3
# DICOM over TLS, on a cluster of this test (PGPORT + 92; plain DICOM port
# + 93, TLS port + 94) with certificates the test makes with openssl: a CA,
# mdd's certificate and a peer's signed by it, and a rogue CA with a
# certificate of its own.
#   1. mdd as SCP on its TLS port, with DCMTK's echoscu, storescu and
#      findscu +tls: accepted with a good certificate (the audit row of the
#      association says TLS, the protocol and the client's certificate),
#      refused with the rogue certificate and without any, a plain
#      connection to the TLS port fails cleanly, and a node with tls true is
#      refused on the plain port; the service goes on serving after each;
#   2. node option tls: checked (22023), shown in mdd.nodes;
#   3. mdd as SCU over TLS to DCMTK's storescp +tls: mdd.echo and mdd.send
#      (the objects arrive); a peer with the rogue certificate, a peer that
#      does not speak TLS, a peer that does not trust mdd's certificate and
#      a CA file that cannot be read fail with a clear reason and change
#      nothing (and the TLS port refuses connections meanwhile, logged);
#   4. Orthanc with DICOM TLS: mdd.echo, mdd.send, mdd.find and mdd.retrieve
#      (C-MOVE, whose C-STORE sub-operations come back to mdd's TLS port),
#      Orthanc's own C-ECHO to mdd over TLS, and Orthanc's C-MOVE to mdd with
#      itself as destination (mdd's sub-operations over TLS), and storage
#      commitment (Orthanc's N-ACTION to the TLS port, mdd's report over TLS);
#   5. a key that does not match the certificate at server start: the TLS
#      service is off with the reason in the log, plain DICOM is served.
import glob
import os
import shutil
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from dicomtools import StoreSCP, run, unprivileged_user, port_open, HOST  # noqa: E402
from orthanc import Orthanc  # noqa: E402

import warnings  # noqa: E402
warnings.simplefilter("ignore")
import pydicom  # noqa: E402

test_dir = env("MDD_TEST_DIR")
base = int(env("PGPORT"))
PORT, DICOM_PORT, TLS_PORT = base + 92, base + 93, base + 94
datadir = os.path.join(test_dir, "tls58", "pgdata")
work = make_server_dir(os.path.join(test_dir, "t58"), mode=0o755)
certs = make_server_dir(os.path.join(work, "certs"), mode=0o755)
allowed = make_server_dir(os.path.join(test_dir, "allowed", "p58"), mode=0o755)
remote = make_server_dir(os.path.join(work, "remote"), mode=0o755)


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_ca(name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{certs}/{name}.key", "-out", f"{certs}/{name}.pem")


def make_cert(name, ca):
    ext = f"{certs}/{name}.ext"
    with open(ext, "w") as fh:
        fh.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                 "extendedKeyUsage=serverAuth,clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
            "-keyout", f"{certs}/{name}.key", "-out", f"{certs}/{name}.csr")
    openssl("x509", "-req", "-in", f"{certs}/{name}.csr", "-CA", f"{certs}/{ca}.pem",
            "-CAkey", f"{certs}/{ca}.key", "-CAcreateserial", "-days", "2",
            "-extfile", ext, "-out", f"{certs}/{name}.pem")


make_ca("test-ca")
make_ca("rogue-ca")
make_cert("mdd", "test-ca")
make_cert("peer", "test-ca")
make_cert("rogue", "rogue-ca")
for f in glob.glob(f"{certs}/*"):
    os.chmod(f, 0o644)      # the server and the peers run as other users
CA = f"{certs}/test-ca.pem"


def same(got, expected, desc, *diagnostics):
    """is_() with diagnostics when it fails."""
    return ok(got == expected, desc, f"    got: {got!r}, expected: {expected!r}", *diagnostics)


def tls_opts(name, ca=CA):
    return ["+tls", f"{certs}/{name}.key", f"{certs}/{name}.pem", "+cf", ca]


manifest = generate_patient(allowed, "TAP58", 58, slices=3)
other = generate_patient(remote, "TAP58R", 581, slices=3)

cluster("start", datadir, str(PORT), "shared_buffers = 32MB", "max_wal_size = 256MB",
        f"mdd.dicom_port = {DICOM_PORT}", f"mdd.dicom_tls_port = {TLS_PORT}",
        f"mdd.dicom_tls_cert_file = '{certs}/mdd.pem'", f"mdd.dicom_tls_key_file = '{certs}/mdd.key'",
        f"mdd.dicom_tls_ca_file = '{CA}'", f"mdd.allowed_paths = '{test_dir}/allowed'",
        "mdd.job_workers = 1", "mdd.dicom_workers = 2")
conn = None
servers = []


def audit_since(mark, action=None):
    return query(conn, """SELECT action, detail FROM mdd.audit_log WHERE at >= %s
                          AND (%s::text IS NULL OR action = %s) ORDER BY at""", (mark, action, action))


def now():
    return query_value(conn, "SELECT clock_timestamp()")


def echo(node):
    del conn.notices[:]
    return query_value(conn, "SELECT mdd.echo(%s)", (node,)), "".join(conn.notices)


def wait_job(job, timeout="60 s"):
    return query_value(conn, "SELECT mdd.wait(%s, %s)", (job, timeout))


try:
    conn = connect_when_up(PORT)
    execute(conn, "CREATE EXTENSION mdd")
    query(conn, "SELECT * FROM mdd.import(%s)", (allowed,))
    ids = [r[0] for r in query(conn, "SELECT id FROM mdd.objects WHERE patient_id = 'TAP58' AND kind = 'dicom' ORDER BY id")]
    ok(len(ids) >= 3, f"setup: {len(ids)} objects of patient TAP58")
    log = os.path.join(datadir, "server.log")
    like(open(log, errors="replace").read(),
         rf"DICOM TLS service listening on localhost:{TLS_PORT} as AE title \"MDD\" \(profile bcp195-nd, client certificates required\)",
         "the server log says the TLS port listens, with its profile")

    # ------------------------------------------------------------------
    note("--- 1. mdd as SCP on the TLS port")
    execute(conn, "SELECT mdd.add_node('tlspeer', 'TLSPEER', '127.0.0.1', NULL, '{\"tls\": true}')")
    execute(conn, "SELECT mdd.add_node('plainpeer', 'PLAINPEER', '127.0.0.1', NULL)")
    mark = now()
    rc, out = run(["echoscu", *tls_opts("peer"), "-aet", "TLSPEER", "-aec", "MDD", HOST, str(TLS_PORT)])
    same(rc, 0, "echoscu +tls with a certificate of the trusted CA: C-ECHO succeeds", out)
    rows = audit_since(mark, "associate")
    ok(len(rows) == 1 and rows[0][1].startswith("TLSPEER -> MDD: node tlspeer (over TLS TLSv1.")
       and "CN=peer" in rows[0][1],
       "the audit row of the association records TLS, its protocol and the client's certificate", str(rows))

    sample = sorted(f["path"] for f in other["files"] if f["kind"] == "dicom")[0]
    sample_path = os.path.join(remote, sample)
    sample_uid = pydicom.dcmread(sample_path, stop_before_pixels=True).SOPInstanceUID
    rc, out = run(["storescu", *tls_opts("peer"), "-aet", "TLSPEER", "-aec", "MDD", HOST, str(TLS_PORT),
                   sample_path])
    got = query_value(conn, "SELECT source FROM mdd.objects WHERE sop_instance_uid = %s", (sample_uid,))
    ok(rc == 0 and got == "dicom:TLSPEER", "storescu +tls: the object is stored, from TLSPEER", out)

    rc, out = run(["findscu", *tls_opts("peer"), "-aet", "TLSPEER", "-aec", "MDD", "-S",
                   "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=TAP58", "-k", "StudyInstanceUID",
                   HOST, str(TLS_PORT)])
    ok(rc == 0 and "TAP58" in out, "findscu +tls: the studies of TAP58 are found", out)

    mark = now()
    rc, out = run(["echoscu", *tls_opts("rogue"), "-aet", "TLSPEER", "-aec", "MDD", HOST, str(TLS_PORT)],
                  timeout=30)
    ok(rc not in (0, None) and audit_since(mark, "associate") == [],
       "a client certificate of another CA: refused in the handshake, no association", out)
    rc, out = run(["echoscu", "+tla", "+cf", CA, "-aet", "TLSPEER", "-aec", "MDD", HOST, str(TLS_PORT)],
                  timeout=30)
    ok(rc not in (0, None) and audit_since(mark, "associate") == [],
       "a TLS client without certificate: refused (client certificates are required)", out)
    t0 = time.monotonic()
    rc, out = run(["echoscu", "-to", "10", "-ta", "10", "-aet", "PLAINPEER", "-aec", "MDD", HOST,
                   str(TLS_PORT)], timeout=40)
    ok(rc not in (0, None) and time.monotonic() - t0 < 35,
       f"plain DICOM to the TLS port fails ({time.monotonic() - t0:.1f} s)", out)
    time.sleep(0.5)
    like(open(log, errors="replace").read(), r"connection from 127\.0\.0\.1 to the TLS port closed: ",
         "the server log says why connections to the TLS port were closed")
    mark = now()
    rc, out = run(["echoscu", "-aet", "TLSPEER", "-aec", "MDD", HOST, str(DICOM_PORT)])
    rows = audit_since(mark)
    ok(rc != 0 and rows == [("refuse", "TLSPEER -> MDD: node tlspeer uses TLS: it must associate on the TLS port")],
       "a node with tls true is refused on the plain port", out, str(rows))
    rc, out = run(["echoscu", "-aet", "PLAINPEER", "-aec", "MDD", HOST, str(DICOM_PORT)])
    same(rc, 0, "the plain port serves a plain node as before", out)
    rc, out = run(["echoscu", *tls_opts("peer"), "-aet", "TLSPEER", "-aec", "MDD", HOST, str(TLS_PORT)])
    same(rc, 0, "after all these, the TLS port still serves", out)

    # ------------------------------------------------------------------
    note("--- 2. the node option")
    raises(conn, "SELECT mdd.add_node('bad', 'BAD', '127.0.0.1', 104, '{\"tls\": \"yes\"}')", None,
           ["22023"], "tls must be a boolean", r'invalid node option "tls"')
    raises(conn, "SELECT mdd.alter_node('plainpeer', options => '{\"tls\": 1}')", None,
           ["22023"], "alter_node checks it the same way", r'invalid node option "tls"')
    is_(query(conn, "SELECT name, tls FROM mdd.nodes WHERE name IN ('tlspeer', 'plainpeer') ORDER BY name"),
        [("plainpeer", False), ("tlspeer", True)], "mdd.nodes shows tls")

    # ------------------------------------------------------------------
    note("--- 3. mdd as SCU over TLS to storescp +tls")
    user = unprivileged_user()
    scp = StoreSCP(work, "TLSSCP", extra=tls_opts("peer"), user=user).start()
    servers.append(scp)
    execute(conn, "SELECT mdd.add_node('tlsscp', 'TLSSCP', '127.0.0.1', %s, '{\"tls\": true}')", (scp.port,))
    res, notices = echo("tlsscp")
    ok(res is True, "mdd.echo to storescp +tls (which requires mdd's certificate) succeeds", notices, scp.log())
    like(query_value(conn, "SELECT detail FROM mdd.audit_log WHERE action = 'echo' ORDER BY at DESC LIMIT 1"),
         rf"^tlsscp \(TLSSCP at 127\.0\.0\.1:{scp.port}, TLS\): success$", "the audit row of the echo says TLS")
    job = query_value(conn, "SELECT mdd.send(%s, 'tlsscp')", (ids,))
    state = wait_job(job)
    arrived = [f for f in os.listdir(scp.dir)]
    ok(state == "done" and len(arrived) == len(ids), f"mdd.send over TLS: job {state}, {len(arrived)} of {len(ids)} objects arrive",
       str(query_dicts(conn, "SELECT state, error FROM mdd.jobs WHERE id = %s", (job,))), scp.log())

    rogue = StoreSCP(work, "ROGUESCP", extra=tls_opts("rogue", f"{certs}/test-ca.pem"), user=user).start()
    plain = StoreSCP(work, "PLAINSCP", user=user).start()
    picky = StoreSCP(work, "PICKYSCP", extra=tls_opts("peer", f"{certs}/rogue-ca.pem"), user=user).start()
    servers.extend([rogue, plain, picky])
    for name, s, why in [("roguescp", rogue, r"certificate verify failed|certificate"),
                         ("plainscp", plain, r"TLS|handshake|wrong version|packet|unexpected eof"),
                         ("pickyscp", picky, r"TLS|alert|certificate|closed|handshake")]:
        execute(conn, "SELECT mdd.add_node(%s, %s, '127.0.0.1', %s, '{\"tls\": true}')", (name, s.aet, s.port))
        res, notices = echo(name)
        ok(res is False and "over TLS" in notices, f"mdd.echo to {name}: fails", notices)
        like(notices, why, f"... with the reason ({notices.strip()[:160]})")
    count = query_value(conn, "SELECT count(*) FROM mdd.jobs")
    job = query_value(conn, "SELECT mdd.send(%s, 'roguescp')", (ids[:1],))
    time.sleep(3)
    row = query_dicts(conn, "SELECT state, error FROM mdd.jobs WHERE id = %s", (job,))[0]
    ok(row["state"] in ("queued", "running") and "TLS" in (row["error"] or ""),
       f"a send job to the rogue peer waits to retry, with the reason: {row['error']}", str(row))
    ok(os.listdir(rogue.dir) == [], "nothing reached the rogue peer")
    execute(conn, "SELECT mdd.cancel(%s)", (job,))

    execute(conn, f"ALTER SYSTEM SET mdd.dicom_tls_ca_file = '{certs}/missing.pem'")
    execute(conn, "SELECT pg_reload_conf()")
    time.sleep(0.5)
    res, notices = echo("tlsscp")
    ok(res is False and "mdd.dicom_tls_ca_file" in notices and "cannot be read" in notices,
       "a CA file that cannot be read: mdd.echo fails and says which setting", notices)
    mark = now()
    rc, out = run(["echoscu", *tls_opts("peer"), "-aet", "TLSPEER", "-aec", "MDD", HOST, str(TLS_PORT)],
                  timeout=30)
    time.sleep(0.5)
    ok(rc not in (0, None) and audit_since(mark, "associate") == [],
       "... and the TLS port refuses connections meanwhile", out)
    like(open(log, errors="replace").read(),
         r"to the TLS port closed: cannot use the TLS settings: mdd\.dicom_tls_ca_file \".*missing\.pem\" cannot be read",
         "the server log says which setting is wrong")
    rc, out = run(["echoscu", "-aet", "PLAINPEER", "-aec", "MDD", HOST, str(DICOM_PORT)])
    same(rc, 0, "plain DICOM is not affected", out)
    execute(conn, "ALTER SYSTEM RESET mdd.dicom_tls_ca_file")
    execute(conn, f"ALTER SYSTEM SET mdd.dicom_tls_ca_file = '{CA}'")
    execute(conn, "SELECT pg_reload_conf()")
    time.sleep(0.5)
    res, notices = echo("tlsscp")
    ok(res is True, "with the setting back, mdd.echo succeeds again", notices)

    # ------------------------------------------------------------------
    note("--- 4. Orthanc with DICOM TLS")
    odir = make_server_dir(os.path.join(work, "orthanc"), mode=0o755)
    for f in ("peer.pem", "peer.key", "test-ca.pem"):
        shutil.copy(f"{certs}/{f}", odir)
    orthanc = Orthanc(odir, aet="ORTHANC",
                      modalities={"mdd": {"AET": "MDD", "Host": HOST, "Port": TLS_PORT, "UseDicomTls": True}},
                      config={"DicomTlsEnabled": True,
                              "DicomTlsCertificate": f"{odir}/peer.pem",
                              "DicomTlsPrivateKey": f"{odir}/peer.key",
                              "DicomTlsTrustedCertificates": f"{odir}/test-ca.pem",
                              "DicomTlsRemoteCertificateRequired": True})
    servers.append(orthanc)
    try:
        orthanc.start()
        started = True
    except (RuntimeError, OSError) as e:
        ok(False, "Orthanc starts with DICOM TLS", str(e))
        started = False
    if started:
        execute(conn, "SELECT mdd.add_node('orthanc', 'ORTHANC', '127.0.0.1', %s, '{\"tls\": true}')",
                (orthanc.dicom_port,))
        mark = now()
        res, notices = echo("orthanc")
        ok(res is True, "mdd.echo to Orthanc over TLS", notices, orthanc.log_tail())
        status, body = orthanc.post("/modalities/mdd/echo", {})
        same(status, 200, "Orthanc's C-ECHO to mdd's TLS port succeeds", str(body))

        job = query_value(conn, "SELECT mdd.send(%s, 'orthanc')", (ids,))
        state = wait_job(job)
        status, stats = orthanc.get("/statistics")
        ok(state == "done" and isinstance(stats, dict) and stats.get("CountInstances") == len(ids),
           f"mdd.send to Orthanc over TLS: job {state}, Orthanc holds {stats.get('CountInstances') if isinstance(stats, dict) else stats}",
           str(query_dicts(conn, "SELECT state, error FROM mdd.jobs WHERE id = %s", (job,))))

        studies = {}
        for f in other["files"]:
            if f["kind"] == "dicom":
                path = os.path.join(remote, f["path"])
                with open(path, "rb") as fh:
                    st, _ = orthanc.post("/instances", fh.read())
                if st == 200:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                    studies.setdefault(ds.StudyInstanceUID, set()).add(ds.SOPInstanceUID)
        rows = query_dicts(conn, """SELECT location, status, study_instance_uid FROM mdd.find(
                                      patient_id => 'TAP58R', nodes => '{orthanc}', timeout => '20 s')""")
        found = sorted(r["study_instance_uid"] for r in rows if r["location"] == "orthanc" and r["status"] == "ok")
        same(found, sorted(studies), f"mdd.find over TLS finds the {len(studies)} studies Orthanc holds of TAP58R",
             str(rows))
        if found:
            study = max(studies, key=lambda u: len(studies[u]))
            job = query_value(conn, "SELECT mdd.retrieve('orthanc', %s)", (study,))
            state = wait_job(job, "120 s")
            got = {r[0] for r in query(conn, "SELECT sop_instance_uid FROM mdd.objects WHERE study_instance_uid = %s",
                                       (study,))}
            ok(state == "done" and got == studies[study],
               f"mdd.retrieve over TLS (C-MOVE, sub-operations to the TLS port): job {state}, "
               f"{len(got)} of the {len(studies[study])} objects of the study arrive",
               str(query_dicts(conn, "SELECT state, error FROM mdd.jobs WHERE id = %s", (job,))),
               orthanc.log_tail())
            rows = audit_since(mark, "associate")
            ok(any(d.startswith("ORTHANC -> MDD: node orthanc (over TLS") for _, d in rows),
               "Orthanc's associations to mdd came over TLS", str(rows))

        # mdd as C-MOVE SCP: the sub-operations go to Orthanc over TLS
        sent = {r[0]: r[1] for r in query(conn, """SELECT sop_instance_uid, study_instance_uid FROM mdd.objects
                                                  WHERE id = ANY(%s)""", (ids,))}
        for study in set(sent.values()):
            st, found_ids = orthanc.post("/tools/lookup", study.encode())
            for x in (found_ids if st == 200 and isinstance(found_ids, list) else []):
                orthanc.delete(f"/studies/{x['ID']}")
        st, before = orthanc.get("/statistics")
        status, res = orthanc.post("/modalities/mdd/move",
                                   {"Level": "Study", "Resources": [{"StudyInstanceUID": u} for u in sorted(set(sent.values()))],
                                    "TargetAet": "ORTHANC", "Timeout": 60}, timeout=120)
        st, after = orthanc.get("/statistics")
        ok(status == 200 and isinstance(before, dict) and isinstance(after, dict)
           and after.get("CountInstances", 0) - before.get("CountInstances", 0) == len(sent),
           f"Orthanc's C-MOVE to mdd with itself as destination: the {len(sent)} objects arrive over TLS "
           f"(Orthanc held {before.get('CountInstances') if isinstance(before, dict) else before}, then "
           f"{after.get('CountInstances') if isinstance(after, dict) else after})",
           f"    HTTP {status}: {res}", orthanc.log_tail())

        # storage commitment: Orthanc's N-ACTION on the TLS port, mdd's report over TLS
        held = query(conn, "SELECT sop_class_uid, sop_instance_uid FROM mdd.objects WHERE id = ANY(%s)", (ids,))
        status, res = orthanc.post("/modalities/mdd/storage-commitment",
                                   {"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": u} for c, u in held]})
        tx = res.get("ID") if status == 200 and isinstance(res, dict) else None
        outcome = None
        deadline = time.monotonic() + 60
        while tx and time.monotonic() < deadline:
            st, outcome = orthanc.get(f"/storage-commitment/{tx}")
            if st == 200 and isinstance(outcome, dict) and outcome.get("Status") != "Pending":
                break
            time.sleep(0.2)
        ok(isinstance(outcome, dict) and outcome.get("Status") == "Success",
           f"storage commitment over TLS both ways: Orthanc's transaction ends {outcome.get('Status') if isinstance(outcome, dict) else outcome}",
           f"    {status}: {res}", str(query_dicts(conn, "SELECT state, error FROM mdd.jobs WHERE kind = 'commit'")))

    # ------------------------------------------------------------------
    note("--- 5. a key that is not the certificate's, at server start")
    execute(conn, f"ALTER SYSTEM SET mdd.dicom_tls_key_file = '{certs}/rogue.key'")
    conn.close()
    conn = None
    size = os.path.getsize(log)
    cluster("stop", datadir)
    cluster("start", datadir, str(PORT))
    conn = connect_when_up(PORT)
    time.sleep(1)
    with open(log, errors="replace") as fh:
        fh.seek(size)
        text = fh.read()
    like(text, r"mdd: DICOM TLS service off: mdd\.dicom_tls_key_file \".*rogue\.key\" is not the key of the "
               r"certificate in mdd\.dicom_tls_cert_file",
         "the server starts, its log says the TLS service is off and why")
    ok(not port_open(TLS_PORT), "the TLS port does not listen")
    rc, out = run(["echoscu", "-aet", "PLAINPEER", "-aec", "MDD", HOST, str(DICOM_PORT)])
    same(rc, 0, "plain DICOM is served", out)
    execute(conn, "ALTER SYSTEM RESET mdd.dicom_tls_key_file")
finally:
    for s in servers:
        try:
            s.stop()
        except Exception:  # noqa: BLE001
            pass
    if conn is not None:
        conn.close()
    cluster("stop", datadir)

done_testing()
