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
ones verified.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from broker.audit_events import parse_entry
from broker.errors import AuditError, PolicyError
from broker.merkle import CompactRange, leaf_hash
from broker.policy import Policy, Release
from broker.transforms import split_variant_key


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
        """``format 100, size 40; <first> to <last>``: at which steps, and when."""
        steps = ", ".join(f"{step} {n}" for step, n in sorted(self.steps.items()))
        return f"{steps}; {self.first} to {self.last}"


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
        return self._undelivered(flagged=False)

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
        """A JSON-ready form for tools (``msmt audit replay --json``)."""
        return {
            "exchanges": [
                asdict(e)
                | {
                    "released": list(e.released),
                    "rel_to": None if e.rel_to is None else list(e.rel_to),
                }
                for e in self.exchanges
            ],
            "matrix": [
                {"sender": s, "recipient": r, "delivered": n}
                for (s, r), n in sorted(self.matrix.items())
            ],
            "findings": [asdict(f) for f in self.findings],
            "unchecked_receipts": self.unchecked_receipts,
            "never_delivered": [
                {
                    "sender": e.sender,
                    "recipient": e.recipient,
                    "report_id": e.report_id,
                    "refused_at": e.refused_at,
                }
                for e in self.never_delivered()
            ],
            "recovered": [
                {
                    "sender": e.sender,
                    "recipient": e.recipient,
                    "report_id": e.report_id,
                    "seq": e.seq,
                }
                for e in self.recovered()
            ],
            "bulk_refusals": [
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
        }


def over_disclosures(send: Mapping[str, Any], policy: Policy) -> list[str]:
    """Return one line per disclosure key in ``send`` that ``policy`` would not have released.

    The policy answers from the send's handling markings alone
    (``Policy.releasable``), exactly as it decided when the report went out.
    """
    released = send["released"]
    try:
        cells = _cells(send, policy)
    except PolicyError as exc:
        return [f"{key}: {exc}" for key in released]
    problems = []
    for key in released:
        try:
            path, _ = split_variant_key(key)
        except ValueError:
            problems.append(f"{key}: not a valid disclosure key")
            continue
        cell = cells.get(path, f"not a field of a {send['kind']} report")
        if not isinstance(cell, Release):
            problems.append(f"{key}: withheld by the policy ({cell})")
        elif cell.disclosure_key != key:
            problems.append(f"{key}: the policy releases it only as {cell.disclosure_key}")
    return problems


def releases_anything(send: Mapping[str, Any], policy: Policy) -> bool:
    """Whether ``policy`` releases any field at all to the send's partner, given its markings."""
    try:
        cells = _cells(send, policy)
    except PolicyError:
        return False
    return any(isinstance(cell, Release) for cell in cells.values())


def _cells(send: Mapping[str, Any], policy: Policy) -> Mapping[str, Release | str]:
    return policy.releasable(
        send["partner"],
        kind=send["kind"],
        tlp=send["tlp"],
        originator=send["originator"],
        rel_to=send["rel_to"],
        onward=send["originator"] != policy.member,
    )


class PolicyTimeline:
    """One log's policy history and report arrivals, fed its entries in log order.

    A send may name the policy in force when its report arrived in the log, or
    one logged between that arrival and the send: the node plans a report (and
    so fixes its policy digest) some time after accepting it, and logs the send
    only once the hub acknowledged it, so after a restart with a new policy a
    send planned under the old one is logged after the new ``policy`` entry.
    Any other digest (an older policy, or one first logged later) was never the
    node's policy for that report.

    The arrival is the first ``accepted`` entry of the report, or, for a report
    another member originated (passed on), its first ``received`` entry. A
    node's log can lack it: a store commit that succeeds while the audit append
    after it fails (a full disk) leaves an accepted report that is planned and
    sent before its ``accepted`` entry is written at the next start. Such a send
    is held to the policy in force at the send itself, the narrowest window, so
    deleting an arrival entry widens nothing.

    Each step is O(1): the index of the policy in force at an arrival is kept,
    and a digest was in force since then iff its latest ``policy`` entry comes
    at or after that index.
    """

    def __init__(self) -> None:
        self.policies: list[tuple[int, str, str | None]] = []  # (seq, digest, previous)
        self._latest: dict[str, int] = {}  # digest -> index of its latest policy entry
        self._accepted: dict[str, tuple[int, int]] = {}  # report -> (seq, policy index)
        self._received: dict[str, tuple[int, int]] = {}

    def add_policy(self, entry: Mapping[str, Any]) -> str | None:
        """Record a ``policy`` entry; say why its ``previous_digest`` breaks the chain, if it does.

        The first ``policy`` entry of a log has ``previous_digest`` null (a node's
        first start); each later one names the digest of the one before. An exact
        repeat of the previous entry is accepted: a node that stops between
        logging a change and saving it in its store logs the same change again.
        """
        digest, previous = entry["policy_digest"], entry["previous_digest"]
        problem = None
        if not self.policies:
            if previous is not None:
                problem = (
                    f"the log's first policy entry names a previous policy {previous[:12]}..."
                    ", which the log never recorded"
                )
        else:
            seq, last, last_previous = self.policies[-1]
            if previous != last and (digest, previous) != (last, last_previous):
                named = "none" if previous is None else f"{previous[:12]}..."
                problem = (
                    f"previous policy {named} is not {last[:12]}..., "
                    f"the policy of the log's previous policy entry {seq}"
                )
        self._latest[digest] = len(self.policies)
        self.policies.append((entry["seq"], digest, previous))
        return problem

    def add_arrival(self, entry: Mapping[str, Any]) -> None:
        """Record an ``accepted`` or ``received`` entry (only a report's first counts)."""
        arrivals = self._accepted if entry["type"] == "accepted" else self._received
        arrivals.setdefault(entry["report_id"], (entry["seq"], len(self.policies) - 1))

    def not_in_force(self, member: str, send: Mapping[str, Any]) -> str | None:
        """Why ``send``'s policy was not in force for its report, or ``None`` if it was."""
        arrivals = self._accepted if send["originator"] == member else self._received
        arrival = arrivals.get(send["report_id"])
        now = len(self.policies) - 1
        since = now if arrival is None else arrival[1]
        digest = send["policy_digest"]
        if self._latest.get(digest, -1) >= max(since, 0):
            return None
        name = f"policy {digest[:12]}..."
        if digest not in self._latest:
            return f"{name} was never logged before this send"
        if arrival is None:
            what = "accepted" if send["originator"] == member else "received"
            current = self.policies[-1][1][:12]
            return (
                f"{name} is not {current}..., the policy in force at this send "
                f"(no {what} entry of the report comes before it)"
            )
        return (
            f"{name} was not in force between the report's arrival (entry {arrival[0]}) "
            "and this send"
        )


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
    edge = CompactRange()
    entries: list[dict[str, Any]] = []
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
                entries.append(parse_entry(blob, i))
            except AuditError as exc:
                # Said only once the root matches: a malformed entry in bytes that
                # were never verified is not the log owner's, and must not read so.
                failure = f"entry {i}: {exc}"
    if edge.size != size or edge.root() != root:
        raise changed
    if failure is not None:
        raise AuditError(failure)
    return entries


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


class _Repeats:
    """One log's entries of one type by JWE hash: honest repeats and conflicting ones.

    Only a repeat costs more than a dictionary lookup (its content made hashable),
    and the versions of one JWE are a set, so appending many repeats stays linear.
    """

    def __init__(self) -> None:
        self.first: dict[str, _Entry] = {}  # JWE -> its first entry
        self._versions: dict[str, set[_Version]] = {}

    def add(self, entry: _Entry) -> tuple[_Entry | None, bool]:
        """The earlier entry ``entry`` repeats (``None`` if none); whether its content is new."""
        key = entry["jwe_sha256"]
        earlier = self.first.get(key)
        if earlier is None:
            self.first[key] = entry
            return None, True
        seen = self._versions.get(key)
        if seen is None:
            seen = self._versions[key] = {_version(earlier)}
        version = _version(entry)
        if version in seen:
            return earlier, False
        seen.add(version)
        return earlier, True


@dataclass(slots=True)
class _Index:
    """What the logs say of each JWE hash, as (member, entry) pairs in the order read.

    ``sends`` holds each log's distinct versions of a ``sent`` entry (the first
    entry of each), ``receipts`` each log's first ``received`` entry (its
    repeats are checked against it where they are read), ``rejections`` every
    ``rejected`` entry; ``bulk`` the ``rejected_many`` entries, which name no
    JWE, by (source, the log's member).
    """

    sends: dict[str, list[tuple[str, _Entry]]] = field(default_factory=dict)
    receipts: dict[str, list[tuple[str, _Entry]]] = field(default_factory=dict)
    rejections: dict[str, list[tuple[str, _Entry]]] = field(default_factory=dict)
    bulk: dict[tuple[str, str], BulkRefusals] = field(default_factory=dict)


def replay(
    logs: Mapping[str, Sequence[Mapping[str, Any]]],
    policies: Mapping[str, Policy],
    *,
    progress: Iterable[None] | None = None,
) -> Replay:
    """Reconcile the parsed entries of each member's log (``logs[member]``).

    ``policies`` maps policy digests to loaded policies. ``progress``, if given,
    is advanced once per entry (a click progress bar, say).

    No conclusion depends on the order of the logs or on which of several
    entries of one JWE comes last: a member can append entries to its own log
    (its witnesses cosign whatever it appends), so every entry of a JWE is
    weighed, and entries that contradict each other are findings.
    """
    ticks = iter(progress) if progress is not None else None
    index = _Index()
    findings: list[Finding] = []
    for member, entries in logs.items():
        _read_log(member, entries, ticks, index, findings)
    exchanges: list[Exchange] = []
    delivered: set[tuple[str, str, str]] = set()  # (sender, recipient, JWE): counted once
    for jwe, versions in index.sends.items():
        findings += _sent_in_several_logs(versions)
        for member, send in versions:
            # Every version is checked against the policy: a later one cannot
            # stand in for an earlier one that disclosed more.
            status, refused_at = _send_status(jwe, member, send, logs, index, findings)
            if status == "delivered":
                delivered.add((member, send["partner"], jwe))
            exchanges.append(
                Exchange(
                    send["at"],
                    member,
                    send["partner"],
                    send["report_id"],
                    send["kind"],
                    send["tlp"],
                    None if send["rel_to"] is None else tuple(send["rel_to"]),
                    send["policy_digest"],
                    tuple(send["released"]),
                    jwe,
                    status,
                    send["seq"],
                    refused_at,
                )
            )
            findings += _check_release(member, send, policies)
        findings += _not_the_recipient(jwe, versions, index)
    for jwe, receipts in index.receipts.items():
        if jwe in index.sends:
            continue
        for member, recv in receipts:
            sender = recv["sender"]
            kind = "unmatched-receive" if sender in logs else "not-checked"
            findings.append(
                Finding(
                    kind,
                    member,
                    recv["seq"],
                    recv["report_id"],
                    f"received from {sender} but {sender}'s log "
                    + ("has no matching send" if sender in logs else "was not given"),
                )
            )
        # An envelope is encrypted to one member: two cannot both have opened it.
        findings += _in_several_logs(receipts, "a receipt")
    matrix = Counter((sender, recipient) for sender, recipient, _ in delivered)
    exchanges.sort(key=lambda e: (e.at, e.sender, e.seq))
    findings = _resent_after_loss(exchanges, findings)
    findings.sort(key=lambda f: (f.member, f.seq, f.kind))
    return Replay(
        tuple(exchanges),
        dict(matrix),
        tuple(f for f in findings if f.kind != "not-checked"),
        sum(f.kind == "not-checked" for f in findings),
        index.bulk,
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


def _in_several_logs(pairs: Sequence[tuple[str, _Entry]], what: str) -> list[Finding]:
    """One ``conflicting-entries`` finding per log, when more than one log holds ``what``."""
    if len(pairs) < 2:
        return []  # the usual case, kept cheap: one per JWE
    firsts: dict[str, _Entry] = {}
    for member, entry in pairs:
        firsts.setdefault(member, entry)
    if len(firsts) < 2:
        return []
    return [
        Finding(
            "conflicting-entries",
            member,
            entry["seq"],
            entry["report_id"],
            ", ".join(f"{m}'s entry {e['seq']}" for m, e in firsts.items() if m != member)
            + f" also logs {what} of this JWE",
        )
        for member, entry in firsts.items()
    ]


def _sent_in_several_logs(versions: Sequence[tuple[str, _Entry]]) -> list[Finding]:
    # Only the member whose node published an envelope logs it as sent; a send of
    # the same bytes in another log would stand in for (or hide) the real one.
    return _in_several_logs(versions, "a send")


def _not_the_recipient(
    jwe: str, versions: Sequence[tuple[str, _Entry]], index: _Index
) -> list[Finding]:
    """Receipts and rejections of a sent JWE in the log of a member it was not sent to.

    Only the partner can open the envelope, so another member's receipt is
    false; another member's rejection means the envelope reached a member it was
    not sent to (or the rejection is false). Either way the log that holds it is
    named, never the sender's or the partner's.
    """
    recipients = {send["partner"] for _, send in versions}
    receipts = [(m, e) for m, e in index.receipts.get(jwe, ()) if m not in recipients]
    refusals = [(m, e) for m, e in index.rejections.get(jwe, ()) if m not in recipients]
    if not receipts and not refusals:
        return []
    sender, send = versions[0]
    where = f"that {sender}'s entry {send['seq']} sent to {send['partner']}"
    found = [
        Finding(
            "receipt-by-non-recipient",
            member,
            recv["seq"],
            recv["report_id"],
            f"received a JWE from {recv['sender']} {where}, not to {member}",
        )
        for member, recv in receipts
    ]
    found += [
        Finding(
            "rejection-by-non-recipient",
            member,
            refusal["seq"],
            refusal["report_id"],
            f"rejected a JWE from {refusal['source']} {where}, not to {member}",
        )
        for member, refusal in refusals
    ]
    return found


def _send_status(
    jwe: str,
    member: str,
    send: _Entry,
    logs: Mapping[str, Sequence[Mapping[str, Any]]],
    index: _Index,
    findings: list[Finding],
) -> tuple[str, str | None]:
    partner = send["partner"]
    if partner not in logs:
        return "not-checked", None
    for holder, recv in index.receipts.get(jwe, ()):
        if holder == partner:
            # A receipt outweighs a rejection of the same JWE (which, from the
            # same sender, is a conflicting-entries finding of the partner's
            # log): the partner says it holds the report.
            _check_receipt(member, send, partner, recv, findings)
            return "delivered", None
    # Only a refusal of the envelope as it came from its sender counts: the same
    # bytes passed on by a third member and refused say nothing of this send.
    refusals = [
        e for m, e in index.rejections.get(jwe, ()) if m == partner and e["source"] == member
    ]
    for refusal in refusals:
        if refusal["report_id"] not in (None, send["report_id"]):
            findings.append(
                Finding(
                    "mismatch",
                    partner,
                    refusal["seq"],
                    refusal["report_id"],
                    f"rejection of {member}'s entry {send['seq']} differs from it in report",
                )
            )
    if refusals:
        return "rejected", str(refusals[-1]["step"])
    detail = f"sent to {partner}, which logged no receipt of this JWE"
    bulk = index.bulk.get((member, partner))
    if bulk is not None:
        # Counted refusals name no message: this send may be one of them, or lost.
        detail += (
            f"; {partner}'s log counts {bulk.count} refusals of {member}'s messages without"
            f" naming them ({bulk.describe()}): this send may or may not be among them"
        )
    findings.append(Finding("undelivered", member, send["seq"], send["report_id"], detail))
    return "undelivered", None


def _check_receipt(
    member: str, send: _Entry, partner: str, recv: _Entry, findings: list[Finding]
) -> None:
    differ = [
        what
        for what, theirs, ours in (
            ("sender", recv["sender"], member),
            ("report", recv["report_id"], send["report_id"]),
            ("kind", recv["kind"], send["kind"]),
            ("disclosure keys", list(recv["fields"]), list(send["released"])),
        )
        if theirs != ours
    ]
    if differ:
        findings.append(
            Finding(
                "mismatch",
                partner,
                recv["seq"],
                recv["report_id"],
                f"receipt of {member}'s entry {send['seq']} differs from it in "
                + " and ".join(differ),
            )
        )


def _read_log(
    member: str,
    entries: Iterable[Mapping[str, Any]],
    ticks: Iterator[None] | None,
    index: _Index,
    findings: list[Finding],
) -> None:
    """Index one log's sends, receipts and rejections; check what the log alone can tell."""
    timeline = PolicyTimeline()
    sent, received = _Repeats(), _Repeats()
    refused: dict[tuple[str, str], _Entry] = {}  # (JWE, source) -> its first rejection
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
            _read_rejection(member, entry, received, refused, index, findings)
        elif kind == "rejected_many":
            index.bulk.setdefault((entry["source"], member), BulkRefusals()).add(entry)


def _read_send(
    member: str, entry: _Entry, sent: _Repeats, index: _Index, findings: list[Finding]
) -> None:
    """Index a ``sent`` entry: a new version of its JWE's send, or an honest repeat."""
    earlier, new = sent.add(entry)
    if new:
        index.sends.setdefault(entry["jwe_sha256"], []).append((member, entry))
    if earlier is not None and new:
        findings.append(_conflicting_repeat(member, entry, earlier))


def _read_rejection(
    member: str,
    entry: _Entry,
    received: _Repeats,
    refused: dict[tuple[str, str], _Entry],
    index: _Index,
    findings: list[Finding],
) -> None:
    """Index a ``rejected`` entry; a rejection of what the log received is a conflict."""
    jwe, source = entry["jwe_sha256"], entry["source"]
    index.rejections.setdefault(jwe, []).append((member, entry))
    recv = received.first.get(jwe)
    if recv is not None and recv["sender"] == source:
        # The receiver acks a stored envelope again without verifying it: an
        # honest node never refuses what it logged as received from that sender.
        findings.append(
            Finding(
                "conflicting-entries",
                member,
                entry["seq"],
                entry["report_id"],
                f"rejection of a JWE from {source} that entry {recv['seq']} logs as received",
            )
        )
    refused.setdefault((jwe, source), entry)


def _read_receipt(
    member: str,
    entry: _Entry,
    received: _Repeats,
    refused: Mapping[tuple[str, str], _Entry],
    index: _Index,
    findings: list[Finding],
) -> None:
    """Index a ``received`` entry: a log's first of its JWE, an honest repeat, or a conflict."""
    jwe, sender = entry["jwe_sha256"], entry["sender"]
    earlier, new = received.add(entry)
    if earlier is None:
        index.receipts.setdefault(jwe, []).append((member, entry))
    elif new:
        findings.append(_conflicting_repeat(member, entry, earlier))
    refusal = refused.get((jwe, sender))
    if refusal is not None:
        findings.append(
            Finding(
                "conflicting-entries",
                member,
                entry["seq"],
                entry["report_id"],
                f"receipt of a JWE from {sender} that entry {refusal['seq']} logs as rejected",
            )
        )


def _conflicting_repeat(member: str, entry: _Entry, earlier: _Entry) -> Finding:
    return Finding(
        "conflicting-repeat",
        member,
        entry["seq"],
        entry["report_id"],
        f"repeat of entry {earlier['seq']} (same JWE) differs from it in "
        + _differing(entry, earlier),
    )


def _check_release(
    member: str, send: Mapping[str, Any], policies: Mapping[str, Policy]
) -> list[Finding]:
    """Findings on what one send released: empty, under an unknown policy, or too much."""
    found = []
    policy = policies.get(send["policy_digest"])
    if policy is not None and policy.member != member:
        policy = None
    if not send["released"]:
        # Even with no disclosure the message tells the partner that the report
        # exists, its kind and its markings; the node sends nothing instead.
        why = ""
        if policy is not None and not releases_anything(send, policy):
            why = "; the policy releases it nothing for this kind and these markings"
        found.append(
            Finding(
                "empty-send",
                member,
                send["seq"],
                send["report_id"],
                f"to {send['partner']}: a message with no disclosure keys{why}",
            )
        )
    if policy is None:
        found.append(
            Finding(
                "unknown-policy",
                member,
                send["seq"],
                send["report_id"],
                f"policy {send['policy_digest'][:12]}... of {member} was not provided",
            )
        )
        return found
    found += [
        Finding(
            "over-disclosure",
            member,
            send["seq"],
            send["report_id"],
            f"to {send['partner']}: {problem}",
        )
        for problem in over_disclosures(send, policy)
    ]
    return found
