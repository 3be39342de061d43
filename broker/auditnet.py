"""The node's audit traffic on NATS: proofs for its own log, witnessing the partners' logs.

Message bodies are built and parsed by ``broker.checkpoint`` (docs/AUDIT.md):

* ``msmt.audit.<ME>.proof`` (service): answer ``{"old": m, "new": n}`` with a
  consistency proof from our own audit log;
* ``msmt.audit.<P>.checkpoint`` (each partner's latest signed checkpoint): act as
  witness (C2SP tlog-witness logic in ``broker.witness.Witness``): ask ``P`` for a
  proof from the size we last cosigned, check it, persist the new state, and
  only then publish our cosignature on ``msmt.audit.<ME>.cosignature``. A fork
  or rollback raises the alarm (log, metric, status) and is never cosigned;
* ``msmt.audit.<W>.cosignature``: a witness's cosignature of one of our
  checkpoints is verified against the roster and merged into our audit log.

Witness state lives in ``<data_dir>/witness-state.json``, written atomically
(fsync, rename) before a cosignature leaves the node: a witness that forgot
what it cosigned could be rolled back.
"""

from __future__ import annotations

import asyncio
import base64
import json
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
    open_checkpoint,
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
from broker.witness import LogState, Witness, WitnessAlarmError

log = get_logger("auditnet")

PROOF_TIMEOUT: Final = 3.0
QUEUE_LIMIT: Final = 256


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


class AuditNet:
    """Serves proofs of our log, witnesses partners' logs, and collects our cosignatures."""

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
    ) -> None:
        self.member = member
        self.audit = audit
        self.run_db = run_db
        self.state_path = state_path
        self.log_keys = {origin: list(keys) for origin, keys in log_keys.items()}
        self.witness = Witness(member, signer, log_keys, load_witness_state(state_path))
        self.cosigners = list(cosigners)
        self.alarms = alarms
        self.last_error: str | None = None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_LIMIT)

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
        self._queue.put_nowait(msg.data)

    async def _on_cosignature(self, msg: Msg) -> None:
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
        """Witness queued checkpoints one at a time until ``stop``."""
        while not stop.is_set():
            try:
                data = await asyncio.wait_for(self._queue.get(), 0.5)
            except TimeoutError:
                continue
            try:
                await self._witness(nc, data)
            except WitnessAlarmError as exc:
                self._alarm(exc.kind, str(exc))
            except MsmtError as exc:
                self.last_error = f"witness: {exc}"
                log.warning("witness_refused", error=str(exc)[:200])

    async def _witness(self, nc: Client, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        origin = text.split("\n", 1)[0]
        # Verified here too, so a forged checkpoint never makes us ask its origin for proofs.
        checkpoint, _ = open_checkpoint(data, self.log_keys.get(origin, ()))
        known = self.witness.state.get(origin, LogState(0, b""))
        if checkpoint.size == known.size and checkpoint.root == known.root:
            return  # already cosigned
        proof: list[bytes] = []
        if 0 < known.size < checkpoint.size:
            try:
                reply = await nc.request(
                    f"msmt.audit.{origin}.proof",
                    proof_request(known.size, checkpoint.size),
                    timeout=PROOF_TIMEOUT,
                )
            except (nats.errors.Error, TimeoutError) as exc:
                raise AuditError(f"no proof from {origin}: {type(exc).__name__}") from None
            old, new, proof = parse_proof_response(reply.data)
            if (old, new) != (known.size, checkpoint.size):
                raise AuditError(f"{origin} answered a proof for other sizes")
        cosignature = self.witness.add_checkpoint(known.size, proof, data, int(time.time()))
        await self.run_db(save_witness_state, self.state_path, dict(self.witness.state))
        await nc.publish(f"msmt.audit.{self.member}.cosignature", cosignature.encode())

    def _alarm(self, kind: str, detail: str) -> None:
        self.alarms.labels(kind=kind).inc()
        self.last_error = detail[:300]
        log.error("audit_alarm", kind=kind, detail=detail[:300])
