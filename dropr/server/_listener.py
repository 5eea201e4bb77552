"""A listening port for dropr-server's site, handed to the site so it can pause accepting."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.python.failure import Failure

from dropr.server._site import ReceiverSite


class ListenerService(service.Service):
    """Listens on ``endpoint`` for ``site`` while running.

    Like Twisted's ``StreamServerEndpointService`` as ``strports`` makes it
    (a port that cannot be bound fails the start), and it gives the site its
    port, so that the site can stop accepting while it is overrun.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, site: ReceiverSite) -> None:
        self.endpoint = endpoint
        self.site = site
        self._listening: Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list[Failure] = []
        self._listening = self.endpoint.listen(self.site)
        self._listening.addCallbacks(self.site.add_port, failures.append)
        if failures:
            failures[0].raiseException()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is None:
            return None
        stopped: Deferred[None] = listening.addCallback(lambda port: port.stopListening())
        stopped.addCallback(lambda _: self.site.ports.clear())
        return stopped
