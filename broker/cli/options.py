"""Option values that several ``msmt`` commands parse the same way."""

from __future__ import annotations

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


def rfc3339(option: str, text: str) -> datetime:
    """An option's RFC 3339 time with its zone; ``UsageError`` naming the option otherwise."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not an RFC 3339 time") from None
    if when.utcoffset() is None:
        raise UsageError(f"{option} {text!r} needs a time zone, e.g. 2026-11-01T00:00:00Z")
    return when
