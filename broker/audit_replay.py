"""Replay several nodes' audit logs (pure): a timeline, a who-sent-to-whom matrix, and findings.

Inputs are logs already verified by ``broker.audit_verify`` (parsed entries by
member) and the policies the auditor holds (by digest). Within each log:

* every entry names the log's own member, else ``wrong-member`` (and the entry
  is left out of everything else);
* each ``policy`` entry's ``previous_digest`` is the digest of the log's
  previous ``policy`` entry (``null`` for the first), else ``policy-chain``;
* each send's policy was in force between the report's arrival in the log and
  the send, else ``policy-not-in-force`` (see ``PolicyTimeline``);
* a send releases at least one disclosure key, else ``empty-send``;
* a repeat of a ``sent`` or ``received`` entry (same JWE hash) repeats it
  exactly, but for its time and place in the log (a node's repeat after a
  crash), else ``conflicting-repeat``; every distinct version of a send is
  checked against the policy, not only the last;
* no JWE is both received and rejected from the same sender, else
  ``conflicting-entries``.

Across logs:

* every send has a receive with the same JWE hash in the partner's log, else it
  is ``undelivered`` (or ``rejected`` when the partner logged a rejection of it,
  as it came from the sender); when the partner's log also counts refusals of
  the sender's messages in bulk (``rejected_many``, which name no message), the
  finding says how many, at which steps and when, but not that this send was
  one of them;
* every receive has a send with the same JWE hash in the sender's log, else it
  is an ``unmatched-receive`` (the sender's log lost or never had the send);
* a receive names the same sender, report, kind and disclosure keys as its
  send, and a rejection that names a report names the send's, else ``mismatch``;
* a receipt or rejection of a sent JWE is in the log of the member it was sent
  to, else ``receipt-by-non-recipient`` or ``rejection-by-non-recipient``;
* a JWE is sent in one log only, and (when no log given sends it) received in
  one log only, else ``conflicting-entries``;
* each send's disclosure keys are what the sender's policy (found by the
  digest the entry names) releases to that partner for that kind and marking;
  anything else is an ``over-disclosure``.

A member can append entries to its own log (its witnesses cosign what it
appends), so no conclusion rests on the last entry of a JWE, or on the order in
which the logs are given. Logs not given are not guessed at: their side is
reported as ``not-checked``.

``verified_entries`` parses a verified log's entries only if their bytes are the
ones verified; ``iter_verified_entries`` streams them, so that replay keeps only
what it needs of each entry (``_Send``, ``_Receipt``, ``_Rejection``), never the
logs themselves: a year of logs is millions of entries.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Generic, Protocol, TypeVar

from broker.audit_events import VERSION, parse_entry
from broker.audit_policy import (
    PolicyTimeline,
    over_disclosures_for,
    releases_anything_for,
)
from broker.errors import AuditError
from broker.merkle import CompactRange, leaf_hash
from broker.policy import Policy
from broker.sightings import KINDS


@dataclass(frozen=True, slots=True)
class Exchange:
    """One send, with what became of it."""

    at: str
    sender: str
    recipient: str
    report_id: str
    kind: str
    tlp: str
    rel_to: tuple[str, ...] | None
    policy_digest: str
    released: tuple[str, ...]
    jwe_sha256: str
    status: str  # delivered | undelivered | rejected | not-checked
    seq: int
    refused_at: str | None = None
    """For a ``rejected`` send, the recipient's checklist step that refused it."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One reconciliation problem, pinned to a member's log entry."""

    kind: str
    member: str
    seq: int
    report_id: str | None
    detail: str


@dataclass(slots=True)
class BulkRefusals:
    """What one log's ``rejected_many`` entries count of one source: how many, never which."""

    count: int = 0
    entries: int = 0
    steps: Counter[str] = field(default_factory=Counter)
    first: str = ""
    """The earliest entry's ``at`` (RFC 3339 UTC to the second: text order is time order)."""
    last: str = ""

    def add(self, entry: Mapping[str, Any]) -> None:
        """Count one ``rejected_many`` entry."""
        self.count += entry["count"]
        self.entries += 1
        self.steps.update(entry["steps"])
        self.first = min(self.first or entry["at"], entry["at"])
        self.last = max(self.last, entry["at"])

    def describe(self) -> str:
        """``format 100, size 40; <first> to <last>``: at which steps, and when.

        At most ``DESCRIBED_STEPS`` steps, the most counted: a receiver's log names
        its steps, any number, and every undelivered send of that sender quotes
        this (a fuzzer: 4,000 steps made 1 GB of findings of 4,000 sends).
        """
        ranked = sorted(self.steps.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{step} {n}" for step, n in sorted(ranked[:DESCRIBED_STEPS]))
        more = len(ranked) - DESCRIBED_STEPS
        if more > 0:
            shown += f" and {more} more steps"
        return f"{shown}; {self.first} to {self.last}"


DESCRIBED_STEPS = 20
"""How many steps a bulk refusal's description names (the checklist has 17)."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The result: exchanges in time order, the delivered-sends matrix, and findings."""

    exchanges: tuple[Exchange, ...]
    matrix: Mapping[tuple[str, str], int]
    findings: tuple[Finding, ...]
    unchecked_receipts: int = 0
    """Receipts from members whose logs were not given: nothing to check them against."""
    bulk_refusals: Mapping[tuple[str, str], BulkRefusals] = field(default_factory=dict)
    """(source, recipient) -> the refusals the recipient's log counts without naming them."""
    resent_to_holder: frozenset[tuple[str, int]] = frozenset()
    """(sender, seq) of sends of a report the partner already held, among its bulk replays."""

    def statuses(self) -> Counter[str]:
        """How many sends ended in each status."""
        return Counter(e.status for e in self.exchanges)

    def never_delivered(self) -> list[Exchange]:
        """Per (sender, recipient, report), the last send when every send was refused.

        Not a finding (both logs agree on what happened), but a report the
        recipient does not hold: ``msmt node resend --report`` sends it again.
        """
        last: dict[tuple[str, str, str], Exchange] = {}
        delivered: set[tuple[str, str, str]] = set()
        for e in self.exchanges:
            key = (e.sender, e.recipient, e.report_id)
            if e.status == "rejected":
                last[key] = e
            elif e.status != "not-checked":
                delivered.add(key)
        return [e for key, e in last.items() if key not in delivered]

    def recovered(self) -> list[Exchange]:
        """Sends the partner never logged whose report a later send delivered to it.

        The hub lost them (or never stored them) and ``msmt node resend`` sent the
        report again: not findings, but shown, so a recovery can be checked.
        """
        return [
            e
            for e in self._undelivered(flagged=False)
            if (e.sender, e.seq) not in self.resent_to_holder
        ]

    def resent(self) -> list[Exchange]:
        """Sends of a report the partner already held, refused among its bulk ``replay`` counts.

        Not findings (``_resent_to_holder``), but shown: a ``resend --since`` makes many.
        """
        return [e for e in self.exchanges if (e.sender, e.seq) in self.resent_to_holder]

    def unlogged(self) -> list[Exchange]:
        """Sends the partner never logged that no later send made good: the findings."""
        return self._undelivered(flagged=True)

    def _undelivered(self, *, flagged: bool) -> list[Exchange]:
        findings = {(f.member, f.seq) for f in self.findings if f.kind == "undelivered"}
        return [
            e
            for e in self.exchanges
            if e.status == "undelivered" and ((e.sender, e.seq) in findings) == flagged
        ]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form for tools (``msmt audit replay --json`` prints ``json_text()``)."""
        return dict(self._json_summary(), exchanges=[_exchange_json(e) for e in self.exchanges])

    def json_text(self) -> Iterator[str]:
        """``to_json()`` as JSON text, in pieces: the findings first, the exchanges last.

        Each list item is one line. Written piece by piece, the exchanges of a long
        replay are never one string, or one list of dicts, in memory.
        """
        yield "{"
        for key, value in self._json_summary():
            yield f"\n  {_JSON(key)}: "
            if isinstance(value, list):
                yield from _json_list(value)
            else:
                yield _JSON(value)
            yield ","
        yield '\n  "exchanges": '
        yield from _json_list(_exchange_json(e) for e in self.exchanges)
        yield "\n}"

    def _json_summary(self) -> Iterator[tuple[str, Any]]:
        yield "findings", [asdict(f) for f in self.findings]
        yield "unchecked_receipts", self.unchecked_receipts
        yield (
            "matrix",
            [
                {"sender": s, "recipient": r, "delivered": n}
                for (s, r), n in sorted(self.matrix.items())
            ],
        )
        yield (
            "never_delivered",
            [
                {
                    "sender": e.sender,
                    "recipient": e.recipient,
                    "report_id": e.report_id,
                    "refused_at": e.refused_at,
                }
                for e in self.never_delivered()
            ],
        )
        yield (
            "recovered",
            [
                {
                    "sender": e.sender,
                    "recipient": e.recipient,
                    "report_id": e.report_id,
                    "seq": e.seq,
                }
                for e in self.recovered()
            ],
        )
        yield (
            "resent_to_holder",
            [
                {
                    "sender": e.sender,
                    "recipient": e.recipient,
                    "report_id": e.report_id,
                    "seq": e.seq,
                }
                for e in self.resent()
            ],
        )
        yield (
            "bulk_refusals",
            [
                {
                    "source": source,
                    "recipient": recipient,
                    "count": b.count,
                    "entries": b.entries,
                    "steps": dict(sorted(b.steps.items())),
                    "first": b.first,
                    "last": b.last,
                }
                for (source, recipient), b in sorted(self.bulk_refusals.items())
            ],
        )


_JSON = json.JSONEncoder().encode
"""The C encoder (``indent`` would select the pure-Python one, ten times slower)."""


def _json_list(items: Iterable[Any]) -> Iterator[str]:
    """A JSON array, one item a line."""
    yield "["
    sep = "\n    "
    for item in items:
        yield sep + _JSON(item)
        sep = ",\n    "
    yield "]" if sep == "\n    " else "\n  ]"


def _exchange_json(e: Exchange) -> dict[str, Any]:
    # Not asdict(), which deep-copies every field: it cost more than the encoding itself.
    return {
        "at": e.at,
        "sender": e.sender,
        "recipient": e.recipient,
        "report_id": e.report_id,
        "kind": e.kind,
        "tlp": e.tlp,
        "rel_to": None if e.rel_to is None else list(e.rel_to),
        "policy_digest": e.policy_digest,
        "released": list(e.released),
        "jwe_sha256": e.jwe_sha256,
        "status": e.status,
        "seq": e.seq,
        "refused_at": e.refused_at,
    }


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

_REPEAT_MAY_DIFFER = frozenset({"at", "seq", "prev"})
"""The fields in which an honest repeat of an entry differs from the entry it repeats.

A node that crashes between logging an event and the store write it describes
logs the same event again when it redoes the work (docs/AUDIT.md): the
publisher builds a repeated ``sent`` entry from the same outbox row and the
receiver a repeated ``received`` entry from the same envelope, so only the
time it is logged and its place in the log change.
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
# values shared (``_Pool``). A parsed entry is a dict of ~2.5 KB; a log holds
# hundreds of thousands. Each record holds every field the checks read, and
# ``entry()`` gives back what a repeat is compared with (all but ``at`` and ``prev``
# for a receipt, ``prev`` for a send; ``v`` and ``type`` are known, and ``member``
# is the log's own, since entries naming another member are left out).


@dataclass(frozen=True, slots=True)
class _Send:
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

    def entry(self) -> dict[str, Any]:
        return _as_entry(self, "sent")


@dataclass(frozen=True, slots=True)
class _Receipt:
    member: str
    seq: int
    sender: str
    report_id: str
    kind: str
    fields: tuple[str, ...]
    jwe_sha256: str

    def entry(self) -> dict[str, Any]:
        return _as_entry(self, "received")


@dataclass(frozen=True, slots=True)
class _Rejection:
    member: str
    seq: int
    source: str
    step: str
    report_id: str | None
    jwe_sha256: str


def _as_entry(record: _Send | _Receipt, kind: str) -> dict[str, Any]:
    values = ((f.name, getattr(record, f.name)) for f in fields(record))
    entry = {k: list(v) if isinstance(v, tuple) else v for k, v in values}
    return entry | {"v": VERSION, "type": kind}


class _Kept(Protocol):
    """What every record has: the log it came from and the entry's place in it."""

    @property
    def member(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def report_id(self) -> str | None: ...


class _Pool:
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

    def send(self, member: str, e: _Entry) -> _Send:
        """The record of a ``sent`` entry of ``member``'s log."""
        s = sys.intern
        rel_to = None if e["rel_to"] is None else self.keys(e["rel_to"])
        return _Send(
            member, e["seq"], s(e["at"]), s(e["partner"]), s(e["report_id"]), s(e["kind"]),
            s(e["originator"]), s(e["tlp"]), rel_to, self.keys(e["released"]),
            s(e["policy_digest"]), e["jwe_sha256"],
        )  # fmt: skip

    def receipt(self, member: str, e: _Entry) -> _Receipt:
        """The record of a ``received`` entry of ``member``'s log."""
        s = sys.intern
        return _Receipt(
            member, e["seq"], s(e["sender"]), s(e["report_id"]), s(e["kind"]),
            self.keys(e["fields"]), e["jwe_sha256"],
        )  # fmt: skip

    def rejection(self, member: str, e: _Entry) -> _Rejection:
        """The record of a ``rejected`` entry (one that names a JWE) of ``member``'s log."""
        s = sys.intern
        report = e["report_id"]
        return _Rejection(
            member, e["seq"], s(e["source"]), s(e["step"]), None if report is None else s(report),
            e["jwe_sha256"],
        )  # fmt: skip


_R = TypeVar("_R", _Send, _Receipt)


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
class _Index:
    """What the logs say of each JWE hash, as records in the order read.

    ``sends`` holds each log's distinct versions of a ``sent`` entry (the first
    entry of each), ``receipts`` each log's first ``received`` entry (its
    repeats are checked against it where they are read), ``rejections`` every
    ``rejected`` entry; ``bulk`` the ``rejected_many`` entries, which name no
    JWE, by (source, the log's member).
    """

    sends: dict[str, list[_Send]] = field(default_factory=dict)
    receipts: dict[str, list[_Receipt]] = field(default_factory=dict)
    rejections: dict[str, list[_Rejection]] = field(default_factory=dict)
    bulk: dict[tuple[str, str], BulkRefusals] = field(default_factory=dict)


def replay(
    logs: Mapping[str, Iterable[Mapping[str, Any]]],
    policies: Mapping[str, Policy],
    *,
    progress: Iterable[None] | None = None,
) -> Replay:
    """Reconcile the parsed entries of each member's log (``logs[member]``).

    Each log's entries are read once, in order, so they may be an iterator
    (``iter_verified_entries``): only what the checks need of them is kept.
    ``policies`` maps policy digests to loaded policies. ``progress``, if
    given, is advanced once per entry (a click progress bar, say).

    No conclusion depends on the order of the logs or on which of several
    entries of one JWE comes last: a member can append entries to its own log
    (its witnesses cosign whatever it appends), so every entry of a JWE is
    weighed, and entries that contradict each other are findings.
    """
    ticks = iter(progress) if progress is not None else None
    index = _Index()
    findings: list[Finding] = []
    pool = _Pool()
    for member, entries in logs.items():
        _read_log(member, entries, ticks, index, findings, pool)
    given = frozenset(logs)
    answers = _PolicyAnswers(policies)
    exchanges: list[Exchange] = []
    delivered: set[tuple[str, str, str]] = set()  # (sender, recipient, JWE): counted once
    described = {pair: bulk.describe() for pair, bulk in index.bulk.items()}
    for jwe, versions in index.sends.items():
        findings += _sent_in_several_logs(versions)
        refusals = _refusals_by_pair(index.rejections.get(jwe, ()))
        findings += _refusal_mismatches(jwe, versions, given, index, refusals)
        for send in versions:
            # Every version is checked against the policy: a later one cannot
            # stand in for an earlier one that disclosed more.
            status, refused_at = _send_status(
                jwe, send, given, index, refusals, described, findings
            )
            if status == "delivered":
                delivered.add((send.member, send.partner, jwe))
            exchanges.append(
                Exchange(
                    send.at,
                    send.member,
                    send.partner,
                    send.report_id,
                    send.kind,
                    send.tlp,
                    send.rel_to,
                    send.policy_digest,
                    send.released,
                    jwe,
                    status,
                    send.seq,
                    refused_at,
                )
            )
            findings += _check_release(send, answers)
        findings += _not_the_recipient(jwe, versions, index)
    for jwe, receipts in index.receipts.items():
        if jwe in index.sends:
            continue
        for recv in receipts:
            sender = recv.sender
            kind = "unmatched-receive" if sender in given else "not-checked"
            findings.append(
                Finding(
                    kind,
                    recv.member,
                    recv.seq,
                    recv.report_id,
                    f"received from {sender} but {sender}'s log "
                    + ("has no matching send" if sender in given else "was not given"),
                )
            )
        # An envelope is encrypted to one member: two cannot both have opened it.
        findings += _in_several_logs(receipts, "a receipt")
    matrix = Counter((sender, recipient) for sender, recipient, _ in delivered)
    exchanges.sort(key=lambda e: (e.at, e.sender, e.seq))
    findings = _resent_after_loss(exchanges, findings)
    findings, held = _resent_to_holder(exchanges, findings, index.bulk)
    findings.sort(key=lambda f: (f.member, f.seq, f.kind))
    return Replay(
        tuple(exchanges),
        dict(matrix),
        tuple(f for f in findings if f.kind != "not-checked"),
        sum(f.kind == "not-checked" for f in findings),
        index.bulk,
        held,
    )


def _resent_after_loss(exchanges: Sequence[Exchange], findings: list[Finding]) -> list[Finding]:
    """Drop ``undelivered`` findings for sends a later send of the report made good.

    A send the partner never logged (the hub lost it, docs/RELIABILITY.md) whose
    report a later send from the same sender delivered to the same partner
    (``msmt node resend``) is a loss recovered, not a discrepancy: both logs
    agree the partner holds the report. The send keeps its ``undelivered``
    status in the timeline, and ``Replay.recovered`` lists it.
    """
    delivered_at: dict[tuple[str, str, str], int] = {}
    for e in exchanges:
        if e.status == "delivered":
            key = (e.sender, e.recipient, e.report_id)
            delivered_at[key] = max(delivered_at.get(key, -1), e.seq)
    lost = {
        (e.sender, e.seq)
        for e in exchanges
        if e.status == "undelivered"
        and delivered_at.get((e.sender, e.recipient, e.report_id), -1) > e.seq
    }
    return [f for f in findings if not (f.kind == "undelivered" and (f.member, f.seq) in lost)]


def _resent_to_holder(
    exchanges: Sequence[Exchange],
    findings: list[Finding],
    bulk: Mapping[tuple[str, str], BulkRefusals],
) -> tuple[list[Finding], frozenset[tuple[str, int]]]:
    """Drop ``undelivered`` findings for sends of a report the partner already held.

    ``msmt node resend --since`` sends again every report of its window, most of
    which the partner received before: it refuses those at ``replay``, and past
    60 a minute only counts them (``rejected_many``). A send the partner never
    named, of a report an earlier send from the same sender delivered to it, is
    one of those refusals if the partner's log counts at least as many bulk
    ``replay`` refusals of that sender as there are such sends; otherwise each
    stays a finding (some were lost). Returns the findings left and the
    ``(sender, seq)`` of the sends taken as refused so (a clock trial's resend
    left 552 findings, every one a report the partner held).
    """
    first: dict[tuple[str, str, str], int] = {}
    for e in exchanges:
        if e.status == "delivered":
            key = (e.sender, e.recipient, e.report_id)
            first[key] = min(first.get(key, e.seq), e.seq)
    unlogged = {(f.member, f.seq) for f in findings if f.kind == "undelivered"}
    again: dict[tuple[str, str], list[tuple[str, int]]] = {}
    for e in exchanges:
        if (
            e.status == "undelivered"
            and (e.sender, e.seq) in unlogged
            and first.get((e.sender, e.recipient, e.report_id), e.seq) < e.seq
        ):
            again.setdefault((e.sender, e.recipient), []).append((e.sender, e.seq))
    held = frozenset(
        send
        for pair, sends in again.items()
        if (counted := bulk.get(pair)) is not None and len(sends) <= counted.steps["replay"]
        for send in sends
    )
    kept = [f for f in findings if not (f.kind == "undelivered" and (f.member, f.seq) in held)]
    return kept, held


def _in_several_logs(records: Sequence[_Kept], what: str) -> list[Finding]:
    """One ``conflicting-entries`` finding per log, when more than one log holds ``what``."""
    if len(records) < 2:
        return []  # the usual case, kept cheap: one per JWE
    firsts: dict[str, _Kept] = {}
    for record in records:
        firsts.setdefault(record.member, record)
    if len(firsts) < 2:
        return []
    return [
        Finding(
            "conflicting-entries",
            member,
            record.seq,
            record.report_id,
            ", ".join(f"{m}'s entry {r.seq}" for m, r in firsts.items() if m != member)
            + f" also logs {what} of this JWE",
        )
        for member, record in firsts.items()
    ]


def _sent_in_several_logs(versions: Sequence[_Send]) -> list[Finding]:
    # Only the member whose node published an envelope logs it as sent; a send of
    # the same bytes in another log would stand in for (or hide) the real one.
    return _in_several_logs(versions, "a send")


def _not_the_recipient(jwe: str, versions: Sequence[_Send], index: _Index) -> list[Finding]:
    """Receipts and rejections of a sent JWE in the log of a member it was not sent to.

    Only the partner can open the envelope, so another member's receipt is
    false; another member's rejection means the envelope reached a member it was
    not sent to (or the rejection is false). Either way the log that holds it is
    named, never the sender's or the partner's.
    """
    receipts, refusals = index.receipts.get(jwe, ()), index.rejections.get(jwe, ())
    if not receipts and not refusals:
        return []  # most sends: to a member whose log was not given
    recipients = {send.partner for send in versions}
    receipts = [r for r in receipts if r.member not in recipients]
    refusals = [r for r in refusals if r.member not in recipients]
    if not receipts and not refusals:
        return []
    send = versions[0]
    where = f"that {send.member}'s entry {send.seq} sent to {send.partner}"
    found = [
        Finding(
            "receipt-by-non-recipient",
            recv.member,
            recv.seq,
            recv.report_id,
            f"received a JWE from {recv.sender} {where}, not to {recv.member}",
        )
        for recv in receipts
    ]
    found += [
        Finding(
            "rejection-by-non-recipient",
            refusal.member,
            refusal.seq,
            refusal.report_id,
            f"rejected a JWE from {refusal.source} {where}, not to {refusal.member}",
        )
        for refusal in refusals
    ]
    return found


def _refusals_by_pair(rejections: Iterable[_Rejection]) -> dict[tuple[str, str], list[_Rejection]]:
    """A JWE's rejections by (the log's member, the source it names), in log order."""
    grouped: dict[tuple[str, str], list[_Rejection]] = {}
    for r in rejections:
        grouped.setdefault((r.member, r.source), []).append(r)
    return grouped


def _received_by(jwe: str, partner: str, index: _Index) -> _Receipt | None:
    return next((r for r in index.receipts.get(jwe, ()) if r.member == partner), None)


def _refusal_mismatches(
    jwe: str,
    versions: Sequence[_Send],
    given: frozenset[str],
    index: _Index,
    refusals: Mapping[tuple[str, str], list[_Rejection]],
) -> list[Finding]:
    """Rejections of a JWE naming a report none of its sender's sends to that partner had.

    Once per rejection, against the first such send: per (send, rejection) pair, a
    member's log of k versions of one send and r rejections of it made k x r
    findings (a fuzzer: 2.5 GB for a 6,000-entry log).
    """
    found = []
    firsts: dict[tuple[str, str], _Send] = {}
    reports: dict[tuple[str, str], set[str]] = {}
    for send in versions:
        pair = (send.partner, send.member)
        firsts.setdefault(pair, send)
        reports.setdefault(pair, set()).add(send.report_id)
    for pair, first in firsts.items():
        partner, member = pair
        # A receipt outweighs a rejection of the same JWE (which, from the same sender,
        # is a conflicting-entries finding of the partner's log).
        if partner not in given or _received_by(jwe, partner, index) is not None:
            continue
        for refusal in refusals.get(pair, ()):
            if refusal.report_id is not None and refusal.report_id not in reports[pair]:
                found.append(
                    Finding(
                        "mismatch",
                        partner,
                        refusal.seq,
                        refusal.report_id,
                        f"rejection of {member}'s entry {first.seq} differs from it in report",
                    )
                )
    return found


def _send_status(
    jwe: str,
    send: _Send,
    given: frozenset[str],
    index: _Index,
    refusals: Mapping[tuple[str, str], list[_Rejection]],
    described: Mapping[tuple[str, str], str],
    findings: list[Finding],
) -> tuple[str, str | None]:
    member, partner = send.member, send.partner
    if partner not in given:
        return "not-checked", None
    recv = _received_by(jwe, partner, index)
    if recv is not None:
        # A receipt outweighs a rejection of the same JWE (which, from the
        # same sender, is a conflicting-entries finding of the partner's
        # log): the partner says it holds the report.
        _check_receipt(send, recv, findings)
        return "delivered", None
    # Only a refusal of the envelope as it came from its sender counts: the same
    # bytes passed on by a third member and refused say nothing of this send.
    refused = refusals.get((partner, member))
    if refused:
        return "rejected", refused[-1].step
    detail = f"sent to {partner}, which logged no receipt of this JWE"
    bulk = index.bulk.get((member, partner))
    if bulk is not None:
        # Counted refusals name no message: this send may be one of them, or lost.
        detail += (
            f"; {partner}'s log counts {bulk.count} refusals of {member}'s messages without"
            f" naming them ({described[(member, partner)]}): this send may or may not be"
            " among them"
        )
    findings.append(Finding("undelivered", member, send.seq, send.report_id, detail))
    return "undelivered", None


def _check_receipt(send: _Send, recv: _Receipt, findings: list[Finding]) -> None:
    differ = [
        what
        for what, theirs, ours in (
            ("sender", recv.sender, send.member),
            ("report", recv.report_id, send.report_id),
            ("kind", recv.kind, send.kind),
            ("disclosure keys", recv.fields, send.released),
        )
        if theirs != ours
    ]
    if differ:
        findings.append(
            Finding(
                "mismatch",
                recv.member,
                recv.seq,
                recv.report_id,
                f"receipt of {send.member}'s entry {send.seq} differs from it in "
                + " and ".join(differ),
            )
        )


def _read_log(
    member: str,
    entries: Iterable[Mapping[str, Any]],
    ticks: Iterator[None] | None,
    index: _Index,
    findings: list[Finding],
    pool: _Pool,
) -> None:
    """Index one log's sends, receipts and rejections; check what the log alone can tell."""
    timeline = PolicyTimeline()
    sent = _Repeats(lambda e: pool.send(member, e))
    received = _Repeats(lambda e: pool.receipt(member, e))
    refused: dict[tuple[str, str], _Rejection] = {}  # (JWE, source) -> its first rejection
    for entry in entries:
        if ticks is not None:
            next(ticks, None)
        kind = entry["type"]
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
        elif kind == "sent":
            _read_send(member, entry, sent, index, findings)
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
            timeline.add_arrival(entry)
        elif kind == "policy":
            problem = timeline.add_policy(entry)
            if problem is not None:
                findings.append(Finding("policy-chain", member, entry["seq"], None, problem))
        elif kind == "rejected" and entry["jwe_sha256"] is not None:
            _read_rejection(pool.rejection(member, entry), received, refused, index, findings)
        elif kind == "rejected_many":
            index.bulk.setdefault((entry["source"], member), BulkRefusals()).add(entry)


def _read_send(
    member: str, entry: _Entry, sent: _Repeats[_Send], index: _Index, findings: list[Finding]
) -> None:
    """Index a ``sent`` entry: a new version of its JWE's send, or an honest repeat."""
    earlier, record = sent.add(entry)
    if record is not None:
        index.sends.setdefault(record.jwe_sha256, []).append(record)
        if earlier is not None:
            findings.append(_conflicting_repeat(member, entry, earlier))


def _read_rejection(
    refusal: _Rejection,
    received: _Repeats[_Receipt],
    refused: dict[tuple[str, str], _Rejection],
    index: _Index,
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
    received: _Repeats[_Receipt],
    refused: Mapping[tuple[str, str], _Rejection],
    index: _Index,
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


def _conflicting_repeat(member: str, entry: _Entry, earlier: _Send | _Receipt) -> Finding:
    return Finding(
        "conflicting-repeat",
        member,
        entry["seq"],
        entry["report_id"],
        f"repeat of entry {earlier.seq} (same JWE) differs from it in "
        + _differing(entry, earlier.entry()),
    )


class _PolicyAnswers:
    """The policies given, asked each distinct question about a send only once.

    A policy's answer depends only on the send's partner, kind, markings and
    disclosure keys, which thousands of sends share: a year of sends asks a few
    hundred distinct questions.
    """

    def __init__(self, policies: Mapping[str, Policy]) -> None:
        self._policies = policies
        self._over: dict[tuple[Any, ...], list[str]] = {}
        self._anything: dict[tuple[Any, ...], bool] = {}

    def policy(self, send: _Send) -> Policy | None:
        """The sender's policy the send names, if it was given."""
        policy = self._policies.get(send.policy_digest)
        return policy if policy is not None and policy.member == send.member else None

    def over_disclosures(self, send: _Send, policy: Policy) -> list[str]:
        """``over_disclosures`` of the send."""
        s = send
        key = (policy.digest, s.partner, s.kind, s.tlp, s.originator, s.rel_to, s.released)
        found = self._over.get(key)
        if found is None:
            found = self._over[key] = over_disclosures_for(
                policy, s.partner, s.kind, s.tlp, s.originator, s.rel_to, s.released
            )
        return found

    def releases_anything(self, send: _Send, policy: Policy) -> bool:
        """``releases_anything`` for the send."""
        s = send
        key = (policy.digest, s.partner, s.kind, s.tlp, s.originator, s.rel_to)
        found = self._anything.get(key)
        if found is None:
            found = self._anything[key] = releases_anything_for(
                policy, s.partner, s.kind, s.tlp, s.originator, s.rel_to
            )
        return found


def _check_release(send: _Send, answers: _PolicyAnswers) -> list[Finding]:
    """Findings on what one send released: empty, under an unknown policy, or too much."""
    found = []
    member = send.member
    policy = answers.policy(send)
    if not send.released:
        # Even with no disclosure the message tells the partner that the report
        # exists, its kind and its markings; the node sends nothing instead.
        why = ""
        # Not for a kind this version does not know: it cannot judge that (unknown-kind).
        if (
            policy is not None
            and send.kind in KINDS
            and not answers.releases_anything(send, policy)
        ):
            why = "; the policy releases it nothing for this kind and these markings"
        found.append(
            Finding(
                "empty-send",
                member,
                send.seq,
                send.report_id,
                f"to {send.partner}: a message with no disclosure keys{why}",
            )
        )
    if send.kind not in KINDS:
        # A kind a later version added: this version cannot say what its policy
        # releases, which is not an over-disclosure of each key (a review).
        found.append(
            Finding(
                "unknown-kind",
                member,
                send.seq,
                send.report_id,
                f"to {send.partner}: a {send.kind} report, a kind this version of msmt does"
                " not know: replay with the sender's version or later to judge its release",
            )
        )
        return found
    if policy is None:
        found.append(
            Finding(
                "unknown-policy",
                member,
                send.seq,
                send.report_id,
                f"policy {send.policy_digest[:12]}... of {member} was not provided (give a"
                f" folder holding it as {member}/policy.toml with another --policies)",
            )
        )
        return found
    found += [
        Finding(
            "over-disclosure",
            member,
            send.seq,
            send.report_id,
            f"to {send.partner}: {problem}",
        )
        for problem in answers.over_disclosures(send, policy)
    ]
    return found
