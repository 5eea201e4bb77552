"""LISTEN for a store's notifications in a thread, for ``PostgresStorage.watch``."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg
from psycopg import sql

#: Seconds between two looks at the stop flag, and before a reconnect.
_POLL = 0.5


class Watcher:
    """Calls ``wake`` (from its own thread) when ``queue`` is named on ``channel``.

    Keeps one connection of its own; when the database goes away it connects
    again, and wakes once after reconnecting, since what was notified
    meanwhile is lost.
    """

    def __init__(self, spec: str, channel: str, queue: str, wake: Callable[[], None]) -> None:
        self._spec = spec
        self._channel = channel
        self._queue = queue
        self._wake = wake
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"dropr-watch-{queue}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening; returns once the thread has let go of its connection."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5 * _POLL + 5)

    def _run(self) -> None:
        first = True
        while not self._stopped.is_set():
            try:
                with psycopg.connect(self._spec, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    if not first:
                        self._wake()
                    first = False
                    while not self._stopped.is_set():
                        for note in conn.notifies(timeout=_POLL):
                            if note.payload == self._queue:
                                self._wake()
            except psycopg.Error:
                first = False
                self._stopped.wait(_POLL)
