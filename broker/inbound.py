"""A batch of inbox messages verified, audited and stored: ``Inbound``, on the store's thread.

``Inbound.process`` runs steps 1-6 of ``broker.receiver``'s description on a batch:
each message admitted by its subject and size, byte-identical redeliveries acked, the
rest held to their senders' daily budgets, the envelope's checklist run a step at a
time across the batch (``_verify``), then the batch's audit entries appended and its
reports stored, in that order. No asyncio and
no NATS: ``broker.receiver`` hands it each batch on the store's thread. What becomes
of a refused or held message, and the state, are ``broker.inbound_base``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Final, Literal

from broker import audit_events, envelope
from broker.audit_events import AuditEvent
from broker.envelope import Delivery, receive, receive_batch
from broker.errors import EnvelopeError, HeldError, MsmtError
from broker.inbound_base import (
    MAX_SKEW,
    UNSTORED_STATE,
    Action,
    BatchResult,
    InboundBase,
    attested_sender,
    sender_field,
    unstored_text,
)
from broker.log import get_logger
from broker.store import Received
from broker.store_inbox import utc_day

log = get_logger("receiver")

Verdict = envelope.Received | EnvelopeError | Literal["duplicate"] | None
"""What ``Inbound._verify`` found of a message: verified, refused, a byte-identical
redelivery of what was stored, or ``None``: to be verified in order (``Inbound._one``)."""


UNSTORED_KEPT: Final = 4096
"""Receipts logged but not stored that are remembered (``Inbound._unstored``): more
than the consumer's ``max_ack_pending`` ever delivers unacked."""


def _receipt(event: AuditEvent) -> tuple[str, str] | None:
    """A ``received`` entry's (sender, JWE hash); ``None`` for any other entry."""
    if event.type != "received":
        return None
    return str(event.fields["sender"]), str(event.fields["jwe_sha256"])


class Inbound(InboundBase):
    """Verifies and stores batches of inbox messages (synchronous, on the store's thread)."""

    def process(
        self,
        messages: Sequence[tuple[str, bytes]],
        published: Callable[[int], datetime | None] | None = None,
    ) -> BatchResult:
        """Verify, audit and store a batch; raise ``MsmtError`` if it could not be committed.

        ``published(i)`` is when the hub stored message ``i`` (its JetStream
        timestamp; asked only for held messages): a message naming a key this
        node's roster lacks, or issued more than ``MAX_SKEW`` ahead of our clock,
        is held (action ``hold``, no audit entry) until it is older than the
        freshness window, then refused like any other failure.
        """
        try:
            return self._process(messages, published)
        finally:
            self.budget.free()  # reservations last one batch, committed or not

    def _process(
        self,
        messages: Sequence[tuple[str, bytes]],
        published: Callable[[int], datetime | None] | None,
    ) -> BatchResult:
        now = datetime.now(UTC)
        result = BatchResult(actions=[])
        events: list[AuditEvent] = []
        folded: dict[str, Counter[str]] = {}  # source -> refusals over its quota, by step
        batch_seen: set[tuple[str, str]] = set()  # (sender, jti) verified in this batch
        digests = [hashlib.sha256(data).hexdigest() for _, data in messages]
        # (sender, JWE hash) of what was stored before (one lookup for the whole
        # batch) or verified earlier in this batch. The subject's sender is only a
        # key here; ``_one`` checks the subject before using it.
        known = self.store.received_digests(
            (sender_field(subject), digest)
            for (subject, _), digest in zip(messages, digests, strict=True)
        )
        verdicts = self._verify(messages, digests, now, known)
        for index, ((subject, data), digest) in enumerate(zip(messages, digests, strict=True)):
            try:
                verdict, token = verdicts[index]
                action, rec, event = (
                    self._one(subject, data, digest, now, batch_seen, known, result)
                    if verdict is None
                    else self._decided(verdict, token, subject, now, result)
                )
            except HeldError as exc:
                # The sender's roster may be newer than ours (a key rotated and
                # not rolled out here yet), or its clock ahead of ours (or ours
                # stepped back): refusing would lose the report for good, so the
                # hub keeps it until a restart with that roster, or the clocks
                # agree. Past the freshness window it is refused.
                stored_at = (None if published is None else published(index)) or now
                why = self._hold(subject, digest, now - stored_at, exc, result)
                if why is None:
                    continue
                step, reason, report_id = exc.step, f"{exc.reason} ({why})", None
            except EnvelopeError as exc:
                step, reason, report_id = exc.step, exc.reason, exc.report_id
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
                report_id = None
            else:
                self._release(subject, digest)
                result.actions.append(action)
                if rec is not None and event is not None:
                    batch_seen.add((rec.sender, rec.report_id))
                    known.add((rec.sender, rec.jwe_sha256))
                    result.stored.append(rec)
                    events.append(event)
                continue
            self._release(subject, digest)
            result.rejected[step] += 1
            result.actions.append("term")
            event = self._refused(subject, data, digest, now, step, reason, report_id, folded)
            if event is not None:
                events.append(event)
        # In the same append as the batch's other entries: no message is terminated
        # before the entry that accounts for it is durable.
        events += [
            audit_events.rejected_many(self.member, now, source=s, count=n.total(), steps=n)
            for s, n in folded.items()
        ]
        self._commit(events, result.stored, now)
        return result

    def _commit(self, events: list[AuditEvent], stored: list[Received], now: datetime) -> None:
        # Durable record first, then the store: a crash in between leaves an
        # audit entry that the redelivery repeats, never a stored report the log lacks.
        self.audit.append_many(
            [e for e in events if _receipt(e) not in self._unstored] if self._unstored else events
        )
        receipts = {(rec.sender, rec.jwe_sha256) for rec in stored}
        try:
            # At the batch's time: the day its budget was reserved for.
            fresh = self.store.store_received(stored, now.timestamp())
        except MsmtError:
            if len(self._unstored) < UNSTORED_KEPT:
                self._unstored |= receipts
                # Kept for a next start too: a store write of another kind (an
                # intake accept, a sent mark) may commit first, recording the log's
                # size past these entries, where the start no longer looks (a review).
                self._kept_unstored |= receipts
                self.store.set_state_later({UNSTORED_STATE: unstored_text(self._kept_unstored)})
            raise
        self._unstored -= receipts
        if self._kept_unstored & receipts:
            self._kept_unstored -= receipts
            # Stored already: a stale record would only spare them a budget check.
            with suppress(MsmtError):
                self.store.set_state({UNSTORED_STATE: unstored_text(self._kept_unstored)})
        spent: Counter[str] = Counter()
        for rec, new in zip(stored, fresh, strict=True):
            if new:
                spent[rec.sender] += len(rec.jwe)
        self.budget.keep(spent)

    def _verify(
        self,
        messages: Sequence[tuple[str, bytes]],
        digests: Sequence[str],
        now: datetime,
        known: set[tuple[str, str]],
    ) -> list[tuple[Verdict, str]]:
        """Each message's verdict and text, its checklist run a step at a time across the batch.

        Each is what ``_one`` decides for it in order (the subject, size, ASCII and
        stored-duplicate checks first, then ``receive``), since one message's outcome
        can depend on another's only through the batch's own redeliveries and
        replays: one sender's report id, vouched for by its signature, coming again.
        Such a message, one that failed unexpectedly (at a step not known, so
        perhaps past the replay check), and every later message of that sender, is
        left ``None``: ``process`` verifies it again with ``_one``, against the batch
        so far. The text is the message decoded once, at admission, for the stored
        row ("" if admission refused it).
        """
        decided: dict[int, Verdict] = {}
        day = utc_day(now.timestamp())
        if day != self.budget.day:
            # The store's totals, not nothing: a clock stepped back over midnight
            # returns to a day already counted.
            self.budget.start(day, self.store.sender_bytes(day))
        tokens = [""] * len(messages)
        reserved: set[tuple[str, str]] = set()  # (sender, JWE hash) reserved in this batch
        deliveries: list[Delivery] = []
        asked: list[tuple[int, str]] = []  # (index in the batch, sender) of each delivery
        for index, ((subject, data), digest) in enumerate(zip(messages, digests, strict=True)):
            try:
                sender, token = self._admitted(subject, data)
            except EnvelopeError as exc:
                decided[index] = exc
                continue
            if (sender, digest) in known:
                decided[index] = "duplicate"
                continue
            # Before the checklist: a sender over its budget costs no decryption. Not
            # a receipt the log holds already (the store lost it to a crash or a full
            # disk), nor the same bytes twice in the batch (one is a duplicate).
            logged = (sender, digest) in self._unstored
            if not logged and (sender, digest) not in reserved:
                refusal = self.budget.reserve(sender, len(data))
                if refusal is not None:
                    decided[index] = refusal
                    continue
                reserved.add((sender, digest))
            tokens[index] = token
            deliveries.append(Delivery(token, sender, subject.rpartition(".")[2], logged))
            asked.append((index, sender))

        def replays(reached: Sequence[tuple[int, str]]) -> list[int]:
            # Step 11 for the batch in one statement: the same answer as _one's
            # seen_state(...) != "new" for each (a redelivery of what was stored
            # was acked as a duplicate before the checklist).
            seen = self.store.seen_before([(asked[i][1], jti) for i, jti in reached])
            return [i for (i, _), hit in zip(reached, seen, strict=True) if hit]

        outcomes = receive_batch(
            deliveries,
            me=self.member,
            decryption_keys=self.decryption_keys,
            roster=self.roster,
            now=now,
            max_age=self.freshness,
            max_skew=MAX_SKEW,
            replays=replays,
        )
        vouched: set[tuple[str, str]] = set()  # (sender, report id) of the batch so far
        # Senders with a message whose checklist failed unexpectedly: its report id is
        # unknown, and verified again it may yet be stored (a fault that passed), and
        # then decide any later message of that sender, which is verified again too.
        unsure: set[str] = set()
        for (index, sender), outcome in zip(asked, outcomes, strict=True):
            if sender in unsure or not isinstance(outcome, envelope.Received | EnvelopeError):
                unsure.add(sender)
                decided[index] = None
            elif outcome.report_id is None:
                decided[index] = outcome  # refused before the signature: no replay step
            elif (sender, outcome.report_id) in vouched:
                decided[index] = None
            else:
                vouched.add((sender, outcome.report_id))
                decided[index] = outcome
        return [(decided[index], tokens[index]) for index in range(len(messages))]

    def _decided(
        self,
        verdict: envelope.Received | EnvelopeError | Literal["duplicate"],
        token: str,
        subject: str,
        now: datetime,
        result: BatchResult,
    ) -> tuple[Action, Received | None, AuditEvent | None]:
        # ``_one``'s result for a message ``_verify`` decided; ``token`` is its text.
        if isinstance(verdict, Exception):
            raise verdict
        if isinstance(verdict, str):  # "duplicate"
            result.duplicates[sender_field(subject)] += 1
            return "ack", None, None
        return self._accepted(verdict, token, now, result)

    def _admitted(self, subject: str, data: bytes) -> tuple[str, str]:
        # Before the envelope's checklist: the attested sender and the envelope text.
        sender = attested_sender(subject, self.member)
        if len(data) > self.max_message_bytes:
            raise EnvelopeError(
                "size", f"message is {len(data)} bytes; limit {self.max_message_bytes}"
            )
        try:
            token = data.decode("ascii")
        except UnicodeDecodeError:
            raise EnvelopeError("format", "envelope is not ASCII text") from None
        return sender, token

    def _one(
        self,
        subject: str,
        data: bytes,
        digest: str,
        now: datetime,
        batch_seen: set[tuple[str, str]],
        known: set[tuple[str, str]],
        result: BatchResult,
    ) -> tuple[Action, Received | None, AuditEvent | None]:
        sender, token = self._admitted(subject, data)
        if (sender, digest) in known:
            # Counted, so an operator can tell a crash-and-redeliver (or a peer
            # resending) from silence; acked, since it is already stored.
            result.duplicates[sender] += 1
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
            attested_kind=subject.rpartition(".")[2],
            now=now,
            max_age=self.freshness,
            max_skew=MAX_SKEW,
            is_replay=is_replay,
            logged=(sender, digest) in self._unstored,
        )
        return self._accepted(got, token, now, result)

    def _accepted(
        self, got: envelope.Received, token: str, now: datetime, result: BatchResult
    ) -> tuple[Action, Received, AuditEvent]:
        # A verified report: its row for the store and its ``received`` entry.
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
            jwe=token,
            signing_kid=got.signing_kid,
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
            # The key of ours that opened it (its header names it; step 3 found it
            # among our decryption keys): the sender's entry names the one it used.
            recipient_kid=got.recipient_kid,
        )
        return "ack", rec, event
