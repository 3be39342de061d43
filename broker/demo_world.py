"""The demo's world: keys, hub, policies and the 11 node subprocesses, and the feeds.

Everything is real and laid out as an operator would: ``keys/`` from
``msmt keys init``, the hub's accounts from ``broker.natsconfig``, each member's
``nodes/<M>/policy.toml`` copied from the repository and a ``node.toml`` beside
it, ``data/<M>/`` and ``logs/<M>.log``. The nodes are ``msmt node run``
subprocesses; feeds go through each node's intake socket, as ``msmt submit`` does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from broker import keys as keyfiles
from broker import keys_custodian, keys_users, pseudonym_keys, samples
from broker.config import NodeConfig, load_config
from broker.errors import MsmtError, UsageError
from broker.files import read_file_text
from broker.intake import read_token, submit
from broker.members import MEMBERS
from broker.natsconfig import accounts_config
from broker.natsetup import setup_account
from broker.natsproc import NatsServer, free_port
from broker.policy import Policy, load_policy
from broker.validation import parse_record

FEEDERS: Final = ("JPN", "USA", "KOR", "GBR", "FRA", "AUS")
"""The members whose feeds submit sightings (the others only receive)."""


class DemoFailedError(MsmtError):
    """The demo ran but something did not verify, reconcile or arrive."""


def msmt_command() -> list[str]:
    """The ``msmt`` executable of this environment."""
    exe = Path(sys.executable).parent / "msmt"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "from broker.entry import main; main()"]


def clean_env() -> dict[str, str]:
    """The environment minus ``MSMT_*`` overrides, so node configs mean what they say."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MSMT_")}


@dataclass
class NodeProc:
    """One member node subprocess and where its files are."""

    member: str
    config_path: Path
    config: NodeConfig
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_start: int = 0
    """Where this run's lines begin in the log (a node started again appends)."""

    def died(self) -> bool:
        """Whether the process has exited."""
        return self.proc is not None and self.proc.poll() is not None

    def logged_since_start(self) -> str:
        """What this run of the node has logged so far."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_start)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self) -> str:
        """The node log's last line, for one-line error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"


@dataclass
class World:
    """The scratch directory: keys, hub, policies, node configs, data and logs."""

    root: Path
    policy_source: Path
    server: NatsServer | None = None
    nodes: dict[str, NodeProc] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)

    @property
    def keydir(self) -> Path:
        """Where ``msmt keys init`` wrote every member's keys."""
        return self.root / "keys"

    def prepare(self) -> None:
        """Read the policies; generate keys and pseudonym keys; write each node's folder."""
        # The policies first: one that cannot be read or is refused leaves nothing
        # written, so a --keep folder can be used again (a packaging review's could not).
        texts: dict[str, str] = {}
        for member in MEMBERS:
            source = self.policy_source / member / "policy.toml"
            try:
                # As a node reads a policy: a bare CR is no line end (Path.read_text's is).
                texts[member] = read_file_text(source)
            except OSError as exc:
                raise UsageError(
                    f"cannot read {source}: {exc.strerror} (run from the repository root "
                    "or pass --nodes)"
                ) from None
            self.policies[member] = load_policy(texts[member], member=member, source=str(source))
        keys_custodian.init_keys(self.keydir, MEMBERS, now=datetime.now(UTC) - timedelta(minutes=1))
        users = keys_users.load_signed_users(self.keydir).users
        self.server = NatsServer(workdir=self.root / "nats", extra_config=accounts_config(users))
        for member in MEMBERS:
            folder = self.root / "nodes" / member
            folder.mkdir(parents=True)
            (folder / "policy.toml").write_text(texts[member], encoding="utf-8")
            policy = self.policies[member]
            for key_id in policy.pseudonym_keys:
                path = pseudonym_keys.key_file(self.keydir, member, key_id)
                pseudonym_keys.store_key(path, pseudonym_keys.new_key(), replace=False)
            log_path = self.root / "logs" / f"{member}.log"
            config_path = folder / "node.toml"
            config = self._write_config(member, config_path)
            self.nodes[member] = NodeProc(member, config_path, config, log_path)

    def write_config(self, member: str) -> None:
        """Rewrite ``member``'s ``node.toml`` with another metrics port."""
        node = self.nodes[member]
        node.config = self._write_config(member, node.config_path)

    def _write_config(self, member: str, path: Path) -> NodeConfig:
        """Write a ``node.toml`` with a metrics port that was free a moment ago; load it back."""
        if self.server is None:
            raise UsageError("node configs are written after prepare() chose the hub")
        path.write_text(
            f'member = "{member}"\n'
            'base_dir = "../.."\n'
            f'policy = "nodes/{member}/policy.toml"\n'
            f'data_dir = "data/{member}"\n'
            f"[nats]\nurls = [{json.dumps(self.server.url)}]\n"
            '[keys]\ndir = "keys"\n'
            f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n',
            encoding="utf-8",
        )
        return load_config(path, env={})

    async def start_hub(self) -> None:
        """Start the hub and create every account's streams and consumers."""
        if self.server is None:
            raise UsageError("the hub is started after prepare()")
        for attempt in range(3):
            try:
                await asyncio.to_thread(self.server.start)
                break
            except UsageError:
                # Its ports were free a moment ago; another process may have taken one.
                if "address already in use" not in self.server.log_tail() or attempt == 2:
                    raise
                self.server = NatsServer(
                    workdir=self.server.workdir, extra_config=self.server.extra_config
                )
                for member in self.nodes:
                    self.write_config(member)
        for account in (*MEMBERS, keyfiles.AUDIT_ACCOUNT):
            seed = (self.keydir / account / keyfiles.NATS_SEED_FILE).read_bytes().strip()
            await setup_account(self.server.url, account, seed)

    def start_nodes(self) -> None:
        """Start every node as ``msmt node run --config ...``, logging to ``logs/<M>.log``."""
        for member in self.nodes:
            self.start_node(member)

    def start_node(self, member: str) -> None:
        """Start one node (again), appending to its log."""
        node = self.nodes[member]
        node.log_path.parent.mkdir(exist_ok=True)
        with node.log_path.open("ab") as log:
            node.log_start = log.tell()
            node.proc = subprocess.Popen(  # noqa: S603 - our own executable and config
                [*msmt_command(), "node", "run", "--config", str(node.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(),
                # Their own session: a terminal's Ctrl-C reaches the demo, which stops them.
                start_new_session=True,
            )

    def stop_nodes(self, timeout: float = 60.0) -> dict[str, int | None]:
        """SIGTERM every node, wait for each; return exit statuses (``None``: had to be killed)."""
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for member, node in self.nodes.items():
            if node.proc is None:
                continue
            try:
                codes[member] = node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()
                codes[member] = None
        return codes

    def kill_all(self) -> None:
        """Kill whatever still runs (nodes, then the hub): the last resort on any exit."""
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
        if self.server is not None:
            self.server.stop()


def feed_records(total: int, now: datetime) -> dict[str, list[dict[str, Any]]]:
    """``total`` generated sightings of all three kinds, split among the feeding members."""
    share, extra = divmod(total, len(FEEDERS))
    return {
        member: samples.generate(share + (i < extra), seed=1000 + i, originators=(member,), now=now)
        for i, member in enumerate(FEEDERS)
    }


def expected_releases(
    policies: dict[str, Policy], records: dict[str, list[dict[str, Any]]]
) -> dict[tuple[str, str], set[str]]:
    """``(sender, recipient) -> report ids`` the senders' policies release."""
    expected: dict[tuple[str, str], set[str]] = {}
    for sender, recs in records.items():
        for record in recs:
            sighting = parse_record(json.dumps(record))
            for partner, decision in policies[sender].decide_all(sighting).items():
                if decision.sends:
                    expected.setdefault((sender, partner), set()).add(record["report_id"])
    return expected


async def feed(
    node: NodeProc,
    records: list[dict[str, Any]],
    batches: int,
    on_answer: Callable[[dict[str, Any]], None],
) -> None:
    """Submit ``records`` through the node's intake socket in a few spaced batches."""
    token = read_token(node.config.token_path)
    step = max(1, -(-len(records) // batches))
    for lo in range(0, len(records), step):
        body = samples.to_ndjson(records[lo : lo + step]).encode()

        async def chunks(data: bytes = body) -> AsyncIterator[bytes]:
            yield data

        await submit(node.config.socket_path, token, chunks(), on_answer)
        await asyncio.sleep(0.2)
