"""Reading a file an operator names (a config, a key, a roster): a regular file or nothing.

A FIFO named by mistake would block the command until some writer came, and a
device (``/dev/zero``, ``/dev/urandom``) would be read until memory ran out:
neither is a file anyone means to hand a command, so both fail at once, as an
``OSError`` each caller already turns into its one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Final

from broker.errors import UsageError, WriteError, sqlite_reason

NOT_A_FILE = "not a regular file (a FIFO, socket or device)"
"""The ``strerror`` of the ``OSError`` for a path that is neither a file nor a directory."""


def not_a_file(mode: int, what: str) -> str:
    """What is at a path of ``mode`` where ``what`` (a file) should be: a directory, or else."""
    return f"a directory, where {what} should be" if stat.S_ISDIR(mode) else NOT_A_FILE


WHOLE_FILE_MAX: Final = 16 << 20
"""The most ``read_file_bytes`` reads of a file whole: configurations, policies, keys and
rosters are kilobytes. A review named a 2 GB sparse file as ``node.toml``: 23 s and
4.2 GB of memory before "invalid TOML", a ``MemoryError`` traceback under ``ulimit -v``."""
TOO_LARGE: Final = f"larger than {WHOLE_FILE_MAX >> 20} MiB: not a file msmt reads whole"
"""The ``strerror`` of the ``OSError`` for a file past ``WHOLE_FILE_MAX``."""


def read_file_bytes(path: Path, limit: int = -1) -> bytes:
    """The bytes of the regular file at ``path`` (links followed), or its first ``limit`` bytes.

    Raises ``OSError`` as ``open`` does (its ``strerror`` fit for one line), also
    ``IsADirectoryError`` for a directory and ``OSError`` with ``NOT_A_FILE`` for
    anything else that is not a regular file, before reading a byte of it, and
    ``OSError`` with ``TOO_LARGE`` for a whole file (no ``limit``) past
    ``WHOLE_FILE_MAX``, before reading it too where its size says so.
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
        if limit >= 0:
            return handle.read(limit)
        if os.fstat(handle.fileno()).st_size > WHOLE_FILE_MAX:
            raise OSError(errno.EFBIG, TOO_LARGE, str(path))
        data = handle.read(WHOLE_FILE_MAX + 1)  # a size the file does not tell (/proc)
        if len(data) > WHOLE_FILE_MAX:
            raise OSError(errno.EFBIG, TOO_LARGE, str(path))
        return data


def _require_regular(fd: int, path: Path) -> None:
    mode = os.fstat(fd).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, NOT_A_FILE, str(path))


def read_file_text(path: Path, encoding: str = "utf-8") -> str:
    """The text of the regular file at ``path``, its CR LF line ends made LF.

    Not a CR alone, which ``Path.read_text`` also makes LF: TOML takes no bare CR, so
    in a policy it turned a comment's end into a policy line that ``tomllib`` and every
    other TOML reader refuse (a review). Raises ``OSError`` as ``read_file_bytes`` does,
    and ``UnicodeDecodeError``.
    """
    return read_file_bytes(path).decode(encoding).replace("\r\n", "\n")


def holds_nothing(path: Path) -> bool:
    """Whether the SQLite database at ``path`` is missing, or 0 bytes with no -wal that holds any.

    SQLite opens a file of 0 bytes as an empty database, as a start makes a new one:
    a new file, or a copy cut short (a full disk). Unreadable is not nothing, nor is
    a directory (a restore that copied the store as a folder), which ``node check``
    took for no store and then for a store lost: whatever opens it next says why.
    """
    for part in (path, path.with_name(path.name + "-wal")):
        try:
            info = part.stat()
        except FileNotFoundError:
            continue
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode) or info.st_size:
            return False
    return True


def make_folder(folder: Path, *, private: bool = False) -> None:
    """Make ``folder`` (0700 if ``private``) and any folder above it missing, 0755.

    ``mkdir(parents=True)`` would make the folders above 0777 less the umask: under
    umask 000 others could then swap a member's key folder, or the roster and its
    authority, for their own (``msmt keys``), or the exported schemas feed authors
    validate against (``msmt schemas export``). Folders already there are left as they
    are. Raises ``OSError``.
    """
    for above in (*reversed(folder.parents), folder):
        if above.exists() and not above.is_dir():
            # mkdir's own word for it is "File exists", which named the file to be
            # written, not the file in the way (a bad-input sweep).
            raise NotADirectoryError(errno.ENOTDIR, f"{above} is not a directory")
    for above in reversed(folder.parents):
        if not above.is_dir():
            above.mkdir(mode=0o755, exist_ok=True)
    folder.mkdir(exist_ok=True, mode=0o700 if private else 0o755)
    if private:
        folder.chmod(0o700)


def write_output(path: Path, data: bytes, *, option: str = "--out") -> None:
    """Put ``data`` at ``path`` whole or not at all, mode 0600: a command's ``--out`` file.

    As ``write_durably``: a half-written file is never read as the whole, nor a written
    one lost to a power cut after the command said so. ``UsageError`` if ``path``
    is a link or not a regular file (the rename would replace it: as root, ``/dev/full``
    became a file) or its folder is missing; ``WriteError`` (exit 1) naming ``path`` if
    the disk refuses (full, read-only), with no temporary file left behind.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    except OSError as exc:
        raise write_refusal(path, exc) from None
    if not stat.S_ISREG(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
        raise UsageError(
            f"{option} {path} is {what}: give a regular file's path, or leave {option} out"
            " for stdout"
        )
    try:
        write_durably(path, data)
    except OSError as exc:
        raise write_refusal(path, exc) from None


def write_durably(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Put ``data`` at ``path`` whole, mode 0600, so that it survives a power cut.

    Written to a temporary file beside it and fsynced, then renamed over ``path``
    (or, with ``replace`` false, linked: ``FileExistsError`` if anything is at
    ``path``, so nothing there is overwritten or written through), then the folder
    fsynced: a rename is durable only once its folder is (a power-cut trial brought
    back revoked feeds and forgotten cosignatures). The temporary file (``.NAME.*.tmp``)
    is gone when the call returns or raises. Raises ``OSError``.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        write_synced(fd, data)
        if replace:
            os.replace(tmp, path)
            sync_folder(path.parent)
            return
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            _create_new(path, data)  # vfat, exFAT, some network shares
        try:
            sync_folder(path.parent)
        except OSError:
            # Not said written, so not left there: a new token file for a feed that
            # was not added would then be refused as existing.
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


_NO_HARD_LINKS: Final = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})
"""``link``'s errors on a file system without hard links (or one that allows no more)."""


def _create_new(path: Path, data: bytes) -> None:
    """``write_durably``'s way where links fail: create ``path`` anew (no link followed), fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write_synced(fd, data)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def write_synced(fd: int, data: bytes) -> None:
    """Write ``data`` to the new file open as ``fd``, fsync it, and close it."""
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def sync_folder(folder: Path) -> None:
    """Fsync ``folder``, so that a file just created or renamed in it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_refusal(path: Path | str, exc: OSError) -> UsageError | WriteError:
    """The one-line error for ``exc`` raised writing ``path``.

    A folder that is not there is the path's fault (``UsageError``, exit 2); a full
    or read-only disk passes once mended (``WriteError``, exit 1).
    """
    bad_path = exc.errno in (errno.ENOENT, errno.ENOTDIR)
    return (UsageError if bad_path else WriteError)(f"cannot write {path}: {exc.strerror}")


def open_ancestor(path: Path) -> str | None:
    """Why a folder above ``path`` lets another user swap it, or None when none does.

    Each folder from the root down to ``path``'s parent (links resolved) must be
    root's or this user's, and not writable by every user unless sticky (as ``/tmp``:
    a user may not rename another's entry there), as ssh's StrictModes asks of a home.
    Group-writable folders pass: a umask of 002 makes them, for a group of one user
    on most systems. A local user's review swapped a demo's folder under a parent of
    its own.
    """
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a loop of links: whatever opens it says so
        return None
    me = os.geteuid()
    for folder in reversed(real.parents):
        try:
            info = folder.stat()
        except OSError:
            continue  # made later, by this user
        if not stat.S_ISDIR(info.st_mode):
            return None  # not a folder: making anything under it says so
        mode = info.st_mode
        if info.st_uid not in (0, me):
            return (
                f"{folder} belongs to another user (uid {info.st_uid}), who could swap what is"
                " in it"
            )
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            return (
                f"{folder} is writable by every local user (mode {stat.S_IMODE(mode):04o}),"
                " who could swap what is in it"
            )
    return None


def writable_by_all(path: Path) -> str | None:
    """Why every local user may change the file at ``path``, or None: its mode, or its folder's.

    A folder open to all but sticky (``/tmp``) lets nobody replace another's file. A
    review: a clone made under umask 000 left every node.toml and policy 0666, so any
    local user could change what a node releases to its partners.
    """
    for where, sticky_ok in ((path, False), (path.parent, True)):
        try:
            mode = where.stat().st_mode
        except OSError:
            return None  # whoever reads it says why
        if where is path and not stat.S_ISREG(mode):
            return None  # a device, a FIFO: whoever reads it refuses it, saying so
        if mode & stat.S_IWOTH and not (sticky_ok and mode & stat.S_ISVTX):
            return f"{where} is writable by every local user (mode {stat.S_IMODE(mode):04o})"
    return None


_WRITE_REFUSED: Final = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
"""The errors of a write the file's or its folder's permissions or mount refused."""


def _refused_write(exc: Exception) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _WRITE_REFUSED
    name = str(getattr(exc, "sqlite_errorname", ""))
    return name.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY"))


def _owned(info: os.stat_result) -> str:
    return f"(mode {stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid})"


def not_writable(path: Path, *, writer: bool = True) -> str | None:
    """Why the SQLite database ``path``, or what SQLite makes beside it, is not writable here.

    ``None`` if nothing is found. A reader (``writer`` false) needs only the folder and
    the ``-wal`` and ``-shm`` files writable; a writer, the database and its ``.lock`` too.
    """
    folder = path.parent
    if not os.path.isdir(folder):
        return None
    suffixes = ("", "-wal", "-shm", ".lock") if writer else ("-wal", "-shm")
    beside = [path.with_name(path.name + suffix) for suffix in suffixes]
    for target in (folder, *beside):
        if target != folder and not os.path.lexists(target):
            continue
        if os.access(target, os.W_OK):
            continue
        try:
            info, mount = os.stat(target), os.statvfs(target)
        except OSError:
            continue
        what = "the folder " if target == folder else ""
        if mount.f_flag & os.ST_RDONLY:
            return f"{what}{target} is not writable: it is on a read-only file system"
        return f"{what}{target} is not writable by uid {os.geteuid()} {_owned(info)}"
    return None


def not_openable(path: Path, *, writer: bool = True) -> str | None:
    """Why SQLite cannot open the database ``path`` here; ``None`` if nothing is found.

    Beyond ``not_writable``: a folder on the way this user may not enter; for a
    reader, a database that is not there; the database, its ``-wal`` or its ``-shm``
    a directory, or not readable. SQLite's own word for each is "unable to open
    database file", naming neither the file nor the cause (``msmt audit verify`` on
    a log whose ``-wal`` was a directory, or in a folder the auditor may not enter,
    which was a traceback).
    """
    return (
        _folder_refused(Path(os.path.abspath(path.parent)))
        or _file_refused(path, writer=writer)
        or not_writable(path, writer=writer)
    )


def _folder_refused(folder: Path) -> str | None:
    """Why this user cannot reach what is in ``folder``: it, or a folder above it."""
    for above in (*reversed(folder.parents), folder):
        try:
            info = os.stat(above)
        except FileNotFoundError:
            return f"the folder {above} does not exist"
        except OSError:
            continue  # the folder above it says why
        if not stat.S_ISDIR(info.st_mode):
            return f"{above} is not a directory"
        if not os.access(above, os.X_OK):
            return f"the folder {above} cannot be entered by uid {os.geteuid()} {_owned(info)}"
    return None


def _file_refused(path: Path, *, writer: bool) -> str | None:
    """Why SQLite cannot read the database ``path``, its ``-wal`` or its ``-shm``."""
    for target in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            info = os.stat(target)
        except FileNotFoundError:
            if target == path and not writer:  # a writer makes it
                return f"{path} does not exist"
            continue
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            return f"{target} is a directory, where a file should be"
        if not os.access(target, os.R_OK):
            return f"{target} is not readable by uid {os.geteuid()} {_owned(info)}"
    return None


def sqlite_open_reason(path: Path, exc: Exception, *, writer: bool = True) -> str:
    """Why SQLite could not open ``path``: what is not there, readable or writable, else its words.

    SQLite says only "unable to open database file" or "attempt to write a readonly
    database" for a data directory on a read-only mount or one the node's user may
    not write (a review), naming neither the file nor the cause (``not_openable``).
    """
    why = not_openable(path, writer=writer) if _refused_write(exc) else None
    if why is not None:
        return why
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename and exc.filename != str(path) else ""
        return f"{exc.strerror}{where}"
    return sqlite_reason(exc)
