"""The node's audit traffic on NATS: proofs for its own log, witnessing the partners' logs.

Message bodies are built and parsed by ``broker.checkpoint`` (docs/AUDIT.md):

* ``msmt.audit.<ME>.proof`` (service): answer ``{"old": m, "new": n}`` with a
  consistency proof from our own audit log;
* ``msmt.audit.<P>.checkpoint`` (each partner's latest signed checkpoint): act as
  witness (C2SP tlog-witness logic in ``broker.witness.Witness``): ask ``P`` for a
  proof from the size we last cosigned, check it, persist the new state, and
  only then publish our cosignature on ``msmt.audit.<ME>.cosignature``. A fork
  or rollback raises the alarm (log, metric, status) and is never cosigned.
  Only each log's latest checkpoint is witnessed, in rounds (``AuditNet``);
* ``msmt.audit.<W>.cosignature``: a witness's cosignature of one of our
  checkpoints is verified against the roster and merged into our audit log;
  those of other logs (every witness's reach every node) are dropped by their
  first line, unparsed.

Witness state lives in ``<data_dir>/witness-state.json``, written atomically
(fsync, rename) before a cosignature leaves the node: a witness that forgot
what it cosigned could be rolled back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import nats.errors
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter as PromCounter

from broker.auditlog import AuditLog
from broker.checkpoint import (
    Checkpoint,
    parse_body,
    parse_proof_request,
    parse_proof_response,
    proof_request,
    proof_response,
)
from broker.errors import AuditError, MsmtError
from broker.log import get_logger
from broker.members import is_member
from broker.note import Verifier, parse
from broker.publisher import RunDb
from broker.witness import LogState, Opened, Witness, WitnessAlarmError

log = get_logger("auditnet")

PROOF_TIMEOUT: Final = 3.0
QUEUE_LIMIT: Final = 256
WITNESS_INTERVAL_S: Final = 5.0
"""Shortest time between two witnessing rounds while logs keep growing: under
load a partner's log is cosigned this often, not at each of its batches."""
SETTLED_S: Final = 1.5
"""A pending checkpoint not superseded for this long is its log's last for now
(a growing log publishes a newer one every second): no need to wait further."""


def load_witness_state(path: Path) -> dict[str, LogState]:
    """Read the persisted witness state; raise ``AuditError`` if it is unreadable."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {
            origin: LogState(int(entry["size"]), base64.b64decode(entry["root"], validate=True))
            for origin, entry in data.items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditError(f"witness state {path} is unreadable ({type(exc).__name__})") from None


def save_witness_state(path: Path, state: Mapping[str, LogState]) -> None:
    """Write the witness state durably (temp file, fsync, rename); ``AuditError`` if it cannot."""
    data = {
        origin: {"size": s.size, "root": base64.b64encode(s.root).decode()}
        for origin, s in sorted(state.items())
    }
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(data, handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as exc:  # a full disk must cost a cosignature, not the node
        raise AuditError(f"cannot save witness state {path}: {exc.strerror}") from None


class _UnreachableError(AuditError):
    """A log did not answer our proof request (it may be down, or the hub away)."""


class AuditNet:
    """Serves proofs of our log, witnesses partners' logs, and collects our cosignatures.

    Witnessing runs in rounds: a round takes the latest pending checkpoint of
    every partner (older ones are superseded: cosigning the latest covers them,
    since it is proved consistent with what we cosigned before), asks the logs
    for their proofs concurrently, and saves the state once before publishing
    the round's cosignatures. A round starts when ``interval`` seconds have
    passed since the last one, or sooner once every pending checkpoint has
    stood ``settled`` seconds without a newer one (the logs stopped growing).
    So while logs grow each is cosigned every ``interval`` seconds rather than
    at every batch, and when they stop their last checkpoints are cosigned
    promptly; the first checkpoint after an idle spell starts a round at once.
    """

    def __init__(
        self,
        member: str,
        audit: AuditLog,
        run_db: RunDb,
        signer: Ed25519PrivateKey,
        log_keys: Mapping[str, Sequence[Verifier]],
        cosigners: Sequence[Verifier],
        state_path: Path,
        alarms: PromCounter,
        interval: float = WITNESS_INTERVAL_S,
        settled: float = SETTLED_S,
    ) -> None:
        self.member = member
        self.audit = audit
        self.run_db = run_db
        self.state_path = state_path
        self.log_keys = {origin: list(keys) for origin, keys in log_keys.items()}
        self.witness = Witness(member, signer, log_keys, load_witness_state(state_path))
        self.cosigners = list(cosigners)
        self.alarms = alarms
        self.interval = interval
        self.settled = settled
        self.last_error: str | None = None
        self._last_warned: str | None = None
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(QUEUE_LIMIT)
        self._pending: dict[str, bytes] = {}
        self._newest = math.inf  # when the newest pending checkpoint arrived
        self._last_round = -math.inf
        # A cosignature note starts with the checkpoint's origin line: ours start with this.
        self._ours = f"{member}\n".encode()
        self._cosigned = {
            origin: _cosigned_text(origin, st) for origin, st in self.witness.state.items()
        }

    @property
    def backlog(self) -> int:
        """Checkpoints received but not yet witnessed (queued, plus the latest held per log)."""
        return self._queue.qsize() + len(self._pending)

    async def subscribe(self, nc: Client) -> None:
        """Subscribe to the audit subjects on ``nc`` (call again after a new connection)."""
        await nc.subscribe(f"msmt.audit.{self.member}.proof", cb=self._on_proof_request)
        await nc.subscribe("msmt.audit.*.checkpoint", cb=self._on_checkpoint)
        await nc.subscribe("msmt.audit.*.cosignature", cb=self._on_cosignature)

    async def _on_proof_request(self, msg: Msg) -> None:
        try:
            old, new = parse_proof_request(msg.data)
            proof = await self.run_db(self.audit.consistency_proof, old, new)
            body = proof_response(old, new, proof)
        except MsmtError as exc:
            body = json.dumps({"error": str(exc)[:200]}).encode()
        try:
            await msg.respond(body)
        except nats.errors.Error as exc:
            log.warning("proof_reply_failed", error=type(exc).__name__)

    async def _on_checkpoint(self, msg: Msg) -> None:
        origin = msg.subject.split(".")[2]
        if origin == self.member or not is_member(origin):
            return
        # Latest wins: when we fall behind, dropping a checkpoint only delays a cosignature.
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait((origin, msg.data))

    async def _on_cosignature(self, msg: Msg) -> None:
        # Every witness's cosignatures of every log reach every node; only those
        # of our own checkpoints concern us, and their first line says so. Those
        # are parsed and verified in full below.
        if not msg.data.startswith(self._ours):
            return
        try:
            if parse_body(parse(msg.data).text).origin != self.member:
                return
            names = await self.run_db(self.audit.add_cosignatures, msg.data, self.cosigners)
        except MsmtError as exc:
            self._alarm("cosignature", f"refused cosignature on {msg.subject}: {exc}")
            return
        if names:
            log.info("cosigned", witnesses=names)

    async def run(self, nc: Client, stop: asyncio.Event) -> None:
        """Witness partners' checkpoints in rounds (see the class) until ``stop``."""
        while not stop.is_set():
            wait = 0.5
            if self._pending:
                due = (
                    min(self._last_round + self.interval, self._newest + self.settled)
                    - time.monotonic()
                )
                if due <= 0:
                    self._last_round = time.monotonic()
                    await self._round(nc)
                    continue
                wait = min(wait, due)
            try:
                origin, data = await asyncio.wait_for(self._queue.get(), wait)
            except TimeoutError:
                continue
            self._hold(origin, data)
            while not self._queue.empty():
                self._hold(*self._queue.get_nowait())

    def _hold(self, origin: str, data: bytes) -> None:
        # A log republishes its checkpoint as cosignatures merge into it: the
        # same text we already cosigned needs no work (we would verify it only
        # to find nothing to do). Anything else waits for the next round.
        done = self._cosigned.get(origin)
        if done is not None and data.startswith(done):
            return
        self._pending[origin] = data
        self._newest = time.monotonic()

    async def _round(self, nc: Client) -> None:
        batch, self._pending = self._pending, {}
        # What this round puts back for a retry waits for the interval; only a
        # new arrival can make the pending set settle (and a round come sooner).
        self._newest = math.inf
        results = await asyncio.gather(
            *(self._prepare(nc, origin, data) for origin, data in batch.items()),
            return_exceptions=True,
        )
        before = dict(self.witness.state)
        cosigned: dict[str, str] = {}
        refused = False
        now = int(time.time())
        for (origin, data), result in zip(batch.items(), results, strict=True):
            try:
                if isinstance(result, BaseException):
                    raise result
                if result is not None:
                    opened, old, proof = result
                    cosigned[origin] = self.witness.add_opened(old, proof, opened, now)
            except WitnessAlarmError as exc:
                self._alarm(exc.kind, str(exc))
            except _UnreachableError as exc:
                # The log may be idle from now on: keep its checkpoint for the next round.
                self._pending.setdefault(origin, data)
                self._refused(exc)
                refused = True
            except MsmtError as exc:
                self._refused(exc)
                refused = True
        if not refused:
            self._last_warned = None
        if not cosigned:
            return
        state = dict(self.witness.state)
        try:
            await self.run_db(save_witness_state, self.state_path, state)
        except AuditError as exc:
            # Unsaved means uncosigned: forget the round and retry it next time.
            self.witness.state = before
            for origin in cosigned:
                self._pending.setdefault(origin, batch[origin])
            self._refused(exc)
            return
        self._cosigned = {origin: _cosigned_text(origin, st) for origin, st in state.items()}
        for cosignature in cosigned.values():
            try:
                await nc.publish(f"msmt.audit.{self.member}.cosignature", cosignature.encode())
            except nats.errors.Error as exc:
                self.last_error = f"witness: cosignature publish: {type(exc).__name__}"
                return

    def _refused(self, exc: MsmtError) -> None:
        text = f"witness: {exc}"
        self.last_error = text
        # A log that stays unreachable is retried every round: warn once, not each time.
        if text != self._last_warned:
            log.warning("witness_refused", error=str(exc)[:200])
            self._last_warned = text

    async def _prepare(
        self, nc: Client, origin: str, data: bytes
    ) -> tuple[Opened, int, list[bytes]] | None:
        """Verify a partner's checkpoint and fetch the proof from what we cosigned before.

        Checklist (each step raises): 1. the note is a checkpoint signed by the
        log it names (``Witness.open``; before any request, so a forgery costs
        no round trip); 2. that log is the one whose subject carried it (a
        member replaying another's old checkpoint must not pass for that log
        rolling back); 3. the log's reply proves the sizes we asked for. Returns
        ``None`` when we already cosigned exactly this checkpoint.
        """
        opened = self.witness.open(data)
        checkpoint = opened.checkpoint
        if checkpoint.origin != origin:
            raise AuditError(
                f"checkpoint for {checkpoint.origin!r} published on {origin}'s subject"
            )
        known = self.witness.state.get(origin, LogState(0, b""))
        if checkpoint.size == known.size and checkpoint.root == known.root:
            return None  # already cosigned
        proof: list[bytes] = []
        if 0 < known.size < checkpoint.size:
            try:
                reply = await nc.request(
                    f"msmt.audit.{origin}.proof",
                    proof_request(known.size, checkpoint.size),
                    timeout=PROOF_TIMEOUT,
                )
            except (nats.errors.Error, TimeoutError) as exc:
                raise _UnreachableError(f"no proof from {origin}: {type(exc).__name__}") from None
            old, new, proof = parse_proof_response(reply.data)
            if (old, new) != (known.size, checkpoint.size):
                raise AuditError(f"{origin} answered a proof for other sizes")
        return opened, known.size, proof

    def _alarm(self, kind: str, detail: str) -> None:
        self.alarms.labels(kind=kind).inc()
        self.last_error = detail[:300]
        log.error("audit_alarm", kind=kind, detail=detail[:300])


def _cosigned_text(origin: str, state: LogState) -> bytes:
    """The start of a checkpoint note we already cosigned: its text and the blank line."""
    return (Checkpoint(origin, state.size, state.root).body() + "\n").encode()
