"""What several ``msmt`` commands share: options parsed alike, stdout's and stderr's failures."""

from __future__ import annotations

import codecs
import contextlib
import errno
import math
import os
import sys
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Final, TextIO, cast

import click

from broker.errors import StdoutError, UsageError
from broker.log import one_line

NODE_UMASK: int = 0o077
"""What a command on a node creates is its user's alone (the sample systemd unit's ``UMask``)."""


def private_files(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """A click option's callback: the command runs with umask 077 (``NODE_UMASK``).

    Whatever the caller's umask: a node's data directory holds reports in the
    clear and what partners sent, so all a command on it creates (store and audit
    log with their -wal and -shm, spool, state and feeds files, the data
    directory's own parents) is 0700/0600, not only what sets its own mode.
    ``msmt demo`` runs so too: ``--keep`` keeps 11 members' private keys and stores.
    """
    # Files meant for others (the intake socket) are chmodded explicitly. Put
    # back when the command ends: in a test's process, the next one's umask.
    before = os.umask(NODE_UMASK)
    ctx.call_on_close(lambda: os.umask(before))
    return value


CONFIG = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    callback=private_files,
    help="The node's node.toml.",
)
"""``--config``: the node's ``node.toml``, for every command that works on one node.

Each such command runs with umask 077 (``NODE_UMASK``), as ``msmt node run`` does.
"""


def _silence(fd: int) -> None:
    # Nothing more can reach stdout's reader (gone, or a full disk), and Python's
    # own flush at exit would otherwise fail too and print "Exception ignored ...".
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def stdout_is_utf8() -> bool:
    """Whether text written to stdout is encoded as UTF-8 (else JSON there is escaped)."""
    encoding = getattr(sys.stdout, "encoding", None) or ""
    return codecs.lookup(encoding).name == "utf-8" if encoding else False


class _GuardedStdout:
    """``sys.stdout`` whose failures are one ``StdoutError``, never a raw ``OSError``.

    A raw ``OSError`` from a write is ambiguous where it surfaces (``msmt submit``
    took its closed stdout for the node's socket), and click turns a broken pipe
    into a silent exit status 1 and anything else into a traceback.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._failed: OSError | None = None

    def write(self, text: str) -> int:
        """Write as the stream does; ``StdoutError`` if stdout fails or has failed."""
        with self._failing():
            buffer = getattr(self._stream, "buffer", None)
            if buffer is None:
                return self._stream.write(text)
            # A write to a pipe whose reader leaves (``| head``), or to a file past
            # ``ulimit -f`` or a full disk, is cut short; the buffered writer returns
            # the short count of a large write, and unbuffered (PYTHONUNBUFFERED, as
            # containers set it) of every write, and the text layer drops it: the rest
            # was lost and the command exited 0 (a bad-input sweep; then an evidence
            # file cut at 4 KiB, a review). So the bytes go out here, and what is left
            # is written again, which then fails as a closed pipe or a full disk does.
            self._stream.flush()
            view = memoryview(text.encode(self._stream.encoding, self._stream.errors or "strict"))
            while view:
                written = buffer.write(view)
                if not written:
                    raise OSError(errno.EAGAIN, "stdout took none of a write")
                view = view[written:]
            buffer.flush()
            return len(text)

    def flush(self) -> None:
        """Flush as the stream does; ``StdoutError`` if stdout fails or has failed."""
        with self._failing():
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        # Once failed, always: click's own probe of the stream swallows the first
        # error, and what it writes next must not reach the /dev/null put in place.
        if self._failed is not None:
            raise StdoutError(self._failed)
        try:
            yield
        except OSError as exc:
            self._failed = exc
            with contextlib.suppress(OSError, ValueError):  # a test's stream has no fd
                _silence(self._stream.fileno())
            raise StdoutError(exc) from None


def _hold(fd: int, flags: int) -> None:
    # A standard fd closed at the start (">&-", "2>&-") would be the next file the
    # command opens (the store, the audit log), and what is written to that fd
    # (our output, a child's error text) would land in it: /dev/null holds it,
    # inheritable, so a child sees it too rather than a closed one.
    try:
        os.fstat(fd)
    except OSError:
        devnull = os.open(os.devnull, flags)
        if devnull != fd:  # fd 0 was closed too: os.open took the lowest
            os.dup2(devnull, fd)
            os.close(devnull)
        os.set_inheritable(fd, True)


@contextlib.contextmanager
def guarded_stdout() -> Iterator[None]:
    """Run with stdout's failures as ``StdoutError`` (one line, exit status 1).

    A stdout closed at the start (``>&-``) is held open on a /dev/null that
    refuses writes: the first write fails as a closed pipe does, and no file the
    command opens meanwhile becomes fd 1, where a child's output would land.
    """
    before = sys.stdout
    if before is None:
        _hold(1, os.O_RDONLY)
    stream = before or open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = cast(TextIO, _GuardedStdout(stream))
    try:
        yield
    finally:
        sys.stdout = before


class _Stderr:
    """``sys.stderr`` that never raises: a line that cannot be written is dropped.

    Nothing is left to tell when stderr itself fails (closed, a full disk, its
    reader gone), and telling must not fail the command: a node's first log line
    to /dev/full ended the node, and a failing command's own error line turned
    its exit status into 1 and a traceback. Whole lines go out in one write, each
    tried afresh (a disk that had no room may have some now); none is kept.
    """

    def __init__(self, fd: int, encoding: str) -> None:
        self._fd = fd
        self.encoding = encoding
        self.errors = "backslashreplace"  # as Python's own stderr
        self._partial = ""

    def write(self, text: str) -> int:
        """Write ``text``'s whole lines now, the rest with the next newline or flush."""
        lines, newline, self._partial = (self._partial + text).rpartition("\n")
        if newline:
            self._put(lines + newline)
        if len(self._partial) >= 1 << 16:  # no newline in sight: not held in memory
            self.flush()
        return len(text)

    def flush(self) -> None:
        """Write the unfinished line, if any."""
        if self._partial:
            self._put(self._partial)
            self._partial = ""

    def _put(self, text: str) -> None:
        data = memoryview(text.encode(self.encoding, self.errors))
        with contextlib.suppress(OSError):  # dropped: see the class
            while data:
                data = data[os.write(self._fd, data) :]

    def fileno(self) -> int:
        """The file descriptor (2)."""
        return self._fd

    def isatty(self) -> bool:
        """Whether stderr is a terminal (the log is readable text there, JSON elsewhere)."""
        return os.isatty(self._fd)

    def writable(self) -> bool:
        """Always: writes never fail."""
        return True


def _fd(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None


@contextlib.contextmanager
def guarded_stderr() -> Iterator[None]:
    """Run with a stderr whose failures drop the line rather than fail the command.

    A stderr closed at the start (``2>&-``) is held open on /dev/null, as
    stdout is: error text and log lines go nowhere, never into a file the
    command opened (the store, the audit log) as fd 2. A stream without a file
    descriptor (a test's) is left as it is.
    """
    before = sys.stderr
    if before is None:
        _hold(2, os.O_WRONLY)
    elif _fd(before) != 2:
        yield
        return
    else:
        with contextlib.suppress(OSError):
            before.flush()
    sys.stderr = cast(TextIO, _Stderr(2, getattr(before, "encoding", None) or "utf-8"))
    try:
        yield
    finally:
        sys.stderr = before


def hold_stdin() -> None:
    """Hold a stdin closed at the start (``<&-``) on /dev/null, as stdout and stderr are.

    Otherwise the next file the command opens (the store, the audit log) becomes
    fd 0. A command then asked to read ``-`` refuses (``stdin_buffer``).
    """
    if sys.stdin is None:
        _hold(0, os.O_RDONLY)


def stdin_buffer() -> BinaryIO:
    """Stdin's bytes, for a command given ``-``; ``UsageError`` if stdin was closed (``<&-``).

    At a terminal it says first, on stderr, that it reads there: ``msmt validate``
    with no file otherwise just waited, and a new user took it for hung.
    """
    if sys.stdin is None:
        raise UsageError("stdin is closed: give a file, or pipe the input in")
    if sys.stdin.isatty():
        click.echo("reading from the terminal: type or paste the input, then Ctrl-D", err=True)
    return sys.stdin.buffer


def write_stdout(pieces: Iterable[str], what: str) -> None:
    """Write ``pieces`` to stdout in blocks: a long output is never one string in memory.

    Raises ``StdoutError`` naming ``what`` (``"replay"``) if stdout fails:
    output cut short must not end in exit status 0, as the reader may use it.
    Needs ``guarded_stdout`` (every ``msmt`` command runs in it).
    """
    block: list[str] = []
    try:
        for piece in pieces:
            block.append(piece)
            if len(block) >= 4096:
                sys.stdout.write("".join(block))
                block.clear()
        sys.stdout.write("".join(block))
        sys.stdout.flush()
    except StdoutError as exc:
        raise StdoutError(exc.cause, what) from None


def echo_line(text: str, *, err: bool = False) -> None:
    r"""Print ``text`` as one line of output, escaped by ``one_line`` as an error line is.

    For success and info lines that name what the operator gave (a path, a
    name): ``wrote {path}`` with a newline in the path's name would forge a
    second line for whoever reads the output, and ``\x1b[`` restyle a terminal.
    Not capped: such a line is short, and a path left out in part is no use.
    """
    click.echo(one_line(text), err=err)


ERROR_LINE_MAX: Final = 4096
"""Characters of an error's reason shown at most: its start and its end, the middle left out."""


def error_line(exc: Exception) -> str:
    """The one line an error is shown as: ``msmt: error: REASON``, escaped by ``one_line``.

    A reason quoting a huge value the operator gave (a 100 KB report id) keeps its
    first and last parts, since what went wrong is often said after the value.
    """
    reason = one_line(str(exc))
    if len(reason) > ERROR_LINE_MAX:
        head, tail = ERROR_LINE_MAX * 2 // 3, ERROR_LINE_MAX // 3
        left_out = len(reason) - head - tail
        reason = f"{reason[:head]} [... {left_out} characters left out ...] {reason[-tail:]}"
    return f"msmt: error: {reason}"


class Finite(click.FloatRange):
    """A ``click.FloatRange`` that refuses NaN and infinities as well.

    NaN compares false with both bounds, so ``--wait nan`` passed the range and was
    taken, and a range with no upper bound took ``inf`` (a bad-input sweep).
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The number, or click's usage error for one not finite or outside the range."""
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def rfc3339(option: str, text: str) -> datetime:
    """An option's RFC 3339 time with its zone; ``UsageError`` naming the option otherwise.

    RFC 3339 lets ``T`` and ``Z`` be lower case (section 5.6), which Python does not read.
    """
    try:
        when = datetime.fromisoformat(text.upper())
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an RFC 3339 time") from None
    if when.utcoffset() is None:
        raise UsageError(f"{option} {text!r} needs a time zone, e.g. 2026-11-01T00:00:00Z")
    return when
