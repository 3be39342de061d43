"""``msmt audit evidence FILE``: check evidence of a received report (``broker.evidence``).

Its own module, added to the ``audit`` group in ``broker.cli``: it reads no log,
only the file ``msmt inbox evidence`` writes and the signed roster.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from broker import evidence
from broker import keys as keyfiles
from broker.errors import EnvelopeError, InputError, UsageError


@click.command(name="evidence")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
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
def audit_evidence(file: Path, keydir: Path, authority: Path | None, as_json: bool) -> None:
    """Check evidence of a received report: what its originator signed, and for whom.

    Exit 0 if the envelope opens with the key in FILE and the originator's
    signature, disclosures, schema and markings hold; 1 otherwise. The envelope's
    SHA-256 is printed: the sender's `sent` and the recipient's `received` audit
    entries name it.
    """
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read evidence {file}: {exc.strerror or 'unreadable'}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read evidence {file}: not UTF-8 text") from None
    try:
        found = evidence.parse(text)
    except InputError as exc:
        raise InputError(f"evidence {file}: {exc}") from None
    roster = keyfiles.load_signed_roster(keydir, authority_path=authority).roster
    try:
        got = evidence.check(found, roster)
    except EnvelopeError as exc:
        raise InputError(f"evidence {file}: does not verify at {exc}") from None
    markings = f"TLP:{got.tlp}" + (f", REL TO {', '.join(got.rel_to)}" if got.rel_to else "")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "recipient": got.recipient,
                    "sender": got.sender,
                    "originator": got.originator,
                    "report_id": got.report_id,
                    "kind": got.kind,
                    "tlp": got.tlp,
                    "rel_to": None if got.rel_to is None else list(got.rel_to),
                    "issued_at": got.iat.isoformat().replace("+00:00", "Z"),
                    "policy_digest": got.policy_digest,
                    "signing_kid": got.signing_kid,
                    "fields": dict(got.fields),
                    "jwe_sha256": got.jwe_sha256,
                },
                indent=2,
            )
        )
        return
    click.echo(
        f"OK: {got.recipient} received report {got.report_id} ({got.kind}) from {got.sender},"
        f" signed by {got.originator} at {got.iat.isoformat().replace('+00:00', 'Z')}"
        f" under policy {got.policy_digest}, {markings}"
    )
    click.echo(f"fields: {', '.join(got.paths)}")
    click.echo(f"envelope sha256 {got.jwe_sha256} (jwe_sha256 of the sent and received entries)")
