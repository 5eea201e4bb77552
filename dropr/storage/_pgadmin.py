"""``IMessageAdmin`` of the PostgreSQL store: what the ``dropr`` command needs.

A mixin of :class:`~dropr.storage._postgres.PostgresStorage`, kept apart so
that the storage's class stays about queues.  Listing reads rows in
delivery order; requeue and purge move rows between ``failed`` and
``messages`` in one transaction, so a message is in one place or the other,
never both and never neither.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Any

from dropr._message import Message
from dropr.interfaces import FailedMessage, OpenMessage, SetAside
from dropr.storage.files._storage import validate_queue

#: A claim is the storage object's owner number, shifted, plus a count of its takes.
CLAIM_BITS = 24
#: Rows read from the database at a time while listing.
_PAGE = 500


class PostgresAdmin:
    """The ``IMessageAdmin`` methods; the storage gives ``_run``, ``_receipt`` and ``owner``."""

    owner: str
    _run: Callable[..., Any]
    _receipt: Callable[[int, int], object]

    def open_messages(self, queue: str, since: float = 0.0) -> Iterator[OpenMessage]:
        """Waiting and taken messages of ``queue``, in delivery order, a page at a time."""
        validate_queue(queue)
        after = (-1, -1)
        while True:
            rows = self._run(
                lambda conn, after=after: conn.execute(
                    "SELECT priority, seq, id, channel, destination, payload, lease_until, claim "
                    "FROM messages WHERE queue = %s AND (priority, seq) > (%s, %s) "
                    "ORDER BY priority, seq LIMIT %s",
                    (queue, after[0], after[1], _PAGE),
                ).fetchall(),
                sync=False,
            )
            for priority, seq, msg_id, channel, destination, payload, until, claim in rows:
                message = Message(
                    msg_id.hex,
                    bytes(payload),
                    channel,
                    priority,
                    destination,
                    receipt=self._receipt(seq, claim or 0),
                )
                taken = claim is not None
                yield OpenMessage(
                    message,
                    queue,
                    until / 1000.0 if taken else None,
                    f"{claim >> CLAIM_BITS:08x}" if taken else None,
                    f"messages row {seq}",
                )
            if len(rows) < _PAGE:
                return
            after = (rows[-1][0], rows[-1][1])

    def failed_messages(self, queue: str) -> Iterator[FailedMessage]:
        """The failed area of ``queue``, oldest failure first, a page at a time."""
        validate_queue(queue)
        after = -1
        while True:
            rows = self._run(
                lambda conn, after=after: conn.execute(
                    "SELECT seq, id, priority, channel, destination, payload, reason, failed_at "
                    "FROM failed WHERE queue = %s AND seq > %s ORDER BY seq LIMIT %s",
                    (queue, after, _PAGE),
                ).fetchall(),
                sync=False,
            )
            for seq, msg_id, priority, channel, destination, payload, reason, failed_at in rows:
                message = Message(msg_id.hex, bytes(payload), channel, priority, destination)
                yield FailedMessage(message, queue, reason, failed_at, f"failed row {seq}")
            if len(rows) < _PAGE:
                return
            after = rows[-1][0]

    def _move_failed(self, queue: str, ids: Collection[str], requeue: bool) -> list[str]:
        validate_queue(queue)
        wanted = sorted(set(ids))
        insert = (
            "INSERT INTO messages (queue, id, priority, channel, destination, size, payload) "
            "SELECT queue, id, priority, channel, destination, length(payload), payload "
            "FROM gone ORDER BY seq"
        )

        def work(conn: Any) -> list[str]:
            gone = (
                "WITH gone AS (DELETE FROM failed WHERE queue = %s AND id = ANY(%s::uuid[]) "
                "RETURNING *)"
            )
            if requeue:
                conn.execute(f"{gone} {insert}", (queue, wanted))
                return []
            rows = conn.execute(f"{gone} SELECT DISTINCT id FROM gone", (queue, wanted))
            return [row[0].hex for row in rows.fetchall()]

        if requeue:
            # Which of them are there, then the move; one transaction.
            def both(conn: Any) -> list[str]:
                found = conn.execute(
                    "SELECT DISTINCT id FROM failed WHERE queue = %s AND id = ANY(%s::uuid[])",
                    (queue, wanted),
                ).fetchall()
                work(conn)
                return [row[0].hex for row in found]

            return sorted(self._run(both))
        return sorted(self._run(work))

    def requeue_failed(self, queue: str, ids: Collection[str]) -> list[str]:
        """Move failed messages back behind what waits in ``queue``, in one transaction."""
        return self._move_failed(queue, ids, requeue=True)

    def purge_failed(self, queue: str, ids: Collection[str]) -> list[str]:
        """Delete failed messages for good."""
        return self._move_failed(queue, ids, requeue=False)

    def purge_processed(self, older_than: float, queue: str | None = None) -> int:
        """Nothing to do: an ack deletes its rows at once (autovacuum reclaims them)."""
        return 0

    def set_aside(self) -> list[SetAside]:
        """Nothing: the database keeps no unreadable pieces apart."""
        return []

    def purge_set_aside(self, older_than: float) -> list[SetAside]:
        """Nothing to delete."""
        return []
