"""A twistd log observer for the benchmarks: one JSON line per event, exact times.

``twistd --logger=_timelog.observer`` (with ``bench/`` on ``PYTHONPATH``)
writes every event with its full-precision ``log_time`` and the fields
dropr logs (``ids``, ``ms``) to the file named by ``$DROPR_BENCH_TIMELOG``,
so that a benchmark can place each step of a message's way on one clock.
Plain Twisted: it works with any version of dropr.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.logger import formatEvent


class _Observer:
    def __init__(self, path: str) -> None:
        self.out = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def __call__(self, event: dict[str, Any]) -> None:
        row: dict[str, Any] = {"t": event.get("log_time"), "ns": event.get("log_namespace")}
        for key in ("ids", "ms", "count", "stored"):
            value = event.get(key)
            if isinstance(value, (int, float, str)) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                row[key] = value
        try:
            row["text"] = formatEvent(event)[:200]
        except Exception:
            row["text"] = ""
        self.out.write(json.dumps(row) + "\n")


def observer() -> _Observer:
    """What ``twistd --logger`` calls."""
    return _Observer(os.environ.get("DROPR_BENCH_TIMELOG", "timelog.jsonl"))
