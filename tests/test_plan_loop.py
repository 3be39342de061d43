"""The plan loop takes reports just accepted from the intake, not from the store.

Reports fed one at a time (a feed at a trickle) cost no read of the store's
unplanned reports, each a hop to the store's thread and back: they used to
cost three (the read that found the report, one while its plan was made, one
while it was committed). Every report is still planned and sent.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import pytest
from node_world import BATCH_POLICY, World, await_for

from broker.node_start import load_node
from broker.store import OutboxItem

pytestmark = pytest.mark.integration

PARTNERS = ("USA", "KOR")


async def test_reports_fed_one_at_a_time_are_planned_without_a_store_read(world: World) -> None:
    world.write_config("JPN", BATCH_POLICY)
    records = world.records_released_to("JPN", PARTNERS, 4, seed=21)

    node = load_node(world.config("JPN"))
    real_unplanned, real_plan = node.store.unplanned, node.store.plan
    reads: list[int] = []
    planned: list[str] = []

    def counted_unplanned(limit: int, *, audited_only: bool = False) -> list[tuple[str, bytes]]:
        rows = real_unplanned(limit, audited_only=audited_only)
        reads.append(len(rows))
        return rows

    def counted_plan(
        plans: Mapping[str, Sequence[OutboxItem]],
        waiting: Mapping[str, Mapping[str, str]] = MappingProxyType({}),
    ) -> None:
        real_plan(plans, waiting)
        planned.extend(plans)

    node.store.unplanned = counted_unplanned  # type: ignore[method-assign]
    node.store.plan = counted_plan  # type: ignore[method-assign]

    def planned_at_least(count: int) -> bool:
        return len(planned) >= count

    task = asyncio.create_task(node.run())
    try:
        await await_for(lambda: node.ready() is None, 20, "JPN ready")
        for i, record in enumerate(records, start=1):
            answers = await world.submit("JPN", [record])
            assert [a["status"] for a in answers] == ["accepted"]
            await await_for(functools.partial(planned_at_least, i), 10, f"report {i} planned")
        await await_for(
            lambda: world.sent_counts("JPN", PARTNERS) == dict.fromkeys(PARTNERS, 4),
            20,
            "every report sent",
        )
        await asyncio.sleep(0.5)  # a read after the last commit would show by now
        counted = list(reads)
    finally:
        node.stop.set()
        await task

    assert sorted(planned) == sorted(str(r["report_id"]) for r in records)
    # The read at start, which found nothing; none after.
    assert counted == [0]
