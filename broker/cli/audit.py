"""Commands for the audit family: ``msmt audit verify`` and ``msmt audit prove``.

Both read a node's data directory directly (``DIR/audit.sqlite``, opened
read-only). Trust never comes from the directory being audited: the log's
public key comes from a signed roster (``--keys``), a JWK Set the auditor
trusts (``--roster``), or note verifier keys (``--log-key``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import click

from broker import keys as keyfiles
from broker.audit_verify import load, read_origin, verify_log
from broker.checkpoint import parse_body, roster_log_keys, roster_witness_keys
from broker.errors import AuditError, UsageError
from broker.members import MEMBERS
from broker.merkle import verify_inclusion
from broker.note import NoteError, Verifier, parse, parse_vkey
from broker.roster import Roster


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _roster(keydir: Path | None, authority: Path | None, roster: Path | None) -> Roster | None:
    if keydir is not None and roster is not None:
        raise UsageError("give either --keys or --roster, not both")
    if keydir is not None:
        return keyfiles.load_signed_roster(keydir, authority_path=authority).roster
    if roster is not None:
        return Roster.from_jwks(keyfiles.read_json(roster))
    return None


def _vkeys(texts: tuple[str, ...] | list[str], what: str) -> list[Verifier]:
    try:
        return [parse_vkey(t) for t in texts]
    except NoteError as exc:
        raise UsageError(f"{what}: {exc}") from None


def _read_vkey_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read witness keys {path}: {exc}") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


_DIR = click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))


@click.group(name="audit")
def audit_group() -> None:
    """Verify audit logs and prove entries to third parties."""


def _trust_options(fn: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option(
            "--keys",
            "keydir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Key directory with the signed roster (verified against its pinned authority).",
        ),
        click.option(
            "--authority",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Pinned roster-authority public JWK (default: the one in --keys).",
        ),
        click.option(
            "--roster",
            type=click.Path(dir_okay=False, path_type=Path),
            help="A roster JWK Set you already trust (unsigned).",
        ),
        click.option("--log-key", multiple=True, help="Log verifier key <name>+<hex id>+<base64>."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _log_keys(trusted: Roster | None, log_key: tuple[str, ...], origin: str) -> list[Verifier]:
    if trusted is None and not log_key:
        raise UsageError("say whose key signs the log: --keys DIR, --roster FILE or --log-key")
    keys = _vkeys(log_key, "--log-key")
    if trusted is not None:
        keys += roster_log_keys(trusted, origin)
    return keys


@audit_group.command(name="verify")
@_DIR
@_trust_options
@click.option("--cosigned", is_flag=True, help="Also require witness cosignatures.")
@click.option("--quorum", type=click.IntRange(1, len(MEMBERS)), help="Cosignatures needed.")
@click.option(
    "--witnesses",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File of witness verifier keys, one per line (default: other members in the roster).",
)
def audit_verify(
    directory: Path,
    keydir: Path | None,
    authority: Path | None,
    roster: Path | None,
    log_key: tuple[str, ...],
    cosigned: bool,
    quorum: int | None,
    witnesses: Path | None,
) -> None:
    """Recompute DIR's Merkle tree and check every checkpoint; exit 1 at the first fault."""
    trusted = _roster(keydir, authority, roster)
    if trusted is None and not log_key:
        raise UsageError("say whose key signs the log: --keys DIR, --roster FILE or --log-key")
    if cosigned != (quorum is not None):
        raise UsageError("--cosigned and --quorum K go together")
    origin = read_origin(directory)
    log_keys = _log_keys(trusted, log_key, origin)
    witness_keys: list[Verifier] = []
    if cosigned:
        if witnesses is not None:
            witness_keys = _vkeys(_read_vkey_file(witnesses), str(witnesses))
        elif trusted is not None:
            witness_keys = roster_witness_keys(trusted, [m for m in MEMBERS if m != origin])
        else:
            raise UsageError("--cosigned needs --witnesses FILE or a roster")
    report = verify_log(directory, log_keys, witnesses=witness_keys, quorum=quorum or 0)
    click.echo(
        f"OK: {report.origin} log of {report.size} entries, {report.checkpoints} signed "
        f"checkpoints, root {_b64(report.root)}"
    )
    if cosigned:
        click.echo(f"cosigned by {', '.join(report.cosigners)} (quorum {quorum})")


@audit_group.command(name="prove")
@_DIR
@click.option("--entry", "index", type=click.IntRange(0), required=True, help="Entry index.")
@click.option(
    "--checkpoint",
    "size",
    type=click.IntRange(1),
    help="Prove against the stored checkpoint of this size (default: the latest).",
)
def audit_prove(directory: Path, index: int, size: int | None) -> None:
    """Print an RFC 6962 inclusion proof of entry N against a signed checkpoint, as JSON."""
    log = load(directory)
    if not log.checkpoints:
        raise AuditError(f"{directory} has no signed checkpoint yet")
    notes = dict(log.checkpoints)
    if size is None:
        size = max(notes)
    if size not in notes:
        raise UsageError(f"no stored checkpoint of size {size} (have {sorted(notes)[-5:]}...)")
    if index >= size:
        raise UsageError(f"entry {index} is not in the checkpoint of size {size}")
    note = notes[size]
    checkpoint = parse_body(parse(note).text)
    leaf = log.tree.levels[0][index]
    path = log.tree.inclusion_proof(index, size)
    # Self-check before publishing: a proof that fails here would only mislead.
    verify_inclusion(leaf, index, size, path, checkpoint.root)
    proof = {
        "origin": log.origin,
        "leaf_index": index,
        "tree_size": size,
        "entry": _b64(log.entries(index, index + 1)[0]),
        "leaf_hash": _b64(leaf),
        "inclusion_path": [_b64(h) for h in path],
        "root_hash": _b64(checkpoint.root),
        "checkpoint": note,
    }
    click.echo(json.dumps(proof, indent=2, ensure_ascii=False))


COMMANDS: tuple[click.Command, ...] = (audit_group,)
