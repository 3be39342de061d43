"""A node whose clock is far off the hub's takes nothing from its inbox until it is right.

Its freshness check would judge partners' reports by the wrong time: 6 minutes
behind, it refused every report a partner signed as "issued in the future" (a
trial; 1 day ahead, every one as too old), and a refusal is final, with nothing
to tell the senders. So the reports wait at the hub. A real hub, USA as a
``msmt node run`` process (its own, right clock), JPN in process with its clock
moved through the seam the clock check reads (``broker.hubwatch.wall_clock``).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from node_world import (
    USA_TO_JPN,
    World,
    audit_rejections,
    await_for,
    expected_partners,
    records_for,
)
from structlog.testing import capture_logs

import broker.node_housekeeping as housekeeping_module
from broker import hubwatch
from broker.node_start import load_node
from broker.validation import parse_record

PAUSED_FOR_CLOCK = "inbox paused: this node's clock is too far off the hub's (msmt status)"


async def test_a_clock_far_behind_the_hubs_pauses_the_inbox_and_loses_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.write_config("JPN")
    world.write_config("USA", USA_TO_JPN)
    world.start("USA")
    real = hubwatch.wall_clock
    with capture_logs() as logs:
        jpn = load_node(world.config("JPN"))
        jpn_task = asyncio.create_task(jpn.run())
        try:
            await await_for(lambda: jpn.ready() is None, 30, "JPN ready")
            monkeypatch.setattr(hubwatch, "wall_clock", lambda: real() - 600)
            await await_for(lambda: jpn.ready() == PAUSED_FOR_CLOCK, 20, "JPN's pause")
            await await_for(
                lambda: (
                    "clock is 600 s behind the hub's, too far off"
                    in world.state("JPN").get("inbox_paused", "")
                ),
                10,
                "JPN's status",
            )
            assert world.state("JPN")["clock_offset"] in {"-601", "-600", "-599"}
            records = records_for("USA", 10, seed=83)
            answers = await world.submit("USA", records)
            assert {a["status"] for a in answers} == {"accepted"}
            usa_policy = world.policy("USA")
            to_jpn = sorted(
                r["report_id"]
                for r in records
                if "JPN" in expected_partners(usa_policy, parse_record(json.dumps(r)))
            )
            assert len(to_jpn) > 5
            for _ in range(300):  # sent by USA: at the hub, for JPN
                if await world.stream_messages("JPN") == len(to_jpn):
                    break
                await asyncio.sleep(0.1)
            assert await world.stream_messages("JPN") == len(to_jpn)
            await asyncio.sleep(2)  # JPN had time to take them, were it not paused
            assert world.inbox_ids("JPN", "USA") == []

            monkeypatch.setattr(hubwatch, "wall_clock", real)  # NTP sets it right
            await await_for(lambda: jpn.ready() is None, 20, "JPN resumed")
            await await_for(
                lambda: sorted(world.inbox_ids("JPN", "USA")) == to_jpn, 30, "every report"
            )
            await await_for(
                lambda: world.state("JPN").get("inbox_paused") == "", 10, "JPN's status"
            )
        finally:
            jpn.stop.set()
            await jpn_task
    assert world.terminate("USA") == 0
    assert audit_rejections(world.config("JPN")) == Counter()  # nothing refused, ever
    events = [e["event"] for e in logs]
    assert events.count("inbox_paused") == 1  # once a minute; this pause lasted less
    assert events.count("inbox_resumed") == 1


async def test_a_clock_far_ahead_of_the_hubs_holds_the_outbox_until_it_is_right(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Partners refuse a report issued more than 5 minutes in their future, and
    # the refusal never reaches the sender (a trial: 6 minutes ahead, every
    # report lost until ``msmt node resend``). So nothing is published while the
    # clock is off; once it is right, what was signed in the future is signed
    # again first (Store.queue_stale), then everything goes out.
    world.write_config("USA", USA_TO_JPN)
    real = hubwatch.wall_clock
    usa = load_node(world.config("USA"))
    task = asyncio.create_task(usa.run())
    try:
        await await_for(lambda: usa.ready() is None, 30, "USA ready")
        monkeypatch.setattr(hubwatch, "wall_clock", lambda: real() + 600)
        await await_for(lambda: usa.ready() == PAUSED_FOR_CLOCK, 20, "USA's pause")
        records = records_for("USA", 10, seed=84)
        answers = await world.submit("USA", records)
        assert {a["status"] for a in answers} == {"accepted"}
        usa_policy = world.policy("USA")
        to_jpn = [
            r
            for r in records
            if "JPN" in expected_partners(usa_policy, parse_record(json.dumps(r)))
        ]
        assert len(to_jpn) > 5
        await await_for(lambda: usa.store.outbox_depth() == len(to_jpn), 20, "the envelopes")
        await asyncio.sleep(2)  # time to publish them, were it not held
        assert usa.store.outbox_depth() == len(to_jpn)
        assert await world.stream_messages("JPN") == 0

        monkeypatch.setattr(hubwatch, "wall_clock", real)  # NTP sets it right
        await await_for(lambda: usa.store.outbox_depth() == 0, 30, "every envelope sent")
        assert await world.stream_messages("JPN") == len(to_jpn)
    finally:
        usa.stop.set()
        await task
    assert usa.failure is None


async def test_a_step_of_the_clock_is_compared_with_the_hubs_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between two comparisons (5 s apart) the inbox would judge, and the outbox
    # sign, by a stepped clock. A step shows as a change of the clock against the
    # monotonic one, seen at the next housekeeping tick: compared again at once.
    world.write_config("JPN")
    real = hubwatch.wall_clock
    jpn = load_node(world.config("JPN"))
    task = asyncio.create_task(jpn.run())
    try:
        await await_for(lambda: jpn.ready() is None, 30, "JPN ready")
        await await_for(lambda: jpn.hub.clock_offset == "+0", 20, "a first comparison")
        monkeypatch.setattr(hubwatch, "LAG_EVERY_S", 3600.0)  # no routine comparison
        monkeypatch.setattr(hubwatch, "wall_clock", lambda: real() + 86_400)
        await await_for(lambda: jpn.ready() == PAUSED_FOR_CLOCK, 20, "JPN's pause")
        assert jpn.hub.clock_offset in {"+86399", "+86400", "+86401"}
        monkeypatch.setattr(hubwatch, "wall_clock", real)  # and back
        await await_for(lambda: jpn.ready() is None, 20, "JPN resumed")
        assert jpn.hub.clock_offset in {"-1", "+0", "+1"}
    finally:
        jpn.stop.set()
        await task
    assert jpn.failure is None


async def test_the_clock_is_compared_with_the_hubs_as_soon_as_the_node_connects(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver waits for that comparison (up to 10 s), and /readyz for the
    # receiver: they waited for the housekeeping loop's next round, up to a second
    # after connecting, in every node start. With the rounds an hour apart here, a
    # comparison that waited for one would never come, and the status would not say
    # "connected" either: the round before the connection wrote it.
    monkeypatch.setattr(housekeeping_module, "HOUSEKEEPING_S", 3600.0)
    world.write_config("JPN")
    jpn = load_node(world.config("JPN"))
    task = asyncio.create_task(jpn.run())
    try:
        await await_for(lambda: jpn.ready() is None, 8, "JPN ready, before the 10 s wait ends")
        await await_for(lambda: world.state("JPN").get("connected") == "yes", 5, "JPN's status")
        offset = world.state("JPN")["clock_offset"]
    finally:
        jpn.stop.set()
        await task
    assert jpn.failure is None
    assert offset in {"-1", "+0", "+1"}
