"""One node's publish side alone: intake -> outbox -> policy -> envelope -> JetStream ack.

    python bench/publisher.py [--quick] [--reports N] [--rate R]

A real nats-server with every member's account and inbox, and one ``msmt node
run`` subprocess (JPN, policy: everything to all 10 partners); no partner node
runs, so the hub only stores. N reports are fed through JPN's intake socket as
fast as it takes them (or, with ``--rate``, one per write at R a second, as
``e2e.py``'s latency phase feeds them); timed from the first acceptance (``accepted_at``) to the
last hub ack recorded (``sent_at``), so it covers the durable accept, the
accepted audit entry, planning (policy, 1 SD-JWT issue, 10 JWEs per report),
the outbox commit, 10 JetStream publishes with acks, the sent audit entries and
marking sent. Afterwards every inbox stream must hold exactly N messages and the
outbox nothing unsent (else a non-zero exit). JPN's CPU is its main process plus
its planning worker process (``broker.planpool``), printed both summed and apart.

Floors from the same run: the crypto floor as ``bench/e2e.py`` defines it (1
sign, 10 wraps, 10 unwraps, 10 verifies per report), its send half alone (1
sign + 10 wraps: all the crypto a publisher does), and bare nats-py JetStream
publishing of the same number and sizes of payloads with acks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import (
    ORIGIN,
    PARTNERS,
    Cluster,
    LostError,
    cpu_seconds,
    crypto_floors,
    floor_rates,
    make_records,
    platform_line,
    profile,
    read_rows,
)
from floors import publish_floor
from sigterm import run_stoppable

from broker import keys
from broker.natsconfig import inbox_stream
from broker.natsetup import connect_account


async def stream_counts(cluster: Cluster) -> dict[str, int]:
    out = {}
    for member in PARTNERS:
        seed = (cluster.keydir / member / keys.NATS_SEED_FILE).read_bytes().strip()
        nc = await connect_account(cluster.url, member, seed)
        try:
            info = await nc.jetstream().stream_info(inbox_stream(member))
            out[member] = int(info.state.messages)
        finally:
            await nc.close()
    return out


async def wait_sent(cluster: Cluster, want: int, within: float) -> None:
    path = cluster.store_path(ORIGIN)
    deadline = time.monotonic() + within
    while True:
        sent = read_rows(path, "SELECT count(*) FROM outbox WHERE state = 'sent'")[0][0]
        if sent >= want:
            return
        if cluster.procs[ORIGIN].poll() is not None:
            raise LostError(f"JPN died: {cluster.log_tail(ORIGIN)}")
        if time.monotonic() > deadline:
            raise LostError(f"timed out with {sent} of {want} envelopes sent")
        await asyncio.sleep(0.1)


def children_cpu(proc: psutil.Process) -> float:
    """CPU seconds of ``proc``'s live children: JPN's planning worker (ready before the feed)."""
    return sum(sum(c.cpu_times()[:2]) for c in proc.children(recursive=True))


@dataclass
class Measured:
    """One run's figures: times from JPN's store, CPU seconds per process, floors."""

    count: int
    first: float
    accepted: float
    last: float
    cpu: dict[str, float]
    worker_cpu: float
    crypto: float
    crypto_send: float
    publish_s: float
    audit_commits: int
    sent_commits: int
    rate: float | None


async def run(args: argparse.Namespace) -> Measured:
    count = args.reports
    records = make_records(count, seed=17)
    with tempfile.TemporaryDirectory(prefix="msmt-pub-", dir=args.tmp) as tmp:
        cluster = Cluster(Path(tmp), [ORIGIN])
        try:
            await cluster.start_hub(max(256 * 2**20, 2 * 8 * 1024 * count))
            cluster.write_configs()
            cluster.start_nodes()
            procs = cluster.processes()
            spies = profile(cluster, args.profile, [ORIGIN]) if args.profile else []
            cpu0, worker0 = cpu_seconds(procs), children_cpu(procs[ORIGIN])
            await cluster.feed(records, rate=args.rate)
            await wait_sent(cluster, count * len(PARTNERS), args.timeout)
            cpu1, worker1 = cpu_seconds(procs), children_cpu(procs[ORIGIN])
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait()
            path = cluster.store_path(ORIGIN)
            first, accepted = read_rows(
                path, "SELECT min(accepted_at), max(accepted_at) FROM reports"
            )[0]
            last = read_rows(path, "SELECT max(sent_at) FROM outbox")[0][0]
            states = dict(read_rows(path, "SELECT state, count(*) FROM outbox GROUP BY state"))
            unplanned = read_rows(path, "SELECT count(*) FROM reports WHERE planned = 0")[0][0]
            # Each audit append commits one signed checkpoint; each mark_sent one sent_at.
            audit_commits = read_rows(
                path.parent / "audit" / "audit.sqlite", "SELECT count(*) FROM checkpoints"
            )[0][0]
            sent_commits = read_rows(path, "SELECT count(DISTINCT sent_at) FROM outbox")[0][0]
            codes = cluster.stop_nodes()
            if any(codes.values()):
                raise LostError(f"node exit codes {codes}")
            streams = await stream_counts(cluster)
            if states != {"sent": count * len(PARTNERS)} or unplanned:
                raise LostError(f"outbox states {states}, {unplanned} unplanned")
            if set(streams.values()) != {count}:
                raise LostError(f"inbox streams hold {streams}, expected {count} each")
            crypto, crypto_send, _ = floor_rates(crypto_floors(records))
            rows = read_rows(
                path, "SELECT subject, json_extract(audit, '$.bytes') FROM outbox ORDER BY rowid"
            )
            pub_s = await publish_floor(
                cluster.url,
                cluster.keydir,
                ORIGIN,
                [r[0] for r in rows],
                [int(r[1]) for r in rows],
                256,
            )
        finally:
            cluster.kill()
    spent = {k: cpu1[k] - cpu0[k] for k in cpu0}
    return Measured(
        count,
        first,
        accepted,
        last,
        spent,
        worker1 - worker0,
        crypto,
        crypto_send,
        pub_s,
        audit_commits,
        sent_commits,
        args.rate,
    )


def show(m: Measured) -> None:
    count = m.count
    ours = count / (m.last - m.first)
    node = m.cpu[ORIGIN] + m.worker_cpu
    messaging = count / m.publish_s
    print(f"machine: {os.cpu_count()} CPUs, {platform_line()}")
    print(f"reports: {count}, each to {len(PARTNERS)} partners ({count * len(PARTNERS)} envelopes)")
    if m.rate is not None:
        # Paced, the run's length is the feed's: the rate says nothing, the CPU per report does.
        print(f"fed one at a time at {m.rate:.0f} reports/s")
    print(
        f"publisher (accepted -> hub ack recorded): {ours:8.1f} reports/s,"
        f" {ours * len(PARTNERS):.0f} envelopes/s"
    )
    print(
        f"intake: all accepted after {m.accepted - m.first:.2f} s;"
        f" all sent after {m.last - m.first:.2f} s"
    )
    print(
        f"CPU s: JPN node {node:.2f} ({node / count * 1e3:.2f} ms/report: main process"
        f" {m.cpu[ORIGIN] / count * 1e3:.2f}, planning worker {m.worker_cpu / count * 1e3:.2f}),"
        f" nats-server {m.cpu['nats-server']:.2f}, bench driver {m.cpu['bench']:.2f}"
    )
    print(
        f"JPN commits: audit log {m.audit_commits} ({m.audit_commits / count:.2f} per report),"
        f" sends marked {m.sent_commits} ({count * len(PARTNERS) / m.sent_commits:.1f}"
        " envelopes each)"
    )
    print(
        f"crypto floor (1 CPU): {m.crypto:8.1f} reports/s whole report;"
        f" send half alone {m.crypto_send:.1f} reports/s"
    )
    print(f"messaging floor (nats-py publish+ack, same sizes): {messaging:8.1f} reports/s")
    if m.rate is None:
        print(f"ratio ours / crypto floor:           {ours / m.crypto:6.2f}   (target >= 0.60)")
        print(f"ratio ours / crypto send half:       {ours / m.crypto_send:6.2f}")
        print(f"ratio ours / messaging publish floor:{ours / messaging:6.2f}")
    print(f"ratio CPU: crypto floor CPU / JPN CPU per report: {count / m.crypto / node:.2f}")
    print("counts: every inbox stream holds every report once; outbox fully sent; nothing lost")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run, under a minute")
    parser.add_argument("--reports", type=int, help="reports to publish")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--tmp", help="scratch parent directory")
    parser.add_argument("--profile", help="write py-spy collapsed stacks of JPN here")
    parser.add_argument(
        "--rate",
        type=float,
        help="feed one report at a time at this many per second (default: all at once)",
    )
    args = parser.parse_args()
    if args.reports is None:
        args.reports = 500 if args.quick else 5000
    show(run_stoppable(run(args)))


if __name__ == "__main__":
    main()
