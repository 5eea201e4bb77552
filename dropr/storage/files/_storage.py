"""The file-system storage: dropr's default ``IStorage``.

A small façade over pieces with one job each (the layout of the tree is in
_layout, and docs/on-disk-format.rst):

- ``Disk`` (_disk): every disk effect, replaceable by tests;
- ``BatchWriter`` (_writer): placing batch files, all or none;
- ``Taker`` (_taker) with ``QueueViews`` (_queueview): leases, acks,
  releases and fails in the state logs; removal of finished buckets;
- ``BatchReader`` (_reader): reading batch files, quarantining the damaged;
- ``FailedArea`` (_failedarea), ``UsageCounter`` (_usage), ``Inspector``
  (_inspect), recovery at open (_recovery), the dedup index (_dedup).

Every piece of cached state has one owner and a bound: listings
(``DirListing``), read batches (``BatchCache``), per-queue views, usage
figures, the dedup index's loaded slots.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from dropr._ids import new_id
from dropr._message import DEFAULT_MAX_PAYLOAD, Message, validate_messages
from dropr.errors import (
    InvalidMessage,
    StorageClosed,
    StorageFull,
    StorageLocked,
)
from dropr.interfaces import (
    IReceivingStore,
    ISpoolStorage,
    IStorage,
    IUsage,
    IWakeSource,
    QueueStats,
)
from dropr.storage import _batchfile as batchfile
from dropr.storage.files import _recovery as recovery
from dropr.storage.files._batchcache import payload_bytes
from dropr.storage.files._dedup import DedupIndex
from dropr.storage.files._dedupkeeper import DedupKeeper, indexed_until
from dropr.storage.files._dirlisting import DirListing
from dropr.storage.files._disk import REAL_DISK, Disk, disk_errors
from dropr.storage.files._durable import ensure_dir
from dropr.storage.files._failedarea import FailedArea
from dropr.storage.files._inspect import Inspector
from dropr.storage.files._layout import (
    USAGE_NAME,
    WAKE_NAME,
    Layout,
    decode_queue,
    encode_queue,
    validate_queue,
)
from dropr.storage.files._queueview import QueueViews
from dropr.storage.files._reader import BatchReader
from dropr.storage.files._taker import Taker
from dropr.storage.files._usage import USAGE_FILE_FRESH, UsageCounter
from dropr.storage.files._writer import BatchWriter
from dropr.wire import WireBatch

#: Seconds between two looks for idle queues in ``upkeep``.
_IDLE_SWEEP_EVERY = 60.0

__all__ = [
    "USAGE_FILE_FRESH",
    "USAGE_NAME",
    "WAKE_NAME",
    "FilesystemStorage",
    "decode_queue",
    "encode_queue",
    "validate_queue",
]


@implementer(IStorage, IUsage, IReceivingStore, ISpoolStorage, IWakeSource)
class FilesystemStorage:
    """Durable queues in a directory tree; see the module docstring.

    :param path: the root directory, created if missing.
    :param max_bytes: refuse ``add`` once this many payload bytes wait
        (None: no limit).  Enforced from a usage figure refreshed at most
        every ``usage_refresh`` seconds, plus what this process added since.
    :param max_messages: the same for the number of waiting messages.
    :param max_payload: the largest payload accepted, in bytes; above what a
        batch file can hold it is refused here.
    :param lease: default seconds a taken message stays claimed.
    :param sync_acks: sync the state log on ack and fail, so an acked
        message is not handed out again after a power loss.  A client spool
        can do without (a resent message is dropped by the server's dedup).
    :param dedup: keep an index of stored ids and make ``add`` idempotent by
        id (for a server store; takes the root's lock).
    :param dedup_window: seconds the dedup index remembers an id.
    :param exclusive: hold the root's lock for the life of this object;
        raise StorageLocked if another process holds it.
    :param sole_taker: this object is the only one that takes from these
        queues (a client daemon and its spool), so leases written by anyone
        else are left over from a process that is gone and count as free.
    :param idle_queue_after: ``upkeep`` removes the directory of a queue
        that holds nothing and had no add for this many seconds.
    :param clock: the wall clock (seconds since the epoch) of leases and
        bucket times; see docs/guarantees.rst for what a step of it does.
    :param disk: every disk effect goes through it (tests pass a faulty one).
    """

    log = Logger()
    #: A store of a small request is local disk work of a millisecond or
    #: two: dropr-server may run it in its reactor when idle (see
    #: dropr.server._resource.StorePlacement).
    quick_small_stores = True

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
        idle_queue_after: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
        disk: Disk = REAL_DISK,
    ) -> None:
        if max_payload > batchfile.MAX_PAYLOAD:
            raise InvalidMessage(
                f"max_payload {max_payload} is above {batchfile.MAX_PAYLOAD} bytes, the "
                "largest payload a batch file can hold; give a smaller max_payload"
            )
        self.disk = disk
        self.layout = Layout(path, disk)
        self.path = self.layout.root
        self.tmp_dir = self.layout.tmp_dir
        self.queues_dir = self.layout.queues_dir
        self.failed_dir = self.layout.failed_dir
        self.quarantine_dir = self.layout.quarantine_dir
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.max_payload = max_payload
        self.default_lease = lease
        self.sync_acks = sync_acks
        self.sole_taker = sole_taker
        self.idle_queue_after = idle_queue_after
        self._idle_swept_at = time.monotonic()
        self._clock = clock
        self._mutex = threading.RLock()
        self._closed = False
        #: Written with every lease, so an exclusive owner can tell its own.
        self.owner = os.urandom(6).hex()
        self._listing = DirListing(disk)
        self._reader = BatchReader(self.layout, disk, object())
        self._views = QueueViews(disk, self.layout.queue_dir, self._reader.cache.drop_bucket)
        # Looked up at each call, so tests can date batches by patching new_id here.
        self._writer = BatchWriter(self.layout, disk, lambda: new_id())
        self._failed = FailedArea(self.layout, disk)
        self._taker = Taker(
            self.layout,
            disk,
            self._listing,
            self._reader,
            self._views,
            clock,
            self.owner,
            sole_taker,
            lambda: indexed_until(self.layout, self.dedup),
        )
        self._usage = UsageCounter(self.layout, disk, self._all_buckets, usage_refresh)
        self._inspector = Inspector(
            self.layout,
            disk,
            self._reader,
            self._failed,
            self._taker.buckets,
            self._taker.lease_free,
        )
        self._root_lock_fd = -1
        self._dedup: DedupKeeper | None = None
        try:
            with disk_errors(self.path):
                self._open(exclusive or dedup or sole_taker, dedup, dedup_window)
        except BaseException:
            self.close()
            raise

    # -- opening, recovery and closing -----------------------------------------------

    def _open(self, lock: bool, dedup: bool, dedup_window: float) -> None:
        for d in self.layout.top_dirs():
            ensure_dir(d, disk=self.disk)
        if lock:
            self._lock_root()
        if dedup:
            self._dedup = DedupKeeper(
                self.layout.ids_dir, dedup_window, self._clock, self.disk, self._batches_since
            )
        self.recover()

    @property
    def dedup(self) -> DedupIndex | None:
        """The dedup index of a server store (None without one)."""
        return self._dedup.index if self._dedup is not None else None

    def _lock_root(self) -> None:
        fd = self.disk.open_lock(self.layout.lock_file)
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
        """Undo what a crash left behind; see _recovery.  Cheap enough for every open."""
        removed = recovery.remove_stale_tmp(self.layout, self.disk)
        if removed:
            self.log.info(
                "removed {count} half-written files from {path}", count=removed, path=self.tmp_dir
            )
        relogged = self._dedup.recover() if self._dedup is not None else 0
        return {"tmp_removed": removed, "ids_relogged": relogged}

    def _batches_since(self, ms: int) -> Iterator[tuple[str, list[str]]]:
        return recovery.batches_since(self.layout, ms, self._reader.read)

    def close(self) -> None:
        """Release locks and files; the storage is unusable afterwards."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._writer.spares.clear()
            if self._dedup is not None:
                self._dedup.close()
            self._views.close()
            if self._root_lock_fd >= 0:
                with contextlib.suppress(OSError):
                    self.disk.close(self._root_lock_fd)
                self._root_lock_fd = -1

    def __enter__(self) -> FilesystemStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed(f"storage {self.path} is closed: open it again")

    # -- adding ------------------------------------------------------------------------

    def add(
        self,
        queue: str,
        messages: Sequence[Message],
        records: Mapping[str, bytes] | None = None,
    ) -> list[str]:
        """Store ``messages`` in ``queue``, durably; see ``IStorage.add``.

        ``records`` may give, by id, a message's record already encoded as a
        batch file holds it (a server receives them so); it is written as is.
        """
        return self._store([(queue, messages)], records)

    def add_filed(self, queue: str, filed: Sequence[tuple[str, Message]]) -> list[str]:
        """Store each message as a batch of its own, named by the batch id given with it.

        For messages admitted elsewhere first (the client daemon's put log):
        filed by ids derived from their own, they take the place in the
        queue's order that their creation gives them, before anything their
        producer wrote later.  The limits are not applied again.  All or
        nothing, one sync per bucket.
        """
        return self._store(
            [(queue, [m]) for _bid, m in filed], None, [bid for bid, _m in filed], limits=False
        )

    def store(
        self,
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None = None,
    ) -> list[str]:
        """Store one request's messages, all or nothing; see IReceivingStore."""
        return self._store(batches, records)

    def _store(
        self,
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None,
        batch_ids: Sequence[str] | None = None,
        limits: bool = True,
    ) -> list[str]:
        """Store ``(queue, messages)`` pairs all or nothing; the ids stored.

        The limits are checked for the whole call, then ``BatchWriter.place``
        puts every batch file in place or none.  A refused call stores
        nothing.  A crash in the middle leaves each batch file whole or
        absent; the caller, never answered, sends again and the dedup index
        stores the rest once.
        """
        for queue, messages in batches:
            validate_queue(queue)
            validate_messages(messages, self.max_payload)
        with self._mutex, disk_errors(self.path):
            self._check_open()
            if self._dedup is not None:
                assert batch_ids is None, "a store names its own batches"
                batches = self._dedup.unseen(batches)
            if batch_ids is None:
                batches = [(q, ms) for q, ms in batches if ms]
            if not batches:
                return []
            stored = [m for _q, ms in batches for m in ms]
            count, nbytes = len(stored), sum(len(m.payload) for m in stored)
            if limits:
                self._check_limits(count, nbytes)
            written = self._writer.place(batches, records, batch_ids)
            # Durable now: wake the consumers first, the bookkeeping can wait.
            for queue, _messages in batches:
                with contextlib.suppress(OSError):
                    self._writer.touch_wake(queue)  # a hint; never fail a stored add
            if self._dedup is not None:
                self._dedup.record([m.id for m in stored], max(n.batch_id for n in written))
            self._usage.added(count, nbytes)
            return [m.id for m in stored]

    def prepare(self) -> int:
        """Get ready for the next stores, off their path: make spare files; how many.

        A store that finds a spare fills it instead of making a file (a new
        inode costs more than a small batch's write and sync; see
        _spares).  dropr-server calls this after each answer and in its
        upkeep; without it every store makes its own file, as before.
        """
        if self._closed:
            return 0
        with disk_errors(self.path):
            return self._writer.prepare()

    def _check_limits(self, count: int, nbytes: int) -> None:
        self._usage.check_limits(count, nbytes, self.max_messages, self.max_bytes)

    # -- taking and settling -------------------------------------------------------------

    def take(self, queue: str, limit: int, lease: float | None = None) -> list[Message]:
        """Claim up to ``limit`` messages of ``queue``; see ``IStorage.take``.

        All or nothing: a take that raises leaves no lease behind, so
        everything it did not return can be taken at once, in order.
        """
        validate_queue(queue)
        if limit < 1:
            return []
        lease_s = self.default_lease if lease is None else lease
        with self._mutex, disk_errors(self.path):
            self._check_open()
            return self._taker.take(queue, limit, lease_s)

    def take_wire(
        self, queue: str, limit: int, max_bytes: int, lease: float | None = None
    ) -> WireBatch | list[Message]:
        """``take``, as the records of a request body (see ``dropr.wire.WireBatch``).

        At most ``max_bytes`` of payload (one message at least).  What a
        sender forwards as it is needs no object per message.  A queue with
        a damaged batch file gets a plain ``take`` (which reports it).
        """
        validate_queue(queue)
        if limit < 1:
            return []
        lease_s = self.default_lease if lease is None else lease
        with self._mutex, disk_errors(self.path):
            self._check_open()
            batch = self._taker.take_wire(queue, limit, lease_s, max_bytes, self._guard)
            if batch is not None:
                return batch
            return self._taker.take(queue, limit, lease_s)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        with self._mutex, disk_errors(self.path):
            self._check_open()
            yield

    def ack(self, messages: Iterable[Message]) -> None:
        """Forget taken ``messages``; durable on return when ``sync_acks``.

        A message whose bucket another consumer finished and removed counts
        as acked; the others are acked whatever happened to it.
        """
        if isinstance(messages, WireBatch):
            with self._mutex, disk_errors(self.path):
                self._check_open()
                self._taker.settle_wire(messages, "A", self.sync_acks)
                self._usage.settled(len(messages), messages.nbytes)
            return
        self._settle(messages, "A", self.sync_acks)

    def release(self, messages: Iterable[Message]) -> None:
        """Hand taken ``messages`` out again (no sync: a lost release only delays)."""
        if isinstance(messages, WireBatch):
            # By the batch files' indexes: giving back needs no message
            # objects, so it works even where making them would not.
            with self._mutex, disk_errors(self.path):
                self._check_open()
                self._taker.settle_wire(messages, "R", False)
            return
        self._settle(messages, "R", False)

    def fail(self, messages: Iterable[Message], reason: str) -> None:
        """Move taken ``messages`` to the failed area with ``reason``, durably."""
        messages = list(messages)
        if not isinstance(reason, str) or not reason:
            raise InvalidMessage("fail() needs a reason: a short text saying what went wrong")
        with self._mutex, disk_errors(self.path):
            self._check_open()
            by_queue: dict[str, list[Message]] = {}
            for m in messages:
                by_queue.setdefault(self._taker.receipt(m).queue, []).append(m)
            for queue, group in by_queue.items():
                self._failed.write(queue, group, reason)
            self._taker.settle(messages, "F", True)
            self._usage.settled(len(messages), payload_bytes(messages))

    def add_failed(self, queue: str, messages: Sequence[Message], reason: str) -> None:
        """Put ``messages``, never taken from ``queue``, straight into its failed area.

        For messages refused while they waited elsewhere (the client
        daemon's memory): they go where a failed take's would, with their
        reason, durably, without a round through the queue.
        """
        if not isinstance(reason, str) or not reason:
            raise InvalidMessage("add_failed() needs a reason: a short text saying what went wrong")
        validate_queue(queue)
        with self._mutex, disk_errors(self.path):
            self._check_open()
            self._failed.write(queue, messages, reason)

    def _settle(self, messages: Iterable[Message], op: str, sync: bool) -> None:
        messages = list(messages)
        with self._mutex, disk_errors(self.path):
            self._check_open()
            self._taker.settle(messages, op, sync)
            if op == "A":
                self._usage.settled(len(messages), payload_bytes(messages))

    def remove_finished(self, queue: str, older_than: float = 0.0) -> int:
        """Delete the buckets of ``queue`` whose every message is acked or failed.

        A take does this on its way through a queue; this is for queues no
        one takes from any more.  Buckets that began less than ``older_than``
        seconds ago are kept.  Returns how many buckets were deleted.
        """
        with self._mutex, disk_errors(self.path):
            self._check_open()
            return self._taker.remove_finished(validate_queue(queue), older_than)

    def quarantine(
        self, path: str, reason: str, salvage: Sequence[Message] = (), name: Any = None
    ) -> None:
        """Move the unreadable file ``path`` aside with ``reason`` (for ``dropr fsck``).

        ``salvage``, the readable prefix of a batch named ``name``, stays in
        its bucket under the same batch id.
        """
        with self._mutex, disk_errors(self.path):
            self._reader.quarantine(path, reason, salvage, name)

    # -- upkeep ------------------------------------------------------------------------

    def maintain(self) -> None:
        """Periodic upkeep of a store's daemon: dedup checkpoint and pruning.

        Call it every second or so; the checkpoint lets consumers delete
        consumed batches and bounds the work of recovery after a crash.
        """
        dedup = self._dedup
        if dedup is None:
            return
        with dedup.checkpoint_lock:
            with self._mutex, disk_errors(self.path):
                if self._closed:
                    return
                plan = dedup.begin_maintain()
            if plan is not None:
                # The syncs of the checkpoint, outside the store's lock: a
                # store arriving meanwhile does not wait for them.
                with disk_errors(self.path):
                    dedup.index.finish_checkpoint(plan)

    def upkeep(self) -> None:
        """The serving daemon's periodic work (IReceivingStore); never raises for a full disk.

        Checkpoints and prunes the dedup index, makes spare files for the
        next stores (``prepare``) and, about once a minute,
        removes the directories of queues drained and idle for
        ``idle_queue_after`` seconds, so ``channel_count`` and the walks
        follow the live channels.
        """
        try:
            self.maintain()
            self.prepare()
            if time.monotonic() - self._idle_swept_at > _IDLE_SWEEP_EVERY:
                self._idle_swept_at = time.monotonic()
                self.remove_idle_queues()
        except StorageFull as e:
            self.log.warn("upkeep postponed: {error}", error=e)

    def remove_idle_queues(self, idle: float | None = None) -> int:
        """Remove the directories of queues with no bucket and no add for ``idle`` s."""
        with self._mutex, disk_errors(self.path):
            self._check_open()
            return self._taker.remove_idle_queues(self.idle_queue_after if idle is None else idle)

    # -- looking -----------------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """``(messages, payload bytes)`` waiting; see _usage for how fresh."""
        with self._mutex:
            return self._usage.usage()

    @property
    def usage_refresh(self) -> float:
        """Seconds the usage figures are trusted before they are counted again."""
        return self._usage.refresh

    @usage_refresh.setter
    def usage_refresh(self, seconds: float) -> None:
        self._usage.refresh = seconds

    def count_usage(self) -> tuple[int, int]:
        """Count what waits now (a walk of changed buckets) and share the figures."""
        with self._mutex:
            return self._usage.count()

    def _all_buckets(self) -> Iterator[str]:
        for _queue, qpath in self.layout.queue_dirs():
            yield from self._taker.buckets(qpath)

    def queues(self) -> list[str]:
        """Queues holding messages, waiting or failed."""
        with self._mutex:
            return self._inspector.queues()

    def queue_names(self) -> list[str]:
        """Names of the queues that have a directory; cheap (one cached listing)."""
        with self._mutex:
            names = (decode_queue(d) for d in self._listing.names(self.queues_dir))
            return [n for n in names if n is not None]

    def channel_count(self) -> int:
        """How many queue directories exist (one cached listing)."""
        return len(self.queue_names())

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, QueueStats]:
        """Figures for every queue (or those of ``queues``); reads their state logs."""
        names = None if queues is None else [validate_queue(q) for q in queues]
        with self._mutex:
            self._check_open()
            return self._inspector.stats(self._clock(), names)

    def failed(self, queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Up to ``limit`` failed messages of ``queue`` with their reasons."""
        return self._failed.messages(validate_queue(queue), limit)

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
        validate_queue(queue)
        with self._mutex:
            self._check_open()
            buckets = self._inspector.open_buckets(queue, since_ms)
        for bucket in buckets:
            with self._mutex:
                found = self._inspector.open_in(queue, bucket)
            yield from found

    # -- what dropr-server needs (IReceivingStore) and consumers (IWakeSource) ---------

    @property
    def dedup_window(self) -> float:
        """Seconds a stored id is remembered (0.0 without a dedup index)."""
        return self.dedup.window if self.dedup is not None else 0.0

    def oldest_accepted_id(self) -> str:
        """Ids sorting below this are older than the dedup window; see IReceivingStore."""
        return self.dedup.oldest_id_prefix() if self.dedup is not None else ""

    def wake_file(self, queue: str) -> str:
        """The file whose change time moves each time ``queue`` gets messages."""
        validate_queue(queue)
        with disk_errors(self.path):
            return self._writer.wake_file(queue)

    def watch(self, queue: str, callback: Callable[[], None], reactor: Any) -> Callable[[], None]:
        """Call ``callback`` in the reactor after messages were added to ``queue``.

        Watches the queue's wake file with inotify where Twisted has it (and
        its new one if upkeep removed an idle queue's directory); returns a
        function that stops the watch (a no-op without inotify, where the
        consumer's poll is the only wake-up).
        """
        from dropr.storage.files._wake import watch_wake_file

        validate_queue(queue)
        return watch_wake_file(lambda: self.wake_file(queue), callback, reactor)
