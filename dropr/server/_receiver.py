"""dropr-server's HTTP side: the resource that receives batches into the store.

Request bodies go to temporary files in the store's own ``tmp/`` (never
whole in memory), with the size limit checked against ``Content-Length``
before the body is read and counted while a chunked body arrives.  Parsing
and the disk sync run in a thread pool so the reactor keeps serving.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorThreads
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import http, server
from twisted.web.resource import Resource

from dropr._ids import is_valid_id, new_id
from dropr._message import (
    DEFAULT_CHANNEL,
    DEFAULT_PRIORITY,
    Message,
    validate_channel,
    validate_priority,
)
from dropr.daemon._auth import SCHEME, Authenticator, AuthError, Claim, media_type
from dropr.errors import InvalidMessage, StorageFull
from dropr.monitoring._metrics import ServerMetrics
from dropr.storage.files._storage import FilesystemStorage
from dropr.wire import CONTENT_TYPE, FRESH_HEADER, WireError, encode_answer, parse_batch

#: Seconds a refused request's connection keeps draining before it closes.
_LINGER = 2.0
#: A sender's clock may run this far ahead of the server's (seconds).
MAX_CLOCK_SKEW = 3600.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may carry."""

    max_request_bytes: int = 64 * 1024 * 1024
    max_messages: int = 10_000
    max_payload: int = 16 * 1024 * 1024
    #: Seconds from a request's first byte to its last; a client that takes
    #: longer (a slow-loris, a byte now and then) is answered 408 and cut off.
    request_timeout: float = 300.0
    #: Connections open at once; more are answered 503 and closed.
    max_connections: int = 1000


def _json(request: server.Request, status: int, data: dict[str, Any]) -> bytes:
    _observe(request, status, str(data.get("error", "")))
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(data).encode("utf-8")


def _finish(request: server.Request, status: int, body: bytes) -> None:
    """Send a whole JSON answer with its length (no chunked encoding)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    request.write(body)
    request.finish()


def _observe(request: server.Request, status: int, reason: str = "", messages: int = 0) -> None:
    """Count an answered POST in the site's metrics (and a refusal in its recent errors)."""
    # A request refused before its body (and so its method) is read has one.
    if request.method != b"POST" and not getattr(request, "_refused", False):
        return
    channel = getattr(request, "channel", None)
    metrics = getattr(getattr(channel, "site", None), "metrics", None)
    if metrics is None:
        return
    started = getattr(request, "_started", 0.0)
    metrics.answered(
        status,
        time.monotonic() - started if started else 0.0,
        getattr(request, "_received", 0),
        messages,
        reason,
        _peer(request),
    )


def _observe_refusal(site: Any, status: int, reason: str, transport: Any) -> None:
    """Count a refusal made before there is a request to count (431, 503)."""
    metrics = getattr(site, "metrics", None)
    if metrics is not None:
        peer = getattr(transport.getPeer(), "host", "?") if transport is not None else "?"
        metrics.answered(status, 0.0, 0, 0, reason, str(peer))


def _peer(request: server.Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "?"))


class UploadRequest(server.Request):
    """A request whose body is spooled to the store's disk, within a limit."""

    _body_limit = 0
    _received = 0
    _refused = False
    #: When the headers were in (time.monotonic()), for the request latency.
    _started = 0.0
    #: Who the request says it is from (checked but for its signature).
    claim: Claim | None = None
    _digest: Any = None

    def gotLength(self, length: int | None) -> None:
        self._started = time.monotonic()
        site: ReceiverSite = self.channel.site  # type: ignore[attr-defined]
        self._body_limit = site.limits.max_request_bytes
        if site.authenticator is not None:
            # Headers are all in: refuse the unauthenticated before their body
            # takes any disk (a length of None is a chunked body).
            try:
                self.claim = site.authenticator.check_headers(
                    self.requestHeaders, has_body=length != 0
                )
            except AuthError as e:
                ReceiverResource.log.warn("refused a request: 401 {reason}", reason=str(e))
                self._refuse(401, str(e), {"WWW-Authenticate": SCHEME})
                return
            if self.claim is not None:
                self._digest = hashlib.sha256()
        if length is not None and length > self._body_limit:
            self._refuse(
                413,
                f"request body of {length} bytes is larger than this server's "
                f"limit of {self._body_limit} bytes; send smaller batches",
            )
            return
        # Closed by twisted.web when the request is done.  (chaos) Unbuffered,
        # so that a full disk raises here in handleContentChunk, where it is
        # answered 507, and not later inside twisted.web, which would drop
        # the connection with an unhandled error.
        self.content = tempfile.TemporaryFile(dir=site.tmp_dir, buffering=0)  # noqa: SIM115

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._body_limit:
            self._refuse(
                413,
                f"request body is larger than this server's limit of "
                f"{self._body_limit} bytes; send smaller batches",
            )
            return
        if self._digest is not None:
            self._digest.update(data)
        if self.content is not None:
            try:
                self.content.write(data)
            except OSError as e:
                if not _disk_full(e):
                    raise
                self.content.close()
                reason = f"the store's disk is full ({e.strerror}); retry later"
                ReceiverResource.log.warn("refused a request: 507 {reason}", reason=reason)
                self._refuse(507, reason)

    def body_sha256(self) -> str:
        """Hex SHA-256 of the body received (for a signed request)."""
        return self._digest.hexdigest() if self._digest is not None else ""

    def _refuse(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        """Answer at once, without storing or keeping the rest of the body.

        The answer is followed by a half-close, and what the client still
        sends is read and dropped for a moment before the connection is
        closed: closing with unread data would send a TCP reset, which can
        destroy the answer before the client reads it (a "lingering close").
        """
        self._refused = True
        _observe(self, status, reason)
        head, body = _error_response(status, reason, headers)
        self.content = _Discard()
        transport = self.channel.transport
        if transport is not None:
            transport.write(head + body)
            if hasattr(transport, "loseWriteConnection"):
                transport.loseWriteConnection()
                # The channel's clock, as twisted.web's own timeouts use.
                self.channel.callLater(_LINGER, transport.loseConnection)
            else:
                transport.loseConnection()


def _error_response(
    status: int, reason: str, headers: dict[str, str] | None = None
) -> tuple[bytes, bytes]:
    """Head and body of a JSON error answer after which the connection closes."""
    body = json.dumps({"error": reason}).encode("utf-8")
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"HTTP/1.1 {status} {http.RESPONSES.get(status, b'Error').decode()}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    ).encode("ascii")
    return head, body


class _Discard(io.BytesIO):
    """Stands in for the body file of a refused request: keeps nothing."""

    def write(self, data: Any) -> int:
        return len(data)


class ReceiverChannel(http.HTTPChannel):
    """An HTTP connection that counts itself and bounds each request's time.

    twisted.web's own timeout only fires on silence; a client that sends a
    byte now and then (a slow-loris) would hold a connection and a temp file
    for ever.  Here a request must be complete within
    ``Limits.request_timeout`` seconds of its first byte, or it is answered
    408 and cut off.
    """

    _deadline: IDelayedCall | None = None
    _counted = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.connections += 1  # type: ignore[attr-defined]
        self._counted = True
        # Answers are small and written in pieces; Nagle's algorithm would
        # hold the last piece back for the client's delayed ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._counted:
            self.site.connections -= 1  # type: ignore[attr-defined]
            self._counted = False
        self._stop_deadline()
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        # From the first byte, not the first whole line: a request line sent
        # a byte at a time must not escape the limit.  Bytes that arrive while
        # a request is being answered are buffered by twisted.web, and the
        # next byte after that starts the next request's clock.
        if self._deadline is None and not self._handlingRequest:
            limit = self.site.limits.request_timeout  # type: ignore[attr-defined]
            self._deadline = self.callLater(limit, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stop_deadline()
        super().allContentReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        # twisted.web hangs up without a word on a request line or header
        # longer than it reads (16 KiB); say why.
        ReceiverResource.log.warn("refused a request: 431 a line of its head is too long")
        reason = f"request line or header longer than {self.MAX_LENGTH} bytes"
        _observe_refusal(getattr(self, "site", None), 431, reason, self.transport)
        head, body = _error_response(431, reason)
        if self.transport is not None:
            self.transport.write(head + body)
            self.transport.loseConnection()

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        limit = self.site.limits.request_timeout  # type: ignore[attr-defined]
        ReceiverResource.log.warn(
            "refused a request: 408 slower than {limit} s from {peer}",
            limit=limit,
            peer=str(self.transport.getPeer()) if self.transport is not None else "?",
        )
        reason = f"request not complete within {limit:g} seconds; send it faster"
        for request in self.requests:
            request._refused = True  # what still arrives is not kept
            _observe(request, 408, reason)
        head, body = _error_response(408, reason)
        if self.transport is not None:
            self.transport.write(head + body)
            self.transport.loseConnection()
            # A peer that does not even read its answer is not waited for.
            self._abortingCall = self.callLater(self.abortTimeout or 15, self.forceAbortClient)


class _TooManyConnections(Protocol):
    """Answers 503 and hangs up: the server has as many connections as it takes."""

    def __init__(self, site: Any = None) -> None:
        self.site = site

    def connectionMade(self) -> None:
        reason = "too many connections; retry later"
        _observe_refusal(self.site, 503, reason, self.transport)
        head, body = _error_response(503, reason)
        assert self.transport is not None
        self.transport.write(head + body)
        self.transport.loseConnection()


class ReceiverSite(server.Site):
    """The site of a dropr-server: limits and the store's temp directory."""

    requestFactory = UploadRequest
    #: What the site counts (see dropr.monitoring._metrics); set by make_site.
    metrics: ServerMetrics | None = None
    # HTTP/1.1 only (no HTTP/2 negotiation): the limits below are per connection.
    protocol = ReceiverChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Resource,
        limits: Limits,
        tmp_dir: str,
        authenticator: Authenticator | None = None,
        **kw: Any,
    ) -> None:
        # Bodies are messages, never forms: a form body would be parsed into
        # memory and its fields would override the query's channel and id.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kw)
        self.limits = limits
        self.tmp_dir = tmp_dir
        self.authenticator = authenticator
        #: Connections open now.
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        if self.connections >= self.limits.max_connections:
            return _TooManyConnections(self)
        return super().buildProtocol(addr)

    def log(self, request: http.Request) -> None:
        # One line per batch is logged by the resource; per-request access
        # lines would drown them at thousands of requests per second.
        pass


class Receiver:
    """Stores what arrives: parses, checks and adds a batch to the store.

    Plain code without a reactor: it runs in the thread pool, and tests
    call it directly.
    """

    log = Logger()

    def __init__(
        self,
        storage: FilesystemStorage,
        limits: Limits,
        clock: Callable[[], float] = time.time,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.storage = storage
        self.limits = limits
        self._clock = clock
        self.metrics = metrics or ServerMetrics()

    def receive_batch(self, body: BinaryIO) -> tuple[list[str], dict[str, str]]:
        """Store the batch in ``body``; return (stored ids, rejected id → reason)."""
        parsed = parse_batch(body, self.limits.max_payload, self.limits.max_messages)
        return self._store(parsed.messages, parsed.rejected, parsed.records)

    def receive_one(
        self, payload: bytes, channel: str, priority: int, message_id: str | None
    ) -> tuple[list[str], dict[str, str]]:
        """Store one raw message (posted by curl and friends)."""
        if len(payload) > self.limits.max_payload:
            raise WireError(
                f"payload of {len(payload)} bytes exceeds this server's maximum of "
                f"{self.limits.max_payload} bytes",
                413,
            )
        message = Message(message_id or new_id(), payload, channel, priority)
        return self._store([message], {})

    def _store(
        self,
        messages: list[Message],
        rejected: dict[str, str],
        records: dict[str, bytes] | None = None,
    ) -> tuple[list[str], dict[str, str]]:
        now = self._clock()
        # Ids are fixed-width hex led by their time: compare them as strings.
        # A second of margin keeps an id at the window's edge from passing
        # here and then failing the store's own check.
        oldest = f"{max(0, int((now - self.storage_window() + 1) * 1000)):012x}"
        newest = f"{int((now + MAX_CLOCK_SKEW) * 1000):012x}"
        accepted: dict[str, list[Message]] = {}
        kinds = {"invalid": len(rejected), "too_old": 0, "clock_skew": 0}
        for m in messages:
            if m.id < oldest:
                kinds["too_old"] += 1
                rejected[m.id] = (
                    "message is older than this server's dedup window "
                    f"({self.storage_window():.0f} s): it may have been stored and "
                    "forgotten already, so it is not stored again"
                )
            elif m.id[:12] > newest:
                kinds["clock_skew"] += 1
                rejected[m.id] = (
                    "message id is dated more than an hour ahead of this server's "
                    "clock: check the sender's clock"
                )
            else:
                accepted.setdefault(m.channel, []).append(m)
        stored: list[str] = []
        for channel, group in accepted.items():
            started = time.monotonic()
            new = self.storage.add(channel, group, records=records)
            new_ids = set(new)
            self.metrics.stored(
                channel,
                len(group),
                len(new),
                sum(len(m.payload) for m in group if m.id in new_ids),
                time.monotonic() - started,
            )
            # Ids add() skipped were stored before: "stored" is the answer too.
            stored.extend(m.id for m in group)
        self.metrics.rejected_messages(kinds)
        return stored, rejected

    def storage_window(self) -> float:
        dedup = self.storage.dedup
        # Without a dedup index nothing is too old; 100 years stands for that.
        return dedup.window if dedup is not None else 100 * 365 * 86400.0


class ReceiverResource(Resource):
    """``POST /``: a batch or one raw message.  ``GET /health``: liveness."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        receiver: Receiver,
        reactor: IReactorThreads,
        pool: ThreadPool,
        authenticator: Authenticator | None = None,
    ) -> None:
        super().__init__()
        self.receiver = receiver
        self.reactor = reactor
        self.pool = pool
        self.authenticator = authenticator
        self.stopping = False

    def render_GET(self, request: server.Request) -> bytes:
        if request.postpath in ([b"health"], [b"health", b""]):
            return _json(request, 200, {"status": "ok" if not self.stopping else "stopping"})
        if request.postpath in ([], [b""]):
            return _json(
                request,
                200,
                {"service": "dropr-server", "post": "batches or single messages; see docs"},
            )
        return _json(request, 404, {"error": "no such resource; POST messages to /"})

    def render_POST(self, request: server.Request) -> bytes | int:
        if getattr(request, "_refused", False):
            return server.NOT_DONE_YET
        if request.postpath not in ([], [b""]):
            return _json(request, 404, {"error": "POST messages to the server's base URL /"})
        if self.stopping:
            return _json(request, 503, {"error": "server is stopping; retry shortly"})
        # Media types are case-insensitive; parameters do not matter here.
        content_type = media_type(request.getHeader(b"content-type"))
        # (signed requests) The fresh header is no longer honoured, but older
        # clients still sign it, so it stays in the signed text.
        raw_fresh = request.getHeader(FRESH_HEADER.encode())
        if self.authenticator is not None:
            try:
                self._authenticate(request, content_type, raw_fresh)
            except AuthError as e:
                self.log.warn("refused a request: 401 {reason}", reason=str(e))
                request.setHeader(b"WWW-Authenticate", SCHEME.encode())
                return _json(request, 401, {"error": str(e)})
        body = request.content
        if body is None:
            return _json(request, 400, {"error": "request has no body"})
        body.seek(0)
        started = time.monotonic()
        d: Deferred[tuple[list[str], dict[str, str]]]
        if content_type == CONTENT_TYPE:
            d = deferToThreadPool(self.reactor, self.pool, self.receiver.receive_batch, body)
        else:
            try:
                channel, priority, message_id = _single_message_args(request)
            except (InvalidMessage, WireError) as e:
                return _json(request, 400, {"error": str(e)})
            d = deferToThreadPool(
                self.reactor,
                self.pool,
                lambda: self.receiver.receive_one(body.read(), channel, priority, message_id),
            )
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _f: gone.append(True))
        d.addCallbacks(
            self._answer,
            self._failed,
            callbackArgs=(request, gone, started),
            errbackArgs=(request, gone),
        )
        return server.NOT_DONE_YET

    def _authenticate(
        self, request: server.Request, content_type: str, raw_fresh: bytes | None
    ) -> None:
        """Raise AuthError unless the request may store."""
        assert self.authenticator is not None
        claim: Claim | None = getattr(request, "claim", None)
        self.authenticator.require(claim)
        if claim is None:
            return  # anonymous, and allowed
        self.authenticator.verify(
            claim,
            "POST",
            request.uri.partition(b"?")[2].decode("latin-1"),
            content_type,
            (raw_fresh or b"").decode("latin-1"),
            request.body_sha256(),  # type: ignore[attr-defined]
        )

    def _answer(
        self,
        result: tuple[list[str], dict[str, str]],
        request: server.Request,
        gone: list[bool],
        started: float,
    ) -> None:
        stored, rejected = result
        claim: Claim | None = getattr(request, "claim", None)
        self.log.info(
            "stored {stored} messages, rejected {rejected} in {ms:.1f} ms from {peer}{signed}",
            stored=len(stored),
            rejected=len(rejected),
            ms=(time.monotonic() - started) * 1000,
            peer=_peer(request),
            # Who sent what: the store itself does not record the sender.
            client=claim.identity if claim is not None else None,
            signed=f" (client {claim.identity})" if claim is not None else "",
            ids=stored,
            rejected_ids=rejected,
        )
        _observe(request, 200, "", len(stored) + len(rejected))
        if gone:
            return
        _finish(request, 200, encode_answer(stored, rejected))

    def _failed(self, failure: Failure, request: server.Request, gone: list[bool]) -> None:
        retry = False
        if isinstance(failure.value, WireError):
            status, reason = failure.value.status, str(failure.value)
            retry = failure.value.retry
        elif failure.check(StorageFull):
            status, reason = 507, str(failure.value)
        elif isinstance(failure.value, OSError) and _disk_full(failure.value):
            # (chaos) A full disk is the store being full too: 507, so the
            # client backs off and retries, not an internal error (500).
            status = 507
            reason = f"the store's disk is full ({failure.value.strerror}); retry later"
        elif failure.check(InvalidMessage):
            status, reason = 400, str(failure.value)
        else:
            self.log.failure("storing a batch failed", failure)
            status, reason = 500, "internal error while storing; nothing was acknowledged"
        if status != 500:
            self.log.warn("refused a request: {status} {reason}", status=status, reason=reason)
        _observe(request, status, reason)
        if gone:
            return
        answer: dict[str, Any] = {"error": reason}
        if retry:
            answer["retry"] = True
        _finish(request, status, json.dumps(answer).encode("utf-8"))


def _disk_full(e: OSError) -> bool:
    """True for the errors of a file system out of space or quota."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def _single_message_args(request: server.Request) -> tuple[str, int, str | None]:
    args = request.args or {}

    def one(name: bytes) -> str | None:
        values = args.get(name)
        if not values:
            return None
        try:
            return bytes(values[0]).decode("ascii")
        except UnicodeDecodeError:
            raise WireError(f"query parameter {name.decode()} must be ASCII") from None

    channel = validate_channel(one(b"channel") or DEFAULT_CHANNEL)
    raw_priority = one(b"priority")
    try:
        priority = DEFAULT_PRIORITY if raw_priority is None else int(raw_priority)
    except ValueError:
        raise InvalidMessage(f"invalid priority {raw_priority!r}: use 0 to 9") from None
    validate_priority(priority)
    message_id = one(b"id")
    if message_id is not None and not is_valid_id(message_id):
        raise InvalidMessage(
            f"invalid id {message_id!r}: 32 lowercase hex digits (or leave it out)"
        )
    return channel, priority, message_id


def make_site(
    storage: FilesystemStorage,
    limits: Limits,
    reactor: IReactorThreads,
    pool: ThreadPool,
    timeout: float = 60.0,
    metrics: ServerMetrics | None = None,
    authenticator: Authenticator | None = None,
) -> tuple[ReceiverSite, ReceiverResource]:
    """The site serving ``storage``, and its resource (to flag shutdown).

    With an ``authenticator``, requests that store must be signed by a
    client it knows (unless it allows anonymous ones); ``GET`` needs none.
    """
    resource = ReceiverResource(
        Receiver(storage, limits, metrics=metrics), reactor, pool, authenticator
    )
    site = ReceiverSite(resource, limits, storage.tmp_dir, authenticator, timeout=timeout)
    os.makedirs(storage.tmp_dir, mode=0o700, exist_ok=True)
    site.metrics = resource.receiver.metrics
    return site, resource
