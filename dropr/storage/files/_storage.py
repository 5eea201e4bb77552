"""The file-system storage: dropr's default ``IStorage``.

Layout under the storage's root directory (see docs/on-disk-format.rst)::

    lock                           held by the one daemon that owns the root
    tmp/                           files being written
    queues/<queue>/lock            serialises take/ack/release/fail
    queues/<queue>/<p>/<hi>/<lo>/  a bucket: batch files and their state log
    failed/<queue>/                failed messages, each batch with a .why
    quarantine/                    files that could not be read, with a .why
    ids/                           the dedup index (server stores)

``<p>`` is the priority digit; ``<hi>`` and ``<lo>`` are the first 7 and
next 2 hex digits of the batch id (about 17 minutes and 4 seconds of time),
so directories stay small and a sorted walk is delivery order.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import NamedTuple

from twisted.logger import Logger
from zope.interface import implementer

from dropr._ids import advance_to, id_time, new_id
from dropr._message import DEFAULT_MAX_PAYLOAD, Message, validate_messages
from dropr.errors import (
    InvalidMessage,
    StorageFull,
    StorageIOError,
    StorageLocked,
    UnknownMessage,
)
from dropr.interfaces import IReceivingStore, ISpoolStorage, IStorage, IUsage, QueueStats
from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._batchcache import BatchCache
from dropr.storage.files._dedup import DedupIndex
from dropr.storage.files._dirlisting import DirListing
from dropr.storage.files._disk import REAL_DISK, Disk, is_disk_full
from dropr.storage.files._durable import (
    ensure_dir,
    pid_alive,
    remove_empty_dirs,
    rename_into,
    unlink_quietly,
    write_new_file,
)
from dropr.storage.files._statelog import STATE_NAME, StateLog, format_indexes, line

_SAFE_QUEUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_TMP_RE = re.compile(r".*\.(\d+)\.[0-9a-f]{12}\.tmp\Z")
#: A temporary file this old is a leftover whatever its writer's pid says.
_TMP_MAX_AGE = 3600.0
#: Buckets whose time ended less than this ago may still receive batches.
_BUCKET_SETTLE = 10.0
_BUCKET_MS = 1 << 12
#: Memory the cache of read batch files may use, roughly.
_CACHE_BYTES = 64 * 1024 * 1024
#: Batch files the cache holds at most: a consumer that never learns of a
#: bucket another one removed must not keep its batches for ever.
_CACHE_BATCHES = 1024


def _release_line(take_line: str) -> str:
    """The ``R`` line that undoes the lease of ``take_line`` (``T batch expiry idx owner crc``)."""
    _op, batch_id, _expiry, indexes, owner, _crc = take_line.split()
    return line("R", batch_id, indexes, owner)


WAKE_NAME = "wake"
USAGE_NAME = "usage"
#: Seconds another process's count in the ``usage`` file is trusted.
USAGE_FILE_FRESH = 6.0


#: Queues whose lock and per-bucket state a storage object keeps, at most.
_QUEUES_KEPT = 256
#: Buckets of one queue whose state log and scan are kept, at most.
_BUCKETS_KEPT = 256


def _names(path: str, disk: Disk = REAL_DISK) -> list[str]:
    """The entries of directory ``path``; none if it is gone."""
    try:
        return disk.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def encode_queue(name: str) -> str:
    """The directory name of queue ``name``.

    Names that are safe file names (every valid channel name) are used as
    they are; anything else (a destination URL) is written ``~`` followed by
    its URL-safe base64, which can never collide with a safe name.
    """
    if _SAFE_QUEUE.match(name):
        return name
    raw = base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii")
    return "~" + raw.rstrip("=")


def decode_queue(dirname: str) -> str | None:
    """The queue name of directory ``dirname``; None for foreign entries."""
    if _SAFE_QUEUE.match(dirname):
        return dirname
    if dirname.startswith("~") and len(dirname) > 1:
        raw = dirname[1:]
        try:
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return None
    return None


def validate_queue(name: object) -> str:
    """Return ``name`` if it can name a queue, else raise InvalidMessage."""
    if (
        not isinstance(name, str)
        or not name
        or len(name) > 180
        or "\0" in name
        # (test_properties) It must also encode to one legal file name: lone
        # surrogates do not encode, and 180 non-ASCII characters pass the
        # 255 bytes a name may have.
        or not name.isascii()
    ):
        raise InvalidMessage(
            f"invalid queue name {name!r}: a channel name or a destination URL "
            "of at most 180 ASCII characters"
        )
    return name


class _Receipt(NamedTuple):
    """Where a taken message lives; attached to it as ``Message.receipt``.

    It never changes for a message of a storage object, so the message
    objects a batch file is read into carry it from the start and a take
    hands out the cached objects themselves.
    """

    storage: int
    queue: str
    bucket: str
    batch_id: str
    position: int


class _BucketScan:
    """A bucket's listing, parsed once, and how far it is known finished."""

    __slots__ = ("cursor", "names", "parsed")

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.parsed = [BatchName.parse(n) for n in names]
        self.cursor = 0

    def relisted(self, names: list[str]) -> _BucketScan:
        """The scan of a new listing, keeping the cursor if nothing moved before it."""
        new = _BucketScan(names)
        if self.cursor and self.cursor <= len(self.names):
            # Entries before the cursor may only have vanished (a salvaged
            # or removed batch) or arrived late (a slow producer): in either
            # case start over, else keep the place.
            position = bisect.bisect_left(names, self.names[self.cursor - 1])
            if (
                position == self.cursor - 1
                and position < len(names)
                and names[position] == self.names[self.cursor - 1]
            ):
                new.cursor = self.cursor
        return new


class _Queue:
    """One queue's directory, its lock and what this process knows of it.

    The state logs and scans of at most ``_BUCKETS_KEPT`` buckets are kept,
    the least recently used dropped: a bucket another process removed is
    forgotten here too, so memory follows what a consumer holds, not what
    it has seen.
    """

    def __init__(self, name: str, path: str, disk: Disk, on_forget: Callable[[str], None]) -> None:
        self.name = name
        self.path = path
        self.disk = disk
        #: Called with a bucket this view drops, so caches of it go too.
        self.on_forget = on_forget
        self._lock_fd = -1
        self.logs: OrderedDict[str, StateLog] = OrderedDict()
        self.scans: OrderedDict[str, _BucketScan] = OrderedDict()
        #: Leases of a take that failed half-way and could not be released
        #: at once: (bucket, lines), released at the next call.
        self.pending_releases: list[tuple[str, list[str]]] = []

    def scan(self, bucket: str, names: list[str]) -> _BucketScan:
        """The parsed listing of ``bucket`` (``names`` is the current one)."""
        scan = self.scans.get(bucket)
        if scan is None:
            scan = self.scans[bucket] = _BucketScan(names)
            while len(self.scans) > _BUCKETS_KEPT:
                self.forget(next(iter(self.scans)))
        else:
            self.scans.move_to_end(bucket)
            if scan.names is not names:
                scan = self.scans[bucket] = scan.relisted(names)
        return scan

    def lock(self) -> None:
        if self._lock_fd < 0:
            ensure_dir(self.path, disk=self.disk)
            self._lock_fd = self.disk.open_lock(os.path.join(self.path, "lock"))
        self.disk.lock(self._lock_fd)

    def unlock(self) -> None:
        self.disk.unlock(self._lock_fd)

    def close(self) -> None:
        if self._lock_fd >= 0:
            self.disk.close(self._lock_fd)
            self._lock_fd = -1

    def log(self, bucket: str) -> StateLog:
        log = self.logs.get(bucket)
        if log is None:
            log = self.logs[bucket] = StateLog(bucket, self.disk)
            while len(self.logs) > _BUCKETS_KEPT:
                self.forget(next(iter(self.logs)))
        else:
            self.logs.move_to_end(bucket)
        return log

    def forget(self, bucket: str) -> None:
        """Drop what is known of a bucket (removed, or least recently used)."""
        self.logs.pop(bucket, None)
        self.scans.pop(bucket, None)
        self.on_forget(bucket)


@implementer(IStorage, IUsage, IReceivingStore, ISpoolStorage)
class FilesystemStorage:
    """Durable queues in a directory tree; see the module docstring.

    :param path: the root directory, created if missing.
    :param max_bytes: refuse ``add`` once this many payload bytes wait
        (None: no limit).  Enforced from a usage figure refreshed at most
        every ``usage_refresh`` seconds, plus what this process added since.
    :param max_messages: the same for the number of waiting messages.
    :param max_payload: the largest payload accepted, in bytes.
    :param lease: default seconds a taken message stays claimed.
    :param sync_acks: sync the state log on ack and fail, so an acked
        message is not handed out again after a power loss.  A client spool
        can do without (a resent message is dropped by the server's dedup).
    :param dedup: keep an index of stored ids and make ``add`` idempotent by
        id (for a server store; needs ``exclusive``).
    :param dedup_window: seconds the dedup index remembers an id.
    :param exclusive: hold the root's lock for the life of this object;
        raise StorageLocked if another process holds it.
    :param sole_taker: this object is the only one that takes from these
        queues (a client daemon and its spool), so leases written by anyone
        else are left over from a process that is gone and count as free.
    :param clock: the wall clock (seconds since the epoch) of leases and
        bucket times; see docs/guarantees.rst for what a step of it does.
    :param disk: every disk effect goes through it (tests pass a faulty one).
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        *,
        max_bytes: int | None = None,
        max_messages: int | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        lease: float = 60.0,
        sync_acks: bool = True,
        dedup: bool = False,
        dedup_window: float = 7 * 86400.0,
        exclusive: bool = False,
        sole_taker: bool = False,
        usage_refresh: float = 1.0,
        clock: Callable[[], float] = time.time,
        disk: Disk = REAL_DISK,
    ) -> None:
        if max_payload > batchfile.MAX_PAYLOAD:
            raise InvalidMessage(
                f"max_payload {max_payload} is above {batchfile.MAX_PAYLOAD} bytes, the "
                "largest payload a batch file can hold; give a smaller max_payload"
            )
        self.disk = disk
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.max_payload = max_payload
        self.default_lease = lease
        self.sync_acks = sync_acks
        self.usage_refresh = usage_refresh
        self._clock = clock
        self._mutex = threading.RLock()
        self._queues: OrderedDict[str, _Queue] = OrderedDict()
        self._listing = DirListing(disk)
        self._cache = BatchCache(_CACHE_BYTES, _CACHE_BATCHES)
        self._usage: tuple[float, int, int] | None = None
        self._bucket_usage: dict[str, tuple[int, int, int, int]] = {}
        #: Buckets whose directory chain this process knows to be durable.
        self._settled_dirs: set[str] = set()
        self._closed = False
        #: (chaos) An add stored a batch but could not index its ids.
        self._dedup_behind = False
        self._root_lock_fd = -1
        self.sole_taker = sole_taker
        self._pruned_at = time.monotonic()
        #: Written with every lease, so an exclusive owner can tell its own.
        self.owner = os.urandom(6).hex()
        self.tmp_dir = os.path.join(self.path, "tmp")
        self.queues_dir = os.path.join(self.path, "queues")
        self.failed_dir = os.path.join(self.path, "failed")
        self.quarantine_dir = os.path.join(self.path, "quarantine")
        self.dedup: DedupIndex | None = None
        try:
            with self._disk_errors():
                self._open(exclusive or dedup or sole_taker, dedup, dedup_window)
        except BaseException:
            self.close()
            raise

    def _open(self, lock: bool, dedup: bool, dedup_window: float) -> None:
        for d in (self.path, self.tmp_dir, self.queues_dir, self.failed_dir, self.quarantine_dir):
            ensure_dir(d, disk=self.disk)
        if lock:
            self._lock_root()
        if dedup:
            self.dedup = DedupIndex(
                os.path.join(self.path, "ids"),
                window=dedup_window,
                clock=self._clock,
                disk=self.disk,
            )
            # Batch ids must never fall below the checkpoint, whatever the
            # clock did while the store was closed (see ids.advance_to).
            advance_to(self.dedup.checkpoint_ms + 1)
        self.recover()

    # -- opening and recovery -------------------------------------------------

    def _lock_root(self) -> None:
        fd = self.disk.open_lock(os.path.join(self.path, "lock"))
        if not self.disk.lock(fd, blocking=False):
            holder = self.disk.read_lock_note(fd) or "another process"
            self.disk.close(fd)
            raise StorageLocked(
                f"{self.path} is in use by pid {holder}: only one daemon may own "
                "a spool or store; stop the other one, or give this one another "
                "directory"
            ) from None
        # (chaos) Who holds the lock is for error messages only: a full disk
        # must not keep a daemon from starting.
        with contextlib.suppress(OSError):
            self.disk.write_lock_note(fd, f"{os.getpid()}\n")
        self._root_lock_fd = fd

    def recover(self) -> dict[str, int]:
        """Undo what a crash left behind; cheap enough to run at every open.

        Removes temporary files of writers that are gone, and makes the dedup
        index cover every stored batch.  Batch files are checked when first
        read (a damaged one is quarantined then) and by ``dropr fsck``;
        expired leases need no work, they simply count as free.
        """
        removed = 0
        now = time.time()
        for name in self.disk.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            m = _TMP_RE.match(name)
            try:
                age = now - self.disk.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if m is None or not pid_alive(int(m.group(1))) or age > _TMP_MAX_AGE:
                try:
                    self.disk.unlink(path)
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            self.log.info(
                "removed {count} half-written files from {path}", count=removed, path=self.tmp_dir
            )
        relogged = 0
        if self.dedup is not None:
            try:
                relogged = self.dedup.recover(self._batches_since(self.dedup.checkpoint_ms))
            except OSError as e:
                if not is_disk_full(e):
                    raise
                # (chaos) A daemon must start on a full disk: adds raise
                # StorageFull until the ids can be indexed (_catch_up_dedup).
                self._dedup_behind = True
                self.log.warn("cannot index stored ids yet: {error}", error=e)
        return {"tmp_removed": removed, "ids_relogged": relogged}

    def _batches_since(self, ms: int) -> Iterator[tuple[str, list[str]]]:
        """Yield the message ids of every batch added at or after ``ms``, oldest first.

        (chaos) Oldest first, not queue by queue: the dedup index checkpoints
        as it goes, at the newest batch it indexed, so a crash in the middle
        of a recovery must not leave older batches of another queue behind
        that checkpoint unindexed (a resend of them would be stored twice).
        Directories a consumer removes meanwhile are skipped.
        """
        first_hi = f"{ms:012x}"[:7]
        found: list[tuple[str, str, str, BatchName]] = []
        for qdir in self._listing.names(self.queues_dir):
            qpath = os.path.join(self.queues_dir, qdir)
            for p in self._priority_dirs(qpath):
                pdir = os.path.join(qpath, p)
                for hi in _names(pdir, self.disk):
                    if hi < first_hi:
                        continue
                    hidir = os.path.join(pdir, hi)
                    for lo in _names(hidir, self.disk):
                        bucket = os.path.join(hidir, lo)
                        for name in _names(bucket, self.disk):
                            bn = BatchName.parse(name)
                            if bn is None or int(bn.batch_id[:12], 16) < ms:
                                continue
                            found.append((bn.batch_id, qdir, bucket, bn))
        found.sort(key=lambda f: f[0])
        for _batch_id, qdir, bucket, bn in found:
            messages = self._read_batch(decode_queue(qdir) or qdir, bucket, bn)
            if messages is not None:
                yield bn.batch_id, [m.id for m in messages]

    def close(self) -> None:
        """Release locks and files; the storage is unusable afterwards."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            if self.dedup is not None:
                # (chaos) A full disk must not keep the locks held: the ids
                # not checkpointed are indexed again at the next open.
                try:
                    self.dedup.close()
                except OSError as e:
                    self.log.warn("could not close the dedup index: {error}", error=e)
            for q in self._queues.values():
                with contextlib.suppress(OSError):
                    q.close()
            self._queues.clear()
            if self._root_lock_fd >= 0:
                with contextlib.suppress(OSError):
                    self.disk.close(self._root_lock_fd)
                self._root_lock_fd = -1

    def __enter__(self) -> FilesystemStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- adding ------------------------------------------------------------------

    def add(
        self,
        queue: str,
        messages: Sequence[Message],
        records: dict[str, bytes] | None = None,
    ) -> list[str]:
        """Store ``messages`` in ``queue``, durably; see ``IStorage.add``.

        ``records`` may give, by id, a message's record already encoded as a
        batch file holds it (a server receives them so); it is written as is.
        """
        return self._store([(queue, messages)], records)

    def _store(
        self,
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None,
    ) -> list[str]:
        """Store ``(queue, messages)`` pairs all or nothing; the ids stored.

        Every batch file is written and synced, the limits checked for the
        whole call, then all are renamed into place and their buckets
        synced.  Any error before the last sync takes back (durably) what was
        placed, so the call stores nothing.  A crash in the middle leaves
        each batch file whole or absent; the caller, never answered, sends
        again and the dedup index stores the rest once.
        """
        for queue, messages in batches:
            validate_queue(queue)
            validate_messages(messages, self.max_payload)
        with self._mutex, self._disk_errors():
            self._check_open()
            if self.dedup is not None:
                if self._dedup_behind:
                    self._catch_up_dedup()
                # An id older than the window may have been stored and
                # forgotten: refuse it, or it could be stored twice (A2).
                oldest = self.dedup.oldest_id_prefix()
                for _queue, messages in batches:
                    for m in messages:
                        if m.id < oldest:
                            raise InvalidMessage(
                                f"message {m.id} is older than the dedup window of "
                                f"{self.dedup.window:g} seconds, so it may have been "
                                "stored already; nothing was stored. Fail it at the sender"
                            )
                # Exactly once rests on the index alone: every id is looked up,
                # and an id twice in one call is stored once.
                fresh = self.dedup.unseen([m for _q, ms in batches for m in ms])
                keep = {m.id: m for m in fresh}
                batches = [(q, [m for m in ms if keep.pop(m.id, None) is m]) for q, ms in batches]
            batches = [(q, ms) for q, ms in batches if ms]
            if not batches:
                return []
            stored = [m for _q, ms in batches for m in ms]
            count = len(stored)
            nbytes = sum(len(m.payload) for m in stored)
            self._check_limits(count, nbytes)
            written = self._place(batches, records)
            if self.dedup is not None:
                try:
                    self.dedup.record([m.id for m in stored], max(n.batch_id for n in written))
                except OSError as e:
                    # (chaos) The batches are durable but their ids are not all
                    # indexed.  The call still stored them: the ids are indexed
                    # before the next look-up (_catch_up_dedup) and, after a
                    # crash, by recovery (the checkpoint has not passed them).
                    self._dedup_behind = True
                    self.log.warn("stored ids not yet indexed: {error}", error=e)
            for queue, _messages in batches:
                qpath = os.path.join(self.queues_dir, encode_queue(queue))
                with contextlib.suppress(OSError):
                    self._touch_wake(qpath)  # a hint for consumers; never fail a stored add
            if self._usage is not None:
                at, c, b = self._usage
                self._usage = (at, c + count, b + nbytes)
            return [m.id for m in stored]

    def _place(
        self,
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None,
    ) -> list[BatchName]:
        """Write, rename and sync one batch file per queue and priority; all or none."""
        synced: set[str] = set()
        written: list[tuple[str, str, BatchName]] = []
        placed: list[str] = []
        try:
            for queue, messages in batches:
                qpath = os.path.join(self.queues_dir, encode_queue(queue))
                by_priority: dict[int, list[Message]] = {}
                for m in messages:
                    by_priority.setdefault(m.priority, []).append(m)
                for priority in sorted(by_priority):
                    group = by_priority[priority]
                    name = BatchName(new_id(), len(group), sum(len(m.payload) for m in group))
                    if records is not None and all(m.id in records for m in group):
                        chunks = [batchfile.MAGIC, *(records[m.id] for m in group)]
                    else:
                        chunks = batchfile.encode(group)
                    tmp = write_new_file(self.tmp_dir, name.batch_id, chunks, self.disk)
                    written.append((tmp, self._bucket_dir(qpath, priority, name.batch_id), name))
            for tmp, bucket, name in written:
                if ensure_dir(bucket, disk=self.disk):
                    self._settled_dirs.add(bucket)
                elif bucket not in self._settled_dirs:
                    self._settle_dir(bucket)
                rename_into(tmp, bucket, str(name), self.disk)
                placed.append(os.path.join(bucket, str(name)))
                synced.add(bucket)
            for bucket in sorted(synced):
                self.disk.sync_dir(bucket)
        except BaseException:
            # All or nothing: take back what this call placed already,
            # durably (an undone batch must not come back after a power loss).
            with contextlib.suppress(OSError):
                for path in placed + [tmp for tmp, _b, _n in written]:
                    unlink_quietly(path, self.disk)
                for bucket in sorted({os.path.dirname(p) for p in placed}):
                    self.disk.sync_dir(bucket)
            raise
        return [name for _tmp, _bucket, name in written]

    def _disk_full(self, e: OSError) -> StorageFull:
        return StorageFull(
            f"{self.path} is full: its disk has no room ({e.strerror}); nothing was "
            "stored. Retry once there is room again"
        )

    @contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """Turn the disk's errors into dropr's: StorageFull or StorageIOError."""
        try:
            yield
        except OSError as e:
            if is_disk_full(e):
                raise self._disk_full(e) from e
            where = f" ({e.filename})" if e.filename else ""
            raise StorageIOError(
                f"{self.path}: the disk failed{where}: {e.strerror or e}. The call did "
                "not complete; what it acknowledged before is kept. Check the disk "
                "(dmesg), then retry"
            ) from e

    def _catch_up_dedup(self) -> None:
        """(chaos) Index the ids of batches stored while the index could not be written.

        A new index object re-reads what is on disk (dropping an id a full
        disk cut short) and indexes every batch since its checkpoint, as at
        an open after a crash.  Raises StorageFull while that cannot be
        written either, so nothing is looked up in an index that lacks ids.
        """
        assert self.dedup is not None
        old = self.dedup
        try:
            # What the old index wrote must be durable before a new checkpoint
            # can pass it.
            old.checkpoint()
        except OSError as e:
            raise self._disk_full(e) from e
        try:
            self.dedup = DedupIndex(old.path, window=old.window, clock=self._clock, disk=self.disk)
            self.dedup.recover(self._batches_since(self.dedup.checkpoint_ms))
        except OSError as e:
            if is_disk_full(e):
                raise self._disk_full(e) from e
            raise
        self._dedup_behind = False
        self.log.info("indexed the ids stored while the disk was full")

    def _settle_dir(self, bucket: str) -> None:
        """Sync the chain of directories above ``bucket`` up to the root.

        Another process may have made the bucket (or a parent) and not yet
        synced its entry; syncing the bucket alone would then not make a
        batch renamed into it durable.  Once per bucket per process.
        """
        path = bucket
        while len(path) > len(self.path):
            parent = os.path.dirname(path)
            self.disk.sync_dir(parent)
            path = parent
        self._settled_dirs.add(bucket)
        if len(self._settled_dirs) > 10_000:
            self._settled_dirs.clear()

    def _touch_wake(self, qpath: str) -> None:
        """Touch the queue's ``wake`` file: consumers watch it with inotify."""
        self.disk.touch(os.path.join(qpath, WAKE_NAME))

    def wake_file(self, queue: str) -> str:
        """The file whose change time moves each time ``queue`` gets messages."""
        qpath = os.path.join(self.queues_dir, encode_queue(validate_queue(queue)))
        with self._disk_errors():
            ensure_dir(qpath, disk=self.disk)
            path = os.path.join(qpath, WAKE_NAME)
            if not self.disk.exists(path):
                self.disk.touch(path)
        return path

    def _bucket_dir(self, qpath: str, priority: int, batch_id: str) -> str:
        return os.path.join(qpath, str(priority), batch_id[:7], batch_id[7:9])

    def _check_limits(self, count: int, nbytes: int) -> None:
        if self.max_bytes is None and self.max_messages is None:
            return
        waiting, waiting_bytes = self.usage()
        if self.max_messages is not None and waiting + count > self.max_messages:
            raise StorageFull(
                f"{self.path} is full: {waiting} messages wait and the limit is "
                f"{self.max_messages}; nothing was stored. Retry once messages "
                "are delivered, or raise max_messages"
            )
        if self.max_bytes is not None and waiting_bytes + nbytes > self.max_bytes:
            raise StorageFull(
                f"{self.path} is full: {waiting_bytes} payload bytes wait, "
                f"{nbytes} more would pass the limit of {self.max_bytes}; nothing "
                "was stored. Retry once messages are delivered, or raise max_bytes"
            )

    def usage(self) -> tuple[int, int]:
        """``(messages, payload bytes)`` waiting, refreshed every ``usage_refresh`` s.

        Processes share the work: whoever counts writes the figures to the
        root's ``usage`` file, and another process trusts that file while it
        is younger than ``USAGE_FILE_FRESH`` seconds (the client daemon
        rewrites it at every rescan), so a short-lived producer does not walk
        a large spool for its first put.  The limits are therefore kept to
        within a few seconds' worth of puts, not to the message.
        """
        now = time.monotonic()
        if self._usage is not None and now - self._usage[0] < self.usage_refresh:
            return self._usage[1], self._usage[2]
        if self._usage is None:
            # The first look of this process: a recent count by another one
            # spares a walk of the whole spool; later looks count (cheaply,
            # bucket by changed bucket) for themselves.
            shared = self._read_usage_file()
            if shared is not None:
                self._usage = (now, shared[0], shared[1])
                return shared
        return self.count_usage()

    def count_usage(self) -> tuple[int, int]:
        """Count what waits now, and share the figures in the ``usage`` file.

        Counted from file names less what the state logs say is finished,
        cached per bucket by its mtime and its state log's size, so a count
        costs a stat per bucket plus a look at the buckets that changed.
        """
        count = nbytes = 0
        seen: dict[str, tuple[int, int, int, int]] = {}
        for bucket in self._all_buckets():
            try:
                mtime = self.disk.stat(bucket).st_mtime_ns
                state_size = self.disk.stat(os.path.join(bucket, STATE_NAME)).st_size
            except FileNotFoundError:
                state_size = 0
                if not self.disk.isdir(bucket):
                    continue
            cached = self._bucket_usage.get(bucket)
            if cached is None or cached[0] != mtime or cached[1] != state_size:
                try:
                    names = self.disk.listdir(bucket)
                except FileNotFoundError:
                    continue
                log = StateLog(bucket, self.disk)
                if state_size:
                    log.refresh()
                c = b = 0
                for name in names:
                    bn = BatchName.parse(name)
                    if bn is not None:
                        done = len(log.state(bn.batch_id).done) if state_size else 0
                        left = max(0, bn.count - done)
                        c += left
                        b += bn.nbytes * left // bn.count if bn.count else 0
                # A bucket listed within a tick of its last change is listed
                # again next time (see dirlisting).
                settled = time.time_ns() - mtime > 50_000_000
                cached = (mtime if settled else -1, state_size, c, b)
            seen[bucket] = cached
            count += cached[2]
            nbytes += cached[3]
        self._bucket_usage = seen
        self._usage = (time.monotonic(), count, nbytes)
        self._write_usage_file(count, nbytes)
        return count, nbytes

    def _read_usage_file(self) -> tuple[int, int] | None:
        path = os.path.join(self.path, USAGE_NAME)
        try:
            if time.time() - self.disk.stat(path).st_mtime > USAGE_FILE_FRESH:
                return None
            data = json.loads(self.disk.read(path))
            return int(data["messages"]), int(data["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_usage_file(self, count: int, nbytes: int) -> None:
        # Advisory figures: no sync, and a failure to write costs nothing.
        path = os.path.join(self.path, USAGE_NAME)
        tmp = f"{path}.{os.getpid()}.tmp"
        figures = {"messages": count, "bytes": nbytes, "time": time.time()}
        with contextlib.suppress(OSError):
            self.disk.create(tmp, json.dumps(figures).encode(), sync=False, exclusive=False)
            self.disk.rename(tmp, path)

    def _all_buckets(self) -> Iterator[str]:
        for qdir in self._listing.names(self.queues_dir):
            qpath = os.path.join(self.queues_dir, qdir)
            yield from self._buckets(qpath)

    def _priority_dirs(self, qpath: str) -> list[str]:
        try:
            names = self.disk.listdir(qpath)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted((n for n in names if len(n) == 1 and n.isdigit()), key=int)

    def _buckets(self, qpath: str) -> Iterator[str]:
        """Every bucket directory of the queue at ``qpath``, in delivery order."""
        names = self._listing.names
        for p in names(qpath):
            if len(p) != 1 or not p.isdigit():
                continue
            pdir = os.path.join(qpath, p)
            for hi in names(pdir):
                hidir = os.path.join(pdir, hi)
                for lo in names(hidir):
                    yield os.path.join(hidir, lo)

    # -- taking --------------------------------------------------------------------

    def take(self, queue: str, limit: int, lease: float | None = None) -> list[Message]:
        """Claim up to ``limit`` messages of ``queue``; see ``IStorage.take``.

        All or nothing: a take that raises leaves no lease behind (what it
        wrote is released again), so everything it did not return can be
        taken at once, in order.
        """
        validate_queue(queue)
        if limit < 1:
            return []
        lease_s = self.default_lease if lease is None else lease
        with self._mutex, self._disk_errors():
            self._check_open()
            q = self._queue(queue)
            if not self.disk.isdir(q.path):
                return []
            q.lock()
            try:
                self._release_pending(q)
                return self._take_locked(q, limit, lease_s)
            finally:
                q.unlock()

    def _take_locked(self, q: _Queue, limit: int, lease_s: float) -> list[Message]:
        now_ms = int(self._clock() * 1000)
        expiry = now_ms + int(lease_s * 1000)
        taken: list[Message] = []
        leases: list[tuple[StateLog, list[str]]] = []
        finished: list[tuple[str, StateLog]] = []
        # Lazily: a take stops at its limit, usually in the first buckets.
        for bucket in self._buckets(q.path):
            log = q.log(bucket)
            log.refresh()
            lines: list[str] = []
            complete = True
            scan = q.scan(bucket, self._listing.names(bucket))
            # Batches before the cursor are known to be finished (acks and
            # fails are final), so a take does not look at them again.
            at_cursor = True
            for k in range(scan.cursor, len(scan.parsed)):
                bn = scan.parsed[k]
                if bn is None:
                    if at_cursor:
                        scan.cursor = k + 1
                    continue
                state = log.state(bn.batch_id)
                if state.complete(bn.count):
                    if at_cursor:
                        scan.cursor = k + 1
                        self._uncache(os.path.join(bucket, scan.names[k]))
                    continue
                at_cursor = False
                complete = False
                if len(taken) >= limit:
                    break
                free = state.free(bn.count, now_ms, self.owner if self.sole_taker else None)
                if not free:
                    continue
                messages = self._read_batch(q.name, bucket, bn)
                if messages is None:
                    continue  # quarantined; a salvaged copy shows up in the listing
                chosen = [i for i in free if i < len(messages)][: limit - len(taken)]
                taken.extend([messages[i] for i in chosen])
                if chosen:
                    lines.append(line("T", bn.batch_id, expiry, format_indexes(chosen), self.owner))
            if lines:
                leases.append((log, lines))
            if complete:
                finished.append((bucket, log))
            if len(taken) >= limit:
                break
        self._write_leases(q, leases)
        for bucket, log in finished:
            # Upkeep on the way: a take that failed to clean up still took.
            try:
                self._remove_bucket_if_done(q, bucket, log)
            except OSError as e:
                self.log.warn("could not remove finished bucket {bucket}: {e}", bucket=bucket, e=e)
        return taken

    def _write_leases(self, q: _Queue, leases: list[tuple[StateLog, list[str]]]) -> None:
        """Append each bucket's ``T`` lines; on failure release those written, then raise.

        (breach: a take that failed half-way kept the leases it had written,
        so nothing was returned but early messages were held for a lease.)
        """
        tried: list[tuple[StateLog, list[str]]] = []
        try:
            for log, lines in leases:
                # Released on failure too: the append may have written before
                # it failed (a release of a lease never written is a no-op).
                tried.append((log, lines))
                log.append(lines, sync=False)
        except OSError:
            for log, lines in tried:
                releases = [_release_line(t) for t in lines]
                try:
                    log.append(releases, sync=False)
                except OSError:
                    q.pending_releases.append((os.path.dirname(log.path), releases))
            raise

    def _release_pending(self, q: _Queue) -> None:
        """Release the leases of an earlier failed take that could not be released then."""
        while q.pending_releases:
            bucket, releases = q.pending_releases[0]
            with contextlib.suppress(FileNotFoundError):
                q.log(bucket).append(releases, sync=False)
            q.pending_releases.pop(0)

    def _lease_free(self, lease: tuple[int, str] | None, now_ms: int) -> bool:
        """True if a message under ``lease`` may be taken now.

        The sole owner of a root (a daemon holding its lock) knows that a
        lease of any other owner was left by a process that is gone.
        """
        if lease is None or lease[0] <= now_ms:
            return True
        return self.sole_taker and lease[1] != self.owner

    def _read_batch(self, queue: str, bucket: str, bn: BatchName) -> list[Message] | None:
        """The messages of a batch file, from cache or disk; None if unreadable."""
        path = os.path.join(bucket, str(bn))
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        try:
            data = self.disk.read(path)
        except FileNotFoundError:
            return None
        sid, batch_id = id(self), bn.batch_id
        decoded = batchfile.decode(data, lambda i: _Receipt(sid, queue, bucket, batch_id, i))
        if decoded.error or len(decoded.messages) != bn.count:
            reason = decoded.error or (
                f"holds {len(decoded.messages)} messages, its name says {bn.count}"
            )
            if len(decoded.messages) >= bn.count:
                pass  # all promised messages read; trailing bytes are harmless
            else:
                self._quarantine(path, reason, salvage=decoded.messages, name=bn)
                # (test_filestorage) The salvaged prefix now lies in the bucket
                # under the same batch id and indexes: hand it out in its place
                # now, not after the batches behind it (promise A3).
                return decoded.messages or None
        messages = decoded.messages[: bn.count]
        self._cache.put(path, messages)
        return messages

    def _uncache(self, path: str) -> None:
        """Forget a cached batch (finished, removed or quarantined)."""
        self._cache.drop(path)

    def _quarantine(
        self, path: str, reason: str, salvage: Sequence[Message] = (), name: BatchName | None = None
    ) -> None:
        """Move an unreadable file aside with its reason; keep what was readable."""
        bucket = os.path.dirname(path)
        if salvage and name is not None:
            # The readable records are a prefix of the file, so writing them
            # under the same batch id keeps their order and their state.
            good = BatchName(name.batch_id, len(salvage), sum(len(m.payload) for m in salvage))
            tmp = write_new_file(self.tmp_dir, name.batch_id, batchfile.encode(salvage), self.disk)
            rename_into(tmp, bucket, str(good), self.disk)
        rel = os.path.relpath(path, self.path).replace(os.sep, "_")
        target = os.path.join(self.quarantine_dir, f"{int(time.time())}-{rel}")
        why = {
            "reason": reason,
            "original": os.path.relpath(path, self.path),
            "salvaged": len(salvage),
            "time": time.time(),
        }
        tmp_why = write_new_file(
            self.tmp_dir, "why", [json.dumps(why, indent=1).encode("utf-8") + b"\n"], self.disk
        )
        self.disk.rename(tmp_why, target + ".why")
        self.disk.rename(path, target)
        self.disk.sync_dir(self.quarantine_dir)
        self.disk.sync_dir(bucket)
        self._uncache(path)
        self.log.warn(
            "quarantined {original}: {reason}; {salvaged} readable messages kept in the queue",
            original=why["original"],
            reason=reason,
            salvaged=len(salvage),
        )

    def _remove_bucket_if_done(self, q: _Queue, bucket: str, log: StateLog) -> None:
        """Delete a bucket whose every message is acked or failed.

        Batch files go first and are synced gone before the state log goes:
        the other order could bring acked messages back after a power loss.
        """
        lo = os.path.basename(bucket)
        hi = os.path.basename(os.path.dirname(bucket))
        bucket_end_ms = (int(hi + lo, 16) + 1) * _BUCKET_MS
        if bucket_end_ms / 1000.0 > self._clock() - _BUCKET_SETTLE:
            return
        indexed = self._indexed_until()
        if indexed is not None and bucket_end_ms > indexed:
            # The store's daemon has not yet confirmed these ids in its dedup
            # index; deleting the batches now could let a resend in twice.
            return
        names = _names(bucket, self.disk)
        for name in names:
            bn = BatchName.parse(name)
            if bn is None:
                continue
            if not log.state(bn.batch_id).complete(bn.count):
                return
        for name in names:
            if BatchName.parse(name) is not None:
                path = os.path.join(bucket, name)
                unlink_quietly(path, self.disk)
                self._uncache(path)
        self.disk.sync_dir(bucket)
        for name in names:
            if BatchName.parse(name) is None:
                unlink_quietly(os.path.join(bucket, name), self.disk)
        q.forget(bucket)
        self._listing.forget(bucket)
        remove_empty_dirs(bucket, os.path.dirname(bucket), disk=self.disk)

    def maintain(self) -> None:
        """Periodic upkeep of a store's daemon: dedup checkpoint and pruning.

        Call it every second or so; the checkpoint lets consumers delete
        consumed batches and bounds the work of recovery after a crash.
        """
        with self._mutex, self._disk_errors():
            if self.dedup is None or self._closed:
                return
            if self._dedup_behind:
                # (chaos) Never checkpoint an index that lacks ids; catch up
                # as soon as the disk has room again.
                with contextlib.suppress(StorageFull):
                    self._catch_up_dedup()
                return
            self.dedup.checkpoint()
            if time.monotonic() - self._pruned_at > 3600:
                self._pruned_at = time.monotonic()
                self.dedup.prune()

    def _indexed_until(self) -> int | None:
        """The dedup checkpoint of this root (ms), or None without an index."""
        if self.dedup is not None:
            return self.dedup.checkpoint_ms
        try:
            return int(self.disk.read(os.path.join(self.path, "ids", "checkpoint")).strip() or b"0")
        except FileNotFoundError:
            return None if not self.disk.isdir(os.path.join(self.path, "ids")) else 0
        except (OSError, ValueError):
            return 0

    # -- settling taken messages -------------------------------------------------------

    def ack(self, messages: Iterable[Message]) -> None:
        """Forget taken ``messages``; durable on return when ``sync_acks``."""
        self._settle(messages, "A", self.sync_acks)

    def release(self, messages: Iterable[Message]) -> None:
        """Hand taken ``messages`` out again (no sync: a lost release only delays)."""
        self._settle(messages, "R", False)

    def fail(self, messages: Iterable[Message], reason: str) -> None:
        """Move taken ``messages`` to the failed area with ``reason``, durably."""
        messages = list(messages)
        if not isinstance(reason, str) or not reason:
            raise InvalidMessage("fail() needs a reason: a short text saying what went wrong")
        with self._mutex, self._disk_errors():
            by_queue: dict[str, list[Message]] = {}
            for m in messages:
                by_queue.setdefault(self._receipt(m).queue, []).append(m)
            for queue, group in by_queue.items():
                self._write_failed(queue, group, reason)
            self._settle(messages, "F", True)

    def _write_failed(self, queue: str, messages: list[Message], reason: str) -> None:
        fdir = os.path.join(self.failed_dir, encode_queue(queue))
        ensure_dir(fdir, disk=self.disk)
        clean = [replace(m, receipt=None) for m in messages]
        name = BatchName(new_id(), len(clean), sum(len(m.payload) for m in clean))
        why = {"reason": reason, "time": time.time(), "queue": queue}
        why_bytes = [json.dumps(why).encode("utf-8") + b"\n"]
        tmp_why = write_new_file(self.tmp_dir, "why", why_bytes, self.disk)
        try:
            tmp = write_new_file(self.tmp_dir, name.batch_id, batchfile.encode(clean), self.disk)
        except BaseException:
            with contextlib.suppress(OSError):
                unlink_quietly(tmp_why, self.disk)
            raise
        # The reason first: a failed batch is never without its .why.
        self.disk.rename(tmp_why, os.path.join(fdir, f"{name.batch_id}.why"))
        self.disk.rename(tmp, os.path.join(fdir, str(name)))
        self.disk.sync_dir(fdir)

    def _receipt(self, m: Message) -> _Receipt:
        r = m.receipt
        if not isinstance(r, _Receipt) or r.storage != id(self):
            raise UnknownMessage(
                f"message {m.id} was not taken from this storage: ack, release "
                "and fail the Message objects that take() returned"
            )
        return r

    def _settle(self, messages: Iterable[Message], op: str, sync: bool) -> None:
        with self._mutex, self._disk_errors():
            self._check_open()
            grouped: dict[str, dict[str, dict[str, list[int]]]] = {}
            for m in messages:
                r = self._receipt(m)
                grouped.setdefault(r.queue, {}).setdefault(r.bucket, {}).setdefault(
                    r.batch_id, []
                ).append(r.position)
            failure: OSError | None = None
            for queue, buckets in grouped.items():
                q = self._queue(queue)
                q.lock()
                try:
                    for bucket, batches in buckets.items():
                        owner = (self.owner,) if op == "R" else ()
                        lines = [
                            line(op, batch_id, format_indexes(idx), *owner)
                            for batch_id, idx in batches.items()
                        ]
                        try:
                            q.log(bucket).append(lines, sync=sync)
                        except FileNotFoundError:
                            # The bucket is gone: it is removed only once every
                            # message in it is acked or failed, so these are
                            # done already (a late ack after another consumer
                            # took over); the other buckets still count.
                            q.forget(bucket)
                        except OSError as e:
                            # Settle every other bucket before reporting.
                            failure = failure or e
                finally:
                    q.unlock()
            if failure is not None:
                raise failure

    # -- looking -----------------------------------------------------------------

    def queues(self) -> list[str]:
        """Queues holding messages, waiting or failed."""
        with self._mutex:
            names: set[str] = set()
            for top in (self.queues_dir, self.failed_dir):
                for d in self.disk.listdir(top):
                    name = decode_queue(d)
                    if name is not None and self._has_batches(os.path.join(top, d)):
                        names.add(name)
            return sorted(names)

    def queue_names(self) -> list[str]:
        """Names of the queues that have a directory; cheap (one cached listing)."""
        with self._mutex:
            names = (decode_queue(d) for d in self._listing.names(self.queues_dir))
            return [n for n in names if n is not None]

    def _has_batches(self, path: str) -> bool:
        """True if any batch file lies at or below directory ``path``."""
        for name in _names(path, self.disk):
            if BatchName.parse(name) is not None:
                return True
            sub = os.path.join(path, name)
            if self.disk.isdir(sub) and self._has_batches(sub):
                return True
        return False

    def stats(self) -> dict[str, QueueStats]:
        """Figures for every queue; reads state logs, so it costs a walk."""
        with self._mutex:
            result = {}
            now = self._clock()
            now_ms = int(now * 1000)
            for queue in self.queues():
                qpath = os.path.join(self.queues_dir, encode_queue(queue))
                depth = nbytes = taken = 0
                oldest = 0.0
                for bucket in self._buckets(qpath):
                    log = StateLog(bucket, self.disk)
                    log.refresh()
                    for name in self._listing.names(bucket):
                        bn = BatchName.parse(name)
                        if bn is None:
                            continue
                        state = log.state(bn.batch_id)
                        open_idx = [i for i in range(bn.count) if i not in state.done]
                        if not open_idx:
                            continue
                        depth += len(open_idx)
                        if len(open_idx) == bn.count:
                            nbytes += bn.nbytes
                        else:
                            # (storage conformance) The name gives only the
                            # batch's total; count the open messages' own sizes.
                            msgs = self._read_batch(queue, bucket, bn) or []
                            nbytes += sum(len(msgs[i].payload) for i in open_idx if i < len(msgs))
                        taken += sum(
                            1 for i in open_idx if not self._lease_free(state.leases.get(i), now_ms)
                        )
                        if not oldest:
                            head = self._read_batch(queue, bucket, bn)
                            if head:
                                first = min(open_idx)
                                if first < len(head):
                                    oldest = max(0.0, now - id_time(head[first].id))
                failed = 0
                fdir = os.path.join(self.failed_dir, encode_queue(queue))
                if self.disk.isdir(fdir):
                    for name in self.disk.listdir(fdir):
                        bn = BatchName.parse(name)
                        if bn is not None:
                            failed += bn.count
                result[queue] = QueueStats(depth, nbytes, oldest, taken, failed)
            return result

    def failed(self, queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Up to ``limit`` failed messages of ``queue`` with their reasons."""
        fdir = os.path.join(self.failed_dir, encode_queue(validate_queue(queue)))
        out: list[tuple[Message, str]] = []
        if not self.disk.isdir(fdir):
            return out
        for name in sorted(self.disk.listdir(fdir)):
            bn = BatchName.parse(name)
            if bn is None:
                continue
            try:
                why = self.disk.read(os.path.join(fdir, f"{bn.batch_id}.why"))
                reason = str(json.loads(why).get("reason", ""))
            except (OSError, ValueError, AttributeError):
                reason = "(reason unreadable)"
            decoded = batchfile.decode(self.disk.read(os.path.join(fdir, name)))
            for m in decoded.messages:
                out.append((m, reason))
                if len(out) >= limit:
                    return out
        return out

    # -- by id, for the dropr command (see dropr.admin._admin) ------------------------------

    def open_messages(
        self, queue: str, since_ms: int = 0
    ) -> Iterator[tuple[Message, tuple[int, str] | None]]:
        """Messages of ``queue`` not yet acked or failed, in delivery order.

        Each comes with its lease, ``(expiry in ms since the epoch, owner)``,
        or None, and carries its receipt: ack, fail or release it like a
        taken one.  Buckets that ended before ``since_ms`` are skipped.
        Reads every state log and batch file it walks: for tools, not for
        the hot path.
        """
        qpath = os.path.join(self.queues_dir, encode_queue(validate_queue(queue)))
        with self._mutex:
            self._check_open()
            buckets = list(self._buckets(qpath))
        for bucket in buckets:
            lo = os.path.basename(bucket)
            hi = os.path.basename(os.path.dirname(bucket))
            with contextlib.suppress(ValueError):
                if (int(hi + lo, 16) + 1) * _BUCKET_MS <= since_ms:
                    continue
            found: list[tuple[Message, tuple[int, str] | None]] = []
            with self._mutex:
                log = StateLog(bucket, self.disk)
                log.refresh()
                for name in sorted(_names(bucket, self.disk)):
                    bn = BatchName.parse(name)
                    if bn is None:
                        continue
                    state = log.state(bn.batch_id)
                    if state.complete(bn.count):
                        continue
                    messages = self._read_batch(queue, bucket, bn) or []
                    for i, m in enumerate(messages):
                        if i not in state.done:
                            found.append((m, state.leases.get(i)))
            yield from found

    def remove_finished(self, queue: str, older_than: float = 0.0) -> int:
        """Delete the buckets of ``queue`` whose every message is acked or failed.

        A take does this on its way through a queue; this is for queues no
        one takes from any more.  Buckets that began less than ``older_than``
        seconds ago are kept.  Returns how many buckets were deleted.
        """
        with self._mutex, self._disk_errors():
            self._check_open()
            q = self._queue(validate_queue(queue))
            if not self.disk.isdir(q.path):
                return 0
            cutoff_ms = int((self._clock() - older_than) * 1000)
            removed = 0
            q.lock()
            try:
                for bucket in list(self._buckets(q.path)):
                    lo = os.path.basename(bucket)
                    hi = os.path.basename(os.path.dirname(bucket))
                    try:
                        if int(hi + lo, 16) * _BUCKET_MS > cutoff_ms:
                            continue
                    except ValueError:
                        continue
                    log = q.log(bucket)
                    log.refresh()
                    self._remove_bucket_if_done(q, bucket, log)
                    if not self.disk.isdir(bucket):
                        removed += 1
            finally:
                q.unlock()
            return removed

    # -- what dropr-server needs (IReceivingStore) -------------------------------------

    @property
    def dedup_window(self) -> float:
        """Seconds a stored id is remembered (0.0 without a dedup index)."""
        return self.dedup.window if self.dedup is not None else 0.0

    def oldest_accepted_id(self) -> str:
        """Ids sorting below this are older than the dedup window; see IReceivingStore."""
        return self.dedup.oldest_id_prefix() if self.dedup is not None else ""

    def store(
        self,
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None = None,
    ) -> list[str]:
        """Store one request's messages, all or nothing; see IReceivingStore."""
        return self._store(batches, records)

    def channel_count(self) -> int:
        """How many queue directories exist."""
        return len(self.queue_names())

    def upkeep(self) -> None:
        """The serving daemon's periodic work; see IReceivingStore."""
        self.maintain()

    # -- helpers ---------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        """The ``_Queue`` of ``name``; at most ``_QUEUES_KEPT`` are kept (and their locks open)."""
        q = self._queues.get(name)
        if q is None:
            path = os.path.join(self.queues_dir, encode_queue(name))
            q = self._queues[name] = _Queue(name, path, self.disk, self._cache.drop_bucket)
            while len(self._queues) > _QUEUES_KEPT:
                _old, evicted = self._queues.popitem(last=False)
                if evicted.pending_releases:
                    # Its leases must still be released: keep it.
                    self._queues[evicted.name] = evicted
                    break
                evicted.close()
        else:
            self._queues.move_to_end(name)
        return q

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"storage {self.path} is closed")
