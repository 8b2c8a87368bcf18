#!/usr/bin/python3
# mdd.import of a directory mixing good DICOM files with bad ones: a
# truncated slice, garbage, an empty file, pydicom's MR_truncated.dcm, a file
# without SOP Instance UID, a slice claiming another patient's study, a
# second version of an archived SOP instance, a file the server may not
# read and a symbolic link leading outside mdd.allowed_paths.  One row per
# file; ids for the good ones, readable errors for the bad ones, and nothing
# of the bad ones left behind (object rows, large objects, blobs), also when
# an import into a file storage is rolled back.  Progress NOTICEs; a named
# pipe must not hang the server; and what a non-superuser operator may and
# may not do.
import os
import random
import shutil
import sys
import threading
import time
import warnings

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

warnings.simplefilter("ignore")
import pydicom  # noqa: E402

test_dir = env("MDD_TEST_DIR")
pydicom_dir = env("MDD_PYDICOM_DIR")
allowed = os.path.join(test_dir, "allowed")
outside = os.path.join(test_dir, "outside")
ROLE = "tap40"
FILE_STORAGE = "tap40files"

conn = connect()
# superusers may read anywhere by default (mdd.superuser_any_path): not here
execute(conn, "SET mdd.superuser_any_path = off")

# ---------------------------------------------------------------------------
# the directories


def readable(path, mode=0o644):
    os.chmod(path, mode)
    return path


def dicom_variant(src, dst, **changes):
    """Copy a DICOM file with some attributes changed (None deletes)."""
    ds = pydicom.dcmread(src)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
            if keyword == "SOPInstanceUID" and "MediaStorageSOPInstanceUID" in ds.file_meta:
                del ds.file_meta.MediaStorageSOPInstanceUID
        else:
            setattr(ds, keyword, value)
    ds.save_as(dst, write_like_original=True)
    readable(dst)


# what each bad file is, and what its error must say
BAD = {
    "ct_half.dcm": r"truncated or malformed",
    "empty.dcm": r"(?i)empty",
    "garbage.bin": r"not a DICOM",
    "MR_truncated.dcm": r"truncated or malformed",
    "no_sop_uid.dcm": r"lacks a required identifier",
    "other_patient.dcm": r"belongs to another patient",
    "unreadable.dcm": r"(?i)permission denied",
    "link_outside.dcm": r"outside the allowed directories",
    "z_same_uid_other_bytes.dcm": r"already archived with other content",
}


def build(name, patient, seed):
    """A directory under allowed with good and bad files; returns
    (directory, {relative path of each good file: SOP Instance UID},
    {SOP Instance UID of the good data inside bad files})."""
    src = make_server_dir(os.path.join(test_dir, f"t40-src-{name}"), mode=0o755)
    generate_patient(src, patient, seed, slices=8, extra=("--no-pdf",))
    d = make_server_dir(os.path.join(allowed, f"t40-{name}"), mode=0o755)
    os.makedirs(os.path.join(d, "sub", "deeper"))
    good = {
        "CT_0001.dcm": "ct/CT_0001.dcm",
        "CT_0002.dcm": "ct/CT_0002.dcm",
        "CT_0003.dcm": "ct/CT_0003.dcm",
        "RS.dcm": "rtstruct.dcm",
        "sub/CT_0004.dcm": "ct/CT_0004.dcm",
        "sub/RP.dcm": "rtplan.dcm",
        "sub/RD.dcm": "rtdose.dcm",
        "sub/deeper/CBCT_0001.dcm": "cbct/CBCT_0001.dcm",
        "sub/deeper/copy_of_CT_0001.dcm": "ct/CT_0001.dcm",     # the same bytes again
    }
    for dst, s in good.items():
        shutil.copyfile(os.path.join(src, s), os.path.join(d, dst))
        readable(os.path.join(d, dst))
    for sub in ("sub", "sub/deeper"):
        os.chmod(os.path.join(d, sub), 0o755)
    ct = lambda n: os.path.join(src, "ct", f"CT_{n:04d}.dcm")  # noqa: E731
    with open(ct(5), "rb") as fh:
        data = fh.read()
    with open(os.path.join(d, "ct_half.dcm"), "wb") as fh:
        fh.write(data[:len(data) // 2])
    readable(os.path.join(d, "ct_half.dcm"))
    with open(os.path.join(d, "garbage.bin"), "wb") as fh:
        fh.write(random.Random(seed).randbytes(4096))
    readable(os.path.join(d, "garbage.bin"))
    open(os.path.join(d, "empty.dcm"), "wb").close()
    readable(os.path.join(d, "empty.dcm"))
    shutil.copyfile(os.path.join(pydicom_dir, "MR_truncated.dcm"),
                    os.path.join(d, "MR_truncated.dcm"))
    readable(os.path.join(d, "MR_truncated.dcm"))
    dicom_variant(ct(8), os.path.join(d, "no_sop_uid.dcm"), SOPInstanceUID=None)
    dicom_variant(ct(8), os.path.join(d, "other_patient.dcm"),
                  PatientID=patient + "X", SOPInstanceUID=pydicom.uid.generate_uid(
                      entropy_srcs=[patient, "other-patient"]))
    dicom_variant(os.path.join(src, "ct", "CT_0001.dcm"),
                  os.path.join(d, "z_same_uid_other_bytes.dcm"), InstanceNumber=999)
    shutil.copyfile(ct(6), os.path.join(d, "unreadable.dcm"))
    os.chmod(os.path.join(d, "unreadable.dcm"), 0o000)
    target = os.path.join(outside, f"t40-{name}-CT_0007.dcm")
    shutil.copyfile(ct(7), target)
    readable(target)
    os.symlink(target, os.path.join(d, "link_outside.dcm"))
    uid = lambda p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)  # noqa: E731
    good_uids = {rel: uid(os.path.join(d, rel)) for rel in good}
    bad_uids = {uid(ct(n)) for n in (5, 6, 7, 8)}
    return d, good_uids, bad_uids


def by_relpath(rows, d):
    real = os.path.realpath(d)
    return {os.path.relpath(r["path"], real): r for r in rows}


def lo_count():
    return query_value(conn, "SELECT count(*) FROM pg_largeobject_metadata")


def check_import(name, d, good, bad_uids, rows, patient):
    """The rows of an import and the catalog afterwards."""
    got = by_relpath(rows, d)
    is_(len(rows), len(good) + len(BAD), f"{name}: one row per file ({len(good) + len(BAD)})")
    is_deeply(set(got), set(good) | set(BAD), f"{name}: the rows name every file, once")
    bad_good = [f"{rel}: {got.get(rel)}" for rel in good
                if got.get(rel, {}).get("object_id") is None or got[rel]["error"] is not None]
    ok(not bad_good, f"{name}: the {len(good)} good files got ids", "\n".join(bad_good))
    is_(got.get("sub/deeper/copy_of_CT_0001.dcm", {}).get("object_id"),
        got.get("CT_0001.dcm", {}).get("object_id"),
        f"{name}: an identical copy of a file gets the same id")
    for rel, pattern in BAD.items():
        r = got.get(rel, {})
        ok(r.get("object_id") is None and r.get("error"),
           f"{name}: {rel} got an error, no id", f"    {r}")
        like(r.get("error"), pattern, f"{name}: {rel}: the error says why")
    objects = query(conn, "SELECT id, sop_instance_uid FROM mdd.objects WHERE patient_id = %s",
                    (patient,))
    is_deeply({u for _, u in objects}, set(good.values()),
              f"{name}: the catalog holds the good objects of {patient}, and only them")
    is_deeply({got[rel]["object_id"] for rel in good if rel in got}, {i for i, _ in objects},
              f"{name}: with the ids the import returned")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = ANY(%s)",
                    (sorted(bad_uids),)), 0,
        f"{name}: no object for the truncated, unreadable, linked or UID-less slices")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE patient_id = %s",
                    (patient + "X",)), 0,
        f"{name}: no object for the slice claiming another patient's study")
    is_(query_value(conn, "SELECT count(*) FROM mdd.patient WHERE patient_id = %s",
                    (patient + "X",)), 0,
        f"{name}: and no patient row for the Patient ID it claims")
    audit = query(conn, "SELECT detail FROM mdd.audit_log WHERE action = 'import' "
                        "AND detail LIKE %s ORDER BY at DESC LIMIT 1",
                  (os.path.realpath(d) + ":%",))
    like(audit[0][0] if audit else None,
         rf": {len(good) + len(BAD)} files, {len(good)} stored, {len(BAD)} failed$",
         f"{name}: the audit log counts the files, stored and failed")
    return got


# ---------------------------------------------------------------------------
# A: into the default large-object storage, with progress notices

d_a, good_a, bad_uids_a = build("a", "TAP40A", 40)
new_a = len(set(good_a.values()) - {r[0] for r in query(
    conn, "SELECT sop_instance_uid FROM mdd.objects WHERE patient_id = 'TAP40A'")})
los_before = lo_count()
execute(conn, "SET mdd.import_progress_every = 2")
del conn.notices[:]
rows_a = query_dicts(conn, "SELECT * FROM mdd.import(%s)", (d_a,))
notices = [n for n in conn.notices if "mdd.import" in n]
execute(conn, "RESET mdd.import_progress_every")
got_a = check_import("A", d_a, good_a, bad_uids_a, rows_a, "TAP40A")
is_(lo_count() - los_before, new_a,
    f"A: exactly {new_a} large objects were added, one per good object")
is_(len(notices), len(rows_a) // 2, f"A: one progress NOTICE per 2 files ({len(rows_a) // 2})",)
like(notices[-1] if notices else None,
     r"NOTICE:\s+mdd\.import: \d+ files done \(\d+ stored, \d+ failed\)",
     "A: the notice says how many files are done, stored and failed")
like(notices[-1] if notices else None, rf"{len(rows_a) // 2 * 2} files done",
     "A: the last notice counts the files done so far")

# the same bad files one by one through mdd.store_file: the documented SQLSTATEs
SQLSTATES = {
    "ct_half.dcm": "22P03", "garbage.bin": "22P03", "MR_truncated.dcm": "22P03",
    "empty.dcm": "22023", "no_sop_uid.dcm": "22004", "other_patient.dcm": "23000",
    "z_same_uid_other_bytes.dcm": "23505", "link_outside.dcm": "42501",
    "unreadable.dcm": "42501",
}
los_before = lo_count()
for rel, state in sorted(SQLSTATES.items()):
    raises(conn, "SELECT mdd.store_file(%s)", (os.path.join(d_a, rel),), (state,),
           f"mdd.store_file({rel}) fails with SQLSTATE {state}")
raises(conn, "SELECT mdd.import(%s)", (os.path.join(d_a, "CT_0001.dcm"),), ("42809",),
       "mdd.import of a file, not a directory, fails with 42809")
raises(conn, "SELECT mdd.store_file(%s)", (os.path.join(d_a, "sub"),), ("42809",),
       "mdd.store_file of a directory fails with 42809")
raises(conn, "SELECT mdd.store_file(%s)", (os.path.join(d_a, "no_such.dcm"),), ("58P01",),
       "mdd.store_file of a missing file fails with 58P01")
is_(lo_count(), los_before, "the failed calls left no large object behind")

# ---------------------------------------------------------------------------
# B: into a file storage

exists = query_one(conn, "SELECT options FROM mdd.storages WHERE name = %s", (FILE_STORAGE,))
if exists is None:
    root = make_server_dir(os.path.join(allowed, FILE_STORAGE))
    execute(conn, "SELECT mdd.add_storage(%s, 'file', 'online', %s)",
            (FILE_STORAGE, '{"root": "%s"}' % root))
else:
    root = exists["options"]["root"]
def storage_files():
    found = []
    for dirpath, dirs, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files]
    return sorted(found)


d_b, good_b, bad_uids_b = build("b", "TAP40B", 41)
new_b = len(set(good_b.values()) - {r[0] for r in query(
    conn, "SELECT sop_instance_uid FROM mdd.objects WHERE patient_id = 'TAP40B'")})
los_before = lo_count()
blobs_before = storage_files()
execute(conn, "SET mdd.default_storage = %s", (FILE_STORAGE,))
rows_b = query_dicts(conn, "SELECT * FROM mdd.import(%s)", (d_b,))
execute(conn, "RESET mdd.default_storage")
check_import("B", d_b, good_b, bad_uids_b, rows_b, "TAP40B")
blobs_after = storage_files()
is_(len(blobs_after) - len(blobs_before), new_b,
    f"B: the import added one blob per good object ({new_b})")
is_deeply([f for f in blobs_after if ".tmp." in os.path.basename(f)], [],
          "B: and left no temporary file")
is_(query_value(conn, "SELECT objects FROM mdd.storages WHERE name = %s", (FILE_STORAGE,)),
    len(blobs_after), "B: the storage root holds as many blobs as mdd.storages counts objects")
is_(lo_count(), los_before, "B: no large object was added")
where = query(conn, "SELECT DISTINCT storage FROM mdd.objects WHERE patient_id = 'TAP40B'")
is_deeply(where, [(FILE_STORAGE,)], f"B: the objects are in {FILE_STORAGE}")


# an import into the file storage that is rolled back leaves no blob; nor
# does a store_file undone by ROLLBACK TO SAVEPOINT
# (a fresh patient each run, should the cluster be kept between runs)
patient_r = "TAP40R%d" % query_value(
    conn, "SELECT count(DISTINCT patient_id) FROM mdd.objects WHERE patient_id LIKE 'TAP40R%%'")
d_r, good_r, _ = build("r", patient_r, 43)
before = storage_files()
tx = connect(autocommit=False)
execute(tx, "SET mdd.superuser_any_path = off")
execute(tx, "SET mdd.default_storage = %s", (FILE_STORAGE,))
rows_r = query_dicts(tx, "SELECT * FROM mdd.import(%s)", (d_r,))
during = storage_files()
is_(len(during) - len(before), len(set(good_r.values())),
    f"R: inside the transaction the import wrote {len(set(good_r.values()))} blobs")
tx.rollback()
is_deeply(storage_files(), before, "R: ROLLBACK removes them all")
execute(tx, "SET mdd.default_storage = %s", (FILE_STORAGE,))
execute(tx, "SAVEPOINT s")
query(tx, "SELECT mdd.store_file(%s)", (os.path.join(d_r, "CT_0001.dcm"),))
query(tx, "SELECT * FROM mdd.import(%s)", (os.path.join(d_r, "sub"),))
execute(tx, "ROLLBACK TO SAVEPOINT s")
kept = query_value(tx, "SELECT mdd.store_file(%s)", (os.path.join(d_r, "CT_0002.dcm"),))
tx.commit()
after = storage_files()
is_(len(after) - len(before), 1, "R: after ROLLBACK TO SAVEPOINT and COMMIT only the blob "
                                  "stored after the savepoint's rollback is left")
is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE patient_id = %s", (patient_r,)), 1,
    "R: and the catalog holds that one object")
ok(query_value(conn, "SELECT mdd.read(%s, true) IS NOT NULL", (kept,)), "R: which reads back")
tx.close()

# ---------------------------------------------------------------------------
# a non-superuser operator

execute(conn, f"""DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN
        CREATE ROLE {ROLE} LOGIN IN ROLE mdd_operator;
    END IF; END $$""")
op = connect(user=ROLE)
is_(query_value(op, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"), False,
    f"connected as {ROLE}, not a superuser")

raises(op, "SELECT * FROM mdd.import(%s)", (outside,), ("42501",),
       f"{ROLE}: mdd.import of {outside} is refused", r"outside the allowed directories")
raises(op, "SELECT * FROM mdd.import(%s)", (os.path.join(allowed, "..", "outside"),), ("42501",),
       f"{ROLE}: mdd.import of allowed/../outside is refused")
raises(op, "SELECT mdd.store_file(%s)", (os.path.join(d_a, "link_outside.dcm"),), ("42501",),
       f"{ROLE}: mdd.store_file of the symbolic link leading outside is refused",
       r"outside the allowed directories")
raises(op, "SELECT mdd.store_file(%s)", (os.path.join(outside, "t40-a-CT_0007.dcm"),), ("42501",),
       f"{ROLE}: mdd.store_file of the file outside itself is refused")

d_c, good_c, bad_uids_c = build("c", "TAP40C", 42)
new_c = len(set(good_c.values()) - {r[0] for r in query(
    conn, "SELECT sop_instance_uid FROM mdd.objects WHERE patient_id = 'TAP40C'")})
los_before = lo_count()
rows_c = query_dicts(op, "SELECT * FROM mdd.import(%s)", (d_c,))
got_c = check_import(f"{ROLE}", d_c, good_c, bad_uids_c, rows_c, "TAP40C")
like(got_c.get("link_outside.dcm", {}).get("error"), r"outside the allowed directories",
     f"{ROLE}: the link leading outside is refused inside the import too")
is_(lo_count() - los_before, new_c, f"{ROLE}: one large object per new good object ({new_c})")
stores = query_value(conn, """SELECT count(*) FROM mdd.audit_log
                              WHERE role = %s AND action = 'store' AND patient_id = 'TAP40C'""",
                     (ROLE,))
is_(stores, len(set(good_c.values())),
    f"{ROLE}: the audit log has its {len(set(good_c.values()))} stores under its name")
raises(op, "SELECT mdd.add_storage('tap40op', 'file', 'online', %s)",
       ('{"root": "%s"}' % allowed,), ("42501",), f"{ROLE}: may not add a storage")
op.close()

# ---------------------------------------------------------------------------
# a named pipe: opening one for reading waits for a writer, which must not
# hang the server (nothing would interrupt it: not statement_timeout, not a
# cancel).  Each call runs on its own connection under a watchdog that, after
# a few seconds, opens the pipe for writing to set the server free.


def fifo_call(sql, params, fifo, seconds=3):
    """Run sql on a fresh connection; returns (hung, rows or error)."""
    result = {}

    def run():
        c = connect()
        try:
            execute(c, "SET mdd.superuser_any_path = off")
            result["rows"] = query_dicts(c, sql, params)
        except DBError as e:
            result["error"] = e
        finally:
            c.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    hung = t.is_alive()
    deadline = time.monotonic() + 30
    while t.is_alive() and time.monotonic() < deadline:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        t.join(0.2)
    return hung, result.get("error", result.get("rows"))


d_f = make_server_dir(os.path.join(allowed, "t40-fifo"), mode=0o755)
fifo = os.path.join(d_f, "pipe.dcm")
os.mkfifo(fifo)
os.chmod(fifo, 0o666)
os.symlink(fifo, os.path.join(d_f, "link_to_pipe.dcm"))
shutil.copyfile(os.path.join(d_a, "CT_0001.dcm"), os.path.join(d_f, "CT_0001.dcm"))
readable(os.path.join(d_f, "CT_0001.dcm"))

hung, e = fifo_call("SELECT mdd.store_file(%s)", (fifo,), fifo)
ok(not hung, "mdd.store_file of a named pipe returns at once (does not wait for a writer)")
ok(isinstance(e, DBError) and e.pgcode == "42809", "and fails with 42809 (not a regular file)",
   f"    got: {describe_error(e) if isinstance(e, DBError) else e}")
hung, rows = fifo_call("SELECT * FROM mdd.import(%s)", (d_f,), fifo)
ok(not hung, "mdd.import of a directory with a link to a named pipe returns at once")
got = by_relpath(rows, d_f) if isinstance(rows, list) else {}
ok(got.get("link_to_pipe.dcm", {}).get("error") and
   got["link_to_pipe.dcm"]["object_id"] is None,
   "the link to the pipe gets an error row", f"    {rows}")
ok(got.get("CT_0001.dcm", {}).get("object_id") is not None,
   "the good file beside it is imported", f"    {rows}")

# the unreadable files stay as they were made (mode 000); the outside
# directory is left with the link targets, which nothing imported
conn.close()
done_testing()
