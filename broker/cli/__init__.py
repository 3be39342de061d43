"""The ``msmt`` command line: one group, with each command family in its own module.

Every ``MsmtError`` becomes one line on stderr and the error's exit code; a
traceback is only ever shown for a bug, never for bad input.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from broker import __version__
from broker.errors import MsmtError


class _Group(click.Group):
    """A click group that turns our errors into one clear line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MsmtError as exc:
            click.echo(f"msmt: error: {exc}", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="msmt")
def main() -> None:
    """Share sanctions-monitoring sightings among MSMT members, under each member's policy."""


def _register() -> None:
    # Imported here so each command family stays in its own module and the
    # group is assembled in one place.
    from broker.cli import audit, data, demo, export, feeds, keys, node, policy  # noqa: PLC0415

    for module in (data, keys, policy, node, feeds, audit, export, demo):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
