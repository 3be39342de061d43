"""Isolation and leakage with all 11 members and their real policies (issue 10, part 4).

The tap is the wire itself: every node reaches the hub only through a recording
TCP proxy, so every byte of every client connection, both directions, is
captured (publishes, JetStream API traffic, deliveries, acks, checkpoints,
witness proofs). The hub's JetStream store directory is searched as well: that
is what the hub operator holds at rest. Then:

* no plaintext field value of any submitted report appears in either (every
  leaf of every record, in its JSON form and raw, except the routing metadata
  the design puts in clear: report id, kind, member codes);
* every JWE on the wire has exactly the routing header members;
* every member's store holds exactly the fields its partners' policies released
  to it (``Policy.decide_all``), no more;
* no member's credentials can read another's inbox, take its deliveries, or pose
  as another sender, and no forged message reached any inbox.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from reliability_world import Cluster, await_for, records_for
from structlog.testing import capture_logs
from tcpproxy import TcpProxy, running

from broker.members import MEMBERS
from broker.natsconfig import inbox_durable, inbox_prefix, inbox_stream
from broker.node import Node
from broker.node_start import load_node
from broker.policy import variants
from broker.sightings import leaf_values
from broker.validation import parse_record
from broker.witness import LogState

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PER_MEMBER = 4
ROUTING = {"report_id", "kind", "originator", "rel_to"}  # in clear by design (DESIGN.md)
JWE = re.compile(
    rb"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"
)
JWE_HEADER = {"alg", "enc", "cty", "kid", "epk", "msmt_from", "msmt_to", "msmt_rid"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a JSON value with its dotted path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item, path)
    else:
        yield path, value


def needles(records: list[dict[str, Any]]) -> tuple[set[bytes], int]:
    """The byte strings that must not appear on the hub, and how many leaves were skipped.

    Each non-routing leaf in raw and JSON form. A string shorter than 8 characters
    made only of base64url characters can occur by chance in megabytes of base64
    ciphertext, so those are skipped (and counted); anything containing a character
    outside that alphabet (space, ':', '.', '"', ...) is searched at any length >= 4.
    """
    out: set[bytes] = set()
    skipped = 0
    for record in records:
        for path, value in leaves(record):
            if path.split(".")[0] in ROUTING or value is None or isinstance(value, bool):
                continue
            for form in {str(value), json.dumps(value)}:
                if len(form) >= 8 or (len(form) >= 4 and not re.fullmatch(r"[\w-]+", form)):
                    out.add(form.encode())
                else:
                    skipped += 1
    return out, skipped


NUMBER = re.compile(rb"-?\d+\.\d+")


def on_the_wire(needle: bytes, wire: bytes) -> bool:
    """Whether ``needle`` is in ``wire``; a decimal number only as that number.

    A CI run under load found ``32.3018`` (a coordinate) on the wire, where nothing
    carries report content in clear: most likely inside one of the thousands of
    nanosecond timestamps in the hub's JetStream answers (``...T03:14:32.301823Z``).
    A digit on either side makes it another number, so it is not the value; a
    number in JSON, text or a header is delimited by something else (``:32.3018,``).
    """
    if NUMBER.fullmatch(needle) is None:
        return needle in wire
    return re.search(rb"(?<!\d)" + re.escape(needle) + rb"(?!\d)", wire) is not None


def test_a_number_is_found_on_the_wire_as_that_number_and_text_anywhere() -> None:
    assert on_the_wire(b"32.3018", b'{"lat":32.3018,"lon":125.1}')
    assert on_the_wire(b"-32.3018", b"lat=-32.3018\r\n")
    assert on_the_wire(b"32.3018", b"32.3018")
    assert not on_the_wire(b"32.3018", b'"ts":"2026-12-05T03:14:32.301823Z"')
    assert not on_the_wire(b"32.3018", b"lat 132.3018 ")
    assert on_the_wire(b"KUM UN 3", b"xxKUM UN 3yy")


def released(
    cluster: Cluster, records: dict[str, list[dict[str, Any]]]
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(partner, sender, report id) -> exactly the fields the sender's policy releases."""
    out: dict[tuple[str, str, str], dict[str, Any]] = {}
    for sender, recs in records.items():
        policy = cluster.policy(sender)
        keydir = cluster.keydir / sender / "pseudonym"
        pseudonyms = {
            p.stem: base64.urlsafe_b64decode(p.read_bytes()) for p in keydir.glob("*.key")
        }
        for record in recs:
            sighting = parse_record(json.dumps(record))
            values = leaf_values(sighting)
            for partner, decision in policy.decide_all(sighting).items():
                if not decision.sends:
                    continue
                reduced = variants(sighting, [decision], pseudonyms)
                out[(partner, sender, record["report_id"])] = {
                    r.disclosure_key: values[r.path]
                    if r.transform is None
                    else reduced[r.disclosure_key]
                    for r in decision.released.values()
                }
    return out


async def run_eleven(
    cluster: Cluster, proxy: TcpProxy
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    for member in MEMBERS:
        cluster.write_config(member, urls=[proxy.url])
    records = {m: records_for(m, PER_MEMBER, seed=300 + i) for i, m in enumerate(MEMBERS)}
    want = released(cluster, records)
    with capture_logs() as logs:
        nodes: dict[str, Node] = {m: load_node(cluster.config(m)) for m in MEMBERS}
        tasks = [asyncio.create_task(n.run()) for n in nodes.values()]
        try:
            await await_for(lambda: all(n.ready() is None for n in nodes.values()), 60, "ready")
            for member in MEMBERS:
                answers = await cluster.submit(member, records[member])
                assert {a["status"] for a in answers} == {"accepted"}

            def delivered() -> bool:
                return all(
                    sum(1 for (p, s, _) in want if (p, s) == (partner, sender))
                    <= len(cluster.inbox_ids(partner, sender))
                    for partner in MEMBERS
                    for sender in MEMBERS
                )

            await await_for(delivered, 120, "every release delivered")

            def witnessed() -> bool:  # checkpoints and proofs crossed the hub too
                return all(
                    n.auditnet.witness.state.get(o, LogState(0, b"")).size > 0
                    for m, n in nodes.items()
                    for o in MEMBERS
                    if o != m
                )

            await await_for(witnessed, 60, "every log witnessed by every other member")
        finally:
            for n in nodes.values():
                n.stop.set()
            await asyncio.gather(*tasks)
    return records, [json.dumps(e, default=str) for e in logs]


async def test_eleven_members_leak_nothing_to_the_hub_and_receive_only_what_was_released(
    cluster: Cluster,
) -> None:
    hub = cluster.servers[0]
    with running(hub.port, record=True) as proxy:
        records, log_lines = await run_eleven(cluster, proxy)
        # One stream per direction of each connection, joined by a byte no search
        # matches across: a connection's read cut short is not glued to another's.
        wire = b"\n".join(proxy.capture_streams())
    all_records = [r for rs in records.values() for r in rs]
    secrets, skipped = needles(all_records)
    assert len(secrets) > 20 * len(all_records) // 4, (len(secrets), skipped)

    # The search can find them: every needle is in the originators' own stores (positive control).
    local = b"".join(
        p.read_bytes() for m in MEMBERS for p in cluster.config(m).data_dir.glob("node.sqlite3*")
    )
    assert sorted(s.decode() for s in secrets if s not in local) == []

    # 1. The wire: nothing in clear, and every envelope's header is routing only.
    assert len(wire) > 1_000_000
    on_wire = sorted(s.decode() for s in secrets if on_the_wire(s, wire))
    assert on_wire == []
    print(f"wire {len(wire)} bytes, {len(secrets)} needles searched, {skipped} short skipped")
    tokens = set(JWE.findall(wire))
    want = released(cluster, records)
    assert len(tokens) >= len(want)  # every envelope was seen on the wire
    ciphertexts: dict[str, set[int]] = {}
    for token in tokens:
        head = token.split(b".")[0]
        header = json.loads(base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4)))
        assert set(header) == JWE_HEADER
        ciphertexts.setdefault(header["msmt_rid"], set()).add(len(token.split(b".")[3]))
    # ... and the ciphertexts of one report have one length, though its partners were
    # released different fields (docs/ENVELOPE.md §4.1, padding).
    releases: dict[str, set[frozenset[str]]] = {}
    for (_partner, _sender, rid), fields in want.items():
        releases.setdefault(rid, set()).add(frozenset(fields))
    assert sum(len(r) > 1 for r in releases.values()) > len(releases) // 4
    assert {rid: len(n) for rid, n in ciphertexts.items() if len(n) > 1} == {}
    # 2. The hub at rest: its JetStream store holds no plaintext either. The envelopes
    # the nodes acked have left it (interest retention); what is scanned is every
    # stream's files: metadata, the archived checkpoints, anything not yet acked.
    at_rest = b"".join(p.read_bytes() for p in hub.store_dir.rglob("*") if p.is_file())
    assert all(f'"name":"INBOX_{m}"'.encode() in at_rest for m in MEMBERS)
    assert sorted(s.decode() for s in secrets if s in at_rest) == []
    # (And the nodes' own logs carry no report content.)
    assert (
        sorted(s.decode() for s in secrets if any(s.decode() in line for line in log_lines)) == []
    )

    # 3. Each store holds exactly what was released to it.
    for partner in MEMBERS:
        store = cluster.store(partner)
        try:
            got = {(e.sender, e.report_id): e for e in store.inbox(limit=100_000)}
        finally:
            store.close()
        expected = {(s, rid): f for (p, s, rid), f in want.items() if p == partner}
        assert set(got) == set(expected), partner
        for key, fields in expected.items():
            assert dict(got[key].fields) == fields, (partner, key)

    # 4. Credentials: no member reads another's inbox or poses as another.
    await assert_no_crossing(cluster, records, want)


async def assert_no_crossing(
    cluster: Cluster,
    records: dict[str, list[dict[str, Any]]],
    want: dict[tuple[str, str, str], dict[str, Any]],
) -> None:
    url = cluster.hub_urls[0]
    expected_errors = 0
    conns = []
    errors: dict[str, list[str]] = {}
    for member in MEMBERS:
        errors[member] = []

        async def on_error(exc: Exception, member: str = member) -> None:
            errors[member].append(str(exc).lower())

        nc = await nats.connect(
            url,
            nkeys_seed_str=cluster.seed(member).decode(),
            inbox_prefix=inbox_prefix(member),
            error_cb=on_error,
            allow_reconnect=False,
        )
        conns.append(nc)
        victim = MEMBERS[(MEMBERS.index(member) + 1) % len(MEMBERS)]
        third = MEMBERS[(MEMBERS.index(member) + 2) % len(MEMBERS)]
        stream, durable = inbox_stream(victim), inbox_durable(victim)
        for subject in (
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",  # take the victim's deliveries
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"from.{victim}.msmt.to.{third}.vessel",  # pose as the victim, as the hub writes it
            f"msmt.audit.{victim}.checkpoint",  # speak for the victim's log
        ):
            await nc.publish(subject, b"{}", reply=nc.new_inbox())
            expected_errors += 1
        for subject in (f"from.{victim}.>", f"{inbox_prefix(victim)}.>", f"msmt.to.{victim}.>"):
            await nc.subscribe(subject)
            expected_errors += 1
        await nc.flush()

    def all_refused() -> bool:
        return (
            sum(sum("permissions violation" in e for e in errs) for errs in errors.values())
            >= expected_errors
        )

    try:
        await await_for(all_refused, 20, "every crossing refused by the hub")
    finally:
        for nc in conns:
            await nc.close()
    # Nothing forged landed: each inbox ever stored exactly the releases (its node has
    # acked and so removed them; a forged one would still have taken a sequence).
    for partner in MEMBERS:
        n = sum(1 for (p, _, _) in want if p == partner)
        assert await cluster.stream_stored(partner) == n, partner
    assert records
