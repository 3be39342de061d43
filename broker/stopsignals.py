"""SIGTERM and SIGINT as a request to stop, from a daemon command's first line to its last.

Python installs no handler for SIGTERM, and the event loop's own handler only
exists while the node runs: a SIGTERM during the start (opening the store and
the audit log, the checks, the worker's start: seconds on a loaded machine)
killed the node by the default action, exit status -15 rather than a stop, and
a SIGINT there was ``msmt: interrupted`` and 130. ``StopSignals`` records
either from the command's first line; the node then takes them over, and stops
at once if one came while it loaded. When the event loop gives them back, the
default action would return with it: ``release`` puts the recorder back instead.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Final

SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
"""The signals that ask a daemon to stop (a service manager's, and Ctrl-C)."""


class StopSignals:
    """While entered, SIGTERM and SIGINT only set ``asked``; ``take`` hands them to a loop.

    Entered in the main thread (only it can set signal handlers); leaving puts
    back the handlers found on entry.
    """

    def __init__(self) -> None:
        self.asked = threading.Event()
        self._before: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in SIGNALS:
            self._before[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)
        self._before.clear()

    def _record(self, _signum: int, _frame: FrameType | None) -> None:
        # Only a flag: raising here could cut a step of the start in two.
        self.asked.set()

    def take(self, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
        """Have ``loop`` call ``stop`` on either signal; call it now if one came already."""
        for sig in SIGNALS:
            loop.add_signal_handler(sig, stop)
        if self.asked.is_set():
            stop()

    def release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take the signals back from ``loop``: recorded again, never the default action.

        The loop's removal of a handler restores the default (SIGTERM kills), so
        both are blocked meanwhile: one sent in between reaches the recorder.
        """
        before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)
                signal.signal(sig, self._record)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)
