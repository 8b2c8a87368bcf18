#!/usr/bin/python3
# The rule scheduler, on a cluster of its own: the canonical rule (CBCTs of
# patients whose treatment courses all ended over 90 days ago, from the demo
# EMR) fires by its '* * * * *' schedule within a minute inside a window
# that spans midnight, in batches of batch_size; a rule whose window is
# closed does not fire; a run stops taking batches when its window closes
# and resumes by itself when it opens; the bandwidth cap holds rule work
# back; a rule never runs twice at once; dropping a rule while it runs
# cancels the run and leaves every object readable; a run missed while the
# server was down runs once at start, if the window is open; a send rule
# delivers the plan and structure set to a planning system (storescp), once.
import datetime
import os
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from dicomtools import StoreSCP, dataset_bytes, unprivileged_user  # noqa: E402

test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
port = int(env("PGPORT")) + 88
datadir = os.path.join(test_dir, "rules88")
vault = make_server_dir(os.path.join(test_dir, "allowed", "vault88"))
PATIENTS = ["R88A", "R88B", "R88C", "R88D", "R88E", "R88F", "R88G", "R88H"]


def wait_for(what, timeout, poll=0.25):
    """Poll what() until it returns something true; that value, or None."""
    deadline = time.monotonic() + timeout
    while True:
        v = what()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(poll)


def canonical(patient):
    """The canonical rule's predicate, kept to one patient per rule here."""
    return f"""o.modality = 'CT'
        AND (o.series_description ILIKE '%CBCT%' OR o.image_type LIKE '%CBCT%')
        AND EXISTS (SELECT 1 FROM emr.patient p JOIN emr.course c ON c.patient = p.id
                    WHERE p.mrn = o.patient_id)
        AND NOT EXISTS (SELECT 1 FROM emr.patient p JOIN emr.course c ON c.patient = p.id
                        WHERE p.mrn = o.patient_id
                          AND (c.end_date IS NULL OR c.end_date > current_date - 90))
        AND o.patient_id = '{patient}'"""


for i, pid in enumerate(PATIENTS):
    generate_patient(os.path.join(test_dir, "allowed", f"p88-{pid}"), pid, 880 + i, slices=3)
cluster("start", datadir, str(port), "mdd.dicom_port = 0", "mdd.job_workers = 2",
        f"mdd.allowed_paths = '{test_dir}/allowed'")
conn = None
try:
    conn = connect_when_up(port)
    execute(conn, "CREATE EXTENSION mdd")
    with open(os.path.join(top, "scripts", "emr_demo.sql"), encoding="utf-8") as fh:
        execute(conn, fh.read())
    for pid in PATIENTS:
        execute(conn, "SELECT count(*) FROM mdd.import(%s)", (os.path.join(test_dir, "allowed", f"p88-{pid}"),))
        execute(conn, "INSERT INTO emr.patient (mrn, name) VALUES (%s, %s)", (pid, pid + "^Test"))
        execute(conn, """INSERT INTO emr.course (patient, name, start_date, end_date)
                         SELECT id, 'C1', current_date - 160, current_date - 120 FROM emr.patient WHERE mrn = %s""",
                (pid,))
    execute(conn, "SELECT mdd.add_storage('vault', 'file', 'archive', %s)", (f'{{"root": "{vault}"}}',))
    execute(conn, "CREATE ROLE mdd_t88_admin IN ROLE mdd_admin, emr_reader")
    sums = dict(query(conn, "SELECT id, sha256 FROM mdd.objects"))
    cbct = {pid: [r[0] for r in query(conn, """SELECT id FROM mdd.objects WHERE patient_id = %s
                                                 AND series_description LIKE 'CBCT%%' ORDER BY id""", (pid,))]
            for pid in PATIENTS}
    is_([len(v) for v in cbct.values()], [40] * len(PATIENTS), "each patient has a 40-slice CBCT")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE image_type LIKE '%%CBCT%%'"),
        40 * len(PATIENTS), "the generator marks CBCT images in their image type")

    def create_rule(name, patient, **kw):
        args = ", ".join(f"{k} => %({k})s" for k in kw)
        execute(conn, "SET ROLE mdd_t88_admin")
        try:
            execute(conn, f"SELECT mdd.create_rule(%(name)s, %(predicate)s, storage => 'vault'"
                          f"{', ' + args if args else ''})",
                    dict(name=name, predicate=canonical(patient), **kw))
        finally:
            execute(conn, "RESET ROLE")

    def tiers(ids):
        return sorted(set(r[0] for r in query(conn, "SELECT tier FROM mdd.objects WHERE id = ANY(%s)", (ids,))))

    def rule(name):
        return query_one(conn, "SELECT * FROM mdd.rules WHERE name = %s", (name,))

    def job(j):
        return query_one(conn, "SELECT * FROM mdd.jobs WHERE id = %s", (j,))

    def unreadable(ids):
        return [i for i, s in query(conn, "SELECT id, encode(sha256(mdd.read(id, true)), 'hex') "
                                          "FROM unnest(%s::bigint[]) id", (ids,)) if s != sums[i]]

    # -----------------------------------------------------------------------
    # '* * * * *' fires within the next minute inside a window across midnight
    now = query_value(conn, "SELECT localtimestamp(0)")
    t = lambda delta: (now + delta).time()  # noqa: E731
    hour = datetime.timedelta(hours=1)
    # open now: everything but [now+1h, now+2h); closed now: [now+1h, now-1h)
    create_rule("a", "R88A", schedule="* * * * *", window_start=t(2 * hour), window_end=t(hour),
                batch_size=7, include_related=False)
    create_rule("b", "R88B", schedule="* * * * *", window_start=t(hour), window_end=t(-hour),
                batch_size=7, include_related=False)
    note(f"server time {now}; window a {t(2 * hour)}-{t(hour)}, window b {t(hour)}-{t(-hour)}")
    expected = sorted(query_value(conn, "SELECT array_agg(x) FROM mdd.preview_rule('a') x"))
    is_(expected, cbct["R88A"], "preview of rule a: the CBCT of its patient")
    first_next = wait_for(lambda: rule("a")["next_run"], 10)
    ok(first_next is not None and first_next <= query_value(conn, "SELECT now() + interval '61 s'"),
       "the scheduler sets rule a's next run at once, within the next minute", str(first_next))
    a_job = wait_for(lambda: rule("a")["last_job"], 75)
    ok(a_job, "rule a's schedule starts a run within the next minute", server_log_tail(datadir))
    is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (a_job,)), "done", "the run ends done")
    j = job(a_job)
    is_((j["kind"], j["total"], j["done"], j["failed"], j["rule"]), ("archive", 40, 40, 0, "a"),
        "it archived the 40 CBCT images of rule a's patient")
    is_(query_value(conn, "SELECT options->>'scheduled' FROM mdd.job WHERE id = %s", (a_job,)), "true",
        "the job says the scheduler started it")
    is_(j["created_by"], "mdd_t88_admin", "on behalf of the rule's owner")
    is_(tiers(cbct["R88A"]), ["archive"], "rule a's CBCT is in the archive tier")
    is_(query_value(conn, """SELECT count(*) FROM mdd.objects WHERE patient_id = 'R88A' AND tier = 'online'"""),
        query_value(conn, """SELECT count(*) FROM mdd.objects WHERE patient_id = 'R88A'""") - 40,
        "the rest of the patient (planning CT, RT objects) stays online")
    sizes = [r[0] for r in query(conn, "SELECT count(*) FROM mdd.job_item WHERE job = %s GROUP BY batch ORDER BY batch",
                                 (a_job,))]
    is_(sizes, [7, 7, 7, 7, 7, 5], "batches of batch_size (7) objects")
    is_(j["batches"], 6, "mdd.jobs counts the batches")
    r = rule("a")
    is_((r["last_state"], r["last_objects"], r["objects"]), ("done", 40, 40), "mdd.rules: the last run and what it did")
    is_(r["last_bytes"], query_value(conn, "SELECT sum(size) FROM mdd.objects WHERE id = ANY(%s)", (cbct["R88A"],)),
        "mdd.rules: the bytes it moved")
    ok(r["next_run"] > r["last_run"], "mdd.rules: the next run is after the last", f"{r['last_run']} -> {r['next_run']}")
    rb = rule("b")
    is_(rb["last_job"], None, "rule b, whose window is closed, did not run")
    ok(rb["next_run"] is not None and rb["next_run"] > first_next,
       "but its next run moved on", f"{first_next} -> {rb['next_run']}")
    is_(tiers(cbct["R88B"]), ["online"], "rule b's CBCT is still online")
    is_(unreadable(cbct["R88A"] + cbct["R88B"]), [], "every object reads back with its SHA-256")
    execute(conn, "SELECT mdd.drop_rule('a'), mdd.drop_rule('b')")

    # -----------------------------------------------------------------------
    # the bandwidth cap: 1 MB/s for rule work
    execute(conn, "ALTER SYSTEM SET mdd.rule_bandwidth = 1")
    execute(conn, "SELECT pg_reload_conf()")
    wait_for(lambda: query_value(conn, "SELECT current_setting('mdd.rule_bandwidth')") == "1", 10)
    create_rule("d", "R88D", batch_size=5, include_related=False)
    d_job = query_value(conn, "SELECT mdd.run_rule('d')")
    is_(query_value(conn, "SELECT mdd.wait(%s, '120 s')", (d_job,)), "done", "a capped run ends done")
    d = query_one(conn, """SELECT bytes, extract(epoch FROM finished_at - started_at) AS secs
                           FROM mdd.job WHERE id = %s""", (d_job,))
    floor = (d["bytes"] - 5 * 131072 - 8192) / 1e6
    ok(d["secs"] >= 0.9 * floor, f"1 MB/s cap: {d['bytes']} bytes took {d['secs']:.1f} s (at least {floor:.1f} s)")
    # the same run by hand (not a rule) is not held back
    r_job = query_value(conn, "SELECT mdd.restore(%s, false)", (cbct["R88D"],))
    execute(conn, "SELECT mdd.wait(%s)", (r_job,))
    m_job = query_value(conn, "SELECT mdd.archive(%s, 'vault', false)", (cbct["R88D"],))
    execute(conn, "SELECT mdd.wait(%s)", (m_job,))
    m = query_value(conn, "SELECT extract(epoch FROM finished_at - started_at) FROM mdd.job WHERE id = %s", (m_job,))
    ok(m < d["secs"] / 2, f"a job a user queued is not capped: {m:.1f} s")

    # -----------------------------------------------------------------------
    # the window closes during a run (still at 1 MB/s): no new batch until
    # it opens again
    create_rule("c", "R88C", batch_size=4, include_related=False,
                window_start=t(2 * hour), window_end=t(hour))
    c_job = query_value(conn, "SELECT mdd.run_rule('c')")
    ok(wait_for(lambda: job(c_job)["done"] >= 8, 60), "rule c's run is under way")
    # close the window for the next 12 seconds (it spans midnight: it opens
    # again 12 s from now and ends 1 s ago)
    execute(conn, """UPDATE mdd.rule SET window_start = (localtime + interval '12 s')::time,
                                          window_end = (localtime - interval '1 s')::time
                     WHERE name = 'c'""")
    waiting = wait_for(lambda: (job(c_job)["error"] or "").startswith("waiting for the window of rule c"), 30)
    ok(waiting, "the run stops taking batches when its window closes", str(job(c_job)))
    paused = job(c_job)
    is_(paused["state"], "running", "it stays running")
    is_(paused["done"] % 4, 0, f"the batch under way was finished ({paused['done']} objects)")
    is_(query_value(conn, "SELECT count(*) FROM mdd.job_item WHERE job = %s AND state <> 'pending' "
                          "AND state <> 'done'", (c_job,)), 0, "and no batch is open")
    ok(query_value(conn, "SELECT next_attempt_at BETWEEN now() AND now() + interval '13 s' FROM mdd.job WHERE id = %s",
                   (c_job,)), "it waits for the window to open", str(paused))
    time.sleep(3)
    is_(job(c_job)["done"], paused["done"], "nothing moves while the window is closed")
    is_(query_value(conn, "SELECT mdd.wait(%s, '120 s')", (c_job,)), "done",
        "it resumes by itself when the window opens, and ends done")
    is_(job(c_job)["done"], 40, "all 40 objects")
    is_(query_value(conn, """SELECT count(*) FROM mdd.job_item WHERE job = %s AND batch IS NOT NULL""", (c_job,)), 40,
        "every object went in a batch")
    is_(tiers(cbct["R88C"]), ["archive"], "rule c's CBCT is archived")

    # -----------------------------------------------------------------------
    # never twice at once; dropping a rule while it runs
    create_rule("e", "R88E", batch_size=4, include_related=False)
    e_job = query_value(conn, "SELECT mdd.run_rule('e')")
    e = sql_error(conn, "SELECT mdd.run_rule('e')")
    ok(e is not None and e.pgcode == "55006", "running a rule whose run is going is refused (55006)",
       describe_error(e))
    ok(wait_for(lambda: job(e_job)["done"] >= 4, 60), "rule e's run is under way")
    execute(conn, "SELECT mdd.drop_rule('e')")
    is_(rule("e"), None, "the rule is gone")
    is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (e_job,)), "cancelled", "its run is cancelled")
    ok(wait_for(lambda: query_value(conn, "SELECT finished_at IS NOT NULL FROM mdd.job WHERE id = %s", (e_job,)), 60),
       "and ends, having undone what it had begun")
    ej = job(e_job)
    is_((ej["rule"], query_value(conn, "SELECT rule FROM mdd.job WHERE id = %s", (e_job,))), ("e", None),
        "the job still says which rule it ran")
    ok(0 < ej["done"] < 40, f"part of the CBCT was archived before the drop ({ej['done']} objects)")
    is_(query_value(conn, "SELECT count(*) FROM mdd.copy WHERE state <> 'present'"), 0,
        "no copy is left half written or half released")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE id = ANY(%s) AND tier = 'archive'", (cbct["R88E"],)),
        ej["done"], "exactly the objects the run finished are archived")
    is_(unreadable(cbct["R88E"]), [], "every object of the patient reads back with its SHA-256")

    # -----------------------------------------------------------------------
    # a send rule: the plan and structure set of finished patients to the
    # planning system, each once
    tps = StoreSCP(test_dir, "TPS88", user=unprivileged_user()).start()
    try:
        execute(conn, "SELECT mdd.add_node('tps88', %s, '127.0.0.1', %s)", (tps.aet, tps.port))
        execute(conn, "SET ROLE mdd_t88_admin")
        execute(conn, """SELECT mdd.create_rule('plans-to-tps', %s, 'send', node => 'tps88', batch_size => 1,
                                                include_related => false)""",
                ("o.patient_id = 'R88H' AND o.modality IN ('RTPLAN', 'RTSTRUCT')",))
        execute(conn, "RESET ROLE")
        rt = [r[0] for r in query(conn, """SELECT id FROM mdd.objects WHERE patient_id = 'R88H'
                                            AND modality IN ('RTPLAN', 'RTSTRUCT') ORDER BY id""")]
        h_job = query_value(conn, "SELECT mdd.run_rule('plans-to-tps')")
        is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (h_job,)), "done", "the send rule's run ends done")
        hj = job(h_job)
        is_((hj["kind"], hj["total"], hj["done"], hj["batches"]), ("send", 2, 2, 2),
            "it sent the plan and the structure set, one per batch")
        got = tps.received()
        uids = dict(query(conn, "SELECT sop_instance_uid, id FROM mdd.objects WHERE id = ANY(%s)", (rt,)))
        is_(sorted(got), sorted(uids), "the planning system received exactly those two")
        same = [u for u, path in got.items() if u in uids and dataset_bytes(open(path, "rb").read())
                == dataset_bytes(bytes(query_value(conn, "SELECT mdd.read(%s)", (uids[u],))))]
        is_(sorted(same), sorted(uids), "byte for byte as archived")
        h2 = query_value(conn, "SELECT mdd.run_rule('plans-to-tps')")
        is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (h2,)), "done", "a second run ends done")
        is_(job(h2)["total"], 0, "having nothing left to send")
        is_(len(tps.received()), 2, "nothing was sent twice")
    finally:
        tps.stop()

    # -----------------------------------------------------------------------
    # runs missed while the server was down: once at start, inside the window
    execute(conn, "ALTER SYSTEM RESET mdd.rule_bandwidth")
    create_rule("f", "R88F", schedule="0 3 1 1 *", include_related=False)
    create_rule("g", "R88G", schedule="0 3 1 1 *", include_related=False,
                window_start=t(hour), window_end=t(-hour))
    ok(wait_for(lambda: rule("f")["next_run"] and rule("g")["next_run"], 10), "the scheduler planned f and g")
    cluster("stop", datadir)
    cluster("start", datadir, str(port))
    conn = connect_when_up(port)
    # as if the server had been down when they were due
    execute(conn, "UPDATE mdd.rule SET next_run_at = now() - interval '10 min' WHERE name IN ('f', 'g')")
    cluster("stop", datadir)
    cluster("start", datadir, str(port))
    conn = connect_when_up(port)
    f_job = wait_for(lambda: rule("f")["last_job"], 30)
    ok(f_job, "a run missed while the server was down starts when it is up again", server_log_tail(datadir))
    if f_job:
        is_(query_value(conn, "SELECT mdd.wait(%s, '60 s')", (f_job,)), "done", "and ends done")
    is_(query_value(conn, "SELECT count(*) FROM mdd.job WHERE rule = (SELECT id FROM mdd.rule WHERE name = 'f')"), 1,
        "once")
    is_(rule("f")["next_run"], query_value(conn, "SELECT mdd._cron_next('0 3 1 1 *', now())"),
        "then it waits for its next time")
    ok(wait_for(lambda: rule("g")["next_run"] > query_value(conn, "SELECT now()"), 10),
       "the missed run of g, whose window is closed, is passed over")
    is_(rule("g")["last_job"], None, "g did not run")
    is_(tiers(cbct["R88F"]), ["archive"], "f archived its patient's CBCT")
    is_(tiers(cbct["R88G"]), ["online"], "g's patient's CBCT is still online")
    bad = query(conn, "SELECT name, last_error FROM mdd.rules WHERE last_error IS NOT NULL "
                      "AND last_error NOT LIKE 'waiting for%%'")
    is_(bad, [], "no rule recorded an error")
finally:
    if conn is not None:
        conn.close()
    cluster("stop", datadir)

done_testing()
