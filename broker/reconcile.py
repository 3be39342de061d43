"""A node's store and audit log, checked to be from one moment and brought level at start.

The store records the audit log's size with every write (``store.AUDIT_SIZE``),
so a start can tell a log that lost entries, a store that lost commits, and the
one append a crash may leave unconfirmed. ``check_store_against_log`` refuses
the first two (a restore from two moments: starting would lose reports or fork
the log); ``audit_unaudited`` logs what a crash or a full disk left unlogged.
``check_restore`` makes the same checks without opening either file for
writing (``msmt node check``, before a restored node starts).
"""

from __future__ import annotations

import bisect
import json
from datetime import datetime
from typing import Any, Final, Protocol

from broker import audit_events
from broker.audit_verify import LoadedLog, load
from broker.auditlog import DB_FILE, FORMAT, AuditLog
from broker.config import NodeConfig
from broker.errors import AuditError, ConfigError
from broker.files import holds_nothing
from broker.store import AUDIT_SIZE, Store
from broker.witness import load_witness_state

_START_ENTRIES: Final = frozenset({"policy", "key"})
"""The entry types a start appends before its first store write (``node_start.load_node``)."""


class LogEntries(Protocol):
    """What the checks read of an audit log: its size, where appends ended, an entry."""

    @property
    def size(self) -> int:
        """How many entries the log holds."""
        ...

    def checkpoint_sizes(self, after: int) -> list[int]:
        """The sizes of the stored checkpoints beyond ``after``, ascending."""
        ...

    def entry(self, index: int) -> bytes:
        """Entry ``index``'s bytes."""
        ...


class ReadOnlyLog:
    """``LogEntries`` of a log read with ``audit_verify.load``: nothing opened for writing."""

    def __init__(self, loaded: LoadedLog) -> None:
        self._loaded = loaded

    @property
    def size(self) -> int:
        """How many entries the log holds."""
        return self._loaded.tree.size

    def checkpoint_sizes(self, after: int) -> list[int]:
        """The sizes of the stored checkpoints beyond ``after``, ascending."""
        return sorted(size for size, _ in self._loaded.checkpoints if size > after)

    def entry(self, index: int) -> bytes:
        """Entry ``index``'s bytes, read again from the file."""
        return self._loaded.entries(index, index + 1)[0]


WITNESS_STATE: Final = "witness-state.json"
RESTORE: Final = (
    "restore the store and the audit log from the same backup, each with its -wal file"
    " (docs/DEPLOY.md)"
)
"""What a refusal of a store and a log from two moments tells the operator to do."""


def ran_before(config: NodeConfig) -> bool:
    """Whether the data directory's witness state shows this node has run, connected.

    A node cosigns partners' logs only after its own start logged its policy, so
    its own log held entries then. A state of no log says nothing. One that cannot
    be read is ``ConfigError`` (``load_witness_state``), before the log is opened:
    a copy onto a full disk leaves it 0 bytes long beside a log of 0 bytes.
    """
    return bool(load_witness_state(config.data_dir / WITNESS_STATE))


def log_lost(config: NodeConfig, *, ran: bool = False) -> ConfigError:
    """The refusal of a missing or empty audit log beside a store that holds reports.

    With ``ran``, beside a witness state that shows the node ran before (a copy
    onto a full disk left a store and a log of 0 bytes, and a start began a new
    history under the member's name). A node logs its policy before it takes any
    report or witnesses anything, so such a log was lost or left out of a restore.
    """
    if ran:
        beside = f"{config.data_dir / WITNESS_STATE} shows this node ran before"
        afresh = (
            f"; for a node that is to start afresh, move {WITNESS_STATE} aside and keep it"
            " for the auditors"
        )
    else:
        beside, afresh = f"the store {config.store_path} holds reports", ""
    return ConfigError(
        f"{beside} but the audit log in {config.audit_dir} is missing or empty: restore it"
        f" from the same backup as the store (docs/DEPLOY.md){afresh}"
    )


def check_restore(config: NodeConfig, store: Store) -> int:
    """Check a store and its log as a start does, without writing; return the log's size.

    Raises ``ConfigError`` with the start's own line for a log that is lost,
    damaged or not from the store's moment.
    """
    holds_reports, ran = store.holds_reports(), ran_before(config)
    if _no_log(config):
        if holds_reports or ran:
            raise log_lost(config, ran=not holds_reports)
        return 0
    try:
        log = ReadOnlyLog(load(config.audit_dir))
    except AuditError as exc:
        raise ConfigError(str(exc)) from None
    if (holds_reports or ran) and log.size == 0:
        raise log_lost(config, ran=not holds_reports)
    check_store_against_log(config, store, log)
    return log.size


def _no_log(config: NodeConfig) -> bool:
    """Whether the node's audit log holds nothing: missing, or a file of 0 bytes."""
    return holds_nothing(config.audit_dir / DB_FILE)


def check_log_without_store(config: NodeConfig) -> int:
    """``check_restore`` for a data directory with no store yet; return the log's size.

    A start makes a new store, and then refuses a log of more than a start's
    entries beside it (the store was lost), or a missing or empty one beside a
    witness state (the log was).
    """
    ran = ran_before(config)
    if _no_log(config):
        if ran:
            raise log_lost(config, ran=True)
        return 0
    try:
        loaded = load(config.audit_dir)
    except AuditError as exc:
        raise ConfigError(str(exc)) from None
    if loaded.origin != config.member:
        # As the start's open of the log says it (AuditLog), before it writes a store.
        raise ConfigError(
            f"{loaded.path} is a {FORMAT} log of {loaded.origin}, not a {FORMAT} log of"
            f" {config.member}"
        )
    log = ReadOnlyLog(loaded)
    if ran and log.size == 0:
        raise log_lost(config, ran=True)
    _start_entries_only(config, log)
    return log.size


def check_store_against_log(
    config: NodeConfig, store: Store, audit: LogEntries
) -> tuple[list[dict[str, Any]], set[tuple[str, str]]]:
    """Refuse a store and an audit log that are not from one moment; raise ``ConfigError``.

    Returns the ``policy`` and ``key`` entries the log holds after the store's
    last write (a start that logged them and then could not write the store), and
    the ``(sender, JWE hash)`` of the ``received`` entries there whose reports the
    store lacks: the hub redelivers them, and the receiver must store them then,
    not refuse them (``broker.inbound``: not at ``budget``) or log them again.

    Every store write records the log's size (``store.AUDIT_SIZE``), and the log
    commits before the store write that follows an append. So a log shorter than
    that lost entries. After it, an ``accepted`` report and a ``sent`` envelope
    were in the store before their entries were written, so the store must hold
    them; ``received`` reports are stored after their entries, so one append's
    worth may be missing (a crash, or a store write that failed, before the
    store's write; the hub redelivers them), never more. Anything else means one
    of the two lost commits: a restore without its ``-wal`` file, or from two
    backups. Starting would lose reports for good (the hub was told they were
    stored) or fork the log.
    """
    state = store.state()
    recorded = state.get(AUDIT_SIZE, "")
    if not recorded.isdecimal():
        # A store that never recorded it was written by an older version (its first
        # write starts the record), unless it holds nothing at all beside a log that
        # does: a young store lives wholly in its -wal file until SQLite's first
        # checkpoint, and losing that file leaves an empty store.
        return ([] if state else _start_entries_only(config, audit)), set()
    seen = int(recorded)
    if seen > audit.size:
        raise ConfigError(
            f"the audit log in {config.audit_dir} holds {audit.size} entries, but the store"
            f" {config.store_path} was last written when it held {seen}: the log lost"
            f" entries; {RESTORE}"
        )
    ends = audit.checkpoint_sizes(seen)
    unstored_append: int | None = None  # the one append whose receipts may be missing
    unrecorded: list[dict[str, Any]] = []
    unstored: set[tuple[str, str]] = set()
    for index in range(seen, audit.size):
        entry = json.loads(audit.entry(index))
        kind = entry.get("type")
        if kind in _START_ENTRIES:
            unrecorded.append(entry)
        if kind == "accepted":
            held = store.has_report(entry["report_id"])
        elif kind == "sent":
            held = store.has_envelope(entry["report_id"], entry["partner"])
        elif kind == "received":
            held = store.has_received(entry["sender"], entry["jwe_sha256"])
            append = bisect.bisect_right(ends, index)
            if not held and unstored_append in (None, append):
                unstored_append, held = append, True
                unstored.add((entry["sender"], entry["jwe_sha256"]))
        else:
            continue
        if not held:
            raise ConfigError(
                f"the store {config.store_path} lacks what audit log entry {index} records"
                f" ({kind}, report {entry['report_id']}): the store lost commits; {RESTORE}"
            )
    return unrecorded, unstored


def _start_entries_only(config: NodeConfig, audit: LogEntries) -> list[dict[str, Any]]:
    """The log's entries beside an empty store, if they are a start's alone; else ``ConfigError``.

    A first start that logged its policy and keys and then found the disk full
    leaves a log of those alone: nothing of a report was in the store to lose.
    """
    found = []
    for index in range(audit.size):
        entry = json.loads(audit.entry(index))
        if entry.get("type") not in _START_ENTRIES:
            raise ConfigError(
                f"the audit log in {config.audit_dir} holds {audit.size} entries, but the"
                f" store {config.store_path} is empty: the store was lost; {RESTORE}"
            )
        found.append(entry)
    return found


def audit_unaudited(member: str, store: Store, audit: AuditLog, at: datetime) -> int:
    """Confirm the reports the store has no audit confirmation of; return how many.

    Their ``accepted`` entries are missing after a crash, or an audit append that
    failed (a full disk), between a report's store commit and its entry: appended
    here with feed ``recovered``. After a crash between the entry and the store
    write that confirms it (``Store.mark_audited_later``), the entry is in the log
    after the size the store last recorded (``AUDIT_SIZE``): found there, it is not
    appended again. Call it before the store's first write after a start.
    """
    unaudited = store.unaudited()
    if not unaudited:
        return 0
    logged = _accepted_since_store_write(store, audit, {rid for rid, _ in unaudited})
    missing = [(rid, kind) for rid, kind in unaudited if rid not in logged]
    if missing:
        audit.append_many(
            [
                audit_events.accepted(member, at, report_id=rid, kind=kind, feed="recovered")
                for rid, kind in missing
            ]
        )
    store.mark_audited([rid for rid, _ in unaudited])
    return len(unaudited)


def _accepted_since_store_write(store: Store, audit: AuditLog, wanted: set[str]) -> set[str]:
    # The reports of ``wanted`` with an ``accepted`` entry past the log size the
    # store last recorded: every store write after an entry's append confirms its
    # report in the same commit, so an unconfirmed report's entry, if written, is
    # there. Without a recorded size (a store no node wrote yet) nothing is found.
    recorded = store.state().get(AUDIT_SIZE, "")
    found: set[str] = set()
    for index in range(int(recorded) if recorded.isdecimal() else audit.size, audit.size):
        entry = json.loads(audit.entry(index))
        if entry.get("type") == "accepted" and entry.get("report_id") in wanted:
            found.add(entry["report_id"])
    return found
