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
import errno
import fcntl
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import NamedTuple

from twisted.logger import Logger
from zope.interface import implementer

from dropr._ids import advance_to, id_time, new_id
from dropr._message import DEFAULT_MAX_PAYLOAD, Message, validate_messages
from dropr.errors import InvalidMessage, StorageClosed, StorageFull, StorageLocked, UnknownMessage
from dropr.interfaces import IReceivingStore, ISpoolStorage, IStorage, IUsage, QueueStats
from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._dedup import DedupIndex
from dropr.storage.files._dirlisting import DirListing
from dropr.storage.files._durable import (
    ensure_dir,
    fsync_dir,
    pid_alive,
    remove_empty_dirs,
    rename_into,
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
#: What a cached message costs beyond its payload (objects, receipt, id).
_MESSAGE_OVERHEAD = 400


def _cache_cost(messages: list[Message]) -> int:
    return sum(len(m.payload) for m in messages) + _MESSAGE_OVERHEAD * len(messages)


WAKE_NAME = "wake"
USAGE_NAME = "usage"
#: Seconds another process's count in the ``usage`` file is trusted.
USAGE_FILE_FRESH = 6.0


def _names(path: str) -> list[str]:
    """The entries of directory ``path``; none if it is gone."""
    try:
        return os.listdir(path)
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
    """One queue's directory, its lock and what this process knows of it."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self._lock_fd = -1
        self.logs: dict[str, StateLog] = {}
        self.scans: dict[str, _BucketScan] = {}

    def scan(self, bucket: str, names: list[str]) -> _BucketScan:
        """The parsed listing of ``bucket`` (``names`` is the current one)."""
        scan = self.scans.get(bucket)
        if scan is None:
            scan = self.scans[bucket] = _BucketScan(names)
        elif scan.names is not names:
            scan = self.scans[bucket] = scan.relisted(names)
        return scan

    def lock(self) -> None:
        if self._lock_fd < 0:
            ensure_dir(self.path)
            self._lock_fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def log(self, bucket: str) -> StateLog:
        log = self.logs.get(bucket)
        if log is None:
            log = self.logs[bucket] = StateLog(bucket)
        return log


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
    ) -> None:
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.max_payload = max_payload
        self.default_lease = lease
        self.sync_acks = sync_acks
        self.usage_refresh = usage_refresh
        self._clock = clock
        self._mutex = threading.RLock()
        self._queues: dict[str, _Queue] = {}
        self._listing = DirListing()
        self._cache: OrderedDict[str, list[Message]] = OrderedDict()
        self._cache_bytes = 0
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
        for d in (self.path, self.tmp_dir, self.queues_dir, self.failed_dir, self.quarantine_dir):
            ensure_dir(d)
        if exclusive or dedup or sole_taker:
            self._lock_root()
        self.dedup: DedupIndex | None = None
        if dedup:
            self.dedup = DedupIndex(
                os.path.join(self.path, "ids"), window=dedup_window, clock=clock
            )
            # Batch ids must never fall below the checkpoint, whatever the
            # clock did while the store was closed (see ids.advance_to).
            advance_to(self.dedup.checkpoint_ms + 1)
        self.recover()

    # -- opening and recovery -------------------------------------------------

    def _lock_root(self) -> None:
        fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise StorageLocked(
                f"{self.path} is in use by pid {holder}: only one daemon may own "
                "a spool or store; stop the other one, or give this one another "
                "directory"
            ) from None
        # (chaos) Who holds the lock is for error messages only: a full disk
        # must not keep a daemon from starting.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
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
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            m = _TMP_RE.match(name)
            try:
                age = now - os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if m is None or not pid_alive(int(m.group(1))) or age > _TMP_MAX_AGE:
                try:
                    os.unlink(path)
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
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
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
                for hi in _names(pdir):
                    if hi < first_hi:
                        continue
                    hidir = os.path.join(pdir, hi)
                    for lo in _names(hidir):
                        bucket = os.path.join(hidir, lo)
                        for name in _names(bucket):
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
                q.close()
            if self._root_lock_fd >= 0:
                os.close(self._root_lock_fd)
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
        validate_queue(queue)
        validate_messages(messages, self.max_payload)
        with self._mutex:
            self._check_open()
            if self.dedup is not None:
                if self._dedup_behind:
                    self._catch_up_dedup()
                # An id older than the window may have been stored and
                # forgotten: refuse it, or it could be stored twice (A2).
                oldest = self.dedup.oldest_id_prefix()
                for m in messages:
                    if m.id < oldest:
                        raise InvalidMessage(
                            f"message {m.id} is older than the dedup window of "
                            f"{self.dedup.window:g} seconds, so it may have been stored "
                            "already; nothing was stored. Fail it at the sender"
                        )
                # Exactly once rests on the index alone: every id is looked up.
                messages = self.dedup.unseen(messages)
            if not messages:
                return []
            count = len(messages)
            nbytes = sum(len(m.payload) for m in messages)
            self._check_limits(count, nbytes)
            by_priority: dict[int, list[Message]] = {}
            for m in messages:
                by_priority.setdefault(m.priority, []).append(m)
            qpath = os.path.join(self.queues_dir, encode_queue(queue))
            synced: set[str] = set()
            written: list[tuple[str, str, BatchName]] = []
            placed: list[str] = []
            try:
                for priority in sorted(by_priority):
                    group = by_priority[priority]
                    name = BatchName(new_id(), len(group), sum(len(m.payload) for m in group))
                    if records is not None and all(m.id in records for m in group):
                        chunks = [batchfile.MAGIC, *(records[m.id] for m in group)]
                    else:
                        chunks = batchfile.encode(group)
                    tmp = write_new_file(self.tmp_dir, name.batch_id, chunks)
                    written.append((tmp, self._bucket_dir(qpath, priority, name.batch_id), name))
                for tmp, bucket, name in written:
                    if ensure_dir(bucket):
                        self._listing.forget(os.path.dirname(os.path.dirname(bucket)))
                        self._settled_dirs.add(bucket)
                    elif bucket not in self._settled_dirs:
                        self._settle_dir(bucket)
                    rename_into(tmp, bucket, str(name))
                    placed.append(os.path.join(bucket, str(name)))
                    synced.add(bucket)
                for bucket in synced:
                    fsync_dir(bucket)
            except BaseException as e:
                # All or nothing: take back what this call placed already.
                for path in placed + [tmp for tmp, _b, _n in written]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    # (chaos) A full disk is a full storage: the clear error.
                    raise self._disk_full(e) from e
                raise
            if self.dedup is not None:
                try:
                    self.dedup.record([m.id for m in messages], written[-1][2].batch_id)
                except OSError:
                    # (chaos) The batch is stored but its ids are not indexed:
                    # the resend this error brings would be stored twice.  So
                    # they are indexed before the next lookup (_catch_up_dedup);
                    # the checkpoint has not passed them, so also after a crash.
                    self._dedup_behind = True
                    raise
            with contextlib.suppress(OSError):
                self._touch_wake(qpath)  # (chaos) a hint for consumers; never fail a stored add
            if self._usage is not None:
                at, c, b = self._usage
                self._usage = (at, c + count, b + nbytes)
            return [m.id for m in messages]

    def _disk_full(self, e: OSError) -> StorageFull:
        return StorageFull(
            f"{self.path} is full: its disk has no room ({e.strerror}); nothing was "
            "stored. Retry once there is room again"
        )

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
            for fd in old._fds.values():
                os.fdatasync(fd)
        except OSError as e:
            raise self._disk_full(e) from e
        for fd in old._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        old._fds.clear()
        try:
            self.dedup = DedupIndex(old.path, window=old.window, clock=self._clock)
            self.dedup.recover(self._batches_since(self.dedup.checkpoint_ms))
        except OSError as e:
            raise self._disk_full(e) from e
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
            fsync_dir(parent)
            path = parent
        self._settled_dirs.add(bucket)
        if len(self._settled_dirs) > 10_000:
            self._settled_dirs.clear()

    @staticmethod
    def _touch_wake(qpath: str) -> None:
        """Touch the queue's ``wake`` file: consumers watch it with inotify."""
        path = os.path.join(qpath, WAKE_NAME)
        try:
            os.utime(path)
        except FileNotFoundError:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    def wake_file(self, queue: str) -> str:
        """The file whose change time moves each time ``queue`` gets messages."""
        qpath = os.path.join(self.queues_dir, encode_queue(validate_queue(queue)))
        ensure_dir(qpath)
        path = os.path.join(qpath, WAKE_NAME)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
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
                mtime = os.stat(bucket).st_mtime_ns
                state_size = os.stat(os.path.join(bucket, STATE_NAME)).st_size
            except FileNotFoundError:
                state_size = 0
                if not os.path.isdir(bucket):
                    continue
            cached = self._bucket_usage.get(bucket)
            if cached is None or cached[0] != mtime or cached[1] != state_size:
                try:
                    names = os.listdir(bucket)
                except FileNotFoundError:
                    continue
                log = StateLog(bucket)
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
            if time.time() - os.stat(path).st_mtime > USAGE_FILE_FRESH:
                return None
            with open(path, "rb") as f:
                data = json.loads(f.read())
            return int(data["messages"]), int(data["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_usage_file(self, count: int, nbytes: int) -> None:
        # Advisory figures: no sync, and a failure to write costs nothing.
        path = os.path.join(self.path, USAGE_NAME)
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # whatever the umask
            with os.fdopen(fd, "w", encoding="ascii") as f:
                json.dump({"messages": count, "bytes": nbytes, "time": time.time()}, f)
            os.replace(tmp, path)

    def _all_buckets(self) -> Iterator[str]:
        for qdir in self._listing.names(self.queues_dir):
            qpath = os.path.join(self.queues_dir, qdir)
            yield from self._buckets(qpath)

    @staticmethod
    def _priority_dirs(qpath: str) -> list[str]:
        try:
            names = os.listdir(qpath)
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
        """Claim up to ``limit`` messages of ``queue``; see ``IStorage.take``."""
        validate_queue(queue)
        if limit < 1:
            return []
        lease_s = self.default_lease if lease is None else lease
        with self._mutex:
            self._check_open()
            q = self._queue(queue)
            if not os.path.isdir(q.path):
                return []
            q.lock()
            try:
                return self._take_locked(q, limit, lease_s)
            finally:
                q.unlock()

    def _take_locked(self, q: _Queue, limit: int, lease_s: float) -> list[Message]:
        now_ms = int(self._clock() * 1000)
        expiry = now_ms + int(lease_s * 1000)
        taken: list[Message] = []
        for bucket in list(self._buckets(q.path)):
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
                log.append(lines, sync=False)
            if complete:
                self._remove_bucket_if_done(q, bucket, log)
            if len(taken) >= limit:
                break
        return taken

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
            self._cache.move_to_end(path)
            return cached
        try:
            with open(path, "rb") as f:
                data = f.read()
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
        self._cache[path] = messages
        self._cache_bytes += _cache_cost(messages)
        while self._cache_bytes > _CACHE_BYTES and len(self._cache) > 1:
            _old_path, old = self._cache.popitem(last=False)
            self._cache_bytes -= _cache_cost(old)
        return messages

    def _uncache(self, path: str) -> None:
        """Forget a cached batch (finished, removed or quarantined)."""
        old = self._cache.pop(path, None)
        if old is not None:
            self._cache_bytes -= _cache_cost(old)

    def _quarantine(
        self, path: str, reason: str, salvage: Sequence[Message] = (), name: BatchName | None = None
    ) -> None:
        """Move an unreadable file aside with its reason; keep what was readable."""
        bucket = os.path.dirname(path)
        if salvage and name is not None:
            # The readable records are a prefix of the file, so writing them
            # under the same batch id keeps their order and their state.
            good = BatchName(name.batch_id, len(salvage), sum(len(m.payload) for m in salvage))
            tmp = write_new_file(self.tmp_dir, name.batch_id, batchfile.encode(salvage))
            rename_into(tmp, bucket, str(good))
        rel = os.path.relpath(path, self.path).replace(os.sep, "_")
        target = os.path.join(self.quarantine_dir, f"{int(time.time())}-{rel}")
        why = {
            "reason": reason,
            "original": os.path.relpath(path, self.path),
            "salvaged": len(salvage),
            "time": time.time(),
        }
        tmp_why = write_new_file(
            self.tmp_dir, "why", [json.dumps(why, indent=1).encode("utf-8") + b"\n"]
        )
        os.rename(tmp_why, target + ".why")
        os.rename(path, target)
        fsync_dir(self.quarantine_dir)
        fsync_dir(bucket)
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
        names = os.listdir(bucket)
        for name in names:
            bn = BatchName.parse(name)
            if bn is None:
                continue
            if not log.state(bn.batch_id).complete(bn.count):
                return
        for name in names:
            if BatchName.parse(name) is not None:
                path = os.path.join(bucket, name)
                os.unlink(path)
                self._uncache(path)
        fsync_dir(bucket)
        for name in names:
            if BatchName.parse(name) is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(bucket, name))
        q.logs.pop(bucket, None)
        q.scans.pop(bucket, None)
        self._listing.forget(bucket)
        remove_empty_dirs(bucket, os.path.dirname(bucket))

    def maintain(self) -> None:
        """Periodic upkeep of a store's daemon: dedup checkpoint and pruning.

        Call it every second or so; the checkpoint lets consumers delete
        consumed batches and bounds the work of recovery after a crash.
        """
        with self._mutex:
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
            with open(os.path.join(self.path, "ids", "checkpoint"), "rb") as f:
                return int(f.read().strip() or b"0")
        except FileNotFoundError:
            return None if not os.path.isdir(os.path.join(self.path, "ids")) else 0
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
        with self._mutex:
            by_queue: dict[str, list[Message]] = {}
            for m in messages:
                by_queue.setdefault(self._receipt(m).queue, []).append(m)
            for queue, group in by_queue.items():
                self._write_failed(queue, group, reason)
            self._settle(messages, "F", True)

    def _write_failed(self, queue: str, messages: list[Message], reason: str) -> None:
        fdir = os.path.join(self.failed_dir, encode_queue(queue))
        ensure_dir(fdir)
        clean = [replace(m, receipt=None) for m in messages]
        name = BatchName(new_id(), len(clean), sum(len(m.payload) for m in clean))
        why = {"reason": reason, "time": time.time(), "queue": queue}
        tmp_why = write_new_file(self.tmp_dir, "why", [json.dumps(why).encode("utf-8") + b"\n"])
        tmp = write_new_file(self.tmp_dir, name.batch_id, batchfile.encode(clean))
        os.rename(tmp_why, os.path.join(fdir, f"{name.batch_id}.why"))
        os.rename(tmp, os.path.join(fdir, str(name)))
        fsync_dir(fdir)

    def _receipt(self, m: Message) -> _Receipt:
        r = m.receipt
        if not isinstance(r, _Receipt) or r.storage != id(self):
            raise UnknownMessage(
                f"message {m.id} was not taken from this storage: ack, release "
                "and fail the Message objects that take() returned"
            )
        return r

    def _settle(self, messages: Iterable[Message], op: str, sync: bool) -> None:
        with self._mutex:
            self._check_open()
            grouped: dict[str, dict[str, dict[str, list[int]]]] = {}
            for m in messages:
                r = self._receipt(m)
                grouped.setdefault(r.queue, {}).setdefault(r.bucket, {}).setdefault(
                    r.batch_id, []
                ).append(r.position)
            for queue, buckets in grouped.items():
                q = self._queue(queue)
                q.lock()
                try:
                    for bucket, batches in buckets.items():
                        log = q.log(bucket)
                        owner = (self.owner,) if op == "R" else ()
                        lines = [
                            line(op, batch_id, format_indexes(idx), *owner)
                            for batch_id, idx in batches.items()
                        ]
                        log.append(lines, sync=sync)
                finally:
                    q.unlock()

    # -- looking -----------------------------------------------------------------

    def queues(self) -> list[str]:
        """Queues holding messages, waiting or failed."""
        with self._mutex:
            names: set[str] = set()
            for top in (self.queues_dir, self.failed_dir):
                for d in os.listdir(top):
                    name = decode_queue(d)
                    if name is not None and self._has_batches(os.path.join(top, d)):
                        names.add(name)
            return sorted(names)

    def newest_batch_time(self) -> float:
        """The time in the newest batch id of any queue (0.0 if none).

        Looks only at the last bucket of each priority, so it costs a few
        listings whatever the size of the queues.
        """
        newest = ""
        with self._mutex:
            for qdir in _names(self.queues_dir):
                qpath = os.path.join(self.queues_dir, qdir)
                for p in self._priority_dirs(qpath):
                    pdir = os.path.join(qpath, p)
                    his = sorted(_names(pdir), reverse=True)
                    for hi in his[:1]:
                        los = sorted(_names(os.path.join(pdir, hi)), reverse=True)
                        for lo in los[:1]:
                            for name in _names(os.path.join(pdir, hi, lo)):
                                bn = BatchName.parse(name)
                                if bn is not None and bn.batch_id > newest:
                                    newest = bn.batch_id
        return id_time(newest) if newest else 0.0

    def queue_names(self) -> list[str]:
        """Names of the queues that have a directory; cheap (one cached listing)."""
        with self._mutex:
            names = (decode_queue(d) for d in self._listing.names(self.queues_dir))
            return [n for n in names if n is not None]

    def _has_batches(self, path: str) -> bool:
        return any(any(BatchName.parse(f) for f in files) for _root, _dirs, files in os.walk(path))

    def stats(self) -> dict[str, QueueStats]:
        """Figures for every queue; reads state logs, so it costs a walk."""
        with self._mutex:
            self._check_open()
            result = {}
            now = self._clock()
            now_ms = int(now * 1000)
            for queue in self.queues():
                qpath = os.path.join(self.queues_dir, encode_queue(queue))
                depth = nbytes = taken = 0
                oldest = 0.0
                for bucket in self._buckets(qpath):
                    log = StateLog(bucket)
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
                if os.path.isdir(fdir):
                    for name in os.listdir(fdir):
                        bn = BatchName.parse(name)
                        if bn is not None:
                            failed += bn.count
                result[queue] = QueueStats(depth, nbytes, oldest, taken, failed)
            return result

    def failed(self, queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Up to ``limit`` failed messages of ``queue`` with their reasons."""
        fdir = os.path.join(self.failed_dir, encode_queue(validate_queue(queue)))
        out: list[tuple[Message, str]] = []
        if not os.path.isdir(fdir):
            return out
        for name in sorted(os.listdir(fdir)):
            bn = BatchName.parse(name)
            if bn is None:
                continue
            try:
                with open(os.path.join(fdir, f"{bn.batch_id}.why"), "rb") as f:
                    reason = str(json.loads(f.read()).get("reason", ""))
            except (OSError, ValueError):
                reason = "(reason unreadable)"
            with open(os.path.join(fdir, name), "rb") as f:
                decoded = batchfile.decode(f.read())
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
                log = StateLog(bucket)
                log.refresh()
                for name in sorted(_names(bucket)):
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
        with self._mutex:
            self._check_open()
            q = self._queue(validate_queue(queue))
            if not os.path.isdir(q.path):
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
                    if not os.path.isdir(bucket):
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
        """Store one request's messages, channel by channel; see IReceivingStore."""
        stored: list[str] = []
        for queue, messages in batches:
            stored.extend(self.add(queue, messages, dict(records) if records else None))
        return stored

    def channel_count(self) -> int:
        """How many queue directories exist."""
        return len(self.queue_names())

    def upkeep(self) -> None:
        """The serving daemon's periodic work; see IReceivingStore."""
        self.maintain()

    # -- helpers ---------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue(name, os.path.join(self.queues_dir, encode_queue(name)))
        return q

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed(f"storage {self.path} is closed: open it again")
