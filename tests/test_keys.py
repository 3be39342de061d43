"""Key generation, the signed roster, rotation and revocation, on real files."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nkeys
import pytest
import rfc8785
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc.jwk import OKPKey
from jwcrypto import jwk as jwc_jwk
from jwcrypto import jws as jwc_jws

from broker import keys, keys_custodian, keys_roster, keys_users
from broker.cli import main
from broker.errors import KeyMaterialError, UsageError, WriteError
from broker.roster import Roster, format_time

MSMT = str(Path(sys.executable).parent / "msmt")

T0 = datetime(2026, 11, 1, tzinfo=UTC)
MEMBERS3 = ("JPN", "USA", "KOR")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: 'changes nothing' is asserted against this."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    keys_custodian.init_keys(path, MEMBERS3, now=T0, valid_days=365)
    return path


def test_init_writes_private_keys_0600_and_a_public_signed_roster(keydir: Path) -> None:
    signed = keys_roster.load_signed_roster(keydir)
    assert signed.version == 1
    assert len(signed.roster) == 6
    for member in MEMBERS3:
        folder = keydir / member
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        files = sorted(folder.iterdir())
        assert len(files) == 3  # sig, enc, nats seed
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        sig = signed.roster.current(member, "sig", T0)
        enc = signed.roster.current(member, "enc", T0)
        assert sig.jwk["crv"] == "Ed25519"
        assert sig.jwk["alg"] == "Ed25519"
        assert enc.jwk["crv"] == "X25519"
        assert enc.jwk["alg"] == "ECDH-ES+A256KW"
        assert sig.kid.startswith(f"{member}-sig-20261101-")
        assert sig.valid_until - sig.valid_from == timedelta(days=365)
    assert stat.S_IMODE((keydir / keys.AUTHORITY_PRIVATE_FILE).stat().st_mode) == 0o600
    assert "AUDIT" in json.loads((keydir / keys.NATS_USERS_FILE).read_text())
    # No secret reaches a public file: no "d" member, no nkey seed.
    seeds = [(keydir / a / keys.NATS_SEED_FILE).read_text().strip() for a in (*MEMBERS3, "AUDIT")]
    assert all(seed.startswith("SU") for seed in seeds)
    for name in (keys.ROSTER_FILE, keys.AUTHORITY_PUBLIC_FILE, keys.NATS_USERS_FILE):
        text = (keydir / name).read_text()
        assert '"d"' not in text
        assert not any(seed in text for seed in seeds)


@pytest.mark.parametrize("umask", [0o000, 0o002, 0o022])
def test_init_makes_no_directory_others_can_write_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    # A key directory others can write lets them swap keys/JPN/ or the roster
    # and its authority for their own, though they cannot read the keys. Before
    # the fix, `keys` and the folders above it were made 0777 under umask 000.
    keydir = tmp_path / "deploy" / "keys"
    done = subprocess.run(
        [MSMT, "keys", "init", "--dir", str(keydir), "--members", "JPN"],
        capture_output=True,
        text=True,
        umask=umask,
        check=False,
        # No bytecode written under umask 000 into the suite's shared cache prefix: its
        # new folders would be 0777, which every msmt after refuses (broker.code_check).
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr
    made = {p: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "deploy", *keydir.rglob("*"))}
    made[keydir] = stat.S_IMODE(keydir.stat().st_mode)
    writable = {str(p): f"{m:04o}" for p, m in made.items() if p.is_dir() and m & 0o022}
    assert writable == {}
    assert made[keydir / "JPN"] == 0o700
    assert made[keydir] == 0o755 & ~umask


def test_gitignore_keeps_private_keys_out_of_git() -> None:
    repo = Path(__file__).resolve().parent.parent
    private = ["keys/JPN/JPN-sig-20261101-00000000.jwk", "keys/JPN/nats.nk"]
    private.append("keys/authority/roster-authority.jwk")
    for path in private:
        assert (
            subprocess.run(["git", "check-ignore", "-q", path], check=False, cwd=repo).returncode
            == 0
        )
    public = ["keys/roster.json", "keys/roster.json.jws", "keys/roster-authority.json"]
    public += ["keys/nats-users.json", "keys/nats-users.json.jws"]
    for path in public:
        assert (
            subprocess.run(["git", "check-ignore", "-q", path], check=False, cwd=repo).returncode
            == 1
        )


def test_init_refuses_to_overwrite_without_force(keydir: Path) -> None:
    before = snapshot(keydir)
    with pytest.raises(KeyMaterialError, match="already exists; use --force"):
        keys_custodian.init_keys(keydir, MEMBERS3)
    assert snapshot(keydir) == before
    keys_custodian.init_keys(keydir, MEMBERS3, force=True)
    after = snapshot(keydir)
    assert after[keys.ROSTER_FILE] != before[keys.ROSTER_FILE]
    assert len(list((keydir / "JPN").iterdir())) == 3  # old keys replaced, not added


def test_private_keys_interoperate_with_jwcrypto(keydir: Path) -> None:
    signed = keys_roster.load_signed_roster(keydir)
    mine = keys.load_member_keys(keydir, "JPN", signed.roster, T0)
    raw = json.loads(keys.key_path(keydir, "JPN", mine.signing_kid).read_text())
    other = jwc_jwk.JWK(**raw)
    token = jwc_jws.JWS(b"payload")
    token.add_signature(other, alg="Ed25519", protected={"alg": "Ed25519"})
    verified = jwc_jws.JWS()
    verified.deserialize(token.serialize(compact=True))
    public = jwc_jwk.JWK(**dict(signed.roster.get(mine.signing_kid).jwk))
    verified.verify(public, alg="Ed25519")
    assert verified.payload == b"payload"


def test_roster_signature_verifies_in_jwcrypto(keydir: Path) -> None:
    jwks = json.loads((keydir / keys.ROSTER_FILE).read_text())
    detached = (keydir / keys.ROSTER_SIG_FILE).read_text().strip()
    authority = jwc_jwk.JWK(**json.loads((keydir / keys.AUTHORITY_PUBLIC_FILE).read_text()))
    token = jwc_jws.JWS()
    token.deserialize(detached)
    token.verify(authority, alg="Ed25519", detached_payload=rfc8785.dumps(jwks))
    assert token.jose_header["typ"] == keys.ROSTER_JWS_TYP


def test_rotate_retires_old_keys_which_still_verify_older_reports(keydir: Path) -> None:
    old = keys_roster.load_signed_roster(keydir).roster.current("JPN", "sig", T0)
    old_enc = keys_roster.load_signed_roster(keydir).roster.current("JPN", "enc", T0)
    t1 = T0 + timedelta(days=10)
    new_sig, new_enc = keys_custodian.rotate_keys(keydir, "JPN", now=t1, valid_days=365)
    signed = keys_roster.load_signed_roster(keydir, min_version=2)
    assert signed.version == 2
    retired = signed.roster.get(old.kid)
    assert retired.status == "retired"
    assert retired.retired_at == t1
    assert signed.roster.current("JPN", "sig", t1).kid == new_sig
    # A report made before the rotation still verifies with the old key...
    assert signed.roster.check(old.kid, member="JPN", use="sig", at=t1 - timedelta(seconds=1))
    # ...one claiming a later time does not.
    with pytest.raises(KeyMaterialError, match="retired"):
        signed.roster.check(old.kid, member="JPN", use="sig", at=t1 + timedelta(seconds=1))
    mine = keys.load_member_keys(keydir, "JPN", signed.roster, t1)
    assert mine.signing_kid == new_sig
    # A node whose clock is up to 5 minutes behind the custodian's starts on the new
    # key too (partners take what it signs within the same skew); a clock trial's
    # node stayed down, exit 2, "JPN has no active sig key valid now".
    behind = t1 - timedelta(minutes=4)
    assert keys.load_member_keys(keydir, "JPN", signed.roster, behind).signing_kid == new_sig
    # Both decryption keys stay: a message encrypted to the old key just before rotation decrypts.
    assert set(mine.decryption) == {new_enc, old_enc.kid}
    # Other members are untouched.
    assert (
        keys_roster.load_signed_roster(keydir).roster.current("USA", "sig", t1).status == "active"
    )


def test_expired_decryption_keys_stay_loaded_revoked_ones_do_not(keydir: Path) -> None:
    # Envelopes encrypted to a key before it expired may wait on the hub while the
    # node is down across the expiry: the node keeps that key to open them.
    old_enc = keys_roster.load_signed_roster(keydir).roster.current("JPN", "enc", T0)
    t1 = T0 + timedelta(days=300)
    _, new_enc = keys_custodian.rotate_keys(keydir, "JPN", now=t1, valid_days=365)
    roster = keys_roster.load_signed_roster(keydir).roster
    after_expiry = T0 + timedelta(days=400)
    assert roster.get(old_enc.kid).valid_until < after_expiry
    mine = keys.load_member_keys(keydir, "JPN", roster, after_expiry)
    assert set(mine.decryption) == {new_enc, old_enc.kid}
    keys_custodian.revoke_key(keydir, old_enc.kid, "lost laptop", now=t1 + timedelta(days=1))
    roster = keys_roster.load_signed_roster(keydir).roster
    assert set(keys.load_member_keys(keydir, "JPN", roster, after_expiry).decryption) == {new_enc}


def test_rotate_unknown_member_changes_nothing(keydir: Path) -> None:
    before = snapshot(keydir)
    with pytest.raises(UsageError, match="unknown member 'XXX'"):
        keys_custodian.rotate_keys(keydir, "XXX")
    with pytest.raises(UsageError, match="GBR has no keys"):
        keys_custodian.rotate_keys(keydir, "GBR")
    assert snapshot(keydir) == before


@pytest.mark.parametrize("alg", ["x", "ECDH-ES+A256KW", ["Ed25519"]])
def test_a_key_file_with_another_alg_is_refused_in_one_line(keydir: Path, alg: object) -> None:
    # joserfc imports a JWK whatever its "alg", then refused to sign with it:
    # msmt keys rotate was a traceback (UnsupportedKeyAlgorithmError).
    path = keydir / keys.AUTHORITY_PRIVATE_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "alg": alg}))
    before = snapshot(keydir)
    result = CliRunner().invoke(main, ["keys", "rotate", "JPN", "--dir", str(keydir)])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (f"msmt: error: {path}: its alg is {str(alg)!r}, not 'Ed25519'\n")
    assert snapshot(keydir) == before


def test_revoke_records_reason_and_the_key_never_verifies_again(keydir: Path) -> None:
    roster = keys_roster.load_signed_roster(keydir).roster
    kid = roster.current("USA", "sig", T0).kid
    t1 = T0 + timedelta(days=3)
    keys_custodian.revoke_key(keydir, kid, "laptop stolen", now=t1)
    signed = keys_roster.load_signed_roster(keydir)
    assert signed.version == 2
    entry = next(e for e in signed.jwks["keys"] if e["kid"] == kid)
    assert entry["msmt_status"] == "revoked"
    assert entry["msmt_revoked_reason"] == "laptop stolen"
    assert entry["msmt_revoked_at"] == "2026-11-04T00:00:00Z"
    # Even for a time before the revocation: a stolen key can backdate.
    with pytest.raises(KeyMaterialError, match=f"key {kid} is revoked"):
        signed.roster.check(kid, member="USA", use="sig", at=T0 + timedelta(days=1))
    with pytest.raises(KeyMaterialError, match="no active sig key"):
        keys.load_member_keys(keydir, "USA", signed.roster, t1)


@pytest.mark.parametrize(
    ("kid", "reason", "error", "match"),
    [
        ("NOPE-sig-1", "x", KeyMaterialError, "not in the roster"),
        (None, "", UsageError, "--reason must be one non-empty line"),
        (None, "two\nlines", UsageError, "--reason must be one non-empty line"),
    ],
)
def test_revoke_bad_input_changes_nothing(
    keydir: Path, kid: str | None, reason: str, error: type[Exception], match: str
) -> None:
    target = kid or keys_roster.load_signed_roster(keydir).roster.current("KOR", "enc", T0).kid
    before = snapshot(keydir)
    with pytest.raises(error, match=match):
        keys_custodian.revoke_key(keydir, target, reason)
    assert snapshot(keydir) == before


def test_revoke_twice_is_refused(keydir: Path) -> None:
    kid = keys_roster.load_signed_roster(keydir).roster.current("KOR", "enc", T0).kid
    keys_custodian.revoke_key(keydir, kid, "compromised")
    before = snapshot(keydir)
    with pytest.raises(KeyMaterialError, match="already revoked"):
        keys_custodian.revoke_key(keydir, kid, "again")
    assert snapshot(keydir) == before


def test_check_rejects_keys_outside_validity_other_member_or_use(keydir: Path) -> None:
    roster = keys_roster.load_signed_roster(keydir).roster
    kid = roster.current("JPN", "sig", T0).kid
    assert roster.check(kid, member="JPN", use="sig", at=T0 + timedelta(days=364)).kid == kid
    cases = [
        ({"member": "JPN", "use": "sig", "at": T0 - timedelta(seconds=1)}, "not valid before"),
        ({"member": "JPN", "use": "sig", "at": T0 + timedelta(days=366)}, "expired at"),
        ({"member": "USA", "use": "sig", "at": T0}, "belongs to JPN, not USA"),
        ({"member": "JPN", "use": "enc", "at": T0}, "is a sig key, not enc"),
    ]
    for kwargs, match in cases:
        with pytest.raises(KeyMaterialError, match=match):
            roster.check(kid, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(KeyMaterialError, match="not in the roster"):
        roster.check("JPN-sig-unknown", member="JPN", use="sig", at=T0)


def _mutations() -> st.SearchStrategy[tuple[int, str, Any]]:
    fields = st.sampled_from(["msmt_status", "msmt_valid_until", "x", "msmt_member", "kid"])
    values = st.sampled_from(["active", "revoked", "2099-01-01T00:00:00Z", "USA", "JPN", "AAAA"])
    return st.tuples(st.integers(0, 5), fields, values)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations(), bump=st.booleans())
def test_any_edit_of_the_roster_is_detected(
    keydir: Path, mutation: tuple[int, str, Any], bump: bool
) -> None:
    index, field, value = mutation
    jwks = json.loads((keydir / keys.ROSTER_FILE).read_text())
    if jwks["keys"][index][field] == value:
        return  # not an edit
    jwks["keys"][index][field] = value
    if bump:  # raising the version does not help an attacker either
        jwks["msmt_version"] += 1
    signature = (keydir / keys.ROSTER_SIG_FILE).read_text()
    authority = keys.load_authority(keydir / keys.AUTHORITY_PUBLIC_FILE)
    with pytest.raises(KeyMaterialError, match="the roster was altered"):
        keys_roster.verify_roster(jwks, signature, authority)


def test_a_signed_payload_carried_in_the_signature_does_not_vouch_for_the_roster(
    keydir: Path, tmp_path: Path
) -> None:
    # A review: joserfc verifies a payload carried in a compact JWS and ignores the
    # detached one it is given. The authority's real signature over the real roster,
    # that roster put in its middle part, then "verified" any roster beside it: here
    # one with a signing key for GBR that the forger holds, at version 999.
    real = json.loads((keydir / keys.ROSTER_FILE).read_text())
    header, middle, signature = (keydir / keys.ROSTER_SIG_FILE).read_text().strip().split(".")
    assert middle == ""
    carried = base64.urlsafe_b64encode(rfc8785.dumps(real)).rstrip(b"=").decode()
    forged = json.loads(json.dumps(real))
    forged["msmt_version"] = 999
    mine = keys.generate_key("GBR", "sig", T0)
    forged["keys"].append(keys.roster_entry(mine, "GBR", T0, 30))
    folder = tmp_path / "forged"
    folder.mkdir()
    shutil.copy(keydir / keys.AUTHORITY_PUBLIC_FILE, folder)
    (folder / keys.ROSTER_FILE).write_bytes(keys.json_bytes(forged))
    (folder / keys.ROSTER_SIG_FILE).write_text(f"{header}.{carried}.{signature}\n")
    with pytest.raises(KeyMaterialError) as refused:
        keys_roster.load_signed_roster(folder)
    assert str(refused.value) == (
        "roster signature is not detached: its payload part is not empty (RFC 7515 Appendix F)"
    )
    # Even over the very roster it carries: the form is refused, not only a mismatch.
    (folder / keys.ROSTER_FILE).write_bytes(keys.json_bytes(real))
    with pytest.raises(KeyMaterialError, match="is not detached"):
        keys_roster.load_signed_roster(folder)


def test_rolled_back_roster_is_refused(keydir: Path, tmp_path: Path) -> None:
    v1 = tmp_path / "v1"
    shutil.copytree(keydir, v1)
    keys_custodian.rotate_keys(keydir, "JPN")
    assert keys_roster.load_signed_roster(keydir, min_version=2).version == 2
    # An attacker replays the old (validly signed) roster to undo the rotation.
    for name in (keys.ROSTER_FILE, keys.ROSTER_SIG_FILE):
        shutil.copy(v1 / name, keydir / name)
    with pytest.raises(
        KeyMaterialError,
        match=r"version 1 is older than version 2, the oldest accepted \(a rollback\)",
    ):
        keys_roster.load_signed_roster(keydir, min_version=2)


def test_roster_signed_by_another_authority_is_refused(keydir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    keys_custodian.init_keys(other, ("JPN", "USA"), now=T0)
    pin = other / keys.AUTHORITY_PUBLIC_FILE
    # The line names the pin, so an operator sees which file to check (keys.authority).
    with pytest.raises(KeyMaterialError, match="not by the pinned roster authority") as refused:
        keys_roster.load_signed_roster(keydir, authority_path=pin)
    assert str(refused.value).endswith(f" ({pin})")
    # Same kid, different key: the signature itself must fail.
    forged = OKPKey.generate_key(
        "Ed25519", parameters={"kid": _authority_kid(keydir)}, private=True
    )
    jwks = json.loads((keydir / keys.ROSTER_FILE).read_text())
    signature = keys_roster.sign_roster(jwks, forged)
    pinned = keys.load_authority(keydir / keys.AUTHORITY_PUBLIC_FILE)
    with pytest.raises(KeyMaterialError, match="the roster was altered"):
        keys_roster.verify_roster(jwks, signature, pinned)


def _authority_kid(keydir: Path) -> str:
    return str(json.loads((keydir / keys.AUTHORITY_PUBLIC_FILE).read_text())["kid"])


@pytest.mark.parametrize(
    ("jwks", "match"),
    [
        ({"keys": [1]}, "roster key is not a JSON object"),
        ({"keys": [[]]}, "roster key is not a JSON object"),
        ({"keys": [{"kid": "JPN-sig-1", "use": ["sig"]}]}, "use must be 'sig' or 'enc'"),
        # A kid the audit log and key files refuse stopped its member's node later.
        ({"keys": [{"kid": "JPN-sig-\u0662\u0660", "use": "sig"}]}, r"'JPN-sig-\\u0662\\u0660'"),
        ({"keys": [{"kid": "J" * 65, "use": "sig"}]}, "a kid is 1-64 ASCII letters"),
        ({"keys": [{"kid": "-JPN", "use": "sig"}]}, "starting with a letter or digit"),
        ([1, 2], "not a JWK Set"),
        (
            {
                "keys": [
                    {
                        "kid": "JPN-sig-1",
                        "use": "sig",
                        "kty": "OKP",
                        "crv": "Ed25519",
                        "msmt_member": "JPN",
                        "msmt_status": "active",
                    }
                ]
            },
            "malformed public key",
        ),
    ],
)
def test_a_roster_key_of_another_shape_is_one_line(jwks: Any, match: str) -> None:
    # A fuzzer: an auditor's own --roster file with these printed a traceback.
    with pytest.raises(KeyMaterialError, match=match):
        Roster.from_jwks(jwks)


def test_signed_roster_with_duplicate_kid_is_refused(keydir: Path) -> None:
    jwks = json.loads((keydir / keys.ROSTER_FILE).read_text())
    jwks["keys"].append(dict(jwks["keys"][0]))
    authority = keys.load_private_jwk_any(keydir / keys.AUTHORITY_PRIVATE_FILE)
    pinned = keys.load_authority(keydir / keys.AUTHORITY_PUBLIC_FILE)
    with pytest.raises(KeyMaterialError, match="duplicate kid"):
        keys_roster.verify_roster(jwks, keys_roster.sign_roster(jwks, authority), pinned)
    with pytest.raises(KeyMaterialError, match="duplicate kid"):
        Roster.from_jwks(jwks)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "is not valid JSON"),
        (
            '{"kty": "OKP", "crv": "X25519", "x": "AA", "d": "AA", "kid": "k", "use": "sig"}',
            "not a private Ed25519",
        ),
        (
            '{"kty": "OKP", "crv": "Ed25519", "x": "AA", "kid": "k", "use": "sig"}',
            "not a private Ed25519",
        ),
        (
            '{"kty": "OKP", "crv": "Ed25519", "x": "AA", "d": "AA", "kid": "k", "use": "sig"}',
            "malformed JWK",
        ),
        ('{"kty": "OKP", "crv": "Ed25519", "kid": "a", "kid": "b"}', "duplicate member"),
        # The codec's own message would quote the byte.
        ('{"d": "\udcff"}', "is not UTF-8 text"),
    ],
)
def test_malformed_private_key_file_is_refused(keydir: Path, content: str, match: str) -> None:
    roster = keys_roster.load_signed_roster(keydir).roster
    path = keys.key_path(keydir, "JPN", roster.current("JPN", "sig", T0).kid)
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(KeyMaterialError, match=match) as info:
        keys.load_member_keys(keydir, "JPN", roster, T0)
    assert str(path) in str(info.value) or "duplicate" in str(info.value)
    assert "\n" not in str(info.value)


def test_private_key_not_matching_the_roster_is_refused(keydir: Path) -> None:
    roster = keys_roster.load_signed_roster(keydir).roster
    kid = roster.current("JPN", "sig", T0).kid
    impostor = keys.generate_key("JPN", "sig", T0).as_dict(private=True) | {"kid": kid}
    keys.key_path(keydir, "JPN", kid).write_text(json.dumps(impostor))
    with pytest.raises(KeyMaterialError, match="does not match roster key"):
        keys.load_member_keys(keydir, "JPN", roster, T0)


@pytest.mark.parametrize("use", ["sig", "enc"])
def test_a_private_key_whose_d_is_not_its_x_is_refused(keydir: Path, use: str) -> None:
    # The file's own "x" matches the roster, but its "d" is another key's: the node
    # would sign what no partner can verify, or fail to decrypt what it is sent.
    roster = keys_roster.load_signed_roster(keydir).roster
    kid = roster.current("JPN", use, T0).kid  # type: ignore[arg-type]
    path = keys.key_path(keydir, "JPN", kid)
    other = keys.generate_key("JPN", use, T0).as_dict(private=True)  # type: ignore[arg-type]
    path.write_text(json.dumps(json.loads(path.read_text()) | {"d": other["d"]}))
    with pytest.raises(KeyMaterialError) as info:
        keys.load_member_keys(keydir, "JPN", roster, T0)
    assert str(info.value) == (f"{path}: its private key (d) does not belong to its public key (x)")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
@pytest.mark.parametrize("which", ["sig", "enc", "seed"])
def test_private_key_file_open_to_other_users_is_refused(
    keydir: Path, which: str, mode: int
) -> None:
    roster = keys_roster.load_signed_roster(keydir).roster
    path = {
        "sig": keys.key_path(keydir, "JPN", roster.current("JPN", "sig", T0).kid),
        "enc": keys.key_path(keydir, "JPN", roster.current("JPN", "enc", T0).kid),
        "seed": keydir / "JPN" / keys.NATS_SEED_FILE,
    }[which]
    assert path.stat().st_mode & 0o777 == 0o600  # as msmt keys writes it
    keys.load_member_keys(keydir, "JPN", roster, T0)
    path.chmod(mode)
    with pytest.raises(KeyMaterialError) as info:
        keys.load_member_keys(keydir, "JPN", roster, T0)
    assert str(info.value) == (
        f"{'NATS seed' if which == 'seed' else 'private key'} {path} is open to other users"
        f" (mode {mode:04o}): chmod 600 it"
    )
    path.chmod(0o600)
    keys.load_member_keys(keydir, "JPN", roster, T0)


def test_roster_authority_key_open_to_other_users_is_refused(keydir: Path) -> None:
    path = keydir / keys.AUTHORITY_PRIVATE_FILE
    keys.load_private_jwk_any(path)
    path.chmod(0o644)
    with pytest.raises(KeyMaterialError, match=r"roster authority key .* \(mode 0644\): chmod 600"):
        keys.load_private_jwk_any(path)
    roster = (keydir / keys.ROSTER_FILE).read_bytes()
    with pytest.raises(KeyMaterialError, match="open to other users"):
        keys_custodian.rotate_keys(keydir, "JPN", now=T0)
    assert (keydir / keys.ROSTER_FILE).read_bytes() == roster  # nothing signed, nothing written


def test_unsafe_kid_never_becomes_a_path(tmp_path: Path) -> None:
    with pytest.raises(KeyMaterialError, match="not a safe file name"):
        keys.key_path(tmp_path, "JPN", "../../etc/passwd")


def test_cli_init_rotate_revoke_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    keydir = str(tmp_path / "k")
    result = runner.invoke(main, ["keys", "init", "--dir", keydir, "--members", "JPN,USA"])
    assert result.exit_code == 0, result.output
    assert "roster version 1: 4 public keys" in result.output
    authority = keys.load_authority(Path(keydir) / keys.AUTHORITY_PUBLIC_FILE)
    assert f"authority thumbprint (RFC 7638): {authority.thumbprint()}" in result.output
    result = runner.invoke(main, ["keys", "init", "--dir", keydir, "--members", "JPN,USA"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("msmt: error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(main, ["keys", "rotate", "usa", "--dir", keydir])
    assert result.exit_code == 0, result.output
    assert "roster version 2" in result.output
    kid = (
        keys_roster.load_signed_roster(Path(keydir))
        .roster.current("USA", "sig", datetime.now(UTC))
        .kid
    )
    result = runner.invoke(main, ["keys", "revoke", kid, "--reason", "test", "--dir", keydir])
    assert result.exit_code == 0, result.output
    said = result.output
    # Its signing key revoked, USA has no key to start its node with: say so.
    assert (
        "warning: USA has no active sig key left: run 'msmt keys rotate USA' if you hold its "
        "keys (as in the demo); otherwise USA makes a key request ('msmt keys request USA', "
        "with --new-nats-user if its NATS seed may be disclosed too) and you accept it with "
        "--fingerprint after a phone call\n"
    ) in result.output
    result = runner.invoke(main, ["keys", "verify-roster", "--dir", keydir, "--min-version", "3"])
    assert result.exit_code == 0, result.output
    assert f"USA sig {kid} revoked" in result.output
    # When it was revoked, and when the rotated key was retired: what auditors compare.
    revoked = keys_roster.load_signed_roster(Path(keydir)).roster.get(kid).revoked_at
    assert revoked is not None
    assert f"revoked {kid} at {format_time(revoked)}; roster version 3\n" in said
    line = next(ln for ln in result.output.splitlines() if ln.startswith(f"USA sig {kid} "))
    assert line.endswith(f" (revoked at {format_time(revoked)})")
    assert re.search(r"^USA sig \S+ retired \S+ \(retired at \S+Z\)$", result.output, re.M)
    result = runner.invoke(main, ["keys", "verify-roster", "--dir", keydir, "--min-version", "4"])
    assert result.exit_code == 2
    assert "rollback" in result.stderr
    result = runner.invoke(main, ["keys", "init", "--dir", keydir, "--members", "JPN,XYZ"])
    assert result.exit_code == 2
    assert "unknown member 'XYZ'" in result.stderr


def test_writing_keys_under_a_file_names_the_file_in_the_way(tmp_path: Path) -> None:
    # A bad-input sweep: "cannot write .../x/JPN/...jwk: File exists", naming the file
    # to be written, when a file stood where a folder had to be.
    (tmp_path / "file.txt").write_text("x\n")
    result = CliRunner().invoke(
        main, ["keys", "init", "--dir", str(tmp_path / "file.txt" / "keys"), "--members", "JPN"]
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"msmt: error: cannot write {tmp_path / 'file.txt'}/keys/")
    assert result.stderr.endswith(f": {tmp_path / 'file.txt'} is not a directory\n")
    assert (tmp_path / "file.txt").read_text() == "x\n"


def test_node_pins_the_authority_and_remembers_the_highest_version(
    keydir: Path, tmp_path: Path
) -> None:
    pinned = tmp_path / "pinned-authority.json"
    shutil.copy(keydir / keys.AUTHORITY_PUBLIC_FILE, pinned)
    state = tmp_path / "node" / "roster-state.json"
    v1 = tmp_path / "v1"
    shutil.copytree(keydir, v1)
    assert keys_roster.load_pinned_roster(keydir, pinned, state).version == 1
    assert keys_roster.load_pinned_roster(keydir, pinned, state).version == 1  # reload is fine
    keys_custodian.rotate_keys(keydir, "KOR")
    assert keys_roster.load_pinned_roster(keydir, pinned, state).version == 2
    assert json.loads(state.read_text())["version"] == 2
    # The old roster is validly signed, but the node has seen version 2.
    with pytest.raises(KeyMaterialError, match="rollback"):
        keys_roster.load_pinned_roster(v1, pinned, state)
    # An authority that signs two different rosters under one number is caught too.
    jwks = json.loads((keydir / keys.ROSTER_FILE).read_text())
    jwks["keys"] = jwks["keys"][1:]
    authority = keys.load_private_jwk_any(keydir / keys.AUTHORITY_PRIVATE_FILE)
    other = tmp_path / "equivocated"
    other.mkdir()
    (other / keys.ROSTER_FILE).write_text(json.dumps(jwks))
    (other / keys.ROSTER_SIG_FILE).write_text(keys_roster.sign_roster(jwks, authority))
    before = state.read_bytes()
    with pytest.raises(KeyMaterialError, match="version 2 differs"):
        keys_roster.load_pinned_roster(other, pinned, state)
    assert state.read_bytes() == before
    # A roster signed by whoever controls the key directory's own authority file
    # does not pass: the node checks against the key it pinned.
    keys_custodian.init_keys(keydir, MEMBERS3, force=True)
    with pytest.raises(KeyMaterialError, match="not by the pinned roster authority"):
        keys_roster.load_pinned_roster(keydir, pinned, state)


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


@settings(max_examples=200)
@given(position=st.integers(0, 57), char=st.sampled_from(_B32))
def test_a_corrupted_nkey_seed_never_yields_another_key(position: int, char: str) -> None:
    seed = keys.new_nats_seed()
    public = keys.nats_public(seed, "seed")
    corrupted = seed[:position] + char.encode() + seed[position + 1 :]
    if base64.b32decode(corrupted + b"======") == base64.b32decode(seed + b"======"):
        # Only the unused low bits of the last character changed: same key.
        assert keys.nats_public(corrupted, "seed") == public
        return
    with pytest.raises(KeyMaterialError, match=r"seed: malformed nkey seed|not a NATS user seed"):
        keys.nats_public(corrupted, "seed")


def test_nats_seed_of_the_wrong_kind_or_corrupted_is_refused(keydir: Path) -> None:
    roster = keys_roster.load_signed_roster(keydir).roster
    path = keydir / "JPN" / keys.NATS_SEED_FILE
    account_seed = bytes(nkeys.encode_seed(bytes(32), nkeys.PREFIX_BYTE_ACCOUNT))
    path.write_bytes(account_seed)
    with pytest.raises(KeyMaterialError, match="not a NATS user seed"):
        keys.load_member_keys(keydir, "JPN", roster, T0)
    path.write_bytes(b"SUnot-a-seed\n")
    with pytest.raises(KeyMaterialError, match=r"nats\.nk: malformed nkey seed"):
        keys.load_member_keys(keydir, "JPN", roster, T0)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    signature=st.one_of(
        st.text(max_size=300),
        st.lists(st.text("ABCDEFabcdef0123456789-_=", max_size=90), min_size=1, max_size=4).map(
            ".".join
        ),
    )
)
def test_garbage_signature_is_one_clean_error(keydir: Path, signature: str) -> None:
    jwks = json.loads((keydir / keys.ROSTER_FILE).read_text())
    authority = keys.load_authority(keydir / keys.AUTHORITY_PUBLIC_FILE)
    with pytest.raises(KeyMaterialError) as info:
        keys_roster.verify_roster(jwks, signature, authority)
    assert "\n" not in str(info.value)


def test_key_files_the_roster_does_not_list_yet_are_pending_not_an_error(keydir: Path) -> None:
    # A key request made on the member's machine leaves new key files that the
    # roster lists only once the custodian accepts them: the node runs meanwhile.
    roster = keys_roster.load_signed_roster(keydir).roster
    current = keys.load_member_keys(keydir, "JPN", roster, T0)
    assert current.pending == ()
    pending = {use: keys.generate_key("JPN", use, T0) for use in ("sig", "enc")}
    for key in pending.values():
        keys.write_private(
            keys.key_path(keydir, "JPN", str(key.kid)), keys.json_bytes(key.as_dict(private=True))
        )
    mine = keys.load_member_keys(keydir, "JPN", roster, T0)
    assert mine.pending == tuple(sorted(str(k.kid) for k in pending.values()))
    assert mine.signing_kid == current.signing_kid
    assert set(mine.decryption) == set(current.decryption)


def _small_files() -> None:
    # In the child: files past 1 KiB cannot be written (EFBIG), as on a full disk,
    # without root; ignored SIGXFSZ makes that an error rather than a kill.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))


def test_a_rotation_that_cannot_write_says_so_in_one_line_and_keeps_the_roster(
    tmp_path: Path,
) -> None:
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, ["JPN", "USA"])
    roster = (keydir / keys.ROSTER_FILE).read_bytes()
    assert len(roster) > 1024  # the key files fit under the limit, the roster does not
    before = sorted((keydir / "JPN").iterdir())
    done = subprocess.run(
        [MSMT, "keys", "rotate", "JPN", "--dir", str(keydir)],
        capture_output=True,
        text=True,
        preexec_fn=_small_files,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr == f"msmt: error: cannot write {keydir / keys.ROSTER_FILE}: File too large\n"
    # The old pair stays in place and verifies; nothing half-written is left beside it.
    assert (keydir / keys.ROSTER_FILE).read_bytes() == roster
    assert keys_roster.load_signed_roster(keydir).version == 1
    assert not list(keydir.glob(".roster*"))
    # Nor the new private keys, which no roster lists: a full-disk trial found them
    # left, read as a pending key request by msmt node check (KEYS.md: a refused
    # command changes nothing).
    assert sorted((keydir / "JPN").iterdir()) == before


def _cut_short(keydir: Path, renamed: int) -> keys_roster.SignedRoster:
    """Leave ``keydir`` as a crash in ``write_roster`` would: the next roster (a rotation
    of USA) aside, and ``renamed`` (0 or 1) of its two files renamed into place."""
    signed, authority = keys_custodian.load_for_update(keydir)
    entries = keys_custodian.retire_active(signed.jwks["keys"], "USA", T0)
    jwks = keys_custodian.bump_roster(signed, entries, T0)
    (keydir / keys_roster.ROSTER_STAGED).write_bytes(keys.json_bytes(jwks))
    (keydir / keys_roster.ROSTER_SIG_STAGED).write_text(
        keys_roster.sign_roster(jwks, authority) + "\n"
    )
    if renamed:
        (keydir / keys_roster.ROSTER_STAGED).replace(keydir / keys.ROSTER_FILE)
    return keys_roster.verify_roster(jwks, keys_roster.sign_roster(jwks, authority), authority)


def test_a_roster_read_across_a_write_in_progress_reads_the_new_pair(keydir: Path) -> None:
    # A race trial: a node or an auditor reading the two files while the custodian's
    # msmt keys rotate renamed them into place read the new roster beside the old
    # signature, and stopped with a false "does not verify" (5 in 2,383 reads).
    new = _cut_short(keydir, renamed=1)  # between the two renames
    finish = threading.Timer(
        keys_roster.ROSTER_REREAD_S / 2,
        lambda: (keydir / keys_roster.ROSTER_SIG_STAGED).replace(keydir / keys.ROSTER_SIG_FILE),
    )
    finish.start()
    try:
        assert keys_roster.load_signed_roster(keydir).jwks == new.jwks
    finally:
        finish.join()


def test_the_custodian_never_signs_over_a_roster_older_than_its_last(tmp_path: Path) -> None:
    # An onboarding trial put an older roster pair back (from before a leaked key was
    # revoked) and ran keys accept: it signed a new version numbered below what the
    # nodes held, in which the leaked key was only retired. A node without state (a
    # member joining, a lost data directory) would have trusted it again.
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, ["JPN", "USA"])
    old = {name: (keydir / name).read_bytes() for name in (keys.ROSTER_FILE, keys.ROSTER_SIG_FILE)}
    signed = keys_roster.load_signed_roster(keydir)
    leaked = next(k.kid for k in signed.roster if k.member == "USA" and k.use == "sig")
    keys_custodian.revoke_key(keydir, leaked, "leaked")  # version 2
    mark = json.loads((keydir / keys.ROSTER_SIGNED_FILE).read_text())
    assert mark == {
        "version": 2,
        "sha256": keys_roster.roster_digest(keys_roster.load_signed_roster(keydir).jwks),
    }
    for name, data in old.items():  # version 1 put back
        (keydir / name).write_bytes(data)
    with pytest.raises(KeyMaterialError) as refused:
        keys_custodian.rotate_keys(keydir, "JPN")
    assert str(refused.value) == (
        f"the roster in {keydir} is version 1, older than version 2 this authority last"
        f" signed ({keydir / keys.ROSTER_SIGNED_FILE}): {keys.ROSTER_FILE} and"
        f" {keys.ROSTER_SIG_FILE} were put back from an older copy: put the latest pair back"
        " (a node that has seen it refuses anything older)"
    )
    assert keys_roster.load_signed_roster(keydir).version == 1  # nothing signed
    # A key directory from before the mark signs on, and records it.
    (keydir / keys.ROSTER_SIGNED_FILE).unlink()
    keys_custodian.rotate_keys(keydir, "JPN")
    assert json.loads((keydir / keys.ROSTER_SIGNED_FILE).read_text())["version"] == 2


def test_a_rotation_whose_roster_is_in_place_keeps_its_keys_when_the_mark_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review: with authority/ read-only, the mark's write failed after the new roster
    # was in place, and the rotation took that for a failed roster write and deleted
    # the new private keys, which the roster in place names as JPN's active ones.
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, ["JPN", "USA"])
    mark = keydir / keys.ROSTER_SIGNED_FILE
    write = keys.write_atomic

    def read_only_authority(path: Path, data: bytes, *, private: bool) -> None:
        if path == mark:  # the fault is injected below the API: EROFS there alone
            raise WriteError(f"cannot write {path}: Read-only file system")
        write(path, data, private=private)

    # Where _mark_signed looks it up (broker.keys_custodian imports it from broker.keys).
    monkeypatch.setattr(keys_custodian, "write_atomic", read_only_authority)
    with pytest.raises(keys_custodian.RosterInPlaceError) as failed:
        keys_custodian.rotate_keys(keydir, "JPN")
    assert str(failed.value).startswith("roster version 2 is in place, but cannot write ")
    assert str(failed.value).endswith("; the next roster write records it")
    signed = keys_roster.load_signed_roster(keydir)
    active = [k.kid for k in signed.roster if k.member == "JPN" and k.status == "active"]
    assert len(active) == 2
    assert all(keys.key_path(keydir, "JPN", kid).is_file() for kid in active)
    mine = keys.load_member_keys(keydir, "JPN", signed.roster, datetime.now(UTC))
    assert mine.signing_kid in active
    monkeypatch.setattr(keys_custodian, "write_atomic", write)
    keys_custodian.rotate_keys(keydir, "JPN")  # and the next write records it
    assert json.loads(mark.read_text())["version"] == 3


def test_a_folder_where_the_roster_is_put_aside_is_one_line_not_a_traceback(
    keydir: Path,
) -> None:
    (keydir / keys_roster.ROSTER_STAGED).mkdir()
    result = CliRunner().invoke(main, ["keys", "rotate", "JPN", "--dir", str(keydir)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"msmt: error: a roster write in {keydir} was cut short, and"
        f" {keydir / keys_roster.ROSTER_STAGED} cannot be removed: Is a directory\n"
    )
    assert keys_roster.load_signed_roster(keydir).version == 1


def test_finishing_a_cut_short_roster_write_records_it_as_signed(keydir: Path) -> None:
    # A review: the mark stayed a version behind after a finish, so the older pair put
    # back was signed over as a second, different version.
    new = _cut_short(keydir, renamed=1)
    assert keys_custodian.finish_roster_write(keydir) is not None
    mark = json.loads((keydir / keys.ROSTER_SIGNED_FILE).read_text())
    assert mark == {"version": new.version, "sha256": keys_roster.roster_digest(new.jwks)}


def test_a_cut_short_write_older_than_the_mark_is_never_finished(keydir: Path) -> None:
    # A review: a key directory restored from an older copy, holding a write of version 2
    # cut short, beside a mark at version 3 (a later roster revoked a key): finishing
    # it lowered the mark, and the rotation then signed a different version 3 over it.
    pair = (
        keys.ROSTER_FILE,
        keys.ROSTER_SIG_FILE,
        keys_roster.ROSTER_STAGED,
        keys_roster.ROSTER_SIG_STAGED,
    )
    _cut_short(keydir, renamed=0)  # version 1 in place, a version 2 aside
    restored = {name: (keydir / name).read_bytes() for name in pair}
    assert keys_custodian.finish_roster_write(keydir) is not None  # version 2 ...
    keys_custodian.rotate_keys(keydir, "JPN")  # ... and 3, the mark at 3
    for name, data in restored.items():  # the older copy put back
        (keydir / name).write_bytes(data)
    assert keys_custodian.finish_roster_write(keydir) == (
        f"a roster write in {keydir} was cut short: undid it, roster version 1 stays in place"
    )
    assert json.loads((keydir / keys.ROSTER_SIGNED_FILE).read_text())["version"] == 3
    with pytest.raises(KeyMaterialError, match="version 1, older than version 3"):
        keys_custodian.rotate_keys(keydir, "USA")


def test_a_pair_left_aside_under_a_swapped_public_key_is_never_finished(keydir: Path) -> None:
    # A review: whoever may write the custodian's public files put its own key under the
    # authority's kid and left a "version 2" aside signed with it; finish_roster_write
    # put it in place and moved the mark to 2, so the real roster, put back, was refused
    # for good as "older than version 2". Checked against the private key now.
    real = (keydir / keys.AUTHORITY_PUBLIC_FILE).read_bytes()
    mark = (keydir / keys.ROSTER_SIGNED_FILE).read_bytes()
    in_place = (keydir / keys.ROSTER_FILE).read_bytes()
    signed = keys_roster.load_signed_roster(keydir)
    forger = OKPKey.generate_key(
        "Ed25519", parameters={"kid": _authority_kid(keydir), "alg": "Ed25519"}, private=True
    )
    (keydir / keys.AUTHORITY_PUBLIC_FILE).write_bytes(
        keys.json_bytes(forger.as_dict(private=False))
    )
    jwks = dict(signed.jwks) | {"msmt_version": signed.version + 1}
    (keydir / keys_roster.ROSTER_STAGED).write_bytes(keys.json_bytes(jwks))
    (keydir / keys_roster.ROSTER_SIG_STAGED).write_text(keys_roster.sign_roster(jwks, forger))
    with pytest.raises(KeyMaterialError, match=r"is not the key of roster-authority\.json"):
        keys_custodian.finish_roster_write(keydir)
    assert (keydir / keys.ROSTER_SIGNED_FILE).read_bytes() == mark
    assert (keydir / keys.ROSTER_FILE).read_bytes() == in_place
    (keydir / keys.AUTHORITY_PUBLIC_FILE).write_bytes(real)  # the custodian puts it right
    assert keys_custodian.finish_roster_write(keydir) == (
        f"a roster write in {keydir} was cut short: undid it, roster version 1 stays in place"
    )
    keys_custodian.rotate_keys(keydir, "JPN")
    assert keys_roster.load_signed_roster(keydir).version == 2


def test_a_roster_copied_over_without_a_rename_is_read_once_whole(keydir: Path) -> None:
    # An operator's cp or scp writes the file in place: a reader between its truncate
    # and its write read "not valid JSON" and stopped. Read again while it changes.
    whole = (keydir / keys.ROSTER_FILE).read_bytes()
    (keydir / keys.ROSTER_FILE).write_bytes(whole[: len(whole) // 2])
    finish = threading.Timer(
        keys_roster.ROSTER_REREAD_S / 2, lambda: (keydir / keys.ROSTER_FILE).write_bytes(whole)
    )
    finish.start()
    try:
        assert keys_roster.load_signed_roster(keydir).version == 1
    finally:
        finish.join()
    # What stays half written is refused, naming the file, after one more read.
    (keydir / keys.ROSTER_FILE).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(KeyMaterialError, match=r"roster\.json is not valid JSON: "):
        keys_roster.load_signed_roster(keydir)
    (keydir / keys.ROSTER_FILE).unlink()
    with pytest.raises(KeyMaterialError, match=r"cannot read .*roster\.json: No such file"):
        keys_roster.load_signed_roster(keydir)


def test_a_roster_write_cut_between_its_renames_is_refused_then_finished(keydir: Path) -> None:
    new = _cut_short(keydir, renamed=1)  # the new roster in place, its signature aside
    # Fail closed meanwhile, and say why: every node and verify-roster refuse the pair.
    with pytest.raises(KeyMaterialError, match="does not verify") as info:
        keys_roster.load_signed_roster(keydir)
    assert str(info.value).endswith(
        f"({keys_roster.ROSTER_SIG_STAGED} is beside it: a roster write was cut short; the"
        " custodian's next msmt keys rotate, revoke or accept in that directory finishes it)"
    )
    assert keys_custodian.finish_roster_write(keydir) == (
        f"a roster write in {keydir} was cut short: finished it, roster version 2 is in place"
    )
    assert keys_roster.load_signed_roster(keydir).jwks == new.jwks
    assert not (keydir / keys_roster.ROSTER_SIG_STAGED).exists()
    assert keys_custodian.finish_roster_write(keydir) is None  # nothing left to do


def test_a_roster_write_cut_before_its_renames_is_finished_and_never_rolls_back(
    keydir: Path,
) -> None:
    new = _cut_short(keydir, renamed=0)  # the old pair in place, the whole new one aside
    assert keys_roster.load_signed_roster(keydir).version == 1  # the old pair still verifies
    assert keys_custodian.finish_roster_write(keydir) == (
        f"a roster write in {keydir} was cut short: finished it, roster version"
        f" {new.version} is in place"
    )
    assert keys_roster.load_signed_roster(keydir).jwks == new.jwks
    # A pair left aside that is not newer than the one in place (a stale copy) is
    # removed, never put back over it.
    (keydir / keys_roster.ROSTER_STAGED).write_bytes((keydir / "roster.json").read_bytes())
    (keydir / keys_roster.ROSTER_SIG_STAGED).write_bytes((keydir / "roster.json.jws").read_bytes())
    keys_custodian.rotate_keys(keydir, "JPN", now=T0)  # version 3
    stale = _cut_short(keydir, renamed=0)  # version 4 aside ...
    (keydir / keys.ROSTER_FILE).write_bytes(keys.json_bytes(stale.jwks))  # ... and 4 in place:
    sig = (keydir / keys_roster.ROSTER_SIG_STAGED).read_bytes()
    (keydir / keys.ROSTER_SIG_FILE).write_bytes(sig)
    (keydir / keys_roster.ROSTER_STAGED).write_bytes(keys.json_bytes(new.jwks))  # version 2 aside
    (keydir / keys_roster.ROSTER_SIG_STAGED).write_text(
        keys_roster.sign_roster(new.jwks, keys_custodian.load_for_update(keydir)[1]) + "\n"
    )
    assert keys_custodian.finish_roster_write(keydir) == (
        f"a roster write in {keydir} was cut short: undid it, roster version 4 stays in place"
    )
    assert keys_roster.load_signed_roster(keydir).version == 4
    assert not (keydir / keys_roster.ROSTER_STAGED).exists()


@pytest.mark.parametrize("damaged", [keys_roster.ROSTER_STAGED, keys_roster.ROSTER_SIG_STAGED])
def test_a_roster_left_aside_that_does_not_verify_is_never_put_in_place(
    keydir: Path, damaged: str
) -> None:
    _cut_short(keydir, renamed=0)
    path = keydir / damaged
    text = path.read_text()
    # The roster edited, or the signature's last bytes replaced.
    path.write_text(text.replace("USA", "NZL", 1) if "USA" in text else text[:-8] + "AAAAAAA\n")
    assert path.read_text() != text
    before = keys_roster.load_signed_roster(keydir).jwks
    assert "undid it, roster version 1 stays in place" in (
        keys_custodian.finish_roster_write(keydir) or ""
    )
    assert keys_roster.load_signed_roster(keydir).jwks == before
    # Neither pair verifies (the new roster in place, its signature aside altered):
    # nothing is changed, and the line says what to put back.
    _cut_short(keydir, renamed=1)
    sig = keydir / keys_roster.ROSTER_SIG_STAGED
    sig.write_text(sig.read_text()[:-8] + "AAAAAAA\n")
    files = snapshot(keydir)
    with pytest.raises(KeyMaterialError, match=r"put the last published roster\.json and"):
        keys_custodian.finish_roster_write(keydir)
    assert snapshot(keydir) == files


def test_the_next_rotation_finishes_a_roster_write_cut_short_and_says_so(tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, MEMBERS3, now=T0, valid_days=365)
    _cut_short(keydir, renamed=1)
    done = subprocess.run(
        [MSMT, "keys", "rotate", "JPN", "--dir", str(keydir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == (
        f"msmt: a roster write in {keydir} was cut short: finished it, roster version 2 is in"
        " place\n"
    )
    signed = keys_roster.load_signed_roster(keydir)
    assert signed.version == 3
    assert {k.status for k in signed.roster if k.member == "USA"} == {"retired"}
    assert sorted(p.name for p in keydir.glob("roster*")) == [
        "roster-authority.json",
        "roster.json",
        "roster.json.jws",
    ]


@pytest.mark.parametrize("command", ["rotate", "revoke"])
def test_a_keys_command_while_another_runs_is_refused_and_changes_nothing(
    keydir: Path, command: str
) -> None:
    # The other command (this test's process, holding the key directory's lock)
    # is mid-write: its next roster is staged beside the one in place. Unlocked,
    # this command would take that for a write cut short by a crash and finish
    # it, then write its own roster over the other's.
    _cut_short(keydir, renamed=0)
    kid = keys_roster.load_signed_roster(keydir).roster.current("JPN", "sig", T0).kid
    args = {"rotate": ["rotate", "JPN"], "revoke": ["revoke", kid, "--reason", "lost"]}[command]
    before = snapshot(keydir)
    held = os.open(keydir, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run(
            [MSMT, "keys", *args, "--dir", str(keydir)], capture_output=True, text=True, check=False
        )
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == (
            f"msmt: error: another msmt keys command is running on {keydir}"
            f" (pid {os.getpid()}): nothing was changed; run this one again once it has finished\n"
        )
        assert snapshot(keydir) == before
    finally:
        os.close(held)
    # Once the other has finished (here: let go), the same command runs.
    done = subprocess.run(
        [MSMT, "keys", *args, "--dir", str(keydir)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"msmt: a roster write in {keydir} was cut short: finished it")


def test_suspend_cuts_a_member_off_and_keeps_what_it_signed_before(keydir: Path) -> None:
    # A departure review: the only tool was revoke, which withdrew trust in every
    # report the member had shared, and its NATS user stayed on the hub.
    before = keys_roster.load_signed_roster(keydir)
    users_before = keys_users.load_signed_users(keydir)
    usa = [k for k in before.roster if k.member == "USA"]
    result = CliRunner().invoke(main, ["keys", "suspend", "usa", "--dir", str(keydir)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"USA's NATS user removed from {keydir / 'nats-users.json'}")
    assert lines[2] == f"USA: retired {', '.join(k.kid for k in usa)}"
    assert lines[3].startswith(f"roster version {before.version + 1}: publish roster.json")
    signed = keys_roster.load_signed_roster(keydir, min_version=before.version + 1)
    users = keys_users.load_signed_users(keydir)
    assert users.version == users_before.version + 1
    assert users.users == {a: u for a, u in users_before.users.items() if a != "USA"}
    retired = [signed.roster.get(k.kid) for k in usa]
    assert {k.status for k in retired} == {"retired"}
    (at,) = {k.retired_at for k in retired}
    assert at is not None
    sig = next(k for k in retired if k.use == "sig")
    # What USA signed before still verifies (retired, not revoked); nothing after.
    assert signed.roster.check(sig.kid, member="USA", use="sig", at=at - timedelta(seconds=1))
    assert signed.roster.withdrawn(sig.kid) is None
    with pytest.raises(KeyMaterialError, match="retired"):
        signed.roster.check(sig.kid, member="USA", use="sig", at=at + timedelta(seconds=1))
    with pytest.raises(KeyMaterialError, match="no active enc key"):
        signed.roster.current("USA", "enc", at + timedelta(seconds=1))
    # The others are untouched.
    assert [k for k in signed.roster if k.member != "USA"] == [
        k for k in before.roster if k.member != "USA"
    ]
    # Once is enough: again, it says so and writes nothing.
    kept = snapshot(keydir)
    again = CliRunner().invoke(main, ["keys", "suspend", "USA", "--dir", str(keydir)])
    assert (again.exit_code, again.stdout) == (2, "")
    assert again.stderr == (
        "msmt: error: USA is suspended already: it has no active key and no NATS user\n"
    )
    assert snapshot(keydir) == kept


def test_suspend_finishes_what_a_failed_run_left(
    keydir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The users are written first: a roster write that fails leaves the member cut
    # off at the hub, with its keys active, and the command run again retires them.
    def full(*_args: Any, **_kwargs: Any) -> None:
        raise WriteError("cannot write roster.json: No space left on device")

    monkeypatch.setattr(keys_custodian, "write_roster", full)
    with pytest.raises(WriteError):
        keys_custodian.suspend_member(keydir, "USA")
    assert "USA" not in keys_users.load_signed_users(keydir).users
    monkeypatch.undo()
    retired, version = keys_custodian.suspend_member(keydir, "USA")
    assert (len(retired), version) == (2, None)
    roster = keys_roster.load_signed_roster(keydir).roster
    assert {k.status for k in roster if k.member == "USA"} == {"retired"}
