#!/usr/bin/python3
# The HTTP service, with curl as the client, on a private cluster
# (port PGPORT+100, HTTP on PGPORT+101) with three HTTP workers:
#   1. HTTP Basic against PostgreSQL roles: no or wrong credentials, an
#      unknown or NOLOGIN role get 401 with WWW-Authenticate; SCRAM and md5
#      passwords are accepted; a login role outside mdd_reader gets 403;
#   2. static files: / and /web/... with content type, ETag (304 on
#      If-None-Match), Cache-Control; traversal and hidden files refused
#      (403), missing files 404, other methods 405;
#   3. /api/<name>: 404 while mdd.web_api does not exist; then (a test-only
#      mdd.web_api made here) query arguments merged with the JSON body, run
#      as the authenticated role (privileges apply: 403), SQL errors become
#      400/404/500 with their SQLSTATE, and the workers stay up;
#   4. a body over mdd.http_max_body gets 413 (or the connection closed
#      when chunked), nothing runs;
#   5. several workers serve at once on one port; a worker killed by
#      SIGTERM is started again;
#   6. every request is in mdd.audit ('http' / 'http refused', method,
#      path, status, client);
#   7. HTTPS with a certificate made here by openssl (curl --cacert);
#   8. SIGTERM of the postmaster stops everything quickly, even with an
#      HTTP client holding a half-sent request.
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

TIME_LIMIT = 180


def _too_long(signum, frame):
    raise TimeoutError(f"92_http.t still running after {TIME_LIMIT} s")


signal.signal(signal.SIGALRM, _too_long)
signal.alarm(TIME_LIMIT)

test_dir = env("MDD_TEST_DIR")
port = int(env("PGPORT")) + 100
http_port = int(env("PGPORT")) + 101
datadir = os.path.join(test_dir, "http92")
work = make_server_dir(os.path.join(test_dir, "t92"), mode=0o755)
sharedir = subprocess.run(["pg_config", "--sharedir"], capture_output=True, text=True).stdout.strip()
BASE = f"http://127.0.0.1:{http_port}"
READER = ("t92_reader", "reader pass é")
MD5 = ("t92_md5", "md5-pass")
ADMIN = ("t92_admin", "admin-pass")
OUTSIDER = ("t92_outsider", "outsider-pass")
NOLOGIN = ("t92_nologin", "nologin-pass")


def curl(path, auth=READER, method=None, data=None, headers=(), base=BASE, extra=()):
    """(status, headers as a dict of lower-case names, body bytes, curl's exit code)."""
    with tempfile.NamedTemporaryFile(dir=work) as hd, tempfile.NamedTemporaryFile(dir=work) as bd:
        cmd = ["curl", "-s", "--max-time", "20", "-o", bd.name, "-D", hd.name, "-w", "%{http_code}"]
        if auth:
            cmd += ["-u", f"{auth[0]}:{auth[1]}"]
        if method:
            cmd += ["-X", method]
        if data is not None:
            cmd += ["--data-binary", "@-"]
        for h in headers:
            cmd += ["-H", h]
        cmd += list(extra) + [base + path]
        r = subprocess.run(cmd, input=data if data is not None else None, capture_output=True, timeout=30)
        hdrs = {}
        for line in open(hd.name, "rb").read().decode("latin-1").splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        status = int(r.stdout or b"0")
        return status, hdrs, open(bd.name, "rb").read(), r.returncode


def jbody(body):
    try:
        return json.loads(body)
    except ValueError:
        return None


def http_pids(conn):
    return sorted(r[0] for r in query(conn, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'mdd http'"))


def wait_for(cond, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


cluster("start", datadir, str(port), "mdd.dicom_port = 0", "mdd.job_workers = 1",
        f"mdd.http_port = {http_port}", "mdd.http_workers = 3", "mdd.http_max_body = 64")
conn = None
try:
    conn = connect_when_up(port)
    execute(conn, "CREATE EXTENSION mdd")
    for (name, pw), role in ((READER, "mdd_reader"), (ADMIN, "mdd_admin")):
        execute(conn, f"CREATE ROLE {name} LOGIN PASSWORD %s IN ROLE {role}", (pw,))
    execute(conn, f"CREATE ROLE {OUTSIDER[0]} LOGIN PASSWORD %s", (OUTSIDER[1],))
    execute(conn, f"CREATE ROLE {NOLOGIN[0]} NOLOGIN PASSWORD %s IN ROLE mdd_reader", (NOLOGIN[1],))
    execute(conn, "SET password_encryption = 'md5'")
    execute(conn, f"CREATE ROLE {MD5[0]} LOGIN PASSWORD %s IN ROLE mdd_reader", (MD5[1],))
    ok(query_value(conn, "SELECT rolpassword LIKE 'md5%%' FROM pg_authid WHERE rolname = %s", (MD5[0],)),
       "one role has an md5 secret, the others SCRAM")
    ok(wait_for(lambda: curl("/", auth=None)[0] == 401), "the HTTP service answers",
       server_log_tail(datadir))
    ok(wait_for(lambda: len(http_pids(conn)) == 3), "three HTTP workers run", f"    {http_pids(conn)}")

    # 1. authentication
    status, hdrs, body, _ = curl("/", auth=None)
    is_(status, 401, "no credentials: 401")
    like(hdrs.get("www-authenticate", ""), r'^Basic realm="mdd"', "with WWW-Authenticate: Basic")
    is_((jbody(body) or {}).get("sqlstate"), "28000", "and a JSON error with SQLSTATE 28000")
    is_(curl("/", auth=(READER[0], "wrong"))[0], 401, "wrong password: 401")
    is_(curl("/", auth=("t92_nobody", "x"))[0], 401, "unknown role: 401")
    is_(curl("/", auth=NOLOGIN)[0], 401, "NOLOGIN role with the right password: 401")
    is_(curl("/", auth=("", ""))[0], 401, "empty user name: 401")
    status, hdrs, body, _ = curl("/")
    index = open(os.path.join(sharedir, "mdd", "web", "index.html"), "rb").read()
    ok(status == 200 and body == index, "SCRAM password: / serves index.html", f"    got {status}")
    is_(curl("/", auth=MD5)[0], 200, "md5 password: 200")
    status, _, body, _ = curl("/", auth=OUTSIDER)
    is_(status, 403, "a login role outside mdd_reader: 403")
    like(body.decode(), r"not a member of mdd_reader", "saying why")

    # 2. static files
    status, hdrs, body, _ = curl("/web/index.html")
    is_(status, 200, "/web/index.html: 200")
    like(hdrs.get("content-type", ""), r"^text/html; charset=utf-8", "as text/html")
    etag = hdrs.get("etag")
    ok(etag and hdrs.get("last-modified") and hdrs.get("cache-control"),
       "with ETag, Last-Modified and Cache-Control", f"    {hdrs}")
    is_(curl("/web/index.html", headers=[f"If-None-Match: {etag}"])[0], 304, "If-None-Match with its ETag: 304")
    is_(curl("/web/", method=None)[0], 200, "/web/ serves the index too")
    is_(curl("/web/../../../../etc/passwd", extra=["--path-as-is"])[0], 403, "/web/../..: 403")
    is_(curl("/web/%2e%2e/%2e%2e/postgresql.conf", extra=["--path-as-is"])[0], 403, "percent-encoded ..: 403")
    is_(curl("/web//etc/passwd", extra=["--path-as-is"])[0], 403, "an empty path part: 403")
    is_(curl("/web/.hidden")[0], 403, "a hidden file: 403")
    is_(curl("/web/no-such-file.js")[0], 404, "a missing file: 404")
    is_(curl("/no/such/route")[0], 404, "a path no route serves: 404")
    status, hdrs, _, _ = curl("/web/index.html", method="DELETE")
    ok(status == 405 and "GET" in hdrs.get("allow", ""), "DELETE of a static file: 405 with Allow",
       f"    got {status} {hdrs}")
    status, hdrs, body, _ = curl("/web/index.html", extra=["-I"])
    ok(status == 200 and b"<html" not in body and hdrs.get("content-length") == str(len(index)),
       "HEAD: 200, the length of the file, no body", f"    got {status} {hdrs} {body[:80]}")

    # 3. /api
    # without the viewer's mdd.web_api (sql/web_api.sql), taken out of the
    # extension and dropped on this test's own cluster
    execute(conn, """DO $$ BEGIN
        IF to_regprocedure('mdd.web_api(text, jsonb)') IS NOT NULL THEN
            ALTER EXTENSION mdd DROP FUNCTION mdd.web_api(text, jsonb);
            DROP FUNCTION mdd.web_api(text, jsonb);
        END IF; END $$""")
    status, _, body, _ = curl("/api/echo")
    is_(status, 404, "/api without mdd.web_api: 404")
    like(body.decode(), r"mdd\.web_api", "saying the web API is not installed")
    # a test-only web API (the viewer's own is not part of this test)
    execute(conn, """
        CREATE FUNCTION mdd.web_api(name text, params jsonb) RETURNS jsonb
        LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
        BEGIN
            CASE name
            WHEN 'echo' THEN
                RETURN jsonb_build_object('params', params, 'user', current_user);
            WHEN 'audit' THEN
                RETURN (SELECT to_jsonb(count(*)) FROM mdd.audit_log);
            WHEN 'divide' THEN
                RETURN to_jsonb(1 / (params->>'by')::int);
            WHEN 'internal' THEN
                RAISE EXCEPTION 'planted failure' USING ERRCODE = 'XX000';
            WHEN 'sleep' THEN
                PERFORM pg_sleep((params->>'s')::float8);
                RETURN to_jsonb(pg_backend_pid());
            ELSE
                RAISE EXCEPTION 'no API %', name USING ERRCODE = '42704';
            END CASE;
        END $$;
        GRANT EXECUTE ON FUNCTION mdd.web_api(text, jsonb) TO mdd_reader""")
    pids = http_pids(conn)
    status, hdrs, body, _ = curl("/api/echo?a=1&b=two%20words")
    j = jbody(body) or {}
    ok(status == 200 and j.get("params") == {"a": "1", "b": "two words"},
       "GET /api/echo: the query arguments as params", f"    got {status} {body[:200]}")
    is_(j.get("user"), READER[0], "run as the authenticated role")
    like(hdrs.get("content-type", ""), r"^application/json", "answered as application/json")
    status, _, body, _ = curl("/api/echo?a=1&b=x", data=b'{"b": 3, "c": [1, "z"]}',
                              headers=["Content-Type: application/json"])
    is_((jbody(body) or {}).get("params"), {"a": "1", "b": 3, "c": [1, "z"]},
        "POST: the JSON body merged over the arguments")
    status, _, body, _ = curl("/api/echo", data=b"[1, 2]", headers=["Content-Type: application/json"])
    is_(status, 400, "a body that is not a JSON object: 400")
    status, _, body, _ = curl("/api/echo", data=b"{nope", headers=["Content-Type: application/json"])
    ok(status == 400 and (jbody(body) or {}).get("sqlstate") == "22P02", "malformed JSON: 400, SQLSTATE 22P02",
       f"    got {status} {body[:200]}")
    is_(curl("/api/echo", data=b"a=1", headers=["Content-Type: application/x-www-form-urlencoded"])[0], 415,
        "a body that is not application/json: 415")
    status, _, body, _ = curl("/api/divide?by=0")
    ok(status == 400 and (jbody(body) or {}).get("sqlstate") == "22012", "division by zero: 400, SQLSTATE 22012",
       f"    got {status} {body[:200]}")
    is_(curl("/api/divide?by=2")[0], 200, "the same API without the error: 200")
    status, _, body, _ = curl("/api/internal")
    ok(status == 500 and (jbody(body) or {}).get("error") == "planted failure", "an internal error: 500 with its message",
       f"    got {status} {body[:200]}")
    is_(curl("/api/unknown")[0], 404, "an API name mdd.web_api does not know (42704): 404")
    is_(curl("/api/Bad-Name")[0], 404, "a malformed API name: 404")
    status, _, body, _ = curl("/api/audit")
    ok(status == 403 and (jbody(body) or {}).get("sqlstate") == "42501",
       "mdd_reader reading the audit log through the API: 403 (its privileges apply)", f"    got {status} {body[:200]}")
    is_(curl("/api/audit", auth=ADMIN)[0], 200, "mdd_admin: 200")
    is_(http_pids(conn), pids, "the same HTTP workers after every error")

    # 4. bodies over mdd.http_max_body (64 kB)
    big = b'{"x": "' + b"a" * 70000 + b'"}'
    status, _, body, _ = curl("/api/echo", data=big, headers=["Content-Type: application/json"])
    ok(status == 413 and (jbody(body) or {}).get("sqlstate") == "54000", "a 70 kB body: 413",
       f"    got {status} {body[:200]}")
    status, _, _, rc = curl("/api/echo", data=big, headers=["Content-Type: application/json",
                                                            "Transfer-Encoding: chunked"])
    ok(status in (0, 413) and (status == 413 or rc != 0), "the same body chunked: refused, connection closed",
       f"    got {status}, curl exit {rc}")
    is_(curl("/api/echo", data=b'{"x": "' + b"a" * 60000 + b'"}', headers=["Content-Type: application/json"])[0],
        200, "a 60 kB body: 200")

    # 5. several workers at once: three requests of 1 s in parallel
    results = []

    def slow():
        results.append(curl("/api/sleep?s=1"))

    started = time.monotonic()
    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:	# each one in its worker's callback before the next connects
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    took = time.monotonic() - started
    ok(all(r[0] == 200 for r in results), "three slow requests at once: all 200")
    served_by = {jbody(r[2]) for r in results}
    ok(len(served_by) == 3 and served_by <= set(pids), f"served by three different workers {sorted(served_by)}")
    ok(took < 1.9, f"in parallel ({took:.2f} s for 3 x 1 s)")
    victim = pids[0]
    execute(conn, "SELECT pg_terminate_backend(%s)", (victim,))
    ok(wait_for(lambda: len(http_pids(conn)) == 3 and victim not in http_pids(conn)),
       "an HTTP worker stopped by SIGTERM is started again", f"    {http_pids(conn)}")
    is_(curl("/")[0], 200, "and the service goes on")

    # 6. the audit trail
    rows = query_dicts(conn, "SELECT role, action, detail, client FROM mdd.audit WHERE action LIKE 'http%%' ORDER BY id")
    ok(len(rows) >= 40, f"{len(rows)} HTTP requests audited")
    refused = [r for r in rows if r["action"] == "http refused"]
    ok(any(r["detail"] == "GET / -> 401: no credentials" and r["role"] == "postgres" for r in refused),
       "a request without credentials: 'http refused', 401, as the worker's role")
    ok(any(r["detail"].startswith(f'GET / -> 401 (user "{READER[0]}"): password authentication failed')
           for r in refused), "a wrong password: the user name given and why")
    ok(any(r["role"] == OUTSIDER[0] and "-> 403" in r["detail"] for r in refused),
       "a role outside mdd_reader: 'http refused', 403, with its role")
    ok(any(r["role"] == READER[0] and r["action"] == "http" and r["detail"] == "GET /api/echo?a=1&b=two words -> 200"
           for r in rows), "a good request: role, method, path, arguments, status")
    ok(any(r["detail"].startswith("GET /api/divide?by=0 -> 400: division by zero (SQLSTATE 22012)") for r in rows),
       "a failed request: status, message and SQLSTATE")
    ok(any("-> 413" in r["detail"] for r in rows), "a refused body: 413")
    ok(all(r["client"].startswith("127.0.0.1:") for r in rows), "every row names the client address:port")

    # 7. HTTPS with a certificate made here
    cert = os.path.join(work, "cert.pem")
    key = os.path.join(work, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    os.chmod(cert, 0o644)
    os.chmod(key, 0o644)
    execute(conn, "ALTER SYSTEM SET mdd.http_tls_cert_file = %s", (cert,))
    execute(conn, "ALTER SYSTEM SET mdd.http_tls_key_file = %s", (key,))
    execute(conn, "SELECT pg_reload_conf()")
    https = f"https://127.0.0.1:{http_port}"
    ok(wait_for(lambda: curl("/", base=https, extra=["--cacert", cert])[0] == 200),
       "after a reload with a certificate: HTTPS, verified with curl --cacert", server_log_tail(datadir))
    status, _, body, _ = curl("/api/echo?tls=1", base=https, extra=["--cacert", cert])
    ok(status == 200 and (jbody(body) or {}).get("user") == READER[0], "the API over HTTPS as the role")
    is_(curl("/", base=https)[0], 0, "a client that does not trust the certificate gets nothing")
    is_(curl("/")[0], 0, "plain HTTP is no longer served")
    ok(wait_for(lambda: len(http_pids(conn)) == 3), "three HTTP workers again", f"    {http_pids(conn)}")

    # 8. SIGTERM of the postmaster with a half-sent request open and a
    # request whose query would take a minute
    held = socket.create_connection(("127.0.0.1", http_port))
    held.sendall(b"\x16\x03\x01")	# the start of a TLS record, never finished
    long_one = []
    sleeper = threading.Thread(target=lambda: long_one.append(
        curl("/api/sleep?s=60", base=https, extra=["--cacert", cert])))
    sleeper.start()
    ok(wait_for(lambda: query_value(conn, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'mdd http' "
                                          "AND wait_event = 'PgSleep'") == 1),
       "a request sleeping in its handler")
    conn.close()
    conn = None
    pid = int(open(os.path.join(datadir, "postmaster.pid")).readline())
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    stopped = wait_for(lambda: not os.path.exists(os.path.join(datadir, "postmaster.pid")), timeout=30)
    took = time.monotonic() - started
    ok(stopped and took < 5, f"SIGTERM of the postmaster: stopped in {took:.2f} s", server_log_tail(datadir))
    held.close()
    sleeper.join()
    ok(long_one and long_one[0][0] != 200, "the sleeping request was cut")
    log = open(os.path.join(datadir, "server.log"), errors="replace").read()
    unlike(log, r"terminated by signal|PANIC|server process .* was terminated",
           "no HTTP worker crashed in the whole test")
finally:
    if conn is not None:
        conn.close()
    cluster("stop", datadir)
done_testing()
