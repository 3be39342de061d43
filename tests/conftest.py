"""Shared fixtures: real nats-server processes on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.natsproc import NatsServer, make_cluster, start_cluster


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
