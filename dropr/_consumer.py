"""Consuming a channel from Twisted code: a service that calls your handler.

``ChannelConsumer`` takes messages of one channel in order, calls a handler
for each (it may return a Deferred or be a coroutine function), acks the
ones handled, and gives back or fails the ones whose handler raised.  Where
the store is an ``IWakeSource`` it is woken as messages arrive (the
file-system store: inotify on the channel's ``wake`` file, which it touches
after every batch it stores), so a new message is handled within
milliseconds; a slow timer (``poll``) is the safety net, and the only way
for a store that cannot wake anyone.

Store operations go through ``run_on_disk`` (the reactor's thread pool by
default), so tests run a consumer on a ``MemoryStorage`` and a ``Clock``
with :func:`dropr.testing.run_now`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from dropr._message import Message, validate_channel
from dropr._store import Store
from dropr.storage._adapt import wake_source

Handler = Callable[[Message], Any]
#: Runs a store operation off the reactor thread: ``run(f, *args)`` → Deferred.
DiskRunner = Callable[..., "Deferred[Any]"]


class ChannelConsumer(service.Service):
    """Hands each new message of ``channel`` to ``handler``.

    :param store: the :class:`~dropr.Store` to take from.
    :param handler: called with each :class:`~dropr.Message`; return a value
        or a Deferred (or be ``async``).  Success acks the message.  An
        exception releases it to be tried again, up to ``max_attempts``
        times in this process; then it is failed with the exception's text.
    :param batch: messages taken per round.
    :param lease: seconds a taken message stays this consumer's.
    :param poll: seconds between rounds when no wake-up came (safety net).
    :param run_on_disk: runs the store's calls; the reactor's thread pool
        when None.
    """

    log = Logger()

    def __init__(
        self,
        store: Store,
        channel: str,
        handler: Handler,
        reactor: Any,
        *,
        batch: int = 100,
        lease: float = 60.0,
        poll: float = 5.0,
        max_attempts: int = 5,
        run_on_disk: DiskRunner | None = None,
    ) -> None:
        self.store = store
        self.channel = validate_channel(channel)
        self.handler = handler
        self.reactor = reactor
        self.batch = batch
        self.lease = lease
        self.max_attempts = max_attempts
        self.handled = 0
        self.failed = 0
        self._attempts: dict[str, int] = {}
        self._running: Deferred[None] | None = None
        self._again = False
        self._stopping = False
        self._run_on_disk = run_on_disk
        self._stop_watch: Callable[[], None] | None = None
        self._timer = LoopingCall(self.wake)
        self._timer.clock = reactor
        self._poll = poll

    def _disk(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._run_on_disk is not None:
            return self._run_on_disk(f, *args)
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        source = wake_source(self.store.storage)
        if source is not None:
            try:
                self._stop_watch = source.watch(self.channel, self.wake, self.reactor)
            except Exception as e:  # no inotify here, say: the timer carries on
                self.log.warn(
                    "no wake-ups for {channel} ({error}); polling every {poll} s",
                    channel=self.channel,
                    error=e,
                    poll=self._poll,
                )
        self._timer.start(self._poll, now=True)

    def wake(self) -> None:
        """Take and handle what waits now."""
        if self._stopping:
            return
        if self._running is not None:
            self._again = True
            return
        d = ensureDeferred(self._round())
        # A round on a synchronous store (a test's) may be over already.
        self._running = None if d.called else d

    async def _round(self) -> None:
        try:
            while not self._stopping:
                self._again = False
                messages = await self._disk(self.store.take, self.channel, self.batch, self.lease)
                if not messages:
                    if self._again:
                        continue
                    break
                await self._handle(messages)
        except Exception:
            self.log.failure("consuming {channel} failed", channel=self.channel)
        finally:
            self._running = None

    async def _handle(self, messages: list[Message]) -> None:
        done: list[Message] = []
        retry: list[Message] = []
        for i, m in enumerate(messages):
            if self._stopping:
                retry.extend(messages[i:])
                break
            try:
                result = maybeDeferred(self.handler, m)
                value = await result
                if inspect.iscoroutine(value):
                    await value
            except Exception as e:
                n = self._attempts.get(m.id, 0) + 1
                if n >= self.max_attempts:
                    self._attempts.pop(m.id, None)
                    reason = f"handler failed {n} times: {type(e).__name__}: {e}"
                    await self._disk(self.store.fail, [m], reason)
                    self.failed += 1
                    self.log.warn("failed message {id}: {reason}", id=m.id, reason=reason)
                else:
                    self._attempts[m.id] = n
                    retry.append(m)
                continue
            self._attempts.pop(m.id, None)
            done.append(m)
        if done:
            await self._disk(self.store.ack, done)
            self.handled += len(done)
        if retry:
            await self._disk(self.store.release, retry)

    def stopService(self) -> Any:
        super().stopService()
        self._stopping = True
        if self._timer.running:
            self._timer.stop()
        if self._stop_watch is not None:
            self._stop_watch()
            self._stop_watch = None
        # Always a Deferred, so callers can wait on it whether a round runs.
        return self._running if self._running is not None else succeed(None)


def consume(
    store: Store, channel: str, handler: Handler, reactor: Any = None, **options: Any
) -> ChannelConsumer:
    """Start a :class:`ChannelConsumer` now (outside any service tree)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    consumer = ChannelConsumer(store, channel, handler, reactor, **options)
    consumer.startService()
    return consumer
