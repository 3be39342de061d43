"""The spool directory: batch files moved into it are ingested, then filed with their answers.

The second way in from feeds beside the intake socket (``broker.intake``), for
feeds that write files: each record is answered as at the socket, and the
answers are written beside the file where it is filed (``done/`` or
``rejected/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

from broker.intake import MAX_BATCH, Intake, answer_bytes
from broker.log import Throttle, get_logger, one_line
from broker.validation import Line, LineSplitter

log = get_logger("intake")  # the same component as the socket's lines, as before


class Spool:
    """Ingest files moved into a directory; move each to ``done/`` or ``rejected/``.

    A file goes to ``done/`` when every record was accepted (or was already
    accepted before, a duplicate), else to ``rejected/`` (a record refused, or
    a conflict: other content under an id already accepted); its answers are written
    beside it as ``<name>.result.ndjson``. A name already filed there is never
    overwritten: the file and its answers go under ``<name>.1``, ``<name>.2``, ...
    If the store cannot accept, the file stays in place and is retried, since
    re-ingesting only yields duplicates.
    Names starting with ``.`` or ending in ``.tmp`` are ignored: feeds write
    there first, then rename.

    A file still open for writing (or mapped writable) by any process is left
    until it is closed, and one that grew while it was read is read again at the
    next poll: a feed that writes in place, against the contract, loses nothing
    to ``done/`` unread (``_open_for_writing``).

    Only regular files are read, and never through a link: a symbolic link
    (``passwd.ndjson -> /etc/passwd``) is refused unread and moved to
    ``rejected/`` with one answer saying why, as is anything found not to be a
    regular file once opened. A FIFO, socket or device is never opened: it
    stays where it is, logged once a minute. Directories are left alone.

    Nor is anything filed through a link. Whoever may move files into the spool
    may also rename ``done/`` and put a link to any folder in its place, or plant
    a link where an answer file is about to be written: a review moved a batch
    into the node's data directory, and overwrote its audit log with answers,
    that way. So ``done/`` and ``rejected/`` are opened without following a link,
    all filing is done relative to them, and every file the node writes there is
    created anew (``O_EXCL | O_NOFOLLOW``). If one of them is not a directory,
    nothing is read or filed (``spool_error`` says why) and every batch waits in the spool.
    The spool itself is opened once, at the start, and everything after is done
    relative to that: a feed that may write the spool's parent could otherwise
    swap the spool for a link to the data directory between two steps (a second
    review moved the node's signing key out so). A file with another name
    elsewhere (a hard link) is left unread and unchanged until it has none.

    A batch's answers go to a file as they come (``rejected/.answers.tmp``, then
    beside the batch), never all held in memory: one of 200,000 lines took 205 MB more
    (``bench/spool.py``).
    """

    def __init__(
        self, directory: Path, intake: Intake, stalled: Callable[[bool], None] | None = None
    ) -> None:
        self.dir = directory
        self.intake = intake
        self.throttle = Throttle()
        # ``run``'s stop: a batch being read is left, unfiled, once it is set (below).
        self._stop = asyncio.Event()
        # Told after each poll whether it ended in a spool_error (the folder unreadable,
        # a batch not filed, no room to answer one): batches wait meanwhile, and a
        # full-disk trial found nothing in /metrics or /readyz that said so.
        self._stalled = stalled or (lambda _: None)
        directory.mkdir(parents=True, exist_ok=True)
        # Following a link the operator configured, once; never again (see above).
        self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for sub in FILED_INTO:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(sub, 0o700, dir_fd=self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        """Let go of the spool directory (the node's stop)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def candidates(self) -> list[Path]:
        """Regular files and symbolic links waiting here (links to be refused), oldest first."""
        found: list[tuple[float, str]] = []
        with os.scandir(self.fd) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.name.endswith(".tmp"):
                    continue
                if entry.name in FILED_INTO:
                    continue  # where batches are filed: a link there is no batch
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # taken away meanwhile
                mode = info.st_mode
                if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                    found.append((info.st_mtime, entry.name))
                elif not stat.S_ISDIR(mode) and self.throttle.due("spool_ignored", entry.name):
                    # Opening a FIFO would wait for its writer, a device may act on
                    # an open: neither is read. Said, so a feed writing one is found.
                    log.warning(
                        "spool_file_ignored",
                        file=shown_name(entry.name),
                        kind=_file_kind(mode),
                        reason="not a regular file: move regular files into the spool",
                    )
        return [self.dir / name for _, name in sorted(found)]

    async def ingest(self, path: Path) -> bool:
        """Ingest one file; return whether it was finished (moved away)."""
        return await self._take(path) == "filed"

    async def _take(self, path: Path) -> Taken:
        try:
            opened = await asyncio.to_thread(_open_regular, self.fd, path.name)
        except _NotRegularError as exc:
            await self._refuse(path, exc.kind)
            return "filed"
        except OSError as exc:
            # This file only: a local user's trial stopped every batch behind one of
            # mode 000 (or one it held a lease on) in a group-shared spool.
            if exc.errno == errno.ENOENT:
                return "gone"  # its feed took it back between the listing and the open
            if exc.errno in _NOT_READABLE:
                # Not its to read, ever: filed unread with a reason, as a link is, so
                # that it neither waits for good nor holds msmt_spool_stalled at 1.
                await self._refuse(
                    path, f"not readable by the node ({exc.strerror})", reason=NOT_READABLE
                )
                return "filed"
            if exc.errno in _NOT_OPENED:
                raise _NotOpenedError(exc) from None
            raise
        with opened as handle:
            fd = handle.fileno()
            if await asyncio.to_thread(_open_for_writing, fd):
                self._being_written(path, f"open for writing: {_LEFT_OPEN}")
                return "written"
            if os.fstat(fd).st_nlink > 1:
                # Another name of this file is elsewhere, where the feed put it (a
                # hard link to one of the node's files, say): neither read nor made
                # 0600; a feed that links a batch in and then unlinks the first
                # name gets it read at a later poll.
                self._being_written(
                    path,
                    "it has another name (a hard link): left unread until it has none;"
                    " move files into the spool, do not link them",
                )
                return "written"
            # Both folders before a record is read: one that is not a directory must
            # stop the batch before its records are taken, not after (then read again
            # at every poll, each record answered "duplicate": a review of the change).
            folders: dict[str, int] = {}
            try:
                for name in FILED_INTO:
                    folders[name] = await asyncio.to_thread(_open_filed_into, self.fd, name)
                return await self._answer(path, fd, folders)
            finally:
                for opened_folder in folders.values():
                    os.close(opened_folder)

    async def _answer(self, path: Path, fd: int, folders: dict[str, int]) -> Taken:
        # Reads the batch open as ``fd``, its answers into rejected/'s ANSWERS, then files it.
        rejected = folders["rejected"]
        await asyncio.to_thread(_room_to_answer, rejected, fd, path.name)
        splitter = LineSplitter(self.intake.max_bytes)
        answers = await asyncio.to_thread(_create, rejected, ANSWERS)
        read = records = 0
        ok, unavailable = True, False

        async def answer(lines: list[Line]) -> None:
            nonlocal records, ok, unavailable
            given = await self.intake.process(lines)
            ok, unavailable = _tally(given, ok, unavailable)
            records += len(given)
            await asyncio.to_thread(_write_all, answers, answer_bytes(given))

        try:
            while chunk := await asyncio.to_thread(os.read, fd, READ_BYTES):
                read += len(chunk)
                lines = splitter.feed(chunk)
                for i in range(0, len(lines), MAX_BATCH):
                    await answer(lines[i : i + MAX_BATCH])
                    if self._stop.is_set():
                        # A stop waited for the whole batch: 200,000 records outlasted
                        # the unit's 30 s and were killed (a signals trial). Left in the
                        # spool, read again from its start at the next one (what was
                        # accepted is answered "duplicate" then).
                        return "stopped"
                # Before the next read: else two reads' lines were held at once.
                del lines
            await answer(splitter.finish())
            # Durable before filed: a power-cut trial found done/'s answers 0 bytes.
            await asyncio.to_thread(_sync, answers)
        finally:
            os.close(answers)
        if unavailable:
            return "unavailable"
        return await self._file(path, fd, read, records, "done" if ok else "rejected", folders)

    async def _file(
        self, path: Path, fd: int, read: int, records: int, outcome: str, folders: dict[str, int]
    ) -> Taken:
        # Files the batch open as ``fd``, of which ``read`` bytes were read and answered
        # (``records`` answers, in rejected/'s ANSWERS), into ``outcome``.
        target, rejected = folders[outcome], folders["rejected"]
        # The feed's bytes as read, on disk before they are filed as read.
        await asyncio.to_thread(_sync, fd)
        filed = await asyncio.to_thread(_file_away, self.fd, path.name, target, rejected)
        # Checked once filed, so that nothing can fall between a check and the
        # move. The feed may have renamed its next batch under this name while
        # this one was read (the contract's way, a name used again): what was
        # moved is that batch, unread. It goes back, and this one, no longer in
        # the spool, is filed as a copy of what was read.
        if not await asyncio.to_thread(_same_file, fd, target, filed):
            await asyncio.to_thread(_put_back, target, filed, self.fd, path.name, rejected)
            filed = await asyncio.to_thread(_file_away, self.fd, path.name, target, rejected, fd)
        # A writer that opened it again while it was read (after the first
        # check), or one that check cannot see, may have written what was not
        # read. Then it goes back to be read again at the next poll (what was
        # accepted now is answered "duplicate" then); a writer's open by name
        # after the move makes a new file in the spool, read in its turn.
        elif await asyncio.to_thread(_written_since, fd, read):
            await asyncio.to_thread(_put_back, target, filed, self.fd, path.name, rejected)
            self._being_written(path, f"written to while it was read: {_LEFT_OPEN}")
            return "written"
        log.info(
            "spool_file",
            file=shown_name(path.name),
            outcome=outcome,
            filed_as=shown_name(filed),
            records=records,
        )
        return "filed"

    def _being_written(self, path: Path, why: str) -> None:
        """Log (once a minute) that the batch at ``path`` was left in the spool, and why."""
        # One key for all files: a feed writing every batch in place, each under a
        # new name, must not grow the throttle without bound.
        unlogged = self.throttle.check("spool_file_waiting", "")
        if unlogged is not None:
            log.warning(
                "spool_file_waiting",
                file=shown_name(path.name),
                reason=why,
                **({"unlogged_before": unlogged} if unlogged else {}),
            )

    async def _refuse(self, path: Path, kind: str, reason: str = "") -> None:
        # Unread: its answer is about the file, so it has no line number.
        answer = {
            "status": "rejected",
            "reason": reason or NOT_REGULAR,
            "detail": f"{kind}: the spool reads only regular files moved into it"
            + (", that the node's user may read" if reason == NOT_READABLE else ""),
        }
        target = await asyncio.to_thread(_open_filed_into, self.fd, "rejected")
        try:
            answers = await asyncio.to_thread(_create, target, ANSWERS)
            try:
                await asyncio.to_thread(_write_all, answers, answer_bytes([answer]))
                await asyncio.to_thread(_sync, answers)
            finally:
                os.close(answers)
            filed = await asyncio.to_thread(_file_away, self.fd, path.name, target, target)
        finally:
            os.close(target)
        log.warning(
            "spool_file_refused", file=shown_name(path.name), kind=kind, filed_as=shown_name(filed)
        )

    async def run(self, stop: asyncio.Event, interval: float = 0.5) -> None:
        """Poll the directory until ``stop`` is set; after an error, less often (to 60 s).

        A batch being read when ``stop`` is set is left in the spool after the slice of
        records being answered (``MAX_BATCH``), not read to its end.
        """
        self._stop = stop
        try:
            await self._poll(stop, interval)
        finally:
            self._stop = asyncio.Event()  # ``ingest`` after a run reads batches whole

    async def _poll(self, stop: asyncio.Event, interval: float) -> None:
        wait = interval
        while not stop.is_set():
            # Each try of a batch that cannot be filed, or that the store cannot take,
            # answers its records again (those taken before as "duplicate", those
            # refused again), each an audit entry: a trial's full spool disk grew the
            # log by 825 entries a second. So after one, the next poll comes later.
            failed = errored = False
            try:
                for path in self.candidates():
                    if stop.is_set():
                        break
                    try:
                        taken = await self._take(path)
                    except _NoRoomError as exc:
                        # Only this batch waits: a smaller one behind it may fit.
                        failed = errored = True
                        self._no_room(exc)
                        continue
                    except _NotOpenedError as exc:
                        # Only this batch waits, and the others go on at the usual pace:
                        # opening it again costs a system call.
                        errored = True
                        self._not_opened(path, exc.error)
                        continue
                    # A file being written is passed over; when the store cannot
                    # accept, the rest would be refused too.
                    if taken == "unavailable":
                        failed = True
                        break
                    if taken == "stopped":
                        break
            except OSError as exc:
                failed = errored = True
                # A file that vanished or a full disk: try again on the next poll. Said
                # once a minute for each reason: a folder swapped for a link stops every
                # poll, twice a second, until someone puts it right.
                error = f"{type(exc).__name__}: {exc.strerror}"
                unlogged = self.throttle.check("spool_error", error)
                if unlogged is not None:
                    log.error(  # noqa: TRY400 - one line, no traceback
                        "spool_error",
                        error=error,
                        **self._where(exc),
                        **({"unlogged_before": unlogged} if unlogged else {}),
                    )
            self._stalled(errored)
            wait = min(wait * 2, ERROR_WAIT_MAX_S) if failed else interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    def _not_opened(self, path: Path, exc: OSError) -> None:
        # Once a minute per reason: the file's name varies, the condition does not.
        error = f"{type(exc).__name__}: {exc.strerror}"
        unlogged = self.throttle.check("spool_error", f"not opened: {error}")
        if unlogged is not None:
            log.error(
                "spool_error",
                error=error,
                file=shown_name(path.name),
                hint="the node cannot open this batch: it waits in the spool, the others"
                " go on; give the node's user read access, or move it out",
                **({"unlogged_before": unlogged} if unlogged else {}),
            )

    def _no_room(self, exc: OSError) -> None:
        # One key for every batch: names and sizes vary, the condition does not.
        unlogged = self.throttle.check("spool_error", "no room")
        if unlogged is not None:
            log.error(
                "spool_error",
                error=f"OSError: {exc.strerror}",
                **self._where(exc),
                **({"unlogged_before": unlogged} if unlogged else {}),
            )

    def _where(self, exc: OSError) -> dict[str, str]:
        # Which file or folder, for the operator to look at (a full-disk trial got
        # "No space left on device" and "Too many open files", naming neither).
        if exc.filename is not None:
            return {"file": shown_name(Path(os.fsdecode(exc.filename)).name)}
        return {"spool_dir": str(self.dir)}


Taken = Literal["filed", "unavailable", "written", "gone", "stopped"]
"""What became of a spool file: filed, left in place (the store cannot accept; being
written), or gone before it was opened (its feed took it back)."""

NAME_SHOWN: Final = 64
"""Characters of a spool file's name a log line shows at most (its start and its end)."""


def shown_name(name: str) -> str:
    """A spool file's name as the log shows it: escaped by ``one_line``, at most ``NAME_SHOWN``.

    The name is the feed's choice: any bytes but ``/`` and NUL, up to 255 of them.
    Escaped, a newline or an escape sequence in it cannot split or forge a line,
    or restyle a terminal, wherever the JSON is decoded and printed; capped, a
    line stays short (a name of 255 control bytes escapes to 1,020 characters),
    and a feed that carelessly puts report content in its names gets at most
    this much of it into the log. The name is shown rather than a hash of it
    because it is how an operator finds the batch in ``done/`` or ``rejected/``;
    its start and end are kept, since feeds tell batches apart by a date or a
    sequence number at either end (and the ``.N`` of ``filed_as`` is at the end).
    """
    text = one_line(name)
    if len(text) <= NAME_SHOWN:
        return text
    # "[+N]" for the N characters left out: 7 at most, 255 bytes escaping to 1,530.
    tail = 16
    head = NAME_SHOWN - tail - 8
    return f"{text[:head]}[+{len(text) - head - tail}]{text[-tail:]}"


NOT_REGULAR: Final = "not_a_regular_file"
"""The reason of a spool file's one answer when it was refused unread (a link, a FIFO)."""


_NOT_READABLE: Final = frozenset({errno.EACCES, errno.EPERM})
"""Why a spool file never opens for the node: its mode or owner (filed as ``NOT_READABLE``)."""
_NOT_OPENED: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENXIO, errno.ETXTBSY})
"""Why one spool file may not open now while the others do: a lease held on it, or a
special file swapped in after the listing; it waits for the next poll."""
NOT_READABLE: Final = "not_readable"
"""The reason of a spool file's one answer when the node's user may not read it."""


class _NotOpenedError(Exception):
    """A spool file the node may not open (``error`` says why); the others go on."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _NotRegularError(Exception):
    """A spool entry that is not a regular file (``kind`` says what it is)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISDIR, "a directory"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _open_regular(spool: int, name: str) -> BinaryIO:
    """Open ``name`` in ``spool`` to read if it is a regular file itself; else ``_NotRegularError``.

    ``O_NOFOLLOW`` refuses a link in the last component; the type is checked on
    the open descriptor, so an entry swapped after the listing is caught too.
    ``O_NONBLOCK`` keeps a FIFO swapped in from stopping the open until a writer comes.
    A regular file is made 0600 through the descriptor: it is report content, kept
    in ``done/`` or ``rejected/`` as the node's other files are, whatever mode the
    feed wrote it with (a file of another owner keeps its mode).
    """
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=spool)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _NotRegularError("a symbolic link") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            if os.fstat(fd).st_nlink == 1:  # a hard link is left as it is (_take)
                with contextlib.suppress(PermissionError):
                    os.fchmod(fd, 0o600)
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    raise _NotRegularError(_file_kind(mode))


def _open_for_writing(fd: int) -> bool | None:
    """Whether any process holds the file of ``fd`` (open read-only) open for writing.

    None when it cannot be told. Asked with a read lease, which Linux grants
    only while no one holds the file open for writing or mapped writable (its
    count of writers: any process, user or namespace; 7 us a probe), and given
    back at once, so a writer that opens the file meanwhile waits two system
    calls. The lease's break signal is SIGURG, ignored unless handled: the
    default, SIGIO, would kill the node if a writer opened the file between the
    two calls. A quiet period would not do: a feed writing in place on a full
    disk leaves the file empty, or cut mid-record, for as long as the disk is
    full, while holding it open. Nor would a final newline: a writer's buffer
    may end at a record's end. Cannot be told (None): another user's file
    without ``CAP_LEASE``, a filesystem without leases (NFS, FUSE), or leases off
    (``fs.leases-enable``); the file is read then, and only a change of size
    while it is read is caught.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return True if exc.errno == errno.EAGAIN else None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def _same_file(fd: int, folder: int, name: str) -> bool:
    """Whether ``name`` in the open ``folder`` (not followed) is the file open as ``fd``."""
    held, there = os.fstat(fd), os.stat(name, dir_fd=folder, follow_symlinks=False)
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


FILED_INTO: Final = ("done", "rejected")
"""The spool's folders that batches are filed into, with their answers."""

_LEFT_OPEN: Final = (
    "left to be read once it is closed; write the file under a temporary name and rename it"
    " into the spool"
)

READ_BYTES: Final = 1 << 18
"""Bytes of a batch read at a time: their lines, not the batch's, are what is held."""

ANSWERS: Final = ".answers.tmp"
ERROR_WAIT_MAX_S: Final = 60.0
"""After a poll that failed (a full disk), the next waits twice as long, up to this."""
ANSWER_ROOM: Final = 1 << 20
"""Free bytes wanted beside ``rejected/`` on top of twice the batch's size, before it is read."""


class _NoRoomError(OSError):
    """No room beside ``rejected/`` for a batch's answers: it waits, the others go on."""


def _room_to_answer(rejected: int, fd: int, name: str) -> None:
    """Raise ``OSError`` (ENOSPC) unless there is room for the answers of the batch ``fd``.

    Checked before a record is taken: a batch whose answers could not be written
    is read again at every poll, and each record taken before answered
    "duplicate" again, with an audit entry each. Its answers are about as long as
    its lines (a refusal's detail may be longer than a short line): twice its
    size and a MiB to spare.
    """
    fs = os.fstatvfs(rejected)
    free = fs.f_bavail * fs.f_frsize
    wanted = 2 * os.fstat(fd).st_size + ANSWER_ROOM
    if free < wanted:
        raise _NoRoomError(
            errno.ENOSPC,
            f"no room to answer {shown_name(name)}: less than {wanted} bytes free beside"
            " rejected/; it waits in the spool",
        )


"""In ``rejected/``: the answers of the batch being read, until they are filed beside it."""


def _tally(answers: list[dict[str, Any]], ok: bool, unavailable: bool) -> tuple[bool, bool]:
    # Whether the batch is still all accepted (a duplicate is), and whether the store
    # could not take a record: then the batch stays, to be read again.
    for answer in answers:
        if answer.get("reason") == "unavailable":
            unavailable = True
        if answer["status"] != "accepted" and answer.get("reason") != "duplicate":
            ok = False
    return ok, unavailable


def _open_filed_into(spool: int, name: str) -> int:
    """Open the open ``spool``'s folder ``name`` (``done``, ``rejected``), never through a link."""
    try:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        folder = os.open(name, flags, dir_fd=spool)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT):
            raise
        raise OSError(
            exc.errno,
            f"the spool's {name}/ is not a directory (a symbolic link, a file, or gone):"
            " nothing is read or filed, and batches wait in the spool, until it is one again",
        ) from None
    info = os.fstat(folder)
    if info.st_uid not in (os.geteuid(), 0) or info.st_mode & 0o022:
        # A local user's trial, in a group-shared spool: a feed renamed done/, made its
        # own, and replaced the node's answers there with "accepted". Only the node's
        # user (or root) may own it, and nobody else write in it (sticky or not: a
        # second review put a forged answer beside a batch not yet filed there).
        os.close(folder)
        raise OSError(
            errno.EPERM,
            f"the spool's {name}/ is not the node's own (owner uid {info.st_uid}, mode"
            f" {stat.S_IMODE(info.st_mode):04o}): others could replace the answers filed"
            " there; nothing is read or filed until it is owned by the node's user and"
            " writable by it alone",
        )
    return folder


def _exists(folder: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _create(folder: int, name: str) -> int:
    """Create ``name`` in the open ``folder`` anew, 0600, to write: never through a link."""
    # A leftover of a stop midway, or a link planted under that name: removed,
    # not followed (unlink removes a link itself).
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=folder)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o600, dir_fd=folder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _written_since(fd: int, read: int) -> bool:
    """Whether the file of ``fd`` is open for writing now, or holds other than ``read`` bytes."""
    return bool(_open_for_writing(fd)) or os.fstat(fd).st_size != read


FILED_NAME_MAX: Final = 200
"""Bytes of a spool file's name kept when it is filed; a longer one is shortened."""


def filed_base(name: str) -> str:
    """The name a spool file is filed under (before any ``.N``): ``name``, or a shortened one.

    A name is at most 255 bytes on Linux, and the feed may use them all: one of
    over 237 left no room for ``.result.ndjson.tmp``, so the file could not be
    filed, and, retried at every poll oldest first, stopped every later one.
    A longer name keeps its first bytes, then ``~`` and 12 hex digits of its
    SHA-256, so that names alike at the start stay apart.
    """
    raw = os.fsencode(name)
    if len(raw) <= FILED_NAME_MAX:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return f"{os.fsdecode(raw[: FILED_NAME_MAX - 13])}~{digest}"


def _put_back(target: int, filed: str, spool: int, name: str, rejected: int) -> None:
    # Linked, never renamed, back: a rename would replace a new batch the feed put
    # under that name meanwhile. Then under the first free "<name>.N"; the answers
    # go last (back to rejected/'s ANSWERS, to be filed again), so a stop midway
    # leaves what a stop while filing leaves.
    n = 0
    while True:
        again = name if n == 0 else f"{filed_base(name)}.{n}"
        try:
            os.link(filed, again, src_dir_fd=target, dst_dir_fd=spool, follow_symlinks=False)
            break
        except FileExistsError:
            n += 1
    os.unlink(filed, dir_fd=target)
    os.replace(f"{filed}.result.ndjson", ANSWERS, src_dir_fd=target, dst_dir_fd=rejected)
    _sync(spool)


def _file_away(
    spool: int, batch: str, target: int, answers_in: int, copy_of: int | None = None
) -> str:
    # Moves the batch ``batch`` of the open ``spool`` into ``target``, and beside it the
    # answers from ANSWERS in ``answers_in``; or with ``copy_of`` writes a copy of that
    # open file's bytes under its name instead (its own name now holds another batch).
    # Never over an earlier file: a feed that reuses a file name would otherwise
    # lose the receipt of its earlier batch. The first free "<name>.N" is taken
    # for both the batch and its answers, so they stay paired. The spool task
    # files one file at a time and is the only writer here, so a name found free
    # stays free until used. ``target`` is the folder, open (``_open_filed_into``).
    name = base = filed_base(batch)
    n = 0
    while _exists(target, name) or _exists(target, f"{name}.result.ndjson"):
        n += 1
        name = f"{base}.{n}"
    # The result file lands first, so a file in done/ or rejected/ always has its
    # answers; a stop in between leaves the answers alone and the batch in the
    # spool, to be read again and filed under the next free name. A rename
    # replaces the name itself, never what a link there points to.
    os.replace(ANSWERS, f"{name}.result.ndjson", src_dir_fd=answers_in, dst_dir_fd=target)
    # Each folder synced after its renames, the answers' first: a rename survives a
    # power cut only once its folder is synced.
    _sync(target)
    if copy_of is None:
        os.replace(batch, name, src_dir_fd=spool, dst_dir_fd=target)
        _sync(target)
        _sync(spool)
        return name
    copy = _create(target, f"{name}.tmp")
    try:
        offset = 0
        while chunk := os.pread(copy_of, 1 << 20, offset):
            _write_all(copy, chunk)
            offset += len(chunk)
        _sync(copy)
    finally:
        os.close(copy)
    os.replace(f"{name}.tmp", name, src_dir_fd=target, dst_dir_fd=target)
    _sync(target)
    return name


def _sync(fd: int) -> None:
    # A file or folder that cannot be synced (EIO) must not keep a batch in the spool:
    # its records are committed, and read again it would only be answered
    # "duplicate" at every poll (a review injected EIO: an answers file in done/
    # every few seconds). Filed all the same; a power cut may then undo the move.
    # Said, though: a disk that refuses fsync is failing (once a minute).
    try:
        os.fsync(fd)
    except OSError as exc:
        unlogged = _SYNC_FAILED.check("spool_sync_failed", "")
        if unlogged is not None:
            log.warning(
                "spool_sync_failed",
                reason=f"{exc.strerror or exc}: filed all the same, and a power cut may undo it",
                **({"unlogged_before": unlogged} if unlogged else {}),
            )


_SYNC_FAILED: Final = Throttle()
"""Module-wide (``_sync`` runs in worker threads, with no spool at hand): once a minute."""
