"""``msmt audit verify`` and ``msmt audit prove`` on real logs, keys from a real signed roster."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import build_log, event, witness_verifier
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from node_world import MSMT, REPO, without_dac_override

from broker import keys as keyfiles
from broker import keys_custodian, keys_roster
from broker.auditlog import DB_FILE, AuditLog
from broker.checkpoint import Checkpoint, cosign, roster_log_keys, sign_checkpoint
from broker.cli import audit_logs, main
from broker.cli.audit_base import verified_log
from broker.note import ALG_ED25519, Verifier, parse
from broker.witness import LogState, Witness, dump_state

MEMBERS = ("JPN", "USA", "KOR", "GBR")
LOG_KEY = Ed25519PrivateKey.from_private_bytes(bytes(32))
VKEY = Verifier("JPN", ALG_ED25519, LOG_KEY.public_key().public_bytes_raw()).vkey()


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys")
    keys_custodian.init_keys(path, MEMBERS)
    return path


def _signing_key(keydir: Path, member: str) -> Ed25519PrivateKey:
    roster = keys_roster.load_signed_roster(keydir).roster
    keys = keyfiles.load_member_keys(keydir, member, roster, datetime.now(UTC))
    private = keys.signing.private_key
    assert isinstance(private, Ed25519PrivateKey)
    return private


def _cosign(log: AuditLog, keydir: Path, size: int, members: tuple[str, ...]) -> list[Verifier]:
    """Each member's witness cosigns JPN's checkpoint at ``size``, merged as the node merges it."""
    roster = keys_roster.load_signed_roster(keydir).roster
    trusted: list[Verifier] = []
    for member in members:
        key = _signing_key(keydir, member)
        witness = Witness(member, key, {"JPN": roster_log_keys(roster, "JPN")})
        cosigned = witness.add_checkpoint(0, [], log.checkpoint_at(size), 1_800_000_000)
        trusted.append(witness_verifier(key, member))
        log.add_cosignatures(cosigned, trusted)
    return trusted


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_verify_clean_log_with_signed_roster(tmp_path: Path, keydir: Path) -> None:
    build_log(tmp_path, _signing_key(keydir, "JPN"), [5, 5])
    code, out, err = _run("audit", "verify", str(tmp_path), "--keys", str(keydir))
    assert (code, err) == (0, "")
    assert out.startswith("OK: JPN log of 10 entries, 2 signed checkpoints")


def test_a_log_checked_against_another_federations_roster_says_that_may_be_why(
    tmp_path: Path, keydir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # A new user checked a demo's log against the repository's keys: the line read
    # like tampering alone.
    other = tmp_path_factory.mktemp("other-keys")
    keys_custodian.init_keys(other, MEMBERS)
    build_log(tmp_path, _signing_key(keydir, "JPN"), [5, 5])
    code, out, err = _run("audit", "verify", str(tmp_path), "--keys", str(other))
    assert (code, out) == (1, "")
    assert err == (
        "msmt: error: checkpoint at size 5: checkpoint for JPN has no signature by a trusted"
        " log key (or the roster given is not this log's federation's)\n"
    )


def test_verify_and_prove_accept_a_relative_node_data_dir(
    tmp_path: Path, keydir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Operators type `msmt audit verify data/JPN`: a relative path to the node's data
    # directory, whose log lives in its audit/ folder.
    build_log(tmp_path / "data" / "JPN" / "audit", _signing_key(keydir, "JPN"), [4])
    monkeypatch.chdir(tmp_path)
    code, out, err = _run("audit", "verify", "data/JPN", "--keys", str(keydir))
    assert (code, err) == (0, "")
    assert out.startswith("OK: JPN log of 4 entries")
    code, out, err = _run("audit", "prove", "data/JPN", "--entry", "2")
    assert (code, err) == (0, "")
    assert json.loads(out)["leaf_index"] == 2


def test_verify_with_log_key_and_roster_file(tmp_path: Path, keydir: Path) -> None:
    build_log(tmp_path, _signing_key(keydir, "JPN"), [3])
    roster = keys_roster.load_signed_roster(keydir).roster
    vkey = roster_log_keys(roster, "JPN")[0].vkey()
    assert _run("audit", "verify", str(tmp_path), "--log-key", vkey)[0] == 0
    roster_file = keydir / keyfiles.ROSTER_FILE
    assert _run("audit", "verify", str(tmp_path), "--roster", str(roster_file))[0] == 0
    # Another member's key does not verify JPN's log.
    other = roster_log_keys(roster, "USA")[0]
    renamed = type(other)("JPN", other.alg, other.public).vkey()
    code, _, err = _run("audit", "verify", str(tmp_path), "--log-key", renamed)
    assert code == 1
    assert "checkpoint at size 3" in err


def test_tampered_log_exits_1_with_the_entry(tmp_path: Path, keydir: Path) -> None:
    build_log(tmp_path, _signing_key(keydir, "JPN"), [10, 10])
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("DELETE FROM entries WHERE idx = 4")
    # A real process: the exit code and the one-line message are what operators see.
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "msmt"),
            "audit",
            "verify",
            str(tmp_path),
            "--keys",
            str(keydir),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr == "msmt: error: entry 4: is missing (stored indices jump from 3 to 5)\n"
    assert proc.stdout == ""


def test_entries_lists_a_verified_log_and_refuses_a_damaged_one(
    tmp_path: Path, keydir: Path
) -> None:
    build_log(tmp_path, _signing_key(keydir, "JPN"), [6, 6])
    code, out, err = _run("audit", "entries", str(tmp_path), "--keys", str(keydir))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [str(i) for i in range(12)]
    assert [line.split()[2] for line in lines[:6]] == [
        "accepted", "sent", "received", "rejected", "key", "policy",
    ]  # fmt: skip
    assert "released=vessel.imo,vessel.position#coarsen:0.1" in lines[1]
    assert "action=rotated  kid=JPN-sig-1  new_kid=JPN-sig-2" in lines[4]
    assert lines[9].split()[2] == "rejected_many"
    assert lines[9].endswith("count=9  source=GBR  steps=format:8,signature:1")
    code, out, err = _run(
        "audit", "entries", str(tmp_path), "--keys", str(keydir), "--type", "key", "--json"
    )
    assert (code, err) == (0, "")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["seq"], r["type"], r["new_kid"]) for r in rows] == [
        (4, "key", "JPN-sig-2"),
        (10, "key", "JPN-sig-2"),
    ]
    # Only what verifies is shown: an edited entry is one line and exit 1, nothing listed.
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("UPDATE entries SET entry = replace(entry, 'USA', 'NZL') WHERE idx = 1")
    code, out, err = _run("audit", "entries", str(tmp_path), "--keys", str(keydir))
    assert (code, out) == (1, "")
    assert err.startswith("msmt: error: JPN log ")
    assert "entry 1" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ((), "say whose key signs the log"),
        (("--log-key", "nonsense"), "--log-key"),
        (("--log-key", VKEY, "--cosigned"), "--cosigned and --quorum K go together"),
        (("--log-key", VKEY, "--quorum", "2"), "--cosigned and --quorum K go together"),
        (("--log-key", VKEY, "--cosigned", "--quorum", "1"), "--cosigned needs --witnesses"),
        (("--keys", "/nonexistent", "--roster", "x.json"), "either --keys or --roster"),
        (("--log-key", VKEY, "--wait", "30"), "--wait waits for a quorum: it needs --cosigned"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], reason: str) -> None:
    build_log(tmp_path, LOG_KEY, [1])
    code, _, err = _run("audit", "verify", str(tmp_path), *args)
    assert code == 2
    assert reason in err
    assert "Traceback" not in err


def test_not_a_log_directory_exits_2(tmp_path: Path, keydir: Path) -> None:
    code, _, err = _run("audit", "verify", str(tmp_path / "missing"), "--keys", str(keydir))
    assert code == 2
    assert "is not a directory" in err


def test_an_unreadable_witness_key_file_is_one_line_naming_it(tmp_path: Path) -> None:
    build_log(tmp_path / "log", LOG_KEY, [1])
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe")
    missing = tmp_path / "missing.txt"
    base = ("audit", "verify", str(tmp_path / "log"), "--log-key", VKEY, "--cosigned")
    for path, reason in (
        (missing, "No such file or directory"),
        (binary, "not UTF-8 text"),
    ):
        code, out, err = _run(*base, "--quorum", "1", "--witnesses", str(path))
        assert (code, out) == (2, "")
        assert err == f"msmt: error: cannot read witness keys {path}: {reason}\n"


def test_cosigned_quorum_from_roster_and_witness_file(tmp_path: Path, keydir: Path) -> None:
    log = build_log(tmp_path, _signing_key(keydir, "JPN"), [4])
    roster = keys_roster.load_signed_roster(keydir).roster
    base = ["audit", "verify", str(tmp_path), "--keys", str(keydir), "--cosigned"]
    code, _, err = _run(*base, "--quorum", "1")
    assert code == 1
    assert "0 valid witness cosignatures, fewer than the quorum of 1" in err
    witnesses = _cosign(log, keydir, 4, ("USA", "KOR"))
    code, out, _ = _run(*base, "--quorum", "2")
    assert code == 0
    assert "cosigned by USA, KOR (quorum 2)" in out
    code, _, err = _run(*base, "--quorum", "3")
    assert code == 1
    # Whose cosignatures it has: a witness missing round after round shows by name.
    assert "has 2 valid witness cosignatures (USA, KOR), fewer than the quorum of 3" in err
    wfile = tmp_path / "witnesses.txt"
    wfile.write_text("# trusted witnesses\n" + witnesses[0].vkey() + "\n")
    code, out, _ = _run(*base, "--quorum", "1", "--witnesses", str(wfile))
    assert code == 0
    assert "cosigned by USA (quorum 1)" in out
    # A log key (type 0x01) given as a witness key is named, not counted as 0 cosignatures.
    log_key_file = tmp_path / "log-keys.txt"
    log_key_file.write_text(roster_log_keys(roster, "USA")[0].vkey() + "\n")
    code, out, err = _run(*base, "--quorum", "1", "--witnesses", str(log_key_file))
    assert (code, out) == (2, "")
    assert err == (
        f"msmt: error: {log_key_file}: USA's key has signature type 0x01; "
        "witness keys are cosignature keys, type 0x04 (tlog-cosignature)\n"
    )
    # A cosignature line that does not verify makes the whole check fail, not count as 0.
    note = parse(log.latest_checkpoint() or "")
    bad = cosign(note, "USA", _signing_key(keydir, "KOR"), 1)
    forged = type(bad)("USA", witnesses[0].key_id, bad.sig)
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        stored = note.with_signatures(forged).render()
        db.execute("UPDATE checkpoints SET note = ? WHERE size = 4", (stored,))
    code, _, err = _run(*base, "--quorum", "1", "--witnesses", str(wfile))
    assert code == 1
    assert "cosignature" in err or "does not verify" in err


def test_short_of_a_quorum_says_what_a_live_logs_auditor_can_do(
    tmp_path: Path, keydir: Path
) -> None:
    # A running node's newest checkpoint waits for its witnesses' next round: the
    # line says which checkpoint last had the quorum and how to wait for one.
    log = build_log(tmp_path, _signing_key(keydir, "JPN"), [4, 3])
    _cosign(log, keydir, 4, ("USA", "KOR"))
    log.close()
    base = ["audit", "verify", str(tmp_path), "--keys", str(keydir), "--cosigned"]
    code, out, err = _run(*base, "--quorum", "2")
    assert (code, out) == (1, "")
    assert err == (
        "msmt: error: latest checkpoint (size 7, newest entry 2026-11-28T12:00:06Z) has 0 valid"
        " witness cosignatures, fewer than the quorum of 2; the latest with a quorum is at size"
        " 4 (3 entries before); a running node's newest checkpoints wait for their witnesses'"
        " next round (about every 5 s): --wait 30 waits for a quorum on it or a later one\n"
    )
    # Nothing cosigns meanwhile: after the wait, the same decision, said so.
    code, out, err = _run(*base, "--quorum", "3", "--wait", "0.2")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "waiting up to 0.2 s for a quorum of 3 on the checkpoint at size 7 or a later one",
        "msmt: error: latest checkpoint (size 7, newest entry 2026-11-28T12:00:06Z) has 0 valid"
        " witness cosignatures, fewer than the quorum of 3; no checkpoint has a quorum; none at"
        " size 7 or later reached it within the 0.2 s waited",
    ]


def test_verify_wait_passes_once_a_checkpoint_reaches_the_quorum_while_it_waits(
    tmp_path: Path, keydir: Path
) -> None:
    # The command as an auditor runs it on a running node: the log grows and the
    # witnesses cosign a later checkpoint only after verify has read the log.
    log = build_log(tmp_path, _signing_key(keydir, "JPN"), [4])
    msmt = str(Path(sys.executable).parent / "msmt")
    args = ["audit", "verify", str(tmp_path), "--keys", str(keydir), "--cosigned"]
    proc = subprocess.Popen(
        [msmt, *args, "--quorum", "2", "--wait", "120", "--jobs", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline() == (
            "waiting up to 120 s for a quorum of 2 on the checkpoint at size 4 or a later one\n"
        )
        log.append_many([event(i) for i in range(4, 9)])
        _cosign(log, keydir, 9, ("USA", "GBR"))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert (proc.returncode, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("OK: JPN log of 9 entries, 2 signed checkpoints, root ")
    assert lines[1:] == ["cosigned by USA, GBR (quorum 2), reached at size 9 (size 4 when read)"]


def _independent_rfc6962_check(proof: dict[str, Any]) -> bytes:
    """Recompute the root from the proof with nothing but hashlib (RFC 9162 §2.1.3.2)."""

    def h(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    entry = base64.b64decode(proof["entry"])
    r = h(b"\x00" + entry)
    assert base64.b64encode(r).decode() == proof["leaf_hash"]
    fn, sn = proof["leaf_index"], proof["tree_size"] - 1
    assert 0 <= fn <= sn
    for p in map(base64.b64decode, proof["inclusion_path"]):
        assert sn > 0
        if fn & 1 or fn == sn:
            r = h(b"\x01" + p + r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = h(b"\x01" + r + p)
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0
    return r


def test_prove_prints_a_proof_any_rfc6962_verifier_accepts(tmp_path: Path, keydir: Path) -> None:
    build_log(tmp_path, _signing_key(keydir, "JPN"), [7, 6])
    for entry, size in ((0, None), (5, 7), (12, None), (6, 13)):
        args = ["audit", "prove", str(tmp_path), "--entry", str(entry)]
        if size:
            args += ["--checkpoint", str(size)]
        code, out, _ = _run(*args)
        assert code == 0
        proof = json.loads(out)
        assert proof["tree_size"] == (size or 13)
        root = _independent_rfc6962_check(proof)
        assert base64.b64encode(root).decode() == proof["root_hash"]
        lines = proof["checkpoint"].split("\n")
        assert lines[:3] == ["JPN", str(proof["tree_size"]), proof["root_hash"]]
        entry_json = json.loads(base64.b64decode(proof["entry"]))
        assert entry_json["seq"] == entry
    assert _run("audit", "prove", str(tmp_path), "--entry", "13")[0] == 2
    assert _run("audit", "prove", str(tmp_path), "--entry", "1", "--checkpoint", "8") == (
        2,
        "",
        "msmt: error: no stored checkpoint of size 8: the nearest are 7 and 13"
        " (2 checkpoints, sizes 7 to 13)\n",
    )


def _independent_consistency_check(proof: dict[str, Any], old_root: bytes) -> bytes:
    """Rebuild both roots from the proof with nothing but hashlib (RFC 9162 §2.1.4.2).

    ``old_root`` is the one the holder kept, not the proof's word; returns the new root.
    """

    def h(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    m, n = proof["old_size"], proof["tree_size"]
    path = [base64.b64decode(x) for x in proof["consistency_path"]]
    assert 0 < m <= n
    if m == n:
        assert path == []
        return old_root
    if m & (m - 1) == 0:  # 1. a power of two: the old root is the first node
        path.insert(0, old_root)
    fn, sn = m - 1, n - 1  # 2.
    while fn & 1:  # 3.
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]  # 4.
    for c in path[1:]:  # 5.
        assert sn != 0
        if fn & 1 or fn == sn:
            fr, sr = h(b"\x01" + c + fr), h(b"\x01" + c + sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = h(b"\x01" + sr + c)
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0  # 6.
    assert fr == old_root
    return sr


def test_prove_from_size_prints_a_consistency_proof_any_rfc6962_verifier_accepts(
    tmp_path: Path, keydir: Path
) -> None:
    # An auditor kept JPN's checkpoint of size 7 at the last audit: the log now at
    # 13 proves it extends those 7 entries, without the auditor reading them.
    build_log(tmp_path, _signing_key(keydir, "JPN"), [7, 6])
    code, out, _ = _run("audit", "prove", str(tmp_path), "--entry", "0", "--checkpoint", "7")
    assert code == 0
    kept = base64.b64decode(json.loads(out)["checkpoint"].split("\n")[2])
    for old, size in ((7, None), (7, 7), (1, None), (4, None), (8, None), (12, 13), (13, None)):
        args = ["audit", "prove", str(tmp_path), "--from-size", str(old)]
        if size:
            args += ["--checkpoint", str(size)]
        code, out, err = _run(*args)
        assert (code, err) == (0, ""), err
        proof = json.loads(out)
        assert set(proof) == {
            "origin",
            "old_size",
            "old_root_hash",
            "tree_size",
            "consistency_path",
            "root_hash",
            "checkpoint",
        }
        assert (proof["origin"], proof["old_size"], proof["tree_size"]) == ("JPN", old, size or 13)
        old_root = base64.b64decode(proof["old_root_hash"])
        if old == 7:
            assert old_root == kept
        new_root = _independent_consistency_check(proof, old_root)
        assert base64.b64encode(new_root).decode() == proof["root_hash"]
        assert proof["checkpoint"].split("\n")[:3] == ["JPN", str(size or 13), proof["root_hash"]]
    # A holder whose kept root differs (another history) is not convinced.
    code, out, _ = _run("audit", "prove", str(tmp_path), "--from-size", "7")
    with pytest.raises(AssertionError):
        _independent_consistency_check(json.loads(out), hashlib.sha256(b"other").digest())
    for wrong, reason in (
        (("--from-size", "14"), "--from-size 14 is past the checkpoint of size 13"),
        (("--from-size", "8", "--checkpoint", "7"), "past the checkpoint of size 7"),
        (("--from-size", "3", "--entry", "1"), "give one of --entry N (inclusion) or --from-size"),
        ((), "give one of --entry N (inclusion) or --from-size OLD (consistency)"),
    ):
        code, out, err = _run("audit", "prove", str(tmp_path), *wrong)
        assert (code, out) == (2, ""), err
        assert reason in err


def _damaged(directory: Path, reason: str) -> str:
    return (
        f"msmt: error: no proof: the log in {directory} is damaged: {reason}; "
        f"check it with msmt audit verify {directory}\n"
    )


def test_prove_refuses_a_truncated_log_in_one_line(tmp_path: Path) -> None:
    # Entries deleted from 12 on, the checkpoints kept (no key needed). Once an
    # IndexError traceback for an entry beyond the cut, and "no leaf 5 in a tree of
    # size 20" for one before it.
    build_log(tmp_path, LOG_KEY, [8, 4, 8]).close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("DELETE FROM entries WHERE idx >= 12")
    truncated = _damaged(
        tmp_path,
        "entry 12: is missing: the log holds 12 entries but its checkpoint claims 20 (truncated)",
    )
    for entry in ("15", "5"):
        assert _run("audit", "prove", str(tmp_path), "--entry", entry) == (1, "", truncated)
    # The checkpoint of size 12 still matches what is left: a proof against it is sound.
    code, out, err = _run("audit", "prove", str(tmp_path), "--entry", "5", "--checkpoint", "12")
    assert (code, err) == (0, "")
    assert _independent_rfc6962_check(json.loads(out)) == base64.b64decode(
        json.loads(out)["root_hash"]
    )


def test_prove_names_the_edited_entry_rather_than_a_failed_self_check(tmp_path: Path) -> None:
    # Once "inclusion proof does not lead to the root hash", which blamed the proof.
    build_log(tmp_path, LOG_KEY, [8, 8]).close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        (data,) = db.execute("SELECT entry FROM entries WHERE idx = 10").fetchone()
        db.execute(
            "UPDATE entries SET entry = ? WHERE idx = 10", (data.replace(b'"at":"2', b'"at":"3'),)
        )
    reason = "entry 10: was altered, removed or replaced: entry 11 does not link to it"
    assert _run("audit", "prove", str(tmp_path), "--entry", "3") == (
        1,
        "",
        _damaged(tmp_path, reason),
    )
    # The checkpoint before the edit still holds: proofs against it are given.
    assert _run("audit", "prove", str(tmp_path), "--entry", "3", "--checkpoint", "8")[0] == 0


def test_prove_against_a_huge_checkpoint_is_one_line(tmp_path: Path) -> None:
    # An insider signs a checkpoint claiming 2**63-1 entries, the largest SQLite
    # integer; proving its second-to-last entry was an IndexError traceback.
    build_log(tmp_path, LOG_KEY, [5]).close()
    huge = 2**63 - 1
    note = sign_checkpoint(Checkpoint("JPN", huge, b"\x11" * 32), LOG_KEY).render()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("INSERT INTO checkpoints VALUES (?, ?)", (huge, note))
    reason = f"entry 5: is missing: the log holds 5 entries but its checkpoint claims {huge} "
    for args in (
        ("--entry", str(huge - 1), "--checkpoint", str(huge)),
        ("--entry", "2"),  # the latest checkpoint, by default
    ):
        assert _run("audit", "prove", str(tmp_path), *args) == (
            1,
            "",
            _damaged(tmp_path, reason + "(truncated)"),
        )


def test_prove_reads_a_checkpoint_stored_as_a_blob_as_its_text(tmp_path: Path) -> None:
    # A note stored as a BLOB (by hand) is still the note, as verify reads it: once a
    # TypeError traceback when printing the JSON.
    build_log(tmp_path, LOG_KEY, [3, 3]).close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("UPDATE checkpoints SET note = CAST(note AS BLOB) WHERE size = 3")
    code, out, err = _run("audit", "prove", str(tmp_path), "--entry", "1", "--checkpoint", "3")
    assert (code, err) == (0, "")
    assert json.loads(out)["checkpoint"].startswith("JPN\n3\n")


def test_prove_refuses_a_checkpoint_that_is_not_this_logs_own(tmp_path: Path) -> None:
    # The latest checkpoint's origin line edited to USA: once a proof printed from it.
    build_log(tmp_path, LOG_KEY, [3, 3]).close()
    with sqlite3.connect(tmp_path / DB_FILE) as db:
        db.execute("UPDATE checkpoints SET note = 'USA' || substr(note, 4) WHERE size = 6")
    assert _run("audit", "prove", str(tmp_path), "--entry", "1") == (
        1,
        "",
        _damaged(tmp_path, "checkpoint at size 6 is for USA/6, not JPN/6"),
    )


def test_prove_on_a_zero_byte_log_is_one_line(tmp_path: Path) -> None:
    (tmp_path / DB_FILE).write_bytes(b"")
    for args in (
        ("prove", str(tmp_path), "--entry", "0"),
        ("verify", str(tmp_path), "--log-key", VKEY),
    ):
        assert _run("audit", *args) == (
            1,
            "",
            f"msmt: error: {tmp_path / DB_FILE} is not an msmt-audit-1 audit log "
            "(empty or not initialised)\n",
        )


def test_verify_refuses_a_directory_named_for_another_member(tmp_path: Path, keydir: Path) -> None:
    # USA's log in JPN's data directory (swapped files) printed "OK: USA log ..." and
    # exited 0: a script checking data/JPN by exit status took it for JPN's log.
    build_log(tmp_path / "data" / "JPN" / "audit", _signing_key(keydir, "USA"), [3], "USA").close()
    build_log(tmp_path / "USA", _signing_key(keydir, "USA"), [3], "USA").close()
    build_log(tmp_path / "usa-copy", _signing_key(keydir, "USA"), [3], "USA").close()
    for directory in (tmp_path / "data" / "JPN", tmp_path / "data" / "JPN" / "audit"):
        assert _run("audit", "verify", str(directory), "--keys", str(keydir)) == (
            1,
            "",
            f"msmt: error: {directory} is named for JPN but holds USA's audit log "
            "(a swapped or misplaced audit.sqlite?)\n",
        )
    # Named for its own member, or for none: verified as before.
    for name in ("USA", "usa-copy"):
        code, out, _ = _run("audit", "verify", str(tmp_path / name), "--keys", str(keydir))
        assert code == 0
        assert out.startswith("OK: USA log of 3 entries")


def test_prove_on_empty_directory_fails_cleanly(tmp_path: Path) -> None:
    code, _, err = _run("audit", "prove", str(tmp_path), "--entry", "0")
    assert code == 2
    assert err.startswith("msmt: error: no audit log at ")
    assert event(0).type == "accepted"


def test_verify_known_checkpoint_catches_a_rollback_and_a_rewrite(
    tmp_path: Path, keydir: Path
) -> None:
    # What an auditor who kept a checkpoint can check offline, without a witness.
    key = _signing_key(keydir, "JPN")
    log = build_log(tmp_path / "log", key, [5, 5])
    kept = tmp_path / "kept.note"
    kept.write_text(log.latest_checkpoint() or "")
    log.append_many([event(i) for i in range(10, 14)])
    log.close()
    proof = tmp_path / "proof.json"  # `audit prove` output, kept instead of a bare note
    proof.write_text(_run("audit", "prove", str(tmp_path / "log"), "--entry", "2")[1])
    verify = ("audit", "verify", "--keys", str(keydir))

    code, out, err = _run(
        *verify, str(tmp_path / "log"), "--known", str(kept), "--known", str(proof)
    )
    assert (code, err) == (0, "")
    assert out.splitlines()[1:] == [
        f"contains the checkpoint in {kept}",
        f"contains the checkpoint in {proof}",
    ]

    # Cut back to size 5, with the later checkpoints: alone it verifies, as it should.
    rolled = tmp_path / "rolled"
    build_log(rolled, key, [5]).close()
    assert _run(*verify, str(rolled))[0] == 0
    code, _, err = _run(*verify, str(rolled), "--known", str(kept))
    assert code == 1
    assert err == (
        f"msmt: error: rolled back: the log holds 5 entries, but {kept} is its checkpoint "
        "at size 10\n"
    )

    # The same size, other entries, re-signed with the real key: a fork.
    forked = AuditLog(tmp_path / "forked", "JPN", key)
    forked.append_many([event(i) for i in range(5)])
    forked.append_many([event(i + 100) for i in range(5, 12)])
    forked.close()
    assert _run(*verify, str(tmp_path / "forked"))[0] == 0
    code, _, err = _run(*verify, str(tmp_path / "forked"), "--known", str(kept))
    assert code == 1
    assert err == (
        f"msmt: error: history rewritten: the log's first 10 entries do not hash to the root "
        f"of {kept}, which its own key signed (a fork)\n"
    )


def test_verify_known_refuses_what_is_not_a_checkpoint_of_this_log(
    tmp_path: Path, keydir: Path
) -> None:
    build_log(tmp_path / "jpn", _signing_key(keydir, "JPN"), [3]).close()
    usa = build_log(tmp_path / "usa", _signing_key(keydir, "USA"), [3], member="USA")
    theirs = tmp_path / "usa.note"
    theirs.write_text(usa.latest_checkpoint() or "")
    usa.close()
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"tree_size": 3}')
    binary = tmp_path / "binary.note"
    binary.write_bytes(b"\xff\xfe checkpoint")
    missing = tmp_path / "missing"
    deep = tmp_path / "deep.json"  # deeper than json's stack: was a traceback
    deep.write_text('{"checkpoint": ' + "[" * 10_000 + "]" * 10_000 + "}")
    for path, reason in (
        (theirs, f"{theirs}: not a checkpoint of this log: "),
        (garbage, f'{garbage}: JSON without a "checkpoint" note in it\n'),
        (deep, f'{deep}: JSON without a "checkpoint" note in it\n'),
        # The OS's reason, not Python's "[Errno 2] ...: '<path>'" naming the file twice,
        # and no codec text for a file that is not text.
        (missing, f"cannot read checkpoint {missing}: No such file or directory\n"),
        (binary, f"cannot read checkpoint {binary}: not UTF-8 text\n"),
    ):
        code, out, err = _run(
            "audit", "verify", str(tmp_path / "jpn"), "--keys", str(keydir), "--known", str(path)
        )
        assert (code, out) == (2, "")
        assert err.startswith(f"msmt: error: {reason}"), err
        assert err.count("\n") == 1


def test_verify_witness_state_catches_a_cut_back_the_log_alone_cannot(
    tmp_path: Path, keydir: Path
) -> None:
    # USA witnessed JPN's log at size 10; its witness-state.json is all an auditor
    # needs to catch JPN's log cut back to size 5 (a checkpoint USA did cosign) or
    # rewritten and re-signed at the same size.
    roster = keys_roster.load_signed_roster(keydir).roster
    key = _signing_key(keydir, "JPN")
    log = build_log(tmp_path / "log", key, [5, 5])
    witness = Witness("USA", Ed25519PrivateKey.generate(), {"JPN": roster_log_keys(roster, "JPN")})
    witness.add_checkpoint(0, [], log.latest_checkpoint() or "", 1_700_000_000)
    log.append_many([event(i) for i in range(10, 14)])
    log.close()
    state = tmp_path / "witness-state.json"
    state.write_bytes(dump_state(witness.state))
    verify = ("audit", "verify", "--keys", str(keydir))

    code, out, err = _run(*verify, str(tmp_path / "log"), "--witness-state", str(state))
    assert (code, err) == (0, "")
    assert out.splitlines()[1:] == [f"holds what the witness state in {state} cosigned"]

    rolled = tmp_path / "rolled"
    build_log(rolled, key, [5]).close()
    assert _run(*verify, str(rolled))[0] == 0
    assert _run(*verify, str(rolled), "--witness-state", str(state)) == (
        1,
        "",
        f"msmt: error: rolled back: the log holds 5 entries, but the witness whose state is "
        f"{state} cosigned it at size 10\n",
    )

    forked = AuditLog(tmp_path / "forked", "JPN", key)
    forked.append_many([event(i + 100) for i in range(12)])
    forked.close()
    assert _run(*verify, str(tmp_path / "forked"))[0] == 0
    assert _run(*verify, str(tmp_path / "forked"), "--witness-state", str(state)) == (
        1,
        "",
        "msmt: error: history rewritten: the log's first 10 entries do not hash to the root "
        f"the witness whose state is {state} cosigned (a fork)\n",
    )


def test_verify_witness_state_refuses_a_file_that_says_nothing_of_this_log(
    tmp_path: Path, keydir: Path
) -> None:
    build_log(tmp_path / "jpn", _signing_key(keydir, "JPN"), [3]).close()
    others = tmp_path / "others.json"
    others.write_bytes(dump_state({"KOR": LogState(3, bytes(32)), "GBR": LogState(1, bytes(32))}))
    bad = tmp_path / "bad.json"
    bad.write_text('{"JPN": {"size": -1, "root": "AAAA"}}')
    note = tmp_path / "kept.note"
    note.write_text("JPN\n3\nAAAA\n")
    # Deeper than json's stack, and an integer int() refuses: each was a traceback.
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 10_000 + "]" * 10_000)
    huge = tmp_path / "huge.json"
    huge.write_text('{"JPN": {"size": ' + "9" * 5000 + ', "root": "AAAA"}}')
    for path, reason in (
        (others, f"{others}: this witness has cosigned nothing of JPN (it holds 2 other logs)"),
        (bad, f"{bad}: not a witness state: witness state for 'JPN' is malformed"),
        (note, f"{note}: not a witness state: witness state is not JSON"),
        (deep, f"{deep}: not a witness state: witness state is not JSON"),
        (huge, f"{huge}: not a witness state: witness state is not JSON"),
        (tmp_path / "nope", f"cannot read witness state {tmp_path / 'nope'}: No such file"),
    ):
        code, out, err = _run(
            "audit", "verify", str(tmp_path / "jpn"), "--keys", str(keydir),
            "--witness-state", str(path),
        )  # fmt: skip
        assert (code, out) == (2, "")
        assert err.startswith(f"msmt: error: {reason}"), err
        assert err.count("\n") == 1


# --- a log that cannot be opened: one line naming the file and why -----------------------

_COMMANDS = ("verify", "entries", "replay", "prove")


def _audit(command: str, directory: Path, keydir: Path) -> tuple[int, str, str]:
    more = {
        "verify": ["--keys", str(keydir)],
        "entries": ["--keys", str(keydir)],
        "replay": ["--keys", str(keydir), "--policies", str(REPO / "nodes")],
        "prove": ["--entry", "1"],
    }[command]
    return _run("audit", command, str(directory), *more)


def _unopenable(kind: str, folder: Path, keydir: Path) -> tuple[Path, int, str]:
    """A log folder made ``kind`` of unopenable; what to run it on, the exit and the line."""
    log = folder / "JPN"
    db = log / DB_FILE
    if kind == "missing parent":
        return folder / "gone" / "JPN", 2, f"{folder / 'gone' / 'JPN'} is not a directory"
    if kind == "directory as file":
        db.mkdir(parents=True)
        return log, 2, f"audit log {db} is a directory, where its file should be"
    if kind == "not sqlite":
        log.mkdir()
        db.write_text("not a database\n" * 100)
        return log, 1, f"audit log {db} is damaged or not an audit log: file is not a database"
    build_log(log, _signing_key(keydir, "JPN"), [300]).close()
    if kind == "truncated mid-page":
        data = db.read_bytes()
        db.write_bytes(data[: len(data) // 2 + 100])
        return (
            log,
            1,
            f"audit log {db} is damaged or not an audit log: database disk image is malformed",
        )
    assert kind == "-wal a directory"
    (log / f"{DB_FILE}-wal").mkdir()
    # SQLite's own words were "unable to open database file", naming neither.
    return log, 1, f"cannot open audit log {db}: {db}-wal is a directory, where a file should be"


@pytest.mark.parametrize(
    "kind",
    ["missing parent", "directory as file", "not sqlite", "truncated mid-page", "-wal a directory"],
)
def test_a_log_that_cannot_be_opened_is_one_line_naming_it_and_why(
    tmp_path: Path, keydir: Path, kind: str
) -> None:
    directory, code, line = _unopenable(kind, tmp_path, keydir)
    for command in _COMMANDS:
        assert _audit(command, directory, keydir) == (code, "", f"msmt: error: {line}\n"), command


@pytest.mark.parametrize("command", ["entries", "replay"])
def test_a_log_gone_once_verified_is_named_not_a_traceback(
    tmp_path: Path, keydir: Path, command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # entries and replay read the entries again once the log verifies: a log moved away
    # meanwhile (a restore) was SQLite's bare "unable to open database file", uncaught.
    log = tmp_path / "JPN"
    build_log(log, _signing_key(keydir, "JPN"), [5]).close()
    db = log / DB_FILE

    def then_moved(*args: Any) -> Any:
        report = verified_log(*args)
        db.rename(tmp_path / "elsewhere.sqlite")
        return report

    monkeypatch.setattr(audit_logs, "verified_log", then_moved)
    assert _audit(command, log, keydir) == (
        1,
        "",
        f"msmt: error: cannot open audit log {db}: {db} does not exist\n",
    )


def test_a_log_the_auditor_may_not_read_is_named_with_why(tmp_path: Path, keydir: Path) -> None:
    # A folder it may not enter was a traceback (pathlib's PermissionError); a file it
    # may not read, SQLite's "unable to open database file".
    prefix = without_dac_override()
    log = tmp_path / "JPN"
    build_log(log, _signing_key(keydir, "JPN"), [5]).close()
    db, uid = log / DB_FILE, os.geteuid()

    def verify() -> tuple[int, str, str]:
        done = subprocess.run(
            [*prefix, MSMT, "audit", "verify", str(log), "--keys", str(keydir)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        return done.returncode, done.stdout, done.stderr

    log.chmod(0o600)
    try:
        entered = verify()
    finally:
        log.chmod(0o700)
    assert entered == (
        1,
        "",
        f"msmt: error: cannot open audit log {db}: the folder {log} cannot be entered by uid"
        f" {uid} (mode 0600, owner uid {uid})\n",
    )
    db.chmod(0o000)
    try:
        read = verify()
    finally:
        db.chmod(0o600)
    assert read == (
        1,
        "",
        f"msmt: error: cannot open audit log {db}: {db} is not readable by uid {uid}"
        f" (mode 0000, owner uid {uid})\n",
    )
