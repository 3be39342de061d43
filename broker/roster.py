"""The public roster: a JWK Set (RFC 7517) of every member's public keys and their status.

Each key carries, beside the standard ``kty``/``crv``/``x``/``kid``/``use``/``alg``
members, four private-use members that the MSMT agrees on:

* ``msmt_member``: the owner's trigraph;
* ``msmt_status``: ``active``, ``retired`` (superseded by rotation; still verifies
  reports made before ``msmt_retired_at``) or ``revoked`` (never verifies again);
* ``msmt_valid_from`` / ``msmt_valid_until``: RFC 3339 UTC times bounding its use.

This module is pure: it parses and checks a roster already loaded into memory.
Signing and reading it live in ``broker.keys_roster``, writing it in
``broker.keys_custodian``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from broker.errors import KeyMaterialError
from broker.members import is_member

KeyUse = Literal["sig", "enc"]
KeyStatus = Literal["active", "retired", "revoked"]
CURVES: Final[dict[str, str]] = {"sig": "Ed25519", "enc": "X25519"}


def parse_time(value: object, what: str) -> datetime:
    """Parse an RFC 3339 UTC time such as ``2026-11-28T00:00:00Z``."""
    if not isinstance(value, str):
        raise KeyMaterialError(f"{what} must be an RFC 3339 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise KeyMaterialError(f"{what} is not an RFC 3339 time: {value!r}") from None
    if parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:  # type: ignore[union-attr]
        raise KeyMaterialError(f"{what} must be UTC: {value!r}")
    return parsed


def format_time(value: datetime) -> str:
    """Format a UTC datetime as RFC 3339 with a ``Z`` suffix, to the second."""
    return value.replace(microsecond=0).isoformat().replace("+00:00", "Z")


CLOCK_SKEW: Final = timedelta(minutes=5)
"""How far a signed time may be off a key's validity at either end and still count.

The custodian's clock set the validity; the signer's clock set the signed time. A
receiver already takes an ``iat`` this far in its own future, so a key retired, expired
or made this close to a report's ``iat`` may have been the right one when it was
signed (a clock trial: a member 200 s ahead, rotated within that, lost reports, and its
partners' stores then failed ``msmt inbox check``). Never for a revoked key."""


@dataclass(frozen=True, slots=True)
class RosterKey:
    """One public key in the roster, with its owner, use, status and validity."""

    kid: str
    member: str
    use: KeyUse
    status: KeyStatus
    valid_from: datetime
    valid_until: datetime
    retired_at: datetime | None
    jwk: Mapping[str, Any]
    revoked_at: datetime | None = None
    """When ``msmt keys revoke`` revoked it, for auditors (``msmt_revoked_at``); checks
    need only the status."""

    def public_key(self) -> OKPKey:
        """Return the key as a joserfc ``OKPKey`` (public part only)."""
        return OKPKey.import_key(dict(self.jwk))

    def usable_at(self, at: datetime, skew: timedelta = timedelta(0)) -> str | None:
        """Return why this key may not verify something made at ``at``, or ``None`` if it may.

        ``skew`` widens the validity by that much at each end (``CLOCK_SKEW``), never
        for a revoked key.
        """
        if self.status == "revoked":
            return f"key {self.kid} is revoked"
        if at < self.valid_from - skew:
            return f"key {self.kid} is not valid before {format_time(self.valid_from)}"
        if at > self.valid_until + skew:
            return f"key {self.kid} expired at {format_time(self.valid_until)}"
        if (
            self.status == "retired"
            and self.retired_at is not None
            and at >= self.retired_at + skew
        ):
            return f"key {self.kid} was retired at {format_time(self.retired_at)}"
        return None


_STANDARD: Final = frozenset({"kty", "crv", "x", "kid", "use", "alg"})
_OURS: Final = frozenset(
    {
        "msmt_member",
        "msmt_status",
        "msmt_valid_from",
        "msmt_valid_until",
        "msmt_retired_at",
        # Recorded by ``msmt keys revoke`` for auditors; the check needs only the status.
        "msmt_revoked_at",
        "msmt_revoked_reason",
    }
)


KID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A key id the roster takes: a safe file name (``broker.keys``) and an audit entry's token."""


def parse_key(entry: Mapping[str, Any]) -> RosterKey:
    """Validate one roster JWK and return it; raise ``KeyMaterialError`` naming the fault."""
    if not isinstance(entry, Mapping):  # a JSON file's, any shape (a fuzzer: a traceback)
        raise KeyMaterialError("roster key is not a JSON object")
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise KeyMaterialError("roster key without a kid")
    if KID.fullmatch(kid) is None:
        # Else a kid the roster took stopped its member's node at the audit entry of
        # its retirement (a review: digits of another script, from a key request).
        raise KeyMaterialError(
            f"roster key {kid[:80]!a}: a kid is 1-64 ASCII letters, digits, '.', '_'"
            " and '-', starting with a letter or digit"
        )
    if "d" in entry:
        raise KeyMaterialError(f"roster key {kid} contains private key material")
    unknown = set(entry) - _STANDARD - _OURS
    if unknown:
        raise KeyMaterialError(f"roster key {kid} has unknown members {sorted(unknown)}")
    use = entry.get("use")
    if use not in tuple(CURVES):  # a tuple: a list (unhashable) is refused, not a TypeError
        raise KeyMaterialError(f"roster key {kid}: use must be 'sig' or 'enc'")
    if entry.get("kty") != "OKP" or entry.get("crv") != CURVES[use]:
        raise KeyMaterialError(f"roster key {kid}: a {use} key must be OKP {CURVES[use]}")
    member = entry.get("msmt_member")
    if not isinstance(member, str) or not is_member(member):
        raise KeyMaterialError(f"roster key {kid}: unknown member {member!r}")
    status = entry.get("msmt_status")
    if status not in ("active", "retired", "revoked"):
        raise KeyMaterialError(f"roster key {kid}: unknown status {status!r}")
    try:
        public: dict[str, Any] = {k: entry.get(k) for k in ("kty", "crv", "x")}  # no "x": refused
        OKPKey.import_key(public)
    except (ValueError, JoseError) as exc:
        raise KeyMaterialError(f"roster key {kid}: malformed public key ({exc})") from None
    valid_from = parse_time(entry.get("msmt_valid_from"), f"roster key {kid} valid-from")
    valid_until = parse_time(entry.get("msmt_valid_until"), f"roster key {kid} valid-until")
    if valid_until <= valid_from:
        raise KeyMaterialError(f"roster key {kid}: valid-until is not after valid-from")
    retired = entry.get("msmt_retired_at")
    retired_at = parse_time(retired, f"roster key {kid} retired-at") if retired else None
    revoked = entry.get("msmt_revoked_at")
    revoked_at = parse_time(revoked, f"roster key {kid} revoked-at") if revoked else None
    return RosterKey(
        kid=kid,
        member=member,
        use=use,
        status=status,
        valid_from=valid_from,
        valid_until=valid_until,
        retired_at=retired_at,
        jwk={k: entry[k] for k in entry if k in _STANDARD},
        revoked_at=revoked_at,
    )


class Roster:
    """All members' public keys, indexed by ``kid``; built from a JWK Set.

    Raises ``KeyMaterialError`` on a malformed key or a duplicate ``kid``.
    """

    def __init__(self, keys: Iterable[RosterKey]) -> None:
        self._keys: dict[str, RosterKey] = {}
        for key in keys:
            if key.kid in self._keys:
                raise KeyMaterialError(f"duplicate kid {key.kid} in roster")
            self._keys[key.kid] = key
        # Each member's keys by use: a publisher looks up every partner's current
        # encryption key per report, and the whole roster is ~3 keys per member.
        self._by_owner: dict[tuple[str, str], list[RosterKey]] = {}
        for key in self._keys.values():
            self._by_owner.setdefault((key.member, key.use), []).append(key)
        # Parsed public keys are cached: verification looks them up per message.
        self._public: dict[str, OKPKey] = {}

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> Roster:
        """Build a roster from a parsed JWK Set (``{"keys": [...]}``)."""
        if not isinstance(jwks, Mapping):  # a JSON file's, any shape
            raise KeyMaterialError("roster is not a JWK Set: not a JSON object")
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise KeyMaterialError("roster is not a JWK Set: no 'keys' list")
        return cls(parse_key(k) for k in keys)

    def __iter__(self) -> Any:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def get(self, kid: str) -> RosterKey:
        """Return the key with this ``kid``; raise ``KeyMaterialError`` if unknown."""
        try:
            return self._keys[kid]
        except KeyError:
            raise KeyMaterialError(f"kid {kid!r} is not in the roster") from None

    def public_key(self, kid: str) -> OKPKey:
        """Return the cached joserfc public key for ``kid``."""
        key = self._public.get(kid)
        if key is None:
            key = self._public[kid] = self.get(kid).public_key()
        return key

    def check(
        self, kid: str, *, member: str, use: KeyUse, at: datetime, skew: timedelta = timedelta(0)
    ) -> RosterKey:
        """Return the key if ``member`` may use it for ``use`` at ``at``, give or take ``skew``.

        Raises ``KeyMaterialError`` saying exactly why not: unknown kid, another
        member's key, wrong use, revoked, retired before ``at``, or out of validity.
        """
        key = self.get(kid)
        if key.member != member:
            raise KeyMaterialError(f"key {kid} belongs to {key.member}, not {member}")
        if key.use != use:
            raise KeyMaterialError(f"key {kid} is a {key.use} key, not {use}")
        reason = key.usable_at(at, skew)
        if reason is not None:
            raise KeyMaterialError(reason)
        return key

    def check_signer(self, kid: str, member: str, at: datetime) -> RosterKey:
        """``check`` of our own signing key at ``at``, before we sign with it.

        ``CLOCK_SKEW`` before its ``valid_from`` (a node started on a new key just
        before, by its own clock, signs at once, as partners allow), none after it
        lapses: a key past its ``valid_until`` by our clock is not ours to sign with.
        """
        key = self.check(kid, member=member, use="sig", at=at, skew=CLOCK_SKEW)
        if at > key.valid_until:
            raise KeyMaterialError(f"key {kid} expired at {format_time(key.valid_until)}")
        return key

    def withdrawn(self, kid: str) -> str | None:
        """Why what ``kid`` signed is no longer trusted, or None while it still is.

        Revoking a key withdraws trust in everything it signed, whenever it was
        signed; so does a roster that no longer lists the key. Retirement and
        expiry do not: what a key signed while it was valid stands.
        """
        key = self._keys.get(kid)
        if key is None:
            # repr: the kid comes from a store row, which may hold anything.
            return f"key {kid!r} is not in the roster"
        return f"key {kid} is revoked" if key.status == "revoked" else None

    def current(
        self, member: str, use: KeyUse, at: datetime, skew: timedelta = timedelta(0)
    ) -> RosterKey:
        """Return the member's active key for ``use`` at ``at`` (the newest if several).

        With ``skew``, a key valid within that much of ``at`` counts (``usable_at``).
        """
        candidates = [
            k
            for k in self._by_owner.get((member, use), ())
            if k.status == "active" and k.usable_at(at, skew) is None
        ]
        if not candidates:
            raise KeyMaterialError(f"{member} has no active {use} key valid now")
        return max(candidates, key=lambda k: k.valid_from)
