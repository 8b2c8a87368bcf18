#!/usr/bin/python3
# docs/emr.md, run as written: every ```sql block of the page, in order,
# through psql, on a cluster of the test's own with the demo EMR
# (scripts/emr_demo.sql), two generated patients and one archive-tier file
# storage; then what the blocks did is checked: the EMR procedure archived
# the finished course with what travels with it and returned the job, the
# other restored the patient, the reports answer what the catalog holds,
# and the rule of the page selects what it says.
import os
import re
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
port = int(env("PGPORT")) + 91
datadir = os.path.join(test_dir, "emr91")
vault = make_server_dir(os.path.join(test_dir, "allowed", "vault91"))
PATIENTS = {"EMR-0001": 911, "EMR-0002": 912}

with open(os.path.join(top, "docs", "emr.md"), encoding="utf-8") as fh:
    blocks = re.findall(r"```sql\n(.*?)```", fh.read(), re.S)
ok(len(blocks) == 9, f"docs/emr.md has {len(blocks)} SQL examples")


def psql(sql):
    """Run SQL as a user pastes it into psql: statement by statement."""
    return subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                           "-v", "ON_ERROR_STOP=1", "-f", "-"], input=sql, capture_output=True,
                          text=True, timeout=300)


for pid, seed in PATIENTS.items():
    generate_patient(os.path.join(test_dir, "allowed", f"p91-{pid}"), pid, seed, slices=5)
cluster("start", datadir, str(port), "mdd.dicom_port = 0", "mdd.job_workers = 2",
        f"mdd.allowed_paths = '{test_dir}/allowed'")
conn = None
try:
    conn = connect_when_up(port)
    execute(conn, "CREATE EXTENSION mdd")
    with open(os.path.join(top, "scripts", "emr_demo.sql"), encoding="utf-8") as fh:
        execute(conn, fh.read())
    for pid in PATIENTS:
        execute(conn, "SELECT count(*) FROM mdd.import(%s)", (os.path.join(test_dir, "allowed", f"p91-{pid}"),))
    execute(conn, "SELECT mdd.add_storage('vault91', 'file', 'archive', %s)", (f'{{"root": "{vault}"}}',))
    count = dict(query(conn, "SELECT patient_id, count(*) FROM mdd.objects GROUP BY 1"))

    outputs = []
    for i, block in enumerate(blocks, 1):
        r = psql(block)
        outputs.append(r.stdout)
        first = block.strip().splitlines()[0]
        ok(r.returncode == 0, f"example {i} runs: {first[:60]}", r.stderr)

    # what the examples did
    courses = query(conn, """SELECT p.mrn, c.start_date, c.end_date FROM emr.course c
                             JOIN emr.patient p ON p.id = c.patient ORDER BY 1""")
    is_([c[0] for c in courses], list(PATIENTS), "one course per patient")
    archive_jobs = query_dicts(conn, "SELECT * FROM mdd.jobs WHERE kind = 'archive' AND rule IS NULL ORDER BY id")
    is_(len(archive_jobs), 1, "archive_course queued one archive job")
    course_objects = query_value(conn, """SELECT count(*) FROM emr.course_objects(
                                              (SELECT c.id FROM emr.course c JOIN emr.patient p ON p.id = c.patient
                                               WHERE p.mrn = 'EMR-0001'))""")
    j = archive_jobs[0]
    is_((j["state"], j["done"], j["created_by"]), ("done", count["EMR-0001"], "emr_app"),
        "it archived every DICOM object of the course (planning CT, RT objects, CBCT), as emr_app")
    ok(re.search(rf"^\s*job\s*\n-+\n\s*{j['id']}\s*$", outputs[2], re.M),
       "the CALL returned the job's id", outputs[2])
    is_(course_objects, count["EMR-0001"], "the course's objects are the patient's studies around it")
    restore_jobs = query_dicts(conn, "SELECT * FROM mdd.jobs WHERE kind = 'restore' ORDER BY id")
    is_([(r["state"], r["done"]) for r in restore_jobs], [("done", count["EMR-0001"])],
        "restore_patient brought the patient back online")
    is_(dict(query(conn, "SELECT tier, count(*) FROM mdd.objects GROUP BY 1")), {"online": sum(count.values())},
        "everything is online again")
    like(outputs[3], r"EMR-0001 \| archive", "example 4 showed the course archived")
    like(outputs[5], r"\b2024 \| CT\s+\| online", "the storage report counts per year and modality")
    like(outputs[7], r"EMR-0001 \| First\^Patient.*\n.*EMR-0002 \| Second\^Patient",
         "the report of patients treated and still online lists both")
    cbct = query_value(conn, "SELECT count(*) FROM mdd.objects WHERE image_type LIKE '%%CBCT%%'")
    like(outputs[8], rf"(?m)^\s*{cbct}\s*$", f"the rule of the page selects the {cbct} CBCT images")

    is_(query_value(conn, "CALL emr.restore_patient('EMR-0002')"), None,
        "restore_patient of a patient with nothing archived returns no job")

    # the monthly report, with a run of the rule finished last month
    run = query_value(conn, "SELECT mdd.run_rule('cbct-after-treatment', ignore_window => true)")
    is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (run,)), "done", "a run of the rule")
    execute(conn, "UPDATE mdd.job SET finished_at = date_trunc('month', now()) - interval '3 days' WHERE id = %s",
            (run,))
    r = psql(blocks[6])
    like(r.stdout, rf"cbct-after-treatment \|\s+1 \|\s+{cbct} \|\s+0 \|",
         "the report of last month shows the rule's run and what it archived")

    e = sql_error(conn, "CALL emr.archive_course(9999)")
    is_(e.pgcode if e else None, "42704", "archive_course of an unknown course: 42704")
    execute(conn, "INSERT INTO emr.course (patient, name, start_date) SELECT id, 'C2', current_date FROM emr.patient "
                  "WHERE mrn = 'EMR-0002'")
    e = sql_error(conn, "CALL emr.archive_course(%s)", (query_value(conn, "SELECT max(id) FROM emr.course"),))
    is_(e.pgcode if e else None, "55000", "archive_course of an open course: 55000")
    e = sql_error(conn, "CALL emr.restore_patient('nobody')")
    is_(e.pgcode if e else None, "42704", "restore_patient of an unknown patient: 42704")
finally:
    if conn is not None:
        conn.close()
    cluster("stop", datadir)

done_testing()
