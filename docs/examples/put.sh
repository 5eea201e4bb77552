#!/bin/sh
# Put messages durably from a shell script: curl on the client daemon's
# put socket.  dropr-client must run on this spool (the socket is its own);
# only the spool's owner (or root) may use it.
#
#     sh docs/examples/put.sh /var/spool/dropr http://central:8080/
#
# Each answer is one line of JSON: {"stored": [id], "rejected": {}} once the
# message is on stable storage, else {"error": reason} with a 4xx or 5xx
# status, and nothing was stored.
set -eu
SPOOL=${1:-${DROPR_SPOOL:-/var/spool/dropr}}
DESTINATION=${2:-http://127.0.0.1:8080/}
SOCKET="$SPOOL/put.sock"

# One message: the body is the payload; --url-query URL-encodes the
# destination (curl 7.87 or later; with an older curl, encode it yourself).
# --fail-with-body: a refusal makes curl fail, and it still prints the reason.
curl -sS --fail-with-body --unix-socket "$SOCKET" \
    --data-binary '{"order": 1}' \
    --url-query "destination=$DESTINATION" --url-query channel=orders \
    --url-query priority=3 http://spool/
echo

# Exactly once, however often it is sent: make the id once and give it with
# every attempt (32 hex digits, the first 12 the time in milliseconds).
ID=$(printf '%012x' "$(date +%s)000")$(od -An -N10 -tx1 /dev/urandom | tr -d ' \n')
for _ in 1 2; do
    # The second attempt stands for a retry after a lost answer: the spool
    # may then hold the message twice; the server keeps one.
    curl -sS --fail-with-body --unix-socket "$SOCKET" --data-binary '{"order": 2}' \
        --url-query "destination=$DESTINATION" --url-query channel=orders \
        --url-query "id=$ID" http://spool/
    echo
done

# A file as the payload, read from standard input here.
echo '{"order": 3}' | curl -sS --fail-with-body --unix-socket "$SOCKET" --data-binary @- \
    --url-query "destination=$DESTINATION" --url-query channel=orders http://spool/
echo

# A mistake is refused at once, with what to do (status 400; nothing stored).
if ! curl -sS --fail-with-body --unix-socket "$SOCKET" --data-binary 'x' \
    --url-query "destination=$DESTINATION" --url-query 'channel=no/slashes' http://spool/; then
    echo
    echo "refused, as it should be"
fi
