"""The tutorial's PostgreSQL section, followed verbatim on a cluster of the test's own.

Every console block of docs/tutorial.rst captioned "PostgreSQL terminal N"
is typed into shell N, in order, and what each command prints must match
the page (ids, times and figures aside), as ``test_tutorial`` does for the
rest of the page.  Only these change: ``.venv/bin/`` is this interpreter's,
``/tmp/dropr-*`` lives in ``tmp_path``, port 5432 and the password
``secret`` are the throwaway cluster's, ports 8081 and 8082 are free
ones, and the second host's namespace, its veth pair and its subnet
10.213.0.0/24 get names and a subnet no other run uses.  The page's own
commands make that namespace; the cluster then starts listening on
127.0.0.1 and on the host end of the pair, and lets the subnet in.
Needs root and iproute2 (``ip netns``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pgcluster import PASSWORD, PgCluster, find_bindir
from test_tutorial import TUTORIAL, Terminal, console_blocks, pattern, squeeze, stop_leftovers

from dropr.testing import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        find_bindir() is None, reason="PostgreSQL missing: apt-get install postgresql"
    ),
]

#: Commands whose output depends on a daemon's progress: tried again for a while.
EVENTUALLY = ("curl ", ".venv/bin/dropr status")

#: The caption of the block that makes the simulated second host.
SECOND_HOST = "simulating a second host"


@dataclass(frozen=True)
class SecondHost:
    """The names and subnet this run uses in place of the page's."""

    namespace: str
    host_end: str
    far_end: str
    subnet: int  # the x of 10.213.x.0/24

    def local(self, text: str) -> str:
        return (
            text.replace("dropr-host2", self.namespace)
            .replace("dropr-h0", self.host_end)
            .replace("dropr-h2", self.far_end)
            .replace("10.213.0.", f"10.213.{self.subnet}.")
        )


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _free_subnet() -> int:
    """An x of 10.213.x.0/24 that no interface of this host has yet."""
    used = set(re.findall(r"inet 10\.213\.(\d+)\.", _ip("-o", "-4", "addr").stdout))
    free = [x for x in range(256) if str(x) not in used]
    assert free, "every 10.213.x.0/24 is in use"
    return secrets.choice(free)


@pytest.fixture
def second_host() -> Iterator[SecondHost]:
    """Unique names for the page's namespace; whatever the page made is removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the second host is a network namespace (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("ip missing: apt-get install iproute2")
    tag = secrets.token_hex(3)
    host = SecondHost(f"dropr-ns-{tag}", f"dr{tag}h0", f"dr{tag}h2", _free_subnet())
    probe = _ip("netns", "add", host.namespace)
    if probe.returncode != 0:
        pytest.skip(f"ip netns add does not work here: {probe.stderr.strip()}")
    _ip("netns", "del", host.namespace)
    try:
        yield host
    finally:
        for pid in _ip("netns", "pids", host.namespace).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", host.namespace)  # takes the far end, hence the pair, with it
        _ip("link", "del", host.host_end)  # in case the far end never moved
        assert host.namespace not in _ip("netns", "list").stdout
        assert _ip("link", "show", host.host_end).returncode != 0


def test_the_postgresql_section_verbatim(tmp_path: Path, second_host: SecondHost) -> None:
    bindir = find_bindir()
    assert bindir is not None
    host_address = f"10.213.{second_host.subnet}.1"
    ports = {"8081": str(free_port()), "8082": str(free_port())}
    cluster: PgCluster | None = None

    def local(text: str) -> str:
        assert cluster is not None
        text = second_host.local(text)
        text = text.replace(".venv/bin/", os.path.dirname(sys.executable) + "/")
        text = text.replace("/tmp/dropr-", str(tmp_path) + "/dropr-")
        text = text.replace(":5432", f":{cluster.port}").replace(":secret'", f":{PASSWORD}'")
        for page, real in ports.items():
            text = text.replace(page, real)
        return text

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DROPR_", "PG"))}
    terminals = {"1": Terminal(env), "2": Terminal(env)}
    ran = 0
    try:
        for caption, commands in console_blocks(TUTORIAL.read_text(encoding="utf-8")):
            m = re.match(r"PostgreSQL terminal (\d)", caption)
            if m is None:
                continue
            if cluster is None and SECOND_HOST not in caption:
                # The database server is the reader's own, already set up to
                # listen on the second host's network: start it once that exists.
                assert host_address in _ip("-o", "-4", "addr").stdout, (
                    "the page must make the second host before the servers start"
                )
                cluster = PgCluster(
                    bindir,
                    hosts=("127.0.0.1", host_address),
                    clients=(f"10.213.{second_host.subnet}.0/24",),
                )
            terminal = terminals[m.group(1)]
            for command, expected_lines in commands:
                if cluster is None:  # the second host's commands name no port
                    typed, want = (
                        second_host.local(command),
                        pattern(squeeze(second_host.local("\n".join(expected_lines)))),
                    )
                else:
                    typed = local(command)
                    want = pattern(squeeze(local("\n".join(expected_lines))))
                deadline = time.monotonic() + (30 if any(c in command for c in EVENTUALLY) else 0)
                while True:
                    status, output = terminal.run(typed)
                    if status == 0 and want.fullmatch(squeeze(output)):
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"{typed}\nexit status {status}; printed:\n{output}\n"
                            f"the tutorial shows:\n{want.pattern}"
                        )
                    time.sleep(0.2)
                ran += 1
    finally:
        for t in terminals.values():
            t.close()
        stop_leftovers(tmp_path)
        if cluster is not None:
            cluster.destroy()
    assert ran >= 24
    for name in ("pg1", "pg2"):
        log = (tmp_path / f"dropr-{name}.log").read_text()
        assert "dropr-server stopped" in log, log[-2000:]
        assert PASSWORD not in log
