"""The generated hub configuration loads in nats-server 2.15; stream setup is idempotent."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from click.testing import CliRunner, Result
from nats.js.api import ExternalStream, StreamConfig, StreamSource, SubjectTransform
from node_world import fetch, msmt, running_hub, wait_for
from structlog.testing import capture_logs

from broker import keys, keys_custodian, keys_users, natsconfig, natsetup, natsusers
from broker.cli import main
from broker.errors import ConfigError, KeyMaterialError
from broker.members import MEMBERS
from broker.natsproc import (
    NatsServer,
    free_port,
    make_cluster,
    nats_server_binary,
    start_cluster,
)

MEMBERS3 = ("JPN", "USA", "KOR")
KEYS_MD = Path(__file__).resolve().parent.parent / "docs" / "KEYS.md"


def config_args(keydir: Path) -> list[str]:
    """msmt nats config on ``keydir``, its authority key named as the pin."""
    pin = keydir / keys.AUTHORITY_PUBLIC_FILE
    return ["nats", "config", "--keys", str(keydir), "--authority", str(pin)]


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("natsconfig") / "keys"
    keys_custodian.init_keys(path)  # all 11 members, as a deployment has
    return path


@pytest.fixture
def hub(keydir: Path, tmp_path: Path) -> Iterator[NatsServer]:
    with running_hub(keydir, tmp_path / "hub") as server:
        yield server


@pytest.mark.parametrize("cluster", [0, 3])
def test_cli_config_loads_in_nats_server(keydir: Path, tmp_path: Path, cluster: int) -> None:
    out = tmp_path / "hub.conf"
    args = [*config_args(keydir), "--out", str(out), "--cluster", str(cluster)]
    result = CliRunner().invoke(main, [*args, "--store-dir", str(tmp_path / "js")])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert ("cluster {" in text) == bool(cluster)
    # Every write fsynced before its ack: a node never sends an acked envelope again.
    block = text.split("jetstream {", 1)[1].split("}", 1)[0] + "\n"
    assert "\n  sync_interval: always\n" in block
    # The store's size is set, not 75% of what the disk has free at each start (a hub
    # restarted on a full disk refused every publish): room for every account's quota.
    mib = 3520 * 3 if cluster else 3520
    assert f"\n  max_file_store: {mib * 1024 * 1024}\n" in block
    env = {**os.environ, "SERVER_NAME": "nats-1"}
    check = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "is valid" in check.stdout + check.stderr


def test_a_store_dir_with_an_accent_or_a_quote_loads_in_nats_server(
    keydir: Path, tmp_path: Path
) -> None:
    # A review: json.dumps wrote "jetstream-\u00e9", and nats-server takes no \u escape
    # ("Invalid escape character 'u'"): the hub would not start.
    for store in ("jetstream-é", 'jet"stream'):
        out = tmp_path / "hub.conf"
        args = [*config_args(keydir), "--out", str(out), "--cluster", "3"]
        done = msmt(*args, "--store-dir", str(tmp_path / store))
        assert done.returncode == 0, done.stderr
        checked = _valid(out)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    refused = msmt(*args, "--store-dir", "jet\x01stream")
    assert refused.returncode == 2
    assert "control characters nats-server cannot read" in refused.stderr


def test_cli_config_listens_where_the_operator_says(keydir: Path, tmp_path: Path) -> None:
    # A second hub on a shared machine, or a port policy: --listen and --http, no hand edits.
    out = tmp_path / "hub.conf"
    client, monitor = free_port(), free_port()
    result = CliRunner().invoke(
        main,
        [
            *config_args(keydir), "--out", str(out),
            "--store-dir", str(tmp_path / "js"),
            "--listen", f"127.0.0.1:{client}", "--http", f"127.0.0.1:{monitor}",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def serving() -> bool:
            assert proc.poll() is None, "nats-server exited"
            try:
                fetch(f"http://127.0.0.1:{monitor}/healthz")
            except OSError:
                return False
            return True

        wait_for(serving, 30, "the monitoring endpoint")
        varz = json.loads(fetch(f"http://127.0.0.1:{monitor}/varz"))
        assert (varz["host"], varz["port"], varz["http_port"]) == ("127.0.0.1", client, monitor)
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--listen", "4222"), ("--listen", "0.0.0.0:0"), ("--http", 'x" y:1'), ("--http", "h:p")],
)
def test_cli_config_refuses_a_listen_address_that_is_not_host_port(
    keydir: Path, tmp_path: Path, option: str, value: str
) -> None:
    out = tmp_path / "hub.conf"
    args = [*config_args(keydir), "--out", str(out), option, value]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.stderr == (
        f"msmt: error: {option} {value!r} is not HOST:PORT (e.g. 127.0.0.1:4222)\n"
    )
    assert not out.exists()


def test_every_member_user_has_least_privilege(keydir: Path) -> None:
    users = natsusers.load_users(keydir)
    for member in MEMBERS:
        account = natsconfig.member_account(member, users[member], MEMBERS)
        (user,) = account["users"]
        assert user["nkey"] == users[member]
        publish = user["permissions"]["publish"]["allow"]
        subscribe = user["permissions"]["subscribe"]["allow"]
        partners = [p for p in MEMBERS if p != member]
        assert {s for s in publish if s.startswith("msmt.to.")} == {
            f"msmt.to.{p}.>" for p in partners
        }
        for subject in publish:
            # JetStream API only on its own inbox; never a wildcard over streams or accounts.
            if subject.startswith("$JS.") and subject != "$JS.API.INFO":
                assert f".INBOX_{member}." in subject or subject.endswith(f".INBOX_{member}")
            assert not subject.startswith(("from.", "msmt.in.", "$SYS", "_INBOX"))
            assert subject not in (">", "$JS.>", "$JS.API.>", "msmt.>")
        assert sorted(subscribe) == sorted(
            [
                f"_INBOX_{member}.>",
                f"msmt.audit.{member}.proof",
                "msmt.audit.*.checkpoint",
                "msmt.audit.*.cosignature",
            ]
        )
        (inbox_export,) = [e for e in account["exports"] if "account_token_position" in e]
        assert inbox_export["service"] == f"from.*.msmt.to.{member}.>"
        assert inbox_export["account_token_position"] == 2
        assert sorted(inbox_export["accounts"]) == sorted(partners)


@pytest.mark.parametrize(
    ("users", "match"),
    [
        ({"JPN": "U" + "A" * 55, "USA": "U" + "B" * 55}, "needs AUDIT"),
        ({"JPN": "U" + "A" * 55, "AUDIT": "U" + "C" * 55}, "at least two members"),
        ({"JPN": "U" + "A" * 55, "XYZ": "U" + "C" * 55}, "unknown account 'XYZ'"),
        ({"JPN": "SUAAAA", "USA": "U" + "B" * 55, "AUDIT": "U" + "C" * 55}, "JPN has no user"),
    ],
)
def test_bad_user_lists_are_refused(users: dict[str, str], match: str) -> None:
    with pytest.raises(KeyMaterialError, match=match):
        natsconfig.accounts_config(users)


def test_cli_config_from_missing_keys_is_one_line(keydir: Path, tmp_path: Path) -> None:
    pin = keydir / keys.AUTHORITY_PUBLIC_FILE
    nope = tmp_path / "nope"
    args = ["nats", "config", "--keys", str(nope), "--authority", str(pin)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x.conf")])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"msmt: error: cannot read {nope / keys.NATS_USERS_FILE}: No such file or directory\n"
    )
    assert not (tmp_path / "x.conf").exists()
    # The pin is never taken from the key directory, which comes with the users.
    result = CliRunner().invoke(main, ["nats", "config", "--keys", str(keydir), "--out", "x"])
    assert result.exit_code == 2
    assert "Missing option '--authority'" in result.stderr


def test_cli_config_refuses_a_mistyped_nkey_in_the_user_list(keydir: Path, tmp_path: Path) -> None:
    # One letter of AUS's nkey in lower case: the config was written, and nats-server
    # then refused it, naming only a line of the config, not the file to mend.
    copy = tmp_path / "keys"
    copy.mkdir()
    users = natsusers.load_users(keydir)
    at = next(i for i, ch in enumerate(users["AUS"]) if i > 0 and ch.isalpha())
    users["AUS"] = users["AUS"][:at] + users["AUS"][at].lower() + users["AUS"][at + 1 :]
    (copy / keys.NATS_USERS_FILE).write_text(json.dumps(users))
    shutil.copy(keydir / keys.AUTHORITY_PUBLIC_FILE, copy)
    out = tmp_path / "x.conf"
    result = CliRunner().invoke(main, [*config_args(copy), "--out", str(out)])
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"msmt: error: {copy / keys.NATS_USERS_FILE}: the user of 'AUS': malformed NATS public"
        " nkey (not base32)\n"
    )
    assert not out.exists()


def test_setup_twice_changes_nothing_and_shows_its_settings(hub: NatsServer, keydir: Path) -> None:
    runner = CliRunner()
    base = ["nats", "setup", "--server", hub.url, "--keys", str(keydir), "--account", "JPN"]
    base += ["--max-bytes", str(8 * 1024 * 1024)]
    first = runner.invoke(main, base)
    assert first.exit_code == 0, first.output
    assert "stream INBOX_JPN: created" in first.output
    assert "consumer JPN_NODE: created" in first.output
    for line in (
        "deny_delete = True",
        "deny_purge = True",
        "duplicate_window = 120s",
        "max_age = 2592000s (30 days)",  # not "2.592e+06s"
        "ack_wait = 30s",
        "max_msg_size = 524288",
        "max_bytes = 8388608",
        "discard = new",
        "subjects = ['from.*.msmt.to.JPN.>']",
        "ack_policy = explicit",
    ):
        assert line in first.output
    second = runner.invoke(main, base)
    assert second.exit_code == 0, second.output
    assert "stream INBOX_JPN: unchanged" in second.output
    assert "consumer JPN_NODE: unchanged" in second.output
    # --quiet: what was done, without the settings (the README's loop over 12 accounts).
    quiet = runner.invoke(main, [*base, "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output.splitlines() == [
        line for line in second.output.splitlines() if not line.startswith("  ")
    ]
    assert "stream INBOX_JPN: unchanged" in quiet.output.splitlines()
    changed = runner.invoke(main, [*base[:-1], str(16 * 1024 * 1024)])
    assert "stream INBOX_JPN: updated" in changed.output
    assert "max_bytes = 16777216" in changed.output
    audit = runner.invoke(main, [*base[:-3], "AUDIT"])
    assert audit.exit_code == 0, audit.output
    for member in MEMBERS:  # one archive per member, so none can fill another's
        assert f"stream {natsconfig.archive_stream(member)}: created" in audit.output
    assert audit.output.count("max_age = 0s (no age limit)\n") == len(MEMBERS)


def test_setup_again_without_its_options_keeps_a_stream_sized_on_purpose(
    hub: NatsServer, keydir: Path
) -> None:
    # deploy/provision.sh (the compose setup, re-run for every roster rollout)
    # passes no --max-bytes or --max-age-days: it set every sized inbox back to
    # 128 MiB and 30 days, and every archive to 32 MiB, saying "updated".
    runner = CliRunner()
    base = ["nats", "setup", "--server", hub.url, "--keys", str(keydir), "--account"]
    sized = ["--max-bytes", str(16 * 1024 * 1024), "--max-age-days", "2"]
    first = runner.invoke(main, [*base, "JPN", *sized])
    assert first.exit_code == 0, first.output
    again = runner.invoke(main, [*base, "JPN"])
    assert again.exit_code == 0, again.output
    assert "stream INBOX_JPN: unchanged" in again.output
    assert "max_bytes = 16777216" in again.output
    assert "max_age = 172800s (2 days)" in again.output
    archive = runner.invoke(main, [*base, "AUDIT", "--max-bytes", str(8 * 1024 * 1024)])
    assert archive.exit_code == 0, archive.output
    archive_again = runner.invoke(main, [*base, "AUDIT"])
    assert archive_again.exit_code == 0, archive_again.output
    assert "updated" not in archive_again.output
    assert archive_again.output.count("max_bytes = 8388608") == len(MEMBERS)
    # A new stream still gets the defaults.
    new = runner.invoke(main, [*base, "USA"])
    assert new.exit_code == 0, new.output
    assert f"max_bytes = {natsconfig.INBOX_MAX_BYTES}" in new.output


def test_setup_with_credentials_the_hub_does_not_know_is_one_line(
    hub: NatsServer, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="Authorization Violation"):
        asyncio.run(natsetup.setup_account(hub.url, "JPN", keys.new_nats_seed()))


def test_setup_does_not_repeat_a_password_in_the_server_url(keydir: Path) -> None:
    port = free_port()
    done = msmt(
        "nats", "setup", "--server", f"nats://operator:hunter2-secret@127.0.0.1:{port}",
        "--keys", str(keydir), "--account", "JPN", timeout=30,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    assert "hunter2" not in done.stderr
    assert done.stderr.startswith(f"msmt: error: cannot connect to nats://***@127.0.0.1:{port} ")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://hub-1:4222", "'http://hub-1:4222' is not a nats:// or tls:// URL"),
        ("nats://hub-1:99999", "'nats://hub-1:99999' has no valid port"),
        ("nats://op:hunter2@[::1", "a URL is not well-formed (Invalid IPv6 URL)"),
    ],
)
def test_setup_refuses_a_server_that_is_no_hub_url_before_connecting(
    keydir: Path, url: str, reason: str
) -> None:
    # A bad-input sweep: "http://x" got as far as "Name or service not known".
    done = msmt("nats", "setup", "--server", url, "--keys", str(keydir), "--account", "JPN")
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith(f"msmt: error: --server: {reason}"), done.stderr
    assert "hunter2" not in done.stderr


@pytest.mark.parametrize("scheme", ["nats", "tls"])
def test_setup_against_a_port_nobody_listens_on_is_one_line_and_quick(
    keydir: Path, scheme: str
) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}"
    started = time.monotonic()
    # nats-py used to retry a refused connect forever; the timeout turns that into a failure.
    done = msmt(
        "nats", "setup", "--server", url, "--keys", str(keydir), "--account", "JPN", timeout=30
    )
    assert time.monotonic() - started < 20
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith(f"msmt: error: cannot connect to {url} as JPN: "), done.stderr
    assert "Connect call failed" in done.stderr  # the socket's reason, not nats-py's "no servers"
    # Nothing listens: no hub to demand a client certificate (an onboarding trial was
    # told one might, for a hub that was not started).
    assert "client certificate" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


def test_setup_against_a_server_sending_an_endless_line_is_one_line(keydir: Path) -> None:
    # A review: a "server" sending INFO and 50 MB without a line end raised asyncio's
    # ValueError past the 64 KiB line limit: a traceback here, and a node that stopped.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"INFO " + b"x" * (200 << 10))
                conn.recv(1)  # until the client leaves

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"nats://127.0.0.1:{port}"
        done = msmt("nats", "setup", "--server", url, "--keys", str(keydir), "--account", "JPN")
    finally:
        listener.close()
        thread.join(10)
    assert (done.returncode, done.stderr) == (
        2,
        f"msmt: error: cannot connect to {url} as JPN: it sent a line longer than 64 KiB:"
        " not a NATS server\n",
    )


def test_three_server_hub_acks_a_cross_account_publish_on_an_r3_inbox(
    keydir: Path, tmp_path: Path
) -> None:
    users = natsusers.load_users(keydir)
    servers = make_cluster(tmp_path / "cluster", 3, natsconfig.accounts_config(users))
    start_cluster(servers)
    try:
        asyncio.run(_r3_round_trip(servers, keydir))
    finally:
        for server in servers:
            server.kill()


async def _r3_round_trip(servers: list[NatsServer], keydir: Path) -> None:
    limits = natsetup.InboxLimits(max_bytes=8 * 1024 * 1024, replicas=3)
    usa_seed = (keydir / "USA" / keys.NATS_SEED_FILE).read_bytes().strip()
    # Right after /healthz a server may not count its peers yet: setup waits for them.
    results = await natsetup.setup_account(servers[0].url, "USA", usa_seed, limits)
    assert results[0].settings["num_replicas"] == 3
    # The sender is on another server than the one the inbox was set up through.
    jpn_seed = (keydir / "JPN" / keys.NATS_SEED_FILE).read_bytes().strip()
    jpn = await natsetup.connect_account(servers[2].url, "JPN", jpn_seed)
    try:
        # The new stream reaches the third server a moment later, on a loaded machine
        # after the first publish (a clean-clone run: no responders): retried, as a
        # node's outbox retries; the message id keeps it one message.
        deadline = time.monotonic() + 20
        while True:
            try:
                ack = await jpn.jetstream().publish(
                    "msmt.to.USA.vessel", b"ct", headers={"Nats-Msg-Id": "c1"}, timeout=10
                )
                break
            except nats.js.errors.NoStreamResponseError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await jpn.close()
    assert ack.stream == "INBOX_USA"
    assert ack.seq == 1
    usa = await natsetup.connect_account(servers[1].url, "USA", usa_seed)
    try:
        info = await usa.jetstream().stream_info("INBOX_USA")
    finally:
        await usa.close()
    assert info.state.messages == 1
    assert info.cluster is not None
    assert len(info.cluster.replicas or []) == 2


def test_setup_again_without_replicas_keeps_every_copy_of_a_cluster_stream(
    keydir: Path, tmp_path: Path
) -> None:
    """A member re-running setup as docs/DEPLOY.md says, but without ``--replicas``."""
    users = natsusers.load_users(keydir)
    servers = make_cluster(tmp_path / "cluster", 3, natsconfig.accounts_config(users))
    start_cluster(servers)
    runner = CliRunner()
    base = ["nats", "setup", "--server", servers[0].url, "--keys", str(keydir)]
    base += ["--max-bytes", str(8 * 1024 * 1024)]

    def setup(args: list[str]) -> Result:
        # A new cluster may not count its peers yet, and on a loaded machine a peer
        # can miss a heartbeat and count as offline for a moment: setup then waits.
        # Past its 20 s it says to run it again (it changes only what differs), as
        # an operator would: a clean-clone run beside other jobs met that once.
        done = runner.invoke(main, [*base, *args])
        if done.exit_code == 2 and "did not answer within" in done.output:
            done = runner.invoke(main, [*base, *args])
        return done

    try:
        first = setup(["--account", "USA", "--replicas", "3"])
        assert first.exit_code == 0, first.output
        assert "num_replicas = 3" in first.output
        again = setup(["--account", "USA"])
        audit = setup(["--account", "AUDIT", "--replicas", "3"])
        audit_again = setup(["--account", "AUDIT"])
    finally:
        for server in servers:
            server.kill()
    assert again.exit_code == 0, again.output
    assert "stream INBOX_USA: unchanged" in again.output
    assert "num_replicas = 3" in again.output
    assert audit.exit_code == 0, audit.output
    assert audit_again.exit_code == 0, audit_again.output
    assert "updated" not in audit_again.output
    assert audit_again.output.count("num_replicas = 3") == len(MEMBERS)


def test_setup_waits_for_the_server_still_joining_to_place_three_replicas(
    keydir: Path, tmp_path: Path
) -> None:
    """A cluster is healthy once a majority is up, and deploy/provision.sh sets up then."""
    users = natsusers.load_users(keydir)
    servers = make_cluster(tmp_path / "cluster", 3, natsconfig.accounts_config(users))
    limits = natsetup.InboxLimits(max_bytes=8 * 1024 * 1024, replicas=3)

    def setup(
        account: str, limits: natsetup.InboxLimits, wait: float
    ) -> tuple[list[natsetup.SetupResult] | str, list[MutableMapping[str, Any]]]:
        """The results, or the one-line refusal; and what setup logged."""
        seed = (keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()
        run = natsetup.setup_account(servers[0].url, account, seed, limits, placement_wait=wait)
        with capture_logs() as logs:
            try:
                return asyncio.run(run), logs
            except ConfigError as exc:
                return str(exc), logs

    late = threading.Timer(1.0, servers[2].start, kwargs={"wait": False})
    try:
        start_cluster(servers[:2])
        # Two of three servers cannot hold three replicas: refused at once without a wait.
        refused, _ = setup("USA", limits, 0)
        late.start()
        created, waited = setup("USA", limits, natsetup.PLACEMENT_WAIT)
        late.join()
        # A cluster of three can never place five: the wait ends in one line saying so.
        too_many, _ = setup("JPN", dataclasses.replace(limits, replicas=5), 0.5)
    finally:
        # A failure above must not leave the timer to start a server after the kill.
        late.cancel()
        if late.is_alive():
            late.join()
        for server in servers:
            server.kill()
    assert refused == (
        "stream INBOX_USA: the hub has no 3 servers online to place 3 replicas on (still"
        " refused after 0 s): start the cluster's missing servers, or use a smaller --replicas"
        " (at most the cluster's size)"
    )
    assert not isinstance(created, str), created
    assert [(r.kind, r.name, r.action) for r in created] == [
        ("stream", "INBOX_USA", "created"),
        ("consumer", "USA_NODE", "created"),
    ]
    assert created[0].settings["num_replicas"] == 3
    assert [e["event"] for e in waited] == ["stream_placement_waiting"]
    assert waited[0]["stream"] == "INBOX_USA"
    assert isinstance(too_many, str)
    assert too_many.startswith("stream INBOX_JPN: the hub has no 5 servers online")
    assert "(still refused after 0.5 s)" in too_many


def test_config_is_plain_json_a_reader_can_audit(keydir: Path) -> None:
    text = natsconfig.accounts_config(natsusers.load_users(keydir))
    head, _, rest = text.partition("accounts: ")
    body, _, tail = rest.rpartition("system_account: ")
    assert head == ""
    accounts = json.loads(body)
    assert set(accounts) == {*MEMBERS, "AUDIT", "SYS"}
    assert accounts["SYS"] == {}
    assert tail.strip() == '"SYS"'


def test_keys_md_names_every_setting_the_hub_config_has_besides_the_accounts(
    keydir: Path,
) -> None:
    text = natsconfig.server_config(keys_users.load_signed_users(keydir), cluster=3)
    head, found, _ = text.partition("\naccounts: ")
    assert found
    settings = [
        line.split(":")[0].split(" {")[0]
        for line in head.splitlines()
        if line and not line.startswith((" ", "}", "#"))
    ]
    assert settings == ["server_name", "listen", "http", "jetstream", "max_payload", "cluster"]
    doc = " ".join(KEYS_MD.read_text().split())
    # The file is nats-server syntax around one JSON value; the doc must not sell it as JSON.
    assert [s for s in settings if f"`{s}" not in doc] == []
    assert '`accounts: {...}` and `system_account: "SYS"`' in doc


def test_setup_takes_away_a_source_a_member_added_to_its_own_inbox(
    hub: NatsServer, keydir: Path
) -> None:
    # A member's user may edit its own inbox: a red-team member added a source pulling
    # another member's inbox through its API prefix (it stayed idle). Setup undoes it.
    base = ["nats", "setup", "--server", hub.url, "--keys", str(keydir), "--account", "FRA"]
    base += ["--max-bytes", str(8 * 1024 * 1024)]
    assert CliRunner().invoke(main, base).exit_code == 0

    async def add_source() -> list[Any] | None:
        seed = (keydir / "FRA" / keys.NATS_SEED_FILE).read_bytes().strip()
        nc = await natsetup.connect_account(hub.url, "FRA", seed)
        try:
            js = nc.jetstream()
            config = (await js.stream_info("INBOX_FRA")).config
            config.sources = [
                StreamSource(name="INBOX_JPN", external=ExternalStream(api="$JS.JPN.API"))
            ]
            return (await js.update_stream(config)).config.sources
        finally:
            await nc.close()

    async def sources() -> list[Any] | None:
        seed = (keydir / "FRA" / keys.NATS_SEED_FILE).read_bytes().strip()
        nc = await natsetup.connect_account(hub.url, "FRA", seed)
        try:
            return (await nc.jetstream().stream_info("INBOX_FRA")).config.sources
        finally:
            await nc.close()

    added = asyncio.run(add_source())  # the hub took it
    assert [(s.name, s.external.api if s.external else None) for s in added or []] == [
        ("INBOX_JPN", "$JS.JPN.API")
    ]
    again = CliRunner().invoke(main, base)
    assert again.exit_code == 0, again.output
    assert "stream INBOX_FRA: updated" in again.output
    assert not asyncio.run(sources())
    assert "stream INBOX_FRA: unchanged" in CliRunner().invoke(main, base).output


def test_setup_without_options_puts_back_what_drops_or_refuses_reports(
    hub: NatsServer, keydir: Path
) -> None:
    # A security review: edits with the member's own credentials that the node names
    # (a subject transform, no acks, a size or age below what setup's options allow),
    # which setup run as the node says, without options, kept ("unchanged"). An
    # archive's age is never kept: it would expire its history.
    base = ["nats", "setup", "--server", hub.url, "--keys", str(keydir)]
    assert CliRunner().invoke(main, [*base, "--account", "FRA"]).exit_code == 0
    assert CliRunner().invoke(main, [*base, "--account", "AUDIT"]).exit_code == 0

    async def edit(account: str, stream: str, **changes: Any) -> StreamConfig:
        seed = (keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()
        nc = await natsetup.connect_account(hub.url, account, seed)
        try:
            js = nc.jetstream()
            config = (await js.stream_info(stream)).config
            if changes:
                config = (await js.update_stream(dataclasses.replace(config, **changes))).config
            return config
        finally:
            await nc.close()

    edited = asyncio.run(
        edit(
            "FRA",
            "INBOX_FRA",
            subject_transform=SubjectTransform(src="from.*.msmt.to.FRA.>", dest="from.USA.>"),
            no_ack=True,
            max_bytes=4096,
            max_age=300.0,
            max_msgs_per_subject=1,
        )
    )
    found = natsetup.stream_alterations({"config": edited.as_dict()}, "FRA")
    assert found.startswith("subject_transform ")
    assert found.endswith("max_msgs_per_subject 1, max_age 300 s, max_bytes 4096, no_ack"), found
    asyncio.run(edit("AUDIT", "AUDIT_ARCHIVE_FRA", max_age=3600.0))
    again = CliRunner().invoke(main, [*base, "--account", "FRA"])
    assert "stream INBOX_FRA: updated" in again.output, again.output
    config = asyncio.run(edit("FRA", "INBOX_FRA"))
    assert (config.subject_transform, config.no_ack) == (None, False)
    assert config.max_msgs_per_subject == -1
    assert (config.max_bytes, config.max_age) == (128 * 1024 * 1024, 30 * 86400.0)
    assert natsetup.stream_alterations({"config": config.as_dict()}, "FRA") == ""
    again = CliRunner().invoke(main, [*base, "--account", "AUDIT"])
    assert "stream AUDIT_ARCHIVE_FRA: updated" in again.output, again.output
    assert asyncio.run(edit("AUDIT", "AUDIT_ARCHIVE_FRA")).max_age == 0


def _stopped(pid: int) -> None:
    """Wait until process ``pid`` is stopped (state ``T`` in ``/proc/<pid>/stat``)."""
    for _ in range(500):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] in ("T", "t"):
            return
        time.sleep(0.01)  # the loop has nothing to do meanwhile: nothing is asked yet
    raise AssertionError(f"process {pid} did not stop")


def test_a_setup_request_the_hub_does_not_answer_is_said_to_be_unanswered(
    tmp_path: Path,
) -> None:
    # A request that timed out was not refused (the server may yet have done it): the
    # line says so and that running the setup again is safe, not "refused (nats: timeout)".
    import signal

    import nats

    server = NatsServer(workdir=tmp_path)
    server.start()
    try:
        limits = natsetup.InboxLimits()

        async def ask() -> str:
            nc = await nats.connect(server.url, allow_reconnect=False)
            try:
                js = nc.jetstream(timeout=0.5)
                assert server.proc is not None
                server.proc.send_signal(signal.SIGSTOP)
                # Stopped before the first request: on a loaded machine the server
                # answered one in the moment the signal took to land (a CI run).
                _stopped(server.proc.pid)
                try:
                    wanted = natsetup.inbox_stream_config("USA", limits)
                    with pytest.raises(ConfigError) as stream:
                        await natsetup.ensure_stream(js, wanted)
                    with pytest.raises(ConfigError) as consumer:
                        await natsetup.ensure_consumer(
                            js, "INBOX_USA", natsetup.inbox_consumer_config("USA", limits)
                        )
                finally:
                    server.proc.send_signal(signal.SIGCONT)
                return f"{stream.value}\n{consumer.value}"
            finally:
                await nc.close()

        lines = asyncio.run(ask()).splitlines()
    finally:
        server.kill()
    assert lines == [
        f"{what}: the hub did not answer within 20 s (a busy or partitioned cluster?):"
        " run the setup again, it changes only what differs"
        for what in ("stream INBOX_USA", "consumer INBOX_USA/USA_NODE")
    ]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate and key for nats-server to load (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub.example")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.pem", directory / "server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _valid(config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SERVER_NAME": "nats-1"}
    return subprocess.run(
        [nats_server_binary(), "-t", "-c", str(config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=30,
    )


def test_tls_settings_are_included_so_writing_the_config_again_keeps_them(
    keydir: Path, tmp_path: Path
) -> None:
    # An onboarding trial followed DEPLOY.md: the tls block appended to the generated
    # hub.conf, then KEYS.md's "the hub operator runs msmt nats config and reloads" for
    # a new member's user. The file was written again without it: the hub, reloaded,
    # logged "tls = disabled" and served plaintext, which every node refused.
    cert, key = _self_signed(tmp_path)
    settings = f"cert_file: {json.dumps(str(cert))}\nkey_file: {json.dumps(str(key))}\n"
    (tmp_path / "tls-client.conf").write_text(settings + "timeout: 2\n")
    (tmp_path / "tls-route.conf").write_text(settings)
    out = tmp_path / "hub.conf"
    base = [*config_args(keydir), "--out", str(out)]
    base += ["--store-dir", str(tmp_path / "js"), "--cluster", "3"]
    done = msmt(*base, "--tls-include", "tls-client.conf", "--route-tls-include", "tls-route.conf")
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert '\ntls {\n  include "tls-client.conf"\n}\n' in text
    assert '\n  tls {\n    include "tls-route.conf"\n  }\n}\n' in text  # in the cluster block
    checked = _valid(out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The files are read, relative to hub.conf's directory: a bad one fails the check.
    (tmp_path / "tls-client.conf").write_text(f"cert_file: {json.dumps(str(tmp_path / 'no'))}\n")
    assert _valid(out).returncode != 0
    (tmp_path / "tls-client.conf").write_text(settings)

    # Written again without them: refused, naming where, the file as it was.
    for where, option in (
        (": tls", ["--route-tls-include", "tls-route.conf"]),
        ('cluster/tls: include "tls-route.conf"', ["--tls-include", "tls-client.conf"]),
    ):
        refused = msmt(*base, *option)
        assert refused.returncode == 2
        assert refused.stderr == (
            f"msmt: error: --out {out} sets TLS at {where!r}, which this run would drop: TLS"
            " set there would be off at the hub's reload; put the tls blocks' settings in"
            " files and pass --tls-include FILE and --route-tls-include FILE (docs/DEPLOY.md,"
            " TLS), or move the file away first\n"
        )
        assert out.read_text() == text
    # One settings file for both, then only --tls-include: the routes' block would go,
    # though its lines match the clients' (a review).
    (tmp_path / "both.conf").write_text(settings)
    both = tmp_path / "both-hub.conf"
    twice = [*config_args(keydir), "--out", str(both), "--cluster", "3"]
    assert (
        msmt(*twice, "--tls-include", "both.conf", "--route-tls-include", "both.conf").returncode
        == 0
    )
    assert msmt(*twice, "--tls-include", "both.conf").returncode == 2
    # A block appended by hand, as DEPLOY.md once said, is protected the same way, and
    # so is one written otherwise (a review): a websocket's, its brace on the next line,
    # an include holding it; a commented one is not.
    single = tmp_path / "single.conf"
    plain = [*config_args(keydir), "--out", str(single)]
    assert msmt(*plain).returncode == 0
    generated = single.read_text()
    for added in (
        "tls {\n  " + settings.replace("\n", "\n  ") + "}\n",
        "websocket {\n  port: 8080\n  tls {\n    cert_file: x\n  }\n}\n",
        "tls\n{\n  cert_file: x\n}\n",
        'include "tlsblock.conf"\n',
        # A trial's hub operator (nats-server reads keys in any case, quoted or not):
        "TLS {\n  cert_file: x\n}\n",
        '"tls": {"cert_file": "x"}\n',
        "websocket { port: 8080, tls { cert_file: x } }\n",
        "max_connections: 100;tls { cert_file: x }\n",  # and a review's
    ):
        single.write_text(generated + added)
        assert msmt(*plain).returncode == 2, added
    single.write_text(generated + "# tls { cert_file: x }\n")
    assert msmt(*plain).returncode == 0
    for bad in ('tl"s.conf', "tl\\s.conf", "tls\n.conf"):
        (tmp_path / bad).write_text(settings)
        done = msmt(*plain, "--tls-include", bad)
        assert done.returncode == 2
        assert "a path without quotes, backslashes or control characters" in done.stderr
    # Read where nats-server reads it, beside hub.conf, and the settings alone (a trial:
    # a path relative to another folder, and a file holding its own tls block, each gave
    # a hub.conf that stopped the server at its next restart).
    absolute = msmt(*plain, "--tls-include", str(tmp_path / "tls-client.conf"))
    assert absolute.returncode == 2
    assert "a path relative to single.conf's folder" in absolute.stderr
    missing = msmt(*plain, "--tls-include", "sub/tls-client.conf")
    assert missing.returncode == 2
    assert missing.stderr.startswith(
        f"msmt: error: --tls-include sub/tls-client.conf: cannot read"
        f" {tmp_path / 'sub' / 'tls-client.conf'} (No such file or directory)"
    )
    (tmp_path / "wrapped.conf").write_text("tls {\n" + settings + "}\n")
    wrapped = msmt(*plain, "--tls-include", "wrapped.conf")
    assert wrapped.returncode == 2
    assert "it holds ': tls'; give the tls block's settings alone" in wrapped.stderr
    (tmp_path / "tlsé.conf").write_text(settings)
    accented = msmt(*plain, "--tls-include", "tlsé.conf")  # written as it is: nats-server reads it
    assert accented.returncode == 0, accented.stderr
    assert '\ntls {\n  include "tlsé.conf"\n}\n' in single.read_text()
    ported = msmt(*base, "--route-host", "127.0.0.{i}:40010", "--tls-include", "tls-client.conf")
    assert ported.returncode == 2
    assert "a host name pattern alone (no port)" in ported.stderr
    ipv6 = msmt(*base, "--route-host", "[fd00::{i}]", "--tls-include", "tls-client.conf",
                "--route-tls-include", "tls-route.conf")  # fmt: skip
    assert ipv6.returncode == 0, ipv6.stderr
    assert '"nats://[fd00::1]:6222"' in out.read_text()
    routes = msmt(
        *plain, "--tls-include", "tls-client.conf", "--route-tls-include", "tls-route.conf"
    )
    assert routes.returncode == 2
    assert "only a cluster (--cluster) has routes" in routes.stderr
