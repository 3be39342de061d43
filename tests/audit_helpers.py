"""Shared builders for the audit tests: keys, events and a populated log in a real SQLite file."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import audit_events as ev
from broker.auditlog import AuditLog
from broker.note import ALG_COSIGNATURE_V1, ALG_ED25519, Verifier

T0 = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
MEMBER = "JPN"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def log_verifier(key: Ed25519PrivateKey, name: str = MEMBER) -> Verifier:
    return Verifier(name, ALG_ED25519, key.public_key().public_bytes_raw())


def witness_verifier(key: Ed25519PrivateKey, name: str) -> Verifier:
    return Verifier(name, ALG_COSIGNATURE_V1, key.public_key().public_bytes_raw())


def event(i: int, member: str = MEMBER) -> ev.AuditEvent:
    """A deterministic mix of every event type (``withheld`` and ``rejected_many`` in every
    other round of 6, in place of ``sent`` and ``rejected``)."""
    at = T0 + timedelta(seconds=i)
    rid = uuid.UUID(int=i)
    match i % 6:
        case 0:
            return ev.accepted(member, at, report_id=rid, kind="vessel", feed="ais-pipeline")
        case 1:
            return _send_event(i, member)
        case 2:
            return ev.received(
                member,
                at,
                sender="KOR",
                report_id=rid,
                kind="transfer",
                fields=["transfer.amount"],
                jwe_sha256=digest(f"jwe{i}"),
                recipient_kid=f"{member.lower()}-enc-1",
            )
        case 3:
            steps = {"format": i - 1, "signature": 1}
            return (
                ev.rejected_many(member, at, source="GBR", count=i, steps=steps)
                if i // 6 % 2
                else ev.rejected(
                    member, at, source="GBR", step="signature", reason="signature does not verify"
                )
            )
        case 4:
            return ev.key_changed(
                member, at, action="rotated", kid="JPN-sig-1", new_kid="JPN-sig-2"
            )
        case _:
            return ev.policy_changed(
                member, at, policy_digest=digest("p2"), previous_digest=digest("policy")
            )


def _send_event(i: int, member: str) -> ev.AuditEvent:
    """``event``'s send: ``sent``, or ``withheld`` in every other round of 6."""
    send: dict[str, Any] = {
        "partner": "USA",
        "report_id": uuid.UUID(int=i),
        "kind": "vessel",
        "released": ["vessel.imo", "vessel.position#coarsen:0.1"],
        "policy_digest": digest("policy"),
        "jwe_sha256": digest(f"jwe{i}"),
        "originator": member,
        "tlp": "AMBER",
        "rel_to": None,
        "recipient_kid": "usa-enc-1",
    }
    at = T0 + timedelta(seconds=i)
    if i // 6 % 2:
        return ev.withheld(member, at, **send, reason="key usa-enc-1 is revoked")
    return ev.sent(member, at, **send)


def unstored_event(i: int, member: str = MEMBER) -> ev.AuditEvent:
    """A refusal: an entry with no store counterpart, to append to a real node's own log.

    A node checks at start that its store holds what its log's newest entries
    say it accepted, sent and received (``broker.reconcile.check_store_against_log``).
    """
    at = T0 + timedelta(seconds=i)
    return ev.rejected(member, at, source="GBR", step="signature", reason=f"test {i}")


def build_log(
    datadir: Path, key: Ed25519PrivateKey, batches: list[int], member: str = MEMBER
) -> AuditLog:
    """A log with one append_many (and so one checkpoint) per batch size given."""
    log = AuditLog(datadir, member, key)
    i = log.size
    for n in batches:
        log.append_many([event(j, member) for j in range(i, i + n)])
        i += n
    return log
