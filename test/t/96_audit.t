#!/usr/bin/python3
# The audit trail is complete (docs/sql.md, "mdd.audit_log"), on a cluster of
# the test's own: every kind of access leaves its row, with the role or the
# AE title, the client address, and the object or the patient:
#   - over SQL, as an operator: import/store, read, export, archive, restore,
#     send, retrieve and move jobs (the rows their runner writes are in the
#     operator's name and from the operator's address), find, patient list;
#   - over DICOM: the association (admitted or refused), each C-STORE and a
#     refused one, a C-FIND served (with its patient and matches) and a
#     refused one, a C-MOVE over two patients (one row per patient) and a
#     refused one;
#   - nobody but the superuser may change it: administrators read it, the
#     other roles do not even see it; no role may insert, update or delete.
import os
import re
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from dicomtools import StoreSCP, free_port, run  # noqa: E402

test_dir = env("MDD_TEST_DIR")
HOST = "127.0.0.1"
PORT = int(env("PGPORT")) + 121
DICOM_PORT = int(env("MDD_DICOM_PORT")) + 121
DATADIR = os.path.join(test_dir, "audit96")
AE = "MDD96"

src_a = make_server_dir(os.path.join(test_dir, "allowed", "p96a"), mode=0o755)
src_b = make_server_dir(os.path.join(test_dir, "allowed", "p96b"), mode=0o755)
out_dir = make_server_dir(os.path.join(test_dir, "allowed", "out96"))
vault = make_server_dir(os.path.join(test_dir, "allowed", "vault96"))
vault_x = make_server_dir(os.path.join(test_dir, "allowed", "vault96x"))
peers_dir = make_server_dir(os.path.join(test_dir, "peers96"), mode=0o755)
man_a = generate_patient(src_a, "AUD96A", 961, slices=3, small=0)
man_b = generate_patient(src_b, "AUD96B", 962, slices=3, small=0)


def rows(c, where, params=()):
    return query_dicts(c, "SELECT * FROM mdd.audit_log WHERE " + where + " ORDER BY at", params)


def dcm(*cmd, timeout=60):
    status, out = run(list(cmd), timeout=timeout)
    return out


cluster("start", DATADIR, str(PORT), f"mdd.dicom_port = {DICOM_PORT}", "mdd.job_workers = 1",
        f"mdd.ae_title = '{AE}'", f"mdd.allowed_paths = '{test_dir}/allowed'")
plan = StoreSCP(peers_dir, "PLAN96")
scu_port = free_port()
try:
    plan.start()
    su = connect_when_up(PORT)
    execute(su, "CREATE EXTENSION mdd")
    for r, grp in (("aud96_op", "mdd_operator"), ("aud96_admin", "mdd_admin"), ("aud96_reader", "mdd_reader")):
        execute(su, f"CREATE ROLE {r} LOGIN IN ROLE {grp}")
    execute(su, "SELECT mdd.add_storage('vault96', 'file', 'archive', %s)", (f'{{"root": "{vault}"}}',))
    execute(su, "SELECT mdd.add_node('scu96', 'SCU96', %s, %s)", (HOST, scu_port))
    execute(su, """SELECT mdd.add_node('ro96', 'RO96', %s, NULL,
                   '{"store": false, "query": false, "retrieve": false}')""", (HOST,))
    execute(su, "SELECT mdd.add_node('plan96', 'PLAN96', %s, %s)", (HOST, plan.port))
    execute(su, "SELECT mdd.add_node('self96', %s, %s, %s)", (AE, HOST, DICOM_PORT))
    ok(connect_when_up(PORT) and True, "the cluster is up")
    # the launcher starts the listeners within seconds of CREATE EXTENSION
    deadline = time.monotonic() + 20
    while "Association Accepted" not in dcm("echoscu", "-v", "-aet", "SCU96", "-aec", AE, HOST, str(DICOM_PORT)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.3)

    op = connect(user="aud96_op", port=PORT)
    op_client = query_value(op, "SELECT host(inet_client_addr()) || ':' || inet_client_port()")

    # ------------------------------------------------------------- DICOM
    dcm("storescu", "-aet", "SCU96", "-aec", AE, "+sd", "+r", "+sp", "*.dcm", HOST, str(DICOM_PORT), src_a)
    stored = rows(su, "action = 'store' AND patient_id = 'AUD96A'")
    n_a = len([f for f in man_a["files"] if f["kind"] == "dicom"])
    is_(len(stored), n_a, "each C-STORE is audited as store, with its patient")
    ok(all(r["object_id"] and r["client"] == f"SCU96@{HOST}" for r in stored),
       "with the object and the calling AE title and host", stored[:1])
    ok(rows(su, "action = 'associate' AND client = %s", (f"SCU96@{HOST}",)),
       "the association is audited (associate)")

    one = os.path.join(src_a, next(f["path"] for f in man_a["files"] if f["kind"] == "dicom"))
    dcm("storescu", "-aet", "RO96", "-aec", AE, HOST, str(DICOM_PORT), one)
    r = rows(su, "action = 'c-store refused' AND client = %s", (f"RO96@{HOST}",))
    ok(len(r) == 1 and "0x0124" in r[0]["detail"], "a refused C-STORE is audited (c-store refused)", r)
    dcm("storescu", "-aet", "STRANGER96", "-aec", AE, HOST, str(DICOM_PORT), one)
    ok(rows(su, "action = 'refuse' AND client = %s", (f"STRANGER96@{HOST}",)),
       "an association refused is audited (refuse)")

    dcm("findscu", "-aet", "SCU96", "-aec", AE, "-S", "-k", "QueryRetrieveLevel=STUDY",
        "-k", "PatientID=AUD96A", "-k", "StudyInstanceUID", HOST, str(DICOM_PORT))
    r = rows(su, "action = 'c-find' AND client = %s", (f"SCU96@{HOST}",))
    studies_a = query_value(su, "SELECT count(DISTINCT study_instance_uid) FROM mdd.objects WHERE patient_id = 'AUD96A'")
    ok(len(r) == 1 and r[0]["patient_id"] == "AUD96A" and f": {studies_a} matches" in r[0]["detail"],
       "a C-FIND served is audited (c-find) with its patient and matches", r)
    dcm("findscu", "-aet", "RO96", "-aec", AE, "-S", "-k", "QueryRetrieveLevel=STUDY",
        "-k", "PatientID=*", HOST, str(DICOM_PORT))
    r = rows(su, "action = 'c-find refused' AND client = %s", (f"RO96@{HOST}",))
    ok(len(r) == 1 and "0x0124" in r[0]["detail"], "a refused C-FIND is audited (c-find refused)", r)

    # ------------------------------------------------------------- SQL
    execute(op, "SELECT count(*) FROM mdd.import(%s)", (src_b,))
    r = rows(su, "action = 'store' AND patient_id = 'AUD96B'")
    n_b = len([f for f in man_b["files"] if f["kind"] == "dicom"])
    ok(len(r) >= n_b and all(x["role"] == "aud96_op" and x["client"] == op_client for x in r),
       "objects stored over SQL are audited with the role and client address", r[:1])
    ok(rows(su, "action = 'import' AND role = 'aud96_op'"), "and the import itself")

    ids_b = [x[0] for x in query(op, "SELECT id FROM mdd.objects WHERE patient_id = 'AUD96B' "
                                     "AND kind = 'dicom' ORDER BY id")]
    query_value(op, "SELECT length(mdd.read(%s))", (ids_b[0],))
    r = rows(su, "action = 'read' AND object_id = %s", (ids_b[0],))
    ok(len(r) == 1 and r[0]["role"] == "aud96_op" and r[0]["patient_id"] == "AUD96B"
       and r[0]["client"] == op_client, "a read is audited with object, patient, role, client", r)
    query_value(op, "SELECT mdd.export(%s, %s)", (ids_b[0], os.path.join(out_dir, "x.dcm")))
    ok(rows(su, "action = 'export' AND object_id = %s AND role = 'aud96_op'", (ids_b[0],)),
       "an export is audited")

    def job_rows(kind, job):
        return rows(su, "(action LIKE %s) AND detail LIKE %s", (kind + "%", f"job {job}:%"))

    def check_job(kind, job, per_object):
        state = query_value(op, "SELECT mdd.wait(%s, '60 s')", (job,))
        r = job_rows(kind, job)
        acts = {x["action"] for x in r}
        ok(state == "done" and {f"{kind} requested", f"{kind} done"} <= acts
           and (not per_object or kind in acts),
           f"{kind}: requested, {'each object, ' if per_object else ''}done are audited", state, sorted(acts))
        ok(r and all(x["role"] == "aud96_op" and x["client"] == op_client for x in r),
           f"{kind}: every row, the runner's too, in the requester's name and from its address",
           [(x["action"], x["role"], x["client"]) for x in r if x["role"] != "aud96_op" or x["client"] != op_client][:3])
        if per_object:
            objs = [x for x in r if x["action"] == kind]
            ok(objs and all(x["object_id"] and x["patient_id"] == "AUD96B" for x in objs),
               f"{kind}: the per-object rows name the object and the patient")

    check_job("archive", query_value(op, "SELECT mdd.archive(%s, 'vault96', false)", (ids_b,)), True)
    check_job("restore", query_value(op, "SELECT mdd.restore(%s, false)", (ids_b,)), True)
    check_job("send", query_value(op, "SELECT mdd.send(%s, 'plan96')", (ids_b,)), True)
    study_b = query_value(op, "SELECT min(study_instance_uid) FROM mdd.objects WHERE patient_id = 'AUD96B' AND kind = 'dicom'")
    check_job("retrieve", query_value(op, "SELECT mdd.retrieve('self96', %s)", (study_b,)), False)
    check_job("move", query_value(op, "SELECT mdd.move('self96', 'plan96', %s)", (study_b,)), False)
    ok(rows(su, "action = 'c-move' AND client = %s AND patient_id = 'AUD96B'", (f"{AE}@{HOST}",)),
       "the C-MOVE the move job asked of this archive is audited as served, with its patient")

    query(op, "SELECT * FROM mdd.find(patient_id => 'AUD96B', nodes => ARRAY['local'])")
    ok(rows(su, "action = 'find' AND role = 'aud96_op' AND patient_id = 'AUD96B'"), "mdd.find is audited")
    query(op, "SELECT * FROM mdd.patient_list('AUD96B')")
    ok(rows(su, "action = 'patient list' AND role = 'aud96_op' AND patient_id = 'AUD96B'"),
       "mdd.patient_list is audited")

    # a C-MOVE over both patients: one row for each
    study_a = query_value(su, "SELECT min(study_instance_uid) FROM mdd.objects WHERE patient_id = 'AUD96A' AND kind = 'dicom'")
    in_study = dict(query(su, "SELECT patient_id, count(*)::int FROM mdd.objects WHERE study_instance_uid IN (%s, %s) "
                              "AND kind = 'dicom' GROUP BY patient_id", (study_a, study_b)))
    out = dcm("movescu", "-aet", "SCU96", "-aec", AE, "-aem", "SCU96", "--port", str(scu_port), "-S",
              "-od", make_server_dir(os.path.join(peers_dir, "moved"), mode=0o777),
              "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_a}\\{study_b}",
              HOST, str(DICOM_PORT))
    r = rows(su, "action = 'c-move' AND client = %s", (f"SCU96@{HOST}",))
    got = sorted((x["patient_id"], x["detail"].split(": ")[-1]) for x in r)
    want = [("AUD96A", f"{in_study['AUD96A']} objects to SCU96"), ("AUD96B", f"{in_study['AUD96B']} objects to SCU96")]
    ok(got == want, "a C-MOVE over two patients is audited once per patient, with the count of each",
       f"got {got}, expected {want}", out[-800:])
    ok(len({x["at"] for x in r}) == 1, "its rows share one time")
    dcm("movescu", "-aet", "RO96", "-aec", AE, "-aem", "SCU96", "-S", "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={study_a}", HOST, str(DICOM_PORT))
    ok(rows(su, "action = 'c-move refused' AND client = %s", (f"RO96@{HOST}",)),
       "a refused C-MOVE is audited (c-move refused)")

    # ------------------------------------------------------ administration
    adm = connect(user="aud96_admin", port=PORT)
    execute(adm, "SELECT mdd.add_storage('s3x96', 'file', 'archive', %s)",
            (f'{{"root": "{vault_x}", "capacity": 1000000}}',))
    execute(adm, """SELECT mdd.alter_storage('s3x96', '{"capacity": 2000000}')""")
    execute(adm, "SELECT mdd.add_node('new96', 'NEW96', '127.0.0.1', 104)")
    r = {x["action"]: x for x in rows(su, "role = 'aud96_admin'")}
    ok({"add storage", "alter storage", "add node"} <= set(r), "adding and changing storages and nodes is audited",
       sorted(r))
    ok(re.search(r"options .*capacity.*root", r.get("add storage", {}).get("detail", ""))
       and "1000000" not in r.get("add storage", {}).get("detail", "x"),
       "a storage's options are audited by name only (their values may be credentials)",
       r.get("add storage"))

    # ------------------------------------------------------ append-only
    ok(query_value(adm, "SELECT count(*) FROM mdd.audit_log") > 0, "an administrator reads the audit trail")
    for who, c in (("an administrator", adm), ("an operator", op)):
        for sql in ("INSERT INTO mdd.audit (role, action) VALUES ('x', 'forged')",
                    "UPDATE mdd.audit SET detail = 'nothing happened'", "DELETE FROM mdd.audit",
                    "DELETE FROM mdd.audit_log", "TRUNCATE mdd.audit"):
            raises(c, sql, None, ("42501",), f"{who} may not: {sql.split(' SET')[0]}")
    reader = connect(user="aud96_reader", port=PORT)
    raises(reader, "SELECT count(*) FROM mdd.audit_log", None, ("42501",), "a reader does not see the audit trail")
    for c in (op, adm, reader):
        c.close()
finally:
    plan.stop()
    cluster("stop", DATADIR)

done_testing()
