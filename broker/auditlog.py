"""The node's audit log store: append-only RFC 6962 entries and signed checkpoints in SQLite.

Layout: ``<datadir>/audit.sqlite`` (WAL, ``synchronous=FULL``), tables

* ``meta(key, value)``: ``format`` and ``origin`` (the member trigraph);
* ``entries(idx, entry)``: the RFC 8785 entry bytes, ``idx`` = position = ``seq``;
* ``edge(id, size, nodes, last_leaf)``: the compact range (right edge) of the tree
  and the last leaf hash, so an append costs O(1) hashes amortised and opening
  the log never rehashes it;
* ``checkpoints(size, note)``: every signed checkpoint, with the witnesses'
  cosignature lines merged into the note as they arrive.

``append_many`` writes a batch of entries, the new edge and a freshly signed
checkpoint in one transaction, and returns only after the commit is on disk:
the caller may then acknowledge the actions the entries record. Because entries
and their checkpoint commit together, every entry is covered by a signed root.

Opening the log checks, in O(log n), that the edge it will append to agrees
with the latest signed checkpoint and the newest entries (``AuditLog.__init__``);
``msmt audit verify`` reads this directory directly and checks every entry
(see ``broker.audit_verify``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit_events import AuditEvent
from broker.audit_scan import open_readonly
from broker.checkpoint import (
    Checkpoint,
    open_checkpoint,
    parse_body,
    sign_checkpoint,
    verify_cosignature,
)
from broker.errors import AuditError, StoreDamagedError, StoreError, UsageError
from broker.files import holds_nothing, not_a_file, sqlite_open_reason
from broker.merkle import HASH_SIZE, CompactRange, Levels, leaf_hash, node_hash
from broker.note import (
    ALG_ED25519,
    MAX_SIGNATURES,
    Note,
    NoteError,
    Verifier,
    find_signature,
    parse,
)
from broker.store_file import WAL_LIMIT, create_schema

DB_FILE: Final = "audit.sqlite"
LINES_PER_WITNESS: Final = 2
"""Cosignature lines kept per witness on one checkpoint: a key, and its successor's."""
FORMAT: Final = "msmt-audit-1"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries(idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS edge(
  id INTEGER PRIMARY KEY CHECK (id = 1), size INTEGER NOT NULL,
  nodes BLOB NOT NULL, last_leaf BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints(size INTEGER PRIMARY KEY, note TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(idx INTEGER PRIMARY KEY, root BLOB NOT NULL);
"""
# ``chunks`` holds the root of each full chunk of 2**CHUNK_BITS entries, written with
# them: the tree for proofs is rebuilt at a node's first proof after a start from these
# rows (n/256), where reading every entry took 3.2 us each on the store thread (a
# long-life trial: 4.3-5.1 s at 1.22M entries, past a witness's 3 s timeout, with the
# feeds' intake waiting behind it). Derived data, checked against the signed root when
# read; a log written before it, or by an earlier version since, is filled in then.


CHUNK_BITS: Final = 8
"""Subtrees of fewer than ``2**CHUNK_BITS`` leaves are rehashed from the log, not kept."""


def _perfect_root(leaves: list[bytes]) -> bytes:
    # MTH of a perfect subtree (a power-of-two count of leaf hashes), pairwise upward.
    level = leaves
    while len(level) > 1:
        level = [node_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


class _ChunkedTree(Levels):
    """The log's tree for proofs, holding only subtrees of ``2**CHUNK_BITS`` leaves and up.

    A full ``Levels`` keeps every leaf hash in memory, so a node's memory grew
    with its log (about 180 bytes per entry, 11 entries per report sent to 10
    partners). Here the leaves of the unfinished last chunk are kept, and any
    smaller aligned subtree a proof needs is rehashed from at most
    ``2**CHUNK_BITS - 1`` entries read back from SQLite. The proof methods are
    ``Levels``' own; only where a subtree hash comes from differs.
    """

    __slots__ = ("_read", "_tail", "_upper")

    def __init__(
        self, chunk_roots: list[bytes], tail: list[bytes], read: Callable[[int, int], list[bytes]]
    ) -> None:
        super().__init__([])
        self._upper = Levels(chunk_roots)
        self._tail = tail
        self._read = read  # (lo, hi) -> leaf hashes of entries [lo, hi)
        self.size = (len(chunk_roots) << CHUNK_BITS) + len(tail)

    def append(self, leaf: bytes) -> None:
        """Append one leaf hash; a completed chunk is folded into its root."""
        self._tail.append(leaf)
        self.size += 1
        if len(self._tail) == 1 << CHUNK_BITS:
            self._upper.append(_perfect_root(self._tail))
            self._tail = []

    def _subtree(self, level: int, index: int) -> bytes:
        if level >= CHUNK_BITS:
            above = level - CHUNK_BITS  # a subtree of whole chunks
            return self._upper.range_hash(index << above, (index + 1) << above)
        lo, hi = index << level, (index + 1) << level
        base = self.size - len(self._tail)
        leaves = self._tail[lo - base : hi - base] if lo >= base else self._read(lo, hi)
        if len(leaves) != hi - lo:
            raise AuditError(f"audit log entries [{lo}, {hi}) are missing")
        return _perfect_root(leaves)


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """Open the audit database.

    A read-only open raises ``UsageError`` if the file is missing, and
    ``AuditError`` if it is an SQLite file without an audit log's tables. Any
    open raises ``AuditError`` for a file that is not a database or is
    malformed, and ``StoreError`` when SQLite cannot open it otherwise.
    """
    try:
        if readonly:
            if not path.is_file():
                if path.is_dir():  # "no audit log" sent the operator to the wrong folder
                    raise UsageError(f"audit log {path} is a directory, where its file should be")
                raise UsageError(f"no audit log at {path} (is this a node's data directory?)")
            db = open_readonly(path)
            _check_tables(db, path)
        else:
            _refuse_foreign(path)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL syncs the WAL on every commit: an acknowledged append survives power loss.
            db.execute("PRAGMA synchronous=FULL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            # Every table at once: a reader during a node's first start saw some ("it
            # has no checkpoints table") and refused a healthy log.
            create_schema(db, _SCHEMA)
    except (sqlite3.Error, OSError) as exc:
        # OSError: a folder on the way the user may not enter fails path.is_file() (a
        # traceback from msmt audit verify).
        raise sqlite_error("cannot open", path, exc, writer=not readonly) from exc
    return db


def sqlite_error(
    doing: str, path: Path, exc: sqlite3.Error | OSError, *, writer: bool = True
) -> StoreError | AuditError:
    """SQLite's refusal as ours: the file's fault (``AuditError``) or the system's (``StoreError``).

    A file that is not a database, or a malformed one, stays so: no retry or
    restart mends it. Anything else (locked, I/O, permissions, a full disk) may pass;
    a folder or file that is not there, readable or writable is named, with why
    (``broker.files.sqlite_open_reason``).
    """
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return AuditError(f"audit log {path} is damaged or not an audit log: {exc}")
    return StoreError(f"{doing} audit log {path}: {sqlite_open_reason(path, exc, writer=writer)}")


_TABLES: Final = ("meta", "entries", "checkpoints")
"""The tables a reader needs (``edge`` serves only the node's appends)."""


def _check_tables(db: sqlite3.Connection, path: Path) -> None:
    # A zero-byte or foreign SQLite file opens fine; without this, its first query
    # fails with SQLite's bare "no such table: meta", which names neither the file
    # nor what is wrong with it.
    try:
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except BaseException:
        db.close()
        raise
    tables = {name for (name,) in rows}
    missing = [name for name in _TABLES if name not in tables]
    if missing:
        db.close()
        why = (
            "empty or not initialised" if not tables else f"it has no {' or '.join(missing)} table"
        )
        raise AuditError(f"{path} is not an {FORMAT} audit log ({why})")


def _refuse_foreign(path: Path) -> None:
    """Raise ``AuditError`` if ``path`` is no file, or holds tables but not a log's; write nothing.

    Checked read-only, before the writer opens it: a read-write connection writes
    the ``-wal`` file beside the database into it when it closes, and another
    database's ``-wal`` put there overwrote the log's pages before its tables were
    found missing. A new or empty file passes, to be made into a log.
    """
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # SQLite's open blocks on a FIFO
            raise AuditError(f"audit log {path} is {not_a_file(mode, 'its file')}")
    if holds_nothing(path):
        return
    db = open_readonly(path)
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'").fetchone():
            _check_tables(db, path)
    finally:
        db.close()


class AuditLog:
    """One member's append-only audit log in ``datadir``; the only writer of that file.

    Raises ``StoreError`` when the database cannot be read or written, and
    ``AuditError`` when the file is damaged or its stored state is inconsistent
    (not a database, another origin, or an open check of ``_read_edge``
    failing: the node must not append to it).
    ``earlier_keys`` are this member's log keys from before a key rotation
    (e.g. ``roster_log_keys``): the latest checkpoint may carry one of them
    rather than ``signer``'s.
    """

    def __init__(
        self,
        datadir: Path,
        member: str,
        signer: Ed25519PrivateKey,
        *,
        earlier_keys: Sequence[Verifier] = (),
    ) -> None:
        datadir.mkdir(parents=True, exist_ok=True)
        self.path = datadir / DB_FILE
        self.origin = member
        self._signer = signer
        # Reentrant: add_cosignatures reads through _rows while holding it.
        self._lock = threading.RLock()
        self.write_failed: tuple[float, str] | None = None
        """When (monotonic) and why the last append failed, until an append commits again."""
        self._db = connect(self.path, readonly=False)
        self._levels: Levels | None = None
        self._chunk: list[bytes] | None = None  # leaf hashes of the unfinished chunk
        self._damaged: str | None = None  # why no proof can be made from this log
        own = Verifier(member, ALG_ED25519, signer.public_key().public_bytes_raw())
        try:
            self._init_meta()
            self._edge, self._last = self._read_edge([own, *earlier_keys])
        except sqlite3.Error as exc:
            self._db.close()
            raise sqlite_error("cannot read", self.path, exc) from exc
        except _DamagedError as exc:
            self._db.close()
            raise AuditError(
                f"refusing to append to audit log {self.path}: {exc} "
                "(check it with msmt audit verify)"
            ) from None
        except BaseException:
            self._db.close()
            raise

    def _init_meta(self) -> None:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    "INSERT INTO meta VALUES (?, ?)", [("format", FORMAT), ("origin", self.origin)]
                )
            return
        if meta.get("format") != FORMAT or meta.get("origin") != self.origin:
            raise AuditError(
                f"{self.path} is a {meta.get('format')} log of {meta.get('origin')}, "
                f"not a {FORMAT} log of {self.origin}"
            )

    def _read_edge(self, keys: Sequence[Verifier]) -> tuple[CompactRange, bytes]:
        """Read the tree edge and check the log around it, in one read snapshot.

        Checklist (B-tree lookups and at most ``2**CHUNK_BITS`` entries, never a
        scan; each step raises ``_DamagedError`` with a reason that names no
        entry content):
          0. the edge row is well formed; with no edge (an empty log) there are
             no entries and no checkpoints;
          1. the latest checkpoint was stored at the edge's size (entries and
             their checkpoint commit together, so they must agree);
          2. its body parses and names this member, this size and the edge's root;
          3. it is signed by this member's log key (``keys``);
          4. entry size-1 exists, its leaf hash is the stored last leaf, it
             carries ``seq`` size-1 and its ``prev`` links to entry size-2;
             when the edge's smallest subtree holds at most ``2**CHUNK_BITS``
             leaves (all but one size in 512), those entries rehash to it, so the
             newest entries are the ones the signed root covers;
          5. entry indices run from 0 to size-1: no row beyond the edge (a
             half-applied write or an insertion) and none below 0.
        """
        db = self._db
        db.execute("BEGIN")  # a writer in another process cannot move the log mid-check
        try:
            row = db.execute("SELECT size, nodes, last_leaf FROM edge").fetchone()
            latest = db.execute(
                "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
            # Two queries: SQLite answers a lone min() or max() of the rowid with one
            # B-tree descent, but scans the whole table for both in one SELECT.
            (low,) = db.execute("SELECT min(idx) FROM entries").fetchone()
            (high,) = db.execute("SELECT max(idx) FROM entries").fetchone()
            if row is None or row[0] == 0:  # step 0: an empty log is entirely empty
                if high is not None or latest is not None:
                    raise _DamagedError("it has entries or checkpoints but no tree edge")
                return CompactRange(), b""
            edge, last = _edge_from_row(row)
            self._check_checkpoint(edge, latest, keys)  # steps 1-3
            # Step 4 reads the smallest subtree's entries, and at least the last two.
            lo = edge.size - max(_last_subtree(edge.size), min(edge.size, 2))
            query = "SELECT idx, entry FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx"
            _check_tail(edge, last, lo, db.execute(query, (lo, edge.size)).fetchall())
            if (low, high) != (0, edge.size - 1):  # step 5
                raise _DamagedError(
                    f"its entries span indices {low}..{high}, but its tree holds {edge.size} "
                    "(a half-applied write or an insertion)"
                )
            return edge, last
        finally:
            db.execute("COMMIT")

    def _check_checkpoint(
        self, edge: CompactRange, latest: tuple[Any, Any] | None, keys: Sequence[Verifier]
    ) -> None:
        # Steps 1-3 of _read_edge's checklist.
        if latest is None or latest[0] != edge.size:
            at = "none" if latest is None else f"size {latest[0]}"
            raise _DamagedError(
                f"its tree holds {edge.size} entries but its latest checkpoint is {at}"
            )
        text = latest[1]
        try:
            checkpoint = parse_body(parse(text).text) if isinstance(text, str) else None
        except NoteError as exc:
            raise _DamagedError(f"its latest checkpoint does not parse: {exc}") from None
        if checkpoint is None:
            raise _DamagedError("its latest checkpoint is not stored as text")
        if checkpoint.origin != self.origin or checkpoint.size != edge.size:
            raise _DamagedError(
                f"its latest checkpoint is for {checkpoint.origin}/{checkpoint.size}, "
                f"not {self.origin}/{edge.size}"
            )
        if checkpoint.root != edge.root():
            raise _DamagedError("its latest checkpoint's root is not the root of its tree edge")
        try:
            open_checkpoint(text, keys)
        except NoteError as exc:
            raise _DamagedError(
                f"its latest checkpoint does not verify with {self.origin}'s log keys ({exc})"
            ) from None

    @property
    def size(self) -> int:
        """The number of entries committed so far."""
        return self._edge.size

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def append(self, event: AuditEvent) -> int:
        """Append one event durably and return its index (prefer ``append_many``)."""
        return self.append_many([event])[0]

    def append_many(self, events: Sequence[AuditEvent]) -> list[int]:
        """Append a batch in one transaction, sign a checkpoint over it, and return the indices.

        The commit (entries, tree edge, checkpoint) is synced to disk before this
        returns. On any failure nothing is written and the in-memory state is
        unchanged; ``StoreError`` is raised.
        """
        if not events:
            return []
        with self._lock:
            edge = CompactRange(self._edge.size, self._edge.nodes)
            last = self._last
            start = edge.size
            rows = []
            leaves = []
            try:
                chunk = list(self._unfinished_chunk())
            except StoreError as exc:
                # A read that keeps failing fails every append: /readyz must say so.
                why = exc.__cause__ or exc
                self.write_failed = (time.monotonic(), f"cannot append to audit log: {why}")
                raise
            finished = []
            for event in events:
                data = event.seal(edge.size, last or None)
                rows.append((edge.size, data))
                last = leaf_hash(data)
                leaves.append(last)
                edge.append(last)
                chunk.append(last)
                if len(chunk) == 1 << CHUNK_BITS:
                    finished.append(((edge.size - 1) >> CHUNK_BITS, _perfect_root(chunk)))
                    chunk = []
            note = sign_checkpoint(Checkpoint(self.origin, edge.size, edge.root()), self._signer)
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    # Refuse to write if another process appended behind our back.
                    row = self._db.execute("SELECT size FROM edge").fetchone()
                    if (row[0] if row else 0) != start:
                        raise StoreError(f"audit log {self.path} was changed by another writer")
                    self._db.executemany("INSERT INTO entries VALUES (?, ?)", rows)
                    self._db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?)", finished)
                    self._db.execute(
                        "INSERT OR REPLACE INTO edge VALUES (1, ?, ?, ?)",
                        (edge.size, b"".join(edge.nodes), last),
                    )
                    self._db.execute(
                        "INSERT INTO checkpoints VALUES (?, ?)", (edge.size, note.render())
                    )
            except sqlite3.Error as exc:
                self.write_failed = (time.monotonic(), f"cannot append to audit log: {exc}")
                raise StoreError(f"cannot append to audit log {self.path}: {exc}") from exc
            self.write_failed = None
            self._edge, self._last, self._chunk = edge, last, chunk
            if self._levels is not None:
                for leaf in leaves:
                    self._levels.append(leaf)
            return list(range(start, edge.size))

    def latest_checkpoint(self) -> str | None:
        """Return the latest signed checkpoint note (with cosignatures), or ``None`` if empty."""
        rows = self._rows("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1")
        return str(rows[0][0]) if rows else None

    def checkpoint_sizes(self, after: int) -> list[int]:
        """The sizes of the stored checkpoints beyond ``after``, ascending: where appends ended."""
        rows = self._rows("SELECT size FROM checkpoints WHERE size > ? ORDER BY size", (after,))
        return [int(r[0]) for r in rows]

    def checkpoint_at(self, size: int) -> str:
        """Return the stored checkpoint note for ``size``; raise ``AuditError`` if there is none."""
        rows = self._rows("SELECT note FROM checkpoints WHERE size = ?", (size,))
        if not rows:
            raise AuditError(f"no checkpoint at size {size}")
        return str(rows[0][0])

    def add_cosignatures(self, data: bytes | str, witnesses: Sequence[Verifier]) -> list[str]:
        """Merge a witness's cosignature note into the stored checkpoint it cosigns.

        Checklist: 1. the note parses and its body is one of our stored
        checkpoints, byte for byte; 2. each signature line from a trusted witness
        verifies (a bad one raises ``NoteError``); lines from unknown keys are
        dropped. Returns the names of the witnesses whose lines were added.
        """
        incoming = parse(data)
        checkpoint = parse_body(incoming.text)
        with self._lock:
            stored = parse(self.checkpoint_at(checkpoint.size))
            if stored.text != incoming.text:
                raise AuditError(
                    f"cosigned checkpoint at size {checkpoint.size} differs from ours (fork?)"
                )
            added, names = [], []
            # Only lines of keys still trusted count: a witness whose key was revoked
            # twice on one checkpoint must still get its third key's line in (a review).
            trusted = {(w.name, w.key_id) for w in witnesses}
            lines = Counter(s.name for s in stored.signatures if (s.name, s.key_id) in trusted)
            total = len(stored.signatures)
            for witness in witnesses:
                sig = find_signature(incoming, witness)
                if sig is None:
                    continue
                # Checked even when that witness's line is already stored: a bad
                # line is its publisher's forgery, to be counted as every other.
                verify_cosignature(Note(incoming.text, (sig,)), witness)
                if find_signature(stored, witness) is not None:
                    continue  # the first valid line of each witness key is the one kept
                # Two lines a witness at most (a key and its successor, should the
                # first be revoked), and never past what a note may hold: a member
                # with many retired keys grew one past it, and the log then refused
                # to open (a fuzzer).
                if lines[witness.name] >= LINES_PER_WITNESS or total >= MAX_SIGNATURES:
                    continue
                lines[witness.name] += 1
                total += 1
                added.append(sig)
                names.append(witness.name)
            if added:
                merged = stored.with_signatures(*added).render()
                try:
                    with self._db:
                        self._db.execute("BEGIN IMMEDIATE")
                        self._db.execute(
                            "UPDATE checkpoints SET note = ? WHERE size = ?",
                            (merged, checkpoint.size),
                        )
                except sqlite3.Error as exc:
                    raise StoreError(f"cannot store cosignature in {self.path}: {exc}") from exc
            return names

    def _rows(self, sql: str, args: tuple[int, ...] = ()) -> list[Any]:
        # One connection serves every thread, so a read holds the lock until fetched.
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read audit log {self.path}: {exc}") from exc

    def _unfinished_chunk(self) -> list[bytes]:
        # Read once, at the first append after the open: at most 255 entries.
        if self._chunk is None:
            size = self._edge.size
            chunk = self._leaf_hashes(size - size % (1 << CHUNK_BITS), size)
            if len(chunk) != size % (1 << CHUNK_BITS):
                # A chunk root made from fewer leaves would be wrong (and caught only when
                # read): no append to a log with entries missing, as the open check says.
                raise StoreDamagedError(
                    f"audit log {self.path}: entries of its unfinished chunk are missing"
                )
            self._chunk = chunk
        return self._chunk

    def _tree(self) -> Levels:
        # Built once on the first proof request, from the stored chunk roots, then
        # extended by appends.
        if self._damaged is not None:
            raise StoreDamagedError(self._damaged)  # remembered: each try read the log again
        if self._levels is None:
            try:
                self._levels = self._built_tree()
            except StoreDamagedError as exc:  # missing or altered entries do not mend
                self._damaged = str(exc)
                raise
        return self._levels

    def _built_tree(self) -> _ChunkedTree:
        """The proof tree of the log as it is, checked against its signed root."""
        size = self._edge.size
        full = size >> CHUNK_BITS
        stored = dict(self._rows("SELECT idx, root FROM chunks WHERE idx < ?", (full,)))
        tree, made = self._chunked({i: r for i, r in stored.items() if _is_hash(r)}, full)
        if size and tree.range_hash(0, size) != self._edge.root():
            # A stored root the signed head does not cover (a damaged page, a hand
            # edit of this derived table): every chunk again, from the entries.
            tree, made = self._chunked({}, full)
            if tree.range_hash(0, size) != self._edge.root():
                # The open check reads only the newest entries; a proof from these
                # would fail at every witness. The path is the operator's business,
                # not a partner's (a StoreError's words stay on this node).
                raise StoreDamagedError(
                    f"audit log {self.path}: its entries do not hash to its signed root"
                    " (check it with msmt audit verify)"
                )
        if made:
            # Kept for the next start, once the signed root covers them; derived
            # data, so a refusal (a full disk) costs only the rehash then.
            with contextlib.suppress(sqlite3.Error), self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?)", made.items())
        return tree

    def _chunked(self, kept: dict[int, bytes], full: int) -> tuple[_ChunkedTree, dict[int, bytes]]:
        """The tree from the ``kept`` chunk roots, the other ``full`` chunks' from the entries."""
        made = {}
        for i in range(full):
            if i in kept:
                continue
            # One query per chunk: a log without the table reads each once.
            lo, hi = i << CHUNK_BITS, (i + 1) << CHUNK_BITS
            leaves = self._leaf_hashes(lo, hi)
            if len(leaves) != hi - lo:
                raise StoreDamagedError(f"audit log {self.path}: entries [{lo}, {hi}) are missing")
            made[i] = _perfect_root(leaves)
        roots = [kept[i] if i in kept else made[i] for i in range(full)]
        tail = self._leaf_hashes(full << CHUNK_BITS, self._edge.size)
        return _ChunkedTree(roots, tail, self._leaf_hashes), made

    def _leaf_hashes(self, lo: int, hi: int) -> list[bytes]:
        rows = self._rows(
            "SELECT entry FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (lo, hi)
        )
        return [leaf_hash(r[0]) for r in rows]

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        """Return the RFC 9162 consistency proof between two sizes of this log."""
        with self._lock:
            return self._tree().consistency_proof(old, new)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Return the RFC 9162 inclusion proof of entry ``index`` in the tree of ``size``."""
        with self._lock:
            return self._tree().inclusion_proof(index, size)

    def entry(self, index: int) -> bytes:
        """Return entry ``index``'s bytes; raise ``AuditError`` if there is none."""
        rows = self._rows("SELECT entry FROM entries WHERE idx = ?", (index,))
        if not rows:
            raise AuditError(f"no entry {index} (log size {self.size})")
        return bytes(rows[0][0])


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


class _DamagedError(Exception):
    """An open check failed; the message is the reason, naming no entry content."""


def _edge_from_row(row: tuple[Any, Any, Any]) -> tuple[CompactRange, bytes]:
    # Step 0: a hand-edited row may hold any SQLite type, so check before use.
    size, nodes, last = row
    if not isinstance(size, int) or not isinstance(nodes, bytes) or not isinstance(last, bytes):
        raise _DamagedError("its tree edge row holds values of the wrong type")
    if size < 0 or len(nodes) != size.bit_count() * HASH_SIZE or len(last) != HASH_SIZE:
        raise _DamagedError(
            f"its tree edge for size {size} holds {len(nodes)} bytes of subtree hashes "
            f"and a {len(last)}-byte last leaf"
        )
    split = [nodes[i : i + HASH_SIZE] for i in range(0, len(nodes), HASH_SIZE)]
    return CompactRange(size, split), last


def _last_subtree(size: int) -> int:
    # Leaves in the edge's smallest perfect subtree, if few enough to rehash at
    # open, else 0; a size divisible by 2**(CHUNK_BITS+1) would cost up to a scan.
    smallest = size & -size
    return smallest if smallest <= 1 << CHUNK_BITS else 0


def _check_tail(edge: CompactRange, last: bytes, lo: int, rows: list[tuple[Any, Any]]) -> None:
    # Step 4 of AuditLog._read_edge's checklist; ``rows`` should be entries [lo, size).
    n = edge.size
    present = {idx for idx, _ in rows}
    missing = [i for i in range(lo, n) if i not in present]
    if missing:
        raise _DamagedError(f"entry {missing[-1]} is missing (its tree holds {n} entries)")
    if not all(isinstance(data, bytes) for _, data in rows):
        raise _DamagedError(f"an entry among {lo}..{n - 1} is not stored as bytes")
    leaves = [leaf_hash(data) for _, data in rows]
    if leaves[-1] != last:
        raise _DamagedError(f"entry {n - 1} does not hash to the stored last leaf")
    try:
        entry = json.loads(rows[-1][1])
    except (ValueError, RecursionError):  # also an integer of over 4300 digits
        entry = None
    if not isinstance(entry, dict):
        raise _DamagedError(f"entry {n - 1} is not a JSON object")
    seq = entry.get("seq")
    if type(seq) is not int or seq != n - 1:
        raise _DamagedError(f"entry {n - 1} does not carry seq {n - 1}")
    if entry.get("prev") != (leaves[-2].hex() if n > 1 else ""):
        link = f"does not link to entry {n - 2}" if n > 1 else "links to an entry before the first"
        raise _DamagedError(f"entry {n - 1} {link}")
    subtree = _last_subtree(n)
    if subtree and _perfect_root(leaves[-subtree:]) != edge.nodes[-1]:
        raise _DamagedError(
            f"entries {n - subtree}..{n - 1} do not rehash to the tree edge "
            "(they are not the entries the signed root covers)"
        )
