"""The files under ``deploy/``: the systemd unit's restart rule and ``provision.sh``'s pinning.

``provision.sh`` runs for real, against a real nats-server that knows every
member's account, as the compose file's ``setup`` service would run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_world import msmt, running_hub

from broker import keys_custodian
from broker.members import MEMBERS
from broker.natsproc import NatsServer

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "msmt-node.service"
PROVISION = REPO / "deploy" / "provision.sh"
PREPARE = REPO / "deploy" / "prepare.sh"
AUTHORITY = "roster-authority.json"


def _service_settings(text: str) -> dict[str, list[str]]:
    """Each key of the unit's [Service] section with its values (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_does_not_restart_a_node_that_exits_for_its_configuration(
    tmp_path: Path,
) -> None:
    service = _service_settings(UNIT.read_text())
    assert service["Restart"] == ["always"]
    prevented = {
        int(code) for value in service["RestartPreventExitStatus"] for code in value.split()
    }
    # What msmt exits with for a configuration mistake, from the real command line.
    missing = msmt("node", "run", "--config", str(tmp_path / "node.toml"), timeout=60)
    assert missing.stderr.startswith("msmt: error: cannot read config "), missing.stderr
    assert missing.returncode in prevented
    # Anything else (a crash, a dead planning worker: exit 1) is still restarted.
    assert 1 not in prevented


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "keys"
    keys_custodian.init_keys(path)  # all 11 members, as provision.sh expects
    return path


@pytest.fixture
def hub(source: Path, tmp_path: Path) -> Iterator[NatsServer]:
    with running_hub(source, tmp_path / "hub") as server:
        yield server


def _provision(source: Path, volumes: Path, hub: NatsServer) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MSMT_KEYS_SRC": str(source),
        "MSMT_VOLUMES": str(volumes),
        "MSMT_HUB": hub.url,
        "MSMT_REPLICAS": "1",
    }
    return subprocess.run(
        ["/bin/sh", str(PROVISION)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and inode (a rewrite gets a new inode)."""
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_ino)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_provision_pins_the_authority_key_once_and_never_replaces_it(
    source: Path, hub: NatsServer, tmp_path: Path
) -> None:
    volumes = tmp_path / "volumes"
    first = _provision(source, volumes, hub)
    assert first.returncode == 0, first.stderr
    pinned = (source / AUTHORITY).read_bytes()
    for member in MEMBERS:
        assert (volumes / member / AUTHORITY).read_bytes() == pinned
        assert (volumes / member / "roster.json").read_bytes() == (
            source / "roster.json"
        ).read_bytes()
    inodes = {m: (volumes / m / AUTHORITY).stat().st_ino for m in MEMBERS}

    # A roster rollout: the roster changes, the pinned key is left as it is (not rewritten).
    keys_custodian.rotate_keys(source, "JPN")
    again = _provision(source, volumes, hub)
    assert again.returncode == 0, again.stderr
    for member in MEMBERS:
        assert (volumes / member / AUTHORITY).stat().st_ino == inodes[member]
        assert (volumes / member / "roster.json").read_bytes() == (
            source / "roster.json"
        ).read_bytes()

    # Whoever can replace the roster files replaces the authority key with them: refused,
    # before any volume is touched.
    forged = tmp_path / "forged" / "keys"
    keys_custodian.init_keys(forged)
    for name in (AUTHORITY, "roster.json", "roster.json.jws"):
        shutil.copyfile(forged / name, source / name)
    before = _snapshot(volumes)
    refused = _provision(source, volumes, hub)
    assert refused.returncode == 2, refused.stdout
    assert refused.stderr.startswith(
        f"provision.sh: error: {source / AUTHORITY} is not the authority key pinned in "
    ), refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stdout == ""
    assert _snapshot(volumes) == before


def test_prepare_refuses_a_nodes_directory_without_policies_before_writing_keys(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [str(PREPARE), "keys", "nodez"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (
        "prepare.sh: no nodez/<MEMBER>/policy.toml: NODESDIR must hold the members' policies\n"
    )
    assert not (tmp_path / "keys").exists()


def test_prepare_run_again_refuses_with_its_own_line_and_changes_nothing(tmp_path: Path) -> None:
    # It said "use --force", an option of msmt keys init that prepare.sh does not take.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    shutil.copytree(REPO / "nodes", tmp_path / "nodes")
    first = subprocess.run(
        [str(PREPARE)], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert first.returncode == 0, first.stdout + first.stderr
    before = _snapshot(tmp_path / "keys")
    again = subprocess.run(
        [str(PREPARE)], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert (again.returncode, again.stdout) == (2, "")
    assert again.stderr == (
        "prepare.sh: keys already holds keys (roster.json): to start over, move keys away;"
        " to change keys, see docs/KEYS.md (msmt keys rotate, msmt keys revoke)\n"
    )
    assert _snapshot(tmp_path / "keys") == before
