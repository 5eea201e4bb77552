"""dropr's main job on embedded defaults, in one command: ``python -m dropr.demo``.

Starts a dropr-server and a dropr-client (real ``twistd`` processes) on
temporary directories and a free port, puts messages with ``dropr.put`` and
``dropr.put_many``, waits until the server stored them, consumes them with
``dropr.Store``, checks every payload, prints the figures and stops both.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

import dropr
from dropr.testing import ClientProcess, ServerProcess, wait_until

CHANNELS = ("orders", "audit", "mail")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000, help="messages to send")
    parser.add_argument("--size", type=int, default=200, help="payload bytes")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args(argv)

    top = tempfile.mkdtemp(prefix="dropr-demo-")
    spool, store = os.path.join(top, "spool"), os.path.join(top, "store")
    print(f"dropr demo in {top}")
    server = ServerProcess(store, os.path.join(top, "server.log"))
    client = ClientProcess(spool, os.path.join(top, "client.log"))
    try:
        server.start_and_wait()
        client.start_and_wait()
        print(f"  dropr-server pid {server.pid} listening on {server.url}")
        print(f"  dropr-client pid {client.pid} forwarding {spool}")
        return _run(args, server.url, spool, store)
    finally:
        client.stop()
        server.stop()
        print("  both daemons stopped")
        if not args.keep:
            import shutil

            shutil.rmtree(top, ignore_errors=True)


def _run(args: argparse.Namespace, url: str, spool: str, store_path: str) -> int:
    sent: dict[str, str] = {}
    padding = b"." * max(0, args.size - 40)

    # One message at a time, as an application would, then in batches.
    t0 = time.perf_counter()
    singles = min(200, args.messages)
    for i in range(singles):
        payload = b"single %d " % i + padding
        mid = dropr.put(payload, url, channel=CHANNELS[i % 3], priority=i % 10, spool=spool)
        sent[mid] = hashlib.sha256(payload).hexdigest()
    t1 = time.perf_counter()
    remaining = args.messages - singles
    with dropr.Spool(spool) as sp:
        n = 0
        while n < remaining:
            count = min(1000, remaining - n)
            payloads = [b"batch %d " % (n + j) + padding for j in range(count)]
            channel = CHANNELS[(n // 1000) % 3]
            ids = sp.put_many(payloads, url, channel=channel, priority=(n // 1000) % 10)
            for mid, payload in zip(ids, payloads, strict=True):
                sent[mid] = hashlib.sha256(payload).hexdigest()
            n += count
    t2 = time.perf_counter()
    print(
        f"put {singles} messages one by one ({singles / (t1 - t0):,.0f}/s, each synced)"
        f" and {remaining} with put_many ({remaining / max(t2 - t1, 1e-9):,.0f}/s)"
    )

    store = dropr.Store(store_path)
    try:

        def depth() -> int:
            return sum(s.depth for s in store.stats().values())

        wait_until(lambda: depth() >= len(sent), 120, 0.05, "the server to store everything")
        t3 = time.perf_counter()
        print(
            f"all {len(sent)} stored by the server {t3 - t0:.2f} s after the first put "
            f"({len(sent) / (t3 - t0):,.0f} messages/s end to end)"
        )
        seen: dict[str, int] = {}
        bad = 0
        for channel in CHANNELS:
            taken = 0
            while True:
                messages = store.take(channel, 1000)
                if not messages:
                    break
                for m in messages:
                    seen[m.id] = seen.get(m.id, 0) + 1
                    if sent.get(m.id) != hashlib.sha256(m.payload).hexdigest():
                        bad += 1
                store.ack(messages)
                taken += len(messages)
            print(f"  consumed {taken:6d} from channel {channel!r}")
        t4 = time.perf_counter()
        lost = len(set(sent) - set(seen))
        dupes = sum(1 for c in seen.values() if c > 1)
        print(
            f"consumed {len(seen)} in {t4 - t3:.2f} s: lost {lost}, duplicates {dupes}, "
            f"corrupt {bad}"
        )
    finally:
        store.close()
    ok = lost == 0 and dupes == 0 and bad == 0 and len(seen) == len(sent)
    print("OK: every message arrived exactly once, intact" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
