"""Group commit for single puts: the client daemon's put socket.

While ``dropr-client`` runs it listens on ``<spool>/put.sock`` (owner-only).
A producer posts one message there (:mod:`dropr.client._puthttp` is the
form, the same a dropr-server accepts) instead of writing a batch file of
its own.  What arrives together is written as one batch file per
destination and priority with one sync, on the daemon's disk thread, and
every caller is answered only after that sync: a put through the socket is
as durable as one written by the producer, but eight concurrent producers
share one sync instead of paying eight.

"Together" costs no waiting: the first message after a quiet spell is
written at the end of the reactor turn it arrived in; whatever arrives
while that write syncs is written next, in one batch.

The senders are woken as the batch is handed to the disk thread, so their
take queues right behind the write on the same thread and the batch leaves
for its server at once, without the wake-up pipe or a rescan.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from dropr._message import Message
from dropr.client._puthttp import (
    CONTINUE,
    USAGE,
    ContinueNeeded,
    HTTPError,
    HTTPRequest,
    RequestParser,
    message_from_request,
    response,
)
from dropr.errors import InvalidMessage, StorageFull

SOCKET_NAME = "put.sock"
#: Messages' payload bytes waiting for their batch before new ones are refused (503).
MAX_PENDING_BYTES = 64 * 1024 * 1024
#: Requests one connection may have waiting for their answers before it is paused.
MAX_PIPELINED = 256
#: Connections at once; more are answered 503 and closed.
MAX_CONNECTIONS = 1024

#: What a group's write gives back per destination: None (stored) or the error.
Outcome = dict[str, BaseException | None]


def socket_path(spool_path: str) -> str:
    """Where the put socket of the spool at ``spool_path`` lives."""
    return os.path.join(spool_path, SOCKET_NAME)


def write_groups(
    add: Callable[[str, list[Message]], object], groups: dict[str, list[Message]]
) -> Outcome:
    """Store each destination's messages with one ``add``; runs on the disk thread.

    Should an add refuse a message as invalid, the messages of that
    destination are stored one by one, so that only the bad one is refused.
    """
    outcome: Outcome = {}
    for destination, messages in groups.items():
        try:
            add(destination, messages)
            outcome[destination] = None
        except InvalidMessage:
            for m in messages:
                try:
                    add(destination, [m])
                    outcome[m.id] = None
                except BaseException as e:
                    outcome[m.id] = e
        except BaseException as e:
            outcome[destination] = e
    return outcome


class GroupCommit:
    """Gathers messages into batches and answers each after its batch's sync.

    Up to ``max_writers`` batches sync at once: a disk serves several
    flushes in parallel much faster than one after another, so a batch
    does not wait for the previous one's sync while a writer is free.

    :param add: stores one destination's messages durably (``storage.add``);
        called on a writer thread.
    :param run: runs a callable on a writer thread, returning a Deferred.
    :param reactor: for ``callLater(0, ...)``, the end of the current turn.
    :param on_written: called with the destinations of a batch once it is
        durable and its callers are answered (the daemon wakes their
        senders then).
    """

    log = Logger()

    def __init__(
        self,
        add: Callable[[str, list[Message]], object],
        run: Callable[[Callable[[], Outcome]], Deferred[Outcome]],
        reactor: Any,
        on_written: Callable[[list[str]], None] = lambda destinations: None,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        max_writers: int = 1,
    ) -> None:
        self.add = add
        self.run = run
        self.reactor = reactor
        self.on_written = on_written
        self.max_pending_bytes = max_pending_bytes
        self.max_writers = max_writers
        self._pending: list[tuple[Message, Deferred[None]]] = []
        self._pending_bytes = 0
        self._scheduled = False
        self._writing = 0
        self._idle_waiters: list[Deferred[None]] = []
        #: Batches written and messages stored, for the log and the tests.
        self.batches = 0
        self.stored = 0

    def put(self, message: Message) -> Deferred[None]:
        """A Deferred that fires once ``message`` is durable (or fails why not)."""
        if self._pending_bytes + len(message.payload) > self.max_pending_bytes and self._pending:
            return _failed(StorageFull("the client daemon has too much waiting to be written"))
        d: Deferred[None] = Deferred()
        self._pending.append((message, d))
        self._pending_bytes += len(message.payload)
        if self._writing < self.max_writers and not self._scheduled:
            # At the end of this reactor turn: what arrived with it joins.
            self._scheduled = True
            self.reactor.callLater(0, self._write)
        return d

    def idle(self) -> Deferred[None]:
        """Fires once nothing waits and nothing is being written."""
        if not self._writing and not self._pending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _write(self) -> None:
        self._scheduled = False
        if self._writing >= self.max_writers or not self._pending:
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        groups: dict[str, list[Message]] = {}
        seen: set[str] = set()
        for m, _d in batch:
            # A producer that retried with the same id: one copy is enough.
            if m.id not in seen:
                seen.add(m.id)
                assert m.destination is not None
                groups.setdefault(m.destination, []).append(m)
        self._writing += 1
        d = self.run(lambda: write_groups(self.add, groups))
        d.addCallbacks(
            self._written, self._write_failed, callbackArgs=(batch,), errbackArgs=(batch,)
        )
        d.addBoth(lambda _: self._next(list(groups)))

    def _written(self, outcome: Outcome, batch: list[tuple[Message, Deferred[None]]]) -> None:
        self.batches += 1
        for m, d in batch:
            assert m.destination is not None
            error = outcome.get(m.id, outcome.get(m.destination))
            if error is None:
                self.stored += 1
                d.callback(None)
            else:
                d.errback(Failure(error))

    def _write_failed(self, failure: Failure, batch: list[tuple[Message, Deferred[None]]]) -> None:
        self.log.failure("writing a batch of {count} puts failed", failure, count=len(batch))
        for _m, d in batch:
            d.errback(failure)

    def _next(self, destinations: list[str]) -> None:
        self._writing -= 1
        try:
            self.on_written(destinations)
        except Exception:
            self.log.failure("waking the senders of {to} failed", to=destinations)
        # What arrived while the batch synced was read meanwhile: write it now.
        if self._pending:
            self._write()
        elif not self._writing:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)


def _failed(error: BaseException) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    d.errback(Failure(error))
    return d


def answer_for(message: Message, failure: Failure | None) -> tuple[int, dict[str, Any]]:
    """The status and JSON body answering a put."""
    if failure is None:
        return 200, {"stored": [message.id], "rejected": {}}
    error = failure.value
    if isinstance(error, StorageFull):
        return 507, {"error": str(error)}
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return 507, {"error": f"the spool's disk is full ({error.strerror}); retry later"}
    if isinstance(error, InvalidMessage):
        return 400, {"error": str(error)}
    return 500, {"error": "internal error while writing; the message was not stored"}


class PutProtocol(protocol.Protocol):
    """One producer's connection: requests in, answers out in the same order."""

    def __init__(self, factory: PutFactory) -> None:
        self.factory = factory
        self.parser = RequestParser(factory.max_payload)
        #: Answers in request order; None until known.
        self._answers: deque[list[bytes | None]] = deque()
        self._closing = False
        self._paused = False

    def _out(self) -> Any:
        return self.transport

    def connectionMade(self) -> None:
        self.factory.connections += 1
        if self.factory.connections > MAX_CONNECTIONS:
            self._closing = True
            self._out().write(
                response(503, {"error": "too many connections to the put socket; retry"}, False)
            )
            self._out().loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.connections -= 1
        self._closing = True

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        for item in self.parser.feed(data):
            if isinstance(item, ContinueNeeded):
                if not self._answers:
                    self._out().write(CONTINUE)
            elif isinstance(item, HTTPError):
                slot: list[bytes | None] = [response(item.status, {"error": item.reason}, False)]
                self._answers.append(slot)
                self._closing = True
            else:
                self._request(item)
        self._flush()

    def _request(self, request: HTTPRequest) -> None:
        slot: list[bytes | None] = [None]
        self._answers.append(slot)
        keep_alive = request.keep_alive
        if self.factory.stopping and request.method != "GET":
            # The daemon is stopping: no new work, so the stop cannot be held
            # up by producers that keep putting; they write themselves.
            slot[0] = response(
                503, {"error": "dropr-client is stopping; write the batch yourself or retry"}, False
            )
            self._closing = True
        elif request.method == "GET":
            body = {"service": "dropr-client put socket", "usage": USAGE}
            slot[0] = response(200, body, keep_alive)
        else:
            try:
                message = message_from_request(request)
            except HTTPError as e:
                slot[0] = response(e.status, {"error": e.reason}, keep_alive)
            else:
                d = self.factory.commit.put(message)

                def answered(result: object, message: Message = message) -> None:
                    failure = result if isinstance(result, Failure) else None
                    status, body = answer_for(message, failure)
                    slot[0] = response(status, body, keep_alive)
                    self._flush()

                d.addBoth(answered)
        if not keep_alive:
            self._closing = True
        if len(self._answers) > MAX_PIPELINED and not self._paused:
            self._paused = True
            self._out().pauseProducing()

    def _flush(self) -> None:
        out: list[bytes] = []
        while self._answers:
            head = self._answers[0][0]
            if head is None:
                break
            out.append(head)
            self._answers.popleft()
        if out:
            self._out().write(b"".join(out))
        if self._paused and len(self._answers) <= MAX_PIPELINED // 2:
            self._paused = False
            self._out().resumeProducing()
        if self._closing and not self._answers:
            self._out().loseConnection()


class PutFactory(protocol.Factory):
    """Makes a :class:`PutProtocol` per producer connection."""

    def __init__(self, commit: GroupCommit, max_payload: int) -> None:
        self.commit = commit
        self.max_payload = max_payload
        self.connections = 0
        #: Set at the daemon's stop: puts still arriving are answered 503.
        self.stopping = False

    def buildProtocol(self, addr: Any) -> PutProtocol:
        return PutProtocol(self)


class PutSocketService(service.Service):
    """Listens on the spool's put socket while the client daemon runs.

    :param spool_path: the spool directory (owner-only; the socket is 0600 too).
    :param add: stores one destination's messages durably, on a writer thread.
    :param run: runs a callable on a writer thread (a Deferred).
    :param on_written: wakes the senders of the destinations of a batch.
    """

    log = Logger()

    def __init__(
        self,
        spool_path: str,
        add: Callable[[str, list[Message]], object],
        run: Callable[[Callable[[], Outcome]], Deferred[Outcome]],
        reactor: Any,
        on_written: Callable[[list[str]], None],
        max_payload: int,
        max_writers: int = 1,
    ) -> None:
        self.path = socket_path(spool_path)
        self.reactor = reactor
        self.commit = GroupCommit(add, run, reactor, on_written, max_writers=max_writers)
        self.factory = PutFactory(self.commit, max_payload)
        self.port: IListeningPort | None = None
        #: Called at start (before listening), and once the socket is closed
        #: and every accepted put answered: the writer threads live between.
        self.on_start: Callable[[], None] = lambda: None
        self.on_stopped: Callable[[], None] = lambda: None

    def startService(self) -> None:
        super().startService()
        self.on_start()
        try:
            self._remove_stale()
            self.port = self.reactor.listenUNIX(
                self.path, self.factory, backlog=128, mode=0o600, wantPID=False
            )
            # listenUNIX chmods after bind; the spool directory is owner-only,
            # so no one else could reach the socket in between.
            os.chmod(self.path, 0o600)
        except Exception as e:
            # Producers then write their own batch files: slower, as safe.
            self.log.warn(
                "no put socket at {path} ({error}); producers write their own batches",
                path=self.path,
                error=str(e),
            )
            return
        self.log.info("accepting puts on {path}", path=self.path)

    def _remove_stale(self) -> None:
        # The spool's lock says no other daemon runs here, so a socket left
        # behind is a dead daemon's: nobody answers it.
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise RuntimeError(f"{self.path} exists and is not a socket: remove it")
        os.unlink(self.path)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.factory.stopping = True
        port, self.port = self.port, None
        # Stop accepting first (producers fall back to writing themselves),
        # then finish what was accepted: every caller gets its answer.
        stopped = port.stopListening() if port is not None else None
        return Deferred.fromCoroutine(self._finish(stopped))

    async def _finish(self, stopped: Any) -> None:
        if stopped is not None:
            await stopped
        await self.commit.idle()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.on_stopped()
        self.log.info(
            "put socket closed: {stored} puts written in {batches} batches",
            stored=self.commit.stored,
            batches=self.commit.batches,
        )


#: Batches that may sync at once: two overlap one's sync with the next
#: one's writing; more split the puts into smaller batches (more syncs).
WRITERS = 2


def put_socket_for(
    spool: Any, reactor: Any, wake: Callable[[list[str]], None], writers: int = WRITERS
) -> PutSocketService:
    """The put socket of a client daemon's ``spool``.

    Each writer thread stores through a spool object of its own, as a
    producer process would, so that their syncs overlap.
    """
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    from dropr.client._spool import Spool

    template = spool.storage
    pool = ThreadPool(minthreads=0, maxthreads=writers, name="dropr-put")
    local = threading.local()
    opened: list[Spool] = []
    lock = threading.Lock()

    def add(destination: str, messages: list[Message]) -> object:
        mine = getattr(local, "spool", None)
        if mine is None:
            mine = local.spool = Spool(
                spool.path,
                max_bytes=template.max_bytes,
                max_messages=template.max_messages,
                max_payload=template.max_payload,
                put_socket=False,
            )
            with lock:
                opened.append(mine)
        return mine.storage.add(destination, messages)

    def run(f: Callable[[], Outcome]) -> Deferred[Outcome]:
        return deferToThreadPool(reactor, pool, f)

    def stopped() -> None:
        pool.stop()
        with lock:
            for mine in opened:
                mine.close()

    service = PutSocketService(
        spool.path, add, run, reactor, wake, template.max_payload, max_writers=writers
    )
    service.on_start = pool.start
    service.on_stopped = stopped
    return service
