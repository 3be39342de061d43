"""Crash-consistency torture: random, repeated faults under load, then "nothing lost, ever".

    python bench/chaos.py [--minutes M] [--seed N] [--root DIR] [--faults KIND,...]
                          [--hub-servers 1|3]

Not a timed benchmark and not in ``make test``: a long-running check. It builds
the reliability suite's world (``tests/reliability_world.Cluster``: keys for all
11 members, one real nats-server with its JetStream store on disk, the members'
real policies) and runs five nodes, each reaching the hub through its own
``tests/tcpproxy.py`` proxy so that any one can be cut off. Feeds submit
steadily: JPN and USA through ``msmt submit -`` (records piped in one by one,
so a kill lands mid-stream), GBR and KOR through their spool directories; FRA
only receives. For ``--minutes``, at random moments (seeded; every fault is
logged with its step number to ``<root>/chaos-events.log``):

* ``kill9``: SIGKILL a node, restart it after 0-10 s;
* ``kill9-startup``: SIGKILL a node, restart it, SIGKILL it again while it
  starts (0-12 s in: on a busy machine start-up takes seconds), restart it after 0-10 s;
* ``term-kill``: SIGTERM a node, SIGKILL it 0.05-1.5 s later (during its
  shutdown), restart it after 0-10 s;
* ``hub-kill9``: SIGKILL nats-server, restart it on the same store after 0-10 s;
* ``partition``: cut a node's proxy for 2-60 s;
* ``submit-kill9``: SIGKILL a running ``msmt submit`` mid-stream; its feed
  sends the same records again, and those answered before must come back
  ``duplicate``;
* ``sigstop``: SIGSTOP a node for 31-50 s (longer than the inbox consumers'
  30 s ack wait), then SIGCONT.

With ``--hub-servers 3`` the hub is a 3-server cluster, every stream at 3
replicas, as docs/DEPLOY.md runs it: each node is given all three servers'
URLs (each through a proxy of its own), the servers route to one another
through proxies too (``Cluster(proxied_routes=True)``), and ``hub-kill9`` gives
way to these (each holds the hub until every server's ``/healthz`` is 200):

* ``server-kill9``: SIGKILL one server, restart it on its store after 0-10 s;
* ``leader-kill9``: the same for the JetStream meta leader's server, or the
  server leading a random member's inbox stream (``/jsz``);
* ``quorum-kill9``: SIGKILL two servers at once for 5-40 s (no quorum: every
  publish and pull fails), restart one, the other 0-10 s later;
* ``rolling-restart``: SIGTERM, start and wait for ``/healthz`` (JetStream
  current), each server in turn;
* ``route-partition``: cut one server's routes for 5-60 s, refusing
  connections or (half the time) holding them open and forwarding nothing;
* ``server-wipe``: SIGKILL one server, delete its whole store, restart it: the
  others must replicate every stream to it again;
* ``server-sigstop``: SIGSTOP one server for 10-60 s;
* ``link-cut``: cut (or hold) a node's link to the server it uses for 5-60 s.

A node's ``partition`` then cuts all three of its links. Every change of a
node's ``/readyz`` and of a server's ``/healthz`` is logged, and during a
quorum loss, a partition or a stopped server one node's ``msmt status``. At
the end the cluster must be whole again: the meta group and every stream led,
at 3 replicas, both followers current.

Each node runs in a session of its own, so a driver started in the background
(``nohup ... &``) whose shell exits does not get its SIGSTOPped nodes killed
by the kernel's SIGHUP for an orphaned process group.

The ledger holds every record a feed was told was accepted (``accepted`` or
``duplicate``). At the end everything is healed and restarted, the feeds
finish, and the check is: every ledger report reached exactly every partner
its originator's policy releases it to (partner stores, no duplicate rows,
the hub's inbox streams stored one message per release), every outbox is
empty, each originator's store holds exactly the ledger's reports, every
node stops cleanly on SIGTERM (exit 0), ``msmt audit verify`` passes on every
log and ``msmt audit replay`` over all of them has no finding. Any miss prints
``FAILED: ...`` (into the events log too) and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from reliability_world import MSMT, Cluster, msmt, not_whole, records_for  # noqa: E402
from sigterm import run_stoppable  # noqa: E402
from tcpproxy import TcpProxy  # noqa: E402

from broker.natsproc import NatsServer  # noqa: E402

SUBMITTERS = ("JPN", "USA")
SPOOLERS = ("GBR", "KOR")
MEMBERS = (*SUBMITTERS, *SPOOLERS, "FRA")
ACK_WAIT_S = 30.0  # natsetup.InboxLimits.ack_wait_s: a SIGSTOP longer than this redelivers
NODE_FAULTS = {  # kind -> weight
    "kill9": 4,
    "kill9-startup": 2,
    "term-kill": 3,
    "partition": 2,
    "submit-kill9": 3,
    "sigstop": 1,
}
HUB_FAULTS = {"hub-kill9": 2}  # a single server
CLUSTER_FAULTS = {  # --hub-servers 3; each holds the hub until the cluster is healthy again
    "server-kill9": 3,
    "leader-kill9": 2,
    "quorum-kill9": 1,
    "rolling-restart": 1,
    "route-partition": 2,
    "server-wipe": 1,
    "server-sigstop": 1,
    "link-cut": 2,
}
FAULTS = {**NODE_FAULTS, **HUB_FAULTS, **CLUSTER_FAULTS}
HUB_KINDS = {*HUB_FAULTS, *CLUSTER_FAULTS} - {"link-cut"}  # these hold "hub"
STATUS_KEYS = ("connected", "outbox_depth", "inbox_lag", "last_error", "last_error_at")
HEALTHY_WITHIN_S = 300.0  # a restarted server not healthy by then is an anomaly


def faults_for(servers: int) -> dict[str, int]:
    """The fault kinds (and weights) a hub of ``servers`` servers draws from."""
    return {**NODE_FAULTS, **(HUB_FAULTS if servers == 1 else CLUSTER_FAULTS)}


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """GET ``url``: (status, body); (0, the reason) when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return 0, f"{type(exc).__name__} {exc}"


@dataclass
class Chaos:
    """The world, the feeds' ledger, the fault log and every anomaly seen."""

    root: Path
    rng: random.Random
    servers: int = 1
    world: Cluster = field(init=False)
    proxies: dict[str, list[TcpProxy]] = field(default_factory=dict)  # one per server
    ledger: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    faults: Counter[str] = field(default_factory=Counter)
    anomalies: list[str] = field(default_factory=list)
    notes: Counter[str] = field(default_factory=Counter)
    busy: set[str] = field(default_factory=set)
    kill_submit: dict[str, bool] = field(default_factory=dict)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    step: int = 0
    resent: int = 0
    t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.world = Cluster(
            self.root, self.servers, proxied_routes=self.servers > 1, node_sessions=True
        )
        self.ledger = {m: {} for m in (*SUBMITTERS, *SPOOLERS)}
        self._events = (self.root / "chaos-events.log").open("a", buffering=1)

    def event(self, text: str) -> None:
        line = f"{time.monotonic() - self.t0:8.1f}s step {self.step:4d} {text}"
        self._events.write(line + "\n")
        print(line, flush=True)

    def anomaly(self, text: str) -> None:
        self.anomalies.append(f"step {self.step}: {text}")
        self.event(f"ANOMALY {text}")

    # --- world -------------------------------------------------------------------

    def start(self) -> None:
        for member in MEMBERS:
            self.proxies[member] = [TcpProxy(server.port) for server in self.world.servers]
            for proxy in self.proxies[member]:
                proxy.start()
            self.world.write_config(member, urls=[p.url for p in self.proxies[member]])
        self.world.start_many(MEMBERS)

    def close(self) -> None:
        self.world.close()
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.stop()

    def proc(self, member: str) -> subprocess.Popen[bytes]:
        return self.world.procs[member]

    async def signal_node(self, member: str, sig: signal.Signals) -> None:
        self.proc(member).send_signal(sig)
        if sig == signal.SIGKILL:
            await asyncio.to_thread(self.proc(member).wait, 30)

    def launch(self, member: str) -> None:
        self.world.launch(member)

    # --- faults ------------------------------------------------------------------

    async def faulting(self, until: float, chosen: Sequence[str]) -> None:
        tasks: set[asyncio.Task[None]] = set()
        kinds, weights = zip(*((k, w) for k, w in FAULTS.items() if k in chosen), strict=True)
        while time.monotonic() < until:
            await asyncio.sleep(self.rng.uniform(2, 12))
            kind = self.rng.choices(kinds, weights)[0]
            free = [m for m in MEMBERS if m not in self.busy]
            if kind in HUB_KINDS:
                if "hub" in self.busy:
                    continue
                target = "hub"
            elif kind == "submit-kill9":
                target = self.rng.choice(SUBMITTERS)
            elif not free:
                continue
            else:
                target = self.rng.choice(free)
            self.step += 1
            self.faults[kind] += 1
            # A submit-kill9 only flags the feed: the node stays free for other faults.
            holds = kind != "submit-kill9"
            if holds:
                self.busy.add(target)
            task = asyncio.create_task(self.fault(kind, target, self.rng.random(), holds))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        self.event("faults stop; waiting for the ones in progress")
        await asyncio.gather(*tasks)

    async def fault(self, kind: str, target: str, r: float, holds: bool) -> None:
        rng = random.Random(r)  # each fault's own draws: the main schedule stays seeded
        try:
            await getattr(self, "fault_" + kind.replace("-", "_"))(target, rng)
            self.event(f"{kind} {target} over")
        except Exception as exc:  # noqa: BLE001 - the harness itself failed: say so, go on
            self.anomaly(f"{kind} {target}: the driver failed: {type(exc).__name__} {exc}")
        finally:
            if holds:  # released only by the fault that holds it, never by a submit-kill9
                self.busy.discard(target)

    async def fault_kill9(self, target: str, rng: random.Random) -> None:
        down = rng.uniform(0, 10)
        self.event(f"kill -9 {target}, down {down:.1f}s")
        await self.signal_node(target, signal.SIGKILL)
        await asyncio.sleep(down)
        self.launch(target)

    async def fault_kill9_startup(self, target: str, rng: random.Random) -> None:
        down, early = rng.uniform(0, 10), rng.uniform(0, 12)
        self.event(f"kill -9 {target}, restart, kill -9 {early:.2f}s in, down {down:.1f}s")
        await self.signal_node(target, signal.SIGKILL)
        self.launch(target)
        await asyncio.sleep(early)
        await self.signal_node(target, signal.SIGKILL)
        await asyncio.sleep(down)
        self.launch(target)

    async def fault_term_kill(self, target: str, rng: random.Random) -> None:
        down, grace = rng.uniform(0, 10), rng.uniform(0.05, 1.5)
        self.event(f"SIGTERM {target}, SIGKILL {grace:.2f}s later, down {down:.1f}s")
        await self.signal_node(target, signal.SIGTERM)
        await asyncio.sleep(grace)
        rc = self.proc(target).poll()
        if rc is None:
            await self.signal_node(target, signal.SIGKILL)
        elif rc == -signal.SIGTERM:
            # Before msmt node run's first line (the interpreter and msmt's imports):
            # no handler yet, so SIGTERM's default action ended it, as a kill would.
            # Counted, not failed; a SIGTERM later in the start is a clean stop.
            self.notes["died of SIGTERM while starting"] += 1
            self.event(f"{target} died of SIGTERM while starting (no handler yet)")
        elif rc != 0:
            self.anomaly(f"{target} exited {rc} on SIGTERM: {self.world.log_tail(target)}")
        await asyncio.sleep(down)
        self.launch(target)

    async def fault_hub_kill9(self, target: str, rng: random.Random) -> None:
        down = rng.uniform(0, 10)
        self.event(f"kill -9 nats-server, down {down:.1f}s")
        self.world.servers[0].kill()
        await asyncio.sleep(down)
        await asyncio.to_thread(self.world.servers[0].start)

    async def fault_partition(self, target: str, rng: random.Random) -> None:
        cut = rng.uniform(2, 60)
        self.event(f"partition {target} for {cut:.1f}s")
        for proxy in self.proxies[target]:
            proxy.cut()
        await asyncio.sleep(cut)
        for proxy in self.proxies[target]:
            proxy.heal()

    async def fault_submit_kill9(self, target: str, rng: random.Random) -> None:
        self.event(f"kill -9 the next msmt submit of {target} mid-stream")
        self.kill_submit[target] = True

    async def fault_sigstop(self, target: str, rng: random.Random) -> None:
        held = rng.uniform(ACK_WAIT_S + 1, ACK_WAIT_S + 20)
        self.event(f"SIGSTOP {target} for {held:.1f}s")
        await self.signal_node(target, signal.SIGSTOP)
        await asyncio.sleep(held)
        await self.signal_node(target, signal.SIGCONT)

    # --- cluster faults (--hub-servers 3) ------------------------------------------

    def server(self, i: int) -> NatsServer:
        return self.world.servers[i]

    async def restart_servers(self, indices: Sequence[int]) -> None:
        """Start the servers again on their stores; an anomaly if one is not healthy in time."""
        for i in indices:
            await asyncio.to_thread(self.server(i).start, wait=False)
        t0 = time.monotonic()
        for i in indices:
            left = HEALTHY_WITHIN_S - (time.monotonic() - t0)
            try:
                await asyncio.to_thread(self.server(i).wait_healthy, max(left, 1))
            except Exception as exc:  # noqa: BLE001 - say so and go on: heal_all tries again
                self.anomaly(f"{self.server(i).name} not healthy again: {exc}")
                return
        self.event(
            f"{', '.join(self.server(i).name for i in indices)} healthy after"
            f" {time.monotonic() - t0:.1f}s"
        )

    def attached(self, i: int) -> list[str]:
        """The nodes with a connection open to server ``i`` now (through their proxy)."""
        return [m for m in MEMBERS if self.proxies[m][i].active]

    def jsz(self, query: str = "") -> dict[str, Any] | None:
        """``/jsz`` of the first server that answers."""
        for server in self.world.servers:
            status, body = http_get(f"http://127.0.0.1:{server.http_port}/jsz{query}")
            if status == 200:
                return dict(json.loads(body))
        return None

    def leader(self, rng: random.Random) -> tuple[int, str]:
        """The meta leader's server, or the leader of a random member's inbox stream."""
        names = {s.name: i for i, s in enumerate(self.world.servers)}
        if rng.random() < 0.5:
            view = self.jsz() or {}
            leader = view.get("meta_cluster", {}).get("leader")
            if leader in names:
                return names[leader], "the meta leader"
        member = rng.choice(MEMBERS)
        view = self.jsz("?accounts=true&streams=true") or {}
        for account in view.get("account_details", []):
            for stream in account.get("stream_detail", []):
                if stream["name"] == f"INBOX_{member}":
                    leader = stream.get("cluster", {}).get("leader")
                    if leader in names:
                        return names[leader], f"INBOX_{member}'s leader"
        return rng.randrange(len(names)), "no leader known: a random server"

    async def fault_server_kill9(self, target: str, rng: random.Random) -> None:
        i, down = rng.randrange(3), rng.uniform(0, 10)
        self.event(f"kill -9 {self.server(i).name}, down {down:.1f}s")
        self.server(i).kill()
        await asyncio.sleep(down)
        await self.restart_servers([i])

    async def fault_leader_kill9(self, target: str, rng: random.Random) -> None:
        i, which = await asyncio.to_thread(self.leader, rng)
        down = rng.uniform(0, 10)
        self.event(f"kill -9 {self.server(i).name} ({which}), down {down:.1f}s")
        self.server(i).kill()
        await asyncio.sleep(down)
        await self.restart_servers([i])

    async def fault_quorum_kill9(self, target: str, rng: random.Random) -> None:
        pair = rng.sample(range(3), 2)
        down, gap = rng.uniform(5, 40), rng.uniform(0, 10)
        names = " and ".join(self.server(i).name for i in pair)
        self.event(f"kill -9 {names} at once (quorum lost), down {down:.1f}s, then {gap:.1f}s")
        for i in pair:
            self.server(i).kill()
        await asyncio.sleep(down / 2)
        await self.status_sample(rng, "quorum lost")
        await asyncio.sleep(down / 2)
        await self.restart_servers(pair[:1])
        await asyncio.sleep(gap)
        await self.restart_servers(pair[1:])

    async def fault_rolling_restart(self, target: str, rng: random.Random) -> None:
        order = rng.sample(range(3), 3)
        self.event("rolling restart: " + ", ".join(self.server(i).name for i in order))
        for i in order:
            # As an operator would: SIGTERM, start, healthy (JetStream current), next.
            await asyncio.to_thread(self.server(i).stop, 30)
            await self.restart_servers([i])
            await asyncio.sleep(rng.uniform(0, 5))

    async def fault_route_partition(self, target: str, rng: random.Random) -> None:
        i, cut, hold = rng.randrange(3), rng.uniform(5, 60), rng.random() < 0.5
        how = "dropping packets" if hold else "connections refused"
        self.event(
            f"partition {self.server(i).name} from the others ({how}) for {cut:.1f}s;"
            f" nodes on it: {self.attached(i)}"
        )
        for proxy in self.world.routes_of(i):
            if hold:
                proxy.hold()
            else:
                proxy.cut()
        await asyncio.sleep(cut / 2)
        await self.status_sample(rng, f"{self.server(i).name} partitioned")
        await asyncio.sleep(cut / 2)
        for proxy in self.world.routes_of(i):
            proxy.heal()
        await asyncio.to_thread(self.wait_cluster_healthy)

    async def fault_server_wipe(self, target: str, rng: random.Random) -> None:
        i = rng.randrange(3)
        server = self.server(i)
        self.event(f"kill -9 {server.name}, wipe its store, restart it")
        server.kill()
        await asyncio.to_thread(shutil.rmtree, server.store_dir, True)
        await self.restart_servers([i])

    async def fault_server_sigstop(self, target: str, rng: random.Random) -> None:
        i, held = rng.randrange(3), rng.uniform(10, 60)
        server = self.server(i)
        self.event(f"SIGSTOP {server.name} for {held:.1f}s; nodes on it: {self.attached(i)}")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(held / 2)
        await self.status_sample(rng, f"{server.name} stopped")
        await asyncio.sleep(held / 2)
        server.proc.send_signal(signal.SIGCONT)
        await asyncio.to_thread(self.wait_cluster_healthy)

    async def fault_link_cut(self, target: str, rng: random.Random) -> None:
        # The link to the server the node uses now, if it has one open.
        proxies = self.proxies[target]
        used = [i for i, p in enumerate(proxies) if p.active] or list(range(len(proxies)))
        i, cut, hold = rng.choice(used), rng.uniform(5, 60), rng.random() < 0.5
        how = "dropping packets" if hold else "connections refused"
        self.event(f"cut {target}'s link to {self.server(i).name} ({how}) for {cut:.1f}s")
        if hold:
            proxies[i].hold()
        else:
            proxies[i].cut()
        await asyncio.sleep(cut)
        proxies[i].heal()

    def wait_cluster_healthy(self) -> None:
        """Every server's ``/healthz`` 200 again, else an anomaly."""
        for server in self.world.servers:
            try:
                server.wait_healthy(HEALTHY_WITHIN_S)
            except Exception as exc:  # noqa: BLE001 - say so and go on
                self.anomaly(f"{server.name} not healthy after the fault: {exc}")

    async def status_sample(self, rng: random.Random, during: str) -> None:
        """What ``msmt status`` tells an operator in the middle of a hub fault."""
        member = rng.choice(MEMBERS)
        config = str(self.world.config_path(member))
        done = await asyncio.to_thread(msmt, "status", "--config", config, "--json", timeout=60)
        try:
            status = json.loads(done.stdout)
        except ValueError:
            self.event(f"{during}: msmt status {member} exited {done.returncode}: {done.stderr}")
            return
        keep = {k: status.get(k) for k in STATUS_KEYS}
        self.event(f"{during}: msmt status {member}: {json.dumps(keep)}")

    async def monitor(self) -> None:
        """Log each change of a node's ``/readyz`` and of each server's ``/healthz``."""
        seen: dict[str, str] = {}
        while not self.stopping.is_set():
            await asyncio.sleep(2)
            now: dict[str, str] = {}
            for member in MEMBERS:
                port = self.world.config(member).metrics.port
                status, body = await asyncio.to_thread(
                    http_get, f"http://127.0.0.1:{port}/readyz", 2
                )
                now[member] = f"{status} {body.strip()[:160]}" if status else "down"
            for server in self.world.servers:
                status, body = await asyncio.to_thread(
                    http_get, f"http://127.0.0.1:{server.http_port}/healthz", 2
                )
                now[server.name] = f"{status} {body.strip()[:160]}" if status else "down"
            for name, state in now.items():
                if seen.get(name) != state:
                    self.event(f"state {name}: {state}")
            seen = now

    async def watchdog(self) -> None:
        """A node that exits on its own (not killed by us) is an anomaly; restart it."""
        while not self.stopping.is_set():
            await asyncio.sleep(1)
            for member in MEMBERS:
                if member in self.busy:
                    continue
                rc = self.proc(member).poll()
                if rc is not None:
                    tail = self.world.log_tail(member)[-1500:]
                    self.anomaly(f"{member} exited by itself with {rc}: {tail}")
                    self.launch(member)

    # --- feeds -------------------------------------------------------------------

    async def submit_feed(self, member: str, seed: int) -> None:
        n = 0
        while not self.stopping.is_set():
            records = records_for(member, random.Random(seed + n).randint(3, 12), seed=seed + n)
            await self.submit_until_taken(member, records)
            n += 1
            await asyncio.sleep(random.Random(seed - n).uniform(1.0, 3.0))

    async def submit_until_taken(self, member: str, batch: list[dict[str, Any]]) -> None:
        """``msmt submit -`` until every record is answered accepted or duplicate.

        A feed resends what got no answer; after a ``submit-kill9`` it resends the
        whole batch, and a record answered ``accepted`` before must now be ``duplicate``.
        """
        config = str(self.world.config_path(member))
        by_id = {r["report_id"]: r for r in batch}
        ok: set[str] = set()  # answered accepted or duplicate at least once
        to_send = batch
        attempts = 0
        while to_send:
            attempts += 1
            if attempts > 1:
                self.resent += 1
                await asyncio.sleep(0.5)
            proc = await asyncio.create_subprocess_exec(
                MSMT, "submit", "--config", config, "-",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdin is not None
            assert proc.stdout is not None
            assert proc.stderr is not None
            kill_at = -1
            if self.kill_submit.pop(member, False):
                kill_at = min(
                    len(to_send) - 1, random.Random(attempts * 7919 + len(ok)).randint(2, 12)
                )
            lines: list[bytes] = []

            async def read(stdout: asyncio.StreamReader, lines: list[bytes]) -> None:
                while line := await stdout.readline():
                    lines.append(line)

            reading = asyncio.create_task(read(proc.stdout, lines))
            killed = False
            with contextlib.suppress(ConnectionError):
                for i, record in enumerate(to_send):
                    if i == kill_at:
                        # Mid-stream: once the node answered records (msmt submit takes
                        # seconds to start on a busy machine), with the last one in flight.
                        deadline = time.monotonic() + 30
                        while len(lines) < i - 1 and time.monotonic() < deadline:
                            if proc.returncode is not None:
                                break
                            await asyncio.sleep(0.02)
                        with contextlib.suppress(ProcessLookupError):  # it ended on its own
                            proc.kill()
                        killed = True
                        self.event(
                            f"killed msmt submit of {member}: {i} piped, {len(lines)} answered"
                        )
                        break
                    proc.stdin.write((json.dumps(record) + "\n").encode())
                    await proc.stdin.drain()
                    await asyncio.sleep(0.05)
                if not killed:
                    proc.stdin.close()
            await reading
            out = b"".join(lines)
            err = await proc.stderr.read()
            rc = await proc.wait()
            self.take_answers(member, out.decode(errors="replace"), by_id, ok)
            if rc not in (0, 2) and not killed:
                self.anomaly(f"{member} msmt submit exited {rc}: {err.decode()[-500:]}")
            to_send = batch if killed else [r for r in batch if r["report_id"] not in ok]

    def take_answers(
        self, member: str, out: str, by_id: dict[str, dict[str, Any]], ok: set[str]
    ) -> None:
        """Enter the records ``msmt submit`` printed as taken in the ledger (and ``ok``)."""
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            answer = json.loads(line)
            rid = answer.get("report_id")
            if answer.get("status") == "accepted" or answer.get("reason") == "duplicate":
                if rid in ok and answer["status"] == "accepted":
                    self.anomaly(f"{member} {rid} answered accepted twice: stored twice?")
                if answer["status"] != "accepted":
                    self.notes["submit resends answered duplicate"] += 1
                ok.add(rid)
                self.ledger[member][rid] = by_id[rid]
            elif answer.get("reason") != "unavailable":
                self.anomaly(f"{member} submit answered {answer}")

    async def spool_feed(self, member: str, seed: int) -> None:
        spool = self.world.config(member).data_dir / "spool"
        pending: dict[str, list[dict[str, Any]]] = {}
        n = 0
        last = 0.0
        while not (self.stopping.is_set() and not pending):
            if not self.stopping.is_set() and time.monotonic() - last > 3.0:
                records = records_for(member, random.Random(seed + n).randint(3, 12), seed=seed + n)
                name = f"b{n:05d}.ndjson"
                tmp = spool / f".{name}"
                tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
                tmp.rename(spool / name)
                pending[name] = records
                n += 1
                last = time.monotonic()
            for name in list(pending):
                if self.spool_filed(member, spool, name, pending[name]):
                    del pending[name]
            await asyncio.sleep(0.5)

    def spool_filed(
        self, member: str, spool: Path, name: str, records: list[dict[str, Any]]
    ) -> bool:
        """Whether the node filed ``name``; if so, take its answers into the ledger."""
        if (spool / name).exists():
            return False
        for folder in ("done", "rejected"):
            results = sorted((spool / folder).glob(f"{name}*.result.ndjson"))
            if not results:
                continue
            by_id = {r["report_id"]: r for r in records}
            ok: set[str] = set()
            for result in results:
                for line in result.read_text().splitlines():
                    answer = json.loads(line)
                    rid = answer.get("report_id")
                    if answer.get("status") == "accepted" or answer.get("reason") == "duplicate":
                        ok.add(rid)
                        self.ledger[member][rid] = by_id[rid]
            if folder == "rejected" or ok != set(by_id):
                self.anomaly(f"{member} spool {name} filed in {folder}: {len(ok)}/{len(by_id)} ok")
            return True
        return False  # moved but its result not yet visible: look again

    # --- the end -----------------------------------------------------------------

    async def heal_all(self) -> None:
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.heal()
        for proxy in self.world.route_proxies.values():
            proxy.heal()
        down = []
        for i, server in enumerate(self.world.servers):
            if server.proc is None or server.proc.poll() is not None:
                down.append(i)
            else:
                server.proc.send_signal(signal.SIGCONT)
        if down:
            await self.restart_servers(down)
        for member in MEMBERS:
            with contextlib.suppress(ProcessLookupError):
                self.proc(member).send_signal(signal.SIGCONT)
            if self.proc(member).poll() is not None:
                self.launch(member)
        for member in MEMBERS:
            await asyncio.to_thread(self.world.wait_ready, member, 120)

    async def check(self) -> list[str]:
        """Every count the promise makes, once everything has settled; the failures."""
        sent = {m: list(v.values()) for m, v in self.ledger.items()}
        want = self.world.expected(sent, MEMBERS)

        def settled() -> bool:
            got = all(
                len(set(self.world.inbox_ids(p, s))) >= len(ids) for (p, s), ids in want.items()
            )
            return got and all(self.outbox(m) == 0 for m in MEMBERS)

        # Polled every 2 s, not await_for's 50 ms: each look reads five whole stores.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not settled():  # noqa: ASYNC110 - other processes
            await asyncio.sleep(2)
        await asyncio.sleep(3)  # a second copy would show up now
        failures: list[str] = []
        for partner in MEMBERS:
            failures += await self.check_partner(partner, sent, want)
        for member in MEMBERS:
            if depth := self.outbox(member):
                failures.append(f"{member}'s outbox still holds {depth}")
        failures += self.check_originators()
        if self.servers > 1:
            failures += await self.check_cluster()
        releases = sum(len(ids) for ids in want.values())
        self.event(f"checked {sum(len(v) for v in sent.values())} accepted, {releases} releases")
        for member in MEMBERS:
            proc = self.proc(member)
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 60)
            if rc != 0:
                tail = self.world.log_tail(member)[-800:]
                failures.append(f"{member} exited {rc} on the final SIGTERM: {tail}")
        return failures + self.audit()

    async def check_partner(
        self,
        partner: str,
        sent: dict[str, list[dict[str, Any]]],
        want: dict[tuple[str, str], set[str]],
    ) -> list[str]:
        """Exactly the releases in ``partner``'s store, once each; the hub's copies."""
        failures = []
        released = 0
        for sender in sent:
            ids = want.get((partner, sender), set())
            got = self.world.inbox_ids(partner, sender)
            released += len(ids)
            if len(got) != len(set(got)):
                failures.append(f"{partner} stores {len(got) - len(set(got))} duplicate rows")
            if missing := ids - set(got):
                failures.append(f"{sender}->{partner}: {len(missing)} lost: {sorted(missing)[:5]}")
            if extra := set(got) - ids:
                failures.append(f"{sender}->{partner}: {len(extra)} extra: {sorted(extra)[:5]}")
        last_seq = await self.world.stream_stored(partner)
        if last_seq < released:
            failures.append(f"{partner}'s inbox stream stored {last_seq}, {released} released")
        elif last_seq > released:
            # A second copy at the hub: a sender stopped between the hub's ack and its
            # own record, and the hub restarted (its Nats-Msg-Id dedup forgets messages
            # already consumed) before the resend. The partner absorbs it as a duplicate
            # (no duplicate rows: checked above); docs/RELIABILITY.md says so.
            counters = self.world.counters(partner)
            dups = {k: v for k, v in counters.items() if k.startswith("duplicate.")}
            self.notes[f"hub extra copies in {partner}'s inbox"] += last_seq - released
            self.event(f"{partner}: hub stored {last_seq - released} extra copies; {dups}")
        return failures

    async def check_cluster(self) -> list[str]:
        """The cluster whole again: the meta group and every stream led at 3 replicas, current."""
        deadline = time.monotonic() + 120
        while (why := await asyncio.to_thread(self.not_whole)) and time.monotonic() < deadline:  # noqa: ASYNC110 - other processes
            await asyncio.sleep(2)
        return [f"the cluster is not whole: {why}"] if why else []

    def not_whole(self) -> str | None:
        """What keeps the cluster from being whole (``reliability_world.not_whole``), or None."""
        views: dict[str, dict[str, Any]] = {}
        for server in self.world.servers:
            query = "?accounts=true&streams=true&config=true"
            status, body = http_get(f"http://127.0.0.1:{server.http_port}/jsz{query}", 10)
            if status != 200:
                return f"{server.name} /jsz: {status} {body[:200]}"
            views[server.name] = json.loads(body)
        return not_whole(views)

    def check_originators(self) -> list[str]:
        """Each originator's store holds exactly the reports its feeds were told it took."""
        failures = []
        for member, accepted in self.ledger.items():
            path = self.world.config(member).store_path
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                own = {r for (r,) in db.execute("SELECT report_id FROM reports")}
            if own != set(accepted):
                failures.append(
                    f"{member} stores {len(own)} reports, the ledger {len(accepted)}:"
                    f" {len(own - set(accepted))} not in it, {len(set(accepted) - own)} lost"
                )
        return failures

    def outbox(self, member: str) -> int:
        store = self.world.store(member)
        try:
            return store.outbox_depth()
        finally:
            store.close()

    def audit(self) -> list[str]:
        failures = []
        dirs = [str(self.world.config(m).audit_dir) for m in MEMBERS]
        for d in dirs:
            verified = msmt("audit", "verify", d, "--keys", str(self.world.keydir))
            if verified.returncode != 0:
                failures.append(f"audit verify {d}: {(verified.stdout + verified.stderr)[-500:]}")
        replayed = msmt(
            "audit", "replay", *dirs, "--keys", str(self.world.keydir),
            "--policies", str(self.root / "nodes"), "--json", timeout=600,
        )  # fmt: skip
        (self.root / "replay.json").write_text(replayed.stdout)
        if replayed.returncode != 0 and not replayed.stdout.startswith("{"):
            return [
                *failures,
                f"audit replay exited {replayed.returncode}: {replayed.stderr[-500:]}",
            ]
        report = json.loads(replayed.stdout)
        for finding in report["findings"]:
            failures.append(f"replay finding: {json.dumps(finding)[:400]}")
        statuses = Counter(e["status"] for e in report["exchanges"] if e["recipient"] in MEMBERS)
        if set(statuses) != {"delivered"}:
            failures.append(f"replay exchanges between running members: {dict(statuses)}")
        self.event(f"replay: {dict(statuses)}, {len(report['findings'])} findings")
        return failures


async def run(root: Path, minutes: float, seed: int, chosen: Sequence[str], servers: int) -> int:
    chaos = Chaos(root, random.Random(seed), servers)
    chaos.event(f"seed {seed}, {minutes} minutes, {servers} hub server(s), root {root}")
    try:
        chaos.start()
        feeds = [
            *(
                asyncio.create_task(chaos.submit_feed(m, seed * 1000 + i * 100_000))
                for i, m in enumerate(SUBMITTERS)
            ),
            *(
                asyncio.create_task(chaos.spool_feed(m, seed * 1000 + (i + 5) * 100_000))
                for i, m in enumerate(SPOOLERS)
            ),
        ]
        watchdog = asyncio.create_task(chaos.watchdog())
        monitor = asyncio.create_task(chaos.monitor())
        await chaos.faulting(time.monotonic() + minutes * 60, chosen)
        chaos.event("healing")
        await chaos.heal_all()
        chaos.stopping.set()
        await asyncio.gather(*feeds, watchdog, monitor)
        chaos.event(f"feeds done: {sum(len(v) for v in chaos.ledger.values())} accepted")
        failures = chaos.anomalies + await chaos.check()
    finally:
        chaos.close()
    # Into the events log too: it outlives a driver whose output was lost.
    chaos.event(f"faults: {dict(chaos.faults)}; submit resends: {chaos.resent}")
    chaos.event(f"notes: {dict(chaos.notes)}")
    chaos.event("ledger: " + ", ".join(f"{m} {len(v)}" for m, v in chaos.ledger.items()))
    for failure in failures:
        chaos.event(f"FAILED: {failure}")
    if failures:
        return 1
    chaos.event("OK: nothing lost, nothing stored twice, every log verifies, replay clean")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=25)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("MSMT_FAULT_SEED", "1")))
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument(
        "--hub-servers",
        type=int,
        choices=(1, 3),
        default=1,
        help="1: a single hub; 3: a cluster, every stream at 3 replicas, routes through proxies",
    )
    parser.add_argument(
        "--faults",
        default=None,
        help="the kinds to draw from, comma-separated (default: all for the hub): "
        + ", ".join(FAULTS),
    )
    args = parser.parse_args()
    kinds = faults_for(args.hub_servers)
    chosen = [k for k in (args.faults or ",".join(kinds)).split(",") if k]
    if not chosen or set(chosen) - set(kinds):
        parser.error(
            f"--faults: with --hub-servers {args.hub_servers} choose from {', '.join(kinds)}"
        )
    root = args.root or Path(tempfile.mkdtemp(prefix="msmt-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    sys.exit(run_stoppable(run(root, args.minutes, args.seed, chosen, args.hub_servers)))


if __name__ == "__main__":
    main()
