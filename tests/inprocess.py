"""A dropr-server running inside the test's own reactor, on a real socket; and waiting on it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.python.threadpool import ThreadPool

from dropr.daemon._auth import Authenticator
from dropr.server._receiver import Limits
from dropr.server._resource import make_site
from dropr.storage._spec import open_store


class Server:
    def __init__(
        self,
        tmp_path: Path,
        limits: Limits,
        authenticator: Authenticator | None = None,
        spec: str | None = None,
        **storage: Any,
    ) -> None:
        self.spec = spec or str(tmp_path / "store")
        self.storage: Any = open_store(self.spec, dedup=True, **storage)
        self.pool = ThreadPool(1, 2, "test-disk")
        self.pool.start()
        self.work_dir = str(tmp_path / "work")
        site, _resource = make_site(
            self.storage,
            limits,
            reactor,
            self.pool,
            self.work_dir,
            authenticator=authenticator,
        )
        self.site = site
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/"

    def depth(self) -> int:
        return sum(s.depth for s in self.storage.stats().values())

    def stop(self) -> Any:
        d = self.port.stopListening()
        d.addBoth(lambda _: (self.pool.stop(), self.storage.close()))
        return d


def until(condition: Any, timeout: float = 10.0) -> defer.Deferred[None]:
    """Fire when ``condition()`` holds, checking every 10 ms of real time (slow tests)."""
    deadline = time.monotonic() + timeout

    async def poll() -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("condition not met in time")
            await task.deferLater(reactor, 0.01, lambda: None)

    return defer.ensureDeferred(poll())
