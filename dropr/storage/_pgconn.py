"""Connections of the PostgreSQL store: a pool per process, transactions, errors.

The base of :class:`~dropr.storage._postgres.PostgresStorage`: everything
that talks to libpq and turns its failures into dropr's errors
(``StorageUnavailable`` for a database that cannot be reached, which
dropr-server answers with 503; ``StorageFull`` for a full disk there).
Credentials never reach a message: the spec is shown redacted, and libpq's
own messages are scrubbed of the password.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from dropr.errors import StorageClosed, StorageFull, StorageUnavailable
from dropr.storage._spec import redact

Conn = psycopg.Connection[tuple[Any, ...]]

#: Tries of a transaction that PostgreSQL rolled back for a conflict.
_TRIES = 3


class PgConnections:
    """A libpq spec, the schema to work in, and a pool of connections to it.

    :param spec: a libpq URL; the password may be in it, in a service file
        or in ``PGPASSFILE``.
    :param schema: the schema every connection works in (``search_path``).
    :param pool_size: connections kept at most by this process.
    :param connect_timeout: seconds to wait for a connection before raising
        ``StorageUnavailable``.
    """

    def __init__(self, spec: str, schema: str, pool_size: int, connect_timeout: float) -> None:
        self.spec = spec
        self.where = redact(spec)
        self.schema = schema
        self._closed = False
        self._pool_size = max(1, pool_size)
        self._connect_timeout = connect_timeout
        self._pool_lock = threading.Lock()
        self._pool_pid = -1
        self._pool_instance: ConnectionPool[Conn] | None = None

    def _connect(self) -> Conn:
        """A connection of its own, outside the pool (setting up, or a one-off)."""
        try:
            return psycopg.connect(
                self.spec,
                connect_timeout=max(1, round(self._connect_timeout)),
                application_name="dropr",
            )
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise self._unavailable(e) from None

    def _unavailable(self, e: BaseException) -> StorageUnavailable:
        text = str(e).strip() or type(e).__name__
        password = psycopg.conninfo.conninfo_to_dict(self.spec).get("password")
        if password:
            text = text.replace(str(password), "***")
        return StorageUnavailable(
            f"PostgreSQL store {self.where} is unavailable ({text}): retry once "
            "the database is back (a retried store never stores twice)"
        )

    @property
    def _pool(self) -> ConnectionPool[Conn]:
        """The connection pool of this process, made on first use.

        Not made in ``__init__``: twistd forks to daemonize after the store is
        opened, and the pool's worker threads do not survive a fork.  A pool
        inherited from a parent process is left alone (its sockets are the
        parent's) and a new one made.
        """
        pool = self._pool_instance
        if pool is not None and self._pool_pid == os.getpid():
            return pool
        with self._pool_lock:
            if self._pool_instance is None or self._pool_pid != os.getpid():
                ident = sql.Identifier(self.schema)

                def configure(conn: Conn) -> None:
                    conn.execute(sql.SQL("SET search_path TO {}").format(ident))
                    conn.commit()

                timeout = self._connect_timeout
                self._pool_instance = ConnectionPool(
                    self.spec,
                    min_size=1,
                    max_size=self._pool_size,
                    kwargs={"connect_timeout": max(1, round(timeout)), "application_name": "dropr"},
                    configure=configure,
                    timeout=timeout,
                    reconnect_timeout=float("inf"),
                    name=f"dropr-{self.schema}",
                    open=False,
                )
                self._pool_instance.open(wait=False)
                self._pool_pid = os.getpid()
            return self._pool_instance

    @contextmanager
    def _transaction(self, sync: bool = True) -> Iterator[Conn]:
        """One transaction on a pooled connection, committed on leaving.

        ``sync=False`` commits without waiting for the WAL flush: for changes
        whose loss only hands a message out again (take, release).
        """
        if self._closed:
            raise StorageClosed(f"storage {self.where} is closed: open it again to use it")
        try:
            with self._pool.connection() as conn:
                if not sync:
                    conn.execute("SET LOCAL synchronous_commit = off")
                yield conn
        except psycopg.errors.DiskFull as e:
            raise StorageFull(
                f"PostgreSQL store {self.where} has no disk space left ({e}); nothing "
                "was stored. Free space on the database host"
            ) from None
        except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected):
            raise
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            raise self._unavailable(e) from None

    def _run(self, work: Callable[[Conn], Any], sync: bool = True, idempotent: bool = True) -> Any:
        """``work`` in a transaction, tried again when a conflict rolled it back.

        When the database could not be reached it is tried once more, on a
        fresh connection (the database may have restarted since the pooled
        one was made), if ``idempotent``: a commit cut off may have happened,
        so only work that is harmless twice is repeated.
        """
        for attempt in range(_TRIES):
            try:
                with self._transaction(sync) as conn:
                    return work(conn)
            except (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected):
                if attempt == _TRIES - 1:
                    raise
            except StorageUnavailable:
                if attempt > 0 or self._closed or not idempotent:
                    raise
                # The database may have restarted: drop the pool's dead
                # connections before the one retry.
                self._pool.check()
        raise AssertionError("unreachable")

    def _close_pool(self) -> None:
        self._closed = True
        # A pool inherited from a parent process is the parent's to close.
        if self._pool_instance is not None and self._pool_pid == os.getpid():
            self._pool_instance.close()
