#!/bin/sh
# The compose file's one-shot `setup` service (also run again to roll out a new
# roster): copy each member's private keys and the public signed roster into
# that member's keys volume, then create every account's streams and consumers
# on the hub (idempotent: running it twice changes nothing). It passes
# --replicas $MSMT_REPLICAS and no --max-bytes or --max-age-days, so a stream that
# exists keeps the size and age set on it before, and a new one gets the default
# size and age (and $MSMT_REPLICAS copies).
#
# The roster-authority public key is installed into a volume only when the volume
# has none: it is what each node checks every later roster against, so a roster
# rollout must never be able to replace it. If the source's key differs from one
# already pinned, nothing is copied and the script stops with one line (exit 2);
# re-pinning is a deliberate act: check the new key's thumbprint out of band
# (msmt keys verify-roster prints it), then remove the pinned file by hand.
#
#   MSMT_KEYS_SRC   the operator's key directory (read-only), e.g. /src/keys
#   MSMT_VOLUMES    where the keys volumes are mounted: $MSMT_VOLUMES/<MEMBER>
#   MSMT_HUB        one hub server URL
#   MSMT_REPLICAS   JetStream replicas for every stream (3 on the 3-server hub)
set -eu
: "${MSMT_KEYS_SRC:?}" "${MSMT_VOLUMES:?}" "${MSMT_HUB:?}" "${MSMT_REPLICAS:=3}"
MEMBERS="JPN USA KOR GBR FRA AUS CAN DEU ITA NLD NZL"
AUTHORITY=roster-authority.json

# Every volume is checked before any is touched, so a refusal changes nothing.
for m in $MEMBERS; do
    pinned="$MSMT_VOLUMES/$m/$AUTHORITY"
    if [ -e "$pinned" ] && ! cmp -s "$MSMT_KEYS_SRC/$AUTHORITY" "$pinned"; then
        echo "provision.sh: error: $MSMT_KEYS_SRC/$AUTHORITY is not the authority key pinned in $pinned; refusing to replace it (to re-pin, check the new key out of band and remove $pinned)" >&2
        exit 2
    fi
done

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
    # The authority key is pinned once, on the first run, and never replaced.
    if [ ! -e "$vol/$AUTHORITY" ]; then
        cp "$MSMT_KEYS_SRC/$AUTHORITY" "$vol/$AUTHORITY.new"
        mv "$vol/$AUTHORITY.new" "$vol/$AUTHORITY"
    fi
    # The public roster (the .jws last, so a node that starts in between sees a
    # pair that does not verify, never a mix it accepts: it reads the pair again
    # while it changes, and compose restarts it should the copy take longer).
    for f in roster.json roster.json.jws; do
        # Not "$f.new": that is the name a custodian's roster write leaves aside.
        cp "$MSMT_KEYS_SRC/$f" "$vol/$f.copying"
        mv "$vol/$f.copying" "$vol/$f"
    done
    if [ "$(id -u)" = 0 ]; then chown -R 10001:10001 "$vol"; fi
    chmod -R go-rwx "$vol"
    echo "provisioned keys of $m"
done

for account in $MEMBERS AUDIT; do
    msmt nats setup --server "$MSMT_HUB" --keys "$MSMT_KEYS_SRC" --account "$account" \
        --replicas "$MSMT_REPLICAS"
done
