"""Commands for exporting received reports to analysts' tools: ``msmt export stix``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from broker.cli.options import CONFIG, echo_line, rfc3339, stdout_is_utf8, write_stdout
from broker.files import write_output
from broker.stix import bundle, load_received


@click.group(name="export")
def export_group() -> None:
    """Export what this node received to analysts' tools."""


@export_group.command(name="stix")
@CONFIG
@click.option("--since", help="Only reports received at or after this RFC 3339 time.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the bundle here instead of to stdout.",
)
def export_stix(config_path: Path, since: str | None, out: Path | None) -> None:
    """Write a STIX 2.1 bundle of the reports this node received (docs/STIX.md).

    Reports whose originator's signing key the roster has since revoked are left
    out, and a line on stderr says how many; ``msmt inbox list`` shows them.
    """
    reports, left_out = load_received(
        config_path, None if since is None else rfc3339("--since", since)
    )
    # UTF-8, as JSON is; to a stdout of another encoding (PYTHONIOENCODING=ascii, a C
    # locale without UTF-8 mode) with \u escapes, the same JSON, not a traceback (a review).
    escape = out is None and not stdout_is_utf8()
    text = json.dumps(bundle(reports), indent=2, ensure_ascii=escape) + "\n"
    if left_out:
        # Never a flag to put them back: a revocation withdraws trust in what the key signed.
        click.echo(
            f"{left_out} report{'s' if left_out > 1 else ''} left out: signed by a key since"
            " revoked (msmt inbox list shows them)",
            err=True,
        )
    if out is None:
        # A bundle cut short must not end in exit status 0: the reader may import it.
        write_stdout([text], "bundle")
    else:
        write_output(out, text.encode("utf-8"))
        echo_line(f"{len(reports)} reports exported to {out}", err=True)


COMMANDS: tuple[click.Command, ...] = (export_group,)
