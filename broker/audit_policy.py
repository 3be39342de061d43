"""What an auditor asks of a member's policies about its logged sends (pure).

``over_disclosures`` and ``releases_anything`` ask a policy about one ``sent``
entry from its handling markings alone, as the node decided when the report
went out (the ``_for`` forms take the markings themselves, for a caller that
caches the answers); ``PolicyTimeline`` says whether the policy a send names
was in force for its report. ``broker.audit_replay`` builds findings on these.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from broker.errors import PolicyError
from broker.policy import Policy, Release
from broker.transforms import split_variant_key


def over_disclosures(send: Mapping[str, Any], policy: Policy) -> list[str]:
    """Return one line per disclosure key in ``send`` that ``policy`` would not have released.

    The policy answers from the send's handling markings alone
    (``Policy.releasable``), exactly as it decided when the report went out.
    """
    markings = (send["partner"], send["kind"], send["tlp"], send["originator"], send["rel_to"])
    return over_disclosures_for(policy, *markings, send["released"])


def releases_anything(send: Mapping[str, Any], policy: Policy) -> bool:
    """Whether ``policy`` releases any field at all to the send's partner, given its markings."""
    markings = (send["partner"], send["kind"], send["tlp"], send["originator"], send["rel_to"])
    return releases_anything_for(policy, *markings)


def over_disclosures_for(
    policy: Policy,
    partner: str,
    kind: str,
    tlp: str,
    originator: str,
    rel_to: Sequence[str] | None,
    released: Sequence[str],
) -> list[str]:
    """``over_disclosures`` from the markings themselves: one line per key not released."""
    try:
        cells = _cells(policy, partner, kind, tlp, originator, rel_to)
    except PolicyError as exc:
        return [f"{key}: {exc}" for key in released]
    problems = []
    for key in released:
        try:
            path, _ = split_variant_key(key)
        except ValueError:
            problems.append(f"{key}: not a valid disclosure key")
            continue
        cell = cells.get(path, f"not a field of a {kind} report")
        if not isinstance(cell, Release):
            problems.append(f"{key}: withheld by the policy ({cell})")
        elif cell.disclosure_key != key:
            problems.append(f"{key}: the policy releases it only as {cell.disclosure_key}")
    return problems


def releases_anything_for(
    policy: Policy, partner: str, kind: str, tlp: str, originator: str, rel_to: Sequence[str] | None
) -> bool:
    """``releases_anything`` from the markings themselves."""
    try:
        cells = _cells(policy, partner, kind, tlp, originator, rel_to)
    except PolicyError:
        return False
    return any(isinstance(cell, Release) for cell in cells.values())


def _cells(
    policy: Policy, partner: str, kind: str, tlp: str, originator: str, rel_to: Sequence[str] | None
) -> Mapping[str, Release | str]:
    return policy.releasable(
        partner,
        kind=kind,
        tlp=tlp,
        originator=originator,
        rel_to=rel_to,
        onward=originator != policy.member,
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
        # report -> (seq, policy index, at) of its first arrival
        self._accepted: dict[str, tuple[int, int, str]] = {}
        self._received: dict[str, tuple[int, int, str]] = {}

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
        report = sys.intern(entry["report_id"])  # shared with the sends of the report
        arrivals.setdefault(report, (entry["seq"], len(self.policies) - 1, sys.intern(entry["at"])))

    def arrived_at(self, member: str, send: Mapping[str, Any]) -> str | None:
        """When ``send``'s report arrived in the log (its first entry's ``at``), if it did."""
        arrivals = self._accepted if send["originator"] == member else self._received
        arrival = arrivals.get(send["report_id"])
        return None if arrival is None else arrival[2]

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
