#!/bin/sh
# A consumer in shell: hand each message of a channel to a command (its
# payload on the command's stdin), ack it when the command succeeds, and
# fail it with a reason when it does not.
#
#   consume.sh STORE CHANNEL COMMAND [ARGUMENT...]
set -eu
store=$1 channel=$2
shift 2
# Up to 100 messages at a time, leased for 10 minutes; an empty answer
# means the channel is empty.
while ids=$(dropr take --store "$store" --channel "$channel" --limit 100 --lease 600 --ids) &&
    [ -n "$ids" ]; do
    for id in $ids; do
        if dropr show --store "$store" --raw "$id" | "$@"; then
            dropr ack --store "$store" "$id"
        else
            dropr fail --store "$store" --reason "$1 exited with status $?" "$id"
        fi
    done
done
