"""End to end with real twistd processes on 127.0.0.1: put → client → server → store."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy

import dropr
from dropr.storage._spec import open_store
from dropr.storage.files._storage import FilesystemStorage
from dropr.testing import ClientProcess, ServerProcess, free_port, twistd_command, wait_until

# Real twistd daemons over real sockets.
pytestmark = pytest.mark.slow

CHANNELS = ("orders", "audit", "mail")


def store_spec(tmp_path: Path, kind: str) -> str:
    """A store of ``kind`` in ``tmp_path``, by the spec dropr-server is given."""
    return str(tmp_path / "store") if kind == "files" else f"sqlite://{tmp_path}/store.db"


@pytest.fixture(params=["files", "sqlite"])
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """A real dropr-server on each kind of store: the suite holds for both."""
    spec = store_spec(tmp_path, request.param)
    s = ServerProcess(spec, str(tmp_path / "server.log")).start_and_wait()
    yield s
    s.stop()


def start_client(tmp_path: Path, *extra: str) -> ClientProcess:
    return ClientProcess(
        str(tmp_path / "spool"), str(tmp_path / "client.log"), extra=list(extra)
    ).start_and_wait()


def stored_count(store: str) -> int:
    storage = open_store(store)
    try:
        return sum(s.depth for s in storage.stats().values())
    finally:
        storage.close()


def drain(store: str, channels: tuple[str, ...] = CHANNELS) -> dict[str, list[dropr.Message]]:
    """Take and ack everything, per channel, in delivery order."""
    out: dict[str, list[dropr.Message]] = {}
    s = open_store(store)
    try:
        for channel in channels:
            got = out.setdefault(channel, [])
            while True:
                batch = s.take(channel, 1000)
                if not batch:
                    break
                got.extend(batch)
                s.ack(batch)
    finally:
        s.close()
    return out


def check_exactly_once(sent: dict[str, bytes], got: dict[str, list[dropr.Message]]) -> None:
    ids = [m.id for msgs in got.values() for m in msgs]
    assert len(ids) == len(set(ids)), "a message was stored twice"
    assert set(ids) == set(sent), f"lost: {len(set(sent) - set(ids))}"
    for msgs in got.values():
        for m in msgs:
            assert m.payload == sent[m.id]


def test_20000_messages_arrive_exactly_once_in_order(server: ServerProcess, tmp_path: Path) -> None:
    client = start_client(tmp_path)
    spool = str(tmp_path / "spool")
    sent: dict[str, bytes] = {}
    order: dict[str, tuple[str, int, int]] = {}
    seq = 0
    try:
        with dropr.Spool(spool) as sp:
            for round_ in range(60):
                channel = CHANNELS[round_ % 3]
                priority = (round_ * 7) % 10
                payloads = [
                    hashlib.sha256(b"%d" % (seq + i)).digest() * 6 + b"%d" % (seq + i)
                    for i in range(330)
                ]
                ids = sp.put_many(payloads, server.url, channel=channel, priority=priority)
                for mid, p in zip(ids, payloads, strict=True):
                    sent[mid] = p
                    order[mid] = (channel, priority, seq)
                    seq += 1
            for i in range(200):
                p = b"single %d" % i
                mid = dropr.put(p, server.url, CHANNELS[i % 3], i % 10, spool=spool)
                sent[mid] = p
                order[mid] = (CHANNELS[i % 3], i % 10, seq)
                seq += 1
        assert len(sent) == 20_000
        wait_until(lambda: stored_count(server.store) >= 20_000, 120, 0.1, "20,000 stored")
    finally:
        # twistd re-raises the signal that stopped it: -SIGTERM is a clean stop.
        assert client.stop() in (0, -signal.SIGTERM)
    assert "dropr-client stopped" in client.log_text()
    got = drain(server.store)
    check_exactly_once(sent, got)
    for channel, msgs in got.items():
        keys = [order[m.id] for m in msgs]
        assert all(k[0] == channel for k in keys)
        # Lower priority number first, then first in, first out.
        assert [(k[1], k[2]) for k in keys] == sorted((k[1], k[2]) for k in keys)


def test_idle_put_arrives_fast_woken_by_the_pipe(server: ServerProcess, tmp_path: Path) -> None:
    # A rescan every 600 s: only the named pipe can explain a fast arrival.
    client = start_client(tmp_path, "--rescan", "600")
    spool = str(tmp_path / "spool")
    try:
        dropr.put(b"warm-up", server.url, spool=spool)
        wait_until(lambda: stored_count(server.store) == 1, 10)
        latencies = []
        for i in range(5):
            time.sleep(0.3)  # idle
            t0 = time.monotonic()
            dropr.put(b"ping %d" % i, server.url, spool=spool)
            wait_until(lambda n=i: stored_count(server.store) == n + 2, 5, 0.002)
            latencies.append(time.monotonic() - t0)
        assert max(latencies) < 1.0, latencies
    finally:
        client.stop()


def test_server_down_messages_wait_then_arrive(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    client = start_client(tmp_path, "--backoff-cap", "1")
    spool = str(tmp_path / "spool")
    sent = {}
    try:
        with dropr.Spool(spool) as sp:
            for i in range(5):
                payloads = [b"while down %d-%d" % (i, j) for j in range(200)]
                sent.update(zip(sp.put_many(payloads, url, "orders"), payloads, strict=True))
        time.sleep(1.5)
        with FilesystemStorage(spool) as st:
            assert st.stats()[url].depth == 1000  # all still waiting in the spool
        server = ServerProcess(str(tmp_path / "store"), str(tmp_path / "server.log"), port)
        server.start_and_wait()
        try:
            wait_until(lambda: stored_count(server.store) >= 1000, 30, 0.1, "delivery")
            time.sleep(0.5)
        finally:
            server.stop()
    finally:
        client.stop()
    check_exactly_once(sent, drain(str(tmp_path / "store"), ("orders",)))
    assert "cannot deliver" in client.log_text()


@pytest.mark.parametrize("fault", ["500", "drop-request", "drop-response"])
def test_faults_lose_nothing_and_duplicate_nothing(
    server: ServerProcess, tmp_path: Path, fault: str
) -> None:
    # Every other request meets the fault.
    proxy = FaultProxy(server.port, lambda n: fault if n % 2 == 0 else "pass").start()
    client = start_client(tmp_path, "--backoff-cap", "0.2", "--max-batch", "100")
    spool = str(tmp_path / "spool")
    sent = {}
    try:
        with dropr.Spool(spool) as sp:
            for i in range(20):
                payloads = [b"%s %d-%d" % (fault.encode(), i, j) for j in range(100)]
                sent.update(zip(sp.put_many(payloads, proxy.url, "orders"), payloads, strict=True))
        wait_until(lambda: stored_count(server.store) >= 2000, 60, 0.1, "delivery")
        time.sleep(0.5)  # a resend in flight would show up as a duplicate now
    finally:
        client.stop()
        proxy.stop()
    assert proxy.faults[fault] >= 5
    check_exactly_once(sent, drain(server.store, ("orders",)))


def test_curl_posts_a_message(server: ServerProcess) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test (apt-get install curl)"
    out = subprocess.run(
        [
            curl,
            "-sS",
            "--data-binary",
            "hello from curl",
            server.url + "?channel=orders&priority=3&id=" + "0" * 20 + "abcdef123456",
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    answer = json.loads(out.stdout)
    assert answer == {"stored": ["0" * 20 + "abcdef123456"], "rejected": {}} or answer["rejected"]
    # An id dated 1970 is older than the dedup window: refused, with a reason.
    assert "older than" in next(iter(answer["rejected"].values()))
    out = subprocess.run(
        [curl, "-sS", "--data-binary", "hello from curl", server.url + "?channel=orders"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    answer = json.loads(out.stdout)
    assert len(answer["stored"]) == 1 and answer["rejected"] == {}
    got = drain(server.store, ("orders",))["orders"]
    assert [m.payload for m in got] == [b"hello from curl"]
    assert got[0].id == answer["stored"][0]


def test_second_instances_are_refused(server: ServerProcess, tmp_path: Path) -> None:
    second = ServerProcess(server.store, str(tmp_path / "second.log"))
    second.start()
    assert second.proc is not None
    _, err = second.proc.communicate(timeout=30)
    assert second.proc.returncode != 0
    assert b"in use by pid" in err
    client = start_client(tmp_path)
    try:
        other = ClientProcess(str(tmp_path / "spool"), str(tmp_path / "client2.log")).start()
        assert other.proc is not None
        _, err = other.proc.communicate(timeout=30)
        assert other.proc.returncode != 0
        assert b"in use by pid" in err
    finally:
        client.stop()


def test_daemonized_with_pidfile_and_logfile(tmp_path: Path) -> None:
    port = free_port()
    pidfile, logfile = tmp_path / "server.pid", tmp_path / "server.log"
    subprocess.run(
        [
            *twistd_command(),
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(logfile),
            "dropr-server",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--allow-anonymous-local",
            "--store",
            str(tmp_path / "store"),
        ],
        check=True,
        timeout=30,
    )
    wait_until(pidfile.exists, 10)
    pid = int(pidfile.read_text())
    try:
        url = f"http://127.0.0.1:{port}/"
        spool = str(tmp_path / "spool")
        client = start_client(tmp_path)
        try:
            dropr.put(b"to a daemon", url, spool=spool)
            wait_until(lambda: stored_count(str(tmp_path / "store")) == 1, 10)
        finally:
            client.stop()
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not pidfile.exists(), 20)
    assert "dropr-server stopped" in logfile.read_text()
