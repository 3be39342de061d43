"""Benchmark the node's outbox path against bare JetStream publishing on the same hub.

    python bench/node.py [--reports N]

One real nats-server with the generated member accounts and inboxes. In one run:

* floor: a bare nats-py client as JPN publishes N x 2 messages of the same size
  as the node's envelopes to ``msmt.to.{USA,KOR}.vessel`` with ``Nats-Msg-Id``,
  256 awaiting acks at a time (the node's default), and nothing else;
* envelope work alone: the node's planner (policy, one SD-JWT issue, two JWEs)
  over the same reports with no I/O at all;
* node: an in-process JPN node (policy: everything to USA and KOR) is handed N
  reports through its intake socket; timed until its outbox is empty, so it
  includes intake, the durable store commits, planning (one SD-JWT issue and two
  JWEs per report), publishing with acks, the audit-log appends and marking sent.

It prints the rates and the node's time against the publish floor alone and
against floor + envelope work: what is left is the node's own bookkeeping
(intake, fsynced store and audit commits, scheduling).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from floors import publish_floor
from sigterm import run_stoppable

from broker import keys, keys_custodian, samples
from broker.config import load_config
from broker.intake import ensure_token, submit
from broker.members import MEMBERS
from broker.natsconfig import accounts_config
from broker.natsetup import setup_account
from broker.natsproc import NatsServer, free_port
from broker.natsusers import load_users
from broker.node_start import load_node

POLICY = """
version = 1
member = "JPN"

[[rules]]
name = "close-partners"
kinds = ["*"]
partners = ["USA", "KOR"]
release = ["*"]
"""


async def floor(server: NatsServer, keydir: Path, count: int, size: int) -> float:
    subjects = [f"msmt.to.{p}.vessel" for _ in range(count) for p in ("USA", "KOR")]
    return await publish_floor(server.url, keydir, "JPN", subjects, [size] * len(subjects), 256)


def make_records(count: int) -> list[dict[str, object]]:
    records = samples.generate(count, seed=3, originators=("JPN",), now=datetime.now(UTC))
    for record in records:  # every report goes to both partners
        record["tlp"] = "AMBER"
        record.pop("rel_to", None)
    return records


def planning_only(root: Path, count: int) -> float:
    """The envelope work alone: policy, one issue and two presents per report, no I/O."""
    node = load_node(load_config(root / "JPN.toml", env={}))
    raw = [(str(r["report_id"]), json.dumps(r).encode()) for r in make_records(count)]
    start = time.perf_counter()
    for report_id, record in raw:
        node.planner.envelopes(report_id, record)
    elapsed = time.perf_counter() - start
    node.store.close()
    node.audit.close()
    return elapsed


async def node_run(root: Path, count: int) -> tuple[float, int]:
    config = load_config(root / "JPN.toml", env={})
    node = load_node(config)
    task = asyncio.create_task(node.run())
    while node.ready() is not None:  # noqa: ASYNC110 - readiness has no event to wait on
        await asyncio.sleep(0.05)
    records = make_records(count)
    body = samples.to_ndjson(records).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    start = time.perf_counter()
    answers: list[dict[str, object]] = []
    await submit(config.socket_path, ensure_token(config.token_path), chunks(), answers.append)
    assert all(a["status"] == "accepted" for a in answers), answers[:3]
    # Polling the store is part of what is measured: done means acked and recorded.
    while await node.run_db(node.store.outbox_depth) or (  # noqa: ASYNC110
        await node.run_db(node.store.sent_to, "KOR") < count
    ):
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - start
    rows = node.store._read("SELECT avg(json_extract(audit, '$.bytes')) FROM outbox")
    size = int(rows[0][0])
    node.stop.set()
    await task
    return elapsed, size


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keydir = root / "keys"
        keys_custodian.init_keys(keydir, MEMBERS, now=datetime.now(UTC) - timedelta(days=1))
        server = NatsServer(
            workdir=root / "nats",
            extra_config=accounts_config(load_users(keydir)),
            sync_always=True,
        )
        server.start()
        try:
            for account in (*MEMBERS, keys.AUDIT_ACCOUNT):
                seed = (keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()
                await setup_account(server.url, account, seed)
            (root / "policy.toml").write_text(POLICY)
            (root / "JPN.toml").write_text(
                'member = "JPN"\npolicy = "policy.toml"\ndata_dir = "data"\n'
                f"[nats]\nurls = [{json.dumps(server.url)}]\n"
                f'[keys]\ndir = "keys"\n[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
            )
            node_s, size = await node_run(root, count)
            floor_s = await floor(server, keydir, count, size)
            plan_s = planning_only(root, count)
        finally:
            server.kill()
    envelopes = 2 * count
    print(f"reports: {count}, envelopes: {envelopes}, mean envelope {size} bytes")
    print(f"floor (bare JetStream publish+ack): {envelopes / floor_s:10.0f} envelopes/s")
    print(f"node  (intake..sent, durable):      {envelopes / node_s:10.0f} envelopes/s")
    print(f"envelope work alone (no I/O):       {envelopes / plan_s:10.0f} envelopes/s")
    print(f"ratio node / floor:                 {node_s / floor_s:10.2f}x")
    print(f"ratio node / (floor + envelopes):   {node_s / (floor_s + plan_s):10.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=2000)
    reports = parser.parse_args().reports
    run_stoppable(main(reports))
