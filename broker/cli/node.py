"""``msmt node run``, ``check`` and ``resend``, and what every command on one node shares.

``msmt node run`` is the daemon; ``node check`` reads what a start reads, without
starting; ``node resend`` writes the store, so it runs while the daemon is stopped.
Shared with the other commands on one node (``broker.cli.submit``,
``broker.cli.inbox``, ``broker.cli.status``, ``broker.cli.feeds``): its config, whether
a node runs on its store now, and its store, opened as this member's.
"""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import click

from broker.audit_verify import read_origin
from broker.auditlog import DB_FILE
from broker.cli.options import CONFIG as _CONFIG
from broker.cli.options import echo_line, rfc3339
from broker.config import NodeConfig, load_config
from broker.errors import (
    ConfigError,
    MsmtError,
    StoreError,
    UsageError,
    sqlite_reason,
)
from broker.files import holds_nothing, not_writable
from broker.log import LEVELS as LOG_LEVELS
from broker.members import is_member
from broker.merkle import HASH_SIZE
from broker.private_memory import keep_memory_private
from broker.reconcile import WITNESS_STATE
from broker.sightings import is_report_id
from broker.stopsignals import StopSignals
from broker.store import Store
from broker.store_file import page_damage, require_store, writer_pid
from broker.witness import MAX_STATE_SIZE
from broker.witness_reanchor import REANCHORED_FILE, reanchor


def node_config(path: Path) -> NodeConfig:
    """The node's ``node.toml`` at ``path``, loaded and checked (``load_config``)."""
    return load_config(path)


def node_pid(config: NodeConfig) -> int | None:
    """The pid of the node running on ``config``'s store (0 if not visible here), or ``None``.

    ``None`` also when ``/proc/locks`` cannot be read: the caller then checks the
    files as a stopped node's, the stricter check.
    """
    try:
        return writer_pid(config.store_path)
    except OSError:
        return None


def node_runs(config: NodeConfig) -> bool:
    """Whether a node runs on ``config``'s store now, as ``node_pid`` tells."""
    return node_pid(config) is not None


def started_meanwhile(config: NodeConfig, pid: int) -> MsmtError:
    """The refusal of a check whose two looks for a running node disagreed."""
    # Neither answer can be trusted then: the files were read while a process (a node
    # starting, or msmt node resend) took them, and a real fault would pass for its
    # writes (a review), or its writes for a fault (a race trial).
    return MsmtError(
        f"a process (pid {pid}) took {config.store_path} while it was read (a node starting?):"
        " nothing can be told from this read; run the check again"
    )


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


def time_text(ts: float) -> str:
    """A store's time (seconds since the epoch) as RFC 3339 UTC, as the commands show it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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
    # The node holds private keys and report content in memory: no core file, and no
    # other process of its user reads it; before any key is read. The planning worker
    # does the same for itself.
    keep_memory_private()
    # First: a SIGTERM or SIGINT from here on, even while the node loads, is a stop.
    with StopSignals() as signals:
        from broker import log  # noqa: PLC0415
        from broker.node_start import run  # noqa: PLC0415 - the daemon pulls in nats; load it here

        config = node_config(config_path)
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
    from broker.node_files import check_data_dir, load_files, seed_listed  # noqa: PLC0415
    from broker.reconcile import check_log_without_store  # noqa: PLC0415

    config = node_config(config_path)
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
    listed = seed_listed(config, files.seed)
    echo_line(f"nats {urls}: seed {config.seed_path}, {listed}, TLS {tls}")
    named = f", {len(files.pseudonym)} pseudonym key(s)" if files.pseudonym else ""
    echo_line(f"policy {config.policy}: {files.policy.digest}{named}")
    check_data_dir(config.data_dir)
    # What a start's first write would find: a read-only mount, or a folder the node's
    # user may not write, passed here ("none yet ... ok") and failed the start.
    unwritable = not_writable(config.store_path)
    if unwritable is not None:
        raise StoreError(f"cannot open store {config.store_path}: {unwritable}")
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

    pid, logged = node_pid(config), 0
    if pid is None:
        # Passed or refused alike: read while a process took the files, it tells nothing.
        # (Not in a finally: that would turn a Ctrl-C into this refusal, a review found.)
        try:
            logged = check_restore(config, store)
        except Exception:
            if (later := node_pid(config)) is not None:
                raise started_meanwhile(config, later) from None
            raise
        if (later := node_pid(config)) is not None:
            raise started_meanwhile(config, later)
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
    config = node_config(config_path)
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


@node_group.command(name="reanchor")
@_CONFIG
@click.option("--log", "origin", required=True, help="The partner whose log was restored.")
@click.option(
    "--size", type=click.IntRange(1, MAX_STATE_SIZE), required=True, help="Its log's size now."
)
@click.option("--root", required=True, help="Its log's root at that size (base64).")
@click.option("--reason", required=True, help="Why, and who confirmed it (one line; kept).")
def node_reanchor(config_path: Path, origin: str, size: int, root: str, reason: str) -> None:
    """Witness a partner's restored log again, from the size and root its operator gave.

    A member restored from a backup has a log that forks from what this node
    cosigned, and this node never cosigns it again (docs/DEPLOY.md, "What a
    restore means"). Once its operator has given the size and root that
    'msmt audit verify' prints for its log now, out of band, run this with our
    node stopped: the witness state takes them, and what it held before is kept
    in witness-reanchored.jsonl, for the auditors. At the next start the node
    cosigns that log again if its checkpoints extend the given root. Exit 0 when
    done, 2 for a bad request or while the node runs.
    """
    config = node_config(config_path)
    log = origin.upper()
    if not is_member(log) or log == config.member:
        raise UsageError(f"--log: {origin!r} is not a partner of {config.member}")
    try:
        raw = base64.b64decode(root, validate=True)
    except ValueError:
        raise UsageError("--root: not base64 (as msmt audit verify prints it)") from None
    if len(raw) != HASH_SIZE or base64.b64encode(raw).decode() != root:
        raise UsageError(f"--root: not a {HASH_SIZE}-byte root in base64 with padding")
    line = " ".join(reason.split())
    if not line or not line.isprintable():
        raise UsageError("--reason: one line of printable text")
    store = open_store(config, write=True)  # the node's lock: refused while it runs
    try:
        done = reanchor(config.data_dir / WITNESS_STATE, log, size, raw, line, datetime.now(UTC))
    finally:
        store.close()
    before = (
        "held nothing of it"
        if done.before is None
        else f"held size {done.before.size}, root {base64.b64encode(done.before.root).decode()}"
    )
    click.echo(
        f"{log}: the witness state {before}; it holds size {size}, root {root} now (kept in"
        f" {config.data_dir / REANCHORED_FILE}). The node cosigns {log}'s log again from"
        " there when it next runs, if its checkpoints extend that root."
    )


COMMANDS: tuple[click.Command, ...] = (node_group,)
