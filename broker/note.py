"""C2SP ``signed-note`` with Ed25519 keys (pure): sign, parse, verify, and verifier keys.

A note is UTF-8 text ending in a newline, a blank line, then signature lines
``— <name> <base64(key ID || signature)>``. The key ID is
``SHA-256(name || 0x0A || type || public key)[:4]``: type ``0x01`` for plain
Ed25519 (the log's checkpoint signature) and ``0x04`` for timestamped Ed25519
cosignatures (c2sp.org/tlog-cosignature). Verifier keys are the Go ``note``
strings ``<name>+<hex key ID>+<base64(type || public key)>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import AuditError

ALG_ED25519: Final = 0x01
ALG_COSIGNATURE_V1: Final = 0x04
SIG_PREFIX: Final = "\u2014 "  # em dash, space
_CONTROL: Final = re.compile("[\x00-\x09\x0b-\x1f]")  # ASCII controls except newline
MAX_SIGNATURES: Final = 32
"""The spec asks verifiers to accept at least 16 signatures; more is refused as abuse."""
MAX_NOTE_BYTES: Final = 16384
"""A checkpoint with 32 signature lines is under 4 KiB; a note far larger is refused as such."""


class NoteError(AuditError):
    """A signed note is malformed, or no trusted signature on it verifies."""


def key_id(name: str, alg: int, public: bytes) -> bytes:
    """Return the 4-byte key ID ``SHA-256(name || 0x0A || alg || public)[:4]``."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public).digest()[:4]


EXCERPT_CHARS: Final = 24


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """Return ``text`` quoted for an error message: at most ``limit`` printable ASCII characters.

    Refusals reach the log and the node's status; a peer's bytes quoted there
    must not be long, nor carry control characters or look-alike text.
    """
    short = "".join(ch if " " <= ch <= "~" else "?" for ch in text[:limit])
    return repr(short + ("..." if len(text) > limit else ""))


def b64decode_strict(text: str) -> bytes | None:
    """Decode canonical padded standard base64, or return ``None`` if ``text`` is not that.

    ``base64.b64decode`` raises ``binascii.Error`` for bad base64 but a plain
    ``ValueError`` for a ``str`` with a non-ASCII character: both mean "not base64".
    It also ignores the spare low bits of a final partial group, so one value would
    have several spellings: a checkpoint's root spelt another way than its log wrote
    it would compare equal as bytes and unequal as text. Only the spelling that
    encoding gives back is taken.
    """
    if not text.isascii():
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        return None
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def check_key_name(name: str) -> None:
    """Raise ``NoteError`` unless ``name`` is a legal key name (non-empty, no spaces or ``+``)."""
    if not name or "+" in name or any(ch.isspace() for ch in name):
        # Not quoted: a signature line's name is whatever its publisher wrote.
        raise NoteError("invalid note key name (empty, or with a space or '+')")


@dataclass(frozen=True, slots=True)
class Verifier:
    """A trusted public key: name, signature type, and 32-byte Ed25519 key."""

    name: str
    alg: int
    public: bytes
    key_id: bytes = field(init=False, repr=False)
    """The 4-byte key ID this key's signature lines carry (derived, computed once)."""
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False, hash=False)
    # The parsed key, built once: a witness verifies every partner's checkpoints
    # and cosignatures with the same few verifiers. Derived from ``public``, so
    # it takes no part in equality or hashing.

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if self.alg not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise NoteError(f"unsupported signature type 0x{self.alg:02x} for {self.name}")
        if len(self.public) != 32:
            raise NoteError(f"Ed25519 key for {self.name} is {len(self.public)} bytes, not 32")
        # Verifying thousands of checkpoints looks the ID up for each one.
        object.__setattr__(self, "key_id", key_id(self.name, self.alg, self.public))
        try:
            parsed = Ed25519PublicKey.from_public_bytes(self.public)
        except ValueError as exc:
            raise NoteError(f"Ed25519 key for {self.name} is not a valid public key") from exc
        object.__setattr__(self, "_key", parsed)

    def verifies(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def vkey(self) -> str:
        """Return the verifier key string ``<name>+<hex id>+<base64(type || key)>``."""
        body = base64.b64encode(bytes([self.alg]) + self.public).decode()
        return f"{self.name}+{self.key_id.hex()}+{body}"

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise ``NoteError`` unless ``signature`` is this key's signature of ``message``."""
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            raise NoteError(f"signature by {self.name} does not verify") from None


def parse_vkey(text: str) -> Verifier:
    """Parse a verifier key string; raise ``NoteError`` naming what is wrong."""
    # Split at most twice: the base64 key itself may contain "+".
    parts = text.strip().split("+", 2)
    if len(parts) != 3:
        raise NoteError(f"verifier key {excerpt(text.strip())} is not <name>+<hex id>+<base64 key>")
    name, hex_id, b64 = parts
    raw = b64decode_strict(b64)
    try:
        want_id = bytes.fromhex(hex_id)
    except ValueError:
        raw = None
    if raw is None:
        raise NoteError(f"verifier key for {excerpt(name)} is not valid hex/base64")
    if len(raw) < 1:
        raise NoteError(f"verifier key for {excerpt(name)} has no key material")
    verifier = Verifier(name, raw[0], raw[1:])
    if verifier.key_id != want_id:
        raise NoteError(f"verifier key for {excerpt(name)}: key ID does not match the key")
    return verifier


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature line: key name, key ID, and the signature bytes after the ID."""

    name: str
    key_id: bytes
    sig: bytes

    def line(self) -> str:
        """Return the line ``— <name> <base64(id || sig)>`` with its newline."""
        return f"{SIG_PREFIX}{self.name} {base64.b64encode(self.key_id + self.sig).decode()}\n"


@dataclass(frozen=True, slots=True)
class Note:
    """A parsed signed note: its text (ending in a newline) and its signature lines."""

    text: str
    signatures: tuple[Signature, ...]

    def render(self) -> str:
        """Return the note in wire form: text, blank line, signature lines."""
        return self.text + "\n" + "".join(s.line() for s in self.signatures)

    def with_signatures(self, *extra: Signature) -> Note:
        """Return a copy with ``extra`` signatures appended, skipping exact duplicates."""
        sigs = list(self.signatures)
        sigs.extend(s for s in extra if s not in sigs)
        return Note(self.text, tuple(sigs))


def sign_ed25519(text: str, name: str, private: Ed25519PrivateKey) -> Signature:
    """Sign note ``text`` with a plain Ed25519 (type 0x01) key called ``name``."""
    check_text(text)
    public = private.public_key().public_bytes_raw()
    return Signature(name, key_id(name, ALG_ED25519, public), private.sign(text.encode()))


def check_text(text: str) -> None:
    """Raise ``NoteError`` unless ``text`` is legal note text (ends in newline, no controls)."""
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    if _CONTROL.search(text):
        raise NoteError("note text contains an ASCII control character")


def parse(data: bytes | str) -> Note:
    """Parse a signed note; raise ``NoteError`` naming the first malformed part.

    Only the syntax is checked here; ``verify`` decides which signatures count.
    """
    if len(data) > MAX_NOTE_BYTES:
        raise NoteError(f"signed note is over {MAX_NOTE_BYTES} bytes")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NoteError("signed note is not valid UTF-8") from exc
    if _CONTROL.search(data):
        raise NoteError("signed note contains an ASCII control character")
    # The text is separated from the signatures by the *last* blank line.
    split = data.rfind("\n\n")
    if split < 0 or not data.endswith("\n"):
        raise NoteError("signed note has no blank line before its signatures")
    text, sig_block = data[: split + 1], data[split + 2 :]
    # Lines end in "\n" alone: str.splitlines would also split at U+0085, U+2028
    # and U+2029, which C2SP's parsers (Go's note.Open) take as part of a line.
    lines = sig_block.split("\n")[:-1]
    if not lines:
        raise NoteError("signed note has no signature lines")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"signed note has more than {MAX_SIGNATURES} signatures")
    sigs = []
    for n, line in enumerate(lines, 1):
        if not line.startswith(SIG_PREFIX):
            raise NoteError(f"signature line {n} does not start with an em dash and a space")
        fields = line[len(SIG_PREFIX) :].split(" ")
        if len(fields) != 2:
            raise NoteError(f"signature line {n} is not '— <name> <signature>'")
        name, b64 = fields
        check_key_name(name)
        raw = b64decode_strict(b64)
        if raw is None:
            raise NoteError(f"signature line {n} is not valid base64")
        if len(raw) < 5:
            raise NoteError(f"signature line {n} is too short")
        sigs.append(Signature(name, raw[:4], raw[4:]))
    return Note(text, tuple(sigs))


def find_signatures(note: Note, verifier: Verifier) -> list[Signature]:
    """Return every signature line naming ``verifier`` (same name and key ID)."""
    return [s for s in note.signatures if s.name == verifier.name and s.key_id == verifier.key_id]


def find_signature(note: Note, verifier: Verifier) -> Signature | None:
    """Return the first signature line naming ``verifier``, if any."""
    found = find_signatures(note, verifier)
    return found[0] if found else None


def verify_ed25519(note: Note, verifier: Verifier) -> None:
    """Require a valid type-0x01 signature on ``note`` by ``verifier``.

    Checklist: 1. the key is a plain Ed25519 key; 2. a line with its name and
    key ID exists (others are ignored, per the spec); 3. that signature verifies
    over the exact note text. Each step raises ``NoteError``.
    """
    if verifier.alg != ALG_ED25519:
        raise NoteError(f"key {verifier.name} is not a plain Ed25519 note key")
    sigs = find_signatures(note, verifier)
    if not sigs:
        raise NoteError(f"note is not signed by {verifier.name} ({verifier.key_id.hex()})")
    # Every line claiming this key must verify: one bad line rejects the note.
    for sig in sigs:
        verifier.verify(note.text.encode(), sig.sig)
