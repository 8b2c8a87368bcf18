#!/usr/bin/python3
# mdd.retrieve and mdd.move, jobs that ask a DICOM node for objects, against
# real peers this test starts on 127.0.0.1: two DCMTK dcmqrscp archives with
# different data (QR1, QR2; each used by one job at a time, as dcmqrscp
# needs), Orthanc 1.10, and DCMTK's storescp (+B) as the destination of a
# move:
#   1. bad requests: unknown nodes (42704), a missing or malformed UID
#      (22004, 22023), a node without host and port, a node that may not
#      store to mdd (retrieve by C-MOVE), a destination mdd may not send to
#      (42501), a bad "retrieve_by" option: no job row;
#   2. retrieve by C-MOVE of a series from each PACS, of a whole study and
#      of one instance: the job ends done with total = done = the instances
#      the node holds, each instance archived once with a data set
#      byte-identical to the source file, from the node's AE; audit rows;
#      a study from Orthanc on three C-MOVE associations at once (node
#      option move_associations, which is checked);
#   3. retrieve again: nothing is asked for (no C-MOVE reaches the node),
#      every instance counted as already here; a series of which part is
#      already archived: only the missing instances are moved;
#   4. retrieve by C-GET (node option "retrieve_by": "get") from dcmqrscp
#      (which does not tell SOP classes) and from Orthanc (which does):
#      byte-identical, no C-MOVE;
#   5. mdd.move from a dcmqrscp to storescp: what arrives equals the source,
#      the job counts what the node reported sent; audit rows;
#   6. a node that is down: the job retries with its back-off, its error
#      says why (08001), and it completes once the node is up; a node killed
#      in the middle of a retrieve and started again: the job completes;
#   7. a node that answers the C-MOVE at once and sends later (or never): a
#      small PACS of this test (lib/fakepacs.py): the job waits and
#      completes, or fails the instance that never came after max_attempts;
#   8. roles: a reader may not retrieve or move, an operator may;
#   9. a restart of mdd's server in the middle of a retrieve (a cluster of
#      this test): the job completes after it, every instance archived once,
#      and at most the instances of the step in flight sent twice; a server
#      stop while a runner waits for a node that never answers is not held
#      up by the wait.
import json
import os
import re
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
from dicomtools import (StoreSCP, dataset_bytes, first_difference, free_port,  # noqa: E402
                        unprivileged_user)
from qrscp import QRSCP  # noqa: E402
from orthanc import ORTHANC, Orthanc  # noqa: E402
from fakepacs import FakePacs  # noqa: E402

warnings.simplefilter("ignore")

started = time.monotonic()
PORT = int(env("MDD_DICOM_PORT"))
test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
HOST = "127.0.0.1"
if not os.access(ORTHANC, os.X_OK):
    skip_all(f"{ORTHANC} is not installed (Debian package orthanc)")

work = tempfile.mkdtemp(prefix="t68-", dir=test_dir)
os.chmod(work, 0o755)
SCP_USER = unprivileged_user()
conn = connect()
processes = []


def patient(name, seed, slices):
    """A generated patient under allowed/ (so that mdd may read its files);
    {SOP Instance UID: file entry with its path and bytes}."""
    d = make_server_dir(os.path.join(test_dir, "allowed", name.lower()), mode=0o755)
    manifest = generate_patient(d, name, seed, slices=slices, extra=("--no-pdf",))
    out = {}
    for f in manifest["files"]:
        if f["kind"] == "dicom":
            f = dict(f, rel=f["path"], path=os.path.join(d, f["path"]))
            with open(f["path"], "rb") as fh:
                f["data"] = fh.read()
            out[f["sop_instance_uid"]] = f
    return out


def series_of(files, prefix):
    """(study, series, {uid: file}) of the series in a directory of the
    generated patient ("ct/", "cbct/")."""
    sel = {u: f for u, f in files.items() if f["rel"].startswith(prefix)}
    series = {f["series_instance_uid"] for f in sel.values()}
    assert len(series) == 1, f"{prefix}: {len(series)} series"
    f = next(iter(sel.values()))
    return f["study_instance_uid"], f["series_instance_uid"], sel


def study_of(files, modality):
    """(study, {uid: file}) of the study holding a modality."""
    study = next(f["study_instance_uid"] for f in files.values() if f["modality"] == modality)
    return study, {u: f for u, f in files.items() if f["study_instance_uid"] == study}


def add_node(name, ae, port, options=None):
    execute(conn, "SELECT mdd.add_node(%s, %s, %s, %s, %s)",
            (name, ae, HOST, port, json.dumps(options or {})))


def job_count():
    return query_value(conn, "SELECT count(*) FROM mdd.job")


def queue(sql, params, options=None):
    """Queue a job (mdd.retrieve or mdd.move); job options set in the same
    transaction."""
    c = connect(autocommit=False)
    try:
        cur = c.cursor()
        cur.execute(sql, params)
        job = cur.fetchone()[0]
        if options:
            cur.execute("UPDATE mdd.job SET options = options || %s WHERE id = %s", (json.dumps(options), job))
        c.commit()
        return job
    finally:
        c.close()


def retrieve(node, study, series=None, sop=None, options=None):
    return queue("SELECT mdd.retrieve(%s, %s, %s, %s)", (node, study, series, sop), options)


def move(src, dest, study, series=None, sop=None, options=None):
    return queue("SELECT mdd.move(%s, %s, %s, %s, %s)", (src, dest, study, series, sop), options)


def wait(job, timeout="90 s", c=None):
    return query_value(c or conn, "SELECT mdd.wait(%s, %s)", (job, timeout))


def job_row(job, c=None):
    return query_one(c or conn, "SELECT * FROM mdd.jobs WHERE id = %s", (job,))


def instances(job, c=None):
    return {r["sop_instance_uid"]: r for r in query_dicts(
        c or conn, "SELECT * FROM mdd.job_instance WHERE job = %s", (job,))}


def wait_for(what, timeout=30, step=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = what()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def check_job(what, job, state, total, done, failed=0):
    r = job_row(job)
    ok(r["state"] == state and (r["total"], r["done"], r["failed"]) == (total, done, failed),
       f"{what}: job {state}, {total} instances, {done} done, {failed} failed",
       f"    {r}")
    return r


def check_archived(what, files, ae, c=None):
    """Each file's instance is archived once, with the source's data set
    bytes, received from AE ae."""
    c = c or conn
    rows = {r["sop_instance_uid"]: r for r in query_dicts(
        c, "SELECT id, sop_instance_uid, source FROM mdd.objects WHERE sop_instance_uid = ANY (%s)",
        (list(files),))}
    problems = []
    for uid, f in sorted(files.items()):
        r = rows.get(uid)
        if r is None:
            problems.append(f"    {f['path']}: not archived")
            continue
        if r["source"] != f"dicom:{ae}":
            problems.append(f"    {f['path']}: source {r['source']!r}")
        stored = bytes(query_value(c, "SELECT mdd.read(%s)", (r["id"],)))
        diff = first_difference(dataset_bytes(stored), dataset_bytes(f["data"]))
        if diff:
            problems.append(f"    {f['path']}: data set differs: {diff}")
    ok(not problems, f"{what}: the {len(files)} instances are archived once, from {ae}, each data set "
                     "byte-identical to the source file", "\n".join(problems[:10]))


def audit_rows(action, job):
    return query_value(conn, "SELECT count(*) FROM mdd.audit_log WHERE action = %s AND detail LIKE %s",
                       (action, f"job {job}:%"))


def qr_log_count(qr, text):
    return qr.log().count(text)


# ---------------------------------------------------------------------------
# the peers and their data

A = patient("T68A", 681, 8)        # on QR1
B = patient("T68B", 682, 6)        # on QR2
C = patient("T68C", 683, 6)        # on Orthanc
P = patient("T68P", 689, 9)        # on Orthanc, retrieved on parallel associations
a_study, a_ct_series, a_ct = series_of(A, "ct/")
a_plan_study, a_plan = study_of(A, "RTPLAN")
a_cbct_study, a_cbct_series, a_cbct = series_of(A, "cbct/")
b_plan_study, b_plan = study_of(B, "RTPLAN")
b_ct_study, b_ct_series, b_ct = series_of(B, "ct/")
c_ct_study, c_ct_series, c_ct = series_of(C, "ct/")
c_cbct_study, c_cbct_series, c_cbct = series_of(C, "cbct/")
c_plan_uid = next(u for u, f in C.items() if f["modality"] == "RTPLAN")
c_plan_study, c_plan = study_of(C, "RTPLAN")
p_plan_study, p_plan = study_of(P, "RTPLAN")

dest = StoreSCP(work, "T68DEST", user=SCP_USER)
processes.append(dest)
dest.start()
movers = {"MDD": (HOST, PORT), "T68DEST": (HOST, dest.port)}
qr1 = QRSCP(os.path.join(work, "t68qr1"), "T68QR1", peers=movers)
qr2 = QRSCP(os.path.join(work, "t68qr2"), "T68QR2", peers=movers)
processes += [qr1, qr2]
qr1.load([f["path"] for f in A.values()])
qr2.load([f["path"] for f in B.values()])
qr1.start()
qr2.start()
orthanc = Orthanc(make_server_dir(os.path.join(work, "t68orthanc"), mode=0o755), aet="T68ORTHANC",
                  modalities={"mdd": ["MDD", HOST, PORT]})
try:
    orthanc.start()
    for f in list(C.values()) + list(P.values()):
        status, body = orthanc.post("/instances", f["data"])
        assert status == 200, f"Orthanc refused {f['path']}: {status} {body}"

    add_node("t68qr1", "T68QR1", qr1.port)
    add_node("t68qr2", "T68QR2", qr2.port)
    add_node("t68orthanc", "T68ORTHANC", orthanc.dicom_port)
    add_node("t68dest", "T68DEST", dest.port)
    ok(True, f"setup: QR1 holds patient T68A ({len(A)} instances), QR2 T68B ({len(B)}), "
             f"Orthanc T68C ({len(C)}); storescp listens as T68DEST")

    # =======================================================================
    # 1. bad requests

    before = job_count()
    raises(conn, "SELECT mdd.retrieve('nosuch', %s)", (a_study,), "42704",
           "retrieve from an unknown node: 42704", r'node "nosuch" does not exist')
    raises(conn, "SELECT mdd.retrieve(NULL, %s)", (a_study,), "42704", "retrieve from node NULL: 42704")
    raises(conn, "SELECT mdd.move('nosuch', 't68dest', %s)", (a_study,), "42704",
           "move from an unknown node: 42704")
    raises(conn, "SELECT mdd.move('t68qr1', 'nosuch', %s)", (a_study,), "42704",
           "move to an unknown node: 42704", r'node "nosuch" does not exist')
    raises(conn, "SELECT mdd.retrieve('t68qr1', NULL)", None, "22004",
           "retrieve without a study UID: 22004", r"study_instance_uid must not be NULL")
    raises(conn, "SELECT mdd.move('t68qr1', 't68dest', NULL)", None, "22004", "move without a study UID: 22004")
    raises(conn, "SELECT mdd.retrieve('t68qr1', 'not.a.uid')", None, "22023",
           "a study UID that is not a UID: 22023", r'invalid study_instance_uid "not\.a\.uid"')
    raises(conn, "SELECT mdd.retrieve('t68qr1', %s, '1..2')", (a_study,), "22023",
           "a malformed series UID: 22023", r"invalid series_instance_uid")
    raises(conn, "SELECT mdd.retrieve('t68qr1', %s, NULL, '')", (a_study,), "22023",
           "an empty SOP Instance UID: 22023", r"invalid sop_instance_uid")
    raises(conn, "SELECT mdd.retrieve('t68qr1', %s)", ("1." + "2" * 70,), "22023", "a UID of 72 characters: 22023")
    execute(conn, "SELECT mdd.add_node('t68nohost', 'NOHOST', NULL, NULL)")
    raises(conn, "SELECT mdd.retrieve('t68nohost', %s)", (a_study,), "22023",
           "a node without host and port: 22023", r'node "t68nohost" has no host and port')
    add_node("t68nostore", "T68QR1", qr1.port, {"store": False})
    raises(conn, "SELECT mdd.retrieve('t68nostore', %s)", (a_study,), "42501",
           "retrieve by C-MOVE from a node that may not store to mdd: 42501", r"may not store to this archive")
    add_node("t68nosend", "NOSEND", 1, {"send": False})
    raises(conn, "SELECT mdd.move('t68qr1', 't68nosend', %s)", (a_study,), "42501",
           "move to a node mdd may not send to: 42501")
    raises(conn, "SELECT mdd.add_node('t68bad', 'BAD', %s, 1, '{\"retrieve_by\": \"ftp\"}')", (HOST,), "22023",
           "node option retrieve_by other than move or get: 22023", r'invalid node option "retrieve_by"')
    is_(job_count(), before, "no job row was made by any of these")

    # =======================================================================
    # 2. retrieve by C-MOVE from each PACS

    job = retrieve("t68qr1", a_study, a_ct_series)
    is_(wait(job), "done", "QR1: retrieve of the CT series by C-MOVE: done")
    check_job("QR1 CT series", job, "done", len(a_ct), len(a_ct))
    check_archived("QR1 CT series", a_ct, "T68QR1")
    is_((audit_rows("retrieve requested", job), audit_rows("retrieve", job), audit_rows("retrieve done", job)),
        (1, len(a_ct), 1), "audit: 'retrieve requested', one 'retrieve' per instance, 'retrieve done'")
    ok(set(r["state"] for r in instances(job).values()) == {"done"}
       and not any(r["present_before"] for r in instances(job).values()),
       "every instance of the job is done, none was here before")
    qr1_moves = qr_log_count(qr1, "Received Move SCP")
    qr1_stores = qr_log_count(qr1, "Store SCU RQ")
    is_(qr1_stores, len(a_ct), "QR1 sent each instance once")

    job = retrieve("t68qr2", b_plan_study)
    is_(wait(job), "done", "QR2: retrieve of the planning study (CT, structure set, plan, dose): done")
    check_job("QR2 planning study", job, "done", len(b_plan), len(b_plan))
    check_archived("QR2 planning study", b_plan, "T68QR2")

    job = retrieve("t68orthanc", c_ct_study, c_ct_series)
    is_(wait(job), "done", "Orthanc: retrieve of the CT series by C-MOVE: done")
    check_job("Orthanc CT series", job, "done", len(c_ct), len(c_ct))
    check_archived("Orthanc CT series", c_ct, "T68ORTHANC")

    job = retrieve("t68orthanc", c_plan_study, C[c_plan_uid]["series_instance_uid"], c_plan_uid)
    is_(wait(job), "done", "Orthanc: retrieve of one instance (the RT Plan): done")
    check_job("Orthanc RT Plan", job, "done", 1, 1)
    check_archived("Orthanc RT Plan", {c_plan_uid: C[c_plan_uid]}, "T68ORTHANC")

    # several C-MOVE associations at once (node option move_associations):
    # the instances in lists the associations take in turn
    for bad in (0, 17, 2.5, "3", True):
        raises(conn, "SELECT mdd.add_node('t68bad', 'BAD', %s, 1, %s)",
               (HOST, json.dumps({"move_associations": bad})), "22023",
               f"node option move_associations {json.dumps(bad)}: 22023", r'invalid node option "move_associations"')
    add_node("t68orthanc-par", "T68ORTHANC", orthanc.dicom_port, {"move_associations": 3})
    before = query_value(conn, "SELECT max(id) FROM mdd.audit")
    job = retrieve("t68orthanc-par", p_plan_study)
    is_(wait(job), "done", f"Orthanc on 3 associations: retrieve of the planning study ({len(p_plan)} instances): done")
    check_job("Orthanc on 3 associations", job, "done", len(p_plan), len(p_plan))
    check_archived("Orthanc on 3 associations", p_plan, "T68ORTHANC")
    associations = query_value(conn, "SELECT count(*) FROM mdd.audit WHERE id > %s AND action = 'associate'"
                                     " AND detail LIKE 'T68ORTHANC -> %%'", (before,))
    ok(associations >= 3, f"Orthanc sent on an association per C-MOVE, at least 3 ({associations})")
    is_(audit_rows("retrieve", job), len(p_plan), "one 'retrieve' audit row per instance: none came twice")

    # =======================================================================
    # 3. retrieve again: nothing fetched twice

    job = retrieve("t68qr1", a_study, a_ct_series)
    is_(wait(job), "done", "QR1: the same series again: done")
    check_job("QR1 again", job, "done", len(a_ct), len(a_ct))
    inst = instances(job)
    ok(all(r["present_before"] and r["asked"] == 0 for r in inst.values()),
       "every instance counted as already here, none asked for")
    is_((qr_log_count(qr1, "Received Move SCP"), qr_log_count(qr1, "Store SCU RQ")), (qr1_moves, qr1_stores),
        "no C-MOVE reached QR1, nothing was sent again")
    is_(audit_rows("retrieve", job), 0, "no 'retrieve' audit row")
    like(query_value(conn, "SELECT detail FROM mdd.audit_log WHERE action = 'retrieve done' AND detail LIKE %s",
                     (f"job {job}:%",)), rf"0 retrieved, {len(a_ct)} already here, 0 failed",
         "'retrieve done' says none was retrieved, all were here")

    # a series of which part is archived already
    cbct_sorted = sorted(a_cbct)
    for uid in cbct_sorted[:2]:
        query_value(conn, "SELECT mdd.store_file(%s)", (a_cbct[uid]["path"],))
    qr1_stores = qr_log_count(qr1, "Store SCU RQ")
    job = retrieve("t68qr1", a_cbct_study, a_cbct_series)
    is_(wait(job), "done", f"QR1: a CBCT series of {len(a_cbct)} instances, 2 of them archived already: done")
    check_job("QR1 CBCT series, in part here", job, "done", len(a_cbct), len(a_cbct))
    inst = instances(job)
    is_(sorted(u for u, r in inst.items() if r["present_before"]), cbct_sorted[:2],
        "the 2 archived ones counted as already here")
    is_(qr_log_count(qr1, "Store SCU RQ") - qr1_stores, len(a_cbct) - 2,
        f"QR1 sent only the {len(a_cbct) - 2} missing instances")
    is_(audit_rows("retrieve", job), len(a_cbct) - 2, "one 'retrieve' audit row per instance fetched")
    check_archived("QR1 CBCT series, the missing", {u: a_cbct[u] for u in cbct_sorted[2:]}, "T68QR1")

    # =======================================================================
    # 4. retrieve by C-GET

    add_node("t68qr1get", "T68QR1", qr1.port, {"retrieve_by": "get"})
    qr1_moves = qr_log_count(qr1, "Received Move SCP")
    job = retrieve("t68qr1get", a_plan_study)
    is_(wait(job), "done", "QR1 by C-GET: the planning study (the CT series already here): done")
    a_rt = {u: f for u, f in a_plan.items() if u not in a_ct}
    check_job("QR1 by C-GET", job, "done", len(a_plan), len(a_plan))
    check_archived("QR1 by C-GET", a_rt, "T68QR1")
    ok(qr_log_count(qr1, "Received Get SCP") >= 1 and qr_log_count(qr1, "Received Move SCP") == qr1_moves,
       "QR1 got a C-GET, no C-MOVE")

    add_node("t68orthanc-get", "T68ORTHANC", orthanc.dicom_port, {"retrieve_by": "get"})
    job = retrieve("t68orthanc-get", c_cbct_study, c_cbct_series)
    is_(wait(job), "done", f"Orthanc by C-GET: the other study's series ({len(c_cbct)} instances): done")
    check_job("Orthanc by C-GET", job, "done", len(c_cbct), len(c_cbct))
    check_archived("Orthanc by C-GET", c_cbct, "T68ORTHANC")

    # =======================================================================
    # 5. move from QR2 to storescp

    job = move("t68qr2", "t68dest", b_plan_study)
    is_(wait(job), "done", "move of QR2's planning study to storescp: done")
    check_job("move to storescp", job, "done", len(b_plan), len(b_plan))
    got = dest.received()
    problems = []
    for uid, f in sorted(b_plan.items()):
        if uid not in got:
            problems.append(f"    {f['path']}: did not arrive")
            continue
        with open(got[uid], "rb") as fh:
            diff = first_difference(dataset_bytes(fh.read()), dataset_bytes(f["data"]))
        if diff:
            problems.append(f"    {f['path']}: data set differs: {diff}")
    ok(not problems and set(got) == set(b_plan),
       f"storescp received exactly the {len(b_plan)} instances, data sets byte-identical to the source",
       "\n".join(problems[:10]))
    is_((audit_rows("move requested", job), audit_rows("move", job) >= 1, audit_rows("move done", job)),
        (1, True, 1), "audit: 'move requested', 'move', 'move done'")

    # =======================================================================
    # 6. a node that is down, a node killed in the middle

    D = patient("T68D", 684, 4)
    d_study, d_ct_series, d_ct = series_of(D, "ct/")
    qr3 = QRSCP(os.path.join(work, "t68qr3"), "T68QR3", peers=movers)
    processes.append(qr3)
    qr3.load([f["path"] for f in d_ct.values()])
    add_node("t68qr3", "T68QR3", qr3.port)       # registered; nothing listens yet
    job = retrieve("t68qr3", d_study, d_ct_series, options={"max_attempts": 50, "retry_delay": 0.2})
    ok(wait_for(lambda: job_row(job)["attempts"] >= 2) and job_row(job)["state"] in ("queued", "running"),
       "node down: the job is retried, attempts grow, it is not given up", f"    {job_row(job)}")
    like(job_row(job)["error"], rf"attempt \d+ failed, will retry: node t68qr3 .*cannot associate with T68QR3 at "
                                rf"{HOST}:{qr3.port}.*SQLSTATE 08001",
         "its error says why: the node cannot be reached (SQLSTATE 08001)")
    is_(job_row(job)["total"], 0, "nothing is counted while the node cannot say what it holds")
    qr3.start()
    is_(wait(job), "done", "once dcmqrscp listens, the job completes")
    r = check_job("node down, then up", job, "done", len(d_ct), len(d_ct))
    ok(r["attempts"] == 0 and r["error"] is None, "attempts and error are cleared", f"    {r}")
    check_archived("node down, then up", d_ct, "T68QR3")

    # QR2 killed after part of a series came, started again
    b_cbct_study, b_cbct_series, b_cbct = series_of(B, "cbct/")
    job = retrieve("t68qr2", b_cbct_study, b_cbct_series,
                   options={"batch": 5, "max_attempts": 50, "retry_delay": 0.2})
    ok(wait_for(lambda: job_row(job)["done"] >= 10, 60),
       f"QR2 killed in the middle: a retrieve of {len(b_cbct)} instances, 5 per step, has 10 here",
       f"    {job_row(job)}")
    qr2.stop()
    ok(wait_for(lambda: job_row(job)["attempts"] >= 1, 30) and job_row(job)["state"] == "running",
       "while QR2 is down the job waits and retries", f"    {job_row(job)}")
    like(job_row(job)["error"], r"(?s)node t68qr2\b.*SQLSTATE 080(01|06)",
         "its error says the association with QR2 failed or it cannot be reached")
    qr2.start()
    is_(wait(job), "done", "QR2 started again: the job completes")
    check_job("QR2 killed and started again", job, "done", len(b_cbct), len(b_cbct))
    check_archived("QR2 killed and started again", b_cbct, "T68QR2")

    # cancel in the middle
    E = patient("T68E", 685, 4)
    e_cbct_study, e_cbct_series, e_cbct = series_of(E, "cbct/")
    qr3.load([f["path"] for f in e_cbct.values()])
    job = retrieve("t68qr3", e_cbct_study, e_cbct_series, options={"batch": 2})
    ok(wait_for(lambda: job_row(job)["done"] >= 4, 60), "cancel: a retrieve 2 instances per step has 4 here")
    execute(conn, "SELECT mdd.cancel(%s)", (job,))
    is_(wait(job), "cancelled", "mdd.cancel stops it: cancelled")
    r = job_row(job)
    ok(4 <= r["done"] < len(e_cbct) and r["finished_at"] is not None,
       "part of the series was retrieved, not all", f"    {r}")
    here = query_value(conn, "SELECT count(*) FROM mdd.objects WHERE series_instance_uid = %s", (e_cbct_series,))
    ok(r["done"] <= here <= r["done"] + 2, "what is here is what was counted, and at most the step in flight",
       f"    {here} here, {r['done']} counted")

    # =======================================================================
    # 7. a node that answers the C-MOVE before its objects come

    F = patient("T68F", 686, 5)
    f_study, f_ct_series, f_ct = series_of(F, "ct/")
    late = FakePacs([f["path"] for f in f_ct.values()], aet="T68LATE", destinations={"MDD": (HOST, PORT)},
                    delay=2.5)
    processes.append(late)
    late.start()
    add_node("t68late", "T68LATE", late.port)
    job = retrieve("t68late", f_study, f_ct_series, options={"retry_delay": 1})
    ok(wait_for(lambda: (job_row(job)["error"] or "").find("not here yet") >= 0, 30),
       "a node that answers success before sending: the job waits for what is not here yet",
       f"    {job_row(job)}\n{late.log()}")
    like(job_row(job)["error"], r"5 instances not here yet, asking again in .*answered C-MOVE status 0x0000 "
                                r"\(5 completed.*but it has not arrived",
         "its error says what the node answered and that nothing arrived")
    st = wait(job)
    ok(st == "done", "the objects come late: the job completes", f"    {st}\n{late.log()}")
    r = check_job("late node", job, "done", len(f_ct), len(f_ct))
    check_archived("late node", f_ct, "T68LATE")

    G = patient("T68G", 687, 4)
    g_study, g_series, g_ct = series_of(G, "ct/")
    never = sorted(g_ct)[0]
    never_pacs = FakePacs([f["path"] for f in g_ct.values()], aet="T68NEVER",
                          destinations={"MDD": (HOST, PORT)}, withhold={never})
    processes.append(never_pacs)
    never_pacs.start()
    add_node("t68never", "T68NEVER", never_pacs.port)
    job = retrieve("t68never", g_study, g_series, options={"max_attempts": 3, "retry_delay": 0.2})
    is_(wait(job), "failed", "a node that never sends one instance it counts as completed: the job fails")
    r = check_job("instance never sent", job, "failed", len(g_ct), len(g_ct) - 1, 1)
    like(r["error"], rf"1 of {len(g_ct)} instances failed; the first, {re.escape(never)}: node t68never "
                     r"answered C-MOVE status 0x0000 \(1 completed.*but it has not arrived",
         "its error names the instance and says the node claimed to have sent it")
    is_(instances(job)[never]["asked"], 3, "it was asked for max_attempts (3) times")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = %s", (never,)), 0,
        "it is not archived")
    check_archived("the others", {u: g_ct[u] for u in sorted(g_ct)[1:]}, "T68NEVER")

    # =======================================================================
    # 8. roles

    execute(conn, "DROP ROLE IF EXISTS tap68reader")
    execute(conn, "DROP ROLE IF EXISTS tap68operator")
    execute(conn, "CREATE ROLE tap68reader LOGIN IN ROLE mdd_reader")
    execute(conn, "CREATE ROLE tap68operator LOGIN IN ROLE mdd_operator")
    reader = connect(user="tap68reader")
    raises(reader, "SELECT mdd.retrieve('t68orthanc', %s)", (c_ct_study,), "42501", "a reader may not retrieve")
    raises(reader, "SELECT mdd.move('t68qr2', 't68dest', %s)", (b_plan_study,), "42501", "a reader may not move")
    reader.close()
    operator = connect(user="tap68operator")
    c_struct = next(u for u, f in C.items() if f["modality"] == "RTSTRUCT")
    op_job = query_value(operator, "SELECT mdd.retrieve('t68orthanc', %s, %s, %s)",
                         (C[c_struct]["study_instance_uid"], C[c_struct]["series_instance_uid"], c_struct))
    is_(query_value(operator, "SELECT mdd.wait(%s, '60 s')", (op_job,)), "done", "an operator may retrieve")
    is_(query_value(operator, "SELECT created_by FROM mdd.jobs WHERE id = %s", (op_job,)), "tap68operator",
        "the job is the operator's")
    job = query_value(operator, "SELECT mdd.move('t68qr3', 't68dest', %s, %s)", (d_study, d_ct_series))
    is_(query_value(operator, "SELECT mdd.wait(%s, '60 s')", (job,)), "done", "an operator may move")
    operator.close()
    is_(query_value(conn, "SELECT role FROM mdd.audit_log WHERE action = 'retrieve requested' AND detail LIKE %s",
                    (f"job {op_job}:%",)), "tap68operator", "the audit row names the operator")
    execute(conn, "DROP ROLE tap68reader")
    execute(conn, "DROP ROLE tap68operator")

    # =======================================================================
    # 9. a restart of the server in the middle of a retrieve, on a cluster of this test

    datadir = os.path.join(test_dir, "t68-restart", "pgdata")
    make_server_dir(os.path.dirname(datadir), mode=0o755)
    cport = free_port()
    dport = free_port()

    def cluster(*args):
        subprocess.run([os.path.join(top, "scripts", "cluster.sh"), *args], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)

    def connect_when_up(timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return connect(port=cport)
            except DBError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    H = patient("T68H", 688, 30)
    h_study, h_series, h_ct = series_of(H, "ct/")
    qr4 = QRSCP(os.path.join(work, "qr4"), "T68QR4", peers={"MDD2": (HOST, dport)})
    processes.append(qr4)
    qr4.load([f["path"] for f in h_ct.values()])
    qr4.start()
    cluster("start", datadir, str(cport), "shared_buffers = 32MB", "max_wal_size = 256MB",
            f"mdd.dicom_port = {dport}", "mdd.ae_title = 'MDD2'", "mdd.job_workers = 1")
    c2 = None
    try:
        c2 = connect_when_up()
        execute(c2, "CREATE EXTENSION mdd")
        execute(c2, "SELECT mdd.add_node('t68qr4', 'T68QR4', %s, %s)", (HOST, qr4.port))
        c2.autocommit = False
        cur = c2.cursor()
        cur.execute("SELECT mdd.retrieve('t68qr4', %s, %s)", (h_study, h_series))
        job = cur.fetchone()[0]
        cur.execute("""UPDATE mdd.job SET options = '{"batch": 5}' WHERE id = %s""", (job,))
        c2.commit()
        c2.autocommit = True
        ok(wait_for(lambda: query_value(c2, "SELECT done FROM mdd.jobs WHERE id = %s", (job,)) >= 10, 60),
           f"restart: the retrieve of {len(h_ct)} instances, 5 per step, has 10 here")
        c2.close()
        cluster("stop", datadir)
        c2 = None
        cluster("start", datadir, str(cport))
        c2 = connect_when_up()
        before = query_one(c2, "SELECT state, done FROM mdd.jobs WHERE id = %s", (job,))
        ok(before["state"] == "running" and 10 <= before["done"] < len(h_ct),
           "after the restart the job is still running, part of it done", f"    {before}")
        is_(wait(job, c=c2), "done", "and it completes")
        r = query_one(c2, "SELECT total, done, failed FROM mdd.jobs WHERE id = %s", (job,))
        is_((r["total"], r["done"], r["failed"]), (len(h_ct), len(h_ct), 0), "every instance counted")
        check_archived("after the restart", h_ct, "T68QR4", c=c2)
        is_(query_value(c2, "SELECT count(*) FROM mdd.objects"), len(h_ct), "and nothing else")
        sent = qr_log_count(qr4, "Store SCU RQ")
        ok(len(h_ct) <= sent <= len(h_ct) + 5,
           "at most the instances of the step in flight were sent twice",
           f"    QR4 sent {sent} C-STOREs for {len(h_ct)} instances")

        # a server stop while the runner waits for a node that never answers
        silent = socket.socket()
        silent.bind((HOST, 0))
        silent.listen(4)
        held = []

        def hold():
            while True:
                try:
                    held.append(silent.accept()[0])
                except OSError:
                    return
        threading.Thread(target=hold, daemon=True).start()
        execute(c2, "SELECT mdd.add_node('t68silent', 'SILENT', %s, %s)", (HOST, silent.getsockname()[1]))
        job = query_value(c2, "SELECT mdd.retrieve('t68silent', %s)", (h_study,))
        ok(wait_for(lambda: query_value(c2, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                            "'mdd job runner' AND query LIKE %s", (f"job {job}: C-FIND%",)), 30),
           "a node that accepts the connection and never answers: the runner waits for it")
        c2.close()
        c2 = None
        t0 = time.monotonic()
        cluster("stop", datadir)
        stop_time = time.monotonic() - t0
        ok(stop_time < 10, "the server stops at once all the same (the runner's wait is cut short)",
           f"    the stop took {stop_time:.1f} s (mdd.dicom_acse_timeout is 30 s)")
        cluster("start", datadir, str(cport))
        c2 = connect_when_up()
        is_(query_value(c2, "SELECT state FROM mdd.jobs WHERE id = %s", (job,)), "running",
            "the job is still running after the restart, to be resumed")
        execute(c2, "SELECT mdd.cancel(%s)", (job,))
        silent.close()
        for h in held:
            h.close()
        c2.close()
        c2 = None
    finally:
        if c2 is not None:
            c2.close()
        cluster("stop", datadir)
finally:
    orthanc.stop()
    for p in processes:
        p.stop()

note(f"runtime {time.monotonic() - started:.1f} s")
done_testing()
