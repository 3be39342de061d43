"""Isolation between members, proven against a real nats-server with the generated config.

Every denial is asserted twice: the server reports the permission violation to the
offending client, and nothing reaches the victim (inbox counts, consumer state,
and a reply subscription that must stay empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from node_world import running_hub

from broker import keys, keys_custodian, natsconfig, natsetup, natsusers
from broker.errors import UsageError
from broker.natsproc import NatsServer

pytestmark = pytest.mark.integration

MEMBERS3 = ("JPN", "USA", "KOR")


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("isolation") / "keys"
    keys_custodian.init_keys(path, MEMBERS3)
    return path


@pytest.fixture
def hub(keydir: Path, tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh server with the generated accounts, each inbox and the archive set up."""
    with running_hub(keydir, tmp_path / "hub") as server:
        for account in (*MEMBERS3, "AUDIT"):
            seed = (keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()
            limits = natsetup.InboxLimits(max_bytes=16 * 1024 * 1024)
            asyncio.run(natsetup.setup_account(server.url, account, seed, limits))
        yield server


Connect = Callable[[str], Awaitable["Conn"]]


@dataclass
class Conn:
    """A connected account user that records every error the server sends it."""

    nc: Client
    errors: list[str] = field(default_factory=list)

    async def violation(self, text: str) -> None:
        """Wait until the server has reported a permission violation naming ``text``."""
        wanted = f"permissions violation for {text}".lower()
        for _ in range(100):
            if any(wanted in e for e in self.errors):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {wanted!r} among {self.errors}")


@pytest.fixture
async def connect(hub: NatsServer, keydir: Path) -> AsyncIterator[Connect]:
    opened: list[Client] = []

    async def _connect(account: str) -> Conn:
        conn = Conn(nc=None)  # type: ignore[arg-type]

        async def on_error(exc: Exception) -> None:
            conn.errors.append(str(exc).lower())

        seed = (keydir / account / keys.NATS_SEED_FILE).read_text().strip()
        conn.nc = await nats.connect(
            hub.url,
            nkeys_seed_str=seed,
            inbox_prefix=natsconfig.inbox_prefix(account),
            error_cb=on_error,
            allow_reconnect=False,
        )
        opened.append(conn.nc)
        return conn

    yield _connect
    for nc in opened:
        await nc.close()


async def inbox_count(conn: Conn, member: str) -> int:
    info = await conn.nc.jetstream().stream_info(natsconfig.inbox_stream(member))
    return int(info.state.messages)


async def test_publish_reaches_each_partner_under_the_server_attested_sender(
    connect: Connect,
) -> None:
    jpn, usa, kor = [await connect(m) for m in MEMBERS3]
    js = jpn.nc.jetstream()
    ack = await js.publish("msmt.to.USA.vessel", b"ct1", headers={"Nats-Msg-Id": "r1.USA"})
    assert ack.stream == "INBOX_USA"
    assert ack.seq == 1
    assert not ack.duplicate
    ack = await js.publish("msmt.to.KOR.worker", b"ct2", headers={"Nats-Msg-Id": "r1.KOR"})
    assert ack.stream == "INBOX_KOR"
    # A resend after a crash is acked as a duplicate and stored once.
    again = await js.publish("msmt.to.USA.vessel", b"ct1", headers={"Nats-Msg-Id": "r1.USA"})
    assert again.duplicate
    assert again.seq == 1
    for conn, member, subject, data in (
        (usa, "USA", "from.JPN.msmt.to.USA.vessel", b"ct1"),
        (kor, "KOR", "from.JPN.msmt.to.KOR.worker", b"ct2"),
    ):
        sub = await conn.nc.jetstream().pull_subscribe_bind(
            natsconfig.inbox_durable(member), stream=natsconfig.inbox_stream(member)
        )
        (msg,) = await sub.fetch(1, timeout=5)
        assert msg.subject == subject
        assert msg.data == data
        await msg.ack_sync()
        info = await conn.nc.jetstream().consumer_info(
            natsconfig.inbox_stream(member), natsconfig.inbox_durable(member)
        )
        assert info.num_pending == 0
        assert info.num_ack_pending == 0
    # Acked by the node: the hub forgets it (interest retention).
    assert await inbox_count(usa, "USA") == 0
    assert jpn.errors == []


@pytest.mark.parametrize(
    ("who", "subject"),
    [
        ("JPN", "from.KOR.msmt.to.USA.vessel"),  # forged sender prefix, sender's account
        ("USA", "from.KOR.msmt.to.USA.vessel"),  # forged straight into its own inbox
        ("USA", "msmt.in.USA.KOR.vessel"),
        ("JPN", "msmt.to.JPN.vessel"),  # not a partner: no route to itself
        ("JPN", "msmt.audit.KOR.checkpoint"),  # another member's audit channel
    ],
)
async def test_no_member_can_publish_as_another(connect: Connect, who: str, subject: str) -> None:
    sender = await connect(who)
    usa, audit = await connect("USA"), await connect("AUDIT")
    await sender.nc.publish(subject, b"forged")
    await sender.nc.flush()
    await sender.violation(f'publish to "{subject}"')
    assert await inbox_count(usa, "USA") == 0
    for member in MEMBERS3:
        archive = await audit.nc.jetstream().stream_info(natsconfig.archive_stream(member))
        assert archive.state.messages == 0


@pytest.mark.parametrize(
    "subject",
    [
        "$JS.API.CONSUMER.MSG.NEXT.INBOX_USA.USA_NODE",  # pull from USA's consumer
        "$JS.API.STREAM.MSG.GET.INBOX_USA",  # stream-get from USA's inbox
        "$JS.API.DIRECT.GET.INBOX_USA",
        "$JS.API.STREAM.INFO.INBOX_USA",
        "$JS.API.CONSUMER.CREATE.INBOX_USA.thief",
        "$JS.API.STREAM.LIST",  # no JetStream API wholesale
        "$JS.API.STREAM.DELETE.INBOX_JPN",  # not even on its own inbox
        "$JS.API.STREAM.PURGE.INBOX_JPN",
        "$JS.API.STREAM.MSG.DELETE.INBOX_JPN",
        "$JS.API.CONSUMER.DELETE.INBOX_JPN.JPN_NODE",
        "$SYS.REQ.SERVER.PING",
    ],
)
async def test_no_member_can_reach_another_inbox_or_foreign_api(
    connect: Connect, subject: str
) -> None:
    jpn, usa = await connect("JPN"), await connect("USA")
    await jpn.nc.jetstream().publish("msmt.to.USA.vessel", b"secret", headers={"Nats-Msg-Id": "x"})
    replies: list[Msg] = []

    async def got(msg: Msg) -> None:
        replies.append(msg)

    inbox = jpn.nc.new_inbox()
    await jpn.nc.subscribe(inbox, cb=got)
    request = json.dumps({"batch": 1, "seq": 1, "last_by_subj": "from.JPN.msmt.to.USA.vessel"})
    await jpn.nc.publish(subject, request.encode(), reply=inbox)
    await jpn.nc.flush()
    await jpn.violation(f'publish to "{subject}"')
    await asyncio.sleep(0.1)
    assert replies == []
    consumer = await usa.nc.jetstream().consumer_info("INBOX_USA", "USA_NODE")
    assert consumer.delivered.stream_seq == 0  # nothing was pulled on USA's behalf
    assert consumer.num_pending == 1
    assert await inbox_count(usa, "USA") == 1
    assert await inbox_count(jpn, "JPN") == 0


@pytest.mark.parametrize(
    "subject", ["_INBOX_USA.>", "from.>", "from.JPN.msmt.to.USA.>", "msmt.to.USA.>", ">"]
)
async def test_no_member_can_subscribe_outside_its_own_inbox(
    connect: Connect, subject: str
) -> None:
    jpn, kor = await connect("JPN"), await connect("KOR")
    seen: list[Msg] = []

    async def got(msg: Msg) -> None:
        seen.append(msg)

    await jpn.nc.subscribe(subject, cb=got)
    await jpn.nc.flush()
    await jpn.violation(f'subscription to "{subject}"')
    await kor.nc.jetstream().publish("msmt.to.USA.vessel", b"ct", headers={"Nats-Msg-Id": "k1"})
    await asyncio.sleep(0.1)
    assert seen == []


@pytest.mark.parametrize("credential", ["unknown nkey", "none"])
async def test_wrong_or_missing_nkey_cannot_connect(hub: NatsServer, credential: str) -> None:
    seed = keys.new_nats_seed().decode() if credential == "unknown nkey" else None
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = Client()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nc.connect(
            hub.url,
            nkeys_seed_str=seed,
            error_cb=on_error,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )
    await nc.close()  # nats-py leaves the socket of a refused first connect open
    assert not nc.is_connected
    assert any("Authorization Violation" in e for e in errors)


async def test_checkpoints_reach_every_member_and_the_archive(connect: Connect) -> None:
    jpn, usa, kor, audit = [await connect(a) for a in (*MEMBERS3, "AUDIT")]
    queues: dict[str, asyncio.Queue[Msg]] = {}
    for name, conn in (("USA", usa), ("KOR", kor)):
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        queues[name] = queue
        await conn.nc.subscribe("msmt.audit.*.checkpoint", cb=queue.put)
        await conn.nc.flush()
    # A subscription reaches the exporting account a moment after its flush, and
    # a core publish before then is dropped: publish again until both have it
    # (bounded). The message id keeps the archive at one copy of each.
    pending = dict(queues)
    for _ in range(20):
        await jpn.nc.publish("msmt.audit.JPN.checkpoint", b"note", headers={"Nats-Msg-Id": "cp"})
        await jpn.nc.flush()
        for name, queue in list(pending.items()):
            with contextlib.suppress(TimeoutError):
                msg = await asyncio.wait_for(queue.get(), 0.5)
                assert msg.subject == "msmt.audit.JPN.checkpoint"
                assert msg.data == b"note"
                del pending[name]
        if not pending:
            break
    assert not pending, f"no checkpoint reached {sorted(pending)}"
    await jpn.nc.publish("msmt.audit.JPN.cosignature", b"cosig", headers={"Nats-Msg-Id": "co"})
    await jpn.nc.flush()
    js = audit.nc.jetstream()
    archive = natsconfig.archive_stream("JPN")
    for _ in range(100):
        info = await js.stream_info(archive)
        if info.state.messages == 2:
            break
        await asyncio.sleep(0.02)
    assert info.state.messages == 2
    assert info.config.deny_delete
    assert info.config.deny_purge
    await audit.nc.publish(f"$JS.API.STREAM.PURGE.{archive}", b"")
    await audit.violation(f'publish to "$js.api.stream.purge.{archive}"')


async def test_witness_asks_a_log_for_a_proof_and_only_the_log_answers(connect: Connect) -> None:
    jpn, kor = await connect("JPN"), await connect("KOR")

    async def answer(msg: Msg) -> None:
        await jpn.nc.publish(msg.reply, b"proof for " + msg.data)

    await jpn.nc.subscribe("msmt.audit.JPN.proof", cb=answer)
    await jpn.nc.flush()
    # JPN's interest reaches KOR's service import asynchronously: on a loaded
    # machine the first request can still find no responder.
    reply: Msg | None = None
    for _ in range(100):
        try:
            reply = await kor.nc.request("msmt.audit.JPN.proof", b"8..12", timeout=5)
            break
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.05)
    assert reply is not None
    assert reply.data == b"proof for 8..12"
    # KOR cannot pose as JPN's proof service.
    await kor.nc.subscribe("msmt.audit.JPN.proof")
    await kor.nc.flush()
    await kor.violation('subscription to "msmt.audit.jpn.proof"')


def test_server_refuses_an_import_of_another_senders_slot(keydir: Path, tmp_path: Path) -> None:
    """account_token_position is what stops KOR from sending as JPN; the server enforces it."""
    users = natsusers.load_users(keydir)
    accounts = {m: natsconfig.member_account(m, users[m], MEMBERS3) for m in MEMBERS3}
    accounts["KOR"]["imports"].append(
        {"service": {"account": "USA", "subject": "from.JPN.msmt.to.USA.>"}, "to": "forge.>"}
    )
    accounts["AUDIT"] = natsconfig.audit_account(users["AUDIT"], MEMBERS3)
    text = f"accounts: {json.dumps(accounts)}\nsystem_account: SYS\n"
    text = text.replace('"AUDIT": {', '"SYS": {}, "AUDIT": {', 1)
    server = NatsServer(workdir=tmp_path / "forged", extra_config=text)
    with pytest.raises(UsageError, match="service import not authorized"):
        server.start(timeout=10)
    server.kill()
