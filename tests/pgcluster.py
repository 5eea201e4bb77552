"""A throwaway PostgreSQL cluster for the tests: initdb and pg_ctl into a temp dir.

Started by the tests themselves on a free port of 127.0.0.1, as the
``postgres`` (or ``nobody``) user when the tests run as root, since the
server refuses to run as root.  Password authentication over TCP, so the
tests use URLs with credentials the way users do.

As a pytest plugin (``pytest_plugins = ["pgcluster"]``) it gives the
session-scoped fixture ``pg_cluster`` (skipping, with the reason, when the
PostgreSQL server binaries are not installed) and ``pg_schema``, a fresh
schema name for one test.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import pytest

USER = "dropr"
PASSWORD = "s3cret-pw"
DATABASE = "dropr"


def find_bindir() -> str | None:
    """The directory of ``initdb`` and ``pg_ctl``, newest version first."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unprivileged_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither 'postgres' nor 'nobody' exists")


class PgCluster:
    """One PostgreSQL server in a temp dir: ``start``, ``stop``, ``crash``, ``url``."""

    def __init__(
        self,
        bindir: str,
        hosts: tuple[str, ...] = ("127.0.0.1",),
        clients: tuple[str, ...] = (),
    ) -> None:
        """Listen on ``hosts``; let in loopback and the networks in ``clients`` (CIDR)."""
        self.bindir = bindir
        self.user = _unprivileged_user()
        self.root = tempfile.mkdtemp(prefix="dropr-pg-")
        self.data = os.path.join(self.root, "data")
        self.logfile = os.path.join(self.root, "server.log")
        self.port = free_port()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        os.chmod(self.root, 0o700)
        pwfile = os.path.join(self.root, "pw")
        with open(pwfile, "w") as f:
            f.write(PASSWORD + "\n")
        if self.user is not None:
            os.chown(pwfile, pwd.getpwnam(self.user).pw_uid, -1)
        self._as_user(
            "initdb", "-D", self.data, "-U", USER, "--pwfile", pwfile,
            "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-instructions",
        )  # fmt: skip
        os.unlink(pwfile)
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(
                f"port = {self.port}\n"
                f"listen_addresses = '{','.join(hosts)}'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 300\n"
                "shared_buffers = 64MB\n"
                # The tests want durable commits (the default) but no long
                # checkpoints on a shared box.
                "max_wal_size = 256MB\n"
                "log_min_messages = warning\n"
            )
        # Clients on other loopback addresses stand for other hosts.
        with open(os.path.join(self.data, "pg_hba.conf"), "a") as f:
            f.write("host all all 127.0.0.0/8 scram-sha-256\n")
            for network in clients:
                f.write(f"host all all {network} scram-sha-256\n")
        self.start()
        self.psql("template1", f"CREATE DATABASE {DATABASE}")

    def _as_user(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        command = [os.path.join(self.bindir, program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=120, cwd=self.root
        )

    def url(self, database: str = DATABASE, host: str = "127.0.0.1") -> str:
        """A libpq URL with the password in it."""
        return f"postgresql://{USER}:{PASSWORD}@{host}:{self.port}/{database}"

    def start(self) -> None:
        self._as_user("pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode``; ``immediate`` is a crash (recovery at the next start)."""
        self._as_user("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")

    def psql(self, database: str, command: str) -> str:
        """Run one SQL command as the superuser over the Unix socket; its output."""
        result = self._as_user(
            "psql", "-X", "-q", "-A", "-t", "-h", self.root, "-p", str(self.port),
            "-U", USER, "-d", database, "-v", "ON_ERROR_STOP=1", "-c", command,
        )  # fmt: skip
        return result.stdout

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb) missing: apt-get install postgresql")
    cluster = PgCluster(bindir)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_schema() -> str:
    """A schema name no other test uses."""
    return f"t_{uuid.uuid4().hex[:16]}"
