"""Scale-out: dropr-servers on one PostgreSQL store, beside one on the file system.

Two measurements in one run, on a throwaway PostgreSQL cluster of its own
(``tests/pgcluster.py``: initdb + pg_ctl, fsync on):

* **commit cost**: ``store()`` of one request of 1, 10, 100 and 1000
  messages, back to back from one thread, on the PostgreSQL store and on
  the file-system store (alternating, several rounds): requests/s and
  messages/s, i.e. what a commit (PostgreSQL) or a batch file with its syncs
  (file system) costs per request;
* **end to end**: ``--clients`` dropr-client daemons, each with its own
  spool, and a producer that ``put_many``'s into the spools; messages/s from
  the first put to the last message durable in the store, with one
  dropr-server on the file-system store (the one-host set-up) and with 1, 2
  and 3 dropr-servers on PostgreSQL behind HAProxy.

Everything runs on this machine (2 cores here: the servers, the clients,
PostgreSQL and HAProxy share them, so the curve shows what one host of that
size does, not what N hosts would).  Prints JSON.  Loops are bounded in
count and time, and every socket is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from _common import DEFAULT_BASE, Scratch, emit, log, machine, summary  # noqa: E402
from lb import HAProxy  # noqa: E402
from pgcluster import PgCluster, find_bindir  # noqa: E402

import dropr  # noqa: E402
from dropr._ids import new_ids  # noqa: E402
from dropr._message import Message  # noqa: E402
from dropr.storage._postgres import PostgresStorage  # noqa: E402
from dropr.storage.files._storage import FilesystemStorage  # noqa: E402
from dropr.testing import ClientProcess, ServerProcess, wait_until  # noqa: E402

CHANNEL = "bench"


def _messages(count: int, size: int) -> list[Message]:
    payload = os.urandom(size // 2).hex().encode()[:size].ljust(size, b".")
    return [Message(i, payload, CHANNEL) for i in new_ids(count)]


def _waiting(store: Any) -> int:
    return int(store.usage()[0])


def commit_cost(store: Any, batch: int, seconds: float, max_requests: int) -> dict[str, float]:
    """``store()`` of ``batch`` messages back to back for about ``seconds``."""
    requests = 0
    t0 = time.perf_counter()
    while requests < max_requests and time.perf_counter() - t0 < seconds:
        store.store([(CHANNEL, _messages(batch, 200))])
        requests += 1
    elapsed = time.perf_counter() - t0
    return {"requests_per_s": requests / elapsed, "messages_per_s": requests * batch / elapsed}


def _start_server(spec: str, logfile: str) -> ServerProcess:
    # A free port can be taken by another process before the server binds it
    # (others run tests on this machine too): try another one.
    for attempt in range(3):
        try:
            return ServerProcess(spec, logfile, extra=["--allow-anonymous-local"]).start_and_wait()
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def end_to_end(
    top: str,
    spec: str,
    servers: int,
    clients: int,
    count: int,
    batch: int,
    waiting: Any,
) -> dict[str, Any]:
    """Start ``servers`` on ``spec`` (behind HAProxy if more than a directory), push ``count``."""
    procs = [_start_server(spec, os.path.join(top, f"server{i}.log")) for i in range(servers)]
    balancer = None
    try:
        if spec.startswith("postgresql:"):
            balancer = HAProxy(top, [("127.0.0.1", p.port) for p in procs]).start()
            url = balancer.url
        else:
            url = procs[0].url
        spools = [os.path.join(top, f"spool{i}") for i in range(clients)]
        daemons = [
            ClientProcess(s, os.path.join(top, f"client{i}.log")).start_and_wait()
            for i, s in enumerate(spools)
        ]
        try:
            opened = [dropr.Spool(s, max_bytes=None, max_messages=None) for s in spools]
            payload = b"x" * 200
            t0 = time.perf_counter()
            for k, done in enumerate(range(0, count, batch)):
                opened[k % clients].put_many([payload] * min(batch, count - done), url, CHANNEL)
            t_put = time.perf_counter()
            wait_until(lambda: waiting() >= count, 900, 0.01, "the store to hold everything")
            t_end = time.perf_counter()
            for sp in opened:
                sp.close()
        finally:
            for d in daemons:
                d.stop()
    finally:
        if balancer is not None:
            balancer.stop()
        for p in procs:
            p.stop()
    return {
        "messages": count,
        "e2e_per_s": count / (t_end - t0),
        "put_per_s": count / (t_put - t0),
        "seconds": t_end - t0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=60_000, help="per end-to-end round")
    parser.add_argument("--clients", type=int, default=3, help="dropr-client daemons")
    parser.add_argument("--batch", type=int, default=500, help="put_many size")
    parser.add_argument("--commit-seconds", type=float, default=3.0)
    parser.add_argument("--dir", default=DEFAULT_BASE)
    parser.add_argument("--no-e2e", action="store_true", help="only the commit cost")
    parser.add_argument("--quick", action="store_true", help="a few seconds, to check it runs")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.messages, args.commit_seconds = 1, 6000, 0.5
    # SIGTERM unwinds like an error, so the servers, clients, HAProxy and the
    # cluster this run started are stopped by the ``finally`` clauses.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed: apt-get install postgresql")
    scratch = Scratch(args.dir, "scaleout")
    cluster = PgCluster(bindir)
    report: dict[str, Any] = {
        "benchmark": "scaleout",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(scratch.root),
        "postgresql": {"bindir": bindir, "fsync": "on", "synchronous_commit": "on"},
        "pinned": "no: servers, clients, PostgreSQL and HAProxy share the cores",
    }
    databases = 0

    def fresh_database() -> str:
        nonlocal databases
        databases += 1
        cluster.psql("template1", f"CREATE DATABASE bench{databases}")
        return cluster.url(f"bench{databases}")

    try:
        # -- the cost of a commit per request -----------------------------------
        cost: dict[str, dict[str, list[dict[str, float]]]] = {"postgresql": {}, "filesystem": {}}
        for r in range(args.rounds):
            for kind in ("postgresql", "filesystem"):  # A B A B within one run
                if kind == "postgresql":
                    store: Any = PostgresStorage(fresh_database(), pool_size=1, notify=False)
                else:
                    store = FilesystemStorage(scratch.fresh("commit"), dedup=True)
                try:
                    for batch in (1, 10, 100, 1000):
                        got = commit_cost(store, batch, args.commit_seconds, 100_000)
                        cost[kind].setdefault(str(batch), []).append(got)
                        log(f"commit {kind} batch {batch} round {r}: {got}")
                finally:
                    store.close()
        report["commit_cost"] = {
            kind: {
                batch: {
                    "requests_per_s": summary([x["requests_per_s"] for x in rounds], 1),
                    "messages_per_s": summary([x["messages_per_s"] for x in rounds], 1),
                    "ms_per_request": round(
                        1000 / summary([x["requests_per_s"] for x in rounds])["median"], 3
                    ),
                }
                for batch, rounds in by_batch.items()
            }
            for kind, by_batch in cost.items()
        }

        # -- end to end, 1 file-system server and 1..3 PostgreSQL servers ---------
        setups = [("filesystem", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3)]
        if args.no_e2e:
            setups = []
        e2e: dict[str, list[dict[str, Any]]] = {}
        for r in range(args.rounds):
            for kind, n in setups:
                top = scratch.fresh(f"e2e-{kind}-{n}")
                if kind == "filesystem":
                    spec = os.path.join(top, "store")
                    os.makedirs(spec)
                    reader: Any = FilesystemStorage(spec, usage_refresh=0)
                else:
                    spec = fresh_database()
                    reader = PostgresStorage(spec, pool_size=1)
                try:
                    got = end_to_end(
                        top,
                        spec,
                        n,
                        args.clients,
                        args.messages,
                        args.batch,
                        functools.partial(_waiting, reader),
                    )
                finally:
                    reader.close()
                log(f"e2e {kind} x{n} round {r}: {got['e2e_per_s']:,.0f} msg/s")
                e2e.setdefault(f"{kind}-{n}", []).append(got)
        report["end_to_end"] = {
            "clients": args.clients,
            "messages_per_round": args.messages,
            "put_many": args.batch,
            "results": {
                name: {
                    "e2e_per_s": summary([x["e2e_per_s"] for x in rounds], 1),
                    "rounds": rounds,
                }
                for name, rounds in e2e.items()
            },
        }
    finally:
        cluster.destroy()
        scratch.cleanup(keep=False)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
