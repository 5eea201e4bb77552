"""Metrics, /stats and the JSON logs: the parts, then real daemons scraped over HTTP."""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger, LogLevel

import dropr
from dropr._ids import id_at, new_ids
from dropr._message import Message
from dropr.daemon import logs as logs
from dropr.interfaces import QueueStats
from dropr.monitoring._metrics import (
    OTHER,
    ClientMetrics,
    LabelCap,
    RateRing,
    ServerMetrics,
    StatsCache,
)
from dropr.storage.files._storage import FilesystemStorage
from dropr.testing import (
    ClientProcess,
    MemoryStorage,
    ServerProcess,
    free_port,
    twistd_command,
    wait_until,
)
from dropr.wire import CONTENT_TYPE, encode_batch


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus exposition."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- the parts ---------------------------------------------------------------------


def test_rate_ring_counts_per_slot_and_forgets_old_slots() -> None:
    clock = FakeClock(1000.0)
    ring = RateRing(interval=10.0, slots=6, clock=clock)
    ring.add("stored", 5)
    ring.add("stored", 2)
    clock.now += 10
    ring.add("stored", 3)
    ring.add("rejected")
    snap = ring.snapshot(["refused"])
    assert snap["interval"] == 10.0 and snap["end"] == 1020.0
    assert snap["series"] == {
        "stored": [0, 0, 0, 0, 7, 3],
        "rejected": [0, 0, 0, 0, 0, 1],
        "refused": [0] * 6,
    }
    clock.now += 10
    # The last whole minute (six slots here would be 60 s; two are whole).
    assert ring.last("stored", 20) == (7 + 3) / 20
    clock.now += 1000  # long idle: everything has scrolled out
    assert ring.snapshot()["series"]["stored"] == [0] * 6
    ring.add("x", 0)
    assert "x" not in ring.snapshot()["series"]


def test_rate_ring_and_labels_are_bounded() -> None:
    ring = RateRing(slots=3, max_series=2)
    for name in ("a", "b", "c"):
        ring.add(name)
    assert sorted(ring.snapshot()["series"]) == ["a", "b"]
    cap = LabelCap(2)
    assert [cap(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]


def test_stats_cache_walks_once_per_ttl_and_one_at_a_time() -> None:
    clock = FakeClock(0.0)
    walks: list[float] = []
    release = threading.Event()

    def stats() -> dict[str, QueueStats]:
        walks.append(clock.now)
        if len(walks) == 2:
            release.wait(5)
        return {"orders": QueueStats(len(walks), 10, 1.0, 0, 0)}

    cache = StatsCache(stats, ttl=5.0, clock=clock)
    value, age = cache.get()
    assert value["orders"].depth == 1 and age == 0.0
    clock.now = 4.0
    assert cache.get() == (value, 4.0) and len(walks) == 1
    clock.now = 6.0
    # A slow walk under way: another caller gets the old figures at once.
    slow = threading.Thread(target=cache.get)
    slow.start()
    while len(walks) < 2:
        time.sleep(0.01)
    started = time.monotonic()
    assert cache.get()[0]["orders"].depth == 1
    assert time.monotonic() - started < 1.0
    release.set()
    slow.join()
    assert cache.get()[0]["orders"].depth == 2 and len(walks) == 2


def test_stats_cache_keeps_the_old_figures_when_a_walk_fails() -> None:
    clock = FakeClock(0.0)
    calls = []

    def stats() -> dict[str, QueueStats]:
        calls.append(1)
        if len(calls) > 1:
            raise OSError("disk on fire")
        return {"a": QueueStats(1, 1, 0.0, 0, 0)}

    cache = StatsCache(stats, ttl=1.0, clock=clock)
    first = cache.get()[0]
    clock.now = 2.0
    assert cache.get()[0] == first
    assert cache.error == "OSError: disk on fire"


def store_with_messages(path: Path) -> str:
    storage = FilesystemStorage(str(path), dedup=True, exclusive=True)
    ids = new_ids(3)
    storage.add("orders", [Message(i, b"12345", "orders", 5) for i in ids])
    storage.fail(storage.take("orders", 1), "bad")
    storage.close()
    return str(path)


def test_server_metrics_count_what_the_hooks_report(tmp_path: Path) -> None:
    now = [time.time()]
    reader = MemoryStorage(clock=lambda: now[0])
    old, young, bad = id_at(now[0] - 42.5), *new_ids(2)
    reader.add("orders", [Message(bad, b"12345", "orders", 0)])  # taken first, failed
    reader.add("orders", [Message(i, b"12345", "orders", 5) for i in (old, young)])
    reader.fail(reader.take("orders", 1), "bad")
    try:
        m = ServerMetrics(reader.stats)
        m.stored("orders", received=5, new=3, new_bytes=30, seconds=0.004)
        m.rejected_messages({"too_old": 2, "invalid": 0})
        m.answered(200, 0.01, nbytes=900, messages=7)
        m.answered(413, 0.001, nbytes=0, reason="request body is too large", peer="10.0.0.7")
        got = samples(m.render_metrics())
    finally:
        reader.close()
    assert got[("dropr_server_stored_messages_total", (("channel", "orders"),))] == 3
    assert got[("dropr_server_stored_bytes_total", (("channel", "orders"),))] == 30
    assert got[("dropr_server_duplicate_messages_total", (("channel", "orders"),))] == 2
    assert got[("dropr_server_rejected_messages_total", (("reason", "too_old"),))] == 2
    assert ("dropr_server_rejected_messages_total", (("reason", "invalid"),)) not in got
    assert got[("dropr_server_requests_total", (("code", "200"),))] == 1
    assert got[("dropr_server_requests_total", (("code", "413"),))] == 1
    assert got[("dropr_server_received_messages_total", ())] == 7
    assert got[("dropr_server_received_bytes_total", ())] == 900
    assert got[("dropr_server_request_seconds_count", ())] == 2
    assert got[("dropr_server_sync_seconds_count", ())] == 1
    assert got[("dropr_server_sync_seconds_bucket", (("le", "0.005"),))] == 1
    # The store's figures, read at scrape time.
    assert got[("dropr_store_depth", (("channel", "orders"),))] == 2
    assert got[("dropr_store_bytes", (("channel", "orders"),))] == 10
    assert got[("dropr_store_failed", (("channel", "orders"),))] == 1
    assert got[("dropr_store_oldest_age_seconds", (("channel", "orders"),))] == pytest.approx(
        42.5, abs=0.01
    )
    assert ("dropr_store_stats_seconds", ()) in got
    assert ("process_cpu_seconds_total", ()) in got

    stats = m.stats_json()
    assert stats["service"] == "dropr-server"
    assert stats["channels"]["orders"]["depth"] == 2
    assert stats["totals"] == {
        "stored": 3,
        "duplicates": 2,
        "rejected": 2,
        "received": 7,
        "refused_413": 1,
    }
    assert stats["rates"]["series"]["stored"][-1] == 3
    assert stats["rates"]["series"]["refused"][-1] == 1
    assert stats["rates"]["channels"]["orders"][-1] == 3
    [error] = stats["errors"]
    assert (error["status"], error["peer"]) == (413, "10.0.0.7")
    assert error["reason"] == "request body is too large"
    json.dumps(stats)  # all of it JSON


def test_two_daemons_in_one_process_do_not_share_a_registry() -> None:
    a, b = ServerMetrics(), ServerMetrics()
    a.stored("orders", 1, 1, 1, 0.001)
    assert ("dropr_server_stored_messages_total", (("channel", "orders"),)) in samples(
        a.render_metrics()
    )
    assert ("dropr_server_stored_messages_total", (("channel", "orders"),)) not in samples(
        b.render_metrics()
    )


def test_hostile_channel_names_cannot_grow_the_labels_without_end() -> None:
    m = ServerMetrics()
    for n in range(300):
        m.stored(f"c{n}", 1, 1, 1, 0.001)
    labels = {
        dict(k[1]).get("channel")
        for k in samples(m.render_metrics())
        if k[0] == "dropr_server_stored_messages_total"
    }
    assert len(labels) == 201 and OTHER in labels


class FakeSender:
    def __init__(self, state: str = "idle", **kw: Any) -> None:
        self.state = state
        self.failures = kw.get("failures", 0)
        self.last_error = kw.get("last_error", "")
        self.sent = kw.get("sent", 0)
        self.stored = kw.get("stored", 0)
        self.failed = kw.get("failed", 0)
        self.sent_bytes = kw.get("sent_bytes", 0)
        self.errors = kw.get("errors", 0)
        self.last_batch_seconds = 0.02


def test_client_metrics_read_the_senders_and_the_spool() -> None:
    up = "http://up:8080/"
    down = "http://down:8080/"
    senders = {
        up: FakeSender(sent=10, stored=9, failed=1, sent_bytes=100),
        down: FakeSender("backoff", failures=3, errors=5, last_error="ConnectionRefusedError"),
    }
    spool = {up: QueueStats(0, 0, 0.0, 0, 1), down: QueueStats(4, 40, 12.5, 0, 0)}
    m = ClientMetrics(lambda: senders, lambda: spool)
    m.batch(senders[up], 9, 1, 0)  # type: ignore[arg-type]
    got = samples(m.render_metrics())
    assert got[("dropr_client_sent_messages_total", (("destination", up),))] == 10
    assert got[("dropr_client_stored_messages_total", (("destination", up),))] == 9
    assert got[("dropr_client_failed_messages_total", (("destination", up),))] == 1
    assert got[("dropr_client_sent_bytes_total", (("destination", up),))] == 100
    assert got[("dropr_client_send_errors_total", (("destination", down),))] == 5
    assert got[("dropr_client_backoff", (("destination", down),))] == 1
    assert got[("dropr_client_backoff", (("destination", up),))] == 0
    assert got[("dropr_client_consecutive_failures", (("destination", down),))] == 3
    assert got[("dropr_client_batch_seconds_count", ())] == 1
    assert got[("dropr_spool_depth", (("destination", down),))] == 4
    assert got[("dropr_spool_oldest_age_seconds", (("destination", down),))] == 12.5
    stats = m.stats_json()
    assert stats["destinations"][down]["state"] == "backoff"
    assert stats["destinations"][down]["depth"] == 4
    assert stats["destinations"][down]["last_error"] == "ConnectionRefusedError"

    assert stats["totals"]["stored"] == 9 and stats["totals"]["send_errors"] == 5
    assert stats["rates"]["series"]["stored"][-1] == 9


# -- logs ----------------------------------------------------------------------------


def test_client_metrics_show_the_put_socket() -> None:
    figures = {"puts": 40, "writes": 9, "held_messages": 3, "held_bytes": 600}
    m = ClientMetrics(lambda: {}, lambda: {}, put_figures=lambda: figures)
    got = samples(m.render_metrics())
    assert got[("dropr_client_put_socket_puts_total", ())] == 40
    assert got[("dropr_client_put_socket_writes_total", ())] == 9
    assert got[("dropr_client_held_messages", ())] == 3
    assert got[("dropr_client_held_bytes", ())] == 600
    assert m.stats_json()["put_socket"] == figures


def test_json_log_lines_keep_the_fields() -> None:
    out = io.StringIO()
    observer = logs.JSONLinesObserver(out)
    log = Logger(namespace="dropr.test", observer=observer)
    ids = ["0" * 32, "1" * 32]
    log.info("stored {stored} messages in {ms:.1f} ms", stored=2, ms=1.234, ids=ids, peer=b"x")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("storing a batch failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["text"] == "stored 2 messages in 1.2 ms"
    assert (first["level"], first["namespace"]) == ("info", "dropr.test")
    assert first["ids"] == ids and first["stored"] == 2 and first["peer"] == "x"
    assert first["time"].endswith("+00:00")
    assert not any(k.startswith("log_") for k in first)
    assert second["level"] == "critical" and "ZeroDivisionError" in second["traceback"]


def test_log_format_option_picks_the_observer(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    try:
        check_log_format_option(tmp_path)
    finally:
        signal.signal(signal.SIGUSR1, before)


def check_log_format_option(tmp_path: Path) -> None:
    assert logs.observer_for("text", {"nodaemon": True}) is None
    on_stdout = logs.observer_for("json", {"nodaemon": True, "logfile": None})
    assert isinstance(on_stdout, logs.JSONLinesObserver)
    to_file = logs.observer_for("json", {"nodaemon": True, "logfile": str(tmp_path / "d.log")})
    assert to_file is not None
    to_file({"log_format": "hello {who}", "who": "you", "log_level": LogLevel.info})
    assert json.loads((tmp_path / "d.log").read_text())["text"] == "hello you"
    app = Application("dropr-server")
    logs.attach(app, to_file)
    assert app.getComponent(ILogObserver) is to_file


# -- real daemons, scraped over HTTP ---------------------------------------------------


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
    """``(status, body)`` of a GET (or a POST of ``data``)."""
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), r.headers.get("content-type")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("content-type")


def post_batch(url: str, messages: list[Message]) -> dict[str, Any]:
    status, body, _ = http(url, encode_batch(messages), {"Content-Type": CONTENT_TYPE})
    assert status == 200, body
    return dict(json.loads(body))


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_real_server_counts_and_logs_json(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = ServerProcess(
        str(tmp_path / "store"),
        str(log),
        extra=["--log-format", "json", "--dedup-window", "3600", "--max-request", "64K"],
    ).start_and_wait()
    try:
        ids = new_ids(5)
        batch = [Message(i, b"order %d" % n, "orders") for n, i in enumerate(ids[:4])]
        assert sorted(post_batch(server.url, batch)["stored"]) == sorted(ids[:4])
        # Again: recognised by id, answered stored, not stored twice.
        assert len(post_batch(server.url, batch)["stored"]) == 4
        too_old = Message(id_at(time.time() - 7200), b"late", "mail")
        ahead = Message(id_at(time.time() + 7200), b"early", "mail")
        answer = post_batch(server.url, [too_old, ahead, Message(ids[4], b"m", "mail")])
        assert answer["stored"] == [ids[4]] and len(answer["rejected"]) == 2
        assert http(server.url + "?channel=..%2Fetc", b"x")[0] == 400
        assert http(server.url, b"x" * 70_000)[0] == 413

        status, body, ctype = http(server.url + "metrics")
        assert status == 200 and ctype.startswith("text/plain")
        got = samples(body)
        orders = (("channel", "orders"),)
        assert got[("dropr_server_stored_messages_total", orders)] == 4
        assert got[("dropr_server_duplicate_messages_total", orders)] == 4
        assert got[("dropr_server_stored_messages_total", (("channel", "mail"),))] == 1
        assert got[("dropr_server_rejected_messages_total", (("reason", "too_old"),))] == 1
        assert got[("dropr_server_rejected_messages_total", (("reason", "clock_skew"),))] == 1
        assert got[("dropr_server_requests_total", (("code", "200"),))] == 3
        assert got[("dropr_server_requests_total", (("code", "400"),))] == 1
        assert got[("dropr_server_requests_total", (("code", "413"),))] == 1
        assert got[("dropr_server_received_messages_total", ())] == 11
        assert got[("dropr_server_request_seconds_count", ())] == 5
        assert got[("dropr_server_sync_seconds_count", ())] == 3
        assert got[("dropr_store_depth", orders)] == 4
        assert got[("dropr_store_bytes", orders)] == sum(len(m.payload) for m in batch)
        assert got[("dropr_store_depth", (("channel", "mail"),))] == 1

        status, body, ctype = http(server.url + "stats")
        stats = json.loads(body)
        assert status == 200 and ctype == "application/json"
        assert stats["channels"]["orders"]["depth"] == 4
        assert stats["totals"]["stored"] == 5 and stats["totals"]["duplicates"] == 4
        assert [e["status"] for e in stats["errors"]] == [413, 400]
        assert "larger than this server's limit" in stats["errors"][0]["reason"]
        assert stats["errors"][0]["peer"] == "127.0.0.1"
        # The receiver's own pages are where they were.
        assert json.loads(http(server.url + "health")[1]) == {"status": "ok"}
        assert http(server.url + "nothing")[0] == 404
    finally:
        server.stop()
    events = json_lines(log)
    # The batch and its resend, each answered "stored" for all four.
    first, _again = [e for e in events if e.get("stored") == 4 and e.get("ids") == ids[:4]]
    assert first["level"] == "info" and first["text"].startswith("stored 4 messages")
    assert first["namespace"] == "dropr.server._resource.ReceiverResource"
    assert first["peer"] == "127.0.0.1" and first["ms"] > 0
    [third] = [e for e in events if e.get("rejected") == 2]
    assert sorted(third["rejected_ids"]) == sorted([too_old.id, ahead.id])
    # One line per batch: no event names a single message in its text.
    assert not any(ids[0] in e["text"] for e in events)
    assert any(e["text"] == "dropr-server stopped" for e in events)


@pytest.mark.slow
def test_a_real_client_serves_its_metrics(tmp_path: Path) -> None:
    port = free_port()
    server = ServerProcess(str(tmp_path / "store"), str(tmp_path / "server.log")).start_and_wait()
    log = tmp_path / "client.log"
    client = ClientProcess(
        str(tmp_path / "spool"),
        str(log),
        extra=["--metrics", f"tcp:{port}:interface=127.0.0.1", "--log-format", "json"],
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        with dropr.Spool(str(tmp_path / "spool")) as sp:
            ids = sp.put_many([b"a", b"bb", b"ccc"], server.url, channel="orders")
        client.start()
        wait_until(lambda: stored(server.store) == 3, 30, what="3 messages in the store")
        got: dict[Any, float] = {}

        def scraped() -> bool:
            got.update(samples(http(base + "metrics")[1]))
            key = ("dropr_client_stored_messages_total", (("destination", server.url),))
            return got.get(key) == 3

        wait_until(scraped, 30, 0.2, "the client's metrics to count 3 stored")
        dest = (("destination", server.url),)
        assert got[("dropr_client_sent_bytes_total", dest)] == 6
        assert got[("dropr_client_send_errors_total", dest)] == 0
        assert got[("dropr_client_backoff", dest)] == 0
        assert got[("dropr_client_batch_seconds_count", ())] >= 1
        stats = json.loads(http(base + "stats")[1])
        assert stats["service"] == "dropr-client"
        assert stats["destinations"][server.url]["stored"] == 3
        assert http(base + "status")[0] == 404  # the page is the server's

        # The server goes away: the client counts its errors and backs off.
        server.stop()
        with dropr.Spool(str(tmp_path / "spool")) as sp:
            sp.put(b"waits", server.url)

        def backing_off() -> bool:
            got.update(samples(http(base + "metrics")[1]))
            return got[("dropr_client_backoff", dest)] == 1

        wait_until(backing_off, 30, 0.2, "the client to back off")
        assert got[("dropr_client_send_errors_total", dest)] >= 1
        assert got[("dropr_client_consecutive_failures", dest)] >= 1

        def spool_depth() -> bool:
            got.update(samples(http(base + "metrics")[1]))
            return got.get(("dropr_spool_depth", dest)) == 1

        wait_until(spool_depth, 30, 0.5, "the spool's depth to show the waiting message")
    finally:
        client.stop()
        server.stop()
    events = json_lines(log)
    [sent] = [e for e in events if e.get("ids") == ids]
    assert sent["text"].startswith(f"sent 3 to {server.url}: 3 stored")
    assert sent["destination"] == server.url and sent["count"] == 3
    assert any(e["level"] == "warn" and "cannot deliver" in e["text"] for e in events)


def stored(store: str) -> int:
    with FilesystemStorage(store) as s:
        return sum(q.depth for q in s.stats().values())


def test_the_documented_metrics_exist() -> None:
    """Every dropr_* name in docs/operations.rst and the Prometheus examples is served."""
    server = ServerMetrics(lambda: {"orders": QueueStats(1, 1, 1.0, 0, 0)})
    server.stored("orders", 2, 1, 1, 0.001)
    server.rejected_messages({"invalid": 1})
    server.answered(200, 0.01, 10, 1)
    client = ClientMetrics(
        lambda: {"http://a/": FakeSender()},  # type: ignore[dict-item]
        lambda: {"http://a/": QueueStats(1, 1, 1.0, 0, 0)},
        put_figures=lambda: {"puts": 1, "writes": 1},
    )
    client.batch(FakeSender(), 1, 0, 0)  # type: ignore[arg-type]
    served: set[str] = set()
    for m in (server, client):
        for family in text_string_to_metric_families(m.render_metrics().decode()):
            served.add(family.name)
            served.update(s.name for s in family.samples)
    docs = Path(__file__).resolve().parent.parent / "docs"
    scrape = (docs / "examples" / "prometheus.yml").read_text()
    for rules in re.findall(r"^  - (\S+\.yml)$", scrape, re.M):
        assert (docs / "examples" / rules).exists(), rules
    for page in ("operations.rst", "examples/dropr-alerts.yml"):
        named = set(re.findall(r"\bdropr_[a-z_]+[a-z]", (docs / page).read_text()))
        assert named, page
        assert named <= served, f"{page} names metrics no daemon serves: {named - served}"


@pytest.mark.slow
def test_refusals_before_a_request_is_whole_are_counted(tmp_path: Path) -> None:
    """431 (a head line too long) and 408 (too slow) are answered without a request."""
    server = ServerProcess(
        str(tmp_path / "store"), str(tmp_path / "server.log"), extra=["--request-timeout", "1"]
    ).start_and_wait()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 431")
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            assert s.recv(100).startswith(b"HTTP/1.1 408")
        got = samples(http(server.url + "metrics")[1])
        assert got[("dropr_server_requests_total", (("code", "431"),))] == 1
        assert got[("dropr_server_requests_total", (("code", "408"),))] == 1
        errors = json.loads(http(server.url + "stats")[1])["errors"]
        assert [e["status"] for e in errors] == [408, 431]
        assert errors[0]["reason"] == "request not complete within 1 seconds; send it faster"
    finally:
        server.stop()


@pytest.mark.slow
def test_twistd_logger_option_gives_json_lines_on_stdout(tmp_path: Path) -> None:
    """``twistd --logger=dropr.daemon.logs.json_observer``, for setups that log stdout."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = subprocess.Popen(
        [
            *twistd_command(),
            "-n",
            "--pidfile=",
            "--logger=dropr.daemon.logs.json_observer",
            "dropr-server",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--allow-anonymous-local",
            "--store",
            str(tmp_path / "store"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:

        def up() -> bool:
            try:
                return bool(http(url + "health")[0] == 200)
            except OSError:
                return False

        wait_until(up, 30, 0.1, "the server")
        ids = new_ids(2)
        post_batch(url, [Message(i, b"x", "orders") for i in ids])
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=30)
    events = [json.loads(line) for line in out.decode().splitlines()]
    [stored] = [e for e in events if e.get("ids") == ids]
    assert stored["text"].startswith("stored 2 messages") and stored["level"] == "info"
    assert events[-1]["text"] == "Server Shut Down."
