#!/usr/bin/python3
# mdd gives back exactly the bytes it was given, from a file storage and
# from the default large-object storage: mdd.read, mdd.read(id, true) and
# mdd.export against the SHA-256 of the original files.  The file storage
# holds one blob per object and no temporary files.  Blobs damaged behind
# mdd's back (a flipped byte, a truncation) are reported as corrupt
# (SQLSTATE XX001) naming the object; the damage is repaired at the end.
import glob
import json
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

STORAGE = "tap30files"
FILE_PATIENT, FILE_SEED = "TAP30F", 30
LO_PATIENT, LO_SEED = "TAP30L", 31
SLICES = 20

test_dir = env("MDD_TEST_DIR")
allowed = os.path.join(test_dir, "allowed")
conn = connect()

# ---------------------------------------------------------------------------
# the file storage

existing = query_one(conn, "SELECT options FROM mdd.storages WHERE name = %s", (STORAGE,))
if existing is None:
    root = make_server_dir(os.path.join(allowed, STORAGE))
    e = sql_error(conn, "SELECT mdd.add_storage(%s, 'file', 'online', %s)",
                  (STORAGE, json.dumps({"root": root})))
    ok(e is None, f"mdd.add_storage creates file storage {STORAGE}", describe_error(e))
else:
    # a rerun on a kept cluster: the storage and its objects are there already
    root = existing["options"]["root"]
    note(f"storage {STORAGE} exists already (root {root})")
    ok(os.path.isdir(root), f"file storage {STORAGE} exists")
storage = query_one(conn, "SELECT kind, tier, options FROM mdd.storages WHERE name = %s", (STORAGE,))
is_((storage or {}).get("kind"), "file", "mdd.storages lists it as a file storage")
is_(os.path.realpath((storage or {}).get("options", {}).get("root", "")), os.path.realpath(root),
    "with its root")


def import_patient(patient, seed, storage_name):
    src = os.path.join(allowed, f"p30-{patient.lower()}")
    make_server_dir(src, mode=0o755)
    generate_patient(src, patient, seed, slices=SLICES)
    if storage_name:
        execute(conn, "SET mdd.default_storage = %s", (storage_name,))
    else:
        execute(conn, "RESET mdd.default_storage")
    rows = query_dicts(conn, "SELECT * FROM mdd.import(%s)", (src,))
    with open(os.path.join(src, "document.pdf"), "rb") as fh:
        doc = query_value(conn, "SELECT mdd.store_document(%s, %s, 'document.pdf')",
                          (patient, fh.read()))
    execute(conn, "RESET mdd.default_storage")
    originals = {r["object_id"]: r["path"] for r in rows if r["object_id"] is not None}
    originals[doc] = os.path.join(os.path.realpath(src), "document.pdf")
    errors = [r for r in rows if r["error"] is not None]
    is_(sorted(os.path.basename(r["path"]) for r in errors), ["document.pdf", "manifest.json"],
        f"{patient}: every DICOM file imported")
    return originals


file_objects = import_patient(FILE_PATIENT, FILE_SEED, STORAGE)
lo_objects = import_patient(LO_PATIENT, LO_SEED, None)
is_(len(file_objects), SLICES + 40 + 3 + 1, f"{FILE_PATIENT}: {len(file_objects)} objects")
is_(len(lo_objects), SLICES + 40 + 3 + 1, f"{LO_PATIENT}: {len(lo_objects)} objects")

for patient, objs, where in ((FILE_PATIENT, file_objects, STORAGE),
                             (LO_PATIENT, lo_objects, "online")):
    rows = query(conn, "SELECT id, storage, tier FROM mdd.objects WHERE patient_id = %s",
                 (patient,))
    is_deeply(sorted(r[0] for r in rows), sorted(objs),
              f"{patient}: mdd.objects holds exactly the imported objects")
    wrong = [r for r in rows if r[1] != where or r[2] != "online"]
    ok(not wrong, f"{patient}: every object is in storage {where}, tier online",
       f"    {wrong[:5]}")

# ---------------------------------------------------------------------------
# read, read with verify, export: the original bytes

export_dir = make_server_dir(os.path.join(allowed, "tap30-export"))
for patient, objs in ((FILE_PATIENT, file_objects), (LO_PATIENT, lo_objects)):
    read_bad, verify_bad, export_bad, catalog_bad = [], [], [], []
    for oid, path in sorted(objs.items()):
        name = os.path.relpath(path, os.path.dirname(os.path.dirname(path)))
        want = sha256_file(path)
        size = os.path.getsize(path)
        row = query_one(conn, "SELECT size, sha256 FROM mdd.objects WHERE id = %s", (oid,))
        if row != {"size": size, "sha256": want}:
            catalog_bad.append(f"{oid} {name}: catalog {row}, file {size} bytes {want}")
        data = query_value(conn, "SELECT mdd.read(%s)", (oid,))
        if data is None or sha256_bytes(bytes(data)) != want:
            read_bad.append(f"{oid} {name}")
        e = sql_error(conn, "SELECT mdd.read(%s, true)", (oid,))
        if e is not None:
            verify_bad.append(f"{oid} {name}: {describe_error(e)}")
        else:
            data = query_value(conn, "SELECT mdd.read(%s, true)", (oid,))
            if sha256_bytes(bytes(data)) != want:
                verify_bad.append(f"{oid} {name}: other bytes")
        target = os.path.join(export_dir, f"{oid}.bin")
        try:
            written = query_value(conn, "SELECT mdd.export(%s, %s)", (oid, target))
            if written != size or not os.path.isfile(target) or sha256_file(target) != want:
                export_bad.append(f"{oid} {name}: wrote {written}, file "
                                  f"{os.path.exists(target) and sha256_file(target)}")
        except DBError as e:
            export_bad.append(f"{oid} {name}: {describe_error(e)}")
    n = len(objs)
    ok(not catalog_bad, f"{patient}: size and sha256 of all {n} objects match the files",
       "\n".join(catalog_bad[:10]))
    ok(not read_bad, f"{patient}: mdd.read gives the original bytes of all {n} objects",
       "\n".join(read_bad[:10]))
    ok(not verify_bad, f"{patient}: mdd.read(id, true) verifies and gives them too",
       "\n".join(verify_bad[:10]))
    ok(not export_bad, f"{patient}: mdd.export writes byte-identical files",
       "\n".join(export_bad[:10]))

some = min(file_objects)
raises(conn, "SELECT mdd.export(%s, %s)", (some, os.path.join(export_dir, f"{some}.bin")),
       ("58P02",), "mdd.export refuses to overwrite an existing file")
like(query_value(conn, "SELECT detail FROM mdd.audit_log WHERE action = 'export' "
                       "AND object_id = %s ORDER BY at DESC LIMIT 1", (some,)),
     rf"{some}\.bin$", "the export is in the audit log with its path")
ok(not glob.glob(os.path.join(export_dir, "*.tmp.*")), "no temporary files left in the export directory")

# ---------------------------------------------------------------------------
# the blobs of the file storage

blobs = []
temporary = []
for dirpath, dirs, files in os.walk(root):
    for f in files:
        (temporary if ".tmp." in f else blobs).append(os.path.join(dirpath, f))
in_storage = query_value(conn, "SELECT objects FROM mdd.storages WHERE name = %s", (STORAGE,))
is_(in_storage, len(file_objects), f"mdd.storages counts {len(file_objects)} objects in {STORAGE}")
is_(len(blobs), in_storage, "the storage root holds exactly one blob per object")
is_deeply(temporary, [], "and no temporary files")

locators = dict(query(conn, """SELECT c.object, c.locator FROM mdd.copy c
                               JOIN mdd.storage s ON s.id = c.storage
                               WHERE s.name = %s""", (STORAGE,)))
is_deeply({os.path.realpath(os.path.join(root, l)) for l in locators.values()},
          {os.path.realpath(b) for b in blobs}, "the blobs are the files the copies name")

blob_sums = {}
for oid, loc in locators.items():
    blob_sums[oid] = sha256_file(os.path.join(root, loc))
is_deeply({oid: s for oid, s in blob_sums.items() if oid in file_objects},
          {oid: sha256_file(p) for oid, p in file_objects.items()},
          "each blob holds the bytes of its object's original file")

# ---------------------------------------------------------------------------
# damage behind mdd's back


def blob_of(oid):
    return os.path.join(root, locators[oid])


victims = sorted(o for o in file_objects if file_objects[o].endswith(".dcm"))
flipped, truncated = victims[len(victims) // 2], victims[len(victims) // 2 + 1]
saved = {}
try:
    # a flipped byte: same size, other content
    with open(blob_of(flipped), "r+b") as fh:
        saved[flipped] = fh.read()
        pos = len(saved[flipped]) // 2
        fh.seek(pos)
        fh.write(bytes([saved[flipped][pos] ^ 0x01]))
    ok(os.path.getsize(blob_of(flipped)) == len(saved[flipped]), "a byte of one blob is flipped")
    e = raises(conn, "SELECT mdd.read(%s, true)", (flipped,), ("XX001",),
               "mdd.read(id, true) of the damaged object fails with XX001")
    like(e and e.diag.message_primary, rf"\b{flipped}\b", "the error names the object")
    target = os.path.join(export_dir, f"corrupt-{flipped}.bin")
    raises(conn, "SELECT mdd.export(%s, %s, verify => true)", (flipped, target), ("XX001",),
           "mdd.export(..., verify => true) of it fails with XX001")
    ok(not os.path.exists(target), "and writes no file")

    # a truncated blob
    with open(blob_of(truncated), "r+b") as fh:
        saved[truncated] = fh.read()
        fh.truncate(len(saved[truncated]) // 2)
    e = raises(conn, "SELECT mdd.read(%s)", (truncated,), ("XX001",),
               "mdd.read(id) of a truncated blob fails with XX001, even without verify")
    like(e and e.diag.message_primary, rf"\b{truncated}\b", "the error names the object")
    raises(conn, "SELECT mdd.export(%s, %s)", (truncated, os.path.join(export_dir, "trunc.bin")),
           ("XX001",), "mdd.export of it fails with XX001")

    # a large object changed behind mdd's back
    lo_victim = sorted(o for o in lo_objects if lo_objects[o].endswith(".dcm"))[0]
    lo_oid = int(query_value(conn, """SELECT c.locator FROM mdd.copy c
                                      JOIN mdd.storage s ON s.id = c.storage
                                      WHERE c.object = %s AND s.name = 'online'""", (lo_victim,)))
    original_byte = bytes(query_value(conn, "SELECT lo_get(%s::oid, 1000, 1)", (lo_oid,)))
    execute(conn, "SELECT lo_put(%s::oid, 1000, %s)", (lo_oid, bytes([original_byte[0] ^ 0xFF])))
    saved["lo"] = (lo_oid, original_byte)
    e = raises(conn, "SELECT mdd.read(%s, true)", (lo_victim,), ("XX001",),
               "a large object changed behind mdd's back: mdd.read(id, true) fails with XX001")
    like(e and e.diag.message_primary, rf"\b{lo_victim}\b", "the error names the object")
finally:
    # repair, so that the archive is whole again for whatever runs next
    for key, value in saved.items():
        if key == "lo":
            execute(conn, "SELECT lo_put(%s::oid, 1000, %s)", (value[0], value[1]))
        else:
            with open(blob_of(key), "wb") as fh:
                fh.write(value)

repaired = [o for o in (flipped, truncated, lo_victim)
            if sql_error(conn, "SELECT mdd.read(%s, true)", (o,)) is not None]
is_deeply(repaired, [], "after the repair the three objects verify again")

conn.close()
done_testing()
