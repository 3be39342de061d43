"""SIGTERM stops a benchmark as Ctrl-C does, so that its clean-up runs."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final, TypeVar

T = TypeVar("T")

RECANCEL_S: Final = 1.0
"""After a stop, the driver's main task is cancelled again this often until it ends."""


def stop_on_sigterm() -> None:
    """Make SIGTERM a Ctrl-C for a driver without an event loop: SIGINT, Python's own.

    SIGTERM's default action ends the driver at once, skipping the ``finally``
    blocks that stop what it started. SIGINT's default handler is set too: a
    driver started with SIGINT ignored (a background job) would otherwise ignore
    both. A driver on asyncio uses ``run_stoppable`` instead.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: signal.raise_signal(signal.SIGINT))


def run_stoppable(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``; SIGTERM or SIGINT cancels it, then exits 128 + the signal.

    SIGTERM's default action skipped the ``finally`` blocks that stop the hub and
    nodes a driver started: they ran on after ``kill`` and held the next run's
    ports. Here either signal cancels the main task, so those blocks run (they kill
    synchronously), and again every ``RECANCEL_S`` until it ends: Python 3.11's
    ``asyncio.wait_for``, which nats-py's fetch and requests wait in, swallows a
    cancellation that lands as the awaited answer arrives. A single cancellation
    was lost so in 2 of 10 stops of ``hub_ack.py`` on a loaded machine, and the
    driver ran its rounds to the end. One line says which signal stopped it.
    """
    stopped: list[int] = []

    async def until_stopped() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(main)

        def cancel() -> None:
            if not task.done():
                task.cancel()
                loop.call_later(RECANCEL_S, cancel)

        def on_signal(signum: int) -> None:
            if not stopped:
                stopped.append(signum)
                cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        return await task

    try:
        result = asyncio.run(until_stopped())
    except (Exception, asyncio.CancelledError):
        if not stopped:  # else nats-py may have made the cancellation an error of its own
            raise
    if not stopped:
        return result
    name = signal.Signals(stopped[0]).name
    print(f"{Path(sys.argv[0]).name}: stopped by {name}", file=sys.stderr)
    raise SystemExit(128 + stopped[0])
