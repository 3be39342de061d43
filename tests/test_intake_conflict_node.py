"""A correction under an accepted report id, sent to a real node: answered, counted, audited."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from node_world import World, audit_entries, audit_rejections, await_for, msmt, records_for

from broker import samples
from broker.intake import ensure_token, read_token, submit

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


async def test_a_conflict_names_the_fields_only_to_the_feed_whose_version_was_accepted(
    world: World, tmp_path: Path
) -> None:
    # Named to any feed, the differing fields were an oracle: a second feed that knew
    # a report id recovered another feed's IMO number one guess a try.
    world.write_config("JPN")
    config = str(world.config_path("JPN"))
    tokens = {}
    for name in ("jpn-ais", "case-sys"):
        out = tmp_path / f"{name}.token"
        added = msmt("feeds", "add", name, "--config", config, "--out", str(out))
        assert added.returncode == 0, added.stderr
        tokens[name] = read_token(out)
    world.start("JPN")
    jpn = world.config("JPN")
    tokens["(shared)"] = ensure_token(jpn.token_path)

    async def send(feed: str, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        body = samples.to_ndjson(batch).encode()
        await submit(jpn.socket_path, tokens[feed], one_chunk(body), answers.append)
        return answers

    by_ais, by_spool = records_for("JPN", 2, seed=31)
    assert [a["status"] for a in await send("jpn-ais", [by_ais])] == ["accepted"]
    spooled = await spool_file(jpn.spool_path, "first.ndjson", [by_spool])
    assert [a["status"] for a in spooled] == ["accepted"]

    probe = samples.edited(by_ais, "observed_at", "2026-11-01T11:30:00Z")
    rid = by_ais["report_id"]
    (own,) = await send("jpn-ais", [probe])
    assert (own["reason"], own["fields"]) == ("conflict", ["observed_at"])
    assert own["detail"] == (
        f"report_id {rid} was accepted earlier with different content in observed_at;"
        " send a correction under a new report_id"
    )
    # Another named feed, the shared token and the spool: that it differs, not where.
    told = [
        *await send("case-sys", [probe]),
        *await send("(shared)", [probe]),
        *await spool_file(jpn.spool_path, "probe.ndjson", [probe]),
    ]
    for answer in told:
        assert answer == {
            "line": 1,
            "status": "rejected",
            "reason": "conflict",
            "report_id": rid,
            "detail": f"report_id {rid} was accepted earlier with different content;"
            " send a correction under a new report_id",
        }
    # The spool is a feed too: its own report's fields go to it, and not to a socket feed.
    changed = samples.edited(by_spool, "tlp", "RED" if by_spool["tlp"] != "RED" else "CLEAR")
    (again,) = await spool_file(jpn.spool_path, "again.ndjson", [changed])
    assert again["fields"] == ["tlp"]
    (other,) = await send("jpn-ais", [changed])
    assert other["reason"] == "conflict"
    assert "fields" not in other
    # Each is still audited as a conflict, in the shape AUDIT.md gives, whoever asked.
    await await_for(
        lambda: audit_rejections(jpn)["intake.conflict"] == 6, 20, "the audited conflicts"
    )
    with sqlite3.connect(f"file:{jpn.store_path}?mode=ro", uri=True) as db:
        stored = dict(db.execute("SELECT report_id, feed FROM reports").fetchall())
    assert stored == {rid: "socket:jpn-ais", by_spool["report_id"]: "spool"}


async def one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def spool_file(spool: Path, name: str, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move a batch into the spool as the contract says; its answers once it is filed."""
    tmp = spool / f".{name}"
    tmp.write_text(samples.to_ndjson(batch))
    tmp.rename(spool / name)
    found: list[Path] = []

    def filed() -> bool:
        found[:] = [spool / sub / f"{name}.result.ndjson" for sub in ("done", "rejected")]
        found[:] = [p for p in found if p.exists()]
        return bool(found)

    await await_for(filed, 20, f"{name} filed")
    return [json.loads(line) for line in found[0].read_text().splitlines()]
