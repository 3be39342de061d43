"""The node's planning loops: accepted reports into envelopes, and envelopes signed again.

The asyncio side of planning (``broker.planner`` is the pure core, run in a worker
process by ``broker.planpool``): ``PlanLoop.run`` plans each report the intake
accepted and logged, and commits its envelopes to the outbox for the publisher;
``PlanLoop.reissue`` signs again what waited too long to be sent (partners would
refuse it as stale), what ``msmt node resend`` queued, and plans for partners a
report was planned without (no valid key then). Nothing is published while our
clock is off the hub's, nor until what a wrong clock signed is queued again
(``may_publish``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Collection, Mapping
from typing import Final

from broker import hubwatch
from broker.errors import MsmtError
from broker.hubwatch import CLOCK_WARN_S, LAG_EVERY_S, HubWatch
from broker.log import Throttle, get_logger
from broker.planpool import PlanPool, PlanWorkerError
from broker.publisher import Publisher, RunDb
from broker.store import NewReport, OutboxItem, Store

log = get_logger("node")

PLAN_BATCH: Final = 50
HANDED_MAX: Final = 4 * PLAN_BATCH
"""Most accepted reports held in memory for the planner; past it, it reads them from the store."""
PLAN_RETRY_S: Final = 30.0
PLAN_ERROR_RETRY_S: Final = 0.5
REISSUE_EVERY_S: Final = 60.0
"""Longest time between looks for envelopes to sign again (pending too long; ``msmt node
resend``); a quarter of the freshness window if that is shorter."""


class PlanLoop:
    """Plans what the intake accepted, and signs again what must be; see the module."""

    # Reports accepted and logged since the planner last looked, which it takes
    # from here rather than reading the store (a hop to its thread and back per
    # report at a trickle). The store stays the record: None (after a recovery,
    # or past HANDED_MAX) has the planner read it (see run).
    _handed: dict[str, bytes] | None

    def __init__(
        self,
        store: Store,
        run_db: RunDb,
        pool: PlanPool,
        hub: HubWatch,
        freshness_seconds: int,
        stop: asyncio.Event,
        error: Callable[[str, str | None], None],
    ) -> None:
        self._store = store
        self._run_db = run_db
        self._pool = pool
        self._hub = hub
        self._freshness_seconds = freshness_seconds
        self._stop = stop
        self._error = error
        self.publisher: Publisher | None = None
        """The node's, once connected: handed what is planned, woken by what is signed again."""
        self.keyless: Callable[[], frozenset[str]] = frozenset
        """The partners the policy releases to that have no valid encryption key now."""
        self.policy_changed = False
        """Set by a start under another policy than the last one's: the first pass plans
        every waiting report again, also for partners with no key, so that what the policy
        no longer sends them is dropped (a review: it waited for a suspended partner)."""
        self._wake, self._handed = asyncio.Event(), {}
        self.skip: dict[str, float] = {}
        """Reports that could not be planned, and when (monotonic) to try each again."""
        # Nothing is published until the reissue loop has queued what was signed by
        # a wrong clock to be signed again: at start, and once the clock is right again.
        self.resign_due = True
        self._reissue_wake = asyncio.Event()
        self._throttle = Throttle()

    def handed(self, reports: list[NewReport]) -> None:
        """Take reports just accepted and logged, to plan without reading them back."""
        if self._handed is not None:
            if len(self._handed) + len(reports) > HANDED_MAX:
                self._handed = None
            else:
                self._handed.update((r.report_id, r.record) for r in reports)
        self._wake.set()

    def reread(self) -> None:
        """Read the store for unplanned reports: some were logged that were never handed."""
        self._handed = None
        self._wake.set()

    def wake(self) -> None:
        """Wake the plan loop: reports are in the store that it was not handed."""
        self._wake.set()

    def stopping(self) -> None:
        """Wake both loops, to see that the node stops; bound the worker's batch."""
        self._wake.set()
        self._reissue_wake.set()
        self._pool.stopping()

    def clock_went_off(self) -> None:
        """Our clock is too far off the hub's: what it signs must be signed again."""
        self.resign_due = True

    def clock_right(self) -> None:
        """Our clock agrees with the hub's: sign again what a wrong one signed, if any."""
        if self.resign_due:
            self._reissue_wake.set()

    def may_publish(self) -> bool:
        """Whether the publisher may send: our clock is right, and what it got wrong re-queued."""
        return not self._hub.clock_off and not self.resign_due

    async def run(self) -> None:
        """Plan accepted reports as they come, until the node stops."""
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
            while not self._stop.is_set():
                # Cleared before looking, so a report accepted meanwhile wakes the next wait.
                self._wake.clear()
                now = time.monotonic()
                due = [rid for rid, until in self.skip.items() if until <= now]
                for rid in due:
                    del self.skip[rid]
                skip = self.skip.keys() | in_commit | planned.keys()
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
                        plans, errors, waiting = await self._pool.plan(rows, PLAN_BATCH)
                        # The worker plans at most PLAN_BATCH: the rest are read again.
                        look |= len(plans) + len(errors) < len(rows)
                except PlanWorkerError:
                    raise  # fatal: the node stops (and systemd restarts it)
                except MsmtError as exc:
                    self._error(f"planning: {exc}", None)
                    failed = True
                held: dict[str, list[str]] = {}
                for report_id, reason in errors.items():
                    self.skip[report_id] = now + PLAN_RETRY_S
                    held.setdefault(reason, []).append(report_id)
                for reason, ids in held.items():
                    # One line per cause, not per report: an expired signing key
                    # holds back every report, and the log must not scroll with them.
                    which = f"{len(ids)} reports ({ids[0]}, ...)" if ids[1:] else f"report {ids[0]}"
                    self._error(f"cannot plan {which}: {reason}", f"plan: {reason}")
                self._report_waiting(waiting)
                planned = plans
                look |= failed
                if not plans and not errors and committing is None:
                    # Event-driven: an accept wakes us; a timer runs only for a
                    # retry (a store error, a report skipped for now).
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._plan_timeout(failed))
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
                rows = await self._run_db(
                    functools.partial(self._store.unplanned, audited_only=True), limit
                )
            except MsmtError as exc:
                self._error(f"planning: {exc}", None)
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
        if not self.skip:
            return None
        return max(0.01, min(self.skip.values()) - time.monotonic())

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
            stored = await self._run_db(self._store.plan, plans, waiting)
        except MsmtError as exc:
            self._error(f"planning: {exc}", None)
            return False
        if self.publisher is not None:
            self.publisher.hand(stored)  # rather than have it read them back
        return True

    async def reissue(self) -> None:
        """Sign again what waited too long or was queued to be, until the node stops."""
        # A partner refuses an envelope signed longer ago than its freshness
        # window. One pending for half of ours (the hub unreachable) is signed
        # again before it goes out; ``msmt node resend`` queues sent ones that a
        # partner refused. Off the hot path: both are rare.
        window = self._freshness_seconds
        stale_after, every = window / 2, reissue_interval(window)
        # Judged by a clock compared with the hub's (``HubWatch``).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hub.clock_checked.wait(), 2 * LAG_EVERY_S)
        while not self._stop.is_set():
            self._reissue_wake.clear()
            # Not while our clock is off the hub's: it would misjudge what is stale,
            # and sign with the wrong time again.
            if not self._hub.clock_off:
                try:
                    await self._reissue_pass(stale_after)
                except MsmtError as exc:
                    if isinstance(exc, PlanWorkerError):
                        raise  # fatal, as in the plan loop
                    self._error(f"signing again: {exc}", None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reissue_wake.wait(), every)

    async def _reissue_pass(self, stale_after: float) -> None:
        # What was signed too long ago, or in the future (by a clock that ran ahead
        # and is right now), is signed again before the publisher may send it.
        now = hubwatch.wall_clock()
        await self._run_db(self._store.queue_stale, now - stale_after, now + CLOCK_WARN_S)
        failed: set[str] = set()
        while not self._stop.is_set() and await self._reissue_batch(failed):
            pass
        if self.resign_due and not self._hub.clock_off:
            self.resign_due = False
            if self.publisher is not None:
                self.publisher.wake()
        tried: set[str] = set()
        # Not for partners that still have no key, whose reports would be signed and
        # encrypted for every partner only to wait on: a suspended member's backlog
        # cost a review's node and worker 16 s of CPU a minute for 10,000 reports.
        keyless = frozenset() if self.policy_changed else self.keyless()
        while not self._stop.is_set() and await self._awaited_batch(tried, keyless):
            pass
        if not self._stop.is_set():
            self.policy_changed = False

    async def _awaited_batch(self, tried: set[str], keyless: frozenset[str]) -> bool:
        # Partners a report was planned without (no valid encryption key then):
        # planned again now, once per pass, but for those in ``keyless``; True if
        # there may be more. The report is signed anew for them (under the current
        # policy and keys).
        rows = await self._run_db(self._store.awaiting, PLAN_BATCH + len(tried), keyless)
        rows = [row for row in rows if row[0] not in tried]
        if not rows:
            return False
        tried.update(rid for rid, _, _ in rows)
        plans, errors, waiting = await self._pool.plan(
            [(rid, record) for rid, record, _ in rows], len(rows)
        )
        for reason in sorted(set(errors.values())):
            self._error(f"cannot plan for a partner: {reason}", f"plan: {reason}")
        wanted = {rid: partners for rid, _, partners in rows if rid not in errors}
        queued, dropped = await self._run_db(self._store.awaited, plans, waiting, wanted)
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
        rows = await self._run_db(self._store.reissues, PLAN_BATCH + len(failed))
        rows = [row for row in rows if row[0] not in failed]
        if not rows:
            return False
        plans, errors, waiting = await self._pool.plan(
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
        withheld = await self._run_db(self._store.reissued, plans, wanted)
        for reason in sorted(set(errors.values())):
            self._error(f"cannot sign again: {reason}", f"reissue: {reason}")
        # A partner without a key is not this node's error, here as at planning (an
        # onboarding trial: after a resend, last_error said "cannot sign again: USA
        # has no active enc key valid now" for as long as USA had none).
        self._report_waiting(waiting)
        signed = sum(len(partners) for partners in wanted.values()) - len(withheld)
        self._replanned("envelopes_signed_again", signed, "not_signed_again", withheld)
        return True


def reissue_interval(freshness_seconds: int) -> float:
    """Seconds between looks for stale pending envelopes, for a freshness window.

    Stale at half the window and looked for every quarter of it (at most every
    ``REISSUE_EVERY_S``), an envelope goes out at most three quarters of the
    window old, however short the window: 45 s of a 60 s one.
    """
    return min(REISSUE_EVERY_S, freshness_seconds / 4)
