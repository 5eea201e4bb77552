"""The ``dropr`` command on a store named by spec: the same commands on SQLite.

In process (``cli.main``), on a real SQLite file: only interfaces are used,
so what works on the file system works here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dropr._ids import new_ids
from dropr._message import Message
from dropr.admin import cli
from dropr.storage._sqlite import SQLiteStorage


@pytest.fixture
def spec(tmp_path: Path) -> str:
    path = tmp_path / "store.db"
    with SQLiteStorage(str(path), dedup=True) as store:
        ids = new_ids(3)
        store.add("orders", [Message(i, b"order %d" % n, "orders") for n, i in enumerate(ids)])
    return f"sqlite://{path}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_take_ack_fail_requeue_purge_on_sqlite(
    spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "status", "--store", spec, "--json")
    assert code == 0 and json.loads(out)["orders"]["depth"] == 3

    code, out, _ = run(capsys, "take", "--store", spec, "--channel", "orders", "--limit", "2")
    taken = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(taken) == 2
    receipt = taken[0]["receipt"]
    assert taken[1]["receipt"] == receipt

    code, out, _ = run(capsys, "list", "--store", spec, "--json")
    states = [json.loads(line)["state"] for line in out.splitlines()]
    assert states == ["taken", "taken", "waiting"]

    first, second = (t["id"] for t in taken)
    code, out, err = run(capsys, "ack", "--store", spec, "--receipt", receipt, first, "--json")
    assert code == 0 and json.loads(out) == {"acked": [first], "refused": {}}
    code, out, err = run(capsys, "ack", "--store", spec, "--receipt", "00000000", second)
    assert code == 1 and "taken under receipt" in err
    code, out, _ = run(capsys, "fail", "--store", spec, second, "--reason", "bad order")
    assert code == 0

    code, out, _ = run(capsys, "show", "--store", spec, second, "--json")
    shown = json.loads(out)
    assert (shown["state"], shown["reason"]) == ("failed", "bad order")

    code, out, _ = run(capsys, "requeue", "--store", spec, second, "--yes", "--json")
    assert code == 0 and json.loads(out) == {"requeued": 1, "left": []}
    code, out, _ = run(capsys, "list", "--store", spec, "--state", "waiting", "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()][-1] == second

    code, out, _ = run(capsys, "take", "--store", spec, "--channel", "orders", "--limit", "5")
    ids = [json.loads(line)["id"] for line in out.splitlines()]
    assert second in ids
    run(capsys, "fail", "--store", spec, *ids, "--reason", "give up")
    code, out, _ = run(capsys, "purge", "failed", "--store", spec, "--all", "--yes", "--json")
    assert code == 0 and json.loads(out) == {"purged": 2, "left": []}
    code, out, _ = run(capsys, "status", "--store", spec, "--json")
    assert json.loads(out) == {}


def test_fsck_says_it_is_for_the_file_system(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "fsck", "--store", spec)
    assert code == 2 and "file-system spools and stores only" in err


def test_a_missing_sqlite_store_is_not_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = f"sqlite://{tmp_path}/nothing.db"
    code, _, err = run(capsys, "status", "--store", spec)
    assert code == 2 and "no store at" in err
    assert not (tmp_path / "nothing.db").exists()
