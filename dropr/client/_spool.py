"""The producer's side: ``dropr.put()`` and the client spool."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from dropr._ids import new_id, new_ids
from dropr._message import (
    DEFAULT_CHANNEL,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_PRIORITY,
    Message,
    coerce_payload,
    make_message,
    validate_channel,
    validate_destination,
    validate_priority,
)
from dropr.client._notify import poke
from dropr.client._putclient import PutSocketClient, Refused, Stored
from dropr.client._putsocket import socket_path
from dropr.errors import InvalidMessage, StorageFull
from dropr.interfaces import QueueStats
from dropr.storage._spec import open_spool

#: Where ``put()`` spools when neither its argument nor ``$DROPR_SPOOL`` says.
DEFAULT_SPOOL = "/var/spool/dropr"
#: Default limits of a spool: refuse puts beyond them (see StorageFull).
DEFAULT_MAX_BYTES = 1024**3
DEFAULT_MAX_MESSAGES = 1_000_000


def default_spool_path() -> str:
    """``$DROPR_SPOOL`` if set, else ``/var/spool/dropr``."""
    return os.environ.get("DROPR_SPOOL") or DEFAULT_SPOOL


class Spool:
    """A client spool: messages waiting to be sent, one queue per destination.

    Safe to use from several threads and several processes at once; each
    ``put`` and ``put_many`` is durable when it returns.

    :param path: the spool directory (created if missing).
    :param max_bytes: payload bytes the spool may hold before ``put`` raises
        :class:`~dropr.errors.StorageFull` (None: no limit).
    :param max_messages: the same for the number of messages.
    :param max_payload: the largest payload accepted, in bytes.
    :param daemon: open as the client daemon: the only taker, holding the
        spool's lock (a second daemon on the same spool is refused).
    :param put_socket: hand single puts to the client daemon's socket
        (``put.sock`` in the spool) when it answers, so that concurrent
        puts share one sync; else, or when it does not answer within
        ``put_timeout`` seconds, write the batch file here.  By default
        on, unless ``$DROPR_PUT_SOCKET`` is ``0``.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        max_messages: int | None = DEFAULT_MAX_MESSAGES,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        lease: float = 300.0,
        daemon: bool = False,
        put_socket: bool | None = None,
        put_timeout: float = 5.0,
    ) -> None:
        self.path = os.path.abspath(path or default_spool_path())
        self._put_client: PutSocketClient | None = None
        if put_socket is None:
            put_socket = os.environ.get("DROPR_PUT_SOCKET", "1") != "0"
        if put_socket and not daemon:
            self._put_client = PutSocketClient(socket_path(self.path), put_timeout)
        self._turn: list[tuple[Message, Deferred[str]]] = []
        #: Single puts the daemon did not take, written by this process itself.
        self.written_here = 0
        self.max_payload = max_payload
        try:
            self.storage = open_spool(
                self.path,
                max_bytes=max_bytes,
                max_messages=max_messages,
                max_payload=max_payload,
                lease=lease,
                sync_acks=False,
                sole_taker=daemon,
            )
        except PermissionError as e:
            raise PermissionError(
                f"cannot use spool {self.path}: {e.strerror}. Give put() a spool= "
                "argument or set $DROPR_SPOOL to a directory this user may write"
            ) from e

    def put(
        self,
        payload: bytes | str,
        destination: str,
        channel: str = DEFAULT_CHANNEL,
        priority: int = DEFAULT_PRIORITY,
        block: float | None = None,
    ) -> str:
        """Spool one message for ``destination``; return its id once durable.

        With the client daemon running, the message goes through its put
        socket and shares a sync with the puts of other producers; without
        it, this process writes the batch file itself.
        """
        message = self._message(payload, destination, channel, priority)
        outcome = self._put_messages([message], block)[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _message(
        self, payload: bytes | str, destination: str, channel: str, priority: int
    ) -> Message:
        validate_destination(destination)
        validate_channel(channel)
        validate_priority(priority)
        data = coerce_payload(payload, self.max_payload)
        # The id is made here, not by the daemon: a put the daemon may or may
        # not have stored is written again under the same id, and the
        # server's dedup keeps one.
        return Message(new_id(), data, channel, priority, destination)

    def _put_messages(
        self, messages: list[Message], block: float | None = None
    ) -> list[str | BaseException]:
        """Make each of ``messages`` durable; its id, or why it was not stored.

        Through the daemon's socket first (pipelined, one connection); what
        it did not answer, or refused for want of room or by trouble of its
        own, is written here, each destination's messages as one batch.
        """
        results: list[str | BaseException | None] = [None] * len(messages)
        if self._put_client is not None:
            for n, answer in enumerate(self._put_client.put(messages)):
                if isinstance(answer, Stored):
                    results[n] = messages[n].id
                elif isinstance(answer, Refused) and answer.status in (400, 404, 405, 413):
                    results[n] = InvalidMessage(answer.reason)
        left: dict[str, list[int]] = {}
        for n, r in enumerate(results):
            if r is None:
                destination = messages[n].destination
                assert destination is not None
                left.setdefault(destination, []).append(n)
        for destination, indexes in left.items():
            group = [messages[n] for n in indexes]
            try:
                self._add(destination, group, block)
            except Exception as e:
                for n in indexes:
                    results[n] = e
            else:
                self.written_here += len(indexes)
                for n in indexes:
                    results[n] = messages[n].id
        if left:
            poke(self.path)
        return [r if r is not None else RuntimeError("not put") for r in results]

    def _add(self, destination: str, messages: list[Message], block: float | None) -> None:
        """Write ``messages`` as this process's own batch, waiting for room up to ``block`` s."""
        deadline = None if block is None else time.monotonic() + block
        while True:
            try:
                self.storage.add(destination, messages)
                return
            except StorageFull:
                if deadline is None or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def put_many(
        self,
        payloads: Iterable[bytes | str],
        destination: str,
        channel: str = DEFAULT_CHANNEL,
        priority: int = DEFAULT_PRIORITY,
        block: float | None = None,
    ) -> list[str]:
        """Spool several messages with one disk sync; return their ids.

        All or nothing: either every message is durable when this returns,
        or it raises and none was stored.  ``block`` (seconds) waits that
        long for room when the spool is full instead of raising at once.
        """
        validate_destination(destination)
        validate_channel(channel)
        validate_priority(priority)
        max_payload = self.max_payload
        data = [coerce_payload(p, max_payload) for p in payloads]
        if not data:
            return []
        ids = new_ids(len(data))
        # Every field was checked above: no dataclass __init__ per message.
        messages = [
            make_message(i, d, channel, priority, destination, None)
            for i, d in zip(ids, data, strict=True)
        ]
        self._add(destination, messages, block)
        poke(self.path)
        return ids

    def put_deferred(
        self,
        payload: bytes | str,
        destination: str,
        channel: str = DEFAULT_CHANNEL,
        priority: int = DEFAULT_PRIORITY,
    ) -> Deferred[str]:
        """``put`` for Twisted code: the disk sync runs in the reactor's thread pool.

        The calls made in one reactor turn are put together: one request
        pipeline to the daemon's socket, or one batch file per destination
        (one sync) written here when the daemon does not answer.
        """
        try:
            message = self._message(payload, destination, channel, priority)
        except Exception as e:
            return _failed(e)
        d: Deferred[str] = Deferred()
        if not self._turn:
            from twisted.internet import reactor

            reactor.callLater(0, self._put_turn)
        self._turn.append((message, d))
        return d

    def _put_turn(self) -> None:
        turn, self._turn = self._turn, []
        done = deferToThread(self._put_messages, [m for m, _d in turn])

        def answer(outcomes: list[str | BaseException]) -> None:
            for (_m, d), outcome in zip(turn, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    d.errback(outcome)
                else:
                    d.callback(outcome)

        def failed(failure: Any) -> None:
            for _m, d in turn:
                d.errback(failure)

        done.addCallbacks(answer, failed)

    def put_many_deferred(
        self,
        payloads: Sequence[bytes | str],
        destination: str,
        channel: str = DEFAULT_CHANNEL,
        priority: int = DEFAULT_PRIORITY,
    ) -> Deferred[list[str]]:
        """``put_many`` for Twisted code, run in the reactor's thread pool."""
        return deferToThread(self.put_many, list(payloads), destination, channel, priority)

    # The queue operations, over destinations; the client daemon uses these.

    def take(self, destination: str, limit: int, lease: float | None = None) -> list[Message]:
        """Claim up to ``limit`` messages for ``destination``, in order."""
        return self.storage.take(destination, limit, lease)

    def ack(self, messages: Iterable[Message]) -> None:
        """Forget messages the server stored."""
        self.storage.ack(messages)

    def release(self, messages: Iterable[Message]) -> None:
        """Put taken messages back, to be sent again."""
        self.storage.release(messages)

    def fail(self, messages: Iterable[Message], reason: str) -> None:
        """Move messages that cannot be delivered to the failed area."""
        self.storage.fail(messages, reason)

    def queues(self) -> list[str]:
        """Destinations with messages waiting or failed."""
        return self.storage.queues()

    def stats(self, destinations: Sequence[str] | None = None) -> dict[str, QueueStats]:
        """Figures per destination (or of ``destinations``)."""
        return self.storage.stats(destinations)

    def failed(self, destination: str, limit: int = 100) -> list[tuple[Message, str]]:
        """Failed messages for ``destination`` with their reasons."""
        return self.storage.failed(destination, limit)

    def close(self) -> None:
        """Release the spool's files."""
        if self._put_client is not None:
            self._put_client.close()
        self.storage.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_spools: dict[str, Spool] = {}
_spools_lock = threading.Lock()


def _spool(path: str | None) -> Spool:
    key = os.path.abspath(path or default_spool_path())
    with _spools_lock:
        spool = _spools.get(key)
        if spool is None:
            spool = _spools[key] = Spool(key)
        return spool


def put(
    payload: bytes | str,
    destination: str,
    channel: str = DEFAULT_CHANNEL,
    priority: int = DEFAULT_PRIORITY,
    spool: str | None = None,
) -> str:
    """Put one message in the local spool for ``destination``; return its id.

    Returns once the message is on stable storage.  ``destination`` is the
    base URL of a dropr-server (``"http://host:8080/"``); ``priority`` runs
    from 0 (first) to 9; ``spool`` defaults to ``$DROPR_SPOOL``, else
    ``/var/spool/dropr``.  Needs no reactor.
    """
    return _spool(spool).put(payload, destination, channel, priority)


def put_many(
    payloads: Iterable[bytes | str],
    destination: str,
    channel: str = DEFAULT_CHANNEL,
    priority: int = DEFAULT_PRIORITY,
    spool: str | None = None,
) -> list[str]:
    """Put several messages with one disk sync; return their ids."""
    return _spool(spool).put_many(payloads, destination, channel, priority)


def put_deferred(
    payload: bytes | str,
    destination: str,
    channel: str = DEFAULT_CHANNEL,
    priority: int = DEFAULT_PRIORITY,
    spool: str | None = None,
) -> Deferred[str]:
    """``put`` for Twisted code: returns a Deferred firing with the id.

    The write and disk sync run in the reactor's thread pool, so the reactor
    never waits for the disk; the calls of one reactor turn share a sync.
    """
    try:
        target = _spool(spool)
    except Exception as e:
        return _failed(e)
    return target.put_deferred(payload, destination, channel, priority)


def _failed(error: BaseException) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(error)
    return d
