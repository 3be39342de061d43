"""A small MSMT world for envelope tests: members' keys, a roster, a clock, sightings.

Keys are derived from fixed seeds so failures reproduce and the worked example
in docs/ENVELOPE.md is stable; they are test keys and protect nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from joserfc.jwk import OKPKey

from broker import envelope
from broker.members import MEMBERS
from broker.roster import Roster, format_time
from broker.samples import example_records, generate
from broker.sightings import SIGHTING_ADAPTER, SightingModel

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
VALID_FROM = datetime(2026, 1, 1, tzinfo=UTC)
VALID_UNTIL = datetime(2036, 1, 1, tzinfo=UTC)  # far off: some tests run on the real clock
# Shaped as a node writes it (a policy's bare hex digest), of a policy that is not one.
POLICY = hashlib.sha256(b"test policy: not a real one").hexdigest()
MAX_AGE = timedelta(days=7)
MAX_SKEW = timedelta(minutes=5)


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"msmt-test-key\x00" + label.encode()).digest()


def sig_key(member: str, n: int = 1) -> OKPKey:
    """The member's n-th Ed25519 signing key (private)."""
    return OKPKey.import_key(Ed25519PrivateKey.from_private_bytes(_seed(f"{member}-sig-{n}")))


def enc_key(member: str, n: int = 1) -> OKPKey:
    """The member's n-th X25519 decryption key (private)."""
    return OKPKey.import_key(X25519PrivateKey.from_private_bytes(_seed(f"{member}-enc-{n}")))


def roster_entry(
    member: str,
    use: str,
    n: int = 1,
    *,
    status: str = "active",
    valid_from: datetime = VALID_FROM,
    valid_until: datetime = VALID_UNTIL,
    retired_at: datetime | None = None,
) -> dict[str, Any]:
    """One roster JWK in the format broker/roster.py documents."""
    key = sig_key(member, n) if use == "sig" else enc_key(member, n)
    entry: dict[str, Any] = {
        **key.as_dict(private=False),
        "kid": f"{member}-{use}-{n}",
        "use": use,
        "alg": envelope.JWS_ALG if use == "sig" else envelope.KEY_ALG,
        "msmt_member": member,
        "msmt_status": status,
        "msmt_valid_from": format_time(valid_from),
        "msmt_valid_until": format_time(valid_until),
    }
    if retired_at is not None:
        entry["msmt_retired_at"] = format_time(retired_at)
    return entry


def default_entries() -> list[dict[str, Any]]:
    """Every member with one active sig key and one active enc key."""
    return [roster_entry(m, use) for m in MEMBERS for use in ("sig", "enc")]


def make_roster(entries: list[dict[str, Any]] | None = None) -> Roster:
    """A roster from JWK entries (the default world if none given)."""
    return Roster.from_jwks({"keys": entries if entries is not None else default_entries()})


def vessel() -> SightingModel:
    """The fixed example vessel sighting (JPN), as in schemas/examples."""
    return SIGHTING_ADAPTER.validate_json(json.dumps(example_records()["vessel"]))


def sightings(count: int, seed: int) -> list[SightingModel]:
    """Generated valid sightings of all kinds, from several originators."""
    return [SIGHTING_ADAPTER.validate_json(json.dumps(r)) for r in generate(count, seed=seed)]


@dataclass
class Node:
    """One member's view: its name, its private keys and the shared roster."""

    member: str
    roster: Roster = field(default_factory=make_roster)

    def issue(self, sighting: SightingModel, **kw: Any) -> envelope.Issued:
        kw.setdefault("now", NOW)
        kw.setdefault("policy_digest", POLICY)
        return envelope.issue(
            sighting, signing_key=sig_key(self.member), kid=f"{self.member}-sig-1", **kw
        )

    def present(self, issued: envelope.Issued, to: str, keys: Any) -> str:
        return envelope.present(
            issued,
            disclosure_keys=keys,
            recipient=to,
            recipient_kid=f"{to}-enc-1",
            recipient_key=self.roster.public_key(f"{to}-enc-1"),
        )

    def receive(self, token: str, **kw: Any) -> envelope.Received:
        kw.setdefault("now", NOW)
        kw.setdefault("max_age", MAX_AGE)
        kw.setdefault("max_skew", MAX_SKEW)
        kw.setdefault("attested_sender", None)
        return envelope.receive(
            token,
            me=self.member,
            decryption_keys={f"{self.member}-enc-1": enc_key(self.member)},
            roster=self.roster,
            **kw,
        )
