"""Post a batch of messages to a dropr-server, the way dropr-client does.

A sender in another program (or language) speaks the same wire format::

    python docs/examples/post_batch.py http://127.0.0.1:8080/

The body is the batch format of ``dropr.wire.encode_batch``; the answer
says, for each id, whether it is stored or why it was rejected.
"""

import json
import sys
import time
import urllib.request
from typing import Any

from dropr import Message
from dropr._ids import id_at, new_id
from dropr.wire import CONTENT_TYPE, FRESH_HEADER, encode_batch


def post(url: str, body: bytes, fresh: bool) -> dict[str, Any]:
    headers = {"Content-Type": CONTENT_TYPE}
    if fresh:
        # "None of these was ever offered before": the server need not look
        # the ids up.  Only a first attempt may say so, never a retry.
        headers[FRESH_HEADER] = "1"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: dict[str, Any] = json.load(response)
    return answer


def main(url: str) -> None:
    # Ids are made once, by the sender, and kept across retries: that is
    # what lets the server store each message once.
    messages = [
        Message(new_id(), json.dumps({"order": n}).encode(), "orders", priority=5) for n in (3, 4)
    ]
    # A payload the consumer will not understand; the server stores it all
    # the same, it never looks inside.
    messages.append(Message(new_id(), b"not json", "orders", priority=5))
    # A message that waited eight days somewhere: older than the server's
    # dedup window (seven days), so it is rejected, not stored.
    stale = Message(id_at(time.time() - 8 * 86400), b'{"order": 0}', "orders")
    body = encode_batch([*messages, stale])

    answer = post(url, body, fresh=True)
    print(f"sent: {len(answer['stored'])} stored, {len(answer['rejected'])} rejected")
    for message_id, reason in answer["rejected"].items():
        print(f"  {message_id}: {reason}")

    # The answer got lost, say: send the same bytes again.  The server knows
    # the ids, stores nothing twice and gives the same answer.
    again = post(url, body, fresh=False)
    same = again["stored"] == answer["stored"] and again["rejected"] == answer["rejected"]
    print(f"sent again: {len(again['stored'])} stored, same answer: {same}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/")
