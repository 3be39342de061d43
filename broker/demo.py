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
import base64
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from broker import keys as keyfiles
from broker import samples
from broker.audit_events import parse_entry
from broker.audit_replay import replay
from broker.audit_verify import load, verify_log
from broker.auditlog import DB_FILE
from broker.checkpoint import roster_log_keys, roster_witness_keys
from broker.cli.audit import render_tables
from broker.config import NodeConfig, load_config
from broker.demo_view import (
    AuditResult,
    Outcome,
    Point,
    SideBySide,
    Tally,
    first_failure,
    progress_lines,
)
from broker.demo_view import side_by_side as make_side_by_side
from broker.errors import MsmtError, UsageError
from broker.intake import read_token, submit
from broker.members import MEMBERS
from broker.natsconfig import accounts_config, load_users
from broker.natsetup import setup_account
from broker.natsproc import NatsServer, free_port
from broker.policy import Policy, load_policy
from broker.sightings import leaf_values
from broker.store import InboxEntry, Store
from broker.validation import parse_record

FEEDERS: Final = ("JPN", "USA", "KOR", "GBR", "FRA", "AUS")
"""The members whose feeds submit sightings (the others only receive)."""

DEFAULT_SIGHTINGS: Final = 300
VIEWS: Final = (("JPN", ("USA", "FRA", "GBR")), ("KOR", ("JPN", "FRA", "GBR")))
"""Reports shown side by side: an originator, and three partners' copies of one of its reports."""

QUORUM: Final = len(MEMBERS) - 1
"""Cosignatures each log's latest checkpoint must carry: every partner witnessed it."""

READY_TIMEOUT: Final = 60.0
DELIVERY_TIMEOUT: Final = 60.0
COSIGN_TIMEOUT: Final = 30.0


class DemoFailedError(MsmtError):
    """The demo ran but something did not verify, reconcile or arrive."""


def msmt_command() -> list[str]:
    """The ``msmt`` executable of this environment."""
    exe = Path(sys.executable).parent / "msmt"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from broker.cli import main; main()"]


def clean_env() -> dict[str, str]:
    """The environment minus ``MSMT_*`` overrides, so node configs mean what they say."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}


@dataclass
class NodeProc:
    """One member node subprocess and where its files are."""

    member: str
    config_path: Path
    config: NodeConfig
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def died(self) -> bool:
        """Whether the process has exited."""
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self) -> str:
        """The node log's last line, for one-line error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"


@dataclass
class World:
    """The scratch directory: keys, hub, policies, node configs, data and logs."""

    root: Path
    policy_source: Path
    server: NatsServer | None = None
    nodes: dict[str, NodeProc] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)

    @property
    def keydir(self) -> Path:
        """Where ``msmt keys init`` wrote every member's keys."""
        return self.root / "keys"

    def prepare(self) -> None:
        """Generate keys and pseudonym keys; copy the policies; write each node's config."""
        keyfiles.init_keys(self.keydir, MEMBERS, now=datetime.now(UTC) - timedelta(minutes=1))
        self.server = NatsServer(
            workdir=self.root / "nats", extra_config=accounts_config(load_users(self.keydir))
        )
        for member in MEMBERS:
            source = self.policy_source / member / "policy.toml"
            try:
                text = source.read_text(encoding="utf-8")
            except OSError as exc:
                raise UsageError(
                    f"cannot read {source}: {exc.strerror} (run from the repository root "
                    "or pass --nodes)"
                ) from None
            folder = self.root / "nodes" / member
            folder.mkdir(parents=True)
            (folder / "policy.toml").write_text(text, encoding="utf-8")
            policy = load_policy(text, member=member, source=str(source))
            self.policies[member] = policy
            for key_id in policy.pseudonym_keys:
                path = self.keydir / member / "pseudonym" / f"{key_id}.key"
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as handle:
                    handle.write(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
            config_path = folder / "node.toml"
            config_path.write_text(
                f'member = "{member}"\n'
                'base_dir = "../.."\n'
                f'policy = "nodes/{member}/policy.toml"\n'
                f'data_dir = "data/{member}"\n'
                f"[nats]\nurls = [{json.dumps(self.server.url)}]\n"
                '[keys]\ndir = "keys"\n'
                f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n',
                encoding="utf-8",
            )
            config = load_config(config_path, env={})
            log_path = self.root / "logs" / f"{member}.log"
            self.nodes[member] = NodeProc(member, config_path, config, log_path)

    async def start_hub(self) -> None:
        """Start the hub and create every account's streams and consumers."""
        if self.server is None:
            raise UsageError("the hub is started after prepare()")
        await asyncio.to_thread(self.server.start)
        for account in (*MEMBERS, keyfiles.AUDIT_ACCOUNT):
            seed = (self.keydir / account / keyfiles.NATS_SEED_FILE).read_bytes().strip()
            await setup_account(self.server.url, account, seed)

    def start_nodes(self) -> None:
        """Start every node as ``msmt node run --config ...``, logging to ``logs/<M>.log``."""
        (self.root / "logs").mkdir(exist_ok=True)
        for node in self.nodes.values():
            with node.log_path.open("ab") as log:
                node.proc = subprocess.Popen(  # noqa: S603 - our own executable and config
                    [*msmt_command(), "node", "run", "--config", str(node.config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=clean_env(),
                    # Their own session: a terminal's Ctrl-C reaches the demo, which stops them.
                    start_new_session=True,
                )

    def stop_nodes(self, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every node, wait for each; return exit statuses (``None``: had to be killed)."""
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for member, node in self.nodes.items():
            if node.proc is None:
                continue
            try:
                codes[member] = node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
                codes[member] = None
        return codes

    def kill_all(self) -> None:
        """Kill whatever still runs (nodes, then the hub): the last resort on any exit."""
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
        if self.server is not None:
            self.server.stop()


# --- watching the nodes ---------------------------------------------------------------


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


async def wait_ready(world: World, session: aiohttp.ClientSession) -> None:
    """Wait until every node answers ``/readyz``; raise ``DemoFailedError`` if one dies or hangs."""
    deadline = time.monotonic() + READY_TIMEOUT
    pending = set(world.nodes)
    while pending:
        for member in sorted(pending):
            node = world.nodes[member]
            if node.died():
                raise DemoFailedError(f"the {member} node exited at start: {node.log_tail()}")
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


# --- feeding ----------------------------------------------------------------------------


def feed_records(total: int, now: datetime) -> dict[str, list[dict[str, Any]]]:
    """``total`` generated sightings of all three kinds, split among the feeding members."""
    share, extra = divmod(total, len(FEEDERS))
    return {
        member: samples.generate(share + (i < extra), seed=1000 + i, originators=(member,), now=now)
        for i, member in enumerate(FEEDERS)
    }


def expected_releases(
    policies: dict[str, Policy], records: dict[str, list[dict[str, Any]]]
) -> dict[tuple[str, str], set[str]]:
    """``(sender, recipient) -> report ids`` the senders' policies release."""
    expected: dict[tuple[str, str], set[str]] = {}
    for sender, recs in records.items():
        for record in recs:
            sighting = parse_record(json.dumps(record))
            for partner, decision in policies[sender].decide_all(sighting).items():
                if decision.sends:
                    expected.setdefault((sender, partner), set()).add(record["report_id"])
    return expected


async def feed(
    node: NodeProc,
    records: list[dict[str, Any]],
    batches: int,
    on_answer: Callable[[dict[str, Any]], None],
) -> None:
    """Submit ``records`` through the node's intake socket in a few spaced batches."""
    token = read_token(node.config.token_path)
    step = max(1, -(-len(records) // batches))
    for lo in range(0, len(records), step):
        body = samples.to_ndjson(records[lo : lo + step]).encode()

        async def chunks(data: bytes = body) -> AsyncIterator[bytes]:
            yield data

        await submit(node.config.socket_path, token, chunks(), on_answer)
        await asyncio.sleep(0.2)


# --- progress ---------------------------------------------------------------------------


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


# --- after the run: stores, audit logs, what to show ---------------------------------------


def read_inboxes(world: World) -> dict[str, list[InboxEntry]]:
    """Every node's stored received reports."""
    out: dict[str, list[InboxEntry]] = {}
    for member, node in world.nodes.items():
        if not node.config.store_path.exists():
            out[member] = []
            continue
        store = Store(node.config.store_path, readonly=True)
        try:
            out[member] = store.inbox(limit=10_000_000)
        finally:
            store.close()
    return out


def verify_audits(world: World) -> list[AuditResult]:
    """``msmt audit verify --keys keys --cosigned --quorum 10`` on every node's log."""
    roster = keyfiles.load_signed_roster(world.keydir).roster
    results = []
    for member, node in world.nodes.items():
        others = [m for m in MEMBERS if m != member]
        try:
            report = verify_log(
                node.config.audit_dir,
                roster_log_keys(roster, member),
                witnesses=roster_witness_keys(roster, others),
                quorum=QUORUM,
            )
        except MsmtError as exc:
            results.append(AuditResult(member, ok=False, detail=str(exc)))
            continue
        root = base64.b64encode(report.root).decode()
        results.append(
            AuditResult(
                member,
                ok=True,
                detail=(
                    f"{report.size} entries, {report.checkpoints} signed checkpoints, root "
                    f"{root[:16]}..., cosigned by {len(report.cosigners)} of "
                    f"{len(others)} partners (quorum {QUORUM})"
                ),
                size=report.size,
                cosigners=report.cosigners,
            )
        )
    return results


def replay_all(
    world: World,
) -> tuple[bool, list[str], dict[tuple[str, str], int], list[tuple[str, str, str, str]]]:
    """``msmt audit replay`` over every log: ok, summary lines, delivered matrix, timeline."""
    policies = {p.digest: p for p in world.policies.values()}
    logs: dict[str, list[dict[str, Any]]] = {}
    try:
        for node in world.nodes.values():
            loaded = load(node.config.audit_dir)
            data = loaded.entries(0, loaded.tree.size)
            logs[loaded.origin] = [parse_entry(d, i) for i, d in enumerate(data)]
        result = replay(logs, policies)
    except MsmtError as exc:
        return False, [f"FAIL: {exc}"], {}, []
    tables = render_tables(result, sorted(logs)).splitlines()
    findings_at = next(i for i, ln in enumerate(tables) if ln.startswith("Findings"))
    statuses: dict[str, int] = {}
    for e in result.exchanges:
        statuses[e.status] = statuses.get(e.status, 0) + 1
    lines = [
        f"{len(result.exchanges)} sends in {len(logs)} logs: "
        + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())),
        *tables[findings_at:],
    ]
    timeline = [(e.at, e.sender, e.recipient, e.kind) for e in result.exchanges]
    ok = not result.findings and set(statuses) == {"delivered"}
    return ok, lines, dict(result.matrix), timeline


def _position(fields: dict[str, Any]) -> tuple[float, float, str] | None:
    for key, value in fields.items():
        if key.split("#")[0] == "vessel.position" and isinstance(value, dict):
            note = key.partition("#")[2]
            return float(value["lat"]), float(value["lon"]), note
    return None


def views(
    records: dict[str, list[dict[str, Any]]], inboxes: dict[str, list[InboxEntry]]
) -> tuple[list[SideBySide], dict[str, list[Point]]]:
    """The side-by-side reports, and the first originator's vessel positions as seen."""
    by_key = {(e.sender, e.report_id, viewer): e for viewer, es in inboxes.items() for e in es}
    shown: list[SideBySide] = []
    for originator, viewers in VIEWS:
        candidates = [r for r in records.get(originator, []) if r["kind"] == "vessel"]
        # Prefer a ship-to-ship transfer that every viewer received something of.
        candidates.sort(
            key=lambda r: (
                -sum((originator, r["report_id"], v) in by_key for v in viewers),
                "counterpart" not in r["vessel"],
            )
        )
        if not candidates:
            continue
        record = candidates[0]
        leaves = leaf_values(parse_record(json.dumps(record)))
        got = {
            v: (
                by_key[(originator, record["report_id"], v)].fields
                if (originator, record["report_id"], v) in by_key
                else None
            )
            for v in viewers
        }
        shown.append(make_side_by_side(originator, record, leaves, got))
    points: dict[str, list[Point]] = {}
    originator, viewers = VIEWS[0]
    vessels = [r for r in records.get(originator, []) if r["kind"] == "vessel"]
    points[f"{originator} (original)"] = [
        Point(
            float(r["vessel"]["position"]["lat"]),
            float(r["vessel"]["position"]["lon"]),
            r["vessel"]["name"],
            "exact",
        )
        for r in vessels
    ]
    for viewer in viewers:
        seen = []
        for r in vessels:
            entry = by_key.get((originator, r["report_id"], viewer))
            pos = _position(entry.fields) if entry is not None else None
            if pos is not None:
                seen.append(
                    Point(
                        pos[0],
                        pos[1],
                        str(entry.fields.get("vessel.name", "")) if entry else "",
                        pos[2] or "exact",
                    )
                )
        points[viewer] = seen
    return shown, points


# --- the run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What ``msmt demo`` was asked for."""

    sightings: int = DEFAULT_SIGHTINGS
    keep: Path | None = None
    nodes: Path = Path("nodes")


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so a stopped demo cleans up as on Ctrl-C."""

    def interrupt(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        raise UsageError(f"--keep {keep}: must be a new or empty directory")
    keep.mkdir(parents=True, exist_ok=True)
    yield keep.resolve()


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
            if dead:
                node = world.nodes[dead[0]]
                raise DemoFailedError(f"the {node.member} node died: {node.log_tail()}")
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
    if feeding.exception() is not None and not problems:
        raise DemoFailedError(f"a feed failed: {feeding.exception()}")
    refused = [a for a in answers if a.get("status") != "accepted"]
    if refused:
        problems.append(f"{len(refused)} feed records were not accepted, e.g. {refused[0]}")
    tallies, _ = await snapshot(world, session)
    display.show(
        progress_lines(time.monotonic() - started, len(answers), total, tallies), final=True
    )
    return tallies, problems


def all_cosigned(world: World) -> bool:
    """Whether every node's latest checkpoint covers its whole log and carries the quorum."""
    for member, node in world.nodes.items():
        size, signed, names = cosigners(node.config.audit_dir / DB_FILE)
        if signed != size or len(names - {member}) < QUORUM:
            return False
    return True


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
            say(f"hub and {len(world.nodes)} nodes ready after {time.monotonic() - started:.1f}s")
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
    replay_ok, replay_lines, replay_matrix, _ = replay_all(world)
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
