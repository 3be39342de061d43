#!/bin/sh
# Before the first `docker compose up` (run on the operator's machine, with msmt
# installed): every member's keys and the signed roster, the pseudonym keys the
# policies name, and the hub's nats-server configuration for a 3-server cluster.
#
#   deploy/prepare.sh [KEYDIR] [NODESDIR]      (defaults: keys, nodes)
#
# KEYDIR/authority/ holds the roster authority's private key: move it offline
# once the roster is signed (see docs/DEPLOY.md).
set -eu
KEYS=${1:-keys}
NODES=${2:-nodes}

# A mistyped NODESDIR would otherwise write every key but no pseudonym key.
if ! ls "$NODES"/*/policy.toml >/dev/null 2>&1; then
    echo "prepare.sh: no $NODES/<MEMBER>/policy.toml: NODESDIR must hold the members' policies" >&2
    exit 2
fi

# It makes a federation's keys once: `msmt keys init` would say "use --force", which
# this script does not take. Keys already made change one member at a time.
if [ -e "$KEYS/roster.json" ]; then
    echo "prepare.sh: $KEYS already holds keys (roster.json): to start over, move $KEYS away;" \
        "to change keys, see docs/KEYS.md (msmt keys rotate, msmt keys revoke)" >&2
    exit 2
fi

msmt keys init --dir "$KEYS"

# Each [pseudonym_keys.<id>] a member's policy declares needs a key in
# KEYDIR/<MEMBER>/pseudonym/<id>.key, shared out of band with the partners the
# policy lists (`msmt keys pseudonym` prints how).
for policy in "$NODES"/*/policy.toml; do
    member=$(basename "$(dirname "$policy")")
    for id in $(sed -n 's/^\[pseudonym_keys\.\([A-Za-z0-9._-]*\)\].*/\1/p' "$policy"); do
        msmt keys pseudonym "$member" "$id" --dir "$KEYS"
    done
done

# One file serves all three servers: each takes its name from $SERVER_NAME, and
# the JetStream store is relative to the server's working directory (/data).
mkdir -p "$KEYS/nats"
# The custodian's own key directory: its authority key is the one it made here.
msmt nats config --keys "$KEYS" --authority "$KEYS/roster-authority.json" --cluster 3 \
    --route-host 'nats-{i}' --store-dir jetstream --out "$KEYS/nats/hub.conf"
