"""A member with its own legitimate keys cannot take the hub's storage from the others.

Each test replays, small, an attack a red-team member (KOR) ran against the hub,
against a real nats-server with the generated configuration:

* flooding a partner's inbox until it refuses every partner's reports: what the
  node rejects (terminates) or accepts (acks) leaves the inbox at once;
* lifting its own inbox's limits and storing without bound: the account quota
  refuses;
* filling the shared audit archive so no one's checkpoints are archived: each
  member has its own archive.

Plus the ways ``msmt nats setup`` brings a hub made by an older version there,
losing nothing that was not read yet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig
from node_world import msmt, running_hub

from broker import hubusage, keys, keys_custodian, natsconfig, natsetup, natsusers
from broker.errors import ConfigError
from broker.members import MEMBERS
from broker.natsproc import NatsServer

pytestmark = pytest.mark.integration

MEMBERS3 = ("JPN", "USA", "KOR")
MiB = 1024**2
SMALL = natsetup.InboxLimits(max_bytes=1 * MiB)


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quota") / "keys"
    keys_custodian.init_keys(path, MEMBERS3)
    return path


@pytest.fixture
def hub(keydir: Path, tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh hub with the generated accounts; nothing set up yet."""
    with running_hub(keydir, tmp_path / "hub") as server:
        yield server


def seed(keydir: Path, account: str) -> bytes:
    return (keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()


@pytest.fixture
async def users(hub: NatsServer, keydir: Path) -> AsyncIterator[dict[str, Client]]:
    """A connection per account, as its own user."""
    conns = {
        a: await natsetup.connect_account(hub.url, a, seed(keydir, a))
        for a in (*MEMBERS3, keys.AUDIT_ACCOUNT)
    }
    try:
        yield conns
    finally:
        for nc in conns.values():
            await nc.close()


async def setup(hub: NatsServer, keydir: Path, account: str, **kw: object) -> list[str]:
    results = await natsetup.setup_account(hub.url, account, seed(keydir, account), **kw)  # type: ignore[arg-type]
    return [f"{r.kind} {r.name}: {r.action}" for r in results]


async def flood(nc: Client, subject: str, size: int) -> int:
    """Publish ``size``-byte garbage on ``subject`` until the hub refuses; return how many."""
    count = 0
    while True:
        try:
            await nc.jetstream().publish(subject, b"G" * size, timeout=5)
        except nats.js.errors.APIError:
            return count
        count += 1


async def inbox(nc: Client, member: str) -> tuple[int, int]:
    info = await nc.jetstream().stream_info(natsconfig.inbox_stream(member))
    return int(info.state.messages), int(info.state.bytes)


# -- A: a flooded inbox drains as its node rejects the flood -------------------------


async def test_a_flood_the_node_terminates_leaves_the_inbox(
    hub: NatsServer, keydir: Path, users: dict[str, Client]
) -> None:
    await setup(hub, keydir, "USA", limits=SMALL)
    kor, usa, jpn = users["KOR"], users["USA"], users["JPN"]
    sent = sum([await flood(kor, "msmt.to.USA.vessel", size) for size in (60 * 1024, 512, 1)])
    assert sent > 16
    with pytest.raises(nats.js.errors.APIError):  # full: every partner is refused now
        await jpn.jetstream().publish("msmt.to.USA.vessel", b"r", timeout=5)
    # USA's node verifies each and terminates it, as it does garbage.
    sub = await usa.jetstream().pull_subscribe_bind(
        natsconfig.inbox_durable("USA"), natsconfig.inbox_stream("USA")
    )
    terminated = 0
    while terminated < sent:
        for msg in await sub.fetch(64, timeout=5):
            await msg.term()
            terminated += 1
    await usa.flush()
    for _ in range(100):
        if await inbox(usa, "USA") == (0, 0):
            break
        await asyncio.sleep(0.02)
    assert await inbox(usa, "USA") == (0, 0)
    ack = await jpn.jetstream().publish(
        "msmt.to.USA.vessel", b"report", headers={"Nats-Msg-Id": "r1.USA"}, timeout=5
    )
    assert ack.stream == "INBOX_USA"
    assert not ack.duplicate


async def test_a_only_what_the_node_acked_or_terminated_leaves_the_inbox(
    hub: NatsServer, keydir: Path, users: dict[str, Client]
) -> None:
    await setup(hub, keydir, "USA", limits=SMALL)
    jpn, usa = users["JPN"].jetstream(), users["USA"]
    for i in range(4):
        await jpn.publish("msmt.to.USA.vessel", b"r%d" % i, headers={"Nats-Msg-Id": f"r{i}.USA"})
    sub = await usa.jetstream().pull_subscribe_bind(
        natsconfig.inbox_durable("USA"), natsconfig.inbox_stream("USA")
    )
    acked, terminated, held = await sub.fetch(3, timeout=5)  # r3 not even delivered
    await acked.ack_sync()
    await terminated.term()
    await held.nak(delay=60)  # a report held for a roster update
    await usa.flush()
    await asyncio.sleep(0.2)
    assert (await inbox(usa, "USA"))[0] == 2
    # The dedup window outlives the message: an outbox resend is still a duplicate.
    again = await jpn.publish("msmt.to.USA.vessel", b"r0", headers={"Nats-Msg-Id": "r0.USA"})
    assert again.duplicate


def old_inbox_config(member: str) -> StreamConfig:
    """The inbox as older versions made it: limits retention, kept after the node read it."""
    return dataclasses.replace(
        natsetup.inbox_stream_config(member, natsetup.InboxLimits()),
        retention=RetentionPolicy.LIMITS,
    )


async def test_a_setup_switches_an_old_inbox_in_place_keeping_what_was_not_read(
    hub: NatsServer, keydir: Path, users: dict[str, Client]
) -> None:
    usa, jpn = users["USA"], users["JPN"].jetstream()
    js = usa.jetstream()
    await js.add_stream(old_inbox_config("USA"))
    limits = natsetup.InboxLimits()
    await js.add_consumer("INBOX_USA", natsetup.inbox_consumer_config("USA", limits))
    for i in range(4):
        await jpn.publish("msmt.to.USA.vessel", b"r%d" % i, headers={"Nats-Msg-Id": f"r{i}.USA"})
    sub = await js.pull_subscribe_bind("USA_NODE", "INBOX_USA")
    first, second = await sub.fetch(2, timeout=5)
    await first.ack_sync()
    await second.term()
    await usa.flush()
    assert (await inbox(usa, "USA"))[0] == 4  # limits retention keeps what was read

    assert await setup(hub, keydir, "USA") == [
        "stream INBOX_USA: updated",
        "consumer USA_NODE: unchanged",
    ]
    info = await js.stream_info("INBOX_USA")
    assert info.config.retention == RetentionPolicy.INTEREST
    assert info.state.messages == 2
    unread = await sub.fetch(2, timeout=5)
    assert [m.data for m in unread] == [b"r2", b"r3"]
    assert await setup(hub, keydir, "USA") == [
        "stream INBOX_USA: unchanged",
        "consumer USA_NODE: unchanged",
    ]


async def test_a_an_old_inbox_without_its_consumer_loses_nothing_to_the_switch(
    hub: NatsServer, keydir: Path, users: dict[str, Client]
) -> None:
    # Interest retention drops what no consumer wants: setup makes the consumer first.
    usa = users["USA"]
    await usa.jetstream().add_stream(old_inbox_config("USA"))
    await users["JPN"].jetstream().publish("msmt.to.USA.vessel", b"r0")
    lines = await setup(hub, keydir, "USA")
    assert lines == ["stream INBOX_USA: updated", "consumer USA_NODE: created"]
    assert (await inbox(usa, "USA"))[0] == 1
    sub = await usa.jetstream().pull_subscribe_bind("USA_NODE", "INBOX_USA")
    (msg,) = await sub.fetch(1, timeout=5)
    assert msg.data == b"r0"


async def test_a_a_work_queue_inbox_is_refused_with_what_to_do(
    hub: NatsServer, keydir: Path, users: dict[str, Client]
) -> None:
    config = dataclasses.replace(old_inbox_config("USA"), retention=RetentionPolicy.WORK_QUEUE)
    await users["USA"].jetstream().add_stream(config)
    with pytest.raises(ConfigError, match=r"^stream INBOX_USA has work-queue retention.*again$"):
        await setup(hub, keydir, "USA")


# -- B: every account has a storage quota ---------------------------------------------


def test_b_every_account_has_a_bounded_file_quota_and_no_memory(keydir: Path) -> None:
    for replicas, quota in ((1, 256 * MiB), (3, 768 * MiB)):
        text = natsconfig.accounts_config(natsusers.load_users(keydir), replicas=replicas)
        accounts = json.loads(text.partition("accounts: ")[2].rpartition("system_account")[0])
        for name in MEMBERS3:
            assert accounts[name]["jetstream"] == {
                "max_mem": 0,
                "max_file": quota,
                "max_streams": 1,
                "max_consumers": 4,
                "max_bytes_required": True,
            }
        audit = accounts["AUDIT"]["jetstream"]
        assert audit["max_mem"] == 0
        assert audit["max_bytes_required"] is True
        assert audit["max_streams"] == len(MEMBERS) + 1
        assert audit["max_file"] == 2 * len(MEMBERS) * 32 * MiB * replicas


async def test_b_a_member_cannot_lift_its_inbox_past_the_quota(
    hub: NatsServer, keydir: Path, users: dict[str, Client]
) -> None:
    await setup(hub, keydir, "KOR", limits=SMALL)
    kor = users["KOR"]
    quota = natsconfig.account_quotas()[0].max_file

    async def update(**changes: object) -> dict[str, object]:
        info = json.loads((await kor.request("$JS.API.STREAM.INFO.INBOX_KOR", b"")).data)
        config = dict(info["config"], **changes)
        reply = await kor.request("$JS.API.STREAM.UPDATE.INBOX_KOR", json.dumps(config).encode())
        return dict(json.loads(reply.data))

    unbounded = await update(max_bytes=-1, subjects=["from.*.msmt.to.KOR.>", "msmt.to.JPN.bulk"])
    assert unbounded["error"]["err_code"] == 10113  # type: ignore[index]
    too_big = await update(max_bytes=quota + MiB)
    assert too_big["error"]["err_code"] == 10047  # type: ignore[index]
    assert "error" not in await update(max_bytes=quota)  # as far as it goes
    account = json.loads((await kor.request("$JS.API.INFO", b"")).data)
    assert account["limits"]["max_storage"] == quota
    assert account["limits"]["max_memory"] == 0


async def test_b_setup_past_the_quota_says_so_in_one_line(hub: NatsServer, keydir: Path) -> None:
    quota = natsconfig.account_quotas()[0].max_file
    limits = natsetup.InboxLimits(max_bytes=quota + MiB)
    with pytest.raises(ConfigError, match=r"^stream INBOX_KOR: the account's storage quota"):
        await setup(hub, keydir, "KOR", limits=limits)


# -- C: one archive per member --------------------------------------------------------


async def archived(audit: Client, member: str) -> int:
    info = await audit.jetstream().stream_info(natsconfig.archive_stream(member))
    return int(info.state.messages)


async def publish_until_archived(nc: Client, audit: Client, member: str, body: bytes) -> None:
    """Core publish (as nodes do) until the archive has one more; the import may lag a flush."""
    before = await archived(audit, member)
    for _ in range(50):
        await nc.publish(f"msmt.audit.{member}.checkpoint", body)
        await nc.flush()
        for _ in range(10):
            if await archived(audit, member) > before:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"{member}'s checkpoint never reached the archive")


async def test_c_a_member_that_fills_its_archive_leaves_the_others_archived(
    hub: NatsServer, keydir: Path, users: dict[str, Client]
) -> None:
    await setup(hub, keydir, "AUDIT", audit_max_bytes=1 * MiB)
    kor, jpn, audit = users["KOR"], users["JPN"], users["AUDIT"]
    await publish_until_archived(kor, audit, "KOR", b"KOR\n")
    # Past 1 MiB, then topped off with ever smaller ones so no gap is left.
    for size, count in ((15 * 1024, 80), (512, 40), (8, 300)):
        for _ in range(count):
            await kor.publish("msmt.audit.KOR.cosignature", b"KOR\n" + b"G" * size)
        await kor.flush()
    await asyncio.sleep(0.3)
    info = await audit.jetstream().stream_info(natsconfig.archive_stream("KOR"))
    assert info.state.bytes > 1 * MiB - 16 * 1024  # full
    await publish_until_archived(jpn, audit, "JPN", b"JPN checkpoint\n")
    assert await archived(audit, "JPN") == 1


async def test_c_setup_retires_the_shared_archive_keeping_its_content(
    hub: NatsServer, keydir: Path, users: dict[str, Client]
) -> None:
    audit, jpn = users["AUDIT"], users["JPN"]
    shared = StreamConfig(  # as older versions made it
        name=natsconfig.AUDIT_STREAM,
        subjects=["msmt.audit.*.checkpoint", "msmt.audit.*.cosignature"],
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.NEW,
        max_bytes=256 * MiB,
        deny_delete=True,
        deny_purge=True,
    )
    js = audit.jetstream()
    await js.add_stream(shared)
    for _ in range(50):
        await jpn.publish("msmt.audit.JPN.checkpoint", b"old checkpoint")
        await jpn.flush()
        await asyncio.sleep(0.05)
        if (await js.stream_info(natsconfig.AUDIT_STREAM)).state.messages:
            break
    lines = await setup(hub, keydir, "AUDIT")
    assert lines[0] == f"stream {natsconfig.AUDIT_STREAM}: retired"
    assert lines[1:] == [f"stream {natsconfig.archive_stream(m)}: created" for m in MEMBERS]
    old = await js.stream_info(natsconfig.AUDIT_STREAM)
    assert old.config.subjects == [natsetup.RETIRED_SUBJECT]
    kept = old.state.messages
    assert kept >= 1
    assert (await js.get_msg(natsconfig.AUDIT_STREAM, 1)).data == b"old checkpoint"
    await publish_until_archived(jpn, audit, "JPN", b"new checkpoint")
    assert (await js.stream_info(natsconfig.AUDIT_STREAM)).state.messages == kept
    again = await setup(hub, keydir, "AUDIT")
    assert again[0] == f"stream {natsconfig.AUDIT_STREAM}: unchanged"
    assert all(line.endswith(": unchanged") for line in again)


# -- D: how full the streams are, for the hub's operator ------------------------------


async def test_d_usage_shows_a_filling_archive_and_writes_it_for_node_exporter(
    hub: NatsServer, keydir: Path, users: dict[str, Client], tmp_path: Path
) -> None:
    # A full archive (discard new) stops archiving that member's checkpoints, and no
    # node can see the AUDIT account: only the hub's operator can watch it fill.
    from prometheus_client.parser import text_string_to_metric_families

    kor, audit = users["KOR"], users["AUDIT"]
    # A hub from before the per-member archives: setup retires the shared one, full or
    # not, and nothing is written to it again, so no alert must read it as filling.
    await audit.jetstream().add_stream(
        StreamConfig(
            name=natsconfig.AUDIT_STREAM,
            subjects=["msmt.audit.*.checkpoint", "msmt.audit.*.cosignature"],
            discard=DiscardPolicy.NEW,
            max_bytes=1 * MiB,
        )
    )
    # Before setup retires it, older nodes still fill it: not shown as retired (a review).
    before = await hubusage.account_usage(hub.url, "AUDIT", seed(keydir, "AUDIT"))
    assert [(s.name, s.retired) for s in before.streams] == [(natsconfig.AUDIT_STREAM, False)]
    assert len(before.missing) == len(MEMBERS)
    await setup(hub, keydir, "AUDIT", audit_max_bytes=1 * MiB)
    await setup(hub, keydir, "JPN")
    await publish_until_archived(kor, audit, "KOR", b"KOR\n")
    for _ in range(60):
        await kor.publish("msmt.audit.KOR.cosignature", b"KOR\n" + b"G" * 15 * 1024)
    await kor.flush()
    await asyncio.sleep(0.3)
    held = (await audit.jetstream().stream_info(natsconfig.archive_stream("KOR"))).state

    (tmp_path / "textfiles").mkdir()
    textfile = tmp_path / "textfiles" / "msmt-hub.prom"
    done = msmt(
        "nats", "usage", "--server", hub.url, "--keys", str(keydir),
        "--account", "audit", "--account", "JPN", "--account", "USA",
        "--textfile", str(textfile),
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("account AUDIT: "), lines
    kor_line = next(line for line in lines if "AUDIT_ARCHIVE_KOR" in line)
    percent = round(100 * held.bytes / MiB)
    assert percent > 80
    assert kor_line.endswith(f" of 1.0 MiB ({percent} %), {held.messages} messages"), kor_line
    assert sum("AUDIT_ARCHIVE_" in line for line in lines) == len(MEMBERS)
    jpn = lines.index(next(line for line in lines if line.startswith("account JPN: ")))
    assert lines[jpn + 1] == "  INBOX_JPN  0.0 of 128.0 MiB (0 %), 0 messages"
    # USA's inbox was never set up: said, not skipped.
    assert lines[-1] == "  INBOX_USA  missing: run msmt nats setup"
    retired = next(line for line in lines if line.startswith("  AUDIT_ARCHIVE "))
    assert retired.endswith(" messages, retired (kept; nothing is written to it since msmt"
                            " nats setup made the per-member archives)"), retired  # fmt: skip

    samples = {
        (s.name, s.labels.get("account", ""), s.labels.get("stream", "")): s.value
        for family in text_string_to_metric_families(textfile.read_text())
        for s in family.samples
    }
    kor_key = ("AUDIT", "AUDIT_ARCHIVE_KOR")
    assert samples[("msmt_hub_stream_bytes", *kor_key)] == held.bytes
    assert samples[("msmt_hub_stream_max_bytes", *kor_key)] == MiB
    assert samples[("msmt_hub_stream_messages", *kor_key)] == held.messages
    assert samples[("msmt_hub_stream_max_bytes", "JPN", "INBOX_JPN")] == 128 * MiB
    member_quota, audit_quota = natsconfig.account_quotas()  # as the hub was configured
    assert samples[("msmt_hub_account_max_storage_bytes", "AUDIT", "")] == audit_quota.max_file
    assert samples[("msmt_hub_account_max_storage_bytes", "JPN", "")] == member_quota.max_file
    assert samples[("msmt_hub_account_storage_bytes", "AUDIT", "")] >= held.bytes
    assert abs(samples[("msmt_hub_usage_timestamp_seconds", "JPN", "")] - time.time()) < 60
    assert samples[("msmt_hub_stream_missing", "USA", "INBOX_USA")] == 1
    assert ("msmt_hub_stream_bytes", "AUDIT", "AUDIT_ARCHIVE") in samples
    assert ("msmt_hub_stream_max_bytes", "AUDIT", "AUDIT_ARCHIVE") not in samples
    assert os.listdir(textfile.parent) == ["msmt-hub.prom"]  # no temporary file left beside it


def test_d_setup_warns_on_stderr_never_among_its_results_on_stdout(
    hub: NatsServer, keydir: Path, tmp_path: Path
) -> None:
    # Unconfigured, structlog printed setup's warnings on stdout, among the lines a
    # script reads (a review); the retired shared archive is one such warning.
    async def old_archive() -> None:
        nc = await natsetup.connect_account(hub.url, "AUDIT", seed(keydir, "AUDIT"))
        try:
            await nc.jetstream().add_stream(
                StreamConfig(
                    name=natsconfig.AUDIT_STREAM,
                    subjects=["msmt.audit.*.checkpoint"],
                    max_bytes=1 * MiB,
                )
            )
        finally:
            await nc.close()

    asyncio.run(old_archive())
    done = msmt(
        "nats", "setup", "--server", hub.url, "--keys", str(keydir), "--account", "AUDIT", "-q"
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert all(line.startswith("stream AUDIT_ARCHIVE") for line in done.stdout.splitlines())
    assert "shared_archive_retired" in done.stderr


def test_d_usage_refuses_what_it_cannot_use_in_one_line(tmp_path: Path, keydir: Path) -> None:
    base = ("nats", "usage", "--keys", str(keydir))
    # USA's seed where JPN's belongs: it connected, then every request timed out (20 s)
    # and the hub was blamed (a review); the key directory lists whose user is whose.
    mixed = tmp_path / "mixed"
    (mixed / "JPN").mkdir(parents=True)
    shutil.copy(keydir / keys.NATS_USERS_FILE, mixed / keys.NATS_USERS_FILE)
    shutil.copy(keydir / "USA" / keys.NATS_SEED_FILE, mixed / "JPN" / keys.NATS_SEED_FILE)
    wrong = msmt("nats", "usage", "--keys", str(mixed), "--account", "JPN", "--quiet")
    assert wrong.returncode == 2, wrong.stderr
    assert wrong.stderr.startswith(f"msmt: error: {mixed / 'JPN' / 'nats.nk'} is not JPN's NATS")
    assert "(another account's seed?)" in wrong.stderr
    seed_text = (keydir / "USA" / keys.NATS_SEED_FILE).read_text().strip()
    assert seed_text not in wrong.stderr
    for args, message in (
        (("--account", "JPN", "--textfile", str(tmp_path / "hub.txt")), "must end in .prom"),
        (("--account", "XYZ"), "unknown account 'XYZ'"),
        (("--account", "JPN", "--server", "http://x"), "--server: "),
        (("--account", "JPN", "--server", "nats://127.0.0.1:1"), "cannot connect to "),
    ):
        done = msmt(*base, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.startswith("msmt: error: "), done.stderr
        assert message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
