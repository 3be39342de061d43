"""SIGTERM stops a benchmark as Ctrl-C does, so that its clean-up runs."""

from __future__ import annotations

import signal


def stop_on_sigterm() -> None:
    """Make SIGTERM a Ctrl-C: SIGINT, with Python's own handling of it restored.

    SIGTERM's default action ends the driver at once, skipping the ``finally``
    blocks that stop what it started: a hub and eleven nodes ran on after ``kill``
    stopped an A/B run, holding ports the next run needed. As a SIGINT it takes
    Ctrl-C's path: inside ``asyncio.run`` the main task is cancelled at an
    ``await``. A ``KeyboardInterrupt`` raised wherever the signal landed instead left
    a driver waiting for ever, now and then, on a loaded machine (inside nats-py).
    SIGINT's default handler is set too: a driver started with SIGINT ignored (a
    background job) would otherwise ignore both.
    """
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: signal.raise_signal(signal.SIGINT))
