"""Commands about sighting data: ``validate``, ``schemas export``, ``samples``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO, Final

import click

from broker import samples, schemas
from broker.cli.options import echo_line, stdin_buffer
from broker.errors import InputError, UsageError
from broker.files import write_output, write_refusal
from broker.members import MEMBERS, parse_members
from broker.validation import validate_stream


def _open_input(path: str) -> BinaryIO:
    if path == "-":
        return stdin_buffer()
    try:
        return Path(path).open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


_OPENED_ONLY: Final = frozenset(
    f"not valid JSON: EOF while parsing {what} at column 1" for what in ("an object", "a list")
)
"""The reason for a line that only opens an object or a list."""


def _unread(file: str, exc: OSError, good: int, bad: int) -> str:
    """The refusal of a read of ``file`` that failed after ``good`` and ``bad`` records."""
    name = "stdin" if file == "-" else file
    before = f" after {good} valid and {bad} invalid records; the rest were not validated"
    return f"cannot read {name}: {exc.strerror or exc}{before if good or bad else ''}"


@click.command()
@click.argument("file", default="-", metavar="[FILE|-]")
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary line.")
def validate(file: str, quiet: bool) -> None:
    """Validate NDJSON sightings; print one line per bad field.

    Exit 0 when every record is valid, 1 when any is invalid, 2 on a usage error.
    """
    stream = _open_input(file)
    good = bad = 0
    try:
        for result in validate_stream(stream):
            if result.error is None:
                good += 1
                continue
            if result.line == 1 and result.error.problems[0].reason in _OPENED_ONLY:
                # Not NDJSON but a pretty-printed JSON file: each of its other lines
                # would be one more error, saying nothing more (a new user's trial).
                raise InputError(
                    f"{file}: line 1 is not a whole record: NDJSON holds one record per"
                    " line; a pretty-printed file can be given as"
                    " `jq -c . FILE | msmt validate -`"
                )
            bad += 1
            if not quiet:
                for problem in result.error.problems:
                    where = problem.path or "(record)"
                    echo_line(f"{file}:{result.line}: {where}: {problem.reason}")
    except OSError as exc:
        # A read that fails past the open (EIO from a failing disk or a FUSE mount):
        # it was a traceback. Exit 2, as for a file that cannot be opened; the records
        # read before it have had their lines, the rest were never validated.
        raise UsageError(_unread(file, exc, good, bad)) from None
    finally:
        if file != "-":
            stream.close()
    click.echo(f"{good} valid, {bad} invalid", err=True)
    sys.exit(1 if bad else 0)


@click.group(name="schemas")
def schemas_group() -> None:
    """The public JSON Schema contract for feeds."""


@schemas_group.command(name="export")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("schemas"),
    show_default=True,
    help="The directory to write them to.",
)
def schemas_export(out: Path) -> None:
    """Write the JSON Schema files and example records to OUT."""
    try:
        for path in schemas.export(out):
            echo_line(str(path))
    except OSError as exc:
        raise write_refusal(exc.filename or out, exc) from None


@click.group(name="samples")
def samples_group() -> None:
    """Generate sample feeds for tests, docs and the demo."""


@samples_group.command(name="generate")
@click.option(
    "--count",
    type=click.IntRange(1, 1_000_000),
    default=300,
    show_default=True,
    help="How many records.",
)
@click.option(
    "--seed", type=int, default=1, show_default=True, help="The same seed writes the same file."
)
@click.option(
    "--originators",
    default=",".join(MEMBERS),
    show_default=True,
    help="Comma-separated members the records come from (a feed submits only its own).",
)
@click.option("--invalid", is_flag=True, help="Write the invalid-record file instead.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The file to write (default: stdout).",
)
def samples_generate(
    count: int, seed: int, originators: str, invalid: bool, out: Path | None
) -> None:
    """Write a sample NDJSON feed (valid records, or with --invalid one per broken rule)."""
    if invalid:
        lines = [
            rec if isinstance(rec, str) else samples.to_ndjson([rec]).rstrip("\n")
            for _rule, _path, rec in samples.invalid_records()
        ]
        text = "".join(line + "\n" for line in lines)
    else:
        try:
            members = parse_members(originators)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--originators") from None
        text = samples.to_ndjson(samples.generate(count, seed=seed, originators=members))
    if out is None:
        click.echo(text, nl=False)
    else:
        write_output(out, text.encode("utf-8"))


COMMANDS = (validate, schemas_group, samples_group)
