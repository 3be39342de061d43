"""Shared fixtures: real nats-server processes on free loopback ports, and the node tests' world."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from node_world import World, setup_accounts, start_hub

from broker import keys
from broker.members import MEMBERS
from broker.natsproc import NatsServer, make_cluster, start_cluster

# Timings are for benchmarks, never tests: on a shared 2-core machine a stalled
# draw (a strategy's first regex compile, another job's burst) tripped
# Hypothesis's too_slow health check and per-example deadline although every
# property held. Tests opt in to other suppressions themselves.
settings.register_profile("msmt", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("msmt")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A single real nats-server with JetStream, stopped at the end of the test."""
    server = NatsServer(workdir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[NatsServer]]:
    """A real 3-server JetStream cluster on loopback."""
    servers = make_cluster(tmp_path / "cluster", 3)
    start_cluster(servers)
    try:
        yield servers
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """All 11 members' keys, a real hub with their accounts and inboxes set up, and no node yet.

    Every node the test started as a subprocess is killed at the end, then the hub.
    """
    keydir, server = start_hub(tmp_path, MEMBERS)
    setup_accounts(server.url, keydir, (*MEMBERS, keys.AUDIT_ACCOUNT))
    w = World(tmp_path, keydir, server)
    try:
        yield w
    finally:
        for member in list(w.procs):
            w.kill(member)
        server.kill()
