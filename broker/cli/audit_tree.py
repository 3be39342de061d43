"""``msmt audit verify`` and ``prove``: a log's Merkle tree and its checkpoints.

``verify`` recomputes the tree and checks every signed checkpoint, and with
``--cosigned`` the witnesses' cosignatures, ``--known`` checkpoints and
``--witness-state`` files; ``prove`` prints an RFC 6962 inclusion or consistency proof
against a stored checkpoint. Part of the audit family (``broker.cli.audit``).
"""

from __future__ import annotations

import base64
import bisect
import json
import os
from pathlib import Path
from typing import Any

import click

from broker.audit_verify import TamperError, load, read_origin, stored_checkpoint, verify_log
from broker.checkpoint import roster_witness_keys
from broker.cli.audit_base import (
    DIR,
    audit_group,
    read_file,
    revoked_log_keys,
    trust_options,
    trusted_log_keys,
    trusted_roster,
    verifier_keys,
)
from broker.cli.options import Finite, echo_line
from broker.errors import AuditError, UsageError
from broker.members import MEMBERS
from broker.merkle import verify_consistency, verify_inclusion
from broker.note import ALG_COSIGNATURE_V1, Verifier
from broker.roster import Roster
from broker.witness import LogState, WitnessError, load_state


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _read_witness_state(path: Path) -> dict[str, LogState]:
    try:
        return load_state(read_file(path, "witness state").encode("utf-8"))
    except WitnessError as exc:
        raise UsageError(f"{path}: not a witness state: {exc}") from None


def _read_vkey_file(path: Path) -> list[str]:
    lines = read_file(path, "witness keys").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _read_text(path: Path) -> str:
    # A checkpoint note as served (msmt.audit.<M>.checkpoint), or the JSON that
    # ``msmt audit prove`` prints, whose "checkpoint" member is one.
    text = read_file(path, "checkpoint")
    if text.lstrip().startswith("{"):
        try:
            inner = json.loads(text).get("checkpoint")
        except (ValueError, AttributeError, RecursionError):
            inner = None
        if not isinstance(inner, str):
            raise UsageError(f'{path}: JSON without a "checkpoint" note in it')
        return inner
    return text


def _named_member(directory: Path) -> str | None:
    # The member a log directory is named for: DIR itself (data/JPN), or, for a
    # node's audit/ folder, the data directory around it (data/JPN/audit). Only an
    # exact member code counts; any other name says nothing about whose log it is.
    path = Path(os.path.abspath(directory))  # "." and ".." by name; symlinks kept
    names = [path.name, path.parent.name] if path.name == "audit" else [path.name]
    return next((name for name in names if name in MEMBERS), None)


def _witness_keys(witnesses: Path | None, trusted: Roster | None, origin: str) -> list[Verifier]:
    """The witness keys ``--cosigned`` counts: ``--witnesses FILE``, else the roster's."""
    if witnesses is not None:
        keys = verifier_keys(_read_vkey_file(witnesses), str(witnesses))
        if not keys:
            # Else "a quorum of 1 needs at least 1 witness keys" (a bad-input sweep).
            raise UsageError(f"--witnesses {witnesses} holds no verifier key")
        for key in keys:
            # A log key here would match no cosignature line and only show as
            # "0 valid witness cosignatures"; say what is wrong instead.
            if key.alg != ALG_COSIGNATURE_V1:
                raise UsageError(
                    f"{witnesses}: {key.name}'s key has signature type 0x{key.alg:02x}; "
                    "witness keys are cosignature keys, type 0x04 (tlog-cosignature)"
                )
        return keys
    if trusted is not None:
        return roster_witness_keys(trusted, [m for m in MEMBERS if m != origin])
    raise UsageError("--cosigned needs --witnesses FILE or a roster")


@audit_group.command(name="verify")
@DIR
@trust_options
@click.option("--cosigned", is_flag=True, help="Also require witness cosignatures.")
@click.option("--quorum", type=click.IntRange(1, len(MEMBERS)), help="Cosignatures needed.")
@click.option(
    "--witnesses",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File of witness verifier keys, one per line (default: other members in the roster).",
)
@click.option(
    "--wait",
    type=Finite(0, 3600),
    default=0,
    metavar="SECONDS",
    help="With --cosigned: wait up to this long for the latest checkpoint, or a later one,"
    " to reach the quorum (a running node's newest checkpoint waits for its witnesses).",
)
@click.option(
    "--jobs",
    type=click.IntRange(1, 2),
    default=min(2, os.cpu_count() or 1),
    show_default="2 on a multi-core machine",
    help="Processes hashing a log of 200,000 entries or more (1 on a busy machine).",
)
@click.option(
    "--known",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A checkpoint of this log kept from earlier; the log must still contain it (repeat).",
)
@click.option(
    "--witness-state",
    "witness_states",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A partner's witness-state.json; the log must still hold what it cosigned (repeat).",
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
    wait: float,
    jobs: int,
    known: tuple[Path, ...],
    witness_states: tuple[Path, ...],
) -> None:
    """Recompute DIR's Merkle tree and check every checkpoint; exit 1 at the first fault."""
    trusted = trusted_roster(keydir, authority, roster)
    if trusted is None and not log_key:
        raise UsageError("say whose key signs the log: --keys DIR, --roster FILE or --log-key")
    if cosigned != (quorum is not None):
        raise UsageError("--cosigned and --quorum K go together")
    if wait and not cosigned:
        raise UsageError("--wait waits for a quorum: it needs --cosigned --quorum K")
    origin = read_origin(directory)
    log_keys = trusted_log_keys(trusted, log_key, origin)
    witness_keys = _witness_keys(witnesses, trusted, origin) if cosigned else []
    began: list[int] = []

    def waiting(size: int) -> None:
        began.append(size)
        click.echo(
            f"waiting up to {wait:g} s for a quorum of {quorum} on the checkpoint at size {size}"
            " or a later one",
            err=True,
        )

    report = verify_log(
        directory,
        log_keys,
        witnesses=witness_keys,
        quorum=quorum or 0,
        revoked_keys=revoked_log_keys(trusted, origin),
        known=[(str(path), _read_text(path)) for path in known],
        witnessed=[(str(path), _read_witness_state(path)) for path in witness_states],
        jobs=jobs,
        wait=wait,
        on_wait=waiting,
    )
    named = _named_member(directory)
    if named is not None and named != origin:
        # Checked once the log verifies, so a log whose stored origin was edited gets
        # verify's own reason. An OK line naming another member is easy to miss, and a
        # script checking data/JPN by exit status would take USA's log for JPN's.
        raise AuditError(
            f"{directory} is named for {named} but holds {origin}'s audit log "
            "(a swapped or misplaced audit.sqlite?)"
        )
    click.echo(
        f"OK: {report.origin} log of {report.size} entries, {report.checkpoints} signed "
        f"checkpoints, root {_b64(report.root)}"
    )
    if cosigned:
        waited = f", reached at size {report.size} (size {began[0]} when read)" if began else ""
        click.echo(f"cosigned by {', '.join(report.cosigners)} (quorum {quorum}){waited}")
    for path in known:
        echo_line(f"contains the checkpoint in {path}")
    for path in witness_states:
        echo_line(f"holds what the witness state in {path} cosigned")


@audit_group.command(name="prove")
@DIR
@click.option("--entry", "index", type=click.IntRange(0), help="Prove entry N is in the log.")
@click.option(
    "--from-size",
    "old",
    type=click.IntRange(1),
    help="Prove the log extends its first OLD entries (a checkpoint of size OLD kept earlier).",
)
@click.option(
    "--checkpoint",
    "size",
    type=click.IntRange(1),
    help="Prove against the stored checkpoint of this size (default: the latest).",
)
def audit_prove(directory: Path, index: int | None, old: int | None, size: int | None) -> None:
    """Print an RFC 6962 inclusion (--entry) or consistency (--from-size) proof, as JSON.

    Either proof is against a signed checkpoint of the log, and the entries must
    first reproduce that checkpoint: a damaged log gets one line naming the
    damage and exit status 1. The checkpoint's signature is not checked (no key
    is needed); whoever receives the proof checks it with the member's key
    (docs/AUDIT.md), and msmt audit verify checks it for an auditor.
    """
    if (index is None) == (old is None):
        raise UsageError("give one of --entry N (inclusion) or --from-size OLD (consistency)")
    try:
        log = load(directory)
        if not log.checkpoints:
            raise AuditError(f"{directory} has no signed checkpoint yet")
        notes = dict(log.checkpoints)
        if size is None:
            size = max(notes)
        if size not in notes:
            sizes = sorted(notes)
            at = bisect.bisect(sizes, size)
            near = [str(n) for n in sizes[max(at - 1, 0) : at + 1]]
            raise UsageError(
                f"no stored checkpoint of size {size}: the nearest"
                f" {'are' if len(near) > 1 else 'is'} {' and '.join(near)}"
                f" ({len(sizes)} checkpoints, sizes {sizes[0]} to {sizes[-1]})"
            )
        if index is not None and index >= size:
            raise UsageError(f"entry {index} is not in the checkpoint of size {size}")
        if old is not None and old > size:
            raise UsageError(f"--from-size {old} is past the checkpoint of size {size}")
        checkpoint, note = stored_checkpoint(log, size)
    except TamperError as exc:
        # Proving from a damaged log would fail later with a misleading reason (or a
        # traceback); say what is damaged and where the whole damage can be seen.
        raise AuditError(
            f"no proof: the log in {directory} is damaged: {exc}; "
            f"check it with msmt audit verify {directory}"
        ) from None
    proof: dict[str, Any] = {"origin": log.origin}
    if index is not None:
        leaf = log.tree.leaf(index)
        path = log.tree.inclusion_proof(index, size)
        # Self-check before publishing: a proof that fails here would only mislead.
        verify_inclusion(leaf, index, size, path, checkpoint.root)
        proof |= {
            "leaf_index": index,
            "tree_size": size,
            "entry": _b64(log.entries(index, index + 1)[0]),
            "leaf_hash": _b64(leaf),
            "inclusion_path": [_b64(h) for h in path],
        }
    elif old is not None:
        old_root = log.tree.root(old)
        path = log.tree.consistency_proof(old, size)
        verify_consistency(old, size, old_root, checkpoint.root, path)
        # The old root is ours to state, not to be trusted: the holder compares it
        # with the root line of the checkpoint of that size it kept.
        proof |= {
            "old_size": old,
            "old_root_hash": _b64(old_root),
            "tree_size": size,
            "consistency_path": [_b64(h) for h in path],
        }
    proof |= {"root_hash": _b64(checkpoint.root), "checkpoint": note}
    click.echo(json.dumps(proof, indent=2, ensure_ascii=False))
