"""Key material on disk: the key directory's layout, its files, private JWKs and nkeys.

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

This module holds the files and keys themselves, and what a node loads of its own;
the signed roster is ``broker.keys_roster``, the signed ``nats-users.json``
``broker.keys_users``, and the custodian's operations (init, rotate, revoke, the
roster's writes) ``broker.keys_custodian``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import nkeys
from joserfc.errors import JoseError
from joserfc.jwk import KeyParameters, OKPKey

from broker.errors import KeyMaterialError, WriteError
from broker.files import (
    make_folder,
    read_file_bytes,
    read_file_text,
    sync_folder,
    write_synced,
)
from broker.note import excerpt
from broker.roster import CLOCK_SKEW, KeyUse, Roster, RosterKey, format_time

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


def write_atomic(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename.

    Raises ``WriteError`` (one line) if it cannot, leaving ``path`` as it was.
    """
    tmp = stage(path, data, private=private)
    put_in_place(tmp, path)


def stage(path: Path, data: bytes, *, private: bool) -> Path:
    """Write ``data`` durably to a new temp file beside ``path``; return the temp file."""
    try:
        make_folder(path.parent, private=private)
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


def put_in_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` (made by ``stage``) over ``path``; ``WriteError`` if not, ``tmp`` gone."""
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
    write_atomic(path, data, private=False)


def write_private(path: Path, data: bytes) -> None:
    """Write a private file (a key, a seed) atomically, mode 0600 in a 0700 directory."""
    write_atomic(path, data, private=True)


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


def _no_constant(name: str) -> Any:
    # NaN and Infinity are no JSON (RFC 8259): a roster holding one read as "altered".
    raise ValueError(f"non-standard constant {name}")


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
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_no_constant)
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


def current_signing_key(roster: Roster, member: str, at: datetime) -> RosterKey:
    """``member``'s signing key in ``roster`` that a start at ``at`` signs with.

    Raises ``KeyMaterialError`` if there is none (the member suspended, its keys
    lapsed): the start is refused. Reads no private file.
    """
    # A key made moments ago by a custodian whose clock is ahead of ours counts:
    # partners take what it signs within the same skew (a node restarted at once
    # after a rotation stayed down, exit 2, "no active sig key valid now").
    current = roster.current(member, "sig", at, skew=CLOCK_SKEW)
    if at > current.valid_until:  # the skew is for a new key, not one that has lapsed
        raise KeyMaterialError(f"{member} has no active sig key valid now")
    return current


def check_decryption_listed(roster: Roster, member: str, at: datetime) -> None:
    """Raise ``KeyMaterialError`` unless ``roster`` lists a decryption key a start can use.

    Not revoked, and not past its validity at ``at``: what ``load_member_keys`` also
    needs of the roster (it then needs the key's file). Reads no private file.
    """
    if not any(
        k.member == member and k.use == "enc" and k.status != "revoked" and at <= k.valid_until
        for k in roster
    ):
        raise KeyMaterialError(f"{member} has no usable decryption key in the roster")


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
    current = current_signing_key(roster, member, at)
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
