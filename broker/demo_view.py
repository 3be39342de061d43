"""What ``msmt demo`` found, and its plain-text rendering (pure: no I/O).

The orchestration (``broker.demo``) fills an ``Outcome``; this module turns it
into the progress line, the exchange matrix, the side-by-side view of one
report as several partners received it, and the audit summary. The HTML
report (``broker.demo_report``) renders the same ``Outcome``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.transforms import split_variant_key

WITHHELD = "(withheld)"


@dataclass(frozen=True, slots=True)
class Tally:
    """One node's counters at one moment, read from its ``/metrics``."""

    accepted: int = 0
    sent: int = 0
    received: int = 0
    rejected: int = 0
    outbox: int = 0


@dataclass(frozen=True, slots=True)
class AuditResult:
    """``msmt audit verify`` on one node's log: ok, and the line it printed (or its error)."""

    member: str
    ok: bool
    detail: str
    size: int = 0
    cosigners: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Cell:
    """One field of a report as one partner received it."""

    value: str
    note: str  # "" (as sent), "withheld", or the transform applied ("coarsen:0.5")


@dataclass(frozen=True, slots=True)
class SideBySide:
    """One report: the originator's own record, and what each viewer received."""

    originator: str
    report_id: str
    kind: str
    viewers: tuple[str, ...]
    rows: tuple[tuple[str, str, tuple[Cell, ...]], ...]  # (path, original, cell per viewer)


@dataclass(frozen=True, slots=True)
class Point:
    """A vessel position as one viewer saw it."""

    lat: float
    lon: float
    label: str
    note: str


@dataclass
class Outcome:
    """Everything the demo measured, for the terminal summary and the HTML report."""

    members: tuple[str, ...]
    sightings: int
    elapsed: float
    expected: dict[tuple[str, str], set[str]]  # (sender, recipient) -> report ids released
    received: dict[tuple[str, str], set[str]]  # (sender, recipient) -> report ids stored
    rejected: dict[str, int]  # inbound rejections per recipient
    audits: list[AuditResult]
    replay_lines: list[str]
    replay_ok: bool
    replay_matrix: dict[tuple[str, str], int]
    side_by_side: list[SideBySide]
    timeline: list[tuple[float, str, str, str]]  # (seconds, sender, recipient, kind)
    vessels: dict[str, list[Point]]  # viewer (or "<M> (original)") -> points
    failures: list[str] = field(default_factory=list)

    def count(self, sender: str, recipient: str) -> int:
        """Reports ``recipient`` stored from ``sender``."""
        return len(self.received.get((sender, recipient), set()))

    def lost(self) -> int:
        """Released reports that never arrived."""
        return sum(len(ids - self.received.get(k, set())) for k, ids in self.expected.items())


def progress_lines(
    elapsed: float, submitted: int, total: int, tallies: Mapping[str, Tally]
) -> list[str]:
    """The live progress block: totals, then sent/received per member."""
    t = list(tallies.values())
    head = (
        f"{elapsed:5.1f}s  submitted {submitted}/{total}  accepted {sum(x.accepted for x in t)}  "
        f"sent {sum(x.sent for x in t)}  received {sum(x.received for x in t)}  "
        f"rejected {sum(x.rejected for x in t)}  outbox {sum(x.outbox for x in t)}"
    )
    cells = [f"{m} {x.sent:>4}>{x.received:<4}" for m, x in tallies.items()]
    return [head, "  " + "  ".join(cells[:6]), "  " + "  ".join(cells[6:])]


def matrix_lines(outcome: Outcome) -> list[str]:
    """The member-by-member matrix of reports received (rows: sender, columns: recipient)."""
    members = outcome.members
    lines = ["Reports exchanged (rows: sender, columns: recipient; stored/released)"]
    lines.append("       " + "".join(f"{r:>9}" for r in members) + "      sent")
    for s in members:
        cells = []
        for r in members:
            if s == r:
                cells.append(f"{'-':>9}")
                continue
            want = len(outcome.expected.get((s, r), set()))
            cells.append(f"{f'{outcome.count(s, r)}/{want}':>9}")
        total = sum(outcome.count(s, r) for r in members)
        lines.append(f"  {s}  " + "".join(cells) + f"{total:>10}")
    received = [sum(outcome.count(s, r) for s in members) for r in members]
    lines.append("  recv " + "".join(f"{n:>9}" for n in received))
    return lines


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"lat", "lon"}:
        return f"{value['lat']}, {value['lon']}"
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def side_by_side(
    originator: str,
    record: Mapping[str, Any],
    leaves: Mapping[str, Any],
    views: Mapping[str, Mapping[str, Any] | None],
) -> SideBySide:
    """Line up ``record``'s fields (``leaves``: path -> value) with what each viewer received.

    ``views`` maps a viewer to the fields it stored (disclosure key -> value), or
    ``None`` if it received nothing of this report.
    """
    received: dict[str, dict[str, tuple[str, str]]] = {}
    for viewer, fields in views.items():
        got: dict[str, tuple[str, str]] = {}
        for key, value in (fields or {}).items():
            path, transform = split_variant_key(key)
            got[path] = (_show(value), "" if transform is None else transform.ident)
        received[viewer] = got
    rows = []
    for path in sorted(leaves):
        cells = tuple(
            Cell(*received[v][path]) if path in received[v] else Cell(WITHHELD, "withheld")
            for v in views
        )
        rows.append((path, _show(leaves[path]), cells))
    return SideBySide(
        originator=originator,
        report_id=str(record["report_id"]),
        kind=str(record["kind"]),
        viewers=tuple(views),
        rows=tuple(rows),
    )


def side_by_side_lines(view: SideBySide, width: int = 30) -> list[str]:
    """Render a ``SideBySide`` as fixed-width columns; transformed cells carry their transform."""

    def clip(text: str) -> str:
        return text if len(text) <= width else text[: width - 1] + "~"

    def cell(c: Cell) -> str:
        if c.note in ("", "withheld"):
            return clip(c.value)
        return clip(f"{c.value} [{c.note}]")

    head = [f"{view.originator} (original)", *(f"as {v} received it" for v in view.viewers)]
    lines = [f"{view.originator}'s {view.kind} report {view.report_id}, side by side"]
    lines.append(f"  {'field':<26}" + "".join(f"{h:<{width + 2}}" for h in head))
    for path, original, cells in view.rows:
        row = [clip(original), *(cell(c) for c in cells)]
        lines.append(f"  {clip(path):<26}" + "".join(f"{c:<{width + 2}}" for c in row))
    return [ln.rstrip() for ln in lines]


def audit_lines(outcome: Outcome) -> list[str]:
    """One line per node's ``msmt audit verify``, then the replay's summary."""
    lines = ["Audit: msmt audit verify on every node"]
    for a in outcome.audits:
        lines.append(f"  {a.member}  {'OK  ' if a.ok else 'FAIL'}  {a.detail}")
    lines.append("Audit: msmt audit replay across all nodes")
    lines += [f"  {ln}" for ln in outcome.replay_lines]
    return lines


def summary_line(outcome: Outcome) -> str:
    """The last line: everything verified, or the first reason it did not."""
    if outcome.failures:
        return f"demo FAILED after {outcome.elapsed:.1f}s: {outcome.failures[0]}"
    delivered = sum(len(v) for v in outcome.received.values())
    return (
        f"demo OK in {outcome.elapsed:.1f}s: {outcome.sightings} sightings, {delivered} "
        f"reports delivered, none lost; {len(outcome.audits)} audit logs verified and "
        "reconciled"
    )


def first_failure(
    outcome: Outcome, audits: Sequence[AuditResult], stopped: Mapping[str, int | None]
) -> list[str]:
    """Every reason the run is not a success, most basic first."""
    reasons = []
    lost = outcome.lost()
    if lost:
        pairs = sorted(
            f"{s}->{r}"
            for (s, r), ids in outcome.expected.items()
            if ids - outcome.received.get((s, r), set())
        )
        reasons.append(f"{lost} released reports never arrived ({', '.join(pairs[:5])})")
    extra = sum(len(ids - outcome.expected.get(k, set())) for k, ids in outcome.received.items())
    if extra:
        reasons.append(f"{extra} reports arrived that the senders' policies did not release")
    bad = {m: n for m, n in outcome.rejected.items() if n}
    if bad:
        reasons.append(f"inbound messages rejected: {bad}")
    for member, code in stopped.items():
        if code != 0:
            reasons.append(f"the {member} node exited with status {code}")
    for a in audits:
        if not a.ok:
            reasons.append(f"audit verify {a.member}: {a.detail}")
    if not outcome.replay_ok:
        reasons.append("audit replay: the logs do not reconcile")
    return reasons
