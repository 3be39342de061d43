"""Hub -> inbox: pull from the durable consumer, verify, store, audit, then ack.

``Receiver`` keeps one pull request out at the hub (``_Pull``) and hands what
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
4. otherwise ``broker.envelope.receive_batch`` runs the checklist a step at a
   time across the batch, with the replay check against the store's seen-set
   (one statement for the messages of the batch that reach it);
   each message's checklist still runs in its order and decides it alone. A
   message an earlier one could decide (the same sender's report again), or whose
   checklist failed unexpectedly, is verified again with ``receive`` on its own,
   its replay check against the batch so far too;
5. the batch's audit entries are appended durably, then the verified reports
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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import nats.errors
import nats.js.errors
from joserfc.jwk import OKPKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from broker import audit_events, envelope
from broker.audit_events import AuditEvent
from broker.auditlog import AuditLog
from broker.envelope import Delivery, receive, receive_batch
from broker.envelope_format import HDR_RID, parse_jwe_header
from broker.errors import EnvelopeError, HeldError, MsmtError
from broker.log import Throttle, get_logger
from broker.members import is_member
from broker.metrics import Metrics
from broker.natsconfig import inbox_durable, inbox_stream
from broker.publisher import RunDb
from broker.roster import CLOCK_SKEW, Roster
from broker.sightings import is_report_id
from broker.store import Received, Store

log = get_logger("receiver")

MAX_SKEW: Final = CLOCK_SKEW
"""How far in the future a report's ``iat`` may be (clock skew between nodes)."""

HOLD_BACKOFF_MAX: Final = 15
"""A held message's delay doubles per delivery up to this many times ``hold_seconds``."""
HOLD_LOG_EVERY_S: Final = 60.0
"""Held messages are logged at most this often per sender: each comes back many times."""
REFUSALS_LOGGED_PER_MINUTE: Final = 60
"""Refusals per source a minute that get an ``inbound_rejected`` line and a ``rejected``
audit entry of their own; the rest are counted, and folded into one ``rejected_many``
entry per source and batch. A hostile member's junk was refused 1,850 times a second
(red-team trial): a line and a 360-byte entry each, about 75 GB of audit log a day."""
MAX_HELD_PER_SENDER: Final = 64
"""Messages held at once per sender; more are refused. Ten partners' worth stays well
inside the consumer's ``max_ack_pending`` (1024), so a sender naming made-up keys
cannot stall the inbox for the others."""

Action = Literal["ack", "term", "hold"]
Verdict = envelope.Received | EnvelopeError | Literal["duplicate"] | None
"""What ``Inbound._verify`` found of a message: verified, refused, a byte-identical
redelivery of what was stored, or ``None``: to be verified in order (``Inbound._one``)."""


def _claimed_report_id(data: bytes, limit: int) -> str | None:
    """The report id a JWE's protected header names, if it parses and is a UUID."""
    try:
        header = parse_jwe_header(data.decode("ascii"), limit)
    except (UnicodeDecodeError, EnvelopeError):
        return None
    claimed = header.get(HDR_RID)
    return claimed if isinstance(claimed, str) and is_report_id(claimed) else None


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


def _source(subject: str) -> str:
    # Whom a refusal is counted against: the subject's sender if it is a member.
    sender = _sender_field(subject)
    return sender if is_member(sender) else "unknown"


class RefusalQuota:
    """Per source, the first ``per_minute`` refusals of each minute are told one by one.

    A told refusal gets an ``inbound_rejected`` line and its own ``rejected``
    audit entry; the rest are only counted (and folded into ``rejected_many``
    entries). The minute starts at a source's first refusal after the last one
    ended. ``clock`` is monotonic seconds (injectable for tests).
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        # source -> (start of its minute, refusals told in it, refusals not told since).
        self._windows: dict[str, tuple[float, int, int]] = {}

    def take(self, source: str) -> int | None:
        """``None`` if this refusal is over the quota, else how many went untold before it."""
        now = self.clock()
        start, told, untold = self._windows.get(source, (now, 0, 0))
        if now - start >= 60.0:
            start, told = now, 0
        if told < self.per_minute:
            self._windows[source] = (start, told + 1, 0)
            return untold
        self._windows[source] = (start, told, untold + 1)
        return None


def _sender_field(subject: str) -> str:
    # The second token of an inbox subject, unchecked (``attested_sender`` checks).
    parts = subject.split(".", 2)
    return parts[1] if len(parts) > 1 else ""


WRITABLE_WAIT_MAX_S: Final = 10.0
"""After a batch the store could not commit, the longest wait between two tries of a
write (``Receiver._until_writable``), doubling from 1 s: a third of the consumer's
``ack_wait``, as the messages delivered meanwhile are told the hub again each time."""

UNSTORED_KEPT: Final = 4096
"""Receipts logged but not stored that are remembered (``Inbound._unstored``): more
than the consumer's ``max_ack_pending`` ever delivers unacked."""


def _receipt(event: AuditEvent) -> tuple[str, str] | None:
    """A ``received`` entry's (sender, JWE hash); ``None`` for any other entry."""
    if event.type != "received":
        return None
    return str(event.fields["sender"]), str(event.fields["jwe_sha256"])


def hold_delay(hold_seconds: float, msg: Msg) -> float:
    """Seconds until a held message comes again: ``hold_seconds``, doubling, capped.

    The backoff bounds what a sender gains by naming unknown keys: each message
    costs a decryption per delivery, so 1,440 a day at a flat minute, ~100 capped.
    """
    meta = _metadata(msg)
    delivered = 1 if meta is None else int(meta.num_delivered or 1)
    doublings = min(delivered - 1, 4)  # 2**4 is past the cap
    return float(hold_seconds * min(2**doublings, HOLD_BACKOFF_MAX))


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
    duplicates: Counter[str] = field(default_factory=Counter)
    """Byte-identical redeliveries acked without storing again, by sender."""
    held: Counter[str] = field(default_factory=Counter)
    """Messages handed back for later, by sender: they name a key this roster lacks."""
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.member = member
        self.decryption_keys = decryption_keys
        self.roster = roster
        self.store = store
        self.audit = audit
        self.freshness = freshness
        self.max_message_bytes = max_message_bytes
        self._hold_log = Throttle(HOLD_LOG_EVERY_S)  # one warning per sender per period
        self._refusals = RefusalQuota(REFUSALS_LOGGED_PER_MINUTE, clock)
        # sender -> JWE hashes of its messages held now, with when each was first
        # held (``clock``). Held messages stay unacked at the hub, so they count
        # against the consumer's max_ack_pending (1024): a sender naming made-up
        # keys could otherwise stall the whole inbox.
        self._held: dict[str, dict[str, float]] = {}
        self._clock = clock
        # (sender, JWE hash) of receipts whose entries are in the log but whose
        # store commit failed (a full disk): their redeliveries are not logged
        # again. A trial's full store and writable log had 80 entries an envelope.
        self._unstored: set[tuple[str, str]] = set()

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
            (_sender_field(subject), digest)
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
        self._commit(events, result.stored)
        return result

    def _commit(self, events: list[AuditEvent], stored: list[Received]) -> None:
        # Durable record first, then the store: a crash in between leaves an
        # audit entry that the redelivery repeats, never a stored report the log lacks.
        self.audit.append_many(
            [e for e in events if _receipt(e) not in self._unstored] if self._unstored else events
        )
        receipts = {(rec.sender, rec.jwe_sha256) for rec in stored}
        try:
            self.store.store_received(stored)
        except MsmtError:
            if len(self._unstored) < UNSTORED_KEPT:
                self._unstored |= receipts
            raise
        self._unstored -= receipts

    def _refused(
        self,
        subject: str,
        data: bytes,
        digest: str,
        now: datetime,
        step: str,
        reason: str,
        report_id: str | None,
        folded: dict[str, Counter[str]],
    ) -> AuditEvent | None:
        """Log a refused message and return its audit entry, or fold it if over its quota.

        A refusal over its source's quota is only counted, in ``folded`` (source
        -> step -> refusals), for the batch's ``rejected_many`` entries.
        """
        source = _source(subject)
        unlogged = self._refusals.take(source)
        if unlogged is None:
            folded.setdefault(source, Counter())[step] += 1
            return None
        # The report id once the signature vouched for it (a checked UUID); before
        # that (a key this node refuses or cannot open), the one the header claims,
        # named as a claim: the sender's operator needs it for ``msmt node resend
        # --report``. The audit entry keeps only a vouched-for id.
        named: dict[str, str | int]
        if report_id is not None:
            named = {"report_id": report_id}
        else:
            claimed = _claimed_report_id(data, self.max_message_bytes)
            named = {} if claimed is None else {"claimed_report_id": claimed}
        if unlogged:
            named["unlogged_before"] = unlogged
        log.warning(
            "inbound_rejected", sender=source, step=step, reason=_printable(reason), **named
        )
        return audit_events.rejected(
            self.member,
            now,
            source=source,
            step=step,
            reason=_printable(reason),
            report_id=report_id,
            jwe_sha256=digest,
        )

    def _hold(
        self, subject: str, digest: str, age: timedelta, exc: HeldError, result: BatchResult
    ) -> str | None:
        """Hold a message that may pass later (``None``), or say why it is not held."""
        sender = _sender_field(subject)
        held = self._held.setdefault(sender, {})
        fresh = age <= self.freshness + MAX_SKEW
        if len(held) >= MAX_HELD_PER_SENDER:
            # A place whose message never came back (the hub kept it, or made it up
            # and dropped it) frees once that message could only be refused: else
            # the sender's later reports were refused for good, "64 held already".
            stale = self._clock() - (self.freshness + MAX_SKEW).total_seconds()
            for old in [d for d, at in held.items() if at < stale]:
                del held[old]
        if fresh and (digest in held or len(held) < MAX_HELD_PER_SENDER):
            held.setdefault(digest, self._clock())
            result.actions.append("hold")
            result.held[sender] += 1
            self._log_hold(sender, exc)
            return None
        return "held until too old" if not fresh else f"not held: {len(held)} held already"

    def _release(self, subject: str, digest: str) -> None:
        # A held message came back and was decided: its place is free again.
        held = self._held.get(_sender_field(subject))
        if held:
            held.pop(digest, None)

    def _log_hold(self, sender: str, exc: HeldError) -> None:
        if self._hold_log.due("held", sender):
            log.warning(
                "inbound_held",
                sender=sender,
                step=exc.step,
                reason=_printable(exc.reason),
                hint=exc.hint,
            )

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
        tokens = [""] * len(messages)
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
            tokens[index] = token
            deliveries.append(Delivery(token, sender, subject.rpartition(".")[2]))
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
            result.duplicates[_sender_field(subject)] += 1
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
        )
        return "ack", rec, event


PULL_EXPIRES_S: Final = 1.0
"""How long the hub holds one pull request open while the inbox is empty."""

PULL_GRACE_S: Final = 1.0
"""Past a request's expiry, how long to wait for its end before asking again (a lost 408)."""

LINGER_S: Final = 0.06
"""How long a part batch may wait for more deliveries before it is verified and committed.

A batch costs two fsynced commits (audit log, then store) and about 4 ms of the
node's CPU whatever its size, and at a trickle that fixed cost was most of a
delivery's CPU. At 130 deliveries/s, 20 ms gathered ~3.6 per commit, 60 ms ~9.
In ``bench/e2e.py --quick`` 60 ms against 20 cut the receivers' CPU per report
by ~14 % and lowered the latency at 100 reports/s offered (less queueing
for the cores) (bench/README.md, seventeenth session). It waits only when
``Linger`` expects company: a lone report at a light load is not held back.
"""

LINGER_COMPANY: Final = 2.0
"""Deliveries a part batch must expect within ``LINGER_S`` for the wait to be worth it.

At 2 and 60 ms a part batch waits from ~33 deliveries/s up: at 20/s a report
waited the whole 60 ms for company that rarely came (e2e p50 45 -> 86 ms)."""

RATE_SAMPLE: Final = 8
"""Recent deliveries whose span ``Linger`` takes as the arrival rate.

Few, so that a receiver going from idle to a steady trickle lingers from its
8th delivery on (at 16, ``bench/receiver.py --rate 130`` committed ~16 of its 600
one or two at a time); enough that 20 deliveries/s, 350 ms for 7 gaps on
average, rarely looks like the 33/s (210 ms) worth waiting at."""


class Linger:
    """Whether a part batch should wait for company: only when more deliveries are likely.

    Three signs, any enough: the hub holds more for this consumer now (the
    newest delivery's pending count, from its ``$JS.ACK`` subject); ``company``
    or more are waiting already (they came while the last batch was verified);
    or the last ``sample`` deliveries came at a rate that brings ``company``
    more within ``seconds``. Otherwise the batch is committed at once. Times are
    monotonic seconds; this is pure logic, fed by ``_Pull``.
    """

    def __init__(
        self, seconds: float, company: float = LINGER_COMPANY, sample: int = RATE_SAMPLE
    ) -> None:
        if sample < 2 or company <= 0:
            raise ValueError("a rate needs two arrivals and a positive company")
        self.seconds = seconds
        self._arrivals: deque[float] = deque(maxlen=sample)
        # ``sample`` arrivals span this long, or less, at the slowest rate worth waiting for.
        self._span = (sample - 1) * seconds / company
        self._company = company

    def arrived(self, at: float) -> None:
        """Record a delivery's arrival."""
        self._arrivals.append(at)

    def wait(self, pending: int, waiting: int = 1) -> float:
        """Seconds a part batch of ``waiting`` should wait for more: ``seconds`` or 0."""
        if self.seconds <= 0:
            return 0.0
        arrivals = self._arrivals
        # The arrival times are when the event loop saw each delivery: a node kept
        # off the cores (a loaded machine) sees a steady stream late and bunched,
        # and its span can look slow; deliveries already waiting say it is not.
        if (
            pending > 0
            or waiting >= self._company
            or (len(arrivals) == arrivals.maxlen and arrivals[-1] - arrivals[0] <= self._span)
        ):
            return self.seconds
        return 0.0


def _metadata(msg: Msg) -> Msg.Metadata | None:
    """The delivery's JetStream metadata, or None where the hub's subject does not parse.

    nats-py parses it from the ``$JS.ACK`` reply subject, which the hub sets (a
    sender cannot); a malformed one raised from a held message's handling and
    stopped the node (a fuzzer: ``ValueError``, ``OSError`` for a timestamp out of
    range, ``NotJSMessageError``).
    """
    try:
        return msg.metadata
    except (nats.errors.Error, ValueError, IndexError, OverflowError, OSError):
        return None


def _published_at(msg: Msg) -> datetime | None:
    meta = _metadata(msg)
    return None if meta is None else meta.timestamp


def hub_pending(msg: Msg) -> int:
    """How many more the hub held for the consumer as it sent ``msg``; 0 if not said."""
    meta = _metadata(msg)
    return 0 if meta is None else int(meta.num_pending)


class _Pull:
    """Our end of the inbox consumer: a private reply subject, one pull request at a time.

    The JetStream pull API (``$JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>``,
    JSON ``{"batch": n, "expires": ns}``, reply subject = where to deliver) is
    used directly instead of nats-py's ``fetch``, which costs a no-wait probe,
    a second request and a task with a timer per message. The next request is
    sent as soon as the previous one has ended (``batch`` messages delivered,
    or a status: 404 no messages, 408 expired, 409 and others), while the
    earlier messages are still being verified, so the hub never waits for us;
    it is not sent while a whole batch is already waiting here, so at most
    three batches are unacked (well below the consumer's ``max_ack_pending``,
    all far inside ``ack_wait``).

    A message counts as a delivery only if it carries the hub's ``$JS.ACK``
    reply subject; a status has none. A header named ``Status`` that a sender
    put on its message therefore cannot make us skip that message.
    """

    def __init__(self, nc: Client, stream: str, durable: str, batch: int) -> None:
        self.nc = nc
        self.pace = Linger(LINGER_S)  # told of every delivery
        self.api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.deliver = ""
        self.batch = batch
        self.request = json.dumps(
            {"batch": batch, "expires": int(PULL_EXPIRES_S * 1e9)}, separators=(",", ":")
        ).encode()
        self.ready: list[Msg] = []  # delivered, not yet taken
        self.wake = asyncio.Event()
        # ``wake`` is set once this many deliveries wait here (or a request ends):
        # 1 while the consumer idles, ``batch`` while it lingers, so a trickle of
        # deliveries does not wake the lingering consumer once per message.
        self.want = 1
        self.open = 0  # deliveries the outstanding request may still bring; 0: none outstanding
        self.deadline = 0.0  # when to stop waiting for the outstanding request's end
        self.stopping = False
        self.failure: str | None = None
        self.sub: Subscription | None = None

    async def start(self, deliver: str) -> None:
        """Subscribe to ``deliver`` and send the first request."""
        self.deliver = deliver
        self.sub = await self.nc.subscribe(deliver, cb=self._on_msg)
        await self.want_more()

    async def want_more(self) -> None:
        """Send the next pull request if none is outstanding and there is room here."""
        if self.stopping or len(self.ready) >= self.batch:
            return
        if self.open and time.monotonic() < self.deadline:
            return
        self.open = self.batch  # before the await: a concurrent caller must not ask twice
        self.deadline = time.monotonic() + PULL_EXPIRES_S + PULL_GRACE_S
        await self.nc.publish(self.api, self.request, reply=self.deliver)

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply:
            self.ready.append(msg)
            self.pace.arrived(time.monotonic())
            self.open = max(0, self.open - 1)
            if len(self.ready) >= self.want or self.open == 0:
                self.wake.set()
        else:
            status = (msg.headers or {}).get(api.Header.STATUS, "")
            if status == api.StatusCode.CONTROL_MESSAGE:
                return  # idle heartbeat: the request goes on
            self.open = 0
            if status not in (api.StatusCode.NO_MESSAGES, api.StatusCode.REQUEST_TIMEOUT):
                # 409 (consumer deleted, leadership change, limits...) or worse: rebind.
                reason = (msg.headers or {}).get(api.Header.DESCRIPTION, "")
                self.failure = f"pull: status {status} {reason}".strip()
            self.wake.set()
        if self.open == 0 and self.failure is None:
            try:
                await self.want_more()
            except nats.errors.Error as exc:
                # Raised here it would only reach nats-py's error callback; rebind instead.
                self.failure = f"pull: {type(exc).__name__} {exc}".strip()

    async def linger(self, seconds: float, stop: asyncio.Event) -> None:
        """Wait up to ``seconds`` for a whole batch to be delivered (not past a stop or failure)."""
        end = time.monotonic() + seconds
        self.want = self.batch
        try:
            while len(self.ready) < self.batch and self.failure is None and not stop.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    return
                self.wake.clear()
                await self.wait(left)
        finally:
            self.want = 1

    def take(self) -> list[Msg]:
        """Up to ``batch`` delivered messages, oldest first."""
        out, self.ready = self.ready[: self.batch], self.ready[self.batch :]
        return out

    async def wait(self, seconds: float) -> None:
        """Until ``wake`` is set (a delivery, a request's end) or ``seconds`` have passed."""
        # ``asyncio.timeout``, not ``wait_for``: no task per wait.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.wake.wait()

    async def close(self) -> list[Msg]:
        """Stop asking; wait (briefly) for the outstanding request to end; unsubscribe.

        Returns what was delivered but not taken, for the caller to hand back.
        """
        self.stopping = True
        # With the hub gone nothing more can be delivered: do not wait for it.
        while (
            self.open
            and self.failure is None
            and self.nc.is_connected
            and time.monotonic() < self.deadline
        ):
            self.wake.clear()
            if self.open:
                await self.wait(self.deadline - time.monotonic())
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except nats.errors.Error as exc:
                log.warning("unsubscribe_failed", error=type(exc).__name__)
        left, self.ready = self.ready, []
        return left


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
        self._pull: _Pull | None = None

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
        pull = self._pull = _Pull(self.nc, stream, durable, self.fetch_batch)
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
        if pull.failure is not None and not stop.is_set():
            self.last_error = pull.failure
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
                lambda i: _published_at(msgs[i]),
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
