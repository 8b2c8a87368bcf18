#!/usr/bin/python3
# `make demo`, the guided tour (scripts/demo.sh), run on ports of the test's
# own with a small patient into the test directory: it ends well, prints
# every step with its explanation, and what each step shows is right: the
# objects stored by C-STORE, the CBCTs archived by the rule, the patient
# list with the PACS's prior study, the restore, the find across the
# archive and the PACS, the send received by the planning system; the peers
# it started are stopped at its end.
import os
import re
import socket
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
PORT = int(env("PGPORT")) + 122
demo = os.path.join(test_dir, "demo98")


def listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


environ = dict(os.environ, MDD_DEMO_DIR=demo, MDD_DEMO_PORT=str(PORT), MDD_DEMO_SLICES="10",
               MDD_DEMO_NO_BUILD="1")
try:
    p = subprocess.run([os.path.join(top, "scripts", "demo.sh")], cwd=top, env=environ,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    out = p.stdout.decode("utf-8", "replace")
    ok(p.returncode == 0, "the demo ends well", out[-3000:])
    steps = re.findall(r"^==== Step \d+: (.*)$", out, re.M)
    for title in ("Build and install", "Start PostgreSQL with mdd", "Register the DICOM nodes",
                  "A modality stores the patient by C-STORE",
                  "The canonical archive rule: CBCTs of finished courses go to the archive tier",
                  "The patient list", "A restore", "A find across the archive and the PACS",
                  "A send to the planning system", "The audit trail"):
        ok(title in steps, f"step shown: {title}", steps)
    ok(all(re.search(r"^==== Step \d+: .*\n     \S", out, re.M) for _ in [0]) and
       len(re.findall(r"^==== Step \d+: .*\n     \S", out, re.M)) == len(steps),
       "every step says what it shows")

    conn = connect(port=PORT)
    by = dict(query(conn, "SELECT source LIKE 'dicom:CT_SCANNER%%', count(*) FROM mdd.objects "
                          "WHERE patient_id = 'RT-DEMO-001' GROUP BY 1"))
    ok(by.get(True, 0) >= 14, "the patient's DICOM objects came in by C-STORE from CT_SCANNER", by)
    like(out, r"rule_job_\d+ \n-+\n done", "the rule's job is done")
    archived = query_value(conn, "SELECT count(*) FROM mdd.audit_log WHERE action = 'archive'")
    cbct = query_value(conn, "SELECT count(*) FROM mdd.objects WHERE patient_id = 'RT-DEMO-001' "
                             "AND series_description ILIKE '%%CBCT%%'")
    ok(cbct > 0 and archived == cbct, f"the rule archived the {cbct} CBCT objects, and only those", archived)
    like(out, r"restore_job_\d+ \n-+\n done", "the restore job is done")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE patient_id = 'RT-DEMO-001' "
                          "AND tier = 'archive'"), 0, "everything is online again after the restore")
    like(out, r"(?m)^ pacs +\| ok +\| \d{8} ", "the find lists the PACS's studies")
    like(out, r"(?m)^ local +\| ok +\| \d{8} ", "and the archive's")
    m = re.search(r"the planning system received (\d+) files", out)
    sent = query_value(conn, "SELECT done FROM mdd.jobs WHERE kind = 'send' ORDER BY id DESC LIMIT 1")
    ok(m and int(m.group(1)) == sent and sent >= 4,
       "the planning system received what the send job sent (plan, structure set, dose, planning CT)",
       m and m.group(0), sent)
    like(out, r"stopped: the PACS and the planning system", "it says it stopped its peers")
    ok(not listening(PORT + 2) and not listening(PORT + 3), "the PACS and the planning system are stopped")
    like(out, r"The demo cluster is running\.", "it ends with how to go on")
    conn.close()
finally:
    subprocess.run([os.path.join(top, "scripts", "cluster.sh"), "stop", os.path.join(demo, "pgdata")],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

done_testing()
