"""Benchmark the audit log: batched appends per second, and ``verify`` entries per second.

    python bench/audit.py [--quick]

Builds a real SQLite log of 1,000,000 entries (``--quick``: 100,000) in a temporary
directory, in batches of 1,000 (one signed checkpoint per batch), then times
``verify_log`` over it. The floor, measured in the same run: bare ``hashlib.sha256``
over the very same entry bytes, already in memory (no SQLite read, no tree, no
signatures), on one core. ``msmt audit verify`` uses two processes for logs of
200,000 entries or more on a multi-core machine (``--jobs 2``, the default there);
the one-process time (``--jobs 1``) is printed too.
Goals: verify 1M entries in under 10 s, and within 3x of the floor.

Memory: the peak resident size of a process that verifies the log (``--jobs 1``: the
whole tree in one process), against the same process that imports everything and
stops before verifying (the floor), per entry.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker import audit_events as ev
from broker.audit_verify import verify_log
from broker.auditlog import DB_FILE, AuditLog
from broker.note import ALG_ED25519, Verifier

T0 = datetime(2026, 11, 28, 12, tzinfo=UTC)


def events(n: int) -> list[ev.AuditEvent]:
    """A realistic mix: per report, one accept and sends to several partners."""
    partners = ["USA", "KOR", "GBR", "FRA", "AUS"]
    out: list[ev.AuditEvent] = []
    for i in range(n):
        at = T0 + timedelta(seconds=i)
        rid = uuid.UUID(int=i // 6)
        if i % 6 == 0:
            out.append(ev.accepted("JPN", at, report_id=rid, kind="vessel", feed="ais"))
        else:
            out.append(
                ev.sent(
                    "JPN",
                    at,
                    partner=partners[i % 5],
                    report_id=rid,
                    kind="vessel",
                    released=["vessel.imo", "vessel.name", "vessel.position#coarsen:0.1"],
                    policy_digest=hashlib.sha256(b"policy").hexdigest(),
                    jwe_sha256=hashlib.sha256(i.to_bytes(8, "big")).hexdigest(),
                    originator="JPN",
                    tlp="GREEN",
                    rel_to=["USA", "KOR", "GBR", "FRA", "AUS"],
                    recipient_kid=f"{partners[i % 5].lower()}-enc-1",
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 entries instead of 1M")
    args = parser.parse_args()
    total = 100_000 if args.quick else 1_000_000
    batch = 1_000
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    verifier = Verifier("JPN", ALG_ED25519, key.public_key().public_bytes_raw())
    # Event objects are built once and reused: their construction is the caller's cost.
    pool = events(6 * batch)
    with tempfile.TemporaryDirectory() as tmp:
        datadir = Path(tmp)
        log = AuditLog(datadir, "JPN", key)
        start = time.perf_counter()
        while log.size < total:
            offset = log.size % len(pool)
            log.append_many(pool[offset : offset + min(batch, total - log.size)])
        append_s = time.perf_counter() - start
        log.close()
        print(f"append: {total:,} entries in batches of {batch} (one fsync + checkpoint each)")
        print(f"  {total / append_s:,.0f} appends/s ({append_s:.1f} s)")

        floor, size = _floor(datadir)
        single = min(_timed(lambda: verify_log(datadir, [verifier])) for _ in range(2))
        double = min(_timed(lambda: verify_log(datadir, [verifier], jobs=2)) for _ in range(2))
        print(f"verify: {total:,} entries of {size:.0f} bytes on average")
        print(f"  bare SHA-256 floor (1 core): {total / floor:,.0f} entries/s ({floor:.2f} s)")
        for name, secs in (("msmt audit verify", double), ("  with --jobs 1", single)):
            print(
                f"  {name:<26} {total / secs:,.0f} entries/s ({secs:.2f} s), "
                f"{secs / floor:.2f}x floor, {secs * 1_000_000 / total:.1f} s per 1M"
            )
        print("  goals: under 10 s per 1M entries; within 3x of the floor")
        public = key.public_key().public_bytes_raw().hex()
        bare = min(_peak_rss(datadir, public, verify=False) for _ in range(2))
        whole = min(_peak_rss(datadir, public, verify=True) for _ in range(2))
        print(
            f"verify's peak RSS (--jobs 1): {whole / 2**20:.0f} MiB, the process without the"
            f" verify {bare / 2**20:.0f} MiB: {(whole - bare) / total:.0f} bytes per entry"
        )


def _floor(datadir: Path) -> tuple[float, float]:
    """Best of 3: bare SHA-256 over the same entry bytes, already in memory."""
    with sqlite3.connect(datadir / DB_FILE) as db:
        entries = [bytes(r[0]) for r in db.execute("SELECT entry FROM entries")]
    sha256 = hashlib.sha256
    floor = min(_timed(lambda: [sha256(e).digest() for e in entries]) for _ in range(3))
    return floor, sum(map(len, entries)) / len(entries)


_VERIFY_CHILD = """
import sys
from pathlib import Path
from broker.audit_verify import verify_log
from broker.note import ALG_ED25519, Verifier
verifier = Verifier("JPN", ALG_ED25519, bytes.fromhex(sys.argv[2]))
if sys.argv[3] == "verify":
    verify_log(Path(sys.argv[1]), [verifier])
# This process's own high-water mark (its memory since exec): getrusage's maxrss
# would carry over the parent's, which built the log.
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])
"""


def _peak_rss(datadir: Path, public: str, *, verify: bool) -> int:
    """Peak resident bytes of a fresh process that verifies the log (or only imports)."""
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        [sys.executable, "-c", _VERIFY_CHILD, str(datadir), public, "verify" if verify else "-"],
        env={**os.environ, "PYTHONPATH": root},
        cwd=root,  # "-c" puts the working directory first on sys.path
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the verify process failed ({done.returncode}): {done.stderr.strip()}")
    return int(done.stdout) * 1024  # kB


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
