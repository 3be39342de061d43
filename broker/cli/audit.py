"""Commands for the audit family: ``msmt audit verify``, ``prove`` and ``replay``.

All read a node's data directory directly (``DIR/audit.sqlite``, opened
read-only). Trust never comes from the directory being audited: the log's
public key comes from a signed roster (``--keys``), a JWK Set the auditor
trusts (``--roster``), or note verifier keys (``--log-key``).
"""

from __future__ import annotations

import base64
import bisect
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import click

from broker import evidence
from broker import keys as keyfiles
from broker.audit_events import TYPES
from broker.audit_replay import Exchange, Finding, Replay, iter_verified_entries, replay
from broker.audit_verify import (
    Report,
    TamperError,
    load,
    log_dir,
    read_entries,
    read_origin,
    stored_checkpoint,
    verify_log,
)
from broker.auditlog import DB_FILE
from broker.checkpoint import (
    roster_log_keys,
    roster_revoked_log_keys,
    roster_witness_keys,
)
from broker.cli.options import Finite, echo_line, write_stdout
from broker.envelope import Received
from broker.errors import (
    AuditError,
    EnvelopeError,
    InputError,
    KeyMaterialError,
    MsmtError,
    UsageError,
)
from broker.files import read_file_bytes, read_file_text
from broker.members import MEMBERS
from broker.merkle import verify_consistency, verify_inclusion
from broker.note import ALG_COSIGNATURE_V1, NoteError, Verifier, parse_vkey
from broker.policy import Policy, load_policy
from broker.roster import Roster
from broker.witness import LogState, WitnessError, load_state


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _roster(keydir: Path | None, authority: Path | None, roster: Path | None) -> Roster | None:
    if keydir is not None and roster is not None:
        raise UsageError("give either --keys or --roster, not both")
    if keydir is not None:
        return keyfiles.load_signed_roster(
            keydir, authority_path=authority, authority_option="--authority"
        ).roster
    if roster is not None:
        data = keyfiles.read_json(roster)  # its refusals name the file
        try:
            return Roster.from_jwks(data)
        except KeyMaterialError as exc:
            # "roster is not a JWK Set" named no file (a bad-input sweep).
            raise KeyMaterialError(f"--roster {roster}: {exc}") from None
    return None


def _vkeys(texts: tuple[str, ...] | list[str], what: str) -> list[Verifier]:
    try:
        return [parse_vkey(t) for t in texts]
    except NoteError as exc:
        raise UsageError(f"{what}: {exc}") from None


def _read_file(path: Path, what: str) -> str:
    # One line naming the file: the OS's reason, not Python's "[Errno 2] ...: 'path'",
    # and no codec text (its byte offsets say nothing an operator can use).
    try:
        return read_file_text(path)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or 'unreadable'}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {what} {path}: not UTF-8 text") from None


def _read_witness_state(path: Path) -> dict[str, LogState]:
    try:
        return load_state(_read_file(path, "witness state").encode("utf-8"))
    except WitnessError as exc:
        raise UsageError(f"{path}: not a witness state: {exc}") from None


def _read_vkey_file(path: Path) -> list[str]:
    lines = _read_file(path, "witness keys").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _read_text(path: Path) -> str:
    # A checkpoint note as served (msmt.audit.<M>.checkpoint), or the JSON that
    # ``msmt audit prove`` prints, whose "checkpoint" member is one.
    text = _read_file(path, "checkpoint")
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


def _revoked_keys(trusted: Roster | None, origin: str) -> list[Verifier]:
    # Only a roster says which keys were revoked; --log-key keys are trusted as given.
    return [] if trusted is None else roster_revoked_log_keys(trusted, origin)


def _witness_keys(witnesses: Path | None, trusted: Roster | None, origin: str) -> list[Verifier]:
    """The witness keys ``--cosigned`` counts: ``--witnesses FILE``, else the roster's."""
    if witnesses is not None:
        keys = _vkeys(_read_vkey_file(witnesses), str(witnesses))
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
@_DIR
@_trust_options
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
    trusted = _roster(keydir, authority, roster)
    if trusted is None and not log_key:
        raise UsageError("say whose key signs the log: --keys DIR, --roster FILE or --log-key")
    if cosigned != (quorum is not None):
        raise UsageError("--cosigned and --quorum K go together")
    if wait and not cosigned:
        raise UsageError("--wait waits for a quorum: it needs --cosigned --quorum K")
    origin = read_origin(directory)
    log_keys = _log_keys(trusted, log_key, origin)
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
        revoked_keys=_revoked_keys(trusted, origin),
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
@_DIR
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


PROGRESS_FROM = 50_000
"""Replays reading at least this many entries show a progress bar."""


def _load_policies(folders: tuple[Path, ...]) -> dict[str, Policy]:
    policies: dict[str, Policy] = {}
    for folder in folders:
        files = sorted(folder.glob("*/policy.toml"))
        if not files:
            raise UsageError(f"--policies {folder}: no <MEMBER>/policy.toml inside")
        for path in files:
            text = _read_file(path, "policy")
            policy = load_policy(text, member=path.parent.name, source=str(path))
            policies[policy.digest] = policy
    return policies


def _entry_stream(directory: Path, report: Report, bar: Any) -> Iterator[dict[str, Any]]:
    """The entries of the log ``report`` verified, parsed one by one, read in chunks.

    Unverified until exhausted (``iter_verified_entries``): nothing may be shown before.
    """
    path = log_dir(directory) / DB_FILE

    def chunks() -> Iterator[bytes]:
        step = 10_000
        for lo in range(0, report.size, step):
            batch = read_entries(path, lo, min(lo + step, report.size))
            yield from batch
            bar.update(len(batch))

    try:
        # Exactly the bytes verify_log hashed: the file may have changed since.
        yield from iter_verified_entries(chunks(), report.size, report.root)
    except AuditError as exc:
        # Several logs are read: the line must say whose log it is.
        raise AuditError(f"{report.origin} log {path}: {exc}") from None


def _verified(
    directory: Path, origin: str, keys: list[Verifier], revoked: list[Verifier]
) -> Report:
    # verify's own lines name an entry but not the log; replay reads several.
    try:
        return verify_log(directory, keys, revoked_keys=revoked)
    except MsmtError as exc:
        error = UsageError if exc.exit_code == UsageError.exit_code else AuditError
        raise error(f"{origin} log {directory}: {exc}") from None


_NOT_SHOWN: frozenset[str] = frozenset({"v", "seq", "prev", "at", "type", "member"})


def _shown(value: object) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):  # a bulk refusal's steps: step:count,...
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


@audit_group.command(name="entries")
@_DIR
@_trust_options
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
    trusted = _roster(keydir, authority, roster)
    origin = read_origin(directory)
    report = _verified(
        directory, origin, _log_keys(trusted, log_key, origin), _revoked_keys(trusted, origin)
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
            for entry in _entry_stream(directory, report, bar)
            if not types or entry["type"] in types
        ]
    for line in lines:
        click.echo(line)


def _entry_line(entry: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(entry, separators=(",", ":"))
    rest = "  ".join(f"{k}={_shown(v)}" for k, v in entry.items() if k not in _NOT_SHOWN)
    return f"{entry['seq']:>7}  {entry['at']}  {entry['type']:<8}  {rest}"


@audit_group.command(name="replay")
@click.argument(
    "directories", metavar="DIR...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@_trust_options
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
    matrix of delivered sends, refusals and undelivered sends, then the
    findings; --timeline adds every send after them. Findings (docs/AUDIT.md):

    \b
    undelivered          a send the partner's log neither received nor rejected by name
    unmatched-receive    a receipt with no send of that JWE in the sender's log
    mismatch             a receipt naming another sender, report, kind or keys
    over-disclosure      a key the sender's policy does not release (in that form)
    unknown-policy       the send's policy digest is not among --policies
    unknown-kind         a send of a kind this version does not know (a later one's)
    policy-not-in-force  the send's policy was not in force for that report
    empty-send           a send with no disclosure keys
    policy-chain         a policy entry whose previous digest is not the last one
    wrong-member         an entry naming a member other than the log's own
    conflicting-repeat   a repeat of a sent or received entry that differs from it
    conflicting-entries  one JWE received and rejected, or sent (received) in two logs
    receipt-by-non-recipient    a receipt of a JWE that was sent to another member
    rejection-by-non-recipient  a rejection of a JWE that was sent to another member

    A finding between two logs says one of them is false, not which: the
    recipient's kept envelope decides (msmt inbox evidence, then msmt audit
    evidence with the sender's log).

    \b
    Exit status: 0 no findings; 1 findings, or a log or entry that does not
    verify; 2 usage errors (missing key source, unreadable folders).
    """  # noqa: D301 - click's \b (a backspace) keeps the tables unwrapped
    trusted = _roster(keydir, authority, roster)
    known = _load_policies(policies)
    verified: dict[str, tuple[Path, Report]] = {}
    for directory in directories:
        origin = read_origin(directory)
        if origin in verified:
            raise UsageError(f"two logs of {origin} given")
        report = _verified(
            directory, origin, _log_keys(trusted, log_key, origin), _revoked_keys(trusted, origin)
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
        logs = {m: _entry_stream(d, report, bar) for m, (d, report) in verified.items()}
        result = replay(logs, known)
    if as_json:
        write_stdout(itertools.chain(result.json_text(), "\n"), "replay")
    else:
        lines = render_lines(
            result, sorted(logs), timeline=show_timeline or show_fields, show_fields=show_fields
        )
        write_stdout((line + "\n" for line in lines), "replay")
    if result.findings:
        raise AuditError(f"{len(result.findings)} findings: the logs do not reconcile")


def status_line(result: Replay, logs: int) -> str:
    """One line: how many sends, in how many logs, ended in each status."""
    counts = sorted(result.statuses().items())
    return f"{len(result.exchanges)} sends in {logs} logs: " + (
        ", ".join(f"{n} {status}" for status, n in counts) or "none"
    )


def render_tables(
    result: Replay, members: list[str], *, timeline: bool = True, show_fields: bool = False
) -> str:
    """The human report as one string: ``render_lines``, the timeline included by default."""
    return "\n".join(render_lines(result, members, timeline=timeline, show_fields=show_fields))


def render_lines(
    result: Replay, members: list[str], *, timeline: bool, show_fields: bool = False
) -> Iterator[str]:
    """The human report, line by line: sends by status, matrix, findings, then the timeline.

    The findings come before the timeline, which a year of logs makes millions of
    lines long. ``show_fields`` lists under each send of the timeline the
    disclosure keys it released (field paths and forms, never values): who got
    which fields.
    """
    yield from _summary_lines(result, members)
    if not timeline:
        return
    yield ""
    yield f"Timeline ({len(result.exchanges)} sends; policy: the first 12 hex of its digest)"
    for e in result.exchanges:
        yield (
            f"  {e.at}  {e.sender} -> {e.recipient}  {e.kind:<8} {e.report_id}  "
            f"{e.tlp:<12} {len(e.released):>2} fields  policy {e.policy_digest[:12]}  {e.status}"
            + ("" if e.refused_at is None else f" ({e.refused_at})")
        )
        if show_fields:
            yield f"      {', '.join(e.released) or '(none)'}"


def _summary_lines(result: Replay, members: list[str]) -> list[str]:
    lines = [status_line(result, len(members))]
    senders = sorted({s for s, _ in result.matrix} | set(members))
    recipients = sorted({r for _, r in result.matrix} | set(members))
    lines += ["", "Delivered sends (rows: sender, columns: recipient)"]
    lines.append("       " + " ".join(f"{r:>5}" for r in recipients))
    for s in senders:
        cells = ("    -" if s == r else f"{result.matrix.get((s, r), 0):>5}" for r in recipients)
        lines.append(f"  {s}  " + " ".join(cells))
    lines += _bulk_lines(result)
    # Not findings: both logs agree, but the recipient does not hold these reports.
    lines += _exchange_lines(
        "Refused at every send ({n}; msmt node resend --report sends again)",
        result.never_delivered(),
        lambda e: str(e.refused_at),
    )
    # The findings name entries; a sender resends by report id.
    lines += _exchange_lines(
        "Sends the partner never logged ({n}; findings below; if the hub lost them,"
        " msmt node resend --report sends them again)",
        result.unlogged(),
        lambda e: f"(entry {e.seq})",
    )
    # Not findings either: the hub lost these sends, but a later send of the same
    # report reached the partner.
    lines += _exchange_lines(
        "Lost on the way, then delivered by a later send ({n})",
        result.recovered(),
        lambda e: f"(entry {e.seq})",
    )
    # Nor these: a resend of reports the partner held, refused as replays in bulk.
    lines += _exchange_lines(
        "Sent again to a partner that held the report, among its bulk replay refusals ({n})",
        result.resent(),
        lambda e: f"(entry {e.seq})",
    )
    lines += ["", f"Findings ({len(result.findings)})"]
    lines += _finding_lines(result.findings)
    if any(f.kind in DECIDED_BY_EVIDENCE for f in result.findings):
        # Pinned to the entry without its counterpart, which is not always the false one.
        lines.append(
            "  (a finding between two logs says that one of them is false, not which: the"
            " recipient's kept envelope decides, with msmt inbox evidence at the recipient"
            " and msmt audit evidence --log SENDER_DIR --log RECIPIENT_DIR; docs/AUDIT.md)"
        )
    if not result.findings:
        lines.append("  none: every send and receive reconciles with the policies")
    sends, receipts = result.statuses()["not-checked"], result.unchecked_receipts
    if sends or receipts:
        # "none" is only as wide as the logs given: say what they could not check.
        lines.append(
            f"  not checked: {_count(sends, 'send')} and {_count(receipts, 'receipt')}"
            " whose other side's log was not given"
        )
    return lines


def _bulk_lines(result: Replay) -> list[str]:
    """Refusals a recipient counted without naming them (``rejected_many``), per source."""
    if not result.bulk_refusals:
        return []
    # The source is the subject's sender, which the hub vouches for, not a signature:
    # a hostile hub can put junk in an inbox under any member's name.
    lines = [
        "",
        "Refused in bulk, counted without naming the messages"
        " (source as the hub named it -> recipient)",
    ]
    for (source, recipient), bulk in sorted(result.bulk_refusals.items()):
        entries = "1 entry" if bulk.entries == 1 else f"{bulk.entries} entries"
        lines.append(
            f"  {source} -> {recipient}  {bulk.count} refusals ({bulk.describe()}) in {entries}"
        )
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


SHOWN_ENTRIES = 5
SHOWN_LOST = 20


def _exchange_lines(
    heading: str, exchanges: Sequence[Exchange], last: Callable[[Exchange], str]
) -> list[str]:
    """A titled list of sends (none if empty), the first ``SHOWN_LOST`` of them."""
    if not exchanges:
        return []
    lines = ["", heading.format(n=len(exchanges))]
    lines += [
        f"  {e.sender} -> {e.recipient}  {e.report_id}  {last(e)}" for e in exchanges[:SHOWN_LOST]
    ]
    if len(exchanges) > SHOWN_LOST:
        lines.append(f"  ... and {len(exchanges) - SHOWN_LOST} more (--json lists all)")
    return lines


DECIDED_BY_EVIDENCE: Final = frozenset(
    {"mismatch", "unmatched-receive", "receipt-by-non-recipient"}
)
"""Findings on a receipt, which the recipient's kept envelope of that report can settle."""


def _finding_lines(findings: Sequence[Finding]) -> list[str]:
    """One line per distinct finding, a repeated one naming its first entries and count.

    A policy left out of ``--policies`` is one finding per send under it: thousands
    of identical lines would hide every other finding.
    """
    groups: dict[tuple[str, str, str], list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.kind, f.member, f.detail), []).append(f)
    lines = []
    for (kind, member, detail), group in groups.items():
        seqs = [f.seq for f in group]
        if len(group) == 1:
            # The report id is what msmt inbox evidence asks for.
            rid = group[0].report_id if kind in DECIDED_BY_EVIDENCE else None
            about = f" (report {rid})" if rid else ""
            lines.append(f"  {kind}: {member} entry {seqs[0]}{about}: {detail}")
            continue
        shown = ", ".join(str(seq) for seq in seqs[:SHOWN_ENTRIES])
        more = ", ..." if len(seqs) > SHOWN_ENTRIES else ""
        lines.append(f"  {kind}: {member} entries {shown}{more} ({len(seqs)} in all): {detail}")
    return lines


COMMANDS: tuple[click.Command, ...] = (audit_group,)


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
            parts.append(f"{name}: the entry {_shown(logged)}, the envelope {_shown(actual)}")
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
            report = _verified(
                directory, origin, _log_keys(trusted, (), origin), _revoked_keys(trusted, origin)
            )
            # Only this envelope's entries are kept: they are all step 7 reads.
            entries[origin] = [
                e
                for e in _entry_stream(directory, report, bar)
                if e.get("jwe_sha256") == found.jwe_sha256
            ]
    if found.sender not in entries:
        raise UsageError(f"give the sender's log ({found.sender}) with --log")
    sends = [
        e
        for e in entries[found.sender]
        if e["type"] == "sent" and e["jwe_sha256"] == found.jwe_sha256
    ]
    if not sends:
        raise InputError(
            f"step 7: {found.sender}'s log holds no send of this envelope"
            f" (sha256 {found.jwe_sha256})"
            f" to {found.recipient}: the file's recipient is not vouched for"
        )
    as_sent = _sent_form(got)
    sent = [e["seq"] for e in sends if not _misstated(e, as_sent)]
    if not sent:
        # Only the sender made these bytes (its entry holds their hash), and they open
        # as the envelope says: so the entry, not the recipient's file, is false.
        first = sends[0]
        raise InputError(
            f"step 7: {found.sender}'s log entry {first['seq']} records this envelope"
            f" (sha256 {found.jwe_sha256}) otherwise than the envelope holds"
            f" ({'; '.join(_misstated(first, as_sent))}): the entry names these very bytes,"
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
        as_received = {"report_id": got.report_id, "kind": got.kind, "fields": sorted(got.paths)}
        matching = [e["seq"] for e in receipts if not _misstated(e, as_received)]
        if not matching:
            raise InputError(
                f"step 7: {found.recipient}'s log entry {receipts[0]['seq']} records its"
                " receipt of this envelope otherwise than the envelope holds"
                f" ({'; '.join(_misstated(receipts[0], as_received))}):"
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
    signed = keyfiles.load_signed_roster(
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
