"""A plan batch whose commit fails (a full disk) is planned again and sent exactly once.

JPN's store fills up at the moment the first plan batch is committed: a real
``SQLITE_FULL`` inside ``Store.plan``, on the store's own connection and thread.
The reports stay unplanned, the error reaches the status, and with no further
accept to wake it the plan loop retries on its own, after which every partner
gets every report once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import pytest
from node_world import BATCH_POLICY, World, await_for

from broker.auditlog import DB_FILE
from broker.errors import StoreError
from broker.node_start import load_node
from broker.store import OutboxItem

pytestmark = pytest.mark.integration

PARTNERS = ("USA", "KOR")


async def test_a_plan_commit_that_fails_is_retried_and_sends_each_report_once(
    world: World,
) -> None:
    world.write_config("JPN", BATCH_POLICY)
    records = world.records_released_to("JPN", PARTNERS, 5, seed=12)
    ids = sorted(str(r["report_id"]) for r in records)

    node = load_node(world.config("JPN"))
    real_plan = node.store.plan
    failures: list[str] = []

    def plan_on_a_full_disk_once(
        plans: Mapping[str, Sequence[OutboxItem]],
        waiting: Mapping[str, Mapping[str, str]] = MappingProxyType({}),
    ) -> list[OutboxItem] | None:
        if failures:
            return real_plan(plans, waiting)
        # Runs on the store's thread, so nothing else writes meanwhile: cap the
        # file at its current size, let the real commit fail, then lift the cap.
        db: sqlite3.Connection = node.store._db  # the fault is injected below the API
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count={int(pages)}")
        try:
            real_plan(plans, waiting)
        except StoreError as exc:
            failures.append(str(exc))
            raise
        finally:
            db.execute("PRAGMA max_page_count=4294967294")
        raise AssertionError("the commit should have failed on a full file")

    node.store.plan = plan_on_a_full_disk_once  # type: ignore[method-assign]

    def sent_entries() -> list[dict[str, Any]]:
        with sqlite3.connect(world.config("JPN").audit_dir / DB_FILE) as db:
            entries = [json.loads(r[0]) for r in db.execute("SELECT entry FROM entries")]
        return [e for e in entries if e["type"] == "sent"]

    def last_error() -> str | None:
        store = world.store("JPN")
        try:
            return store.state().get("last_error")
        finally:
            store.close()

    task = asyncio.create_task(node.run())
    try:
        await await_for(lambda: node.ready() is None, 20, "JPN ready")
        answers = await world.submit("JPN", records)
        assert [a["status"] for a in answers] == ["accepted"] * 5
        # No other accept follows: only the loop's own retry can plan them now.
        await await_for(lambda: bool(failures), 10, "the first plan commit to fail")
        await await_for(
            lambda: last_error() == f"planning: {failures[0]}", 10, "the error in the status"
        )
        await await_for(
            lambda: world.sent_counts("JPN", PARTNERS) == dict.fromkeys(PARTNERS, 5),
            20,
            "all sent after the retry",
        )
        await asyncio.sleep(2)  # a second plan or send would show by now
    finally:
        node.stop.set()
        await task

    assert len(failures) == 1
    assert "database or disk is full" in failures[0]
    store = world.store("JPN")
    try:
        assert store.outbox_depth() == 0
        assert {p: store.sent_to(p) for p in PARTNERS} == dict.fromkeys(PARTNERS, 5)
    finally:
        store.close()
    for partner in PARTNERS:
        assert await world.stream_messages(partner) == 5
    entries = sent_entries()
    assert sorted((e["partner"], e["report_id"]) for e in entries) == sorted(
        (p, rid) for p in PARTNERS for rid in ids
    )
