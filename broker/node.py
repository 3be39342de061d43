"""The national node daemon: intake, planning, publishing, receiving, metrics, shutdown.

``broker.node_start.load_node`` checks everything before anything runs (config,
signed roster, private keys, policy, pseudonym keys, store, audit log), so a bad
setup fails at start with one line, and builds the ``Node``. ``Node.run`` then
runs these tasks until SIGTERM/SIGINT:

* intake on the unix socket and the spool directory (``broker.intake``);
* the planner and the reissue loop (``broker.planloop``), planning in a worker
  process (``broker.planpool``) started before any input is taken, and the
  publisher (``broker.publisher``);
* the inbox receiver (``broker.receiver``), once NATS is connected;
* housekeeping: gauges, ``msmt status`` facts, counters, seen-set pruning,
  the hub's answers (``broker.hubwatch``: the inbox lag, the consumer and stream
  as set up, our clock against the hub's), and publishing the audit log's latest
  signed checkpoint.

Every store and audit-log call runs on one worker thread (SQLite connections
are single-threaded; the event loop never waits on an fsync). Shutdown order:
stop intake, stop planning and fetching, wait briefly for in-flight acks
(anything unacked stays in the outbox), flush acks, close NATS, the store and the
log, then the planning worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import nats
import nats.errors
import nats.js.errors
from aiohttp import web
from nats.aio.client import Client

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
from broker.hubwatch import LAG_EVERY_S, HubWatch
from broker.intake import Intake, Refusal, ensure_token, make_app, read_token, serve_unix
from broker.log import Throttle, get_logger
from broker.members import MEMBERS
from broker.metrics import Metrics, serve_tcp
from broker.metrics import make_app as make_metrics_app
from broker.natsclient import TlsOnlyClient
from broker.natsconfig import inbox_durable, inbox_prefix, inbox_stream
from broker.planloop import PlanLoop
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
HOUSEKEEPING_S: Final = 1.0
OUTBOX_AGE_EVERY_S: Final = 15.0
"""How often ``msmt_outbox_oldest_seconds`` is measured (a query over the waiting rows)."""
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
EXPIRY_WARNING: Final = timedelta(days=14)
"""A credential expiring sooner than this is logged at start (``credential_expires_soon``)."""


_LATE_REPLY: Final = 'permissions violation for publish to "_r_.'
"""How nats-py words the hub's refusal of a reply to an imported service's request,
lower-cased as it gives every server error: our answer to a partner's proof request."""


def nats_error_text(exc: Exception) -> str:
    """The line ``last_error`` and the log give for an error nats-py reported, said plainly.

    A reply the hub refused because its request was older than the minute the
    node's users may answer in (``allow_responses``) read as a permissions
    violation, which looks like a break-in: it is a node that was paused or
    frozen, and the partner's witness asks again.
    """
    text = f"nats: {type(exc).__name__} {exc}".strip()
    if _LATE_REPLY in str(exc):
        return (
            f"{text}: a reply to a partner's proof request came after the minute the hub"
            " keeps the way back open (was this node paused or frozen?); the partner asks again"
        )
    return text


class NodeFailedError(MsmtError):
    """A part of the running node failed; the daemon stopped so it can be restarted."""


class Node:
    """One member's running node; build it with ``broker.node_start.load_node``."""

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
        # Wakes the housekeeping loop, which asks the hub, before its second is up:
        # at connect, so the clock check (hence /readyz) comes at once; and at a stop.
        self._tick = asyncio.Event()
        self.hub = HubWatch(
            config.member,
            len(config.nats.urls),
            self.metrics,
            lambda: self.nc,
            self._error,
            self._clock_compared,
        )
        self.nc: Client | None = None
        self.publisher: Publisher | None = None
        self.receiver: Receiver | None = None
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msmt-store")
        # Envelope crypto runs in a worker process, on another core than the
        # event loop and the store thread that publish and record the acks.
        self._plans = PlanPool(planner, policy_text)
        self.plan_loop = PlanLoop(
            store,
            self.run_db,
            self._plans,
            self.hub,
            config.limits.freshness_seconds,
            self.stop,
            self._error,
        )
        self._intakes: list[Intake] = []
        self._last_error = ""
        self._last_error_at = ""  # when it last happened, so a stale error reads as one
        self._alarm_facts: dict[str, str] = {}  # an audit alarm not recorded yet
        self._error_log = Throttle()  # node_error: once a minute for each condition
        self._sent_logged: set[int] = set()  # outbox rows logged sent, not marked (store thread)
        self._published_checkpoint: str | None = None
        self._published_at = -math.inf
        self._outbox_age_at = -OUTBOX_AGE_EVERY_S
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
            self.plan_loop.wake()
        else:
            self.plan_loop.handed([r for r, is_new in zip(batch, fresh, strict=True) if is_new])
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

    # --- publishing --------------------------------------------------------------

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
            self._error(nats_error_text(exc), same_as=trouble)

        async def closed() -> None:
            # nats-py gave up on the connection for good (the client reconnects after
            # the server errors known to close it; this is any other way): a node that
            # accepts reports but can never send them again is worse than none, so it
            # stops, and systemd starts it again. At a stop the node closed it itself.
            if self.stop.is_set():
                return
            self.metrics.connected.set(0)
            reason = f": {nc.last_error}" if nc.last_error is not None else ""
            self.failure = f"messaging: the NATS client closed for good{reason}"
            log.error("nats_closed", error=self.failure)
            self.stop.set()

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
                        closed_cb=closed,
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
            self.plan_loop.may_publish,
        )
        self.plan_loop.publisher = self.publisher
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
            await asyncio.wait_for(self.hub.clock_checked.wait(), 2 * LAG_EVERY_S)
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
        return ("clock", self.hub.clock_off) if self.hub.clock_off else ("", "")

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

    def _clock_compared(self, off: bool) -> None:
        # After each comparison with the hub's clock (``HubWatch``). Too far off: take
        # no more reports, and send none of ours until what it signed is queued to be
        # signed again. Right: have that done, if it is due.
        if off:
            self._halt_inbox()
            self.plan_loop.clock_went_off()
        else:
            self.plan_loop.clock_right()

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
        if self.hub.silent >= 2:
            return "the hub server does not answer JetStream requests (msmt status)"
        if self.receiver is None or not self.receiver.bound:
            return "inbox consumer not bound"
        altered = self.hub.altered
        what = next((what for what, change in altered.items() if change), None)
        if what is not None:
            return f"inbox {what} altered on the hub: {altered[what]} (msmt status)"
        return self._unwritable()

    def _unwritable(self) -> str | None:
        # A write the store or the audit log refused (a full disk) within the last
        # WRITE_FAILED_S, and the same kind of write not committed since: a monitoring
        # trial's node on a full disk stayed ready while it stored and cosigned nothing.
        # Each kind of write that failed stands until that kind commits (a status write:
        # every STATUS_EVERY_S on an idle node; a receiver's batch: once one is stored),
        # or for the window.
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
        lag = await self.hub.inbox_lag()
        counts = self._take_counts()
        # Metrics first: they live in memory, so they count what happens while the
        # store cannot (a full disk, when "unavailable" refusals are what to alert on).
        self._count_intake(counts)
        self._activity.update(counts)
        self._unrecorded.update(counts)
        status = {
            "connected": "yes" if self.nc is not None and self.nc.is_connected else "no",
            "inbox_lag": "unknown" if lag is None else str(lag),
            "clock_offset": self.hub.clock_offset,
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
            asyncio.create_task(self.plan_loop.run(), name="planner"),
            asyncio.create_task(self.plan_loop.reissue(), name="reissue"),
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
            spool = _spool(self.config.spool_path, spool_intake, self.metrics)
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
        self.plan_loop.stopping()
        self.hub.clock_checked.set()  # its waiters look at stop next
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
    """The one line a node stops with when ``part`` failed with ``exc``.

    Only the project's own errors and the system's (a path, an errno) are quoted:
    another exception is a bug, and its text could quote what it was given, a
    report's field (a validation error does), which must not reach a log (the
    planning worker reports its errors by type for the same reason).
    """
    # MemoryError and some others carry no text: the type alone, not "MemoryError: ".
    said = f": {exc}" if str(exc) and isinstance(exc, (MsmtError, OSError)) else ""
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


def _spool(directory: Path, intake: Intake, metrics: Metrics) -> Spool:
    try:
        return Spool(directory, intake, lambda stalled: metrics.spool_stalled.set(int(stalled)))
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


def _utc_now_text() -> str:
    # As every other time we show (roster, feeds, audit): RFC 3339 with "Z".
    return format_time(datetime.now(UTC))
