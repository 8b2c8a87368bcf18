#!/usr/bin/python3
# The DICOM listeners on the wire, through raw sockets (lib/dicomwire.py):
# an association with C-ECHO and release; a C-STORE of pydicom's CT_small
# data set (explicit VR little endian), archived byte for byte; presentation
# contexts refused for an unknown abstract syntax or transfer syntax beside
# one accepted; a peer that vanishes in the middle of a data set and a
# garbage data set leave nothing stored; truncated, oversized and unknown
# PDUs do not hurt the listeners; a request to another called AE title, or
# from an unknown calling AE title, is rejected.
import os
import random
import socket
import struct
import sys
import time
import uuid

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
import dicomwire as w  # noqa: E402

port = int(env("MDD_DICOM_PORT"))
pydicom_dir = env("MDD_PYDICOM_DIR")
datadir = os.environ.get("MDD_DATADIR")
NODE = "tap55-wire"
AE = "TAP55WIRE"
VERIFY = [(1, w.VERIFICATION, [w.IMPLICIT_VR_LE])]
CT = [(1, w.CT_IMAGE_STORAGE, [w.EXPLICIT_VR_LE]), (3, w.VERIFICATION, [w.IMPLICIT_VR_LE])]
rng = random.Random(55)

conn = connect()
if query_value(conn, "SELECT count(*) FROM mdd.node WHERE name = %s", (NODE,)) == 0:
    execute(conn, "SELECT mdd.add_node(%s, %s, '127.0.0.1', NULL)", (NODE, AE))
ok(query_value(conn, "SELECT count(*) FROM mdd.nodes WHERE name = %s AND ae_title = %s",
               (NODE, AE)) == 1, f"node {NODE} ({AE} at 127.0.0.1) is registered")


def listeners():
    return sorted(r[0] for r in query(
        conn, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'mdd dicom listener'"))


def wait_idle(timeout=20.0):
    """Wait until every listener is idle (two looks 0.3 s apart)."""
    deadline = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < deadline:
        busy = query_value(conn, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                 "'mdd dicom listener' AND state = 'active'")
        calm = calm + 1 if busy == 0 else 0
        if calm >= 2:
            return True
        time.sleep(0.3)
    return False


def lo_count():
    return query_value(conn, "SELECT count(*) FROM pg_largeobject_metadata")


def object_count(uid=None):
    if uid is None:
        return query_value(conn, "SELECT count(*) FROM mdd.object")
    return query_value(conn, "SELECT count(*) FROM mdd.objects WHERE sop_instance_uid = %s", (uid,))


def log_size():
    try:
        return os.path.getsize(os.path.join(datadir, "server.log"))
    except (OSError, TypeError):
        return None


CRASH = (r"terminated by signal|server process .* (was terminated|exited with exit code)|"
         r"terminating any other active server processes|DICOM listener \d+ exited|"
         r"\"mdd dicom listener\" \(PID \d+\) exited with exit code [1-9]")


def crash_lines(since):
    import re
    with open(os.path.join(datadir, "server.log"), "rb") as fh:
        fh.seek(since)
        text = fh.read().decode("utf-8", "replace")
    return [line for line in text.splitlines() if re.search(CRASH, line)]


def associate(contexts, desc, calling=AE):
    """Open an association; one test that it was accepted."""
    a = w.Association.connect(port)
    kind, info = a.request("MDD", calling, contexts)
    ok(kind == "AC", f"{desc}: association accepted", f"    got {kind}: {info}")
    if kind != "AC":
        a.close()
        bail_out(f"{desc}: no association, cannot go on")
    return a


def collect(sock, timeout=5.0):
    """What the server does after a bad PDU: (how, PDU types) where how is
    'closed' when it closed the connection, 'aborted' when an A-ABORT came
    (then we close; its PDU type is given as 'A-ABORT source/reason'),
    'silent' when neither happened within timeout."""
    types = []
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            t, payload = w.read_pdu(sock)
            if t == w.A_ABORT:
                a = w.parse_abort(payload)
                types.append(f"A-ABORT {a.source}/{a.reason}")
                return "aborted", types
            types.append(w.PDU_NAMES.get(t, hex(t)))
    except (w.Closed, ConnectionResetError):
        return "closed", types
    except (socket.timeout, w.ProtocolError):
        pass
    return "silent", types


def with_uid(dataset, uid):
    """The data set (explicit VR LE, no group lengths) with another SOP
    Instance UID: (0008,0018) rewritten in place, its length adjusted."""
    head = b"\x08\x00\x18\x00UI"
    at = dataset.find(head)
    assert at >= 0, "no SOP Instance UID in the data set"
    old_len = struct.unpack_from("<H", dataset, at + 6)[0]
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return dataset[:at] + head + struct.pack("<H", len(value)) + value + dataset[at + 8 + old_len:]


def fresh_uid():
    """A UID never sent before (a UUID-derived UID, PS3.5 B.2): a run must
    not resend what an earlier run archived."""
    return "2.25." + str(uuid.uuid4().int)


started_log = log_size()
listeners_before = listeners()
ok(len(listeners_before) > 0, f"{len(listeners_before)} DICOM listener backends are running")
wait_idle()

# ---------------------------------------------------------------------------
# association, C-ECHO, release

a = associate(VERIFY, "echo")
is_(a.accepted_syntax(1), w.IMPLICIT_VR_LE, "echo: the Verification context is accepted "
                                              "with implicit VR little endian")
is_(a.accepted.application_context, w.APPLICATION_CONTEXT, "echo: the AC names the DICOM "
                                                           "application context")
ok(a.accepted.max_pdu and a.accepted.max_pdu >= 4096,
   f"echo: the AC announces a maximum PDU length ({a.accepted.max_pdu})")
rsp = a.echo(1)
is_(rsp.get("CommandField"), w.C_ECHO_RSP, "echo: a C-ECHO-RSP comes back")
is_(rsp.get("MessageIDBeingRespondedTo"), a.message_id, "echo: answering our message ID")
is_(rsp.get("Status"), w.STATUS_SUCCESS, "echo: with status 0 (success)")
ok(a.release(), "echo: A-RELEASE-RQ is answered with A-RELEASE-RP")
closed, rest = a.wait_closed(5)
ok(closed and not rest, "echo: then the listener closes the connection", f"    {closed} {rest}")
a.close()

# ---------------------------------------------------------------------------
# C-STORE of CT_small's data set

with open(os.path.join(pydicom_dir, "CT_small.dcm"), "rb") as fh:
    _, ct_dataset, ct_syntax = w.split_part10(fh.read())
is_(ct_syntax, w.EXPLICIT_VR_LE, "CT_small.dcm is explicit VR little endian")
uid = fresh_uid()
dataset = with_uid(ct_dataset, uid)
los = lo_count()
a = associate(CT, "store")
is_(a.accepted_syntax(1), w.EXPLICIT_VR_LE, "store: CT Image Storage accepted in explicit VR LE")
rsp = a.store(1, w.CT_IMAGE_STORAGE, uid, dataset, fragment=16000)
is_(rsp.get("CommandField"), w.C_STORE_RSP, "store: a C-STORE-RSP comes back")
is_(rsp.get("Status"), w.STATUS_SUCCESS, "store: with status 0 (success)",)
is_(rsp.get("AffectedSOPInstanceUID"), uid, "store: for our SOP instance")
ok(a.release(), "store: the association is released")
a.close()
row = query_one(conn, "SELECT id, transfer_syntax_uid FROM mdd.objects WHERE sop_instance_uid = %s",
                (uid,))
ok(row is not None, "store: the object is in mdd.objects")
if row:
    is_(row["transfer_syntax_uid"], w.EXPLICIT_VR_LE, "store: with the transfer syntax of the context")
    is_(query_value(conn, "SELECT source FROM mdd.object WHERE id = %s", (row["id"],)),
        f"dicom:{AE}", "store: its source names the calling AE title")
    stored = bytes(query_value(conn, "SELECT mdd.read(%s, true)", (row["id"],)))
    ok(stored.endswith(dataset), f"store: mdd.read ends with exactly the {len(dataset)} bytes sent")
    meta, body, syntax = w.split_part10(stored)
    ok(body == dataset and syntax == w.EXPLICIT_VR_LE,
       "store: after a Part 10 meta header naming explicit VR LE, and nothing else",
       f"    data set of {len(body)} bytes, transfer syntax {syntax}")
else:
    skip("no object", 4)
is_(lo_count() - los, 1, "store: one large object was added")

# ---------------------------------------------------------------------------
# presentation contexts: unknown abstract syntax, unsupported transfer syntax

a = associate([(1, "1.2.3.4.5.6", [w.IMPLICIT_VR_LE]), (3, w.VERIFICATION, [w.IMPLICIT_VR_LE]),
               (5, w.VERIFICATION, [w.JPEG_BASELINE])], "contexts")
results = {k: v[0] for k, v in a.accepted.contexts.items()}
is_(results.get(1), w.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED,
    "contexts: abstract syntax 1.2.3.4.5.6 is refused with result 3 (abstract syntax not supported)")
is_(results.get(3), w.PC_ACCEPTANCE, "contexts: the Verification context beside it is accepted")
is_(results.get(5), w.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED,
    "contexts: Verification offered only in JPEG baseline is refused with result 4")
is_(a.echo(3).get("Status"), w.STATUS_SUCCESS, "contexts: C-ECHO on the accepted context works")
ok(a.release(), "contexts: released")
a.close()

# ---------------------------------------------------------------------------
# a peer that vanishes in the middle of a data set

for how in ("close", "reset"):
    uid = fresh_uid()
    dataset = with_uid(ct_dataset, uid)
    los = lo_count()
    a = associate(CT, f"vanish ({how})")
    fragments = w.pdv_pdus(1, dataset, False, 4096 + 6)
    a.send(w.p_data_tf([w.PDV(1, True, True, w.c_store_rq(a.next_message_id(), w.CT_IMAGE_STORAGE,
                                                          uid))]))
    for p in fragments[:len(fragments) // 2]:
        a.send(p)
    if how == "reset":
        a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()
    ok(wait_idle(), f"vanish ({how}): after {len(fragments) // 2} of {len(fragments)} data set "
                    "PDVs the listeners go idle again")
    is_(object_count(uid), 0, f"vanish ({how}): nothing is stored for the SOP instance")
    is_(lo_count(), los, f"vanish ({how}): no large object was added")
    a = associate(VERIFY, f"vanish ({how}): a new association")
    is_(a.echo(1).get("Status"), w.STATUS_SUCCESS, f"vanish ({how}): and C-ECHO works")
    a.release()
    a.close()

# ---------------------------------------------------------------------------
# a garbage data set

uid = fresh_uid()
los = lo_count()
objects = object_count()
a = associate(CT, "garbage")
rsp = a.store(1, w.CT_IMAGE_STORAGE, uid, random.Random(5501).randbytes(2000))
is_(rsp.get("CommandField"), w.C_STORE_RSP, "garbage: a C-STORE-RSP comes back")
ok(rsp.get("Status") not in (None, w.STATUS_SUCCESS),
   f"garbage: with a failure status (0x{rsp.get('Status', 0):04X}: {rsp.get('ErrorComment')})")
is_(object_count(uid), 0, "garbage: nothing is stored for the SOP instance")
is_(object_count(), objects, "garbage: nor anything else")
is_(lo_count(), los, "garbage: no large object was added")
is_(a.echo(3).get("Status"), w.STATUS_SUCCESS, "garbage: the association goes on (C-ECHO works)")
ok(a.release(), "garbage: and is released")
a.close()

# ---------------------------------------------------------------------------
# bad PDUs: the listener survives them

los = lo_count()
objects = object_count()
rq = w.associate_rq("MDD", AE, VERIFY)


def raw(label, data, keep_open=False):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(data)
        if keep_open:
            return collect(s)
    finally:
        s.close()
    return None


raw("truncated", w.pdu(w.A_ASSOCIATE_RQ, rng.randbytes(10), length=1000))
raw("truncated P-DATA", rq + w.pdu(w.P_DATA_TF, rng.randbytes(10), length=1000))
how, got = raw("absurd", w.pdu(w.A_ASSOCIATE_RQ, rng.randbytes(64), length=0xFFFFFFF0), True)
ok(how in ("closed", "aborted"), "an A-ASSOCIATE-RQ announcing 0xFFFFFFF0 bytes is refused at once",
   f"    {how} {got}")
how, got = raw("absurd P-DATA", rq + w.pdu(w.P_DATA_TF, rng.randbytes(64), length=0xFFFFFFF0), True)
ok(how in ("closed", "aborted") and got[:1] == ["A-ASSOCIATE-AC"],
   "a P-DATA-TF announcing 0xFFFFFFF0 bytes in an association ends it at once", f"    {how} {got}")
EMPTY_AE_ROWS = "SELECT count(*) FROM mdd.audit_log WHERE detail LIKE ' -> %'"
audits = query_value(conn, EMPTY_AE_ROWS)
how, got = raw("unknown", w.pdu(0x42, rng.randbytes(32)), True)
is_((how, got), ("aborted", ["A-ABORT 2/1"]),
    "an unknown PDU type (0x42) instead of a request: A-ABORT, unrecognized PDU")
how, got = raw("unknown in", rq + w.pdu(0x42, rng.randbytes(32)), True)
is_((how, got), ("aborted", ["A-ASSOCIATE-AC", "A-ABORT 2/1"]),
    "an unknown PDU type in an association: A-ABORT, unrecognized PDU")
how, got = raw("P-DATA first", w.p_data_tf([(1, True, True, w.c_echo_rq(1))]), True)
is_((how, got), ("aborted", ["A-ABORT 2/2"]),
    "a P-DATA-TF instead of an association request: A-ABORT, unexpected PDU")
how, got = raw("bad PDV", rq + w.pdu(w.P_DATA_TF, b"\x00\x00\x00\x09\x01\x03"), True)
is_((how, got), ("aborted", ["A-ASSOCIATE-AC", "A-ABORT 2/6"]),
    "a PDV item longer than its P-DATA-TF: A-ABORT, invalid PDU parameter value")
is_(query_value(conn, EMPTY_AE_ROWS), audits,
    "PDUs that are no association request leave no audit row with empty AE titles")
# AE titles that are not ASCII: refused, and audited as valid text
before_bad_ae = query_value(conn, "SELECT count(*) FROM mdd.audit")
how, got = raw("latin-1 AE", w.associate_rq(b"MDD", b"BAD\xa0AE\xff", VERIFY), True)
ok(how in ("closed", "aborted") or got[:1] == ["A-ASSOCIATE-RJ"],
   "an association request from a calling AE title with bytes 0xA0 and 0xFF is refused", f"    {how} {got}")
rows = query(conn, "SELECT action, detail, client FROM mdd.audit WHERE id > "
                   "(SELECT max(id) FROM mdd.audit) - 5 AND client LIKE 'BAD%%'")
ok(len(rows) >= 1 and all("\ufffd" not in r[2] and r[2].startswith("BAD?AE?") for r in rows),
   "it is in the audit log with the bytes outside printable ASCII shown as '?'", f"    {rows}")
ok(query_value(conn, "SELECT count(*) FROM mdd.audit") > before_bad_ae, "(one row more)")
ok(wait_idle(), "after the bad PDUs the listeners go idle again")
a = associate(VERIFY, "after the bad PDUs")
is_(a.echo(1).get("Status"), w.STATUS_SUCCESS, "after the bad PDUs: C-ECHO works")
a.release()
a.close()
is_deeply(listeners(), listeners_before, "the same listener backends are running (none died)")
is_(object_count(), objects, "the bad PDUs stored nothing")
is_(lo_count(), los, "and added no large object")

# ---------------------------------------------------------------------------
# association requests that are rejected

for called, calling, reason, what in (
        ("NOTMDD", AE, w.RJ_CALLED_AE_NOT_RECOGNIZED, "called AE title NOTMDD"),
        ("MDD", "TAP55NOBODY", w.RJ_CALLING_AE_NOT_RECOGNIZED, "unregistered calling AE title")):
    a = w.Association.connect(port)
    kind, info = a.request(called, calling, VERIFY)
    is_((kind, info), ("RJ", w.Reject(w.RJ_PERMANENT, w.RJ_SOURCE_SERVICE_USER, reason)),
        f"{what}: A-ASSOCIATE-RJ (permanent, service user, reason {reason})")
    a.close()

# ---------------------------------------------------------------------------

wait_idle()
is_deeply(listeners(), listeners_before, "at the end the same listener backends are running")
if started_log is not None:
    lines = crash_lines(started_log)
    is_deeply(lines, [], "the server log shows no crash or listener exit during the test")
else:
    skip("no server log at $MDD_DATADIR/server.log")
conn.close()
done_testing()
