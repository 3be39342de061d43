"""Hostile input at every door (issue 10, part 2): intake, bus and files.

Each attack is refused with its reason counted (store counters, Prometheus
metrics, audit log), nothing valid is lost, and the node keeps serving: good
reports sent before, among and after the attacks all arrive.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from node_world import Forger, World, audit_rejections
from reliability_world import Cluster, await_for, fetch, msmt, records_for

from broker import keys, keys_custodian, keys_roster
from broker.auditlog import DB_FILE
from broker.envelope import issue
from broker.intake import ensure_token, submit
from broker.natsetup import connect_account
from broker.validation import parse_record

Build = Callable[[dict[str, Any], str, Any, int], bytes]
"""Makes one hostile bus payload from (record, good token, issued report, index)."""

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

TRIO = ("JPN", "USA", "KOR")
NODE_LIMIT = 65_536  # USA's max_message_bytes in these tests


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def released_to(cluster: Cluster, partner: str, records: list[dict[str, Any]]) -> set[str]:
    policy = cluster.policy(records[0]["originator"])
    return {
        r["report_id"]
        for r in records
        if policy.decide_all(parse_record(json.dumps(r)))[partner].sends
    }


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from a Prometheus text page (0 if absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- intake: socket and spool ---------------------------------------------------------


def hostile_lines(good: list[dict[str, Any]]) -> list[tuple[bytes, str, str]]:
    """(line, expected reason, field path or '') per hostile record, from good templates."""
    vessel = next(r for r in good if r["kind"] == "vessel" and r["vessel"].get("imo"))
    imo = vessel["vessel"]["imo"]
    bad_digit = imo[:-1] + str((int(imo[-1]) + 1) % 10)
    nested: Any = "x"
    for _ in range(200):
        nested = {"a": nested}
    return [
        (b'{"kind": "vessel", "vessel": {', "schema", ""),
        (b"\xff\xfe\x00 not json", "schema", ""),
        (json.dumps({**vessel, "notes": "x" * 70_000}).encode(), "size", ""),
        (b"[" * 30_000 + b"]" * 30_000, "schema", ""),
        (json.dumps({**vessel, "vessel": {**vessel["vessel"], "name": nested}}).encode(),
         "schema", ""),
        (json.dumps({**vessel, "vessel": {**vessel["vessel"], "name": {"a": "b"}}}).encode(),
         "schema", "vessel.name"),
        (json.dumps({**vessel, "vessel": {**vessel["vessel"], "imo": 9321483}}).encode(),
         "schema", "vessel.imo"),
        (json.dumps({**vessel, "observed_at": ["2026"]}).encode(), "schema", "observed_at"),
        (json.dumps({**vessel, "vessel": {**vessel["vessel"], "imo": bad_digit}}).encode(),
         "schema", "vessel.imo"),
        (json.dumps({**vessel, "colour": "red"}).encode(), "schema", "colour"),
        (json.dumps({**vessel, "report_id": "not-a-uuid"}).encode(), "schema", "report_id"),
    ]  # fmt: skip


async def test_intake_refuses_hostile_records_counts_them_and_keeps_serving(
    cluster: Cluster,
) -> None:
    for member in ("JPN", "USA"):
        cluster.write_config(member)
    cluster.start_many(("JPN", "USA"))
    good = records_for("JPN", 30, seed=501)
    attacks = hostile_lines(good)
    body: list[bytes] = []
    expect: list[str | None] = []
    for i, record in enumerate(good[:20]):
        body.append(json.dumps(record).encode())
        expect.append(None)
        if i < len(attacks):
            body.append(attacks[i][0])
            expect.append(attacks[i][1])
    config = cluster.config("JPN")

    async def chunks() -> AsyncIterator[bytes]:
        data = b"\n".join(body) + b"\n"
        for i in range(0, len(data), 4096):  # framing across chunk boundaries
            yield data[i : i + 4096]

    answers: list[dict[str, Any]] = []
    await submit(config.socket_path, ensure_token(config.token_path), chunks(), answers.append)
    assert [a["line"] for a in answers] == list(range(1, len(body) + 1))
    assert [a.get("reason") for a in answers] == expect
    schema_answers = [a for a in answers if a.get("reason") == "schema"]
    paths = [a["errors"][0]["path"] for a in schema_answers]
    assert paths == [p for _, r, p in attacks if r == "schema"]
    reasons = [a["errors"][0]["reason"] for a in schema_answers]
    assert sum("recursion limit" in r for r in reasons) == 2  # both deep nestings, named
    assert any("check digit" in r for r in reasons), reasons

    # The spool door: the same hostile lines in a file; it goes to rejected/ with answers.
    spool = config.spool_path
    tmp = spool / "feed.ndjson.tmp"
    tmp.write_bytes(b"\n".join([line for line, _, _ in attacks] + [json.dumps(good[20]).encode()]))
    tmp.rename(spool / "feed.ndjson")
    result = spool / "rejected" / "feed.ndjson.result.ndjson"
    await await_for(result.exists, 20, "spool file answered")
    spooled = [json.loads(x) for x in result.read_text().splitlines()]
    assert [a.get("reason") for a in spooled] == [r for _, r, _ in attacks] + [None]

    # Still serving: more good reports after the attacks, and every good one arrives.
    after = await cluster.submit("JPN", good[21:])
    assert {a["status"] for a in after} == {"accepted"}
    want = released_to(cluster, "USA", good)
    assert len(want) >= 10
    await await_for(lambda: set(cluster.inbox_ids("USA", "JPN")) == want, 60, "good delivered")

    n_schema = 2 * sum(r == "schema" for _, r, _ in attacks)
    n_size = 2 * sum(r == "size" for _, r, _ in attacks)

    def counted() -> bool:
        # Counters and metrics are both updated by the node's once-a-second housekeeping.
        c = cluster.counters("JPN")
        page = fetch(f"http://127.0.0.1:{config.metrics.port}/metrics")
        return (
            c.get("intake.schema") == n_schema
            and c.get("intake.size") == n_size
            and c.get("intake.accepted") == len(good)
            and metric(page, "msmt_intake_accepted_total") == len(good)
        )

    await await_for(counted, 10, "every outcome counted")
    page = fetch(f"http://127.0.0.1:{config.metrics.port}/metrics")
    assert metric(page, "msmt_intake_rejected_total", 'reason="schema"') == n_schema
    assert metric(page, "msmt_intake_rejected_total", 'reason="size"') == n_size
    audited = audit_rejections(config)
    assert audited == Counter({"intake.schema": n_schema, "intake.size": n_size})
    # The refusals name where, never what: no hostile value reached the audit log.
    with sqlite3.connect(config.audit_dir / DB_FILE) as db:
        log_text = "\n".join(bytes(r[0]).decode() for r in db.execute("SELECT entry FROM entries"))
    assert '"red"' not in log_text
    assert bad_imo(attacks) not in log_text
    assert cluster.alive("JPN")


def bad_imo(attacks: list[tuple[bytes, str, str]]) -> str:
    record = json.loads(attacks[8][0])
    return str(record["vessel"]["imo"])


# --- the bus, with a member's own valid credentials ------------------------------------


def swapped_disclosure(forger: Forger, record: dict[str, Any]) -> str:
    """A validly signed report presented with one disclosure from another signing of it."""
    _, issued = forger.envelope(record)
    _, other = forger.envelope(record)
    key = next(k for k in issued.disclosures if k.startswith(record["kind"] + "."))
    forged = replace(issued, disclosures={**issued.disclosures, key: other.disclosures[key]})
    return forger.present(forged, "USA")


def signed_with(
    forger: Forger, signer: keys.MemberKeys, record: dict[str, Any], now: datetime
) -> str:
    """A report signed with ``signer``'s (revoked) key, sealed to USA."""
    issued = issue(
        parse_record(json.dumps(record)),
        signing_key=signer.signing,
        kid=signer.signing_kid,
        policy_digest="0" * 64,
        now=now.replace(microsecond=0),
    )
    return forger.present(issued, "USA")


async def test_bus_attacks_with_valid_credentials_are_refused_counted_and_nothing_lost(
    cluster: Cluster,
) -> None:
    now = datetime.now(UTC)
    roster = keys_roster.load_signed_roster(cluster.keydir).roster
    old_jpn = keys.load_member_keys(cluster.keydir, "JPN", roster, now)
    keys_custodian.rotate_keys(cluster.keydir, "JPN", now=now)
    keys_custodian.revoke_key(
        cluster.keydir, old_jpn.signing_kid, "compromised in the test", now=now
    )
    for member in TRIO:
        cluster.write_config(member)
    cluster.start("USA", MSMT_MAX_MESSAGE_BYTES=str(NODE_LIMIT), MSMT_FRESHNESS_SECONDS="3600")
    cluster.start("JPN")
    forger = Forger(World(cluster.root, cluster.keydir, cluster.servers[0]), now)
    good = records_for("JPN", 40, seed=601)
    kor = records_for("KOR", 5, seed=602)
    messages: list[tuple[str, bytes, str]] = []  # subject suffix, payload, Nats-Msg-Id
    bad: Counter[str] = Counter()
    good_ids: set[str] = set()

    def add(kind: str, payload: bytes, msg_id: str, step: str | None) -> None:
        messages.append((kind, payload, msg_id))
        if step is None:
            good_ids.add(msg_id.split(".", maxsplit=1)[0])
        else:
            bad[step] += 1

    bus_attacks: dict[int, tuple[str, Build]] = {
        0: ("format", lambda r, t, iss, i: bytes(range(256)) * 3),
        1: ("format", lambda r, t, iss, i: t[: len(t) // 2].encode()),
        2: ("format", lambda r, t, iss, i: t.rsplit(".", 1)[0].encode() + b"."),
        3: ("recipient", lambda r, t, iss, i: forger.envelope(r, to="KOR")[0].encode()),
        4: ("disclosures", lambda r, t, iss, i: swapped_disclosure(forger, r).encode()),
        # The same report sealed afresh (new bytes, same jti): a replay.
        5: ("replay", lambda r, t, iss, i: forger.present(iss, "USA").encode()),
        6: ("key", lambda r, t, iss, i: signed_with(forger, old_jpn, r, now).encode()),
        # KOR's report handed over by JPN: the hub says JPN, the signed iss says KOR.
        7: ("sender", lambda r, t, iss, i: forger.envelope(kor[i % 5])[0].encode()),
        8: ("size", lambda r, t, iss, i: b"eyJ" + b"A" * (NODE_LIMIT * 3)),
    }
    for i, record in enumerate(good[:20]):
        rid, kind = record["report_id"], record["kind"]
        token, issued = forger.envelope(record)
        add(kind, token.encode(), f"{rid}.USA", None)
        if i % 10 in bus_attacks:
            step, build = bus_attacks[i % 10]
            add(kind, build(record, token, issued, i), f"{step}-{i}", step)
    # An old message replayed byte for byte after the hub's dedup (new msg id): absorbed.
    replayed_rid = good[0]["report_id"]
    messages.append((good[0]["kind"], messages[0][1], f"{replayed_rid}.USA.again"))
    assert set(bad) == {
        "format", "recipient", "disclosures", "replay", "key", "sender", "size"
    }  # fmt: skip

    nc = await connect_account(cluster.hub_urls[0], "JPN", cluster.seed("JPN"))
    try:
        js = nc.jetstream()
        node_feed = asyncio.create_task(cluster.submit("JPN", good[20:30]))
        for suffix, payload, msg_id in messages:
            await js.publish(f"msmt.to.USA.{suffix}", payload, headers={"Nats-Msg-Id": msg_id})
        # Over the hub's max_payload: refused before it leaves the client.
        with pytest.raises(nats.errors.MaxPayloadError):
            await js.publish("msmt.to.USA.vessel", b"A" * (2 << 20))
        assert {a["status"] for a in await node_feed} == {"accepted"}
    finally:
        await nc.close()

    usa = cluster.config("USA")
    want = good_ids | released_to(cluster, "USA", good[20:30])

    def settled() -> bool:
        c = cluster.counters("USA")
        return set(cluster.inbox_ids("USA", "JPN")) >= want and all(
            c.get(f"rejected.{s}", 0) >= n for s, n in bad.items()
        )

    await await_for(settled, 60, "good stored and bad counted")
    # Still serving after the attacks: fresh reports through JPN's node arrive too.
    later = good[30:]
    assert {a["status"] for a in await cluster.submit("JPN", later)} == {"accepted"}
    want |= released_to(cluster, "USA", later)
    await await_for(lambda: set(cluster.inbox_ids("USA", "JPN")) == want, 60, "later delivered")
    got = cluster.inbox_ids("USA", "JPN")
    assert len(got) == len(set(got)) == len(want)
    counters = cluster.counters("USA")
    assert {
        k.removeprefix("rejected."): v for k, v in counters.items() if k.startswith("rejected.")
    } == bad
    assert audit_rejections(usa) == bad
    # The byte-for-byte replay of an old message was absorbed: received (and logged) once.
    with sqlite3.connect(usa.audit_dir / DB_FILE) as db:
        entries = [json.loads(r[0]) for r in db.execute("SELECT entry FROM entries")]
    receipts = [e for e in entries if e["type"] == "received" and e["report_id"] == replayed_rid]
    assert len(receipts) == 1
    page = fetch(f"http://127.0.0.1:{usa.metrics.port}/metrics")
    for step, n in bad.items():
        assert metric(page, "msmt_rejected_total", f'reason="{step}"') == n, step
    assert cluster.alive("USA")


# --- the files: roster, policy, audit log -----------------------------------------------


async def test_tampered_files_are_refused_with_one_line_and_nothing_is_lost(
    cluster: Cluster,
) -> None:
    for member in ("JPN", "USA"):
        cluster.write_config(member)
    cluster.start_many(("JPN", "USA"))
    first = records_for("JPN", 12, seed=701)
    assert {a["status"] for a in await cluster.submit("JPN", first)} == {"accepted"}
    cluster.kill("JPN")  # with whatever it had not yet sent still in its outbox
    config = str(cluster.config_path("JPN"))

    roster_path = cluster.keydir / "roster.json"
    pristine_roster = roster_path.read_bytes()
    roster = json.loads(pristine_roster)
    roster["keys"][0]["msmt_valid_until"] = "2099-01-01T00:00:00Z"
    roster_path.write_text(json.dumps(roster))
    refused = msmt("node", "run", "--config", config, timeout=60)
    assert refused.returncode == 2
    assert "roster signature does not verify" in refused.stderr
    assert refused.stderr.count("\n") == 1
    roster_path.write_bytes(pristine_roster)

    policy_path = cluster.root / "nodes" / "JPN" / "policy.toml"
    pristine_policy = policy_path.read_text()
    policy_path.write_text(pristine_policy.replace("[[rules]]", "[[rules]]\nrelease_all = 1", 1))
    refused = msmt("node", "run", "--config", config, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.startswith("msmt: error: ")
    assert "policy.toml" in refused.stderr
    assert refused.stderr.count("\n") == 1
    policy_path.write_text(pristine_policy)

    # The audit log: one entry edited in place is caught by verify, with its index.
    audit_dir = cluster.config("JPN").audit_dir
    copy = cluster.root / "audit-copy"
    shutil.copytree(audit_dir, copy)
    with sqlite3.connect(copy / DB_FILE) as db:
        idx, entry = db.execute("SELECT idx, entry FROM entries WHERE idx = 2").fetchone()
        edited = bytes(entry).replace(b'"JPN"', b'"JPM"', 1)
        assert edited != bytes(entry)
        db.execute("UPDATE entries SET entry = ? WHERE idx = ?", (edited, idx))
    verified = msmt("audit", "verify", str(copy), "--keys", str(cluster.keydir))
    assert verified.returncode == 1, verified.stdout
    assert verified.stderr.startswith("msmt: error: ")
    assert verified.stderr.count("\n") == 1
    assert msmt("audit", "verify", str(audit_dir), "--keys", str(cluster.keydir)).returncode == 0

    # Restored, the node starts and delivers everything, including what it held.
    cluster.start("JPN")
    more = records_for("JPN", 6, seed=702)
    assert {a["status"] for a in await cluster.submit("JPN", more)} == {"accepted"}
    want = released_to(cluster, "USA", first + more)
    await await_for(lambda: set(cluster.inbox_ids("USA", "JPN")) == want, 60, "all delivered")
    cluster.reconcile(("JPN", "USA"))
