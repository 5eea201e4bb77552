"""Move a spool's messages into a store in-process, the way the daemons do.

The client daemon (``twistd dropr-client``) and the server daemon
(``twistd dropr-server``) do this over HTTP.  This stand-in does the same
steps without a network, to show what they are::

    python docs/examples/forward.py /tmp/dropr-spool /tmp/dropr-store
"""

import os
import sys
from dataclasses import replace

import dropr
from dropr.storage.files._storage import FilesystemStorage


def main(spool_dir: str, store_dir: str) -> None:
    # The server opens its store like this: it alone writes there, and it
    # keeps a dedup index so a message it receives twice is stored once.
    store = FilesystemStorage(store_dir, dedup=True, exclusive=True)
    with dropr.Spool(spool_dir) as spool, store:
        for destination in spool.queues():
            while True:
                # Claim a batch: leased to us, no other taker gets it.
                batch = spool.take(destination, limit=100)
                if not batch:
                    break
                # In a store the queue is the channel; the destination has
                # done its job.
                by_channel: dict[str, list[dropr.Message]] = {}
                for m in batch:
                    by_channel.setdefault(m.channel, []).append(replace(m, destination=None))
                for channel, messages in by_channel.items():
                    new = store.add(channel, messages)
                    # The wire is at-least-once: if the answer is lost, the
                    # client sends again, and the store recognises the ids.
                    again = store.add(channel, messages)
                    print(
                        f"{destination} -> {channel}: stored {len(new)}, "
                        f"{len(messages) - len(again)} recognised when sent again"
                    )
                # Only once the store said "stored" does the spool forget them.
                spool.ack(batch)


if __name__ == "__main__":
    args = sys.argv[1:] or [os.environ["DROPR_SPOOL"], os.environ["DROPR_STORE"]]
    main(args[0], args[1])
