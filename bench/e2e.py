"""End to end: put_many on the client host → durable in the server's store.

Runs a real ``twistd dropr-server`` and ``twistd dropr-client`` (pinned to
different cores with ``taskset`` when there are two, the producer sharing
the client's core, as on an application host) and measures:

* throughput: messages/s from the first ``put_many`` to the last message
  durable in the store, at each payload size, over several rounds;
* latency: for single ``put()`` calls on an idle system, the time from the
  call to the moment the server has made the message durable (the store
  touches a channel's ``wake`` file after each durable batch; the benchmark
  watches its change time).

Prints JSON (and writes it to ``--out``).  Every loop is bounded in count
and time and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dropr
from dropr.storage._spec import open_store
from dropr.testing import ClientProcess, ServerProcess, wait_until

CHANNEL = "bench"


def pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def throughput(
    top: str, size: int, count: int, batch: int, cpus: tuple[Any, Any]
) -> dict[str, Any]:
    """One round: start both daemons, put ``count`` messages, wait for all."""
    server = ServerProcess(os.path.join(top, "store"), os.path.join(top, "server.log"), cpu=cpus[1])
    client = ClientProcess(os.path.join(top, "spool"), os.path.join(top, "client.log"), cpu=cpus[0])
    server.start_and_wait()
    client.start_and_wait()
    store: Any = open_store(os.path.join(top, "store"), usage_refresh=0.0)
    payload = os.urandom(size // 2).hex().encode()[:size].ljust(size, b".")
    try:
        with dropr.Spool(os.path.join(top, "spool"), max_bytes=None, max_messages=None) as sp:
            t0 = time.perf_counter()
            for done in range(0, count, batch):
                sp.put_many([payload] * min(batch, count - done), server.url, CHANNEL)
            t_put = time.perf_counter()
        wait_until(lambda: store.usage()[0] >= count, 600, 0.002, "the store to hold everything")
        t_end = time.perf_counter()
    finally:
        store.close()
        client.stop()
        server.stop()
    return {
        "messages": count,
        "e2e_per_s": count / (t_end - t0),
        "put_per_s": count / (t_put - t0),
        "seconds": t_end - t0,
    }


def latency(top: str, samples: int, cpus: tuple[Any, Any]) -> dict[str, Any]:
    """Single puts on an idle system: put() call → durable in the store."""
    server = ServerProcess(os.path.join(top, "store"), os.path.join(top, "server.log"), cpu=cpus[1])
    client = ClientProcess(os.path.join(top, "spool"), os.path.join(top, "client.log"), cpu=cpus[0])
    server.start_and_wait()
    client.start_and_wait()
    spool = os.path.join(top, "spool")
    results: list[float] = []
    try:
        dropr.put(b"warm-up", server.url, CHANNEL, spool=spool)
        wake = os.path.join(top, "store", "queues", CHANNEL, "wake")
        wait_until(lambda: os.path.exists(wake), 10, 0.01, "the first message")
        for i in range(samples):
            time.sleep(0.02)  # idle between puts
            before = os.stat(wake).st_mtime_ns
            t0 = time.perf_counter()
            dropr.put(b"ping %d" % i, server.url, CHANNEL, spool=spool)
            deadline = t0 + 5
            while os.stat(wake).st_mtime_ns == before:
                if time.perf_counter() > deadline:
                    raise TimeoutError("a single put took over 5 s to be stored")
                time.sleep(0.0001)
            results.append((time.perf_counter() - t0) * 1000)
    finally:
        client.stop()
        server.stop()
    results.sort()
    return {
        "samples": samples,
        "p50_ms": statistics.median(results),
        "p99_ms": results[min(len(results) - 1, int(len(results) * 0.99))],
        "max_ms": results[-1],
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=200_000, help="per round at 200 B")
    parser.add_argument("--sizes", default="200,4096")
    parser.add_argument("--batch", type=int, default=1000, help="put_many size")
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--dir", default=None, help="where to work (default: a temp dir)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to cores")
    parser.add_argument("--quick", action="store_true", help="a few seconds, to check it runs")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.messages, args.latency_samples = 1, 20_000, 30
    two_cores = (os.cpu_count() or 1) >= 2 and not args.no_pin
    cpus: tuple[Any, Any] = (0, 1) if two_cores else (None, None)
    pin(cpus[0])
    base = tempfile.mkdtemp(prefix="dropr-bench-e2e-", dir=args.dir)
    report: dict[str, Any] = {
        "benchmark": "e2e",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "pinned": "client+producer on cpu 0, server on cpu 1" if two_cores else "no",
            "dir": base,
        },
        "throughput": {},
    }
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            count = args.messages if size <= 1024 else max(1000, args.messages // 5)
            rounds = []
            for r in range(args.rounds):
                top = os.path.join(base, f"tp-{size}-{r}")
                rounds.append(throughput(top, size, count, args.batch, cpus))
            report["throughput"][f"{size}B"] = {
                "messages_per_round": count,
                "e2e_per_s": summary([x["e2e_per_s"] for x in rounds]),
                "put_per_s": summary([x["put_per_s"] for x in rounds]),
                "rounds": rounds,
            }
        report["latency"] = latency(os.path.join(base, "latency"), args.latency_samples, cpus)
    finally:
        # Rename aside, delete at the end: a mass delete slows file creation
        # on this file system for minutes (see BENCHMARKING.md).
        shutil.rmtree(base, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
