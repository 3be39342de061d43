"""``msmt inbox list``, ``show``, ``evidence`` and ``check``: the reports a node received.

Each reads the node's store read-only, so it works while the daemon runs; a
report whose signer the roster has since revoked says so. ``evidence`` prints what
a third party checks with ``msmt audit evidence``; ``check`` verifies every row
against its kept envelope and the node's audit log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from broker import evidence, inbox_check
from broker.audit_events import parse_entry
from broker.audit_verify import load
from broker.cli.node import (
    node_config,
    node_pid,
    node_runs,
    open_store,
    started_meanwhile,
    time_text,
)
from broker.cli.options import CONFIG as _CONFIG
from broker.config import NodeConfig
from broker.errors import AuditError, EnvelopeError, InputError, UsageError
from broker.keys import MemberKeys, load_member_keys
from broker.members import MEMBERS, is_member
from broker.node_files import load_roster
from broker.roster import Roster
from broker.store import AUDIT_SIZE, InboxEntry, Store
from broker.store_file import KEPT_SINCE


def _member_keys(config: NodeConfig) -> tuple[Roster, MemberKeys]:
    # As the node loads them, for the inbox's own checks.
    roster = load_roster(config).roster
    return roster, load_member_keys(config.keys.dir, config.member, roster, datetime.now(UTC))


def _revoked_signers(config: NodeConfig, entries: Sequence[InboxEntry]) -> dict[str, str]:
    """The signing keys of ``entries`` that the roster withdrew, each with why."""
    kids = {e.signing_kid for e in entries if e.signing_kid is not None}
    if not kids:
        # Rows from before nodes recorded the key need no roster: inbox check covers them.
        return {}
    roster = load_roster(config).roster
    return {kid: why for kid in sorted(kids) if (why := roster.withdrawn(kid)) is not None}


def _signer_revoked(entry: InboxEntry, revoked: Mapping[str, str]) -> str | None:
    return None if entry.signing_kid is None else revoked.get(entry.signing_kid)


def _entry_json(entry: InboxEntry, revoked: Mapping[str, str]) -> dict[str, Any]:
    return {
        "sender": entry.sender,
        "originator": entry.originator,
        "report_id": entry.report_id,
        "kind": entry.kind,
        "tlp": entry.tlp,
        "rel_to": None if entry.rel_to is None else list(entry.rel_to),
        "issued_at": time_text(entry.iat),
        "received_at": time_text(entry.received_at),
        "paths": list(entry.paths),
        "fields": entry.fields,
        "jwe_sha256": entry.jwe_sha256,
        # None for a report received before nodes recorded it.
        "signing_kid": entry.signing_kid,
        "signer_revoked": _signer_revoked(entry, revoked),
    }


@click.group(name="inbox")
def inbox_group() -> None:
    """Reports received from partners, verified."""


@inbox_group.command(name="list")
@_CONFIG
@click.option("--from", "sender", help="Only reports from this member.")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Show at most this many, the newest (stderr says when there are more).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def inbox_list(config_path: Path, sender: str | None, limit: int, as_json: bool) -> None:
    """List received reports, newest first: originator, kind, and the fields received.

    A report whose originator's signing key the roster has since revoked is
    marked ``SIGNER REVOKED`` (``signer_revoked`` in ``--json``). One received
    before nodes recorded signing keys is not: ``msmt inbox check`` checks those.
    """
    if sender is not None:
        if not is_member(sender.upper()):
            # The store would only find nothing, which reads as "no reports yet".
            raise UsageError(f"--from: unknown member {sender!r} (members: {', '.join(MEMBERS)})")
        sender = sender.upper()
    config = node_config(config_path)
    store = open_store(config)
    entries = store.inbox(sender=sender, limit=limit)
    revoked = _revoked_signers(config, entries)
    if len(entries) == limit and store.inbox_count(sender) > limit:
        # On stderr, so a --json consumer's lines stay JSON.
        click.echo(
            f"(the newest {limit} of {store.inbox_count(sender)}; --limit N for more)", err=True
        )
    for entry in entries:
        if as_json:
            click.echo(json.dumps(_entry_json(entry, revoked)))
            continue
        why = _signer_revoked(entry, revoked)
        click.echo(
            f"{time_text(entry.received_at)}  {entry.originator}  {entry.kind:<8}  "
            f"TLP:{entry.tlp:<12}  "
            f"{entry.report_id}  {len(entry.paths)} fields: {', '.join(entry.paths)}"
            + ("" if why is None else f"  SIGNER REVOKED ({why})")
        )


def _one_received(store: Store, report_id: str, sender: str | None) -> InboxEntry:
    # Each sender has its own seen-set, so two members may have sent one report id:
    # the caller names which rather than be shown either, or both as one.
    entries = store.inbox_entry(report_id)
    if sender is not None:
        entries = [e for e in entries if e.sender == sender.upper()]
    if not entries:
        raise UsageError(f"no received report {report_id}" + (f" from {sender}" if sender else ""))
    if len(entries) > 1:
        senders = ", ".join(sorted(e.sender for e in entries))
        raise UsageError(f"report {report_id} came from {senders}: say which with --from")
    return entries[0]


_FROM = click.option("--from", "sender", help="The member that sent it, if several did.")


@inbox_group.command(name="show")
@_CONFIG
@click.argument("report_id")
@_FROM
def inbox_show(config_path: Path, report_id: str, sender: str | None) -> None:
    """Show one received report: its sender and every field received, as JSON.

    ``signer_revoked`` says why, when the roster has since revoked the key its
    originator signed it with (see ``msmt inbox list``).
    """
    config = node_config(config_path)
    entry = _one_received(open_store(config), report_id, sender)
    revoked = _revoked_signers(config, [entry])
    click.echo(json.dumps(_entry_json(entry, revoked), indent=2))


@inbox_group.command(name="evidence")
@_CONFIG
@click.argument("report_id")
@_FROM
def inbox_evidence(config_path: Path, report_id: str, sender: str | None) -> None:
    """Print evidence of a received report, for a third party to check.

    The envelope as it arrived and its content key, which opens this one message
    and nothing else. ``msmt audit evidence FILE --keys DIR`` checks it.
    """
    config = node_config(config_path)
    store = open_store(config)
    entry = _one_received(store, report_id, sender)
    jwe = store.kept_envelope(entry.sender, report_id)
    if jwe is None and KEPT_SINCE not in store.state():
        # This store kept envelopes from its start: the row lost its own.
        raise InputError(
            f"the kept envelope of report {report_id} is missing:"
            " check the store with msmt inbox check"
        )
    if jwe is None:
        raise InputError(
            f"report {report_id} from {entry.sender} was received before nodes kept envelopes:"
            " there is no evidence of it but the audit log's hash"
        )
    roster, keys = _member_keys(config)
    try:
        found = evidence.make(
            jwe, received_at=entry.received_at, decryption_keys=keys.decryption, me=config.member
        )
    except EnvelopeError as exc:
        raise InputError(f"cannot open the kept envelope of report {report_id}: {exc}") from None
    if (found.jwe_sha256, found.report_id) != (entry.jwe_sha256, report_id):
        # The store was changed on disk: never hand out another report's envelope as this one.
        raise InputError(
            f"the kept envelope of report {report_id} is not the one received:"
            " check the store with msmt inbox check"
        )
    withdrawn = None if entry.signing_kid is None else roster.withdrawn(entry.signing_kid)
    if withdrawn is not None:
        # Still printed (it shows what was received), but its signature no longer
        # vouches for it: msmt audit evidence refuses it at the key step.
        click.echo(f"warning: the report's signer is no longer trusted: {withdrawn}", err=True)
    click.echo(found.to_json())


@inbox_group.command(name="check")
@_CONFIG
def inbox_check_cmd(config_path: Path) -> None:
    """Check every received report against its kept envelope and the node's audit log.

    Each row whose envelope was kept is verified again and compared with it, column by
    column; rows and the log's receipts must match one for one. Exit 0 if all hold,
    1 with one line per problem. The log itself: msmt audit verify.
    """
    config = node_config(config_path)
    store = open_store(config)
    roster, keys = _member_keys(config)
    running = node_runs(config)
    # A running node appends each receipt to its log before it stores the report. So the
    # store is read at one moment first and the log after it: every stored row's receipt
    # is then in what is read (reading the log first, a trial under load found rows
    # "no received entry names" 3 times in 5). Receipts the log holds beyond the size the
    # store last recorded may not be stored yet while the node runs: those are left out,
    # and counted, rather than reported missing.
    with store.snapshot():
        state = store.state()
        receipts: list[tuple[int, str, str, str, float]] = []
        log = load(config.audit_dir)
        for seq, data in enumerate(log.entries(0, 1 << 62)):
            try:
                entry = parse_entry(data, seq)
            except AuditError as exc:
                raise AuditError(
                    f"audit log {log.path}: entry {seq} {exc}: run msmt audit verify"
                ) from None
            if entry["type"] != "received":
                continue
            at = datetime.fromisoformat(entry["at"]).timestamp()
            receipts.append((seq, entry["sender"], entry["report_id"], entry["jwe_sha256"], at))
        # Asked again once both are read: a node that started or stopped between the
        # two looks wrote as the other read.
        if not running and (later := node_pid(config)) is not None:
            raise started_meanwhile(config, later)
        recorded = int(state[AUDIT_SIZE]) if running and AUDIT_SIZE in state else None
        unsettled = 0
        if recorded is not None:
            unsettled = sum(1 for receipt in receipts if receipt[0] >= recorded)
            receipts = [receipt for receipt in receipts if receipt[0] < recorded]
        since = state.get(KEPT_SINCE)
        found = inbox_check.check(
            store,
            receipts,
            me=config.member,
            decryption_keys=keys.decryption,
            roster=roster,
            kept_since=None if since is None else float(since),
        )
    for problem in found.problems:
        click.echo(problem)
    if running and any(problem.endswith(" is not in the inbox") for problem in found.problems):
        # A receiver logs a batch's receipts, then stores it: a batch the store refused
        # (a full disk) comes again from the hub, and its status writes, smaller, may
        # commit meanwhile past those receipts (a full-disk trial).
        click.echo(
            "note: the node runs: a batch it logged and could not store (a full disk: msmt"
            " status's last_error) is stored when the hub delivers it again; check again"
            " then, or with the node stopped"
        )
    older = f"; {found.not_kept} received before envelopes were kept" if found.not_kept else ""
    if found.key_not_held:
        older += (
            f"; {found.key_not_held} kept as received (the log's hash) but not checked again:"
            " their decryption key is not held here (revoked or lost)"
        )
    if unsettled:
        plural = "s" if unsettled > 1 else ""
        older += f"; {unsettled} receipt{plural} logged after the running node's last store write"
        older += " left out"
    summary = f"{found.verified} reports match their signed envelopes{older}"
    if found.problems:
        count = len(found.problems)
        raise InputError(f"{count} problem{'s' if count > 1 else ''} in the inbox ({summary})")
    click.echo(f"OK: {summary}; every receipt in the audit log is in the inbox")


COMMANDS: tuple[click.Command, ...] = (inbox_group,)
