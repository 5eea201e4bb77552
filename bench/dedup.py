"""What the dedup look-up costs a server store's add(), without any hint.

Every id of every add is looked up in the store's dedup index (no word of
the sender lets it skip that).  This measures ``add()`` of batches of 100
and of 1 message (200-byte payloads) on a store with a dedup index, per
message, and how much of that is the look-up (time in ``DedupIndex.unseen``,
measured in the same calls), for new ids (the common case) and for a resend
of ids already stored (every id found).  Rounds alternate the cases, so
each ratio is within one run (see docs/benchmarks.md).

Prints JSON to stdout; progress on stderr.

Usage::

    python bench/dedup.py [--rounds 5] [--messages 20000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from typing import Any

from _common import emit, log, machine, summary

from dropr._ids import new_id
from dropr._message import Message
from dropr.storage.files._dedup import DedupIndex
from dropr.storage.files._storage import FilesystemStorage

PAYLOAD = b"x" * 200


class Timed:
    """Wraps DedupIndex.unseen to add up the time spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.real = DedupIndex.unseen

    def __enter__(self) -> Timed:
        timed = self

        def unseen(index: DedupIndex, messages: Any) -> Any:
            t = time.perf_counter()
            try:
                return timed.real(index, messages)
            finally:
                timed.seconds += time.perf_counter() - t

        DedupIndex.unseen = unseen  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        DedupIndex.unseen = self.real  # type: ignore[method-assign]


def one_case(base: str, batch: int, total: int, resend: bool) -> dict[str, float]:
    root = tempfile.mkdtemp(dir=base)
    try:
        store = FilesystemStorage(root, dedup=True)
        batches = [
            [Message(new_id(), PAYLOAD, "bench", 5) for _ in range(batch)]
            for _ in range(total // batch)
        ]
        if resend:
            for b in batches:
                store.add("bench", b)
        with Timed() as timed:
            started = time.perf_counter()
            for b in batches:
                store.add("bench", b)
            elapsed = time.perf_counter() - started
        store.close()
        n = len(batches) * batch
        return {
            "us_per_message": elapsed / n * 1e6,
            "lookup_us_per_message": timed.seconds / n * 1e6,
            "lookup_share": timed.seconds / elapsed,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="dropr-dedup-", dir=args.dir)
    cases = {
        "batch100-new": (100, args.messages, False),
        "batch100-resend": (100, args.messages, True),
        "batch1-new": (1, args.messages // 20, False),
        "batch1-resend": (1, args.messages // 20, True),
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for name, (batch, total, resend) in cases.items():
            runs[name].append(one_case(base, batch, total, resend))
        log(f"round {r + 1}/{args.rounds} done")
    result: dict[str, Any] = {"machine": machine(base), "payload_bytes": len(PAYLOAD)}
    for name, values in runs.items():
        result[name] = {key: summary([v[key] for v in values], 4) for key in values[0]}
    shutil.rmtree(base, ignore_errors=True)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
