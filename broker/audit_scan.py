"""Read a log's entries and hash them into RFC 6962 leaves, on two cores when the log is large.

Hashing is CPU-bound and holds the GIL for entries this small, so a second
*process*, not a thread, is what halves the wall time of ``msmt audit verify``
on a big log. The helper is this module run as ``python -m broker.audit_scan``:
it imports only ``hashlib`` and ``sqlite3``, so it starts in milliseconds (a
multiprocessing "spawn" child would re-import the whole CLI), and it writes the
concatenated 32-byte leaf hashes to stdout.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Final

PARALLEL_FROM: Final = 200_000
"""Logs with at least this many entries are hashed by two processes."""
_NOT_BLOB: Final = 3  # helper exit code: an entry is not stored as a BLOB


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open an audit database read-only, with a page cache sized for one full scan."""
    # A file URI needs an absolute path; operators pass relative ones ("data/JPN").
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    db.execute("PRAGMA cache_size=-65536")
    return db


def hash_range(db: sqlite3.Connection, lo: int, hi: int) -> bytearray:
    """Return the leaf hashes of entries ``[lo, hi)``, in index order, 32 bytes each end to end.

    Packed, not a list: a ``bytes`` object and its list slot cost 88 bytes a leaf,
    against 32 (``broker.merkle.Levels.from_packed`` keeps the array as it is).
    Raises ``TypeError`` if an entry is not stored as a BLOB (a hand-edited file).
    """
    sha256 = hashlib.sha256
    rows = db.execute("SELECT entry FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (lo, hi))
    leaves = bytearray()
    for (entry,) in rows:
        leaves += sha256(b"\x00" + entry).digest()
    return leaves


class LeafScan:
    """Hash entries ``[0, size)``: the upper part in a helper process, the rest by the caller.

    Use: ``scan = LeafScan(path, size)``, then ``scan.local(db)`` inside the
    caller's read transaction, then ``scan.result()``. Entries below ``size``
    never change in an honest log, so the helper may read them outside that
    transaction; a missing row shows up as a short result.
    """

    def __init__(self, path: Path, size: int, parallel_from: int = PARALLEL_FROM) -> None:
        self.size = size
        # Split on a 4096-entry boundary near the middle: any split is correct,
        # an even one balances the two processes.
        self.split = size if size < parallel_from else (size // 2) & ~4095
        self._proc: subprocess.Popen[bytes] | None = None
        if self.split < size:
            # Our own interpreter and module, with fixed arguments: no shell, no user input.
            # -P: the working directory is not on the import path (a review: verify run
            # from /tmp imported a hashlib.py another user put there), as planpool's.
            self._proc = subprocess.Popen(  # noqa: S603
                [
                    sys.executable,
                    "-P",
                    "-m",
                    "broker.audit_scan",
                    str(path),
                    str(self.split),
                    str(size),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        self._leaves = bytearray()

    def local(self, db: sqlite3.Connection) -> None:
        """Hash the lower part of the range on this process."""
        self._leaves = hash_range(db, 0, self.split)

    def result(self) -> bytearray:
        """Return all leaf hashes, packed as ``hash_range``'s, waiting for the helper.

        Raises like ``hash_range``.

        Raises ``OSError`` if the helper fails for another reason.
        """
        if self._proc is not None:
            blob, err = self._proc.communicate()
            code, self._proc = self._proc.returncode, None
            if code == _NOT_BLOB:
                raise TypeError("an entry is not stored as a BLOB")
            if code != 0:
                last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise OSError(f"leaf-hashing helper failed ({code}): {last[0]}")
            self._leaves += blob
        return self._leaves

    def close(self) -> None:
        """Stop the helper process if it is still running (idempotent)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def _main(argv: list[str]) -> int:
    path, lo, hi = Path(argv[0]), int(argv[1]), int(argv[2])
    db = open_readonly(path)
    try:
        leaves = hash_range(db, lo, hi)
    except TypeError:
        return _NOT_BLOB
    finally:
        db.close()
    sys.stdout.buffer.write(leaves)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
