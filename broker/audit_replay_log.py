"""One audit log read for replay: its verified entries, and the records replay keeps of them.

``verified_entries`` and ``iter_verified_entries`` parse a log's entries only if their
bytes are the ones verified. ``read_log`` reads one log's entries once, in order, into
the few fields replay needs of each (``Send``, ``Receipt``, ``Rejection``, in an
``Index``), and makes the checks that log alone can tell (the first list in
``broker.audit_replay``). Apart from the checks across logs, which need every log read
first: ``broker.audit_replay.replay`` reads each log here, then makes those.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar

from broker.audit_events import parse_entry
from broker.audit_policy import PolicyTimeline
from broker.audit_replay_result import BulkRefusals, Finding
from broker.errors import AuditError
from broker.merkle import CompactRange, leaf_hash


def verified_entries(data: Iterable[bytes], size: int, root: bytes) -> list[dict[str, Any]]:
    """Parse a log's entries, refusing them unless they are the ``size`` entries verified.

    ``size`` and ``root`` are what verifying the log established
    (``broker.audit_verify.Report``); ``data`` is the entries' bytes, read
    again, in index order. Verifying and reading are two reads of a file that
    can change in between (a copy swapped in, a row edited), so the bytes parsed
    must rebuild the verified root: their RFC 6962 leaf hashes are folded as they
    stream by, and compared at the end. Raises ``AuditError``: that the log
    changed after it was verified, or else, at the first entry that does not
    parse, ``entry N: <why>`` (only a verified entry is blamed on the log's owner).
    """
    return list(iter_verified_entries(data, size, root))


def iter_verified_entries(
    data: Iterable[bytes], size: int, root: bytes
) -> Iterator[dict[str, Any]]:
    """``verified_entries`` one entry at a time, for a caller that keeps only what it needs.

    The entries come before the root is checked: whatever the caller makes of
    them is unverified until the iterator is exhausted, which raises exactly
    what ``verified_entries`` raises (after an entry that does not parse, it
    yields nothing more but reads on, to check the root).
    """
    edge = CompactRange()
    failure: str | None = None
    changed = AuditError(
        "changed after it was verified: its entries do not hash to the root verified "
        f"at size {size}"
    )
    for i, blob in enumerate(data):
        if i == size:
            raise changed
        edge.append(leaf_hash(blob))
        if failure is None:
            try:
                entry = parse_entry(blob, i)
            except AuditError as exc:
                # Said only once the root matches: a malformed entry in bytes that
                # were never verified is not the log owner's, and must not read so.
                failure = f"entry {i}: {exc}"
                continue
            yield entry
    if edge.size != size or edge.root() != root:
        raise changed
    if failure is not None:
        raise AuditError(failure)


_Entry = Mapping[str, Any]
_Version = tuple[tuple[str, Any], ...]

_REPEAT_MAY_DIFFER = frozenset({"at", "seq", "prev", "v", "reason", "recipient_kid"})
"""The fields in which an honest repeat of an entry differs from the entry it repeats.

A node that crashes between logging an event and the store write it describes
logs the same event again when it redoes the work (docs/AUDIT.md): the
publisher builds a repeated ``sent`` entry from the same outbox row and the
receiver a repeated ``received`` entry from the same envelope, so only the
time it is logged and its place in the log change; and its format version, when
the node was upgraded in between. A ``withheld`` entry repeated by the next start
gives the reason that start's roster gives. ``recipient_kid`` is compared apart
(``read_log``): a version 1 ``sent`` entry has none, nor a version 1 or 2 ``received``
one, which its repeat may add, but two entries of one JWE that name a key must name
the same one.
"""


def _version(entry: _Entry) -> _Version:
    """What an honest repeat of ``entry`` repeats exactly, in a hashable form."""
    return tuple(
        sorted(
            (k, tuple(v) if isinstance(v, list) else v)
            for k, v in entry.items()
            if k not in _REPEAT_MAY_DIFFER
        )
    )


def _differing(entry: _Entry, earlier: _Entry) -> str:
    """The names (never the values) of the fields in which a repeat differs from ``earlier``."""
    names = sorted(k for k in entry if k not in _REPEAT_MAY_DIFFER and entry[k] != earlier.get(k))
    return " and ".join(names)


# What replay keeps of an entry until every log is read: a few slots, their repeated
# values shared (``Pool``). A parsed entry is a dict of ~2.5 KB; a log holds
# hundreds of thousands. Each record holds every field the checks read, and
# ``entry()`` gives back what a repeat is compared with (all but ``at`` and ``prev``
# for a receipt, ``prev`` for a send; ``v`` and ``type`` are known, and ``member``
# is the log's own, since entries naming another member are left out).


@dataclass(frozen=True, slots=True)
class Send:
    """What replay keeps of a ``sent`` or ``withheld`` entry (see above).

    ``recipient_kid`` is None for a ``sent`` entry of format 1 (it has none) and a
    ``withheld`` one whose envelope named none; ``reason`` is None for a ``sent``
    entry, a ``withheld`` entry's otherwise.
    """

    member: str
    seq: int
    at: str
    partner: str
    report_id: str
    kind: str
    originator: str
    tlp: str
    rel_to: tuple[str, ...] | None
    released: tuple[str, ...]
    policy_digest: str
    jwe_sha256: str
    recipient_kid: str | None
    reason: str | None
    made_after: str | None = None
    """When its report arrived in the log, as the entries before it say (its envelope
    was made after that): the one time a ``withheld`` entry can be dated by, and the
    earliest a ``sent`` entry can be (one whose ``at`` is earlier is dated by it)."""

    @property
    def withheld(self) -> bool:
        """Whether the entry is a ``withheld`` one: taken back, unsent as far as the node knew."""
        return self.reason is not None

    def entry(self) -> dict[str, Any]:
        """The entry as a repeat of it is compared with (``recipient_kid`` apart)."""
        entry = _as_entry(self, "withheld" if self.withheld else "sent")
        del entry["made_after"]
        if not self.withheld:
            del entry["reason"]
        return entry


@dataclass(frozen=True, slots=True)
class Receipt:
    """What replay keeps of a ``received`` entry (see above).

    ``recipient_kid`` is the key of the log's member that opened the envelope, None
    for an entry of format 1 or 2 (they name none).
    """

    member: str
    seq: int
    sender: str
    report_id: str
    kind: str
    fields: tuple[str, ...]
    jwe_sha256: str
    recipient_kid: str | None

    def entry(self) -> dict[str, Any]:
        """The entry as a repeat of it is compared with."""
        return _as_entry(self, "received")


@dataclass(frozen=True, slots=True)
class Rejection:
    """What replay keeps of a ``rejected`` entry that names a JWE (see above)."""

    member: str
    seq: int
    source: str
    step: str
    report_id: str | None
    jwe_sha256: str


def _as_entry(record: Send | Receipt, kind: str) -> dict[str, Any]:
    values = ((f.name, getattr(record, f.name)) for f in fields(record))
    entry = {k: list(v) if isinstance(v, tuple) else v for k, v in values}
    return entry | {"type": kind}


class Pool:
    """One object per distinct value kept: strings by ``sys.intern``, tuples of them here.

    Members, kinds, markings, policy digests and disclosure keys repeat in every
    send, report ids and times in each of a report's sends: parsed, each occurrence
    is its own object. A JWE hash is kept as it is: it repeats at most in its
    receipt, and an interned string costs a slot of its own.
    """

    def __init__(self) -> None:
        self._tuples: dict[tuple[str, ...], tuple[str, ...]] = {}

    def keys(self, values: Iterable[str]) -> tuple[str, ...]:
        """``values`` (disclosure keys, members) as a shared tuple of shared strings."""
        kept = tuple(map(sys.intern, values))
        return self._tuples.setdefault(kept, kept)

    def send(self, member: str, e: _Entry, made_after: str | None = None) -> Send:
        """The record of a ``sent`` or ``withheld`` entry of ``member``'s log."""
        s = sys.intern
        rel_to = None if e["rel_to"] is None else self.keys(e["rel_to"])
        kid, reason = e.get("recipient_kid"), e.get("reason")
        return Send(
            member, e["seq"], s(e["at"]), s(e["partner"]), s(e["report_id"]), s(e["kind"]),
            s(e["originator"]), s(e["tlp"]), rel_to, self.keys(e["released"]),
            s(e["policy_digest"]), e["jwe_sha256"], None if kid is None else s(kid),
            None if reason is None else s(reason), made_after,
        )  # fmt: skip

    def receipt(self, member: str, e: _Entry) -> Receipt:
        """The record of a ``received`` entry of ``member``'s log."""
        s = sys.intern
        kid = e.get("recipient_kid")
        return Receipt(
            member, e["seq"], s(e["sender"]), s(e["report_id"]), s(e["kind"]),
            self.keys(e["fields"]), e["jwe_sha256"], None if kid is None else s(kid),
        )  # fmt: skip

    def rejection(self, member: str, e: _Entry) -> Rejection:
        """The record of a ``rejected`` entry (one that names a JWE) of ``member``'s log."""
        s = sys.intern
        report = e["report_id"]
        return Rejection(
            member, e["seq"], s(e["source"]), s(e["step"]), None if report is None else s(report),
            e["jwe_sha256"],
        )  # fmt: skip


_R = TypeVar("_R", Send, Receipt)


class _Repeats(Generic[_R]):
    """One log's entries of one type by JWE hash: honest repeats and conflicting ones.

    Only a repeat costs more than a dictionary lookup (its content made hashable),
    and the versions of one JWE are a set, so appending many repeats stays linear.
    """

    def __init__(self, keep: Callable[[_Entry], _R]) -> None:
        self.first: dict[str, _R] = {}  # JWE -> the record of its first entry
        self._versions: dict[str, set[_Version]] = {}
        self._keep: Callable[[_Entry], _R] = keep

    def add(self, entry: _Entry) -> tuple[_R | None, _R | None]:
        """The earlier record ``entry`` repeats (``None`` if none), and its own if it is new.

        The second is ``None`` for a repeat whose content is not new (an honest one).
        """
        key = entry["jwe_sha256"]
        earlier = self.first.get(key)
        if earlier is None:
            record = self.first[key] = self._keep(entry)
            return None, record
        seen = self._versions.get(key)
        if seen is None:
            seen = self._versions[key] = {_version(earlier.entry())}
        version = _version(entry)
        if version in seen:
            return earlier, None
        seen.add(version)
        return earlier, self._keep(entry)


@dataclass(slots=True)
class Index:
    """What the logs say of each JWE hash, as records in the order read.

    ``sends`` holds each log's distinct versions of a ``sent`` or ``withheld``
    entry (the first entry of each), ``receipts`` each log's first ``received`` entry (its
    repeats are checked against it where they are read), ``rejections`` every
    ``rejected`` entry; ``bulk`` the ``rejected_many`` entries, which name no
    JWE, by (source, the log's member).
    """

    sends: dict[str, list[Send]] = field(default_factory=dict)
    receipts: dict[str, list[Receipt]] = field(default_factory=dict)
    rejections: dict[str, list[Rejection]] = field(default_factory=dict)
    bulk: dict[tuple[str, str], BulkRefusals] = field(default_factory=dict)
    more_kids: dict[tuple[str, str], list[tuple[str, int]]] = field(default_factory=dict)
    """(log's member, JWE) -> recipient keys its ``sent`` and ``withheld`` entries name
    that its first record does not hold, each with the entry that first names it
    (``_read_kid``)."""
    more_receipt_kids: dict[tuple[str, str], list[tuple[str, int]]] = field(default_factory=dict)
    """The same of its ``received`` entries: keys its first receipt does not name."""

    def send_kids(self, send: Send) -> tuple[str, ...]:
        """Every recipient key the entries of ``send``'s JWE in its log name (its own first)."""
        more = self.more_kids.get((send.member, send.jwe_sha256)) if self.more_kids else None
        return _kids(send.recipient_kid, more)

    def receipt_kids(self, recv: Receipt) -> tuple[str, ...]:
        """Every key the ``received`` entries of ``recv``'s JWE in its log name (its own first)."""
        pair = (recv.member, recv.jwe_sha256)
        more = self.more_receipt_kids.get(pair) if self.more_receipt_kids else None
        return _kids(recv.recipient_kid, more)


def _kids(first: str | None, more: list[tuple[str, int]] | None) -> tuple[str, ...]:
    if more is None:  # almost always: one key, or none (an older format)
        return () if first is None else (first,)
    return tuple(dict.fromkeys([*([first] if first else []), *(k for k, _ in more)]))


def read_log(
    member: str,
    entries: Iterable[Mapping[str, Any]],
    ticks: Iterator[None] | None,
    index: Index,
    findings: list[Finding],
    pool: Pool,
) -> None:
    """Index one log's sends, receipts and rejections; check what the log alone can tell."""
    timeline = PolicyTimeline()
    sent = _Repeats(lambda e: pool.send(member, e, timeline.arrived_at(member, e)))
    withheld = _Repeats(lambda e: pool.send(member, e, timeline.arrived_at(member, e)))
    older = _OlderFormat()
    received = _Repeats(lambda e: pool.receipt(member, e))
    refused: dict[tuple[str, str], Rejection] = {}  # (JWE, source) -> its first rejection
    for entry in entries:
        if ticks is not None:
            next(ticks, None)
        kind = entry["type"]
        older.read(entry)
        if entry["member"] != member:
            # Counted as this log's, it would stand in for a missing entry
            # (a receipt, a send, a policy change) of the member it names.
            findings.append(
                Finding(
                    "wrong-member",
                    member,
                    entry["seq"],
                    entry.get("report_id"),
                    f"a {kind} entry that names {entry['member']}, in {member}'s log",
                )
            )
        elif kind in ("sent", "withheld"):
            # A withheld entry too: it names the policy of the envelope, made and
            # perhaps published (a start may log a new policy before it, which the
            # timeline allows: any policy in force since the report's arrival).
            _read_send(member, entry, sent if kind == "sent" else withheld, index, findings)
            # Read after ``_read_send``: the JWE has a record.
            mine = next(r for r in index.sends[entry["jwe_sha256"]] if r.member == member)
            _read_kid(member, entry, mine, index.more_kids, findings)
            problem = timeline.not_in_force(member, entry)
            if problem is not None:
                findings.append(
                    Finding(
                        "policy-not-in-force",
                        member,
                        entry["seq"],
                        entry["report_id"],
                        f"to {entry['partner']}: {problem}",
                    )
                )
        elif kind in ("accepted", "received"):
            if kind == "received":
                _read_receipt(member, entry, received, refused, index, findings)
                first = received.first[entry["jwe_sha256"]]
                _read_kid(member, entry, first, index.more_receipt_kids, findings)
            timeline.add_arrival(entry)
        elif kind == "policy":
            problem = timeline.add_policy(entry)
            if problem is not None:
                findings.append(Finding("policy-chain", member, entry["seq"], None, problem))
        elif kind == "rejected" and entry["jwe_sha256"] is not None:
            _read_rejection(pool.rejection(member, entry), received, refused, index, findings)
        elif kind == "rejected_many":
            index.bulk.setdefault((entry["source"], member), BulkRefusals()).add(entry)
    if older.after:
        findings.append(older.finding(member))


class _OlderFormat:
    """Entries of an older format after the log's first of a newer one (a downgrade).

    A node writes only its own format, so a log's versions rise: an older one after a
    newer one is an older build run on the log (a rollback: docs/DEPLOY.md) or entries
    its owner rewrote. Either way what the newer format records is missing there: a
    format-1 ``sent`` entry names no recipient key, which the key checks then cannot
    judge (a review rewrote a member's sends to a stolen key so). One finding a log.
    """

    def __init__(self) -> None:
        self.newest = 0
        self.newest_from = 0  # the first entry of the newest version
        self.after = 0  # entries of an older version after it
        self.first = 0

    def read(self, entry: _Entry) -> None:
        """Note ``entry``'s version."""
        v = entry["v"]
        if v > self.newest:
            self.newest, self.newest_from = v, entry["seq"]
        elif v < self.newest:
            if not self.after:
                self.first = entry["seq"]
            self.after += 1

    def finding(self, member: str) -> Finding:
        """The log's one ``older-format`` finding."""
        return Finding(
            "older-format",
            member,
            self.first,
            None,
            f"{self.after} entries of an older format after entry {self.newest_from}, the"
            f" log's first of format {self.newest}: an older build ran on this log (a"
            " rollback), or its owner rewrote them; what the newer format records is"
            " missing there (a format-1 sent entry names no recipient key, a format-1 or"
            " format-2 received entry none it opened the envelope with)",
        )


def _read_send(
    member: str, entry: _Entry, sent: _Repeats[Send], index: Index, findings: list[Finding]
) -> None:
    """Index a ``sent`` or ``withheld`` entry: a new version of its JWE's, or an honest repeat."""
    earlier, record = sent.add(entry)
    if record is not None:
        index.sends.setdefault(record.jwe_sha256, []).append(record)
        if earlier is not None:
            findings.append(_conflicting_repeat(member, entry, earlier))


def _read_kid(
    member: str,
    entry: _Entry,
    first: Send | Receipt,
    more_kids: dict[tuple[str, str], list[tuple[str, int]]],
    findings: list[Finding],
) -> None:
    """Check that the entries of a JWE of one type in one log name one key; keep any other.

    Apart from the rest of a repeat: a format 1 ``sent`` entry names none, nor a
    format 1 or 2 ``received`` one, and its repeat by an upgraded node may. ``first``
    is the record of the log's first entry of that JWE (a ``sent`` or ``withheld``
    one, or a ``received`` one). A key it does not hold is kept in ``more_kids``
    (rare: that upgrade, or entries that contradict each other, each key of which is
    checked).
    """
    kid = entry.get("recipient_kid")
    if kid is None:
        return
    if kid == first.recipient_kid:
        return
    jwe = entry["jwe_sha256"]
    pair = (member, jwe)
    more = more_kids.get(pair, [])
    if any(kid == k for k, _ in more):
        return
    named = ([(first.recipient_kid, first.seq)] if first.recipient_kid else []) + more
    if named:
        findings.append(
            Finding(
                "conflicting-repeat",
                member,
                entry["seq"],
                entry["report_id"],
                f"repeat of entry {named[0][1]} (same JWE) differs from it in recipient_kid",
            )
        )
    more_kids.setdefault(pair, []).append((sys.intern(kid), entry["seq"]))


def _read_rejection(
    refusal: Rejection,
    received: _Repeats[Receipt],
    refused: dict[tuple[str, str], Rejection],
    index: Index,
    findings: list[Finding],
) -> None:
    """Index a ``rejected`` entry; a rejection of what the log received is a conflict."""
    jwe, source = refusal.jwe_sha256, refusal.source
    index.rejections.setdefault(jwe, []).append(refusal)
    recv = received.first.get(jwe)
    if recv is not None and recv.sender == source:
        # The receiver acks a stored envelope again without verifying it: an
        # honest node never refuses what it logged as received from that sender.
        findings.append(
            Finding(
                "conflicting-entries",
                refusal.member,
                refusal.seq,
                refusal.report_id,
                f"rejection of a JWE from {source} that entry {recv.seq} logs as received",
            )
        )
    refused.setdefault((jwe, source), refusal)


def _read_receipt(
    member: str,
    entry: _Entry,
    received: _Repeats[Receipt],
    refused: Mapping[tuple[str, str], Rejection],
    index: Index,
    findings: list[Finding],
) -> None:
    """Index a ``received`` entry: a log's first of its JWE, an honest repeat, or a conflict."""
    jwe, sender = entry["jwe_sha256"], entry["sender"]
    earlier, record = received.add(entry)
    if record is not None:
        if earlier is None:
            index.receipts.setdefault(record.jwe_sha256, []).append(record)
        else:
            findings.append(_conflicting_repeat(member, entry, earlier))
    refusal = refused.get((jwe, sender))
    if refusal is not None:
        findings.append(
            Finding(
                "conflicting-entries",
                member,
                entry["seq"],
                entry["report_id"],
                f"receipt of a JWE from {sender} that entry {refusal.seq} logs as rejected",
            )
        )


def _conflicting_repeat(member: str, entry: _Entry, earlier: Send | Receipt) -> Finding:
    return Finding(
        "conflicting-repeat",
        member,
        entry["seq"],
        entry["report_id"],
        f"repeat of entry {earlier.seq} (same JWE) differs from it in "
        + _differing(entry, earlier.entry()),
    )
