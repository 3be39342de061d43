"""C2SP signed-note, tlog-checkpoint and tlog-cosignature: reference vectors and round trips."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.checkpoint import (
    Checkpoint,
    cosign,
    cosignature_message,
    count_cosignatures,
    open_checkpoint,
    parse_body,
    parse_proof_request,
    parse_proof_response,
    proof_refusal,
    proof_request,
    proof_response,
    roster_log_keys,
    roster_witness_keys,
    sign_checkpoint,
    unsigned_proof_response,
    verify_cosignature,
)
from broker.errors import AuditError
from broker.merkle import EMPTY_ROOT
from broker.note import (
    ALG_COSIGNATURE_V1,
    ALG_ED25519,
    Note,
    NoteError,
    Signature,
    Verifier,
    parse,
    parse_vkey,
    sign_ed25519,
    verify_ed25519,
)
from broker.roster import Roster, format_time

# golang.org/x/mod/sumdb/note's reference key and note (note_test.go / package docs).
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_SIG = (
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgK"
    "vqfqdngotpRZb6KE6RyyBwJnAM=\n"
)

LOG = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
WIT = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))


def _go_private() -> Ed25519PrivateKey:
    raw = base64.b64decode(GO_SKEY.split("+", 4)[4])
    assert raw[0] == ALG_ED25519
    return Ed25519PrivateKey.from_private_bytes(raw[1:])


def _log_key(name: str = "JPN") -> Verifier:
    return Verifier(name, ALG_ED25519, LOG.public_key().public_bytes_raw())


def _wit_key(name: str = "USA") -> Verifier:
    return Verifier(name, ALG_COSIGNATURE_V1, WIT.public_key().public_bytes_raw())


def test_go_reference_note_signs_and_verifies_byte_for_byte() -> None:
    verifier = parse_vkey(GO_VKEY)
    assert verifier.vkey() == GO_VKEY
    sig = sign_ed25519(GO_TEXT, "PeterNeumann", _go_private())
    note = Note(GO_TEXT, (sig,))
    assert note.render() == GO_TEXT + "\n" + GO_SIG  # Ed25519 is deterministic
    parsed = parse((GO_TEXT + "\n" + GO_SIG).encode())
    verify_ed25519(parsed, verifier)
    tampered = parse(GO_TEXT.replace("problem,", "problem;") + "\n" + GO_SIG)
    with pytest.raises(NoteError, match="does not verify"):
        verify_ed25519(tampered, verifier)


@pytest.mark.parametrize(
    "vkey",
    [
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # wrong id
        "PeterNeumann+c74f20a3+ApcS2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",  # other key
        "PeterNeumann+c74f20a3",
        "Peter+Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10",  # short key
        "PeterNeumann+zz4f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
    ],
)
def test_mangled_verifier_keys_are_refused(vkey: str) -> None:
    with pytest.raises(NoteError):
        parse_vkey(vkey)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (GO_TEXT + GO_SIG, "no blank line"),
        (GO_TEXT + "\n", "no signature lines"),
        (GO_TEXT + "\n- PeterNeumann x08go/ZJkuBS9UG\n", "em dash"),
        (GO_TEXT + "\n\u2014 PeterNeumann !!!\n", "base64"),
        (GO_TEXT + "\n\u2014 Peter Neumann AAAAAAAA\n", "not '\u2014 <name> <signature>'"),
        ("bell\x07\n\n" + GO_SIG, "control character"),
        # The spare low bits of the final group set: the same bytes spelt another way.
        (GO_TEXT + "\n" + GO_SIG.replace("AM=\n", "AN=\n"), "base64"),
        # Lines end in "\n" alone, as in Go's note.Open: not at U+2028, U+2029 or U+0085.
        *(
            (GO_TEXT + "\n" + GO_SIG.rstrip("\n") + sep + GO_SIG, "not '\u2014 <name>")
            for sep in ("\u2028", "\u2029", "\x85")
        ),
    ],
)
def test_malformed_notes_are_refused(text: str, reason: str) -> None:
    with pytest.raises(NoteError, match=reason):
        parse(text)


def test_unknown_keys_are_ignored_but_required_key_must_be_present() -> None:
    other = Ed25519PrivateKey.generate()
    note = Note(GO_TEXT, (sign_ed25519(GO_TEXT, "PeterNeumann", other),))
    # Same name, different key ID: ignored, so the note is not signed by the trusted key.
    with pytest.raises(NoteError, match="not signed by PeterNeumann"):
        verify_ed25519(note, parse_vkey(GO_VKEY))


def test_checkpoint_body_round_trip_and_signature() -> None:
    cp = Checkpoint("JPN", 20852163, bytes(range(32)))
    assert cp.body() == f"JPN\n20852163\n{base64.b64encode(bytes(range(32))).decode()}\n"
    note = sign_checkpoint(cp, LOG)
    assert note.signatures[0].key_id == _log_key().key_id
    opened, _ = open_checkpoint(note.render(), [_log_key()])
    assert opened == cp
    with pytest.raises(NoteError, match="no signature by a trusted log key"):
        open_checkpoint(note.render(), [_log_key("USA")])
    forged = note.render().replace("20852163", "20852164")
    with pytest.raises(NoteError, match="does not verify"):
        open_checkpoint(forged, [_log_key()])


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("JPN\n010\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n", "leading zeros"),
        ("JPN\n-1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n", "leading zeros"),
        ("JPN\n1\nAAAA\n", "3 bytes"),
        ("JPN\n1\n@@@@\n", "base64"),
        ("\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n", "origin"),
        ("JPN\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\next\n", "three lines"),
        ("JPN\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "three lines"),
        # A root spelt with the spare low bits set: the same 32 bytes, another text.
        ("JPN\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=\n", "base64"),
        ("JPN\n0\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n", "size 0"),
    ],
)
def test_malformed_checkpoint_bodies_are_refused(body: str, reason: str) -> None:
    with pytest.raises(NoteError, match=reason):
        parse_body(body)


@given(
    origin=st.sampled_from(["JPN", "USA", "NZL"]),
    size=st.integers(0, 2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
)
def test_checkpoint_body_round_trips(origin: str, size: int, root: bytes) -> None:
    cp = Checkpoint(origin, size, root if size else EMPTY_ROOT)
    assert parse_body(cp.body()) == cp


def test_cosignature_v1_format_and_verification() -> None:
    note = sign_checkpoint(Checkpoint("JPN", 5, bytes(32)), LOG)
    line = cosign(note, "USA", WIT, 1679315147)
    assert line.key_id == _wit_key().key_id
    assert line.sig[:8] == struct.pack(">Q", 1679315147)
    message = cosignature_message(note.text, 1679315147)
    assert message.startswith(b"cosignature/v1\ntime 1679315147\nJPN\n5\n")
    WIT.public_key().verify(line.sig[8:], message)  # the spec's exact message is what is signed
    cosigned = note.with_signatures(line)
    assert verify_cosignature(parse(cosigned.render()), _wit_key()) == 1679315147
    assert count_cosignatures(cosigned, [_wit_key(), _wit_key("KOR")]) == ["USA"]
    # A plain 0x01 key with the same bytes is a different key ID: not a cosigner.
    with pytest.raises(NoteError, match="not a cosignature key"):
        verify_cosignature(cosigned, Verifier("USA", ALG_ED25519, _wit_key().public))
    # Moving the cosignature to another checkpoint breaks it.
    other = sign_checkpoint(Checkpoint("JPN", 6, bytes(32)), LOG).with_signatures(line)
    with pytest.raises(NoteError, match="does not verify"):
        verify_cosignature(other, _wit_key())
    # Changing the timestamp breaks it.
    bumped = Signature("USA", line.key_id, struct.pack(">Q", 1679315148) + line.sig[8:])
    with pytest.raises(NoteError, match="does not verify"):
        verify_cosignature(note.with_signatures(bumped), _wit_key())


def _jwk(key: Ed25519PrivateKey) -> str:
    return base64.urlsafe_b64encode(key.public_key().public_bytes_raw()).rstrip(b"=").decode()


def test_roster_keys_become_note_verifiers() -> None:
    now = datetime(2026, 11, 28, tzinfo=UTC)

    def entry(kid: str, member: str, key: Ed25519PrivateKey, status: str) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _jwk(key),
            "kid": kid,
            "use": "sig",
            "alg": "Ed25519",
            "msmt_member": member,
            "msmt_status": status,
            "msmt_valid_from": format_time(now),
            "msmt_valid_until": format_time(now + timedelta(days=30)),
        }

    revoked = Ed25519PrivateKey.generate()
    roster = Roster.from_jwks(
        {
            "keys": [
                entry("JPN-1", "JPN", LOG, "active"),
                entry("JPN-0", "JPN", revoked, "revoked"),
                entry("USA-1", "USA", WIT, "active"),
            ]
        }
    )
    assert roster_log_keys(roster, "JPN") == [_log_key()]
    assert roster_witness_keys(roster, ["USA", "KOR"]) == [_wit_key()]
    note = sign_checkpoint(Checkpoint("JPN", 1, bytes(32)), revoked)
    with pytest.raises(NoteError, match="no signature by a trusted log key"):
        open_checkpoint(note.render(), roster_log_keys(roster, "JPN"))


NONCE = bytes(range(16))
NONCE_B64 = base64.b64encode(NONCE).decode()


def _reply(**changes: object) -> bytes:
    """A well-formed signed proof reply's members, with ``changes``, as JSON."""
    body: dict[str, object] = {
        "log": "JPN",
        "new": 2,
        "nonce": NONCE_B64,
        "old": 1,
        "proof": [ROOT_B64],
        "sig": base64.b64encode(bytes(64)).decode(),
        "size": 2,
    }
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def test_proof_messages_round_trip_and_refuse_garbage() -> None:
    assert parse_proof_request(proof_request(3, 9, NONCE)) == (3, 9, NONCE)
    proof = [bytes([i]) * 32 for i in range(4)]
    body = proof_response("JPN", 3, 9, proof, size=12, nonce=NONCE, signer=LOG)
    reply = parse_proof_response(body)
    assert (reply.error, reply.old, reply.new, list(reply.proof), reply.size) == (
        None,
        3,
        9,
        proof,
        12,
    )
    for bad in (b"[]", b"{", b'{"old":1}', b'{"old":-1,"new":2}', b'{"old":true,"new":2}'):
        with pytest.raises(AuditError):
            parse_proof_request(bad)
    with pytest.raises(AuditError, match="exactly 'old', 'new' and 'nonce'"):
        parse_proof_request(b'{"old":1,"new":2,"sig":"x"}')
    with pytest.raises(AuditError, match="proof hash 0"):
        parse_proof_response(_reply(proof=["AAAA"]))


def test_the_proof_messages_of_versions_before_signed_replies_are_read_as_unsigned() -> None:
    # Members upgrade one at a time: an earlier version's witness asks without a nonce
    # and reads only the unsigned proof; its log answers so.
    assert proof_request(3, 9, b"") == b'{"new":9,"old":3}'
    assert parse_proof_request(b'{"new":9,"old":3}') == (3, 9, b"")
    proof = [bytes([i]) * 32 for i in range(3)]
    body = unsigned_proof_response(3, 9, proof)
    assert sorted(json.loads(body)) == ["new", "old", "proof"]
    reply = parse_proof_response(body)
    assert (reply.error, reply.old, reply.new, list(reply.proof)) == (None, 3, 9, proof)
    assert (reply.log, reply.sig, reply.size) == (None, None, None)
    assert not reply.signed_by("JPN", b"", [_log_key()])  # never the log's word
    for bad in ({"proof": ["AAAA"]}, {"proof": "x"}, {"old": "3"}):
        with pytest.raises(AuditError):
            parse_proof_response(json.dumps({"new": 9, "old": 3, "proof": [], **bad}).encode())


def test_a_proof_reply_is_the_logs_word_only_with_its_signature_on_this_request() -> None:
    # A witness raises a fork or rollback alarm on a reply only if the log signed it
    # for this very request: a hostile hub answered proof requests itself with made-up
    # proofs, and every witness raised a fork alarm on an honest log.
    keys = [_log_key()]
    proof = [bytes([i]) * 32 for i in range(2)]
    reply = parse_proof_response(
        proof_response("JPN", 3, 9, proof, size=9, nonce=NONCE, signer=LOG)
    )
    assert reply.signed_by("JPN", NONCE, keys)
    assert not reply.signed_by("JPN", bytes(16), keys)  # an answer to another request
    assert not reply.signed_by("USA", NONCE, keys)  # another log's name
    assert not reply.signed_by("JPN", NONCE, [_wit_key()])  # another key
    refusal = parse_proof_response(
        proof_refusal("JPN", 3, 9, "no proof to 9 (log size 5)", size=5, nonce=NONCE, signer=LOG)
    )
    assert (refusal.error, refusal.size) == ("no proof to 9 (log size 5)", 5)
    assert refusal.signed_by("JPN", NONCE, keys)
    # Any member changed on the way breaks the signature: here the size.
    signed = json.loads(proof_refusal("JPN", 3, 9, "x", size=5, nonce=NONCE, signer=LOG))
    changed = parse_proof_response(json.dumps({**signed, "size": 50}).encode())
    assert not changed.signed_by("JPN", NONCE, keys)
    # A refusal of a request the log could not read is unsigned, and says so.
    unsigned = parse_proof_response(b'{"error":"we refuse\\ntoday"}')
    assert unsigned.error == "we refuse\ntoday"
    assert not unsigned.signed_by("JPN", NONCE, keys)


def test_the_worked_example_in_docs_audit_verifies() -> None:
    # docs/AUDIT.md shows this note and these verifier keys; keep them true.
    note = (
        "JPN\n20852163\nUNhY4JhezH9gQYqvDMWrWH9CwlcKiECVqejMrND2VFw=\n\n"
        "\u2014 JPN lRiwhVHHNCzcz6eh+gshpUg2K5mpG47dcni5kNofI14e02zdIOD0+XJkR7deaourhi3GYOlxaJShX"
        "b+6yTtg11d35QA=\n"
        "\u2014 USA HiSQTQAAAABrCsJAIT343OAe+ttSrUUeYerLcXCsWr9c2Dm4D8pvTbZRxSy+RoUR/RlR+qswVU7j4bV"
        "bISSQYhZ67Sh59OmJxU9xCA==\n"
    )
    log = parse_vkey("JPN+9518b085+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4")
    witness = parse_vkey("USA+1e24904d+BAu8NGpXZnw4ASC9nH/X5R0sX9/qN80vW/QFssa/by14")
    assert log == _log_key()
    assert witness == _wit_key()
    checkpoint, parsed = open_checkpoint(note, [log])
    assert checkpoint.size == 20852163
    assert verify_cosignature(parsed, witness) == 1795867200
    assert (Path(__file__).parent.parent / "docs" / "AUDIT.md").read_text().count(
        note.split("\n")[4]
    ) == 1


@settings(max_examples=60, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    message=st.binary(max_size=200),
    flip=st.integers(min_value=-1, max_value=63),
)
def test_cached_verifier_key_agrees_with_a_freshly_parsed_one(
    seed: bytes, message: bytes, flip: int
) -> None:
    # Verifier parses its key once; each verdict must equal that of a key parsed per call.
    private = Ed25519PrivateKey.from_private_bytes(seed)
    public = private.public_key().public_bytes_raw()
    signature = bytearray(private.sign(message))
    if flip >= 0:
        signature[flip] ^= 0x01
    fresh = Ed25519PublicKey.from_public_bytes(public)
    try:
        fresh.verify(bytes(signature), message)
        expected = True
    except InvalidSignature:
        expected = False
    verifier = Verifier("JPN", ALG_ED25519, public)
    try:
        verifier.verify(message, bytes(signature))
        got = True
    except NoteError:
        got = False
    assert got == expected == (flip < 0)


def test_verifier_equality_and_hash_ignore_the_cached_key() -> None:
    raw = WIT.public_key().public_bytes_raw()
    a, b = Verifier("USA", ALG_COSIGNATURE_V1, raw), Verifier("USA", ALG_COSIGNATURE_V1, raw)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != Verifier("USA", ALG_ED25519, raw)  # another type is another key ID
    assert a != Verifier("USA", ALG_COSIGNATURE_V1, LOG.public_key().public_bytes_raw())
    assert "_key" not in repr(a)
    # A copy made field by field rebuilds its own parsed key and still verifies.
    copy = dataclasses.replace(a)
    assert copy == a
    line = cosign(sign_checkpoint(Checkpoint("JPN", 1, bytes(32)), LOG), "USA", WIT, 5)
    note = sign_checkpoint(Checkpoint("JPN", 1, bytes(32)), LOG).with_signatures(line)
    assert verify_cosignature(note, copy) == 5


ROOT_B64 = "A" * 43 + "="


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        # A non-ASCII character makes base64.b64decode raise ValueError, not binascii.Error.
        (f"KOR\n5\n{ROOT_B64[:42]}\u00e9=\n", "root hash is not valid base64"),
        (f"KOR\n5\n\u00e9{ROOT_B64}\n", "root hash is not valid base64"),
        (f"KOR\n{'9' * 10_000}\n{ROOT_B64}\n", "leading zeros"),
        (f"KOR\n\u202e\x7f{'1' * 500}\n{ROOT_B64}\n", "leading zeros"),
    ],
)
def test_hostile_checkpoint_bodies_are_refused_with_a_short_printable_reason(
    body: str, reason: str
) -> None:
    with pytest.raises(NoteError, match=reason) as err:
        parse_body(body)
    assert len(str(err.value)) < 100
    assert str(err.value).isascii()
    assert str(err.value).isprintable()
    assert "99" not in str(err.value)  # the publisher's text is not quoted
    assert "11" not in str(err.value)


def test_a_non_ascii_signature_line_or_key_name_is_refused_as_a_note_error() -> None:
    with pytest.raises(NoteError, match="signature line 1 is not valid base64"):
        parse(GO_TEXT + "\n\u2014 PeterNeumann AAAAAAA\u00e9\n")
    with pytest.raises(NoteError, match="invalid note key name") as err:
        parse(GO_TEXT + "\n\u2014 " + "CNRY+" * 1000 + " AAAAAAAA\n")
    assert len(str(err.value)) < 100
    assert "CNRY" not in str(err.value)
    # And the note a hostile member published (tests/redteam t14), checked before any key.
    note = f"KOR\n5\n{ROOT_B64[:42]}\u00e9=\n\n\u2014 KOR AAAAAAAAAAAA\n"
    with pytest.raises(NoteError, match="not valid base64"):
        open_checkpoint(note, [_log_key("KOR")])


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 200_000, "more than 1024"),
        (b'{"old":1,"new":' + b"9" * 1_000 + b"}", "more than 20 digits"),
        (b'{"old":1,"new":' + b"9" * 21 + b"}", "more than 20 digits"),
        (b'{"old":1,"new":3,"old":2}', "duplicate key"),
        (b"\xff", "not JSON"),
        (b'{"old":1.5,"new":3,"nonce":"' + NONCE_B64.encode() + b'"}', "integer from 0"),
        (b'{"old":1,"new":18446744073709551616,"nonce":"AA=="}', "integer from 0"),
        (b'{"old":1,"new":3,"nonce":"AA=="}', "'nonce' must be 16 bytes"),
    ],
)
def test_hostile_proof_requests_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(AuditError, match=reason):
        parse_proof_request(body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 200_000, "more than 16384"),
        # Deeper than the recursion limit (how deep json may go depends on the Python).
        (b'{"proof":' + b"[" * 15_000, "nested too deeply|not JSON"),
        (b'{"old":16,"new":' + b"9" * 5_000 + b',"proof":[]}', "more than 20 digits"),
        (b'{"old":1,"new":2,"proof":[],"proof":["x"]}', "duplicate key"),
        (_reply(proof=[ROOT_B64[:42] + "\u00e9="]), "proof hash 0 is not valid base64"),
        (_reply(old=1.5), "integer from 0 to 2\\^53 - 1"),
        (_reply(proof=[{}]), "proof hash 0"),
        (_reply(proof="AA"), "a 'proof' list"),
        (_reply(size=-1), "'size' must be an integer"),
        (_reply(nonce="AAAA"), "'nonce' must be 16 bytes"),
        (_reply(sig="AAAA"), "'sig' must be 64 bytes"),
        (_reply(log="jpn"), "'log' must be a member's name"),
        # Beyond RFC 8785 (integers to 2^53, no lone surrogates): no log signed it.
        (_reply(size=2**60, new=2**60), "integer from 0 to 2\\^53 - 1"),
        (_reply(proof=[1e300]), "cannot be put in RFC 8785 form|proof hash 0"),
        (
            json.dumps(
                {
                    "error": "\ud800",
                    "log": "JPN",
                    "new": 2,
                    "nonce": NONCE_B64,
                    "old": 1,
                    "sig": base64.b64encode(bytes(64)).decode(),
                    "size": 2,
                }
            ).encode(),
            "cannot be put in RFC 8785 form",
        ),
        (_reply(size=None), "exactly the members of a proof"),  # a member missing
        (_reply(extra=1), "exactly the members of a proof"),
        (b'{"error":7}', "exactly the members of a proof"),
    ],
)
def test_hostile_proof_responses_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(AuditError, match=reason):
        parse_proof_response(body)


def test_a_proof_from_size_zero_is_an_empty_proof_on_the_wire() -> None:
    # C2SP tlog-witness: old size 0 means "no previous checkpoint", proved by nothing.
    assert parse_proof_request(proof_request(0, 110, NONCE)) == (0, 110, NONCE)
    body = proof_response("JPN", 0, 110, [], size=110, nonce=NONCE, signer=LOG)
    assert parse_proof_response(body).proof == ()


@settings(max_examples=300)
@given(
    origin=st.text(max_size=8),
    size=st.text(max_size=25),
    root=st.text(max_size=50),
    sig_line=st.text(max_size=60),
)
def test_any_checkpoint_note_opens_or_is_refused_with_a_short_note_error(
    origin: str, size: str, root: str, sig_line: str
) -> None:
    # What a hostile member controls in a checkpoint: every line of it.
    note = f"{origin}\n{size}\n{root}\n\n\u2014 {sig_line}\n"
    reason = ""
    try:
        open_checkpoint(note, [_log_key("KOR")])
    except NoteError as exc:
        reason = str(exc)
    assert len(reason) < 120


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    value=st.one_of(
        _JSON,
        st.fixed_dictionaries({"old": _JSON, "new": _JSON, "proof": st.lists(st.text() | _JSON)}),
        st.fixed_dictionaries({"old": _JSON, "new": _JSON}),
    )
)
def test_any_json_proof_message_parses_or_is_refused_with_an_audit_error(value: object) -> None:
    body = json.dumps(value).encode()
    for parser in (parse_proof_request, parse_proof_response):
        reason = ""
        try:
            parser(body)
        except AuditError as exc:
            reason = str(exc)
        assert len(reason) < 120
