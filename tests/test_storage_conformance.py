"""Every storage against the one conformance suite, and several at once on a store.

``storage_conformance.StorageConformance`` holds the tests; the ``backend``
fixture here runs them once per storage.  A new storage is one more entry in
``BACKENDS``.
"""

from __future__ import annotations

import functools
import hashlib
import multiprocessing
import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dropr.errors import StorageLocked
from dropr.storage._memory import MemoryStorage
from dropr.storage._sqlite import SQLiteStorage
from dropr.storage.files._storage import FilesystemStorage

# The suite's asserts live outside test modules: have pytest explain them too.
pytest.register_assert_rewrite("storage_conformance")

from storage_conformance import (  # noqa: E402
    Backend,
    Storage,
    StorageConformance,
    make,
    take_and_ack_worker,
)


def _filesystem(place: Path, clock: Callable[[], float], **options: Any) -> Storage:
    return FilesystemStorage(str(place), clock=clock, **options)


def _sqlite(place: Path, clock: Callable[[], float], **options: Any) -> Storage:
    return SQLiteStorage(str(place) + ".sqlite", clock=clock, **options)


def _memory(place: Path, clock: Callable[[], float], **options: Any) -> Storage:
    return MemoryStorage(clock=clock, **options)


def _postgresql_at(url: str) -> Callable[..., Storage]:
    """Each place a schema of its own in the test cluster's database."""

    def opener(place: Path, clock: Callable[[], float], **options: Any) -> Storage:
        from dropr.storage._postgres import PostgresStorage

        schema = "t_" + hashlib.sha1(str(place).encode()).hexdigest()[:24]
        return PostgresStorage(url, schema=schema, clock=clock, pool_size=4, **options)

    return opener


#: name → (opener, durable); "postgresql" is added by the fixture, which
#: needs the test cluster.
BACKENDS: dict[str, tuple[Callable[..., Storage], bool]] = {
    "filesystem": (_filesystem, True),
    "sqlite": (_sqlite, True),
    "memory": (_memory, False),
}


@pytest.fixture(
    # PostgreSQL runs as a server of the tests' own: the slow tier.
    params=[*sorted(BACKENDS), pytest.param("postgresql", marks=pytest.mark.slow)]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        opener, durable = _postgresql_at(cluster.url()), True
    else:
        opener, durable = BACKENDS[request.param]
    b = Backend(request.param, opener, durable, tmp_path)
    yield b
    b.close_all()


class TestStorageConformance(StorageConformance):
    """The shared suite, once per storage in ``BACKENDS``."""


# -- several storage objects on one store ------------------------------------------------
#
# Two consumer processes may open one store (the file system's queue locks,
# SQLite's write lock).  Memory storage has nothing to share.  The file-system
# storage shares only without dedup: its dedup index wants one owner.

SHARED: dict[str, Callable[[Path], Callable[[], Storage]]] = {
    "filesystem": lambda p: functools.partial(FilesystemStorage, str(p / "store")),
    "sqlite": lambda p: functools.partial(SQLiteStorage, str(p / "store.sqlite"), dedup=True),
}


@pytest.mark.parametrize("kind", sorted(SHARED))
def test_two_storage_objects_on_one_store_never_share_a_message(kind: str, tmp_path: Path) -> None:
    opener = SHARED[kind](tmp_path)
    one, two = opener(), opener()
    try:
        sent = make(300)
        for i in range(0, 300, 30):
            one.add("jobs", sent[i : i + 30])
        rng = random.Random(7)
        got: dict[int, list[str]] = {0: [], 1: []}
        storages = (one, two)
        empty = [False, False]
        while not all(empty):
            who = rng.randrange(2)
            batch = storages[who].take("jobs", rng.randrange(1, 15), lease=3600)
            empty[who] = not batch
            got[who].extend(m.id for m in batch)
            if rng.random() < 0.7:
                storages[who].ack(batch)
        assert not set(got[0]) & set(got[1])
        assert sorted(got[0] + got[1]) == sorted(m.id for m in sent)
    finally:
        one.close()
        two.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(SHARED))
def test_two_processes_ack_every_message_exactly_once(kind: str, tmp_path: Path) -> None:
    """Real child processes take and ack from one store of 2000 messages."""
    opener = SHARED[kind](tmp_path)
    storage = opener()
    sent = make(2000, size=64)
    for i in range(0, len(sent), 100):
        storage.add("jobs", sent[i : i + 100])
    storage.close()

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=take_and_ack_worker, args=(opener, "jobs", start, results, seed))
        for seed in range(2)
    ]
    for w in workers:
        w.start()
    # Read before joining: a child with a full pipe does not exit.
    got = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    assert all(got), "both processes should have taken something"
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(m.id for m in sent)
    storage = opener()
    try:
        assert storage.take("jobs", 10) == []
        assert storage.stats().get("jobs") is None or storage.stats()["jobs"].depth == 0
    finally:
        storage.close()


# -- what only the SQLite storage promises ----------------------------------------------


def test_sqlite_database_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    storage = SQLiteStorage(str(path), sync_acks=False)
    try:
        storage.add("jobs", make(3))
        storage.ack(storage.take("jobs", 2))
        assert storage.stats()["jobs"].depth == 1
        assert path.stat().st_mode & 0o777 == 0o600
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        storage.close()


def test_sqlite_exclusive_refuses_a_second_owner(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite")
    first = SQLiteStorage(path, exclusive=True)
    with pytest.raises(StorageLocked):
        SQLiteStorage(path, exclusive=True)
    first.close()
    SQLiteStorage(path, exclusive=True).close()
