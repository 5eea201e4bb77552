"""The HTTP spoken on a spool's put socket, as plain functions and a parser.

No I/O here: :class:`RequestParser` turns bytes into requests (pipelined
requests included), :func:`message_from_request` turns a request into a
:class:`~dropr.Message` or a clear refusal, and :func:`response` frames an
answer.  The service in :mod:`dropr.client._putsocket` wires them to a
socket; the unit tests call them directly.

The form is the one a dropr-server accepts for a single message: ``POST /``
with the payload as the body and ``destination``, ``channel``, ``priority``
and an optional ``id`` in the query string.  Only ``Content-Length`` bodies
are read (``curl --data-binary`` sends one); ``Expect: 100-continue`` is
honoured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from dropr._ids import is_valid_id, new_id
from dropr._message import (
    DEFAULT_CHANNEL,
    DEFAULT_PRIORITY,
    Message,
    validate_channel,
    validate_destination,
    validate_priority,
)
from dropr.errors import DroprError, InvalidMessage

#: The most bytes of a request line and its headers.
MAX_HEAD = 16 * 1024
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
    507: "Insufficient Storage",
}
USAGE = (
    "POST the payload as the body to /?destination=<dropr-server URL>"
    "&channel=<name>&priority=<0-9>[&id=<32 hex digits>]"
)


@dataclass(slots=True)
class HTTPRequest:
    """One request read off the socket."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""
    #: Whether the connection stays open after the answer.
    keep_alive: bool = True


@dataclass(slots=True)
class ContinueNeeded:
    """The client waits for ``100 Continue`` before it sends the body."""


@dataclass(slots=True)
class HTTPError(DroprError):
    """A request that cannot be read; answered, then the connection closes."""

    status: int
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)


class RequestParser:
    """Splits a byte stream into HTTP/1.x requests with ``Content-Length`` bodies.

    ``feed`` returns what became complete: requests, a ``ContinueNeeded``
    when a client asks for one, and at most one ``HTTPError`` after which
    the stream cannot be trusted and nothing more is parsed.
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._buffer = bytearray()
        self._request: HTTPRequest | None = None
        self._length = 0
        self._broken = False

    def feed(self, data: bytes) -> list[HTTPRequest | ContinueNeeded | HTTPError]:
        if self._broken:
            return []
        self._buffer += data
        out: list[HTTPRequest | ContinueNeeded | HTTPError] = []
        while True:
            if self._request is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD:
                        return self._fail(out, HTTPError(431, "request head over 16 KiB"))
                    return out
                if end > MAX_HEAD:
                    return self._fail(out, HTTPError(431, "request head over 16 KiB"))
                head = bytes(self._buffer[:end])
                del self._buffer[: end + 4]
                try:
                    self._request, self._length = _parse_head(head, self.max_body)
                except HTTPError as e:
                    return self._fail(out, e)
                if (
                    self._request.headers.get("expect", "").lower() == "100-continue"
                    and len(self._buffer) < self._length
                ):
                    out.append(ContinueNeeded())
            if len(self._buffer) < self._length:
                return out
            request = self._request
            request.body = bytes(self._buffer[: self._length])
            del self._buffer[: self._length]
            self._request = None
            out.append(request)
            if not request.keep_alive:
                self._broken = True  # nothing after a last request is read
                return out

    def _fail(
        self, out: list[HTTPRequest | ContinueNeeded | HTTPError], error: HTTPError
    ) -> list[HTTPRequest | ContinueNeeded | HTTPError]:
        self._broken = True
        self._buffer.clear()
        out.append(error)
        return out


def _parse_head(head: bytes, max_body: int) -> tuple[HTTPRequest, int]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise HTTPError(400, "request head is not text") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HTTPError(400, f"not an HTTP request line: {lines[0][:80]!r}. {USAGE}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HTTPError(505, f"{version[:16]} is not supported: speak HTTP/1.1")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        name, colon, value = raw.partition(":")
        if not colon or not name or name != name.strip():
            raise HTTPError(400, f"malformed header line {raw[:80]!r}")
        key = name.lower()
        value = value.strip()
        if key == "content-length" and key in headers and headers[key] != value:
            raise HTTPError(400, "two different Content-Length headers")
        headers[key] = value
    if "transfer-encoding" in headers:
        raise HTTPError(
            411,
            "chunked bodies are not accepted here: send a Content-Length "
            "(curl --data-binary @file does)",
        )
    raw_length = headers.get("content-length", "0")
    if not raw_length.isdigit() or len(raw_length) > 18:
        raise HTTPError(400, f"invalid Content-Length {raw_length[:20]!r}")
    length = int(raw_length)
    if length > max_body:
        raise HTTPError(
            413,
            f"payload of {length} bytes is larger than the spool's maximum of "
            f"{max_body} bytes: split it, or raise the spool's max_payload",
        )
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
    return HTTPRequest(method, target, headers, keep_alive=keep_alive), length


def message_from_request(request: HTTPRequest) -> Message:
    """The message a ``POST`` carries; raises HTTPError with what to do."""
    if request.method not in ("POST", "PUT"):
        raise HTTPError(405, f"{request.method[:16]} is not accepted here. {USAGE}")
    path, query_text = _split_target(request.target)
    if path not in ("", "/"):
        raise HTTPError(404, f"no such resource {path[:80]!r}. {USAGE}")
    try:
        query = _parse_query(query_text)
    except ValueError as e:
        raise HTTPError(400, f"unreadable query string: {e}. {USAGE}") from None

    def one(name: str) -> str | None:
        values = query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise HTTPError(400, f"query parameter {name} given {len(values)} times; give it once")
        return values[0]

    try:
        destination = one("destination")
        if destination is None:
            raise InvalidMessage(
                "no destination: give the dropr-server's base URL, e.g. "
                "destination=https://central.example/ (URL-encoded)"
            )
        validate_destination(destination)
        channel = validate_channel(one("channel") or DEFAULT_CHANNEL)
        raw_priority = one("priority")
        try:
            priority = DEFAULT_PRIORITY if raw_priority in (None, "") else int(raw_priority)
        except ValueError:
            raise InvalidMessage(f"invalid priority {raw_priority!r}: use 0 to 9") from None
        validate_priority(priority)
        message_id = one("id") or None
        if message_id is not None and not is_valid_id(message_id):
            raise InvalidMessage(
                f"invalid id {message_id[:40]!r}: 32 lowercase hex digits, or leave it "
                "out and one is made for you"
            )
    except InvalidMessage as e:
        raise HTTPError(400, str(e)) from None
    return Message(message_id or new_id(), request.body, channel, priority, destination)


def _split_target(target: str) -> tuple[str, str]:
    """The path and query of a request target (origin form quickly, else by urlsplit)."""
    if target.startswith("/") and "#" not in target:
        path, _, query = target.partition("?")
        return path, query
    split = urlsplit(target)
    return split.path, split.query


def _parse_query(text: str) -> dict[str, list[str]]:
    """What ``parse_qs(text, keep_blank_values=True)`` gives, without its cost per field.

    Every put parses one; only values with escapes are unquoted.
    """
    fields: dict[str, list[str]] = {}
    for part in text.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "+" in name or "%" in name:
            name = unquote(name.replace("+", " "))
        if "+" in value or "%" in value:
            value = unquote(value.replace("+", " "))
        fields.setdefault(name, []).append(value)
    return fields


def response(status: int, body: dict[str, Any], keep_alive: bool = True) -> bytes:
    """An HTTP/1.1 answer with a JSON body."""
    payload = json.dumps(body).encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n"
        + ("" if keep_alive else "Connection: close\r\n")
        + "\r\n"
    )
    return head.encode("ascii") + payload


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
