"""Witnessing over a real nats-server: rounds, the latest checkpoint only, and what is ignored.

JPN keeps a real audit log and serves proofs of it; USA witnesses it. Both are
the node's ``AuditNet`` with their own store thread, as in ``broker.node``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from audit_helpers import MEMBER, build_log, event, log_verifier, witness_verifier
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter

from broker.auditlog import AuditLog
from broker.auditnet import AuditNet
from broker.checkpoint import cosign, parse_body, proof_request, sign_checkpoint
from broker.natsproc import NatsServer
from broker.note import Signature, parse
from broker.witness import LogState

pytestmark = pytest.mark.integration

JPN_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
USA_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(50, 82)))
KOR_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
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
    pool: ThreadPoolExecutor
    task: asyncio.Task[None] | None = None

    def alarm_count(self) -> float:
        return sum(
            s.value for m in self.alarms.collect() for s in m.samples if s.name.endswith("_total")
        )


@dataclass
class Audit:
    """JPN's log and AuditNet, USA's witnessing AuditNet, and recorders on the hub."""

    log: AuditLog
    jpn: Peer
    usa: Peer
    tap: Client
    stop: asyncio.Event
    proof_requests: list[bytes] = field(default_factory=list)
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

    alarms = Counter("alarms", "test", ["kind"], registry=CollectorRegistry())
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
    )
    nc = await nats.connect(server.url)
    await net.subscribe(nc)
    await nc.flush()
    return Peer(net, nc, alarms, pool)


@pytest.fixture
async def audit(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Audit]:
    log = build_log(tmp_path / "jpn", JPN_KEY, [3])
    usa_log = build_log(tmp_path / "usa", USA_KEY, [1], member="USA")
    jpn = await _peer(nats_server, "JPN", JPN_KEY, log, tmp_path / "jpn" / "ws.json", 3600)
    usa = await _peer(nats_server, "USA", USA_KEY, usa_log, tmp_path / "usa" / "ws.json", 3600)
    tap = await nats.connect(nats_server.url)
    world = Audit(log, jpn, usa, tap, asyncio.Event())

    async def on_proof(msg: Msg) -> None:
        world.proof_requests.append(msg.data)

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
    assert audit.proof_requests == [proof_request(3, 12)]
    assert audit.usa_state().root == parse_body(parse(latest).text).root
    await await_for(
        lambda: "\u2014 USA " in audit.log.checkpoint_at(12), 10, "JPN merged the cosignature"
    )
    assert "\u2014 USA " not in audit.log.checkpoint_at(7)
    assert audit.usa.net.backlog == 0
    assert audit.usa.alarm_count() == audit.jpn.alarm_count() == 0


async def test_a_log_that_stops_growing_is_cosigned_without_waiting_out_the_interval(
    audit: Audit,
) -> None:
    await audit.grow(0)
    await await_for(lambda: audit.usa_state().size == 3, 10, "USA cosigned size 3")
    # Still an hour to the next round, but nothing newer follows this checkpoint.
    audit.usa.net.settled = 0.3
    await audit.grow(4)
    await await_for(lambda: audit.usa_state().size == 7, 10, "USA cosigned size 7")
    assert audit.proof_requests == [proof_request(3, 7)]
    await await_for(lambda: len(audit.usa_cosignatures) == 2, 10, "second cosignature")


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
    # About JPN's log: parsed and verified; a forged line is refused with an alarm.
    await publish("msmt.audit.USA.cosignature", note.with_signatures(forged).render().encode())
    await publish("msmt.audit.USA.cosignature", b"JPN\nnot a checkpoint\n")
    await publish("msmt.audit.USA.cosignature", good.render().encode())
    await audit.usa.nc.flush()
    await await_for(
        lambda: "\u2014 USA " in (audit.log.latest_checkpoint() or ""), 10, "the good one merged"
    )
    # Delivered in order: the two alarms are the forged line and the malformed note about JPN.
    assert audit.jpn.alarm_count() == 2
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
    await audit.grow(0)
    await await_for(
        lambda: "cannot save witness state" in (audit.usa.net.last_error or ""), 10, "refusal"
    )
    await audit.usa.nc.flush()
    await audit.tap.flush()
    assert audit.usa_cosignatures == []
    assert audit.usa.net.witness.state == {}  # unsaved means not advanced either
    (tmp_path / "later").mkdir()
    await await_for(lambda: len(audit.usa_cosignatures) == 1, 10, "cosigned once saved")
    assert audit.usa_state().size == 3
    assert (tmp_path / "later" / "ws.json").is_file()
