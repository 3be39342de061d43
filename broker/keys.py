"""Key material on disk: generation, the signed roster, rotation and revocation.

Layout of a key directory (private files mode 0600, directories 0700)::

    keys/roster.json               public JWK Set (RFC 7517), parsed by broker.roster
    keys/roster.json.jws           detached JWS (RFC 7515 App. F) over its RFC 8785 bytes
    keys/roster-authority.json     public Ed25519 JWK of the roster authority; nodes pin it
    keys/nats-users.json           public nkeys of every NATS user, for the hub's config
    keys/nats-users.json.jws       detached JWS over its RFC 8785 bytes, by the authority
    keys/authority/roster-authority.jwk   private key that signs roster changes
    keys/<MEMBER>/<kid>.jwk        private JWKs: <MEMBER>-sig-<date>-<hex> is Ed25519 (use sig,
                                   alg Ed25519), <MEMBER>-enc-<date>-<hex> is X25519 (use enc,
                                   alg ECDH-ES+A256KW)
    keys/<MEMBER>/nats.nk          NATS user nkey seed
    keys/AUDIT/nats.nk             NATS user of the AUDIT account (archive of checkpoints)

Every write goes to a temporary file that is renamed into place, and every check
runs before the first write, so a refused command changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import nkeys
import rfc8785
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeyParameters, OKPKey

from broker.errors import KeyMaterialError, UsageError, WriteError
from broker.files import read_file_bytes, read_file_text, sync_folder, write_synced
from broker.members import MEMBERS, is_member
from broker.note import excerpt
from broker.roster import CLOCK_SKEW, KeyUse, Roster, format_time

ROSTER_FILE: Final = "roster.json"
ROSTER_SIG_FILE: Final = "roster.json.jws"
AUTHORITY_PUBLIC_FILE: Final = "roster-authority.json"
AUTHORITY_PRIVATE_FILE: Final = "authority/roster-authority.jwk"
ROSTER_SIGNED_FILE: Final = "authority/roster-signed.json"
"""The highest roster version signed with the authority key here, and its digest.

A custodian's own pin, as a node's ``roster-state.json``: a roster pair restored from
an older copy would otherwise be signed over as the next version, numbered below what
the nodes hold (they refuse it) but accepted by a node without state, with whatever
the newer rosters had revoked trusted again (an onboarding trial)."""
NATS_USERS_FILE: Final = "nats-users.json"
NATS_SEED_FILE: Final = "nats.nk"
AUDIT_ACCOUNT: Final = "AUDIT"
ALGS: Final[dict[str, str]] = {"sig": "Ed25519", "enc": "ECDH-ES+A256KW"}
ROSTER_JWS_TYP: Final = "msmt-roster+jws"
DEFAULT_VALID_DAYS: Final = 730


# --- files -----------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename.

    Raises ``WriteError`` (one line) if it cannot, leaving ``path`` as it was.
    """
    tmp = _stage(path, data, private=private)
    _put_in_place(tmp, path)


def _stage(path: Path, data: bytes, *, private: bool) -> Path:
    """Write ``data`` durably to a new temp file beside ``path``; return the temp file."""
    try:
        _make_folder(path.parent, private=private)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}") from None
    try:
        # mkstemp already creates 0600; public files are then widened to 0644.
        write_synced(fd, data)
        if not private:
            Path(tmp).chmod(0o644)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk: one line, not a traceback
            raise WriteError(f"cannot write {path}: {exc.strerror}") from None
        raise
    return Path(tmp)


def _make_folder(folder: Path, *, private: bool) -> None:
    """Make ``folder`` (0700 if ``private``) and any folder above it missing, 0755.

    ``mkdir(parents=True)`` would make the folders above 0777 less the umask: under
    umask 000 others could then swap a member's key folder, or the roster and its
    authority, for their own. Raises ``OSError``.
    """
    for above in (*reversed(folder.parents), folder):
        if above.exists() and not above.is_dir():
            # mkdir's own word for it is "File exists", which named the file to be
            # written, not the file in the way (a bad-input sweep).
            raise NotADirectoryError(errno.ENOTDIR, f"{above} is not a directory")
    for above in reversed(folder.parents):
        if not above.is_dir():
            above.mkdir(mode=0o755, exist_ok=True)
    folder.mkdir(exist_ok=True, mode=0o700 if private else 0o755)
    if private:
        folder.chmod(0o700)


def _put_in_place(tmp: Path, path: Path) -> None:
    # The folder's fsync makes the rename durable: a power-cut trial brought back a
    # revoked feed, and a roster version the custodian then signed again otherwise.
    try:
        tmp.replace(path)
        sync_folder(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {exc.strerror}") from None


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (roster, hub configuration) atomically, mode 0644."""
    _write_atomic(path, data, private=False)


def write_private(path: Path, data: bytes) -> None:
    """Write a private file (a key, a seed) atomically, mode 0600 in a 0700 directory."""
    _write_atomic(path, data, private=True)


def json_bytes(value: Any) -> bytes:
    """The project's JSON file form: indented, sorted members, a final newline."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate member {key!r}")
        result[key] = value
    return result


def read_json(path: Path) -> Any:
    """Read a JSON file strictly (no duplicate members); raise ``KeyMaterialError`` naming it."""
    try:
        text = read_file_text(path)
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        # The codec's message would quote a byte of what may be a private key.
        raise KeyMaterialError(f"{path} is not UTF-8 text") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except RecursionError:  # "[[[[...": deeper than the decoder's stack, not a traceback
        raise KeyMaterialError(f"{path} is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise KeyMaterialError(f"{path} is not valid JSON: {exc}") from None


# --- keys ------------------------------------------------------------------


_KID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def key_path(keydir: Path, member: str, kid: str) -> Path:
    """Return where ``member``'s private key ``kid`` lives; refuse a kid unfit for a file name."""
    if not _KID_RE.fullmatch(kid):
        raise KeyMaterialError(f"kid {kid!r} is not a safe file name")
    return keydir / member / f"{kid}.jwk"


def new_kid(member: str, use: KeyUse, at: datetime) -> str:
    """Return a fresh readable kid such as ``JPN-sig-20261128-1a2b3c4d``."""
    return f"{member}-{use}-{at:%Y%m%d}-{secrets.token_hex(4)}"


def generate_key(member: str, use: KeyUse, at: datetime) -> OKPKey:
    """Generate an Ed25519 (``sig``) or X25519 (``enc``) private key with kid, use and alg."""
    curve: Literal["Ed25519", "X25519"] = "Ed25519" if use == "sig" else "X25519"
    params: KeyParameters = {"kid": new_kid(member, use, at), "use": use, "alg": ALGS[use]}
    return OKPKey.generate_key(curve, parameters=params, private=True)


def roster_entry(key: OKPKey, member: str, at: datetime, valid_days: int) -> dict[str, Any]:
    """Return the public roster JWK for ``key``: active from ``at`` for ``valid_days``.

    ``key`` may be private (made here) or public (sent in a key request); only its
    public members enter the roster.
    """
    entry = public_jwk(key)
    entry |= {
        "msmt_member": member,
        "msmt_status": "active",
        "msmt_valid_from": format_time(at),
        "msmt_valid_until": format_time(at + timedelta(days=valid_days)),
    }
    return entry


def public_jwk(key: OKPKey) -> dict[str, Any]:
    """Return the standard public members of ``key`` (kty, crv, x, kid, use, alg): never ``d``."""
    public = key.as_dict(private=False)
    return {k: public[k] for k in ("kty", "crv", "x", "kid", "use", "alg")}


def check_private_file(path: Path, what: str = "private key") -> None:
    """Raise ``KeyMaterialError`` if group or others have any access to ``path``.

    A node refuses to start on such a file, as ssh refuses such a key: a private
    key that other local users can read must be treated as disclosed, and one they
    can write could be swapped. ``msmt keys`` writes every private file 0600.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise KeyMaterialError(
            f"{what} {path} is open to other users (mode {stat.S_IMODE(mode):04o}): chmod 600 it"
        )


def load_private_jwk(path: Path, *, use: KeyUse) -> OKPKey:
    """Load one private JWK file; raise ``KeyMaterialError`` if malformed or of the wrong kind."""
    data = read_json(path)
    curve = "Ed25519" if use == "sig" else "X25519"
    if not isinstance(data, dict) or data.get("crv") != curve or "d" not in data:
        raise KeyMaterialError(f"{path}: not a private {curve} JWK")
    if data.get("use") != use or not isinstance(data.get("kid"), str):
        raise KeyMaterialError(f"{path}: missing kid or use is not {use!r}")
    return _import_private(path, data)


def _check_alg(path: Path, data: Mapping[str, Any]) -> None:
    # joserfc imports any "alg", then refuses to sign with one it does not know, or
    # one not of the key's curve: a traceback from msmt keys rotate, not a refusal.
    want = ALGS["sig"] if data.get("crv") == "Ed25519" else ALGS["enc"]
    if "alg" in data and data["alg"] != want:
        raise KeyMaterialError(f"{path}: its alg is {excerpt(str(data['alg']))}, not {want!r}")


def _import_private(path: Path, data: dict[str, Any]) -> OKPKey:
    """Import a private OKP JWK whose ``d`` must belong to its ``x``, of its curve's ``alg``."""
    _check_alg(path, data)
    try:
        key = OKPKey.import_key(data)
    except (ValueError, JoseError) as exc:
        raise KeyMaterialError(f"{path}: malformed JWK ({exc})") from None
    # joserfc keeps the file's "x" as given, and the roster check compares that:
    # a "d" of another key would sign or decrypt as a key no roster entry has.
    derived = base64.urlsafe_b64encode(key.public_key.public_bytes_raw()).rstrip(b"=").decode()
    if data.get("x") != derived:
        raise KeyMaterialError(f"{path}: its private key (d) does not belong to its public key (x)")
    return key


def new_nats_seed() -> bytes:
    """Return a fresh NATS user nkey seed (``SU...``)."""
    return bytes(nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER))


def _nkey_seed_problem(text: bytes) -> str | None:
    """Why ``text`` is not an nkey seed's encoding (base32 of 36 bytes, a CRC-16 last), or None."""
    try:
        raw = base64.b32decode(text + b"=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return "not base32"
    if len(raw) != 36 or nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        return "bad length or checksum"
    return None


def is_nkey_seed(text: bytes) -> bool:
    """Whether ``text`` is a NATS nkey seed (``S...``), which is base64url-shaped too."""
    return text.startswith(b"S") and _nkey_seed_problem(text) is None


def nats_public(seed: bytes, where: str) -> str:
    """Return the user public nkey (``U...``) of a seed; raise ``KeyMaterialError`` if malformed.

    The CRC-16 of the seed is checked here: the nkeys library does not, and a seed
    with a corrupted tail would otherwise yield a different, unknown key.
    """
    text = seed.strip()
    problem = _nkey_seed_problem(text)
    if problem is not None:
        raise KeyMaterialError(f"{where}: malformed nkey seed ({problem})")
    try:
        public = nkeys.from_seed(bytearray(text)).public_key.decode()
    except (nkeys.NkeysError, ValueError, TypeError) as exc:
        raise KeyMaterialError(f"{where}: malformed nkey seed ({type(exc).__name__})") from None
    if not public.startswith("U"):
        raise KeyMaterialError(f"{where}: not a NATS user seed")
    return str(public)


def check_nats_user(nkey: object, where: str) -> str:
    """Return ``nkey`` if it is a NATS user public nkey (``U...``, CRC-16 intact).

    Raises ``KeyMaterialError`` naming ``where`` otherwise: a seed (``SU...``), another
    kind of nkey, or a mistyped one, which the hub would refuse or never match.
    """
    if isinstance(nkey, str) and nkey.isascii() and is_nkey_seed(nkey.encode()):
        # Before the length: a seed is longer, and was told only "not 56 characters" (an
        # onboarding trial), nothing of what it costs.
        raise KeyMaterialError(
            f"{where}: this is an nkey seed, which is private, not a public key: it is"
            " disclosed; make a new one and send its public key (U...)"
        )
    if not isinstance(nkey, str) or len(nkey) != 56 or not nkey.isascii():
        raise KeyMaterialError(f"{where}: not a NATS user public nkey (56 base32 characters)")
    if nkey.startswith("S"):
        raise KeyMaterialError(f"{where}: this is an nkey seed, which is private, not a public key")
    try:
        raw = base64.b32decode(nkey)
    except (binascii.Error, ValueError):
        raise KeyMaterialError(f"{where}: malformed NATS public nkey (not base32)") from None
    if nkeys.crc16_checksum(raw[:-2]) != raw[-2:]:
        raise KeyMaterialError(f"{where}: malformed NATS public nkey (bad checksum)")
    if raw[0] != nkeys.PREFIX_BYTE_USER:
        raise KeyMaterialError(f"{where}: not a NATS user public nkey")
    return nkey


# --- the signed roster -----------------------------------------------------


def sign_roster(jwks: Mapping[str, Any], authority: OKPKey) -> str:
    """Return a detached compact JWS (Ed25519) over the RFC 8785 bytes of ``jwks``."""
    return _sign_detached(jwks, authority, ROSTER_JWS_TYP)


def _sign_detached(value: Mapping[str, Any], authority: OKPKey, typ: str) -> str:
    header = {"alg": "Ed25519", "kid": authority.kid, "typ": typ}
    token = jws.serialize_compact(
        header, rfc8785.dumps(dict(value)), authority, algorithms=["Ed25519"]
    )
    return str(jws.detach_content(token))


def _verify_detached(
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


def _read_signature(path: Path, what: str) -> str:
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


def load_authority(path: Path) -> OKPKey:
    """Load the pinned roster-authority public key; it must be a public Ed25519 JWK with a kid."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("crv") != "Ed25519" or "d" in data:
        raise KeyMaterialError(f"{path}: roster authority must be a public Ed25519 JWK")
    if not isinstance(data.get("kid"), str):
        raise KeyMaterialError(f"{path}: roster authority key has no kid")
    _check_alg(path, data)
    try:
        return OKPKey.import_key(data)
    except (ValueError, JoseError) as exc:
        raise KeyMaterialError(f"{path}: malformed JWK ({exc})") from None


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
    _verify_detached(ROSTER_WHAT, jwks, signature, authority, ROSTER_JWS_TYP, pinned_at)
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
    authority, pin = _pinned_authority(
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


def _pinned_authority(
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
    return jwks, _read_signature(keydir / ROSTER_SIG_FILE, "roster signature ")


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
    _write_atomic(state_path, state_bytes, private=True)


# --- the signed NATS users -------------------------------------------------

NATS_USERS_SIG_FILE: Final = f"{NATS_USERS_FILE}.jws"
NATS_USERS_JWS_TYP: Final = "msmt-nats-users+jws"
VERSION_MEMBER: Final = "msmt_version"


@dataclass(frozen=True, slots=True)
class SignedUsers:
    """The NATS users whose signature was checked: account to public nkey, version, signer."""

    users: dict[str, str]
    version: int
    signer: str
    thumbprint: str
    """The signer's RFC 7638 thumbprint: what the hub operator compared by phone."""


def split_users(data: Any, path: Path) -> tuple[dict[str, str], int]:
    """``nats-users.json``'s public nkeys by account, and its version (0: never signed).

    Raises ``KeyMaterialError`` naming the file and account for anything else: ``msmt
    nats config`` wrote a mistyped nkey into the hub's configuration, which nats-server
    then refused to load, naming only its own line.
    """
    if not isinstance(data, dict):
        raise KeyMaterialError(f"{path} is not a JSON object of public nkeys")
    users = dict(data)
    version = users.pop(VERSION_MEMBER, 0)
    if VERSION_MEMBER in data and (
        not isinstance(version, int)
        or isinstance(version, bool)
        or not 1 <= version <= MAX_USERS_VERSION
    ):
        raise KeyMaterialError(
            f"{path}: {VERSION_MEMBER} is not a positive integer below 2^53 (RFC 8785)"
        )
    if not all(isinstance(v, str) for v in users.values()):
        raise KeyMaterialError(f"{path} is not a JSON object of public nkeys")
    owners: dict[str, str] = {}
    for account, nkey in users.items():
        check_nats_user(nkey, f"{path}: the user of {excerpt(account)}")
        if nkey in owners:
            # One login would be two accounts' at the hub; nats-server's refusal names
            # only its own line.
            raise KeyMaterialError(
                f"{path}: {excerpt(account)} and {excerpt(owners[nkey])} have the same NATS user"
            )
        owners[nkey] = account
    return users, version


MAX_USERS_VERSION: Final = 2**53 - 1
"""RFC 8785 numbers are IEEE 754 doubles: a version above this would not sign exactly."""


NATS_USERS_SIGNED_FILE: Final = "authority/nats-users-signed.json"
"""The version of ``nats-users.json`` last signed here and the SHA-256 of what was signed.

Kept with the private key: whoever may write the public files (a git-writable copy) could
otherwise edit the users, even drop their version and signature, and have the next
routine change sign the edit (two reviews)."""


def load_users_for_update(keydir: Path, authority: OKPKey) -> dict[str, str]:
    """The custodian's ``nats-users.json``, exactly as last signed here, to change it.

    ``authority`` is the private key from ``load_for_update``. Refused (one line, with
    the way out) unless the file is what ``NATS_USERS_SIGNED_FILE`` records; in a key
    directory from before that record, unless it verifies with ``authority`` (a file
    never signed, with no signature beside it, is read as it is, to be signed).
    """
    path = keydir / NATS_USERS_FILE
    data = read_json(path)
    users, version = split_users(data, path)
    out = (
        " (an edit, or a write cut short): 'msmt keys sign-nats-users' signs the file as it"
        " stands (check the users it prints)"
    )
    mark = _read_users_mark(keydir)
    if mark is not None:
        if mark != (version, users_digest(data)):
            raise KeyMaterialError(f"{path} is not the version {mark[0]} signed here{out}")
        return users
    sig_path = keydir / NATS_USERS_SIG_FILE
    if version or sig_path.exists():
        # The reason is kept (an unreadable signature is not an edit): the way out added.
        try:
            signature = _read_signature(sig_path, "")
            _verify_detached(str(path), data, signature, authority, NATS_USERS_JWS_TYP, "")
        except KeyMaterialError as exc:
            raise KeyMaterialError(f"{exc}{out}") from None
    return users


def users_digest(data: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``nats-users.json``'s RFC 8785 bytes: what its signature covers."""
    return hashlib.sha256(rfc8785.dumps(dict(data))).hexdigest()


def _read_users_mark(keydir: Path) -> tuple[int, str] | None:
    path = keydir / NATS_USERS_SIGNED_FILE
    if not path.exists():
        return None
    mark = read_json(path)
    if not (
        isinstance(mark, dict)
        and isinstance(mark.get("version"), int)
        and isinstance(mark.get("sha256"), str)
    ):
        raise KeyMaterialError(f"{path}: not a record of the users signed here")
    return mark["version"], mark["sha256"]


def write_nats_users(
    keydir: Path, users: Mapping[str, str], authority: OKPKey, *, first: bool = False
) -> int:
    """Sign ``users`` as the next version of ``nats-users.json``; write it and its ``.jws``.

    The version is one above the file's in place (0 for none, or one never signed; with
    ``first``, a new authority's, 1 whatever is there):
    the hub operator's ``msmt nats config`` refuses a version below the one its
    hub.conf was made from, as a node refuses an older roster. The signature is
    written aside first and renamed into place last: a crash between leaves a pair
    that does not verify, which ``msmt nats config`` refuses, and the next write
    (``msmt keys sign-nats-users``) signs it again.
    """
    path, sig_path = keydir / NATS_USERS_FILE, keydir / NATS_USERS_SIG_FILE
    if sig_path.is_dir():
        # Its rename would fail only after the file had changed (a bad-input sweep).
        raise WriteError(f"cannot write {sig_path}: Is a directory")
    previous = split_users(read_json(path), path)[1] if path.exists() and not first else 0
    data = {**users, VERSION_MEMBER: previous + 1}
    signature = _sign_detached(data, authority, NATS_USERS_JWS_TYP)
    staged = _stage(sig_path, (signature + "\n").encode(), private=False)
    try:
        _write_atomic(path, json_bytes(data), private=False)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    _put_in_place(staged, sig_path)
    mark = {"version": previous + 1, "sha256": users_digest(data)}
    try:
        _write_atomic(keydir / NATS_USERS_SIGNED_FILE, json_bytes(mark), private=True)
    except WriteError as exc:
        # The users are signed and in place: say so (a review: "cannot write" alone read
        # as nothing changed, while the next change refused them).
        raise WriteError(
            f"{path} version {previous + 1} is signed and in place, but {exc}: the next"
            " change refuses it until 'msmt keys sign-nats-users' records it"
        ) from None
    return previous + 1


def load_signed_users(
    keydir: Path, *, authority_path: Path | None = None, authority_option: str | None = None
) -> SignedUsers:
    """Read ``nats-users.json`` from ``keydir`` and verify it against the pinned authority.

    What the hub's configuration grants a login to each account rests on this file.
    Checklist (each step raises ``KeyMaterialError`` with one line naming the file):
    1. the pinned authority key loads (``authority_path``, else ``keydir``'s copy);
    2. the file is a JSON object of public nkeys by account, with an integer
       ``msmt_version`` >= 1 (none: never signed, so not trusted);
    3. ``nats-users.json.jws`` is readable ASCII text;
    4. it is detached (its payload part empty), its header exactly Ed25519, the
       nats-users ``typ`` and the pinned kid;
    5. the signature verifies over the RFC 8785 bytes of the whole file's object.
    """
    authority, pin = _pinned_authority(
        keydir, authority_path, authority_option, "as the members pin it: docs/DEPLOY.md"
    )
    path, sig_path = keydir / NATS_USERS_FILE, keydir / NATS_USERS_SIG_FILE
    data = read_json(path)
    users, version = split_users(data, path)
    if version == 0:
        raise KeyMaterialError(
            f"{path} is not signed (no {VERSION_MEMBER}: written before msmt signed it): the"
            " custodian signs it with 'msmt keys sign-nats-users' and sends it with its"
            f" {NATS_USERS_SIG_FILE}"
        )
    try:
        signature = _read_signature(sig_path, "")
    except KeyMaterialError as exc:
        raise KeyMaterialError(f"{exc} (the custodian sends it with {path.name})") from None
    _verify_detached(str(path), data, signature, authority, NATS_USERS_JWS_TYP, str(pin))
    return SignedUsers(
        users=users, version=version, signer=str(authority.kid), thumbprint=authority.thumbprint()
    )


# --- operations: init, rotate, revoke ---------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _check_members(members: Iterable[str]) -> tuple[str, ...]:
    result = tuple(members)
    for member in result:
        if not is_member(member):
            raise UsageError(f"unknown member {member!r} (members: {', '.join(MEMBERS)})")
    if len(set(result)) != len(result) or not result:
        raise UsageError("members must be a non-empty list without repeats")
    return result


ROSTER_STAGED: Final = f"{ROSTER_FILE}.new"
ROSTER_SIG_STAGED: Final = f"{ROSTER_SIG_FILE}.new"
"""Where ``write_roster`` puts the new pair aside before renaming it into place."""


def write_roster(keydir: Path, jwks: dict[str, Any], authority: OKPKey) -> None:
    """Sign ``jwks`` with ``authority`` and write ``roster.json`` and its ``.jws``.

    A crash between the two renames into place leaves a roster whose signature
    fails, which every node refuses (fail closed); ``finish_roster_write`` then
    finds the signature still aside and finishes the swap.
    """
    signature = sign_roster(jwks, authority)
    staged, staged_sig = keydir / ROSTER_STAGED, keydir / ROSTER_SIG_STAGED
    # Both are put aside whole (each written to a temp file and renamed) under
    # fixed names before either goes into place, so a full disk leaves the old
    # pair, which still verifies, and a crash leaves files that say what it was.
    _put_in_place(_stage(keydir / ROSTER_FILE, json_bytes(jwks), private=False), staged)
    try:
        signed = _stage(keydir / ROSTER_SIG_FILE, (signature + "\n").encode(), private=False)
        _put_in_place(signed, staged_sig)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    _swap(staged, keydir / ROSTER_FILE)
    _swap(staged_sig, keydir / ROSTER_SIG_FILE)
    _swapped(keydir)
    _mark_signed(keydir, jwks)


class RosterInPlaceError(WriteError):
    """The new roster is in place, but a write that follows it failed: it is not undone."""


def _mark_signed(keydir: Path, jwks: Mapping[str, Any]) -> None:
    # After the swap: a mark ahead of the roster in place would refuse the next write.
    # Never lowered: the callers sign only what _check_signed_before let through.
    mark = {"version": jwks["msmt_version"], "sha256": roster_digest(jwks)}
    try:
        _write_atomic(keydir / ROSTER_SIGNED_FILE, json_bytes(mark), private=True)
    except WriteError as exc:
        # Not a failed roster write (a review: a rotation took it for one and deleted
        # the private keys the roster in place names): say that the roster stands.
        raise RosterInPlaceError(
            f"roster version {jwks['msmt_version']} is in place, but {exc}; the next roster"
            " write records it"
        ) from None


def _swapped(keydir: Path) -> None:
    # Synced once, after both renames: a sync that failed between them stopped the
    # swap with the new roster beside the old signature (a review injected EIO).
    try:
        sync_folder(keydir)
    except OSError as exc:
        raise WriteError(f"cannot write {keydir / ROSTER_FILE}: {exc.strerror}") from None


def _swap(staged: Path, path: Path) -> None:
    # Unlike _put_in_place, the file aside is kept on failure: once the roster
    # is in place, its signature aside is what finishes the swap.
    try:
        staged.replace(path)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}") from None


def _verified_pair(roster: Path, signature: Path, authority: OKPKey) -> SignedRoster | None:
    """The roster ``roster`` signed by ``signature`` under ``authority``; ``None`` if not."""
    try:
        text = read_file_text(signature, "ascii")
        return verify_roster(read_json(roster), text, authority)
    except (OSError, UnicodeDecodeError, KeyMaterialError):
        return None


def finish_roster_write(keydir: Path) -> str | None:
    """Finish or undo a ``write_roster`` cut short (a crash); one line saying which, or ``None``.

    The pair left aside goes into place only if it verifies under the authority's
    public key in ``keydir`` and is newer than the pair in place (a roster in
    place with the signature aside counts as such a pair); otherwise, if the pair
    in place verifies, what was left aside is removed. Raises ``KeyMaterialError``,
    changing nothing, if neither verifies: an unsigned or mismatched roster is
    never put in place.
    """
    staged, staged_sig = keydir / ROSTER_STAGED, keydir / ROSTER_SIG_STAGED
    if not staged.exists() and not staged_sig.exists():
        return None
    authority = load_authority(keydir / AUTHORITY_PUBLIC_FILE)
    current = _verified_pair(keydir / ROSTER_FILE, keydir / ROSTER_SIG_FILE, authority)
    candidate = None
    if staged_sig.exists():
        roster = staged if staged.exists() else keydir / ROSTER_FILE
        candidate = _verified_pair(roster, staged_sig, authority)
    cut = f"a roster write in {keydir} was cut short"
    if candidate is not None and _behind_mark(keydir, candidate) is not None:
        # Left aside before a later roster was signed (a key directory restored from an
        # older copy): finishing it would sign over what the later ones revoked, and lower
        # the mark (a review). Undone below if the roster in place verifies.
        candidate = None
    if candidate is not None and (current is None or candidate.version > current.version):
        if staged.exists():
            _swap(staged, keydir / ROSTER_FILE)
        _swap(staged_sig, keydir / ROSTER_SIG_FILE)
        _swapped(keydir)
        _mark_signed(keydir, candidate.jwks)  # as the write it finishes would have
        return f"{cut}: finished it, roster version {candidate.version} is in place"
    if current is not None:
        for path in (staged, staged_sig):
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:  # a folder by that name (a bad-input sweep): one line
                raise WriteError(f"{cut}, and {path} cannot be removed: {exc.strerror}") from None
        return f"{cut}: undid it, roster version {current.version} stays in place"
    raise KeyMaterialError(
        f"{cut}, and neither the roster in place nor the one left aside ({ROSTER_STAGED},"
        f" {ROSTER_SIG_STAGED}) verifies: put the last published {ROSTER_FILE} and"
        f" {ROSTER_SIG_FILE} back, and remove those two"
    )


def init_keys(
    keydir: Path,
    members: Iterable[str] = MEMBERS,
    *,
    force: bool = False,
    now: datetime | None = None,
    valid_days: int = DEFAULT_VALID_DAYS,
) -> SignedRoster:
    """Create every member's keys, the NATS users, the roster authority and a signed roster v1.

    Raises ``KeyMaterialError`` (nothing written) if any key file already exists and
    ``force`` is false; ``UsageError`` for an unknown member or a bad validity.
    """
    chosen = _check_members(members)
    if valid_days < 1:
        raise UsageError("--valid-days must be at least 1")
    at = now or _utcnow()
    existing = [
        p
        for p in (
            keydir / ROSTER_FILE,
            keydir / AUTHORITY_PRIVATE_FILE,
            *(keydir / m for m in (*chosen, AUDIT_ACCOUNT)),
        )
        if p.exists() and (p.is_file() or any(p.iterdir()))
    ]
    if existing and not force:
        raise KeyMaterialError(f"{existing[0]} already exists; use --force to replace all keys")
    authority = new_authority(at)
    entries: list[dict[str, Any]] = []
    users: dict[str, str] = {}
    private_files: list[tuple[Path, bytes]] = []
    for member in chosen:
        for use in ("sig", "enc"):
            key = generate_key(member, use, at)
            entries.append(roster_entry(key, member, at, valid_days))
            path = key_path(keydir, member, str(key.kid))
            private_files.append((path, json_bytes(key.as_dict(private=True))))
    for account in (*chosen, AUDIT_ACCOUNT):
        seed = new_nats_seed()
        users[account] = nats_public(seed, account)
        private_files.append((keydir / account / NATS_SEED_FILE, seed + b"\n"))
    if force:
        for directory in (keydir / m for m in (*chosen, AUDIT_ACCOUNT)):
            for old in directory.glob("*") if directory.is_dir() else ():
                if old.suffix in (".jwk", ".nk"):
                    old.unlink()
    for path, data in private_files:
        _write_atomic(path, data, private=True)
    write_authority(keydir, authority, entries, users, at)
    return load_signed_roster(keydir)


def new_authority(at: datetime) -> OKPKey:
    """Generate a roster authority key: Ed25519, kid ``roster-authority-<date>-<hex>``."""
    return OKPKey.generate_key(
        "Ed25519",
        parameters={
            "kid": f"roster-authority-{at:%Y%m%d}-{secrets.token_hex(4)}",
            "alg": "Ed25519",
        },
        private=True,
    )


def write_authority(
    keydir: Path,
    authority: OKPKey,
    entries: list[dict[str, Any]],
    users: Mapping[str, str],
    at: datetime,
) -> None:
    """Write the authority's two files, ``nats-users.json`` and a roster v1 of ``entries``."""
    _write_atomic(
        keydir / AUTHORITY_PRIVATE_FILE, json_bytes(authority.as_dict(private=True)), private=True
    )
    _write_atomic(
        keydir / AUTHORITY_PUBLIC_FILE, json_bytes(authority.as_dict(private=False)), private=False
    )
    write_nats_users(keydir, users, authority, first=True)
    jwks: dict[str, Any] = {"keys": entries, "msmt_version": 1, "msmt_issued_at": format_time(at)}
    write_roster(keydir, jwks, authority)


def load_for_update(keydir: Path) -> tuple[SignedRoster, OKPKey]:
    """Load the roster and the authority's private key, to sign a change to it.

    Raises ``KeyMaterialError`` if the roster does not verify, the private key is
    malformed or open to other users, or it is not the key of the public authority file.
    """
    signed = load_signed_roster(keydir)
    path = keydir / AUTHORITY_PRIVATE_FILE
    authority = load_private_jwk_any(path)
    public = load_authority(keydir / AUTHORITY_PUBLIC_FILE)
    # The whole key, not its kid: another key under the same kid in the public file
    # would have verified a roster (or users) re-signed with it, which the real key
    # would then sign over (a review forged both).
    if authority.kid != public.kid or authority.thumbprint() != public.thumbprint():
        raise KeyMaterialError(f"{path} is not the key of {AUTHORITY_PUBLIC_FILE}")
    _check_signed_before(keydir, signed)
    return signed, authority


def _check_signed_before(keydir: Path, signed: SignedRoster) -> None:
    # Refuse to sign over a roster older than, or other than, the last one signed here.
    problem = _behind_mark(keydir, signed)
    if problem is not None:
        raise KeyMaterialError(
            f"the roster in {keydir} is version {signed.version}, {problem} this authority"
            f" last signed ({keydir / ROSTER_SIGNED_FILE}): {ROSTER_FILE} and"
            f" {ROSTER_SIG_FILE} were put back from an older copy: put the latest pair back"
            " (a node that has seen it refuses anything older)"
        )


def _behind_mark(keydir: Path, signed: SignedRoster) -> str | None:
    """How ``signed`` falls behind the last roster signed here, or None (none: no mark yet).

    A malformed mark raises ``KeyMaterialError``: nothing is signed, finished or undone.
    """
    mark = _read_mark(keydir)
    if mark is None or signed.version > mark[0]:
        return None  # a key directory from before the mark: the next write records it
    if signed.version < mark[0]:
        return f"older than version {mark[0]}"
    if roster_digest(signed.jwks) != mark[1]:
        return f"but not the version {mark[0]}"
    return None


def _read_mark(keydir: Path) -> tuple[int, str | None] | None:
    """The last roster signed here, (version, SHA-256); None without a mark."""
    mark_path = keydir / ROSTER_SIGNED_FILE
    if not mark_path.exists():
        return None
    mark = read_json(mark_path)
    if not (isinstance(mark, dict) and isinstance(mark.get("version"), int)):
        raise KeyMaterialError(f"{mark_path}: not a record of the last roster signed")
    digest = mark.get("sha256")
    return mark["version"], digest if isinstance(digest, str) else None


def load_private_jwk_any(path: Path) -> OKPKey:
    """Load the roster authority's private Ed25519 JWK.

    Raises ``KeyMaterialError`` if it is malformed or open to other users.
    """
    data = read_json(path)
    if not isinstance(data, dict) or data.get("crv") != "Ed25519" or "d" not in data:
        raise KeyMaterialError(f"{path}: not a private Ed25519 JWK")
    key = _import_private(path, data)
    check_private_file(path, "roster authority key")
    return key


def bump_roster(signed: SignedRoster, keys: list[dict[str, Any]], at: datetime) -> dict[str, Any]:
    """Return the next roster version holding ``keys``, issued at ``at``.

    Raises ``KeyMaterialError`` for a duplicate kid or anything the nodes would
    refuse to parse: nothing is signed that a node cannot load.
    """
    kids = [k["kid"] for k in keys]
    if len(set(kids)) != len(kids):
        raise KeyMaterialError("duplicate kid in the updated roster")
    jwks = dict(signed.jwks)
    jwks |= {"keys": keys, "msmt_version": signed.version + 1, "msmt_issued_at": format_time(at)}
    Roster.from_jwks(jwks)  # refuse to sign anything the nodes would refuse to parse
    return jwks


def rotate_keys(
    keydir: Path,
    member: str,
    *,
    now: datetime | None = None,
    valid_days: int = DEFAULT_VALID_DAYS,
) -> tuple[str, str]:
    """Add a new active sig and enc key for ``member``; retire its active ones as of now.

    Retired keys still verify what was made before ``msmt_retired_at``, until their
    valid-until. Returns the new (sig kid, enc kid). Raises ``UsageError`` for an
    unknown member and ``KeyMaterialError`` if the roster does not verify.
    """
    if not is_member(member):
        raise UsageError(f"unknown member {member!r} (members: {', '.join(MEMBERS)})")
    signed, authority = load_for_update(keydir)
    if not any(k.member == member for k in signed.roster):
        raise UsageError(f"member {member} has no keys in the roster; run 'msmt keys init'")
    at = now or _utcnow()
    keys = retire_active(signed.jwks["keys"], member, at)
    new = {use: generate_key(member, use, at) for use in ("sig", "enc")}
    keys += [roster_entry(k, member, at, valid_days) for k in new.values()]
    jwks = bump_roster(signed, keys, at)
    written: list[Path] = []
    try:
        for key in new.values():
            path = key_path(keydir, member, str(key.kid))
            _write_atomic(path, json_bytes(key.as_dict(private=True)), private=True)
            written.append(path)
        write_roster(keydir, jwks, authority)
    except WriteError:
        # Refused before the new roster went anywhere (a full disk fails it while it is
        # staged): the new private keys are in no roster and never will be, and left
        # behind they read as a pending key request (a full-disk trial). Once a roster
        # file is aside or in place (a failure after the swap: a review), the roster
        # names them, or finish_roster_write may put one in place that does.
        if not _roster_may_name(keydir, [str(key.kid) for key in new.values()]):
            for path in written:
                path.unlink(missing_ok=True)
        raise
    return str(new["sig"].kid), str(new["enc"].kid)


def _roster_may_name(keydir: Path, kids: Sequence[str]) -> bool:
    """Whether a roster in ``keydir``, in place or left aside, may list any of ``kids``."""
    if any((keydir / name).exists() for name in (ROSTER_STAGED, ROSTER_SIG_STAGED)):
        return True
    try:
        listed = {entry.get("kid") for entry in read_json(keydir / ROSTER_FILE)["keys"]}
    except (KeyMaterialError, TypeError, KeyError, AttributeError):
        return True  # cannot tell: keep the keys
    return any(kid in listed for kid in kids)


def retire_active(
    entries: Iterable[Mapping[str, Any]], member: str, at: datetime
) -> list[dict[str, Any]]:
    """Return the roster's ``entries`` with ``member``'s active keys retired as of ``at``."""
    return [
        {**entry, "msmt_status": "retired", "msmt_retired_at": format_time(at)}
        if entry["msmt_member"] == member and entry["msmt_status"] == "active"
        else dict(entry)
        for entry in entries
    ]


def revoke_key(keydir: Path, kid: str, reason: str, *, now: datetime | None = None) -> None:
    """Mark ``kid`` revoked, recording when and why; it never verifies anything again.

    Raises ``KeyMaterialError`` for an unknown or already revoked kid and
    ``UsageError`` for an empty or multi-line reason.
    """
    reason = reason.strip()
    if not reason or "\n" in reason or len(reason) > 200:
        raise UsageError("--reason must be one non-empty line of at most 200 characters")
    signed, authority = load_for_update(keydir)
    key = signed.roster.get(kid)
    if key.status == "revoked":
        raise KeyMaterialError(f"key {kid} is already revoked")
    at = now or _utcnow()
    keys = [
        {
            **e,
            "msmt_status": "revoked",
            "msmt_revoked_at": format_time(at),
            "msmt_revoked_reason": reason,
        }
        if e["kid"] == kid
        else e
        for e in signed.jwks["keys"]
    ]
    write_roster(keydir, bump_roster(signed, keys, at), authority)


# --- what a node loads -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberKeys:
    """One member's private keys, as its node uses them.

    ``decryption`` keeps every enc key that is not revoked, so a message encrypted
    to a key that was just rotated out, or that expired while it waited on the hub,
    still decrypts (``envelope.receive`` refuses one made after the expiry).
    ``pending`` names the key files in the member's folder that the roster does
    not list yet (made by ``msmt keys request`` and not accepted, or accepted in a
    roster not installed here): the node uses none of them.
    """

    member: str
    signing: OKPKey
    signing_kid: str
    decryption: dict[str, OKPKey]
    nats_seed: bytes
    pending: tuple[str, ...] = ()


def load_member_keys(keydir: Path, member: str, roster: Roster, at: datetime) -> MemberKeys:
    """Load ``member``'s private keys and match them against the verified roster.

    Raises ``KeyMaterialError`` if a file is malformed or open to other users
    (``check_private_file``), a private key does not match its roster entry, or
    the member has no usable active signing key at ``at``. A key file whose kid
    the roster does not list is skipped, and named in ``pending``: a key request
    waits for the custodian, and the node runs on its current keys meanwhile.
    """
    folder = keydir / member
    if not folder.is_dir():
        raise KeyMaterialError(f"no key directory {folder}")
    # A key made moments ago by a custodian whose clock is ahead of ours counts:
    # partners take what it signs within the same skew (a node restarted at once
    # after a rotation stayed down, exit 2, "no active sig key valid now").
    current = roster.current(member, "sig", at, skew=CLOCK_SKEW)
    if at > current.valid_until:  # the skew is for a new key, not one that has lapsed
        raise KeyMaterialError(f"{member} has no active sig key valid now")
    signing = load_matching_key(key_path(keydir, member, current.kid), roster, member, "sig")
    decryption: dict[str, OKPKey] = {}
    usable = False
    pending = tuple(
        kid
        for kid in (p.name.removesuffix(".jwk") for p in sorted(folder.glob(f"{member}-*.jwk")))
        if kid not in roster
    )
    for path in sorted(folder.glob(f"{member}-enc-*.jwk")):
        kid = path.name.removesuffix(".jwk")
        if kid in pending:
            continue
        entry = roster.get(kid)
        if entry.status == "revoked":
            continue
        # An expired key is kept: envelopes encrypted to it while it was valid may
        # still wait on the hub (a node down across the expiry), and the receiver
        # opens those only (envelope.receive checks the signed iat against it).
        decryption[entry.kid] = load_matching_key(path, roster, member, "enc")
        usable = usable or at <= entry.valid_until
    if not usable:
        raise KeyMaterialError(f"{member} has no usable decryption key in {folder}")
    try:
        seed = read_file_bytes(folder / NATS_SEED_FILE).strip()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read {folder / NATS_SEED_FILE}: {exc.strerror}") from None
    check_private_file(folder / NATS_SEED_FILE, "NATS seed")
    nats_public(seed, str(folder / NATS_SEED_FILE))
    return MemberKeys(member, signing, current.kid, decryption, seed, pending)


def load_matching_key(path: Path, roster: Roster, member: str, use: KeyUse) -> OKPKey:
    """Load ``member``'s private key file ``path`` and check it against its roster entry.

    Raises ``KeyMaterialError`` if the file is malformed, open to other users, or
    its key is not the roster's key of that kid, member and use.
    """
    key = load_private_jwk(path, use=use)
    check_private_file(path)
    entry = roster.get(str(key.kid))
    if entry.member != member or entry.use != use or entry.jwk.get("x") != key.as_dict()["x"]:
        raise KeyMaterialError(f"{path} does not match roster key {key.kid} of {member}")
    return key
