"""Taking and settling: leases, acks, releases and fails in the state logs.

Every change is a line appended to a bucket's state log under the queue's
lock (see _statelog).  A take is all or nothing: the leases it wrote are
released again if a later append fails.  Settling counts for every bucket
it can: a bucket that is gone held only finished messages.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import cast

from twisted.logger import Logger

from dropr._message import Message
from dropr.errors import DroprError, UnknownMessage
from dropr.storage._batchfile import BatchName
from dropr.storage.files._dirlisting import DirListing
from dropr.storage.files._disk import Disk
from dropr.storage.files._durable import remove_empty_dirs, unlink_quietly
from dropr.storage.files._layout import (
    BUCKET_SETTLE,
    LOCK_NAME,
    WAKE_NAME,
    Layout,
    bucket_end_ms,
    bucket_start_ms,
)
from dropr.storage.files._queueview import QueueView, QueueViews, release_line
from dropr.storage.files._reader import BatchReader, Receipt
from dropr.storage.files._statelog import StateLog, format_indexes, line
from dropr.wire import WireBatch

#: What a take's ``pick`` returns: the indexes taken and whether it is full,
#: or None to skip the batch file.
_Picked = tuple[list[int], bool] | None


class _NeedsTake(DroprError):
    """A batch file cannot be read as records: ``take`` must read (and report) it."""


class Taker:
    """Hands out and settles the messages of the queues of one root."""

    log = Logger()

    def __init__(
        self,
        layout: Layout,
        disk: Disk,
        listing: DirListing,
        reader: BatchReader,
        views: QueueViews,
        clock: Callable[[], float],
        owner: str,
        sole_taker: bool,
        indexed_until: Callable[[], int | None],
    ) -> None:
        self.layout = layout
        self.disk = disk
        self.listing = listing
        self.reader = reader
        self.views = views
        self.clock = clock
        self.owner = owner
        self.sole_taker = sole_taker
        self.indexed_until = indexed_until

    def buckets(self, queue_dir: str) -> Iterator[str]:
        """The buckets of a queue in delivery order, from cached listings."""
        return self.layout.buckets(queue_dir, self.listing.names)

    # -- taking ------------------------------------------------------------------------

    def take(self, queue: str, limit: int, lease_s: float) -> list[Message]:
        q = self.views.get(queue)
        if not self.disk.isdir(q.path):
            return []
        q.lock()
        try:
            self._release_pending(q)
            return self._take_locked(q, limit, lease_s)
        finally:
            q.unlock()

    def _take_locked(self, q: QueueView, limit: int, lease_s: float) -> list[Message]:
        taken: list[Message] = []

        def pick(bucket: str, bn: BatchName, free: list[int], room: int) -> _Picked:
            messages = self.reader.read(q.name, bucket, bn)
            if messages is None:
                return None  # quarantined; a salvaged copy shows up in the listing
            chosen = [i for i in free if i < len(messages)][:room]
            taken.extend([messages[i] for i in chosen])
            return chosen, False

        self._lease(q, limit, lease_s, pick)
        return taken

    def take_wire(
        self,
        queue: str,
        limit: int,
        lease_s: float,
        max_bytes: int,
        guard: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> WireBatch | None:
        """``take``, as the records of a request body; None when a file needs ``take``.

        At most ``max_bytes`` of payload, but always at least one message.
        A batch file that cannot be read as it is (damaged) makes this give
        up before any lease is written: ``take`` then reports and
        quarantines it as usual.
        """
        q = self.views.get(queue)
        if not self.disk.isdir(q.path):
            return WireBatch([], [], 0, list, (self.reader.token, queue, []))
        records: list[bytes] = []
        ids: list[str] = []
        spans: list[tuple[str, BatchName, list[int]]] = []
        channels: set[str] = set()
        nbytes = 0

        def pick(bucket: str, bn: BatchName, free: list[int], room: int) -> _Picked:
            nonlocal nbytes
            wire = self.reader.read_wire(bucket, bn)
            if wire is None:
                raise _NeedsTake()
            sizes = wire.sizes
            chosen: list[int] = []
            full = False
            for i in free[:room]:
                if nbytes + sizes[i] > max_bytes and (ids or chosen):
                    full = True
                    break
                nbytes += sizes[i]
                chosen.append(i)
            wire_records, wire_ids = wire.records, wire.ids
            records.extend([wire_records[i] for i in chosen])
            ids.extend([wire_ids[i] for i in chosen])
            if chosen:
                spans.append((bucket, bn, chosen))
                channels.update(wire.channels)
            return chosen, full

        q.lock()
        try:
            self._release_pending(q)
            try:
                self._lease(q, limit, lease_s, pick)
            except _NeedsTake:
                return None
        finally:
            q.unlock()

        def materialize() -> list[Message]:
            out: list[Message] = []
            with guard():  # the storage's lock: the reader's cache is shared
                for bucket, bn, chosen in spans:
                    messages = self.reader.read(q.name, bucket, bn)
                    if messages is None:
                        raise OSError(f"batch file {bn} of {bucket} became unreadable")
                    out.extend([messages[i] for i in chosen])
            return out

        settle = (self.reader.token, q.name, [(b, bn.batch_id, c) for b, bn, c in spans])
        return WireBatch(records, ids, nbytes, materialize, settle, channels)

    def _lease(
        self,
        q: QueueView,
        limit: int,
        lease_s: float,
        pick: Callable[[str, BatchName, list[int], int], _Picked],
    ) -> None:
        """Lease what ``pick`` chooses of the free messages, in delivery order, up to ``limit``.

        ``pick(bucket, name, free, room)`` takes up to ``room`` of the
        ``free`` indexes of a batch file and returns those it took and
        whether it is full (None: the file is to be skipped).
        """
        now_ms = int(self.clock() * 1000)
        expiry = now_ms + int(lease_s * 1000)
        dead_unless = self.owner if self.sole_taker else None
        count = 0
        full = False
        leases: list[tuple[StateLog, list[str]]] = []
        finished: list[tuple[str, StateLog]] = []
        # Lazily: a take stops at its limit, usually in the first buckets.
        for bucket in self.buckets(q.path):
            log = q.log(bucket)
            log.refresh()
            lines: list[str] = []
            complete = True
            scan = q.scan(bucket, self.listing.names(bucket))
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
                        self.reader.forget(os.path.join(bucket, scan.names[k]))
                    continue
                at_cursor = False
                complete = False
                if count >= limit or full:
                    break
                free = state.free(bn.count, now_ms, dead_unless)
                if not free:
                    continue
                picked = pick(bucket, bn, free, limit - count)
                if picked is None:
                    continue
                chosen, full = picked
                count += len(chosen)
                if chosen:
                    lines.append(line("T", bn.batch_id, expiry, format_indexes(chosen), self.owner))
            if lines:
                leases.append((log, lines))
            if complete:
                finished.append((bucket, log))
            if count >= limit or full:
                break
        self._write_leases(q, leases)
        for bucket, log in finished:
            # Upkeep on the way: a take that failed to clean up still took.
            try:
                self.remove_bucket_if_done(q, bucket, log)
            except OSError as e:
                self.log.warn("could not remove finished bucket {bucket}: {e}", bucket=bucket, e=e)

    def _write_leases(self, q: QueueView, leases: list[tuple[StateLog, list[str]]]) -> None:
        """Append each bucket's ``T`` lines; on failure release them all, then raise.

        A take that failed half-way must not keep the leases it wrote: the
        caller got nothing, and early messages would wait a lease while
        later ones go first.
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
                releases = [release_line(t) for t in lines]
                try:
                    log.append(releases, sync=False)
                except OSError:
                    q.pending_releases.append((os.path.dirname(log.path), releases))
            raise

    def _release_pending(self, q: QueueView) -> None:
        """Release the leases of an earlier failed take that could not be released then."""
        while q.pending_releases:
            bucket, releases = q.pending_releases[0]
            with contextlib.suppress(FileNotFoundError):
                q.log(bucket).append(releases, sync=False)
            q.pending_releases.pop(0)

    def lease_free(self, lease: tuple[int, str] | None, now_ms: int) -> bool:
        """True if a message under ``lease`` may be taken now.

        The sole owner of a root (a daemon holding its lock) knows that a
        lease of any other owner was left by a process that is gone.
        """
        if lease is None or lease[0] <= now_ms:
            return True
        return self.sole_taker and lease[1] != self.owner

    # -- settling ----------------------------------------------------------------------

    def receipt(self, m: Message) -> Receipt:
        r = m.receipt
        if not isinstance(r, Receipt) or r.storage is not self.reader.token:
            raise UnknownMessage(
                f"message {m.id} was not taken from this storage: ack, release "
                "and fail the Message objects that take() returned"
            )
        return r

    def settle(self, messages: Iterable[Message], op: str, sync: bool) -> None:
        """Append ``op`` (A, R or F) for ``messages``, bucket by bucket.

        Every bucket is settled that can be; the first disk error is raised
        after.  A bucket that is gone counts as settled: it is removed only
        once every message in it is acked or failed (a late ack after
        another consumer took over and finished it).
        """
        grouped: dict[str, dict[str, dict[str, list[int]]]] = {}
        token = self.reader.token
        indexes: list[int] = []
        last: Receipt | None = None
        for m in messages:
            r = m.receipt
            if r.__class__ is not Receipt or r[0] is not token:
                r = self.receipt(m)  # raises with the reason
            # Messages come in runs of one batch file, whose receipts share
            # their strings: a run costs one look-up, not three per message.
            if last is None or r[3] is not last[3] or r[2] is not last[2] or r[1] is not last[1]:
                indexes = grouped.setdefault(r[1], {}).setdefault(r[2], {}).setdefault(r[3], [])
                last = r
            indexes.append(r[4])
        self._settle_grouped(grouped, op, sync)

    def settle_wire(self, batch: WireBatch, op: str, sync: bool) -> None:
        """``settle`` for a batch ``take_wire`` made, without its message objects."""
        token, queue, spans = cast(
            tuple[object, str, list[tuple[str, str, list[int]]]], batch.settle
        )
        if token is not self.reader.token:
            raise UnknownMessage(
                "this batch was not taken from this storage: ack the batch take_wire returned"
            )
        by_bucket: dict[str, dict[str, list[int]]] = {}
        for bucket, batch_id, chosen in spans:
            by_bucket.setdefault(bucket, {}).setdefault(batch_id, []).extend(chosen)
        self._settle_grouped({queue: by_bucket}, op, sync)

    def _settle_grouped(
        self, grouped: dict[str, dict[str, dict[str, list[int]]]], op: str, sync: bool
    ) -> None:
        failure: OSError | None = None
        owner = (self.owner,) if op == "R" else ()
        for queue, buckets in grouped.items():
            q = self.views.get(queue)
            q.lock()
            try:
                for bucket, batches in buckets.items():
                    lines = [
                        line(op, batch_id, format_indexes(idx), *owner)
                        for batch_id, idx in batches.items()
                    ]
                    try:
                        q.log(bucket).append(lines, sync=sync)
                    except FileNotFoundError:
                        q.forget(bucket)
                    except OSError as e:
                        failure = failure or e
            finally:
                q.unlock()
        if failure is not None:
            raise failure

    # -- removing finished buckets -----------------------------------------------------

    def remove_bucket_if_done(self, q: QueueView, bucket: str, log: StateLog) -> None:
        """Delete a bucket whose every message is acked or failed.

        Only once its time is settled (no batch can still arrive) and the
        dedup checkpoint has passed it (its ids are durable in the index).
        Batch files go first and are synced gone before the state log goes:
        the other order could bring acked messages back after a power loss.
        """
        end_ms = bucket_end_ms(bucket)
        if end_ms is None or end_ms / 1000.0 > self.clock() - BUCKET_SETTLE:
            return
        indexed = self.indexed_until()
        if indexed is not None and end_ms > indexed:
            return
        try:
            names = self.disk.listdir(bucket)
        except FileNotFoundError:
            q.forget(bucket)
            return
        parsed = [(name, BatchName.parse(name)) for name in names]
        for _name, bn in parsed:
            if bn is not None and not log.state(bn.batch_id).complete(bn.count):
                return
        for name, bn in parsed:
            if bn is not None:
                path = os.path.join(bucket, name)
                unlink_quietly(path, self.disk)
                self.reader.forget(path)
        self.disk.sync_dir(bucket)
        for name, bn in parsed:
            if bn is None:
                unlink_quietly(os.path.join(bucket, name), self.disk)
        q.forget(bucket)
        self.listing.forget(bucket)
        remove_empty_dirs(bucket, os.path.dirname(bucket), disk=self.disk)

    def remove_finished(self, queue: str, older_than: float) -> int:
        """Delete the finished buckets of ``queue`` that began ``older_than`` s ago or more."""
        q = self.views.get(queue)
        if not self.disk.isdir(q.path):
            return 0
        cutoff_ms = int((self.clock() - older_than) * 1000)
        removed = 0
        q.lock()
        try:
            for bucket in list(self.buckets(q.path)):
                start = bucket_start_ms(bucket)
                if start is None or start > cutoff_ms:
                    continue
                log = q.log(bucket)
                log.refresh()
                self.remove_bucket_if_done(q, bucket, log)
                if not self.disk.isdir(bucket):
                    removed += 1
        finally:
            q.unlock()
        return removed

    def remove_idle_queues(self, idle_s: float) -> int:
        """Remove every queue directory that is drained and idle; how many went."""
        return sum(self.remove_idle_queue(q, idle_s) for q, _p in list(self.layout.queue_dirs()))

    def remove_idle_queue(self, queue: str, idle_s: float) -> bool:
        """Remove the directory of ``queue`` if it holds no bucket and had no add for ``idle_s``.

        Under the queue's lock: its lock file goes too (a taker holding the
        old one notices, see ``QueueView.lock``).  Empty priority and hour
        directories go with it; the failed area is kept.  True if removed.
        """
        q = self.views.get(queue)
        if not self.disk.isdir(q.path):
            return False
        q.lock()
        try:
            if any(True for _ in self.layout.buckets(q.path)):
                return False
            try:
                last_add = self.disk.stat(os.path.join(q.path, WAKE_NAME)).st_mtime
            except FileNotFoundError:
                last_add = self.disk.stat(q.path).st_mtime
            if self.clock() - last_add < idle_s:
                return False
            for pdir in self.layout.priority_dirs(q.path):
                for hi in self.disk.listdir(pdir):
                    remove_empty_dirs(os.path.join(pdir, hi), disk=self.disk)
                remove_empty_dirs(pdir, disk=self.disk)
            unlink_quietly(os.path.join(q.path, WAKE_NAME), self.disk)
            unlink_quietly(os.path.join(q.path, LOCK_NAME), self.disk)
            remove_empty_dirs(q.path, disk=self.disk)
            self.disk.sync_dir(self.layout.queues_dir)
            self.listing.forget(self.layout.queues_dir, q.path)
            return not self.disk.exists(q.path)
        finally:
            q.unlock()
