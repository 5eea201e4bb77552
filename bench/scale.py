"""How a spool with a million waiting messages behaves: open time, take cost, memory.

Two shapes of spool are built (with ``Spool.put_many`` / ``Spool.put``, so
the files are exactly what producers write):

``batched``
    ``--messages`` messages (default 1,000,000) in batches of
    ``--build-batch`` (default 1000) per ``put_many`` call.
``singles``
    ``--singles`` messages (default 100,000), each its own ``put`` and so its
    own batch file: the worst case for anything that costs per file.
    Built by ``--build-threads`` threads, each with its own Spool.

For each shape, a fresh child process (so ``ru_maxrss`` is its own and the
build's memory does not count) opens the big spool and measures:

* ``open_s``: constructing ``Spool(path)`` on the existing directory (the
  first open, after ``sync`` and a page-cache drop with ``--cold``), and the
  median of ``--opens`` further warm opens;
* the first ``take(100)`` + ``ack`` after open;
* ``take(limit=100)`` + ``ack`` per call at the head of the queue,
  alternating A B with a 1,000-message spool of the same shape: per round,
  ``--calls`` calls on the big spool, then ``--calls`` on a fresh small one
  (10 calls of 100 exhaust it); the ratio big/small of the per-round medians;
* peak and current RSS after imports, after open, after the takes
  (``--rounds`` x ``--calls`` x 100 messages, 10,000 by default);
* the first ``put`` after open (it counts the spool against its limit, which
  walks every bucket) and a second one, and one ``stats()`` call;
* last, ``--deep`` more messages taken (default 50,000): the total time, the
  cost of the last calls and RSS at the end, to see whether taking gets
  dearer as the head of the queue moves into a bucket.

A reference child, run first, does the same steps but the deep takes on a
spool that holds just enough for them (``rounds*calls*100 + 1000``
messages), so memory and take cost of the big spool read as ratios to it.
The spools are built with no limits; the children open them with
``max_messages`` raised above their size (the default would refuse the first
put of a full million) and every other setting at its default.

Usage::

    python bench/scale.py [--messages 1000000] [--singles 100000] [--cold] [--out FILE]
    python bench/scale.py --quick
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from _common import (
    DEFAULT_BASE,
    DESTINATION,
    Scratch,
    current_rss_kib,
    emit,
    fmt_summary,
    log,
    machine,
    peak_rss_kib,
    summary,
)

from dropr.client._spool import DEFAULT_MAX_MESSAGES, Spool

PAYLOAD_SIZE = 200
TAKE_LIMIT = 100
SMALL_SPOOL = 1000


def payload() -> bytes:
    return (b"0123456789abcdef" * (PAYLOAD_SIZE // 16 + 1))[:PAYLOAD_SIZE]


# -- building ------------------------------------------------------------------


def build_batched(path: str, count: int, batch: int, deadline: float) -> int:
    """Put ``count`` messages in batches of ``batch``; return how many were put."""
    spool = Spool(path, max_messages=None, max_bytes=None)
    data = payload()
    done = 0
    try:
        while done < count and time.monotonic() < deadline:
            n = min(batch, count - done)
            spool.put_many([data] * n, DESTINATION)
            done += n
    finally:
        spool.close()
    return done


def build_singles(path: str, count: int, threads: int, deadline: float) -> int:
    """Put ``count`` messages one ``put`` each from ``threads`` threads."""
    data = payload()
    done = [0] * threads
    errors: list[BaseException] = []

    def work(k: int, share: int) -> None:
        spool = Spool(path, max_messages=None, max_bytes=None)
        try:
            for _ in range(share):
                if time.monotonic() >= deadline:
                    return
                spool.put(data, DESTINATION)
                done[k] += 1
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            spool.close()

    shares = [count // threads + (1 if k < count % threads else 0) for k in range(threads)]
    workers = [threading.Thread(target=work, args=(k, s)) for k, s in enumerate(shares)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return sum(done)


def build(shape: str, path: str, count: int, args: argparse.Namespace, deadline: float) -> int:
    if shape == "batched":
        return build_batched(path, count, args.build_batch, deadline)
    return build_singles(path, count, args.build_threads, deadline)


def layout(path: str) -> dict[str, int]:
    """Bucket directories and batch files of a spool, counted on disk."""
    buckets = files = biggest = 0
    for _root, _dirs, names in os.walk(os.path.join(path, "queues")):
        batches = sum(1 for n in names if n.endswith(".b"))
        if batches:
            buckets += 1
            files += batches
            biggest = max(biggest, batches)
    return {"buckets": buckets, "batch_files": files, "max_files_per_bucket": biggest}


# -- measuring (in a child process) --------------------------------------------------


def _rss() -> dict[str, int]:
    return {"peak_kib": peak_rss_kib(), "current_kib": current_rss_kib()}


def _drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def _take_ack(spool: Spool) -> tuple[float, int]:
    t0 = time.perf_counter()
    messages = spool.take(DESTINATION, TAKE_LIMIT)
    spool.ack(messages)
    return time.perf_counter() - t0, len(messages)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """The child's work: see the module docstring."""
    out: dict[str, Any] = {"rss_after_imports": _rss()}
    limit = spec["max_messages"]
    profiler = cProfile.Profile() if spec.get("profile") else None
    if spec["cold"]:
        out["cold"] = _drop_caches()
    if profiler:
        profiler.enable()
    t0 = time.perf_counter()
    big = Spool(spec["big"], max_messages=limit)
    out["open_first_s"] = time.perf_counter() - t0
    out["rss_after_open"] = _rss()
    first, n = _take_ack(big)
    out["first_take_ack_s"] = first
    taken = n

    warm = []
    for _ in range(spec["opens"]):
        t0 = time.perf_counter()
        other = Spool(spec["big"], max_messages=limit)
        warm.append(time.perf_counter() - t0)
        other.close()
    out["open_warm_s"] = summary(warm, 7)

    rounds_big: list[list[float]] = []
    rounds_small: list[list[float]] = []
    for small_path in spec["smalls"]:
        calls = []
        for _ in range(spec["calls"]):
            dt, n = _take_ack(big)
            calls.append(dt)
            taken += n
        rounds_big.append(calls)
        small = Spool(small_path, max_messages=limit)
        calls = []
        for _ in range(spec["calls"]):
            dt, n = _take_ack(small)
            if n:
                calls.append(dt)
        small.close()
        rounds_small.append(calls)
    out["taken"] = taken
    out["rss_after_takes"] = _rss()
    out["take_ack_big_per_round_median_s"] = [statistics.median(c) for c in rounds_big]
    out["take_ack_small_per_round_median_s"] = [statistics.median(c) for c in rounds_small]
    out["take_ack_big_all_s"] = summary([x for c in rounds_big for x in c], 7)
    out["take_ack_small_all_s"] = summary([x for c in rounds_small for x in c], 7)

    t0 = time.perf_counter()
    big.put(payload(), DESTINATION)
    out["first_put_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    big.put(payload(), DESTINATION)
    out["second_put_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = big.stats()
    out["stats_s"] = time.perf_counter() - t0
    out["stats_depth"] = sum(s.depth for s in stats.values())

    deep: list[float] = []
    deep_taken = 0
    t0 = time.perf_counter()
    while deep_taken < spec["deep"]:
        dt, n = _take_ack(big)
        if not n:
            break
        deep.append(dt)
        deep_taken += n
    out["deep_total_s"] = time.perf_counter() - t0
    out["deep_taken"] = deep_taken
    out["deep_last_calls_s"] = summary(deep[-10:], 7) if deep else None
    out["rss_at_end"] = _rss()
    big.close()
    if profiler:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=spec["timeout"],
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measuring child failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# -- the run -------------------------------------------------------------------------


def run_shape(
    shape: str, count: int, scratch: Scratch, args: argparse.Namespace, deadline: float
) -> dict[str, Any]:
    takes = args.rounds * args.calls * TAKE_LIMIT
    ref_count = takes + SMALL_SPOOL
    t0 = time.monotonic()
    big = scratch.fresh(f"{shape}-big")
    built = build(shape, big, count, args, deadline)
    build_s = time.monotonic() - t0
    log(f"{shape}: built {built:,} messages in {build_s:.1f} s ({built / build_s:,.0f}/s)")
    if built < count:
        log(f"{shape}: build stopped by --max-build-seconds at {built:,} of {count:,}")
    ref = scratch.fresh(f"{shape}-ref")
    build(shape, ref, ref_count, args, float("inf"))
    smalls = []
    for k in range(2 * args.rounds):
        path = scratch.fresh(f"{shape}-small{k}")
        build(shape, path, SMALL_SPOOL, args, float("inf"))
        smalls.append(path)
    log(f"{shape}: built the reference ({ref_count:,}) and {len(smalls)} small spools")
    shape_on_disk = layout(big)
    limit = max(DEFAULT_MAX_MESSAGES, 2 * built + 1000)
    spec_common: dict[str, Any] = {
        "opens": args.opens,
        "calls": args.calls,
        "max_messages": limit,
        "cold": args.cold,
        "timeout": args.child_timeout,
    }
    prof_big = os.path.join(args.profile, f"scale-{shape}-big.prof") if args.profile else None
    children: dict[str, dict[str, Any]] = {}
    # The reference first, then the big spool, each alternating with its own
    # small spools.  Only the big child takes "deep", the one step that can
    # empty buckets and so delete files (which slows file creation here for
    # minutes): nothing timed comes after it.
    for label, big_path, small_paths, deep, prof in (
        ("ref", ref, smalls[args.rounds :], 0, None),
        ("big", big, smalls[: args.rounds], args.deep, prof_big),
    ):
        spec = {
            **spec_common,
            "big": big_path,
            "smalls": small_paths,
            "deep": deep,
            "profile": prof,
        }
        children[label] = run_child(spec)
        c = children[label]
        log(
            f"{shape} {label}: open {c['open_first_s'] * 1e3:.2f} ms, take+ack "
            f"{fmt_summary(c['take_ack_big_all_s'], digits=6)} s vs small "
            f"{fmt_summary(c['take_ack_small_all_s'], digits=6)} s, "
            f"peak RSS {c['rss_after_takes']['peak_kib'] / 1024:.1f} MiB"
        )
    b, r = children["big"], children["ref"]
    ratio_small = [
        x / y
        for x, y in zip(
            b["take_ack_big_per_round_median_s"],
            b["take_ack_small_per_round_median_s"],
            strict=True,
        )
    ]
    ratio_small_ref = [
        x / y
        for x, y in zip(
            r["take_ack_big_per_round_median_s"],
            r["take_ack_small_per_round_median_s"],
            strict=True,
        )
    ]
    return {
        "messages": built,
        "build_s": round(build_s, 2),
        "build_messages_per_s": round(built / build_s, 1),
        "layout": shape_on_disk,
        "reference_messages": ref_count,
        "open_first_s": round(b["open_first_s"], 6),
        "open_warm_s": b["open_warm_s"],
        "first_take_ack_s": round(b["first_take_ack_s"], 6),
        "take_ack_per_call_s": b["take_ack_big_all_s"],
        "take_ack_per_call_small_s": b["take_ack_small_all_s"],
        "ratio_take_ack_big_to_small": summary(ratio_small, 2),
        "ratio_take_ack_ref_to_small": summary(ratio_small_ref, 2),
        "taken": b["taken"],
        "rss_kib": {
            "after_imports": b["rss_after_imports"],
            "after_open": b["rss_after_open"],
            "after_takes": b["rss_after_takes"],
            "at_end": b["rss_at_end"],
            "reference_after_open": r["rss_after_open"],
            "reference_after_takes": r["rss_after_takes"],
            "ratio_peak_after_takes_big_to_reference": round(
                b["rss_after_takes"]["peak_kib"] / r["rss_after_takes"]["peak_kib"], 3
            ),
        },
        "first_put_s": round(b["first_put_s"], 6),
        "second_put_s": round(b["second_put_s"], 6),
        "reference_first_put_s": round(r["first_put_s"], 6),
        "stats_s": round(b["stats_s"], 6),
        "stats_depth": b["stats_depth"],
        "reference_stats_s": round(r["stats_s"], 6),
        "deep_taken": b["deep_taken"],
        "deep_total_s": round(b["deep_total_s"], 3),
        "deep_last_calls_s": b["deep_last_calls_s"],
        "children": children,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Scratch(args.dir, "scale")
    info = machine(scratch.root)
    started = time.monotonic()
    deadline = started + args.max_build_seconds
    shapes: dict[str, Any] = {}
    try:
        if args.messages > 0:
            shapes["batched"] = run_shape("batched", args.messages, scratch, args, deadline)
        if args.singles > 0:
            deadline = time.monotonic() + args.max_build_seconds
            shapes["singles"] = run_shape("singles", args.singles, scratch, args, deadline)
    finally:
        leftover = scratch.cleanup(args.keep)
    return {
        "benchmark": "scale",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": info,
        "params": {
            "messages": args.messages,
            "singles": args.singles,
            "payload_bytes": PAYLOAD_SIZE,
            "build_batch": args.build_batch,
            "build_threads": args.build_threads,
            "take_limit": TAKE_LIMIT,
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            "small_spool_messages": SMALL_SPOOL,
            "opens": args.opens,
            "deep": args.deep,
            "cold": args.cold,
            "kept": leftover,
        },
        "results": shapes,
        "elapsed_s": round(time.monotonic() - started, 1),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=1_000_000, help="batched spool size")
    p.add_argument("--singles", type=int, default=100_000, help="single-put spool size (0: skip)")
    p.add_argument("--build-batch", type=int, default=1000, help="put_many size when building")
    p.add_argument("--build-threads", type=int, default=4, help="threads putting singles")
    p.add_argument("--rounds", type=int, default=10, help="A B rounds of take+ack (default 10)")
    p.add_argument("--calls", type=int, default=10, help="take+ack calls per round and side")
    p.add_argument("--opens", type=int, default=5, help="warm opens to time")
    p.add_argument(
        "--deep", type=int, default=50_000, help="messages to take at the end, deeper in (50,000)"
    )
    p.add_argument("--cold", action="store_true", help="sync and drop the page cache first")
    p.add_argument("--max-build-seconds", type=float, default=900.0, help="bound on each build")
    p.add_argument("--child-timeout", type=float, default=600.0, help="bound on each child")
    p.add_argument("--profile", help="write cProfile stats of the big child here (a directory)")
    p.add_argument("--dir", default=DEFAULT_BASE, help=f"scratch base (default {DEFAULT_BASE})")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--keep", action="store_true", help="keep the scratch tree (no deletes)")
    p.add_argument("--quick", action="store_true", help="smoke run: 20,000 + 2,000 messages")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.messages = min(args.messages, 20_000)
        args.singles = min(args.singles, 2_000)
        args.rounds = min(args.rounds, 2)
        args.calls = min(args.calls, 5)
        args.opens = min(args.opens, 2)
        args.deep = min(args.deep, 5_000)
    if args.rounds < 1 or args.calls < 1 or args.build_batch < 1 or args.build_threads < 1:
        p.error("--rounds, --calls, --build-batch and --build-threads must be positive")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(measure(json.loads(args.child))))
        return 0
    result = run(args)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
