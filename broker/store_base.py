"""The node's store file as every part of it uses it: open, write, read, status.

``StoreBase`` opens the SQLite file (WAL, ``synchronous=FULL``, the writer's lock),
runs each write as one transaction that also records the audit log's size, reads
at one moment (``snapshot``), and keeps the counters and status facts ``msmt
status`` shows. ``broker.store_outbox`` and ``broker.store_inbox`` add the tables
of what this node sends and what it receives; ``broker.store.Store`` is both.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Final, NoReturn

from broker.errors import (
    StoreDamagedError,
    StoreError,
    sqlite_reason,
)
from broker.files import not_a_file, sqlite_open_reason
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
_LOOKUP_ROWS: Final = 256
"""Rows one batch lookup binds at most: at 3 parameters a row, within SQLite's smallest
default limit of parameters per statement (999, before SQLite 3.32)."""


class StoreBase:
    """What the parts of the node's store share: the open file, transactions, reads, status.

    ``broker.store.Store`` is the whole store, with ``OutboxTables`` and ``InboxTables``.

    ``max_pages`` caps the file (SQLite ``max_page_count``); past it, writes fail
    exactly as on a full disk, which lets an operator bound the store and lets
    tests exercise the disk-full path. Raises ``StoreError`` when the file
    cannot be opened or written.
    """

    def __init__(self, path: Path, *, readonly: bool = False, max_pages: int | None = None) -> None:
        self.path = path
        self.audit_size: Callable[[], int] | None = None
        """The node's audit log size: once set, every write records it (``AUDIT_SIZE``)."""
        # When (monotonic) and why each kind of write (``_tx``'s ``op``) last failed,
        # until that kind commits: see ``write_failed``.
        self._failures: dict[str, tuple[float, str]] = {}
        self._lock: int | None = None
        # Reports whose ``accepted`` entries the log holds, confirmed by the next
        # write (``mark_audited_later``); dropped once a write committed them.
        self._audited_later: list[str] = []
        # Status values to record with the next write that commits (``set_state_later``).
        self._state_later: dict[str, str] = {}
        try:
            with suppress(FileNotFoundError):
                mode = os.stat(path).st_mode
                if not stat.S_ISREG(mode):  # SQLite's open blocks on a FIFO
                    # A directory (a restore that copied the store as a folder): what
                    # to do, as no other check has said it.
                    advice = (
                        ": nothing was changed; move it aside, or put the store there from"
                        " its backup (docs/DEPLOY.md, 'Backing up and restoring a node')"
                        if stat.S_ISDIR(mode)
                        else ""
                    )
                    raise StoreDamagedError(
                        f"store {path} is {not_a_file(mode, 'the store file')}{advice}"
                    )
            if readonly:
                self._db = sqlite3.connect(
                    f"{path.absolute().as_uri()}?mode=ro",
                    uri=True,
                    isolation_level=None,
                    timeout=10,
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
                why = sqlite_open_reason(path, exc, writer=not readonly)
                raise StoreError(f"cannot open store {path}: {why}") from None
            raise StoreDamagedError(
                f"store {path} is damaged or not a node store: {exc}; restore it from a backup"
                " (docs/DEPLOY.md, 'Backing up and restoring a node')"
            ) from None
        except (sqlite3.Error, OSError) as exc:
            self._unlock()
            why = sqlite_open_reason(path, exc, writer=not readonly)
            raise StoreError(f"cannot open store {path}: {why}") from None
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
    def _tx(self, op: str) -> Iterator[sqlite3.Connection]:
        # ``op`` names the kind of write (its method): see ``write_failed``.
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                later = dict(self._state_later)
                if later:
                    # First, so that what the write itself records supersedes it.
                    self._db.executemany(
                        "INSERT INTO state(key, value) VALUES (?, ?)"
                        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        list(later.items()),
                    )
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
                self._failures.pop(op, None)
                if marks:
                    self._audited_later = []
                for key, value in later.items():
                    if self._state_later.get(key) == value:
                        del self._state_later[key]
            except BaseException:
                # SQLite may already have rolled back itself (SQLITE_FULL does).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            self._failed(op, f"store {self.path.name}: {exc}")
        except sqlite3.DatabaseError as exc:
            self._failed(op, f"store {self.path.name} is damaged: {exc}")

    def _failed(self, op: str, why: str) -> NoReturn:
        # Each kind apart: a batch that failed, then a status write that failed, then
        # a probe that committed, must leave the batch's failure standing (a review).
        self._failures[op] = (time.monotonic(), why)
        raise StoreError(why) from None

    @property
    def write_failed(self) -> tuple[float, str] | None:
        """When (monotonic) and why the latest write failed whose kind has not committed since.

        Only the kind of write that failed clears it (``_tx``'s ``op``): another may be
        small, and commit on a disk still too full for the batch that failed (a
        full-disk trial: ``/readyz`` back to ready between a receiver's failing batches,
        10 samples in 77, at each status write; a review: at each envelope marked sent).
        """
        return max(self._failures.values(), default=None)

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

    def set_state_later(self, values: Mapping[str, str]) -> None:
        """Record these status values with the next write of any kind that commits.

        For a fact that must be in the store before a write records the log's size
        past the entries it is about (``AUDIT_SIZE``), when the write that failed was
        the store's own (a full store): the next that commits carries it.
        """
        self._state_later.update(values)

    def record_status(self, deltas: Mapping[str, int], values: Mapping[str, str]) -> None:
        """``bump`` and ``set_state`` in one transaction (one fsync for the node's housekeeping)."""
        if not deltas and not values:
            return
        with self._tx("status") as db:
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
