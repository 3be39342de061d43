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
from broker.errors import KeyMaterialError, UsageError
from broker.note import excerpt


def _check_account(account: str) -> str:
    if account != keyfiles.AUDIT_ACCOUNT:
        raise UsageError(
            f"{account!r:.20}: only the AUDIT account's NATS user is made apart; a member's "
            "comes with its key request ('msmt keys request')"
        )
    return account


def load_users(keydir: Path) -> dict[str, str]:
    """Read ``nats-users.json`` strictly: an object of NATS user public nkeys, by account.

    Raises ``KeyMaterialError`` naming the file and account otherwise: ``msmt nats
    config`` wrote a mistyped nkey into the hub's configuration, which nats-server
    then refused to load, naming only its own line.
    """
    path = keydir / keyfiles.NATS_USERS_FILE
    data = keyfiles.read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise KeyMaterialError(f"{path} is not a JSON object of public nkeys")
    for account, nkey in data.items():
        keyfiles.check_nats_user(nkey, f"{path}: the user of {excerpt(account)}")
    return data


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


def record_user(keydir: Path, account: str, nkey: str, *, replace: bool = False) -> Recorded:
    """Set ``account``'s public nkey in ``keydir/nats-users.json`` (written atomically).

    Raises ``UsageError`` for an account other than AUDIT, and ``KeyMaterialError``
    (nothing written) for a malformed key, one another account has, or a different
    key already recorded for ``account`` unless ``replace``.
    """
    _check_account(account)
    path = keydir / keyfiles.NATS_USERS_FILE
    nkey = keyfiles.check_nats_user(nkey.strip(), "the NATS user")
    users = load_users(keydir)
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
    keyfiles.write_public(path, keyfiles.json_bytes(users | {account: nkey}))
    return Recorded(path, "added" if previous is None else "replaced")
