"""Each build says which it is: a version from git, in ``msmt --version`` and ``/metrics``.

A federation of eleven members runs several builds at once; before, every build
said 0.1.0 (a version-skew trial). The build takes its version from git
(hatch-vcs, pyproject.toml); these tests build wheels of this repository the way
pip does and read the version each one got.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import broker
from broker.metrics import Metrics
from broker.store_file import STORE_FORMAT

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def _built_version(source: Path, out: Path) -> str:
    """Build a wheel of ``source`` as pip does (hatchling, hatch-vcs) and read its version."""
    # The build backend comes from the venv (the test extras hold hatch-vcs): no index.
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(out), str(source)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("msmt_broker-*.whl")
    return wheel.name.split("-")[1]


def test_a_build_from_git_names_its_commit_and_counts_commits(tmp_path: Path) -> None:
    # A clone: what an operator builds from (this tree's uncommitted edits aside).
    clone = tmp_path / "clone"
    _git("clone", "--quiet", str(REPO), str(clone))
    got = _built_version(clone, tmp_path / "wheel")
    commits = _git("rev-list", "--count", "HEAD", cwd=clone)
    head = _git("rev-parse", "HEAD", cwd=clone)
    # Between releases (no tags here): 0.1.devN+gHASH, N the commits so far, so a
    # later build on main sorts after an earlier one.
    found = re.fullmatch(r"0\.1\.dev(\d+)\+g([0-9a-f]{7,})", got)
    assert found, got
    assert found[1] == commits
    assert head.startswith(found[2])


def test_a_build_without_git_history_says_0_0(tmp_path: Path) -> None:
    # A source archive (git archive, a download, the Docker build context) has no
    # history: it builds, and says it cannot tell which it is, not a made-up number.
    tree = tmp_path / "tree"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    assert _built_version(tree, tmp_path / "wheel") == broker.NO_VERSION == "0.0"


def test_metrics_name_the_build() -> None:
    metrics = Metrics("JPN")
    labels = {"version": broker.version(), "store_format": str(STORE_FORMAT)}
    assert metrics.registry.get_sample_value("msmt_build_info", labels) == 1.0
