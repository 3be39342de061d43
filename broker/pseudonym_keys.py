"""Pseudonym keys on disk: ``<keys dir>/<MEMBER>/pseudonym/<key id>.key``.

A pseudonym key is the HMAC-SHA256 key of the ``pseudonym:<key id>`` transform
(``broker.transforms``): 32 random bytes, stored as one line of base64url, mode
0600 in a 0700 directory. The node reads it with ``broker.node_files.load_pseudonym_keys``.

Members that share a key id must hold the same bytes, or the same identifier gets
different pseudonyms from each of them. So one member creates the key and sends the
file itself, over a channel the two trust, to each partner the policy's
``[pseudonym_keys.<id>]`` lists; they import it. The SHA-256 fingerprint printed on
both sides lets them confirm over the phone that they hold the same key without
reading it out.

Keys are never overwritten by accident: replacing one changes every pseudonym made
with it, and partners still holding the old bytes silently stop matching.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
import secrets
from pathlib import Path
from typing import Final, Literal

from broker.errors import KeyMaterialError, UsageError, WriteError
from broker.files import read_file_bytes, write_durably
from broker.keys import is_nkey_seed
from broker.members import MEMBERS, is_member
from broker.transforms import Transform

KEY_BYTES: Final = 32
"""Bytes of a new key; also the least the node accepts (``load_pseudonym_keys``)."""

SUBDIR: Final = "pseudonym"
MAX_FILE_BYTES: Final = 4096
"""A key file is one line of about 45 bytes; anything much larger is not one."""

_B64URL: Final = re.compile(rb"[A-Za-z0-9_-]+={0,2}")

Outcome = Literal["created", "replaced", "unchanged"]


def key_file(keydir: Path, member: str, key_id: str) -> Path:
    """Return where ``member``'s pseudonym key ``key_id`` lives.

    Raises ``UsageError`` for an unknown member or a key id the policy file would
    refuse, so no command can create a key no policy can name.
    """
    if not is_member(member):
        raise UsageError(f"unknown member {member!r} (members: {', '.join(MEMBERS)})")
    if not key_id:
        raise UsageError("pseudonym key id is empty")
    try:
        # The policy file checks a declared key id with this same parse.
        Transform.parse(f"pseudonym:{key_id}")
    except ValueError as exc:
        raise UsageError(f"{exc} (got {key_id!r})") from None
    return keydir / member / SUBDIR / f"{key_id}.key"


def new_key() -> bytes:
    """Return a fresh pseudonym key: 32 bytes from ``secrets``."""
    return secrets.token_bytes(KEY_BYTES)


def encode(key: bytes) -> bytes:
    """The key file's bytes: base64url of the key and a newline."""
    return base64.urlsafe_b64encode(key) + b"\n"


def decode(data: bytes, where: str) -> bytes:
    """Parse a key file strictly; raise ``KeyMaterialError`` naming ``where`` if it is not one.

    Strict where the node's loader is lenient: an imported file must be exactly one
    base64url string of at least 32 bytes, so a truncated or mangled copy is refused
    rather than turned into a different key.
    """
    text = data.strip()
    if len(data) > MAX_FILE_BYTES or not _B64URL.fullmatch(text):
        raise KeyMaterialError(f"{where} is not a pseudonym key (one line of base64url)")
    if is_nkey_seed(text):
        # Its letters are base64url too, of 43 bytes: it would pass for a key, and the
        # import's copy be sent on to partners as the documented workflow says.
        raise KeyMaterialError(
            f"{where} is a NATS seed, not a pseudonym key: never copy or send it;"
            " a pseudonym key is made by msmt keys pseudonym without --from-file"
        )
    try:
        key = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise KeyMaterialError(f"{where} is not a pseudonym key (bad base64url length)") from None
    if len(key) < KEY_BYTES:
        raise KeyMaterialError(f"{where} holds {len(key)} bytes; a pseudonym key has at least 32")
    return key


def fingerprint(key: bytes) -> str:
    """``sha256:<hex>`` of the key bytes: safe to read out to a partner to compare keys."""
    return "sha256:" + hashlib.sha256(key).hexdigest()


def store_key(path: Path, key: bytes, *, replace: bool) -> Outcome:
    """Write ``key`` to ``path`` atomically (mode 0600, directory 0700).

    An existing key with the same bytes is left as it is (``unchanged``). A
    different existing key is replaced only with ``replace``, else ``UsageError``.
    Raises ``UsageError`` if the member's key directory does not exist (a wrong
    ``--dir``), or the file cannot be written.
    """
    if not path.parent.parent.is_dir():
        # A trial imported KOR's key at JPN as 'msmt keys pseudonym KOR ...': the key
        # goes under the member whose node uses it, the importer's own.
        raise UsageError(
            f"no key directory {path.parent.parent}: name the member whose node uses the"
            " key (to import a partner's key, your own member), or pass the right --dir"
        )
    try:
        existing: bytes | None = read_file_bytes(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise UsageError(f"cannot read existing {path}: {exc.strerror}") from None
    if existing is not None:
        with contextlib.suppress(KeyMaterialError):
            if decode(existing, str(path)) == key:
                return "unchanged"
        if not replace:
            raise UsageError(
                f"{path} already exists: replacing it changes every pseudonym made with it and "
                "partners holding the old key stop matching; pass --replace to do it anyway"
            )
    try:
        _write(path, encode(key), replace=replace)
    except FileExistsError:
        raise UsageError(f"{path} appeared while writing it; nothing was changed") from None
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror}") from None
    return "created" if existing is None else "replaced"


def _write(path: Path, data: bytes, *, replace: bool) -> None:
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.parent.chmod(0o700)
    # Not replacing links: a key written meanwhile is never clobbered.
    write_durably(path, data, replace=replace)
