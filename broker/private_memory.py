"""Keep a process's memory (private keys, report content) from others on its host.

A core file would write it to disk (systemd-coredump keeps those for days, readable by
admins), and a process of the same user could read it through ``/proc/<pid>/mem`` or
``ptrace``: a local user's review, running as the node's user (as a socket feed must),
found the raw signing key in the node's memory. ``PR_SET_DUMPABLE`` 0 stops both for
every user but root, and is reset by ``execve``, so each process calls this itself.
"""

from __future__ import annotations

import ctypes
import resource
import sys
from typing import Final

_PR_SET_DUMPABLE: Final = 4


def keep_memory_private() -> None:
    """No core file, hard limit too; on Linux, no reading or tracing by another process."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
