"""Benchmark ``msmt audit replay`` on large logs: wall time, CPU and peak RSS beside a floor.

    python bench/replay.py [--quick] [--entries N] [--logs K] [--dir DIR] [--baseline DIR]

Builds K real signed logs (JPN, USA, KOR, GBR: default 3, ``--quick`` 2) of about N
entries each (default 200,000; ``--quick`` 50,000) with ``broker.auditlog`` in batches of
1,000, as nodes write them: each member logs its policy, then accepts reports round the
members and sends each to every partner its policy in ``nodes/`` releases anything to
(released keys exactly as that policy gives them), and each partner given logs the
receipt. A few sends are repeated (a crash), refused (``rejected``) or never logged
by the partner (``undelivered`` findings), and the partners count junk in bulk
(``rejected_many``): so every section of the output has something in it.

Then, each in a fresh process (peak RSS from ``wait4``): the floor, that is verifying
every log (``verify_log``) and reading back and parsing every entry (``parse_entry``,
the check replay makes of each), keeping nothing; then ``msmt audit replay`` as text,
with ``--timeline`` and with ``--json``, output to a file. Ratios are against the floor
of the same run. ``--dir`` keeps the logs (built
once, reused when they are already there); ``--baseline DIR`` runs the same replays
with the code of another checkout (``PYTHONPATH=DIR``) and checks its ``--json`` says
the same as ours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import audit_events as ev
from broker.audit_events import parse_entry
from broker.audit_verify import log_dir, verify_log
from broker.auditlog import DB_FILE, AuditLog
from broker.members import MEMBERS
from broker.note import ALG_ED25519, Verifier
from broker.policy import Policy, Release, load_policy
from broker.roster import format_time
from broker.sightings import KINDS

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 1, 1, tzinfo=UTC)
GIVEN = ("JPN", "USA", "KOR", "GBR")
NODES = ROOT / "nodes"
BATCH = 1_000
REPEAT_EVERY = 5_000  # sends: one honest repeat (a crash between the log and the store)
REFUSED_EVERY = 30_011  # sends to a given partner: refused at freshness instead of received
LOST_EVERY = 50_021  # sends to a given partner: never logged by it (an undelivered finding)
BULK_EVERY = 10_000  # entries of a partner: one rejected_many of junk


def key_of(member: str) -> Ed25519PrivateKey:
    """The member's deterministic log key (a benchmark, not a deployment)."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(member.encode()).digest())


def vkey(member: str) -> str:
    """The note verifier key ``--log-key`` takes for ``member``'s log."""
    public = key_of(member).public_key().public_bytes_raw()
    return Verifier(member, ALG_ED25519, public).vkey()


class World:
    """Every given member's events, in log order, generated report by report."""

    def __init__(self, members: Sequence[str]) -> None:
        self.members = members
        self.policies: dict[str, Policy] = {}
        for m in members:
            path = NODES / m / "policy.toml"
            self.policies[m] = load_policy(path.read_text(), member=m, source=str(path))
        self._released: dict[tuple[str, str, str, str], list[str]] = {}
        self.logs: dict[str, list[ev.AuditEvent]] = {m: [] for m in members}
        self.sends = 0

    def released(self, sender: str, partner: str, kind: str, tlp: str) -> list[str]:
        """Every disclosure key the sender's policy releases to ``partner`` (cached)."""
        key = (sender, partner, kind, tlp)
        if key not in self._released:
            cells = self.policies[sender].releasable(
                partner, kind=kind, tlp=tlp, originator=sender, rel_to=None
            )
            self._released[key] = sorted(
                c.disclosure_key for c in cells.values() if isinstance(c, Release)
            )
        return self._released[key]

    def start(self) -> None:
        """Each node's first start: its policy entry."""
        for m in self.members:
            digest = self.policies[m].digest
            self.logs[m].append(
                ev.policy_changed(m, T0, policy_digest=digest, previous_digest=None)
            )

    def report(self, n: int) -> None:
        """Report ``n``: accepted by one member, sent to every partner released anything."""
        sender = self.members[n % len(self.members)]
        at = T0 + timedelta(seconds=n)
        rid, kind, tlp = uuid.UUID(int=n), KINDS[n % len(KINDS)], ("GREEN", "AMBER")[n % 2]
        log = self.logs[sender]
        log.append(ev.accepted(sender, at, report_id=rid, kind=kind, feed="ais"))
        for partner in MEMBERS:
            released = [] if partner == sender else self.released(sender, partner, kind, tlp)
            if not released:
                continue
            self.sends += 1
            jwe = hashlib.sha256(f"{n}>{partner}".encode()).hexdigest()
            digest = self.policies[sender].digest
            send = ev.sent(
                sender, at + timedelta(seconds=1), partner=partner, report_id=rid, kind=kind,
                released=released, policy_digest=digest, jwe_sha256=jwe, originator=sender,
                tlp=tlp, rel_to=None, recipient_kid=f"{partner.lower()}-enc-1",
            )  # fmt: skip
            log.append(send)
            if self.sends % REPEAT_EVERY == 0:
                log.append(
                    ev.AuditEvent(dict(send.fields, at=format_time(at + timedelta(seconds=2))))
                )
            if partner not in self.logs or self.sends % LOST_EVERY == 0:
                continue
            theirs, when = self.logs[partner], at + timedelta(seconds=2)
            if self.sends % REFUSED_EVERY == 0:
                theirs.append(
                    ev.rejected(
                        partner,
                        when,
                        source=sender,
                        step="freshness",
                        reason="too old",
                        report_id=rid,
                        jwe_sha256=jwe,
                    )
                )
            else:
                theirs.append(
                    ev.received(
                        partner,
                        when,
                        sender=sender,
                        report_id=rid,
                        kind=kind,
                        fields=released,
                        jwe_sha256=jwe,
                        recipient_kid=f"{partner.lower()}-enc-1",
                    )
                )
            if len(theirs) % BULK_EVERY == 0:
                theirs.append(
                    ev.rejected_many(
                        partner, when, source="unknown", count=120, steps={"subject": 120}
                    )
                )


def build(root: Path, members: Sequence[str], entries: int) -> dict[str, int]:
    """Write the logs under ``root/<MEMBER>`` (about ``entries`` each); return their sizes."""
    world = World(members)
    world.start()
    n = 0
    while max(len(log) for log in world.logs.values()) < entries:
        world.report(n)
        n += 1
    sizes = {}
    for m, events in world.logs.items():
        log = AuditLog(root / m, m, key_of(m))
        for lo in range(0, len(events), BATCH):
            log.append_many(events[lo : lo + BATCH])
        sizes[m] = log.size
        log.close()
    return sizes


def existing(root: Path, members: Sequence[str]) -> bool:
    """Whether ``root`` already holds every member's log."""
    return all((log_dir(root / m) / DB_FILE).exists() for m in members)


def floor(dirs: Sequence[str]) -> None:
    """The floor's work, in its own process: verify each log, parse each entry, keep nothing.

    ``parse_entry`` is the check replay makes of every entry (canonical JSON, every
    field as its constructor makes it), so it belongs to the floor, as verifying does.
    """
    for d in dirs:
        directory = Path(d)
        member = directory.name
        report = verify_log(directory, [Verifier(member, ALG_ED25519, _raw(member))])
        db = sqlite3.connect(
            f"{(log_dir(directory) / DB_FILE).resolve().as_uri()}?mode=ro", uri=True
        )
        count = 0
        for count, (blob,) in enumerate(db.execute("SELECT entry FROM entries ORDER BY idx"), 1):
            parse_entry(blob, count - 1)
        db.close()
        if count != report.size:
            sys.exit(f"FAILED: read {count} entries of {member}'s log, verified {report.size}")


def _raw(member: str) -> bytes:
    return key_of(member).public_key().public_bytes_raw()


@dataclass(frozen=True)
class Run:
    """One process's cost: wall seconds, CPU seconds, peak RSS in MiB, its exit status."""

    wall: float
    cpu: float
    rss_mib: float
    code: int
    out_bytes: int = 0


# Runs the command and reports its own rusage. A child's ru_maxrss starts at the RSS of
# the process that forked it (Linux records the old address space's peak at exec), so
# the command is started from this small interpreter, not from the benchmark that
# built the logs in memory.
_WRAPPER = """
import json, os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, ru = os.wait4(pid, 0)
print("RUSAGE", json.dumps([ru.ru_utime + ru.ru_stime, ru.ru_maxrss]), file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(argv: list[str], out: Path | None, checkout: str | None = None) -> Run:
    """Run ``argv`` in a fresh process, stdout to ``out``; its own CPU time and peak RSS.

    With ``checkout``, the code is that checkout's: it is first on ``PYTHONPATH`` and
    the working directory (``python -c`` puts the working directory first).
    """
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = checkout
    start = time.perf_counter()
    with open(out or os.devnull, "wb") as sink:
        proc = subprocess.run(
            [sys.executable, "-c", _WRAPPER, *argv],
            stdout=sink,
            stderr=subprocess.PIPE,
            env=env,
            cwd=checkout or ROOT,
            check=False,
        )
    wall = time.perf_counter() - start
    err = proc.stderr.decode(errors="replace")
    if proc.returncode not in (0, 1) or "RUSAGE" not in err:
        sys.exit(f"FAILED: {' '.join(argv[:4])}... exited {proc.returncode}: {err[-500:]}")
    cpu, maxrss = json.loads(err.rsplit("RUSAGE", 1)[1])
    size = out.stat().st_size if out is not None else 0
    # ru_maxrss is in KiB on Linux.
    return Run(wall, cpu, maxrss / 1024, proc.returncode, size)


def replay_argv(dirs: Sequence[Path], *extra: str) -> list[str]:
    """``msmt audit replay`` of ``dirs`` with their log keys and the repository's policies."""
    args = ["audit", "replay", *map(str, dirs), "--policies", str(NODES), *extra]
    for d in dirs:
        args += ["--log-key", vkey(d.name)]
    runner = "import sys; from broker.cli import main; sys.argv[0] = 'msmt'; main()"
    return [sys.executable, "-c", runner, *args]


MODES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text", ()),
    ("--timeline", ("--timeline",)),
    ("--json", ("--json",)),
)


def run_all(
    dirs: Sequence[Path], scratch: Path, checkout: str | None, name: str
) -> Iterator[tuple[str, Run, Path]]:
    """Each output mode of ``checkout``'s replay (the baseline may not have ``--summary``)."""
    for mode, extra in MODES:
        if mode == "--timeline" and not _has_timeline(checkout or str(ROOT)):
            continue  # before --timeline, the text always had the timeline
        out = scratch / f"{name}{mode.replace('-', '_')}.out"
        yield mode, measure(replay_argv(dirs, *extra), out, checkout), out


def _has_timeline(checkout: str) -> bool:
    """Whether ``checkout``'s replay has ``--timeline``, in whichever CLI file defines it.

    Looked for in every file of ``broker/cli``: the option moved out of ``audit.py``
    (55c38ac), and a look there alone skipped the mode for every checkout since.
    """
    cli = Path(checkout) / "broker" / "cli"
    return any('"--timeline"' in f.read_text() for f in cli.glob("*.py"))


def same_json(ours: Path, base: Path) -> str:
    """Compare two ``--json`` outputs: every member the baseline has, ours must have, equal.

    At every depth: a member ours adds to each item of a list (``receipt_kid`` in each
    exchange, format 3) is no difference, one the baseline has and ours lacks or
    spells otherwise is.
    """
    a, b = json.loads(ours.read_bytes()), json.loads(base.read_bytes())
    differ = [k for k in b if k not in a or not _covers(a[k], b[k])]
    return "identical members" if not differ else f"DIFFER in {', '.join(differ)}"


def _covers(ours: object, base: object) -> bool:
    """Whether ``ours`` says all ``base`` says: its objects may have more members."""
    if isinstance(base, dict):
        return isinstance(ours, dict) and all(
            k in ours and _covers(ours[k], v) for k, v in base.items()
        )
    if isinstance(base, list):
        return (
            isinstance(ours, list)
            and len(ours) == len(base)
            and all(_covers(x, y) for x, y in zip(ours, base, strict=True))
        )
    return type(ours) is type(base) and ours == base


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 logs of 50,000 entries")
    parser.add_argument("--entries", type=int, help="entries per log (about)")
    parser.add_argument("--logs", type=int, choices=range(2, len(GIVEN) + 1), help="how many logs")
    parser.add_argument("--dir", help="keep the logs here (reused if already built)")
    parser.add_argument("--baseline", help="a checkout of other code to replay with too")
    parser.add_argument("--floor-of", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_of:
        floor(args.floor_of)
        return
    entries = args.entries or (50_000 if args.quick else 200_000)
    members = GIVEN[: args.logs or (2 if args.quick else 3)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir) if args.dir else Path(tmp) / "logs"
        if existing(root, members):
            print(f"logs: reusing {root}")
        else:
            start = time.perf_counter()
            sizes = build(root, members, entries)
            built = ", ".join(f"{m} {n:,}" for m, n in sizes.items())
            print(f"logs: built {built} entries in {time.perf_counter() - start:.0f} s")
        dirs = [root / m for m in members]
        scratch = Path(tmp)
        print(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
        base = measure([sys.executable, __file__, "--floor-of", *map(str, dirs)], None)
        print(
            "floor (verify every log, parse_entry every entry, keep nothing): "
            f"{base.wall:.1f} s wall, {base.cpu:.1f} s CPU, {base.rss_mib:.0f} MiB peak RSS"
        )
        checkouts: list[tuple[str, str | None]] = [("this build", None)]
        if args.baseline:
            checkouts.append(("baseline", str(Path(args.baseline).resolve())))
        print(f"{'replay':<22}{'wall s':>8}{'CPU s':>8}{'MiB':>7}{'x floor':>9}{'x RSS':>7}  exit")
        outputs: dict[tuple[str, str], Path] = {}
        for name, checkout in checkouts:
            for mode, run, out in run_all(dirs, scratch, checkout, name.replace(" ", "_")):
                outputs[(name, mode)] = out
                label = f"{name} {mode}"
                print(
                    f"{label:<22}{run.wall:>8.1f}{run.cpu:>8.1f}{run.rss_mib:>7.0f}"
                    f"{run.cpu / base.cpu:>9.2f}{run.rss_mib / base.rss_mib:>7.2f}  {run.code}"
                    f"  ({_size(run.out_bytes)} out)"
                )
        print("x floor: CPU seconds over the floor's; x RSS: peak RSS over the floor's")
        if args.baseline:
            verdict = same_json(outputs[("this build", "--json")], outputs[("baseline", "--json")])
            print(f"--json of this build against the baseline's: {verdict}")


if __name__ == "__main__":
    main()
