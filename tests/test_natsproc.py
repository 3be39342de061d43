"""The real-nats-server harness: start, publish through JetStream, restart, cluster."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError

from broker.natsproc import NatsServer

pytestmark = pytest.mark.integration


async def test_jetstream_survives_a_server_restart(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="T", subjects=["t.>"]))
    ack = await js.publish("t.one", b"hello", headers={"Nats-Msg-Id": "m1"})
    assert ack.seq == 1
    await nc.close()

    nats_server.kill()
    assert not nats_server.healthy()
    nats_server.start()

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    msg = await js.get_msg("T", 1)
    assert msg.data == b"hello"
    # Dedup window survives the restart: the same Nats-Msg-Id is not stored twice.
    dup = await js.publish("t.one", b"hello", headers={"Nats-Msg-Id": "m1"})
    assert dup.duplicate
    await nc.close()


async def test_three_server_cluster_replicates_a_stream(nats_cluster: list[NatsServer]) -> None:
    nc = await nats.connect([s.url for s in nats_cluster])
    try:
        js = nc.jetstream()
        info = await js.add_stream(StreamConfig(name="R", subjects=["r.>"], num_replicas=3))
        assert info.config.num_replicas == 3
        await js.publish("r.x", b"1")
    finally:
        await nc.close()

    nats_cluster[0].kill()
    nc = await nats.connect([s.url for s in nats_cluster[1:]])
    try:
        js = nc.jetstream()
        # If the stream leader was on the killed server, the two survivors elect a
        # new one first; until then the stream has no responder. Wait for that
        # (bounded), then the publish must be stored with the next sequence.
        ack = None
        deadline = asyncio.get_running_loop().time() + 30
        while ack is None:
            try:
                ack = await js.publish("r.x", b"2", timeout=2, headers={"Nats-Msg-Id": "m2"})
            except (NoStreamResponseError, nats.errors.TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert ack.seq == 2
    finally:
        await nc.close()
