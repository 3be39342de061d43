"""Commands for exporting received reports to analysts' tools (filled in by its issue)."""

from __future__ import annotations

import click

COMMANDS: tuple[click.Command, ...] = ()
