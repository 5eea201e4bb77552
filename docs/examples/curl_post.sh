#!/bin/sh
# Post messages to a dropr-server with curl: no dropr needed on this side.
#
#     sh docs/examples/curl_post.sh http://127.0.0.1:8080/
#
# Each answer is one line of JSON: {"stored": [ids], "rejected": {id: reason}}.
set -eu
URL=${1:-http://127.0.0.1:8080/}

# One message: the body is the payload, the query string names the channel
# and the priority.  Say what the payload is with its Content-Type; curl
# would otherwise call it a form (see the warning on the wire format page).
# --fail-with-body (curl 7.76 or later): a refusal makes curl fail, and it
# still prints the server's {"error": reason}.
curl -sS --fail-with-body -H 'Content-Type: application/json' \
    --data-binary '{"order": 1}' "${URL}?channel=orders&priority=3"
echo

# Exactly once, however often it is sent: make the id once and send it with
# every attempt.  An id is 32 hex digits; the first 12 are the time in
# milliseconds, which must be within the server's dedup window.
ID=$(printf '%012x' "$(date +%s)000")$(od -An -N10 -tx1 /dev/urandom | tr -d ' \n')
for _ in 1 2; do
    # The second attempt stands for a retry after a lost answer: the server
    # knows the id, answers "stored" again and keeps one copy.
    curl -sS --fail-with-body -H 'Content-Type: application/json' \
        --data-binary '{"order": 2}' "${URL}?channel=orders&id=${ID}"
    echo
done
