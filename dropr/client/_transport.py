"""The HTTP transport: batches to a dropr-server with treq."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import treq
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from dropr._message import Message
from dropr.daemon._auth import Credentials, sign_request
from dropr.errors import DroprError
from dropr.interfaces import ITransport, SendResult
from dropr.wire import CONTENT_TYPE, WireError, decode_answer, encode_batch


class DestinationUnavailable(DroprError):
    """The destination could not take the batch now; retry later."""


class BatchTooLarge(DroprError):
    """The destination refused the request as too large; send fewer messages."""


class _NoDelayPool(HTTPConnectionPool):
    """A connection pool whose connections send at once (TCP_NODELAY).

    A request goes out as headers and body in separate writes; with Nagle's
    algorithm the second waits for the server's delayed ACK, which costs
    milliseconds on every batch of an otherwise idle client.
    """

    def _newConnection(self, key: Any, endpoint: Any) -> Any:
        d = super()._newConnection(key, endpoint)

        def no_delay(protocol: Any) -> Any:
            set_no_delay = getattr(protocol.transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(True)
            return protocol

        return d.addCallback(no_delay)


@implementer(ITransport)
class HTTPTransport:
    """Posts batches over persistent HTTP(S) connections owned by this object.

    :param connect_timeout: seconds to wait for a connection.
    :param timeout: seconds to wait for the whole answer.
    :param context_factory: TLS policy for ``https`` destinations (an
        ``IPolicyForHTTPS``, see :func:`dropr.daemon._tls.client_policy`); the
        system's roots when None.
    :param credentials: sign every request with this identity and secret
        (see :mod:`dropr.daemon._auth`); unsigned when None.
    """

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float = 10.0,
        timeout: float = 60.0,
        context_factory: Any = None,
        max_connections: int = 2,
        credentials: Credentials | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.credentials = credentials
        self._clock = clock
        self.pool = _NoDelayPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_connections
        self.pool.retryAutomatically = False
        kwargs: dict[str, Any] = {"connectTimeout": connect_timeout, "pool": self.pool}
        if context_factory is not None:
            kwargs["contextFactory"] = context_factory
        self.client = treq.client.HTTPClient(Agent(reactor, **kwargs))
        self.timeout = timeout

    @inlineCallbacks
    def send(
        self, destination: str, messages: Sequence[Message]
    ) -> Any:  # Deferred[list[SendResult]]
        """Post ``messages`` to ``destination``; see ``ITransport.send``."""
        headers: dict[bytes | str, list[bytes | str]] = {"Content-Type": [CONTENT_TYPE]}
        data = encode_batch(messages)
        if self.credentials is not None:
            signed = sign_request(
                self.credentials,
                data,
                query=urlsplit(destination).query,
                content_type=CONTENT_TYPE,
                now=self._clock(),
            )
            for name, value in signed.items():
                headers[name] = [value]
        response = yield self.client.post(
            destination, data=data, headers=headers, timeout=self.timeout
        )
        body = yield treq.content(response)
        code = response.code
        if code == 200:
            try:
                results: Sequence[SendResult] = decode_answer(body, messages)
            except WireError as e:
                raise DestinationUnavailable(str(e)) from e
            return results
        reason, retry = _error(body)
        reason = reason or f"HTTP {code}"
        if code == 413:
            raise BatchTooLarge(reason)
        if code in (401, 403):
            # Credentials or the clock are wrong: the messages are not at
            # fault, so they wait in the spool (with backoff) until it is fixed.
            raise DestinationUnavailable(
                f"{destination} refused this client's credentials: HTTP {code}: {reason}"
            )
        if 400 <= code < 500 and code not in (404, 408, 429) and not retry:
            # The server read the request and refuses it as such: retrying the
            # same bytes cannot help, so each message fails with its reason.
            text = f"refused by {destination}: HTTP {code}: {reason}"
            return [SendResult(m.id, False, text, permanent=True) for m in messages]
        raise DestinationUnavailable(f"{destination} answered HTTP {code}: {reason}")

    def close(self) -> Deferred[None]:
        """Close the pooled connections."""
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return]


def _error(body: bytes) -> tuple[str, bool]:
    """The reason of an error answer, and whether the server says to retry."""
    try:
        data = json.loads(body)
        return str(data.get("error", ""))[:500], data.get("retry") is True
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace"), False
