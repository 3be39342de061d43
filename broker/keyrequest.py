"""Keys made on a member's own machine: the key request and the custodian's acceptance.

In a deployment no private key leaves the member that owns it. The member runs
``make_request`` (``msmt keys request``): new signing and encryption keys in its
own key directory, and a **key request** that carries only their public halves.
The request is a JWS in General JSON Serialization (RFC 7515 §7.2.1) whose payload
is the RFC 8785 form of::

    {"iat": <NumericDate>, "keys": [<public sig JWK>, <public enc JWK>],
     "msmt_member": "GBR", "msmt_nats_user": "U..."}

signed by the new signing key (proof that the member holds it) and, when the
member's roster lists a current signing key it holds, by that key too (so the
custodian can accept a routine rotation without a phone call). Each signature's
protected header is exactly ``{"alg": "Ed25519", "kid": ..., "typ":
"msmt-key-request+jws"}``; any JOSE library verifies it.

The request's **fingerprint** is ``sha256:<hex>`` of the payload bytes as signed
(the base64url-decoded ``payload`` member): it fixes every key, the member, the
NATS user and the time, and does not change if the JSON around the signatures is
re-wrapped on the way. The member reads it out to the custodian out of band.

The custodian runs ``accept_request`` (``msmt keys accept``), which checks the
request (a numbered checklist, fail closed) and signs the next roster version, as
``rotate_keys`` does. ``init_authority`` (``msmt keys authority``) starts a
custodian's directory with the authority and an empty roster, and no member keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet, OKPKey
from joserfc.jws import FlattenedJSONSerialization

from broker import keys as keyfiles
from broker import keys_custodian, keys_roster, keys_users
from broker.errors import KeyMaterialError, UsageError, WriteError
from broker.files import read_file_bytes
from broker.members import MEMBERS, is_member
from broker.roster import CURVES, Roster, RosterKey, format_time
from broker.sdjwt import b64u_decode, b64u_encode, loads_strict

REQUEST_TYP: Final = "msmt-key-request+jws"
MAX_REQUEST_BYTES: Final = 16 * 1024
"""A request is about 1.5 KB; anything much larger is not one."""
MAX_REQUEST_AGE: Final = timedelta(days=30)
"""A request older than this is refused: the member makes a new one."""
MAX_CLOCK_SKEW: Final = timedelta(minutes=5)
"""How far in the future a request's ``iat`` may be (the two clocks differ)."""
_PAYLOAD_MEMBERS: Final = frozenset({"msmt_member", "keys", "msmt_nats_user", "iat"})
_JWK_MEMBERS: Final = frozenset({"kty", "crv", "x", "kid", "use", "alg"})
# [0-9], not \d: Python's \d takes every script's digits (a review put Arabic-Indic and
# full-width ones in a request, which went into the signed roster).
_KID: Final = re.compile(r"(?P<member>[A-Z]{3})-(?P<use>sig|enc)-[0-9]{8}-[0-9a-f]{8}")
_FINGERPRINT: Final = re.compile(r"sha256:[0-9a-f]{64}")


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def fingerprint(payload: bytes) -> str:
    """``sha256:<hex>`` of a request's payload bytes, as the member and custodian compare it."""
    return f"sha256:{hashlib.sha256(payload).hexdigest()}"


def _header(kid: str) -> dict[str, str]:
    return {"alg": "Ed25519", "kid": kid, "typ": REQUEST_TYP}


# --- the member's side ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A key request as ``make_request`` wrote it, for the member to send."""

    path: Path
    member: str
    sig_kid: str
    enc_kid: str
    nats_user: str
    nats_created: bool
    replaced_nats_seed: Path | None
    """Where the previous NATS seed was kept, with ``new_nats_user``; None otherwise."""
    endorsed_by: str | None
    """The current signing key that signed it too, or None."""
    not_endorsed: str | None
    """Why no current key signed it (None if one did)."""
    fingerprint: str
    acceptable_until: datetime
    """Until when a custodian accepts it, whoever hands it over: it is public."""


def _current_key(
    keydir: Path, member: str, at: datetime, authority: Path | None
) -> tuple[OKPKey | None, str | None]:
    """The member's current signing key per its verified roster, or why there is none."""
    if not (keydir / keyfiles.ROSTER_FILE).exists():
        return None, "a first request: no roster here yet"
    # Verified as a node does: a tampered roster must not choose the key that signs.
    roster = keys_roster.load_signed_roster(
        keydir, authority_path=authority, authority_option="--authority"
    ).roster
    try:
        current = roster.current(member, "sig", at)
    except KeyMaterialError as exc:
        return None, f"the roster in {keydir}: {exc}"
    path = keyfiles.key_path(keydir, member, current.kid)
    if not path.exists():
        return None, f"the private key of {current.kid} is not in {path.parent}"
    return keyfiles.load_matching_key(path, roster, member, "sig"), None


def _check_directory(keydir: Path, member: str, *, first: bool) -> None:
    """Refuse a key directory that is not ``member``'s, or not a first one with ``first``."""
    folder = keydir / member
    if first:
        held = sorted(folder.glob("*.jwk"))
        if (folder / keyfiles.NATS_SEED_FILE).exists():
            held.append(folder / keyfiles.NATS_SEED_FILE)
        if held:
            raise UsageError(
                f"{folder} already holds keys of {member} ({held[0].name}): {member} has keys "
                "here, so this is not its first request; make it without --first"
            )
        if (keydir / keyfiles.AUTHORITY_PRIVATE_FILE).exists():
            # A review: the custodian's own directory took GBR's private keys beside the
            # roster authority's; they belong on GBR's node.
            raise UsageError(
                f"{keydir} holds the roster authority's private key: it is the custodian's"
                f" directory, not a node's; give {member}'s own with --dir"
            )
        other = next(
            (
                m
                for m in (*MEMBERS, keyfiles.AUDIT_ACCOUNT)
                if m != member and _holds_keys(keydir / m)
            ),
            None,
        )
        if other is not None:
            # A trial ran GBR's first request in FRA's node folder: GBR's private keys and
            # seed landed beside FRA's, where FRA's operator holds them (accept then
            # refused it, for the NATS user, after the phone call).
            raise UsageError(
                f"{keydir} holds {other}'s keys ({keydir / other}): a node's key directory is"
                f" one member's; give {member}'s own with --dir"
            )
        return
    missing = next((p for p in (folder, keydir / keyfiles.ROSTER_FILE) if not p.exists()), None)
    if missing is not None:
        raise UsageError(
            f"no {missing}: {keydir} is not {member}'s key directory (give the node's with "
            "--dir); a member's first request takes --first"
        )


def _holds_keys(folder: Path) -> bool:
    return any(folder.glob("*.jwk")) or (folder / keyfiles.NATS_SEED_FILE).exists()


def make_request(
    keydir: Path,
    member: str,
    *,
    out: Path | None = None,
    authority: Path | None = None,
    first: bool = False,
    new_nats_user: bool = False,
    now: datetime | None = None,
) -> Request:
    """Make ``member``'s new keys in ``keydir/<member>/`` and write a key request for them.

    The private keys are written mode 0600 as ``keys init`` writes them; the NATS
    seed only if there is none, or with ``new_nats_user`` (after a compromise): the
    previous seed is then kept beside it as ``nats.nk.replaced-<UTC time>``. The
    request goes to ``out`` (default ``keydir/<sig kid>.request.json``). The
    roster in ``keydir`` is verified against ``authority`` (default:
    ``keydir/roster-authority.json``) before its current key of ``member`` signs
    too. Nothing in the roster changes.

    A request in the wrong directory would make a second key tree and a second
    NATS seed, which the custodian could not tell from the real ones: so
    ``keydir/<member>/`` and a roster must already be there, unless ``first``
    (the member's first request), which instead refuses a directory that already
    holds keys of ``member``. Raises ``UsageError`` for an unknown member, a
    directory that does not fit ``first`` or an existing ``out``, and
    ``KeyMaterialError`` for a roster that does not verify or an unusable key
    file; every check runs before the first write.
    """
    if not is_member(member):
        raise UsageError(
            f"unknown member {member!r} (members: {', '.join(MEMBERS)}); the AUDIT account has "
            "no roster keys (docs/KEYS.md, 'Key requests')"
        )
    _check_directory(keydir, member, first=first)
    at = now or _utcnow()
    endorser, not_endorsed = _current_key(keydir, member, at, authority)
    seed_path = keydir / member / keyfiles.NATS_SEED_FILE
    old_seed: bytes | None = None
    if seed_path.exists():
        try:
            old_seed = read_file_bytes(seed_path)
        except OSError as exc:
            raise KeyMaterialError(f"cannot read {seed_path}: {exc.strerror}") from None
        keyfiles.check_private_file(seed_path, "NATS seed")
        keyfiles.nats_public(old_seed, str(seed_path))
    replaced = None
    if new_nats_user and old_seed is not None:
        # Kept, never deleted silently: the member decides when the old login is gone.
        replaced = seed_path.with_name(f"{seed_path.name}.replaced-{at:%Y%m%dT%H%M%SZ}")
        if replaced.exists():
            raise UsageError(f"{replaced} already exists: try again in a second")
    nats_created = new_nats_user or old_seed is None
    seed = keyfiles.new_nats_seed() if nats_created or old_seed is None else old_seed.strip()
    nats_user = keyfiles.nats_public(seed, str(seed_path))
    sig = keyfiles.generate_key(member, "sig", at)
    enc = keyfiles.generate_key(member, "enc", at)
    path = out or keydir / f"{sig.kid}.request.json"
    if path.exists():
        raise UsageError(f"{path} already exists: choose another --out")
    payload: dict[str, Any] = {
        "msmt_member": member,
        "keys": [keyfiles.public_jwk(sig), keyfiles.public_jwk(enc)],
        "msmt_nats_user": nats_user,
        "iat": int(at.timestamp()),
    }
    body = rfc8785.dumps(payload)
    signers: list[Key] = [sig] if endorser is None else [sig, endorser]
    value = jws.serialize_json(
        [{"protected": _header(str(k.kid))} for k in signers],
        body,
        KeySet(signers),
        algorithms=["Ed25519"],
    )
    for key in (sig, enc):
        path_ = keyfiles.key_path(keydir, member, str(key.kid))
        keyfiles.write_private(path_, keyfiles.json_bytes(key.as_dict(private=True)))
    if replaced is not None and old_seed is not None:
        keyfiles.write_private(replaced, old_seed)
    if nats_created:
        # Replaced in one rename: the node, which reads only nats.nk, never finds none.
        keyfiles.write_private(seed_path, seed + b"\n")
    # Written last: a request on disk always has its private keys beside it.
    keyfiles.write_public(path, keyfiles.json_bytes(value))
    return Request(
        path=path,
        member=member,
        sig_kid=str(sig.kid),
        enc_kid=str(enc.kid),
        nats_user=nats_user,
        nats_created=nats_created,
        replaced_nats_seed=replaced,
        endorsed_by=None if endorser is None else str(endorser.kid),
        not_endorsed=not_endorsed,
        fingerprint=fingerprint(body),
        acceptable_until=datetime.fromtimestamp(payload["iat"], UTC) + MAX_REQUEST_AGE,
    )


# --- the custodian's side --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Signature:
    kid: str
    flattened: FlattenedJSONSerialization
    """The signature with the payload (RFC 7515 §7.2.2), to verify on its own."""


@dataclass(frozen=True, slots=True)
class _Parsed:
    payload: dict[str, Any]
    body: bytes
    signatures: list[_Signature]


def _private_jwks(value: Any, depth: int = 0) -> list[dict[str, Any]]:
    """Every JSON object in ``value`` with a ``d`` member (a private JWK)."""
    if depth > 8:
        return []  # nothing of ours nests this deep: the structure checks refuse it
    if isinstance(value, dict):
        found = [value] if "d" in value else []
        return found + [j for v in value.values() for j in _private_jwks(v, depth + 1)]
    if isinstance(value, list):
        return [j for v in value for j in _private_jwks(v, depth + 1)]
    return []


def _public_of(jwk: dict[str, Any]) -> str | None:
    """The base64url public key that a private OKP JWK's ``d`` gives, or None if none."""
    d, curve = jwk.get("d"), jwk.get("crv")
    if not isinstance(d, str) or curve not in ("Ed25519", "X25519"):
        return None
    try:
        raw = b64u_decode(d)
        private = (
            Ed25519PrivateKey.from_private_bytes(raw)
            if curve == "Ed25519"
            else X25519PrivateKey.from_private_bytes(raw)
        )
    except ValueError:
        return None
    return b64u_encode(private.public_key().public_bytes_raw())


def _leaked(path: Path, found: list[dict[str, Any]], roster: Roster) -> KeyMaterialError:
    """The refusal of a file that holds private keys, naming any the roster lists.

    The public key is derived from ``d`` itself, not read from the file's ``x`` or
    kid: only a key whose secret is really in the file is called disclosed.
    """
    publics = {p for p in map(_public_of, found) if p is not None}
    listed = [k for k in roster if k.jwk.get("x") in publics]
    if not listed:
        return KeyMaterialError(
            f"{path} holds a private key (a 'd' member) that the roster does not list (a "
            "pending request's key): the member sent its secret, not a key request. Delete "
            "the file, and have the member discard those keys and make a new request with "
            "'msmt keys request'"
        )
    kids = " and ".join(f"{k.kid} ({k.member}'s {k.status} {k.use} key)" for k in listed)
    member = listed[0].member
    live = [k.kid for k in listed if k.status != "revoked"]
    commands = " and ".join(f"'msmt keys revoke {kid} --reason ...'" for kid in live)
    first = (
        f"revoke {'it' if len(live) == 1 else 'them'} first: {commands}"
        if live
        else "it is revoked already"
    )
    return KeyMaterialError(
        f"{path} holds the private key of {kids} in the roster: that key is disclosed, and "
        f"whoever read this file can use it as {member}. Delete the file; {first}; then "
        f"{member} makes a new request and you accept it only with --fingerprint, after a "
        "phone call"
    )


def _read_outer(path: Path) -> Any:
    try:
        data = read_file_bytes(path, MAX_REQUEST_BYTES + 1)
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_REQUEST_BYTES:
        raise KeyMaterialError(
            f"{path} is too large for a key request (more than {MAX_REQUEST_BYTES} bytes)"
        )
    if keyfiles.is_nkey_seed(data.strip()):
        # Sent by mistake for a request: "not valid JSON" said nothing of what it costs
        # (an onboarding trial). The seed is the member's hub login, now disclosed.
        raise KeyMaterialError(
            f"{path} is a NATS seed (a private hub login), not a key request: it is disclosed;"
            " the member makes a new one (msmt keys request --new-nats-user), and the hub"
            " operator reloads the hub with it (docs/KEYS.md, after a compromise)"
        )
    try:
        return loads_strict(data.decode("utf-8"))
    except UnicodeDecodeError:
        # The codec's message would quote a byte of what may be a private key.
        raise KeyMaterialError(f"{path} is not UTF-8 text") from None
    except ValueError as exc:
        # The parser's words begin "not valid JSON" themselves, or say what is wrong.
        reason = str(exc)
        said = reason if reason.startswith("not valid JSON") else f"not valid JSON: {reason}"
        raise KeyMaterialError(f"{path} is {said}") from None


def _b64_json(path: Path, text: Any, what: str) -> tuple[bytes, Any]:
    if not isinstance(text, str):
        raise KeyMaterialError(f"{path}: {what} is not a base64url string")
    try:
        data = b64u_decode(text)
        return data, loads_strict(data)
    except ValueError as exc:
        raise KeyMaterialError(f"{path}: {what} is not base64url JSON ({exc})") from None


def _signature(path: Path, n: int, member: Any, payload: str) -> _Signature:
    if not (
        isinstance(member, dict)
        and set(member) == {"protected", "signature"}
        and isinstance(member["signature"], str)
    ):
        raise KeyMaterialError(
            f"{path}: signature {n} must be exactly 'protected' and 'signature' "
            "(no unprotected header)"
        )
    _, header = _b64_json(path, member["protected"], f"signature {n}'s protected header")
    kid = header.get("kid") if isinstance(header, dict) else None
    if not isinstance(kid, str) or header != _header(kid):
        raise KeyMaterialError(
            f"{path}: signature {n}'s protected header must be exactly alg Ed25519, "
            f"typ {REQUEST_TYP} and a kid"
        )
    flattened: FlattenedJSONSerialization = {
        "payload": payload,
        "protected": member["protected"],
        "signature": member["signature"],
    }
    return _Signature(kid=kid, flattened=flattened)


def _parse(path: Path, roster: Roster) -> _Parsed:
    """Step 1 of ``accept_request``: the file's structure, each fault with its reason."""
    outer = _read_outer(path)
    if found := _private_jwks(outer):
        raise _leaked(path, found, roster)
    if not isinstance(outer, dict) or set(outer) != {"payload", "signatures"}:
        raise KeyMaterialError(
            f"{path}: not a JWS in General JSON Serialization (exactly 'payload' and "
            "'signatures', RFC 7515 §7.2.1)"
        )
    members = outer["signatures"]
    if not isinstance(members, list) or not 1 <= len(members) <= 2:
        raise KeyMaterialError(f"{path}: 'signatures' must list one or two signatures")
    body, payload = _b64_json(path, outer["payload"], "the payload")
    if found := _private_jwks(payload):
        raise _leaked(path, found, roster)
    if not isinstance(payload, dict) or set(payload) != _PAYLOAD_MEMBERS:
        raise KeyMaterialError(
            f"{path}: the payload must be a JSON object of exactly "
            f"{', '.join(sorted(_PAYLOAD_MEMBERS))}"
        )
    signatures = [_signature(path, n, m, outer["payload"]) for n, m in enumerate(members, 1)]
    if len({s.kid for s in signatures}) != len(signatures):
        raise KeyMaterialError(f"{path}: two signatures by one key")
    return _Parsed(payload=payload, body=body, signatures=signatures)


def _verifies(signature: _Signature, key: OKPKey) -> bool:
    try:
        jws.deserialize_json(signature.flattened, key, algorithms=["Ed25519"])
    except (ValueError, JoseError):
        return False
    return True


def _public_key(path: Path, n: int, jwk: Any, member: str, roster: Roster) -> tuple[str, OKPKey]:
    """Step 2 for one key of the request: (its use, the key); raise naming the fault."""
    where = f"{path}: key {n}"
    if not isinstance(jwk, dict) or set(jwk) != _JWK_MEMBERS:
        raise KeyMaterialError(f"{where} must have exactly {', '.join(sorted(_JWK_MEMBERS))}")
    use, kid = jwk["use"], jwk["kid"]
    if not isinstance(use, str) or use not in CURVES:
        raise KeyMaterialError(f"{where}: use must be 'sig' or 'enc'")
    if (jwk["kty"], jwk["crv"], jwk["alg"]) != ("OKP", CURVES[use], keyfiles.ALGS[use]):
        raise KeyMaterialError(
            f"{where}: use {use} needs kty OKP, crv {CURVES[use]} and alg {keyfiles.ALGS[use]}"
        )
    match = _KID.fullmatch(kid) if isinstance(kid, str) else None
    if match is None or match["member"] != member or match["use"] != use:
        raise KeyMaterialError(
            f"{where}: kid {kid!r:.80} is not of the form {member}-{use}-YYYYMMDD-<8 hex digits>"
        )
    if kid in roster:
        raise KeyMaterialError(
            f"{where}: {kid} is already in the roster: this request was accepted before"
        )
    try:
        key = OKPKey.import_key(dict(jwk))
    except (ValueError, TypeError, JoseError) as exc:
        raise KeyMaterialError(f"{where}: malformed public key ({exc})") from None
    same = next((k.kid for k in roster if k.jwk.get("x") == jwk["x"]), None)
    if same is not None:
        raise KeyMaterialError(f"{where}: its public key is already in the roster as {same}")
    return use, key


@dataclass(frozen=True, slots=True)
class _Content:
    member: str
    keys: dict[str, OKPKey]
    nats_user: str
    iat: int


def _content(
    path: Path, payload: dict[str, Any], roster: Roster, users: dict[str, str]
) -> _Content:
    """Step 2 of ``accept_request``: the member, its two public keys, its NATS user, iat."""
    member = payload["msmt_member"]
    if not isinstance(member, str) or not is_member(member):
        raise KeyMaterialError(f"{path}: msmt_member {member!r:.20} is not an MSMT member")
    listed = payload["keys"]
    if not isinstance(listed, list) or len(listed) != 2:
        raise KeyMaterialError(f"{path}: 'keys' must list two keys, one sig and one enc")
    new: dict[str, OKPKey] = {}
    for n, jwk in enumerate(listed, 1):
        use, key = _public_key(path, n, jwk, member, roster)
        if use in new:
            raise KeyMaterialError(f"{path}: two {use} keys; a request has one sig and one enc")
        new[use] = key
    nats_user = keyfiles.check_nats_user(payload["msmt_nats_user"], f"{path}: msmt_nats_user")
    other = next((a for a, u in users.items() if u == nats_user and a != member), None)
    if other is not None:
        raise KeyMaterialError(f"{path}: msmt_nats_user is already the NATS user of {other}")
    iat = payload["iat"]
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise KeyMaterialError(f"{path}: iat must be an integer (seconds since the epoch)")
    return _Content(member, new, nats_user, iat)


def _endorser(
    path: Path, parsed: _Parsed, new_sig: str, member: str, roster: Roster, at: datetime
) -> tuple[RosterKey | None, str]:
    """Step 4 by signature: the member's current key that signed, or why none counts."""
    why = "it is signed only by its new key"
    for signature in parsed.signatures:
        if signature.kid == new_sig:
            continue
        if signature.kid not in roster:
            why = f"it is signed by {signature.kid:.80}, which the roster does not list"
            continue
        key = roster.get(signature.kid)
        if key.member != member or key.use != "sig":
            raise KeyMaterialError(
                f"{path}: signed by {key.kid}, a {key.use} key of {key.member}, not a "
                f"signing key of {member}"
            )
        if not _verifies(signature, roster.public_key(key.kid)):
            raise KeyMaterialError(
                f"{path}: the signature by {key.kid} does not verify: the request was altered"
            )
        reason = key.usable_at(at) or (
            None if key.status == "active" else f"key {key.kid} is {key.status}"
        )
        if reason is None:
            return key, ""
        why = f"its other signature does not count: {reason}"
    return None, why


def _authorize(
    path: Path,
    parsed: _Parsed,
    content: _Content,
    roster: Roster,
    wanted: str | None,
    at: datetime,
) -> str:
    """Steps 3 and 4 of ``accept_request``; returns what authorized the request."""
    member, new_sig = content.member, content.keys["sig"]
    own = next((s for s in parsed.signatures if s.kid == new_sig.kid), None)
    if own is None:
        raise KeyMaterialError(f"{path}: no signature by its new key {new_sig.kid}")
    if not _verifies(own, new_sig):
        raise KeyMaterialError(
            f"{path}: the signature by its new key {new_sig.kid} does not verify: the "
            "request was altered"
        )
    digest = fingerprint(parsed.body)
    endorser, why = _endorser(path, parsed, str(new_sig.kid), member, roster, at)
    if wanted is not None:
        if not hmac.compare_digest(wanted, digest):
            # The right fingerprint is not shown: it must come from the member, not from here.
            raise KeyMaterialError(
                f"{path}: its fingerprint is not {wanted}: this is not the request {member} "
                "read out to you; do not accept it"
            )
        return f"the fingerprint compared with {member}"
    if endorser is None:
        raise KeyMaterialError(
            f"{path}: the request carries no signature by a current key of {member} ({why}): "
            f"compare its fingerprint with {member} by phone and pass --fingerprint"
        )
    return f"the signature of {member}'s current key {endorser.kid}"


def _check_time(path: Path, iat: int, at: datetime) -> None:
    """Step 5 of ``accept_request``: made at most MAX_REQUEST_AGE ago, not in the future."""
    made = datetime.fromtimestamp(iat, UTC) if abs(iat) < 10**11 else None
    if made is None or made > at + MAX_CLOCK_SKEW:
        raise KeyMaterialError(f"{path}: iat is in the future: check the member's clock")
    if made < at - MAX_REQUEST_AGE:
        raise KeyMaterialError(
            f"{path}: made {format_time(made)}, more than {MAX_REQUEST_AGE.days} days ago: "
            "ask the member for a new request"
        )


def _check_nats_user(path: Path, content: _Content, users: dict[str, str], replace: bool) -> None:
    """Step 6 of ``accept_request``: the NATS user changes if and only if ``replace``."""
    member, previous = content.member, users.get(content.member)
    if previous is None or replace == (previous != content.nats_user):
        return
    if replace:
        raise KeyMaterialError(
            f"{path}: it keeps {member}'s NATS user, and --replace-nats-user was given: after "
            f"a compromise {member} makes its request with 'msmt keys request {member} "
            "--new-nats-user'"
        )
    raise KeyMaterialError(
        f"{path}: it changes {member}'s NATS user: it was made with another NATS seed, either "
        f"in a key directory other than the one {member}'s node uses, or on purpose after a "
        "compromise (--new-nats-user); only in that case accept it with --replace-nats-user"
    )


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ``accept_request`` changed, for the custodian to read and pass on."""

    member: str
    sig_kid: str
    enc_kid: str
    valid_from: datetime
    valid_until: datetime
    retired: tuple[str, ...]
    authorized_by: str
    nats_user: str
    previous_nats_user: str | None
    users_version: int | None
    """The version of ``nats-users.json`` signed, if it changed."""
    version: int
    fingerprint: str
    made_at: datetime
    """The request's ``iat``: an old one may be one its member no longer stands behind."""


def check_fingerprint(text: str) -> str:
    """Normalize a ``--fingerprint`` (``sha256:`` and 64 hex digits); ``UsageError`` if not."""
    value = text.strip().lower()
    if not _FINGERPRINT.fullmatch(value):
        raise UsageError("--fingerprint must be 'sha256:' followed by 64 hex digits")
    return value


def accept_request(
    keydir: Path,
    path: Path,
    *,
    expected_fingerprint: str | None = None,
    replace_nats_user: bool = False,
    valid_days: int = keyfiles.DEFAULT_VALID_DAYS,
    now: datetime | None = None,
) -> Accepted:
    """Check the key request ``path`` and put its keys into the signed roster in ``keydir``.

    The member's new keys become active from now for ``valid_days``; its previous
    active keys are retired as of now, as ``rotate_keys`` does; its entry in
    ``nats-users.json`` becomes the request's NATS user: a request that changes
    an existing one is refused unless ``replace_nats_user``, and one that keeps it
    is refused with it (after a compromise the seed must change). Raises ``KeyMaterialError``
    with one line naming ``path`` at the first failing step of the checklist below,
    and ``UsageError`` for a malformed ``expected_fingerprint`` or validity;
    nothing is written unless every step passed.
    """
    wanted = None if expected_fingerprint is None else check_fingerprint(expected_fingerprint)
    if valid_days < 1:
        raise UsageError("--valid-days must be at least 1")
    at = now or _utcnow()
    signed, authority = keys_custodian.load_for_update(keydir)
    users = keys_users.load_users_for_update(keydir, authority)
    # Checklist; each step raises KeyMaterialError naming the file, before any write.
    # 1. format: at most MAX_REQUEST_BYTES of UTF-8 JSON, no duplicate members, no
    #    "d" member anywhere (a private key: if it is a roster key's, the line names
    #    it, to be revoked first); a JWS in General JSON Serialization
    #    of one or two signatures, each exactly a protected header {alg: Ed25519,
    #    kid, typ: msmt-key-request+jws} and a signature; a payload that is a JSON
    #    object of exactly msmt_member, keys, msmt_nats_user and iat.
    parsed = _parse(path, signed.roster)
    # 2. content: a known member; one public Ed25519 sig and one public X25519 enc
    #    key, each exactly kty, crv, x, kid, use, alg, with a kid <M>-<use>-<date>-<hex>
    #    of that member, neither kid nor key already in the roster (a request
    #    accepted before); a NATS user public nkey no other account has; integer iat.
    content = _content(path, parsed.payload, signed.roster, users)
    # 3. proof of possession: the signature by the new sig key verifies.
    # 4. authority: a second signature verifies under a key of the member that is
    #    active and valid now (a revoked, retired or expired key does not count),
    #    or the fingerprint the custodian compared with the member matches. A
    #    wrong fingerprint is refused, whatever signed the request.
    authorized_by = _authorize(path, parsed, content, signed.roster, wanted, at)
    # 5. time: iat at most MAX_CLOCK_SKEW ahead of now and MAX_REQUEST_AGE behind it.
    _check_time(path, content.iat, at)
    # 6. NATS user: one that replaces the member's (made with another seed) only with
    #    replace_nats_user; with it, the request must replace it.
    _check_nats_user(path, content, users, replace_nats_user)

    member, new = content.member, content.keys
    retired = tuple(k.kid for k in signed.roster if k.member == member and k.status == "active")
    entries = keys_custodian.retire_active(signed.jwks["keys"], member, at)
    entries += [keyfiles.roster_entry(new[u], member, at, valid_days) for u in ("sig", "enc")]
    jwks = keys_custodian.bump_roster(signed, entries, at)
    previous = users.get(member)
    # nats-users.json first: a crash before the roster is written leaves the request
    # acceptable again, and accepting it then finds the user already there.
    users_version = None
    if previous != content.nats_user:
        updated = users | {member: content.nats_user}
        users_version = keys_users.write_nats_users(keydir, updated, authority)
    try:
        keys_custodian.write_roster(keydir, jwks, authority)
    except WriteError as exc:
        if users_version is None:
            raise
        # Accepting again finds the user there and says nothing of it (a review): say
        # now that the hub's users changed, whatever the roster did.
        finish = (
            "give the hub operator"
            if isinstance(exc, keys_custodian.RosterInPlaceError)
            else f"accept {path} again to finish (without --replace-nats-user), then give the"
            " hub operator"
        )
        raise type(exc)(
            f"{exc}; {keyfiles.NATS_USERS_FILE} version {users_version} already names"
            f" {member}'s new NATS user: {finish} {keyfiles.NATS_USERS_FILE} and"
            f" {keys_users.NATS_USERS_SIG_FILE}"
        ) from None
    return Accepted(
        member=member,
        sig_kid=str(new["sig"].kid),
        enc_kid=str(new["enc"].kid),
        valid_from=at,
        valid_until=at + timedelta(days=valid_days),
        retired=retired,
        authorized_by=authorized_by,
        nats_user=content.nats_user,
        previous_nats_user=previous,
        users_version=users_version,
        version=jwks["msmt_version"],
        fingerprint=fingerprint(parsed.body),
        made_at=datetime.fromtimestamp(content.iat, UTC),
    )


# --- a custodian's start -----------------------------------------------------------


def init_authority(keydir: Path, *, audit: bool = False, now: datetime | None = None) -> None:
    """Start a custodian's key directory: the roster authority and an empty signed roster v1.

    No member's keys are made: each member joins with a key request. With
    ``audit``, the AUDIT account's NATS user is made here too (its seed in
    ``keydir/AUDIT/nats.nk``), for a custodian who also runs the audit archive.
    Raises ``KeyMaterialError`` (nothing written) if ``keydir`` already has a
    roster, an authority or NATS users.
    """
    at = now or _utcnow()
    names = [
        keyfiles.ROSTER_FILE,
        keyfiles.ROSTER_SIG_FILE,
        keyfiles.AUTHORITY_PRIVATE_FILE,
        keyfiles.AUTHORITY_PUBLIC_FILE,
        keyfiles.NATS_USERS_FILE,
    ]
    if audit:
        names.append(f"{keyfiles.AUDIT_ACCOUNT}/{keyfiles.NATS_SEED_FILE}")
    existing = next((keydir / n for n in names if (keydir / n).exists()), None)
    if existing is not None:
        raise KeyMaterialError(f"{existing} already exists: {keydir} has a roster authority")
    users: dict[str, str] = {}
    if audit:
        seed = keyfiles.new_nats_seed()
        users[keyfiles.AUDIT_ACCOUNT] = keyfiles.nats_public(seed, keyfiles.AUDIT_ACCOUNT)
        keyfiles.write_private(
            keydir / keyfiles.AUDIT_ACCOUNT / keyfiles.NATS_SEED_FILE, seed + b"\n"
        )
    keys_custodian.write_authority(keydir, keys_custodian.new_authority(at), [], users, at)
