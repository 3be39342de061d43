"""Outbox -> hub: plan each accepted report per partner, then publish with bounded pipelining.

Two stages, both restartable from the store alone:

1. **Plan** (``broker.planner.Planner``, synchronous and pure; the node runs it
   in a worker process, ``broker.planpool``, and commits its result on the
   store's thread): for each accepted report, run the policy for every partner,
   issue the SD-JWT once, present it to each partner that is released anything,
   and store every partner's exact JWE in the outbox in the same transaction
   that marks the report planned. A crash before the commit re-plans from
   scratch; after it, nothing is planned twice and no partner can be left out.
2. **Publish** (``Publisher``, asyncio): send each pending JWE to
   ``msmt.to.<PARTNER>.<kind>`` on JetStream with ``Nats-Msg-Id`` = the
   envelope's SHA-256, at most ``max_in_flight`` awaiting their acks (pipelined through
   ``broker.pubacks``: one reply subscription, no task per envelope;
   an ack not back within ``PUBLISH_TIMEOUT`` counts as failed). Acked envelopes are
   recorded in the audit log, then marked sent, in batches. A failed or
   unanswered publish simply stays pending and is retried: the outbox, not the
   client's reconnect buffer, is the durability guarantee (nothing is published
   while disconnected), and the hub's dedup window makes a resend of the same
   bytes harmless. An envelope pending for half the freshness window is signed
   again first (``Store.queue_stale``), since partners would refuse it as too old.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from broker import audit_events
from broker.audit_events import AuditEvent
from broker.errors import AuditError, MsmtError
from broker.log import Throttle, get_logger
from broker.members import is_member
from broker.metrics import Metrics
from broker.pubacks import PubAcks
from broker.store import OutboxItem, Store, Withholding

log = get_logger("publisher")

PUBLISH_TIMEOUT: Final = 5.0
"""Seconds to wait for the hub's ack before the envelope is retried."""
STOP_POLL: Final = 0.1
"""At a stop, how often to look whether the hub is still there while acks are awaited."""
RETRY_AFTER: Final = 0.5
"""Seconds before an envelope whose publish failed is first tried again (then doubling)."""
RETRY_MAX: Final = 30.0
"""Longest wait between tries: a partner whose inbox is missing for days costs little."""
HOLD_MAX: Final = 5.0
"""Longest a partner is held back as a whole after a failed publish (``Publisher._held``).

Shorter than ``RETRY_MAX``: every partner is held when the hub's JetStream fails for all
of them (a cluster without its quorum), and the reports planned meanwhile wait out the
hold once it is back. A full inbox costs one window of refused publishes per hold.
"""
WARN_EVERY: Final = 30.0
"""Seconds between warnings about one partner, so an outage does not flood the log."""
IDLE_WAIT: Final = 5.0
"""Longest sleep of the publish loop with nothing to wait for (a safety net; wake-ups drive it)."""
RECORD_RETRY_S: Final = 1.0
"""After acked envelopes could not be recorded as sent (a full disk), how long until
the record is tried again; they are not published again meanwhile."""
COALESCE_ACKS: Final = 0.1
"""Seconds the recorder lets acks gather after the first, so one commit records a burst.

At a trickle (one report, ten envelopes, at a time) a shorter wait records each
report's acks in two or three commits, each an fsync of the audit log and of
the store. Only the record waits: the partners' copies are out already, and a
stop records what it holds at once (``run``).
"""
PARTNER_INBOX_SEQ_STATE: Final = "partner_inbox_seq"
"""The status fact keeping, per partner, the highest stream sequence an ack for its
inbox gave (``Publisher.inbox_seq_mark``), so a restart does not forget it: after a hub
restore every node is likely to be restarted, and its first ack must still be compared."""


def read_inbox_seq(text: str) -> dict[str, int]:
    """What ``Publisher.inbox_seq_mark`` kept; anything else (none yet, damaged) is none."""
    if len(text) > 1024:
        return {}  # eleven members' marks are far shorter, and a deep nest would not parse
    try:
        mark = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(mark, dict):
        return {}
    return {
        partner: seq
        for partner, seq in mark.items()
        if is_member(partner) and type(seq) is int and 0 < seq < 1 << 63
    }


_IAT_AND_BYTES: Final = re.compile(r'\{"iat":\d+,"bytes":\d+,')


def _entry_facts(text: str) -> Mapping[str, Any]:
    # What a ``sent`` entry records of the send facts: all but "iat" and "bytes",
    # which the planner writes first. The rest is the same for the ten envelopes
    # of a report (and mostly for every report), so it is parsed once; rows
    # written in another shape (before "iat" was recorded) are parsed whole.
    head = _IAT_AND_BYTES.match(text)
    if head is None:
        return MappingProxyType(json.loads(text))
    return _facts_after_size("{" + text[head.end() :])


@functools.lru_cache(maxsize=64)
def _facts_after_size(text: str) -> Mapping[str, Any]:
    # Read-only: one parse is shared by every entry made from it.
    return MappingProxyType(json.loads(text))


def _facts(audit: str) -> dict[str, Any]:
    """The send facts (``OutboxItem.audit``) as a ``sent`` or ``withheld`` entry takes them."""
    facts = _entry_facts(audit)
    return {
        "kind": facts["kind"],
        "released": facts["released"],
        "policy_digest": facts["policy"],
        "originator": facts["originator"],
        "tlp": facts["tlp"],
        "rel_to": facts["rel_to"],
    }


def sent_event(member: str, item: OutboxItem, at: datetime) -> AuditEvent:
    """The audit entry for an envelope the hub acknowledged."""
    kid = item.recipient_kid
    if kid is None:  # a start takes back every pending envelope that names none
        raise AuditError(f"the envelope to {item.partner} names no recipient key")
    return audit_events.sent(
        member,
        at,
        partner=item.partner,
        report_id=item.report_id,
        jwe_sha256=item.jwe_sha256,
        recipient_kid=kid,
        **_facts(item.audit),
    )


def withheld_event(member: str, taken: Withholding, at: datetime) -> AuditEvent:
    """The audit entry for a pending envelope a start takes back (``Store.unkeyed``)."""
    return audit_events.withheld(
        member,
        at,
        partner=taken.partner,
        report_id=taken.report_id,
        jwe_sha256=taken.jwe_sha256,
        recipient_kid=taken.recipient_kid,
        reason=taken.reason,
        **_facts(taken.audit),
    )


def _refused_alone(exc: BaseException) -> bool:
    """Whether a failed publish says this envelope is refused, not its partner's inbox.

    Too large for the inbox (its ``max_msg_size``: the hub's 400, err_code 10054) or
    for the hub (``max_payload``): the partner's other envelopes go in. Held for it,
    the partner waited as its hold doubled with each of its retries (a review: a
    report planned 8 s in waited 7.6 s), since no ack ended it.
    """
    return isinstance(exc, (nats.js.errors.BadRequestError, nats.errors.MaxPayloadError))


RunDb = Callable[..., Awaitable[Any]]
"""Runs a synchronous store/audit call on the store's single thread."""


class Publisher:
    """Publishes pending envelopes with at most ``max_in_flight`` awaiting acks."""

    def __init__(
        self,
        member: str,
        nc: Client,
        store: Store,
        run_db: RunDb,
        record_sent: Callable[[list[OutboxItem]], None],
        metrics: Metrics,
        max_in_flight: int,
        connected: Callable[[], bool],
        may_publish: Callable[[], bool] = lambda: True,
        inbox_seq: Mapping[str, int] | None = None,
    ) -> None:
        self.member = member
        self.acks = PubAcks(nc)
        self.connected = connected  # whether an ack could still arrive
        # False while what is pending must not go out yet: signed by a clock that
        # partners would refuse (the node's, off the hub's), until signed again.
        self.may_publish = may_publish
        self.store = store
        self.run_db = run_db
        self.record_sent = record_sent  # audit + mark sent, on the store thread
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        # Half the window: each refill reads past every in-flight and unrecorded
        # row (``Store.pending``'s skip), so the fewer refills the less of that
        # per envelope (an eighth, when a row skipped cost ~1.4 us: 21 us each).
        self._refill = max(1, max_in_flight // 2)
        # Envelopes are named by their outbox row (``OutboxItem.rowid``): the
        # skip then reads only the pending index (~0.4 us a row), and a row
        # signed again in place (``Store.reissued``) keeps its name.
        # Awaiting the hub's ack: the ack future and when to give up on it.
        self._in_flight: dict[int, tuple[asyncio.Future[int | None], float]] = {}
        self._acked: list[OutboxItem] = []
        # Acked but not yet marked sent: never picked up again meanwhile, so an
        # envelope is not published (and audited as sent) twice in one run.
        self._unrecorded: set[int] = set()
        self._wake = asyncio.Event()
        # Whether the outbox may hold rows this publisher has not seen: set by
        # ``wake`` and after recording, cleared when a look finds fewer than it
        # could take. An ack does not add a row, so it wakes the loop only while
        # rows may be waiting for the room it frees: at a trickle, one look per
        # plan, not one per ack.
        self._unseen = True
        # Envelopes just planned, handed over by the plan commit (``hand``): taken
        # without a look while the publisher has seen every older row (not
        # ``_unseen``); dropped when it has not, since the look then finds them.
        self._handed: list[OutboxItem] = []
        self._seen_top = 0  # the highest row a look has read
        self._acked_wake = asyncio.Event()  # set when _acked gains an item, or at the end
        self._finished = False  # run has ended: record what is left, then stop
        self._stopping = asyncio.Event()  # ends the recorder's gathering wait at a stop
        self._retry_at: dict[int, float] = {}
        self._attempts: dict[int, int] = {}
        # Partners held back as a whole after a publish to them failed, until when:
        # all their envelopes go to one inbox, and a full one (or one the hub does not
        # serve) refuses them all. Held one envelope at a time, a feed trial's three
        # full inboxes kept the window full of envelopes bound to fail, ~1,400
        # refused publishes a second, and the other partners' backlog barely moved.
        self._held: dict[str, float] = {}
        self._holds: Counter[str] = Counter()  # holds in a row since the partner's last ack
        self._warned = Throttle(WARN_EVERY)  # one warning per partner per period
        self._record_log = Throttle()  # record_sent_failed, once a minute
        self.counts: Counter[str] = Counter()
        self.last_error: str | None = None
        # The highest stream sequence an ack gave for each partner's inbox, kept across
        # restarts (``inbox_seq``, from the status): one at or below it means the inbox
        # went back (the hub's store put back from a copy, or the inbox made again), and
        # what we sent past it may be lost there.
        self._inbox_seq: dict[str, int] = dict(inbox_seq or {})

    def wake(self) -> None:
        """Tell the publisher new envelopes may be pending."""
        self._unseen = True
        self._wake.set()

    def hand(self, items: Sequence[OutboxItem] | None) -> None:
        """Publish these envelopes just planned (``Store.plan``'s answer) without reading them.

        At a trickle that saves a look at the outbox per plan. Taken only while
        the publisher has seen every older pending row and has room for them;
        otherwise, or given None, this is ``wake``: the look reads them back.
        """
        if items is None or self._unseen or len(self._handed) + len(items) > self.max_in_flight:
            self._handed = []
            self.wake()
            return
        self._handed += items
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop``; then wait briefly for in-flight acks and record them."""
        committer = asyncio.create_task(self._commit_loop())
        try:
            while not stop.is_set():
                # Cleared before looking, so a wake-up that comes while the store
                # is asked (a plan committed meanwhile) ends the wait below at once.
                self._wake.clear()
                self._expire(time.monotonic())
                room = self.max_in_flight - len(self._in_flight)
                started = 0
                failed = False
                # Disconnected, nats-py would buffer the envelope and write it at the
                # next connection, even after the outbox has given up on its ack and
                # signed it again (a long outage): a copy out that no audit entry
                # records. The outbox is the buffer; publishing waits for the hub.
                # Connected, refill in batches, not after every ack: each refill is a
                # store round trip, and one per ack cost the store thread more than
                # the acks' own bookkeeping.
                if not self.connected() or not self.may_publish():
                    failed = True
                else:
                    items, failed = await self._next(room)
                    for item in items:
                        await self._publish(item)
                        started += 1
                if started == 0:
                    if stop.is_set():
                        break
                    await self._sleep(failed)
        finally:
            self._stopping.set()
            # Hand back: whatever is unacked stays pending in the outbox. Acks come
            # only over a live connection, so with the hub gone waiting would only
            # delay the stop (by up to PUBLISH_TIMEOUT, past systemd's patience).
            deadline = time.monotonic() + PUBLISH_TIMEOUT
            while self._in_flight and self.connected():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                waiting = [future for future, _ in self._in_flight.values()]
                await asyncio.wait(waiting, timeout=min(left, STOP_POLL))
            for future, _ in list(self._in_flight.values()):
                future.cancel()
            self._finished = True
            self._acked_wake.set()
            await committer

    async def _next(self, room: int) -> tuple[list[OutboxItem], bool]:
        # What to publish now, and whether the store could not be read: envelopes
        # handed over while every older row was seen, else, with room for a
        # refill and rows that may wait (or a retry due), the oldest pending.
        now = time.monotonic()
        retry = self._retry_due(now)
        if self._handed and not self._unseen and not retry:
            # A look that ran after their commit read them already: its rows are
            # numbered up to _seen_top, and a later plan's rows above any before.
            # A held partner's wait in the outbox: the look at the hold's end finds them.
            fresh = [
                i for i in self._handed if i.rowid > self._seen_top and i.partner not in self._held
            ]
            items, self._handed = fresh[:room], fresh[room:]  # the rest as acks free room
            return items, False
        if not (room >= self._refill or (room > 0 and not self._in_flight)):
            if retry:
                # Due, but no room: the acks that free it must wake the loop for the
                # look (``_done``), not the next ack deadline, up to 5 s away.
                self._unseen = True
            return [], False
        if not (self._unseen or retry):
            return [], False
        # Due retries are plain pending rows from here: a full answer below
        # leaves the rest of them to the next look.
        self._retry_at = {k: t for k, t in self._retry_at.items() if t > now}
        self._held = {p: t for p, t in self._held.items() if t > now}
        skip = set(self._in_flight) | self._unrecorded | self._retry_at.keys()
        self._unseen = False  # a wake-up during the look sets it again
        self._handed = []  # pending still: the look finds them, oldest first
        try:
            items = await self.run_db(self.store.pending, room, skip, frozenset(self._held))
        except MsmtError as exc:
            self.last_error = str(exc)
            self._unseen = True
            return [], True
        if len(items) >= room:
            self._unseen = True  # the answer was cut at the room left
        if items:
            self._seen_top = max(self._seen_top, items[-1].rowid)
        return items, False

    async def _sleep(self, failed: bool) -> None:
        # Until a wake-up, or the next timer: a retry after a failure, else the
        # next ack deadline or retry due, else IDLE_WAIT.
        try:
            await asyncio.wait_for(
                self._wake.wait(), RETRY_AFTER if failed else self._idle_timeout()
            )
        except TimeoutError:
            # The safety net: a row no wake-up announced is still found, at worst
            # IDLE_WAIT later (one look, ~0.1 ms of the store thread, when idle).
            self._unseen = True

    def _retry_due(self, now: float) -> bool:
        # An envelope's retry, or a partner's hold, is over.
        return any(t <= now for t in self._retry_at.values()) or any(
            t <= now for t in self._held.values()
        )

    def _idle_timeout(self) -> float:
        # Woken by a new plan, a failure, or an ack that frees room unseen rows
        # wait for (``wake``/``_done``); a timer is needed only for the next ack
        # deadline or retry that falls due.
        now = time.monotonic()
        due = [deadline for _, deadline in self._in_flight.values()][:1]
        due += [t for t in self._retry_at.values() if t > now]
        due += [t for t in self._held.values() if t > now]
        if not due:
            return IDLE_WAIT
        return min(IDLE_WAIT, max(0.01, min(due) - now))

    async def _publish(self, item: OutboxItem) -> None:
        # Pipelined: the ack is matched to this envelope by its reply subject in
        # one reply subscription, and ``_done`` runs when it arrives.
        # No task or timer per envelope; ``_expire`` times out lost acks.
        key = item.rowid
        started = time.perf_counter()
        try:
            future = await self.acks.publish(item.subject, item.jwe, item.msg_id)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            self._failed(item, exc)
            return
        self._in_flight[key] = (future, time.monotonic() + PUBLISH_TIMEOUT)
        future.add_done_callback(functools.partial(self._done, item, started))

    def _expire(self, now: float) -> None:
        # In-flight entries are in publish order, so their deadlines are too.
        for future, deadline in self._in_flight.values():
            if deadline > now:
                return
            future.cancel()  # -> _done, which removes it and schedules the retry

    def _done(self, item: OutboxItem, started: float, future: asyncio.Future[int | None]) -> None:
        key = item.rowid
        self._in_flight.pop(key, None)
        if future.cancelled():
            self._failed(item, TimeoutError(f"no ack within {PUBLISH_TIMEOUT:g} s"))
            return
        exc = future.exception()
        if exc is not None:
            self._failed(item, exc)
            return
        if self._unseen or self._handed:
            self._wake.set()  # rows may be waiting for the room this ack frees
        self._attempts.pop(key, None)
        self._holds.pop(item.partner, None)
        if self._held.pop(item.partner, None) is not None:
            # Its inbox takes envelopes again: those the hold kept back need a look.
            self._unseen = True
            self._wake.set()
        self.metrics.publish_latency.observe(time.perf_counter() - started)
        seq = future.result()
        if seq is not None:
            self._check_inbox_seq(item.partner, seq)
        self._acked.append(item)
        self._unrecorded.add(key)
        self._acked_wake.set()

    def inbox_seq_mark(self) -> str:
        """The highest sequence each partner's inbox acked, for the status to keep."""
        return json.dumps(self._inbox_seq, sort_keys=True, separators=(",", ":"))

    def _check_inbox_seq(self, partner: str, seq: int) -> None:
        # A review of the hub-restore drill: a recipient stopped while the hub's store
        # was put back from a copy cannot see what it lost; its senders can, when their
        # next ack comes back at or below one they had before (a second signal: other
        # senders' messages may carry the inbox past it first).
        highest = self._inbox_seq.get(partner, 0)
        self._inbox_seq[partner] = seq
        if seq > highest:
            return
        self.metrics.partner_inbox_went_back.labels(partner=partner).inc()
        self.last_error = (
            f"hub: {partner}'s inbox went back (an ack at message {seq}, after one at"
            f" {highest}): the hub lost what waited there (its store put back from a copy,"
            f" or the inbox made again): run msmt node resend --to {partner} --since <a few"
            " minutes before the copy>, and check with msmt audit replay (docs/RELIABILITY.md)"
        )
        if self._warned.due("inbox_went_back", partner):
            log.warning("partner_inbox_went_back", partner=partner, seq=seq, before=highest)

    def _failed(self, item: OutboxItem, exc: BaseException) -> None:
        # Not acked: stays pending in the outbox, retried after a backoff.
        key = item.rowid
        self.last_error = f"publish to {item.partner}: {type(exc).__name__} {exc}".strip()
        attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
        now = time.monotonic()
        self._retry_at[key] = now + min(RETRY_MAX, RETRY_AFTER * 2 ** (attempts - 1))
        if self._held.get(item.partner, 0.0) <= now and not _refused_alone(exc):
            # Once per hold, not per envelope failing with it (a window's worth at once):
            # the hold doubles only as one look after another still fails.
            holds = self._holds[item.partner] = self._holds[item.partner] + 1
            self._held[item.partner] = now + min(HOLD_MAX, RETRY_AFTER * 2 ** (holds - 1))
        self._wake.set()  # the loop's timer must now cover this retry
        if self._warned.due("publish_failed", item.partner):
            log.warning(
                "publish_failed",
                report_id=item.report_id,
                partner=item.partner,
                error=type(exc).__name__,
                # The hub's own words ("maximum bytes exceeded": the partner's inbox is
                # full), as last_error has them; no report content is in a publish error.
                detail=str(exc)[:200],
                attempts=attempts,
            )

    async def _record(self, batch: list[OutboxItem]) -> bool:
        """Record acked envelopes as sent; whether they were put back to be recorded later."""
        requeued = False
        try:
            await self.run_db(self.record_sent, batch)
        except MsmtError as exc:
            self.last_error = str(exc)
            unlogged = self._record_log.check("record_sent_failed", "")
            if unlogged is not None:
                log.error(  # noqa: TRY400 - the reason is the line
                    "record_sent_failed",
                    error=str(exc),
                    envelopes=len(batch),
                    **({"unlogged_before": unlogged} if unlogged else {}),
                )
            if not self._finished and not self._stopping.is_set():
                # The hub has them: record them again later, never publish
                # them again meanwhile. A disk-full trial published the same
                # 177 envelopes 178,940 times, and past the hub's 2-minute
                # dedup window each stored again.
                self._acked[:0] = batch
                requeued = True
            # At a stop: not recorded means not marked sent; the next start
            # sends them again, which the hub's dedup may not catch by then.
        else:
            # One metric update per partner, not per envelope (a label
            # lookup and a locked increment each).
            for partner, count in Counter(item.partner for item in batch).items():
                self.metrics.published.labels(partner=partner).inc(count)
                self.counts[f"published.{partner}"] += count
        finally:
            if not requeued:
                self._unrecorded.difference_update(i.rowid for i in batch)
        return requeued

    async def _commit_loop(self) -> None:
        # Sleeps until an ack arrives (or ``run`` ends), not on a timer: an idle
        # node does not wake here at all.
        while True:
            if not self._finished:
                await self._acked_wake.wait()
                self._acked_wake.clear()
                if self._acked:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), COALESCE_ACKS)
            elif not self._acked:
                if not self._in_flight:
                    return
                await asyncio.sleep(0.02)  # a last ack callback still due
                continue
            if self._acked:
                batch, self._acked = self._acked, []
                requeued = await self._record(batch)
                if requeued:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), RECORD_RETRY_S)
                    self._acked_wake.set()  # to try again without waiting for a new ack
                    continue
                # Failed at a stop or not, these rows may be pending again (not
                # recorded, or signed again meanwhile, so not marked sent): look for them.
                self.wake()
