"""Waking consumers: inotify on a queue's ``wake`` file, which every add touches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.filepath import FilePath

log = Logger()


def watch_wake_file(path: str, callback: Callable[[], None], reactor: Any) -> Callable[[], None]:
    """Call ``callback`` in the reactor whenever the file at ``path`` is touched.

    Returns a function that stops the watch.  Without inotify (not Linux, or
    no watches left) the watch is a no-op: a missed wake-up only delays a
    consumer until its next poll, never loses a message.
    """
    try:
        from twisted.internet import inotify

        notifier = inotify.INotify(reactor)
        notifier.startReading()
        notifier.watch(
            FilePath(path),
            mask=inotify.IN_ATTRIB | inotify.IN_MODIFY,
            callbacks=[lambda *_: callback()],
        )
    except Exception as e:
        log.warn("no inotify for {path} ({error}); the poll carries on", path=path, error=e)
        return lambda: None

    def stop() -> None:
        notifier.loseConnection()

    return stop
