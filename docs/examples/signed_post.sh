#!/bin/sh
# Post one message to a dropr-server that wants signed requests: curl and
# openssl only, no dropr on this side.
#
#     sh docs/examples/signed_post.sh https://central:8443/ /etc/dropr/credentials [ca.pem]
#
# The credentials file holds one line, "<identity> <secret>".  The answer is
# one line of JSON: {"stored": [ids], "rejected": {id: reason}}.
set -eu
URL=$1
CREDENTIALS=$2
CA=${3:-}
IDENTITY=$(awk '!/^#/ && NF == 2 { print $1; exit }' "$CREDENTIALS")
SECRET=$(awk '!/^#/ && NF == 2 { print $2; exit }' "$CREDENTIALS")

# A signed message names its id: 12 hex digits of milliseconds since the
# epoch, then 20 random ones.  Sent again (a retry, or a replay by someone
# who saw the request), it is stored once.
MS=$(($(date +%s) * 1000))
ID=$(printf '%012x%s' "$MS" "$(openssl rand -hex 10)")
QUERY="channel=orders&priority=3&id=$ID"
TYPE='application/json'
BODY='{"order": 3}'
TS=$(date +%s)

# The signature is the HMAC-SHA256, keyed with the secret, of seven lines:
# scheme, identity, timestamp, method, query, media type, and the SHA-256
# of the body, which travels in its own header so that the server checks
# the signature before it reads the body.
BODY_SHA=$(printf '%s' "$BODY" | openssl dgst -sha256 -r | cut -d' ' -f1)
SIGNATURE=$(printf 'dropr-hmac-v2\n%s\n%s\nPOST\n%s\n%s\n%s' \
        "$IDENTITY" "$TS" "$QUERY" "$TYPE" "$BODY_SHA" |
    openssl dgst -sha256 -hmac "$SECRET" -r | cut -d' ' -f1)

curl -sS --fail-with-body ${CA:+--cacert "$CA"} \
    -H "Content-Type: $TYPE" \
    -H "X-Dropr-Client: $IDENTITY" \
    -H "X-Dropr-Timestamp: $TS" \
    -H "X-Dropr-Content-SHA256: $BODY_SHA" \
    -H "X-Dropr-Signature: $SIGNATURE" \
    --data-binary "$BODY" "${URL}?${QUERY}"
echo
