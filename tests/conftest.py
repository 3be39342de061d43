"""Shared fixtures: real nats-server processes on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

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
