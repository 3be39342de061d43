"""A hub that refuses a node's NATS credentials: said once, seen by monitoring, retried.

The hub refuses a node's user (``Authorization Violation``) when its configuration
lacks the seed's key: the member suspended (``msmt keys suspend``, docs/KEYS.md),
the custodian's accept not loaded, or a ``nats.nk`` other than the one recorded.
nats-py tries again every half second, and the node logged each refusal as hub
trouble, a ``node_error`` a minute naming no cause, for as long as it lasted (a
review saw hours of them). Now one ``nats_credentials_refused`` line names the cause
and what to do, one ``nats_credentials_accepted`` line ends it, and the status, a
gauge and ``/readyz`` say it meanwhile. The node keeps accepting and trying: a
later reload lets it in, and nothing accepted meanwhile is lost. A real hub
reloaded (SIGHUP) with the users changed, as its operator does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest
from node_world import (
    BATCH_POLICY,
    USA_TO_JPN,
    World,
    await_for,
    fetch,
    msmt,
    readyz,
    reload_hub,
    wait_for,
)
from structlog.testing import capture_logs

import broker.node_base
from broker import keys
from broker.natsusers import load_users
from broker.node import Node
from broker.node_base import INBOX_UNSERVED, NATS_REFUSED
from broker.node_start import load_node

pytestmark = pytest.mark.integration

TRIES: int = 10
"""How many refused tries the hub logs before a test looks: about five seconds' worth."""


def _hub_refusals(world: World) -> int:
    # The hub's own line for each refused connect: one per try.
    return world.server.log_path.read_text().count("authentication error")


def _readyz_text(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return str(answer.read().decode())
    except urllib.error.HTTPError as refused:
        return str(refused.read().decode())


def _another_user() -> str:
    return keys.nats_public(keys.new_nats_seed(), "a fresh seed")


@contextlib.asynccontextmanager
async def _usa_refused(
    world: World,
) -> AsyncIterator[tuple[Node, list[MutableMapping[str, Any]], dict[str, str]]]:
    """USA's node run in process, once the hub (reloaded without its user) refuses it.

    Yields the node, the log lines captured (every ``node_error`` among them: a
    refusal going that way, once a minute, could not show within a test otherwise)
    and the hub's users as they were; stops the node after.
    """
    world.write_config("USA", USA_TO_JPN)
    users = load_users(world.keydir)
    with capture_logs() as logs:
        usa = load_node(world.config("USA"))
        usa._error_log.period = 0
        task = asyncio.create_task(usa.run())
        try:
            await await_for(lambda: usa.ready() is None, 30, "USA ready")
            # The hub's users no longer hold USA's key (a suspension, a replaced user).
            await asyncio.to_thread(reload_hub, world.server, {**users, "USA": _another_user()})
            await await_for(lambda: usa.ready() == NATS_REFUSED, 20, "USA refused")
            yield usa, logs, users
        finally:
            usa.stop.set()
            await task


async def test_a_hub_that_stops_taking_a_running_nodes_user_is_said_once_and_nothing_is_lost(
    world: World,
) -> None:
    async with _usa_refused(world) as (usa, logs, users):
        usa_user = users["USA"]
        records = world.records_released_to("USA", ["JPN"], 6, seed=97)
        answers = await world.submit("USA", records)
        assert {a["status"] for a in answers} == {"accepted"}
        before = _hub_refusals(world)
        await await_for(lambda: _hub_refusals(world) >= before + TRIES, 30, "tries refused")
        await await_for(
            lambda: "(Authorization Violation)" in world.state("USA").get("nats_refused", ""),
            10,
            "USA's status",
        )
        assert world.state("USA")["nats_refused"].startswith("since ")
        registry = usa.metrics.registry
        assert registry.get_sample_value("msmt_nats_credentials_refused") == 1
        assert registry.get_sample_value("msmt_nats_connected") == 0
        assert usa.stop.is_set() is False  # it keeps trying: a reload may let it in
        assert await world.stream_messages("JPN") == 0

        await asyncio.to_thread(reload_hub, world.server, users)  # USA's user is back
        await await_for(lambda: usa.ready() is None, 30, "USA back")
        await world.outbox_sent("USA")
        assert await world.stream_messages("JPN") == len(records)
        await await_for(lambda: world.state("USA").get("nats_refused") == "", 10, "USA's status")
        assert registry.get_sample_value("msmt_nats_credentials_refused") == 0
    events = [e["event"] for e in logs]
    assert events.count("nats_credentials_refused") == 1, events
    assert events.count("nats_credentials_accepted") == 1, events
    began = events.index("nats_credentials_refused")
    ended = events.index("nats_credentials_accepted")
    refused, accepted = logs[began], logs[ended]
    assert refused["nats_user"] == usa_user
    assert f"must list USA's NATS key {usa_user}" in refused["error"]
    assert str(world.config("USA").seed_path) in refused["error"]
    assert "docs/KEYS.md" in refused["error"]
    assert accepted["refusals"] > 1  # the tries the hub refused, as nats-py reported them
    # Nothing else about it meanwhile: no line per try, nor the resets that close them.
    assert [e for e in logs[began:ended] if e["event"] == "node_error"] == []


def test_a_node_started_with_a_seed_the_hub_lacks_says_so_once_and_a_reload_lets_it_in(
    world: World,
) -> None:
    world.write_config("JPN", BATCH_POLICY)
    seed = world.root / "another.nk"
    seed.write_bytes(keys.new_nats_seed() + b"\n")
    seed.chmod(0o600)
    user = keys.nats_public(seed.read_bytes(), str(seed))
    world.start("JPN", ready=False, MSMT_NATS_SEED_FILE=str(seed))
    config = world.config("JPN")
    log = world.root / "JPN.log"
    wait_for(lambda: "nats_credentials_refused" in log.read_text(), 30, "the refusal")
    before = _hub_refusals(world)
    wait_for(lambda: _hub_refusals(world) >= before + TRIES, 30, "tries refused")
    assert world.procs["JPN"].poll() is None  # still running, trying again
    assert _readyz_text(config.metrics.port) == f"not ready: {NATS_REFUSED}\n"
    metrics = fetch(f"http://127.0.0.1:{config.metrics.port}/metrics")
    assert "\nmsmt_nats_credentials_refused 1.0\n" in metrics

    def status() -> dict[str, str]:
        done = msmt("status", "--config", str(world.config_path("JPN")), "--json")
        assert done.returncode == 0, done.stderr
        answer: dict[str, str] = json.loads(done.stdout)
        return answer

    wait_for(lambda: user in status()["nats_refused"], 10, "JPN's status")
    lines = [json.loads(line) for line in log.read_text().splitlines() if line[:1] == "{"]
    events = [line["event"] for line in lines]
    assert events.count("nats_credentials_refused") == 1, events
    began = events.index("nats_credentials_refused")
    assert f"must list JPN's NATS key {user} (the public key of {seed})" in lines[began]["error"]
    assert "node_error" not in events[began:], events

    # The hub operator lists this key (a replaced user: a reload is enough).
    reload_hub(world.server, {**load_users(world.keydir), "JPN": user})
    wait_for(lambda: readyz(config.metrics.port), 30, "JPN connected and ready")
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line[:1] == "{"]
    assert events.count("nats_credentials_refused") == 1, events
    assert events.count("nats_credentials_accepted") == 1, events
    assert "\nmsmt_nats_credentials_refused 0.0\n" in fetch(
        f"http://127.0.0.1:{config.metrics.port}/metrics"
    )
    assert world.terminate("JPN") == 0
    assert status()["nats_refused"] == ""


class _Resetter:
    """Listens on the hub's port and resets every connection at once: not a refusal."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.count = 0
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            self.count += 1

    def close(self) -> None:
        self.done = True
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("then", ["resets", "down"])
async def test_a_refusal_ends_when_the_hub_fails_otherwise(
    world: World, then: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review: once refused, every later failure read as the refusal until a connect
    # succeeded: a hub that then reset each connection said nothing at all, and one
    # gone down kept the refusal in the status, the gauge and the alert (which told
    # the operator to mend a users file that was fine). A reset comes as a refusal's
    # echo only soon after one (here 1 s, for the test); anything else ends it.
    monkeypatch.setattr(broker.node_base, "REFUSAL_ECHO_S", 1.0)
    resetter = None
    async with _usa_refused(world) as (usa, logs, _):
        try:
            await asyncio.to_thread(world.server.kill)
            if then == "resets":
                resetter = _Resetter(world.server.port)
            await await_for(lambda: usa.ready() == "not connected to NATS", 20, "refusal over")
            gauge = usa.metrics.registry.get_sample_value("msmt_nats_credentials_refused")
            assert gauge == 0
            assert usa._nats_refused == ""
            over = [e for e in logs if e["event"] == "nats_credentials_refusal_over"]
            assert len(over) == 1, over
            # What fails now is said as itself.
            word = "ConnectionResetError" if then == "resets" else "Connect"
            await await_for(
                lambda: any(
                    e["event"] == "node_error" and word in str(e.get("error")) for e in logs
                ),
                20,
                "the new failure logged",
            )
            assert "Authorization Violation" not in usa._last_error
        finally:
            if resetter is not None:
                resetter.close()


async def test_a_member_added_back_by_a_reload_is_told_the_hub_needs_a_restart(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A suspension drops the member's account from the hub's configuration; its return
    # adds it back. On nats-server 2.15 an account a reload adds back lets the node in
    # (nats_credentials_accepted) and answers for its consumer, but serves no pull
    # (503) and no publish (NoStreamResponseError), its partners' to it included, until
    # the hub restarts. The node said nothing of it: /readyz "inbox consumer not
    # bound", and a status error "pull: status 503 \nNats-Subject: ..." naming no cause.
    # Said once it has lasted (a cluster electing a consumer leader answers 503 too).
    monkeypatch.setattr(broker.node_base, "UNSERVED_AFTER_S", 2.0)  # 20 s in a node
    world.write_config("USA", USA_TO_JPN)
    users = load_users(world.keydir)
    with capture_logs() as logs:
        usa = load_node(world.config("USA"))
        task = asyncio.create_task(usa.run())
        try:
            await await_for(lambda: usa.ready() is None, 30, "USA ready")
            suspended = {a: u for a, u in users.items() if a != "USA"}
            await asyncio.to_thread(reload_hub, world.server, suspended)
            await await_for(lambda: usa.ready() == NATS_REFUSED, 20, "USA refused")
            records = world.records_released_to("USA", ["JPN"], 3, seed=97)
            answers = await world.submit("USA", records)
            assert {a["status"] for a in answers} == {"accepted"}
            await asyncio.to_thread(reload_hub, world.server, users)  # USA returns
            await await_for(lambda: usa.ready() == INBOX_UNSERVED, 30, "USA unserved")
            await await_for(
                lambda: "restarts every hub server" in world.state("USA")["last_error"],
                10,
                "USA's status",
            )
            assert await world.stream_messages("JPN") == 0
            await asyncio.to_thread(world.server.restart)  # as docs/KEYS.md says
            await await_for(lambda: usa.ready() is None, 30, "USA served")
            await world.outbox_sent("USA")
            assert await world.stream_messages("JPN") == len(records)
        finally:
            usa.stop.set()
            await task
    events = [e["event"] for e in logs]
    assert events.count("inbox_unserved") == 1, events
    assert events.count("inbox_served") == 1, events
    accepted = events.index("nats_credentials_accepted")
    unserved = events.index("inbox_unserved")
    assert accepted < unserved < events.index("inbox_served")
    line = logs[unserved]["error"]
    assert "account USA was most likely added by a configuration reload" in line
    assert "restarts every hub server" in line
