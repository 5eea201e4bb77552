"""A fault-injecting HTTP proxy for tests: 500s, dropped requests and answers.

It sits between a dropr-client and a dropr-server on 127.0.0.1 and, for each
request, does what a plan says:

``pass``            forward the request and relay the answer;
``500`` / ``503``   answer that status itself; the server never sees it;
``drop-request``    forward half the body to the server, then hang up on both
                    (the server must store nothing, the client must retry);
``drop-response``   forward the request, read the server's whole answer,
                    then hang up on the client without it (the server stored
                    the batch, the client must resend it and not get a
                    duplicate);
``delay:<s>``       wait ``s`` seconds, then ``pass``.

Plain threads and blocking sockets, so the proxy needs no reactor and its
faults are independent of the daemons' event loops.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

Plan = Callable[[int], str]


def _read_message(sock: socket.socket, buffer: bytearray) -> tuple[bytes, bytes] | None:
    """Read one HTTP message (head, body) using Content-Length; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return head, body


class FaultProxy:
    """Listens on 127.0.0.1:``port`` and forwards to ``target_port`` per ``plan``."""

    def __init__(self, target_port: int, plan: Plan, port: int = 0) -> None:
        self.target_port = target_port
        self.plan = plan
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        inbuf, upbuf = bytearray(), bytearray()
        try:
            while not self._stopped:
                request = _read_message(client, inbuf)
                if request is None:
                    return
                head, body = request
                with self._lock:
                    n = self.requests
                    self.requests += 1
                action = self.plan(n)
                if action.startswith("delay:"):
                    time.sleep(float(action.split(":", 1)[1]))
                    action = "pass"
                if action in ("500", "503"):
                    self.faults[action] += 1
                    answer = b'{"error": "injected by the fault proxy"}'
                    client.sendall(
                        b"HTTP/1.1 %s Injected\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (action.encode(), len(answer), answer)
                    )
                    continue
                if upstream is None:
                    upstream = socket.create_connection(("127.0.0.1", self.target_port))
                if action == "drop-request":
                    self.faults[action] += 1
                    upstream.sendall(head + body[: len(body) // 2])
                    return
                upstream.sendall(head + body)
                answer_msg = _read_message(upstream, upbuf)
                if answer_msg is None:
                    return
                if action == "drop-response":
                    self.faults[action] += 1
                    return
                client.sendall(answer_msg[0] + answer_msg[1])
        except OSError:
            return
        finally:
            client.close()
            if upstream is not None:
                upstream.close()
