"""Our one JOSE profile, implemented directly on ``cryptography``'s primitives.

The envelope encrypts with exactly one JWE profile: compact serialisation
(RFC 7516 §7.1), ``alg`` ``ECDH-ES+A256KW`` (RFC 7518 §4.6) with X25519
(RFC 8037 §3.2), ``enc`` ``A256GCM`` (RFC 7518 §5.3). A general JOSE library
spends most of its time on what a fixed profile does not need (algorithm
registries, key-type guessing, header and key objects); here each operation is
the primitives plus the serialisation the RFCs prescribe. ``tests/test_jose.py``
holds this module to the RFC 8037 and RFC 7518 vectors and to joserfc and
jwcrypto in both directions. joserfc still handles JWKs (key files, roster) and
the one Ed25519 JWS per report, where a direct call saved nothing measurable.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from broker.errors import EnvelopeError, UsageError
from broker.sdjwt import b64u_decode, b64u_encode

ALG: Final = "ECDH-ES+A256KW"
ENC: Final = "A256GCM"
CEK_BYTES: Final = 32  # A256GCM key (RFC 7518 §5.3)
WRAPPED_BYTES: Final = CEK_BYTES + 8  # AES Key Wrap adds one 64-bit block (RFC 3394 §2.2.1)
IV_BYTES: Final = 12  # 96-bit GCM IV (RFC 7518 §5.3)
TAG_BYTES: Final = 16  # 128-bit GCM tag (RFC 7518 §5.3)
X25519_BYTES: Final = 32  # RFC 7748 §5
_STEP: Final = "decrypt"
# Header members whose meaning this profile does not implement: compression
# (RFC 7516 §4.1.3) and critical extensions (RFC 7515 §4.1.11, which must be
# understood or the JWE rejected).
_UNSUPPORTED: Final = ("zip", "crit")


# Compact, ASCII-only and in the given order: the serialisation joserfc uses.
# Built once: json.dumps with non-default arguments builds an encoder per call.
_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def _json_b64(value: Mapping[str, Any]) -> str:
    return b64u_encode(_JSON.encode(value).encode("ascii"))


def _length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def concat_kdf(z: bytes, algorithm_id: str, bits: int, apu: bytes = b"", apv: bytes = b"") -> bytes:
    """RFC 7518 §4.6.2: the Concat KDF (NIST SP 800-56A §5.8.1) with SHA-256.

    ``algorithm_id`` is the ``alg`` value for key agreement with key wrapping
    (the ``enc`` value for direct agreement), ``bits`` the derived key length.
    Raises ``ValueError`` for a length this single-round form does not cover
    (multiples of 8 up to 256: every AES key).
    """
    if not (0 < bits <= 256 and bits % 8 == 0):
        raise ValueError(f"derived key length {bits} bits is not 8-256 in whole bytes")
    other_info = (
        _length_prefixed(algorithm_id.encode("ascii"))
        + _length_prefixed(apu)
        + _length_prefixed(apv)
        + bits.to_bytes(4, "big")  # SuppPubInfo: keydatalen; SuppPrivInfo is empty
    )
    # One round (counter 1) yields 256 bits, enough for any AES key.
    return hashlib.sha256(b"\x00\x00\x00\x01" + z + other_info).digest()[: bits // 8]


# The KDF input after Z for our profile without apu/apv, computed once.
_OTHER_INFO: Final = (
    _length_prefixed(ALG.encode("ascii")) + _length_prefixed(b"") * 2 + (256).to_bytes(4, "big")
)


def _kek(z: bytes, header: Mapping[str, Any]) -> bytes:
    if "apu" not in header and "apv" not in header:
        return hashlib.sha256(b"\x00\x00\x00\x01" + z + _OTHER_INFO).digest()
    apu, apv = header.get("apu", ""), header.get("apv", "")
    if type(apu) is not str or type(apv) is not str:
        raise ValueError("apu and apv must be base64url strings")
    return concat_kdf(z, ALG, 256, b64u_decode(apu), b64u_decode(apv))


def seal(header: Mapping[str, Any], plaintext: bytes, recipient: X25519PublicKey) -> str:
    """Encrypt ``plaintext`` to ``recipient`` as a compact JWE with ``header`` protected.

    ``header`` must carry ``alg`` ``ECDH-ES+A256KW`` and ``enc`` ``A256GCM``
    and no ``epk`` (a fresh ephemeral key is added); other members are kept in
    order, and ``apu``/``apv`` (base64url) enter the KDF if present. Raises
    ``UsageError`` for any other header: we never emit a header that misstates
    the algorithms or asks for what we do not implement.
    """
    if header.get("alg") != ALG or header.get("enc") != ENC:
        raise UsageError(f"a JWE header must have alg {ALG} and enc {ENC}")
    if "epk" in header or any(name in header for name in _UNSUPPORTED):
        raise UsageError("a JWE header to seal must not carry epk, zip or crit")
    # RFC 7518 §4.6: a fresh ephemeral key per message; its public half is the
    # epk header member, an OKP JWK with public parameters only (RFC 8037 §2).
    ephemeral = X25519PrivateKey.generate()
    x = b64u_encode(ephemeral.public_key().public_bytes_raw())
    protected = _json_b64({**header, "epk": {"crv": "X25519", "kty": "OKP", "x": x}})
    try:
        kek = _kek(ephemeral.exchange(recipient), header)
    except ValueError as exc:  # a low-order recipient key, or malformed apu/apv
        raise UsageError(f"cannot agree a key with this recipient ({exc})") from None
    # RFC 7516 §5.1: random CEK and IV; the AAD is the ASCII of the encoded
    # protected header; cryptography appends the 128-bit tag to the ciphertext.
    random = os.urandom(CEK_BYTES + IV_BYTES)  # one system call for both
    cek, iv = random[:CEK_BYTES], random[CEK_BYTES:]
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return ".".join(
        (
            protected,
            b64u_encode(aes_key_wrap(kek, cek)),
            b64u_encode(iv),
            b64u_encode(sealed[:-TAG_BYTES]),
            b64u_encode(sealed[-TAG_BYTES:]),
        )
    )


def _fail(reason: str) -> EnvelopeError:
    return EnvelopeError(_STEP, reason)


def _segment(text: str, what: str, size: int | None = None) -> bytes:
    try:
        data = b64u_decode(text)
    except ValueError:
        raise _fail(f"the {what} is not canonical base64url") from None
    if size is not None and len(data) != size:
        raise _fail(f"the {what} is {len(data)} bytes, expected {size}")
    return data


def _ephemeral_key(header: Mapping[str, Any]) -> X25519PublicKey:
    epk = header.get("epk")
    if not (
        isinstance(epk, dict)
        and epk.get("kty") == "OKP"
        and epk.get("crv") == "X25519"
        and "d" not in epk
        and isinstance(epk.get("x"), str)
    ):
        raise _fail("epk is not a public OKP X25519 key")
    return X25519PublicKey.from_public_bytes(_segment(epk["x"], "epk x", X25519_BYTES))


def open(token: str, header: Mapping[str, Any], private: X25519PrivateKey) -> bytes:
    """Decrypt a compact JWE of this profile; return the plaintext.

    ``header`` is ``token``'s protected header as the caller parsed it from the
    first segment (``envelope_format.parse_jwe_header``: strict JSON, no
    duplicate members); the AAD is that segment exactly as received. Raises
    ``EnvelopeError`` with step ``decrypt`` and a reason naming the part at
    fault, never the content, for anything malformed or inauthentic.
    """
    return open_segments(token.split("."), header, private)


def open_segments(
    parts: Sequence[str], header: Mapping[str, Any], private: X25519PrivateKey
) -> bytes:
    """``open`` for a token the caller has already split at its dots (``token.split(".")``).

    Same checks, same errors: the segment count is still step 1.
    """
    cek, iv, sealed = _unwrap(parts, header, private)
    return _decrypt(cek, iv, sealed, parts[0])


def content_key(token: str, header: Mapping[str, Any], private: X25519PrivateKey) -> bytes:
    """The content encryption key of a compact JWE of this profile, once it decrypts.

    Revealing it lets a third party decrypt this one message (``open_with_key``)
    without the recipient's private key. Same checks and errors as ``open``.
    """
    parts = token.split(".")
    cek, iv, sealed = _unwrap(parts, header, private)
    _decrypt(cek, iv, sealed, parts[0])
    return cek


def open_with_key(token: str, header: Mapping[str, Any], cek: bytes) -> bytes:
    """Decrypt a compact JWE of this profile with its content key (RFC 7516 §5.2 steps 14-16).

    ``header`` as for ``open``. The encrypted key segment is not used; every
    other segment is checked as ``open`` checks it. Raises ``EnvelopeError``
    with step ``decrypt``.
    """
    parts = token.split(".")
    _check_profile(parts, header)
    if len(cek) != CEK_BYTES:
        raise _fail(f"the content key is {len(cek)} bytes, expected {CEK_BYTES}")
    _segment(parts[1], "encrypted key", WRAPPED_BYTES)
    iv = _segment(parts[2], "IV", IV_BYTES)
    sealed = _segment(parts[3], "ciphertext") + _segment(parts[4], "authentication tag", TAG_BYTES)
    return _decrypt(cek, iv, sealed, parts[0])


def _decrypt(cek: bytes, iv: bytes, sealed: bytes, protected: str) -> bytes:
    # AES-256-GCM with the protected header's ASCII as AAD: the tag
    # authenticates the ciphertext and every header member.
    try:
        return AESGCM(cek).decrypt(iv, sealed, protected.encode("ascii"))
    except InvalidTag:
        raise _fail("the authentication tag does not verify") from None


def _check_profile(parts: Sequence[str], header: Mapping[str, Any]) -> None:
    # 1. exactly five segments (RFC 7516 §7.1).
    if len(parts) != 5:
        raise _fail(f"a compact JWE has 5 segments, not {len(parts)}")
    # 2. the header names this profile and nothing we do not implement.
    if header.get("alg") != ALG or header.get("enc") != ENC:
        raise _fail(f"only alg {ALG} with enc {ENC} is supported")
    if any(name in header for name in _UNSUPPORTED):
        raise _fail("zip and crit are not supported")


def _unwrap(
    parts: Sequence[str], header: Mapping[str, Any], private: X25519PrivateKey
) -> tuple[bytes, bytes, bytes]:
    # Steps 1-7 of the checklist; returns the CEK, the IV and ciphertext + tag.
    # Checklist (RFC 7516 §5.2 for this profile); each step raises EnvelopeError.
    # 1-2. (``_check_profile``) five segments; the header names this profile.
    _check_profile(parts, header)
    _, wrapped_b64, iv_b64, ciphertext_b64, tag_b64 = parts
    # 3. epk is a public X25519 OKP key of 32 bytes (RFC 8037 §2, RFC 7748 §5).
    epk = _ephemeral_key(header)
    # 4. every segment is canonical base64url of the length the profile fixes:
    #    a 40-byte wrapped CEK, a 96-bit IV, a 128-bit tag.
    wrapped = _segment(wrapped_b64, "encrypted key", WRAPPED_BYTES)
    iv = _segment(iv_b64, "IV", IV_BYTES)
    ciphertext = _segment(ciphertext_b64, "ciphertext")
    tag = _segment(tag_b64, "authentication tag", TAG_BYTES)
    # 5. ECDH; cryptography refuses an all-zero shared secret, i.e. a low-order
    #    epk (RFC 7748 §6.1), which would make the key the sender's choice.
    try:
        z = private.exchange(epk)
    except ValueError:
        raise _fail("epk is a low-order point") from None
    # 6. Concat KDF (RFC 7518 §4.6.2; apu/apv, when present, strict base64url).
    try:
        kek = _kek(z, header)
    except ValueError:
        raise _fail("apu/apv is not a base64url string") from None
    # 7. AES key unwrap (RFC 3394 §2.2.3 integrity check) yields the 256-bit CEK.
    try:
        cek = aes_key_unwrap(kek, wrapped)
    except InvalidUnwrap:
        raise _fail("the content key does not unwrap") from None
    # 8. (``_decrypt``) AES-256-GCM with the protected header as AAD.
    return cek, iv, ciphertext + tag
