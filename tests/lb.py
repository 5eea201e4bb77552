"""HAProxy (Debian's package) in front of several dropr-servers, for the tests.

Renders a configuration like ``contrib/haproxy/dropr.cfg`` for the servers'
ports, runs ``haproxy -db`` in the foreground on a free port and stops it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence

from dropr.testing import free_port, wait_until


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )


def render(bind: str, servers: Sequence[tuple[str, int]], check_interval_ms: int = 300) -> str:
    """The configuration: round robin, ``GET /health`` as the check."""
    lines = [
        "global",
        "    maxconn 2000",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        # A connection refused by a dead server is tried on another one;
        # a request cut off inside a server is answered 502 and the
        # client's sender retries it (the store's dedup makes that safe).
        "    retries 3",
        "    option redispatch",
        "frontend dropr",
        f"    bind {bind}",
        "    default_backend dropr_servers",
        "backend dropr_servers",
        "    balance roundrobin",
        "    option httpchk GET /health",
        "    http-check expect status 200",
        f"    default-server inter {check_interval_ms}ms fall 2 rise 1",
    ]
    lines += [f"    server s{i} {host}:{port} check" for i, (host, port) in enumerate(servers)]
    return "\n".join(lines) + "\n"


class HAProxy:
    """One HAProxy process listening on ``host:port``."""

    def __init__(
        self, workdir: str, servers: Sequence[tuple[str, int]], host: str = "127.0.0.1"
    ) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is missing: apt-get install haproxy")
        self.binary = binary
        self.host = host
        self.port = free_port()
        self.config = os.path.join(workdir, "haproxy.cfg")
        with open(self.config, "w") as f:
            f.write(render(f"{host}:{self.port}", servers))
        self.logfile = os.path.join(workdir, "haproxy.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self, servers_up: int = 1, timeout: float = 30.0) -> HAProxy:
        subprocess.run([self.binary, "-c", "-q", "-f", self.config], check=True, timeout=30)
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-db", "-f", self.config], stdout=log, stderr=log
            )
        wait_until(self.healthy, timeout, 0.1, "haproxy to pass requests on")
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "health", timeout=1) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
