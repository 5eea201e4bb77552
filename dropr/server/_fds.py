"""File descriptors, planned: how many connections this process can serve.

Each connection holds a socket, and a file for its body while an upload
arrives; a connection refused for being one too many holds its socket for
a moment while its 503 goes out; the store, the log and the listeners need
some more.  The limit
of connections is set below what ``RLIMIT_NOFILE`` allows, so that the
server answers 503 to a connection too many instead of failing to open a
file (a 500) or to accept (a dropped connection).
"""

from __future__ import annotations

import resource

from twisted.logger import Logger

from dropr.errors import DroprError

#: Descriptors planned per connection served: its socket and its body's
#: file, and two more for connections refused (503) while it is served,
#: which linger a moment so that their answer arrives.
PER_CONNECTION = 4
#: Descriptors kept for everything else: the store (index files, SQLite's
#: database and WAL, a database connection), logs, listeners, threads.
RESERVED = 64
#: Connections served when the limit allows (``--max-connections``).
DEFAULT_CONNECTIONS = 1000

log = Logger(namespace="dropr.server")


class NotEnoughDescriptors(DroprError):
    """``--max-connections`` needs more file descriptors than the process may open."""


def raise_soft_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connections_for(descriptors: int) -> int:
    """How many connections ``descriptors`` file descriptors serve safely."""
    return max(1, (descriptors - RESERVED) // PER_CONNECTION)


def plan_connections(requested: int | None, descriptors: int | None = None) -> int:
    """The connection limit: ``requested``, or the default, within the descriptors.

    Raises :class:`NotEnoughDescriptors` when ``requested`` is more than the
    descriptor limit allows (the daemon does not start).
    """
    if descriptors is None:
        descriptors = raise_soft_limit()
    fits = connections_for(descriptors)
    if requested is None:
        if fits < DEFAULT_CONNECTIONS:
            log.warn(
                "dropr-server serves at most {fits} connections: the file descriptor "
                "limit is {descriptors}; raise it (LimitNOFILE= in the systemd unit, "
                "ulimit -n) for the default of {default}",
                fits=fits,
                descriptors=descriptors,
                default=DEFAULT_CONNECTIONS,
            )
        return min(DEFAULT_CONNECTIONS, fits)
    if requested > fits:
        raise NotEnoughDescriptors(
            f"--max-connections {requested} needs about "
            f"{requested * PER_CONNECTION + RESERVED} file descriptors, and this process "
            f"may open {descriptors}: raise the limit (LimitNOFILE= in the systemd unit, "
            f"ulimit -n) or lower --max-connections to {fits}"
        )
    return requested
