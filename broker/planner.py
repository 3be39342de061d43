"""Plan: turn each accepted report into one envelope per partner the policy releases it to.

The first of the outbox's two stages (``broker.publisher`` describes both), and pure:
no I/O, no NATS, so the planning worker (``broker.planpool``) imports only the
policy and the envelope crypto. For each report ``Planner`` runs the policy for
every partner, issues the SD-JWT once and presents it to each partner that is
released anything, as that partner's exact JWE with its send facts; the node
commits the result in the same transaction that marks the report planned.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, NamedTuple

from joserfc.jwk import OKPKey

from broker.envelope import Recipient, issue, present_all
from broker.errors import KeyMaterialError, MsmtError
from broker.policy import Policy, variants
from broker.roster import Roster
from broker.sightings import SightingModel
from broker.store import OutboxItem
from broker.validation import parse_record

# One encoder for every envelope's send facts: ``json.dumps`` with any option
# builds a new encoder per call.
_AUDIT_JSON: Final = json.JSONEncoder(separators=(",", ":"))


def subject_for(partner: str, kind: str) -> str:
    """The subject a sender publishes a report of ``kind`` to ``partner`` on."""
    return f"msmt.to.{partner}.{kind}"


@dataclass(frozen=True, slots=True)
class Signer:
    """The member's current signing key, for issuing reports."""

    member: str
    key: OKPKey
    kid: str


class Plans(NamedTuple):
    """What ``Planner.plan`` made of a batch of reports."""

    plans: dict[str, list[OutboxItem]]
    """Report id -> its envelopes (possibly none)."""
    errors: dict[str, str]
    """Report id -> why it cannot be planned now (it stays unplanned)."""
    waiting: dict[str, dict[str, str]]
    """Report id -> {partner: why it has no envelope yet}: no valid encryption key."""


class Planner:
    """Turns accepted reports into per-partner envelopes (pure apart from the store calls)."""

    def __init__(
        self,
        signer: Signer,
        policy: Policy,
        roster: Roster,
        pseudonym_keys: Mapping[str, bytes],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.signer = signer
        self.policy = policy
        self.roster = roster
        self.pseudonym_keys = pseudonym_keys
        self.clock = clock

    def envelopes(self, report_id: str, record: bytes) -> list[OutboxItem]:
        """The envelopes for one stored record; raise ``MsmtError`` if it cannot be planned.

        Every partner must have a valid encryption key (``envelopes_waiting`` plans
        for those that do).
        """
        items, waiting = self.envelopes_waiting(report_id, record)
        if waiting:
            raise KeyMaterialError(next(iter(waiting.values())))
        return items

    def envelopes_waiting(
        self, report_id: str, record: bytes
    ) -> tuple[list[OutboxItem], dict[str, str]]:
        """The envelopes for one stored record, and the partners that must wait for a key.

        A partner the policy releases to but whose encryption key is missing or not
        valid now is left out, with the reason: one partner's lapsed key must not
        hold back the report for every other. Raises ``MsmtError`` if the report
        cannot be planned at all (e.g. this node's own signing key expired).
        """
        sighting = parse_record(record)
        now = self.clock().replace(microsecond=0)
        decisions = [d for d in self.policy.decide_all(sighting).values() if d.sends]
        if not decisions:
            return [], {}
        waiting: dict[str, str] = {}
        keyed = []
        for decision in decisions:
            try:
                keyed.append((decision, self.roster.current(decision.partner, "enc", now)))
            except KeyMaterialError as exc:
                waiting[decision.partner] = str(exc)
        if not keyed:
            return [], waiting
        # The key was current when the node started; a node left running past its
        # msmt_valid_until would sign reports every partner refuses. Holding the
        # report unplanned (retried, and logged with this reason) loses nothing:
        # after a rotation and restart it goes out under the new key.
        try:
            self.roster.check_signer(self.signer.kid, self.signer.member, now)
        except KeyMaterialError as exc:
            raise KeyMaterialError(f"cannot sign: {exc}") from None
        issued = issue(
            sighting,
            signing_key=self.signer.key,
            kid=self.signer.kid,
            policy_digest=self.policy.digest,
            variants=variants(sighting, decisions, self.pseudonym_keys),
            now=now,
        )
        items = []
        # When it was signed: one pending too long is signed again (Store.queue_stale).
        iat = int(now.timestamp())
        # The send facts after "iat" and "bytes" differ between partners only by the
        # released keys, mostly the same for all: encoded once per distinct set.
        facts: dict[tuple[str, ...], str] = {}
        # One call for all partners: their envelopes are padded to one length.
        recipients = [
            Recipient(d.partner, enc.kid, self.roster.public_key(enc.kid), d.disclosure_keys())
            for d, enc in keyed
        ]
        for to, jwe in zip(recipients, present_all(issued, recipients), strict=True):
            released = tuple(sorted(to.disclosure_keys))
            rest = facts.get(released)
            if rest is None:
                whole = send_facts(0, 0, sighting, released, self.policy.digest)
                rest = facts[released] = whole.removeprefix(_NO_IAT_NO_BYTES)
            items.append(
                OutboxItem(
                    report_id=report_id,
                    partner=to.partner,
                    subject=subject_for(to.partner, sighting.kind),
                    jwe=jwe.encode("ascii"),
                    # Exactly ``send_facts(iat, len(jwe), ...)``: the encoder writes
                    # an int as its repr, and the members in this order.
                    audit=f'{{"iat":{iat},"bytes":{len(jwe)},{rest}',
                )
            )
        return items, waiting

    def plan(self, rows: list[tuple[str, bytes]], limit: int) -> Plans:
        """Envelopes for up to ``limit`` of ``rows`` (from ``Store.unplanned``).

        A report that cannot be planned at all (e.g. our signing key expired) is
        named in ``errors`` and stays unplanned, so the caller can retry it later
        without holding up the others. Partners without a valid encryption key
        are named in ``waiting`` (the report is planned for the others). No I/O:
        the node runs this off the store's thread, so publishing goes on meanwhile.
        """
        result = Plans({}, {}, {})
        for report_id, record in rows:
            try:
                items, waiting = self.envelopes_waiting(report_id, record)
            except MsmtError as exc:
                result.errors[report_id] = str(exc)
            else:
                result.plans[report_id] = items
                if waiting:
                    result.waiting[report_id] = waiting
            if len(result.plans) >= limit:
                break
        return result


def keyless_partners(policy: Policy, roster: Roster, at: datetime) -> frozenset[str]:
    """The partners ``policy`` releases to with no valid encryption key in ``roster`` at ``at``.

    What is released to them waits (``awaiting_key``) until they have one: a member
    not enrolled yet, or suspended.
    """
    named = {p for rule in policy.rules if rule.effect == "release" for p in rule.members}
    keyless = set()
    for partner in named:
        try:
            roster.current(partner, "enc", at)
        except KeyMaterialError:
            keyless.add(partner)
    return frozenset(keyless)


def send_facts(
    iat: int, size: int, sighting: SightingModel, released: Sequence[str], policy_digest: str
) -> str:
    """An envelope's send facts as the outbox keeps them (``OutboxItem.audit``), no content.

    ``iat``: when it was signed (one pending too long is signed again,
    ``Store.queue_stale``); ``size``: its length, which the outbox keeps after
    dropping the sent bytes; the rest is what its ``sent`` entry records.
    """
    return _AUDIT_JSON.encode(
        {
            "iat": iat,
            "bytes": size,
            "kind": sighting.kind,
            "released": list(released),
            "policy": policy_digest,
            "originator": sighting.originator,
            "tlp": sighting.tlp,
            "rel_to": None if sighting.rel_to is None else list(sighting.rel_to),
        }
    )


_NO_IAT_NO_BYTES: Final = '{"iat":0,"bytes":0,'
