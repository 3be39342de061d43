"""The node store's file: its schema and format, the writer's lock, and the checks at open.

``broker.store`` keeps the data; this module says what a store file is: the tables a
store has (``SCHEMA``), the format this build writes and the newest it reads
(``STORE_FORMAT``), the columns an older store gains at a writer's open, the lock that
keeps a second node off a data directory, and the checks that refuse a file that is
not a store or is in a newer format.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import sqlite3
import stat
import time
from pathlib import Path
from typing import Final

from broker.errors import StoreDamagedError, StoreError, StoreTooNewError, UsageError
from broker.files import holds_nothing, not_a_file

KEPT_SINCE: Final = "envelopes_kept_since"
"""The ``state`` key holding when a store from before envelopes were kept gained them.

Absent in a store created since: every report in it has its envelope.
"""


STORE_FORMAT: Final = 1
"""The store format this build writes (SQLite ``user_version``), raised whenever a newer
build adds what an older one would not keep. A store in a newer format is refused, read
or written: a rolled-back build would drop what it does not know. Stores from before the
stamp read as 0 and are brought up to date at a writer's open."""


PAGE_SIZE: Final = 16384
"""SQLite page size of a new store, in bytes; an existing store keeps its own."""
WAL_LIMIT: Final = 32 * 1024 * 1024
"""Bytes a store's or audit log's ``-wal`` file is cut back to once its frames are copied.

A long read (``msmt inbox check``, the audit tools) holds back SQLite's checkpoints
while the node writes on, and the WAL grows by all it writes meanwhile (a race trial:
17 to 83 MB for one ``inbox check``, 52 to 345 MB under two loops of them); without a
limit SQLite reuses the file but never shrinks it, so it stayed that size for good.
Twice the 16 MB it levels off at otherwise (docs/DEPLOY.md), so a running node never
truncates it in the ordinary way of things."""


SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS reports (
    report_id   TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    accepted_at REAL NOT NULL,
    record      BLOB NOT NULL,
    planned     INTEGER NOT NULL DEFAULT 0,
    audited     INTEGER NOT NULL DEFAULT 0,
    feed        TEXT
);
CREATE INDEX IF NOT EXISTS reports_unaudited ON reports(audited) WHERE audited = 0;
CREATE INDEX IF NOT EXISTS reports_unplanned ON reports(planned) WHERE planned = 0;
CREATE TABLE IF NOT EXISTS outbox (
    report_id  TEXT NOT NULL,
    partner    TEXT NOT NULL,
    subject    TEXT NOT NULL,
    jwe        BLOB NOT NULL,
    audit      TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'sent')),
    sent_at    REAL,
    PRIMARY KEY (report_id, partner)
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(state) WHERE state = 'pending';
-- A partner's pending envelopes in order, for a look past the partners held back
-- (``Store.pending``'s ``held``): a full inbox's backlog is not read through each time.
CREATE INDEX IF NOT EXISTS outbox_pending_partner ON outbox(partner, state) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS reissue (
    report_id  TEXT NOT NULL,
    partner    TEXT NOT NULL,
    reason     TEXT NOT NULL CHECK (reason IN ('stale', 'operator')),
    PRIMARY KEY (report_id, partner)
);
CREATE TABLE IF NOT EXISTS awaiting_key (
    report_id  TEXT NOT NULL,
    partner    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    PRIMARY KEY (report_id, partner)
);
CREATE TABLE IF NOT EXISTS inbox (
    sender      TEXT NOT NULL,
    originator  TEXT NOT NULL,
    report_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    received_at REAL NOT NULL,
    tlp         TEXT NOT NULL,
    rel_to      TEXT,
    iat         REAL NOT NULL,
    fields      TEXT NOT NULL,
    paths       TEXT NOT NULL,
    jwe_sha256  TEXT NOT NULL,
    jwe         TEXT,
    signing_kid TEXT,
    PRIMARY KEY (sender, report_id)
);
CREATE INDEX IF NOT EXISTS inbox_jwe ON inbox(jwe_sha256);
-- inbox list (newest first), export --since, and inbox show or evidence by report id:
-- each scanned the whole table, envelopes and all (a long-life trial: 0.5 s and
-- 0.2 s warm at 100,000 reports, a read of 0.8 GB cold).
CREATE INDEX IF NOT EXISTS inbox_received ON inbox(received_at);
CREATE INDEX IF NOT EXISTS inbox_report ON inbox(report_id);
CREATE TABLE IF NOT EXISTS seen (
    sender     TEXT NOT NULL,
    jti        TEXT NOT NULL,
    jwe_sha256 TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (sender, jti)
);
CREATE INDEX IF NOT EXISTS seen_expiry ON seen(expires_at);
-- What each sender's stored envelopes took, by UTC day (YYYY-MM-DD): the receiver's
-- per-sender budget (limits.sender_bytes_per_day), carried across restarts.
CREATE TABLE IF NOT EXISTS sender_bytes (
    sender TEXT NOT NULL,
    day    TEXT NOT NULL,
    bytes  INTEGER NOT NULL,
    PRIMARY KEY (sender, day)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def lock_writer(path: Path) -> int:
    """Hold ``<store>.lock`` exclusively while this process writes the store.

    Two nodes on one data directory would each take the other's feed socket and
    audit log; the second is refused here, before it opens anything. The kernel
    drops the lock with the process, so a crash leaves nothing to clean up.
    """
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(
            f"store {path} is in use by another process (pid {holder}): "
            "is a node already running on this data directory?"
        ) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def writer_pid(path: Path, locks: Path = Path("/proc/locks")) -> int | None:
    """The pid of the process that holds ``<store>.lock`` (a running node), or ``None``.

    Read from the kernel's table of locks (Linux ``/proc/locks``), so asking takes
    no lock: a probe that took one, even for a moment, could refuse a node
    starting just then. 0 means held by a process whose pid is not visible here
    (another pid namespace). Raises ``OSError`` if the table cannot be read.
    """
    lock = path.with_name(path.name + ".lock")
    try:
        os.stat(lock)
    except FileNotFoundError:
        return None
    return flock_holder(lock, locks)


def flock_holder(path: Path, locks: Path = Path("/proc/locks")) -> int | None:
    """The pid of the process holding an ``flock`` on ``path`` (a file or a directory), or ``None``.

    As ``writer_pid``: read from ``/proc/locks``, 0 for a pid not visible here.
    Raises ``OSError`` if ``path`` or the table cannot be read.
    """
    held = os.stat(path)
    # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:56789 0 EOF": pid, then MAJOR:MINOR:INODE
    # with the device numbers in hex.
    device = f"{os.major(held.st_dev):02x}:{os.minor(held.st_dev):02x}:{held.st_ino}"
    for line in locks.read_text(encoding="ascii", errors="replace").splitlines():
        fields = line.split()
        if "->" in fields:  # a process waiting for the lock, not holding it
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
            return int(fields[4]) if fields[4].isdecimal() else 0
    return None


def require_store(path: Path) -> None:
    """Raise ``UsageError`` (one line) unless the node store at ``path`` exists and can be reached.

    ``Path.exists`` raises, rather than answers, when a directory on the way may not
    be searched (another user's 0700 data directory): that is said here as one line.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        # The likeliest cause on a deployed node: its unit sets MSMT_DATA_DIR, this
        # shell does not, so node.toml's own data_dir was read.
        raise UsageError(
            f"no node store at {path}: no node has run on this data_dir yet (if the node runs"
            " with MSMT_DATA_DIR or other MSMT_* variables set, as a systemd unit's"
            " Environment= does, run this command with the same ones)"
        ) from None
    except OSError as exc:
        hint = " (run this as the node's user)" if exc.errno == errno.EACCES else ""
        raise UsageError(f"cannot reach the node store at {path}: {exc.strerror}{hint}") from None
    if not stat.S_ISREG(mode):
        # SQLite opens a FIFO without O_NONBLOCK: the command waited for a writer.
        raise UsageError(f"the node store {path} is {not_a_file(mode, 'the store file')}")


STORE_TABLES: Final = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))
"""Every table of a store; one made by an older version has some of them."""


def refuse_foreign(path: Path) -> None:
    """Raise ``StoreDamagedError`` if ``path`` holds tables, none of them a store's; write nothing.

    Checked read-only, before the writer opens it: a read-write connection writes
    the ``-wal`` file beside the database into it when it closes, and another
    database's ``-wal`` put there overwrote the store's pages (the reports it had
    accepted) before anything found them missing. A new or empty file passes.
    """
    if holds_nothing(path):
        return
    db = sqlite3.connect(
        f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=10
    )
    try:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    finally:
        db.close()
    tables = {name for (name,) in rows}
    if tables and tables.isdisjoint(STORE_TABLES):
        raise StoreDamagedError(
            f"store {path} is not a node store (it has none of a store's tables; SQLite"
            " reads a -wal file beside it as part of it): restore it from a backup"
            " (docs/DEPLOY.md, 'Backing up and restoring a node')"
        )


def page_damage(db: sqlite3.Connection) -> str:
    """What SQLite's ``quick_check`` finds wrong with every page of ``db`` ("" if nothing).

    Raises ``sqlite3.OperationalError`` (locked, I/O) for the caller to word.
    """
    try:
        found = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError as exc:  # so damaged the check itself stops
        found = [str(exc)]
    if found == ["ok"]:
        return ""
    return found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")


def check_format(db: sqlite3.Connection, path: Path) -> None:
    """Raise ``StoreTooNewError`` (closing ``db``) for a store in a newer format than ours."""
    # A build rolled back onto a store a newer one wrote would misread it: builds
    # before the stamp stored received reports without the envelopes this one keeps,
    # and msmt inbox check then called each of them tampered (an upgrade trial).
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > STORE_FORMAT:
        db.close()
        # Exit 2 at a node's start: a restart of this build cannot mend it, and the
        # sample unit restarted it every 2 s (a docs review).
        raise StoreTooNewError(
            f"store {path} is in format {found}, written by a newer msmt; this one reads up "
            f"to format {STORE_FORMAT}: run the newer version again (docs/DEPLOY.md, "
            "'Upgrading a node', says what restoring the backup would cost)"
        )


def create_schema(db: sqlite3.Connection, script: str) -> None:
    """Run ``script`` (``CREATE ... IF NOT EXISTS`` statements) as one transaction."""
    # executescript commits what is pending, then runs each statement on its own
    # unless the script itself opens a transaction.
    try:
        db.executescript(f"BEGIN IMMEDIATE;\n{script}\nCOMMIT;")
    except sqlite3.Error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def add_missing_columns(db: sqlite3.Connection) -> None:
    """Add the columns a store from an older version lacks (a writer's open)."""
    # A store made before a column was added gets it, empty for the rows it holds.
    if "feed" not in {str(row[1]) for row in db.execute("PRAGMA table_info(reports)")}:
        # Reports accepted before it stay NULL, their feed unknown: a conflict under
        # their ids names no fields to anyone (broker.intake). The format stays 1: an
        # older build writes NULL here too, which only makes its answers terser.
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ALTER TABLE reports ADD COLUMN feed TEXT")
    have = {str(row[1]) for row in db.execute("PRAGMA table_info(inbox)")}
    if "jwe" not in have:
        # One transaction: the moment recorded is the moment envelopes began to be kept,
        # so that ``msmt inbox check`` can tell an old report from an envelope removed.
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ALTER TABLE inbox ADD COLUMN jwe TEXT")
            db.execute(
                "INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                (KEPT_SINCE, repr(time.time())),
            )
    if "signing_kid" not in have:
        # Rows received before it stay NULL: ``msmt inbox check`` re-verifies those.
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ALTER TABLE inbox ADD COLUMN signing_kid TEXT")
