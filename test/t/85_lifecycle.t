#!/usr/bin/python3
# Archive and restore through the job runners between the online large
# objects and a file storage of the archive tier: what travels together
# (include_related), where each object is (mdd.objects.tier, archived_at,
# mdd.copy), restored large objects in lz4 chunks, reading archived objects
# (mdd.read, mdd.export, C-MOVE) without restoring them, the job views and
# functions (mdd.jobs, mdd.wait, mdd.cancel), the audit trail, bad
# requests, a blob corrupted behind mdd's back (reads fail naming the
# object, mdd.verify finds it, an archive job fails that object only) and a
# target that refuses writes.
import glob
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

PATIENT = "TAP85"
test_dir = env("MDD_TEST_DIR")
dicom_port = env("MDD_DICOM_PORT")
src = make_server_dir(os.path.join(test_dir, "allowed", "p85"), mode=0o755)
archive_root = make_server_dir(os.path.join(test_dir, "allowed", "archive85"))
manifest = generate_patient(src, PATIENT, 85, slices=10, small=30)

conn = connect()
execute(conn, "SELECT count(*) FROM mdd.import(%s)", (src,))
ids = {r["sop_instance_uid"]: r["id"] for r in query_dicts(
    conn, "SELECT id, sop_instance_uid FROM mdd.objects WHERE patient_id = %s", (PATIENT,))}
sums = dict(query(conn, "SELECT id, sha256 FROM mdd.objects WHERE patient_id = %s", (PATIENT,)))
dicom = [f for f in manifest["files"] if f["kind"] == "dicom"]
is_(len(ids), len(dicom), "every DICOM object of the patient is imported")

ct = sorted(ids[f["sop_instance_uid"]] for f in dicom if f["path"].startswith("ct/"))
rtstruct = ids[next(f["sop_instance_uid"] for f in dicom if f["modality"] == "RTSTRUCT")]
rtplan = ids[next(f["sop_instance_uid"] for f in dicom if f["modality"] == "RTPLAN")]
rtdose = ids[next(f["sop_instance_uid"] for f in dicom if f["modality"] == "RTDOSE")]
small = sorted(ids[f["sop_instance_uid"]] for f in dicom if f["path"].startswith("small/"))


def wait(job, timeout="60 s"):
    return query_value(conn, "SELECT mdd.wait(%s, %s)", (job, timeout))


def job_row(job):
    return query_one(conn, "SELECT * FROM mdd.jobs WHERE id = %s", (job,))


def tiers(object_ids):
    return dict(query(conn, "SELECT id, tier FROM mdd.objects WHERE id = ANY(%s)", (list(object_ids),)))


def copies(object_id):
    return sorted(query(conn, """SELECT s.name, c.state FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                                 WHERE c.object = %s""", (object_id,)))


def all_readable(object_ids):
    bad = [i for i, s in query(conn, "SELECT id, encode(sha256(mdd.read(id, true)), 'hex') FROM "
                                      "unnest(%s::bigint[]) id", (list(object_ids),))
           if s != sums[i]]
    return bad


def files_on_disk():
    return sorted(os.path.relpath(p, archive_root)
                  for p in glob.glob(os.path.join(archive_root, "**", "*"), recursive=True)
                  if os.path.isfile(p))


def catalog_files():
    return sorted(query_value(conn, """SELECT coalesce(array_agg(c.locator), '{}') FROM mdd.copy c
                                       JOIN mdd.storage s ON s.id = c.storage WHERE s.name = 'archive85'"""))


# ---------------------------------------------------------------------------
# bad requests

jobs_before = query_value(conn, "SELECT count(*) FROM mdd.jobs")

execute(conn, "SELECT mdd.add_storage('archive85', 'file', 'archive', %s)",
        (f'{{"root": "{archive_root}"}}',))
execute(conn, "SELECT mdd.add_storage('archive85b', 'file', 'archive', %s)",
        (f'{{"root": "{make_server_dir(os.path.join(test_dir, "allowed", "archive85b"))}"}}',))
raises(conn, "SELECT mdd.archive(%s)", ([ct[0]],), "22023",
       "archive without a storage while several archive-tier storages exist is refused",
       "archive-tier storages exist")
execute(conn, "SELECT mdd.add_storage('online85', 'file', 'online', %s)",
        (f'{{"root": "{make_server_dir(os.path.join(test_dir, "allowed", "online85"))}"}}',))
raises(conn, "SELECT mdd.archive(%s, 'nosuch')", ([ct[0]],), "42704", "an unknown storage is refused")
raises(conn, "SELECT mdd.archive(%s, 'online85')", ([ct[0]],), "22023",
       "an online-tier storage is no archive target", "not an archive-tier")
raises(conn, "SELECT mdd.archive(%s, 'archive85')", ([ct[0], 99999999],), "42704",
       "an unknown object id is refused, naming it", "99999999")
raises(conn, "SELECT mdd.archive('{}'::bigint[], 'archive85')", None, "22023", "an empty id list is refused")
raises(conn, "SELECT mdd.wait(99999999)", None, "42704", "mdd.wait of an unknown job is refused")
raises(conn, "SELECT mdd.cancel(99999999)", None, "42704", "mdd.cancel of an unknown job is refused")
is_(query_value(conn, "SELECT count(*) FROM mdd.jobs"), jobs_before, "no job was queued by the bad requests")

# ---------------------------------------------------------------------------
# archive a structure set with what travels with it

t0 = time.monotonic()
job = query_value(conn, "SELECT mdd.archive(%s, 'archive85')", ([rtstruct],))
is_(wait(job), "done", "the archive job of the structure set ends done")
ok(time.monotonic() - t0 < 10, "the runners took the job at once (woken at commit)",
   f"    took {time.monotonic() - t0:.1f} s")
r = job_row(job)
expected = sorted({rtstruct, rtplan, rtdose})
is_((r["kind"], r["storage"], r["total"], r["done"], r["failed"]),
    ("archive", "archive85", len(expected), len(expected), 0),
    "mdd.jobs: kind, storage, total, done, failed")
ok(r["bytes"] > 0 and r["started_at"] and r["finished_at"] and r["error"] is None,
   "mdd.jobs: bytes, started_at, finished_at, no error")
is_(tiers(expected), {i: "archive" for i in expected},
    "the structure set, the plan on it and the dose on the plan are archived together")
is_(set(tiers(ct).values()), {"online"}, "the CT it references stays online (related goes one way)")
is_(copies(rtplan), [("archive85", "present")], "the plan has one present copy, on archive85 only")
ok(all(query_value(conn, "SELECT archived_at IS NOT NULL FROM mdd.objects WHERE id = %s", (i,)) for i in expected),
   "archived_at is set")
is_(all_readable(expected), [], "archived objects read back with their SHA-256 (mdd.read, no restore)")
target = os.path.join(test_dir, "allowed", "export85.dcm")
execute(conn, "SELECT mdd.export(%s, %s, verify => true)", (rtdose, target))
is_(sha256_file(target), sums[rtdose], "mdd.export of an archived object writes its exact bytes")
is_(catalog_files(), files_on_disk(), "the archive directory holds exactly the catalog's blobs")
is_(query_value(conn, """SELECT count(*) FROM mdd.audit_log WHERE action = 'archive'
                          AND object_id = ANY(%s)""", (expected,)), len(expected),
    "each archived object is in the audit log")

# include_related => false, and the CT series with everything on it
job = query_value(conn, "SELECT mdd.archive(%s, 'archive85', include_related => false)", ([ct[0]],))
is_(wait(job), "done", "archive of one CT image without related objects: done")
is_(job_row(job)["total"], 1, "only that image was in the job")
execute(conn, "SET mdd.archive_storage = 'archive85'")
job = query_value(conn, "SELECT mdd.archive(%s)", (ct,))
is_(wait(job), "done", "archive of the CT series to mdd.archive_storage (storage NULL): done")
is_(set(tiers(ct).values()), {"archive"}, "the whole CT series is archived")
is_(job_row(job)["done"], len(ct) + 3, "the series, its structure set, plan and dose (already archived) count as done")

# C-MOVE reads from the archive tier
execute(conn, """SELECT mdd.add_node('tap85', 'TAP85', '127.0.0.1', NULL)""")
recv = tempfile.mkdtemp(dir=test_dir)
os.chmod(recv, 0o777)
scp_port = int(dicom_port) + 85
execute(conn, "SELECT mdd.add_node('tap85dest', 'TAP85DEST', '127.0.0.1', %s)", (scp_port,))
scp = subprocess.Popen(["storescp", "+B", "-aet", "TAP85DEST", "-od", recv, str(scp_port)],
                       env=dict(os.environ, TCP_NODELAY="1"), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
try:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and scp.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", scp_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    ok(scp.poll() is None, "storescp is listening", f"    exit status {scp.poll()}")
    study = query_value(conn, "SELECT study_instance_uid FROM mdd.objects WHERE id = %s", (ct[0],))
    p = subprocess.run(["movescu", "-aet", "TAP85", "-aec", "MDD", "-aem", "TAP85DEST", "-S",
                        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
                        "127.0.0.1", dicom_port], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TCP_NODELAY="1"))
    n_study = query_value(conn, "SELECT count(*) FROM mdd.objects WHERE study_instance_uid = %s", (study,))
    ok(len(os.listdir(recv)) == n_study, "C-MOVE of the archived study delivers every object",
       f"    received {len(os.listdir(recv))} of {n_study}", p.stdout + p.stderr)
finally:
    scp.terminate()
    scp.wait(10)

# ---------------------------------------------------------------------------
# restore

job = query_value(conn, "SELECT mdd.restore(%s)", ([ct[1]],))
is_(wait(job), "done", "restore of one CT image with its related objects: done")
restored = [ct[1], rtstruct, rtplan, rtdose]
is_(tiers(restored), {i: "online" for i in restored}, "the image and what references it are online again")
is_(copies(rtplan), [("online", "present")], "the plan's archive copy was released")
is_(lo_compression(conn, restored), ["lz4"],
    "the runner compresses the restored large-object chunks with lz4, not pglz")
ok(all(query_value(conn, "SELECT archived_at IS NULL FROM mdd.objects WHERE id = %s", (i,)) for i in restored),
   "archived_at is cleared")
is_(all_readable(restored + ct), [], "restored and still archived objects read back with their SHA-256")
is_(catalog_files(), files_on_disk(), "released blobs are gone from the archive directory")

# ---------------------------------------------------------------------------
# cancel, and a job that is stopped half way leaves every object in one place

job = query_value(conn, "SELECT mdd.archive(%s, 'archive85', include_related => false)", (small,))
execute(conn, "SELECT mdd.cancel(%s)", (job,))
state = wait(job)
ok(state in ("cancelled", "done"), "a cancelled job ends cancelled (or done, when it was quicker)", f"    {state}")
# a cancelled job has finished_at once the copies it began are undone
deadline = time.monotonic() + 60
while time.monotonic() < deadline and job_row(job)["finished_at"] is None:
    time.sleep(0.05)
ok(job_row(job)["finished_at"] is not None, "the cancelled job has finished undoing", str(job_row(job)))
ok(query_value(conn, "SELECT count(*) FROM mdd.copy WHERE state <> 'present'") == 0,
   "after the cancel no copy is left writing or releasing")
is_(all_readable(small), [], "every object of the cancelled job reads back")
is_(catalog_files(), files_on_disk(), "and the archive directory holds exactly the catalog's blobs")
is_(query_value(conn, "SELECT count(*) FROM mdd.copy c WHERE c.object = ANY(%s) AND c.state = 'present'",
                (small,)), len(small), "each object has exactly one present copy")

# ---------------------------------------------------------------------------
# corruption behind mdd's back

victim = ct[3]
loc = query_value(conn, """SELECT c.locator FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                           WHERE c.object = %s AND s.name = 'archive85'""", (victim,))
path = os.path.join(archive_root, loc)
with open(path, "r+b") as fh:
    data = fh.read()
    fh.seek(len(data) // 2)
    fh.write(bytes([data[len(data) // 2] ^ 0x5A]))
e = raises(conn, "SELECT mdd.read(%s)", (victim,), "XX001",
           "reading an archived object whose blob was altered fails with XX001, even without verify")
like(e and e.diag.message_primary, rf"\bobject {victim}\b.*checksum", "the error names the object and the checksum")
bad = query_dicts(conn, "SELECT * FROM mdd.verify('archive85')")
is_([b["object_id"] for b in bad], [victim], "mdd.verify('archive85') finds exactly the altered object")
like(bad and bad[0]["problem"], r"checksum mismatch", "and says why")
ok(query_value(conn, """SELECT bool_and(verified_at > now() - interval '1 min') FROM mdd.copy c
                        JOIN mdd.storage s ON s.id = c.storage
                        WHERE s.name = 'archive85' AND c.object <> %s""", (victim,)),
   "the good copies get a fresh verified_at")
on_archive = query_value(conn, """SELECT count(*) FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                             WHERE s.name = 'archive85' AND c.state = 'present'""")
vjob = query_value(conn, "SELECT mdd.verify_storage('archive85')")
is_(wait(vjob), "failed", "a verify job of the storage ends failed")
r = job_row(vjob)
is_((r["kind"], r["total"], r["done"], r["failed"]), ("verify", on_archive, on_archive - 1, 1),
    "it checked every copy there, one bad")
like(r["error"], rf"1 of {on_archive} objects failed; the first: checksum mismatch", "its error says why")
is_(query(conn, "SELECT object FROM mdd.job_item WHERE job = %s AND state = 'failed'", (vjob,)), [(victim,)],
    "the failed item is the altered object")
like(query_value(conn, "SELECT detail FROM mdd.audit_log WHERE action = 'verify failed' AND object_id = %s "
                       "ORDER BY at DESC LIMIT 1", (victim,)),
     rf"^job {vjob}: copy on storage archive85 of .*checksum mismatch", "the bad copy is audited with its object")
execute(conn, """UPDATE mdd.copy c SET verified_at = now() - interval '2 days' FROM mdd.storage s
                  WHERE s.id = c.storage AND s.name = 'archive85' AND c.object = %s""", (victim,))
vjob = query_value(conn, "SELECT mdd.verify_storage('archive85', not_verified_since => '1 day')")
is_(wait(vjob), "failed", "a verify job of what was not found good within a day (last good two days ago)")
is_(query(conn, "SELECT object FROM mdd.job_item WHERE job = %s", (vjob,)), [(victim,)],
    "takes only the altered object")
raises(conn, "SELECT mdd.verify_storage('nosuch85')", None, "42704", "verify_storage of an unknown storage: 42704")
execute(conn, "SELECT mdd.create_rule('fixity85', 'true', 'verify', 'archive85', batch_size => 3)")
vjob = query_value(conn, "SELECT mdd.run_rule('fixity85')")
is_(wait(vjob), "failed", "a run of a verify rule of the storage ends failed")
r = job_row(vjob)
is_((r["kind"], r["total"], r["failed"], r["rule"]), ("verify", on_archive, 1, "fixity85"),
    "it checked every copy there, one bad, as the rule's job")
is_(r["batches"], -(-on_archive // 3), "in batches of the rule's size")
is_(query_value(conn, "SELECT last_state FROM mdd.rules WHERE name = 'fixity85'"), "failed",
    "mdd.rules shows the failed run")
execute(conn, "SELECT mdd.drop_rule('fixity85')")
job = query_value(conn, "SELECT mdd.restore(%s, false)", ([victim, ct[4]],))
is_(wait(job), "failed", "a restore including the corrupt object ends failed")
r = job_row(job)
is_((r["done"], r["failed"]), (1, 1), "one object restored, the corrupt one failed")
like(r["error"], rf"1 of 2 objects failed.*object {victim}.*checksum", "the job's error names the object")
is_(tiers([victim, ct[4]]), {victim: "archive", ct[4]: "online"}, "the corrupt object stays where it was")
is_(copies(victim), [("archive85", "present")], "with its one copy, nothing half-written beside it")
with open(path, "r+b") as fh:
    fh.write(data)
is_(all_readable([victim]), [], "once repaired, it reads back again")

# ---------------------------------------------------------------------------
# a target that refuses writes

execute(conn, "UPDATE mdd.storage SET read_only = true WHERE name = 'archive85'")
raises(conn, "SELECT mdd.archive(%s, 'archive85')", ([small[0]],), "25006",
       "archiving to a read-only storage is refused at once")
execute(conn, "UPDATE mdd.storage SET read_only = false WHERE name = 'archive85'")

def chmod_tree(top, mode):
    for root, dirs, _ in os.walk(top):
        os.chmod(root, mode)


# (the cancelled job above may have finished first: bring these back online)
is_(wait(query_value(conn, "SELECT mdd.restore(%s, false)", (small[:3],))), "done",
    "three small objects are online before the next job")
chmod_tree(archive_root, 0o555)
try:
    job = query_value(conn, "SELECT mdd.archive(%s, 'archive85', false)", (small[:3],))
    is_(wait(job), "failed", "archiving into a directory the server may not write ends failed")
    r = job_row(job)
    is_((r["done"], r["failed"]), (0, 3), "every object of it failed")
    like(r["error"], r"3 of 3 objects failed.*(ermission|denied)", "with the reason")
finally:
    chmod_tree(archive_root, 0o777)
is_(set(tiers(small[:3]).values()), {"online"}, "the objects are still online")
is_(all_readable(small[:3]), [], "and read back")
is_(query_value(conn, "SELECT count(*) FROM mdd.copy WHERE state <> 'present'"), 0,
    "no copy is left writing or releasing")

# ---------------------------------------------------------------------------
# the audit trail and the roles

ok(query_value(conn, "SELECT count(*) FROM mdd.audit_log WHERE action IN ('archive done', 'restore done', "
                     "'archive requested', 'restore requested', 'restore failed', 'cancel', 'verify')") >= 6,
   "requests, ends, cancels and fixity checks are in the audit log")
execute(conn, "DROP ROLE IF EXISTS tap85reader")
execute(conn, "CREATE ROLE tap85reader LOGIN IN ROLE mdd_reader")
reader = connect(user="tap85reader")
raises(reader, "SELECT mdd.archive(%s)", ([small[0]],), "42501", "a reader may not archive")
ok(len(query(reader, "SELECT * FROM mdd.jobs")) > 0, "a reader sees mdd.jobs")
reader.close()
execute(conn, "DROP ROLE tap85reader")

done_testing()
