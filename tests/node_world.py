"""Helpers shared by the node, operator, audit-replay and reliability tests.

Polling (``wait_for``, ``await_for``), the ``/readyz`` probe, a real hub whose
accounts are the generated members' (``start_hub``), reading a node's inbox
from its SQLite store, and the small policy the batch tests give JPN.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker import keys, samples
from broker.natsconfig import accounts_config, load_users
from broker.natsetup import setup_account
from broker.natsproc import NatsServer, free_port
from broker.policy import load_policy
from broker.store import Store

REPO = Path(__file__).parent.parent

# Everything but source and method to USA and KOR, so each report costs two
# envelopes rather than ten.
BATCH_POLICY = """
version = 1
member = "JPN"

[[rules]]
name = "close-partners"
kinds = ["*"]
partners = ["USA", "KOR"]
release = ["*"]
"""


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until true; after ``timeout`` raise ``AssertionError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def await_for(check: Callable[[], bool], within: float, what: str) -> None:
    """``wait_for`` for a test whose event loop runs the nodes: sleeps without blocking it."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


def fetch(url: str) -> str:
    """GET ``url`` and return its body; an error status raises (``urllib.error.HTTPError``)."""
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own http URL
        return str(response.read().decode())


def readyz(port: int) -> bool:
    """Whether the node whose metrics listen on ``port`` answers ``/readyz`` with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def records_for(member: str, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` valid sample sightings originated by ``member``, observed just now."""
    return samples.generate(count, seed=seed, originators=(member,), now=datetime.now(UTC))


def start_hub(root: Path, members: Iterable[str]) -> tuple[Path, NatsServer]:
    """Keys for ``members`` under ``root/keys`` (valid since yesterday) and a started hub.

    The hub knows every generated account; none is set up yet (``setup_accounts``).
    The caller kills the server.
    """
    keydir = root / "keys"
    keys.init_keys(keydir, tuple(members), now=datetime.now(UTC) - timedelta(days=1))
    server = NatsServer(workdir=root / "nats", extra_config=accounts_config(load_users(keydir)))
    server.start()
    return keydir, server


def setup_accounts(url: str, keydir: Path, accounts: Iterable[str]) -> None:
    """Create each account's inbox stream and consumer on the hub, as ``msmt nats setup`` does."""

    async def setup() -> None:
        for account in accounts:
            seed = (keydir / account / keys.NATS_SEED_FILE).read_bytes().strip()
            await setup_account(url, account, seed)

    asyncio.run(setup())


def write_node_config(
    root: Path, member: str, urls: Sequence[str], policy_text: str | None = None
) -> None:
    """Write ``root/nodes/<member>/`` (``node.toml``, ``policy.toml``) for keys in ``root/keys``.

    The policy is the member's shipped ``nodes/<member>/policy.toml`` unless
    ``policy_text`` is given; each pseudonym key it names is written too, and
    the metrics listener gets a free port.
    """
    folder = root / "nodes" / member
    folder.mkdir(parents=True, exist_ok=True)
    text = policy_text or (REPO / "nodes" / member / "policy.toml").read_text()
    (folder / "policy.toml").write_text(text)
    for key_id in load_policy(text, member=member).pseudonym_keys:
        path = root / "keys" / member / "pseudonym" / f"{key_id}.key"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Derived from the id, so a test can compute the pseudonyms the node sends.
        path.write_bytes(base64.urlsafe_b64encode(key_id.encode().ljust(32, b"k")))
    (folder / "node.toml").write_text(
        f'member = "{member}"\nbase_dir = "../.."\n'
        f'policy = "nodes/{member}/policy.toml"\ndata_dir = "data/{member}"\n'
        f"[nats]\nurls = {json.dumps(list(urls))}\n"
        f'[keys]\ndir = "keys"\n[metrics]\nlisten = "127.0.0.1:{free_port()}"\n'
    )


def inbox_ids(store_path: Path, sender: str) -> list[str]:
    """Report ids a node's store holds from ``sender`` (none if it has no store yet)."""
    if not store_path.exists():
        return []
    store = Store(store_path, readonly=True)
    try:
        return [e.report_id for e in store.inbox(sender=sender, limit=1_000_000)]
    finally:
        store.close()
