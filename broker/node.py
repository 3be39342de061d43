"""The national node daemon: intake, planning, publishing, receiving, metrics, shutdown.

``broker.node_start.load_node`` checks everything before anything runs (config,
signed roster, private keys, policy, pseudonym keys, store, audit log), so a bad
setup fails at start with one line, and builds the ``Node``. ``Node.run`` then
runs these tasks until SIGTERM/SIGINT:

* intake on the unix socket and the spool directory (``broker.intake``);
* the planner and the publisher (``broker.publisher``); planning runs in a
  worker process (``broker.planpool``), started before any input is taken;
* the inbox receiver (``broker.receiver``), once NATS is connected;
* housekeeping: gauges, ``msmt status`` facts, counters, seen-set pruning, and
  publishing the audit log's latest signed checkpoint.

Every store and audit-log call runs on one worker thread (SQLite connections
are single-threaded; the event loop never waits on an fsync). Shutdown order:
stop intake, stop planning and fetching, wait briefly for in-flight acks
(anything unacked stays in the outbox), flush acks, close NATS, the store and the
log, then the planning worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import signal
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import nats
import nats.errors
import nats.js.errors
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import audit_events, version
from broker.auditlog import AuditLog
from broker.auditnet import AuditNet
from broker.config import NodeConfig
from broker.errors import (
    ConfigError,
    KeyMaterialError,
    MsmtError,
    UsageError,
)
from broker.feeds import FEED_COUNTER, FEED_USED, FeedTokens
from broker.intake import Intake, Refusal, ensure_token, make_app, read_token, serve_unix
from broker.log import Throttle, get_logger
from broker.members import MEMBERS
from broker.metrics import Metrics, serve_tcp
from broker.metrics import make_app as make_metrics_app
from broker.natsclient import TlsOnlyClient
from broker.natsconfig import inbox_durable, inbox_prefix, inbox_stream
from broker.natsetup import consumer_alterations, stream_alterations
from broker.planner import Planner
from broker.planpool import PlanPool, PlanWorkerError
from broker.policy import Policy
from broker.publisher import Publisher, RunDb, sent_event
from broker.receiver import Inbound, Receiver
from broker.reconcile import audit_unaudited
from broker.roster import Roster, format_time
from broker.spool import Spool
from broker.stopsignals import StopSignals
from broker.store import NewReport, OutboxItem, Store

log = get_logger("node")

_HUB_TROUBLE: Final = "hub"
"""One condition for the log's once-a-minute rule: in an outage, nats-py's
connection errors and the inbox's timeouts alternate, and would each be logged."""

T = TypeVar("T")
PLAN_BATCH: Final = 50
HANDED_MAX: Final = 4 * PLAN_BATCH
"""Most accepted reports held in memory for the planner; past it, it reads them from the store."""
PLAN_RETRY_S: Final = 30.0
HOUSEKEEPING_S: Final = 1.0
LAG_EVERY_S: Final = 5.0
"""Seconds between ``consumer_info`` requests for the inbox-lag gauge and status."""
STREAM_EVERY_S: Final = 30.0
"""Seconds between the inbox stream's info requests (``_check_stream``)."""
OUTBOX_AGE_EVERY_S: Final = 15.0
"""How often ``msmt_outbox_oldest_seconds`` is measured (a query over the waiting rows)."""
SILENT_SWITCH: Final = 3
"""Unanswered ``consumer_info`` requests in a row after which the node leaves its server.

A server cut off from the rest of a cluster, frozen, or behind a link that drops
packets keeps the connection open, so nats-py stays on it (its pings notice a dead
link only after 2-6 minutes, a live server never) while nothing is published or
received; another server in ``nats.urls`` may be whole. Three requests ``LAG_EVERY_S``
apart, each given 1 s, are 10-15 s without an answer: longer than a leader election."""
CLOCK_WARN_S: Final = 60.0
"""A clock this far from the hub's is reported (``msmt_clock_offset_seconds``, the status)."""
CLOCK_STEP_S: Final = 1.0
"""A step of the clock this large since the last comparison is compared again at once."""
CLOCK_PAUSE_S: Final = 240.0
"""A clock this far from the hub's pauses the inbox: it would misjudge partners' reports.

Partners' clocks may be up to ``CLOCK_WARN_S`` off without a warning, and a report
issued more than 5 minutes (``MAX_SKEW``) in our future is held until it is not: past
4 minutes behind, our own error alone would hold theirs, and a day ahead refuse them
as too old, which is final."""
REPUBLISH_S: Final = 60.0
"""Longest time between two publications of our latest checkpoint, changed or not."""
WRITE_FAILED_S: Final = 60.0
"""How long after a failed store or audit-log write the node reads as not ready (``ready``)."""
_PAUSED: Final = {
    "twin": "inbox paused: a twin takes reports from it (msmt status)",
    "clock": "inbox paused: this node's clock is too far off the hub's (msmt status)",
}
STATUS_EVERY_S: Final = 30.0
"""Longest time between status writes when nothing changed (``updated_at``'s freshness)."""
ACTIVITY_EVERY_S: Final = 60.0
"""How often a node that did anything logs one ``activity`` line of counts."""
PAUSED_LOG_EVERY_S: Final = 60.0
"""While the inbox is paused for a twin, a line says so this often."""
PLAN_ERROR_RETRY_S: Final = 0.5
REISSUE_EVERY_S: Final = 60.0
"""Longest time between looks for envelopes to sign again (pending too long; ``msmt node
resend``); a quarter of the freshness window if that is shorter."""
EXPIRY_WARNING: Final = timedelta(days=14)
"""A credential expiring sooner than this is logged at start (``credential_expires_soon``)."""


class NodeFailedError(MsmtError):
    """A part of the running node failed; the daemon stopped so it can be restarted."""


class Node:
    """One member's running node; build it with ``broker.node_start.load_node``."""

    # Reports accepted and logged since the planner last looked, which it takes
    # from here rather than reading the store (a hop to its thread and back per
    # report at a trickle). The store stays the record: None (after a recovery,
    # or past HANDED_MAX) has the planner read it (see _plan_loop).
    _handed: dict[str, bytes] | None
    _signals: StopSignals | None = None
    """``msmt node run``'s, to name the signal that stopped the node."""

    def __init__(
        self,
        config: NodeConfig,
        store: Store,
        audit: AuditLog,
        planner: Planner,
        inbound: Inbound,
        seed: bytes,
        auditnet: Callable[[Metrics, RunDb], AuditNet],
        policy_text: str,
        tls: ssl.SSLContext | None = None,
        expiries: Mapping[str, datetime] | None = None,
    ) -> None:
        self.config = config
        self.member = config.member
        self.store = store
        self.audit = audit
        self.planner = planner
        self.inbound = inbound
        self.seed = seed
        self.tls = tls
        self.metrics = Metrics(config.member)
        self._note_expiries(expiries or {})
        self.auditnet = auditnet(self.metrics, self.run_db)
        self.auditnet.on_twin = self._twin_seen
        self.stop = asyncio.Event()
        # Ends the receiver's run: at a stop, or when a twin is seen (``_twin_seen``).
        self._inbox_halt = asyncio.Event()
        self._inbox_paused = ""  # why and since when, while the inbox is paused
        self._paused_for = ""  # its cause: "twin" or "clock"
        # Why our clock is too far off the hub's to judge freshness, else empty, and
        # the offset for the status (whole seconds, signed): set by the clock check
        # (``_check_clock``), which the receiver waits for at start. ``_tick`` wakes
        # the housekeeping loop that checks before its second is up: at connect, so
        # the check (hence /readyz) comes at once; and at a stop.
        self._clock_off, self._clock_offset = "", "unknown"
        self._clock_checked, self._tick = asyncio.Event(), asyncio.Event()
        # Our clock minus the monotonic one at the last comparison: a change says
        # the clock was stepped (NTP, an operator) since, without asking the hub.
        self._clock_base: float | None = None
        # Nothing is published until the reissue loop has queued what was signed by
        # a wrong clock to be signed again: at start, and once the clock is right again.
        self._resign_due = True
        self._reissue_wake = asyncio.Event()
        self.nc: Client | None = None
        self.publisher: Publisher | None = None
        self.receiver: Receiver | None = None
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msmt-store")
        # Envelope crypto runs in a worker process, on another core than the
        # event loop and the store thread that publish and record the acks.
        self._plans = PlanPool(planner, policy_text)
        self._plan_wake, self._handed = asyncio.Event(), {}
        self._plan_skip: dict[str, float] = {}
        self._intakes: list[Intake] = []
        self._last_error = ""
        self._last_error_at = ""  # when it last happened, so a stale error reads as one
        self._alarm_facts: dict[str, str] = {}  # an audit alarm not recorded yet
        self._throttle = Throttle()
        self._error_log = Throttle()  # node_error: once a minute for each condition
        self._sent_logged: set[int] = set()  # outbox rows logged sent, not marked (store thread)
        self._published_checkpoint: str | None = None
        self._published_at = -math.inf
        self._lag: int | None = None
        # When the lag and the stream were last asked, how many requests in a row got
        # no answer, and how the hub has the inbox "consumer" and "stream" otherwise
        # than ``msmt nats setup`` made them (``_check_consumer``, ``_check_stream``).
        self._lag_at, self._stream_at, self._silent = -LAG_EVERY_S, -STREAM_EVERY_S, 0
        self._outbox_age_at = -OUTBOX_AGE_EVERY_S
        self._altered = {"consumer": "", "stream": ""}
        self._status: dict[str, str] = {}
        self._status_at = -STATUS_EVERY_S
        # Counts the store has not taken yet: kept until it can (a full disk).
        self._unrecorded: Counter[str] = Counter()
        self._activity: Counter[str] = Counter()
        self._activity_at = time.monotonic()
        self.failure: str | None = None

    def _note_expiries(self, expiries: Mapping[str, datetime]) -> None:
        # When each credential lapses: in a gauge, in the status, and in a warning.
        now = datetime.now(UTC)
        for credential, at in expiries.items():
            self.metrics.credential_expiry.labels(credential=credential).set(at.timestamp())
            # Said at start too, not only in a gauge nobody may scrape: a node that
            # signs with an expired key holds every report back (docs/KEYS.md).
            if at - now < EXPIRY_WARNING:
                log.warning(
                    "credential_expires_soon", credential=credential, expires_at=format_time(at)
                )
        if expiries:
            self.store.set_state(
                {
                    "credentials_valid_until": json.dumps(
                        {name: format_time(at) for name, at in sorted(expiries.items())}
                    )
                }
            )

    async def run_db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a store or audit-log call on the single store thread."""
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    # --- intake ---------------------------------------------------------------

    def _accept_sync(self, batch: list[NewReport], feed: str) -> tuple[list[bool], str | None]:
        # Store, then audit, then confirm: a crash between the first two leaves
        # unconfirmed reports that load_node audits at the next start, so the log
        # never misses an accepted report. The confirmation rides on the next store
        # write (the plan's, at a trickle) rather than an fsynced commit of its own:
        # a crash before it leaves entries the next start finds in the log after the
        # store's last write, and does not append again (audit_unaudited).
        fresh = self.store.accept(batch, feed=feed)
        new = [r for r, is_new in zip(batch, fresh, strict=True) if is_new]
        now = datetime.now(UTC)
        try:
            self.audit.append_many(
                [
                    audit_events.accepted(
                        self.member, now, report_id=r.report_id, kind=r.kind, feed=feed
                    )
                    for r in new
                ]
            )
            self.store.mark_audited_later([r.report_id for r in new])
        except MsmtError as exc:
            # Stored is accepted: the feed must not resend a report it would then
            # find taken. Housekeeping logs it once the log can be written, and the
            # planner takes only logged reports, so nothing is sent before that.
            return fresh, f"audit: {exc}"
        return fresh, None

    async def _accept(self, batch: list[NewReport], feed: str) -> list[bool]:
        fresh, failed = await self.run_db(self._accept_sync, batch, feed)
        if failed is not None:
            # Not logged: housekeeping logs them, then wakes the planner to read them.
            self._error(failed)
        elif self._handed is not None:
            new = [r for r, is_new in zip(batch, fresh, strict=True) if is_new]
            if len(self._handed) + len(new) > HANDED_MAX:
                self._handed = None
            else:
                self._handed.update((r.report_id, r.record) for r in new)
        self._plan_wake.set()
        return fresh

    def _reject_sync(self, refused: list[Refusal], feed: str) -> None:
        now = datetime.now(UTC)
        self.audit.append_many(
            [
                audit_events.rejected(
                    self.member,
                    now,
                    source=feed,
                    step=f"intake.{r.reason}",
                    reason=r.detail[:200],
                    report_id=r.report_id,
                )
                for r in refused
            ]
        )

    async def _record_rejects(self, refused: list[Refusal], feed: str) -> None:
        # A refused record changes nothing, so a failed audit write must not
        # turn the feed's answers into an error; it is logged and shown in status.
        try:
            await self.run_db(self._reject_sync, refused, feed)
        except MsmtError as exc:
            self._error(f"audit of intake rejections: {exc}")

    # --- planning and publishing ---------------------------------------------

    async def _plan_loop(self) -> None:
        # Three stages overlap: the worker plans a batch while the store commits
        # the one before, and the rows of the next batch are read before that
        # commit is queued on the store's thread, so the worker does not wait
        # behind it. At most one commit is outstanding; the rows planned but not
        # yet committed (still unplanned in the store) are skipped.
        committing: asyncio.Task[bool] | None = None
        in_commit: set[str] = set()
        planned: dict[str, list[OutboxItem]] = {}  # planned, commit not started
        waiting: dict[str, dict[str, str]] = {}  # their partners without a key
        # Whether the store may hold unplanned reports that are not in _handed. A
        # read that found fewer than it asked for saw them all; after it only a
        # recovery or an overfull _handed (None), a failed commit, a skip coming
        # due or rows the worker left for its next batch add one. So a report fed
        # alone costs no read, not three (the one that found it, one while its
        # plan was made, one while it was committed).
        look = True
        try:
            while not self.stop.is_set():
                # Cleared before looking, so a report accepted meanwhile wakes the next wait.
                self._plan_wake.clear()
                now = time.monotonic()
                due = [rid for rid, until in self._plan_skip.items() if until <= now]
                for rid in due:
                    del self._plan_skip[rid]
                skip = self._plan_skip.keys() | in_commit | planned.keys()
                rows, look, failed = await self._unplanned(look or bool(due), skip)
                if committing is not None:
                    # Not committed means still unplanned: read again after a pause.
                    failed |= not await committing
                    committing, in_commit = None, set()
                if planned:
                    in_commit = set(planned)
                    committing = asyncio.create_task(self._commit_plans(planned, waiting))
                    planned, waiting = {}, {}
                plans: dict[str, list[OutboxItem]] = {}
                errors: dict[str, str] = {}
                try:
                    if rows:
                        plans, errors, waiting = await self._plans.plan(rows, PLAN_BATCH)
                        # The worker plans at most PLAN_BATCH: the rest are read again.
                        look |= len(plans) + len(errors) < len(rows)
                except PlanWorkerError:
                    raise  # fatal: the node stops (and systemd restarts it)
                except MsmtError as exc:
                    self._error(f"planning: {exc}")
                    failed = True
                held: dict[str, list[str]] = {}
                for report_id, reason in errors.items():
                    self._plan_skip[report_id] = now + PLAN_RETRY_S
                    held.setdefault(reason, []).append(report_id)
                for reason, ids in held.items():
                    # One line per cause, not per report: an expired signing key
                    # holds back every report, and the log must not scroll with them.
                    which = f"{len(ids)} reports ({ids[0]}, ...)" if ids[1:] else f"report {ids[0]}"
                    self._error(f"cannot plan {which}: {reason}", same_as=f"plan: {reason}")
                self._report_waiting(waiting)
                planned = plans
                look |= failed
                if not plans and not errors and committing is None:
                    # Event-driven: an accept wakes us; a timer runs only for a
                    # retry (a store error, a report skipped for now).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._plan_wake.wait(), self._plan_timeout(failed))
        finally:
            if committing is not None:
                await committing

    async def _unplanned(
        self, look: bool, skip: Collection[str]
    ) -> tuple[list[tuple[str, bytes]], bool, bool]:
        # The plan loop's next rows: those handed over by the intake, and with
        # ``look`` (or _handed None) the store's. Also whether to look next time,
        # and whether the read failed.
        handed, self._handed = self._handed, {}
        rows: list[tuple[str, bytes]] = []
        if look or handed is None:
            limit = PLAN_BATCH + len(skip)
            try:
                rows = await self.run_db(
                    functools.partial(self.store.unplanned, audited_only=True), limit
                )
            except MsmtError as exc:
                self._error(f"planning: {exc}")
                return [], True, True
            look = len(rows) >= limit
        # Logged and committed, so in the store too until planned: a read may
        # have found them, and found fewer than it asked for, it found them all.
        read = {rid for rid, _ in rows}
        rows += [row for row in (handed or {}).items() if row[0] not in read]
        return [row for row in rows if row[0] not in skip], look, False

    def _plan_timeout(self, failed: bool) -> float | None:
        # How long the plan loop may sleep without a wake-up: briefly after a
        # store error, until the first skipped report is due, else until woken.
        # The loop drops a skip that came due, and reads the store for it.
        if failed:
            return PLAN_ERROR_RETRY_S
        if not self._plan_skip:
            return None
        return max(0.01, min(self._plan_skip.values()) - time.monotonic())

    def _report_waiting(self, waiting: Mapping[str, Mapping[str, str]]) -> None:
        # One warning a minute for every partner without a key, not an error of
        # this node: a partner's key lapsed, or a member not enrolled yet (a group
        # joining one by one has several, for weeks). In last_error it hid real
        # errors; msmt status shows the envelopes waiting per partner (outbox).
        # They go out once the partner's key is valid (a roster update and restart).
        if not waiting or not self._throttle.due("waiting", "partners"):
            return
        reasons = {p: why for partners in waiting.values() for p, why in partners.items()}
        log.warning(
            "reports_await_keys",
            reports=len(waiting),
            first_report=next(iter(waiting)),
            partners=",".join(sorted(reasons)),
            reasons="; ".join(sorted(set(reasons.values()))),
        )

    async def _commit_plans(
        self, plans: dict[str, list[OutboxItem]], waiting: dict[str, dict[str, str]]
    ) -> bool:
        # False if not committed: the reports stay unplanned and the plan loop retries.
        try:
            stored = await self.run_db(self.store.plan, plans, waiting)
        except MsmtError as exc:
            self._error(f"planning: {exc}")
            return False
        if self.publisher is not None:
            self.publisher.hand(stored)  # rather than have it read them back
        return True

    async def _reissue_loop(self) -> None:
        # A partner refuses an envelope signed longer ago than its freshness
        # window. One pending for half of ours (the hub unreachable) is signed
        # again before it goes out; ``msmt node resend`` queues sent ones that a
        # partner refused. Off the hot path: both are rare.
        window = self.config.limits.freshness_seconds
        stale_after, every = window / 2, reissue_interval(window)
        # Judged by a clock compared with the hub's (see _receive_forever).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._clock_checked.wait(), 2 * LAG_EVERY_S)
        while not self.stop.is_set():
            self._reissue_wake.clear()
            # Not while our clock is off the hub's: it would misjudge what is stale,
            # and sign with the wrong time again.
            if not self._clock_off:
                try:
                    await self._reissue_pass(stale_after)
                except MsmtError as exc:
                    if isinstance(exc, PlanWorkerError):
                        raise  # fatal, as in the plan loop
                    self._error(f"signing again: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reissue_wake.wait(), every)

    async def _reissue_pass(self, stale_after: float) -> None:
        # What was signed too long ago, or in the future (by a clock that ran ahead
        # and is right now), is signed again before the publisher may send it.
        now = wall_clock()
        await self.run_db(self.store.queue_stale, now - stale_after, now + CLOCK_WARN_S)
        failed: set[str] = set()
        while not self.stop.is_set() and await self._reissue_batch(failed):
            pass
        if self._resign_due and not self._clock_off:
            self._resign_due = False
            if self.publisher is not None:
                self.publisher.wake()
        tried: set[str] = set()
        while not self.stop.is_set() and await self._awaited_batch(tried):
            pass

    async def _awaited_batch(self, tried: set[str]) -> bool:
        # Partners a report was planned without (no valid encryption key then):
        # planned again now, once per pass; True if there may be more. The report
        # is signed anew for them (under the current policy and keys).
        rows = await self.run_db(self.store.awaiting, PLAN_BATCH + len(tried))
        rows = [row for row in rows if row[0] not in tried]
        if not rows:
            return False
        tried.update(rid for rid, _, _ in rows)
        plans, errors, waiting = await self._plans.plan(
            [(rid, record) for rid, record, _ in rows], len(rows)
        )
        for reason in sorted(set(errors.values())):
            self._error(f"cannot plan for a partner: {reason}", same_as=f"plan: {reason}")
        wanted = {rid: partners for rid, _, partners in rows if rid not in errors}
        queued, dropped = await self.run_db(self.store.awaited, plans, waiting, wanted)
        self._report_waiting({rid: w for rid, w in waiting.items() if rid in wanted})
        self._replanned("envelopes_planned_for_waiting_partners", queued, "not_planned", dropped)
        return True

    def _replanned(
        self, made: str, count: int, dropped_event: str, dropped: list[tuple[str, str]]
    ) -> None:
        # After envelopes were made again (or anew): wake the publisher, and name
        # the partners the current policy no longer releases anything to. One line
        # per batch, not per envelope: a policy narrowed to the members there are
        # drops an envelope for every report and absent member at once (a trial's
        # three-member group: 77 lines in one millisecond).
        if count:
            log.info(made, envelopes=count)
            if self.publisher is not None:
                self.publisher.wake()
        if dropped:
            log.warning(
                dropped_event,
                envelopes=len(dropped),
                reports=len({report_id for report_id, _ in dropped}),
                first_report=dropped[0][0],
                partners=",".join(sorted({partner for _, partner in dropped})),
                reason="the current policy releases nothing of them to these partners",
            )

    async def _reissue_batch(self, failed: set[str]) -> bool:
        # One batch of queued envelopes signed again under the current policy and
        # keys; True if there may be more. Reports that cannot be planned now (no
        # valid key) stay queued for the next pass, and are skipped in this one.
        rows = await self.run_db(self.store.reissues, PLAN_BATCH + len(failed))
        rows = [row for row in rows if row[0] not in failed]
        if not rows:
            return False
        plans, errors, waiting = await self._plans.plan(
            [(rid, record) for rid, record, _ in rows], len(rows)
        )
        failed.update(errors)
        # A partner whose key lapsed since has no new envelope: it is left out here
        # (``reissued`` would take it for one the policy no longer releases to), so
        # its row stays as it was and queued, for the next pass.
        lapsed = {rid: set(partners) for rid, partners in waiting.items()}
        failed.update(lapsed)
        wanted = {
            rid: [p for p in partners if p not in lapsed.get(rid, ())]
            for rid, _, partners in rows
            if rid not in errors
        }
        withheld = await self.run_db(self.store.reissued, plans, wanted)
        lapsed_reasons = {why for partners in waiting.values() for why in partners.values()}
        for reason in sorted(set(errors.values()) | lapsed_reasons):
            self._error(f"cannot sign again: {reason}", same_as=f"reissue: {reason}")
        signed = sum(len(partners) for partners in wanted.values()) - len(withheld)
        self._replanned("envelopes_signed_again", signed, "not_signed_again", withheld)
        return True

    def _record_sent(self, batch: list[OutboxItem]) -> None:
        now = datetime.now(UTC)
        # The send is recorded durably before the outbox calls it done. A batch the
        # store could not mark (a full disk) is tried again each second: its sends,
        # logged the first time, are not logged again (``_sent_logged``).
        fresh = [item for item in batch if item.rowid not in self._sent_logged]
        self.audit.append_many([sent_event(self.member, item, now) for item in fresh])
        try:
            self.store.mark_sent(batch)
        except MsmtError:
            self._sent_logged.update(item.rowid for item in fresh)
            raise
        self._sent_logged.difference_update(item.rowid for item in batch)

    # --- NATS ------------------------------------------------------------------

    async def _connect(self) -> Client | None:
        # A hub refusing the handshake (no or wrong client certificate) also resets
        # the connection, so each retry fails twice (reset or broken pipe, and the TLS
        # alert, in either order): reporting both in turn would defeat _error's
        # once-a-minute logging and hide the reason, so until a connect succeeds
        # the connection errors after a TLS failure are left unsaid.
        tls_failed = False

        async def disconnected() -> None:
            self.metrics.connected.set(0)
            # At a stop the node closes the connection itself and does not reconnect:
            # a warning there would say otherwise at every restart.
            if not self.stop.is_set():
                log.warning("nats_disconnected")

        async def reconnected() -> None:
            nonlocal tls_failed
            tls_failed = False
            self.metrics.connected.set(1)
            log.info("nats_reconnected")

        async def error(exc: Exception) -> None:
            nonlocal tls_failed
            if isinstance(exc, ssl.SSLError):
                tls_failed = True
            elif tls_failed and isinstance(exc, ConnectionError):
                return
            # A refused handshake is its own condition: its reason must reach the log.
            trouble = None if isinstance(exc, ssl.SSLError) else _HUB_TROUBLE
            self._error(f"nats: {type(exc).__name__} {exc}".strip(), same_as=trouble)

        delay = 0.2
        while not self.stop.is_set():
            nc = TlsOnlyClient()
            try:
                await self._until_stopped(
                    nc,
                    nc.connect(
                        servers=list(self.config.nats.urls),
                        nkeys_seed_str=self.seed.decode(),
                        inbox_prefix=inbox_prefix(self.member),
                        name=f"msmt-node-{self.member}",
                        tls=self.tls,
                        connect_timeout=2,
                        allow_reconnect=True,
                        max_reconnect_attempts=-1,
                        # Typed int, but nats-py only sleeps on it: half a second is meant.
                        reconnect_time_wait=0.5,  # type: ignore[arg-type]
                        disconnected_cb=disconnected,
                        reconnected_cb=reconnected,
                        error_cb=error,
                    ),
                )
            except (nats.errors.Error, OSError) as exc:
                text = f"cannot connect to NATS: {type(exc).__name__} {exc}".strip()
                self._error(text, same_as=_HUB_TROUBLE)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), delay)
                delay = min(delay * 2, 5.0)
                continue
            if not nc.is_connected:
                return None  # stopped while connecting
            tls_failed = False
            self.metrics.connected.set(1)
            log.info("nats_connected", servers=len(self.config.nats.urls))
            return nc
        return None

    async def _until_stopped(self, nc: Client, connecting: Awaitable[None]) -> None:
        # With reconnects unlimited, nats-py retries a hub it has never reached
        # inside connect() and never returns: a SIGTERM during an outage would
        # wait for the hub. A stop abandons the attempt and closes the client.
        attempt = asyncio.ensure_future(connecting)
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if attempt.done():
            attempt.result()
            return
        # Cancelled again until it ends: a cancellation can be swallowed inside
        # nats-py's connect (Python 3.11's wait_for loses one that lands as its inner
        # call finishes), and the connect then retries the unreachable hub for ever:
        # a stop hung there in 1 of ~10 runs under load.
        while not attempt.done():
            attempt.cancel()
            await asyncio.wait({attempt}, timeout=0.5)
        if not attempt.cancelled():
            with contextlib.suppress(nats.errors.Error, OSError):
                attempt.result()
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await nc.close()

    async def _messaging(self) -> None:
        nc = await self._connect()
        if nc is None:
            return
        self.nc = nc
        self._tick.set()
        js = nc.jetstream()
        self.publisher = Publisher(
            self.member,
            nc,
            self.store,
            self.run_db,
            self._record_sent,
            self.metrics,
            self.config.limits.publish_max_in_flight,
            lambda: nc.is_connected,
            lambda: not self._clock_off and not self._resign_due,
        )
        self.receiver = Receiver(
            self.member,
            nc,
            js,
            self.inbound,
            self.run_db,
            self.metrics,
            self.config.limits.fetch_batch,
            self.config.limits.hold_seconds,
        )
        await self.auditnet.subscribe(nc)
        await asyncio.gather(
            self.publisher.run(self.stop),
            self._receive_forever(self.receiver),
            self.auditnet.run(nc, self.stop),
        )

    async def _receive_forever(self, receiver: Receiver) -> None:
        # Not before our clock was compared with the hub's (the first housekeeping
        # tick once connected): a wrong clock would refuse what the first fetch takes.
        # A hub that does not answer in time leaves it to the next comparison.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._clock_checked.wait(), 2 * LAG_EVERY_S)
        # Binding fails while the hub is away or the inbox is not set up yet; keep trying.
        while not self.stop.is_set():
            if self._pause_reason()[0]:
                await self._pause_inbox()
                continue
            self._inbox_halt.clear()
            try:
                await receiver.run(self._inbox_halt)
            except nats.js.errors.NotFoundError as exc:
                # The hub answers but holds no inbox for us (setup never run, or the
                # hub lost its JetStream store): only the operator can mend that, so
                # it is a condition of its own, not one more line of hub trouble
                # (whose once-a-minute slot the disconnect before it had taken).
                self._error(
                    f"inbox: {type(exc).__name__} {exc}: the hub has no stream"
                    f" {inbox_stream(self.member)} or consumer {inbox_durable(self.member)};"
                    f" run msmt nats setup --account {self.member} (docs/DEPLOY.md)",
                    same_as="inbox missing",
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 1.0)
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                self._error(f"inbox: {type(exc).__name__} {exc}".strip(), same_as=_HUB_TROUBLE)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 1.0)

    def _twin_seen(self) -> None:
        # A twin (another process with our credentials and log key) shares our
        # inbox consumer: each report it takes lands in its store, not ours (a
        # trial: 10 of 40 in the twin's). Stop taking any at once; the hub keeps them for
        # whichever node is left. Our checkpoint goes out again now, so the twin
        # sees it and pauses too, rather than consume alone until our next one.
        if self._paused_for == "twin":
            return
        self._halt_inbox()
        self._published_at = -math.inf

    def _pause_reason(self) -> tuple[str, str]:
        # Why the inbox must take nothing now (a cause, and the text the status
        # shows), else ("", ""): a twin first, the alarm.
        if self.auditnet.twin_active():
            return "twin", (
                f"another process with {self.member}'s credentials takes reports from this"
                " inbox (the twin alarm); stop it, and this node resumes"
                f" {self.auditnet.alarm_clear:.0f} s after its last checkpoint"
            )
        return ("clock", self._clock_off) if self._clock_off else ("", "")

    def _halt_inbox(self) -> None:
        # Stop taking reports at once, and say why in the status from now on.
        cause, reason = self._pause_reason()
        if not cause or cause == self._paused_for:
            return
        since = self._inbox_paused.partition(": ")[0] or f"since {_utc_now_text()}"
        self._inbox_paused, self._paused_for = f"{since}: {reason}", cause
        self._inbox_halt.set()
        if self.receiver is not None:
            self.receiver.wake()

    async def _pause_inbox(self) -> None:
        # While a twin's checkpoints come (until none for auditnet.alarm_clear), both
        # twins pause (neither knows which one the operator meant), so the member's
        # reports wait at the hub rather than split between two stores, and the
        # one left resumes by itself once the other is stopped. While our clock is
        # too far off the hub's, partners' reports wait at the hub too, rather than
        # be refused for good by a freshness check that used the wrong time; we
        # resume once the clock check finds it right. Intake, sending and the audit
        # traffic go on.
        self._halt_inbox()  # set already, unless the cause came between two runs
        logged = -math.inf
        while not self.stop.is_set():
            cause, reason = self._pause_reason()
            if not cause:
                break
            said = self._paused_for
            self._halt_inbox()
            # The text follows the clock's offset; a line when the cause changes.
            self._inbox_paused = f"{self._inbox_paused.partition(': ')[0]}: {reason}"
            if cause != said or time.monotonic() - logged >= PAUSED_LOG_EVERY_S:
                log.error("inbox_paused", reason=self._inbox_paused)
                logged = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), HOUSEKEEPING_S)
        paused, self._inbox_paused, self._paused_for = self._inbox_paused, "", ""
        if not self.stop.is_set():
            log.warning(
                "inbox_resumed", paused_since=paused.partition(": ")[0].removeprefix("since ")
            )

    # --- housekeeping ------------------------------------------------------------

    def _error(self, text: str, same_as: str | None = None) -> None:
        # A condition that persists (hub away, inbox missing) is logged once per
        # minute, not on every retry; the status always shows the latest. Each
        # condition its own minute: two that alternate (a full disk failing planning
        # and housekeeping in turn) were logged twice a second.
        # ``same_as`` names the condition when the text varies with it (a count, an id).
        condition = text if same_as is None else same_as
        unlogged = self._error_log.check("node_error", condition)
        if unlogged is not None:
            log.error(
                "node_error", error=text, **({"unlogged_before": unlogged} if unlogged else {})
            )
        self._last_error = text
        self._last_error_at = _utc_now_text()

    def ready(self) -> str | None:
        """Why the node is not ready, or ``None`` when it is."""
        if self.nc is None or not self.nc.is_connected:
            return "not connected to NATS"
        if self._paused_for:
            return _PAUSED[self._paused_for]
        if self._silent >= 2:
            return "the hub server does not answer JetStream requests (msmt status)"
        if self.receiver is None or not self.receiver.bound:
            return "inbox consumer not bound"
        what = next((what for what, altered in self._altered.items() if altered), None)
        if what is not None:
            return f"inbox {what} altered on the hub: {self._altered[what]} (msmt status)"
        return self._unwritable()

    def _unwritable(self) -> str | None:
        # A write the store or the audit log refused (a full disk) within the last
        # WRITE_FAILED_S and none committed since: a monitoring trial's node on a full
        # disk stayed ready while it stored and cosigned nothing. An idle node's store
        # writes its status every STATUS_EVERY_S, which clears it once there is room.
        now = time.monotonic()
        for failed in (self.store.write_failed, self.audit.write_failed):
            if failed is not None and now - failed[0] < WRITE_FAILED_S:
                return f"cannot write: {failed[1]} (msmt status)"
        return None

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
                if time.monotonic() - last_prune > 60:
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
        for name in ("publisher", "receiver", "auditnet"):
            part = getattr(self, name)
            if part is not None and part.last_error:
                self._last_error, part.last_error = part.last_error, None
                self._last_error_at = _utc_now_text()
        if self.auditnet is not None and self.auditnet.alarm:
            # Recorded once and kept across restarts (msmt status): a red-team
            # member overwrote a fork alarm in last_error within 9 s.
            self._alarm_facts = {
                "last_audit_alarm": self.auditnet.alarm,
                "last_audit_alarm_at": _utc_now_text(),
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
            "inbox_paused": "",  # a stopped node takes nothing: "connected no" says so
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
            "updated_at": _utc_now_text(),
            "witnessed": self._witnessed(),
            **self._alarm_facts,
        }
        try:
            await self.run_db(self.store.record_status, counts, facts)
        except MsmtError as exc:
            self._error(f"housekeeping: {exc}")

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

    async def _housekeep_once(self) -> None:
        lag = await self._inbox_lag()
        counts = self._take_counts()
        # Metrics first: they live in memory, so they count what happens while the
        # store cannot (a full disk, when "unavailable" refusals are what to alert on).
        self._count_intake(counts)
        self._activity.update(counts)
        self._unrecorded.update(counts)
        status = {
            "connected": "yes" if self.nc is not None and self.nc.is_connected else "no",
            "inbox_lag": "unknown" if lag is None else str(lag),
            "clock_offset": self._clock_offset,
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
            facts = {**status, "updated_at": _utc_now_text(), "witnessed": self._witnessed()}
        if self._alarm_facts:
            facts = {**(facts or {"updated_at": _utc_now_text()}), **self._alarm_facts}
        if self._unrecorded:  # counts from this round, or left from one the store refused
            facts = {
                **(facts or {"updated_at": _utc_now_text()}),
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
            self._handed = None
            self._plan_wake.set()
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
        for partner in MEMBERS:
            if partner != self.member:
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

    async def _inbox_lag(self) -> int | None:
        # A request to the hub every LAG_EVERY_S, not every housekeeping tick:
        # the gauge and ``msmt status`` are at most that stale.
        if self.nc is None or not self.nc.is_connected:
            self._lag_at = -LAG_EVERY_S
            return None
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S and not self._clock_stepped(now):
            return self._lag
        self._lag_at = now
        # The JetStream API itself, not nats-py's ConsumerInfo: its "ts", the hub's
        # clock, is what the node checks its own against (``_check_clock``).
        subject = f"$JS.API.CONSUMER.INFO.{inbox_stream(self.member)}.{inbox_durable(self.member)}"
        asked = wall_clock()
        reply: Msg | None = None
        try:
            reply = await self.nc.request(subject, b"", timeout=1.0)
            info = _hub_json(reply.data)
            self._lag = int(info["num_pending"]) + int(info["num_ack_pending"])
            self._check_consumer(info)
        except (nats.errors.Error, TimeoutError, ValueError, KeyError, TypeError) as exc:
            # No answer, or {"error": ...} for an inbox the hub lost: unknown.
            self._lag = None
            await self._heard(_silence(reply, exc))
            return None
        finally:
            self._clock_checked.set()  # as far as the hub lets us: see _receive_forever
        await self._heard(None)
        answered = wall_clock()
        self._clock_base = answered - time.monotonic()
        self._check_clock(info.get("ts"), asked, answered)
        if now - self._stream_at >= STREAM_EVERY_S:
            self._stream_at = now
            await self._check_stream()
        return self._lag

    async def _heard(self, silence: str | None) -> None:
        # ``silence``: why the hub gave no usable answer (``_silence``), None for
        # an answer. After SILENT_SWITCH in a row, another server: nats-py tries
        # the next in its list, and comes back here if none other is up.
        if silence is None:
            self._silent = 0
            return
        self._silent += 1
        if self._silent < SILENT_SWITCH or self.nc is None:
            return
        self._silent = 0
        url = self.nc.connected_url
        server = f"{url.hostname}:{url.port}" if url is not None else "its server"
        # With one server a new connection to it still helps: a middlebox that
        # dropped the old one's state shows as silence too.
        then = "trying another server" if len(self.config.nats.urls) > 1 else "reconnecting"
        self._error(
            f"hub: {server} has not answered JetStream requests for"
            f" {SILENT_SWITCH * LAG_EVERY_S:.0f} s ({silence}); {then}",
            same_as="hub-switch",
        )
        await self.nc.force_reconnect()

    def _clock_stepped(self, monotonic: float) -> bool:
        # Checked every housekeeping tick (1 s), so a step pauses the inbox and the
        # outbox within about a second, not at the next comparison up to 5 s later.
        if self._clock_base is None:
            return False
        return abs(wall_clock() - monotonic - self._clock_base) > CLOCK_STEP_S

    def _check_consumer(self, info: dict[str, Any]) -> None:
        # Whoever runs the hub can change or pause our consumer: a filter that left
        # out our subjects made the inbox drop every report at once (interest
        # retention), and a pause held them, while the node stayed ready with no
        # error (a hostile-hub review). Say so, and stop reading as ready.
        altered = consumer_alterations(info)
        self._altered["consumer"] = altered
        if altered:
            self._error(
                f"hub: the inbox consumer {inbox_durable(self.member)} is not as msmt nats setup"
                f" made it: {altered}; reports to this node may be held or dropped there: run"
                f" msmt nats setup --account {self.member}, and ask who changed it"
                " (docs/DEPLOY.md)",
                same_as="consumer",
            )

    async def _check_stream(self) -> None:
        # The inbox stream can be edited with the member's own credentials as well
        # as the hub's: discard old, a short max_age or a message limit drops unread
        # reports there, and a narrowed subject or size refuses partners' reports
        # (their outboxes grow), all while this node reads an empty inbox as quiet.
        if self.nc is None:
            return
        subject = f"$JS.API.STREAM.INFO.{inbox_stream(self.member)}"
        try:
            reply = await self.nc.request(subject, b"", timeout=1.0)
            info = _hub_json(reply.data)
        except (nats.errors.Error, TimeoutError, ValueError):
            return  # the consumer's request says what an unanswering hub is
        if not isinstance(info, dict) or "config" not in info:
            return  # {"error": ...}: a missing stream shows as an unbound consumer
        altered = stream_alterations(info, self.member)
        self._altered["stream"] = altered
        if altered:
            self._error(
                f"hub: the inbox stream {inbox_stream(self.member)} is not as msmt nats setup"
                f" made it: {altered}; reports to this node may be refused or dropped there:"
                f" run msmt nats setup --account {self.member}, and ask who changed it"
                " (docs/DEPLOY.md)",
                same_as="stream",
            )

    def _check_clock(self, hub_time: object, asked: float, answered: float) -> None:
        # Partners refuse reports issued more than MAX_SKEW in their future, and
        # nothing tells the sender: say it here, well before that (docs/NODE.md).
        hub = _parse_hub_time(hub_time)
        if hub is None:
            return
        offset = (asked + answered) / 2 - hub
        self.metrics.clock_offset.set(round(offset, 3))
        # Whole seconds: the status is rewritten when a fact changes, not at each jitter.
        self._clock_offset = f"{round(offset):+d}"
        way = "ahead of" if offset > 0 else "behind"
        self._clock_off = (
            f"this node's clock is {abs(offset):.0f} s {way} the hub's, too far off to judge"
            " the freshness of partners' reports or to sign ours: theirs wait at the hub,"
            " ours in the outbox, until it is synchronised (NTP; if it is right, the hub's"
            " clock is not, or the hub's answers are altered)"
            if abs(offset) > CLOCK_PAUSE_S
            else ""
        )
        if self._clock_off:
            self._halt_inbox()
            self._resign_due = True
        elif self._resign_due:
            self._reissue_wake.set()
        if abs(offset) > CLOCK_WARN_S:
            self._error(
                f"clock: this node's clock is {abs(offset):.0f} s {way} the hub's; partners"
                " hold reports issued more than 5 minutes in their future and refuse those"
                " older than their freshness window: synchronise it (NTP; if it is right,"
                " the hub's clock is not)",
                same_as="clock",
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

    # --- the whole daemon --------------------------------------------------------

    async def run(self, signals: StopSignals | None = None) -> None:
        """Run until SIGTERM/SIGINT/SIGHUP (or ``self.stop`` is set), then shut down in order.

        With ``signals`` (``msmt node run``'s, entered at its first line), a
        signal that came while the node loaded stops it as soon as it has
        started, and one after it has stopped is recorded, not the default action.
        """
        loop = asyncio.get_running_loop()
        if signals is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop.set)
        else:
            signals.take(loop, self.stop.set)
        self._signals = signals
        try:
            await self._run()
        finally:
            if signals is not None:
                signals.release(loop)

    async def _run(self) -> None:
        config = self.config
        token = _shared_token(config)
        # Read once here, before the planning worker starts, so an unfit feeds file
        # stops the start with one line; then each request reads it again if it changed.
        feeds = FeedTokens(config.feeds_path)
        feeds.current()
        # Before any input: a node that could not plan must not accept reports.
        try:
            await self._plans.start()
        except PlanWorkerError as exc:
            await self._plans.shutdown()
            raise NodeFailedError(str(exc)) from None
        socket_intake = Intake(
            self.member,
            config.limits.max_record_bytes,
            self._accept,
            feed="socket",
            record_rejects=self._record_rejects,
        )
        spool_intake = Intake(
            self.member,
            config.limits.max_record_bytes,
            self._accept,
            feed="spool",
            record_rejects=self._record_rejects,
        )
        self._intakes = [socket_intake, spool_intake]
        spool, metrics_runner, intake_runner = await self._open_inputs(
            make_app(socket_intake, token, feeds, shared=config.intake.shared_token), spool_intake
        )
        spool_stop = asyncio.Event()
        tasks = [
            asyncio.create_task(spool.run(spool_stop), name="spool"),
            asyncio.create_task(self._plan_loop(), name="planner"),
            asyncio.create_task(self._reissue_loop(), name="reissue"),
            asyncio.create_task(self._messaging(), name="messaging"),
        ]
        housekeeping = asyncio.create_task(self._housekeeping(), name="housekeeping")
        for task in (*tasks, housekeeping):
            task.add_done_callback(self._task_done)
        # Which policy is in force: the file may be edited while the node runs, and
        # only a restart applies it (msmt status compares the two).
        log.info(
            "node_started",
            member=self.member,
            version=version(),
            socket=str(config.socket_path),
            shared_token=config.intake.shared_token,
            policy_digest=self.planner.policy.digest,
        )
        _warn_keyless_partners(self.planner.policy, self.planner.roster, datetime.now(UTC))
        try:
            await self.stop.wait()
        finally:
            # Which signal asked (a SIGHUP sent for a reload shows as one); none after
            # a failed part, which logged its own error.
            name = self._signals.name if self._signals is not None else None
            log.info("node_stopping", member=self.member, **({"signal": name} if name else {}))
            # 1. no new input
            await intake_runner.cleanup()
            spool_stop.set()
            self.stop.set()
            self._wake_for_stop()
            # 2. planner, publisher (waits for in-flight acks) and receiver finish
            await asyncio.gather(*tasks, housekeeping, return_exceptions=True)
            spool.close()
            # 3. acks reach the server before the connection goes
            if self.nc is not None:
                # The hub may be gone (a reset connection): nothing is left to lose here,
                # and a flush could only time out. Unsent acks mean redeliveries,
                # which the replay check drops.
                if self.nc.is_connected:
                    with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                        await self.nc.flush(timeout=2)
                with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                    await self.nc.close()
            await metrics_runner.cleanup()
            await self._final_status()
            await self.run_db(self._close)
            self._db.shutdown(wait=True)
            # The planner loop has ended, so the worker is idle and exits at once.
            await self._plans.shutdown()
            log.info("node_stopped", member=self.member)
        if self.failure is not None:
            raise NodeFailedError(self.failure)

    async def _open_inputs(
        self, intake_app: web.Application, spool_intake: Intake
    ) -> tuple[Spool, web.AppRunner, web.AppRunner]:
        # The spool first: a bad spool_dir must not leave a socket behind.
        opened: list[web.AppRunner] = []
        try:
            spool = _spool(self.config.spool_path, spool_intake)
            opened.append(await self._serve_metrics())
            opened.append(await serve_unix(intake_app, self.config.socket_path))
        except BaseException:
            # A refused start closes what it opened, so the process exits with one line.
            for runner in reversed(opened):
                await runner.cleanup()
            await self._plans.shutdown()
            await self.run_db(self._close)
            self._db.shutdown(wait=True)
            raise
        return spool, opened[0], opened[1]

    async def _serve_metrics(self) -> web.AppRunner:
        listen = self.config.metrics
        try:
            return await serve_tcp(
                make_metrics_app(self.metrics, self.ready), listen.host, listen.port
            )
        except OSError as exc:
            # aiohttp rewords the OSError; the errno says it plainly.
            reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
            raise ConfigError(
                f"config key metrics.listen: cannot listen on {listen.host}:{listen.port}: {reason}"
            ) from None

    def _wake_for_stop(self) -> None:
        # The planner, publisher and receiver sleep until woken, not on a timer.
        self._plan_wake.set()
        self._reissue_wake.set()
        self._clock_checked.set()  # its waiters look at stop next
        self._tick.set()
        if self.publisher is not None:
            self.publisher.wake()
        self._inbox_halt.set()
        if self.receiver is not None:
            self.receiver.wake()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # A part that dies must take the node down (for systemd to restart it):
        # a node that accepts reports but no longer sends them is worse than none.
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.failure = failure_text(task.get_name(), exc)
        log.error("node_task_failed", task=task.get_name(), error=type(exc).__name__)
        self.stop.set()

    def _close(self) -> None:
        self.store.close()
        self.audit.close()


def failure_text(part: str, exc: BaseException) -> str:
    """The one line a node stops with when ``part`` failed with ``exc``."""
    # MemoryError and some others carry no text: the type alone, not "MemoryError: ".
    said = f": {exc}" if str(exc) else ""
    return f"{part} failed: {type(exc).__name__}{said}"


def _feeds_used(counts: Counter[str]) -> dict[str, str]:
    """``feed_last_used.<feed>``: now, for each feed that sent records since the last tick."""
    now = _utc_now_text()
    used = {
        name.removeprefix(FEED_COUNTER).rpartition(".")[0]
        for name in counts
        if name.startswith(FEED_COUNTER) and not name.endswith(".revoked")
    }
    return {f"{FEED_USED}{feed}": now for feed in sorted(used)}


def _spool(directory: Path, intake: Intake) -> Spool:
    try:
        return Spool(directory, intake)
    except OSError as exc:
        raise ConfigError(
            f"config key intake.spool_dir: cannot use {directory}: {exc.strerror}"
        ) from None


def _shared_token(config: NodeConfig) -> str | None:
    """The shared intake token, made on the first start; where it is off, the one left, if any.

    Off, none is made: a token left from before is read only so that a feed not
    moved to its own yet is told why it is refused. Unfit to read, it is left
    alone, and said so at the start.
    """
    if config.intake.shared_token:
        return ensure_token(config.token_path)
    if not config.token_path.exists():
        return None
    try:
        return read_token(config.token_path)
    except UsageError as exc:
        log.warning("intake_token_ignored", reason=str(exc))
        return None


def _warn_keyless_partners(policy: Policy, roster: Roster, at: datetime) -> None:
    # A partner the policy releases to but the roster has no valid encryption key
    # for gets nothing until it has one (its envelopes wait): say so at start,
    # rather than only at the first report (a roster made for fewer members, say).
    named = {p for rule in policy.rules if rule.effect == "release" for p in rule.members}
    keyless = []
    for partner in sorted(named, key=MEMBERS.index):
        try:
            roster.current(partner, "enc", at)
        except KeyMaterialError:
            keyless.append(partner)
    if keyless:
        log.warning(
            "partners_without_keys",
            partners=",".join(keyless),
            reason="the policy releases to them but the roster has no valid encryption key: "
            "their envelopes wait until it has",
        )


def reissue_interval(freshness_seconds: int) -> float:
    """Seconds between looks for stale pending envelopes, for a freshness window.

    Stale at half the window and looked for every quarter of it (at most every
    ``REISSUE_EVERY_S``), an envelope goes out at most three quarters of the
    window old, however short the window: 45 s of a 60 s one.
    """
    return min(REISSUE_EVERY_S, freshness_seconds / 4)


def wall_clock() -> float:
    """Return the node's own clock, as the planner signs with it (a test can move it)."""
    return time.time()


def _hub_json(data: bytes) -> Any:
    """A JetStream API answer, parsed; ``ValueError`` if it is not JSON.

    Nested past the decoder's depth it is not JSON either: json raises
    ``RecursionError`` there, which no handler expected and which stopped the
    housekeeping task (a security review). Nor is a number beyond a float's range
    (``1e999``), or ``NaN`` or ``Infinity``: ``int()`` of one raised
    ``OverflowError``, which stopped it too (a fuzzer).
    """
    try:
        return json.loads(data, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("a JetStream answer nested too deeply") from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a JetStream answer's number is out of range")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"a JetStream answer holds {text}, which JSON has not")


def _silence(reply: Msg | None, exc: BaseException) -> str | None:
    """Why a JetStream API request got no usable answer, or None if the hub did answer.

    No reply (a timeout, no responders) or 503 ("JetStream system temporarily
    unavailable": a server without its cluster's quorum) is silence; any other
    error answer (a stream not found) comes from a JetStream that works.
    """
    if reply is None:
        return type(exc).__name__
    try:
        error = _hub_json(reply.data)["error"]
        if int(error["code"]) == 503:
            return f"503 {error.get('description', '')}".strip()
    except (ValueError, KeyError, TypeError):  # the hub's bytes, any shape
        pass
    return None


def _parse_hub_time(value: object) -> float | None:
    # RFC 3339 with up to nanoseconds ("2026-12-03T15:31:48.685577106Z"): Python
    # reads microseconds at most.
    if not isinstance(value, str):
        return None
    head, dot, tail = value.removesuffix("Z").partition(".")
    try:
        at = datetime.fromisoformat(head).replace(tzinfo=UTC)
    except ValueError:
        return None
    digits = tail[:9] if dot and tail[:9].isdecimal() else "0"
    return at.timestamp() + int(digits) / float(10 ** len(digits))


def _utc_now_text() -> str:
    # As every other time we show (roster, feeds, audit): RFC 3339 with "Z".
    return format_time(datetime.now(UTC))
