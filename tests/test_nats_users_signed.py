"""nats-users.json is signed by the roster authority, and the hub's configuration trusts only that.

Whoever changed the file on its way to the hub operator logged in to the hub as any
member it named, and could read and ack that member's inbox: the roster was signed,
this file was not. Now ``msmt nats config`` refuses it unless its detached JWS verifies
with the pinned authority key, and refuses an older version than its hub.conf was made
from (an older signed file names users replaced after a compromise).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import rfc8785
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from joserfc.jwk import OKPKey

from broker import keyrequest, keys, keys_custodian, keys_roster, keys_users, natsconfig, natsusers
from broker.cli import main
from broker.errors import KeyMaterialError, WriteError


def msmt(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def refusal(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0].removeprefix("msmt: error: ")


@pytest.fixture
def custodian(tmp_path: Path) -> Path:
    path = tmp_path / "custodian"
    keys_custodian.init_keys(path, ["JPN", "USA", "GBR"])
    return path


@pytest.fixture
def hub_operator(custodian: Path, tmp_path: Path) -> Path:
    """The hub operator's folder: the two files received, and the authority pinned apart."""
    folder = tmp_path / "hub-keys"
    folder.mkdir()
    for name in (keys.NATS_USERS_FILE, keys_users.NATS_USERS_SIG_FILE):
        shutil.copy(custodian / name, folder)
    shutil.copy(custodian / keys.AUTHORITY_PUBLIC_FILE, tmp_path / "pinned-authority.json")
    return folder


def config(folder: Path, out: Path) -> Result:
    pinned = folder.parent / "pinned-authority.json"
    return msmt("nats", "config", "--keys", folder, "--authority", pinned, "--out", out)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_the_signature_verifies_by_rfc_7515_and_8785_alone(custodian: Path) -> None:
    # As another member's implementation would check it: Ed25519 over the protected
    # header and the RFC 8785 bytes of the file's object (RFC 7515 Appendix F).
    data = json.loads((custodian / keys.NATS_USERS_FILE).read_text())
    header_b64, payload_b64, signature_b64 = (
        (custodian / keys_users.NATS_USERS_SIG_FILE).read_text().strip().split(".")
    )
    assert payload_b64 == ""
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    authority = json.loads((custodian / keys.AUTHORITY_PUBLIC_FILE).read_text())
    assert header == {"alg": "Ed25519", "kid": authority["kid"], "typ": "msmt-nats-users+jws"}
    assert data["msmt_version"] == 1
    assert set(data) == {"JPN", "USA", "GBR", "AUDIT", "msmt_version"}
    x = base64.urlsafe_b64decode(authority["x"] + "=" * (-len(authority["x"]) % 4))
    signing_input = f"{header_b64}.{b64url(rfc8785.dumps(data))}".encode()
    signature = base64.urlsafe_b64decode(signature_b64 + "=" * (-len(signature_b64) % 4))
    Ed25519PublicKey.from_public_bytes(x).verify(signature, signing_input)  # raises if not


def test_the_hub_config_names_the_version_and_signer_it_was_made_from(
    custodian: Path, hub_operator: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hub.conf"
    done = config(hub_operator, out)
    assert done.exit_code == 0, done.output
    authority = keys.load_authority(custodian / keys.AUTHORITY_PUBLIC_FILE)
    thumbprint = authority.thumbprint()
    assert done.stdout == (
        f"wrote {out} from {hub_operator / keys.NATS_USERS_FILE} version 1, signed by"
        f" {authority.kid} (RFC 7638 thumbprint {thumbprint}): AUDIT, GBR, JPN, USA\n"
    )
    text = out.read_text()
    assert text.splitlines()[0] == (
        f"# made by msmt nats config from nats-users.json version 1, signed by {authority.kid}"
        f" (RFC 7638 thumbprint {thumbprint})"
    )
    assert natsconfig.made_from(text) == (1, thumbprint)
    accounts = json.loads(text.partition("accounts: ")[2].rpartition("system_account: ")[0])
    users = natsusers.load_users(custodian)
    for account, nkey in users.items():
        assert [u["nkey"] for u in accounts[account]["users"]] == [nkey]


def test_a_user_swapped_on_its_way_to_the_hub_operator_is_refused(
    hub_operator: Path, tmp_path: Path
) -> None:
    path = hub_operator / keys.NATS_USERS_FILE
    data = json.loads(path.read_text())
    _, thief = natsusers.make_user(tmp_path / "thief", "AUDIT")
    data["GBR"] = thief  # the version kept: only the signature can tell
    path.write_text(json.dumps(data))
    out = tmp_path / "hub.conf"
    kid = json.loads((tmp_path / "pinned-authority.json").read_text())["kid"]
    assert refusal(config(hub_operator, out)) == (
        f"{path} signature does not verify with the pinned authority key {kid}:"
        " the file was altered, or signed by another key under that kid, or the file and its"
        " signature are from two different writes (copy both together)"
    )
    assert not out.exists()


def test_a_signed_payload_carried_in_the_signature_does_not_vouch_for_the_users(
    hub_operator: Path, tmp_path: Path
) -> None:
    # The authority's signature over the real users, with them in its middle part:
    # joserfc verified that payload and ignored the file beside it (a review).
    path, sig = hub_operator / keys.NATS_USERS_FILE, hub_operator / keys_users.NATS_USERS_SIG_FILE
    real = json.loads(path.read_text())
    header, _, signature = sig.read_text().strip().split(".")
    sig.write_text(f"{header}.{b64url(rfc8785.dumps(real))}.{signature}\n")
    _, thief = natsusers.make_user(tmp_path / "thief", "AUDIT")
    path.write_text(json.dumps(real | {"GBR": thief, "msmt_version": 999}))
    out = tmp_path / "hub.conf"
    assert refusal(config(hub_operator, out)) == (
        f"{path} signature is not detached: its payload part is not empty (RFC 7515 Appendix F)"
    )
    assert not out.exists()


def test_users_signed_by_another_authority_are_refused(hub_operator: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    keys_custodian.init_keys(other, ["JPN", "USA"])
    for name in (keys.NATS_USERS_FILE, keys_users.NATS_USERS_SIG_FILE):
        shutil.copy(other / name, hub_operator)
    line = refusal(config(hub_operator, tmp_path / "hub.conf"))
    kid = json.loads((other / keys.AUTHORITY_PUBLIC_FILE).read_text())["kid"]
    assert line.startswith(f"{hub_operator / keys.NATS_USERS_FILE} is signed by {kid}, not by")
    assert str(tmp_path / "pinned-authority.json") in line


def test_the_roster_signature_does_not_pass_for_the_users(
    custodian: Path, hub_operator: Path, tmp_path: Path
) -> None:
    # Both are the authority's detached signatures: the typ keeps one from standing
    # for the other, whatever the payloads.
    shutil.copy(custodian / keys.ROSTER_SIG_FILE, hub_operator / keys_users.NATS_USERS_SIG_FILE)
    line = refusal(config(hub_operator, tmp_path / "hub.conf"))
    assert "signature header must be exactly alg Ed25519, typ msmt-nats-users+jws" in line


def test_an_unsigned_file_is_refused_until_the_custodian_signs_it(
    custodian: Path, hub_operator: Path, tmp_path: Path
) -> None:
    # A custodian's file written before the signature: refused, then signed again
    # as the next version, with the users as they were.
    path = custodian / keys.NATS_USERS_FILE
    users = natsusers.load_users(custodian)
    path.write_text(json.dumps(users))
    (custodian / keys_users.NATS_USERS_SIG_FILE).unlink()
    shutil.copy(path, hub_operator)
    assert refusal(config(hub_operator, tmp_path / "hub.conf")) == (
        f"{hub_operator / keys.NATS_USERS_FILE} is not signed (no msmt_version: written before"
        " msmt signed it): the custodian signs it with 'msmt keys sign-nats-users' and sends"
        " it with its nats-users.json.jws"
    )
    signed = msmt("keys", "sign-nats-users", "--dir", custodian)
    assert signed.exit_code == 0, signed.output
    assert signed.stdout.splitlines()[0] == f"signed {path} as version 1 (nats-users.json.jws)"
    for name in (keys.NATS_USERS_FILE, keys_users.NATS_USERS_SIG_FILE):
        shutil.copy(custodian / name, hub_operator)
    assert config(hub_operator, tmp_path / "hub.conf").exit_code == 0
    assert keys_users.load_signed_users(custodian).users == users


def test_a_missing_signature_names_the_file_to_ask_for(hub_operator: Path, tmp_path: Path) -> None:
    (hub_operator / keys_users.NATS_USERS_SIG_FILE).unlink()
    assert refusal(config(hub_operator, tmp_path / "hub.conf")) == (
        f"cannot read {hub_operator / keys_users.NATS_USERS_SIG_FILE}: No such file or directory"
        " (the custodian sends it with nats-users.json)"
    )


def test_an_older_signed_file_is_refused_over_a_newer_hub_config(
    custodian: Path, hub_operator: Path, tmp_path: Path
) -> None:
    # After a compromise the custodian replaces AUDIT's user (version 2); the thief,
    # who holds the old seed, puts version 1 back in the hub operator's way.
    old = tmp_path / "version-1"
    shutil.copytree(hub_operator, old)
    _, user = natsusers.make_user(tmp_path / "auditor", "AUDIT")
    done = msmt(
        "keys", "accept-nats-user", "AUDIT", user, "--dir", custodian, "--replace-nats-user"
    )
    assert done.exit_code == 0, done.output
    assert done.stdout.splitlines()[:2] == [
        f"AUDIT's NATS user replaced in {custodian / keys.NATS_USERS_FILE} (version 2, signed)",
        "give the hub operator nats-users.json and nats-users.json.jws together; 'msmt nats"
        " config' verifies them with the pinned roster-authority key",
    ]
    for name in (keys.NATS_USERS_FILE, keys_users.NATS_USERS_SIG_FILE):
        shutil.copy(custodian / name, hub_operator)
    out = tmp_path / "hub.conf"
    assert config(hub_operator, out).exit_code == 0
    made = out.read_bytes()
    for name in (keys.NATS_USERS_FILE, keys_users.NATS_USERS_SIG_FILE):
        shutil.copy(old / name, hub_operator)
    assert refusal(config(hub_operator, out)) == (
        f"nats-users.json is version 1, older than version 2, which {out} was made from (a"
        " rollback): ask the custodian for the latest, and compare its version with them"
    )
    assert out.read_bytes() == made
    # Another file name starts afresh: the guard is the hub.conf it replaces.
    assert config(hub_operator, tmp_path / "elsewhere.conf").exit_code == 0


def test_each_change_signs_the_next_version(custodian: Path, tmp_path: Path) -> None:
    assert keys_users.load_signed_users(custodian).version == 1
    _, user = natsusers.make_user(tmp_path / "auditor", "AUDIT")
    natsusers.record_user(custodian, "AUDIT", user, replace=True)
    assert keys_users.load_signed_users(custodian).version == 2
    again = natsusers.record_user(custodian, "AUDIT", user, replace=True)
    assert (again.outcome, again.version) == ("unchanged", None)
    assert natsusers.sign_users(custodian) == 3
    signed = keys_users.load_signed_users(custodian)
    assert (signed.version, signed.users["AUDIT"]) == (3, user)


@pytest.mark.parametrize("version", [0, -1, True, "2", 1.5, 2**53])
def test_a_malformed_version_is_refused(custodian: Path, version: object) -> None:
    # 2**53 and above: RFC 8785 signs numbers as doubles, and refused to (a traceback).
    path = custodian / keys.NATS_USERS_FILE
    path.write_text(json.dumps(natsusers.load_users(custodian) | {"msmt_version": version}))
    with pytest.raises(KeyMaterialError, match=r"msmt_version is not a positive integer below"):
        natsusers.load_users(custodian)


def test_one_user_for_two_accounts_is_refused(custodian: Path) -> None:
    path = custodian / keys.NATS_USERS_FILE
    users = natsusers.load_users(custodian)
    path.write_text(json.dumps(users | {"GBR": users["JPN"]}))
    with pytest.raises(KeyMaterialError, match=r": 'JPN' and 'GBR' have the same NATS user$"):
        natsusers.load_users(custodian)


def test_the_pin_is_named_and_another_authoritys_users_do_not_replace_the_config(
    custodian: Path, hub_operator: Path, tmp_path: Path
) -> None:
    # Whoever swaps the users on their way can put an authority key of their own beside
    # them, under the real one's kid: nats config takes no pin from the key directory,
    # and the hub.conf names the thumbprint it was made under (a review).
    out = tmp_path / "hub.conf"
    assert config(hub_operator, out).exit_code == 0
    made = out.read_bytes()
    other = tmp_path / "other"
    keys_custodian.init_keys(other, ["JPN", "USA"])
    for name in (keys.NATS_USERS_FILE, keys_users.NATS_USERS_SIG_FILE, keys.AUTHORITY_PUBLIC_FILE):
        shutil.copy(other / name, hub_operator)
    bare = msmt("nats", "config", "--keys", hub_operator, "--out", out)
    assert bare.exit_code == 2
    assert "Missing option '--authority'" in bare.stderr
    # Named as the pin by mistake (the copy that came with the files): the config it
    # would replace was made under another authority.
    line = refusal(
        msmt(
            "nats", "config", "--keys", hub_operator, "--out", out,
            "--authority", hub_operator / keys.AUTHORITY_PUBLIC_FILE,
        )
    )  # fmt: skip
    first = keys.load_authority(tmp_path / "pinned-authority.json").thumbprint()
    now = keys.load_authority(other / keys.AUTHORITY_PUBLIC_FILE).thumbprint()
    assert line == (
        f"--out {out} was made from users signed by another roster authority (thumbprint"
        f" {first}, now {now}): check --authority; if the authority was replaced, move the old"
        " file away first"
    )
    assert out.read_bytes() == made


@pytest.mark.parametrize(
    ("edit", "lines"),
    [
        (lambda line: line.replace("version 1,", "version 1000000000000000000,"), 1),
        (lambda line: line.replace("thumbprint ", "thumbprint x"), 1),
        (lambda line: line + "\n" + line, 2),
    ],
)
def test_an_edited_line_of_what_it_was_made_from_is_refused(
    hub_operator: Path, tmp_path: Path, edit: Callable[[str], str], lines: int
) -> None:
    out = tmp_path / "hub.conf"
    assert config(hub_operator, out).exit_code == 0
    first, rest = out.read_text().split("\n", 1)
    out.write_text(edit(first) + "\n" + rest)
    edited = out.read_bytes()
    line = refusal(config(hub_operator, out))
    assert line.startswith(
        f"--out {out}: its line saying what it was made from is not one msmt nats config"
        f" writes ({lines} such line{'s' if lines > 1 else ''}): '# made by msmt"
    )
    assert line.endswith("; move the file away first")
    assert out.read_bytes() == edited


@pytest.mark.parametrize(
    "above", ["\ufeff", "\n", "# the production hub\n", " ", "# made by  msmt nats config"]
)
def test_what_is_put_above_the_line_does_not_turn_the_guard_off(
    custodian: Path, hub_operator: Path, tmp_path: Path, above: str
) -> None:
    # A review: a BOM, a blank line or a comment above it read as "made elsewhere".
    old = tmp_path / "version-1"
    shutil.copytree(hub_operator, old)
    natsusers.sign_users(custodian)
    for name in (keys.NATS_USERS_FILE, keys_users.NATS_USERS_SIG_FILE):
        shutil.copy(custodian / name, hub_operator)
    out = tmp_path / "hub.conf"
    assert config(hub_operator, out).exit_code == 0
    text = out.read_text()
    if above.startswith("# made by"):  # the marker itself respaced
        first, rest = text.split("\n", 1)
        text = first.replace("made by msmt", "made by  msmt") + "\n" + rest
    else:
        text = above + text
    out.write_text(text)
    for name in (keys.NATS_USERS_FILE, keys_users.NATS_USERS_SIG_FILE):
        shutil.copy(old / name, hub_operator)
    line = refusal(config(hub_operator, out))
    if above.startswith("# made by"):  # read as an edit of the line: refused as one
        assert line.startswith(f"--out {out}: its line saying what it was made from is not one")
    else:  # the line found below what was put above it: the rollback refused
        assert line == (
            f"nats-users.json is version 1, older than version 2, which {out} was made from (a"
            " rollback): ask the custodian for the latest, and compare its version with them"
        )
    assert out.read_text() == text


def test_the_custodian_does_not_sign_over_an_edited_file(custodian: Path, tmp_path: Path) -> None:
    # An edit of the custodian's own signed copy (a git-writable checkout) would be
    # signed by the next routine change; now that change is refused, and
    # sign-nats-users, which signs the file as it stands, prints what it signs.
    path = custodian / keys.NATS_USERS_FILE
    _, thief = natsusers.make_user(tmp_path / "thief", "AUDIT")
    path.write_text(json.dumps(json.loads(path.read_text()) | {"GBR": thief}))
    _, auditor = natsusers.make_user(tmp_path / "auditor", "AUDIT")
    args: list[str | Path] = ["keys", "accept-nats-user", "AUDIT", auditor, "--dir", custodian]
    line = refusal(msmt(*args, "--replace-nats-user"))
    assert line == (
        f"{path} is not the version 1 signed here (an edit, or a write cut short): 'msmt keys"
        " sign-nats-users' signs the file as it stands (check the users it prints)"
    )
    # Nor with its version and signature dropped, as if from before signing (a review).
    path.write_text(json.dumps(natsusers.load_users(custodian)))
    (custodian / keys_users.NATS_USERS_SIG_FILE).unlink()
    assert "is not the version 1 signed here" in refusal(msmt(*args, "--replace-nats-user"))
    assert keys_users.split_users(json.loads(path.read_text()), path)[0]["GBR"] == thief
    signed = msmt("keys", "sign-nats-users", "--dir", custodian)
    assert signed.exit_code == 0, signed.output
    assert f"GBR {thief}" in signed.stdout.splitlines()


def test_a_public_authority_key_swapped_under_its_kid_is_not_signed_over(
    custodian: Path, tmp_path: Path
) -> None:
    # A review: with another key under the real kid in roster-authority.json, an edited
    # roster or users re-signed with it verified, and the real key signed over them.
    public = custodian / keys.AUTHORITY_PUBLIC_FILE
    kid = json.loads(public.read_text())["kid"]
    forged = OKPKey.generate_key("Ed25519", parameters={"kid": kid, "alg": "Ed25519"}, private=True)
    public.write_bytes(keys.json_bytes(forged.as_dict(private=False)))
    jwks = json.loads((custodian / keys.ROSTER_FILE).read_text())
    (custodian / keys.ROSTER_SIG_FILE).write_text(keys_roster.sign_roster(jwks, forged) + "\n")
    assert keys_roster.load_signed_roster(custodian).version == 1  # verifies with the forged key
    _, auditor = natsusers.make_user(tmp_path / "auditor", "AUDIT")
    args: list[str | Path] = ["keys", "accept-nats-user", "AUDIT", auditor, "--dir", custodian]
    line = refusal(msmt(*args, "--replace-nats-user"))
    assert line.endswith(f"roster-authority.jwk is not the key of {keys.AUTHORITY_PUBLIC_FILE}")


def test_a_new_authority_signs_version_1_over_whatever_was_there(
    custodian: Path, tmp_path: Path
) -> None:
    # keys init --force read the old file first, and a malformed one stopped it after
    # the old keys were gone (a review).
    (custodian / keys.NATS_USERS_FILE).write_text('{"AUDIT": 5}')
    keys_custodian.init_keys(custodian, ["JPN", "USA"], force=True)
    assert keys_users.load_signed_users(custodian).version == 1


def test_an_accept_cut_short_after_the_users_says_they_changed(tmp_path: Path) -> None:
    # nats-users.json is written before the roster; a roster write that then fails
    # left a retry that found the user there and said nothing of the hub (a review).
    custodian = tmp_path / "custodian"
    assert msmt("keys", "authority", "--dir", custodian, "--audit").exit_code == 0
    request = tmp_path / "gbr.json"
    made = msmt("keys", "request", "GBR", "--dir", tmp_path / "gbr", "--out", request, "--first")
    assert made.exit_code == 0, made.output
    found = re.search(r"^fingerprint (sha256:[0-9a-f]{64})$", made.output, re.MULTILINE)
    assert found is not None
    (custodian / keys_roster.ROSTER_STAGED).mkdir()  # where the roster is put aside: in the way
    with pytest.raises(WriteError) as failed:
        keyrequest.accept_request(custodian, request, expected_fingerprint=found[1])
    assert str(failed.value).endswith(
        f"; nats-users.json version 2 already names GBR's new NATS user: accept {request} again"
        " to finish (without --replace-nats-user), then give the hub operator nats-users.json"
        " and nats-users.json.jws"
    )
    assert keys_users.load_signed_users(custodian).version == 2
    (custodian / keys_roster.ROSTER_STAGED).rmdir()
    again = keyrequest.accept_request(custodian, request, expected_fingerprint=found[1])
    assert (again.member, again.users_version, again.version) == ("GBR", None, 2)


def test_a_record_that_cannot_be_written_says_the_users_are_in_place(
    custodian: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review: a full disk at the record's write printed "cannot write ..." alone, while
    # version 2 was signed and in place and the next change refused it.
    real = keys.write_atomic

    def full_disk_for_the_record(path: Path, data: bytes, *, private: bool) -> None:
        if path.name == Path(keys_users.NATS_USERS_SIGNED_FILE).name:
            raise WriteError(f"cannot write {path}: No space left on device")
        real(path, data, private=private)

    # Where write_nats_users looks it up (broker.keys_users imports it from broker.keys).
    monkeypatch.setattr(keys_users, "write_atomic", full_disk_for_the_record)
    _, auditor = natsusers.make_user(tmp_path / "auditor", "AUDIT")
    with pytest.raises(WriteError) as failed:
        natsusers.record_user(custodian, "AUDIT", auditor, replace=True)
    path = custodian / keys.NATS_USERS_FILE
    assert str(failed.value) == (
        f"{path} version 2 is signed and in place, but cannot write"
        f" {custodian / keys_users.NATS_USERS_SIGNED_FILE}: No space left on device: the next"
        " change refuses it until 'msmt keys sign-nats-users' records it"
    )
    assert keys_users.load_signed_users(custodian).users["AUDIT"] == auditor
    monkeypatch.setattr(keys_users, "write_atomic", real)
    with pytest.raises(KeyMaterialError, match="is not the version 1 signed here"):
        natsusers.record_user(custodian, "AUDIT", auditor, replace=True)
    assert natsusers.sign_users(custodian) == 3
