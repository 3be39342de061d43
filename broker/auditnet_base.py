"""What the node's audit traffic shares: its settings, its state, and how it raises alarms.

``AuditNetBase`` holds what both halves of ``broker.auditnet.AuditNet`` read and write:
its constructor and state, the figures the gauges read (``alarm_active``,
``uncosigned_seconds``, ``backlog``), and how an alarm, a forged note or a failure is
counted and logged. Apart so that each half stays one sitting's read:
``broker.auditnet_own`` (our own log) and ``broker.auditnet_witness`` (the partners' logs).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge

from broker.auditlog import AuditLog
from broker.checkpoint import Checkpoint
from broker.errors import MsmtError
from broker.log import Throttle, get_logger
from broker.note import ALG_ED25519, Verifier
from broker.publisher import RunDb
from broker.witness import LogState, Witness, load_witness_state

log = get_logger("auditnet")

PROOF_TIMEOUT: Final = 3.0
PROOF_PENDING: Final = 256
"""Proof requests waiting at most (nats-py's default is 524,288): past it they are
dropped, and the partner asks again. An insider's flood of 441,000 in 17 s held a node
busy for three minutes and 310 MiB more, its replies too late for anyone (a trial)."""
NOTES_PENDING: Final = 4096
"""Checkpoint and cosignature notes waiting at most, each subscription (notes are at
most a few KiB; a partner's flood is dropped, not buffered)."""
NOTES_PENDING_BYTES: Final = 16 * 1024 * 1024
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


@dataclass(slots=True)
class _Standing:
    """An alarm standing for one kind and log: when its last conflicting checkpoint came.

    ``checkpoint`` is that checkpoint, for a partner's log: the next one counts
    again unless it is the same or the log proves that it extends it.
    """

    seen: float
    checkpoint: Checkpoint | None = None


class AuditNetBase:
    """``broker.auditnet.AuditNet``'s state (its arguments are described there), figures, alarms."""

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
        # The latest checkpoint note received from each log, not yet held: one slot per
        # log, so a partner flooding its own subject replaces only its own (a shared
        # queue of 256 dropped the others', which then went uncosigned: a trial).
        self._arrived: dict[str, bytes] = {}
        self._arrival = asyncio.Event()
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
            origin: cosigned_text(origin, st) for origin, st in self.witness.state.items()
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
        return len(self._arrived) + len(self._pending) + len(self._batch or ())

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


def cosigned_text(origin: str, state: LogState) -> bytes:
    """The start of a checkpoint note we already cosigned: its text and the blank line."""
    return (Checkpoint(origin, state.size, state.root).body() + "\n").encode()
