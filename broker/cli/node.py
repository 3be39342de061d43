"""Commands for running and operating a national node.

``msmt node run`` is the daemon; ``msmt submit`` hands it NDJSON over the local
socket; ``msmt inbox list|show`` and ``msmt status`` read the node's store
(read-only, so they work while the daemon runs). ``msmt node resend`` writes
the store, so it runs while the daemon is stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Final

import click

from broker import evidence, inbox_check
from broker.audit_events import parse_entry
from broker.audit_verify import load, read_origin
from broker.auditlog import DB_FILE
from broker.cli.options import CONFIG as _CONFIG
from broker.cli.options import echo_line, rfc3339, stdin_buffer
from broker.config import NodeConfig, load_config
from broker.errors import (
    AuditError,
    ConfigError,
    EnvelopeError,
    InputError,
    MsmtError,
    StdoutError,
    StoreError,
    UsageError,
    sqlite_reason,
)
from broker.feeds import FEED_COUNTER, SHARED_STATE
from broker.feeds import usage as feed_usage
from broker.files import holds_nothing
from broker.keys import MemberKeys, load_member_keys, load_pinned_roster
from broker.log import LEVELS as LOG_LEVELS
from broker.members import MEMBERS, is_member
from broker.roster import Roster, parse_time
from broker.sightings import is_report_id
from broker.stopsignals import StopSignals
from broker.store import AUDIT_SIZE, InboxEntry, Store
from broker.store_file import KEPT_SINCE, page_damage, require_store, writer_pid


def _config(path: Path) -> NodeConfig:
    return load_config(path)


def _node_pid(config: NodeConfig) -> int | None:
    """The pid of the node running on ``config``'s store (0 if not visible here), or ``None``.

    ``None`` also when ``/proc/locks`` cannot be read: the caller then checks the
    files as a stopped node's, the stricter check.
    """
    try:
        return writer_pid(config.store_path)
    except OSError:
        return None


def _node_runs(config: NodeConfig) -> bool:
    return _node_pid(config) is not None


def _started_meanwhile(config: NodeConfig, pid: int) -> MsmtError:
    """The refusal of a check whose two looks for a running node disagreed."""
    # Neither answer can be trusted then: the files were read while a process (a node
    # starting, or msmt node resend) took them, and a real fault would pass for its
    # writes (a review), or its writes for a fault (a race trial).
    return MsmtError(
        f"a process (pid {pid}) took {config.store_path} while it was read (a node starting?):"
        " nothing can be told from this read; run the check again"
    )


@click.group(name="node")
def node_group() -> None:
    """Run the national node daemon."""


@node_group.command(name="run")
@_CONFIG
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    help="The least severe level logged.",
)
def node_run(config_path: Path, log_level: str) -> None:
    """Run the node until SIGTERM or SIGINT: intake, outbox publishing, inbox, metrics."""
    # The node holds private keys and report content in memory: a crash must not
    # write them to a core file (systemd-coredump keeps those for days, readable by
    # admins). Lowered for good, hard limit too, before any key is read; the
    # planning worker inherits it.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # First: a SIGTERM or SIGINT from here on, even while the node loads, is a stop.
    with StopSignals() as signals:
        from broker import log  # noqa: PLC0415
        from broker.node_start import run  # noqa: PLC0415 - the daemon pulls in nats; load it here

        config = _config(config_path)
        log.configure(level=log_level)
        # What the node creates is 0700/0600 whatever the caller's umask: --config
        # (options.CONFIG) sets umask 077 for every command on a node.
        asyncio.run(run(config, signals))


_CHECKED: Final = "ok (not checked: the hub and the ports, which only a start reaches)"
"""``msmt node check``'s last line: what it did not check."""


@node_group.command(name="check")
@_CONFIG
def node_check(config_path: Path) -> None:
    """Check what msmt node run reads at start, without starting it or writing anything.

    The config, the signed roster against the pinned authority and version, the
    member's private keys, the NATS seed and TLS files, the policy and its
    pseudonym keys, whose data directory it is, that every page of its store reads
    (which a start does not check), and, unless a node runs on it, that its store
    and audit log are from one moment (a restore): one line each, then ``ok``. If
    one is bad, only its line, the one a start would give, with the start's exit
    status (2 for a configuration, key, restore or damaged-store error). Safe beside
    a running node. Only a start reaches the hub and takes its ports.
    """
    from broker.natstls import display_url  # noqa: PLC0415
    from broker.node_files import check_data_dir, load_files  # noqa: PLC0415
    from broker.reconcile import check_log_without_store  # noqa: PLC0415

    config = _config(config_path)
    files = load_files(config, datetime.now(UTC))
    echo_line(f"config {config_path}: member {config.member}")
    echo_line(
        f"roster {config.roster_dir}: version {files.signed.version}, signed by the pinned"
        f" authority {config.authority_path}"
    )
    keys = files.keys
    waiting = f"; not in the roster yet: {', '.join(keys.pending)}" if keys.pending else ""
    echo_line(
        f"keys {config.keys.dir / config.member}: signing {keys.signing_kid},"
        f" {len(keys.decryption)} decryption key(s){waiting}"
    )
    tls = "on" if files.tls is not None else "off"
    urls = ", ".join(display_url(url) for url in config.nats.urls)  # no password shown
    echo_line(f"nats {urls}: seed {config.seed_path}, TLS {tls}")
    named = f", {len(files.pseudonym)} pseudonym key(s)" if files.pseudonym else ""
    echo_line(f"policy {config.policy}: {files.policy.digest}{named}")
    check_data_dir(config.data_dir)
    if holds_nothing(config.store_path):  # as a start, which makes a new one in its place
        size = check_log_without_store(config)
        echo_line(f"store {config.store_path}: none yet (the first start makes it)")
        if size:
            echo_line(f"audit {config.audit_dir}: {size} entries, a start's only")
        _check_audit_pages(config.audit_dir / DB_FILE)
        click.echo(_CHECKED)
        return
    store = open_store(config)
    try:
        state = store.state()
        in_force = {
            "roster": state.get("roster_version"),
            "signing key": state.get("signing_kid"),
            "policy": state.get("policy_digest"),
        }
        on_disk = {
            "roster": str(files.signed.version),
            "signing key": files.keys.signing_kid,
            "policy": files.policy.digest,
        }
        changed = [name for name, value in in_force.items() if value not in (None, on_disk[name])]
        echo_line(
            f"store {config.store_path}: {config.member}'s, last started with roster"
            f" {in_force['roster'] or 'unknown'}"
            + "".join(f"; the {name} differs from the one in force" for name in changed)
        )
        store.check_pages()
        echo_line(f"pages {config.store_path}: every one reads (SQLite quick_check)")
        _check_moment(config, store)
        _check_audit_pages(config.audit_dir / DB_FILE)
    finally:
        store.close()
    click.echo(_CHECKED)


def _check_moment(config: NodeConfig, store: Store) -> None:
    """``node check``'s line on whether the store and the log are from one moment."""
    from broker.reconcile import check_restore  # noqa: PLC0415

    pid, logged = _node_pid(config), 0
    if pid is None:
        # Passed or refused alike: read while a process took the files, it tells nothing.
        # (Not in a finally: that would turn a Ctrl-C into this refusal, a review found.)
        try:
            logged = check_restore(config, store)
        except Exception:
            if (later := _node_pid(config)) is not None:
                raise _started_meanwhile(config, later) from None
            raise
        if (later := _node_pid(config)) is not None:
            raise _started_meanwhile(config, later)
    if pid is not None:
        # Its files change as it runs: what it wrote between two reads here would
        # pass for a store and a log from two moments.
        echo_line(
            f"node: runs on this data directory now (pid {pid}); a restart applies"
            " what differs, and checks the store against the audit log"
        )
    else:
        echo_line(
            f"audit {config.audit_dir}: {logged} entries, from the same moment as the store"
            if logged
            else f"audit {config.audit_dir}: none yet (the first start makes it)"
        )


def _check_audit_pages(path: Path) -> None:
    """``quick_check`` of the audit log's file, as of the store's: a line, or ``ConfigError``."""
    from broker.audit_scan import open_readonly  # noqa: PLC0415

    if not path.exists():
        return
    try:
        db = open_readonly(path)
        try:
            found = page_damage(db)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"audit log {path}: {sqlite_reason(exc)}") from None
    if found:
        raise ConfigError(
            f"audit log {path} is damaged: {found}; restore it from a backup"
            " (docs/DEPLOY.md, 'Backing up and restoring a node')"
        )
    echo_line(f"pages {path}: every one reads (SQLite quick_check)")


@node_group.command(name="resend")
@_CONFIG
@click.option("--to", "partner", required=True, help="The partner to send to again.")
@click.option("--since", help="Envelopes the hub acknowledged at or after this RFC 3339 time.")
@click.option("--until", help="... and before this one (default: now).")
@click.option("--report", "report_ids", multiple=True, help="Or: a report id (repeatable).")
def node_resend(
    config_path: Path,
    partner: str,
    since: str | None,
    until: str | None,
    report_ids: tuple[str, ...],
) -> None:
    """Sign reports again and send them again to a partner that refused them.

    For a partner that was down, or held our messages, longer than its
    freshness window: it refused what waited at the hub (``freshness``). Once
    it is back, run this with our node stopped; at its next start the node
    signs each envelope again, under its current policy and keys, and sends
    it. A partner that already holds a report refuses the new copy
    (``replay``) and keeps the first. Exit 0 when envelopes are queued, 1 when
    none are or a report has no envelope to the partner, 2 for a bad request or
    while the node runs.
    """
    config = _config(config_path)
    to = partner.upper()
    if not is_member(to) or to == config.member:
        raise UsageError(f"--to: {partner!r} is not a partner of {config.member}")
    if (since is None) == (not report_ids):
        raise UsageError("give either --since (a time range) or --report (report ids)")
    if until is not None and since is None:
        raise UsageError("--until needs --since")
    for report_id in report_ids:
        if not is_report_id(report_id):
            raise UsageError(
                f"--report {report_id!r} is not a report id (a lower-case UUID, not the nil"
                " or the max UUID)"
            )
    sent_from = None if since is None else rfc3339("--since", since).timestamp()
    sent_until = None if until is None else rfc3339("--until", until).timestamp()
    if sent_from is not None and sent_until is not None and sent_until <= sent_from:
        raise UsageError(f"--until {until} is not after --since {since}")
    store = open_store(config, write=True)
    try:
        queued, missing = store.queue_resend(
            to, sent_from=sent_from, sent_until=sent_until, report_ids=report_ids
        )
        for report_id in missing:
            why = (
                f"its policy released nothing of it to {to}"
                if store.has_report(report_id)
                else "no report with this id was accepted here"
            )
            click.echo(f"report {report_id}: no envelope to {to} ({why})", err=True)
    finally:
        store.close()
    click.echo(
        f"{queued} envelopes to {to} queued: the node signs them again and sends them when it"
        " next runs"
    )
    if since is not None and not queued:
        # Unacked envelopes are not chosen: they go out anyway, signed again if old.
        click.echo(f"(envelopes to {to} that the hub has not acked yet still go out)", err=True)
    sys.exit(1 if missing or not queued else 0)


async def _read_chunks(stream: BinaryIO) -> AsyncIterator[bytes]:
    """Yield the feed's bytes as they come, read on a daemon thread.

    ``os.read`` returns what the feed has written so far, so records piped in one
    at a time are sent, and answered, at once (``stream.read`` would wait for 64 KiB
    or the end). A daemon thread rather than the loop's executor, which
    ``asyncio.run`` joins at its end: Ctrl-C must not wait for a feed that writes
    nothing more.
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | OSError] = asyncio.Queue()
    room = threading.Semaphore(4)  # at most four chunks read ahead of the node
    fd = stream.fileno()

    def pump() -> None:
        while True:
            room.acquire()
            chunk: bytes | OSError
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError as exc:
                chunk = exc
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            except RuntimeError:  # the loop is closed: the command has ended
                return
            if not chunk or isinstance(chunk, OSError):
                return

    threading.Thread(target=pump, name="submit-reader", daemon=True).start()
    while True:
        chunk = await chunks.get()
        room.release()
        if isinstance(chunk, OSError):
            raise chunk
        if not chunk:
            return
        yield chunk


@click.command(name="submit")
@_CONFIG
@click.argument("file", default="-", metavar="[FILE|-]")
@click.option("--quiet", "-q", is_flag=True, help="Print only rejected records and the summary.")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A named feed's token (msmt feeds add --out); default: the node's intake.token.",
)
def submit_cmd(config_path: Path, file: str, quiet: bool, token_file: Path | None) -> None:
    """Send NDJSON sightings to the local node; print one answer line per record.

    With ``--token-file`` the records come from that named feed, and the audit
    log says so (``socket:NAME``). Exit 0 when every record was accepted or was
    a duplicate (accepted before: a feed may resend safely), 1 when any was
    refused otherwise (schema, size, conflict, unavailable), 2 when the node
    could not be reached, refused the token, or stopped before answering every
    record, on Ctrl-C, or when stdout was closed before every answer was shown.
    """
    # Imported here: the intake loads aiohttp (~0.3 s), which the family's other
    # commands, and msmt feeds, never use.
    from broker.intake import read_token, submit  # noqa: PLC0415

    config = _config(config_path)
    try:
        token = read_token(token_file or config.token_path)
    except UsageError as exc:
        # Only when there is no token to send: MSMT_INTAKE_TOKEN_FILE may point a
        # feed at its own token, and a node refusing the one sent says why itself.
        if token_file is None and not config.intake.shared_token:
            raise UsageError(
                "this node refuses the shared intake.token (intake.shared_token = false):"
                " give --token-file with the feed's own token (msmt feeds add)"
            ) from None
        if token_file is None and not config.token_path.exists():
            raise UsageError(
                f"{exc}: the node writes it at its first start (has `msmt node run` run?)"
            ) from None
        raise
    counts = {"accepted": 0, "rejected": 0}
    duplicates = 0

    def show(answer: dict[str, Any]) -> None:
        nonlocal duplicates
        counts[answer["status"]] = counts.get(answer["status"], 0) + 1
        duplicates += answer.get("reason") == "duplicate"
        if not quiet or answer["status"] != "accepted":
            try:
                click.echo(json.dumps(answer, separators=(",", ":")))
            except StdoutError as exc:
                # Our stdout failed (``| head`` left, a full disk): not the node's
                # socket, which an OSError here was taken for. Exit 2, as for Ctrl-C:
                # the answers not shown may be of records not accepted.
                failed = (
                    "stdout was closed" if exc.closed else f"stdout failed ({exc.cause.strerror})"
                )
                raise UsageError(
                    f"{failed} before every answer was shown: records whose answer"
                    " was not shown may or may not have been accepted; send them again"
                    " (a resend is answered duplicate)"
                ) from None

    try:
        stream = stdin_buffer() if file == "-" else Path(file).open("rb")  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}") from None

    def summarise() -> None:
        summary = f"{counts['accepted']} accepted, {counts['rejected']} rejected"
        click.echo(
            summary + (f" ({duplicates} of them duplicates)" if duplicates else ""), err=True
        )

    try:
        asyncio.run(submit(config.socket_path, token, _read_chunks(stream), show))
    except KeyboardInterrupt:
        # Exit 2, not click's "Aborted!" and 1: a feed's wrapper must not take an
        # interrupted batch for one whose records were all answered.
        summarise()
        raise UsageError(
            "interrupted before every record was answered: those without an answer"
            " may or may not have been accepted; send them again (a resend is"
            " answered duplicate)"
        ) from None
    except UsageError:
        if counts["accepted"] or counts["rejected"]:
            summarise()  # what was answered before the node stopped
        raise
    finally:
        if file != "-":
            stream.close()
    summarise()
    sys.exit(1 if counts["rejected"] > duplicates else 0)


def open_store(config: NodeConfig, *, write: bool = False) -> Store:
    """The node's store (read-only unless ``write``); ``UsageError`` if it is not this member's."""
    require_store(config.store_path)
    # The node refuses another member's data directory (its audit log's origin);
    # reading one here would show that member's reports under this member's name.
    has_log = not holds_nothing(config.audit_dir / DB_FILE)
    origin = read_origin(config.audit_dir) if has_log else config.member
    if origin != config.member:
        raise UsageError(f"data_dir {config.data_dir} holds {origin}'s node, not {config.member}'s")
    if not write:
        return Store(config.store_path, readonly=True)
    try:
        return Store(config.store_path)
    except StoreError as exc:
        raise UsageError(f"stop the node first: {exc}") from None


def _roster(config: NodeConfig) -> Roster:
    # As the node loads it (pinned, never older), but not recorded: only a node's
    # start advances the pin. The roster is public: no private key is read.
    return load_pinned_roster(
        config.roster_dir, config.authority_path, config.roster_state_path, record=False
    ).roster


def _member_keys(config: NodeConfig) -> tuple[Roster, MemberKeys]:
    # As the node loads them, for the inbox's own checks.
    roster = _roster(config)
    return roster, load_member_keys(config.keys.dir, config.member, roster, datetime.now(UTC))


def _revoked_signers(config: NodeConfig, entries: Sequence[InboxEntry]) -> dict[str, str]:
    """The signing keys of ``entries`` that the roster withdrew, each with why."""
    kids = {e.signing_kid for e in entries if e.signing_kid is not None}
    if not kids:
        # Rows from before nodes recorded the key need no roster: inbox check covers them.
        return {}
    roster = _roster(config)
    return {kid: why for kid in sorted(kids) if (why := roster.withdrawn(kid)) is not None}


def _outbox(store: Store, depth: int) -> dict[str, Any]:
    # ``outbox_depth`` by partner; what no partner accounts for is not planned yet.
    partners = store.outbox_by_partner()
    queued = sum(n for p in partners.values() for k, n in p.items() if k != "oldest_accepted_at")
    shown = {
        partner: {**counts, "oldest_accepted_at": _when(counts["oldest_accepted_at"])}
        for partner, counts in partners.items()
    }
    return {"unplanned": depth - queued, **shown}


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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
        "issued_at": _when(entry.iat),
        "received_at": _when(entry.received_at),
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
    config = _config(config_path)
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
            f"{_when(entry.received_at)}  {entry.originator}  {entry.kind:<8}  "
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
    config = _config(config_path)
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
    config = _config(config_path)
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
    config = _config(config_path)
    store = open_store(config)
    roster, keys = _member_keys(config)
    running = _node_runs(config)
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
        if not running and (later := _node_pid(config)) is not None:
            raise _started_meanwhile(config, later)
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
    if unsettled:
        plural = "s" if unsettled > 1 else ""
        older += f"; {unsettled} receipt{plural} logged after the running node's last store write"
        older += " left out"
    summary = f"{found.verified} reports match their signed envelopes{older}"
    if found.problems:
        count = len(found.problems)
        raise InputError(f"{count} problem{'s' if count > 1 else ''} in the inbox ({summary})")
    click.echo(f"OK: {summary}; every receipt in the audit log is in the inbox")


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


def _shared_token_state(config: NodeConfig, state: Mapping[str, str]) -> str:
    # As for the policy: what the node started with, and whether node.toml still
    # says so (a change applies at the next start).
    wanted = "on" if config.intake.shared_token else "off"
    started = state.get(SHARED_STATE)
    if started is None:
        return f"{wanted} (the node has not started with it yet)"
    if started != wanted:
        return f"{started}; node.toml says {wanted}: restart the node to apply it"
    return started


@click.command(name="status")
@_CONFIG
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status_cmd(config_path: Path, as_json: bool) -> None:
    """Show connection, outbox depth, inbox lag, counters and the last error (and when).

    ``version`` is the build that last started a node here (``unknown`` before its
    first start under a build that records it), to check an upgrade took.
    ``roster_version`` is the roster the node last started with (a number, or
    ``unknown`` before its first start), to check a roster rollout reached it.
    ``policy_digest`` is the policy it last started with; ``policy_file`` says
    whether the file on disk is still that policy (an edit applies at restart).
    ``shared_token`` is ``off`` where the node refuses the shared intake.token
    (``intake.shared_token = false``: named feeds only), ``on`` otherwise.
    ``received`` is how many reports the inbox holds now (what ``inbox list`` lists).
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
    config = _config(config_path)
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
        # The key it signs with since that start: a rotation took once this is the new one.
        "signing_kid": state.get("signing_kid", "unknown"),
        "policy_digest": in_force,
        "policy_file": _policy_file_state(config, in_force),
        # Whether intake.token is let in (intake.shared_token), as of the last start.
        "shared_token": _shared_token_state(config, state),
        # As of the last start: the signing and encryption keys and the TLS certificate.
        "credentials_valid_until": _json_state(state, "credentials_valid_until"),
        "connected": state.get("connected", "unknown"),
        "outbox_depth": depth,
        "outbox": _outbox(store, depth),
        "inbox_lag": state.get("inbox_lag", "unknown"),
        # This node's clock minus the hub's, as last compared (every 5 s when connected).
        "clock_offset": state.get("clock_offset", "unknown"),
        # Why and since when the node takes nothing from its inbox (a twin), else empty.
        "inbox_paused": state.get("inbox_paused", ""),
        "received": store.inbox_count(),
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


COMMANDS: tuple[click.Command, ...] = (node_group, submit_cmd, inbox_group, status_cmd)
