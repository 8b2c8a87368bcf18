#!/usr/bin/python3
# Changing and removing DICOM nodes (mdd.alter_node, mdd.drop_node) with
# real peers: DCMTK's storescp as a node mdd sends to, echoscu as a device
# calling mdd.
#   1. a node registered on the wrong port: mdd.echo fails; alter_node to
#      the right port: it succeeds, mdd.nodes shows it, the change is
#      audited with old and new values;
#   2. options: "send": false refuses mdd.send (42501); "send": null goes
#      back to the default and a send job delivers the object;
#   3. admission reads the node at each association: a node whose host is
#      changed elsewhere is refused when calling from 127.0.0.1, accepted
#      again once the host is changed back;
#   4. bad changes (unknown node, bad option, bad port) give their SQLSTATE
#      and change nothing;
#   5. drop_node refuses a node that a job or a rule uses (2BP01, saying
#      which); a node no longer used is dropped, audited, and unknown after.
import os
import sys
import tempfile

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from dicomtools import StoreSCP, run, free_port, received_files, dataset_bytes, unprivileged_user  # noqa: E402

PORT = int(env("MDD_DICOM_PORT"))
test_dir = env("MDD_TEST_DIR")
HOST = "127.0.0.1"
PATIENT = "TAP63"

work = tempfile.mkdtemp(prefix="t63-", dir=test_dir)
os.chmod(work, 0o755)
src = make_server_dir(os.path.join(test_dir, "allowed", "p63"), mode=0o755)
manifest = generate_patient(src, PATIENT, 63, slices=2)
conn = connect()
query_dicts(conn, "SELECT * FROM mdd.import(%s)", (src,))
plan_id = query_value(conn, "SELECT id FROM mdd.objects WHERE patient_id = %s AND modality = 'RTPLAN'",
                      (PATIENT,))


def raises(sql, params, code, desc):
    e = sql_error(conn, sql, params)
    ok(e is not None and e.pgcode == code, desc, describe_error(e))
    return e


def node(name):
    rows = query_dicts(conn, "SELECT * FROM mdd.nodes WHERE name = %s", (name,))
    return rows[0] if rows else None


scp = StoreSCP(work, "T63TPS", user=unprivileged_user()).start()
try:
    # 1. the wrong port, then the right one
    wrong = free_port()
    execute(conn, "SELECT mdd.add_node('t63tps', 'T63TPS', %s, %s)", (HOST, wrong))
    is_(query_value(conn, "SELECT mdd.echo('t63tps')"), False, "echo to the node on the wrong port fails")
    execute(conn, "SELECT mdd.alter_node('t63tps', port => %s)", (scp.port,))
    is_(node("t63tps")["port"], scp.port, "mdd.nodes shows the new port")
    is_(node("t63tps")["host"], HOST, "and the host it had")
    is_(query_value(conn, "SELECT mdd.echo('t63tps')"), True, "echo to the node on the right port succeeds")
    detail = query_value(conn, "SELECT detail FROM mdd.audit_log WHERE action = 'alter node' "
                         "AND detail LIKE 't63tps:%%' ORDER BY at DESC LIMIT 1")
    is_(detail, f"t63tps: port {wrong} -> {scp.port}", "the change is audited with the old and new value")

    # 2. options merged, null back to the default
    execute(conn, """SELECT mdd.alter_node('t63tps', options => '{"send": false, "find": false}')""")
    is_((node("t63tps")["may_send"], node("t63tps")["may_find"]), (False, False),
        "options given are merged into the node's")
    raises("SELECT mdd.send(%s, 't63tps')", ([plan_id],), "42501", "a node that may not be sent to refuses mdd.send")
    execute(conn, """SELECT mdd.alter_node('t63tps', options => '{"send": null}')""")
    is_((node("t63tps")["may_send"], node("t63tps")["may_find"]), (True, False),
        "an option given as null goes back to its default, the others stay")
    job = query_value(conn, "SELECT mdd.send(%s, 't63tps')", ([plan_id],))
    is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (job,)), "done", "a send to the altered node is done")
    uid = query_value(conn, "SELECT sop_instance_uid FROM mdd.objects WHERE id = %s", (plan_id,))
    got = received_files(scp.dir)
    stored = bytes(query_value(conn, "SELECT mdd.read(%s, true)", (plan_id,)))
    ok(uid in got and dataset_bytes(open(got[uid], "rb").read()) == dataset_bytes(stored),
       "the plan arrived at the node, its data set byte-identical", sorted(got))

    # 3. admission reads the node at each association
    execute(conn, "SELECT mdd.add_node('t63ct', 'T63CT', %s, NULL)", (HOST,))
    echo = ["echoscu", "-aet", "T63CT", "-aec", "MDD", HOST, str(PORT)]
    rc, out = run(echo)
    ok(rc == 0, "a device calling from its registered host is accepted", out)
    execute(conn, "SELECT mdd.alter_node('t63ct', host => '192.0.2.63')")
    rc, out = run(echo)
    isnt(rc, 0, "after its host is changed, the same device calling from 127.0.0.1 is refused")
    execute(conn, "SELECT mdd.alter_node('t63ct', host => %s)", (HOST,))
    rc, out = run(echo)
    ok(rc == 0, "changed back, it is accepted again", out)

    # 4. bad changes change nothing
    before = node("t63tps")
    raises("SELECT mdd.alter_node('t63nosuch', port => 104)", None, "42704", "an unknown node: 42704")
    raises("""SELECT mdd.alter_node('t63tps', options => '{"colour": "red"}')""", None, "22023",
           "an unknown option: 22023")
    raises("""SELECT mdd.alter_node('t63tps', options => '{"send": "maybe"}')""", None, "22P02",
           "a non-boolean option: 22P02")
    raises("SELECT mdd.alter_node('t63tps', port => 70000)", None, "22023", "a bad port: 22023")
    raises("SELECT mdd.alter_node('t63tps', ae_title => 'BAD\\TITLE')", None, "22023", "a bad AE title: 22023")
    is_deeply(node("t63tps"), before, "the node is as it was")

    # 5. drop
    e = raises("SELECT mdd.drop_node('t63tps')", None, "2BP01", "a node a job used cannot be dropped")
    like(e.pgerror if e else "", rf"job {job} \(done\)", "the error names the job")
    execute(conn, "SELECT mdd.add_node('t63old', 'T63OLD', %s, 104)", (HOST,))
    execute(conn, "SELECT mdd.create_rule('t63-rule', 'false', 'send', node => 't63old')")
    e = raises("SELECT mdd.drop_node('t63old')", None, "2BP01", "a node a rule sends to cannot be dropped")
    like(e.pgerror if e else "", r'rule "t63-rule"', "the error names the rule")
    execute(conn, "SELECT mdd.drop_rule('t63-rule')")
    execute(conn, "SELECT mdd.drop_node('t63old')")
    is_(node("t63old"), None, "once unused it is dropped")
    ok(query_value(conn, "SELECT count(*) FROM mdd.audit_log WHERE action = 'drop node' "
                   "AND detail LIKE 't63old (T63OLD at 127.0.0.1:104)'") == 1, "the drop is audited")
    raises("SELECT mdd.drop_node('t63old')", None, "42704", "dropping it again: 42704")
    execute(conn, "SELECT mdd.drop_node('t63ct')")
    rc, out = run(echo)
    isnt(rc, 0, "a dropped device's calls are refused (unknown AE title)")
finally:
    scp.stop()

done_testing()
