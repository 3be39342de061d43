"""The ``msmt`` command line: one group, with each command family in its own module.

Every ``MsmtError`` becomes one line on stderr and the error's exit code; a
traceback is only ever shown for a bug, never for bad input. So does a stdout
that fails (``| head``, ``>&-``, a full disk): exit status 1, as output cut short
must not pass for whole. Ctrl-C that no command handles itself is one line and
exit status 130 (128 + SIGINT). A stderr that fails (``2>&-``, a full disk)
loses what was written to it, never the exit code, and never stops a node.
"""

from __future__ import annotations

import importlib
import signal
import sys
from types import FrameType
from typing import Any, Final, NoReturn

import click

from broker import version
from broker.cli.options import error_line, guarded_stderr, guarded_stdout, hold_stdin
from broker.entry import INTERRUPTED_EXIT
from broker.errors import MsmtError, StdoutError, UsageError


def _fail(exc: MsmtError) -> NoReturn:
    click.echo(error_line(exc), err=True)
    sys.exit(exc.exit_code)


def _usage_failed(exc: click.ClickException) -> NoReturn:
    """Click's own refusal of the command line as one line, with its exit code (2)."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        exc.show()  # a group named alone: its help, as click shows it
        sys.exit(exc.exit_code)
    reason = exc.format_message()
    if isinstance(exc, click.UsageError) and exc.ctx is not None:
        reason += f" (see {exc.ctx.command_path} --help)"
    click.echo(error_line(UsageError(reason)), err=True)
    sys.exit(exc.exit_code)


def _interrupted() -> NoReturn:
    # One line, not a traceback from whatever module was being imported, nor
    # click's "Aborted!" and 1, which reads as a refusal to a wrapper script.
    click.echo("msmt: interrupted", err=True)
    sys.exit(INTERRUPTED_EXIT)


class _Group(click.Group):
    """A click group that turns our errors into one clear line and an exit code."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Run as click does; Ctrl-C meanwhile exits 130, even while a family loads.

        A command's family is imported when click looks the command up
        (``get_command``), not with this module: importing them all takes a
        second or more, which every ``msmt submit`` and node start would pay,
        and a Ctrl-C then must not print an import traceback.
        """
        hold_stdin()
        standalone = kwargs.pop("standalone_mode", True)
        with guarded_stderr():
            try:
                with guarded_stdout():
                    # Click's standalone mode would show a usage error as three lines
                    # (the usage, a hint, the error); here it is one, as every error.
                    done = super().main(*args, **{**kwargs, "standalone_mode": False})
            except (KeyboardInterrupt, click.Abort):
                _interrupted()
            except StdoutError as exc:  # click's own output: --help, --version
                _fail(exc)
            except click.ClickException as exc:
                if not standalone:
                    raise
                _usage_failed(exc)
        if not standalone:
            return done
        # A command that returns ends with 0; ``ctx.exit(n)`` comes back as ``n``.
        sys.exit(done if isinstance(done, int) else 0)

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, its family loaded or not (``--help`` then loads them all)."""
        return sorted({*self.commands, *FAMILIES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command named ``cmd_name``, its family imported first if need be."""
        if cmd_name not in self.commands and cmd_name in FAMILIES:
            try:
                _load_holding_sigint(FAMILIES[cmd_name])
            except KeyboardInterrupt:
                # --help looks commands up inside click's own main, which would
                # print "Aborted!" and exit 1.
                _interrupted()
        return self.commands.get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MsmtError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            # Reached only when the command does not handle Ctrl-C itself (msmt
            # submit exits 2 with its summary; node run stops on SIGINT).
            _interrupted()


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """Print this build's version and the formats it keeps, then exit 0."""
    if not value or ctx.resilient_parsing:
        return
    # Imported only when asked: the store module is not light, and --version must be.
    from broker.store_file import STORE_FORMAT  # noqa: PLC0415

    # The store format says which builds can run on a data directory, and so what
    # a rollback to this build can open (docs/DEPLOY.md, "Versions").
    click.echo(f"msmt, version {version()}\nstore format {STORE_FORMAT}")
    ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show this build's version and store format, and exit.",
)
def main() -> None:
    """Share sanctions-monitoring sightings among MSMT members, under each member's policy."""


FAMILIES: Final[dict[str, str]] = {
    "validate": "data",
    "schemas": "data",
    "samples": "data",
    "keys": "keys",
    "nats": "keys",
    "policy": "policy",
    "node": "node",
    "submit": "submit",
    "inbox": "inbox",
    "status": "status",
    "feeds": "feeds",
    "audit": "audit",
    "export": "export",
    "demo": "demo",
}
"""Each top-level command's family: the module ``broker.cli.<family>`` whose ``COMMANDS`` has it."""


def _load_holding_sigint(family: str) -> None:
    """``_load``, a Ctrl-C meanwhile held until the import is done, then raised.

    Raised inside the import, pydantic wrapped it in a ``SchemaError`` while it
    built a model's validator, which was a traceback (a bad-input sweep).
    """
    asked: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        asked.append(signum)

    try:
        before = signal.signal(signal.SIGINT, hold)
    except ValueError:  # not the main thread: a test's runner
        _load(family)
        return
    try:
        _load(family)
    finally:
        signal.signal(signal.SIGINT, before)
    if asked:
        raise KeyboardInterrupt


def _load(family: str) -> None:
    """Import ``broker.cli.<family>`` and add all of its ``COMMANDS`` to the group."""
    module = importlib.import_module(f"broker.cli.{family}")
    for command in module.COMMANDS:
        main.add_command(command)
