"""The dedup index: which message ids a server store has already stored.

Promise A2 (each message stored exactly once) rests on it.  Ids are
time-ordered, so the index is split by the time in the id: every id is
appended (16 raw bytes) to ``ids/<slot>.ids`` where ``<slot>`` is its
millisecond time divided by 4096 (about 4 seconds), which is simply the
first 9 hex digits of the id, so no arithmetic is needed.  Looking an id
up reads one slot file, and forgetting ids older than the window deletes
whole files.

Ids are appended after their batch file is durable, without a sync of
their own: at most once a second the slot files are synced and
``checkpoint`` records the id of the newest batch whose ids are now durable.
Opening re-indexes every batch added since the checkpoint, so a crash at any
moment leaves no stored batch unindexed, and consumers delete a consumed
batch only once the checkpoint has passed it.

Every id of every add is looked up (no word of the sender lets a store
skip it): ids are time-ordered, so a look-up reads recent slots that are
already in memory.  No slot file stays open between calls, so descriptors
do not grow with slots; the checkpoint syncs the slot files written since
the last one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dropr._ids import id_millis
from dropr.storage.files._disk import REAL_DISK, Disk
from dropr.storage.files._durable import ensure_dir

if TYPE_CHECKING:
    from dropr._message import Message

SLOT_SHIFT = 12
_SLOT_DIGITS = 9
_SUFFIX = ".ids"
#: Ids held in memory for lookups, at most (16 bytes plus set overhead each).
_LOADED_MAX = 2_000_000


@dataclass(frozen=True)
class CheckpointPlan:
    """A checkpoint's work: slot files to sync, whether ``ids/`` is, and how far it reaches."""

    slots: list[int]
    new_files: bool
    indexed_ms: int


class DedupIndex:
    """Stored ids of the last ``window`` seconds, on disk under ``path``."""

    def __init__(
        self,
        path: str,
        window: float,
        clock: Callable[[], float] = time.time,
        disk: Disk = REAL_DISK,
        checkpoint_lock: threading.RLock | None = None,
    ) -> None:
        self.path = path
        #: Held by a checkpoint from its plan to its end: one at a time.
        self.checkpoint_lock = checkpoint_lock or threading.RLock()
        self.window = window
        self._clock = clock
        self.disk = disk
        # (breach: ids/ was never synced into its parent) ensure_dir syncs
        # the parent of every directory it makes.
        ensure_dir(path, disk=disk)
        self._loaded: OrderedDict[int, set[bytes]] = OrderedDict()
        self._loaded_count = 0
        #: Slot files whose size is known to be a whole number of ids.
        self._trimmed: set[int] = set()
        self._checkpoint_path = os.path.join(path, "checkpoint")
        self.checkpoint_ms = self._read_checkpoint()
        self._checkpoint_written = 0.0
        self._indexed_ms = self.checkpoint_ms
        self._dirty: set[int] = set()
        self._new_files = False
        self.prune()

    def _read_checkpoint(self) -> int:
        try:
            return int(self.disk.read(self._checkpoint_path).strip() or b"0")
        except (OSError, ValueError):
            return 0

    def oldest_id_prefix(self) -> str:
        """Ids that sort below this string are older than the window.

        Ids are fixed-width lowercase hex that start with their time, so a
        string comparison is a time comparison.
        """
        return f"{max(0, int((self._clock() - self.window) * 1000)):012x}"

    def unseen(self, messages: Sequence[Message]) -> list[Message]:
        """The messages whose ids are not yet stored, each id once."""
        seen_now: set[str] = set()
        result = []
        for m in messages:
            if m.id in seen_now:
                continue
            seen_now.add(m.id)
            if self._contains(m.id):
                continue
            result.append(m)
        return result

    def _contains(self, message_id: str) -> bool:
        slot = int(message_id[:_SLOT_DIGITS], 16)
        return bytes.fromhex(message_id) in self._slot(slot)

    def _slot(self, slot: int) -> set[bytes]:
        ids = self._loaded.get(slot)
        if ids is not None:
            self._loaded.move_to_end(slot)
            return ids
        ids = set()
        try:
            data = self.disk.read(self._file(slot))
        except FileNotFoundError:
            data = b""
        usable = len(data) - len(data) % 16
        ids.update(data[i : i + 16] for i in range(0, usable, 16))
        self._loaded[slot] = ids
        self._loaded_count += len(ids)
        while self._loaded_count > _LOADED_MAX and len(self._loaded) > 1:
            _old, dropped = self._loaded.popitem(last=False)
            self._loaded_count -= len(dropped)
        return ids

    def _file(self, slot: int) -> str:
        return os.path.join(self.path, f"{slot:011x}{_SUFFIX}")

    def record(self, ids: Iterable[str], batch_id: str | None = None) -> None:
        """Append ``ids`` to their slot files (synced by the next checkpoint).

        ``batch_id`` is the id of the newest batch these ids were stored in;
        every batch up to it is then indexed, which the checkpoint records.
        """
        by_slot: dict[str, list[str]] = {}
        for i in ids:
            by_slot.setdefault(i[:_SLOT_DIGITS], []).append(i)
        for prefix, hex_ids in by_slot.items():
            slot = int(prefix, 16)
            self._trim(slot)
            data = bytes.fromhex("".join(hex_ids))
            self.disk.append(self._file(slot), data, sync=False)
            self._dirty.add(slot)
            loaded = self._loaded.get(slot)
            if loaded is not None:
                loaded.update(data[k : k + 16] for k in range(0, len(data), 16))
                self._loaded_count += len(hex_ids)
        if batch_id is not None:
            self._indexed_ms = max(self._indexed_ms, id_millis(batch_id))
        self._maybe_checkpoint()

    def _trim(self, slot: int) -> None:
        """Drop the fragment of an id a crash cut short, once per slot file."""
        if slot in self._trimmed:
            return
        path = self._file(slot)
        try:
            size = self.disk.stat(path).st_size
        except FileNotFoundError:
            self._new_files = True
        else:
            if size % 16:
                self.disk.truncate(path, size - size % 16)
        self._trimmed.add(slot)
        if len(self._trimmed) > 4096:
            self._trimmed.clear()

    def _maybe_checkpoint(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checkpoint_written < 1.0:
            return
        if force:
            self.checkpoint()
        elif self.checkpoint_lock.acquire(blocking=False):
            # Where no upkeep checkpoints, an add does now and then.  One
            # under way (an upkeep's, outside the store's lock) will do.
            try:
                self.finish_checkpoint(self.begin_checkpoint())
            finally:
                self.checkpoint_lock.release()

    def checkpoint(self) -> None:
        """Sync the slot files written to, then record how far they reach."""
        with self.checkpoint_lock:
            self.finish_checkpoint(self.begin_checkpoint())

    def begin_checkpoint(self) -> CheckpointPlan:
        """What a checkpoint now is to sync and record.

        Called under the store's lock and ``checkpoint_lock``; the syncs and
        the write (``finish_checkpoint``) may then run without the store's
        lock, beside adds: what they record was appended before this.
        """
        self._checkpoint_written = time.monotonic()
        plan = CheckpointPlan(sorted(self._dirty), self._new_files, self._indexed_ms)
        self._dirty.clear()
        self._new_files = False
        return plan

    def finish_checkpoint(self, plan: CheckpointPlan) -> None:
        """Sync ``plan``'s slot files, then write the checkpoint (under ``checkpoint_lock``).

        On an error what was not synced is kept for the next checkpoint.
        """
        done = 0
        try:
            for slot in plan.slots:
                # Pruned meanwhile: nothing of it to keep.
                with contextlib.suppress(FileNotFoundError):
                    self.disk.sync_file(self._file(slot))
                done += 1
            if plan.new_files:
                # A new slot file is only durable once its directory entry is.
                self.disk.sync_dir(self.path)
        except BaseException:
            self._dirty.update(plan.slots[done:])
            self._new_files = self._new_files or plan.new_files
            raise
        # Batch ids of one process never decrease, so every batch not yet
        # indexed has an id at or after the newest indexed batch's.
        ms = plan.indexed_ms
        if ms <= self.checkpoint_ms:
            return
        tmp = self._checkpoint_path + ".tmp"
        self.disk.create(tmp, f"{ms}\n".encode(), exclusive=False)
        self.disk.rename(tmp, self._checkpoint_path)
        self.disk.sync_dir(self.path)
        self.checkpoint_ms = ms

    def recover(self, batches: Iterable[tuple[str, list[str]]]) -> int:
        """Index ``(batch id, message ids)`` of batches added since the checkpoint."""
        count = 0
        for batch_id, ids in batches:
            new = [i for i in ids if not self._contains(i)]
            self.record(new, batch_id)
            count += len(new)
        self._maybe_checkpoint(force=True)
        return count

    def prune(self) -> int:
        """Delete slot files wholly older than the window; return how many.

        The window ends at the checkpoint, not at the clock, when the clock
        is ahead of it: a clock stepped forward (at open, or at any time)
        must not forget ids a resend may still bring.  The checkpoint only
        moves with batches actually stored.
        """
        newest = min(self._clock(), self.checkpoint_ms / 1000.0)
        limit_slot = int((newest - self.window) * 1000) >> SLOT_SHIFT
        removed = 0
        for name in self.disk.listdir(self.path):
            if not name.endswith(_SUFFIX):
                continue
            try:
                slot = int(name[: -len(_SUFFIX)], 16)
            except ValueError:
                continue
            if slot < limit_slot:
                self.disk.unlink(os.path.join(self.path, name))
                self._loaded_count -= len(self._loaded.pop(slot, ()))
                removed += 1
        return removed

    def close(self) -> None:
        """Sync what was written; write a final checkpoint."""
        self.checkpoint()
