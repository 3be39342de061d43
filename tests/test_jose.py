"""broker.jose against the RFCs' vectors, joserfc and jwcrypto, and every malformed input.

The fixed JWE profile is written directly on ``cryptography``; these tests pin
it to RFC 8037 A.6 (X25519 in JOSE) and RFC 7518 Appendix C (Concat KDF), to
``cryptography``'s own Concat KDF (Hypothesis), and to two independent JOSE
libraries in both directions. ``open`` must refuse each malformed part with
``EnvelopeError`` at step ``decrypt``.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
from envelope_world import MAX_AGE, MAX_SKEW, NOW, Node, enc_key, sig_key, vessel
from hypothesis import given, settings
from hypothesis import strategies as st
from joserfc import jwe as rfc_jwe
from joserfc.jwk import OKPKey
from joserfc.registry import HeaderParameter
from jwcrypto import jwe as jjwe
from jwcrypto import jwk as jjwk

from broker import envelope, jose
from broker.envelope_format import parse_jwe, parse_jwe_header
from broker.errors import EnvelopeError, UsageError

VECTORS = Path(__file__).resolve().parent / "vectors"
A6 = json.loads((VECTORS / "rfc8037" / "appendix-a6.json").read_text())
APPENDIX_C = json.loads((VECTORS / "rfc7518" / "appendix-c.json").read_text())

RECIPIENT = X25519PrivateKey.from_private_bytes(bytes(range(32)))
HEADER: dict[str, Any] = {
    "alg": "ECDH-ES+A256KW",
    "enc": "A256GCM",
    "cty": "msmt+sd-jwt",
    "kid": "USA-enc-1",
    "msmt_from": "JPN",
    "msmt_to": "USA",
    "msmt_rid": "5adfa480-fc2f-4bf3-bbd0-068397c7aea5",
}
PLAINTEXT = b"eyJ.eyJ.sig~WyJzYWx0IiwibmFtZSIsInZhbHVlIl0~"


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def opened(token: str, private: X25519PrivateKey = RECIPIENT) -> bytes:
    """What ``open`` returns for a token, its header parsed as the envelope parses it.

    ``open_segments`` on the segments ``parse_jwe`` returns (the envelope's
    route) must return the same.
    """
    header, segments = parse_jwe(token, 1 << 20)
    assert header == parse_jwe_header(token, 1 << 20)
    assert segments == token.split(".")
    plaintext = jose.open(token, header, private)
    assert jose.open_segments(segments, header, private) == plaintext
    return plaintext


def refused(token: str, header: dict[str, Any] | None = None) -> str:
    """The reason ``open`` gives for refusing ``token`` (header: as parsed, unless given).

    ``open_segments`` on the split token must refuse it with the same reason.
    """
    parsed = parse_jwe_header(token, 1 << 20) if header is None else header
    with pytest.raises(EnvelopeError) as info:
        jose.open(token, parsed, RECIPIENT)
    assert info.value.step == "decrypt"
    with pytest.raises(EnvelopeError) as again:
        jose.open_segments(token.split("."), parsed, RECIPIENT)
    assert (again.value.step, again.value.reason) == ("decrypt", info.value.reason)
    return info.value.reason


# --- RFC vectors -------------------------------------------------------------------


def test_rfc7518_appendix_c_concat_kdf() -> None:
    v = APPENDIX_C
    # Z is what the RFC's P-256 keys agree on (so the vector is read correctly) ...
    alice = ec.derive_private_key(
        int.from_bytes(b64d(v["alice_ephemeral_key"]["d"]), "big"), ec.SECP256R1()
    )
    bob = ec.derive_private_key(int.from_bytes(b64d(v["bob_key"]["d"]), "big"), ec.SECP256R1())
    z = alice.exchange(ec.ECDH(), bob.public_key())
    assert list(z) == v["z"]
    # ... and our Concat KDF derives the RFC's key from it, with apu/apv as the header has them.
    apu, apv = b64d(v["header"]["apu"]), b64d(v["header"]["apv"])
    assert (apu, apv) == (v["apu"].encode(), v["apv"].encode())
    derived = jose.concat_kdf(z, v["algorithm_id"], v["keydatalen"], apu, apv)
    assert list(derived) == v["derived_key"]
    assert b64e(derived) == v["derived_key_b64u"]


def test_rfc8037_a6_x25519_agreement() -> None:
    v = A6
    ephemeral = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["ephemeral_secret_hex"]))
    bob_public = X25519PublicKey.from_public_bytes(b64d(v["bob_public_jwk"]["x"]))
    assert bob_public.public_bytes_raw().hex() == v["bob_public_hex"]
    assert ephemeral.public_key().public_bytes_raw().hex() == v["ephemeral_public_hex"]
    assert ephemeral.exchange(bob_public).hex() == v["z_hex"]
    # Bob, from the other side, reads the RFC's epk member the way open reads ours.
    bob = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["rfc7748_bob_private_hex"]))
    assert bob.exchange(jose._ephemeral_key(v["header"])).hex() == v["z_hex"]


def test_seal_with_the_rfc8037_a6_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seal with A.6's ephemeral key: its epk member and Z, then an independent decryption."""
    v = A6
    ephemeral = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["ephemeral_secret_hex"]))

    class Fixed:
        @staticmethod
        def generate() -> X25519PrivateKey:
            return ephemeral

    monkeypatch.setattr(jose, "X25519PrivateKey", Fixed)
    bob_public = X25519PublicKey.from_public_bytes(bytes.fromhex(v["bob_public_hex"]))
    token = jose.seal({"alg": jose.ALG, "enc": jose.ENC, "kid": "Bob"}, PLAINTEXT, bob_public)
    protected, wrapped, iv, ciphertext, tag = token.split(".")
    header = json.loads(b64d(protected))
    assert header == {"alg": jose.ALG, "enc": jose.ENC, "kid": "Bob", "epk": v["epk"]}
    # RFC 7518 §4.6.2 written out here with cryptography's Concat KDF, from the RFC's Z.
    other = b"\x00\x00\x00\x0eECDH-ES+A256KW" + b"\x00" * 8 + (256).to_bytes(4, "big")
    kek = ConcatKDFHash(hashes.SHA256(), 32, other).derive(bytes.fromhex(v["z_hex"]))
    cek = aes_key_unwrap(kek, b64d(wrapped))
    plain = AESGCM(cek).decrypt(b64d(iv), b64d(ciphertext) + b64d(tag), protected.encode())
    assert plain == PLAINTEXT
    bob = X25519PrivateKey.from_private_bytes(bytes.fromhex(v["rfc7748_bob_private_hex"]))
    assert jose.open(token, parse_jwe_header(token, 1 << 20), bob) == PLAINTEXT


@settings(max_examples=200, deadline=None)
@given(
    z=st.binary(min_size=1, max_size=66),
    algorithm_id=st.text(st.characters(codec="ascii"), max_size=40),
    bits=st.integers(1, 32).map(lambda n: n * 8),
    apu=st.binary(max_size=40),
    apv=st.binary(max_size=40),
)
def test_concat_kdf_is_cryptographys(
    z: bytes, algorithm_id: str, bits: int, apu: bytes, apv: bytes
) -> None:
    def prefixed(data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + data

    other = (
        prefixed(algorithm_id.encode()) + prefixed(apu) + prefixed(apv) + bits.to_bytes(4, "big")
    )
    expected = ConcatKDFHash(hashes.SHA256(), bits // 8, other).derive(z)
    assert jose.concat_kdf(z, algorithm_id, bits, apu, apv) == expected


@pytest.mark.parametrize("bits", [0, 7, 12, 264, 512])
def test_concat_kdf_refuses_lengths_it_does_not_cover(bits: int) -> None:
    with pytest.raises(ValueError, match="derived key length"):
        jose.concat_kdf(b"z" * 32, jose.ALG, bits)


# --- interop: joserfc and jwcrypto, both directions -----------------------------------


class _Registry(rfc_jwe.JWERegistry):
    max_ciphertext_length = 1 << 20


JOSERFC = _Registry(
    header_registry={
        name: HeaderParameter(name, "str") for name in ("msmt_from", "msmt_to", "msmt_rid")
    },
    algorithms=[jose.ALG, jose.ENC],
)


def _okp(key: X25519PrivateKey | X25519PublicKey) -> OKPKey:
    return OKPKey.import_key(key)


def _jwcrypto(private: X25519PrivateKey, *, public: bool = False) -> jjwk.JWK:
    return jjwk.JWK(**_okp(private).as_dict(private=not public))


def test_joserfc_and_jwcrypto_decrypt_what_we_seal() -> None:
    token = jose.seal(HEADER, PLAINTEXT, RECIPIENT.public_key())
    theirs = rfc_jwe.decrypt_compact(token, _okp(RECIPIENT), registry=JOSERFC)
    assert theirs.plaintext == PLAINTEXT
    assert {k: v for k, v in theirs.protected.items() if k != "epk"} == HEADER
    outer = jjwe.JWE()
    outer.deserialize(token, key=_jwcrypto(RECIPIENT))
    assert outer.payload == PLAINTEXT
    assert outer.jose_header["epk"]["crv"] == "X25519"


def test_we_open_what_joserfc_encrypts() -> None:
    token = rfc_jwe.encrypt_compact(
        dict(HEADER), PLAINTEXT, _okp(RECIPIENT.public_key()), registry=JOSERFC
    )
    assert opened(token) == PLAINTEXT


@pytest.mark.parametrize("extra", [{}, {"apu": b64e(b"Alice"), "apv": b64e(b"Bob")}])
def test_we_open_what_jwcrypto_encrypts(extra: dict[str, str]) -> None:
    outer = jjwe.JWE(PLAINTEXT, protected=json.dumps({**HEADER, **extra}))
    outer.add_recipient(_jwcrypto(RECIPIENT, public=True))
    assert opened(outer.serialize(compact=True)) == PLAINTEXT


def test_jwcrypto_uses_our_apu_and_apv() -> None:
    header = {**HEADER, "apu": b64e(b"JPN"), "apv": b64e(b"USA")}
    token = jose.seal(header, PLAINTEXT, RECIPIENT.public_key())
    outer = jjwe.JWE()
    outer.deserialize(token, key=_jwcrypto(RECIPIENT))
    assert outer.payload == PLAINTEXT
    assert opened(token) == PLAINTEXT


# Header members beyond ours, as a sender might add them (never the ones the profile owns).
_NAMES = st.text(min_size=1, max_size=12).filter(
    lambda n: n not in {"alg", "enc", "epk", "zip", "crit", "apu", "apv"}
)
_VALUES = st.one_of(st.text(max_size=30), st.integers(-(2**53), 2**53), st.booleans())


@settings(max_examples=60, deadline=None)
@given(
    extra=st.dictionaries(_NAMES, _VALUES, max_size=5),
    plaintext=st.one_of(
        st.binary(max_size=2048),
        # Large ones (a maximal record's size) as a pattern: drawing 64 KiB is slow.
        st.integers(60_000, 70_000).map(lambda n: (bytes(range(256)) * 280)[:n]),
    ),
)
def test_round_trip_and_jwcrypto_agree(extra: dict[str, Any], plaintext: bytes) -> None:
    header = {"alg": jose.ALG, "enc": jose.ENC, **extra}
    token = jose.seal(header, plaintext, RECIPIENT.public_key())
    # Parsed here without the envelope's format rules (which refuse an empty ciphertext).
    parsed = json.loads(b64d(token.split(".")[0]))
    # The header we emit is exactly the one given, in its order, then the epk.
    assert list(parsed) == [*header, "epk"]
    assert {k: v for k, v in parsed.items() if k != "epk"} == header
    assert set(parsed["epk"]) == {"kty", "crv", "x"}
    assert jose.open(token, parsed, RECIPIENT) == plaintext
    if plaintext:  # jwcrypto reports an empty plaintext as "no recipient matched"
        outer = jjwe.JWE()
        outer.deserialize(token, key=_jwcrypto(RECIPIENT))
        assert outer.payload == plaintext


def test_each_seal_uses_a_fresh_ephemeral_key_cek_and_iv() -> None:
    tokens = [jose.seal(HEADER, PLAINTEXT, RECIPIENT.public_key()) for _ in range(20)]
    for index in range(3):  # epk (in the header), wrapped key, IV
        assert len({t.split(".")[index] for t in tokens}) == len(tokens)


# --- seal refuses what it does not implement ------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        {"enc": jose.ENC},
        {"alg": "ECDH-ES", "enc": jose.ENC},
        {"alg": jose.ALG, "enc": "A128GCM"},
        {"alg": jose.ALG, "enc": jose.ENC, "epk": {"kty": "OKP"}},
        {"alg": jose.ALG, "enc": jose.ENC, "zip": "DEF"},
        {"alg": jose.ALG, "enc": jose.ENC, "crit": ["exp"]},
    ],
)
def test_seal_refuses_headers_outside_the_profile(header: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        jose.seal(header, PLAINTEXT, RECIPIENT.public_key())


def test_seal_refuses_a_low_order_recipient_key() -> None:
    with pytest.raises(UsageError, match="cannot agree a key"):
        jose.seal(HEADER, PLAINTEXT, X25519PublicKey.from_public_bytes(bytes(32)))


# --- open refuses every malformed part ------------------------------------------------


def _token(**parts: str) -> str:
    """A genuine token with some segments replaced (keys: header, key, iv, ct, tag)."""
    names = ["header", "key", "iv", "ct", "tag"]
    token = jose.seal(HEADER, PLAINTEXT, RECIPIENT.public_key())
    segments = dict(zip(names, token.split("."), strict=True))
    segments.update(parts)
    return ".".join(segments[n] for n in names)


def _with_header(header: dict[str, Any]) -> str:
    return _token(header=b64e(json.dumps(header).encode()))


def _genuine_header() -> dict[str, Any]:
    return dict(parse_jwe_header(_token(), 1 << 20))


def test_open_needs_five_segments() -> None:
    token = _token()
    header = parse_jwe_header(token, 1 << 20)
    assert "5 segments, not 4" in refused(token.rsplit(".", 1)[0], header)
    assert "5 segments, not 6" in refused(token + ".AAAA", header)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"alg": "ECDH-ES"}, "only alg"),
        ({"alg": "ECDH-ES+A128KW"}, "only alg"),
        ({"enc": "A128GCM"}, "only alg"),
        ({"zip": "DEF"}, "zip and crit"),
        ({"crit": ["msmt_rid"]}, "zip and crit"),
        ({"epk": None}, "epk is not"),
        ({"epk": "x"}, "epk is not"),
        ({"epk": {"kty": "EC", "crv": "X25519", "x": "A" * 43}}, "epk is not"),
        ({"epk": {"kty": "OKP", "crv": "Ed25519", "x": "A" * 43}}, "epk is not"),
        ({"epk": {"kty": "OKP", "crv": "X448", "x": "A" * 43}}, "epk is not"),
        ({"epk": {"kty": "OKP", "crv": "X25519"}}, "epk is not"),
        ({"epk": {"kty": "OKP", "crv": "X25519", "x": 5}}, "epk is not"),
        ({"epk": {"kty": "OKP", "crv": "X25519", "x": "A" * 43, "d": "A" * 43}}, "epk is not"),
        ({"epk": {"kty": "OKP", "crv": "X25519", "x": "A" * 42}}, "epk x is 31 bytes"),
        ({"epk": {"kty": "OKP", "crv": "X25519", "x": "A" * 44}}, "epk x is 33 bytes"),
        ({"epk": {"kty": "OKP", "crv": "X25519", "x": "A" * 42 + "B"}}, "epk x is not canonical"),
        ({"epk": {"kty": "OKP", "crv": "X25519", "x": "A" * 42 + "+"}}, "epk x is not canonical"),
        ({"apu": 5}, "apu/apv"),
        ({"apv": "Qm9i="}, "apu/apv"),
    ],
)
def test_open_refuses_a_header_outside_the_profile(change: dict[str, Any], reason: str) -> None:
    header = {**_genuine_header(), **change}
    header = {k: v for k, v in header.items() if v is not None}
    assert reason in refused(_with_header(header), header)


# Curve25519 points of small order (RFC 7748 §6.1 lets callers check for the
# all-zero output they produce): 0, 1, the two order-8 points, and p-1, p, p+1
# (non-canonical encodings of order-2 -1, 0 and 1); then each of those with the
# top bit set, which X25519 ignores (RFC 7748 §5).
_SMALL = [
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
]
_LOW_ORDER = _SMALL + [p[:-2] + f"{int(p[-2:], 16) | 0x80:02x}" for p in _SMALL]


@pytest.mark.parametrize("point", _LOW_ORDER)
def test_open_refuses_a_low_order_epk(point: str) -> None:
    epk = {"kty": "OKP", "crv": "X25519", "x": b64e(bytes.fromhex(point))}
    header = {**_genuine_header(), "epk": epk}
    assert refused(_with_header(header), header) == "epk is a low-order point"


@pytest.mark.parametrize(
    ("part", "size", "reason"),
    [
        ("key", 39, "the encrypted key is 39 bytes, expected 40"),
        ("key", 41, "the encrypted key is 41 bytes, expected 40"),
        ("key", 32, "the encrypted key is 32 bytes, expected 40"),
        ("key", 0, "the encrypted key is 0 bytes, expected 40"),
        ("iv", 11, "the IV is 11 bytes, expected 12"),
        ("iv", 16, "the IV is 16 bytes, expected 12"),
        ("tag", 15, "the authentication tag is 15 bytes, expected 16"),
        ("tag", 12, "the authentication tag is 12 bytes, expected 16"),
    ],
)
def test_open_refuses_segments_of_the_wrong_length(part: str, size: int, reason: str) -> None:
    token = _token(**{part: b64e(b"\x01" * size)})
    header = parse_jwe_header(_token(), 1 << 20)
    assert refused(token, header) == reason


@pytest.mark.parametrize("part", ["key", "iv", "ct", "tag"])
@pytest.mark.parametrize("bad", ["A===", "A+AA", "A/AA", "A", "AB", "AAB", "A AA", "A\u00e9AA"])
def test_open_refuses_segments_that_are_not_canonical_base64url(part: str, bad: str) -> None:
    token = _token(**{part: bad})
    header = parse_jwe_header(_token(), 1 << 20)
    assert "not canonical base64url" in refused(token, header)


def _flip(segment: str, at: int = 0) -> str:
    raw = bytearray(b64d(segment))
    raw[at] ^= 1
    return b64e(bytes(raw))


def test_open_refuses_a_key_that_does_not_unwrap() -> None:
    token = _token()
    assert refused(_token(key=_flip(token.split(".")[1]))) == "the content key does not unwrap"
    # A stranger's key derives another KEK: the same refusal, nothing more said.
    with pytest.raises(EnvelopeError, match="does not unwrap"):
        jose.open(token, parse_jwe_header(token, 1 << 20), X25519PrivateKey.generate())


@pytest.mark.parametrize("part", ["iv", "ct", "tag"])
def test_open_refuses_a_tag_that_does_not_verify(part: str) -> None:
    index = ["header", "key", "iv", "ct", "tag"].index(part)
    genuine = _token()
    flipped = _flip(genuine.split(".")[index], at=3)
    assert refused(_token(**{part: flipped})) == "the authentication tag does not verify"


def test_the_tag_covers_the_protected_header_as_received() -> None:
    token = _token()
    segments = token.split(".")
    header = parse_jwe_header(token, 1 << 20)
    # The same members re-serialised (other spacing): same parsed header, other AAD.
    respelled = b64e(json.dumps(header, indent=1).encode())
    forged = ".".join([respelled, *segments[1:]])
    assert parse_jwe_header(forged, 1 << 20) == header
    assert refused(forged) == "the authentication tag does not verify"
    # A routing member changed in the header: refused too.
    changed = _with_header({**header, "msmt_to": "GBR"}).split(".")[0]
    assert refused(".".join([changed, *segments[1:]])) == "the authentication tag does not verify"


# --- the envelope hands jose only keys of the right type -------------------------------


def test_envelope_refuses_keys_of_the_wrong_type() -> None:
    jpn = Node("JPN")
    issued = jpn.issue(vessel())
    token = jpn.present(issued, "USA", ["vessel.imo"])
    # A public key, or an Ed25519 key, where the X25519 private key belongs: the
    # operator's mistake (keys.py refuses such key files), not the peer's.
    for wrong in (OKPKey.import_key(enc_key("USA").public_key), sig_key("USA")):
        with pytest.raises(UsageError, match="not an X25519 private key"):
            envelope.receive(
                token,
                me="USA",
                decryption_keys={"USA-enc-1": wrong},
                roster=jpn.roster,
                attested_sender="JPN",
                now=NOW,
                max_age=MAX_AGE,
                max_skew=MAX_SKEW,
            )
    with pytest.raises(UsageError, match="not an X25519 key"):
        envelope.present(
            issued,
            disclosure_keys=["vessel.imo"],
            recipient="USA",
            recipient_kid="USA-sig-1",
            recipient_key=jpn.roster.public_key("USA-sig-1"),
        )
    # The right key still opens it: the refusals above are about the keys alone.
    assert Node("USA").receive(token, attested_sender="JPN").report_id == issued.report_id
