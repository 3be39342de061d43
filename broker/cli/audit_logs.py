"""``msmt audit entries`` and ``replay``: a verified log's entries, and several reconciled.

``entries`` lists one log's entries once the whole log has rebuilt its verified root;
``replay`` reconciles several nodes' logs against the senders' policies
(``broker.audit_replay``) and prints the result (``broker.audit_replay_text``), or its
JSON. Part of the audit family (``broker.cli.audit``).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import click

from broker.audit_events import TYPES
from broker.audit_replay import KEY_FINDINGS, replay
from broker.audit_replay_text import render_lines
from broker.audit_verify import Report, read_origin
from broker.cli.audit_base import (
    DIR,
    audit_group,
    entry_stream,
    read_file,
    revoked_log_keys,
    shown_value,
    trust_options,
    trusted_log_keys,
    trusted_roster,
    verified_log,
)
from broker.cli.options import write_stdout
from broker.errors import AuditError, UsageError
from broker.policy import Policy, load_policy

PROGRESS_FROM = 50_000
"""Replays reading at least this many entries show a progress bar."""


def _load_policies(folders: tuple[Path, ...]) -> dict[str, Policy]:
    policies: dict[str, Policy] = {}
    for folder in folders:
        files = sorted(folder.glob("*/policy.toml"))
        if not files:
            raise UsageError(f"--policies {folder}: no <MEMBER>/policy.toml inside")
        for path in files:
            text = read_file(path, "policy")
            policy = load_policy(text, member=path.parent.name, source=str(path))
            policies[policy.digest] = policy
    return policies


_NOT_SHOWN: frozenset[str] = frozenset({"v", "seq", "prev", "at", "type", "member"})


@audit_group.command(name="entries")
@DIR
@trust_options
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(TYPES),
    help="Only entries of this type (repeat for several).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry (NDJSON).")
def audit_entries(
    directory: Path,
    keydir: Path | None,
    authority: Path | None,
    roster: Path | None,
    log_key: tuple[str, ...],
    types: tuple[str, ...],
    as_json: bool,
) -> None:
    """List a log's entries (of every type: sent, received, rejected...) after verifying it.

    The log is verified first, as msmt audit verify does, and only the entries
    that rebuild the verified root are shown: a damaged log gets one line and
    exit status 1. Entries hold ids, disclosure keys, digests and markings,
    never report content.
    """
    trusted = trusted_roster(keydir, authority, roster)
    origin = read_origin(directory)
    report = verified_log(
        directory,
        origin,
        trusted_log_keys(trusted, log_key, origin),
        revoked_log_keys(trusted, origin),
    )
    with click.progressbar(
        length=report.size,
        label="reading entries",
        file=sys.stderr,
        show_pos=True,
        hidden=report.size < PROGRESS_FROM,
    ) as bar:
        # Held until the whole log has rebuilt the verified root (nothing may be shown
        # before), but only the lines to show: every parsed entry held took 3.55 GB at
        # 1.22 million entries to print one (a long-life trial).
        lines = [
            _entry_line(entry, as_json)
            for entry in entry_stream(directory, report, bar)
            if not types or entry["type"] in types
        ]
    for line in lines:
        click.echo(line)


def _entry_line(entry: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(entry, separators=(",", ":"))
    rest = "  ".join(f"{k}={shown_value(v)}" for k, v in entry.items() if k not in _NOT_SHOWN)
    return f"{entry['seq']:>7}  {entry['at']}  {entry['type']:<8}  {rest}"


@audit_group.command(name="replay")
@click.argument(
    "directories", metavar="DIR...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@trust_options
@click.option(
    "--policies",
    multiple=True,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of <MEMBER>/policy.toml files (such as nodes/); repeat for older versions.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print JSON for tools instead of tables (every send included, as "exchanges").',
)
@click.option(
    "--timeline",
    "show_timeline",
    is_flag=True,
    help="Also list every send, oldest first, after the findings.",
)
@click.option(
    "--fields",
    "show_fields",
    is_flag=True,
    help="List each send's disclosure keys under it in the timeline (implies --timeline).",
)
def audit_replay(
    directories: tuple[Path, ...],
    keydir: Path | None,
    authority: Path | None,
    roster: Path | None,
    log_key: tuple[str, ...],
    policies: tuple[Path, ...],
    as_json: bool,
    show_timeline: bool,
    show_fields: bool,
) -> None:
    """Reconcile several nodes' logs: who sent what to whom, and every discrepancy.

    Each log is verified first, then every entry is parsed; a log that does not
    verify, or an entry that does not parse, stops the replay with one line
    naming the log and the entry. Printed: the sends counted by status, the
    matrix of delivered sends, refusals, undelivered sends and sends to keys
    revoked since (given the roster), then the findings; --timeline adds every
    send after them. Findings (docs/AUDIT.md):

    \b
    undelivered          a send the partner's log neither received nor rejected by name
    unmatched-receive    a receipt with no send of that JWE in the sender's log
    mismatch             a receipt naming another sender, report, kind, disclosure
                         keys or (format 3) recipient key
    over-disclosure      a key the sender's policy does not release (in that form)
    unknown-policy       the send's policy digest is not among --policies
    unknown-kind         a send of a kind this version does not know (a later one's)
    policy-not-in-force  the send's policy was not in force for that report
    empty-send           a send with no disclosure keys
    policy-chain         a policy entry whose previous digest is not the last one
    older-format         entries of an older format after a newer one (a rollback)
    wrong-member         an entry naming a member other than the log's own
    conflicting-repeat   a repeat of a sent, withheld or received entry that differs
    conflicting-entries  one JWE received and rejected, or sent (received) in two logs
    receipt-by-non-recipient    a receipt of a JWE that was sent to another member
    rejection-by-non-recipient  a rejection of a JWE that was sent to another member
    wrong-recipient-key  a send encrypted to a key that is not the partner's, or before it
                         was valid, or a receipt naming a key not the receiver's
                         (--keys/--roster)
    to-revoked-key       a send encrypted to a key revoked before it, as its entry or
                         its receipt names it (--keys/--roster)

    A withheld envelope (taken back at a start: its key was refused) is not
    undelivered; one a partner received all the same counts as delivered.

    A finding between two logs says one of them is false, not which: the
    recipient's kept envelope decides (msmt inbox evidence, then msmt audit
    evidence with the sender's log).

    \b
    Exit status: 0 no findings; 1 findings, a log or entry that does not
    verify, or a log that cannot be opened or read (why is named); 2 usage
    errors (no key source, a folder that is missing or holds no log file).
    """  # noqa: D301 - click's \b (a backspace) keeps the tables unwrapped
    trusted = trusted_roster(keydir, authority, roster)
    known = _load_policies(policies)
    verified: dict[str, tuple[Path, Report]] = {}
    for directory in directories:
        origin = read_origin(directory)
        if origin in verified:
            raise UsageError(f"two logs of {origin} given")
        report = verified_log(
            directory,
            origin,
            trusted_log_keys(trusted, log_key, origin),
            revoked_log_keys(trusted, origin),
        )
        verified[origin] = (directory, report)
    total = sum(report.size for _, report in verified.values())
    # The bar goes to stderr, so --json output stays clean; short logs need none.
    with click.progressbar(
        length=total,
        label="reading entries",
        file=sys.stderr,
        show_pos=True,
        hidden=total < PROGRESS_FROM,
    ) as bar:
        # Streamed: replay keeps what it needs of each entry, not the logs. Nothing
        # is printed before replay returns, so before every entry read is verified.
        logs = {m: entry_stream(d, report, bar) for m, (d, report) in verified.items()}
        result = replay(logs, known, roster=trusted)
    if as_json:
        write_stdout(itertools.chain(result.json_text(), "\n"), "replay")
    else:
        lines = render_lines(
            result, sorted(logs), timeline=show_timeline or show_fields, show_fields=show_fields
        )
        write_stdout((line + "\n" for line in lines), "replay")
    if result.findings:
        keys = sum(f.kind in KEY_FINDINGS for f in result.findings)
        what = (
            "sends encrypted to keys the roster refuses"
            if keys == len(result.findings)
            else "the logs do not reconcile"
        )
        raise AuditError(f"{len(result.findings)} findings: {what}")
