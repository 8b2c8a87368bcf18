#!/usr/bin/python3
# No data loss when the server dies in the middle of archive and restore
# jobs.  On a private cluster holding 1,000+ objects, jobs move everything
# between the online large objects and a file storage of the archive tier,
# back and forth, and at a random moment of each the server is killed:
# `pg_ctl stop -m immediate`, or kill -9 of a job runner (the postmaster
# then restarts every process).  After each restart, before the job ends:
# every object reads back with its original SHA-256, and every present copy
# is good.  Then the job finishes by itself, and no copy is left writing or
# releasing, no blob and no large object exists that the catalog does not
# know, each object is on the tier the job moved it to.
import glob
import os
import random
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

ROUNDS = int(os.environ.get("MDD_CRASH_ROUNDS", "20"))
test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
port = int(env("PGPORT")) + 86
datadir = os.path.join(test_dir, "crash86")
src = make_server_dir(os.path.join(test_dir, "allowed", "p86"), mode=0o755)
vault = make_server_dir(os.path.join(test_dir, "allowed", "vault86"))
rng = random.Random(86)
bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()


def as_postgres(*cmd):
    pre = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    return subprocess.run(pre + list(cmd), capture_output=True, text=True, timeout=120)


generate_patient(src, "TAP86", 86, slices=20, small=1000)
cluster("start", datadir, str(port), "mdd.dicom_port = 0", "mdd.job_workers = 2",
        f"mdd.allowed_paths = '{test_dir}/allowed'", "restart_after_crash = on")
conn = None
try:
    conn = connect_when_up(port)
    execute(conn, "CREATE EXTENSION mdd")
    execute(conn, "SELECT count(*) FROM mdd.import(%s)", (src,))
    execute(conn, "SELECT mdd.add_storage('vault', 'file', 'archive', %s)", (f'{{"root": "{vault}"}}',))
    sums = dict(query(conn, "SELECT id, sha256 FROM mdd.objects"))
    ids = sorted(sums)
    ok(len(ids) >= 1000, f"{len(ids)} objects to move around")

    def run(kind):
        if kind == "archive":
            return query_value(conn, "SELECT mdd.archive(%s, 'vault', false)", (ids,))
        return query_value(conn, "SELECT mdd.restore(%s, false)", (ids,))

    # how long a job takes undisturbed, to kill at random points within it
    took = {}
    for kind in ("archive", "restore"):
        t0 = time.monotonic()
        job = run(kind)
        is_(query_value(conn, "SELECT mdd.wait(%s, '300 s')", (job,)), "done", f"an undisturbed {kind} is done")
        took[kind] = time.monotonic() - t0
    diag(f"undisturbed: archive {took['archive']:.1f} s, restore {took['restore']:.1f} s")

    def problems_now():
        """What is wrong right after a restart (the job not finished)."""
        found = []
        bad = [i for i, s in query(conn, "SELECT id, encode(sha256(mdd.read(id, true)), 'hex') "
                                         "FROM mdd.objects") if s != sums[i]]
        if bad:
            found.append(f"objects reading back wrong: {bad[:5]}")
        lost = query_value(conn, """SELECT count(*) FROM mdd.object o WHERE NOT EXISTS
                                    (SELECT 1 FROM mdd.copy c WHERE c.object = o.id AND c.state = 'present')""")
        if lost:
            found.append(f"{lost} objects without a present copy")
        wrong_tier = query(conn, """SELECT o.id, o.tier FROM mdd.object o
                                     WHERE (o.tier = 'online') <> EXISTS
                                       (SELECT 1 FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                                        WHERE c.object = o.id AND c.state = 'present' AND s.tier = 'online')""")
        if wrong_tier:
            found.append(f"objects whose tier is not where their present copies are: {wrong_tier[:5]}")
        for storage in ("online", "vault"):
            bad = query(conn, "SELECT object_id, problem FROM mdd.verify(%s)", (storage,))
            if bad:
                found.append(f"bad present copies on {storage}: {bad[:3]}")
                found.append("their copies and job items: " + str(query(
                    conn, """SELECT c.object, s.name, c.state, c.created_at,
                                    (SELECT array_agg(i.job || ':' || i.state) FROM mdd.job_item i
                                     WHERE i.object = c.object)
                             FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                             WHERE c.object = ANY(%s) ORDER BY 1, 2""", ([b[0] for b in bad[:3]],))))
        return found

    def leftovers():
        """What must be gone once the job ended and recovery ran."""
        found = []
        half = query(conn, "SELECT object, storage, state FROM mdd.copy WHERE state <> 'present'")
        if half:
            found.append(f"copies left half done: {half[:5]}")
        on_disk = sorted(os.path.relpath(p, vault) for p in glob.glob(os.path.join(vault, "**", "*"),
                                                                     recursive=True)
                         if os.path.isfile(p))
        known = sorted(query_value(conn, """SELECT coalesce(array_agg(c.locator), '{}') FROM mdd.copy c
                                            JOIN mdd.storage s ON s.id = c.storage WHERE s.name = 'vault'"""))
        if on_disk != known:
            found.append(f"vault files not in the catalog: {sorted(set(on_disk) - set(known))[:5]}, "
                         f"catalog copies without a file: {sorted(set(known) - set(on_disk))[:5]}")
        orphans = query_value(conn, """SELECT count(*) FROM pg_largeobject_metadata m WHERE NOT EXISTS
                                       (SELECT 1 FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                                        WHERE s.kind = 'large_object' AND c.locator = m.oid::text)""")
        if orphans:
            found.append(f"{orphans} large objects no copy refers to")
        return found

    kills = {"immediate": 0, "kill -9 runner": 0}
    for rnd in range(ROUNDS):
        kind = "archive" if rnd % 2 == 0 else "restore"
        job = run(kind)
        delay = rng.uniform(0.05, max(0.1, took[kind] * 0.9))
        time.sleep(delay)
        how = "immediate" if rnd % 4 < 2 else "kill -9 runner"
        state_before = query_value(conn, "SELECT state FROM mdd.job WHERE id = %s", (job,))
        if how == "immediate":
            conn.close()
            as_postgres(os.path.join(bindir, "pg_ctl"), "-D", datadir, "-m", "immediate", "stop")
            cluster("start", datadir, str(port))
        else:
            pids = [r[0] for r in query(conn, """SELECT pid FROM pg_stat_activity
                                                 WHERE backend_type = 'mdd job runner'""")]
            conn.close()
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
            time.sleep(0.5)  # the postmaster restarts everything
        kills[how] += 1
        conn = connect_when_up(port)
        found = problems_now()
        ok(found == [], f"round {rnd + 1}: {kind} killed by {how} after {delay:.2f} s (job was {state_before}): "
                        "every object reads back right at once", *found, server_log_tail(datadir) if found else "")
        final = query_value(conn, "SELECT mdd.wait(%s, '300 s')", (job,))
        ok(final == "done", f"round {rnd + 1}: the job finishes after the restart",
           str(query_one(conn, "SELECT * FROM mdd.jobs WHERE id = %s", (job,))))
        found = leftovers()
        tier = "archive" if kind == "archive" else "online"
        wrong = query_value(conn, "SELECT count(*) FROM mdd.objects WHERE tier <> %s", (tier,))
        if wrong:
            found.append(f"{wrong} objects not on the {tier} tier")
        ok(found == [], f"round {rnd + 1}: nothing left behind, every object {tier}", *found)
    diag(f"kills: {kills}")
    is_(problems_now(), [], "at the end every object reads back with its original SHA-256")
finally:
    if conn is not None:
        conn.close()
    cluster("stop", datadir)

done_testing()
