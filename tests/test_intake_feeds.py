"""Named feeds at the intake: each feed's token, its name in the audit log, revocation live.

The intake app on a real unix socket with a real SQLite store, then a real
``msmt node run`` against a real hub, fed with ``msmt submit --token-file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from node_world import (
    REPO,
    World,
    audit_entries,
    msmt,
    records_for,
    setup_accounts,
    start_hub,
    wait_for,
    write_node_config,
)
from structlog.testing import capture_logs

from broker import feeds, keys, keys_custodian, samples
from broker.config import NodeConfig
from broker.errors import UsageError
from broker.intake import Intake, ensure_token, make_app, serve_unix, submit
from broker.store import NewReport, Store

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


class Served:
    """The intake app of one data directory, serving on its socket; what it accepted, by feed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = Store(root / "s.db")
        self.token = ensure_token(root / "intake.token")
        self.feeds_path = root / "intake-feeds.json"
        self.socket = root / "intake.sock"
        self.accepted: list[tuple[str, str]] = []  # (feed, report id)

        async def acceptor(batch: list[NewReport], feed: str) -> list[bool]:
            fresh = await asyncio.to_thread(lambda: self.store.accept(batch, feed=feed))
            self.accepted += [
                (feed, r.report_id) for r, new in zip(batch, fresh, strict=True) if new
            ]
            return fresh

        self.intake = Intake("JPN", 65536, acceptor)
        self.runner: web.AppRunner | None = None

    async def send(self, token: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        body = samples.to_ndjson(records).encode()
        await submit(self.socket, token, one_chunk(body), answers.append)
        return answers


async def one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    it = Served(tmp_path)
    it.runner = await serve_unix(
        make_app(it.intake, it.token, feeds.FeedTokens(it.feeds_path)), it.socket
    )
    try:
        yield it
    finally:
        await it.runner.cleanup()  # again after a test's own: a no-op
        it.store.close()


def records(count: int, seed: int) -> list[dict[str, Any]]:
    return records_for("JPN", count, seed)


async def test_each_feed_is_named_in_what_it_sends_and_revoked_ones_refused_at_once(
    served: Served,
) -> None:
    ais = feeds.add(served.feeds_path, "jpn-ais", NOW)  # added while serving
    case = feeds.add(served.feeds_path, "case-sys", NOW)
    first, second, third, fourth = (records(1, seed) for seed in (1, 2, 3, 6))
    with capture_logs() as logs:
        assert [a["status"] for a in await served.send(ais, first)] == ["accepted"]
        assert [a["status"] for a in await served.send(case, second)] == ["accepted"]
        assert [a["status"] for a in await served.send(served.token, third)] == ["accepted"]
        feeds.revoke(served.feeds_path, "jpn-ais", NOW)
        for _ in range(2):
            with pytest.raises(UsageError, match="refused the intake token"):
                await served.send(ais, records(1, 4))
        with pytest.raises(UsageError, match="refused the intake token"):
            await served.send("never-a-token-of-any-feed-0123456789", records(1, 5))
        # The others are untouched by one feed's revocation.
        assert [a["status"] for a in await served.send(case, fourth)] == ["accepted"]
    assert served.accepted == [
        ("socket:jpn-ais", first[0]["report_id"]),
        ("socket:case-sys", second[0]["report_id"]),
        ("socket", third[0]["report_id"]),
        ("socket:case-sys", fourth[0]["report_id"]),
    ]
    assert len(served.store.unplanned(10)) == 4
    assert served.intake.counts == {"accepted": 4, "token": 3}
    assert served.intake.feed_counts == {
        "socket:jpn-ais.accepted": 1,
        "socket:case-sys.accepted": 2,
        "socket.accepted": 1,
        "socket:jpn-ais.revoked": 2,
    }
    # One throttled warning; it names the revoked feed (the operator's own name,
    # in the audit log anyway), never a token sent or held.
    (warning,) = [e for e in logs if e["event"] == "intake_token_refused"]
    assert warning["requests"] == {"revoked feed token": 1}
    assert warning["revoked_feeds"] == ["jpn-ais"]
    for token in (ais, case, served.token, "never-a-token-of-any-feed"):
        assert token not in json.dumps(logs, default=str)


async def test_a_feed_revoked_while_streaming_gets_nothing_more_accepted(served: Served) -> None:
    token = feeds.add(served.feeds_path, "jpn-ais", NOW)
    sent = records(2, 7)
    revoked = asyncio.Event()

    async def stream() -> AsyncIterator[bytes]:
        yield samples.to_ndjson(sent[:1]).encode()
        await revoked.wait()
        yield samples.to_ndjson(sent[1:]).encode()

    answers: list[dict[str, Any]] = []

    def on_answer(answer: dict[str, Any]) -> None:
        answers.append(answer)
        feeds.revoke(served.feeds_path, "jpn-ais", NOW)
        revoked.set()

    with pytest.raises(UsageError, match="ended the request before answering every record"):
        await asyncio.wait_for(submit(served.socket, token, stream(), on_answer), 30)
    assert [(a["line"], a["status"]) for a in answers] == [(1, "accepted")]
    assert served.accepted == [("socket:jpn-ais", sent[0]["report_id"])]
    assert [r for r, _ in served.store.unplanned(10)] == [sent[0]["report_id"]]


async def test_an_unfit_feeds_file_shuts_out_every_named_feed_but_not_intake_token(
    served: Served,
) -> None:
    token = feeds.add(served.feeds_path, "jpn-ais", NOW)
    served.feeds_path.chmod(0o644)
    with capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(UsageError, match="refused the intake token"):
                await served.send(token, records(1, 8))
        assert [a["status"] for a in await served.send(served.token, records(1, 9))] == ["accepted"]
        served.feeds_path.chmod(0o600)
        assert [a["status"] for a in await served.send(token, records(1, 10))] == ["accepted"]
    (error,) = [e for e in logs if e["event"] == "intake_feeds_unreadable"]
    assert error["reason"] == (
        f"feeds file {served.feeds_path} is open to other users (mode 0644): chmod 600 it"
    )
    assert [f for f, _ in served.accepted] == ["socket", "socket:jpn-ais"]
    assert token not in json.dumps(logs, default=str)


async def test_with_the_shared_token_off_it_is_refused_saying_why_and_named_feeds_get_in(
    tmp_path: Path,
) -> None:
    it = Served(tmp_path)
    ais = feeds.add(it.feeds_path, "jpn-ais", NOW)
    off = "this node refuses the shared intake.token (intake.shared_token = false)"
    # The node's token from before is known, so its holder is told why; without
    # one (deleted), the shared token is any wrong token.
    for known, reason in ((it.token, off), (None, "missing or wrong bearer token")):
        app = make_app(it.intake, known, feeds.FeedTokens(it.feeds_path), shared=False)
        runner = await serve_unix(app, it.socket)
        try:
            with capture_logs() as logs, pytest.raises(UsageError) as info:
                await it.send(it.token, records(1, 20))
            assert str(info.value).startswith(
                f"the node at {it.socket} refused the intake token: {reason}"
            )
            accepted = await it.send(ais, records(1, 21 + (known is None)))
            assert [a["status"] for a in accepted] == ["accepted"]
        finally:
            await runner.cleanup()
        (warning,) = [e for e in logs if e["event"] == "intake_token_refused"]
        assert warning["requests"] == {"shared token off" if known else "wrong token": 1}
    assert [f for f, _ in it.accepted] == ["socket:jpn-ais", "socket:jpn-ais"]
    assert it.intake.counts == {"accepted": 2, "token": 2}
    it.store.close()


# --- a real node ------------------------------------------------------------------

POLICY = """
version = 1
member = "JPN"

[[rules]]
name = "all-to-USA"
kinds = ["*"]
partners = ["USA"]
release = ["*"]
"""


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[World]:
    """Keys for JPN and USA, a hub with their accounts, and JPN's node config; no node yet."""
    keydir, server = start_hub(tmp_path, ("JPN", "USA"))
    world = World(tmp_path, keydir, server)
    try:
        setup_accounts(server.url, keydir, ("JPN", "USA", keys.AUDIT_ACCOUNT))
        world.write_config("JPN", POLICY)
        yield world
    finally:
        for member in list(world.procs):
            world.kill(member)
        server.kill()


def _with_ais_feed(pair: World, tmp_path: Path) -> tuple[str, NodeConfig, Path]:
    """JPN's node.toml, its configuration, and the token file of feed jpn-ais added to it."""
    config = str(pair.config_path("JPN"))
    ais_file = tmp_path / "ais.token"
    added = msmt("feeds", "add", "jpn-ais", "--config", config, "--out", str(ais_file))
    assert added.returncode == 0, added.stderr
    return config, pair.config("JPN"), ais_file


def _submit(config: str, batch: list[dict[str, Any]], *token: str) -> Any:
    """``msmt submit`` of ``batch`` to the node of ``config`` (``--token-file FILE`` or none)."""
    return msmt("submit", "--config", config, *token, "-", stdin=samples.to_ndjson(batch).encode())


def _status(config: str) -> dict[str, Any]:
    out = msmt("status", "--config", config, "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_a_node_audits_each_feed_by_name_and_cuts_one_off_without_a_restart(
    pair: World, tmp_path: Path
) -> None:
    config, jpn, ais_file = _with_ais_feed(pair, tmp_path)
    pair.start("JPN")
    case = msmt("feeds", "add", "case-sys", "--config", config)  # while it runs
    assert case.returncode == 0, case.stderr
    case_file = tmp_path / "case.token"
    case_file.write_text(case.stdout)
    case_file.chmod(0o600)
    by_ais, by_case, by_shared, later = records(2, 1), records(1, 2), records(1, 3), records(1, 5)

    def send(batch: list[dict[str, Any]], *token: str) -> Any:
        return _submit(config, batch, *token)

    done = [
        send(by_ais, "--token-file", str(ais_file)),
        send(by_case, "--token-file", str(case_file)),
        send(by_shared),
    ]
    assert [d.returncode for d in done] == [0, 0, 0], [d.stderr for d in done]
    revoked = msmt("feeds", "revoke", "jpn-ais", "--config", config)
    assert revoked.returncode == 0, revoked.stderr
    refused = send(records(1, 4), "--token-file", str(ais_file))
    assert refused.returncode == 2
    assert refused.stderr == (
        f"msmt: error: the node at {jpn.socket_path} refused the intake token:"
        " missing or wrong bearer token\n"
    )
    still = send(later, "--token-file", str(case_file))
    assert still.returncode == 0, still.stderr

    accepted = [e for e in audit_entries(jpn.audit_dir) if e["type"] == "accepted"]
    assert sorted((e["feed"], e["report_id"]) for e in accepted) == sorted(
        [("socket:jpn-ais", r["report_id"]) for r in by_ais]
        + [("socket:case-sys", r["report_id"]) for r in by_case + later]
        + [("socket", r["report_id"]) for r in by_shared]
    )

    def status() -> dict[str, Any]:
        return _status(config)

    wait_for(lambda: "socket:jpn-ais" in status()["feeds"], 20, "the feeds in msmt status")
    wait_for(lambda: status()["feeds"]["socket:case-sys"]["accepted"] == 2, 20, "case-sys's count")
    shown = status()
    assert {k: {**v, "last_used": bool(v["last_used"])} for k, v in shown["feeds"].items()} == {
        "socket": {"accepted": 1, "rejected": 0, "revoked": 0, "last_used": True},
        "socket:case-sys": {"accepted": 2, "rejected": 0, "revoked": 0, "last_used": True},
        "socket:jpn-ais": {"accepted": 2, "rejected": 0, "revoked": 1, "last_used": True},
    }
    # RFC 3339 with "Z", as every other time shown (it was "+00:00" here alone).
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", v["last_used"])
        for v in shown["feeds"].values()
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", shown["updated_at"])
    assert shown["counters"]["intake.accepted"] == 5
    assert shown["counters"]["intake.token"] == 1
    assert not any(k.startswith("feed.") for k in shown["counters"])
    listed = msmt("feeds", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["case-sys", "jpn-ais", "(intake.token)"]
    assert "accepted 2, rejected 0, 1 request refused as revoked, last used 20" in lines[1]

    assert pair.terminate("JPN") == 0
    log = (tmp_path / "JPN.log").read_text()
    (warning,) = [json.loads(line) for line in log.splitlines() if '"intake_token_refused"' in line]
    assert warning["revoked_feeds"] == ["jpn-ais"]
    entries = msmt(
        "audit", "entries", str(jpn.audit_dir), "--keys", str(pair.keydir), "--type", "accepted"
    )
    assert entries.returncode == 0, entries.stderr
    assert entries.stdout.count("feed=socket:jpn-ais") == 2
    assert entries.stdout.count("feed=socket:case-sys") == 2
    assert entries.stdout.count("feed=socket ") + entries.stdout.count("feed=socket\n") == 1
    tokens = [ais_file.read_text().strip(), case.stdout.strip(), jpn.token_path.read_text()]
    seen = log + listed.stdout + listed.stderr + json.dumps(shown) + entries.stdout
    for token in tokens:
        assert token.strip() not in seen


@pytest.mark.parametrize(
    ("content", "mode", "reason"),
    [
        ('{"version": 1, "feeds": {}}', 0o640, "is open to other users (mode 0640): chmod 600 it"),
        ('{"version": 1, "feeds": {', 0o600, "is malformed: not valid JSON"),
        (
            json.dumps({"version": 1, "feeds": {"Socket": {}}}),
            0o600,
            "is malformed: 'Socket' is not a feed name",
        ),
    ],
)
def test_a_node_will_not_start_on_an_unfit_feeds_file(
    tmp_path: Path, content: str, mode: int, reason: str
) -> None:
    keys_custodian.init_keys(
        tmp_path / "keys", ("JPN", "USA"), now=datetime.now(UTC) - timedelta(days=1)
    )
    write_node_config(tmp_path, "JPN", ["nats://127.0.0.1:1"], POLICY)
    config = tmp_path / "nodes" / "JPN" / "node.toml"
    path = tmp_path / "data" / "JPN" / "intake-feeds.json"
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_text(content)
    path.chmod(mode)
    done = msmt("node", "run", "--config", str(config), timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"msmt: error: feeds file {path} {reason}"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "data" / "JPN" / "intake.sock").exists()


def test_a_node_with_the_shared_token_off_refuses_it_saying_why(
    pair: World, tmp_path: Path
) -> None:
    config, jpn, ais_file = _with_ais_feed(pair, tmp_path)
    shared = ensure_token(jpn.token_path)  # a node moving off it: made by its starts before
    with pair.config_path("JPN").open("a") as toml:
        toml.write("[intake]\nshared_token = false\n")
    pair.start("JPN")
    wrong = tmp_path / "wrong.token"
    wrong.write_text("never-a-token-of-any-feed-0123456789\n")
    wrong.chmod(0o600)
    by_ais = records(2, 30)

    def send(batch: list[dict[str, Any]], *token: str) -> Any:
        return _submit(config, batch, *token)

    done = send(by_ais, "--token-file", str(ais_file))
    assert done.returncode == 0, done.stderr
    # A feed still on the shared token (msmt submit without --token-file sends the
    # intake.token left from before) is told why by the node itself.
    refused = send(records(1, 32))
    assert (refused.returncode, refused.stderr) == (
        2,
        f"msmt: error: the node at {jpn.socket_path} refused the intake token: this node"
        " refuses the shared intake.token (intake.shared_token = false): send with the feed's"
        " own token (msmt feeds add)\n",
    )
    plain = send(records(1, 33), "--token-file", str(wrong))
    assert plain.stderr.endswith("refused the intake token: missing or wrong bearer token\n")

    def status() -> dict[str, Any]:
        return _status(config)

    wait_for(lambda: status()["counters"].get("intake.token") == 2, 20, "two refused tokens")
    shown = status()
    assert shown["shared_token"] == "off"
    assert set(shown["feeds"]) == {"socket:jpn-ais"}
    text = msmt("status", "--config", config).stdout
    assert "\nshared_token        off\n" in text
    listed = msmt("feeds", "list", "--config", config)
    assert listed.stdout.splitlines()[-1] == (
        f"{'(intake.token)':<24} off (intake.shared_token = false)"
    )
    assert pair.terminate("JPN") == 0
    log = (tmp_path / "JPN.log").read_text()
    warning = next(
        json.loads(line) for line in log.splitlines() if '"intake_token_refused"' in line
    )
    assert warning["requests"] == {"shared token off": 1}
    started = next(json.loads(line) for line in log.splitlines() if '"node_started"' in line)
    assert started["shared_token"] is False
    accepted = [e for e in audit_entries(jpn.audit_dir) if e["type"] == "accepted"]
    assert sorted((e["feed"], e["report_id"]) for e in accepted) == sorted(
        ("socket:jpn-ais", r["report_id"]) for r in by_ais
    )
    assert shared not in log
    # Set back (here by the environment), the shared token is let in again.
    pair.start("JPN", MSMT_INTAKE_SHARED_TOKEN="true")
    again = send(records(1, 34), "--token-file", str(jpn.token_path))
    assert again.returncode == 0, again.stderr
    wait_for(lambda: status()["shared_token"] != "off", 20, "the start's status")
    assert status()["shared_token"] == "on; node.toml says off: restart the node to apply it"


def _python_feed() -> str:
    """The Python feed docs/NODE.md shows, exactly as written there."""
    text = (REPO / "docs" / "NODE.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(# feed\.py .*?)```", text, re.DOTALL)
    return str(code)


async def test_the_python_feed_in_node_md_runs_as_written(served: Served, tmp_path: Path) -> None:
    # A feed trial wrote its feed from the docs alone and had to find the unix-socket
    # HTTPConnection itself; the page now shows one, which must keep working.
    script = tmp_path / "feed.py"
    script.write_text(_python_feed())
    token_file = tmp_path / "py.token"
    token_file.write_text(feeds.add(served.feeds_path, "py-feed", NOW) + "\n")
    first, second = records(2, seed=7)
    changed = {**second, "observed_at": "2026-11-01T10:00:00Z"}
    batch = [first, second, first, changed, {**first, "report_id": "not-a-uuid"}]
    path = tmp_path / "batch.ndjson"
    path.write_text(samples.to_ndjson(batch))

    def feed(token: Path) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(script), str(served.socket), str(token), str(path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    done = await asyncio.to_thread(feed, token_file)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == [
        f"1 done {first['report_id']}",
        f"2 done {second['report_id']}",
        f"3 done {first['report_id']}",
    ]  # a duplicate: accepted before
    assert lines[3].startswith(
        f"4 conflict report_id {second['report_id']} was accepted earlier with different"
        " content in observed_at;"
    )
    assert lines[4].startswith("5 schema [{'path': 'report_id'")
    assert len(lines) == 5
    assert served.accepted == [("socket:py-feed", r["report_id"]) for r in (first, second)]
    # A revoked token: the feed stops with the node's reason, and nothing is accepted.
    feeds.revoke(served.feeds_path, "py-feed", NOW)
    refused = await asyncio.to_thread(feed, token_file)
    assert refused.returncode == 1
    assert refused.stderr == 'refused: 401 {"error": "missing or wrong bearer token"}\n'
    assert len(served.accepted) == 2


async def test_the_python_feed_in_node_md_resends_what_a_request_ended_early_left(
    served: Served, tmp_path: Path
) -> None:
    # The node ends a request early cleanly (here: the feed revoked while its first
    # batch commits), so a feed must count answers; the page's first version exited 0.
    script = tmp_path / "feed.py"
    script.write_text(_python_feed())
    token_file = tmp_path / "py.token"
    token_file.write_text(feeds.add(served.feeds_path, "py-feed", NOW) + "\n")
    batch = records(600, seed=11)  # ~400 KB: more than one read of the socket
    path = tmp_path / "batch.ndjson"
    path.write_text(samples.to_ndjson(batch))
    commit = served.intake.acceptor

    async def revoke_then_commit(reports: list[NewReport], feed: str) -> list[bool]:
        feeds.revoke(served.feeds_path, "py-feed", NOW)
        return await commit(reports, feed)

    served.intake.acceptor = revoke_then_commit
    argv = [sys.executable, str(script), str(served.socket), str(token_file), str(path)]
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    answered = len(served.accepted)
    assert 0 < answered < len(batch)
    assert lines[:-1] == [f"{n} done {r['report_id']}" for n, r in enumerate(batch, 1)][:answered]
    assert lines[-1] == f"lines {answered + 1}-{len(batch)}: no answer, send them again"


def _wordy(record: dict[str, Any], fields: int) -> dict[str, Any]:
    """``record`` with ``fields`` unknown fields: answered ``schema`` naming each (~35 bytes)."""
    return {**record, **{f"x{n}": 1 for n in range(fields)}}


async def test_the_python_feed_in_node_md_reads_its_answers_while_it_sends(
    served: Served, tmp_path: Path
) -> None:
    # The node answers as it reads and stops reading while its answers go unread,
    # so a client that sends the whole body first waits for ever once the answers
    # fill the socket: the page's first feed did, past ~4,300 records here (~390 KB
    # of answers: the sockets' buffers and aiohttp's), with 6,000 waiting to be sent.
    script = tmp_path / "feed.py"
    script.write_text(_python_feed())
    token_file = tmp_path / "py.token"
    token_file.write_text(feeds.add(served.feeds_path, "py-feed", NOW) + "\n")
    good = records(4, seed=12)
    many = records(6000, seed=13)
    batch = [*good[:2], _wordy(many[0], 3), *many[1:], *good[2:]]
    path = tmp_path / "batch.ndjson"
    path.write_text(samples.to_ndjson(batch))
    argv = [sys.executable, str(script), str(served.socket), str(token_file), str(path)]
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(batch)
    assert lines[2].startswith("3 schema [{'path': 'x0', 'reason': 'unknown field'}")
    sent = [*good[:2], *many[1:], *good[2:]]
    numbers = [1, 2, *range(4, len(batch) + 1)]
    done_lines = [f"{n} done {r['report_id']}" for n, r in zip(numbers, sent, strict=True)]
    assert [*lines[:2], *lines[3:]] == done_lines
    assert served.accepted == [("socket:py-feed", r["report_id"]) for r in sent]


async def _answers_backed_up(
    served: Served,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A request whose answers fill the socket's buffers and aiohttp's, read by no one yet.

    Returns the connection and how many records the node answered before it stopped
    reading for want of room.
    """
    body = samples.to_ndjson([_wordy(r, 300) for r in records(600, seed=14)]).encode()
    head = (
        "POST /v1/reports HTTP/1.1\r\nHost: node\r\n"
        f"Authorization: Bearer {served.token}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_unix_connection(str(served.socket))
    writer.write(head + body)  # buffered here, sent as the node reads
    # Until the node has answered nothing for a second: its answers (~13 KB each)
    # fill the buffers, ~140 records' here.
    answered = [-1] * 10
    for _ in range(600):  # at most a minute
        await asyncio.sleep(0.1)
        answered.append(served.intake.counts.get("schema", 0))
        if answered[-1] > 0 and answered[-1] == answered[-11]:
            break
    assert 0 < answered[-1] == answered[-11] < 600  # blocked: the answers are not read
    return reader, writer, answered[-1]


def _ended(logs: Sequence[Mapping[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "intake_request_ended"]


async def _read_to_the_end(reader: asyncio.StreamReader) -> bytes:
    # The node closes the connection with the rest of the body unread, which resets it
    # once what it sent is read: what came before the reset is the answer.
    got = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := await reader.read(1 << 16):
            got += chunk
    return bytes(got)


async def test_a_stop_does_not_wait_for_a_feed_that_leaves_its_answers_unread(
    served: Served,
) -> None:
    # A feed that sends and never reads holds the node's answer write; a stop used
    # to wait out aiohttp's shutdown timeout (10 s, twice) and then cancel the
    # request mid-answer. It now drops the connection after ANSWER_GRACE_S.
    _, writer, answered = await _answers_backed_up(served)
    assert served.runner is not None
    try:
        with capture_logs() as logs:
            await served.runner.cleanup()
    finally:
        writer.transport.abort()
    assert _ended(logs) == ["node stopping; the feed left its answers unread"]
    assert served.intake.counts.get("schema", 0) == answered  # nothing more was read


async def test_a_stop_ends_cleanly_for_a_feed_that_reads_its_answers_late(
    served: Served,
) -> None:
    # A review of the cut-off: a feed that reads, only later than the node answers,
    # must not have its connection dropped because a write was waiting at the stop.
    reader, writer, answered = await _answers_backed_up(served)
    assert served.runner is not None
    with capture_logs() as logs:
        stopping = asyncio.create_task(served.runner.cleanup())
        await asyncio.sleep(0)  # the stop has begun: the feed reads only now
        got = await asyncio.wait_for(_read_to_the_end(reader), 60)
        await stopping
    writer.close()
    assert _ended(logs) == ["node stopping"]
    assert got.endswith(b"\r\n0\r\n\r\n")  # the last chunk: a clean end of the answers
    # Every answer the node gave reached the feed (chunked: counted by their start).
    assert got.count(b'{"line":') == served.intake.counts.get("schema", 0) >= answered
