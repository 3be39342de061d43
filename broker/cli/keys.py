"""Commands for the keys family (filled in by its issue)."""

from __future__ import annotations

import click

COMMANDS: tuple[click.Command, ...] = ()
