"""Evidence of a received report: the envelope kept as it arrived, shown to a third party.

JPN and USA run in this process against a real nats-server. USA's operator writes
evidence of a report with ``msmt inbox evidence``; an auditor checks it twice: with
stock libraries from the standards (RFC 7516 §5.2 decryption with the revealed
content key through ``cryptography``, the issuer's JWS through jwcrypto, RFC 9901
digests by hand), and with ``msmt audit evidence``. Both logs name the envelope's hash.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jwcrypto import jwk as jjwk
from jwcrypto import jws as jjws
from node_world import World, audit_entries, await_for, expected_partners, records_for

from broker import keys
from broker.cli import main
from broker.node import load_node
from broker.store import Store
from broker.validation import parse_record

pytestmark = pytest.mark.integration


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
async def delivered(world: World) -> tuple[World, list[str]]:
    """JPN sent USA what its policy releases; both nodes stopped. Returns the ids USA holds."""
    for member in ("JPN", "USA"):
        world.write_config(member)
    records = records_for("JPN", 6, seed=57)
    policy = world.policy("JPN")
    to_usa = [
        r["report_id"]
        for r in records
        if "USA" in expected_partners(policy, parse_record(json.dumps(r)))
    ]
    assert len(to_usa) >= 2
    nodes = [load_node(world.config(m)) for m in ("JPN", "USA")]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        await await_for(lambda: all(n.ready() is None for n in nodes), 20, "ready")
        answers = await world.submit("JPN", records)
        assert {a["status"] for a in answers} == {"accepted"}
        await await_for(
            lambda: sorted(world.inbox_ids("USA", "JPN")) == sorted(to_usa), 30, "USA's inbox"
        )
    finally:
        for n in nodes:
            n.stop.set()
        await asyncio.gather(*tasks)
    return world, to_usa


def _evidence(world: World, report_id: str) -> dict[str, Any]:
    result = _cli("inbox", "evidence", "--config", str(world.config_path("USA")), report_id)
    assert result.exit_code == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _write(tmp: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp / name
    path.write_text(json.dumps(data))
    return path


def test_an_auditor_checks_evidence_with_stock_libraries_and_both_logs(
    delivered: tuple[World, list[str]],
) -> None:
    world, ids = delivered
    report_id = ids[0]
    data = _evidence(world, report_id)
    assert set(data) == {
        "format",
        "recipient",
        "sender",
        "report_id",
        "received_at",
        "jwe",
        "jwe_sha256",
        "cek",
    }
    assert (data["format"], data["recipient"], data["sender"], data["report_id"]) == (
        "msmt-evidence/v1",
        "USA",
        "JPN",
        report_id,
    )
    jwe = data["jwe"]
    digest = hashlib.sha256(jwe.encode("ascii")).hexdigest()
    assert data["jwe_sha256"] == digest
    # Both logs name exactly this envelope: JPN's send to USA and USA's receipt.
    sent = [
        e
        for e in audit_entries(world.config("JPN").audit_dir)
        if e["type"] == "sent" and e["partner"] == "USA" and e["report_id"] == report_id
    ]
    received = [
        e
        for e in audit_entries(world.config("USA").audit_dir)
        if e["type"] == "received" and e["report_id"] == report_id
    ]
    assert [e["jwe_sha256"] for e in sent] == [digest]
    assert [e["jwe_sha256"] for e in received] == [digest]

    # RFC 7516 §5.2 steps 14-16 with the revealed CEK: AAD is the protected header as sent.
    protected, _wrapped, iv, ciphertext, tag = jwe.split(".")
    header = json.loads(_b64d(protected))
    assert (header["msmt_from"], header["msmt_to"], header["msmt_rid"]) == ("JPN", "USA", report_id)
    plaintext = AESGCM(_b64d(data["cek"])).decrypt(
        _b64d(iv), _b64d(ciphertext) + _b64d(tag), protected.encode("ascii")
    )
    # RFC 9901: <issuer JWS>~<disclosure>~...~ ; the JWS verifies with JPN's roster key.
    jws_text, *disclosures, last = plaintext.decode("ascii").split("~")
    assert last == ""
    roster = keys.load_signed_roster(world.keydir).roster
    signed = jjws.JWS()
    signed.deserialize(jws_text)
    kid = json.loads(_b64d(jws_text.split(".")[0]))["kid"]
    assert roster.get(kid).member == "JPN"
    public = roster.get(kid).jwk
    signed.verify(jjwk.JWK(kty=public["kty"], crv=public["crv"], x=public["x"]))
    payload = json.loads(signed.payload)
    assert (payload["iss"], payload["jti"]) == ("JPN", report_id)
    digests: set[str] = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            digests.update(node.get("_sd", []))
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(payload)
    for disclosure in disclosures:
        hashed = hashlib.sha256(disclosure.encode("ascii")).digest()
        assert base64.urlsafe_b64encode(hashed).rstrip(b"=").decode() in digests

    # msmt audit evidence agrees, and shows what USA's store holds for the report.
    path = _write(world.root, "evidence.json", data)
    checked = _cli("audit", "evidence", str(path), "--keys", str(world.keydir), "--json")
    assert checked.exit_code == 0, checked.stderr
    shown = json.loads(checked.stdout)
    stored = json.loads(
        _cli("inbox", "show", "--config", str(world.config_path("USA")), report_id).stdout
    )
    assert shown["fields"] == stored["fields"]
    assert (shown["originator"], shown["tlp"], shown["jwe_sha256"]) == (
        "JPN",
        stored["tlp"],
        digest,
    )
    assert shown["policy_digest"] == sent[0]["policy_digest"]
    text = _cli("audit", "evidence", str(path), "--keys", str(world.keydir))
    assert text.exit_code == 0
    assert text.stdout.startswith(f"OK: USA received report {report_id} (")
    assert digest in text.stdout


def test_evidence_that_was_altered_is_refused_with_one_line(
    delivered: tuple[World, list[str]],
) -> None:
    world, ids = delivered
    first, second = _evidence(world, ids[0]), _evidence(world, ids[1])
    cases = {
        # another report's content key does not open this envelope
        "other-cek": ({**first, "cek": second["cek"]}, "does not verify at decrypt: "),
        # the envelope's header says USA: the file may not claim another recipient
        "recipient": ({**first, "recipient": "FRA"}, "the file's recipient is not the envelope's"),
        "report": (
            {**first, "report_id": ids[1]},
            "the file's report_id is not the envelope's",
        ),
        # another envelope under this one's hash
        "hash": ({**first, "jwe": second["jwe"]}, '"jwe_sha256" is not the SHA-256 of "jwe"'),
        "format": ({**first, "format": "v0"}, "\"format\" is not 'msmt-evidence/v1'"),
        "extra": ({**first, "note": "x"}, "members must be exactly"),
    }
    for name, (data, reason) in cases.items():
        path = _write(world.root, f"{name}.json", data)
        result = _cli("audit", "evidence", str(path), "--keys", str(world.keydir))
        assert result.exit_code == 1, (name, result.stdout)
        assert result.stderr.startswith(f"msmt: error: evidence {path}: "), name
        assert reason in result.stderr, (name, result.stderr)
        assert result.stderr.count("\n") == 1, name
    # A ciphertext changed by one character fails its tag, with the key that opened it.
    protected, wrapped, iv, ciphertext, tag = first["jwe"].split(".")
    flipped = ciphertext[:10] + ("A" if ciphertext[10] != "A" else "B") + ciphertext[11:]
    jwe = ".".join((protected, wrapped, iv, flipped, tag))
    forged = {**first, "jwe": jwe, "jwe_sha256": hashlib.sha256(jwe.encode()).hexdigest()}
    path = _write(world.root, "flipped.json", forged)
    result = _cli("audit", "evidence", str(path), "--keys", str(world.keydir))
    assert result.exit_code == 1
    assert "does not verify at decrypt: the authentication tag does not verify" in result.stderr
    missing = _cli("audit", "evidence", str(world.root / "nope.json"), "--keys", str(world.keydir))
    assert missing.exit_code == 2
    nope = world.root / "nope.json"
    assert (
        missing.stderr == f"msmt: error: cannot read evidence {nope}: No such file or directory\n"
    )


def test_a_report_received_before_envelopes_were_kept_has_no_evidence(
    delivered: tuple[World, list[str]],
) -> None:
    world, ids = delivered
    config = str(world.config_path("USA"))
    # As a store from an earlier version holds it: the column empty for that row.
    with sqlite3.connect(world.config("USA").store_path) as db:
        db.execute("UPDATE inbox SET jwe = NULL WHERE report_id = ?", (ids[0],))
    old = _cli("inbox", "evidence", "--config", config, ids[0])
    assert old.exit_code == 1
    assert old.stderr == (
        f"msmt: error: report {ids[0]} from JPN was received before nodes kept envelopes:"
        " there is no evidence of it but the audit log's hash\n"
    )
    unknown = _cli("inbox", "evidence", "--config", config, "00000000-0000-4000-8000-000000000000")
    assert unknown.exit_code == 2
    assert (
        unknown.stderr == "msmt: error: no received report 00000000-0000-4000-8000-000000000000\n"
    )
    assert _cli("inbox", "evidence", "--config", config, ids[1]).exit_code == 0
    # The store keeps each envelope exactly as the hub delivered it, hash and all.
    store = Store(world.config("USA").store_path, readonly=True)
    try:
        for entry in store.inbox(sender="JPN"):
            kept = store.kept_envelope("JPN", entry.report_id)
            if entry.report_id == ids[0]:
                assert kept is None
            else:
                assert kept is not None
                assert hashlib.sha256(kept.encode()).hexdigest() == entry.jwe_sha256
    finally:
        store.close()


def test_inbox_check_finds_rows_edited_or_deleted_on_disk(
    delivered: tuple[World, list[str]],
) -> None:
    world, ids = delivered
    config = str(world.config_path("USA"))
    clean = _cli("inbox", "check", "--config", config)
    assert clean.exit_code == 0, clean.output
    assert clean.stdout == (
        f"OK: {len(ids)} reports match their signed envelopes;"
        " every receipt in the audit log is in the inbox\n"
    )
    path = world.config("USA").store_path
    receipts = {
        e["report_id"]: e["seq"]
        for e in audit_entries(world.config("USA").audit_dir)
        if e["type"] == "received"
    }
    with sqlite3.connect(path) as db:
        # A value changed, a marking lowered, a row deleted: each as a hand on the file would.
        fields = json.loads(
            db.execute("SELECT fields FROM inbox WHERE report_id = ?", (ids[0],)).fetchone()[0]
        )
        name = sorted(fields)[0]
        fields[name] = "SECRETVALUE"
        db.execute(
            "UPDATE inbox SET fields = ?, tlp = 'CLEAR' WHERE report_id = ?",
            (json.dumps(fields), ids[0]),
        )
        db.execute("DELETE FROM inbox WHERE report_id = ?", (ids[1],))
    found = _cli("inbox", "check", "--config", config)
    assert found.exit_code == 1
    assert found.stdout.splitlines() == [
        f"report {ids[0]} from JPN: tlp, fields differ from the signed envelope",
        f"audit entry {receipts[ids[1]]}: report {ids[1]} received from JPN is not in the inbox",
    ]
    assert found.stderr == (
        f"msmt: error: 2 problems in the inbox ({len(ids) - 2} reports match their signed"
        " envelopes)\n"
    )
    assert "SECRETVALUE" not in found.output
    # A row whose envelope was not kept (an earlier version) is counted, not checked.
    with sqlite3.connect(path) as db:
        db.execute("UPDATE inbox SET jwe = NULL WHERE report_id = ?", (ids[0],))
    older = _cli("inbox", "check", "--config", config)
    assert older.exit_code == 1
    assert older.stderr.startswith("msmt: error: 1 problem in the inbox (")
    assert older.stderr.endswith(
        f"({len(ids) - 2} reports match their signed envelopes;"
        " 1 received before envelopes were kept)\n"
    )
