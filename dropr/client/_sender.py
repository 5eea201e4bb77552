"""The client daemon's sender: one per destination, spool → server.

A sender takes a batch from its destination's queue, posts it, acks what the
server stored, fails what it refused for good (with the reason) and gives
back the rest.  Up to ``max_in_flight`` batches are in flight per
destination, never two with messages of the same channel, which keeps the
order of a channel across batches.  When the destination cannot be reached
the sender backs off exponentially, with jitter, and other destinations are
not held up: each has its own sender.

Spool operations run through ``run_on_disk`` (the daemon's single-thread
pool), so they happen in the order they were asked for and the reactor never
waits on the disk.  The decisions themselves are the plain functions of
:mod:`dropr.client._sendpolicy`; this class wires them to an
``ISpoolStorage``, an ``ITransport`` and an ``IReactorTime``, so tests drive
it with a ``MemoryStorage``, a fake transport and a ``MemoryReactorClock``.
"""

from __future__ import annotations

import errno
import random as _random
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from dropr._message import Message
from dropr.client import _sendpolicy as policy
from dropr.client._transport import BatchTooLarge
from dropr.interfaces import ISpoolStorage, ITransport, SendResult
from dropr.wire import WireBatch

#: Taken messages: objects, or records ready for the wire (``take_wire``).
Batch = list[Message] | WireBatch

#: Runs a spool operation off the reactor thread: ``run(f, *args)`` → Deferred.
DiskRunner = Callable[..., "Deferred[Any]"]


def thread_pool_runner(reactor: Any, pool: ThreadPool) -> DiskRunner:
    """A ``DiskRunner`` on ``pool`` (give it one thread, so operations keep their order)."""

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool, f, *args)

    return run


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """A ``DiskRunner`` that runs at once, in the caller's thread: for tests on fakes."""
    return maybeDeferred(f, *args)


class _Outcome(NamedTuple):
    """How a batch in flight ended: "sent", "again" or "backoff" (with why)."""

    step: str
    reason: str = ""


_SENT = _Outcome("sent")
_RANK = {"sent": 0, "again": 1, "backoff": 2}


def _worse(a: _Outcome, b: _Outcome) -> _Outcome:
    return b if _RANK[b.step] > _RANK[a.step] else a


class _Flight(NamedTuple):
    """A batch on the wire: its outcome to come, and the channels it holds."""

    outcome: Deferred[_Outcome]
    channels: set[str]


class DestinationSender:
    """Moves the messages for one destination from the spool to its server."""

    log = Logger()

    def __init__(
        self,
        spool: ISpoolStorage,
        destination: str,
        transport: ITransport,
        reactor: IReactorTime,
        run_on_disk: DiskRunner,
        *,
        max_batch: int = 1000,
        max_batch_bytes: int = 8 * 1024 * 1024,
        max_age: float = 6 * 86400.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 60.0,
        clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
        on_batch: Callable[[DestinationSender, int, int, int], None] | None = None,
        max_in_flight: int = 2,
    ) -> None:
        self.spool = spool
        self.destination = destination
        self.transport = transport
        self.reactor = reactor
        self._disk = run_on_disk
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.max_age = max_age
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._clock = clock
        self._random = random
        self.on_batch = on_batch
        #: Batches on the wire at once, at most (of distinct channels).
        self.max_in_flight = max(1, max_in_flight)
        #: "idle", "running" or "backoff"
        self.state = "idle"
        self.failures = 0
        self.last_error = ""
        self.sent = self.stored = self.failed = 0
        #: Payload bytes sent, attempts that failed, and how long the last
        #: answered batch took (for the client's metrics).
        self.sent_bytes = self.errors = 0
        self.last_batch_seconds = 0.0
        self._again = False
        self._stopping = False
        self._run_d: Deferred[None] | None = None
        #: The sends on the wire now (cancelled when ``stop`` runs out of grace).
        self._sends: set[Deferred[Any]] = set()
        self._retry: IDelayedCall | None = None
        #: Messages this sender took and has not yet acked, failed or released.
        self._held: dict[str, Message] = {}
        #: The same for batches taken as records (``take_wire``), whole.
        self._held_wire: list[WireBatch] = []
        #: The spool hands out batches as records ready for the wire.
        self._take_wire = getattr(spool, "take_wire", None)

    def wake(self, force: bool = False) -> None:
        """Send what waits now; ``force`` also cuts a backoff short."""
        if self._stopping:
            return
        if self.state == "running":
            self._again = True
            return
        if self.state == "backoff":
            if not force:
                return
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._retry = None
        self.state = "running"
        self._run_d = ensureDeferred(self._run())

    async def _run(self) -> None:
        flights: list[_Flight] = []
        try:
            if self._held or self._held_wire:
                # A round that ended in an error (a full spool disk, say)
                # left messages leased to this sender; as the spool's only
                # taker it would skip them and send later ones first.
                for held in list(self._held_wire):
                    await self._settle(self.spool.release, held)
                if self._held:
                    await self._settle(self.spool.release, list(self._held.values()))
            outcome = await self._send_all(flights)
            if outcome.step == "backoff" and not self._stopping:
                self._back_off(outcome.reason)
                return
            self.state = "idle"
            if self._again and not self._stopping:
                self.wake()
        except OSError as e:
            await self._land_all(flights)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                self.log.failure("sender for {destination} failed", destination=self.destination)
                self._back_off(f"internal error: {e}")
            else:
                # (chaos) The spool's disk is full, so a take could not record
                # its lease: expected, not a bug; one line, then back off.
                self._back_off(f"the spool's disk is full ({e.strerror})")
        except Exception as e:  # never let a sender die; retry later
            await self._land_all(flights)
            self.log.failure("sender for {destination} failed", destination=self.destination)
            self._back_off(f"internal error: {e}")

    async def _send_all(self, flights: list[_Flight]) -> _Outcome:
        """Send batches until the queue is empty, one is refused, or the sender stops.

        Up to ``max_in_flight`` batches are on the wire at once, as long as
        no two of them hold messages of the same channel: the server stores
        concurrent requests in any order, and order is promised per channel
        only.  A batch that shares a channel with one in flight waits for
        it.  When a batch is not wholly settled (some to send again, or a
        failed attempt), the batches taken after it that are not yet sent
        are given back, so that its messages go again before them.
        """
        batch = await self._take()
        while not self._stopping:
            if batch:
                batch = await self._prepare(batch)
            if not batch:
                if not flights:
                    return _SENT
                # Nothing more for now: the answers may give messages back.
                landed = await self._land_all(flights)
                if landed.step == "backoff":
                    return landed
                batch = await self._take()
                continue
            channels = (
                batch.channels if isinstance(batch, WireBatch) else {m.channel for m in batch}
            )
            landed = _SENT
            while flights and (
                len(flights) >= self.max_in_flight
                or any(not channels.isdisjoint(f.channels) for f in flights)
            ):
                landed = await self._land(flights.pop(0))
                if landed.step != "sent":
                    break
            if landed.step != "sent":
                worst = _worse(landed, await self._land_all(flights))
                await self._settle(self.spool.release, batch)
                if worst.step == "backoff":
                    return worst
                batch = await self._take()
                continue
            flights.append(_Flight(ensureDeferred(self._deliver(batch)), channels))
            # Take the next batch on the disk thread while this one is on the wire.
            batch = await self._take()
        if batch:
            await self._settle(self.spool.release, batch)
        return await self._land_all(flights)

    async def _land(self, flight: _Flight) -> _Outcome:
        """Wait for the answer of one batch in flight."""
        return await flight.outcome

    async def _land_all(self, flights: list[_Flight]) -> _Outcome:
        """Wait for every batch in flight; the worst of their outcomes."""
        worst = _SENT
        while flights:
            worst = _worse(worst, await self._land(flights.pop(0)))
        return worst

    def _take(self) -> Deferred[Batch]:
        self._again = False
        d: Deferred[Batch]
        if self._take_wire is not None:
            # Records ready for the wire: no object per message on the way.
            d = self._disk(self._take_wire, self.destination, self.max_batch, self.max_batch_bytes)
        else:
            d = self._disk(self.spool.take, self.destination, self.max_batch)
        return d.addCallback(self._hold)

    def _hold(self, messages: Batch) -> Batch:
        if isinstance(messages, WireBatch):
            if messages.ids:
                self._held_wire.append(messages)
            return messages
        for m in messages:
            self._held[m.id] = m
        return messages

    def _unhold(self, messages: Batch) -> None:
        if isinstance(messages, WireBatch):
            if messages in self._held_wire:
                self._held_wire.remove(messages)
            return
        for m in messages:
            self._held.pop(m.id, None)

    async def _settle(self, op: Callable[..., None], messages: Batch, *args: Any) -> None:
        """Ack, fail or release ``messages`` on the disk thread, and wait."""
        await self._disk(op, messages, *args)
        self._unhold(messages)

    def _settle_later(self, op: Callable[..., None], messages: Batch, *args: Any) -> None:
        """The same, without waiting: queued on the one disk thread, it runs
        before any later take.  Should it fail, the messages count as held
        again and are released before the next round."""
        self._unhold(messages)
        d = self._disk(op, messages, *args)

        def failed(failure: Any) -> None:
            self._hold(messages)
            self.log.warn(
                "could not settle {count} messages for {destination}: {error}",
                count=len(messages),
                destination=self.destination,
                error=str(failure.value),
            )

        d.addErrback(failed)

    async def _prepare(self, batch: Batch) -> Batch:
        """Fail what is too old and keep the batch within the byte limit."""
        if isinstance(batch, WireBatch):
            if not batch.ids or not policy.any_too_old(batch.ids, self._clock(), self.max_age):
                return batch  # take_wire kept it within the byte limit
            # Rare: go the way of message objects.
            messages = await self._disk(batch.messages)
            self._unhold(batch)
            batch = self._hold(messages)
        batch, too_old = policy.split_too_old(batch, self._clock(), self.max_age)
        if too_old:
            reason = policy.too_old_reason(self.destination, self.max_age)
            await self._settle(self.spool.fail, too_old, reason)
            self.failed += len(too_old)
        batch, give_back = policy.trim_to_bytes(batch, self.max_batch_bytes)
        if give_back:
            await self._settle(self.spool.release, give_back)
        return batch

    async def _deliver(self, batch: Batch) -> _Outcome:
        """Send one batch: "sent", "again" (send anew at once) or "backoff".

        Never raises: a batch that could not be sent is given back.
        """
        started = self.reactor.seconds()
        send_d = self.transport.send(self.destination, batch)
        self._sends.add(send_d)
        try:
            results: Sequence[SendResult] = await send_d
        except BatchTooLarge as e:
            try:
                await self._too_large(batch, str(e))
            except Exception as e2:
                return _Outcome("backoff", f"internal error: {e2}")
            return _Outcome("again")
        except Exception as e:
            try:
                await self._settle(self.spool.release, batch)
            except Exception as e2:
                self.log.warn(
                    "could not give back {count} messages for {destination}: {error}",
                    count=len(batch),
                    destination=self.destination,
                    error=str(e2),
                )
            if self._stopping:
                return _Outcome("backoff", "stopping")  # cancelled by stop()
            return _Outcome("backoff", f"{type(e).__name__}: {e}")
        finally:
            self._sends.discard(send_d)
        answer = policy.sort_answer(batch, results)
        # Queued on the one disk thread, these run before any later take.
        if answer.stored:
            self._settle_later(self.spool.ack, answer.stored)
        for reason, group in answer.refused.items():
            self._settle_later(self.spool.fail, group, reason)
        if answer.retry:
            self._settle_later(self.spool.release, answer.retry)
        self.sent += len(batch)
        self.sent_bytes += (
            batch.nbytes if isinstance(batch, WireBatch) else sum([len(m.payload) for m in batch])
        )
        self.stored += len(answer.stored)
        self.failed += answer.failed
        if answer.stored or answer.failed:
            # Progress: the next trouble starts the backoff from its first step.
            self.failures = 0
        self.last_batch_seconds = self.reactor.seconds() - started
        # One line per batch: the ids are fields (JSON logs keep them), not text.
        self.log.info(
            "sent {count} to {destination}: {stored} stored, {failed} failed, "
            "{retry} to retry in {ms:.1f} ms",
            count=len(batch),
            destination=self.destination,
            stored=len(answer.stored),
            failed=answer.failed,
            retry=len(answer.retry),
            ms=self.last_batch_seconds * 1000,
            ids=batch.ids if isinstance(batch, WireBatch) else [m.id for m in batch],
            failed_ids={reason: [m.id for m in group] for reason, group in answer.refused.items()},
        )
        if self.on_batch is not None:
            self.on_batch(self, len(answer.stored), answer.failed, len(answer.retry))
        step = policy.next_step(answer)
        if step is policy.Next.BACKOFF:
            return _Outcome("backoff", "the server stored none of the batch")
        return _Outcome(step.value)

    async def _too_large(self, batch: Batch, reason: str) -> None:
        if len(batch) > 1:
            self.max_batch = policy.smaller_batch(len(batch))
            self.log.warn(
                "{destination} refused a batch of {count} as too large ({reason}); "
                "sending at most {limit} per batch",
                destination=self.destination,
                count=len(batch),
                reason=reason,
                limit=self.max_batch,
            )
            await self._settle(self.spool.release, batch)
            return
        await self._settle(self.spool.fail, batch, f"too large for {self.destination}: {reason}")
        self.failed += 1

    def _back_off(self, reason: str) -> None:
        self.failures += 1
        self.errors += 1
        self.last_error = reason
        delay = policy.backoff_delay(
            self.failures, self.backoff_base, self.backoff_cap, self._random
        )
        self.log.warn(
            "cannot deliver to {destination} ({reason}); retry {n} in {delay:.1f} s",
            destination=self.destination,
            reason=reason,
            n=self.failures,
            delay=delay,
        )
        self.state = "backoff"
        if not self._stopping:
            self._retry = self.reactor.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.wake(force=True)

    def stop(self, grace: float = 10.0) -> Deferred[None]:
        """Stop sending; the batch in flight gets ``grace`` seconds to finish.

        A batch cut short stays in the spool (its lease is a dead owner's at
        the next start) and is sent again.
        """
        self._stopping = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._run_d is None or self._run_d.called:
            return succeed(None)
        timer = self.reactor.callLater(grace, self._cancel_send)
        d = self._run_d

        def done(result: object) -> None:
            if timer.active():
                timer.cancel()

        d.addBoth(done)
        return d

    def _cancel_send(self) -> None:
        for d in list(self._sends):
            d.cancel()
