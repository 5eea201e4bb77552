"""The failure sweep (tests/sweep_harness.py): every disk operation of each
scenario fails in turn (ENOSPC, EIO, a crash; EIO at every read), and the
promises are checked after each.  bench/sweep.py runs the long mode."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from unittest import mock

import pytest
from faultydisk import Crash, FaultyDisk
from sweep_harness import SCENARIOS, run_once, sweep

from dropr._ids import new_id
from dropr._message import Message
from dropr.errors import StorageFull, StorageIOError
from dropr.storage.files._storage import FilesystemStorage
from dropr.storage.files._taker import Taker

BY_NAME = {s.name: s for s in SCENARIOS}


def _report(figures: dict[str, object]) -> str:
    failures = figures["failures"]
    assert isinstance(failures, list)
    return "\n".join(
        f"{f['scenario']} {f['mode']}@{f['at']}: {f['problems']}" for f in failures[:10]
    )


def test_the_take_scenario_holds_at_every_other_operation(tmp_path: Path) -> None:
    """The fast tier's share: take, ack, release and fail across buckets,
    a crash or a full disk at every other operation (the slow tier sweeps
    every operation of every scenario with every fault)."""
    figures = sweep(
        [BY_NAME["take-ack-release-fail"]], modes=("crash", "enospc"), base=str(tmp_path), stride=2
    )
    assert figures["runs"] > 40
    assert figures["failures"] == [], _report(figures)


@pytest.mark.slow
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_every_scenario_holds_at_every_operation(tmp_path: Path, name: str) -> None:
    figures = sweep([BY_NAME[name]], base=str(tmp_path))
    assert figures["failures"] == [], _report(figures)


def test_the_sweep_finds_a_missing_directory_sync(tmp_path: Path) -> None:
    """The sweep can fail: with directory syncs that make nothing durable,
    crashes lose acknowledged adds and the checks say so."""
    with mock.patch.object(FaultyDisk, "sync_dir", lambda self, path: self._effect("sync", path)):
        figures = sweep([BY_NAME["add"]], modes=("crash",), base=str(tmp_path))
    problems = [p for f in figures["failures"] for p in f["problems"]]
    assert any("acknowledged messages missing" in p for p in problems)


def test_the_sweep_finds_a_leaked_lease(tmp_path: Path) -> None:
    """...and a take that keeps the leases it wrote before failing."""
    with mock.patch.object(Taker, "_write_leases", _leases_never_released):
        outcomes = [
            run_once(BY_NAME["take-ack-release-fail"], "enospc", at, str(tmp_path))[0]
            for at in range(1, 6)
        ]
    assert any(o.problems for o in outcomes)


def _leases_never_released(self: Taker, q: object, leases: list) -> None:  # type: ignore[type-arg]
    for log, lines in leases:
        log.append(lines, sync=False)


def _message() -> Message:
    return Message(new_id(), b"x", "a", 5)


@pytest.mark.parametrize(("mode", "error"), [("enospc", StorageFull), ("eio", StorageIOError)])
def test_disk_errors_reach_the_caller_as_dropr_errors(
    tmp_path: Path, mode: str, error: type[Exception]
) -> None:
    disk = FaultyDisk(stash=str(tmp_path / "stash"))
    storage = FilesystemStorage(str(tmp_path / "store"), disk=disk)
    disk.fail_at, disk.mode = disk.effects + 1, mode
    with pytest.raises(error) as info:
        storage.add("a", [_message()])
    assert str(tmp_path / "store") in str(info.value)
    assert "retry" in str(info.value).lower()
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == (errno.ENOSPC if mode == "enospc" else errno.EIO)
    storage.close()


def test_a_crash_drops_what_was_not_synced(tmp_path: Path) -> None:
    """The crash model itself: unsynced data, entries and removals are undone."""
    disk = FaultyDisk(stash=str(tmp_path / "stash"))
    d = tmp_path / "d"
    d.mkdir()
    disk.create(str(d / "kept"), b"kept")
    disk.sync_dir(str(d))
    disk.append(str(d / "kept"), b"+synced", sync=True)
    disk.append(str(d / "kept"), b"+lost", sync=False)
    disk.create(str(d / "gone"), b"removed, not synced")
    disk.sync_dir(str(d))
    disk.create(str(d / "new"), b"entry not synced")
    disk.unlink(str(d / "gone"))
    disk.mkdir(str(d / "sub"))
    disk.crash()
    assert sorted(os.listdir(d)) == ["gone", "kept"]
    assert (d / "kept").read_bytes() == b"kept+synced"
    assert (d / "gone").read_bytes() == b"removed, not synced"
    with pytest.raises(Crash):
        disk.listdir(str(d))
