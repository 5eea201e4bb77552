"""Log output of the daemons: twistd's text lines, or one JSON object per line.

Both daemons log ``twisted.logger`` events whose fields are data (counts,
durations, the destination, the ids of a batch), one event per batch at
the default level.  Text output shows the formatted sentence; JSON output
(``--log-format json``) keeps every field, for log shippers and ``jq``::

    {"time": "2026-11-27T21:03:04.512+00:00", "level": "info",
     "namespace": "dropr.server._resource.ReceiverResource",
     "text": "stored 500 messages, rejected 0 in 11.5 ms from 10.0.0.7",
     "stored": 500, "rejected": 0, "ms": 11.53, "peer": "10.0.0.7",
     "ids": ["01a2...", ...], ...}

``--log-format json`` writes where twistd would write its text lines
(``--logfile``, or standard output with ``-n``).  For other setups,
``twistd --logger=dropr.daemon.logs.json_observer`` writes JSON lines to standard
output with any plugin.
"""

from __future__ import annotations

import datetime
import json
import signal
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent
from twisted.python import logfile
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer

FORMATS = ("text", "json")


def _plain(value: Any) -> Any:
    """``value`` if JSON can hold it as it is, else its text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)


def event_as_dict(event: LogEvent) -> dict[str, Any]:
    """The fields of a log event worth keeping, JSON-ready."""
    when = event.get("log_time")
    out: dict[str, Any] = {
        "time": (
            datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat(timespec="milliseconds")
            if isinstance(when, (int, float))
            else None
        ),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        out["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in out or key in ("format", "message", "isError"):
            continue
        out[key] = _plain(value)
    return out


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one line of JSON to ``out``."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: LogEvent) -> None:
        try:
            text = json.dumps(event_as_dict(event), separators=(",", ":"))
        except Exception as e:  # a log line must never take the daemon down
            text = json.dumps({"text": f"unloggable event: {type(e).__name__}: {e}"})
        self.out.write(text + "\n")
        self.out.flush()


def json_observer() -> JSONLinesObserver:
    """For ``twistd --logger=dropr.daemon.logs.json_observer``: JSON lines on stdout."""
    return JSONLinesObserver(sys.stdout)


def observer_for(log_format: str, twistd_options: Any) -> JSONLinesObserver | None:
    """The observer ``--log-format`` asks for, writing where twistd would; None for text.

    ``twistd_options`` are twistd's own (``--logfile``, ``--nodaemon``); a
    plugin's options reach them as their ``parent``.
    """
    if log_format != "json":
        return None
    options = twistd_options or {}
    name = options.get("logfile") or ""
    if name == "-" or (not name and options.get("nodaemon", True)):
        return JSONLinesObserver(sys.stdout)
    out = logfile.LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        # As twistd does for its own log file: SIGUSR1 starts a new one.
        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return JSONLinesObserver(out)


def attach(parent: Any, observer: JSONLinesObserver | None) -> None:
    """Make ``observer`` the log observer of twistd's application ``parent``.

    twistd starts logging after the plugin made its service and before it
    runs: it takes the ``ILogObserver`` component of the application, when
    there is one, instead of its own text observer.
    """
    if observer is not None and isinstance(parent, Componentized):
        parent.setComponent(ILogObserver, observer)
