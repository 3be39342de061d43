"""A twin node (one member's node.toml run twice, on two data directories) splits nothing.

Both twins share the member's inbox consumer, so each report either took landed
in its own store (a trial: 10 of 40 in the twin's). Each sees the other's
checkpoints on its own subject (the ``twin`` alarm) and pauses its inbox while
they come; the reports wait at the hub, and the twin left resumes once the
other is stopped. A real hub, JPN in process (to shorten its wait once the
twin is gone), the twin as a ``msmt node run`` process, USA sending to JPN.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from node_world import USA_TO_JPN, World, await_for, expected_partners, inbox_ids, records_for
from structlog.testing import capture_logs

from broker.natsproc import free_port
from broker.node_start import load_node
from broker.store import Store
from broker.validation import parse_record


def _paused(store_path: Path) -> str:
    store = Store(store_path, readonly=True)
    try:
        return store.state().get("inbox_paused", "")
    finally:
        store.close()


async def test_twins_pause_their_inbox_and_the_one_left_resumes_with_every_report(
    world: World, tmp_path: Path
) -> None:
    world.write_config("JPN")
    world.write_config("USA", USA_TO_JPN)
    twin_dir = tmp_path / "twin"
    with capture_logs() as logs:
        jpn = load_node(world.config("JPN"))
        jpn_task = asyncio.create_task(jpn.run())
        usa = load_node(world.config("USA"))
        usa_task = asyncio.create_task(usa.run())
        try:
            await await_for(lambda: jpn.ready() is None, 30, "JPN ready")
            # Into a later second than JPN's first entry: a twin started within the same
            # second writes the very same first entry (times are to the second), so its
            # log is ours and no twin is seen until they differ (a fast host's CI did so).
            await asyncio.sleep(1.05)
            # The same node.toml on another data directory: same credentials and keys.
            world.start(
                "JPN",
                ready=False,
                MSMT_DATA_DIR=str(twin_dir),
                MSMT_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
            )
            await await_for(jpn.auditnet.twin_active, 60, "JPN's twin alarm")
            assert (jpn.ready() or "").startswith("inbox paused: a twin takes reports")
            # The twin saw JPN's checkpoint (published again at once) and paused too.
            store_path = twin_dir / "node.sqlite3"
            await await_for(
                lambda: store_path.exists() and _paused(store_path).startswith("since "),
                60,
                "the twin's pause",
            )
            await await_for(
                lambda: world.state("JPN").get("inbox_paused", "").startswith("since "),
                10,
                "JPN's status",
            )
            records = records_for("USA", 12, seed=81)
            answers = await world.submit("USA", records)
            assert {a["status"] for a in answers} == {"accepted"}
            await await_for(lambda: usa.store.outbox_depth() == 0, 30, "USA sent them")
            # At the hub, for whichever twin is left; neither took any.
            # At the hub, for whichever twin is left; neither took any. (A record
            # whose markings keep it from JPN has no envelope to it.)
            to_jpn = [
                r["report_id"]
                for r in records
                if "JPN" in expected_partners(usa.planner.policy, parse_record(json.dumps(r)))
            ]
            assert len(to_jpn) > 6
            assert await world.stream_messages("JPN") == len(to_jpn)
            assert world.inbox_ids("JPN", "USA") == []
            assert inbox_ids(store_path, "USA") == []

            assert world.terminate("JPN") == 0  # the operator stops the twin
            jpn.auditnet.alarm_clear = 1.0  # rather than wait 180 s for its silence
            await await_for(lambda: jpn.ready() is None, 30, "JPN resumed")
            want = sorted(to_jpn)
            await await_for(
                lambda: sorted(world.inbox_ids("JPN", "USA")) == want, 30, "every report"
            )
            await await_for(
                lambda: world.state("JPN").get("inbox_paused") == "", 10, "JPN's status"
            )
        finally:
            usa.stop.set()
            jpn.stop.set()
            await asyncio.gather(usa_task, jpn_task)
    assert inbox_ids(store_path, "USA") == []  # the twin took none of them
    events = [e["event"] for e in logs]
    assert events.count("inbox_paused") == 1  # once a minute; this pause lasted less
    assert events.count("inbox_resumed") == 1
    # (USA, witnessing JPN's log, may raise fork or rollback on it as well.)
    assert ("audit_alarm", "twin") in {(e["event"], e.get("kind")) for e in logs}
