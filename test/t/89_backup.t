#!/usr/bin/python3
# Backup with stock PostgreSQL tools: pg_dump of the database (catalog,
# copies, nodes, rules, jobs, audit trail, and the large objects of the
# online storage) and pg_restore into a new database give back the whole
# archive: the same rows in every view, every object readable with its
# SHA-256, ids that go on from the restored ones.  Every table of the
# extension is marked for pg_dump, so that a table added later cannot be
# forgotten.
import os
import subprocess
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

PATIENT = "TAP89"
test_dir = env("MDD_TEST_DIR")
src = make_server_dir(os.path.join(test_dir, "allowed", "p89"), mode=0o755)
vault = make_server_dir(os.path.join(test_dir, "allowed", "vault89"))
dump = os.path.join(test_dir, "t89.dump")
RESTORED = "mdd_t89_restored"
generate_patient(src, PATIENT, 89, slices=5)

conn = connect()
unmarked = query(conn, """SELECT c.relname FROM pg_class c
                          JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
                                           AND d.deptype = 'e'
                          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'mdd'
                          WHERE c.relkind IN ('r', 'S') AND c.oid <> ALL (e.extconfig)""")
is_(unmarked, [], "every table and sequence of the extension is kept by pg_dump")

execute(conn, "SELECT count(*) FROM mdd.import(%s)", (src,))
execute(conn, "SELECT mdd.store_document(%s, %s, 'summary.pdf')",
        (PATIENT, open(os.path.join(src, "document.pdf"), "rb").read()))
execute(conn, "SELECT mdd.add_storage('vault89', 'file', 'archive', %s)", (f'{{"root": "{vault}"}}',))
execute(conn, "SELECT mdd.add_node('t89-tps', 'T89TPS', '127.0.0.1', 4242)")
execute(conn, f"""SELECT mdd.create_rule('t89-cbct', $$o.patient_id = '{PATIENT}' AND o.series_description LIKE 'CBCT%%'$$,
                                        storage => 'vault89', schedule => '0 1 * * *')""")
job = query_value(conn, "SELECT mdd.run_rule('t89-cbct')")
is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (job,)), "done", "the patient's CBCT is archived by a rule")
tiers = dict(query(conn, "SELECT tier, count(*) FROM mdd.objects WHERE patient_id = %s GROUP BY 1", (PATIENT,)))
ok(tiers.get("archive") == 40 and tiers.get("online", 0) > 0,
   f"objects on both tiers: {tiers}")

VIEWS = {
    "mdd.objects": "SELECT * FROM mdd.objects ORDER BY id",
    "mdd.storages": "SELECT * FROM mdd.storages ORDER BY name",
    "mdd.nodes": "SELECT * FROM mdd.nodes ORDER BY name",
    "mdd.rules": "SELECT * FROM mdd.rules ORDER BY name",
    "mdd.jobs": "SELECT * FROM mdd.jobs ORDER BY id",
    "mdd.audit_log": "SELECT * FROM mdd.audit_log a ORDER BY at, a::text",
    "mdd.copy": "SELECT * FROM mdd.copy ORDER BY object, storage",
    "mdd.reference": "SELECT * FROM mdd.reference ORDER BY object, kind, uid",
}
before = {name: query(conn, sql) for name, sql in VIEWS.items()}
# this test's objects (others of the run may be corrupt on purpose)
sums = dict(query(conn, "SELECT id, sha256 FROM mdd.objects WHERE patient_id = %s", (PATIENT,)))

host, port = os.environ["PGHOST"], os.environ["PGPORT"]
r = subprocess.run(["pg_dump", "-h", host, "-p", port, "-U", "postgres", "-Fc", "-f", dump,
                    os.environ.get("PGDATABASE", "postgres")], capture_output=True, text=True, timeout=300)
ok(r.returncode == 0, "pg_dump of the database", r.stderr)
unlike(r.stderr, "circular foreign-key", "no circular foreign keys among the catalog's tables")
execute(conn, f"DROP DATABASE IF EXISTS {RESTORED}")
execute(conn, f"CREATE DATABASE {RESTORED}")
try:
    r = subprocess.run(["pg_restore", "-h", host, "-p", port, "-U", "postgres", "-d", RESTORED, dump],
                       capture_output=True, text=True, timeout=300)
    ok(r.returncode == 0, "pg_restore into a new database", r.stderr)
    restored = connect(dbname=RESTORED)
    for name, sql in VIEWS.items():
        is_deeply(query(restored, sql), before[name], f"{name}: the same rows after the restore")
    bad = [i for i, s in query(restored, "SELECT id, encode(sha256(mdd.read(id, true)), 'hex') FROM mdd.objects "
                                         "WHERE id = ANY(%s)", (list(sums),)) if s != sums[i]]
    is_(bad, [], f"all {len(sums)} objects, large objects and archived files, read back with their SHA-256")
    new_id = query_value(restored, "SELECT mdd.store_document(%s, 'x'::bytea, 'after-restore.txt')", (PATIENT,))
    ok(new_id > query_value(conn, "SELECT max(id) FROM mdd.object"), f"new ids go on from the restored ones ({new_id})")
    restored.close()
finally:
    execute(conn, f"DROP DATABASE IF EXISTS {RESTORED} WITH (FORCE)")
    if os.path.exists(dump):
        os.unlink(dump)
conn.close()
done_testing()
