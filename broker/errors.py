"""The package's exception tree, split by who is at fault.

Every error an operator, feed or peer can cause is an ``MsmtError``. Third-party
exceptions are translated at the boundary (``raise ... from exc``) so that a raw
``ValueError`` or ``KeyError`` never reaches the operator as a traceback.
"""

from __future__ import annotations

import errno
from typing import Final


class MsmtError(Exception):
    """Root of every error this package raises on purpose.

    ``str(err)`` is a one-line reason fit to show an operator.
    """

    exit_code = 1


class UsageError(MsmtError):
    """The operator asked for something impossible (bad flag, missing file)."""

    exit_code = 2


class ConfigError(MsmtError):
    """A configuration, policy or roster file is invalid or unreadable.

    Also what a node's start raises for data no restart can mend (a damaged
    audit log, a store and log from two moments): exit status 2 is the one the
    sample systemd unit does not restart on.
    """

    exit_code = 2


class InputError(MsmtError):
    """A feed handed us a record that is not a valid sighting."""


class KeyMaterialError(MsmtError):
    """Key files or the roster are missing, malformed, or inconsistent."""

    exit_code = 2


class PolicyError(ConfigError):
    """A releasability policy is malformed or refers to unknown names."""


class EnvelopeError(MsmtError):
    """A received envelope failed one step of verification (the peer's fault).

    ``step`` names the checklist step that failed, so counters and the audit
    log can record the reason without ever holding the plaintext.
    """

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason
        # Set once the originator's signature has verified, so its report id is
        # its own and may be recorded with the refusal.
        self.report_id: str | None = None


class HeldError(EnvelopeError):
    """A failure that may pass later: a receiver holds the message for redelivery.

    Refusing would lose the report for good; past the freshness window it is
    refused like any other failure. ``hint`` says what the operator can do.
    """

    hint = ""


class UnknownKeyError(HeldError):
    """The envelope names a key this node's roster does not hold (yet).

    The roster may simply be behind the sender's (a rotation not rolled out
    here yet), so a receiver holds such a message for redelivery instead of
    refusing it for good.
    """

    hint = "the sender's roster is newer than this node's: restart with the new roster"


class IssuedAheadError(HeldError):
    """The envelope was issued further ahead of this node's clock than the skew allows.

    The sender's clock may be ahead, or ours behind (stepped back, before the
    node pauses for it within a second): either way the report passes once the
    clocks agree, so a receiver holds it rather than refusing it for good.
    """

    hint = "the sender's clock is ahead of this node's, or this node's behind: check both (NTP)"


class AuditError(MsmtError):
    """An audit log or checkpoint failed verification."""


class WriteError(MsmtError):
    """A file could not be written (a full disk, a read-only or unwritable directory).

    Exit status 1, not 2: the command or node start succeeds once the cause is
    fixed, so a service manager should keep restarting a node that hit it.
    """


class StdoutError(MsmtError):
    """stdout did not take what a command wrote: its reader left (``| head``), a full disk.

    Exit status 1: what was written is cut short, and a reader must not take it
    for the whole. ``what`` names the output in the one line ("the whole replay").
    """

    def __init__(self, cause: OSError, what: str = "output") -> None:
        # EBADF: stdout was closed when the command started (``>&-``).
        self.closed = isinstance(cause, BrokenPipeError) or cause.errno == errno.EBADF
        self.cause = cause
        super().__init__(
            f"stdout was closed before the whole {what} was written"
            if self.closed
            else f"cannot write the {what} to stdout: {cause.strerror}"
        )


class StoreError(MsmtError):
    """The node's durable store could not accept or return data (disk full, corrupt)."""


class StoreDamagedError(StoreError):
    """The store's file is not a database or is malformed: no retry or restart mends it."""


class StoreTooNewError(StoreDamagedError):
    """The store was written by a newer msmt: no restart of this build mends it (exit 2)."""


_COULD_NOT_GROW: Final = {
    "SQLITE_IOERR_SHMSIZE": "its -shm file could not grow",
    "SQLITE_IOERR_WRITE": "a write failed",
}


def sqlite_reason(exc: Exception) -> str:
    """A SQLite error's text, with a hint where SQLite's own says only "disk I/O error".

    Opening a WAL database on a full disk fails to grow its ``-shm`` file, which
    SQLite reports as a disk I/O error: operators looked for a failing disk.
    """
    name = getattr(exc, "sqlite_errorname", "")
    if name in _COULD_NOT_GROW:
        return f"{exc} ({name}: {_COULD_NOT_GROW[name]}; is the disk full?)"
    return str(exc)
