"""A 3-server hub: a node whose server cannot serve it moves to one that can.

A server cut off from the other two (its routes down) or reached over a link that
drops packets keeps the node's connection open: nats-py stays on it, and noticed
a dead link only by its pings (2-6 minutes), a live but isolated server never,
while the node publishes and receives nothing although two whole servers are in
its ``nats.urls`` (``bench/chaos.py --hub-servers 3`` found both). The node asks
the hub for its inbox consumer every 5 s; three requests without an answer and it
moves on. Each test then checks the promise: every report delivered exactly
once, the logs verify and replay clean (``Cluster.settle``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reliability_world import Cluster, await_for, fetch, records_for
from tcpproxy import TcpProxy

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, size=3, proxied_routes=True)
    try:
        yield c
    finally:
        c.close()


def servers_of(cluster: Cluster, member: str) -> set[int]:
    """The servers that list a connection of ``member``'s node (their ``/connz``).

    A server behind a held link still lists the connection the node left, until
    its own pings give up on it.
    """
    found = set()
    for i, server in enumerate(cluster.servers):
        connz = json.loads(fetch(f"http://127.0.0.1:{server.http_port}/connz"))
        if any(c.get("name") == f"msmt-node-{member}" for c in connz["connections"] or []):
            found.add(i)
    return found


def server_of(cluster: Cluster, member: str) -> int:
    """The one server ``member``'s node is connected to."""
    found = servers_of(cluster, member)
    assert len(found) == 1, f"{member}'s node is connected to {sorted(found)}"
    return found.pop()


async def deliver_while_cut(cluster: Cluster, cut: int) -> list[dict[str, Any]]:
    """JPN's reports reach USA (on the other servers) while JPN's first server is cut."""
    records = records_for("JPN", 12, seed=7)
    answers = await cluster.submit("JPN", records)
    assert [a["status"] for a in answers] == ["accepted"] * len(records), answers
    want = cluster.expected({"JPN": records}, ["USA"])[("USA", "JPN")]
    assert want, "JPN's policy released nothing to USA: the check would be empty"
    await await_for(
        lambda: set(cluster.inbox_ids("USA", "JPN")) >= want, 120, "JPN's reports at USA"
    )
    assert servers_of(cluster, "JPN") - {cut}  # delivered through another server
    log = (cluster.root / "JPN.log").read_text()
    assert "has not answered JetStream requests" in log, log[-2000:]
    return records


async def test_a_node_on_a_server_cut_off_from_the_cluster_moves_to_another(
    cluster: Cluster,
) -> None:
    cluster.write_config("JPN")
    cluster.start("JPN")
    cut = server_of(cluster, "JPN")
    cluster.write_config("USA", urls=[s.url for i, s in enumerate(cluster.servers) if i != cut])
    cluster.start("USA")
    for proxy in cluster.routes_of(cut):
        proxy.cut()
    sent = await deliver_while_cut(cluster, cut)
    for proxy in cluster.routes_of(cut):
        proxy.heal()
    await await_for(cluster.whole, 120, "the cluster whole again")
    await cluster.settle({"JPN": sent}, ("JPN", "USA"))


async def test_a_node_whose_link_drops_packets_moves_to_another_server(
    cluster: Cluster,
) -> None:
    links = [TcpProxy(server.port) for server in cluster.servers]
    try:
        for link in links:
            link.start()
        cluster.write_config("JPN", urls=[link.url for link in links])
        cluster.start("JPN")
        cut = server_of(cluster, "JPN")
        cluster.write_config("USA")
        cluster.start("USA")
        links[cut].hold()
        sent = await deliver_while_cut(cluster, cut)
        links[cut].heal()
        await await_for(cluster.whole, 120, "the cluster whole again")
        await cluster.settle({"JPN": sent}, ("JPN", "USA"))
    finally:
        for link in links:
            link.stop()
