"""dropr-server's resource: ``POST /`` stores, ``GET /health`` says it lives.

A request reaches it only once its body is in, spooled and (when signed)
already checked to be the body that was signed; parsing and storing run
in the thread pool, a byte budget at a time.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, cast

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web import server
from twisted.web.resource import Resource

from dropr.daemon._auth import NOT_AUTHENTICATED, SCHEME, Authenticator, Claim, media_type
from dropr.errors import InvalidMessage
from dropr.interfaces import IReceivingStore
from dropr.monitoring._metrics import ServerMetrics
from dropr.server._answers import (
    INTERNAL_ERROR,
    Refusal,
    method_not_allowed,
    refusal_for,
    single_message_args,
)
from dropr.server._budget import ByteBudget
from dropr.server._memory import TRIM_AFTER, trim
from dropr.server._receiver import Limits, Receiver
from dropr.server._site import ReceiverSite, UploadRequest, observe, peer_of
from dropr.wire import CONTENT_TYPE, WireError, encode_answer

Result = tuple[list[str], dict[str, str]]


def _finish(request: server.Request, status: int, body: bytes) -> None:
    """Send a whole JSON answer with its length (no chunked encoding)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode("ascii"))
    request.write(body)
    request.finish()


def _json(
    request: server.Request, refusal: Refusal, headers: dict[bytes, bytes] | None = None
) -> bytes:
    observe(request, refusal.status, refusal.reason)
    request.setResponseCode(refusal.status)
    request.setHeader(b"content-type", b"application/json")
    for name, value in (headers or {}).items():
        request.setHeader(name, value)
    return refusal.body()


#: A request body of at most this many bytes may be stored in the reactor...
INLINE_MAX_BYTES = 4096
#: ...when no store is under way in the pool and none ended this many seconds ago.
INLINE_IDLE = 0.005


class StorePlacement:
    """Where a request is stored: in the pool, or at once in the reactor.

    The pool keeps the reactor free while a store waits for the disk, and
    lets it read the next requests meanwhile.  But handing a request to a
    thread and its answer back costs two wake-ups (0.2 ms on an idle box,
    0.6 ms on a busy one), as much as the sync of a small batch.  So a
    small request arriving at an idle server (nothing in the pool, no store
    in the last few milliseconds) is stored at once, when the store says
    its small stores are quick local work (``quick_small_stores``: the
    file-system store).  As soon as requests overlap or follow closely,
    they go to the pool; large requests always do.
    """

    def __init__(self, allowed: bool, clock: Any = time.monotonic) -> None:
        self.allowed = allowed
        self._clock = clock
        #: Stores handed to the pool and not yet ended.
        self.in_pool = 0
        self._last_end = float("-inf")

    def inline(self, size: int) -> bool:
        return (
            self.allowed
            and size <= INLINE_MAX_BYTES
            and self.in_pool == 0
            and self._clock() - self._last_end >= INLINE_IDLE
        )

    def ended(self, *, pooled: bool) -> None:
        """A store ended (``pooled``: one handed to the pool)."""
        if pooled:
            self.in_pool -= 1
        self._last_end = self._clock()


class ReceiverResource(Resource):
    """``POST /``: a batch or one raw message.  ``GET /health``: liveness."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        receiver: Receiver,
        reactor: IReactorThreads,
        pool: ThreadPool,
        parsing: ByteBudget,
    ) -> None:
        super().__init__()
        self.receiver = receiver
        self.reactor = reactor
        self.pool = pool
        self.parsing = parsing
        self.stopping = False
        self.placement = StorePlacement(bool(getattr(receiver.store, "quick_small_stores", False)))

    def render(self, request: server.Request) -> Any:
        if request.method not in (b"GET", b"HEAD", b"POST"):
            refusal = method_not_allowed(request.method)
            request.setHeader(b"allow", b"GET, HEAD, POST")
            request.setResponseCode(refusal.status)
            request.setHeader(b"content-type", b"application/json")
            return refusal.body()
        return super().render(request)

    def render_GET(self, request: server.Request) -> bytes:
        if request.postpath in ([b"health"], [b"health", b""]):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"status": "ok" if not self.stopping else "stopping"}).encode()
        if request.postpath in ([], [b""]):
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {"service": "dropr-server", "post": "batches or single messages; see docs"}
            ).encode()
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return Refusal(404, "no such resource; POST messages to /").body()

    def render_POST(self, request: server.Request) -> bytes | int:
        if getattr(request, "_refused", False):
            return server.NOT_DONE_YET
        upload: UploadRequest = request  # type: ignore[assignment]
        if request.postpath not in ([], [b""]):
            return _json(request, Refusal(404, "POST messages to the server's base URL /"))
        if self.stopping:
            return _json(request, Refusal(503, "server is stopping; retry shortly", retry=True))
        if not upload.body_matches_claim():
            self.log.warn(
                "refused a request: 401 client {client}: the body is not the one signed",
                client=upload.claim.identity if upload.claim else "?",
            )
            return _json(
                request, Refusal(401, NOT_AUTHENTICATED), {b"WWW-Authenticate": SCHEME.encode()}
            )
        # Verified (or trusted unsigned): no longer counted as unverified.
        upload.release_in_flight()
        body = request.content
        if body is None:
            return _json(request, Refusal(400, "request has no body"))
        body.seek(0)
        content_type = media_type(request.getHeader(b"content-type"))
        if content_type == CONTENT_TYPE:

            def job() -> Result:
                return self.receiver.receive_batch(body)

        else:
            try:
                channel, priority, message_id = single_message_args(
                    request.args or {}, signed=upload.claim is not None
                )
            except (InvalidMessage, WireError) as e:
                return _json(request, Refusal(400, str(e)))

            def job() -> Result:
                return self.receiver.receive_one(body, channel, priority, message_id)

        self._store(upload, job, upload._received)
        return server.NOT_DONE_YET

    def _store(self, request: UploadRequest, job: Any, size: int) -> None:
        started = time.monotonic()
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _f: gone.append(True))
        waited = self.parsing.acquire(size)

        pooled: list[bool] = []

        def run(_: object) -> Deferred[Result]:
            if self.placement.inline(size):
                return maybeDeferred(job)
            pooled.append(True)
            self.placement.in_pool += 1
            return deferToThreadPool(self.reactor, self.pool, job)

        def done(result: object) -> object:
            self.placement.ended(pooled=bool(pooled))
            self.parsing.release(size)
            if size >= TRIM_AFTER:
                trim()
            return result

        d = waited.addCallback(run).addBoth(done)
        d.addCallbacks(
            self._answer,
            self._failed,
            callbackArgs=(request, gone, started),
            errbackArgs=(request, gone),
        )

    def _answer(
        self, result: Result, request: UploadRequest, gone: list[bool], started: float
    ) -> None:
        stored, rejected = result
        ms = (time.monotonic() - started) * 1000
        observe(request, 200, "", len(stored) + len(rejected))
        if not gone:
            _finish(request, 200, encode_answer(stored, rejected))
        # The log line and the store's preparation for the next request
        # (spare files, in the pool) wait for the reactor's next turn, which
        # writes the answer out first.
        cast(IReactorTime, self.reactor).callLater(
            0, self._after_answer, peer_of(request), request.claim, stored, rejected, ms
        )

    def _after_answer(
        self,
        peer: str,
        claim: Claim | None,
        stored: list[str],
        rejected: dict[str, str],
        ms: float,
    ) -> None:
        self.log.info(
            "stored {stored} messages, rejected {rejected} in {ms:.1f} ms from {peer}{signed}",
            stored=len(stored),
            rejected=len(rejected),
            ms=ms,
            peer=peer,
            # Who sent what: the store itself does not record the sender.
            client=claim.identity if claim is not None else None,
            signed=f" (client {claim.identity})" if claim is not None else "",
            ids=stored,
            rejected_ids=rejected,
        )
        self._prepare()

    def _prepare(self) -> None:
        deferToThreadPool(self.reactor, self.pool, self.receiver.prepare)

    def _failed(self, failure: Failure, request: UploadRequest, gone: list[bool]) -> None:
        refusal = refusal_for(failure.value) if failure.value is not None else None
        if refusal is None:
            self.log.failure("storing a batch failed", failure)
            refusal = INTERNAL_ERROR
        else:
            # The full reason (it may name the store's path) is for the log.
            self.log.warn(
                "refused a request: {status} {reason}",
                status=refusal.status,
                reason=str(failure.value),
            )
        observe(request, refusal.status, refusal.reason)
        if not gone:
            _finish(request, refusal.status, refusal.body())


def make_site(
    store: IReceivingStore,
    limits: Limits,
    reactor: IReactorThreads,
    pool: ThreadPool,
    work_dir: str,
    timeout: float = 60.0,
    metrics: ServerMetrics | None = None,
    authenticator: Authenticator | None = None,
) -> tuple[ReceiverSite, ReceiverResource]:
    """The site serving ``store``, and its resource (to flag shutdown).

    Request bodies are spooled in ``work_dir`` (made owner-only) until they
    are stored.  With an ``authenticator``, requests that store must be
    signed by a client it knows (unless it allows anonymous ones); ``GET``
    needs none.
    """
    os.makedirs(work_dir, mode=0o700, exist_ok=True)
    receiver = Receiver(store, limits, metrics=metrics)
    site = ReceiverSite(
        Resource(), limits, work_dir, authenticator, timeout=timeout, reactor=reactor
    )
    resource = ReceiverResource(receiver, reactor, pool, site.parsing)
    site.resource = resource
    site.metrics = receiver.metrics
    return site, resource
