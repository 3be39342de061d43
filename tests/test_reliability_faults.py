"""Faults while a steady stream of reports flows among four members (issue 10, part 1).

Every test ends with ``Cluster.settle``: each report reached each partner its
originator's policy releases it to, exactly once (store and hub inbox stream),
and ``msmt audit verify`` / ``msmt audit replay`` pass on the logs. JPN and USA
publish (their real policies); KOR and GBR only receive, so "publishing node"
and "receiving node" are distinct victims.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats.aio.client
import pytest
from node_world import KILL_ACK_WAIT
from reliability_world import Cluster, Feed, await_for, fault_rng, fetch, records_for
from tcpproxy import running

from broker.natsetup import connect_account
from broker.planner import subject_for

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PUBLISHERS = ("JPN", "USA")
RECEIVERS = ("KOR", "GBR")
FOUR = (*PUBLISHERS, *RECEIVERS)


@pytest.fixture
def single(tmp_path: Path) -> Iterator[Cluster]:
    # The SIGKILL test kills receiving nodes; the module's other tests took as long
    # with this ack_wait as with the hub's (13.0 vs 13.5 s, 10.0 vs 10.3, 8.5 vs 8.5).
    cluster = Cluster(tmp_path, ack_wait_s=KILL_ACK_WAIT)
    try:
        yield cluster
    finally:
        cluster.close()


def start_four(cluster: Cluster, urls: dict[str, list[str]] | None = None) -> None:
    for member in FOUR:
        cluster.write_config(member, urls=(urls or {}).get(member))
    cluster.start_many(FOUR, MSMT_PUBLISH_MAX_IN_FLIGHT="32", MSMT_FETCH_BATCH="25")


async def test_random_sigkills_of_publisher_receiver_and_hub(single: Cluster) -> None:
    rng, _ = fault_rng("sigkill")
    start_four(single)
    feed = Feed(single, PUBLISHERS)
    feed.start()
    victims = ["publisher", "receiver", "hub"] * 2
    rng.shuffle(victims)
    log: list[str] = []
    for victim in victims:
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        down = rng.uniform(0.1, 1.0)
        if victim == "hub":
            log.append(f"kill nats-server after {feed.total()} reports, down {down:.1f}s")
            single.servers[0].kill()
            await asyncio.sleep(down)
            await asyncio.to_thread(single.servers[0].start)
        else:
            member = rng.choice(PUBLISHERS if victim == "publisher" else RECEIVERS)
            log.append(f"kill {member} after {feed.total()} reports, down {down:.1f}s")
            single.kill(member)
            await asyncio.sleep(down)
            await asyncio.to_thread(single.start, member)
    await asyncio.sleep(1.0)
    sent = await feed.finish()
    print("\n".join(log))
    assert feed.total() >= 100, log
    want = await single.settle(sent, FOUR)
    assert sum(len(ids) for ids in want.values()) >= 200, log
    assert all(single.alive(m) for m in FOUR)


async def test_cluster_loses_one_server_then_another_after_the_first_returns(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path, size=3)
    try:
        start_four(cluster)
        feed = Feed(cluster, PUBLISHERS)
        feed.start()
        first, second, _ = cluster.servers
        await asyncio.sleep(1.0)
        before = feed.total()
        first.kill()
        await asyncio.sleep(1.5)
        await asyncio.to_thread(first.start)
        await asyncio.sleep(1.0)
        second.kill()
        await asyncio.sleep(1.5)
        during = feed.total()
        await asyncio.to_thread(second.start)
        await asyncio.sleep(1.0)
        sent = await feed.finish()
        assert during > before  # the stream kept flowing with a server down
        await cluster.settle(sent, FOUR)
    finally:
        cluster.close()


async def test_a_resend_the_restarted_hub_stores_again_is_stored_once(single: Cluster) -> None:
    """The hub forgets, at its restart, the ``Nats-Msg-Id`` of messages already taken.

    nats-server rebuilds its dedup window from the messages its streams still hold,
    and an inbox stream drops each one its partner acked. A sender stopped between
    the hub's ack and its own record of the send sends the same bytes under the
    same id at its next start; after a hub restart the hub stores that copy again
    (bench/chaos.py met it: docs/RELIABILITY.md, "What the hub may hold twice").
    The resend is made here with JPN's credentials from the envelope KOR kept,
    since no signal lands a kill between an ack and a commit on cue.
    """
    pair = ("JPN", "KOR")
    for member in pair:
        single.write_config(member)
    single.start_many(pair)
    feed = Feed(single, ("JPN",))
    await feed.deliver("JPN", records_for("JPN", 6, seed=4242))
    want = await single.settle(dict(feed.sent), pair)
    report_id = sorted(want[("KOR", "JPN")])[0]
    kind = next(r["kind"] for r in feed.sent["JPN"] if r["report_id"] == report_id)
    store = single.store("KOR")
    try:
        jwe = store.kept_envelope("JPN", report_id)
    finally:
        store.close()
    assert jwe is not None
    msg_id = hashlib.sha256(jwe.encode()).hexdigest()  # as the publisher names it
    duplicates_before = single.counters("KOR").get("duplicate.JPN", 0)

    hub = single.servers[0]
    hub.kill()
    await asyncio.to_thread(hub.start)
    nc = await connect_account(single.hub_urls[0], "JPN", single.seed("JPN"))
    try:
        ack = await nc.jetstream().publish(
            subject_for("KOR", kind), jwe.encode(), headers={"Nats-Msg-Id": msg_id}
        )
    finally:
        await nc.close()
    assert not ack.duplicate  # the hub took it as new: its dedup did not survive

    await await_for(
        lambda: single.counters("KOR").get("duplicate.JPN", 0) == duplicates_before + 1,
        60,
        "KOR counts the second copy as a duplicate",
    )
    # One row per report, no second receipt in KOR's log, replay clean: stored once.
    await single.settle(dict(feed.sent), pair, hub_copies={"KOR": 1})


async def test_network_cut_longer_than_the_reconnect_buffer(single: Cluster) -> None:
    hub = single.servers[0]
    with running(hub.port) as proxy:
        # JPN (publisher) and KOR (receiver) reach the hub only through the proxy.
        start_four(single, {"JPN": [proxy.url], "KOR": [proxy.url]})
        feed = Feed(single, PUBLISHERS, batch=8, interval=0.2)
        feed.start()
        await asyncio.sleep(1.0)
        proxy.cut()
        jpn_metrics = f"http://127.0.0.1:{single.config('JPN').metrics.port}/metrics"
        await await_for(
            lambda: "msmt_nats_connected 0.0" in fetch(jpn_metrics), 15, "JPN sees the cut"
        )
        # What it cannot know now reads as unknown, not as its last value (a
        # monitoring trial): the inbox lag and the clock offset.
        kor_metrics = f"http://127.0.0.1:{single.config('KOR').metrics.port}/metrics"
        await await_for(
            lambda: (
                {"msmt_inbox_lag NaN", "msmt_clock_offset_seconds NaN"}
                <= set(fetch(kor_metrics).splitlines())
            ),
            15,
            "KOR's lag and clock offset unknown while cut off",
        )
        cut_at = feed.total()

        # Keep the cut until JPN holds more unsent envelope bytes than nats-py's reconnect
        # buffer could: only the outbox can carry that across.
        def backlog() -> int:
            uri = f"file:{single.config('JPN').store_path}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
                row = db.execute("SELECT sum(length(jwe)) FROM outbox WHERE state = 'pending'")
                return int(row.fetchone()[0] or 0)

        await await_for(
            lambda: backlog() > nats.aio.client.DEFAULT_PENDING_SIZE,
            90,
            "a backlog beyond the reconnect buffer",
        )
        assert feed.total() > cut_at  # intake kept accepting while cut off
        assert proxy.refused > 0  # JPN and KOR did try to reconnect, and were refused
        proxy.heal()
        await asyncio.sleep(1.0)
        sent = await feed.finish()
        await single.settle(sent, FOUR)


async def test_a_corrupted_line_to_the_hub_is_a_reconnect_not_a_dead_node(single: Cluster) -> None:
    # A trial put one line the hub cannot parse on a node's connection: the hub
    # answered -ERR and closed it, and nats-py closed the client for good, so the
    # node stayed up, not ready, accepting reports it could never send, for ever.
    hub = single.servers[0]
    with running(hub.port) as proxy:
        # JPN (publisher) and KOR (receiver) reach the hub only through the proxy.
        start_four(single, {"JPN": [proxy.url], "KOR": [proxy.url]})
        feed = Feed(single, PUBLISHERS, batch=8, interval=0.2)
        feed.start()
        await asyncio.sleep(1.0)
        before = proxy.connections
        assert proxy.garble() == 2
        # Each dialled the hub again, and the proxy took both connections.
        await await_for(lambda: proxy.connections >= before + 2, 15, "JPN and KOR to reconnect")
        for member in ("JPN", "KOR"):
            log = (single.root / f"{member}.log").read_text()
            assert "unknown protocol operation" in log, log  # the hub's reason is said
        await asyncio.sleep(1.0)
        sent = await feed.finish()
        await single.settle(sent, FOUR)
        assert {single.procs[member].poll() for member in FOUR} == {None}  # none stopped


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[None]:
    """Mount a size-limited tmpfs at ``path`` (the CI runs as root); fail clearly if impossible."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"cannot mount a {size_mb} MB tmpfs at {path} for the disk-full test "
            f"(needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}"
        )
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> Path:
    """Write a file until the filesystem holding ``path`` is full; return it."""
    filler = path / "filler"
    # Unbuffered: a buffered file would keep the part of a chunk that did not fit
    # and raise ENOSPC again when closed, whenever the free space is not a
    # multiple of the chunk (the node's own files decide that).
    with filler.open("wb", buffering=0) as out:
        chunk = b"\0" * (1 << 16)
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


async def test_full_disk_refuses_intake_clearly_and_resumes(single: Cluster) -> None:
    data = single.root / "data" / "JPN"
    with small_filesystem(data, 24):
        start_four(single)
        feed = Feed(single, PUBLISHERS)
        feed.start()
        await asyncio.sleep(1.0)
        filler = fill(data)
        refused = []
        for n in range(40):
            records = records_for("JPN", 2, seed=90_000 + n)
            answers = await single.submit("JPN", records)
            taken = {a["report_id"] for a in answers if a["status"] == "accepted"}
            feed.sent["JPN"].extend(r for r in records if r["report_id"] in taken)
            refused = [a for a in answers if a.get("reason") == "unavailable"]
            if refused:
                break
            await asyncio.sleep(0.2)
        assert refused, "the node never refused intake on a full disk"
        assert all(a["status"] == "rejected" for a in refused)
        assert "full" in refused[0]["detail"], refused[0]
        assert single.alive("JPN")  # refusing, not crashing
        await asyncio.sleep(1.0)
        filler.unlink()  # space returns; the feed's retried batches now go in
        sent = await feed.finish()
        assert feed.retries > 0  # the feed really was refused for a while
        await single.settle(sent, FOUR)
        for member in FOUR:
            single.kill(member)


def test_a_witness_state_that_cannot_be_saved_is_an_audit_error(tmp_path: Path) -> None:
    # Before the fix an OSError escaped here and stopped the whole node on a full disk.
    from broker.auditnet import save_witness_state
    from broker.errors import AuditError
    from broker.witness import LogState

    with pytest.raises(AuditError, match="cannot save witness state"):
        save_witness_state(tmp_path / "missing" / "witness-state.json", {"JPN": LogState(1, b"r")})
