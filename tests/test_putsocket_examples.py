"""The any-language examples of the put socket, run against real daemons.

docs/examples/put.sh (curl) and docs/examples/put.php (php-cli, installed
from Debian's packages when missing and this runs as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import dropr
from dropr.testing import ClientProcess, ServerProcess, wait_until

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
ID = "[0-9a-f]{32}"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    server = ServerProcess(str(tmp_path / "store"), str(tmp_path / "server.log")).start_and_wait()
    spool = str(tmp_path / "spool")
    client = ClientProcess(spool, str(tmp_path / "client.log")).start_and_wait()
    wait_until(lambda: os.path.exists(os.path.join(spool, "put.sock")), 10, what="put.sock")
    yield server, spool
    client.stop()
    server.stop()


def stored_orders(store: str, count: int) -> list[dict[str, int]]:
    """The payloads of the channel ``orders`` once ``count`` are stored."""

    def depth() -> int:
        with dropr.Store(store) as s:
            stats = s.stats().get("orders")
            return stats.depth if stats else 0

    wait_until(lambda: depth() >= count, 30, 0.1, f"{count} messages in the store")
    with dropr.Store(store) as s:
        return [json.loads(m.payload) for m in s.take("orders", 100)]


def php() -> str:
    found = shutil.which("php")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("php-cli is missing and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "php-cli"], env=env, capture_output=True, timeout=600
    )
    if done.returncode != 0 or not shutil.which("php"):
        pytest.skip(f"php-cli could not be installed: {done.stderr.decode()[-300:]}")
    return shutil.which("php") or "php"


def test_shell_example_puts_with_curl(daemons: tuple[ServerProcess, str]) -> None:
    server, spool = daemons
    done = subprocess.run(
        ["sh", str(EXAMPLES / "put.sh"), spool, server.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    answers = [json.loads(line) for line in lines[:4]]
    for a in answers:
        assert a["rejected"] == {} and re.fullmatch(ID, a["stored"][0])
    assert answers[1] == answers[2]  # the retry names the same message
    assert "invalid channel" in json.loads(lines[4])["error"]
    assert lines[5] == "refused, as it should be"
    # Stored once each, in order, priority 3 first.
    orders = stored_orders(server.store, 3)
    assert orders == [{"order": 1}, {"order": 2}, {"order": 3}]


def test_php_example_puts_through_the_socket(daemons: tuple[ServerProcess, str]) -> None:
    server, spool = daemons
    done = subprocess.run(
        [php(), str(EXAMPLES / "put.php"), spool, server.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [bool(re.fullmatch(f"put {ID}", line)) for line in lines[:3]] == [True] * 3
    assert lines[1] == lines[2]
    assert lines[3].startswith("refused: dropr put refused (400): invalid channel name")
    assert stored_orders(server.store, 2) == [{"order": 1}, {"order": 2}]
