"""The files a node starts with: those it cannot read, and the modes of those it makes.

Real keys and a real ``msmt node run``: each file read below is read before the
node dials the hub, so the URL is never used. A file it cannot read as text is
one line, exit 2, and no traceback: the codec's own message would quote a byte
of the file, which for a key file is a byte of the secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from node_world import MSMT, audit_entries, fetch, msmt, wait_for, write_node_config

from broker import keys, keys_custodian, keys_roster, keys_users
from broker.auditlog import DB_FILE, AuditLog
from broker.config import NodeConfig, load_config
from broker.errors import MsmtError
from broker.node_start import load_node
from broker.store import Store
from broker.store_file import writer_pid

NOT_UTF8 = b'{"d": "\xff\xfe"}'


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    keys_custodian.init_keys(
        tmp_path / "keys", ("JPN", "USA"), now=datetime.now(UTC) - timedelta(days=1)
    )
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
        roster = keys_roster.load_signed_roster(folder / "keys").roster
        kid = roster.current("JPN", "sig", datetime.now(UTC)).kid
        path = keys.key_path(folder / "keys", "JPN", kid)
    else:
        path = folder / damaged
    path.write_bytes(NOT_UTF8)
    before = _tree(folder)
    done = msmt("node", "run", "--config", str(folder / "nodes" / "JPN" / "node.toml"))
    assert done.returncode == 2, done.stderr
    # A first start refused for its files leaves nothing behind: no data directory,
    # no empty store that the next start would take for this member's.
    assert _tree(folder) == before
    assert done.stderr.endswith(reason.format(path.resolve()) + "\n"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "\\xff" not in done.stderr
    # msmt node check finds it, with the same line and status, and starts nothing.
    checked = msmt("node", "check", "--config", str(folder / "nodes" / "JPN" / "node.toml"))
    assert (checked.returncode, checked.stdout, checked.stderr) == (2, "", done.stderr)


def test_a_nats_seed_file_of_junk_is_found_by_node_check(folder: Path) -> None:
    # A bad-input sweep: node check said "ok", and the running node then ended with a
    # UnicodeDecodeError naming no file.
    junk = folder / "seed.nk"
    junk.write_bytes(b"\xfc\x00 not a seed\n")
    junk.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    env["MSMT_NATS_SEED_FILE"] = str(junk)
    config = str(folder / "nodes" / "JPN" / "node.toml")
    checked = subprocess.run(
        [MSMT, "node", "check", "--config", config],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert checked.returncode == 2, checked.stdout
    assert checked.stderr == (
        f"msmt: error: nats.seed_file {junk}: malformed nkey seed (not base32)\n"
    )


def test_node_check_compares_the_nats_seed_with_the_hub_users_at_hand(folder: Path) -> None:
    # A wrong nats.nk (another member's, one from another key directory) showed only at
    # connect, as the hub's Authorization Violation. With the custodian's signed
    # nats-users.json beside the roster, node check compares the seed's key with it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    config = folder / "nodes" / "JPN" / "node.toml"
    users = folder / "keys" / "nats-users.json"
    jpn = keys.nats_public((folder / "keys" / "JPN" / "nats.nk").read_bytes(), "JPN's")
    usa = keys.nats_public((folder / "keys" / "USA" / "nats.nk").read_bytes(), "USA's")
    done = _node("check", str(config), env)
    assert done.returncode == 0, done.stderr
    assert f", user {jpn}, as {users} (version 1) lists it, TLS off\n" in done.stdout

    # A warning, and the other checks go on: a start never reads the file, and a copy
    # may be older than the hub's configuration.
    wrong = folder / "usa.nk"
    shutil.copy(folder / "keys" / "USA" / "nats.nk", wrong)
    wrong.chmod(0o600)
    done = _node("check", str(config), {**env, "MSMT_NATS_SEED_FILE": str(wrong)})
    assert done.returncode == 0, done.stderr
    assert (
        f", user {usa}; WARNING: {users} (version 1, signed by the pinned authority) lists"
        f" NATS user {jpn} for JPN, so a hub configured from it refuses this seed"
    ) in done.stdout
    assert done.stdout.splitlines()[-1].startswith("ok (not checked: ")

    # Two copies (a review: one left beside the roster from before the custodian
    # replaced JPN's NATS user failed the check of the right seed): the newer is used.
    roster = folder / "roster"
    roster.mkdir()
    for name in ("roster.json", "roster.json.jws", "nats-users.json", "nats-users.json.jws"):
        shutil.copy(folder / "keys" / name, roster / name)
    shutil.copy(folder / "keys" / "roster-authority.json", roster / "roster-authority.json")
    seed = keys.new_nats_seed()
    (folder / "keys" / "JPN" / "nats.nk").unlink()
    keys.write_private(folder / "keys" / "JPN" / "nats.nk", seed + b"\n")
    authority = keys_custodian.load_for_update(folder / "keys")[1]
    current = keys_users.load_users_for_update(folder / "keys", authority)
    renewed = keys.nats_public(seed, "the new seed")
    other = folder / "other"  # a second custodian folder, at version 1 as well
    shutil.copytree(folder / "keys", other)
    keys_users.write_nats_users(folder / "keys", {**current, "JPN": renewed}, authority)
    config.write_text(
        config.read_text().replace('dir = "keys"\n', 'dir = "keys"\nroster_dir = "roster"\n', 1)
    )
    done = _node("check", str(config), env)
    assert done.returncode == 0, done.stderr
    assert f", user {renewed}, as {users} (version 2) lists it, TLS off\n" in done.stdout

    # Two copies of one version that disagree (two custodian folders), said; and a
    # copy that does not verify is said beside the one that does.
    stranger = keys.nats_public(keys.new_nats_seed(), "another seed")
    authority = keys_custodian.load_for_update(other)[1]
    keys_users.write_nats_users(other, {**current, "JPN": stranger}, authority)  # version 2
    for name in ("nats-users.json", "nats-users.json.jws"):
        shutil.copy(other / name, roster / name)
    done = _node("check", str(config), env)
    assert done.returncode == 0, done.stderr
    assert f"; WARNING: {users} is version 2 too, but lists {renewed} for JPN" in done.stdout
    (roster / "nats-users.json.jws").write_text("x")
    done = _node("check", str(config), env)
    assert f", user {renewed}, as {users} (version 2) lists it; not compared with" in done.stdout

    # A copy that does not verify is not compared; none, said.
    signature = users.with_name("nats-users.json.jws")
    signature.write_text(signature.read_text()[:-4] + "AAAA")
    (roster / "nats-users.json").unlink()
    done = _node("check", str(config), env)
    assert done.returncode == 0, done.stderr
    assert f", user {renewed} (not compared with {users}, which does not verify: " in done.stdout
    users.unlink()
    done = _node("check", str(config), env)
    assert done.returncode == 0, done.stderr
    assert f", user {renewed} (no nats-users.json beside the roster to compare it with)" in (
        done.stdout
    )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (os.mkfifo, "not a regular file (a FIFO, socket or device)"),
        (lambda p: p.symlink_to("/dev/zero"), "not a regular file (a FIFO, socket or device)"),
        (lambda p: p.mkdir(), "Is a directory"),
        (lambda p: p.symlink_to("/nonexistent/x"), "No such file or directory"),
    ],
    ids=["fifo", "dev-zero", "directory", "dangling-symlink"],
)
def test_node_check_names_a_hub_users_copy_that_is_no_file(
    folder: Path, make: Callable[[Path], object], reason: str
) -> None:
    # A FIFO, a device or a folder where the custodian's copy lies was "no
    # nats-users.json beside the roster": the seed passed for not compared by choice,
    # while a copy meant to be compared was not (an input sweep, /tmp/h83).
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    users = folder / "keys" / "nats-users.json"
    users.unlink()
    make(users)
    done = _node("check", str(folder / "nodes" / "JPN" / "node.toml"), env)
    assert done.returncode == 0, done.stderr
    assert not done.stderr
    assert (
        f" (not compared with {users}, which does not verify: cannot read {users}: {reason})"
        in (done.stdout)
    )
    assert done.stdout.splitlines()[-1].startswith("ok (not checked: ")


def test_a_start_refused_late_is_not_shown_as_started(folder: Path) -> None:
    # A start refused after the store was written (here its metrics port, held by a
    # process of the node's own user: a second node) left msmt status showing the
    # roster, signing key, policy and build as in force, and no error: as if it ran.
    config_path = folder / "nodes" / "JPN" / "node.toml"
    config = load_config(config_path, env={})
    with socket.create_server(("127.0.0.1", config.metrics.port)):
        refused = msmt("node", "run", "--config", str(config_path))
    assert refused.returncode == 2, refused.stderr
    assert "metrics.listen" in refused.stderr
    done = msmt("status", "--config", str(config_path), "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["roster_version"] == "unknown"
    assert status["signing_kid"] == "unknown"
    assert status["roster_file"] == "version 1 (the node has not started with it yet)"
    assert status["version"] == "unknown"
    assert status["last_error"] == "start refused: " + refused.stderr.removeprefix(
        "msmt: error: "
    ).removesuffix("\n")
    # The refused start logged its policy: the next one does not log it again.
    node = load_node(config)
    node.store.close()
    node.audit.close()
    assert [e["type"] for e in audit_entries(config.audit_dir)].count("policy") == 1


async def test_a_start_refused_over_its_intake_token_says_so_and_closes_its_files(
    folder: Path,
) -> None:
    # A review: refused over a shared intake.token others may read, a start left
    # msmt status silent, and an in-process caller with the store and the log open.
    config = load_config(folder / "nodes" / "JPN" / "node.toml", env={})
    config.token_path.parent.mkdir(parents=True, exist_ok=True)
    config.token_path.write_text("t" * 43 + "\n")
    config.token_path.chmod(0o644)
    node = load_node(config)
    with pytest.raises(MsmtError, match="readable by others") as refused:
        await node.run()
    status = Store(config.store_path)  # its writer's lock: held, had the node not closed it
    try:
        assert status.state()["last_error"] == f"start refused: {refused.value}"
    finally:
        status.close()


async def test_a_start_cancelled_while_its_planning_worker_starts_closes_its_files(
    folder: Path,
) -> None:
    # A review: only a refusal closed them; an in-process caller cancelling the start
    # (a test, the demo's stop) left the store locked and the log open.
    config = load_config(folder / "nodes" / "JPN" / "node.toml", env={})
    node = load_node(config)
    starting = asyncio.Event()

    async def hung() -> None:
        starting.set()
        await asyncio.Event().wait()

    node._plans.start = hung  # type: ignore[method-assign]
    task = asyncio.create_task(node.run())
    await asyncio.wait_for(starting.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    Store(config.store_path).close()  # its writer's lock: held, had the node not closed it


@pytest.mark.parametrize(
    ("ends", "said"),
    [(["unserved", "away", "unserved"], False), (["unserved", "unserved"], True)],
)
async def test_503s_apart_do_not_add_up_to_an_unserved_inbox(
    folder: Path, monkeypatch: pytest.MonkeyPatch, ends: list[str], said: bool
) -> None:
    # A review: one 503 (a cluster electing the consumer's leader), the hub away for
    # minutes, one 503 again: inbox_unserved at once, "restart every hub server".
    # Only runs that end unserved back to back, for UNSERVED_AFTER_S, are a streak.
    node = load_node(load_config(folder / "nodes" / "JPN" / "node.toml", env={}))
    clock = [1000.0]  # the node's monotonic clock alone: asyncio keeps the real one
    fake = SimpleNamespace(monotonic=lambda: clock[0], time=time.time)
    monkeypatch.setattr("broker.node_base.time", fake)
    runs = list(ends)

    class Receiver:
        unserved = False

        async def run(self, _halt: asyncio.Event) -> None:
            clock[0] += 300
            end = runs.pop(0)
            if not runs:
                node.stop.set()  # the loop ends after this run's outcome
            if end == "away":
                raise nats.errors.ConnectionClosedError
            self.unserved = end == "unserved"

    node.hub.clock_checked.set()
    try:
        await node._receive_forever(Receiver())  # type: ignore[arg-type]
    finally:
        node.store.close()
        node.audit.close()
        node._db.shutdown(wait=True)
    assert node._unserved is said


async def test_a_nodes_metrics_by_partner_follow_its_roster(folder: Path) -> None:
    # The roster lists JPN and USA only: no series for the nine members not in it, at
    # the start nor after the housekeeping that sets the budget and outbox gauges.
    node = load_node(load_config(folder / "nodes" / "JPN" / "node.toml", env={}))
    try:
        node._show_budget()
        await node._measure_outbox_age()
        page = node.metrics.render().decode()
    finally:
        node.store.close()
        node.audit.close()
        node._db.shutdown(wait=True)
    # Held messages apart: counted for every member (test_metrics).
    others = re.sub(r"\nmsmt_received_held_\w+\{[^\n]*", "", page)
    partners = set(re.findall(r'[{,](?:sender|partner|log|witness)="([A-Z]+)"', others))
    assert partners == {"JPN", "USA"}, partners
    assert 'msmt_outbox_oldest_seconds{partner="USA"} 0.0' in page
    assert 'msmt_sender_budget_used_ratio{sender="USA"} 0.0' in page


def _node(command: str, config: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``msmt node COMMAND --config CONFIG`` with ``env``, its output kept."""
    return subprocess.run(
        [MSMT, "node", command, "--config", config],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


def test_a_data_dir_that_is_a_file_is_named_by_node_check_and_run(folder: Path) -> None:
    # A bad-input sweep: node check said "none yet (the first start makes it)" and ok,
    # and node run then "cannot create ...: File exists".
    not_a_dir = folder / "data.txt"
    not_a_dir.write_text("a file\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    env.update(MSMT_DATA_DIR=str(not_a_dir), MSMT_NATS_URLS="nats://op:hunter2@127.0.0.1:1")
    config = str(folder / "nodes" / "JPN" / "node.toml")
    line = f"msmt: error: config key data_dir: {not_a_dir} is not a directory\n"
    for command in ("check", "run"):
        done = _node(command, config, env)
        assert (command, done.returncode, done.stderr) == (command, 2, line)
        assert "hunter2" not in done.stdout  # node check's nats line shows no password
    assert not_a_dir.read_text() == "a file\n"


def test_a_descriptor_limit_too_low_for_a_node_is_one_line_before_anything_is_made(
    folder: Path,
) -> None:
    # `ulimit -n 16`: a traceback from os.pipe() as the planning worker started, after
    # the store and the audit log were made and the start logged.
    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))

    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    done = subprocess.run(
        [MSMT, "node", "run", "--config", str(folder / "nodes" / "JPN" / "node.toml")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
        preexec_fn=low,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "msmt: error: the descriptor limit (ulimit -n) is 16, too low for a node, which needs"
        " at least 64: raise it (LimitNOFILE= in a systemd unit, ulimit -n in a shell)\n"
    )
    assert not (folder / "data").exists()


@pytest.mark.parametrize("what", ["data_dir", "code", "data_dir's parent"])
def test_a_folder_others_may_write_stops_node_check_and_run(folder: Path, what: str) -> None:
    # A local user's review: a data directory another user may write to lets them
    # replace the store, log or tokens; a bytecode cache every user may write to
    # (a first run under umask 000) ran their .pyc as root at the next msmt command.
    opened = folder / what
    opened.mkdir()
    opened.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    env["MSMT_NATS_URLS"] = "nats://127.0.0.1:1"
    if what == "data_dir":
        env["MSMT_DATA_DIR"] = str(opened)
        line = f"msmt: error: config key data_dir: {opened} is not the node's own (owner uid 0,"
    elif what == "data_dir's parent":
        # A second review: under a parent others may write, the folder can be swapped.
        env["MSMT_DATA_DIR"] = str(opened / "data")
        line = f"msmt: error: config key data_dir: {opened} is writable by every local user"
    else:
        env["PYTHONPYCACHEPREFIX"] = str(opened)
        line = f"msmt: error: {opened} is writable by every local user (mode 0777): anyone"
        # Refused before the commands are imported: a planted module never runs.
    config = str(folder / "nodes" / "JPN" / "node.toml")
    for command in ("check", "run"):
        done = _node(command, config, env)
        assert (command, done.returncode) == (command, 2), done.stderr
        assert done.stderr.startswith(line), done.stderr
        assert len(done.stderr.splitlines()) == 1
    assert not (opened / "node.sqlite3").exists()
    opened.chmod(0o700 if what == "data_dir" else 0o755)  # sticky is not enough for code
    done = _node("check", config, env)
    assert "writable by every local user" not in done.stderr
    assert "is not the node's own" not in done.stderr


def _tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def test_node_check_reads_what_a_start_reads_and_writes_nothing(folder: Path) -> None:
    config_path = folder / "nodes" / "JPN" / "node.toml"
    config = load_config(config_path, env={})
    before = _tree(folder)
    done = msmt("node", "check", "--config", str(config_path))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" ")[0] for line in lines] == [
        "config",
        "roster",
        "keys",
        "nats",
        "policy",
        "store",
        "ok",
    ]
    assert lines[1].startswith(f"roster {config.roster_dir}: version 1, signed by the pinned")
    assert lines[4] == f"policy {config.policy}: {config.read_policy()[0].digest}"
    assert lines[5] == f"store {config.store_path}: none yet (the first start makes it)"
    # No data directory, no roster pin: a check changes nothing a start would see.
    assert _tree(folder) == before
    assert not config.data_dir.exists()

    # A node that last ran another policy: the check says a restart applies this one.
    config.data_dir.mkdir(parents=True, mode=0o700)
    store = Store(config.store_path)
    store.set_state({"policy_digest": "0" * 64, "roster_version": "1", "signing_kid": "JPN-old"})
    store.close()
    before = _tree(folder)
    done = msmt("node", "check", "--config", str(config_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[5:] == [
        f"store {config.store_path}: JPN's, last started with roster 1; the signing key"
        " differs from the one in force; the policy differs from the one in force",
        f"pages {config.store_path}: every one reads (SQLite quick_check)",
        f"audit {config.audit_dir}: none yet (the first start makes it)",
        "ok (not checked: the hub and the ports, which only a start reaches)",
    ]
    # Only SQLite's own -wal and -shm appear beside the store, as for any reader
    # (msmt status); the store itself is unchanged.
    after = _tree(folder)
    assert set(after.keys() - before.keys()) <= {
        "data/JPN/node.sqlite3-wal",
        "data/JPN/node.sqlite3-shm",
    }
    assert {k: v for k, v in after.items() if k in before} == before


def test_another_members_log_without_a_store_is_refused_by_node_check_as_by_a_start(
    folder: Path,
) -> None:
    # A disk-full review: beside no store, node check read the log but not whose it
    # was, and said ok for a data directory the start refuses.
    config_path = folder / "nodes" / "JPN" / "node.toml"
    config = load_config(config_path, env={})
    config.data_dir.mkdir(parents=True, mode=0o700)
    AuditLog(config.audit_dir, "USA", Ed25519PrivateKey.generate()).close()
    line = (
        f"msmt: error: {config.audit_dir / DB_FILE} is a msmt-audit-1 log of USA, not a"
        " msmt-audit-1 log of JPN\n"
    )
    for command in ("check", "run"):
        done = msmt("node", command, "--config", str(config_path))
        assert (command, done.returncode, done.stderr) == (command, 2, line)


def test_a_store_of_a_newer_format_stops_the_start_for_the_operator(folder: Path) -> None:
    # A rolled-back build on a newer build's store: exit 2, which the sample systemd
    # unit does not restart on (it restarted the node every 2 s on exit 1).
    config_path = folder / "nodes" / "JPN" / "node.toml"
    config = load_config(config_path, env={})
    config.data_dir.mkdir(parents=True, mode=0o700)
    Store(config.store_path).close()
    with sqlite3.connect(config.store_path) as raw:
        raw.execute("PRAGMA user_version = 99")
    done = msmt("node", "run", "--config", str(config_path))
    assert done.returncode == 2, done.stderr
    assert "is in format 99, written by a newer msmt" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


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


def _modes(root: Path) -> dict[str, str]:
    """Every path under ``root`` (and ``root``) with its kind and permission bits."""
    found = {".": f"d{stat.S_IMODE(root.lstat().st_mode):04o}"}
    for path in root.rglob("*"):
        mode = path.lstat().st_mode
        kind = "d" if stat.S_ISDIR(mode) else "s" if stat.S_ISSOCK(mode) else "f"
        found[str(path.relative_to(root))] = f"{kind}{stat.S_IMODE(mode):04o}"
    return found


@contextlib.contextmanager
def _running(config_path: Path, *, umask: int = -1) -> Iterator[NodeConfig]:
    """A real ``msmt node run`` against no hub, from its socket's bind to a clean stop."""
    config = load_config(config_path, env={})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    node = subprocess.Popen(
        [MSMT, "node", "run", "--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        umask=umask,
    )
    try:
        # The socket is bound last, after the store, log, spool and metrics listener.
        wait_for(lambda: config.socket_path.exists() or node.poll() is not None, 60, "started")
        assert node.poll() is None, node.stderr.read() if node.stderr else ""
        yield config
    finally:
        node.send_signal(signal.SIGTERM)
        _, err = node.communicate(timeout=60)
    assert node.returncode == 0, err


# The seam for a signal during the start: the node's own files are refused if they
# are FIFOs, so this hook (loaded by the test's msmt process as sitecustomize) makes
# the start wait in a FIFO of the test's, just before it reads the named file, until
# the test writes to it. Module globals: read_file_text looks read_file_bytes up at
# each call, and no module has imported broker.files yet when sitecustomize runs.
START_HOOK = """
import os
import broker.files as files

_read = files.read_file_bytes

def read_file_bytes(path, limit=-1):
    if path.name == os.environ["WAIT_BEFORE_READING"]:
        with open(os.environ["WAIT_IN_FIFO"], "rb") as fifo:
            fifo.read()
    return _read(path, limit)

files.read_file_bytes = read_file_bytes
"""


@pytest.mark.parametrize(
    ("blocked_on", "sig"),
    [
        # Read by the command before the store is opened; then inside load_node,
        # after the store and before the audit log.
        ("node.toml", signal.SIGTERM),
        ("policy.toml", signal.SIGTERM),
        ("policy.toml", signal.SIGINT),
    ],
)
def test_a_signal_while_the_node_starts_is_a_clean_stop(
    folder: Path, tmp_path: Path, blocked_on: str, sig: signal.Signals
) -> None:
    # The start waits (START_HOOK) before it reads the file, and the signal lands
    # there, before the node's own handlers exist. SIGTERM's default action killed
    # it (-15) and SIGINT was "msmt: interrupted" and 130; a service manager's stop
    # must be a stop.
    config_path = folder / "nodes" / "JPN" / "node.toml"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(START_HOOK)
    fifo = tmp_path / "wait"
    os.mkfifo(fifo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    env.update(PYTHONPATH=str(hook), WAIT_BEFORE_READING=blocked_on, WAIT_IN_FIFO=str(fifo))
    node = subprocess.Popen(
        [MSMT, "node", "run", "--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        writer: list[int] = []

        def waiting() -> bool:
            # A FIFO opens for writing without waiting only once its reader is there.
            with contextlib.suppress(OSError):  # ENXIO: not yet
                writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return bool(writer) or node.poll() is not None

        wait_for(waiting, 60, f"the start to wait before reading {blocked_on}")
        assert writer, node.communicate()[1]
        node.send_signal(sig)
        os.close(writer[0])  # end of file: the start goes on
        _, err = node.communicate(timeout=60)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    assert node.returncode == 0, err
    events = [json.loads(line)["event"] for line in err.decode().splitlines()]
    # Started whole (each step was left to finish), then stopped as any stop is.
    assert events[0] == "node_started", err
    assert events[-2:] == ["node_stopping", "node_stopped"], err
    config = load_config(config_path, env={})
    verified = msmt("audit", "verify", str(config.audit_dir), "--keys", str(folder / "keys"))
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.parametrize("how", ["closed", "full"])
def test_a_node_whose_stderr_fails_runs_and_stops_and_nothing_takes_fd_2(
    folder: Path, how: str
) -> None:
    # 2>&-: the node died at its log set-up (AttributeError, exit 1); had it gone
    # on, the store or the audit log would have been the next fd 2, and the
    # planning worker's error text would have landed in it. /dev/full: the node
    # died at its first log line. Now fd 2 is /dev/null or left as it is, and the
    # lines that cannot be written are dropped.
    config_path = folder / "nodes" / "JPN" / "node.toml"
    config = load_config(config_path, env={})
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    args = [MSMT, "node", "run", "--config", str(config_path)]
    with contextlib.ExitStack() as stack:
        if how == "closed":
            node = subprocess.Popen(
                ["/bin/sh", "-c", 'exec "$@" 2>&-', "sh", *args], stdout=subprocess.PIPE, env=env
            )
        else:
            full = stack.enter_context(open("/dev/full", "wb"))
            node = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=full, env=env)
        try:
            wait_for(lambda: config.socket_path.exists() or node.poll() is not None, 60, "started")
            assert node.poll() is None, node.returncode
            worker = Path(f"/proc/{node.pid}/task/{node.pid}/children").read_text().split()
            assert len(worker) == 1, worker  # the planning worker, started before the socket
            expected = "/dev/null" if how == "closed" else "/dev/full"
            for pid in (node.pid, int(worker[0])):
                assert os.readlink(f"/proc/{pid}/fd/2") == expected
        finally:
            node.send_signal(signal.SIGTERM)
            out, _ = node.communicate(timeout=60)
    assert (node.returncode, out) == (0, b"")  # nor did the log go to stdout
    verified = msmt("audit", "verify", str(config.audit_dir), "--keys", str(folder / "keys"))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _core_limit(pid: int) -> str:
    """The soft and hard core file size limits of ``pid``, as ``/proc/<pid>/limits`` shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError(f"no core file size limit for {pid}")


def test_a_running_node_and_its_worker_never_write_a_core_file(folder: Path) -> None:
    # Both hold private keys and report content in memory, which a crash would
    # otherwise write to a core file; the test's own limit is whatever it was given.
    with _running(folder / "nodes" / "JPN" / "node.toml") as config:
        node = writer_pid(config.data_dir / "node.sqlite3")
        assert node
        worker = Path(f"/proc/{node}/task/{node}/children").read_text().split()
        assert len(worker) == 1, worker  # the planning worker, started before the socket
        limits = {pid: _core_limit(pid) for pid in (node, int(worker[0]))}
    assert set(limits.values()) == {"0 0"}, limits


def test_memory_kept_private_is_no_core_file_and_not_dumpable() -> None:
    # A local user's review: a process of the node's user (a socket feed's) read the
    # raw signing key from /proc/<node>/mem. The node and its worker call this first.
    code = (
        "import ctypes, resource; from broker.private_memory import keep_memory_private;"
        " libc = ctypes.CDLL(None); before = libc.prctl(3, 0, 0, 0, 0);"
        " keep_memory_private();"
        " print(before, libc.prctl(3, 0, 0, 0, 0), resource.getrlimit(resource.RLIMIT_CORE))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout.split(maxsplit=2) == ["1", "0", "(0, 0)\n"]


def test_what_a_node_creates_is_its_users_alone_whatever_the_umask(folder: Path) -> None:
    # Created 0755/0644 under the usual umask 022 (spool/, audit/, roster-state.json,
    # the SQLite -wal and -shm files): safe only while the data directory stayed 0700.
    # umask 022: what a shell, cron or a container gives it.
    with _running(folder / "nodes" / "JPN" / "node.toml", umask=0o022) as config:
        assert fetch(f"http://127.0.0.1:{config.metrics.port}/healthz")
        running = _modes(config.data_dir)
    stopped = _modes(config.data_dir)
    # What a start makes, at least; SQLite's -wal and -shm exist while it runs.
    expected = {
        ".",
        "audit",
        "audit/audit.sqlite",
        "audit/audit.sqlite-wal",
        "audit/audit.sqlite-shm",
        "node.sqlite3",
        "node.sqlite3-wal",
        "node.sqlite3-shm",
        "node.sqlite3.lock",
        "roster-state.json",
        "intake.token",
        "intake.sock",
        "spool",
        "spool/done",
        "spool/rejected",
    }
    assert expected <= set(running), sorted(running)
    for modes in (running, stopped):
        wrong = {
            name: mode for name, mode in modes.items() if mode not in ("d0700", "f0600", "s0600")
        }
        assert wrong == {}, modes


def test_every_command_on_a_node_creates_private_files_whatever_the_umask(folder: Path) -> None:
    # Not only msmt node run: a feed added before the node's first start made the
    # data directory's parent 0755 under umask 022, and so would any file a command
    # on a node created without a mode of its own. Every --config command runs
    # with umask 077.
    config_path = str(folder / "nodes" / "JPN" / "node.toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    for args in (
        ["feeds", "add", "jpn-ais", "--out", str(folder / "jpn-ais.token")],
        ["feeds", "revoke", "jpn-ais"],
    ):
        done = subprocess.run(
            [MSMT, *args, "--config", config_path],
            capture_output=True,
            text=True,
            env=env,
            umask=0o022,  # what a shell, cron or a container gives it
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    modes = _modes(folder / "data")
    assert set(modes) == {".", "JPN", "JPN/intake-feeds.json", "JPN/.intake-feeds.json.lock"}
    assert {name: mode for name, mode in modes.items() if mode not in ("d0700", "f0600")} == {}


def test_a_node_with_the_shared_token_off_makes_none(folder: Path) -> None:
    # intake.shared_token = false: a token no feed may use is not written either.
    config_path = folder / "nodes" / "JPN" / "node.toml"
    with config_path.open("a") as toml:
        toml.write("[intake]\nshared_token = false\n")
    with _running(config_path) as config:
        pass
    assert config.store_path.exists()  # it did start on this data directory
    assert not config.token_path.exists()
    # With no token to send, msmt submit says why before it reaches for the node.
    done = msmt("submit", "--config", str(config_path), "-", stdin=b"")
    assert (done.returncode, done.stderr) == (
        2,
        "msmt: error: this node refuses the shared intake.token (intake.shared_token = false):"
        " give --token-file with the feed's own token (msmt feeds add)\n",
    )


def test_a_planted_module_others_may_write_is_refused_before_it_runs(tmp_path: Path) -> None:
    # A review: a .pyc another user put in a bytecode cache open to all ran as root at the
    # next msmt command, before the node's own check. Now checked first, for every command.
    import importlib.util

    import broker.cli

    source = Path(broker.cli.__file__)
    prefix = tmp_path / "pycache"
    mirror = prefix / str(source.parent).lstrip("/")
    mirror.mkdir(parents=True)
    marker = tmp_path / "ran"
    payload = compile(f"open({str(marker)!r}, 'w').close()", str(source), "exec")
    info = source.stat()
    cached = mirror / Path(importlib.util.cache_from_source(str(source))).name
    cached.write_bytes(
        importlib._bootstrap_external._code_to_timestamp_pyc(  # type: ignore[attr-defined]
            payload, info.st_mtime, info.st_size
        )
    )
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)

    def version() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MSMT, "--version"], capture_output=True, text=True, env=env, check=False, timeout=60
        )

    cached.chmod(0o666)
    refused = version()
    assert refused.returncode == 2
    assert refused.stderr == (
        f"msmt: error: {cached} is writable by every local user (mode 0666): anyone could"
        " change the code msmt runs; chmod o-w it (installed or run under umask 000?)\n"
    )
    assert not marker.exists()  # refused before the planted module was imported
    mirror.chmod(0o1777)  # a sticky folder: another user may still make one of its own
    cached.chmod(0o644)
    assert "is writable by every local user (mode 1777)" in version().stderr
    assert not marker.exists()
    mirror.chmod(0o755)
    os.chown(mirror, 54321, -1)
    assert f"{mirror} belongs to another user (uid 54321)" in version().stderr
    assert not marker.exists()
    os.chown(mirror, os.geteuid(), -1)
    # A third review: a prefix that is a link to an open folder, and a folder on the
    # import path open to all (an editable install puts the clone's there).
    opened = tmp_path / "open"
    opened.mkdir()
    opened.chmod(0o1777)
    (tmp_path / "link").symlink_to(opened)
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "link")
    assert f"{opened} is writable by every local user (mode 1777)" in version().stderr
    env["PYTHONPYCACHEPREFIX"] = str(prefix)
    env["PYTHONPATH"] = str(tmp_path / "link")  # a link on the path: its folder counts
    assert f"{opened} is on the import path (PYTHONPATH, or the working directory)" in (
        version().stderr
    )
    del env["PYTHONPATH"]
    assert not marker.exists()
    version()  # ours, closed to others: imported as any cache is (the check is no sandbox)
    assert marker.exists()


def test_a_dependency_or_a_folder_above_the_code_others_may_write_is_refused(
    tmp_path: Path,
) -> None:
    # A packaging review: click reinstalled under umask 000 (its folder 0777), and
    # another user's code in it ran as root; nor were the folders above the install
    # looked at (a venv's lib/ open to all: anyone could swap site-packages). Here a
    # site folder on the path, as a user site or a --system-site-packages venv adds one.
    lib = tmp_path / "lib"
    site = lib / "site-packages"
    dependency = site / "dependency"
    dependency.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}

    def version() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MSMT, "--version"], capture_output=True, text=True, env=env, check=False, timeout=60
        )

    assert version().returncode == 0
    dependency.chmod(0o777)
    refused = version()
    assert (refused.returncode, refused.stderr) == (
        2,
        f"msmt: error: {dependency} is writable by every local user (mode 0777): anyone"
        " could change the code msmt runs; chmod o-w it (installed or run under umask 000?)\n",
    )
    dependency.chmod(0o755)
    (site / "module.py").touch()
    (site / "module.py").chmod(0o666)  # a module at the top: importable by name
    assert f"{site / 'module.py'} is writable by every local user (mode 0666)" in (version().stderr)
    (site / "module.py").chmod(0o644)
    lib.chmod(0o777)
    assert version().stderr == (
        f"msmt: error: {lib} is writable by every local user and not sticky (mode 0777):"
        " anyone could put their own code in place of what msmt runs below it; chmod o-w"
        " it (or +t)\n"
    )
    lib.chmod(0o1777)  # as /tmp: nobody may rename another's folder in it
    assert version().returncode == 0
    lib.chmod(0o755)


def test_node_check_refuses_a_data_dir_on_a_read_only_mount_as_a_start_would(
    folder: Path,
) -> None:
    # An error-path review: "none yet (the first start makes it)" and ok, for a data
    # directory the start then could not write.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a read-only bind mount")
    config_path = folder / "nodes" / "JPN" / "node.toml"
    config = load_config(config_path, env={})
    config.data_dir.mkdir(parents=True, mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}
    bind = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    args = ["node", "check", "--config", str(config_path)]
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", bind, str(config.data_dir), MSMT, *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"msmt: error: cannot open store {config.store_path}: the folder {config.data_dir}"
        " is not writable: it is on a read-only file system\n"
    )
    writable = msmt(*args)
    assert writable.returncode == 0, writable.stderr  # the same folder, mounted as it is


def test_status_says_when_the_roster_on_disk_would_refuse_the_next_start(folder: Path) -> None:
    # A start refused over the roster leaves roster_version at the last run's, and the
    # status said nothing else: a member suspended in the new roster, or a roster whose
    # signature fails, read as a rollout that had not arrived yet (a review).
    config_path = folder / "nodes" / "JPN" / "node.toml"

    def status() -> dict[str, object]:
        done = msmt("status", "--config", str(config_path), "--json")
        assert done.returncode == 0, done.stderr
        answer: dict[str, object] = json.loads(done.stdout)
        return answer

    with _running(config_path):
        pass
    assert (status()["roster_version"], status()["roster_file"]) == (1, "in force")
    keys_custodian.suspend_member(folder / "keys", "JPN")  # roster 2 retires JPN's keys
    refused = msmt("node", "run", "--config", str(config_path))
    assert refused.returncode == 2
    assert refused.stderr == "msmt: error: JPN has no active sig key valid now\n"
    shown = status()
    assert shown["roster_version"] == 1  # the roster it last started with, as documented
    assert shown["roster_file"] == (
        "version 2, with which a restart would fail: JPN has no active sig key valid now"
    )
    assert shown["running"] is False
    (folder / "keys" / keys.ROSTER_SIG_FILE).write_text("not a signature")
    refused = msmt("node", "run", "--config", str(config_path))
    assert refused.returncode == 2
    shown = status()
    assert shown["roster_version"] == 1
    assert str(shown["roster_file"]).startswith("does not load, so a restart would fail: ")
    assert refused.stderr == f"msmt: error: {str(shown['roster_file']).partition(': ')[2]}\n"


def test_status_says_a_roster_revoking_the_members_decryption_key_would_refuse_the_start(
    folder: Path,
) -> None:
    # A review: with JPN's only encryption key revoked, the start is refused ("no usable
    # decryption key"), and the status said "restart the node to apply it".
    config_path = folder / "nodes" / "JPN" / "node.toml"
    with _running(config_path):
        pass
    roster = keys_roster.load_signed_roster(folder / "keys").roster
    enc = roster.current("JPN", "enc", datetime.now(UTC)).kid
    keys_custodian.revoke_key(folder / "keys", enc, "stolen")
    refused = msmt("node", "run", "--config", str(config_path))
    assert refused.returncode == 2
    assert "JPN has no usable decryption key" in refused.stderr
    done = msmt("status", "--config", str(config_path), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["roster_file"] == (
        "version 2, with which a restart would fail: JPN has no usable decryption key in the roster"
    )
