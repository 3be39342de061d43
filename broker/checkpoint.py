r"""C2SP ``tlog-checkpoint`` and ``tlog-cosignature`` v1, plus the audit NATS message bodies (pure).

A checkpoint body is ``<origin>\\n<size>\\n<base64 root>\\n``; the log signs it
as a signed note with its Ed25519 (type 0x01) key named after the origin (the
member trigraph). A witness adds a cosignature: a note signature of type 0x04
whose bytes are ``u64 timestamp (big-endian) || Ed25519 signature`` over
``cosignature/v1\\ntime <t>\\n`` followed by the checkpoint body.

Message bodies on NATS (wired by the transport, built and parsed here):

* ``msmt.audit.<MEMBER>.checkpoint``: the signed checkpoint note, UTF-8;
* ``msmt.audit.<MEMBER>.cosignature``: the checkpoint note carrying only the
  witness's cosignature line;
* ``msmt.audit.<MEMBER>.proof`` (request/reply): JSON ``{"old": m, "new": n}``
  answered by ``{"old": m, "new": n, "proof": [base64...]}`` (RFC 8785).
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.errors import AuditError
from broker.merkle import EMPTY_ROOT, HASH_SIZE
from broker.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    Note,
    NoteError,
    Signature,
    Verifier,
    b64decode_strict,
    check_key_name,
    excerpt,
    find_signature,
    find_signatures,
    key_id,
    parse,
    sign_ed25519,
    verify_ed25519,
)
from broker.roster import Roster

_SIZE_RE: Final = re.compile(r"0|[1-9][0-9]{0,19}")
MAX_TIMESTAMP: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A log's signed statement of its size and root hash."""

    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        r"""Return the checkpoint note text ``<origin>\\n<size>\\n<base64 root>\\n``."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"


def parse_body(text: str) -> Checkpoint:
    """Parse checkpoint note text; raise ``NoteError`` naming the bad line.

    Extension lines are refused: this log never writes them, so their presence
    means the note was not made by an MSMT node.
    """
    lines = text.split("\n")
    if len(lines) != 4 or lines[3] != "":
        raise NoteError("checkpoint must be exactly three lines: origin, size, root")
    origin, size_text, root_text = lines[:3]
    if not origin:
        raise NoteError("checkpoint origin line is empty")
    if not _SIZE_RE.fullmatch(size_text) or int(size_text) >= 2**64:
        raise NoteError("checkpoint size is not a decimal without leading zeros, below 2^64")
    root = b64decode_strict(root_text)
    if root is None:
        raise NoteError("checkpoint root hash is not valid base64")
    if len(root) != HASH_SIZE:
        raise NoteError(f"checkpoint root hash is {len(root)} bytes, not {HASH_SIZE}")
    if size_text == "0" and root != EMPTY_ROOT:
        # RFC 9162 2.1.1: the empty tree has one root. Two roots at size 0 would
        # be a fork that no consistency proof can show (there is none from 0).
        raise NoteError("checkpoint of size 0 has a root other than the empty tree's")
    return Checkpoint(origin, int(size_text), root)


def sign_checkpoint(checkpoint: Checkpoint, private: Ed25519PrivateKey) -> Note:
    """Return the checkpoint as a note signed by the log key named after its origin."""
    check_key_name(checkpoint.origin)
    text = checkpoint.body()
    return Note(text, (sign_ed25519(text, checkpoint.origin, private),))


class UntrustedSignerError(NoteError):
    """No key trusted for the checkpoint's log signed it (e.g. a roster update not loaded)."""


def open_checkpoint(data: bytes | str, log_keys: Iterable[Verifier]) -> tuple[Checkpoint, Note]:
    """Parse and verify a signed checkpoint; raise ``NoteError`` on any failure.

    Checklist: 1. the note parses; 2. its body is a well-formed checkpoint;
    3. at least one trusted log key named after the origin has signed it, and
    every such signature present verifies (a failing known key rejects the note).
    """
    note = parse(data)
    checkpoint = parse_body(note.text)
    keys = [k for k in log_keys if k.name == checkpoint.origin and k.alg == ALG_ED25519]
    present = [k for k in keys if find_signature(note, k) is not None]
    if not present:
        raise UntrustedSignerError(
            f"checkpoint for {checkpoint.origin} has no signature by a trusted log key"
        )
    for verifier in present:
        verify_ed25519(note, verifier)
    return checkpoint, note


def cosignature_message(body: str, timestamp: int) -> bytes:
    """Return the tlog-cosignature v1 signed message for checkpoint ``body`` at ``timestamp``."""
    return f"cosignature/v1\ntime {timestamp}\n{body}".encode()


def cosign(note: Note, name: str, private: Ed25519PrivateKey, timestamp: int) -> Signature:
    """Return a witness's type-0x04 cosignature line for the checkpoint in ``note``."""
    check_key_name(name)
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise AuditError(f"cosignature timestamp {timestamp} out of range")
    public = private.public_key().public_bytes_raw()
    sig = private.sign(cosignature_message(note.text, timestamp))
    return Signature(
        name, key_id(name, ALG_COSIGNATURE_V1, public), struct.pack(">Q", timestamp) + sig
    )


def verify_cosignature(note: Note, witness: Verifier) -> int:
    """Return the timestamp of ``witness``'s valid cosignature on ``note``.

    Checklist: 1. the key is a cosignature (0x04) key; 2. a line with its name
    and key ID exists; 3. it is 8 + 64 bytes; 4. the timestamp fits in 63 bits;
    5. the signature verifies over the v1 message. Each step raises ``NoteError``.
    """
    if witness.alg != ALG_COSIGNATURE_V1:
        raise NoteError(f"key {witness.name} is not a cosignature key")
    sigs = find_signatures(note, witness)
    if not sigs:
        raise NoteError(f"checkpoint has no cosignature by {witness.name}")
    # Every line claiming this key must verify: one bad line rejects the note.
    stamps = [_check_cosignature(note, witness, sig) for sig in sigs]
    return max(stamps)


def _check_cosignature(note: Note, witness: Verifier, sig: Signature) -> int:
    if len(sig.sig) != 8 + 64:
        raise NoteError(f"cosignature by {witness.name} is {len(sig.sig)} bytes, not 72")
    (timestamp,) = struct.unpack(">Q", sig.sig[:8])
    if timestamp > MAX_TIMESTAMP:
        raise NoteError(f"cosignature by {witness.name} has an out-of-range timestamp")
    witness.verify(cosignature_message(note.text, timestamp), sig.sig[8:])
    return int(timestamp)


def count_cosignatures(note: Note, witnesses: Sequence[Verifier]) -> list[str]:
    """Return the names of distinct witnesses whose cosignature on ``note`` verifies.

    A present but invalid cosignature from a trusted witness raises ``NoteError``
    (the spec says to reject such a note) rather than silently not counting.
    """
    names: list[str] = []
    for witness in witnesses:
        if find_signature(note, witness) is None:
            continue
        verify_cosignature(note, witness)
        if witness.name not in names:
            names.append(witness.name)
    return names


def _raw_public(jwk: Any) -> bytes:
    x = jwk.get("x", "")
    return base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))


def roster_log_keys(roster: Roster, member: str, *, with_revoked: bool = False) -> list[Verifier]:
    """Return ``member``'s checkpoint-signing keys from the roster (its Ed25519 ``sig`` keys).

    Revoked keys are left out: a checkpoint they sign is never trusted again.
    ``with_revoked`` keeps them for one check only, a node's look at its own log
    file at start (``broker.node_start.load_node``), which asks whether the file is
    intact, not whether a partner should trust it.
    """
    return [
        Verifier(member, ALG_ED25519, _raw_public(k.jwk))
        for k in roster
        if k.member == member and k.use == "sig" and (with_revoked or k.status != "revoked")
    ]


def roster_revoked_log_keys(roster: Roster, member: str) -> list[Verifier]:
    """Return ``member``'s revoked checkpoint-signing keys.

    ``verify_log`` trusts them for no checkpoint on its own: only for earlier
    ones that a later checkpoint, signed by a trusted key, covers.
    """
    return [
        Verifier(member, ALG_ED25519, _raw_public(k.jwk))
        for k in roster
        if k.member == member and k.use == "sig" and k.status == "revoked"
    ]


def roster_witness_keys(roster: Roster, members: Iterable[str]) -> list[Verifier]:
    """Return the cosignature (0x04) keys of ``members``: their non-revoked Ed25519 ``sig`` keys."""
    wanted = set(members)
    return [
        Verifier(k.member, ALG_COSIGNATURE_V1, _raw_public(k.jwk))
        for k in roster
        if k.member in wanted and k.use == "sig" and k.status != "revoked"
    ]


def proof_request(old: int, new: int) -> bytes:
    """Build the ``msmt.audit.<MEMBER>.proof`` request body."""
    return rfc8785.dumps({"new": new, "old": old})


MAX_PROOF_REQUEST: Final = 1024
"""A request is two sizes (about 60 bytes); anything much longer is not one."""
MAX_PROOF_RESPONSE: Final = 16384
"""A consistency proof holds at most about 128 hashes (about 6 KiB as JSON)."""
_MAX_DIGITS: Final = 20  # 2**64 - 1 has 20 digits


def _load_object(data: bytes, what: str, limit: int) -> dict[str, Any]:
    """Parse a flat JSON object sent by a peer; raise ``AuditError`` for anything else.

    Checklist: 1. at most ``limit`` bytes; 2. JSON, nested less deeply than the
    interpreter's recursion limit (``json`` raises ``RecursionError`` past it);
    3. no key twice (``json`` would keep the last, so two readers could
    disagree); 4. no integer longer than a size can be (``int`` refuses over
    4300 digits with a ``ValueError``, and is slow well before that); 5. an object.
    """
    if len(data) > limit:
        raise AuditError(f"{what} is {len(data)} bytes, more than {limit}")

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):
            raise AuditError(f"{what} has a duplicate key")
        return obj

    def integer(text: str) -> int:
        if len(text.lstrip("-")) > _MAX_DIGITS:
            raise AuditError(f"{what} has an integer of more than {_MAX_DIGITS} digits")
        return int(text)

    try:
        value = json.loads(data, object_pairs_hook=pairs, parse_int=integer)
    except RecursionError:
        raise AuditError(f"{what} is nested too deeply") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AuditError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise AuditError(f"{what} is not a JSON object")
    return value


def _size(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise AuditError(f"{what} must be an integer from 0 to 2^64 - 1")
    return value


def parse_proof_request(data: bytes) -> tuple[int, int]:
    """Parse a proof request into ``(old, new)``; raise ``AuditError`` if malformed."""
    obj = _load_object(data, "proof request", MAX_PROOF_REQUEST)
    if set(obj) != {"old", "new"}:
        raise AuditError("proof request must have exactly 'old' and 'new'")
    return _size(obj["old"], "proof request 'old'"), _size(obj["new"], "proof request 'new'")


def proof_response(old: int, new: int, proof: Sequence[bytes]) -> bytes:
    """Build the proof reply body carrying a consistency proof from ``old`` to ``new``."""
    return rfc8785.dumps(
        {"new": new, "old": old, "proof": [base64.b64encode(h).decode() for h in proof]}
    )


def parse_proof_response(data: bytes) -> tuple[int, int, list[bytes]]:
    """Parse a proof reply into ``(old, new, proof)``; raise ``AuditError`` if malformed."""
    obj = _load_object(data, "proof response", MAX_PROOF_RESPONSE)
    if set(obj) == {"error"} and isinstance(obj["error"], str):
        # The documented refusal (docs/AUDIT.md): the log's own reason, quoted short.
        raise AuditError(f"the log answered with an error: {excerpt(obj['error'], 120)}")
    if set(obj) != {"old", "new", "proof"} or not isinstance(obj["proof"], list):
        raise AuditError("proof response must have 'old', 'new' and a 'proof' list")
    proof = []
    for i, item in enumerate(obj["proof"]):
        raw = b64decode_strict(item) if isinstance(item, str) else b""
        if raw is None:
            raise AuditError(f"proof hash {i} is not valid base64")
        if len(raw) != HASH_SIZE:
            raise AuditError(f"proof hash {i} is not a base64 32-byte hash")
        proof.append(raw)
    return _size(obj["old"], "proof 'old'"), _size(obj["new"], "proof 'new'"), proof
