"""A small store's path on the file-system store: spare files made ahead,
the dedup checkpoint's syncs outside the store's lock, the wake-up first."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from faultydisk import FaultyDisk

from dropr._ids import new_id
from dropr._message import Message
from dropr.errors import StorageFull
from dropr.storage.files._disk import Disk
from dropr.storage.files._spares import SPARES_KEPT
from dropr.storage.files._storage import FilesystemStorage

Q = "orders"


def make(n: int = 1) -> list[Message]:
    return [Message(new_id(), b"payload %d" % i, Q, 5) for i in range(n)]


def spares(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root / "tmp") if n.startswith("spare."))


def drain(s: FilesystemStorage) -> list[bytes]:
    got = s.take(Q, 1000)
    s.ack(got)
    return [m.payload for m in got]


def test_a_store_fills_a_spare_made_after_the_one_before(tmp_path: Path) -> None:
    with FilesystemStorage(str(tmp_path), dedup=True) as s:
        assert s.prepare() == 0  # nothing stored yet: no spares, tmp/ stays empty
        assert spares(tmp_path) == []
        s.store([(Q, make())])
        assert s.prepare() == SPARES_KEPT
        names = spares(tmp_path)
        inodes = {os.stat(tmp_path / "tmp" / n).st_ino for n in names}
        s.store([(Q, make(2))])
        assert len(spares(tmp_path)) == SPARES_KEPT - 1
        batches = [
            os.path.join(d, f)
            for d, _dirs, files in os.walk(tmp_path / "queues")
            for f in files
            if f.endswith(".b")
        ]
        # The second batch is one of the spares, renamed into its bucket.
        assert {os.stat(b).st_ino for b in batches} & inodes
        assert drain(s) == [b"payload 0", b"payload 0", b"payload 1"]
        assert s.prepare() == 1


def test_close_removes_the_spares_and_recovery_those_of_a_dead_writer(tmp_path: Path) -> None:
    with FilesystemStorage(str(tmp_path), dedup=True) as s:
        s.store([(Q, make())])
        s.prepare()
        assert spares(tmp_path)
    assert spares(tmp_path) == []
    dead = tmp_path / "tmp" / f"spare.{2**22 + 7}.0123456789ab.tmp"
    dead.write_bytes(b"")
    with FilesystemStorage(str(tmp_path), dedup=True):
        assert spares(tmp_path) == []


def test_a_spare_another_process_removed_is_not_missed(tmp_path: Path) -> None:
    with FilesystemStorage(str(tmp_path), dedup=True) as s:
        s.store([(Q, make())])
        s.prepare()
        for name in spares(tmp_path):
            os.unlink(tmp_path / "tmp" / name)  # as a recovery removes old ones
        s.store([(Q, make())])
        assert drain(s) == [b"payload 0", b"payload 0"]


@pytest.mark.parametrize("mode", ["enospc", "eio"])
def test_a_failed_fill_stores_nothing_and_leaves_no_spare_behind(tmp_path: Path, mode: str) -> None:
    disk = FaultyDisk(stash=str(tmp_path / "stash"))
    root = tmp_path / "store"
    with FilesystemStorage(str(root), dedup=True, disk=disk) as s:
        first = make()
        s.store([(Q, first)])
        s.prepare()
        before = set(spares(root))
        disk.fail_at, disk.mode = disk.effects + 1, mode
        second = make()
        with pytest.raises(Exception) as raised:
            s.store([(Q, second)])
        assert disk.failed.startswith("fill ")
        if mode == "enospc":
            assert isinstance(raised.value, StorageFull)
        left = set(spares(root))
        assert len(left) == len(before) - 1  # the half-filled one is gone, not reused
        disk.fail_at = None
        assert s.store([(Q, second)]) == [second[0].id]  # sent again: stored once
        assert s.store([(Q, first + second)]) == []
        assert drain(s) == [b"payload 0", b"payload 0"]


class _SlowSync(Disk):
    """Holds every slot-file sync until told to go on."""

    def __init__(self) -> None:
        self.syncing = threading.Event()
        self.go_on = threading.Event()

    def sync_file(self, path: str) -> None:
        self.syncing.set()
        assert self.go_on.wait(10)
        super().sync_file(path)


def test_a_store_does_not_wait_for_the_dedup_checkpoints_syncs(tmp_path: Path) -> None:
    disk = _SlowSync()
    with FilesystemStorage(str(tmp_path), dedup=True, disk=disk) as s:
        first = make()
        s.store([(Q, first)])
        upkeep = threading.Thread(target=s.maintain)
        upkeep.start()
        second = make()
        results: list[list[str]] = []

        def store() -> None:
            results.append(s.store([(Q, second)]))
            results.append(s.store([(Q, first + second)]))

        try:
            assert disk.syncing.wait(10)
            # The checkpoint is syncing: a store and a resend go through meanwhile.
            adder = threading.Thread(target=store)
            adder.start()
            adder.join(5)
            assert not adder.is_alive(), "the store waited for the checkpoint's syncs"
            assert results == [[second[0].id], []]
        finally:
            disk.go_on.set()
            upkeep.join(10)
        assert not upkeep.is_alive()
        checkpoint = s.dedup.checkpoint_ms if s.dedup else 0
        assert checkpoint >= int(first[0].id[:12], 16)
    # What the second store appended is durable by the next checkpoint (at close).
    with FilesystemStorage(str(tmp_path), dedup=True) as s:
        assert s.store([(Q, first + second)]) == []
        assert drain(s) == [b"payload 0", b"payload 0"]


class _Recording(Disk):
    def __init__(self) -> None:
        self.ops: list[str] = []

    def touch(self, path: str) -> None:
        self.ops.append("touch")
        super().touch(path)

    def append(self, path: str, data: bytes, *, sync: bool) -> None:
        self.ops.append("append")
        super().append(path, data, sync=sync)

    def sync_dir(self, path: str) -> None:
        self.ops.append("sync_dir")
        super().sync_dir(path)


def test_the_consumers_are_woken_as_soon_as_the_batch_is_durable(tmp_path: Path) -> None:
    """The wake file moves right after the bucket's sync, before the ids are indexed."""
    disk = _Recording()
    with FilesystemStorage(str(tmp_path), dedup=True, disk=disk) as s:
        s.store([(Q, make())])
        disk.ops.clear()
        s.store([(Q, make())])
        assert disk.ops[-3:] == ["sync_dir", "touch", "append"]
