"""A consumer process on a PostgreSQL store, for the fault run of ``test_postgres_faults``.

``python pg_consumer.py --store postgresql://… --log FILE --seed N``

Takes from every channel of ``chaos_worker.CHANNELS``, logs what it got in
the format :mod:`verify` reads (``C <id> <sha> <channel> <check>``, ``X`` for
one it fails on purpose, ``K`` once the ack or fail returned), acks.  While
the database is down it waits and tries again: a take that failed took
nothing, and an ack or fail is tried until it lands (both are harmless to
repeat).  On SIGTERM it finishes the batch in hand and exits.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chaos_worker import CHANNELS, FAIL_ONE_IN, Log
from verify import check_payload, sha256

import dropr
from dropr.errors import StorageUnavailable


def until_done(what: Callable[[], object]) -> None:
    while True:
        try:
            what()
            return
        except StorageUnavailable as e:
            print(f"waiting for the store: {e}", file=sys.stderr)
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lease", type=float, default=15.0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    log = Log(args.log)
    log.write([f"S {os.getpid()}\n"])
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    store = None
    while store is None and not stopping:
        try:
            store = dropr.Store(args.store, lease=args.lease)
        except StorageUnavailable as e:
            print(f"waiting for the store: {e}", file=sys.stderr)
            time.sleep(0.2)
    while store is not None and not stopping:
        got_any = False
        for channel in CHANNELS:
            try:
                batch = store.take(channel, 300)
            except StorageUnavailable:
                time.sleep(0.2)
                continue
            if not batch:
                continue
            got_any = True
            bad = [m for m in batch if rng.randrange(FAIL_ONE_IN) == 0]
            bad_ids = {m.id for m in bad}
            good = [m for m in batch if m.id not in bad_ids]
            log.write(
                [
                    f"{'X' if m.id in bad_ids else 'C'} {m.id} {sha256(m.payload)} {m.channel} "
                    f"{'v' if check_payload(m.payload) else 'x'}\n"
                    for m in good + bad
                ]
            )
            if good:
                until_done(lambda: store.ack(good))  # noqa: B023 (called at once)
            if bad:
                until_done(lambda: store.fail(bad, "refused by the consumer (on purpose)"))  # noqa: B023
            log.write(["K\n"])
        if not got_any:
            time.sleep(0.05)
    if store is not None:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
