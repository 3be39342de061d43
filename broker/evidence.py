"""Evidence of a received report: the envelope as it arrived, and its content key.

A node keeps every envelope it received (``Store.kept_envelope``). To show a
third party what a partner signed and sent it, ``msmt inbox evidence`` writes
that envelope with its content encryption key (RFC 7516 CEK), which decrypts
this one message and nothing else; the recipient's private key stays at home.
``check`` then verifies it as ``envelope.check_kept`` does: the originator's
signature with its roster key, every disclosure, schema and markings. The
envelope's SHA-256 is the ``jwe_sha256`` of the sender's ``sent`` and the
recipient's ``received`` audit entries, which ties the evidence to both logs.

The file is one JSON object (docs/AUDIT.md, "Evidence of a received report")::

    {"format": "msmt-evidence/v1", "recipient": "USA", "sender": "JPN",
     "report_id": "...", "received_at": "2026-...Z", "jwe": "<compact JWE>",
     "jwe_sha256": "<hex>", "cek": "<base64url, 32 bytes>"}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from joserfc.jwk import OKPKey

from broker import jose
from broker.envelope import MAX_ENVELOPE_BYTES, Received, check_kept
from broker.envelope_format import HDR_FROM, HDR_RID, parse_jwe
from broker.errors import EnvelopeError, InputError
from broker.roster import Roster
from broker.sdjwt import b64u_decode, b64u_encode

FORMAT: Final = "msmt-evidence/v1"
"""The ``format`` member of an evidence file."""

MAX_FILE_BYTES: Final = 2 * MAX_ENVELOPE_BYTES
"""The largest evidence file read: one envelope, its key and a few short members."""

_MEMBERS: Final = (
    "format",
    "recipient",
    "sender",
    "report_id",
    "received_at",
    "jwe",
    "jwe_sha256",
    "cek",
)


@dataclass(frozen=True, slots=True)
class Evidence:
    """One received envelope with its content key, and what the recipient says of it."""

    recipient: str
    sender: str
    report_id: str
    received_at: str
    jwe: str
    cek: bytes

    @property
    def jwe_sha256(self) -> str:
        """The hash both audit logs record for this envelope."""
        return hashlib.sha256(self.jwe.encode("ascii")).hexdigest()

    def to_json(self) -> str:
        """The evidence file's text."""
        return json.dumps(
            {
                "format": FORMAT,
                "recipient": self.recipient,
                "sender": self.sender,
                "report_id": self.report_id,
                "received_at": self.received_at,
                "jwe": self.jwe,
                "jwe_sha256": self.jwe_sha256,
                "cek": b64u_encode(self.cek),
            },
            indent=2,
        )


class KeyNotHeldError(EnvelopeError):
    """The key a kept envelope was encrypted to is not among this node's keys any more."""


def make(
    jwe: str, *, received_at: float, decryption_keys: Mapping[str, OKPKey], me: str
) -> Evidence:
    """Evidence for an envelope this node (``me``) received and kept.

    Raises ``KeyNotHeldError`` if this node no longer holds the key it was
    encrypted to (revoked since, or its file lost), ``EnvelopeError`` if the
    envelope does not open.
    """
    header, _ = parse_jwe(jwe, MAX_ENVELOPE_BYTES)
    key = decryption_keys.get(str(header.get("kid")))
    if key is None:
        kid = header.get("kid")
        raise KeyNotHeldError(
            "recipient",
            f"key {kid!r:.80} is not held here (revoked, or its file lost: keep retired"
            " keys, docs/KEYS.md): the envelope cannot be opened again",
        )
    private = key.raw_value
    if not isinstance(private, X25519PrivateKey):
        raise EnvelopeError("recipient", "the decryption key is not an X25519 private key")
    return Evidence(
        recipient=me,
        sender=str(header[HDR_FROM]),
        report_id=str(header[HDR_RID]),
        received_at=datetime.fromtimestamp(received_at, UTC).isoformat().replace("+00:00", "Z"),
        jwe=jwe,
        cek=jose.content_key(jwe, header, private),
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two readers of one file must not see two envelopes: a repeated member is refused.
    out = dict(pairs)
    if len(out) != len(pairs):
        raise InputError("a member appears twice")
    return out


def parse(raw: bytes) -> Evidence:
    """Read an evidence file's bytes; raise ``InputError`` naming what is wrong."""
    if len(raw) > MAX_FILE_BYTES:
        raise InputError(f"larger than {MAX_FILE_BYTES} bytes: not an evidence file")
    try:
        data: Any = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text") from None
    except RecursionError:
        raise InputError("not JSON an evidence file can be: nested too deeply") from None
    except ValueError:
        raise InputError("not JSON") from None
    if not isinstance(data, dict):
        raise InputError("not a JSON object")
    if data.get("format") != FORMAT:
        raise InputError(f'"format" is not {FORMAT!r}')
    if sorted(data) != sorted(_MEMBERS):
        raise InputError(f"members must be exactly {', '.join(_MEMBERS)}")
    wrong = [name for name in _MEMBERS if not isinstance(data[name], str)]
    if wrong:
        raise InputError(f"{wrong[0]!r} is not a string")
    try:
        cek = b64u_decode(data["cek"])
    except ValueError:
        raise InputError('"cek" is not base64url') from None
    evidence = Evidence(
        recipient=data["recipient"],
        sender=data["sender"],
        report_id=data["report_id"],
        received_at=data["received_at"],
        jwe=data["jwe"],
        cek=cek,
    )
    if not evidence.jwe.isascii() or evidence.jwe_sha256 != data["jwe_sha256"]:
        raise InputError('"jwe_sha256" is not the SHA-256 of "jwe"')
    return evidence


def check(evidence: Evidence, roster: Roster) -> Received:
    """Verify evidence; return what the originator signed and the recipient received.

    Checklist: (1) the envelope opens with the key given and passes every step
    of ``envelope.check_kept`` against ``roster``; (2) its authenticated header
    names the recipient, sender and report the file claims. Raises
    ``EnvelopeError`` at the first failure.
    """
    got = check_kept(evidence.jwe, evidence.cek, roster=roster)
    claimed = (evidence.recipient, evidence.sender, evidence.report_id)
    signed = (got.recipient, got.sender, got.report_id)
    for what, said, real in zip(("recipient", "sender", "report_id"), claimed, signed, strict=True):
        if said != real:
            raise EnvelopeError("evidence", f"the file's {what} is not the envelope's")
    return got


__all__ = ["FORMAT", "Evidence", "check", "make", "parse"]
