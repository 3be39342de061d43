"""A publish the hub refuses fails its future with the hub's reason (nats-io/nats.py#985).

A real nats-server: a stream of 64 KiB that discards new messages once full,
as a partner's inbox does when it stays away. nats-py's own reply handler
leaves the future of a refused publish pending forever; ``AckedJetStream``
must fail it with the hub's ``503 maximum bytes exceeded`` at once.
"""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.errors import ServiceUnavailableError

from broker.natsproc import NatsServer
from broker.natstls import AckedJetStream, TlsOnlyClient

pytestmark = pytest.mark.integration


async def test_a_full_stream_fails_the_publish_future_with_the_hubs_reason(
    nats_server: NatsServer,
) -> None:
    nc = TlsOnlyClient()
    await nc.connect(servers=[nats_server.url], allow_reconnect=False)
    try:
        js = nc.jetstream()
        assert isinstance(js, AckedJetStream)
        await js.add_stream(
            StreamConfig(
                name="INBOX_T", subjects=["t.>"], max_bytes=64 * 1024, discard=DiscardPolicy.NEW
            )
        )
        acked = 0
        refused: BaseException | None = None
        for i in range(40):  # 40 x 4 KiB: the stream fills after about 15
            future = await js.publish_async("t.x", b"x" * 4096, headers={"Nats-Msg-Id": str(i)})
            try:
                await asyncio.wait_for(future, 5)
            except ServiceUnavailableError as exc:
                refused = exc
                break
            acked += 1
        assert 0 < acked < 40
        assert refused is not None, "the hub never refused a publish"
        assert "maximum bytes exceeded" in str(refused)
    finally:
        await nc.close()
