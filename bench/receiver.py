"""One node's receive side alone: a pre-filled inbox -> verified, audited, stored, acked.

    python bench/receiver.py [--quick] [--messages N] [--profile DIR]

A real nats-server with every member's account and inbox, and one ``msmt node
run`` subprocess (USA). Before the node runs, the bench plans N real envelopes
from JPN to USA in process (JPN's generated keys and roster, the planner the
node uses) and publishes them into USA's inbox stream with their
``Nats-Msg-Id``. USA's durable consumer is created only once the node is up
(its inbox stays unbound and it retries each second; the member's account
may create its consumer but not pause it), so start-up is not measured. The
node then drains the inbox: its CPU (psutil, planning worker included) from the consumer's
creation to the moment its store holds all N, and its wall rate from the first
to the last ``received_at``. That covers fetch, every verification step, the
audit append, the store commit and the ack, for every message. The node's CPU is
also split by thread (psutil): the event loop (nats-py, pulls, acks) and the
store's thread (verification, the audit log, the store; SQLite without the GIL).

Afterwards the node stops (SIGTERM, exit 0 expected) and the counts are
checked: the store holds every report exactly once, the audit log one
``received`` entry per report, no rejections, and the consumer has nothing
pending or unacked. Anything else is ``FAILED: ...`` and exit 1.

Floors from the same run, per delivery: the receive half of the crypto floor
(``floors.CryptoFloor.receive_one``: ECDH, KDF, unwrap, GCM decrypt, 1 Ed25519
verify, on the sizes of these envelopes; CPU, one core) and a bare nats-py
client pulling and acking N payloads of the same sizes through the same
durable consumer (``floors.pull_floor``; CPU of the bench process and wall).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from e2e import (
    MSMT,
    ORIGIN,
    BigStoreServer,
    Cluster,
    LostError,
    crypto_floors,
    make_records,
    platform_line,
    profile,
    read_rows,
)
from floors import pull_floor
from nats.js.api import RetentionPolicy
from sigterm import run_stoppable

from broker import keys, keys_custodian, keys_roster
from broker.config import load_config
from broker.members import MEMBERS
from broker.natsconfig import accounts_config, inbox_durable, inbox_stream
from broker.natsetup import (
    InboxLimits,
    connect_account,
    ensure_consumer,
    ensure_stream,
    inbox_consumer_config,
    inbox_stream_config,
    setup_account,
)
from broker.natsusers import load_users
from broker.planner import Planner, Signer
from broker.policy import load_policy
from broker.store import OutboxItem

ME = "USA"
LIMITS = InboxLimits(max_bytes=4 * 2**30)
POLICY = f"""version = 1
member = "{ORIGIN}"

[[rules]]
name = "everything-to-{ME}"
kinds = ["*"]
partners = ["{ME}"]
release = ["*"]
"""


def plan(cluster: Cluster, count: int) -> list[OutboxItem]:
    """``count`` real JPN -> USA envelopes, made by the node's own planner."""
    config = load_config(cluster.config_path(ME), env={})
    signed = keys_roster.load_pinned_roster(
        config.roster_dir, config.authority_path, cluster.root / "bench-roster-state.json"
    )
    now = datetime.now(UTC)
    jpn = keys.load_member_keys(cluster.keydir, ORIGIN, signed.roster, now)
    policy = load_policy(POLICY, member=ORIGIN, source="bench")
    planner = Planner(Signer(ORIGIN, jpn.signing, jpn.signing_kid), policy, signed.roster, {})
    items: list[OutboxItem] = []
    for record in make_records(count, seed=23):
        items += planner.envelopes(str(record["report_id"]), json.dumps(record).encode())
    if len(items) != count or {i.partner for i in items} != {ME}:
        raise LostError(f"planned {len(items)} envelopes, expected {count} to {ME}")
    return items


async def publish(cluster: Cluster, items: list[OutboxItem], tag: str = "") -> None:
    """Publish ``items`` as JPN, at most 256 unacked; every one must be stored, none a dup."""
    seed = (cluster.keydir / ORIGIN / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(cluster.url, ORIGIN, seed)
    js = nc.jetstream()
    sem = asyncio.Semaphore(256)

    async def one(item: OutboxItem) -> None:
        async with sem:
            ack = await js.publish(
                item.subject, item.jwe, headers={"Nats-Msg-Id": item.msg_id + tag}
            )
            if ack.duplicate:
                raise LostError(f"hub called {item.msg_id} a duplicate")

    try:
        await asyncio.gather(*(one(i) for i in items))
    finally:
        await nc.close()


async def start_hub(cluster: Cluster) -> None:
    """``Cluster.start_hub``, except that USA's inbox consumer is not created yet."""
    keys_custodian.init_keys(cluster.keydir, MEMBERS, now=datetime.now(UTC) - timedelta(days=1))
    accounts = accounts_config(load_users(cluster.keydir), replicas=1, inbox_bytes=LIMITS.max_bytes)
    cluster.server = BigStoreServer(
        workdir=cluster.root / "nats", extra_config=accounts, sync_always=True
    )
    cluster.server.start()
    for account in (*MEMBERS, keys.AUDIT_ACCOUNT):
        seed = (cluster.keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()
        if account != ME:
            await setup_account(cluster.url, account, seed, LIMITS)
            continue
        nc = await connect_account(cluster.url, account, seed)
        try:
            # Limits retention while it has no consumer, as ``ensure_inbox`` starts
            # one: interest retention would drop the pre-filled messages.
            config = replace(inbox_stream_config(ME, LIMITS), retention=RetentionPolicy.LIMITS)
            await ensure_stream(nc.jetstream(), config)
        finally:
            await nc.close()


async def create_consumer(cluster: Cluster) -> None:
    """Create USA's inbox consumer exactly as ``msmt nats setup`` does."""
    seed = (cluster.keydir / ME / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(cluster.url, ME, seed)
    try:
        result = await ensure_consumer(
            nc.jetstream(), inbox_stream(ME), inbox_consumer_config(ME, LIMITS)
        )
        if result.action != "created":
            raise LostError(f"USA's consumer was {result.action}, expected created")
        # Then interest retention, as ``msmt nats setup`` leaves the inbox.
        await ensure_stream(nc.jetstream(), inbox_stream_config(ME, LIMITS))
    finally:
        await nc.close()


def start_node(cluster: Cluster, fetch_batch: int | None) -> psutil.Process:
    """Start USA's node and wait until it serves its health check (it cannot be ready yet)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    if fetch_batch is not None:
        env["MSMT_FETCH_BATCH"] = str(fetch_batch)
    (cluster.root / "logs").mkdir(exist_ok=True)
    with (cluster.root / "logs" / f"{ME}.log").open("ab") as log:
        cluster.procs[ME] = subprocess.Popen(
            [MSMT, "node", "run", "--config", str(cluster.config_path(ME))],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 60
    url = f"http://127.0.0.1:{cluster.ports[ME]}/healthz"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return psutil.Process(cluster.procs[ME].pid)
        except (urllib.error.URLError, OSError):
            pass
        if cluster.procs[ME].poll() is not None or time.monotonic() > deadline:
            raise LostError(f"{ME} did not start: {cluster.log_tail(ME)}")
        time.sleep(0.1)


async def consumer_state(cluster: Cluster) -> tuple[int, int]:
    """(messages pending, messages delivered but unacked) on USA's inbox consumer."""
    seed = (cluster.keydir / ME / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(cluster.url, ME, seed)
    try:
        info = await nc.jetstream().consumer_info(inbox_stream(ME), inbox_durable(ME))
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)
    finally:
        await nc.close()


def tree_cpu(node: psutil.Process) -> tuple[float, float]:
    """(user, system) CPU seconds of the node and its live children (the planning worker)."""
    user = system = 0.0
    for proc in (node, *node.children(recursive=True)):
        t = proc.cpu_times()
        user, system = user + t.user, system + t.system
    return user, system


def thread_cpu(node: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + system) of each of the node's threads, by thread id."""
    return {t.id: t.user_time + t.system_time for t in node.threads()}


def split_threads(
    node: psutil.Process, before: dict[int, float], after: dict[int, float]
) -> tuple[float, float, float]:
    """(event loop, busiest other thread, the rest) CPU seconds between two ``thread_cpu``.

    The event loop is the main thread (nats-py, pulls, acks); the busiest other
    thread is the store's, where ``Inbound.process`` verifies, audits and stores.
    SQLite runs there without the GIL, so a ``--gil`` profile misses part of it.
    """
    used = {tid: cpu - before.get(tid, 0.0) for tid, cpu in after.items()}
    loop = used.pop(node.pid, 0.0)
    busiest = max(used.values(), default=0.0)
    return loop, busiest, sum(used.values()) - busiest


def stored(cluster: Cluster) -> int:
    path = cluster.store_path(ME)
    if not path.exists():
        return 0
    return int(read_rows(path, "SELECT count(*) FROM inbox")[0][0])


def check_counts(cluster: Cluster, items: list[OutboxItem]) -> None:
    """Every report stored once, audited once, nothing rejected, nothing left on the hub."""
    path = cluster.store_path(ME)
    rows = read_rows(path, "SELECT sender, report_id FROM inbox")
    want = {(ORIGIN, i.report_id) for i in items}
    if len(rows) != len(want) or set(rows) != want:
        raise LostError(f"{ME} stored {len(rows)} reports, expected {len(want)}")
    rejected = read_rows(path, "SELECT name, value FROM counters WHERE name LIKE 'rejected.%'")
    if rejected:
        raise LostError(f"{ME} rejected messages: {rejected}")
    audit = load_config(cluster.config_path(ME), env={}).audit_dir / "audit.sqlite"
    entries = [json.loads(r[0]) for r in read_rows(audit, "SELECT entry FROM entries")]
    received = [e for e in entries if e.get("type") == "received"]
    if len(received) != len(want):
        raise LostError(f"audit log holds {len(received)} received entries, expected {len(want)}")


async def publish_paced(cluster: Cluster, items: list[OutboxItem], rate: float) -> None:
    """Publish ``items`` at ``rate`` per second, in 10 ms slices, as a live sender would."""
    seed = (cluster.keydir / ORIGIN / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(cluster.url, ORIGIN, seed)
    js = nc.jetstream()
    start = time.monotonic()
    try:
        sent = 0
        while sent < len(items):
            due = min(len(items), int((time.monotonic() - start) * rate) + 1)
            await asyncio.gather(
                *(
                    js.publish(i.subject, i.jwe, headers={"Nats-Msg-Id": i.msg_id})
                    for i in items[sent:due]
                )
            )
            sent = due
            await asyncio.sleep(0.01)
    finally:
        await nc.close()


async def wait_stored(cluster: Cluster, count: int, within: float) -> None:
    deadline = time.monotonic() + within
    while (got := stored(cluster)) < count:
        if cluster.procs[ME].poll() is not None:
            raise LostError(f"{ME} died: {cluster.log_tail(ME)}")
        if time.monotonic() > deadline:
            raise LostError(f"timed out with {got} of {count} stored")
        await asyncio.sleep(0.05)


@dataclass
class Results:
    """What one run measured, for ``show``."""

    count: int
    rate: float  # deliveries per wall second
    cpu: float  # node CPU seconds over the phase
    cpu_sys: float  # of which in the kernel (fsync, sockets)
    threads: tuple[float, float, float]  # of the node process: event loop, store thread, rest
    batches: float  # audit entries per commit
    crypto_rate: float  # receive crypto floor, deliveries per CPU second
    pull_cpu: float  # bare pull + ack, CPU seconds for ``count``
    pull_wall: float


async def measure(args: argparse.Namespace) -> Results:
    """Fill (or feed) USA's inbox, let the node drain it, check counts, measure floors."""
    count = args.messages
    with tempfile.TemporaryDirectory(prefix="msmt-recv-", dir=args.tmp) as tmp:
        cluster = Cluster(Path(tmp), [ME])
        try:
            await start_hub(cluster)
            cluster.write_configs()
            items = plan(cluster, count)
            if args.rate is None:
                await publish(cluster, items)
            else:
                await create_consumer(cluster)
            node = start_node(cluster, args.fetch_batch)
            await asyncio.sleep(2.0)  # let start-up work (first checkpoint etc.) settle
            spies = profile(cluster, args.profile, [ME]) if args.profile else []
            t0, th0 = tree_cpu(node), thread_cpu(node)
            if args.rate is None:
                await create_consumer(cluster)
            else:
                await publish_paced(cluster, items, args.rate)
            await wait_stored(cluster, count, args.timeout)
            t1, th1 = tree_cpu(node), thread_cpu(node)
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait()
            path = cluster.store_path(ME)
            first, last = read_rows(path, "SELECT min(received_at), max(received_at) FROM inbox")[0]
            # The first batch waited for the node's next bind attempt: rate from its end.
            after = read_rows(path, "SELECT count(*) FROM inbox WHERE received_at > ?", (first,))
            codes = cluster.stop_nodes()
            if any(codes.values()):
                raise LostError(f"node exit codes {codes}: {cluster.log_tail(ME)}")
            check_counts(cluster, items)
            pending, unacked = await consumer_state(cluster)
            if pending or unacked:
                raise LostError(f"consumer holds {pending} pending, {unacked} unacked")
            # Floors, same run: bare pull + ack of N payloads of the same sizes ...
            await publish(cluster, items, tag=".floor")
            cpu_f0, wall_f0 = time.process_time(), time.perf_counter()
            await pull_floor(cluster.url, cluster.keydir, [ME], count, 100)
            cpu_f, wall_f = time.process_time() - cpu_f0, time.perf_counter() - wall_f0
            # ... and the receive crypto on the sizes of these envelopes.
            floors = crypto_floors(make_records(3, seed=23))

            def receive() -> None:
                for f in floors:
                    f.receive_one()

            return Results(
                count=count,
                rate=after[0][0] / (last - first),
                cpu=(t1[0] + t1[1]) - (t0[0] + t0[1]),
                cpu_sys=t1[1] - t0[1],
                threads=split_threads(node, th0, th1),
                batches=audit_batching(cluster),
                crypto_rate=len(floors) * floors[0].rate(receive),
                pull_cpu=cpu_f,
                pull_wall=wall_f,
            )
        finally:
            cluster.kill()


def audit_batching(cluster: Cluster) -> float:
    """Audit entries per signed checkpoint, i.e. per commit (messages per batch, roughly)."""
    path = load_config(cluster.config_path(ME), env={}).audit_dir / "audit.sqlite"
    entries = read_rows(path, "SELECT count(*) FROM entries")[0][0]
    commits = read_rows(path, "SELECT count(*) FROM checkpoints")[0][0]
    return float(entries) / max(1, int(commits))


def show(r: Results, args: argparse.Namespace) -> None:
    """Print the node's figures beside the floors."""
    per = r.cpu / r.count
    how = "pre-filled" if args.rate is None else f"published at {args.rate:.0f}/s"
    print(f"machine: {os.cpu_count()} CPUs, {platform_line()}")
    print(f"messages: {r.count} JPN -> {ME} envelopes, {how}; ~{r.batches:.1f} per commit")
    print(
        f"node: {r.rate:8.1f} deliveries/s wall; CPU {r.cpu:.2f} s ="
        f" {per * 1e3:.3f} ms per delivery ({1 / per:.0f} deliveries per CPU second),"
        f" kernel {r.cpu_sys / r.count * 1e3:.3f} ms of it"
    )
    loop, store, rest = (t / r.count * 1e3 for t in r.threads)
    print(
        f"node CPU by thread, per delivery: event loop {loop:.3f} ms, store thread {store:.3f} ms,"
        f" other threads {rest:.3f} ms"
    )
    print(
        f"crypto floor, receive (1 CPU): {r.crypto_rate:8.0f} deliveries/s"
        f" = {1e3 / r.crypto_rate:.3f} ms each"
    )
    pull_cpu = r.pull_cpu / r.count
    print(
        f"pull+ack floor (bare nats-py, batch 100): {r.count / r.pull_wall:8.0f} messages/s wall,"
        f" {pull_cpu * 1e3:.3f} ms CPU each"
    )
    print(f"ratio CPU: crypto floor / ours:            {1 / r.crypto_rate / per:6.3f}")
    print(f"ratio CPU: (crypto + pull floor) / ours:   {(1 / r.crypto_rate + pull_cpu) / per:6.3f}")
    print(f"ratio wall: ours / pull+ack floor:         {r.rate * r.pull_wall / r.count:6.3f}")
    print("counts: every message stored and audited exactly once, none rejected, none left unacked")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run, under a minute")
    parser.add_argument("--messages", type=int, help="envelopes to pre-fill (default 3000)")
    parser.add_argument(
        "--fetch-batch",
        type=int,
        help="the node's fetch batch (MSMT_FETCH_BATCH); e2e's receivers see ~13 a fetch",
    )
    parser.add_argument(
        "--rate", type=float, help="publish at this rate while the node runs, not before"
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--tmp", help="scratch parent directory")
    parser.add_argument("--profile", help="write py-spy raw stacks of the node here")
    args = parser.parse_args()
    if args.messages is None:
        args.messages = 600 if args.quick else 3000
    show(run_stoppable(measure(args)), args)


if __name__ == "__main__":
    main()
