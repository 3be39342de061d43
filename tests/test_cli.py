"""The ``msmt`` entry point itself: Ctrl-C that no command handles is one line and exit 130.

A real ``msmt`` process each time. The Ctrl-C is a ``KeyboardInterrupt`` raised
where Python's SIGINT handler would raise it, at the import of a named module
(a ``sitecustomize`` import hook), so it lands at the same point on every run:
a real signal would land wherever the process happened to be.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from node_world import MSMT, REPO

HOOK = """
import os, sys

class _CtrlC:
    # Raises KeyboardInterrupt as the named module is about to be imported.
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["INTERRUPT_AT_MODULE"]:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, _CtrlC())
"""


def _interrupted_run(tmp_path: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(HOOK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    env.update(PYTHONPATH=str(tmp_path), INTERRUPT_AT_MODULE=module)
    return subprocess.run(
        [MSMT, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("module", "args"),
    [
        # While the command families load, before any command runs (most of a second).
        ("broker.cli.audit", ("status", "--config", str(REPO / "nodes/JPN/node.toml"))),
        ("broker.cli.audit", ("--version",)),
        # Inside a command, before it handles Ctrl-C itself (node run loads the daemon).
        ("broker.node", ("node", "run", "--config", str(REPO / "nodes/JPN/node.toml"))),
    ],
)
def test_ctrl_c_while_starting_is_one_line_and_exit_130(
    tmp_path: Path, module: str, args: tuple[str, ...]
) -> None:
    done = _interrupted_run(tmp_path, module, *args)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "msmt: interrupted\n"
    assert done.stdout == ""


def test_the_hook_interrupts_nothing_it_is_not_asked_to(tmp_path: Path) -> None:
    # The same hook, aimed at a module msmt never imports: the command runs as usual,
    # so the interruptions above are the hook's doing, not the environment's.
    done = _interrupted_run(tmp_path, "no.such.module", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("msmt, version ")
