"""What one hop and one sync cost on this machine, busy and after a pause.

    python bench/floor.py [--samples 300] [--dir /var/tmp] [--out floor.json]

A message's way from ``put()`` to a consumer is a chain of wake-ups (one
process hands a request to another over a socket) and durable writes.  On
a virtual machine a CPU that was idle takes a while to wake, and a disk
flush after a pause costs more than one in a stream.  This measures each
piece both ways, so the latency figures of ``bench/sidebyside.py`` can be
read against the floor the machine sets:

* ``unix round trip``: a 200-byte request and its answer between two
  processes over a Unix socket (the put socket's hop);
* ``tcp round trip``: the same over TCP on 127.0.0.1 (the client's send);
* ``unix round trip to a Twisted reactor``: the first, answered by a
  Twisted echo protocol instead of a plain loop (what a daemon adds);
* ``append + fdatasync``: 250 bytes at the end of an open file (the put log);
* ``file + fdatasync + rename + dir fsync``: a new 250-byte file put in
  place (a batch file).

"busy" runs the samples back to back; "after 10 ms" sleeps 10 ms before
each, as a put on a quiet system does.  Medians and 90th percentiles in
milliseconds; JSON on stdout and to ``--out``.  Bounded: ``--samples`` per
case, 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Process

PAYLOAD = b"x" * 200
PAUSE = 0.010


def _echo(sock: socket.socket) -> None:
    conn, _ = sock.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _twisted_echo(path: str) -> None:
    from twisted.internet import protocol, reactor

    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

        def connectionLost(self, reason: object = None) -> None:
            reactor.stop()  # type: ignore[attr-defined]

    factory = protocol.Factory.forProtocol(Echo)
    reactor.listenUNIX(path, factory)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def _serve_twisted(path: str) -> tuple[Process, socket.socket]:
    child = Process(target=_twisted_echo, args=(path,), daemon=True)
    child.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError("the Twisted echo server did not start")
        time.sleep(0.01)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    return child, client


def _serve(family: int, address: object) -> tuple[Process, socket.socket]:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(1)
    child = Process(target=_echo, args=(server,), daemon=True)
    child.start()
    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect(server.getsockname() if family == socket.AF_INET else address)
    if family == socket.AF_INET:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server.close()
    return child, client


def _round_trip(client: socket.socket) -> Callable[[], None]:
    def once() -> None:
        client.sendall(PAYLOAD)
        got = 0
        while got < len(PAYLOAD):
            got += len(client.recv(65536))

    return once


def _appender(where: str) -> Callable[[], None]:
    fd = os.open(os.path.join(where, "log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    record = b"r" * 250

    def once() -> None:
        os.write(fd, record)
        os.fdatasync(fd)

    return once


def _placer(where: str) -> Callable[[], None]:
    folder = os.path.join(where, "files")
    os.makedirs(folder, exist_ok=True)
    dir_fd = os.open(folder, os.O_RDONLY)
    count = [0]

    def once() -> None:
        count[0] += 1
        tmp = os.path.join(where, f"t{count[0]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"r" * 250)
        os.fdatasync(fd)
        os.close(fd)
        os.rename(tmp, os.path.join(folder, f"f{count[0]}"))
        os.fsync(dir_fd)

    return once


def _measure(once: Callable[[], None], samples: int, pause: float) -> dict[str, float]:
    for _ in range(10):
        once()
    times = []
    for _ in range(samples):
        if pause:
            time.sleep(pause)
        started = time.perf_counter()
        once()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 3),
        "p90_ms": round(times[int(len(times) * 0.9)], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure")
    parser.add_argument("--out")
    args = parser.parse_args()
    samples = max(20, min(args.samples, 5000))
    result: dict[str, object] = {
        "benchmark": "floor",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "samples": samples,
    }
    cases: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="dropr-floor-") as where:
        unix_child, unix_client = _serve(socket.AF_UNIX, os.path.join(where, "s.sock"))
        tcp_child, tcp_client = _serve(socket.AF_INET, ("127.0.0.1", 0))
        twisted_child, twisted_client = _serve_twisted(os.path.join(where, "t.sock"))
        pieces = {
            "unix round trip": _round_trip(unix_client),
            "tcp round trip": _round_trip(tcp_client),
            "unix round trip to a Twisted reactor": _round_trip(twisted_client),
            "append + fdatasync": _appender(where),
            "file + fdatasync + rename + dir fsync": _placer(where),
        }
        for name, once in pieces.items():
            cases[name] = {
                "busy": _measure(once, samples, 0.0),
                "after 10 ms": _measure(once, samples, PAUSE),
            }
        for client, child in (
            (unix_client, unix_child),
            (tcp_client, tcp_child),
            (twisted_client, twisted_child),
        ):
            client.close()
            child.join(5)
    result["cases"] = cases
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
