"""The signed roster: the authority's detached JWS, and the roster read and verified.

``roster.json`` is signed by the roster authority with a detached JWS (RFC 7515
Appendix F) over its RFC 8785 bytes, in ``roster.json.jws``. A node verifies it
against the authority key it pins, never accepts an older version than it has seen
(``load_pinned_roster``), and reads the pair again while a custodian's write renames
it into place. ``broker.keys_users`` signs ``nats-users.json`` with the same
helpers; the roster's writes are the custodian's (``broker.keys_custodian``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import rfc8785
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import OKPKey

from broker.errors import KeyMaterialError
from broker.files import read_file_text
from broker.keys import (
    AUTHORITY_PUBLIC_FILE,
    ROSTER_FILE,
    ROSTER_JWS_TYP,
    ROSTER_SIG_FILE,
    json_bytes,
    load_authority,
    read_json,
    write_atomic,
)
from broker.roster import Roster

ROSTER_STAGED: Final = f"{ROSTER_FILE}.new"
ROSTER_SIG_STAGED: Final = f"{ROSTER_SIG_FILE}.new"
"""Where ``write_roster`` puts the new pair aside before renaming it into place."""


def sign_roster(jwks: Mapping[str, Any], authority: OKPKey) -> str:
    """Return a detached compact JWS (Ed25519) over the RFC 8785 bytes of ``jwks``."""
    return sign_detached(jwks, authority, ROSTER_JWS_TYP)


def sign_detached(value: Mapping[str, Any], authority: OKPKey, typ: str) -> str:
    """A detached compact JWS (Ed25519, ``typ``) by ``authority`` over ``value`` (RFC 8785)."""
    header = {"alg": "Ed25519", "kid": authority.kid, "typ": typ}
    token = jws.serialize_compact(
        header, rfc8785.dumps(dict(value)), authority, algorithms=["Ed25519"]
    )
    return str(jws.detach_content(token))


def verify_detached(
    what: str, value: Mapping[str, Any], signature: str, authority: OKPKey, typ: str, pinned_at: str
) -> None:
    """Steps shared by the authority's signed files: the header, then the signature.

    Raises ``KeyMaterialError`` naming ``what`` (the roster, or the file's path) and
    the pinned key's file.
    """
    parts = signature.strip().split(".")
    if len(parts) == 3 and parts[1]:
        # joserfc verifies a payload carried in the JWS and ignores payload= then: any
        # file the authority ever signed, its payload put in the middle, vouched for
        # whatever roster or users stood beside it (a review forged both).
        raise KeyMaterialError(
            f"{what} signature is not detached: its payload part is not empty (RFC 7515 Appendix F)"
        )
    try:
        header = jws.extract_compact(signature.strip().encode()).protected
    except (ValueError, JoseError) as exc:
        raise KeyMaterialError(f"{what} signature is malformed ({exc})") from None
    if isinstance(header.get("kid"), str) and header["kid"] != authority.kid:
        raise KeyMaterialError(
            f"{what} is signed by {header['kid']:.80}, not by the pinned roster authority "
            f"{authority.kid}" + (f" ({pinned_at})" if pinned_at else "")
        )
    if header != {"alg": "Ed25519", "kid": authority.kid, "typ": typ}:
        raise KeyMaterialError(
            f"{what} signature header must be exactly alg Ed25519, typ {typ} and "
            f"kid {authority.kid}"
        )
    try:
        jws.deserialize_compact(
            signature.strip(), authority, payload=rfc8785.dumps(dict(value)), algorithms=["Ed25519"]
        )
    except (ValueError, JoseError, rfc8785.CanonicalizationError):
        raise KeyMaterialError(
            f"{what} signature does not verify with the pinned authority key {authority.kid}: "
            f"{'the roster' if what == ROSTER_WHAT else 'the file'} was altered, or signed"
            " by another key under that kid, or the file and its signature are from two"
            " different writes (copy both together)"
        ) from None


ROSTER_WHAT: Final = "roster"
"""How the roster's refusals name it (its files are named by their callers)."""


def read_signature(path: Path, what: str) -> str:
    """A detached signature file's text; ``KeyMaterialError`` with the reason if unreadable."""
    try:
        return read_file_text(path, "ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise KeyMaterialError(f"cannot read {what}{path}: {reason}") from None


@dataclass(frozen=True, slots=True)
class SignedRoster:
    """A roster whose signature and version were checked, with its raw JWK Set."""

    roster: Roster
    version: int
    jwks: dict[str, Any]


def verify_roster(
    jwks: Any, signature: str, authority: OKPKey, *, min_version: int = 0, pinned_at: str = ""
) -> SignedRoster:
    """Verify a roster against the pinned authority key and the last version seen.

    ``pinned_at`` names the pinned key's file, for the refusal of another signer.

    Checklist (each step raises ``KeyMaterialError`` with a one-line reason):
    1. the roster is a JSON object with an integer ``msmt_version`` >= 1;
    2. the JWS is detached (its payload part empty), its header exactly Ed25519, the
       roster ``typ`` and the pinned kid;
    3. the signature verifies over the RFC 8785 bytes of the roster (tampering);
    4. the version is not below ``min_version`` (rollback to an older roster);
    5. every key parses as a roster key, with no duplicate kid.
    """
    if not isinstance(jwks, dict):
        raise KeyMaterialError("roster is not a JSON object")
    version = jwks.get("msmt_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise KeyMaterialError("roster has no positive integer msmt_version")
    verify_detached(ROSTER_WHAT, jwks, signature, authority, ROSTER_JWS_TYP, pinned_at)
    if version < min_version:
        raise KeyMaterialError(
            f"roster version {version} is older than version {min_version}, the oldest "
            "accepted (a rollback)"
        )
    return SignedRoster(roster=Roster.from_jwks(jwks), version=version, jwks=jwks)


def load_signed_roster(
    keydir: Path,
    *,
    authority_path: Path | None = None,
    min_version: int = 0,
    authority_option: str | None = None,
) -> SignedRoster:
    """Read and verify ``roster.json`` + ``roster.json.jws`` from ``keydir``.

    ``authority_path`` is the pinned authority key (default: the one in ``keydir``,
    which proves integrity only if that file itself came from a trusted place).
    ``authority_option`` names the command's option for it, said when the default
    is missing: a deployment pins the key elsewhere (``/etc/msmt``), as it should.
    """
    authority, pin = pinned_authority(
        keydir, authority_path, authority_option, "the node's keys.authority"
    )
    # The two files are read one after the other, and a custodian's roster write
    # (msmt keys rotate, revoke, accept) renames them into place one after the
    # other: a pair read across it does not match (a race trial: 5 false tamper
    # errors in 2,383 reads). A copy that does not rename (cp, scp) is read half
    # written. Read again while they change; the same pair, or the same error,
    # twice is what the directory holds, and refused.
    pair: tuple[Any, str] | None = None
    refused = KeyMaterialError(f"no roster in {keydir}")  # replaced by the first read
    for read in range(1, ROSTER_READS + 1):
        if read > 1:
            time.sleep(ROSTER_REREAD_S)
        try:
            again = _roster_pair(keydir)
        except KeyMaterialError as exc:
            if pair is None and read > 1 and str(exc) == str(refused):
                break
            pair, refused = None, exc
            continue
        if again == pair:
            break
        pair = again
        try:
            return verify_roster(*pair, authority, min_version=min_version, pinned_at=str(pin))
        except KeyMaterialError as exc:
            refused = exc
    if not (keydir / ROSTER_SIG_STAGED).exists():
        raise refused
    # Refused all the same: only the custodian's next roster write finishes it.
    raise KeyMaterialError(
        f"{refused} ({ROSTER_SIG_STAGED} is beside it: a roster write was cut short; the"
        " custodian's next msmt keys rotate, revoke or accept in that directory finishes it)"
    ) from None


def pinned_authority(
    keydir: Path, authority_path: Path | None, authority_option: str | None, whose: str
) -> tuple[OKPKey, Path]:
    """The pinned authority key and its file: ``authority_path``, else ``keydir``'s copy."""
    pin = authority_path or keydir / AUTHORITY_PUBLIC_FILE
    if authority_path is None and authority_option is not None and not pin.exists():
        raise KeyMaterialError(
            f"no roster-authority key at {pin}: name the pinned copy with {authority_option}"
            f" ({whose})"
        )
    return load_authority(pin), pin


ROSTER_READS: Final = 5
ROSTER_REREAD_S: Final = 0.1
"""A roster that fails is read again this long after, while it changes (``ROSTER_READS``)."""


def _roster_pair(keydir: Path) -> tuple[Any, str]:
    """``roster.json`` parsed and its signature's text; ``KeyMaterialError`` if unreadable."""
    jwks = read_json(keydir / ROSTER_FILE)
    return jwks, read_signature(keydir / ROSTER_SIG_FILE, "roster signature ")


def roster_digest(jwks: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the roster's RFC 8785 bytes: what a node remembers per version."""
    return hashlib.sha256(rfc8785.dumps(dict(jwks))).hexdigest()


def load_pinned_roster(
    keydir: Path, authority_path: Path, state_path: Path, *, record: bool = True
) -> SignedRoster:
    """Load the roster as a node does: pinned authority, and never an older roster.

    ``state_path`` remembers the highest version accepted and its digest. A lower
    version is a rollback; the same version with other content means the authority
    signed two different rosters under one number. Both raise ``KeyMaterialError``
    and leave the state untouched; a newer valid roster advances it, at once or,
    with ``record=False``, when the caller calls ``pin_roster`` (a node does so
    only once everything else it needs has loaded, so a start refused for another
    reason leaves the operator free to put the previous roster back).
    """
    seen_version, seen_digest = 0, None
    if state_path.exists():
        state = read_json(state_path)
        if not (isinstance(state, dict) and isinstance(state.get("version"), int)):
            raise KeyMaterialError(f"{state_path}: not a roster state file")
        seen_version, seen_digest = state["version"], state.get("sha256")
    signed = load_signed_roster(keydir, authority_path=authority_path, min_version=seen_version)
    digest = roster_digest(signed.jwks)
    if signed.version == seen_version and digest != seen_digest:
        raise KeyMaterialError(
            f"roster version {signed.version} differs from the version {seen_version} seen before"
        )
    if record and signed.version > seen_version:
        pin_roster(state_path, signed)
    return signed


def pin_roster(state_path: Path, signed: SignedRoster) -> None:
    """Record ``signed`` as the highest roster version accepted (see ``load_pinned_roster``)."""
    state_bytes = json_bytes({"version": signed.version, "sha256": roster_digest(signed.jwks)})
    # Private, as all else in the node's data directory (0700 itself): nobody else reads it.
    write_atomic(state_path, state_bytes, private=True)
