"""Keys made on a member's machine: msmt keys authority, request and accept, on real files.

The member's directory and the custodian's are separate, as on two machines; only
the request file and the public roster files pass between them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
import shutil
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jws
from joserfc.jwk import Key, KeySet, OKPKey
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jws as jwc_jws
from jwcrypto.common import JWException

from broker import keyrequest, keys, keys_custodian, keys_roster, keys_users
from broker.cli import main
from broker.errors import KeyMaterialError
from broker.roster import Roster

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: 'changes nothing' is asserted against this."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def msmt(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def payload_of(path: Path) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(unb64(json.loads(path.read_text())["payload"]))
    return value


def private_key(keydir: Path, member: str, kid: str) -> OKPKey:
    return keys.load_private_jwk(keys.key_path(keydir, member, kid), use="sig")


def signed_request(payload: dict[str, Any], signers: list[Key]) -> dict[str, Any]:
    """A request of ``payload`` signed as make_request signs, for payloads it would not make."""
    value = jws.serialize_json(
        [
            {"protected": {"alg": "Ed25519", "kid": k.kid, "typ": keyrequest.REQUEST_TYP}}
            for k in signers
        ],
        rfc8785.dumps(payload),
        KeySet(signers),
        algorithms=["Ed25519"],
    )
    return dict(value)


@pytest.fixture
def custodian(tmp_path: Path) -> Path:
    """A custodian's directory from msmt keys authority, with JPN joined (by fingerprint)."""
    folder = tmp_path / "custodian"
    done = msmt("keys", "authority", "--dir", folder, "--audit")
    assert done.exit_code == 0, done.output
    jpn = tmp_path / "jpn"
    made = keyrequest.make_request(jpn, "JPN", first=True, now=T0)
    keyrequest.accept_request(folder, made.path, expected_fingerprint=made.fingerprint, now=T0)
    return folder


def install_roster(custodian: Path, member_dir: Path) -> None:
    """What a member does with a published roster: copy the three public files."""
    for name in (keys.ROSTER_FILE, keys.ROSTER_SIG_FILE, keys.AUTHORITY_PUBLIC_FILE):
        shutil.copy(custodian / name, member_dir / name)


def test_authority_starts_an_empty_signed_roster_and_no_member_keys(tmp_path: Path) -> None:
    folder = tmp_path / "custodian"
    done = msmt("keys", "authority", "--dir", folder)
    assert done.exit_code == 0, done.output
    signed = keys_roster.load_signed_roster(folder)
    assert (signed.version, len(signed.roster), signed.jwks["keys"]) == (1, 0, [])
    assert isinstance(Roster.from_jwks(signed.jwks), Roster)
    assert json.loads((folder / keys.NATS_USERS_FILE).read_text()) == {"msmt_version": 1}
    authority = keys.load_authority(folder / keys.AUTHORITY_PUBLIC_FILE)
    assert f"authority thumbprint (RFC 7638): {authority.thumbprint()}" in done.output
    assert stat.S_IMODE((folder / keys.AUTHORITY_PRIVATE_FILE).stat().st_mode) == 0o600
    # Only the authority's own files: no member's and no AUDIT seed without --audit.
    assert sorted(snapshot(folder)) == sorted(
        [
            keys.AUTHORITY_PRIVATE_FILE,
            keys.AUTHORITY_PUBLIC_FILE,
            keys.NATS_USERS_FILE,
            keys_users.NATS_USERS_SIG_FILE,
            keys_users.NATS_USERS_SIGNED_FILE,
            keys.ROSTER_FILE,
            keys.ROSTER_SIG_FILE,
            keys.ROSTER_SIGNED_FILE,
        ]
    )
    before = snapshot(folder)
    again = msmt("keys", "authority", "--dir", folder, "--audit")
    assert again.exit_code == 2
    assert again.stderr == (
        f"msmt: error: {folder / keys.ROSTER_FILE} already exists: {folder} has a roster "
        "authority\n"
    )
    assert snapshot(folder) == before


def test_authority_with_audit_makes_the_audit_nats_user(tmp_path: Path) -> None:
    folder = tmp_path / "custodian"
    assert msmt("keys", "authority", "--dir", folder, "--audit").exit_code == 0
    seed = folder / keys.AUDIT_ACCOUNT / keys.NATS_SEED_FILE
    assert stat.S_IMODE(seed.stat().st_mode) == 0o600
    signed = keys_users.load_signed_users(folder)
    assert signed.users == {"AUDIT": keys.nats_public(seed.read_bytes(), "seed")}
    assert signed.version == 1


def test_request_makes_private_keys_and_a_request_of_public_keys_only(tmp_path: Path) -> None:
    member = tmp_path / "gbr"
    done = msmt(
        "keys", "request", "gbr", "--dir", member, "--out", tmp_path / "req.json", "--first"
    )
    assert done.exit_code == 0, done.output
    folder = member / "GBR"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 3
    assert all(stat.S_IMODE((folder / f).stat().st_mode) == 0o600 for f in files)
    sig_kid, enc_kid = (f.removesuffix(".jwk") for f in files[1::-1])
    assert sig_kid.startswith("GBR-sig-")
    assert enc_kid.startswith("GBR-enc-")
    payload = payload_of(tmp_path / "req.json")
    seed = (folder / keys.NATS_SEED_FILE).read_bytes()
    assert set(payload) == {"msmt_member", "keys", "msmt_nats_user", "iat"}
    assert payload["msmt_member"] == "GBR"
    assert payload["msmt_nats_user"] == keys.nats_public(seed, "seed")
    assert [k["kid"] for k in payload["keys"]] == [sig_kid, enc_kid]
    for jwk in payload["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}
        mine = json.loads((folder / f"{jwk['kid']}.jwk").read_text())
        assert jwk == {k: mine[k] for k in jwk}
    text = (tmp_path / "req.json").read_text()
    assert '"d"' not in text
    assert seed.decode().strip() not in text
    fingerprint = "sha256:" + hashlib.sha256(rfc8785.dumps(payload)).hexdigest()
    assert f"fingerprint {fingerprint}\n" in done.output
    assert f"new keys {sig_kid} and {enc_kid}" in done.output
    assert "signed by the new key only (a first request: no roster here yet)" in done.output
    # An existing file is never overwritten, and nothing is made then.
    other = tmp_path / "other"
    again = msmt(
        "keys", "request", "GBR", "--dir", other, "--out", tmp_path / "req.json", "--first"
    )
    assert again.exit_code == 2
    assert (
        again.stderr
        == f"msmt: error: {tmp_path / 'req.json'} already exists: choose another --out\n"
    )
    assert not other.exists()
    assert len(list(folder.iterdir())) == 3


def test_the_request_is_a_standard_jws_that_jwcrypto_verifies(
    custodian: Path, tmp_path: Path
) -> None:
    # A routine rotation request: two signatures, by the new key and the current one.
    jpn = tmp_path / "jpn"
    install_roster(custodian, jpn)
    old_kid = keys_roster.load_signed_roster(jpn).roster.current("JPN", "sig", T0).kid
    made = keyrequest.make_request(jpn, "JPN", now=T0 + timedelta(days=1))
    assert made.endorsed_by == old_kid
    token = jwc_jws.JWS()
    token.deserialize(made.path.read_text())
    new_public = jwc_jwk.JWK(**payload_of(made.path)["keys"][0])
    old_public = jwc_jwk.JWK(**dict(keys_roster.load_signed_roster(jpn).roster.get(old_kid).jwk))
    for public in (new_public, old_public):
        token.verify(public, alg="Ed25519")
        assert json.loads(token.payload) == payload_of(made.path)
    signatures = json.loads(made.path.read_text())["signatures"]
    headers = [json.loads(unb64(s["protected"])) for s in signatures]
    assert headers == [
        {"alg": "Ed25519", "kid": made.sig_kid, "typ": "msmt-key-request+jws"},
        {"alg": "Ed25519", "kid": old_kid, "typ": "msmt-key-request+jws"},
    ]
    # ... and no other key: jwcrypto checks, it does not just parse.
    stranger = jwc_jwk.JWK(**keys.public_jwk(keys.generate_key("JPN", "sig", T0)))
    with pytest.raises(JWException):
        token.verify(stranger, alg="Ed25519")


def test_a_new_member_joins_by_request_and_fingerprint(custodian: Path, tmp_path: Path) -> None:
    gbr = tmp_path / "gbr"
    request = tmp_path / "gbr-request.json"
    done = msmt("keys", "request", "GBR", "--dir", gbr, "--out", request, "--first")
    assert done.exit_code == 0, done.output
    found = re.search(r"^fingerprint (sha256:[0-9a-f]{64})$", done.output, re.MULTILINE)
    assert found is not None, done.output
    fingerprint = found[1]
    # It is public and acceptable for 30 days whoever hands it over: a member that
    # deleted its unused keys before then could be rotated to keys nobody holds.
    iat = datetime.fromtimestamp(payload_of(request)["iat"], UTC)
    until = (iat + keyrequest.MAX_REQUEST_AGE).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert done.output.splitlines()[-2] == (
        f"acceptable until {until}: keep the new key files until then, even if you never send"
        " this request (whoever hands it to the custodian gets it accepted)"
    )
    before = snapshot(custodian)
    # No current key of GBR signed it: the custodian must phone.
    refused = msmt("keys", "accept", request, "--dir", custodian)
    assert refused.exit_code == 2
    assert refused.stderr == (
        f"msmt: error: {request}: the request carries no signature by a current key of GBR "
        "(it is signed only by its new key): compare its fingerprint with GBR by phone and "
        "pass --fingerprint\n"
    )
    assert snapshot(custodian) == before
    accepted = msmt(
        "keys", "accept", request, "--dir", custodian, "--fingerprint", fingerprint.upper()
    )
    assert accepted.exit_code == 0, accepted.output
    signed = keys_roster.load_signed_roster(custodian, min_version=3)
    assert signed.version == 3
    payload = payload_of(request)
    sig_kid, enc_kid = (k["kid"] for k in payload["keys"])
    now = datetime.now(UTC)
    assert signed.roster.current("GBR", "sig", now).kid == sig_kid
    assert signed.roster.current("GBR", "enc", now).kid == enc_kid
    entry = next(e for e in signed.jwks["keys"] if e["kid"] == sig_kid)
    assert {k: entry[k] for k in payload["keys"][0]} == payload["keys"][0]
    users = keys_users.load_signed_users(custodian).users
    assert users["GBR"] == payload["msmt_nats_user"]
    assert set(users) == {"AUDIT", "JPN", "GBR"}
    assert accepted.output.splitlines()[0] == (
        f"accepted {request} from GBR, authorized by the fingerprint compared with GBR"
    )
    assert f"GBR: new keys {sig_kid} and {enc_kid}, active " in accepted.output
    made = iat.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert accepted.output.splitlines()[2] == f"made {made} (less than a day ago)"
    assert "retired" not in accepted.output
    assert (
        f"GBR's NATS user added in {custodian / keys.NATS_USERS_FILE} (version 3, signed), a"
        " new account on the "
        "hub: regenerate the hub's configuration with 'msmt nats config' and RESTART every hub "
        "server (one at a time); a reload does not set up a new account, whose publishes then "
        "fail"
    ) in accepted.output
    assert "roster version 3: publish roster.json and roster.json.jws" in accepted.output
    # The custodian never held a private key of GBR, nor of JPN.
    assert {name.split("/")[0] for name in snapshot(custodian) if "/" in name} == {
        "authority",
        "AUDIT",
    }
    # The hub configuration takes the new user.
    config = msmt(
        "nats",
        "config",
        "--keys",
        custodian,
        "--authority",
        custodian / keys.AUTHORITY_PUBLIC_FILE,
        "--out",
        tmp_path / "hub.conf",
    )
    assert config.exit_code == 0, config.output
    assert payload["msmt_nats_user"] in (tmp_path / "hub.conf").read_text()


def test_a_routine_rotation_is_accepted_on_the_current_keys_signature(
    custodian: Path, tmp_path: Path
) -> None:
    jpn = tmp_path / "jpn"
    install_roster(custodian, jpn)
    old = keys_roster.load_signed_roster(jpn).roster
    old_sig, old_enc = (old.current("JPN", u, T0).kid for u in ("sig", "enc"))
    public = {n: (jpn / n).read_bytes() for n in (keys.ROSTER_FILE, keys.ROSTER_SIG_FILE)}
    t1 = T0 + timedelta(days=40)
    made = keyrequest.make_request(jpn, "JPN", now=t1)
    # Nothing of the roster changes on the member's side.
    assert {n: (jpn / n).read_bytes() for n in public} == public
    done = keyrequest.accept_request(custodian, made.path, now=t1 + timedelta(hours=2))
    assert done.authorized_by == f"the signature of JPN's current key {old_sig}"
    assert done.retired == (old_sig, old_enc)
    assert done.previous_nats_user == done.nats_user  # the seed was kept
    signed = keys_roster.load_signed_roster(custodian)
    assert signed.version == 3
    t2 = t1 + timedelta(hours=2)
    assert signed.roster.get(old_sig).status == "retired"
    assert signed.roster.get(old_sig).retired_at == t2
    assert signed.roster.current("JPN", "sig", t2).kid == made.sig_kid
    assert signed.roster.get(made.sig_kid).valid_until == t2 + timedelta(days=730)
    # Old reports still verify; the member's node, given the new roster, signs with the new key
    # and keeps the old enc key for what partners encrypted to it just before.
    assert signed.roster.check(old_sig, member="JPN", use="sig", at=t2 - timedelta(seconds=1))
    install_roster(custodian, jpn)
    mine = keys.load_member_keys(jpn, "JPN", keys_roster.load_signed_roster(jpn).roster, t2)
    assert mine.signing_kid == made.sig_kid
    assert set(mine.decryption) == {old_enc, made.enc_kid}
    assert mine.pending == ()


def test_a_node_starts_with_a_pending_request_and_uses_the_accepted_keys(
    custodian: Path, tmp_path: Path
) -> None:
    jpn = tmp_path / "jpn"
    install_roster(custodian, jpn)
    roster = keys_roster.load_signed_roster(jpn).roster
    current = keys.load_member_keys(jpn, "JPN", roster, T0)
    made = keyrequest.make_request(jpn, "JPN", now=T0 + timedelta(days=1))
    # The request is pending: the node runs on its current keys, and names the new ones.
    mine = keys.load_member_keys(jpn, "JPN", roster, T0 + timedelta(days=1))
    assert mine.signing_kid == current.signing_kid
    assert set(mine.decryption) == set(current.decryption)
    assert mine.pending == (made.enc_kid, made.sig_kid)


# --- refusals: each one line, exit 2, nothing written ------------------------------------


@pytest.fixture
def pending(custodian: Path, tmp_path: Path) -> keyrequest.Request:
    """A rotation request by JPN, signed by its new key and its current one."""
    jpn = tmp_path / "jpn"
    install_roster(custodian, jpn)
    return keyrequest.make_request(jpn, "JPN", now=T0 + timedelta(days=1))


def refused(custodian: Path, request: Path, *flags: str) -> str:
    """Run msmt keys accept, expecting a one-line refusal; return the reason."""
    before = snapshot(custodian)
    done = msmt("keys", "accept", request, "--dir", custodian, *flags)
    assert done.exit_code == 2, done.output
    assert done.stdout == ""
    assert done.stderr.startswith(f"msmt: error: {request}")
    assert done.stderr.count("\n") == 1, done.stderr
    assert snapshot(custodian) == before
    return done.stderr.removeprefix(f"msmt: error: {request}").rstrip("\n")


def rewrite(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value) if not isinstance(value, str) else value)


@functools.cache
def original(path: Path) -> bytes:
    return path.read_bytes()


def resigned(pending: keyrequest.Request, tmp_path: Path, **changes: Any) -> dict[str, Any]:
    """The pending request as made, its payload changed and signed again by its own keys."""
    jpn = tmp_path / "jpn"
    payload = json.loads(unb64(json.loads(original(pending.path))["payload"])) | changes
    signers: list[Key] = [private_key(jpn, "JPN", pending.sig_kid)]
    if pending.endorsed_by is not None:
        signers.append(private_key(jpn, "JPN", pending.endorsed_by))
    return signed_request(payload, signers)


def test_a_tampered_payload_is_refused(custodian: Path, pending: keyrequest.Request) -> None:
    value = json.loads(pending.path.read_text())
    payload = payload_of(pending.path)
    payload["msmt_nats_user"] = keys.nats_public(keys.new_nats_seed(), "x")
    value["payload"] = b64(rfc8785.dumps(payload))
    rewrite(pending.path, value)
    assert refused(custodian, pending.path) == (
        f": the signature by its new key {pending.sig_kid} does not verify: the request was altered"
    )


@pytest.mark.parametrize("where", ["payload", "file"])
def test_a_private_key_anywhere_is_refused_as_disclosed(
    custodian: Path, pending: keyrequest.Request, tmp_path: Path, where: str
) -> None:
    private = private_key(tmp_path / "jpn", "JPN", pending.sig_kid).as_dict(private=True)
    if where == "payload":
        keys_ = payload_of(pending.path)["keys"]
        rewrite(pending.path, resigned(pending, tmp_path, keys=[private, keys_[1]]))
    else:  # the member sent its key file instead of the request
        rewrite(pending.path, private)
    reason = refused(custodian, pending.path)
    # A pending request's key, which the roster does not list: nothing to revoke.
    assert reason.startswith(
        " holds a private key (a 'd' member) that the roster does not list (a pending "
        "request's key): the member sent its secret"
    )
    assert str(private["d"]) not in reason


def test_keys_of_another_member_or_of_the_wrong_kind_are_refused(
    custodian: Path, pending: keyrequest.Request, tmp_path: Path
) -> None:
    sig, enc = payload_of(pending.path)["keys"]
    cases = [
        ([{**sig, "kid": sig["kid"].replace("JPN", "USA")}, enc], "key 1: kid 'USA-sig-"),
        ([sig, {**enc, "kid": enc["kid"].replace("enc", "sig")}], "key 2: kid 'JPN-sig-"),
        ([sig, {**enc, "crv": "Ed25519"}], "key 2: use enc needs kty OKP, crv X25519"),
        ([sig, {**enc, "alg": "ECDH-ES"}], "key 2: use enc needs kty OKP, crv X25519 and alg"),
        ([sig, {**enc, "use": "sig"}], "key 2: use sig needs kty OKP, crv Ed25519"),
        ([sig, {**enc, "x5u": "https://example.org"}], "key 2 must have exactly alg, crv, kid"),
        ([sig, {**enc, "use": ["enc"]}], "key 2: use must be 'sig' or 'enc'"),
        ([sig], "'keys' must list two keys"),
        # A review: Python's \d took other scripts' digits into the signed roster.
        (
            [sig, {**enc, "kid": re.sub("[0-9]", lambda d: chr(0x660 + int(d[0])), enc["kid"])}],
            "key 2: kid 'JPN-enc-\u0662",
        ),
        (
            [sig, {**enc, "kid": re.sub("[0-9]", lambda d: chr(0xFF10 + int(d[0])), enc["kid"])}],
            "is not of the form JPN-enc-YYYYMMDD",
        ),
    ]
    for listed, reason in cases:
        rewrite(pending.path, resigned(pending, tmp_path, keys=listed))
        assert reason in refused(custodian, pending.path)
    rewrite(pending.path, resigned(pending, tmp_path, msmt_member="XYZ"))
    assert refused(custodian, pending.path) == ": msmt_member 'XYZ' is not an MSMT member"
    rewrite(pending.path, resigned(pending, tmp_path, msmt_nats_user="SUABC"))
    assert "msmt_nats_user: not a NATS user public nkey" in refused(custodian, pending.path)


def test_a_signature_by_a_revoked_key_does_not_count(
    custodian: Path, pending: keyrequest.Request
) -> None:
    # The old key was stolen: whoever holds it must not get new keys accepted.
    assert pending.endorsed_by is not None
    keys_custodian.revoke_key(
        custodian, pending.endorsed_by, "laptop stolen", now=T0 + timedelta(days=1)
    )
    at = T0 + timedelta(days=1, hours=1)
    with pytest.raises(KeyMaterialError) as info:
        keyrequest.accept_request(custodian, pending.path, now=at)
    assert str(info.value) == (
        f"{pending.path}: the request carries no signature by a current key of JPN (its other "
        f"signature does not count: key {pending.endorsed_by} is revoked): compare its "
        "fingerprint with JPN by phone and pass --fingerprint"
    )
    # After the phone call, the same request is accepted.
    done = keyrequest.accept_request(
        custodian, pending.path, expected_fingerprint=pending.fingerprint, now=at
    )
    assert done.authorized_by == "the fingerprint compared with JPN"


def test_a_retired_keys_signature_does_not_count(custodian: Path, tmp_path: Path) -> None:
    jpn = tmp_path / "jpn"
    install_roster(custodian, jpn)
    first = keyrequest.make_request(jpn, "JPN", now=T0 + timedelta(days=1))
    second = keyrequest.make_request(jpn, "JPN", now=T0 + timedelta(days=1))
    assert first.endorsed_by == second.endorsed_by is not None
    keyrequest.accept_request(custodian, first.path, now=T0 + timedelta(days=2))
    # The key that signed the second request was retired by the first.
    with pytest.raises(KeyMaterialError, match=f"key {first.endorsed_by} was retired at"):
        keyrequest.accept_request(custodian, second.path, now=T0 + timedelta(days=2))


def test_a_wrong_fingerprint_is_refused_even_with_a_current_signature(
    custodian: Path, pending: keyrequest.Request
) -> None:
    wrong = "sha256:" + "ab" * 32
    assert refused(custodian, pending.path, "--fingerprint", wrong) == (
        f": its fingerprint is not {wrong}: this is not the request JPN read out to you; do "
        "not accept it"
    )
    done = msmt("keys", "accept", pending.path, "--dir", custodian, "--fingerprint", "sha256:ab")
    assert done.exit_code == 2
    assert done.stderr == (
        "msmt: error: --fingerprint must be 'sha256:' followed by 64 hex digits\n"
    )


def test_a_request_accepted_before_is_refused(custodian: Path, pending: keyrequest.Request) -> None:
    keyrequest.accept_request(custodian, pending.path, now=T0 + timedelta(days=1))
    assert refused(custodian, pending.path) == (
        f": key 1: {pending.sig_kid} is already in the roster: this request was accepted before"
    )


def test_a_request_from_the_future_or_too_old_is_refused(
    custodian: Path, pending: keyrequest.Request
) -> None:
    made = T0 + timedelta(days=1)
    before = snapshot(custodian)
    with pytest.raises(KeyMaterialError, match="iat is in the future: check the member's clock"):
        keyrequest.accept_request(custodian, pending.path, now=made - timedelta(minutes=6))
    with pytest.raises(KeyMaterialError, match=r"made 2026-11-02T00:00:00Z, more than 30 days"):
        keyrequest.accept_request(custodian, pending.path, now=made + timedelta(days=30, seconds=1))
    assert snapshot(custodian) == before
    # Within the skew and the age limit, it passes (signed by the current key, valid then).
    keyrequest.accept_request(custodian, pending.path, now=made - timedelta(minutes=4))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda v: {**v["signatures"][0], "payload": v["payload"]}, ": not a JWS in General JSON"),
        (lambda v: {**v, "signatures": []}, ": 'signatures' must list one or two"),
        (
            lambda v: {**v, "signatures": [{**v["signatures"][0], "header": {"kid": "x"}}]},
            ": signature 1 must be exactly 'protected' and 'signature' (no unprotected header)",
        ),
        (lambda v: {**v, "signatures": v["signatures"][1:]}, ": no signature by its new key"),
        (lambda v: {**v, "payload": v["payload"] + "="}, ": the payload is not base64url JSON"),
        (
            lambda v: {
                **v,
                "signatures": [{**v["signatures"][0], "protected": b64(b'{"alg":"none"}')}],
            },
            ": signature 1's protected header must be exactly alg Ed25519, typ "
            "msmt-key-request+jws and a kid",
        ),
        (lambda v: '{"payload": "x", "payload": "y"}', " is not valid JSON: duplicate JSON member"),
        (lambda v: "{" * 20_000, " is too large for a key request"),
        (lambda v: "[" * 10_000 + "]" * 10_000, " is too large for a key request"),
        (lambda v: "[" * 5_000 + "]" * 5_000, " is not valid JSON: JSON nested too deeply"),
    ],
)
def test_a_malformed_request_is_one_line(
    custodian: Path, pending: keyrequest.Request, damage: Any, reason: str
) -> None:
    rewrite(pending.path, damage(json.loads(pending.path.read_text())))
    assert refused(custodian, pending.path).startswith(reason)


def test_a_signature_by_another_members_key_is_refused(custodian: Path, tmp_path: Path) -> None:
    usa = tmp_path / "usa"
    made = keyrequest.make_request(usa, "USA", first=True, now=T0)
    keyrequest.accept_request(custodian, made.path, expected_fingerprint=made.fingerprint, now=T0)
    jpn = tmp_path / "jpn"
    install_roster(custodian, jpn)
    request = keyrequest.make_request(jpn, "JPN", now=T0 + timedelta(days=1))
    payload = payload_of(request.path)
    forged = signed_request(
        payload, [private_key(jpn, "JPN", request.sig_kid), private_key(usa, "USA", made.sig_kid)]
    )
    rewrite(request.path, forged)
    assert refused(custodian, request.path) == (
        f": signed by {made.sig_kid}, a sig key of USA, not a signing key of JPN"
    )


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["set", "delete", "insert"]),
            st.floats(0, 1, exclude_max=True),
            st.sampled_from(list(b'aZ09-_={}[]":,. \\\x00\xff')),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_any_damage_to_a_request_is_refused_with_one_line(
    custodian: Path, pending: keyrequest.Request, edits: list[tuple[str, float, int]]
) -> None:
    made = original(pending.path)
    data = bytearray(made)
    for op, where, byte in edits:
        at = int(where * len(data))
        if op == "set":
            data[at] = byte
        elif op == "delete":
            del data[at]
        else:
            data.insert(at, byte)
    try:
        if json.loads(data) == json.loads(made):
            return  # only the layout changed (white space): the same request
    except ValueError:
        pass
    pending.path.write_bytes(bytes(data))
    with pytest.raises(KeyMaterialError) as info:
        keyrequest.accept_request(custodian, pending.path, now=T0 + timedelta(days=1, hours=1))
    assert "\n" not in str(info.value)


def test_the_members_roster_is_verified_against_its_pinned_authority(
    custodian: Path, tmp_path: Path
) -> None:
    jpn = tmp_path / "jpn"
    install_roster(custodian, jpn)
    pinned = tmp_path / "etc" / "roster-authority.json"
    pinned.parent.mkdir()
    (jpn / keys.AUTHORITY_PUBLIC_FILE).rename(pinned)
    other = tmp_path / "other"
    keyrequest.init_authority(other)
    before = snapshot(jpn)
    for authority, reason in (
        # Pinned elsewhere, as a deployment should: the line says how to name it.
        (
            None,
            f"no roster-authority key at {jpn / keys.AUTHORITY_PUBLIC_FILE}: name the pinned"
            " copy with --authority (the node's keys.authority)",
        ),
        (other / keys.AUTHORITY_PUBLIC_FILE, "not by the pinned roster authority"),
    ):
        flags: list[str | Path] = [] if authority is None else ["--authority", authority]
        done = msmt("keys", "request", "JPN", "--dir", jpn, *flags)
        assert done.exit_code == 2
        assert reason in done.stderr
        assert done.stderr.count("\n") == 1
        assert snapshot(jpn) == before  # no key made, no request written
    checked = msmt("keys", "verify-roster", "--dir", jpn)
    assert checked.exit_code == 2
    assert checked.stderr.endswith(
        ": name the pinned copy with --authority (the node's keys.authority)\n"
    )
    done = msmt("keys", "request", "JPN", "--dir", jpn, "--authority", pinned)
    assert done.exit_code == 0, done.output
    old = keys_roster.load_signed_roster(jpn, authority_path=pinned).roster.current(
        "JPN", "sig", T0
    )
    assert f"signed by the new key and by the current key {old.kid}\n" in done.output


def test_a_nats_seed_sent_for_a_request_is_refused_as_disclosed(
    custodian: Path, tmp_path: Path
) -> None:
    # An onboarding trial: a member sent keys/JPN/nats.nk instead of its request, and
    # the custodian was told only "is not valid JSON", nothing of the login now exposed.
    seed = tmp_path / "jpn" / "JPN" / keys.NATS_SEED_FILE
    sent = tmp_path / "sent.request.json"
    shutil.copy(seed, sent)
    with pytest.raises(KeyMaterialError) as refused_:
        keyrequest.accept_request(custodian, sent, now=T0)
    assert str(refused_.value) == (
        f"{sent} is a NATS seed (a private hub login), not a key request: it is disclosed;"
        " the member makes a new one (msmt keys request --new-nats-user), and the hub"
        " operator reloads the hub with it (docs/KEYS.md, after a compromise)"
    )
    assert seed.read_bytes().strip().decode() not in str(refused_.value)


def test_a_request_dated_a_little_ahead_is_said_so_not_minus_a_day_ago() -> None:
    # An onboarding trial's accept printed "made ... (-1 days ago)" for a request made
    # on a machine whose clock ran 4 minutes ahead (within what accept allows).
    from broker.cli.keys import _made_ago

    assert _made_ago(timedelta(minutes=-4)) == "240 s ahead of this machine's clock"
    assert _made_ago(timedelta(hours=3)) == "less than a day ago"
    assert _made_ago(timedelta(days=1, hours=2)) == "1 day ago"
    assert _made_ago(timedelta(days=29)) == "29 days ago"
