#!/usr/bin/python3
# A synthetic radiotherapy patient (scripts/generate_patient.py) through
# mdd.import: one row per file, the catalog rows, the reference graph and
# mdd.related against the generator's manifest.json, and the patient's PDF
# through mdd.store_document.
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

PATIENT = "TAP20"
SEED = 20
SLICES = 30

test_dir = env("MDD_TEST_DIR")
out = os.path.join(test_dir, "allowed", "p20")
make_server_dir(out, mode=0o755)
manifest = generate_patient(out, PATIENT, SEED, slices=SLICES)
real_out = os.path.realpath(out)

conn = connect()

# ---------------------------------------------------------------------------
# the import: one row per file

on_disk = set()
for root, dirs, files in os.walk(real_out):
    for f in files:
        on_disk.add(os.path.join(root, f))

rows = query_dicts(conn, "SELECT * FROM mdd.import(%s)", (out,))
by_path = {r["path"]: r for r in rows}
is_(len(rows), len(on_disk), f"mdd.import returns one row per file ({len(on_disk)})")
is_deeply(set(by_path), on_disk, "the rows name exactly the files of the directory")
is_(len(by_path), len(rows), "no file is listed twice")

dicom_files = [f for f in manifest["files"] if f["kind"] == "dicom"]
is_(len(dicom_files), SLICES + 40 + 3, "the manifest lists 30 CT, 40 CBCT, RTSTRUCT, RTPLAN, RTDOSE")

bad = []
for f in dicom_files:
    r = by_path.get(os.path.join(real_out, f["path"]))
    if r is None or r["object_id"] is None or r["error"] is not None:
        bad.append(f"{f['path']}: {r}")
ok(not bad, "every DICOM file got an object id and no error", "\n".join(bad[:10]))

for name in ("document.pdf", "manifest.json"):
    r = by_path.get(os.path.join(real_out, name), {})
    ok(r.get("object_id") is None and r.get("error"),
       f"{name}: no object id, an error instead", f"    row: {r}")
    like(r.get("error"), r"(?i)not a DICOM", f"{name}: the error says it is not DICOM")

ids = [r["object_id"] for r in rows if r["object_id"] is not None]
is_(len(set(ids)), len(dicom_files), "distinct object ids, one per DICOM file")

# ---------------------------------------------------------------------------
# the catalog rows

objects = query_dicts(conn, """
    SELECT id, kind, patient_id, study_instance_uid, series_instance_uid, sop_instance_uid,
           sop_class_uid, modality, size, filename, source, content_type, number_of_frames
    FROM mdd.objects WHERE patient_id = %s AND kind = 'dicom'""", (PATIENT,))
by_uid = {o["sop_instance_uid"]: o for o in objects}
is_(len(objects), len(dicom_files), f"mdd.objects holds {len(dicom_files)} DICOM objects of {PATIENT}")

mismatch = []
for f in dicom_files:
    o = by_uid.get(f["sop_instance_uid"])
    r = by_path.get(os.path.join(real_out, f["path"]), {})
    if o is None:
        mismatch.append(f"{f['path']}: no object with SOP Instance UID {f['sop_instance_uid']}")
        continue
    if o["id"] != r.get("object_id"):
        mismatch.append(f"{f['path']}: import said id {r.get('object_id')}, catalog has {o['id']}")
    for key in ("sop_class_uid", "series_instance_uid", "study_instance_uid", "modality", "size"):
        if o[key] != f[key]:
            mismatch.append(f"{f['path']}: {key} {o[key]!r}, manifest {f[key]!r}")
    if o["filename"] != os.path.basename(f["path"]):
        mismatch.append(f"{f['path']}: filename {o['filename']!r}")
    if o["content_type"] != "application/dicom":
        mismatch.append(f"{f['path']}: content_type {o['content_type']!r}")
ok(not mismatch, "each object's catalog row matches its manifest entry", "\n".join(mismatch[:20]))

modalities = {}
for o in objects:
    modalities[o["modality"]] = modalities.get(o["modality"], 0) + 1
is_deeply(modalities, {"CT": SLICES + 40, "RTSTRUCT": 1, "RTPLAN": 1, "RTDOSE": 1},
          "objects per modality")
is_(len({o["study_instance_uid"] for o in objects}), 2, "two studies (planning, treatment)")
is_(len({o["series_instance_uid"] for o in objects}), 5, "five series")
dose = [o for o in objects if o["modality"] == "RTDOSE"]
ok(dose and dose[0]["number_of_frames"] and dose[0]["number_of_frames"] > 1,
   "the RT Dose grid has its number of frames", f"    {dose}")

# ---------------------------------------------------------------------------
# the reference graph

refs = query(conn, """
    SELECT o.sop_instance_uid, r.kind, r.uid
    FROM mdd.reference r JOIN mdd.object o ON o.id = r.object
    JOIN mdd.patient p ON p.id = o.patient
    WHERE p.patient_id = %s""", (PATIENT,))
got_refs = set(refs)
want_refs = {(r["from"], r["kind"], r["uid"]) for r in manifest["references"]}
is_(len(refs), len(got_refs), "no reference recorded twice")
is_deeply(got_refs, want_refs, f"mdd.reference holds exactly the manifest's {len(want_refs)} references")

uid_to_id = {u: o["id"] for u, o in by_uid.items()}
for key, related in sorted(manifest["related"].items()):
    name = next((f["path"] for f in dicom_files if f["sop_instance_uid"] == key), key)
    if key not in uid_to_id:
        ok(False, f"mdd.related of {name}", "    not in the catalog")
        continue
    got = [r[0] for r in query(conn, "SELECT * FROM mdd.related(%s)", (uid_to_id[key],))]
    want = sorted(uid_to_id.get(u, u) for u in related)
    is_deeply(sorted(got), want, f"mdd.related({name}) = the manifest's {len(want)} objects")
    is_(len(got), len(set(got)), f"mdd.related({name}) lists each object once")

# ---------------------------------------------------------------------------
# the import again: same files, same ids

again = query_dicts(conn, "SELECT * FROM mdd.import(%s)", (out,))
is_deeply({r["path"]: r["object_id"] for r in again}, {r["path"]: r["object_id"] for r in rows},
          "a second import of the same files returns the same ids")
is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE patient_id = %s AND kind = 'dicom'",
                (PATIENT,)), len(dicom_files), "and adds no object")

audit = query(conn, """SELECT detail FROM mdd.audit_log
                       WHERE action = 'import' AND detail LIKE %s ORDER BY at""",
              (f"%{real_out}%",))
ok(len(audit) >= 2, "the imports are in the audit log", f"    {audit}")
if audit:
    like(audit[-1][0], rf"{len(on_disk)} files, {len(dicom_files)} stored, 2 failed",
         "the audit detail counts files, stored and failed")

# ---------------------------------------------------------------------------
# the PDF as a document

with open(os.path.join(out, "document.pdf"), "rb") as fh:
    pdf = fh.read()
doc = query_value(conn, "SELECT mdd.store_document(%s, %s, 'document.pdf')",
                  (PATIENT, pdf))
ok(doc is not None, f"mdd.store_document stores document.pdf for {PATIENT}")
row = query_one(conn, """SELECT kind, patient_id, content_type, filename, size, sha256,
                                sop_instance_uid, study_instance_uid
                         FROM mdd.objects WHERE id = %s""", (doc,))
is_(row["content_type"], "application/pdf", "its content type is application/pdf")
is_deeply(row, {"kind": "document", "patient_id": PATIENT, "content_type": "application/pdf",
                "filename": "document.pdf", "size": len(pdf), "sha256": sha256_bytes(pdf),
                "sop_instance_uid": None, "study_instance_uid": None},
          "its catalog row")
is_(bytes(query_value(conn, "SELECT mdd.read(%s)", (doc,))), pdf, "mdd.read gives the PDF back")
is_(query_value(conn, "SELECT mdd.store_document(%s, %s, 'document.pdf')", (PATIENT, pdf)), doc,
    "storing the same document again returns the same id")
ok(doc not in [r[0] for r in query(conn, "SELECT * FROM mdd.related(%s)",
                                   (uid_to_id[manifest["files"][0]["sop_instance_uid"]],))],
   "a document without references is not related to the CT")

conn.close()
done_testing()
