"""Put messages in a local spool, for a dropr-server to receive.

Run it with the spool directory as argument (or in ``$DROPR_SPOOL``)::

    python docs/examples/produce.py /tmp/dropr-spool

Each call returns once its messages are on stable storage: a crash or a
power cut right after it loses nothing.  Nothing here needs a reactor or a
running daemon; the client daemon forwards the spool when it runs.
"""

import json
import os
import sys

import dropr

#: The base URL of the dropr-server the messages go to.
DESTINATION = "http://127.0.0.1:8080/"


def main(spool_dir: str) -> None:
    # One message.  The payload is bytes (or str, sent as UTF-8): dropr does
    # not look inside, so serialise your data the way your consumer reads it.
    message_id = dropr.put(json.dumps({"order": 1}), DESTINATION, channel="orders", spool=spool_dir)
    print(f"put 1 message: {message_id}")

    with dropr.Spool(spool_dir) as spool:
        # Many messages, one disk sync: all are durable when it returns, or
        # it raises and none was stored.
        ids = spool.put_many(
            [json.dumps({"order": n}) for n in range(2, 6)], DESTINATION, channel="orders"
        )
        print(f"put_many {len(ids)} messages: {ids[0]} .. {ids[-1]}")

        # Priority 0 is delivered before everything else of the channel;
        # the default is 5, the last is 9.
        spool.put(json.dumps({"order": 6, "rush": True}), DESTINATION, "orders", priority=0)

        # dropr hands bytes over as they are; this one the consumer rejects.
        spool.put(b"not json", DESTINATION, channel="orders")

        for destination, stats in spool.stats().items():
            print(f"{destination}: {stats.depth} messages, {stats.bytes} bytes waiting")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ["DROPR_SPOOL"])
