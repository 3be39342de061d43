"""The custodian's operations with the roster authority's key: init, rotate, revoke.

The roster is written here (staged beside it, then swapped into place, and a
write cut short finished or undone), and each write is recorded in
``authority/roster-signed.json`` so that the custodian never signs over an older
roster. Reading and verifying the roster is ``broker.keys_roster``; the files
and keys themselves are ``broker.keys``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from joserfc.jwk import OKPKey

from broker.errors import KeyMaterialError, UsageError, WriteError
from broker.files import read_file_text, sync_folder
from broker.keys import (
    AUDIT_ACCOUNT,
    AUTHORITY_PRIVATE_FILE,
    AUTHORITY_PUBLIC_FILE,
    DEFAULT_VALID_DAYS,
    NATS_SEED_FILE,
    ROSTER_FILE,
    ROSTER_SIG_FILE,
    ROSTER_SIGNED_FILE,
    generate_key,
    json_bytes,
    key_path,
    load_authority,
    load_private_jwk_any,
    nats_public,
    new_nats_seed,
    put_in_place,
    read_json,
    roster_entry,
    stage,
    write_atomic,
)
from broker.keys_roster import (
    ROSTER_SIG_STAGED,
    ROSTER_STAGED,
    SignedRoster,
    load_signed_roster,
    roster_digest,
    sign_roster,
    verify_roster,
)
from broker.keys_users import load_users_for_update, write_nats_users
from broker.members import MEMBERS, is_member
from broker.roster import Roster, format_time


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
    put_in_place(stage(keydir / ROSTER_FILE, json_bytes(jwks), private=False), staged)
    try:
        signed = stage(keydir / ROSTER_SIG_FILE, (signature + "\n").encode(), private=False)
        put_in_place(signed, staged_sig)
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
        write_atomic(keydir / ROSTER_SIGNED_FILE, json_bytes(mark), private=True)
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
    # Unlike put_in_place, the file aside is kept on failure: once the roster
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
    key in ``keydir`` (its public file must be the private key's) and is newer than
    the pair in place (a roster in place with the signature aside counts as such a
    pair); otherwise, if the pair
    in place verifies, what was left aside is removed. Raises ``KeyMaterialError``,
    changing nothing, if neither verifies: an unsigned or mismatched roster is
    never put in place.
    """
    staged, staged_sig = keydir / ROSTER_STAGED, keydir / ROSTER_SIG_STAGED
    if not staged.exists() and not staged_sig.exists():
        return None
    # Checked against the private key, as load_for_update does: a key of another's under
    # the same kid in the public file verified a pair it left aside, which went into
    # place and moved the mark past the real roster for good (a review).
    _, authority = _authority_keys(keydir)
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
        if p.is_symlink() or (p.exists() and (not p.is_dir() or any(p.iterdir())))
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
        write_atomic(path, data, private=True)
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
    write_atomic(
        keydir / AUTHORITY_PRIVATE_FILE, json_bytes(authority.as_dict(private=True)), private=True
    )
    write_atomic(
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
    authority, _ = _authority_keys(keydir)
    _check_signed_before(keydir, signed)
    return signed, authority


def _authority_keys(keydir: Path) -> tuple[OKPKey, OKPKey]:
    """The authority's private key and its public file, refused unless they are one key."""
    path = keydir / AUTHORITY_PRIVATE_FILE
    authority = load_private_jwk_any(path)
    public = load_authority(keydir / AUTHORITY_PUBLIC_FILE)
    # The whole key, not its kid: another key under the same kid in the public file
    # would have verified a roster (or users) re-signed with it, which the real key
    # would then sign over (a review forged both).
    if authority.kid != public.kid or authority.thumbprint() != public.thumbprint():
        raise KeyMaterialError(f"{path} is not the key of {AUTHORITY_PUBLIC_FILE}")
    return authority, public


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
            write_atomic(path, json_bytes(key.as_dict(private=True)), private=True)
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


def suspend_member(
    keydir: Path, member: str, *, now: datetime | None = None
) -> tuple[list[str], int | None]:
    """Cut ``member`` off: drop its NATS user, then retire its active keys as of now.

    Retired, not revoked: what its keys signed before now still verifies (its shared
    reports, its log's checkpoints), while nothing new is encrypted to it, and nothing
    it signs from now is taken. No new keys are made: it comes back with a key request.
    The users are signed first, so that a failure between the two writes leaves it cut
    off at the hub, and the command run again finishes the roster. Returns the kids
    retired and the new ``nats-users.json`` version (None if it had no user there).
    Raises ``UsageError`` for an unknown member, or one already suspended.
    """
    if not is_member(member):
        raise UsageError(f"unknown member {member!r} (members: {', '.join(MEMBERS)})")
    signed, authority = load_for_update(keydir)
    users = load_users_for_update(keydir, authority)
    active = [k.kid for k in signed.roster if k.member == member and k.status == "active"]
    if not active and member not in users:
        raise UsageError(f"{member} is suspended already: it has no active key and no NATS user")
    version = None
    if member in users:
        version = write_nats_users(
            keydir, {a: u for a, u in users.items() if a != member}, authority
        )
    if active:
        at = now or _utcnow()
        keys = retire_active(signed.jwks["keys"], member, at)
        write_roster(keydir, bump_roster(signed, keys, at), authority)
    return active, version


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
