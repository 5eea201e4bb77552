"""What the PostgreSQL store promises beyond the conformance suite.

Every test here runs against the throwaway cluster of ``pgcluster`` (slow
tier): several storage objects and processes on one store, as several
dropr-servers and consumers on other hosts use it; all-or-nothing requests;
the dedup table's partitions; a database that goes away; credentials.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from pgcluster import PASSWORD, PgCluster, free_port
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from dropr._ids import id_at
from dropr._message import Message
from dropr.errors import InvalidMessage, StorageFull, StorageUnavailable
from dropr.interfaces import IReceivingStore, IStorage, IUsage, IWakeSource
from dropr.storage import _pgschema
from dropr.storage._postgres import PostgresStorage
from dropr.storage._spec import open_store

pytest.register_assert_rewrite("storage_conformance")
from storage_conformance import make, take_and_ack_worker  # noqa: E402

pytestmark = pytest.mark.slow

DAY = 86400.0


@pytest.fixture
def url(pg_cluster: PgCluster) -> str:
    return pg_cluster.url()


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(time.time())
    return c


@pytest.fixture
def opened() -> Iterator[list[PostgresStorage]]:
    storages: list[PostgresStorage] = []
    yield storages
    for s in storages:
        s.close()


def _open(opened: list[PostgresStorage], url: str, schema: str, **kw: Any) -> PostgresStorage:
    s = PostgresStorage(url, schema=schema, pool_size=4, **kw)
    opened.append(s)
    return s


def test_provides_the_server_side_interfaces(url: str, pg_schema: str, opened: list[Any]) -> None:
    s = _open(opened, url, pg_schema)
    for interface in (IStorage, IUsage, IReceivingStore, IWakeSource):
        assert verifyObject(interface, s)


def test_open_store_opens_a_postgresql_spec(url: str, pg_schema: str) -> None:
    s = open_store(url, schema=pg_schema, lease=5.0)
    try:
        assert isinstance(s, PostgresStorage)
        assert s.default_lease == 5.0
        assert s.add("jobs", make(2)) and s.usage()[0] == 2
    finally:
        s.close()


def test_a_resend_through_another_server_is_stored_once(
    url: str, pg_schema: str, opened: list[PostgresStorage]
) -> None:
    """Two storage objects stand for two dropr-servers on one database."""
    one, two = _open(opened, url, pg_schema), _open(opened, url, pg_schema)
    sent = make(50)
    assert one.store([("jobs", sent[:30])]) == [m.id for m in sent[:30]]
    # The client did not hear the answer and resends everything elsewhere.
    assert two.store([("jobs", sent)]) == [m.id for m in sent[30:]]
    assert one.store([("jobs", sent)]) == []
    got = one.take("jobs", 1000)
    assert [m.id for m in got] == [m.id for m in sent]
    one.ack(got)
    # Processed and gone, the ids are still known.
    assert two.store([("jobs", sent[:5])]) == []
    assert one.take("jobs", 1000) == []


def test_servers_storing_the_same_ids_at_once_store_each_once(
    url: str, pg_schema: str, opened: list[PostgresStorage]
) -> None:
    servers = [_open(opened, url, pg_schema) for _ in range(3)]
    sent = make(600, size=40)
    stored: list[list[str]] = [[] for _ in servers]
    errors: list[BaseException] = []

    def resend_all(i: int) -> None:
        rng = random.Random(i)
        try:
            for _ in range(3):
                for k in range(0, len(sent), 50):
                    batch = sent[k : k + 50]
                    stored[i].extend(servers[i].store([("jobs", rng.sample(batch, len(batch)))]))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=resend_all, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    every = [i for s in stored for i in s]
    assert sorted(every) == sorted(m.id for m in sent)  # each stored by exactly one call
    assert servers[0].stats()["jobs"].depth == len(sent)
    assert servers[1].usage() == (len(sent), 40 * len(sent))


def test_a_request_is_stored_all_or_nothing_across_channels(
    url: str, pg_schema: str, opened: list[PostgresStorage]
) -> None:
    s = _open(opened, url, pg_schema, max_messages=10)
    a, b = make(6, channel="a"), make(6, channel="b")
    with pytest.raises(StorageFull):
        s.store([("a", a), ("b", b)])
    assert s.queues() == [] and s.usage() == (0, 0)
    # Nothing of the refused request is in the dedup table either.
    assert s.store([("a", a[:4]), ("b", b[:4])]) == [m.id for m in a[:4] + b[:4]]
    assert s.queues() == ["a", "b"]
    s.max_messages = None
    assert s.store([("a", a), ("b", b)]) == [m.id for m in a[4:] + b[4:]]
    assert s.channel_count() == 2


def test_an_id_twice_in_one_request_is_stored_once(
    url: str, pg_schema: str, opened: list[PostgresStorage]
) -> None:
    s = _open(opened, url, pg_schema)
    m = make(1)[0]
    copy = Message(m.id, m.payload, "other")
    assert s.store([("jobs", [m]), ("other", [copy, m])]) == [m.id]
    assert s.queues() == ["jobs"]


def test_old_ids_are_refused_and_their_days_dropped_by_upkeep(
    url: str, pg_schema: str, opened: list[PostgresStorage], clock: Clock
) -> None:
    s = _open(opened, url, pg_schema, dedup_window=2 * DAY, clock=clock.seconds)
    start = clock.seconds()
    first = [Message(id_at(start - 0.5 * DAY), b"a"), Message(id_at(start), b"b")]
    assert s.store([("jobs", first)]) == [m.id for m in first]
    s.upkeep()
    today = int(start * 1000) // _pgschema.MS_PER_DAY
    with s._transaction() as conn:
        days = _pgschema.existing_days(conn, pg_schema)
    assert {today, today + 1} <= days
    assert s.oldest_accepted_id() == f"{int((start - 2 * DAY) * 1000):012x}"
    too_old = Message(id_at(start - 2 * DAY - 1), b"old")
    with pytest.raises(InvalidMessage, match="older than the dedup window"):
        s.store([("jobs", [make(1)[0], too_old])])
    # Five days on, the days of the first ids are past the window and its margin.
    clock.advance(5 * DAY)
    s.upkeep()
    with s._transaction() as conn:
        days = _pgschema.existing_days(conn, pg_schema)
    assert min(days) >= today + 5 - 3
    assert today + 5 in days
    # The ids are forgotten, and refused as too old rather than stored again.
    with pytest.raises(InvalidMessage):
        s.store([("jobs", first[1:])])
    assert [m.id for m in s.take("jobs", 10)] == [m.id for m in first]


def test_ids_of_a_day_without_a_partition_get_one(
    url: str, pg_schema: str, opened: list[PostgresStorage], clock: Clock
) -> None:
    one = _open(opened, url, pg_schema, clock=clock.seconds)
    two = _open(opened, url, pg_schema, clock=clock.seconds)
    tomorrow = Message(id_at(clock.seconds() + DAY), b"clock ahead")
    assert one.store([("jobs", [tomorrow])]) == [tomorrow.id]
    assert two.store([("jobs", [tomorrow])]) == []
    # Another process drops the partition this one believes in.
    day = int(clock.seconds() * 1000) // _pgschema.MS_PER_DAY + 1
    with two._transaction() as conn:
        _pgschema.drop_day(conn, pg_schema, day)
    later = Message(id_at(clock.seconds() + DAY + 1), b"x")
    assert one.store([("jobs", [later])]) == [later.id]


def test_two_storage_objects_never_share_a_message(
    url: str, pg_schema: str, opened: list[PostgresStorage]
) -> None:
    one, two = _open(opened, url, pg_schema), _open(opened, url, pg_schema)
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


def test_two_processes_ack_every_message_exactly_once(url: str, pg_schema: str) -> None:
    opener = functools.partial(PostgresStorage, url, schema=pg_schema, pool_size=2)
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
    got = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    assert all(got), "both processes should have taken something"
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(m.id for m in sent)
    storage = opener()
    try:
        assert storage.take("jobs", 10) == [] and storage.usage() == (0, 0)
    finally:
        storage.close()


def test_a_release_after_someone_else_took_the_message_frees_nothing(
    url: str, pg_schema: str, opened: list[PostgresStorage], clock: Clock
) -> None:
    slow = _open(opened, url, pg_schema, clock=clock.seconds)
    fast = _open(opened, url, pg_schema, clock=clock.seconds)
    slow.add("jobs", make(1))
    mine = slow.take("jobs", 1, lease=10)
    clock.advance(11)
    theirs = fast.take("jobs", 1, lease=60)
    assert theirs == mine
    slow.release(mine)  # too late: the claim is fast's now
    assert fast.take("jobs", 1) == []
    fast.ack(theirs)
    assert slow.usage() == (0, 0)


def test_watch_wakes_a_consumer_after_an_add(
    url: str, pg_schema: str, opened: list[PostgresStorage]
) -> None:
    s = _open(opened, url, pg_schema)
    woken = threading.Event()

    class Reactor:
        def callFromThread(self, f: Any, *a: Any) -> None:
            f(*a)

    stop = s.watch("jobs", woken.set, Reactor())
    try:
        time.sleep(1.0)  # the LISTEN is in place
        s.add("other", make(1))
        assert not woken.wait(1.5)
        s.add("jobs", make(1))
        assert woken.wait(10)
    finally:
        stop()


def test_the_schema_is_versioned_and_a_newer_one_refused(
    url: str, pg_schema: str, opened: list[PostgresStorage]
) -> None:
    s = _open(opened, url, pg_schema)
    with s._transaction() as conn:
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        assert row == (_pgschema.SCHEMA_VERSION,)
        conn.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(_pgschema.SchemaTooNew, match="upgrade dropr"):
        PostgresStorage(url, schema=pg_schema)
    # Opening an existing store again changes nothing.
    with s._transaction() as conn:
        conn.execute("UPDATE schema_version SET version = version - 1")
    _open(opened, url, pg_schema).add("jobs", make(1))
    assert s.usage()[0] == 1


def test_no_database_raises_storage_unavailable_without_the_password() -> None:
    url = f"postgresql://dropr:{PASSWORD}@127.0.0.1:{free_port()}/dropr"
    with pytest.raises(StorageUnavailable) as raised:
        PostgresStorage(url, connect_timeout=1)
    assert PASSWORD not in str(raised.value)
    assert "dropr:***@127.0.0.1" in str(raised.value)


def test_a_wrong_password_is_reported_and_not_shown(pg_cluster: PgCluster) -> None:
    url = pg_cluster.url().replace(PASSWORD, "wrong-pw-123")
    with pytest.raises(StorageUnavailable, match="password authentication failed") as raised:
        PostgresStorage(url, connect_timeout=2)
    assert "wrong-pw-123" not in str(raised.value)


def test_a_password_file_works_and_nothing_logs_a_password(
    pg_cluster: PgCluster,
    pg_schema: str,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{pg_cluster.port}:*:dropr:{PASSWORD}\n")
    os.chmod(passfile, 0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    caplog.set_level(logging.DEBUG)
    s = PostgresStorage(f"postgresql://dropr@127.0.0.1:{pg_cluster.port}/dropr", schema=pg_schema)
    try:
        s.add("jobs", make(1))
        assert s.where == f"postgresql://dropr@127.0.0.1:{pg_cluster.port}/dropr"
    finally:
        s.close()
    assert PASSWORD not in caplog.text


def test_database_down_then_back(
    pg_cluster: PgCluster, url: str, pg_schema: str, opened: list[PostgresStorage]
) -> None:
    """A crash of PostgreSQL: StorageUnavailable while down, everything committed after."""
    s = _open(opened, url, pg_schema, connect_timeout=1)
    before = make(10)
    s.add("jobs", before)
    pg_cluster.stop("immediate")
    try:
        for op in (
            lambda: s.add("jobs", make(3)),
            lambda: s.take("jobs", 5),
            lambda: s.stats(),
            lambda: s.usage(),
        ):
            with pytest.raises(StorageUnavailable, match=r"\*\*\*@127.0.0.1"):
                op()
    finally:
        pg_cluster.start()
    after = make(5)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert s.add("jobs", after + before) == [m.id for m in after]
            break
        except StorageUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    got = s.take("jobs", 100)
    assert [m.id for m in got] == [m.id for m in before + after]


def test_a_storage_error_names_what_to_do(url: str, pg_schema: str) -> None:
    # A bad schema name is refused before anything is sent to the database.
    with pytest.raises(Exception, match="invalid PostgreSQL schema name"):
        PostgresStorage(url, schema="Robert'); DROP TABLE students;--")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def run_dropr(*args: str) -> tuple[int, str]:
    """The ``dropr`` command, in this process; its exit status and what it printed."""
    import contextlib
    import io

    from dropr.admin.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = main(list(args))
        except SystemExit as e:
            status = int(e.code or 0)
    return status, out.getvalue()


def test_the_dropr_command_on_a_postgresql_store(pg_cluster: PgCluster) -> None:
    """status, take, ack, fail, list, requeue and purge by spec, as on any store."""
    pg_cluster.psql("template1", "CREATE DATABASE cli")
    url = pg_cluster.url("cli")
    s = PostgresStorage(url)
    try:
        sent = make(3, channel="orders")
        s.store([("orders", sent)])
        status, out = run_dropr("status", "--store", url)
        assert status == 0
        assert PASSWORD not in out
        assert out.split("\n")[1].split()[:2] == ["orders", "3"]
        status, out = run_dropr(
            "take", "--store", url, "--channel", "orders", "--limit", "3", "--ids"
        )
        taken = out.split()
        assert status == 0 and taken == [m.id for m in sent]
        assert run_dropr("ack", "--store", url, taken[0])[0] == 0
        assert run_dropr("fail", "--store", url, "--reason", "bad", taken[1])[0] == 0
        status, out = run_dropr("list", "--store", url, "--json")
        assert status == 0 and taken[1] in out and taken[0] not in out
        assert run_dropr("requeue", "--store", url, "--yes", taken[1])[0] == 0
        assert [m for m, _ in s.failed("orders")] == []
        got = s.take("orders", 10, lease=60)  # sent[2] is still leased to the command
        assert [m.id for m in got] == [sent[1].id]
        s.fail(got, "bad again")
        assert run_dropr("purge", "--store", url, "--yes", "failed", taken[1])[0] == 0
        assert s.failed("orders") == []
    finally:
        s.close()


def test_a_storage_opened_before_a_fork_works_in_the_child(
    url: str, pg_schema: str, opened: list[PostgresStorage]
) -> None:
    """twistd daemonizes by forking after the store is opened; the daemon uses it."""
    s = _open(opened, url, pg_schema, connect_timeout=2)
    sent = make(2)
    pid = os.fork()
    if pid == 0:  # the child: a pool of its own, the parent's left alone
        code = 3
        try:
            s.add("jobs", sent)
            code = 0 if [m.id for m in s.take("jobs", 10)] == [m.id for m in sent] else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's storage works too, on connections of its own.
    assert s.stats()["jobs"].taken == 2
