"""End to end: 1 publishing node, 10 receiving nodes and a hub, against the floors.

    python bench/e2e.py [--quick] [--reports N] [--rate R] [--latency-seconds S]

One process tree on this machine: a real nats-server with the generated member
accounts and inboxes, and 11 ``msmt node run`` subprocesses; every node's
policy releases everything to every partner (written into the scratch
directory; ``nodes/`` is not used). JPN is fed through its intake socket;
the other ten only receive. In order:

1. throughput: N reports submitted as fast as intake takes them; timed from
   the first report's acceptance (JPN store ``accepted_at``) to the last
   delivery stored and verified at a partner (partner store ``received_at``);
   the CPU time of every process over the phase (psutil) and the messages into
   and out of the hub (its ``/varz``); in the full run the resident memory of
   every node (with its children), sampled each second.
2. latency: reports offered at a fixed rate (default 100/s), one per write;
   per report, accepted at JPN -> stored at the last of the 10 partners. Then
   the witnessing of that phase: once every log's latest checkpoint is cosigned
   by all 10 witnesses (or 30 s passed), the checkpoints each log signed in the
   phase, counted by their verified cosignatures.
3. the nodes stop (SIGTERM, exit 0 expected); counts are checked: every
   partner stored exactly every report, JPN's outbox holds nothing unsent.
   Anything lost or extra is a non-zero exit.
4. floors in the same run: the crypto floor (``bench.floors.CryptoFloor`` on
   the sizes of these very reports) and the messaging floor (bare nats-py
   publish of the same number and sizes of payloads into the same inboxes,
   pulled and acked concurrently through the same durable consumers).

Ratios are ours / floor in reports per second: 1.0 would mean our code adds
nothing; the targets are >= 0.5 of the crypto floor and >= 300 reports/s.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from floors import CryptoFloor, publish_floor, pull_floor
from joserfc.jwk import OKPKey
from sigterm import run_stoppable

from broker import envelope, keys, keys_custodian, keys_roster, samples, sdjwt
from broker.checkpoint import (
    count_cosignatures,
    open_checkpoint,
    roster_log_keys,
    roster_witness_keys,
)
from broker.config import load_config
from broker.intake import ensure_token, submit
from broker.members import MEMBERS
from broker.natsconfig import accounts_config
from broker.natsetup import InboxLimits, setup_account
from broker.natsproc import NatsServer, free_port
from broker.natsusers import load_users
from broker.roster import Roster
from broker.validation import parse_record

ORIGIN = "JPN"
PARTNERS = [m for m in MEMBERS if m != ORIGIN]
MSMT = str(Path(sys.executable).parent / "msmt")
POLICY = """version = 1
member = "{member}"

[[rules]]
name = "everything-to-everyone"
kinds = ["*"]
partners = ["MSMT"]
release = ["*"]
"""


class LostError(SystemExit):
    """Something was lost, duplicated or a node failed: the run's figures mean nothing."""

    def __init__(self, what: str) -> None:
        super().__init__(f"FAILED: {what}")


def make_records(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` JPN reports of all three kinds, each releasable to every partner."""
    records = samples.generate(count, seed=seed, originators=(ORIGIN,), now=datetime.now(UTC))
    for record in records:
        record["tlp"] = "AMBER"
        record.pop("rel_to", None)
    return records


class BigStoreServer(NatsServer):
    """The project's test server, with room for 10 inboxes of 100,000 envelopes each."""

    def render_config(self) -> str:
        # The bench's account quotas (inboxes sized for the run) must fit the store's
        # reservation; it is a bound, not disk the server takes.
        config = super().render_config()
        assert "max_file_store: 16GB" in config, "the base config changed"
        return config.replace("max_file_store: 16GB", "max_file_store: 1TB")


@dataclass
class Cluster:
    """Keys, a hub with every member's account and inbox, and node subprocesses."""

    root: Path
    members: Sequence[str]
    server: NatsServer | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    _stores: dict[str, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.server is not None, "the hub starts first"
        return self.server.url

    @property
    def keydir(self) -> Path:
        return self.root / "keys"

    def config_path(self, member: str) -> Path:
        return self.root / "nodes" / member / "node.toml"

    def store_path(self, member: str) -> Path:
        if member not in self._stores:
            self._stores[member] = load_config(self.config_path(member), env={}).store_path
        return self._stores[member]

    async def start_hub(self, inbox_bytes: int) -> None:
        keys_custodian.init_keys(self.keydir, MEMBERS, now=datetime.now(UTC) - timedelta(days=1))
        # One server: one replica of each stream counts against an account's quota.
        accounts = accounts_config(load_users(self.keydir), replicas=1, inbox_bytes=inbox_bytes)
        self.server = BigStoreServer(
            workdir=self.root / "nats", extra_config=accounts, sync_always=True
        )
        self.server.start()
        limits = InboxLimits(max_bytes=inbox_bytes)
        for account in (*MEMBERS, keys.AUDIT_ACCOUNT):
            seed = (self.keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()
            await setup_account(self.server.url, account, seed, limits)

    def write_configs(self) -> None:
        for member in self.members:
            folder = self.root / "nodes" / member
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "policy.toml").write_text(POLICY.format(member=member))
            self.ports[member] = free_port()
            (folder / "node.toml").write_text(
                f'member = "{member}"\nbase_dir = "../.."\n'
                f'policy = "nodes/{member}/policy.toml"\ndata_dir = "data/{member}"\n'
                f"[nats]\nurls = [{json.dumps(self.url)}]\n"
                f'[keys]\ndir = "keys"\n[metrics]\nlisten = "127.0.0.1:{self.ports[member]}"\n'
                # The full run's 100,000 reports would pass the default daily budget.
                "[limits]\nsender_bytes_per_day = 1099511627776\n"
            )

    def start_nodes(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
        (self.root / "logs").mkdir(exist_ok=True)
        for member in self.members:
            with (self.root / "logs" / f"{member}.log").open("ab") as log:
                self.procs[member] = subprocess.Popen(
                    [MSMT, "node", "run", "--config", str(self.config_path(member))],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
        deadline = time.monotonic() + 60
        for member in self.members:
            while not self._ready(member):
                if self.procs[member].poll() is not None or time.monotonic() > deadline:
                    raise LostError(f"{member} did not become ready: {self.log_tail(member)}")
                time.sleep(0.1)

    def _ready(self, member: str) -> bool:
        url = f"http://127.0.0.1:{self.ports[member]}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            # HTTPException: a port pinned inside the ephemeral range, not bound yet,
            # can connect to itself and read its own request back (a helper's run).
            return False

    def hub_messages(self) -> tuple[int, int]:
        """Messages into and out of the hub so far (its ``/varz``), every client together."""
        assert self.server is not None
        url = f"http://127.0.0.1:{self.server.http_port}/varz"
        with urllib.request.urlopen(url, timeout=10) as r:
            varz = json.loads(r.read())
        return int(varz["in_msgs"]), int(varz["out_msgs"])

    def log_tail(self, member: str) -> str:
        return (self.root / "logs" / f"{member}.log").read_text(errors="replace")[-2000:]

    def processes(self) -> dict[str, psutil.Process]:
        out = {m: psutil.Process(p.pid) for m, p in self.procs.items()}
        assert self.server is not None
        assert self.server.proc is not None
        out["nats-server"] = psutil.Process(self.server.proc.pid)
        out["bench"] = psutil.Process()
        return out

    def stop_nodes(self) -> dict[str, int]:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        return {m: p.wait(timeout=60) for m, p in self.procs.items()}

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.server is not None:
            self.server.kill()

    async def feed(self, records: list[dict[str, Any]], rate: float | None = None) -> None:
        """Submit to JPN's intake: in 64 KiB chunks, or one record per write at ``rate``/s."""
        config = load_config(self.config_path(ORIGIN), env={})
        lines = [samples.to_ndjson([r]).encode() for r in records]

        async def chunks() -> AsyncIterator[bytes]:
            if rate is None:
                body = b"".join(lines)
                for i in range(0, len(body), 1 << 16):
                    yield body[i : i + (1 << 16)]
                return
            start = time.monotonic()
            for i, line in enumerate(lines):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                yield line

        answers: list[dict[str, Any]] = []
        await submit(config.socket_path, ensure_token(config.token_path), chunks(), answers.append)
        bad = [a for a in answers if a["status"] != "accepted"]
        if len(answers) != len(records) or bad:
            raise LostError(f"intake answered {len(answers)}/{len(records)}, refused {bad[:2]}")


def read_rows(path: Path, sql: str, args: Sequence[Any] = ()) -> list[Any]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


class Delivered:
    """Each partner's count of reports stored from JPN, read incrementally.

    A fresh ``count(*)`` of the inbox every quarter second costs the driver time
    in proportion to what is stored (a tenth of a core near the end of a
    100,000-report run), taken from the nodes it measures; rows are only ever
    added during a run, so each poll counts the rows after the last one seen.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.counts = dict.fromkeys(PARTNERS, 0)
        self._last_rowid = dict.fromkeys(PARTNERS, 0)

    def poll(self) -> dict[str, int]:
        """Every partner's count now."""
        for member in PARTNERS:
            path = self.cluster.store_path(member)
            if not path.exists():
                continue
            ((new, last),) = read_rows(
                path,
                "SELECT count(*), max(rowid) FROM inbox WHERE rowid > ? AND sender = ?",
                (self._last_rowid[member], ORIGIN),
            )
            if last is not None:
                self.counts[member] += int(new)
                self._last_rowid[member] = int(last)
        return dict(self.counts)


def cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds (user + system) of each process itself."""
    out = {}
    for name, proc in procs.items():
        t = proc.cpu_times()
        out[name] = t.user + t.system
    return out


def tree_cpu_seconds(procs: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds of each node with its live children (the planning worker).

    The bench process itself counts alone: its children are the nodes and the hub.
    """
    out = cpu_seconds(procs)
    for name, proc in procs.items():
        if name in MEMBERS:
            out[name] += sum(sum(c.cpu_times()[:2]) for c in proc.children(recursive=True))
    return out


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a node and its live children (the planning worker)."""
    total: int = proc.memory_info().rss
    return total + sum(int(c.memory_info().rss) for c in proc.children(recursive=True))


@dataclass
class Memory:
    """RSS samples per node over a phase: (reports delivered so far, MiB)."""

    samples: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def add(self, name: str, progress: int, rss: int) -> None:
        self.samples.setdefault(name, []).append((progress, rss / 2**20))

    def summary(self, name: str, total: int) -> str:
        points = self.samples.get(name, [])
        if len(points) < 2:
            return f"{name}: too few samples"

        def at(frac: float) -> float:
            want = frac * total
            return min(points, key=lambda p: abs(p[0] - want))[1]

        marks = [at(f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)]
        later = [mib for progress, mib in points if progress >= 0.1 * total]
        growth = (max(later) - marks[0]) / marks[0] if later else 0.0
        curve = " ".join(f"{m:.0f}" for m in marks)
        return (
            f"{name:>8}: RSS MiB at 10/25/50/75/100% = {curve};"
            f" peak {max(p[1] for p in points):.0f}; growth after 10% {growth * 100:+.1f}%"
        )


async def wait_all(
    cluster: Cluster, want: int, within: float, memory: Memory | None = None, offset: int = 0
) -> None:
    """Wait until every partner stored ``want`` reports from JPN; sample RSS meanwhile."""
    procs = cluster.processes()
    deadline = time.monotonic() + within
    last_sample = 0.0
    delivered = Delivered(cluster)
    while True:
        counts = delivered.poll()
        if memory is not None and time.monotonic() - last_sample >= 1.0:
            last_sample = time.monotonic()
            progress = min(counts.values()) - offset
            for name in (ORIGIN, *PARTNERS):
                memory.add(name, progress, tree_rss(procs[name]))
        if all(c >= want for c in counts.values()):
            return
        dead = [m for m, p in cluster.procs.items() if p.poll() is not None]
        if dead:
            raise LostError(f"node {dead[0]} died: {cluster.log_tail(dead[0])}")
        if time.monotonic() > deadline:
            raise LostError(f"timed out; delivered per partner {counts} of {want}")
        await asyncio.sleep(0.25)


def timings(
    cluster: Cluster, ids: Sequence[str]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per report id: JPN's accepted_at, and the first and the last partner's received_at."""
    wanted = set(ids)
    accepted = {
        rid: at
        for rid, at in read_rows(
            cluster.store_path(ORIGIN), "SELECT report_id, accepted_at FROM reports"
        )
        if rid in wanted
    }
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for member in PARTNERS:
        rows = read_rows(
            cluster.store_path(member),
            "SELECT report_id, received_at FROM inbox WHERE sender = ?",
            (ORIGIN,),
        )
        for rid, at in rows:
            if rid in wanted:
                first[rid] = min(first.get(rid, at), at)
                last[rid] = max(last.get(rid, 0.0), at)
    return accepted, first, last


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def by_second(latencies: Sequence[float], rate: float, most: int = 30) -> str:
    """p50 / p99 of each stretch of the fixed-rate phase, in feed order, as one line.

    The phase's p99 says how bad the tail is, not when: a queue built while the
    receivers wake from the pause before the phase, or one that grows over it,
    looks the same in it. Stretches are a second long, longer past ``most`` seconds.
    """
    seconds = max(1, math.ceil(len(latencies) / rate / most))
    size = max(1, round(rate * seconds))
    parts = []
    for i in range(0, len(latencies), size):
        part = latencies[i : i + size]
        parts.append(f"{percentile(part, 0.5) * 1e3:.0f}/{percentile(part, 0.99) * 1e3:.0f}")
    return f"{seconds} s of the phase: {' '.join(parts)}"


def check_counts(cluster: Cluster, ids: Sequence[str]) -> None:
    """Every partner holds exactly these reports from JPN; JPN sent every envelope."""
    want = set(ids)
    for member in PARTNERS:
        rows = read_rows(
            cluster.store_path(member), "SELECT report_id FROM inbox WHERE sender = ?", (ORIGIN,)
        )
        got = [r[0] for r in rows]
        if len(got) != len(want) or set(got) != want:
            raise LostError(f"{member} stored {len(got)} reports, expected {len(want)}")
        rejected = read_rows(
            cluster.store_path(member),
            "SELECT name, value FROM counters WHERE name LIKE 'rejected.%'",
        )
        if rejected:
            raise LostError(f"{member} rejected messages: {rejected}")
    rows = read_rows(
        cluster.store_path(ORIGIN), "SELECT state, count(*) FROM outbox GROUP BY state"
    )
    states = dict(rows)
    if states != {"sent": len(want) * len(PARTNERS)}:
        raise LostError(f"JPN outbox states {states}, expected {len(want) * len(PARTNERS)} sent")


def audit_batches(cluster: Cluster) -> str:
    """Audit entries per signed checkpoint (= per commit) at JPN and the receivers' mean."""
    out = []
    for member in (ORIGIN, "USA"):
        path = audit_path(cluster, member)
        entries = read_rows(path, "SELECT count(*) FROM entries")[0][0]
        commits = read_rows(path, "SELECT count(*) FROM checkpoints")[0][0]
        out.append(
            f"{member} {entries} entries in {commits} commits ({entries / commits:.1f} each)"
        )
    return "; ".join(out)


def log_sizes(cluster: Cluster) -> dict[str, int]:
    """Entries in every node's audit log now."""
    return {
        m: read_rows(audit_path(cluster, m), "SELECT count(*) FROM entries")[0][0] for m in MEMBERS
    }


def audit_path(cluster: Cluster, member: str) -> Path:
    """The SQLite file of ``member``'s audit log."""
    return load_config(cluster.config_path(member), env={}).audit_dir / "audit.sqlite"


@dataclass
class Witnessing:
    """Verified cosignatures on the checkpoints each log signed in the fixed-rate phase."""

    phase: dict[str, list[int]]
    """Per log: cosignatures on each checkpoint signed in the phase that has any, its last
    one (cosigned at rest, so by all, and counted in ``last``) left out."""
    last: dict[str, int]
    """Per log: cosignatures on its latest checkpoint once the logs were at rest."""
    waited: float

    def lines(self, seconds: float) -> list[str]:
        witnesses = len(MEMBERS) - 1
        majority = witnesses // 2 + 1

        def spread(values: Sequence[int]) -> str:
            ordered = sorted(values)
            return f"median {ordered[len(ordered) // 2]}, least {ordered[0]}"

        def count(at_least: int) -> list[int]:
            return [sum(1 for n in ns if n >= at_least) for ns in self.phase.values()]

        most = [max(ns, default=0) for ns in self.phase.values()]
        cosigned = [len(ns) for ns in self.phase.values()]
        short = {m: n for m, n in self.last.items() if n < witnesses}
        return [
            f"witnessing over the {seconds:.0f} s phase, per log (of {len(MEMBERS)}), its"
            f" checkpoints signed in it but the last, cosigned: by any {spread(cosigned)};"
            f" by 3 or more {spread(count(3))}; by a majority ({majority} of {witnesses})"
            f" {spread(count(majority))}; the most on one {spread(most)}",
            f"  at rest ({self.waited:.1f} s after the phase): "
            + (
                f"every log's latest checkpoint cosigned by all {witnesses}"
                if not short
                else "latest checkpoint NOT cosigned by all "
                + ", ".join(f"{m} {n}/{witnesses}" for m, n in sorted(short.items()))
            ),
        ]


def cosignatures(
    cluster: Cluster, member: str, after: int, roster: Roster, upto: int | None = None
) -> list[tuple[int, int]]:
    """(size, verified cosignatures) of ``member``'s checkpoints after ``after`` (to ``upto``)."""
    log_keys = roster_log_keys(roster, member)
    witnesses = roster_witness_keys(roster, [m for m in MEMBERS if m != member])
    rows = read_rows(
        audit_path(cluster, member),
        "SELECT size, note FROM checkpoints WHERE size > ? AND size <= ? ORDER BY size",
        (after, upto if upto is not None else 2**62),
    )
    out = []
    for size, note in rows:
        _, parsed = open_checkpoint(note, log_keys)
        out.append((int(size), len(count_cosignatures(parsed, witnesses))))
    return out


async def witnessing(
    cluster: Cluster, before: dict[str, int], after: dict[str, int], within: float = 30.0
) -> Witnessing:
    """Wait for the witnesses to cosign every log's latest checkpoint, then count the phase's.

    A round under load does its work up to 4.5 s after it took its checkpoints,
    so the phase's counts are read once the logs are at rest: then every witness
    cosigns every log's latest checkpoint (docs/NODE.md), or the wait times out.
    """
    roster = keys_roster.load_signed_roster(cluster.keydir).roster
    witnesses = len(MEMBERS) - 1
    start = time.monotonic()
    while True:
        last = {}
        for member in MEMBERS:
            latest = cosignatures(cluster, member, after[member] - 1, roster)
            last[member] = latest[-1][1] if latest else 0
        waited = time.monotonic() - start
        if all(n == witnesses for n in last.values()) or waited > within:
            break
        await asyncio.sleep(0.5)
    phase = {
        m: [n for _, n in cosignatures(cluster, m, before[m], roster, after[m] - 1) if n]
        for m in MEMBERS
    }
    return Witnessing(phase=phase, last=last, waited=waited)


def crypto_floors(records: list[dict[str, Any]]) -> list[CryptoFloor]:
    """One floor per kind, on the sizes of an envelope of that kind with everything released."""
    key = OKPKey.generate_key("Ed25519")
    enc = OKPKey.generate_key("X25519")
    floors = []
    for record in records[:3]:  # samples.generate cycles through the three kinds
        sighting = parse_record(json.dumps(record).encode())
        issued = envelope.issue(
            sighting,
            signing_key=key,
            kid="JPN-sig-0123456789",
            policy_digest="x" * 64,
            now=datetime.now(UTC),
        )
        # As encrypted: the presentation with its padding (docs/ENVELOPE.md §4.1).
        presentation = sdjwt.join_presentation(issued.jws, issued.disclosures.values())
        plaintext = envelope.padded([presentation])[0]
        token = envelope.present(
            issued,
            disclosure_keys=list(issued.disclosures),
            recipient="USA",
            recipient_kid="USA-enc-0123456789",
            recipient_key=enc,
        )
        floors.append(
            CryptoFloor(
                plaintext, token.split(".")[0].encode(), issued.jws.rpartition(".")[0].encode()
            )
        )
    return floors


def floor_rates(floors: list[CryptoFloor]) -> tuple[float, float, float]:
    """Reports per CPU second: whole report, send side only, receive side only (all 10)."""

    def whole() -> None:
        for f in floors:
            f.report()

    def send() -> None:
        for f in floors:
            f.send()

    def receive() -> None:
        for f in floors:
            for _ in range(len(PARTNERS)):
                f.receive_one()

    n = len(floors)
    return tuple(n * floors[0].rate(fn) for fn in (whole, send, receive))  # type: ignore[return-value]


async def messaging_floor(
    cluster: Cluster, count: int, batch: int
) -> tuple[float, dict[str, float], tuple[int, int]]:
    """Wall and CPU seconds to publish ``count`` x 10 envelope-sized payloads and pull+ack them.

    The CPU is the hub's and this process's (the bare clients) over the floor; the
    nodes are stopped by then, so nothing else of the tree runs. Also returns the
    messages into and out of the hub over the floor.
    """
    # The first ``count`` envelopes of each partner, in the order they were sent,
    # not the first ``count`` x 10 rows: rows are moved as their acks are recorded,
    # in ack order, so a cut across them can hold one partner's envelope more than
    # another's, and the short partner's puller then waits for messages never sent
    # (the full run: "NLD got 19983 of 20000 messages").
    sizes_rows = read_rows(
        cluster.store_path(ORIGIN),
        "SELECT subject, bytes FROM (SELECT rowid, subject,"
        " json_extract(audit, '$.bytes') AS bytes,"
        " row_number() OVER (PARTITION BY partner ORDER BY rowid) AS n FROM outbox)"
        " WHERE n <= ? ORDER BY rowid",
        (count,),
    )
    subjects = [r[0] for r in sizes_rows]
    sizes = [int(r[1]) for r in sizes_rows]
    assert cluster.server is not None
    assert cluster.server.proc is not None
    procs = {"nats-server": psutil.Process(cluster.server.proc.pid), "bench": psutil.Process()}
    msgs0 = cluster.hub_messages()
    cpu0 = cpu_seconds(procs)
    start = time.perf_counter()
    await asyncio.gather(
        publish_floor(cluster.url, cluster.keydir, ORIGIN, subjects, sizes, 256),
        pull_floor(cluster.url, cluster.keydir, PARTNERS, count, 100),
    )
    elapsed = time.perf_counter() - start
    cpu1 = cpu_seconds(procs)
    msgs1 = cluster.hub_messages()
    return elapsed, {k: cpu1[k] - cpu0[k] for k in procs}, _minus(msgs1, msgs0)


def _minus(after: tuple[int, int], before: tuple[int, int]) -> tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


def show_cpu(spent: dict[str, float], reports: int) -> None:
    """Print each side's CPU seconds over the throughput phase, and per report."""
    receivers = sum(spent[m] for m in PARTNERS)
    total = sum(spent.values())
    print(
        f"CPU s: publisher (with its planning worker) {spent[ORIGIN]:.1f},"
        f" 10 receivers {receivers:.1f}"
        f" (max one {max(spent[m] for m in PARTNERS):.1f}), nats-server {spent['nats-server']:.1f},"
        f" bench driver {spent['bench']:.1f}; total {total:.1f}"
    )
    print(f"CPU per report: {per_report(spent, reports)}")


def per_report(spent: dict[str, float], reports: int) -> str:
    """Each side's CPU per report, and all of it, from CPU seconds over ``reports``."""
    ms = {
        "publisher": spent[ORIGIN],
        "receivers": sum(spent[m] for m in PARTNERS),
        "hub": spent["nats-server"],
        "all": sum(spent.values()),
    }
    return ", ".join(f"{side} {v / reports * 1e3:.2f} ms" for side, v in ms.items())


@dataclass
class Results:
    """Everything one e2e run measured, for ``show``."""

    count: int
    span: float
    wall: float
    cpu: dict[str, float]
    latencies: list[float]
    lat_cpu: dict[str, float]
    """CPU seconds of each process over the fixed-rate phase."""
    lat_wall: float
    to_first: list[float]
    witnessing: Witnessing
    memory: Memory | None
    batching: str
    crypto: tuple[float, float, float]
    floor_n: int
    msg_s: float
    msg_cpu: dict[str, float]
    hub_msgs: tuple[int, int]
    """Messages into and out of the hub over the throughput phase."""
    msg_hub_msgs: tuple[int, int]
    """The same over the messaging floor."""


async def measure(args: argparse.Namespace) -> Results:
    """Run the cluster through both phases, check counts, then measure the floors."""
    count, lat_count = args.reports, int(args.rate * args.latency_seconds)
    records = make_records(count + lat_count, seed=11)
    bulk, paced = records[:count], records[count:]
    with tempfile.TemporaryDirectory(prefix="msmt-e2e-", dir=args.tmp) as tmp:
        cluster = Cluster(Path(tmp), MEMBERS)
        try:
            await cluster.start_hub(max(256 * 2**20, 2 * 8 * 1024 * (count + lat_count)))
            cluster.write_configs()
            cluster.start_nodes()
            procs = cluster.processes()
            # 1. throughput
            memory = Memory() if args.memory else None
            msgs0 = cluster.hub_messages()
            cpu0 = tree_cpu_seconds(procs)
            wall0 = time.perf_counter()
            spies = profile(cluster, args.profile) if args.profile else []
            feeding = asyncio.create_task(cluster.feed(bulk))
            await wait_all(cluster, count, args.timeout, memory)
            await feeding
            wall = time.perf_counter() - wall0
            cpu1 = tree_cpu_seconds(procs)
            hub_msgs = _minus(cluster.hub_messages(), msgs0)
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait()
            ids = [str(r["report_id"]) for r in bulk]
            accepted, _, last = timings(cluster, ids)
            # 2. latency at a fixed offered rate
            await asyncio.sleep(1.0)
            sizes0 = log_sizes(cluster)
            lat_cpu0, lat_wall0 = tree_cpu_seconds(procs), time.perf_counter()
            await cluster.feed(paced, rate=args.rate)
            await wait_all(cluster, count + lat_count, args.timeout)
            lat_wall = time.perf_counter() - lat_wall0
            lat_cpu1 = tree_cpu_seconds(procs)
            witnessed = await witnessing(cluster, sizes0, log_sizes(cluster))
            lat_ids = [str(r["report_id"]) for r in paced]
            lat_acc, lat_first, lat_last = timings(cluster, lat_ids)
            # 3. stop and count
            codes = cluster.stop_nodes()
            if any(codes.values()):
                raise LostError(f"node exit codes {codes}")
            check_counts(cluster, ids + lat_ids)
            if memory is not None:
                # Before the floors: a long run's samples must not be lost to them.
                show_memory(memory, count)
            # 4. floors, same run, same sizes
            floor_n = count if args.floor_reports is None else min(count, args.floor_reports)
            msg_s, msg_cpu, msg_hub_msgs = await messaging_floor(cluster, floor_n, 100)
            return Results(
                count=count,
                span=max(last.values()) - min(accepted.values()),
                wall=wall,
                cpu={k: cpu1[k] - cpu0[k] for k in cpu0},
                latencies=[lat_last[r] - lat_acc[r] for r in lat_ids],
                lat_cpu={k: lat_cpu1[k] - lat_cpu0[k] for k in lat_cpu0},
                lat_wall=lat_wall,
                to_first=[lat_first[r] - lat_acc[r] for r in lat_ids],
                witnessing=witnessed,
                memory=memory,
                batching=audit_batches(cluster),
                crypto=floor_rates(crypto_floors(records)),
                floor_n=floor_n,
                msg_s=msg_s,
                msg_cpu=msg_cpu,
                hub_msgs=hub_msgs,
                msg_hub_msgs=msg_hub_msgs,
            )
        finally:
            cluster.kill()


def show(r: Results, rate: float) -> None:
    """Print the figures, the floors and the ratios."""
    ours = r.count / r.span
    crypto, crypto_send, crypto_recv = r.crypto
    messaging = r.floor_n / r.msg_s
    cpu_per_report = sum(r.cpu.values()) / r.count
    cores = os.cpu_count() or 1
    print(f"machine: {cores} CPUs, {platform_line()}")
    print(f"reports: {r.count} (each to {len(PARTNERS)} partners = {r.count * 10} deliveries)")
    print(
        f"throughput (accepted -> stored+verified at all 10): {ours:8.1f} reports/s,"
        f" {ours * len(PARTNERS):8.0f} deliveries/s  (wall incl. polling {r.count / r.wall:.1f}/s)"
    )
    show_cpu(r.cpu, r.count)
    print(
        f"CPU-bound capacity ({cores} cores / CPU per report):"
        f" {cores / cpu_per_report:8.1f} reports/s"
    )
    print(
        f"crypto floor (1 CPU, tight loop):  {crypto:8.1f} reports/s"
        f"  (send side {crypto_send:.0f}/s, 10 receives {crypto_recv:.0f}/s)"
    )
    print(
        f"messaging floor (nats-py, {r.floor_n} reports x 10): {messaging:8.1f} reports/s,"
        f" {messaging * len(PARTNERS):.0f} messages/s"
    )
    # The two floors' CPU per report added up: what any implementation of this
    # design must spend (the same crypto, the same messages through the same
    # hub), so cores / that is the most any could reach on this machine.
    msg_ms = {k: v / r.floor_n * 1e3 for k, v in r.msg_cpu.items()}
    floors_ms = 1e3 / crypto + sum(msg_ms.values())
    print(
        f"messaging floor CPU per report: {sum(msg_ms.values()):.2f} ms"
        f" (hub {msg_ms['nats-server']:.2f}, bare clients {msg_ms['bench']:.2f});"
        f" with the crypto floor's {1e3 / crypto:.2f} ms: {floors_ms:.2f} ms,"
        f" at most {cores / floors_ms * 1e3:.1f} reports/s on {cores} cores"
    )
    # The hub's CPU per report depends on the pace as much as on the messages: the
    # same messages spread over a longer run cost it more (bench/README.md, "the
    # hub"), so the counts and the share of a core it used are printed beside it.
    hub_in, hub_out = (n / r.count for n in r.hub_msgs)
    floor_in, floor_out = (n / r.floor_n for n in r.msg_hub_msgs)
    print(
        f"hub messages per report: in {hub_in:.2f}, out {hub_out:.2f}"
        f" (messaging floor: in {floor_in:.2f}, out {floor_out:.2f});"
        f" hub busy {r.cpu['nats-server'] / r.wall * 100:.0f}% of a core over the phase"
        f" (floor: {r.msg_cpu['nats-server'] / r.msg_s * 100:.0f}%)"
    )
    print(f"ratio ours / crypto floor:    {ours / crypto:6.2f}   (target >= 0.50)")
    print(f"ratio ours / messaging floor: {ours / messaging:6.2f}")
    print(f"ratio CPU: crypto floor CPU / our CPU per report: {1 / crypto / cpu_per_report:6.3f}")
    print(f"target >= 300 reports/s:      {'met' if ours >= 300 else 'NOT met'}")
    p50, p95, p99 = (percentile(r.latencies, q) * 1e3 for q in (0.5, 0.95, 0.99))
    print(
        f"latency at {rate:.0f} reports/s offered, {len(r.latencies)} reports, accepted -> stored"
        f" at all 10: p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms,"
        f" max {max(r.latencies) * 1e3:.0f} ms  (target p99 < 250 ms)"
    )
    print(f"  p50 / p99 ms by {by_second(r.latencies, rate)}")
    # At a fixed rate each receiver gets one message at a time, so its batches are
    # smaller than in the throughput phase and each delivery costs more: the
    # share of the cores the tree used is the headroom the latency depends on.
    print(
        f"  CPU per report at {rate:.0f}/s: {per_report(r.lat_cpu, len(r.latencies))};"
        f" the tree kept {sum(r.lat_cpu.values()) / r.lat_wall / cores * 100:.0f}% of"
        f" {cores} cores busy"
    )
    # How much is before any partner has it (JPN's side, the hub, one receiver),
    # and so how much is the spread over the ten.
    f50, f95, f99 = (percentile(r.to_first, q) * 1e3 for q in (0.5, 0.95, 0.99))
    print(
        f"  accepted -> stored at the first partner: p50 {f50:.0f} ms, p95 {f95:.0f} ms,"
        f" p99 {f99:.0f} ms"
    )
    for line in r.witnessing.lines(len(r.latencies) / rate):
        print(line)
    print(f"audit log batching: {r.batching}")
    print("counts: every partner stored every report exactly once; outbox fully sent; nothing lost")


def show_memory(memory: Memory, count: int) -> None:
    """Print the RSS samples' summary: at once, so a later failure does not lose them."""
    print(f"memory over {count} reports (sampled each second):")
    for name in (ORIGIN, *PARTNERS[:3]):
        print("  " + memory.summary(name, count))
    samples = memory.samples
    worst = max(PARTNERS, key=lambda m: max(p[1] for p in samples.get(m, [(0, 0.0)])))
    print("  worst receiver " + memory.summary(worst, count), flush=True)


def platform_line() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"


def profile(
    cluster: Cluster, out: str, members: Sequence[str] = (ORIGIN, "USA")
) -> list[subprocess.Popen[bytes]]:
    """Attach py-spy (collapsed stacks, GIL holders only) to ``members`` until stopped."""
    spy = str(Path(sys.executable).parent / "py-spy")
    Path(out).mkdir(parents=True, exist_ok=True)
    return [
        subprocess.Popen(
            [
                spy,
                "record",
                "--format",
                "raw",
                "--rate",
                "200",
                "--threads",
                "--gil",
                "-o",
                f"{out}/{m}.txt",
                "-p",
                str(cluster.procs[m].pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for m in members
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run, under a minute")
    parser.add_argument("--reports", type=int, help="reports in the throughput phase")
    parser.add_argument("--rate", type=float, default=100.0, help="offered rate, latency phase")
    parser.add_argument("--latency-seconds", type=float, help="length of the latency phase")
    parser.add_argument("--floor-reports", type=int, help="cap on the messaging floor's reports")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--tmp", help="scratch parent directory")
    parser.add_argument("--profile", help="write py-spy collapsed stacks of JPN and USA here")
    args = parser.parse_args()
    if args.reports is None:
        args.reports = 300 if args.quick else 100_000
    if args.latency_seconds is None:
        args.latency_seconds = 5.0 if args.quick else 30.0
    args.memory = not args.quick
    show(run_stoppable(measure(args)), args.rate)


if __name__ == "__main__":
    main()
