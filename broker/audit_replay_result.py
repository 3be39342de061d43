"""What a replay of audit logs comes to: its exchanges, findings and bulk refusals, as JSON too.

``broker.audit_replay.replay`` builds a ``Replay``; ``msmt audit replay`` and the demo
read it. The types and their JSON form are apart from the checks that make them, which
change for other reasons; ``broker.audit_replay`` re-exports every name here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


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
    status: str  # delivered | undelivered | rejected | withheld | not-checked
    seq: int
    refused_at: str | None = None
    """For a ``rejected`` send, the recipient's checklist step that refused it."""
    recipient_kid: str | None = None
    """The partner's key it was encrypted to (None in a format-1 entry)."""
    withheld: bool = False
    """A ``withheld`` entry's: taken back at a start (``at`` is then, not a send's time)."""
    receipt_kid: str | None = None
    """The key the partner's receipt says opened it (None: no receipt, or one of format 1
    or 2, which names none)."""


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
    to_revoked: frozenset[tuple[str, int]] = frozenset()
    """(sender, seq) of sends encrypted to a partner's key the roster given has revoked."""
    keys_checked: bool = False
    """Whether recipient keys were checked (a roster was given)."""
    keyless_sends: int = 0
    """Envelopes sent whose entries name no recipient key (format 1): not checked."""
    keyed_receipts: bool = False
    """Whether a receipt names the key that opened its envelope (format 3), checked only
    given the roster like the sends' keys."""

    def statuses(self) -> Counter[str]:
        """How many sends ended in each status."""
        return Counter(e.status for e in self.exchanges)

    def never_delivered(self) -> list[Exchange]:
        """Per (sender, recipient, report), the last send when every send was refused.

        Not a finding (both logs agree on what happened), but a report the
        recipient does not hold: ``msmt node resend --report`` sends it again. Not
        those whose last refusal was ``replay`` (``refused_as_held``).
        """
        return [e for e in self._all_refused() if e.refused_at != "replay"]

    def refused_as_held(self) -> list[Exchange]:
        """As ``never_delivered``, the last refusal at ``replay``: the partner holds the report.

        From a send this log does not show (a sender restored from a backup sent its
        lost reports again from its feed: a drill), so sending it again is refused
        again. Not a finding either.
        """
        return [e for e in self._all_refused() if e.refused_at == "replay"]

    def _all_refused(self) -> list[Exchange]:
        last: dict[tuple[str, str, str], Exchange] = {}
        delivered: set[tuple[str, str, str]] = set()
        for e in self.exchanges:
            key = (e.sender, e.recipient, e.report_id)
            if e.status == "rejected":
                last[key] = e
            elif e.status not in ("not-checked", "withheld"):
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

    def sent_to_revoked_keys(self) -> list[Exchange]:
        """Sends encrypted to a partner's key revoked since (or before: a finding too).

        Whoever holds a revoked key can read what was encrypted to it: these are the
        reports whose originators must be told. Needs the roster, and entries that name
        the key: the send's (format 2) or its receipt's (format 3), either one revoked.
        """
        return [e for e in self.exchanges if (e.sender, e.seq) in self.to_revoked]

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
        yield "keys_checked", self.keys_checked
        yield "keyless_sends", self.keyless_sends
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
            "refused_as_held",
            [
                {"sender": e.sender, "recipient": e.recipient, "report_id": e.report_id}
                for e in self.refused_as_held()
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
            "sent_to_revoked_keys",
            [
                {
                    "sender": e.sender,
                    "recipient": e.recipient,
                    "report_id": e.report_id,
                    "recipient_kid": e.recipient_kid,
                    "receipt_kid": e.receipt_kid,
                    "seq": e.seq,
                    "at": e.at,
                    "entry": "withheld" if e.withheld else "sent",
                    "status": e.status,
                }
                for e in self.sent_to_revoked_keys()
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
        "recipient_kid": e.recipient_kid,
        "receipt_kid": e.receipt_kid,
        "entry": "withheld" if e.withheld else "sent",
    }
