"""Messages per second of ``Spool.put`` and ``Spool.put_many`` beside a raw file per message.

For each payload size, three measures run in every round, in an order that
rotates from round to round (A B C, B C A, ...), each in a fresh directory:

``raw``
    What a naive durable queue pays per message: create a file, write the
    payload, ``fsync`` it, rename it into place, ``fsync`` the directory.
``put``
    ``Spool.put()`` of one message (one batch file of one message).
``put_many``
    ``Spool.put_many()`` of ``--batch`` messages (one batch file, one sync).

Every measure is bounded by ``--seconds``, ``--max-messages`` and
``--max-bytes``.  Ratios are taken within a round (so both sides saw the same
disk and the same neighbours) and then summarised over the rounds.  Nothing
is deleted until all rounds are done (see ``_common.Scratch``).

Usage::

    python bench/put.py [--rounds 5] [--seconds 2] [--dir DIR] [--out FILE]
    python bench/put.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from _common import DEFAULT_BASE, DESTINATION, Scratch, emit, fmt_summary, log, machine, summary

from dropr.client._spool import Spool

#: Untimed operations run in each fresh directory before the clock starts.
WARMUP_OPS = 5
#: The release this benchmark aims at: put_many(100) vs raw, 200-byte payloads.
TARGET_RATIO = 20.0

Measure = Callable[[str, bytes, "Limits"], tuple[int, float, float]]


class Limits:
    """How long and how much one measure may run."""

    def __init__(self, seconds: float, max_messages: int, max_bytes: int, batch: int) -> None:
        self.seconds = seconds
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.batch = batch

    def cap(self, payload_size: int) -> int:
        """The most messages a measure of ``payload_size`` bytes may write."""
        return max(1, min(self.max_messages, self.max_bytes // max(1, payload_size)))


def _timed(op: Callable[[], int], limits: Limits, cap: int) -> tuple[int, float, float]:
    """Call ``op`` (returning messages done) until time or count runs out.

    Returns ``(messages, wall seconds, cpu seconds)``.
    """
    done = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + limits.seconds
    now = t0
    while now < deadline and done < cap:
        done += op()
        now = time.perf_counter()
    return done, now - t0, time.process_time() - cpu0


def measure_raw(path: str, payload: bytes, limits: Limits) -> tuple[int, float, float]:
    """One file per message: write, fsync, rename, fsync the directory."""
    tmp_dir = os.path.join(path, "tmp")
    new_dir = os.path.join(path, "new")
    os.mkdir(tmp_dir)
    os.mkdir(new_dir)
    dir_flags = os.O_RDONLY | os.O_DIRECTORY
    counter = 0

    def op() -> int:
        nonlocal counter
        counter += 1
        name = f"{counter:09d}.msg"
        tmp = os.path.join(tmp_dir, name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(new_dir, name))
        dfd = os.open(new_dir, dir_flags)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return 1

    for _ in range(WARMUP_OPS):
        op()
    return _timed(op, limits, limits.cap(len(payload)))


def measure_put(path: str, payload: bytes, limits: Limits) -> tuple[int, float, float]:
    """``Spool.put()`` of one message per call."""
    spool = Spool(path)
    try:
        put = spool.put

        def op() -> int:
            put(payload, DESTINATION)
            return 1

        for _ in range(WARMUP_OPS):
            op()
        return _timed(op, limits, limits.cap(len(payload)))
    finally:
        spool.close()


def measure_put_many(path: str, payload: bytes, limits: Limits) -> tuple[int, float, float]:
    """``Spool.put_many()`` of ``limits.batch`` messages per call."""
    spool = Spool(path)
    try:
        put_many = spool.put_many
        batch = [payload] * limits.batch
        n = limits.batch

        def op() -> int:
            put_many(batch, DESTINATION)
            return n

        for _ in range(WARMUP_OPS):
            op()
        return _timed(op, limits, limits.cap(len(payload)))
    finally:
        spool.close()


MEASURES: dict[str, Measure] = {
    "raw": measure_raw,
    "put": measure_put,
    "put_many": measure_put_many,
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    limits = Limits(args.seconds, args.max_messages, args.max_bytes, args.batch)
    scratch = Scratch(args.dir, "put")
    info = machine(scratch.root)
    if info["filesystem"].get("type") in ("tmpfs", "ramfs"):
        log(f"note: {scratch.root} is on {info['filesystem']['type']}, not a disk")
    names = list(MEASURES)
    rates: dict[int, dict[str, list[float]]] = {s: {n: [] for n in names} for s in args.sizes}
    cpu: dict[int, dict[str, list[float]]] = {s: {n: [] for n in names} for s in args.sizes}
    orders: list[list[str]] = []
    started = time.monotonic()
    try:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            orders.append(order)
            for size in args.sizes:
                payload = (b"0123456789abcdef" * (size // 16 + 1))[:size]
                for name in order:
                    path = scratch.fresh(f"r{r}-{size}-{name}")
                    count, wall, cpu_s = MEASURES[name](path, payload, limits)
                    rate = count / wall
                    rates[size][name].append(rate)
                    cpu[size][name].append(cpu_s / wall)
                    log(f"round {r + 1}/{args.rounds} {size:>5} B {name:>8}: {rate:>10,.0f} msg/s")
    finally:
        leftover = scratch.cleanup(args.keep)
    results: dict[str, Any] = {}
    for size in args.sizes:
        per_size: dict[str, Any] = {}
        for name in names:
            per_size[name] = {
                "messages_per_s": summary(rates[size][name], 1),
                "cpu_share": summary(cpu[size][name], 3),
            }
        for name in ("put", "put_many"):
            ratios = [
                a / b for a, b in zip(rates[size][name], rates[size]["raw"], strict=True) if b
            ]
            per_size[f"ratio_{name}_to_raw"] = summary(ratios, 2)
        results[str(size)] = per_size
    target_size = "200" if "200" in results else str(args.sizes[0])
    met = results[target_size]["ratio_put_many_to_raw"]["median"] >= TARGET_RATIO
    return {
        "benchmark": "put",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": info,
        "params": {
            "rounds": args.rounds,
            "seconds_per_measure": args.seconds,
            "max_messages_per_measure": args.max_messages,
            "max_bytes_per_measure": args.max_bytes,
            "batch": args.batch,
            "sizes": args.sizes,
            "warmup_ops": WARMUP_OPS,
            "orders": orders,
            "kept": leftover,
        },
        "results": results,
        "target": {
            "what": f"put_many({args.batch}) / raw messages per second, {target_size} B payloads",
            "ratio": TARGET_RATIO,
            "median": results[target_size]["ratio_put_many_to_raw"]["median"],
            "met": met,
        },
        "elapsed_s": round(time.monotonic() - started, 1),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="A B C rounds (default 5)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measure (default 2)")
    p.add_argument(
        "--max-messages", type=int, default=400_000, help="message cap per measure (400,000)"
    )
    p.add_argument(
        "--max-bytes", type=int, default=256 * 1024**2, help="payload cap per measure (256 MiB)"
    )
    p.add_argument("--batch", type=int, default=100, help="messages per put_many (default 100)")
    p.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[200, 4096],
        help="payload sizes in bytes, comma separated (default 200,4096)",
    )
    p.add_argument("--dir", default=DEFAULT_BASE, help=f"scratch base (default {DEFAULT_BASE})")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--keep", action="store_true", help="keep the scratch tree (no deletes)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 0.2 s")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
        args.seconds = min(args.seconds, 0.2)
    if args.rounds < 1 or args.seconds <= 0 or args.batch < 1:
        p.error("--rounds, --seconds and --batch must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    emit(result, args.out)
    for size, per_size in result["results"].items():
        for name in MEASURES:
            log(f"{size:>5} B {name:>8}: {fmt_summary(per_size[name]['messages_per_s'])} msg/s")
        for name in ("put", "put_many"):
            ratio = per_size[f"ratio_{name}_to_raw"]
            log(f"{size:>5} B {name:>8}/raw: {fmt_summary(ratio, 'x', 1)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
