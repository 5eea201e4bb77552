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

Lookups are needed only for messages that may have been offered before (a
resend).  A sender marks a batch *fresh* when it never offered it before,
and the index then only records: the common path never reads a slot file.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from dropr._ids import id_millis
from dropr.storage.files._durable import fsync_dir

if TYPE_CHECKING:
    from dropr._message import Message

SLOT_SHIFT = 12
_SLOT_DIGITS = 9
_SUFFIX = ".ids"
#: Ids held in memory for lookups, at most (16 bytes plus set overhead each).
_LOADED_MAX = 2_000_000
_OPEN_FILES_MAX = 8


class DedupIndex:
    """Stored ids of the last ``window`` seconds, on disk under ``path``."""

    def __init__(self, path: str, window: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.window = window
        self._clock = clock
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._loaded: OrderedDict[int, set[bytes]] = OrderedDict()
        self._loaded_count = 0
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._checkpoint_path = os.path.join(path, "checkpoint")
        self.checkpoint_ms = self._read_checkpoint()
        self._checkpoint_written = 0.0
        self._indexed_ms = self.checkpoint_ms
        self._dirty: set[int] = set()
        self._new_files = False
        self.prune()

    def _read_checkpoint(self) -> int:
        try:
            with open(self._checkpoint_path, "rb") as f:
                return int(f.read().strip() or b"0")
        except (OSError, ValueError):
            return 0

    def too_old(self, message_id: str) -> bool:
        """True when ``message_id`` is older than the window.

        Such an id may have been stored and forgotten, so a store must not
        accept it (it could store it twice); the sender fails it instead.
        """
        return message_id < self.oldest_id_prefix()

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
            with open(self._file(slot), "rb") as f:
                data = f.read()
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
            fd = self._fd(slot)
            data = bytes.fromhex("".join(hex_ids))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            self._dirty.add(slot)
            loaded = self._loaded.get(slot)
            if loaded is not None:
                loaded.update(data[k : k + 16] for k in range(0, len(data), 16))
                self._loaded_count += len(hex_ids)
        if batch_id is not None:
            self._indexed_ms = max(self._indexed_ms, id_millis(batch_id))
        self._maybe_checkpoint()

    def _fd(self, slot: int) -> int:
        fd = self._fds.get(slot)
        if fd is not None:
            self._fds.move_to_end(slot)
            return fd
        path = self._file(slot)
        if not os.path.exists(path):
            self._new_files = True
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        size = os.fstat(fd).st_size
        if size % 16:
            # A crash cut the last id short; drop the fragment.
            os.ftruncate(fd, size - size % 16)
        self._fds[slot] = fd
        while len(self._fds) > _OPEN_FILES_MAX:
            old_slot, old_fd = self._fds.popitem(last=False)
            if old_slot in self._dirty:
                os.fdatasync(old_fd)
                self._dirty.discard(old_slot)
            os.close(old_fd)
        return fd

    def _maybe_checkpoint(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checkpoint_written < 1.0:
            return
        self.checkpoint()

    def checkpoint(self) -> None:
        """Sync the slot files written to, then record how far they reach."""
        self._checkpoint_written = time.monotonic()
        for slot in self._dirty:
            fd = self._fds.get(slot)
            if fd is not None:
                os.fdatasync(fd)
        self._dirty.clear()
        if self._new_files:
            # A new slot file is only durable once its directory entry is.
            fsync_dir(self.path)
            self._new_files = False
        # Batch ids of one process never decrease, so every batch not yet
        # indexed has an id at or after the newest indexed batch's.
        ms = self._indexed_ms
        if ms <= self.checkpoint_ms:
            return
        tmp = self._checkpoint_path + ".tmp"
        # Owner-only whatever the umask, like every file of a store.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(f"{ms}\n".encode())
            f.flush()
            os.fdatasync(f.fileno())
        os.replace(tmp, self._checkpoint_path)
        fsync_dir(self.path)
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
        """Delete slot files wholly older than the window; return how many."""
        limit_slot = int((self._clock() - self.window) * 1000) >> SLOT_SHIFT
        removed = 0
        for name in os.listdir(self.path):
            if not name.endswith(_SUFFIX):
                continue
            try:
                slot = int(name[: -len(_SUFFIX)], 16)
            except ValueError:
                continue
            if slot < limit_slot:
                os.unlink(os.path.join(self.path, name))
                removed += 1
        return removed

    def close(self) -> None:
        """Sync and close files; write a final checkpoint."""
        self.checkpoint()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
