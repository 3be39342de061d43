"""Memory a spool batch costs the node: one batch of refused lines through ``Spool.ingest``.

    python bench/spool.py [--lines N]

A real store and intake in a fresh process; one batch of N lines (``{}``, each
refused at the schema: the answer with the most words) moved into the spool and
ingested. It prints the process's peak resident memory before and after and
the increase per line, and its ratio to the bytes of the answers written (the
result file, measured in the same run): what holding them all would take at
the least. A batch's answers once stayed in memory until its end: 205 MB more
for 200,000 lines (about 9 times the answers' bytes), which a node killed for
memory would meet again at every start. Now they go to a file as they come; what
is left is the lines of one read (256 KiB, about 87,000 of these 3-byte lines at
most), so the increase stops growing once a batch is over 256 KiB.

Checked, else ``FAILED: ...`` and exit 1: every line got its answer, in the
result file filed beside the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.intake import Intake, Refusal
from broker.spool import Spool
from broker.store import NewReport, Store


def peak_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _nothing(_refused: list[Refusal], _feed: str) -> None:
    # The node records refusals in its audit log; that is not what is measured here.
    return None


async def run(lines: int) -> int:
    """Measure one batch of ``lines``; return the exit status."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        store = Store(root / "node.sqlite3")

        async def accept(batch: list[NewReport], feed: str) -> list[bool]:
            return await asyncio.to_thread(lambda: store.accept(batch, feed=feed))

        intake = Intake("JPN", 65_536, accept, record_rejects=_nothing, feed="spool")
        spool = Spool(root / "spool", intake)
        batch = root / "spool" / "junk.ndjson"
        batch.write_bytes(b"{}\n" * lines)
        before = peak_mb()
        started = time.perf_counter()
        filed = await spool.ingest(batch)
        took = time.perf_counter() - started
        grown = peak_mb() - before
        result = root / "spool" / "rejected" / "junk.ndjson.result.ndjson"
        written = result.read_bytes() if result.exists() else b""
        answers = written.count(b"\n")
        spool.close()
        store.close()
    print(f"{lines:,} refused lines, {lines * 3 / 1e6:.1f} MB, ingested in {took:.1f} s")
    print(f"peak RSS: +{grown:.1f} MB ({grown * 1e6 / lines:.0f} bytes a line)")
    floor = len(written) / 1e6
    print(f"the answers written: {floor:.1f} MB; peak increase / answers: {grown / floor:.2f}")
    if not filed or answers != lines:
        print(f"FAILED: {answers} answers for {lines} lines (filed: {filed})")
        return 1
    return 0


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.lines)))


if __name__ == "__main__":
    main()
