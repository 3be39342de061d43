"""Resource bounds under sustained input (issue 10, part 5): a five-minute soak, measured.

Three members exchange a steady stream of reports for ``SOAK_SECONDS`` (at
least 300). JPN and USA run as ``msmt node run`` subprocesses whose RSS is
sampled with psutil; KOR runs in this process so the sizes of its in-memory
structures can be read directly (publisher in-flight/retry/backoff tables,
planner skip set, witness queue and state). For all three the on-disk queues
are sampled too: outbox depth, inbox lag and the replay seen-set.

The criterion is a plateau, not a speed: each quantity's median over the late
third of the run must not exceed its median over the middle third by more
than a small noise allowance. Anything that grows with input (a leak per
message, an unpruned table) grows by the same amount in both thirds and fails.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from reliability_world import Cluster, Feed, await_for, fetch

from broker.inbound_base import MAX_SKEW
from broker.node import Node
from broker.node_start import load_node

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.slow]

SOAK_SECONDS = max(300.0, float(os.environ.get("MSMT_SOAK_SECONDS", "300")))
SAMPLE_EVERY = 5.0
FRESHNESS = 60  # the smallest the config allows, so seen-set entries expire soonest
RSS_ALLOWANCE = 4 * 1024 * 1024  # allocator noise; a per-message leak exceeds it (see docs)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


@dataclass
class Series:
    """Samples of named quantities over time."""

    t: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, at: float, sample: dict[str, float]) -> None:
        self.t.append(at)
        for name, value in sample.items():
            self.values.setdefault(name, []).append(value)

    def window(self, name: str, start: float, end: float) -> list[float]:
        # NaN is no measurement: a gauge the node could not know then (the inbox lag,
        # when the hub did not answer in time).
        return [
            v
            for t, v in zip(self.t, self.values[name], strict=True)
            if start <= t < end and not math.isnan(v)
        ]


def metric(page: str, name: str) -> float:
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in the metrics page")


def structures(node: Node) -> dict[str, float]:
    """Sizes of the in-process node's in-memory queues, tables and caches."""
    pub = node.publisher
    assert pub is not None
    return {
        "KOR.in_flight": len(pub._in_flight),
        "KOR.unrecorded": len(pub._unrecorded),
        "KOR.ack_futures": len(pub.acks._futures),
        "KOR.retry_at": len(pub._retry_at),
        "KOR.attempts": len(pub._attempts),
        "KOR.warned": len(pub._warned),
        "KOR.plan_skip": len(node.plan_loop.skip),
        "KOR.witness_queue": node.auditnet.backlog,
        "KOR.witness_state": len(node.auditnet.witness.state),
    }


async def measure(cluster: Cluster, kor: Node, trio: tuple[str, ...]) -> dict[str, float]:
    """One sample of every measured quantity."""
    assert kor.failure is None, kor.failure
    for member in ("JPN", "USA"):
        assert cluster.alive(member), cluster.log_tail(member)
    sample = structures(kor)
    for member in trio:
        store = cluster.store(member)
        try:
            sample[f"{member}.outbox"] = store.outbox_depth()
            sample[f"{member}.seen"] = store.seen_count()
            sample[f"{member}.received"] = store.inbox_count()
        finally:
            store.close()
        # KOR serves its metrics on this very event loop: fetch from a thread.
        url = f"http://127.0.0.1:{cluster.config(member).metrics.port}/metrics"
        sample[f"{member}.inbox_lag"] = metric(
            await asyncio.to_thread(fetch, url), "msmt_inbox_lag"
        )
    for member in ("JPN", "USA"):
        sample[f"{member}.rss"] = cluster.rss(member)
    return sample


@pytest.mark.timeout(SOAK_SECONDS + 240)
async def test_memory_and_queues_plateau_under_five_minutes_of_sustained_input(
    cluster: Cluster,
) -> None:
    trio = ("JPN", "USA", "KOR")
    for member in trio:
        cluster.write_config(member)
    limits = {"MSMT_FRESHNESS_SECONDS": str(FRESHNESS)}
    cluster.start("JPN", **limits)
    cluster.start("USA", **limits)
    kor_config = cluster.config("KOR")
    kor_config = kor_config.model_copy(
        update={"limits": kor_config.limits.model_copy(update={"freshness_seconds": FRESHNESS})}
    )
    kor = load_node(kor_config)
    kor_task = asyncio.create_task(kor.run())
    series = Series()
    try:
        await await_for(lambda: kor.ready() is None, 30, "KOR ready")
        feed = Feed(cluster, trio, batch=4, interval=0.5)
        feed.start()
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < SOAK_SECONDS:
            sample = await measure(cluster, kor, trio)
            series.add(elapsed, sample)
            await asyncio.sleep(SAMPLE_EVERY)
        await feed.finish()
        assert all(cluster.alive(m) for m in ("JPN", "USA"))
        assert kor.failure is None
    finally:
        kor.stop.set()
        await kor_task

    third = SOAK_SECONDS / 3
    report: list[str] = []
    failures: list[str] = []
    for name in sorted(series.values):
        peak = max(series.window(name, 0, math.inf))
        early = statistics.median(series.window(name, 0, third))
        mid = statistics.median(series.window(name, third, 2 * third))
        late = statistics.median(series.window(name, 2 * third, SOAK_SECONDS + 1))
        report.append(f"{name}: early {early:.0f} mid {mid:.0f} late {late:.0f} max {peak:.0f}")
        if name.endswith((".received", ".seen")):
            continue  # these grow by design: checked against their own bounds below
        allowance = RSS_ALLOWANCE if name.endswith(".rss") else max(8.0, 0.1 * mid)
        if late > mid + allowance:
            failures.append(report[-1])
    print("\n".join(report))  # the measured figures, for docs/RELIABILITY.md
    assert failures == [], failures
    # Input really was sustained: every member kept receiving through the late third.
    for member in trio:
        received = series.values[f"{member}.received"]
        mid_count = series.window(f"{member}.received", third, 2 * third)
        assert received[-1] > max(mid_count) + 100, member
    # The seen-set holds only what the freshness window needs: never more entries than
    # reports received within freshness + skew + one prune interval (60 s).
    horizon = FRESHNESS + MAX_SKEW.total_seconds() + 60
    for member in trio:
        seen = series.values[f"{member}.seen"]
        received = series.values[f"{member}.received"]
        for i, at in enumerate(series.t):
            window_start = next(j for j, t in enumerate(series.t) if t >= at - horizon)
            recent = received[i] - (received[window_start - 1] if window_start else 0)
            assert seen[i] <= recent + 50, (member, at, seen[i], recent)
