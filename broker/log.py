"""Logging, configured in one place: JSON lines for daemons, readable text on a terminal.

Callers log event names and identifiers (report id, partner, reason), never
report content or key material; ``redact`` below is a last line of defence.
"""

from __future__ import annotations

import errno
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

from broker.errors import UsageError

LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""The levels ``configure`` accepts (any case): ``--log-level`` offers exactly these."""

LIBRARY_LINES_PER_MINUTE: Final = 10
"""The most ``library_log`` lines one library message (logger, template, error) gets a minute."""

_SECRET_KEYS = frozenset({"token", "seed", "private_key", "d", "password", "secret", "plaintext"})


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values of secret-looking keys, so a careless call cannot leak them."""
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "[redacted]"
    return event


def one_line(text: str) -> str:
    r"""``text`` with each control character and line break escaped (``\n``, ``\x1b``).

    An error names what the operator gave (a path, a value), and a log line what
    a feed named (a spool file), which may hold a newline: it must not split the
    line, nor forge a second one in whatever log collects stderr, nor let an
    escape sequence restyle the terminal.
    """
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


THROTTLE_KEYS: Final = 256
"""Past this many keys a ``Throttle`` forgets those whose period is over."""


class Throttle:
    """Says whether an event is due to be logged: once per key per ``period`` seconds.

    For conditions that can repeat many times a second (refusals, alarms): the
    first is logged, and the same kind for the same party again only a period later.
    """

    def __init__(self, period: float = 60.0) -> None:
        self.period = period
        # Keys are (kind, member or another small name): a handful, so the mapping stays small.
        self._last: dict[tuple[str, str], float] = {}
        self._skipped: dict[tuple[str, str], int] = {}

    def due(self, kind: str, who: str) -> bool:
        """Whether (``kind``, ``who``) was not logged within the last period; if so, it is now."""
        return self.check(kind, who) is not None

    def check(self, kind: str, who: str) -> int | None:
        """Like ``due``, but when due, how many were not logged since the last (else ``None``).

        The count goes into the line (``unlogged_before``), so a throttled log still
        says how often the condition happened.
        """
        now = time.monotonic()
        key = (kind, who)
        if len(self._last) > THROTTLE_KEYS:
            # Keys whose period is over log at once anyway: forgetting them costs only
            # their skipped counts. Error texts as keys must not grow without bound.
            for old in [k for k, at in self._last.items() if now - at >= self.period]:
                del self._last[old]
                self._skipped.pop(old, None)
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._skipped.pop(key, 0)

    def __len__(self) -> int:
        """How many (kind, party) keys it remembers (bounded by the parties there are)."""
        return len(self._last)


class LibraryHandler(logging.Handler):
    """Carries the standard-library logging of our dependencies into our log, safely.

    A library's record becomes one ``library_log`` line naming the logger, its
    message template (never the values filled into it) and the exception's type
    (never its text or traceback): aiohttp, for one, logs a malformed request to
    the intake with the offending header line, bearer token and all, and
    Python's fallback handler printed that as a multi-line traceback.

    Each message gets at most ``LIBRARY_LINES_PER_MINUTE`` lines a minute; the
    first line of the next minute says how many were left out (``unlogged_before``).
    A node out of file descriptors had asyncio log every failed accept: 52,000
    lines in 30 s, which on a shared disk would have filled it next.
    """

    def __init__(self) -> None:
        super().__init__()
        # (logger, template, error) -> [minute's start, lines logged, lines left out].
        # The keys are the libraries' own code, so the mapping stays small.
        self._minutes: dict[tuple[str, str, str], list[float]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        """Log ``record`` through structlog, without its values or traceback."""
        fields: dict[str, Any] = {"logger": record.name}
        # A template with arguments is the library's code; without arguments the
        # message may be an f-string holding data, so it is left out.
        if record.args and isinstance(record.msg, str):
            fields["template"] = record.msg[:200]
        if record.exc_info and record.exc_info[0] is not None:
            fields["error"] = record.exc_info[0].__name__
            raised = record.exc_info[1]
            if isinstance(raised, OSError) and raised.errno is not None:
                # The symbol alone ("EMFILE"), never the text, which may name a path: a
                # low-file-limit trial read "OSError" and nothing of why.
                fields["errno"] = errno.errorcode.get(raised.errno, str(raised.errno))
        key = (record.name, fields.get("template", ""), fields.get("error", ""))
        now = time.monotonic()
        minute = self._minutes.get(key)
        if minute is None or now - minute[0] >= 60:
            if minute is not None and minute[2]:
                fields["unlogged_before"] = int(minute[2])
            minute = self._minutes[key] = [now, 0, 0]
        if minute[1] >= LIBRARY_LINES_PER_MINUTE:
            minute[2] += 1
            return
        minute[1] += 1
        structlog.get_logger(component="library").log(record.levelno, "library_log", **fields)


def configure(*, json: bool | None = None, level: str = "INFO") -> None:
    """Configure structlog for the process.

    ``json=None`` picks JSON when stderr is not a terminal (daemons, CI) and a
    readable console format when it is. Raises ``UsageError`` for a ``level``
    not in ``LEVELS``.
    """
    if level.upper() not in LEVELS:
        # logging.getLevelName answers an unknown name with a string, which
        # structlog would only fail on as a KeyError.
        raise UsageError(f"unknown log level {level!r}: one of {', '.join(LEVELS)}")
    use_json = not sys.stderr.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, LibraryHandler)]:
        root.removeHandler(handler)
    root.addHandler(LibraryHandler())
    # Libraries' own chatter below WARNING stays out, as under Python's default.
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


def get_logger(name: str) -> Any:
    """Return a structlog logger bound to a component name."""
    return structlog.get_logger(component=name)
