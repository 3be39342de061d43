"""The node's audit traffic about its own log: proofs served, cosignatures merged, twins.

``OwnLog`` answers proof requests on ``msmt.audit.<ME>.proof``, merges the witnesses'
cosignatures of our checkpoints into our audit log, and checks the notes on our own
checkpoint subject for a twin (``broker.auditnet`` says how). Apart from witnessing the
partners' logs (``broker.auditnet_witness``): the two share only the state and alarms of
``broker.auditnet_base``. Part of ``broker.auditnet.AuditNet``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import nats.errors
from nats.aio.msg import Msg

from broker.auditnet_base import AuditNetBase
from broker.checkpoint import (
    Checkpoint,
    open_checkpoint,
    parse_body,
    parse_proof_request,
    proof_refusal,
    proof_response,
    unsigned_proof_response,
)
from broker.errors import AuditError, MsmtError, StoreError
from broker.log import get_logger
from broker.members import is_member
from broker.note import Note, NoteError, find_signature, parse, verify_ed25519

log = get_logger("auditnet")


class _NotOursError(AuditError):
    """A cosigned checkpoint names our log but our log does not hold it.

    ``kind`` is the alarm it raises if our own log key signed it: ``"fork"``,
    or ``"rollback"`` for a size beyond our log.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class OwnLog(AuditNetBase):
    """Our own log's side of ``broker.auditnet.AuditNet``: proofs, our cosignatures, twins."""

    def published(self, note: bytes) -> None:
        """Say that we publish ``note`` on our own subject: its echo is then not checked.

        Only the latest note there is checked, once a second: while our log grows
        our own echoes came every second and could take the place of a twin's
        checkpoint before its check, and the twin alarm lapsed while it ran.
        """
        self._published.append(note)
        try:
            size = parse_body(parse(note).text).size
        except NoteError:
            return  # not a checkpoint we could have signed: nothing for a witness
        if not self._grown or size > self._grown[-1][0]:
            self._grown.append((size, time.monotonic()))

    async def _on_proof_request(self, msg: Msg) -> None:
        try:
            old, new, nonce = parse_proof_request(msg.data)
            body = await self.run_db(self._proof_reply, old, new, nonce)
        except StoreError as exc:
            # Our own log could not be read: its words name our paths, which are no
            # partner's business (a security review); the operator gets them here.
            self.last_error = f"witness: proof request: {exc}"
            if self.throttle.due("proof unreadable", ""):
                log.error("proof_unreadable", error=str(exc))  # noqa: TRY400 - no traceback
            body = _error_reply("the log cannot read its entries now")
        except MsmtError as exc:
            body = _error_reply(str(exc))  # a request we could not read: unsigned
        except Exception as exc:  # noqa: BLE001 - one request must not cost more than its reply
            self._failed("proof request", "?", exc)
            body = _error_reply("internal error")
        try:
            await msg.respond(body)
        except nats.errors.Error as exc:
            log.warning("proof_reply_failed", error=type(exc).__name__)

    def _proof_reply(self, old: int, new: int, nonce: bytes) -> bytes:
        """Our signed answer to a proof request (store thread): the proof, or why not.

        Signed with our log key over the witness's nonce: a witness takes a
        failing proof, or a refusal that our log is smaller than what it
        cosigned, as evidence against our log only with our signature on it.
        """
        size = self.audit.size
        if max(old, new) > size and self.throttle.due("own log behind", ""):
            # A witness cosigned more of our log than it holds: restored from a backup
            # (a drill's restored node told its operator nothing while every witness
            # raised a rollback alarm). A witness meeting a smaller log asks from that
            # size to the one it cosigned (a review: not from beyond it). Only a line:
            # any member may ask, unsigned, and the answer is a signed refusal.
            log.warning(
                "own_log_behind_witness",
                asked_from=old,
                asked_to=new,
                log_size=size,
                hint="a witness asks for a proof from a size our log has not reached: if"
                " this node's data was restored from a backup, its log has forked and the"
                " witnesses will not cosign it (docs/DEPLOY.md, 'What a restore means')",
            )
        try:
            proof = self._consistency_proof(old, new)
        except StoreError:
            raise
        except MsmtError as exc:  # about the request: the sizes asked for
            if not nonce:  # a witness of a version before signed replies reads only these
                return _error_reply(str(exc))
            return proof_refusal(
                self.member, old, new, str(exc), size=size, nonce=nonce, signer=self._signer
            )
        if not nonce:
            return unsigned_proof_response(old, new, proof)
        return proof_response(
            self.member, old, new, proof, size=size, nonce=nonce, signer=self._signer
        )

    def _consistency_proof(self, old: int, new: int) -> list[bytes]:
        # C2SP tlog-witness: old size 0 means the witness has no checkpoint of
        # this log yet, and the proof is empty. RFC 9162 defines no proof from
        # the empty tree, so the log's Merkle code refuses it; answered here.
        if old == 0:
            if new > self.audit.size:
                raise AuditError(
                    f"no consistency proof from size 0 to {new} (log size {self.audit.size})"
                )
            return []
        return self.audit.consistency_proof(old, new)

    async def _on_cosignature(self, msg: Msg) -> None:
        # Every witness's cosignatures of every log reach every node; only those
        # of our own checkpoints concern us, and their first line says so. Those
        # are parsed and verified in full below.
        if not msg.data.startswith(self._ours):
            return
        publisher = _member_or_unknown(msg.subject.split(".")[2])
        try:
            await self._take_cosignature(publisher, msg.data)
        except Exception as exc:  # noqa: BLE001 - one message must not cost more than itself
            self._failed("cosignature", publisher, exc)

    async def _take_cosignature(self, publisher: str, data: bytes) -> None:
        """Merge a cosignature note of one of our checkpoints, or refuse it.

        Checklist: 1. the note parses as a checkpoint; 2. our log holds that
        very checkpoint; 3. each trusted witness's line on it verifies. A note
        failing 1 or 3 is its publisher's invention and is refused quietly (a
        warning, no alarm). One failing 2 is our log forked, or rolled back if
        beyond our size, only if our own log key signed it (``_not_ours``):
        otherwise it says nothing about our log and is refused quietly too.
        """
        try:
            note = parse(data)
            checkpoint = parse_body(note.text)
        except NoteError as exc:
            self._forged(publisher, exc)
            return
        try:
            names = await self.run_db(self._merge_cosignatures, checkpoint, data)
        except _NotOursError as exc:
            self._not_ours(publisher, note, exc)
            return
        except NoteError as exc:
            self._forged(publisher, exc)
            return
        except MsmtError as exc:  # our store failed: no fault of the publisher's
            self._not_stored(exc)
            return
        if names:
            self._merged.update(names)
            self._merged_notes += 1
            self._merged_size = max(self._merged_size, checkpoint.size)
            self._log_cosigned()
            self._cosigned_by(names, checkpoint.size)

    def _cosigned_by(self, names: Sequence[str], size: int) -> None:
        # Checkpoints every witness has cosigned beyond are no one's concern any more.
        for name in names:
            self.cosigned_size[name] = max(self.cosigned_size.get(name, -1), size)
        everyone = min((self.cosigned_size.get(w.name, -1) for w in self.cosigners), default=-1)
        while self._grown and self._grown[0][0] <= everyone:
            self._grown.popleft()

    def _cosigned_at_start(self) -> None:
        """Which witnesses cosigned our latest stored checkpoint (store thread)."""
        latest = self.audit.latest_checkpoint()
        if latest is None:
            return
        note = parse(latest)
        size = parse_body(note.text).size
        self._cosigned_by([w.name for w in self.cosigners if find_signature(note, w)], size)

    def _merge_cosignatures(self, checkpoint: Checkpoint, data: bytes) -> list[str]:
        """Steps 2-3 of ``_take_cosignature``, on the store thread."""
        unheld = self._unheld(checkpoint)
        if unheld is not None:
            raise unheld
        return self.audit.add_cosignatures(data, self.cosigners)

    def _unheld(self, checkpoint: Checkpoint) -> _NotOursError | None:
        """How our log lacks ``checkpoint`` (``None`` if it holds exactly it); store thread."""
        size = self.audit.size
        if checkpoint.size > size:
            return _NotOursError("rollback", f"size {checkpoint.size}, ours {size}: beyond our log")
        try:
            stored = self.audit.checkpoint_at(checkpoint.size)
        except AuditError:
            why = "a size our log never had"
        else:
            if parse(stored).text == checkpoint.body():
                return None
            why = "another root than ours"
        return _NotOursError("fork", f"size {checkpoint.size}, ours {size}: {why}")

    def _not_ours(self, publisher: str, note: Note, exc: _NotOursError) -> None:
        # Anyone can write a checkpoint with our origin line; only a valid
        # signature by one of our log keys proves that our log forked (a restored
        # backup, a stolen key). A note without one is refused quietly.
        for key in self._own_keys:
            if find_signature(note, key) is None:
                continue
            try:
                verify_ed25519(note, key)
            except NoteError as bad:
                self._forged(publisher, bad)
                return
            detail = f"our log key signed a checkpoint of {exc} (published by {publisher})"
            self._alarm(
                exc.kind,
                self.member,
                f"{exc.kind} detected on our log {self.member}: {detail}",
                new=not self.alarm_active(exc.kind, self.member),
            )
            return
        self._forged(publisher, NoteError(f"cosigned checkpoint of {exc} is not signed by us"))

    async def _watch_own(self) -> None:
        """Check the notes on our own checkpoint subject: the latest, once per ``echo_interval``."""
        while True:
            await self._echo_arrived.wait()
            self._echo_arrived.clear()
            data, self._echo = self._echo, None
            if data is None:
                continue
            try:
                await self._check_own(data)
            except Exception as exc:  # noqa: BLE001 - one message must not cost more than itself
                self._failed("checkpoint", self.member, exc)
            await asyncio.sleep(self.echo_interval)

    async def _check_own(self, data: bytes) -> None:
        """Check a note on our own checkpoint subject: our own echo, or a twin's checkpoint.

        Only our own NATS account may publish there. Checklist: 1. the note is a
        checkpoint of our log signed by one of our own log keys
        (``open_checkpoint``), else it is refused quietly as a forgery; 2. our
        log holds that very checkpoint: our own echo, nothing to do. One that
        passes 1 but not 2 was signed by another process holding our
        credentials and keys (a second node of ours on another data directory,
        a restored or forked copy): the ``twin`` alarm.
        """
        try:
            checkpoint, _ = open_checkpoint(data, self._own_keys)
        except NoteError as exc:
            self._forged(self.member, exc, "checkpoint")
            return
        detail = await self.run_db(self._twin_detail, checkpoint)
        if detail is not None:
            self._alarm(
                "twin",
                self.member,
                f"another node is publishing checkpoints of our log {self.member} ({detail}):"
                f" is a second node running with {self.member}'s credentials?",
                new=not self.twin_active(),
            )
            if self.on_twin is not None:
                self.on_twin()

    def _twin_detail(self, checkpoint: Checkpoint) -> str | None:
        """Step 2 of ``_check_own``, on the store thread: what differs, or ``None``."""
        unheld = self._unheld(checkpoint)
        return None if unheld is None else str(unheld)

    def _not_stored(self, exc: MsmtError) -> None:
        self.last_error = f"cosignature: {exc}"[:300]
        if self.throttle.due("cosignature_store", self.member):
            log.error("cosignature_not_stored", error=str(exc)[:200])


def _error_reply(reason: str) -> bytes:
    """The proof service's answer to a request it refuses: ``{"error": "<reason>"}``."""
    return json.dumps({"error": reason[:200]}).encode()


def _member_or_unknown(code: str) -> str:
    return code if is_member(code) else "?"
