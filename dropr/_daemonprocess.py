"""Run real dropr daemons from Python: for end-to-end tests, benchmarks and the demo.

``DaemonProcess`` starts ``twistd -n dropr-server`` or ``dropr-client`` as a
child process, waits until it is ready and stops it with SIGTERM (or kills
it with SIGKILL for crash tests).  Offered to users as part of
:mod:`dropr.testing`; these start processes and take real seconds, so tests
using them belong to a slow tier.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from dropr.errors import DroprError


class DaemonDidNotStart(DroprError):
    """A daemon started for a test exited or did not get ready; its log says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistd_command() -> list[str]:
    """How to run this Python's twistd."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    found = shutil.which("twistd")
    if found:
        return [sys.executable, found]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def wait_until(
    condition: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = ""
) -> None:
    """Poll ``condition`` until true; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


class DaemonProcess:
    """A ``twistd -n`` process running a dropr plugin."""

    def __init__(
        self,
        plugin: str,
        args: Sequence[str],
        logfile: str,
        cpu: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.plugin = plugin
        self.args = list(args)
        self.logfile = logfile
        self.cpu = cpu
        self.env = env
        #: A command the daemon runs under, e.g. ``setpriv --reuid=...`` to
        #: run it as another user.
        self.wrapper: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        cmd = [*twistd_command(), "-n", "--pidfile=", "--logfile", self.logfile, self.plugin]
        cmd += self.args
        if self.cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        cmd = [*self.wrapper, *cmd]
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the crash no code can clean up after."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def log_text(self) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class ServerProcess(DaemonProcess):
    """``twistd -n dropr-server`` on 127.0.0.1 and a port of its own.

    Loopback only, and it accepts unsigned requests (``--allow-anonymous-local``)
    unless ``extra`` gives ``--credentials``.  With ``tls=(key_file, cert_file)`` it speaks HTTPS,
    and ``ca_file`` is what its own health check trusts.
    """

    def __init__(
        self,
        store: str,
        logfile: str,
        port: int | None = None,
        extra: Sequence[str] = (),
        cpu: int | None = None,
        tls: tuple[str, str] | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.store = store
        self.tls = tls
        self.ca_file = ca_file
        if tls is None:
            listen = f"tcp:{self.port}:interface=127.0.0.1"
        else:
            key, cert = (_escape_endpoint(p) for p in tls)
            listen = f"ssl:{self.port}:privateKey={key}:certKey={cert}:interface=127.0.0.1"
        if not {"--credentials", "--insecure-allow-anonymous"} & set(extra):
            extra = ["--allow-anonymous-local", *extra]  # unsigned requests are opt-in
        super().__init__(
            "dropr-server", ["--listen", listen, "--store", store, *extra], logfile, cpu
        )

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/"

    def healthy(self) -> bool:
        context = ssl.create_default_context(cafile=self.ca_file) if self.tls else None
        try:
            with urllib.request.urlopen(self.url + "health", timeout=1, context=context) as r:
                return bool(json.loads(r.read()).get("status") == "ok")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def start_and_wait(self, timeout: float = 30.0) -> ServerProcess:
        self.start()
        wait_until(
            lambda: self.healthy() or not self.alive(), timeout, 0.05, "dropr-server to listen"
        )
        if not self.alive():
            raise DaemonDidNotStart(f"dropr-server exited: {self._stderr()}\n{self.log_text()}")
        return self

    def _stderr(self) -> str:
        if self.proc is not None and self.proc.stderr is not None:
            try:
                return self.proc.stderr.read().decode("utf-8", "replace")
            except ValueError:
                return ""
        return ""


def _escape_endpoint(text: str) -> str:
    """``text`` as one argument of a Twisted endpoint string."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


class ClientProcess(DaemonProcess):
    """``twistd -n dropr-client`` on a spool."""

    def __init__(
        self, spool: str, logfile: str, extra: Sequence[str] = (), cpu: int | None = None
    ) -> None:
        self.spool = spool
        super().__init__("dropr-client", ["--spool", spool, *extra], logfile, cpu)

    def start_and_wait(self, timeout: float = 30.0) -> ClientProcess:
        self.start()
        fifo = os.path.join(self.spool, "notify")
        wait_until(
            lambda: ("forwarding spool" in self.log_text()) or not self.alive(),
            timeout,
            0.05,
            "dropr-client to start",
        )
        if not self.alive() or not os.path.exists(fifo):
            raise DaemonDidNotStart(f"dropr-client did not start:\n{self.log_text()}")
        return self
