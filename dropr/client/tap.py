"""``twistd dropr-client``: options and the service tree."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application import service, strports
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from dropr._message import validate_destination
from dropr.client._front import FrontedSpool
from dropr.client._notifier import FifoNotifier
from dropr.client._putlog import PutLog, recover
from dropr.client._putsocket import put_socket_for
from dropr.client._sender import DestinationSender, DiskRunner, thread_pool_runner
from dropr.client._spool import Spool, default_spool_path
from dropr.client._transport import HTTPTransport
from dropr.daemon import logs as logs
from dropr.daemon._auth import CredentialsError, check_not_world_writable, load_client_credentials
from dropr.daemon._options import log_format, size
from dropr.daemon._tls import TLSConfigError, client_policy
from dropr.errors import DroprError, InvalidMessage, StorageLocked
from dropr.interfaces import ISpoolStorage, ITransport
from dropr.monitoring._metrics import ClientMetrics, StatsReader
from dropr.monitoring._statuspage import client_site


class Options(usage.Options):
    """Options of ``twistd dropr-client``."""

    synopsis = "[options]"
    longdesc = (
        "Forward the messages of a spool to the dropr-servers they are "
        "addressed to; destinations come from the messages themselves."
    )
    optParameters: list[list[Any]] = [
        ["spool", "s", None, "Spool directory (default $DROPR_SPOOL, else /var/spool/dropr)."],
        ["rescan", None, 5.0, "Seconds between rescans of the spool (a fallback).", float],
        ["max-batch", None, 1000, "Most messages in one request.", int],
        ["max-batch-bytes", None, 8 * 1024 * 1024, "Most payload bytes in one request.", size],
        ["max-age", None, 6 * 86400.0, "Seconds before an undelivered message fails.", float],
        ["connect-timeout", None, 10.0, "Seconds to wait for a connection.", float],
        ["timeout", None, 60.0, "Seconds to wait for a server's answer.", float],
        ["backoff-cap", None, 60.0, "Longest wait between retries of a failing server.", float],
        [
            "metrics",
            None,
            None,
            "Serve /metrics and /stats on this endpoint, e.g. tcp:9101:interface=127.0.0.1.",
        ],
        [
            "log-format",
            None,
            "text",
            "Log lines as text, or json (one JSON object per line).",
            log_format,
        ],
        ["credentials", None, None, "File with this client's identity and secret (owner-only)."],
        ["ca-file", None, None, "PEM file of the CAs to trust for https (default: the system's)."],
    ]

    def postOptions(self) -> None:
        self["spool"] = self["spool"] or default_spool_path()
        if self["max-batch"] < 1:
            raise usage.UsageError("--max-batch must be at least 1")
        if self["rescan"] <= 0:
            raise usage.UsageError("--rescan must be more than 0 seconds")


class ClientService(service.MultiService):
    """Watches the spool and runs one sender per destination.

    Its child, with ``--metrics``, serves ``/metrics`` and ``/stats``.
    """

    log = Logger()
    #: What the senders count; /metrics and /stats show it.
    metrics: ClientMetrics | None = None
    #: Reads the spool's figures for the metrics; closed with the service.
    stats_reader: StatsReader | None = None
    #: The log observer twistd is to use (--log-format), or None for its own.
    log_observer: logs.JSONLinesObserver | None = None

    def __init__(self, spool: Spool, transport: ITransport, reactor: Any, options: Any) -> None:
        super().__init__()
        self.spool = spool
        #: Puts through the socket are durable here first, then held in
        #: memory in front of the spool for their senders.
        self.putlog = PutLog(spool.path)
        self.front = FrontedSpool(spool.storage, self.putlog)
        #: What the senders and rescans use of the spool: its interface only.
        self.storage: ISpoolStorage = self.front
        self.transport = transport
        self.reactor = reactor
        self.options = options
        self.senders: dict[str, DestinationSender] = {}
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name="dropr-spool")
        # One thread: spool operations run in the order they were asked for.
        self.run_on_disk: DiskRunner = thread_pool_runner(reactor, self.pool)
        self.notifier: FifoNotifier | None = None
        self._rescan = LoopingCall(self._rescan_safely)
        self._rescan.clock = reactor
        self._bad_queues: set[str] = set()
        # Single puts through <spool>/put.sock, written in groups, one sync each.
        # A child once the put log is ready (see _open_put_log).
        self.put_socket = put_socket_for(
            spool, self.front, self.putlog, reactor, self.wake_destinations
        )

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        # Before the socket accepts anything or a sender runs: what a crash
        # left in the put log goes into the spool, ahead of anything new.
        self._open_put_log()
        self.notifier = FifoNotifier(self.spool.path, self.wake_all, self.reactor)
        self.notifier.startReading()
        self._rescan.start(self.options["rescan"], now=True)
        self.log.info("dropr-client forwarding spool {spool}", spool=self.spool.path)

    def setServiceParent(self, parent: Any) -> Any:
        logs.attach(parent, self.log_observer)
        return super().setServiceParent(parent)

    def put_figures(self) -> dict[str, int]:
        """The put socket's counters and what memory holds, for the metrics."""
        held, held_bytes = self.front.held()
        commit = self.put_socket.commit
        return {
            "puts": commit.stored,
            "writes": commit.batches,
            "held_messages": held,
            "held_bytes": held_bytes,
        }

    def _open_put_log(self) -> bool:
        """Move what the put log holds into the spool, open it and the put socket.

        Until this succeeds (a full spool disk, say) the socket stays shut:
        producers write their own batch files, and no put can overtake the
        ones still in the log.  The rescan tries again.
        """
        if self.put_socket.parent is not None:
            return True
        try:
            moved = recover(self.spool.path, self.front.file_in_order)
            self.putlog.open()
        except (DroprError, OSError) as e:
            self.log.warn(
                "cannot open the put log of {spool} yet ({error}); producers write "
                "their own batches meanwhile, and the next rescan tries again",
                spool=self.spool.path,
                error=str(e),
            )
            return False
        if moved:
            self.log.info("moved {count} puts from the put log into the spool", count=moved)
        self.put_socket.setServiceParent(self)
        return True

    def _rescan_safely(self) -> None:
        if self.running:
            self._open_put_log()  # if it could not be opened before
        # A LoopingCall stops for good on an error: never let one escape.
        try:
            self.wake_all(force=False)
        except Exception:
            self.log.failure("rescan of {spool} failed", spool=self.spool.path)
        self._spill(lambda sender: sender is None or sender.state == "backoff")
        # Keep the spool's usage figures fresh for producers (their limit
        # checks read them instead of walking the spool themselves).
        d = self.run_on_disk(self.storage.count_usage)
        d.addErrback(
            lambda f: self.log.failure("counting {spool} failed", f, spool=self.spool.path)
        )

    def wake_all(self, force: bool = False) -> None:
        """Find destinations in the spool and wake their senders."""
        for destination in self.storage.queue_names():
            sender = self.senders.get(destination)
            if sender is None:
                if destination in self._bad_queues:
                    continue
                try:
                    validate_destination(destination)
                except InvalidMessage as e:
                    self._bad_queues.add(destination)
                    self.log.error("ignoring queue in spool: {error}", error=str(e))
                    continue
                sender = self.senders[destination] = self._sender(destination)
            sender.wake(force)

    def wake_destinations(self, destinations: list[str]) -> None:
        """Wake the senders of ``destinations`` (made if new): the put
        socket just handed them messages."""
        for destination in destinations:
            sender = self.senders.get(destination)
            if sender is None:
                sender = self.senders[destination] = self._sender(destination)
            sender.wake()
        if self.front.over_limit():
            self._spill(lambda sender: True)
        else:
            # A sender that backs off leaves them waiting: they belong in
            # the spool, where they show and count.
            self._spill(lambda sender: sender is not None and sender.state == "backoff")

    def _spill(self, which: Callable[[DestinationSender | None], bool]) -> None:
        """Move what waits in memory for the destinations ``which`` picks into the spool.

        Messages a sender cannot deliver now, or too many held at once,
        belong in the spool: there they count, show and wait on disk.
        """
        for destination in self.front.waiting_destinations():
            if which(self.senders.get(destination)):
                d = self.run_on_disk(self.front.spill, destination)
                d.addErrback(self._spill_failed, destination)

    def _spill_failed(self, failure: Any, destination: str) -> None:
        self.log.warn(
            "could not move puts for {to} into the spool ({error}); they stay in the put log",
            to=destination,
            error=str(failure.value),
        )

    def _sender(self, destination: str) -> DestinationSender:
        o = self.options
        return DestinationSender(
            self.storage,
            destination,
            self.transport,
            self.reactor,
            self.run_on_disk,
            max_batch=o["max-batch"],
            max_batch_bytes=o["max-batch-bytes"],
            max_age=o["max-age"],
            backoff_cap=o["backoff-cap"],
            on_batch=self.metrics.batch if self.metrics is not None else None,
        )

    def stopService(self) -> Any:
        children = super().stopService()
        if self.notifier is not None:
            self.notifier.stop()
        if self._rescan.running:
            self._rescan.stop()
        d = DeferredList([children, *(s.stop() for s in self.senders.values())])

        def spill(_: object) -> Any:
            # What the senders did not deliver waits on disk in the spool;
            # the put log is then empty and removed.
            return self.run_on_disk(self.front.spill_all).addErrback(
                lambda f: self.log.warn(
                    "puts stay in the put log until the next start ({error})", error=str(f.value)
                )
            )

        def finish(_: object) -> Any:
            self.pool.stop()
            self.putlog.close()
            self.spool.close()
            if self.stats_reader is not None:
                self.stats_reader.close()
            self.log.info("dropr-client stopped")
            return self.transport.close()

        return d.addBoth(spill).addBoth(finish)


def makeService(options: Options, reactor: Any = None) -> service.IService:
    """Build the dropr-client service from parsed ``options``."""
    reactor = reactor or global_reactor
    path = os.path.abspath(options["spool"])
    # Checked before the spool is opened, so a bad file changes nothing.
    try:
        check_not_world_writable(path, "spool")
        credentials = (
            load_client_credentials(options["credentials"]) if options["credentials"] else None
        )
        tls_policy = client_policy(options["ca-file"])
    except (CredentialsError, TLSConfigError) as e:
        raise SystemExit(f"dropr-client: {e}") from None
    try:
        spool = Spool(path, daemon=True)
    except StorageLocked as e:
        raise SystemExit(f"dropr-client: {e}") from None
    except OSError as e:
        raise SystemExit(f"dropr-client: cannot use spool {path}: {e}") from None
    transport = HTTPTransport(
        reactor,
        connect_timeout=options["connect-timeout"],
        timeout=options["timeout"],
        context_factory=tls_policy,
        credentials=credentials,
    )
    client = ClientService(spool, transport, reactor, options)
    client.stats_reader = StatsReader(path)
    client.metrics = ClientMetrics(
        lambda: client.senders, client.stats_reader, put_figures=client.put_figures
    )
    client.log_observer = logs.observer_for(options["log-format"], getattr(options, "parent", None))
    if options["metrics"]:
        site = client_site(client.metrics, reactor)
        strports.service(options["metrics"], site, reactor=reactor).setServiceParent(client)
    return client
