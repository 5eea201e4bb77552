"""The receiving side on an open network: authentication, hostile input, limits, permissions.

Servers run in the test's reactor on real sockets on 127.0.0.1 (see
inprocess.py), or as real ``twistd`` processes where the whole path counts.
Every refused request is checked to leave the store exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from inprocess import Server
from twisted.internet import reactor, task
from twisted.internet.defer import ensureDeferred
from twisted.python import usage

import dropr
from dropr._ids import id_at, new_id
from dropr._message import Message
from dropr.client._notifier import ensure_fifo
from dropr.client._transport import DestinationUnavailable, HTTPTransport
from dropr.daemon._auth import (
    CLIENT_HEADER,
    CONTENT_SHA256_HEADER,
    NOT_AUTHENTICATED,
    SCHEME,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Authenticator,
    AuthError,
    Credentials,
    CredentialsError,
    check_not_world_writable,
    load_client_credentials,
    load_server_credentials,
    sign_request,
)
from dropr.daemon._tls import TLSConfigError, is_local_endpoint, parse_endpoint
from dropr.server import tap as server_tap
from dropr.server._receiver import Limits
from dropr.storage.files._storage import FilesystemStorage
from dropr.testing import ClientProcess, ServerProcess, wait_until
from dropr.wire import CONTENT_TYPE, WireError, decode_answer, encode_batch

SECRET_A = b"a" * 16 + b"-secret-of-alice"
SECRET_B = b"b" * 16 + b"-secret-of-bob"
ALICE = Credentials("alice", SECRET_A)
BOB = Credentials("bob", SECRET_B)
LIMITS = Limits(max_request_bytes=200_000, max_messages=50, max_payload=10_000)


# --- helpers -------------------------------------------------------------


def msgs(n: int, channel: str = "orders", size: int = 10, priority: int = 5) -> list[Message]:
    return [Message(new_id(), b"%0*d" % (size, i), channel, priority) for i in range(n)]


def snapshot(root: str) -> dict[str, tuple[int, str]]:
    """Every file and directory under ``root``: its mode and a hash of its content.

    Leaves out the empty spare files a server makes in ``tmp/`` after each
    answer, when it gets round to it (they hold nothing of anyone's).
    """
    out: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.relpath(dirpath, root) == "tmp":
            filenames = [n for n in filenames if not n.startswith("spare.")]
        for name in dirnames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = (os.lstat(path).st_mode, "dir")
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = "fifo"
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, root)] = (st.st_mode, digest)
    return out


def post(url: str, body: bytes, content_type: str = CONTENT_TYPE, **headers: str) -> Any:
    all_headers: dict[str, list[str]] = {"Content-Type": [content_type]}
    for name, value in headers.items():
        all_headers[name.replace("_", "-")] = [value]
    return treq.post(url, data=body, headers=all_headers)


def signed_post(
    url: str,
    body: bytes,
    credentials: Credentials,
    *,
    content_type: str = CONTENT_TYPE,
    query: str = "",
    now: float | None = None,
) -> Any:
    headers = sign_request(credentials, body, query=query, content_type=content_type, now=now)
    all_headers = {name: [value] for name, value in headers.items()}
    all_headers["Content-Type"] = [content_type]
    target = url + ("?" + query if query else "")
    return treq.post(target, data=body, headers=all_headers)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].rstrip("/"))


def raw_exchange(
    port: int, chunks: list[bytes], pause: float = 0.0, timeout: float = 10.0
) -> tuple[bytes, float]:
    """Send ``chunks`` (``pause`` s apart) on a socket; return the answer and the time taken."""
    started = time.monotonic()
    data = b""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(timeout)
        try:
            for chunk in chunks:
                s.sendall(chunk)
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up; what it said is read below
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return data, time.monotonic() - started


def in_thread(f: Callable[[], Any]) -> Any:
    """Run blocking ``f`` in a thread while the reactor runs; its result as a Deferred."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = f()
        except BaseException as e:  # handed to the test
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()

    async def wait() -> Any:
        while thread.is_alive():
            await task.deferLater(reactor, 0.01, lambda: None)
        if "error" in result:
            raise result["error"]
        return result["value"]

    return ensureDeferred(wait())


def _rewrite(body: bytes, index: int, **change: Any) -> bytes:
    """``body`` with record ``index`` changed (checksum fixed): channel, priority."""
    pos = 8
    for _ in range(index):
        (length,) = struct.unpack_from(">I", body, pos)
        pos += 4 + length + 4
    (length,) = struct.unpack_from(">I", body, pos)
    record = body[pos + 4 : pos + 4 + length]
    raw_id, priority, clen, dlen = struct.unpack_from(">16sBBH", record)
    rest = record[20 + clen :]
    channel = change.get("channel", record[20 : 20 + clen])
    priority = change.get("priority", priority)
    new = struct.pack(">16sBBH", raw_id, priority, len(channel), dlen) + channel + rest
    frame = struct.pack(">I", len(new)) + new + struct.pack(">I", zlib.crc32(new))
    return body[:pos] + frame + body[pos + 4 + length + 4 :]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path, LIMITS)
    yield s
    pytest_twisted.blockon(s.stop())


def auth_server(tmp_path: Path, **kw: Any) -> Server:
    authenticator = Authenticator({"alice": SECRET_A, "bob": SECRET_B}, **kw)
    return Server(tmp_path, LIMITS, authenticator=authenticator)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Server]:
    s = auth_server(tmp_path)
    yield s
    pytest_twisted.blockon(s.stop())


# --- 2. authentication: signatures -----------------------------------------


def _verify(a: Authenticator, headers: dict[str, str], body: bytes, **kw: str) -> None:
    """Check ``headers`` as the server does on a request's head, then its body's hash."""
    from twisted.web.http_headers import Headers

    claim = a.check(
        Headers({k: [v] for k, v in headers.items()}),
        kw.get("method", "POST"),
        kw.get("query", ""),
        kw.get("content_type", CONTENT_TYPE),
        has_body=True,
    )
    assert claim is not None
    if claim.body_sha256 != hashlib.sha256(body).hexdigest():
        raise AuthError("the body is not the one signed")


def test_a_signature_covers_body_query_type_method_and_identity() -> None:
    a = Authenticator({"alice": SECRET_A, "bob": SECRET_B})
    body = encode_batch(msgs(2))
    headers = sign_request(ALICE, body, content_type=CONTENT_TYPE)
    _verify(a, headers, body)  # as signed: accepted
    for change in ({"query": "channel=x"}, {"content_type": "text/plain"}, {"method": "PUT"}):
        with pytest.raises(AuthError, match="wrong signature"):
            _verify(a, headers, body, **change)
    # The body is held to the hash the signature covers ...
    with pytest.raises(AuthError, match="not the one signed"):
        _verify(a, headers, body + b"x")
    # ... and the hash cannot be swapped under the signature.
    other = hashlib.sha256(body + b"x").hexdigest()
    with pytest.raises(AuthError, match="wrong signature"):
        _verify(a, dict(headers, **{CONTENT_SHA256_HEADER: other}), body + b"x")
    # Alice's secret cannot speak for Bob.
    as_bob = dict(headers, **{CLIENT_HEADER: "bob"})
    with pytest.raises(AuthError, match="wrong signature"):
        _verify(a, as_bob, body)
    with pytest.raises(AuthError, match="unknown client"):
        _verify(a, sign_request(Credentials("mallory", SECRET_A), body), body)


def test_stale_or_future_timestamps_and_malformed_headers_are_refused() -> None:
    now = 1_800_000_000.0
    a = Authenticator({"alice": SECRET_A}, clock=lambda: now)
    body = b"x"
    _verify(a, sign_request(ALICE, body, content_type=CONTENT_TYPE, now=now - 299), body)
    for when, word in ((now - 301, "behind"), (now + 301, "ahead of")):
        with pytest.raises(AuthError, match=word):
            _verify(a, sign_request(ALICE, body, now=when), body)
    good = sign_request(ALICE, body, content_type=CONTENT_TYPE, now=now)
    for name, value, reason in (
        (TIMESTAMP_HEADER, "soon", "seconds since the epoch"),
        (TIMESTAMP_HEADER, "-5", "seconds since the epoch"),
        (TIMESTAMP_HEADER, "9" * 40, "seconds since the epoch"),
        (SIGNATURE_HEADER, "zz" * 32, "64 lowercase hex"),
        (SIGNATURE_HEADER, "00", "64 lowercase hex"),
        (CLIENT_HEADER, "../alice", "unknown client"),
    ):
        with pytest.raises(AuthError, match=reason):
            _verify(a, dict(good, **{name: value}), body)
    partial = {CLIENT_HEADER: "alice"}
    with pytest.raises(AuthError, match="go together"):
        _verify(a, partial, body)


def test_one_canonical_timestamp_form() -> None:
    """(attack 3) A zero-padded timestamp signs the same text; it is refused all the same."""
    now = 1_800_000_000.0
    a = Authenticator({"alice": SECRET_A}, clock=lambda: now)
    good = sign_request(ALICE, b"x", content_type=CONTENT_TYPE, now=now)
    _verify(a, good, b"x")
    for padded in ("0" + good[TIMESTAMP_HEADER], "+" + good[TIMESTAMP_HEADER]):
        with pytest.raises(AuthError, match="seconds since the epoch"):
            _verify(a, dict(good, **{TIMESTAMP_HEADER: padded}), b"x")


def test_every_refusal_reads_alike_whatever_was_wrong() -> None:
    """(attack 3) The log learns why; the answer is one text for every reason."""
    now = 1_800_000_000.0
    a = Authenticator({"alice": SECRET_A}, clock=lambda: now)
    good = sign_request(ALICE, b"x", content_type=CONTENT_TYPE, now=now)
    reasons = set()
    for headers in (
        dict(good, **{CLIENT_HEADER: "nobody"}),
        dict(good, **{TIMESTAMP_HEADER: "soon"}),
        dict(good, **{TIMESTAMP_HEADER: str(int(now) - 3600)}),
        dict(good, **{SIGNATURE_HEADER: "0" * 64}),
        {CLIENT_HEADER: "alice"},
    ):
        with pytest.raises(AuthError) as refused:
            _verify(a, headers, b"x")
        reasons.add(str(refused.value))
    assert len(reasons) == 5  # the log tells them apart; the client is told NOT_AUTHENTICATED


# --- 2. authentication: credentials files ------------------------------------


def write_secret_file(path: Path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_credentials_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    text = "# clients\nalice " + SECRET_A.decode() + "\n\nbob " + SECRET_B.decode() + "\n"
    for mode in (0o644, 0o640, 0o604, 0o660, 0o602):
        path = write_secret_file(tmp_path / f"creds-{mode:o}", text, mode)
        with pytest.raises(CredentialsError, match=r"chmod 600"):
            load_server_credentials(path)
    path = write_secret_file(tmp_path / "creds", text)
    assert load_server_credentials(path) == {"alice": SECRET_A, "bob": SECRET_B}
    with pytest.raises(CredentialsError, match="exactly one"):
        load_client_credentials(path)
    client = write_secret_file(tmp_path / "client", "alice " + SECRET_A.decode() + "\n")
    assert load_client_credentials(client) == ALICE
    assert "secret" not in repr(ALICE).replace("secret=<hidden>", "")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("alice short\n", "at least 16"),
        ("../alice " + "s" * 20 + "\n", "invalid identity"),
        ("alice\n", "expected"),
        ("alice " + "s" * 20 + " extra\n", "expected"),
        ("alice " + "s" * 20 + "\nalice " + "t" * 20 + "\n", "listed twice"),
        ("# nobody\n", "lists no client"),
        ("alice sécrétsécrétsécrét\n", "cannot read"),
    ],
)
def test_bad_credentials_files_are_refused_with_a_reason(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "creds"
    path.write_bytes(text.encode("utf-8"))
    os.chmod(path, 0o600)
    with pytest.raises(CredentialsError, match=reason):
        load_server_credentials(str(path))


def test_the_server_refuses_to_start_with_a_readable_credentials_file(tmp_path: Path) -> None:
    creds = write_secret_file(tmp_path / "creds", "alice " + SECRET_A.decode() + "\n", 0o644)
    options = server_tap.Options()
    options.parseOptions(["--store", str(tmp_path / "store"), "--credentials", creds])
    with pytest.raises(SystemExit, match="can be read or written by other users"):
        server_tap.makeService(options)
    assert not (tmp_path / "store").exists()  # refused before anything was made


def test_anonymous_requests_need_loopback_or_an_explicit_flag(tmp_path: Path) -> None:
    store = str(tmp_path / "store")

    def parse(*args: str) -> server_tap.Options:
        options = server_tap.Options()
        options.parseOptions(["--store", store, *args])
        return options

    # (attack 7) Local users are not trusted by default: even on loopback,
    # unsigned requests are opt-in.
    for listen in (
        [],
        ["--listen", "tcp:8080"],
        ["--listen", "tcp:8080:interface=0.0.0.0"],
        ["--listen", "tcp:8080:interface=127.0.0.1"],
        ["--listen", f"unix:{tmp_path}/sock"],
    ):
        with pytest.raises(usage.UsageError, match="allow-anonymous-local"):
            parse(*listen)
    local = "--allow-anonymous-local"
    with pytest.raises(usage.UsageError, match="tcp:9 "):
        parse(local, "--listen", "tcp:8080:interface=127.0.0.1", "--listen", "tcp:9")
    with pytest.raises(usage.UsageError, match="tcp:9 "):
        parse(local, "--listen", "tcp:9", "--credentials", "somefile")
    parse(local, "--listen", "tcp:8080:interface=127.0.0.1")
    parse(local, "--listen", "tcp:8080:127.0.0.1")
    parse(local, "--listen", "tcp6:8080:interface=\\:\\:1")
    parse(local, "--listen", f"unix:{tmp_path}/sock")
    parse("--listen", "tcp:8080", "--insecure-allow-anonymous")
    parse("--listen", "tcp:8080", "--credentials", "somefile")


def test_endpoint_strings_are_read_as_twisted_reads_them() -> None:
    assert parse_endpoint("ssl:8443:privateKey=/k\\:x.pem:certKey=c.pem") == (
        "ssl",
        ["8443"],
        {"privateKey": "/k:x.pem", "certKey": "c.pem"},
    )
    assert is_local_endpoint("tcp:80:interface=127.0.0.1")
    # Twisted reads tcp:PORT:INTERFACE:BACKLOG, positionally too.
    assert is_local_endpoint("tcp:80:127.0.0.2")
    assert is_local_endpoint("tcp:80:127.0.0.1:50")
    assert not is_local_endpoint("tcp:80:0.0.0.0:50")
    assert is_local_endpoint("tcp:80:backlog=50:interface=127.0.0.1")
    assert is_local_endpoint("tcp6:80:interface=\\:\\:1")
    assert is_local_endpoint("unix:/run/dropr.sock")
    assert not is_local_endpoint("tcp:80")
    assert not is_local_endpoint("tcp:80:interface=10.0.0.1")
    assert not is_local_endpoint("tcp:80:interface=127.0.0.1.example.com")
    # A string Twisted cannot turn into an endpoint is refused, not guessed at.
    with pytest.raises(TLSConfigError, match="cannot listen"):
        is_local_endpoint("systemd:domain=INET:index=0")
    with pytest.raises(TLSConfigError, match="cannot listen"):
        is_local_endpoint("tcp:80:50:127.0.0.1")


# --- 2. authentication: on a real socket -------------------------------------


@pytest_twisted.inlineCallbacks
def test_signed_requests_are_stored_and_others_get_401(secured: Server) -> Any:
    before = snapshot(secured.storage.path)
    body = encode_batch(msgs(3))
    # Unsigned, wrongly signed, signed as another client, stale: 401, nothing stored.
    for attempt in (
        post(secured.url, body),
        signed_post(secured.url, body, Credentials("alice", SECRET_B)),
        signed_post(secured.url, body, Credentials("bob", SECRET_A)),
        signed_post(secured.url, body, ALICE, now=time.time() - 3600),
        # Signed, then not what was signed: a body changed on the way.
        treq.post(
            secured.url,
            data=encode_batch(msgs(3)),
            headers={
                "Content-Type": [CONTENT_TYPE],
                **{k: [v] for k, v in sign_request(ALICE, body, content_type=CONTENT_TYPE).items()},
            },
        ),
    ):
        response = yield attempt
        assert response.code == 401
        assert response.headers.getRawHeaders("WWW-Authenticate") == [SCHEME]
        assert json.loads((yield response.content()))["error"] == NOT_AUTHENTICATED
    assert snapshot(secured.storage.path) == before
    # Health needs no credentials; storing does.
    response = yield treq.get(secured.url + "health")
    assert json.loads((yield response.content())) == {"status": "ok"}
    response = yield signed_post(secured.url, body, ALICE)
    assert response.code == 200
    assert len(json.loads((yield response.content()))["stored"]) == 3
    assert secured.depth() == 3


@pytest_twisted.inlineCallbacks
def test_a_single_message_is_signed_with_its_query(secured: Server) -> Any:
    query = f"channel=jobs&priority=1&id={new_id()}"
    response = yield signed_post(secured.url, b"raw", ALICE, content_type="text/plain", query=query)
    assert response.code == 200
    yield response.content()
    # The same signature with another channel in the query: refused.
    headers = sign_request(ALICE, b"raw", query=query, content_type="text/plain")
    response = yield treq.post(
        secured.url + "?" + query.replace("jobs", "evil"),
        data=b"raw",
        headers={"Content-Type": ["text/plain"], **{k: [v] for k, v in headers.items()}},
    )
    assert response.code == 401
    yield response.content()
    assert secured.storage.queues() == ["jobs"]


@pytest_twisted.inlineCallbacks
def test_an_unsigned_body_is_refused_before_it_is_read(secured: Server) -> Any:
    before = snapshot(secured.storage.path)
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: " + CONTENT_TYPE.encode() + b"\r\n"
        b"Content-Length: 150000\r\n\r\n"
    )
    answer, _ = yield in_thread(lambda: raw_exchange(port_of(secured.url), [head]))
    assert answer.startswith(b"HTTP/1.1 401")
    assert NOT_AUTHENTICATED.encode() in answer
    # A chunked body too.
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: " + CONTENT_TYPE.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    answer, _ = yield in_thread(lambda: raw_exchange(port_of(secured.url), [head]))
    assert answer.startswith(b"HTTP/1.1 401")
    assert snapshot(secured.storage.path) == before


@pytest_twisted.inlineCallbacks
def test_replayed_requests_store_nothing_new(tmp_path: Path) -> Any:
    server = auth_server(tmp_path)
    try:
        batch = msgs(4)
        body = encode_batch(batch)
        now = time.time()
        for _ in range(3):  # the request, then two replays byte for byte
            response = yield signed_post(server.url, body, ALICE, now=now)
            answer = json.loads((yield response.content()))
            assert sorted(answer["stored"]) == sorted(m.id for m in batch)
        assert server.depth() == 4
        taken = server.storage.take("orders", 100)
        assert sorted(m.id for m in taken) == sorted(m.id for m in batch)
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_a_client_cannot_displace_another_clients_message(secured: Server) -> Any:
    """Bob reusing an id Alice stored gets "stored" and changes nothing."""
    [mine] = msgs(1)
    response = yield signed_post(secured.url, encode_batch([mine]), ALICE)
    yield response.content()
    before = snapshot(secured.storage.path)
    forged = Message(mine.id, b"forged by bob", mine.channel, mine.priority)
    response = yield signed_post(secured.url, encode_batch([forged]), BOB)
    assert json.loads((yield response.content()))["stored"] == [mine.id]
    assert snapshot(secured.storage.path) == before
    [kept] = secured.storage.take("orders", 10)
    assert kept.payload == mine.payload


@pytest_twisted.inlineCallbacks
def test_the_transport_signs_and_a_refusal_keeps_the_messages(secured: Server) -> Any:
    transport = HTTPTransport(reactor, credentials=ALICE)
    wrong = HTTPTransport(reactor, credentials=Credentials("alice", SECRET_B))
    try:
        batch = msgs(3)
        results = yield transport.send(secured.url, batch)
        assert all(r.stored for r in results)
        with pytest.raises(DestinationUnavailable, match="401"):
            yield wrong.send(secured.url, msgs(2))
        unsigned = HTTPTransport(reactor)
        try:
            with pytest.raises(DestinationUnavailable, match="credentials"):
                yield unsigned.send(secured.url, msgs(2))
        finally:
            yield unsigned.close()
        assert secured.depth() == 3
    finally:
        yield transport.close()
        yield wrong.close()


@pytest_twisted.inlineCallbacks
def test_anonymous_allowed_still_checks_what_is_signed(tmp_path: Path) -> Any:
    server = auth_server(tmp_path, allow_anonymous=True)
    try:
        response = yield post(server.url, encode_batch(msgs(1)))
        assert response.code == 200
        yield response.content()
        response = yield signed_post(
            server.url, encode_batch(msgs(1)), Credentials("alice", SECRET_B)
        )
        assert response.code == 401
        yield response.content()
        assert server.depth() == 1
    finally:
        yield server.stop()


@pytest.mark.slow
def test_daemons_with_credentials_deliver_and_wrong_ones_keep_messages(tmp_path: Path) -> None:
    server_creds = write_secret_file(
        tmp_path / "clients", f"alice {SECRET_A.decode()}\nbob {SECRET_B.decode()}\n"
    )
    alice = write_secret_file(tmp_path / "alice", f"alice {SECRET_A.decode()}\n")
    mallory = write_secret_file(tmp_path / "mallory", f"alice {SECRET_B.decode()}\n")
    server = ServerProcess(
        str(tmp_path / "store"), str(tmp_path / "server.log"), extra=["--credentials", server_creds]
    ).start_and_wait()
    good = bad = None
    try:
        good = ClientProcess(
            str(tmp_path / "spool-a"), str(tmp_path / "a.log"), extra=["--credentials", alice]
        ).start_and_wait()
        bad = ClientProcess(
            str(tmp_path / "spool-m"),
            str(tmp_path / "m.log"),
            extra=["--credentials", mallory, "--backoff-cap", "1"],
        ).start_and_wait()
        ids = [dropr.put(b"from alice %d" % i, server.url, spool=good.spool) for i in range(5)]
        evil = [dropr.put(b"from mallory", server.url, spool=bad.spool) for _ in range(3)]
        with dropr.Store(server.store) as store:
            wait_until(
                lambda: sum(s.depth for s in store.stats().values()) >= 5, 30, what="delivery"
            )
            wait_until(lambda: "refused this client's credentials" in bad.log_text(), 30)
            time.sleep(0.5)
            got = store.take("common", 100)
            assert sorted(m.id for m in got) == sorted(ids)
        # Mallory's messages wait in the spool (not failed): fix the secret, and they go.
        with dropr.Spool(bad.spool) as spool:
            stats = spool.stats()[server.url]
            assert stats.depth == 3 and stats.failed == 0
        assert not set(evil) & {m.id for m in got}
        assert "401" in bad.log_text()
        # The server's log says which client stored what.
        assert re.search(
            r"stored \d+ messages, .* from 127\.0\.0\.1 \(client alice\)", server.log_text()
        )
        assert "accepts requests signed by 2 clients" in server.log_text()
    finally:
        for p in (good, bad):
            if p is not None:
                p.stop()
        server.stop()


# --- 3. hostile input ----------------------------------------------------


BAD_CHANNELS = [
    b"..",
    b".",
    b"../x",
    b"a/b",
    b"/etc",
    b"a\x00b",
    b"x" * 65,
    b"",
    b"-x",
    b".hidden",
    "ordérs".encode(),
    "\uff4f\uff52\uff44\uff45\uff52\uff53".encode(),  # fullwidth "orders"
    "a\u2215b".encode(),  # division slash
    "a\u202eb".encode(),  # right-to-left override
    b"a b",
    b"a\\b",
    b"~b3JkZXJz",  # how a spool encodes other names: not a channel
]


@pytest_twisted.inlineCallbacks
def test_hostile_channel_names_in_records_are_refused_one_by_one(server: Server) -> Any:
    good = msgs(2)
    victims = msgs(len(BAD_CHANNELS), channel="x")
    body = encode_batch([*good, *victims])
    for i, name in enumerate(BAD_CHANNELS):
        body = _rewrite(body, 2 + i, channel=name)
    response = yield post(server.url, body)
    answer = json.loads((yield response.content()))
    assert sorted(answer["stored"]) == sorted(m.id for m in good)
    assert set(answer["rejected"]) == {m.id for m in victims}
    assert all("invalid channel" in r for r in answer["rejected"].values())
    assert server.storage.queues() == ["orders"]
    assert sorted(os.listdir(os.path.join(server.storage.path, "queues"))) == ["orders"]


@pytest_twisted.inlineCallbacks
def test_hostile_priorities_in_records_are_refused(server: Server) -> Any:
    victims = msgs(3)
    body = encode_batch(victims)
    for i, priority in enumerate((10, 128, 255)):
        body = _rewrite(body, i, priority=priority)
    before = snapshot(server.storage.path)
    response = yield post(server.url, body)
    answer = json.loads((yield response.content()))
    assert answer["stored"] == []
    assert all("invalid priority" in r for r in answer["rejected"].values())
    assert snapshot(server.storage.path) == before


HOSTILE_QUERIES = [
    ("channel=..", "invalid channel"),
    ("channel=%2e%2e", "invalid channel"),
    ("channel=../../etc", "invalid channel"),
    ("channel=a%2Fb", "invalid channel"),
    ("channel=a%00b", "invalid channel"),
    ("channel=" + "x" * 65, "invalid channel"),
    ("channel=" + "x" * 5000, "invalid channel"),
    ("channel=%C3%A9t%C3%A9", "must be ASCII"),
    ("channel=%EF%BC%8Fetc", "must be ASCII"),
    ("channel=%FF", "must be ASCII"),
    ("priority=-1", "invalid priority"),
    ("priority=10", "invalid priority"),
    ("priority=" + "9" * 40, "invalid priority"),
    ("priority=1.5", "invalid priority"),
    ("priority=0x1", "invalid priority"),
    ("priority=", "invalid priority"),
    ("id=../../etc/passwd", "invalid id"),
    ("id=" + "A" * 32, "invalid id"),
    ("id=" + "a" * 31, "invalid id"),
    ("id=" + "a" * 33, "invalid id"),
    ("id=" + "a" * 31 + "%00", "invalid id"),
    ("id=" + "a" * 31 + "%2F", "invalid id"),
]


@pytest_twisted.inlineCallbacks
def test_hostile_query_strings_get_400_and_change_nothing(server: Server) -> Any:
    before = snapshot(server.storage.path)
    for query, reason in HOSTILE_QUERIES:
        response = yield post(server.url + "?" + query, b"payload", "text/plain")
        assert response.code == 400, query
        assert reason in json.loads((yield response.content()))["error"], query
    assert snapshot(server.storage.path) == before


@pytest_twisted.inlineCallbacks
def test_hostile_paths_and_methods_change_nothing(server: Server) -> Any:
    before = snapshot(server.storage.path)
    for path in ("../../etc/passwd", "%2e%2e/%2e%2e/x", "orders", "a%00b", "x" * 4000):
        response = yield post(server.url + path, encode_batch(msgs(1)))
        assert response.code == 404, path
        yield response.content()
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        for data in (encode_batch(msgs(1)), None):
            response = yield treq.request(method, server.url, data=data)
            assert response.code == 405, method
            assert response.headers.getRawHeaders("Allow") == ["GET, HEAD, POST"]
            assert "is not served here" in json.loads((yield response.content()))["error"]
    # Paths in one plain form only: an escaped one names no page.
    for path in ("%73tats", "health%2f", "./health", "/health", "metrics/../stats"):
        response = yield treq.get(server.url + path)
        assert response.code == 404, path
        assert "error" in json.loads((yield response.content()))
    assert snapshot(server.storage.path) == before


MALFORMED = [
    (b"", "not a dropr batch"),
    (b"DROPRB1", "not a dropr batch"),
    (b"DROPRB2\n" + b"\0" * 30, "not a dropr batch"),
    (b"DROPRB1\n\x00\x00", "ends inside a record length"),
    (b"DROPRB1\n\x00\x00\x00\x05hello\x00\x00\x00\x00", "impossible length"),
    (b"DROPRB1\n\xff\xff\xff\xff" + b"\0" * 64, "largest message"),
    (b"DROPRB1\n\x00\x00\x10\x00" + b"\0" * 64, "ends inside the record"),
    (encode_batch(msgs(1))[:-1] + b"\x01", "checksum mismatch"),
    (encode_batch(msgs(2)) + b"\x00", "ends inside a record length"),
    (encode_batch(msgs(51)), "more than 50 messages"),
]


@pytest_twisted.inlineCallbacks
def test_malformed_framing_gets_4xx_and_changes_nothing(server: Server) -> Any:
    before = snapshot(server.storage.path)
    for body, reason in MALFORMED:
        response = yield post(server.url, body)
        assert response.code in (400, 413), reason
        assert reason in json.loads((yield response.content()))["error"]
    assert snapshot(server.storage.path) == before
    # An empty batch (magic alone) is a valid request that stores nothing.
    response = yield post(server.url, b"DROPRB1\n")
    assert json.loads((yield response.content())) == {"stored": [], "rejected": {}}
    assert snapshot(server.storage.path) == before


@pytest_twisted.inlineCallbacks
def test_a_chunked_body_over_the_limit_is_cut_off(server: Server) -> Any:
    before = snapshot(server.storage.path)
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: " + CONTENT_TYPE.encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (50_000, b"D" * 50_000)
    answer, _ = yield in_thread(
        lambda: raw_exchange(port_of(server.url), [head, *[chunk] * 6, b"0\r\n\r\n"])
    )
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"larger than this server's limit" in answer
    assert snapshot(server.storage.path) == before
    assert os.listdir(server.work_dir) == []  # the spooled part is gone too


@pytest_twisted.inlineCallbacks
def test_a_malformed_request_head_gets_400(server: Server) -> Any:
    before = snapshot(server.storage.path)
    for raw in (
        b"POST / HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\x00\xff garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n",
    ):
        answer, _ = yield in_thread(lambda raw=raw: raw_exchange(port_of(server.url), [raw]))
        assert answer[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 431"), raw[:40]
    assert snapshot(server.storage.path) == before


def test_the_client_refuses_answers_that_are_not_drops_json() -> None:
    batch = msgs(2)
    for answer in (
        b"<html>",
        b"[]",
        b'{"stored": 5}',
        b'{"stored": [[1]]}',
        b'{"stored": [], "rejected": []}',
        b'{"rejected": {}}',
        b"\xff\xfe",
        b'{"stored": ' * 10_000,
    ):
        with pytest.raises(WireError, match="unreadable answer"):
            decode_answer(answer, batch)
    # Ids the answer does not mention are not taken as stored.
    results = decode_answer(b'{"stored": ["nothing-we-sent"], "rejected": {}}', batch)
    assert not any(r.stored for r in results)


@pytest.mark.slow
@pytest_twisted.inlineCallbacks
def test_a_slow_loris_is_answered_408_and_cut_off(tmp_path: Path) -> Any:
    server = Server(tmp_path, Limits(request_timeout=1.0))
    try:
        before = snapshot(server.storage.path)
        head = (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: " + CONTENT_TYPE.encode() + b"\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        # A byte every 0.1 s: never idle, never done.
        drip = [head, *(b"D" for _ in range(100))]
        answer, took = yield in_thread(
            lambda: raw_exchange(port_of(server.url), drip, pause=0.1, timeout=20)
        )
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert b"not received whole within 1 s" in answer or b"within 1 seconds" in answer
        assert took < 15
        # The request line alone, a byte at a time.
        line = [bytes([c]) for c in b"POST /" + b"x" * 200]
        answer, took = yield in_thread(
            lambda: raw_exchange(port_of(server.url), line, pause=0.05, timeout=20)
        )
        assert answer.startswith(b"HTTP/1.1 408")
        assert snapshot(server.storage.path) == before
        # The server carries on.
        response = yield post(server.url, encode_batch(msgs(2)))
        assert response.code == 200
        yield response.content()
    finally:
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_connections_beyond_the_limit_get_503(tmp_path: Path) -> Any:
    server = Server(tmp_path, Limits(max_connections=3))
    port = port_of(server.url)
    held: list[socket.socket] = []
    try:
        before = snapshot(server.storage.path)
        for _ in range(3):
            held.append(socket.create_connection(("127.0.0.1", port)))
        yield task.deferLater(reactor, 0.2, lambda: None)
        assert server.site.connections == 3
        answer, _ = yield in_thread(
            lambda: raw_exchange(port, [b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"])
        )
        assert answer.startswith(b"HTTP/1.1 503")
        assert b"too many connections" in answer
        assert snapshot(server.storage.path) == before
        for s in held:
            s.close()
        held.clear()
        yield task.deferLater(reactor, 0.2, lambda: None)
        assert server.site.connections == 0
        response = yield post(server.url, encode_batch(msgs(1)))
        assert response.code == 200
        yield response.content()
    finally:
        for s in held:
            s.close()
        yield server.stop()


@pytest_twisted.inlineCallbacks
def test_after_all_that_the_server_still_serves(server: Server) -> Any:
    """Nothing above crashes the server: a mix of hostile requests, then a good one."""
    for body, _reason in MALFORMED:
        response = yield post(server.url, body)
        yield response.content()
    for query, _reason in HOSTILE_QUERIES[:5]:
        response = yield post(server.url + "?" + query, b"x", "text/plain")
        yield response.content()
    response = yield post(server.url, encode_batch(msgs(5)))
    assert response.code == 200
    yield response.content()
    response = yield treq.get(server.url + "health")
    assert json.loads((yield response.content())) == {"status": "ok"}
    assert server.depth() == 5


# --- 5. local permissions ------------------------------------------------


def _modes_are_private(root: str) -> list[str]:
    wide = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                wide.append(f"{os.path.relpath(path, root)} {mode:04o}")
    mode = stat.S_IMODE(os.stat(root).st_mode)
    if mode & 0o077:
        wide.append(f". {mode:04o}")
    return wide


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_spool_and_store_are_owner_only_whatever_the_umask(
    tmp_path: Path, open_umask: None
) -> None:
    spool = str(tmp_path / "spool")
    with dropr.Spool(spool) as sp:
        sp.put_many([b"a", b"b"], "http://127.0.0.1:9/", channel="orders")
        [m, _] = sp.take("http://127.0.0.1:9/", 10)
        sp.fail([m], "for the test")
    ensure_fifo(spool)
    store_path = str(tmp_path / "store")
    storage = FilesystemStorage(store_path, dedup=True)
    try:
        storage.add("orders", msgs(3))
        [m] = storage.take("orders", 1)
        storage.fail([m], "for the test")
        storage.maintain()
    finally:
        storage.close()
    assert _modes_are_private(spool) == []
    assert _modes_are_private(store_path) == []


@pytest.mark.slow
def test_real_daemons_make_owner_only_paths_with_an_open_umask(
    tmp_path: Path, open_umask: None
) -> None:
    server = ServerProcess(str(tmp_path / "store"), str(tmp_path / "server.log"))
    server.start_and_wait()
    client = ClientProcess(str(tmp_path / "spool"), str(tmp_path / "client.log"))
    try:
        client.start_and_wait()
        dropr.put(b"x", server.url, spool=client.spool)
        with dropr.Store(server.store) as store:
            wait_until(lambda: bool(store.stats()), 30, what="delivery")
    finally:
        client.stop()
        server.stop()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "spool" / "notify").st_mode)
    assert _modes_are_private(str(tmp_path / "spool")) == []
    assert _modes_are_private(str(tmp_path / "store")) == []


def test_daemons_refuse_a_world_writable_spool_or_store(tmp_path: Path) -> None:
    for name in ("store", "spool"):
        path = tmp_path / name
        path.mkdir(mode=0o777)
        os.chmod(path, 0o777)
        with pytest.raises(CredentialsError, match="chmod 700"):
            check_not_world_writable(str(path), name)
    options = server_tap.Options()
    listen = ["-l", "tcp:0:interface=127.0.0.1", "--allow-anonymous-local"]
    options.parseOptions(["--store", str(tmp_path / "store"), *listen])
    with pytest.raises(SystemExit, match="writable by every user"):
        server_tap.makeService(options)
    # A store its group may write is refused as well.
    os.chmod(tmp_path / "store", 0o770)
    with pytest.raises(SystemExit, match="writable by its group"):
        server_tap.makeService(options)
    from dropr.client import tap as client_tap

    options = client_tap.Options()
    options.parseOptions(["--spool", str(tmp_path / "spool")])
    with pytest.raises(SystemExit, match="writable by every user"):
        client_tap.makeService(options)
    assert os.listdir(tmp_path / "store") == [] and os.listdir(tmp_path / "spool") == []


def test_ids_carry_64_random_bits() -> None:
    """Why a client cannot make the server drop another's message as a duplicate."""
    at = time.time()
    ids = {id_at(at) for _ in range(10_000)}
    assert len(ids) == 10_000  # same millisecond, all different
    tails = [int(i[16:], 16) for i in ids]
    assert max(tails).bit_length() == 64  # the random half uses all its bits
    assert len({t >> 48 for t in tails}) > 60_000 // 1000  # and is spread out


@pytest.mark.slow
def test_the_server_runs_as_an_unprivileged_user(tmp_path: Path) -> None:
    """Started as ``nobody`` (as systemd's User= would), it stores, and its files are nobody's."""
    import pwd
    import shutil
    import subprocess
    import sys
    import tempfile
    import urllib.request

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to switch to another user")
    nobody = pwd.getpwnam("nobody")
    as_nobody = [
        "setpriv",
        f"--reuid={nobody.pw_uid}",
        f"--regid={nobody.pw_gid}",
        "--clear-groups",
    ]
    probe = subprocess.run([*as_nobody, sys.executable, "-c", "import dropr"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this Python or dropr cannot be run by nobody (e.g. under /root)")
    top = tempfile.mkdtemp(prefix="dropr-nobody-")  # tmp_path's parents are root's, 0700
    try:
        os.chown(top, nobody.pw_uid, nobody.pw_gid)
        server = ServerProcess(os.path.join(top, "store"), os.path.join(top, "server.log"))
        server.wrapper = as_nobody
        server.start_and_wait()
        try:
            [message] = msgs(1)
            request = urllib.request.Request(
                server.url, data=encode_batch([message]), headers={"Content-Type": CONTENT_TYPE}
            )
            with urllib.request.urlopen(request, timeout=10) as r:
                assert json.loads(r.read())["stored"] == [message.id]
        finally:
            server.stop()
        made = [os.path.join(d, n) for d, ds, fs in os.walk(top) for n in [*ds, *fs]]
        assert len(made) > 5
        for path in made:
            assert os.lstat(path).st_uid == nobody.pw_uid, path
        assert _modes_are_private(os.path.join(top, "store")) == []
    finally:
        shutil.rmtree(top, ignore_errors=True)
