"""The dropr command, run as a real process."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import dropr
from dropr._ids import new_ids
from dropr._message import Message
from dropr.admin import cli as cli
from dropr.storage.files._storage import FilesystemStorage

# The dropr command as a real process, on a pseudo-terminal too.
pytestmark = pytest.mark.slow


def run(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DROPR_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dropr.admin.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=full_env,
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


# -- the subcommands of issue 6 ---------------------------------------------------------

DROPR = os.path.join(os.path.dirname(sys.executable), "dropr")


def subcommands() -> list[str]:
    top = cli.parser()
    [sub] = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(sub.choices)


def test_every_subcommand_has_help() -> None:
    names = subcommands()
    for expected in ("status", "put", "take", "ack", "fail", "list", "show", "requeue", "purge"):
        assert expected in names
    for name in names:
        out = run(name, "--help")
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode().startswith(f"usage: dropr {name}")


@pytest.mark.skipif(not os.path.exists(DROPR), reason="console script not installed here")
def test_the_console_script() -> None:
    out = subprocess.run([DROPR, "--help"], capture_output=True, timeout=60)
    assert out.returncode == 0
    for name in subcommands():
        assert name in out.stdout.decode()


def make_store(path: Path) -> list[str]:
    """A store as a dropr-server leaves it, with three orders and a mail."""
    server = FilesystemStorage(str(path), dedup=True, exclusive=True)
    ids = new_ids(4)
    server.add(
        "orders", [Message(i, b'{"order": %d}' % n, "orders", 5) for n, i in enumerate(ids[:3])]
    )
    server.add("mail", [Message(ids[3], b"\x00\xffbinary", "mail", 1)])
    server.close()
    return ids


def lines(out: subprocess.CompletedProcess[bytes]) -> list[dict[str, Any]]:
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.decode().splitlines()]


def test_take_ack_fail_from_a_script(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    ids = make_store(tmp_path / "store")
    taken = lines(run("take", "--store", store, "--channel", "orders", "--limit", "2", "--raw"))
    assert [t["id"] for t in taken] == ids[:2]
    assert taken[0]["payload"] == '{"order": 0}' and taken[0]["payload_encoding"] == "utf-8"
    assert taken[0]["lease_expires"] > time.time() + 50
    receipt = taken[0]["receipt"]
    # Binary payloads stay base64, even with --raw; $DROPR_STORE is the default.
    [mail] = lines(run("take", "--channel", "mail", "--raw", env={"DROPR_STORE": store}))
    assert mail["payload_encoding"] == "base64"
    assert base64.b64decode(mail["payload"]) == b"\x00\xffbinary"

    # Ack by id from stdin, as `... | jq -r .id | dropr ack -` would.
    out = run("ack", "--store", store, "--receipt", receipt, "-", stdin=f"{ids[0]}\n".encode())
    assert out.returncode == 0, out.stderr
    out = run("fail", "--store", store, "--reason", "no such mailbox", ids[3], "--json")
    assert json.loads(out.stdout) == {"failed": [ids[3]], "refused": {}}
    # Not taken, or not an id: refused, named on stderr, exit 1 (or 2).
    out = run("ack", "--store", store, ids[2])
    assert out.returncode == 1 and f"{ids[2]}: not taken".encode() in out.stderr
    assert run("ack", "--store", store, "nonsense").returncode == 2

    status = json.loads(run("status", "--store", store, "--json").stdout)
    assert status["orders"]["depth"] == 2 and status["orders"]["taken"] == 1
    assert status["mail"] == {"depth": 0, "bytes": 0, "oldest_age": 0.0, "taken": 0, "failed": 1}


def test_list_and_show(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    ids = make_store(tmp_path / "store")
    run("take", "--store", store, "--channel", "orders")
    listed = lines(run("list", "--store", store, "--json"))
    assert [(e["id"], e["state"]) for e in listed] == [
        (ids[3], "waiting"),
        (ids[0], "taken"),
        (ids[1], "waiting"),
        (ids[2], "waiting"),
    ]
    assert [
        e["id"] for e in lines(run("list", "--store", store, "--json", "--state", "taken"))
    ] == [ids[0]]
    limited = run("list", "--store", store, "--limit", "1")
    assert limited.returncode == 0
    assert len(limited.stdout.decode().splitlines()) == 2  # header and one row
    assert b"raise --limit" in limited.stderr
    table = run("list", "--store", store, "--channel", "orders").stdout.decode()
    assert ids[0] in table and "taken" in table and "lease" in table and ids[3] not in table

    shown = run("show", "--store", store, ids[1]).stdout.decode()
    assert f"id:          {ids[1]}" in shown and "state:       waiting" in shown
    assert shown.rstrip().endswith('{"order": 1}')
    raw = run("show", "--store", store, "--raw", ids[3])
    assert raw.stdout == b"\x00\xffbinary"
    data = json.loads(run("show", "--store", store, "--json", ids[3]).stdout)
    assert base64.b64decode(data["payload"]) == b"\x00\xffbinary" and data["channel"] == "mail"
    missing = run("show", "--store", store, "0" * 32)
    assert missing.returncode == 1 and b"no message" in missing.stderr


def test_requeue_and_purge_ask_first(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    ids = make_store(tmp_path / "store")
    taken = lines(run("take", "--store", store, "--channel", "orders", "--limit", "3"))
    run("fail", "--store", store, "--reason", "consumer bug", *[t["id"] for t in taken])

    # No terminal to ask on and no --yes: nothing is done.
    out = run("requeue", "--store", store, "--all")
    assert out.returncode == 2 and b"add --yes" in out.stderr
    out = run("purge", "failed", "--store", store, "--all")
    assert out.returncode == 2 and b"add --yes" in out.stderr
    assert run("requeue", "--store", store).returncode == 2  # which ones?

    out = run("requeue", "--store", store, ids[1], "--yes")
    assert out.returncode == 0 and out.stdout == b"requeued 1 messages\n"
    failed = lines(run("list", "--store", store, "--json", "--state", "failed"))
    assert [f["id"] for f in failed] == [ids[0], ids[2]]
    assert {f["reason"] for f in failed} == {"consumer bug"}
    waiting = lines(run("list", "--store", store, "--json", "--to", "orders", "--state", "waiting"))
    assert [e["id"] for e in waiting] == [ids[1]]

    out = run("purge", "failed", "--store", store, "--older-than", "1h", "--yes")
    assert out.stdout == b"no failed messages match\n"
    out = run("purge", "failed", "--store", store, "--channel", "orders", "-y", "--json")
    assert json.loads(out.stdout) == {"purged": 2, "left": []}
    assert run("list", "--store", store, "--json", "--state", "failed").stdout == b""
    out = run("purge", "processed", "--store", store, "--older-than", "7d")
    assert out.returncode == 0 and out.stdout == b"deleted 0 finished buckets\n"
    out = run("purge", "quarantine", "--store", store, "--older-than", "xyz")
    assert out.returncode == 2 and b"not an age" in out.stderr


def test_on_a_terminal_it_asks_and_shows_progress(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    make_store(tmp_path / "store")
    taken = lines(run("take", "--store", store, "--channel", "orders", "--limit", "3"))
    run("fail", "--store", store, "--reason", "bug", *[t["id"] for t in taken])

    def on_a_terminal(answer: bytes, *args: str) -> tuple[int, bytes, bytes]:
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "dropr.admin.cli", *args],
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=follower,
        )
        os.close(follower)
        seen = b""
        while b"[y/N]" not in seen:
            seen += os.read(leader, 4096)
        os.write(leader, answer)
        out, _ = proc.communicate(timeout=60)
        with contextlib.suppress(OSError):
            while chunk := os.read(leader, 4096):
                seen += chunk
        os.close(leader)
        return proc.returncode, out, seen

    code, out, term = on_a_terminal(b"n\n", "purge", "failed", "--store", store, "--all")
    assert code == 1 and out == b"nothing done\n"
    assert b"delete 3 failed messages (orders: 3)" in term
    code, out, term = on_a_terminal(b"y\n", "requeue", "--store", store, "--all")
    assert code == 0 and out == b"requeued 3 messages\n"
    assert b"requeueing: 1/1" in term  # progress, on the terminal only


def test_missing_spool_or_store_is_not_created(tmp_path: Path) -> None:
    out = run("status", "--store", str(tmp_path / "typo"))
    assert out.returncode == 2 and b"no store at" in out.stderr
    assert not (tmp_path / "typo").exists()
    out = run("list", "--spool", str(tmp_path / "typo"))
    assert out.returncode == 2 and b"no spool at" in out.stderr
