"""The node daemon against a real nats-server with the generated per-member accounts.

Where a kill and restart matters the node runs as a real ``msmt node run``
subprocess and is killed with SIGKILL; the exchange test runs three nodes in
this process so that ``capture_logs`` sees every log event they emit.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import struct
import termios
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import nats.errors
import psutil
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy
from node_world import (
    BATCH_POLICY,
    KILL_ACK_WAIT,
    Forger,
    World,
    audit_entries,
    audit_rejections,
    await_for,
    content_of,
    expected_partners,
    fetch,
    msmt,
    records_for,
    start_hub,
    wait_for,
)
from structlog.testing import capture_logs

import broker.hubwatch
import broker.node_housekeeping
import broker.receiver
from broker import (
    audit_verify,
    envelope,
    envelope_format,
    keys,
    keys_custodian,
    keys_roster,
    samples,
    sdjwt,
)
from broker.auditlog import DB_FILE
from broker.config import NodeConfig
from broker.errors import MsmtError, StoreError
from broker.inbound_base import UNSTORED_STATE, read_unstored, unstored_text
from broker.metrics import Metrics
from broker.natsconfig import inbox_durable, inbox_stream
from broker.natsetup import InboxLimits, connect_account, setup_account
from broker.natsproc import NatsServer
from broker.node import Node, NodeFailedError, failure_text
from broker.node_messaging import nats_error_text
from broker.node_start import load_node
from broker.policy import variants
from broker.publisher import PARTNER_INBOX_SEQ_STATE, read_inbox_seq
from broker.reconcile import ReadOnlyLog, check_store_against_log
from broker.roster import Roster, RosterKey
from broker.sightings import leaf_values
from broker.store import NewReport, Store
from broker.store_inbox import utc_day
from broker.validation import parse_record
from broker.witness import LogState

pytestmark = pytest.mark.integration


# --- three members exchange every kind, in process, with logs captured ----------------


async def test_three_members_exchange_every_kind_and_receive_exactly_what_was_released(
    world: World,
) -> None:
    trio = ("JPN", "USA", "KOR")
    for member in trio:
        world.write_config(member)
    sent = {m: records_for(m, 24, seed=i + 1) for i, m in enumerate(trio)}
    kinds = {(r["kind"], r.get("transfer", {}).get("category")) for rs in sent.values() for r in rs}
    assert kinds >= {
        ("vessel", None),
        ("worker", None),
        ("transfer", "crypto"),
        ("transfer", "fuel"),
    }

    with capture_logs() as logs:
        nodes: dict[str, Node] = {m: load_node(world.config(m)) for m in trio}
        tasks = [asyncio.create_task(n.run()) for n in nodes.values()]
        try:
            await await_for(lambda: all(n.ready() is None for n in nodes.values()), 20, "ready")
            for member in trio:
                answers = await world.submit(member, sent[member])
                assert [a["status"] for a in answers] == ["accepted"] * len(sent[member])
            expected: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
            for sender in trio:
                policy = world.policy(sender)
                pseudonyms = world.pseudonym_keys(sender)
                for record in sent[sender]:
                    sighting = parse_record(json.dumps(record))
                    for partner, decision in policy.decide_all(sighting).items():
                        if partner not in trio or not decision.sends:
                            continue
                        values = leaf_values(sighting)
                        reduced = variants(sighting, [decision], pseudonyms)
                        fields = {
                            r.disclosure_key: values[r.path]
                            if r.transform is None
                            else reduced[r.disclosure_key]
                            for r in decision.released.values()
                        }
                        expected.setdefault((partner, sender), {})[record["report_id"]] = fields
            assert {p for p, _ in expected} == set(trio)  # everyone receives something

            def delivered() -> bool:
                return all(
                    len(world.inbox_ids(p, s)) == len(reports)
                    for (p, s), reports in expected.items()
                )

            await await_for(delivered, 60, "every release delivered")

            def cosigned_by_both_partners() -> bool:
                for member, node in nodes.items():
                    note = node.audit.latest_checkpoint() or ""
                    others = [m for m in trio if m != member]
                    if not all(f"\u2014 {m} " in note for m in others):
                        return False
                return True

            # Each node witnesses the other two: its latest checkpoint comes back cosigned.
            await await_for(cosigned_by_both_partners, 30, "cross-witnessed checkpoints")
        finally:
            for n in nodes.values():
                n.stop.set()
            await asyncio.gather(*tasks)

    markings = {r["report_id"]: (r["tlp"], r.get("rel_to")) for rs in sent.values() for r in rs}
    for (partner, sender), reports in expected.items():
        store = world.store(partner)
        got = {e.report_id: e for e in store.inbox(sender=sender, limit=10_000)}
        assert set(got) == set(reports)
        for report_id, fields in reports.items():
            entry = got[report_id]
            assert entry.originator == sender
            tlp, rel_to = markings[report_id]
            assert entry.tlp == tlp
            assert entry.rel_to == (None if rel_to is None else tuple(rel_to))
            assert abs(entry.iat - entry.received_at) < 60
            assert entry.fields == fields, (partner, sender, report_id)
            assert list(entry.paths) == sorted(fields)
    for member in trio:
        verified = await asyncio.to_thread(
            msmt,
            "audit",
            "verify",
            str(world.config(member).audit_dir),
            "--keys",
            str(world.keydir),
            "--cosigned",
            "--quorum",
            "2",
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
    # Only two partners ran, so a quorum of three cannot be met: the check has teeth.
    unmet = await asyncio.to_thread(
        msmt,
        "audit",
        "verify",
        str(world.config("JPN").audit_dir),
        "--keys",
        str(world.keydir),
        "--cosigned",
        "--quorum",
        "3",
    )
    assert unmet.returncode == 1
    # Not one log event carries a report's content.
    secrets_in_reports = content_of([r for rs in sent.values() for r in rs])
    rendered = [json.dumps(event, default=str) for event in logs]
    assert rendered
    leaks = [s for s in secrets_in_reports if any(s in line for line in rendered)]
    assert leaks == []


# --- kill and restart ------------------------------------------------------------------


def batch_world(world: World) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    world.write_config("JPN", BATCH_POLICY)
    world.write_config("USA")
    world.write_config("KOR")
    policy = world.policy("JPN")
    records = records_for("JPN", 1000, seed=42)
    want: dict[str, set[str]] = {"USA": set(), "KOR": set()}
    for record in records:
        for partner in expected_partners(policy, parse_record(json.dumps(record))):
            want[partner].add(record["report_id"])
    assert all(len(ids) > 500 for ids in want.values())
    return records, want


def first_of_batch(world: World, count: int) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """``batch_world``'s first ``count`` records, and which of them each partner gets."""
    records, want = batch_world(world)
    ids = {r["report_id"] for r in records[:count]}
    return records[:count], {partner: got & ids for partner, got in want.items()}


def planning_workers(world: World, member: str) -> list[psutil.Process]:
    """The planning worker of ``member``'s node subprocess, if it has started one."""
    node = psutil.Process(world.procs[member].pid)
    return [c for c in node.children() if "broker.planpool" in c.cmdline()]


async def assert_all_exactly_once(world: World, want: dict[str, set[str]]) -> None:
    def done() -> bool:
        return all(len(world.inbox_ids(p, "JPN")) >= len(ids) for p, ids in want.items())

    await await_for(done, 120, "all reports delivered")
    for partner, ids in want.items():
        got = world.inbox_ids(partner, "JPN")
        assert len(got) == len(set(got)) == len(ids)
        assert set(got) == ids
        # The hub's dedup held too: the partner's inbox stream stored each report once
        # (its last sequence: the node's acks removed them, interest retention).
        assert await stream_stored(world, partner) == len(ids)


async def stream_stored(world: World, member: str) -> int:
    """How many messages ``member``'s inbox stream on the hub ever stored."""
    seed = (world.keydir / member / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(world.server.url, member, seed)
    try:
        return int((await nc.jetstream().stream_info(inbox_stream(member))).state.last_seq)
    finally:
        await nc.close()


def assert_no_content_in_logs(world: World, records: list[dict[str, Any]]) -> None:
    values = content_of(records)
    for log in world.root.glob("*.log"):
        text = log.read_text()
        assert text  # the node did log
        assert [v for v in values if v in text] == [], log.name


async def test_kill_and_restart_the_publishing_node_mid_batch(world: World) -> None:
    records, want = batch_world(world)
    world.start("USA")
    world.start("KOR")
    world.start("JPN", MSMT_PUBLISH_MAX_IN_FLIGHT="8")
    answers = await world.submit("JPN", records)
    assert sum(a["status"] == "accepted" for a in answers) == 1000
    await await_for(lambda: len(world.inbox_ids("USA", "JPN")) >= 50, 60, "first deliveries")
    world.kill("JPN")
    assert world.outbox_depth("JPN") > 0  # the kill really was mid-batch
    world.start("JPN")
    await assert_all_exactly_once(world, want)
    await world.outbox_sent("JPN")
    assert_no_content_in_logs(world, records)


async def test_a_dead_planning_worker_stops_the_node_with_one_line_and_loses_nothing(
    world: World,
) -> None:
    records, want = first_of_batch(world, 30)
    world.start("USA")
    world.start("KOR")
    world.start("JPN")
    (worker,) = planning_workers(world, "JPN")
    worker.kill()
    answers = await world.submit("JPN", records)
    assert {a["status"] for a in answers} == {"accepted"}
    # The node must not hang on, accepting reports it can no longer plan.
    proc = world.procs.pop("JPN")
    assert proc.wait(timeout=30) != 0
    log = world.log_tail("JPN")
    assert "planner failed: PlanWorkerError: the planning worker exited" in log
    assert "Traceback" not in log
    assert world.outbox_depth("JPN") == len(records)  # accepted, not yet planned
    world.start("JPN")
    await assert_all_exactly_once(world, want)
    await world.outbox_sent("JPN")


async def test_a_stop_gives_up_on_a_planning_worker_that_does_not_answer(
    world: World,
) -> None:
    # A signals trial: a stop while the worker hung (here: stopped) waited out the
    # worker's 300 s, far past a service manager's patience, before failing.
    records, want = first_of_batch(world, 30)
    world.start("USA")
    world.start("KOR")
    world.start("JPN")
    (worker,) = planning_workers(world, "JPN")
    worker.suspend()
    answers = await world.submit("JPN", records)
    assert {a["status"] for a in answers} == {"accepted"}
    # The batch waits, unread, in the stopped worker's pipe: the node is waiting for it.
    await await_for(lambda: _pipe_unread(worker.pid) > 0, 30, "a batch sent to the worker")
    assert world.terminate("JPN") == 1  # within STOP_TIMEOUT (10 s), not 300
    log = world.log_tail("JPN")
    assert (
        "planner failed: PlanWorkerError: the planning worker did not answer within 10 s of"
        " the stop" in log
    )
    assert "Traceback" not in log
    assert not worker.is_running()  # killed, not left behind stopped
    assert world.outbox_depth("JPN") == len(records)  # accepted, not yet planned
    world.start("JPN")
    await assert_all_exactly_once(world, want)
    await world.outbox_sent("JPN")


HANG_WORKER = """
import sys, time
if "broker.planpool" in sys.orig_argv:
    time.sleep(3600)  # a planning worker that never answers its start
"""


def test_a_stop_while_the_planning_worker_starts_gives_it_10_s(world: World) -> None:
    # A review: a stop before the worker's first answer waited for it, up to 300 s.
    world.write_config("JPN")
    hang = world.root / "hang"
    hang.mkdir(mode=0o700)
    (hang / "sitecustomize.py").write_text(HANG_WORKER)
    world.start("JPN", ready=False, PYTHONPATH=str(hang))
    wait_for(lambda: bool(planning_workers(world, "JPN")), 30, "the planning worker started")
    (worker,) = planning_workers(world, "JPN")
    assert world.terminate("JPN") == 1  # within STOP_TIMEOUT (10 s), not 300
    log = world.log_tail("JPN")
    assert "the planning worker did not answer within 10 s of the stop" in log, log
    assert "Traceback" not in log
    assert not worker.is_running()


def _pipe_unread(pid: int) -> int:
    """Bytes waiting in the pipe that is process ``pid``'s standard input."""
    fd = os.open(f"/proc/{pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
    try:
        (unread,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))
        return int(unread)
    finally:
        os.close(fd)


def test_a_late_reply_the_hub_refused_is_said_plainly_not_as_a_break_in() -> None:
    # A frozen-node trial: resumed after 3 minutes, the node answered a partner's proof
    # request the hub no longer let it answer, and last_error read "nats: Error nats:
    # permissions violation for publish to "_r_...."", which looks like a break-in.
    late = nats.errors.Error('nats: permissions violation for publish to "_r_.f3Kq9.Zt2"')
    assert nats_error_text(late) == (
        'nats: Error nats: permissions violation for publish to "_r_.f3Kq9.Zt2": a reply to a'
        " partner's proof request came after the minute the hub keeps the way back open (was"
        " this node paused or frozen?); the partner asks again"
    )
    # Any other refusal is the hub's users not letting the node do its work: as it is.
    refused = nats.errors.Error('nats: permissions violation for publish to "msmt.to.USA.x"')
    assert nats_error_text(refused) == (
        'nats: Error nats: permissions violation for publish to "msmt.to.USA.x"'
    )
    assert nats_error_text(ConnectionResetError()) == "nats: ConnectionResetError"


def test_a_failure_without_text_is_named_by_its_type_alone() -> None:
    # A resource trial's node, short of memory, stopped with "messaging failed: MemoryError: ".
    assert failure_text("messaging", MemoryError()) == "messaging failed: MemoryError"


def test_a_failure_quotes_only_the_projects_and_the_systems_errors() -> None:
    # A leak hunt: the node's last line (stderr, the journal) quoted any exception's
    # text, and a bug's could quote a report (pydantic's errors quote their input).
    from pydantic import BaseModel

    class Record(BaseModel):
        imo: int

    with pytest.raises(ValueError, match="CANARY-vessel-name") as caught:
        Record.model_validate({"imo": "CANARY-vessel-name"})
    assert failure_text("planner", caught.value) == "planner failed: ValidationError"
    assert failure_text("planner", KeyError("CANARY")) == "planner failed: KeyError"
    ours = MsmtError("store: full")
    assert failure_text("planner", ours) == "planner failed: MsmtError: store: full"
    disk = OSError(28, "No space left on device")
    assert failure_text("spool", disk) == f"spool failed: OSError: {disk}"
    assert str(disk) == "[Errno 28] No space left on device"


async def test_a_nats_client_closed_for_good_stops_the_node_for_its_supervisor(
    world: World,
) -> None:
    # nats-py closes its client for good on some server errors, reconnects unlimited
    # or not (the client now reconnects after those known; test_publish_refused).
    # Any other way it closes must not leave a node up that can never send again.
    world.write_config("JPN")
    jpn = load_node(world.config("JPN"))
    task = asyncio.create_task(jpn.run())
    try:
        await await_for(lambda: jpn.ready() is None, 20, "JPN ready")
        assert jpn.nc is not None
        await jpn.nc._close(Client.CLOSED)  # as nats-py closes it, callbacks and all
        with pytest.raises(NodeFailedError) as stopped:
            await asyncio.wait_for(task, 20)
        assert str(stopped.value) == "messaging: the NATS client closed for good"
    finally:
        jpn.stop.set()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_proof_request_flood_is_dropped_with_its_own_warning_not_last_error(
    world: World,
) -> None:
    # A partner's flood of proof requests overflows the node's bounded subscription
    # (PROOF_PENDING): nats-py drops the rest and reports SlowConsumerError. A review
    # found the drops overwrote last_error, hiding a real inbox error: they are their
    # own warning now, once a minute per subject, and the node stays ready.
    world.write_config("USA")
    usa = load_node(world.config("USA"))
    task = asyncio.create_task(usa.run())
    seed = (world.keydir / "KOR" / keys.NATS_SEED_FILE).read_bytes().strip()
    kor = await connect_account(world.server.url, "KOR", seed)
    try:
        await await_for(lambda: usa.ready() is None, 20, "USA ready")
        usa._error("an inbox error the operator must see")
        with capture_logs() as logs:
            for _ in range(3):
                for i in range(5_000):
                    await kor.publish("msmt.audit.USA.proof", b"%d" % i, reply=kor.new_inbox())
                await kor.flush()
            await await_for(
                lambda: any(e["event"] == "messages_dropped" for e in logs), 20, "the drops"
            )
        dropped = [e for e in logs if e["event"] == "messages_dropped"]
        assert len(dropped) == 1  # once a minute for the subject, however many floods
        assert "msmt.audit.USA.proof" in dropped[0]["subject"]
        assert dropped[0]["log_level"] == "warning"
        assert usa._last_error == "an inbox error the operator must see"
        assert usa.ready() is None
    finally:
        await kor.close()
        usa.stop.set()
        await asyncio.gather(task, return_exceptions=True)


async def test_kill_and_restart_nats_server_mid_batch(world: World) -> None:
    records, want = batch_world(world)
    for member in ("USA", "KOR"):
        world.start(member)
    world.start("JPN", MSMT_PUBLISH_MAX_IN_FLIGHT="8")
    await world.submit("JPN", records)
    await await_for(lambda: len(world.inbox_ids("USA", "JPN")) >= 50, 60, "first deliveries")
    world.server.kill()
    assert world.outbox_depth("JPN") > 0
    await asyncio.sleep(1.5)  # long enough for publishes to fail and be retried
    world.server.start()
    await assert_all_exactly_once(world, want)
    assert all(world.procs[m].poll() is None for m in ("JPN", "USA", "KOR"))
    assert_no_content_in_logs(world, records)


@pytest.mark.parametrize("change", ["revoke", "suspend", "rotate"])
async def test_envelopes_waiting_for_a_partner_whose_key_was_withdrawn_are_not_sent(
    world: World, change: str
) -> None:
    # A departure review: KOR's keys revoked while JPN's outbox held envelopes for it
    # (the hub down); JPN restarted on the new roster and still published them, while
    # its own warning said they would wait. The roster was checked only at planning.
    # A rotation leaves them to go out as they are: KOR keeps its retired key, and
    # one may be on the hub already (its ack lost), where taken back it would be
    # received with no send in JPN's log (a review's replay found 42 such).
    records, want = first_of_batch(world, 40)
    world.start("JPN")
    world.server.kill()
    answers = await world.submit("JPN", records)
    assert {a["status"] for a in answers} == {"accepted"}
    await await_for(lambda: world.all_planned("JPN"), 30, "the batch planned")
    assert world.terminate("JPN") == 0
    assert world.outbox_depth("JPN") == len(want["USA"]) + len(want["KOR"])
    roster = keys_roster.load_signed_roster(world.keydir).roster
    kor_enc = roster.current("KOR", "enc", datetime.now(UTC)).kid
    if change == "revoke":
        keys_custodian.revoke_key(world.keydir, kor_enc, "KOR suspended")
    elif change == "suspend":
        keys_custodian.suspend_member(world.keydir, "KOR")
    else:
        keys_custodian.rotate_keys(world.keydir, "KOR")
    world.server.start()
    world.start("JPN")
    await await_for(
        lambda: world.sent_counts("JPN", ["USA"])["USA"] == len(want["USA"]), 60, "USA's sent"
    )
    assert await stream_stored(world, "USA") == len(want["USA"])
    usa_enc = roster.current("USA", "enc", datetime.now(UTC)).kid
    if change == "rotate":
        await world.outbox_sent("JPN")
        assert world.sent_counts("JPN", ["KOR"]) == {"KOR": len(want["KOR"])}
        assert await stream_stored(world, "KOR") == len(want["KOR"])  # as they were
        assert "envelopes_withheld" not in (world.root / "JPN.log").read_text()
        entries = audit_entries(world.config("JPN").audit_dir)
        assert not [e for e in entries if e["type"] == "withheld"]
        # Each send names the key it was encrypted to: KOR's, retired since.
        kids = {(e["partner"], e["recipient_kid"]) for e in entries if e["type"] == "sent"}
        assert kids == {("USA", usa_enc), ("KOR", kor_enc)}
        return
    assert await stream_stored(world, "KOR") == 0  # nothing went to KOR
    store = world.store("JPN")
    try:
        assert store.outbox_depths() == (0, len(want["KOR"]))  # none pending: all waiting
        waiting = store.awaiting(100)
    finally:
        store.close()
    assert {rid for rid, _, _ in waiting} == want["KOR"]
    assert {partners for _, _, partners in waiting} == {("KOR",)}
    assert world.sent_counts("JPN", ["KOR"]) == {"KOR": 0}
    lines = (world.root / "JPN.log").read_text().splitlines()
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    withheld = [e for e in logged if e["event"] == "envelopes_withheld"]
    assert [(e["envelopes"], e["partners"]) for e in withheld] == [(len(want["KOR"]), "KOR")]
    # Each is in the audit log (one may have reached the hub before, its ack lost):
    # everything its send entry would say, its exact hash, the key and why.
    entries = audit_entries(world.config("JPN").audit_dir)
    taken = [e for e in entries if e["type"] == "withheld"]
    assert {e["report_id"] for e in taken} == want["KOR"]
    assert len(taken) == len(want["KOR"])
    assert {(e["partner"], e["recipient_kid"]) for e in taken} == {("KOR", kor_enc)}
    why = "is revoked" if change == "revoke" else "was retired"
    assert all(why in e["reason"] for e in taken), {e["reason"] for e in taken}
    assert all(e["released"] and e["policy_digest"] for e in taken)
    sent = {(e["partner"], e["recipient_kid"]) for e in entries if e["type"] == "sent"}
    assert sent == {("USA", usa_enc)}


async def test_kill_and_restart_a_receiving_node_mid_batch(world: World) -> None:
    records, want = batch_world(world)
    # What USA fetched but had not acked when killed comes back after KILL_ACK_WAIT.
    seed = (world.keydir / "USA" / keys.NATS_SEED_FILE).read_bytes().strip()
    await setup_account(world.server.url, "USA", seed, InboxLimits(ack_wait_s=KILL_ACK_WAIT))
    world.start("USA", MSMT_FETCH_BATCH="20")
    world.start("KOR")
    world.start("JPN")
    await world.submit("JPN", records)
    await await_for(lambda: len(world.inbox_ids("USA", "JPN")) >= 50, 60, "first deliveries")
    world.kill("USA")
    assert len(world.inbox_ids("USA", "JPN")) < len(want["USA"])
    await asyncio.sleep(0.5)
    world.start("USA")
    await assert_all_exactly_once(world, want)
    assert_no_content_in_logs(world, records)


async def test_sigterm_shuts_down_cleanly_and_hands_back_nothing_lost(world: World) -> None:
    records, want = batch_world(world)
    world.start("USA")
    world.start("KOR")
    world.start("JPN", MSMT_PUBLISH_MAX_IN_FLIGHT="8")
    await world.submit("JPN", records)
    await await_for(lambda: len(world.inbox_ids("USA", "JPN")) >= 50, 60, "first deliveries")
    assert world.terminate("JPN") == 0
    world.start("JPN")
    await assert_all_exactly_once(world, want)
    assert_no_content_in_logs(world, records)


async def test_a_member_cannot_pre_empt_a_report_with_a_guessed_msg_id(world: World) -> None:
    # Red team: KOR, holding its own copies of JPN's reports (so their ids),
    # published junk to USA under Nats-Msg-Id "<report id>.USA" first. JPN's real
    # envelope was then acked as a duplicate, audited as sent, and never stored.
    world.write_config("JPN", BATCH_POLICY)
    world.write_config("USA")
    policy = world.policy("JPN")
    records = [
        r
        for r in records_for("JPN", 40, seed=13)
        if "USA" in expected_partners(policy, parse_record(json.dumps(r)))
    ][:10]
    seed = (world.keydir / "KOR" / keys.NATS_SEED_FILE).read_bytes().strip()
    kor = await connect_account(world.server.url, "KOR", seed)
    try:
        js = kor.jetstream()
        for r in records:
            for guess in (f"{r['report_id']}.USA", r["report_id"]):
                subject = f"msmt.to.USA.{r['kind']}"
                await js.publish(subject, b"junk", headers={"Nats-Msg-Id": guess})
    finally:
        await kor.close()
    world.start("JPN")
    world.start("USA")
    await world.submit("JPN", records)
    await await_for(
        lambda: len(world.inbox_ids("USA", "JPN")) >= len(records), 60, "USA to store them"
    )
    assert sorted(world.inbox_ids("USA", "JPN")) == sorted(r["report_id"] for r in records)


# --- a flood of bad messages mixed with good ones ----------------------------------------


def flip(token: str, segment: int) -> str:
    parts = token.split(".")
    body = parts[segment]
    middle = len(body) // 2
    parts[segment] = body[:middle] + ("A" if body[middle] != "A" else "B") + body[middle + 1 :]
    return ".".join(parts)


STEPS = (
    "subject",
    "size",
    "format",
    "decrypt",
    "recipient",
    "signature",
    "key",
    "freshness",
    "sender",
)


def forge_bad(  # noqa: PLR0911 - one return per checklist step
    forger: Forger, step: str, record: dict[str, Any], kor_record: dict[str, Any], i: int
) -> tuple[bytes, str]:
    """One message broken at checklist ``step``: (payload, subject suffix).

    Sent on its report's own kind, since a subject naming another kind is
    refused at step 6 (``sender``), before the step it is meant to break.
    """
    kind = record["kind"]
    if step == "subject":
        return forger.envelope(record)[0].encode(), "vessel.extra"
    if step == "size":
        return b"A" * 20_000, "vessel"
    if step == "format":
        return (b"\xff\xfe not an envelope" if i % 2 else b"a.b.c"), "vessel"
    if step == "decrypt":
        return flip(forger.envelope(record)[0], 3).encode(), kind
    if step == "recipient":
        return forger.envelope(record, to="KOR")[0].encode(), kind
    if step == "signature":
        token = forger.envelope(record, signer=forger.kor, kid=forger.jpn.signing_kid)[0]
        return token.encode(), kind
    if step == "key":
        return forger.envelope(record, kid=forger.kor.signing_kid)[0].encode(), kind
    if step == "freshness":
        return forger.envelope(record, at=forger.now - timedelta(hours=2))[0].encode(), kind
    # KOR's report handed over by JPN: the hub says JPN, the envelope says KOR.
    return forger.envelope(kor_record)[0].encode(), kor_record["kind"]


JUNK_PER_RECORD = 6


def assert_refusals_bounded(config: NodeConfig, refused: int) -> None:
    """The refusals' audit entries: 60 told a minute, the rest one entry per batch.

    Minutes are read from the entries' own times (to the second) and batches from
    the log's checkpoints (one per durable append), so no timing is assumed.
    """
    from broker.inbound_base import REFUSALS_LOGGED_PER_MINUTE as PER_MINUTE

    entries = audit_entries(config.audit_dir)
    told = [e for e in entries if e["type"] == "rejected"]
    folded = [e for e in entries if e["type"] == "rejected_many"]
    assert {e["source"] for e in told + folded} == {"JPN"}
    assert len(told) + sum(e["count"] for e in folded) == refused
    times = [datetime.fromisoformat(e["at"]) for e in told + folded]
    minutes = int((max(times) - min(times)).total_seconds() + 1) // 60 + 1
    assert PER_MINUTE <= len(told) <= PER_MINUTE * minutes
    with sqlite3.connect(config.audit_dir / DB_FILE) as db:
        ends = [row[0] for row in db.execute("SELECT size FROM checkpoints ORDER BY size")]
    batches = [bisect.bisect_right(ends, e["seq"]) for e in folded]
    assert len(batches) == len(set(batches))  # at most one folded entry per batch
    assert len(told) + len(folded) <= PER_MINUTE * minutes + len(ends)


async def test_flood_of_bad_messages_mixed_with_good_ones(world: World) -> None:
    _, _ = batch_world(world)
    world.start("USA", MSMT_MAX_MESSAGE_BYTES="16384", MSMT_FRESHNESS_SECONDS="3600")
    world.start("JPN")
    now = datetime.now(UTC)
    forger = Forger(world, now)
    good_records = records_for("JPN", 60, seed=7)
    kor_records = records_for("KOR", 10, seed=8)
    messages: list[tuple[str, bytes, str]] = []  # subject suffix, payload, msg id
    bad: Counter[str] = Counter()
    good_ids: set[str] = set()

    def add_good(record: dict[str, Any]) -> None:
        token, _ = forger.envelope(record)
        messages.append((record["kind"], token.encode(), f"{record['report_id']}.USA"))
        good_ids.add(record["report_id"])

    def add_bad(step: str, payload: bytes, kind: str, msg_id: str = "") -> None:
        messages.append((kind, payload, msg_id or f"{payload[:8]!r}.{len(messages)}"))
        bad[step] += 1

    redelivered = 0
    for i, record in enumerate(good_records):
        rid = record["report_id"]
        # A hostile member's junk among it all (red-team trial): each piece is refused
        # and counted, but past 60 a minute only counted in the audit log.
        for j in range(JUNK_PER_RECORD):
            add_bad("format", b"junk %d" % (i * JUNK_PER_RECORD + j), "vessel")
        if i % 6 == 0:
            add_good(record)
            # The same report again under another message id: same jti, new bytes.
            _, issued = forger.envelope(record)
            again = forger.present(issued, "USA")
            add_bad("replay", again.encode(), record["kind"], f"{rid}.USA.replay")
            # The identical bytes again: a harmless redelivery, neither stored twice nor rejected.
            messages.append((record["kind"], messages[-2][1], f"{rid}.USA.redelivered"))
            redelivered += 1
            continue
        step = STEPS[i % len(STEPS)]
        add_bad(step, *forge_bad(forger, step, record, kor_records[i % len(kor_records)], i))
        if i % 2:
            add_good(records_for("JPN", 1, seed=1000 + i)[0])
    assert set(bad) == {
        "replay", "subject", "size", "format", "decrypt", "recipient", "signature", "key",
        "freshness", "sender",
    }  # fmt: skip

    # Meanwhile JPN's own node sends real reports through intake.
    from_node = records_for("JPN", 100, seed=9)
    policy = world.policy("JPN")
    node_ids = {
        r["report_id"]
        for r in from_node
        if "USA" in expected_partners(policy, parse_record(json.dumps(r)))
    }
    seed = (world.keydir / "JPN" / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(world.server.url, "JPN", seed)
    try:
        js = nc.jetstream()
        submitted = asyncio.create_task(world.submit("JPN", from_node))
        for suffix, payload, msg_id in messages:
            await js.publish(f"msmt.to.USA.{suffix}", payload, headers={"Nats-Msg-Id": msg_id})
        assert all(a["status"] == "accepted" for a in await submitted)
    finally:
        await nc.close()

    want = good_ids | node_ids
    usa = world.config("USA")

    def counters() -> dict[str, int]:
        store = world.store("USA")
        try:
            return store.counters()
        finally:
            store.close()

    def settled() -> bool:
        c = counters()
        return len(world.inbox_ids("USA", "JPN")) >= len(want) and all(
            c.get(f"rejected.{step}", 0) >= n for step, n in bad.items()
        )

    await await_for(settled, 60, "all good stored and all bad counted")
    await asyncio.sleep(1.5)  # let anything extra (a double store, a miscount) show up
    got = world.inbox_ids("USA", "JPN")
    assert len(got) == len(set(got))
    assert set(got) == want
    final = counters()
    assert {
        k.removeprefix("rejected."): v for k, v in final.items() if k.startswith("rejected.")
    } == bad
    assert audit_rejections(usa) == bad
    assert_refusals_bounded(usa, sum(bad.values()))
    assert await consumer_counts(world, "USA") == (0, 0)  # every message acked or terminated
    assert await world.stream_messages("USA") == 0
    text = await asyncio.to_thread(fetch, f"http://127.0.0.1:{usa.metrics.port}/metrics")
    for step, n in bad.items():
        assert f'msmt_rejected_total{{reason="{step}"}} {float(n)}' in text
    # Each byte-identical copy is acked and counted, not stored and not rejected.
    assert redelivered > 0
    assert final.get("duplicate.JPN") == redelivered
    assert f'msmt_received_duplicate_total{{sender="JPN"}} {float(redelivered)}' in text
    assert world.procs["USA"].poll() is None


# --- the operator commands ---------------------------------------------------------------


async def test_operator_commands_submit_inbox_status(world: World) -> None:
    _, want = batch_world(world)
    world.start("USA")
    world.start("JPN")
    jpn, usa = str(world.config_path("JPN")), str(world.config_path("USA"))
    records = records_for("JPN", 9, seed=5)
    feed = world.root / "feed.ndjson"
    feed.write_text(samples.to_ndjson(records) + '{"kind": "vessel"}\n')
    done = await asyncio.to_thread(msmt, "submit", "--config", jpn, str(feed))
    assert done.returncode == 1
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [a["status"] for a in answers] == ["accepted"] * 9 + ["rejected"]
    assert done.stderr.strip() == "9 accepted, 1 rejected"
    again = await asyncio.to_thread(
        msmt, "submit", "--config", jpn, "-q", "-", stdin=samples.to_ndjson(records[:2]).encode()
    )
    assert again.returncode == 0  # a resend of what was accepted is done, not an error
    assert [json.loads(x)["reason"] for x in again.stdout.splitlines()] == ["duplicate"] * 2

    # A batch feed drops a file into the spool (written aside, then renamed in).
    spooled = records_for("JPN", 6, seed=6)
    spool = world.config("JPN").spool_path
    (spool / ".batch.tmp").write_text(samples.to_ndjson(spooled))
    (spool / ".batch.tmp").rename(spool / "batch.ndjson")
    result = spool / "done" / "batch.ndjson.result.ndjson"
    await await_for(result.exists, 20, "the spool file to be ingested")
    assert [json.loads(x)["status"] for x in result.read_text().splitlines()] == ["accepted"] * 6
    # The result is written (and synced) before the batch moves to done/: a moment apart
    # (a loaded machine's test caught that gap).
    await await_for(lambda: not (spool / "batch.ndjson").exists(), 20, "the batch moved")
    assert (spool / "done" / "batch.ndjson").exists()
    records = records + spooled

    policy = world.policy("JPN")
    to_usa = [r for r in records if "USA" in expected_partners(policy, parse_record(json.dumps(r)))]
    assert to_usa
    await await_for(lambda: len(world.inbox_ids("USA", "JPN")) == len(to_usa), 30, "delivery")
    listed = await asyncio.to_thread(msmt, "inbox", "list", "--config", usa, "--json")
    assert listed.returncode == 0
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {r["report_id"] for r in rows} == {r["report_id"] for r in to_usa}
    assert {r["originator"] for r in rows} == {"JPN"}
    assert listed.stderr == ""
    # Fewer than there are: stdout stays one JSON line each, stderr says so.
    fewer = await asyncio.to_thread(
        msmt, "inbox", "list", "--config", usa, "--json", "--limit", "1"
    )
    assert len(fewer.stdout.splitlines()) == 1
    assert fewer.stderr == f"(the newest 1 of {len(to_usa)}; --limit N for more)\n"
    shown = await asyncio.to_thread(msmt, "inbox", "show", "--config", usa, to_usa[0]["report_id"])
    assert shown.returncode == 0
    entry = json.loads(shown.stdout)
    assert entry["fields"]["observed_at"] == to_usa[0]["observed_at"]
    # What the node stores is enough for an analyst's STIX bundle under the right markings.
    exported = await asyncio.to_thread(msmt, "export", "stix", "--config", usa)
    assert exported.returncode == 0, exported.stderr
    bundle = json.loads(exported.stdout)
    reports = [o for o in bundle["objects"] if o["type"] == "report"]
    assert len(reports) == len(to_usa)
    missing = await asyncio.to_thread(msmt, "inbox", "show", "--config", usa, "no-such-id")
    assert missing.returncode == 2
    assert missing.stderr == "msmt: error: no received report no-such-id\n"

    def jpn_status() -> dict[str, Any]:
        out = msmt("status", "--config", jpn, "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    await await_for(
        lambda: jpn_status()["counters"].get("published.USA") == len(to_usa), 30, "status"
    )
    status = jpn_status()
    assert status["connected"] == "yes"
    assert status["outbox_depth"] == 0
    assert status["counters"]["intake.accepted"] == 15
    assert status["counters"]["intake.duplicate"] == 2
    assert status["counters"]["intake.schema"] == 1
    assert want  # the batch world's expectations were built for the same policy
    # USA's log, witnessed by JPN (a partner publishing no log would stay unseen).
    await await_for(
        lambda: jpn_status()["witnessed"].get("USA", "").endswith("Z"), 30, "USA's log seen"
    )
    assert datetime.fromisoformat(jpn_status()["witnessed"]["USA"]) <= datetime.now(UTC)

    jpn_port, usa_port = world.config("JPN").metrics.port, world.config("USA").metrics.port
    assert await asyncio.to_thread(fetch, f"http://127.0.0.1:{jpn_port}/healthz") == "ok\n"
    jpn_metrics = await asyncio.to_thread(fetch, f"http://127.0.0.1:{jpn_port}/metrics")
    assert f'msmt_published_total{{partner="USA"}} {float(len(to_usa))}' in jpn_metrics
    assert "msmt_intake_accepted_total 15.0" in jpn_metrics
    assert 'msmt_intake_rejected_total{reason="duplicate"} 2.0' in jpn_metrics
    assert "msmt_outbox_depth 0.0" in jpn_metrics
    # The series the documented alerts read exist at 0 before their first event.
    assert 'msmt_audit_alarms_total{kind="fork",log="USA"} 0.0' in jpn_metrics
    # The witness's own answer: no alarm stands on USA's log.
    assert 'msmt_audit_alarm_active{kind="fork",log="USA"} 0.0' in jpn_metrics
    assert 'msmt_rejected_total{reason="key"} 0.0' in jpn_metrics
    assert 'msmt_intake_rejected_total{reason="unavailable"} 0.0' in jpn_metrics
    assert 'msmt_received_held_total{sender="USA"} 0.0' in jpn_metrics
    seen = 'msmt_witnessed_timestamp_seconds{log="USA"} '
    assert [float(x.removeprefix(seen)) > 0 for x in jpn_metrics.splitlines() if seen in x] == [
        True
    ]

    # JPN's own log, the other way: USA, which runs, cosigns it; KOR runs no node here.
    def uncosigned(text: str, witness: str) -> float:
        line = f'msmt_uncosigned_seconds{{witness="{witness}"}} '
        (value,) = [float(x.removeprefix(line)) for x in text.splitlines() if line in x]
        return value

    async def jpn_scrape() -> str:
        return await asyncio.to_thread(fetch, f"http://127.0.0.1:{jpn_port}/metrics")

    for _ in range(300):
        if uncosigned(jpn_metrics, "USA") == 0 < uncosigned(jpn_metrics, "KOR"):
            break
        await asyncio.sleep(0.1)
        jpn_metrics = await jpn_scrape()
    assert uncosigned(jpn_metrics, "USA") == 0 < uncosigned(jpn_metrics, "KOR")
    # When JPN's keys stop being valid, from the roster, to alert on before they lapse.
    roster = keys_roster.load_signed_roster(world.keydir).roster
    for credential, until in (
        ("signing_key", roster.current("JPN", "sig", datetime.now(UTC)).valid_until.timestamp()),
        ("encryption_key", roster.current("JPN", "enc", datetime.now(UTC)).valid_until.timestamp()),
    ):
        line = f'msmt_credential_expiry_timestamp_seconds{{credential="{credential}"}} '
        assert [float(x.removeprefix(line)) for x in jpn_metrics.splitlines() if line in x] == [
            until
        ]
    assert 'credential="tls_certificate"' not in jpn_metrics  # no TLS files in this world
    usa_metrics = await asyncio.to_thread(fetch, f"http://127.0.0.1:{usa_port}/metrics")
    assert f"msmt_e2e_latency_seconds_count {float(len(to_usa))}" in usa_metrics
    assert f'msmt_received_total{{sender="JPN"}} {float(len(to_usa))}' in usa_metrics


def test_a_bad_setup_fails_at_start_with_one_line(world: World) -> None:
    world.write_config("JPN", BATCH_POLICY)
    config = str(world.config_path("JPN"))
    bad_limit = msmt("node", "run", "--config", config, MSMT_FETCH_BATCH="0")
    assert bad_limit.returncode == 2
    assert bad_limit.stderr.startswith("msmt: error: config key limits.fetch_batch: ")
    assert bad_limit.stderr.count("\n") == 1

    tampered = world.root / "tampered"
    tampered.mkdir()
    for name in ("roster.json", "roster.json.jws", "roster-authority.json"):
        (tampered / name).write_bytes((world.keydir / name).read_bytes())
    roster = json.loads((tampered / "roster.json").read_text())
    roster["keys"][0]["msmt_valid_until"] = "2099-01-01T00:00:00Z"
    (tampered / "roster.json").write_text(json.dumps(roster))
    bad_roster = msmt("node", "run", "--config", config, MSMT_ROSTER_DIR=str(tampered))
    assert bad_roster.returncode == 2
    assert "roster signature does not verify" in bad_roster.stderr
    assert bad_roster.stderr.count("\n") == 1

    # A private key other users can read is refused, as ssh refuses one.
    seed = world.keydir / "JPN" / keys.NATS_SEED_FILE
    seed.chmod(0o644)
    open_key = msmt("node", "run", "--config", config)
    seed.chmod(0o600)
    assert open_key.returncode == 2
    assert open_key.stderr == (
        f"msmt: error: NATS seed {seed} is open to other users (mode 0644): chmod 600 it\n"
    )

    (world.root / "nodes" / "JPN" / "policy.toml").write_text(BATCH_POLICY.replace("*", "nope.*"))
    bad_policy = msmt("node", "run", "--config", config)
    assert bad_policy.returncode == 2
    assert bad_policy.stderr.startswith("msmt: error: ")
    assert "policy.toml:" in bad_policy.stderr
    assert bad_policy.stderr.count("\n") == 1


# --- the inbound batch logic on its own (real store, real audit log, no hub) -------------


@pytest.fixture
def usa_inbound(tmp_path: Path) -> Iterator[tuple[Any, Forger, Path]]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from broker.auditlog import AuditLog
    from broker.inbound import Inbound

    keydir = tmp_path / "keys"
    now = datetime.now(UTC)
    keys_custodian.init_keys(keydir, ("JPN", "USA", "KOR"), now=now - timedelta(days=1))
    roster = keys_roster.load_signed_roster(keydir).roster
    usa = keys.load_member_keys(keydir, "USA", roster, now)
    signer = usa.signing.private_key
    assert isinstance(signer, Ed25519PrivateKey)
    store_path = tmp_path / "usa.sqlite3"
    audit = AuditLog(tmp_path / "audit", "USA", signer)

    def inbound(
        store: Store,
        lacking: Callable[[RosterKey], bool] = lambda _k: False,
        clock: Callable[[], float] = time.monotonic,
        budget: int = 1 << 30,
        unstored: frozenset[tuple[str, str]] = frozenset(),
        freshness: timedelta = timedelta(hours=1),
    ) -> Inbound:
        # ``lacking``: keys left out of USA's roster, as if it had not been rolled out yet.
        behind = Roster(k for k in roster if not lacking(k))
        return Inbound(
            "USA",
            usa.decryption,
            behind,
            store,
            audit,
            freshness,
            1 << 20,
            clock,
            sender_bytes_per_day=budget,
            unstored=unstored,
        )

    world = World(tmp_path, keydir, NatsServer(workdir=tmp_path / "unused"))
    try:
        yield inbound, Forger(world, now), store_path
    finally:
        audit.close()


def test_a_senders_junk_fills_neither_the_log_nor_hides_other_senders(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # A red-team member's junk was refused 1,850 times a second, each with a log line
    # and a ~360-byte audit entry. Per source, REFUSALS_LOGGED_PER_MINUTE refusals a
    # minute get both; the rest of a batch's are one rejected_many entry.
    from broker import inbound_base

    make, _, path = usa_inbound
    clock = [1000.0]
    inbound = make(Store(path), clock=lambda: clock[0])
    limit = inbound_base.REFUSALS_LOGGED_PER_MINUTE
    junk = [("from.KOR.msmt.to.USA.vessel", b"junk %d" % i) for i in range(200)]
    with capture_logs() as logs:
        first = inbound.process(junk)
        other = inbound.process([("from.JPN.msmt.to.USA.vessel", b"not an envelope")])
        clock[0] += 59.9  # the same minute: KOR's refusals are only folded
        second = inbound.process(junk[:30])
        clock[0] += 0.1  # a minute on: KOR's refusals are told one by one again
        third = inbound.process(junk[:3])
    assert first.actions == ["term"] * 200
    assert first.rejected == {"format": 200}  # counted per message, whatever the log holds
    assert (other.rejected, second.rejected, third.rejected) == (
        {"format": 1},
        {"format": 30},
        {"format": 3},
    )
    entries = audit_entries(path.parent / "audit")
    shape = [(e["type"], e["source"], e.get("count")) for e in entries]
    assert shape == [
        *[("rejected", "KOR", None)] * limit,
        ("rejected_many", "KOR", 200 - limit),
        ("rejected", "JPN", None),
        ("rejected_many", "KOR", 30),
        *[("rejected", "KOR", None)] * 3,
    ]
    assert entries[limit]["steps"] == {"format": 200 - limit}
    lines = [e for e in logs if e["event"] == "inbound_rejected"]
    assert [e["sender"] for e in lines] == ["KOR"] * limit + ["JPN"] + ["KOR"] * 3
    assert "unlogged_before" not in lines[limit]  # JPN's first line: nothing went unlogged
    assert lines[-3]["unlogged_before"] == 200 - limit + 30
    assert "unlogged_before" not in lines[-1]


def test_refusals_over_the_quota_are_folded_by_source_and_step_beside_good_reports(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    from broker import inbound_base

    make, forger, path = usa_inbound
    store = Store(path)
    inbound = make(store, clock=lambda: 5.0)
    limit = inbound_base.REFUSALS_LOGGED_PER_MINUTE
    records = records_for("JPN", 3, seed=31)
    good = [forger.delivery(r) for r in records]
    kor = [("from.KOR.msmt.to.USA.vessel", b"junk %d" % i) for i in range(limit)]
    kor += [("from.KOR.msmt.to.USA.vessel", b"A" * (2 << 20))] * 3  # over max_message_bytes
    kor += [("from.KOR.msmt.to.USA.vessel.extra", b"junk")] * 4
    kor += [("from.KOR.msmt.to.USA.vessel", b"\xff not ascii")] * 5
    strangers = [("from.XYZ.msmt.to.USA.vessel", b"junk")] * (limit + 2)
    batch = [good[0], *kor, good[1], *strangers, good[2]]
    result = inbound.process(batch)
    assert result.actions == (
        ["ack"] + ["term"] * len(kor) + ["ack"] + ["term"] * len(strangers) + ["ack"]
    )
    assert result.rejected == {"format": limit + 5, "size": 3, "subject": 4 + limit + 2}
    assert sorted(r.report_id for r in result.stored) == sorted(r["report_id"] for r in records)
    assert store.inbox_count() == 3
    entries = audit_entries(path.parent / "audit")
    received = [e["report_id"] for e in entries if e["type"] == "received"]
    assert sorted(received) == sorted(r["report_id"] for r in records)
    told = Counter((e["source"], e["step"]) for e in entries if e["type"] == "rejected")
    assert told == {("KOR", "format"): limit, ("unknown", "subject"): limit}
    folded = [
        (e["source"], e["count"], e["steps"]) for e in entries if e["type"] == "rejected_many"
    ]
    assert folded == [
        ("KOR", 12, {"format": 5, "size": 3, "subject": 4}),
        ("unknown", 2, {"subject": 2}),
    ]
    # One durable append for the whole batch: its one checkpoint covers every entry.
    assert len(entries) == 3 + 2 * limit + 2
    with sqlite3.connect(path.parent / "audit" / DB_FILE) as db:
        assert [row[0] for row in db.execute("SELECT size FROM checkpoints")] == [len(entries)]


def test_store_failure_hands_the_batch_back_and_redelivery_stores_once(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    make, forger, path = usa_inbound
    records = records_for("JPN", 40, seed=3)
    batch = [forger.delivery(r) for r in records]
    Store(path).close()
    full = Store(path, max_pages=8)
    with pytest.raises(StoreError, match="database or disk is full"):
        make(full).process(batch)
    full.close()
    store = Store(path)
    assert store.inbox_count() == 0
    first = make(store).process(batch)
    assert first.actions == ["ack"] * 40
    assert len(first.stored) == 40
    assert not first.duplicates
    again = make(store).process(batch)  # redelivered after a crash before the acks
    assert again.actions == ["ack"] * 40
    assert again.stored == []
    assert again.duplicates == {"JPN": 40}
    assert store.inbox_count() == 40


def test_a_batch_the_store_cannot_take_is_logged_once_however_often_it_comes_back(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # A disk-full trial: the store full, the audit log not. Each redelivery of the
    # batch logged its receipts again (up to 80 entries an envelope), and the node
    # then refused to start: its log held receipts beyond one append that its store
    # lacked.
    make, forger, path = usa_inbound
    records = records_for("JPN", 5, seed=31)
    batch = [forger.delivery(r) for r in records]
    Store(path).close()
    full = Store(path, max_pages=8)
    inbound = make(full)

    def receipts() -> int:
        return sum(e["type"] == "received" for e in audit_entries(path.parent / "audit"))

    for _ in range(3):  # the batch handed back and delivered again, three times
        with pytest.raises(StoreError, match="database or disk is full"):
            inbound.process(batch)
    assert receipts() == 5
    full.close()
    inbound.store = Store(path)  # space returns
    assert inbound.store.writable()
    assert inbound.process(batch).actions == ["ack"] * 5
    assert receipts() == 5  # its entries were written the first time
    assert inbound.store.inbox_count() == 5


def test_a_sender_past_its_daily_budget_is_refused_before_decryption_across_restarts(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # The budget counts the envelope bytes stored per sender and UTC day: JPN's third
    # report would pass it, and so would JPN's junk: both are refused at ``budget``
    # (junk never reaches ``format``); KOR's are its own budget's; a redelivery of
    # what was stored is acked as before. A restart (a new Inbound, the same store)
    # carries the day on.
    make, forger, path = usa_inbound
    records = records_for("JPN", 3, seed=51)
    jpn = [forger.delivery(r) for r in records]
    spent = len(jpn[0][1]) + len(jpn[1][1])
    budget = spent + 3  # room for 3 more bytes: not for the 4 of b"junk"
    store = Store(path)
    inbound = make(store, budget=budget)
    first = inbound.process(jpn[:2])
    assert first.actions == ["ack", "ack"]
    today = utc_day(time.time())
    assert store.sender_bytes(today) == {"JPN": spent}
    assert inbound.budget.ratio("JPN", today) == spent / budget
    junk = ("from.JPN.msmt.to.USA.vessel", b"junk")
    kor_junk = ("from.KOR.msmt.to.USA.vessel", b"junk")
    second = inbound.process([jpn[2], junk, kor_junk, jpn[0]])
    assert second.actions == ["term", "term", "term", "ack"]
    assert second.rejected == {"budget": 2, "format": 1}
    assert second.duplicates == {"JPN": 1}
    assert second.stored == []
    refusals = [e for e in audit_entries(path.parent / "audit") if e["type"] == "rejected"]
    assert [(e["source"], e["step"]) for e in refusals] == [
        ("JPN", "budget"),
        ("JPN", "budget"),
        ("KOR", "format"),
    ]
    assert refusals[0]["reason"] == (
        f"JPN's messages stored on {today} (UTC) take {spent} bytes and this one"
        f" {len(jpn[2][1])}: over its budget of {budget} bytes a day"
        " (limits.sender_bytes_per_day); its sender may send it again the next day"
    )
    restarted = make(store, budget=budget)
    assert restarted.process([jpn[2]]).rejected == {"budget": 1}
    raised = make(store, budget=spent + len(jpn[2][1]))
    assert raised.process([jpn[2]]).actions == ["ack"]
    assert store.sender_bytes(today) == {"JPN": spent + len(jpn[2][1])}
    assert store.inbox_count() == 3


def test_a_batch_the_store_refuses_spends_none_of_its_senders_budget(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # Bytes are reserved as messages are admitted; a batch that is not committed
    # (the store full) gives them back, or its redelivery would be refused as over
    # the budget it never spent.
    make, forger, path = usa_inbound
    records = records_for("JPN", 5, seed=52)
    batch = [forger.delivery(r) for r in records]
    budget = sum(len(data) for _, data in batch)
    Store(path).close()
    full = Store(path, max_pages=8)
    inbound = make(full, budget=budget)
    with pytest.raises(StoreError, match="database or disk is full"):
        inbound.process(batch)
    full.close()
    inbound.store = Store(path)
    assert inbound.process(batch).actions == ["ack"] * 5
    assert inbound.store.sender_bytes(utc_day(time.time())) == {"JPN": budget}


def test_receipts_the_log_holds_and_the_store_lost_are_stored_whatever_the_budget(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # A review: a crash between a batch's audit append and its store commit; at the
    # restart the hub delivered newer messages first, which spent the sender's budget,
    # and the batch that came back was refused at ``budget``: the log said received,
    # the store lacked them, and replay called them delivered. What a start finds so
    # (here: a full store instead of the crash) is stored when it comes, logged once.
    make, forger, path = usa_inbound
    records = records_for("JPN", 7, seed=54)
    msgs = [forger.delivery(r) for r in records]
    lost, newer = msgs[:5], msgs[5:]
    Store(path).close()
    full = Store(path, max_pages=8)
    with pytest.raises(StoreError, match="database or disk is full"):
        make(full).process(lost)
    full.close()
    logged = [e for e in audit_entries(path.parent / "audit") if e["type"] == "received"]
    found = frozenset((e["sender"], e["jwe_sha256"]) for e in logged)  # as a start finds them
    assert len(found) == 5
    store = Store(path)
    store.set_state({UNSTORED_STATE: unstored_text(found)})
    inbound = make(store, budget=sum(len(data) for _, data in newer), unstored=found)
    assert inbound.process(newer).actions == ["ack", "ack"]  # the budget spent
    assert inbound.process(lost).actions == ["ack"] * 5  # stored, not refused
    assert store.inbox_count() == 7
    entries = audit_entries(path.parent / "audit")
    receipts = Counter(e["jwe_sha256"] for e in entries if e["type"] == "received")
    assert set(receipts.values()) == {1}  # each logged once
    assert len(receipts) == 7
    assert store.state()[UNSTORED_STATE] == "[]"  # stored: nothing kept for a next start


def test_receipts_the_log_holds_and_the_store_lost_are_stored_past_the_freshness_window(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # As above, but the node stayed down (or its store full) past the freshness
    # window: the batch that came back was refused at ``freshness``, though the log
    # had it received while fresh; the store lacked them and replay called them
    # delivered. Time passing is a shorter window here: the reports are 30 minutes
    # old, the window 1 hour when they were logged, 10 minutes when they come back.
    make, forger, path = usa_inbound
    older = Forger(forger.world, datetime.now(UTC) - timedelta(minutes=30))
    lost = [older.delivery(r) for r in records_for("JPN", 5, seed=55)]
    stale = older.delivery(records_for("JPN", 1, seed=56)[0])
    Store(path).close()
    full = Store(path, max_pages=8)
    with pytest.raises(StoreError, match="database or disk is full"):
        make(full).process(lost)
    full.close()
    logged = [e for e in audit_entries(path.parent / "audit") if e["type"] == "received"]
    found = frozenset((e["sender"], e["jwe_sha256"]) for e in logged)  # as a start finds them
    assert len(found) == 5
    store = Store(path)
    inbound = make(store, unstored=found, freshness=timedelta(minutes=10))
    result = inbound.process([*lost, stale])
    assert result.actions == ["ack"] * 5 + ["term"]  # stored; the one never logged refused
    assert result.rejected == Counter({"freshness": 1})
    assert store.inbox_count() == 5
    entries = audit_entries(path.parent / "audit")
    assert Counter(e["type"] for e in entries if e["type"] in ("received", "rejected")) == {
        "received": 5,
        "rejected": 1,
    }


def test_receipts_a_full_store_lost_are_kept_for_a_restart_past_other_writes(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # A review (/tmp/h80): the receipts a running node's full store lost were kept in
    # memory only. A write of another kind that committed first (an intake accept, a
    # sent mark) recorded the log's size past their entries, where a start no longer
    # looks: after a restart they came back too old and were refused. The first write
    # that commits now keeps them in the store's status, which a start reads.
    make, forger, path = usa_inbound
    older = Forger(forger.world, datetime.now(UTC) - timedelta(minutes=30))
    lost = [older.delivery(r) for r in records_for("JPN", 5, seed=57)]
    Store(path).close()
    store = Store(path, max_pages=8)
    inbound = make(store)
    store.audit_size = lambda: inbound.audit.size  # as the node sets it
    with pytest.raises(StoreError, match="database or disk is full"):
        inbound.process(lost)
    store._db.execute("PRAGMA max_page_count=1073741823")  # room again
    store.set_state({"last_error": ""})  # another kind of write commits first
    audit_dir = path.parent / "audit"
    config = cast(NodeConfig, SimpleNamespace(audit_dir=audit_dir, store_path=path))
    log = ReadOnlyLog(audit_verify.load(audit_dir))
    assert check_store_against_log(config, store, log)[1] == set()  # past the log's scan
    kept = read_unstored(store.state()[UNSTORED_STATE])
    assert len(kept) == 5
    store.close()
    store = Store(path)  # a restart, with what the start reads
    result = make(store, unstored=frozenset(kept), freshness=timedelta(minutes=10)).process(lost)
    assert result.actions == ["ack"] * 5
    assert store.inbox_count() == 5
    assert store.state()[UNSTORED_STATE] == "[]"


def test_the_same_bytes_twice_in_a_batch_take_the_budget_once(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # A review: the second copy reserved its bytes too, and was refused at ``budget``
    # with the sender under its limit, instead of being acked as the duplicate it is.
    make, forger, path = usa_inbound
    (record,) = records_for("JPN", 1, seed=55)
    message = forger.delivery(record)
    store = Store(path)
    result = make(store, budget=len(message[1])).process([message, message])
    assert result.actions == ["ack", "ack"]
    assert (len(result.stored), result.duplicates) == (1, {"JPN": 1})
    assert store.sender_bytes(utc_day(time.time())) == {"JPN": len(message[1])}


def test_a_senders_budget_is_per_utc_day_and_reserved_within_a_batch() -> None:
    from broker.inbound_base import SenderBudget

    budget = SenderBudget(100, "2026-12-07", {"JPN": 60})
    assert budget.reserve("JPN", 40) is None
    refused = budget.reserve("JPN", 1)  # the batch's reservation counts
    assert refused is not None
    assert refused.step == "budget"
    assert budget.reserve("KOR", 100) is None  # each sender its own
    budget.keep({"JPN": 30})  # of the 40 reserved, 30 stored
    budget.free()
    assert budget.used == {"JPN": 90}
    assert budget.ratio("JPN", "2026-12-07") == 0.9
    assert budget.reserve("JPN", 10) is None
    assert budget.reserve("JPN", 1) is not None
    assert budget.ratio("JPN", "2026-12-08") == 0.0  # a new day, before anything comes
    budget.start("2026-12-08", {})
    assert budget.reserve("JPN", 100) is None  # the new day starts empty
    assert budget.used == {}


def test_a_new_utc_day_starts_from_what_the_store_counted_for_it(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # The day turns (here: the node's counting day is made yesterday's) and the next
    # batch counts against the store's totals for today, which a clock stepped back
    # over midnight, or another process's earlier run, left there.
    make, forger, path = usa_inbound
    (record,) = records_for("JPN", 1, seed=53)
    message = forger.delivery(record)
    store = Store(path)
    today = utc_day(time.time())
    inbound = make(store, budget=len(message[1]))
    with closing(sqlite3.connect(path)) as db, db:  # today's total, as an earlier run left it
        db.execute("INSERT INTO sender_bytes VALUES ('JPN', ?, 1)", (today,))
    inbound.budget.start("2000-01-01", {})
    assert inbound.process([message]).rejected == {"budget": 1}
    assert inbound.budget.day == today
    assert inbound.budget.used == {"JPN": 1}


async def test_reports_signed_with_a_key_a_partner_does_not_know_yet_are_held_not_lost(
    world: World,
) -> None:
    # JPN rotates its keys and restarts first; USA runs on with the older roster
    # (a rollout still under way). What JPN signs meanwhile is held at USA, not
    # refused, and arrives once USA restarts with the new roster.
    world.write_config("JPN")
    world.write_config("USA")
    world.start("USA", MSMT_HOLD_SECONDS="1")
    world.start("JPN")
    policy = world.policy("JPN")
    records = [
        r
        for r in records_for("JPN", 60, seed=21)
        if "USA" in expected_partners(policy, parse_record(json.dumps(r)))
    ]
    before, after = records[: len(records) // 2], records[len(records) // 2 :]
    assert before
    assert after
    await world.submit("JPN", before)
    await await_for(
        lambda: len(world.inbox_ids("USA", "JPN")) == len(before), 30, "USA has the first half"
    )
    assert world.terminate("JPN") == 0
    new_sig, new_enc = keys_custodian.rotate_keys(world.keydir, "JPN")
    world.start("JPN")
    # JPN's own log records the rotation it started with (AUDIT.md's key entries).
    jpn_log = audit_entries(world.config("JPN").audit_dir)
    assert [(e["action"], e["new_kid"]) for e in jpn_log if e["type"] == "key"] == sorted(
        [("rotated", new_enc), ("rotated", new_sig)], key=lambda pair: pair[1]
    )
    answers = await world.submit("JPN", after)
    assert all(a["status"] == "accepted" for a in answers)

    def held() -> int:
        store = world.store("USA")
        try:
            return store.counters().get("held.JPN", 0)
        finally:
            store.close()

    await await_for(lambda: held() >= len(after), 30, "USA holds the second half")
    assert len(world.inbox_ids("USA", "JPN")) == len(before)
    assert audit_rejections(world.config("USA")) == Counter()

    assert world.terminate("USA") == 0
    world.start("USA", MSMT_HOLD_SECONDS="1")
    await await_for(
        lambda: len(world.inbox_ids("USA", "JPN")) >= len(records), 30, "USA has every report"
    )
    got = world.inbox_ids("USA", "JPN")
    assert sorted(got) == sorted(r["report_id"] for r in records)
    assert audit_rejections(world.config("USA")) == Counter()


async def test_a_report_whose_audit_entry_failed_waits_unsent_until_the_entry_is_written(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store commit succeeds and the audit append after it fails (a full
    # disk): the report must not be signed and sent before its ``accepted``
    # entry exists, or the log would show a send with no arrival before it.
    world.write_config("JPN")
    jpn = load_node(world.config("JPN"))
    task = asyncio.create_task(jpn.run())
    real_append = jpn.audit.append_many
    failing = True

    def append_many(events: Any) -> Any:
        if failing and any(e.type == "accepted" for e in events):
            raise StoreError("audit log: database or disk is full")
        return real_append(events)

    monkeypatch.setattr(jpn.audit, "append_many", append_many)
    try:
        await await_for(lambda: jpn.ready() is None, 20, "JPN ready")
        (record,) = records_for("JPN", 1, seed=31)
        (answer,) = await world.submit("JPN", [record])
        # Stored is accepted: a resend would only find it taken ("duplicate").
        assert answer["status"] == "accepted"
        jpn.plan_loop.wake()  # as the next accepted report would
        await asyncio.sleep(2.5)  # housekeeping rounds that cannot write the entry either
        assert jpn.store.unaudited() == [(record["report_id"], record["kind"])]
        assert jpn.store.outbox_depth() == 1  # held unplanned, so nothing signed or sent
        assert jpn.store.sent_to("USA") == 0

        failing = False  # space returns
        await await_for(lambda: jpn.store.sent_to("USA") == 1, 20, "the report sent to USA")
    finally:
        jpn.stop.set()
        await task
    entries = audit_entries(world.config("JPN").audit_dir)
    rid = record["report_id"]
    arrival = [e for e in entries if e["type"] == "accepted" and e["report_id"] == rid]
    sends = [e for e in entries if e["type"] == "sent" and e["report_id"] == rid]
    assert [e["feed"] for e in arrival] == ["recovered"]
    assert sends
    assert all(arrival[0]["seq"] < e["seq"] for e in sends)


async def test_sends_the_store_cannot_mark_are_logged_once_and_published_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk-full trial: the hub acked, the store could not mark the envelopes sent,
    # and the node published them again and again (178,940 times for 177); the fix
    # tries the mark again each second, and a review found each try logging the
    # same sends again. Now one `sent` entry each, and one publish each.
    world.write_config("JPN")
    jpn = load_node(world.config("JPN"))
    real = jpn.store.mark_sent
    failures = 3

    def mark_sent(batch: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise StoreError(f"store {jpn.store.path.name}: database or disk is full")
        return real(batch)

    monkeypatch.setattr(jpn.store, "mark_sent", mark_sent)
    task = asyncio.create_task(jpn.run())
    try:
        await await_for(lambda: jpn.ready() is None, 20, "JPN ready")
        (record,) = records_for("JPN", 1, seed=32)
        assert [a["status"] for a in await world.submit("JPN", [record])] == ["accepted"]
        await await_for(lambda: jpn.store.sent_to("USA") == 1, 30, "marked sent at last")
        assert failures == 0
    finally:
        jpn.stop.set()
        await task
    sends = [
        e
        for e in audit_entries(world.config("JPN").audit_dir)
        if e["type"] == "sent" and e["report_id"] == record["report_id"]
    ]
    assert len(sends) == len({e["partner"] for e in sends})  # one entry a partner
    (published,) = [
        s.value
        for m in jpn.metrics.published.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels["partner"] == "USA"
    ]
    assert published == 1


def test_own_key_events_log_each_rotation_and_revocation_once() -> None:
    from envelope_world import make_roster, roster_entry

    from broker.node_start import own_key_events

    now = datetime.now(UTC)
    roster = make_roster(
        [
            roster_entry("JPN", "sig", 1, status="retired", retired_at=now),
            roster_entry("JPN", "sig", 2),
            roster_entry("JPN", "enc", 1, status="revoked"),
            roster_entry("JPN", "enc", 2),
            roster_entry("USA", "sig", 1, status="revoked"),  # another member's: not JPN's log
            roster_entry("USA", "enc", 1),
        ]
    )
    events, logged = own_key_events("JPN", roster, set(), now)
    fields = [(e.fields["action"], e.fields["kid"], e.fields["new_kid"]) for e in events]
    assert fields == [("revoked", "JPN-enc-1", None), ("rotated", "JPN-sig-1", "JPN-sig-2")]
    assert logged == {"revoked:JPN-enc-1", "rotated:JPN-sig-1"}
    # The next start with the same roster logs nothing again.
    assert own_key_events("JPN", roster, logged, now) == ([], logged)


def test_a_key_missing_from_an_older_roster_holds_the_message_until_it_is_stale(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # KOR's roster is behind: JPN signs with a key, and encrypts to a USA key,
    # that USA's roster does not list yet. Refusing would lose the reports for
    # good; they are handed back for redelivery, unaudited, until too old.
    make, forger, path = usa_inbound
    store = Store(path)
    signed, encrypted, good = records_for("JPN", 3, seed=8)
    batch = [forger.delivery(r) for r in (signed, encrypted, good)]
    jpn_sig = forger.jpn.signing_kid
    usa_enc = forger.roster.current("USA", "enc", forger.now).kid
    no_jpn_sig = make(store, lambda k: k.kid == jpn_sig)
    before = len(audit_entries(path.parent / "audit"))
    fresh = datetime.now(UTC)
    result = no_jpn_sig.process(batch[:1] + batch[2:], lambda _i: fresh)
    assert result.actions == ["hold", "hold"]
    assert result.held == {"JPN": 2}
    assert result.stored == []
    assert not result.rejected
    assert len(audit_entries(path.parent / "audit")) == before

    # A USA key the roster lacks is the same case on the recipient side.
    no_usa_enc = make(store, lambda k: k.kid == usa_enc)
    no_usa_enc.decryption_keys = {
        kid: key for kid, key in no_usa_enc.decryption_keys.items() if kid != usa_enc
    }
    assert no_usa_enc.process(batch[1:2], lambda _i: fresh).actions == ["hold"]

    # Once the roster has the keys (a restart with it), the same bytes verify.
    assert make(store).process(batch, lambda _i: fresh).actions == ["ack"] * 3
    assert store.inbox_count() == 3

    # A message that has waited past the freshness window (1 h here) is refused
    # and audited like any other failure: holding it longer could never help.
    late = records_for("JPN", 1, seed=9)[0]
    old = fresh - timedelta(hours=2)
    token = forger.envelope(late)[0].encode()
    stale = no_jpn_sig.process([(f"from.JPN.msmt.to.USA.{late['kind']}", token)], lambda _i: old)
    assert stale.actions == ["term"]
    assert stale.rejected == {"key": 1}
    refused = [e for e in audit_entries(path.parent / "audit") if e["type"] == "rejected"]
    assert [(e["step"], e["reason"][-20:]) for e in refused] == [("key", "(held until too old)")]
    # Unless the log holds its receipt (the store lost the commit after it): it was
    # verified and fresh when logged, so it waits for the roster however old (h80).
    digest = hashlib.sha256(token).hexdigest()
    logged = make(store, lambda k: k.kid == jpn_sig, unstored=frozenset({("JPN", digest)}))
    kept = logged.process([(f"from.JPN.msmt.to.USA.{late['kind']}", token)], lambda _i: old)
    assert kept.actions == ["hold"]


def test_a_report_issued_ahead_of_our_clock_is_held_until_the_clocks_agree(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # A clock trial: USA's clock stepped back an hour while JPN published, and USA
    # refused, for good, every report that came in the second before it paused for
    # its clock (77-198 a run); two nodes each 200 s off, within what pauses either,
    # are 400 s apart. Either way the report passes once the clocks agree.
    make, forger, path = usa_inbound
    store = Store(path)
    inbound = make(store)
    record = records_for("JPN", 1, seed=15)[0]
    ahead = forger.envelope(record, at=datetime.now(UTC) + timedelta(seconds=303))[0]
    message = (f"from.JPN.msmt.to.USA.{record['kind']}", ahead.encode())
    fresh = datetime.now(UTC)
    before = len(audit_entries(path.parent / "audit"))
    with capture_logs() as logs:
        first = inbound.process([message], lambda _i: fresh)
    assert first.actions == ["hold"]
    assert first.held == {"JPN": 1}
    assert not first.rejected
    assert len(audit_entries(path.parent / "audit")) == before  # nothing final to record
    (held,) = [e for e in logs if e["event"] == "inbound_held"]
    assert held["step"] == "freshness"
    assert "in the future; limit 0:05:00" in held["reason"]
    assert "clock" in held["hint"]
    time.sleep(4)  # now it is less than 5 minutes ahead
    assert inbound.process([message], lambda _i: fresh).actions == ["ack"]
    assert store.inbox_count() == 1
    # One that stays ahead after the freshness window (an hour here) is refused.
    late = records_for("JPN", 1, seed=16)[0]
    far = forger.envelope(late, at=datetime.now(UTC) + timedelta(days=1))[0]
    old = fresh - timedelta(hours=2)
    stale = inbound.process(
        [(f"from.JPN.msmt.to.USA.{late['kind']}", far.encode())], lambda _i: old
    )
    assert stale.actions == ["term"]
    assert stale.rejected == {"freshness": 1}


def test_one_sender_can_hold_only_so_many_messages_and_others_still_flow(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # Red team: about 1,025 envelopes to a made-up key of USA's (no valid crypto
    # needed) filled the consumer's max_ack_pending with held messages, and the
    # whole inbox stalled for a day. One sender may hold MAX_HELD_PER_SENDER.
    from broker.inbound_base import MAX_HELD_PER_SENDER

    make, forger, path = usa_inbound
    store = Store(path)
    inbound = make(store)
    good = records_for("JPN", 1, seed=14)[0]
    made_up = forger.envelope(good)[0]
    header = json.loads(sdjwt.b64u_decode(made_up.split(".")[0]))

    def junk(i: int) -> bytes:
        fake = dict(header, kid=f"USA-enc-29990101-{i:08x}")
        head = sdjwt.b64u_encode(json.dumps(fake).encode())
        return ".".join([head, *made_up.split(".")[1:]]).encode()

    fresh = datetime.now(UTC)
    flood = [("from.KOR.msmt.to.USA.vessel", junk(i)) for i in range(MAX_HELD_PER_SENDER + 5)]
    first = inbound.process(flood, lambda _i: fresh)
    assert first.actions == ["hold"] * MAX_HELD_PER_SENDER + ["term"] * 5
    assert first.rejected == {"recipient": 5}
    # The same held messages coming back are still held; JPN's report is not in their way.
    again = inbound.process(
        [*flood[:3], (f"from.JPN.msmt.to.USA.{good['kind']}", made_up.encode())],
        lambda _i: fresh,
    )
    assert again.actions == ["hold", "hold", "hold", "ack"]
    refused = [e for e in audit_entries(path.parent / "audit") if e["type"] == "rejected"]
    assert len(refused) == 5
    assert all(
        e["reason"].endswith(f"(not held: {MAX_HELD_PER_SENDER} held already)") for e in refused
    )
    # A review: places whose messages never come back (the hub kept them, or made
    # them up) stayed taken until a restart, and the sender's real reports to be held
    # were refused for good. A place frees once its message could only be refused.
    now = [1000.0]
    later = make(store, clock=lambda: now[0])
    full = later.process(flood[:MAX_HELD_PER_SENDER], lambda _i: fresh)
    assert full.actions == ["hold"] * MAX_HELD_PER_SENDER
    one_more = [("from.KOR.msmt.to.USA.vessel", junk(MAX_HELD_PER_SENDER + 10))]
    assert later.process(one_more, lambda _i: fresh).actions == ["term"]
    now[0] += timedelta(hours=1, minutes=5, seconds=1).total_seconds()  # freshness + skew
    one_more = [("from.KOR.msmt.to.USA.vessel", junk(MAX_HELD_PER_SENDER + 11))]
    assert later.process(one_more, lambda _i: fresh).actions == ["hold"]


def test_a_held_message_comes_again_later_each_time_up_to_a_cap() -> None:
    from nats.aio.msg import Msg

    from broker.receiver_pull import hold_delay

    def delivered(n: int) -> Msg:
        # The hub's ack subject carries the delivery count (nats-py parses it).
        return Msg(_client=None, subject="x", reply=f"$JS.ACK.S.c.{n}.10.10.1700000000000000000.0")  # type: ignore[arg-type]

    delays = [hold_delay(60.0, delivered(n)) for n in (1, 2, 3, 4, 5, 6, 1000)]
    assert delays == [60.0, 120.0, 240.0, 480.0, 900.0, 900.0, 900.0]


def test_a_message_for_a_revoked_key_of_mine_says_so(usa_inbound: tuple[Any, Forger, Path]) -> None:
    make, forger, path = usa_inbound
    usa_enc = forger.roster.current("USA", "enc", forger.now).kid
    record = records_for("JPN", 1, seed=10)[0]
    token = forger.envelope(record)[0].encode()
    inbound = make(Store(path))
    # USA's roster lists the key as revoked and its node holds no private key for it.
    inbound.decryption_keys = {}
    revoked = inbound.roster.get(usa_enc)
    inbound.roster = Roster(
        [*(k for k in inbound.roster if k.kid != usa_enc), replace(revoked, status="revoked")]
    )
    with capture_logs() as logs:
        result = inbound.process([(f"from.JPN.msmt.to.USA.{record['kind']}", token)])
    assert result.actions == ["term"]
    assert result.rejected == {"recipient": 1}
    refused = [e for e in audit_entries(path.parent / "audit") if e["type"] == "rejected"]
    assert [e["reason"] for e in refused] == [
        f"key {usa_enc} is revoked: I hold no private key for it"
    ]
    # Nothing vouches for the id before decryption: the audit entry has none, and the
    # log line names the header's as a claim, for the sender's msmt node resend --report.
    assert refused[0]["report_id"] is None
    (line,) = [e for e in logs if e["event"] == "inbound_rejected"]
    assert line["claimed_report_id"] == record["report_id"]
    assert "report_id" not in line


def test_signed_routing_and_markings_are_held_to_the_hub_and_name_the_report(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # Found by an independent KOR implementation: a vessel sent on the .worker
    # subject, and a report whose REL TO leaves USA out, were both stored.
    make, forger, path = usa_inbound
    vessel, elsewhere, again = [
        r for r in records_for("JPN", 60, seed=12) if r["kind"] == "vessel" and not r.get("rel_to")
    ][:3]
    elsewhere["rel_to"] = ["GBR", "KOR"]
    store = Store(path)
    first = make(store).process(
        [
            ("from.JPN.msmt.to.USA.worker", forger.envelope(vessel)[0].encode()),
            (
                "from.JPN.msmt.to.USA.vessel",
                forger.envelope(elsewhere, rel_to_as_given=True)[0].encode(),
            ),
            ("from.JPN.msmt.to.USA.vessel", forger.envelope(again)[0].encode()),
        ]
    )
    assert first.actions == ["term", "term", "ack"]
    replayed = make(store).process(
        [("from.JPN.msmt.to.USA.vessel", forger.envelope(again)[0].encode())]
    )
    assert replayed.actions == ["term"]
    rejected = [e for e in audit_entries(path.parent / "audit") if e["type"] == "rejected"]
    assert [(e["step"], e["reason"], e["report_id"]) for e in rejected] == [
        # Before the signature is checked, the report id is only the sender's word.
        ("sender", "sent as 'worker' but the signed kind is vessel", None),
        ("markings", "REL TO GBR, KOR does not include USA", elsewhere["report_id"]),
        ("replay", f"report {again['report_id']} was already received", again["report_id"]),
    ]
    assert [r.report_id for r in first.stored] == [again["report_id"]]


def _without_chain(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # An entry's place in its log (seq, prev) and time (at) differ between two runs, and
    # so may a stale report's age in its reason ("issued 2:00:01 ago").
    return [
        {
            k: re.sub(r"\d+:\d\d:\d\d ago", "ago", v) if k == "reason" else v
            for k, v in e.items()
            if k not in {"seq", "prev", "at"}
        }
        for e in entries
    ]


def _against_one_at_a_time(
    make: Any, path: Path, before: list[tuple[str, bytes]], batch: list[tuple[str, bytes]]
) -> tuple[Any, list[dict[str, Any]], Store]:
    """``batch`` through ``Inbound.process`` as it is, then one message at a time (the
    checklist whole per message, as before batches were verified a step at a time), each
    into its own store that first took ``before``; both must decide and audit alike.
    Returns the first's result, its audit entries for the batch, and its store."""
    log = path.parent / "audit"
    store = Store(path)
    inbounds = [make(store), make(Store(path.with_name("one-at-a-time.sqlite3")))]
    # Its fallback for every message: ``_one`` for each in turn, against the batch so far.
    inbounds[1]._verify = lambda messages, *_a: [(None, "")] * len(messages)
    for inbound in inbounds:
        assert inbound.process(before).actions == ["ack"] * len(before)
    start = len(audit_entries(log))
    staged = inbounds[0].process(batch)
    middle = len(audit_entries(log))
    one = inbounds[1].process(batch)
    entries = audit_entries(log)
    assert (staged.actions, staged.rejected, staged.duplicates, staged.held) == (
        one.actions,
        one.rejected,
        one.duplicates,
        one.held,
    )
    assert [r.report_id for r in staged.stored] == [r.report_id for r in one.stored]
    assert _without_chain(entries[start:middle]) == _without_chain(entries[middle:])
    return staged, entries[start:middle], store


def test_a_mixed_batch_refuses_each_bad_message_at_its_own_step_and_stores_the_rest(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # A batch is verified a step at a time across its messages; each message's
    # checklist still decides it alone, in its order, and the audit log reads as
    # if the messages had been verified one after another.
    make, forger, path = usa_inbound
    good = records_for("JPN", 4, seed=41)
    bad = records_for("JPN", len(STEPS), seed=43)
    kor = records_for("KOR", 1, seed=44)[0]
    earlier, unknown = records_for("JPN", 2, seed=45)

    def sent(record: dict[str, Any], **kw: Any) -> tuple[str, bytes]:
        return f"from.JPN.msmt.to.USA.{record['kind']}", forger.envelope(record, **kw)[0].encode()

    before = [sent(earlier)]
    refused = []
    for i, (step, record) in enumerate(zip(STEPS, bad, strict=True)):
        data, suffix = forge_bad(forger, step, record, kor, i)
        refused.append((f"from.JPN.msmt.to.USA.{suffix}", data))
    refused[1] = ("from.JPN.msmt.to.USA.vessel", b"A" * (2 << 20))  # over max_message_bytes
    batch = [
        sent(good[0]),
        *refused[:5],
        sent(good[1]),
        sent(earlier),  # the same report again, newly encrypted: a replay
        before[0],  # the very bytes stored before: a redelivery
        sent(unknown, kid="JPN-sig-99"),  # a key this roster lacks: held
        *refused[5:],
        sent(good[2]),
        sent(good[3]),
    ]
    result, entries, store = _against_one_at_a_time(make, path, before, batch)
    assert result.actions == [
        "ack",
        *["term"] * 5,
        "ack",
        "term",
        "ack",
        "hold",
        *["term"] * (len(STEPS) - 5),
        "ack",
        "ack",
    ]
    assert [r.report_id for r in result.stored] == [r["report_id"] for r in good]
    assert result.duplicates == {"JPN": 1}
    assert result.held == {"JPN": 1}
    assert [(e["type"], e.get("step"), e.get("report_id")) for e in entries] == [
        ("received", None, good[0]["report_id"]),
        *[("rejected", step, None) for step in STEPS[:5]],
        ("received", None, good[1]["report_id"]),
        ("rejected", "replay", earlier["report_id"]),
        # From the signature on, the refusal names the report (freshness, step 10).
        *[
            ("rejected", step, bad[i]["report_id"] if step == "freshness" else None)
            for i, step in enumerate(STEPS[5:], start=5)
        ],
        ("received", None, good[2]["report_id"]),
        ("received", None, good[3]["report_id"]),
    ]
    assert store.inbox_count() == 5


def test_a_report_twice_in_one_batch_is_stored_once_as_one_at_a_time_would(
    usa_inbound: tuple[Any, Forger, Path],
) -> None:
    # Within a batch, a message can decide another: the same bytes again are a
    # redelivery of what the batch stored, the same report newly encrypted a replay;
    # before the first copy is verified, neither is known.
    make, forger, path = usa_inbound
    first, second, third, earlier = records_for("JPN", 4, seed=46)

    def sent(record: dict[str, Any], **kw: Any) -> tuple[str, bytes]:
        return f"from.JPN.msmt.to.USA.{record['kind']}", forger.envelope(record, **kw)[0].encode()

    once, again = sent(first), sent(first)
    stale = sent(second, at=forger.now - timedelta(hours=2))
    batch = [
        once,
        once,  # the same bytes: acked, not stored twice
        again,  # the same report, other bytes: a replay
        stale,
        sent(second),  # the same report as the stale one: that one was refused, this one is new
        ("from.JPN.msmt.to.USA.vessel", flip(once[1].decode(), 3).encode()),
        sent(third),
        sent(third),
    ]
    result, entries, store = _against_one_at_a_time(make, path, [sent(earlier)], batch)
    assert result.actions == ["ack", "ack", "term", "term", "ack", "term", "ack", "term"]
    assert [r.report_id for r in result.stored] == [
        first["report_id"],
        second["report_id"],
        third["report_id"],
    ]
    assert result.duplicates == {"JPN": 1}
    assert [(e["type"], e.get("step"), e.get("report_id")) for e in entries] == [
        ("received", None, first["report_id"]),
        ("rejected", "replay", first["report_id"]),
        ("rejected", "freshness", second["report_id"]),
        ("received", None, second["report_id"]),
        ("rejected", "decrypt", None),
        ("received", None, third["report_id"]),
        ("rejected", "replay", third["report_id"]),
    ]
    assert store.inbox_count() == 4


def test_a_replay_is_refused_as_a_replay_even_where_a_later_step_would_fail_unexpectedly(
    usa_inbound: tuple[Any, Forger, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One message at a time, the second copy of a report stops at step 11 (replay);
    # a step at a time, its step 12 may already have run, and failed in a way that
    # names no step: such a batch is decided one message at a time instead.
    make, forger, path = usa_inbound
    record = records_for("JPN", 1, seed=47)[0]
    subject = f"from.JPN.msmt.to.USA.{record['kind']}"
    batch = [(subject, forger.envelope(record)[0].encode()) for _ in range(2)]
    calls = []

    def check_fields(kind: str, fields: Any) -> None:
        calls.append(kind)
        if len(calls) == 2:
            raise RecursionError("deep inside a validator")
        envelope_format.check_fields(kind, fields)

    monkeypatch.setattr("broker.envelope.check_fields", check_fields)
    result = make(Store(path)).process(batch)
    assert result.actions == ["ack", "term"]
    assert result.rejected == {"replay": 1}
    assert [r.report_id for r in result.stored] == [record["report_id"]]


def test_a_message_that_fails_unexpectedly_once_still_decides_its_senders_later_copy(
    usa_inbound: tuple[Any, Forger, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A step at a time, the first copy's checklist fails in a way that names no report
    # (a fault that passes), so the second copy verifies; verified again on its own,
    # the first is stored, and the second is then a replay, as one at a time.
    make, forger, path = usa_inbound
    record = records_for("JPN", 1, seed=48)[0]
    subject = f"from.JPN.msmt.to.USA.{record['kind']}"
    first, second = (forger.envelope(record)[0] for _ in range(2))
    real = envelope_format.parse_jwe
    failed: list[str] = []

    def parse_jwe(token: str, limit: int) -> Any:
        if token == first and not failed:
            failed.append(token)
            raise MemoryError("once")
        return real(token, limit)

    monkeypatch.setattr(envelope, "parse_jwe", parse_jwe)
    store = Store(path)
    result = make(store).process([(subject, first.encode()), (subject, second.encode())])
    assert failed == [first]
    assert result.actions == ["ack", "term"]
    assert result.rejected == {"replay": 1}
    assert [r.report_id for r in result.stored] == [record["report_id"]]
    assert store.inbox_count() == 1


def test_an_unexpected_verifier_failure_costs_one_message_not_the_consumer(
    usa_inbound: tuple[Any, Forger, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    make, forger, path = usa_inbound
    good, poison = records_for("JPN", 2, seed=4)
    real = envelope_format.parse_jwe

    def parse_jwe(token: str, limit: int) -> Any:
        if token == poison_token:
            raise RecursionError("deep inside a parser")
        return real(token, limit)

    poison_token = forger.envelope(poison)[0]
    monkeypatch.setattr(envelope, "parse_jwe", parse_jwe)
    store = Store(path)
    result = make(store).process(
        [
            ("from.JPN.msmt.to.USA.vessel", poison_token.encode()),
            (f"from.JPN.msmt.to.USA.{good['kind']}", forger.envelope(good)[0].encode()),
        ]
    )
    assert result.actions == ["term", "ack"]
    assert result.rejected == {"internal": 1}
    assert [r.report_id for r in result.stored] == [good["report_id"]]


async def test_witness_raises_the_alarm_when_a_log_rewrites_its_history(world: World) -> None:
    import shutil

    world.write_config("JPN", BATCH_POLICY)
    world.write_config("USA")
    usa = load_node(world.config("USA"))
    usa_task = asyncio.create_task(usa.run())
    jpn = load_node(world.config("JPN"))
    jpn_task = asyncio.create_task(jpn.run())
    try:
        await await_for(lambda: usa.ready() is None and jpn.ready() is None, 20, "ready")
        await world.submit("JPN", records_for("JPN", 12, seed=11))
        await await_for(
            lambda: usa.auditnet.witness.state.get("JPN", LogState(0, b"")).size >= 13,
            30,
            "USA witnessed JPN's log",
        )
        jpn.stop.set()
        await jpn_task
        # JPN throws its log away and starts a new history, signed with its real key.
        # (It throws its store and witness state away too: a node refuses to start an
        # empty log beside reports, or beside a witness state that shows it ran.)
        shutil.rmtree(world.config("JPN").audit_dir)
        for path in world.config("JPN").data_dir.glob("node.sqlite3*"):
            path.unlink()
        (world.config("JPN").data_dir / "witness-state.json").unlink(missing_ok=True)
        jpn = load_node(world.config("JPN"))
        jpn_task = asyncio.create_task(jpn.run())
        await await_for(lambda: jpn.ready() is None, 20, "JPN ready again")
        await world.submit("JPN", records_for("JPN", 3, seed=12))

        def alarmed() -> bool:
            return any(
                sample.value > 0
                for metric in usa.metrics.audit_alarms.collect()
                for sample in metric.samples
                if sample.name.endswith("_total") and sample.labels["kind"] in ("fork", "rollback")
            )

        await await_for(alarmed, 30, "USA's alarm")
        # Whose log: JPN's, and the alarm stands while its new history runs.
        assert any(usa.auditnet.alarm_active(kind, "JPN") for kind in ("fork", "rollback"))
        # Housekeeping moves the alarm to the node's last error within a second.
        assert "JPN" in (usa.auditnet.last_error or usa._last_error or "")

        def state() -> dict[str, str]:
            return world.state("USA")

        # msmt status keeps it apart: a red-team member's junk on its own checkpoint
        # subject replaced a fork alarm in last_error within 9 s.
        await await_for(lambda: "JPN" in state().get("last_audit_alarm", ""), 10, "recorded")
        usa.auditnet.last_error = "witness: junk from FRA"
        await await_for(lambda: state().get("last_error") == "witness: junk from FRA", 10, "junk")
        assert "JPN" in state()["last_audit_alarm"]
        # An RFC 3339 time, written when the alarm was taken (not an empty string).
        assert datetime.fromisoformat(state()["last_audit_alarm_at"]) <= datetime.now(UTC)
        assert "\u2014 USA " not in (jpn.audit.latest_checkpoint() or "")
    finally:
        usa.stop.set()
        jpn.stop.set()
        await asyncio.gather(usa_task, jpn_task)


def _started_once_then_accepted(world: World, records: list[dict[str, Any]]) -> NodeConfig:
    """JPN's data after one start, with ``records`` then committed to its store alone.

    What a crash between the accept commit and the audit append leaves behind.
    """
    world.write_config("JPN", BATCH_POLICY)
    config = world.config("JPN")
    node = load_node(config)
    node.store.close()
    node.audit.close()
    raw = Store(config.store_path)
    assert raw.accept(
        [NewReport(r["report_id"], r["kind"], json.dumps(r).encode()) for r in records]
    )
    raw.close()
    return config


def test_a_store_restored_without_its_audit_log_is_refused(world: World) -> None:
    import shutil

    from broker.errors import ConfigError

    config = _started_once_then_accepted(world, records_for("JPN", 1, seed=22))
    kept = config.audit_dir.with_name("audit-kept")
    shutil.move(config.audit_dir, kept)  # a restore that left audit/ out
    message = "holds reports but the audit log in .* is missing or empty"
    with pytest.raises(ConfigError, match=message):
        load_node(config)
    assert not config.audit_dir.exists()  # nothing created in its place
    config.audit_dir.mkdir(mode=0o700)
    (config.audit_dir / DB_FILE).touch()  # an empty file in its place
    with pytest.raises(ConfigError, match=message):
        load_node(config)
    shutil.rmtree(config.audit_dir)
    shutil.move(kept, config.audit_dir)  # restored from the same backup: starts
    node = load_node(config)
    node.store.close()
    node.audit.close()


def test_reports_accepted_but_not_yet_audited_are_audited_at_the_next_start(world: World) -> None:
    records = records_for("JPN", 3, seed=21)
    config = _started_once_then_accepted(world, records)
    node = load_node(config)
    try:
        assert node.store.unaudited() == []
    finally:
        node.store.close()
        node.audit.close()
    recovered = [e for e in audit_entries(config.audit_dir) if e["type"] == "accepted"]
    assert [(e["report_id"], e["feed"]) for e in recovered] == [
        (r["report_id"], "recovered") for r in records
    ]


def _start_with_a_full_disk(config: NodeConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start whose store write fails after the audit log took its entries (a full disk)."""

    def full(store: Store, values: Any) -> None:
        raise StoreError(f"store {store.path.name}: database or disk is full")

    with monkeypatch.context() as patched:
        patched.setattr(Store, "set_state", full)
        with pytest.raises(StoreError, match="database or disk is full"):
            load_node(config)


def _start_and_stop(config: NodeConfig) -> None:
    node = load_node(config)
    node.store.close()
    node.audit.close()


def test_a_first_start_on_a_full_disk_starts_once_space_returns(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A resource trial: the log held the first start's policy entry beside a store
    # still empty, and every later start was refused as a lost store (exit 2).
    world.write_config("JPN")
    config = world.config("JPN")
    _start_with_a_full_disk(config, monkeypatch)
    assert [e["type"] for e in audit_entries(config.audit_dir)] == ["policy"]
    _start_and_stop(config)  # space returns
    assert [e["type"] for e in audit_entries(config.audit_dir)] == ["policy"]


def test_a_start_on_a_full_disk_is_not_logged_twice_once_space_returns(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The entries a start logged before its store write failed are the log's; the
    # next start goes on from them. It went on from the store before: it logged the
    # change and the rotation again, and back on the first policy it logged nothing,
    # so the log said the second was in force while the node sent under the first.
    world.write_config("JPN")
    config = world.config("JPN")
    _start_and_stop(config)
    world.write_config("JPN", BATCH_POLICY)  # a new policy and a rotation, at one restart
    keys_custodian.rotate_keys(world.keydir, "JPN")
    _start_with_a_full_disk(config, monkeypatch)
    _start_and_stop(config)  # space returns
    entries = [e for e in audit_entries(config.audit_dir) if e["type"] in ("policy", "key")]
    assert [(e["type"], e.get("action")) for e in entries] == [
        ("policy", None),
        ("policy", None),
        ("key", "rotated"),
        ("key", "rotated"),
    ]
    first, second = entries[0], entries[1]
    assert second["previous_digest"] == first["policy_digest"] != second["policy_digest"]
    world.write_config("JPN")  # back to the first policy: chained to the second
    _start_and_stop(config)
    last = [e for e in audit_entries(config.audit_dir) if e["type"] == "policy"][-1]
    assert last["previous_digest"] == second["policy_digest"]
    assert last["policy_digest"] == first["policy_digest"]


async def test_node_is_not_ready_until_its_inbox_exists_then_becomes_ready(
    tmp_path: Path,
) -> None:
    keydir, server = start_hub(tmp_path, ("JPN", "USA"))
    world = World(tmp_path, keydir, server)
    try:
        world.write_config("USA")
        node = load_node(world.config("USA"))
        task = asyncio.create_task(node.run())
        try:
            await await_for(lambda: node.nc is not None and node.nc.is_connected, 20, "connected")
            await asyncio.sleep(1.5)
            assert node.ready() == "inbox consumer not bound"
            # The status says what to do, not only that the stream is missing.
            assert node._last_error.endswith(
                ": the hub has no stream INBOX_USA or consumer USA_NODE;"
                " run msmt nats setup --account USA (docs/DEPLOY.md)"
            ), node._last_error
            seed = (keydir / "USA" / keys.NATS_SEED_FILE).read_bytes().strip()
            await setup_account(server.url, "USA", seed)
            await await_for(lambda: node.ready() is None, 20, "ready once the inbox exists")
        finally:
            node.stop.set()
            await task
    finally:
        server.kill()


async def _narrow_consumer(js: JetStreamContext) -> None:
    info = await js.consumer_info(inbox_stream("USA"), inbox_durable("USA"))
    await js.add_consumer(
        inbox_stream("USA"), dataclasses.replace(info.config, filter_subject="from.KOR.nothing")
    )


async def _discard_old(js: JetStreamContext) -> None:
    info = await js.stream_info(inbox_stream("USA"))
    await js.update_stream(
        dataclasses.replace(info.config, discard=DiscardPolicy.OLD, max_msgs=100)
    )


@pytest.mark.parametrize(
    ("alter", "kind", "altered"),
    [
        # A hostile-hub review narrowed a node's consumer to a subject no report has:
        # the inbox (interest retention) dropped every report at once, and the node
        # stayed ready with no error.
        (_narrow_consumer, "consumer", "filter_subject 'from.KOR.nothing'"),
        # With discard old a full inbox drops its oldest unread reports, and the node,
        # reading an empty inbox, looked quiet and ready.
        (_discard_old, "stream", "discard old, max_msgs 100"),
    ],
)
async def test_an_inbox_changed_on_the_hub_is_named_and_setup_puts_it_back(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    alter: Callable[[JetStreamContext], Awaitable[None]],
    kind: str,
    altered: str,
) -> None:
    # Members' own credentials may change their consumer and stream too.
    monkeypatch.setattr(broker.hubwatch, "STREAM_EVERY_S", 0.0)
    world.write_config("USA")
    node = load_node(world.config("USA"))
    task = asyncio.create_task(node.run())
    seed = (world.keydir / "USA" / keys.NATS_SEED_FILE).read_bytes().strip()
    try:
        await await_for(lambda: node.ready() is None, 20, "USA ready")
        nc = await connect_account(world.server.url, "USA", seed)
        try:
            await alter(nc.jetstream())
        finally:
            await nc.close()
        await await_for(lambda: node.ready() is not None, 20, "USA not ready")
        assert node.ready() == f"inbox {kind} altered on the hub: {altered} (msmt status)"
        assert "is not as msmt nats setup made it" in node._last_error
        assert "run msmt nats setup --account USA" in node._last_error
        results = await setup_account(world.server.url, "USA", seed)
        assert [r.action for r in results if r.kind == kind] == ["updated"]
        await await_for(lambda: node.ready() is None, 20, "USA ready again")
    finally:
        node.stop.set()
        await task


async def test_a_hub_restored_from_an_older_copy_is_said_to_have_lost_the_inbox(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A restore drill: the hub's store put back from a copy lost the reports that waited
    # for a node, and every node stayed ready with no error; only replay found them. The
    # inbox stream's last message went back: the node says so, and counts it, even
    # across its own restart (the mark is in its status).
    monkeypatch.setattr(broker.hubwatch, "LAG_EVERY_S", 0.1)
    monkeypatch.setattr(broker.hubwatch, "STREAM_EVERY_S", 0.1)
    world.write_config("USA")
    seed = (world.keydir / "KOR" / keys.NATS_SEED_FILE).read_bytes().strip()

    async def kor_sends(count: int) -> None:
        kor = await connect_account(world.server.url, "KOR", seed)
        try:
            for i in range(count):
                await kor.jetstream().publish("msmt.to.USA.vessel", b"junk %d" % i)
        finally:
            await kor.close()

    def usa() -> tuple[Node, asyncio.Task[None]]:
        node = load_node(world.config("USA"))
        return node, asyncio.create_task(node.run())

    node, task = usa()
    try:
        await await_for(lambda: node.ready() is None, 20, "USA ready")
        await kor_sends(3)
        await await_for(lambda: '"last_seq": 3' in node.hub.stream_mark, 20, "the mark at 3")
        world.server.kill()
        copy = world.root / "hub-copy"
        shutil.copytree(world.server.store_dir, copy)  # the hub operator's backup
        world.server.start()
        await kor_sends(4)  # to 7; refused by USA as junk, as any message may be
        await await_for(lambda: '"last_seq": 7' in node.hub.stream_mark, 20, "the mark at 7")
        node.stop.set()
        await task
        world.server.kill()
        shutil.rmtree(world.server.store_dir)
        shutil.copytree(copy, world.server.store_dir)  # the copy put back
        world.server.start()
        assert node.metrics.inbox_went_back._value.get() == 0
        node, task = usa()
        said = "hub: the inbox stream INBOX_USA went back from message 7 to 3: the hub lost"
        await await_for(lambda: said in node._last_error, 20, "the loss said")
        assert "resend what it lists as undelivered to USA" in node._last_error
        assert node.metrics.inbox_went_back._value.get() == 1
        await await_for(lambda: '"last_seq": 3' in node.hub.stream_mark, 20, "the new mark")
    finally:
        node.stop.set()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("restarted", [False, True], ids=["running", "restarted"])
async def test_a_sender_sees_a_stopped_partners_inbox_go_back(
    world: World, restarted: bool
) -> None:
    # A review of the hub-restore drill: USA, stopped while the hub's store was put back
    # from a copy, could not see the reports it lost; JPN, which sent them, can: its next
    # ack for USA's inbox comes back at a sequence below one it had before. Also when
    # JPN was restarted meanwhile (likely, in a disaster): its status keeps the sequence.
    world.write_config("JPN", BATCH_POLICY)
    policy = world.policy("JPN")
    records = [
        r
        for r in records_for("JPN", 60, seed=5)
        if "USA" in expected_partners(policy, parse_record(json.dumps(r)))
    ][:7]
    assert len(records) == 7
    jpn = load_node(world.config("JPN"))
    task = asyncio.create_task(jpn.run())

    async def sent(batch: list[dict[str, Any]], total: int) -> None:
        await world.submit("JPN", batch)
        await await_for(lambda: world.sent_counts("JPN", ["USA"])["USA"] == total, 30, "acks")

    try:
        await await_for(lambda: jpn.ready() is None, 20, "JPN ready")
        await sent(records[:3], 3)
        world.server.kill()
        copy = world.root / "hub-copy"
        shutil.copytree(world.server.store_dir, copy)  # the hub operator's backup
        world.server.start()
        await sent(records[3:6], 6)  # USA, stopped, does not read them
        assert jpn.metrics.partner_inbox_went_back.labels(partner="USA")._value.get() == 0
        if restarted:
            jpn.stop.set()
            await task
            kept = world.store("JPN")
            try:
                assert read_inbox_seq(kept.state()[PARTNER_INBOX_SEQ_STATE])["USA"] == 6
            finally:
                kept.close()
        world.server.kill()
        shutil.rmtree(world.server.store_dir)
        shutil.copytree(copy, world.server.store_dir)  # the copy put back: 4 to 6 gone
        world.server.start()
        if restarted:
            jpn = load_node(world.config("JPN"))
            task = asyncio.create_task(jpn.run())
            await await_for(lambda: jpn.ready() is None, 20, "JPN ready again")
        with capture_logs() as logs:
            await sent(records[6:], 7)
            went = jpn.metrics.partner_inbox_went_back.labels(partner="USA")
            await await_for(lambda: went._value.get() == 1, 20, "the loss seen")
        told = {
            e["partner"]: (e["seq"], e["before"])
            for e in logs
            if e["event"] == "partner_inbox_went_back"
        }
        assert told["USA"] == (4, 6)  # and KOR's, which the policy sends some of them to
    finally:
        jpn.stop.set()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize(
    ("text", "read"),
    [
        ('{"KOR":3,"USA":6}', {"KOR": 3, "USA": 6}),
        ("", {}),
        ("[1]", {}),
        ("[" * 100_000, {}),
        ('{"USA":6,"XYZ":9,"KOR":"3","GBR":true,"FRA":0,"DEU":-1}', {"USA": 6}),
        ('{"USA":' + "9" * 30 + "}", {}),
    ],
)
def test_a_kept_inbox_sequence_that_is_not_one_is_none(text: str, read: dict[str, int]) -> None:
    # The status is the node's own, but a damaged one must cost the comparison, not the start.
    assert read_inbox_seq(text) == read


def _hub_watch(client: object, servers: int, errors: list[str]) -> broker.hubwatch.HubWatch:
    """A real ``HubWatch`` on ``client`` (a stand-in for nats-py's), its errors kept."""
    return broker.hubwatch.HubWatch(
        "USA",
        servers,
        Metrics("USA"),
        lambda: client,  # type: ignore[arg-type,return-value]
        lambda text, condition: errors.append(text),
        lambda off: None,
    )


def test_the_inbox_mark_pages_a_loss_not_a_drained_inbox_made_again() -> None:
    # A review: DEPLOY.md has an operator drain an inbox, delete it and run setup again,
    # which paged as a loss; a damaged mark ("[" * 100000) stopped the node at every
    # start; a hub's "created" of any length went into last_error.
    errors: list[str] = []
    hub = _hub_watch(object(), 1, errors)

    def info(created: str, last: int, waiting: int) -> dict[str, Any]:
        return {"config": {}, "created": created, "state": {"last_seq": last, "messages": waiting}}

    hub._check_went_back(info("2026-12-07T09:00:00Z", 40, 0))
    with capture_logs() as logs:
        hub._check_went_back(info("2026-12-07T09:30:00Z", 0, 0))  # drained, made again
    assert [e["event"] for e in logs] == ["inbox_made_again"]
    assert errors == []
    assert hub._metrics.inbox_went_back._value.get() == 0
    hub._check_went_back(info("2026-12-07T09:30:00Z", 7, 3))
    hub._check_went_back(info("2026-12-07T09:45:00Z", 0, 0))  # 3 waited: lost
    assert hub._metrics.inbox_went_back._value.get() == 1
    assert "was made again (created '2026-12-07T09:45:00Z'" in errors[-1]
    hub._check_went_back(info("2026-12-07T09:45:00Z", 5, 2))
    hub._check_went_back(info("2026-12-07T09:45:00Z", 2, 2))
    assert hub._metrics.inbox_went_back._value.get() == 2
    assert "went back from message 5 to 2" in errors[-1]
    for damaged in ("[" * 100_000, '{"created": 7}', "[]", "null", '"x"'):
        hub.stream_mark = damaged
        hub._check_went_back(info("2026-12-07T10:00:00Z", 1, 0))  # no mark: nothing said
    assert hub._metrics.inbox_went_back._value.get() == 2
    hub._check_went_back(info("x" * 1000, 0, 0))  # no stream info as JetStream writes
    assert "x" * 100 not in hub.stream_mark


def test_a_hub_answer_nested_past_the_decoders_depth_is_no_answer_not_a_crash() -> None:
    # A security review: a STREAM.INFO or CONSUMER.INFO answer nested deeper than the
    # JSON decoder goes raised RecursionError, which stopped the node's housekeeping.
    from broker.hubwatch import _silence

    deep = Msg(None, subject="_INBOX.x", data=b'{"error":' + b"[" * 100_000)  # type: ignore[arg-type]
    assert _silence(deep, ValueError("x")) is None


@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"NaN", b"Infinity", b"-Infinity"])
async def test_a_hub_answer_with_a_number_beyond_a_float_is_no_answer_not_a_crash(
    number: bytes,
) -> None:
    # A fuzzer: int() of the infinity json reads 1e999 as raised OverflowError, which
    # neither the inbox lag's handler nor the housekeeping loop caught: the node stopped.
    from broker.hubwatch import _silence

    answer = b'{"num_pending": ' + number + b', "num_ack_pending": 0}'
    silenced = Msg(None, subject="_INBOX.x", data=b'{"error":{"code":' + number + b"}}")  # type: ignore[arg-type]
    assert _silence(silenced, ValueError("x")) is None

    class Hub:
        is_connected = True

        async def request(self, subject: str, data: bytes, timeout: float) -> Msg:  # noqa: ASYNC109 - nats-py's signature
            return Msg(None, subject="_INBOX.y", data=answer)  # type: ignore[arg-type]

    errors: list[str] = []
    client = Hub()
    hub = _hub_watch(client, 1, errors)
    hub.silent = 1  # one request unanswered before: silence now would make it 2
    assert await hub.inbox_lag() is None
    assert hub.lag is None  # unknown, as for any answer it cannot read
    assert hub.silent == 0  # the hub did answer: not silence
    assert hub.clock_checked.is_set()
    assert errors == []


async def test_silence_is_counted_across_a_switch_of_server_until_one_answers() -> None:
    # A frozen-hub trial: a cluster without its quorum, every server silent. The count
    # was reset at each switch, so the node read as ready on each new connection for
    # two requests: ready a third of the time, MsmtNotReady some 6 minutes late.
    from broker.hubwatch import SILENT_SWITCH

    class Hub:
        is_connected = True
        connected_url = None
        answering = False
        switches = 0

        async def request(self, subject: str, data: bytes, timeout: float) -> Msg:  # noqa: ASYNC109 - nats-py's signature
            if not self.answering:
                raise TimeoutError
            return Msg(None, subject="_INBOX.y", data=b'{"num_pending": 3, "num_ack_pending": 1}')  # type: ignore[arg-type]

        async def force_reconnect(self) -> None:
            self.switches += 1

    errors: list[str] = []
    client = Hub()
    hub = _hub_watch(client, 3, errors)

    async def ask() -> int | None:
        hub._lag_at = -math.inf  # due now: the test does not wait LAG_EVERY_S
        return await hub.inbox_lag()

    for _ in range(2 * SILENT_SWITCH + 1):
        assert await ask() is None
    assert client.switches == 2  # one server after another, every third silence
    assert hub.silent == 2 * SILENT_SWITCH + 1  # not reset by the switches: still silent
    assert len(errors) == 2
    assert errors[0].startswith("hub: its server has not answered JetStream requests for 15 s")
    assert errors[0].endswith("; trying another server")
    client.answering = True
    assert await ask() == 4
    assert hub.silent == 0  # a server answered


async def test_the_oldest_waiting_report_is_measured_by_partner(tmp_path: Path) -> None:
    # msmt_outbox_oldest_seconds{partner}: an alert names the partner whose reports wait
    # (left from a monitoring trial: the outbox was exported only as a whole).
    import time
    import types

    from broker.node import Node
    from broker.store import NewReport, OutboxItem, Store

    store = Store(tmp_path / "s.db")
    rid = "00000000-0000-4000-8000-000000000001"
    store.accept([NewReport(rid, "vessel", b"{}")], now=time.time() - 100)
    store.plan(
        {
            rid: [
                OutboxItem(rid, p, f"msmt.to.{p}.vessel", f"jwe {p}".encode(), "{}")
                for p in ("USA", "KOR")
            ]
        }
    )
    store.mark_sent([p for p in store.pending(10) if p.partner == "USA"])

    async def run_db(fn: Any, *args: Any) -> Any:
        return fn(*args)

    metrics = Metrics("JPN")
    node = types.SimpleNamespace(
        store=store, metrics=metrics, member="JPN", run_db=run_db, _error=print
    )
    await Node._measure_outbox_age(node)  # type: ignore[arg-type]

    def age(partner: str) -> float | None:
        return metrics.registry.get_sample_value("msmt_outbox_oldest_seconds", {"partner": partner})

    assert 99 <= (age("KOR") or 0) <= 110
    assert age("USA") == age("GBR") == 0.0
    assert age("JPN") is None  # not a partner of its own
    store.close()


def test_stream_alterations_name_what_refuses_or_drops_reports() -> None:
    from broker.natsetup import inbox_stream_config, stream_alterations

    # What setup makes, as the JetStream API answers it (durations in nanoseconds).
    made = json.loads(json.dumps(inbox_stream_config("USA", InboxLimits()).as_dict()))
    assert made["max_age"] == 30 * 86400 * 10**9
    assert stream_alterations({"config": made}, "USA") == ""
    # An operator's own size and age (--max-bytes, --max-age-days) are not alterations.
    chosen = {**made, "max_bytes": 2 * 1024 * 1024, "max_age": int(864 * 1e9)}
    assert stream_alterations({"config": chosen}, "USA") == ""
    edited = {
        **made,
        "subjects": ["from.*.msmt.to.USA.nothing"],
        "subject_transform": {"src": "from.*.msmt.to.USA.>", "dest": "from.JPN.>"},
        "retention": "limits",
        "discard": "old",
        "max_msgs": 5,
        "max_msgs_per_subject": 1,
        "max_age": int(60 * 1e9),
        "max_bytes": 4096,
        "max_msg_size": 1024,
        "no_ack": True,
        "sealed": True,
    }
    assert stream_alterations({"config": edited}, "USA") == (
        "subjects ['from.*.msmt.to.USA.nothing'], subject_transform {'src':"
        " 'from.*.msmt.to.USA.>', 'dest': 'from.JPN.>'}, retention 'limits', discard old,"
        " max_msgs 5, max_msgs_per_subject 1, max_age 60 s, max_bytes 4096, max_msg_size"
        " 1024, no_ack, sealed"
    )
    # Another member's subjects are not this one's.
    assert stream_alterations({"config": made}, "KOR").startswith("subjects ")
    assert stream_alterations("junk", "USA") == stream_alterations({"config": 7}, "USA") == ""


def test_consumer_alterations_name_what_holds_or_drops_reports() -> None:
    from broker.natsetup import consumer_alterations

    setup = {"config": {"max_deliver": -1, "ack_policy": "explicit"}, "paused": False}
    assert consumer_alterations(setup) == ""
    assert consumer_alterations({"config": {"filter_subjects": ["a.b"]}}) == (
        "filter_subjects ['a.b']"
    )
    assert (
        consumer_alterations(
            {
                "config": {
                    "max_deliver": 1,
                    "headers_only": True,
                    "pause_until": "2099-01-01T00:00:00Z",
                },
                "paused": True,
            }
        )
        == "headers_only, max_deliver 1, paused until 2099-01-01T00:00:00Z"
    )
    assert consumer_alterations("junk") == consumer_alterations({"config": 7}) == ""


# --- the receiver's own pull loop ---------------------------------------------------------


async def consumer_counts(world: World, member: str) -> tuple[int, int]:
    """(pending, delivered but unacked) on ``member``'s inbox consumer."""
    seed = (world.keydir / member / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(world.server.url, member, seed)
    try:
        info = await nc.jetstream().consumer_info(inbox_stream(member), inbox_durable(member))
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)
    finally:
        await nc.close()


async def publish_as(
    world: World, sender: str, messages: list[tuple[str, bytes, dict[str, str]]]
) -> None:
    seed = (world.keydir / sender / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(world.server.url, sender, seed)
    try:
        js = nc.jetstream()
        for subject, payload, headers in messages:
            await js.publish(subject, payload, headers=headers)
    finally:
        await nc.close()


async def test_a_status_header_from_a_sender_does_not_hide_its_message(world: World) -> None:
    # JetStream's status replies (404, 408, 409) come as header-only messages; a
    # sender can put a ``Status`` header on its own message too. The receiver must
    # tell them apart by the hub's ack subject, or it would skip such a message
    # without acking it, and the hub would redeliver it forever.
    world.write_config("USA")
    world.start("USA")
    forger = Forger(world, datetime.now(UTC))
    records = records_for("JPN", 3, seed=31)
    statuses = ["408", "409", "404"]
    await asyncio.sleep(2.5)  # an idle inbox: pull requests expire and are renewed
    await publish_as(
        world,
        "JPN",
        [
            (
                f"msmt.to.USA.{r['kind']}",
                forger.envelope(r)[0].encode(),
                {"Nats-Msg-Id": f"{r['report_id']}.USA", "Status": s, "Description": "forged"},
            )
            for r, s in zip(records, statuses, strict=True)
        ],
    )
    want = {r["report_id"] for r in records}
    await await_for(lambda: set(world.inbox_ids("USA", "JPN")) == want, 20, "all three stored")
    deadline = time.monotonic() + 10
    while (counts := await consumer_counts(world, "USA")) != (0, 0):
        assert time.monotonic() < deadline, f"still pending, unacked: {counts}"
        await asyncio.sleep(0.2)


async def test_messages_delivered_while_the_store_is_full_are_not_delivered_twice(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk-full review: after a batch the store could not take, the receiver waits
    # for a write to commit, and what the hub delivered meanwhile sat past ack_wait:
    # delivered again, the second copies came in beside the first.
    seed = (world.keydir / "USA" / keys.NATS_SEED_FILE).read_bytes().strip()
    await setup_account(world.server.url, "USA", seed, InboxLimits(ack_wait_s=KILL_ACK_WAIT))
    # A third of ack_wait, as the hub's 30 s is to the receiver's 10.
    monkeypatch.setattr(broker.receiver, "WRITABLE_WAIT_MAX_S", KILL_ACK_WAIT / 3)
    world.write_config("USA")
    node = load_node(world.config("USA"))
    task = asyncio.create_task(node.run())
    forger = Forger(world, datetime.now(UTC))
    first, later = records_for("JPN", 10, seed=33), records_for("JPN", 10, seed=34)
    full = False
    # The page limit below refuses new rows, as a full disk does, but lets the status
    # writes and the writability probe update rows in place; a full disk refuses them
    # too, so they fail here as they would there, through the store's own commit path.
    real_writable, real_record = node.store.writable, node.store.record_status

    def record_status(deltas: Any, values: Any) -> None:
        if full:
            with node.store._tx("status") as db:
                db.execute("INSERT OR REPLACE INTO state VALUES ('filler', ?)", (b"x" * 65536,))
        real_record(deltas, values)

    monkeypatch.setattr(node.store, "writable", lambda: not full and real_writable())
    monkeypatch.setattr(node.store, "record_status", record_status)
    try:
        await await_for(lambda: node.ready() is None, 20, "USA ready")
        pages = await node.run_db(lambda: node.store._db.execute("PRAGMA page_count").fetchone())
        await node.run_db(node.store._db.execute, f"PRAGMA max_page_count={pages[0]}")
        full = True
        await publish_as(
            world,
            "JPN",
            [(f"msmt.to.USA.{r['kind']}", forger.envelope(r)[0].encode(), {}) for r in first],
        )
        await await_for(
            lambda: node.receiver is not None and bool(node.receiver.last_error), 20, "full"
        )
        # Not ready while it cannot write (a monitoring trial's full node read as ready).
        assert (
            node.ready()
            == "cannot write: store node.sqlite3: database or disk is full (msmt status)"
        )
        await await_for(lambda: node.metrics.ready._value.get() == 0, 5, "msmt_ready 0")
        await publish_as(
            world,
            "JPN",
            [(f"msmt.to.USA.{r['kind']}", forger.envelope(r)[0].encode(), {}) for r in later],
        )
        await asyncio.sleep(3 * KILL_ACK_WAIT)  # the receiver waits; ack_wait passes twice
        await node.run_db(node.store._db.execute, "PRAGMA max_page_count=1073741823")
        full = False
        want = {r["report_id"] for r in first + later}
        await await_for(lambda: set(world.inbox_ids("USA", "JPN")) == want, 30, "all stored")
        await await_for(lambda: node.metrics.ready._value.get() == 1, 5, "msmt_ready 1")
        assert node.ready() is None
        await asyncio.sleep(KILL_ACK_WAIT)  # any copy delivered again has come by now
        assert node.metrics.duplicates.labels(sender="JPN")._value.get() == 0
        received = list(audit_entries(world.config("USA").audit_dir))
        assert Counter(e["type"] for e in received)["received"] == 20
        assert not [e for e in received if e["type"].startswith("rejected")]
    finally:
        node.stop.set()
        await task


async def test_sigterm_mid_inbox_hands_back_what_was_delivered_but_not_verified(
    world: World,
) -> None:
    # The receiver keeps the next pull request out while it verifies a batch, so at
    # a stop some messages are here but unverified: they go back to the hub (nak)
    # for the next start, instead of waiting out the consumer's 30 s ack_wait.
    world.write_config("USA")
    forger = Forger(world, datetime.now(UTC))
    records = records_for("JPN", 1500, seed=32)
    await publish_as(
        world,
        "JPN",
        [(f"msmt.to.USA.{r['kind']}", forger.envelope(r)[0].encode(), {}) for r in records],
    )
    world.start("USA", MSMT_FETCH_BATCH="20")
    await await_for(lambda: len(world.inbox_ids("USA", "JPN")) >= 20, 60, "first batches")
    assert world.terminate("USA") == 0
    pending, _ = await consumer_counts(world, "USA")
    assert pending > 0, "the stop came after the whole inbox was stored; use more messages"
    world.start("USA", MSMT_FETCH_BATCH="20")
    want = {r["report_id"] for r in records}
    # Well inside ack_wait (30 s after the stop): nothing waits for a redelivery timer.
    await await_for(lambda: len(world.inbox_ids("USA", "JPN")) >= len(want), 20, "the rest")
    got = world.inbox_ids("USA", "JPN")
    assert len(got) == len(set(got))
    assert set(got) == want
    assert await consumer_counts(world, "USA") == (0, 0)


# --- an idle node's housekeeping ---------------------------------------------------------


async def test_an_idle_node_writes_its_status_only_when_something_changes(world: World) -> None:
    world.write_config("USA")
    node = load_node(world.config("USA"))
    task = asyncio.create_task(node.run())

    def state() -> dict[str, str]:
        return world.state("USA")

    try:
        await await_for(lambda: node.ready() is None, 30, "ready")
        # The lag comes from the hub's consumer info, so it is a number, not "unknown".
        await await_for(
            lambda: state().get("inbox_lag") == "0" and state().get("connected") == "yes",
            20,
            "the first status with the inbox lag",
        )
        settled = state()
        changes = node.store._db.total_changes
        await asyncio.sleep(3.5)  # three housekeeping rounds with nothing to record
        assert node.store._db.total_changes == changes
        assert state() == settled
        # A change is recorded at the next round, with a fresh updated_at.
        node._error("a condition the operator should see")
        await await_for(
            lambda: state().get("last_error") == "a condition the operator should see",
            10,
            "the new last error in the status",
        )
        assert node.store._db.total_changes > changes
        assert state()["updated_at"] >= settled["updated_at"]
        # With when it happened, so an error that has passed reads as old news.
        assert settled["last_error_at"] == ""
        assert state()["last_error_at"] >= settled["updated_at"]
        datetime.fromisoformat(state()["last_error_at"])
    finally:
        node.stop.set()
        await task
    assert node.failure is None


async def test_counts_the_store_cannot_take_are_in_the_metrics_and_recorded_later(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A resource trial filled a node's disk: the counts taken each second were lost
    # with the status write that failed, and msmt_intake_rejected_total never moved,
    # so the documented alert on "unavailable" refusals could not fire.
    world.write_config("JPN")
    node = load_node(world.config("JPN"))
    task = asyncio.create_task(node.run())
    real = node.store.record_status
    full = True

    def record_status(deltas: Any, values: Any) -> None:
        if full:
            raise StoreError(f"store {node.store.path.name}: database or disk is full")
        real(deltas, values)

    monkeypatch.setattr(node.store, "record_status", record_status)

    def refused() -> float | None:
        labels = {"reason": "schema"}
        return node.metrics.registry.get_sample_value("msmt_intake_rejected_total", labels)

    try:
        await await_for(lambda: node.ready() is None, 20, "ready")
        answers = await world.submit("JPN", [{"kind": "vessel"}, {"kind": "worker"}])
        assert [a["reason"] for a in answers] == ["schema", "schema"]
        await await_for(lambda: refused() == 2, 10, "the refusals in the metrics")
        await asyncio.sleep(2.5)  # housekeeping rounds that cannot write
        assert "intake.schema" not in node.store.counters()
        assert node._last_error == "housekeeping: store node.sqlite3: database or disk is full"
        full = False  # space returns
        await await_for(
            lambda: node.store.counters().get("intake.schema") == 2, 10, "the counts recorded"
        )
        assert refused() == 2  # counted once, not again when recorded
    finally:
        node.stop.set()
        await task


async def test_a_working_node_logs_counts_of_what_it_did_and_an_idle_one_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Receipts are not logged one by one; an operator tailing the log still sees the
    # node at work: one "activity" line per interval, counts only.
    monkeypatch.setattr(broker.node_housekeeping, "ACTIVITY_EVERY_S", 0.5)
    for member in ("JPN", "USA"):
        world.write_config(member)
    records = records_for("JPN", 5, seed=71)
    policy = world.policy("JPN")
    partners = [expected_partners(policy, parse_record(json.dumps(r))) for r in records]
    to_usa = sum("USA" in p for p in partners)
    nodes = [load_node(world.config(m)) for m in ("JPN", "USA")]
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    try:
        with capture_logs() as logs:
            await await_for(lambda: all(n.ready() is None for n in nodes), 20, "ready")
            await world.submit("JPN", [*records, {"kind": "vessel"}])

            def totals() -> Counter[str]:
                out: Counter[str] = Counter()
                for line in (e for e in logs if e["event"] == "activity"):
                    out.update({k: v for k, v in line.items() if isinstance(v, int)})
                return out

            want = {
                "accepted": len(records),
                "intake_refused": 1,
                "sent": sum(len(p) for p in partners),
                "received": to_usa,
            }
            await await_for(
                lambda: all(totals()[k] == n for k, n in want.items()), 30, "the counts logged"
            )
            lines = len([e for e in logs if e["event"] == "activity"])
            await asyncio.sleep(2)  # four intervals with nothing done: nothing logged
            assert len([e for e in logs if e["event"] == "activity"]) == lines
    finally:
        for n in nodes:
            n.stop.set()
        await asyncio.gather(*tasks)
    activity = [e for e in logs if e["event"] == "activity"]
    assert {k for e in activity for k in e} == {
        "event", "log_level", "component", "seconds", "accepted", "intake_refused", "sent",
        "token_refused", "received", "rejected", "duplicates", "held", "outbox_depth",
    }  # fmt: skip
    assert (
        sum(e["rejected"] + e["duplicates"] + e["held"] + e["token_refused"] for e in activity) == 0
    )
