#!/usr/bin/python3
# Storage Commitment (Push Model) with Orthanc as the storage SCU: Orthanc
# sends a generated series to mdd by C-STORE, then asks mdd to commit to
# them by N-ACTION (REST /modalities/mdd/storage-commitment); mdd reports
# by N-EVENT-REPORT on an association of its own to Orthanc's SCP, and
# Orthanc shows the outcome (/storage-commitment/{transaction}).
#   1. the stored instances are committed; an instance mdd never received
#      fails with 0x0112 (no such object instance), one held under another
#      SOP class with 0x0119 (class-instance conflict);
#   2. the report is a job of kind commit; request and report are audited;
#   3. Orthanc unreachable when mdd reports (the node's port is wrong): the
#      job retries, saying why, and the report arrives once the node is
#      corrected;
#   4. a request from a node without host and port (nowhere to report to)
#      is refused at once, and nothing is queued.
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from orthanc import ORTHANC, Orthanc  # noqa: E402
from dicomtools import free_port  # noqa: E402

test_dir = env("MDD_TEST_DIR")
DICOM_PORT = int(env("MDD_DICOM_PORT"))
HOST = "127.0.0.1"
PATIENT = "T72COMMIT"
if not os.access(ORTHANC, os.X_OK):
    skip_all(f"{ORTHANC} is not installed (Debian package orthanc)")
TIME_LIMIT = 150


def _too_long(signum, frame):
    raise TimeoutError(f"72_commitment.t still running after {TIME_LIMIT} s")


signal.signal(signal.SIGALRM, _too_long)
signal.alarm(TIME_LIMIT)

src = make_server_dir(os.path.join(test_dir, "t72-patient"), mode=0o755)
manifest = generate_patient(src, PATIENT, 72, slices=3)
ct = [f for f in manifest["files"] if f["kind"] == "dicom" and f["path"].startswith("ct/")]
conn = connect()

orthanc = Orthanc(make_server_dir(os.path.join(test_dir, "t72-orthanc"), mode=0o755), aet="T72ORTHANC",
                  modalities={"mdd": ["MDD", HOST, DICOM_PORT]})


def commitment(instances, timeout=60):
    """Ask mdd to commit to instances [(class, uid)]; the transaction and
    Orthanc's final view of it (None when it stayed pending)."""
    status, res = orthanc.post("/modalities/mdd/storage-commitment",
                               {"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": u}
                                                   for c, u in instances]})
    if status != 200 or not isinstance(res, dict) or "ID" not in res:
        return None, (status, res)
    tx = res["ID"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, res = orthanc.get(f"/storage-commitment/{tx}")
        if status == 200 and isinstance(res, dict) and res.get("Status") != "Pending":
            return tx, res
        time.sleep(0.2)
    return tx, None


def job_of(tx):
    return query_one(conn, "SELECT * FROM mdd.job WHERE kind = 'commit' AND options->>'transaction_uid' = %s", (tx,))


def job_ended(tx, timeout=15):
    """The job of tx once it has ended (or as it is after timeout): it
    records its end after the report went, so Orthanc may have the report a
    moment before."""
    deadline = time.monotonic() + timeout
    j = job_of(tx)
    while j and j["state"] not in ("done", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.1)
        j = job_of(tx)
    return j


try:
    orthanc.start()
    execute(conn, "SELECT mdd.add_node('t72orthanc', 'T72ORTHANC', %s, %s)", (HOST, orthanc.dicom_port))
    uploaded = []
    for f in ct:
        with open(os.path.join(src, f["path"]), "rb") as fh:
            status, res = orthanc.post("/instances", fh.read())
        uploaded.append(res["ID"] if status == 200 and isinstance(res, dict) else None)
    status, res = orthanc.post("/modalities/mdd/store", {"Resources": uploaded, "Synchronous": True}, timeout=60)
    ok(status == 200 and None not in uploaded, "setup: Orthanc sent the series to mdd by C-STORE", str(res)[:300])
    held = [(f["sop_class_uid"], f["sop_instance_uid"]) for f in ct]
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = ANY(%s)",
                    ([u for _, u in held],)), len(held), "mdd holds them")

    # 1. committed, missing, class conflict
    unknown = ("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.99.72.404")
    conflict = ("1.2.840.10008.5.1.4.1.1.4", held[0][1])      # MR Image Storage, but it is a CT
    tx, res = commitment(held + [unknown, conflict])
    ok(res is not None, "Orthanc receives mdd's report", f"{tx}: {res}", orthanc.log_tail(20))
    res = res or {}
    is_(res.get("Status"), "Failure", "the transaction fails as a whole (two instances are not committed)")
    is_(sorted((s["SOPClassUID"], s["SOPInstanceUID"]) for s in res.get("Success", [])), sorted(held),
        "the stored instances are committed")
    is_(sorted((f["SOPClassUID"], f["SOPInstanceUID"], f["FailureReason"]) for f in res.get("Failures", [])),
        sorted([unknown + (0x0112,), conflict + (0x0119,)]),
        "the unknown instance fails with 0x0112, the one of another class with 0x0119")

    # 2. the job and the audit trail
    j = job_ended(tx)
    is_((j["state"], j["total"], j["done"]) if j else None, ("done", len(held) + 2, len(held) + 2),
        "the report was a commit job, done")
    is_(query_value(conn, "SELECT detail FROM mdd.audit_log WHERE action = 'commitment requested' "
                          "AND detail LIKE %s", (f"%transaction {tx} %",)),
        f"job {j['id'] if j else '?'}: transaction {tx} from node t72orthanc: {len(held) + 2} instances, 2 not held",
        "the request is audited with the node and what is not held")
    like(query_value(conn, "SELECT detail FROM mdd.audit_log WHERE action = 'commit done' AND detail LIKE %s",
                     (f"%transaction {tx} %",)),
         rf"reported to node t72orthanc: {len(held)} instances committed, 2 not$", "the report is audited")

    tx, res = commitment(held)
    is_((res or {}).get("Status"), "Success", "a request for stored instances only succeeds as a whole")

    # 3. Orthanc unreachable at report time, then corrected
    execute(conn, "SELECT mdd.alter_node('t72orthanc', port => %s)", (free_port(),))
    status, res = orthanc.post("/modalities/mdd/storage-commitment",
                               {"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": u} for c, u in held]})
    tx = res.get("ID") if isinstance(res, dict) else None
    ok(tx is not None, "a request while mdd cannot reach Orthanc is taken", f"HTTP {status}: {res}")
    deadline = time.monotonic() + 30
    j = None
    while time.monotonic() < deadline:
        j = job_of(tx)
        if j and j["attempts"] > 0:
            break
        time.sleep(0.2)
    ok(j is not None and j["attempts"] > 0 and j["state"] in ("queued", "running")
       and "storage commitment report: cannot associate with T72ORTHANC" in (j["error"] or ""),
       "the report job retries, saying why", str(j))
    status, res = orthanc.get(f"/storage-commitment/{tx}")
    is_((res or {}).get("Status") if isinstance(res, dict) else res, "Pending", "Orthanc still waits")
    execute(conn, "SELECT mdd.alter_node('t72orthanc', port => %s)", (orthanc.dicom_port,))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, res = orthanc.get(f"/storage-commitment/{tx}")
        if isinstance(res, dict) and res.get("Status") != "Pending":
            break
        time.sleep(0.3)
    is_((res or {}).get("Status") if isinstance(res, dict) else res, "Success",
        "once the node is corrected, the report arrives: all committed")
    is_((job_ended(tx) or {}).get("state"), "done", "and the job is done")

    # 4. nowhere to report to
    execute(conn, "SELECT mdd.alter_node('t72orthanc', host => '')")
    before = query_value(conn, "SELECT count(*) FROM mdd.job WHERE kind = 'commit'")
    status, res = orthanc.post("/modalities/mdd/storage-commitment",
                               {"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": u} for c, u in held]})
    tx = res.get("ID") if isinstance(res, dict) else None
    refused = status != 200 or tx is None
    if not refused:
        # Orthanc may take the refusal as a failed transaction rather than an HTTP error
        _, final = orthanc.get(f"/storage-commitment/{tx}")
        refused = isinstance(final, dict) and final.get("Status") != "Success"
    ok(refused, "a request from a node without host and port is refused", f"HTTP {status}: {res}")
    is_(query_value(conn, "SELECT count(*) FROM mdd.job WHERE kind = 'commit'"), before, "and nothing is queued")
    like(server_log_tail(env("MDD_DATADIR"), 200),
         r'storage commitment \S+ from "T72ORTHANC" at 127\.0\.0\.1 refused: storage commitment from "T72ORTHANC": '
         r'no node with this AE title has a host and port', "the server log says why")
    execute(conn, "SELECT mdd.alter_node('t72orthanc', host => %s)", (HOST,))
finally:
    orthanc.stop()

done_testing()
