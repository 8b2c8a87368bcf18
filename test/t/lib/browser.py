"""A headless Chromium for mdd's browser tests, driven through chromedriver
(Debian chromium-driver) with the W3C WebDriver protocol over HTTP, plus
chromedriver's pass-through to the DevTools protocol (goog/cdp/execute) for
what WebDriver lacks: request headers (HTTP Basic credentials on every
request of the page) and the console log.  Standard library only.
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class BrowserError(Exception):
    pass


def available():
    """Why no browser can run here, or None when one can."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is not installed (Debian chromium, chromium-driver)"
    return None


class Browser:
    """One chromedriver process and one headless Chromium session."""

    def __init__(self, port, workdir, width=1400, height=1000, extra_args=()):
        """extra_args: more Chromium command-line flags."""
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.profile = os.path.join(workdir, "chromium-profile")
        shutil.rmtree(self.profile, ignore_errors=True)
        os.makedirs(self.profile)
        self.log = open(os.path.join(workdir, "chromedriver.log"), "w")
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"],
                                       stdout=self.log, stderr=subprocess.STDOUT)
        self.session = None
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or self.driver.poll() is not None:
                    self.quit()
                    raise BrowserError("chromedriver did not start")
                time.sleep(0.1)
        args = ["--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                f"--window-size={width},{height}", f"--user-data-dir={self.profile}",
                "--force-device-scale-factor=1", *extra_args]
        if os.geteuid() == 0:
            args.append("--no-sandbox")
        caps = {"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}}
        try:
            value = self._call("POST", "/session", caps)
        except BrowserError:
            self.quit()
            raise
        self.session = value["sessionId"]
        self._call("POST", self._s("/timeouts"), {"script": 60000, "pageLoad": 60000})

    def _s(self, path):
        return f"/session/{self.session}{path}"

    def _call(self, method, path, body=None, timeout=120):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                answer = json.load(r)
        except urllib.error.HTTPError as e:
            try:
                answer = json.load(e)
            except ValueError:
                raise BrowserError(f"{method} {path}: HTTP {e.code}") from None
            v = answer.get("value") or {}
            raise BrowserError(f"{method} {path}: {v.get('error')}: {v.get('message', '')[:500]}") from None
        return answer.get("value")

    def cdp(self, cmd, params=None):
        """A DevTools protocol command on the page's target."""
        return self._call("POST", self._s("/goog/cdp/execute"), {"cmd": cmd, "params": params or {}})

    def basic_auth(self, user, password):
        """Send HTTP Basic credentials with every request of the page."""
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.cdp("Network.enable")
        self.cdp("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})

    def get(self, url):
        self._call("POST", self._s("/url"), {"url": url})

    def js(self, script, *args):
        """Run script (a function body; arguments as arguments[...]) and return its value."""
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def js_async(self, script, *args):
        """Run script, which calls arguments[arguments.length - 1](value) when done."""
        return self._call("POST", self._s("/execute/async"), {"script": script, "args": list(args)})

    def wait_for(self, script, *args, timeout=60, what="condition", interval=0.2):
        """Poll script (with args) until it returns something true; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(interval)

    def screenshot(self, path):
        png = base64.b64decode(self._call("GET", self._s("/screenshot")))
        with open(path, "wb") as fh:
            fh.write(png)
        return len(png)

    def console(self):
        """The page's console messages since the last call."""
        try:
            return self._call("POST", self._s("/se/log"), {"type": "browser"}) or []
        except BrowserError:
            return []

    def quit(self):
        if self.session:
            try:
                self._call("DELETE", self._s(""), timeout=30)
            except (BrowserError, OSError):
                pass
            self.session = None
        if self.driver and self.driver.poll() is None:
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()
        self.log.close()
