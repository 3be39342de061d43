"""The stop signals (``SIGNALS``) as a request to stop, from a daemon command's first line on.

Python installs no handler for SIGTERM, and the event loop's own handler only
exists while the node runs: a SIGTERM during the start (opening the store and
the audit log, the checks, the worker's start: seconds on a loaded machine)
killed the node by the default action, exit status -15 rather than a stop, and
a SIGINT there was ``msmt: interrupted`` and 130. ``StopSignals`` records
either from the command's first line; the node then takes them over, and stops
at once if one came while it loaded. When the event loop gives them back, the
default action would return with it: ``release`` puts the recorder back instead.

SIGHUP is a stop too, logged as such: the node has no reload (its files are read
at start), and its default action killed it without a line, leaving its intake
socket behind (a policy officer's trial sent it expecting a reload). Under the
unit's ``Restart=always`` a stop is followed by a start, which applies new files.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Final

SIGNALS: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""The signals that ask a daemon to stop (a service manager's, Ctrl-C, a hangup), and
those whose default action would kill it without a line: SIGQUIT, and SIGUSR1/SIGUSR2,
which operators used to nats-server send to reopen logs (a signals trial: exit -10, no
``node_stopping``, the socket left behind). The node has no reopen (it logs to stdout)."""


class StopSignals:
    """While entered, the stop signals only set ``asked``; ``take`` hands them to a loop.

    Entered in the main thread (only it can set signal handlers); leaving puts
    back the handlers found on entry. ``name`` is the first signal's (``SIGTERM``).
    """

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.name: str | None = None
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

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        # Only a flag: raising here could cut a step of the start in two.
        self._note(signum)
        self.asked.set()

    def _note(self, signum: int) -> None:
        if self.name is None:
            self.name = signal.Signals(signum).name

    def take(self, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
        """Have ``loop`` call ``stop`` on any of them; call it now if one came already."""

        def stop_on(signum: int) -> None:
            self._note(signum)
            stop()

        for sig in SIGNALS:
            loop.add_signal_handler(sig, stop_on, sig)
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
