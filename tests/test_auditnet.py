"""Witnessing over a real nats-server: rounds, the latest checkpoint only, and what is ignored.

JPN keeps a real audit log and serves proofs of it; USA witnesses it. Both are
the node's ``AuditNet`` with their own store thread, as in ``broker.node``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from audit_helpers import (
    MEMBER,
    build_log,
    event,
    log_verifier,
    unstored_event,
    witness_verifier,
)
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Gauge
from structlog.testing import capture_logs

from broker import auditnet, auditnet_witness
from broker.auditlog import AuditLog
from broker.auditnet import AuditNet
from broker.checkpoint import (
    EARLIER_REQUEST_REFUSAL,
    Checkpoint,
    ProofReply,
    cosign,
    parse_body,
    parse_proof_request,
    parse_proof_response,
    proof_refusal,
    proof_request,
    proof_response,
    sign_checkpoint,
    unsigned_proof_response,
)
from broker.errors import AuditError, StoreError
from broker.merkle import verify_consistency
from broker.metrics import alarm_series
from broker.natsproc import NatsServer
from broker.note import Note, Signature, parse
from broker.witness import LogState

pytestmark = pytest.mark.integration

JPN_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
USA_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(50, 82)))
KOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
# JPN's log key before a rotation: retired in the roster, so partners still trust it.
JPN_RETIRED_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(150, 182)))
NONE = LogState(0, b"")


async def await_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


@dataclass
class Peer:
    """One member's AuditNet on its own connection and store thread."""

    net: AuditNet
    nc: Client
    alarms: Counter
    refused: Counter
    registry: CollectorRegistry
    pool: ThreadPoolExecutor
    task: asyncio.Task[None] | None = None

    def alarm_count(self, kind: str | None = None) -> float:
        return _total(self.alarms, kind)

    def alarms_on(self, kind: str, log: str) -> float | None:
        """The alarm counter's series for ``kind`` on ``log``'s log, as a scrape reads it."""
        return self.registry.get_sample_value("alarms_total", {"kind": kind, "log": log})

    def active(self, kind: str, log: str) -> float | None:
        """The alarm gauge's series for ``kind`` on ``log``'s log, as a scrape reads it."""
        return self.registry.get_sample_value("active", {"kind": kind, "log": log})

    def refused_count(self, reason: str | None = None) -> float:
        return _total(self.refused, reason)

    def witnessed(self, log: str) -> float | None:
        """The witnessed gauge's series for ``log``'s log, as a scrape reads it."""
        return self.registry.get_sample_value("witnessed", {"log": log})

    def uncosigned(self, witness: str) -> float:
        """The uncosigned gauge's series for ``witness``, as a scrape reads it."""
        value = self.registry.get_sample_value("uncosigned", {"witness": witness})
        assert value is not None, f"no uncosigned series for {witness}"
        return value


def _total(counter: Counter, label: str | None) -> float:
    return sum(
        s.value
        for m in counter.collect()
        for s in m.samples
        if s.name.endswith("_total") and label in (None, *s.labels.values())
    )


@dataclass
class Audit:
    """JPN's log and AuditNet, USA's witnessing AuditNet, and recorders on the hub."""

    log: AuditLog
    jpn: Peer
    usa: Peer
    tap: Client
    stop: asyncio.Event
    proof_requests: list[tuple[int, int]] = field(default_factory=list)
    """The sizes of each proof request seen on JPN's proof subject (each has its own nonce)."""
    usa_cosignatures: list[bytes] = field(default_factory=list)

    async def publish_checkpoint(self, data: str | bytes) -> None:
        """Publish as JPN's node does (its housekeeping), and let the hub route it."""
        body = data.encode() if isinstance(data, str) else data
        await self.jpn.nc.publish(f"msmt.audit.{MEMBER}.checkpoint", body)
        await self.jpn.nc.flush()

    def append(self, entries: int) -> str:
        """Append a batch to JPN's log without publishing; return the new checkpoint."""
        self.log.append_many([event(self.log.size + i) for i in range(entries)])
        return self.log.latest_checkpoint() or ""

    async def grow(self, entries: int) -> str:
        """Append a batch and publish the new checkpoint."""
        note = self.append(entries)
        await self.publish_checkpoint(note)
        return note

    def usa_state(self) -> LogState:
        return self.usa.net.witness.state.get(MEMBER, NONE)


async def _peer(
    server: NatsServer,
    member: str,
    key: Ed25519PrivateKey,
    log: AuditLog,
    state_path: Path,
    interval: float,
) -> Peer:
    pool = ThreadPoolExecutor(max_workers=1)

    async def run_db(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    registry = CollectorRegistry()
    alarms = Counter("alarms", "test", ["kind", "log"], registry=registry)
    active = Gauge("active", "test", ["kind", "log"], registry=registry)
    refused = Counter("rejected", "test", ["reason"], registry=registry)
    witnessed = Gauge("witnessed", "test", ["log"], registry=registry)
    uncosigned = Gauge("uncosigned", "test", ["witness"], registry=registry)
    for kind, origin in alarm_series(member):  # at 0 from the start, as the node's (Metrics)
        alarms.labels(kind=kind, log=origin)
    others = {"JPN": JPN_KEY, "USA": USA_KEY, "KOR": KOR_KEY}
    net = AuditNet(
        member,
        log,
        run_db,
        key,
        {m: [log_verifier(k, m)] for m, k in others.items() if m != member},
        [witness_verifier(k, m) for m, k in others.items() if m != member],
        state_path,
        alarms,
        interval=interval,
        settled=interval,
        refused=refused,
        own_log_keys=[log_verifier(JPN_RETIRED_KEY)] if member == "JPN" else (),
        active=active,
        witnessed=witnessed,
        uncosigned=uncosigned,
    )
    nc = await nats.connect(server.url)
    await net.subscribe(nc)
    await nc.flush()
    return Peer(net, nc, alarms, refused, registry, pool)


@pytest.fixture
async def audit(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Audit]:
    log = build_log(tmp_path / "jpn", JPN_KEY, [3])
    usa_log = build_log(tmp_path / "usa", USA_KEY, [1], member="USA")
    jpn = await _peer(nats_server, "JPN", JPN_KEY, log, tmp_path / "jpn" / "ws.json", 3600)
    usa = await _peer(nats_server, "USA", USA_KEY, usa_log, tmp_path / "usa" / "ws.json", 3600)
    tap = await nats.connect(nats_server.url)
    world = Audit(log, jpn, usa, tap, asyncio.Event())

    async def on_proof(msg: Msg) -> None:
        with contextlib.suppress(AuditError):  # a test's malformed request: JPN answers it
            world.proof_requests.append(parse_proof_request(msg.data)[:2])

    async def on_cosignature(msg: Msg) -> None:
        world.usa_cosignatures.append(msg.data)

    await tap.subscribe(f"msmt.audit.{MEMBER}.proof", cb=on_proof)
    await tap.subscribe("msmt.audit.USA.cosignature", cb=on_cosignature)
    await tap.flush()
    for peer in (jpn, usa):
        peer.task = asyncio.create_task(peer.net.run(peer.nc, world.stop))
    try:
        yield world
    finally:
        world.stop.set()
        await asyncio.gather(*(p.task for p in (jpn, usa) if p.task is not None))
        for nc in (jpn.nc, usa.nc, tap):
            await nc.close()
        for peer in (jpn, usa):
            peer.pool.shutdown(wait=True)
        log.close()
        usa_log.close()


async def test_a_round_cosigns_the_latest_checkpoint_and_skips_the_ones_before(
    audit: Audit,
) -> None:
    first = await audit.grow(0)  # the log's current checkpoint, size 3
    # After a quiet spell a checkpoint is witnessed at once: no proof needed from size 0.
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned size 3")
    await await_for(
        lambda: "\u2014 USA " in (audit.log.latest_checkpoint() or ""), 10, "JPN merged it"
    )
    assert audit.proof_requests == []
    assert len(audit.usa_cosignatures) == 1
    assert parse(audit.usa_cosignatures[0]).text == parse(first).text
    # Two more batches inside the interval (an hour here): held, the second replacing the first.
    await audit.grow(4)
    latest = await audit.grow(5)
    await await_for(
        lambda: audit.usa.net._pending.get(MEMBER, b"").startswith(parse(latest).text.encode()),
        10,
        "USA holding JPN's size-12 checkpoint",
    )
    assert audit.usa.net.backlog == 1
    assert audit.usa_state().size == 3
    assert audit.proof_requests == []
    # The interval elapses: one round, one proof (3 -> 12), size 7 never asked about.
    audit.usa.net.interval = 0
    await await_for(lambda: audit.usa_state().size == 12, 10, "USA cosigned size 12")
    await await_for(lambda: len(audit.usa_cosignatures) == 2, 10, "second cosignature")
    assert audit.proof_requests == [(3, 12)]
    assert audit.usa_state().root == parse_body(parse(latest).text).root
    await await_for(
        lambda: "\u2014 USA " in audit.log.checkpoint_at(12), 10, "JPN merged the cosignature"
    )
    assert "\u2014 USA " not in audit.log.checkpoint_at(7)
    assert audit.usa.net.backlog == 0
    assert audit.usa.alarm_count() == audit.jpn.alarm_count() == 0


async def test_a_partners_log_is_seen_when_cosigned_and_each_time_it_republishes(
    audit: Audit,
) -> None:
    # A partner that sends reports but publishes no log (a node built without the
    # audit half) shows as never seen: KOR here, whose log publishes nothing.
    assert audit.usa.witnessed("JPN") == audit.usa.witnessed("KOR") == 0
    before = int(time.time())
    await audit.grow(0)
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned size 3")
    await await_for(lambda: (audit.usa.witnessed("JPN") or 0) >= before, 10, "JPN seen")
    # An idle log republishes the checkpoint we cosigned: seen again, nothing to sign.
    audit.usa.net.seen[MEMBER] = before - 600
    await audit.publish_checkpoint(audit.log.latest_checkpoint() or "")
    await await_for(lambda: (audit.usa.witnessed("JPN") or 0) >= before, 10, "seen again")
    assert len(audit.usa_cosignatures) == 1
    assert audit.usa.witnessed("KOR") == 0


async def test_how_long_each_witness_has_left_our_log_uncosigned_is_measured(
    audit: Audit,
) -> None:
    async def publish_as_the_node(entries: int) -> None:
        note = audit.append(entries).encode()
        audit.jpn.net.published(note)  # as the node's housekeeping does, before it publishes
        await audit.publish_checkpoint(note)

    # Nothing published yet: no witness owes anything.
    assert audit.jpn.uncosigned("USA") == audit.jpn.uncosigned("KOR") == 0
    await publish_as_the_node(0)
    await await_for(
        lambda: audit.jpn.uncosigned("USA") == 0 < audit.jpn.uncosigned("KOR"), 10, "USA cosigned"
    )
    # KOR runs no node here: its count grows from the publication, and keeps growing.
    first = audit.jpn.uncosigned("KOR")
    await asyncio.sleep(0.3)
    assert audit.jpn.uncosigned("KOR") >= first + 0.3
    # USA holds the next checkpoints for its interval (an hour here): it owes them.
    await publish_as_the_node(4)
    await publish_as_the_node(5)
    await await_for(lambda: MEMBER in audit.usa.net._pending, 10, "USA holding size 12")
    await asyncio.sleep(0.3)
    owed = audit.jpn.uncosigned("USA")
    assert 0.3 <= owed < audit.jpn.uncosigned("KOR")  # since size 7, after KOR's size 3
    audit.usa.net.interval = 0
    await await_for(lambda: audit.jpn.uncosigned("USA") == 0, 10, "USA cosigned size 12")
    assert audit.jpn.net.cosigned_size == {"USA": 12}
    # A node started again on the log reads who cosigned its latest checkpoint: USA
    # owes nothing, KOR counts from the first publication after the start.
    registry = CollectorRegistry()
    gauge = Gauge("uncosigned", "test", ["witness"], registry=registry)
    again = AuditNet(
        MEMBER,
        audit.log,
        audit.jpn.net.run_db,
        JPN_KEY,
        audit.jpn.net.log_keys,
        audit.jpn.net.cosigners,
        audit.jpn.net.state_path,
        Counter("alarms", "test", ["kind", "log"], registry=registry),
        uncosigned=gauge,
    )
    stopped = asyncio.Event()
    stopped.set()
    await again.run(audit.jpn.nc, stopped)
    # A roster with no witness keys for our log (every partner's revoked) starts too.
    alone = AuditNet(
        MEMBER,
        audit.log,
        audit.jpn.net.run_db,
        JPN_KEY,
        audit.jpn.net.log_keys,
        [],
        audit.jpn.net.state_path,
        Counter("alarms", "test", ["kind", "log"], registry=CollectorRegistry()),
    )
    await alone.run(audit.jpn.nc, stopped)
    assert alone.cosigned_size == {}
    again.published((audit.log.latest_checkpoint() or "").encode())
    await asyncio.sleep(0.1)
    assert registry.get_sample_value("uncosigned", {"witness": "USA"}) == 0
    assert (registry.get_sample_value("uncosigned", {"witness": "KOR"}) or 0) >= 0.1


async def test_a_log_that_stops_growing_is_cosigned_without_waiting_out_the_interval(
    audit: Audit,
) -> None:
    await audit.grow(0)
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned size 3")
    # Still an hour to the next round, but nothing newer follows this checkpoint.
    audit.usa.net.settled = 0.3
    await audit.grow(4)
    await await_for(lambda: audit.usa_state().size == 7, 10, "USA cosigned size 7")
    assert audit.proof_requests == [(3, 7)]
    await await_for(lambda: len(audit.usa_cosignatures) == 2, 10, "second cosignature")


async def test_copies_of_a_held_checkpoint_do_not_keep_the_log_from_settling(
    audit: Audit,
) -> None:
    # Each witness's line merged into a log makes it republish its latest checkpoint.
    # A copy is not a newer checkpoint: the round comes once the log has settled,
    # not once the copies stop (at rest ten witnesses took 7-10 s, not 2.5).
    await audit.grow(0)
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned size 3")
    audit.usa.net.settled = 0.5  # and still an hour to the next round
    note = parse(await audit.grow(4))
    copy = Note(note.text, (*note.signatures, cosign(note, "KOR", KOR_KEY, 7))).render()
    deadline = time.monotonic() + 5
    while audit.usa_state().size != 7 and time.monotonic() < deadline:
        await audit.publish_checkpoint(copy)  # KOR's line merged: the log republishes
        await asyncio.sleep(0.1)
    assert audit.usa_state().size == 7, "USA waited for the copies to stop"
    assert audit.proof_requests == [(3, 7)]


async def test_a_copy_without_our_line_is_dropped_once_one_with_it_arrives(audit: Audit) -> None:
    # The log republished before our cosignature reached it (other witnesses' lines
    # merging): a race, not a loss. The copy that follows with our line says so,
    # and the one held without it is not signed again at the next round.
    note = await audit.grow(2)
    await await_for(lambda: len(audit.usa_cosignatures) == 1, 10, "the first cosignature")
    await audit.publish_checkpoint(note)  # the same checkpoint, without USA's line
    await await_for(lambda: MEMBER in audit.usa.net._pending, 10, "USA holding the copy")
    await await_for(
        lambda: "\u2014 USA " in (audit.log.latest_checkpoint() or ""), 10, "JPN merged USA's"
    )
    await audit.publish_checkpoint(audit.log.latest_checkpoint() or "")
    await await_for(lambda: MEMBER not in audit.usa.net._pending, 10, "the copy dropped")
    # A round now would sign anything still held; a note on KOR's subject brings one,
    # and its refusal (the only error so far) says the round ran.
    assert audit.usa.net.last_error is None
    audit.usa.net.interval = 0
    await audit.tap.publish("msmt.audit.KOR.checkpoint", b"KOR\n")
    await audit.tap.flush()
    await await_for(lambda: audit.usa.net.last_error is not None, 10, "the round (KOR's refused)")
    await audit.tap.flush()
    assert len(audit.usa_cosignatures) == 1
    assert audit.usa.net.backlog == 0


async def test_under_load_rounds_start_on_the_wall_clocks_multiples_of_the_interval(
    audit: Audit,
) -> None:
    # Every witness must take the same checkpoints for their cosignatures to meet on
    # them. Timed from a witness's own last round, one round off the beat (a starved
    # loop, a proof timing out) kept it out of step with the others until the next
    # quiet spell: under load the quorum split. Here the first round, after a quiet
    # spell, starts about 0.55 s past a whole second; the later ones must start on one.
    starts: list[float] = []

    async def on_proof(msg: Msg) -> None:
        starts.append(time.time())  # no spread: a round asks for its proof as it starts

    await audit.tap.subscribe(f"msmt.audit.{MEMBER}.proof", cb=on_proof)
    await audit.tap.flush()
    net = audit.usa.net
    net.spread = 0
    await asyncio.sleep((0.55 - time.time()) % 1)  # to 0.55 s past a whole second
    await audit.grow(0)
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned size 3")
    first = net._last_round_wall
    assert 0.5 <= first % 1 < 0.9  # so rounds timed from it would never fall under 0.45
    net.interval = 1.0
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:  # a checkpoint every 0.1 s: the log keeps growing
        await audit.grow(1)
        await asyncio.sleep(0.1)
    await audit.tap.flush()
    assert len(starts) >= 3
    # Within 0.45 s of a whole second: a busy machine's loop and hub may be that late.
    assert all(s % 1 < 0.45 for s in starts), [round(s % 1, 2) for s in starts]
    # No two rounds less than half an interval apart: not one at the second after the first.
    assert starts[0] - first >= 0.5


class _Latest:
    """The spread's draw at its latest: a round's work as late as it may come."""

    def uniform(self, low: float, high: float) -> float:
        return high


@pytest.fixture
async def spread(audit: Audit, monkeypatch: pytest.MonkeyPatch) -> Audit:
    """``audit`` once USA cosigned size 3, a delayed round's work as late as it may come.

    That first round follows a quiet spell, so it is not delayed (the hour's
    interval would delay it by most of an hour).
    """
    monkeypatch.setattr(auditnet_witness, "_jitter", _Latest())
    await audit.grow(0)
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned size 3")
    return audit


async def test_under_load_a_round_takes_its_checkpoints_at_its_start_and_works_later(
    spread: Audit,
) -> None:
    # Every witness's round starts at the same time, so they all cosign the same
    # checkpoints; under load each does the work later, at its own random point.
    audit, net = spread, spread.usa.net
    net.interval, net.spread = 1.5, 1.0  # rounds 1.5 s apart, the work 1.5 s after each start
    taken = await audit.grow(4)
    await await_for(lambda: net._batch is not None, 10, "USA's round taking size 7")
    assert net._batch == {MEMBER: taken.encode()}
    # While the work waits the log republishes size 7 (as when cosignatures merge into
    # it): held, but not a lost cosignature of ours, so not signed twice.
    await audit.publish_checkpoint(taken)
    await await_for(lambda: MEMBER in net._pending, 10, "USA holding the republished size 7")
    assert audit.usa_state().size == 3
    await await_for(lambda: audit.usa_state().size == 7, 10, "USA cosigned size 7")
    # The state moves before it is saved; the copy is dropped once the cosignature is out.
    await await_for(lambda: len(audit.usa_cosignatures) == 2, 10, "USA's cosignature of 7")
    assert net.backlog == 0
    # The next round takes size 12 at its start; size 14, come meanwhile, waits for the one after.
    twelve = await audit.grow(5)
    await await_for(lambda: net._batch == {MEMBER: twelve.encode()}, 10, "the round taking 12")
    fourteen = await audit.grow(2)
    await await_for(lambda: net._pending.get(MEMBER) == fourteen.encode(), 10, "USA holding 14")
    assert audit.usa_state().size == 7
    await await_for(lambda: audit.usa_state().size == 14, 20, "USA cosigned size 14")
    await await_for(lambda: len(audit.usa_cosignatures) == 4, 10, "USA's cosignature of 14")
    sizes = [parse_body(parse(c).text).size for c in audit.usa_cosignatures]
    assert sizes == [3, 7, 12, 14]
    assert audit.proof_requests == [
        (3, 7),
        (7, 12),
        (12, 14),
    ]


async def test_a_delayed_round_works_at_once_when_the_log_stops_growing(spread: Audit) -> None:
    # A burst's last checkpoints are cosigned once the logs settle, not only when
    # the delayed work of the round that took them comes due.
    audit, net = spread, spread.usa.net
    net.interval, net.spread, net.settled = 2.0, 1.0, 0.5  # the work due 2 s after the start

    async def feed() -> None:  # a checkpoint every 0.1 s: the log keeps growing
        while net._batch is None:
            await audit.grow(1)
            await asyncio.sleep(0.1)

    await asyncio.wait_for(feed(), 10)
    batch = net._batch or {}
    assert list(batch) == [MEMBER]  # JPN's checkpoint at the round's start, and nothing else
    taken = parse_body(parse(batch[MEMBER]).text).size
    work_at = net._work_at
    await await_for(lambda: audit.usa_state().size >= taken, 10, f"USA cosigned size {taken}")
    assert time.monotonic() < work_at  # settled: not left to wait out the delay
    await await_for(lambda: audit.usa_state().size == audit.log.size, 10, "the last checkpoint")


async def test_a_delayed_round_works_at_once_when_only_copies_follow_its_checkpoint(
    spread: Audit,
) -> None:
    # The log stopped growing, but other witnesses' lines merging into its last
    # checkpoint keep it republishing: settled all the same.
    audit, net = spread, spread.usa.net
    net.interval, net.spread, net.settled = 2.0, 1.0, 0.5  # the work due 2 s after the start

    async def feed() -> None:
        while net._batch is None:
            await audit.grow(1)
            await asyncio.sleep(0.1)

    await asyncio.wait_for(feed(), 10)
    work_at = net._work_at
    note = parse(audit.log.latest_checkpoint() or "")
    copy = Note(note.text, (*note.signatures, cosign(note, "KOR", KOR_KEY, 7))).render()
    while audit.usa_state().size != audit.log.size and time.monotonic() < work_at + 5:
        await audit.publish_checkpoint(copy)
        await asyncio.sleep(0.1)
    assert audit.usa_state().size == audit.log.size
    assert time.monotonic() < work_at  # not left to wait out the delay


async def test_cosignatures_merged_are_logged_at_once_then_once_a_minute(audit: Audit) -> None:
    # Under load about 33 cosignature notes a minute reached each node, one info
    # line each: the first still shows at once, then one line sums up the minute.
    def merged(size: int) -> Callable[[], bool]:
        return lambda: "\u2014 USA " in audit.log.checkpoint_at(size)

    def lines() -> list[dict[str, Any]]:
        return [
            {k: e[k] for k in ("witnesses", "checkpoints", "size")}
            for e in logs
            if e["event"] == "cosigned"
        ]

    with capture_logs() as logs:
        await audit.grow(0)
        await await_for(merged(3), 10, "USA's cosignature of size 3 merged")
        # The line follows the merge's commit on the store thread (a CI run under load
        # read the checkpoint before the line was out).
        await await_for(lambda: lines() != [], 10, "the first cosigned line")
        assert lines() == [{"witnesses": {"USA": 1}, "checkpoints": 1, "size": 3}]
        audit.usa.net.interval = 0
        await audit.grow(4)
        await await_for(merged(7), 10, "USA's cosignature of size 7 merged")
        await audit.grow(5)
        await await_for(merged(12), 10, "USA's cosignature of size 12 merged")
        assert len(lines()) == 1  # within the minute: counted, not logged yet
        audit.jpn.net.cosigned_every = 0  # the minute is up
        await await_for(lambda: len(lines()) == 2, 10, "the minute's line")
    assert lines()[1] == {"witnesses": {"USA": 2}, "checkpoints": 2, "size": 12}


async def test_a_republished_checkpoint_already_cosigned_is_not_witnessed_again(
    audit: Audit,
) -> None:
    await audit.grow(0)
    await await_for(
        lambda: "\u2014 USA " in (audit.log.latest_checkpoint() or ""), 10, "cosigned and merged"
    )
    # JPN republishes the same checkpoint with USA's line merged (its text changed).
    await audit.publish_checkpoint(audit.log.latest_checkpoint() or "")
    # A marker behind it on the same subscription: once it is held, the republication was seen.
    await audit.jpn.nc.publish("msmt.audit.KOR.checkpoint", b"marker")
    await audit.jpn.nc.flush()
    await await_for(lambda: "KOR" in audit.usa.net._pending, 10, "the marker")
    assert MEMBER not in audit.usa.net._pending
    assert len(audit.usa_cosignatures) == 1


async def test_a_cosignature_lost_on_the_way_is_made_again_when_the_log_republishes(
    audit: Audit,
) -> None:
    # USA cosigned JPN's checkpoint, but its line never reached JPN (a hub restart):
    # JPN republishes the note without it, and USA signs that checkpoint again
    # (C2SP tlog-witness cosigns the size it holds again). No alarm, no proof asked.
    note = await audit.grow(2)
    await await_for(lambda: len(audit.usa_cosignatures) == 1, 10, "the first cosignature")
    requests = len(audit.proof_requests)
    audit.usa.net.interval = 0
    await audit.publish_checkpoint(note)  # the same text, still without USA's line
    await await_for(lambda: len(audit.usa_cosignatures) == 2, 10, "the cosignature again")
    again = parse(audit.usa_cosignatures[1].decode())
    assert again.text == parse(note).text
    assert [s.name for s in again.signatures] == ["USA"]
    assert audit.usa.alarm_count() == 0
    assert len(audit.proof_requests) == requests
    assert audit.usa_state().size == audit.log.size


async def test_cosignatures_of_other_logs_are_ignored_and_ours_checked_in_full(
    audit: Audit,
) -> None:
    note = parse(audit.log.latest_checkpoint() or "")
    kor_note = sign_checkpoint(parse_body(note.text.replace("JPN", "KOR", 1)), KOR_KEY)
    usa_on_kor = kor_note.with_signatures(cosign(kor_note, "USA", USA_KEY, 7)).render()
    good = note.with_signatures(cosign(note, "USA", USA_KEY, 7))
    bad_line = good.signatures[-1]
    forged = Signature(bad_line.name, bad_line.key_id, bad_line.sig[:8] + bytes(64))
    publish = audit.usa.nc.publish
    # Not about JPN's log: dropped by JPN before parsing, however malformed.
    await publish("msmt.audit.USA.cosignature", b"garbage that is no note")
    await publish("msmt.audit.USA.cosignature", usa_on_kor.encode())
    # About JPN's log: parsed and verified; a forged line is refused (quietly: it is
    # the publisher's invention, and says nothing about JPN's log).
    await publish("msmt.audit.USA.cosignature", note.with_signatures(forged).render().encode())
    await publish("msmt.audit.USA.cosignature", b"JPN\nnot a checkpoint\n")
    await publish("msmt.audit.USA.cosignature", good.render().encode())
    await audit.usa.nc.flush()
    await await_for(
        lambda: "\u2014 USA " in (audit.log.latest_checkpoint() or ""), 10, "the good one merged"
    )
    # Delivered in order: the two refused are the forged line and the malformed note.
    assert audit.jpn.refused_count() == 2
    assert audit.jpn.alarm_count() == 0
    assert audit.log.latest_checkpoint() == good.render()


async def test_a_partners_checkpoint_on_another_members_subject_is_refused(
    audit: Audit,
) -> None:
    # KOR replays JPN's genuine (older) checkpoint as its own: not JPN's log, not KOR's.
    audit.append(2)
    audit.usa.net.interval = 0
    await audit.usa.nc.publish("msmt.audit.KOR.checkpoint", audit.log.checkpoint_at(3).encode())
    await audit.usa.nc.flush()
    await await_for(lambda: audit.usa.net.last_error is not None, 10, "USA's refusal")
    assert "checkpoint for 'JPN' published on KOR's subject" in (audit.usa.net.last_error or "")
    assert audit.usa.alarm_count() == 0
    assert audit.usa.net.witness.state == {}
    assert audit.usa_cosignatures == []


async def test_a_member_that_joined_after_the_start_is_refused_with_the_restart_hint(
    audit: Audit,
) -> None:
    # GBR joined the roster after USA's node started: USA follows no log of GBR's until
    # it restarts on the new roster. The refusal said only "does not follow log GBR",
    # unlike a partner's rotated key, whose refusal says to restart.
    audit.usa.net.interval = 0
    note = sign_checkpoint(Checkpoint("GBR", 1, bytes(32)), KOR_KEY).render()
    with capture_logs() as logs:
        await audit.tap.publish("msmt.audit.GBR.checkpoint", note.encode())
        await audit.tap.flush()
        await await_for(lambda: audit.usa.net.last_error is not None, 10, "USA's refusal")
    refused = [e for e in logs if e["event"] == "witness_refused" and "USA" in e["error"]]
    assert [e["error"] for e in refused] == [
        "witness USA does not follow log GBR (if GBR joined the roster since this node"
        " started, restart with the new roster)"
    ]
    assert audit.usa.net.last_error == f"witness: {refused[0]['error']}"
    assert audit.usa.alarm_count() == 0


async def test_a_log_that_does_not_answer_is_retried_at_the_next_round(
    audit: Audit, nats_server: NatsServer
) -> None:
    await audit.grow(0)
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned size 3")
    # JPN's proof service goes away (the tap's subscription stays, so requests time out);
    # its last checkpoint is published once and never again.
    await audit.jpn.nc.close()
    audit.usa.net.interval = 0.2
    await audit.tap.publish(f"msmt.audit.{MEMBER}.checkpoint", audit.append(6).encode())
    await audit.tap.flush()
    await await_for(
        lambda: "no proof from JPN" in (audit.usa.net.last_error or ""), 10, "USA's refusal"
    )
    assert audit.usa_state().size == 3
    # JPN comes back, serving proofs only and publishing nothing: the checkpoint that
    # went unanswered was kept for the next rounds, and gets its cosignature.
    audit.jpn.nc = await nats.connect(nats_server.url)
    await audit.jpn.nc.subscribe(f"msmt.audit.{MEMBER}.proof", cb=audit.jpn.net._on_proof_request)
    await audit.jpn.nc.flush()
    await await_for(lambda: audit.usa_state().size == 9, 10, "USA cosigned size 9")
    assert audit.usa.alarm_count() == 0


async def test_a_state_that_cannot_be_saved_is_not_cosigned_and_is_retried(
    audit: Audit, tmp_path: Path
) -> None:
    # The witness state goes to a directory that does not exist yet: saving fails.
    audit.usa.net.state_path = tmp_path / "later" / "ws.json"
    audit.usa.net.interval = 0.2
    with capture_logs() as logs:
        await audit.grow(0)
        await await_for(
            lambda: "cannot save witness state" in (audit.usa.net.last_error or ""), 10, "refusal"
        )
        await asyncio.sleep(0.6)  # more rounds, each failing the same way
    # Said as this node's own failure, once, not as a partner's (a full-disk trial
    # read witness_refused, which NODE.md gives as a partner's checkpoint refused).
    said = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("witness_")]
    assert said == [("witness_state_unsaved", "error")]
    await audit.usa.nc.flush()
    await audit.tap.flush()
    assert audit.usa_cosignatures == []
    # Unsaved means not advanced either: put back after each failed round (a round in
    # flight holds its cosignatures in memory until its save fails, so not at any moment).
    await await_for(lambda: audit.usa.net.witness.state == {}, 5, "the state put back")
    (tmp_path / "later").mkdir()
    await await_for(lambda: len(audit.usa_cosignatures) == 1, 10, "cosigned once saved")
    assert audit.usa_state().size == 3
    assert (tmp_path / "later" / "ws.json").is_file()


def test_the_next_round_is_the_first_multiple_of_the_interval_half_of_it_later() -> None:
    # On time, or late by less than half the interval: the next multiple.
    assert auditnet.next_round(100.0, 5.0) == 105.0
    assert auditnet.next_round(102.4, 5.0) == 105.0
    # After a quiet spell a round starts at once, whenever: never two within half an interval.
    assert auditnet.next_round(97.4, 5.0) == 100.0
    assert auditnet.next_round(97.6, 5.0) == 105.0
    # Late by more than half: it skips one, and the one after is back on the beat.
    assert auditnet.next_round(103.0, 5.0) == 110.0
    assert auditnet.next_round(110.0, 5.0) == 115.0
    # At the wall clock's size today (seconds since 1970) the multiples stay exact.
    now = 1_796_000_001.3
    assert auditnet.next_round(now, 5.0) == 1_796_000_005.0
    assert auditnet.next_round(now, 0) == now  # no interval: due at once


async def test_a_malformed_checkpoint_costs_only_itself_and_the_node_goes_on(
    audit: Audit,
) -> None:
    # One unsigned note on KOR's own subject, a non-ASCII character in its root
    # line: it once stopped every node before any signature was checked.
    audit.usa.net.interval = 0
    note = f"KOR\n5\n{'A' * 42}\u00e9=\n\n\u2014 KOR AAAAAAAAAAAA\n"
    await audit.tap.publish("msmt.audit.KOR.checkpoint", note.encode())
    await audit.tap.flush()
    await await_for(lambda: audit.usa.net.last_error is not None, 10, "USA's refusal")
    assert "checkpoint of KOR: checkpoint root hash is not valid base64" in (
        audit.usa.net.last_error or ""
    )
    await audit.grow(0)
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned JPN's log")
    assert audit.usa.task is not None
    assert not audit.usa.task.done()
    assert "KOR" not in audit.usa.net.witness.state
    assert audit.usa.alarm_count() == 0


@pytest.mark.parametrize(
    ("note", "reason"),
    [
        # Once "witness USA does not follow a log of that origin": neither the
        # subject nor what was wrong.
        (
            b"hello",
            "a note on KOR's checkpoint subject is not a checkpoint of a log this witness"
            " follows (its first line names none)",
        ),
        (b"\xff\xfe\n", "a note on KOR's checkpoint subject is not a checkpoint"),
        # Once "no blank line before its signatures".
        (b"KOR\n5\n" + b"A" * 900_000 + b"\n", "signed note is over 16384 bytes"),
    ],
    ids=["text", "bytes", "huge"],
)
async def test_junk_on_a_partners_checkpoint_subject_is_named_for_what_it_is(
    audit: Audit, note: bytes, reason: str
) -> None:
    audit.usa.net.interval = 0
    await audit.tap.publish("msmt.audit.KOR.checkpoint", note)
    await audit.tap.flush()
    await await_for(lambda: audit.usa.net.last_error is not None, 10, "USA's refusal")
    assert reason in (audit.usa.net.last_error or "")
    assert audit.usa.alarm_count() == 0


async def test_a_partner_flooding_its_own_subject_does_not_push_out_anothers_checkpoint(
    audit: Audit,
) -> None:
    # An insider trial flooded its own checkpoint subject: in the queue of 256 the
    # witnesses shared, its notes pushed out the other logs', which went uncosigned.
    # One slot per log now. Delivered here without a pause between, as a burst is.
    audit.usa.net.interval = 0
    note = audit.append(0)
    usa = audit.usa.net
    await usa._on_checkpoint(
        Msg(audit.tap, subject=f"msmt.audit.{MEMBER}.checkpoint", data=note.encode())
    )
    for i in range(2000):
        junk = f"junk {i}".encode()
        await usa._on_checkpoint(Msg(audit.tap, subject="msmt.audit.KOR.checkpoint", data=junk))
    assert usa.backlog <= 2  # JPN's and KOR's latest, nothing more
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned JPN's size 3")


async def _kor_answers_proofs_with(audit: Audit, reply: bytes) -> list[bytes]:
    """USA has cosigned KOR's log at size 3; KOR's proof service answers ``reply``."""
    audit.usa.net.witness.state["KOR"] = LogState(3, bytes(32))
    asked: list[bytes] = []

    async def answer(msg: Msg) -> None:
        asked.append(msg.data)
        await msg.respond(reply)

    await audit.tap.subscribe("msmt.audit.KOR.proof", cb=answer)
    await audit.tap.flush()
    audit.usa.net.interval = 0
    kor = sign_checkpoint(Checkpoint("KOR", 40, bytes(range(32))), KOR_KEY).render()
    await audit.tap.publish("msmt.audit.KOR.checkpoint", kor.encode())
    await audit.tap.flush()
    return asked


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"[" * 200_000, "more than 16384"),
        (b'{"old":3,"new":' + b"9" * 5_000 + b',"proof":[]}', "more than 20 digits"),
        (
            json.dumps(
                {
                    "log": "KOR",
                    "new": 40,
                    "nonce": "AAECAwQFBgcICQoLDA0ODw==",
                    "old": 3,
                    "proof": ["A" * 42 + "\u00e9="],
                    "sig": "A" * 86 + "==",
                    "size": 40,
                }
            ).encode(),
            "base64",
        ),
        # The documented refusal: the log's reason reaches the witness's operator.
        (
            b'{"error":"no consistency proof from size 3 to 40 (log size 3)"}',
            "the log answered with an error: 'no consistency proof from size 3 to 40 (log",
        ),
    ],
    ids=["deep", "long-integer", "non-ascii-hash", "error-reply"],
)
async def test_a_hostile_proof_reply_costs_only_that_log_and_witnessing_goes_on(
    audit: Audit, reply: bytes, reason: str
) -> None:
    # KOR's checkpoint is validly signed and extends what USA cosigned; its
    # answer to USA's proof request is what once stopped the node.
    asked = await _kor_answers_proofs_with(audit, reply)
    await await_for(lambda: audit.usa.net.last_error is not None, 10, "USA's refusal")
    assert [parse_proof_request(a)[:2] for a in asked] == [(3, 40)]
    assert "KOR's proof reply refused" in (audit.usa.net.last_error or "")
    assert reason in (audit.usa.net.last_error or "")
    await audit.grow(0)
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned JPN's log")
    assert audit.usa.task is not None
    assert not audit.usa.task.done()
    assert audit.usa.net.witness.state["KOR"] == LogState(3, bytes(32))  # never cosigned
    assert all(not c.startswith(b"KOR\n") for c in audit.usa_cosignatures)


class _KorCopies:
    """KOR's log as whichever copy of it runs now serves it: its proofs on the hub."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.logs: list[AuditLog] = []
        self.serving: AuditLog | None = None

    def copy(self, name: str, entries: Callable[[int], Any], size: int) -> AuditLog:
        """A log of KOR's with ``size`` entries made by ``entries``, one batch."""
        log = AuditLog(self.tmp_path / name, "KOR", KOR_KEY)
        self.logs.append(log)
        log.append_many([entries(i) for i in range(size)])
        return log

    def cosigned_by_usa(self, audit: Audit, size: int) -> AuditLog:
        """KOR's honest log of ``size`` entries, which USA has cosigned at that size."""
        log = self.copy("honest", lambda i: event(i, "KOR"), size)
        root = parse_body(parse(log.checkpoint_at(size)).text).root
        audit.usa.net.witness.state["KOR"] = LogState(size, root)
        return log

    async def answer(self, msg: Msg) -> None:
        assert self.serving is not None
        old, new, nonce = parse_proof_request(msg.data)
        size = self.serving.size
        # Signed, as KOR's node signs its replies: the log's own word, which may raise an alarm.
        try:
            proof = [] if old == 0 else self.serving.consistency_proof(old, new)
        except AuditError as exc:  # sizes beyond the copy serving now
            await msg.respond(
                proof_refusal("KOR", old, new, str(exc), size=size, nonce=nonce, signer=KOR_KEY)
            )
            return
        await msg.respond(
            proof_response("KOR", old, new, proof, size=size, nonce=nonce, signer=KOR_KEY)
        )

    def close(self) -> None:
        for log in self.logs:
            log.close()


async def _witness_kor(audit: Audit, log: AuditLog, size: int | None = None) -> None:
    """Publish ``log``'s checkpoint at ``size`` (its latest) as KOR; wait for USA's round."""
    net = audit.usa.net
    before = net._standing.get(("fork", "KOR"))
    seen = -1.0 if before is None else before.seen
    note = log.checkpoint_at(size) if size is not None else log.latest_checkpoint() or ""
    await audit.tap.publish("msmt.audit.KOR.checkpoint", note.encode())
    await audit.tap.flush()
    await await_for(
        lambda: (
            (s := net._standing.get(("fork", "KOR"))) is not None
            and s.seen > seen
            and s.checkpoint is not None
            and s.checkpoint.size == (size or log.size)
        ),
        10,
        f"USA's round on KOR's size {size or log.size}",
    )


async def _usa_refuses_or_alarms(audit: Audit, note: str) -> None:
    """Publish ``note`` on KOR's subject and wait until USA's round has dealt with it."""
    audit.usa.net.last_error = None
    audit.usa.net.interval = 0
    await audit.tap.publish("msmt.audit.KOR.checkpoint", note.encode())
    await audit.tap.flush()
    await await_for(
        lambda: audit.usa.net.last_error is not None or audit.usa.alarm_count() > 0,
        10,
        "USA's round on KOR's checkpoint",
    )


async def test_an_old_checkpoint_replayed_is_no_rollback_unless_the_log_says_it_went_back(
    audit: Audit, tmp_path: Path
) -> None:
    # A hostile-hub review: the hub republished a log's genuine old checkpoint after
    # the witnesses had cosigned a later one, and every witness raised a rollback
    # alarm on an honest log. Its signature shows only that the log once had that size.
    kor = _KorCopies(tmp_path)
    try:
        log = kor.cosigned_by_usa(audit, 12)
        cosigned = audit.usa.net.witness.state["KOR"]
        log3 = kor.copy("prefix", lambda i: event(i, "KOR"), 3)
        old = log3.latest_checkpoint() or ""  # the same history's size-3 checkpoint
        # 1. The log does not answer (down, or the hub keeps its replies): proves nothing.
        await _usa_refuses_or_alarms(audit, old)
        assert audit.usa.alarm_count() == 0
        assert "below the size 12 this witness cosigned" in (audit.usa.net.last_error or "")
        assert "no alarm" in (audit.usa.net.last_error or "")
        # 2. The log answers, signed, with a proof from 3 to 12: old news, dropped quietly.
        kor.serving = log
        asked: list[tuple[int, int]] = []

        async def answer(msg: Msg) -> None:
            asked.append(parse_proof_request(msg.data)[:2])
            await kor.answer(msg)

        await audit.tap.subscribe("msmt.audit.KOR.proof", cb=answer)
        await audit.tap.flush()
        audit.usa.net.last_error = None
        with capture_logs() as logs:
            await audit.tap.publish("msmt.audit.KOR.checkpoint", old.encode())
            await audit.tap.flush()
            await await_for(lambda: asked == [(3, 12)], 10, "USA asking KOR for 3 to 12")
            # Rounds run one after another: once a later one cosigned JPN, KOR's was done.
            await audit.grow(0)
            await await_for(lambda: audit.usa_state().size == 3, 10, "USA's next round")
        assert audit.usa.alarm_count() == 0
        assert audit.usa.net.last_error is None
        assert [e for e in logs if e["event"] in ("witness_refused", "audit_alarm")] == []
        assert audit.usa.net.witness.state["KOR"] == LogState(12, cosigned.root)
        # 3. The log itself is at size 3 now (restored from a backup) and signs so: the alarm.
        kor.serving = log3
        await _usa_refuses_or_alarms(audit, old)
        assert audit.usa.alarms_on("rollback", "KOR") == 1
        assert "size 3 after size 12" in (audit.usa.net.alarm or "")
    finally:
        kor.close()


async def test_a_failing_proof_the_log_did_not_sign_is_no_fork(audit: Audit) -> None:
    # A hostile-hub review: the hub answered proof requests itself with made-up hashes,
    # and every witness raised a fork alarm on an honest log. A failing proof is the
    # log's word only with its signature over this request's nonce.
    made_up = proof_response("KOR", 3, 40, [bytes(32)], size=40, nonce=bytes(16), signer=USA_KEY)
    asked = await _kor_answers_proofs_with(audit, made_up)
    await await_for(lambda: audit.usa.net.last_error is not None, 10, "USA's refusal")
    assert [parse_proof_request(a)[:2] for a in asked] == [(3, 40)]
    assert audit.usa.alarm_count() == 0
    assert "does not verify, and the log did not sign it" in (audit.usa.net.last_error or "")
    assert audit.usa.net.witness.state["KOR"] == LogState(3, bytes(32))  # not cosigned


@pytest.mark.parametrize("hub", ["refusal-of-other-sizes", "garbage", "silence"])
async def test_the_hub_cannot_make_a_standing_fork_count_again(
    audit: Audit, tmp_path: Path, hub: str
) -> None:
    # A review of the signed replies: the hub took a witness's nonce to the forked log
    # with other sizes, and passed its signed refusal back as the answer; or answered
    # junk. Either counted the standing fork again, as if a second fork had come.
    kor = _KorCopies(tmp_path)
    try:
        kor.cosigned_by_usa(audit, 3)
        forked = kor.copy("forked", lambda i: unstored_event(i, "KOR"), 3)
        kor.serving = forked
        seen: list[tuple[int, int]] = []

        async def answer(msg: Msg) -> None:
            old, new, nonce = parse_proof_request(msg.data)
            seen.append((old, new))
            if (old, new) != (5, 8):  # only the standing alarm's question is the hub's
                await kor.answer(msg)
            elif hub == "refusal-of-other-sizes":
                reason = f"no consistency proof from size 0 to {2**40} (log size 8)"
                await msg.respond(
                    proof_refusal("KOR", 0, 2**40, reason, size=8, nonce=nonce, signer=KOR_KEY)
                )
            elif hub == "garbage":
                await msg.respond(b'{"error":"x","log":"KOR","size":9007199254740993}')

        await audit.tap.subscribe("msmt.audit.KOR.proof", cb=answer)
        await audit.tap.flush()
        audit.usa.net.interval = 0
        await _witness_kor(audit, forked)  # size 3, another root: the alarm
        for grow in (2, 3):
            forked.append_many([unstored_event(forked.size + i, "KOR") for i in range(grow)])
            await _witness_kor(audit, forked)  # sizes 5, then 8: the hub answers (5, 8)
        assert (5, 8) in seen
        assert audit.usa.alarms_on("fork", "KOR") == 1
    finally:
        kor.close()


async def test_a_forked_log_is_one_alarm_while_it_grows_and_a_second_fork_is_another(
    audit: Audit, tmp_path: Path
) -> None:
    # A day-2 trial: a partner's node restored from a backup published every second,
    # and each of its checkpoints counted a fork at every witness (24 a minute), so
    # the increase() alert never cleared and the counter did not say whose log.
    kor = _KorCopies(tmp_path)
    try:
        kor.cosigned_by_usa(audit, 3)
        pinned = audit.usa.net.witness.state["KOR"]
        await audit.tap.subscribe("msmt.audit.KOR.proof", cb=kor.answer)
        await audit.tap.flush()
        audit.usa.net.interval = 0
        assert audit.usa.alarms_on("fork", "KOR") == 0
        assert audit.usa.active("fork", "KOR") == 0
        # The restored copy: another history from entry 0, signed by KOR's real key.
        forked = kor.copy("forked", lambda i: unstored_event(i, "KOR"), 3)
        kor.serving = forked
        with capture_logs() as logs:
            await _witness_kor(audit, forked)  # size 3, another root: no proof needed
            for grow in (2, 3, 4):
                forked.append_many([unstored_event(forked.size + i, "KOR") for i in range(grow)])
                await _witness_kor(audit, forked)  # sizes 5, 8, 12: each proved from 3
            await _witness_kor(audit, forked, 8)  # republished late: seen before
            await _witness_kor(audit, forked)  # size 12 again
        # Six checkpoints of one forked history: one alarm, standing.
        assert audit.usa.alarms_on("fork", "KOR") == 1
        assert audit.usa.active("fork", "KOR") == 1
        assert audit.usa.alarm_count() == 1
        assert audit.usa.active("rollback", "KOR") == audit.usa.active("fork", "JPN") == 0
        alarms = [e for e in logs if e["event"] == "audit_alarm"]
        assert [(e["kind"], e["origin"]) for e in alarms] == [("fork", "KOR")]
        assert "fork detected on log KOR" in (audit.usa.net.alarm or "")
        # Never cosigned, whatever the count: the witness still holds the honest state.
        assert audit.usa.net.witness.state["KOR"] == LogState(3, pinned.root)
        assert all(not c.startswith(b"KOR\n") for c in audit.usa_cosignatures)
        # Another copy takes over with yet another history: it cannot prove that
        # its checkpoint extends the forked one, so it is a second conflict.
        other = kor.copy("other", lambda i: unstored_event(i + 1000, "KOR"), 20)
        kor.serving = other
        await _witness_kor(audit, other)
        assert audit.usa.alarms_on("fork", "KOR") == 2
        await _witness_kor(audit, forked, 5)  # the first fork again, below: a third
        assert audit.usa.alarms_on("fork", "KOR") == 3
        assert audit.usa.net.witness.state["KOR"] == LogState(3, pinned.root)
        # No conflicting checkpoint for alarm_clear seconds: the alarm no longer stands,
        # while the counter keeps what it counted.
        audit.usa.net.alarm_clear = 0.2
        await await_for(lambda: audit.usa.active("fork", "KOR") == 0, 10, "the alarm to lapse")
        assert audit.usa.alarms_on("fork", "KOR") == 3
    finally:
        kor.close()


async def test_an_unexpected_failure_with_one_log_is_reported_by_type_and_not_cosigned(
    audit: Audit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever bug a partner's bytes may reach next: it costs that checkpoint
    # alone, is not cosigned, and is reported by its type (the text may quote them).
    opened = audit.usa.net.witness.open

    def open_breaking_on_kor(data: bytes | str) -> Any:
        text = data.decode() if isinstance(data, bytes) else data
        if text.startswith("KOR\n"):
            raise KeyError("hostile content")
        return opened(data)

    monkeypatch.setattr(audit.usa.net.witness, "open", open_breaking_on_kor)
    audit.usa.net.interval = 0
    kor = sign_checkpoint(Checkpoint("KOR", 40, bytes(range(32))), KOR_KEY).render()
    with capture_logs() as logs:
        await audit.tap.publish("msmt.audit.KOR.checkpoint", kor.encode())
        await audit.tap.flush()
        await await_for(lambda: audit.usa.net.last_error is not None, 10, "USA's report")
        await audit.grow(0)
        await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned JPN's log")
    assert audit.usa.net.last_error == "witness: checkpoint from KOR failed (KeyError)"
    failures = [e for e in logs if e["event"] == "audit_message_failed"]
    assert [(e["source"], e["error"], e["log_level"]) for e in failures] == [
        ("KOR", "KeyError", "error")
    ]
    assert "hostile content" not in repr(logs)
    assert audit.usa.task is not None
    assert not audit.usa.task.done()
    assert "KOR" not in audit.usa.net.witness.state


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 100_000, "more than 1024"),
        (b"[" * 1_020, "nested too deeply|not JSON"),
        (b'{"old":1,"new":' + b"9" * 5_000 + b"}", "more than 1024"),
        (b'{"old":1,"new":' + b"9" * 100 + b"}", "more than 20 digits"),
        (b'{"old":1,"new":3,"old":2}', "duplicate key"),
        (b'{"old":1,"new":"3","nonce":"AAECAwQFBgcICQoLDA0ODw=="}', "integer from 0 to 2\\^53 - 1"),
        # A review: past RFC 8785's integers the signed refusal failed, "internal error".
        (
            b'{"old":1,"new":9007199254740992,"nonce":"AAECAwQFBgcICQoLDA0ODw=="}',
            "integer from 0 to 2\\^53 - 1",
        ),
        (b'{"old":1,"new":3,"size":3}', "exactly 'old', 'new' and 'nonce'"),
    ],
    ids=[
        "deep",
        "deep-short",
        "long",
        "long-integer",
        "duplicate",
        "string",
        "past-2^53",
        "other-members",
    ],
)
async def test_a_malformed_proof_request_gets_an_error_reply(
    audit: Audit, body: bytes, reason: str
) -> None:
    reply = await audit.tap.request(f"msmt.audit.{MEMBER}.proof", body, timeout=3)
    answer = json.loads(reply.data)
    assert list(answer) == ["error"]
    assert re.search(reason, answer["error"])


async def test_a_proof_asked_from_beyond_our_log_tells_our_operator_once(audit: Audit) -> None:
    # A restore drill: the restored node's log was shorter than what every witness had
    # cosigned; they asked for proofs from there, and its operator was told nothing.
    size = audit.log.size
    # As a witness that cosigned size + 9 asks a log now at ``size`` (a review: the first
    # version looked only at the size asked from), then anything beyond the log.
    requests = [(size, size + 9), (size - 1, size + 9), (size + 5, size + 6)]
    with capture_logs() as logs:
        for old, new in requests:
            request = proof_request(old, new, bytes(16))
            await audit.tap.request(f"msmt.audit.{MEMBER}.proof", request, timeout=3)
    told = [e for e in logs if e["event"] == "own_log_behind_witness"]
    assert [(e["asked_from"], e["asked_to"], e["log_size"]) for e in told] == [
        (size, size + 9, size)
    ]  # once a minute
    assert "restored from a backup" in told[0]["hint"]
    assert audit.jpn.net.last_error is None  # anyone may ask: a line, not the status
    with capture_logs() as logs:  # a request within the log says nothing
        await audit.tap.request(f"msmt.audit.{MEMBER}.proof", proof_request(1, size, bytes(16)))
    assert not [e for e in logs if e["event"] == "own_log_behind_witness"]


async def test_a_witness_of_an_earlier_version_gets_the_unsigned_proof_it_reads(
    audit: Audit,
) -> None:
    # A rolling upgrade: versions before signed replies ask without a nonce and refuse
    # any reply but {"old", "new", "proof"}; answered otherwise, no such witness cosigned
    # a log of this version, nor this version's witnesses one of theirs.
    audit.append(5)  # JPN's log: 8 entries
    reply = await audit.tap.request(f"msmt.audit.{MEMBER}.proof", b'{"new":8,"old":3}', timeout=3)
    answer = json.loads(reply.data)
    assert sorted(answer) == ["new", "old", "proof"]
    proof = [base64.b64decode(h) for h in answer["proof"]]
    assert proof == audit.log.consistency_proof(3, 8)
    reply = await audit.tap.request(f"msmt.audit.{MEMBER}.proof", b'{"new":9,"old":3}', timeout=3)
    assert list(json.loads(reply.data)) == ["error"]  # beyond the log: unsigned, as theirs


async def _earlier_kor(audit: Audit, log: AuditLog, proof_from: AuditLog) -> list[bytes]:
    """KOR's node of a version before signed replies, serving ``proof_from``'s proofs."""
    asked: list[bytes] = []

    async def answer(msg: Msg) -> None:
        asked.append(msg.data)
        request = json.loads(msg.data)
        if set(request) != {"old", "new"}:
            await msg.respond(json.dumps({"error": EARLIER_REQUEST_REFUSAL}).encode())
            return
        old, new = request["old"], request["new"]
        hashes = proof_from.consistency_proof(old, new)
        await msg.respond(unsigned_proof_response(old, new, hashes))

    await audit.tap.subscribe("msmt.audit.KOR.proof", cb=answer)
    await audit.tap.flush()
    audit.usa.net.interval = 0
    await audit.tap.publish("msmt.audit.KOR.checkpoint", (log.latest_checkpoint() or "").encode())
    await audit.tap.flush()
    return asked


@pytest.mark.parametrize("history", ["same", "another"])
async def test_a_log_of_an_earlier_version_is_cosigned_only_when_its_proof_verifies(
    audit: Audit, tmp_path: Path, history: str
) -> None:
    # Its reply is unsigned, so a proof that fails is no evidence against the log (the
    # hub could have made it): not cosigned, and no alarm.
    kor = _KorCopies(tmp_path)
    try:
        log = kor.cosigned_by_usa(audit, 12)
        log.append_many([event(12 + i, "KOR") for i in range(8)])
        proofs = log
        if history == "another":
            proofs = kor.copy("other", lambda i: event(i + 1000, "KOR"), 20)
        with capture_logs() as logs:
            asked = await _earlier_kor(audit, log, proofs)
            await await_for(
                lambda: (
                    audit.usa.net.witness.state["KOR"].size == 20
                    if history == "same"
                    else "KOR's proof" in (audit.usa.net.last_error or "")
                ),
                10,
                "USA's round on KOR's checkpoint",
            )
        assert [sorted(json.loads(a)) for a in asked] == [["new", "nonce", "old"], ["new", "old"]]
        assert [e["log"] for e in logs if e["event"] == "witness_earlier_version"] == ["KOR"]
        assert audit.usa.alarm_count() == 0
        if history == "same":
            assert audit.usa.net.witness.state["KOR"].size == 20
        else:
            error = audit.usa.net.last_error or ""
            assert "does not verify, and the log did not sign it" in error
            assert audit.usa.net.witness.state["KOR"].size == 12  # not cosigned
    finally:
        kor.close()


async def test_two_logs_failing_in_turn_are_each_warned_of_once(audit: Audit) -> None:
    # A rolling-upgrade trial: one last-warned text for all logs, so two logs failing
    # every round took turns and were each warned of again: 237 lines in 10 minutes.
    net = audit.usa.net
    with capture_logs() as logs:
        for _ in range(3):
            net._refused("KOR", AuditError("KOR's proof reply refused: x"))
            net._refused("JPN", AuditError("JPN's proof reply refused: y"))
        net._refused("KOR", AuditError("KOR's proof reply refused: z"))  # a new reason
    assert [e["error"] for e in logs if e["event"] == "witness_refused"] == [
        "KOR's proof reply refused: x",
        "JPN's proof reply refused: y",
        "KOR's proof reply refused: z",
    ]


async def test_a_log_that_cannot_read_its_entries_tells_the_partner_no_path(
    audit: Audit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A security review: the reply carried the store's own words, which name the
    # node's paths; the partner learns that the log cannot answer, the operator why.
    def unreadable(old: int, new: int) -> list[bytes]:
        raise StoreError("cannot read audit log /var/lib/msmt-node/audit.sqlite: disk I/O error")

    monkeypatch.setattr(audit.jpn.net, "_consistency_proof", unreadable)
    with capture_logs() as logs:
        reply = await audit.tap.request(
            f"msmt.audit.{MEMBER}.proof", proof_request(1, 3, bytes(16)), timeout=3
        )
    assert json.loads(reply.data) == {"error": "the log cannot read its entries now"}
    assert [e["error"] for e in logs if e["event"] == "proof_unreadable"] == [
        "cannot read audit log /var/lib/msmt-node/audit.sqlite: disk I/O error"
    ]
    assert "disk I/O error" in (audit.jpn.net.last_error or "")


async def test_a_proof_from_size_zero_is_empty_as_c2sp_tlog_witness_has_it(audit: Audit) -> None:
    nonce = bytes(range(16))
    keys = [log_verifier(JPN_KEY)]

    async def ask(old: int, new: int) -> ProofReply:
        reply = await audit.tap.request(
            f"msmt.audit.{MEMBER}.proof", proof_request(old, new, nonce), timeout=3
        )
        parsed = parse_proof_response(reply.data)
        assert parsed.signed_by(MEMBER, nonce, keys)  # every answer to a readable request
        return parsed

    assert (await ask(0, 3)).proof == (await ask(0, 0)).proof == ()
    refused = await ask(0, 4)
    assert (refused.error, refused.size) == (
        "no consistency proof from size 0 to 4 (log size 3)",
        3,
    )
    # The other sizes as before: a real RFC 9162 proof.
    audit.append(4)
    proof = list((await ask(3, 7)).proof)
    old_root, new_root = (parse_body(parse(audit.log.checkpoint_at(n)).text).root for n in (3, 7))
    verify_consistency(3, 7, old_root, new_root, proof)


def _kor_cosigned(checkpoint: Note) -> bytes:
    return Note(checkpoint.text, (cosign(checkpoint, "KOR", KOR_KEY, 7),)).render().encode()


async def _publish_then_merge_a_good_one(audit: Audit, notes: list[tuple[str, bytes]]) -> None:
    """Publish ``notes`` (publisher, body), then USA's real cosignature, and wait for it."""
    for publisher, body in notes:
        await audit.tap.publish(f"msmt.audit.{publisher}.cosignature", body)
    ours = parse(audit.log.latest_checkpoint() or "")
    good = Note(ours.text, (cosign(ours, "USA", USA_KEY, 7),))
    await audit.tap.publish("msmt.audit.USA.cosignature", good.render().encode())
    await audit.tap.flush()
    await await_for(
        lambda: "\u2014 USA " in (audit.log.latest_checkpoint() or ""), 10, "the good one merged"
    )


async def test_cosignatures_of_checkpoints_we_never_signed_are_refused_quietly(
    audit: Audit,
) -> None:
    # KOR fabricates checkpoints of JPN's log and cosigns them on its own subject:
    # no proof of anything about JPN's log, so no alarm, however many.
    size = audit.log.size
    other_root = Note(Checkpoint(MEMBER, size, b"\x22" * 32).body(), ())
    never_had = Note(Checkpoint(MEMBER, size + 100_000, b"\x22" * 32).body(), ())
    no_checkpoint = Note(Checkpoint(MEMBER, 1, b"\x22" * 32).body(), ())
    jpn_key_id = log_verifier(JPN_KEY).key_id
    # A line claiming JPN's key, whose signature does not verify, proves nothing either.
    bad_jpn_line = Note(
        other_root.text,
        (Signature(MEMBER, jpn_key_id, bytes(64)), cosign(other_root, "KOR", KOR_KEY, 7)),
    )
    # Our own latest checkpoint with its root spelt another way (the spare low bits
    # of its last base64 group set): the same bytes, once taken for ours, then
    # refused at merging as "differs from ours (fork?)" in the node's status.
    origin, size_text, root_text, _ = parse(audit.log.latest_checkpoint() or "").text.split("\n")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    respelt = root_text[:-2] + alphabet[alphabet.index(root_text[-2]) ^ 1] + "="
    assert base64.b64decode(respelt) == base64.b64decode(root_text)
    respelt_ours = Note(f"{origin}\n{size_text}\n{respelt}\n", ())
    flood = [_kor_cosigned(n) for n in (other_root, never_had, no_checkpoint, respelt_ours)]
    flood += [bad_jpn_line.render().encode(), b"JPN\n\xff\xfe"]
    with capture_logs() as logs:
        await _publish_then_merge_a_good_one(audit, [("KOR", body) for body in flood * 20])
    assert audit.jpn.alarm_count() == 0
    assert audit.jpn.refused_count() == len(flood) * 20
    assert audit.jpn.net.last_error is None
    warnings = [e for e in logs if e["event"] == "cosignature_refused"]
    assert [(e["publisher"], e["log_level"]) for e in warnings] == [("KOR", "warning")]
    assert [e for e in logs if e["event"] == "audit_alarm"] == []


async def test_a_cosigned_checkpoint_our_own_key_signed_but_our_log_lacks_is_the_alarm(
    audit: Audit,
) -> None:
    # Our log key's signature on a checkpoint our log does not hold is proof of a
    # fork (or of our log rolled back): the alarm, logged once a minute, counted
    # once while it stands (no one serves the other branch's proofs to tell two apart).
    forked = sign_checkpoint(Checkpoint(MEMBER, audit.log.size, b"\x22" * 32), JPN_KEY)
    beyond = sign_checkpoint(Checkpoint(MEMBER, audit.log.size + 50, b"\x22" * 32), JPN_KEY)
    notes = [forked.with_signatures(cosign(forked, "KOR", KOR_KEY, 7)).render().encode()] * 5
    notes.append(beyond.with_signatures(cosign(beyond, "KOR", KOR_KEY, 7)).render().encode())
    with capture_logs() as logs:
        await _publish_then_merge_a_good_one(audit, [("KOR", body) for body in notes])
    assert audit.jpn.alarms_on("fork", MEMBER) == 1
    assert audit.jpn.alarms_on("rollback", MEMBER) == 1
    assert audit.jpn.alarm_count() == 2
    assert audit.jpn.active("fork", MEMBER) == audit.jpn.active("rollback", MEMBER) == 1
    assert audit.jpn.active("twin", MEMBER) == 0
    alarms = [e for e in logs if e["event"] == "audit_alarm"]
    assert [(e["kind"], e["origin"], e["log_level"]) for e in alarms] == [
        ("fork", MEMBER, "error"),
        ("rollback", MEMBER, "error"),
    ]
    assert "rollback detected on our log JPN: our log key signed a checkpoint of size 53" in (
        audit.jpn.net.last_error or ""
    )
    assert "published by KOR" in (audit.jpn.net.last_error or "")
    assert audit.jpn.refused_count() == 0


async def test_a_fork_under_our_retired_log_key_is_the_alarm_and_under_others_is_not(
    audit: Audit,
) -> None:
    # Partners still trust a retired log key, so a checkpoint it signed that our
    # log lacks is a fork in their eyes: the alarm. A key that is not one of our
    # log keys (a revoked one, or anyone's) proves nothing, however valid.
    stranger = Ed25519PrivateKey.from_private_bytes(bytes(range(200, 232)))
    bodies = []
    for key in (JPN_RETIRED_KEY, stranger):
        forked = sign_checkpoint(Checkpoint(MEMBER, audit.log.size, b"\x33" * 32), key)
        bodies.append(forked.with_signatures(cosign(forked, "KOR", KOR_KEY, 7)).render().encode())
    await _publish_then_merge_a_good_one(audit, [("KOR", body) for body in bodies])
    assert audit.jpn.alarm_count("fork") == 1
    assert audit.jpn.refused_count() == 1
    assert "fork detected on our log JPN" in (audit.jpn.net.last_error or "")


def _spy_own_checks(audit: Audit, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str | None]]:
    """Record each of JPN's checks of a note on its own subject: (size, what differs or None)."""
    checked: list[tuple[int, str | None]] = []
    twin_detail = audit.jpn.net._twin_detail

    def spy(checkpoint: Checkpoint) -> str | None:
        detail = twin_detail(checkpoint)
        checked.append((checkpoint.size, detail))
        return detail

    monkeypatch.setattr(audit.jpn.net, "_twin_detail", spy)
    audit.jpn.net.echo_interval = 0.05
    return checked


def _checked(checked: list[tuple[int, str | None]], n: int) -> Callable[[], bool]:
    return lambda: len(checked) == n


def _counted(counter: Counter, label: str, n: int) -> Callable[[], bool]:
    return lambda: _total(counter, label) == n


async def _publish_own(audit: Audit, body: bytes, done: Callable[[], bool], what: str) -> None:
    """Publish ``body`` on JPN's own checkpoint subject and wait until JPN has dealt with it."""
    await audit.publish_checkpoint(body)
    await await_for(done, 10, what)


async def test_our_own_checkpoints_echoing_back_are_checked_and_raise_no_alarm(
    audit: Audit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # JPN's node publishes each new checkpoint on its own subject, and hears it back;
    # also republished with a witness's cosignature merged, or arriving late.
    checked = _spy_own_checks(audit, monkeypatch)

    def checks(n: int) -> Callable[[], bool]:
        return lambda: len(checked) == n

    with capture_logs() as logs:
        await audit.grow(0)
        await await_for(checks(1), 10, "echo of size 3 checked")
        await await_for(lambda: "\u2014 USA " in audit.log.checkpoint_at(3), 10, "cosigned")
        await _publish_own(audit, audit.log.checkpoint_at(3).encode(), checks(2), "cosigned 3")
        await audit.grow(4)
        await await_for(checks(3), 10, "echo of size 7 checked")
        await audit.grow(5)
        await await_for(checks(4), 10, "echo of size 12 checked")
        await _publish_own(audit, audit.log.checkpoint_at(7).encode(), checks(5), "late 7")
    assert checked == [(3, None), (3, None), (7, None), (12, None), (7, None)]
    assert audit.jpn.alarm_count() == 0
    assert audit.jpn.refused_count() == 0
    assert audit.jpn.net.last_error is None
    assert [e for e in logs if e["event"] == "audit_alarm"] == []


async def test_a_checkpoint_of_our_log_that_our_log_lacks_on_our_subject_is_the_twin_alarm(
    audit: Audit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second JPN node (same credentials and log key, another data directory)
    # publishes its own checkpoints on JPN's subject: each one seen is the alarm,
    # counted once while it stands.
    checked = _spy_own_checks(audit, monkeypatch)
    twin_log = build_log(tmp_path / "twin", JPN_KEY, [1])
    try:
        twin = (twin_log.latest_checkpoint() or "").encode()
    finally:
        twin_log.close()
    other_root = sign_checkpoint(Checkpoint(MEMBER, 3, b"\x22" * 32), JPN_KEY)
    beyond = sign_checkpoint(Checkpoint(MEMBER, 40, b"\x22" * 32), JPN_RETIRED_KEY)
    bodies = [twin, twin, other_root.render().encode(), beyond.render().encode()]
    with capture_logs() as logs:
        for n, body in enumerate(bodies, start=1):
            await _publish_own(audit, body, _checked(checked, n), f"twin note {n}")
        # Our own echo in between changes nothing: it is checked and passes.
        await _publish_own(
            audit, audit.log.checkpoint_at(3).encode(), lambda: len(checked) == 5, "our echo"
        )
    assert [size for size, _ in checked] == [1, 1, 3, 40, 3]
    assert checked[-1] == (3, None)
    assert audit.jpn.alarm_count() == audit.jpn.alarms_on("twin", MEMBER) == 1
    assert audit.jpn.active("twin", MEMBER) == 1
    assert audit.jpn.refused_count("checkpoint") == 0
    assert audit.jpn.net.last_error == (
        "another node is publishing checkpoints of our log JPN (size 40, ours 3: beyond our"
        " log): is a second node running with JPN's credentials?"
    )
    alarms = [e for e in logs if e["event"] == "audit_alarm"]
    assert [(e["kind"], e["origin"], e["log_level"]) for e in alarms] == [("twin", MEMBER, "error")]
    assert alarms[0]["detail"] == (
        "another node is publishing checkpoints of our log JPN (size 1, ours 3: a size our"
        " log never had): is a second node running with JPN's credentials?"
    )
    assert "another root than ours" in (checked[2][1] or "")
    assert audit.usa.alarm_count("twin") == 0  # a partner's subject is not its own


async def test_the_twin_alarm_lasts_while_twin_checkpoints_come_and_lapses_after(
    audit: Audit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The node pauses its inbox while twin_active(): it must hold from the first
    # twin checkpoint on, and end once they stop coming for alarm_clear seconds.
    _spy_own_checks(audit, monkeypatch)
    net = audit.jpn.net
    seen: list[float] = []
    net.on_twin = lambda: seen.append(net._standing["twin", MEMBER].seen)
    assert not net.twin_active()
    assert audit.jpn.active("twin", MEMBER) == 0
    twin = sign_checkpoint(Checkpoint(MEMBER, 40, b"\x22" * 32), JPN_KEY).render().encode()
    await _publish_own(audit, twin, lambda: len(seen) == 1, "the twin's first checkpoint")
    assert net.twin_active()
    assert audit.jpn.active("twin", MEMBER) == 1
    first = seen[0]
    net.alarm_clear = 0.5  # from here, so the wait below is short
    await _publish_own(audit, twin, lambda: len(seen) == 2, "the twin's next checkpoint")
    assert seen[1] > first  # each one seen extends the alarm
    assert audit.jpn.alarms_on("twin", MEMBER) == 1  # one alarm standing, not two
    await await_for(lambda: not net.twin_active(), 10, "the alarm to lapse")
    assert audit.jpn.active("twin", MEMBER) == 0
    assert len(seen) == 2
    # A twin seen after the alarm lapsed is a new one: counted again.
    await _publish_own(audit, twin, lambda: len(seen) == 3, "the twin back")
    assert audit.jpn.alarms_on("twin", MEMBER) == 2
    assert audit.jpn.active("twin", MEMBER) == 1


async def test_our_own_published_notes_cannot_crowd_out_a_twins_note(
    audit: Audit, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the latest note on our subject is checked, once per echo_interval: while
    # our log grew, our echo every second replaced a twin's note before its check.
    checked = _spy_own_checks(audit, monkeypatch)
    net = audit.jpn.net
    net.echo_interval = 2.0
    ours = audit.log.checkpoint_at(3).encode()
    net.published(ours)  # as the node says before each publish
    twin = sign_checkpoint(Checkpoint(MEMBER, 40, b"\x22" * 32), JPN_KEY).render().encode()
    await _publish_own(audit, twin, lambda: len(checked) == 1, "a first twin note checked")
    # The watcher now sleeps: the twin's next note, then our echo, arrive meanwhile.
    await audit.publish_checkpoint(twin)
    await audit.publish_checkpoint(ours)
    await await_for(lambda: len(checked) == 2, 10, "the next check")
    assert [size for size, _ in checked] == [40, 40]  # the twin's, not our echo
    assert checked[1][1] == "size 40, ours 3: beyond our log"  # and found it a twin's
    assert audit.jpn.alarms_on("twin", MEMBER) == 1  # the one twin alarm standing


async def test_a_note_on_our_subject_not_signed_by_our_log_key_is_refused_quietly(
    audit: Audit, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = _spy_own_checks(audit, monkeypatch)
    stranger = Ed25519PrivateKey.from_private_bytes(bytes(range(200, 232)))
    forged = sign_checkpoint(Checkpoint(MEMBER, 3, b"\x22" * 32), stranger)
    bad_line = Note(forged.text, (Signature(MEMBER, log_verifier(JPN_KEY).key_id, bytes(64)),))
    kor = sign_checkpoint(Checkpoint("KOR", 3, b"\x22" * 32), KOR_KEY)
    bodies = [
        b"garbage that is no note",
        b"JPN\n\xff\xfe",
        f"JPN\n5\n{'A' * 42}\u00e9=\n\n\u2014 JPN AAAAAAAAAAAA\n".encode(),
        forged.render().encode(),
        bad_line.render().encode(),
        kor.render().encode(),
    ]
    with capture_logs() as logs:
        for n, body in enumerate(bodies, start=1):
            await _publish_own(
                audit,
                body,
                _counted(audit.jpn.refused, "checkpoint", n),
                f"refusal {n}",
            )
    assert checked == []  # none reached our log
    assert audit.jpn.alarm_count() == 0
    assert audit.jpn.net.last_error is None
    warnings = [e for e in logs if e["event"] == "checkpoint_refused"]
    assert [(e["publisher"], e["log_level"]) for e in warnings] == [(MEMBER, "warning")]
    assert [e for e in logs if e["event"] == "audit_alarm"] == []
    # The node goes on: it still witnesses USA's log and checks its own subject.
    assert audit.jpn.task is not None
    assert not audit.jpn.task.done()
    usa = sign_checkpoint(Checkpoint("USA", 1, b"\x44" * 32), USA_KEY).render()
    await audit.tap.publish("msmt.audit.USA.checkpoint", usa.encode())
    await audit.tap.flush()
    await await_for(
        lambda: audit.jpn.net.witness.state.get("USA") == LogState(1, b"\x44" * 32),
        10,
        "JPN cosigned USA's checkpoint",
    )
    await _publish_own(
        audit, audit.log.checkpoint_at(3).encode(), lambda: checked == [(3, None)], "our echo"
    )


async def test_an_unexpected_failure_checking_our_subject_is_reported_by_type_and_goes_on(
    audit: Audit, monkeypatch: pytest.MonkeyPatch
) -> None:
    def breaking(checkpoint: Checkpoint) -> str | None:
        raise KeyError("hostile content")

    monkeypatch.setattr(audit.jpn.net, "_twin_detail", breaking)
    audit.jpn.net.echo_interval = 0.05
    with capture_logs() as logs:
        await _publish_own(
            audit,
            audit.log.checkpoint_at(3).encode(),
            lambda: audit.jpn.net.last_error is not None,
            "JPN's report",
        )
    assert audit.jpn.net.last_error == "witness: checkpoint from JPN failed (KeyError)"
    assert "hostile content" not in repr(logs)
    assert audit.jpn.alarm_count() == 0
    # The next note on our subject is checked as ever.
    monkeypatch.undo()
    twin = sign_checkpoint(Checkpoint(MEMBER, 40, b"\x22" * 32), JPN_KEY).render()
    await _publish_own(
        audit, twin.encode(), lambda: audit.jpn.alarm_count("twin") == 1, "the twin alarm"
    )
    assert audit.jpn.task is not None
    assert not audit.jpn.task.done()
