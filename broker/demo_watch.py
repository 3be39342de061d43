"""Watching the demo's nodes, and showing what they do while they do it.

Readiness and counters come from each node's ``/readyz`` and ``/metrics``; the
cosignatures from its audit log, read-only.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from broker.auditlog import DB_FILE
from broker.demo_view import Tally
from broker.demo_world import DemoFailedError, World
from broker.members import MEMBERS

READY_TIMEOUT: Final = 120.0
QUORUM: Final = len(MEMBERS) - 1
"""Cosignatures each log's latest checkpoint must carry: every partner witnessed it."""


def parse_metrics(text: str) -> tuple[Tally, dict[str, int]]:
    """A node's ``/metrics`` as a ``Tally`` and received counts per sender."""
    values: dict[str, float] = {}
    by_sender: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "msmt_received_total":
                by_sender[sample.labels["sender"]] = int(sample.value)
            if sample.name.endswith("_total") or sample.name == "msmt_outbox_depth":
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    tally = Tally(
        accepted=int(values.get("msmt_intake_accepted_total", 0)),
        sent=int(values.get("msmt_published_total", 0)),
        received=int(values.get("msmt_received_total", 0)),
        rejected=int(values.get("msmt_rejected_total", 0)),
        outbox=int(values.get("msmt_outbox_depth", 0)),
    )
    return tally, by_sender


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return 0, ""


PORT_HELD: Final = "another process holds it; running without /metrics"
"""What a node logs when its metrics port was taken (``broker.node``)."""


async def wait_ready(world: World, session: aiohttp.ClientSession) -> None:
    """Wait until every node answers ``/readyz``; raise ``DemoFailedError`` if one dies or hangs."""
    deadline = time.monotonic() + READY_TIMEOUT
    pending = set(world.nodes)
    rebinds = dict.fromkeys(world.nodes, 0)
    while pending:
        for member in sorted(pending):
            node = world.nodes[member]
            if node.died():
                # A process of the demo's own user took the port picked as free: the node
                # stops (exit 2); pick another and start again, a few times.
                taken = "config key metrics.listen: cannot listen on" in node.log_tail()
                if taken and rebinds[member] < 3:
                    rebinds[member] += 1
                    world.write_config(member)
                    world.start_node(member)
                    continue
                raise DemoFailedError(f"the {member} node exited at start: {node.log_tail()}")
            proc = node.proc
            if proc is not None and PORT_HELD in node.logged_since_start() and rebinds[member] < 3:
                # A metrics port picked as free can be taken before the node binds it (by
                # any process on the machine); the node runs without it, and the demo
                # watches that port: stop it, pick another and start again, a few times.
                proc.terminate()
                await asyncio.to_thread(proc.wait, 30)
                rebinds[member] += 1
                world.write_config(member)
                world.start_node(member)
                continue
            status, _ = await _get(session, f"http://{node.config.metrics.listen}/readyz")
            if status == 200:
                pending.discard(member)
        if pending and time.monotonic() > deadline:
            raise DemoFailedError(
                f"nodes not ready after {READY_TIMEOUT:.0f}s: {', '.join(sorted(pending))}"
            )
        if pending:
            await asyncio.sleep(0.1)


async def snapshot(
    world: World, session: aiohttp.ClientSession
) -> tuple[dict[str, Tally], dict[tuple[str, str], int]]:
    """Every node's tally, and received counts keyed ``(sender, recipient)``."""
    members = list(world.nodes)
    pages = await asyncio.gather(
        *(_get(session, f"http://{world.nodes[m].config.metrics.listen}/metrics") for m in members)
    )
    tallies: dict[str, Tally] = {}
    received: dict[tuple[str, str], int] = {}
    for member, (status, text) in zip(members, pages, strict=True):
        if status != 200:
            tallies[member] = Tally()
            continue
        tallies[member], by_sender = parse_metrics(text)
        for sender, n in by_sender.items():
            received[(sender, member)] = n
    return tallies, received


def cosigners(audit_db: Path) -> tuple[int, int, set[str]]:
    """A log's entry count, latest checkpoint size, and the names that cosigned that checkpoint."""
    try:
        db = sqlite3.connect(f"{audit_db.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return 0, -1, set()
    try:
        size = db.execute("SELECT count(*) FROM entries").fetchone()[0]
        row = db.execute("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        return 0, -1, set()
    finally:
        db.close()
    if row is None:
        return int(size), -1, set()
    names = {ln.split(" ")[1] for ln in str(row[1]).splitlines() if ln.startswith("\u2014 ")}
    return int(size), int(row[0]), names


def all_cosigned(world: World) -> bool:
    """Whether every node's latest checkpoint covers its whole log and carries the quorum."""
    for member, node in world.nodes.items():
        size, signed, names = cosigners(node.config.audit_dir / DB_FILE)
        if signed != size or len(names - {member}) < QUORUM:
            return False
    return True


class Display:
    """Live progress: a block redrawn in place on a terminal, plain lines every 2 s otherwise."""

    def __init__(self, write: Callable[[str], None], tty: bool) -> None:
        self.write = write
        self.tty = tty
        self.drawn = 0
        self.last_plain = 0.0

    def show(self, lines: list[str], *, final: bool = False) -> None:
        """Draw the block (on a terminal) or print its first line now and then (in a log)."""
        if self.tty:
            up = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""
            self.write(up + "\n".join(lines) + "\n")
            self.drawn = len(lines)
            return
        now = time.monotonic()
        if final or now - self.last_plain >= 2.0:
            self.write("\n".join(lines) + "\n" if final else lines[0] + "\n")
            self.last_plain = now
