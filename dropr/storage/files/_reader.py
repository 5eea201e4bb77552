"""Reading batch files: from the cache or the disk, quarantining the unreadable."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import NamedTuple

from twisted.logger import Logger

from dropr._message import Message
from dropr.storage import _batchfile as batchfile
from dropr.storage._batchfile import BatchName
from dropr.storage.files._batchcache import BatchCache
from dropr.storage.files._disk import Disk
from dropr.storage.files._durable import rename_into, write_new_file
from dropr.storage.files._layout import Layout, why_bytes

#: Memory the cache of read batch files may use, roughly.
CACHE_BYTES = 64 * 1024 * 1024
#: Batch files the cache holds at most.
CACHE_BATCHES = 1024


class Receipt(NamedTuple):
    """Where a taken message lives; attached to it as ``Message.receipt``.

    It never changes for a message of a storage object, so the message
    objects a batch file is read into carry it from the start and a take
    hands out the cached objects themselves.
    """

    #: A token object of the storage that read it (never ``id(storage)``:
    #: an id is reused once an object is gone, and a stale receipt must not
    #: match a later storage).
    storage: object
    queue: str
    bucket: str
    batch_id: str
    position: int


class BatchReader:
    """The messages of batch files, read once and kept in a bounded cache."""

    log = Logger()

    def __init__(self, layout: Layout, disk: Disk, token: object) -> None:
        self.layout = layout
        self.disk = disk
        #: The ``storage`` of every receipt this reader makes.
        self.token = token
        self.cache = BatchCache(CACHE_BYTES, CACHE_BATCHES)

    def read(self, queue: str, bucket: str, bn: BatchName) -> list[Message] | None:
        """The messages of a batch file, from cache or disk; None if unreadable."""
        path = os.path.join(bucket, str(bn))
        cached = self.cache.get(path)
        if cached is not None:
            return cached
        try:
            data = self.disk.read(path)
        except FileNotFoundError:
            return None
        token, batch_id, new = self.token, bn.batch_id, tuple.__new__
        # Made in one comprehension, not one call per record from the codec.
        receipts = [new(Receipt, (token, queue, bucket, batch_id, i)) for i in range(bn.count)]
        decoded = batchfile.decode(data, receipts=receipts)
        if decoded.error or len(decoded.messages) != bn.count:
            reason = decoded.error or (
                f"holds {len(decoded.messages)} messages, its name says {bn.count}"
            )
            if len(decoded.messages) < bn.count:
                self.quarantine(path, reason, salvage=decoded.messages, name=bn)
                # (test_filestorage) The salvaged prefix now lies in the bucket
                # under the same batch id and indexes: hand it out in its place
                # now, not after the batches behind it (promise A3).
                return decoded.messages or None
            # else all promised messages were read; trailing bytes are harmless
        messages = decoded.messages[: bn.count]
        self.cache.put(path, messages)
        return messages

    def read_wire(self, bucket: str, bn: BatchName) -> batchfile.WireRecords | None:
        """The records of a batch file ready for the wire; None if unreadable.

        Not cached: a spool's sender reads each file once.  A damaged file is
        left to ``read``, which reports and quarantines it.
        """
        try:
            data = self.disk.read(os.path.join(bucket, str(bn)))
        except FileNotFoundError:
            return None
        return batchfile.wire_records(data, bn.count)

    def forget(self, path: str) -> None:
        """Forget a cached batch (finished, removed or quarantined)."""
        self.cache.drop(path)

    def quarantine(
        self, path: str, reason: str, salvage: Sequence[Message] = (), name: BatchName | None = None
    ) -> None:
        """Move an unreadable file aside with its reason; keep what was readable."""
        root, disk = self.layout.root, self.disk
        bucket = os.path.dirname(path)
        if salvage and name is not None:
            # The readable records are a prefix of the file, so writing them
            # under the same batch id keeps their order and their state.
            good = BatchName(name.batch_id, len(salvage), sum(len(m.payload) for m in salvage))
            encoded = batchfile.encode(salvage)
            tmp = write_new_file(self.layout.tmp_dir, name.batch_id, encoded, disk)
            rename_into(tmp, bucket, str(good), disk)
        rel = os.path.relpath(path, root).replace(os.sep, "_")
        target = os.path.join(self.layout.quarantine_dir, f"{int(time.time())}-{rel}")
        why = {
            "reason": reason,
            "original": os.path.relpath(path, root),
            "salvaged": len(salvage),
            "time": time.time(),
        }
        tmp_why = write_new_file(self.layout.tmp_dir, "why", [why_bytes(why)], disk)
        disk.rename(tmp_why, target + ".why")
        disk.rename(path, target)
        disk.sync_dir(self.layout.quarantine_dir)
        disk.sync_dir(bucket)
        self.forget(path)
        self.log.warn(
            "quarantined {original}: {reason}; {salvaged} readable messages kept in the queue",
            original=why["original"],
            reason=reason,
            salvaged=len(salvage),
        )
