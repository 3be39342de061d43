"""The ``msmt`` command line: one group, with each command family in its own module.

Every ``MsmtError`` becomes one line on stderr and the error's exit code; a
traceback is only ever shown for a bug, never for bad input. So does a stdout
that fails (``| head``, ``>&-``, a full disk): exit status 1, as output cut short
must not pass for whole. Ctrl-C that no command handles itself is one line and
exit status 130 (128 + SIGINT). A stderr that fails (``2>&-``, a full disk)
loses what was written to it, never the exit code, and never stops a node.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from broker import __version__
from broker.cli.options import error_line, guarded_stderr, guarded_stdout, hold_stdin
from broker.errors import MsmtError, StdoutError

INTERRUPTED_EXIT: int = 130
"""The shell's status for a command ended by SIGINT (128 + 2)."""


def _fail(exc: MsmtError) -> NoReturn:
    click.echo(error_line(exc), err=True)
    sys.exit(exc.exit_code)


def _interrupted() -> NoReturn:
    # One line, not a traceback from whatever module was being imported, nor
    # click's "Aborted!" and 1, which reads as a refusal to a wrapper script.
    click.echo("msmt: interrupted", err=True)
    sys.exit(INTERRUPTED_EXIT)


class _Group(click.Group):
    """A click group that turns our errors into one clear line and an exit code."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Load the command families, then run as click does; Ctrl-C meanwhile exits 130.

        The families are imported here rather than with this module: that takes
        most of a second, and a Ctrl-C then must not print an import traceback.
        """
        hold_stdin()
        with guarded_stderr():
            try:
                _register()
                with guarded_stdout():
                    return super().main(*args, **kwargs)
            except KeyboardInterrupt:
                _interrupted()
            except StdoutError as exc:  # click's own output: --help, --version, usage
                _fail(exc)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MsmtError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            # Reached only when the command does not handle Ctrl-C itself (msmt
            # submit exits 2 with its summary; node run stops on SIGINT).
            _interrupted()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="msmt")
def main() -> None:
    """Share sanctions-monitoring sightings among MSMT members, under each member's policy."""


def _register() -> None:
    # Imported here so each command family stays in its own module and the
    # group is assembled in one place; once, at the first run.
    if main.commands:
        return
    from broker.cli import audit, data, demo, export, feeds, keys, node, policy  # noqa: PLC0415

    for module in (data, keys, policy, node, feeds, audit, export, demo):
        for command in module.COMMANDS:
            main.add_command(command)
