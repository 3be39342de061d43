"""Key custody across machines, as the distributed trial ran it: mistakes and compromises.

A custodian and members in separate directories, driven through the real CLI; only
public files (and, by mistake, a private one) pass between them.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker import keyrequest, keys, keys_roster
from broker.cli import main
from broker.errors import UsageError


def msmt(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: 'changes nothing' is asserted against this."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def refusal(done: Result) -> str:
    """The one line of a refused command (exit 2, nothing on stdout)."""
    assert done.exit_code == 2, done.output
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr.removeprefix("msmt: error: ").rstrip("\n")


def fingerprint_of(done: Result) -> str:
    found = re.search(r"^fingerprint (sha256:[0-9a-f]{64})$", done.output, re.MULTILINE)
    assert found is not None, done.output
    return found[1]


def install_roster(custodian: Path, member_dir: Path) -> None:
    """What a member does with a published roster: copy the public files."""
    for name in (keys.ROSTER_FILE, keys.ROSTER_SIG_FILE, keys.AUTHORITY_PUBLIC_FILE):
        shutil.copy(custodian / name, member_dir / name)


def request(member_dir: Path, member: str, out: Path, *flags: str) -> Result:
    done = msmt("keys", "request", member, "--dir", member_dir, "--out", out, *flags)
    assert done.exit_code == 0, done.output
    return done


@pytest.fixture
def custodian(tmp_path: Path) -> Path:
    folder = tmp_path / "custodian"
    assert msmt("keys", "authority", "--dir", folder, "--audit").exit_code == 0
    return folder


def join(custodian: Path, member_dir: Path, member: str) -> None:
    """``member``'s first request, accepted by fingerprint; the member installs the roster."""
    out = member_dir.parent / f"{member.lower()}-first.json"
    made = request(member_dir, member, out, "--first")
    done = msmt("keys", "accept", out, "--dir", custodian, "--fingerprint", fingerprint_of(made))
    assert done.exit_code == 0, done.output
    install_roster(custodian, member_dir)


def current(keydir: Path, member: str, use: str) -> str:
    signed = keys_roster.load_signed_roster(keydir)
    return next(
        str(k.kid)
        for k in signed.roster
        if k.member == member and k.use == use and k.status == "active"
    )


# --- 1. a member sends its current private key instead of a request ----------------------


def test_a_disclosed_current_key_is_named_and_its_signature_stops_counting_once_revoked(
    custodian: Path, tmp_path: Path
) -> None:
    gbr = tmp_path / "gbr"
    join(custodian, gbr, "GBR")
    active = current(custodian, "GBR", "sig")
    # GBR's mistake: its active private signing key is what reached the custodian.
    leaked = tmp_path / "inbox" / f"{active}.jwk"
    leaked.parent.mkdir()
    shutil.copy(keys.key_path(gbr, "GBR", active), leaked)
    before = snapshot(custodian)
    reason = refusal(msmt("keys", "accept", leaked, "--dir", custodian))
    assert reason == (
        f"{leaked} holds the private key of {active} (GBR's active sig key) in the roster: that "
        "key is disclosed, and whoever read this file can use it as GBR. Delete the file; revoke "
        f"it first: 'msmt keys revoke {active} --reason ...'; then GBR makes a new request and "
        "you accept it only with --fingerprint, after a phone call"
    )
    assert json.loads(leaked.read_text())["d"] not in reason
    assert snapshot(custodian) == before

    # Whoever read it makes a request beside it, signed by the new key and the leaked one.
    attacker = tmp_path / "attacker"
    (attacker / "GBR").mkdir(parents=True)
    install_roster(custodian, attacker)
    shutil.copy(leaked, keys.key_path(attacker, "GBR", active))
    keys.key_path(attacker, "GBR", active).chmod(0o600)
    forged = request(attacker, "GBR", tmp_path / "forged.json")
    assert f"signed by the new key and by the current key {active}\n" in forged.output

    # The custodian revokes it, as the refusal said ...
    revoked = msmt(
        "keys", "revoke", active, "--reason", "private key disclosed", "--dir", custodian
    )
    assert revoked.exit_code == 0, revoked.output
    # ... and then the leaked key's signature no longer authorizes anything.
    before = snapshot(custodian)
    assert refusal(msmt("keys", "accept", tmp_path / "forged.json", "--dir", custodian)) == (
        f"{tmp_path / 'forged.json'}: the request carries no signature by a current key of GBR "
        f"(its other signature does not count: key {active} is revoked): compare its "
        "fingerprint with GBR by phone and pass --fingerprint"
    )
    assert snapshot(custodian) == before
    # The same file sent again is named as revoked already.
    assert refusal(msmt("keys", "accept", leaked, "--dir", custodian)) == (
        f"{leaked} holds the private key of {active} (GBR's revoked sig key) in the roster: that "
        "key is disclosed, and whoever read this file can use it as GBR. Delete the file; it is "
        "revoked already; then GBR makes a new request and you accept it only with "
        "--fingerprint, after a phone call"
    )

    # GBR's honest request still carries the leaked key's signature (its roster is older):
    # it too needs the phone call, and passes with the fingerprint GBR reads out.
    honest = request(gbr, "GBR", tmp_path / "honest.json")
    assert f"by the current key {active}" in honest.output
    assert "is revoked" in refusal(
        msmt("keys", "accept", tmp_path / "honest.json", "--dir", custodian)
    )
    done = msmt(
        "keys",
        "accept",
        tmp_path / "honest.json",
        "--dir",
        custodian,
        "--fingerprint",
        fingerprint_of(honest),
    )
    assert done.exit_code == 0, done.output
    assert "authorized by the fingerprint compared with GBR" in done.output


def test_a_private_key_the_roster_does_not_list_is_not_called_a_roster_key(
    custodian: Path, tmp_path: Path
) -> None:
    gbr = tmp_path / "gbr"
    join(custodian, gbr, "GBR")
    active = current(custodian, "GBR", "sig")
    pending = request(gbr, "GBR", tmp_path / "pending.json")
    new_kid = re.search(r"new keys (GBR-sig-\S+) and", pending.output)
    assert new_kid is not None
    expected = (
        " holds a private key (a 'd' member) that the roster does not list (a pending "
        "request's key): the member sent its secret, not a key request. Delete the file, and "
        "have the member discard those keys and make a new request with 'msmt keys request'"
    )
    sent = tmp_path / "sent.jwk"
    shutil.copy(keys.key_path(gbr, "GBR", new_kid[1]), sent)
    assert refusal(msmt("keys", "accept", sent, "--dir", custodian)) == f"{sent}{expected}"
    # A file that only claims a roster key (its kid and x) with another key's secret is
    # not that key disclosed: the public key is derived from d, never read from the file.
    claimed = json.loads(sent.read_text()) | {
        "kid": active,
        "x": keys_roster.load_signed_roster(custodian).roster.get(active).jwk["x"],
    }
    sent.write_text(json.dumps(claimed))
    assert refusal(msmt("keys", "accept", sent, "--dir", custodian)) == f"{sent}{expected}"


# --- 3. a request made in the wrong directory -------------------------------------------


def test_a_request_outside_the_members_key_directory_is_refused_before_any_write(
    custodian: Path, tmp_path: Path
) -> None:
    gbr = tmp_path / "gbr"
    join(custodian, gbr, "GBR")
    data = tmp_path / "data"  # the node's data directory, mistaken for its key directory
    data.mkdir()
    (data / "node.sqlite3").write_bytes(b"")
    (gbr / "GBR" / "pseudonym").mkdir()
    before = snapshot(tmp_path)
    out = tmp_path / "req.json"
    for keydir, reason in [
        (
            data,
            f"no {data / 'GBR'}: {data} is not GBR's key directory (give the node's with "
            "--dir); a member's first request takes --first",
        ),
        (
            tmp_path / "elsewhere",
            f"no {tmp_path / 'elsewhere' / 'GBR'}: {tmp_path / 'elsewhere'} is not GBR's key "
            "directory (give the node's with --dir); a member's first request takes --first",
        ),
    ]:
        done = msmt("keys", "request", "GBR", "--dir", keydir, "--out", out)
        assert refusal(done) == reason
        assert snapshot(tmp_path) == before
    # GBR's folder without a roster beside it is not a node's key directory either.
    (data / "GBR").mkdir()
    before = snapshot(tmp_path)
    assert refusal(msmt("keys", "request", "GBR", "--dir", data, "--out", out)) == (
        f"no {data / keys.ROSTER_FILE}: {data} is not GBR's key directory (give the node's "
        "with --dir); a member's first request takes --first"
    )
    assert snapshot(tmp_path) == before
    # --first refuses a directory where GBR already has keys: a JWK, or only a NATS seed.
    held = sorted(p.name for p in (gbr / "GBR").glob("*.jwk"))
    assert refusal(msmt("keys", "request", "GBR", "--dir", gbr, "--out", out, "--first")) == (
        f"{gbr / 'GBR'} already holds keys of GBR ({held[0]}): GBR has keys here, so this is "
        "not its first request; make it without --first"
    )
    assert snapshot(tmp_path) == before
    seed_only = tmp_path / "seed-only"
    (seed_only / "GBR").mkdir(parents=True)
    shutil.copy(gbr / "GBR" / keys.NATS_SEED_FILE, seed_only / "GBR" / keys.NATS_SEED_FILE)
    before_seed = snapshot(tmp_path)
    assert refusal(msmt("keys", "request", "GBR", "--dir", seed_only, "--out", out, "--first")) == (
        f"{seed_only / 'GBR'} already holds keys of GBR (nats.nk): GBR has keys here, so this "
        "is not its first request; make it without --first"
    )
    assert snapshot(tmp_path) == before_seed
    # FRA's first request run in GBR's node folder: FRA's private keys would land where
    # GBR's operator holds them.
    assert refusal(msmt("keys", "request", "FRA", "--dir", gbr, "--out", out, "--first")) == (
        f"{gbr} holds GBR's keys ({gbr / 'GBR'}): a node's key directory is one member's;"
        " give FRA's own with --dir"
    )
    assert snapshot(tmp_path) == before_seed
    # Nor in the custodian's directory, beside the roster authority's private key.
    assert refusal(msmt("keys", "request", "FRA", "--dir", custodian, "--out", out, "--first")) == (
        f"{custodian} holds the roster authority's private key: it is the custodian's"
        " directory, not a node's; give FRA's own with --dir"
    )
    assert snapshot(tmp_path) == before_seed
    # In its own key directory, with the roster, the request is made and signed by the
    # current key.
    done = request(gbr, "GBR", out)
    assert f"by the current key {current(custodian, 'GBR', 'sig')}" in done.output


def test_a_request_that_changes_the_nats_user_needs_replace_nats_user(
    custodian: Path, tmp_path: Path
) -> None:
    gbr = tmp_path / "gbr"
    join(custodian, gbr, "GBR")
    users_file = custodian / keys.NATS_USERS_FILE
    live_user = json.loads(users_file.read_text())["GBR"]
    # A copy of GBR's key directory without its seed: the request brings a new NATS user.
    stray = tmp_path / "stray"
    (stray / "GBR").mkdir(parents=True)
    install_roster(custodian, stray)
    made = request(stray, "GBR", tmp_path / "stray.json")
    assert "(new)" in made.output
    before = snapshot(custodian)
    assert refusal(
        msmt(
            "keys",
            "accept",
            tmp_path / "stray.json",
            "--dir",
            custodian,
            "--fingerprint",
            fingerprint_of(made),
        )
    ) == (
        f"{tmp_path / 'stray.json'}: it changes GBR's NATS user: it was made with another NATS "
        "seed, either in a key directory other than the one GBR's node uses, or on purpose "
        "after a compromise (--new-nats-user); only in that case accept it with "
        "--replace-nats-user"
    )
    assert snapshot(custodian) == before
    # A routine request from GBR's own directory keeps the user: --replace-nats-user is
    # refused for it (after a compromise the seed must change), and it passes without.
    routine = request(gbr, "GBR", tmp_path / "routine.json")
    assert "(kept" in routine.output
    assert refusal(
        msmt(
            "keys",
            "accept",
            tmp_path / "routine.json",
            "--dir",
            custodian,
            "--replace-nats-user",
        )
    ) == (
        f"{tmp_path / 'routine.json'}: it keeps GBR's NATS user, and --replace-nats-user was "
        "given: after a compromise GBR makes its request with 'msmt keys request GBR "
        "--new-nats-user'"
    )
    assert snapshot(custodian) == before
    # Confirmed as a deliberate replacement, the stray request is accepted.
    done = msmt(
        "keys",
        "accept",
        tmp_path / "stray.json",
        "--dir",
        custodian,
        "--fingerprint",
        fingerprint_of(made),
        "--replace-nats-user",
    )
    assert done.exit_code == 0, done.output
    assert "GBR's NATS user changed" in done.output
    new_user = json.loads(users_file.read_text())["GBR"]
    assert new_user != live_user
    assert new_user == keys.nats_public((stray / "GBR" / keys.NATS_SEED_FILE).read_bytes(), "s")


# --- 4. a compromise: the NATS login is replaced with the keys ---------------------------


def test_after_a_compromise_the_member_re_enrols_with_a_new_nats_user(
    custodian: Path, tmp_path: Path
) -> None:
    gbr = tmp_path / "gbr"
    join(custodian, gbr, "GBR")
    old_seed = (gbr / "GBR" / keys.NATS_SEED_FILE).read_bytes()
    old_user = json.loads((custodian / keys.NATS_USERS_FILE).read_text())["GBR"]
    # GBR's machine was compromised: the custodian revokes both keys.
    for use in ("sig", "enc"):
        kid = current(custodian, "GBR", use)
        done = msmt("keys", "revoke", kid, "--reason", "machine compromised", "--dir", custodian)
        assert done.exit_code == 0, done.output
    assert (
        "otherwise GBR makes a key request ('msmt keys request GBR', with --new-nats-user if its "
        "NATS seed may be disclosed too) and you accept it with --fingerprint"
    ) in done.output
    install_roster(custodian, gbr)
    # Without --new-nats-user, a request that no current key signs says what it keeps.
    copy = tmp_path / "gbr-copy"
    shutil.copytree(gbr, copy)
    kept = request(copy, "GBR", tmp_path / "kept.json")
    assert (
        f"NATS user {old_user} (kept; after a compromise make the request with "
        "--new-nats-user, or whoever holds the seed keeps the member's hub login)"
    ) in kept.output

    made = request(gbr, "GBR", tmp_path / "again.json", "--new-nats-user")
    replaced = list((gbr / "GBR").glob(f"{keys.NATS_SEED_FILE}.replaced-*"))
    assert len(replaced) == 1
    assert re.fullmatch(r"nats\.nk\.replaced-\d{8}T\d{6}Z", replaced[0].name)
    assert replaced[0].read_bytes() == old_seed
    assert replaced[0].stat().st_mode & 0o777 == 0o600
    new_seed = (gbr / "GBR" / keys.NATS_SEED_FILE).read_bytes()
    new_user = keys.nats_public(new_seed, "seed")
    assert new_user != old_user
    assert (gbr / "GBR" / keys.NATS_SEED_FILE).stat().st_mode & 0o777 == 0o600
    assert f"NATS user {new_user} (new; the old seed is kept as {replaced[0]})" in made.output
    assert "signed by the new key only" in made.output

    # The custodian accepts it by fingerprint, and says the user is replaced on purpose.
    again = tmp_path / "again.json"
    assert "it changes GBR's NATS user" in refusal(
        msmt("keys", "accept", again, "--dir", custodian, "--fingerprint", fingerprint_of(made))
    )
    done = msmt(
        "keys",
        "accept",
        again,
        "--dir",
        custodian,
        "--fingerprint",
        fingerprint_of(made),
        "--replace-nats-user",
    )
    assert done.exit_code == 0, done.output
    assert "GBR's NATS user changed in" in done.output
    assert json.loads((custodian / keys.NATS_USERS_FILE).read_text())["GBR"] == new_user
    # GBR's node, given the new roster, logs in with the new seed (it reads only nats.nk).
    install_roster(custodian, gbr)
    roster = keys_roster.load_signed_roster(gbr).roster
    mine = keys.load_member_keys(gbr, "GBR", roster, datetime.now(UTC))
    assert mine.nats_seed == new_seed.strip()
    assert mine.signing_kid == current(custodian, "GBR", "sig")
    assert mine.pending == ()


def test_new_nats_user_never_overwrites_a_kept_seed(custodian: Path, tmp_path: Path) -> None:
    gbr = tmp_path / "gbr"
    join(custodian, gbr, "GBR")
    at = datetime.now(UTC).replace(microsecond=0)
    keyrequest.make_request(gbr, "GBR", new_nats_user=True, now=at)
    before = snapshot(gbr)
    with pytest.raises(UsageError, match=r"nats\.nk\.replaced-\d{8}T\d{6}Z already exists"):
        keyrequest.make_request(gbr, "GBR", new_nats_user=True, now=at)
    assert snapshot(gbr) == before


# --- 5. the auditor's NATS user, without NATS's nk tool ----------------------------------


def test_the_auditor_makes_its_nats_user_and_the_custodian_records_it(tmp_path: Path) -> None:
    custodian = tmp_path / "custodian"
    assert msmt("keys", "authority", "--dir", custodian).exit_code == 0  # no --audit
    for member in ("JPN", "GBR"):
        join(custodian, tmp_path / member.lower(), member)
    auditor = tmp_path / "auditor"
    made = msmt("keys", "nats-user", "audit", "--dir", auditor)
    assert made.exit_code == 0, made.output
    seed_file = auditor / "AUDIT" / keys.NATS_SEED_FILE
    assert seed_file.stat().st_mode & 0o777 == 0o600
    user = keys.nats_public(seed_file.read_bytes(), "seed")
    assert f"NATS user {user}\n" in made.output
    assert f"'msmt keys accept-nats-user AUDIT {user}'" in made.output
    assert seed_file.read_text().strip() not in made.output
    # A second run never replaces the seed.
    before = snapshot(auditor)
    assert refusal(msmt("keys", "nats-user", "AUDIT", "--dir", auditor)) == (
        f"{seed_file} already exists: AUDIT has a NATS user here"
    )
    assert snapshot(auditor) == before
    assert "only the AUDIT account's NATS user is made apart" in refusal(
        msmt("keys", "nats-user", "GBR", "--dir", auditor)
    )

    users_file = custodian / keys.NATS_USERS_FILE
    before = snapshot(custodian)
    jpn_user = json.loads(users_file.read_text())["JPN"]
    for nkey, reason in [
        # Said for what it is, and what it costs (an onboarding trial got only "not a NATS
        # user public nkey (56 base32 characters)").
        (
            seed_file.read_text().strip(),
            "the NATS user: this is an nkey seed, which is private, not a public key: it is"
            " disclosed; make a new one and send its public key (U...)",
        ),
        (user[:-1] + ("A" if user[-1] != "A" else "B"), "malformed NATS public nkey"),
        (jpn_user, f"the NATS user is already JPN's in {users_file}"),
    ]:
        line = refusal(msmt("keys", "accept-nats-user", "AUDIT", nkey, "--dir", custodian))
        assert reason in line
        assert nkey not in line  # a seed pasted by mistake is never echoed
        assert snapshot(custodian) == before
    assert "a member's comes with its key request" in refusal(
        msmt("keys", "accept-nats-user", "KOR", user, "--dir", custodian)
    )
    done = msmt("keys", "accept-nats-user", "AUDIT", user, "--dir", custodian)
    assert done.exit_code == 0, done.output
    assert f"AUDIT's NATS user added in {users_file} (version 4, signed)\n" in done.output
    assert json.loads(users_file.read_text())["AUDIT"] == user
    again = msmt("keys", "accept-nats-user", "AUDIT", user, "--dir", custodian)
    assert again.output == f"AUDIT's NATS user unchanged in {users_file}\n"
    # Another key for AUDIT replaces it only when the custodian says so.
    other = keys.nats_public(keys.new_nats_seed(), "seed")
    before = snapshot(custodian)
    assert refusal(msmt("keys", "accept-nats-user", "AUDIT", other, "--dir", custodian)) == (
        f"{users_file} already has another NATS user for AUDIT: pass --replace-nats-user to "
        "replace it (its seed then no longer logs in)"
    )
    assert snapshot(custodian) == before
    replaced = msmt(
        "keys", "accept-nats-user", "AUDIT", other, "--dir", custodian, "--replace-nats-user"
    )
    assert replaced.exit_code == 0, replaced.output
    assert "AUDIT's NATS user replaced" in replaced.output
    assert json.loads(users_file.read_text())["AUDIT"] == other
    # The hub configuration takes it.
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
    assert other in (tmp_path / "hub.conf").read_text()


# --- 6. what the member is told to do with the fingerprint -------------------------------


def test_the_request_says_whether_a_phone_call_is_needed(custodian: Path, tmp_path: Path) -> None:
    gbr = tmp_path / "gbr"
    first = request(gbr, "GBR", tmp_path / "first.json", "--first")
    assert "read the fingerprint out to them by phone" in first.output
    assert "no phone call" not in first.output
    done = msmt(
        "keys",
        "accept",
        tmp_path / "first.json",
        "--dir",
        custodian,
        "--fingerprint",
        fingerprint_of(first),
    )
    assert done.exit_code == 0, done.output
    install_roster(custodian, gbr)
    routine = request(gbr, "GBR", tmp_path / "routine.json")
    active = current(gbr, "GBR", "sig")
    assert (
        "send the request to the roster custodian: it needs no phone call if the custodian's "
        f"roster still lists {active} as active, as yours does (the custodian may still compare "
        "the fingerprint with you)"
    ) in routine.output
    assert "read the fingerprint out to them by phone" not in routine.output
    # What an operator reading only this output must do (an onboarding trial did not).
    assert "stop this node before the custodian accepts it, and start it with the new" in (
        routine.output
    )
    # ... and indeed the custodian accepts it without one.
    done = msmt("keys", "accept", tmp_path / "routine.json", "--dir", custodian)
    assert done.exit_code == 0, done.output


def test_a_suspended_member_with_an_old_roster_is_not_told_no_call_is_needed(
    custodian: Path, tmp_path: Path
) -> None:
    # Its roster copy still lists its key as active, so the request carries that key's
    # signature; but the custodian retired it (docs/KEYS.md, "A member leaves, or is
    # suspended") and asks for the fingerprint. The member was told no call was needed.
    kor = tmp_path / "kor"
    join(custodian, kor, "KOR")
    old = current(kor, "KOR", "sig")
    suspended = msmt("keys", "suspend", "KOR", "--dir", custodian)
    assert suspended.exit_code == 0, suspended.output
    made = request(kor, "KOR", tmp_path / "back.json")
    assert f"signed by the new key and by the current key {old}\n" in made.output
    assert "no phone call is needed" not in made.output
    assert f"it needs no phone call if the custodian's roster still lists {old} as active" in (
        made.output
    )
    assert (
        "if that key was retired or revoked since (a suspension, a rotation), the custodian asks "
        "you for the fingerprint by phone"
    ) in made.output
    # ... which is what the custodian does.
    line = refusal(msmt("keys", "accept", tmp_path / "back.json", "--dir", custodian))
    assert line.startswith(
        f"{tmp_path / 'back.json'}: the request carries no signature by a current key of KOR "
        f"(its other signature does not count: key {old} was retired at "
    )
    assert line.endswith("compare its fingerprint with KOR by phone and pass --fingerprint")
    done = msmt(
        "keys",
        "accept",
        tmp_path / "back.json",
        "--dir",
        custodian,
        "--fingerprint",
        fingerprint_of(made),
    )
    assert done.exit_code == 0, done.output


# --- a thief rotates the member before the theft is noticed ------------------------------


def test_revoking_a_stolen_key_names_the_keys_a_thief_may_have_rotated_to(
    custodian: Path, tmp_path: Path
) -> None:
    # A compromise drill: the thief's key request, signed by the stolen current key,
    # was accepted with no call (a routine rotation). Revoking the stolen keys then
    # left the thief's own keys active, and nothing said so.
    gbr = tmp_path / "gbr"
    join(custodian, gbr, "GBR")
    stolen_sig, stolen_enc = current(custodian, "GBR", "sig"), current(custodian, "GBR", "enc")
    thief = tmp_path / "thief"
    shutil.copytree(gbr, thief)
    time.sleep(1.1)  # a roster's times are whole seconds: the thief's keys come later
    made = request(thief, "GBR", tmp_path / "takeover.json")
    assert f"signed by the new key and by the current key {stolen_sig}\n" in made.output
    accepted = msmt("keys", "accept", tmp_path / "takeover.json", "--dir", custodian)
    assert accepted.exit_code == 0, accepted.output
    thiefs = current(custodian, "GBR", "sig"), current(custodian, "GBR", "enc")
    assert thiefs[0] != stolen_sig
    done = msmt("keys", "revoke", stolen_sig, "--reason", "machine broken into", "--dir", custodian)
    assert done.exit_code == 0, done.output
    # No "no active key left" warning (the thief's key is active), but this one:
    assert "has no active" not in done.output
    warning = done.output.splitlines()[-1]
    assert warning.startswith(f"warning: GBR's keys made after {stolen_sig} stay in force: ")
    assert all(kid in warning for kid in thiefs)
    assert warning.endswith(
        f"A key request signed by {stolen_sig} needed no call; if GBR did not make them "
        "itself, revoke them too (docs/KEYS.md, 'After a compromise')"
    )
    # Revoked, they are named no more; the encryption key's revocation names none left.
    for kid in thiefs:
        assert (
            msmt("keys", "revoke", kid, "--reason", "the thief's", "--dir", custodian).exit_code
            == 0
        )
    last = msmt("keys", "revoke", stolen_enc, "--reason", "machine broken into", "--dir", custodian)
    assert "stay in force" not in last.output, last.output
    assert "warning: GBR has no active enc key left" in last.output
