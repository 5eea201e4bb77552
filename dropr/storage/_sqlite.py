"""An ``IStorage`` in one SQLite database file.

The alternative to the file-system storage for those who would rather have
one file to back up and inspect with ``sqlite3``.  The database runs in WAL
mode with ``synchronous=FULL`` for the transactions that must survive a power
loss (add, ack when ``sync_acks``, fail), so they are durable when ``commit``
returns; takes and releases commit with ``synchronous=NORMAL``, because losing
one only hands a message out again.

Every change runs in a ``BEGIN IMMEDIATE`` transaction, which takes the
database's write lock before reading: two processes (or two storages in one
process) that take from the same queue at once are serialised, so they never
claim the same message.

Schema::

    channels   every queue holding messages, with their number (triggers);
               drained ones are removed by ``upkeep``
    messages   waiting and taken messages; ``seq`` is the insertion order,
               ``lease_until`` (ms) > now means claimed by ``claim``
    failed     failed messages with their reason
    seen       the dedup index: stored ids with their time (ms, from the id)
    totals     one row: count and payload bytes of ``messages``, kept by
               triggers so the size limits cost no scan
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from dropr._ids import id_millis, id_time
from dropr._message import DEFAULT_MAX_PAYLOAD, Message
from dropr.errors import (
    DroprError,
    InvalidMessage,
    StorageClosed,
    StorageFull,
    StorageIOError,
    StorageLocked,
)
from dropr.interfaces import (
    FailedMessage,
    IMessageAdmin,
    IReceivingStore,
    IStorage,
    IUsage,
    OpenMessage,
    QueueStats,
)
from dropr.storage._adapt import NothingLeftBehind
from dropr.storage._limits import check_room
from dropr.storage._receipts import own_receipts
from dropr.storage.files._durable import fsync_dir
from dropr.storage.files._storage import validate_queue

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    id TEXT NOT NULL,
    priority INTEGER NOT NULL,
    channel TEXT NOT NULL,
    destination TEXT,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL,
    lease_until INTEGER NOT NULL DEFAULT 0,
    claim INTEGER
);
CREATE INDEX IF NOT EXISTS messages_order ON messages (queue, priority, seq);
CREATE TABLE IF NOT EXISTS failed (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    id TEXT NOT NULL,
    priority INTEGER NOT NULL,
    channel TEXT NOT NULL,
    destination TEXT,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS failed_order ON failed (queue, seq);
CREATE TABLE IF NOT EXISTS seen (
    id BLOB PRIMARY KEY,
    ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_time ON seen (ms);
CREATE TABLE IF NOT EXISTS totals (
    k INTEGER PRIMARY KEY CHECK (k = 0),
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
CREATE TRIGGER IF NOT EXISTS messages_added AFTER INSERT ON messages BEGIN
    UPDATE totals SET count = count + 1, bytes = bytes + NEW.size WHERE k = 0;
END;
CREATE TRIGGER IF NOT EXISTS messages_removed AFTER DELETE ON messages BEGIN
    UPDATE totals SET count = count - 1, bytes = bytes - OLD.size WHERE k = 0;
END;
CREATE TABLE IF NOT EXISTS channels (
    queue TEXT PRIMARY KEY,
    count INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS channel_added AFTER INSERT ON messages BEGIN
    INSERT INTO channels (queue, count) VALUES (NEW.queue, 1)
        ON CONFLICT (queue) DO UPDATE SET count = count + 1;
END;
CREATE TRIGGER IF NOT EXISTS channel_drained AFTER DELETE ON messages BEGIN
    UPDATE channels SET count = count - 1 WHERE queue = OLD.queue;
END;
"""
#: A database made before the channels table: count its channels once.
_FILL_CHANNELS = """
INSERT OR IGNORE INTO channels (queue, count)
    SELECT queue, COUNT(*) FROM messages GROUP BY queue;
"""

#: Seconds between two prunes of the dedup index; pruning is a range delete
#: on an index, cheap, but there is no point doing it on every add.
_PRUNE_EVERY = 60.0
#: SQLite limits the number of ``?`` in one statement; stay well below.
_CHUNK = 500


def _disk_error(path: str, e: BaseException) -> BaseException:
    """A full disk or an I/O error from SQLite as dropr's error; anything else as it is."""
    code = getattr(e, "sqlite_errorcode", None)
    if not isinstance(e, sqlite3.Error) or code is None:
        return e
    if code & 0xFF == sqlite3.SQLITE_FULL:
        return StorageFull(
            f"{path} is full: its disk has no room ({e}); nothing was stored. "
            "Retry once there is room again"
        )
    if code & 0xFF == sqlite3.SQLITE_IOERR:
        return StorageIOError(
            f"{path}: the disk failed ({e}); the call did not complete, what it "
            "acknowledged before is kept. Check the disk (dmesg), then retry"
        )
    return e


@dataclass(frozen=True, slots=True)
class _Receipt:
    """Which row a taken message is, and which claim handed it out."""

    storage: object
    seq: int
    claim: int


def _chunks(items: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


#: A claim is this object's owner number, shifted, plus a count of its takes.
_CLAIM_BITS = 24


@implementer(IStorage, IUsage, IReceivingStore, IMessageAdmin)
class SQLiteStorage(NothingLeftBehind):
    """Durable queues in one SQLite database (WAL mode); see the module docstring.

    :param path: the database file, created if missing.
    :param max_bytes: refuse ``add`` once this many payload bytes wait
        (None: no limit).  Counted exactly, across processes.
    :param max_messages: the same for the number of waiting messages.
    :param max_payload: the largest payload accepted, in bytes.
    :param lease: default seconds a taken message stays claimed.
    :param sync_acks: sync the database on ack, so an acked message is not
        handed out again after a power loss.
    :param dedup: remember stored ids and make ``add`` idempotent by id; ids
        older than ``dedup_window`` are refused, since they may have been
        stored and forgotten.
    :param dedup_window: seconds the dedup index remembers an id.
    :param exclusive: hold a lock file next to the database for the life of
        this object; raise StorageLocked if another process holds it.  Not
        needed for safety (SQLite's own locking covers several processes),
        only to insist on one owner.
    :param timeout: seconds to wait for another process's write lock.
    :param clock: the time, in seconds since the epoch (tests pass a fake).
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
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.max_payload = max_payload
        self.default_lease = lease
        self.sync_acks = sync_acks
        self.dedup = dedup
        self.dedup_window = dedup_window
        self._clock = clock
        # Receipts point at this object, not at id(self): an id can be reused
        # by a later storage once this one is gone.
        self._token = object()
        # Claims carry the owner, so a listing can tell whose lease a row is.
        self._owner_number = int.from_bytes(os.urandom(4), "big")
        #: The lease owner of this object's takes (IMessageAdmin).
        self.owner = f"{self._owner_number:08x}"
        self._takes = 0
        self._mutex = threading.RLock()
        self._closed = False
        self._lock_fd = -1
        self._pruned_at = float("-inf")
        if exclusive:
            self._lock_exclusive()
        try:
            self._create_private()
            # isolation_level=None: the module must not open transactions of
            # its own; every transaction here is an explicit BEGIN IMMEDIATE.
            self._db = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except BaseException:
            self._unlock_exclusive()
            raise
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise DroprError(
                    f"{self.path}: SQLite could not switch to WAL mode (got {mode!r}); "
                    "put the database on a local file system"
                )
            self._synchronous = ""
            self._set_synchronous("FULL")
            # One transaction, so two processes opening a new file at once
            # do not both try to create the schema.
            fresh = not self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'channels'"
            ).fetchone()
            fill = _FILL_CHANNELS if fresh else ""
            self._db.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\n{fill}\nCOMMIT;")
            # The database (and WAL) file may be new: make their directory
            # entries durable too, or a power loss could lose the whole file.
            fsync_dir(os.path.dirname(self.path))
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._db.close()
            self._unlock_exclusive()
            raise

    # -- opening and closing ------------------------------------------------------

    def _create_private(self) -> None:
        # SQLite creates files world-readable (subject to umask) and gives its
        # -wal and -shm files the database's mode, so make the file 0600 first.
        # An empty file is a valid empty database.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)

    def _lock_exclusive(self) -> None:
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise StorageLocked(
                f"{self.path} is in use by pid {holder}: only one daemon may own "
                "a spool or store; stop the other one, or give this one another "
                "database file"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock_exclusive(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def close(self) -> None:
        """Close the database; the storage is unusable afterwards."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            self._db.close()
            self._unlock_exclusive()

    def __enter__(self) -> SQLiteStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed(f"storage {self.path} is closed: open it again")

    def _set_synchronous(self, level: str) -> None:
        # A per-connection setting that SQLite reads at each commit; it can
        # only change outside a transaction.
        if level != self._synchronous:
            self._db.execute(f"PRAGMA synchronous={level}")
            self._synchronous = level

    @contextmanager
    def _transaction(self, sync: bool) -> Iterator[sqlite3.Connection]:
        """A write transaction, holding the database's write lock throughout.

        ``sync`` makes the commit durable against power loss; without it the
        commit survives a crash of this process but perhaps not of the host.
        """
        self._set_synchronous("FULL" if sync else "NORMAL")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as e:
            # SQLite rolls back by itself after some errors (disk full, I/O).
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            translated = _disk_error(self.path, e)
            if translated is e:
                raise
            raise translated from e

    # -- adding ------------------------------------------------------------------

    def add(self, queue: str, messages: Sequence[Message]) -> list[str]:
        """Store ``messages`` in ``queue``, durably; see ``IStorage.add``."""
        return self.store([(queue, messages)])

    def store(
        self,
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None = None,
    ) -> list[str]:
        """Store ``(queue, messages)`` pairs in one transaction: all or nothing.

        See ``IReceivingStore.store``; ``records`` are not needed here (the
        messages are rows, not framed records).
        """
        groups = [(validate_queue(queue), list(messages)) for queue, messages in batches]
        for _queue, group in groups:
            for m in group:
                m.validate(self.max_payload)
        with self._mutex:
            self._check_open()
            now = self._clock()
            if self.dedup:
                for _queue, group in groups:
                    self._refuse_too_old(group, now)
            if not any(group for _queue, group in groups):
                return []
            with self._transaction(sync=True) as db:
                if self.dedup:
                    self._maybe_prune(db, now)
                rows = []
                for queue, group in groups:
                    for m in group:
                        if self.dedup:
                            cur = db.execute(
                                "INSERT OR IGNORE INTO seen (id, ms) VALUES (?, ?)",
                                (bytes.fromhex(m.id), id_millis(m.id)),
                            )
                            if not cur.rowcount:
                                continue
                        rows.append(
                            (
                                queue,
                                m.id,
                                m.priority,
                                m.channel,
                                m.destination,
                                len(m.payload),
                                m.payload,
                            )
                        )
                if not rows:
                    return []
                # Raising here rolls back the ids recorded above as well.
                self._check_limits(db, len(rows), sum(row[5] for row in rows))
                db.executemany(
                    "INSERT INTO messages (queue, id, priority, channel, destination, "
                    "size, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            return [row[1] for row in rows]

    # -- what dropr-server needs (IReceivingStore) -------------------------------

    def oldest_accepted_id(self) -> str:
        """Ids sorting below this are older than the dedup window; see IReceivingStore."""
        if not self.dedup:
            return ""
        return f"{max(0, int((self._clock() - self.dedup_window) * 1000)):012x}"

    def channel_count(self) -> int:
        """Channels that hold messages (kept by triggers: no scan of the messages)."""
        with self._mutex:
            self._check_open()
            (count,) = self._db.execute("SELECT COUNT(*) FROM channels").fetchone()
        return int(count)

    def usage(self) -> tuple[int, int]:
        """``(messages, payload bytes)`` waiting, from the running totals."""
        with self._mutex:
            self._check_open()
            count, nbytes = self._db.execute(
                "SELECT count, bytes FROM totals WHERE k = 0"
            ).fetchone()
        return int(count), int(nbytes)

    def upkeep(self) -> None:
        """Prune ids older than the window and forget drained channels."""
        with self._mutex:
            if self._closed:
                return
            try:
                with self._transaction(sync=False) as db:
                    if self.dedup:
                        self._maybe_prune(db, self._clock())
                    db.execute("DELETE FROM channels WHERE count <= 0")
            except sqlite3.OperationalError as e:
                # A full disk or a busy database: the next round tries again.
                self.log.warn("store upkeep waits: {error}", error=str(e))

    def _refuse_too_old(self, messages: Sequence[Message], now: float) -> None:
        # An id older than the window may have been stored and forgotten since;
        # storing it again could deliver it twice (promise A2), so refuse it.
        oldest_ms = (now - self.dedup_window) * 1000
        for m in messages:
            if id_millis(m.id) < oldest_ms:
                raise InvalidMessage(
                    f"message {m.id} is older than the dedup window of "
                    f"{self.dedup_window:g} seconds, so it may have been stored "
                    "already; nothing was stored. Fail it at the sender"
                )

    def _maybe_prune(self, db: sqlite3.Connection, now: float) -> None:
        if now - self._pruned_at < _PRUNE_EVERY:
            return
        self._pruned_at = now
        db.execute("DELETE FROM seen WHERE ms < ?", (int((now - self.dedup_window) * 1000),))

    def _check_limits(self, db: sqlite3.Connection, count: int, nbytes: int) -> None:
        if self.max_bytes is None and self.max_messages is None:
            return
        waiting, waiting_bytes = db.execute(
            "SELECT count, bytes FROM totals WHERE k = 0"
        ).fetchone()
        check_room(
            self.path, waiting, waiting_bytes, count, nbytes, self.max_messages, self.max_bytes
        )

    # -- taking and settling ------------------------------------------------------------

    def take(self, queue: str, limit: int, lease: float | None = None) -> list[Message]:
        """Claim up to ``limit`` messages of ``queue``; see ``IStorage.take``."""
        validate_queue(queue)
        if limit < 1:
            return []
        lease_s = self.default_lease if lease is None else lease
        with self._mutex:
            self._check_open()
            now_ms = int(self._clock() * 1000)
            expiry = now_ms + int(lease_s * 1000)
            # Tells this claim from a later one of the same row (see release).
            self._takes = (self._takes + 1) % (1 << _CLAIM_BITS)
            claim = (self._owner_number << _CLAIM_BITS) | self._takes
            # Not synced: a take lost to a power loss only frees the message.
            with self._transaction(sync=False) as db:
                rows = db.execute(
                    "SELECT seq, id, priority, channel, destination, payload FROM messages "
                    "WHERE queue = ? AND lease_until <= ? ORDER BY priority, seq LIMIT ?",
                    (queue, now_ms, limit),
                ).fetchall()
                for chunk in _chunks([row[0] for row in rows]):
                    db.execute(
                        f"UPDATE messages SET lease_until = ?, claim = ? "
                        f"WHERE seq IN ({','.join('?' * len(chunk))})",
                        (expiry, claim, *chunk),
                    )
        return [
            Message(
                id=msg_id,
                payload=bytes(payload),
                channel=channel,
                priority=priority,
                destination=destination,
                receipt=_Receipt(self._token, seq, claim),
            )
            for seq, msg_id, priority, channel, destination, payload in rows
        ]

    def _receipts(self, messages: Iterable[Message]) -> list[_Receipt]:
        """The receipts of ``messages``; raise before any change if one is foreign."""
        return own_receipts(messages, _Receipt, self._token)

    def ack(self, messages: Iterable[Message]) -> None:
        """Forget taken ``messages``; durable on return when ``sync_acks``.

        Acking a message twice, or one whose lease ran out and that someone
        else took meanwhile, is harmless: the work on it was done.
        """
        receipts = self._receipts(messages)
        with self._mutex:
            self._check_open()
            with self._transaction(sync=self.sync_acks) as db:
                db.executemany("DELETE FROM messages WHERE seq = ?", [(r.seq,) for r in receipts])

    def release(self, messages: Iterable[Message]) -> None:
        """Hand taken ``messages`` out again (no sync: a lost release only delays)."""
        receipts = self._receipts(messages)
        with self._mutex:
            self._check_open()
            with self._transaction(sync=False) as db:
                # Only our own claim: if the lease ran out and another consumer
                # took the message since, freeing it would hand it out a third
                # time while that consumer still works on it.
                db.executemany(
                    "UPDATE messages SET lease_until = 0, claim = NULL WHERE seq = ? AND claim = ?",
                    [(r.seq, r.claim) for r in receipts],
                )

    def fail(self, messages: Iterable[Message], reason: str) -> None:
        """Move taken ``messages`` to the failed area with ``reason``, durably."""
        if not isinstance(reason, str) or not reason:
            raise InvalidMessage("fail() needs a reason: a short text saying what went wrong")
        receipts = self._receipts(messages)
        with self._mutex:
            self._check_open()
            now = self._clock()
            with self._transaction(sync=True) as db:
                db.executemany(
                    "INSERT INTO failed (queue, id, priority, channel, destination, payload, "
                    "reason, failed_at) SELECT queue, id, priority, channel, destination, "
                    "payload, ?, ? FROM messages WHERE seq = ?",
                    [(reason, now, r.seq) for r in receipts],
                )
                db.executemany("DELETE FROM messages WHERE seq = ?", [(r.seq,) for r in receipts])

    # -- looking -----------------------------------------------------------------

    def queues(self) -> list[str]:
        """Queues holding messages, waiting or failed."""
        with self._mutex:
            self._check_open()
            rows = self._db.execute(
                "SELECT DISTINCT queue FROM messages UNION SELECT DISTINCT queue FROM failed"
            ).fetchall()
        return sorted(row[0] for row in rows)

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, QueueStats]:
        """Figures for every queue (or those of ``queues``): a scan of their rows."""
        # Given names, index lookups of each, a few hundred names at a time
        # (SQLite bounds the parameters of a statement).
        names = sorted(set(queues)) if queues is not None else []
        groups = (
            [None]
            if queues is None
            else [names[i : i + _CHUNK] for i in range(0, len(names), _CHUNK)]
        )
        waiting: list[tuple[Any, ...]] = []
        failed: dict[str, int] = {}
        with self._mutex:
            self._check_open()
            now = self._clock()
            now_ms = int(now * 1000)
            db = self._db
            # One read transaction, so the figures describe a single moment.
            db.execute("BEGIN")
            try:
                for group in groups:
                    where = (
                        "" if group is None else f"WHERE queue IN ({','.join('?' * len(group))}) "
                    )
                    args = [] if group is None else group
                    waiting += db.execute(
                        "SELECT queue, COUNT(*), SUM(size), MIN(id), SUM(lease_until > ?) "
                        f"FROM messages {where}GROUP BY queue",
                        [now_ms, *args],
                    ).fetchall()
                    failed.update(
                        db.execute(
                            f"SELECT queue, COUNT(*) FROM failed {where}GROUP BY queue", args
                        ).fetchall()
                    )
            finally:
                db.execute("COMMIT")
        result: dict[str, QueueStats] = {}
        for queue, depth, nbytes, oldest_id, taken in waiting:
            oldest = max(0.0, now - id_time(oldest_id))
            result[queue] = QueueStats(depth, nbytes, oldest, taken, failed.pop(queue, 0))
        for queue, count in failed.items():
            result[queue] = QueueStats(0, 0, 0.0, 0, count)
        return dict(sorted(result.items()))

    def failed(self, queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Up to ``limit`` failed messages of ``queue`` with their reasons, oldest first."""
        validate_queue(queue)
        with self._mutex:
            self._check_open()
            rows = self._db.execute(
                "SELECT id, priority, channel, destination, payload, reason FROM failed "
                "WHERE queue = ? ORDER BY seq LIMIT ?",
                (queue, max(0, limit)),
            ).fetchall()
        return [
            (
                Message(
                    id=msg_id,
                    payload=bytes(payload),
                    channel=channel,
                    priority=priority,
                    destination=destination,
                ),
                reason,
            )
            for msg_id, priority, channel, destination, payload, reason in rows
        ]

    # -- IMessageAdmin: for the dropr command ---------------------------------------------

    def _read(self, sql: str, queue: str) -> list[tuple[Any, ...]]:
        """The rows ``sql`` selects for ``queue`` (its one parameter)."""
        validate_queue(queue)
        with self._mutex:
            self._check_open()
            return self._db.execute(sql, (queue,)).fetchall()

    def open_messages(self, queue: str, since: float = 0.0) -> Iterator[OpenMessage]:
        """Waiting and taken messages of ``queue``, in delivery order."""
        rows = self._read(
            "SELECT seq, id, priority, channel, destination, payload, lease_until, claim "
            "FROM messages WHERE queue = ? ORDER BY priority, seq",
            queue,
        )
        for seq, msg_id, priority, channel, destination, payload, until, claim in rows:
            receipt = _Receipt(self._token, seq, claim)
            message = Message(msg_id, bytes(payload), channel, priority, destination, receipt)
            taken = claim is not None
            yield OpenMessage(
                message,
                queue,
                until / 1000.0 if taken else None,
                f"{claim >> _CLAIM_BITS:08x}" if taken else None,
                f"messages row {seq}",
            )

    def failed_messages(self, queue: str) -> Iterator[FailedMessage]:
        """The failed area of ``queue``, oldest failure first."""
        rows = self._read(
            "SELECT seq, id, priority, channel, destination, payload, reason, failed_at "
            "FROM failed WHERE queue = ? ORDER BY seq",
            queue,
        )
        for seq, msg_id, priority, channel, destination, payload, reason, failed_at in rows:
            message = Message(msg_id, bytes(payload), channel, priority, destination)
            yield FailedMessage(message, queue, reason, failed_at, f"failed row {seq}")

    def _move_failed(self, queue: str, ids: Collection[str], requeue: bool) -> list[str]:
        validate_queue(queue)
        wanted = sorted(set(ids))
        moved: list[str] = []
        with self._mutex:
            self._check_open()
            # One transaction: a message is in its queue or in the failed area.
            with self._transaction(sync=True) as db:
                for i in range(0, len(wanted), _CHUNK):
                    chunk = wanted[i : i + _CHUNK]
                    marks = ",".join("?" * len(chunk))
                    where = f"FROM failed WHERE queue = ? AND id IN ({marks})"
                    found = db.execute(f"SELECT DISTINCT id {where}", (queue, *chunk)).fetchall()
                    if requeue:
                        db.execute(
                            "INSERT INTO messages (queue, id, priority, channel, destination, "
                            "size, payload) SELECT queue, id, priority, channel, destination, "
                            f"length(payload), payload {where} ORDER BY seq",
                            (queue, *chunk),
                        )
                    db.execute(f"DELETE {where}", (queue, *chunk))
                    moved.extend(row[0] for row in found)
        return moved

    def requeue_failed(self, queue: str, ids: Collection[str]) -> list[str]:
        """Move failed messages back behind what waits in ``queue``, in one transaction."""
        return self._move_failed(queue, ids, requeue=True)

    def purge_failed(self, queue: str, ids: Collection[str]) -> list[str]:
        """Delete failed messages for good."""
        return self._move_failed(queue, ids, requeue=False)
