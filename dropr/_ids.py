"""Message ids: unique without any existence check, ordered by time.

An id is 128 bits written as 32 lowercase hex digits:

* 48 bits: milliseconds since the Unix epoch,
* 16 bits: a per-process counter that keeps ids of one process strictly
  increasing within a millisecond,
* 64 bits: randomness from ``os.urandom``, which makes ids of different
  processes and hosts distinct.  ``new_ids`` draws it once for all the ids
  it makes (they differ in time and counter already); each call draws anew.

Sorting ids as strings sorts them by creation time (to the millisecond
across processes, exactly within one process).
"""

from __future__ import annotations

import os
import re
import threading
import time

_ID_RE = re.compile(r"[0-9a-f]{32}\Z")

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_id(now: float | None = None) -> str:
    """Return a new message id.

    ``now`` (seconds since the epoch) exists for tests; by default the wall
    clock is used.  Ids of one process never decrease, even when the wall
    clock steps back: the last millisecond is reused and the counter moves on.
    """
    global _last_ms, _counter
    ms = int((time.time() if now is None else now) * 1000)
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFFF:
                ms += 1
                _counter = 0
        else:
            _counter = 0
        _last_ms = ms
        counter = _counter
    return f"{ms:012x}{counter:04x}{os.urandom(8).hex()}"


def advance_to(ms: int) -> None:
    """Make every later id of this process date at or after ``ms``.

    A store's dedup checkpoint says "every batch before this time is
    indexed"; after a restart with the clock set back, new batch ids must
    not fall below it.
    """
    global _last_ms, _counter
    with _lock:
        if ms > _last_ms:
            _last_ms = ms
            _counter = 0


def new_ids(count: int, now: float | None = None) -> list[str]:
    """Return ``count`` new ids, strictly increasing, with one clock read.

    One random draw serves the whole batch: within this process the time
    and counter fields alone keep the ids apart, and the draw keeps them
    apart from every other process's.  (A getrandom call per id was a
    quarter of a bulk producer's time.)
    """
    global _last_ms, _counter
    if count <= 0:
        return []
    ms = int((time.time() if now is None else now) * 1000)
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            first = _counter + 1
        else:
            first = 0
        # The counter runs on across milliseconds: ``ms`` grows by one each
        # time it passes 0xFFFF, as ``new_id`` does.
        last = first + count - 1
        _last_ms = ms + (last >> 16)
        _counter = last & 0xFFFF
    tail = os.urandom(8).hex()
    if first + count <= 0x10000:
        prefix = f"{ms:012x}"
        return [f"{prefix}{c:04x}{tail}" for c in range(first, first + count)]
    return [f"{ms + (c >> 16):012x}{c & 0xFFFF:04x}{tail}" for c in range(first, first + count)]


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a well-formed id (32 lowercase hex digits)."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


def id_time(message_id: str) -> float:
    """The creation time of an id, in seconds since the epoch."""
    return int(message_id[:12], 16) / 1000.0


def id_millis(message_id: str) -> int:
    """The creation time of an id, in milliseconds since the epoch."""
    return int(message_id[:12], 16)


def id_at(timestamp: float) -> str:
    """An id dated ``timestamp`` (seconds), outside the monotonic sequence.

    For tests and tools that need an id from the past; ``new_id`` never goes
    back in time.
    """
    return f"{int(timestamp * 1000):012x}0000{os.urandom(8).hex()}"
