"""The producer's API: ``dropr.put``, ``put_many``, ``put_deferred`` and ``Spool``."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

import dropr
import dropr.client._spool
from dropr import InvalidMessage, PayloadTooLarge, Spool, StorageFull
from dropr._ids import is_valid_id, new_id
from dropr._message import Message
from dropr.client._notify import FIFO_NAME, poke
from dropr.storage._batchfile import BatchName
from dropr.storage.files._storage import FilesystemStorage, encode_queue

DEST = "http://central:8080/"
OTHER = "https://other.example:8443/"


@pytest.fixture(autouse=True)
def _no_cached_spools() -> Iterator[None]:
    """``dropr.put`` keeps one Spool per path; start and end each test without."""
    dropr.client._spool._spools.clear()
    yield
    for spool in dropr.client._spool._spools.values():
        spool.close()
    dropr.client._spool._spools.clear()


def take_all(spool: Spool, destination: str = DEST) -> list[dropr.Message]:
    taken = spool.take(destination, 10_000)
    spool.ack(taken)
    return taken


def batch_files(root: Path, destination: str = DEST) -> list[tuple[int, BatchName]]:
    """(priority, name) of every batch file of ``destination``'s queue."""
    qdir = root / "queues" / encode_queue(destination)
    found = []
    for dirpath, _dirs, files in os.walk(qdir):
        for f in files:
            bn = BatchName.parse(f)
            if bn is not None:
                priority = int(Path(dirpath).relative_to(qdir).parts[0])
                found.append((priority, bn))
    return sorted(found, key=lambda pb: (pb[0], pb[1].batch_id))


# -- put and what it leaves on disk ----------------------------------------------------


def test_put_returns_an_id_and_the_message_is_on_disk(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    message_id = dropr.put(b"\x00hello\xff", DEST, channel="orders", priority=3, spool=str(root))
    assert is_valid_id(message_id)
    # A new Spool object (as the daemon would open) finds it on disk.
    with Spool(str(root)) as reopened:
        [m] = take_all(reopened)
    assert m.id == message_id
    assert m.payload == b"\x00hello\xff"
    assert (m.channel, m.priority, m.destination) == ("orders", 3, DEST)
    # Nothing is left in the temporary directory.
    assert os.listdir(root / "tmp") == []


def test_put_defaults(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        spool.put(b"x", DEST)
        [m] = take_all(spool)
    assert (m.channel, m.priority) == ("common", 5)


def test_str_payload_is_encoded_as_utf8(tmp_path: Path) -> None:
    text = "grüße, 世界 \U0001f600"
    with Spool(str(tmp_path)) as spool:
        spool.put(text, DEST)
        [m] = take_all(spool)
    assert m.payload == text.encode("utf-8")
    assert isinstance(m.payload, bytes)


def test_bytearray_and_memoryview_payloads(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        spool.put_many([bytearray(b"ab"), memoryview(b"cd")], DEST)
        assert [m.payload for m in take_all(spool)] == [b"ab", b"cd"]


def test_dropr_spool_environment_variable_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "from-env"
    monkeypatch.setenv("DROPR_SPOOL", str(root))
    message_id = dropr.put(b"env", DEST)
    ids = dropr.put_many([b"a", b"b"], DEST)
    assert os.path.isdir(root / "queues")
    with Spool(str(root)) as spool:
        assert [m.id for m in take_all(spool)] == [message_id, *ids]


def test_spool_argument_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DROPR_SPOOL", str(tmp_path / "env"))
    dropr.put(b"x", DEST, spool=str(tmp_path / "arg"))
    assert os.path.isdir(tmp_path / "arg" / "queues")
    assert not os.path.exists(tmp_path / "env")


def test_unwritable_spool_says_what_to_do(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match=r"DROPR_SPOOL|spool="):
        dropr.put(b"x", DEST, spool=str(locked / "spool"))


def test_ids_are_distinct_and_ordered_across_threads(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    results: list[list[str]] = [[] for _ in range(4)]

    def work(n: int) -> None:
        for i in range(25):
            results[n].append(spool.put(f"{n}-{i}", DEST))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [i for r in results for i in r]
    assert len(set(all_ids)) == 100
    for r in results:
        assert r == sorted(r)  # each thread's puts are FIFO
    with Spool(str(tmp_path)) as again:
        taken = take_all(again)
    assert sorted(m.id for m in taken) == sorted(all_ids)
    # Each thread's messages come out in the order it put them.
    for n in range(4):
        mine = [m.payload.decode() for m in taken if m.payload.startswith(f"{n}-".encode())]
        assert mine == [f"{n}-{i}" for i in range(25)]
    spool.close()


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"destination": "central:8080"}, ["destination", "http"]),
        ({"destination": "ftp://central/"}, ["destination", "http"]),
        ({"destination": "http://" + "a" * 200}, ["destination", "160"]),
        ({"destination": "http://bad host/"}, ["destination"]),
        ({"destination": None}, ["destination"]),
        ({"channel": "../etc"}, ["channel", "A-Z a-z 0-9"]),
        ({"channel": ""}, ["channel"]),
        ({"channel": "a/b"}, ["channel"]),
        ({"channel": "x" * 65}, ["channel", "64"]),
        ({"priority": 10}, ["priority", "0", "9"]),
        ({"priority": -1}, ["priority"]),
        ({"priority": "1"}, ["priority"]),
        ({"priority": 1.0}, ["priority"]),
        ({"priority": True}, ["priority"]),
        ({"payload": 42}, ["payload", "bytes or str", "int"]),
        ({"payload": {"a": 1}}, ["payload", "json"]),
        ({"payload": None}, ["payload", "NoneType"]),
    ],
)
def test_bad_arguments_raise_invalid_message_saying_what_is_wrong(
    tmp_path: Path, kwargs: dict[str, object], words: list[str]
) -> None:
    args: dict[str, object] = {"payload": b"x", "destination": DEST, **kwargs}
    with pytest.raises(InvalidMessage) as info:
        dropr.put(spool=str(tmp_path), **args)  # type: ignore[arg-type]
    text = str(info.value)
    for word in words:
        assert word in text, (word, text)
    # Also a ValueError, for callers that catch the standard exception.
    assert isinstance(info.value, ValueError)
    with Spool(str(tmp_path)) as spool:
        assert spool.queues() == []
        assert take_all(spool) == []


def test_payload_too_large(tmp_path: Path) -> None:
    with Spool(str(tmp_path), max_payload=100) as spool:
        spool.put(b"x" * 100, DEST)
        with pytest.raises(PayloadTooLarge, match=r"101 bytes.*100") as info:
            spool.put(b"x" * 101, DEST)
        assert isinstance(info.value, InvalidMessage)
        # The limit counts encoded bytes: 34 three-byte characters are 102.
        with pytest.raises(PayloadTooLarge):
            spool.put("€" * 34, DEST)
        # put_many is all or nothing.
        with pytest.raises(PayloadTooLarge):
            spool.put_many([b"ok", b"y" * 101, b"ok"], DEST)
        assert [len(m.payload) for m in take_all(spool)] == [100]


def test_put_many_is_all_or_nothing_on_bad_payload(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        with pytest.raises(InvalidMessage):
            spool.put_many([b"a", 3, b"c"], DEST)  # type: ignore[list-item]
        assert take_all(spool) == []
        assert spool.put_many([], DEST) == []


# -- put_many and batch files ---------------------------------------------------------------


def test_put_many_writes_one_file_per_call(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        ids = spool.put_many([b"a", b"bb", b"ccc"], DEST, priority=2)
        files = batch_files(tmp_path)
        assert len(files) == 1
        priority, name = files[0]
        assert (priority, name.count, name.nbytes) == (2, 3, 6)
        assert [m.id for m in take_all(spool)] == ids


def test_one_file_per_priority(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        spool.put_many([b"1", b"2"], DEST, priority=7)
        spool.put_many([b"3"], DEST, priority=0)
        spool.put(b"4", DEST, priority=7)
        spool.put_many([b"5", b"6", b"7"], OTHER, priority=7)
    assert [(p, n.count) for p, n in batch_files(tmp_path)] == [(0, 1), (7, 2), (7, 1)]
    assert [(p, n.count) for p, n in batch_files(tmp_path, OTHER)] == [(7, 3)]
    # A storage add of mixed priorities also makes one file per priority.
    storage = FilesystemStorage(str(tmp_path / "mixed"))
    mixed = [Message(new_id(), b"m", "c", p) for p in (3, 1, 3, 1, 9)]
    storage.add("q", mixed)
    qdir = tmp_path / "mixed" / "queues" / "q"
    per_priority = {
        p: [f for _d, _s, fs in os.walk(qdir / p) for f in fs if BatchName.parse(f)]
        for p in os.listdir(qdir)
        if p.isdigit()
    }
    assert {p: len(fs) for p, fs in per_priority.items()} == {"1": 1, "3": 1, "9": 1}
    storage.close()


# -- limits ----------------------------------------------------------------------------------


def test_full_spool_raises_and_loses_nothing(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), max_messages=5)
    kept = spool.put_many([b"1", b"2", b"3"], DEST)
    kept += [spool.put(b"4", DEST), spool.put(b"5", OTHER)]
    with pytest.raises(StorageFull) as info:
        spool.put(b"6", DEST)
    text = str(info.value)
    assert "full" in text and "5" in text and "max_messages" in text
    with pytest.raises(StorageFull):
        spool.put_many([b"7", b"8"], OTHER)
    spool.close()
    with Spool(str(tmp_path), max_messages=None) as reopened:
        taken = take_all(reopened) + take_all(reopened, OTHER)
    assert sorted(m.id for m in taken) == sorted(kept)
    assert sorted(m.payload for m in taken) == [b"1", b"2", b"3", b"4", b"5"]


def test_max_bytes(tmp_path: Path) -> None:
    with Spool(str(tmp_path), max_bytes=1000, max_messages=None) as spool:
        spool.put(b"x" * 600, DEST)
        with pytest.raises(StorageFull, match="max_bytes"):
            spool.put(b"y" * 401, DEST)
        spool.put(b"z" * 400, DEST)
        with pytest.raises(StorageFull):
            spool.put(b"!", DEST)
        assert [len(m.payload) for m in take_all(spool)] == [600, 400]


def test_limit_counts_messages_of_other_processes(tmp_path: Path) -> None:
    """The limit is the spool's, not one Spool object's (usage is read from disk)."""
    first = Spool(str(tmp_path), max_messages=3)
    second = Spool(str(tmp_path), max_messages=3)
    first.put_many([b"a", b"b"], DEST)
    second.storage.usage_refresh = 0.0
    second.put(b"c", DEST)
    with pytest.raises(StorageFull):
        second.put(b"d", DEST)
    first.close()
    second.close()


def test_room_comes_back_once_acked_messages_are_cleaned_up(tmp_path: Path) -> None:
    now = [time.time()]
    storage = FilesystemStorage(
        str(tmp_path), max_messages=3, usage_refresh=0.0, clock=lambda: now[0]
    )

    def msg() -> Message:
        return Message(new_id(), b"m", "c", 5, DEST)

    storage.add(DEST, [msg(), msg(), msg()])
    with pytest.raises(StorageFull):
        storage.add(DEST, [msg()])
    storage.ack(storage.take(DEST, 10))
    # Once the acked batches' bucket is settled, the next take removes it.
    now[0] += 60.0
    assert storage.take(DEST, 10) == []
    assert storage.usage() == (0, 0)
    stored = storage.add(DEST, [msg(), msg(), msg()])
    assert len(stored) == 3
    storage.close()


def test_acked_messages_stop_counting_against_the_limit_at_once(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), max_messages=3)
    spool.storage.usage_refresh = 0.0
    spool.put_many([b"1", b"2", b"3"], DEST)
    with pytest.raises(StorageFull):
        spool.put(b"4", DEST)
    spool.ack(spool.take(DEST, 10))
    # Nothing waits any more: the error would say "3 messages wait".
    assert spool.storage.usage() == (0, 0)
    spool.put(b"4", DEST)
    spool.close()


def test_block_waits_then_raises(tmp_path: Path) -> None:
    with Spool(str(tmp_path), max_messages=1) as spool:
        spool.put(b"1", DEST)
        start = time.monotonic()
        with pytest.raises(StorageFull):
            spool.put(b"2", DEST, block=0.3)
        waited = time.monotonic() - start
        assert 0.3 <= waited < 2.0
        with pytest.raises(StorageFull):
            spool.put_many([b"2", b"3"], DEST, block=0.1)
        assert [m.payload for m in take_all(spool)] == [b"1"]


def test_block_succeeds_when_room_appears(tmp_path: Path) -> None:
    with Spool(str(tmp_path), max_messages=1) as spool:
        spool.put(b"1", DEST)

        def make_room() -> None:
            time.sleep(0.2)
            spool.storage.max_messages = 10

        helper = threading.Thread(target=make_room)
        helper.start()
        start = time.monotonic()
        message_id = spool.put(b"2", DEST, block=5.0)
        waited = time.monotonic() - start
        helper.join()
        assert 0.15 <= waited < 4.0
        assert [m.id for m in take_all(spool)][-1] == message_id


# -- the wake-up pipe ------------------------------------------------------------------------


def test_put_without_a_pipe_neither_fails_nor_waits(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        assert not os.path.exists(tmp_path / FIFO_NAME)
        start = time.monotonic()
        for _ in range(20):
            spool.put(b"x", DEST)
        assert time.monotonic() - start < 2.0
        assert poke(str(tmp_path)) is False


def test_put_with_a_pipe_but_no_reader_neither_fails_nor_waits(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        os.mkfifo(tmp_path / FIFO_NAME)
        start = time.monotonic()
        for _ in range(20):
            spool.put(b"x", DEST)
        assert time.monotonic() - start < 2.0
        assert poke(str(tmp_path)) is False
        assert len(take_all(spool)) == 20


def test_put_pokes_a_reader_of_the_pipe(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        fifo = tmp_path / FIFO_NAME
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert os.read(reader, 100) == b""  # nothing yet (and no writer)
            spool.put(b"x", DEST)
            assert os.read(reader, 100) == b"!"
            spool.put_many([b"a", b"b"], DEST)  # one poke per call, not per message
            spool.put(b"y", OTHER)
            assert os.read(reader, 100) == b"!!"
        finally:
            os.close(reader)


def test_put_with_a_full_pipe_neither_fails_nor_waits(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        fifo = tmp_path / FIFO_NAME
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            with pytest.raises(BlockingIOError):
                while True:
                    os.write(writer, b"." * 4096)
            start = time.monotonic()
            spool.put(b"x", DEST)
            assert time.monotonic() - start < 2.0
            assert poke(str(tmp_path)) is False
            assert [m.payload for m in take_all(spool)] == [b"x"]
        finally:
            os.close(writer)
            os.close(reader)


def test_a_pipe_name_taken_by_something_else_is_harmless(tmp_path: Path) -> None:
    with Spool(str(tmp_path)) as spool:
        os.mkdir(tmp_path / FIFO_NAME)
        spool.put(b"x", DEST)
        assert [m.payload for m in take_all(spool)] == [b"x"]


# -- Twisted ---------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_put_deferred(tmp_path: Path) -> Iterator[object]:
    message_id = yield dropr.put_deferred("hé", DEST, channel="tw", priority=1, spool=str(tmp_path))
    assert is_valid_id(message_id)
    spool = Spool(str(tmp_path))
    try:
        other = yield spool.put_deferred(b"b", DEST)
        more = yield spool.put_many_deferred([b"c", b"d"], DEST, priority=1)
        taken = take_all(spool)
    finally:
        spool.close()
    assert [m.id for m in taken] == [message_id, *more, other]
    assert taken[0].payload == "hé".encode()
    assert (taken[0].channel, taken[0].priority) == ("tw", 1)


@pytest_twisted.inlineCallbacks
def test_put_deferred_fails_with_the_same_errors(tmp_path: Path) -> Iterator[object]:
    with pytest.raises(InvalidMessage):
        yield dropr.put_deferred(b"x", "nowhere", spool=str(tmp_path))
    spool = Spool(str(tmp_path), max_messages=0)
    try:
        with pytest.raises(StorageFull):
            yield spool.put_deferred(b"x", DEST)
    finally:
        spool.close()


def test_errno_of_a_missing_pipe_is_the_expected_one(tmp_path: Path) -> None:
    """The poke relies on open() failing fast with ENXIO when no one reads."""
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as info:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert info.value.errno == errno.ENXIO
