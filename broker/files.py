"""Reading a file an operator names (a config, a key, a roster): a regular file or nothing.

A FIFO named by mistake would block the command until some writer came, and a
device (``/dev/zero``, ``/dev/urandom``) would be read until memory ran out:
neither is a file anyone means to hand a command, so both fail at once, as an
``OSError`` each caller already turns into its one line.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

NOT_A_FILE = "not a regular file (a FIFO, socket or device)"
"""The ``strerror`` of the ``OSError`` for a path that is neither a file nor a directory."""


def read_file_bytes(path: Path, limit: int = -1) -> bytes:
    """The bytes of the regular file at ``path`` (links followed), or its first ``limit`` bytes.

    Raises ``OSError`` as ``open`` does (its ``strerror`` fit for one line), also
    ``IsADirectoryError`` for a directory and ``OSError`` with ``NOT_A_FILE`` for
    anything else that is not a regular file, before reading a byte of it.
    """
    # O_NONBLOCK: opening a FIFO for reading otherwise waits for a writer. It
    # changes nothing for a regular file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _require_regular(fd, path)
    except OSError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        return handle.read(limit)


def _require_regular(fd: int, path: Path) -> None:
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, NOT_A_FILE, str(path))


def read_file_text(path: Path, encoding: str = "utf-8") -> str:
    """The text of the regular file at ``path``, with line ends made LF as ``Path.read_text`` does.

    Raises ``OSError`` as ``read_file_bytes`` does, and ``UnicodeDecodeError``.
    """
    return read_file_bytes(path).decode(encoding).replace("\r\n", "\n").replace("\r", "\n")


def holds_nothing(path: Path) -> bool:
    """Whether the SQLite database at ``path`` is missing, or 0 bytes with no -wal that holds any.

    SQLite opens a file of 0 bytes as an empty database, as a start makes a new one:
    a new file, or a copy cut short (a full disk). Unreadable is not nothing:
    whatever opens it next says why.
    """
    wal = path.with_name(path.name + "-wal")
    try:
        return not any(p.is_file() and p.stat().st_size for p in (path, wal))
    except OSError:
        return False
