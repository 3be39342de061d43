"""Interop: our envelopes against an independent JOSE library and RFC 9901 done by hand.

jwcrypto decrypts what we encrypt (and we receive what it encrypts); the JWS
signature is checked with jwcrypto and with ``cryptography`` directly; SD-JWT
digests are recomputed here from the RFC's rule without ``broker.sdjwt``.
The worked example in docs/ENVELOPE.md is generated here, and the drift test
fails when the code no longer produces it. Regenerate with
``MSMT_UPDATE_DOCS=1 .venv/bin/pytest tests/test_envelope_interop.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from envelope_world import MAX_AGE, MAX_SKEW, NOW, POLICY, Node, enc_key, sig_key, vessel
from jwcrypto import jwe as jjwe
from jwcrypto import jwk as jjwk
from jwcrypto import jws as jjws

from broker import envelope, sdjwt
from broker.sightings import leaf_values
from broker.transforms import Transform, variant_key

DOC = Path(__file__).resolve().parent.parent / "docs" / "ENVELOPE.md"
BEGIN, END = "<!-- BEGIN GENERATED EXAMPLE -->", "<!-- END GENERATED EXAMPLE -->"
JPN, USA = Node("JPN"), Node("USA")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _digest(disclosure: str) -> str:
    # RFC 9901 §4.2.3, written out independently of broker.sdjwt.
    return (
        base64.urlsafe_b64encode(hashlib.sha256(disclosure.encode("ascii")).digest())
        .decode()
        .rstrip("=")
    )


def _jwk(key: Any) -> jjwk.JWK:
    return jjwk.JWK(**key.as_dict(private=True))


def _released(issued: envelope.Issued) -> list[str]:
    assert {"observed_at", "source.confidence", "vessel.imo", "vessel.flag"} <= set(
        issued.disclosures
    )
    return ["observed_at", "source.confidence", "vessel.imo", "vessel.flag"]


def test_jwcrypto_decrypts_and_verifies_our_envelope() -> None:
    s = vessel()
    issued = JPN.issue(s)
    token = JPN.present(issued, "USA", _released(issued))
    # 1. An independent library decrypts it with USA's key and sees our header.
    outer = jjwe.JWE()
    outer.deserialize(token, key=_jwk(enc_key("USA")))
    header = outer.jose_header
    assert (header["alg"], header["enc"], header["cty"]) == (
        "ECDH-ES+A256KW",
        "A256GCM",
        envelope.TYP,
    )
    assert (header["msmt_from"], header["msmt_to"], header["msmt_rid"]) == (
        "JPN",
        "USA",
        str(s.report_id),
    )
    assert header["epk"]["crv"] == "X25519"
    # The SD-JWT, then spaces of padding to a multiple of the block (docs/ENVELOPE.md §4.1).
    plaintext = outer.payload.decode("ascii")
    assert len(plaintext) % envelope.PAD_BLOCK == 0
    presentation = plaintext.rstrip(" ")
    assert presentation.endswith("~")
    assert len(plaintext) - len(presentation) < envelope.PAD_BLOCK
    compact, *disclosures, tail = presentation.split("~")
    assert tail == ""
    # 2. The JWS verifies with jwcrypto and with cryptography's bare Ed25519.
    public = sig_key("JPN").as_dict(private=False)
    inner = jjws.JWS()
    inner.deserialize(compact)
    inner.verify(jjwk.JWK(**public), alg="Ed25519")
    h, p, sig = compact.split(".")
    Ed25519PublicKey.from_public_bytes(_b64d(str(public["x"]))).verify(
        _b64d(sig), f"{h}.{p}".encode()
    )
    assert json.loads(_b64d(h)) == {"alg": "Ed25519", "typ": envelope.TYP, "kid": "JPN-sig-1"}
    payload = json.loads(_b64d(p))
    # 3. Each disclosure's digest, recomputed here, sits in the _sd array of its object.
    exact = leaf_values(s)
    seen = set()
    for d in disclosures:
        salt, name, value = json.loads(_b64d(d))
        assert len(_b64d(salt)) >= 16
        container = next(
            c
            for c in ("", "source", "vessel")
            if _digest(d) in (payload[c]["_sd"] if c else payload["_sd"])
        )
        key = f"{container}.{name}" if container else name
        assert exact[key] == value
        seen.add(key)
    assert seen == set(_released(issued))
    assert {k: payload[k] for k in ("iss", "jti", "iat", "kind", "tlp")} == {
        "iss": "JPN",
        "jti": str(s.report_id),
        "iat": int(NOW.timestamp()),
        "kind": "vessel",
        "tlp": s.tlp,
    }
    assert (payload["_sd_alg"], payload["msmt_schema"], payload["msmt_policy"]) == (
        "sha-256",
        "1.0",
        POLICY,
    )


def test_we_receive_what_jwcrypto_encrypts() -> None:
    issued = JPN.issue(vessel())
    plaintext = sdjwt.join_presentation(issued.jws, [issued.disclosures["vessel.imo"]])
    header = {
        "alg": "ECDH-ES+A256KW",
        "enc": "A256GCM",
        "cty": envelope.TYP,
        "kid": "USA-enc-1",
        "msmt_from": "JPN",
        "msmt_to": "USA",
        "msmt_rid": issued.report_id,
    }
    outer = jjwe.JWE(plaintext.encode(), protected=json.dumps(header))
    outer.add_recipient(jjwk.JWK(**enc_key("USA").as_dict(private=False)))
    got = USA.receive(outer.serialize(compact=True), attested_sender="JPN")
    assert dict(got.fields) == {"vessel.imo": leaf_values(vessel())["vessel.imo"]}


# --- the worked example in docs/ENVELOPE.md ---------------------------------------------


@pytest.fixture
def deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Salts and decoys from a counter, so the example's bytes are reproducible."""
    counter = iter(range(10_000))

    def take(label: bytes, size: int) -> str:
        seed = hashlib.sha256(label + str(next(counter)).encode()).digest()[:size]
        return sdjwt.b64u_encode(seed)

    monkeypatch.setattr(sdjwt, "new_salt", lambda: take(b"example-salt-", 16))
    monkeypatch.setattr(
        sdjwt, "new_salts", lambda n: [take(b"example-salt-", 16) for _ in range(n)]
    )
    monkeypatch.setattr(
        sdjwt, "new_decoys", lambda n: [take(b"example-decoy-", 32) for _ in range(n)]
    )


def _example_issue() -> tuple[envelope.Issued, list[str], dict[str, Any]]:
    s = vessel()
    coarse = Transform.parse("coarsen:0.5")
    key = variant_key("vessel.position", coarse)
    value = coarse.apply(
        leaf_values(s)["vessel.position"], pseudonym_keys={}, path="vessel.position"
    )
    issued = JPN.issue(s, variants={key: value})
    return issued, ["observed_at", "vessel.flag", "vessel.imo", key], {key: value}


def _block(lang: str, text: str) -> str:
    return f"```{lang}\n{text}\n```\n"


def _plaintext(token: str) -> str:
    # As a partner on jwcrypto decrypts it with USA's key.
    outer = jjwe.JWE()
    outer.deserialize(token, key=_jwk(enc_key("USA")))
    return str(outer.payload.decode("ascii"))


def _render(issued: envelope.Issued, released: list[str], token: str) -> str:
    h, p, _ = issued.jws.split(".")
    presentation = sdjwt.join_presentation(issued.jws, [issued.disclosures[k] for k in released])
    padded = _plaintext(token)
    jwe_header = json.loads(_b64d(token.split(".", maxsplit=1)[0]))
    rows = []
    for key in released:
        enc = issued.disclosures[key]
        rows.append(f"| `{key}` | `{_b64d(enc).decode()}` | `{sdjwt.hash_disclosure(enc)}` |")
    test_keys = {
        "JPN-sig-1 (Ed25519, private)": {
            **sig_key("JPN").as_dict(private=True),
            "kid": "JPN-sig-1",
        },
        "USA-enc-1 (X25519, private)": {**enc_key("USA").as_dict(private=True), "kid": "USA-enc-1"},
    }
    parts = [
        BEGIN,
        "",
        "Test keys (derived from fixed seeds in `tests/envelope_world.py`; they protect nothing):",
        "",
        _block("json", json.dumps(test_keys, indent=2)),
        f"JPN issues report `{issued.report_id}` at `iat` {int(NOW.timestamp())} "
        f"({NOW.isoformat().replace('+00:00', 'Z')}) with one variant, "
        "`vessel.position#coarsen:0.5`. JWS protected header (exact bytes, base64url-decoded):",
        "",
        _block("json", _b64d(h).decode()),
        "JWS payload (exact bytes are compact, keys sorted; shown indented here):",
        "",
        _block("json", json.dumps(json.loads(_b64d(p)), indent=2)),
        "JPN releases four disclosure keys to USA. Each disclosure, decoded, and its digest:",
        "",
        "| disclosure key | decoded disclosure (UTF-8 JSON) | digest (in an `_sd` array above) |",
        "| --- | --- | --- |",
        *rows,
        "",
        f"The JWE plaintext is this SD-JWT presentation ({len(presentation)} bytes, one line, no"
        f" key binding), then {len(padded) - len(presentation)} spaces of padding to"
        f" {len(padded)} bytes, the next multiple of {envelope.PAD_BLOCK} (§4.1):",
        "",
        _block("text", presentation),
        "The JWE protected header (the `epk` is fresh for every envelope):",
        "",
        _block("json", json.dumps(jwe_header, indent=2)),
        "The compact JWE (decrypts with the USA test key above; the drift test receives it):",
        "",
        _block("text", token),
        END,
    ]
    return "\n".join(parts)


def _doc_section() -> str:
    text = DOC.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def test_doc_example_matches_the_code(deterministic: None) -> None:
    issued, released, variants = _example_issue()
    if os.environ.get("MSMT_UPDATE_DOCS") == "1":
        token = JPN.present(issued, "USA", released)
        text = DOC.read_text(encoding="utf-8")
        DOC.write_text(
            text.replace(_doc_section(), _render(issued, released, token)), encoding="utf-8"
        )
    section = _doc_section()
    match = re.search(r"```text\n([A-Za-z0-9_.-]+)\n```\s*" + re.escape(END), section)
    assert match is not None, "the doc example has no compact JWE block"
    token = match.group(1)
    assert section == _render(issued, released, token)
    # Its plaintext is the presentation, padded with spaces to the next multiple of the block.
    presentation = sdjwt.join_presentation(
        issued.jws, [issued.disclosures[k] for k in sorted(released)]
    )
    padded = -(-len(presentation) // envelope.PAD_BLOCK) * envelope.PAD_BLOCK
    assert _plaintext(token) == presentation.ljust(padded)
    # The JWE in the doc is a real envelope: it passes every receive step today.
    got = USA.receive(token, attested_sender="JPN", max_age=MAX_AGE, max_skew=MAX_SKEW)
    assert got.presentation == sdjwt.join_presentation(
        issued.jws, [issued.disclosures[k] for k in sorted(released)]
    )
    assert dict(got.fields) == {k: ({**leaf_values(vessel()), **variants})[k] for k in released}
