"""The pages on the daemons show what runs: help texts, curl, a batch, consumers, procmon.

A real dropr-server (``twistd -n``) on 127.0.0.1 receives what the wire
format examples post; the Twisted consumer example then consumes it; the
``twistd procmon`` command of the operations page runs as written, with
temporary paths.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import dropr
from dropr.testing import ServerProcess, free_port, twistd_command, wait_until

# The documented commands, run as real processes.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
EXAMPLES = DOCS / "examples"
ID = r"[0-9a-f]{32}"

#: The examples these pages show, each run below.
SHOWN_AND_RUN = ("curl_post.sh", "post_batch.py", "twisted_consumer.py")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("DROPR_SPOOL", None)
    env.pop("DROPR_STORE", None)
    return env


def run(*cmd: str | Path) -> list[str]:
    """Run ``cmd``; return its output lines (it must succeed)."""
    done = subprocess.run(
        [str(c) for c in cmd], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout.splitlines()


def literal_block(page: str, first_line: str) -> str:
    """The indented block of ``docs/<page>`` that starts with ``first_line``."""
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    start = lines.index(first_line)
    indent = len(first_line) - len(first_line.lstrip())
    block = []
    for line in lines[start + 1 :]:
        if line.strip() and not line.startswith(" " * indent):
            break
        block.append(line[indent:])
    return "\n".join(block).strip("\n")


def test_the_help_shown_is_the_real_help() -> None:
    """daemons.rst quotes ``--help`` of both plugins; it must not drift."""
    env = _env()
    env["COLUMNS"] = "80"  # twistd wraps its help to the terminal's width
    for plugin in ("dropr-server", "dropr-client"):
        real = subprocess.run(
            [*twistd_command(), plugin, "--help"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        real = "\n".join(line.rstrip() for line in real.splitlines()).strip("\n")
        shown = literal_block("daemons.rst", f"   $ twistd {plugin} --help")
        assert shown == real, f"update the {plugin} --help block in docs/daemons.rst"


def test_wire_examples_and_the_twisted_consumer(tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = ServerProcess(str(store), str(tmp_path / "server.log")).start_and_wait()
    try:
        # curl: one message, then one with its own id posted twice.
        assert shutil.which("curl"), "curl is needed for this test (apt-get install curl)"
        answers = [json.loads(line) for line in run("sh", EXAMPLES / "curl_post.sh", server.url)]
        assert len(answers) == 3
        for answer in answers:
            assert answer["rejected"] == {}
            assert len(answer["stored"]) == 1 and re.fullmatch(ID, answer["stored"][0])
        assert answers[1] == answers[2]  # the retry: same id, answered "stored" again
        assert answers[0] != answers[1]

        # A batch, posted fresh and then again.
        out = run(sys.executable, EXAMPLES / "post_batch.py", server.url)
        assert out[0] == "sent: 3 stored, 1 rejected"
        assert re.fullmatch(
            f"  {ID}: message is older than this server's dedup window \\(604800 s\\): "
            "it may have been stored and forgotten already, so it is not stored again",
            out[1],
        )
        assert out[2:] == ["sent again: 3 stored, same answer: True"]

        # Each message once in the store: 2 from curl, 3 from the batch.
        with dropr.Store(str(store)) as s:
            assert s.stats()["orders"].depth == 5

        # The Twisted consumer, on the store the server keeps writing.
        out = run(sys.executable, EXAMPLES / "twisted_consumer.py", store, "5")
        assert out[:4] == [
            "order 1 (priority 3)",
            "order 2 (priority 5)",
            "order 3 (priority 5)",
            "order 4 (priority 5)",
        ]
        assert re.fullmatch(f"failed {ID}: handler failed 3 times: JSONDecodeError: .*", out[4]), (
            out[4]
        )
        assert len(out) == 5
        with dropr.Store(str(store)) as s:
            stats = s.stats()["orders"]
            assert (stats.depth, stats.failed) == (0, 1)
    finally:
        # A clean stop: twistd re-raises SIGTERM (shell status 143).
        assert server.stop() in (0, -signal.SIGTERM)
    log = server.log_text()
    assert f"dropr-server storing in {store}" in log
    assert re.search(r"stored 3 messages, rejected 1 in [\d.]+ ms from 127\.0\.0\.1", log)
    assert "dropr-server stopped" in log


def procmon_command(tmp_path: Path, port: int) -> list[str]:
    """operations.rst's procmon command, on temporary paths and ``port``."""
    first = "/opt/dropr/bin/twistd --pidfile /var/lib/dropr/procmon-server.pid"
    shown = literal_block("operations.rst", f"    $ {first} \\")
    lines = [first, *shown.splitlines()]
    words = shlex.split(" ".join(line.rstrip("\\") for line in lines))
    command: list[str] = []
    for word in words:
        if word == "/opt/dropr/bin/twistd":
            command += twistd_command()
            continue
        word = word.replace("/var/lib/dropr", str(tmp_path / "lib"))
        word = word.replace("/var/log/dropr", str(tmp_path / "log"))
        word = word.replace("/etc/dropr", str(tmp_path / "etc"))
        command.append(word.replace("tcp:8080", f"tcp:{port}:interface=127.0.0.1"))
    return command


def test_procmon_command_restarts_the_server(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "log").mkdir()
    (tmp_path / "etc").mkdir()
    clients = tmp_path / "etc" / "clients"  # the --credentials file, owner-only
    clients.write_text("app1 " + "0" * 64 + "\n")
    clients.chmod(0o600)
    port = free_port()
    pidfile = tmp_path / "lib" / "procmon-server.pid"
    lock = tmp_path / "lib" / "store" / "lock"
    # twistd daemonizes procmon and returns.
    subprocess.run(procmon_command(tmp_path, port), check=True, timeout=60, env=_env())
    try:
        wait_until(lambda: _healthy(port), 20, 0.05, "the server under procmon")
        first = int(lock.read_text())
        os.kill(first, signal.SIGKILL)  # a crash: procmon starts it again
        wait_until(
            lambda: lock.read_text().strip() not in ("", str(first)) and _healthy(port),
            20,
            0.05,
            "the server to be restarted",
        )
        second = int(lock.read_text())
    finally:
        wait_until(pidfile.exists, 10)
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
        wait_until(lambda: not pidfile.exists(), 20, 0.05, "procmon to stop")
    # Stopping procmon stops its daemon, cleanly.
    wait_until(lambda: not _alive(second), 20, 0.05, "the server to stop")
    assert "dropr-server stopped" in (tmp_path / "log" / "dropr-server.log").read_text()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return bool(json.load(r) == {"status": "ok"})
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose; procmon reaps its children.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(") ")[-1][:1] != "Z"
    except FileNotFoundError:
        return False


def test_every_example_is_shown_and_run() -> None:
    """Each example of these pages is included by a page and run above."""
    pages = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.rst"))
    tests = Path(__file__).read_text(encoding="utf-8")
    for name in SHOWN_AND_RUN:
        assert (EXAMPLES / name).is_file(), name
        assert f"literalinclude:: examples/{name}" in pages, name
        assert f'EXAMPLES / "{name}"' in tests, name
