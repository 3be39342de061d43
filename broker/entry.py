"""The ``msmt`` command's entry point, light enough that a Ctrl-C finds it in place.

The console script pip writes imports its entry point first; importing the CLI
(click, pydantic, the commands) takes a noticeable moment, and a Ctrl-C then was
a traceback and a kill by SIGINT where every other moment gives ``msmt:
interrupted`` and 130 (a bad-input sweep). So this module imports nothing heavy
before it can turn one into that line; and once the command has ended, with its
exit status set, a Ctrl-C no longer changes the status.
"""

from __future__ import annotations

import sys

# Nothing else at the top, not even typing: importing signal (enum, functools,
# collections) alone left a Ctrl-C 30 ms to become a traceback.
INTERRUPTED_EXIT = 130
"""The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells give it."""


def main() -> None:
    """Run ``msmt``: check that no other user may change its code, import the CLI, run it."""
    try:
        from broker.code_check import code_open_to_others  # noqa: PLC0415 - after the guard

        problem = code_open_to_others()
        if problem is not None:
            # Before the commands are imported: a planted module of theirs never runs.
            sys.stderr.write(f"msmt: error: {problem}\n")
            sys.exit(2)
        from broker.cli import main as cli  # noqa: PLC0415 - after the Ctrl-C guard
    except KeyboardInterrupt:
        sys.stderr.write("msmt: interrupted\n")
        sys.exit(INTERRUPTED_EXIT)
    try:
        cli()
    finally:
        # Its status is set (SystemExit is on its way): a Ctrl-C while the
        # interpreter exits must not make it a kill by SIGINT. (Loaded by now.)
        import signal  # noqa: PLC0415

        signal.signal(signal.SIGINT, signal.SIG_IGN)
