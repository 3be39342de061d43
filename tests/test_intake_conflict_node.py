"""A correction under an accepted report id, sent to a real node: answered, counted, audited."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from node_world import World, audit_entries, audit_rejections, await_for, msmt, records_for

pytestmark = pytest.mark.integration


async def test_a_running_node_answers_conflict_for_other_content_under_an_accepted_id(
    world: World,
) -> None:
    world.write_config("JPN")
    world.start("JPN")
    records = records_for("JPN", 2, seed=11)
    first = await world.submit("JPN", records)
    assert [a["status"] for a in first] == ["accepted", "accepted"]
    changed = json.loads(json.dumps(records[1]))
    changed["tlp"] = "RED" if changed["tlp"] != "RED" else "CLEAR"
    again = await world.submit("JPN", [records[0], changed])
    assert [a["reason"] for a in again] == ["duplicate", "conflict"]
    assert again[1]["report_id"] == records[1]["report_id"]
    assert "different content" in again[1]["detail"]

    config = str(world.config_path("JPN"))

    def counters() -> dict[str, Any]:
        out = msmt("status", "--config", config, "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout)["counters"])

    await await_for(lambda: counters().get("intake.conflict") == 1, 20, "the conflict counter")
    assert counters().get("intake.duplicate") == 1
    jpn = world.config("JPN")
    await await_for(
        lambda: audit_rejections(jpn)["intake.conflict"] == 1, 20, "the audited rejection"
    )
    # The audited rejections name the report in their own field, as AUDIT.md lists it.
    entries = audit_entries(jpn.audit_dir)
    audited = {e["step"]: e["report_id"] for e in entries if e["type"] == "rejected"}
    assert audited == {
        "intake.duplicate": records[0]["report_id"],
        "intake.conflict": records[1]["report_id"],
    }
    # Only the first version is stored, to be signed and sent.
    uri = f"file:{jpn.store_path}?mode=ro"
    with sqlite3.connect(uri, uri=True) as db:
        (stored,) = db.execute(
            "SELECT record FROM reports WHERE report_id = ?", (records[1]["report_id"],)
        ).fetchone()
    assert json.loads(stored) == records[1]
