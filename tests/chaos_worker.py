"""Producer and consumer processes for the fault-injection runs.

Run as ``python chaos_worker.py produce ...`` or ``... consume ...`` (see
``--help``).  Both keep the logs :mod:`dropr.verify` reads: one ``write``
per record, synced before the next step, so a kill leaves at most a cut
last line, which the verifier skips.

A producer puts through its own :class:`dropr.Spool` (as an application
would): single ``put`` calls and ``put_many`` of up to a few hundred, on
random channels and priorities, paced to ``--rate`` messages a second.  Its
log says ``I <n>`` before each call and ``P <id> <sha> <channel>`` for each
message and ``R <n>`` after the call returned.  When the file ``<log>.killme``
appears it makes its next call a big ``put_many`` and kills itself with
SIGKILL in the middle of it: at a random step (before or after one of the
disk calls the put makes) or at a random instant (the harness's kills "in
the middle of put_many"; its other kills land wherever the producer
happens to be).  When the spool is full it
logs ``F``, waits and tries again; any other exception is logged as ``E``
and ends the process with status 3, which the harness reports.

A consumer takes from every channel of a store, logs what it got, acks it
(a few messages it fails instead, with a reason), logs ``K``.  While the
file ``<log>.pause`` exists it takes nothing; on SIGTERM it finishes the
batch in hand and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import signal
import sys
import threading
import time
import traceback
from typing import Any

from twisted.logger import globalLogBeginner, textFileLogObserver
from verify import check_payload, check_planted_payload, make_payload, sha256

import dropr

CHANNELS = ("orders", "audit", "mail", "c-4")
#: One message in this many is failed by the consumer (to fill the failed area).
FAIL_ONE_IN = 400


class Log:
    """An append-only log, each record written whole and synced."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, lines: list[str]) -> None:
        data = "".join(lines).encode("ascii")
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        os.fdatasync(self.fd)


def die_at_disk_call(k: int, before: bool) -> None:
    """SIGKILL this process at the ``k``-th disk call from now, before or after it.

    The calls a put makes are, in order: the batch file's writes and
    ``fdatasync``, its ``rename`` into place, the directory ``fsync``, the
    queue's wake-up ``utime``, and the poke of the daemon's pipe (a write):
    so every step of a ``put_many`` gets cut.
    """
    seen = [0]

    def hook(real: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            seen[0] += 1
            if seen[0] == k and before:
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kw)
            if seen[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call

    for name in ("write", "fdatasync", "rename", "fsync", "utime"):
        setattr(os, name, hook(getattr(os, name)))


def produce(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    log = Log(args.log)
    tag = f"{args.name}.{os.getpid()}"
    spool = dropr.Spool(args.spool)
    seq = 0
    budget_at = time.monotonic()
    killme = args.log + ".killme"
    #: seconds one message costs in a big put_many, learnt as it goes
    per_message = 0.00005
    while True:
        if args.limit_file and os.path.exists(args.limit_file):
            # The fall-back "disk full" when no small file system can be
            # mounted: the spool's own limit, as the harness sets it.
            with open(args.limit_file) as f:
                spool.storage.max_bytes = int(f.read().strip() or "0")
        else:
            spool.storage.max_bytes = dropr.client._spool.DEFAULT_MAX_BYTES
        n = 1 if rng.random() < 0.3 else rng.choice((2, 5, 20, 50, 100, 200, 400))
        # Armed by the harness: die by SIGKILL at a random instant of a big
        # put_many, the way a crash cuts one short.
        armed = os.path.exists(killme)
        if armed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(killme)
            n = rng.choice((500, 1000, 2000))
        channel = rng.choice(CHANNELS)
        priority = rng.randrange(10)
        payloads = []
        for _ in range(n):
            size = rng.choice((0, 10, 100, 300, 1000, 4000)) + rng.randrange(50)
            payloads.append(make_payload(tag, seq, rng.randbytes(size)))
            seq += 1
        while True:
            log.write([f"I {n}\n"])
            if armed:
                if rng.random() < 0.75:
                    die_at_disk_call(rng.randrange(1, 7), rng.random() < 0.5)
                else:
                    delay = rng.uniform(0, 0.7 * per_message * n)
                    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
            started = time.monotonic()
            try:
                if n == 1:
                    ids = [spool.put(payloads[0], args.dest, channel, priority)]
                else:
                    ids = spool.put_many(payloads, args.dest, channel, priority)
            except dropr.StorageFull:
                log.write([f"F {n}\n"])
                time.sleep(0.2)
                continue
            except Exception as e:
                log.write(
                    [f"E {type(e).__name__} {errno.errorcode.get(getattr(e, 'errno', 0), '')}\n"]
                )
                traceback.print_exc()
                return 3
            break
        if n >= 100:
            per_message = 0.7 * per_message + 0.3 * (time.monotonic() - started) / n
        log.write(
            [f"P {i} {sha256(p)} {channel}\n" for i, p in zip(ids, payloads, strict=True)]
            + [f"R {n}\n"]
        )
        # Pace to the rate asked for, on average (an armed call, should it
        # outlive its kill, does not count), and wake up when armed.
        if not armed:
            budget_at += n / args.rate
        while time.monotonic() < budget_at and not os.path.exists(killme):
            time.sleep(max(0.0, min(0.05, budget_at - time.monotonic())))
        budget_at = max(budget_at, time.monotonic() - 1.0)


def consume(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    log = Log(args.log)
    log.write([f"S {os.getpid()}\n"])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    with open(args.log + ".twisted", "a") as tlog:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(tlog)], redirectStandardIO=False)
        store = dropr.Store(args.store)
        pause = args.log + ".pause"
        while not stopping:
            if os.path.exists(pause):
                time.sleep(0.1)
                continue
            got_any = False
            for channel in CHANNELS:
                try:
                    batch = store.take(channel, 500)
                except OSError as e:
                    # A full disk: the take could not write its lease.
                    print(f"take {channel}: {e}", file=sys.stderr)
                    time.sleep(0.2)
                    continue
                if not batch:
                    continue
                got_any = True
                bad_ids = {m.id for m in batch if rng.randrange(FAIL_ONE_IN) == 0}
                bad = [m for m in batch if m.id in bad_ids]
                good = [m for m in batch if m.id not in bad_ids]
                lines = []
                for m in good + bad:
                    if check_payload(m.payload):
                        check = "v"
                    elif check_planted_payload(m.payload):
                        check = "p"
                    else:
                        check = "x"
                    kind = "X" if m.id in bad_ids else "C"
                    lines.append(f"{kind} {m.id} {sha256(m.payload)} {m.channel} {check}\n")
                log.write(lines)
                while True:
                    try:
                        if good:
                            store.ack(good)
                        if bad:
                            store.fail(bad, "refused by the chaos consumer (on purpose)")
                        break
                    except OSError as e:
                        print(f"ack/fail: {e}; retrying", file=sys.stderr)
                        time.sleep(0.2)
                log.write(["K\n"])
            if not got_any:
                time.sleep(0.05)
        store.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(description=__doc__)
    sub = top.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--spool", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--name", default="p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=100.0, help="messages a second")
    p.add_argument("--limit-file", help="file holding the spool's max_bytes, when present")
    p.set_defaults(run=produce)
    c = sub.add_parser("consume")
    c.add_argument("--store", required=True)
    c.add_argument("--log", required=True)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(run=consume)
    args = top.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
