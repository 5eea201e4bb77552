"""dropr-server's HTTP connections: each request judged on its head, before its body.

When a request's head is in, it is checked before a byte of its body is
read: the method, the signature (which covers the body's hash), the size
against the limits, and the bytes this client and all clients hold in
flight.  Only a request that passes has its body spooled, hashed as it
arrives: to a file in the server's work directory, or, when it announced
a length of at most ``SMALL_BODY`` bytes, to memory (a file would cost a
small request more than its store).  twisted.web never holds a body in
memory itself.  Connections are counted and each request must arrive
whole within a time limit.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import time
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from dropr.daemon._auth import NOT_AUTHENTICATED, SCHEME, Authenticator, AuthError, Claim
from dropr.daemon._auth import media_type as _media_type
from dropr.monitoring._metrics import ServerMetrics
from dropr.server._answers import (
    ALLOWED_METHODS,
    Refusal,
    body_limit,
    error_response,
    is_canonical_path,
    method_not_allowed,
    refusal_for,
    too_large,
)
from dropr.server._budget import ByteBudget, InFlightBytes
from dropr.server._receiver import Limits
from dropr.wire import CONTENT_TYPE

#: Seconds a refused request's connection keeps draining before it closes.
_LINGER = 2.0
#: Bodies of at most this many bytes (announced) wait in memory, not in a file.
SMALL_BODY = 64 * 1024

log = Logger(namespace="dropr.server")


def observe(request: server.Request, status: int, reason: str = "", messages: int = 0) -> None:
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
        peer_of(request),
    )


def _observe_refusal(site: Any, refusal: Refusal, transport: Any) -> None:
    """Count a refusal made before there is a request to count (431, 503)."""
    metrics = getattr(site, "metrics", None)
    if metrics is not None:
        peer = getattr(transport.getPeer(), "host", "?") if transport is not None else "?"
        metrics.answered(refusal.status, 0.0, 0, 0, refusal.reason, str(peer))


def peer_of(request: server.Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "?"))


class UploadRequest(server.Request):
    """A request judged on its head; its body spooled (to disk unless small), hashed, bounded."""

    #: The request line's method and target, as sent (set by the channel
    #: when the line arrives, so the head can be judged before the body).
    head_method = b""
    head_uri = b""
    _body_limit = 0
    _received = 0
    _refused = False
    #: When the headers were in (time.monotonic()), for the request latency.
    _started = 0.0
    #: Who signed the request (verified on its head); None when unsigned.
    claim: Claim | None = None
    _digest: Any = None
    #: Who the bytes in flight are counted for, and how many are counted.
    _holder = ""
    _held = 0
    _chunked = False

    @property
    def receiver_site(self) -> ReceiverSite:
        return self.channel.site  # type: ignore[attr-defined,no-any-return]

    def gotLength(self, length: int | None) -> None:
        self._started = time.monotonic()
        site = self.receiver_site
        method = self.head_method
        if method not in ALLOWED_METHODS:
            self._refuse(method_not_allowed(method), {"Allow": "GET, HEAD, POST"})
            return
        content_type = _media_type(self.getHeader(b"content-type"))
        if site.authenticator is not None and not self._authenticate(
            site.authenticator, method, content_type, length
        ):
            return
        if length == 0 or method != b"POST":
            # Nothing to store: a body of a GET is read and dropped.
            self.content = io.BytesIO() if length == 0 else _Discard()
            self._body_limit = site.limits.max_request_bytes
            return
        self._body_limit = body_limit(
            content_type == CONTENT_TYPE, site.limits.max_request_bytes, site.limits.max_payload
        )
        if length is not None and length > self._body_limit:
            self._refuse(too_large(length, self._body_limit))
            return
        self._holder = self.claim.identity if self.claim else f"anonymous@{peer_of(self)}"
        self._chunked = length is None
        if length is not None and not self._hold(length):
            return
        if length is not None and length <= SMALL_BODY:
            # A small body is kept in memory: a file for it would cost more
            # than storing it (a new inode, ~0.7 ms on ext4).  Bounded: at
            # most this much per connection, and connections are capped.
            self.content = io.BytesIO()
            return
        try:
            # Closed by twisted.web when the request is done.  (chaos)
            # Unbuffered, so that a full disk raises here in
            # handleContentChunk, where it is answered 507, and not later
            # inside twisted.web, which would drop the connection.
            self.content = tempfile.TemporaryFile(dir=site.work_dir, buffering=0)  # noqa: SIM115
        except OSError as e:
            refusal = refusal_for(e)
            if refusal is None:
                raise
            log.warn("refused a request: {status} {reason}", status=refusal.status, reason=str(e))
            self._refuse(refusal)

    def _authenticate(
        self, authenticator: Authenticator, method: bytes, content_type: str, length: int | None
    ) -> bool:
        query = self.head_uri.partition(b"?")[2].decode("latin-1")
        try:
            self.claim = authenticator.check(
                self.requestHeaders, method.decode("ascii"), query, content_type, length != 0
            )
            if method == b"POST":
                authenticator.require(self.claim)
        except AuthError as e:
            log.warn("refused a request: 401 {reason}", reason=str(e), peer=peer_of(self))
            self._refuse(Refusal(401, NOT_AUTHENTICATED), {"WWW-Authenticate": SCHEME})
            return False
        if self.claim is not None:
            self._digest = hashlib.sha256()
        return True

    def _hold(self, n: int) -> bool:
        """Count ``n`` more body bytes in flight; refuse the request (503) over a cap."""
        if self.receiver_site.in_flight.reserve(self._holder, n):
            self._held += n
            return True
        log.warn(
            "refused a request: 503 {holder} would hold more than its share of bytes in flight",
            holder=self._holder,
        )
        self._refuse(
            Refusal(
                503,
                "the server holds as many unfinished uploads as it takes (from this "
                "client or in all); retry later",
                retry=True,
            ),
            {"Retry-After": "5"},
        )
        return False

    def release_in_flight(self) -> None:
        """The body is verified (or dropped): it no longer counts as in flight."""
        if self._held:
            self.receiver_site.in_flight.release(self._holder, self._held)
            self._held = 0

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._body_limit:
            self._refuse(too_large(None, self._body_limit))
            return
        if self._chunked and not self._hold(len(data)):
            return
        if self._digest is not None:
            self._digest.update(data)
        if self.content is not None:
            try:
                self.content.write(data)
            except OSError as e:
                refusal = refusal_for(e)
                if refusal is None:
                    raise
                self.content.close()
                log.warn("refused a request: {status} {reason}", status=refusal.status, reason=e)
                self._refuse(refusal)

    def body_matches_claim(self) -> bool:
        """True unless the request was signed and its body is not the one signed."""
        if self.claim is None:
            return True
        return bool(self._digest is not None and self._digest.hexdigest() == self.claim.body_sha256)

    def connectionLost(self, reason: Failure) -> None:
        self.release_in_flight()
        super().connectionLost(reason)

    def _refuse(self, refusal: Refusal, headers: dict[str, str] | None = None) -> None:
        """Answer at once, without storing or keeping the rest of the body.

        The answer is followed by a half-close, and what the client still
        sends is read and dropped for a moment before the connection is
        closed: closing with unread data would send a TCP reset, which can
        destroy the answer before the client reads it (a "lingering close").
        """
        self._refused = True
        self.release_in_flight()
        observe(self, refusal.status, refusal.reason)
        self.content = _Discard()
        transport = self.channel.transport
        if transport is not None:
            transport.write(error_response(refusal, headers))
            if hasattr(transport, "loseWriteConnection"):
                transport.loseWriteConnection()
                # The channel's clock, as twisted.web's own timeouts use.
                self.channel.callLater(_LINGER, transport.loseConnection)
            else:
                transport.loseConnection()


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

    _deadline: Any = None
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

    def lineReceived(self, line: bytes) -> None:
        # The request line names the method and target; the request object
        # twisted.web makes for it learns them only after the body.  Keep
        # them on it now, so its head can be judged before the body is read.
        before = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > before:
            parts = line.split()
            request = self.requests[-1]
            request.head_method = parts[0] if parts else b""
            request.head_uri = parts[1] if len(parts) > 1 else b""

    def allContentReceived(self) -> None:
        self._stop_deadline()
        super().allContentReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        # twisted.web hangs up without a word on a request line or header
        # longer than it reads (16 KiB); say why.
        log.warn("refused a request: 431 a line of its head is too long")
        refusal = Refusal(431, f"request line or header longer than {self.MAX_LENGTH} bytes")
        _observe_refusal(getattr(self, "site", None), refusal, self.transport)
        if self.transport is not None:
            self.transport.write(error_response(refusal))
            self.transport.loseConnection()

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        limit = self.site.limits.request_timeout  # type: ignore[attr-defined]
        log.warn(
            "refused a request: 408 slower than {limit} s from {peer}",
            limit=limit,
            peer=str(self.transport.getPeer()) if self.transport is not None else "?",
        )
        refusal = Refusal(408, f"request not complete within {limit:g} seconds; send it faster")
        for request in self.requests:
            request._refused = True  # what still arrives is not kept
            release = getattr(request, "release_in_flight", None)
            if release is not None:
                release()
            observe(request, 408, refusal.reason)
        if self.transport is not None:
            self.transport.write(error_response(refusal))
            self.transport.loseConnection()
            # A peer that does not even read its answer is not waited for.
            self.callLater(self.abortTimeout or 15, self.forceAbortClient)


class _TooManyConnections(Protocol):
    """Answers 503 and hangs up: the server has as many connections as it takes.

    The answer is followed by a lingering close, as for a refused request:
    closing at once with the client's request unread would reset the
    connection and could destroy the answer.  Each lingering refusal holds
    a descriptor, so as many linger at once as connections are served;
    beyond that the site stops accepting until some are gone, and new
    connections wait in the kernel's queue instead of being dropped.
    """

    def __init__(self, site: Any = None) -> None:
        self.site = site
        self._lingering = False

    def connectionMade(self) -> None:
        refusal = Refusal(503, "too many connections; retry later", retry=True)
        _observe_refusal(self.site, refusal, self.transport)
        assert self.transport is not None
        self.transport.write(error_response(refusal, {"Retry-After": "5"}))
        if self.site is not None and hasattr(self.transport, "loseWriteConnection"):
            self._lingering = True
            self.site.linger_started()
            self.transport.loseWriteConnection()
            self.site.reactor.callLater(_LINGER, self.transport.loseConnection)
        else:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass  # read and dropped while the answer goes out

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._lingering:
            self._lingering = False
            self.site.linger_ended()


class _Refused(Resource):
    """A JSON error answer, whatever the method."""

    isLeaf = True

    def __init__(self, refusal: Refusal, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.refusal = refusal
        self.headers = headers or {}

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(self.refusal.status)
        request.setHeader(b"content-type", b"application/json")
        for name, value in self.headers.items():
            request.setHeader(name.encode("ascii"), value.encode("ascii"))
        return self.refusal.body()


class _Answered(Resource):
    """A request refused while it arrived: its answer is written already."""

    isLeaf = True

    def render(self, request: server.Request) -> int:
        return server.NOT_DONE_YET


class ReceiverSite(server.Site):
    """The site of a dropr-server: limits, what is in flight, and the work directory."""

    requestFactory = UploadRequest
    #: What the site counts (see dropr.monitoring._metrics); set by make_site.
    metrics: ServerMetrics | None = None
    # HTTP/1.1 only (no HTTP/2 negotiation): the limits below are per connection.
    protocol = ReceiverChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: Resource,
        limits: Limits,
        work_dir: str,
        authenticator: Authenticator | None = None,
        **kw: Any,
    ) -> None:
        # Bodies are messages, never forms: a form body would be parsed into
        # memory and its fields would override the query's channel and id.
        kw.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kw)
        self.displayTracebacks = False
        self.limits = limits
        self.work_dir = work_dir
        self.authenticator = authenticator
        self.in_flight = InFlightBytes(limits.unverified_per_client, limits.unverified_total)
        self.parsing = ByteBudget(limits.parsing_bytes)
        #: Connections open now, and refused ones still draining.
        self.connections = 0
        self.lingering = 0
        #: The ports listening for this site (see add_port).
        self.ports: list[Any] = []
        self._paused = False

    def buildProtocol(self, addr: Any) -> Any:
        if self.connections >= self.limits.max_connections:
            return _TooManyConnections(self)
        return super().buildProtocol(addr)

    def add_port(self, port: Any) -> Any:
        """A listening port of this site: paused while too many refusals linger."""
        self.ports.append(port)
        return port

    def linger_started(self) -> None:
        self.lingering += 1
        if self.lingering >= self.limits.max_connections and not self._paused:
            log.warn(
                "dropr-server stops accepting for a moment: {n} connections refused and {m} served",
                n=self.lingering,
                m=self.connections,
            )
            self._paused = True
            for port in self.ports:
                port.stopReading()

    def linger_ended(self) -> None:
        self.lingering -= 1
        if self._paused and self.lingering < self.limits.max_connections // 2:
            self._paused = False
            for port in self.ports:
                if port.connected:
                    port.startReading()

    def getResourceFor(self, request: server.Request) -> Any:
        if getattr(request, "_refused", False):
            return _Answered()
        if request.method not in ALLOWED_METHODS:
            return _Refused(method_not_allowed(request.method), {"Allow": "GET, HEAD, POST"})
        if not is_canonical_path(request.path):
            return _Refused(Refusal(404, "no such resource: write the path plainly, unescaped"))
        return super().getResourceFor(request)

    def log(self, request: http.Request) -> None:
        # One line per batch is logged by the resource; per-request access
        # lines would drown them at thousands of requests per second.
        pass
