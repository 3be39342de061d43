"""The node's store, the half for what it sends: accepted reports, the outbox, re-signing.

Feeds' records are accepted into ``reports``; the planner turns each into one
envelope per partner in ``outbox`` (or a row in ``awaiting_key`` while a partner
has no key); the publisher marks each ``sent`` once the hub acknowledged it; and
``reissue`` queues envelopes to sign again. Part of ``broker.store.Store``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from broker.envelope_format import recipient_kid
from broker.members import MEMBERS
from broker.store_base import StoreBase


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
class Withholding:
    """A pending envelope to take back: what its ``withheld`` entry and the store need."""

    rowid: int
    report_id: str
    partner: str
    audit: str
    """The send facts its entry records (``OutboxItem.audit``)."""
    jwe_sha256: str
    recipient_kid: str | None
    """The ``kid`` its header names; None if it names none (a damaged row)."""
    reason: str


_HASHED_AT_ONCE: Final = 256
"""Envelopes read at once to hash when taking them back (~6 KB each)."""


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

    @property
    def recipient_kid(self) -> str | None:
        """The ``kid`` of the partner's key the envelope is encrypted to (its header's)."""
        return recipient_kid(self.jwe[: self.jwe.find(b".")])

    def __reduce__(self) -> tuple[type[OutboxItem], tuple[str, str, str, bytes, str]]:
        # Pickled (planning worker -> node) as constructor arguments: a frozen
        # slotted dataclass otherwise unpickles through ``__setstate__``, which
        # calls ``dataclasses.fields`` per object, ~5 % of the node's CPU.
        return (OutboxItem, (self.report_id, self.partner, self.subject, self.jwe, self.audit))


class OutboxTables(StoreBase):
    """``Store``'s half for what this node sends: accepted reports, the outbox, re-signing.

    The tables ``reports``, ``outbox``, ``awaiting_key`` and ``reissue`` (see
    ``broker.store``).
    """

    # The highest outbox rowid given out while open: see ``_outbox_rowids``.
    _outbox_top: int = 0

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
        with self._tx("accept") as db:
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
        with self._tx("mark_audited") as db:
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
        with self._tx("plan") as db:
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

    def awaiting(
        self, limit: int, without: Collection[str] = ()
    ) -> list[tuple[str, bytes, tuple[str, ...]]]:
        """Up to ``limit`` planned reports with partners still awaiting a key, oldest first.

        Each is (id, record, the partners without an envelope), leaving out the
        partners in ``without`` (and reports awaiting only those).
        """
        return self._queued("awaiting_key", limit, without)

    def _queued(
        self, table: str, limit: int, without: Collection[str] = ()
    ) -> list[tuple[str, bytes, tuple[str, ...]]]:
        # (id, record, partners) per report in a (report_id, partner) queue table.
        skip = sorted(without)
        rows = self._read(
            f"SELECT q.report_id, r.record, json_group_array(q.partner) FROM {table} q"  # noqa: S608 - our own table name, placeholders
            " JOIN reports r ON r.report_id = q.report_id"
            f" WHERE q.partner NOT IN ({','.join('?' * len(skip))})"
            " GROUP BY q.report_id ORDER BY min(q.rowid) LIMIT ?",
            (*skip, limit),
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
        with self._tx("awaited") as db:
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

    def pending(
        self, limit: int, skip: Collection[int] = (), held: Collection[str] = ()
    ) -> list[OutboxItem]:
        """Envelopes not yet acknowledged by the hub, oldest first, but ``skip`` and ``held``.

        ``held`` names partners whose envelopes are left out. ``skip`` holds
        ``OutboxItem.rowid`` values this store handed out: while it is open no
        other row gets one of them, so a row deleted meanwhile (its
        envelope withheld, ``reissued``) cannot hold back a new one in its place.
        """
        # Row ids first, from the pending index alone, envelopes only for the rows
        # chosen: the publisher skips up to its whole in-flight window on every
        # call, and reading each skipped row (to name it by report and partner)
        # cost ~1.3 us against ~0.4 for its index entry.
        wanted = limit + len(skip)
        if held:
            chosen = [i for i in self._pending_ids(wanted, held) if i not in skip][:limit]
        else:
            ids = self._read(
                "SELECT rowid FROM outbox WHERE state = 'pending' ORDER BY rowid LIMIT ?",
                (wanted,),
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

    def _pending_ids(self, wanted: int, held: Collection[str]) -> list[int]:
        # Each other partner's oldest from its own index, then the oldest of all: a
        # held partner's backlog (a full inbox's, tens of thousands of rows) is not
        # read through on every look, as the pending index alone would.
        found: list[int] = []
        for partner in MEMBERS:
            if partner not in held:
                found += (
                    r[0]
                    for r in self._read(
                        "SELECT rowid FROM outbox WHERE state = 'pending' AND partner = ?"
                        " ORDER BY rowid LIMIT ?",
                        (partner, wanted),
                    )
                )
        return sorted(found)[:wanted]

    def unkeyed(self, refused: Callable[[str, str], str | None]) -> list[Withholding]:
        """The pending envelopes encrypted to a key ``refused`` gives a reason for.

        ``refused(partner, kid)`` says why ``kid`` is not to be used as ``partner``'s
        encryption key now (revoked, say, or dropped from the roster), or None.
        Nothing is changed: the caller logs each (``withheld``), then ``withhold``.
        """
        # The protected header alone (~300 bytes), not the whole envelope: the
        # outbox may hold many after an outage, and this runs at every start.
        rows = self._read(
            "SELECT rowid, partner, substr(jwe, 1, instr(jwe, '.') - 1) FROM outbox"
            " WHERE state = 'pending' ORDER BY rowid"
        )
        said: dict[tuple[str, str | None], str | None] = {}
        taken: dict[int, tuple[str | None, str]] = {}
        for rowid, partner, head in rows:
            kid = recipient_kid(head)
            if (partner, kid) not in said:
                said[partner, kid] = (
                    "its envelope names no recipient key" if kid is None else refused(partner, kid)
                )
            if (why := said[partner, kid]) is not None:
                taken[rowid] = (kid, why)
        found: list[Withholding] = []
        chosen = list(taken)
        # The envelopes themselves a few at a time, for their hashes only.
        for start in range(0, len(chosen), _HASHED_AT_ONCE):
            some = chosen[start : start + _HASHED_AT_ONCE]
            for rowid, report_id, partner, jwe, audit in self._read(
                "SELECT rowid, report_id, partner, jwe, audit FROM outbox"  # noqa: S608 - placeholders
                f" WHERE rowid IN ({','.join('?' * len(some))}) ORDER BY rowid",
                some,
            ):
                kid, why = taken[rowid]
                digest = hashlib.sha256(jwe).hexdigest()
                found.append(Withholding(rowid, report_id, partner, audit, digest, kid, why))
        return found

    def withhold(self, envelopes: Sequence[Withholding]) -> Counter[str]:
        """Take back ``envelopes`` (from ``unkeyed``), after their ``withheld`` entries.

        Each is deleted, and its (report, partner) put in ``awaiting_key`` with its
        reason (and out of ``reissue``), in one transaction: it is planned again,
        under the policy and keys of then, once the partner has a valid key.
        Returns how many were taken back per partner.
        """
        counts = Counter(w.partner for w in envelopes)
        if not envelopes:
            return counts
        with self._tx("withhold") as db:
            db.executemany(
                "INSERT OR REPLACE INTO awaiting_key(report_id, partner, reason)"
                " SELECT report_id, partner, ? FROM outbox WHERE rowid = ?",
                [(w.reason, w.rowid) for w in envelopes],
            )
            rowids = [(w.rowid,) for w in envelopes]
            db.executemany(
                "DELETE FROM reissue WHERE (report_id, partner) ="
                " (SELECT report_id, partner FROM outbox WHERE rowid = ?)",
                rowids,
            )
            db.executemany("DELETE FROM outbox WHERE rowid = ?", rowids)
        return counts

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
        with self._tx("mark_sent") as db:
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
        with self._tx("queue_stale") as db:
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
        with self._tx("queue_resend") as db:
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
        with self._tx("reissued") as db:
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


_WAITING: Final = {
    "unacked": "SELECT partner, report_id FROM outbox WHERE state = 'pending'",
    # Driven from reissue (empty, or a few rows) into outbox by its key: as a join,
    # SQLite scanned every envelope ever sent (``outbox_depths``).
    "resend": "SELECT q.partner, q.report_id FROM reissue q WHERE EXISTS (SELECT 1 FROM"
    " outbox o WHERE o.report_id = q.report_id AND o.partner = q.partner AND o.state = 'sent')",
}
"""(partner, report) of each envelope waiting to go out: for the hub's ack, or to be
signed again. ``outbox_by_partner`` counts each; ``outbox_oldest`` takes both."""
