"""``msmt demo``: the whole MSMT on this machine, end to end, and whether it all checks out.

Everything is real: the venv's ``nats-server`` with the generated accounts, keys
and configuration written into a scratch directory, and the 11 member nodes as
``msmt node run`` subprocesses with the repository's ``nodes/`` policies, exactly
as an operator runs them (separate processes also use every core, and one node's
failure cannot take the others down). Feeds submit generated sightings over each
node's intake socket; the demo watches every node's ``/metrics`` until each
released report has arrived and each audit log is cosigned, stops the nodes,
then checks the stores against the senders' policies and runs the same
verification as ``msmt audit verify`` and ``msmt audit replay``.

Whatever happens (failure, Ctrl-C, SIGTERM) every process the demo started is
stopped and, without ``--keep``, the scratch directory is removed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn

import aiohttp

from broker.demo_results import read_inboxes, replay_all, verify_audits, views
from broker.demo_view import Outcome, Tally, first_failure, progress_lines
from broker.demo_watch import Display, all_cosigned, snapshot, wait_ready
from broker.demo_world import DemoFailedError, World, expected_releases, feed, feed_records
from broker.errors import UsageError
from broker.files import open_ancestor
from broker.members import MEMBERS
from broker.store import InboxEntry

__all__ = [
    "DEFAULT_SIGHTINGS",
    "DemoFailedError",
    "Display",
    "Options",
    "run",
    "scratch",
    "signals_interrupt",
]

DEFAULT_SIGHTINGS: Final = 300
# Bounds for a heavily loaded machine; an idle 2-core one needs about a tenth of them.
DELIVERY_TIMEOUT: Final = 120.0
COSIGN_TIMEOUT: Final = 60.0


@dataclass(frozen=True)
class Options:
    """What ``msmt demo`` was asked for."""

    sightings: int = DEFAULT_SIGHTINGS
    keep: Path | None = None
    nodes: Path = Path("nodes")


def interrupt_once(_sig: int, _frame: object) -> NoReturn:
    """A signal handler: one KeyboardInterrupt, then SIGTERM and SIGINT are ignored.

    A second signal (Ctrl-C pressed twice, two SIGTERMs 0.3 s apart in a review)
    landed in the clean-up the first began, cut it short, and left the hub and
    nodes running and the keys in the scratch folder.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into one KeyboardInterrupt: the demo cleans up, undisturbed.

    After the first, both are ignored until the block ends (``interrupt_once``).
    """
    previous = {sig: signal.signal(sig, interrupt_once) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def scratch(keep: Path | None) -> Iterator[Path]:
    """The demo's directory: ``keep`` (new or empty) or a temporary one removed afterwards."""
    if keep is None:
        root = Path(tempfile.mkdtemp(prefix="msmt-demo-"))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    above = open_ancestor(keep)
    if above is not None:
        # A second review: under a parent of another user's, the kept folder was
        # swapped for one of theirs and root's report written through their link.
        raise UsageError(f"--keep {keep}: {above}")
    try:
        keep.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        _check_kept(keep)
    except OSError as exc:
        raise UsageError(f"--keep {keep}: cannot create it: {exc.strerror}") from None
    above = open_ancestor(keep)  # again: a parent it made may have been another's first
    if above is not None:
        raise UsageError(f"--keep {keep}: {above}")
    _check_kept(keep)
    yield keep.resolve()


def _check_kept(keep: Path) -> None:
    # A local user's trial: an empty /tmp/msmt-demo it had made 0777 was taken as is,
    # and its links there had root's demo overwrite any file. Ours alone, or new.
    info = keep.lstat()
    if not stat.S_ISDIR(info.st_mode) or any(keep.iterdir()):
        raise UsageError(f"--keep {keep}: must be a new or empty directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise UsageError(
            f"--keep {keep}: must be a new directory, or an empty one of yours that nobody"
            f" else may write to (owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}):"
            " others could plant links in it"
        )


async def _watch(
    world: World,
    session: aiohttp.ClientSession,
    records: dict[str, list[dict[str, Any]]],
    expected: dict[tuple[str, str], set[str]],
    display: Display,
    started: float,
) -> tuple[dict[str, Tally], list[str]]:
    """Feed the sightings and show progress until every release arrived and logs are cosigned."""
    total = sum(len(r) for r in records.values())
    answers: list[dict[str, Any]] = []
    feeding = asyncio.ensure_future(
        asyncio.gather(
            *(feed(world.nodes[m], recs, 4, answers.append) for m, recs in records.items())
        )
    )
    # On Ctrl-C the feeds are cancelled with everything else; retrieve that quietly.
    feeding.add_done_callback(lambda f: None if f.cancelled() else f.exception())
    want = {k: len(v) for k, v in expected.items()}
    problems: list[str] = []
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    cosign_deadline: float | None = None
    try:
        while True:
            tallies, received = await snapshot(world, session)
            display.show(progress_lines(time.monotonic() - started, len(answers), total, tallies))
            dead = [m for m, n in world.nodes.items() if n.died()]
            if dead:  # checked first: a dead node also fails its feed
                node = world.nodes[dead[0]]
                raise DemoFailedError(f"the {node.member} node died: {node.log_tail()}")
            if feeding.done() and not feeding.cancelled() and feeding.exception() is not None:
                raise DemoFailedError(f"a feed failed: {feeding.exception()}")
            delivered = all(received.get(k, 0) >= n for k, n in want.items())
            idle = sum(t.outbox for t in tallies.values()) == 0
            if feeding.done() and delivered and idle:
                cosign_deadline = cosign_deadline or time.monotonic() + COSIGN_TIMEOUT
                if all_cosigned(world):
                    break
                if time.monotonic() > cosign_deadline:
                    problems.append(
                        f"audit logs not cosigned by all partners within {COSIGN_TIMEOUT:.0f}s"
                    )
                    break
            elif time.monotonic() > deadline:
                problems.append(f"not every release arrived within {DELIVERY_TIMEOUT:.0f}s")
                break
            await asyncio.sleep(0.25)
    finally:
        if not feeding.done():
            feeding.cancel()
    await asyncio.gather(feeding, return_exceptions=True)
    refused = [a for a in answers if a.get("status") != "accepted"]
    if refused:
        problems.append(f"{len(refused)} feed records were not accepted, e.g. {refused[0]}")
    tallies, _ = await snapshot(world, session)
    display.show(
        progress_lines(time.monotonic() - started, len(answers), total, tallies), final=True
    )
    return tallies, problems


def _timeline(inboxes: dict[str, list[InboxEntry]]) -> list[tuple[float, str, str, str]]:
    rows = [(e.received_at, e.sender, viewer, e.kind) for viewer, es in inboxes.items() for e in es]
    if not rows:
        return []
    t0 = min(r[0] for r in rows)
    return sorted((t - t0, s, r, k) for t, s, r, k in rows)


async def run(opts: Options, root: Path, display: Display, say: Callable[[str], None]) -> Outcome:
    """Run the whole demo in ``root``; always stops what it started. Returns what it found."""
    started = time.monotonic()
    world = World(root, opts.nodes)
    try:
        world.prepare()
        say(f"keys, NATS accounts and 11 node configs written under {root}")
        await world.start_hub()
        world.start_nodes()
        async with aiohttp.ClientSession() as session:
            await wait_ready(world, session)
            say(
                f"hub and {len(world.nodes)} nodes ready after {time.monotonic() - started:.1f}s;"
                " below, each member's reports sent>received"
            )
            records = feed_records(opts.sightings, datetime.now(UTC))
            expected = expected_releases(world.policies, records)
            tallies, problems = await _watch(world, session, records, expected, display, started)
        codes = await asyncio.to_thread(world.stop_nodes)
    finally:
        world.kill_all()
    inboxes = read_inboxes(world)
    received: dict[tuple[str, str], set[str]] = {}
    for viewer, entries in inboxes.items():
        for e in entries:
            received.setdefault((e.sender, viewer), set()).add(e.report_id)
    audits = verify_audits(world)
    replay_ok, replay_lines, replay_matrix = replay_all(world)
    shown, points = views(records, inboxes)
    outcome = Outcome(
        members=MEMBERS,
        sightings=sum(len(r) for r in records.values()),
        elapsed=0.0,
        expected=expected,
        received=received,
        rejected={m: t.rejected for m, t in tallies.items()},
        audits=audits,
        replay_lines=replay_lines,
        replay_ok=replay_ok,
        replay_matrix=replay_matrix,
        side_by_side=shown,
        timeline=_timeline(inboxes),
        vessels=points,
    )
    mismatch = sorted(
        f"{s}->{r}" for (s, r), ids in expected.items() if replay_matrix.get((s, r), 0) != len(ids)
    )
    outcome.failures = [*problems, *first_failure(outcome, audits, codes)]
    if replay_ok and mismatch:
        outcome.failures.append(
            f"audit replay's delivered sends differ from the policies for {', '.join(mismatch[:5])}"
        )
    outcome.elapsed = time.monotonic() - started
    return outcome
