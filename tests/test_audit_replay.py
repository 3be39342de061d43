"""``msmt audit replay``: several real SQLite logs reconciled against the senders' policies."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import astuple, dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import T0, log_verifier
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from node_world import (
    BATCH_POLICY,
    World,
    audit_entries,
    await_for,
    expected_partners,
    records_for,
    write_node_config,
)

from broker import audit_events as ev
from broker import canonical, keys_custodian, keys_roster
from broker import keys as keyfiles
from broker.audit_policy import over_disclosures
from broker.audit_replay import BulkRefusals, Exchange, Finding, Replay, replay
from broker.audit_replay_text import render_tables
from broker.audit_verify import Report, load, verify_log
from broker.auditlog import DB_FILE, AuditLog
from broker.cli import main
from broker.errors import AuditError
from broker.natsproc import free_port
from broker.node_start import load_node
from broker.policy import load_policy
from broker.publisher import sent_event
from broker.roster import Roster, RosterKey
from broker.store import OutboxItem
from broker.validation import parse_record

POLICIES = {
    # The node tests' batch policy (everything to USA and KOR), plus coarse vessels to GBR.
    "JPN": BATCH_POLICY
    + """
[[rules]]
name = "vessels-to-gbr"
kinds = ["vessel"]
partners = ["GBR"]
release = ["observed_at", "vessel.imo", "vessel.position"]
transforms = { "vessel.position" = "coarsen:1" }
""",
    "USA": """
version = 1
member = "USA"

[[rules]]
kinds = ["*"]
partners = ["MSMT"]
release = ["*"]
""",
    "KOR": """
version = 1
member = "KOR"

[[rules]]
kinds = ["*"]
partners = ["JPN", "USA"]
release = ["observed_at", "vessel.imo"]
""",
}
MEMBERS = ("JPN", "USA", "KOR", "GBR")
KEYS = {
    m: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(m.encode()).digest()) for m in MEMBERS
}
DIGEST = {m: load_policy(t, member=m).digest for m, t in POLICIES.items()}
R1, R2, R3 = (uuid.UUID(int=n) for n in (1, 2, 3))
FULL = ["observed_at", "vessel.imo", "vessel.name"]


def _jwe(sender: str, recipient: str, report: uuid.UUID) -> str:
    return hashlib.sha256(f"{sender}>{recipient}:{report}".encode()).hexdigest()


def _send(
    sender: str, recipient: str, report: uuid.UUID, released: list[str], t: int
) -> ev.AuditEvent:
    return ev.sent(
        sender,
        T0 + timedelta(seconds=t),
        partner=recipient,
        report_id=report,
        kind="vessel",
        released=released,
        policy_digest=DIGEST.get(sender, "0" * 64),
        jwe_sha256=_jwe(sender, recipient, report),
        originator=sender,
        tlp="AMBER",
        rel_to=None,
        recipient_kid=f"{recipient.lower()}-enc-1",
    )


def _recv(
    recipient: str, sender: str, report: uuid.UUID, fields: list[str], t: int, kind: str = "vessel"
) -> ev.AuditEvent:
    return ev.received(
        recipient,
        T0 + timedelta(seconds=t),
        sender=sender,
        report_id=report,
        kind=kind,
        fields=fields,
        jwe_sha256=_jwe(sender, recipient, report),
        recipient_kid=f"{recipient.lower()}-enc-1",
    )


def _started(member: str, previous: str | None = None, digest: str = "") -> ev.AuditEvent:
    """The ``policy`` entry a node logs at its first start (or at a restart with a new policy)."""
    return ev.policy_changed(
        member, T0, policy_digest=digest or DIGEST[member], previous_digest=previous
    )


def _accepted(member: str, report: uuid.UUID, t: int) -> ev.AuditEvent:
    return ev.accepted(
        member, T0 + timedelta(seconds=t), report_id=report, kind="vessel", feed="ais"
    )


def _entries(events: list[ev.AuditEvent]) -> list[dict[str, Any]]:
    """Events as the parsed entries of a log, without writing one."""
    return [json.loads(e.seal(i, None)) for i, e in enumerate(events)]


def _run_world(
    root: Path, *, drop_jpn_send_to_kor: bool = False, widen_gbr: bool = False
) -> list[Path]:
    """Write what three nodes log for a small exchange; optionally one node misbehaves."""
    gbr_fields = [
        "observed_at",
        "vessel.imo",
        "vessel.position" if widen_gbr else "vessel.position#coarsen:1",
    ]
    jpn = [
        _started("JPN"),
        _accepted("JPN", R1, 0),
        _send("JPN", "USA", R1, FULL, 1),
        _send("JPN", "KOR", R1, FULL, 1),
        _send("JPN", "GBR", R1, gbr_fields, 1),
        _recv("JPN", "USA", R2, FULL, 3),
    ]
    if drop_jpn_send_to_kor:
        del jpn[3]
    by_member = {
        "JPN": jpn,
        "USA": [
            _started("USA"),
            _recv("USA", "JPN", R1, FULL, 2),
            _accepted("USA", R2, 3),
            _send("USA", "JPN", R2, FULL, 3),
            ev.rejected(
                "USA",
                T0 + timedelta(seconds=5),
                source="KOR",
                step="signature",
                reason="signature does not verify",
                report_id=R3,
                jwe_sha256=_jwe("KOR", "USA", R3),
            ),
        ],
        "KOR": [
            _started("KOR"),
            _recv("KOR", "JPN", R1, FULL, 2),
            _accepted("KOR", R3, 4),
            _send("KOR", "USA", R3, ["vessel.imo"], 4),
        ],
    }
    dirs = []
    for member, events in by_member.items():
        log = AuditLog(root / member, member, KEYS[member])
        log.append_many(events)
        log.close()
        dirs.append(root / member)
    return dirs


def _policies(root: Path) -> Path:
    for member, text in POLICIES.items():
        (root / "nodes" / member).mkdir(parents=True)
        (root / "nodes" / member / "policy.toml").write_text(text)
    return root / "nodes"


def _replay(root: Path, dirs: list[Path], *extra: str) -> tuple[int, str, str]:
    args = ["audit", "replay", *map(str, dirs), "--policies", str(_policies(root)), *extra]
    for member in ("JPN", "USA", "KOR"):
        args += ["--log-key", log_verifier(KEYS[member], member).vkey()]
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stdout, result.stderr


def test_clean_run_reconciles(tmp_path: Path) -> None:
    dirs = _run_world(tmp_path / "logs")
    code, out, err = _replay(tmp_path, dirs, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["findings"] == []
    statuses = {(e["sender"], e["recipient"]): e["status"] for e in report["exchanges"]}
    assert statuses == {
        ("JPN", "USA"): "delivered",
        ("JPN", "KOR"): "delivered",
        ("JPN", "GBR"): "not-checked",  # GBR's log was not given
        ("USA", "JPN"): "delivered",
        ("KOR", "USA"): "rejected",
    }
    assert {(m["sender"], m["recipient"]) for m in report["matrix"]} == {
        ("JPN", "USA"),
        ("JPN", "KOR"),
        ("USA", "JPN"),
    }
    # Under which markings and which policy each send went: the sender's own entry.
    to_usa = next(e for e in report["exchanges"] if e["recipient"] == "USA")
    assert (to_usa["tlp"], to_usa["rel_to"], to_usa["policy_digest"]) == (
        "AMBER",
        None,
        DIGEST["JPN"],
    )
    code, out, _ = _replay(tmp_path / "again", dirs, "--timeline")
    assert code == 0
    assert "none: every send and receive reconciles" in out
    timeline = (
        f"JPN -> USA  vessel   {R1}  AMBER         3 fields  policy {DIGEST['JPN'][:12]}  delivered"
    )
    assert timeline in out
    # The findings first: the timeline of a year of logs is millions of lines.
    assert out.index("Findings (0)") < out.index("Timeline (5 sends;") < out.index(timeline)
    assert out.startswith("5 sends in 3 logs: 3 delivered, 1 not-checked, 1 rejected\n")
    code, summary, _ = _replay(tmp_path / "summary", dirs)
    assert code == 0
    assert summary == out.split("\n\nTimeline", 1)[0] + "\n"
    assert "Timeline" not in summary
    code, listed, _ = _replay(tmp_path / "fields", dirs, "--fields")  # implies --timeline
    assert code == 0
    assert f"{timeline}\n      observed_at, vessel.imo, vessel.name\n" in listed
    # "none" covers only what the logs given can check; what they cannot is counted.
    assert "  not checked: 1 send and 0 receipts whose other side's log was not given" in out
    assert report["unchecked_receipts"] == 0
    # Without JPN's log: USA's and KOR's receipts of R1, and USA's send to JPN.
    code, out, _ = _replay(tmp_path / "partial", dirs[1:])
    assert code == 0
    assert "none: every send and receive reconciles" in out
    assert "  not checked: 1 send and 2 receipts whose other side's log was not given" in out


def test_output_that_cannot_be_written_is_one_line_and_not_success(tmp_path: Path) -> None:
    # The findings come first, so "| head" is a natural way to read a replay: a reader
    # that goes away, or a full disk, is one line and exit status 1, never a traceback.
    dirs = _run_world(tmp_path / "logs")
    msmt = str(Path(sys.executable).parent / "msmt")
    args = [msmt, "audit", "replay", *map(str, dirs), "--policies", str(_policies(tmp_path))]
    for member in ("JPN", "USA", "KOR"):
        args += ["--log-key", log_verifier(KEYS[member], member).vkey()]
    with open("/dev/full", "wb") as full:
        done = subprocess.run(args, stdout=full, stderr=subprocess.PIPE, check=False)
    assert (done.returncode, done.stderr) == (
        1,
        b"msmt: error: cannot write the replay to stdout: No space left on device\n",
    )
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the first byte
    try:
        done = subprocess.run([*args, "--json"], stdout=writer, stderr=subprocess.PIPE, check=False)
    finally:
        os.close(writer)
    assert (done.returncode, done.stderr) == (
        1,
        b"msmt: error: stdout was closed before the whole replay was written\n",
    )
    with open(tmp_path / "out", "wb") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.PIPE, check=False)
    assert (done.returncode, done.stderr) == (0, b"")


def test_removed_send_is_reported_exactly(tmp_path: Path) -> None:
    # JPN's log is rewritten without its send to KOR and freshly signed: it verifies
    # on its own, but KOR's receipt no longer has a matching send.
    dirs = _run_world(tmp_path / "logs", drop_jpn_send_to_kor=True)
    code, out, err = _replay(tmp_path, dirs, "--json")
    assert code == 1
    assert err == "msmt: error: 1 findings: the logs do not reconcile\n"
    findings = json.loads(out)["findings"]
    assert findings == [
        {
            "kind": "unmatched-receive",
            "member": "KOR",
            "seq": 1,
            "report_id": str(R1),
            "detail": "received from JPN but JPN's log has no matching send",
        }
    ]


def test_widened_disclosure_is_reported_exactly(tmp_path: Path) -> None:
    dirs = _run_world(tmp_path / "logs", widen_gbr=True)
    code, out, _ = _replay(tmp_path, dirs, "--json")
    assert code == 1
    findings = json.loads(out)["findings"]
    assert [(f["kind"], f["member"], f["seq"]) for f in findings] == [("over-disclosure", "JPN", 4)]
    assert findings[0]["detail"] == (
        "to GBR: vessel.position: the policy releases it only as vessel.position#coarsen:1"
    )


def test_undelivered_and_unknown_policy_and_field_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    jpn = AuditLog(root / "JPN", "JPN", KEYS["JPN"])
    jpn.append_many([_started("JPN"), _accepted("JPN", R1, 0), _accepted("JPN", R2, 0)])
    jpn.append_many([_send("JPN", "USA", R1, FULL, 1), _send("JPN", "KOR", R2, FULL, 2)])
    usa = AuditLog(root / "USA", "USA", KEYS["USA"])
    usa.append_many([_started("USA"), _recv("USA", "JPN", R1, ["vessel.imo"], 2)])
    kor = AuditLog(root / "KOR", "KOR", KEYS["KOR"])
    kor.append_many([_started("KOR"), _accepted("KOR", R3, 3)])
    kor.append_many([_send("KOR", "USA", R3, ["vessel.imo"], 3)])
    usa.append_many([_recv("USA", "KOR", R3, ["vessel.imo"], 4, kind="transfer")])
    polices_without_kor = {DIGEST["JPN"]: load_policy(POLICIES["JPN"], member="JPN")}
    logs = {
        m: [json.loads(log.entry(i)) for i in range(log.size)]
        for m, log in (("JPN", jpn), ("USA", usa), ("KOR", kor))
    }
    result = replay(logs, polices_without_kor)
    assert [(f.kind, f.member, f.seq, f.detail) for f in result.findings] == [
        ("undelivered", "JPN", 4, "sent to KOR, which logged no receipt of this JWE"),
        (
            "unknown-policy",
            "KOR",
            2,
            f"policy {DIGEST['KOR'][:12]}... of KOR was not provided (give a folder holding it"
            " as KOR/policy.toml with another --policies)",
        ),
        ("mismatch", "USA", 1, "receipt of JPN's entry 3 differs from it in disclosure keys"),
        ("mismatch", "USA", 2, "receipt of KOR's entry 2 differs from it in kind"),
    ]
    # The table names the report a receipt's finding is about (msmt inbox evidence asks
    # for it), and says that such a finding does not say which log is false.
    text = render_tables(result, ["JPN", "KOR", "USA"]).splitlines()
    assert f"  mismatch: USA entry 1 (report {R1}): receipt of JPN's entry 3 differs from it" in (
        "\n".join(text)
    )
    assert "  undelivered: JPN entry 4: sent to KOR, which logged no receipt of this JWE" in text
    caveat = (
        "  (a finding between two logs says that one of them is false, not which: the"
        " recipient's kept envelope decides"
    )
    assert [line for line in text if line.startswith(caveat)] == [
        text[text.index("Findings (4)") + 5]
    ]


def test_a_policy_left_out_is_one_line_however_many_sends_it_covers(tmp_path: Path) -> None:
    # An auditor who forgot KOR's policy gets one finding per send under it
    # (--json keeps each); the table folds identical ones into one line, so the
    # other findings stay in sight.
    root = tmp_path / "logs"
    reports = [uuid.UUID(int=100 + i) for i in range(7)]
    kor = AuditLog(root / "KOR", "KOR", KEYS["KOR"])
    kor.append_many([_started("KOR"), *(_accepted("KOR", r, 1) for r in reports)])
    kor.append_many([_send("KOR", "USA", r, ["vessel.imo"], 2) for r in reports])
    kor.close()
    usa = AuditLog(root / "USA", "USA", KEYS["USA"])
    usa.append_many(
        [_started("USA"), *(_recv("USA", "KOR", r, ["vessel.imo"], 3) for r in reports[1:])]
    )
    usa.close()
    policies = tmp_path / "policies"
    (policies / "USA").mkdir(parents=True)
    (policies / "USA" / "policy.toml").write_text(POLICIES["USA"])
    args = ["audit", "replay", str(root / "KOR"), str(root / "USA"), "--policies", str(policies)]
    for member in ("USA", "KOR"):
        args += ["--log-key", log_verifier(KEYS[member], member).vkey()]
    table = CliRunner().invoke(main, args)
    as_json = CliRunner().invoke(main, [*args, "--json"])
    assert (table.exit_code, as_json.exit_code) == (1, 1)
    assert len(json.loads(as_json.stdout)["findings"]) == 8
    findings = table.stdout.split("Findings (8)\n", 1)[1].splitlines()
    assert findings == [
        "  undelivered: KOR entry 8: sent to USA, which logged no receipt of this JWE",
        "  unknown-policy: KOR entries 8, 9, 10, 11, 12, ... (7 in all): "
        f"policy {DIGEST['KOR'][:12]}... of KOR was not provided (give a folder holding it"
        " as KOR/policy.toml with another --policies)",
        # --log-key alone: no roster to check the keys the sends went to against.
        "  recipient keys not checked: no roster given (--keys or --roster)",
    ]


@pytest.mark.parametrize(
    ("tlp", "rel_to", "originator", "expected"),
    [
        ("AMBER", ["KOR"], "JPN", "REL TO"),
        ("RED", None, "KOR", "TLP:RED is never passed on"),
        ("AMBER", None, "KOR", "TLP:AMBER is passed on only within REL TO"),
    ],
)
def test_markings_forbid_sending_at_all(
    tlp: str, rel_to: list[str] | None, originator: str, expected: str
) -> None:
    policy = load_policy(POLICIES["JPN"], member="JPN")
    send = json.loads(_send("JPN", "USA", R1, FULL, 1).seal(0, None))
    send |= {"tlp": tlp, "rel_to": rel_to, "originator": originator}
    assert over_disclosures(send, policy) == [
        f"{k}: withheld by the policy ({expected})" for k in FULL
    ]
    send |= {"tlp": "AMBER", "rel_to": None, "originator": "JPN"}
    assert over_disclosures(send, policy) == []


# --- what one log must say of itself: the policy in force, no empty sends, its own member --

LOOSE = POLICIES["JPN"]  # everything to USA and KOR, coarse vessels to GBR
STRICT = LOOSE.replace('release = ["*"]', 'release = ["observed_at", "vessel.imo"]', 1)
D_LOOSE, D_STRICT = DIGEST["JPN"], load_policy(STRICT, member="JPN").digest
BOTH = {d: load_policy(t, member="JPN") for d, t in ((D_LOOSE, LOOSE), (D_STRICT, STRICT))}
NARROW = ["observed_at", "vessel.imo"]  # released by both policies, so only timing matters


def _jpn_send(
    report: uuid.UUID,
    digest: str,
    *,
    released: list[str] = NARROW,
    partner: str = "USA",
    originator: str = "JPN",
    tlp: str = "AMBER",
    t: int = 0,
) -> ev.AuditEvent:
    return ev.sent(
        "JPN",
        T0 + timedelta(seconds=t),
        partner=partner,
        report_id=report,
        kind="vessel",
        released=released,
        policy_digest=digest,
        jwe_sha256=_jwe("JPN", partner, report),
        originator=originator,
        tlp=tlp,
        rel_to=None,
        recipient_kid=f"{partner.lower()}-enc-1",
    )


def _findings(
    events: list[ev.AuditEvent], **logs: list[ev.AuditEvent]
) -> list[tuple[str, int, str]]:
    result = replay({"JPN": _entries(events), **{m: _entries(e) for m, e in logs.items()}}, BOTH)
    return [(f.kind, f.seq, f.detail) for f in result.findings]


def test_a_send_of_a_kind_a_later_version_adds_is_not_judged_here() -> None:
    # A review: an older auditor's replay of a newer member's log called each key of
    # such a send an over-disclosure ("unknown report kind ... or TLP label").
    later = ev.sent(
        "JPN",
        T0,
        partner="USA",
        report_id=R1,
        kind="coal_export",
        released=["coal_export.imo", "observed_at"],
        policy_digest=D_LOOSE,
        jwe_sha256=_jwe("JPN", "USA", R1),
        originator="JPN",
        tlp="AMBER",
        rel_to=None,
        recipient_kid="usa-enc-1",
    )
    assert _findings([_started("JPN", None, D_LOOSE), later]) == [
        (
            "unknown-kind",
            1,
            "to USA: a coal_export report, a kind this version of msmt does not know:"
            " replay with the sender's version or later to judge its release",
        )
    ]
    # An empty one is an empty send, with no word on what the policy releases (a review).
    empty = ev.sent(
        "JPN",
        T0,
        partner="USA",
        report_id=R2,
        kind="coal_export",
        released=[],
        policy_digest=D_LOOSE,
        jwe_sha256=_jwe("JPN", "USA", R2),
        originator="JPN",
        tlp="AMBER",
        rel_to=None,
        recipient_kid="usa-enc-1",
    )
    assert [f[:3:2] for f in _findings([_started("JPN", None, D_LOOSE), empty])] == [
        ("empty-send", "to USA: a message with no disclosure keys"),
        (
            "unknown-kind",
            "to USA: a coal_export report, a kind this version of msmt does not know:"
            " replay with the sender's version or later to judge its release",
        ),
    ]
    # Its delivery is checked as any send's: the receipt matches it.
    receipt = _recv("USA", "JPN", R1, ["coal_export.imo", "observed_at"], 1, kind="coal_export")
    kinds = [f[0] for f in _findings([_started("JPN", None, D_LOOSE), later], USA=[receipt])]
    assert kinds == ["unknown-kind"]


def test_findings_grow_with_the_entries_not_with_their_product() -> None:
    # A fuzzer: k versions of one send and r rejections of its JWE made k x r
    # mismatch findings (4,000 each: 16 million findings, 61 s); and a bulk refusal
    # naming S steps was quoted whole in each of U undelivered sends (1 GB of text).
    k, r = 30, 40
    sends = [
        ev.sent(
            "JPN",
            T0,
            partner="USA",
            report_id=uuid.UUID(int=100 + i),
            kind="vessel",
            released=NARROW,
            policy_digest=D_LOOSE,
            jwe_sha256=_jwe("JPN", "USA", R1),
            originator="JPN",
            tlp="AMBER",
            rel_to=None,
            recipient_kid="usa-enc-1",
        )
        for i in range(k)
    ]
    refusals = [
        ev.rejected(
            "USA",
            T0,
            source="JPN",
            step="signature",
            reason="signature does not verify",
            report_id=uuid.UUID(int=1000 + i),
            jwe_sha256=_jwe("JPN", "USA", R1),
        )
        for i in range(r)
    ]
    found = _findings([_started("JPN", None, D_LOOSE), *sends], USA=refusals)
    mismatches = [f for f in found if f[0] == "mismatch"]
    assert len(mismatches) == r  # one per rejection, against the first send
    assert {f[2] for f in mismatches} == {"rejection of JPN's entry 1 differs from it in report"}
    # A refusal naming the report of any of the sends is no mismatch.
    named = ev.rejected(
        "USA",
        T0,
        source="JPN",
        step="signature",
        reason="signature does not verify",
        report_id=uuid.UUID(int=101),
        jwe_sha256=_jwe("JPN", "USA", R1),
    )
    assert [f for f in _findings(sends[:2], USA=[named]) if f[0] == "mismatch"] == []

    bulk = BulkRefusals()
    bulk.add({"count": 60, "steps": {f"step{i:02}": 1 + i for i in range(30)}, "at": "t"})
    assert bulk.describe() == (
        ", ".join(f"step{i:02} {1 + i}" for i in range(10, 30)) + " and 10 more steps; t to t"
    )


def test_a_pending_envelope_sent_after_a_restart_with_a_new_policy_is_in_force() -> None:
    # What the node logs: the report is accepted and planned under LOOSE; the node
    # restarts with STRICT before the hub acknowledged the envelope, which is then
    # logged, still naming LOOSE, after the new policy entry.
    restarted = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0)]
    restarted.append(_started("JPN", D_LOOSE, D_STRICT))
    assert _findings([*restarted, _jpn_send(R1, D_LOOSE)]) == []
    # Not yet planned at the restart: planned, and logged, under the new policy.
    assert _findings([*restarted, _jpn_send(R1, D_STRICT)]) == []
    # A policy changed back and forth: its latest entry counts.
    back = [*restarted, _started("JPN", D_STRICT, D_LOOSE), _accepted("JPN", R2, 1)]
    assert _findings([*back, _jpn_send(R2, D_LOOSE)]) == []


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param(
            [
                _started("JPN", None, D_LOOSE),
                _started("JPN", D_LOOSE, D_STRICT),
                _accepted("JPN", R1, 0),
                _jpn_send(R1, D_LOOSE),
            ],
            f"policy {D_LOOSE[:12]}... was not in force between the report's arrival "
            "(entry 2) and this send",
            id="an-older-looser-policy",
        ),
        pytest.param(
            [
                _started("JPN", None, D_STRICT),
                _accepted("JPN", R1, 0),
                _jpn_send(R1, D_LOOSE),
                _started("JPN", D_STRICT, D_LOOSE),
            ],
            f"policy {D_LOOSE[:12]}... was never logged before this send",
            id="a-policy-first-logged-later",
        ),
        pytest.param(
            [
                _started("JPN", None, D_LOOSE),
                _started("JPN", D_LOOSE, D_STRICT),
                _jpn_send(R1, D_LOOSE),
                _accepted("JPN", R1, 0),
            ],
            f"policy {D_LOOSE[:12]}... is not {D_STRICT[:12]}..., the policy in force at this "
            "send (no accepted entry of the report comes before it)",
            id="no-arrival-before-the-send",
        ),
        pytest.param(
            [
                _started("JPN", None, D_LOOSE),
                _accepted("JPN", R2, 0),  # JPN's own report of that id does not count
                _started("JPN", D_LOOSE, D_STRICT),
                _recv("JPN", "KOR", R2, NARROW, 1),
                _jpn_send(R2, D_LOOSE, originator="KOR", tlp="GREEN"),
            ],
            f"policy {D_LOOSE[:12]}... was not in force between the report's arrival "
            "(entry 3) and this send",
            id="passed-on-counts-from-its-receipt",
        ),
    ],
)
def test_a_send_naming_a_policy_not_in_force_is_a_finding(
    events: list[ev.AuditEvent], expected: str
) -> None:
    # The log holder rewrote the send's digest (and re-signed): the policy is one it
    # really used, so the policy check alone would pass it.
    seq = next(i for i, e in enumerate(events) if e.type == "sent")
    assert _findings(events) == [("policy-not-in-force", seq, f"to USA: {expected}")]


def test_without_an_arrival_entry_a_send_is_held_to_the_policy_in_force() -> None:
    # A node whose audit append failed after the store took a report (a full disk)
    # sends it before logging its arrival: the current policy still passes.
    assert _findings([_started("JPN", None, D_LOOSE), _jpn_send(R1, D_LOOSE)]) == []
    received = [_started("JPN", None, D_LOOSE), _recv("JPN", "KOR", R2, NARROW, 1)]
    onward = _jpn_send(R2, D_LOOSE, originator="KOR", tlp="GREEN")
    assert _findings([*received, _started("JPN", D_LOOSE, D_STRICT), onward]) == []
    assert _findings([_jpn_send(R1, D_LOOSE)]) == [
        (
            "policy-not-in-force",
            0,
            f"to USA: policy {D_LOOSE[:12]}... was never logged before this send",
        )
    ]


@pytest.mark.parametrize(
    ("partner", "tlp", "why"),
    [
        ("USA", "AMBER", ""),
        ("FRA", "AMBER", "; the policy releases it nothing for this kind and these markings"),
        ("USA", "RED", "; the policy releases it nothing for this kind and these markings"),
    ],
    ids=["released-something", "released-nothing", "red-released-nothing"],
)
def test_a_send_with_no_disclosure_is_a_finding(partner: str, tlp: str, why: str) -> None:
    start = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0)]
    empty = _jpn_send(R1, D_LOOSE, released=[], partner=partner, tlp=tlp)
    assert _findings([*start, empty]) == [
        ("empty-send", 2, f"to {partner}: a message with no disclosure keys{why}")
    ]
    # With keys, each is already an over-disclosure where the policy releases nothing.
    full = _jpn_send(R1, D_LOOSE, released=NARROW, partner=partner, tlp=tlp)
    kinds = {kind for kind, _, _ in _findings([*start, full])}
    assert kinds == (set() if why == "" else {"over-disclosure"})


def test_a_broken_policy_chain_is_a_finding() -> None:
    first = _started("JPN", None, D_LOOSE)
    # A repeat of the same change (a node stopped before saving it in its store) is fine.
    assert _findings([first, _started("JPN", None, D_LOOSE)]) == []
    assert _findings([_started("JPN", D_STRICT, D_LOOSE)]) == [
        (
            "policy-chain",
            0,
            f"the log's first policy entry names a previous policy {D_STRICT[:12]}..., "
            "which the log never recorded",
        )
    ]
    changed = _started("JPN", D_LOOSE, D_STRICT)
    assert _findings([first, changed, _started("JPN", D_LOOSE, D_LOOSE)]) == [
        (
            "policy-chain",
            2,
            f"previous policy {D_LOOSE[:12]}... is not {D_STRICT[:12]}..., the policy of the "
            "log's previous policy entry 1",
        )
    ]
    assert _findings([first, _started("JPN", None, D_STRICT)])[0][:2] == ("policy-chain", 1)


def test_an_entry_of_another_member_is_a_finding_and_not_counted() -> None:
    # JPN's log holds USA's receipt of JPN's send: it must not stand in for USA's log.
    usa_receipt = _recv("USA", "JPN", R1, NARROW, 2)
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0), _jpn_send(R1, D_LOOSE)]
    assert _findings([*jpn, usa_receipt], USA=[_started("USA")]) == [
        ("undelivered", 2, "sent to USA, which logged no receipt of this JWE"),
        ("wrong-member", 3, "a received entry that names USA, in JPN's log"),
    ]


def _forged_log(root: Path, member: str, entries: list[dict[str, Any]]) -> Path:
    """A log its owner signed with entries no node writes (parse_entry refuses them)."""
    log = AuditLog(root / member, member, KEYS[member])
    log.append_many([ev.AuditEvent(e) for e in entries])
    log.close()
    return root / member


def test_a_malformed_entry_stops_replay_with_the_log_and_entry_named(tmp_path: Path) -> None:
    good = [
        {k: v for k, v in json.loads(e.seal(0, None)).items() if k not in ("v", "seq", "prev")}
        for e in (_started("JPN"), _accepted("JPN", R1, 0), _send("JPN", "USA", R1, FULL, 1))
    ]
    good[2]["partner"] = "XYZ"
    forged = _forged_log(tmp_path / "logs", "JPN", good)
    code, out, err = _replay(tmp_path, [forged])
    assert (code, out) == (1, "")
    assert err == (
        f"msmt: error: JPN log {forged / DB_FILE}: entry 2: is not a valid 'sent' entry: "
        "audit partner 'XYZ' is not an MSMT member\n"
    )


def test_an_entry_whose_type_is_not_a_string_stops_replay_in_one_line(tmp_path: Path) -> None:
    # An array was unhashable: a TypeError traceback from replay, entries and evidence.
    entry = {"type": ["sent"], "member": "JPN", "at": "2026-11-28T12:00:00Z"}
    forged = _forged_log(tmp_path / "logs", "JPN", [entry])
    code, out, err = _replay(tmp_path, [forged])
    assert (code, out) == (1, "")
    assert err == (
        f"msmt: error: JPN log {forged / DB_FILE}: entry 0: has a type that is not a string\n"
    )


def test_a_log_that_does_not_verify_is_named(tmp_path: Path) -> None:
    dirs = _run_world(tmp_path / "logs")
    with sqlite3.connect(dirs[1] / DB_FILE) as db:
        db.execute("DELETE FROM entries WHERE idx = 1")
    code, out, err = _replay(tmp_path, dirs)
    assert (code, out) == (1, "")
    assert err == (
        f"msmt: error: USA log {dirs[1]}: entry 1: is missing (stored indices jump from 0 to 2)\n"
    )


# --- a real run: three nodes exchange reports over a real hub, then replay ------------


def _rewrite(
    audit_dir: Path, into: Path, member: str, signer: Ed25519PrivateKey, edit: Any
) -> Path:
    """Re-sign ``member``'s log with ``edit`` applied to its entries: an owner rewriting history."""
    entries = audit_entries(audit_dir)
    events = [
        ev.AuditEvent({k: v for k, v in e.items() if k not in ("v", "seq", "prev")})
        for e in edit(entries)
    ]
    log = AuditLog(into, member, signer)
    log.append_many(events)
    log.close()
    return into


async def test_replay_of_a_real_three_node_run(world: World, tmp_path: Path) -> None:
    trio = ("JPN", "USA", "KOR")
    for member in trio:
        world.write_config(member)
    nodes = {m: load_node(world.config(m)) for m in trio}
    tasks = [asyncio.create_task(n.run()) for n in nodes.values()]
    try:
        await await_for(lambda: all(n.ready() is None for n in nodes.values()), 20, "ready")
        expected_sends = 0
        for i, member in enumerate(trio):
            records = records_for(member, 6, seed=40 + i)
            answers = await world.submit(member, records)
            assert {a["status"] for a in answers} == {"accepted"}
            for record in records:
                decisions = world.policy(member).decide_all(parse_record(json.dumps(record)))
                expected_sends += sum(d.sends for d in decisions.values())

        def entries_of(member: str) -> list[dict[str, Any]]:
            return audit_entries(world.config(member).audit_dir)

        def settled() -> bool:
            logs = {m: entries_of(m) for m in trio}
            sent = [e for es in logs.values() for e in es if e["type"] == "sent"]
            return len(sent) == expected_sends and all(
                sum(e["type"] == "received" for e in logs[m])
                == sum(e["partner"] == m for e in sent)
                for m in trio
            )

        await await_for(settled, 60, "every send logged and every delivery received")

        def received(member: str) -> int:
            return sum(e["type"] == "received" for e in entries_of(member))

    finally:
        for n in nodes.values():
            n.stop.set()
        await asyncio.gather(*tasks)

    dirs = [world.config(m).audit_dir for m in trio]
    policies = world.root / "nodes"

    def run(*paths: Path) -> tuple[int, dict[str, Any]]:
        args = ["audit", "replay", *map(str, paths), "--keys", str(world.keydir)]
        result = CliRunner().invoke(main, [*args, "--policies", str(policies), "--json"])
        return result.exit_code, json.loads(result.stdout)

    code, clean = run(*dirs)
    assert clean["findings"] == []
    assert code == 0
    statuses = Counter(
        (e["sender"] in trio, e["recipient"] in trio, e["status"]) for e in clean["exchanges"]
    )
    assert set(statuses) <= {(True, True, "delivered"), (True, False, "not-checked")}
    assert statuses[(True, True, "delivered")] == sum(received(m) for m in trio)

    roster = keys_roster.load_signed_roster(world.keydir).roster
    signer = keyfiles.load_member_keys(world.keydir, "JPN", roster, datetime.now(UTC)).signing
    jpn_key = signer.private_key
    assert isinstance(jpn_key, Ed25519PrivateKey)
    to_usa = next(e for e in clean["exchanges"] if (e["sender"], e["recipient"]) == ("JPN", "USA"))

    # 1. JPN's log is rewritten without one send to USA: exactly that receipt is unmatched.
    def drop(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in entries if e.get("jwe_sha256") != to_usa["jwe_sha256"]]

    forged = _rewrite(dirs[0], tmp_path / "jpn-dropped", "JPN", jpn_key, drop)
    code, report = run(forged, *dirs[1:])
    assert code == 1
    assert [(f["kind"], f["member"], f["report_id"]) for f in report["findings"]] == [
        ("unmatched-receive", "USA", to_usa["report_id"])
    ]

    # 2. One send to KOR released a field JPN's policy withholds from KOR, and KOR got it.
    sends = audit_entries(dirs[0])
    to_kor = next(e for e in sends if e["type"] == "sent" and e["partner"] == "KOR")
    cells = world.policy("JPN").releasable(
        "KOR",
        kind=to_kor["kind"],
        tlp=to_kor["tlp"],
        originator=to_kor["originator"],
        rel_to=to_kor["rel_to"],
    )
    withheld = next(path for path, cell in cells.items() if isinstance(cell, str))

    def widen(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for e in entries:
            if e.get("jwe_sha256") == to_kor["jwe_sha256"]:
                key = "released" if e["type"] == "sent" else "fields"
                out.append(e | {key: sorted([*e[key], withheld])})
            else:
                out.append(e)
        return out

    kor_keys = keyfiles.load_member_keys(world.keydir, "KOR", roster, datetime.now(UTC))
    kor_key = kor_keys.signing.private_key
    assert isinstance(kor_key, Ed25519PrivateKey)
    jpn_wide = _rewrite(dirs[0], tmp_path / "jpn-wide", "JPN", jpn_key, widen)
    kor_wide = _rewrite(dirs[2], tmp_path / "kor-wide", "KOR", kor_key, widen)
    code, report = run(jpn_wide, dirs[1], kor_wide)
    assert code == 1
    findings = report["findings"]
    assert [(f["kind"], f["member"], f["report_id"]) for f in findings] == [
        ("over-disclosure", "JPN", to_kor["report_id"])
    ]
    assert findings[0]["detail"].startswith(f"to KOR: {withheld}: withheld by the policy")


async def test_replay_of_a_real_restart_with_a_new_policy_while_envelopes_pend(
    world: World, tmp_path: Path
) -> None:
    # JPN plans reports under LOOSE while no hub is reachable, restarts with STRICT
    # and a hub: the pending envelopes are logged after the new policy entry, still
    # naming LOOSE, which was in force when they arrived.
    write_node_config(world.root, "JPN", [f"nats://127.0.0.1:{free_port()}"], LOOSE)

    def sends(records: list[dict[str, Any]]) -> int:
        policy = world.policy("JPN")
        return sum(
            d.sends
            for r in records
            for d in policy.decide_all(parse_record(json.dumps(r))).values()
        )

    def entries() -> list[dict[str, Any]]:
        return audit_entries(world.config("JPN").audit_dir)

    def pending() -> int:
        store = world.store("JPN")
        try:
            return len(store.pending(10_000))
        finally:
            store.close()

    async def run_with(records: list[dict[str, Any]], done: Callable[[], bool], what: str) -> None:
        """Start JPN, submit ``records``, wait until ``done()``, stop it."""
        node = load_node(world.config("JPN"))
        task = asyncio.create_task(node.run())
        try:
            await await_for(node.config.socket_path.exists, 20, "intake socket")
            answers = await world.submit("JPN", records)
            assert {a["status"] for a in answers} == {"accepted"}
            await await_for(done, 60, what)
        finally:
            node.stop.set()
            await task

    first = records_for("JPN", 4, seed=71)
    planned = sends(first)
    await run_with(first, lambda: pending() == planned, "every envelope planned")
    assert not [e for e in entries() if e["type"] == "sent"]

    world.write_config("JPN", STRICT)
    second = records_for("JPN", 3, seed=72)
    total = planned + sends(second)

    def all_sent() -> bool:
        return len([e for e in entries() if e["type"] == "sent"]) == total

    await run_with(second, all_sent, "every envelope sent")

    log = entries()
    change = next(e["seq"] for e in log if e["type"] == "policy" and e["policy_digest"] == D_STRICT)
    late = [e for e in log if e["type"] == "sent" and e["policy_digest"] == D_LOOSE]
    assert len(late) == planned
    assert all(e["seq"] > change for e in late)  # the case a naive check gets wrong
    old = tmp_path / "old" / "JPN"
    old.mkdir(parents=True)
    (old / "policy.toml").write_text(LOOSE)
    audit_dir = world.config("JPN").audit_dir

    def run(directory: Path) -> tuple[int, dict[str, Any]]:
        args = ["audit", "replay", str(directory), "--keys", str(world.keydir), "--json"]
        args += ["--policies", str(world.root / "nodes"), "--policies", str(tmp_path / "old")]
        result = CliRunner().invoke(main, args)
        return result.exit_code, json.loads(result.stdout)

    code, report = run(audit_dir)
    assert (code, report["findings"]) == (0, [])

    # JPN rewrites the sends of reports accepted under STRICT to claim LOOSE, and
    # re-signs: only the timeline shows it.
    accepted_late = {e["report_id"] for e in log if e["type"] == "accepted" and e["seq"] > change}

    def loosen(es: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            e | {"policy_digest": D_LOOSE}
            if e["type"] == "sent" and e["report_id"] in accepted_late
            else e
            for e in es
        ]

    roster = keys_roster.load_signed_roster(world.keydir).roster
    signer = keyfiles.load_member_keys(world.keydir, "JPN", roster, datetime.now(UTC)).signing
    assert isinstance(signer.private_key, Ed25519PrivateKey)
    forged = _rewrite(audit_dir, tmp_path / "loosened", "JPN", signer.private_key, loosen)
    code, report = run(forged)
    assert code == 1
    rewritten = [e["seq"] for e in log if e["type"] == "sent" and e["report_id"] in accepted_late]
    assert rewritten
    assert [(f["kind"], f["seq"]) for f in report["findings"]] == [
        ("policy-not-in-force", seq) for seq in rewritten
    ]


def test_an_unreadable_policy_file_is_one_line_naming_it(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    (policies / "JPN").mkdir(parents=True)
    (policies / "JPN" / "policy.toml").write_bytes(b"member = \xff\xfe\n")
    (policies / "USA" / "policy.toml").mkdir(parents=True)  # a folder where the file goes
    for member, reason in (("JPN", "not UTF-8 text"), ("USA", "Is a directory")):
        only = tmp_path / f"only-{member}"
        only.mkdir()
        (policies / member).rename(only / member)
        args = ["audit", "replay", str(tmp_path / "log"), "--policies", str(only)]
        result = CliRunner().invoke(
            main, [*args, "--log-key", log_verifier(KEYS["JPN"], "JPN").vkey()]
        )
        assert (result.exit_code, result.stdout) == (2, "")
        path = only / member / "policy.toml"
        assert result.stderr == f"msmt: error: cannot read policy {path}: {reason}\n"


def test_reports_refused_at_every_send_are_listed_apart_from_findings() -> None:
    def send(report: str, to: str, status: str, step: str | None = None) -> Exchange:
        return Exchange(
            "2026-12-03T00:00:00Z", "JPN", to, report, "vessel", "AMBER", None, "p" * 64,
            ("vessel.imo",), f"{report}{to}{status}", status, 1, step,
        )  # fmt: skip

    exchanges = (
        send("r1", "USA", "rejected", "freshness"),
        send("r1", "USA", "delivered"),  # sent again: delivered
        send("r2", "USA", "rejected", "freshness"),
        send("r2", "USA", "rejected", "replay"),  # the last refusal is shown
        send("r3", "GBR", "rejected", "key"),
        send("r3", "USA", "delivered"),
        send("r4", "USA", "undelivered"),  # a finding, not this list
        send("r5", "KOR", "not-checked"),
    )
    finding = Finding("undelivered", "JPN", 1, "r4", "sent to USA, which logged no receipt")
    result = Replay(exchanges, {("JPN", "USA"): 2}, (finding,))
    assert [(e.recipient, e.report_id, e.refused_at) for e in result.never_delivered()] == [
        ("GBR", "r3", "key"),
    ]
    # A drill: refused at replay, the partner holds it; a resend is refused again.
    assert [(e.recipient, e.report_id) for e in result.refused_as_held()] == [("USA", "r2")]
    assert result.to_json()["never_delivered"][0] == {
        "sender": "JPN", "recipient": "GBR", "report_id": "r3", "refused_at": "key",
    }  # fmt: skip
    assert result.to_json()["refused_as_held"] == [
        {"sender": "JPN", "recipient": "USA", "report_id": "r2"}
    ]
    _assert_json_text(result)
    text = render_tables(result, ["GBR", "JPN", "USA"])
    assert "vessel   r1  AMBER         1 fields  policy pppppppppppp  rejected (freshness)" in text
    assert text.split("Refused at every send (1; msmt node resend --report sends again)\n")[
        1
    ].startswith(
        "  JPN -> GBR  r3  key\n\n"
        "Refused as already held (1; the partner holds the report from a send this log does"
        " not show: a resend is refused again)\n  JPN -> USA  r2  replay\n\n"
        "Sends the partner never logged (1; findings below; if the hub lost them, "
        "msmt node resend --report sends them again)\n  JPN -> USA  r4  (entry 1)\n\n"
        "Findings (1)"
    )
    assert "vessel.imo" not in text
    # With --fields, who got which fields: each send's disclosure keys under it.
    listed = render_tables(result, ["GBR", "JPN", "USA"], show_fields=True).splitlines()
    first = listed.index(next(line for line in listed if "r1  AMBER" in line))
    assert listed[first + 1] == "      vessel.imo"
    assert listed.count("      vessel.imo") == len(exchanges)


# --- entries a member appends to its own log: repeats, conflicts, other members' JWEs ------
#
# A member holding only its own key can append (no rewrite: its witnesses cosign
# what it appends, so ``verify --cosigned`` passes). Replay must not let the last
# entry of a JWE, or the order of the logs, decide what it concludes.


def _append(directory: Path, member: str, events: list[ev.AuditEvent]) -> None:
    """Append to ``member``'s real log with its own key, as its node does."""
    log = AuditLog(directory, member, KEYS[member])
    log.append_many(events)
    log.close()


def _rejection(
    member: str, source: str, report: uuid.UUID, jwe: str, t: int, step: str = "signature"
) -> ev.AuditEvent:
    return ev.rejected(
        member,
        T0 + timedelta(seconds=t),
        source=source,
        step=step,
        reason="refused",
        report_id=report,
        jwe_sha256=jwe,
    )


def _kinds(findings: list[dict[str, Any]]) -> list[tuple[str, str, int, str]]:
    return [(f["kind"], f["member"], f["seq"], f["detail"]) for f in findings]


def test_a_rejection_appended_for_a_received_jwe_is_a_conflict(tmp_path: Path) -> None:
    # USA appends a rejection of the JPN envelope its entry 1 logged as received:
    # before, the send showed as refused and the report as never delivered.
    dirs = _run_world(tmp_path / "logs")
    _append(dirs[1], "USA", [_rejection("USA", "JPN", R1, _jwe("JPN", "USA", R1), 9)])
    code, out, _ = _replay(tmp_path, dirs, "--json")
    report = json.loads(out)
    assert code == 1
    assert report["findings"] == [
        {
            "kind": "conflicting-entries",
            "member": "USA",
            "seq": 5,
            "report_id": str(R1),
            "detail": "rejection of a JWE from JPN that entry 1 logs as received",
        }
    ]
    # USA says it holds the report: the send stays delivered, not "refused at every send".
    to_usa = next(e for e in report["exchanges"] if (e["sender"], e["recipient"]) == ("JPN", "USA"))
    assert to_usa["status"] == "delivered"
    assert [e["report_id"] for e in report["never_delivered"]] == [str(R3)]


def test_a_receipt_appended_for_a_rejected_jwe_is_a_conflict() -> None:
    jwe = _jwe("JPN", "USA", R1)
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0), _jpn_send(R1, D_LOOSE)]
    usa = [
        _started("USA"),
        _rejection("USA", "JPN", R1, jwe, 2),
        _recv("USA", "JPN", R1, NARROW, 3),
    ]
    assert _findings(jpn, USA=usa) == [
        ("conflicting-entries", 2, "receipt of a JWE from JPN that entry 1 logs as rejected")
    ]


def test_a_send_lost_by_the_hub_and_made_good_by_a_resend_is_not_a_finding() -> None:
    # The hub lost JPN's first envelope (USA never logged it); msmt node resend
    # signed the report again, and USA logged the new envelope. The loss is
    # shown as recovered, not as a discrepancy; a report lost for good still is.
    resent = hashlib.sha256(b"resent").hexdigest()
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0), _accepted("JPN", R2, 0)]
    jpn += [_jpn_send(R1, D_LOOSE), _jpn_send(R2, D_LOOSE)]
    again = ev.sent(
        "JPN", T0 + timedelta(seconds=60), partner="USA", report_id=R1, kind="vessel",
        released=NARROW, policy_digest=D_LOOSE, jwe_sha256=resent, originator="JPN",
        tlp="AMBER", rel_to=None, recipient_kid="usa-enc-1",
    )  # fmt: skip
    jpn.append(again)
    usa = [_started("USA")]
    usa.append(
        ev.received(
            "USA", T0 + timedelta(seconds=61), sender="JPN", report_id=R1, kind="vessel",
            fields=NARROW, jwe_sha256=resent, recipient_kid="usa-enc-1",
        )
    )  # fmt: skip
    result = replay({"JPN": _entries(jpn), "USA": _entries(usa)}, BOTH)
    assert [(f.kind, f.report_id) for f in result.findings] == [("undelivered", str(R2))]
    assert [(e.report_id, e.seq) for e in result.recovered()] == [(str(R1), 3)]
    statuses = sorted((e.report_id == str(R1), e.seq, e.status) for e in result.exchanges)
    assert statuses == [(False, 4, "undelivered"), (True, 3, "undelivered"), (True, 5, "delivered")]
    assert result.to_json()["recovered"] == [
        {"sender": "JPN", "recipient": "USA", "report_id": str(R1), "seq": 3}
    ]
    text = render_tables(result, ["JPN", "USA"])
    assert (
        f"Lost on the way, then delivered by a later send (1)\n  JPN -> USA  {R1}  (entry 3)"
        in text
    )


def test_an_envelope_passed_on_by_a_third_member_is_not_a_refusal_of_the_send() -> None:
    # KOR publishes JPN's envelope to USA again: USA's node, honestly, refuses the
    # same bytes from KOR. That is not USA refusing JPN's send, which it received.
    jwe = _jwe("JPN", "USA", R1)
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0), _jpn_send(R1, D_LOOSE)]
    usa = [_started("USA"), _recv("USA", "JPN", R1, NARROW, 2)]
    usa.append(_rejection("USA", "KOR", R1, jwe, 3, step="sender"))
    result = replay({"JPN": _entries(jpn), "USA": _entries(usa)}, BOTH)
    assert result.findings == ()
    assert [e.status for e in result.exchanges] == ["delivered"]
    assert result.never_delivered() == []


@pytest.mark.parametrize("order", [(0, 2, 1), (0, 1, 2)], ids=["KOR-before-USA", "USA-before-KOR"])
def test_a_receipt_or_rejection_by_a_member_the_jwe_was_not_sent_to_is_a_finding(
    tmp_path: Path, order: tuple[int, int, int]
) -> None:
    # KOR appends a receipt of JPN's envelope to USA, and a rejection of it (as if
    # USA had passed it on). Before, depending on the order of the logs, replay saw
    # nothing or blamed JPN's send to USA as undelivered; KOR was never named.
    dirs = _run_world(tmp_path / "logs")
    jwe = _jwe("JPN", "USA", R1)
    receipt = ev.received(
        "KOR", T0, sender="JPN", report_id=R1, kind="vessel", fields=FULL, jwe_sha256=jwe,
        recipient_kid="kor-enc-1",
    )  # fmt: skip
    _append(dirs[2], "KOR", [receipt, _rejection("KOR", "USA", R1, jwe, 9, step="recipient")])
    code, out, _ = _replay(tmp_path, [dirs[i] for i in order], "--json")
    report = json.loads(out)
    assert code == 1
    assert _kinds(report["findings"]) == [
        (
            "receipt-by-non-recipient",
            "KOR",
            4,
            "received a JWE from JPN that JPN's entry 2 sent to USA, not to KOR",
        ),
        (
            "rejection-by-non-recipient",
            "KOR",
            5,
            "rejected a JWE from USA that JPN's entry 2 sent to USA, not to KOR",
        ),
    ]
    to_usa = next(e for e in report["exchanges"] if (e["sender"], e["recipient"]) == ("JPN", "USA"))
    assert to_usa["status"] == "delivered"


def test_a_jwe_received_in_two_logs_is_a_conflict_even_without_its_send() -> None:
    # GBR's log is not given; still, only one member can have opened the envelope.
    jwe = _jwe("GBR", "USA", R1)
    usa = [_started("USA"), _recv("USA", "GBR", R1, NARROW, 2)]
    kor = [_started("KOR"), _recv("KOR", "GBR", R1, NARROW, 2)]
    kor[1] = ev.AuditEvent(dict(kor[1].fields, jwe_sha256=jwe))
    result = replay({"USA": _entries(usa), "KOR": _entries(kor)}, BOTH)
    assert [(f.kind, f.member, f.seq, f.detail) for f in result.findings] == [
        ("conflicting-entries", "KOR", 1, "USA's entry 1 also logs a receipt of this JWE"),
        ("conflicting-entries", "USA", 1, "KOR's entry 1 also logs a receipt of this JWE"),
    ]


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0)], ids=["JPN-first", "KOR-first"])
def test_a_jwe_sent_in_two_logs_is_a_finding_in_both(
    tmp_path: Path, order: tuple[int, int, int]
) -> None:
    # KOR appends a send of JPN's envelope to USA: whichever log came last used to
    # be the only send checked, so another log's send could stand in for JPN's.
    dirs = _run_world(tmp_path / "logs")
    copy = ev.sent(
        "KOR",
        T0 + timedelta(seconds=9),
        partner="USA",
        report_id=R1,
        kind="vessel",
        released=["vessel.imo"],
        policy_digest=DIGEST["KOR"],
        jwe_sha256=_jwe("JPN", "USA", R1),
        originator="KOR",
        tlp="AMBER",
        rel_to=None,
        recipient_kid="usa-enc-1",
    )
    _append(dirs[2], "KOR", [copy])
    code, out, _ = _replay(tmp_path, [dirs[i] for i in order], "--json")
    assert code == 1
    assert _kinds(json.loads(out)["findings"]) == [
        ("conflicting-entries", "JPN", 2, "KOR's entry 4 also logs a send of this JWE"),
        ("conflicting-entries", "KOR", 4, "JPN's entry 2 also logs a send of this JWE"),
        (
            "mismatch",
            "USA",
            1,
            "receipt of KOR's entry 4 differs from it in sender and disclosure keys",
        ),
    ]


def test_a_repeated_send_with_other_markings_is_a_finding_and_each_version_is_checked(
    tmp_path: Path,
) -> None:
    # JPN logged a send of a RED report with fields its policy withholds, then
    # appends the same send (same JWE) marked AMBER. Before, only the last entry
    # was checked: the over-disclosure vanished.
    root = tmp_path / "logs"
    red = _jpn_send(R1, D_LOOSE, released=FULL, tlp="RED")
    jpn = AuditLog(root / "JPN", "JPN", KEYS["JPN"])
    jpn.append_many([_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0), red])
    jpn.close()
    usa = AuditLog(root / "USA", "USA", KEYS["USA"])
    usa.append_many([_started("USA"), _recv("USA", "JPN", R1, FULL, 2)])
    usa.close()
    amber = _jpn_send(R1, D_LOOSE, released=FULL, tlp="AMBER")
    _append(root / "JPN", "JPN", [ev.AuditEvent(dict(amber.fields, at="2026-11-28T12:05:00Z"))])
    code, out, _ = _replay(tmp_path, [root / "JPN", root / "USA"], "--json")
    report = json.loads(out)
    assert code == 1
    withheld = over_disclosures(json.loads(red.seal(2, None)), BOTH[D_LOOSE])
    assert len(withheld) == len(FULL)
    assert _kinds(report["findings"]) == [
        *(("over-disclosure", "JPN", 2, f"to USA: {problem}") for problem in withheld),
        ("conflicting-repeat", "JPN", 3, "repeat of entry 2 (same JWE) differs from it in tlp"),
    ]
    # Both versions are in the timeline; the one delivery is counted once.
    assert [(e["seq"], e["tlp"], e["status"]) for e in report["exchanges"]] == [
        (2, "RED", "delivered"),
        (3, "AMBER", "delivered"),
    ]
    assert report["matrix"] == [{"sender": "JPN", "recipient": "USA", "delivered": 1}]


def _withheld(
    recipient: str, report: uuid.UUID, released: list[str], t: int, digest: str = D_LOOSE
) -> ev.AuditEvent:
    """JPN's ``withheld`` entry for the envelope ``_jpn_send`` would have logged as sent."""
    send = _jpn_send(report, digest, t=t, released=released, partner=recipient).fields
    fields = {k: v for k, v in send.items() if k not in ("type", "member", "at")}
    at = T0 + timedelta(seconds=t)
    return ev.withheld("JPN", at, **fields, reason=f"key {recipient.lower()}-enc-1 is revoked")


def test_a_withheld_envelope_received_all_the_same_is_delivered_and_one_never_is_no_finding() -> (
    None
):
    # A node killed with envelopes in flight, their acks lost, restarted on a roster
    # revoking USA's key: it takes them back (withheld). One had reached the hub,
    # and USA received it before its key was revoked; the other never left.
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0), _accepted("JPN", R2, 0)]
    usa = [_started("USA"), _recv("USA", "JPN", R1, NARROW, 1)]
    withheld = [_withheld("USA", R1, NARROW, 2), _withheld("USA", R2, NARROW, 2)]
    # Before the entry existed, the receipt had no send in JPN's log.
    assert [f[0] for f in _findings(jpn, USA=usa)] == ["unmatched-receive"]
    result = replay({"JPN": _entries(jpn + withheld), "USA": _entries(usa)}, BOTH)
    assert result.findings == ()
    assert result.statuses() == Counter({"delivered": 1, "withheld": 1})
    assert result.matrix == {("JPN", "USA"): 1}
    # It is held to the policy it names like any send: this one released too much to GBR.
    wide = _withheld("GBR", R1, ["observed_at", "vessel.position"], 2)
    assert [f[0] for f in _findings([*jpn, wide])] == ["over-disclosure"]


def _roster_key(kid: str, member: str, use: str, status: str, revoked: int | None) -> RosterKey:
    """A roster key (no public key: replay reads only who holds it and its status)."""
    return RosterKey(
        kid, member, use, status, T0 - timedelta(days=1), T0 + timedelta(days=365),  # type: ignore[arg-type]
        None, {}, None if revoked is None else T0 + timedelta(seconds=revoked),
    )  # fmt: skip


def test_a_sender_rewriting_its_log_cannot_hide_sends_to_a_stolen_key_so() -> None:
    # An auditor written from the docs alone (/tmp/h77), as a member re-signing its own
    # log: sends to a stolen key renamed to the key that replaced it, valid only from
    # the revocation on; sends after the revocation backdated to before it (and before
    # their own report arrived); sends rewritten as format-1 entries, which name no key.
    # Each passed with no finding and left the list of what the thief can read.
    stolen = _roster_key("usa-enc-1", "USA", "enc", "revoked", 3600)
    later = T0 + timedelta(seconds=3600)
    new = replace(_roster_key("usa-enc-2", "USA", "enc", "active", None), valid_from=later)
    roster = Roster([stolen, new])
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 10)]

    def findings(*sends: ev.AuditEvent) -> list[tuple[str, int]]:
        result = replay({"JPN": _entries([*jpn, *sends])}, BOTH, roster=roster)
        return [(f.kind, f.seq) for f in result.findings]

    def to(kid: str, t: int) -> ev.AuditEvent:
        return ev.AuditEvent(dict(_jpn_send(R1, D_LOOSE, t=t).fields, recipient_kid=kid))

    assert findings(to("usa-enc-1", 20)) == []  # before the revocation: honest
    assert findings(to("usa-enc-2", 3600 - 300)) == []  # the clock margin
    assert findings(to("usa-enc-2", 20)) == [("wrong-recipient-key", 2)]
    result = replay({"JPN": _entries([*jpn, to("usa-enc-2", 20)])}, BOTH, roster=roster)
    assert result.findings[0].detail == (
        "to USA: encrypted to USA's key usa-enc-2 at 2026-11-28T12:00:20Z, before the key"
        " was valid (from 2026-11-28T13:00:00Z): the entry's key or its time is false"
    )
    # Sent after the revocation, dated before it: its report arrived after it.
    arrived_late = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 3700)]
    result = replay({"JPN": _entries([*arrived_late, to("usa-enc-1", 20)])}, BOTH, roster=roster)
    assert [(f.kind, f.seq) for f in result.findings] == [("to-revoked-key", 2)]
    assert result.findings[0].detail.endswith(
        "(dated 2026-11-28T12:00:20Z, before its report arrived at 2026-11-28T13:01:40Z)"
    )
    # A format-1 entry after the log's first format-3 entry: one finding for the log.
    log = _entries([*jpn, to("usa-enc-2", 3700), to("usa-enc-1", 3700), to("usa-enc-1", 3800)])
    for entry in log[3:]:
        del entry["recipient_kid"]
        entry["v"] = 1
    result = replay({"JPN": log}, BOTH, roster=roster)
    assert [(f.kind, f.seq) for f in result.findings] == [("older-format", 3)]
    assert result.findings[0].detail.startswith(
        "2 entries of an older format after entry 0, the log's first of format 3:"
    )


def test_a_repeat_across_an_upgrade_is_honest_and_one_naming_another_key_is_not() -> None:
    # Logged as sent by version 1 (no recipient key), then again after a crash by a
    # node upgraded meanwhile: only the format differs, and the key the repeat names
    # is the send's (checked against the roster). A later repeat naming another key
    # for the same JWE contradicts it (a review: it matched the version-1 entry, and
    # was taken for honest).
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0)]
    entries = _entries([*jpn, *(_jpn_send(R1, D_LOOSE, t=t) for t in (1, 2, 3))])
    old = entries[2]
    del old["recipient_kid"]
    for entry in entries[:3]:  # the log's entries up to the upgrade
        entry["v"] = 1
    del entries[4]
    assert replay({"JPN": entries}, BOTH).findings == ()
    revoked = Roster([_roster_key("usa-enc-1", "USA", "enc", "revoked", 0)])
    (found,) = replay({"JPN": entries}, BOTH, roster=revoked).findings
    assert (found.kind, found.seq) == ("to-revoked-key", 2)  # the send, by its repeat's key
    third = json.loads(_jpn_send(R1, D_LOOSE, t=3).seal(4, None))
    entries.append(third | {"recipient_kid": "usa-enc-2"})
    (found,) = replay({"JPN": entries}, BOTH).findings
    assert (found.kind, found.seq) == ("conflicting-repeat", 4)
    assert found.detail == "repeat of entry 3 (same JWE) differs from it in recipient_kid"


def test_a_withheld_entry_is_held_to_the_policy_in_force_and_once_delivered_to_its_key() -> None:
    # A review: logged as withheld, an envelope the partner received escaped the checks
    # a send gets: the policy in force for its report, and the key it went to.
    replaced = [
        _started("JPN", None, D_STRICT),
        _started("JPN", D_STRICT, D_LOOSE),
        _accepted("JPN", R1, 0),  # arrived under the loose policy only
    ]
    usa = [_started("USA"), _recv("USA", "JPN", R1, NARROW, 3)]
    named_old = _withheld("USA", R1, NARROW, 2, digest=D_STRICT)
    found = _findings([*replaced, named_old], USA=usa)
    assert [f[0] for f in found] == ["policy-not-in-force"]
    # Planned under the old policy and taken back after a start logged a new one: honest.
    planned = [_started("JPN", None, D_STRICT), _accepted("JPN", R1, 0)]
    after = [_started("JPN", D_STRICT, D_LOOSE), _withheld("USA", R1, NARROW, 2, digest=D_STRICT)]
    assert _findings([*planned, *after], USA=usa) == []
    roster = Roster(
        [
            _roster_key("usa-enc-1", "USA", "enc", "revoked", 1),
            _roster_key("kor-enc-1", "KOR", "enc", "active", None),
        ]
    )
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0)]
    to_kor = ev.AuditEvent(dict(_withheld("USA", R1, NARROW, 2).fields, recipient_kid="kor-enc-1"))
    logs = {"JPN": _entries([*jpn, to_kor]), "USA": _entries(usa)}
    wrong, other = replay(logs, BOTH, roster=roster).findings
    assert (wrong.kind, wrong.seq) == ("wrong-recipient-key", 2)
    # USA's receipt names the key that opened it (usa-enc-1, format 3): another one.
    assert (other.kind, other.member) == ("mismatch", "USA")
    # To the partner's key revoked since: exposed, but not a finding (it cannot be dated).
    logs["JPN"] = _entries([*jpn, _withheld("USA", R1, NARROW, 2)])
    result = replay(logs, BOTH, roster=roster)
    assert result.findings == ()
    assert [e.seq for e in result.sent_to_revoked_keys()] == [2]
    # Unless its report arrived after the revocation: then it was made after it too (an
    # auditor's trial: a node on the old roster took 52 reports after KOR's key was
    # revoked, published them and was killed; its start took them back).
    late = [
        _started("JPN", None, D_LOOSE),
        _accepted("JPN", R1, 5),
        _withheld("USA", R1, NARROW, 6),
    ]
    result = replay({"JPN": _entries(late), "USA": _entries(usa)}, BOTH, roster=roster)
    (dated,) = result.findings
    assert (dated.kind, dated.seq) == ("to-revoked-key", 2)
    assert dated.detail.endswith(
        "(taken back at a start, but made after its report arrived at 2026-11-28T12:00:05Z,"
        " and it reached USA)"
    )
    # Its time is when it was taken back, not sent: said in the timeline and the JSON.
    timeline = render_tables(result, ["JPN", "USA"]).splitlines()
    assert timeline[-1].endswith("delivered (withheld at this time)")
    as_json = json.loads("".join(result.json_text()))
    assert [e["entry"] for e in as_json["exchanges"]] == ["withheld"]
    assert as_json["sent_to_revoked_keys"][0]["entry"] == "withheld"
    # Never seen by the partner: taken back for its key, neither a finding nor exposed.
    result = replay({"JPN": logs["JPN"], "USA": _entries(usa[:1])}, BOTH, roster=roster)
    assert (result.findings, result.sent_to_revoked_keys()) == ((), [])


def test_a_send_encrypted_to_a_key_not_the_partners_or_revoked_before_it_is_a_finding() -> None:
    key = _roster_key
    roster = Roster(
        [
            key("usa-enc-1", "USA", "enc", "active", None),
            key("usa-sig-1", "USA", "sig", "active", None),
            key("kor-enc-1", "KOR", "enc", "revoked", 10),
            key("gbr-enc-1", "GBR", "enc", "revoked", None),
        ]
    )

    def to(partner: str, kid: str, t: int) -> ev.AuditEvent:
        send = _jpn_send(R1, D_LOOSE, t=t, partner=partner)
        jwe = hashlib.sha256(f"{partner} {kid} {t}".encode()).hexdigest()  # each its own
        return ev.AuditEvent(dict(send.fields, recipient_kid=kid, jwe_sha256=jwe))

    sends = [
        to("USA", "usa-enc-1", 1),  # the partner's key: fine
        to("KOR", "kor-enc-1", 5),  # revoked later: fine then
        to("KOR", "kor-enc-1", 10),  # the second it was revoked: the order unknown
        to("KOR", "kor-enc-1", 11),
        to("USA", "usa-sig-1", 1),
        to("USA", "kor-enc-1", 1),
        to("USA", "nobody-enc-1", 1),
        to("GBR", "gbr-enc-1", 1),
    ]
    log = {"JPN": _entries([_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0), *sends])}
    result = replay(log, BOTH, roster=roster)
    found = [(f.kind, f.seq, f.detail) for f in result.findings]
    assert found == [
        (
            "to-revoked-key",
            5,
            "to KOR: encrypted to KOR's key kor-enc-1 after its revocation at"
            " 2026-11-28T12:00:10Z: whoever holds that key can read it",
        ),
        (
            "wrong-recipient-key",
            6,
            "to USA: encrypted to key usa-sig-1, a sig key of USA, not an encryption key of USA",
        ),
        (
            "wrong-recipient-key",
            7,
            "to USA: encrypted to key kor-enc-1, a enc key of KOR, not an encryption key of USA",
        ),
        ("wrong-recipient-key", 8, "to USA: encrypted to key nobody-enc-1, not in the roster"),
        (
            "to-revoked-key",
            9,
            "to GBR: encrypted to GBR's key gbr-enc-1, which is revoked (the roster does not"
            " say when)",
        ),
    ]
    # Every send a revoked key can open, before its revocation too: their originators
    # must be told. Not those to another member's key (findings above, not exposure).
    exposed = [(e.seq, e.recipient, e.recipient_kid) for e in result.sent_to_revoked_keys()]
    assert exposed == [
        (9, "GBR", "gbr-enc-1"),
        (3, "KOR", "kor-enc-1"),
        (4, "KOR", "kor-enc-1"),
        (5, "KOR", "kor-enc-1"),
    ]
    text = render_tables(result, ["JPN"], timeline=False).splitlines()
    at = text.index(
        "Sent to keys revoked since (4 sends of 1 report; whoever holds the key can read them:"
        " tell their originators)"
    )
    assert text[at + 1 : at + 3] == [  # in time order, as the timeline
        f"  JPN -> GBR  {R1}  gbr-enc-1 (entry 9)",
        f"  JPN -> KOR  {R1}  kor-enc-1 (entry 3)",
    ]
    listed = json.loads("".join(result.json_text()))["sent_to_revoked_keys"]
    assert [(x["seq"], x["recipient_kid"]) for x in listed] == [
        (9, "gbr-enc-1"),
        (3, "kor-enc-1"),
        (4, "kor-enc-1"),
        (5, "kor-enc-1"),
    ]
    unchecked = replay(log, BOTH)  # no roster given: not checked
    assert (unchecked.findings, unchecked.sent_to_revoked_keys()) == ((), [])


def test_every_key_an_envelopes_entries_name_is_checked_once_whatever_the_order() -> None:
    # A review of the key checks (/tmp/h75): a harmless key named first hid a revoked one
    # named by a repeat; two logs naming one JWE with other keys gave answers that
    # depended on their order; a withheld entry naming no key, or one that cannot be
    # dated, escaped; a sent and a withheld entry of one envelope were two exposures.
    roster = Roster(
        [
            _roster_key("usa-enc-1", "USA", "enc", "revoked", 1),
            _roster_key("usa-enc-2", "USA", "enc", "active", None),
        ]
    )
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 0)]
    first, repeat = (_jpn_send(R1, D_LOOSE, t=t) for t in (5, 6))

    def keyed(event: ev.AuditEvent, kid: str | None) -> ev.AuditEvent:
        return ev.AuditEvent(dict(event.fields, recipient_kid=kid))

    log = _entries([*jpn, keyed(first, "usa-enc-2"), keyed(repeat, "usa-enc-1")])
    result = replay({"JPN": log}, BOTH, roster=roster)
    assert sorted((f.kind, f.seq) for f in result.findings) == [
        ("conflicting-repeat", 3),
        ("to-revoked-key", 2),  # the revoked key its repeat names, checked too
    ]
    assert [e.seq for e in result.sent_to_revoked_keys()] == [2]
    # The same JWE sent from two logs naming other keys: the same findings either way.
    kor = [_started("KOR"), _accepted("KOR", R1, 0)]
    theirs = ev.AuditEvent(dict(keyed(first, "usa-enc-1").fields, member="KOR", originator="KOR"))
    both = {"JPN": _entries([*jpn, keyed(first, "usa-enc-2")]), "KOR": _entries([*kor, theirs])}
    forward = replay(both, BOTH, roster=roster)
    backward = replay(dict(reversed(both.items())), BOTH, roster=roster)
    assert sorted(map(astuple, forward.findings)) == sorted(map(astuple, backward.findings))
    assert [(f.kind, f.member) for f in forward.findings if f.kind.endswith("key")] == [
        ("to-revoked-key", "KOR")
    ]
    assert {(e.sender, e.recipient_kid) for e in forward.exchanges} == {
        ("JPN", "usa-enc-2"),
        ("KOR", "usa-enc-1"),
    }
    usa = [_started("USA"), _recv("USA", "JPN", R1, NARROW, 7)]
    # A withheld entry naming no key, yet received: false (the partner needs the key).
    kidless = keyed(_withheld("USA", R1, NARROW, 6), None)
    found = replay({"JPN": _entries([*jpn, kidless]), "USA": _entries(usa)}, BOTH, roster=roster)
    assert [(f.kind, f.detail) for f in found.findings] == [
        (
            "wrong-recipient-key",
            "to USA: a withheld envelope that names no key, yet reached USA",
        )
    ]
    # One that cannot be dated (its report's arrival not in the log), to a revoked key.
    undated = replay(
        {"JPN": _entries([jpn[0], _withheld("USA", R1, NARROW, 6)]), "USA": _entries(usa)},
        BOTH,
        roster=roster,
    )
    assert [f.kind for f in undated.findings if f.kind.endswith("key")] == ["to-revoked-key"]
    assert undated.findings[-1].detail.endswith(
        "(taken back at a start, its report's arrival not in the log, and it reached USA)"
    )
    # Sent, then taken back after a crash (one envelope): one finding, one exposure.
    twice = [*jpn, keyed(first, "usa-enc-1"), _withheld("USA", R1, NARROW, 8)]
    result = replay({"JPN": _entries(twice), "USA": _entries(usa)}, BOTH, roster=roster)
    assert [f.kind for f in result.findings] == ["to-revoked-key"]
    assert len(result.sent_to_revoked_keys()) == 1
    # Format 1 sends name no key: counted as not checked, not passed over in silence.
    old = _entries([*jpn, first])
    del old[2]["recipient_kid"]
    for entry in old:
        entry["v"] = 1
    result = replay({"JPN": old}, BOTH, roster=roster)
    assert (result.findings, result.keyless_sends) == ((), 1)
    assert "  recipient keys not checked: 1 envelope whose entries name none (format 1)" in (
        render_tables(result, ["JPN"], timeline=False).splitlines()
    )


def _jwe_to(kid: str, body: bytes = b"1") -> bytes:
    """Envelope-shaped bytes whose protected header names ``kid`` (all the entry reads)."""
    header = json.dumps({"alg": "ECDH-ES+A256KW", "enc": "A256GCM", "kid": kid}).encode()
    return base64.urlsafe_b64encode(header).rstrip(b"=") + b".wrapped.iv." + body + b".tag"


def test_a_node_repeating_its_entries_after_a_crash_is_not_a_finding(tmp_path: Path) -> None:
    # What the node logs again after a crash: the publisher's sent entry from the
    # same outbox row, the receiver's received entry of the same envelope, a
    # rejection of the same bytes; only the time (and place) differ.
    facts = {
        "iat": 0,
        "bytes": 9,
        "kind": "vessel",
        "released": NARROW,
        "policy": D_LOOSE,
        "originator": "JPN",
        "tlp": "AMBER",
        "rel_to": None,
    }
    item = OutboxItem(str(R1), "USA", "msmt.to.USA.vessel", _jwe_to("usa-enc-1"), json.dumps(facts))
    refused = OutboxItem(
        str(R2), "USA", "msmt.to.USA.vessel", _jwe_to("usa-enc-1", b"2"), json.dumps(facts)
    )
    root = tmp_path / "logs"
    _append(
        root / "JPN",
        "JPN",
        [
            _started("JPN", None, D_LOOSE),
            _accepted("JPN", R1, 0),
            _accepted("JPN", R2, 0),
            *(sent_event("JPN", i, T0 + timedelta(seconds=1)) for i in (item, refused)),
            *(sent_event("JPN", i, T0 + timedelta(seconds=5)) for i in (item, refused)),
        ],
    )

    def receipt(t: int) -> ev.AuditEvent:
        return ev.received(
            "USA",
            T0 + timedelta(seconds=t),
            sender="JPN",
            report_id=R1,
            kind="vessel",
            fields=NARROW,
            jwe_sha256=item.jwe_sha256,
            recipient_kid="usa-enc-1",
        )

    refusal = [_rejection("USA", "JPN", R2, refused.jwe_sha256, t) for t in (2, 6)]
    _append(root / "USA", "USA", [_started("USA"), receipt(2), refusal[0], receipt(6), refusal[1]])
    code, out, err = _replay(tmp_path, [root / "JPN", root / "USA"], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["findings"] == []
    assert [(e["report_id"], e["status"]) for e in report["exchanges"]] == [
        (str(R1), "delivered"),
        (str(R2), "rejected"),
    ]


# --- replay parses the bytes it verified ---------------------------------------------


def _forged_copy(database: Path, into: Path) -> Path:
    """A copy of ``database`` whose entry 2 (JPN's send to USA) is marked RED: unsigned."""
    with (
        contextlib.closing(sqlite3.connect(database)) as src,
        contextlib.closing(sqlite3.connect(into, isolation_level=None)) as dst,
    ):
        src.backup(dst)
        entry = json.loads(dst.execute("SELECT entry FROM entries WHERE idx = 2").fetchone()[0])
        assert entry["type"] == "sent"
        forged = canonical.dumps(entry | {"tlp": "RED"})
        dst.execute("UPDATE entries SET entry = ? WHERE idx = 2", (forged,))
        dst.execute("PRAGMA journal_mode=delete")
    return into


def _swap(forged: Path, database: Path) -> None:
    """Put ``forged`` in the place of ``database``, as a racing ``mv`` of the file would."""
    os.replace(forged, database)
    # The old file's write-ahead log would otherwise lay its pages over the new file.
    for suffix in ("-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)


def test_entries_are_parsed_only_if_they_are_the_bytes_verified(tmp_path: Path) -> None:
    from broker.audit_replay import verified_entries

    dirs = _run_world(tmp_path / "logs")
    jpn = dirs[0]
    report = verify_log(jpn, [log_verifier(KEYS["JPN"], "JPN")])
    log = load(jpn)
    entries = audit_entries(jpn)
    assert verified_entries(log.entries(0, report.size), report.size, report.root) == entries
    # The node appends after the check (a live log): the verified prefix still reads.
    _append(jpn, "JPN", [_rejection("JPN", "GBR", R3, _jwe("GBR", "JPN", R3), 9)])
    assert verified_entries(log.entries(0, report.size), report.size, report.root) == entries
    changed = (
        "changed after it was verified: its entries do not hash to the root verified at size 6"
    )
    with pytest.raises(AuditError) as more:
        verified_entries(log.entries(0, report.size + 1), report.size, report.root)
    assert str(more.value) == changed
    # A file swapped in between the check and the read (an unsigned forgery).
    _swap(_forged_copy(jpn / DB_FILE, tmp_path / "forged.sqlite"), jpn / DB_FILE)
    with pytest.raises(AuditError) as swapped:
        verified_entries(log.entries(0, report.size), report.size, report.root)
    assert str(swapped.value) == changed


def test_a_malformed_entry_is_blamed_on_the_log_only_once_its_bytes_are_verified(
    tmp_path: Path,
) -> None:
    from broker.audit_replay import verified_entries

    good = [
        {k: v for k, v in json.loads(e.seal(0, None)).items() if k not in ("v", "seq", "prev")}
        for e in (_started("JPN"), _accepted("JPN", R1, 0), _send("JPN", "USA", R1, FULL, 1))
    ]
    good[2]["partner"] = "XYZ"
    forged = _forged_log(tmp_path / "logs", "JPN", good)
    report = verify_log(forged, [log_verifier(KEYS["JPN"], "JPN")])
    data = load(forged).entries(0, report.size)
    with pytest.raises(AuditError) as signed:
        verified_entries(data, report.size, report.root)
    assert str(signed.value) == (
        "entry 2: is not a valid 'sent' entry: audit partner 'XYZ' is not an MSMT member"
    )
    with pytest.raises(AuditError) as unverified:
        verified_entries(data, report.size, b"\0" * 32)
    assert str(unverified.value).startswith("changed after it was verified")


def test_replay_refuses_a_log_swapped_after_it_was_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The window of a racing ``mv``, hit deterministically: the file changes right
    # after verification.
    dirs = _run_world(tmp_path / "logs")
    forged = _forged_copy(dirs[0] / DB_FILE, tmp_path / "forged.sqlite")

    def verify_then_swap(directory: Path, *args: Any, **kwargs: Any) -> Report:
        report = verify_log(directory, *args, **kwargs)
        if report.origin == "JPN":
            _swap(forged, dirs[0] / DB_FILE)
        return report

    monkeypatch.setattr("broker.cli.audit_base.verify_log", verify_then_swap)
    code, out, err = _replay(tmp_path, dirs)
    assert (code, out) == (1, "")
    assert err.startswith("msmt: error: JPN log ")
    assert "changed after it was verified" in err


# --- refusals a node counted in bulk (rejected_many): counted, never matched to a send -----


def _bulk(member: str, source: str, t: int, **steps: int) -> ev.AuditEvent:
    at = T0 + timedelta(seconds=t)
    return ev.rejected_many(member, at, source=source, count=sum(steps.values()), steps=steps)


def test_bulk_refusals_are_told_beside_a_send_the_partner_never_named() -> None:
    # USA received R1, refused R2 by name, and never named R3, while it counted
    # refusals of JPN's messages (and KOR's, and an unknown source's) in bulk.
    jpn = [_started("JPN", None, D_LOOSE)]
    jpn += [_accepted("JPN", r, 0) for r in (R1, R2, R3)]
    jpn += [_jpn_send(r, D_LOOSE) for r in (R1, R2, R3)]
    jpn.append(_jpn_send(R3, D_LOOSE, partner="KOR"))
    usa = [
        _started("USA"),
        _recv("USA", "JPN", R1, NARROW, 1),
        _rejection("USA", "JPN", R2, _jwe_of(jpn[5]), 2, step="freshness"),
        _bulk("USA", "JPN", 5, format=100, size=40),
        _bulk("USA", "KOR", 6, format=7),
        _bulk("USA", "unknown", 7, subject=2),
        _bulk("USA", "JPN", 70, format=10),
        _bulk("KOR", "JPN", 8, format=1000),  # KOR's entry in USA's log: its own finding
    ]
    kor = [_started("KOR")]
    result = replay({"JPN": _entries(jpn), "USA": _entries(usa), "KOR": _entries(kor)}, BOTH)
    # Each log is read once, in order: iterators (as the CLI streams them) say the same.
    streamed = {"JPN": iter(_entries(jpn)), "USA": iter(_entries(usa)), "KOR": iter(_entries(kor))}
    assert replay(streamed, BOTH) == result
    _assert_json_text(result)
    statuses = {(e.recipient, e.report_id): e.status for e in result.exchanges}
    assert statuses == {
        ("USA", str(R1)): "delivered",
        ("USA", str(R2)): "rejected",
        ("USA", str(R3)): "undelivered",  # not "rejected": no entry names it
        ("KOR", str(R3)): "undelivered",
    }
    assert [(f.kind, f.member, f.seq, f.detail) for f in result.findings] == [
        (
            "undelivered",
            "JPN",
            6,
            "sent to USA, which logged no receipt of this JWE; USA's log counts 150 refusals"
            " of JPN's messages without naming them (format 110, size 40;"
            " 2026-11-28T12:00:05Z to 2026-11-28T12:01:10Z): this send may or may not be"
            " among them",
        ),
        ("undelivered", "JPN", 7, "sent to KOR, which logged no receipt of this JWE"),
        ("wrong-member", "USA", 7, "a rejected_many entry that names KOR, in USA's log"),
    ]
    bulk = {k: (b.count, b.entries, dict(b.steps)) for k, b in result.bulk_refusals.items()}
    assert bulk == {
        ("JPN", "USA"): (150, 2, {"format": 110, "size": 40}),
        ("KOR", "USA"): (7, 1, {"format": 7}),
        ("unknown", "USA"): (2, 1, {"subject": 2}),
    }
    # Not "refused at every send": nothing says R3 was refused.
    assert [e.report_id for e in result.never_delivered()] == [str(R2)]
    assert result.to_json()["bulk_refusals"] == [
        {
            "source": "JPN",
            "recipient": "USA",
            "count": 150,
            "entries": 2,
            "steps": {"format": 110, "size": 40},
            "first": "2026-11-28T12:00:05Z",
            "last": "2026-11-28T12:01:10Z",
        },
        {
            "source": "KOR",
            "recipient": "USA",
            "count": 7,
            "entries": 1,
            "steps": {"format": 7},
            "first": "2026-11-28T12:00:06Z",
            "last": "2026-11-28T12:00:06Z",
        },
        {
            "source": "unknown",
            "recipient": "USA",
            "count": 2,
            "entries": 1,
            "steps": {"subject": 2},
            "first": "2026-11-28T12:00:07Z",
            "last": "2026-11-28T12:00:07Z",
        },
    ]
    text = render_tables(result, ["JPN", "KOR", "USA"])
    assert (
        "Refused in bulk, counted without naming the messages"
        " (source as the hub named it -> recipient)\n"
        "  JPN -> USA  150 refusals (format 110, size 40;"
        " 2026-11-28T12:00:05Z to 2026-11-28T12:01:10Z) in 2 entries\n"
        "  KOR -> USA  7 refusals (format 7; 2026-11-28T12:00:06Z to 2026-11-28T12:00:06Z)"
        " in 1 entry\n"
        "  unknown -> USA  2 refusals (subject 2;"
        " 2026-11-28T12:00:07Z to 2026-11-28T12:00:07Z) in 1 entry\n"
    ) in text


def _assert_json_text(result: Replay) -> None:
    """``--json`` prints ``json_text()``: ``to_json()``, the findings first, one item a line."""
    text = "".join(result.json_text())
    assert json.loads(text) == result.to_json()
    members = list(json.loads(text))
    assert (members[0], members[-1]) == ("findings", "exchanges")
    lines = text.splitlines()
    each = lines[lines.index('  "exchanges": [') + 1 : -2]
    assert [json.loads(line.strip().rstrip(",")) for line in each] == result.to_json()["exchanges"]


def _jwe_of(send: ev.AuditEvent) -> str:
    return str(send.fields["jwe_sha256"])


def _resend(report: uuid.UUID, t: int) -> ev.AuditEvent:
    """JPN's send of ``report`` to USA again (msmt node resend): a new envelope."""
    return ev.sent(
        "JPN", T0 + timedelta(seconds=t), partner="USA", report_id=report, kind="vessel",
        released=NARROW, policy_digest=D_LOOSE, originator="JPN", tlp="AMBER", rel_to=None,
        recipient_kid="usa-enc-1",
        jwe_sha256=hashlib.sha256(f"again {report} {t}".encode()).hexdigest(),
    )  # fmt: skip


@pytest.mark.parametrize("replays", [2, 1])
def test_a_resend_of_reports_the_partner_held_refused_in_bulk_is_no_finding(
    replays: int,
) -> None:
    # A clock trial: msmt node resend --since sent 629 reports again, most of which
    # USA held; it refused them as replays, past 60 a minute only counted, and replay
    # then gave 552 "undelivered" findings, every one a report USA held. R3 was never
    # delivered: its resend, unnamed, stays a finding whatever the counts.
    jpn = [_started("JPN", None, D_LOOSE)]
    jpn += [_accepted("JPN", r, 0) for r in (R1, R2, R3)]
    jpn += [_jpn_send(r, D_LOOSE) for r in (R1, R2)]
    jpn += [_resend(R1, 60), _resend(R2, 61), _resend(R3, 62)]
    usa = [_started("USA"), _recv("USA", "JPN", R1, NARROW, 1), _recv("USA", "JPN", R2, NARROW, 2)]
    usa.append(_bulk("USA", "JPN", 70, replay=replays, format=5))
    result = replay({"JPN": _entries(jpn), "USA": _entries(usa)}, BOTH)
    _assert_json_text(result)
    unlogged = [(f.kind, f.report_id) for f in result.findings]
    if replays == 2:  # as many bulk replays as resends of held reports: those are they
        assert unlogged == [("undelivered", str(R3))]
        assert [(e.report_id, e.seq) for e in result.resent()] == [(str(R1), 6), (str(R2), 7)]
        assert result.to_json()["resent_to_holder"] == [
            {"sender": "JPN", "recipient": "USA", "report_id": str(r), "seq": s}
            for r, s in ((R1, 6), (R2, 7))
        ]
        text = render_tables(result, ["JPN", "USA"])
        assert (
            "Sent again to a partner that held the report, among its bulk replay refusals (2)\n"
            f"  JPN -> USA  {R1}  (entry 6)"
        ) in text
    else:  # fewer: one of them was lost, and which cannot be told
        assert unlogged == [("undelivered", r) for r in (str(R1), str(R2), str(R3))]
        assert result.resent() == []
    assert result.recovered() == []  # an earlier send delivered these, not a later one


def test_bulk_refusals_alone_are_no_finding_and_show_in_every_output(tmp_path: Path) -> None:
    # Real logs: a clean exchange, then USA's node counts junk from KOR in bulk.
    dirs = _run_world(tmp_path / "logs")
    _append(dirs[1], "USA", [_bulk("USA", "KOR", 9, format=140), _bulk("USA", "KOR", 10, size=3)])
    code, out, err = _replay(tmp_path, dirs, "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["findings"] == []
    assert report["bulk_refusals"] == [
        {
            "source": "KOR",
            "recipient": "USA",
            "count": 143,
            "entries": 2,
            "steps": {"format": 140, "size": 3},
            "first": "2026-11-28T12:00:09Z",
            "last": "2026-11-28T12:00:10Z",
        }
    ]
    # KOR's named refusal is still the send's status; the counted ones change nothing.
    statuses = {(e["sender"], e["recipient"]): e["status"] for e in report["exchanges"]}
    assert statuses[("KOR", "USA")] == "rejected"
    code, out, _ = _replay(tmp_path / "again", dirs)
    assert code == 0
    assert (
        "  KOR -> USA  143 refusals (format 140, size 3;"
        " 2026-11-28T12:00:09Z to 2026-11-28T12:00:10Z) in 2 entries"
    ) in out
    assert "none: every send and receive reconciles" in out
    code, listed, err = _run_cli(
        "audit", "entries", str(dirs[1]), "--type", "rejected_many", "--log-key",
        log_verifier(KEYS["USA"], "USA").vkey(),
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert [line.split()[2:] for line in listed.splitlines()] == [
        ["rejected_many", "count=140", "source=KOR", "steps=format:140"],
        ["rejected_many", "count=3", "source=KOR", "steps=size:3"],
    ]


def _run_cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


# --- format 3: a receipt names the key that opened its envelope ----------------------


@dataclass(frozen=True, slots=True)
class _Older(ev.AuditEvent):
    """An event sealed as an earlier version wrote it (``v``): its fields as they are."""

    v: int = 1

    def seal(self, seq: int, prev: bytes | None) -> bytes:
        entry = dict(self.fields, v=self.v, seq=seq, prev=prev.hex() if prev else "")
        return canonical.dumps(entry)


def _as_of(event: ev.AuditEvent, v: int) -> ev.AuditEvent:
    """``event`` as version ``v`` wrote it: without the keys later versions added."""
    fields = dict(event.fields)
    if (v < 3 and fields["type"] == "received") or (v < 2 and fields["type"] == "sent"):
        del fields["recipient_kid"]
    return _Older(fields, v)


def _keyed(event: ev.AuditEvent, kid: str | None) -> ev.AuditEvent:
    return ev.AuditEvent(dict(event.fields, recipient_kid=kid))


async def test_a_receipt_names_the_key_that_opened_it_and_so_catches_a_renamed_send(
    world: World, tmp_path: Path
) -> None:
    # KOR rotates its encryption key while JPN's outbox holds envelopes made to the old
    # one (the hub down), then both restart on the new roster: KOR opens those with its
    # retired key and later ones with the new one, and each receipt names the key that
    # opened it. Then the old key is stolen and revoked, and JPN, re-signing its own log,
    # renames a send to it as a send to the new key, valid by then: alone, its log gave
    # no finding and the send left the list of what the thief can read (format 2).
    world.write_config("JPN", BATCH_POLICY)
    world.write_config("KOR")
    policy = world.policy("JPN")

    def to_kor(records: list[dict[str, Any]]) -> set[str]:
        return {
            r["report_id"]
            for r in records
            if "KOR" in expected_partners(policy, parse_record(json.dumps(r)))
        }

    world.start("JPN")
    world.server.kill()
    made_before = records_for("JPN", 12, seed=83)
    assert {a["status"] for a in await world.submit("JPN", made_before)} == {"accepted"}
    await await_for(lambda: world.all_planned("JPN"), 30, "the reports planned")
    assert world.terminate("JPN") == 0
    roster = keys_roster.load_signed_roster(world.keydir).roster
    kor_old = roster.current("KOR", "enc", datetime.now(UTC)).kid
    _, kor_new = keys_custodian.rotate_keys(world.keydir, "KOR")
    world.server.start()
    world.start("KOR")
    world.start("JPN")
    made_after = records_for("JPN", 12, seed=84)
    assert {a["status"] for a in await world.submit("JPN", made_after)} == {"accepted"}
    old, new = to_kor(made_before), to_kor(made_after)
    assert old
    assert new
    await await_for(
        lambda: set(world.inbox_ids("KOR", "JPN")) == old | new, 60, "KOR holds every report"
    )
    await world.outbox_sent("JPN")
    assert world.terminate("JPN") == 0
    assert world.terminate("KOR") == 0

    jpn_dir, kor_dir = (world.config(m).audit_dir for m in ("JPN", "KOR"))
    receipts = {e["report_id"]: e for e in audit_entries(kor_dir) if e["type"] == "received"}
    assert set(receipts) == old | new
    assert {e["v"] for e in receipts.values()} == {3}
    assert {r: e["recipient_kid"] for r, e in receipts.items()} == {
        **dict.fromkeys(old, kor_old),
        **dict.fromkeys(new, kor_new),
    }
    # Independently of our code: the key each envelope KOR kept names in its header.
    store = world.store("KOR")
    try:
        for report, entry in receipts.items():
            jwe = store.kept_envelope("JPN", report)
            assert jwe is not None
            head = jwe.split(".")[0]
            header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
            assert header["kid"] == entry["recipient_kid"]
            assert hashlib.sha256(jwe.encode()).hexdigest() == entry["jwe_sha256"]
    finally:
        store.close()
    sends = [e for e in audit_entries(jpn_dir) if e["type"] == "sent" and e["partner"] == "KOR"]
    assert {e["jwe_sha256"]: e["recipient_kid"] for e in sends} == {
        e["jwe_sha256"]: e["recipient_kid"] for e in receipts.values()
    }

    def run(*dirs: Path) -> tuple[int, dict[str, Any]]:
        args = ["audit", "replay", *map(str, dirs), "--keys", str(world.keydir), "--json"]
        result = CliRunner().invoke(main, [*args, "--policies", str(world.root / "nodes")])
        return result.exit_code, json.loads(result.stdout)

    code, report = run(jpn_dir, kor_dir)
    assert (code, report["findings"]) == (0, [])
    keys_custodian.revoke_key(world.keydir, kor_old, "stolen")
    code, report = run(jpn_dir, kor_dir)
    exposed = {x["report_id"] for x in report["sent_to_revoked_keys"] if x["recipient"] == "KOR"}
    assert (code, report["findings"], exposed) == (0, [], old)

    renamed = next(e for e in sends if e["report_id"] in old)
    signer = keyfiles.load_member_keys(world.keydir, "JPN", roster, datetime.now(UTC)).signing
    assert isinstance(signer.private_key, Ed25519PrivateKey)

    def rename(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            e | {"recipient_kid": kor_new} if e.get("jwe_sha256") == renamed["jwe_sha256"] else e
            for e in entries
        ]

    forged = _rewrite(jpn_dir, tmp_path / "renamed", "JPN", signer.private_key, rename)
    # The sender's log alone: nothing to see, and the send is no longer exposed.
    code, alone = run(forged)
    assert (code, alone["findings"]) == (0, [])
    assert renamed["report_id"] not in {x["report_id"] for x in alone["sent_to_revoked_keys"]}
    # With KOR's log: its receipt names the key that opened it.
    code, report = run(forged, kor_dir)
    receipt = receipts[renamed["report_id"]]
    assert code == 1
    assert _kinds(report["findings"]) == [
        (
            "mismatch",
            "KOR",
            receipt["seq"],
            f"receipt of JPN's entry {renamed['seq']} differs from it in recipient key"
            f" (JPN's entries name {kor_new}, KOR's {kor_old})",
        )
    ]
    listed = [x for x in report["sent_to_revoked_keys"] if x["recipient"] == "KOR"]
    assert {x["report_id"] for x in listed} == old
    (entry,) = [x for x in listed if x["seq"] == renamed["seq"]]
    assert (entry["recipient_kid"], entry["receipt_kid"]) == (kor_new, kor_old)
    args = ["audit", "replay", str(forged), str(kor_dir), "--keys", str(world.keydir)]
    text = CliRunner().invoke(main, [*args, "--policies", str(world.root / "nodes")])
    assert (
        f"  JPN -> KOR  {renamed['report_id']}  {kor_new}, {kor_old} by KOR's receipt"
        f" (entry {renamed['seq']})"
    ) in text.stdout.splitlines()


def test_logs_of_formats_1_2_and_3_are_read_and_a_receipt_repeated_across_the_upgrade_is_honest(
    tmp_path: Path,
) -> None:
    # Two nodes that ran versions 1, 2 and 3 in turn: each log's entries are read as
    # they were written. USA's node, upgraded to version 3 with R2 delivered but not
    # stored, logs its receipt again when the hub redelivers it, now with the key.
    jpn = [
        _as_of(_started("JPN", None, D_LOOSE), 1),
        _as_of(_accepted("JPN", R1, 0), 1),
        _as_of(_jpn_send(R1, D_LOOSE, t=1), 1),
        _as_of(_accepted("JPN", R2, 2), 2),
        _as_of(_jpn_send(R2, D_LOOSE, t=3), 2),
        _accepted("JPN", R3, 4),
        _jpn_send(R3, D_LOOSE, t=5),
    ]
    usa = [
        _as_of(_started("USA"), 1),
        _as_of(_recv("USA", "JPN", R1, NARROW, 2), 1),
        _as_of(_recv("USA", "JPN", R2, NARROW, 4), 2),
        _recv("USA", "JPN", R2, NARROW, 6),
        _recv("USA", "JPN", R3, NARROW, 6),
    ]
    root = tmp_path / "logs"
    _append(root / "JPN", "JPN", jpn)
    _append(root / "USA", "USA", usa)
    assert [e["v"] for e in audit_entries(root / "USA")] == [1, 1, 2, 3, 3]
    code, out, err = _replay(tmp_path, [root / "JPN", root / "USA"], "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["findings"] == []
    assert [
        (e["report_id"], e["status"], e["recipient_kid"], e["receipt_kid"])
        for e in report["exchanges"]
    ] == [
        (str(R1), "delivered", None, None),
        (str(R2), "delivered", "usa-enc-1", "usa-enc-1"),  # the repeat's key
        (str(R3), "delivered", "usa-enc-1", "usa-enc-1"),
    ]
    # The repeat naming another key than the send: the two logs disagree.
    other = _keyed(_recv("USA", "JPN", R2, NARROW, 6), "usa-enc-9")
    result = replay({"JPN": _entries(jpn), "USA": _entries([*usa[:3], other, usa[4]])}, BOTH)
    assert [(f.kind, f.member, f.seq, f.detail) for f in result.findings] == [
        (
            "mismatch",
            "USA",
            2,
            "receipt of JPN's entry 4 differs from it in recipient key (JPN's entries name"
            " usa-enc-1, USA's usa-enc-9)",
        )
    ]
    # A version-2 entry after the log's first version-3 entry: an older build ran on it
    # (or its owner rewrote it), one finding for the log.
    _append(root / "USA", "USA", [_as_of(_recv("USA", "JPN", R3, NARROW, 9), 2)])
    code, out, _ = _replay(tmp_path / "again", [root / "JPN", root / "USA"], "--json")
    (found,) = json.loads(out)["findings"]
    assert (code, found["kind"], found["member"], found["seq"]) == (1, "older-format", "USA", 5)
    assert found["detail"].startswith(
        "1 entries of an older format after entry 3, the log's first of format 3:"
    )


def test_the_key_a_receipt_names_is_checked_whatever_the_send_names() -> None:
    # USA's key usa-enc-1 is stolen and revoked; usa-enc-2 replaced it. JPN's sends to it
    # are rewritten to name usa-enc-2, valid from before them: USA's receipts say which
    # key opened each.
    stolen = _roster_key("usa-enc-1", "USA", "enc", "revoked", 3600)
    new = _roster_key("usa-enc-2", "USA", "enc", "active", None)
    roster = Roster([stolen, new, _roster_key("usa-sig-1", "USA", "sig", "active", None)])
    jpn = [_started("JPN", None, D_LOOSE), _accepted("JPN", R1, 10), _accepted("JPN", R2, 3700)]
    sends = [
        _keyed(_jpn_send(R1, D_LOOSE, t=20), "usa-enc-2"),  # before the revocation
        _keyed(_jpn_send(R2, D_LOOSE, t=3800), "usa-enc-2"),  # after it
    ]
    usa = [
        _started("USA"),
        _recv("USA", "JPN", R1, NARROW, 21),
        _recv("USA", "JPN", R2, NARROW, 3801),
    ]
    logs = {"JPN": _entries([*jpn, *sends]), "USA": _entries(usa)}
    result = replay(logs, BOTH, roster=roster)
    assert [(f.kind, f.member, f.seq, f.detail) for f in result.findings] == [
        (
            "to-revoked-key",
            "JPN",
            4,
            "to USA: encrypted to USA's key usa-enc-1 after its revocation at"
            " 2026-11-28T13:00:00Z: whoever holds that key can read it (named by USA's"
            " receipt, entry 2)",
        ),
        *(
            (
                "mismatch",
                "USA",
                seq,
                f"receipt of JPN's entry {send} differs from it in recipient key (JPN's"
                " entries name usa-enc-2, USA's usa-enc-1)",
            )
            for seq, send in ((1, 3), (2, 4))
        ),
    ]
    assert [(e.seq, e.recipient_kid, e.receipt_kid) for e in result.sent_to_revoked_keys()] == [
        (3, "usa-enc-2", "usa-enc-1"),
        (4, "usa-enc-2", "usa-enc-1"),
    ]
    backward = replay(dict(reversed(logs.items())), BOTH, roster=roster)
    assert backward.findings == result.findings
    # Named by the receipt alone (a format-1 send): checked and listed, not keyless.
    old = _entries([*jpn, sends[0]])
    del old[3]["recipient_kid"]
    for entry in old:
        entry["v"] = 1
    result = replay({"JPN": old, "USA": _entries(usa[:2])}, BOTH, roster=roster)
    assert (result.findings, result.keyless_sends) == ((), 0)
    assert [(e.seq, e.recipient_kid, e.receipt_kid) for e in result.sent_to_revoked_keys()] == [
        (3, None, "usa-enc-1")
    ]
    assert (
        f"  JPN -> USA  {R1}  usa-enc-1 by USA's receipt (entry 3)"
        in render_tables(result, ["JPN", "USA"], timeline=False).splitlines()
    )
    # A receipt naming a key that is not the receiver's own encryption key is false,
    # with or without the send; the one JWE's two receipts naming two keys contradict.
    wrong = [
        _started("USA"),
        _keyed(_recv("USA", "JPN", R1, NARROW, 21), "usa-sig-1"),
        _keyed(_recv("USA", "KOR", R2, NARROW, 22), "kor-enc-1"),
        _keyed(_recv("USA", "KOR", R2, NARROW, 23), "usa-enc-2"),
    ]
    result = replay({"USA": _entries(wrong)}, BOTH, roster=roster)
    assert [(f.kind, f.seq, f.detail) for f in result.findings] == [
        (
            "wrong-recipient-key",
            1,
            "from JPN: opened with key usa-sig-1, a sig key of USA, not an encryption key of USA",
        ),
        ("wrong-recipient-key", 2, "from KOR: opened with key kor-enc-1, not in the roster"),
        (
            "conflicting-repeat",
            3,
            "repeat of entry 2 (same JWE) differs from it in recipient_kid",
        ),
    ]


def test_a_version_3_receipt_without_its_key_stops_replay_in_one_line(tmp_path: Path) -> None:
    fields = {
        k: v for k, v in _recv("USA", "JPN", R1, FULL, 2).fields.items() if k != "recipient_kid"
    }
    for entry in (fields, fields | {"recipient_kid": "usa-enc-1", "signing_kid": "JPN-sig-1"}):
        root = tmp_path / str(len(entry))
        forged = _forged_log(root, "USA", [dict(_started("USA").fields), entry])
        code, out, err = _replay(root, [forged])
        assert (code, out) == (1, "")
        assert err == (
            f"msmt: error: USA log {forged / DB_FILE}: entry 1: has the wrong fields for a"
            " 'received' entry\n"
        )


def test_a_receivers_log_alone_says_its_receipts_keys_were_not_checked_without_a_roster() -> None:
    # Format 3 receipts name the key that opened them, checked only given the roster
    # (wrong-recipient-key): the text said "none" and nothing of the keys when no send
    # was given, as if they had been checked.
    usa = [_started("USA"), _recv("USA", "JPN", R1, NARROW, 2)]
    lines = render_tables(replay({"USA": _entries(usa)}, BOTH), ["USA"], timeline=False)
    assert "  recipient keys not checked: no roster given (--keys or --roster)" in (
        lines.splitlines()
    )
    # Receipts of format 2 name no key: nothing to check, nothing said.
    older = [_as_of(e, 2) for e in usa]
    lines = render_tables(replay({"USA": _entries(older)}, BOTH), ["USA"], timeline=False)
    assert "recipient keys not checked" not in lines
    # Given the roster, they are checked (and here pass).
    roster = Roster([_roster_key("usa-enc-1", "USA", "enc", "active", None)])
    result = replay({"USA": _entries(usa)}, BOTH, roster=roster)
    assert result.findings == ()
    assert "recipient keys not checked" not in render_tables(result, ["USA"], timeline=False)
