"""The publisher is event-driven: a plan committed while it asks the store is not left waiting.

Its loop sleeps without a timer when nothing is in flight or due for a retry,
so a wake-up lost between looking and sleeping would leave envelopes unsent
until the next report. Here the wake-up is made to come at exactly that
moment (the store thread commits a plan while the publisher's query returns
nothing), against a real nats-server and a real store, with the idle timer
pushed far beyond the test's deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nats
import pytest

from broker import publisher as publisher_module
from broker.metrics import Metrics
from broker.natsproc import NatsServer
from broker.publisher import Publisher, subject_for
from broker.store import NewReport, OutboxItem, Store


def report_id(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def plan_one(store: Store, i: int) -> None:
    rid = report_id(i)
    store.accept([NewReport(rid, "vessel", b"{}")])
    # Distinct bytes, as every real envelope is: the hub deduplicates by their hash.
    jwe = f"jwe-{i}".encode()
    store.plan({rid: [OutboxItem(rid, "USA", subject_for("USA", "vessel"), jwe, "{}")]})


@pytest.mark.timeout(60)
async def test_a_plan_committed_while_the_publisher_looks_is_published_without_a_timer(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "IDLE_WAIT", 3600.0)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="INBOX", subjects=["msmt.to.>"])
    store = Store(tmp_path / "store.sqlite3")
    pool = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()
    planned = 0
    publisher: Publisher | None = None

    async def run_db(fn: Callable[..., Any], *args: Any) -> Any:
        nonlocal planned
        result = await loop.run_in_executor(pool, fn, *args)
        if fn == store.pending and not result and planned < 5:
            # The publisher found nothing; a plan lands before it goes to sleep.
            await loop.run_in_executor(pool, plan_one, store, planned)
            planned += 1
            assert publisher is not None
            publisher.wake()
        return result

    sent: list[str] = []
    all_sent = asyncio.Event()

    def record_sent(batch: list[OutboxItem]) -> None:  # on the store thread
        store.mark_sent(batch)
        sent.extend(i.report_id for i in batch)
        if len(sent) == 5:
            loop.call_soon_threadsafe(all_sent.set)

    publisher = Publisher(
        "JPN", nc, store, run_db, record_sent, Metrics(), 16, lambda: nc.is_connected
    )
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    try:
        # Without a wake-up that survives the look, this waits out IDLE_WAIT.
        await asyncio.wait_for(all_sent.wait(), 30)
    finally:
        stop.set()
        publisher.wake()
        await task
        info = await js.stream_info("INBOX")
        await nc.close()
        pool.submit(store.close).result()
        pool.shutdown()
    assert info.state.messages == 5
    assert sorted(sent) == [report_id(i) for i in range(5)]
    assert publisher.counts["published.USA"] == 5
