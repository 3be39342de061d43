"""The partners a node of a partial deployment follows: those its roster lists, not all eleven.

Real keys and a real node loaded from its files; nothing dials the hub.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from node_world import write_node_config

from broker import keys_custodian
from broker.config import load_config
from broker.node_start import load_node


def test_a_three_member_node_shows_only_its_partners_logs_as_witnessed(tmp_path: Path) -> None:
    # A 3-member deployment's status showed all eleven members under "witnessed", each
    # "not since the node last started", and exported the gauge for each: ten partners'
    # logs seemingly missing, which no node of the deployment will ever publish.
    now = datetime.now(UTC)
    keydir = tmp_path / "keys"
    keys_custodian.init_keys(keydir, ("JPN", "USA", "KOR"), now=now - timedelta(days=1))
    # A suspended member stays: its retired keys still verify its log's checkpoints.
    keys_custodian.suspend_member(keydir, "KOR")
    write_node_config(tmp_path, "JPN", ["nats://127.0.0.1:1"])
    node = load_node(load_config(tmp_path / "nodes" / "JPN" / "node.toml", env={}))
    try:
        assert sorted(node.auditnet.log_keys) == ["KOR", "USA"]
        assert json.loads(node._witnessed()) == {"KOR": "", "USA": ""}
        gauge = "msmt_witnessed_timestamp_seconds{"
        series = [x for x in node.metrics.render().decode().splitlines() if x.startswith(gauge)]
        assert series == [f'{gauge}log="{log}"}} 0.0' for log in ("USA", "KOR")], series
    finally:
        node.store.close()
        node.audit.close()
