"""DCMTK's dcmqrscp as a test PACS for mdd's integration tests and benchmarks.

A QRSCP is a dcmqrscp of its own: a free port of 127.0.0.1, a configuration
file generated in a directory of the test, one AE title with its storage
area (the index.dat and the DICOM files) under that directory, a generous
quota (500 studies, 1024 MB: dcmqrscp's quota silently deletes the oldest
studies), and a host table of the AEs it may C-MOVE to (their title, host and
port).  Any AE may query it (C-FIND, C-MOVE, C-GET); it serves each
association in a child process (dcmqrscp's default; its --single-process
mode of DCMTK 3.6.7 exits after the first association), so the caller
serializes its use: dcmqrscp loses instances under parallel associations.

    with QRSCP(workdir, "QR1", peers={"MDD": ("127.0.0.1", 11112)}) as qr:
        qr.load(["/path/a.dcm", "/path/b.dcm"])    # copied in and indexed
        qr.port, qr.aet
        qr.indexed()        # {SOP Instance UID: path} of what its index holds

load() copies the files into the storage area and registers them with
dcmqridx (the server may run meanwhile: dcmqridx and dcmqrscp lock the
index file); store() sends them with storescu instead, one association, and
checks that the index holds them afterwards (storescu exits 0 even when
stores fail).  Either way the files of one load end in the index before the
call returns, so a test's later C-FIND sees them.

When the test runs as root, dcmqrscp and dcmqridx run as the unprivileged
user of dicomtools (nobody), and the directories they write are theirs; the
directories above workdir must let that user through.  Every DCMTK process
runs with TCP_NODELAY=1 and a time limit; stop() kills the server, and a
with block stops it whatever happened.  extra: more dcmqrscp options, for
example ["-Cr", "+L1"] to answer every C-FIND in ISO 8859-1 whatever the
request asks (without them dcmqrscp answers in the character set the request
names, else in the one of the stored file).
"""

import os
import pwd
import shutil
import signal
import subprocess
import time

from dicomtools import DCMTK_ENV, HOST, free_port, port_open, unprivileged_user

QUOTA = "(500, 1024mb)"


class QRSCP:
    def __init__(self, workdir, aet, peers=None, extra=(), user="default", max_pdu=65536):
        """workdir: a directory for this archive (created; the configuration,
        log and storage area go in it).  aet: its AE title.  peers: {AE title:
        (host, port)} of the AEs it may C-MOVE to.  extra: more dcmqrscp
        options.  user: run as this user; "default" means dicomtools'
        unprivileged_user() (nobody when root, else oneself)."""
        self.workdir = os.path.abspath(workdir)
        self.aet = aet
        self.peers = dict(peers or {})
        self.extra = list(extra)
        self.user = unprivileged_user() if user == "default" else user
        self.max_pdu = max_pdu
        self.port = free_port()
        self.storage = os.path.join(self.workdir, "storage")
        self.config_path = os.path.join(self.workdir, "dcmqrscp.cfg")
        self.log_path = os.path.join(self.workdir, "dcmqrscp.log")
        self.proc = None
        self.loaded = 0
        os.makedirs(self.storage, exist_ok=True)
        self._own(self.workdir)
        self._own(self.storage)

    # ------------------------------------------------------------------
    # files and users

    def _ids(self):
        if self.user is None:
            return None
        entry = pwd.getpwnam(self.user)
        return entry.pw_uid, entry.pw_gid

    def _own(self, path):
        ids = self._ids()
        if ids is not None:
            os.chown(path, *ids)

    def _drop(self):
        ids = self._ids()
        if ids is None:
            return {}
        return dict(user=ids[0], group=ids[1], extra_groups=[])

    def _write_config(self):
        def quoted(s):
            if any(c in s for c in ' ,()="'):
                raise ValueError(f"unusable character in dcmqrscp configuration value {s!r}")
            return s

        hosts = []
        for n, (aet, (host, port)) in enumerate(sorted(self.peers.items())):
            hosts.append(f"peer{n} = ({quoted(aet)}, {quoted(host)}, {int(port)})")
        name = self.user or pwd.getpwuid(os.geteuid()).pw_name
        group_id = pwd.getpwnam(name).pw_gid
        import grp
        group = grp.getgrgid(group_id).gr_name
        text = "\n".join([
            "# written by test/t/lib/qrscp.py",
            f"NetworkTCPPort  = {self.port}",
            f"MaxPDUSize      = {self.max_pdu}",
            "MaxAssociations = 16",
            f"UserName        = {name}",
            f"GroupName       = {group}",
            "",
            "HostTable BEGIN",
            *hosts,
            "HostTable END",
            "",
            "VendorTable BEGIN",
            "VendorTable END",
            "",
            "AETable BEGIN",
            f"{quoted(self.aet)}  {quoted(self.storage)}  RW  {QUOTA}  ANY",
            "AETable END",
            "",
        ])
        with open(self.config_path, "w", encoding="ascii") as fh:
            fh.write(text)
        self._own(self.config_path)

    # ------------------------------------------------------------------
    # process

    def start(self, timeout=15):
        """Write the configuration, start dcmqrscp and return once its port
        accepts connections.  Raises RuntimeError with its log when it does
        not come up."""
        self._write_config()
        cmd = ["dcmqrscp", "-v", "-dhl", "-c", self.config_path, *self.extra, str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         stdin=subprocess.DEVNULL, env=DCMTK_ENV,
                                         start_new_session=True, **self._drop())
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dcmqrscp did not start: {' '.join(cmd)}\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self):
        """Kill dcmqrscp and the children serving associations (its process
        group); safe when it is not running."""
        p = self.proc
        if p is not None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if p is not None:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def running(self):
        return self.proc is not None and self.proc.poll() is None

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

    def log_tail(self, lines=40):
        return "\n".join(self.log().splitlines()[-lines:])

    # ------------------------------------------------------------------
    # data

    def _run(self, cmd, timeout):
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=DCMTK_ENV,
                               stdin=subprocess.DEVNULL, timeout=timeout, **self._drop())
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{cmd[0]} did not end within {timeout} s") from e
        out = r.stdout.decode("utf-8", "replace")
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({r.returncode}):\n{out}")
        return out

    def load(self, paths, timeout=120):
        """Copy DICOM files into the storage area and register them in the
        index with dcmqridx.  Returns the paths of the copies."""
        copies = []
        for path in paths:
            self.loaded += 1
            dest = os.path.join(self.storage, f"load{self.loaded:06d}.dcm")
            shutil.copyfile(path, dest)
            self._own(dest)
            copies.append(dest)
        for i in range(0, len(copies), 200):
            self._run(["dcmqridx", "-q", self.storage, *copies[i:i + 200]], timeout)
        return copies

    def store(self, paths, calling="QRLOADER", timeout=120):
        """Send DICOM files to the running server with storescu (one
        association) and check that its index then holds each of them;
        raises RuntimeError naming what is missing."""
        import pydicom
        want = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
        cmd = ["storescu", "-aet", calling, "-aec", self.aet, HOST, str(self.port), *paths]
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=DCMTK_ENV,
                               stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"storescu did not end within {timeout} s") from e
        missing = want - set(self.indexed())
        if missing:
            raise RuntimeError(f"{self.aet} does not hold {len(missing)} of the {len(want)} stored "
                               f"instances after storescu (exit {r.returncode}):\n"
                               f"{r.stdout.decode('utf-8', 'replace')}\n{self.log_tail()}")

    def indexed(self):
        """{SOP Instance UID: file path} of what the index holds (dcmqridx -p)."""
        out = self._run(["dcmqridx", "-p", self.storage], 60)
        held = {}
        filename = None
        for line in out.splitlines():
            line = line.strip()
            # each record: "Filename: /path" ... "SOPInstanceUID: "1.2.3""
            if line.startswith("Filename:"):
                filename = line.split(":", 1)[1].strip()
            elif line.startswith("SOPInstanceUID:") and filename is not None:
                held[line.split(":", 1)[1].strip().strip('"')] = filename
                filename = None
        return held
