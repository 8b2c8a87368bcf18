#!/usr/bin/python3
# The DICOM service of the background workers, driven by DCMTK's own tools
# (echoscu, storescu, storescp, dcmdump) over 127.0.0.1 (TCP_NODELAY=1):
#   1. the launcher and its mdd.dicom_workers listener backends;
#   2. who may associate: an unknown AE title, a wrong called AE title, a
#      node registered for another host, mdd.accept_unknown_nodes changed at
#      run time, each with its audit row;
#   3. C-STORE of a whole generated patient: every instance archived with
#      source 'dicom:AE', the data set kept byte for byte behind mdd's own
#      file meta header, readable by pydicom and dcmdump, mdd.related across
#      objects received by network, large-object chunks in lz4;
#   4. the same instance again (success, no new object); the same SOP
#      Instance UID with other content (status 0x0111, the first version kept);
#   5. a node without store permission (status 0x0124, nothing stored);
#   6. three storescu at once, their associations overlapping;
#   7. mdd.echo as SCU against a storescp, a closed port, itself, an unknown
#      node;
#   8. on a cluster of its own: a listener killed with SIGTERM is started
#      again, one killed with SIGKILL brings crash recovery and everything
#      back; pg_ctl stop -m fast is not held up by a peer that is silent, idle
#      in an association, stalled in the middle of a C-STORE or in the middle
#      of its association request (raw PDUs);
#   9. on another: a DICOM port already taken leaves the server up with the
#      service off and no listener.
import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403

warnings.simplefilter("ignore")
import pydicom  # noqa: E402

test_dir = env("MDD_TEST_DIR")
top = env("MDD_TOP")
datadir = env("MDD_DATADIR")
DICOM_PORT = int(env("MDD_DICOM_PORT"))
HOST = "127.0.0.1"
SLICES = 20
# planning CT, CBCT (40 slices, fixed by the generator), RTSTRUCT, RTPLAN, RTDOSE
INSTANCES = SLICES + 40 + 3

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
started = time.monotonic()

# ---------------------------------------------------------------------------
# helpers


def run(cmd, timeout=120):
    """Run a DCMTK tool; returns (exit status, stdout + stderr)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       env=DCMTK_ENV, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def echoscu(calling, called="MDD", port=DICOM_PORT):
    return run(["echoscu", "-v", "-aet", calling, "-aec", called, HOST, str(port)], timeout=60)


def storescu_cmd(calling, paths, port=DICOM_PORT, extra=()):
    cmd = ["storescu", "-v", "-aet", calling, "-aec", "MDD", *extra]
    if any(os.path.isdir(p) for p in paths):
        cmd += ["+sd", "+r", "+sp", "*.dcm"]     # skip document.pdf and manifest.json
    return cmd + [HOST, str(port), *paths]


def storescu(calling, paths, port=DICOM_PORT, extra=()):
    return run(storescu_cmd(calling, paths, port, extra))


def wait_for(fn, timeout, interval=0.1):
    """Call fn until it returns something true or timeout seconds passed;
    returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def audit_since(conn, mark, client_like, action=None):
    rows = query_dicts(conn, """SELECT action, detail, client, object_id FROM mdd.audit_log
                                WHERE at >= %s AND client LIKE %s
                                  AND (%s::text IS NULL OR action = %s) ORDER BY at""",
                       (mark, client_like, action, action))
    return rows


def now(conn):
    return query_value(conn, "SELECT clock_timestamp()")


def split_part10(data):
    """(file meta part, data set part) of a Part 10 file: preamble, DICM and
    group 0002, whose length (0002,0000) gives."""
    if len(data) < 144 or data[128:132] != b"DICM":
        raise ValueError("no DICM prefix")
    group, element = struct.unpack("<HH", data[132:136])
    if (group, element) != (2, 0) or data[136:138] != b"UL" or data[138:140] != b"\x04\x00":
        raise ValueError("the meta group does not start with (0002,0000) UL")
    end = 144 + struct.unpack("<I", data[140:144])[0]
    return data[:end], data[end:]


def workers(conn):
    return query_dicts(conn, """SELECT pid, backend_type, application_name, state, query
                                FROM pg_stat_activity
                                WHERE backend_type IN ('mdd launcher', 'mdd dicom listener')
                                ORDER BY application_name""")


def listeners_of(rows):
    return {r["application_name"]: r["pid"] for r in rows
            if r["backend_type"] == "mdd dicom listener"}


def expected_listeners(n):
    return {f"mdd dicom listener {i}" for i in range(1, n + 1)}


def service_up(conn_fn, n):
    """The workers as pg_stat_activity shows them, once one launcher and n
    listeners run (else None)."""
    def probe():
        try:
            c = conn_fn()
            try:
                rows = workers(c)
            finally:
                c.close()
        except DBError:
            return None
        launchers = [r for r in rows if r["backend_type"] == "mdd launcher"]
        if len(launchers) == 1 and set(listeners_of(rows)) == expected_listeners(n) \
                and len(rows) == n + 1:
            return rows
        return None
    return probe


# --- a raw A-ASSOCIATE-RQ (PS3.8 9.3.2), to hold an association open


def _item(kind, payload):
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def associate_rq(calling, called, abstract=VERIFICATION, transfer=IMPLICIT_LE):
    """An A-ASSOCIATE-RQ PDU proposing one presentation context (id 1),
    by default Verification in implicit VR little endian."""
    app = _item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract.encode())
               + _item(0x40, transfer.encode()))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384))
                 + _item(0x52, b"1.2.826.0.1.3680043.10.1379.99"))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
            + bytes(32) + app + pc + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def p_data(control, data, context=1):
    """A P-DATA-TF PDU with one PDV: control 0x03 = last command fragment,
    0x02 = last data fragment, 0x00 = a data fragment with more to come."""
    pdv = struct.pack(">IBB", len(data) + 2, context, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def c_store_rq(sop_class, sop_instance, message_id=1):
    """The command set of a C-STORE-RQ, implicit VR little endian (PS3.7 9.3.1.1)."""
    def el(element, value):
        if isinstance(value, str):
            value = value.encode()
            if len(value) % 2:
                value += b"\0"
        return struct.pack("<HHI", 0, element, len(value)) + value
    body = (el(0x0002, sop_class) + el(0x0100, struct.pack("<H", 0x0001))
            + el(0x0110, struct.pack("<H", message_id)) + el(0x0700, struct.pack("<H", 0))
            + el(0x0800, struct.pack("<H", 0x0000)) + el(0x1000, sop_instance))
    return el(0x0000, struct.pack("<I", len(body))) + body


def raw_associate(port, calling, called="MDD", timeout=10, **proposal):
    """Open an association and leave it idle.  Returns (socket, PDU type of
    the answer: 2 = A-ASSOCIATE-AC, 3 = A-ASSOCIATE-RJ, and whether the
    Verification context was accepted)."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(associate_rq(calling, called, **proposal))
    kind, _, length = struct.unpack(">BBI", recv_exactly(s, 6))
    body = recv_exactly(s, length)
    accepted = False
    if kind == 0x02:
        i = 68
        while i + 4 <= len(body):
            t, _, ln = struct.unpack(">BBH", body[i:i + 4])
            if t == 0x21:
                accepted = body[i + 6] == 0
            i += 4 + ln
    return s, kind, accepted


# --- clusters of this test


clusters = []


def start_cluster(name, *settings):
    """initdb and start a cluster of this test; returns (data directory, port)."""
    d = os.path.join(test_dir, f"t50-{name}", "pgdata")
    make_server_dir(os.path.dirname(d), mode=0o755)
    port = free_port()
    clusters.append(d)
    subprocess.run([os.path.join(top, "scripts", "cluster.sh"), "start", d, str(port),
                    "shared_buffers = 32MB", "max_wal_size = 256MB", *settings],
                   check=True, stdout=subprocess.DEVNULL)
    return d, port


def stop_cluster(d):
    subprocess.run([os.path.join(top, "scripts", "cluster.sh"), "stop", d],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pg_bindir():
    try:
        d = subprocess.run(["pg_config", "--bindir"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, check=True).stdout.decode().strip()
        if os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    except (OSError, subprocess.CalledProcessError):
        pass
    return "/usr/lib/postgresql/15/bin"


def stop_timed(d, peers, limit):
    """pg_ctl stop -m fast; returns the seconds it took, or None when it was
    still running after limit + 1 s (the peers' sockets are then closed, which
    lets it finish)."""
    p = subprocess.Popen(["runuser", "-u", "postgres", "--", os.path.join(pg_bindir(), "pg_ctl"),
                          "-D", d, "-m", "fast", "-w", "-t", "120", "stop"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(p)
    t0 = time.monotonic()
    try:
        p.wait(timeout=limit + 1)
        took = time.monotonic() - t0
    except subprocess.TimeoutExpired:
        took = None
    for s in peers:
        s.close()
    p.wait(timeout=120)
    return took


def server_log(d):
    with open(os.path.join(d, "server.log"), encoding="utf-8", errors="replace") as fh:
        return fh.read()


processes = []


def cleanup():
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()
    for d in clusters:
        stop_cluster(d)


conn = connect()
try:
    # =======================================================================
    # 1. the workers

    rows = wait_for(service_up(connect, 4), 20)
    ok(rows, "one 'mdd launcher' and 4 'mdd dicom listener' backends run (mdd.dicom_workers)",
       f"    {workers(conn)}")
    is_(query_value(conn, "SHOW mdd.dicom_workers"), "4", "mdd.dicom_workers is 4 (the default)")
    rows = rows or workers(conn)
    is_deeply(sorted(r["application_name"] for r in rows
                     if r["backend_type"] == "mdd dicom listener"),
              sorted(expected_listeners(4)),
              "the listeners' application_name is 'mdd dicom listener N', N = 1..4")
    is_([r["application_name"] for r in rows if r["backend_type"] == "mdd launcher"],
        ["mdd launcher"], "the launcher's application_name is 'mdd launcher'")

    # =======================================================================
    # 2. who may associate

    mark = now(conn)
    rc, out = echoscu("T50UNKNOWN")
    isnt(rc, 0, "echoscu from an unknown AE title fails")
    like(out, r"Association Rejected", "the association is rejected", )
    like(out, r"Calling AE Title Not Recognized", "with reason: calling AE title not recognized")
    audit = audit_since(conn, mark, "T50UNKNOWN@%")
    is_deeply([(a["action"], a["client"]) for a in audit], [("refuse", "T50UNKNOWN@127.0.0.1")],
              "one audit row 'refuse' with client 'T50UNKNOWN@127.0.0.1'")
    like(audit[0]["detail"] if audit else None, r'T50UNKNOWN -> MDD: unknown AE title "T50UNKNOWN"',
         "its detail names the AE title and says it is unknown")

    execute(conn, "SELECT mdd.add_node('t50echo', 'T50UNKNOWN', '127.0.0.1', NULL)")
    mark = now(conn)
    rc, out = echoscu("T50UNKNOWN")
    is_(rc, 0, "after mdd.add_node for it (host 127.0.0.1), echoscu succeeds")
    like(out, r"Received Echo Response \(Success\)", "the C-ECHO is answered with success")
    audit = audit_since(conn, mark, "T50UNKNOWN@%")
    is_deeply([(a["action"], a["client"]) for a in audit],
              [("associate", "T50UNKNOWN@127.0.0.1")], "one audit row 'associate'")
    like(audit[0]["detail"] if audit else None, r"node t50echo", "naming the node")

    mark = now(conn)
    rc, out = echoscu("T50UNKNOWN", called="OTHER")
    isnt(rc, 0, "a known AE calling another AE title (-aec OTHER) is rejected")
    like(out, r"Called AE Title Not Recognized", "with reason: called AE title not recognized")
    audit = audit_since(conn, mark, "T50UNKNOWN@%")
    is_([a["action"] for a in audit], ["refuse"], "audit row 'refuse'")
    like(audit[0]["detail"] if audit else None, r'called AE title "OTHER" is not this archive',
         "its detail names the wrong called AE title")

    execute(conn, "SELECT mdd.add_node('t50far', 'T50FAR', '10.1.2.3', 104)")
    mark = now(conn)
    rc, out = echoscu("T50FAR")
    isnt(rc, 0, "a node registered for host 10.1.2.3 is refused from 127.0.0.1")
    like(out, r"Calling AE Title Not Recognized", "as an unrecognised calling AE title")
    audit = audit_since(conn, mark, "T50FAR@%")
    is_deeply([(a["action"], a["client"]) for a in audit], [("refuse", "T50FAR@127.0.0.1")],
              "audit row 'refuse' with client 'T50FAR@127.0.0.1'")
    like(audit[0]["detail"] if audit else None, r'"T50FAR" is not registered for host 127\.0\.0\.1',
         "its detail says the AE title is not registered for that host")

    # mdd.accept_unknown_nodes, changed at run time
    try:
        execute(conn, "ALTER SYSTEM SET mdd.accept_unknown_nodes = on")
        execute(conn, "SELECT pg_reload_conf()")
        mark = now(conn)
        rc, out = wait_for(lambda: (lambda r: r if r[0] == 0 else None)(echoscu("T50ANYONE")), 10,
                           interval=0.2) or echoscu("T50ANYONE")
        is_(rc, 0, "with mdd.accept_unknown_nodes = on (reload), an unknown AE title is accepted")
        audit = audit_since(conn, mark, "T50ANYONE@%", "associate")
        ok(audit and "accept_unknown_nodes" in audit[-1]["detail"],
           "audit row 'associate' saying mdd.accept_unknown_nodes let it in", f"    {audit}")
        rc, out = echoscu("T50FAR")
        isnt(rc, 0, "but a node registered for another host is still refused from 127.0.0.1: "
                    "unknown nodes are accepted, not known ones from elsewhere")
    finally:
        execute(conn, "ALTER SYSTEM RESET mdd.accept_unknown_nodes")
        execute(conn, "SELECT pg_reload_conf()")
    rc, out = wait_for(lambda: (lambda r: r if r[0] != 0 else None)(echoscu("T50ANYONE")), 10,
                       interval=0.2) or echoscu("T50ANYONE")
    isnt(rc, 0, "after ALTER SYSTEM RESET and a reload it is refused again")

    # =======================================================================
    # 3. C-STORE of a whole patient

    PAT_A = "T50A"
    dir_a = make_server_dir(os.path.join(test_dir, "t50-a"), mode=0o755)
    manifest = generate_patient(dir_a, PAT_A, 501, slices=SLICES)
    dicom_files = [f for f in manifest["files"] if f["kind"] == "dicom"]
    is_(len(dicom_files), INSTANCES, f"the generated patient has {INSTANCES} DICOM files")
    execute(conn, "SELECT mdd.add_node('t50a', 'T50STORE', '127.0.0.1', NULL)")
    mark = now(conn)
    t0 = time.monotonic()
    rc, out = storescu("T50STORE", [dir_a])
    note(f"storescu of {INSTANCES} instances: {time.monotonic() - t0:.2f} s")
    n = len(re.findall(r"Received Store Response \(Success\)", out))
    ok(n == INSTANCES, f"storescu +sd +r gets {INSTANCES} success responses",
       f"    got {n}", out[-2000:] if n != INSTANCES else None)
    objects = query_dicts(conn, """SELECT id, sop_instance_uid, sop_class_uid, source, size, sha256
                                   FROM mdd.objects WHERE patient_id = %s""", (PAT_A,))
    by_uid = {o["sop_instance_uid"]: o for o in objects}
    is_(len(objects), INSTANCES, f"mdd.objects holds {INSTANCES} objects of {PAT_A}")
    is_deeply(set(by_uid), {f["sop_instance_uid"] for f in dicom_files},
              "exactly the instances of the generated patient")
    is_deeply({o["source"] for o in objects}, {"dicom:T50STORE"}, "all with source 'dicom:T50STORE'")
    # the server's default_toast_compression is pglz; lz4 compresses most
    # chunks of the generated images a little, pglz gives up on them
    is_(lo_compression(conn, [o["id"] for o in objects]), ["lz4"],
        "the listener compresses large-object chunks with lz4, not pglz")
    is_deeply({o["sop_instance_uid"]: o["sop_class_uid"] for o in objects},
              {f["sop_instance_uid"]: f["sop_class_uid"] for f in dicom_files},
              "with the SOP classes of the files (CT, RT Structure Set, RT Plan, RT Dose)")
    audit = audit_since(conn, mark, "T50STORE@%", "store")
    is_(len(audit), INSTANCES, f"{INSTANCES} audit rows 'store' with client 'T50STORE@127.0.0.1'")
    is_deeply({a["object_id"] for a in audit}, {o["id"] for o in objects},
              "one per object, naming it")
    audit = audit_since(conn, mark, "T50STORE@%", "associate")
    is_(len(audit), 1, "and one audit row 'associate'")

    # the bytes: mdd's meta header, then the data set as sent
    diff_bytes, diff_meta, unreadable, bad_hash = [], [], [], []
    stored = {}
    for f in dicom_files:
        o = by_uid.get(f["sop_instance_uid"])
        if o is None:
            continue
        data = bytes(query_value(conn, "SELECT mdd.read(%s)", (o["id"],)))
        stored[f["path"]] = data
        with open(os.path.join(dir_a, f["path"]), "rb") as fh:
            original = fh.read()
        if sha256_bytes(data) != o["sha256"] or len(data) != o["size"]:
            bad_hash.append(f"{f['path']}: size {o['size']}/{len(data)}, sha256 differs")
        try:
            meta, dataset = split_part10(data)
            _, original_dataset = split_part10(original)
        except ValueError as e:
            diff_bytes.append(f"{f['path']}: {e}")
            continue
        if dataset != original_dataset:
            n = next((i for i, (a, b) in enumerate(zip(dataset, original_dataset)) if a != b),
                     min(len(dataset), len(original_dataset)))
            diff_bytes.append(f"{f['path']}: data set of {len(dataset)} bytes, original "
                              f"{len(original_dataset)}, first difference at byte {n}")
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            fm = ds.file_meta
            want = {"MediaStorageSOPClassUID": f["sop_class_uid"],
                    "MediaStorageSOPInstanceUID": f["sop_instance_uid"],
                    "TransferSyntaxUID": pydicom.uid.ExplicitVRLittleEndian,
                    "SourceApplicationEntityTitle": "T50STORE"}
            got = {k: str(fm.get(k, "")).strip() for k in want}
            if got != want or str(ds.SOPInstanceUID) != f["sop_instance_uid"] \
                    or not fm.get("ImplementationClassUID"):
                diff_meta.append(f"{f['path']}: {got}")
            if f["modality"] in ("CT", "RTDOSE"):
                _ = ds.pixel_array.shape
        except Exception as e:  # noqa: BLE001
            unreadable.append(f"{f['path']}: {e!r}")
    ok(not bad_hash, "mdd.read gives bytes matching each object's size and sha256",
       "\n".join(bad_hash[:10]))
    ok(not diff_bytes and len(stored) == INSTANCES,
       f"for all {INSTANCES} objects, the data set after the meta group is byte-identical "
       "to the original file's", "\n".join(diff_bytes[:10]))
    ok(not unreadable and len(stored) == INSTANCES,
       "pydicom reads every stored file (pixel data of CT and RT Dose included)",
       "\n".join(unreadable[:10]))
    ok(not diff_meta and len(stored) == INSTANCES,
       "the meta header names SOP class and instance, explicit VR little endian, "
       "source AE T50STORE and an implementation class", "\n".join(diff_meta[:10]))
    with tempfile.NamedTemporaryFile(suffix=".dcm") as tmp:
        tmp.write(stored.get("rtdose.dcm", b""))
        tmp.flush()
        rc, out = run(["dcmdump", "-M", tmp.name])
        is_(rc, 0, "dcmdump reads the stored RT Dose")
        like(out, r"\(0002,0016\) AE \[T50STORE\]", "dcmdump shows Source AE Title T50STORE")
        like(out, r"\(3004,000e\) DS \[", "and the dose grid scaling of the data set")

    # mdd.related across objects received by network
    ct1 = dicom_files[0]
    is_(ct1["path"], "ct/CT_0001.dcm", "the first file of the manifest is the first CT slice")
    uid_to_id = {u: o["id"] for u, o in by_uid.items()}
    want_related = sorted(uid_to_id.get(u, u) for u in manifest["related"][ct1["sop_instance_uid"]])
    got_related = sorted(r[0] for r in query(conn, "SELECT * FROM mdd.related(%s)",
                                             (uid_to_id.get(ct1["sop_instance_uid"]),)))
    is_deeply(got_related, want_related,
              "mdd.related(first CT slice) = its RT Structure Set, RT Plan and RT Dose")
    modality_of = dict(query(conn, "SELECT id, modality FROM mdd.objects WHERE id = ANY(%s)",
                             (got_related or [0],)))
    is_deeply(sorted(modality_of.values()), ["RTDOSE", "RTPLAN", "RTSTRUCT"],
              "which are the RTSTRUCT, RTPLAN and RTDOSE objects")

    # =======================================================================
    # 4. the same instance again; the same UID with other content

    plan_path = os.path.join(dir_a, "rtplan.dcm")
    plan = by_uid.get(next(f["sop_instance_uid"] for f in dicom_files if f["path"] == "rtplan.dcm"), {})
    count = query_value(conn, "SELECT count(*) FROM mdd.objects")
    rc, out = storescu("T50STORE", [plan_path])
    like(out, r"Received Store Response \(Success\)", "the same RT Plan sent again: success")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects"), count, "and no new object")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = %s",
                    (plan.get("sop_instance_uid"),)), 1, "one object with that SOP Instance UID")

    changed = os.path.join(dir_a, "rtplan_changed.dcm.x")
    ds = pydicom.dcmread(plan_path)
    ds.RTPlanDescription = "changed by 50_dicom_service.t"
    ds.save_as(changed, write_like_original=True)
    ds2 = pydicom.dcmread(changed)
    ok(ds2.SOPInstanceUID == plan.get("sop_instance_uid") and sha256_file(changed) != sha256_file(plan_path),
       "a copy of the RT Plan with another description keeps its SOP Instance UID")
    log_size = os.path.getsize(os.path.join(datadir, "server.log"))
    rc, out = storescu("T50STORE", [changed])
    like(out, r"Received Store Response \(.*0x0?111\)",
         "the other content under the same UID is answered with status 0x0111 (duplicate)", )
    unlike(out, r"Received Store Response \(Success\)", "not with success")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects"), count, "no object is added")
    is_(query_value(conn, "SELECT sha256 FROM mdd.objects WHERE id = %s", (plan.get("id"),)),
        plan.get("sha256"), "the archived RT Plan keeps its original sha256")
    log = wait_for(lambda: (lambda t: t if "0x0111" in t else None)(
        server_log(datadir)[log_size:]), 5) or server_log(datadir)[log_size:]
    like(log, rf"C-STORE of {re.escape(str(plan.get('sop_instance_uid')))} from \"T50STORE\" at "
         r"127\.0\.0\.1 failed with status 0x0111: .*already archived with other content",
         "the server log says why, with the status")

    # =======================================================================
    # 5. a node that may not store

    PAT_B = "T50B"
    dir_b = make_server_dir(os.path.join(test_dir, "t50-b"), mode=0o755)
    generate_patient(dir_b, PAT_B, 502, slices=3, extra=("--no-pdf",))
    execute(conn, """SELECT mdd.add_node('t50nostore', 'T50NOSTORE', '127.0.0.1', NULL,
                                         '{"store": false}')""")
    count = query_value(conn, "SELECT count(*) FROM mdd.objects")
    mark = now(conn)
    rc, out = echoscu("T50NOSTORE")
    is_(rc, 0, "a node with {\"store\": false} may still associate and C-ECHO")
    rc, out = storescu("T50NOSTORE", [dir_b], extra=("-nh",))
    responses = re.findall(r"Received Store Response \(([^)]*)\)", out)
    is_(len(responses), 3 + 40 + 3, "its storescu of 46 instances gets 46 responses")
    ok(responses and all(re.search(r"0x0?124", r) for r in responses),
       "each a refusal, status 0x0124 (Refused: Not Authorized)", f"    {sorted(set(responses))}")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects WHERE patient_id = %s", (PAT_B,)), 0,
        "nothing of its patient is stored")
    is_(query_value(conn, "SELECT count(*) FROM mdd.objects"), count, "no object at all is added")
    is_(len(audit_since(conn, mark, "T50NOSTORE@%", "store")), 0, "and no audit row 'store'")

    # =======================================================================
    # 6. three associations at once

    parallel = {}
    for i in (1, 2, 3):
        pid = f"T50P{i}"
        d = make_server_dir(os.path.join(test_dir, f"t50-p{i}"), mode=0o755)
        generate_patient(d, pid, 510 + i, slices=SLICES)
        execute(conn, "SELECT mdd.add_node(%s, %s, '127.0.0.1', NULL)", (f"t50p{i}", pid))
        parallel[pid] = d
    mark = now(conn)
    t0 = time.monotonic()
    procs = {}
    for pid, d in parallel.items():
        p = subprocess.Popen(storescu_cmd(pid, [d]), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=DCMTK_ENV)
        processes.append(p)
        procs[pid] = p
    outs = {pid: p.communicate(timeout=120)[0].decode("utf-8", "replace") for pid, p in procs.items()}
    note(f"three storescu of {INSTANCES} instances each at once: {time.monotonic() - t0:.2f} s")
    for pid in parallel:
        is_(len(re.findall(r"Received Store Response \(Success\)", outs[pid])), INSTANCES,
            f"{pid}: {INSTANCES} success responses")
        is_(query_value(conn, """SELECT count(*) FROM mdd.objects
                                 WHERE patient_id = %s AND source = %s""", (pid, f"dicom:{pid}")),
            INSTANCES, f"{pid}: {INSTANCES} objects with source 'dicom:{pid}'")
    spans = query(conn, """SELECT client, min(at), max(at) FROM mdd.audit_log
                           WHERE action = 'store' AND at >= %s AND client = ANY(%s)
                           GROUP BY client""", (mark, [f"{p}@127.0.0.1" for p in parallel]))
    ok(len(spans) == 3 and max(s[1] for s in spans) < min(s[2] for s in spans),
       "the three associations stored at the same time (their store audit rows overlap)",
       f"    {spans}")

    # =======================================================================
    # 7. mdd.echo as SCU

    peer_port = free_port()
    peer_dir = make_server_dir(os.path.join(test_dir, "t50-storescp"), mode=0o755)
    storescp = subprocess.Popen(["storescp", "-aet", "PEER", str(peer_port)], cwd=peer_dir,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=DCMTK_ENV)
    processes.append(storescp)
    ok(wait_for(lambda: port_open(peer_port), 10), f"storescp listens on port {peer_port}")
    execute(conn, "SELECT mdd.add_node('t50peer', 'PEER', '127.0.0.1', %s)", (peer_port,))
    del conn.notices[:]
    is_(query_value(conn, "SELECT mdd.echo('t50peer')"), True, "mdd.echo('t50peer') against storescp: true")
    is_(conn.notices, [], "without a notice")
    like(query_value(conn, """SELECT detail FROM mdd.audit_log WHERE action = 'echo'
                              ORDER BY at DESC LIMIT 1"""),
         r"t50peer \(PEER at 127\.0\.0\.1:\d+\): success", "the audit log records the C-ECHO")
    storescp.terminate()
    storescp.wait(timeout=10)

    execute(conn, "SELECT mdd.add_node('t50closed', 'CLOSED', '127.0.0.1', %s)", (free_port(),))
    del conn.notices[:]
    t0 = time.monotonic()
    is_(query_value(conn, "SELECT mdd.echo('t50closed')"), False,
        "mdd.echo of a node whose port is closed: false")
    ok(time.monotonic() - t0 < 5, "at once (connection refused)")
    like(" ".join(conn.notices), r'NOTICE:\s+C-ECHO to node "t50closed" failed: ',
         "with a NOTICE saying why")
    is_(query_value(conn, "SELECT mdd.echo('t50peer')"), False,
        "mdd.echo('t50peer') after storescp stopped: false")

    execute(conn, "SELECT mdd.add_node('t50self', 'MDD', '127.0.0.1', %s)", (DICOM_PORT,))
    is_(query_value(conn, "SELECT mdd.echo('t50self')"), True,
        "mdd.echo of the archive's own DICOM service (node with AE title MDD): true")
    raises(conn, "SELECT mdd.echo('t50nosuchnode')", None, "42704",
           "mdd.echo of an unknown node raises 42704", r'node "t50nosuchnode" does not exist')

    # =======================================================================
    # 8. a cluster of its own: listeners killed, fast shutdown with idle peers

    dicom_port = free_port()
    sd, sport = start_cluster("stop", f"mdd.dicom_port = {dicom_port}", "mdd.accept_unknown_nodes = on")
    sconnect = lambda: connect(port=sport)  # noqa: E731
    c = sconnect()
    execute(c, "CREATE EXTENSION mdd")
    c.close()
    rows = wait_for(service_up(sconnect, 4), 20)
    ok(rows, "own cluster: the launcher and 4 listeners start after CREATE EXTENSION")
    before = listeners_of(rows or [])

    # SIGTERM of one listener: the launcher starts it again
    victim = before.get("mdd dicom listener 2")
    if victim:
        os.kill(victim, signal.SIGTERM)

    def replaced():
        rows = service_up(sconnect, 4)()
        now_ = listeners_of(rows or [])
        if rows and now_.get("mdd dicom listener 2") not in (None, victim):
            return now_
        return None
    t0 = time.monotonic()
    after = wait_for(replaced, 5)
    ok(after, "after kill -TERM of listener 2, a new 'mdd dicom listener 2' runs within 5 s",
       f"    before {before}, now {listeners_of(workers(sconnect()))}")
    note(f"listener 2 replaced after {time.monotonic() - t0:.2f} s")
    ok(after and all(after[k] == before[k] for k in before if k != "mdd dicom listener 2"),
       "the other listeners kept running")
    rc, out = echoscu("T50ANY", port=dicom_port)
    is_(rc, 0, "the service still answers echoscu")

    # SIGKILL of one listener: crash recovery, then everything comes back
    pids = listeners_of(workers(sconnect()))
    launcher = [r["pid"] for r in workers(sconnect()) if r["backend_type"] == "mdd launcher"]
    if pids.get("mdd dicom listener 3"):
        os.kill(pids["mdd dicom listener 3"], signal.SIGKILL)

    def recovered():
        rows = service_up(sconnect, 4)()
        if rows and not set(listeners_of(rows).values()) & set(pids.values()):
            return rows
        return None
    t0 = time.monotonic()
    rows = wait_for(recovered, 30, interval=0.25)
    ok(rows, "after kill -9 of a listener, the server restarts and the launcher and 4 new "
       "listeners run within 30 s")
    note(f"back after {time.monotonic() - t0:.2f} s")
    ok(rows and [r["pid"] for r in rows if r["backend_type"] == "mdd launcher"] != launcher,
       "with a new launcher (crash recovery restarted every backend)")
    like(server_log(sd), r"terminating any other active server processes",
         "the server log shows the crash recovery")
    rc, out = wait_for(lambda: (lambda r: r if r[0] == 0 else None)(echoscu("T50ANY", port=dicom_port)),
                       10, interval=0.25) or echoscu("T50ANY", port=dicom_port)
    is_(rc, 0, "echoscu works again")

    # fast shutdown with an idle peer, three kinds: a TCP connection that
    # sends nothing; an association that is accepted and then left idle; a
    # peer that stops in the middle of its A-ASSOCIATE-RQ (header and 4 bytes
    # of the body).  The stop is timed; after 6 s the test closes the peer's
    # socket itself so that the server can finish stopping.

    def silent_peer():
        return socket.create_connection((HOST, dicom_port)), None

    def idle_association():
        s, kind, accepted = raw_associate(dicom_port, "T50IDLE")
        ok(kind == 0x02 and accepted, "a raw A-ASSOCIATE-RQ from T50IDLE is accepted "
           "(A-ASSOCIATE-AC, Verification context accepted)",
           f"    PDU type {kind}, context accepted {accepted}")
        return s, None

    def stalled_store():
        ct2 = next(f for f in dicom_files if f["path"] == "ct/CT_0002.dcm")
        with open(os.path.join(dir_a, ct2["path"]), "rb") as fh:
            _, dataset = split_part10(fh.read())
        s, kind, accepted = raw_associate(dicom_port, "T50STALL", abstract=CT_IMAGE_STORAGE,
                                          transfer=EXPLICIT_LE)
        ok(kind == 0x02 and accepted, "T50STALL's association for CT Image Storage is accepted",
           f"    PDU type {kind}, context accepted {accepted}")
        s.sendall(p_data(0x03, c_store_rq(CT_IMAGE_STORAGE, ct2["sop_instance_uid"]))
                  + p_data(0x00, dataset[:4096]))
        return s, 0.3   # let the listener go on to read the data set

    def stalled_request():
        s = socket.create_connection((HOST, dicom_port))
        s.sendall(associate_rq("T50HALF", "MDD")[:10])
        return s, 0.3   # let the listener go on to read the request

    cases = [
        ("a silent TCP connection", silent_peer, "association request from 127.0.0.1",
         r"connection from 127\.0\.0\.1 closed: server shutting down"),
        ("an idle association", idle_association, "association with T50IDLE at ",
         r"aborting association with T50IDLE: server shutting down"),
        ("a peer stalled in the middle of a C-STORE", stalled_store,
         "association with T50STALL at ",
         r"C-STORE of \S+ from T50STALL broke off while receiving the data set.*nothing was stored"),
        ("a peer stalled in mid-request", stalled_request, "association request from 127.0.0.1",
         None),
    ]
    for n, (label, make_peer, activity, log_pattern) in enumerate(cases):
        if n > 0:
            subprocess.run([os.path.join(top, "scripts", "cluster.sh"), "start", sd, str(sport)],
                           check=True, stdout=subprocess.DEVNULL)
            ok(wait_for(service_up(sconnect, 4), 20), f"{label}: own cluster started again, "
               "launcher and listeners up")
        peer, settle = make_peer()

        def serving():
            return [r for r in workers(sconnect())
                    if r["backend_type"] == "mdd dicom listener" and r["state"] == "active"
                    and activity in (r["query"] or "")]
        ok(wait_for(serving, 5), f"{label}: a listener serves it ('{activity}')",
           f"    {[(r['application_name'], r['state'], r['query']) for r in workers(sconnect())]}")
        if settle:
            time.sleep(settle)
        log_size = os.path.getsize(os.path.join(sd, "server.log"))
        took = stop_timed(sd, [peer], 5)
        note(f"pg_ctl stop -m fast with {label}: "
             + (f"{took:.2f} s" if took is not None else "still running after 6 s"))
        ok(took is not None and took < 5,
           f"{label}: pg_ctl stop -m fast completes in under 5 s",
           "    " + (f"took {took:.1f} s" if took is not None
                     else "the server was still running after 6 s, until the test closed "
                          "the peer's connection"))
        ok(not os.path.exists(os.path.join(sd, "postmaster.pid")), f"{label}: the server is stopped")
        if log_pattern:
            like(server_log(sd)[log_size:], log_pattern,
                 f"{label}: the log says it was closed because of the shutdown")

    subprocess.run([os.path.join(top, "scripts", "cluster.sh"), "start", sd, str(sport)],
                   check=True, stdout=subprocess.DEVNULL)
    c = sconnect()
    is_(query_value(c, "SELECT count(*) FROM mdd.objects"), 0,
        "own cluster: the half-received CT slice was not stored")
    c.close()
    stop_cluster(sd)

    # =======================================================================
    # 9. the DICOM port is taken

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind((HOST, 0))
    holder.listen(1)
    busy_port = holder.getsockname()[1]
    try:
        bd, bport = start_cluster("busy", f"mdd.dicom_port = {busy_port}")
        c = connect(port=bport)
        is_(query_value(c, "SELECT 1"), 1, f"with port {busy_port} taken, the server starts anyway")
        execute(c, "CREATE EXTENSION mdd")
        like(server_log(bd), rf"DICOM service off: cannot listen on localhost:{busy_port}: "
             r"Address already in use", "its log says 'DICOM service off' and why")
        found = wait_for(lambda: "mdd launcher: extension found" in server_log(bd), 15)
        ok(found, "the launcher found the extension")
        time.sleep(1.5)   # the launcher would have started listeners by now
        rows = workers(c)
        is_([r["backend_type"] for r in rows], ["mdd launcher"],
            "only the launcher runs, no listener backend")
        c.close()
    finally:
        holder.close()
finally:
    cleanup()
    conn.close()

note(f"runtime {time.monotonic() - started:.1f} s")
done_testing()
