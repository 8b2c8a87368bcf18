#!/usr/bin/python3
# The counts kept ready in the catalog for queries (series and study object
# counts, series count and modalities of a study) equal what the catalog
# holds after imports, single stores, rolled-back stores and a bulk import
# with failing files; concurrent sessions storing into one study do not
# lose counts.
import os
import sys
import threading

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

PATIENT = "TAP25"
test_dir = env("MDD_TEST_DIR")
out = os.path.join(test_dir, "allowed", "p25")
make_server_dir(out, mode=0o755)
manifest = generate_patient(out, PATIENT, 25, slices=12, small=30)

conn = connect()

COUNTS_MATCH = """
SELECT
  (SELECT count(*) FROM mdd.series se JOIN mdd.study st ON st.id = se.study
     JOIN mdd.patient p ON p.id = st.patient
   WHERE p.patient_id = %(p)s
     AND se.object_count <> (SELECT count(*) FROM mdd.object o WHERE o.series = se.id)),
  (SELECT count(*) FROM mdd.study st JOIN mdd.patient p ON p.id = st.patient
   WHERE p.patient_id = %(p)s
     AND (st.object_count <> (SELECT count(*) FROM mdd.object o
                              WHERE o.study = st.id AND o.kind = 'dicom')
          OR st.series_count <> (SELECT count(*) FROM mdd.series se WHERE se.study = st.id)
          OR NOT (SELECT coalesce(array_agg(DISTINCT se.modality), '{}') @> st.modalities
                         AND coalesce(array_agg(DISTINCT se.modality), '{}') <@ st.modalities
                  FROM mdd.series se WHERE se.study = st.id)))
"""


def counts_ok(desc):
    bad_series, bad_studies = query(conn, COUNTS_MATCH, {"p": PATIENT})[0]
    ok(bad_series == 0 and bad_studies == 0, desc,
       f"    series with a wrong count: {bad_series}, studies: {bad_studies}")


def total():
    return query_value(conn, """SELECT sum(st.object_count) FROM mdd.study st
                                JOIN mdd.patient p ON p.id = st.patient
                                WHERE p.patient_id = %s""", (PATIENT,))


# a bulk import (one transaction, one subtransaction per file, two failing)
rows = query_dicts(conn, "SELECT * FROM mdd.import(%s)", (out,))
stored = len({r["object_id"] for r in rows if r["object_id"] is not None})
is_(stored, len([f for f in manifest["files"] if f["kind"] == "dicom"]), "the import stored every DICOM file")
counts_ok("after the import, every series and study count equals its objects")
is_(total(), stored, "the study counts add up to the objects stored")

# the same files again: same ids, counts unchanged
query_dicts(conn, "SELECT * FROM mdd.import(%s)", (out,))
is_(total(), stored, "importing the same files again changes no count")

# a store rolled back counts nothing; inside a savepoint likewise, while the
# store after it counts (a patient of its own, new at every run)
RUN = os.getpid()
out3 = os.path.join(test_dir, "allowed", "p25c")
make_server_dir(out3, mode=0o755)
m3 = generate_patient(out3, f"TAP25C{RUN}", RUN, slices=3)
ct = sorted(os.path.join(os.path.realpath(out3), f["path"]) for f in m3["files"]
            if f["path"].startswith("ct/"))
tx = connect(autocommit=False)
before = query_value(conn, "SELECT coalesce(sum(object_count), 0) FROM mdd.study")
query_value(tx, "SELECT mdd.store_file(%s)", (ct[0],))
tx.rollback()
is_(query_value(conn, "SELECT coalesce(sum(object_count), 0) FROM mdd.study"), before,
    "a rolled-back store leaves every count as it was")

execute(tx, "SAVEPOINT a")
query_value(tx, "SELECT mdd.store_file(%s)", (ct[1],))
execute(tx, "ROLLBACK TO SAVEPOINT a")
query_value(tx, "SELECT mdd.store_file(%s)", (ct[2],))
tx.commit()
is_(query_value(conn, "SELECT coalesce(sum(object_count), 0) FROM mdd.study"), before + 1,
    "only the store that committed is counted")
is_(query(conn, """SELECT se.object_count FROM mdd.series se
                   WHERE se.series_instance_uid = %s""", (m3["files"][0]["series_instance_uid"],)),
    [(1,)], "its series counts exactly that one object")

# concurrent sessions storing into the same study: no lost count
small = sorted(os.path.join(os.path.realpath(out), f["path"]) for f in manifest["files"]
               if f["path"].startswith("small/"))
out2 = os.path.join(test_dir, "allowed", "p25b")
make_server_dir(out2, mode=0o755)
manifest2 = generate_patient(out2, PATIENT + "B", 26, slices=4, small=40)
files2 = sorted(os.path.join(os.path.realpath(out2), f["path"]) for f in manifest2["files"]
                if f["kind"] == "dicom")
errors = []


def worker(part):
    c = connect()
    try:
        for f in part:
            query_value(c, "SELECT mdd.store_file(%s)", (f,))
    except Exception as e:  # noqa: BLE001
        errors.append(str(e))
    finally:
        c.close()


threads = [threading.Thread(target=worker, args=(files2[i::4],)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
is_(errors, [], "four sessions stored their share without error")
PATIENT = PATIENT + "B"
counts_ok("after four concurrent sessions, every count equals its objects")
is_(total(), len(files2), f"the counts add up to the {len(files2)} objects stored")

done_testing()
