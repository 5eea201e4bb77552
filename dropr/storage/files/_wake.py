"""Waking consumers: inotify on a queue's ``wake`` file, which every add touches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.filepath import FilePath

log = Logger()


class _WakeWatch:
    """One inotify watch on a wake file, made again if upkeep removes the file."""

    def __init__(self, make_file: Callable[[], str], callback: Callable[[], None], reactor: Any):
        self.make_file = make_file
        self.callback = callback
        self.reactor = reactor
        self.notifier: Any = None
        self.stopped = False

    def start(self) -> None:
        from twisted.internet import inotify

        notifier = inotify.INotify(self.reactor)
        notifier.startReading()
        notifier.watch(
            FilePath(self.make_file()),
            mask=inotify.IN_ATTRIB | inotify.IN_MODIFY | inotify.IN_DELETE_SELF,
            callbacks=[self._event],
        )
        self.notifier = notifier

    def _event(self, _watch: object, _path: object, mask: int) -> None:
        from twisted.internet import inotify

        if mask & inotify.IN_DELETE_SELF and not self.stopped:
            # Upkeep removed the idle queue's directory (Twisted drops the
            # notifier then): watch the queue's new wake file.
            self.reactor.callLater(0, self._rearm)
        self.callback()

    def _rearm(self) -> None:
        if self.stopped:
            return
        try:
            self.start()
        except Exception as e:
            log.warn("cannot watch for new messages again ({error}); polling", error=e)

    def stop(self) -> None:
        self.stopped = True
        if self.notifier is not None:
            self.notifier.loseConnection()


def watch_wake_file(
    make_file: Callable[[], str], callback: Callable[[], None], reactor: Any
) -> Callable[[], None]:
    """Call ``callback`` in the reactor whenever the wake file ``make_file()`` gives is touched.

    Returns a function that stops the watch.  Without inotify (not Linux, or
    no watches left) the watch is a no-op: a missed wake-up only delays a
    consumer until its next poll, never loses a message.
    """
    watch = _WakeWatch(make_file, callback, reactor)
    try:
        watch.start()
    except Exception as e:
        log.warn("no inotify ({error}); the poll carries on", error=e)
    return watch.stop
