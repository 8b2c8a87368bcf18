#!/usr/bin/python3
# Bounded fuzzing of the DICOM listeners' upper layer: valid PDU sequences
# (association request, C-ECHO, C-STORE of a small data set, release) are
# mutated (bit flips, interesting bytes, truncation, PDU and item length
# fields, duplicated, dropped, swapped and foreign PDUs, garbage) and sent
# to the running listeners from 127.0.0.1, one connection per case.  At
# the end: no listener died or was restarted, the server log shows no
# crash, every connection ended soon after we closed our side, a proper
# C-ECHO is answered, and nothing is half-stored: the objects added during
# the run are exactly those whose C-STORE got a success status, each with
# a present copy that mdd.read(id, true) verifies.
#
#   MDD_PDU_FUZZ_SECONDS      how long to fuzz (default 60)
#   MDD_PDU_FUZZ_ITERATIONS   at most this many cases (default 100000)
#   MDD_PDU_FUZZ_SEED         seed (default: random, printed); case i of a
#                             seed is always built the same way
#   MDD_PDU_FUZZ_JOBS         connections at once (default 2)
#   MDD_PDU_FUZZ_AVOID_KNOWN  1: build no valid sequence that triggers a
#                             failure already known, to look past it: data set
#                             PDVs in the P-DATA-TF that ends the command set
#                             (crashes DCMTK 3.6.7's DIMSE layer), and maximum
#                             PDU lengths of 13 or less (the listener accepts
#                             them, stores, then cannot answer).  Default 0.
#
# When something goes wrong, the byte streams of the most recent cases are
# written to $MDD_TEST_DIR/pdu-fuzz-SEED/ (case-N.bin: what was sent, to be
# replayed with any TCP client; case-N.txt: how it was made).
import collections
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import uuid
import warnings

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from mddtap import *  # noqa: E402,F403
import dicomwire as w  # noqa: E402

warnings.simplefilter("ignore")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset  # noqa: E402

port = int(env("MDD_DICOM_PORT"))
test_dir = env("MDD_TEST_DIR")
datadir = os.environ.get("MDD_DATADIR")
SECONDS = float(os.environ.get("MDD_PDU_FUZZ_SECONDS") or 60)
MAX_ITERATIONS = int(os.environ.get("MDD_PDU_FUZZ_ITERATIONS") or 100000)
SEED = int(os.environ.get("MDD_PDU_FUZZ_SEED") or int.from_bytes(os.urandom(4), "big"))
JOBS = max(1, int(os.environ.get("MDD_PDU_FUZZ_JOBS") or 2))
AVOID_KNOWN = os.environ.get("MDD_PDU_FUZZ_AVOID_KNOWN", "0") not in ("", "0")
READ_TIMEOUT = 15.0         # after our half-close the listener must close within this
CONNECT_TIMEOUT = 5.0
NODE = "tap56-fuzz"
AE = "TAP56FUZZ"
SC = w.SECONDARY_CAPTURE_IMAGE_STORAGE
STUDY = "2.25." + str(uuid.uuid4().int)
SERIES = "2.25." + str(uuid.uuid4().int)
CRASH = (r"terminated by signal|server process .* (was terminated|exited with exit code)|"
         r"terminating any other active server processes|DICOM listener \d+ exited|"
         r"\"mdd dicom listener\" \(PID \d+\) exited with exit code [1-9]")

if SECONDS <= 0 or MAX_ITERATIONS <= 0:
    skip_all("MDD_PDU_FUZZ_SECONDS or MDD_PDU_FUZZ_ITERATIONS is 0")
note(f"seed {SEED} (MDD_PDU_FUZZ_SEED), {SECONDS:g} s, at most {MAX_ITERATIONS} cases, "
     f"{JOBS} connections at once" + (", avoiding known failures" if AVOID_KNOWN else ""))

# ---------------------------------------------------------------------------
# the database side


class DB:
    """A connection that comes back after a server crash and restart."""

    def __init__(self):
        self.conn = None

    def __call__(self, fn, *args, tries=30):
        for attempt in range(tries):
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = connect()
                return fn(self.conn, *args)
            except DBError:
                if self.conn is not None:
                    try:
                        self.conn.close()
                    except DBError:
                        pass
                self.conn = None
                if attempt == tries - 1:
                    raise
                time.sleep(1)


db = DB()


def listeners():
    return sorted(r[0] for r in db(query, "SELECT pid FROM pg_stat_activity "
                                          "WHERE backend_type = 'mdd dicom listener'"))


def wait_idle(timeout=30.0):
    deadline = time.monotonic() + timeout
    calm = 0
    while time.monotonic() < deadline:
        busy = db(query_value, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                               "'mdd dicom listener' AND state = 'active'")
        calm = calm + 1 if busy == 0 else 0
        if calm >= 2:
            return True
        time.sleep(0.3)
    return False


def log_size():
    try:
        return os.path.getsize(os.path.join(datadir, "server.log"))
    except (OSError, TypeError):
        return None


def log_time(line):
    """The time of a server log line (log_line_prefix starts with %m)."""
    import datetime
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) (UTC|GMT)", line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def crash_lines(since):
    with open(os.path.join(datadir, "server.log"), "rb") as fh:
        fh.seek(since)
        text = fh.read().decode("utf-8", "replace")
    return [line for line in text.splitlines() if re.search(CRASH, line)]


if db(query_value, "SELECT count(*) FROM mdd.node WHERE name = %s", (NODE,)) == 0:
    db(execute, "SELECT mdd.add_node(%s, %s, '127.0.0.1', NULL)", (NODE, AE))

# ---------------------------------------------------------------------------
# valid cases


RUN_SALT = uuid.uuid4().int >> 64       # new UIDs each run, the same for case i within a run


def fresh_uid(rng):
    return "2.25." + str((RUN_SALT << 64) | rng.getrandbits(64))


def small_dataset(uid, implicit, number):
    """A 4x4 secondary capture image of the run's study and series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = uid
    ds.PatientName = "Fuzz^Wire"
    ds.PatientID = "TAP56"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.add_new(0x7FE00010, "OB", bytes(range(16)))
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def valid_case(rng, number, control=False):
    """A valid PDU sequence: (list of PDUs, [description])."""
    contexts = [(1, w.VERIFICATION, [w.IMPLICIT_VR_LE]), (3, SC, [w.EXPLICIT_VR_LE]),
                (5, SC, [w.IMPLICIT_VR_LE])]
    if not control:
        if rng.random() < 0.2:
            contexts.append((7, "1.2.3.4.5.6", [w.IMPLICIT_VR_LE]))
        if rng.random() < 0.1:
            contexts.append((9, w.CT_IMAGE_STORAGE, [w.JPEG_BASELINE]))
        rng.shuffle(contexts)
    # Small maximum PDU lengths make the listener answer in many tiny PDUs
    # (a TCP segment each): only the unmutated controls use them, since a
    # mutated case may make the listener close with our bytes unread, and
    # the kernel's reset then drops answers not yet on the wire.
    max_pdu = 16384
    if control and rng.random() < 0.5:
        max_pdu = rng.choice([14, 15, 16, 17, 64, 100, 1000, 0])
    elif not control and rng.random() < 0.3:
        max_pdu = rng.choice([0, 1, 7, 12, 13, 1024, 4096, 65536, 0xFFFFFFFF,
                              rng.randrange(1024, 1 << 32)])
        if AVOID_KNOWN and 0 < max_pdu <= 13:
            max_pdu = 16384
    pdus = [w.associate_rq("MDD", AE, contexts, max_pdu=max_pdu)]
    what = [f"max PDU {max_pdu}"]
    for mid in range(1, rng.choice([1, 1, 2, 3]) + 1):
        if rng.random() < 0.35:
            ctx, command, data = 1, w.c_echo_rq(mid), None
            what.append("echo")
        else:
            implicit = rng.random() < 0.3
            uid = fresh_uid(rng)
            ctx = 5 if implicit else 3
            command = w.c_store_rq(mid, SC, uid)
            data = small_dataset(uid, implicit, number)
            what.append(f"store {uid} ({'implicit' if implicit else 'explicit'})")
        if not control and rng.random() < 0.05:
            ctx = rng.choice([0, 7, 9, 11, 255])
            what.append(f"on context {ctx}")
        size = 0 if control or rng.random() < 0.5 else rng.choice([1, 2, rng.randint(3, 64),
                                                                   rng.randint(64, 1024)])
        limit = 0 if size == 0 else size + 6
        parts = [w.pdv_fragments(ctx, command, True, limit)]
        if data is not None:
            parts.append(w.pdv_fragments(ctx, data, False, limit))
        if not AVOID_KNOWN:
            parts = [parts[0] + (parts[1] if len(parts) > 1 else [])]
        for pdvs in parts:
            if control or rng.random() < 0.5:
                pdus += [w.p_data_tf([p]) for p in pdvs]
            else:
                # several PDVs to a PDU
                while pdvs:
                    k = rng.randint(1, len(pdvs))
                    pdus.append(w.p_data_tf(pdvs[:k]))
                    pdvs = pdvs[k:]
    end = 0 if control else rng.random()
    if end < 0.8:
        pdus.append(w.release_rq())
    elif end < 0.9:
        pdus.append(w.abort())
        what.append("abort")
    else:
        what.append("no release")
    return pdus, what

# ---------------------------------------------------------------------------
# mutations


def length_fields(p):
    """The length fields of one PDU: (offset, width, byte order)."""
    out = [(2, 4, ">")]
    if len(p) < 6:
        return out
    if p[0] in (w.A_ASSOCIATE_RQ, w.A_ASSOCIATE_AC) and len(p) >= 74:
        pos = 74
        while pos + 4 <= len(p):
            item_type, _, n = struct.unpack_from(">BBH", p, pos)
            out.append((pos + 2, 2, ">"))
            subs = {w.ITEM_PRESENTATION_CONTEXT_RQ: 8, w.ITEM_PRESENTATION_CONTEXT_AC: 8,
                    w.ITEM_USER_INFORMATION: 4}.get(item_type)
            if subs is not None:
                sub, end = pos + subs, min(pos + 4 + n, len(p))
                while sub + 4 <= end:
                    out.append((sub + 2, 2, ">"))
                    sub += 4 + struct.unpack_from(">H", p, sub + 2)[0]
            pos += 4 + n
    elif p[0] == w.P_DATA_TF:
        pos = 6
        while pos + 6 <= len(p):
            n = struct.unpack_from(">I", p, pos)[0]
            out.append((pos, 4, ">"))
            if p[pos + 5] & w.PDV_COMMAND:
                e, end = pos + 6, min(pos + 4 + n, len(p))
                while e + 8 <= end:
                    out.append((e + 4, 4, "<"))
                    e += 8 + struct.unpack_from("<I", p, e + 4)[0]
            pos += 4 + n
    return out


def interesting(rng, width, current):
    top = (1 << (8 * width)) - 1
    values = [0, 1, 2, 3, 4, 5, 6, current - 1, current + 1, current * 2, top, top - 15,
              top >> 1, (top >> 1) + 1, rng.randrange(top + 1)]
    return rng.choice([v for v in values if 0 <= v <= top])


def set_length(rng, pdus, only_pdu_header):
    i = rng.randrange(len(pdus))
    p = bytearray(pdus[i])
    if len(p) < 6:
        return pdus, f"PDU {i} too short for a length"
    fields = [length_fields(bytes(p))[0]] if only_pdu_header else length_fields(bytes(p))
    off, width, order = rng.choice(fields)
    fmt = order + {2: "H", 4: "I"}[width]
    old = struct.unpack_from(fmt, p, off)[0]
    new = interesting(rng, width, old)
    struct.pack_into(fmt, p, off, new)
    return pdus[:i] + [bytes(p)] + pdus[i + 1:], f"PDU {i} length field at {off}: {old} -> {new}"


def m_pdu_length(rng, pdus):
    return set_length(rng, pdus, True)


def m_item_length(rng, pdus):
    return set_length(rng, pdus, False)


def m_duplicate(rng, pdus):
    i = rng.randrange(len(pdus))
    j = rng.randrange(len(pdus) + 1)
    return pdus[:j] + [pdus[i]] + pdus[j:], f"PDU {i} again at {j}"


def m_drop(rng, pdus):
    if len(pdus) < 2:
        return pdus, "nothing to drop"
    i = rng.randrange(len(pdus))
    return pdus[:i] + pdus[i + 1:], f"PDU {i} dropped"


def m_swap(rng, pdus):
    if len(pdus) < 2:
        return pdus, "nothing to swap"
    i, j = rng.sample(range(len(pdus)), 2)
    out = list(pdus)
    out[i], out[j] = out[j], out[i]
    return out, f"PDUs {i} and {j} swapped"


def m_foreign(rng, pdus):
    other, _ = valid_case(rng, 0)
    extra = rng.choice(other + [w.release_rp(), w.abort(2, 1), w.release_rq(),
                                w.pdu(w.A_ASSOCIATE_AC, other[0][6:]),
                                w.pdu(w.A_ASSOCIATE_RJ, bytes([0, 1, 1, 7]))])
    j = rng.randrange(len(pdus) + 1)
    return pdus[:j] + [extra] + pdus[j:], f"foreign PDU type 0x{extra[0]:02X} at {j}"


def m_crossover(rng, pdus):
    other, _ = valid_case(rng, 0)
    a = b"".join(pdus)
    b = b"".join(other)
    i, j = rng.randrange(len(a) + 1), rng.randrange(len(b) + 1)
    return [a[:i] + b[j:]], f"bytes 0..{i} spliced onto another case's bytes {j}.."


def m_garbage_pdu(rng, pdus):
    t = rng.choice([0, 8, 0x42, 0xFF, rng.randrange(256), 1, 2, 3, 4, 5, 6, 7])
    body = rng.randbytes(rng.choice([0, 1, 4, 10, rng.randrange(2000)]))
    j = rng.randrange(len(pdus) + 1)
    return pdus[:j] + [w.pdu(t, body)] + pdus[j:], f"random PDU type 0x{t:02X} of {len(body)} bytes at {j}"


def m_control(rng, pdus):
    """Another message control header, or context ID, in a P-DATA-TF."""
    where = [i for i, p in enumerate(pdus) if len(p) >= 12 and p[0] == w.P_DATA_TF]
    if not where:
        return pdus, "no P-DATA-TF"
    i = rng.choice(where)
    p = bytearray(pdus[i])
    off = rng.choice([10, 11])
    old = p[off]
    p[off] = rng.choice([0, 1, 2, 3, 0xFF, rng.randrange(256)])
    what = "control header" if off == 11 else "context ID"
    return pdus[:i] + [bytes(p)] + pdus[i + 1:], f"PDU {i} first PDV {what} {old} -> {p[off]}"


STRUCTURAL = [m_pdu_length, m_item_length, m_item_length, m_duplicate, m_drop, m_swap,
              m_foreign, m_garbage_pdu, m_control]


def b_bitflip(rng, data):
    data = bytearray(data)
    n = rng.choice([1, 1, 2, 4, 8])
    # mostly in the headers: the first bytes of the stream or of a PDU
    for _ in range(n):
        pos = rng.randrange(min(len(data), 128)) if rng.random() < 0.5 else rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
    return bytes(data), f"{n} bits flipped"


def b_bytes(rng, data):
    data = bytearray(data)
    n = rng.choice([1, 2, 4])
    for _ in range(n):
        data[rng.randrange(len(data))] = rng.choice([0, 1, 0x7F, 0x80, 0xFE, 0xFF, 0x20, 0x5C])
    return bytes(data), f"{n} bytes set"


def b_truncate(rng, data):
    n = rng.randrange(len(data))
    return data[:n], f"cut to {n} of {len(data)} bytes"


def b_insert(rng, data):
    j = rng.randrange(len(data) + 1)
    junk = rng.randbytes(rng.choice([1, 2, 4, 16, rng.randrange(1, 300)]))
    return data[:j] + junk + data[j:], f"{len(junk)} random bytes inserted at {j}"


def b_garbage(rng, data):
    n = rng.choice([1, 6, 10, 100, rng.randrange(1, 5000)])
    return rng.randbytes(n), f"{n} random bytes instead"


BYTES = [b_bitflip, b_bitflip, b_bytes, b_truncate, b_insert, b_garbage]


def make_case(i):
    """Case i of the seed: (bytes to send, description, controls)."""
    rng = random.Random(f"{SEED}:{i}")
    control = rng.random() < 0.05
    pdus, what = valid_case(rng, i, control)
    if not control:
        ops = [rng.choice(STRUCTURAL + BYTES + [m_crossover]) for _ in range(rng.choice([1, 1, 1, 2, 2, 3]))]
        ops.sort(key=lambda f: 0 if f in STRUCTURAL else 1 if f is m_crossover else 2)
        for op in ops:
            if op in STRUCTURAL or op is m_crossover:
                pdus, how = op(rng, pdus)
            else:
                data, how = op(rng, b"".join(pdus) or b"\0")
                pdus = [data]
            what.append(f"{op.__name__[2:]}: {how}")
    else:
        what.append("control (not mutated)")
    return b"".join(pdus), what, control

# ---------------------------------------------------------------------------
# sending


def exchange(data):
    """Send a case on a new connection, close our side, read until the
    listener closes.  Returns the outcome as a dict."""
    out = {"ended": "timeout", "send_error": None, "pdus": [], "rest": b""}
    s = socket.create_connection(("127.0.0.1", port), timeout=CONNECT_TIMEOUT)
    received = bytearray()
    try:
        s.settimeout(CONNECT_TIMEOUT)
        try:
            s.sendall(data)
        except OSError as e:
            out["send_error"] = type(e).__name__
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + READ_TIMEOUT
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                out["ended"] = "reset"
                break
            except OSError as e:
                out["ended"] = type(e).__name__
                break
            if not chunk:
                out["ended"] = "closed"
                break
            received += chunk
            if len(received) > 1 << 24:
                out["ended"] = "flood"
                break
    finally:
        s.close()
    out["pdus"], out["rest"] = w.split_pdus(received)
    return out


def responses(pdus):
    """The DIMSE responses in what the listener sent: [(command dict)], and
    how many P-DATA-TF could not be read."""
    found = []
    bad = 0
    pending = collections.defaultdict(bytearray)
    for t, payload in pdus:
        if t != w.P_DATA_TF:
            continue
        try:
            for p in w.parse_p_data(payload):
                if not p.command:
                    continue
                pending[p.context_id] += p.data
                if p.last:
                    found.append(w.parse_command(pending.pop(p.context_id)))
        except w.ProtocolError:
            bad += 1
    return found, bad

# ---------------------------------------------------------------------------
# the run


class Run:
    def __init__(self):
        self.lock = threading.Lock()
        self.next = 0
        self.done = 0
        self.deadline = None           # set when the workers start
        self.stop = False
        self.success_uids = []          # SOP instances whose C-STORE got status 0
        self.store_status = collections.Counter()
        self.echo_ok = 0
        self.first = collections.Counter()
        self.ended = collections.Counter()
        self.hangs = []                 # case numbers
        self.errors = []                # (case, exception)
        self.unreadable = 0             # responses that did not parse
        self.controls = 0
        self.controls_bad = []
        self.recent = collections.deque(maxlen=4000)     # (case, bytes, how made, start, end)
        self.sent_uids = {}             # SOP instance UID -> (case, how the connection ended, PDUs)
        self.findings = []

    def take(self):
        with self.lock:
            if self.stop or self.next >= MAX_ITERATIONS or time.monotonic() >= self.deadline:
                return None
            self.next += 1
            return self.next - 1

    def worker(self):
        while True:
            i = self.take()
            if i is None:
                return
            data, what, control = make_case(i)
            start = time.time()
            try:
                out = exchange(data)
            except OSError as e:
                with self.lock:
                    self.recent.append((i, data, what, start, time.time()))
                    self.errors.append((i, f"{type(e).__name__}: {e}"))
                continue
            with self.lock:
                self.recent.append((i, data, what, start, time.time()))
            found, bad = responses(out["pdus"])
            summary = (i, out["ended"], out["send_error"],
                       [w.describe(*p)[:60] for p in out["pdus"][:8]], len(out["rest"]))
            with self.lock:
                for x in what:
                    if x.startswith("store "):
                        self.sent_uids[x.split()[1]] = summary
            first = w.PDU_NAMES.get(out["pdus"][0][0], "other") if out["pdus"] else "nothing"
            with self.lock:
                self.done += 1
                self.first[first] += 1
                self.ended[out["ended"]] += 1
                self.unreadable += bad
                if out["ended"] == "timeout":
                    self.hangs.append(i)
                for r in found:
                    if r.get("CommandField") == w.C_STORE_RSP:
                        self.store_status[r.get("Status")] += 1
                        if r.get("Status") == w.STATUS_SUCCESS:
                            self.success_uids.append(r.get("AffectedSOPInstanceUID"))
                    elif r.get("CommandField") == w.C_ECHO_RSP and r.get("Status") == 0:
                        self.echo_ok += 1
                if control:
                    self.controls += 1
                    wanted = sum(1 for x in what if x == "echo" or x.startswith("store"))
                    good = sum(1 for r in found if r.get("Status") == 0)
                    types = [t for t, _ in out["pdus"]]
                    if not (good == wanted and types[:1] == [w.A_ASSOCIATE_AC]
                            and types[-1:] == [w.A_RELEASE_RP]):
                        self.controls_bad.append((i, [w.describe(*p) for p in out["pdus"]], found))

    def dump(self, why, cases=None, when=None):
        """Keep cases for reproduction: the given case numbers, or the recent
        cases that were under way at the time when (seconds since the epoch,
        give or take a second), or the last 64."""
        d = make_server_dir(os.path.join(test_dir, f"pdu-fuzz-{SEED}"), fresh=False, mode=0o755)
        with self.lock:
            recent = list(self.recent)
        if cases is not None:
            recent = [(i,) + make_case(i)[:2] for i in cases]
        else:
            around = [r for r in recent if when is not None and r[3] - 1 <= when <= r[4] + 1]
            recent = [r[:3] for r in (around or recent[-64:])]
        for i, data, what in recent:
            with open(os.path.join(d, f"case-{i}.bin"), "wb") as fh:
                fh.write(data)
            with open(os.path.join(d, f"case-{i}.txt"), "w") as fh:
                fh.write(f"seed {SEED} case {i}\n" + "\n".join(what) + "\n")
        with open(os.path.join(d, "findings.txt"), "a") as fh:
            fh.write(why + "\n")
        self.findings.append(f"{why} (last {len(recent)} cases in {d})")


# the run's patient, study and series exist before any case is sent: else
# the first object to arrive could be a mutated one whose study UID was
# damaged, its series would belong to that study, and every control's store
# into the series would be refused (23000)
db(query_value, "SELECT mdd.store(%s, 'tap56 setup')",
   (small_dataset(fresh_uid(random.Random(SEED ^ 0x56)), True, 0),))
run = Run()
before_log = log_size()
listeners_before = listeners()
wait_idle()
max_id = db(query_value, "SELECT coalesce(max(id), 0) FROM mdd.object")
los_before = db(query_value, "SELECT count(*) FROM pg_largeobject_metadata")
started = time.monotonic()
run.deadline = started + SECONDS
threads = [threading.Thread(target=run.worker, daemon=True) for _ in range(JOBS)]
for t in threads:
    t.start()
seen_log = before_log
last_listeners = listeners_before
while any(t.is_alive() for t in threads):
    time.sleep(2)
    # watch for crashes and restarts as they happen, to keep the cases that caused them
    if seen_log is not None:
        lines = crash_lines(seen_log)
        seen_log = log_size()
        if lines:
            run.dump("server log: " + " | ".join(lines[:3]), when=log_time(lines[0]))
    try:
        now = listeners()
    except DBError as e:
        run.dump(f"database unreachable: {e}")
        continue
    if now != last_listeners:
        run.dump(f"listener backends changed from {last_listeners} to {now}")
        last_listeners = now
for t in threads:
    t.join()
elapsed = time.monotonic() - started

note(f"{run.done} cases in {elapsed:.0f} s ({run.done / max(elapsed, 1e-9):.0f}/s), "
     f"{run.controls} unmutated controls")
note("first PDU answered: " + ", ".join(f"{k} {v}" for k, v in run.first.most_common()))
note("connection ended: " + ", ".join(f"{k} {v}" for k, v in run.ended.most_common()))
note(f"C-ECHO successes {run.echo_ok}; C-STORE statuses: "
     + ", ".join(f"0x{k:04X} {v}" if isinstance(k, int) else f"{k} {v}"
                 for k, v in run.store_status.most_common()))
if run.unreadable:
    note(f"{run.unreadable} P-DATA-TF PDUs from the listeners could not be read")

# ---------------------------------------------------------------------------
# the verdict

ok(run.done > 0, f"{run.done} mutated PDU sequences were sent (seed {SEED})")
ok(not run.errors, "every case could connect",
   "\n".join(f"    case {i}: {e}" for i, e in run.errors[:10]))
ok(not run.hangs, f"every connection was closed by the listener within {READ_TIMEOUT:g} s of ours",
   f"    cases {run.hangs[:20]}")
ok(not run.controls_bad, f"the {run.controls} unmutated sequences all succeeded",
   "\n".join(f"    case {i}: {pdus} {found}" for i, pdus, found in run.controls_bad[:5]))
ok(wait_idle(), "the listeners go idle after the run")
is_deeply(listeners(), listeners_before,
          f"the same {len(listeners_before)} listener backends are running (none died or restarted)")
if before_log is not None:
    lines = crash_lines(before_log)
    is_deeply(lines, [], "the server log shows no crash or listener exit during the run")
else:
    skip("no server log at $MDD_DATADIR/server.log")
ok(not run.findings, "nothing went wrong while fuzzing", "\n".join(f"    {f}" for f in run.findings))

a = w.Association.connect(port)
kind, info = a.request("MDD", AE, [(1, w.VERIFICATION, [w.IMPLICIT_VR_LE])])
is_(kind, "AC", "afterwards a proper association is accepted")
is_(a.echo(1).get("Status") if kind == "AC" else None, w.STATUS_SUCCESS,
    "and C-ECHO is answered with success")
if kind == "AC":
    a.release()
a.close()

added = db(query_dicts, """SELECT o.id, o.sop_instance_uid,
                                  (SELECT count(*) FROM mdd.copy c WHERE c.object = o.id) AS copies,
                                  (SELECT count(*) FROM mdd.copy c WHERE c.object = o.id
                                   AND c.state = 'present') AS present,
                                  (SELECT count(*) FROM mdd.copy c JOIN mdd.storage s ON s.id = c.storage
                                   WHERE c.object = o.id AND s.kind = 'large_object') AS los
                           FROM mdd.object o WHERE o.id > %s ORDER BY o.id""", (max_id,))
is_deeply([r["id"] for r in added if r["copies"] == 0 or r["present"] != r["copies"]], [],
          f"each of the {len(added)} objects added has copies, all present")
bad_reads = []
for r in added:
    try:
        got = db(query_value, "SELECT length(mdd.read(%s, true))", (r["id"],))
        if not got:
            bad_reads.append((r["id"], "empty"))
    except DBError as e:
        bad_reads.append((r["id"], describe_error(e)))
is_deeply(bad_reads, [], "and mdd.read(id, true) verifies each of them")
successes = set(run.success_uids)
if len(successes) != len(run.success_uids):
    note(f"{len(run.success_uids) - len(successes)} successful C-STOREs repeated a SOP instance")
stored = {r["sop_instance_uid"] for r in added}
is_(len(added), len(successes),
    f"as many objects were added as C-STOREs of distinct SOP instances succeeded ({len(successes)})")
unexpected = sorted(stored - successes)
is_deeply(stored, successes, "and they are the SOP instances whose C-STORE succeeded")
for uid in unexpected[:10]:
    diag(f"    stored without a success status seen: {uid}: case, ended, send error, PDUs, "
         f"bytes left: {run.sent_uids.get(uid, 'not sent by any case')}")
if unexpected:
    run.dump(f"{len(unexpected)} objects stored without a success status seen",
             sorted({run.sent_uids[u][0] for u in unexpected if u in run.sent_uids})[:50])
    diag(f"    their cases are in {os.path.join(test_dir, f'pdu-fuzz-{SEED}')}")
is_(db(query_value, "SELECT count(*) FROM pg_largeobject_metadata") - los_before,
    sum(r["los"] for r in added), "no large object was left behind by a failed store")
if run.findings or failed_count():
    diag(f"seed {SEED}: rerun with MDD_PDU_FUZZ_SEED={SEED}")
done_testing()
