"""SIGTERM stops a benchmark as Ctrl-C does, so that its clean-up runs."""

from __future__ import annotations

import signal

from broker.demo import interrupt_once


def stop_on_sigterm() -> None:
    """Raise ``KeyboardInterrupt`` on SIGTERM, as Ctrl-C does, once (``interrupt_once``).

    SIGTERM's default action ends the driver at once, skipping the ``finally``
    blocks that stop what it started: a hub and eleven nodes ran on after ``kill``
    stopped an A/B run, holding ports the next run needed.
    """
    signal.signal(signal.SIGTERM, interrupt_once)
