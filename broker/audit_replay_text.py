"""``msmt audit replay``'s report as text: sends by status, the matrix, findings, timeline.

Pure: a ``broker.audit_replay.Replay`` in, lines out. The command prints them
(``broker.cli.audit_logs``) and so does the demo's summary (``broker.demo_results``).
Apart from the command, which the demo need not load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Final

from broker.audit_replay import Exchange, Finding, Replay


def status_line(result: Replay, logs: int) -> str:
    """One line: how many sends, in how many logs, ended in each status."""
    counts = sorted(result.statuses().items())
    return f"{len(result.exchanges)} sends in {logs} logs: " + (
        ", ".join(f"{n} {status}" for status, n in counts) or "none"
    )


def render_tables(
    result: Replay, members: list[str], *, timeline: bool = True, show_fields: bool = False
) -> str:
    """The human report as one string: ``render_lines``, the timeline included by default."""
    return "\n".join(render_lines(result, members, timeline=timeline, show_fields=show_fields))


def render_lines(
    result: Replay, members: list[str], *, timeline: bool, show_fields: bool = False
) -> Iterator[str]:
    """The human report, line by line: sends by status, matrix, findings, then the timeline.

    The findings come before the timeline, which a year of logs makes millions of
    lines long. ``show_fields`` lists under each send of the timeline the
    disclosure keys it released (field paths and forms, never values): who got
    which fields.
    """
    yield from _summary_lines(result, members)
    if not timeline:
        return
    yield ""
    yield f"Timeline ({len(result.exchanges)} sends; policy: the first 12 hex of its digest)"
    for e in result.exchanges:
        yield (
            f"  {e.at}  {e.sender} -> {e.recipient}  {e.kind:<8} {e.report_id}  "
            f"{e.tlp:<12} {len(e.released):>2} fields  policy {e.policy_digest[:12]}  {e.status}"
            + ("" if e.refused_at is None else f" ({e.refused_at})")
            # Its time is when a start took it back, not when it was published.
            + (" (withheld at this time)" if e.withheld else "")
        )
        if show_fields:
            yield f"      {', '.join(e.released) or '(none)'}"


def _summary_lines(result: Replay, members: list[str]) -> list[str]:
    lines = [status_line(result, len(members))]
    senders = sorted({s for s, _ in result.matrix} | set(members))
    recipients = sorted({r for _, r in result.matrix} | set(members))
    lines += ["", "Delivered sends (rows: sender, columns: recipient)"]
    lines.append("       " + " ".join(f"{r:>5}" for r in recipients))
    for s in senders:
        cells = ("    -" if s == r else f"{result.matrix.get((s, r), 0):>5}" for r in recipients)
        lines.append(f"  {s}  " + " ".join(cells))
    lines += _bulk_lines(result)
    # Not findings: both logs agree, but the recipient does not hold these reports.
    lines += _exchange_lines(
        "Refused at every send ({n}; msmt node resend --report sends again)",
        result.never_delivered(),
        lambda e: str(e.refused_at),
    )
    # Nor these, and a resend is refused again: the partner holds the report already.
    lines += _exchange_lines(
        "Refused as already held ({n}; the partner holds the report from a send this log"
        " does not show: a resend is refused again)",
        result.refused_as_held(),
        lambda e: str(e.refused_at),
    )
    # The findings name entries; a sender resends by report id.
    lines += _exchange_lines(
        "Sends the partner never logged ({n}; findings below; if the hub lost them,"
        " msmt node resend --report sends them again)",
        result.unlogged(),
        lambda e: f"(entry {e.seq})",
    )
    # Not findings either: the hub lost these sends, but a later send of the same
    # report reached the partner.
    lines += _exchange_lines(
        "Lost on the way, then delivered by a later send ({n})",
        result.recovered(),
        lambda e: f"(entry {e.seq})",
    )
    # Nor these: a resend of reports the partner held, refused as replays in bulk.
    lines += _exchange_lines(
        "Sent again to a partner that held the report, among its bulk replay refusals ({n})",
        result.resent(),
        lambda e: f"(entry {e.seq})",
    )
    # Not findings unless sent after the revocation: whoever holds the key can read them.
    exposed = result.sent_to_revoked_keys()
    reports = len({e.report_id for e in exposed})
    lines += _exchange_lines(
        f"Sent to keys revoked since ({{n}} sends of {_count(reports, 'report')}; whoever"
        " holds the key can read them: tell their originators)",
        exposed,
        lambda e: f"{_keys(e)} (entry {e.seq}{', withheld' if e.withheld else ''})",
    )
    lines += ["", f"Findings ({len(result.findings)})"]
    lines += _finding_lines(result.findings)
    if any(f.kind in DECIDED_BY_EVIDENCE for f in result.findings):
        # Pinned to the entry without its counterpart, which is not always the false one.
        lines.append(
            "  (a finding between two logs says that one of them is false, not which: the"
            " recipient's kept envelope decides, with msmt inbox evidence at the recipient"
            " and msmt audit evidence --log SENDER_DIR --log RECIPIENT_DIR; docs/AUDIT.md)"
        )
    if not result.findings:
        lines.append("  none: every send and receive reconciles with the policies")
    if not result.keys_checked and (
        result.keyed_receipts or any(e.recipient_kid or e.receipt_kid for e in result.exchanges)
    ):
        # Nor is "none" a word on the keys the sends went to, or that opened the receipts
        # (a receiver's log alone): they need the roster.
        lines.append("  recipient keys not checked: no roster given (--keys or --roster)")
    if result.keyless_sends:
        lines.append(
            f"  recipient keys not checked: {_count(result.keyless_sends, 'envelope')} whose"
            " entries name none (format 1)"
        )
    sends, receipts = result.statuses()["not-checked"], result.unchecked_receipts
    if sends or receipts:
        # "none" is only as wide as the logs given: say what they could not check.
        lines.append(
            f"  not checked: {_count(sends, 'send')} and {_count(receipts, 'receipt')}"
            " whose other side's log was not given"
        )
    return lines


def _keys(e: Exchange) -> str:
    """The key a send names, and the one its receipt names when that is another."""
    if e.receipt_kid is None or e.receipt_kid == e.recipient_kid:
        return str(e.recipient_kid)
    opened = f"{e.receipt_kid} by {e.recipient}'s receipt"
    return opened if e.recipient_kid is None else f"{e.recipient_kid}, {opened}"


def _bulk_lines(result: Replay) -> list[str]:
    """Refusals a recipient counted without naming them (``rejected_many``), per source."""
    if not result.bulk_refusals:
        return []
    # The source is the subject's sender, which the hub vouches for, not a signature:
    # a hostile hub can put junk in an inbox under any member's name.
    lines = [
        "",
        "Refused in bulk, counted without naming the messages"
        " (source as the hub named it -> recipient)",
    ]
    for (source, recipient), bulk in sorted(result.bulk_refusals.items()):
        entries = "1 entry" if bulk.entries == 1 else f"{bulk.entries} entries"
        lines.append(
            f"  {source} -> {recipient}  {bulk.count} refusals ({bulk.describe()}) in {entries}"
        )
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


SHOWN_ENTRIES: Final = 5
SHOWN_LOST: Final = 20


def _exchange_lines(
    heading: str, exchanges: Sequence[Exchange], last: Callable[[Exchange], str]
) -> list[str]:
    """A titled list of sends (none if empty), the first ``SHOWN_LOST`` of them."""
    if not exchanges:
        return []
    lines = ["", heading.format(n=len(exchanges))]
    lines += [
        f"  {e.sender} -> {e.recipient}  {e.report_id}  {last(e)}" for e in exchanges[:SHOWN_LOST]
    ]
    if len(exchanges) > SHOWN_LOST:
        lines.append(f"  ... and {len(exchanges) - SHOWN_LOST} more (--json lists all)")
    return lines


DECIDED_BY_EVIDENCE: Final = frozenset(
    {"mismatch", "unmatched-receive", "receipt-by-non-recipient"}
)
"""Findings on a receipt, which the recipient's kept envelope of that report can settle."""


def _finding_lines(findings: Sequence[Finding]) -> list[str]:
    """One line per distinct finding, a repeated one naming its first entries and count.

    A policy left out of ``--policies`` is one finding per send under it: thousands
    of identical lines would hide every other finding.
    """
    groups: dict[tuple[str, str, str], list[Finding]] = {}
    for f in findings:
        groups.setdefault((f.kind, f.member, f.detail), []).append(f)
    lines = []
    for (kind, member, detail), group in groups.items():
        seqs = [f.seq for f in group]
        if len(group) == 1:
            # The report id is what msmt inbox evidence asks for.
            rid = group[0].report_id if kind in DECIDED_BY_EVIDENCE else None
            about = f" (report {rid})" if rid else ""
            lines.append(f"  {kind}: {member} entry {seqs[0]}{about}: {detail}")
            continue
        shown = ", ".join(str(seq) for seq in seqs[:SHOWN_ENTRIES])
        more = ", ..." if len(seqs) > SHOWN_ENTRIES else ""
        lines.append(f"  {kind}: {member} entries {shown}{more} ({len(seqs)} in all): {detail}")
    return lines
