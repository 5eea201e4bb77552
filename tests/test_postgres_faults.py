"""The fault run on PostgreSQL: three servers, HAProxy, two consumers, while things break.

Real processes throughout, on one machine with "hosts" told apart by
loopback address:

* a PostgreSQL cluster of its own (``tests/pgcluster.py``) listening on
  127.0.0.1 (for the servers), 127.0.0.3 and 127.0.0.4 (one consumer each);
* three ``twistd dropr-server --store postgresql://…`` on 127.0.0.1, behind
  HAProxy on 127.0.0.2 with ``/health`` as its check;
* two producer "hosts", each a producer process (``chaos_worker.py
  produce``: ``put`` and ``put_many`` into its spool, logging every id whose
  put returned) and a ``twistd dropr-client`` sending to HAProxy;
* two consumer processes (``pg_consumer.py``) taking and acking through
  ``dropr.Store`` on the database's other addresses.

During the traffic, a few seconds apart (``PLAN``): ``kill -9`` of a random
server seven times (it is started again on its port), ``kill -9`` of each
consumer (started again), and ``pg_ctl stop -m immediate`` with a restart a
few seconds later; while the database is down, every server answers 503.
Then everything drains and :func:`verify.verify` holds the producers' and
consumers' logs to what the database and the spools hold: 0 lost, 0
duplicated, 0 corrupt.
``DROPR_PG_FAULTS_SEED`` replays a run's schedule.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lb import HAProxy, haproxy_binary
from pgcluster import PgCluster, find_bindir
from verify import DiskContents, _copy, verify

from dropr._ids import new_ids
from dropr._message import Message
from dropr.storage._postgres import PostgresStorage
from dropr.storage.files._storage import FilesystemStorage
from dropr.testing import ClientProcess, ServerProcess, wait_until
from dropr.wire import encode_batch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        haproxy_binary() is None or find_bindir() is None,
        reason="haproxy or PostgreSQL missing: apt-get install haproxy postgresql",
    ),
]

HERE = os.path.dirname(os.path.abspath(__file__))
#: The faults, in order, a few seconds apart while producers and consumers run.
PLAN = [
    "server", "server", "consumer0", "server", "server", "crash",
    "server", "server", "consumer1", "server",
]  # fmt: skip
SERVER_HOST, BALANCER_HOST, CONSUMER_HOSTS = "127.0.0.1", "127.0.0.2", ("127.0.0.3", "127.0.0.4")


def scan_database(url: str) -> DiskContents:
    """What the store holds at the end, read with SQL (nothing is taken)."""
    store = PostgresStorage(url, pool_size=1)
    out = DiskContents()
    try:
        with store._transaction() as conn:
            for row in conn.execute("SELECT id, payload, channel FROM messages ORDER BY seq"):
                out.waiting.append(_copy(Message(row[0].hex, bytes(row[1]), row[2])))
            for row in conn.execute("SELECT id, payload, channel, reason FROM failed"):
                out.failed.append((_copy(Message(row[0].hex, bytes(row[1]), row[2])), row[3]))
    finally:
        store.close()
    return out


def post(url: str, messages: list[Message]) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, encode_batch(messages), {"Content-Type": "application/x-dropr-batch"}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


class Run:
    """Every process of the run, and the faults done to them."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.faults: dict[str, int] = {
            "kill-9-server": 0,
            "kill-9-consumer": 0,
            "postgresql-crash": 0,
            "503-while-down": 0,
        }
        bindir = find_bindir()
        assert bindir is not None
        self.cluster = PgCluster(bindir, hosts=(SERVER_HOST, *CONSUMER_HOSTS))
        self.url = self.cluster.url()
        self.ports: list[int] = []
        self.servers: list[ServerProcess] = []
        self.balancer: HAProxy | None = None
        self.clients: list[ClientProcess] = []
        self.producers: list[subprocess.Popen[bytes]] = []
        self.consumers: list[subprocess.Popen[bytes] | None] = [None, None]
        self.spools = [str(root / f"host{i}-spool") for i in range(2)]
        self.producer_logs = [str(root / f"host{i}-producer.log") for i in range(2)]
        self.consumer_logs = [str(root / f"consumer{i}.log") for i in range(2)]

    # -- processes ------------------------------------------------------------------

    def start_server(self, i: int) -> None:
        n = sum(self.faults.values())
        for attempt in range(5):
            try:
                server = ServerProcess(
                    self.url,
                    str(self.root / f"server{i}-{n}-{attempt}.log"),
                    port=self.ports[i] if i < len(self.ports) else None,
                    extra=["--allow-anonymous-local"],
                ).start_and_wait()
                break
            except RuntimeError:
                # Its port, free a moment ago, was taken meanwhile (by another
                # program on this machine, or a socket still closing): retry.
                if attempt == 4:
                    raise
                time.sleep(0.5)
        if i < len(self.servers):
            self.servers[i] = server
        else:
            self.servers.append(server)
            self.ports.append(server.port)

    def start_consumer(self, i: int) -> None:
        url = self.cluster.url(host=CONSUMER_HOSTS[i])
        err = open(str(self.root / f"consumer{i}.err"), "ab")  # noqa: SIM115 (the child keeps it)
        self.consumers[i] = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "pg_consumer.py"),
                "--store",
                url,
                "--log",
                self.consumer_logs[i],
                "--seed",
                str(self.rng.randrange(2**31)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        err.close()

    def start(self) -> None:
        for i in range(3):
            self.start_server(i)
        self.balancer = HAProxy(
            str(self.root), [(SERVER_HOST, p) for p in self.ports], host=BALANCER_HOST
        ).start()
        for i, spool in enumerate(self.spools):
            client = ClientProcess(spool, str(self.root / f"host{i}-client.log"))
            self.clients.append(client.start_and_wait())
        for i in range(2):
            self.start_consumer(i)
        for i, spool in enumerate(self.spools):
            self.producers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        os.path.join(HERE, "chaos_worker.py"),
                        "produce",
                        "--spool",
                        spool,
                        "--dest",
                        self.balancer.url,
                        "--log",
                        self.producer_logs[i],
                        "--name",
                        f"host{i}",
                        "--seed",
                        str(self.rng.randrange(2**31)),
                        "--rate",
                        "150",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=open(str(self.root / f"host{i}-producer.err"), "ab"),  # noqa: SIM115
                )
            )

    # -- faults ---------------------------------------------------------------------

    def kill_a_server(self) -> None:
        i = self.rng.randrange(3)
        self.servers[i].kill()
        self.faults["kill-9-server"] += 1
        time.sleep(self.rng.uniform(0.2, 1.5))
        self.start_server(i)

    def kill_a_consumer(self, i: int) -> None:
        proc = self.consumers[i]
        assert proc is not None
        proc.kill()
        proc.wait()
        self.faults["kill-9-consumer"] += 1
        time.sleep(self.rng.uniform(0.2, 1.0))
        self.start_consumer(i)

    def crash_the_database(self) -> None:
        self.cluster.stop("immediate")
        self.faults["postgresql-crash"] += 1
        try:
            # A message of its own, on a channel no one reads: refused, never stored.
            probe = [Message(i, b"probe", "probe") for i in new_ids(1)]
            statuses = [post(s.url, probe) for s in self.servers]
            self.faults["503-while-down"] = statuses.count(503)
            assert statuses == [503, 503, 503], statuses
            time.sleep(self.rng.uniform(2.0, 4.0))
        finally:
            self.cluster.start()

    def traffic(self) -> None:
        """The schedule: a fixed list of faults, a few seconds apart, during traffic."""
        for fault in PLAN:
            time.sleep(self.rng.uniform(1.5, 3.5))
            if fault == "server":
                self.kill_a_server()
            elif fault == "crash":
                self.crash_the_database()
            else:
                self.kill_a_consumer(int(fault[-1]))
            self.check_alive()
        time.sleep(2.0)

    def check_alive(self) -> None:
        for p in self.producers:
            assert p.poll() is None, "a producer died: see host*-producer.err"
        for c in self.clients:
            assert c.alive(), c.log_text()[-3000:]

    # -- the end --------------------------------------------------------------------

    def drain(self, timeout: float) -> None:
        for p in self.producers:
            p.kill()
            p.wait()

        def empty() -> bool:
            for spool in self.spools:
                storage = FilesystemStorage(spool)
                try:
                    if storage.usage()[0]:
                        return False
                finally:
                    storage.close()
            store = PostgresStorage(self.url, pool_size=1)
            try:
                return store.usage()[0] == 0
            finally:
                store.close()

        wait_until(empty, timeout, 0.5, "spools and store to drain")

    def stop(self) -> None:
        for c in self.consumers:
            if c is not None and c.poll() is None:
                c.terminate()
                c.wait(30)
        for p in self.producers:
            if p.poll() is None:
                p.kill()
                p.wait()
        for client in self.clients:
            client.stop()
        if self.balancer is not None:
            self.balancer.stop()
        for s in self.servers:
            s.stop()


def test_three_servers_on_postgresql_lose_nothing_and_duplicate_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("DROPR_PG_FAULTS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"DROPR_PG_FAULTS_SEED={seed}")
    run = Run(tmp_path, seed)
    try:
        run.start()
        run.traffic()
        run.drain(120)
        run.stop()
        report = verify(
            run.producer_logs, run.consumer_logs, scan_database(run.url), run.spools, run.faults
        )
    finally:
        run.stop()
        run.cluster.destroy()
    outcome: dict[str, Any] = {"seed": seed, "faults": run.faults, "report": report.to_dict()}
    (tmp_path / "outcome.json").write_text(json.dumps(outcome, indent=2))
    print(
        json.dumps(
            {"faults": run.faults, **{k: v for k, v in report.to_dict().items() if k != "examples"}}
        )
    )
    assert report.lost == 0, report.examples
    assert report.duplicates == 0, report.examples
    assert report.corrupt == 0, report.examples
    assert report.put >= 2000  # the run carried real traffic
    assert report.consumed >= report.put * 0.95
    assert run.faults["kill-9-server"] == PLAN.count("server")
    assert run.faults["kill-9-consumer"] == 2
    assert run.faults["postgresql-crash"] == 1 and run.faults["503-while-down"] == 3
