"""Signing envelopes again, so that nothing waits past a partner's freshness window and is lost.

Against a real nats-server, with JPN and USA running in this process:

* a partner away longer than its window refuses what waited for it (``freshness``);
  ``msmt node resend`` queues those envelopes, and the node's next run signs
  them again and delivers them;
* envelopes left pending for half the window (the hub unreachable) are signed
  again before they go out, without an operator.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from node_world import (
    World,
    audit_entries,
    audit_rejections,
    await_for,
    expected_partners,
    msmt,
    records_for,
)
from structlog.testing import capture_logs

import broker.hubwatch
import broker.planloop
from broker.cli import main
from broker.config import load_config
from broker.inbound_base import REFUSALS_LOGGED_PER_MINUTE
from broker.node import Node
from broker.node_start import load_node
from broker.planloop import REISSUE_EVERY_S, reissue_interval
from broker.store import Store
from broker.store_inbox import utc_day
from broker.validation import parse_record

pytestmark = pytest.mark.integration

PAIR = ("JPN", "USA")


def configured_pair(world: World, count: int, seed: int) -> tuple[list[dict[str, Any]], set[str]]:
    """JPN's and USA's node folders; ``count`` JPN reports and the ids of those USA gets."""
    for member in PAIR:
        world.write_config(member)
    records = records_for("JPN", count, seed=seed)
    policy = world.policy("JPN")
    to_usa = {
        r["report_id"]
        for r in records
        if "USA" in expected_partners(policy, parse_record(json.dumps(r)))
    }
    assert to_usa
    return records, to_usa


def sends_to_usa(world: World) -> list[dict[str, Any]]:
    entries = audit_entries(world.config("JPN").audit_dir)
    return [e for e in entries if e["type"] == "sent" and e["partner"] == "USA"]


def replay_pair(world: World) -> tuple[int, dict[str, Any]]:
    dirs = [str(world.config(m).audit_dir) for m in PAIR]
    args = ["audit", "replay", *dirs, "--keys", str(world.keydir), "--json"]
    result = CliRunner().invoke(main, [*args, "--policies", str(world.root / "nodes")])
    return result.exit_code, json.loads(result.stdout)


async def run_pair(world: World, nodes: dict[str, Node]) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(n.run()) for n in nodes.values()]
    await await_for(lambda: all(n.ready() is None for n in nodes.values()), 20, "ready")
    return tasks


async def stop_pair(nodes: dict[str, Node], tasks: list[asyncio.Task[None]]) -> None:
    for node in nodes.values():
        node.stop.set()
    await asyncio.gather(*tasks)


async def test_reports_a_partner_refused_as_too_old_reach_it_after_msmt_node_resend(
    world: World,
) -> None:
    records, to_usa = configured_pair(world, 8, seed=31)
    since = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    jpn_config = str(world.config_path("JPN"))

    nodes = {m: load_node(world.config(m)) for m in PAIR}
    # USA was away longer than its freshness window: all that waited for it is too old.
    nodes["USA"].inbound.freshness = timedelta(seconds=-1)
    tasks = await run_pair(world, nodes)
    try:
        with capture_logs() as refusals:
            answers = await world.submit("JPN", records)
            assert [a["status"] for a in answers] == ["accepted"] * len(records)
            await await_for(
                lambda: audit_rejections(world.config("USA"))["freshness"] == len(to_usa),
                30,
                "USA refusing every report as too old",
            )
        assert world.inbox_ids("USA", "JPN") == []
        # The command changes the outbox, which the running node owns.
        busy = await asyncio.to_thread(
            msmt, "node", "resend", "--config", jpn_config, "--to", "USA", "--since", since
        )
        assert busy.returncode == 2
        assert busy.stderr.startswith("msmt: error: stop the node first: store ")
        assert len(busy.stderr.splitlines()) == 1
    finally:
        await stop_pair(nodes, tasks)
    # USA's operator can tell JPN's which reports to send again: the log names them.
    named = {e.get("report_id") for e in refusals if e["event"] == "inbound_rejected"}
    assert named == to_usa
    first = {e["report_id"]: e["jwe_sha256"] for e in sends_to_usa(world)}
    assert set(first) == to_usa
    # The auditor (and JPN's operator) can list what USA never got, and why.
    code, lost = replay_pair(world)
    assert code == 0
    assert lost["findings"] == []
    assert sorted(lost["never_delivered"], key=lambda e: e["report_id"]) == [
        {"sender": "JPN", "recipient": "USA", "report_id": rid, "refused_at": "freshness"}
        for rid in sorted(to_usa)
    ]

    queued = msmt("node", "resend", "--config", jpn_config, "--to", "usa", "--since", since)
    assert queued.returncode == 0, queued.stderr
    assert queued.stdout.startswith(f"{len(to_usa)} envelopes to USA queued")
    # Asked twice before the node runs: the same envelopes, queued once, counted again.
    again = msmt("node", "resend", "--config", jpn_config, "--to", "USA", "--since", since)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"{len(to_usa)} envelopes to USA queued")

    nodes = {m: load_node(world.config(m)) for m in PAIR}
    tasks = await run_pair(world, nodes)
    try:
        await await_for(
            lambda: set(world.inbox_ids("USA", "JPN")) == to_usa, 30, "every report at USA"
        )
    finally:
        await stop_pair(nodes, tasks)

    # Each report went out twice, as two different envelopes, both in JPN's log:
    # USA's log refused the first and received the second.
    sends = sends_to_usa(world)
    assert Counter(e["report_id"] for e in sends) == dict.fromkeys(to_usa, 2)
    second = {
        e["report_id"]: e["jwe_sha256"] for e in sends if e["jwe_sha256"] != first[e["report_id"]]
    }
    assert set(second) == to_usa
    usa_log = audit_entries(world.config("USA").audit_dir)
    refused = {e["jwe_sha256"] for e in usa_log if e["type"] == "rejected"}
    received = {e["jwe_sha256"] for e in usa_log if e["type"] == "received"}
    assert refused == set(first.values())
    assert received == set(second.values())
    store = world.store("JPN")
    try:
        assert store.reissue_count() == 0
        assert store.outbox_depth() == 0
    finally:
        store.close()

    # The auditor sees both: each first send refused, each second delivered, and no finding.
    code, replay = replay_pair(world)
    assert code == 0
    assert replay["findings"] == []
    assert replay["never_delivered"] == []
    statuses = Counter(
        (e["report_id"] in to_usa, e["status"], e["refused_at"])
        for e in replay["exchanges"]
        if e["recipient"] == "USA"
    )
    assert statuses == {
        (True, "rejected", "freshness"): len(to_usa),
        (True, "delivered", None): len(to_usa),
    }

    # Nothing in range now: exit 1, and a word on what was not looked at.
    nothing = msmt(
        "node", "resend", "--config", jpn_config, "--to", "USA",
        "--since", datetime.now(UTC).isoformat(),
    )  # fmt: skip
    assert nothing.returncode == 1
    assert nothing.stdout.startswith("0 envelopes to USA queued")
    assert nothing.stderr == "(envelopes to USA that the hub has not acked yet still go out)\n"
    # Reports without an envelope to USA: each named on stderr, with why; exit 1.
    (withheld, *_) = [r["report_id"] for r in records if r["report_id"] not in to_usa]
    unknown = "00000000-0000-4000-8000-000000000001"
    (sent, *_) = sorted(to_usa)
    some = msmt(
        "node", "resend", "--config", jpn_config, "--to", "USA",
        "--report", sent, "--report", withheld, "--report", unknown,
    )  # fmt: skip
    assert some.returncode == 1
    assert some.stdout.startswith("1 envelopes to USA queued")
    assert some.stderr.splitlines() == [
        f"report {withheld}: no envelope to USA (its policy released nothing of it to USA)",
        f"report {unknown}: no envelope to USA (no report with this id was accepted here)",
    ]


async def test_reports_past_the_senders_daily_budget_are_refused_then_reach_it_after_resend(
    world: World,
) -> None:
    # An insider trial's partner grew a receiver's store by 1.3 GB in 45 s with valid
    # reports padded to the cap. USA's operator sets a budget per sender and UTC day
    # (here from the environment, the smallest it takes): JPN's reports past it are
    # refused before decryption, audited and named, and are not lost: with the limit
    # raised, ``msmt node resend`` delivers them.
    records, to_usa = configured_pair(world, 120, seed=41)
    since = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    limit = 65_536
    # The budget may not be less than the largest message the node takes.
    env = {"MSMT_SENDER_BYTES_PER_DAY": str(limit), "MSMT_MAX_MESSAGE_BYTES": str(limit)}
    usa = load_config(world.config_path("USA"), env=env)
    assert usa.limits.sender_bytes_per_day == limit
    nodes = {"JPN": load_node(world.config("JPN")), "USA": load_node(usa)}
    tasks = await run_pair(world, nodes)
    try:
        with capture_logs() as logs:
            answers = await world.submit("JPN", records)
            assert [a["status"] for a in answers] == ["accepted"] * len(records)

            def decided() -> int:
                got = audit_rejections(world.config("USA"))["budget"]
                return got + len(world.inbox_ids("USA", "JPN"))

            await await_for(lambda: decided() == len(to_usa), 30, "USA deciding each report")
        budget, metrics = nodes["USA"].inbound.budget, nodes["USA"].metrics

        def gauge() -> str:  # as the node's housekeeping sets it, each second
            return f'msmt_sender_budget_used_ratio{{sender="JPN"}} {budget.used["JPN"] / limit}'

        await await_for(lambda: gauge() in metrics.render().decode(), 10, "the gauge set")
        shown = metrics.render().decode()
    finally:
        await stop_pair(nodes, tasks)
    stored = set(world.inbox_ids("USA", "JPN"))
    refused = to_usa - stored
    assert stored
    assert refused  # 120 sample reports' envelopes take more than 64 KiB
    store = world.store("USA")
    try:
        envelopes = [store.kept_envelope("JPN", rid) for rid in stored]
        today = store.sender_bytes(utc_day(time.time()))
        counters = store.counters()
    finally:
        store.close()
    kept = [jwe for jwe in envelopes if jwe is not None]
    assert len(kept) == len(stored)  # each stored report keeps its envelope
    spent = sum(map(len, kept))
    assert today == {"JPN": spent}
    assert limit - max(map(len, kept)) < spent <= limit
    assert counters["rejected.budget"] == len(refused)
    ratio = spent / limit
    assert f'msmt_sender_budget_used_ratio{{sender="JPN"}} {ratio}' in shown
    assert 'msmt_sender_budget_used_ratio{sender="KOR"} 0.0' in shown
    # Each refusal told names the report, so JPN's operator can send it again; past
    # the 60 of a minute they are counted (a flood must not flood the log either).
    told = min(len(refused), REFUSALS_LOGGED_PER_MINUTE)
    lines = [e for e in logs if e["event"] == "inbound_rejected"]
    assert len(lines) == told
    assert {e["claimed_report_id"] for e in lines} <= refused
    assert {e["step"] for e in lines} == {"budget"}
    assert all("limits.sender_bytes_per_day" in e["reason"] for e in lines)
    usa_log = audit_entries(world.config("USA").audit_dir)
    assert [e["step"] for e in usa_log if e["type"] == "rejected"] == ["budget"] * told
    folded = [e["steps"] for e in usa_log if e["type"] == "rejected_many"]
    assert sum(n["budget"] for n in folded) == len(refused) - told
    status = json.loads(msmt("status", "--config", str(world.config_path("USA")), "--json").stdout)
    assert status["bytes_today"] == {"JPN": spent}
    # What the node ran with (its environment's), not what this command's would say.
    assert status["sender_budget"] == (
        f"{limit}; this configuration says {1 << 30}: restart the node to apply it"
    )

    # The limit raised (the default: 1 GiB) and the node restarted; JPN sends again.
    queued = msmt(
        "node", "resend", "--config", str(world.config_path("JPN")), "--to", "USA", "--since", since
    )  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    nodes = {m: load_node(world.config(m)) for m in PAIR}
    tasks = await run_pair(world, nodes)
    try:
        await await_for(
            lambda: set(world.inbox_ids("USA", "JPN")) == to_usa, 30, "every report at USA"
        )
    finally:
        await stop_pair(nodes, tasks)
    code, replay = replay_pair(world)
    assert code == 0
    assert replay["findings"] == []
    assert replay["never_delivered"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "JPN", "--since", "2026-12-01T00:00:00Z"], "--to: 'JPN' is not a partner of JPN"),
        (["--to", "XYZ", "--since", "2026-12-01T00:00:00Z"], "--to: 'XYZ' is not a partner of JPN"),
        (["--to", "USA"], "give either --since (a time range) or --report (report ids)"),
        (
            ["--to", "USA", "--since", "2026-12-01T00:00:00Z", "--report", "r"],
            "give either --since (a time range) or --report (report ids)",
        ),
        (
            ["--to", "USA", "--report", "r"],
            "--report 'r' is not a report id (a lower-case UUID, not the nil or the max UUID)",
        ),
        (
            ["--to", "USA", "--report", "00000000-0000-0000-0000-000000000000"],
            "--report '00000000-0000-0000-0000-000000000000' is not a report id (a lower-case"
            " UUID, not the nil or the max UUID)",
        ),
        (
            ["--to", "USA", "--until", "2026-12-01T00:00:00Z", "--report", "r"],
            "--until needs --since",
        ),
        (["--to", "USA", "--since", "yesterday"], "--since 'yesterday' is not an RFC 3339 time"),
        (
            ["--to", "USA", "--since", "2026-12-02T00:00:00Z", "--until", "2026-12-01T00:00:00Z"],
            "--until 2026-12-01T00:00:00Z is not after --since 2026-12-02T00:00:00Z",
        ),
        (
            ["--to", "USA", "--since", "2026-12-01T00:00:00"],
            "--since '2026-12-01T00:00:00' needs a time zone, e.g. 2026-11-01T00:00:00Z",
        ),
    ],
)
def test_resend_refuses_a_bad_request_with_one_line(
    world: World, args: list[str], message: str
) -> None:
    world.write_config("JPN")
    Store(world.config("JPN").store_path).close()  # a node that has run once
    done = msmt("node", "resend", "--config", str(world.config_path("JPN")), *args)
    assert (done.returncode, done.stderr) == (2, f"msmt: error: {message}\n")


async def test_envelopes_pending_for_half_the_freshness_window_are_signed_again_then_sent(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    records, to_usa = configured_pair(world, 6, seed=32)
    jpn = world.config("JPN")
    monkeypatch.setattr(broker.planloop, "REISSUE_EVERY_S", 0.2)

    def pending_to_usa() -> dict[str, str]:
        store = world.store("JPN")
        try:
            return {i.report_id: i.jwe_sha256 for i in store.pending(100) if i.partner == "USA"}
        finally:
            store.close()

    nodes = {m: load_node(world.config(m)) for m in PAIR}
    tasks = await run_pair(world, nodes)
    try:
        world.server.kill()  # the hub is unreachable for a long time
        await world.submit("JPN", records)
        await await_for(lambda: set(pending_to_usa()) == to_usa, 30, "envelopes pending")
        before = pending_to_usa()
        await asyncio.sleep(1.0)  # several passes: none is due yet
        assert pending_to_usa() == before
        # Half the window later, to the whole second: envelopes signed over a second
        # ago (these) are stale, and any signed from now on are not. The planning
        # worker's clock is not moved, so new envelopes are signed at the real time.
        real = broker.hubwatch.wall_clock
        later = math.floor(real()) + jpn.limits.freshness_seconds / 2
        monkeypatch.setattr(broker.hubwatch, "wall_clock", lambda: later)

        def all_signed_again() -> bool:
            now = pending_to_usa()
            return set(now) == to_usa and all(now[r] != before[r] for r in to_usa)

        await await_for(all_signed_again, 30, "every pending envelope signed again")
        again = pending_to_usa()
        await asyncio.sleep(1.0)
        assert pending_to_usa() == again  # signed at the real time: not stale
        # The hub's clock is not moved: compared with it, a node this far off pauses
        # (test_node_clock.py). The real time again, as for the hub.
        monkeypatch.setattr(broker.hubwatch, "wall_clock", real)
        world.server.start()
        await await_for(
            lambda: set(world.inbox_ids("USA", "JPN")) == to_usa, 60, "every report at USA"
        )
    finally:
        await stop_pair(nodes, tasks)
    # Only the new envelopes went out: the log's sends are exactly them.
    assert {e["report_id"]: e["jwe_sha256"] for e in sends_to_usa(world)} == again
    assert audit_rejections(world.config("USA")) == Counter()


def test_a_short_freshness_window_is_looked_at_often_enough_to_send_nothing_too_old() -> None:
    # Stale at half the window, looked for every interval: the oldest an envelope
    # can go out is half the window plus one interval, which must stay under it.
    for window in (60, 61, 120, 239, 240, 241, 3600, 86_400, 30 * 86_400):
        assert window / 2 + reissue_interval(window) < window
    assert reissue_interval(86_400) == REISSUE_EVERY_S == 60
    assert reissue_interval(60) == 15
