"""DICOM upper layer PDUs (PS3.8) and DIMSE command sets (PS3.7) on the wire,
for mdd's network tests.

The tests talk to mdd's DICOM listeners through plain sockets, byte by
byte, so that they can send what a real toolkit never would: truncated or
oversized PDUs, unknown PDU types, data sets cut in the middle.  This
module builds the well-formed pieces they start from and reads what comes
back.

  Building    associate_rq, release_rq, release_rp, abort, p_data_tf,
              pdv_pdus (a message cut into P-DATA-TF PDUs), pdu (any type),
              command_set, c_echo_rq, c_store_rq
  Parsing     split_pdus, parse_associate (RQ or AC), parse_associate_rj,
              parse_abort, parse_p_data, parse_command, split_part10
  Talking     read_pdu, Association (connect, negotiate, echo, store,
              release, abort)

PDU and item headers are big endian (PS3.8 section 9.3); command sets are
implicit VR little endian (PS3.7 section 6.3.1).  Parsers raise
ProtocolError on malformed input, never anything else.
"""

import socket
import struct
from collections import namedtuple

# --------------------------------------------------------------------------
# constants

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

PDU_NAMES = {
    A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
    A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", P_DATA_TF: "P-DATA-TF",
    A_RELEASE_RQ: "A-RELEASE-RQ", A_RELEASE_RP: "A-RELEASE-RP", A_ABORT: "A-ABORT",
}

# variable items of the association PDUs
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
ITEM_PRESENTATION_CONTEXT_AC = 0x21
ITEM_ABSTRACT_SYNTAX = 0x30
ITEM_TRANSFER_SYNTAX = 0x40
ITEM_USER_INFORMATION = 0x50
ITEM_MAXIMUM_LENGTH = 0x51
ITEM_IMPLEMENTATION_CLASS_UID = 0x52
ITEM_IMPLEMENTATION_VERSION_NAME = 0x55

# presentation context results (A-ASSOCIATE-AC)
PC_ACCEPTANCE = 0
PC_USER_REJECTION = 1
PC_NO_REASON = 2
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

# A-ASSOCIATE-RJ fields
RJ_PERMANENT = 1
RJ_TRANSIENT = 2
RJ_SOURCE_SERVICE_USER = 1
RJ_SOURCE_ACSE = 2
RJ_SOURCE_PRESENTATION = 3
RJ_NO_REASON = 1
RJ_APPLICATION_CONTEXT_NOT_SUPPORTED = 2
RJ_CALLING_AE_NOT_RECOGNIZED = 3
RJ_CALLED_AE_NOT_RECOGNIZED = 7

# message control header of a PDV
PDV_COMMAND = 0x01
PDV_LAST = 0x02

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"

# this test client (a UUID-derived UID, PS3.5 annex B.2)
IMPLEMENTATION_CLASS_UID = "2.25.205467391808235318127512690424185749021"
IMPLEMENTATION_VERSION = "MDD_WIRE_TEST"

# DIMSE command fields and values
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
DATA_SET_ABSENT = 0x0101
DATA_SET_PRESENT = 0x0000
PRIORITY_MEDIUM = 0x0000
STATUS_SUCCESS = 0x0000

# command elements: tag -> (keyword, VR)
COMMAND_ELEMENTS = {
    0x00000000: ("CommandGroupLength", "UL"),
    0x00000002: ("AffectedSOPClassUID", "UI"),
    0x00000003: ("RequestedSOPClassUID", "UI"),
    0x00000100: ("CommandField", "US"),
    0x00000110: ("MessageID", "US"),
    0x00000120: ("MessageIDBeingRespondedTo", "US"),
    0x00000600: ("MoveDestination", "AE"),
    0x00000700: ("Priority", "US"),
    0x00000800: ("CommandDataSetType", "US"),
    0x00000900: ("Status", "US"),
    0x00000901: ("OffendingElement", "AT"),
    0x00000902: ("ErrorComment", "LO"),
    0x00000903: ("ErrorID", "US"),
    0x00001000: ("AffectedSOPInstanceUID", "UI"),
    0x00001001: ("RequestedSOPInstanceUID", "UI"),
    0x00001030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x00001031: ("MoveOriginatorMessageID", "US"),
}
TAGS = {keyword: tag for tag, (keyword, _) in COMMAND_ELEMENTS.items()}


class ProtocolError(Exception):
    """Bytes that are not what the protocol allows."""


class Closed(Exception):
    """The peer closed the connection (possibly in the middle of a PDU)."""

    def __init__(self, received=b""):
        super().__init__(f"connection closed after {len(received)} bytes of a PDU")
        self.received = received


PDV = namedtuple("PDV", "context_id command last data")
PDV.__doc__ = "One presentation data value: context ID, command flag, last-fragment flag, bytes."

Reject = namedtuple("Reject", "result source reason")
Abort = namedtuple("Abort", "source reason")

# --------------------------------------------------------------------------
# building PDUs


def pdu(pdu_type, payload, length=None):
    """A PDU: type, reserved byte, 4-byte length, payload.  length overrides
    the length field (to lie about it)."""
    n = len(payload) if length is None else length
    return struct.pack(">BBI", pdu_type, 0, n) + payload


def item(item_type, value, length=None):
    """A variable item or sub-item: type, reserved byte, 2-byte length, value."""
    n = len(value) if length is None else length
    return struct.pack(">BBH", item_type, 0, n) + value


def _ascii(text):
    return text.encode("ascii") if isinstance(text, str) else bytes(text)


def _ae(title):
    """An AE title field: 16 bytes, space padded (longer titles are cut)."""
    return _ascii(title)[:16].ljust(16, b" ")


def presentation_context_rq(context_id, abstract_syntax, transfer_syntaxes):
    """A presentation context item of an A-ASSOCIATE-RQ."""
    body = struct.pack(">BBBB", context_id, 0, 0, 0)
    body += item(ITEM_ABSTRACT_SYNTAX, _ascii(abstract_syntax))
    for ts in transfer_syntaxes:
        body += item(ITEM_TRANSFER_SYNTAX, _ascii(ts))
    return item(ITEM_PRESENTATION_CONTEXT_RQ, body)


def user_information(max_pdu=16384, implementation_uid=IMPLEMENTATION_CLASS_UID,
                     implementation_version=IMPLEMENTATION_VERSION):
    """The user information item: maximum length received, implementation
    class UID and (unless None) implementation version name."""
    body = item(ITEM_MAXIMUM_LENGTH, struct.pack(">I", max_pdu))
    if implementation_uid is not None:
        body += item(ITEM_IMPLEMENTATION_CLASS_UID, _ascii(implementation_uid))
    if implementation_version is not None:
        body += item(ITEM_IMPLEMENTATION_VERSION_NAME, _ascii(implementation_version))
    return item(ITEM_USER_INFORMATION, body)


def associate_rq(called_ae, calling_ae, contexts, max_pdu=16384,
                 implementation_uid=IMPLEMENTATION_CLASS_UID,
                 implementation_version=IMPLEMENTATION_VERSION,
                 application_context=APPLICATION_CONTEXT, protocol_version=1):
    """An A-ASSOCIATE-RQ PDU.  contexts: (id, abstract syntax, [transfer
    syntaxes]) each; ids should be odd, 1 to 255."""
    body = struct.pack(">HH", protocol_version, 0) + _ae(called_ae) + _ae(calling_ae)
    body += bytes(32)
    body += item(ITEM_APPLICATION_CONTEXT, _ascii(application_context))
    for context_id, abstract_syntax, transfer_syntaxes in contexts:
        body += presentation_context_rq(context_id, abstract_syntax, transfer_syntaxes)
    body += user_information(max_pdu, implementation_uid, implementation_version)
    return pdu(A_ASSOCIATE_RQ, body)


def release_rq():
    return pdu(A_RELEASE_RQ, bytes(4))


def release_rp():
    return pdu(A_RELEASE_RP, bytes(4))


def abort(source=0, reason=0):
    """An A-ABORT PDU (source 0: service user)."""
    return pdu(A_ABORT, struct.pack(">BBBB", 0, 0, source, reason))


def pdv_item(context_id, command, last, data):
    """One PDV item: 4-byte length, context ID, message control header, data."""
    control = (PDV_COMMAND if command else 0) | (PDV_LAST if last else 0)
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def p_data_tf(pdvs):
    """A P-DATA-TF PDU holding the given PDVs (PDV tuples or
    (context_id, command, last, data))."""
    return pdu(P_DATA_TF, b"".join(pdv_item(*p) for p in pdvs))


def pdv_fragments(context_id, data, command, max_pdu):
    """A message (command set or data set) cut into PDVs, each small enough
    for a P-DATA-TF PDU of at most max_pdu bytes (its variable field,
    PS3.8 annex D.1); the last one carries the last-fragment flag.  An empty
    message gives one empty last fragment.  max_pdu 0 means no limit."""
    room = len(data) if max_pdu == 0 else max_pdu - 6
    if room <= 0 and data:
        raise ValueError(f"maximum PDU length {max_pdu} leaves no room for data")
    room = max(room, 1)
    pieces = [data[i:i + room] for i in range(0, len(data), room)] or [b""]
    return [PDV(context_id, command, i == len(pieces) - 1, p) for i, p in enumerate(pieces)]


def pdv_pdus(context_id, data, command, max_pdu):
    """A message as a list of P-DATA-TF PDUs, one PDV each."""
    return [p_data_tf([p]) for p in pdv_fragments(context_id, data, command, max_pdu)]

# --------------------------------------------------------------------------
# DIMSE command sets


def _encode_value(vr, value):
    if vr == "US":
        return struct.pack("<H", value)
    if vr == "UL":
        return struct.pack("<I", value)
    if vr == "AT":
        return struct.pack("<HH", value >> 16, value & 0xFFFF)
    raw = _ascii(value)
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def command_set(fields):
    """A command set in implicit VR little endian, elements in tag order and
    the command group length first.  fields: {keyword or tag: value}; raw
    bytes are taken as the value's encoding."""
    elements = {}
    for key, value in fields.items():
        tag = TAGS[key] if isinstance(key, str) else key
        if tag == 0:
            continue
        vr = COMMAND_ELEMENTS.get(tag, (None, "OB"))[1]
        raw = value if isinstance(value, (bytes, bytearray)) else _encode_value(vr, value)
        elements[tag] = bytes(raw)
    body = b"".join(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(raw)) + raw
                    for tag, raw in sorted(elements.items()))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def c_echo_rq(message_id):
    return command_set({"AffectedSOPClassUID": VERIFICATION, "CommandField": C_ECHO_RQ,
                        "MessageID": message_id, "CommandDataSetType": DATA_SET_ABSENT})


def c_store_rq(message_id, sop_class_uid, sop_instance_uid, priority=PRIORITY_MEDIUM):
    return command_set({"AffectedSOPClassUID": sop_class_uid, "CommandField": C_STORE_RQ,
                        "MessageID": message_id, "Priority": priority,
                        "CommandDataSetType": DATA_SET_PRESENT,
                        "AffectedSOPInstanceUID": sop_instance_uid})


def parse_command(data):
    """A command set as {keyword (or tag, when unknown): value}: numbers for
    US/UL/AT, text (without padding) for strings."""
    out = {}
    pos = 0
    data = bytes(data)
    while pos < len(data):
        if len(data) - pos < 8:
            raise ProtocolError(f"command set: {len(data) - pos} bytes left, less than an element header")
        group, element, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if length > len(data) - pos:
            raise ProtocolError(f"command set: element ({group:04X},{element:04X}) of "
                                f"{length} bytes overruns the {len(data)} bytes")
        raw = data[pos:pos + length]
        pos += length
        if group != 0:
            raise ProtocolError(f"command set: element ({group:04X},{element:04X}) outside group 0000")
        tag = (group << 16) | element
        keyword, vr = COMMAND_ELEMENTS.get(tag, (tag, "OB"))
        if vr in ("US", "UL", "AT"):
            size = {"US": 2, "UL": 4, "AT": 4}[vr]
            if length != size:
                raise ProtocolError(f"command set: {keyword} has {length} bytes, not {size}")
            if vr == "US":
                value = struct.unpack("<H", raw)[0]
            elif vr == "UL":
                value = struct.unpack("<I", raw)[0]
            else:
                g, e = struct.unpack("<HH", raw)
                value = (g << 16) | e
        elif vr == "OB":
            value = raw
        else:
            value = raw.rstrip(b"\0 ").decode("ascii", "replace")
        out[keyword] = value
    return out

# --------------------------------------------------------------------------
# parsing PDUs


def split_pdus(data):
    """Cut a byte stream into (type, payload) PDUs; returns (pdus, rest),
    rest being an incomplete PDU at the end, if any."""
    pdus = []
    pos = 0
    while len(data) - pos >= 6:
        pdu_type, _, length = struct.unpack_from(">BBI", data, pos)
        if len(data) - pos - 6 < length:
            break
        pdus.append((pdu_type, bytes(data[pos + 6:pos + 6 + length])))
        pos += 6 + length
    return pdus, bytes(data[pos:])


def _items(data, where):
    """The (type, value) items of a variable field."""
    out = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise ProtocolError(f"{where}: {len(data) - pos} stray bytes after the items")
        item_type, _, length = struct.unpack_from(">BBH", data, pos)
        pos += 4
        if length > len(data) - pos:
            raise ProtocolError(f"{where}: item 0x{item_type:02X} of {length} bytes overruns its field")
        out.append((item_type, data[pos:pos + length]))
        pos += length
    return out


def _uid(raw):
    return raw.rstrip(b"\0 ").decode("ascii", "replace")


Associate = namedtuple("Associate", "pdu_type protocol_version called_ae calling_ae "
                       "application_context contexts max_pdu implementation_uid "
                       "implementation_version")
Associate.__doc__ = """An A-ASSOCIATE-RQ or -AC.  contexts: {id: (abstract syntax,
[transfer syntaxes])} for a request, {id: (result, transfer syntax or None)}
for an acceptance."""


def parse_associate(payload, pdu_type=A_ASSOCIATE_AC):
    """The payload of an A-ASSOCIATE-RQ or -AC PDU."""
    payload = bytes(payload)
    if len(payload) < 68:
        raise ProtocolError(f"association PDU of {len(payload)} bytes, less than its 68 fixed bytes")
    version = struct.unpack_from(">H", payload, 0)[0]
    called = payload[4:20].decode("ascii", "replace").strip()
    calling = payload[20:36].decode("ascii", "replace").strip()
    app_context = None
    contexts = {}
    max_pdu = None
    impl_uid = None
    impl_version = None
    for item_type, value in _items(payload[68:], "association PDU"):
        if item_type == ITEM_APPLICATION_CONTEXT:
            app_context = _uid(value)
        elif item_type in (ITEM_PRESENTATION_CONTEXT_RQ, ITEM_PRESENTATION_CONTEXT_AC):
            if len(value) < 4:
                raise ProtocolError("presentation context item shorter than 4 bytes")
            context_id, result = value[0], value[2]
            subs = _items(value[4:], f"presentation context {context_id}")
            syntaxes = [_uid(v) for t, v in subs if t == ITEM_TRANSFER_SYNTAX]
            if item_type == ITEM_PRESENTATION_CONTEXT_RQ:
                abstract = [_uid(v) for t, v in subs if t == ITEM_ABSTRACT_SYNTAX]
                contexts[context_id] = (abstract[0] if abstract else None, syntaxes)
            else:
                contexts[context_id] = (result, syntaxes[0] if syntaxes else None)
        elif item_type == ITEM_USER_INFORMATION:
            for sub_type, sub in _items(value, "user information"):
                if sub_type == ITEM_MAXIMUM_LENGTH:
                    if len(sub) != 4:
                        raise ProtocolError(f"maximum length sub-item of {len(sub)} bytes")
                    max_pdu = struct.unpack(">I", sub)[0]
                elif sub_type == ITEM_IMPLEMENTATION_CLASS_UID:
                    impl_uid = _uid(sub)
                elif sub_type == ITEM_IMPLEMENTATION_VERSION_NAME:
                    impl_version = sub.decode("ascii", "replace").strip()
    return Associate(pdu_type, version, called, calling, app_context, contexts, max_pdu,
                     impl_uid, impl_version)


def parse_associate_rj(payload):
    if len(payload) != 4:
        raise ProtocolError(f"A-ASSOCIATE-RJ of {len(payload)} bytes, not 4")
    return Reject(payload[1], payload[2], payload[3])


def parse_abort(payload):
    if len(payload) != 4:
        raise ProtocolError(f"A-ABORT of {len(payload)} bytes, not 4")
    return Abort(payload[2], payload[3])


def parse_p_data(payload):
    """The PDVs of a P-DATA-TF PDU."""
    out = []
    pos = 0
    payload = bytes(payload)
    while pos < len(payload):
        if len(payload) - pos < 6:
            raise ProtocolError(f"P-DATA-TF: {len(payload) - pos} stray bytes after the PDVs")
        length, context_id, control = struct.unpack_from(">IBB", payload, pos)
        if length < 2 or length > len(payload) - pos - 4:
            raise ProtocolError(f"P-DATA-TF: PDV item length {length} does not fit")
        out.append(PDV(context_id, bool(control & PDV_COMMAND), bool(control & PDV_LAST),
                       payload[pos + 6:pos + 4 + length]))
        pos += 4 + length
    return out


def describe(pdu_type, payload):
    """One line for a received PDU, for test diagnostics."""
    name = PDU_NAMES.get(pdu_type, f"PDU type 0x{pdu_type:02X}")
    try:
        if pdu_type == A_ASSOCIATE_RJ:
            return f"{name} {parse_associate_rj(payload)}"
        if pdu_type == A_ABORT:
            return f"{name} {parse_abort(payload)}"
        if pdu_type == A_ASSOCIATE_AC:
            a = parse_associate(payload)
            return f"{name} contexts {a.contexts} max PDU {a.max_pdu}"
    except ProtocolError as e:
        return f"{name} (malformed: {e})"
    return f"{name} of {len(payload)} bytes"

# --------------------------------------------------------------------------
# Part 10 files


def split_part10(data):
    """A Part 10 file cut into (file meta information bytes, data set bytes,
    transfer syntax UID), using the meta group's (0002,0000) length."""
    data = bytes(data)
    if len(data) < 144 or data[128:132] != b"DICM":
        raise ProtocolError("not a Part 10 file (no DICM prefix)")
    group, element, vr, length = struct.unpack_from("<HH2sH", data, 132)
    if (group, element, vr, length) != (2, 0, b"UL", 4):
        raise ProtocolError("Part 10 file without a leading (0002,0000) UL")
    end = 144 + struct.unpack_from("<I", data, 140)[0]
    meta = data[132:end]
    transfer_syntax = None
    pos = 0
    while pos + 8 <= len(meta):
        g, e, vr = struct.unpack_from("<HH2s", meta, pos)
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            n = struct.unpack_from("<I", meta, pos + 8)[0]
            start = pos + 12
        else:
            n = struct.unpack_from("<H", meta, pos + 6)[0]
            start = pos + 8
        if (g, e) == (2, 0x10):
            transfer_syntax = _uid(meta[start:start + n])
        pos = start + n
    return data[:end], data[end:], transfer_syntax

# --------------------------------------------------------------------------
# talking


def recv_exact(sock, n):
    """Exactly n bytes; raises Closed (with what came) when the peer closes."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise Closed(bytes(buf))
        buf += chunk
    return bytes(buf)


def read_pdu(sock, max_length=1 << 24):
    """The next PDU as (type, payload).  Raises Closed on end of stream,
    ProtocolError for a PDU longer than max_length, socket.timeout when the
    socket's timeout passes."""
    header = recv_exact(sock, 6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if length > max_length:
        raise ProtocolError(f"{PDU_NAMES.get(pdu_type, hex(pdu_type))} announces {length} bytes")
    try:
        return pdu_type, recv_exact(sock, length)
    except Closed as e:
        raise Closed(header + e.received) from None


class Association:
    """A client side association over a plain socket, kept simple: one
    message at a time, every answer awaited.

        a = Association.connect(port)
        kind, info = a.request("MDD", "ME", [(1, VERIFICATION, [IMPLICIT_VR_LE])])
        status = a.echo(1)
        a.release()
    """

    def __init__(self, sock):
        self.sock = sock
        self.accepted = None        # the Associate of the A-ASSOCIATE-AC
        self.max_pdu = 16384        # what the peer receives (from its AC)
        self.message_id = 0

    @classmethod
    def connect(cls, port, host="127.0.0.1", timeout=10.0):
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(timeout)
        return cls(sock)

    def send(self, data):
        self.sock.sendall(data)

    def read(self, max_length=1 << 24):
        return read_pdu(self.sock, max_length)

    def request(self, called_ae, calling_ae, contexts, **kw):
        """Send an A-ASSOCIATE-RQ; returns ("AC", Associate), ("RJ", Reject),
        ("ABORT", Abort) or (name of another PDU, payload)."""
        self.send(associate_rq(called_ae, calling_ae, contexts, **kw))
        pdu_type, payload = self.read()
        if pdu_type == A_ASSOCIATE_AC:
            self.accepted = parse_associate(payload, A_ASSOCIATE_AC)
            if self.accepted.max_pdu:
                self.max_pdu = self.accepted.max_pdu
            return "AC", self.accepted
        if pdu_type == A_ASSOCIATE_RJ:
            return "RJ", parse_associate_rj(payload)
        if pdu_type == A_ABORT:
            return "ABORT", parse_abort(payload)
        return PDU_NAMES.get(pdu_type, hex(pdu_type)), payload

    def accepted_syntax(self, context_id):
        """The transfer syntax the peer accepted for a context, or None."""
        result, ts = (self.accepted.contexts.get(context_id, (None, None))
                      if self.accepted else (None, None))
        return ts if result == PC_ACCEPTANCE else None

    def next_message_id(self):
        self.message_id = (self.message_id % 0xFFFF) + 1
        return self.message_id

    def send_message(self, context_id, command, dataset=None, fragment=None):
        """Send a command set and, unless None, a data set, each cut into
        PDVs of at most fragment bytes (default: what the peer receives)."""
        limit = self.max_pdu if fragment is None else fragment + 6
        for p in pdv_pdus(context_id, command, True, limit):
            self.send(p)
        if dataset is not None:
            for p in pdv_pdus(context_id, dataset, False, limit):
                self.send(p)

    def receive_message(self):
        """The next DIMSE message: (context_id, command dict, data set bytes or
        None).  Raises ProtocolError when anything but P-DATA-TF comes (the
        exception's args carry the PDU type and payload)."""
        command = bytearray()
        dataset = bytearray()
        context_id = None
        have_command = False
        want_dataset = False
        while True:
            pdu_type, payload = self.read()
            if pdu_type != P_DATA_TF:
                raise ProtocolError(f"expected P-DATA-TF, got {describe(pdu_type, payload)}",
                                    pdu_type, payload)
            for p in parse_p_data(payload):
                context_id = p.context_id
                if p.command:
                    command += p.data
                    if p.last:
                        have_command = True
                        fields = parse_command(command)
                        want_dataset = fields.get("CommandDataSetType", DATA_SET_ABSENT) != DATA_SET_ABSENT
                        if not want_dataset:
                            return context_id, fields, None
                else:
                    dataset += p.data
                    if p.last and have_command:
                        return context_id, fields, bytes(dataset)

    def echo(self, context_id):
        """C-ECHO; returns the response's command fields."""
        mid = self.next_message_id()
        self.send_message(context_id, c_echo_rq(mid))
        _, fields, _ = self.receive_message()
        return fields

    def store(self, context_id, sop_class_uid, sop_instance_uid, dataset, fragment=None):
        """C-STORE of a data set (bytes in the context's transfer syntax);
        returns the response's command fields."""
        mid = self.next_message_id()
        self.send_message(context_id, c_store_rq(mid, sop_class_uid, sop_instance_uid),
                          dataset, fragment)
        _, fields, _ = self.receive_message()
        return fields

    def release(self):
        """A-RELEASE-RQ; True when A-RELEASE-RP came back."""
        self.send(release_rq())
        pdu_type, _ = self.read()
        return pdu_type == A_RELEASE_RP

    def abort(self):
        try:
            self.send(abort())
        except OSError:
            pass
        self.close()

    def wait_closed(self, timeout=5.0):
        """Read until the peer closes the connection or timeout seconds pass.
        Returns (closed, pdus): whether it closed, and the (type, payload)
        PDUs it sent meanwhile."""
        self.sock.settimeout(timeout)
        got = []
        try:
            while True:
                got.append(self.read())
        except (Closed, ConnectionResetError):
            return True, got
        except (socket.timeout, ProtocolError):
            return False, got

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
