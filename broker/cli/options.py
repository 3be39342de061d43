"""What several ``msmt`` commands share: option values parsed the same way, stdout's end."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

import click

from broker.errors import UsageError

CONFIG = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The node's node.toml.",
)
"""``--config``: the node's ``node.toml``, for every command that works on one node."""


def silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone (``BrokenPipeError``).

    Nothing more can reach that reader, and Python's own flush at exit would
    otherwise fail too and print "Exception ignored ... BrokenPipeError".
    """
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def rfc3339(option: str, text: str) -> datetime:
    """An option's RFC 3339 time with its zone; ``UsageError`` naming the option otherwise."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an RFC 3339 time") from None
    if when.utcoffset() is None:
        raise UsageError(f"{option} {text!r} needs a time zone, e.g. 2026-11-01T00:00:00Z")
    return when
