"""The hub's cost of an ack: an inbox's (interest retention) against limits retention.

    python bench/hub_ack.py [--messages N] [--batch B] [--rounds R]

One nats-server with ``sync_interval: always``, as the generated hub runs. Each
round makes two streams in turn, each with one durable pull consumer:

* the inbox: ``natsetup.inbox_stream_config`` and ``inbox_consumer_config``, as
  ``msmt nats setup`` makes them, interest retention (an acked message is
  removed);
* the floor: the same stream with limits retention (an acked message stays), so
  an ack only moves the consumer's state.

Into each it publishes N envelope-sized messages (6 KB), then fetches them B at
a time and acks each, as a receiving node does. Printed per ack over the
fetch-and-ack part: the server's CPU (user and system, psutil) and the whole
machine's busy time (``/proc/stat``, which also holds the kernel's block I/O
work). Then the ratio inbox / floor, from the medians of the rounds.

With interest retention nats-server removes an acked message by writing a
removal record to the stream's block file, and with ``sync_interval: always``
it fsyncs that as it does a stored message: two fsyncs per delivery at the hub,
not one (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats
import psutil
from nats.js.api import RetentionPolicy
from sigterm import run_stoppable

from broker.natsconfig import inbox_durable, inbox_stream
from broker.natsetup import InboxLimits, inbox_consumer_config, inbox_stream_config
from broker.natsproc import NatsServer

MEMBER = "USA"
SIZE = 6000


def busy_jiffies() -> int:
    """The whole machine's non-idle time so far, in clock ticks (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # less idle and iowait


async def one(
    url: str, pid: int, retention: RetentionPolicy, count: int, batch: int
) -> tuple[float, float]:
    """Microseconds of (server CPU, machine busy time) per ack, for one stream of ``retention``."""
    limits = InboxLimits()
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = replace(inbox_stream_config(MEMBER, limits), retention=retention)
    consumer = replace(inbox_consumer_config(MEMBER, limits), max_ack_pending=count + batch)
    await js.add_stream(stream)
    await js.add_consumer(inbox_stream(MEMBER), consumer)
    sub = await js.pull_subscribe_bind(inbox_durable(MEMBER), inbox_stream(MEMBER))
    body = os.urandom(SIZE)
    subject = f"from.JPN.msmt.to.{MEMBER}.vessel"  # as the hub attests a sender
    await asyncio.gather(*[await js.publish_async(subject, body) for _ in range(count)])
    await asyncio.sleep(1.0)  # let the server's own work on the publishes finish
    server = psutil.Process(pid)
    cpu0, busy0 = server.cpu_times(), busy_jiffies()
    got = 0
    while got < count:
        msgs = await sub.fetch(min(batch, count - got), timeout=10)
        for msg in msgs:
            await msg.ack()
        got += len(msgs)
    await nc.flush()
    await asyncio.sleep(1.0)  # the removals' writes and syncs, after the acks
    cpu1, busy1 = server.cpu_times(), busy_jiffies()
    await js.delete_stream(inbox_stream(MEMBER))
    await nc.close()
    server_s = cpu1.user + cpu1.system - cpu0.user - cpu0.system
    busy_s = (busy1 - busy0) / os.sysconf("SC_CLK_TCK")
    return server_s / count * 1e6, busy_s / count * 1e6


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="msmt-hub-ack-") as tmp:
        server = NatsServer(workdir=Path(tmp), sync_always=True)
        results: dict[RetentionPolicy, list[tuple[float, float]]] = {}
        try:
            server.start()
            assert server.proc is not None
            for r in range(args.rounds):
                order = [RetentionPolicy.INTEREST, RetentionPolicy.LIMITS]
                for retention in order if r % 2 == 0 else order[::-1]:
                    got = await one(
                        server.url, server.proc.pid, retention, args.messages, args.batch
                    )
                    results.setdefault(retention, []).append(got)
                    print(
                        f"round {r + 1} {retention.value:>8}: server {got[0]:5.0f} µs per ack,"
                        f" machine {got[1]:5.0f} µs",
                        flush=True,
                    )
        finally:
            server.kill()
    med = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in results.items()}
    inbox, floor = med[RetentionPolicy.INTEREST], med[RetentionPolicy.LIMITS]
    print(
        f"per ack, medians of {args.rounds} rounds of {args.messages}, {args.batch} a fetch:"
        f" inbox (interest) server {inbox[0]:.0f} µs, machine {inbox[1]:.0f} µs;"
        f" floor (limits) server {floor[0]:.0f} µs, machine {floor[1]:.0f} µs"
    )
    print(
        f"ratio inbox / floor: server {inbox[0] / floor[0]:.2f}, machine {inbox[1] / floor[1]:.2f};"
        f" the removal costs the machine {inbox[1] - floor[1]:.0f} µs a delivery,"
        f" {(inbox[1] - floor[1]) * 10 / 1000:.2f} ms a report to 10 partners"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000, help="messages per stream")
    parser.add_argument("--batch", type=int, default=7, help="messages a fetch (e2e at 100/s: ~7)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    run_stoppable(main_async(args))


if __name__ == "__main__":
    main()
