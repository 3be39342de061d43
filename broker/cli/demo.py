"""``msmt demo``: the whole MSMT on this machine (see ``broker.demo``)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import click

from broker.cli.options import echo_line, private_files
from broker.demo import (
    DEFAULT_SIGHTINGS,
    DemoFailedError,
    Display,
    Options,
    run,
    scratch,
    signals_interrupt,
)
from broker.demo_report import write_report
from broker.demo_view import audit_lines, matrix_lines, side_by_side_lines, summary_line

DEFAULT_HTML = Path("msmt-demo-report.html")


@click.command()
@click.option(
    "--sightings",
    type=click.IntRange(12, 5000),
    default=DEFAULT_SIGHTINGS,
    show_default=True,
    help="Generated sightings the feeds submit (split among six members).",
)
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    # Kept or not, what the demo writes is 0700/0600 whatever the caller's umask:
    # 11 members' private keys, stores and logs, as msmt node run makes them.
    callback=private_files,
    help="Leave keys, configs, data, logs and the HTML report in this new or empty directory.",
)
@click.option(
    "--html",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"The HTML report (default: DIR/report.html with --keep, else {DEFAULT_HTML}).",
)
@click.option(
    "--nodes",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("nodes"),
    show_default=True,
    help="Folder of <MEMBER>/policy.toml files.",
)
def demo(sightings: int, keep: Path | None, html: Path | None, nodes: Path) -> None:
    """Run the whole MSMT here: a real hub, 11 nodes, feeds, then verify and reconcile it all.

    Exits 0 only if every released report arrived and every audit log verified
    (cosigned by all partners) and reconciled; otherwise 1 with the reason.
    """
    started = time.monotonic()

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    display = Display(write, sys.stdout.isatty())
    with signals_interrupt(), scratch(keep) as root:
        outcome = asyncio.run(run(Options(sightings, keep, nodes), root, display, echo_line))
        report = html or (root / "report.html" if keep is not None else DEFAULT_HTML)
        outcome.elapsed = time.monotonic() - started  # the whole command, as a user waits
        write_report(outcome, report)
    click.echo("")
    click.echo("\n".join(matrix_lines(outcome)))
    for view in outcome.side_by_side:
        click.echo("")
        click.echo("\n".join(side_by_side_lines(view)))
    click.echo("")
    click.echo("\n".join(audit_lines(outcome)))
    click.echo("")
    echo_line(f"HTML report: {report}")
    if keep is not None:
        echo_line(f"everything is kept in {keep} (logs in {keep / 'logs'})")
    click.echo(summary_line(outcome))
    if outcome.failures:
        sys.stdout.flush()
        raise DemoFailedError(f"demo failed: {outcome.failures[0]}")


COMMANDS: tuple[click.Command, ...] = (demo,)
