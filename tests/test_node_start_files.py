"""A node refuses files it cannot read as text with one line, exit 2, and no traceback.

Real keys and a real ``msmt node run``: each file below is read before the node
dials the hub, so the URL is never used. The codec's own message would quote a
byte of the file, which for a key file is a byte of the secret.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from node_world import msmt, write_node_config

from broker import keys
from broker.config import load_config

NOT_UTF8 = b'{"d": "\xff\xfe"}'


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    keys.init_keys(tmp_path / "keys", ("JPN", "USA"), now=datetime.now(UTC) - timedelta(days=1))
    write_node_config(tmp_path, "JPN", ["nats://127.0.0.1:1"])
    return tmp_path


@pytest.mark.parametrize(
    ("damaged", "reason"),
    [
        ("nodes/JPN/policy.toml", "policy {} is not UTF-8 text"),
        ("keys/roster.json", "{} is not UTF-8 text"),
        ("signing key", "{} is not UTF-8 text"),
    ],
)
def test_a_file_that_is_not_utf8_text_is_one_line(folder: Path, damaged: str, reason: str) -> None:
    if damaged == "signing key":
        roster = keys.load_signed_roster(folder / "keys").roster
        kid = roster.current("JPN", "sig", datetime.now(UTC)).kid
        path = keys.key_path(folder / "keys", "JPN", kid)
    else:
        path = folder / damaged
    path.write_bytes(NOT_UTF8)
    done = msmt("node", "run", "--config", str(folder / "nodes" / "JPN" / "node.toml"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith(reason.format(path.resolve()) + "\n"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "\\xff" not in done.stderr


def test_an_unreadable_witness_state_stops_the_start_for_the_operator(folder: Path) -> None:
    # Exit status 2, which the sample systemd unit does not restart on: a restart
    # cannot mend the file, and a node that forgot what it cosigned can be rolled back.
    config_path = folder / "nodes" / "JPN" / "node.toml"
    state = load_config(config_path, env={}).data_dir / "witness-state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    for damage, problem in (
        (b'{"USA": {"size": "x"}}', "witness state for 'USA' is malformed"),
        (b'{"USA": {"size": 3, "root": "AAAA"}}', "witness state for 'USA' is malformed"),
        (b"\xff{", "witness state is not JSON"),
    ):
        state.write_bytes(damage)
        done = msmt("node", "run", "--config", str(config_path))
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"msmt: error: {state} is unreadable: {problem}: restore"), (
            done.stderr
        )
        assert done.stderr.count("\n") == 1, done.stderr
