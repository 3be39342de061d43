"""``msmt demo``: the whole MSMT on this machine (issue 8 replaces this placeholder)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from broker.cli.data import _open_input
from broker.validation import validate_lines


@click.command()
@click.option(
    "--feed", type=click.Path(dir_okay=False, path_type=Path), default=Path("samples/feed.ndjson")
)
def demo(feed: Path) -> None:
    """Run the demo: for now, validate the bundled sample feed against the schemas."""
    start = time.perf_counter()
    with _open_input(str(feed)) as stream:
        results = list(validate_lines(stream))
    bad = [r for r in results if r.error is not None]
    kinds: dict[str, int] = {}
    for r in results:
        if r.sighting is not None:
            kinds[r.sighting.kind] = kinds.get(r.sighting.kind, 0) + 1
    elapsed = time.perf_counter() - start
    click.echo(f"validated {len(results)} sightings from {feed} in {elapsed * 1000:.0f} ms")
    for kind, n in sorted(kinds.items()):
        click.echo(f"  {kind:<9} {n}")
    for r in bad:
        click.echo(f"  line {r.line}: {r.error}")
    sys.exit(1 if bad else 0)


COMMANDS: tuple[click.Command, ...] = (demo,)
