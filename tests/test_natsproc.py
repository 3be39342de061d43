"""The real-nats-server harness: start, publish through JetStream, restart, cluster."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import PubAck, StreamConfig
from nats.js.errors import APIError, NoStreamResponseError
from node_world import in_port_share

from broker import natsproc
from broker.errors import UsageError
from broker.natsproc import NatsServer, _bindable, free_port, share_ports

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


def test_a_server_that_does_not_become_healthy_in_time_is_not_left_running(
    tmp_path: Path,
) -> None:
    # It runs in its own session, so no terminal's Ctrl-C reaches it: a start that
    # gave up on it (or was interrupted while waiting) left it holding its ports.
    server = NatsServer(workdir=tmp_path)
    with pytest.raises(UsageError, match="not healthy after 0"):
        server.start(timeout=0)
    assert server.proc is not None
    assert server.proc.poll() is not None


async def _publish_once_led(js: JetStreamContext, data: bytes, msg_id: str) -> PubAck:
    # A replicated stream has no responder until its leader is elected: just after
    # it is created, and after the leader's server is killed. Wait for that
    # (bounded); the message id makes a retried publish count once. A retry while
    # the timed-out attempt is still being replicated is refused with err_code
    # 10158, "duplicate message id is in process" (seen on a busy machine): the
    # next retry gets that attempt's ack.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            return await js.publish("r.x", data, timeout=2, headers={"Nats-Msg-Id": msg_id})
        except (NoStreamResponseError, nats.errors.TimeoutError, APIError) as exc:
            if isinstance(exc, APIError) and exc.err_code != 10158:
                raise
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_three_server_cluster_replicates_a_stream(nats_cluster: list[NatsServer]) -> None:
    nc = await nats.connect([s.url for s in nats_cluster])
    try:
        js = nc.jetstream()
        info = await js.add_stream(StreamConfig(name="R", subjects=["r.>"], num_replicas=3))
        assert info.config.num_replicas == 3
        assert (await _publish_once_led(js, b"1", "m1")).seq == 1
    finally:
        await nc.close()

    nats_cluster[0].kill()
    nc = await nats.connect([s.url for s in nats_cluster[1:]])
    try:
        # The second message is stored with the next sequence: the first survived.
        assert (await _publish_once_led(nc.jetstream(), b"2", "m2")).seq == 2
    finally:
        await nc.close()


def test_free_ports_are_below_the_ephemeral_range_and_bindable() -> None:
    # A client connection's own end comes from the ephemeral range; a port chosen
    # there could be taken before the server binds it.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picked = [free_port() for _ in range(500)]
    # Never the same port twice: a test picks all its ports before its servers bind any.
    ports = set(picked)
    assert len(ports) == len(picked)
    for port in ports:
        assert 10_000 <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            sock.bind(("127.0.0.1", port))


def _served_and_closed(port: int) -> None:
    """A server on ``port`` that served a connection and closed it first: as a run ends.

    Its side of the connection, on ``port``, stays in TIME-WAIT for 60 s.
    """
    with socket.create_server(("127.0.0.1", port)) as listener:  # SO_REUSEADDR, as servers
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()
    client.recv(1)  # the server's FIN: the server closed first
    client.close()


def _time_wait(port: int) -> bool:
    out = subprocess.run(
        ["ss", "-Htan", "state", "time-wait", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return bool(out.strip())


async def _asyncio_listens(port: int) -> bool:
    # What aiohttp's TCPSite does for the node's metrics (loop.create_server).
    try:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", port)
    except OSError:
        return False
    server.close()
    await server.wait_closed()
    return True


async def test_a_port_a_server_can_listen_on_is_bindable_and_one_it_cannot_is_not() -> None:
    # A port an earlier server served on lies in TIME-WAIT: servers listen on it at
    # once (SO_REUSEADDR), and the probe said no, so a run right after another in a
    # small range ran short of ports and was handed the same ones twice.
    served = free_port()
    _served_and_closed(served)
    assert _time_wait(served)
    assert _bindable(served)
    assert await _asyncio_listens(served)
    # A listener: neither.
    with socket.create_server(("127.0.0.1", free_port())) as listener:
        taken = listener.getsockname()[1]
        assert not _bindable(taken)
        assert not await _asyncio_listens(taken)
    # A TIME-WAIT of a client socket bound there without SO_REUSEADDR: neither.
    client_port = free_port()
    with socket.create_server(("127.0.0.1", free_port())) as listener:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.bind(("127.0.0.1", client_port))
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
        client.close()  # the client first: its end, on client_port, in TIME-WAIT
        accepted.close()
    assert _time_wait(client_port)
    assert not _bindable(client_port)
    assert not await _asyncio_listens(client_port)


def test_a_small_range_whose_ports_lie_in_time_wait_offers_each_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Benchmark runs confined to 20 ports, one right after another: the ports the
    # last run's servers used were refused, and the few left were offered twice
    # before being bound (5 of 8 runs failed to start).
    ports = [free_port() for _ in range(6)]
    for port in ports[:4]:
        _served_and_closed(port)
    monkeypatch.setattr(natsproc, "share_ports", lambda index, count: ports)
    monkeypatch.setattr(natsproc, "_cursor", [0])
    assert [free_port() for _ in ports] == ports


def test_processes_given_their_own_shares_never_offer_the_same_port() -> None:
    # The suite's workers each walk from a random start; confined to shares
    # their walks cannot meet (in subprocesses: this worker keeps its own share).
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    pick = (
        "import sys; from broker.natsproc import confine_ports, free_port;"
        " confine_ports(int(sys.argv[1]), 2); print(*(free_port() for _ in range(300)))"
    )
    shares = [
        {int(p) for p in subprocess.check_output([sys.executable, "-c", pick, str(i)]).split()}
        for i in (0, 1)
    ]
    middle = 10_000 + (low - 10_000) // 2
    assert [len(s) for s in shares] == [300, 300]
    assert all(10_000 <= p < middle for p in shares[0])
    assert all(middle <= p < low for p in shares[1])


def test_a_subprocess_started_in_a_share_offers_ports_from_it_alone() -> None:
    # What test_demo hands msmt demo (in_port_share): a sitecustomize that confines
    # the subprocess, with no switch in the product's CLI. Shares far apart, so a
    # walk of the whole range would land outside them; the share is printed too.
    pick = (
        "from broker.natsproc import free_port, port_share;"
        " print(*port_share(), *(free_port() for _ in range(300)))"
    )
    for share in ((1, 8), (6, 8)):
        env = in_port_share(dict(os.environ), share)
        shown, ports = _split(subprocess.check_output([sys.executable, "-c", pick], env=env))
        assert shown == share
        assert len(set(ports)) == 300
        assert [p for p in ports if p not in share_ports(*share)] == []
    # Without it, a subprocess offers the whole range (what the demo did).
    shown, _ = _split(subprocess.check_output([sys.executable, "-c", pick]))
    assert shown == (0, 1)


def _split(output: bytes) -> tuple[tuple[int, int], list[int]]:
    index, count, *ports = (int(n) for n in output.split())
    return (index, count), ports
