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

QUERY='channel=orders&priority=3'
TYPE='application/json'
BODY='{"order": 3}'
TS=$(date +%s)

# The signature is the HMAC-SHA256, keyed with the secret, of eight lines:
# scheme, identity, timestamp, method, query, media type, fresh hint (empty
# here), and the SHA-256 of the body.
BODY_SHA=$(printf '%s' "$BODY" | openssl dgst -sha256 -r | cut -d' ' -f1)
SIGNATURE=$(printf 'dropr-hmac-v1\n%s\n%s\nPOST\n%s\n%s\n\n%s' \
        "$IDENTITY" "$TS" "$QUERY" "$TYPE" "$BODY_SHA" |
    openssl dgst -sha256 -hmac "$SECRET" -r | cut -d' ' -f1)

curl -sS --fail-with-body ${CA:+--cacert "$CA"} \
    -H "Content-Type: $TYPE" \
    -H "X-Dropr-Client: $IDENTITY" \
    -H "X-Dropr-Timestamp: $TS" \
    -H "X-Dropr-Signature: $SIGNATURE" \
    --data-binary "$BODY" "${URL}?${QUERY}"
echo
