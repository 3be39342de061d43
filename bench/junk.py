"""Audit-log bytes per junk message: a member's junk through a real hub into one node.

    python bench/junk.py [--quick] [--rate R] [--seconds S] [--baseline DIR]

A real nats-server with every member's account and inbox, and one ``msmt node
run`` subprocess (USA). KOR, a member with valid credentials, publishes junk
into USA's inbox at R messages a second for S seconds (JetStream publish, each
acked by the hub), as a red-team member did; USA refuses each at step
``format`` and terminates it. Measured over the junk, from USA's audit log: its
entries, the bytes of those entries and of the checkpoints signed for them (the
log's own growth), and the growth of the SQLite file (page count x page size,
WAL included), each per junk message, and what that makes in a day at the rate
the node refused it.

Checked, else ``FAILED: ...`` and exit 1: the node counted every message
(``rejected.format`` equals the number published), the audit log accounts for
every one (``rejected`` entries plus the steps of ``rejected_many`` ones), and
the inbox holds nothing afterwards.

``--baseline DIR`` runs the same again with the node's code taken from another
checkout (``PYTHONPATH=DIR``: a clone of the previous version, say) and prints
the ratios of the two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from e2e import Cluster, LostError, platform_line, read_rows
from sigterm import run_stoppable

from broker import keys
from broker.config import load_config
from broker.natsconfig import inbox_stream
from broker.natsetup import connect_account

ME, HOSTILE = "USA", "KOR"
INBOX_BYTES = 2 * 2**30


@dataclass
class Growth:
    """What the audit log grew by over one run, and how fast the junk was refused."""

    junk: int
    seconds: float  # first publish to the last refusal counted
    entries: int
    entry_bytes: int
    checkpoint_bytes: int
    file_bytes: int

    def per(self, value: int) -> float:
        return value / self.junk

    def per_day(self) -> float:
        """File bytes a day at the rate this run's junk was refused."""
        return self.per(self.file_bytes) * self.junk / self.seconds * 86_400


def audit_size(path: Path) -> tuple[int, int, int, int]:
    """(entries, their bytes, checkpoint bytes, file bytes) of the audit log at ``path``."""
    entries, entry_bytes = read_rows(
        path, "SELECT count(*), coalesce(sum(length(entry)), 0) FROM entries"
    )[0]
    notes = read_rows(path, "SELECT coalesce(sum(length(note)), 0) FROM checkpoints")[0][0]
    pages = read_rows(path, "PRAGMA page_count")[0][0] * read_rows(path, "PRAGMA page_size")[0][0]
    return int(entries), int(entry_bytes), int(notes), int(pages)


def counted(cluster: Cluster) -> int:
    rows = read_rows(
        cluster.store_path(ME), "SELECT value FROM counters WHERE name = 'rejected.format'"
    )
    return int(rows[0][0]) if rows else 0


def audited(path: Path) -> int:
    """Refusals the audit log accounts for: ``rejected`` entries and ``rejected_many`` steps."""
    one = read_rows(
        path, "SELECT count(*) FROM entries WHERE json_extract(entry, '$.type') = 'rejected'"
    )[0][0]
    many = read_rows(
        path,
        "SELECT coalesce(sum(json_extract(entry, '$.count')), 0) FROM entries"
        " WHERE json_extract(entry, '$.type') = 'rejected_many'",
    )[0][0]
    return int(one) + int(many)


async def publish_junk(cluster: Cluster, rate: float, seconds: float) -> int:
    """Publish junk as KOR into USA's inbox at ``rate``/s for ``seconds``; return how many."""
    seed = (cluster.keydir / HOSTILE / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(cluster.url, HOSTILE, seed)
    js = nc.jetstream()
    start = time.monotonic()
    sent = 0
    try:
        while (now := time.monotonic() - start) < seconds:
            # At most 500 awaiting acks: a hub behind (it fsyncs each) slows the sender.
            due = min(int(now * rate) + 1, sent + 500)
            await asyncio.gather(
                *(
                    js.publish(f"msmt.to.{ME}.vessel", b"junk %d" % i, timeout=30)
                    for i in range(sent, due)
                )
            )
            sent = due
            await asyncio.sleep(0.01)
    finally:
        await nc.close()
    return sent


async def inbox_messages(cluster: Cluster) -> int:
    seed = (cluster.keydir / ME / keys.NATS_SEED_FILE).read_bytes().strip()
    nc = await connect_account(cluster.url, ME, seed)
    try:
        return int((await nc.jetstream().stream_info(inbox_stream(ME))).state.messages)
    finally:
        await nc.close()


async def run(args: argparse.Namespace, code: str | None) -> Growth:
    """One run: hub, USA's node (from ``code`` if given), junk, counts checked."""
    with tempfile.TemporaryDirectory(prefix="msmt-junk-", dir=args.tmp) as tmp:
        cluster = Cluster(Path(tmp), [ME])
        saved = os.environ.get("PYTHONPATH")
        try:
            await cluster.start_hub(INBOX_BYTES)
            cluster.write_configs()
            if code is not None:
                os.environ["PYTHONPATH"] = code
            cluster.start_nodes()
            await asyncio.sleep(2.0)  # start-up entries (policy) and the first checkpoint
            path = load_config(cluster.config_path(ME), env={}).audit_dir / "audit.sqlite"
            before = audit_size(path)
            start = time.monotonic()
            sent = await publish_junk(cluster, args.rate, args.seconds)
            deadline = time.monotonic() + args.timeout
            while (got := counted(cluster)) < sent:
                if cluster.procs[ME].poll() is not None:
                    raise LostError(f"{ME} died: {cluster.log_tail(ME)}")
                if time.monotonic() > deadline:
                    raise LostError(f"{ME} counted {got} of {sent} refusals")
                await asyncio.sleep(0.05)
            # The counters are written once a second: the last refusal was at most 1 s earlier.
            elapsed = time.monotonic() - start
            codes = cluster.stop_nodes()
            if any(codes.values()):
                raise LostError(f"node exit codes {codes}: {cluster.log_tail(ME)}")
            after = audit_size(path)
            if counted(cluster) != sent:
                raise LostError(f"{ME} counted {counted(cluster)} refusals of {sent}")
            if audited(path) != sent:
                raise LostError(f"the audit log accounts for {audited(path)} of {sent} refusals")
            if left := await inbox_messages(cluster):
                raise LostError(f"{ME}'s inbox still holds {left} messages")
            return Growth(sent, elapsed, *(a - b for a, b in zip(after, before, strict=True)))
        finally:
            if saved is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = saved
            cluster.kill()


def show(args: argparse.Namespace, ours: Growth, base: Growth | None) -> None:
    print(f"machine: {os.cpu_count()} CPUs, {platform_line()}")
    print(f"junk: {HOSTILE} -> {ME}, offered at up to {args.rate:.0f}/s for {args.seconds:.0f} s")
    runs = [("this build", ours)] + ([("baseline", base)] if base is not None else [])
    for name, g in runs:
        print(f"  {name}: {g.junk} published, all refused, at {g.junk / g.seconds:.0f}/s")
    header = f"{'per junk message':<28}" + "".join(f"{name:>14}" for name, _ in runs)
    print(header + ("     ratio" if base is not None else ""))
    rows: list[tuple[str, Callable[[Growth], float], str]] = [
        ("audit entries", lambda g: g.per(g.entries), "{:.4f}"),
        ("entry bytes", lambda g: g.per(g.entry_bytes), "{:.1f}"),
        ("checkpoint bytes", lambda g: g.per(g.checkpoint_bytes), "{:.1f}"),
        ("file bytes (SQLite pages)", lambda g: g.per(g.file_bytes), "{:.1f}"),
    ]
    for label, value, form in rows:
        cells = "".join(f"{form.format(value(g)):>14}" for _, g in runs)
        ratio = f"{value(ours) / value(base):10.4f}" if base is not None and value(base) else ""
        print(f"{label:<28}{cells}{ratio}")
    day = "".join(f"{g.per_day() / 1e9:>13.2f}G" for _, g in runs)
    ratio = f"{ours.per_day() / base.per_day():10.4f}" if base is not None else ""
    print(f"{'file bytes a day, this rate':<28}{day}{ratio}")
    print("counts: every junk message counted, accounted for in the audit log, and terminated")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 s of junk instead of 60 s")
    parser.add_argument("--rate", type=float, default=1000.0, help="junk messages a second")
    parser.add_argument("--seconds", type=float, help="how long to publish junk")
    parser.add_argument("--baseline", help="a checkout of other code to run the node from")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--tmp", help="scratch parent directory")
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = 10.0 if args.quick else 60.0
    ours = run_stoppable(run(args, None))
    base = run_stoppable(run(args, str(Path(args.baseline).resolve()))) if args.baseline else None
    show(args, ours, base)


if __name__ == "__main__":
    main()
