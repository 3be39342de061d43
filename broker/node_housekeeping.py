"""The node's housekeeping: once a second, its gauges, ``msmt status`` facts and checkpoint.

``Housekeeping`` runs the round that takes the parts' counts into the metrics
and the store, writes the status facts when they changed (or every
``STATUS_EVERY_S``), logs what a crash or a full disk left unlogged, measures the
outbox, logs an ``activity`` line, prunes the seen-set, and publishes our latest
signed checkpoint for the witnesses; and the last status at a stop. Part of
``broker.node.Node``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Final

import nats.errors

from broker.errors import MsmtError
from broker.feeds import FEED_COUNTER, FEED_USED
from broker.hubwatch import INBOX_STREAM_STATE
from broker.log import get_logger
from broker.node_base import (
    HOUSEKEEPING_S,
    OUTBOX_AGE_EVERY_S,
    STATUS_EVERY_S,
    NodeBase,
    utc_now_text,
)
from broker.publisher import PARTNER_INBOX_SEQ_STATE
from broker.reconcile import audit_unaudited
from broker.roster import format_time
from broker.store_inbox import utc_day

log = get_logger("node")

REPUBLISH_S: Final = 60.0
"""Longest time between two publications of our latest checkpoint, changed or not."""
ACTIVITY_EVERY_S: Final = 60.0
"""How often a node that did anything logs one ``activity`` line of counts."""
PRUNE_EVERY_S: Final = 60.0
"""How often the store drops replay seen-set entries past their freshness window."""


class Housekeeping(NodeBase):
    """The node's once-a-second round: gauges, status facts, activity, our checkpoint."""

    def _housekeep_sync(self) -> tuple[tuple[int, int], str | None, int]:
        # Reports committed while their audit append failed (a full disk) wait
        # unplanned until their entries are in the log: retried here each tick.
        recovered = audit_unaudited(self.member, self.store, self.audit, datetime.now(UTC))
        return self.store.outbox_depths(), self.audit.latest_checkpoint(), recovered

    async def _housekeeping(self) -> None:
        last_prune = 0.0
        while True:
            try:
                await self._housekeep_once()
                if time.monotonic() - last_prune > PRUNE_EVERY_S:
                    await self.run_db(self.store.prune_seen)
                    last_prune = time.monotonic()
            except MsmtError as exc:
                # Status facts are best effort; a full disk must not stop the node.
                self._error(f"housekeeping: {exc}")
            if self.stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick.wait(), HOUSEKEEPING_S)
            self._tick.clear()

    def _take_counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for intake in self._intakes:
            counts.update({f"intake.{k}": v for k, v in intake.counts.items()})
            intake.counts.clear()
            # By feed, for msmt status and msmt feeds list; apart from the
            # ``intake.`` names, which the metrics and activity line add up.
            counts.update({f"{FEED_COUNTER}{k}": v for k, v in intake.feed_counts.items()})
            intake.feed_counts.clear()
        # Every tally below is kept on the event loop's thread, so none is
        # mutated by the store thread while it is read here.
        for part in (self.receiver, self.publisher):
            if part is not None:
                counts.update(part.counts)
                part.counts.clear()
        for errant in (self.publisher, self.receiver, self.auditnet):
            if errant is not None and errant.last_error:
                self._last_error, errant.last_error = errant.last_error, None
                self._last_error_at = utc_now_text()
        if self.auditnet.alarm:
            # Recorded once and kept across restarts (msmt status): a red-team
            # member overwrote a fork alarm in last_error within 9 s.
            self._alarm_facts = {
                "last_audit_alarm": self.auditnet.alarm,
                "last_audit_alarm_at": utc_now_text(),
            }
            self.auditnet.alarm = None
        return counts

    async def _final_status(self) -> None:
        # After the connection is closed: the counts since the last tick, and a
        # status that no longer says "connected" for a node that has stopped.
        counts = self._take_counts() + self._unrecorded
        facts = {
            **_feeds_used(counts),
            "connected": "no",
            "inbox_lag": "unknown",
            INBOX_STREAM_STATE: self.hub.stream_mark,
            PARTNER_INBOX_SEQ_STATE: self._inbox_seq_mark(),
            "inbox_paused": "",  # a stopped node takes nothing: "connected no" says so
            "nats_refused": "",  # nor tries the hub (last_error keeps the refusal)
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
            "updated_at": utc_now_text(),
            "witnessed": self._witnessed(),
            **self._alarm_facts,
            **self.started_facts,
        }
        try:
            await self.run_db(self.store.record_status, counts, facts)
        except MsmtError as exc:
            self._error(f"housekeeping: {exc}")

    def _inbox_seq_mark(self) -> str:
        # Before the first connection, what the last run kept, unchanged.
        return self._inbox_seq if self.publisher is None else self.publisher.inbox_seq_mark()

    def _witnessed(self) -> str:
        """Each partner's log: when last seen at a checkpoint we cosigned ("" not since start)."""
        seen = self.auditnet.seen
        return json.dumps(
            {
                origin: format_time(datetime.fromtimestamp(seen[origin], UTC))
                if origin in seen
                else ""
                for origin in sorted(self.auditnet.log_keys)
            }
        )

    def _count_intake(self, counts: Counter[str]) -> None:
        for name, count in counts.items():
            if name.startswith("intake.accepted"):
                self.metrics.accepted.inc(count)
            elif name.startswith("intake."):
                self.metrics.intake_rejected.labels(reason=name.partition(".")[2]).inc(count)

    def _show_budget(self) -> None:
        # Each partner's share of its daily budget spent: from the start (the store's
        # totals), whether the inbox is read or not, and 0 from 00:00 UTC.
        day = utc_day(time.time())
        for sender in self.metrics.partners:
            ratio = self.inbound.budget.ratio(sender, day)
            self.metrics.budget_used.labels(sender=sender).set(ratio)

    async def _housekeep_once(self) -> None:
        self._show_budget()
        self._check_served()
        lag = await self.hub.inbox_lag()
        counts = self._take_counts()
        # Metrics first: they live in memory, so they count what happens while the
        # store cannot (a full disk, when "unavailable" refusals are what to alert on).
        self._count_intake(counts)
        self._activity.update(counts)
        self._unrecorded.update(counts)
        status = {
            "connected": "yes" if self.nc is not None and self.nc.is_connected else "no",
            "nats_refused": self._nats_refused,
            "inbox_lag": "unknown" if lag is None else str(lag),
            "clock_offset": self.hub.clock_offset,
            INBOX_STREAM_STATE: self.hub.stream_mark,
            PARTNER_INBOX_SEQ_STATE: self._inbox_seq_mark(),
            "inbox_paused": self._inbox_paused,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
        }
        # An idle node rewrites unchanged facts only every STATUS_EVERY_S, so
        # ``updated_at`` stays a liveness sign without an fsync every second.
        facts: dict[str, str] | None = None
        now = time.monotonic()
        if status != self._status or counts or now - self._status_at >= STATUS_EVERY_S:
            # Witnessed times ride along: they change as each partner republishes,
            # and would otherwise cost a commit every few seconds.
            facts = {**status, "updated_at": utc_now_text(), "witnessed": self._witnessed()}
        # An alarm not recorded yet; this run's start facts, at its first write.
        pending = {**self._alarm_facts, **self.started_facts}
        if pending:
            facts = {**(facts or {"updated_at": utc_now_text()}), **pending}
        if self._unrecorded:  # counts from this round, or left from one the store refused
            facts = {
                **(facts or {"updated_at": utc_now_text()}),
                **_feeds_used(self._unrecorded),
            }
        if facts is not None or self._unrecorded:
            # One fsynced commit, and only when there is something to record. What
            # it could not record stays for the next round: counts, facts, an alarm.
            try:
                await self.run_db(self.store.record_status, Counter(self._unrecorded), facts or {})
            except MsmtError as exc:
                self._error(f"housekeeping: {exc}")
            else:
                self._unrecorded = Counter()
                self._alarm_facts = {}
                self.started_facts = {}
                if facts is not None:
                    self._status, self._status_at = status, now
        try:
            (unsent, awaiting), checkpoint, recovered = await self.run_db(self._housekeep_sync)
        finally:
            # Whatever the store says: a full disk failed the call above, and left the
            # lag and readiness as they were before it filled (a monitoring trial).
            # NaN while not known (not connected, the hub not answering): a last value
            # kept would read as current, to a dashboard and to an alert rule alike.
            self.metrics.inbox_lag.set(math.nan if lag is None else lag)
            if status["connected"] == "no":
                self.metrics.clock_offset.set(math.nan)
            # Connected with the inbox stream gone (a hub that lost its store) still
            # shows msmt_nats_connected 1; this is what says nothing is being received.
            self.metrics.ready.set(1 if self.ready() is None else 0)
        depth = unsent + awaiting
        if recovered:
            self.plan_loop.reread()
        self.metrics.outbox_depth.set(depth)
        self.metrics.outbox_awaiting_key.set(awaiting)
        if now - self._outbox_age_at >= OUTBOX_AGE_EVERY_S:
            self._outbox_age_at = now
            await self._measure_outbox_age()
        if now - self._activity_at >= ACTIVITY_EVERY_S:
            self._log_activity(now - self._activity_at, depth)
        await self._publish_checkpoint(checkpoint)

    async def _measure_outbox_age(self) -> None:
        # By partner, so that an alert names the partner whose reports wait (its inbox
        # full, its server unreachable), which the total depth cannot under load.
        try:
            oldest = await self.run_db(self.store.outbox_oldest)
        except MsmtError as exc:
            self._error(f"housekeeping: {exc}")
            return
        wall = time.time()
        # The roster's partners, and any other the outbox holds reports for.
        for partner in sorted({*self.metrics.partners, *oldest}):
            since = oldest.get(partner)
            age = 0.0 if since is None else max(0.0, wall - since)
            self.metrics.outbox_oldest.labels(partner=partner).set(round(age, 1))

    def _log_activity(self, seconds: float, depth: int) -> None:
        # An operator tailing the log sees the node at work (receipts are not
        # logged one by one): counts only, and nothing from an idle node.
        counts, self._activity = self._activity, Counter()
        self._activity_at = time.monotonic()
        if not counts:
            return

        def total(prefix: str) -> int:
            return sum(n for name, n in counts.items() if name.startswith(prefix))

        accepted, tokens = counts["intake.accepted"], counts["intake.token"]
        log.info(
            "activity",
            seconds=round(seconds),
            accepted=accepted,
            intake_refused=total("intake.") - accepted - tokens,
            token_refused=tokens,
            sent=total("published."),
            received=total("received."),
            rejected=total("rejected."),
            duplicates=total("duplicate."),
            held=total("held."),
            outbox_depth=depth,
        )

    async def _publish_checkpoint(self, checkpoint: str | None) -> None:
        # Witnesses need our latest signed root; core NATS is enough, the AUDIT
        # account archives it and the next one supersedes a lost one.
        # The same one again after a while: a witness whose cosignature was lost on
        # the way (a hub restart) sees its line missing and signs again, so an idle
        # log still reaches its quorum.
        again = time.monotonic() - self._published_at >= REPUBLISH_S
        if checkpoint is None or (checkpoint == self._published_checkpoint and not again):
            return
        if self.nc is None or not self.nc.is_connected:
            return
        body = checkpoint.encode()
        self.auditnet.published(body)
        try:
            await self.nc.publish(f"msmt.audit.{self.member}.checkpoint", body)
        except nats.errors.Error as exc:
            self._error(f"checkpoint publish: {type(exc).__name__}")
            return
        self._published_checkpoint = checkpoint
        self._published_at = time.monotonic()


def _feeds_used(counts: Counter[str]) -> dict[str, str]:
    """``feed_last_used.<feed>``: now, for each feed that sent records since the last tick."""
    now = utc_now_text()
    used = {
        name.removeprefix(FEED_COUNTER).rpartition(".")[0]
        for name in counts
        if name.startswith(FEED_COUNTER) and not name.endswith(".revoked")
    }
    return {f"{FEED_USED}{feed}": now for feed in sorted(used)}
