"""Private WebDAV and S3 servers for mdd's integration tests.

The servers are those of scripts/peers (nginx with WebDAV, and s3rver
behind scripts/peers/s3-server.js), but each instance belongs to the test
that makes it: its own free port on 127.0.0.1, its own directory, its own
credentials (made up at random), so that a test may stop and start it again
in the middle of what it does without disturbing the peers test/run starts
for other tests.  Started as root, the servers run as nobody (the scripts'
MDD_PEER_USER); the directories above workdir must let that user through.

    dav = DavPeer(os.path.join(test_dir, "dav"))
    s3 = S3Peer(os.path.join(test_dir, "s3"), bucket="mdd")
    try:
        dav.start(); s3.start()
        ... mdd.add_storage('d', 'http', 'archive', dav.storage_options("sub/"))
        dav.stop(abrupt=True)   # kill -9 in the middle of something
        dav.start()             # same port, same directory, same blobs
        dav.blobs("sub/")       # the locators of the blobs it holds under auth/sub/
    finally:
        dav.stop(); s3.stop()

start() and stop() run the scripts; start returns once the server answers,
stop(abrupt=True) kills the server (and its children) with SIGKILL before
the script's stop.  Both raise RuntimeError with the script's output and
the server's log when the script fails.  credentials() lists the secrets of
a peer, for tests that check that none of them leaks.
"""

import os
import secrets
import signal
import socket
import subprocess
import time

__all__ = ["free_port", "DavPeer", "S3Peer"]

_TOP = os.environ.get("MDD_TOP") or os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
_SCRIPTS = os.path.join(_TOP, "scripts", "peers")


def free_port(host="127.0.0.1", avoid=()):
    """A TCP port nobody listens on now (bind to port 0 and let it go)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise RuntimeError("no free port found")


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid):
    """The processes whose parent is pid (nginx's workers)."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return found


def _tail(path, lines=20):
    try:
        with open(path, "rb") as fh:
            return "".join(fh.read().decode("utf-8", "replace").splitlines(True)[-lines:])
    except OSError:
        return ""


class _Peer:
    script = None       # file name in scripts/peers
    log_name = None     # its log, under dir

    def __init__(self, directory, port=None):
        self.dir = os.path.abspath(directory)
        self.port = port or free_port()
        os.makedirs(self.dir, exist_ok=True)
        self.starts = 0
        self.stops = 0

    # the environment the script needs (credentials included)
    def _env(self):
        return dict(os.environ)

    def _run(self, *args, timeout=60):
        cmd = [os.path.join(_SCRIPTS, self.script), *args]
        try:
            r = subprocess.run(cmd, env=self._env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{' '.join(cmd)} did not end within {timeout} s") from e
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): "
                               f"{r.stdout.decode('utf-8', 'replace').strip()}\n"
                               f"--- {self.log_name}:\n{self.log_tail()}")
        return r

    def start(self, timeout=60):
        """Start the server (returns once it answers)."""
        self._run("start", self.dir, str(self.port), timeout=timeout)
        self.starts += 1

    def stop(self, abrupt=False, timeout=30):
        """Stop the server with the script (TERM, then KILL after 5 s);
        nothing when it is not running.  With abrupt, first kill -9 the
        server and its children, as a crash or a power cut would: a
        graceful stop may go on serving the connections a client keeps
        open (s3-server.js closes its listening socket at once but answers
        on open keep-alive connections until they end)."""
        pid = self.pid()
        if abrupt and pid and self.running():
            victims = [pid] + _children(pid)
            for p in victims:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(_alive(p) for p in victims):
                time.sleep(0.01)
        self._run("stop", self.dir, timeout=timeout)
        self.stops += 1

    def pid(self):
        try:
            with open(os.path.join(self.dir, self.pid_file)) as fh:
                return int(fh.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def running(self):
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def accepts(self, timeout=1.0):
        """Whether a TCP connection to its port succeeds now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout):
                return True
        except OSError:
            return False

    def log_path(self):
        return os.path.join(self.dir, self.log_name)

    def log_tail(self, lines=20):
        return _tail(self.log_path(), lines)

    def logs(self):
        """{name: text} of every log the server writes."""
        out = {}
        for name in self.log_names:
            try:
                with open(os.path.join(self.dir, name), "rb") as fh:
                    out[name] = fh.read().decode("utf-8", "replace")
            except OSError:
                pass
        return out

    def _files(self, top, suffix=""):
        found = set()
        for root, _, files in os.walk(top):
            for f in files:
                if f.endswith(suffix):
                    rel = os.path.relpath(os.path.join(root, f), top)
                    found.add(rel[:len(rel) - len(suffix)] if suffix else rel)
        return found


class DavPeer(_Peer):
    """nginx with WebDAV (scripts/peers/nginx-dav.sh).  Its /auth/ location
    asks for basic authentication with self.user and self.password."""
    script = "nginx-dav.sh"
    log_name = "error.log"
    log_names = ("error.log", "access.log")
    pid_file = "nginx.pid"

    def __init__(self, directory, port=None, user="mdd", password=None):
        super().__init__(directory, port)
        self.user = user
        self.password = password or "dav-" + secrets.token_hex(12)

    def _env(self):
        return dict(os.environ, MDD_DAV_USER=self.user, MDD_DAV_PASSWORD=self.password)

    def base_url(self):
        return f"http://127.0.0.1:{self.port}/"

    def storage_options(self, sub, location="auth", **extra):
        """Options of an mdd http storage for the collection location/sub/
        (with the credentials when location is auth)."""
        o = {"url": f"{self.base_url()}{location}/{sub}"}
        if location == "auth":
            o.update(username=self.user, password=self.password)
        o.update(extra)
        return o

    def blobs(self, sub, location="auth"):
        """The locators (relative paths) of the blobs under location/sub/."""
        return self._files(os.path.join(self.dir, "www", location, sub))

    def credentials(self):
        return [self.password]


class S3Peer(_Peer):
    """s3rver behind scripts/peers/s3-server.js (scripts/peers/s3.sh): V4
    signatures with self.key_id / self.secret, Content-MD5 required."""
    script = "s3.sh"
    log_name = "s3.log"
    log_names = ("s3.log",)
    pid_file = "s3.pid"

    def __init__(self, directory, port=None, bucket="mdd", region="us-east-1"):
        super().__init__(directory, port)
        self.bucket = bucket
        self.region = region
        self.key_id = "MDDT" + secrets.token_hex(6).upper()
        self.secret = secrets.token_hex(20)

    def _env(self):
        return dict(os.environ, MDD_S3_ACCESS_KEY_ID=self.key_id, MDD_S3_SECRET_ACCESS_KEY=self.secret,
                    MDD_S3_REGION=self.region, MDD_S3_BUCKETS=self.bucket, MDD_S3_REQUIRE_CONTENT_MD5="1")

    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self, prefix=None, **extra):
        o = {"endpoint": self.endpoint(), "bucket": self.bucket, "region": self.region,
             "access_key_id": self.key_id, "secret_access_key": self.secret}
        if prefix:
            o["prefix"] = prefix
        o.update(extra)
        return o

    def blobs(self, prefix=""):
        """The keys (after prefix/) of the objects the bucket holds under prefix."""
        return self._files(os.path.join(self.dir, "data", self.bucket, prefix), "._S3rver_object")

    def credentials(self):
        return [self.key_id, self.secret]
