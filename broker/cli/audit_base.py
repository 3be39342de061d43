"""What every ``msmt audit`` command shares: the group, and the logs and keys it trusts.

The group itself, the ``DIR`` argument, the options that say whose key signs a log
(``--keys``, ``--authority``, ``--roster``, ``--log-key``) and the keys they give,
files read with one line when they cannot be, and a log verified, then streamed entry
by entry as verified. Apart so that each part of the family stays one sitting's read:
``broker.cli.audit_tree`` (verify, prove), ``broker.cli.audit_logs`` (entries,
replay) and ``broker.cli.audit_envelope`` (evidence); ``broker.cli.audit`` joins them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from broker import keys as keyfiles
from broker import keys_roster
from broker.audit_replay import iter_verified_entries
from broker.audit_verify import Report, log_dir, read_entries, verify_log
from broker.auditlog import DB_FILE
from broker.checkpoint import roster_log_keys, roster_revoked_log_keys
from broker.errors import AuditError, KeyMaterialError, MsmtError, UsageError
from broker.files import read_file_text
from broker.note import NoteError, Verifier, parse_vkey
from broker.roster import Roster

DIR = click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
"""``DIR``: the data directory of the node whose log a command reads (or its ``audit/``)."""


@click.group(name="audit")
def audit_group() -> None:
    """Verify audit logs and prove entries to third parties."""


def trust_options(fn: Callable[..., None]) -> Callable[..., None]:
    """Add the options that say whose key signs a log (``--keys``, ``--roster``, ``--log-key``)."""
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


def trusted_roster(
    keydir: Path | None, authority: Path | None, roster: Path | None
) -> Roster | None:
    """The roster the auditor trusts: ``--keys``' signed one, a ``--roster`` JWK Set, or none."""
    if keydir is not None and roster is not None:
        raise UsageError("give either --keys or --roster, not both")
    if keydir is not None:
        return keys_roster.load_signed_roster(
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


def verifier_keys(texts: tuple[str, ...] | list[str], what: str) -> list[Verifier]:
    """Note verifier keys parsed from ``texts``; ``UsageError`` naming ``what`` if one is not."""
    try:
        return [parse_vkey(t) for t in texts]
    except NoteError as exc:
        raise UsageError(f"{what}: {exc}") from None


def read_file(path: Path, what: str) -> str:
    """The text of ``what`` at ``path``; ``UsageError`` in one line if it cannot be read."""
    # One line naming the file: the OS's reason, not Python's "[Errno 2] ...: 'path'",
    # and no codec text (its byte offsets say nothing an operator can use).
    try:
        return read_file_text(path)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or 'unreadable'}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {what} {path}: not UTF-8 text") from None


def trusted_log_keys(
    trusted: Roster | None, log_key: tuple[str, ...], origin: str
) -> list[Verifier]:
    """The keys ``origin``'s log may be signed with: ``--log-key``'s and the trusted roster's."""
    if trusted is None and not log_key:
        raise UsageError("say whose key signs the log: --keys DIR, --roster FILE or --log-key")
    keys = verifier_keys(log_key, "--log-key")
    if trusted is not None:
        keys += roster_log_keys(trusted, origin)
    return keys


def revoked_log_keys(trusted: Roster | None, origin: str) -> list[Verifier]:
    """``origin``'s log keys the trusted roster revoked (none without a roster)."""
    # Only a roster says which keys were revoked; --log-key keys are trusted as given.
    return [] if trusted is None else roster_revoked_log_keys(trusted, origin)


def verified_log(
    directory: Path, origin: str, keys: list[Verifier], revoked: list[Verifier]
) -> Report:
    """``verify_log`` of ``directory``, whose refusal then names the log: several are read."""
    # verify's own lines name an entry but not the log; replay reads several.
    try:
        return verify_log(directory, keys, revoked_keys=revoked)
    except MsmtError as exc:
        error = UsageError if exc.exit_code == UsageError.exit_code else AuditError
        raise error(f"{origin} log {directory}: {exc}") from None


def entry_stream(directory: Path, report: Report, bar: Any) -> Iterator[dict[str, Any]]:
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


def shown_value(value: object) -> str:
    """An entry's value as a line shows it: lists and steps joined, ``-`` for none."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):  # a bulk refusal's steps: step:count,...
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)
