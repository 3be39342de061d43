"""Commands for the policy family (filled in by its issue)."""

from __future__ import annotations

import click

COMMANDS: tuple[click.Command, ...] = ()
