"""The node's audit traffic on NATS: proofs for its own log, witnessing the partners' logs.

Message bodies are built and parsed by ``broker.checkpoint`` (docs/AUDIT.md):

* ``msmt.audit.<ME>.proof`` (service): answer ``{"old": m, "new": n, "nonce": ...}``
  with a consistency proof from our own audit log (empty for ``old`` 0, as C2SP
  tlog-witness has it), or a refusal, signed with our log key over the nonce;
  ``{"error": reason}`` unsigned for a request we cannot read;
* ``msmt.audit.<P>.checkpoint`` (each partner's latest signed checkpoint): act as
  witness (C2SP tlog-witness logic in ``broker.witness.Witness``): ask ``P`` for a
  proof from the size we last cosigned, check it, persist the new state, and
  only then publish our cosignature on ``msmt.audit.<ME>.cosignature``. A fork
  or rollback raises the alarm (log, metric, status) and is never cosigned, but
  only on the log's own word: two roots it signed for one size, or a failing
  proof or a smaller size it signed for our nonce. A reply that is not signed so
  may be the hub's, which routes every request and can replay old checkpoints:
  such a checkpoint is not cosigned, and raises no alarm (``_below``).
  Only each log's latest checkpoint is witnessed, in rounds (``AuditNet``);
* ``msmt.audit.<ME>.checkpoint`` (our own subject, which only our account may
  publish on): our own checkpoints echo back; the latest is checked against our
  audit log at most once a second. One our log holds is our echo; one signed by
  our own log key that our log does not hold comes from another process with
  our credentials (a second node of ours, or a restored or forked copy) and
  raises the ``twin`` alarm (``twin_active``; the node pauses its inbox while it
  stands, see below); anything
  else is refused quietly. The echoes of the notes the node says it published
  (``published``) are dropped unchecked, so they cannot crowd a twin's note out;
* ``msmt.audit.<W>.cosignature``: a witness's cosignature of one of our
  checkpoints is verified against the roster and merged into our audit log;
  those of other logs (every witness's reach every node) are dropped by their
  first line, unparsed. A note about our log that is not one of our
  checkpoints is the publisher's invention and is refused quietly, unless our
  own log key signed it: that is proof of a fork (or a rollback), and raises
  the alarm.

Whatever a partner sends costs at most the one message or checkpoint it is in:
a failure that is not a refusal is logged by its type alone and the node goes
on. Repeated log lines (alarms, refusals) are written once a minute per kind and
log; refusals count each one. Cosignatures merged into our log are logged as
one ``cosigned`` line: the first at once, then what came since once a minute
(lines merged by witness, checkpoints, the largest size), not one line per note.

An alarm *stands* for its kind and log from its first conflicting checkpoint
until ``ALARM_CLEAR_S`` after the last one (``alarm_active``), and counts once
per conflict rather than per checkpoint: a partner's forked log that keeps
publishing (its branch growing) is one alarm while it can prove each new
checkpoint extends the last conflicting one (the witness asks it, as for any
consistency proof); a checkpoint it cannot prove so is another conflict and
counts again. Conflicts of our own log (``twin``, and a fork or rollback our
own key signed) count once while they stand: no one serves the other
branch's proofs to tell two apart.

Witness state lives in ``<data_dir>/witness-state.json``, written atomically
(fsync, rename) before a cosignature leaves the node: a witness that forgot
what it cosigned could be rolled back.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nats.errors
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge

from broker.auditlog import AuditLog
from broker.checkpoint import (
    EARLIER_REQUEST_REFUSAL,
    NONCE_BYTES,
    Checkpoint,
    ProofReply,
    open_checkpoint,
    parse_body,
    parse_proof_request,
    parse_proof_response,
    proof_refusal,
    proof_request,
    proof_response,
    unsigned_proof_response,
)
from broker.errors import AuditError, MsmtError, StoreError
from broker.files import write_durably
from broker.log import Throttle, get_logger
from broker.members import is_member
from broker.merkle import verify_consistency
from broker.note import (
    ALG_ED25519,
    Note,
    NoteError,
    Verifier,
    excerpt,
    find_signature,
    parse,
    verify_ed25519,
)
from broker.publisher import RunDb
from broker.witness import (
    LogState,
    Opened,
    UnknownLogError,
    Witness,
    WitnessAlarmError,
    dump_state,
    load_witness_state,
)

log = get_logger("auditnet")

PROOF_TIMEOUT: Final = 3.0
QUEUE_LIMIT: Final = 256
WITNESS_INTERVAL_S: Final = 5.0
"""While logs keep growing, witnessing rounds start on the wall clock's multiples of
this (seconds since the epoch), at least half of it apart: under load a partner's log
is cosigned this often, not at each of its batches, and every witness's rounds start
together (``next_round``). A round once the logs settle comes sooner (``SETTLED_S``)."""
WITNESS_SPREAD: Final = 0.9
"""Under load, a round's work (proofs, cosignatures) comes at a random point of this
fraction of the interval after the round's start: see ``AuditNet``."""
SETTLED_S: Final = 1.5
"""A pending checkpoint not superseded for this long is its log's last for now
(a growing log publishes a newer one every second): no need to wait further."""
ECHO_INTERVAL_S: Final = 1.0
"""Our own checkpoints echo back on our own subject: the latest one is checked
against our log at most this often (one store read), newer arrivals replacing it."""
LOG_EVERY_S: Final = 60.0
"""The same alarm or refusal is logged at most this often per kind and log (or
publisher): a partner repeating a message must not flood the log. Each still counts."""
ALARM_CLEAR_S: Final = 180.0
"""An alarm stands this long after the last conflicting checkpoint seen (a twin's, a
forked log's): three times the 60 s within which every node publishes its latest
again, so an idle twin or forked log is not taken for gone between two checkpoints."""
PUBLISHED_KEPT: Final = 4
"""Our own latest checkpoint notes, whose echoes are dropped unchecked."""
GROWN_KEPT: Final = 4096
"""Our own checkpoints published since the start, each with when, that some witness has
not cosigned yet (``uncosigned_seconds``): over an hour of a log growing every second.
Beyond it the oldest kept is taken for the first, so the figure is a lower bound."""


def save_witness_state(path: Path, state: Mapping[str, LogState]) -> None:
    """Write the witness state durably (``write_durably``); ``AuditError`` if it cannot.

    Durable before any cosignature it records is published: a witness that forgot
    what it cosigned, at a power cut, cosigned a fork of that log afterwards.
    """
    try:
        write_durably(path, dump_state(state))
    except OSError as exc:  # a full disk must cost a cosignature, not the node
        raise AuditError(f"cannot save witness state {path}: {exc.strerror}") from None


class _UnreachableError(AuditError):
    """A log did not answer our proof request (it may be down, or the hub away)."""


class _StaleError(AuditError):
    """An older checkpoint of a log than we cosigned, which the log proves it extends.

    Only the hub replays those (a log's node publishes its latest): nothing to cosign,
    and nothing to warn of, as C2SP tlog-witness answers an old checkpoint.
    """


class _NotOursError(AuditError):
    """A cosigned checkpoint names our log but our log does not hold it.

    ``kind`` is the alarm it raises if our own log key signed it: ``"fork"``,
    or ``"rollback"`` for a size beyond our log.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(slots=True)
class _Standing:
    """An alarm standing for one kind and log: when its last conflicting checkpoint came.

    ``checkpoint`` is that checkpoint, for a partner's log: the next one counts
    again unless it is the same or the log proves that it extends it.
    """

    seen: float
    checkpoint: Checkpoint | None = None


class AuditNet:
    """Serves proofs of our log, witnesses partners' logs, and collects our cosignatures.

    Witnessing runs in rounds: a round takes the latest pending checkpoint of
    every partner (older ones are superseded: cosigning the latest covers them,
    since it is proved consistent with what we cosigned before), asks the logs
    for their proofs concurrently, and saves the state once before publishing
    the round's cosignatures. A round starts at the first multiple of
    ``interval`` on the wall clock at least half an interval after the last one
    (``next_round``), or sooner once every pending checkpoint has stood
    ``settled`` seconds without a newer one (the logs stopped growing). So while
    logs grow each is cosigned every ``interval`` seconds rather than at every
    batch, and when they stop their last checkpoints are cosigned promptly; the
    first checkpoint after an idle spell starts a round at once.

    Every node's rounds start together: at the same multiples of the interval
    under load (their clocks agree to well within the second between two of a
    log's checkpoints, docs/NODE.md), and at the first checkpoint after a quiet
    spell, which reaches all of them at once. So under load they take the same
    checkpoints and the witnesses' cosignatures meet on them: the quorum an
    auditor asks for. A round that starts late (its loop starved, the last
    round's proof timing out) takes later checkpoints than the others', but the
    next is back in step; timed from each witness's own last round, as they
    were, one late start kept a witness out of step until the next quiet spell
    and split the quorum under load (bench/README.md).

    Their work, ~300 ms of CPU across the network, would then come all at once
    too; it did, and delayed every report in flight (bench/README.md). So a
    round that comes on time after the last one (the logs still growing) takes
    its checkpoints at its start and does its work at a random point within
    ``spread`` of the interval after it: the same checkpoints cosigned, the work
    spread out. The first round after a quiet spell and a settled one are not
    delayed, and a delayed one's work comes at once if the logs settle
    meanwhile.

    ``alarms`` counts fork, rollback and twin alarms by ``kind`` and ``log`` (the
    origin), once per conflict (see the module); ``active``, if given, a gauge with
    the same labels, says which alarms stand (``alarm_active``). ``refused``,
    if given, a counter with a ``reason`` label (the node's ``msmt_rejected``),
    counts cosignature notes (``cosignature``) and notes on our own checkpoint
    subject (``checkpoint``) refused as their publisher's forgeries.
    ``own_log_keys`` are our log keys that partners trust besides ``signer``'s
    (the roster's retired ones): a checkpoint one of them signed that our log
    lacks is a fork too. ``on_twin``, if set, is called at each twin checkpoint seen.
    ``witnessed``, if given, a gauge with a ``log`` label, reads ``seen`` for each
    partner's log: when we last saw it at a checkpoint we cosigned. ``uncosigned``,
    if given, a gauge with a ``witness`` label, reads ``uncosigned_seconds`` for each
    witness of our log.
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
        *,
        spread: float = WITNESS_SPREAD,
        refused: PromCounter | None = None,
        own_log_keys: Sequence[Verifier] = (),
        active: PromGauge | None = None,
        witnessed: PromGauge | None = None,
        uncosigned: PromGauge | None = None,
    ) -> None:
        self.member = member
        self.audit = audit
        self.run_db = run_db
        self.state_path = state_path
        self.log_keys = {origin: list(keys) for origin, keys in log_keys.items()}
        self.witness = Witness(member, signer, log_keys, load_witness_state(state_path))
        self.cosigners = list(cosigners)
        self.alarms = alarms
        self.refused = refused
        self._signer = signer  # our log key: it signs our proof replies
        self.throttle = Throttle(LOG_EVERY_S)
        # Only our own log keys can prove that our log forked: the key our log signs
        # with, and any earlier one partners still trust (a retired key; never a
        # revoked one, whose holder may be anyone). A fork under a pre-rotation key
        # is as real to a partner as one under the current key.
        current = Verifier(member, ALG_ED25519, signer.public_key().public_bytes_raw())
        self._own_keys = [current, *(k for k in own_log_keys if k != current)]
        self.interval = interval
        self.settled = settled
        self.spread = spread
        self.last_error: str | None = None
        self.alarm: str | None = None
        """The latest alarm not yet taken by the node: kept apart from ``last_error``,
        which a partner's junk on its own subject can overwrite within seconds."""
        # The last witness_refused text by log ("" for our own state's save): a log
        # that stays unreachable is retried every round, and warned of once.
        self._last_warned: dict[str, str] = {}
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(QUEUE_LIMIT)
        self._pending: dict[str, bytes] = {}
        self._newest = math.inf  # when the newest pending checkpoint arrived
        # A round's checkpoints, taken at its start, and when its work is due (``spread``).
        self._batch: dict[str, bytes] | None = None
        self._work_at = -math.inf
        # The latest note seen on our own checkpoint subject, not yet checked (``_watch_own``).
        self.echo_interval = ECHO_INTERVAL_S
        self._echo: bytes | None = None
        self._published: deque[bytes] = deque(maxlen=PUBLISHED_KEPT)
        self.alarm_clear = ALARM_CLEAR_S
        self._standing: dict[tuple[str, str], _Standing] = {}
        self.on_twin: Callable[[], None] | None = None
        self.seen: dict[str, int] = {}
        """Each partner's log: when (Unix time) we last saw it at a checkpoint we cosigned."""
        self._echo_arrived = asyncio.Event()
        self._last_round = -math.inf
        self._last_round_wall = -math.inf  # the same instant on the wall clock
        # A cosignature note starts with the checkpoint's origin line: ours start with this.
        self._ours = f"{member}\n".encode()
        # Our cosignature line in a partner's note, as the log merged it.
        self._our_line = f"\n\u2014 {member} ".encode()
        self._cosigned = {
            origin: _cosigned_text(origin, st) for origin, st in self.witness.state.items()
        }
        # Cosignatures of our checkpoints merged and not yet logged (``_log_cosigned``).
        self.cosigned_every = LOG_EVERY_S
        self._merged: Counter[str] = Counter()
        self._merged_notes = 0
        self._merged_size = 0
        self._merged_logged = -math.inf
        # Our log as each witness last cosigned it (its size), and our checkpoints
        # published since the start beyond what some witness cosigned, with when
        # (monotonic), oldest first: what ``uncosigned_seconds`` reads.
        self.cosigned_size: dict[str, int] = {}
        self._grown: deque[tuple[int, float]] = deque(maxlen=GROWN_KEPT)
        self._bind(active, witnessed, uncosigned)

    def _bind(
        self, active: PromGauge | None, witnessed: PromGauge | None, uncosigned: PromGauge | None
    ) -> None:
        """Have each given gauge read its figures from here, series by series."""
        if active is not None:
            for kind, origin in [("twin", self.member)] + [
                (kind, origin)
                for kind in ("fork", "rollback")
                for origin in (self.member, *self.log_keys)
            ]:
                active.labels(kind=kind, log=origin).set_function(
                    functools.partial(self._active_value, kind, origin)
                )
        if witnessed is not None:
            for origin in self.log_keys:
                witnessed.labels(log=origin).set_function(functools.partial(self._seen, origin))
        if uncosigned is not None:
            for witness in self.cosigners:
                uncosigned.labels(witness=witness.name).set_function(
                    functools.partial(self.uncosigned_seconds, witness.name)
                )

    def _seen(self, origin: str) -> float:
        return float(self.seen.get(origin, 0))

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

    def uncosigned_seconds(self, witness: str) -> float:
        """How long ``witness`` has left a checkpoint of our log we published uncosigned.

        Seconds since the first checkpoint published beyond the size it last
        cosigned (since this node started, at most, or ``GROWN_KEPT`` checkpoints
        ago): 0 once it has cosigned the latest. A witness that stops cosigning
        our log shows here, not only at the next audit.
        """
        cosigned = self.cosigned_size.get(witness, -1)
        for size, at in self._grown:
            if size > cosigned:
                return time.monotonic() - at
        return 0.0

    def alarm_active(self, kind: str, origin: str) -> bool:
        """Whether the ``kind`` alarm on ``origin``'s log stands (seen within ``alarm_clear`` s)."""
        standing = self._standing.get((kind, origin))
        return standing is not None and time.monotonic() - standing.seen < self.alarm_clear

    def _active_value(self, kind: str, origin: str) -> float:
        return 1.0 if self.alarm_active(kind, origin) else 0.0

    def twin_active(self) -> bool:
        """Whether the twin alarm stands: a twin's checkpoint seen within ``alarm_clear`` s."""
        return self.alarm_active("twin", self.member)

    @property
    def backlog(self) -> int:
        """Checkpoints received but not yet witnessed (queued, plus the latest held per log)."""
        return self._queue.qsize() + len(self._pending) + len(self._batch or ())

    async def subscribe(self, nc: Client) -> None:
        """Subscribe to the audit subjects on ``nc`` (call again after a new connection)."""
        await nc.subscribe(f"msmt.audit.{self.member}.proof", cb=self._on_proof_request)
        await nc.subscribe("msmt.audit.*.checkpoint", cb=self._on_checkpoint)
        await nc.subscribe("msmt.audit.*.cosignature", cb=self._on_cosignature)

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

    async def _on_checkpoint(self, msg: Msg) -> None:
        origin = msg.subject.split(".")[2]
        if origin == self.member:
            if msg.data in self._published:
                return  # byte for byte what we published: our echo
            # Latest wins: ``_watch_own`` checks one at most every ``echo_interval``.
            self._echo = msg.data
            self._echo_arrived.set()
            return
        if not is_member(origin):
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

    def _log_cosigned(self, *, now: bool = False) -> None:
        # About 33 notes a minute reach a node under load, each merging a line or
        # two: one line a minute says as much (which witnesses, how far), and the
        # audit log keeps each line with its time.
        if not self._merged_notes:
            return
        if not now and time.monotonic() - self._merged_logged < self.cosigned_every:
            return
        log.info(
            "cosigned",
            witnesses=dict(sorted(self._merged.items())),
            checkpoints=self._merged_notes,
            size=self._merged_size,
        )
        self._merged, self._merged_notes, self._merged_size = Counter(), 0, 0
        self._merged_logged = time.monotonic()

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

    async def run(self, nc: Client, stop: asyncio.Event) -> None:
        """Witness partners' checkpoints in rounds (see the class) until ``stop``.

        Meanwhile the notes on our own checkpoint subject are checked (``_watch_own``).
        """
        try:
            await self.run_db(self._cosigned_at_start)
        except MsmtError as exc:
            # Each witness then counts as not having cosigned since the start.
            self.last_error = f"audit log: {exc}"[:300]
            log.error("audit_log_unreadable", error=str(exc)[:200])  # noqa: TRY400 - no traceback
        watcher = asyncio.create_task(self._watch_own())
        try:
            await self._witness(nc, stop)
        finally:
            watcher.cancel()
            await asyncio.wait([watcher])
            self._log_cosigned(now=True)

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
            getting: asyncio.Future[Any] = asyncio.ensure_future(self._queue.get())
            await asyncio.wait([getting, stopping], timeout=wait, return_when="FIRST_COMPLETED")
            if not getting.done():
                # A cancelled get takes nothing: what arrives meanwhile stays queued.
                getting.cancel()
                continue
            self._hold(*getting.result())
            while not self._queue.empty():
                self._hold(*self._queue.get_nowait())

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
            self._refused("", exc)
            return
        self._last_warned.pop("", None)
        self._cosigned = {origin: _cosigned_text(origin, st) for origin, st in state.items()}
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

    def _alarm(self, kind: str, origin: str, detail: str, *, new: bool) -> None:
        # ``new``: a conflict, not one more checkpoint of a standing one: counted.
        if new:
            self.alarms.labels(kind=kind, log=origin).inc()
        self._standing[kind, origin] = _Standing(time.monotonic())
        self.last_error = self.alarm = detail[:300]
        if self.throttle.due(kind, origin):
            log.error("audit_alarm", kind=kind, origin=origin, detail=detail[:300])

    def _forged(self, publisher: str, exc: MsmtError, what: str = "cosignature") -> None:
        # Proof of nothing but the publisher's own misbehaviour: no alarm and no
        # status line it could fill; a warning (once a minute) and a count.
        # ``what``: "cosignature", or "checkpoint" for a note on our own subject.
        if self.refused is not None:
            self.refused.labels(reason=what).inc()
        if self.throttle.due(f"forged_{what}", publisher):
            log.warning(f"{what}_refused", publisher=publisher, error=str(exc)[:200])

    def _failed(self, what: str, source: str, exc: Exception) -> None:
        # An unexpected failure handling one message: the message may quote
        # anything, so only its type is reported.
        self.last_error = f"witness: {what} from {source} failed ({type(exc).__name__})"
        if self.throttle.due(f"failed {what}", source):
            log.error("audit_message_failed", what=what, source=source, error=type(exc).__name__)


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


def _error_reply(reason: str) -> bytes:
    """The proof service's answer to a request it refuses: ``{"error": "<reason>"}``."""
    return json.dumps({"error": reason[:200]}).encode()


def _member_or_unknown(code: str) -> str:
    return code if is_member(code) else "?"


def _note_text(data: bytes) -> bytes:
    """A note's text and the blank line after it: the checkpoint, whatever its signatures."""
    return data[: data.rfind(b"\n\n") + 2]


def _cosigned_text(origin: str, state: LogState) -> bytes:
    """The start of a checkpoint note we already cosigned: its text and the blank line."""
    return (Checkpoint(origin, state.size, state.root).body() + "\n").encode()
