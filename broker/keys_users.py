"""The signed ``nats-users.json``: each account's NATS user, signed by the roster authority.

What the hub's configuration grants a login to each account rests on this file:
``write_nats_users`` signs each change one version higher, as the roster is
signed (``broker.keys_roster``), and ``load_signed_users`` verifies it against the
pinned authority before ``msmt nats config`` writes anything from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import rfc8785
from joserfc.jwk import OKPKey

from broker.errors import KeyMaterialError, WriteError
from broker.keys import (
    NATS_USERS_FILE,
    check_nats_user,
    json_bytes,
    put_in_place,
    read_json,
    stage,
    write_atomic,
)
from broker.keys_roster import pinned_authority, read_signature, sign_detached, verify_detached
from broker.note import excerpt

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
            signature = read_signature(sig_path, "")
            verify_detached(str(path), data, signature, authority, NATS_USERS_JWS_TYP, "")
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
    signature = sign_detached(data, authority, NATS_USERS_JWS_TYP)
    staged = stage(sig_path, (signature + "\n").encode(), private=False)
    try:
        write_atomic(path, json_bytes(data), private=False)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    put_in_place(staged, sig_path)
    mark = {"version": previous + 1, "sha256": users_digest(data)}
    try:
        write_atomic(keydir / NATS_USERS_SIGNED_FILE, json_bytes(mark), private=True)
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
    authority, pin = pinned_authority(
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
        signature = read_signature(sig_path, "")
    except KeyMaterialError as exc:
        raise KeyMaterialError(f"{exc} (the custodian sends it with {path.name})") from None
    verify_detached(str(path), data, signature, authority, NATS_USERS_JWS_TYP, str(pin))
    return SignedUsers(
        users=users, version=version, signer=str(authority.kid), thumbprint=authority.thumbprint()
    )
