"""Starting a node: check and load everything before anything runs, then run it.

``load_node`` reads the config's files (``broker.node_files``: the pinned signed
roster, the private keys, the policy and its pseudonym keys, the TLS files),
opens the store and the audit log and checks they are from one moment
(``broker.reconcile``), logs the start's ``policy`` and ``key`` entries, and
builds the ``Node``. Anything bad stops it with one line (``MsmtError``) before a
socket is opened, and what it opened is closed again. ``run`` is the daemon's
entry (``msmt node run``).
"""

from __future__ import annotations

import contextlib
import gc
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import audit_events, version
from broker.audit_events import AuditEvent
from broker.auditlog import DB_FILE, AuditLog
from broker.auditnet import AuditNet
from broker.checkpoint import roster_log_keys, roster_witness_keys
from broker.config import NodeConfig
from broker.errors import AuditError, ConfigError, KeyMaterialError, StoreDamagedError
from broker.feeds import SHARED_STATE
from broker.files import holds_nothing
from broker.inbound import Inbound
from broker.inbound_base import (
    SENDER_BUDGET_STATE,
    UNSTORED_STATE,
    read_unstored,
    unstored_text,
)
from broker.keys_roster import pin_roster
from broker.log import get_logger
from broker.members import MEMBERS
from broker.metrics import Metrics
from broker.natstls import CONFIG_NAMES, certificate_expiry
from broker.node import Node
from broker.node_files import check_data_dir, load_files
from broker.planner import Planner, Signer
from broker.publisher import RunDb, withheld_event
from broker.reconcile import audit_unaudited, check_store_against_log, log_lost, ran_before
from broker.roster import Roster
from broker.serving import descriptor_limit_problem
from broker.stopsignals import StopSignals
from broker.store import Store

log = get_logger("node")


POLICY_LOGGED_STATE: Final = "policy_logged"
"""The digest of the policy the audit log last logged as in force (``_log_start``)."""


def load_node(config: NodeConfig, now: datetime | None = None) -> Node:
    """Check and load everything a node needs; raise ``MsmtError`` with one line if any is bad."""
    at = now or datetime.now(UTC)
    # The files first: they are only read, so a start refused for a missing roster or
    # key leaves no data directory or empty store behind (a docs review found one).
    files = load_files(config, at)
    _make_data_dir(config.data_dir)
    # Until the node owns them, a failure closes what was opened: in-process
    # callers (tests, the demo) must not inherit open files.
    with contextlib.ExitStack() as undo:
        try:
            store = Store(config.store_path)
        except StoreDamagedError as exc:
            # As for a damaged audit log (_open_audit): exit 2, which the unit does not
            # restart on; a store that is locked or on a full disk stays 1.
            raise ConfigError(str(exc)) from None
        undo.callback(store.close)
        state = store.state()
        signed, keys, policy, signing = files.signed, files.keys, files.policy, files.signing
        if keys.pending:
            # Normal while a key request waits for the custodian; if it lasts, the
            # accepted roster was not installed here (docs/KEYS.md, "Key requests").
            log.warning(
                "keys_pending",
                kids=",".join(keys.pending),
                reason="not in the roster yet: the node uses its current keys",
            )
        audit = _open_audit(config, store, signing, signed.roster)
        undo.callback(audit.close)
        unrecorded, unstored = check_store_against_log(config, store, audit)
        # Kept until stored: the store write below moves its record of the log past them.
        unstored |= read_unstored(state.get(UNSTORED_STATE, ""))
        store.audit_size = lambda: audit.size
        logged_now = _log_start(
            config.member, audit, state, policy.digest, signed.roster, unrecorded, at
        )
        # Before any store write: it would record a log size past the entries of
        # reports whose confirmation a crash lost, and they would be logged twice.
        audit_unaudited(config.member, store, audit, at)
        _withhold_unkeyed(config.member, store, audit, signed.roster, at)
        # What the audit log now holds, at once: the next start goes on from it.
        store.set_state(
            {
                POLICY_LOGGED_STATE: policy.digest,
                "key_events": json.dumps(sorted(logged_now)),
                UNSTORED_STATE: unstored_text(unstored),
            }
        )
        # What msmt status and node check show as in force: recorded by Node.run once
        # the start has got through (its inputs open). A start refused later (its
        # metrics port held by another node, its socket or spool unusable) showed the
        # new roster, key and policy as in force, the new build as started.
        started = {
            "roster_version": str(signed.version),
            # The build that last started here: msmt status shows an upgrade took.
            "version": version(),
            "signing_kid": keys.signing_kid,
            "policy_digest": policy.digest,
            SHARED_STATE: "on" if config.intake.shared_token else "off",
            # The budget this run holds partners to, for msmt status (whose own
            # environment may not be the node's).
            SENDER_BUDGET_STATE: str(config.limits.sender_bytes_per_day),
        }
        signer = Signer(config.member, keys.signing, keys.signing_kid)
        planner = Planner(signer, policy, signed.roster, files.pseudonym)
        inbound = Inbound(
            config.member,
            keys.decryption,
            signed.roster,
            store,
            audit,
            timedelta(seconds=config.limits.freshness_seconds),
            config.limits.max_message_bytes,
            sender_bytes_per_day=config.limits.sender_bytes_per_day,
            unstored=unstored,
        )
        partners = [m for m in MEMBERS if m != config.member]
        # Only the logs the roster lists a key for: with an empty entry for every other
        # member, a 3-member deployment's status and witnessed gauge listed all eleven,
        # each "not since the node last started", as if ten partners' logs were missing.
        partner_log_keys = {m: k for m in partners if (k := roster_log_keys(signed.roster, m))}

        def auditnet(metrics: Metrics, run_db: RunDb) -> AuditNet:
            return AuditNet(
                config.member,
                audit,
                run_db,
                signing,
                partner_log_keys,
                roster_witness_keys(signed.roster, partners),
                config.data_dir / "witness-state.json",
                metrics.audit_alarms,
                refused=metrics.rejected,
                own_log_keys=roster_log_keys(signed.roster, config.member),
                active=metrics.audit_alarm_active,
                witnessed=metrics.witnessed,
                uncosigned=metrics.uncosigned,
            )

        expiries = _expiries(config, signed.roster, keys.signing_kid, at)
        node = Node(
            config,
            store,
            audit,
            planner,
            inbound,
            files.seed,
            auditnet,
            files.policy_text,
            files.tls,
            expiries,
        )
        # Under another policy than the last start's: what waits for a partner without
        # a key is planned again once, so that what the policy no longer sends is dropped.
        node.plan_loop.policy_changed = state.get("policy_digest") != policy.digest
        node.started_facts = started
        # Only now: a start refused above (a key file missing for the new roster)
        # must leave the previous roster usable again (docs/KEYS.md).
        # load_pinned_roster refused anything older, so this never lowers the pin.
        pin_roster(config.roster_state_path, signed)
        undo.pop_all()
        return node


def _withhold_unkeyed(
    member: str, store: Store, audit: AuditLog, roster: Roster, at: datetime
) -> None:
    """Take back pending envelopes to a key the roster withdrew, or to a partner with none.

    The roster is checked when a report is planned; one that revoked or dropped a
    partner's key since, or left the partner no valid key (a member suspended, or
    leaving), must stop what waits for it in the outbox too. A review saw 3 such
    envelopes published after the restart that applied the revocation, while the
    node's own warning said they would wait. A key merely retired or lapsed while the
    partner has a valid one (a rotation) is left to go out as it is.

    Each is logged (``withheld``, with all its ``sent`` entry would say) before the
    store lets it go: one published before a crash lost its ack may be on the hub,
    and its receipt must match an entry of this log (docs/AUDIT.md). A crash in
    between takes them back again at the next start, logged again (an honest repeat).
    """

    def refused(partner: str, kid: str) -> str | None:
        try:
            roster.check(kid, member=partner, use="enc", at=at)
        except KeyMaterialError as exc:
            why = str(exc)
        else:
            return None
        key = roster.get(kid) if kid in roster else None
        if key is None or key.status == "revoked" or (key.member, key.use) != (partner, "enc"):
            return why
        # Retired or lapsed, and the partner has a valid key now (a rotation): it keeps
        # the old one, and the envelope may be on the hub already (its ack lost in a
        # crash), where taken back it would be received with no send in this log (a
        # review's replay: 42 such findings). Sent as it is.
        try:
            roster.current(partner, "enc", at)
        except KeyMaterialError:
            return why
        return None

    found = store.unkeyed(refused)
    if not found:
        return
    audit.append_many([withheld_event(member, w, at) for w in found])
    taken = store.withhold(found)
    if taken:
        log.warning(
            "envelopes_withheld",
            envelopes=sum(taken.values()),
            partners=",".join(sorted(taken, key=MEMBERS.index)),
            reason="encrypted to a key the roster does not accept now; planned again when the"
            " partner has a valid key, under the policy then",
        )


def _log_start(
    member: str,
    audit: AuditLog,
    state: dict[str, str],
    digest: str,
    roster: Roster,
    unrecorded: list[dict[str, Any]],
    at: datetime,
) -> set[str]:
    """Append the start's ``policy`` and ``key`` entries; return the key events now logged.

    ``unrecorded`` are such entries an earlier start appended without writing the
    store after them (a full disk): this start goes on from them rather than
    logging them twice, which replay would call a broken policy chain.
    """
    # The policy the log last says is in force: a start refused after logging it
    # records it here, not as the policy in force (stores before this: the latter).
    previous = state.get(POLICY_LOGGED_STATE, state.get("policy_digest"))
    for entry in unrecorded:
        if entry["type"] == "policy":
            previous = entry["policy_digest"]
    if previous != digest:
        audit.append_many(
            [
                audit_events.policy_changed(
                    member, at, policy_digest=digest, previous_digest=previous
                )
            ]
        )
    try:
        logged = {str(x) for x in json.loads(state.get("key_events", "[]"))}
    except (ValueError, TypeError):
        logged = set()  # unreadable: log the roster's changes again rather than never
    logged |= {f"{e['action']}:{e['kid']}" for e in unrecorded if e["type"] == "key"}
    key_events, logged_now = own_key_events(member, roster, logged, at)
    if key_events:
        audit.append_many(key_events)
    return logged_now


def _make_data_dir(data_dir: Path) -> None:
    check_data_dir(data_dir)  # before it is made: a file there, a parent others may write
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(
            f"config key data_dir: cannot create {data_dir}: {exc.strerror}"
        ) from None
    # And once it is there: another user could have made it between the two (a review).
    check_data_dir(data_dir)


def _open_audit(
    config: NodeConfig, store: Store, signing: Ed25519PrivateKey, roster: Roster
) -> AuditLog:
    # The log's latest checkpoint may carry a key from before a rotation, or one
    # revoked since: the open check asks only whether the file is intact, and
    # refusing those keys would keep a node that rotated or revoked from starting.
    # The next append signs the whole tree with the current key; partners and
    # ``msmt audit verify`` still refuse checkpoints a revoked key signed.
    earlier = roster_log_keys(roster, config.member, with_revoked=True)
    holds_reports, ran = store.holds_reports(), ran_before(config)
    lost = log_lost(config, ran=not holds_reports)
    if (holds_reports or ran) and holds_nothing(config.audit_dir / DB_FILE):
        raise lost  # before AuditLog writes its tables into an empty file
    try:
        audit = AuditLog(config.audit_dir, config.member, signing, earlier_keys=earlier)
    except AuditError as exc:
        # Damaged, not a log, or another member's: no restart mends it, so the
        # status the systemd unit does not restart on, as for a store and log
        # from two moments (check_store_against_log). Locked, unreadable or on a
        # full disk (StoreError) stays 1: that may pass, and a restart then works.
        raise ConfigError(str(exc)) from None
    if (holds_reports or ran) and audit.size == 0:
        audit.close()
        raise lost
    return audit


def own_key_events(
    member: str, roster: Roster, logged: set[str], at: datetime
) -> tuple[list[AuditEvent], set[str]]:
    """``key`` entries for ``member``'s keys the roster shows rotated or revoked, not yet logged.

    A node learns of its own rotations and revocations from the roster it starts
    with, so it logs each once, at the first start that shows it (``logged``
    holds ``action:kid`` of those already logged; the new set is returned).
    """
    events: list[AuditEvent] = []
    done = set(logged)
    for key in sorted(roster, key=lambda k: k.kid):
        if key.member != member or key.status == "active":
            continue
        action = "revoked" if key.status == "revoked" else "rotated"
        if f"{action}:{key.kid}" in done:
            continue
        new_kid = None
        if action == "rotated":
            try:
                new_kid = roster.current(member, key.use, at).kid
            except KeyMaterialError:
                continue  # retired with nothing valid in its place: nothing to name yet
        events.append(
            audit_events.key_changed(member, at, action=action, kid=key.kid, new_kid=new_kid)
        )
        done.add(f"{action}:{key.kid}")
    return events, done


def _expiries(
    config: NodeConfig, roster: Roster, signing_kid: str, at: datetime
) -> dict[str, datetime]:
    # For the credential-expiry gauge.
    expiries = {"signing_key": roster.get(signing_kid).valid_until}
    # No current encryption key (a rotation dated later) only means nothing
    # arrives until it starts; the gauge is left out, the node still runs.
    with contextlib.suppress(KeyMaterialError):
        expiries["encryption_key"] = roster.current(config.member, "enc", at).valid_until
    if config.nats.cert_file is not None:
        cert = config.nats.cert_file
        expiries["tls_certificate"] = certificate_expiry(cert, CONFIG_NAMES.cert)
    return expiries


async def run(config: NodeConfig, signals: StopSignals | None = None) -> None:
    """Load and run the node described by ``config`` until it is told to stop (``Node.run``).

    The daemon's entry (``msmt node run``), in a process of its own: what it has
    loaded is then frozen out of the cyclic garbage collector's way. In-process
    callers (tests, the demo) use ``load_node`` and ``Node.run`` instead.
    """
    # Before anything is read or made: the planning worker's pipe, then connections,
    # would fail for want of descriptors.
    too_low = descriptor_limit_problem()
    if too_low is not None:
        raise ConfigError(too_low)
    node = load_node(config)
    # The modules, roster, keys and schemas loaded by now (~77,000 objects) live as
    # long as the process, yet every full collection walked them all: one per ~3,000
    # deliveries at a receiver, 26-41 ms each on the store's thread or the event loop
    # (bench/README.md, sixteenth session). Collected first: no garbage is frozen.
    gc.collect()
    gc.freeze()
    await node.run(signals)
