"""The producer's side of the put socket: hand messages to the client daemon.

Blocking, no reactor: ``dropr.put()`` calls it.  Each answer is one of

* ``Stored``: the daemon synced the message (it is as durable as a batch
  file the producer wrote itself);
* ``Refused``: the daemon read the request and refused it, with a status
  (400 invalid, 507 spool full, 5xx trouble) and its reason;
* ``None``: no answer (no daemon, a stale socket, a restart, a timeout, a
  connection cut).  The message may or may not have been stored; the
  caller writes it itself with the *same id*, so should both copies exist
  the server's dedup stores it once.

Connections are kept open and reused (one per thread at a time) and are
never shared across ``fork()``.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from dropr._message import Message
from dropr.errors import DroprError

#: After a timeout, the socket is left alone for this many seconds (the
#: daemon is alive but stuck: producers write themselves meanwhile).
TIMEOUT_HOLD_OFF = 5.0


@dataclass(frozen=True, slots=True)
class Stored:
    """The daemon made the message durable."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The daemon answered, but did not store the message."""

    status: int
    reason: str


Answer = Stored | Refused | None
STORED = Stored()


class _NoAnswer(DroprError):
    """The daemon did not answer (the caller writes the message itself)."""


def encode_request(message: Message) -> bytes:
    """The HTTP request putting ``message``."""
    assert message.destination is not None
    target = (
        f"/?destination={quote(message.destination, safe='')}&channel={message.channel}"
        f"&priority={message.priority}&id={message.id}"
    )
    return (
        f"POST {target} HTTP/1.1\r\nHost: spool\r\nContent-Length: {len(message.payload)}\r\n\r\n"
    ).encode("ascii") + message.payload


#: Bumped in a child after ``fork()``: connections of an older generation
#: are the parent's (cheaper than a ``getpid()`` per put).
_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_forked)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class _Connection:
    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            # Blocking, with the timeout kept by the kernel: a put is then
            # one send and one receive, without a poll() before each.
            self.sock.settimeout(None)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
        except BaseException:
            self.sock.close()
            raise
        self.buffer = bytearray()
        self.generation = _generation

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError:
            raise TimeoutError("the daemon did not take the request in time") from None

    def close(self) -> None:
        self.sock.close()

    def read_answer(self) -> tuple[int, bytes, bool]:
        """Status, body, and whether the daemon keeps the connection open."""
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            self._recv()
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        try:
            status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise _NoAnswer(f"not an HTTP answer: {head[0][:60]!r}") from None
        length = 0
        keep = True
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
        if status == 100:
            return self.read_answer()
        while len(self.buffer) < length:
            self._recv()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return status, body, keep

    def _recv(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            raise TimeoutError("the daemon did not answer in time") from None
        if not data:
            raise _NoAnswer("the daemon closed the connection")
        self.buffer += data


class PutSocketClient:
    """Puts messages through the client daemon's socket at ``path``."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._generation = _generation
        self._hold_off_until = 0.0

    def put(self, messages: Sequence[Message]) -> list[Answer]:
        """Hand ``messages`` over (pipelined on one connection); one answer each."""
        if not messages or time.monotonic() < self._hold_off_until:
            return [None] * len(messages)
        answers: list[Answer] = []
        # A kept connection may have been closed by a daemon that restarted:
        # a second try on a fresh one tells that from a daemon that is gone.
        for attempt in (0, 1):
            conn = self._connection(fresh=attempt > 0)
            if conn is None:
                break
            try:
                conn.send(b"".join(encode_request(m) for m in messages[len(answers) :]))
                keep = True
                while len(answers) < len(messages):
                    status, body, keep = conn.read_answer()
                    answers.append(_answer(status, body))
                    if not keep and len(answers) < len(messages):
                        raise _NoAnswer("the daemon closed the connection early")
            except TimeoutError:
                conn.close()
                self._hold_off_until = time.monotonic() + TIMEOUT_HOLD_OFF
                break
            except (OSError, _NoAnswer, ValueError):
                conn.close()
                if answers:
                    break  # something was answered: not a stale connection
                continue
            if keep:
                self._give_back(conn)
            else:
                conn.close()
            break
        return answers + [None] * (len(messages) - len(answers))

    def _connection(self, fresh: bool) -> _Connection | None:
        with self._lock:
            if self._generation != _generation:
                # Forked: the parent's connections are the parent's.
                self._idle = []
                self._generation = _generation
            if self._idle and not fresh:
                return self._idle.pop()
        try:
            return _Connection(self.path, self.timeout)
        except TimeoutError:
            self._hold_off_until = time.monotonic() + TIMEOUT_HOLD_OFF
            return None
        except OSError:
            return None  # no socket, no daemon (refused), a path too long

    def _give_back(self, conn: _Connection) -> None:
        with self._lock:
            if conn.generation == _generation and len(self._idle) < 8:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the kept connections."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _answer(status: int, body: bytes) -> Answer:
    if status == 200:
        return STORED
    try:
        reason = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        reason = body[:200].decode("utf-8", "replace")
    return Refused(status, reason)
