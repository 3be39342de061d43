"""The node as witness of its partners' logs: in rounds, proofs asked for, cosignatures published.

``Witnessing`` takes each partner's latest checkpoint in rounds (``broker.auditnet.AuditNet``
says when), asks its log for a consistency proof, saves the witness state
(``save_witness_state``) and only then publishes our cosignatures; a fork or a rollback
the log's own word proves raises the alarm. Apart from what concerns our own log
(``broker.auditnet_own``). Part of ``broker.auditnet.AuditNet``.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client

from broker.auditnet_base import PROOF_TIMEOUT, AuditNetBase, cosigned_text
from broker.checkpoint import (
    EARLIER_REQUEST_REFUSAL,
    NONCE_BYTES,
    Checkpoint,
    ProofReply,
    parse_proof_response,
    proof_request,
)
from broker.errors import AuditError, MsmtError
from broker.files import write_durably
from broker.log import get_logger
from broker.merkle import verify_consistency
from broker.note import excerpt
from broker.witness import (
    LogState,
    Opened,
    UnknownLogError,
    WitnessAlarmError,
    dump_state,
)

log = get_logger("auditnet")


def save_witness_state(path: Path, state: Mapping[str, LogState]) -> None:
    """Write the witness state durably (``write_durably``); ``AuditError`` if it cannot.

    Durable before any cosignature it records is published: a witness that forgot
    what it cosigned, at a power cut, cosigned a fork of that log afterwards.
    """
    try:
        data = dump_state(state)
    except ValueError as exc:  # never, with add_opened's bound; a cosignature, not the node
        raise AuditError(f"cannot save witness state {path}: {exc}") from None
    try:
        write_durably(path, data)
    except OSError as exc:  # a full disk must cost a cosignature, not the node
        raise AuditError(f"cannot save witness state {path}: {exc.strerror}") from None


class _UnreachableError(AuditError):
    """A log did not answer our proof request (it may be down, or the hub away)."""


class _StaleError(AuditError):
    """An older checkpoint of a log than we cosigned, which the log proves it extends.

    Only the hub replays those (a log's node publishes its latest): nothing to cosign,
    and nothing to warn of, as C2SP tlog-witness answers an old checkpoint.
    """


class Witnessing(AuditNetBase):
    """The partners' logs' side of ``broker.auditnet.AuditNet``: witnessing them in rounds."""

    async def _witness(self, nc: Client, stop: asyncio.Event) -> None:
        # Waiting on the queue and on stop at once lets a stopping node go at once
        # rather than at the end of the current wait.
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            await self._witness_until(nc, stop, stopping)
        finally:
            stopping.cancel()

    async def _witness_until(
        self, nc: Client, stop: asyncio.Event, stopping: asyncio.Future[Any]
    ) -> None:
        while not stop.is_set():
            self._log_cosigned()  # what merged since the last line, once it is due
            wait = 0.5
            now = time.monotonic()
            if self._batch is not None:
                # The logs may settle while the work waits: then it is due at once,
                # so that a burst's last checkpoints are cosigned promptly.
                # Nothing newer since the round's start: settled from its start.
                newest = self._newest if self._newest < math.inf else self._last_round
                quiet = newest + self.settled
                if now >= min(self._work_at, quiet):
                    batch, self._batch = self._batch, None
                    await self._round(nc, batch)
                    continue
                wait = min(wait, self._work_at - now, quiet - now)
            elif self._pending:
                due = min(self._round_due(), self._newest + self.settled) - now
                if due <= 0:
                    self._start_round(now)
                    continue
                wait = min(wait, due)
            if not self._arrived:
                getting = asyncio.ensure_future(self._arrival.wait())
                await asyncio.wait([getting, stopping], timeout=wait, return_when="FIRST_COMPLETED")
                getting.cancel()
                if not self._arrived:
                    continue
            arrived, self._arrived = self._arrived, {}
            self._arrival.clear()
            for origin, data in arrived.items():
                self._hold(origin, data)

    def _hold(self, origin: str, data: bytes) -> None:
        # A log republishes its checkpoint as cosignatures merge into it. A copy
        # is not a newer checkpoint: it needs no work of its own, and it does not
        # keep the logs from looking settled (at rest each of ten witnesses' lines
        # made every log republish, and the last witnesses waited out the interval).
        done = self._cosigned.get(origin)
        if done is not None and data.startswith(done):
            # The log, at a checkpoint we cosigned: only its own node publishes on
            # its subject (the hub's permissions), and it republishes while it runs.
            self.seen[origin] = int(time.time())
            if self._our_line in data:
                # Ours reached the log: a copy held from before it did is resolved.
                self._drop_held_copy(origin)
                return
            # Without our line: ours is on its way, or was lost (a hub restart). Unless
            # a copy with it comes first, the next round signs it again.
            self._pending.setdefault(origin, data)
            return
        held = self._pending.get(origin) or (self._batch or {}).get(origin)
        self._pending[origin] = data
        if held is None or _note_text(held) != _note_text(data):
            self._newest = time.monotonic()

    def _round_due(self) -> float:
        """When the next round is due (``time.monotonic``) while the logs grow: see the class."""
        if self._last_round == -math.inf:
            return -math.inf
        # Counted on the monotonic clock from the last round's start: a step of the
        # wall clock since then moves no round out of its half to one and a half intervals.
        later = next_round(self._last_round_wall, self.interval) - self._last_round_wall
        return self._last_round + later

    def _start_round(self, now: float) -> None:
        """Take the pending checkpoints for a round, and say when its work is due."""
        # On time after the last round, the logs not settled: under load (the class).
        busy = now - self._last_round < 2 * self.interval and self._newest + self.settled > now
        delay = _jitter.uniform(0, self.spread * self.interval) if busy else 0.0
        self._last_round = now
        self._last_round_wall = time.time()
        self._batch, self._pending = self._pending, {}
        self._work_at = now + delay
        # What the round puts back for a retry waits for the interval; only a
        # new arrival can make the pending set settle (and a round come sooner).
        self._newest = math.inf

    async def _round(self, nc: Client, batch: dict[str, bytes]) -> None:
        results = await asyncio.gather(
            *(self._prepare(nc, origin, data) for origin, data in batch.items()),
            return_exceptions=True,
        )
        alarms: list[tuple[WitnessAlarmError, Checkpoint]] = []
        await self._cosign(nc, batch, results, alarms)
        # Only after the round's cosignatures have gone: telling a standing fork's
        # branch from another asks the forked log for a proof, which may time out.
        await asyncio.gather(*(self._witness_alarm(nc, exc, cp) for exc, cp in alarms))

    async def _cosign(
        self,
        nc: Client,
        batch: Mapping[str, bytes],
        results: Sequence[tuple[Opened, int, list[bytes]] | BaseException | None],
        alarms: list[tuple[WitnessAlarmError, Checkpoint]],
    ) -> None:
        """Add the round's prepared checkpoints to the witness, save it, publish the cosignatures.

        The alarms raised are appended to ``alarms``, with the checkpoint that raised each.
        """
        before = dict(self.witness.state)
        cosigned: dict[str, str] = {}
        failures: list[tuple[str, bytes, BaseException]] = []
        now = int(time.time())
        for (origin, data), result in zip(batch.items(), results, strict=True):
            if isinstance(result, BaseException):
                failures.append((origin, data, result))
            elif result is not None:
                opened, old, proof = result
                try:
                    cosigned[origin] = self.witness.add_opened(old, proof, opened, now)
                except WitnessAlarmError as exc:
                    alarms.append((exc, opened.checkpoint))
                except Exception as exc:  # noqa: BLE001 - sorted out by _failure
                    failures.append((origin, data, exc))
        refused = {origin for origin, data, exc in failures if self._failure(origin, data, exc)}
        for origin in batch.keys() - refused:
            self._last_warned.pop(origin, None)
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
            # Ours, not a partner's: witness_refused said it as a partner's fault (a
            # full-disk trial). Warned once per reason, as those are.
            self.last_error = f"witness: {exc}"
            if self.last_error != self._last_warned.get(""):
                log.error("witness_state_unsaved", error=str(exc)[:200])  # noqa: TRY400 - one line
                self._last_warned[""] = self.last_error
            return
        self._last_warned.pop("", None)
        self._cosigned = {origin: cosigned_text(origin, st) for origin, st in state.items()}
        for origin, cosignature in cosigned.items():
            try:
                await nc.publish(f"msmt.audit.{self.member}.cosignature", cosignature.encode())
            except nats.errors.Error as exc:
                self.last_error = f"witness: cosignature publish: {type(exc).__name__}"
                return
            # The log republished this checkpoint with other witnesses' lines while
            # the round waited (``spread``): without ours, as ours was not yet sent.
            # Not a lost cosignature to sign again; a later copy still without it is.
            self._drop_held_copy(origin)
            self.seen[origin] = int(time.time())

    def _drop_held_copy(self, origin: str) -> None:
        """Forget a held copy of the checkpoint of ``origin``'s we last cosigned: not newer."""
        held = self._pending.get(origin)
        if held is not None and held.startswith(self._cosigned[origin]):
            del self._pending[origin]

    def _failure(self, origin: str, data: bytes, exc: BaseException) -> bool:
        """Act on one partner's checkpoint that was not cosigned; return whether it was refused.

        A failure that is not one of our refusals (a bug a partner's bytes
        reached) costs that checkpoint alone: it is not cosigned (a check that
        failed unexpectedly has not passed), and the round goes on.
        """
        if isinstance(exc, _StaleError):
            return False  # old news, replayed: nothing to cosign or to warn of
        if isinstance(exc, _UnreachableError):
            # The log may be idle from now on: keep its checkpoint for the next round.
            self._pending.setdefault(origin, data)
            self._refused(origin, exc)
            return True
        if isinstance(exc, MsmtError):
            self._refused(origin, exc)
            return True
        if not isinstance(exc, Exception):
            raise exc  # cancellation or exit: not a partner's doing
        self._failed("checkpoint", origin, exc)
        return True

    def _refused(self, origin: str, exc: MsmtError) -> None:
        text = f"witness: {exc}"
        self.last_error = text
        # A log that stays unreachable is retried every round: warn once, not each time
        # (with one text for all logs, two failing logs took turns: 237 lines in 10 minutes).
        if text != self._last_warned.get(origin):
            log.warning("witness_refused", error=str(exc)[:200])
            self._last_warned[origin] = text

    async def _prepare(
        self, nc: Client, origin: str, data: bytes
    ) -> tuple[Opened, int, list[bytes]] | None:
        """Verify a partner's checkpoint and fetch the proof from what we cosigned before.

        Checklist (each step raises): 1. the note is a checkpoint signed by the
        log it names (``Witness.open``; before any request, so a forgery costs
        no round trip); 2. that log is the one whose subject carried it (a
        member replaying another's old checkpoint must not pass for that log
        rolling back); 3. the log's reply proves the sizes we asked for. Returns
        ``None`` when we already cosigned exactly this checkpoint and the note
        carries our line.
        """
        try:
            opened = self.witness.open(data)
        except UnknownLogError:
            if origin not in self.log_keys:
                raise  # a member's log we do not follow (not in our roster): as it says
            # The note's first line names no log we follow: whatever it is, it is
            # not a checkpoint of the log whose subject carried it.
            raise AuditError(
                f"a note on {origin}'s checkpoint subject is not a checkpoint of a log"
                " this witness follows (its first line names none)"
            ) from None
        checkpoint = opened.checkpoint
        if checkpoint.origin != origin:
            raise AuditError(
                f"checkpoint for {checkpoint.origin!r} published on {origin}'s subject"
            )
        known = self.witness.state.get(origin, LogState(0, b""))
        if checkpoint.size == known.size and checkpoint.root == known.root:
            # Already cosigned; once more if our line never reached the log
            # (C2SP tlog-witness cosigns a checkpoint at the size it holds again).
            return None if self._our_line in data else (opened, known.size, [])
        if checkpoint.size < known.size:
            await self._below(nc, checkpoint, known)  # returns only for the alarm
            return opened, known.size, []
        proof: list[bytes] = []
        if 0 < known.size < checkpoint.size:
            reply, signed = await self._ask_proof(nc, origin, known.size, checkpoint.size)
            if reply.error is not None:
                raise AuditError(
                    f"{origin}'s proof reply refused: the log answered with an error:"
                    f" {excerpt(reply.error, 120)}"
                )
            proof = list(reply.proof)
            if not signed and not _proves(known.size, checkpoint, known.root, proof):
                # Anyone on the way (the hub) can make up a failing proof: without
                # the log's signature it is no evidence of a fork.
                raise AuditError(
                    f"{origin}'s proof from size {known.size} to {checkpoint.size} does not"
                    " verify, and the log did not sign it: not cosigned, and no alarm (the"
                    " reply may not be the log's; the hub's, say)"
                )
        return opened, known.size, proof

    async def _ask_proof(
        self, nc: Client, origin: str, old: int, new: int
    ) -> tuple[ProofReply, bool]:
        """Ask ``origin``'s log for a proof from ``old`` to ``new``: the reply, and if it is signed.

        Raises ``_UnreachableError`` without a reply, ``AuditError`` for a
        malformed one or a proof of other sizes.
        """
        nonce = os.urandom(NONCE_BYTES)
        reply = await self._request_proof(nc, origin, old, new, nonce)
        if reply.error == EARLIER_REQUEST_REFUSAL and reply.log is None:
            # A log of a version before signed replies (a federation upgrading a member
            # at a time): asked its way, its unsigned proof is cosigned if it verifies,
            # never taken as evidence against it. Whoever strips the nonce on the way
            # (the hub) gains nothing it lacks: it can withhold any reply.
            if self.throttle.due("earlier version", origin):
                log.info("witness_earlier_version", log=origin)
            reply = await self._request_proof(nc, origin, old, new, b"")
        if reply.old is not None and (reply.old, reply.new) != (old, new):
            raise AuditError(f"{origin} answered a proof for other sizes")
        return reply, reply.signed_by(origin, nonce, self.log_keys.get(origin, ()))

    async def _request_proof(
        self, nc: Client, origin: str, old: int, new: int, nonce: bytes
    ) -> ProofReply:
        """One proof request to ``origin``'s log and its parsed reply (``_ask_proof``)."""
        try:
            msg = await nc.request(
                f"msmt.audit.{origin}.proof", proof_request(old, new, nonce), timeout=PROOF_TIMEOUT
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise _UnreachableError(f"no proof from {origin}: {type(exc).__name__}") from None
        try:
            return parse_proof_response(msg.data)
        except AuditError as exc:
            raise AuditError(f"{origin}'s proof reply refused: {exc}") from None

    async def _below(self, nc: Client, checkpoint: Checkpoint, known: LogState) -> None:
        """A checkpoint below the size we cosigned: return only if the log says it rolled back.

        Its signature proves only that the log once had that size, and the hub
        can replay it (C2SP tlog-witness answers one as stale, not as an alarm).
        So the log is asked for a proof from it to what we cosigned: signed and
        verifying, the checkpoint is old news (``_StaleError``); signed and
        saying the log is smaller now, or not verifying, it is the log's own word
        that it went back, and the caller raises the rollback alarm. Anything
        else (no reply, an unsigned one) proves nothing either way (``AuditError``).
        """
        origin = checkpoint.origin
        if checkpoint.size == 0:  # the empty tree, which every log extends
            raise _StaleError(f"{origin}'s size 0, before {known.size}")
        try:
            reply, signed = await self._ask_proof(nc, origin, checkpoint.size, known.size)
        except _UnreachableError:
            reply, signed = ProofReply(error="no reply"), False
        if signed and reply.error is None:
            if _proves(
                checkpoint.size,
                Checkpoint(origin, known.size, known.root),
                checkpoint.root,
                list(reply.proof),
            ):
                raise _StaleError(f"{origin}'s size {checkpoint.size}, before {known.size}")
            return  # the log signed a proof that its old checkpoint is not a prefix of ours
        if signed and reply.size is not None and reply.size < known.size:
            return  # the log says it is smaller than what it showed us before
        raise AuditError(
            f"a checkpoint of {origin}'s log at size {checkpoint.size}, below the size"
            f" {known.size} this witness cosigned, and the log does not vouch for it being"
            " current: an old checkpoint replayed (by the hub), or a rollback (by a log of an"
            " earlier version, whose replies are unsigned, too); not cosigned, and no alarm"
        )

    async def _witness_alarm(
        self, nc: Client, exc: WitnessAlarmError, checkpoint: Checkpoint
    ) -> None:
        """Raise a fork or rollback alarm on a partner's log; new unless ``_same_branch``."""
        try:
            same = await self._same_branch(nc, exc.kind, exc.origin, checkpoint)
        except Exception as bug:  # noqa: BLE001 - a partner's reply must not stop witnessing
            self._failed("proof reply", exc.origin, bug)
            same = False
        self._alarm(exc.kind, exc.origin, str(exc), new=not same)
        self._standing[exc.kind, exc.origin].checkpoint = checkpoint

    async def _same_branch(self, nc: Client, kind: str, origin: str, new: Checkpoint) -> bool:
        """Whether ``new`` is on the branch whose checkpoint last raised the standing alarm.

        It is if it is that checkpoint again (republished), or if the log proves
        that one of the two extends the other (the branch grew, or a late
        checkpoint of it came), or if the log gives no word of its own (no
        reply, a malformed or unsigned one: the hub may have made it, and must not
        count the alarm again). Another root at the same size, or a proof or a
        refusal the log signed that does not link them, is another conflict.
        """
        standing = self._standing.get((kind, origin))
        if not self.alarm_active(kind, origin) or standing is None or standing.checkpoint is None:
            return False
        small, large = sorted((standing.checkpoint, new), key=lambda c: c.size)
        if small.size in (0, large.size):  # no proof to ask for
            return small == large
        try:
            reply, signed = await self._ask_proof(nc, origin, small.size, large.size)
        except AuditError:
            return True  # no word from the log (the hub may keep it): no new conflict
        if reply.error is None and _proves(small.size, large, small.root, list(reply.proof)):
            return True
        # Only the log's own word makes it another conflict: a reply made up on the
        # way (the hub's) must not count the alarm again.
        return not signed


# When a round's work comes (``AuditNet.spread``). Not a secret: the OS's source
# only spares a seed of ours, and keeps each node's draws its own.
_jitter = random.SystemRandom()


def next_round(started: float, interval: float) -> float:
    """When the round after one that started at ``started`` is due, both on the wall clock.

    The first multiple of ``interval`` (seconds since the epoch) at least half an
    interval after ``started``: every witness's rounds fall on the same multiples,
    also after one of them started late, and no two come closer than half an interval.
    """
    if interval <= 0:
        return started
    return math.ceil((started + interval / 2) / interval) * interval


def _proves(old_size: int, new: Checkpoint, old_root: bytes, proof: list[bytes]) -> bool:
    """Whether ``proof`` links the tree of ``old_size`` and ``old_root`` to ``new``."""
    try:
        verify_consistency(old_size, new.size, old_root, new.root, proof)
    except AuditError:
        return False
    return True


def _note_text(data: bytes) -> bytes:
    """A note's text and the blank line after it: the checkpoint, whatever its signatures."""
    return data[: data.rfind(b"\n\n") + 2]
