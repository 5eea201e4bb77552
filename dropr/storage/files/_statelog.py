"""The state log: what happened to each message of the batches in a bucket.

Batch files never change after they are written.  What consumers do to the
messages in them is appended, one line per operation, to a file ``state``
in the bucket directory (appends do not touch the directory, so cached
listings stay valid)::

    T <batch id> <lease expiry, ms since epoch> <indexes> <owner> <crc>   taken
    R <batch id> <indexes> <owner> <crc>                                  released
    A <batch id> <indexes> <crc>                                          acked
    F <batch id> <indexes> <crc>                                          failed

``<indexes>`` are positions in the batch file, comma separated, with
ranges written ``a-b``.  ``<owner>`` is a token of the storage object that
took the messages: a release only frees its own lease, and a daemon that
owns its spool alone knows leases of other owners are a dead predecessor's.
``<crc>`` is the CRC-32 of the rest of the line in 8 hex digits.  A line a
crash cut short fails its check (``A b 1`` left of ``A b 12`` would
otherwise ack the wrong message) and is ignored, as is any line that cannot
be parsed: the worst that loses is an ack, so a message is handed out
again, never lost.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from dropr.storage.files._disk import REAL_DISK, Disk

STATE_NAME = "state"


def line(*fields: object) -> str:
    """A state log line of ``fields``, with its checksum and newline."""
    body = " ".join(str(f) for f in fields)
    return f"{body} {zlib.crc32(body.encode('ascii')):08x}\n"


def format_indexes(indexes: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    out: list[str] = []
    run_start = run_end = -2
    for i in sorted(indexes):
        if i == run_end + 1:
            run_end = i
            continue
        if run_start >= 0:
            out.append(f"{run_start}-{run_end}" if run_end > run_start else str(run_start))
        run_start = run_end = i
    if run_start >= 0:
        out.append(f"{run_start}-{run_end}" if run_end > run_start else str(run_start))
    return ",".join(out)


def parse_indexes(text: str) -> list[int]:
    """``"0-2,5"`` → ``[0, 1, 2, 5]``; raises ValueError on nonsense."""
    result: list[int] = []
    for part in text.split(","):
        a, sep, b = part.partition("-")
        lo = int(a)
        hi = int(b) if sep else lo
        if lo < 0 or hi < lo or hi - lo > 10_000_000:
            raise ValueError(part)
        result.extend(range(lo, hi + 1))
    return result


@dataclass(slots=True)
class BatchState:
    """What the state log says about one batch."""

    done: set[int] = field(default_factory=set)
    #: index → (lease expiry in ms since the epoch, owner token)
    leases: dict[int, tuple[int, str]] = field(default_factory=dict)
    #: The batch size for which every index was found done (done only grows).
    complete_for: int = -1
    #: (earliest lease expiry, lease owners), or None when leases changed.
    lease_summary: tuple[int, frozenset[str]] | None = None

    def free(self, count: int, now_ms: int, dead_unless: str | None) -> list[int]:
        """Indexes below ``count`` neither done nor under a live lease.

        ``dead_unless``: for the sole taker of a spool, the only owner whose
        leases are alive.  A batch whose every open message is leased is
        answered from a cached summary, not index by index: the in-flight
        batches of a busy queue are looked at on every take.
        """
        done, leases = self.done, self.leases
        if leases and len(done) + len(leases) >= count:
            if self.lease_summary is None:
                self.lease_summary = (
                    min(e for e, _o in leases.values()),
                    frozenset(o for _e, o in leases.values()),
                )
            earliest, owners = self.lease_summary
            if earliest > now_ms and (dead_unless is None or owners == {dead_unless}):
                return []
        result = []
        for i in range(count):
            if i in done:
                continue
            held = leases.get(i)
            if (
                held is None
                or held[0] <= now_ms
                or (dead_unless is not None and held[1] != dead_unless)
            ):
                result.append(i)
        return result

    def complete(self, count: int) -> bool:
        """True when every message of a batch of ``count`` is acked or failed."""
        if self.complete_for == count:
            return True
        if len(self.done) >= count and all(i in self.done for i in range(count)):
            self.complete_for = count
            return True
        return False


class StateLog:
    """The state log of one bucket directory, read incrementally."""

    def __init__(self, bucket_dir: str, disk: Disk = REAL_DISK) -> None:
        self.path = os.path.join(bucket_dir, STATE_NAME)
        self.disk = disk
        self.batches: dict[str, BatchState] = {}
        self._offset = 0
        self._needs_newline = False
        self._entry_synced = False
        self.bad_lines = 0

    def refresh(self) -> None:
        """Read what other processes (or earlier runs) appended since last time."""
        try:
            size = self.disk.stat(self.path).st_size
        except FileNotFoundError:
            if self._offset:
                # Removed and perhaps made anew: start over.
                self.batches.clear()
                self._offset = 0
            return
        if size < self._offset:
            self.batches.clear()
            self._offset = 0
        if size == self._offset:
            return
        try:
            data = self.disk.read(self.path, self._offset, size - self._offset)
        except FileNotFoundError:
            return
        last_newline = data.rfind(b"\n")
        if last_newline < 0:
            self._needs_newline = True
            return
        for line in data[: last_newline + 1].splitlines():
            self._apply(line)
        self._offset += last_newline + 1
        self._needs_newline = last_newline + 1 < len(data)

    def _apply(self, raw: bytes) -> None:
        try:
            body, _, crc = raw.rpartition(b" ")
            if int(crc, 16) != zlib.crc32(body):
                raise ValueError("checksum")
            parts = body.decode("ascii").split(" ")
            op, batch = parts[0], parts[1]
            owner = ""
            if op == "T":
                expiry = int(parts[2])
                indexes = parse_indexes(parts[3])
                owner = parts[4]
            else:
                expiry = 0
                indexes = parse_indexes(parts[2])
                if op == "R":
                    owner = parts[3]
        except (UnicodeDecodeError, IndexError, ValueError):
            self.bad_lines += 1
            return
        state = self.batches.get(batch)
        if state is None:
            state = self.batches[batch] = BatchState()
        state.lease_summary = None
        if op == "T":
            lease = (expiry, owner)
            for i in indexes:
                state.leases[i] = lease
        elif op == "R":
            for i in indexes:
                held = state.leases.get(i)
                if held is not None and held[1] == owner:
                    del state.leases[i]
        elif op in ("A", "F"):
            for i in indexes:
                state.leases.pop(i, None)
            state.done.update(indexes)
        else:
            self.bad_lines += 1

    def append(self, lines: list[str], sync: bool) -> None:
        """Append ``lines`` (each ending in a newline) and apply them."""
        self.refresh()
        text = "".join(lines)
        if self._needs_newline:
            # A crash left half a line; start ours on a line of its own.
            text = "\n" + text
        self.disk.append(self.path, text.encode("ascii"), sync=sync)
        if sync and not self._entry_synced:
            # A synced line is only durable once the file's directory entry
            # is (another call may have made the file without a sync).
            self.disk.sync_dir(os.path.dirname(self.path))
            self._entry_synced = True
        self.refresh()

    def state(self, batch_id: str) -> BatchState:
        """The state of ``batch_id`` (empty if the log never mentions it)."""
        return self.batches.get(batch_id) or BatchState()
