"""``msmt submit``: a feed's NDJSON handed to its own node over the local socket.

Each record is answered as the node answers it, one line each, as it comes: the
feed's bytes are read on a thread as they arrive, so records piped in one at a time
are sent at once. The intake's client (``broker.intake``) is loaded only when the
command runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import click

from broker.cli.node import node_config
from broker.cli.options import CONFIG as _CONFIG
from broker.cli.options import stdin_buffer
from broker.errors import StdoutError, UsageError


async def _read_chunks(stream: BinaryIO, failed: list[OSError]) -> AsyncIterator[bytes]:
    """Yield the feed's bytes as they come, read on a daemon thread.

    ``os.read`` returns what the feed has written so far, so records piped in one
    at a time are sent, and answered, at once (``stream.read`` would wait for 64 KiB
    or the end). A daemon thread rather than the loop's executor, which
    ``asyncio.run`` joins at its end: Ctrl-C must not wait for a feed that writes
    nothing more. A read error is raised, and put in ``failed``.
    """
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes | OSError] = asyncio.Queue()
    room = threading.Semaphore(4)  # at most four chunks read ahead of the node
    fd = stream.fileno()

    def pump() -> None:
        while True:
            room.acquire()
            chunk: bytes | OSError
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError as exc:
                chunk = exc
            try:
                loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            except RuntimeError:  # the loop is closed: the command has ended
                return
            if not chunk or isinstance(chunk, OSError):
                return

    threading.Thread(target=pump, name="submit-reader", daemon=True).start()
    while True:
        chunk = await chunks.get()
        room.release()
        if isinstance(chunk, OSError):
            # Kept for the command: aiohttp reports any body error as the connection's.
            failed.append(chunk)
            raise chunk
        if not chunk:
            return
        yield chunk


@click.command(name="submit")
@_CONFIG
@click.argument("file", default="-", metavar="[FILE|-]")
@click.option("--quiet", "-q", is_flag=True, help="Print only rejected records and the summary.")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A named feed's token (msmt feeds add --out); default: the node's intake.token.",
)
def submit_cmd(config_path: Path, file: str, quiet: bool, token_file: Path | None) -> None:
    """Send NDJSON sightings to the local node; print one answer line per record.

    With ``--token-file`` the records come from that named feed, and the audit
    log says so (``socket:NAME``). Exit 0 when every record was accepted or was
    a duplicate (accepted before: a feed may resend safely), 1 when any was
    refused otherwise (schema, size, conflict, unavailable), 2 when the node
    could not be reached, refused the token, or stopped before answering every
    record, on Ctrl-C, or when stdout was closed before every answer was shown.
    """
    # Imported here: the intake loads aiohttp (~0.3 s), which the family's other
    # commands, and msmt feeds, never use.
    from broker.intake import read_token, submit  # noqa: PLC0415

    config = node_config(config_path)
    try:
        token = read_token(token_file or config.token_path)
    except UsageError as exc:
        # Only when there is no token to send: MSMT_INTAKE_TOKEN_FILE may point a
        # feed at its own token, and a node refusing the one sent says why itself.
        if token_file is None and not config.intake.shared_token:
            raise UsageError(
                "this node refuses the shared intake.token (intake.shared_token = false):"
                " give --token-file with the feed's own token (msmt feeds add)"
            ) from None
        if token_file is None and not config.token_path.exists():
            raise UsageError(
                f"{exc}: the node writes it at its first start (has `msmt node run` run?)"
            ) from None
        raise
    counts = {"accepted": 0, "rejected": 0}
    duplicates = 0

    def show(answer: dict[str, Any]) -> None:
        nonlocal duplicates
        counts[answer["status"]] = counts.get(answer["status"], 0) + 1
        duplicates += answer.get("reason") == "duplicate"
        if not quiet or answer["status"] != "accepted":
            try:
                click.echo(json.dumps(answer, separators=(",", ":")))
            except StdoutError as exc:
                # Our stdout failed (``| head`` left, a full disk): not the node's
                # socket, which an OSError here was taken for. Exit 2, as for Ctrl-C:
                # the answers not shown may be of records not accepted.
                failed = (
                    "stdout was closed" if exc.closed else f"stdout failed ({exc.cause.strerror})"
                )
                raise UsageError(
                    f"{failed} before every answer was shown: records whose answer"
                    " was not shown may or may not have been accepted; send them again"
                    " (a resend is answered duplicate)"
                ) from None

    try:
        stream = stdin_buffer() if file == "-" else Path(file).open("rb")  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"cannot read {file}: {exc.strerror}") from None

    def summarise() -> None:
        summary = f"{counts['accepted']} accepted, {counts['rejected']} rejected"
        click.echo(
            summary + (f" ({duplicates} of them duplicates)" if duplicates else ""), err=True
        )

    unread: list[OSError] = []
    try:
        asyncio.run(submit(config.socket_path, token, _read_chunks(stream, unread), show))
    except KeyboardInterrupt:
        # Exit 2, not click's "Aborted!" and 1: a feed's wrapper must not take an
        # interrupted batch for one whose records were all answered.
        summarise()
        raise UsageError(
            "interrupted before every record was answered: those without an answer"
            " may or may not have been accepted; send them again (a resend is"
            " answered duplicate)"
        ) from None
    except UsageError:
        if counts["accepted"] or counts["rejected"]:
            summarise()  # what was answered before the node stopped
        if unread:
            # Our input failed (EIO from a failing disk), not the node: it was blamed.
            name = "stdin" if file == "-" else file
            raise UsageError(
                f"cannot read {name}: {unread[0].strerror or unread[0]}: records without an"
                " answer above may or may not have been accepted; send them again (a resend"
                " is answered duplicate)"
            ) from None
        raise
    finally:
        if file != "-":
            stream.close()
    summarise()
    sys.exit(1 if counts["rejected"] > duplicates else 0)


COMMANDS: tuple[click.Command, ...] = (submit_cmd,)
