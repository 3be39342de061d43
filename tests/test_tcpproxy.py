"""The test TCP proxy closes every socket it opened when stopped, whatever its peers do.

A socket left open is collected later, in whichever test the garbage collector
happens to run, and fails that test with a ResourceWarning (seen in CI about once
in three suite runs: a reliability test failed at setup on a socket from an earlier
module, whose ports say it was a connection to a proxy).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from tcpproxy import TcpProxy


@pytest.fixture
def deaf_upstream() -> Iterator[socket.socket]:
    """A listener that completes handshakes but never accepts or reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


def _proxy_sockets(proxy: TcpProxy, upstream_port: int) -> list[str]:
    """This process's sockets that the proxy owns: bound to its port, or dialling upstream."""
    ours = []
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == proxy.port:
            ours.append(f"{conn.laddr} <- {conn.raddr} {conn.status}")
        elif conn.raddr and conn.raddr.port == upstream_port:
            ours.append(f"{conn.laddr} -> {conn.raddr} {conn.status}")
    return ours


def _fill(sock: socket.socket) -> int:
    """Write until the kernel's buffers are full; return the bytes written."""
    sock.setblocking(False)
    sent = 0
    try:
        while True:
            sent += sock.send(b"x" * 65536)
    except BlockingIOError:
        return sent


@pytest.mark.parametrize("state", ["flowing", "held"])
def test_stop_closes_every_socket_even_with_a_peer_that_never_reads(
    deaf_upstream: socket.socket, state: str
) -> None:
    upstream_port = int(deaf_upstream.getsockname()[1])
    proxy = TcpProxy(upstream_port)
    proxy.start()
    clients = [socket.create_connection(("127.0.0.1", proxy.port))]
    deadline = time.monotonic() + 10
    while proxy.active < 1:
        assert time.monotonic() < deadline, "the proxy never connected upstream"
        time.sleep(0.01)
    # The upstream never reads, so the proxy's own write buffer towards it
    # fills: a plain close() would wait for it to drain for ever.
    assert _fill(clients[0]) > 0
    if state == "held":
        proxy.hold()
        clients.append(socket.create_connection(("127.0.0.1", proxy.port)))
    time.sleep(0.3)  # the proxy reads what it can and, held, accepts the second client
    before = _proxy_sockets(proxy, upstream_port)
    assert any("->" in line for line in before), before  # it did dial upstream

    proxy.stop()

    try:
        left = [line for line in _proxy_sockets(proxy, upstream_port) if "LISTEN" not in line]
        # What remains on the proxy's port is the kernel's side of closing
        # (TIME_WAIT and friends), never a socket this process still holds open.
        held_open = [line for line in left if "ESTABLISHED" in line or "CLOSE_WAIT" in line]
        assert held_open == [], held_open
    finally:
        for client in clients:
            client.close()


async def _close_the_listener_only(self: TcpProxy) -> None:
    """A shutdown that misses every connection: it closes only the listener."""
    if self._server is not None:  # as the real one: set by start()
        self._server.close()


async def _pipe_one_then_stop(upstream_port: int) -> list[str]:
    """Pipe one client through a new proxy, stop it, and return its sockets still open."""
    proxy = TcpProxy(upstream_port)
    proxy.start()
    client = socket.create_connection(("127.0.0.1", proxy.port))
    try:
        deadline = time.monotonic() + 10
        while proxy.active < 1:
            assert time.monotonic() < deadline, "the proxy never connected upstream"
            await asyncio.sleep(0.01)
        before = _proxy_sockets(proxy, upstream_port)
        assert sum("ESTABLISHED" in line for line in before) == 2, before  # both sides open

        proxy.stop()

        left = _proxy_sockets(proxy, upstream_port)
        return [line for line in left if "ESTABLISHED" in line or "CLOSE_WAIT" in line]
    finally:
        client.close()


async def test_stop_closes_even_a_connection_the_orderly_shutdown_missed(
    deaf_upstream: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The orderly shutdown closes every connection it knows of. Whatever escapes it
    # (how one escaped in CI is not known) is aborted once the loop has stopped:
    # here the shutdown closes only the listener, so every connection escapes.
    # Async, as the reliability tests are: ``stop`` is called with a loop running.
    monkeypatch.setattr(TcpProxy, "_shutdown", _close_the_listener_only)
    assert await _pipe_one_then_stop(int(deaf_upstream.getsockname()[1])) == []


async def test_stop_closes_a_connection_that_escaped_both_sweeps(
    deaf_upstream: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Neither the orderly shutdown nor the sweep of the stopped loop's registry sees
    # these connections, whose tasks end without closing them: only the last net,
    # after the loop is closed, can close them.
    async def end_the_tasks_only(self: TcpProxy) -> None:
        me = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not me]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    monkeypatch.setattr(TcpProxy, "_shutdown", _close_the_listener_only)
    monkeypatch.setattr(TcpProxy, "_abort_leftovers", end_the_tasks_only)
    assert await _pipe_one_then_stop(int(deaf_upstream.getsockname()[1])) == []
    # Both sides were named, and nothing is left for the garbage collector to warn
    # about (the suite turns a ResourceWarning into an error).
    assert capsys.readouterr().err.count("tcpproxy: closed an escaped") == 2
    gc.collect()


def test_capture_streams_keeps_each_connection_whole_when_their_writes_interleave() -> None:
    # A sink upstream: accepts and reads, never answers.
    sink = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sink.bind(("127.0.0.1", 0))
    sink.listen()
    accepted: list[socket.socket] = []

    def serve() -> None:
        for _ in range(2):
            conn, _addr = sink.accept()
            accepted.append(conn)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    proxy = TcpProxy(int(sink.getsockname()[1]), record=True)
    proxy.start()
    try:
        first = socket.create_connection(("127.0.0.1", proxy.port))
        second = socket.create_connection(("127.0.0.1", proxy.port))
        sent = b""
        # Alternate the connections, each write seen by the proxy before the next.
        for client, chunk in [(first, b"a1"), (second, b"B1"), (first, b"a2"), (second, b"B2")]:
            client.sendall(chunk)
            sent += chunk
            deadline = time.monotonic() + 10
            while (
                sum(map(len, proxy.capture_streams())) < len(sent) and time.monotonic() < deadline
            ):
                time.sleep(0.01)
        assert sorted(s for s in proxy.capture_streams() if s) == [b"B1B2", b"a1a2"]
        first.close()
        second.close()
    finally:
        proxy.stop()
        server.join(timeout=10)
        for conn in accepted:
            conn.close()
        sink.close()
