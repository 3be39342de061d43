#!/bin/sh
# The compose file's one-shot `setup` service (also run again to roll out a new
# roster): copy each member's private keys and the public signed roster into
# that member's keys volume, then create every account's streams and consumers
# on the hub (idempotent: running it twice changes nothing).
#
#   MSMT_KEYS_SRC   the operator's key directory (read-only), e.g. /src/keys
#   MSMT_VOLUMES    where the keys volumes are mounted: $MSMT_VOLUMES/<MEMBER>
#   MSMT_HUB        one hub server URL
#   MSMT_REPLICAS   JetStream replicas for every stream (3 on the 3-server hub)
set -eu
: "${MSMT_KEYS_SRC:?}" "${MSMT_VOLUMES:?}" "${MSMT_HUB:?}" "${MSMT_REPLICAS:=3}"
MEMBERS="JPN USA KOR GBR FRA AUS CAN DEU ITA NLD NZL"

for m in $MEMBERS; do
    vol="$MSMT_VOLUMES/$m"
    # A node reads only its own private keys: nobody else's ever enter its volume.
    rm -rf "$vol/$m.new"
    mkdir -p "$vol/$m.new"
    cp -R "$MSMT_KEYS_SRC/$m/." "$vol/$m.new/"
    rm -rf "$vol/$m.old"
    if [ -d "$vol/$m" ]; then mv "$vol/$m" "$vol/$m.old"; fi
    mv "$vol/$m.new" "$vol/$m"
    rm -rf "$vol/$m.old"
    # The public roster and the pinned authority key (the roster's .jws last,
    # so a node that starts in between sees a pair that does not verify and
    # retries, never a mix it accepts).
    for f in roster-authority.json roster.json roster.json.jws; do
        cp "$MSMT_KEYS_SRC/$f" "$vol/$f.new"
        mv "$vol/$f.new" "$vol/$f"
    done
    if [ "$(id -u)" = 0 ]; then chown -R 10001:10001 "$vol"; fi
    chmod -R go-rwx "$vol"
    echo "provisioned keys of $m"
done

for account in $MEMBERS AUDIT; do
    msmt nats setup --server "$MSMT_HUB" --keys "$MSMT_KEYS_SRC" --account "$account" \
        --replicas "$MSMT_REPLICAS"
done
