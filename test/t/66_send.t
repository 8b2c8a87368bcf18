#!/usr/bin/python3
# mdd.send: C-STORE of archived objects to a registered node, as a job,
# against DCMTK's storescp (+B, run unprivileged, one per case on a free
# port of 127.0.0.1):
#   1. bad requests: unknown node, node without host and port, node that may
#      not be sent to (option "send": false; also refused as C-MOVE
#      destination), empty, NULL and unknown object ids, a document: clear
#      SQLSTATEs and no job;
#   2. a CT series, its RT Structure Set and RT Plan to a planning system:
#      the job ends done with the right counts and bytes, exactly these
#      objects arrive with data sets byte-identical to the stored ones, the
#      structure set and plan after the images; audit rows ('send requested',
#      one 'send' per object, 'send done'); include_related sends what
#      travels with a structure set;
#   3. objects archived to a file storage of the archive tier are sent from
#      there, byte-identical; one of them corrupted behind mdd's back fails
#      alone, with the checksum as reason, and is not sent;
#   4. transfer syntaxes: a JPEG object to a receiver of uncompressed data
#      fails with a clear reason while the others go (job failed, failed 1);
#      the JPEG object alone (the receiver accepts no context) fails the
#      same way; to storescp +xa it arrives byte-identical in JPEG; explicit
#      VR objects to storescp +xi arrive in implicit VR, every element
#      (pixel data included) equal;
#   5. failures of the node: nothing listening (the job retries, attempts
#      grow, error says why, and it completes once storescp starts); an
#      association aborted at each C-STORE (the job gives up after
#      max_attempts with the reason, nothing counted as sent); cancel in
#      the middle of a job;
#   6. roles: a reader may not send, an operator may;
#   7. a restart of the server in the middle of a send job (a cluster of
#      this test): the job goes on after it, every object arrives, and
#      objects already sent are not sent again (at most the one in flight).
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from dicomtools import (StoreSCP, run, dimse_responses, describe_response, dataset_bytes,  # noqa: E402
                        file_transfer_syntax, first_difference, dataset_differences, free_port,
                        port_open, unprivileged_user, IMPLICIT_VR_LE, EXPLICIT_VR_LE)

warnings.simplefilter("ignore")
import pydicom  # noqa: E402

started = time.monotonic()
PORT = int(env("MDD_DICOM_PORT"))
test_dir = env("MDD_TEST_DIR")
pydicom_dir = env("MDD_PYDICOM_DIR")
top = env("MDD_TOP")
HOST = "127.0.0.1"
PATIENT = "TAP66"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

work = tempfile.mkdtemp(prefix="t66-", dir=test_dir)
os.chmod(work, 0o755)
SCP_USER = unprivileged_user()

src = make_server_dir(os.path.join(test_dir, "allowed", "p66"), mode=0o755)
manifest = generate_patient(src, PATIENT, 66, slices=6)
dicom = [f for f in manifest["files"] if f["kind"] == "dicom"]

conn = connect()
query_dicts(conn, "SELECT * FROM mdd.import(%s)", (src,))
ids = dict(query(conn, "SELECT sop_instance_uid, id FROM mdd.objects WHERE patient_id = %s AND kind = 'dicom'",
                 (PATIENT,)))
uid_of = {v: k for k, v in ids.items()}
ok(len(ids) == len(dicom) and all(f["sop_instance_uid"] in ids for f in dicom),
   f"setup: the {len(dicom)} objects of patient {PATIENT} are archived")
ct = [ids[f["sop_instance_uid"]] for f in sorted(dicom, key=lambda f: f["path"]) if f["path"].startswith("ct/")]
cbct = [ids[f["sop_instance_uid"]] for f in sorted(dicom, key=lambda f: f["path"])
        if f["path"].startswith("cbct/")]
rtstruct = ids[next(f["sop_instance_uid"] for f in dicom if f["modality"] == "RTSTRUCT")]
rtplan = ids[next(f["sop_instance_uid"] for f in dicom if f["modality"] == "RTPLAN")]
rtdose = ids[next(f["sop_instance_uid"] for f in dicom if f["modality"] == "RTDOSE")]
sizes = dict(query(conn, "SELECT id, size FROM mdd.objects WHERE patient_id = %s", (PATIENT,)))

_stored = {}


def stored(object_id):
    if object_id not in _stored:
        _stored[object_id] = bytes(query_value(conn, "SELECT mdd.read(%s, true)", (object_id,)))
    return _stored[object_id]


processes = []


def add_node(name, ae, port, options="{}"):
    execute(conn, "SELECT mdd.add_node(%s, %s, %s, %s, %s)", (name, ae, HOST, port, options))


def receiver(name, extra=(), start=True):
    """A storescp registered as node name (AE title upper-cased name)."""
    scp = StoreSCP(work, name.upper().replace("-", "_"), extra, user=SCP_USER)
    processes.append(scp)
    add_node(name, scp.aet, scp.port)
    if start:
        scp.start()
    return scp


def send(object_ids, node, options=None, include_related=False):
    """Queue a send job; job options set in the same transaction."""
    c = connect(autocommit=False)
    try:
        cur = c.cursor()
        cur.execute("SELECT mdd.send(%s, %s, include_related => %s)", (list(object_ids), node, include_related))
        job = cur.fetchone()[0]
        if options:
            cur.execute("UPDATE mdd.job SET options = options || %s WHERE id = %s", (json.dumps(options), job))
        c.commit()
        return job
    finally:
        c.close()


def wait(job, timeout="60 s"):
    return query_value(conn, "SELECT mdd.wait(%s, %s)", (job, timeout))


def job_row(job):
    return query_one(conn, "SELECT * FROM mdd.jobs WHERE id = %s", (job,))


def items(job):
    return {r["object"]: r for r in query_dicts(conn, "SELECT object, state, error FROM mdd.job_item "
                                                      "WHERE job = %s", (job,))}


def wait_for(what, timeout=20, step=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = what()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def receptions(scp):
    return len(re.findall(r"Received Store Request", scp.log()))


def check_arrivals(label, scp, expected):
    """Two tests: exactly the expected objects arrived; their data sets are
    byte-identical to the stored ones."""
    got = scp.received()
    want = {uid_of.get(i) or query_value(conn, "SELECT sop_instance_uid FROM mdd.objects WHERE id = %s", (i,)): i
            for i in expected}
    is_deeply(set(got), set(want), f"{label}: the {len(want)} objects arrived, no other")
    bad = []
    for uid in sorted(set(got) & set(want)):
        with open(got[uid], "rb") as fh:
            mine = dataset_bytes(fh.read())
        theirs = dataset_bytes(stored(want[uid]))
        if mine != theirs:
            bad.append(f"    {uid}: {first_difference(mine, theirs)}")
    ok(got and not bad, f"{label}: every data set is byte-identical to the stored one", "\n".join(bad[:10]))
    return got


def check_job(label, job, state, done, failed, nbytes=None):
    r = job_row(job)
    good = (r["kind"], r["state"], r["total"], r["done"], r["failed"]) == ("send", state, done + failed,
                                                                           done, failed)
    if nbytes is not None:
        good = good and r["bytes"] == nbytes
    return ok(good and r["finished_at"] is not None,
              f"{label}: job {state}, total {done + failed}, done {done}, failed {failed}"
              + (f", {nbytes} bytes" if nbytes is not None else ""),
              f"    {r}")


try:
    # =======================================================================
    # 1. bad requests

    jobs_before = query_value(conn, "SELECT count(*) FROM mdd.job")
    execute(conn, "SELECT mdd.add_node('t66nohost', 'T66NOHOST', NULL, NULL)")
    nosend_port = free_port()
    add_node("t66nosend", "T66NOSEND", nosend_port, '{"send": false}')
    raises(conn, "SELECT mdd.send(%s, 'nosuchnode')", ([ct[0]],), "42704", "an unknown node is refused",
           r'node "nosuchnode" does not exist')
    raises(conn, "SELECT mdd.send(%s, 't66nohost')", ([ct[0]],), "22023",
           "a node without host and port is refused", r"no host and port")
    raises(conn, "SELECT mdd.send(%s, 't66nosend')", ([ct[0]],), "42501",
           "a node with option send false is refused", r"may not receive")
    is_(query_value(conn, "SELECT may_send FROM mdd.nodes WHERE name = 't66nosend'"), False,
        "mdd.nodes shows may_send false for it")
    raises(conn, "SELECT mdd.add_node('t66bad', 'T66BAD', '127.0.0.1', 1, '{\"sned\": false}')", None, "22023",
           "a misspelt node option is refused, naming it", r"sned")
    add_node("t66idle", "T66IDLE", free_port())
    raises(conn, "SELECT mdd.send('{}'::bigint[], 't66idle')", None, "22023", "an empty id list is refused",
           r"no object ids")
    raises(conn, "SELECT mdd.send(NULL, 't66idle')", None, "22023", "a NULL id list is refused")
    raises(conn, "SELECT mdd.send(%s, 't66idle')", ([ct[0], 99999966],), "42704",
           "an unknown object id is refused, naming it", r"99999966")
    raises(conn, "SELECT mdd.send(%s, NULL)", ([ct[0]],), "42704", "a NULL node is refused")
    doc = query_value(conn, "SELECT mdd.store_document(%s, 'not dicom'::bytea, 't66.txt')", (PATIENT,))
    raises(conn, "SELECT mdd.send(%s, 't66idle')", ([ct[0], doc],), "22023",
           "a document is refused, naming it", rf"object {doc} is a document")
    is_(query_value(conn, "SELECT count(*) FROM mdd.job"), jobs_before, "no job was queued by the bad requests")

    # the same node as C-MOVE destination is refused too (0xA801)
    execute(conn, "SELECT mdd.add_node('t66mover', 'T66MOVER', %s, NULL)", (HOST,))
    rc, text = run(["movescu", "-d", "-S", "-aet", "T66MOVER", "-aec", "MDD", "-aem", "T66NOSEND",
                    "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={uid_of[ct[0]]}",
                    HOST, str(PORT)], timeout=30)
    rsps = dimse_responses(text, "C-MOVE RSP")
    final = rsps[-1] if rsps else None
    ok(final and final["status"] == 0xA801 and re.search(r"may not send", final["error_comment"] or ""),
       "a C-MOVE to the node that may not be sent to is refused with 0xA801, saying why",
       f"    final: {describe_response(final)}")

    # =======================================================================
    # 2. a plan, its structure set and its CT to a planning system

    mark = query_value(conn, "SELECT clock_timestamp()")
    tps = receiver("t66tps")
    wanted = ct + [rtstruct, rtplan]
    t0 = time.monotonic()
    job = send([rtplan, rtstruct] + ct, "t66tps")
    is_(wait(job), "done", "send of a CT series, RT Structure Set and RT Plan to the planning system: done")
    note(f"({len(wanted)} objects sent in {time.monotonic() - t0:.2f} s)")
    check_job("planning system", job, "done", len(wanted), 0, sum(sizes[i] for i in wanted))
    is_(job_row(job)["error"], None, "no error")
    got = check_arrivals("planning system", tps, wanted)
    is_(sorted(file_transfer_syntax(p) for p in got.values()), [EXPLICIT_VR_LE] * len(wanted),
        "they arrived in their stored transfer syntax (explicit VR little endian)")
    order = re.findall(r"Received Store Request \(MsgID \d+, (\w+)\)", tps.log())
    is_(order, ["CT"] * len(ct) + ["RS", "RP"],
        "the images went first, then the structure set, then the plan")
    is_(receptions(tps), len(wanted), "each object was sent once")
    is_(set(items(job)[i]["state"] for i in wanted), {"done"}, "every item of the job is done")

    audit = query_dicts(conn, "SELECT action, object_id, patient_id, detail, role FROM mdd.audit_log "
                              "WHERE at >= %s ORDER BY at", (mark,))
    req = [a for a in audit if a["action"] == "send requested"]
    ok(len(req) == 1 and re.search(rf"job {job}: {len(wanted)} objects to node t66tps \(T66TPS at {HOST}:{tps.port}\)",
                                   req[0]["detail"] or "") and req[0]["patient_id"] == PATIENT,
       "audit: one 'send requested' row naming the job, the count, the node and the patient", f"    {req}")
    sent_rows = [a for a in audit if a["action"] == "send"]
    is_(sorted(a["object_id"] for a in sent_rows), sorted(wanted), "audit: one 'send' row per object sent")
    ok(all(a["patient_id"] == PATIENT and f"job {job}: to node t66tps" in a["detail"] for a in sent_rows),
       "audit: each with the patient, the job and the node")
    ok(any(a["action"] == "send done" and f"job {job}:" in (a["detail"] or "") for a in audit),
       "audit: a 'send done' row at the end")
    tps.stop()

    # include_related: the structure set with the plan on it and the dose on the plan
    rel = receiver("t66rel")
    job = send([rtstruct], "t66rel", include_related=True)
    is_(wait(job), "done", "send of the structure set with include_related: done")
    check_job("include_related", job, "done", 3, 0)
    check_arrivals("include_related", rel, [rtstruct, rtplan, rtdose])
    rel.stop()

    # =======================================================================
    # 3. from the archive tier

    archive_root = make_server_dir(os.path.join(test_dir, "allowed", "archive66"))
    execute(conn, "SELECT mdd.add_storage('archive66', 'file', 'archive', %s)",
            (json.dumps({"root": archive_root}),))
    some = cbct[:6]
    a = query_value(conn, "SELECT mdd.archive(%s, 'archive66', false)", (some,))
    is_(wait(a), "done", "setup: six CBCT slices archived to the file storage archive66")
    is_(query_value(conn, "SELECT array_agg(DISTINCT tier) FROM mdd.objects WHERE id = ANY(%s)", (some,)),
        ["archive"], "setup: they are on the archive tier only")
    arc = receiver("t66arc")
    job = send(some, "t66arc")
    is_(wait(job), "done", "send of archived objects: done")
    check_job("archived objects", job, "done", len(some), 0)
    check_arrivals("archived objects", arc, some)
    arc.stop()

    victim = some[2]
    loc = query_value(conn, """SELECT c.locator FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                               WHERE c.object = %s AND s.name = 'archive66'""", (victim,))
    path = os.path.join(archive_root, loc)
    with open(path, "r+b") as fh:
        original = fh.read()
        fh.seek(len(original) // 2)
        fh.write(bytes([original[len(original) // 2] ^ 0x66]))
    arc2 = receiver("t66arc2")
    job = send(some, "t66arc2")
    is_(wait(job), "failed", "send of archived objects, one corrupted in its file: the job ends failed")
    check_job("one corrupt", job, "failed", len(some) - 1, 1)
    like(items(job)[victim]["error"], rf"object {victim} is corrupt.*checksum.*XX001",
         "the corrupt object's item says it is corrupt (checksum), with the SQLSTATE")
    like(job_row(job)["error"], rf"1 of {len(some)} objects failed; the first: object {victim} is corrupt",
         "the job's error names it")
    check_arrivals("one corrupt: the others", arc2, [i for i in some if i != victim])
    arc2.stop()
    with open(path, "wb") as fh:
        fh.write(original)

    # =======================================================================
    # 4. transfer syntaxes

    jpeg_path = os.path.join(pydicom_dir, "SC_rgb_jpeg_dcmtk.dcm")
    jpeg = query_value(conn, "SELECT mdd.store_file(%s)", (jpeg_path,))
    is_(query_value(conn, "SELECT transfer_syntax_uid FROM mdd.objects WHERE id = %s", (jpeg,)), JPEG_BASELINE,
        "setup: a JPEG baseline object (pydicom's SC_rgb_jpeg_dcmtk.dcm) is archived")
    unc = receiver("t66unc")       # storescp takes uncompressed syntaxes only
    job = send([jpeg, ct[0], ct[1], rtstruct], "t66unc")
    is_(wait(job), "failed", "JPEG + uncompressed objects to a receiver of uncompressed data: job failed")
    check_job("JPEG to uncompressed only", job, "failed", 3, 1)
    it = items(job)
    like(it[jpeg]["error"], rf"cannot be sent to node t66unc: no accepted presentation context for "
                            rf"1\.2\.840\.10008\.5\.1\.4\.1\.1\.7 in {re.escape(JPEG_BASELINE)}",
         "the JPEG object's reason: no accepted presentation context for its class in JPEG baseline")
    is_(sorted(i for i, r in it.items() if r["state"] == "done"), sorted([ct[0], ct[1], rtstruct]),
        "the others are done")
    check_arrivals("JPEG to uncompressed only: the others", unc, [ct[0], ct[1], rtstruct])
    job = send([jpeg], "t66unc")
    is_(wait(job), "failed", "the JPEG object alone there: job failed")
    check_job("JPEG alone", job, "failed", 0, 1)
    like(items(job)[jpeg]["error"], r"node t66unc accepts no presentation context for SOP class "
                                    r"1\.2\.840\.10008\.5\.1\.4\.1\.1\.7 in .*accepted none",
         "its reason: the node accepted none of the contexts proposed")
    is_(receptions(unc), 3, "nothing more arrived")
    unc.stop()

    xa = receiver("t66xa", ["+xa"])
    job = send([jpeg, ct[2]], "t66xa")
    is_(wait(job), "done", "JPEG + explicit VR objects to storescp +xa: done")
    got = check_arrivals("storescp +xa", xa, [jpeg, ct[2]])
    is_(sorted(file_transfer_syntax(p) for p in got.values()), sorted([JPEG_BASELINE, EXPLICIT_VR_LE]),
        "storescp +xa: each arrived in its stored transfer syntax")
    xa.stop()

    xi = receiver("t66xi", ["+xi"])
    conv = [ct[3], rtstruct]
    job = send(conv, "t66xi")
    is_(wait(job), "done", "explicit VR CT slice and RT Structure Set to storescp +xi (implicit VR only): done")
    got = xi.received()
    problems = []
    for i in conv:
        uid = uid_of[i]
        if uid not in got:
            problems.append(f"    {uid}: did not arrive")
            continue
        ts = file_transfer_syntax(got[uid])
        mine = pydicom.dcmread(got[uid])
        theirs = pydicom.dcmread(io.BytesIO(stored(i)))
        if ts != IMPLICIT_VR_LE:
            problems.append(f"    {uid}: arrived in {ts}")
        problems += [f"    {uid}: {d}" for d in dataset_differences(mine, theirs, limit=5)]
    ok(not problems and set(got) == {uid_of[i] for i in conv},
       "storescp +xi: both arrived in implicit VR little endian, every element equal", "\n".join(problems))
    mine = pydicom.dcmread(got.get(uid_of[ct[3]])) if uid_of[ct[3]] in got else None
    ok(mine is not None and mine.PixelData == pydicom.dcmread(io.BytesIO(stored(ct[3]))).PixelData,
       "storescp +xi: the CT slice's pixel data are equal")
    xi.stop()

    # =======================================================================
    # 5. failures of the node

    down = receiver("t66down", start=False)      # registered; nothing listens yet
    job = send(ct[:3], "t66down", {"max_attempts": 50, "retry_delay": 0.1})
    ok(wait_for(lambda: job_row(job)["attempts"] >= 2, 20) and job_row(job)["state"] in ("queued", "running"),
       "node down: the job is retried, attempts grow, it is not given up", f"    {job_row(job)}")
    r = job_row(job)
    like(r["error"], r"attempt \d+ failed, will retry: cannot associate with T66DOWN at "
                           rf"{HOST}:{down.port}.*SQLSTATE 08001",
         "its error says why: the node cannot be reached (SQLSTATE 08001)")
    is_(job_row(job)["done"], 0, "nothing is counted as sent")
    down.start()
    is_(wait(job), "done", "once storescp listens, the job completes")
    check_job("node down, then up", job, "done", 3, 0)
    r = job_row(job)
    ok(r["attempts"] == 0 and r["error"] is None, "attempts and error are cleared", f"    {r}")
    check_arrivals("node down, then up", down, ct[:3])
    down.stop()

    brk = receiver("t66abort", ["--abort-after"])
    job = send(ct[:2], "t66abort", {"max_attempts": 2, "retry_delay": 0.1})
    is_(wait(job), "failed", "a node that aborts the association at each C-STORE: the job fails")
    r = job_row(job)
    is_((r["done"], r["failed"]), (0, 0), "nothing counted as sent or failed")
    like(r["error"], r"gave up after 2 attempts: the association with node t66abort .* failed: .*SQLSTATE 08006",
         "its error says it gave up after max_attempts, and why")
    is_(set(x["state"] for x in items(job).values()), {"pending"}, "the objects stay pending")
    brk.stop()

    slow = receiver("t66slow", ["--sleep-after", "1"])
    job = send(cbct[6:12], "t66slow", {"batch": 1})
    ok(wait_for(lambda: job_row(job)["done"] >= 1, 30), "cancel: a slow send job has sent its first object")
    execute(conn, "SELECT mdd.cancel(%s)", (job,))
    is_(wait(job), "cancelled", "mdd.cancel stops it: cancelled")
    r = job_row(job)
    ok(1 <= r["done"] < 6 and r["finished_at"] is not None, "part of it was sent", f"    {r}")
    is_(len(slow.received()), r["done"], "exactly the objects counted as done arrived")
    ok(any(a for a in query(conn, "SELECT 1 FROM mdd.audit_log WHERE action = 'cancel' AND detail = %s",
                            (f"job {job}",))), "the cancel is in the audit log")
    slow.stop()

    # =======================================================================
    # 6. roles

    execute(conn, "DROP ROLE IF EXISTS tap66reader")
    execute(conn, "DROP ROLE IF EXISTS tap66operator")
    execute(conn, "CREATE ROLE tap66reader LOGIN IN ROLE mdd_reader")
    execute(conn, "CREATE ROLE tap66operator LOGIN IN ROLE mdd_operator")
    reader = connect(user="tap66reader")
    raises(reader, "SELECT mdd.send(%s, 't66idle')", ([ct[0]],), "42501", "a reader may not send")
    reader.close()
    opr = receiver("t66opr")
    operator = connect(user="tap66operator")
    job = query_value(operator, "SELECT mdd.send(%s, 't66opr')", ([ct[4]],))
    is_(query_value(operator, "SELECT mdd.wait(%s, '60 s')", (job,)), "done", "an operator may send")
    is_(query_value(operator, "SELECT created_by FROM mdd.jobs WHERE id = %s", (job,)), "tap66operator",
        "the job is the operator's")
    operator.close()
    is_(query_value(conn, "SELECT role FROM mdd.audit_log WHERE action = 'send requested' AND detail LIKE %s",
                    (f"job {job}:%",)), "tap66operator", "the audit row names the operator")
    opr.stop()
    execute(conn, "DROP ROLE tap66reader")
    execute(conn, "DROP ROLE tap66operator")

    # =======================================================================
    # 7. a restart in the middle of a send job, on a cluster of this test

    datadir = os.path.join(test_dir, "t66-restart", "pgdata")
    make_server_dir(os.path.dirname(datadir), mode=0o755)
    cport = free_port()

    cluster("start", datadir, str(cport), "shared_buffers = 32MB", "max_wal_size = 256MB",
            "mdd.dicom_port = 0", "mdd.job_workers = 1", f"mdd.allowed_paths = '{test_dir}/allowed'")
    try:
        c2 = connect_when_up(cport)
        execute(c2, "CREATE EXTENSION mdd")
        execute(c2, "SELECT count(*) FROM mdd.import(%s)", (os.path.join(src, "ct"),))
        ct2 = [i for (i,) in query(c2, "SELECT id FROM mdd.objects ORDER BY id")]
        rs = StoreSCP(work, "T66RESTART", ["--sleep-after", "1"], user=SCP_USER)
        processes.append(rs)
        rs.start()
        execute(c2, "SELECT mdd.add_node('t66restart', 'T66RESTART', %s, %s)", (HOST, rs.port))
        c2.autocommit = False
        cur = c2.cursor()
        cur.execute("SELECT mdd.send(%s, 't66restart')", (ct2,))
        job = cur.fetchone()[0]
        cur.execute("""UPDATE mdd.job SET options = '{"batch": 1}' WHERE id = %s""", (job,))
        c2.commit()
        c2.autocommit = True
        ok(wait_for(lambda: query_value(c2, "SELECT done FROM mdd.jobs WHERE id = %s", (job,)) >= 2, 30),
           f"restart: the send job of {len(ct2)} objects (one per step, 1 s each) has sent two")
        c2.close()
        cluster("stop", datadir)
        c2 = None
        cluster("start", datadir, str(cport))
        c2 = connect_when_up(cport)
        before = query_one(c2, "SELECT state, done FROM mdd.jobs WHERE id = %s", (job,))
        ok(before["state"] == "running" and 2 <= before["done"] < len(ct2),
           "after the restart the job is still running, part of it done", f"    {before}")
        is_(query_value(c2, "SELECT mdd.wait(%s, '60 s')", (job,)), "done", "and it completes")
        r = query_one(c2, "SELECT total, done, failed FROM mdd.jobs WHERE id = %s", (job,))
        is_((r["total"], r["done"], r["failed"]), (len(ct2), len(ct2), 0), "every object counted as sent")
        uids2 = dict(query(c2, "SELECT sop_instance_uid, id FROM mdd.objects"))
        is_(set(rs.received()), set(uids2), "every object arrived")
        n = receptions(rs)
        ok(len(ct2) <= n <= len(ct2) + 1,
           "objects sent before the restart were not sent again (at most the one in flight)",
           f"    {n} C-STORE requests received for {len(ct2)} objects")
        is_(query_value(c2, "SELECT count(*) FROM mdd.audit_log WHERE action = 'send'"), len(ct2),
            "one 'send' audit row per object")
        c2.close()
    finally:
        cluster("stop", datadir)
finally:
    for p in processes:
        p.stop()
    conn.close()

note(f"runtime {time.monotonic() - started:.1f} s")
done_testing()
