"""The node's store, the half for what partners sent: the inbox and the replay seen-set.

Each verified report is stored with its disclosed fields and its envelope as it
arrived (``inbox``), and its id in the seen-set (``seen``) for the freshness
window. Rows are read back checked, a damaged one named by its rowid. Part of
``broker.store.Store``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from broker.errors import StoreError
from broker.store_base import StoreBase

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


def utc_day(at: float) -> str:
    """The UTC day (``YYYY-MM-DD``) of a Unix time: the per-sender budget's period."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d")


class InboxTables(StoreBase):
    """``Store``'s half for what partners sent: the inbox and the replay seen-set."""

    # Whether the inbox has these columns, asked once (None until then): a store
    # from an earlier version, opened read-only, lacks them.
    _has_jwe: bool | None = None
    _has_kid: bool | None = None

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
        """Store verified reports and their seen-set entries; True per report newly stored.

        Each sender's envelope bytes newly stored are added to its row of the UTC day
        of ``now`` in ``sender_bytes``, in the same transaction.
        """
        at = time.time() if now is None else now
        out: list[bool] = []
        added: dict[str, int] = {}
        with self._tx("store_received") as db:
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
                if cur.rowcount == 1:
                    added[rec.sender] = added.get(rec.sender, 0) + len(rec.jwe)
            day = utc_day(at)
            db.executemany(
                "INSERT INTO sender_bytes(sender, day, bytes) VALUES (?, ?, ?)"
                " ON CONFLICT(sender, day) DO UPDATE SET bytes = bytes + excluded.bytes",
                [(sender, day, n) for sender, n in added.items()],
            )
        return out

    def sender_bytes(self, day: str) -> dict[str, int]:
        """Each sender's envelope bytes stored on this UTC day (``utc_day``)."""
        if not self._read("SELECT 1 FROM sqlite_master WHERE name = 'sender_bytes'"):
            return {}  # a store from an earlier version, opened read-only
        rows = self._read("SELECT sender, bytes FROM sender_bytes WHERE day = ?", (day,))
        return {str(sender): int(n) for sender, n in rows}

    def prune_seen(self, now: float | None = None) -> int:
        """Drop seen-set entries past their freshness window; return how many."""
        at = time.time() if now is None else now
        with self._tx("prune_seen") as db:
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

    def inbox_count(self, sender: str | None = None) -> int:
        """How many reports are stored, optionally from one sender."""
        if sender is None:
            return int(self._read("SELECT count(*) FROM inbox")[0][0])
        return int(self._read("SELECT count(*) FROM inbox WHERE sender = ?", (sender,))[0][0])


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
