"""What only the file-system storage has: recovery, quarantine, state logs,
bucket clean-up, the root lock, the dedup index on disk, cached listings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest

import dropr.storage.files._storage
from dropr._ids import new_id
from dropr._message import Message
from dropr.errors import StorageLocked
from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._dedup import DedupIndex
from dropr.storage.files._statelog import STATE_NAME, StateLog, format_indexes, line
from dropr.storage.files._storage import FilesystemStorage

Q = "orders"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make(count: int, priority: int = 5, size: int = 20, tag: str = "m") -> list[Message]:
    return [
        Message(new_id(), f"{tag}{i}:".encode() + b"x" * size, Q, priority) for i in range(count)
    ]


def take_all(storage: FilesystemStorage, queue: str = Q) -> list[Message]:
    taken = storage.take(queue, 100_000)
    storage.ack(taken)
    return taken


def batch_paths(root: Path, queue: str = Q) -> list[Path]:
    """Every batch file of ``queue``, in delivery order."""
    found = [
        Path(d) / f
        for d, _dirs, files in os.walk(root / "queues" / queue)
        for f in files
        if BatchName.parse(f)
    ]
    return sorted(found, key=lambda p: (p.parent.parent.parent.name, p.name))


def record_offset(messages: list[Message], index: int) -> int:
    """Where record ``index`` starts in the batch file of ``messages``."""
    chunks = batchfile.encode(messages)
    # MAGIC, then (length, body, crc) per record.
    return sum(len(c) for c in chunks[: 1 + 3 * index])


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- recovery of temporary files -------------------------------------------------------------


def test_recovery_removes_temporary_files_of_dead_writers_only(tmp_path: Path) -> None:
    FilesystemStorage(str(tmp_path)).close()
    tmp = tmp_path / "tmp"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()

        def tmp_name(pid: int) -> str:
            return f"{new_id()}.{pid}.{os.urandom(6).hex()}.tmp"

        dead_file = tmp / tmp_name(dead)
        mine = tmp / tmp_name(os.getpid())
        other_live = tmp / tmp_name(sleeper.pid)
        stale_live = tmp / tmp_name(sleeper.pid)
        foreign = tmp / "not-ours"
        for f in (dead_file, mine, other_live, stale_live, foreign):
            f.write_bytes(b"half a batch")
        # A live pid is no excuse after an hour: pids are reused.
        two_hours_ago = time.time() - 7200
        os.utime(stale_live, (two_hours_ago, two_hours_ago))
        storage = FilesystemStorage(str(tmp_path))
        left = sorted(os.listdir(tmp))
        assert left == sorted([mine.name, other_live.name])
        assert storage.recover() == {"tmp_removed": 0, "ids_relogged": 0}
        storage.close()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Once the writer is gone, the next open cleans up after it.
    FilesystemStorage(str(tmp_path)).close()
    assert os.listdir(tmp) == [mine.name]


def test_a_half_written_batch_in_tmp_is_never_delivered(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path))
    kept = make(2)
    storage.add(Q, kept)
    partial = b"".join(batchfile.encode(make(3)))[:-7]
    (tmp_path / "tmp" / f"{new_id()}.{_dead_pid()}.{os.urandom(6).hex()}.tmp").write_bytes(partial)
    storage.close()
    reopened = FilesystemStorage(str(tmp_path))
    assert [m.id for m in take_all(reopened)] == [m.id for m in kept]
    assert os.listdir(tmp_path / "tmp") == []
    reopened.close()


# -- quarantine ----------------------------------------------------------------------------------


def _corrupt_flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def _corrupt_truncate(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(offset)


@pytest.mark.parametrize(
    ("damage", "reason_word"),
    [(_corrupt_flip, "checksum"), (_corrupt_truncate, "truncated")],
    ids=["flipped-byte", "truncated"],
)
def test_a_damaged_batch_is_quarantined_and_its_readable_prefix_stays(
    tmp_path: Path, damage: Callable[[Path, int], None], reason_word: str
) -> None:
    storage = FilesystemStorage(str(tmp_path))
    before, damaged, after, urgent = (
        make(2, tag="b"),
        make(6, tag="d"),
        make(3, tag="a"),
        make(2, priority=1, tag="u"),
    )
    for batch in (before, damaged, after, urgent):
        storage.add(Q, batch)
    # Two of the batch to be damaged were taken and acked already.
    taken = storage.take(Q, 4)
    assert [m.id for m in taken] == [m.id for m in urgent + before]
    storage.ack(taken)
    taken = storage.take(Q, 2)
    assert [m.id for m in taken] == [m.id for m in damaged[:2]]
    storage.ack(taken)
    storage.close()

    path = next(p for p in batch_paths(tmp_path) if BatchName.parse(p.name).count == 6)
    # Damage record 3 in the middle of its payload.
    offset = record_offset(damaged, 3) + 40
    damage(path, offset)
    damaged_bytes = path.read_bytes()

    reopened = FilesystemStorage(str(tmp_path))
    taken = take_all(reopened)
    # The readable prefix (records 0-2, of which 0 and 1 were acked) is
    # still delivered, in its place; the rest of the queue is untouched.
    assert [m.id for m in taken] == [damaged[2].id] + [m.id for m in after]
    assert [m.payload for m in taken] == [damaged[2].payload] + [m.payload for m in after]

    quarantined = sorted(os.listdir(tmp_path / "quarantine"))
    assert len(quarantined) == 2
    data_name, why_name = quarantined
    assert why_name == data_name + ".why"
    assert (tmp_path / "quarantine" / data_name).read_bytes() == damaged_bytes
    why = json.loads((tmp_path / "quarantine" / why_name).read_text())
    assert reason_word in why["reason"]
    assert why["salvaged"] == 3
    assert why["original"] == str(path.relative_to(tmp_path))
    reopened.close()

    # Nothing comes back, and nothing more is quarantined, on the next open.
    again = FilesystemStorage(str(tmp_path))
    assert take_all(again) == []
    assert len(os.listdir(tmp_path / "quarantine")) == 2
    again.close()


def test_a_batch_with_a_bad_head_is_quarantined_whole(tmp_path: Path) -> None:
    storage = FilesystemStorage(str(tmp_path))
    bad, good = make(3), make(2)
    storage.add(Q, bad)
    storage.add(Q, good)
    path = batch_paths(tmp_path)[0]
    path.write_bytes(b"garbage" + path.read_bytes()[7:])
    storage.close()
    reopened = FilesystemStorage(str(tmp_path))
    assert [m.id for m in take_all(reopened)] == [m.id for m in good]
    whys = [n for n in os.listdir(tmp_path / "quarantine") if n.endswith(".why")]
    assert len(whys) == 1
    why = json.loads((tmp_path / "quarantine" / whys[0]).read_text())
    assert why["salvaged"] == 0 and "magic" in why["reason"]
    reopened.close()


# -- the state log -------------------------------------------------------------------------------


def _state_file(root: Path) -> Path:
    [path] = [Path(d) / STATE_NAME for d, _s, fs in os.walk(root / "queues") if STATE_NAME in fs]
    return path


@pytest.mark.parametrize("cut", [1, 5, 20, 34, 35, 36, -12, -10, -9, -4, -2])
def test_a_torn_last_line_of_the_state_log_is_ignored_and_later_lines_count(
    tmp_path: Path, cut: int
) -> None:
    clock = Clock()
    storage = FilesystemStorage(str(tmp_path), lease=10.0, clock=clock)
    messages = make(15)
    storage.add(Q, messages)
    taken = storage.take(Q, 15)
    storage.ack(taken[:1])
    storage.close()
    batch_id = BatchName.parse(batch_paths(tmp_path)[0].name).batch_id
    # An ack of messages 12 and 13 cut short by a crash: "A <batch> 1" must
    # not be read as an ack of message 1, nor anything else.
    full = line("A", batch_id, format_indexes([12, 13]))
    torn = full[:cut]
    assert not torn.endswith("\n")
    with open(_state_file(tmp_path), "a") as f:
        f.write(torn)

    clock.now += 60  # every lease has ended
    reopened = FilesystemStorage(str(tmp_path), lease=10.0, clock=clock)
    taken = reopened.take(Q, 15)
    assert [m.id for m in taken] == [m.id for m in messages[1:]]
    # Appends after the torn line start on a line of their own and count.
    reopened.ack(taken[:2])
    reopened.release(taken[2:])
    reopened.close()
    text = _state_file(tmp_path).read_text()
    assert torn + "\n" in text

    clock.now += 60
    last = FilesystemStorage(str(tmp_path), lease=10.0, clock=clock)
    assert [m.id for m in take_all(last)] == [m.id for m in messages[3:]]
    last.close()


def test_every_prefix_of_a_state_log_line_reads_as_nothing(tmp_path: Path) -> None:
    """A crash may cut a line anywhere; no cut may mean another operation."""
    batch_id = new_id()
    lines = [
        line("A", batch_id, format_indexes([12, 13, 20])),
        line("F", batch_id, "105"),
        line("T", batch_id, 1_800_000_000_000, format_indexes([1, 10, 11]), "0a1b2c3d4e5f"),
        line("R", batch_id, "1-3", "0a1b2c3d4e5f"),
    ]
    for full in lines:
        for cut in range(len(full) - 1):  # keep the checksum, lose the newline at most
            bucket = tmp_path / f"b{cut}"
            bucket.mkdir(exist_ok=True)
            # A torn line followed by whatever comes next (started on a new line).
            (bucket / STATE_NAME).write_text(full[:cut] + "\n")
            log = StateLog(str(bucket))
            log.refresh()
            state = log.state(batch_id)
            assert state.done == set() and state.leases == {}, (full, cut)
            (bucket / STATE_NAME).unlink()


# -- removing finished buckets --------------------------------------------------------------------


def test_a_finished_bucket_is_removed_once_settled(tmp_path: Path) -> None:
    clock = Clock()
    storage = FilesystemStorage(str(tmp_path), clock=clock)
    storage.add(Q, make(3))
    storage.add(Q, make(2, priority=7))
    [done_bucket] = {p.parent for p in batch_paths(tmp_path) if "/5/" in str(p)}
    [open_bucket] = {p.parent for p in batch_paths(tmp_path) if "/7/" in str(p)}
    storage.ack(storage.take(Q, 3))
    storage.take(Q, 1)  # one message of the priority-7 bucket stays leased
    assert done_bucket.is_dir()  # too recent: a batch may still arrive in it
    clock.now += 5
    storage.take(Q, 1)
    assert done_bucket.is_dir()
    clock.now += 20
    storage.take(Q, 1)
    assert not done_bucket.exists()
    assert not done_bucket.parent.exists()  # the emptied hour directory too
    assert open_bucket.is_dir()  # not finished: kept
    # The queue carries on in new buckets.
    later = make(2)
    storage.add(Q, later)
    assert [m.id for m in storage.take(Q, 10)] == [m.id for m in later]
    storage.close()


def test_a_bucket_is_kept_while_anything_in_it_is_open(tmp_path: Path) -> None:
    clock = Clock()
    storage = FilesystemStorage(str(tmp_path), clock=clock, lease=1.0)
    first, second = make(2), make(2)
    storage.add(Q, first)
    storage.add(Q, second)
    buckets = {p.parent for p in batch_paths(tmp_path)}
    taken = storage.take(Q, 4)
    storage.ack(taken[:3])
    clock.now += 60
    [back] = storage.take(Q, 10)  # its lease ended, so it is handed out again
    assert back.id == second[1].id
    assert all(b.is_dir() for b in buckets)
    storage.ack([back])
    clock.now += 60
    assert storage.take(Q, 10) == []
    assert not any(b.exists() for b in buckets)
    storage.close()


# -- the root lock ------------------------------------------------------------------------------


def test_exclusive_refuses_a_second_owner_in_the_same_process(tmp_path: Path) -> None:
    first = FilesystemStorage(str(tmp_path), exclusive=True)
    with pytest.raises(StorageLocked, match=rf"pid {os.getpid()}\b"):
        FilesystemStorage(str(tmp_path), exclusive=True)
    with pytest.raises(StorageLocked):
        FilesystemStorage(str(tmp_path), dedup=True)  # a dedup store owns its root too
    # Producers do not take the lock.
    producer = FilesystemStorage(str(tmp_path))
    producer.add(Q, make(1))
    producer.close()
    first.close()
    FilesystemStorage(str(tmp_path), exclusive=True).close()


def test_exclusive_names_the_process_that_holds_the_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from dropr.storage.files._storage import FilesystemStorage\n"
            "s = FilesystemStorage(sys.argv[1], exclusive=True)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(StorageLocked) as info:
            FilesystemStorage(str(tmp_path), exclusive=True)
        text = str(info.value)
        assert f"pid {holder.pid}" in text
        assert str(tmp_path) in text
        assert "stop the other one" in text
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    # The kernel dropped the dead holder's lock; its pid in the file is stale.
    storage = FilesystemStorage(str(tmp_path), exclusive=True)
    assert (tmp_path / "lock").read_text().strip() == str(os.getpid())
    storage.close()


# -- the dedup index on disk ----------------------------------------------------------------------


def test_dedup_survives_reopen_ack_and_cleanup(tmp_path: Path) -> None:
    clock = Clock()
    messages = make(5)
    # The batches are dated an hour back, so that their buckets can go once
    # consumed (a bucket goes only when the dedup checkpoint has passed it).
    old_batches = _SyntheticIds(int((clock.now - 3600) * 1000), step_ms=1)
    with (
        mock.patch.object(dropr.storage.files._storage, "new_id", old_batches),
        FilesystemStorage(str(tmp_path), dedup=True, clock=clock) as storage,
    ):
        assert storage.add(Q, messages) == [m.id for m in messages]
    with FilesystemStorage(str(tmp_path), dedup=True, clock=clock) as storage:
        assert storage.add(Q, messages) == []
        assert storage.add(Q, [*messages, *make(1)]) != []
        assert len(take_all(storage)) == 6
    old_hour = f"{old_batches.ms:012x}"[:7]
    old_paths = [p for p in batch_paths(tmp_path) if p.name.startswith(old_hour)]
    assert old_paths
    clock.now += 60
    with FilesystemStorage(str(tmp_path), dedup=True, clock=clock) as storage:
        assert take_all(storage) == []  # this take removes the consumed old bucket
        assert not any(p.exists() for p in old_paths)
        assert storage.add(Q, messages) == []
        assert take_all(storage) == []
    with FilesystemStorage(str(tmp_path), dedup=True, clock=clock) as storage:
        assert storage.add(Q, messages) == []


def _forget_index(root: Path) -> None:
    """Lose the ids of every batch: no slot files, checkpoint at zero."""
    ids = root / "ids"
    for name in os.listdir(ids):
        if name.endswith(".ids"):
            (ids / name).unlink()
    (ids / "checkpoint").write_text("0\n")


def test_dedup_recovery_reindexes_batches_whose_ids_were_not_recorded(tmp_path: Path) -> None:
    first, second = make(4), make(3, priority=2)
    with FilesystemStorage(str(tmp_path), dedup=True) as storage:
        storage.add(Q, first)
        storage.add("other", second)
    _forget_index(tmp_path)
    with FilesystemStorage(str(tmp_path), dedup=True) as storage:
        assert storage.add(Q, first) == []
        assert storage.add("other", second) == []
        assert len(take_all(storage)) == 4
        assert len(take_all(storage, "other")) == 3
    assert any(n.endswith(".ids") for n in os.listdir(tmp_path / "ids"))


def test_dedup_recovery_after_a_crash_between_batch_and_index(tmp_path: Path) -> None:
    """The batch is durable but its ids could not be indexed: the add still
    stored it (the ids are indexed before the next look-up, or by recovery
    after a crash), and a resend stores nothing, before and after a reopen."""
    messages = make(3)
    storage = FilesystemStorage(str(tmp_path), dedup=True)
    with mock.patch.object(DedupIndex, "record", side_effect=OSError("disk gone")):
        assert storage.add(Q, messages) == [m.id for m in messages]
    assert storage.add(Q, messages) == []
    storage.close()
    with FilesystemStorage(str(tmp_path), dedup=True) as reopened:
        assert reopened.add(Q, messages) == []
        assert [m.id for m in take_all(reopened)] == [m.id for m in messages]


def test_dedup_recovery_when_the_process_dies_before_indexing(tmp_path: Path) -> None:
    """The same, but the process is gone before it could catch up: the
    reopened store indexes the batch from the disk."""
    messages = make(3)
    storage = FilesystemStorage(str(tmp_path), dedup=True)
    with mock.patch.object(DedupIndex, "record", side_effect=OSError("disk gone")):
        storage.add(Q, messages)
    # Abandoned, not closed: no catch-up, no checkpoint.
    storage._closed = True
    storage._views.close()
    storage.disk.close(storage._root_lock_fd)
    with FilesystemStorage(str(tmp_path), dedup=True) as reopened:
        assert reopened.add(Q, messages) == []
        assert [m.id for m in take_all(reopened)] == [m.id for m in messages]


# -- cached listings -----------------------------------------------------------------------------


class _SyntheticIds:
    """Batch ids in the past, ``step_ms`` apart, to fill many old buckets."""

    def __init__(self, start_ms: int, step_ms: int) -> None:
        self.ms = start_ms
        self.step_ms = step_ms

    def __call__(self, now: float | None = None) -> str:
        self.ms += self.step_ms
        return f"{self.ms:012x}0000{os.urandom(8).hex()}"


@pytest.fixture
def count_listings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []
    real_listdir, real_scandir = os.listdir, os.scandir

    def listdir(path: object = ".") -> list[str]:
        calls.append(str(path))
        return real_listdir(path)  # type: ignore[arg-type]

    def scandir(path: object = ".") -> object:
        calls.append(str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "scandir", scandir)
    yield calls


def test_taking_does_not_relist_unchanged_buckets(
    tmp_path: Path, count_listings: list[str]
) -> None:
    """1000 single-message batches in old buckets, taken one per take: each
    directory is listed once, not once per take (promise A7)."""
    start_ms = int((time.time() - 3 * 86400) * 1000)
    ids = _SyntheticIds(start_ms, step_ms=40)
    with mock.patch.object(dropr.storage.files._storage, "new_id", ids):
        setup = FilesystemStorage(str(tmp_path))
        messages = make(1000)
        for m in messages:
            setup.add(Q, [m])
        setup.close()
    buckets = {p.parent for p in batch_paths(tmp_path)}
    hours = {b.parent for b in buckets}
    assert len(buckets) >= 9 and len(hours) >= 1
    # Unchanged buckets: their state logs and the queue's lock file exist
    # already, and every entry is older than the listing cache's tick.
    for b in buckets:
        (b / STATE_NAME).touch()
    (tmp_path / "queues" / Q / "lock").touch()
    time.sleep(0.1)
    # The storage's clock stands at the batches' time, so the finished
    # buckets are not removed while this runs (which would change their
    # parents); removal has its own tests above.
    storage = FilesystemStorage(str(tmp_path), clock=lambda: start_ms / 1000.0)
    count_listings.clear()
    taken = []
    for _ in range(1000):
        [m] = storage.take(Q, 1)
        storage.ack([m])
        taken.append(m.id)
    assert taken == [m.id for m in messages]
    assert storage.take(Q, 1) == []
    storage.close()
    directories = len(buckets) + len(hours) + 3  # + the queue, priority and queues/
    assert len(count_listings) <= directories, sorted(count_listings)


def test_batch_ids_never_fall_below_the_dedup_checkpoint(tmp_path: Path) -> None:
    """A clock set back across a restart must not date batches before the checkpoint."""
    from dropr import _ids as ids

    root = str(tmp_path / "store")
    FilesystemStorage(root, dedup=True).close()
    future_ms = int((time.time() + 3600) * 1000)
    with open(os.path.join(root, "ids", "checkpoint"), "w") as f:
        f.write(f"{future_ms}\n")
    saved = (ids._last_ms, ids._counter)
    try:
        storage = FilesystemStorage(root, dedup=True)
        assert ids.id_millis(ids.new_id()) > future_ms
        storage.close()
    finally:
        ids._last_ms, ids._counter = saved


def test_usage_is_a_running_total_between_counts(tmp_path: Path) -> None:
    """Adds, acks and fails of this process change usage() at once, without a walk."""
    storage = FilesystemStorage(str(tmp_path), usage_refresh=3600.0)
    storage.add(Q, make(4))
    assert storage.usage()[0] == 4  # the first look counts
    storage.add(Q, make(2))
    a, b, c = storage.take(Q, 3)
    storage.ack([a])
    storage.fail([b], "no")
    storage.release([c])
    assert storage.usage()[0] == 4
    assert storage.count_usage()[0] == 4  # and a count agrees
    storage.close()
