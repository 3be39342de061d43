"""Nodes whose keys came through msmt keys request and accept exchange a report.

Two members on their own "machines" (key directories), a custodian who never
holds their private keys, and each node loaded as ``msmt node run`` loads it
(``load_node``: pinned roster, keys, store, audit log). The envelope goes from
GBR's planner to JPN's receiver directly: a hub adds nothing to what is tested
here, and the hub's part is covered by the node tests.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

from node_world import records_for, write_node_config
from structlog.testing import capture_logs

from broker import keyrequest, keys, keys_roster
from broker.config import load_config
from broker.node_start import load_node

POLICY = """
version = 1
member = "{member}"

[[rules]]
name = "all-to-{partner}"
kinds = ["*"]
partners = ["{partner}"]
release = ["*"]
"""


def join(custodian: Path, root: Path, member: str, partner: str) -> None:
    """``member`` makes its keys under ``root/keys`` and the custodian accepts them."""
    made = keyrequest.make_request(root / "keys", member, first=True)
    keyrequest.accept_request(custodian, made.path, expected_fingerprint=made.fingerprint)
    write_node_config(
        root, member, ["nats://127.0.0.1:1"], POLICY.format(member=member, partner=partner)
    )


def test_a_report_from_a_node_with_accepted_keys_reaches_its_partner(tmp_path: Path) -> None:
    custodian = tmp_path / "custodian"
    keyrequest.init_authority(custodian, audit=True, now=datetime.now(UTC) - timedelta(hours=1))
    roots = {m: tmp_path / m.lower() for m in ("GBR", "JPN")}
    join(custodian, roots["GBR"], "GBR", "JPN")
    join(custodian, roots["JPN"], "JPN", "GBR")
    for root in roots.values():
        for name in (keys.ROSTER_FILE, keys.ROSTER_SIG_FILE, keys.AUTHORITY_PUBLIC_FILE):
            shutil.copy(custodian / name, root / "keys" / name)
    # JPN has asked for new keys since; the custodian has not accepted them yet.
    waiting = keyrequest.make_request(roots["JPN"] / "keys", "JPN")
    assert not (custodian / "GBR").exists()
    assert not (custodian / "JPN").exists()

    gbr_config = load_config(roots["GBR"] / "nodes" / "GBR" / "node.toml", env={})
    jpn_config = load_config(roots["JPN"] / "nodes" / "JPN" / "node.toml", env={})
    with capture_logs() as logs:
        gbr = load_node(gbr_config)
        jpn = load_node(jpn_config)
    try:
        pending = [e for e in logs if e["event"] == "keys_pending"]
        assert len(pending) == 1
        assert pending[0]["kids"] == f"{waiting.enc_kid},{waiting.sig_kid}"
        record = records_for("GBR", 1, seed=7)[0]
        items = gbr.planner.envelopes(record["report_id"], json.dumps(record).encode())
        assert [i.partner for i in items] == ["JPN"]
        subject = f"from.GBR.{items[0].subject}"
        result = jpn.inbound.process([(subject, items[0].jwe)])
        assert result.actions == ["ack"]
        assert [r.report_id for r in result.stored] == [record["report_id"]]
        roster = keys_roster.load_signed_roster(custodian).roster
        now = datetime.now(UTC)
        assert result.stored[0].signing_kid == roster.current("GBR", "sig", now).kid
        # Not the pending request's key, which no partner could verify yet.
        assert roster.current("JPN", "enc", now).kid != waiting.enc_kid
    finally:
        for node in (gbr, jpn):
            node.store.close()
            node.audit.close()
