"""Logging, configured in one place: JSON lines for daemons, readable text on a terminal.

Callers log event names and identifiers (report id, partner, reason), never
report content or key material; ``redact`` below is a last line of defence.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

from broker.errors import UsageError

LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
"""The levels ``configure`` accepts (any case): ``--log-level`` offers exactly these."""

_SECRET_KEYS = frozenset({"token", "seed", "private_key", "d", "password", "secret", "plaintext"})


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values of secret-looking keys, so a careless call cannot leak them."""
    for key in list(event):
        if key.lower() in _SECRET_KEYS:
            event[key] = "[redacted]"
    return event


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


def get_logger(name: str) -> Any:
    """Return a structlog logger bound to a component name."""
    return structlog.get_logger(component=name)
