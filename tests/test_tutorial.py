"""The tutorial, followed verbatim: every console command it shows, in order.

Each ``.. code-block:: console`` of docs/tutorial.rst is typed into a shell
(``sh``) that stays open, as a reader's terminal does: the blocks captioned
"Terminal 2" into a second one.  What a command prints must match what
the page shows, ids, times and durations aside.  Only the paths change:
``.venv/bin/`` is this interpreter's, ``/tmp/dropr-*`` lives in
``tmp_path`` and the daemons' port 8080 is a free one.  The install block is left out
(this checkout is installed already).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dropr.testing import free_port

# The tutorial, run verbatim with real daemons.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TUTORIAL = REPO / "docs" / "tutorial.rst"
#: Commands whose output depends on a daemon's progress: tried again for a while.
EVENTUALLY = ("grep ", "curl ", ".venv/bin/dropr status")


def console_blocks(text: str) -> Iterator[tuple[str, list[tuple[str, list[str]]]]]:
    """``(caption, [(command, expected output lines)])`` of each console block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != ".. code-block:: console":
            i += 1
            continue
        i += 1
        caption = ""
        while i < len(lines) and lines[i].strip().startswith(":"):
            if lines[i].strip().startswith(":caption:"):
                caption = lines[i].split(":caption:", 1)[1].strip()
            i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
            body.append(lines[i].strip("\n"))
            i += 1
        indent = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        body = [b[indent:] for b in body]
        commands: list[tuple[str, list[str]]] = []
        j = 0
        while j < len(body):
            if body[j].startswith("$ "):
                command = body[j][2:]
                while command.endswith("\\"):
                    j += 1
                    command += "\n" + body[j]
                commands.append((command, []))
            elif body[j].strip():
                commands[-1][1].append(body[j])
            j += 1
        yield caption, commands


def pattern(expected: str) -> re.Pattern[str]:
    """A regex matching ``expected`` with other ids, times and figures."""
    out = ""
    pos = 0
    variable = re.compile(
        r"[0-9a-f]{32}"  # an id
        r"|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}"  # twistd's log time
        r"|\d+\.\d+"  # a duration or an age
    )
    for m in variable.finditer(expected):
        out += re.escape(expected[pos : m.start()])
        text = m.group(0)
        if len(text) == 32:
            out += "[0-9a-f]{32}"
        elif "T" in text:
            out += r"\S+"
        else:
            out += r"\d+\.\d+"
        pos = m.end()
    out += re.escape(expected[pos:])
    return re.compile(out)


def squeeze(text: str) -> str:
    return "\n".join(" ".join(line.split()) for line in text.strip("\n").splitlines())


class Terminal:
    """A shell that stays open; commands typed one at a time."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            ["sh"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
        self._buffer = b""

    def run(self, command: str, timeout: float = 120.0) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        marker = b"__dropr_tutorial_done__"
        self.proc.stdin.write(command.encode() + b"\necho " + marker + b" $?\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while marker not in self._buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"{command!r} did not finish within {timeout} s"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"the shell ended during {command!r}"
                self._buffer += chunk
        output, _, rest = self._buffer.partition(marker)
        status, _, self._buffer = rest.partition(b"\n")
        return int(status), output.decode()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def stop_leftovers(tmp_path: Path) -> None:
    for pidfile in tmp_path.glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)


def test_the_tutorial_verbatim(tmp_path: Path) -> None:
    port = str(free_port())
    bindir = os.path.dirname(sys.executable) + "/"
    tmp = str(tmp_path) + "/dropr-"

    def local(text: str, daemons: bool) -> str:
        text = text.replace(".venv/bin/", bindir).replace("/tmp/dropr-", tmp)
        # Only the daemons listen; the examples before them just name the URL.
        return text.replace("8080", port) if daemons else text

    env = {k: v for k, v in os.environ.items() if not k.startswith("DROPR_")}
    terminals = {"1": Terminal(env), "2": Terminal(env)}
    ran = 0
    try:
        for caption, commands in console_blocks(TUTORIAL.read_text(encoding="utf-8")):
            if any("pip install" in c for c, _ in commands):
                continue  # installing: done already
            if caption.startswith("PostgreSQL"):
                continue  # test_tutorial_postgres.py follows those, with a database
            m = re.match(r"Terminal (\d)", caption)
            terminal = terminals[m.group(1) if m else "1"]
            for command, expected_lines in commands:
                expected = squeeze(local("\n".join(expected_lines), m is not None))
                want = pattern(expected)
                deadline = time.monotonic() + (30 if command.startswith(EVENTUALLY) else 0)
                while True:
                    status, output = terminal.run(local(command, m is not None))
                    got = squeeze(output)
                    if status == 0 and want.fullmatch(got):
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError(
                            f"{command}\nexit status {status}; printed:\n{output}\n"
                            f"the tutorial shows:\n{expected}"
                        )
                    time.sleep(0.2)
                ran += 1
    finally:
        for t in terminals.values():
            t.close()
        stop_leftovers(tmp_path)
    assert ran >= 15
    # The daemons were stopped by the tutorial's own kill commands.
    for name in ("server", "client"):
        log = (tmp_path / f"dropr-{name}.log").read_text()
        assert f"dropr-{name} stopped" in log, log[-2000:]
