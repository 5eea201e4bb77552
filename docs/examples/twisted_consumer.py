"""Consume a channel from Twisted code: dropr calls a handler per message.

Run it on the receiving host with the store directory of the dropr-server,
and optionally the number of messages after which to stop (without it, it
runs until interrupted)::

    python docs/examples/twisted_consumer.py /var/lib/dropr/store 5

``dropr._consumer.consume`` takes the messages of a channel in delivery
order, calls the handler for each, acks those it handled, and tries the
others again.  New messages wake it within milliseconds (inotify on the
store), without polling.
"""

import json
import sys
from typing import Any

from twisted.internet import defer, task

import dropr
from dropr._consumer import consume


def handle(message: dropr.Message) -> None:
    # Returning acks the message.  Raising gives it back, to be tried again
    # (here up to 3 times), then moves it to the failed area with the error.
    # A handler may also return a Deferred, or be an ``async def``.
    order = json.loads(message.payload)
    print(f"order {order['order']} (priority {message.priority})")


async def main(reactor: Any, store_dir: str, count: int | None) -> None:
    store = dropr.Store(store_dir)
    consumer = consume(store, "orders", handle, reactor, max_attempts=3, lease=60.0)
    if count is None:
        # Until the process is stopped (Ctrl-C, SIGTERM): then the consumer
        # finishes the message in hand and gives back the rest.
        reactor.addSystemEventTrigger("before", "shutdown", consumer.stopService)
        await defer.Deferred()  # never fires; the reactor stops instead
    else:
        # For the example's sake: stop once `count` messages were dealt with.
        while consumer.handled + consumer.failed < count:
            await task.deferLater(reactor, 0.05, lambda: None)
        await defer.maybeDeferred(consumer.stopService)
    for message, reason in store.failed("orders"):
        print(f"failed {message.id}: {reason}")
    store.close()


if __name__ == "__main__":
    store_dir = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else None
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, store_dir, count)))
