"""The put socket with real processes: concurrent producers, the fallback, a killed daemon."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dropr
from dropr._daemonprocess import free_port
from dropr.client._putlog import segments
from dropr.testing import ClientProcess, ServerProcess, wait_until

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
CHANNELS = ("orders", "audit", "mail")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(str(tmp_path / "store"), str(tmp_path / "server.log")).start_and_wait()
    yield s
    s.stop()


def start_client(tmp_path: Path) -> ClientProcess:
    client = ClientProcess(str(tmp_path / "spool"), str(tmp_path / "client.log")).start_and_wait()
    wait_until(lambda: os.path.exists(tmp_path / "spool" / "put.sock"), 10, what="the put socket")
    return client


def producers(tmp_path: Path, url: str, count: int, per: int, pause: float = 0.0) -> list[Any]:
    script = os.path.join(HERE, "putsocket_producer.py")
    return [
        subprocess.Popen(
            [sys.executable, script, str(tmp_path / "spool"), url, f"p{n}", str(per), str(pause)],
            stdout=subprocess.PIPE,
        )
        for n in range(count)
    ]


def results(procs: list[Any]) -> tuple[dict[str, dict[int, str]], list[str], int]:
    """Per producer: seq → id of every put that returned; errors; puts written by producers."""
    acked: dict[str, dict[int, str]] = {}
    errors: list[str] = []
    written_here = 0
    for n, p in enumerate(procs):
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        mine = acked.setdefault(f"p{n}", {})
        for line in out.decode().splitlines():
            row = json.loads(line)
            if "id" in row:
                mine[row["seq"]] = row["id"]
            elif "error" in row:
                errors.append(row["error"])
            else:
                written_here += row["written_here"]
    return acked, errors, written_here


def drain(store: str) -> list[dropr.Message]:
    got: list[dropr.Message] = []
    with dropr.Store(store) as s:
        for channel in CHANNELS:
            while batch := s.take(channel, 1000):
                got.extend(batch)
                s.ack(batch)
    return got


def stored_ids(store: str) -> set[str]:
    # A second look without taking: the store's batch files are read as they are.
    with dropr.Store(store) as s:
        return {m.id for ch in CHANNELS for m in s.take(ch, 1_000_000, lease=0.001)}


def check(acked: dict[str, dict[int, str]], got: list[dropr.Message]) -> None:
    """Every acknowledged put stored once; each producer's order kept per channel."""
    ids = [m.id for m in got]
    assert len(ids) == len(set(ids)), "a message was stored twice"
    want = {mid for mine in acked.values() for mid in mine.values()}
    assert want <= set(ids), f"lost {len(want - set(ids))} acknowledged messages"
    last: dict[tuple[str, str], int] = {}
    for m in got:
        name, seq = m.payload.decode().split(":")
        key = (name, m.channel)
        assert int(seq) > last.get(key, -1), f"{name} out of order in {m.channel}"
        last[key] = int(seq)


def wait_for(store: str, ids: set[str], timeout: float = 120) -> None:
    wait_until(lambda: ids <= stored_ids(store), timeout, 0.2, "every acknowledged message")


def test_concurrent_producers_share_syncs_and_arrive_once_in_order(
    server: ServerProcess, tmp_path: Path
) -> None:
    client = start_client(tmp_path)
    try:
        acked, errors, written_here = results(producers(tmp_path, server.url, 8, 250))
        assert errors == [] and written_here == 0  # every put went through the socket
        wanted = {mid for mine in acked.values() for mid in mine.values()}
        assert len(wanted) == 2000
        wait_for(server.store, wanted)
    finally:
        client.stop()
    got = drain(server.store)
    check(acked, got)
    assert len(got) == 2000
    # Group commit: the daemon wrote fewer batches than it got puts.
    found = re.search(r"(\d+) puts written in (\d+) batches", client.log_text())
    assert found is not None and int(found[1]) == 2000
    assert int(found[2]) < 2000


def test_put_writes_itself_while_the_daemon_is_down(server: ServerProcess, tmp_path: Path) -> None:
    spool = str(tmp_path / "spool")
    with dropr.Spool(spool) as s:
        before = [s.put(b"before:%d" % i, server.url, "orders") for i in range(5)]
        assert s.written_here == 5
        old_umask = os.umask(0)  # the socket is owner-only whatever the umask
        try:
            client = start_client(tmp_path)
        finally:
            os.umask(old_umask)
        mode = os.stat(os.path.join(spool, "put.sock")).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        try:
            during = [s.put(b"during:%d" % i, server.url, "orders") for i in range(5)]
            assert s.written_here == 5  # through the socket
        finally:
            client.stop()
        assert not os.path.exists(os.path.join(spool, "put.sock"))
        after = [s.put(b"after:%d" % i, server.url, "orders") for i in range(5)]
        assert s.written_here == 10
        client = start_client(tmp_path)
        try:
            wait_for(server.store, set(before + during + after))
        finally:
            client.stop()
    got = [m.id for m in drain(server.store)]
    assert got == before + during + after


def test_a_daemon_killed_mid_put_loses_nothing_acknowledged(
    server: ServerProcess, tmp_path: Path
) -> None:
    client = start_client(tmp_path)
    procs = producers(tmp_path, server.url, 4, 600, pause=0.002)
    try:
        for _ in range(3):
            time.sleep(0.7)
            client.kill()  # SIGKILL while producers put
            time.sleep(0.3)
            client = start_client(tmp_path)
        acked, errors, written_here = results(procs)
        # Each put returned after a sync (the daemon's or its own) or raised.
        assert sum(len(m) for m in acked.values()) + len(errors) == 2400
        assert written_here > 0, "the kills should have made some producers write themselves"
        wait_for(server.store, {mid for mine in acked.values() for mid in mine.values()})
    finally:
        client.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
    check(acked, drain(server.store))


def test_answered_puts_survive_a_killed_daemon_and_go_before_later_ones(tmp_path: Path) -> None:
    # No server yet: what the daemon answered waits in its put log (a long
    # rescan keeps it there rather than in the spool).
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    spool = str(tmp_path / "spool")
    client = ClientProcess(spool, str(tmp_path / "client.log"), ["--rescan", "600"])
    client.start_and_wait()
    wait_until(lambda: os.path.exists(os.path.join(spool, "put.sock")), 10, what="the socket")
    with dropr.Spool(spool) as s:
        answered = [s.put(b"a:%d" % i, url, "orders") for i in range(5)]
        assert s.written_here == 0
        assert segments(spool), "the answered puts should be in the put log"
        client.kill()
        # The daemon is gone: the producer writes its next puts itself.
        later = [s.put(b"b:%d" % i, url, "orders") for i in range(5)]
        assert s.written_here == 5
    server = ServerProcess(str(tmp_path / "store"), str(tmp_path / "server.log"), port=port)
    server.start_and_wait()
    try:
        client.start_and_wait()
        try:
            wait_for(server.store, set(answered + later))
        finally:
            client.stop()
        assert "moved 5 puts from the put log into the spool" in client.log_text()
        assert [m.id for m in drain(server.store)] == answered + later
    finally:
        server.stop()


def test_a_stopped_daemon_leaves_what_it_could_not_send_in_the_spool(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    spool = str(tmp_path / "spool")
    client = ClientProcess(spool, str(tmp_path / "client.log"), ["--rescan", "600"])
    client.start_and_wait()
    wait_until(lambda: os.path.exists(os.path.join(spool, "put.sock")), 10, what="the socket")
    with dropr.Spool(spool) as s:
        answered = [s.put(b"a:%d" % i, url, "orders") for i in range(3)]
        assert s.written_here == 0
    client.stop()
    assert segments(spool) == []  # the log is empty and removed at a clean stop
    with dropr.Spool(spool, put_socket=False) as s:
        assert s.stats()[url].depth == 3  # in the spool, where it shows and counts
    server = ServerProcess(str(tmp_path / "store"), str(tmp_path / "server.log"), port=port)
    server.start_and_wait()
    try:
        client.start_and_wait()
        try:
            wait_for(server.store, set(answered))
        finally:
            client.stop()
        assert [m.id for m in drain(server.store)] == answered
    finally:
        server.stop()
