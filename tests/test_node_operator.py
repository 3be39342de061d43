"""A real ``msmt node run`` set up with the operator's commands and stopped by signals.

KOR's shipped policy names a pseudonym key, so its node starts only once
``msmt keys pseudonym`` has created it. A SIGTERM stop removes the intake socket; a
SIGKILL leaves it behind, and the next start replaces it and serves.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from node_world import (
    MSMT,
    fetch,
    msmt,
    readyz,
    setup_accounts,
    start_hub,
    wait_for,
    write_node_config,
)

import broker
from broker import keys_roster, samples
from broker.auditlog import AuditLog
from broker.config import NodeConfig, load_config
from broker.errors import UsageError
from broker.intake import ensure_token, submit
from broker.natsproc import NatsServer, free_port
from broker.roster import format_time
from broker.store import Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
MEMBERS = ("KOR", "JPN", "USA")


@dataclass
class Kor:
    """KOR's node directory and hub; ``start``/``stop`` run the real daemon."""

    root: Path
    server: NatsServer
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "nodes" / "KOR" / "node.toml"

    @property
    def config(self) -> NodeConfig:
        return load_config(self.config_path, env={})

    def msmt(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MSMT, *args], capture_output=True, text=True, check=False, timeout=60
        )

    def create_pseudonym_key(self) -> None:
        key_dir = str(self.root / "keys")
        created = self.msmt("keys", "pseudonym", "KOR", "kor-jpn-usa-2026", "--dir", key_dir)
        assert created.returncode == 0, created.stderr
        assert created.stdout.startswith("created ")

    def start(self, *args: str) -> None:
        with (self.root / "KOR.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [MSMT, "node", "run", "--config", str(self.config_path), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        port = self.config.metrics.port
        wait_for(lambda: readyz(port) or self.proc_ended(), 30, "KOR ready")
        assert not self.proc_ended(), (self.root / "KOR.log").read_text()[-3000:]

    def proc_ended(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        proc, self.proc = self.proc, None
        proc.send_signal(sig)
        return proc.wait(timeout=30)

    def submit(self, count: int) -> list[dict[str, Any]]:
        config = self.config
        body = samples.to_ndjson(samples.generate(count, seed=7, originators=("KOR",))).encode()

        async def chunks() -> Any:
            yield body

        answers: list[dict[str, Any]] = []
        token = ensure_token(config.token_path)
        asyncio.run(submit(config.socket_path, token, chunks(), answers.append))
        return answers


@pytest.fixture
def kor(tmp_path: Path) -> Iterator[Kor]:
    keydir, server = start_hub(tmp_path, MEMBERS)
    node = Kor(tmp_path, server)
    try:
        setup_accounts(server.url, keydir, ("KOR",))
        folder = tmp_path / "nodes" / "KOR"
        folder.mkdir(parents=True)
        (folder / "policy.toml").write_text((REPO / "nodes" / "KOR" / "policy.toml").read_text())
        (folder / "node.toml").write_text(
            'member = "KOR"\nbase_dir = "../.."\npolicy = "nodes/KOR/policy.toml"\n'
            f'data_dir = "data/KOR"\n[nats]\nurls = ["{server.url}"]\n[keys]\ndir = "keys"\n'
            f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
        )
        yield node
    finally:
        if node.proc is not None:
            node.stop(signal.SIGKILL)
        server.kill()


def test_node_starts_with_a_created_pseudonym_key_and_a_clean_stop_removes_its_socket(
    kor: Kor,
) -> None:
    refused = kor.msmt("node", "run", "--config", str(kor.config_path))
    assert refused.returncode == 2
    assert refused.stderr.startswith("msmt: error: pseudonym key kor-jpn-usa-2026: ")
    # It names the file and how to make it.
    path = kor.config.keys.dir / "KOR" / "pseudonym" / "kor-jpn-usa-2026.key"
    assert f"{path} is missing: make it with `msmt keys pseudonym KOR kor-jpn-usa-2026" in (
        refused.stderr
    )
    assert refused.stderr.count("\n") == 1

    kor.create_pseudonym_key()
    kor.start()
    sock = kor.config.socket_path
    assert stat.S_ISSOCK(sock.lstat().st_mode)
    answers = kor.submit(3)
    assert [a["status"] for a in answers] == ["accepted"] * 3
    # Beside the running node, msmt node check says so, and leaves its files alone:
    # they change as it runs, so a store and a log read at two moments would differ.
    checked = kor.msmt("node", "check", "--config", str(kor.config_path))
    assert checked.returncode == 0, checked.stderr
    assert kor.proc is not None
    assert (
        f"node: runs on this data directory now (pid {kor.proc.pid}); a restart applies what"
        " differs, and checks the store against the audit log"
    ) in checked.stdout.splitlines()
    assert kor.stop(signal.SIGTERM) == 0
    assert not sock.exists()
    stopped = kor.msmt("node", "check", "--config", str(kor.config_path))
    assert stopped.returncode == 0, stopped.stderr
    assert "from the same moment as the store" in stopped.stdout
    assert not sock.is_symlink()
    assert kor.config.token_path.exists()  # the token outlives the run; only the socket goes


def test_node_check_reads_every_page_of_the_store_which_queries_alone_do_not(
    kor: Kor,
) -> None:
    kor.create_pseudonym_key()
    kor.start()
    assert [a["status"] for a in kor.submit(3)] == ["accepted"] * 3
    assert kor.stop(signal.SIGTERM) == 0
    store = kor.config.store_path
    audit_db = kor.config.audit_dir / "audit.sqlite"
    checked = kor.msmt("node", "check", "--config", str(kor.config_path))
    assert checked.returncode == 0, checked.stderr
    assert f"pages {store}: every one reads (SQLite quick_check)" in checked.stdout.splitlines()
    assert f"pages {audit_db}: every one reads (SQLite quick_check)" in checked.stdout.splitlines()
    kept = store.read_bytes()
    # A restored backup with one bad page: the reports table's. The check's queries
    # read other pages (its indexes), so it passed before it read them all.
    _spoil_page(store, "reports")
    damaged = kor.msmt("node", "check", "--config", str(kor.config_path))
    assert damaged.returncode != 0
    assert damaged.stderr.startswith(f"msmt: error: store {store} is damaged: ")
    assert damaged.stderr.endswith(
        "; restore it from a backup (docs/DEPLOY.md, 'Backing up and restoring a node')\n"
    )
    assert damaged.stderr.count("\n") == 1
    assert "pages " not in damaged.stdout
    # The audit log's file too: a page the start's checks do not read.
    store.write_bytes(kept)
    _spoil_page(audit_db, "edge")
    spoilt = kor.msmt("node", "check", "--config", str(kor.config_path))
    assert spoilt.returncode == 2
    assert spoilt.stderr.startswith(f"msmt: error: audit log {audit_db} is damaged: ")
    assert spoilt.stderr.count("\n") == 1


def test_a_copy_cut_short_by_a_full_disk_is_refused_not_started_afresh(kor: Kor) -> None:
    # A disk-full trial: `cp -a` of a data directory onto a full disk left the store
    # and the audit log 0 bytes long. node check said the log was not a log, and a
    # start began a new history under the member's name beside its old witness state.
    kor.create_pseudonym_key()
    kor.start()
    assert kor.stop(signal.SIGTERM) == 0
    data = kor.config.data_dir
    (data / "witness-state.json").write_text('{"JPN":{"root":"' + "A" * 43 + '=","size":3}}')
    for name in ("node.sqlite3", "audit/audit.sqlite"):
        (data / name).write_bytes(b"")
        for extra in ("-wal", "-shm"):
            (data / (name + extra)).unlink(missing_ok=True)
    line = (
        f"msmt: error: {data / 'witness-state.json'} shows this node ran before but the audit"
        f" log in {kor.config.audit_dir} is missing or empty: restore it from the same backup"
        " as the store (docs/DEPLOY.md); for a node that is to start afresh, move"
        " witness-state.json aside and keep it for the auditors\n"
    )
    for command in ("check", "run"):
        refused = kor.msmt("node", command, "--config", str(kor.config_path))
        assert (refused.returncode, refused.stderr) == (2, line), command
    # No store at all beside the empty log: the same.
    (data / "node.sqlite3").unlink()
    refused = kor.msmt("node", "check", "--config", str(kor.config_path))
    assert (refused.returncode, refused.stderr) == (2, line)
    # The witness state cut short too: refused for it, before the log is touched.
    (data / "witness-state.json").write_bytes(b"")
    unreadable = f"msmt: error: {data / 'witness-state.json'} is unreadable: "
    for command in ("check", "run"):
        refused = kor.msmt("node", command, "--config", str(kor.config_path))
        assert refused.returncode == 2, command
        assert refused.stderr.startswith(unreadable), refused.stderr
    assert (data / "audit" / "audit.sqlite").stat().st_size == 0


def _spoil_page(path: Path, table: str) -> None:
    """Overwrite the root page of ``table`` in the SQLite file at ``path`` with junk."""
    db = sqlite3.connect(path)
    ((page,),) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    with path.open("r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(b"\xff" * page_size)


def test_a_socket_left_by_a_killed_node_is_replaced_at_the_next_start(kor: Kor) -> None:
    kor.create_pseudonym_key()
    kor.start()
    sock = kor.config.socket_path
    assert kor.stop(signal.SIGKILL) == -signal.SIGKILL
    assert stat.S_ISSOCK(sock.lstat().st_mode)  # SIGKILL runs no cleanup
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(sock))

    kor.start()
    assert [a["status"] for a in kor.submit(2)] == ["accepted"] * 2
    assert not [n for n in os.listdir(sock.parent) if ".stale-" in n]
    assert kor.stop(signal.SIGTERM) == 0
    assert not sock.exists()


def test_status_shows_the_roster_and_policy_the_node_started_with(kor: Kor) -> None:
    kor.create_pseudonym_key()
    before = kor.msmt("keys", "rotate", "JPN", "--dir", str(kor.root / "keys"))
    assert before.returncode == 0, before.stderr
    # KOR's own keys valid for a day only: the start says so, and status shows when.
    short = kor.msmt("keys", "rotate", "KOR", "--dir", str(kor.root / "keys"), "--valid-days", "1")
    assert short.returncode == 0, short.stderr
    signed = keys_roster.load_signed_roster(kor.root / "keys")
    version = signed.version
    assert version > 2  # rotations, so the number is not a default anyone would print
    until = signed.roster.current("KOR", "sig", datetime.now(UTC)).valid_until
    kor.start()
    assert kor.stop(signal.SIGTERM) == 0

    text = kor.msmt("status", "--config", str(kor.config_path))
    assert text.returncode == 0, text.stderr
    assert f"roster_version      {version}\n" in text.stdout
    assert f"  signing_key                  {format_time(until)}\n" in text.stdout
    started = (kor.root / "KOR.log").read_text()
    assert '"event": "credential_expires_soon"' in started
    assert f'"expires_at": "{format_time(until)}"' in started
    done = kor.msmt("status", "--config", str(kor.config_path), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["roster_version"] == version
    # The build that started it, as msmt --version and /metrics name it.
    assert json.loads(done.stdout)["version"] == broker.version()
    assert f"version             {broker.version()}\n" in text.stdout
    assert f'"version": "{broker.version()}"' in started
    # The key it signs with since that start: the rotated one, as the roster has it now.
    assert (
        json.loads(done.stdout)["signing_kid"]
        == signed.roster.current("KOR", "sig", datetime.now(UTC)).kid
    )
    valid = json.loads(done.stdout)["credentials_valid_until"]
    assert set(valid) == {"signing_key", "encryption_key"}
    assert valid["signing_key"] == format_time(until)

    # The policy in force, and whether the file is still it: an edit applies only
    # at a restart, and nothing else would show that the node runs the old one.
    policy_path = kor.config.policy
    digest = kor.config.read_policy()[0].digest
    assert f'"policy_digest": "{digest}"' in (kor.root / "KOR.log").read_text()
    assert json.loads(done.stdout)["policy_digest"] == digest
    assert json.loads(done.stdout)["policy_file"] == "in force"
    policy_path.write_text(policy_path.read_text().replace('"vessel.flag",\n', "", 1))
    edited = kor.config.read_policy()[0].digest
    assert edited != digest
    changed = kor.msmt("status", "--config", str(kor.config_path), "--json")
    assert json.loads(changed.stdout)["policy_digest"] == digest
    assert json.loads(changed.stdout)["policy_file"] == (
        f"changed to {edited}; restart the node to apply it"
    )
    policy_path.write_text(policy_path.read_text().replace("version = 1", "version = 2"))
    broken = kor.msmt("status", "--config", str(kor.config_path))
    assert broken.returncode == 0, broken.stderr
    assert "policy_file         does not load, so a restart would fail: " in broken.stdout
    assert "the policy must say version = 1" in broken.stdout

    # Pointed at another member's data, status refuses as the node does, rather
    # than showing that member's counters under KOR's name.
    other = kor.root / "usa-data"
    AuditLog(other / "audit", "USA", Ed25519PrivateKey.generate()).close()
    shutil.copy(kor.config.store_path, other / kor.config.store_path.name)
    wrong = msmt("status", "--config", str(kor.config_path), MSMT_DATA_DIR=str(other))
    assert wrong.returncode == 2, wrong.stdout
    assert wrong.stderr == f"msmt: error: data_dir {other} holds USA's node, not KOR's\n"


def test_status_says_whether_the_node_runs_and_when_its_figures_went_stale(kor: Kor) -> None:
    def status() -> dict[str, Any]:
        done = kor.msmt("status", "--config", str(kor.config_path), "--json")
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    kor.create_pseudonym_key()
    kor.start()
    assert kor.proc is not None
    pid = kor.proc.pid
    wait_for(lambda: status()["updated_at"] != "", 30, "KOR's first status")
    running = status()
    assert (running["running"], running["pid"], running["status_stale"]) == (True, pid, False)
    assert 0 <= running["status_age_s"] <= 90
    text = kor.msmt("status", "--config", str(kor.config_path)).stdout
    assert f"node                running (pid {pid})\n" in text
    assert "warning" not in text
    assert kor.stop(signal.SIGTERM) == 0

    stopped = status()
    assert (stopped["running"], stopped["pid"], stopped["status_stale"]) == (False, None, False)
    assert (
        "node                not running\n"
        in kor.msmt("status", "--config", str(kor.config_path)).stdout
    )

    # A node whose store cannot be written (a full disk) runs on while its status
    # keeps the figures from before: here, a status two minutes old while this
    # test holds the lock a running node holds.
    store = Store(kor.config.store_path)
    store.record_status(Counter(), {"updated_at": "2026-01-01T00:00:00Z"})
    store.close()
    lock = os.open(kor.config.store_path.with_name("node.sqlite3.lock"), os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        stale = status()
        assert (stale["running"], stale["pid"], stale["status_stale"]) == (True, os.getpid(), True)
        assert stale["status_age_s"] > 90
        text = kor.msmt("status", "--config", str(kor.config_path)).stdout
        assert "warning             the running node has not rewritten its status for" in text
        assert "is the disk full?" in text
    finally:
        os.close(lock)


def test_status_aligns_every_value_and_says_none_rather_than_leave_a_line_blank(
    tmp_path: Path,
) -> None:
    # A new user's tour: last_audit_alarm and last_audit_alarm_at ran past the column
    # the other values start at, and an empty last_error or inbox_paused ended its line
    # in blank space, as did the feeds header with no feed under it.
    write_node_config(tmp_path, "KOR", ["nats://127.0.0.1:1"])
    config = load_config(tmp_path / "nodes" / "KOR" / "node.toml", env={})
    config.data_dir.mkdir(parents=True)
    Store(config.store_path).close()  # a store no node has written a status to
    fresh = msmt("status", "--config", str(tmp_path / "nodes" / "KOR" / "node.toml"))
    assert "\nupdated_at          never\n" in fresh.stdout, fresh.stdout
    store = Store(config.store_path)
    store.record_status(
        Counter(),
        {
            "updated_at": format_time(datetime.now(UTC)),
            "last_error": "",
            "inbox_paused": "",
            "last_audit_alarm": "fork of USA's log",
            "last_audit_alarm_at": "2026-12-07T01:00:00Z",
            "witnessed": json.dumps({"USA": ""}),
        },
    )
    store.close()
    done = msmt("status", "--config", str(tmp_path / "nodes" / "KOR" / "node.toml"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Every line of a key and its value, that is all but the headers of indented lines.
    values = [line for line in lines if re.match(r"[a-z_]+ ", line)]
    values.remove("credentials valid until unknown")  # the one header longer than the keys
    assert len(values) > 20
    # A key, or an empty section's header (its words apart: "bytes today"), then padding.
    key = re.compile(r"[a-z_]+(?: [a-z]+)* +")
    assert {key.match(line).end() for line in values} == {20}, values  # type: ignore[union-attr]
    assert "bytes today         none" in lines
    assert "last_audit_alarm_at 2026-12-07T01:00:00Z" in lines
    assert "last_error          none" in lines
    assert "inbox_paused        none" in lines
    assert "feeds               none" in lines
    assert "  USA                          not since the node last started" in lines
    assert not [line for line in lines if line != line.rstrip()]


def test_a_status_from_before_the_clock_went_back_is_not_taken_for_fresh(tmp_path: Path) -> None:
    # The node wrote its last status, then this host's clock was stepped back 10
    # minutes and the node stopped writing (here: nothing writes, while this test
    # holds the lock a running node holds). The age was clamped to 0, so the
    # status passed for fresh until the clock had caught up 10 minutes later.
    write_node_config(tmp_path, "KOR", ["nats://127.0.0.1:1"])
    config = load_config(tmp_path / "nodes" / "KOR" / "node.toml", env={})
    config.data_dir.mkdir(parents=True)
    ahead = format_time(datetime.now(UTC) + timedelta(minutes=10))
    store = Store(config.store_path)
    store.record_status(Counter(), {"updated_at": ahead})
    store.close()

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        done = msmt("status", "--config", str(tmp_path / "nodes" / "KOR" / "node.toml"), *args)
        assert done.returncode == 0, done.stderr
        return done

    lock = os.open(config.store_path.with_name("node.sqlite3.lock"), os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        answer = json.loads(status("--json").stdout)
        assert (answer["running"], answer["status_stale"]) == (True, True)
        assert answer["status_stale_reason"] == "future"
        assert -600 <= answer["status_age_s"] < -500
        text = status().stdout
        assert re.search(
            r"\nupdated_at +\S+ \(\d+ s in the future: this host's clock went back since\)\n", text
        ), text
        assert "warning             the running node's status is " in text
    finally:
        os.close(lock)
    # Not running: a status from the future is only a fact, not a warning.
    answer = json.loads(status("--json").stdout)
    assert (answer["running"], answer["status_stale"], answer["status_stale_reason"]) == (
        False,
        False,
        "",
    )
    assert answer["status_age_s"] < -500


def test_log_level_in_any_case_and_inbox_from_only_a_member(kor: Kor) -> None:
    kor.create_pseudonym_key()
    config = str(kor.config_path)
    refused = kor.msmt("node", "run", "--config", config, "--log-level", "LOUD")
    assert refused.returncode == 2, refused.stderr
    assert "Invalid value for '--log-level': 'LOUD' is not one of" in refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout

    kor.start("--log-level", "warning")
    assert kor.stop(signal.SIGTERM) == 0
    logged = (kor.root / "KOR.log").read_text()
    # WARNING drops the info lines a default start writes (node_started and the like).
    assert '"level": "info"' not in logged

    # A sender that is no member would only list nothing, which reads as "no reports yet".
    refused = kor.msmt("inbox", "list", "--config", config, "--from", "XXX")
    assert refused.returncode == 2, refused.stdout
    assert refused.stderr == (
        "msmt: error: --from: unknown member 'XXX' "
        "(members: JPN, USA, KOR, GBR, FRA, AUS, CAN, DEU, ITA, NLD, NZL)\n"
    )
    member = kor.msmt("inbox", "list", "--config", config, "--from", "usa")
    assert (member.returncode, member.stdout, member.stderr) == (0, "", "")


def test_the_readme_tour_asks_no_more_cosignatures_than_its_running_nodes_give() -> None:
    tour = (REPO / "README.md").read_text().split("Step by step, as an operator would")[1]
    tour = tour.split("```")[1]
    running = re.findall(r"msmt node run --config nodes/([A-Z]{3})/node.toml &", tour)
    assert running == ["JPN", "USA"]
    (origin, quorum), *_ = re.findall(r"msmt audit verify data/([A-Z]{3}) .*--quorum (\d+)", tour)
    # Only the other running nodes witness the origin's log.
    assert int(quorum) <= len([m for m in running if m != origin])


def test_submit_exits_0_on_a_resend_and_a_refused_token_shows_in_status(kor: Kor) -> None:
    kor.create_pseudonym_key()
    kor.start()
    config = str(kor.config_path)
    records = samples.generate(3, seed=41, originators=("KOR",))
    feed = kor.root / "feed.ndjson"
    feed.write_text(samples.to_ndjson(records))
    first = kor.msmt("submit", "--config", config, str(feed))
    assert (first.returncode, first.stderr) == (0, "3 accepted, 0 rejected\n")
    # A cron feed retrying a batch that got through: a safe resend, not an alarm.
    again = kor.msmt("submit", "--config", config, str(feed))
    assert again.returncode == 0, again.stderr
    assert [json.loads(x)["reason"] for x in again.stdout.splitlines()] == ["duplicate"] * 3
    assert again.stderr == "0 accepted, 3 rejected (3 of them duplicates)\n"
    # Any other refusal beside duplicates still fails.
    feed.write_text(samples.to_ndjson(records[:1]) + '{"kind": "vessel"}\n')
    mixed = kor.msmt("submit", "--config", config, str(feed))
    assert mixed.returncode == 1, mixed.stderr
    assert [json.loads(x)["status"] for x in mixed.stdout.splitlines()] == ["rejected"] * 2
    assert mixed.stderr == "0 accepted, 2 rejected (1 of them duplicates)\n"

    # A feed with a stale token: answered 401, and counted where the operator looks.
    async def one() -> Any:
        yield samples.to_ndjson(records[:1]).encode()

    stale = "stale-token-of-a-feed-0123456789"
    with pytest.raises(UsageError, match="refused the intake token"):
        asyncio.run(submit(kor.config.socket_path, stale, one(), print))

    def counters() -> dict[str, Any]:
        out = kor.msmt("status", "--config", config, "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout)["counters"])

    wait_for(lambda: counters().get("intake.token") == 1, 30, "the refused token counted")
    metrics = fetch(f"http://127.0.0.1:{kor.config.metrics.port}/metrics")
    assert 'msmt_intake_rejected_total{reason="token"} 1.0' in metrics
    assert kor.stop(signal.SIGTERM) == 0
    logged = (kor.root / "KOR.log").read_text()
    assert "intake_token_refused" in logged
    assert stale not in logged


def test_submit_answers_piped_records_as_they_come_and_ctrl_c_exits_2(kor: Kor) -> None:
    kor.create_pseudonym_key()
    kor.start()
    record = samples.to_ndjson(samples.generate(1, seed=47, originators=("KOR",))).encode()
    feed = subprocess.Popen(
        [MSMT, "submit", "--config", str(kor.config_path), "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert feed.stdin is not None
        assert feed.stdout is not None
        assert feed.stderr is not None
        # A feed piping one record and keeping the pipe open gets its answer now,
        # not once 64 KiB or the end of input have come.
        feed.stdin.write(record)
        feed.stdin.flush()
        readable, _, _ = select.select([feed.stdout], [], [], 60)
        assert readable, "no answer to a piped record while the pipe stays open"
        assert json.loads(feed.stdout.readline())["status"] == "accepted"
        # Ctrl-C while the feed is quiet: exit 2 (records may be unanswered), not
        # click's "Aborted!" and 1 (some record refused), and no wait for the pipe.
        feed.send_signal(signal.SIGINT)
        assert feed.wait(timeout=60) == 2
        err = feed.stderr.read().decode()
        assert err.startswith("1 accepted, 0 rejected\nmsmt: error: interrupted before every")
        assert err.count("\n") == 2
    finally:
        feed.kill()
        feed.wait()
        for pipe in (feed.stdin, feed.stdout, feed.stderr):
            if pipe is not None:
                pipe.close()
    assert kor.stop(signal.SIGTERM) == 0


def test_a_stop_ends_open_feed_connections_and_answers_what_was_read(kor: Kor) -> None:
    kor.create_pseudonym_key()
    kor.start()
    config = kor.config
    token = ensure_token(config.token_path).encode()
    record = samples.to_ndjson(samples.generate(1, seed=43, originators=("KOR",))).encode()
    head = b"POST /v1/reports HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer %s\r\n" % token
    with (
        socket.socket(socket.AF_UNIX) as idle,
        socket.socket(socket.AF_UNIX) as streaming,
    ):
        for conn in (idle, streaming):
            conn.settimeout(60)
            conn.connect(str(config.socket_path))
        answered = {idle: b"", streaming: b""}

        def await_answer(conn: socket.socket) -> None:
            while b"}\n\r\n" not in answered[conn]:  # an answer line's chunk ends
                chunk = conn.recv(65536)
                assert chunk, answered[conn]
                answered[conn] += chunk

        # One keep-alive connection idle after a finished request ...
        idle.sendall(head + b"Content-Length: %d\r\n\r\n" % len(record) + record)
        await_answer(idle)
        # ... and one feed streaming records as they come, waiting for its next one.
        streaming.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        streaming.sendall(b"%x\r\n%s\r\n" % (len(record), record))
        await_answer(streaming)
        assert b'"status":"accepted"' in answered[idle]
        assert b'"reason":"duplicate"' in answered[streaming]

        assert kor.stop(signal.SIGTERM) == 0
        for conn in (idle, streaming):
            while chunk := conn.recv(65536):  # the node closes both
                answered[conn] += chunk
    # The streaming request's answers end properly (the last chunk), not cut off.
    assert answered[streaming].endswith(b"}\n\r\n0\r\n\r\n")
    assert answered[idle].endswith(b"\r\n0\r\n\r\n")
    assert not config.socket_path.exists()
    assert "intake_request_ended" in (kor.root / "KOR.log").read_text()
