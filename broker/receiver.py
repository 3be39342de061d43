"""Hub -> inbox: pull from the durable consumer, verify, store, audit, then ack.

``Receiver`` keeps one pull request out at the hub (``Pull``) and hands what
has arrived, up to ``fetch_batch`` messages, to ``Inbound.process`` on the
store's thread; a part batch first waits up to ``LINGER_S`` for more if more
are likely (``Linger``), since each batch costs two fsynced commits. For each batch:

1. the subject must be ``from.<SENDER>.msmt.to.<ME>.<kind>``: the hub's word for
   who sent it (service import prefix) and what, which the envelope's sender and
   signed kind must match;
2. the message must be within ``max_message_bytes``;
3. if the exact same bytes from the same sender were already verified and
   stored (a redelivery after a crash before the ack, or a resend after the
   hub's dedup window), it is acked without storing again;
4. otherwise it must fit in what is left of its sender's budget for the UTC
   day (``sender_bytes_per_day``: ``SenderBudget``), else it is refused
   (``budget``) before any decryption;
5. then ``broker.envelope.receive_batch`` runs the checklist a step at a
   time across the batch, with the replay check against the store's seen-set
   (one statement for the messages of the batch that reach it);
   each message's checklist still runs in its order and decides it alone. A
   message an earlier one could decide (the same sender's report again), or whose
   checklist failed unexpectedly, is verified again with ``receive`` on its own,
   its replay check against the batch so far too;
6. the batch's audit entries are appended durably, then the verified reports
   are stored; only then are messages acked (good) or terminated (bad,
   ``msg.term()`` so the consumer never stalls on them). Each report stored
   has its ``received`` entry. Each refusal is counted (``rejected.<step>``);
   the first ``REFUSALS_LOGGED_PER_MINUTE`` of a source's refusals each minute
   also get an ``inbound_rejected`` line and a ``rejected`` entry of their
   own, and the rest of the source's refusals in the batch one
   ``rejected_many`` entry (a count per step), so junk from a member cannot
   grow the audit log by an entry per message.
   Two failures are held instead (``nak`` with a growing delay, not audited):
   a key this node's roster does not list, and an ``iat`` more than
   ``MAX_SKEW`` ahead of our clock (``HeldError``), until the message is too
   old, and at most ``MAX_HELD_PER_SENDER`` messages of one sender at a time.

If the audit log or store cannot be written, nothing is acked; the batch is
handed back with ``nak`` and redelivered. At a stop, messages delivered but not
yet verified are handed back with ``nak`` too.

``Receiver``, the asyncio loop here, joins parts each apart so that it stays one
sitting's read: ``broker.receiver_pull`` (``Pull`` and ``Linger``: the pull
requests, the wait for company, a delivery's metadata), ``broker.inbound``
(``Inbound``: steps 1 to 6, on the store's thread) and ``broker.inbound_base``
(its state, and what becomes of a refused or held message).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Final

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker.errors import MsmtError
from broker.inbound import Inbound
from broker.inbound_base import BatchResult
from broker.log import Throttle, get_logger
from broker.metrics import Metrics
from broker.natsconfig import inbox_durable, inbox_stream
from broker.publisher import RunDb
from broker.receiver_pull import Pull, hold_delay, hub_pending, published_at

log = get_logger("receiver")

WRITABLE_WAIT_MAX_S: Final = 10.0
"""After a batch the store could not commit, the longest wait between two tries of a
write (``Receiver._until_writable``), doubling from 1 s: a third of the consumer's
``ack_wait``, as the messages delivered meanwhile are told the hub again each time."""


class Receiver:
    """Pulls the member's inbox in batches and applies ``Inbound`` to each."""

    def __init__(
        self,
        member: str,
        nc: Client,
        js: JetStreamContext,
        inbound: Inbound,
        run_db: RunDb,
        metrics: Metrics,
        fetch_batch: int,
        hold_seconds: float,
    ) -> None:
        self.member = member
        self.nc = nc
        self.js = js
        self.inbound = inbound
        self.run_db = run_db
        self.metrics = metrics
        self.fetch_batch = fetch_batch
        self.hold_seconds = hold_seconds  # a held message's first wait (``hold_delay``)
        self.bound = False
        self._commit_log = Throttle()  # inbound_commit_failed, once a minute
        self.last_error: str | None = None
        self.counts: Counter[str] = Counter()
        self._pull: Pull | None = None
        self.unserved = False
        """Whether the last run ended on a pull nothing served (``Pull.unserved``)
        although the hub answered for the consumer: the account has no JetStream."""

    @property
    def serving(self) -> bool:
        """Whether the hub has answered a pull request of the current run."""
        return self._pull is not None and self._pull.served

    def wake(self) -> None:
        """End the current wait for deliveries (at a stop, so it need not time out)."""
        if self._pull is not None:
            self._pull.wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Pull and process until ``stop``; unprocessed messages are handed back or redelivered."""
        stream, durable = inbox_stream(self.member), inbox_durable(self.member)
        # Ask for the consumer first, so a missing inbox (``msmt nats setup`` not
        # run) raises here and keeps the node unready.
        await self.js.consumer_info(stream, durable)
        pull = self._pull = Pull(self.nc, stream, durable, self.fetch_batch)
        await pull.start(self.nc.new_inbox())
        self.bound = True
        try:
            while not stop.is_set() and pull.failure is None:
                # Cleared before looking, so a delivery from now on ends the wait below.
                pull.wake.clear()
                if 0 < len(pull.ready) < self.fetch_batch:
                    await pull.want_more()
                    seconds = pull.pace.wait(hub_pending(pull.ready[-1]), len(pull.ready))
                    if seconds > 0:
                        await pull.linger(seconds, stop)
                        if stop.is_set() or pull.failure is not None:
                            break  # what was delivered is handed back below
                        pull.wake.clear()
                msgs = pull.take()
                if msgs:
                    await pull.want_more()
                    if not await self._handle(msgs):
                        await self._until_writable(stop)
                    continue
                await pull.want_more()
                await pull.wait(min(1.0, max(0.01, pull.deadline - time.monotonic())))
        finally:
            self.bound = False
            left = await pull.close()
            # Delivered but never verified: back to the hub at once, not after ack_wait.
            for msg in left:
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak()
        self.unserved = pull.unserved and not pull.served
        if pull.failure is not None and not stop.is_set():
            # Unserved, the node says why (``Node._inbox_unserved``).
            self.last_error = None if self.unserved else pull.failure
            await asyncio.sleep(0.5)

    async def _until_writable(self, stop: asyncio.Event) -> None:
        """After a batch the store could not commit, wait until it takes a write again.

        Each retry of a batch whose receipts were logged but not stored adds the new
        messages it brings to those the log holds and the store lacks, which a start
        refuses beyond one append's worth (a full store beside a writable log: the
        node would not start again). So no batch is tried until a write commits.
        Messages delivered meanwhile are marked in progress at each try: past the
        consumer's ``ack_wait`` the hub would deliver them again, and the second
        copy be refused and logged as a replay.
        """
        wait = 1.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await stop.wait()
            if stop.is_set() or await self.run_db(self.inbound.store.writable):
                return
            for msg in self._pull.ready if self._pull is not None else ():
                with contextlib.suppress(nats.errors.Error):
                    await msg.in_progress()
            wait = min(wait * 2, WRITABLE_WAIT_MAX_S)

    async def _handle(self, msgs: list[Msg]) -> bool:
        """Process one batch; whether it was committed (else it was handed back)."""
        try:
            result: BatchResult = await self.run_db(
                self.inbound.process,
                [(m.subject, m.data) for m in msgs],
                # Parsed only for a held message: ~7 us a delivery otherwise.
                lambda i: published_at(msgs[i]),
            )
        except MsmtError as exc:
            self.last_error = str(exc)
            # Once a minute: the batch comes back within seconds and fails the same way
            # while the disk is full (499 lines in a trial).
            unlogged = self._commit_log.check("commit_failed", "inbox")
            if unlogged is not None:
                log.error(  # noqa: TRY400 - the reason is the line; a traceback adds nothing
                    "inbound_commit_failed",
                    error=str(exc),
                    messages=len(msgs),
                    **({"unlogged_before": unlogged} if unlogged else {}),
                )
            for msg in msgs:
                await msg.nak(delay=1.0)
            return False
        # Committed: now, and only now, the hub may forget them.
        for msg, action in zip(msgs, result.actions, strict=True):
            if action == "ack":
                await msg.ack()
            elif action == "hold":
                await msg.nak(delay=hold_delay(self.hold_seconds, msg))
            else:
                await msg.term()
        for latency in result.latencies:
            self.metrics.e2e_latency.observe(max(latency, 0.0))
        senders = Counter(rec.sender for rec in result.stored)
        for sender, count in senders.items():
            self.metrics.received.labels(sender=sender).inc(count)
            self.counts[f"received.{sender}"] += count
        for step, count in result.rejected.items():
            self.metrics.rejected.labels(reason=step).inc(count)
            self.counts[f"rejected.{step}"] += count
        for sender, count in result.duplicates.items():
            self.metrics.duplicates.labels(sender=sender).inc(count)
            self.counts[f"duplicate.{sender}"] += count
        for sender, count in result.held.items():
            self.metrics.held.labels(sender=sender).inc(count)
            self.counts[f"held.{sender}"] += count
        return True
