"""Put a message from Twisted code, without blocking the reactor.

``dropr.put`` waits for the disk; ``dropr.put_deferred`` runs it in the
reactor's thread pool and returns a Deferred that fires with the id once
the message is durable::

    python docs/examples/produce_twisted.py /tmp/dropr-spool
"""

import os
import sys

from twisted.internet import defer, task

import dropr

DESTINATION = "http://127.0.0.1:8080/"


async def main(reactor: object, spool_dir: str) -> None:
    message_id = await dropr.put_deferred(
        b"from the reactor", DESTINATION, channel="events", spool=spool_dir
    )
    print(f"put 1 message: {message_id}")


if __name__ == "__main__":
    spool_dir = sys.argv[1] if len(sys.argv) > 1 else os.environ["DROPR_SPOOL"]
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, spool_dir)))
