"""Helpers shared by the node, operator, audit-replay, plan and reliability tests.

Polling (``wait_for``, ``await_for``), the ``/readyz`` probe, a real hub whose
accounts are the generated members' (``start_hub``), reading a node's inbox
from its SQLite store, and the small policy the batch tests give JPN. The node
tests' ``World`` (all 11 members' keys, that hub, node configs and subprocess
nodes) lives here too, with the ``Forger`` of envelopes and the expectations the
tests compare against; conftest's ``world`` fixture builds one per test.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import pytest

from broker import keys, keys_custodian, keys_roster, samples
from broker.auditlog import DB_FILE
from broker.config import NodeConfig, load_config
from broker.envelope import issue, present
from broker.intake import ensure_token, submit
from broker.natsconfig import accounts_config, inbox_stream
from broker.natsetup import connect_account, setup_account
from broker.natsproc import NatsServer, free_port, port_share
from broker.natsusers import load_users
from broker.policy import Policy, load_policy
from broker.sightings import SightingModel, leaf_values
from broker.store import Store
from broker.validation import parse_record

REPO = Path(__file__).parent.parent
MSMT = str(Path(sys.executable).parent / "msmt")

KILL_ACK_WAIT: Final = 3.0
"""The inbox consumers' ack_wait (seconds) in tests that SIGKILL a receiving node.

What the killed node had fetched but not acked comes back only after ack_wait:
3 s, not the hub's 30, which such a test would otherwise wait out (27 of its 37 s).
Nothing else changes; a live node's batch redelivered on a busy machine is a
duplicate it must store once, which these tests check as well."""

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

# All of USA's reports, whole, to JPN alone: one envelope per report.
USA_TO_JPN = """
version = 1
member = "USA"

[[rules]]
name = "all-to-jpn"
kinds = ["*"]
partners = ["JPN"]
release = ["*"]
"""


def msmt(
    *args: str, stdin: bytes | None = None, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the real ``msmt`` command line; ``env`` adds to this process's environment."""
    return subprocess.run(
        [MSMT, *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
        check=False,
    )


def without_dac_override() -> list[str]:
    """A command prefix that runs as this user without root's bypass of file modes.

    Empty for another user; for root, ``setpriv`` dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (a mode-0500 folder stops no root process otherwise). Skips
    the test where root has no ``setpriv``: the modes cannot be tested there.
    """
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("root, and no setpriv to drop CAP_DAC_OVERRIDE")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"]


def in_port_share(env: dict[str, str], share: tuple[int, int] | None = None) -> dict[str, str]:
    """``env`` for a subprocess that picks ports: from this worker's share, or ``share``.

    Its ``sitecustomize`` (``tests/port_share``) confines it as conftest confines
    the worker (``msmt demo``'s hub and metrics ports); the product's CLI has no
    switch for it. It replaces ``PYTHONPATH``.
    """
    index, count = port_share() if share is None else share
    hook = Path(__file__).parent / "port_share"
    return {**env, "PYTHONPATH": str(hook), "CONFINE_PORTS": f"{index}/{count}"}


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


def hub_server(keydir: Path, workdir: Path) -> NatsServer:
    """A started hub that knows every account generated under ``keydir``; the caller kills it."""
    server = NatsServer(workdir=workdir, extra_config=accounts_config(load_users(keydir)))
    server.start()
    return server


@contextmanager
def running_hub(keydir: Path, workdir: Path) -> Iterator[NatsServer]:
    """``hub_server`` for the length of a ``with`` block (a fixture's yield)."""
    server = hub_server(keydir, workdir)
    try:
        yield server
    finally:
        server.kill()


def start_hub(root: Path, members: Iterable[str]) -> tuple[Path, NatsServer]:
    """Keys for ``members`` under ``root/keys`` (valid since yesterday) and a started hub.

    The hub knows every generated account; none is set up yet (``setup_accounts``).
    The caller kills the server.
    """
    keydir = root / "keys"
    keys_custodian.init_keys(keydir, tuple(members), now=datetime.now(UTC) - timedelta(days=1))
    return keydir, hub_server(keydir, root / "nats")


def reload_hub(server: NatsServer, users: Mapping[str, str]) -> None:
    """Give ``server`` the accounts of ``users`` (account -> user nkey) and reload it (SIGHUP).

    As the hub operator does after ``msmt nats config``; returns once the server
    has logged the reload.
    """
    assert server.proc is not None
    server.extra_config = accounts_config(users)
    server.config_path.write_text(server.render_config(), encoding="utf-8")
    reloads = server.log_path.read_text().count("Reloaded server configuration")
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for(
        lambda: server.log_path.read_text().count("Reloaded server configuration") > reloads,
        10,
        "the hub's reload",
    )


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
        path.chmod(0o600)  # the node refuses a private key other users can read
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


@dataclass
class World:
    """Keys for all 11 members, a hub with their accounts and inboxes, and node configs."""

    root: Path
    keydir: Path
    server: NatsServer
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def config_path(self, member: str) -> Path:
        """Where ``member``'s ``node.toml`` is (``write_config`` writes it)."""
        return self.root / "nodes" / member / "node.toml"

    def config(self, member: str) -> NodeConfig:
        """``member``'s node configuration, read without environment overrides."""
        return load_config(self.config_path(member), env={})

    def write_config(self, member: str, policy_text: str | None = None) -> None:
        """Write ``member``'s node folder against this hub (``write_node_config``)."""
        write_node_config(self.root, member, [self.server.url], policy_text)

    def policy(self, member: str) -> Policy:
        """The policy ``member``'s node was configured with."""
        text = (self.root / "nodes" / member / "policy.toml").read_text()
        return load_policy(text, member=member)

    def records_released_to(
        self, member: str, partners: Iterable[str], count: int, seed: int
    ) -> list[dict[str, Any]]:
        """``count`` of 30 generated records ``member``'s policy sends to exactly ``partners``."""
        policy = self.policy(member)
        records = [
            r
            for r in records_for(member, 30, seed=seed)
            if expected_partners(policy, parse_record(json.dumps(r))) == set(partners)
        ][:count]
        assert len(records) == count, f"seed {seed} gave {len(records)} such records"
        return records

    def pseudonym_keys(self, member: str) -> dict[str, bytes]:
        """``member``'s pseudonym keys by id (empty if it has none)."""
        folder = self.keydir / member / "pseudonym"
        return (
            {p.stem: base64.urlsafe_b64decode(p.read_text()) for p in folder.glob("*.key")}
            if folder.is_dir()
            else {}
        )

    # --- subprocess nodes ---------------------------------------------------

    def start(self, member: str, *, ready: bool = True, **env: str) -> None:
        """Run ``member`` as a ``msmt node run`` subprocess with ``env`` added.

        Waits until it is ready, unless ``ready`` is false (a node that cannot be).
        """
        log = (self.root / f"{member}.log").open("ab")
        self.procs[member] = subprocess.Popen(
            [MSMT, "node", "run", "--config", str(self.config_path(member))],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        log.close()
        if not ready:
            return
        port = self.config(member).metrics.port
        wait_for(lambda: readyz(port) or self._died(member), 30, f"{member} ready")
        assert not self._died(member), self.log_tail(member)

    def _died(self, member: str) -> bool:
        return self.procs[member].poll() is not None

    def kill(self, member: str) -> None:
        """SIGKILL ``member``'s subprocess and reap it."""
        proc = self.procs.pop(member)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def terminate(self, member: str) -> int:
        """SIGTERM ``member``'s subprocess and return its exit status."""
        proc = self.procs.pop(member)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=30)

    def log_tail(self, member: str) -> str:
        """The end of ``member``'s subprocess log, for an assertion message."""
        return (self.root / f"{member}.log").read_text()[-3000:]

    def store(self, member: str) -> Store:
        """``member``'s store, opened read-only; the caller closes it."""
        return Store(self.config(member).store_path, readonly=True)

    def outbox_depth(self, member: str) -> int:
        """``member``'s ``Store.outbox_depth``: unplanned reports and unsent envelopes."""
        store = self.store(member)
        try:
            return store.outbox_depth()
        finally:
            store.close()

    def all_planned(self, member: str) -> bool:
        """Whether ``member``'s store holds no report its planner has not made envelopes for."""
        store = self.store(member)
        try:
            return not store.unplanned(1)
        finally:
            store.close()

    def sent_counts(self, member: str, partners: Iterable[str]) -> dict[str, int]:
        """How many reports ``member``'s store has marked sent to each of ``partners``."""
        store = self.store(member)
        try:
            return {p: store.sent_to(p) for p in partners}
        finally:
            store.close()

    async def outbox_sent(self, member: str, within: float = 30) -> None:
        """Wait until ``member``'s outbox holds nothing unplanned or unsent.

        A node records the hub's acks a moment after they come (it gathers them
        for ``publisher.COALESCE_ACKS``), so a partner can hold a report before
        its sender's outbox calls it sent.
        """
        await await_for(lambda: self.outbox_depth(member) == 0, within, f"{member}'s outbox sent")

    def state(self, member: str) -> dict[str, str]:
        """The status facts ``member``'s node last wrote (what ``msmt status`` reads)."""
        store = self.store(member)
        try:
            return store.state()
        finally:
            store.close()

    def inbox_ids(self, member: str, sender: str) -> list[str]:
        """Report ids ``member``'s store holds from ``sender``."""
        return inbox_ids(self.config(member).store_path, sender)

    async def stream_messages(self, member: str) -> int:
        """How many messages ``member``'s inbox stream on the hub holds."""
        seed = (self.keydir / member / keys.NATS_SEED_FILE).read_bytes().strip()
        nc = await connect_account(self.server.url, member, seed)
        try:
            info = await nc.jetstream().stream_info(inbox_stream(member))
            return int(info.state.messages)
        finally:
            await nc.close()

    async def submit(self, member: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Submit ``records`` to ``member``'s intake socket; return its answers in order."""
        config = self.config(member)
        body = samples.to_ndjson(records).encode()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 1 << 16):
                yield body[i : i + (1 << 16)]

        answers: list[dict[str, Any]] = []
        await submit(config.socket_path, ensure_token(config.token_path), chunks(), answers.append)
        return answers


def expected_partners(policy: Policy, sighting: SightingModel) -> set[str]:
    """The partners ``policy`` sends ``sighting`` to."""
    return {p for p, d in policy.decide_all(sighting).items() if d.sends}


def content_of(records: list[dict[str, Any]]) -> set[str]:
    """Distinctive field values of these reports (what must never appear in a log)."""
    return {
        str(v)
        for r in records
        for v in leaf_values(parse_record(json.dumps(r))).values()
        if len(str(v)) >= 6 and not str(v).isdigit()
    }


@dataclass
class Forger:
    """Builds envelopes with JPN's (and KOR's) real keys, correct or broken one way each."""

    world: World
    now: datetime

    def __post_init__(self) -> None:
        signed = keys_roster.load_signed_roster(self.world.keydir)
        self.roster = signed.roster
        self.jpn = keys.load_member_keys(self.world.keydir, "JPN", self.roster, self.now)
        self.kor = keys.load_member_keys(self.world.keydir, "KOR", self.roster, self.now)

    def envelope(
        self,
        record: dict[str, Any],
        *,
        to: str = "USA",
        signer: keys.MemberKeys | None = None,
        kid: str | None = None,
        at: datetime | None = None,
        rel_to_as_given: bool = False,
    ) -> tuple[str, Any]:
        """An envelope of ``record`` for ``to`` and the issued report it presents.

        Signed by the originator's key unless ``signer``/``kid`` say otherwise,
        and issued at ``at`` (default: the forger's ``now``). A REL TO that leaves
        ``to`` out gets ``to`` added, since a receiver refuses such a report,
        unless ``rel_to_as_given``.
        """
        signer = signer or (self.kor if record["originator"] == "KOR" else self.jpn)
        rel_to = record.get("rel_to")
        if rel_to is not None and to not in rel_to and not rel_to_as_given:
            record = {**record, "rel_to": sorted({*rel_to, to})}
        sighting = parse_record(json.dumps(record))
        issued = issue(
            sighting,
            signing_key=signer.signing,
            kid=kid or signer.signing_kid,
            policy_digest="0" * 64,
            now=(at or self.now).replace(microsecond=0),
        )
        return self.present(issued, to), issued

    def delivery(self, record: dict[str, Any], sender: str = "JPN") -> tuple[str, bytes]:
        """``record``'s envelope for USA as its inbox delivers it: (subject, bytes)."""
        return f"from.{sender}.msmt.to.USA.{record['kind']}", self.envelope(record)[0].encode()

    def present(self, issued: Any, to: str) -> str:
        """``issued`` with every disclosure, encrypted to ``to``'s current key."""
        enc = self.roster.current(to, "enc", self.now)
        return present(
            issued,
            disclosure_keys=list(issued.disclosures),
            recipient=to,
            recipient_kid=enc.kid,
            recipient_key=self.roster.public_key(enc.kid),
        )


def audit_entries(audit_dir: Path) -> list[dict[str, Any]]:
    """The entries of the audit log in ``audit_dir``, parsed, in log order."""
    with sqlite3.connect(audit_dir / DB_FILE) as db:
        return [json.loads(row[0]) for row in db.execute("SELECT entry FROM entries ORDER BY idx")]


def audit_rejections(config: NodeConfig) -> Counter[str]:
    """Rejections in the audit log of the node ``config`` describes, by checklist step.

    Each ``rejected`` entry counts one; a ``rejected_many`` entry its counts per step.
    """
    entries = audit_entries(config.audit_dir)
    found = Counter(e["step"] for e in entries if e["type"] == "rejected")
    for e in entries:
        if e["type"] == "rejected_many":
            found.update(e["steps"])
    return found
