"""Replay several nodes' audit logs (pure): a timeline, a who-sent-to-whom matrix, and findings.

Inputs are logs already verified by ``broker.audit_verify`` (parsed entries by
member) and the policies the auditor holds (by digest). Within each log:

* every entry names the log's own member, else ``wrong-member`` (and the entry
  is left out of everything else);
* each ``policy`` entry's ``previous_digest`` is the digest of the log's
  previous ``policy`` entry (``null`` for the first), else ``policy-chain``;
* each send's policy was in force between the report's arrival in the log and
  the send, else ``policy-not-in-force`` (see ``PolicyTimeline``);
* a send releases at least one disclosure key, else ``empty-send``.

Across logs:

* every send has a receive with the same JWE hash in the partner's log, else it
  is ``undelivered`` (or ``rejected`` when the partner logged a rejection of it);
* every receive has a send with the same JWE hash in the sender's log, else it
  is an ``unmatched-receive`` (the sender's log lost or never had the send);
* a receive names the same sender, report, kind and disclosure keys as its
  send, else ``mismatch``;
* each send's disclosure keys are what the sender's policy (found by the
  digest the entry names) releases to that partner for that kind and marking;
  anything else is an ``over-disclosure``.

Logs not given are not guessed at: their side is reported as ``not-checked``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from broker.errors import PolicyError
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


@dataclass(frozen=True, slots=True)
class Replay:
    """The result: exchanges in time order, the delivered-sends matrix, and findings."""

    exchanges: tuple[Exchange, ...]
    matrix: Mapping[tuple[str, str], int]
    findings: tuple[Finding, ...]

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
            "never_delivered": [
                {
                    "sender": e.sender,
                    "recipient": e.recipient,
                    "report_id": e.report_id,
                    "refused_at": e.refused_at,
                }
                for e in self.never_delivered()
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


_Seen = dict[str, tuple[str, Mapping[str, Any]]]
"""Entries of one type by JWE hash, with the member whose log holds them."""


def replay(
    logs: Mapping[str, Sequence[Mapping[str, Any]]],
    policies: Mapping[str, Policy],
    *,
    progress: Iterable[None] | None = None,
) -> Replay:
    """Reconcile the parsed entries of each member's log (``logs[member]``).

    ``policies`` maps policy digests to loaded policies. ``progress``, if given,
    is advanced once per entry (a click progress bar, say).
    """
    ticks = iter(progress) if progress is not None else None
    sends: _Seen = {}
    receives: _Seen = {}
    rejections: _Seen = {}
    findings: list[Finding] = []
    for member, entries in logs.items():
        _read_log(member, entries, ticks, sends, receives, rejections, findings)
    exchanges: list[Exchange] = []
    matrix: Counter[tuple[str, str]] = Counter()
    for jwe, (member, send) in sends.items():
        status, refused_at = _send_status(jwe, member, send, logs, receives, rejections, findings)
        if status == "delivered":
            matrix[(member, send["partner"])] += 1
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
    for jwe, (member, recv) in receives.items():
        if jwe in sends:
            continue
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
    exchanges.sort(key=lambda e: (e.at, e.sender, e.seq))
    findings.sort(key=lambda f: (f.member, f.seq, f.kind))
    return Replay(
        tuple(exchanges), dict(matrix), tuple(f for f in findings if f.kind != "not-checked")
    )


def _send_status(
    jwe: str,
    member: str,
    send: Mapping[str, Any],
    logs: Mapping[str, Sequence[Mapping[str, Any]]],
    receives: Mapping[str, tuple[str, Mapping[str, Any]]],
    rejections: Mapping[str, tuple[str, Mapping[str, Any]]],
    findings: list[Finding],
) -> tuple[str, str | None]:
    partner = send["partner"]
    if partner not in logs:
        return "not-checked", None
    if jwe in rejections and rejections[jwe][0] == partner:
        return "rejected", str(rejections[jwe][1]["step"])
    match = receives.get(jwe)
    if match is None or match[0] != partner:
        findings.append(
            Finding(
                "undelivered",
                member,
                send["seq"],
                send["report_id"],
                f"sent to {partner}, which logged no receipt of this JWE",
            )
        )
        return "undelivered", None
    recv = match[1]
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
    return "delivered", None


def _read_log(
    member: str,
    entries: Iterable[Mapping[str, Any]],
    ticks: Iterator[None] | None,
    sends: _Seen,
    receives: _Seen,
    rejections: _Seen,
    findings: list[Finding],
) -> None:
    """Index one log's sends, receipts and rejections; check what the log alone can tell."""
    timeline = PolicyTimeline()
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
            sends[entry["jwe_sha256"]] = (member, entry)
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
                receives[entry["jwe_sha256"]] = (member, entry)
            timeline.add_arrival(entry)
        elif kind == "policy":
            problem = timeline.add_policy(entry)
            if problem is not None:
                findings.append(Finding("policy-chain", member, entry["seq"], None, problem))
        elif kind == "rejected" and entry["jwe_sha256"] is not None:
            rejections[entry["jwe_sha256"]] = (member, entry)


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
