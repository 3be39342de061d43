"""The publisher is event-driven: woken by what may need it, and only by that.

Its loop sleeps without a timer when nothing is in flight or due for a retry,
so a wake-up lost between looking and sleeping would leave envelopes unsent
until the next report. Here the wake-up is made to come at exactly that
moment (the store thread commits a plan while the publisher's query returns
nothing), against a real nats-server and a real store, with the idle timer
pushed far beyond the test's deadline. An ack, on the other hand, adds nothing
to the outbox: at a trickle it must not send the publisher back to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nats
import pytest
import structlog
from nats.aio.client import Client
from node_world import await_for

from broker import publisher as publisher_module
from broker.errors import StoreError
from broker.metrics import Metrics
from broker.natsproc import NatsServer
from broker.planner import subject_for
from broker.publisher import Publisher
from broker.store import NewReport, OutboxItem, Store

PARTNERS = ("USA", "KOR", "GBR", "FRA", "AUS", "CAN", "DEU", "ITA", "NLD", "NZL")


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


def plan_to_all(store: Store, i: int) -> list[OutboxItem] | None:
    """One report planned for all ten partners, as a node plans it; its stored envelopes."""
    rid = report_id(i)
    store.accept([NewReport(rid, "vessel", b"{}")])
    items = [
        OutboxItem(rid, p, subject_for(p, "vessel"), f"jwe-{i}-{p}".encode(), "{}")
        for p in PARTNERS
    ]
    return store.plan({rid: items})


class Trickle:
    """A publisher over a real store and hub, counting its looks at the outbox."""

    def __init__(self, nc: Client, store: Store) -> None:
        self.store = store
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.looks = 0
        self.recorded: list[OutboxItem] = []
        # A window far larger than a report's ten envelopes, as a node's 256.
        self.publisher = Publisher(
            "JPN", nc, store, self.run_db, self.record_sent, Metrics(), 64, lambda: True
        )

    async def run_db(self, fn: Callable[..., Any], *args: Any) -> Any:
        if fn == self.store.pending:
            self.looks += 1
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def record_sent(self, batch: list[OutboxItem]) -> None:  # on the store thread
        self.store.mark_sent(batch)
        self.recorded.extend(batch)

    def acked(self) -> float:
        count = self.publisher.metrics.registry.get_sample_value(
            "msmt_publish_latency_seconds_count"
        )
        return count or 0.0

    async def acks(self, count: int) -> None:
        """Wait until the hub has acked ``count`` envelopes in all."""
        await await_for(lambda: self.acked() == count, 20, f"{count} acks")

    async def plan(self, i: int, *, hand: bool = False) -> None:
        """Plan report ``i``; wake the publisher, or hand it the envelopes as a node does."""
        stored = await asyncio.get_running_loop().run_in_executor(
            self.pool, plan_to_all, self.store, i
        )
        if hand:
            self.publisher.hand(stored)
        else:
            self.publisher.wake()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The publisher's run, stopped at the end; a stop must end within 30 s."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.publisher.run(stop))
        try:
            yield
        finally:
            stop.set()
            self.publisher.wake()
            await asyncio.wait_for(task, 30)


@pytest.fixture
async def trickle(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Trickle]:
    monkeypatch.setattr(publisher_module, "IDLE_WAIT", 3600.0)
    # Nothing is recorded until the stop, so no wake-up comes from recording.
    monkeypatch.setattr(publisher_module, "COALESCE_ACKS", 3600.0)
    nc = await nats.connect(nats_server.url)
    await nc.jetstream().add_stream(name="INBOX", subjects=["msmt.to.>"])
    world = Trickle(nc, Store(tmp_path / "store.sqlite3"))
    try:
        yield world
    finally:
        await nc.close()
        world.pool.submit(world.store.close).result()
        world.pool.shutdown()


@pytest.mark.timeout(60)
async def test_acks_at_a_trickle_do_not_send_the_publisher_back_to_the_outbox(
    trickle: Trickle,
) -> None:
    # Each ack used to wake the loop and each wake-up to ask the store for more:
    # 5.5 looks per report at 100 reports/s (bench/publisher.py --rate 100).
    async with trickle.running():
        for i in range(5):
            await trickle.plan(i)
            await trickle.acks(10 * (i + 1))
        # One look per wake-up (the start's, then each plan's): the acks asked for none.
        assert trickle.looks == 1 + 5
    assert len(trickle.recorded) == 50


@pytest.mark.timeout(60)
async def test_a_stop_records_the_acks_it_holds_without_waiting_to_gather_more(
    trickle: Trickle,
) -> None:
    # A stop (the end of ``running``) must not wait out the gathering, nor leave
    # the acks unrecorded.
    async with trickle.running():
        await trickle.plan(0)
        await trickle.acks(10)
        assert trickle.recorded == []  # gathering, for an hour here
    assert sorted(i.partner for i in trickle.recorded) == sorted(PARTNERS)
    assert (
        await asyncio.get_running_loop().run_in_executor(trickle.pool, trickle.store.pending, 100)
        == []
    )


@pytest.mark.timeout(60)
async def test_a_row_no_wake_up_announced_is_still_published_after_the_idle_wait(
    trickle: Trickle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every path that adds a pending row wakes the publisher; the idle timer is
    # the safety net should one not, as it was before looks followed wake-ups.
    monkeypatch.setattr(publisher_module, "IDLE_WAIT", 0.2)
    async with trickle.running():
        await trickle.plan(0)
        await trickle.acks(10)
        # Planned behind the publisher's back: no wake().
        await asyncio.get_running_loop().run_in_executor(
            trickle.pool, plan_to_all, trickle.store, 1
        )
        await trickle.acks(20)
    assert sorted({i.report_id for i in trickle.recorded}) == [report_id(0), report_id(1)]


@pytest.mark.timeout(60)
async def test_envelopes_handed_over_by_the_plan_commit_are_not_read_back(
    trickle: Trickle,
) -> None:
    # A look per plan read back the envelopes its commit had just written
    # (~0.13 ms of the store thread and a hop per plan at a trickle).
    async with trickle.running():
        for i in range(5):
            await trickle.plan(i, hand=True)
            await trickle.acks(10 * (i + 1))
        assert trickle.looks == 1  # the start's: without the hand-over, 1 + 5
    assert sorted(i.report_id for i in trickle.recorded) == sorted(
        report_id(i) for i in range(5) for _ in PARTNERS
    )


@pytest.mark.timeout(60)
async def test_envelopes_handed_over_after_a_look_read_them_go_out_once(
    trickle: Trickle,
) -> None:
    # The plan commits just before a look reads the outbox, and is handed over
    # while the look is under way: the look's rows and the hand-over are the
    # same envelopes, and each must be published (and recorded sent) once.
    run_db = trickle.run_db
    raced = False

    async def plan_during_the_look(fn: Callable[..., Any], *args: Any) -> Any:
        nonlocal raced
        if fn == trickle.store.pending and trickle.looks == 1 and not raced:
            raced = True
            stored = await asyncio.get_running_loop().run_in_executor(
                trickle.pool, plan_to_all, trickle.store, 1
            )
            trickle.publisher.hand(stored)
        return await run_db(fn, *args)

    trickle.publisher.run_db = plan_during_the_look
    async with trickle.running():
        await trickle.plan(0)  # woken: the second look, during which report 1 is planned
        await trickle.acks(20)
    assert raced
    rows = [i.rowid for i in trickle.recorded]
    assert sorted(rows) == sorted(set(rows))
    assert len(rows) == 20


@pytest.mark.timeout(60)
async def test_acked_envelopes_the_store_cannot_record_are_recorded_later_not_published_again(
    trickle: Trickle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk-full trial: the hub acked, the store could not record it, and the node
    # published the same 177 envelopes 178,940 times; past the hub's 2-minute dedup
    # window each was stored again. The record is tried again instead.
    monkeypatch.setattr(publisher_module, "COALESCE_ACKS", 0.01)
    monkeypatch.setattr(publisher_module, "RECORD_RETRY_S", 0.05)
    failures = [StoreError("store store.sqlite3: database or disk is full")] * 3
    record = trickle.record_sent

    def failing(batch: list[OutboxItem]) -> None:  # on the store thread
        if failures:
            raise failures.pop()
        record(batch)

    trickle.publisher.record_sent = failing
    with structlog.testing.capture_logs() as logs:
        async with trickle.running():
            await trickle.plan(0)
            await await_for(lambda: len(trickle.recorded) == 10, 20, "the record")
            assert trickle.acked() == 10  # each envelope published and acked once
    assert failures == []
    assert [e["event"] for e in logs if e["event"] == "record_sent_failed"] == [
        "record_sent_failed"
    ]  # once a minute, not at each try
    assert sorted(i.partner for i in trickle.recorded) == sorted(PARTNERS)
