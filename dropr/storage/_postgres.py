"""A store in PostgreSQL, shared by several dropr-servers and consumers on any host.

Exactly once rests on one transaction per request: the ids go into the dedup
table ``seen`` (``INSERT … ON CONFLICT DO NOTHING RETURNING``), only the ids
it returned go into ``messages``, the limits are checked, and the commit
(WAL flushed, on a synchronous standby too where one is configured) is the
moment the server may answer "stored".  A resend that reaches another server
finds its ids in ``seen`` and stores nothing.

Consumers claim with ``SELECT … FOR UPDATE SKIP LOCKED`` in delivery order
(``ORDER BY priority, seq``) and write a lease (``lease_until``, in ms of the
storage's clock) and a claim token; the token is their receipt, so a release
after the lease ran out and someone else took the message frees nothing.

Every call runs its blocking work on a connection from a pool (sized to the
caller's thread pool); a database that cannot be reached raises
``StorageUnavailable``, which dropr-server answers with 503.  The layout is
in ``_pgschema`` and docs/storages.rst.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from zope.interface import implementer

from dropr._ids import id_millis, id_time
from dropr._message import DEFAULT_MAX_PAYLOAD, Message, validate_messages
from dropr.errors import (
    InvalidMessage,
    StorageUnavailable,
)
from dropr.interfaces import (
    IMessageAdmin,
    IReceivingStore,
    IStorage,
    IUsage,
    IWakeSource,
    QueueStats,
)
from dropr.storage import _pgschema as schema_
from dropr.storage._limits import check_room
from dropr.storage._pgadmin import CLAIM_BITS, PostgresAdmin
from dropr.storage._pgconn import Conn, PgConnections
from dropr.storage._pgschema import DedupDays
from dropr.storage._pgwatch import Watcher
from dropr.storage._receipts import own_receipts
from dropr.storage.files._storage import validate_queue

#: Seconds between two looks at the partitions of the dedup table in upkeep.
_PARTITIONS_EVERY = 60.0
#: Days kept beyond the window before a partition is dropped: servers whose
#: clocks differ by less than this never drop a day another still accepts.
_PRUNE_MARGIN_DAYS = 1
#: Seconds ``channel_count`` reuses its figure.
_CHANNELS_EVERY = 1.0

_SELECT_QUEUES = """
WITH RECURSIVE q AS (
    (SELECT queue FROM {table} ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT t.queue FROM {table} t WHERE t.queue > q.queue ORDER BY t.queue LIMIT 1)
    FROM q WHERE q.queue IS NOT NULL
)
SELECT queue FROM q WHERE queue IS NOT NULL
"""


# One request in one statement: the rows come in as arrays (binary, ``%b``),
# ``seen`` takes the ids it has not got and returns them, and only those
# rows go into ``messages``, in the given order (``seq`` is the delivery
# order within a priority).
_INPUT = """
WITH input AS (
    SELECT * FROM unnest(%b::text[], %b::uuid[], %b::integer[], %b::smallint[],
                         %b::text[], %b::text[], %b::bytea[])
    WITH ORDINALITY AS t(queue, id, day, priority, channel, destination, payload, n)
)"""
_STORE = (
    _INPUT
    + """, new AS (
    -- In id order: two requests with the same ids lock them in one order, no deadlock.
    INSERT INTO seen (id, day) SELECT id, day FROM input ORDER BY id
    ON CONFLICT DO NOTHING RETURNING id
)
INSERT INTO messages (queue, id, priority, channel, destination, size, payload)
SELECT queue, id, priority, channel, destination, length(payload), payload
FROM input JOIN new USING (id) ORDER BY n
RETURNING id"""
)
_STORE_NO_DEDUP = (
    _INPUT
    + """
INSERT INTO messages (queue, id, priority, channel, destination, size, payload)
SELECT queue, id, priority, channel, destination, length(payload), payload
FROM input ORDER BY n
RETURNING id"""
)


@dataclass(frozen=True, slots=True)
class _Receipt:
    """Which row a taken message is, and which claim handed it out."""

    storage: object
    seq: int
    claim: int


def _uuid(message_id: str) -> uuid.UUID:
    return uuid.UUID(hex=message_id)


@implementer(IStorage, IUsage, IReceivingStore, IWakeSource, IMessageAdmin)
class PostgresStorage(PgConnections, PostgresAdmin):
    """Durable queues in a PostgreSQL database; see the module docstring.

    :param spec: a libpq URL (``postgresql://user@host:port/dbname``);
        the password may be in it, in a service file or in ``PGPASSFILE``.
    :param schema: the schema holding this store's tables (created if missing).
    :param pool_size: connections kept at most; give the size of the thread
        pool that calls this storage.
    :param connect_timeout: seconds to wait for a connection before raising
        ``StorageUnavailable``.
    :param notify: send a ``NOTIFY`` after each add, for ``watch``.

    The other keywords mean what they mean for the other storages:
    ``max_bytes``, ``max_messages`` (checked against running totals, so
    servers adding at the same instant may pass them by one request each),
    ``max_payload``, ``lease``, ``sync_acks``, ``dedup``, ``dedup_window``
    and ``clock``.
    """

    def __init__(
        self,
        spec: str,
        *,
        schema: str = "dropr",
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        max_bytes: int | None = None,
        max_messages: int | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        lease: float = 60.0,
        sync_acks: bool = True,
        dedup: bool = True,
        dedup_window: float = 7 * 86400.0,
        notify: bool = True,
        clock: Callable[[], float] = time.time,
        **ignored: object,
    ) -> None:
        # ``exclusive`` and ``sole_taker`` mean nothing here: many servers and
        # consumers share a database by design.
        ignored.pop("exclusive", None)
        ignored.pop("sole_taker", None)
        if ignored:
            raise TypeError(f"PostgresStorage got unknown options {sorted(ignored)}")
        PgConnections.__init__(
            self, spec, schema_.validate_schema(schema), pool_size, connect_timeout
        )
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.max_payload = max_payload
        self.default_lease = lease
        self.sync_acks = sync_acks
        self.dedup = dedup
        self._window = dedup_window
        self.notify = notify
        self._clock = clock
        # Receipts point at this object, never at id(self), which a later
        # storage may reuse.
        self._token = object()
        # Claims carry the owner, so a listing can tell whose lease a row is.
        self._owner_number = int.from_bytes(os.urandom(4), "big")
        #: The lease owner of this object's takes (IMessageAdmin).
        self.owner = f"{self._owner_number:08x}"
        self._takes = itertools.count(1)
        self._days = DedupDays(self.schema, self._run)
        self._days_checked = float("-inf")
        self._watchers: list[Watcher] = []
        self._channels: tuple[float, int] | None = None
        self._notify_channel = f"dropr_{self.schema}"
        # A connection of its own first, so a wrong password or host is
        # reported as libpq says it, not as a pool that timed out.
        try:
            with self._connect() as conn:
                schema_.migrate(conn, self.schema)
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise self._unavailable(e) from None

    def close(self) -> None:
        """Stop watches and close the pool; the storage is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        for w in self._watchers:
            w.stop()
        self._close_pool()

    def __enter__(self) -> PostgresStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- adding ------------------------------------------------------------------

    def add(self, queue: str, messages: Sequence[Message]) -> list[str]:
        """Store ``messages`` in ``queue`` in one transaction; see ``IStorage.add``."""
        return self.store([(queue, messages)])

    def store(
        self,
        batches: Sequence[tuple[str, Sequence[Message]]],
        records: Mapping[str, bytes] | None = None,
    ) -> list[str]:
        """Store one request's messages, every channel in one transaction."""
        lists = [(validate_queue(q), list(ms)) for q, ms in batches]
        for _, messages in lists:
            validate_messages(messages, self.max_payload)
        every = [m for _, ms in lists for m in ms]
        if self.dedup:
            self._refuse_too_old(every)
            self._days.ensure({id_millis(m.id) // schema_.MS_PER_DAY for m in every})
        if not every:
            return []

        # Each id once (the first copy wins), then one statement does it all.
        unique = list({m.id: (q, m) for q, ms in reversed(lists) for m in reversed(ms)}.values())
        unique.reverse()
        params = (
            [q for q, _ in unique],
            [_uuid(m.id) for _, m in unique],
            [id_millis(m.id) // schema_.MS_PER_DAY for _, m in unique],
            [m.priority for _, m in unique],
            [m.channel for _, m in unique],
            [m.destination for _, m in unique],
            [m.payload for _, m in unique],
        )
        statement = _STORE if self.dedup else _STORE_NO_DEDUP

        def work(conn: Conn) -> set[str]:
            rows = conn.execute(statement, params).fetchall()
            stored = {row[0].hex for row in rows}
            if stored:
                # Raising here rolls back the ids recorded in ``seen`` as well.
                self._check_limits(
                    conn, len(stored), sum(len(m.payload) for _, m in unique if m.id in stored)
                )
            return stored

        try:
            stored = self._run(work, idempotent=self.dedup)
        except psycopg.errors.CheckViolation:
            # No partition for a day this process thought had one (another
            # process pruned it, or made it in a transaction that rolled back).
            self._days.forget()
            self._days.ensure({id_millis(m.id) // schema_.MS_PER_DAY for m in every})
            stored = self._run(work, idempotent=self.dedup)
        if self.notify and stored:
            self._notify_added(sorted({q for q, m in unique if m.id in stored}))
        return [m.id for _, m in unique if m.id in stored]

    def _refuse_too_old(self, messages: Sequence[Message]) -> None:
        # An id older than the window may have been stored and forgotten since;
        # storing it again could deliver it twice (promise A2), so refuse it.
        oldest = self.oldest_accepted_id()
        for m in messages:
            if m.id < oldest:
                raise InvalidMessage(
                    f"message {m.id} is older than the dedup window of "
                    f"{self._window:g} seconds, so it may have been stored "
                    "already; nothing was stored. Fail it at the sender"
                )

    def _check_limits(self, conn: Conn, count: int, nbytes: int) -> None:
        if self.max_bytes is None and self.max_messages is None:
            return
        # The totals include this transaction's own insert already.
        row = conn.execute(
            "SELECT coalesce(sum(count), 0), coalesce(sum(bytes), 0) FROM usage"
        ).fetchone()
        waiting, waiting_bytes = (int(row[0]) - count, int(row[1]) - nbytes) if row else (0, 0)
        check_room(
            self.where, waiting, waiting_bytes, count, nbytes, self.max_messages, self.max_bytes
        )

    def _notify_added(self, queues: Sequence[str]) -> None:
        # After the commit, in a transaction of its own that does not wait for
        # a WAL flush: NOTIFY serialises the commits that carry one, and a
        # lost wake-up only delays a consumer until its next poll.
        try:
            with self._transaction(sync=False) as conn:
                for queue in sorted(set(queues)):
                    conn.execute("SELECT pg_notify(%s, %s)", (self._notify_channel, queue))
        except StorageUnavailable:
            pass

    # -- taking and settling ----------------------------------------------------------

    def take(self, queue: str, limit: int, lease: float | None = None) -> list[Message]:
        """Claim up to ``limit`` messages of ``queue``; see ``IStorage.take``."""
        validate_queue(queue)
        if limit < 1:
            return []
        lease_s = self.default_lease if lease is None else lease
        now_ms = int(self._clock() * 1000)
        # Tells this claim from a later one of the same row (see release).
        takes = next(self._takes) % (1 << CLAIM_BITS)
        claim = (self._owner_number << CLAIM_BITS) | takes

        def work(conn: Conn) -> list[tuple[Any, ...]]:
            return conn.execute(
                "WITH picked AS (SELECT seq FROM messages WHERE queue = %s AND lease_until <= %s "
                "ORDER BY priority, seq LIMIT %s FOR UPDATE SKIP LOCKED) "
                "UPDATE messages m SET lease_until = %s, claim = %s FROM picked "
                "WHERE m.seq = picked.seq "
                "RETURNING m.seq, m.id, m.priority, m.channel, m.destination, m.payload",
                (queue, now_ms, limit, now_ms + int(lease_s * 1000), claim),
            ).fetchall()

        # Not synced: a take lost to a crash only frees the message again.
        rows = sorted(self._run(work, sync=False), key=lambda r: (r[2], r[0]))
        return [
            Message(
                id=msg_id.hex,
                payload=bytes(payload),
                channel=channel,
                priority=priority,
                destination=destination,
                receipt=_Receipt(self._token, seq, claim),
            )
            for seq, msg_id, priority, channel, destination, payload in rows
        ]

    def _receipt(self, seq: int, claim: int) -> _Receipt:
        return _Receipt(self._token, seq, claim)

    def _receipts(self, messages: Iterable[Message]) -> list[_Receipt]:
        """The receipts of ``messages``; raise before any change if one is foreign."""
        return own_receipts(messages, _Receipt, self._token)

    def ack(self, messages: Iterable[Message]) -> None:
        """Forget taken ``messages``; durable on return when ``sync_acks``.

        Acking twice, or after the lease ran out and another consumer took
        the message, is harmless: the work on it was done.
        """
        seqs = [r.seq for r in self._receipts(messages)]
        if seqs:
            self._run(
                lambda conn: conn.execute("DELETE FROM messages WHERE seq = ANY(%s)", (seqs,)),
                sync=self.sync_acks,
            )

    def release(self, messages: Iterable[Message]) -> None:
        """Hand taken ``messages`` out again, if the claim is still ours."""
        receipts = self._receipts(messages)
        if receipts:
            self._run(
                lambda conn: conn.execute(
                    "UPDATE messages SET lease_until = 0, claim = NULL "
                    "FROM unnest(%s::bigint[], %s::bigint[]) AS r(seq, claim) "
                    "WHERE messages.seq = r.seq AND messages.claim = r.claim",
                    ([r.seq for r in receipts], [r.claim for r in receipts]),
                ),
                sync=False,
            )

    def fail(self, messages: Iterable[Message], reason: str) -> None:
        """Move taken ``messages`` to the failed area with ``reason``, durably."""
        if not isinstance(reason, str) or not reason:
            raise InvalidMessage("fail() needs a reason: a short text saying what went wrong")
        # Each row once, in the order given.
        seqs = list(dict.fromkeys(r.seq for r in self._receipts(messages)))
        if not seqs:
            return
        now = self._clock()
        self._run(
            lambda conn: conn.execute(
                # The failed area keeps the order the messages were given in.
                "WITH gone AS (DELETE FROM messages WHERE seq = ANY(%s) RETURNING *) "
                "INSERT INTO failed (queue, id, priority, channel, destination, payload, "
                "reason, failed_at) SELECT queue, id, priority, channel, destination, payload, "
                "%s, %s FROM gone JOIN unnest(%s::bigint[]) WITH ORDINALITY AS o(seq, n) "
                "USING (seq) ORDER BY n",
                (seqs, reason, now, seqs),
            )
        )

    # -- looking -----------------------------------------------------------------

    def queues(self) -> list[str]:
        """Queues holding messages, waiting or failed (two skip scans of indexes)."""

        def work(conn: Conn) -> set[str]:
            names: set[str] = set()
            for table in ("messages", "failed"):
                query = sql.SQL(_SELECT_QUEUES).format(table=sql.Identifier(table))
                names.update(row[0] for row in conn.execute(query).fetchall())
            return names

        return sorted(self._run(work, sync=False))

    def stats(self, queues: Sequence[str] | None = None) -> dict[str, QueueStats]:
        """Figures for every queue (or those of ``queues``): a scan of their rows."""
        now = self._clock()
        now_ms = int(now * 1000)
        names = None if queues is None else sorted(set(queues))

        def work(conn: Conn) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
            # One snapshot, so the figures describe a single moment.
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            # Given names, an index lookup of each instead of a scan of all.
            where = "" if names is None else "WHERE queue = ANY(%s) "
            args: tuple[Any, ...] = (now_ms,) if names is None else (now_ms, names)
            waiting = conn.execute(
                "SELECT queue, count(*), sum(size), min(id::text), "
                "count(*) FILTER (WHERE lease_until > %s) FROM messages "
                f"{where}GROUP BY queue",
                args,
            ).fetchall()
            failed = conn.execute(
                f"SELECT queue, count(*) FROM failed {where}GROUP BY queue",
                () if names is None else (names,),
            ).fetchall()
            return waiting, {q: int(n) for q, n in failed}

        waiting, failed = self._run(work, sync=False)
        result: dict[str, QueueStats] = {}
        for queue, depth, nbytes, oldest_id, taken in waiting:
            oldest = max(0.0, now - id_time(str(oldest_id).replace("-", "")))
            result[queue] = QueueStats(
                int(depth), int(nbytes), oldest, int(taken), failed.pop(queue, 0)
            )
        for queue, count in failed.items():
            result[queue] = QueueStats(0, 0, 0.0, 0, count)
        return dict(sorted(result.items()))

    def failed(self, queue: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Up to ``limit`` failed messages of ``queue`` with their reasons, oldest first."""
        validate_queue(queue)
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT id, priority, channel, destination, payload, reason FROM failed "
                "WHERE queue = %s ORDER BY seq LIMIT %s",
                (queue, max(0, limit)),
            ).fetchall(),
            sync=False,
        )
        return [
            (Message(i.hex, bytes(payload), channel, priority, destination), reason)
            for i, priority, channel, destination, payload, reason in rows
        ]

    def usage(self) -> tuple[int, int]:
        """``(messages, payload bytes)`` waiting, from the sharded running totals."""
        row = self._run(
            lambda conn: conn.execute(
                "SELECT coalesce(sum(count), 0), coalesce(sum(bytes), 0) FROM usage"
            ).fetchone(),
            sync=False,
        )
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # -- what dropr-server needs (IReceivingStore) --------------------------------------

    @property
    def dedup_window(self) -> float:
        """Seconds a stored id is remembered (0.0 without dedup)."""
        return self._window if self.dedup else 0.0

    def oldest_accepted_id(self) -> str:
        """Ids sorting below this are older than the dedup window; see IReceivingStore."""
        if not self.dedup:
            return ""
        return f"{max(0, int((self._clock() - self._window) * 1000)):012x}"

    def channel_count(self) -> int:
        """How many channels hold messages, waiting or failed; at most a second old.

        The server asks before every request; the count comes from the
        database once a second, not on every request.
        """
        now = time.monotonic()
        if self._channels is None or now - self._channels[0] >= _CHANNELS_EVERY:
            self._channels = (now, len(self.queues()))
        return self._channels[1]

    def upkeep(self) -> None:
        """Make the dedup table's partitions for today and tomorrow; drop expired ones.

        Looks at the catalog at most once a minute.  Drained channels need no
        removal: a channel is only its rows.
        """
        now = self._clock()
        if now - self._days_checked < _PARTITIONS_EVERY or not self.dedup:
            return
        self._days_checked = now
        today = int(now * 1000) // schema_.MS_PER_DAY
        self._days.forget()
        self._days.ensure({today, today + 1})
        oldest_day = int((now - self._window) * 1000) // schema_.MS_PER_DAY
        if not self._days.prune(keep_from=oldest_day - _PRUNE_MARGIN_DAYS):
            self._days_checked = float("-inf")  # try again at the next upkeep

    # -- wake-ups (IWakeSource) -------------------------------------------------------

    def watch(self, queue: str, callback: Callable[[], None], reactor: Any) -> Callable[[], None]:
        """Call ``callback`` in the reactor thread after an add to ``queue`` commits.

        LISTEN on a connection of its own, in a thread; a notification lost
        while the database restarts only delays a consumer until its poll.
        """
        watcher = Watcher(
            self.spec, self._notify_channel, queue, lambda: reactor.callFromThread(callback)
        )
        self._watchers.append(watcher)

        def stop() -> None:
            watcher.stop()
            if watcher in self._watchers:
                self._watchers.remove(watcher)

        return stop
