"""``twistd dropr-server``: options and the service tree."""

from __future__ import annotations

import errno
import os
from typing import Any

from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import reactor as global_reactor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dropr.daemon import logs as logs
from dropr.daemon._auth import (
    Authenticator,
    CredentialsError,
    check_not_world_writable,
    load_server_credentials,
)
from dropr.daemon._options import log_format as _log_format
from dropr.daemon._options import size as _size
from dropr.daemon._tls import TLSConfigError, check_endpoint_key, is_local_endpoint
from dropr.errors import StorageLocked
from dropr.monitoring._metrics import ServerMetrics, StatsReader
from dropr.monitoring._statuspage import MonitoringRoot, server_pages
from dropr.server._receiver import Limits, ReceiverResource, make_site
from dropr.storage.files._storage import FilesystemStorage


class Options(usage.Options):
    """Options of ``twistd dropr-server``."""

    synopsis = "[options]"
    longdesc = (
        "Receive message batches over HTTP and store them durably in --store, "
        "where consumers take them with dropr.Store."
    )
    optParameters: list[list[Any]] = [
        ["store", "s", None, "Store directory (required; created if missing)."],
        ["max-request", None, 64 * 1024 * 1024, "Largest request body accepted.", _size],
        ["max-messages", None, 10000, "Most messages in one request.", int],
        ["max-payload", None, 16 * 1024 * 1024, "Largest payload of one message.", _size],
        ["store-max-bytes", None, None, "Refuse (507) beyond this many bytes waiting.", _size],
        ["store-max-messages", None, None, "Refuse (507) beyond this many waiting.", int],
        ["dedup-window", None, 7 * 86400.0, "Seconds a stored id is remembered.", float],
        ["threads", None, 4, "Threads for disk work.", int],
        ["timeout", None, 60.0, "Seconds an idle or stalled connection is kept.", float],
        [
            "log-format",
            None,
            "text",
            "Log lines as text, or json (one JSON object per line).",
            _log_format,
        ],
        ["request-timeout", None, 300.0, "Seconds a request may take to arrive whole.", float],
        ["max-connections", None, 1000, "Most connections open at once.", int],
        ["credentials", None, None, "File of client identities and secrets (owner-only)."],
    ]
    optFlags: list[list[str | None]] = [
        [
            "insecure-allow-anonymous",
            None,
            "Accept unsigned requests on a network interface (see docs/security).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Twisted endpoint to listen on, e.g. tcp:8080 (repeatable; default tcp:8080)."""
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        if not self["store"]:
            raise usage.UsageError("--store DIR is required: where received messages are kept")
        if not self["listen"]:
            self["listen"] = ["tcp:8080"]
        if self["threads"] < 1:
            raise usage.UsageError("--threads must be at least 1")
        if self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        if self["request-timeout"] <= 0:
            raise usage.UsageError("--request-timeout must be more than 0 seconds")
        if not self["credentials"] and not self["insecure-allow-anonymous"]:
            public = [e for e in self["listen"] if not is_local_endpoint(e)]
            if public:
                raise usage.UsageError(
                    f"listening on {', '.join(public)} without --credentials would let "
                    "anyone who can reach it store messages: give --credentials FILE, "
                    "listen on a loopback interface only (e.g. tcp:8080:interface=127.0.0.1), "
                    "or pass --insecure-allow-anonymous to accept unsigned requests anyway"
                )


class ServerService(service.MultiService):
    """Owns the store, the thread pool and the listening ports."""

    log = Logger()
    #: The log observer twistd is to use (--log-format), or None for its own.
    log_observer: logs.JSONLinesObserver | None = None
    #: Reads the store's figures for the metrics; closed with the service.
    stats_reader: StatsReader | None = None

    def __init__(
        self, storage: FilesystemStorage, resource: ReceiverResource, pool: ThreadPool
    ) -> None:
        super().__init__()
        self.storage = storage
        self.resource = resource
        self.pool = pool

    def setServiceParent(self, parent: Any) -> Any:
        logs.attach(parent, self.log_observer)
        return super().setServiceParent(parent)

    def startService(self) -> None:
        self.pool.start()
        super().startService()
        self.log.info("dropr-server storing in {store}", store=self.storage.path)

    def stopService(self) -> Any:
        # Refuse new batches, stop listening, let batches being stored finish
        # (the pool's stop waits for them), then release the store.
        self.resource.stopping = True
        d = super().stopService()

        def finish(result: object) -> object:
            self.pool.stop()
            self.storage.close()
            if self.stats_reader is not None:
                self.stats_reader.close()
            self.log.info("dropr-server stopped")
            return result

        return d.addBoth(finish)


def _maintain(reactor: Any, pool: ThreadPool, storage: FilesystemStorage) -> Any:
    d = deferToThreadPool(reactor, pool, storage.maintain)
    # A TimerService stops for good on an error: log it and carry on.
    d.addErrback(_upkeep_failed)
    return d


def _upkeep_failed(failure: Failure) -> None:
    error = failure.value
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        # Every second while the disk is full: one line, not a traceback.
        ServerService.log.warn("store upkeep waits for disk space: {error}", error=str(error))
    else:
        ServerService.log.failure("store upkeep failed", failure)


def _authenticator(options: Options) -> Authenticator | None:
    """Who may store: checked before the store is opened, so a bad file changes nothing."""
    try:
        check_not_world_writable(os.path.abspath(options["store"]), "store")
        for endpoint in options["listen"]:
            check_endpoint_key(endpoint)
        if not options["credentials"]:
            # Anonymous: on loopback only, or explicitly allowed.
            ServerService.log.info(
                "dropr-server accepts unsigned requests ({why})",
                why="--insecure-allow-anonymous"
                if options["insecure-allow-anonymous"]
                else "listening on this host only",
            )
            return None
        secrets = load_server_credentials(options["credentials"])
    except (CredentialsError, TLSConfigError) as e:
        raise SystemExit(f"dropr-server: {e}") from None
    ServerService.log.info(
        "dropr-server accepts requests signed by {count} clients{anonymous}",
        count=len(secrets),
        anonymous=", and unsigned ones" if options["insecure-allow-anonymous"] else "",
    )
    return Authenticator(secrets, allow_anonymous=options["insecure-allow-anonymous"])


def makeService(options: Options, reactor: Any = None) -> ServerService:
    """Build the dropr-server service tree from parsed ``options``."""
    reactor = reactor or global_reactor
    store = os.path.abspath(options["store"])
    authenticator = _authenticator(options)
    try:
        storage = FilesystemStorage(
            store,
            max_bytes=options["store-max-bytes"],
            max_messages=options["store-max-messages"],
            max_payload=options["max-payload"],
            dedup=True,
            dedup_window=options["dedup-window"],
            exclusive=True,
        )
    except StorageLocked as e:
        raise SystemExit(f"dropr-server: {e}") from None
    except OSError as e:
        raise SystemExit(f"dropr-server: cannot use store {store}: {e}") from None
    limits = Limits(
        options["max-request"],
        options["max-messages"],
        options["max-payload"],
        request_timeout=options["request-timeout"],
        max_connections=options["max-connections"],
    )
    # The store's figures for /metrics come from a storage of their own,
    # so that a walk of the store never holds up an add.
    stats_reader = StatsReader(store)
    metrics = ServerMetrics(stats_reader)
    pool = ThreadPool(minthreads=1, maxthreads=options["threads"], name="dropr-disk")
    site, resource = make_site(
        storage,
        limits,
        reactor,
        pool,
        timeout=options["timeout"],
        metrics=metrics,
        authenticator=authenticator,
    )
    top = ServerService(storage, resource, pool)
    top.stats_reader = stats_reader
    top.log_observer = logs.observer_for(options["log-format"], getattr(options, "parent", None))
    # /metrics, /stats and /status beside the receiver's own pages.
    site.resource = MonitoringRoot(resource, server_pages(metrics, reactor))
    upkeep = TimerService(1.0, _maintain, reactor, pool, storage)
    upkeep.clock = reactor
    upkeep.setServiceParent(top)
    for endpoint in options["listen"]:
        strports.service(endpoint, site, reactor=reactor).setServiceParent(top)
    return top
