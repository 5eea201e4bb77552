"""The daemons' monitoring pages: ``/metrics``, ``/stats`` and (server) ``/status``.

``/metrics`` is the Prometheus text format; ``/stats`` the same figures and
more as JSON, for people and scripts; ``/status`` a page for people (plain
HTML and a little JavaScript in ``dropr/monitoring/static/``, no build step) that
draws what ``/stats`` answers.  Reading the queue figures may walk the
disk, so both are rendered in a thread, never in the reactor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class _Threaded(Resource):
    """GET renders ``produce()`` in the reactor's thread pool."""

    isLeaf = True
    log = Logger()
    content_type = b"application/json"

    def __init__(self, produce: Callable[[], bytes], reactor: Any) -> None:
        super().__init__()
        self.produce = produce
        self.reactor = reactor

    def render_GET(self, request: server.Request) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _f: gone.append(True))
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.produce)

        def send(body: bytes) -> None:
            if gone:
                return
            request.setHeader(b"content-type", self.content_type)
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"content-length", str(len(body)).encode("ascii"))
            request.write(body)
            request.finish()

        def failed(f: Failure) -> None:
            self.log.failure("rendering {path} failed", f, path=request.path)
            if gone:
                return
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps({"error": "internal error; see the log"}).encode())
            request.finish()

        d.addCallbacks(send, failed)
        return server.NOT_DONE_YET


class MetricsResource(_Threaded):
    """``GET /metrics``: the Prometheus text exposition format."""

    content_type = CONTENT_TYPE_LATEST.encode("ascii")

    def __init__(self, metrics: Any, reactor: Any) -> None:
        super().__init__(metrics.render_metrics, reactor)


class StatsResource(_Threaded):
    """``GET /stats``: figures, rates and recent errors as JSON."""

    def __init__(self, metrics: Any, reactor: Any) -> None:
        super().__init__(lambda: json.dumps(metrics.stats_json(), indent=1).encode(), reactor)


class StaticFile(Resource):
    """One file of ``dropr/monitoring/static``, read once."""

    isLeaf = True

    def __init__(self, name: str, content_type: bytes) -> None:
        super().__init__()
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            self.body = f.read()
        self.content_type = content_type

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return self.body


class MonitoringRoot(Resource):
    """Serves the monitoring ``pages`` by name; hands everything else to ``fallback``.

    The fallback (the receiver, a leaf resource) sees the path as if it
    were the root itself, so its own routing stays as it is.
    """

    def __init__(self, fallback: Resource, pages: Mapping[bytes, Resource]) -> None:
        super().__init__()
        self.fallback = fallback
        self.pages = dict(pages)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> Resource:
        page = self.pages.get(path)
        if page is not None and request.method in (b"GET", b"HEAD") and not request.postpath:
            return page
        if request.prepath and request.postpath is not None:
            request.postpath.insert(0, request.prepath.pop())
        return self.fallback

    def render(self, request: server.Request) -> Any:
        return self.fallback.render(request)


def server_pages(metrics: Any, reactor: Any) -> dict[bytes, Resource]:
    """``/metrics``, ``/stats``, ``/status`` and its script, for a dropr-server."""
    return {
        b"metrics": MetricsResource(metrics, reactor),
        b"stats": StatsResource(metrics, reactor),
        b"status": StaticFile("status.html", b"text/html; charset=utf-8"),
        b"status.js": StaticFile("status.js", b"text/javascript; charset=utf-8"),
    }


def client_pages(metrics: Any, reactor: Any) -> dict[bytes, Resource]:
    """``/metrics`` and ``/stats``, for a dropr-client's ``--metrics`` endpoint."""
    return {
        b"metrics": MetricsResource(metrics, reactor),
        b"stats": StatsResource(metrics, reactor),
    }


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"error": "no such page: try /metrics or /stats"}).encode()


def client_site(metrics: Any, reactor: Any) -> server.Site:
    """The site of a dropr-client's ``--metrics`` endpoint."""
    site = server.Site(MonitoringRoot(_NotFound(), client_pages(metrics, reactor)))
    site.displayTracebacks = False
    # Scrapes every few seconds would drown the log in access lines.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
