"""The node's durable store: one SQLite file in WAL mode.

Tables:

* ``reports``: records accepted from feeds, with whether the per-partner plan exists
  and which feed accepted each (NULL for one accepted before the store recorded it);
* ``outbox``: one row per (report, partner) with the exact JWE to publish and a
  state, ``pending`` until the hub acknowledged it, then ``sent`` (and the JWE's
  bytes dropped: the audit log keeps its hash);
* ``awaiting_key``: partners a planned report has no envelope for yet, because
  the roster had no valid encryption key for them (planned when it has);
* ``reissue``: outbox rows to sign again before they are published (again):
  ``stale`` ones waited pending for half the freshness window, ``operator``
  ones were asked for by ``msmt node resend`` after a partner refused them;
* ``inbox``: the verified disclosed fields received from partners, the key
  their originator signed them with (to tell which a later revocation
  withdrew), and each envelope exactly as it arrived (evidence of what its
  originator signed; ``msmt inbox evidence``);
* ``seen``: the replay seen-set, ``(sender, jti) -> JWE hash``, kept only for the
  freshness window (older messages fail the freshness check anyway);
* ``counters`` and ``state``: figures and the last error, for ``msmt status``.

Every method is one transaction over a batch, so a caller that batches pays
one fsync per batch. ``synchronous=FULL`` makes a commit durable before it
returns: "accepted" and "sent" are promises to operators. A full disk
(``SQLITE_FULL``) raises ``StoreError`` and the transaction rolls back, so
nothing already committed is touched. The class is synchronous; the daemon
calls it from one worker thread. What a store file is (its schema and format, the
writer's lock, the checks at open) is ``broker.store_file``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple

from broker.errors import (
    StoreDamagedError,
    StoreError,
    sqlite_reason,
)
from broker.files import NOT_A_FILE
from broker.store_file import (
    PAGE_SIZE,
    SCHEMA,
    STORE_FORMAT,
    WAL_LIMIT,
    add_missing_columns,
    check_format,
    create_schema,
    lock_writer,
    page_damage,
    refuse_foreign,
)

AUDIT_SIZE: Final = "audit_size"
"""The ``state`` key holding the audit log's size at the store's last write."""


_SORTED_JSON: Final = json.JSONEncoder(sort_keys=True).encode
"""``json.dumps(value, sort_keys=True)``, the same text, without a new encoder per call."""

_SEEN_BEFORE_SQL: Final = (
    "WITH asked(i, sender, jti) AS (VALUES {rows}) SELECT i FROM asked"
    " WHERE EXISTS (SELECT 1 FROM seen WHERE seen.sender = asked.sender AND seen.jti = asked.jti)"
    " OR EXISTS (SELECT 1 FROM inbox"
    " WHERE inbox.sender = asked.sender AND inbox.report_id = asked.jti)"
)
"""``Store.seen_before``'s statement, for ``rows`` of ``(index, sender, jti)``."""

_RECEIVED_DIGESTS_SQL: Final = "SELECT sender, jwe_sha256 FROM inbox WHERE jwe_sha256 IN ({rows})"
"""``Store.received_digests``' statement, for ``rows`` of one JWE hash."""

_LOOKUP_ROWS: Final = 256
"""Rows one batch lookup binds at most: at 3 parameters a row, within SQLite's smallest
default limit of parameters per statement (999, before SQLite 3.32)."""


@dataclass(frozen=True, slots=True)
class NewReport:
    """A validated feed record to accept: its id, kind and the exact bytes received."""

    report_id: str
    kind: str
    record: bytes


class Earlier(NamedTuple):
    """What is stored under a report id that was taken: the record, and the feed that gave it."""

    record: bytes
    feed: str | None
    """As the ``accepted`` audit entry names it (``socket:NAME``, ``socket``, ``spool``);
    None when unknown (accepted before the store recorded feeds, or with no feed given)."""


class Accepted(list[bool]):
    """``Store.accept``'s answer: per report, True if new, False if its id was taken.

    A list of bools, so callers that only count new reports need nothing else;
    ``earlier`` maps the index of each refused report to what is stored under its id.
    """

    def __init__(self) -> None:
        super().__init__()
        self.earlier: dict[int, Earlier] = {}


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One envelope to publish to one partner.

    ``audit`` is the JSON the send entry of the audit log needs (released
    disclosure keys, policy digest, handling markings), prepared with the envelope.
    """

    report_id: str
    partner: str
    subject: str
    jwe: bytes
    audit: str
    rowid: int = field(default=0, repr=False, compare=False)
    """The outbox row it was read from (``Store.pending``); 0 for one not stored yet.

    No other row of the store is given it while the store is open, so the
    publisher can name the rows it holds back by it (``Store.pending``'s skip).
    """
    _sha256: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def jwe_sha256(self) -> str:
        """The envelope's SHA-256 (hex), as its ``sent`` audit entry records it."""
        # Hashed once: the publisher needs it for the message id, then again for
        # the sent entry (~4.5 us per 6 KB envelope each time).
        digest = self._sha256
        if digest is None:
            digest = hashlib.sha256(self.jwe).hexdigest()
            object.__setattr__(self, "_sha256", digest)
        return digest

    @property
    def msg_id(self) -> str:
        """The ``Nats-Msg-Id``: ``jwe_sha256``.

        A resend of these bytes is deduplicated by the hub. It is not the report id:
        the duplicate window is shared by every sender to an inbox, and a member who
        knows a report's id (from its own copy) could publish junk under a guessable
        id first, so that the real envelope is acked as a "duplicate" and never stored.
        """
        return self.jwe_sha256

    def __reduce__(self) -> tuple[type[OutboxItem], tuple[str, str, str, bytes, str]]:
        # Pickled (planning worker -> node) as constructor arguments: a frozen
        # slotted dataclass otherwise unpickles through ``__setstate__``, which
        # calls ``dataclasses.fields`` per object, ~5 % of the node's CPU.
        return (OutboxItem, (self.report_id, self.partner, self.subject, self.jwe, self.audit))


@dataclass(frozen=True, slots=True)
class Received:
    """The verified disclosed fields of one partner's report, ready to store.

    ``sender`` is the member the hub attests sent it; ``originator`` signed it
    (they differ only for an onward share). ``tlp``, ``rel_to`` and ``iat``
    (Unix seconds) are the signed handling claims, kept so the report can be
    handled and exported under the originator's markings. ``signing_kid`` is the
    key the originator signed it with, so that a report whose key is revoked
    later can be told apart (``msmt inbox list``, ``msmt export stix``).
    """

    sender: str
    originator: str
    report_id: str
    kind: str
    tlp: str
    rel_to: tuple[str, ...] | None
    iat: float
    fields: Mapping[str, Any]
    paths: tuple[str, ...]
    jwe_sha256: str
    jwe: str
    signing_kid: str | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """A stored received report, as ``msmt inbox`` shows it (times in Unix seconds).

    ``signing_kid`` is None for a report received before nodes recorded it.
    """

    sender: str
    originator: str
    report_id: str
    kind: str
    tlp: str
    rel_to: tuple[str, ...] | None
    iat: float
    received_at: float
    fields: dict[str, Any]
    paths: tuple[str, ...]
    jwe_sha256: str
    signing_kid: str | None


SeenState = Literal["new", "redelivered", "replay"]


class Store:
    """The node's SQLite store; see the module docstring for the tables.

    ``max_pages`` caps the file (SQLite ``max_page_count``); past it, writes fail
    exactly as on a full disk, which lets an operator bound the store and lets
    tests exercise the disk-full path. Raises ``StoreError`` when the file
    cannot be opened or written.
    """

    def __init__(self, path: Path, *, readonly: bool = False, max_pages: int | None = None) -> None:
        self.path = path
        self.audit_size: Callable[[], int] | None = None
        """The node's audit log size: once set, every write records it (``AUDIT_SIZE``)."""
        self.write_failed: tuple[float, str] | None = None
        """When (monotonic) and why the last write failed, until a write commits again."""
        self._lock: int | None = None
        self._has_jwe: bool | None = None
        self._has_kid: bool | None = None
        # The highest outbox rowid given out while open: see ``_outbox_rowids``.
        self._outbox_top = 0
        # Reports whose ``accepted`` entries the log holds, confirmed by the next
        # write (``mark_audited_later``); dropped once a write committed them.
        self._audited_later: list[str] = []
        try:
            with suppress(FileNotFoundError):
                if not stat.S_ISREG(os.stat(path).st_mode):  # SQLite's open blocks on a FIFO
                    raise StoreDamagedError(f"store {path} is {NOT_A_FILE}")
            if readonly:
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10
                )
                check_format(self._db, path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._lock = lock_writer(path)
                refuse_foreign(path)
                self._db = sqlite3.connect(
                    path, isolation_level=None, timeout=10, check_same_thread=False
                )
                check_format(self._db, path)
                # Only a new, empty file takes it (a store keeps the page size it
                # was made with). An envelope (4-9 KB) fits in one 16 KB page
                # instead of a 4 KB page and two overflow pages, so planning,
                # publishing and marking sent each write and read about a third
                # of the pages, and the WAL a third of the frames.
                self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
                # All tables at once: a reader during a node's first start saw some
                # tables and not others ("no such table: state").
                create_schema(self._db, SCHEMA)
                add_missing_columns(self._db)
                # Last: the format says the columns it stands for are there.
                self._db.execute(f"PRAGMA user_version={STORE_FORMAT}")
                if max_pages is not None:
                    self._db.execute(f"PRAGMA max_page_count={int(max_pages)}")
        except StoreError:
            self._unlock()
            raise
        except sqlite3.DatabaseError as exc:
            self._unlock()
            if isinstance(exc, sqlite3.OperationalError):  # locked, I/O, a full disk: may pass
                raise StoreError(f"cannot open store {path}: {sqlite_reason(exc)}") from None
            raise StoreDamagedError(
                f"store {path} is damaged or not a node store: {exc}; restore it from a backup"
                " (docs/DEPLOY.md, 'Backing up and restoring a node')"
            ) from None
        except (sqlite3.Error, OSError) as exc:
            self._unlock()
            raise StoreError(f"cannot open store {path}: {sqlite_reason(exc)}") from None
        if not readonly:
            # Received reports are stored in the clear: never readable by others,
            # even in a data directory that was created open.
            # Regular files only: on this machine /dev/null was found 0600, breaking apt
            # for every other user; a -wal linked to a device must not be chmodded.
            for private in (path, path.with_name(path.name + "-wal")):
                with suppress(FileNotFoundError):
                    mode = os.stat(private).st_mode
                    if stat.S_ISREG(mode) and mode & 0o077:
                        os.chmod(private, 0o600)

    def close(self) -> None:
        """Close the database (checkpointing the WAL) and let another writer open it."""
        self._db.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor drops the flock
            self._lock = None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                marks = self._audited_later
                if marks:
                    # In the same commit as the log size below: a store write that
                    # records a size past a report's entry also records its mark.
                    self._db.executemany(
                        "UPDATE reports SET audited = 1 WHERE report_id = ?", [(r,) for r in marks]
                    )
                if self.audit_size is not None:
                    # The log commits before any store write that follows its append,
                    # so what is recorded here never exceeds what the log holds: a log
                    # found shorter at the next start lost entries (broker.node).
                    self._db.execute(
                        "INSERT INTO state(key, value) VALUES (?, ?)"
                        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (AUDIT_SIZE, str(self.audit_size())),
                    )
                self._db.execute("COMMIT")
                self.write_failed = None
                if marks:
                    self._audited_later = []
            except BaseException:
                # SQLite may already have rolled back itself (SQLITE_FULL does).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            self.write_failed = (time.monotonic(), f"store {self.path.name}: {exc}")
            raise StoreError(self.write_failed[1]) from None
        except sqlite3.DatabaseError as exc:
            self.write_failed = (time.monotonic(), f"store {self.path.name} is damaged: {exc}")
            raise StoreError(self.write_failed[1]) from None

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Hold one read transaction: every read inside sees the store at one moment.

        SQLite fixes the moment at the first read inside, not at ``BEGIN``.
        """
        try:
            self._db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path.name}: {sqlite_reason(exc)}") from None
        try:
            yield
        except BaseException:
            # The read's own error says what went wrong: on a damaged file the end
            # of the transaction fails too, and replaced it with a raw traceback.
            if self._db.in_transaction:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise
        if self._db.in_transaction:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path.name}: {sqlite_reason(exc)}") from None

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            raise StoreError(f"store {self.path.name}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            # Pages of the file are not SQLite's (zeroed, overwritten): say what to do
            # (a bad-input sweep got the bare "database disk image is malformed").
            raise StoreError(
                f"store {self.path.name} is damaged: {exc}; restore it from a backup"
                " (docs/DEPLOY.md, 'Backing up and restoring a node')"
            ) from None

    def _lookup(self, template: str, row: str, rows: Sequence[tuple[Any, ...]]) -> list[Any]:
        # A batch's lookup with its rows bound as parameters (``row`` placeholders
        # each, in ``template``'s ``{rows}``) rather than one JSON array through
        # json_each: at the few messages a batch holds at a trickle, encoding the
        # array, json_each and json_extract cost as much as the lookups. Each
        # statement's rows are padded to a power of two, the last repeated (asking
        # again changes no answer), so the statement cache holds a few statements
        # instead of one per batch size, each prepared anew.
        found: list[Any] = []
        for start in range(0, len(rows), _LOOKUP_ROWS):
            part = rows[start : start + _LOOKUP_ROWS]
            size = 1 << (len(part) - 1).bit_length()
            padded = [*part, *[part[-1]] * (size - len(part))]
            sql = template.format(rows=", ".join([row] * size))
            found += self._read(sql, [value for item in padded for value in item])
        return found

    # --- reports accepted from feeds ---------------------------------------

    def accept(
        self, reports: Sequence[NewReport], now: float | None = None, *, feed: str | None = None
    ) -> Accepted:
        """Durably accept a batch from ``feed``; return, per report, True if new, False if taken.

        ``feed`` is recorded with each new report. For each id already taken,
        ``Accepted.earlier`` holds the record stored under it and its feed, so the
        caller can tell a resend from a conflicting correction, and say which
        fields differ only to the feed that gave the first version.
        """
        at = time.time() if now is None else now
        out = Accepted()
        with self._tx() as db:
            for i, rep in enumerate(reports):
                cur = db.execute(
                    "INSERT OR IGNORE INTO reports(report_id, kind, accepted_at, record, feed) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (rep.report_id, rep.kind, at, rep.record, feed),
                )
                out.append(cur.rowcount == 1)
                if cur.rowcount != 1:
                    # Within the transaction, so an earlier record of this batch counts too.
                    row = db.execute(
                        "SELECT record, feed FROM reports WHERE report_id = ?", (rep.report_id,)
                    ).fetchone()
                    out.earlier[i] = Earlier(bytes(row[0]), row[1])
        return out

    def unaudited(self) -> list[tuple[str, str]]:
        """Accepted reports whose ``accepted`` audit entry is not confirmed: ``(id, kind)``.

        Non-empty only after a crash or a failed audit append between the accept
        commit and the next write; the node looks for their entries in the log and
        appends those it lacks (``broker.reconcile.audit_unaudited``). A mark waiting
        for the next write counts as confirmed.
        """
        later = set(self._audited_later)
        return [
            (r[0], r[1])
            for r in self._read(
                "SELECT report_id, kind FROM reports WHERE audited = 0 ORDER BY accepted_at, rowid"
            )
            if r[0] not in later
        ]

    def mark_audited(self, report_ids: Sequence[str]) -> None:
        """Confirm that these reports' ``accepted`` entries are in the audit log, now."""
        if not report_ids:
            return
        with self._tx() as db:
            db.executemany(
                "UPDATE reports SET audited = 1 WHERE report_id = ?", [(r,) for r in report_ids]
            )

    def mark_audited_later(self, report_ids: Sequence[str]) -> None:
        """Confirm these reports' ``accepted`` entries with the next write, not a commit now.

        That write records the log's size past their entries in the same commit
        (``AUDIT_SIZE``), so a store that lost the mark (a crash first) records a
        size at or before them, and the next start finds them in the log after it.
        """
        self._audited_later += report_ids

    def unplanned(self, limit: int, *, audited_only: bool = False) -> list[tuple[str, bytes]]:
        """Accepted reports whose per-partner envelopes are not made yet, oldest first.

        The planner asks for ``audited_only``: a report whose ``accepted`` entry is
        not in the audit log yet (its append failed after the store commit) waits,
        since sent first its send would come before its arrival in the log. A mark
        waiting for the next write (``mark_audited_later``) counts.
        """
        rows = self._read(
            "SELECT report_id, record FROM reports WHERE planned = 0 AND (audited >= ?"
            " OR report_id IN (SELECT value FROM json_each(?))) ORDER BY accepted_at LIMIT ?",
            (1 if audited_only else 0, json.dumps(self._audited_later), limit),
        )
        return [(r[0], bytes(r[1])) for r in rows]

    def plan(
        self,
        plans: Mapping[str, Sequence[OutboxItem]],
        waiting: Mapping[str, Mapping[str, str]] = MappingProxyType({}),
    ) -> list[OutboxItem] | None:
        """Store each report's envelopes (possibly none) and mark it planned, atomically.

        ``waiting`` names, per report, the partners it has no envelope for yet (no
        valid encryption key) and why; ``awaiting`` hands them back for planning.
        Returns the envelopes stored, named by their rows (``OutboxItem.rowid``), in
        row order: what ``pending`` would read back. None if a row was there already.
        """
        stored: list[OutboxItem] | None = []
        with self._tx() as db:
            rowids = iter(self._outbox_rowids(db, sum(map(len, plans.values()))))
            for report_id, items in plans.items():
                rows = [
                    (next(rowids), i.report_id, i.partner, i.subject, i.jwe, i.audit) for i in items
                ]
                cur = db.executemany(
                    "INSERT OR IGNORE INTO outbox(rowid, report_id, partner, subject, jwe, audit,"
                    " state) VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                    rows,
                )
                if stored is None or cur.rowcount != len(rows):
                    stored = None  # one ignored: which is not told
                else:
                    stored += [OutboxItem(*row[1:], row[0]) for row in rows]
                db.executemany(
                    "INSERT OR REPLACE INTO awaiting_key(report_id, partner, reason)"
                    " VALUES (?, ?, ?)",
                    [(report_id, p, why) for p, why in waiting.get(report_id, {}).items()],
                )
                db.execute("UPDATE reports SET planned = 1 WHERE report_id = ?", (report_id,))
        return stored

    def awaiting(self, limit: int) -> list[tuple[str, bytes, tuple[str, ...]]]:
        """Up to ``limit`` planned reports with partners still awaiting a key, oldest first.

        Each is (id, record, the partners without an envelope).
        """
        return self._queued("awaiting_key", limit)

    def _queued(self, table: str, limit: int) -> list[tuple[str, bytes, tuple[str, ...]]]:
        # (id, record, partners) per report in a (report_id, partner) queue table.
        rows = self._read(
            f"SELECT q.report_id, r.record, json_group_array(q.partner) FROM {table} q"  # noqa: S608 - our own table name
            " JOIN reports r ON r.report_id = q.report_id"
            " GROUP BY q.report_id ORDER BY min(q.rowid) LIMIT ?",
            (limit,),
        )
        return [(r[0], bytes(r[1]), tuple(json.loads(r[2]))) for r in rows]

    def awaited(
        self,
        plans: Mapping[str, Sequence[OutboxItem]],
        waiting: Mapping[str, Mapping[str, str]],
        wanted: Mapping[str, Sequence[str]],
    ) -> tuple[int, list[tuple[str, str]]]:
        """Queue envelopes for partners that were awaiting a key, atomically.

        ``plans`` and ``waiting`` are ``Planner.plan``'s for the reports planned
        again, ``wanted`` the partners awaited for each. A partner with a new
        envelope gets it pending; one still without a key keeps waiting (with the
        new reason); one the current policy releases nothing to any more is
        dropped. Returns how many envelopes were queued and the dropped pairs.
        """
        queued = 0
        dropped: list[tuple[str, str]] = []
        with self._tx() as db:
            rowids = iter(self._outbox_rowids(db, sum(map(len, wanted.values()))))
            for report_id, partners in wanted.items():
                items = {i.partner: i for i in plans.get(report_id, ())}
                still = waiting.get(report_id, {})
                for partner in partners:
                    item = items.get(partner)
                    if partner in still:
                        db.execute(
                            "UPDATE awaiting_key SET reason = ?"
                            " WHERE report_id = ? AND partner = ?",
                            (still[partner], report_id, partner),
                        )
                        continue
                    if item is None:
                        dropped.append((report_id, partner))
                    else:
                        cur = db.execute(
                            "INSERT OR IGNORE INTO outbox(rowid, report_id, partner, subject, jwe,"
                            " audit, state) VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                            (
                                next(rowids),
                                item.report_id,
                                item.partner,
                                item.subject,
                                item.jwe,
                                item.audit,
                            ),
                        )
                        queued += cur.rowcount
                    db.execute(
                        "DELETE FROM awaiting_key WHERE report_id = ? AND partner = ?",
                        (report_id, partner),
                    )
        return queued, dropped

    # --- outbox -------------------------------------------------------------

    def pending(self, limit: int, skip: Collection[int] = ()) -> list[OutboxItem]:
        """Envelopes not yet acknowledged by the hub, oldest first, minus the rows in ``skip``.

        ``skip`` holds ``OutboxItem.rowid`` values this store handed out: while it
        is open no other row gets one of them, so a row deleted meanwhile (its
        envelope withheld, ``reissued``) cannot hold back a new one in its place.
        """
        # Row ids first, from the pending index alone, envelopes only for the rows
        # chosen: the publisher skips up to its whole in-flight window on every
        # call, and reading each skipped row (to name it by report and partner)
        # cost ~1.3 us against ~0.4 for its index entry.
        ids = self._read(
            "SELECT rowid FROM outbox WHERE state = 'pending' ORDER BY rowid LIMIT ?",
            (limit + len(skip),),
        )
        chosen = [r[0] for r in ids if r[0] not in skip][:limit]
        if not chosen:
            return []
        rows = self._read(
            "SELECT report_id, partner, subject, jwe, audit, rowid FROM outbox"  # noqa: S608 - placeholders
            f" WHERE rowid IN ({','.join('?' * len(chosen))}) ORDER BY rowid",
            chosen,
        )
        return [OutboxItem(r[0], r[1], r[2], bytes(r[3]), r[4], r[5]) for r in rows]

    def _outbox_rowids(self, db: sqlite3.Connection, count: int) -> range:
        # Rowids for ``count`` new outbox rows, past every one given out while this
        # store is open. SQLite's own choice is one past the highest rowid in the
        # table: deleting that row would hand its rowid to the next row made, and
        # the publisher, still holding it back by that rowid (in flight, or
        # waiting to be retried), would hold back the new envelope instead.
        (top,) = db.execute("SELECT max(rowid) FROM outbox").fetchone()
        first = max(top or 0, self._outbox_top) + 1
        self._outbox_top = first + count - 1
        return range(first, first + count)

    def mark_sent(self, done: Sequence[OutboxItem], now: float | None = None) -> None:
        """Mark envelopes sent, after the hub acknowledged them, and drop their bytes.

        Nothing sends those bytes again (``msmt node resend`` signs anew) and the
        audit log keeps their hash, so the row keeps only the facts. Only a row
        that still holds the acknowledged bytes is marked: one signed again
        meanwhile (``reissued``) stays pending, so its new envelope goes out too.
        """
        at = time.time() if now is None else now
        with self._tx() as db:
            rowids = iter(self._outbox_rowids(db, len(done)))
            for item in done:
                # Moved (a new rowid), not updated in place: an envelope fills a
                # page of its own, which SQLite would keep, nearly empty, under the
                # shrunk row. Moved, the sent rows pack together and the emptied
                # pages are reused: about 0.6 KB per envelope instead of 4-8 KB.
                cur = db.execute(
                    "DELETE FROM outbox WHERE report_id = ? AND partner = ? AND jwe = ?",
                    (item.report_id, item.partner, item.jwe),
                )
                if cur.rowcount:
                    db.execute(
                        "INSERT INTO outbox(rowid, report_id, partner, subject, jwe, audit,"
                        " state, sent_at) VALUES (?, ?, ?, ?, X'', ?, 'sent', ?)",
                        (next(rowids), item.report_id, item.partner, item.subject, item.audit, at),
                    )

    def outbox_depth(self) -> int:
        """Envelopes waiting for an ack, plus accepted reports not yet planned.

        Sent envelopes queued to be sent again (``msmt node resend``) count too, and
        envelopes not made yet for want of a partner's key.
        """
        return sum(self.outbox_depths())

    def outbox_depths(self) -> tuple[int, int]:
        """``outbox_depth`` in two parts: (waiting for the hub or planning, awaiting a key).

        The second counts envelopes not made yet for want of a partner's key. Apart
        because it can last for weeks by design (a partner not in the roster yet), and
        would hide the first's growth from an alert on the sum.
        """
        rows = self._read(
            "SELECT (SELECT count(*) FROM outbox WHERE state = 'pending')"
            " + (SELECT count(*) FROM reports WHERE planned = 0)"
            # Driven from reissue (empty, or a few rows) into outbox by its key: as a
            # join, SQLite scanned every envelope ever sent, once a second (a soak
            # trial: 7 ms at 25,000 rows, growing with the node's age).
            " + (SELECT count(*) FROM reissue q WHERE EXISTS (SELECT 1 FROM outbox o"
            " WHERE o.report_id = q.report_id AND o.partner = q.partner AND o.state = 'sent'))"
        )
        awaiting = 0
        if self._has_awaiting_table():
            awaiting = int(self._read("SELECT count(*) FROM awaiting_key")[0][0])
        return int(rows[0][0]), awaiting

    def _has_awaiting_table(self) -> bool:
        # A store no node of this version has opened yet (status reads it read-only)
        # has no awaiting_key table.
        return bool(
            self._read("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'awaiting_key'")
        )

    def outbox_by_partner(self) -> dict[str, dict[str, Any]]:
        """What ``outbox_depth`` counts, per partner, with the oldest report's acceptance time.

        Per partner: ``unacked`` (envelopes waiting for the hub's ack), ``resend``
        (sent envelopes queued to be signed again), ``awaiting_key`` (not made for
        want of the partner's key) and ``oldest_accepted_at`` (epoch seconds).
        Accepted reports not planned yet have no partner: ``outbox_depth`` less
        these is their number.
        """
        queues = list(_WAITING.items())
        if self._has_awaiting_table():
            queues.append(("awaiting_key", "SELECT partner, report_id FROM awaiting_key"))
        result: dict[str, dict[str, Any]] = {}
        for name, select in queues:
            rows = self._read(
                f"SELECT w.partner, count(*), min(r.accepted_at) FROM ({select}) w"  # noqa: S608 - our own queries
                " JOIN reports r ON r.report_id = w.report_id GROUP BY w.partner"
            )
            for partner, count, oldest in rows:
                entry = result.setdefault(
                    partner,
                    {"unacked": 0, "resend": 0, "awaiting_key": 0, "oldest_accepted_at": oldest},
                )
                entry[name] = int(count)
                entry["oldest_accepted_at"] = min(entry["oldest_accepted_at"], oldest)
        return dict(sorted(result.items()))

    def outbox_oldest(self) -> dict[str, float]:
        """Per partner, the oldest acceptance time (epoch s) of a report waiting for it.

        Envelopes waiting for the hub's ack and sent ones queued to be signed again;
        not those awaiting the partner's key, which may wait for weeks by design.
        """
        waiting = " UNION ALL ".join(_WAITING.values())
        rows = self._read(
            f"SELECT w.partner, min(r.accepted_at) FROM ({waiting}) w"  # noqa: S608 - our own queries
            " JOIN reports r ON r.report_id = w.report_id GROUP BY w.partner"
        )
        return {str(partner): float(oldest) for partner, oldest in rows}

    def sent_to(self, partner: str) -> int:
        """How many envelopes the hub acknowledged for ``partner``."""
        rows = self._read(
            "SELECT count(*) FROM outbox WHERE partner = ? AND state = 'sent'", (partner,)
        )
        return int(rows[0][0])

    # --- signing again (``msmt node resend``, stale pending envelopes) --------

    def queue_stale(self, issued_before: float, issued_after: float = math.inf) -> int:
        """Queue pending envelopes signed before ``issued_before`` to be signed again.

        A partner refuses an envelope older than its freshness window, so one left
        pending that long (the hub unreachable) would be lost if published as it is.
        So is one signed after ``issued_after``: in the future, by a clock that ran
        ahead and has been set right since. Returns how many were queued. Rows
        planned before the outbox recorded ``iat`` are left alone.
        """
        stale = (
            "FROM outbox WHERE state = 'pending'"
            " AND (json_extract(audit, '$.iat') < ? OR json_extract(audit, '$.iat') > ?)"
        )
        bounds = (issued_before, issued_after)
        # Read first: the node asks every minute, and an empty answer needs no commit.
        if not self._read(f"SELECT 1 {stale} LIMIT 1", bounds):
            return 0
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO reissue(report_id, partner, reason)"
                f" SELECT report_id, partner, 'stale' {stale}",
                bounds,
            )
            return int(cur.rowcount)

    def queue_resend(
        self,
        partner: str,
        *,
        sent_from: float | None = None,
        sent_until: float | None = None,
        report_ids: Sequence[str] = (),
    ) -> tuple[int, list[str]]:
        """Queue envelopes to ``partner`` to be signed again and sent again.

        Chosen by when the hub acknowledged them (``sent_from <= sent_at <
        sent_until``), or by report id (pending ones too). Returns how many of
        those chosen are queued now (including any queued before) and which of
        ``report_ids`` have no envelope to ``partner`` here.
        """
        chosen: list[tuple[str, str]] = []
        missing = []
        with self._tx() as db:
            if sent_from is not None:
                chosen += db.execute(
                    "SELECT report_id, partner FROM outbox"
                    " WHERE partner = ? AND state = 'sent' AND sent_at >= ? AND sent_at < ?",
                    (partner, sent_from, math.inf if sent_until is None else sent_until),
                ).fetchall()
            for report_id in report_ids:
                row = db.execute(
                    "SELECT report_id, partner FROM outbox WHERE report_id = ? AND partner = ?",
                    (report_id, partner),
                ).fetchone()
                if row is None:
                    missing.append(report_id)
                else:
                    chosen.append(row)
            db.executemany(
                "INSERT OR IGNORE INTO reissue(report_id, partner, reason)"
                " VALUES (?, ?, 'operator')",
                chosen,
            )
        return len(set(chosen)), missing

    def reissues(self, limit: int) -> list[tuple[str, bytes, tuple[str, ...]]]:
        """Up to ``limit`` queued reports to sign again: (id, record, partners), oldest first."""
        return self._queued("reissue", limit)

    def reissue_count(self) -> int:
        """How many envelopes wait to be signed again."""
        return int(self._read("SELECT count(*) FROM reissue")[0][0])

    def reissued(
        self, plans: Mapping[str, Sequence[OutboxItem]], wanted: Mapping[str, Sequence[str]]
    ) -> list[tuple[str, str]]:
        """Put new envelopes in place of the queued ones, atomically; dequeue them.

        ``plans`` are the reports planned again (``Planner.plan``), ``wanted`` the
        partners queued for each. A new envelope replaces the row's bytes and
        makes it pending again. Returns the (report, partner) pairs the current
        policy no longer releases anything to: their rows are left as they were
        if sent, and dropped if still pending, so they never go out.
        """
        withheld: list[tuple[str, str]] = []
        with self._tx() as db:
            for report_id, partners in wanted.items():
                items = {i.partner: i for i in plans.get(report_id, ())}
                for partner in partners:
                    item = items.get(partner)
                    if item is None:
                        withheld.append((report_id, partner))
                        db.execute(
                            "DELETE FROM outbox WHERE report_id = ? AND partner = ?"
                            " AND state = 'pending'",
                            (report_id, partner),
                        )
                    else:
                        db.execute(
                            "UPDATE outbox SET subject = ?, jwe = ?, audit = ?,"
                            " state = 'pending', sent_at = NULL"
                            " WHERE report_id = ? AND partner = ?",
                            (item.subject, item.jwe, item.audit, report_id, partner),
                        )
                    db.execute(
                        "DELETE FROM reissue WHERE report_id = ? AND partner = ?",
                        (report_id, partner),
                    )
        return withheld

    # --- inbox and replay seen-set -----------------------------------------

    def seen_state(self, sender: str, jti: str, jwe_sha256: str) -> SeenState:
        """Classify a verified message: new, a redelivery of what we stored, or a replay.

        A redelivery (same sender, id and exact JWE) happens after a crash before
        the ack and is harmless; the same id with different bytes is a replay.
        """
        # One statement, not one per table: it runs for every message received.
        # The seen-set answers first; the inbox covers ids it has already pruned.
        rows = self._read(
            "SELECT jwe_sha256, 0 AS pick FROM seen WHERE sender = ? AND jti = ?"
            " UNION ALL SELECT jwe_sha256, 1 FROM inbox WHERE sender = ? AND report_id = ?"
            " ORDER BY pick LIMIT 1",
            (sender, jti, sender, jti),
        )
        if not rows:
            return "new"
        return "redelivered" if rows[0][0] == jwe_sha256 else "replay"

    def seen_before(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """For each ``(sender, jti)``, whether ``seen_state`` would not call it new.

        One statement for a whole batch (the receiver's replay step) instead of
        one ``seen_state`` per message; the answer is the same: the jti is in the
        seen-set or, once pruned from it, in the inbox.
        """
        if not pairs:
            return []
        asked = [(i, sender, jti) for i, (sender, jti) in enumerate(pairs)]
        found = {int(row[0]) for row in self._lookup(_SEEN_BEFORE_SQL, "(?, ?, ?)", asked)}
        return [index in found for index in range(len(pairs))]

    def has_report(self, report_id: str) -> bool:
        """Whether a feed's report with this id was accepted."""
        return bool(self._read("SELECT 1 FROM reports WHERE report_id = ?", (report_id,)))

    def has_envelope(self, report_id: str, partner: str) -> bool:
        """Whether the outbox holds (pending or sent) this report's envelope for ``partner``."""
        return bool(
            self._read(
                "SELECT 1 FROM outbox WHERE report_id = ? AND partner = ?", (report_id, partner)
            )
        )

    def has_received(self, sender: str, jwe_sha256: str) -> bool:
        """Whether these exact envelope bytes from ``sender`` were verified and stored before."""
        rows = self._read(
            "SELECT 1 FROM inbox WHERE jwe_sha256 = ? AND sender = ? LIMIT 1", (jwe_sha256, sender)
        )
        return bool(rows)

    def received_digests(self, pairs: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of these ``(sender, JWE hash)`` pairs were verified and stored before.

        ``has_received`` for a whole batch in one indexed query, so a receiver
        pays one lookup per batch, not per message.
        """
        wanted = set(pairs)
        if not wanted:
            return set()
        digests = [(digest,) for digest in {digest for _, digest in wanted}]
        rows = self._lookup(_RECEIVED_DIGESTS_SQL, "?", digests)
        return {(str(sender), str(digest)) for sender, digest in rows} & wanted

    def store_received(self, batch: Sequence[Received], now: float | None = None) -> list[bool]:
        """Store verified reports and their seen-set entries; True per report newly stored."""
        at = time.time() if now is None else now
        out: list[bool] = []
        with self._tx() as db:
            for rec in batch:
                cur = db.execute(
                    "INSERT OR IGNORE INTO inbox(sender, originator, report_id, kind, tlp, rel_to,"
                    " iat, received_at, fields, paths, jwe_sha256, jwe, signing_kid)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rec.sender,
                        rec.originator,
                        rec.report_id,
                        rec.kind,
                        rec.tlp,
                        None if rec.rel_to is None else json.dumps(list(rec.rel_to)),
                        rec.iat,
                        at,
                        _SORTED_JSON(rec.fields),
                        json.dumps(list(rec.paths)),
                        rec.jwe_sha256,
                        rec.jwe,
                        rec.signing_kid,
                    ),
                )
                db.execute(
                    "INSERT OR IGNORE INTO seen(sender, jti, jwe_sha256, expires_at)"
                    " VALUES (?, ?, ?, ?)",
                    (rec.sender, rec.report_id, rec.jwe_sha256, rec.expires_at),
                )
                out.append(cur.rowcount == 1)
        return out

    def prune_seen(self, now: float | None = None) -> int:
        """Drop seen-set entries past their freshness window; return how many."""
        at = time.time() if now is None else now
        with self._tx() as db:
            return int(db.execute("DELETE FROM seen WHERE expires_at < ?", (at,)).rowcount)

    def seen_count(self) -> int:
        """Entries in the replay seen-set."""
        return int(self._read("SELECT count(*) FROM seen")[0][0])

    def inbox(
        self, *, sender: str | None = None, since: float | None = None, limit: int | None = 100
    ) -> list[InboxEntry]:
        """Received reports, newest first: from one sender, received at or after ``since``."""
        where: list[str] = []
        args: list[Any] = []
        if sender is not None:
            where.append("sender = ?")
            args.append(sender)
        if since is not None:
            where.append("received_at >= ?")
            args.append(since)
        sql = self._inbox_select()
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY received_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return self._entries(self._read(sql, args))

    def inbox_entry(self, report_id: str) -> list[InboxEntry]:
        """Every stored copy of ``report_id`` (one per sender that sent it)."""
        rows = self._read(
            self._inbox_select() + " WHERE report_id = ?",
            (report_id,),
        )
        return self._entries(rows)

    def _inbox_select(self) -> str:
        # A store from before nodes recorded signing keys, opened read-only, has no
        # column yet: its rows read as NULL, as the upgrade leaves them.
        if self._has_kid is None:
            self._has_kid = any(
                row[1] == "signing_kid" for row in self._read("PRAGMA table_info(inbox)")
            )
        return _INBOX_COLUMNS.format(kid="signing_kid" if self._has_kid else "NULL")

    def _entries(self, rows: Iterable[Sequence[Any]]) -> list[InboxEntry]:
        out: list[InboxEntry] = []
        for row in rows:
            try:
                out.append(_entry(row))
            except _DamagedRowError as exc:
                # Named by rowid: the report id itself may be what was damaged.
                raise StoreError(
                    f"store {self.path}: inbox row {row[-1]} is damaged ({exc});"
                    " restore the store from a backup"
                ) from None
        return out

    def inbox_rows(self, batch: int = 1000) -> Iterator[InboxEntry | str]:
        """Every received report, oldest first; a damaged row as what is wrong with it.

        For ``msmt inbox check``, which reports every row at fault instead of stopping
        at the first, as the readers that rely on the rows do. Read ``batch`` rows at a
        time, up to the last row there when called (a running node adds more): all at
        once took 1.48 GB at 100,000 rows (a long-life trial).
        """
        first, last = self._read("SELECT min(rowid), max(rowid) FROM inbox")[0]
        select = self._inbox_select() + " WHERE rowid >= ? AND rowid <= ? ORDER BY rowid LIMIT ?"
        after = None if first is None else int(first)
        while after is not None:
            rows = self._read(select, (after, last, batch))
            for row in rows:
                try:
                    yield _entry(row)
                except _DamagedRowError as exc:
                    yield f"inbox row {row[-1]} is damaged ({exc})"
            after = int(rows[-1][-1]) + 1 if len(rows) == batch else None

    def kept_envelope(self, sender: str, report_id: str) -> str | None:
        """The envelope of a received report as it arrived, or None.

        None for a report received before nodes kept envelopes, or not received.
        """
        # A store from before nodes kept envelopes, opened read-only, has no column yet;
        # asked once, since ``msmt inbox check`` calls this for every row.
        if self._has_jwe is None:
            self._has_jwe = any(row[1] == "jwe" for row in self._read("PRAGMA table_info(inbox)"))
        if not self._has_jwe:
            return None
        rows = self._read(
            "SELECT jwe FROM inbox WHERE sender = ? AND report_id = ?", (sender, report_id)
        )
        return None if not rows or rows[0][0] is None else str(rows[0][0])

    def check_pages(self) -> None:
        """Read every page (SQLite's ``quick_check``); raise ``StoreDamagedError`` at damage.

        Queries read only the pages they need, so a damaged page (a bad backup, a
        failing disk) can hide until one reaches it. Seconds for a large store,
        which is why only ``msmt node check`` asks.
        """
        try:
            found = page_damage(self._db)
        except sqlite3.OperationalError as exc:  # locked, I/O: says nothing of the pages
            raise StoreError(f"store {self.path}: {sqlite_reason(exc)}") from None
        if found:
            raise StoreDamagedError(
                f"store {self.path} is damaged: {found}; restore it from a backup"
                " (docs/DEPLOY.md, 'Backing up and restoring a node')"
            )

    def holds_reports(self) -> bool:
        """Whether any report was ever accepted or received here."""
        rows = self._read("SELECT EXISTS (SELECT 1 FROM reports) OR EXISTS (SELECT 1 FROM inbox)")
        return bool(rows[0][0])

    def inbox_count(self, sender: str | None = None) -> int:
        """How many reports are stored, optionally from one sender."""
        if sender is None:
            return int(self._read("SELECT count(*) FROM inbox")[0][0])
        return int(self._read("SELECT count(*) FROM inbox WHERE sender = ?", (sender,))[0][0])

    # --- counters and state -------------------------------------------------

    def bump(self, deltas: Mapping[str, int]) -> None:
        """Add to named counters (kept across restarts for ``msmt status``)."""
        self.record_status(deltas, {})

    def counters(self) -> dict[str, int]:
        """All counters by name."""
        return {r[0]: int(r[1]) for r in self._read("SELECT name, value FROM counters")}

    def set_state(self, values: Mapping[str, str]) -> None:
        """Record status facts (connection, last error, inbox lag)."""
        self.record_status({}, values)

    def record_status(self, deltas: Mapping[str, int], values: Mapping[str, str]) -> None:
        """``bump`` and ``set_state`` in one transaction (one fsync for the node's housekeeping)."""
        if not deltas and not values:
            return
        with self._tx() as db:
            db.executemany(
                "INSERT INTO counters(name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                list(deltas.items()),
            )
            db.executemany(
                "INSERT INTO state(key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    def writable(self) -> bool:
        """Whether a small write commits now (a full disk may have room again)."""
        try:
            self.set_state({"write_checked_at": str(int(time.time()))})
        except StoreError:
            return False
        return True

    def state(self) -> dict[str, str]:
        """All status facts by key."""
        return {r[0]: r[1] for r in self._read("SELECT key, value FROM state")}


_WAITING: Final = {
    "unacked": "SELECT partner, report_id FROM outbox WHERE state = 'pending'",
    # Driven from reissue (empty, or a few rows) into outbox by its key: as a join,
    # SQLite scanned every envelope ever sent (``outbox_depths``).
    "resend": "SELECT q.partner, q.report_id FROM reissue q WHERE EXISTS (SELECT 1 FROM"
    " outbox o WHERE o.report_id = q.report_id AND o.partner = q.partner AND o.state = 'sent')",
}
"""(partner, report) of each envelope waiting to go out: for the hub's ack, or to be
signed again. ``outbox_by_partner`` counts each; ``outbox_oldest`` takes both."""

_INBOX_COLUMNS: Final = (
    "SELECT sender, originator, report_id, kind, tlp, rel_to, iat, received_at, fields, paths,"
    " jwe_sha256, {kid}, rowid FROM inbox"
)


class _DamagedRowError(Exception):
    """An inbox row that the receiver cannot have written; the message names the column."""


def _entry(row: Sequence[Any]) -> InboxEntry:
    # The receiver wrote these columns from verified values; a row that reads otherwise
    # was damaged on disk or by hand. The error names the column, never its content.
    rel_to = None if row[5] is None else _json_column(row[5], list, "rel_to")
    paths = _json_column(row[9], list, "paths")
    for name, value in (("rel_to", rel_to or []), ("paths", paths)):
        if not all(isinstance(item, str) for item in value):
            raise _DamagedRowError(f"its {name} column is not a list of names")
    if not all(isinstance(row[i], str) for i in (0, 1, 2, 3, 4, 10)) or not (
        row[11] is None or isinstance(row[11], str)
    ):
        raise _DamagedRowError("a text column holds bytes or a number")
    return InboxEntry(
        sender=row[0],
        originator=row[1],
        report_id=row[2],
        kind=row[3],
        tlp=row[4],
        rel_to=None if rel_to is None else tuple(rel_to),
        iat=_time_column(row[6], "iat"),
        received_at=_time_column(row[7], "received_at"),
        fields=_json_column(row[8], dict, "fields"),
        paths=tuple(paths),
        jwe_sha256=row[10],
        signing_kid=row[11],
    )


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.dumps never repeats a member: a repeated one was written by another hand,
    # and SQLite's JSON functions would read its first value where Python reads the last.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DamagedRowError("a member appears twice")
    return out


def _json_column(text: Any, kind: type[Any], name: str) -> Any:
    try:
        value = json.loads(text, object_pairs_hook=_unique)
    except _DamagedRowError:
        raise _DamagedRowError(f"its {name} column repeats a member") from None
    except (TypeError, ValueError):
        raise _DamagedRowError(f"its {name} column is not JSON") from None
    if not isinstance(value, kind):
        raise _DamagedRowError(
            f"its {name} column is not a JSON {'object' if kind is dict else 'array'}"
        )
    return value


def _time_column(value: Any, name: str) -> float:
    # A time every reader can turn into a datetime (years 1 to 9999).
    if isinstance(value, int | float) and not isinstance(value, bool):
        with suppress(OverflowError, OSError, ValueError):
            datetime.fromtimestamp(value, UTC)
            return float(value)
    raise _DamagedRowError(f"its {name} column is not a time")
