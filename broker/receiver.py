"""Hub -> inbox: fetch from the durable pull consumer, verify, store, audit, then ack.

For each fetched batch (``Inbound.process``, run on the store's thread):

1. the subject must be ``from.<SENDER>.msmt.to.<ME>.<kind>``: the hub's word for
   who sent it (service import prefix), which the envelope's sender must match;
2. the message must be within ``max_message_bytes``;
3. if the exact same bytes from the same sender were already verified and
   stored (a redelivery after a crash before the ack, or a resend after the
   hub's dedup window), it is acked without storing again;
4. otherwise ``broker.envelope.receive`` runs its whole checklist, with the
   replay check against the store's seen-set (and the batch so far);
5. the batch's audit entries (received and rejected) are appended durably,
   then the verified reports are stored; only then are messages acked (good)
   or terminated (bad, ``msg.term()`` so the consumer never stalls on them).

If the audit log or store cannot be written, nothing is acked; the batch is
handed back with ``nak`` and redelivered.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import nats.errors
import nats.js.errors
from joserfc.jwk import OKPKey
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from broker import audit_events
from broker.audit_events import AuditEvent
from broker.auditlog import AuditLog
from broker.envelope import receive
from broker.errors import EnvelopeError, MsmtError
from broker.log import get_logger
from broker.members import is_member
from broker.metrics import Metrics
from broker.natsconfig import inbox_durable, inbox_stream
from broker.publisher import RunDb
from broker.roster import Roster
from broker.store import Received, Store

log = get_logger("receiver")

MAX_SKEW: Final = timedelta(minutes=5)
"""How far in the future a report's ``iat`` may be (clock skew between nodes)."""

Action = Literal["ack", "term"]


def attested_sender(subject: str, me: str) -> str:
    """The hub-attested sender of an inbox subject; raise ``EnvelopeError`` if malformed."""
    parts = subject.split(".")
    if (
        len(parts) != 6
        or parts[0] != "from"
        or parts[2:5] != ["msmt", "to", me]
        or not is_member(parts[1])
    ):
        raise EnvelopeError("subject", "inbox subject is not from.<MEMBER>.msmt.to.<me>.<kind>")
    return parts[1]


def _printable(text: str, limit: int = 200) -> str:
    # Audit reasons must be printable ASCII; envelope reasons quote peer input.
    clean = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else "?" for c in clean)[:limit] or "rejected"


@dataclass
class BatchResult:
    """What ``Inbound.process`` decided for each message, plus what it committed."""

    actions: list[Action]
    stored: list[Received] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


class Inbound:
    """Verifies and stores batches of inbox messages (synchronous, on the store's thread)."""

    def __init__(
        self,
        member: str,
        decryption_keys: Mapping[str, OKPKey],
        roster: Roster,
        store: Store,
        audit: AuditLog,
        freshness: timedelta,
        max_message_bytes: int,
    ) -> None:
        self.member = member
        self.decryption_keys = decryption_keys
        self.roster = roster
        self.store = store
        self.audit = audit
        self.freshness = freshness
        self.max_message_bytes = max_message_bytes

    def process(self, messages: Sequence[tuple[str, bytes]]) -> BatchResult:
        """Verify, audit and store a batch; raise ``MsmtError`` if it could not be committed."""
        now = datetime.now(UTC)
        result = BatchResult(actions=[])
        events: list[AuditEvent] = []
        batch_seen: set[tuple[str, str]] = set()  # (sender, jti) verified in this batch
        batch_digests: set[tuple[str, str]] = set()  # (sender, JWE hash) of those
        for subject, data in messages:
            digest = hashlib.sha256(data).hexdigest()
            try:
                action, rec, event = self._one(
                    subject, data, digest, now, batch_seen, batch_digests, result
                )
            except EnvelopeError as exc:
                step, reason = exc.step, exc.reason
            except MsmtError:
                raise  # our store failed: hand the whole batch back, reject nothing
            except Exception as exc:  # noqa: BLE001 - see below
                # A verifier bug on hostile input must cost one message, not the
                # consumer: redelivering it forever would stall the whole inbox.
                # Only the type is logged; a message or traceback could quote content.
                log.error("verifier_failed", error=type(exc).__name__)  # noqa: TRY400
                step, reason = (
                    "internal",
                    f"verification failed unexpectedly ({type(exc).__name__})",
                )
            else:
                result.actions.append(action)
                if rec is not None and event is not None:
                    batch_seen.add((rec.sender, rec.report_id))
                    batch_digests.add((rec.sender, rec.jwe_sha256))
                    result.stored.append(rec)
                    events.append(event)
                continue
            source = subject.split(".")[1] if subject.count(".") >= 1 else "unknown"
            source = source if is_member(source) else "unknown"
            result.rejected[step] += 1
            result.actions.append("term")
            events.append(
                audit_events.rejected(
                    self.member,
                    now,
                    source=source,
                    step=step,
                    reason=_printable(reason),
                    jwe_sha256=digest,
                )
            )
            log.warning("inbound_rejected", sender=source, step=step, reason=_printable(reason))
        # Durable record first, then the store: a crash in between leaves an
        # audit entry that the redelivery repeats, never a stored report the log lacks.
        self.audit.append_many(events)
        self.store.store_received(result.stored)
        return result

    def _one(
        self,
        subject: str,
        data: bytes,
        digest: str,
        now: datetime,
        batch_seen: set[tuple[str, str]],
        batch_digests: set[tuple[str, str]],
        result: BatchResult,
    ) -> tuple[Action, Received | None, AuditEvent | None]:
        sender = attested_sender(subject, self.member)
        if len(data) > self.max_message_bytes:
            raise EnvelopeError(
                "size", f"message is {len(data)} bytes; limit {self.max_message_bytes}"
            )
        try:
            token = data.decode("ascii")
        except UnicodeDecodeError:
            raise EnvelopeError("format", "envelope is not ASCII text") from None
        if (sender, digest) in batch_digests or self.store.has_received(sender, digest):
            return "ack", None, None

        def is_replay(jti: str) -> bool:
            if (sender, jti) in batch_seen:
                return True
            return self.store.seen_state(sender, jti, digest) != "new"

        got = receive(
            token,
            me=self.member,
            decryption_keys=self.decryption_keys,
            roster=self.roster,
            attested_sender=sender,
            now=now,
            max_age=self.freshness,
            max_skew=MAX_SKEW,
            is_replay=is_replay,
        )
        result.latencies.append((now - got.iat).total_seconds())
        rec = Received(
            sender=got.sender,
            originator=got.originator,
            report_id=got.report_id,
            kind=got.kind,
            tlp=got.tlp,
            rel_to=got.rel_to,
            iat=got.iat.timestamp(),
            fields=dict(got.fields),
            paths=got.paths,
            jwe_sha256=got.jwe_sha256,
            # Past this, the freshness check refuses the message anyway.
            expires_at=(got.iat + self.freshness + MAX_SKEW).timestamp(),
        )
        event = audit_events.received(
            self.member,
            now,
            sender=got.sender,
            report_id=got.report_id,
            kind=got.kind,
            fields=got.paths,
            jwe_sha256=got.jwe_sha256,
        )
        return "ack", rec, event


class Receiver:
    """Pulls the member's inbox in batches and applies ``Inbound`` to each."""

    def __init__(
        self,
        member: str,
        js: JetStreamContext,
        inbound: Inbound,
        run_db: RunDb,
        metrics: Metrics,
        fetch_batch: int,
    ) -> None:
        self.member = member
        self.js = js
        self.inbound = inbound
        self.run_db = run_db
        self.metrics = metrics
        self.fetch_batch = fetch_batch
        self.bound = False
        self.last_error: str | None = None
        self.counts: Counter[str] = Counter()

    async def run(self, stop: asyncio.Event) -> None:
        """Fetch and process until ``stop``; unprocessed messages are simply redelivered."""
        sub: JetStreamContext.PullSubscription | None = None
        while not stop.is_set():
            if sub is None:
                stream, durable = inbox_stream(self.member), inbox_durable(self.member)
                # Binding alone does not reach the server; ask for the consumer so a
                # missing inbox (``msmt nats setup`` not run) keeps the node unready.
                await self.js.consumer_info(stream, durable)
                sub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
                self.bound = True
            try:
                msgs = await sub.fetch(self.fetch_batch, timeout=1.0)
            except TimeoutError:
                continue
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                self.last_error = f"fetch: {type(exc).__name__} {exc}".strip()
                await asyncio.sleep(0.5)
                continue
            await self._handle(msgs)
        if sub is not None:
            self.bound = False
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.warning("unsubscribe_failed", error=type(exc).__name__)

    async def _handle(self, msgs: list[Msg]) -> None:
        try:
            result: BatchResult = await self.run_db(
                self.inbound.process, [(m.subject, m.data) for m in msgs]
            )
        except MsmtError as exc:
            self.last_error = str(exc)
            log.error("inbound_commit_failed", error=str(exc), messages=len(msgs))  # noqa: TRY400
            for msg in msgs:
                await msg.nak(delay=1.0)
            return
        for latency in result.latencies:
            self.metrics.e2e_latency.observe(max(latency, 0.0))
        for rec in result.stored:
            self.metrics.received.labels(sender=rec.sender).inc()
            self.counts[f"received.{rec.sender}"] += 1
        for step, count in result.rejected.items():
            self.metrics.rejected.labels(reason=step).inc(count)
            self.counts[f"rejected.{step}"] += count
        for msg, action in zip(msgs, result.actions, strict=True):
            if action == "ack":
                await msg.ack()
            else:
                await msg.term()
