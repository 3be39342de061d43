"""``msmt status``: what a node last recorded of itself, and whether it runs now.

It reads the node's store read-only (so it works while the daemon runs): what the
node last started with and whether the files on disk still say so, its connection,
outbox, inbox, counters by feed, last error and audit alarm, each partner's log last
witnessed, and whether a node runs now with a status fresh enough. ``feed_line`` is
also ``msmt feeds list``'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import click

from broker.cli.node import node_config, open_store, time_text
from broker.cli.options import CONFIG as _CONFIG
from broker.cli.options import echo_line
from broker.config import NodeConfig
from broker.errors import MsmtError
from broker.feeds import FEED_COUNTER, SHARED_STATE
from broker.feeds import usage as feed_usage
from broker.inbound_base import SENDER_BUDGET_STATE
from broker.keys import check_decryption_listed, current_signing_key
from broker.node_files import load_roster
from broker.roster import parse_time
from broker.store import Store
from broker.store_file import writer_pid
from broker.store_inbox import utc_day


def _outbox(store: Store, depth: int) -> dict[str, Any]:
    # ``outbox_depth`` by partner; what no partner accounts for is not planned yet.
    partners = store.outbox_by_partner()
    queued = sum(n for p in partners.values() for k, n in p.items() if k != "oldest_accepted_at")
    shown = {
        partner: {**counts, "oldest_accepted_at": time_text(counts["oldest_accepted_at"])}
        for partner, counts in partners.items()
    }
    return {"unplanned": depth - queued, **shown}


def _witnessed(seen: dict[str, Any]) -> dict[str, Any]:
    # "" from the node: no checkpoint of that log cosigned since it started (or, for a
    # node stopped now, in its last run).
    return {log: when or "not since the node last started" for log, when in seen.items()}


def _json_state(state: dict[str, str], key: str) -> dict[str, Any]:
    # Written by the node; a damaged value is shown as such, never a traceback.
    try:
        value = json.loads(state.get(key, "{}"))
    except ValueError:
        return {"unreadable": key}
    return value if isinstance(value, dict) else {"unreadable": key}


def _policy_file_state(config: NodeConfig, in_force: str) -> str:
    # Never an error: status must answer even while the file is being rewritten.
    try:
        policy, _ = config.read_policy()
    except MsmtError as exc:
        return f"does not load, so a restart would fail: {exc}"
    if policy.digest == in_force:
        return "in force"
    if in_force == "unknown":
        return f"{policy.digest} (the node has not started with it yet)"
    return f"changed to {policy.digest}; restart the node to apply it"


def _roster_file_state(config: NodeConfig, started: str) -> str:
    # As for the policy, and whether a start would take it: a start refused over the
    # roster (its signature, or no signing or decryption key of ours in it) leaves
    # roster_version at the last run's, which read as a rollout not arrived yet.
    try:
        signed = load_roster(config)
    except MsmtError as exc:
        return f"does not load, so a restart would fail: {exc}"
    now = datetime.now(UTC)
    try:
        current_signing_key(signed.roster, config.member, now)
        # A review: a revoked encryption key refused the start too, and read "restart
        # the node to apply it".
        check_decryption_listed(signed.roster, config.member, now)
    except MsmtError as exc:
        return f"version {signed.version}, with which a restart would fail: {exc}"
    if str(signed.version) == started:
        return "in force"
    if started == "unknown":
        return f"version {signed.version} (the node has not started with it yet)"
    return f"changed to version {signed.version}; restart the node to apply it"


def _as_started(started: str | None, wanted: str, source: str) -> str:
    # As for the policy: what the node started with, and whether ``source`` still says
    # so (a change applies at the next start).
    if started is None:
        return f"{wanted} (the node has not started with it yet)"
    if started != wanted:
        return f"{started}; {source} says {wanted}: restart the node to apply it"
    return started


def _shared_token_state(config: NodeConfig, state: Mapping[str, str]) -> str:
    wanted = "on" if config.intake.shared_token else "off"
    return _as_started(state.get(SHARED_STATE), wanted, "node.toml")


def _budget_state(config: NodeConfig, state: Mapping[str, str]) -> str:
    # The running node's environment may set it, which this command's may not.
    wanted = str(config.limits.sender_bytes_per_day)
    return _as_started(state.get(SENDER_BUDGET_STATE), wanted, "this configuration")


@click.command(name="status")
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status_cmd(config_path: Path, as_json: bool) -> None:
    """Show connection, outbox depth, inbox lag, counters and the last error (and when).

    ``version`` is the build that last started a node here (``unknown`` before its
    first start under a build that records it), to check an upgrade took.
    ``roster_version`` is the roster the node last started with (a number, or
    ``unknown`` before its first start), to check a roster rollout reached it;
    ``roster_file`` says whether the roster on disk is still that one, and whether a
    start would take it (a start refused, over the roster or later, leaves
    ``roster_version`` as it was; a later refusal is ``last_error``).
    ``policy_digest`` is the policy it last started with; ``policy_file`` says
    whether the file on disk is still that policy (an edit applies at restart).
    ``shared_token`` is ``off`` where the node refuses the shared intake.token
    (``intake.shared_token = false``: named feeds only), ``on`` otherwise.
    ``received`` is how many reports the inbox holds now (what ``inbox list`` lists).
    ``bytes_today`` is each partner's envelope bytes stored this UTC day, which
    ``sender_budget`` bounds (``limits.sender_bytes_per_day`` as the node last started
    with it): past it, a partner's messages are refused until 00:00 UTC.
    ``nats_refused`` says since when the hub refuses the node's NATS credentials
    (``Authorization Violation``: its user is not among the hub's), and what to do.
    ``clock_offset`` is the node's clock minus the hub's, in seconds, as last compared.
    ``inbox_paused`` says why and since when the node takes nothing from its inbox
    (another process with its credentials takes from it: the twin alarm; or its
    clock is more than 4 minutes off the hub's).
    ``outbox`` splits ``outbox_depth`` by partner (``unplanned`` has none yet), with
    the acceptance time of the oldest report waiting for each. ``feeds`` counts
    records accepted and rejected by feed (``socket``: intake.token, ``spool``,
    ``socket:NAME``: a named feed) and says when each last sent any. ``witnessed``
    says when each partner's log was last seen at a checkpoint this node
    cosigned (a running log republishes at least once a minute). ``node`` says
    whether a node runs on this data directory now; a running node's status more
    than 90 s old is flagged (it cannot write its store: a full disk?).
    """
    config = node_config(config_path)
    store = open_store(config)
    state = store.state()
    roster = state.get("roster_version", "unknown")
    in_force = state.get("policy_digest", "unknown")
    depth = store.outbox_depth()
    counters = store.counters()
    status: dict[str, Any] = {
        "member": config.member,
        "version": state.get("version", "unknown"),
        "roster_version": int(roster) if roster.isdecimal() else roster,
        # Whether the roster on disk is that one, and whether a start would take it.
        "roster_file": _roster_file_state(config, roster),
        # The key it signs with since that start: a rotation took once this is the new one.
        "signing_kid": state.get("signing_kid", "unknown"),
        "policy_digest": in_force,
        "policy_file": _policy_file_state(config, in_force),
        # Whether intake.token is let in (intake.shared_token), as of the last start.
        "shared_token": _shared_token_state(config, state),
        # As of the last start: the signing and encryption keys and the TLS certificate.
        "credentials_valid_until": _json_state(state, "credentials_valid_until"),
        "connected": state.get("connected", "unknown"),
        # Since when and why the hub refuses its NATS credentials, else empty.
        "nats_refused": state.get("nats_refused", ""),
        "outbox_depth": depth,
        "outbox": _outbox(store, depth),
        "inbox_lag": state.get("inbox_lag", "unknown"),
        # This node's clock minus the hub's, as last compared (every 5 s when connected).
        "clock_offset": state.get("clock_offset", "unknown"),
        # Why and since when the node takes nothing from its inbox (a twin), else empty.
        "inbox_paused": state.get("inbox_paused", ""),
        "received": store.inbox_count(),
        # Each partner's envelope bytes stored this UTC day, against its daily budget.
        "bytes_today": store.sender_bytes(utc_day(time.time())),
        "sender_budget": _budget_state(config, state),
        "counters": {k: v for k, v in sorted(counters.items()) if not k.startswith(FEED_COUNTER)},
        # By feed: socket (intake.token), spool, and socket:NAME for each named feed.
        "feeds": feed_usage(counters, state),
        "last_error": state.get("last_error", ""),
        # When that error last happened: the node keeps showing it after recovery.
        "last_error_at": state.get("last_error_at", ""),
        # A fork or rollback of a partner's log (or our own) ever seen: kept until
        # the next replaces it, whatever fills last_error meanwhile.
        "last_audit_alarm": state.get("last_audit_alarm", ""),
        "last_audit_alarm_at": state.get("last_audit_alarm_at", ""),
        # Each partner's log, when last seen at a checkpoint this node cosigned: a
        # partner that sends reports but is never witnessed publishes no log.
        "witnessed": _witnessed(_json_state(state, "witnessed")),
        "updated_at": state.get("updated_at", ""),
        **_liveness(config, state.get("updated_at", "")),
    }
    if as_json:
        click.echo(json.dumps(status))
    else:
        _echo_status(status)


def _echo_status(status: Mapping[str, Any]) -> None:
    # One column for every value, however long the key (last_audit_alarm_at).
    shown = [k for k, v in status.items() if k not in _LIVENESS_KEYS and not isinstance(v, dict)]
    width = max(map(len, shown)) + 1
    for key, value in status.items():
        if key in _LIVENESS_KEYS:
            continue  # told with updated_at
        if key == "updated_at":
            for name, line in _liveness_lines(status):
                click.echo(f"{name:<{width}}{line}")
        elif key == "outbox":
            for name, line in _outbox_lines(value):
                click.echo(f"  {name:<28} {line}")
        elif isinstance(value, dict) and not value:
            # No credentials recorded is not "none expire": the node has not started yet.
            nothing = "unknown" if key == "credentials_valid_until" else "none"
            click.echo(f"{key.replace('_', ' '):<{width - 1}} {nothing}")
        elif key == "feeds":
            click.echo("feeds")
            for name, figures in value.items():
                click.echo(f"  {name:<28} {feed_line(figures)}")
        elif isinstance(value, dict):
            # A header, so the indented lines below are not read as the line above's.
            click.echo(key.replace("_", " "))
            for name, item in value.items():
                echo_line(f"  {name:<28} {item}")
        else:
            # last_error and policy_file quote errors, which name paths and values. An
            # empty value (no error, not paused) says so rather than end the line blank.
            echo_line(f"{key:<{width}}{'none' if value == '' else value}")


STATUS_STALE_S: Final = 90
"""A running node rewrites its status at least every 30 s; three times that is stale."""


def _liveness(config: NodeConfig, updated_at: str) -> dict[str, Any]:
    # Whether a node holds the store now (so the status should be fresh), and how old
    # the status is: a node whose store cannot be written (a full disk) keeps running
    # while the status shows what the store held before, looking healthy.
    try:
        pid = writer_pid(config.store_path)
        running: bool | None = pid is not None
    except OSError:
        pid, running = None, None  # no /proc/locks: cannot tell
    try:
        # Negative when the clock went back since the node wrote it (same host, same
        # clock): kept so, not clamped to 0, which passed a dead node for a fresh one
        # until the clock caught up with what it had written.
        age: int | None = int((datetime.now(UTC) - parse_time(updated_at, "")).total_seconds())
    except MsmtError:
        age = None
    why = ""
    if running:
        if age is None:
            why = "unreadable"
        elif age > STATUS_STALE_S:
            why = "old"
        elif age < -STATUS_STALE_S:
            # Its age is unknown: a node that runs on rewrites it within 30 s of
            # the step, with the clock's new time, so one that stays is stale.
            why = "future"
    return {
        "running": running,
        "pid": pid or None,
        "status_age_s": age,
        "status_stale": bool(why),
        "status_stale_reason": why,
    }


_LIVENESS_KEYS: Final = frozenset(
    {"running", "pid", "status_age_s", "status_stale", "status_stale_reason"}
)


def _age_text(age: int | None) -> str:
    if age is None:
        return ""
    if age < 0:
        return f" ({-age} s in the future: this host's clock went back since)"
    return f" ({age} s ago)"


def _liveness_lines(status: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    age = status["status_age_s"]
    yield "updated_at", (status["updated_at"] or "never") + _age_text(age)
    if status["running"] is None:
        yield "node", "unknown (cannot read /proc/locks)"
    elif status["running"]:
        yield "node", "running" + (f" (pid {status['pid']})" if status["pid"] else "")
    else:
        yield "node", "not running"
    if status["status_stale_reason"] == "future":
        yield (
            "warning",
            f"the running node's status is {-age} s ahead of this host's clock, which went"
            " back since: a node that writes its store rewrites it within 30 s, so it cannot"
            " (is the disk full?), and the figures above are from before; see its log",
        )
    elif status["status_stale"]:
        yield (
            "warning",
            "the running node has not rewritten its status for"
            f" {'a while' if age is None else f'{age} s'}: it cannot write its store (is the"
            " disk full?), and the figures above are from before; see its log",
        )


def feed_line(figures: Mapping[str, Any]) -> str:
    """One feed's figures (``broker.feeds.usage``) as status and ``msmt feeds list`` show them."""
    n = figures["revoked"]
    revoked = f", {n} request{'s' if n != 1 else ''} refused as revoked" if n else ""
    return (
        f"accepted {figures['accepted']}, rejected {figures['rejected']}{revoked},"
        f" last used {figures['last_used'] or 'never'}"
    )


def _outbox_lines(outbox: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    # Under outbox_depth: what makes it up, nothing when it is 0.
    for name, counts in outbox.items():
        if name == "unplanned":
            if counts:
                yield "not planned yet", str(counts)
            continue
        waits = ", ".join(f"{k} {n}" for k, n in counts.items() if k != "oldest_accepted_at" and n)
        yield name, f"{waits} (oldest accepted {counts['oldest_accepted_at']})"


COMMANDS: tuple[click.Command, ...] = (status_cmd,)
