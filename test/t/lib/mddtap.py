"""Small TAP producer and database helpers for mdd's integration tests.

The tests in test/t are Python scripts run by prove(1).  They print TAP on
standard output ("1..N", "ok N - ...", "not ok N - ...") and diagnostics as
"# ..." lines: failures on standard error, notes on standard output, as
Test::More does.  The exit status is the number of failed tests (at most
254), 255 when the script died.

test/run exports what the tests need:

  PGHOST PGPORT PGUSER PGDATABASE   the private cluster, mdd installed
  MDD_TEST_DIR      work directory; MDD_TEST_DIR/allowed is in
                    mdd.allowed_paths (server-writable), MDD_TEST_DIR/outside
                    is not
  MDD_PYDICOM_DIR   pydicom's test_files directory, also allowed
  MDD_TOP           the repository
  MDD_DATADIR       the cluster's data directory
"""

import atexit
import hashlib
import os
import re
import shutil
import subprocess
import sys
import traceback

import psycopg2
import psycopg2.extensions

__all__ = [
    "todo",
    "plan", "ok", "is_", "isnt", "like", "unlike", "is_deeply", "diag", "note",
    "skip", "skip_all", "bail_out", "done_testing", "failed_count",
    "connect", "query", "query_one", "query_value", "execute", "sql_error",
    "raises", "describe_error", "query_dicts", "env", "generate_patient", "make_server_dir", "sha256_file",
    "sha256_bytes", "DBError", "cluster", "connect_when_up", "server_log_tail", "lo_compression",
]

DBError = psycopg2.Error

# --------------------------------------------------------------------------
# TAP


class _State:
    planned = None          # number of tests announced by plan()
    run = 0                 # tests run so far
    failed = 0
    done = False            # done_testing() or skip_all() printed a plan
    died = False


_state = _State()


def _out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _err(line):
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _comment(text):
    return "\n".join("# " + l if l else "#" for l in str(text).split("\n"))


def plan(n):
    """Announce the number of tests (call before the first test)."""
    _state.planned = n
    _out(f"1..{n}")


def diag(*msgs):
    """Diagnostic message on standard error (shown by prove without -v)."""
    for m in msgs:
        _err(_comment(m))


def note(*msgs):
    """Diagnostic message on standard output (shown by prove -v)."""
    for m in msgs:
        _out(_comment(m))


def _clean(desc):
    return str(desc).replace("\n", " ").replace("#", "\\#")


def ok(cond, desc="", *diagnostics):
    """One test: passes when cond is true.  Returns bool(cond)."""
    _state.run += 1
    cond = bool(cond)
    todo = getattr(_state, "todo", None)
    suffix = f" # TODO {_clean(todo)}" if todo else ""
    _out(f"{'ok' if cond else 'not ok'} {_state.run} - {_clean(desc)}{suffix}")
    if not cond and not todo:
        _state.failed += 1
        where = ""
        for frame in reversed(traceback.extract_stack()[:-1]):
            if os.path.basename(frame.filename) != "mddtap.py":
                where = f" at {frame.filename} line {frame.lineno}"
                break
        diag(f"  Failed test '{desc}'{where}.")
        for d in diagnostics:
            if d is not None and d != "":
                diag(d)
    return cond


def todo(reason):
    """Mark the following tests as TODO (known, documented failures) until
    todo(None); TAP harnesses report them without failing the run."""
    _state.todo = reason


def is_(got, expected, desc=""):
    """got == expected."""
    return ok(got == expected, desc,
              f"         got: {got!r}\n    expected: {expected!r}")


def isnt(got, unexpected, desc=""):
    """got != unexpected."""
    return ok(got != unexpected, desc,
              f"         got: {got!r}\n    expected: anything else")


def like(got, pattern, desc=""):
    """got (a string) matches the regular expression pattern (re.search)."""
    matched = got is not None and re.search(pattern, str(got)) is not None
    return ok(matched, desc, f"    {got!r}\n    doesn't match {pattern!r}")


def unlike(got, pattern, desc=""):
    """got does not match pattern."""
    matched = got is not None and re.search(pattern, str(got)) is not None
    return ok(not matched, desc, f"    {got!r}\n    matches {pattern!r}")


def is_deeply(got, expected, desc="", limit=20):
    """Structural equality; on failure lists the first differences."""
    if got == expected:
        return ok(True, desc)
    lines = []
    if isinstance(got, (set, frozenset)) and isinstance(expected, (set, frozenset)):
        missing = sorted(expected - got, key=repr)
        extra = sorted(got - expected, key=repr)
        lines += [f"    missing: {m!r}" for m in missing[:limit]]
        lines += [f"    unexpected: {e!r}" for e in extra[:limit]]
        if len(missing) > limit or len(extra) > limit:
            lines.append(f"    ({len(missing)} missing, {len(extra)} unexpected in all)")
    elif isinstance(got, dict) and isinstance(expected, dict):
        for k in sorted(set(got) | set(expected), key=repr):
            if got.get(k, "<absent>") != expected.get(k, "<absent>"):
                lines.append(f"    [{k!r}] got {got.get(k, '<absent>')!r}, "
                             f"expected {expected.get(k, '<absent>')!r}")
                if len(lines) >= limit:
                    lines.append("    ...")
                    break
    elif isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        if len(got) != len(expected):
            lines.append(f"    length {len(got)}, expected {len(expected)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            if g != e:
                lines.append(f"    [{i}] got {g!r}, expected {e!r}")
                if len(lines) >= limit:
                    lines.append("    ...")
                    break
    else:
        lines.append(f"         got: {got!r}\n    expected: {expected!r}")
    return ok(False, desc, "\n".join(lines))


def skip(why, count=1):
    """Record count skipped tests."""
    for _ in range(count):
        _state.run += 1
        _out(f"ok {_state.run} # skip {_clean(why)}")


def skip_all(why):
    """Skip the whole script (before any test) and exit."""
    _out(f"1..0 # SKIP {_clean(why)}")
    _state.done = True
    sys.exit(0)


def bail_out(why):
    """Stop the whole test run."""
    _out(f"Bail out!  {_clean(why)}")
    _state.done = True
    sys.exit(255)


def done_testing(n=None):
    """Print the plan at the end (when plan() was not called)."""
    if n is not None and n != _state.run:
        ok(False, "planned number of tests", f"ran {_state.run}, expected {n}")
    if _state.planned is None:
        _out(f"1..{_state.run}")
    _state.done = True


def failed_count():
    return _state.failed


def _finish():
    if _state.died:
        return
    if _state.planned is None and not _state.done:
        diag("Tests were run but no plan was declared and done_testing() was not seen.")
        os._exit(255)
    if _state.planned is not None and _state.planned != _state.run:
        diag(f"Looks like you planned {_state.planned} tests but ran {_state.run}.")
        os._exit(255)
    if _state.failed:
        diag(f"Looks like you failed {_state.failed} test(s) of {_state.run}.")
        sys.stdout.flush()
        os._exit(min(_state.failed, 254))


def _excepthook(etype, value, tb):
    _state.died = True
    text = "".join(traceback.format_exception(etype, value, tb))
    diag("The test script died:", text.rstrip())
    if _state.planned is None:
        _out(f"1..{_state.run}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(255)


atexit.register(_finish)
sys.excepthook = _excepthook

# --------------------------------------------------------------------------
# environment and files


def env(name):
    """An environment variable test/run exports; skip the test when it lacks."""
    value = os.environ.get(name)
    if not value:
        skip_all(f"{name} is not set (run the tests through test/run)")
    return value


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_server_dir(path, fresh=True, mode=0o777):
    """Create a directory the server (user postgres) may read and write.

    Tests run as root while the server runs as postgres, so directories the
    server writes into are world-writable.  With fresh, what a previous run
    left there is removed first.
    """
    if fresh and os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)
    return path


def _world_readable(top):
    for root, dirs, files in os.walk(top):
        os.chmod(root, os.stat(root).st_mode | 0o555)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode | 0o444)


def generate_patient(out, patient_id, seed, slices=20, small=0, extra=()):
    """Run scripts/generate_patient.py into out (made readable by the server);
    returns the parsed manifest.json."""
    import json
    top = os.environ.get("MDD_TOP") or os.path.normpath(
        os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    cmd = ["/usr/bin/python3", os.path.join(top, "scripts", "generate_patient.py"),
           "--out", out, "--slices", str(slices), "--seed", str(seed),
           "--patient-id", patient_id, "--small", str(small), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    _world_readable(out)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as fh:
        return json.load(fh)

# --------------------------------------------------------------------------
# database


def cluster(*args):
    """scripts/cluster.sh with these arguments (start DATADIR PORT settings...,
    stop DATADIR): the private clusters of tests that restart their server."""
    top = os.environ.get("MDD_TOP") or os.path.normpath(
        os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    subprocess.run([os.path.join(top, "scripts", "cluster.sh"), *args], check=True,
                   stdout=subprocess.DEVNULL, timeout=120)


def connect_when_up(port, timeout=60):
    """A connection to the cluster on port, once it accepts connections."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(port=port)
        except psycopg2.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def server_log_tail(datadir, n=30):
    """The last n lines of a private cluster's server.log ('' if none)."""
    try:
        with open(os.path.join(datadir, "server.log"), errors="replace") as fh:
            return "".join(fh.readlines()[-n:])
    except OSError:
        return ""


def connect(user=None, autocommit=True, **kw):
    """A psycopg2 connection to the test cluster (PGHOST, PGPORT, PGUSER,
    PGDATABASE), as user when given."""
    args = dict(host=os.environ.get("PGHOST", "127.0.0.1"),
                port=os.environ.get("PGPORT", "5432"),
                user=user or os.environ.get("PGUSER", "postgres"),
                dbname=os.environ.get("PGDATABASE", "postgres"),
                application_name=os.path.basename(sys.argv[0]))
    args.update(kw)
    conn = psycopg2.connect(**args)
    conn.autocommit = autocommit
    return conn


def _run(conn, sql, params):
    cur = conn.cursor()
    cur.execute(sql, params)
    return cur


def query(conn, sql, params=None):
    """All rows of a query, as a list of tuples."""
    cur = _run(conn, sql, params)
    rows = cur.fetchall() if cur.description else []
    cur.close()
    return rows


def query_dicts(conn, sql, params=None):
    """All rows of a query, as a list of dicts."""
    cur = _run(conn, sql, params)
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, r)) for r in cur.fetchall()]
    cur.close()
    return rows


def query_one(conn, sql, params=None):
    """The only row of a query as a dict (None when there is no row)."""
    rows = query_dicts(conn, sql, params)
    if len(rows) > 1:
        raise AssertionError(f"query returned {len(rows)} rows: {sql}")
    return rows[0] if rows else None


def query_value(conn, sql, params=None):
    """The first column of the only row of a query."""
    rows = query(conn, sql, params)
    if len(rows) != 1:
        raise AssertionError(f"query returned {len(rows)} rows: {sql}")
    return rows[0][0]


def execute(conn, sql, params=None):
    """Run a statement; returns the cursor's rowcount."""
    cur = _run(conn, sql, params)
    n = cur.rowcount
    cur.close()
    return n


def lo_compression(conn, object_ids):
    """How the compressed chunks (pg_largeobject rows) of the large-object
    copies of these objects are compressed: the sorted distinct methods
    ("lz4", "pglz"); chunks stored as they are do not count."""
    return [r[0] for r in query(conn, """
        SELECT DISTINCT pg_catalog.pg_column_compression(l.data) AS method
        FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
             JOIN pg_catalog.pg_largeobject l ON l.loid = c.locator::oid
        WHERE c.object = ANY(%s) AND s.kind = 'large_object'
          AND pg_catalog.pg_column_compression(l.data) IS NOT NULL
        ORDER BY method""", (list(object_ids),))]


def sql_error(conn, sql, params=None):
    """Run a statement that may fail.  Returns None when it succeeded, else
    the psycopg2 error (with .pgcode, .pgerror and .diag).  Outside autocommit
    the statement runs under a savepoint, so the transaction stays usable."""
    in_tx = not conn.autocommit
    cur = conn.cursor()
    try:
        if in_tx:
            cur.execute("SAVEPOINT mddtap_sql_error")
        cur.execute(sql, params)
        if cur.description:
            cur.fetchall()
        if in_tx:
            cur.execute("RELEASE SAVEPOINT mddtap_sql_error")
        return None
    except psycopg2.Error as e:
        if in_tx:
            conn.cursor().execute("ROLLBACK TO SAVEPOINT mddtap_sql_error")
        return e
    finally:
        cur.close()


def describe_error(e):
    if e is None:
        return "no error"
    parts = [f"SQLSTATE {e.pgcode}: {(e.diag.message_primary or str(e)).strip()}"]
    if e.diag.message_detail:
        parts.append(f"DETAIL: {e.diag.message_detail}")
    return " ".join(parts)


def raises(conn, sql, params, sqlstates, desc, message=None):
    """One test: the statement fails with one of sqlstates (a string or a
    tuple), and its message matches the regular expression message when
    given.  Returns the error (or None)."""
    if isinstance(sqlstates, str):
        sqlstates = (sqlstates,)
    e = sql_error(conn, sql, params)
    good = e is not None and e.pgcode in sqlstates
    text = "" if e is None else (e.diag.message_primary or "")
    if good and message is not None:
        good = re.search(message, text) is not None
    ok(good, desc,
       f"    got: {describe_error(e)}\n    expected: SQLSTATE {' or '.join(sqlstates)}"
       + (f" with a message matching {message!r}" if message else ""))
    return e
