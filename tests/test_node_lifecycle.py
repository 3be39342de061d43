"""A node's start and stop as an operator meets them: refusals in one line, stops that stop.

Real ``msmt node run`` processes against a real nats-server (the ``world``
fixture), or against a port where no hub listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from node_world import (
    BATCH_POLICY,
    World,
    await_for,
    expected_partners,
    fetch,
    msmt,
    readyz,
    records_for,
    wait_for,
    write_node_config,
)

from broker import hubwatch, keys, keys_custodian, node_housekeeping
from broker.errors import KeyMaterialError
from broker.natsetup import setup_account
from broker.natsproc import free_port
from broker.node_start import load_node
from broker.publisher import PUBLISH_TIMEOUT
from broker.store import Store
from broker.validation import parse_record

pytestmark = pytest.mark.integration


def _stops_cleanly(
    world: World, member: str, within: float, sig: signal.Signals = signal.SIGTERM
) -> None:
    """Signal ``member``: exit 0 within ``within`` s, in order, and a status not claiming NATS."""
    proc = world.procs.pop(member)
    began = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=30)
    took = time.monotonic() - began
    log = (world.root / f"{member}.log").read_text()
    assert code == 0, log
    assert took < within, f"{took:.1f} s to stop"
    assert "Traceback" not in log
    assert "node_stopped" in log  # the store and the audit log were closed in order
    assert _status(world, member)["connected"] == "no"


def _status(world: World, member: str) -> dict[str, object]:
    done = msmt("status", "--config", str(world.config_path(member)), "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_sigterm_stops_a_node_that_never_reached_the_hub(world: World) -> None:
    # nats-py retries a hub it has never reached inside connect(); the stop must not wait for it.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    write_node_config(world.root, "JPN", [f"nats://127.0.0.1:{port}"], BATCH_POLICY)
    world.start("JPN", ready=False)
    wait_for(
        lambda: "Connect call failed" in (world.root / "JPN.log").read_text(),
        30,
        "the node to try the hub",
    )
    _stops_cleanly(world, "JPN", within=10)


def test_a_hub_sending_an_endless_line_is_tried_again_not_the_end_of_the_node(
    world: World,
) -> None:
    # A review: INFO and 50 MB without a line end raised asyncio's ValueError past its
    # 64 KiB line limit, which the connect loop did not catch: the node stopped (exit 1).
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(1.0)
    served = threading.Event()
    connections: list[int] = []

    def serve() -> None:
        while not served.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                connections.append(1)
                with conn:
                    conn.sendall(b"INFO " + b"x" * (200 << 10))
                    conn.settimeout(2.0)
                    with contextlib.suppress(OSError):
                        conn.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        write_node_config(world.root, "JPN", [f"nats://127.0.0.1:{port}"], BATCH_POLICY)
        world.start("JPN", ready=False)
        wait_for(lambda: len(connections) >= 3, 30, "the node to try the hub three times")
        assert world.procs["JPN"].poll() is None  # still running, trying again
        assert "cannot connect to NATS: ValueError" in (world.root / "JPN.log").read_text()
        _stops_cleanly(world, "JPN", within=10)
    finally:
        served.set()
        listener.close()
        thread.join(10)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGUSR1, signal.SIGQUIT])
def test_sighup_stops_a_running_node_as_sigterm_does_and_the_log_says_which(
    world: World, sig: signal.Signals
) -> None:
    # The node has no reload: SIGHUP's default action killed it without a line and
    # left its intake socket behind (a policy officer sent it expecting a reload);
    # so did SIGUSR1, which operators used to nats-server send to reopen logs, and
    # SIGQUIT (a signals trial).
    world.write_config("JPN", BATCH_POLICY)
    world.start("JPN")
    wait_for(lambda: _status(world, "JPN")["connected"] == "yes", 30, "the status to say so")
    _stops_cleanly(world, "JPN", within=20, sig=sig)
    lines = [json.loads(line) for line in (world.root / "JPN.log").read_text().splitlines()]
    stopping = [line for line in lines if line["event"] == "node_stopping"]
    assert [line.get("signal") for line in stopping] == [sig.name]
    assert not world.config("JPN").socket_path.exists()


def test_sigterm_while_the_hub_is_down_stops_cleanly_and_says_not_connected(
    world: World,
) -> None:
    world.write_config("JPN", BATCH_POLICY)
    world.start("JPN")
    wait_for(lambda: _status(world, "JPN")["connected"] == "yes", 30, "the status to say so")
    world.server.kill()
    _stops_cleanly(world, "JPN", within=20)


async def test_sigterm_with_envelopes_awaiting_a_gone_hub_stops_without_waiting_for_acks(
    world: World,
) -> None:
    # Envelopes published after the hub went sit in nats-py's reconnect buffer,
    # awaiting acks that cannot come: the stop must not wait out PUBLISH_TIMEOUT
    # for them, and they must stay pending, to be sent after the restart.
    world.write_config("JPN", BATCH_POLICY)
    world.start("JPN")
    await await_for(lambda: _status(world, "JPN")["connected"] == "yes", 30, "JPN connected")
    world.server.kill()
    await await_for(lambda: _status(world, "JPN")["connected"] == "no", 30, "JPN to notice")
    records = records_for("JPN", 5, seed=41)
    answers = await world.submit("JPN", records)
    assert [a["status"] for a in answers] == ["accepted"] * 5
    policy = world.policy("JPN")
    sends = {
        m: sum(m in expected_partners(policy, parse_record(json.dumps(r))) for r in records)
        for m in ("USA", "KOR")
    }
    # Planned, so published into the reconnect buffer.
    depth = sum(sends.values())
    await await_for(lambda: _status(world, "JPN")["outbox_depth"] == depth, 30, "JPN to plan")
    _stops_cleanly(world, "JPN", within=PUBLISH_TIMEOUT)
    assert _status(world, "JPN")["outbox_depth"] == depth
    # Which partners the depth waits for, so an operator knows where to look.
    outbox = _status(world, "JPN")["outbox"]
    assert isinstance(outbox, dict)
    assert outbox.pop("unplanned") == 0
    assert {m: counts["unacked"] for m, counts in outbox.items()} == {
        m: n for m, n in sends.items() if n
    }
    text = msmt("status", "--config", str(world.config_path("JPN"))).stdout
    assert f"\n  USA                          unacked {sends['USA']} (oldest accepted " in text

    world.server.start()
    world.start("JPN")
    await await_for(lambda: _status(world, "JPN")["outbox_depth"] == 0, 30, "JPN to send")
    assert {m: await world.stream_messages(m) for m in sends} == sends
    assert world.terminate("JPN") == 0


def test_a_second_node_on_the_same_data_directory_is_refused_with_one_line(
    world: World,
) -> None:
    world.write_config("JPN", BATCH_POLICY)
    world.start("JPN")
    pid = world.procs["JPN"].pid
    store_path = world.config("JPN").store_path
    # Another metrics port, so only the data directory is shared.
    other_port = f"127.0.0.1:{free_port()}"
    second = msmt(
        "node", "run", "--config", str(world.config_path("JPN")), MSMT_METRICS_LISTEN=other_port
    )
    assert second.returncode == 1
    assert second.stderr == (
        f"msmt: error: store {store_path} is in use by another process (pid {pid}): "
        "is a node already running on this data directory?\n"
    )
    # The first is untouched: still ready, its socket still there.
    assert readyz(world.config("JPN").metrics.port)
    assert world.config("JPN").socket_path.is_socket()
    assert world.terminate("JPN") == 0
    # Once it has stopped, the lock is gone with it.
    Store(store_path).close()


def test_a_bad_listener_or_directory_stops_the_start_with_one_line(world: World) -> None:
    world.write_config("JPN", BATCH_POLICY)
    config = world.config("JPN")
    path = str(world.config_path("JPN"))
    a_file = world.root / "a-file"
    a_file.write_text("not a directory\n")
    spool = msmt("node", "run", "--config", path, MSMT_SPOOL_DIR=str(a_file / "spool"))
    assert spool.returncode == 2
    assert spool.stderr == (
        f"msmt: error: config key intake.spool_dir: cannot use {a_file / 'spool'}: "
        "Not a directory\n"
    ), spool.stderr
    assert not config.socket_path.exists()  # the spool is checked before the socket is bound

    data = msmt("node", "run", "--config", path, MSMT_DATA_DIR=str(a_file / "data"))
    assert data.returncode == 2
    assert data.stderr == (
        f"msmt: error: config key data_dir: cannot create {a_file / 'data'}: Not a directory\n"
    ), data.stderr


def test_a_start_refused_for_a_missing_key_leaves_the_previous_roster_usable(
    world: World,
) -> None:
    # docs/KEYS.md: a node refused with a new roster starts again on the one it had.
    world.write_config("JPN", BATCH_POLICY)
    config = world.config("JPN")
    node = load_node(config)
    node.store.close()
    node.audit.close()
    before = {n: (world.keydir / n).read_bytes() for n in ("roster.json", "roster.json.jws")}
    elsewhere = world.root / "rotated"
    shutil.copytree(world.keydir, elsewhere)  # the authority's copy, with modes kept
    keys_custodian.rotate_keys(elsewhere, "JPN", now=datetime.now(UTC))
    for name in before:  # the new roster arrives; JPN's new private keys do not
        (world.keydir / name).write_bytes((elsewhere / name).read_bytes())
    with pytest.raises(KeyMaterialError, match="cannot read"):
        load_node(config)
    for name, data in before.items():  # the operator puts back the files it had
        (world.keydir / name).write_bytes(data)
    node = load_node(config)
    node.store.close()
    node.audit.close()


def test_an_open_data_directory_still_gets_a_private_store(world: World, tmp_path: Path) -> None:
    data = tmp_path / "open-data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    world.write_config("JPN", BATCH_POLICY)
    config = world.config("JPN")
    moved = config.model_copy(update={"data_dir": data})
    node = load_node(moved)
    try:
        assert moved.store_path.stat().st_mode & 0o777 == 0o600
    finally:
        node.store.close()
        node.audit.close()


async def test_a_metrics_port_another_process_holds_is_tried_again_while_the_node_runs(
    world: World,
) -> None:
    # A local user's review: holding the node's loopback metrics port kept it down, for
    # good with exit 2, and restarting for as long as it was held with exit 1. The node
    # now runs without its metrics, and listens once the port is free.
    world.write_config("JPN", BATCH_POLICY)
    config = world.config("JPN")
    # Another user's process: one of the node's own user is a second node (below).
    hold = (
        "import socket, sys, time; s = socket.socket();"
        " s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('held', flush=True);"
        " time.sleep(120)"
    )
    holder = await asyncio.create_subprocess_exec(
        shutil.which("python3", path="/usr/bin:/bin") or "python3",  # not the venv's: /root is 0700
        "-c",
        hold,
        str(config.metrics.port),
        stdout=asyncio.subprocess.PIPE,
        user=65534,
    )
    assert holder.stdout is not None
    assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"held\n"
    try:
        world.start("JPN", ready=False)
        said = (
            f"config key metrics.listen: cannot listen on 127.0.0.1:{config.metrics.port}:"
            " Address already in use: another process holds it; running without /metrics"
        )
        wait_for(lambda: said in (world.root / "JPN.log").read_text(), 30, "the line")
        wait_for(config.socket_path.is_socket, 30, "JPN taking records")
        answers = await world.submit("JPN", records_for("JPN", 2, seed=71))
        assert [a["status"] for a in answers] == ["accepted", "accepted"]
        assert not world._died("JPN")
    finally:
        holder.kill()
        await holder.wait()
    wait_for(lambda: readyz(config.metrics.port), 30, "JPN's metrics once the port is free")
    assert "metrics_listening" in (world.root / "JPN.log").read_text()
    # A review: a second node given the same metrics.listen ran unseen, the first one
    # answering for it. Another msmt node there is a mistake: exit 2.
    world.write_config("USA")
    second = msmt(
        "node",
        "run",
        "--config",
        str(world.config_path("USA")),
        MSMT_METRICS_LISTEN=f"127.0.0.1:{config.metrics.port}",
    )
    assert second.returncode == 2
    assert second.stderr == (
        f"msmt: error: config key metrics.listen: cannot listen on 127.0.0.1:"
        f"{config.metrics.port}: Address already in use: another process of this user"
        " listens there (a second node?); give each node its own metrics.listen\n"
    )
    assert world.terminate("JPN") == 0


async def test_a_hub_that_lost_the_inbox_shows_not_ready_until_setup_runs_again(
    world: World,
) -> None:
    # A hub whose JetStream store was lost still takes connections, so
    # msmt_nats_connected stays 1; msmt_ready and /readyz say nothing is received.
    world.write_config("USA")
    world.start("USA")
    port = world.config("USA").metrics.port
    url = f"http://127.0.0.1:{port}/metrics"
    await await_for(lambda: "msmt_ready 1.0" in fetch(url), 10, "USA ready")
    # The hub loses its JetStream store (a disk replaced, a volume not mounted).
    world.server.kill()
    shutil.rmtree(world.server.store_dir)
    world.server.start()

    def connected_not_ready() -> bool:
        # Not "msmt_ready 0.0" alone: the disconnect gives that too, so the page could
        # show it before the node was back on the hub (1 run in 3 under load), or for
        # up to a tick after, while its inbox still seemed bound (/readyz asks live).
        page = fetch(url)
        connected = "msmt_nats_connected 1.0" in page
        return connected and "msmt_ready 0.0" in page and not readyz(port)

    await await_for(connected_not_ready, 15, "USA back on the hub, not ready")
    # The journal says what is missing and what to run, beside the disconnect's line.
    said = (
        ": the hub has no stream INBOX_USA or consumer USA_NODE;"
        " run msmt nats setup --account USA (docs/DEPLOY.md)"
    )
    await await_for(lambda: said in (world.root / "USA.log").read_text(), 15, "the line")
    # What DEPLOY.md tells the operator: run the setup again; the node recovers by itself.
    seed = (world.keydir / "USA" / keys.NATS_SEED_FILE).read_bytes().strip()
    await setup_account(world.server.url, "USA", seed)
    await await_for(lambda: "msmt_ready 1.0" in fetch(url), 15, "USA ready again")
    assert readyz(port)
    assert world.terminate("USA") == 0


async def test_an_idle_log_gets_the_cosignature_of_a_witness_that_was_away(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # USA was down while JPN's log last grew; JPN then went idle. Its latest
    # checkpoint never changes again, so before, it was never published again and
    # USA never cosigned it: the log stayed short of its quorum until the next
    # report (chaos walkthrough, after hub restarts). JPN now republishes it.
    monkeypatch.setattr(node_housekeeping, "REPUBLISH_S", 0.5)
    for member in ("JPN", "USA"):
        world.write_config(member, BATCH_POLICY if member == "JPN" else None)
    jpn = load_node(world.config("JPN"))
    jpn_task = asyncio.create_task(jpn.run())
    try:
        await await_for(lambda: jpn.ready() is None, 20, "JPN ready")
        answers = await world.submit("JPN", records_for("JPN", 2, seed=7))
        assert [a["status"] for a in answers] == ["accepted", "accepted"]
        await await_for(lambda: jpn.store.outbox_depth() == 0, 30, "JPN sent everything")
        idle = jpn.audit.size
        await asyncio.sleep(1.5)  # idle: its checkpoint published, nothing new
        assert jpn.audit.size == idle
        assert "\u2014 USA " not in (jpn.audit.latest_checkpoint() or "")
        usa = load_node(world.config("USA"))
        usa_task = asyncio.create_task(usa.run())
        try:
            await await_for(
                lambda: "\u2014 USA " in (jpn.audit.latest_checkpoint() or ""),
                30,
                "USA's cosignature of JPN's idle checkpoint",
            )
            assert jpn.audit.size == idle
        finally:
            usa.stop.set()
            await usa_task
    finally:
        jpn.stop.set()
        await jpn_task


async def test_a_clock_ahead_of_the_hubs_is_reported_before_partners_refuse(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Partners refuse reports issued more than 5 minutes in their future, and the
    # sender learns nothing of it (chaos walkthrough: a node 10 minutes ahead lost
    # every report). The node compares its clock with the hub's every 5 s.
    world.write_config("JPN")
    node = load_node(world.config("JPN"))
    task = asyncio.create_task(node.run())

    def offset() -> float:
        value = node.metrics.registry.get_sample_value("msmt_clock_offset_seconds")
        assert value is not None
        return value

    try:
        # NaN, not 0, until the hub has answered: 0 would read as a perfect clock.
        assert math.isnan(offset())
        await await_for(lambda: not math.isnan(offset()), 20, "a first comparison")
        assert abs(offset()) < 5
        assert "clock" not in node._last_error
        real = hubwatch.wall_clock
        monkeypatch.setattr(hubwatch, "wall_clock", lambda: real() + 600)
        await await_for(lambda: offset() > 590, 20, "the clock 600 s ahead")
        assert node._last_error.startswith(
            "clock: this node's clock is 600 s ahead of the hub's; partners hold reports"
        )
    finally:
        node.stop.set()
        await task


async def test_a_witness_reanchored_by_its_operator_cosigns_a_restored_log_again(
    world: World,
) -> None:
    # A restore drill: JPN's node put back from a backup forked its log from what USA
    # had cosigned; USA raised the alarm and never cosigned JPN again, with no way out
    # but editing witness-state.json by hand. Its operator now reanchors USA's witness
    # on the size and root JPN's operator gives, and the old state is kept.
    world.write_config("JPN", BATCH_POLICY)
    world.write_config("USA")
    usa_state = world.config("USA").data_dir / "witness-state.json"
    records = records_for("JPN", 30, seed=61)

    def cosigned() -> int:
        state = json.loads(usa_state.read_text()) if usa_state.exists() else {}
        return int(state.get("JPN", {}).get("size", 0))

    def jpn_log() -> tuple[int, str]:
        done = msmt(
            "audit", "verify", str(world.config("JPN").data_dir), "--keys", str(world.keydir)
        )
        assert done.returncode == 0, done.stderr
        found = re.search(
            r"^OK: JPN log of (\d+) entries, \d+ signed checkpoints, root (\S+)$", done.stdout, re.M
        )
        assert found is not None, done.stdout
        return int(found[1]), found[2]

    world.start("USA")
    world.start("JPN")
    await world.submit("JPN", records[:5])
    wait_for(lambda: cosigned() > 0, 30, "USA cosigning JPN")
    assert world.terminate("JPN") == 0
    backup = world.root / "jpn-backup"
    shutil.copytree(world.config("JPN").data_dir, backup)
    world.start("JPN")
    await world.submit("JPN", records[5:10])
    later = cosigned()
    wait_for(lambda: cosigned() > later, 30, "USA cosigning JPN's later entries")
    assert world.terminate("JPN") == 0
    shutil.rmtree(world.config("JPN").data_dir)
    shutil.copytree(backup, world.config("JPN").data_dir)  # the restore
    world.start("JPN")
    await world.submit("JPN", records[10:20])  # past what USA cosigned: a fork
    port = world.config("USA").metrics.port

    def alarmed() -> bool:
        page = fetch(f"http://127.0.0.1:{port}/metrics")
        return any(
            f'msmt_audit_alarm_active{{kind="{kind}",log="JPN"}} 1.0' in page
            for kind in ("fork", "rollback")
        )

    wait_for(alarmed, 60, "USA's alarm on JPN's log")
    forked = cosigned()
    usa_config = str(world.config_path("USA"))
    running = msmt(
        "node",
        "reanchor",
        "--config",
        usa_config,
        "--log",
        "JPN",
        "--size",
        "1",
        "--root",
        "A" * 43 + "=",
        "--reason",
        "test",
    )
    assert running.returncode == 2
    assert "stop the node first" in running.stderr, running.stderr
    assert world.terminate("USA") == 0
    size, root = jpn_log()  # what JPN's operator reads out to the other members
    done = msmt(
        "node",
        "reanchor",
        "--config",
        usa_config,
        "--log",
        "jpn",
        "--size",
        str(size),
        "--root",
        root,
        "--reason",
        "JPN restored from its backup, confirmed by phone",
    )
    assert done.returncode == 0, done.stderr
    assert f"it holds size {size}, root {root} now" in done.stdout
    kept = (world.config("USA").data_dir / "witness-reanchored.jsonl").read_text().splitlines()
    assert [json.loads(line)["before"]["size"] for line in kept] == [forked]
    assert json.loads(kept[0])["after"] == {"size": size, "root": root}
    assert cosigned() == size
    world.start("USA")
    await world.submit("JPN", records[20:25])
    wait_for(lambda: cosigned() > size, 60, "USA cosigning JPN's log again")
    assert not alarmed()  # a restarted witness: none since, and none standing


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--log", "USA"], "--log: 'USA' is not a partner of USA"),
        (["--log", "XYZ"], "--log: 'XYZ' is not a partner of USA"),
        (["--root", "not base64!"], "--root: not base64 (as msmt audit verify prints it)"),
        (["--root", "AAAA"], "--root: not a 32-byte root in base64 with padding"),
        (["--reason", " "], "--reason: one line of printable text"),
    ],
)
def test_a_bad_reanchor_is_one_line_and_changes_nothing(
    world: World, args: list[str], reason: str
) -> None:
    world.write_config("USA")
    given = {"--log": "JPN", "--size": "3", "--root": "A" * 43 + "=", "--reason": "r"}
    given.update(dict(zip(args[::2], args[1::2], strict=True)))
    flat = [x for pair in given.items() for x in pair]
    done = msmt("node", "reanchor", "--config", str(world.config_path("USA")), *flat)
    assert done.returncode == 2
    assert done.stderr == f"msmt: error: {reason}\n"
    assert not (world.config("USA").data_dir / "witness-reanchored.jsonl").exists()
