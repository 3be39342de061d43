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
  is an ``unmatched-receive`` (the sender's log lost or never had the send); a
  ``withheld`` entry counts as the send (the envelope was taken back at a start,
  but had reached the hub before), and is not ``undelivered`` when nobody
  received it;
* a receive names the same sender, report, kind and disclosure keys as its
  send, and (when both name one: formats 2 and 3) the same recipient key, and a
  rejection that names a report names the send's, else ``mismatch``;
* a receipt or rejection of a sent JWE is in the log of the member it was sent
  to, else ``receipt-by-non-recipient`` or ``rejection-by-non-recipient``;
* a JWE is sent in one log only, and (when no log given sends it) received in
  one log only, else ``conflicting-entries``;
* each send's disclosure keys are what the sender's policy (found by the
  digest the entry names) releases to that partner for that kind and marking;
  anything else is an ``over-disclosure``;
* given the roster, each send's ``recipient_kid`` (format 2) is the partner's
  encryption key, else ``wrong-recipient-key``, and was not revoked before the
  send, else ``to-revoked-key``; the key the partner's receipt says opened it
  (format 3) is checked for a revocation before the send too, whatever the send
  names, and each receipt's key is the receiver's own encryption key, else
  ``wrong-recipient-key`` (on the receipt).

A member can append entries to its own log (its witnesses cosign what it
appends), so no conclusion rests on the last entry of a JWE, or on the order in
which the logs are given. Logs not given are not guessed at: their side is
reported as ``not-checked``.

``verified_entries`` parses a verified log's entries only if their bytes are the
ones verified; ``iter_verified_entries`` streams them, so that replay keeps only
what it needs of each entry (``Send``, ``Receipt``, ``Rejection``), never the
logs themselves: a year of logs is millions of entries.

The code is in three parts: ``broker.audit_replay_result`` (the result and its JSON),
``broker.audit_replay_log`` (verified entries, one log read and checked alone) and this
module (``replay``: the checks across logs, and against the senders' policies).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from broker.audit_policy import (
    over_disclosures_for,
    releases_anything_for,
)
from broker.audit_replay_log import (
    Index,
    Pool,
    Receipt,
    Rejection,
    Send,
    iter_verified_entries,
    read_log,
    verified_entries,
)
from broker.audit_replay_result import DESCRIBED_STEPS, BulkRefusals, Exchange, Finding, Replay
from broker.policy import Policy
from broker.roster import CLOCK_SKEW, Roster, format_time
from broker.sightings import KINDS

__all__ = [
    "KEY_FINDINGS",
    "replay",
    "Replay",
    "Exchange",
    "Finding",
    "BulkRefusals",
    "DESCRIBED_STEPS",
    "verified_entries",
    "iter_verified_entries",
]


class _Kept(Protocol):
    """What every record has: the log it came from and the entry's place in it."""

    @property
    def member(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def report_id(self) -> str | None: ...


def replay(
    logs: Mapping[str, Iterable[Mapping[str, Any]]],
    policies: Mapping[str, Policy],
    *,
    roster: Roster | None = None,
    progress: Iterable[None] | None = None,
) -> Replay:
    """Reconcile the parsed entries of each member's log (``logs[member]``).

    Each log's entries are read once, in order, so they may be an iterator
    (``iter_verified_entries``): only what the checks need of them is kept.
    ``policies`` maps policy digests to loaded policies; ``roster``, if given,
    is the one the recipient keys of sends are checked against. ``progress``, if
    given, is advanced once per entry (a click progress bar, say).

    No conclusion depends on the order of the logs or on which of several
    entries of one JWE comes last: a member can append entries to its own log
    (its witnesses cosign whatever it appends), so every entry of a JWE is
    weighed, and entries that contradict each other are findings.
    """
    ticks = iter(progress) if progress is not None else None
    index = Index()
    findings: list[Finding] = []
    pool = Pool()
    for member, entries in logs.items():
        read_log(member, entries, ticks, index, findings, pool)
    given = frozenset(logs)
    answers = _PolicyAnswers(policies)
    keys = _RecipientKeys(roster)
    to_revoked: set[tuple[str, int]] = set()
    exchanges: list[Exchange] = []
    delivered: set[tuple[str, str, str]] = set()  # (sender, recipient, JWE): counted once
    described = {pair: bulk.describe() for pair, bulk in index.bulk.items()}
    for jwe, versions in index.sends.items():
        findings += _sent_in_several_logs(versions)
        refusals = _refusals_by_pair(index.rejections.get(jwe, ()))
        findings += _refusal_mismatches(jwe, versions, given, index, refusals)
        statuses: list[str] = []
        for send in versions:
            # Every version is checked against the policy: a later one cannot
            # stand in for an earlier one that disclosed more.
            status, refused_at, recv = _send_status(
                jwe, send, given, index, refusals, described, findings
            )
            if status == "delivered":
                delivered.add((send.member, send.partner, jwe))
            statuses.append(status)
            # Its own key, or (format 1) the one a repeat of it names; and the key the
            # partner's receipt says opened it (format 3), or the one its repeat names.
            kid = send.recipient_kid or _first(index.send_kids(send))
            opened = (
                None if recv is None else recv.recipient_kid or _first(index.receipt_kids(recv))
            )
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
                    kid,
                    send.withheld,
                    opened,
                )
            )
            findings += _check_release(send, answers)
        findings += keys.check(jwe, versions, statuses, index, to_revoked)
        findings += _not_the_recipient(jwe, versions, index)
    # Whether a receipt names the key that opened it (format 3): without a roster its
    # key is not checked either, which the text must say even with no send given.
    keyed_receipts = bool(index.more_receipt_kids)
    for jwe, receipts in index.receipts.items():
        findings += keys.check_receipts(receipts, index)
        if not keyed_receipts:
            keyed_receipts = any(r.recipient_kid for r in receipts)
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
        frozenset(to_revoked),
        roster is not None,
        keys.keyless,
        keyed_receipts,
    )


def _first(kids: tuple[str, ...]) -> str | None:
    return kids[0] if kids else None


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


def _sent_in_several_logs(versions: Sequence[Send]) -> list[Finding]:
    # Only the member whose node published an envelope logs it as sent; a send of
    # the same bytes in another log would stand in for (or hide) the real one.
    return _in_several_logs(versions, "a send")


def _not_the_recipient(jwe: str, versions: Sequence[Send], index: Index) -> list[Finding]:
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


def _refusals_by_pair(rejections: Iterable[Rejection]) -> dict[tuple[str, str], list[Rejection]]:
    """A JWE's rejections by (the log's member, the source it names), in log order."""
    grouped: dict[tuple[str, str], list[Rejection]] = {}
    for r in rejections:
        grouped.setdefault((r.member, r.source), []).append(r)
    return grouped


def _received_by(jwe: str, partner: str, index: Index) -> Receipt | None:
    """``partner``'s first receipt of ``jwe``; a plain loop, asked of every send twice."""
    for recv in index.receipts.get(jwe, ()):
        if recv.member == partner:
            return recv
    return None


def _refusal_mismatches(
    jwe: str,
    versions: Sequence[Send],
    given: frozenset[str],
    index: Index,
    refusals: Mapping[tuple[str, str], list[Rejection]],
) -> list[Finding]:
    """Rejections of a JWE naming a report none of its sender's sends to that partner had.

    Once per rejection, against the first such send: per (send, rejection) pair, a
    member's log of k versions of one send and r rejections of it made k x r
    findings (a fuzzer: 2.5 GB for a 6,000-entry log).
    """
    found = []
    firsts: dict[tuple[str, str], Send] = {}
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
    send: Send,
    given: frozenset[str],
    index: Index,
    refusals: Mapping[tuple[str, str], list[Rejection]],
    described: Mapping[tuple[str, str], str],
    findings: list[Finding],
) -> tuple[str, str | None, Receipt | None]:
    """The send's status, the step that refused it, and the partner's receipt of it."""
    member, partner = send.member, send.partner
    if partner not in given:
        return "not-checked", None, None
    recv = _received_by(jwe, partner, index)
    if recv is not None:
        # A receipt outweighs a rejection of the same JWE (which, from the
        # same sender, is a conflicting-entries finding of the partner's
        # log): the partner says it holds the report.
        _check_receipt(send, recv, index, findings)
        return "delivered", None, recv
    # Only a refusal of the envelope as it came from its sender counts: the same
    # bytes passed on by a third member and refused say nothing of this send.
    refused = refusals.get((partner, member))
    if refused:
        return "rejected", refused[-1].step, None
    if send.withheld:
        return "withheld", None, None  # taken back before it was sent, as the node knew
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
    return "undelivered", None, None


def _check_receipt(send: Send, recv: Receipt, index: Index, findings: list[Finding]) -> None:
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
    theirs, ours = recv.recipient_kid, send.recipient_kid
    if (theirs != ours and theirs and ours) or index.more_kids or index.more_receipt_kids:
        # Else the two name one key, or one names none (formats 1 and 2), and no
        # repeat in any log named another: the usual case, no lookup.
        sent_to, opened = index.send_kids(send), index.receipt_kids(recv)
        if sent_to and opened and not set(sent_to) & set(opened):
            # Key ids, unlike the fields' values, are no secret: the auditor needs both.
            differ.append(
                f"recipient key ({send.member}'s entries name {' and '.join(sent_to)},"
                f" {recv.member}'s {' and '.join(opened)})"
            )
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


KEY_FINDINGS = frozenset({"wrong-recipient-key", "to-revoked-key"})
"""The findings on the key a send went to (given the roster), not on the logs' agreement."""


class _RecipientKeys:
    """The roster's answer on each envelope's recipient keys, once per (key, partner).

    Once per envelope (JWE) and log, not per entry: a ``sent`` and a ``withheld``
    entry of one envelope (a crash between them) are one envelope exposed, and one
    finding. Every key its entries name is checked: when they contradict each other
    (a ``conflicting-repeat``), none may hide another. So is the key the partner's
    receipt says opened it (format 3), for a revocation: the sender's entry is its
    own word, which it can rewrite and re-sign.
    """

    def __init__(self, roster: Roster | None) -> None:
        self._roster = roster
        self._known: dict[tuple[str, str], tuple[str, str, str | None] | None] = {}
        self._from: dict[str, tuple[str, str]] = {}  # kid -> (earliest send, valid_from)
        self._own: dict[tuple[str, str], str | None] = {}  # (kid, receiver) -> why not its own
        self.keyless = 0
        """Envelopes sent whose entries name no key (format 1), nor their receipt: not checked."""

    def check(
        self,
        jwe: str,
        versions: Sequence[Send],
        statuses: Sequence[str],
        index: Index,
        exposed: set[tuple[str, int]],
    ) -> list[Finding]:
        """Key findings on one envelope; adds to ``exposed`` the send that stands for it.

        Its send stands for it, else a ``withheld`` entry once its partner's log shows
        it left (``delivered``, ``rejected``): one taken back for its key and never seen
        was not sent, as far as anyone can tell. The keys are those its entries name
        and those the partner's receipt of it names. Nothing without a roster.
        """
        if self._roster is None:
            return []
        found: list[Finding] = []
        for member in dict.fromkeys(v.member for v in versions):
            mine = [(v, st) for v, st in zip(versions, statuses, strict=True) if v.member == member]
            stands = next((v for v, _ in mine if not v.withheld), None) or next(
                (v for v, st in mine if st in ("delivered", "rejected")), None
            )
            if stands is None:
                continue
            kids = sorted(
                {v.recipient_kid for v, _ in mine if v.recipient_kid}
                | {k for k, _ in index.more_kids.get((member, jwe), ())}
            )
            recv = _received_by(jwe, stands.partner, index)
            opened = [] if recv is None else index.receipt_kids(recv)
            if not kids and stands.withheld:
                # The partner needs the header's key to open it, and the hash names these
                # bytes: an entry naming none is false (a review).
                found.append(
                    Finding(
                        "wrong-recipient-key",
                        member,
                        stands.seq,
                        stands.report_id,
                        f"to {stands.partner}: a withheld envelope that names no key, yet"
                        f" reached {stands.partner}",
                    )
                )
            elif not kids and not opened:
                self.keyless += 1
            for kid in kids:
                found += self._check_one(stands, kid)
                if self._revoked(stands, kid):
                    exposed.add((stands.member, stands.seq))
            for kid in opened:
                if kid in kids:
                    continue  # checked as the send's
                # Whatever the send names: its sender may have renamed it (a review).
                found += self._check_one(stands, kid, recv)
                if self._revoked(stands, kid):
                    exposed.add((stands.member, stands.seq))
        return found

    def check_receipts(self, receipts: Sequence[Receipt], index: Index) -> list[Finding]:
        """``wrong-recipient-key`` for each receipt naming a key not its receiver's own.

        A receiver opens an envelope only with one of its own encryption keys, the
        one the header names (docs/ENVELOPE.md §5, step 3): a receipt naming another
        is false. Nothing without a roster.
        """
        if self._roster is None:
            return []
        found = []
        for recv in receipts:
            if recv.recipient_kid is None and not index.more_receipt_kids:
                continue  # formats 1 and 2 name none
            for kid in index.receipt_kids(recv):
                pair = (kid, recv.member)
                if pair not in self._own:
                    self._own[pair] = self._not_own(kid, recv.member)
                why = self._own[pair]
                if why is not None:
                    found.append(
                        Finding(
                            "wrong-recipient-key",
                            recv.member,
                            recv.seq,
                            recv.report_id,
                            f"from {recv.sender}: {why}",
                        )
                    )
        return found

    def _not_own(self, kid: str, member: str) -> str | None:
        """Why ``kid`` cannot have opened an envelope at ``member``, or None."""
        if self._roster is None or kid not in self._roster:
            return f"opened with key {kid}, not in the roster"
        key = self._roster.get(kid)
        if (key.member, key.use) != (member, "enc"):
            return (
                f"opened with key {kid}, a {key.use} key of {key.member}, not an encryption"
                f" key of {member}"
            )
        return None

    def _check_one(self, send: Send, kid: str, by: Receipt | None = None) -> list[Finding]:
        """``wrong-recipient-key`` or ``to-revoked-key`` for ``send`` to ``kid``, if due.

        A send before the revocation, or in its second, is not after it; a ``sent``
        entry dated before its report arrived is dated by the arrival (a review
        backdated sends past a revocation). A withheld envelope is dated only by its
        report's arrival (it was made after that): one made before the revocation
        is not after it; one that cannot be dated (its arrival not in the log, or the
        revocation's time not in the roster) is, as a send to a key whose revocation
        time is not known. A send before its key was valid (``CLOCK_SKEW`` allowed)
        names a key it could not have used then (a review renamed sends to a stolen
        key so).

        ``by``, the partner's receipt, when it is its receipt that names ``kid``: only
        a revocation is checked then (a key that is not the receiver's own is that
        receipt's finding, ``check_receipts``; the send's time says nothing of a key
        it does not name), and the detail says which entry names it.
        """
        pair = (kid, send.partner)
        if pair not in self._known:
            self._known[pair] = self._problem(kid, send.partner)
        problem = self._known[pair]
        if by is not None:
            if problem is None or problem[0] != "to-revoked-key":
                return []
        elif problem is None or problem[0] == "to-revoked-key":
            early = self._before_valid(send, kid)
            if early is not None:
                return [
                    Finding("wrong-recipient-key", send.member, send.seq, send.report_id, early)
                ]
        if problem is None:
            return []
        kind, detail, since = problem
        if by is not None:
            detail += f" (named by {by.member}'s receipt, entry {by.seq})"
        if kind == "to-revoked-key" and send.withheld:
            made = send.made_after
            if since is not None and made is not None and made <= since:
                return []
            detail += (
                f" (taken back at a start, but made after its report arrived at {made},"
                if made is not None
                else " (taken back at a start, its report's arrival not in the log,"
            ) + f" and it reached {send.partner})"
        elif kind == "to-revoked-key" and since is not None:
            dated = max(send.at, send.made_after or send.at)
            if dated <= since:
                # Before the revocation, or in its second (the order unknown): it went
                # to what was the partner's key then.
                return []
            if dated != send.at:
                detail += f" (dated {send.at}, before its report arrived at {dated})"
        return [Finding(kind, send.member, send.seq, send.report_id, detail)]

    def _before_valid(self, send: Send, kid: str) -> str | None:
        """Why ``send`` could not have used ``kid`` yet, if it was made before it was valid."""
        if self._roster is None:
            return None
        if kid not in self._from:
            start = self._roster.get(kid).valid_from
            self._from[kid] = (format_time(start - CLOCK_SKEW), format_time(start))
        earliest, valid_from = self._from[kid]
        # The entry's ``at`` is after the envelope was made, for a withheld one too.
        if send.at >= earliest:
            return None
        return (
            f"to {send.partner}: encrypted to {send.partner}'s key {kid} at {send.at}, before"
            f" the key was valid (from {valid_from}): the entry's key or its time is false"
        )

    def _revoked(self, send: Send, kid: str) -> bool:
        """Whether ``kid`` is ``send``'s partner's key, revoked (at any time)."""
        if self._roster is None or kid not in self._roster:
            return False
        key = self._roster.get(kid)
        return key.status == "revoked" and (key.member, key.use) == (send.partner, "enc")

    def _problem(self, kid: str, partner: str) -> tuple[str, str, str | None] | None:
        """(finding, detail, revoked since or None) for sends to ``partner`` under ``kid``."""
        if self._roster is None or kid not in self._roster:
            return (
                "wrong-recipient-key",
                f"to {partner}: encrypted to key {kid}, not in the roster",
                None,
            )
        key = self._roster.get(kid)
        if (key.member, key.use) != (partner, "enc"):
            return (
                "wrong-recipient-key",
                f"to {partner}: encrypted to key {kid}, a {key.use} key of {key.member},"
                f" not an encryption key of {partner}",
                None,
            )
        if key.status != "revoked":
            return None
        when = key.revoked_at
        if when is None:
            detail = (
                f"to {partner}: encrypted to {partner}'s key {kid}, which is revoked (the"
                " roster does not say when)"
            )
            return "to-revoked-key", detail, None
        since = format_time(when)
        detail = (
            f"to {partner}: encrypted to {partner}'s key {kid} after its revocation at {since}:"
            " whoever holds that key can read it"
        )
        return "to-revoked-key", detail, since


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

    def policy(self, send: Send) -> Policy | None:
        """The sender's policy the send names, if it was given."""
        policy = self._policies.get(send.policy_digest)
        return policy if policy is not None and policy.member == send.member else None

    def over_disclosures(self, send: Send, policy: Policy) -> list[str]:
        """``over_disclosures`` of the send."""
        s = send
        key = (policy.digest, s.partner, s.kind, s.tlp, s.originator, s.rel_to, s.released)
        found = self._over.get(key)
        if found is None:
            found = self._over[key] = over_disclosures_for(
                policy, s.partner, s.kind, s.tlp, s.originator, s.rel_to, s.released
            )
        return found

    def releases_anything(self, send: Send, policy: Policy) -> bool:
        """``releases_anything`` for the send."""
        s = send
        key = (policy.digest, s.partner, s.kind, s.tlp, s.originator, s.rel_to)
        found = self._anything.get(key)
        if found is None:
            found = self._anything[key] = releases_anything_for(
                policy, s.partner, s.kind, s.tlp, s.originator, s.rel_to
            )
        return found


def _check_release(send: Send, answers: _PolicyAnswers) -> list[Finding]:
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
