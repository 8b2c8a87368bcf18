"""DICOM helpers for mdd's retrieve tests: DCMTK tools run with a time limit,
a DCMTK storescp run as a move destination, the DIMSE responses movescu and
getscu print in debug mode (-d), Part 10 files cut into meta header and
data set, data sets compared element by element, and a small C-GET client
over a plain socket (built on dicomwire) that shows what DCMTK's getscu
does not: the identifier of the final C-GET response (Failed SOP Instance
UID List) and the transfer syntax each object arrived in.

    with StoreSCP(workdir, "DEST", ["+xa"]) as scp:    # storescp +B on a free port
        rc, out = run(["movescu", "-d", ..., "-aem", scp.aet, ...])
        final = dimse_responses(out, "C-MOVE RSP")[-1]
        scp.received()                             # {SOP Instance UID: path}

Every subprocess has a timeout; a StoreSCP is killed when its with block
ends, whatever happened.
"""

import io
import os
import re
import socket
import struct
import subprocess
import time

import dicomwire as w

HOST = "127.0.0.1"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"

GET_PATIENT_ROOT = "1.2.840.10008.5.1.4.1.2.1.3"
GET_STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.3"

C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
PENDING = (0xFF00, 0xFF01)

# ---------------------------------------------------------------------------
# processes and ports


def run(cmd, timeout=60):
    """Run a command (DCMTK tool) with TCP_NODELAY=1; returns (exit status,
    stdout and stderr together).  A command still running after timeout
    seconds is killed and reported as exit status None."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=DCMTK_ENV, timeout=timeout)
        return p.returncode, p.stdout.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("utf-8", "replace")
        return None, out + f"\n[killed after {timeout} s]"


def free_port(host=HOST):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port, host=HOST):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def unprivileged_user():
    """The user servers started by a test run as: None (oneself) unless
    root, then "nobody"."""
    if os.getuid() != 0:
        return None
    import pwd
    try:
        return pwd.getpwnam("nobody").pw_name
    except KeyError:
        return None


class StoreSCP:
    """DCMTK's storescp, bit-preserving (+B), on a free port of 127.0.0.1,
    writing into a directory of its own; aet may hold "{port}" to make it
    one of its own too; extra: more options (+xa, +xi, ...);
    user: run it as this user (see unprivileged_user).  Its output is kept in
    a .log file beside that directory."""

    def __init__(self, workdir, aet, extra=(), user=None):
        self.port = free_port()
        self.aet = aet.format(port=self.port)   # "DEST{port}": an AE title per port
        self.user = user
        self.dir = os.path.join(workdir, self.aet)
        os.makedirs(self.dir)
        if user is not None:
            os.chmod(self.dir, 0o777)       # storescp runs as user
        self.log_path = self.dir + ".log"
        self.cmd = ["storescp", "-v", "+B", "-dhl", "-aet", aet, "-od", self.dir, *extra,
                    str(self.port)]
        self.proc = None

    def start(self, timeout=10):
        with open(self.log_path, "wb") as log:
            drop = {}
            if self.user is not None:
                import pwd
                entry = pwd.getpwnam(self.user)
                drop = dict(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=DCMTK_ENV, **drop)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"storescp did not start: {' '.join(self.cmd)}\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def files(self):
        return sorted(os.path.join(self.dir, f) for f in os.listdir(self.dir))

    def received(self):
        return received_files(self.dir)


def received_files(directory):
    """{SOP Instance UID: path} of the DICOM files in a directory (storescp,
    getscu -od); a file that is not readable DICOM is listed under its name
    prefixed with '?'."""
    import pydicom
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = path
        except Exception:  # noqa: BLE001 - report, never die here
            out["?" + name] = path
    return out

# ---------------------------------------------------------------------------
# what movescu -d and getscu -d print


_FIELD = re.compile(r"^D: (Message Type|Message ID Being Responded To|Remaining Suboperations|"
                    r"Completed Suboperations|Failed Suboperations|Warning Suboperations|"
                    r"Data Set|DIMSE Status)\s*: (.*)$")


def dimse_responses(output, message_type):
    """The incoming DIMSE messages of one type ("C-MOVE RSP", "C-GET RSP")
    that a DCMTK tool printed with -d, in order, as dicts: status (int),
    remaining, completed, failed, warning (int, or None when absent), data_set
    ("present"/"none"), identifiers (the lines of the "Response Identifiers"
    dump that follows, if any), error_comment (of a "Status Detail", if any)."""
    msgs = []
    current = None
    section = None
    for line in output.splitlines():
        if "INCOMING DIMSE MESSAGE" in line:
            current = {}
            section = "header"
            continue
        if current is not None and section == "header":
            if "END DIMSE MESSAGE" in line:
                if current.get("Message Type") == message_type:
                    msg = {"status": None, "data_set": current.get("Data Set"),
                           "identifiers": [], "error_comment": None}
                    m = re.match(r"0x([0-9a-fA-F]+)", current.get("DIMSE Status", ""))
                    if m:
                        msg["status"] = int(m.group(1), 16)
                    msg["status_text"] = current.get("DIMSE Status")
                    for key, name in (("remaining", "Remaining Suboperations"),
                                      ("completed", "Completed Suboperations"),
                                      ("failed", "Failed Suboperations"),
                                      ("warning", "Warning Suboperations")):
                        v = current.get(name, "")
                        msg[key] = int(v) if v.isdigit() else None
                    msgs.append(msg)
                    section = "after"
                else:
                    current = None
                    section = None
                continue
            m = _FIELD.match(line)
            if m:
                current[m.group(1)] = m.group(2).strip()
            continue
        if section == "after" and msgs:
            if line.startswith("D: Response Identifiers:"):
                section = "identifiers"
            elif line.startswith("D: Status Detail:"):
                section = "detail"
            continue
        if section in ("identifiers", "detail") and msgs:
            if not line.startswith("D: "):
                section = None
                continue
            text = line[3:]
            if not text.startswith("("):
                continue
            if section == "identifiers":
                msgs[-1]["identifiers"].append(text)
            else:
                m = re.match(r"\(0000,0902\) LO \[(.*)\]", text)
                if m:
                    msgs[-1]["error_comment"] = m.group(1)
    return msgs


def failed_uid_list(response):
    """The Failed SOP Instance UID List (0008,0058) of a parsed response, as a
    list (None when the identifier does not hold it)."""
    for text in response.get("identifiers", []):
        m = re.match(r"\(0008,0058\) UI \[(.*)\]", text)
        if m:
            return [u for u in m.group(1).split("\\") if u]
        if text.startswith("(0008,0058)"):
            return []
    return None


def describe_response(r):
    if r is None:
        return "no response"
    status = "none" if r.get("status") is None else f"0x{r['status']:04X}"
    return (f"status {status} ({r.get('status_text')}), remaining {r['remaining']}, "
            f"completed {r['completed']}, failed {r['failed']}, warning {r['warning']}"
            + (f", error comment {r['error_comment']!r}" if r.get("error_comment") else "")
            + (f", failed UIDs {failed_uid_list(r)}" if failed_uid_list(r) is not None else ""))

# ---------------------------------------------------------------------------
# Part 10 files and data sets


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}


def dataset_bytes(data):
    """The data set of a Part 10 file: what follows the preamble, 'DICM' and
    the group 0002 elements (explicit VR little endian, walked element by
    element, whatever (0002,0000) says).  Bytes without 'DICM' at 128 are
    taken as a data set with perhaps a bare group 0002 in front."""
    data = bytes(data)
    pos = 132 if len(data) >= 132 and data[128:132] == b"DICM" else 0
    while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":
        vr = data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", data, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            pos += 8 + length
    return data[pos:]


def file_transfer_syntax(path_or_bytes):
    """The Transfer Syntax UID of a Part 10 file's meta header."""
    import pydicom
    src = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else path_or_bytes
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    return str(ds.file_meta.TransferSyntaxUID)


def first_difference(a, b):
    """A short text on where two byte strings first differ (None if equal)."""
    if a == b:
        return None
    n = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
    return f"lengths {len(a)} and {len(b)}, first difference at byte {n}"


def dataset_differences(a, b, limit=10):
    """Element by element comparison of two pydicom data sets (any transfer
    syntax): the list of differences, empty when every element has the same
    tag and value.  Sequences are compared item by item, recursively."""
    diffs = []

    def walk(x, y, where):
        tags = sorted(set(x.keys()) | set(y.keys()))
        for tag in tags:
            if len(diffs) >= limit:
                return
            if tag not in x or tag not in y:
                diffs.append(f"{where}{tag}: only in the {'second' if tag not in x else 'first'}")
                continue
            ex, ey = x[tag], y[tag]
            if ex.VR == "SQ" or ey.VR == "SQ":
                vx, vy = list(ex.value or []), list(ey.value or [])
                if len(vx) != len(vy):
                    diffs.append(f"{where}{tag} {ex.keyword}: {len(vx)} items against {len(vy)}")
                    continue
                for i, (ix, iy) in enumerate(zip(vx, vy)):
                    walk(ix, iy, f"{where}{tag}[{i}].")
                continue
            if ex.value != ey.value:
                diffs.append(f"{where}{tag} {ex.keyword}: {_short(ex.value)} against {_short(ey.value)}")
    walk(a, b, "")
    return diffs


def _short(v):
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."

# ---------------------------------------------------------------------------
# a C-GET client over a plain socket


def _role_selection(sop_class_uid, scu, scp):
    uid = w._ascii(sop_class_uid)
    return w.item(0x54, struct.pack(">H", len(uid)) + uid + bytes([1 if scu else 0, 1 if scp else 0]))


def _associate_rq_with_roles(called, calling, contexts, scp_classes, max_pdu=65536):
    body = struct.pack(">HH", 1, 0) + w._ae(called) + w._ae(calling) + bytes(32)
    body += w.item(w.ITEM_APPLICATION_CONTEXT, w._ascii(w.APPLICATION_CONTEXT))
    for context_id, abstract, syntaxes in contexts:
        body += w.presentation_context_rq(context_id, abstract, syntaxes)
    user = w.item(w.ITEM_MAXIMUM_LENGTH, struct.pack(">I", max_pdu))
    user += w.item(w.ITEM_IMPLEMENTATION_CLASS_UID, w._ascii(w.IMPLEMENTATION_CLASS_UID))
    for uid in scp_classes:
        user += _role_selection(uid, False, True)
    user += w.item(w.ITEM_IMPLEMENTATION_VERSION_NAME, w._ascii(w.IMPLEMENTATION_VERSION))
    body += w.item(w.ITEM_USER_INFORMATION, user)
    return w.pdu(w.A_ASSOCIATE_RQ, body)


def encode_dataset(ds, transfer_syntax=IMPLICIT_VR_LE):
    """A pydicom data set as bytes in an uncompressed transfer syntax."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    buf = DicomBytesIO()
    buf.is_little_endian = transfer_syntax != EXPLICIT_VR_BE
    buf.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LE
    write_dataset(buf, ds)
    return buf.getvalue()


def decode_dataset(data, transfer_syntax=IMPLICIT_VR_LE):
    """Bytes of a data set in an uncompressed transfer syntax, as a pydicom Dataset."""
    from pydicom.filereader import read_dataset
    return read_dataset(io.BytesIO(data), transfer_syntax == IMPLICIT_VR_LE,
                        transfer_syntax != EXPLICIT_VR_BE)


def _us(fields, tag):
    v = fields.get(tag)
    if isinstance(v, (bytes, bytearray)) and len(v) == 2:
        return struct.unpack("<H", v)[0]
    return v


class CGetResult:
    """What a raw C-GET got: association (ok or why not), the C-STORE
    sub-operations received ({SOP Instance UID: (transfer syntax, data set
    bytes)}), the C-GET responses (dicts like dimse_responses'), the final
    one's Failed SOP Instance UID List, and whether the release went well."""

    def __init__(self):
        self.associated = False
        self.why = None
        self.stored = {}
        self.responses = []
        self.final = None
        self.failed_uids = None
        self.released = False


def raw_c_get(port, calling, called, identifier, storage, model=GET_STUDY_ROOT,
              timeout=30, host=HOST):
    """C-GET over a plain socket.  identifier: a pydicom Dataset (sent in
    implicit VR little endian); storage: [(SOP class UID, [transfer
    syntaxes])], each proposed as a context of its own with this side in the
    storage SCP role.  Every C-STORE is answered with success."""
    from pydicom.multival import MultiValue
    res = CGetResult()
    contexts = [(1, model, [IMPLICIT_VR_LE])]
    syntax_of = {}
    for i, (abstract, syntaxes) in enumerate(storage):
        contexts.append((3 + 2 * i, abstract, list(syntaxes)))
    a = w.Association.connect(port, host=host, timeout=timeout)
    try:
        a.send(_associate_rq_with_roles(called, calling, contexts,
                                        sorted({c[1] for c in contexts[1:]})))
        pdu_type, payload = a.read()
        if pdu_type != w.A_ASSOCIATE_AC:
            res.why = w.describe(pdu_type, payload)
            return res
        a.accepted = w.parse_associate(payload, w.A_ASSOCIATE_AC)
        a.max_pdu = a.accepted.max_pdu or a.max_pdu
        for cid, (result, ts) in a.accepted.contexts.items():
            if result == w.PC_ACCEPTANCE:
                syntax_of[cid] = ts
        if 1 not in syntax_of:
            res.why = f"the C-GET context was not accepted: {a.accepted.contexts}"
            return res
        res.associated = True
        command = w.command_set({"AffectedSOPClassUID": model, "CommandField": C_GET_RQ,
                                 "MessageID": 1, "Priority": w.PRIORITY_MEDIUM,
                                 "CommandDataSetType": w.DATA_SET_PRESENT})
        a.send_message(1, command, encode_dataset(identifier, syntax_of[1]))
        while True:
            cid, fields, data = a.receive_message()
            field = fields.get("CommandField")
            if field == w.C_STORE_RQ:
                uid = fields.get("AffectedSOPInstanceUID")
                res.stored[uid] = (syntax_of.get(cid), data)
                rsp = w.command_set({"AffectedSOPClassUID": fields.get("AffectedSOPClassUID"),
                                     "CommandField": w.C_STORE_RSP,
                                     "MessageIDBeingRespondedTo": fields.get("MessageID"),
                                     "CommandDataSetType": w.DATA_SET_ABSENT,
                                     "Status": w.STATUS_SUCCESS,
                                     "AffectedSOPInstanceUID": uid})
                a.send_message(cid, rsp)
            elif field == C_GET_RSP:
                r = {"status": fields.get("Status"), "remaining": _us(fields, 0x1020),
                     "completed": _us(fields, 0x1021), "failed": _us(fields, 0x1022),
                     "warning": _us(fields, 0x1023),
                     "data_set": "none" if data is None else "present",
                     "error_comment": fields.get("ErrorComment"), "identifiers": []}
                res.responses.append(r)
                if r["status"] not in PENDING:
                    res.final = r
                    if data is not None:
                        ids = decode_dataset(data, syntax_of[1])
                        if "FailedSOPInstanceUIDList" in ids:
                            v = ids.FailedSOPInstanceUIDList
                            values = list(v) if isinstance(v, MultiValue) else [v]
                            res.failed_uids = [str(u) for u in values if str(u)]
                    break
            else:
                res.why = f"unexpected DIMSE command {field!r}: {fields}"
                break
        try:
            res.released = a.release()
        except (w.Closed, w.ProtocolError, OSError):
            res.released = False
        return res
    except (w.Closed, w.ProtocolError, OSError) as e:
        res.why = f"{type(e).__name__}: {e}"
        return res
    finally:
        a.close()
