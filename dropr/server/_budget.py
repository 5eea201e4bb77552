"""Bounds on what requests hold while they are in flight: bytes on disk, bytes in memory.

Plain state, used from the reactor thread only; tests drive it directly.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, succeed


class InFlightBytes:
    """Body bytes received and not yet handed to the store, per client and in total.

    A request's body is spooled while it arrives and checked against its
    signed hash at its end; until then it is unverified.  Someone who
    replays a signed request's head (within its timestamp's few minutes)
    with another body gets this far, so what bodies may hold is capped:
    ``per_client`` bytes for each identity (anonymous requests share one)
    and ``total`` bytes over all.  A request that would pass a cap is
    answered 503 before more of it is read.
    """

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self.held = 0
        self._by_client: dict[str, int] = {}

    def reserve(self, client: str, n: int) -> bool:
        """Count ``n`` more bytes for ``client``; False (and nothing counted) over a cap."""
        mine = self._by_client.get(client, 0)
        if n > 0 and (mine + n > self.per_client or self.held + n > self.total):
            return False
        self._by_client[client] = mine + n
        self.held += n
        return True

    def release(self, client: str, n: int) -> None:
        """Forget ``n`` bytes of ``client`` (its request was verified, stored or dropped)."""
        left = self._by_client.get(client, 0) - n
        if left > 0:
            self._by_client[client] = left
        else:
            # An entry per client in flight only: the map does not grow
            # with the clients ever seen.
            self._by_client.pop(client, None)
        self.held = max(0, self.held - n)

    def of(self, client: str) -> int:
        """Bytes ``client`` holds now."""
        return self._by_client.get(client, 0)


class ByteBudget:
    """A semaphore counted in bytes: how much request data is parsed and stored at once.

    Parsing a batch holds its messages in memory until the store has them;
    so concurrent requests take turns by size, and memory stays near
    ``limit`` whatever the number of uploads.  A request larger than the
    whole budget waits until it is alone.  First come, first served.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: deque[tuple[int, Deferred[None]]] = deque()

    def acquire(self, n: int) -> Deferred[None]:
        """A Deferred that fires once ``n`` bytes (at most the limit) are granted."""
        n = min(n, self.limit)
        if not self._waiting and self.used + n <= self.limit:
            self.used += n
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append((n, d))
        return d

    def release(self, n: int) -> None:
        """Give back what :meth:`acquire` granted for ``n``."""
        self.used = max(0, self.used - min(n, self.limit))
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            size, d = self._waiting.popleft()
            self.used += size
            d.callback(None)
