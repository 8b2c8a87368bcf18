"""A private Orthanc for mdd's integration tests.

Orthanc (Debian's orthanc package, /usr/sbin/Orthanc) is started with a
configuration written by the test: free DICOM and HTTP ports, storage and
index in a directory of the test, no plugins, no authentication,
TCP_NODELAY=1.  Orthanc 1.10 has no setting to listen on 127.0.0.1 only,
so its HTTP server refuses remote clients (RemoteAccessAllowed false) and
its DICOM server accepts only the configured modalities, from their own
hosts.  When the test runs as root, Orthanc runs as an unprivileged user
("orthanc" when the package created it, else "nobody"); the directories
above workdir must let that user through.  Its REST API is driven with
urllib (no third-party module).

    o = Orthanc(workdir, modalities={"mdd": ["MDD", "127.0.0.1", 11112]})
    try:
        o.start()
        status, body = o.post("/modalities/mdd/echo", {})
    finally:
        o.stop()

Every REST call returns (HTTP status, body): the body parsed as JSON when it
is JSON, else the raw bytes; status 0 when no answer came (connection
refused, timeout), with the error text as body.
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

ORTHANC = os.environ.get("MDD_ORTHANC", "/usr/sbin/Orthanc")


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _unprivileged_user():
    for name in ("orthanc", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("no unprivileged user (orthanc, nobody) to run Orthanc as")


class Orthanc:
    def __init__(self, workdir, aet="ORTHANC", modalities=None, config=None,
                 host="127.0.0.1", timeout=60):
        """workdir: a directory for the configuration, storage, index and log
        (created).  modalities: Orthanc's DicomModalities.  config: further
        settings that override the defaults below.  timeout: seconds a REST
        call may take."""
        self.workdir = os.path.abspath(workdir)
        self.aet = aet
        self.host = host
        self.timeout = timeout
        self.dicom_port = free_port(host)
        self.http_port = free_port(host)
        while self.http_port == self.dicom_port:
            self.http_port = free_port(host)
        self.storage = os.path.join(self.workdir, "storage")
        self.config_path = os.path.join(self.workdir, "orthanc.json")
        self.log_path = os.path.join(self.workdir, "orthanc.log")
        self.process = None
        self.config = {
            "Name": f"mdd-test-{aet}",
            "StorageDirectory": self.storage,
            "IndexDirectory": self.storage,
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpDescribeErrors": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            # only the modalities given may associate, from their own host
            "DicomModalities": modalities or {},
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "DeidentifyLogs": False,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "OverwriteInstances": False,
            "StableAge": 3600,
            "MaximumStorageSize": 0,
            "MaximumPatientCount": 0,
        }
        if config:
            self.config.update(config)

    # ------------------------------------------------------------------
    # process

    def start(self, wait=30):
        """Write the configuration, start Orthanc and wait until its REST API
        answers GET /system.  Raises RuntimeError (with the log) when it
        does not come up."""
        os.makedirs(self.storage, exist_ok=True)
        with open(self.config_path, "w", encoding="utf-8") as fh:
            json.dump(self.config, fh, indent=2)
        cmd = [ORTHANC, "--verbose", f"--logfile={self.log_path}", self.config_path]
        as_user = {}
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            user = _unprivileged_user()
            for root, dirs, files in os.walk(self.workdir):
                os.chown(root, user.pw_uid, user.pw_gid)
                for f in files:
                    os.chown(os.path.join(root, f), user.pw_uid, user.pw_gid)
            as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            self.user = user.pw_name
        env = dict(os.environ, TCP_NODELAY="1", HOME=self.workdir)
        self.process = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                        start_new_session=True, **as_user)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {self.process.returncode} "
                                   f"while starting:\n{self.log_tail()}")
            status, body = self.get("/system", timeout=2)
            if status == 200 and isinstance(body, dict):
                self.system = body
                return body
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc's REST API did not answer within {wait} s:\n{self.log_tail()}")

    def stop(self, wait=20):
        """Stop Orthanc (SIGTERM to its process group, SIGKILL after wait
        seconds).  Safe to call more than once or when it never started."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)

    def running(self):
        return self.process is not None and self.process.poll() is None

    def log(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError as e:
            return f"(no Orthanc log: {e})"

    def log_tail(self, lines=60):
        return "\n".join(self.log().splitlines()[-lines:])

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_since(self, offset):
        return self.log().encode("utf-8", "replace")[offset:].decode("utf-8", "replace")

    def remove(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------
    # REST

    def request(self, method, path, body=None, timeout=None, content_type=None):
        url = f"http://{self.host}:{self.http_port}{path}"
        data = None
        headers = {}
        if body is not None:
            if isinstance(body, (bytes, bytearray)):
                data = bytes(body)
                headers["Content-Type"] = content_type or "application/dicom"
            else:
                data = json.dumps(body).encode()
                headers["Content-Type"] = content_type or "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, raw, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        except (OSError, urllib.error.URLError) as e:
            return 0, f"{type(e).__name__}: {e}"
        if "json" in ctype:
            try:
                return status, json.loads(raw.decode("utf-8"))
            except ValueError:
                pass
        return status, raw

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body if body is not None else {}, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)

    def put(self, path, body=None, **kw):
        return self.request("PUT", path, body, **kw)
