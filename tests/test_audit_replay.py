"""``msmt audit replay``: several real SQLite logs reconciled against the senders' policies."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import T0, log_verifier
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from node_world import BATCH_POLICY, World, await_for, records_for

from broker import audit_events as ev
from broker import keys as keyfiles
from broker.audit_replay import over_disclosures, replay
from broker.auditlog import DB_FILE, AuditLog
from broker.cli import main
from broker.node import load_node
from broker.policy import load_policy
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
    )


def _recv(
    recipient: str, sender: str, report: uuid.UUID, fields: list[str], t: int
) -> ev.AuditEvent:
    return ev.received(
        recipient,
        T0 + timedelta(seconds=t),
        sender=sender,
        report_id=report,
        kind="vessel",
        fields=fields,
        jwe_sha256=_jwe(sender, recipient, report),
    )


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
        ev.accepted("JPN", T0, report_id=R1, kind="vessel", feed="ais"),
        _send("JPN", "USA", R1, FULL, 1),
        _send("JPN", "KOR", R1, FULL, 1),
        _send("JPN", "GBR", R1, gbr_fields, 1),
        _recv("JPN", "USA", R2, FULL, 3),
    ]
    if drop_jpn_send_to_kor:
        del jpn[2]
    by_member = {
        "JPN": jpn,
        "USA": [
            _recv("USA", "JPN", R1, FULL, 2),
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
        "KOR": [_recv("KOR", "JPN", R1, FULL, 2), _send("KOR", "USA", R3, ["vessel.imo"], 4)],
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
    code, out, _ = _replay(tmp_path / "again", dirs)
    assert code == 0
    assert "none: every send and receive reconciles" in out
    assert "JPN -> USA" in out


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
            "seq": 0,
            "report_id": str(R1),
            "detail": "received from JPN but JPN's log has no matching send",
        }
    ]


def test_widened_disclosure_is_reported_exactly(tmp_path: Path) -> None:
    dirs = _run_world(tmp_path / "logs", widen_gbr=True)
    code, out, _ = _replay(tmp_path, dirs, "--json")
    assert code == 1
    findings = json.loads(out)["findings"]
    assert [(f["kind"], f["member"], f["seq"]) for f in findings] == [("over-disclosure", "JPN", 3)]
    assert findings[0]["detail"] == (
        "to GBR: vessel.position: the policy releases it only as vessel.position#coarsen:1"
    )


def test_undelivered_and_unknown_policy_and_field_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "logs"
    jpn = AuditLog(root / "JPN", "JPN", KEYS["JPN"])
    jpn.append_many([_send("JPN", "USA", R1, FULL, 1), _send("JPN", "KOR", R2, FULL, 2)])
    usa = AuditLog(root / "USA", "USA", KEYS["USA"])
    usa.append_many([_recv("USA", "JPN", R1, ["vessel.imo"], 2)])
    kor = AuditLog(root / "KOR", "KOR", KEYS["KOR"])
    kor.append_many([_send("KOR", "USA", R3, ["vessel.imo"], 3)])
    usa.append_many([_recv("USA", "KOR", R3, ["vessel.imo"], 4)])
    polices_without_kor = {DIGEST["JPN"]: load_policy(POLICIES["JPN"], member="JPN")}
    logs = {
        m: [json.loads(log.entry(i)) for i in range(log.size)]
        for m, log in (("JPN", jpn), ("USA", usa), ("KOR", kor))
    }
    result = replay(logs, polices_without_kor)
    assert [(f.kind, f.member, f.seq) for f in result.findings] == [
        ("undelivered", "JPN", 1),
        ("unknown-policy", "KOR", 0),
        ("mismatch", "USA", 0),
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


# --- a real run: three nodes exchange reports over a real hub, then replay ------------


def _rewrite(
    audit_dir: Path, into: Path, member: str, signer: Ed25519PrivateKey, edit: Any
) -> Path:
    """Re-sign ``member``'s log with ``edit`` applied to its entries: an owner rewriting history."""
    with sqlite3.connect(audit_dir / DB_FILE) as db:
        entries = [json.loads(r[0]) for r in db.execute("SELECT entry FROM entries ORDER BY idx")]
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
            with sqlite3.connect(world.config(member).audit_dir / DB_FILE) as db:
                return [json.loads(r[0]) for r in db.execute("SELECT entry FROM entries")]

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

    roster = keyfiles.load_signed_roster(world.keydir).roster
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
    with sqlite3.connect(dirs[0] / DB_FILE) as db:
        sends = [json.loads(r[0]) for r in db.execute("SELECT entry FROM entries")]
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
