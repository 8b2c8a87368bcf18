"""A small PACS of mdd's tests that misbehaves on purpose: it answers a
C-MOVE with success at once and sends the objects later (or some never),
which is what the retrieve jobs must survive: a final response that comes
before the objects do, or counts that do not match what arrives.

It serves one association at a time on a free port of 127.0.0.1, in a
thread, over plain sockets (lib/dicomwire.py): any AE may associate; every
proposed context is accepted in its first transfer syntax; C-ECHO is
answered; C-FIND in the Study Root model is answered at SERIES and IMAGE
level from the files it was given (matching StudyInstanceUID,
SeriesInstanceUID and SOPInstanceUID, single values or lists, and
returning the keys asked for); C-MOVE is answered at once with a final
Success that counts every matching instance as completed, after which a
thread sends the matches with DCMTK's storescu (calling as this PACS's AE
title) to the destination, `delay` seconds later, leaving out the SOP
Instance UIDs in `withhold`.

    with FakePacs(files, aet="FAKE", destinations={"MDD": ("127.0.0.1", 11112)},
                  delay=2.0, withhold={uid}) as pacs:
        pacs.port, pacs.moves (C-MOVE requests served), pacs.sent (UIDs sent)

Everything the PACS does is also written to a log (pacs.log()).
"""

import os
import socket
import struct
import subprocess
import threading
import time

import dicomwire as w
from dicomtools import DCMTK_ENV, HOST, decode_dataset, encode_dataset

FIND_STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.1"
MOVE_STUDY_ROOT = "1.2.840.10008.5.1.4.1.2.2.2"
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021


def _us(n):
    return struct.pack("<H", n)


class FakePacs:
    def __init__(self, files, aet="FAKEPACS", destinations=None, delay=0.0, withhold=()):
        """files: paths of the DICOM files it holds.  destinations: {AE
        title: (host, port)} it may C-MOVE to."""
        import pydicom
        self.aet = aet
        self.destinations = dict(destinations or {})
        self.delay = delay
        self.withhold = set(withhold)
        self.instances = []
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.instances.append(dict(path=path, study=str(ds.StudyInstanceUID),
                                       series=str(ds.SeriesInstanceUID), sop=str(ds.SOPInstanceUID),
                                       sop_class=str(ds.SOPClassUID)))
        self.moves = 0
        self.sent = []
        self._log = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]

    # ------------------------------------------------------------------

    def log(self):
        with self._lock:
            return "\n".join(self._log)

    def _note(self, text):
        with self._lock:
            self._log.append(f"{time.monotonic():.3f} {text}")

    def start(self):
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        t = threading.Thread(target=self._serve, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(30)
            try:
                self._association(w.Association(conn))
            except (w.Closed, w.ProtocolError, OSError) as e:
                self._note(f"association ended: {type(e).__name__}: {e}")
            finally:
                conn.close()

    # ------------------------------------------------------------------

    def _association(self, a):
        pdu_type, payload = a.read()
        if pdu_type != w.A_ASSOCIATE_RQ:
            return
        rq = w.parse_associate(payload, w.A_ASSOCIATE_RQ)
        self._note(f"association from {rq.calling_ae}")
        syntaxes = {}
        body = struct.pack(">HH", 1, 0) + w._ae(rq.called_ae) + w._ae(rq.calling_ae) + bytes(32)
        body += w.item(w.ITEM_APPLICATION_CONTEXT, w._ascii(w.APPLICATION_CONTEXT))
        for cid, (abstract, offered) in sorted(rq.contexts.items()):
            ts = offered[0] if offered else w.IMPLICIT_VR_LE
            syntaxes[cid] = ts
            body += w.item(w.ITEM_PRESENTATION_CONTEXT_AC,
                           struct.pack(">BBBB", cid, 0, w.PC_ACCEPTANCE, 0)
                           + w.item(w.ITEM_TRANSFER_SYNTAX, w._ascii(ts)))
        body += w.user_information(max_pdu=65536)
        a.send(w.pdu(w.A_ASSOCIATE_AC, body))
        a.max_pdu = rq.max_pdu or 16384
        while True:
            pdu = w.read_pdu(a.sock)
            if pdu[0] == w.A_RELEASE_RQ:
                a.send(w.release_rp())
                return
            if pdu[0] != w.P_DATA_TF:
                return
            cid, fields, data = self._rest_of_message(a, pdu)
            field = fields.get("CommandField")
            if field == w.C_ECHO_RQ:
                a.send_message(cid, w.command_set({
                    "AffectedSOPClassUID": w.VERIFICATION, "CommandField": w.C_ECHO_RSP,
                    "MessageIDBeingRespondedTo": fields["MessageID"],
                    "CommandDataSetType": w.DATA_SET_ABSENT, "Status": 0}))
            elif field == C_FIND_RQ:
                self._find(a, cid, fields, decode_dataset(data, syntaxes[cid]), syntaxes[cid])
            elif field == C_MOVE_RQ:
                self._move(a, cid, fields, decode_dataset(data, syntaxes[cid]))
            else:
                self._note(f"unexpected command {field!r}")
                a.send(w.abort())
                return

    @staticmethod
    def _rest_of_message(a, first):
        """The message whose first P-DATA-TF PDU was already read."""
        pending = [first]
        original = a.read

        def read(max_length=1 << 24):
            if pending:
                return pending.pop()
            return original(max_length)
        a.read = read
        try:
            return a.receive_message()
        finally:
            a.read = original

    def _matches(self, ids):
        def wanted(key, value):
            v = str(ids.get(key, "") or "")
            return not v or value in v.split("\\")
        return [i for i in self.instances
                if wanted("StudyInstanceUID", i["study"]) and wanted("SeriesInstanceUID", i["series"])
                and wanted("SOPInstanceUID", i["sop"])]

    def _find(self, a, cid, fields, ids, ts):
        from pydicom.dataset import Dataset
        level = str(ids.get("QueryRetrieveLevel", ""))
        matches = self._matches(ids)
        if level == "SERIES":
            seen = {}
            for m in matches:
                seen.setdefault(m["series"], m)
            matches = list(seen.values())
        self._note(f"C-FIND at {level}: {len(matches)} matches")
        for m in matches:
            out = Dataset()
            out.QueryRetrieveLevel = level
            out.StudyInstanceUID = m["study"]
            out.SeriesInstanceUID = m["series"]
            if level == "IMAGE":
                out.SOPInstanceUID = m["sop"]
                if "SOPClassUID" in ids:
                    out.SOPClassUID = m["sop_class"]
            a.send_message(cid, w.command_set({
                "AffectedSOPClassUID": FIND_STUDY_ROOT, "CommandField": C_FIND_RSP,
                "MessageIDBeingRespondedTo": fields["MessageID"],
                "CommandDataSetType": w.DATA_SET_PRESENT, "Status": 0xFF00}), encode_dataset(out, ts))
        a.send_message(cid, w.command_set({
            "AffectedSOPClassUID": FIND_STUDY_ROOT, "CommandField": C_FIND_RSP,
            "MessageIDBeingRespondedTo": fields["MessageID"],
            "CommandDataSetType": w.DATA_SET_ABSENT, "Status": 0}))

    def _move(self, a, cid, fields, ids):
        matches = self._matches(ids)
        destination = str(fields.get("MoveDestination", "")).strip()
        with self._lock:
            self.moves += 1
        self._note(f"C-MOVE of {len(matches)} instances to {destination}: success at once")
        a.send_message(cid, w.command_set({
            "AffectedSOPClassUID": MOVE_STUDY_ROOT, "CommandField": C_MOVE_RSP,
            "MessageIDBeingRespondedTo": fields["MessageID"],
            "CommandDataSetType": w.DATA_SET_ABSENT, "Status": 0,
            0x00001020: _us(0), 0x00001021: _us(len(matches)), 0x00001022: _us(0),
            0x00001023: _us(0)}))
        send = [m for m in matches if m["sop"] not in self.withhold]
        if destination in self.destinations and send:
            t = threading.Thread(target=self._deliver, args=(destination, send), daemon=True)
            t.start()
            self._threads.append(t)

    def _deliver(self, destination, matches):
        host, port = self.destinations[destination]
        if self._stop.wait(self.delay):
            return
        cmd = ["storescu", "-aet", self.aet, "-aec", destination, host, str(port),
               *[m["path"] for m in matches]]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=DCMTK_ENV,
                           timeout=60)
        with self._lock:
            self.sent += [m["sop"] for m in matches]
        self._note(f"sent {len(matches)} instances to {destination} (storescu exit {r.returncode}):\n"
                   + r.stdout.decode("utf-8", "replace")[-2000:])
