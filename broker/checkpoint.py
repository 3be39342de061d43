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
* ``msmt.audit.<MEMBER>.proof`` (request/reply): JSON ``{"old": m, "new": n,
  "nonce": base64}`` answered by ``{"log", "new", "nonce", "old", "proof": [base64...],
  "sig", "size"}`` (RFC 8785), signed by the log's key, or by a refusal: signed
  ``{"error", "log", "nonce", "sig", "size"}``, or ``{"error"}`` for a request that
  could not be read. The signature lets a witness tell the log's own word (evidence
  of a fork or rollback) from a reply made up on the way (the hub's).
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


PROOF_REPLY_CONTEXT: Final = b"msmt-proof-reply/v1\n"
"""What a proof reply's signature covers starts with this, then the reply's RFC 8785
form without ``sig``: no checkpoint or cosignature text starts so, so the log key's
signature on a reply can never pass for one on a note."""
NONCE_BYTES: Final = 16


def proof_request(old: int, new: int, nonce: bytes) -> bytes:
    """Build the ``msmt.audit.<MEMBER>.proof`` request body; ``nonce`` makes the reply fresh.

    An empty ``nonce`` builds the request of versions before signed replies
    (``{"new", "old"}``), which such a log answers with an unsigned proof.
    """
    if not nonce:
        return rfc8785.dumps({"new": new, "old": old})
    return rfc8785.dumps({"new": new, "nonce": base64.b64encode(nonce).decode(), "old": old})


EARLIER_REQUEST_REFUSAL: Final = "proof request must have exactly 'old' and 'new'"
"""How a log of a version before signed replies refuses a request that carries a nonce."""


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


MAX_LOG_SIZE: Final = 2**53 - 1
"""The largest log size a node answers or asks a proof for, or cosigns: RFC 8785 JSON's
largest integer, in which its signed replies and its witness state are written (a review
sent a proof request up to 2^64 - 1, whose signed refusal then failed)."""


def _size(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOG_SIZE:
        raise AuditError(f"{what} must be an integer from 0 to 2^53 - 1")
    return value


def parse_proof_request(data: bytes) -> tuple[int, int, bytes]:
    """Parse a proof request into ``(old, new, nonce)``; raise ``AuditError`` if malformed.

    A request without a nonce (exactly ``old`` and ``new``) is a witness of a
    version before signed replies: its nonce is ``b""``, and it is answered in
    that version's unsigned form (``unsigned_proof_response``).
    """
    obj = _load_object(data, "proof request", MAX_PROOF_REQUEST)
    if set(obj) not in ({"old", "new", "nonce"}, {"old", "new"}):
        raise AuditError("proof request must have exactly 'old', 'new' and 'nonce'")
    return (
        _size(obj["old"], "proof request 'old'"),
        _size(obj["new"], "proof request 'new'"),
        _nonce(obj["nonce"], "proof request 'nonce'") if "nonce" in obj else b"",
    )


def proof_response(
    log: str,
    old: int,
    new: int,
    proof: Sequence[bytes],
    *,
    size: int,
    nonce: bytes,
    signer: Ed25519PrivateKey,
) -> bytes:
    """The log's signed reply carrying a consistency proof from ``old`` to ``new``.

    ``size`` is the log's size as it answers; ``nonce`` the request's.
    """
    body = {
        "log": log,
        "new": new,
        "nonce": base64.b64encode(nonce).decode(),
        "old": old,
        "proof": [base64.b64encode(h).decode() for h in proof],
        "size": size,
    }
    return _signed(body, signer)


def proof_refusal(
    log: str,
    old: int,
    new: int,
    reason: str,
    *,
    size: int,
    nonce: bytes,
    signer: Ed25519PrivateKey,
) -> bytes:
    """The log's signed refusal of a request for ``old`` to ``new``: ``reason`` says why.

    ``size`` is the log's size as it answers. The sizes asked are signed too, so
    that a refusal of other sizes, asked on the way with this nonce, cannot pass
    for a refusal of these.
    """
    body = {
        "error": reason[:200],
        "log": log,
        "new": new,
        "nonce": base64.b64encode(nonce).decode(),
        "old": old,
        "size": size,
    }
    return _signed(body, signer)


def unsigned_proof_response(old: int, new: int, proof: Sequence[bytes]) -> bytes:
    """The reply of versions before signed replies: only the proof, for a witness of one.

    It is evidence of nothing against the log: a witness cosigns if it verifies,
    and raises no alarm if it does not, as for any unsigned reply.
    """
    return rfc8785.dumps(
        {"new": new, "old": old, "proof": [base64.b64encode(h).decode() for h in proof]}
    )


def _signed(body: dict[str, Any], signer: Ed25519PrivateKey) -> bytes:
    sig = signer.sign(PROOF_REPLY_CONTEXT + rfc8785.dumps(body))
    return rfc8785.dumps({**body, "sig": base64.b64encode(sig).decode()})


@dataclass(frozen=True, slots=True)
class ProofReply:
    """A parsed proof reply: a proof (``error`` None) or a refusal, signed or not."""

    error: str | None
    old: int | None = None
    new: int | None = None
    proof: tuple[bytes, ...] = ()
    log: str | None = None
    size: int | None = None
    nonce: bytes | None = None
    sig: bytes | None = None
    signed_text: bytes = b""

    def signed_by(self, log: str, nonce: bytes, keys: Iterable[Verifier]) -> bool:
        """Whether ``log``'s key signed this reply to the request that carried ``nonce``."""
        if self.sig is None or self.log != log or self.nonce != nonce:
            return False
        return any(k.verifies(self.signed_text, self.sig) for k in keys)


_PROOF_KEYS: Final = frozenset({"log", "new", "nonce", "old", "proof", "sig", "size"})
_REFUSAL_KEYS: Final = frozenset({"error", "log", "new", "nonce", "old", "sig", "size"})
_UNSIGNED_PROOF_KEYS: Final = frozenset({"new", "old", "proof"})


def parse_proof_response(data: bytes) -> ProofReply:
    """Parse a proof reply; raise ``AuditError`` if malformed. Its signature is not checked here.

    Checklist: 1. a flat JSON object (``_load_object``); 2. exactly the members of
    a proof, of a signed refusal, of an unsigned proof (``old``, ``new``,
    ``proof``: a log of a version before signed replies), or only ``error``;
    3. each member well-typed: sizes, a canonical base64 nonce of 16 bytes and
    signature of 64, 32-byte proof hashes, the log a member's name.
    """
    obj = _load_object(data, "proof response", MAX_PROOF_RESPONSE)
    keys = set(obj)
    if keys == {"error"} and isinstance(obj["error"], str):
        return ProofReply(error=obj["error"])
    if keys == _UNSIGNED_PROOF_KEYS:
        return ProofReply(
            error=None,
            old=_size(obj["old"], "proof 'old'"),
            new=_size(obj["new"], "proof 'new'"),
            proof=_proof_hashes(obj["proof"]),
        )
    if keys not in (_PROOF_KEYS, _REFUSAL_KEYS):
        raise AuditError(
            "proof response must hold exactly the members of a proof, of a refusal,"
            " or only 'error' (docs/AUDIT.md)"
        )
    log = obj["log"]
    if not isinstance(log, str) or not re.fullmatch(r"[A-Z]{3}", log):
        raise AuditError("proof response 'log' must be a member's name")
    sig = _b64(obj["sig"], "proof response 'sig'", 64)
    fields: dict[str, Any] = {
        "log": log,
        "old": _size(obj["old"], "proof 'old'"),
        "new": _size(obj["new"], "proof 'new'"),
        "size": _size(obj["size"], "proof response 'size'"),
        "nonce": _nonce(obj["nonce"], "proof response 'nonce'"),
        "sig": sig,
    }
    if keys == _REFUSAL_KEYS and not isinstance(obj["error"], str):
        raise AuditError("proof response 'error' must be a string")
    if keys == _PROOF_KEYS and not isinstance(obj["proof"], list):
        raise AuditError("proof response must have a 'proof' list")
    try:
        # Only now: every member is of its type. RFC 8785 takes integers up to 2^53
        # and strings without lone surrogates; beyond, no log of ours signed it.
        fields["signed_text"] = PROOF_REPLY_CONTEXT + rfc8785.dumps(
            {k: obj[k] for k in keys - {"sig"}}
        )
    except rfc8785.CanonicalizationError as exc:
        raise AuditError(f"proof response cannot be put in RFC 8785 form ({exc})") from None
    if keys == _REFUSAL_KEYS:
        return ProofReply(error=obj["error"], **fields)
    return ProofReply(error=None, proof=_proof_hashes(obj["proof"]), **fields)


def _proof_hashes(value: object) -> tuple[bytes, ...]:
    if not isinstance(value, list):
        raise AuditError("proof response must have a 'proof' list")
    proof = []
    for i, item in enumerate(value):
        raw = b64decode_strict(item) if isinstance(item, str) else b""
        if raw is None:
            raise AuditError(f"proof hash {i} is not valid base64")
        if len(raw) != HASH_SIZE:
            raise AuditError(f"proof hash {i} is not a base64 32-byte hash")
        proof.append(raw)
    return tuple(proof)


def _b64(value: object, what: str, length: int) -> bytes:
    raw = b64decode_strict(value) if isinstance(value, str) else None
    if raw is None or len(raw) != length:
        raise AuditError(f"{what} must be {length} bytes in canonical base64")
    return raw


def _nonce(value: object, what: str) -> bytes:
    return _b64(value, what, NONCE_BYTES)
