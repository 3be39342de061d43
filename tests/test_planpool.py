"""Planning in a worker process: same plans as in process, and a dead worker fails loudly.

Real spawned worker processes, real keys and envelopes: every JWE the worker
makes is opened by its recipient with ``envelope.receive``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from envelope_world import Node, default_entries, make_roster, roster_entry, sig_key
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import audit_events, planpool, samples, sdjwt
from broker.envelope import PAD_BLOCK
from broker.errors import KeyMaterialError
from broker.planner import Planner, Signer, send_facts
from broker.planpool import PlannerSpec, PlanPool, PlanWorkerError, _pickled
from broker.policy import load_policy
from broker.publisher import sent_event
from broker.validation import parse_record

POLICY = """version = 1
member = "JPN"

[[rules]]
name = "everything"
kinds = ["*"]
partners = ["MSMT"]
release = ["*"]
"""


def planner(text: str = POLICY) -> Planner:
    policy = load_policy(text, member="JPN")
    return Planner(Signer("JPN", sig_key("JPN"), "JPN-sig-1"), policy, make_roster(), {})


def rows(count: int) -> list[tuple[str, bytes]]:
    records = samples.generate(count, seed=5, originators=("JPN",), now=datetime.now(UTC))
    for record in records:
        record["tlp"] = "AMBER"
        record.pop("rel_to", None)
    return [(str(r["report_id"]), json.dumps(r).encode()) for r in records]


@pytest.fixture
async def pool() -> AsyncIterator[PlanPool]:
    plans = PlanPool(planner(), POLICY)
    try:
        yield plans
    finally:
        await plans.shutdown()


def test_a_report_stored_under_a_non_random_id_is_still_planned() -> None:
    # Feeds now need random (v4) report ids (broker.validation.parse_new_record); a
    # report accepted before that, under a v1 id, is planned and signed as it was.
    rid, raw = rows(1)[0]
    old = str(uuid.uuid1())
    plans, errors, _ = planner().plan([(old, raw.replace(rid.encode(), old.encode()))], 10)
    assert errors == {}
    assert len(plans[old]) == 10  # every partner of JPN's: policy "everything"


def test_a_signing_key_past_its_validity_holds_every_report_back() -> None:
    # A node left running past its own key's msmt_valid_until must not sign
    # reports every partner would refuse; it holds them unplanned, to retry.
    expires = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    entries = [e for e in default_entries() if e["kid"] != "JPN-sig-1"]
    roster = make_roster([*entries, roster_entry("JPN", "sig", valid_until=expires)])
    policy = load_policy(POLICY, member="JPN")
    signer = Signer("JPN", sig_key("JPN"), "JPN-sig-1")
    batch = rows(3)

    plans, errors, waiting = Planner(signer, policy, roster, {}).plan(batch, 10)
    assert plans == {}
    reason = f"cannot sign: key JPN-sig-1 expired at {expires.isoformat().replace('+00:00', 'Z')}"
    assert errors == {rid: reason for rid, _ in batch}

    # A node started on a new key up to 5 minutes before its valid_from by its own
    # clock (a custodian's clock ahead) signs at once, as partners allow that skew.
    early = make_roster(
        [*entries, roster_entry("JPN", "sig", valid_from=datetime.now(UTC) + timedelta(minutes=4))]
    )
    plans, errors, _ = Planner(signer, policy, early, {}).plan(batch, 10)
    assert errors == {}
    assert list(plans) == [rid for rid, _ in batch]

    # The same planner a second before the key expired signs all three.
    before = Planner(signer, policy, roster, {}, clock=lambda: expires - timedelta(seconds=1))
    plans, errors, waiting = before.plan(batch, 10)
    assert errors == {}
    assert waiting == {}
    assert list(plans) == [rid for rid, _ in batch]


def test_a_partner_without_a_valid_key_waits_and_the_others_are_planned() -> None:
    # GBR's only encryption key has expired: its envelope cannot be made, but one
    # partner's lapsed key must not hold back the report for the other nine.
    expired = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    entries = [e for e in default_entries() if e["kid"] != "GBR-enc-1"]
    roster = make_roster([*entries, roster_entry("GBR", "enc", valid_until=expired)])
    policy = load_policy(POLICY, member="JPN")
    batch = rows(2)
    plans, errors, waiting = Planner(
        Signer("JPN", sig_key("JPN"), "JPN-sig-1"), policy, roster, {}
    ).plan(batch, 10)
    assert errors == {}
    reason = "GBR has no active enc key valid now"
    assert waiting == {rid: {"GBR": reason} for rid, _ in batch}
    for rid, _ in batch:
        partners = {i.partner for i in plans[rid]}
        assert partners == {"USA", "KOR", "FRA", "AUS", "CAN", "DEU", "ITA", "NLD", "NZL"}
        usa = next(i for i in plans[rid] if i.partner == "USA")
        got = Node("USA").receive(usa.jwe.decode(), now=datetime.now(UTC))
        assert got.report_id == rid
    # envelopes() keeps its all-or-nothing contract for its callers.
    with pytest.raises(KeyMaterialError, match=reason):
        Planner(Signer("JPN", sig_key("JPN"), "JPN-sig-1"), policy, roster, {}).envelopes(*batch[0])


def test_spec_rebuilds_an_equal_planner() -> None:
    original = planner()
    rebuilt = PlannerSpec.of(original, POLICY).build()
    assert rebuilt.policy.digest == original.policy.digest
    assert rebuilt.signer.kid == original.signer.kid
    assert rebuilt.signer.key.as_dict(private=True) == original.signer.key.as_dict(private=True)
    assert [k.kid for k in rebuilt.roster] == [k.kid for k in original.roster]


def _but_iat(audit: str) -> dict[str, object]:
    facts: dict[str, object] = json.loads(audit)
    del facts["iat"]
    return facts


async def test_worker_plans_what_the_planner_plans_and_recipients_open_it(
    pool: PlanPool,
) -> None:
    batch = rows(6)
    before = int(time.time())
    ours, errors, waiting = await pool.plan(batch[1:], 4)
    theirs, their_errors, _ = planner().plan(batch[1:], 4)
    after = int(time.time())
    assert waiting == {}
    assert errors == their_errors == {}
    assert list(ours) == list(theirs) == [rid for rid, _ in batch[1:5]]
    now = datetime.now(UTC)
    for report_id, items in ours.items():
        expected = theirs[report_id]
        # JWEs differ (fresh salts and ephemeral keys), and so may the signing second
        # (``iat``) on a loaded machine; everything else is equal.
        assert [(i.partner, i.subject, _but_iat(i.audit)) for i in items] == [
            (i.partner, i.subject, _but_iat(i.audit)) for i in expected
        ]
        assert all(before <= json.loads(i.audit)["iat"] <= after for i in items)
        for item in items:
            received = Node(item.partner).receive(
                item.jwe.decode(), now=now, max_age=timedelta(minutes=5)
            )
            assert received.report_id == report_id
            assert received.originator == "JPN"


async def test_a_worker_that_cannot_be_started_is_one_line_naming_the_limit() -> None:
    # No descriptor left for its pipes (EMFILE, made real here: the limit lowered to what
    # is open, the rest filled): a traceback from os.pipe() before, at every node start
    # under `ulimit -n 16`.
    plans = PlanPool(planner(), POLICY)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(PlanWorkerError) as info:
            await plans.start()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await plans.shutdown()
    assert str(info.value) == (
        "cannot start the planning worker: Too many open files (is the descriptor limit,"
        " ulimit -n, too low?)"
    )


def test_the_worker_loads_no_network_client() -> None:
    # The process that holds the signing and pseudonym keys plans and nothing else:
    # it loaded the NATS client (and aiohttp, the metrics) through the publisher's
    # module, which also made every node start wait for them, ~0.4 s on a slow machine.
    code = (
        "import sys, broker.planpool\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'nats', 'aiohttp', 'prometheus_client', 'broker'}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('broker.publisher')))"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == ["['broker']", "[]"]


SPLIT_POLICY = """version = 1
member = "JPN"

[[rules]]
name = "everything"
kinds = ["*"]
partners = ["USA", "GBR"]
release = ["*"]

[[rules]]
name = "some"
kinds = ["*"]
partners = ["KOR", "FRA", "DEU"]
release = ["observed_at", "vessel.imo", "worker.country", "transfer.chain"]
"""


def test_each_envelopes_send_facts_are_the_plain_encoding_of_its_own_release() -> None:
    # The planner encodes the facts once per distinct released set and adds each
    # envelope's size: the stored bytes must still be exactly send_facts' for
    # every partner, with partners released different sets in one report.
    policy = load_policy(SPLIT_POLICY, member="JPN")
    made = Planner(Signer("JPN", sig_key("JPN"), "JPN-sig-1"), policy, make_roster(), {})
    batch = rows(6)
    plans, errors, _ = made.plan(batch, 6)
    assert errors == {}
    sets = set()
    for report_id, record in batch:
        sighting = parse_record(record)
        decisions = policy.decide_all(sighting)
        items = plans[report_id]
        assert sorted(i.partner for i in items) == ["DEU", "FRA", "GBR", "KOR", "USA"]
        for item in items:
            released = sorted(decisions[item.partner].disclosure_keys())
            sets.add(tuple(released))
            iat = json.loads(item.audit)["iat"]
            assert item.audit == send_facts(
                iat, len(item.jwe), sighting, released, policy.digest
            ), item.partner
    assert len(sets) > 3  # several per report and kind: the per-set encoding is exercised


def test_a_reports_envelopes_are_padded_to_one_length_for_partners_released_more_or_less() -> None:
    # The hub sees every envelope of a report: the planner pads them together
    # (envelope.present_all), so their lengths do not say who was released more.
    policy = load_policy(
        POLICY.replace('partners = ["MSMT"]', 'partners = ["USA", "GBR"]')
        + """
[[rules]]
name = "no-position"
kinds = ["*"]
partners = ["KOR"]
release = ["observed_at", "vessel.imo", "vessel.flag", "worker.*", "transfer.*"]
""",
        member="JPN",
    )
    made = Planner(Signer("JPN", sig_key("JPN"), "JPN-sig-1"), policy, make_roster(), {})
    plans, errors, _ = made.plan(rows(6), 6)
    assert errors == {}
    vessels = 0
    for items in plans.values():
        assert sorted(i.partner for i in items) == ["GBR", "KOR", "USA"]
        # The ciphertexts (what the hub sees of the content) have one length, a
        # multiple of the block (AES-GCM keeps the plaintext's length).
        assert len({len(i.jwe.split(b".")[3]) for i in items}) == 1
        assert len(sdjwt.b64u_decode(items[0].jwe.split(b".")[3].decode())) % PAD_BLOCK == 0
        now = datetime.now(UTC)
        opened = {i.partner: Node(i.partner).receive(i.jwe.decode(), now=now) for i in items}
        if opened["KOR"].kind == "vessel":
            vessels += 1
            assert set(opened["KOR"].fields) < set(opened["USA"].fields)
    assert vessels == 2
    # The node makes a report's later envelopes (resend, stale, a key now current) by
    # planning it again for all partners: those are padded as the first ones were.
    again, errors, _ = made.plan(rows(6), 6)
    assert errors == {}
    for rid, items in plans.items():
        first = {len(i.jwe.split(b".")[3]) for i in items}
        assert {len(i.jwe.split(b".")[3]) for i in again[rid]} == first


def test_each_envelopes_sent_entry_records_its_own_facts() -> None:
    # sent_event parses the facts after "iat" and "bytes" once for every envelope
    # that shares them: each entry must still be what the whole text says, for
    # partners released different sets, and for facts stored in an older shape.
    policy = load_policy(SPLIT_POLICY, member="JPN")
    made = Planner(Signer("JPN", sig_key("JPN"), "JPN-sig-1"), policy, make_roster(), {})
    plans, errors, _ = made.plan(rows(4), 4)
    assert errors == {}
    items = [i for planned in plans.values() for i in planned]
    first = items[0]
    whole = json.loads(first.audit)
    del whole["iat"], whole["bytes"]
    items.append(replace(first, audit=json.dumps(whole)))  # planned before "iat" was kept
    at = datetime(2026, 12, 5, tzinfo=UTC)
    for item in items:
        facts = json.loads(item.audit)
        expected = audit_events.sent(
            "JPN",
            at,
            partner=item.partner,
            report_id=item.report_id,
            kind=facts["kind"],
            released=facts["released"],
            policy_digest=facts["policy"],
            jwe_sha256=hashlib.sha256(item.jwe).hexdigest(),
            originator=facts["originator"],
            tlp=facts["tlp"],
            rel_to=facts["rel_to"],
            recipient_kid=f"{item.partner}-enc-1",  # make_roster's key for the partner
        )
        assert sent_event("JPN", item, at) == expected, item.audit
    assert len({tuple(json.loads(i.audit)["released"]) for i in items}) > 3


async def test_a_module_in_the_working_directory_does_not_stand_in_for_one_the_worker_imports(
    pool: PlanPool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker holds the signing and pseudonym keys; a "secrets.py" beside where
    # the node was started must not run in it (nor break it, as it did by accident).
    marker = tmp_path / "ran"
    (tmp_path / "secrets.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    await pool.start()
    plans, errors, _ = await pool.plan(rows(1), 1)
    assert (len(plans), errors) == (1, {})
    assert not marker.exists()


async def test_a_killed_worker_fails_the_next_call_instead_of_hanging(pool: PlanPool) -> None:
    await pool.start()
    (pid,) = pool.worker_pids()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(PlanWorkerError, match="exited"):
        await asyncio.wait_for(pool.plan(rows(1), 1), 30)
    # and every later call too: the node stops instead of planning on.
    with pytest.raises(PlanWorkerError):
        await pool.plan(rows(1), 1)


async def test_a_stop_gives_up_on_a_batch_the_worker_does_not_answer(
    pool: PlanPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without it a stop waited PLAN_TIMEOUT (300 s) for a hung worker.
    monkeypatch.setattr(planpool, "STOP_TIMEOUT", 0.2)
    await pool.start()
    (pid,) = pool.worker_pids()
    worker = psutil.Process(pid)
    worker.suspend()
    call = asyncio.ensure_future(pool.plan(rows(1), 1))
    await asyncio.sleep(0.2)
    assert not call.done()  # waiting for the stopped worker
    pool.stopping()
    with pytest.raises(PlanWorkerError, match=r"did not answer within 0\.2 s of the stop"):
        await asyncio.wait_for(call, 30)
    with pytest.raises(PlanWorkerError, match="of the stop"):  # never used again
        await pool.plan(rows(1), 1)
    await asyncio.wait_for(pool.shutdown(), 30)
    assert not worker.is_running()  # killed at once: a stopped worker would not exit


async def test_a_stop_lets_the_worker_finish_the_batch_it_answers(pool: PlanPool) -> None:
    await pool.start()
    pool.stopping()
    plans, errors, _ = await pool.plan(rows(1), 1)
    assert (len(plans), errors) == (1, {})


async def test_the_worker_ignores_sigterm_sent_to_the_whole_group(pool: PlanPool) -> None:
    await pool.start()
    (pid,) = pool.worker_pids()
    os.kill(pid, signal.SIGTERM)
    plans, errors, _ = await pool.plan(rows(1), 1)
    assert len(plans) == 1
    assert errors == {}
    assert pool.worker_pids() == [pid]


async def test_a_worker_given_another_policy_refuses_to_start() -> None:
    # The text is not the policy whose digest the node checked: the worker must not plan.
    other = POLICY.replace('partners = ["MSMT"]', 'partners = ["USA"]')
    plans = PlanPool(planner(), other)
    try:
        with pytest.raises(PlanWorkerError, match="policy is not the one the node loaded"):
            await plans.start()
    finally:
        await plans.shutdown()


ORPHAN = """
import asyncio, sys, time
sys.path.insert(0, {tests!r})
from test_planpool import POLICY, planner
from broker.planpool import PlanPool

async def main() -> None:
    pool = PlanPool(planner(), POLICY)
    starting = asyncio.create_task(pool.start())
    while not pool.worker_pids():  # spawned, still importing
        await asyncio.sleep(0.001)
    if {ready!r}:
        await starting
    print(pool.worker_pids()[0], flush=True)
    time.sleep(120)

if __name__ == "__main__":
    asyncio.run(main())
"""


@pytest.mark.parametrize("ready", [True, False], ids=["ready", "still-starting"])
def test_the_worker_exits_when_the_node_is_killed(tmp_path: Path, ready: bool) -> None:
    script = tmp_path / "node.py"
    script.write_text(ORPHAN.format(tests=str(Path(__file__).parent), ready=ready))
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True) as node:
        try:
            assert node.stdout is not None
            worker = psutil.Process(int(node.stdout.readline()))
            assert worker.ppid() == node.pid
        finally:
            node.kill()
    deadline = time.monotonic() + 20
    while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the planning worker outlived its node"
        time.sleep(0.1)


def _frame(value: object) -> bytes:
    data = b"".join(_pickled(value))
    return len(data).to_bytes(8, "big") + data


def test_a_worker_whose_answer_nobody_reads_exits_without_a_traceback() -> None:
    # A feed trial killed a node (kill -9) while its worker planned a batch: the worker's
    # answer met a closed pipe before the kernel's death signal reached it, and the node's
    # log (the worker's stderr) got a BrokenPipeError traceback.
    worker = subprocess.Popen(
        [sys.executable, "-P", "-m", "broker.planpool"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert worker.stdin is not None
    assert worker.stdout is not None
    assert worker.stderr is not None
    try:
        worker.stdin.write(_frame((PlannerSpec.of(planner(), POLICY), os.getpid())))
        worker.stdin.flush()
        size = int.from_bytes(worker.stdout.read(8), "big")
        assert pickle.loads(worker.stdout.read(size)) == ("ok", None)  # noqa: S301
        worker.stdout.close()  # the node is gone: nobody reads the answer
        worker.stdin.write(_frame((rows(20), 20)))
        worker.stdin.close()
        assert worker.wait(timeout=60) == 1
        assert worker.stderr.read() == b""
    finally:
        worker.kill()
        worker.wait()
        worker.stderr.close()


async def test_a_failure_inside_the_worker_is_named_by_type_only(pool: PlanPool) -> None:
    # Exception messages can quote a report, so only the type crosses to the node's log.
    bad: list[tuple[str, bytes]] = [("a", b"x", "CONTENT")]  # type: ignore[list-item]
    with pytest.raises(PlanWorkerError) as caught:
        await pool.plan(bad, 1)
    assert str(caught.value) == "the planning worker failed: ValueError while planning"


def test_a_planned_batch_is_pickled_to_exactly_the_bytes_of_pickle_dumps() -> None:
    plans = planner().plan(rows(12), 12)
    assert sum(len(items) for items in plans.plans.values()) == 12 * 10
    for reply in (("ok", plans), ("error", "ValueError while planning"), ("ok", None)):
        assert b"".join(_pickled(reply)) == pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)


@settings(max_examples=50, deadline=None)
@given(
    value=st.recursive(
        st.none() | st.text() | st.integers() | st.binary(max_size=200_000),
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(), inner, max_size=6),
        max_leaves=12,
    )
)
def test_pickled_pieces_are_the_bytes_of_pickle_dumps(value: object) -> None:
    assert b"".join(_pickled(value)) == pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
