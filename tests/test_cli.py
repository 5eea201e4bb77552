"""The dropr command, run as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dropr


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dropr.cli", *args], input=stdin, capture_output=True, timeout=60
    )


def test_put_from_stdin_then_status(tmp_path: Path) -> None:
    spool = str(tmp_path / "spool")
    out = run(
        "put",
        "--to",
        "http://central:8080/",
        "--channel",
        "orders",
        "--priority",
        "2",
        "--spool",
        spool,
        stdin=b"from a script",
    )
    assert out.returncode == 0, out.stderr
    message_id = out.stdout.decode().strip()
    with dropr.Spool(spool) as sp:
        [m] = sp.take("http://central:8080/", 10)
        assert (m.id, m.payload, m.channel, m.priority) == (
            message_id,
            b"from a script",
            "orders",
            2,
        )
        sp.release([m])
    status = run("status", "--spool", spool, "--json")
    assert status.returncode == 0
    assert json.loads(status.stdout)["http://central:8080/"]["depth"] == 1
    text = run("status", "--spool", spool).stdout.decode()
    assert "http://central:8080/" in text and "depth" in text


def test_bad_input_gets_a_clear_error(tmp_path: Path) -> None:
    out = run("put", "--to", "not a url", "--spool", str(tmp_path / "s"), stdin=b"x")
    assert out.returncode == 2
    assert b"invalid destination" in out.stderr
    out = run("put", "--to", "http://h/", "--priority", "12", "--spool", str(tmp_path / "s"))
    assert out.returncode == 2
    assert b"invalid priority 12" in out.stderr
