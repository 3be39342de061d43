"""Verify a node's audit log directory from scratch, and pinpoint the first thing that breaks.

The fast path hashes every entry once, builds the tree level by level, and
compares each stored checkpoint's signed root with the recomputed root of the
same prefix. Only when something fails does a slow pass parse entries, from
the last checkpoint that still matched, to name the first broken entry and why.

A running node's log grows while it is read: verify checks a snapshot (the
entries up to the latest checkpoint then). Its witnesses cosign one of its
latest checkpoints every few seconds, so with a quorum demanded, that latest
checkpoint often has none yet; ``wait`` lets verify re-read the checkpoints
from it on until one of them has the quorum, and then extend the verification
to that one. Everything the snapshot held is then covered by a checkpoint with
the quorum, checked as all the others, or verify fails: the check is the same.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from broker.audit_events import parse_entry
from broker.audit_scan import PARALLEL_FROM, LeafScan, open_readonly
from broker.auditlog import DB_FILE, FORMAT, connect, sqlite_error
from broker.checkpoint import (
    Checkpoint,
    UntrustedSignerError,
    count_cosignatures,
    open_checkpoint,
    parse_body,
)
from broker.errors import AuditError, StoreError, UsageError
from broker.merkle import HASH_SIZE, Levels, ProofError, leaf_hash, verify_consistency
from broker.note import Note, NoteError, Verifier, find_signature, parse
from broker.roster import format_time
from broker.witness import LogState

QUORUM_POLL_S: Final = 0.5
"""How often verify re-reads the checkpoints while it waits for a quorum."""


class TamperError(AuditError):
    """The log does not verify; ``index`` is the first broken entry (``None`` if not an entry)."""

    def __init__(self, index: int | None, reason: str) -> None:
        where = f"entry {index}: " if index is not None else ""
        super().__init__(f"{where}{reason}")
        self.index = index
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Report:
    """What a successful verification established."""

    origin: str
    size: int
    checkpoints: int
    root: bytes
    latest_note: Note | None
    cosigners: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LoadedLog:
    """A log directory read into memory: its leaf hashes (as a tree) and checkpoint notes."""

    origin: str
    path: Path
    tree: Levels
    checkpoints: list[tuple[int, str]]

    def entries(self, lo: int, hi: int) -> list[bytes]:
        """Read entries ``[lo, hi)`` again from disk (only the slow paths need their bytes)."""
        return read_entries(self.path, lo, hi)


def read_entries(path: Path, lo: int, hi: int) -> list[bytes]:
    """Read entries ``[lo, hi)`` of the audit database ``path``, read-only, as stored.

    Nothing is checked: callers compare what they read with what ``verify_log``
    established (``broker.audit_replay.iter_verified_entries``). Raises ``StoreError``, or
    ``AuditError`` for a file that is not a database or is malformed; either names the file.
    """
    db = _reopen(path)
    try:
        query = "SELECT entry FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx"
        return [bytes(r[0]) for r in db.execute(query, (lo, hi))]
    except sqlite3.Error as exc:
        raise sqlite_error("cannot read", path, exc, writer=False) from exc
    finally:
        db.close()


def _reopen(path: Path) -> sqlite3.Connection:
    """Open the audit database ``path`` read-only again, once ``load`` has read it.

    The file may have gone, or changed, meanwhile: SQLite's refusal is ours, naming the
    file and why (it was SQLite's bare "unable to open database file", uncaught).
    """
    try:
        return open_readonly(path)
    except sqlite3.Error as exc:
        raise sqlite_error("cannot open", path, exc, writer=False) from exc


def _is_dir(directory: Path) -> bool:
    # A folder above it the user may not enter: Path.is_dir raises (a traceback).
    try:
        return directory.is_dir()
    except OSError as exc:
        raise sqlite_error("cannot open", directory / DB_FILE, exc, writer=False) from exc


def log_dir(directory: Path) -> Path:
    """Return the folder holding the audit database: ``directory`` or its ``audit/``.

    Operators naturally point at a node's data directory (``data/JPN``); the node
    keeps its log in ``data/JPN/audit/``, so both spellings are accepted.
    """
    nested = directory / "audit"
    try:
        if not (directory / DB_FILE).exists() and (nested / DB_FILE).exists():
            return nested
    except OSError:  # a folder the user may not enter (a traceback): the open says so
        pass
    return directory


def read_origin(directory: Path) -> str:
    """Return whose log ``directory`` holds (its ``origin``), reading nothing else."""
    directory = log_dir(directory)
    if not _is_dir(directory):
        raise UsageError(f"{directory} is not a directory")
    db = connect(directory / DB_FILE, readonly=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
    except sqlite3.Error as exc:
        raise sqlite_error("cannot read", directory / DB_FILE, exc, writer=False) from exc
    finally:
        db.close()
    if row is None:
        raise AuditError(f"{directory / DB_FILE} is not an {FORMAT} audit log")
    return str(row[0])


def load(directory: Path, *, jobs: int = 1, parallel_from: int = PARALLEL_FROM) -> LoadedLog:
    """Read the log in ``directory``; a gap in entry indices is reported as a deletion.

    Everything is read in one snapshot, so a node appending meanwhile cannot make
    its own fresh checkpoints look like truncation. With ``jobs=2``, a log of at
    least ``parallel_from`` entries is leaf-hashed by two processes.
    """
    directory = log_dir(directory)
    path = directory / DB_FILE
    if not _is_dir(directory):
        raise UsageError(f"{directory} is not a directory")
    db = connect(path, readonly=True)
    scan: LeafScan | None = None
    try:
        db.execute("BEGIN")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        # A lone min() or max() of the rowid is one B-tree descent; both in one
        # SELECT (or count(*)) would scan the table.
        (low,) = db.execute("SELECT min(idx) FROM entries").fetchone()
        (high,) = db.execute("SELECT max(idx) FROM entries").fetchone()
        if meta.get("format") != FORMAT or not meta.get("origin"):
            raise AuditError(f"{path} is not an {FORMAT} audit log")
        size = 0 if high is None else high + 1
        if low not in (None, 0):
            _find_hole(db)
        checkpoints = db.execute("SELECT size, note FROM checkpoints ORDER BY size").fetchall()
        scan = LeafScan(path, size, parallel_from if jobs > 1 else size + 1)
        scan.local(db)
        leaves = scan.result()
        if len(leaves) != size * HASH_SIZE:
            # Fewer rows than the highest index: a deleted entry (or a concurrent writer).
            _find_hole(db)
            raise StoreError(f"audit log {path} changed while it was being read; run verify again")
        db.execute("COMMIT")
    except TypeError:
        # Only a hand-edited database stores an entry as something other than a BLOB.
        bad = db.execute("SELECT min(idx) FROM entries WHERE typeof(entry) != 'blob'").fetchone()
        raise TamperError(bad[0], "is not stored as bytes (edited by hand)") from None
    except sqlite3.Error as exc:
        raise sqlite_error("cannot read", path, exc, writer=False) from exc
    except OSError as exc:  # the leaf-hashing helper's failure
        raise StoreError(f"cannot read audit log {path}: {exc}") from exc
    finally:
        if scan is not None:
            scan.close()
        db.close()
    return LoadedLog(str(meta["origin"]), path, Levels.from_packed(leaves), list(checkpoints))


def _find_hole(db: sqlite3.Connection) -> None:
    for pos, (idx,) in enumerate(db.execute("SELECT idx FROM entries ORDER BY idx")):
        if idx < 0:
            # Sorted, so only the first row can be below 0; no entry of the log is
            # missing there, a row was stored where no entry can be.
            raise TamperError(
                None, f"an entry is stored at index {idx}: entry indices start at 0 (an insertion)"
            )
        if idx != pos:
            if pos == 0:
                raise TamperError(0, f"is missing (the first stored index is {idx})")
            raise TamperError(pos, f"is missing (stored indices jump from {pos - 1} to {idx})")


def _pinpoint(log: LoadedLog, start: int, stop: int) -> None:
    """Raise ``TamperError`` at the first entry in ``[start, stop]`` whose envelope is wrong.

    Entry ``stop`` (if present) is included so an edit of entry ``stop - 1`` shows
    up as a broken link from its successor.
    """
    for i, data in enumerate(log.entries(start, stop + 1), start):
        try:
            entry = parse_entry(data, i)
        except AuditError as exc:
            raise TamperError(i, str(exc)) from None
        want = log.tree.leaf(i - 1).hex() if i else ""
        if entry["prev"] != want:
            raise TamperError(
                i - 1 if i else 0,
                f"was altered, removed or replaced: entry {i} does not link to it",
            )


def verify_log(
    directory: Path,
    log_keys: Sequence[Verifier],
    *,
    witnesses: Sequence[Verifier] = (),
    quorum: int = 0,
    revoked_keys: Sequence[Verifier] = (),
    known: Sequence[tuple[str, str]] = (),
    witnessed: Sequence[tuple[str, Mapping[str, LogState]]] = (),
    jobs: int = 1,
    parallel_from: int = PARALLEL_FROM,
    wait: float = 0.0,
    on_wait: Callable[[int], None] | None = None,
) -> Report:
    """Verify the audit log in ``directory``; raise ``TamperError`` at the first fault.

    Checklist:
      1. the directory holds an audit log, its entry indices have no holes;
      2. every checkpoint is a well-formed note for this origin, stored under its
         own size, and signed by a trusted log key; or, except the latest, signed
         by one of ``revoked_keys`` (see below);
      3. no checkpoint claims more entries than the log holds (truncation);
      4. each checkpoint's root equals the recomputed root of that prefix
         (edits, insertions, deletions, reordering), pinpointed by a slow pass;
      5. each checkpoint is consistent with the previous one (RFC 9162 proof);
      6. every entry is covered by a signed checkpoint (nothing appended unsigned);
      7. with ``witnesses``, no checkpoint carries a cosignature line of a
         witness key that does not verify (C2SP signed-note), and with
         ``quorum > 0`` the latest carries at least ``quorum`` valid ones; with
         ``wait`` seconds, a later one may, the log verified up to it (see the module);
      8. each checkpoint in ``known`` ((where it came from, its text): ones the
         auditor kept from earlier, signed by a trusted or revoked log key) is
         covered: the log has not been cut below it (rollback) and its first
         entries still hash to its root (a rewritten history, a fork);
      9. likewise for the size and root each witness state in ``witnessed``
         ((where it came from, a partner's ``witness-state.json``) records as last
         cosigned for this log; a state that never cosigned this log is a usage
         error. The state is not signed: the auditor vouches for where it came from.

    A checkpoint signed by a log key revoked since is not trusted for what it
    says, but it need not be: the latest checkpoint, signed by a trusted key,
    covers the same entries, and steps 4-5 tie the older root to them. So a log
    stays verifiable after its member's key is revoked (the node signs the whole
    tree with its new key at its next append), while a forged latest checkpoint
    signed with a stolen key is still refused.
    """
    if quorum < 0 or (quorum > 0 and len({w.name for w in witnesses}) < quorum):
        raise UsageError(f"a quorum of {quorum} needs at least {quorum} witness keys")
    log = load(directory, jobs=jobs, parallel_from=parallel_from)
    walk = _Walk(log, log_keys, revoked_keys, witnesses, quorum)
    walk.check(log.checkpoints)
    n = log.tree.size
    covered = walk.previous.size if walk.previous else 0
    walk.refuse_if_by_revoked()
    if covered < n:
        _pinpoint(log, covered, n)
        raise TamperError(
            covered,
            f"and the {n - covered} entries after it are not covered by any signed checkpoint",
        )
    cosigners = walk.quorum(wait, on_wait) if quorum > 0 else ()
    for source, text in known:
        _check_known(log, source, text, [*log_keys, *revoked_keys])
    for source, state in witnessed:
        _check_witnessed(log, source, state)
    n = log.tree.size  # waiting for a quorum may have verified more of the log
    return Report(log.origin, n, walk.count, log.tree.root(n), walk.latest, cosigners)


class _Walk:
    """Steps 2-5 and 7 of ``verify_log`` over the checkpoints, in size order."""

    def __init__(
        self,
        log: LoadedLog,
        log_keys: Sequence[Verifier],
        revoked_keys: Sequence[Verifier],
        witnesses: Sequence[Verifier],
        quorum: int,
    ) -> None:
        self.log = log
        self.log_keys = log_keys
        self.revoked_keys = revoked_keys
        self.witnesses = witnesses
        self.quorum_size = quorum
        self.previous: Checkpoint | None = None
        self.latest: Note | None = None
        self.by_revoked = False
        self.count = 0
        self.cosigners: tuple[str, ...] = ()
        """The witnesses whose valid cosignatures the latest checkpoint carries."""
        self.quorate = 0
        """The size of the latest checkpoint with the quorum (0: none)."""

    def check(self, rows: Sequence[tuple[int, str]]) -> None:
        """Check ``rows`` (size, note), the checkpoints after the ones checked before."""
        log = self.log
        n = log.tree.size
        for size, text in rows:
            try:
                checkpoint, note, self.by_revoked = _open(
                    text, log.origin, self.log_keys, self.revoked_keys
                )
                # Raises if a trusted witness's line fails.
                self.cosigners = tuple(count_cosignatures(note, self.witnesses))
            except NoteError as exc:
                # The first checkpoint unsigned by any of the roster's keys: a forged
                # log, or --keys naming another federation's roster (a demo's, say).
                other = ""
                if isinstance(exc, UntrustedSignerError) and self.previous is None:
                    other = " (or the roster given is not this log's federation's)"
                raise TamperError(None, f"checkpoint at size {size}: {exc}{other}") from None
            if checkpoint.origin != log.origin or checkpoint.size != size:
                raise TamperError(
                    None, f"checkpoint at size {size} is for {checkpoint.origin}/{checkpoint.size}"
                )
            if size > n:
                raise TamperError(
                    n,
                    f"is missing: the log holds {n} entries but a checkpoint was signed "
                    f"at size {size} (truncated)",
                )
            previous = self.previous
            if log.tree.root(size) != checkpoint.root:
                start = previous.size if previous else 0
                _pinpoint(log, start, size)
                raise TamperError(
                    start if size - start == 1 else None,
                    f"entries {start}..{size - 1} do not reproduce the root signed at size {size}",
                )
            if previous is not None and previous.size > 0:
                try:
                    proof = log.tree.consistency_proof(previous.size, size)
                    verify_consistency(previous.size, size, previous.root, checkpoint.root, proof)
                except ProofError as exc:
                    raise TamperError(
                        None, f"checkpoint {size} is not consistent with {previous.size}: {exc}"
                    ) from None
            self.previous, self.latest = checkpoint, note
            self.count += 1
            if self.quorum_size and len(self.cosigners) >= self.quorum_size:
                self.quorate = size

    def refuse_if_by_revoked(self) -> None:
        """Refuse a latest checkpoint that only a revoked key signed (see ``verify_log``)."""
        if self.by_revoked and self.previous is not None:
            raise TamperError(
                None,
                f"the latest checkpoint (size {self.previous.size}) is signed only by a revoked"
                " key; nothing trusted vouches for the log",
            )

    def quorum(self, wait: float, on_wait: Callable[[int], None] | None) -> tuple[str, ...]:
        """Step 7's quorum on the latest checkpoint, waiting up to ``wait`` s for one.

        While it waits, the checkpoints from the latest on are re-read every
        ``QUORUM_POLL_S``: once one of them carries the quorum, the entries up to it
        and the checkpoints before it are checked as all the others were
        (``extend``), and it is the latest. ``on_wait(size)`` is called as the wait starts.
        """
        if self.previous is None:
            raise TamperError(None, "no checkpoint to check cosignatures on")
        if len(self.cosigners) >= self.quorum_size:
            return self.cosigners
        size, have = self.previous.size, len(self.cosigners)
        if wait > 0:
            if on_wait is not None:
                on_wait(size)
            deadline = time.monotonic() + wait
            while True:
                found = _first_quorate(self.log.path, size, self.witnesses, self.quorum_size)
                if found is not None:
                    self.extend(found)
                    if len(self.cosigners) < self.quorum_size:  # a node never removes one
                        raise TamperError(
                            None, f"checkpoint at size {found} lost cosignatures while read"
                        )
                    return self.cosigners
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(QUORUM_POLL_S, left))
        raise TamperError(None, self.short_of_quorum(size, have, wait))

    def extend(self, upto: int) -> None:
        """Verify the log on from the latest checkpoint checked to the one at ``upto``."""
        if self.previous is None or self.latest is None:
            raise TamperError(None, "no checkpoint to check cosignatures on")
        start = self.previous.size
        leaves, rows = _read_more(self.log.path, start, upto)
        for leaf in leaves:
            self.log.tree.append(leaf)
        self.log.checkpoints.extend(rows[1:])
        # The latest checked again: its body as verified, its cosignature lines new.
        size, text = rows[0]
        try:
            note = parse(text)
            if note.text != self.latest.text:
                raise TamperError(None, f"checkpoint at size {size} changed while it was verified")
            self.cosigners = tuple(count_cosignatures(note, self.witnesses))
        except NoteError as exc:
            raise TamperError(None, f"checkpoint at size {size}: {exc}") from None
        self.latest = note
        self.check(rows[1:])
        self.refuse_if_by_revoked()

    def short_of_quorum(self, size: int, have: int, waited: float) -> str:
        """The failure line: what the latest checkpoint lacks; what a live log's auditor does."""
        newest = _newest_entry_time(self.log, size)
        quorate = (
            f"the latest with a quorum is at size {self.quorate}"
            f" ({size - self.quorate} entries before)"
            if self.quorate
            else "no checkpoint has a quorum"
        )
        then = (
            f"none at size {size} or later reached it within the {waited:g} s waited"
            if waited > 0
            else "a running node's newest checkpoints wait for their witnesses' next round"
            " (about every 5 s): --wait 30 waits for a quorum on it or a later one"
        )
        # Who did cosign: a witness missing for good (down, on an incompatible build)
        # shows as the same names round after round.
        named = f" ({', '.join(self.cosigners[:have])})" if have else ""
        return (
            f"latest checkpoint (size {size}{newest}) has {have} valid witness"
            f" cosignatures{named}, fewer than the quorum of {self.quorum_size}; {quorate};"
            f" {then}"
        )


def _first_quorate(path: Path, size: int, witnesses: Sequence[Verifier], quorum: int) -> int | None:
    """The smallest stored checkpoint size from ``size`` on whose note has the quorum.

    Only a pick: ``_Walk.extend`` then checks it and every entry and checkpoint before
    it, so a note that does not parse or has a failing line is passed over here.
    """
    db = _reopen(path)
    try:
        rows = db.execute(
            "SELECT size, note FROM checkpoints WHERE size >= ? ORDER BY size", (size,)
        ).fetchall()
    except sqlite3.Error as exc:
        raise sqlite_error("cannot read", path, exc, writer=False) from exc
    finally:
        db.close()
    for stored, text in rows:
        try:
            if len(count_cosignatures(parse(text), witnesses)) >= quorum:
                return int(stored)
        except (NoteError, TypeError):
            continue
    return None


def _read_more(path: Path, start: int, upto: int) -> tuple[list[bytes], list[tuple[int, str]]]:
    """Leaf hashes of entries ``[start, upto)`` and the checkpoints from ``start`` to ``upto``.

    Read in one snapshot, as ``load`` reads the rest; an index missing from the
    range is refused as ``load`` refuses one.
    """
    db = _reopen(path)
    try:
        db.execute("BEGIN")
        entries = db.execute(
            "SELECT idx, entry FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx",
            (start, upto),
        ).fetchall()
        rows = db.execute(
            "SELECT size, note FROM checkpoints WHERE size >= ? AND size <= ? ORDER BY size",
            (start, upto),
        ).fetchall()
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        raise sqlite_error("cannot read", path, exc, writer=False) from exc
    finally:
        db.close()
    leaves = []
    for i, (idx, entry) in enumerate(entries, start):
        if idx != i:
            raise TamperError(i, f"is missing (stored indices jump from {i - 1} to {idx})")
        if not isinstance(entry, bytes):
            raise TamperError(i, "is not stored as bytes (edited by hand)")
        leaves.append(leaf_hash(entry))
    if not rows or rows[0][0] != start:
        raise TamperError(None, f"checkpoint at size {start} was removed while it was verified")
    return leaves, [(int(size), note) for size, note in rows]


def _newest_entry_time(log: LoadedLog, size: int) -> str:
    """``", newest entry 0.4 s old"`` (or its time, if older), to tell a live log; or ``""``.

    The entry's own time, as its node wrote it: only a hint for the reader.
    """
    try:
        (data,) = log.entries(size - 1, size)
        at = datetime.fromisoformat(json.loads(data)["at"])
        age = (datetime.now(UTC) - at).total_seconds()  # a naive time: TypeError
    except (StoreError, AuditError, ValueError, KeyError, TypeError):
        return ""
    return (
        f", newest entry {age:.1f} s old" if 0 <= age < 120 else f", newest entry {format_time(at)}"
    )


def stored_checkpoint(log: LoadedLog, size: int) -> tuple[Checkpoint, str]:
    """Return the checkpoint stored at ``size`` and its note, once the entries reproduce it.

    What ``msmt audit prove`` checks before proving against it; raises
    ``TamperError`` at the first failure, ``UsageError`` if none is stored there:
      1. the note parses and its body names this log's origin and ``size``;
      2. the log holds entries ``0..size-1`` (``load`` already refused holes);
      3. the tree over them has the checkpoint's root; if not, a slow pass from
         the last stored checkpoint that still matches names the first broken entry.

    No signature is checked: that needs the member's key, which whoever receives
    the proof holds (``verify_log`` checks it for an auditor).
    """
    notes = dict(log.checkpoints)
    if size not in notes:
        raise UsageError(f"no stored checkpoint of size {size}")
    checkpoint, text = _stored_body(size, notes[size])
    if checkpoint is None:
        raise TamperError(None, f"checkpoint at size {size} does not parse: {text}")
    if checkpoint.origin != log.origin or checkpoint.size != size:
        raise TamperError(
            None,
            f"checkpoint at size {size} is for {checkpoint.origin}/{checkpoint.size}, "
            f"not {log.origin}/{size}",
        )
    n = log.tree.size
    if size > n:
        raise TamperError(
            n, f"is missing: the log holds {n} entries but its checkpoint claims {size} (truncated)"
        )
    if log.tree.root(size) != checkpoint.root:
        start = max(
            (
                s
                for s, t in log.checkpoints
                if s < size and _matches(log, s, t)  # s < size <= n: a prefix the log holds
            ),
            default=0,
        )
        _pinpoint(log, start, size)
        raise TamperError(
            start if size - start == 1 else None,
            f"entries {start}..{size - 1} do not reproduce the root of the checkpoint "
            f"at size {size}",
        )
    return checkpoint, text


def _stored_body(size: int, stored: object) -> tuple[Checkpoint | None, str]:
    # (body, note text), or (None, why it does not parse). A note stored as a BLOB
    # (by hand) is read as its UTF-8 text, as verify_log reads it; SQLite would
    # hand a number stored in a hand-made table through as one.
    if not isinstance(stored, str | bytes):
        return None, "it is not stored as text"
    try:
        note = parse(stored)
        return parse_body(note.text), stored if isinstance(stored, str) else stored.decode()
    except NoteError as exc:
        return None, str(exc)


def _matches(log: LoadedLog, size: int, stored: object) -> bool:
    # Only to place a slow pass: the root of a stored checkpoint, signed or not,
    # equals the log's first ``size`` entries' root.
    checkpoint, _ = _stored_body(size, stored)
    return (
        checkpoint is not None
        and checkpoint.size == size
        and 0 < size <= log.tree.size
        and log.tree.root(size) == checkpoint.root
    )


def _check_known(log: LoadedLog, source: str, text: str, keys: Sequence[Verifier]) -> None:
    """Checklist step 8 for one checkpoint the auditor kept (from ``source``)."""
    try:
        checkpoint, _ = open_checkpoint(text, keys)
    except NoteError as exc:
        raise UsageError(f"{source}: not a checkpoint of this log: {exc}") from None
    if checkpoint.origin != log.origin:
        raise UsageError(f"{source}: a checkpoint of {checkpoint.origin}, not {log.origin}")
    _still_holds(
        log,
        checkpoint.size,
        checkpoint.root,
        f"{source} is its checkpoint at size {checkpoint.size}",
        f"the root of {source}, which its own key signed",
    )


def _check_witnessed(log: LoadedLog, source: str, state: Mapping[str, LogState]) -> None:
    """Checklist step 9 for one partner's witness state (from ``source``)."""
    held = state.get(log.origin)
    if held is None:
        raise UsageError(
            f"{source}: this witness has cosigned nothing of {log.origin}"
            f" (it holds {len(state)} other logs)"
        )
    _still_holds(
        log,
        held.size,
        held.root,
        f"the witness whose state is {source} cosigned it at size {held.size}",
        f"the root the witness whose state is {source} cosigned",
    )


def _still_holds(log: LoadedLog, size: int, root: bytes, kept: str, signed: str) -> None:
    # Rollback: the log was cut below a size someone outside it vouches for; fork:
    # its first ``size`` entries no longer hash to the root they vouched for.
    n = log.tree.size
    if size > n:
        raise TamperError(None, f"rolled back: the log holds {n} entries, but {kept}")
    if size and log.tree.root(size) != root:
        raise TamperError(
            None,
            f"history rewritten: the log's first {size} entries do not hash to {signed} (a fork)",
        )


def _open(
    text: str, origin: str, log_keys: Sequence[Verifier], revoked_keys: Sequence[Verifier]
) -> tuple[Checkpoint, Note, bool]:
    """Checklist step 2: the checkpoint, its note, and whether only a revoked key signed it.

    A checkpoint for another origin is refused as that, rather than as unsigned
    (keys are looked up by the origin a checkpoint claims).

    A revoked key is tried only for a note that no trusted key signed at all; a
    trusted key's signature that fails rejects the note whatever else signed it.
    """
    try:
        checkpoint, note = open_checkpoint(text, log_keys)
    except NoteError:
        note = parse(text)
        checkpoint = parse_body(note.text)
        if checkpoint.origin != origin:
            raise NoteError(f"checkpoint is for {checkpoint.origin}, not {origin}") from None
        if any(find_signature(note, k) for k in log_keys) or not any(
            find_signature(note, k) for k in revoked_keys
        ):
            raise
        # Raises its own NoteError if the revoked key's signature does not verify.
        checkpoint, note = open_checkpoint(text, revoked_keys)
        return checkpoint, note, True
    return checkpoint, note, False
