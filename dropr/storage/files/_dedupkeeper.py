"""The dedup index's life in a store: open, look-up, record, catch up, upkeep.

Promise A2 rests here.  Every id of every add is looked up (no word of the
sender skips it); an id older than the window is refused (it may have been
stored and forgotten).  When ids could not be indexed (a full disk) the
keeper is *behind*: nothing is looked up until it caught up from the disk,
and nothing is checkpointed past the unindexed batches.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from twisted.logger import Logger

from dropr._ids import advance_to
from dropr._message import Message
from dropr.errors import InvalidMessage
from dropr.storage.files._dedup import CheckpointPlan, DedupIndex
from dropr.storage.files._disk import Disk, is_disk_full
from dropr.storage.files._layout import Layout

#: Seconds between prunings of the dedup index.
PRUNE_EVERY = 3600.0

BatchesSince = Callable[[int], Iterator[tuple[str, list[str]]]]


class DedupKeeper:
    """Owns a store's ``DedupIndex`` and whether it is behind."""

    log = Logger()

    def __init__(
        self,
        path: str,
        window: float,
        clock: Callable[[], float],
        disk: Disk,
        batches_since: BatchesSince,
    ) -> None:
        self._clock = clock
        self._disk = disk
        self._batches_since = batches_since
        #: One checkpoint at a time, whichever index object is current.
        self.checkpoint_lock = threading.RLock()
        self.index = DedupIndex(
            path, window=window, clock=clock, disk=disk, checkpoint_lock=self.checkpoint_lock
        )
        # Batch ids must never fall below the checkpoint, whatever the clock
        # did while the store was closed (see ids.advance_to).
        advance_to(self.index.checkpoint_ms + 1)
        #: (chaos) Stored batches whose ids are not all indexed.
        self.behind = False
        self._pruned_at = time.monotonic()

    def recover(self) -> int:
        """Index every batch stored since the checkpoint; a full disk leaves us behind."""
        try:
            return self.index.recover(self._batches_since(self.index.checkpoint_ms))
        except OSError as e:
            if not is_disk_full(e):
                raise
            # (chaos) A daemon must start on a full disk: adds raise
            # StorageFull until the ids can be indexed (catch_up).
            self.behind = True
            self.log.warn("cannot index stored ids yet: {error}", error=e)
            return 0

    def unseen(
        self, batches: Sequence[tuple[str, Sequence[Message]]]
    ) -> list[tuple[str, list[Message]]]:
        """``batches`` less the ids already stored (and repeats within the call)."""
        if self.behind:
            self.catch_up()
        oldest = self.index.oldest_id_prefix()
        for _queue, messages in batches:
            for m in messages:
                if m.id < oldest:
                    raise InvalidMessage(
                        f"message {m.id} is older than the dedup window of "
                        f"{self.index.window:g} seconds, so it may have been "
                        "stored already; nothing was stored. Fail it at the sender"
                    )
        fresh = self.index.unseen([m for _q, ms in batches for m in ms])
        keep = {m.id: m for m in fresh}
        return [(q, [m for m in ms if keep.pop(m.id, None) is m]) for q, ms in batches]

    def record(self, ids: list[str], newest_batch_id: str) -> None:
        """Index the ids of batches now durable; on a disk error fall behind, not fail.

        The batches are stored whatever happens here: their ids are indexed
        before the next look-up (catch_up) and, after a crash, by recovery
        (the checkpoint has not passed them).
        """
        try:
            self.index.record(ids, newest_batch_id)
        except OSError as e:
            self.behind = True
            self.log.warn("stored ids not yet indexed: {error}", error=e)

    def catch_up(self) -> None:
        """(chaos) Index what was stored while the index could not be written.

        A new index object re-reads what is on disk (dropping an id a full
        disk cut short) and indexes every batch since its checkpoint, as at
        an open after a crash.  Raises while that cannot be written either.
        """
        old = self.index
        # What the old index wrote must be durable before a new checkpoint
        # can pass it.
        old.checkpoint()
        self.index = DedupIndex(
            old.path,
            window=old.window,
            clock=self._clock,
            disk=self._disk,
            checkpoint_lock=self.checkpoint_lock,
        )
        self.index.recover(self._batches_since(self.index.checkpoint_ms))
        self.behind = False
        self.log.info("indexed the ids stored while the disk was full")

    def maintain(self) -> None:
        """Checkpoint (about once a second) and prune (hourly); catch up first if behind."""
        plan = self.begin_maintain()
        if plan is not None:
            self.index.finish_checkpoint(plan)

    def begin_maintain(self) -> CheckpointPlan | None:
        """The part of ``maintain`` under the store's lock (and ``checkpoint_lock``).

        Catches up or prunes when due; returns the checkpoint left to
        finish (``index.finish_checkpoint``), which needs no store lock: its
        syncs then never hold up an add.
        """
        if self.behind:
            # (chaos) Never checkpoint an index that lacks ids.
            try:
                self.catch_up()
            except OSError as e:
                self.log.warn("still cannot index stored ids: {error}", error=e)
            return None
        if time.monotonic() - self._pruned_at > PRUNE_EVERY:
            self._pruned_at = time.monotonic()
            # The checkpoint first: pruning goes by it.
            self.index.finish_checkpoint(self.index.begin_checkpoint())
            self.index.prune()
            return None
        return self.index.begin_checkpoint()

    def close(self) -> None:
        # (chaos) A full disk must not keep the locks held: the ids not
        # checkpointed are indexed again at the next open.
        try:
            self.index.close()
        except OSError as e:
            self.log.warn("could not close the dedup index: {error}", error=e)


def indexed_until(layout: Layout, index: DedupIndex | None) -> int | None:
    """How far (ms) the dedup index of the root is durable; None for a root without one.

    A consumer deletes a finished bucket only once this has passed it, so a
    resend of its ids is still recognised.  Read from ``ids/checkpoint`` by
    processes that do not own the index.
    """
    if index is not None:
        return index.checkpoint_ms
    try:
        return int(layout.disk.read(os.path.join(layout.ids_dir, "checkpoint")).strip() or b"0")
    except FileNotFoundError:
        return None if not layout.disk.isdir(layout.ids_dir) else 0
    except (OSError, ValueError):
        return 0
