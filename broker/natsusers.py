"""NATS users outside key requests: the AUDIT account's, made where the auditor runs.

A member's NATS user travels in its key request (``broker.keyrequest``). The
``AUDIT`` account has no roster keys, so no request: the auditor makes its seed
with ``make_user`` (``msmt keys nats-user AUDIT``) and sends only the public
``U...`` key, which the custodian records with ``record_user`` (``msmt keys
accept-nats-user AUDIT U...``). This replaces NATS's own ``nk`` tool, which a
deployment may not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from broker import keys as keyfiles
from broker import keys_custodian, keys_users
from broker.errors import KeyMaterialError, UsageError


def _check_account(account: str) -> str:
    if account != keyfiles.AUDIT_ACCOUNT:
        raise UsageError(
            f"{account!r:.20}: only the AUDIT account's NATS user is made apart; a member's "
            "comes with its key request ('msmt keys request')"
        )
    return account


def load_users(keydir: Path) -> dict[str, str]:
    """Read ``nats-users.json`` strictly: its public nkeys by account (not its signature).

    For the custodian's own updates and a hint in ``msmt nats setup``; the hub's
    configuration reads it only through ``keys_users.load_signed_users``. Raises
    ``KeyMaterialError`` naming the file and account for anything malformed.
    """
    path = keydir / keyfiles.NATS_USERS_FILE
    return keys_users.split_users(keyfiles.read_json(path), path)[0]


def sign_users(keydir: Path) -> int:
    """Sign ``keydir``'s ``nats-users.json`` again, as its next version; return that.

    For a file written before msmt signed it, or a write cut short between the file
    and its signature. Raises ``KeyMaterialError`` as the custodian's other writes do
    (the roster does not verify, the authority's private key is not in order).
    """
    authority = keys_custodian.load_for_update(keydir)[1]
    return keys_users.write_nats_users(keydir, load_users(keydir), authority)


def make_user(keydir: Path, account: str) -> tuple[Path, str]:
    """Write a new NATS user seed to ``keydir/<account>/nats.nk`` (0600); return it and ``U...``.

    Raises ``UsageError`` for an account other than AUDIT and ``KeyMaterialError``
    if the seed file exists: it is never overwritten (the hub may know its user).
    """
    path = keydir / _check_account(account) / keyfiles.NATS_SEED_FILE
    if path.exists():
        raise KeyMaterialError(f"{path} already exists: {account} has a NATS user here")
    seed = keyfiles.new_nats_seed()
    keyfiles.write_private(path, seed + b"\n")
    return path, keyfiles.nats_public(seed, str(path))


@dataclass(frozen=True, slots=True)
class Recorded:
    """What ``record_user`` did to ``nats-users.json``."""

    path: Path
    outcome: Literal["added", "replaced", "unchanged"]
    version: int | None = None
    """The version signed, if the file was written."""


def record_user(keydir: Path, account: str, nkey: str, *, replace: bool = False) -> Recorded:
    """Set ``account``'s public nkey in ``keydir/nats-users.json``, signed as its next version.

    Raises ``UsageError`` for an account other than AUDIT, and ``KeyMaterialError``
    (nothing written) for a malformed key, one another account has, a different key
    already recorded for ``account`` unless ``replace``, or a roster or authority key
    the custodian could not sign with (``keys_custodian.load_for_update``).
    """
    _check_account(account)
    path = keydir / keyfiles.NATS_USERS_FILE
    nkey = keyfiles.check_nats_user(nkey.strip(), "the NATS user")
    authority = keys_custodian.load_for_update(keydir)[1]
    users = keys_users.load_users_for_update(keydir, authority)
    other = next((a for a, u in users.items() if u == nkey and a != account), None)
    if other is not None:
        raise KeyMaterialError(f"the NATS user is already {other}'s in {path}")
    previous = users.get(account)
    if previous == nkey:
        return Recorded(path, "unchanged")
    if previous is not None and not replace:
        raise KeyMaterialError(
            f"{path} already has another NATS user for {account}: pass --replace-nats-user to "
            "replace it (its seed then no longer logs in)"
        )
    version = keys_users.write_nats_users(keydir, users | {account: nkey}, authority)
    return Recorded(path, "added" if previous is None else "replaced", version)
