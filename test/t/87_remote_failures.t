#!/usr/bin/python3
# Archive and restore jobs when the remote storage fails under them, for an
# s3 and an http (WebDAV, with basic authentication) storage of the archive
# tier, each on a private server of this test (test/t/lib/peers.py) that is
# killed (kill -9, then the script's stop) and started again on the same
# port and directory:
#
#  1. the server is down before the job starts and never comes back: the
#     job retries (mdd.jobs.attempts, next_attempt_at) and fails with "gave
#     up after 3 attempts", naming the storage and the connection failure;
#     every object stays online with one present copy and reads back.  The
#     copies the job began stay 'writing' until the server is back (their
#     undo deletes blobs); meanwhile other jobs on those objects should not
#     wait for the dead server (a restore of objects that are online);
#  2. the server stops in the middle of an archive job and comes back a few
#     seconds later: the job finishes, every object reads back from the
#     server, whose blobs are exactly the catalog's copies;
#  3. the server stops in the middle and does not come back: the job fails;
#     what was archived before fails to read with class 08 naming the
#     storage (never wrong bytes) and reads back once the server returns;
#     the rest is online and reads back;
#  4. a restore while the server is down fails after retries, the objects
#     stay archived; once it is back a new restore brings them online;
#  5. a target that refuses writes: (a) a capacity for about half the
#     objects: the job fails with 53100 after its retries, what fit is
#     archived (at the granularity of the job's batches: the 'writing'
#     copies of a batch count against the capacity), the rest is online, all
#     read back; (b) made read-only while the job runs, or right after it
#     was queued: the job fails at once saying "read-only", every object
#     reads back, and the copies begun are undone once it is writable again.
# After every case each object has exactly one present copy, and no
# credential of the servers is in a job's error, in mdd.jobs, in the audit
# log, in the PostgreSQL server log or in the servers' logs.
import json
import os
import re
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
from peers import DavPeer, S3Peer  # noqa: E402

test_dir = env("MDD_TEST_DIR")
datadir = env("MDD_DATADIR")
allowed = os.path.join(test_dir, "allowed")
SERVER_LOG = os.path.join(datadir, "server.log")
FINAL = ("done", "failed", "cancelled")
CLASS08 = ("08001", "08006", "08P01")
t_start = time.monotonic()
log_start = os.path.getsize(SERVER_LOG) if os.path.exists(SERVER_LOG) else 0

conn = connect()
qconn = connect(autocommit=False)   # queues jobs and sets their options in one transaction


def server_log(since=None, grep=None, last=40):
    """The last lines of the server log written since offset since (default:
    the start of this test), those matching the regular expression grep
    when given."""
    try:
        with open(SERVER_LOG, "rb") as fh:
            fh.seek(log_start if since is None else since)
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    if grep:
        lines = [l for l in lines if re.search(grep, l)]
    return "\n".join(lines[-last:])


# ---------------------------------------------------------------------------
# jobs


def queue(kind, ids, storage=None, options=None):
    """Queue an archive (to storage) or restore of ids, without related
    objects, or a verify job of storage, with job options set before the
    runners see the job."""
    cur = qconn.cursor()
    try:
        if kind == "archive":
            cur.execute("SELECT mdd.archive(%s, %s, false)", (ids, storage))
        elif kind == "verify":
            cur.execute("SELECT mdd.verify_storage(%s)", (storage,))
        else:
            cur.execute("SELECT mdd.restore(%s, false)", (ids,))
        job = cur.fetchone()[0]
        if options:
            cur.execute("UPDATE mdd.job SET options = options || %s WHERE id = %s", (json.dumps(options), job))
        qconn.commit()
    except Exception:
        qconn.rollback()
        raise
    finally:
        cur.close()
    return job


def job_row(job):
    return query_one(conn, "SELECT * FROM mdd.jobs WHERE id = %s", (job,))


def job_finished_at(job):
    return query_value(conn, "SELECT finished_at FROM mdd.job WHERE id = %s", (job,))


def watch(job, until, timeout, interval=0.02):
    """Poll mdd.jobs until until(row) holds or timeout seconds pass.
    Returns (row, history): history is every distinct (state, done,
    attempts, next_attempt_at is set, error) seen."""
    deadline = time.monotonic() + timeout
    history = []
    while True:
        row = job_row(job)
        seen = (row["state"], row["done"], row["attempts"], row["next_attempt_at"] is not None, row["error"])
        if not history or history[-1] != seen:
            history.append(seen)
        if until(row):
            return row, history
        if time.monotonic() > deadline:
            return None, history
        time.sleep(interval)


def describe_job(job):
    r = job_row(job)
    items = query(conn, "SELECT state, count(*) FROM mdd.job_item WHERE job = %s GROUP BY 1 ORDER BY 1", (job,))
    log = server_log(grep=rf"\bjob {job}\b", last=12)
    return (f"    job {job}: {r['state']} done {r['done']}/{r['total']} failed {r['failed']} "
            f"attempts {r['attempts']} next_attempt_at {r['next_attempt_at']} finished_at {r['finished_at']}\n"
            f"    error: {r['error']}\n    items: {items}\n"
            f"    server log:\n{log}")


def waited(job, want, desc, timeout=90):
    """One test: the job ends in state want within timeout seconds."""
    e = sql_error(conn, "SELECT mdd.wait(%s, %s)", (job, f"{timeout} s"))
    state = job_row(job)["state"]
    return ok(e is None and state == want, desc, f"    {describe_error(e) if e else state}", describe_job(job))


_laps = {}


def lap(what, case):
    """Note how long the previous case of what took."""
    now = time.monotonic()
    if what in _laps:
        note(f"{what} {_laps[what][0]}: {now - _laps[what][1]:.1f} s")
    _laps[what] = (case, now)


def retry_history(history):
    return "\n".join(f"    {h}" for h in history[:30])


# ---------------------------------------------------------------------------
# objects and copies


def import_objects(patient, seed, n):
    src = make_server_dir(os.path.join(allowed, f"p87-{patient.lower()}"), mode=0o755)
    generate_patient(src, patient, seed, slices=1, small=n, extra=("--no-pdf",))
    rows = query_dicts(conn, "SELECT * FROM mdd.import(%s)", (os.path.join(src, "small"),))
    errors = [r for r in rows if r["error"] is not None]
    ids = sorted(r["object_id"] for r in rows if r["object_id"] is not None)
    ok(len(ids) == n and not errors, f"{patient}: {n} small objects imported", str(errors[:3]))
    return ids


sums = {}


def copies(ids):
    """{object: sorted [(storage, state)]} of every copy of ids."""
    out = {i: [] for i in ids}
    for obj, name, state in query(conn, """SELECT c.object, s.name, c.state FROM mdd.copy c
                                           JOIN mdd.storage s ON s.id = c.storage
                                           WHERE c.object = ANY(%s) ORDER BY 1, 2, 3""", (list(ids),)):
        out[obj].append((name, state))
    return out


def placement_problems(expected):
    """expected: {object: storage name}.  Each object must have exactly one
    copy, present, on that storage."""
    got = copies(list(expected))
    bad = [(i, got[i], expected[i]) for i in sorted(expected) if got[i] != [(expected[i], "present")]]
    return [f"    object {i}: copies {g}, expected [({e!r}, 'present')]" for i, g, e in bad[:10]] + \
        ([f"    ... {len(bad)} objects in all"] if len(bad) > 10 else [])


def present_problems(expected):
    """expected: {object: storage name}.  Each object must have exactly one
    present copy, on that storage (other copies may be half done)."""
    got = {i: [c for c in cs if c[1] == "present"] for i, cs in copies(list(expected)).items()}
    bad = [(i, got[i], expected[i]) for i in sorted(expected) if got[i] != [(expected[i], "present")]]
    return [f"    object {i}: present copies {g}, expected [({e!r}, 'present')]" for i, g, e in bad[:10]] + \
        ([f"    ... {len(bad)} objects in all"] if len(bad) > 10 else [])


def half_done_copies(ids):
    return query(conn, """SELECT c.object, s.name, c.state FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                          WHERE c.object = ANY(%s) AND c.state <> 'present' ORDER BY 1""", (list(ids),))


def without_present_copy(ids):
    return query_value(conn, """SELECT coalesce(array_agg(o.id ORDER BY o.id), '{}') FROM unnest(%s::bigint[]) o(id)
                                WHERE NOT EXISTS (SELECT 1 FROM mdd.copy c WHERE c.object = o.id
                                                  AND c.state = 'present')""", (list(ids),))


def read_problems(ids):
    """Objects that do not read back (mdd.read(id, true)) with their
    SHA-256: [] when all do.  One statement, and object by object only to
    find the culprits."""
    ids = list(ids)
    sql = """SELECT o.id FROM unnest(%s::bigint[]) u(oid) JOIN mdd.object o ON o.id = u.oid
             WHERE sha256(mdd.read(o.id, true)) <> o.sha256"""
    if sql_error(conn, sql, (ids,)) is None and not query(conn, sql, (ids,)):
        return []
    problems = []
    for i in ids:
        e = sql_error(conn, "SELECT encode(sha256(mdd.read(%s, true)), 'hex')", (i,))
        if e is not None:
            problems.append(f"    object {i}: {describe_error(e)}")
            continue
        got = query_value(conn, "SELECT encode(sha256(mdd.read(%s, true)), 'hex')", (i,))
        if got != sums[i]:
            problems.append(f"    object {i}: SHA-256 {got}, expected {sums[i]}")
        if len(problems) >= 10:
            break
    return problems


def tiers(ids):
    return dict(query(conn, "SELECT id, tier FROM mdd.objects WHERE id = ANY(%s)", (list(ids),)))


def catalog_locators(storage):
    return set(query_value(conn, """SELECT coalesce(array_agg(c.locator), '{}') FROM mdd.copy c
                                    JOIN mdd.storage s ON s.id = c.storage WHERE s.name = %s""", (storage,)))


def orphan_large_objects():
    return query_value(conn, """SELECT count(*) FROM pg_largeobject_metadata m WHERE NOT EXISTS
                                (SELECT 1 FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                                 WHERE s.kind = 'large_object' AND c.locator = m.oid::text)""")


def wait_undone(job, ids, slack=15):
    """Wait until the job has undone the copies it began (finished_at set,
    no copy of ids left writing or releasing); the undo of a failed job is
    retried with back-off (1, 2, 4 ... s), so wait for its next attempt plus
    slack seconds.  Returns the seconds it took, or None."""
    t0 = time.monotonic()
    due = query_value(conn, "SELECT greatest(0, extract(epoch FROM next_attempt_at - now()))::float8 "
                            "FROM mdd.job WHERE id = %s", (job,)) or 0
    deadline = t0 + due + slack
    while time.monotonic() < deadline:
        if job_finished_at(job) is not None and not half_done_copies(ids):
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def class08_read(oid, name):
    """(whether reading oid fails with class 08 naming the storage name, the error)"""
    e = sql_error(conn, "SELECT mdd.read(%s, true)", (oid,))
    good = (e is not None and e.pgcode in CLASS08
            and f'storage "{name}"' in (e.diag.message_primary or ""))
    return good, describe_error(e)


# ---------------------------------------------------------------------------
# the storages and their servers

peer_root = make_server_dir(os.path.join(test_dir, "peers87"), mode=0o755)
s3 = S3Peer(os.path.join(peer_root, "s3"), bucket="mdd87")
dav = DavPeer(os.path.join(peer_root, "dav"))
CREDENTIALS = s3.credentials() + dav.credentials()

KINDS = [
    # name, kind, peer, where on the server, patient, seed, objects, batch
    dict(name="tap87s3", kind="s3", peer=s3, options=s3.storage_options("tap87"), where="tap87",
         patient="TAP87S", seed=871, n=250, batch=20),
    dict(name="tap87dav", kind="http", peer=dav, options=dav.storage_options("tap87/"), where="tap87/",
         patient="TAP87H", seed=872, n=300, batch=10),
]


def blobs(k):
    return k["peer"].blobs(k["where"])


def start_peer(k):
    if not k["peer"].running():
        k["peer"].start()


def stop_peer(k):
    """kill -9 the server, then its script's stop (see peers.py)"""
    k["peer"].stop(abrupt=True)
    if not ok(not k["peer"].accepts(), f"{k['name']}: its server is stopped (connections are refused)"):
        raise RuntimeError(f"could not stop the server of {k['name']}")


jobs = []   # every job of this test, for the checks of credentials at the end


def run_kind(k):
    name, peer, batch = k["name"], k["peer"], k["batch"]
    what = f"{name} ({k['kind']})"
    start_peer(k)
    e = sql_error(conn, "SELECT mdd.add_storage(%s, %s, 'archive', %s)", (name, k["kind"], json.dumps(k["options"])))
    ok(e is None, f"{what}: storage added, its server on port {peer.port}", describe_error(e))
    ids = import_objects(k["patient"], k["seed"], k["n"])
    sums.update(query(conn, "SELECT id, sha256 FROM mdd.objects WHERE id = ANY(%s)", (ids,)))
    online = {i: "online" for i in ids}
    remote = {i: name for i in ids}
    lo_orphans = orphan_large_objects()

    # -----------------------------------------------------------------------
    # 1. the server is down before the job starts, and stays down

    lap(what, "1")

    stop_peer(k)
    job = queue("archive", ids, name, {"max_attempts": 3, "retry_delay": 0.2})
    jobs.append(job)
    row, hist = watch(job, lambda r: r["state"] in FINAL, timeout=30)
    is_(row and row["state"], "failed", f"{what} 1: the archive job ends failed")
    ok(any(h[0] == "running" and h[2] > 0 and h[3] for h in hist),
       f"{what} 1: while it ran, mdd.jobs showed attempts > 0 and a next_attempt_at", retry_history(hist))
    ok(any(h[2] == 2 for h in hist) and any(h[4] and h[4].startswith("attempt 2 failed, will retry: ") for h in hist),
       f"{what} 1: it went through a second attempt (\"attempt 2 failed, will retry: ...\")", retry_history(hist))
    like(row and row["error"],
         rf'^gave up after 3 attempts: PUT \S+ on storage "{name}" failed: .*'
         r"(Failed to connect|Couldn't connect|[Cc]onnection refused).* \(SQLSTATE 08001\)$",
         f"{what} 1: its error says it gave up after 3 attempts, naming the storage and the connection failure")
    is_((row and row["done"], row and row["bytes"]), (0, 0), f"{what} 1: nothing was moved")
    is_(present_problems(online), [], f"{what} 1: every object still has exactly one present copy, online")
    is_(read_problems(ids), [], f"{what} 1: every object reads back with its SHA-256")
    # The copies the job began are 'writing' rows of the archive storage
    # (no blob: nothing could be written); the runner undoes them, blob
    # and row, and needs the server for that, so they wait for it.
    time.sleep(2)
    left = half_done_copies(ids)
    note(f"{what} 1: 2 s after the failure, {len(left)} copies are left half done while the server is "
         f"down (states {sorted(set(s for _, _, s in left))}); job finished_at {job_finished_at(job)}")
    is_(without_present_copy(ids), [], f"{what} 1: no object is without a present copy while the undo waits")
    is_(sorted(set(s for _, _, s in left)), ["writing"] if left else [],
        f"{what} 1: what waits for the server are only 'writing' copies (never a present one)")
    # Meanwhile the objects are where they were, online: a restore of a few
    # of them has nothing to do and should be done at once.
    other = queue("restore", ids[:3])
    jobs.append(other)
    row, hist = watch(other, lambda r: r["state"] in FINAL, timeout=6)
    ok(row is not None and row["state"] == "done",
       f"{what} 1: while the server is down, a restore of 3 of these objects (online) ends done",
       "    (it waits for the failed job to undo its copies, which needs the dead server)",
       retry_history(hist), describe_job(other))
    start_peer(k)
    took = wait_undone(job, ids)
    ok(took is not None, f"{what} 1: once the server is back the begun copies are undone and the job finishes",
       describe_job(job), str(half_done_copies(ids)[:5]))
    waited(other, "done", f"{what} 1: and the restore of 3 of them is done", timeout=20)
    is_(sorted(blobs(k)), [], f"{what} 1: the server holds no blob")
    is_(placement_problems(online), [], f"{what} 1: every object has exactly one copy, present, online")

    # -----------------------------------------------------------------------
    # 2. stopped in the middle of a job, back a few seconds later

    lap(what, "2")

    job = queue("archive", ids, name, {"batch": batch})
    jobs.append(job)
    row, hist = watch(job, lambda r: r["done"] >= 2 * batch or r["state"] in FINAL, timeout=30, interval=0.005)
    stop_peer(k)
    t_stop = time.monotonic()
    at_stop = job_row(job)
    ok(row is not None and 0 < at_stop["done"] < len(ids) and at_stop["state"] == "running",
       f"{what} 2: the server was stopped in the middle of the job "
       f"({at_stop['done']} of {len(ids)} objects moved)", describe_job(job))
    row, _ = watch(job, lambda r: r["attempts"] > 0 or r["state"] in FINAL, timeout=15)
    ok(row is not None and row["state"] == "running" and row["next_attempt_at"] is not None,
       f"{what} 2: the job waits to retry (attempts {row and row['attempts']})", describe_job(job))
    like(row and row["error"], rf'^attempt \d+ failed, will retry: \w+ \S+ on storage "{name}" failed: .*'
                               r"\(SQLSTATE 08\w{3}\)$",
         f"{what} 2: its error says why, naming the storage")
    time.sleep(max(0.0, 3 - (time.monotonic() - t_stop)))
    start_peer(k)
    waited(job, "done", f"{what} 2: once the server is back the job finishes done")
    r = job_row(job)
    is_((r["done"], r["failed"], r["error"]), (len(ids), 0, None), f"{what} 2: every object moved, no error")
    is_(set(tiers(ids).values()), {"archive"}, f"{what} 2: every object is on the archive tier")
    is_(placement_problems(remote), [], f"{what} 2: each has exactly one copy, present, on {name}")
    is_(read_problems(ids), [], f"{what} 2: every object reads back with its SHA-256 from {name}")
    is_deeply(blobs(k), catalog_locators(name), f"{what} 2: the server holds exactly the catalog's blobs "
                                                "(none missing, no orphan)")
    is_(query(conn, "SELECT object_id, problem FROM mdd.verify(%s)", (name,)), [],
        f"{what} 2: mdd.verify finds every copy good")
    # a fixity job while the server is down waits, then checks every copy
    stop_peer(k)
    vjob = queue("verify", None, name, {"retry_delay": 0.2, "max_attempts": 20})
    row, _ = watch(vjob, lambda r: r["attempts"] > 0 or r["state"] in FINAL, timeout=15)
    ok(row is not None and row["state"] in ("queued", "running") and row["attempts"] > 0
       and "SQLSTATE 08" in (row["error"] or ""),
       f"{what} 2: a verify job while the server is down waits to retry, saying why", describe_job(vjob))
    start_peer(k)
    waited(vjob, "done", f"{what} 2: once the server is back the verify job finishes done")
    r = job_row(vjob)
    is_((r["total"], r["done"], r["failed"]), (len(ids), len(ids), 0),
        f"{what} 2: it checked every copy on {name}, none bad")
    is_(orphan_large_objects(), lo_orphans, f"{what} 2: no large object is left that no copy refers to")

    # -----------------------------------------------------------------------
    # 4. restore while the server is down

    lap(what, "4")

    stop_peer(k)
    job = queue("restore", ids, None, {"max_attempts": 3, "retry_delay": 0.2})
    jobs.append(job)
    row, hist = watch(job, lambda r: r["state"] in FINAL, timeout=30)
    is_(row and row["state"], "failed", f"{what} 4: a restore while the server is down ends failed")
    ok(any(h[0] == "running" and h[2] > 0 and h[3] for h in hist),
       f"{what} 4: after retries (attempts > 0, next_attempt_at seen)", retry_history(hist))
    like(row and row["error"], rf'^gave up after 3 attempts: GET \S+ on storage "{name}" failed: .*'
                               r"\(SQLSTATE 08001\)$",
         f"{what} 4: its error names the storage and the connection failure")
    took = wait_undone(job, ids, slack=5)
    ok(took is not None, f"{what} 4: the failed restore leaves no copy half done", describe_job(job),
       str(half_done_copies(ids)[:5]))
    is_(placement_problems(remote), [], f"{what} 4: every object is still archived, one present copy on {name}")
    is_(orphan_large_objects(), lo_orphans, f"{what} 4: no large object was left behind")
    good, err = class08_read(ids[0], name)
    ok(good, f"{what} 4: reading an archived object meanwhile fails with class 08 naming the storage", err)
    start_peer(k)
    job = queue("restore", ids)
    jobs.append(job)
    waited(job, "done", f"{what} 4: once the server is back a new restore finishes done")
    is_(placement_problems(online), [], f"{what} 4: every object is online, one present copy")
    is_(read_problems(ids), [], f"{what} 4: and reads back with its SHA-256")
    is_(sorted(blobs(k)), [], f"{what} 4: the released blobs are gone from the server")

    # -----------------------------------------------------------------------
    # 3. stopped in the middle, not coming back

    lap(what, "3")

    job = queue("archive", ids, name, {"batch": batch, "max_attempts": 3, "retry_delay": 0.2})
    jobs.append(job)
    row, hist = watch(job, lambda r: r["done"] >= 2 * batch or r["state"] in FINAL, timeout=30, interval=0.005)
    stop_peer(k)
    at_stop = job_row(job)
    # (with retry_delay 0.2 it may have given up already)
    ok(row is not None and 0 < at_stop["done"] < len(ids) and at_stop["state"] != "done",
       f"{what} 3: the server was stopped in the middle of the job "
       f"({at_stop['done']} of {len(ids)} objects moved)", describe_job(job))
    row, hist = watch(job, lambda r: r["state"] in FINAL, timeout=30)
    is_(row and row["state"], "failed", f"{what} 3: the job ends failed")
    like(row and row["error"], rf'^gave up after 3 attempts: \w+ \S+ on storage "{name}" failed: .*'
                               r"\(SQLSTATE 08\w{3}\)$",
         f"{what} 3: its error says it gave up, naming the storage")
    t = tiers(ids)
    moved = sorted(i for i in ids if t[i] == "archive")
    stayed = sorted(i for i in ids if t[i] == "online")
    is_((len(moved), len(moved) + len(stayed)), (row and row["done"], len(ids)),
        f"{what} 3: the objects moved before the stop ({len(moved)}) are archived, the others online")
    is_(without_present_copy(ids), [], f"{what} 3: no object is without a present copy")
    is_(present_problems({i: (name if i in moved else "online") for i in ids}), [],
        f"{what} 3: each object has exactly one present copy, where it is")
    bad = []
    for i in moved:
        good, err = class08_read(i, name)
        if not good:
            bad.append(f"    object {i}: {err}")
    is_(bad[:10], [], f"{what} 3: each archived object fails to read with class 08 naming the storage "
                      "(not wrong bytes) while the server is down")
    is_(read_problems(stayed), [], f"{what} 3: the objects still online read back with their SHA-256")
    start_peer(k)
    is_(read_problems(moved), [], f"{what} 3: once the server is back the archived objects read back")
    took = wait_undone(job, ids)
    ok(took is not None, f"{what} 3: and the copies begun by the failed job are undone", describe_job(job),
       str(half_done_copies(ids)[:5]))
    is_(placement_problems({i: (name if i in moved else "online") for i in ids}), [],
        f"{what} 3: each object has exactly one copy, present, where it is")
    is_deeply(blobs(k), catalog_locators(name), f"{what} 3: the server holds exactly the catalog's blobs")
    job = queue("restore", moved)
    jobs.append(job)
    waited(job, "done", f"{what} 3: they are restored")

    # -----------------------------------------------------------------------
    # 5a. a capacity for about half the objects

    lap(what, "5a")

    sizes = dict(query(conn, "SELECT id, size FROM mdd.objects WHERE id = ANY(%s)", (ids,)))
    capacity = sum(sizes[i] for i in ids[:len(ids) // 2]) + 100
    execute(conn, "SELECT mdd.alter_storage(%s, %s)", (name, json.dumps({"capacity": capacity})))

    # with the default batch (200 objects): the 'writing' copies of a batch
    # count against the capacity (docs/sql.md, Storage), so a batch that
    # does not fit as a whole moves nothing
    job = queue("archive", ids, name, {"max_attempts": 3, "retry_delay": 0.2})
    jobs.append(job)
    row, hist = watch(job, lambda r: r["state"] in FINAL, timeout=60)
    like(row and f"{row['state']}: {row['error']}",
         rf'^failed: gave up after 3 attempts: storage "{name}" is full \(SQLSTATE 53100\)$',
         f"{what} 5a: archiving beyond the capacity in batches of 200 fails: the storage is full (53100)")
    took = wait_undone(job, ids)
    ok(took is not None, f"{what} 5a: the copies begun are undone", describe_job(job))
    t = tiers(ids)
    note(f"{what} 5a: in batches of 200, {sum(1 for i in ids if t[i] == 'archive')} of {len(ids)} objects "
         f"were archived, though {len(ids) // 2} fit in the capacity")
    is_(placement_problems({i: (name if t[i] == "archive" else "online") for i in ids}), [],
        f"{what} 5a: each object has exactly one copy, present, where it is")

    # in batches of a few objects: what fits goes
    job = queue("archive", ids, name, {"batch": batch, "max_attempts": 3, "retry_delay": 0.2})
    jobs.append(job)
    row, hist = watch(job, lambda r: r["state"] in FINAL, timeout=60)
    is_(row and row["state"], "failed", f"{what} 5a: archiving beyond the capacity ends failed")
    ok(any(h[2] > 0 for h in hist), f"{what} 5a: after retries", retry_history(hist))
    like(row and row["error"], rf'^gave up after 3 attempts: storage "{name}" is full \(SQLSTATE 53100\)$',
         f"{what} 5a: its error says the storage is full (53100)")
    took = wait_undone(job, ids)
    ok(took is not None, f"{what} 5a: the copies begun are undone", describe_job(job))
    t = tiers(ids)
    moved = sorted(i for i in ids if t[i] == "archive")
    stayed = sorted(i for i in ids if t[i] == "online")
    ok(0 < len(moved) < len(ids) and sum(sizes[i] for i in moved) <= capacity,
       f"{what} 5a: the objects that fit are archived ({len(moved)} of {len(ids)}, "
       f"{sum(sizes[i] for i in moved)} of {capacity} bytes)")
    is_(placement_problems({i: (name if t[i] == "archive" else "online") for i in ids}), [],
        f"{what} 5a: each object has exactly one copy, present, where it is")
    is_(read_problems(ids), [], f"{what} 5a: every object reads back with its SHA-256")
    is_deeply(blobs(k), catalog_locators(name), f"{what} 5a: the server holds exactly the catalog's blobs")
    execute(conn, "SELECT mdd.alter_storage(%s, '{\"capacity\": null}')", (name,))
    if moved:
        job = queue("restore", moved)
        jobs.append(job)
        waited(job, "done", f"{what} 5a: the archived ones are restored")

    # -----------------------------------------------------------------------
    # 5b. made read-only while the job runs

    lap(what, "5b")

    job = queue("archive", ids, name, {"batch": batch, "max_attempts": 3, "retry_delay": 0.2})
    jobs.append(job)
    row, hist = watch(job, lambda r: r["done"] >= 2 * batch or r["state"] in FINAL, timeout=30, interval=0.005)
    execute(conn, "SELECT mdd.alter_storage(%s, '{\"read_only\": true}')", (name,))
    at_ro = job_row(job)
    ok(row is not None and 0 < at_ro["done"] < len(ids),
       f"{what} 5b: made read-only in the middle of the job ({at_ro['done']} of {len(ids)} moved)",
       describe_job(job))
    row, hist = watch(job, lambda r: r["state"] in FINAL, timeout=30)
    is_(row and row["state"], "failed", f"{what} 5b: the job ends failed")
    like(row and row["error"], rf'(^|objects failed; the first: )storage "{name}" is read-only \(SQLSTATE 25006\)$',
         f"{what} 5b: its error says the storage is read-only (25006)")
    ok(all(h[2] == 0 for h in hist if h[0] == "running"),
       f"{what} 5b: at once, without retrying (read-only is no transient failure)", retry_history(hist))
    t = tiers(ids)
    moved = sorted(i for i in ids if t[i] == "archive")
    is_(without_present_copy(ids), [], f"{what} 5b: no object is without a present copy")
    is_(read_problems(ids), [], f"{what} 5b: every object reads back with its SHA-256")
    # the copies begun cannot be undone on a read-only storage (mdd._delete
    # refuses): they wait, 'writing', until it is writable again
    time.sleep(2)
    left = half_done_copies(ids)
    note(f"{what} 5b: 2 s later, while the storage is read-only, {len(left)} copies are left half done "
         f"(states {sorted(set(s for _, _, s in left))}); job finished_at {job_finished_at(job)}")
    is_(sorted(set(s for _, _, s in left)), ["writing"] if left else [],
        f"{what} 5b: what waits are only 'writing' copies (never a present one)")
    execute(conn, "SELECT mdd.alter_storage(%s, '{\"read_only\": false}')", (name,))
    took = wait_undone(job, ids)
    ok(took is not None, f"{what} 5b: once writable again, no copy is left half done", describe_job(job))
    is_(placement_problems({i: (name if t[i] == "archive" else "online") for i in ids}), [],
        f"{what} 5b: each object has exactly one copy, present, where it is")
    is_deeply(blobs(k), catalog_locators(name), f"{what} 5b: the server holds exactly the catalog's blobs")

    # read-only right after the job was queued, before a runner took it
    rest = sorted(i for i in ids if t[i] == "online")
    cur = qconn.cursor()
    cur.execute("SELECT mdd.archive(%s, %s, false)", (rest, name))
    job = cur.fetchone()[0]
    cur.execute("UPDATE mdd.job SET options = options || '{\"max_attempts\": 3, \"retry_delay\": 0.2}' "
                "WHERE id = %s", (job,))
    cur.execute("SELECT mdd.alter_storage(%s, '{\"read_only\": true}')", (name,))
    qconn.commit()
    cur.close()
    jobs.append(job)
    row, hist = watch(job, lambda r: r["state"] in FINAL, timeout=30)
    is_(row and row["state"], "failed", f"{what} 5b: a job queued before its storage became read-only ends failed")
    like(row and row["error"], rf'(^|objects failed; the first: )storage "{name}" is read-only \(SQLSTATE 25006\)$',
         f"{what} 5b: saying the storage is read-only (25006)")
    is_(row and row["done"], 0, f"{what} 5b: having moved nothing")
    is_(read_problems(ids), [], f"{what} 5b: every object reads back")
    execute(conn, "SELECT mdd.alter_storage(%s, '{\"read_only\": false}')", (name,))
    took = wait_undone(job, ids)
    ok(took is not None, f"{what} 5b: once writable again, no copy is left half done", describe_job(job))
    is_(placement_problems({i: (name if t[i] == "archive" else "online") for i in ids}), [],
        f"{what} 5b: each object has exactly one copy, present, where it was")
    lap(what, "end")

    # leave every object online, as it came
    rest = sorted(i for i, tier in tiers(ids).items() if tier == "archive")
    if rest:
        job = queue("restore", rest)
        jobs.append(job)
        waited(job, "done", f"{what}: at the end the archived objects are restored")
    is_(placement_problems(online), [], f"{what}: every object is online, one present copy")
    is_(sorted(blobs(k)), [], f"{what}: the server holds no blob")


# ---------------------------------------------------------------------------

try:
    for k in KINDS:
        try:
            run_kind(k)
        except Exception as e:   # report, and go on with the other kind
            ok(False, f"{k['name']}: the cases ran to their end", f"    {type(e).__name__}: {e}",
               server_log(last=20))

    # -----------------------------------------------------------------------
    # no credential anywhere

    texts = {
        "mdd.jobs": json.dumps(query_dicts(conn, "SELECT * FROM mdd.jobs WHERE id = ANY(%s)", (jobs,)), default=str),
        "mdd.job (options, errors)": json.dumps(query_dicts(conn, "SELECT * FROM mdd.job WHERE id = ANY(%s)",
                                                            (jobs,)), default=str),
        "mdd.job_item errors": json.dumps(query(conn, "SELECT error FROM mdd.job_item WHERE job = ANY(%s) "
                                                      "AND error IS NOT NULL", (jobs,))),
        "mdd.audit_log": json.dumps(query(conn, "SELECT action, detail FROM mdd.audit_log WHERE detail IS NOT NULL")),
        "the PostgreSQL server log": server_log(since=0, last=10 ** 9),
    }
    for peer in (s3, dav):
        for log, text in peer.logs().items():
            texts[f"{type(peer).__name__} {log}"] = text
    errors_seen = [j["error"] for j in query_dicts(conn, "SELECT error FROM mdd.jobs WHERE id = ANY(%s)", (jobs,))]
    ok(sum(1 for e in errors_seen if e) >= 8, f"{sum(1 for e in errors_seen if e)} jobs have an error to look into")
    for what, text in texts.items():
        is_([c[:6] + "..." for c in CREDENTIALS if c in text], [], f"no credential of the servers in {what}")
    ok(time.monotonic() - t_start < 180, "the test took less than 3 minutes", f"    {time.monotonic() - t_start:.0f} s")
finally:
    for peer in (s3, dav):
        try:
            peer.stop(abrupt=True)
        except Exception as e:
            diag(f"could not stop {type(peer).__name__}: {e}")
    conn.close()
    qconn.close()

done_testing()
