"""``msmt audit evidence``: a received report's evidence checked against the senders' logs.

The evidence (``msmt inbox evidence``) must open and verify as the envelope it holds,
and the sender's verified log must record sending exactly these bytes, as they are, to
the recipient the file names; the recipient's log, if given, its receipt. Part of the
audit family (``broker.cli.audit``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from broker import evidence, keys_roster
from broker.audit_verify import read_origin
from broker.cli.audit_base import (
    audit_group,
    entry_stream,
    revoked_log_keys,
    shown_value,
    trusted_log_keys,
    verified_log,
)
from broker.envelope import Received
from broker.envelope_format import recipient_kid
from broker.errors import EnvelopeError, InputError, UsageError
from broker.files import read_file_bytes
from broker.roster import Roster


def _printable(text: str, limit: int = 80) -> str:
    # A signed claim is the originator's text, not ours: never a control character
    # on the auditor's terminal.
    return text if text.isprintable() and len(text) <= limit else ascii(text[:limit])


def _misstated(entry: Mapping[str, Any], envelope: Mapping[str, Any]) -> list[str]:
    """How a log entry of this very envelope records it otherwise than the envelope holds.

    The entry names the envelope by its hash, so the envelope's authenticated header
    and signed claims are what was sent: any difference is the log's. Each part names
    the member and both sides; they are identifiers and disclosure keys, never values.
    """
    parts = []
    for name, actual in envelope.items():
        logged = entry.get(name)
        if logged == actual:
            continue
        if isinstance(actual, list) and isinstance(logged, list):
            left_out = [k for k in actual if k not in logged]
            added = [k for k in logged if k not in actual]
            said = [f"leaves out {', '.join(left_out)}"] if left_out else []
            said += [f"adds {', '.join(added)}"] if added else []
            parts.append(f"{name}: the entry {' and '.join(said)}")
        else:
            parts.append(
                f"{name}: the entry {shown_value(logged)}, the envelope {shown_value(actual)}"
            )
    return parts


def _sent_form(got: Received) -> dict[str, Any]:
    """What a ``sent`` entry of this envelope records, as the envelope itself has it."""
    return {
        "partner": got.recipient,
        "report_id": got.report_id,
        "kind": got.kind,
        "originator": got.originator,
        "tlp": got.tlp,
        "rel_to": None if got.rel_to is None else sorted(got.rel_to),
        "released": sorted(got.paths),
        "policy_digest": got.policy_digest,
    }


def _logged(
    directories: tuple[Path, ...], trusted: Roster, found: evidence.Evidence, got: Received
) -> tuple[int, int | None]:
    """Find the envelope in the sender's (and recipient's, if given) verified logs."""
    entries: dict[str, list[dict[str, Any]]] = {}
    with click.progressbar(length=0, file=sys.stderr, hidden=True) as bar:
        for directory in directories:
            origin = read_origin(directory)
            report = verified_log(
                directory,
                origin,
                trusted_log_keys(trusted, (), origin),
                revoked_log_keys(trusted, origin),
            )
            # Only this envelope's entries are kept: they are all step 7 reads.
            entries[origin] = [
                e
                for e in entry_stream(directory, report, bar)
                if e.get("jwe_sha256") == found.jwe_sha256
            ]
    if found.sender not in entries:
        raise UsageError(f"give the sender's log ({found.sender}) with --log")
    # A withheld entry records a send too: an envelope taken back at a start, which
    # had reached the hub before (its ack lost in a crash).
    sends = [
        e
        for e in entries[found.sender]
        if e["type"] in ("sent", "withheld") and e["jwe_sha256"] == found.jwe_sha256
    ]
    if not sends:
        raise InputError(
            f"step 7: {found.sender}'s log holds no send of this envelope"
            f" (sha256 {found.jwe_sha256})"
            f" to {found.recipient}: the file's recipient is not vouched for"
        )
    as_sent = _sent_form(got)
    as_received = {"report_id": got.report_id, "kind": got.kind, "fields": sorted(got.paths)}
    kid = {"recipient_kid": recipient_kid(found.jwe.partition(".")[0])}

    def form(entry: Mapping[str, Any]) -> dict[str, Any]:
        # The key it went to, as its header names it: recorded from format 2 on.
        return as_sent | kid if "recipient_kid" in entry else as_sent

    def received_form(entry: Mapping[str, Any]) -> dict[str, Any]:
        # The key that opened it, the one its header names: recorded from format 3 on.
        return as_received | kid if "recipient_kid" in entry else as_received

    sent = [e["seq"] for e in sends if not _misstated(e, form(e))]
    if not sent:
        # Only the sender made these bytes (its entry holds their hash), and they open
        # as the envelope says: so the entry, not the recipient's file, is false.
        first = sends[0]
        raise InputError(
            f"step 7: {found.sender}'s log entry {first['seq']} records this envelope"
            f" (sha256 {found.jwe_sha256}) otherwise than the envelope holds"
            f" ({'; '.join(_misstated(first, form(first)))}): the entry names these very bytes,"
            f" so {found.sender}'s log misstates this send"
        )
    received = None
    if found.recipient in entries:
        receipts = [
            e
            for e in entries[found.recipient]
            if e["type"] == "received"
            and e["jwe_sha256"] == found.jwe_sha256
            and e["sender"] == found.sender
        ]
        if not receipts:
            raise InputError(f"step 7: {found.recipient}'s log holds no receipt of this envelope")
        matching = [e["seq"] for e in receipts if not _misstated(e, received_form(e))]
        if not matching:
            raise InputError(
                f"step 7: {found.recipient}'s log entry {receipts[0]['seq']} records its"
                " receipt of this envelope otherwise than the envelope holds"
                f" ({'; '.join(_misstated(receipts[0], received_form(receipts[0])))}):"
                f" {found.recipient}'s log misstates this receipt"
            )
        received = matching[0]
    return sent[0], received


@audit_group.command(name="evidence")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--log",
    "log_dirs",
    multiple=True,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The sender's audit log directory (required); the recipient's too, if you have it.",
)
@click.option(
    "--keys",
    "keydir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder with the signed roster (roster.json, roster.json.jws).",
)
@click.option(
    "--authority",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The roster authority's public key to pin (default: the one in --keys).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was signed, values included.")
def audit_evidence(
    file: Path, log_dirs: tuple[Path, ...], keydir: Path, authority: Path | None, as_json: bool
) -> None:
    """Check evidence of a received report (msmt inbox evidence) against the sender's log.

    Exit 0 only if the envelope opens with the key in FILE, the originator's
    signature, disclosures, schema and markings hold, and the sender's verified
    log records sending exactly this envelope to the recipient the file names,
    with its report, markings, policy and disclosure keys (the recipient's log, if
    given with a second --log, its receipt); 1 otherwise, naming a log entry
    that misstates the envelope; 2 for a usage error (an unreadable file, no
    --log of the sender).
    """
    try:
        raw = read_file_bytes(file, evidence.MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read evidence {file}: {exc.strerror or 'unreadable'}") from None
    try:
        found = evidence.parse(raw)
    except InputError as exc:
        raise InputError(f"evidence {file}: {exc}") from None
    signed = keys_roster.load_signed_roster(
        keydir, authority_path=authority, authority_option="--authority"
    )
    try:
        got = evidence.check(found, signed.roster)
    except EnvelopeError as exc:
        raise InputError(f"evidence {file}: does not verify at {exc}") from None
    try:
        sent, received = _logged(log_dirs, signed.roster, found, got)
    except InputError as exc:
        raise InputError(f"evidence {file}: {exc}") from None
    issued = got.iat.isoformat().replace("+00:00", "Z")
    if as_json:
        out = {
            "recipient": got.recipient,
            "sender": got.sender,
            "originator": got.originator,
            "report_id": got.report_id,
            "kind": got.kind,
            "tlp": got.tlp,
            "rel_to": None if got.rel_to is None else list(got.rel_to),
            "issued_at": issued,
            "policy_digest": got.policy_digest,
            "signing_kid": got.signing_kid,
            "fields": dict(got.fields),
            "jwe_sha256": got.jwe_sha256,
            "roster_version": signed.version,
            "sent_entry": sent,
            "received_entry": received,
        }
        click.echo(json.dumps(out, indent=2))
        return
    markings = f"TLP:{got.tlp}" + (f", REL TO {', '.join(got.rel_to)}" if got.rel_to else "")
    click.echo(
        f"OK: {got.recipient} received report {got.report_id} ({got.kind}) from {got.sender},"
        f" signed by {got.originator} at {issued} under policy"
        f" {_printable(got.policy_digest)}, {markings}"
    )
    click.echo(f"fields: {', '.join(got.paths)}")
    receipt = "" if received is None else f", {got.recipient}'s log entry {received} its receipt"
    click.echo(
        f"envelope sha256 {got.jwe_sha256}: {got.sender}'s log entry {sent} is its send{receipt}"
        f" (roster version {signed.version})"
    )
