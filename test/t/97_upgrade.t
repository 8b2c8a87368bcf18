#!/usr/bin/python3
# The upgrade path (docs/admin.md, "Upgrades"), on a cluster of the test's
# own whose launcher serves database postgres:
#   1. CREATE EXTENSION mdd VERSION '0.1.0' (the frozen first release): the
#      launcher of this 0.2.0 library logs that it waits and starts no
#      worker; data goes in with 0.1.0's functions (DICOM objects, a
#      document, a file storage, a node, a rule, an archive job that stays
#      queued);
#   2. ALTER EXTENSION mdd UPDATE: the version is 0.2.0, the launcher starts
#      the workers within seconds, the queued job runs to its end, every
#      object reads back with its SHA-256, the node, the rule and the
#      audit trail are still there;
#   3. the upgraded schema equals a fresh 0.2.0 install in another database:
#      functions (signature, result, body md5, options, privileges),
#      tables, columns in order, constraints, indexes, views, sequences,
#      triggers, types, privileges, comments, extension members and the
#      tables pg_dump keeps.  A table, column or function that a change of
#      0.2.0 adds and the upgrade misses makes this fail and names it.
import os
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

test_dir = env("MDD_TEST_DIR")
PORT = int(env("PGPORT")) + 120
DICOM_PORT = int(env("MDD_DICOM_PORT")) + 120
DATADIR = os.path.join(test_dir, "upgrade97")
PATIENT = "UPG97"

src = make_server_dir(os.path.join(test_dir, "allowed", "p97"), mode=0o755)
vault = make_server_dir(os.path.join(test_dir, "allowed", "vault97"))
manifest = generate_patient(src, PATIENT, 97, slices=6, small=4)

# Everything the schema of the extension is made of, one text line per
# fact, the same whatever the order of creation and the oids.
SNAPSHOT = r"""
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'mdd'),
ns AS (SELECT 'mdd'::regnamespace AS oid)
SELECT 'function ' || p.oid::regprocedure::text || ' returns ' || pg_get_function_result(p.oid)
       || ' args (' || pg_get_function_arguments(p.oid) || ') kind ' || p.prokind::text
       || ' lang ' || l.lanname || ' vol ' || p.provolatile::text || ' secdef ' || p.prosecdef
       || ' strict ' || p.proisstrict || ' parallel ' || p.proparallel::text
       || ' config ' || coalesce(p.proconfig::text, '-') || ' acl ' || coalesce(p.proacl::text, '-')
       || ' body md5 ' || md5(coalesce(p.prosrc, '') || '|' || coalesce(p.probin, ''))
       || ' comment ' || coalesce(obj_description(p.oid, 'pg_proc'), '-')
FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang, ns WHERE p.pronamespace = ns.oid
UNION ALL
SELECT 'relation ' || c.oid::regclass::text || ' kind ' || c.relkind::text
       || ' acl ' || coalesce(c.relacl::text, '-') || ' options ' || coalesce(c.reloptions::text, '-')
       || ' comment ' || coalesce(obj_description(c.oid, 'pg_class'), '-')
FROM pg_class c, ns WHERE c.relnamespace = ns.oid
UNION ALL
SELECT 'column ' || c.oid::regclass::text || ' #'
       || row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) || ' ' || a.attname || ' '
       || format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
       || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
       || coalesce(' identity ' || nullif(a.attidentity::text, ''), '')
       || ' acl ' || coalesce(a.attacl::text, '-')
       || ' comment ' || coalesce(col_description(c.oid, a.attnum), '-')
FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum, ns
WHERE c.relnamespace = ns.oid AND c.relkind::text IN ('r', 'v', 'm', 'p', 'f', 'c')
  AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint ' || coalesce(con.conrelid::regclass::text, con.contypid::regtype::text) || ' '
       || con.conname || ' ' || pg_get_constraintdef(con.oid)
FROM pg_constraint con, ns WHERE con.connamespace = ns.oid
UNION ALL
SELECT 'index ' || pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid, ns WHERE c.relnamespace = ns.oid
UNION ALL
SELECT 'view ' || c.oid::regclass::text || ' ' || pg_get_viewdef(c.oid)
FROM pg_class c, ns WHERE c.relnamespace = ns.oid AND c.relkind::text IN ('v', 'm')
UNION ALL
SELECT 'sequence ' || s.seqrelid::regclass::text || ' ' || format_type(s.seqtypid, NULL)
       || ' ' || s.seqstart || ' ' || s.seqincrement || ' ' || s.seqmax || ' ' || s.seqcycle
       || coalesce(' owned by ' || d.refobjid::regclass::text || '.' || a.attname, '')
FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
     AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'a'
LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid, ns
WHERE c.relnamespace = ns.oid
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid)
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid, ns
WHERE c.relnamespace = ns.oid AND NOT t.tgisinternal
UNION ALL
SELECT 'type ' || t.oid::regtype::text || ' ' || t.typtype::text
       || ' comment ' || coalesce(obj_description(t.oid, 'pg_type'), '-')
FROM pg_type t, ns WHERE t.typnamespace = ns.oid AND t.typtype::text NOT IN ('b')
  AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind::text <> 'c')
  AND t.typelem = 0
UNION ALL
SELECT 'schema acl ' || coalesce(n.nspacl::text, '-') || ' comment '
       || coalesce(obj_description(n.oid, 'pg_namespace'), '-')
FROM pg_namespace n, ns WHERE n.oid = ns.oid
UNION ALL
SELECT 'member ' || pg_describe_object(d.classid, d.objid, d.objsubid)
FROM pg_depend d, ext WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid
  AND d.deptype = 'e'
UNION ALL
SELECT 'dumped ' || cfg::regclass::text || ' ' || coalesce(cond, '')
FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS u(cfg, cond) WHERE e.extname = 'mdd'
"""


def snapshot(c):
    return sorted(r[0] for r in query(c, SNAPSHOT))


def runners(c):
    return query_value(c, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'mdd job runner'")


def wait_for(what, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = what()
        if v:
            return v
        time.sleep(0.2)
    return what()


def log_text():
    try:
        with open(os.path.join(DATADIR, "server.log"), errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


cluster("start", DATADIR, str(PORT), f"mdd.dicom_port = {DICOM_PORT}", "mdd.job_workers = 1",
        f"mdd.allowed_paths = '{test_dir}/allowed'")
try:
    conn = connect_when_up(PORT)
    fresh = None

    # ---------------------------------------------------------------- 0.1.0
    available = [r[0] for r in query(conn, "SELECT version FROM pg_available_extension_versions "
                                           "WHERE name = 'mdd' ORDER BY version")]
    ok("0.1.0" in available and "0.2.0" in available, "versions 0.1.0 and 0.2.0 are installed",
       f"available: {available}")
    path = query_value(conn, "SELECT string_agg(source || '->' || target, ' ') FROM "
                             "pg_extension_update_paths('mdd') WHERE path IS NOT NULL")
    like(path or "", r"0\.1\.0->0\.2\.0", "ALTER EXTENSION has a path from 0.1.0 to 0.2.0")

    execute(conn, "CREATE EXTENSION mdd VERSION '0.1.0'")
    is_(query_value(conn, "SELECT extversion FROM pg_extension WHERE extname = 'mdd'"), "0.1.0",
        "CREATE EXTENSION mdd VERSION '0.1.0' installs the first release")
    waited = wait_for(lambda: "extension mdd is version 0.1.0" in log_text(), 20)
    ok(waited, "the launcher logs that the extension is 0.1.0 and the library 0.2.0",
       server_log_tail(DATADIR))
    like(log_text(), r"HINT:  Run ALTER EXTENSION mdd UPDATE", "its hint says what to run")
    time.sleep(1)
    is_(runners(conn), 0, "no job runner runs on the 0.1.0 schema")

    execute(conn, "SELECT count(*) FROM mdd.import(%s)", (src,))
    sums = dict(query(conn, "SELECT id, sha256 FROM mdd.objects WHERE patient_id = %s", (PATIENT,)))
    dicom = [f for f in manifest["files"] if f["kind"] == "dicom"]
    is_(len(sums), len(dicom), "0.1.0 imports the patient's DICOM objects")
    doc = query_value(conn, "SELECT mdd.store_document(%s, %s, 'plan-summary.pdf', 'application/pdf')",
                      (PATIENT, b"%PDF-1.4 upgrade test\n"))
    sums[doc] = query_value(conn, "SELECT sha256 FROM mdd.objects WHERE id = %s", (doc,))
    execute(conn, "SELECT mdd.add_storage('vault97', 'file', 'archive', %s)", (f'{{"root": "{vault}"}}',))
    execute(conn, "SELECT mdd.add_node('pacs97', 'PACS97', '127.0.0.1', 11197)")
    execute(conn, """SELECT mdd.create_rule('cbct97', $$o.modality = 'CT'$$, storage => 'vault97',
                                            batch_size => 3)""")
    cts = [r[0] for r in query(conn, "SELECT id FROM mdd.objects WHERE patient_id = %s AND modality = 'CT' "
                                     "ORDER BY id", (PATIENT,))]
    job = query_value(conn, "SELECT mdd.archive(%s, 'vault97', false)", (cts,))
    audit_before = query_value(conn, "SELECT count(*) FROM mdd.audit_log")
    time.sleep(1)
    is_(query_value(conn, "SELECT state FROM mdd.jobs WHERE id = %s", (job,)), "queued",
        "the archive job asked for under 0.1.0 waits: nobody runs it")

    # --------------------------------------------------------------- update
    e = sql_error(conn, "ALTER EXTENSION mdd UPDATE")
    ok(e is None, "ALTER EXTENSION mdd UPDATE runs", describe_error(e) if e else "")
    if e is not None:
        bail_out("the upgrade failed: " + describe_error(e))
    is_(query_value(conn, "SELECT extversion FROM pg_extension WHERE extname = 'mdd'"), "0.2.0",
        "ALTER EXTENSION mdd UPDATE brings it to 0.2.0")
    ok(wait_for(lambda: 'extension found in database "postgres" (version 0.2.0)' in log_text(), 20),
       "the launcher finds the extension in its version", server_log_tail(DATADIR))
    ok(wait_for(lambda: runners(conn) == 1, 20), "and starts the job runner")
    is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (job,)), "done",
        "the job queued under 0.1.0 is done after the update")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE id = ANY(%s) AND tier = 'archive'", (cts,)),
        len(cts), "its CT objects are on the archive tier")
    bad = [i for i, s in query(conn, "SELECT id, sha256 FROM (SELECT id, encode(sha256(mdd.read(id, true)), 'hex') "
                                     "AS sha256 FROM unnest(%s::bigint[]) id) x", (list(sums),))
           if s != sums[i]]
    is_(bad, [], "every object stored under 0.1.0 reads back with its SHA-256")
    is_(query_value(conn, "SELECT sum(objects) FROM mdd.patient_list(%s)", (PATIENT,)), len(sums),
        "the patient list of 0.2.0 counts them all")
    is_(tuple(query(conn, "SELECT name, ae_title, port FROM mdd.nodes WHERE name = 'pacs97'")[0]),
        ("pacs97", "PACS97", 11197), "the node is still there")
    is_(query_value(conn, "SELECT count(*) FROM mdd.preview_rule('cbct97')"), 0,
        "the rule is still there (and finds its CTs archived)")
    ok(query_value(conn, "SELECT count(*) FROM mdd.audit_log") >= audit_before,
       "the audit trail of 0.1.0 is kept")
    job2 = query_value(conn, "SELECT mdd.restore(%s, false)", (cts[:2],))
    is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (job2,)), "done", "0.2.0 restores them")

    # ------------------------------------------------------ compare schemas
    execute(conn, "DROP DATABASE IF EXISTS fresh97")
    execute(conn, "CREATE DATABASE fresh97")
    fresh = connect(port=PORT, dbname="fresh97")
    execute(fresh, "CREATE EXTENSION mdd")
    upgraded, installed = snapshot(conn), snapshot(fresh)
    only_up = sorted(set(upgraded) - set(installed))
    only_fresh = sorted(set(installed) - set(upgraded))
    ok(len(upgraded) > 300, f"the schema snapshot has {len(upgraded)} facts")
    ok(not only_up and not only_fresh,
       "the upgraded schema equals a fresh install of 0.2.0",
       *(["only after the upgrade:"] + only_up[:25] + ["only in a fresh install:"] + only_fresh[:25]
         + (["(a table or column 0.2.0 adds needs its statements in sql/upgrade/0.1.0--0.2.0.sql; "
             "new columns go at the end of CREATE TABLE, where ALTER TABLE ADD COLUMN puts them)"]
            if any(x.startswith(("column", "relation", "constraint", "index")) for x in only_up + only_fresh)
            else [])))
finally:
    try:
        if fresh is not None:
            fresh.close()
    finally:
        cluster("stop", DATADIR)

done_testing()
