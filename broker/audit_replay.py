"""Replay several nodes' audit logs (pure): a timeline, a who-sent-to-whom matrix, and findings.

Inputs are logs already verified by ``broker.audit_verify`` (parsed entries by
member) and the policies the auditor holds (by digest). Reconciliation:

* every send has a receive with the same JWE hash in the partner's log, else it
  is ``undelivered`` (or ``rejected`` when the partner logged a rejection of it);
* every receive has a send with the same JWE hash in the sender's log, else it
  is an ``unmatched-receive`` (the sender's log lost or never had the send);
* a receive names the same sender, report and disclosure keys as its send,
  else ``mismatch``;
* each send's disclosure keys are what the sender's policy (found by the
  digest the entry names) releases to that partner for that kind and marking;
  anything else is an ``over-disclosure``.

Logs not given are not guessed at: their side is reported as ``not-checked``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
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
    released: tuple[str, ...]
    jwe_sha256: str
    status: str  # delivered | undelivered | rejected | not-checked
    seq: int


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

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form for tools (``msmt audit replay --json``)."""
        return {
            "exchanges": [asdict(e) | {"released": list(e.released)} for e in self.exchanges],
            "matrix": [
                {"sender": s, "recipient": r, "delivered": n}
                for (s, r), n in sorted(self.matrix.items())
            ],
            "findings": [asdict(f) for f in self.findings],
        }


def over_disclosures(send: Mapping[str, Any], policy: Policy) -> list[str]:
    """Return one line per disclosure key in ``send`` that ``policy`` would not have released.

    The policy answers from the send's handling markings alone
    (``Policy.releasable``), exactly as it decided when the report went out.
    """
    released = send["released"]
    try:
        cells = policy.releasable(
            send["partner"],
            kind=send["kind"],
            tlp=send["tlp"],
            originator=send["originator"],
            rel_to=send["rel_to"],
            onward=send["originator"] != policy.member,
        )
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
    sends: dict[str, tuple[str, Mapping[str, Any]]] = {}
    receives: dict[str, tuple[str, Mapping[str, Any]]] = {}
    rejections: dict[str, tuple[str, Mapping[str, Any]]] = {}
    findings: list[Finding] = []
    for member, entries in logs.items():
        for entry in entries:
            if ticks is not None:
                next(ticks, None)
            kind = entry["type"]
            if kind == "sent":
                sends[entry["jwe_sha256"]] = (member, entry)
            elif kind == "received":
                receives[entry["jwe_sha256"]] = (member, entry)
            elif kind == "rejected" and entry["jwe_sha256"] is not None:
                rejections[entry["jwe_sha256"]] = (member, entry)
    exchanges: list[Exchange] = []
    matrix: Counter[tuple[str, str]] = Counter()
    for jwe, (member, send) in sends.items():
        status = _send_status(jwe, member, send, logs, receives, rejections, findings)
        if status == "delivered":
            matrix[(member, send["partner"])] += 1
        exchanges.append(
            Exchange(
                send["at"],
                member,
                send["partner"],
                send["report_id"],
                send["kind"],
                tuple(send["released"]),
                jwe,
                status,
                send["seq"],
            )
        )
        policy = policies.get(send["policy_digest"])
        if policy is None or policy.member != member:
            findings.append(
                Finding(
                    "unknown-policy",
                    member,
                    send["seq"],
                    send["report_id"],
                    f"policy {send['policy_digest'][:12]}... of {member} was not provided",
                )
            )
            continue
        for problem in over_disclosures(send, policy):
            findings.append(
                Finding(
                    "over-disclosure",
                    member,
                    send["seq"],
                    send["report_id"],
                    f"to {send['partner']}: {problem}",
                )
            )
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
) -> str:
    partner = send["partner"]
    if partner not in logs:
        return "not-checked"
    if jwe in rejections and rejections[jwe][0] == partner:
        return "rejected"
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
        return "undelivered"
    recv = match[1]
    if (recv["sender"], recv["report_id"], list(recv["fields"])) != (
        member,
        send["report_id"],
        list(send["released"]),
    ):
        findings.append(
            Finding(
                "mismatch",
                partner,
                recv["seq"],
                recv["report_id"],
                f"receipt of {member}'s entry {send['seq']} names other sender, report or fields",
            )
        )
    return "delivered"
