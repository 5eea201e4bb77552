"""Group commit for single puts: the client daemon's put socket.

While ``dropr-client`` runs it listens on ``<spool>/put.sock`` (owner-only).
A producer posts one message there (:mod:`dropr.client._puthttp` is the
form, the same a dropr-server accepts) instead of writing a batch file of
its own.  What arrives together is appended to the daemon's put log
(:mod:`dropr.client._putlog`) with one ``fdatasync``, on the daemon's writer
thread, and every caller is answered only after that sync: a put through
the socket is as durable as one written by the producer, and everything
that arrived together shares one flush, without a new file, a rename or a
directory sync.

"Together" costs no waiting: the first message after a quiet spell is
written at the end of the reactor turn it arrived in; whatever arrives
while that write syncs is written next, in one go.

Once written, the messages are handed to their senders in memory
(:mod:`dropr.client._front`): they leave for their server at once, without
a wake-up, a take from the spool or a read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from dropr._message import Message
from dropr.client._front import FrontedSpool
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
from dropr.client._putlog import PutLog, Segment
from dropr.errors import StorageFull
from dropr.storage._limits import check_room

SOCKET_NAME = "put.sock"
#: Messages' payload bytes waiting for their batch before new ones are refused (503).
MAX_PENDING_BYTES = 64 * 1024 * 1024
#: Requests one connection may have waiting for their answers before it is paused.
MAX_PIPELINED = 256
#: Connections at once; more are answered 503 and closed.
MAX_CONNECTIONS = 1024

#: Writes a group of messages durably on the writer thread; its token
#: (the put log's segment) goes to ``on_written``.
Write = Callable[[list[Message]], object]


def socket_path(spool_path: str) -> str:
    """Where the put socket of the spool at ``spool_path`` lives."""
    return os.path.join(spool_path, SOCKET_NAME)


class GroupCommit:
    """Gathers messages into groups and answers each after its group's sync.

    One group is written at a time: whatever arrives meanwhile waits and is
    the next group, so the number of syncs adapts to the load by itself.

    :param write: writes a group durably (appends it to the put log and
        syncs); called on the writer thread.  Raising fails every caller
        of the group.
    :param run: runs a callable on the writer thread, returning a Deferred.
    :param reactor: for ``callLater(0, ...)``, the end of the current turn.
    :param on_written: called in the reactor with a group's messages and
        what ``write`` returned, once its callers are answered (the daemon
        hands the messages to their senders then).
    :param room: raises :class:`~dropr.errors.StorageFull` when the spool
        has no room for ``(count, payload bytes)`` more.
    """

    log = Logger()

    def __init__(
        self,
        write: Write,
        run: Callable[[Callable[[], object]], Deferred[object]],
        reactor: Any,
        on_written: Callable[[list[Message], object], None] = lambda messages, token: None,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        room: Callable[[int, int], None] = lambda count, nbytes: None,
    ) -> None:
        self.write = write
        self.run = run
        self.reactor = reactor
        self.on_written = on_written
        self.max_pending_bytes = max_pending_bytes
        self.room = room
        self._pending: list[tuple[Message, Deferred[None]]] = []
        self._pending_bytes = 0
        self._scheduled = False
        self._writing = False
        self._idle_waiters: list[Deferred[None]] = []
        #: Groups written and messages stored, for the log and the tests.
        self.batches = 0
        self.stored = 0

    def put(self, message: Message) -> Deferred[None]:
        """A Deferred that fires once ``message`` is durable (or fails why not)."""
        if self._pending_bytes + len(message.payload) > self.max_pending_bytes and self._pending:
            return _failed(StorageFull("the client daemon has too much waiting to be written"))
        try:
            self.room(len(self._pending) + 1, self._pending_bytes + len(message.payload))
        except StorageFull as e:
            return _failed(e)
        d: Deferred[None] = Deferred()
        self._pending.append((message, d))
        self._pending_bytes += len(message.payload)
        if not self._writing and not self._scheduled:
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
        if self._writing or not self._pending:
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        group: list[Message] = []
        seen: set[str] = set()
        for m, _d in batch:
            # A producer that retried with the same id: one copy is enough.
            if m.id not in seen:
                seen.add(m.id)
                group.append(m)
        self._writing = True
        d = self.run(lambda: self.write(group))
        d.addCallbacks(
            self._written,
            self._write_failed,
            callbackArgs=(batch, group),
            errbackArgs=(batch,),
        )
        d.addBoth(self._next)

    def _written(
        self, token: object, batch: list[tuple[Message, Deferred[None]]], group: list[Message]
    ) -> None:
        self.batches += 1
        self.stored += len(group)
        for _m, d in batch:
            d.callback(None)
        try:
            self.on_written(group, token)
        except Exception:
            self.log.failure("handing {count} puts to their senders failed", count=len(group))

    def _write_failed(self, failure: Failure, batch: list[tuple[Message, Deferred[None]]]) -> None:
        if not failure.check(StorageFull, OSError):
            self.log.failure("writing a batch of {count} puts failed", failure, count=len(batch))
        for _m, d in batch:
            d.errback(failure)

    def _next(self, _: object) -> None:
        self._writing = False
        # What arrived while the group synced was read meanwhile: write it now.
        if self._pending:
            self._write()
        else:
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
    :param commit: gathers the puts and writes them.
    :param max_payload: the largest payload accepted, in bytes.
    """

    log = Logger()

    def __init__(
        self, spool_path: str, commit: GroupCommit, reactor: Any, max_payload: int
    ) -> None:
        self.path = socket_path(spool_path)
        self.reactor = reactor
        self.commit = commit
        self.factory = PutFactory(self.commit, max_payload)
        self.port: IListeningPort | None = None
        #: Called at start (before listening), and once the socket is closed
        #: and every accepted put answered: the writer thread lives between.
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


class SyncRunner:
    """Runs a group's write in the reactor thread while syncs are quick, else on a thread.

    A sync of a local disk takes a fraction of a millisecond; handing it to
    a thread and back costs two thread wake-ups, which on an idle machine
    take longer than the sync itself.  So the write blocks the reactor
    instead (what arrives meanwhile waits in the socket buffers and is the
    next group).  A disk whose syncs grow slow would hold up the senders
    too, so once the writes' moving average passes ``inline_max`` seconds
    they go to the writer thread, and come back when they are quick again.
    """

    def __init__(
        self,
        reactor: Any,
        pool: Any,
        inline_max: float = 0.002,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.inline_max = inline_max
        self.clock = clock
        #: Moving average of a write's seconds.
        self.average = 0.0
        self.inline = 0
        self.threaded = 0

    def __call__(self, f: Callable[[], object]) -> Deferred[object]:
        if self.average <= self.inline_max:
            self.inline += 1
            return maybeDeferred(self._timed, f)
        from twisted.internet.threads import deferToThreadPool

        self.threaded += 1
        return deferToThreadPool(self.reactor, self.pool, self._timed, f)

    def _timed(self, f: Callable[[], object]) -> object:
        started = self.clock()
        try:
            return f()
        finally:
            self.average += (self.clock() - started - self.average) / 8


def put_socket_for(
    spool: Any, front: FrontedSpool, log: PutLog, reactor: Any, wake: Callable[[list[str]], None]
) -> PutSocketService:
    """The put socket of a client daemon's ``spool``.

    Groups are appended to ``log`` (see :class:`SyncRunner` for which
    thread), then held in ``front`` for their senders, which ``wake`` wakes.
    """
    from twisted.python.threadpool import ThreadPool

    storage = spool.storage
    pool = ThreadPool(minthreads=0, maxthreads=1, name="dropr-put")

    def room(count: int, nbytes: int) -> None:
        # The spool's limits count what memory holds too: it is the spool's.
        held, held_bytes = front.known_usage()
        check_room(
            spool.path, held, held_bytes, count, nbytes, storage.max_messages, storage.max_bytes
        )

    def written(messages: list[Message], segment: object) -> None:
        assert isinstance(segment, Segment)
        wake(front.offer(messages, segment))

    commit = GroupCommit(log.append, SyncRunner(reactor, pool), reactor, written, room=room)
    service = PutSocketService(spool.path, commit, reactor, storage.max_payload)
    service.on_start = pool.start
    service.on_stopped = pool.stop
    return service
