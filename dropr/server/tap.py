"""``twistd dropr-server``: options and the service tree."""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Any

from twisted.application import service
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
from dropr.daemon._tls import TLSConfigError, check_endpoint_key, is_local, server_endpoint
from dropr.errors import DroprError, StorageUnavailable
from dropr.interfaces import IReceivingStore
from dropr.monitoring._metrics import ServerMetrics, StatsReader
from dropr.monitoring._statuspage import MonitoringRoot, StatsResource, server_pages
from dropr.server._fds import plan_connections
from dropr.server._listener import ListenerService
from dropr.server._memory import fix_mmap_threshold
from dropr.server._receiver import DEFAULT_MAX_CHANNELS, Limits
from dropr.server._resource import ReceiverResource, make_site
from dropr.server._stats import CappedStats
from dropr.storage._spec import open_store, redact, spec_kind, spec_path


class Options(usage.Options):
    """Options of ``twistd dropr-server``."""

    synopsis = "[options]"
    longdesc = (
        "Receive message batches over HTTP and store them durably in --store, "
        "where consumers take them with dropr.Store."
    )
    optParameters: list[list[Any]] = [
        [
            "store",
            "s",
            None,
            "Store: a directory, sqlite:///path/store.db or postgresql://... (required).",
        ],
        [
            "work-dir",
            None,
            None,
            "Directory for request bodies until they are stored (default: the "
            "store's tmp/ for a directory store, <db>-uploads for SQLite, a "
            "private temporary directory otherwise).",
        ],
        ["max-request", None, 64 * 1024 * 1024, "Largest request body accepted.", _size],
        ["max-messages", None, 10000, "Most messages in one request.", int],
        ["max-payload", None, 16 * 1024 * 1024, "Largest payload of one message.", _size],
        ["store-max-bytes", None, None, "Refuse (507) beyond this many bytes waiting.", _size],
        ["store-max-messages", None, None, "Refuse (507) beyond this many waiting.", int],
        ["max-channels", None, DEFAULT_MAX_CHANNELS, "Most channels the store holds.", int],
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
        [
            "max-connections",
            None,
            None,
            "Most connections open at once (default: 1000, or fewer if the "
            "file descriptor limit allows fewer).",
            int,
        ],
        [
            "max-unverified-per-client",
            None,
            None,
            "Body bytes one client may have in flight before they are stored "
            "(default: twice --max-request).",
            _size,
        ],
        [
            "max-unverified",
            None,
            None,
            "Body bytes all clients may have in flight (default: 16 times --max-request).",
            _size,
        ],
        ["credentials", None, None, "File of client identities and secrets (owner-only)."],
    ]
    optFlags: list[list[str | None]] = [
        [
            "allow-anonymous-local",
            None,
            "Accept unsigned requests; every --listen must be a loopback "
            "interface or a unix: socket (whoever can connect may store).",
        ],
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
            raise usage.UsageError(
                "--store is required: a directory, sqlite:///path/store.db or postgresql://..."
            )
        try:
            spec_kind(self["store"])
        except DroprError as e:
            raise usage.UsageError(str(e)) from None
        if not self["listen"]:
            self["listen"] = ["tcp:8080"]
        for name in ("threads", "max-channels"):
            if self[name] < 1:
                raise usage.UsageError(f"--{name} must be at least 1")
        if self["max-connections"] is not None and self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        if self["request-timeout"] <= 0:
            raise usage.UsageError("--request-timeout must be more than 0 seconds")
        trusted = self["credentials"] or self["insecure-allow-anonymous"]
        if trusted and not self["allow-anonymous-local"]:
            return
        public = self._public_listeners()
        if self["allow-anonymous-local"]:
            if public:
                raise usage.UsageError(
                    f"--allow-anonymous-local, but {', '.join(public)} is not a loopback "
                    "interface or a unix: socket: listen on e.g. "
                    "tcp:8080:interface=127.0.0.1, or give --credentials FILE"
                )
            return
        raise usage.UsageError(
            "without --credentials anyone who can connect could store messages: give "
            "--credentials FILE; or --allow-anonymous-local to accept unsigned requests "
            "on loopback and unix: listeners (every local user may then store); or "
            "--insecure-allow-anonymous to accept them from anywhere"
        )

    def _public_listeners(self) -> list[str]:
        from twisted.internet import reactor

        public = []
        for description in self["listen"]:
            try:
                if not is_local(server_endpoint(reactor, description)):
                    public.append(description)
            except TLSConfigError as e:
                raise usage.UsageError(str(e)) from None
        return public


class ServerService(service.MultiService):
    """Owns the store, the thread pool and the listening ports."""

    log = Logger()
    #: The log observer twistd is to use (--log-format), or None for its own.
    log_observer: logs.JSONLinesObserver | None = None
    #: Reads the store's figures for the metrics; closed with the service.
    stats_reader: StatsReader | None = None

    def __init__(
        self, store: IReceivingStore, resource: ReceiverResource, pool: ThreadPool, name: str
    ) -> None:
        super().__init__()
        self.store = store
        self.resource = resource
        self.pool = pool
        self.store_name = name

    def setServiceParent(self, parent: Any) -> Any:
        logs.attach(parent, self.log_observer)
        return super().setServiceParent(parent)

    def startService(self) -> None:
        self.pool.start()
        super().startService()
        self.log.info("dropr-server storing in {store}", store=self.store_name)
        if os.geteuid() == 0:
            self.log.warn(
                "dropr-server runs as root: a flaw in it would give the whole host "
                "away; run it as a user of its own (User= in the systemd unit)"
            )

    def stopService(self) -> Any:
        # Refuse new batches, stop listening, let batches being stored finish
        # (the pool's stop waits for them), then release the store.
        self.resource.stopping = True
        d = super().stopService()

        def finish(result: object) -> object:
            self.pool.stop()
            self.store.close()
            if self.stats_reader is not None:
                self.stats_reader.close()
            self.log.info("dropr-server stopped")
            return result

        return d.addBoth(finish)


def _upkeep(reactor: Any, pool: ThreadPool, store: IReceivingStore) -> Any:
    d = deferToThreadPool(reactor, pool, store.upkeep)
    # A TimerService stops for good on an error: log it and carry on.
    d.addErrback(_upkeep_failed)
    return d


def _upkeep_failed(failure: Failure) -> None:
    error = failure.value
    if isinstance(error, StorageUnavailable):
        # Every second while the store's database is down: one line.
        ServerService.log.warn("store upkeep waits for the store: {error}", error=str(error))
    elif isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        # Every second while the disk is full: one line, not a traceback.
        ServerService.log.warn("store upkeep waits for disk space: {error}", error=str(error))
    else:
        ServerService.log.failure("store upkeep failed", failure)


def _local_path(spec: str) -> str | None:
    """The directory (file store) or file (SQLite) of a local store; None for a database server."""
    kind = spec_kind(spec)
    return os.path.abspath(spec_path(spec)) if kind in ("files", "sqlite") else None


def _check_store_place(spec: str) -> None:
    """Refuse a store directory that others, or its group, may write to."""
    path = _local_path(spec)
    if path is None:
        return
    where = path if spec_kind(spec) == "files" else os.path.dirname(path)
    check_not_world_writable(where, "store", group_too=True)


def work_dir_for(options: Options) -> str:
    """Where request bodies wait until they are stored."""
    if options["work-dir"]:
        return os.path.abspath(str(options["work-dir"]))
    spec = options["store"]
    path = _local_path(spec)
    if path is None:
        return str(tempfile.mkdtemp(prefix="dropr-server-"))
    if spec_kind(spec) == "files":
        return os.path.join(path, "tmp")
    return path + "-uploads"


def _authenticator(options: Options) -> Authenticator | None:
    """Who may store: checked before the store is opened, so a bad file changes nothing."""
    try:
        _check_store_place(options["store"])
        for endpoint in options["listen"]:
            check_endpoint_key(endpoint)
        if not options["credentials"]:
            # Anonymous: on loopback only, or explicitly allowed.
            ServerService.log.info(
                "dropr-server accepts unsigned requests ({why})",
                why="--insecure-allow-anonymous"
                if options["insecure-allow-anonymous"]
                else "--allow-anonymous-local",
            )
            return None
        secrets = load_server_credentials(options["credentials"])
    except (CredentialsError, TLSConfigError, DroprError) as e:
        raise SystemExit(f"dropr-server: {e}") from None
    anonymous = options["insecure-allow-anonymous"] or options["allow-anonymous-local"]
    ServerService.log.info(
        "dropr-server accepts requests signed by {count} clients{anonymous}",
        count=len(secrets),
        anonymous=", and unsigned ones" if anonymous else "",
    )
    return Authenticator(secrets, allow_anonymous=anonymous)


def _limits(options: Options) -> Limits:
    try:
        connections = plan_connections(options["max-connections"])
    except DroprError as e:
        raise SystemExit(f"dropr-server: {e}") from None
    return Limits(
        options["max-request"],
        options["max-messages"],
        options["max-payload"],
        request_timeout=options["request-timeout"],
        max_connections=connections,
        max_channels=options["max-channels"],
        max_unverified_per_client=options["max-unverified-per-client"] or 0,
        max_unverified=options["max-unverified"] or 0,
    )


def _open_store(options: Options) -> IReceivingStore:
    spec = options["store"]
    try:
        store = open_store(
            spec,
            max_bytes=options["store-max-bytes"],
            max_messages=options["store-max-messages"],
            max_payload=options["max-payload"],
            dedup=True,
            dedup_window=options["dedup-window"],
            exclusive=True,
        )
    except DroprError as e:
        raise SystemExit(f"dropr-server: {e}") from None
    except OSError as e:
        raise SystemExit(f"dropr-server: cannot use store {redact(spec)}: {e}") from None
    if not IReceivingStore.providedBy(store):
        store.close()
        raise SystemExit(f"dropr-server: the store {redact(spec)} cannot receive messages")
    return store


def makeService(options: Options, reactor: Any = None) -> ServerService:
    """Build the dropr-server service tree from parsed ``options``."""
    reactor = reactor or global_reactor
    authenticator = _authenticator(options)
    fix_mmap_threshold()  # memory of large batches goes back when freed
    limits = _limits(options)
    endpoints = []
    for description in options["listen"]:
        try:
            endpoints.append(server_endpoint(reactor, description))
        except TLSConfigError as e:
            raise SystemExit(f"dropr-server: {e}") from None
    store = _open_store(options)
    # The store's figures for /metrics come from a store object of their
    # own, so that counting them never holds up an add.
    stats_reader = StatsReader(options["store"])
    metrics = ServerMetrics(stats_reader)
    pool = ThreadPool(minthreads=1, maxthreads=options["threads"], name="dropr-disk")
    site, resource = make_site(
        store,
        limits,
        reactor,
        pool,
        work_dir_for(options),
        timeout=options["timeout"],
        metrics=metrics,
        authenticator=authenticator,
    )
    top = ServerService(store, resource, pool, redact(options["store"]))
    top.stats_reader = stats_reader
    top.log_observer = logs.observer_for(options["log-format"], getattr(options, "parent", None))
    # /metrics, /stats and /status beside the receiver's own pages.
    pages = server_pages(metrics, reactor)
    # /stats lists a bounded number of channels, however many the store holds.
    pages[b"stats"] = StatsResource(CappedStats(metrics), reactor)
    site.resource = MonitoringRoot(resource, pages)
    upkeep = TimerService(1.0, _upkeep, reactor, pool, store)
    upkeep.clock = reactor
    upkeep.setServiceParent(top)
    for endpoint in endpoints:
        ListenerService(endpoint, site).setServiceParent(top)
    return top
