"""Three workloads side by side: dropr, dropr at 5d1f997, RabbitMQ, a naive pipeline.

    python bench/sidebyside.py [--rounds 3] [--quick] [--out result.json]

Workloads (200-byte messages, everything on 127.0.0.1):

* **W1 bulk**: one producer, ``put_many(1000)``, 100,000 messages over
  three channels → client daemon → server → one consumer (take 1000 + ack).
* **W2 web app**: 8 producer processes, one ``put()`` per message, 16,000
  in all → … → the consumer; also each put's latency (p50, p99).
* **W3 latency**: one ``put()`` on an idle system → a consumer has it
  (p50, p99); for this branch also each step of the way (put, hand-over,
  send, server store, consumer wake, take) from the daemons' exact log
  times (``bench/_timelog.py``) and the consumer's own.

Systems, run in alternating rounds (A B C D, A B C D, ...), with ratios
computed within each round:

* ``dropr``: this tree.
* ``dropr-direct``: this tree with ``DROPR_PUT_SOCKET=0``, every ``put()``
  writing its own batch file as before: what group commit changes (W2, W3).
* ``baseline``: dropr as of commit 5d1f997, from a git worktree of it with
  its own venv, both made by the setup here (``--baseline-dir``).
* ``rabbitmq``: Debian's rabbitmq-server (installed by the setup when
  missing and this runs as root; skipped with the reason otherwise), pika
  for the clients; persistent messages on durable queues, publisher
  confirms per message (W2, W3) and per 1,000 (W1).
* ``naive``: a file plus fsync per message at each end and a forwarder
  posting batches of 100 over HTTP; it is slow, so its counts are cut to a
  tenth (rates stay comparable, and the run stays bounded).

Producers and the client side run on CPU 0, server and consumer on CPU 1
(``--no-pin`` to leave it to the scheduler).  Prints JSON and writes it to
``--out``.  Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BASELINE_COMMIT = "5d1f997"
CHANNELS = ("bench0", "bench1", "bench2")
SIZE = 200
#: No single step of a run may take longer than this (seconds).
STEP_TIMEOUT = 600.0


def payload(tag: str = "") -> bytes:
    return (tag + ":").encode().ljust(SIZE, b".")


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def write_json(path: str, data: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def go_at(when: float) -> None:
    """Sleep until the wall-clock time ``when`` (processes start together)."""
    delay = when - time.time()
    if delay > 0:
        time.sleep(delay)


# -- roles run in child processes ---------------------------------------------------
# ``python bench/sidebyside.py --role NAME ARGS_JSON``: the dropr roles run
# with the interpreter of the dropr under test (this tree's or the
# baseline's), so they import dropr only inside.


def role_dropr_produce(a: dict[str, Any]) -> dict[str, Any]:
    import dropr

    pin(a.get("cpu"))
    with dropr.Spool(a["spool"], max_bytes=None, max_messages=None) as sp:
        go_at(a["go"])
        latencies: list[float] = []
        samples: list[dict[str, Any]] = []
        t_start = time.time()
        if a["mode"] == "bulk":
            n = 0
            while n < a["count"]:
                k = min(1000, a["count"] - n)
                sp.put_many([payload()] * k, a["url"], CHANNELS[(n // 1000) % 3])
                n += k
        elif a["mode"] == "single":
            for n in range(a["count"]):
                t0 = time.perf_counter()
                sp.put(payload(f"{a['name']}{n}"), a["url"], CHANNELS[n % 3])
                latencies.append(time.perf_counter() - t0)
        else:  # latency: one at a time on an idle system
            for n in range(a["count"]):
                time.sleep(a["pause"])
                t0 = time.time()
                mid = sp.put(payload(f"l{n}"), a["url"], CHANNELS[0])
                samples.append({"id": mid, "t0": t0, "t1": time.time()})
        t_end = time.time()
        return {"t_start": t_start, "t_end": t_end, "latencies": latencies, "samples": samples}


def role_dropr_consume(a: dict[str, Any]) -> dict[str, Any]:
    """Take (1000 a time) and ack until ``count`` arrived; woken by inotify like a consumer."""
    from twisted.internet import inotify, reactor, task
    from twisted.python.filepath import FilePath

    import dropr

    pin(a.get("cpu"))
    store = dropr.Store(a["store"])
    state: dict[str, Any] = {"got": 0, "last": 0.0, "seen": {}, "wakes": 0}
    channels = a["channels"]

    def drain(t_wake: float) -> None:
        for channel in channels:
            while True:
                batch = store.take(channel, 1000)
                if not batch:
                    break
                now = time.time()
                store.ack(batch)
                state["got"] += len(batch)
                state["last"] = now
                if a.get("record"):
                    for m in batch:
                        state["seen"][m.id] = [t_wake, now]
        if state["got"] >= a["count"] and reactor.running:  # type: ignore[attr-defined]
            # Once: a wake-up and the poll may both see the last message.
            reactor.stop()  # type: ignore[attr-defined]

    def woken(*_: Any) -> None:
        state["wakes"] += 1
        drain(time.time())

    notifier = inotify.INotify()
    notifier.startReading()
    for channel in channels:
        wake = store.storage.wake_file(channel)  # type: ignore[attr-defined]
        notifier.watch(
            FilePath(wake), mask=inotify.IN_ATTRIB | inotify.IN_MODIFY, callbacks=[woken]
        )
    poll = task.LoopingCall(lambda: drain(time.time()))
    poll.start(0.5)
    reactor.callLater(STEP_TIMEOUT, reactor.stop)  # type: ignore[attr-defined]
    write_json(a["ready"], {"ready": True})
    reactor.run()  # type: ignore[attr-defined]
    return {"got": state["got"], "t_last": state["last"], "seen": state["seen"]}


def _rabbit(port: int) -> Any:
    import pika

    params = pika.ConnectionParameters(
        "127.0.0.1", port, heartbeat=0, blocked_connection_timeout=60
    )
    return pika.BlockingConnection(params)


def role_rabbit_produce(a: dict[str, Any]) -> dict[str, Any]:
    import pika

    pin(a.get("cpu"))
    conn = _rabbit(a["port"])
    ch = conn.channel()
    props = pika.BasicProperties(delivery_mode=2)
    latencies: list[float] = []
    samples: list[dict[str, Any]] = []
    if a["mode"] == "bulk":
        # Confirms per 1,000: publish them, then wait for the broker's acks.
        confirmed = [0]

        def on_confirm(frame: Any) -> None:
            confirmed[0] = max(confirmed[0], frame.method.delivery_tag)

        ch._impl.confirm_delivery(ack_nack_callback=on_confirm)
        go_at(a["go"])
        t_start = time.time()
        sent = 0
        while sent < a["count"]:
            k = min(1000, a["count"] - sent)
            queue = CHANNELS[(sent // 1000) % 3]
            for _ in range(k):
                ch.basic_publish("", queue, payload(), props)
            sent += k
            deadline = time.monotonic() + STEP_TIMEOUT
            while confirmed[0] < sent and time.monotonic() < deadline:
                conn.process_data_events(time_limit=1)
    else:
        ch.confirm_delivery()  # basic_publish waits for each message's confirm
        go_at(a["go"])
        t_start = time.time()
        for n in range(a["count"]):
            if a["mode"] == "single":
                t0 = time.perf_counter()
                ch.basic_publish("", CHANNELS[n % 3], payload(f"{a['name']}{n}"), props)
                latencies.append(time.perf_counter() - t0)
            else:
                time.sleep(a["pause"])
                mid = f"l{n}"
                t0 = time.time()
                p = pika.BasicProperties(delivery_mode=2, message_id=mid)
                ch.basic_publish("", CHANNELS[0], payload(mid), p)
                samples.append({"id": mid, "t0": t0, "t1": time.time()})
    t_end = time.time()
    conn.close()
    return {"t_start": t_start, "t_end": t_end, "latencies": latencies, "samples": samples}


def role_rabbit_consume(a: dict[str, Any]) -> dict[str, Any]:
    pin(a.get("cpu"))
    conn = _rabbit(a["port"])
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    state: dict[str, Any] = {"got": 0, "last": 0.0, "seen": {}, "unacked": 0, "tag": 0}

    def on_message(channel: Any, method: Any, props: Any, body: bytes) -> None:
        now = time.time()
        state["got"] += 1
        state["last"] = now
        state["unacked"] += 1
        state["tag"] = method.delivery_tag
        if a.get("record"):
            state["seen"][props.message_id] = [now, now]
        if state["unacked"] >= (1 if a.get("record") else 1000):
            channel.basic_ack(method.delivery_tag, multiple=True)
            state["unacked"] = 0

    for q in a["channels"]:
        ch.basic_consume(q, on_message)
    write_json(a["ready"], {"ready": True})
    deadline = time.monotonic() + STEP_TIMEOUT
    while state["got"] < a["count"] and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
        if state["unacked"]:  # a quiet moment: ack what was handled
            ch.basic_ack(state["tag"], multiple=True)
            state["unacked"] = 0
    conn.close()
    return {"got": state["got"], "t_last": state["last"], "seen": state["seen"]}


# The naive durable pipeline: a file and an fsync per message at each end.


def _durable_file(directory: str, name: str, data: bytes) -> None:
    tmp = os.path.join(directory, "." + name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, name))
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _naive_name(tag: str) -> str:
    return f"{time.time_ns():020d}-{os.getpid()}-{tag}"


def role_naive_produce(a: dict[str, Any]) -> dict[str, Any]:
    pin(a.get("cpu"))
    spool = a["spool"]
    go_at(a["go"])
    latencies: list[float] = []
    samples: list[dict[str, Any]] = []
    t_start = time.time()
    for n in range(a["count"]):
        channel = CHANNELS[(n // 1000) % 3 if a["mode"] == "bulk" else n % 3]
        name = _naive_name(f"{a['name']}{n}")
        body = channel.encode() + b"\n" + payload(name)
        if a["mode"] == "latency":
            time.sleep(a["pause"])
            t0 = time.time()
            _durable_file(spool, name, body)
            samples.append({"id": name, "t0": t0, "t1": time.time()})
        else:
            t0 = time.perf_counter()
            _durable_file(spool, name, body)
            latencies.append(time.perf_counter() - t0)
    return {"t_start": t_start, "t_end": time.time(), "latencies": latencies, "samples": samples}


def role_naive_forward(a: dict[str, Any]) -> dict[str, Any]:
    """Send the spool's files to the receiver, 100 per request; delete what it stored."""
    pin(a.get("cpu"))
    spool = a["spool"]
    conn = http.client.HTTPConnection("127.0.0.1", a["port"], timeout=60)
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline and not os.path.exists(a["stop"]):
        names = sorted(n for n in os.listdir(spool) if not n.startswith("."))[:100]
        if not names:
            time.sleep(0.001)
            continue
        parts = []
        for name in names:
            with open(os.path.join(spool, name), "rb") as f:
                data = f.read()
            parts.append(len(data).to_bytes(4, "big") + data)
        conn.request("POST", "/", b"".join(parts))
        if conn.getresponse().read() == b"ok":
            for name in names:
                os.unlink(os.path.join(spool, name))
    return {}


def role_naive_receive(a: dict[str, Any]) -> dict[str, Any]:
    pin(a.get("cpu"))
    store = a["store"]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            pos = 0
            while pos < len(body):
                size = int.from_bytes(body[pos : pos + 4], "big")
                data = body[pos + 4 : pos + 4 + size]
                pos += 4 + size
                _durable_file(store, _naive_name("r"), data)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", a["port"]), Handler)
    server.timeout = 0.2
    write_json(a["ready"], {"ready": True})
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline and not os.path.exists(a["stop"]):
        server.handle_request()
    return {}


def role_naive_consume(a: dict[str, Any]) -> dict[str, Any]:
    pin(a.get("cpu"))
    store = a["store"]
    state: dict[str, Any] = {"got": 0, "last": 0.0, "seen": {}}
    write_json(a["ready"], {"ready": True})
    deadline = time.monotonic() + STEP_TIMEOUT
    while state["got"] < a["count"] and time.monotonic() < deadline:
        names = sorted(n for n in os.listdir(store) if not n.startswith("."))
        if not names:
            time.sleep(0.001)
            continue
        for name in names[:1000]:
            path = os.path.join(store, name)
            with open(path, "rb") as f:
                data = f.read()
            os.unlink(path)
            now = time.time()
            state["got"] += 1
            state["last"] = now
            if a.get("record"):
                tag = data.split(b"\n", 1)[1].split(b":", 1)[0].decode()
                state["seen"][tag] = [now, now]
    return {"got": state["got"], "t_last": state["last"], "seen": state["seen"]}


ROLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "dropr-produce": role_dropr_produce,
    "dropr-consume": role_dropr_consume,
    "rabbit-produce": role_rabbit_produce,
    "rabbit-consume": role_rabbit_consume,
    "naive-produce": role_naive_produce,
    "naive-forward": role_naive_forward,
    "naive-receive": role_naive_receive,
    "naive-consume": role_naive_consume,
}


# -- the orchestrator ----------------------------------------------------------------


class Child:
    """A role in a child process; its result comes back as a JSON file."""

    def __init__(self, python: str, role: str, args: dict[str, Any], top: str, env: Any) -> None:
        self.out = os.path.join(top, f"{role}-{os.urandom(4).hex()}.json")
        args = dict(args, result=self.out)
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--role", role, json.dumps(args)],
            env=env,
            stdout=subprocess.DEVNULL,
        )

    def result(self, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        if self.proc.wait(timeout) != 0:
            raise RuntimeError(f"a benchmark process failed (exit {self.proc.returncode})")
        return read_json(self.out)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Setup:
    """What every run shares: directories, the pinning, the systems' interpreters."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.dir:
            os.makedirs(args.dir, exist_ok=True)
        self.base = tempfile.mkdtemp(prefix="dropr-sidebyside-", dir=args.dir)
        self.pin = not args.no_pin and (os.cpu_count() or 1) >= 2
        self.client_cpu = 0 if self.pin else None
        self.server_cpu = 1 if self.pin else None
        self.counter = 0

    def top(self, name: str) -> str:
        self.counter += 1
        path = os.path.join(self.base, f"{self.counter:03d}-{name}")
        os.makedirs(path)
        return path


def taskset(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


class DroprSystem:
    """This tree's dropr, or the baseline's, with its own interpreter."""

    def __init__(self, name: str, python: str, source: str) -> None:
        self.name = name
        self.python = python
        self.source = source
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([source, HERE])
        self.env.pop("DROPR_SPOOL", None)

    def _twistd(self, top: str, plugin: str, args: list[str], cpu: int | None) -> Any:
        env = dict(self.env, DROPR_BENCH_TIMELOG=os.path.join(top, f"{plugin}.jsonl"))
        cmd = [
            *taskset(cpu),
            self.python,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "--logger=_timelog.observer",
            plugin,
            *args,
        ]
        return subprocess.Popen(
            cmd, env=env, cwd=top, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @contextlib.contextmanager
    def running(self, setup: Setup, top: str) -> Iterator[dict[str, Any]]:
        port = free_port()
        store, spool = os.path.join(top, "store"), os.path.join(top, "spool")
        url = f"http://127.0.0.1:{port}/"
        server = self._twistd(
            top,
            "dropr-server",
            ["--listen", f"tcp:{port}:interface=127.0.0.1", "--store", store]
            # Unsigned requests from this host are opt-in since 5d1f997.
            + ([] if self.name == "baseline" else ["--allow-anonymous-local"]),
            setup.server_cpu,
        )
        client = None
        try:

            def healthy() -> bool:
                try:
                    with urllib.request.urlopen(url + "health", timeout=1) as r:
                        return bool(r.status == 200)
                except OSError:
                    return False

            wait_for(healthy, 60, f"{self.name}'s dropr-server")
            client = self._twistd(top, "dropr-client", ["--spool", spool], setup.client_cpu)
            # The baseline has no put socket; its wake-up pipe says it is up.
            wait_for(lambda: os.path.exists(os.path.join(spool, "notify")), 60, "dropr-client")
            time.sleep(0.3)
            yield {"url": url, "store": store, "spool": spool, "top": top}
        finally:
            for p in (client, server):
                if p is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()

    def run(self, setup: Setup, workload: str, plan: dict[str, Any]) -> dict[str, Any]:
        top = setup.top(f"{self.name}-{workload}")
        with self.running(setup, top) as env:
            return run_workload(self, setup, workload, plan, env, "dropr")


class RabbitSystem:
    """Debian's rabbitmq-server on 127.0.0.1, started once for the whole run."""

    name = "rabbitmq"

    def __init__(self, setup: Setup) -> None:
        self.python = sys.executable
        self.env = dict(os.environ)
        self.port = free_port()
        self.top = setup.top("rabbitmq")
        env = dict(os.environ)
        node = f"bench{os.getpid()}@localhost"
        env.update(
            RABBITMQ_NODENAME=node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(free_port()),
            RABBITMQ_MNESIA_BASE=os.path.join(self.top, "mnesia"),
            RABBITMQ_LOG_BASE=os.path.join(self.top, "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.top, "enabled_plugins"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            HOME=self.top,
        )
        with open(os.path.join(self.top, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        # Debian's wrapper runs the node as the rabbitmq user.
        with contextlib.suppress(KeyError, OSError):
            import pwd

            user = pwd.getpwnam("rabbitmq")
            for path in (self.top, os.path.join(self.top, "enabled_plugins")):
                os.chown(path, user.pw_uid, user.pw_gid)
            os.chmod(os.path.dirname(self.top), 0o755)
        self.node = node
        self.server_env = env
        self.proc = subprocess.Popen(
            [*taskset(setup.server_cpu), "rabbitmq-server"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("rabbitmq-server exited at start")
            try:
                _rabbit(self.port).close()
                return True
            except Exception:
                return False

        wait_for(up, 120, "rabbitmq-server")

    def reset_queues(self) -> None:
        conn = _rabbit(self.port)
        ch = conn.channel()
        for q in CHANNELS:
            ch.queue_delete(q)
            ch.queue_declare(q, durable=True)
        conn.close()

    def run(self, setup: Setup, workload: str, plan: dict[str, Any]) -> dict[str, Any]:
        self.reset_queues()
        top = setup.top(f"rabbitmq-{workload}")
        return run_workload(self, setup, workload, plan, {"port": self.port, "top": top}, "rabbit")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(
                ["rabbitmqctl", "-n", self.node, "stop"],
                env=self.server_env,
                capture_output=True,
                timeout=60,
            )
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        # epmd was started for this node; it lingers harmlessly on 127.0.0.1.


class NaiveSystem:
    """A file and an fsync per message at both ends; batches of 100 on the wire."""

    name = "naive"

    def __init__(self) -> None:
        self.python = sys.executable
        self.env = dict(os.environ)

    def run(self, setup: Setup, workload: str, plan: dict[str, Any]) -> dict[str, Any]:
        top = setup.top(f"naive-{workload}")
        spool, store = os.path.join(top, "spool"), os.path.join(top, "store")
        os.makedirs(spool)
        os.makedirs(store)
        port = free_port()
        stop = os.path.join(top, "stop")
        ready = os.path.join(top, "receiver-ready")
        common = {"spool": spool, "store": store, "port": port, "stop": stop}
        receiver = Child(
            self.python,
            "naive-receive",
            dict(common, ready=ready, cpu=setup.server_cpu),
            top,
            self.env,
        )
        forwarder = None
        try:
            wait_for(lambda: os.path.exists(ready), 30, "the naive receiver")
            forwarder = Child(
                self.python, "naive-forward", dict(common, cpu=setup.client_cpu), top, self.env
            )
            env = dict(common, top=top)
            return run_workload(self, setup, workload, plan, env, "naive")
        finally:
            open(stop, "w").close()
            for child in (forwarder, receiver):
                if child is not None:
                    try:
                        child.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        child.stop()


def run_workload(
    system: Any, setup: Setup, workload: str, plan: dict[str, Any], env: dict[str, Any], kind: str
) -> dict[str, Any]:
    """Start the consumer, then the producers; time from the go to the last message taken."""
    top = env["top"]
    count = plan["count"]
    ready = os.path.join(top, "consumer-ready")
    consumer_args = dict(
        env,
        count=count,
        channels=list(CHANNELS),
        ready=ready,
        record=workload == "W3",
        cpu=setup.server_cpu,
    )
    consumer = Child(system.python, f"{kind}-consume", consumer_args, top, system.env)
    producers: list[Child] = []
    try:
        wait_for(lambda: os.path.exists(ready), 60, "the consumer")
        go = time.time() + 1.0
        per = count // plan["producers"]
        mode = {"W1": "bulk", "W2": "single", "W3": "latency"}[workload]
        for n in range(plan["producers"]):
            args = dict(
                env, count=per, go=go, mode=mode, name=f"p{n}", pause=0.02, cpu=setup.client_cpu
            )
            producers.append(Child(system.python, f"{kind}-produce", args, top, system.env))
        made = [p.result() for p in producers]
        got = consumer.result()
    finally:
        for child in (*producers, consumer):
            child.stop()
    if got["got"] < count:
        raise RuntimeError(f"{system.name} {workload}: the consumer got {got['got']} of {count}")
    out: dict[str, Any] = {"messages": count, "seconds": got["t_last"] - go}
    out["per_s"] = count / out["seconds"]
    latencies = [x for m in made for x in m["latencies"]]
    if latencies:
        out["put_p50_ms"] = statistics.median(latencies) * 1000
        out["put_p99_ms"] = percentile(latencies, 0.99) * 1000
    samples = [s for m in made for s in m["samples"]]
    if samples:
        e2e = [(got["seen"][s["id"]][1] - s["t0"]) * 1000 for s in samples]
        puts = [(s["t1"] - s["t0"]) * 1000 for s in samples]
        out.update(
            e2e_p50_ms=statistics.median(e2e),
            e2e_p99_ms=percentile(e2e, 0.99),
            put_p50_ms=statistics.median(puts),
            put_p99_ms=percentile(puts, 0.99),
        )
        if kind == "dropr":
            out["steps_ms"] = breakdown(top, samples, got["seen"])
    return out


def breakdown(
    top: str, samples: list[dict[str, Any]], seen: dict[str, list[float]]
) -> dict[str, Any]:
    """Medians of each step of a single put's way, from exact log times."""
    sends: dict[str, tuple[float, float]] = {}
    stores: dict[str, tuple[float, float]] = {}
    for name, into, marker in (
        ("dropr-client", sends, "sent "),
        ("dropr-server", stores, "stored "),
    ):
        path = os.path.join(top, f"{name}.jsonl")
        if not os.path.exists(path):
            return {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if not row.get("text", "").startswith(marker) or "ms" not in row:
                    continue
                for mid in row.get("ids") or []:
                    into[mid] = (row["t"] - row["ms"] / 1000, row["t"])
    steps: dict[str, list[float]] = {}
    for s in samples:
        mid = s["id"]
        if mid not in sends or mid not in stores or mid not in seen:
            continue
        t0 = s["t0"]
        send_start, send_end = sends[mid]
        store_start, store_end = stores[mid]
        wake, taken = seen[mid]
        for key, value in (
            ("put (returns to the producer)", s["t1"] - t0),
            ("hand-over: put to send start", send_start - t0),
            ("send: to the server's store start", store_start - send_start),
            ("server store", store_end - store_start),
            ("consumer wake after the store", wake - store_end),
            ("take", taken - wake),
            ("total: put to consumer", taken - t0),
            ("client has the server's answer", send_end - t0),
        ):
            steps.setdefault(key, []).append(value * 1000)
    return {k: round(statistics.median(v), 3) for k, v in steps.items()} | {
        "samples": len(next(iter(steps.values()), []))
    }


# -- setup of the peers ---------------------------------------------------------------


def baseline_python(directory: str) -> tuple[str, str]:
    """A worktree of the baseline commit with its own venv; (python, source dir)."""
    source = os.path.join(directory, "src")
    venv = os.path.join(directory, "venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.isdir(source):
        subprocess.run(
            ["git", "-C", REPO, "worktree", "add", "--detach", source, BASELINE_COMMIT],
            check=True,
            capture_output=True,
        )
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "-q",
                "--config-settings",
                "editable_mode=compat",
                "-e",
                source,
            ],
            check=True,
        )
    return python, source


def rabbit_available() -> str | None:
    """None when rabbitmq-server and pika can be used, else why not."""
    try:
        import pika  # noqa: F401
    except ImportError:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "pika"])
        if done.returncode != 0:
            return "pika cannot be installed"
    if shutil.which("rabbitmq-server"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "rabbitmq-server is missing and cannot be installed (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", "rabbitmq-server"], env=env, capture_output=True
    )
    if done.returncode != 0 or not shutil.which("rabbitmq-server"):
        return f"rabbitmq-server could not be installed: {done.stderr.decode()[-300:]}"
    # Debian starts the service where it can; this benchmark runs its own node.
    subprocess.run(["service", "rabbitmq-server", "stop"], capture_output=True)
    return None


def ratios(round_: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Within one round: dropr against each other system."""
    out: dict[str, Any] = {}
    mine = round_.get("dropr")
    if not mine:
        return out
    for other, res in round_.items():
        if other == "dropr" or not res or "error" in res:
            continue
        r: dict[str, float] = {"throughput": mine["per_s"] / res["per_s"]}
        if "e2e_p50_ms" in mine and "e2e_p50_ms" in res:
            r["e2e_p50 (dropr / other)"] = mine["e2e_p50_ms"] / res["e2e_p50_ms"]
        out[f"dropr/{other}"] = {k: round(v, 2) for k, v in r.items()}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--systems", default="dropr,dropr-direct,baseline,rabbitmq,naive")
    parser.add_argument("--w3-samples", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="small counts, one round")
    parser.add_argument("--dir", default=None, help="where to work (default: a temp dir)")
    parser.add_argument("--baseline-dir", default="/var/tmp/dropr-bench/baseline-5d1f997")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--out")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        role_args = json.loads(args.role_args)
        write_json(role_args["result"], ROLES[args.role](role_args))
        return 0
    scale = 0.1 if args.quick else 1.0
    plans = {
        "W1": {"count": int(100_000 * scale), "producers": 1},
        "W2": {"count": int(16_000 * scale), "producers": 8},
        "W3": {"count": max(20, int(args.w3_samples * scale)), "producers": 1},
    }
    if args.quick:
        args.rounds = 1
    setup = Setup(args)
    wanted = args.systems.split(",")
    systems: list[Any] = []
    skipped: dict[str, str] = {}
    rabbit: RabbitSystem | None = None
    try:
        if "dropr" in wanted:
            systems.append(DroprSystem("dropr", sys.executable, REPO))
        if "dropr-direct" in wanted:
            # This tree with every put writing its own batch (no put socket):
            # what group commit itself changes.
            direct = DroprSystem("dropr-direct", sys.executable, REPO)
            direct.env["DROPR_PUT_SOCKET"] = "0"
            systems.append(direct)
        if "baseline" in wanted:
            python, source = baseline_python(args.baseline_dir)
            systems.append(DroprSystem("baseline", python, source))
        if "rabbitmq" in wanted:
            why = rabbit_available()
            if why is None:
                try:
                    rabbit = RabbitSystem(setup)
                except RuntimeError:
                    # A node stopped a moment ago may still hold what a new
                    # one needs: one more try, with new ports.
                    time.sleep(10)
                    rabbit = RabbitSystem(setup)
                systems.append(rabbit)
            else:
                skipped["rabbitmq"] = why
                print(f"skipping RabbitMQ: {why}", file=sys.stderr)
        if "naive" in wanted:
            systems.append(NaiveSystem())
        report: dict[str, Any] = {
            "benchmark": "sidebyside",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "cpus": os.cpu_count(),
            "pinned": "producers and client on cpu 0, server and consumer on cpu 1"
            if setup.pin
            else "no",
            "dir": setup.base,
            "plans": plans,
            "naive_scale": 0.1,
            "skipped": skipped,
            "rounds": [],
        }
        for r in range(args.rounds):
            round_out: dict[str, Any] = {}
            for workload in args.workloads.split(","):
                results: dict[str, Any] = {}
                for system in systems:
                    if system.name == "dropr-direct" and workload == "W1":
                        continue  # put_many never uses the socket: the same as dropr
                    plan = dict(plans[workload])
                    if system.name == "naive" and workload != "W3":
                        plan["count"] = int(plan["count"] * 0.1)
                    print(f"round {r + 1} {workload} {system.name} ...", file=sys.stderr)
                    try:
                        results[system.name] = system.run(setup, workload, plan)
                    except Exception as e:
                        results[system.name] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"  {json.dumps(results[system.name])[:300]}", file=sys.stderr)
                round_out[workload] = {"results": results, "ratios": ratios(results)}
            report["rounds"].append(round_out)
        report["summary"] = summarise(report["rounds"])
    finally:
        if rabbit is not None:
            rabbit.stop()
        # Deleted only at the end: a mass delete slows file creation here for
        # minutes (BENCHMARKING.md), so no run follows one.
        shutil.rmtree(setup.base, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median [min-max] over rounds of each figure and each ratio."""
    out: dict[str, Any] = {}
    for workload in rounds[0] if rounds else []:
        figures: dict[str, list[float]] = {}
        for round_ in rounds:
            w = round_[workload]
            for system, res in w["results"].items():
                for key in ("per_s", "put_p50_ms", "put_p99_ms", "e2e_p50_ms", "e2e_p99_ms"):
                    if key in res:
                        figures.setdefault(f"{system} {key}", []).append(res[key])
            for pair, values in w["ratios"].items():
                for key, v in values.items():
                    figures.setdefault(f"{pair} {key}", []).append(v)
        out[workload] = {
            k: {
                "median": round(statistics.median(v), 2),
                "min": round(min(v), 2),
                "max": round(max(v), 2),
            }
            for k, v in figures.items()
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
