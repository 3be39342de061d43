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

The code is in three parts: ``broker.auditnet_base`` (the state, the figures, the
alarms), ``broker.auditnet_own`` (our own log) and ``broker.auditnet_witness`` (the
partners' logs); ``AuditNet`` joins them and subscribes to the subjects above.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.auditnet_base import (
    ALARM_CLEAR_S,
    ECHO_INTERVAL_S,
    GROWN_KEPT,
    LOG_EVERY_S,
    NOTES_PENDING,
    NOTES_PENDING_BYTES,
    PROOF_PENDING,
    PROOF_TIMEOUT,
    PUBLISHED_KEPT,
    SETTLED_S,
    WITNESS_INTERVAL_S,
    WITNESS_SPREAD,
)
from broker.auditnet_own import OwnLog
from broker.auditnet_witness import Witnessing, next_round, save_witness_state
from broker.errors import MsmtError
from broker.log import get_logger
from broker.members import is_member

__all__ = [
    "AuditNet",
    "next_round",
    "save_witness_state",
    "PROOF_TIMEOUT",
    "NOTES_PENDING",
    "NOTES_PENDING_BYTES",
    "PROOF_PENDING",
    "WITNESS_INTERVAL_S",
    "WITNESS_SPREAD",
    "SETTLED_S",
    "ECHO_INTERVAL_S",
    "LOG_EVERY_S",
    "ALARM_CLEAR_S",
    "PUBLISHED_KEPT",
    "GROWN_KEPT",
]

log = get_logger("auditnet")


class AuditNet(OwnLog, Witnessing):
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

    async def subscribe(self, nc: Client) -> None:
        """Subscribe to the audit subjects on ``nc`` (call again after a new connection)."""
        await nc.subscribe(
            f"msmt.audit.{self.member}.proof",
            cb=self._on_proof_request,
            pending_msgs_limit=PROOF_PENDING,
        )
        for kind, cb in (
            ("checkpoint", self._on_checkpoint),
            ("cosignature", self._on_cosignature),
        ):
            await nc.subscribe(
                f"msmt.audit.*.{kind}",
                cb=cb,
                pending_msgs_limit=NOTES_PENDING,
                pending_bytes_limit=NOTES_PENDING_BYTES,
            )

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
        # Latest wins, per log: when we fall behind, a checkpoint replaced by its log's
        # next only delays a cosignature.
        self._arrived[origin] = msg.data
        self._arrival.set()

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
