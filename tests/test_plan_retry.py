"""A partner without a valid key waits; the report goes to the others at once.

USA's keys are rotated to new ones that start a few seconds from now (and its
current ones retire then), so until that moment USA has no encryption key valid
now: JPN's planner, in its worker process, plans the report for KOR and names
USA as waiting, and the node keeps that in its store. Nothing else is
submitted, so only the node's periodic look at waiting partners can plan USA's
envelope once its key is valid.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from node_world import BATCH_POLICY, World, await_for, content_of, expected_partners, records_for
from structlog.testing import capture_logs

import broker.planloop
from broker import keys_custodian
from broker.auditlog import DB_FILE
from broker.node import Node
from broker.node_start import load_node
from broker.store import Store
from broker.validation import parse_record

pytestmark = pytest.mark.integration

LEAD_S = 8
"""Seconds until USA's new keys are valid: time to start JPN and see the report held back."""
RETRY_S = 0.5
"""The shortened retry interval (the node's default is 30 s)."""


async def test_a_partner_without_a_key_waits_while_the_others_get_the_report(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world.write_config("JPN", BATCH_POLICY)
    usable_at = (datetime.now(UTC) + timedelta(seconds=LEAD_S)).replace(microsecond=0)
    keys_custodian.rotate_keys(world.keydir, "USA", now=usable_at)
    # Read when the node's reissue loop starts, so it looks every RETRY_S, not 60 s.
    monkeypatch.setattr(broker.planloop, "REISSUE_EVERY_S", RETRY_S)
    # A report the policy sends to both (a sample's markings may hold it back from some).
    policy = world.policy("JPN")
    record = next(
        r
        for r in records_for("JPN", 20, seed=8)
        if expected_partners(policy, parse_record(json.dumps(r))) == {"USA", "KOR"}
    )
    rid = record["report_id"]

    def store_facts() -> tuple[dict[str, Any], dict[str, int], int, dict[str, int]]:
        store = world.store("JPN")
        try:
            sent = {p: store.sent_to(p) for p in ("USA", "KOR")}
            # The state, and what msmt status shows of the outbox per partner.
            state: dict[str, Any] = {**store.state(), "outbox": store.outbox_by_partner()}
            return state, store.counters(), store.outbox_depth(), sent
        finally:
            store.close()

    def sent_entries() -> list[dict[str, Any]]:
        with sqlite3.connect(world.config("JPN").audit_dir / DB_FILE) as db:
            entries = [json.loads(r[0]) for r in db.execute("SELECT entry FROM entries")]
        return [e for e in entries if e["type"] == "sent"]

    def gauge(name: str) -> float | None:
        return node.metrics.registry.get_sample_value(name)

    with capture_logs() as logs:
        node = load_node(world.config("JPN"))
        task = asyncio.create_task(node.run())
        try:
            await await_for(lambda: node.ready() is None, 20, "JPN ready")
            answers = await world.submit("JPN", [record])
            assert [a["status"] for a in answers] == ["accepted"]

            # While USA has no valid key: the status shows USA's envelope waiting,
            # KOR has the report already, USA's envelope is not made yet.
            await await_for(
                lambda: store_facts()[0]["outbox"].get("USA", {}).get("awaiting_key") == 1,
                5,
                "USA's envelope waiting in the status",
            )
            await await_for(lambda: store_facts()[3]["KOR"] == 1, 10, "sent to KOR")
            _, _, depth, sent = store_facts()
            assert depth == 1  # USA's envelope, still to make
            # /metrics tells the wait apart from a backlog at the hub: an alert on the
            # depth less the waiting envelopes stays quiet for a partner without a key.
            await await_for(
                lambda: gauge("msmt_outbox_awaiting_key") == 1, 5, "the awaiting-key gauge"
            )
            assert gauge("msmt_outbox_depth") == 1
            assert sent == {"USA": 0, "KOR": 1}
            assert await world.stream_messages("USA") == 0
            assert await world.stream_messages("KOR") == 1
            assert [e["partner"] for e in sent_entries()] == ["KOR"]
            # Else the checks above ran after the cause was gone and proved nothing.
            assert datetime.now(UTC) < usable_at, "too slow to see USA wait"

            # No other accept: only the look at waiting partners can plan USA's.
            await await_for(
                lambda: store_facts()[3] == {"USA": 1, "KOR": 1},
                LEAD_S + 15,
                "the report planned and sent once USA's key is valid",
            )
            await asyncio.sleep(4 * RETRY_S)  # a second plan or send would show by now
            _, counters, depth, sent = store_facts()
            await await_for(
                lambda: gauge("msmt_outbox_awaiting_key") == 0, 5, "the gauge back at 0"
            )
        finally:
            node.stop.set()
            await task

    assert sent == {"USA": 1, "KOR": 1}
    assert depth == 0
    assert counters["intake.accepted"] == 1
    assert await world.stream_messages("USA") == 1
    assert await world.stream_messages("KOR") == 1
    entries = sent_entries()
    assert sorted((e["partner"], e["report_id"]) for e in entries) == [("KOR", rid), ("USA", rid)]
    at = {e["partner"]: datetime.fromisoformat(e["at"]) for e in entries}
    assert at["KOR"] < usable_at <= at["USA"]
    assert [e for e in logs if e["event"] == "envelopes_planned_for_waiting_partners"]
    # Said at start already, before any report: the policy names a partner without a key.
    (keyless,) = [e for e in logs if e["event"] == "partners_without_keys"]
    assert keyless["partners"] == "USA"
    # The wait was logged once (a minute), naming the report but none of its content,
    # as a warning: not an error of JPN's, so it never filled last_error.
    (waits,) = [e for e in logs if e["event"] == "reports_await_keys"]
    assert waits["log_level"] == "warning"
    assert (waits["partners"], waits["first_report"]) == ("USA", rid)
    assert waits["reasons"] == "USA has no active enc key valid now"
    assert not [e for e in logs if e["event"] == "node_error"]
    assert store_facts()[0].get("last_error", "") == ""
    rendered = [json.dumps(e, default=str) for e in logs]
    assert [v for v in content_of([record]) if any(v in line for line in rendered)] == []


async def test_a_policy_that_drops_waiting_envelopes_says_so_in_one_line(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A trial's group of three ran the eleven-member policies, then narrowed its own to
    # the members there were: the restart logged one not_planned line per report and
    # absent partner (77 at once). Here USA has no valid key for an hour, JPN accepts
    # reports for USA and KOR, and restarts with a policy that releases nothing to USA.
    world.write_config("JPN", BATCH_POLICY)
    keys_custodian.rotate_keys(world.keydir, "USA", now=datetime.now(UTC) + timedelta(hours=1))
    monkeypatch.setattr(broker.planloop, "REISSUE_EVERY_S", RETRY_S)
    policy = world.policy("JPN")
    records = [
        r
        for r in records_for("JPN", 40, seed=8)
        if expected_partners(policy, parse_record(json.dumps(r))) == {"USA", "KOR"}
    ][:5]
    assert len(records) == 5

    def waiting_for_usa() -> int:
        store = world.store("JPN")
        try:
            return int(store.outbox_by_partner().get("USA", {}).get("awaiting_key", 0))
        finally:
            store.close()

    node = load_node(world.config("JPN"))
    task = asyncio.create_task(node.run())
    try:
        await await_for(lambda: node.ready() is None, 20, "JPN ready")
        answers = await world.submit("JPN", records)
        assert [a["status"] for a in answers] == ["accepted"] * 5
        await await_for(lambda: waiting_for_usa() == 5, 10, "five envelopes waiting for USA")
    finally:
        node.stop.set()
        await task

    narrowed = BATCH_POLICY.replace('partners = ["USA", "KOR"]', 'partners = ["KOR"]')
    (world.config_path("JPN").parent / "policy.toml").write_text(narrowed)
    with capture_logs() as logs:
        node = load_node(world.config("JPN"))
        task = asyncio.create_task(node.run())
        try:
            await await_for(lambda: waiting_for_usa() == 0, 10, "the waiting envelopes dropped")
            await asyncio.sleep(4 * RETRY_S)  # a second pass would log again by now
        finally:
            node.stop.set()
            await task
    # The node closed its own connection at the stop: no "lost, reconnecting" warning.
    assert [e["event"] for e in logs if e["event"].startswith("node_stop")] == [
        "node_stopping",
        "node_stopped",
    ]
    assert not [e for e in logs if e["event"] == "nats_disconnected"]
    (line,) = [e for e in logs if e["event"] == "not_planned"]
    assert line["log_level"] == "warning"
    assert (line["envelopes"], line["reports"], line["partners"]) == (5, 5, "USA")
    assert line["first_report"] in {r["report_id"] for r in records}


async def test_a_resend_to_a_partner_without_a_key_waits_and_is_not_an_error(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An onboarding trial: after msmt node resend, a partner without a valid key made
    # the node's signing-again pass say "cannot sign again: USA has no active enc key
    # valid now" in last_error, as a node_error, for as long as USA had none; at
    # planning the same wait is a warning (KEYS.md: not this node's error).
    world.write_config("JPN", BATCH_POLICY)
    monkeypatch.setattr(broker.planloop, "REISSUE_EVERY_S", RETRY_S)
    policy = world.policy("JPN")
    record = next(
        r
        for r in records_for("JPN", 20, seed=8)
        if expected_partners(policy, parse_record(json.dumps(r))) == {"USA", "KOR"}
    )
    rid = record["report_id"]
    world.start("JPN")
    assert [a["status"] for a in await world.submit("JPN", [record])] == ["accepted"]
    await await_for(lambda: world.outbox_depth("JPN") == 0, 20, "JPN to send")
    assert world.terminate("JPN") == 0
    # USA's keys now start later: it has none valid now. JPN is asked to send again.
    keys_custodian.rotate_keys(world.keydir, "USA", now=datetime.now(UTC) + timedelta(hours=1))
    store = Store(world.config("JPN").store_path)  # as msmt node resend does
    try:
        assert store.queue_resend("USA", report_ids=[rid]) == (1, [])
    finally:
        store.close()
    with capture_logs() as logs:
        node = load_node(world.config("JPN"))
        task = asyncio.create_task(node.run())
        try:
            await await_for(lambda: node.ready() is None, 20, "JPN ready")
            await await_for(
                lambda: any(e["event"] == "reports_await_keys" for e in logs), 10, "the wait said"
            )
            await asyncio.sleep(4 * RETRY_S)  # more passes, each of which set last_error
        finally:
            node.stop.set()
            await task
    (waits,) = [e for e in logs if e["event"] == "reports_await_keys"]
    assert (waits["log_level"], waits["partners"]) == ("warning", "USA")
    assert waits["reasons"] == "USA has no active enc key valid now"
    assert not [e for e in logs if e["event"] == "node_error"]
    store = world.store("JPN")
    try:
        assert store.reissue_count() == 1  # still queued, for when USA has a key
        assert store.state().get("last_error", "") == ""
    finally:
        store.close()


def _five_vessels_for_a_suspended_usa(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> list[dict[str, Any]]:
    """USA suspended and waiting reports looked at every RETRY_S: 5 vessels JPN sends both."""
    world.write_config("JPN", BATCH_POLICY)
    keys_custodian.suspend_member(world.keydir, "USA")
    monkeypatch.setattr(broker.planloop, "REISSUE_EVERY_S", RETRY_S)
    policy = world.policy("JPN")
    records = [
        r
        for r in records_for("JPN", 60, seed=9)
        if r["kind"] == "vessel"
        and expected_partners(policy, parse_record(json.dumps(r))) == {"USA", "KOR"}
    ][:5]
    assert len(records) == 5
    return records


async def test_reports_awaiting_a_partner_with_no_key_are_not_planned_again_each_pass(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review of suspending a member: each pass (every minute) signed and encrypted
    # every report waiting for it, for every partner, only to find it still had no
    # key: 16 s of CPU a minute for 10,000 reports, growing with the backlog.
    records = _five_vessels_for_a_suspended_usa(world, monkeypatch)
    node = load_node(world.config("JPN"))
    planned: list[int] = []  # rows in each call to the worker
    looked: list[int] = []  # reports read back as awaiting a key, each pass
    plan, awaiting = node._plans.plan, node.store.awaiting

    async def counted_plan(rows: list[tuple[str, bytes]], limit: int) -> Any:
        planned.append(len(rows))
        return await plan(rows, limit)

    def counted_awaiting(limit: int, without: frozenset[str] = frozenset()) -> Any:
        found = awaiting(limit, without)
        looked.append(len(found))
        return found

    monkeypatch.setattr(node._plans, "plan", counted_plan)
    monkeypatch.setattr(node.store, "awaiting", counted_awaiting)
    task = asyncio.create_task(node.run())
    try:
        await await_for(lambda: node.ready() is None, 20, "JPN ready")
        answers = await world.submit("JPN", records)
        assert {a["status"] for a in answers} == {"accepted"}
        await await_for(lambda: node.store.outbox_depths()[1] == 5, 10, "USA's 5 waiting")
        before, passes = len(planned), len(looked)
        await await_for(lambda: len(looked) >= passes + 3, 20, "three more passes")
    finally:
        node.stop.set()
        await task
    assert sum(planned) == 5  # planned once, when accepted: for KOR, and USA waiting
    assert len(planned) == before
    assert looked[passes:] == [0] * (len(looked) - passes)  # USA's reports not even read


async def test_a_new_policy_drops_what_waited_for_a_keyless_partner_it_no_longer_sends_to(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review of the keyless filter above: vessels waiting for a suspended USA
    # stayed waiting after a policy edit that sends vessels to KOR only (USA still
    # named, for workers), counted in the outbox for ever.
    records = _five_vessels_for_a_suspended_usa(world, monkeypatch)

    async def run_until(done: Callable[[Node], bool], what: str) -> list[MutableMapping[str, Any]]:
        node = load_node(world.config("JPN"))
        with capture_logs() as logs:
            task = asyncio.create_task(node.run())
            try:
                await await_for(lambda: node.ready() is None, 20, "JPN ready")
                await await_for(lambda: done(node), 20, what)
            finally:
                node.stop.set()
                await task
        return logs

    node = load_node(world.config("JPN"))
    task = asyncio.create_task(node.run())
    try:
        await await_for(lambda: node.ready() is None, 20, "JPN ready")
        assert {a["status"] for a in await world.submit("JPN", records)} == {"accepted"}
        await await_for(lambda: node.store.outbox_depths()[1] == 5, 10, "USA's 5 waiting")
    finally:
        node.stop.set()
        await task
    world.write_config(
        "JPN",
        'version = 1\nmember = "JPN"\n\n[[rules]]\nname = "kor"\nkinds = ["*"]\n'
        'partners = ["KOR"]\nrelease = ["*"]\n\n[[rules]]\nname = "usa-workers"\n'
        'kinds = ["worker"]\npartners = ["USA"]\nrelease = ["*"]\n',
    )
    logs = await run_until(lambda n: n.store.outbox_depths()[1] == 0, "USA's waits dropped")
    (dropped,) = [e for e in logs if e["event"] == "not_planned"]
    assert (dropped["envelopes"], dropped["partners"]) == (5, "USA")
