"""Take messages from a store, process them, and say how it went.

Run it on the receiving host with the store directory of the dropr-server
as argument (or in ``$DROPR_STORE``)::

    python docs/examples/consume.py /tmp/dropr-store

Several consumers may run at once on the same channel: a message handed to
one is leased to it, and no other gets it until the lease runs out.
"""

import json
import os
import sys

import dropr


def main(store_dir: str) -> None:
    with dropr.Store(store_dir, lease=30.0) as store:
        # Not ready yet?  Give messages back and they are handed out again,
        # first, as if never taken.
        first = store.take("orders", limit=1)
        store.release(first)

        while True:
            # Up to 10 messages, in delivery order: priority 0 first, then
            # the order they were put.  Ours for 30 s (the lease above).
            messages = store.take("orders", limit=10)
            if not messages:
                break
            done, bad = [], []
            for message in messages:
                try:
                    order = json.loads(message.payload)
                except ValueError:
                    bad.append(message)
                    continue
                print(f"order {order['order']} (priority {message.priority})")
                done.append(message)
            # Processed: never handed out again.  A message neither acked
            # nor failed before its lease ends is handed out again.
            store.ack(done)
            if bad:
                # Moved aside with the reason, never retried, never deleted.
                store.fail(bad, "payload is not JSON")

        for message, reason in store.failed("orders"):
            print(f"failed {message.id}: {reason}: {message.payload!r}")
        stats = store.stats().get("orders")
        if stats is not None:
            print(f"orders: {stats.depth} waiting, {stats.failed} failed")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ["DROPR_STORE"])
