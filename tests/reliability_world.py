"""The shared harness of the reliability suite (issue 10): members, a real hub, a steady stream.

A ``Cluster`` holds keys for all 11 members, one or three real nats-servers with
the generated accounts, node configs (each member's real ``nodes/<M>/policy.toml``
unless told otherwise) and ``msmt node run`` subprocesses. ``Feed`` submits a
steady stream of reports through the real intake socket, retrying a batch whose
answer was lost (a killed node) until every record is answered ``accepted`` or
``duplicate`` - both mean durably in the outbox. ``settle`` then checks the
promise of issue 10: every report reached every partner its originator's policy
releases it to (``Policy.decide_all``), exactly once in the store and in the
partner's inbox stream, and the audit logs replay clean and verify.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
from node_world import (
    MSMT,
    REPO,
    await_for,
    fetch,
    inbox_ids,
    msmt,
    records_for,
    wait_for,
    write_node_config,
)
from tcpproxy import TcpProxy

from broker import keys, keys_custodian, samples
from broker.config import NodeConfig, load_config
from broker.errors import ConfigError, UsageError
from broker.intake import ensure_token, submit
from broker.members import MEMBERS
from broker.natsconfig import accounts_config, inbox_stream
from broker.natsetup import InboxLimits, connect_account, setup_account
from broker.natsproc import NatsServer, free_port, make_cluster, start_cluster
from broker.natsusers import load_users
from broker.policy import Policy, load_policy
from broker.store import Store
from broker.validation import parse_record

__all__ = [
    "MSMT",
    "REPO",
    "Cluster",
    "Feed",
    "await_for",
    "fetch",
    "msmt",
    "records_for",
    "wait_for",
]


@dataclass
class Cluster:
    """Keys for all members, a real hub (1 or 3 servers) and node subprocesses."""

    root: Path
    size: int = 1
    proxied_routes: bool = False
    # Each node in a session of its own: a SIGSTOPped node then never gets the SIGHUP
    # the kernel sends a stopped process whose process group is orphaned (a driver
    # started in the background whose shell has exited).
    node_sessions: bool = False
    # The inbox consumers' ack_wait (natsetup.InboxLimits): what a SIGKILLed node had
    # fetched but not acked comes back only after it.
    ack_wait_s: float = InboxLimits().ack_wait_s
    keydir: Path = field(init=False)
    servers: list[NatsServer] = field(init=False)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    urls: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    route_proxies: dict[tuple[int, int], TcpProxy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keydir = self.root / "keys"
        keys_custodian.init_keys(self.keydir, MEMBERS, now=datetime.now(UTC) - timedelta(days=1))
        self.servers = []
        try:
            self.servers = self.make_servers(accounts_config(load_users(self.keydir)))
            self._start()
        except BaseException:
            # The fixture never gets the cluster to close: stop what started here,
            # or its servers outlive the test and its proxies' sockets fail a later one.
            self.close()
            raise

    def _start(self) -> None:
        if self.size == 1:
            self.servers[0].start()
        else:
            start_cluster(self.servers)
        limits = InboxLimits(replicas=min(self.size, 3), ack_wait_s=self.ack_wait_s)

        async def setup() -> None:
            for account in (*MEMBERS, keys.AUDIT_ACCOUNT):
                # A cluster just started may, on a loaded machine, not answer at all
                # (setup itself waits for a peer not yet counted for placement): the
                # setup says to run it again, since it changes only what differs.
                for attempt in range(20):
                    try:
                        await setup_account(self.hub_urls[0], account, self.seed(account), limits)
                        break
                    except ConfigError as exc:
                        if "did not answer" not in str(exc) or attempt == 19:
                            raise
                        await asyncio.sleep(0.5)

        # A test's event loop may already be running here: set up on a thread of its own.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, setup()).result()

    def make_servers(self, extra_config: str) -> list[NatsServer]:
        """Build (not start) the hub's servers, with the accounts' configuration.

        With ``proxied_routes``, server i dials server j through its own proxy
        ``route_proxies[i, j]``, so one server can be cut off from the others
        (``routes_of``). Each server then advertises a route address nobody
        listens on, so no server learns another's real cluster port by gossip and
        routes round the proxies; ``no_advertise`` keeps clients to the URLs they
        were given (a node's proxies, if it has any).
        """
        if self.size == 1:
            return [NatsServer(workdir=self.root / "nats", extra_config=extra_config)]
        if not self.proxied_routes:
            return make_cluster(self.root / "nats", self.size, extra_config)
        ports = [free_port() for _ in range(self.size)]
        servers = []
        for i in range(self.size):
            routes = []
            for j in range(self.size):
                if j != i:
                    proxy = self.route_proxies[i, j] = TcpProxy(ports[j])
                    proxy.start()
                    routes.append(proxy.port)
            servers.append(
                NatsServer(
                    workdir=self.root / "nats",
                    name=f"n{i + 1}",
                    extra_config=extra_config,
                    cluster_port=ports[i],
                    cluster_name="msmt",
                    routes=routes,
                    cluster_lines=["no_advertise: true", f'advertise: "127.0.0.1:{free_port()}"'],
                )
            )
        return servers

    def whole(self) -> bool:
        """Whether every server is healthy and the hub whole (``not_whole``): 3 servers only.

        A server rejoining after a partition may answer for a stream it no longer
        leads, from its old state, until then.
        """
        if not all(s.healthy() for s in self.servers):
            return False
        query = "/jsz?accounts=true&streams=true&config=true"
        views = {
            s.name: json.loads(fetch(f"http://127.0.0.1:{s.http_port}{query}"))
            for s in self.servers
        }
        return not_whole(views) is None

    def routes_of(self, server: int) -> list[TcpProxy]:
        """Every route proxy to and from ``servers[server]`` (``proxied_routes`` only)."""
        return [p for (a, b), p in self.route_proxies.items() if server in (a, b)]

    @property
    def hub_urls(self) -> list[str]:
        """Every server's client URL."""
        return [s.url for s in self.servers]

    def seed(self, account: str) -> bytes:
        """An account's NATS nkey seed."""
        return (self.keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()

    def close(self) -> None:
        """Kill every node and server this cluster started."""
        for member in list(self.procs):
            self.kill(member)
        for server in self.servers:
            server.kill()
        for proxy in self.route_proxies.values():
            proxy.stop()

    # --- configuration ---------------------------------------------------------

    def config_path(self, member: str) -> Path:
        return self.root / "nodes" / member / "node.toml"

    def config(self, member: str) -> NodeConfig:
        return load_config(self.config_path(member), env={})

    def write_config(
        self, member: str, policy_text: str | None = None, urls: list[str] | None = None
    ) -> None:
        """Write ``node.toml`` and the policy (the member's real one by default)."""
        self.urls[member] = urls or self.hub_urls
        write_node_config(self.root, member, self.urls[member], policy_text)

    def policy(self, member: str) -> Policy:
        text = (self.root / "nodes" / member / "policy.toml").read_text()
        return load_policy(text, member=member)

    # --- node processes ----------------------------------------------------------

    def start(self, member: str, **env: str) -> None:
        """Start ``msmt node run`` for ``member`` and wait until it is ready."""
        self.launch(member, **env)
        self.wait_ready(member)

    def start_many(self, members: Sequence[str], **env: str) -> None:
        """Start several nodes at once (their start-up overlaps), then wait for each."""
        for member in members:
            self.launch(member, **env)
        for member in members:
            self.wait_ready(member)

    def launch(self, member: str, **env: str) -> None:
        """Start ``msmt node run`` for ``member`` without waiting."""
        self.env[member] = {**self.env.get(member, {}), **env}
        with (self.root / f"{member}.log").open("ab") as log:
            self.procs[member] = subprocess.Popen(
                [MSMT, "node", "run", "--config", str(self.config_path(member))],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env[member]},
                start_new_session=self.node_sessions,
            )

    def wait_ready(self, member: str, timeout: float = 60) -> None:
        port = self.config(member).metrics.port
        proc = self.procs[member]

        def ready() -> bool:
            if proc.poll() is not None:
                return True
            try:
                fetch(f"http://127.0.0.1:{port}/readyz")  # 503 (not ready) raises
            except OSError:
                return False
            return True

        wait_for(ready, timeout, f"{member} ready")
        assert proc.poll() is None, self.log_tail(member)

    def kill(self, member: str) -> None:
        """SIGKILL the member's node, as a crash would."""
        proc = self.procs.pop(member)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def alive(self, member: str) -> bool:
        return member in self.procs and self.procs[member].poll() is None

    def rss(self, member: str) -> int:
        return int(psutil.Process(self.procs[member].pid).memory_info().rss)

    def log_tail(self, member: str) -> str:
        return (self.root / f"{member}.log").read_text(errors="replace")[-3000:]

    # --- feeding and reading -----------------------------------------------------

    async def submit(self, member: str, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Submit NDJSON records to the member's intake socket; return every answer."""
        config = self.config(member)
        body = samples.to_ndjson(list(records)).encode()

        async def chunks() -> AsyncIterator[bytes]:
            yield body

        answers: list[dict[str, Any]] = []
        await submit(config.socket_path, ensure_token(config.token_path), chunks(), answers.append)
        return answers

    def store(self, member: str) -> Store:
        return Store(self.config(member).store_path, readonly=True)

    def inbox_ids(self, member: str, sender: str) -> list[str]:
        return inbox_ids(self.config(member).store_path, sender)

    def counters(self, member: str) -> dict[str, int]:
        store = self.store(member)
        try:
            return store.counters()
        finally:
            store.close()

    async def stream_stored(self, member: str) -> int:
        """How many messages ``member``'s inbox stream ever stored (the hub's own count).

        Its last sequence: the node's acks remove messages (interest retention),
        a second copy or a forged one would still have taken a sequence.
        """
        nc = await connect_account(self.hub_urls[0], member, self.seed(member))
        try:
            info = await nc.jetstream().stream_info(inbox_stream(member))
            return int(info.state.last_seq)
        finally:
            await nc.close()

    # --- the promise ---------------------------------------------------------------

    def expected(
        self, sent: dict[str, list[dict[str, Any]]], partners: Sequence[str]
    ) -> dict[tuple[str, str], set[str]]:
        """(partner, sender) -> report ids the sender's policy releases to that partner."""
        want: dict[tuple[str, str], set[str]] = defaultdict(set)
        for sender, records in sent.items():
            policy = self.policy(sender)
            for record in records:
                decisions = policy.decide_all(parse_record(json.dumps(record)))
                for partner, decision in decisions.items():
                    if partner in partners and decision.sends:
                        want[(partner, sender)].add(record["report_id"])
        return want

    async def settle(
        self,
        sent: dict[str, list[dict[str, Any]]],
        members: Sequence[str],
        within: float = 180,
        hub_copies: Mapping[str, int] | None = None,
    ) -> dict[tuple[str, str], set[str]]:
        """Wait for every release to arrive; assert exactly once, replay clean, logs verify.

        ``hub_copies`` names the second copies a partner's inbox stream is known to
        hold (a resend the hub's restart kept it from deduplicating): the store must
        still hold each report once.
        """
        want = self.expected(sent, members)
        assert want, "the stream released nothing: the check would be empty"

        def arrived() -> bool:
            return all(len(self.inbox_ids(p, s)) >= len(ids) for (p, s), ids in want.items())

        await await_for(arrived, within, "every release delivered")
        await asyncio.sleep(1.0)  # anything extra (a second copy) would show up now
        for partner in members:
            released = 0
            for sender in sent:
                ids = want.get((partner, sender), set())
                got = self.inbox_ids(partner, sender)
                assert len(got) == len(set(got)), (partner, sender)
                assert set(got) == ids, (partner, sender, len(set(got) ^ ids))
                released += len(ids)
            # The hub stored exactly one copy of each: its dedup held through the faults.
            extra = (hub_copies or {}).get(partner, 0)
            assert await self.stream_stored(partner) == released + extra, partner
        self.reconcile(members)
        return want

    def reconcile(self, members: Sequence[str]) -> None:
        """``msmt audit verify`` each node's log, then ``msmt audit replay`` them together."""
        dirs = [str(self.config(m).audit_dir) for m in members]
        # The verifications run side by side: each is its own process anyway.
        verifying = [
            subprocess.Popen(
                [MSMT, "audit", "verify", d, "--keys", str(self.keydir)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for d in dirs
        ]
        for proc in verifying:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, out + err
        replayed = msmt(
            "audit", "replay", *dirs, "--keys", str(self.keydir),
            "--policies", str(self.root / "nodes"), "--json",
        )  # fmt: skip
        assert replayed.returncode == 0, replayed.stdout[-2000:] + replayed.stderr
        report = json.loads(replayed.stdout)
        assert report["findings"] == []
        statuses = Counter(e["status"] for e in report["exchanges"] if e["recipient"] in members)
        assert set(statuses) == {"delivered"}, statuses


@dataclass
class Feed:
    """A steady stream of reports into publishing members' intake, surviving node kills.

    Each batch is retried until every record is answered ``accepted`` or
    ``duplicate`` (a kill can lose the answer after the commit); ``sent`` then
    holds exactly the records that are durably in each outbox.
    """

    cluster: Cluster
    publishers: Sequence[str]
    batch: int = 4
    interval: float = 0.25
    seed: int = 1000
    sent: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    retries: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def finish(self) -> dict[str, list[dict[str, Any]]]:
        """Stop after the batch in hand is fully accepted; return what was sent."""
        self.stop.set()
        assert self._task is not None
        await self._task
        return dict(self.sent)

    def total(self) -> int:
        return sum(len(v) for v in self.sent.values())

    async def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            member = self.publishers[n % len(self.publishers)]
            records = records_for(member, self.batch, seed=self.seed + n)
            await self.deliver(member, records)
            n += 1
            await asyncio.sleep(self.interval)

    async def deliver(
        self, member: str, records: list[dict[str, Any]], within: float = 120
    ) -> None:
        """Submit until every record is durably accepted (or known to be from before)."""
        deadline = time.monotonic() + within
        while True:
            try:
                answers = await self.cluster.submit(member, records)
            except UsageError:
                answers = []
            ok = [a for a in answers if a["status"] == "accepted" or a.get("reason") == "duplicate"]
            if len(ok) == len(records):
                self.sent[member].extend(records)
                return
            unexpected = [a for a in answers if a.get("reason") not in (None, "duplicate")]
            assert all(a.get("reason") == "unavailable" for a in unexpected), unexpected
            self.retries += 1
            assert time.monotonic() < deadline, f"{member} did not take a batch in {within}s"
            await asyncio.sleep(0.3)


def not_whole(views: Mapping[str, dict[str, Any]]) -> str | None:
    """What keeps a 3-server hub from being whole, from each server's ``/jsz``, or None.

    ``views``: server name -> its ``/jsz?accounts=true&streams=true&config=true``.
    Whole: the meta group and every stream (each member's inbox and archive)
    configured for 3 replicas, with a leader that reports both other replicas
    current. Only a leader knows whether its followers are current, so each group
    is judged by its leader's own report.
    """
    leader = next(iter(views.values())).get("meta_cluster", {}).get("leader")
    if leader not in views:
        return f"no meta leader: {leader}"
    meta = views[leader]["meta_cluster"]
    current = sorted(r["name"] for r in meta.get("replicas", []) if r.get("current"))
    if meta.get("cluster_size") != 3 or current != sorted(set(views) - {leader}):
        return f"meta group as its leader {leader} sees it: {meta}"
    led: dict[str, dict[str, Any]] = {}
    for name, view in views.items():
        for account in view.get("account_details", []):
            for stream in account.get("stream_detail", []):
                if stream.get("cluster", {}).get("leader") == name:
                    led[stream["name"]] = stream
    wanted = {f"INBOX_{m}" for m in MEMBERS} | {f"AUDIT_ARCHIVE_{m}" for m in MEMBERS}
    if missing := wanted - set(led):
        return f"streams without a leader: {sorted(missing)}"
    for stream in led.values():
        cluster = stream["cluster"]
        current = [r["name"] for r in cluster.get("replicas", []) if r.get("current")]
        if stream["config"]["num_replicas"] != 3 or len(current) != 2:
            return f"stream {stream['name']}: {cluster}"
    return None


def fault_rng(name: str) -> tuple[random.Random, int]:
    """A seeded RNG for fault timing; the seed is MSMT_FAULT_SEED (or fixed) and is printed."""
    seed = int(os.environ.get("MSMT_FAULT_SEED", "20261129"))
    print(f"{name}: fault seed {seed} (set MSMT_FAULT_SEED={seed} to reproduce)")
    return random.Random(f"{name}:{seed}"), seed


Check = Callable[[], bool]
