"""Several dropr-servers on one PostgreSQL store, behind HAProxy.

Real processes: ``twistd dropr-server --store postgresql://…`` three times,
HAProxy (Debian's package) in front with ``/health`` as its check, a real
``twistd dropr-client`` sending through it, and a consumer reading the
store from the database.  Slow tier.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from lb import HAProxy, haproxy_binary
from pgcluster import PgCluster

import dropr
from dropr._ids import new_ids
from dropr._message import Message
from dropr.storage._postgres import PostgresStorage
from dropr.testing import ClientProcess, ServerProcess, wait_until
from dropr.wire import encode_batch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(haproxy_binary() is None, reason="haproxy missing: apt-get install haproxy"),
]


def post_batch(url: str, messages: list[Message]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url,
        data=encode_batch(messages),
        headers={"Content-Type": "application/x-dropr-batch"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def database(pg_cluster: PgCluster, pg_schema: str) -> str:
    """A database of its own (servers use the default schema)."""
    pg_cluster.psql("template1", f"CREATE DATABASE {pg_schema}")
    return pg_cluster.url(pg_schema)


@pytest.fixture
def servers(database: str, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    procs = [
        ServerProcess(database, str(tmp_path / f"server{i}.log"), extra=["--allow-anonymous-local"])
        for i in range(3)
    ]
    try:
        for p in procs:
            p.start_and_wait()
        yield procs
    finally:
        for p in procs:
            p.stop()
    for p in procs:
        # The password is in the spec the servers were given, and in no log line.
        assert "s3cret-pw" not in p.log_text()
        assert "dropr:***@127.0.0.1" in p.log_text()


def test_a_resend_to_another_server_is_answered_stored_and_stored_once(
    servers: list[ServerProcess], database: str
) -> None:
    batch = [Message(i, b"payload %d" % n, "jobs") for n, i in enumerate(new_ids(20))]
    status, answer = post_batch(servers[0].url, batch[:12])
    assert status == 200, answer
    assert sorted(answer["stored"]) == sorted(m.id for m in batch[:12])  # type: ignore[arg-type]
    # The answer was lost; the client resends the whole batch, elsewhere.
    for server in servers[1:]:
        status, answer = post_batch(server.url, batch)
        assert status == 200, answer
        assert sorted(answer["stored"]) == sorted(m.id for m in batch)  # type: ignore[arg-type]
    # Each server's metrics and status page read the shared store: all see 20.
    for server in servers:
        with urllib.request.urlopen(server.url + "metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert re.search(r'dropr_store_depth\{channel="jobs"\} 20(\.0)?\n', metrics), metrics
        with urllib.request.urlopen(server.url + "status", timeout=10) as r:
            assert r.status == 200
    store = PostgresStorage(database)
    try:
        got = store.take("jobs", 100)
        assert [m.id for m in got] == [m.id for m in batch]
        store.ack(got)
        # Processed and gone: a late resend is still answered "stored", stores nothing.
        status, answer = post_batch(servers[2].url, batch[:3])
        assert status == 200 and sorted(answer["stored"]) == sorted(m.id for m in batch[:3])  # type: ignore[arg-type]
        assert store.take("jobs", 100) == []
    finally:
        store.close()


def test_a_client_sends_through_haproxy_while_servers_die(
    servers: list[ServerProcess], database: str, tmp_path: Path
) -> None:
    balancer = HAProxy(str(tmp_path), [("127.0.0.1", s.port) for s in servers]).start()
    spool = str(tmp_path / "spool")
    client = ClientProcess(spool, str(tmp_path / "client.log"))
    store = PostgresStorage(database)
    try:
        client.start_and_wait()
        sent: list[str] = []
        with dropr.Spool(spool) as sp:
            for round_ in range(6):
                sent += sp.put_many(
                    [b"m%d-%d" % (round_, k) for k in range(200)], balancer.url, "jobs"
                )
                if round_ == 2:
                    servers[0].kill()  # HAProxy's check takes it out
                if round_ == 4:
                    servers[1].kill()
        wait_until(lambda: store.usage()[0] >= len(sent), 120, 0.1, "everything stored")
        got: list[str] = []
        while batch := store.take("jobs", 500):
            got += [m.id for m in batch]
            store.ack(batch)
        assert sorted(got) == sorted(sent)  # each once
        assert balancer.healthy()  # one server left, and HAProxy knows which
    finally:
        store.close()
        client.stop()
        balancer.stop()


def test_a_server_answers_503_while_the_database_is_down(
    pg_cluster: PgCluster, servers: list[ServerProcess], database: str
) -> None:
    batch = [Message(i, b"x", "jobs") for i in new_ids(5)]
    pg_cluster.stop("immediate")
    try:
        status, answer = post_batch(servers[0].url, batch)
        assert status == 503, answer
        assert answer.get("retry") is True
        assert "s3cret-pw" not in json.dumps(answer)
        # Still alive and answering its health check: a balancer keeps it.
        assert servers[0].healthy()
    finally:
        pg_cluster.start()

    def stored() -> bool:
        return post_batch(servers[0].url, batch)[0] == 200

    wait_until(stored, 60, 0.2, "the server to store again")
    store = PostgresStorage(database)
    try:
        assert [m.id for m in store.take("jobs", 10)] == [m.id for m in batch]
    finally:
        store.close()
