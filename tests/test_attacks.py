"""Attacks on the receiving side, each against a real ``twistd dropr-server``.

Each test is one way an attacker once got further than the promises allow;
docs/security.rst lists the defence beside each test.  They are black-box:
HTTP on 127.0.0.1, the server's ``/proc`` entries and its store, nothing of
the server's insides, so the same file can be run against an older tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dropr
from dropr.testing import ServerProcess, free_port, twistd_command, wait_until
from dropr.wire import CONTENT_TYPE, encode_batch

try:
    from dropr._ids import new_id
    from dropr.daemon._auth import Credentials, sign_request
except ImportError:  # the flat layout of older trees
    from dropr.auth import Credentials, sign_request  # type: ignore[no-redef]
    from dropr.ids import new_id  # type: ignore[no-redef]

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-of-alice-" + "x" * 24
ALICE = Credentials("alice", SECRET.encode())
MIB = 1024 * 1024
EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"


# --- helpers -------------------------------------------------------------


def credentials_files(tmp_path: Path) -> tuple[str, str]:
    """The server's file of clients and alice's own, both owner-only."""
    server = tmp_path / "clients"
    server.write_text(f"alice {SECRET}\n")
    server.chmod(0o600)
    client = tmp_path / "alice"
    client.write_text(f"alice {SECRET}\n")
    client.chmod(0o600)
    return str(server), str(client)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server that stores only what alice signs."""
    clients, _ = credentials_files(tmp_path)
    s = ServerProcess(
        str(tmp_path / "store"), str(tmp_path / "server.log"), extra=["--credentials", clients]
    ).start_and_wait()
    yield s
    s.stop()


def head(length: int, headers: dict[str, str], target: str = "/") -> bytes:
    lines = [
        f"POST {target} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: {CONTENT_TYPE}",
        f"Content-Length: {length}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def send(sock: socket.socket, data: bytes) -> None:
    # The server may hang up midway; what it said is read later.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def answer_of(sock: socket.socket, timeout: float) -> bytes:
    """What the server said on ``sock`` within ``timeout`` s (b"" for nothing)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def signed_batch(messages: list[Any], now: float | None = None) -> tuple[bytes, dict[str, str]]:
    body = encode_batch(messages)
    return body, sign_request(ALICE, body, content_type=CONTENT_TYPE, now=now)


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 60) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": CONTENT_TYPE, **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def messages(n: int, channel: str = "orders", size: int = 10) -> list[Any]:
    return [dropr.Message(new_id(), b"%0*d" % (size, i), channel, 5) for i in range(n)]


def depth(store: str) -> int:
    with dropr.Store(store) as s:
        return sum(q.depth for q in s.stats().values())


def held_files(pid: int) -> tuple[int, int]:
    """(files, bytes) the process holds open that are deleted: spooled bodies."""
    count = size = 0
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.endswith("(deleted)"):
                size += os.stat(os.path.join(fd_dir, fd)).st_size
                count += 1
        except OSError:
            continue
    return count, size


def proc_status(pid: int, field: str) -> int:
    """A ``kB`` figure of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


# --- 1. unauthenticated bodies hold nothing ------------------------------------


def test_unsigned_uploads_hold_no_disk_and_are_refused_at_once(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A real client name, the current time and a signature of zeros: 401 before the body."""
    forged = {
        "X-Dropr-Client": "alice",
        "X-Dropr-Timestamp": str(int(time.time())),
        "X-Dropr-Content-SHA256": "0" * 64,
        "X-Dropr-Signature": "0" * 64,
    }
    socks = [connect(server.port) for _ in range(16)]
    try:
        for s in socks:
            send(s, head(64 * MIB, forged))
        for s in socks:
            send(s, b"D" * MIB)
        time.sleep(0.5)
        files, nbytes = held_files(server.pid)
        print(f"\nunauthenticated uploads hold {files} files, {nbytes} bytes")
        answers = [answer_of(s, 5) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert (files, nbytes) == (0, 0)
    assert all(a.startswith(b"HTTP/1.1 401") for a in answers), answers[0][:80]
    assert depth(server.store) == 0


# --- 2. a replayed signed single message ----------------------------------------


def _capture_one_request() -> tuple[str, threading.Thread, list[bytes]]:
    """A one-shot HTTP server that records the raw request it gets and answers ``{}``."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + _length(data):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            got.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/", thread, got


def test_a_replayed_signed_post_of_the_docs_stores_one_message(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The request docs/examples/signed_post.sh sends, resent byte for byte, stores once."""
    _, client = credentials_files(tmp_path)
    url, thread, got = _capture_one_request()
    subprocess.run(
        ["sh", str(EXAMPLES / "signed_post.sh"), url, client],
        check=True,
        capture_output=True,
        timeout=30,
    )
    thread.join(10)
    [raw] = got
    for _ in range(3):  # the request, then two replays within the skew window
        s = connect(server.port)
        send(s, raw)
        answer = answer_of(s, 10)
        s.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert depth(server.store) == 1


# --- 3. no oracle -----------------------------------------------------------


def test_refusals_tell_no_client_names_apart(server: ServerProcess) -> None:
    """Known or unknown name, good or bad timestamp: one answer, before the body."""
    answers = set()
    for identity in ("alice", "mallory"):
        for timestamp in ("soon", str(int(time.time()))):
            headers = {
                "X-Dropr-Client": identity,
                "X-Dropr-Timestamp": timestamp,
                "X-Dropr-Content-SHA256": "0" * 64,
                "X-Dropr-Signature": "0" * 64,
            }
            s = connect(server.port)
            send(s, head(1000, headers))  # and no body
            started = time.monotonic()
            answer = answer_of(s, 5)
            s.close()
            assert time.monotonic() - started < 2, (identity, timestamp)
            answers.add(answer)
    assert len(answers) == 1, answers
    assert answers.pop().startswith(b"HTTP/1.1 401")


# --- 4. file descriptors -----------------------------------------------------------


def test_running_out_of_descriptors_is_answered_503(tmp_path: Path) -> None:
    """300 stalled signed uploads against a limit of 256 descriptors: 503s, no 500, no drop."""
    if not shutil.which("prlimit"):
        pytest.skip("needs prlimit (util-linux)")
    clients, _ = credentials_files(tmp_path)
    server = ServerProcess(
        str(tmp_path / "store"), str(tmp_path / "server.log"), extra=["--credentials", clients]
    )
    server.wrapper = ["prlimit", "--nofile=256:256", "--"]
    server.start_and_wait()
    stalled: list[socket.socket] = []
    try:
        body, headers = signed_batch(messages(1, size=100_000))
        for _ in range(300):
            s = connect(server.port)
            send(s, head(len(body), headers) + body[:10_000])
            stalled.append(s)
        time.sleep(1.0)
        status, _ = post(server.url, *signed_batch(messages(1)))
        assert status in (200, 503), status
        dropped = answered = 0
        for s in stalled:
            answer = answer_of(s, 0.05)
            if answer:
                assert answer.startswith(b"HTTP/1.1 503"), answer[:80]
                answered += 1
            else:
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        dropped += 1
                except BlockingIOError:
                    pass  # still open, waiting for its body: fine
                except ConnectionResetError:
                    dropped += 1
        print(f"\n300 stalled uploads: {answered} answered 503, {dropped} dropped")
        assert dropped == 0
        for s in stalled:
            s.close()
        stalled.clear()
        wait_until(lambda: post(server.url, *signed_batch(messages(1)))[0] == 200, 30)
    finally:
        for s in stalled:
            s.close()
        server.stop()
    log = server.log_text()
    assert "Too many open files" not in log
    assert "Traceback" not in log


# --- 5. channels ------------------------------------------------------------------


def test_a_channel_flood_leaves_adds_fast(tmp_path: Path) -> None:
    """20,000 new channels with store limits set; a legitimate add stays under 20 ms."""
    clients, _ = credentials_files(tmp_path)
    server = ServerProcess(
        str(tmp_path / "store"),
        str(tmp_path / "server.log"),
        extra=[
            "--credentials",
            clients,
            "--store-max-messages",
            "10000000",
            "--store-max-bytes",
            "10G",
            "--request-timeout",
            "600",
            "--timeout",
            "600",
        ],
    ).start_and_wait()
    try:
        assert post(server.url, *signed_batch(messages(1)))[0] == 200  # "orders" exists
        started = time.monotonic()
        statuses = []
        for r in range(20):
            flood = [m for i in range(1000) for m in messages(1, channel=f"flood{r}-{i}")]
            statuses.append(post(server.url, *signed_batch(flood), timeout=300)[0])
            if time.monotonic() - started > 150:
                break
        flood_s = time.monotonic() - started
        latencies = []
        for _ in range(30):
            body, headers = signed_batch(messages(1))
            t0 = time.monotonic()
            status, _ = post(server.url, body, headers)
            latencies.append(time.monotonic() - t0)
            assert status == 200
        t0 = time.monotonic()
        with urllib.request.urlopen(server.url + "stats", timeout=120) as r:
            stats = r.read()
        stats_s = time.monotonic() - t0
    finally:
        server.stop()
    median = statistics.median(latencies)
    print(
        f"\nflood: {len(statuses)} requests in {flood_s:.1f} s, answers {sorted(set(statuses))}; "
        f"add median {median * 1000:.1f} ms (max {max(latencies) * 1000:.1f}); "
        f"/stats {stats_s * 1000:.0f} ms, {len(stats)} bytes"
    )
    assert 507 in statuses  # beyond --max-channels: refused
    assert median < 0.020, latencies


# --- 6. all or nothing -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["files", "sqlite"])
def test_a_refused_batch_over_many_channels_stores_nothing(tmp_path: Path, kind: str) -> None:
    clients, _ = credentials_files(tmp_path)
    store = str(tmp_path / "store") if kind == "files" else f"sqlite://{tmp_path}/store.db"
    server = ServerProcess(
        store,
        str(tmp_path / "server.log"),
        extra=["--credentials", clients, "--store-max-messages", "5"],
    ).start_and_wait()
    try:
        batch = [m for i in range(10) for m in messages(1, channel=f"c{i}")]
        status, answer = post(server.url, *signed_batch(batch))
    finally:
        server.stop()
    assert status == 507, answer
    if kind == "files":
        assert depth(store) == 0
    else:
        with sqlite3.connect(str(tmp_path / "store.db")) as db:
            assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
    assert "/" not in answer["error"]  # no path of the server's in an answer


# --- 7. local users ----------------------------------------------------------------


def test_local_users_are_not_trusted_by_default(tmp_path: Path) -> None:
    """Unsigned requests on loopback are opt-in; a unix: socket is its owner's only."""
    # As given: no --credentials, no --allow-anonymous-local.
    refused = subprocess.run(
        [
            *twistd_command(),
            "-n",
            "--pidfile=",
            "--logfile",
            str(tmp_path / "refused.log"),
            "dropr-server",
            "--listen",
            f"tcp:{free_port()}:interface=127.0.0.1",
            "--store",
            str(tmp_path / "store"),
        ],
        capture_output=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert b"--allow-anonymous-local" in refused.stdout + refused.stderr
    sock_dir = tmp_path / "run"
    sock_dir.mkdir()
    sock_dir.chmod(0o755)
    sock = str(sock_dir / "dropr.sock")
    local = ServerProcess(
        str(tmp_path / "store"),
        str(tmp_path / "local.log"),
        extra=["--allow-anonymous-local", "--listen", f"unix:{sock}"],
    ).start_and_wait()
    try:
        wait_until(lambda: os.path.exists(sock), 10)
        assert os.stat(sock).st_mode & 0o777 == 0o600
        if os.geteuid() == 0 and shutil.which("setpriv"):
            nobody = pwd.getpwnam("nobody")
            probe = (
                "import socket,sys\n"
                "s=socket.socket(socket.AF_UNIX)\n"
                "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n sys.exit(3)\n"
            )
            done = subprocess.run(
                [
                    "setpriv",
                    f"--reuid={nobody.pw_uid}",
                    f"--regid={nobody.pw_gid}",
                    "--clear-groups",
                    sys.executable,
                    "-c",
                    probe,
                    sock,
                ],
                capture_output=True,
                timeout=30,
            )
            assert done.returncode == 3, done.stderr
    finally:
        local.stop()
    if os.geteuid() == 0:
        assert "runs as root" in local.log_text()  # and says so


# --- memory -------------------------------------------------------------------------


def test_eight_uploads_of_64_mib_keep_memory_bounded(tmp_path: Path) -> None:
    """Eight clients post 63 MiB batches at once: the server's peak RSS stays under 256 MiB."""
    clients = tmp_path / "clients"
    clients.write_text("".join(f"client{n} {SECRET}\n" for n in range(8)))
    clients.chmod(0o600)
    server = ServerProcess(
        str(tmp_path / "store"), str(tmp_path / "server.log"), extra=["--credentials", str(clients)]
    ).start_and_wait()
    errors: list[Any] = []

    def upload(n: int) -> None:
        try:
            payload = bytes([n]) * MIB
            batch = [dropr.Message(new_id(), payload, "big", 5) for _ in range(63)]
            body = encode_batch(batch)
            who = Credentials(f"client{n}", SECRET.encode())
            headers = sign_request(who, body, content_type=CONTENT_TYPE)
            status, answer = post(server.url, body, headers, timeout=300)
            if status != 200 or len(answer["stored"]) != 63:
                errors.append((status, answer))
        except Exception as e:  # handed to the test
            errors.append(e)

    try:
        before = proc_status(server.pid, "VmRSS")
        threads = [threading.Thread(target=upload, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        peak = proc_status(server.pid, "VmHWM")
        after = proc_status(server.pid, "VmRSS")
    finally:
        server.stop()
    print(
        f"\nRSS before {before / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, "
        f"after {after / MIB:.0f} MiB"
    )
    assert errors == []
    assert depth(server.store) == 8 * 63
    assert peak < 256 * MIB
