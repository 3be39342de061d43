"""What a node reads from its files at start, besides its store and audit log.

The pinned signed roster, the member's private keys, the NATS seed, the TLS
files, the policy and its pseudonym keys: ``load_files`` reads and checks them
all and writes nothing, so ``msmt node check`` runs it beside a running node,
and ``broker.node_start.load_node`` runs it before anything else it opens. No
network client is imported here.
"""

from __future__ import annotations

import base64
import os
import ssl
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.config import NodeConfig
from broker.errors import ConfigError, KeyMaterialError
from broker.files import open_ancestor, read_file_bytes, read_file_text
from broker.keys import (
    NATS_USERS_FILE,
    MemberKeys,
    check_private_file,
    is_nkey_seed,
    load_member_keys,
    nats_public,
)
from broker.keys_roster import SignedRoster, load_pinned_roster
from broker.keys_users import NATS_USERS_SIG_FILE, load_signed_users
from broker.policy import Policy

PSEUDONYM_MIN_BYTES: Final = 32


@dataclass(frozen=True, slots=True)
class NodeFiles:
    """What a node reads from its files besides its store and audit log (``load_files``)."""

    signed: SignedRoster
    keys: MemberKeys
    signing: Ed25519PrivateKey
    seed: bytes
    tls: ssl.SSLContext | None
    policy: Policy
    policy_text: str
    pseudonym: dict[str, bytes]


def load_roster(config: NodeConfig) -> SignedRoster:
    """The node's roster as a start loads it (pinned authority, never older), not recorded.

    Only a start advances the pin. The roster is public: no private key is read.
    """
    return load_pinned_roster(
        config.roster_dir, config.authority_path, config.roster_state_path, record=False
    )


def load_files(config: NodeConfig, at: datetime) -> NodeFiles:
    """Read and check the roster, keys, NATS seed, TLS files, policy and pseudonym keys.

    Writes nothing: the roster is checked against the pinned state but not pinned
    (``load_node`` pins it once the whole start succeeded; ``msmt node check``
    never does). Raises ``MsmtError`` with one line for the first bad file.
    """
    # The pinned state file refuses a rolled-back roster and two rosters under one version.
    signed = load_roster(config)
    keys = load_member_keys(config.keys.dir, config.member, signed.roster, at)
    if config.nats.seed_file is not None:
        try:
            seed = read_file_bytes(config.nats.seed_file).strip()
        except OSError as exc:
            raise KeyMaterialError(f"cannot read {config.nats.seed_file}: {exc.strerror}") from None
        # Checked here, not at the hub: a file of junk passed node check, then ended
        # the running node with a UnicodeDecodeError naming no file (a bad-input sweep).
        nats_public(seed, f"nats.seed_file {config.nats.seed_file}")
    else:
        seed = keys.nats_seed
    # Built once, here: a bad CA, certificate or key stops the node before it connects.
    tls = config.nats.tls_context()
    policy, policy_text = config.read_policy()
    pseudonym = load_pseudonym_keys(config, policy)
    signing = keys.signing.private_key
    if not isinstance(signing, Ed25519PrivateKey):
        raise KeyMaterialError(f"{config.member}'s signing key is not a private Ed25519 key")
    return NodeFiles(signed, keys, signing, seed, tls, policy, policy_text, pseudonym)


def check_data_dir(data_dir: Path) -> None:
    """Raise ``ConfigError`` if ``data_dir`` is there but not a directory of the node's own.

    A regular file there passed ``node check`` ("none yet") and failed the start
    with "cannot create ...: File exists" (a bad-input sweep). One that another user
    owns, or that group or others may write to, would let them replace the store,
    the audit log or the intake tokens (a local user's review): a start makes it 0700.
    """
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"config key data_dir: {data_dir} is not a directory")
    above = open_ancestor(data_dir)
    if above is not None:
        # A second review: under a parent others may write, the folder itself can be
        # swapped while the node runs (its feeds file is read by path at each request).
        raise ConfigError(f"config key data_dir: {above}")
    if data_dir.is_dir():
        info = data_dir.stat()
        # Writable by its group passes: a umask of 002 makes that, for a group of one
        # user on most systems (a review ran the suite so); a start makes it 0700.
        if info.st_uid not in (os.geteuid(), 0) or info.st_mode & stat.S_IWOTH:
            raise ConfigError(
                f"config key data_dir: {data_dir} is not the node's own (owner uid"
                f" {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}): others could replace"
                " its store, audit log or tokens; make it the node user's, not writable by"
                " every user"
            )


def load_pseudonym_keys(config: NodeConfig, policy: Policy) -> dict[str, bytes]:
    """Load each pseudonym key the policy names from ``<keys.dir>/<MEMBER>/pseudonym/<id>.key``.

    A key file holds at least 32 random bytes, base64url; raises ``KeyMaterialError``
    if one is missing, short or open to other users, so a node never starts unable
    to apply its policy (or with a key others may have read).
    """
    out: dict[str, bytes] = {}
    for key_id in policy.pseudonym_keys:
        path = config.keys.dir / config.member / "pseudonym" / f"{key_id}.key"
        # No reason quotes the file: a decoding error's own text shows a byte of the key.
        try:
            text = read_file_text(path, "ascii").strip()
        except FileNotFoundError:
            raise KeyMaterialError(
                f"pseudonym key {key_id}: {path} is missing: make it with `msmt keys pseudonym"
                f" {config.member} {key_id} --dir {config.keys.dir}`, or import the copy a"
                " partner sent with --from-file (docs/KEYS.md)"
            ) from None
        except OSError as exc:
            raise KeyMaterialError(
                f"pseudonym key {key_id}: cannot read {path}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise KeyMaterialError(f"pseudonym key {key_id}: {path} is not ASCII text") from None
        try:
            key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            raise KeyMaterialError(f"pseudonym key {key_id}: {path} is not base64url") from None
        if len(key) < PSEUDONYM_MIN_BYTES:
            raise KeyMaterialError(f"pseudonym key {path} is shorter than 32 bytes")
        if is_nkey_seed(text.encode("ascii")):
            # Copied in by hand, or imported before the import refused seeds: it was
            # perhaps sent to partners too, and a NATS seed is the member's login.
            raise KeyMaterialError(
                f"pseudonym key {key_id}: {path} is a NATS seed, not a pseudonym key: put the"
                f" key {key_id}'s member made in its place (`msmt keys pseudonym {config.member}"
                f" {key_id} --dir {config.keys.dir} --from-file FILE --replace`), or declare a"
                " new key id; if this file was sent to anyone, rotate the NATS credentials"
                " (docs/KEYS.md)"
            )
        check_private_file(path, "pseudonym key")
        out[key_id] = key
    return out


def seed_listed(config: NodeConfig, seed: bytes) -> str:
    """``msmt node check``'s word on the NATS seed against the copies of the hub's users.

    A ``nats-users.json`` with its ``.jws`` beside the roster (or in the key
    directory: the custodian's folder holds both) that verifies with the pinned
    authority key says which key the hub lets in as this member; of two copies, the
    newer (``msmt_version``). A seed whose public key is not the one it lists gets a
    warning: the hub refuses it at connect, the only place a wrong seed showed, if
    its configuration is that version. Only a warning, and the check goes on: a start
    never reads the file, and a copy may be older than the hub's (a review: a copy
    left from before a ``--replace-nats-user`` failed the check of a right seed). A
    copy that does not verify is not compared (said so).
    """
    user = nats_public(seed, str(config.seed_path))
    # Anything by that name, not only a file: a FIFO, a device, a folder or a dangling
    # link there was "no nats-users.json", as if none were meant to be compared.
    present = [
        d
        for d in dict.fromkeys((config.roster_dir, config.keys.dir))
        if os.path.lexists(d / NATS_USERS_FILE)
    ]
    if not present:
        return f"user {user} (no {NATS_USERS_FILE} beside the roster to compare it with)"
    verified: list[tuple[int, Path, dict[str, str]]] = []
    unverified: list[str] = []
    for folder in present:
        try:
            signed = load_signed_users(folder, authority_path=config.authority_path)
        except KeyMaterialError as exc:
            unverified.append(f"{folder / NATS_USERS_FILE}, which does not verify: {exc}")
        else:
            verified.append((signed.version, folder / NATS_USERS_FILE, dict(signed.users)))
    if not verified:
        return f"user {user} (not compared with {'; nor '.join(unverified)})"
    # Besides what it says, anything that could make it wrong: a copy not compared,
    # and another of the same version that lists another key (two custodian folders).
    also = [f"; not compared with {u}" for u in unverified]
    version, path, users = max(verified, key=lambda v: v[0])
    listed = users.get(config.member)
    also += [
        f"; WARNING: {other} is version {version} too, but lists"
        f" {theirs.get(config.member) or 'no NATS user'} for {config.member}"
        for v, other, theirs in verified
        if v == version and other != path and theirs.get(config.member) != listed
    ]
    if listed == user:
        return f"user {user}, as {path} (version {version}) lists it" + "".join(also)
    if listed is None:
        why = (
            f"lists no NATS user for {config.member}, so a hub configured from it refuses"
            f" every seed of {config.member}'s: a member suspended, or whose key request is"
            " not accepted yet (docs/KEYS.md)"
        )
    else:
        why = (
            f"lists NATS user {listed} for {config.member}, so a hub configured from it"
            " refuses this seed (Authorization Violation): use the nats.nk the custodian"
            f" recorded (the one in the key directory {config.member}'s key request was made"
            f" in), or, if that copy is older than the hub's, get the current"
            f" {NATS_USERS_FILE} and {NATS_USERS_SIG_FILE} (docs/KEYS.md)"
        )
    return (
        f"user {user}; WARNING: {path} (version {version}, signed by the pinned authority)"
        f" {why}" + "".join(also)
    )
