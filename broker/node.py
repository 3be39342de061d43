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

``Node`` is written in parts, each apart so that it stays one sitting's read:
``broker.node_base`` (``NodeBase``: the state, the last error, readiness, why the
inbox is paused), ``broker.node_messaging`` (``Messaging``: the NATS connection,
the publisher and the receiver on it) and ``broker.node_housekeeping``
(``Housekeeping``: the once-a-second round). This module keeps what joins them:
intake's writes, and ``run`` with the order of the start and the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import nats.errors
from aiohttp import web

from broker import audit_events, version
from broker.config import NodeConfig
from broker.errors import (
    ConfigError,
    MsmtError,
    UsageError,
)
from broker.feeds import FeedTokens
from broker.intake import Intake, Refusal, ensure_token, make_app, read_token, serve_unix
from broker.log import get_logger
from broker.members import MEMBERS
from broker.metrics import Metrics, listen_tcp, listener_uid, metrics_runner
from broker.metrics import make_app as make_metrics_app
from broker.node_base import utc_now_text
from broker.node_housekeeping import Housekeeping
from broker.node_messaging import Messaging
from broker.planner import keyless_partners
from broker.planpool import PlanWorkerError
from broker.policy import Policy
from broker.roster import Roster
from broker.spool import Spool
from broker.stopsignals import StopSignals
from broker.store import NewReport

log = get_logger("node")

METRICS_RETRY_S: Final = 10.0
"""How often a node whose metrics port another process holds tries it again."""


class NodeFailedError(MsmtError):
    """A part of the running node failed; the daemon stopped so it can be restarted."""


class Node(Messaging, Housekeeping):
    """One member's running node; build it with ``broker.node_start.load_node``."""

    _signals: StopSignals | None = None
    """``msmt node run``'s, to name the signal that stopped the node."""

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

    # --- the whole daemon --------------------------------------------------------

    async def run(self, signals: StopSignals | None = None) -> None:
        """Run until a stop signal (SIGTERM, ...) or ``self.stop`` is set, then shut down in order.

        With ``signals`` (``msmt node run``'s, entered at its first line), a
        signal that came while the node loaded stops it as soon as it has
        started, and one after it has stopped is recorded, not the default action.
        """
        loop = asyncio.get_running_loop()
        if signals is None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._asked_to_stop)
        else:
            signals.take(loop, self._asked_to_stop)
        self._signals = signals
        try:
            await self._run()
        finally:
            if signals is not None:
                signals.release(loop)

    def _asked_to_stop(self) -> None:
        # The planning worker's bound starts now, not once the start is done: a worker
        # hung before its first answer held the stop for PLAN_TIMEOUT (a review).
        self.stop.set()
        self._plans.stopping()

    async def _run(self) -> None:
        config = self.config
        token, feeds = await self._start_planning()
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
            # 1. no new input: the spool first, since the socket's cleanup may wait for a
            # feed's connection (a signals trial: the spool took in batches meanwhile)
            spool_stop.set()
            await intake_runner.cleanup()
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
            if self._metrics_waiting is not None:
                self._metrics_waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._metrics_waiting
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
        except BaseException as exc:
            # A refused start closes what it opened, so the process exits with one line.
            if self._metrics_waiting is not None:
                self._metrics_waiting.cancel()
            for runner in reversed(opened):
                await runner.cleanup()
            await self._refuse_start(exc)
            raise
        return spool, opened[0], opened[1]

    async def _start_planning(self) -> tuple[str | None, FeedTokens]:
        # The intake token and the feeds file are read once here, before the planning
        # worker starts, so an unfit one stops the start with one line; then each
        # request reads the feeds file again if it changed.
        try:
            token = _shared_token(self.config)
            feeds = FeedTokens(self.config.feeds_path)
            feeds.current()
        except BaseException as exc:
            await self._refuse_start(exc)
            raise
        # Before any input: a node that could not plan must not accept reports.
        try:
            await self._plans.start()
        except BaseException as exc:
            await self._refuse_start(exc)
            if isinstance(exc, PlanWorkerError):
                raise NodeFailedError(str(exc)) from None
            raise
        return token, feeds

    async def _refuse_start(self, exc: BaseException) -> None:
        # Whatever ended the start before its inputs served (a refusal, a cancelled
        # in-process caller): the worker stopped, the store and log closed, so that a
        # caller (the demo, a test) does not inherit them open (a review); a refusal
        # said in msmt status, which otherwise showed the last run's facts and no
        # error, as if this start had not been tried (the reason is the exit's line).
        await self._plans.shutdown()
        try:
            if isinstance(exc, MsmtError | OSError):
                text = f"start refused: {exc}"[:500]
                with contextlib.suppress(MsmtError):
                    await self.run_db(
                        self.store.set_state, {"last_error": text, "last_error_at": utc_now_text()}
                    )
            await self.run_db(self._close)
        finally:
            self._db.shutdown(wait=True)

    async def _serve_metrics(self) -> web.AppRunner:
        listen = self.config.metrics
        runner = metrics_runner(make_metrics_app(self.metrics, self.ready))
        await runner.setup()
        try:
            await listen_tcp(runner, listen.host, listen.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                await runner.cleanup()
                raise ConfigError(_listen_text(listen.host, listen.port, exc)) from None
            if listener_uid(listen.port) == os.geteuid():
                # This user's own process holds it: a second node given the same
                # metrics.listen (a copied node.toml), which a review found running
                # unseen. A mistake, not a neighbour: exit 2. Told by the socket's owner,
                # which no other user can fake (a review made a node exit 2 for good by
                # answering /metrics as an msmt node would).
                await runner.cleanup()
                raise ConfigError(
                    f"{_listen_text(listen.host, listen.port, exc)}: another process of this"
                    " user listens there (a second node?); give each node its own"
                    " metrics.listen"
                ) from None
            # Any local user may hold a loopback port: the node runs without its
            # metrics and tries the port again, rather than stop (a local user held
            # it across restarts: with exit 2 the unit stayed failed, with exit 1 it
            # restarted for as long as the port was held, taking nothing meanwhile).
            self._error(
                f"{_listen_text(listen.host, listen.port, exc)}: another process holds it;"
                f" running without /metrics and /readyz, trying again every"
                f" {METRICS_RETRY_S:.0f} s",
                "metrics-listen",
            )
            self._metrics_waiting = asyncio.create_task(
                self._listen_later(runner), name="metrics-listen"
            )
        return runner

    async def _listen_later(self, runner: web.AppRunner) -> None:
        listen = self.config.metrics
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), METRICS_RETRY_S)
            if self.stop.is_set():
                return
            try:
                await listen_tcp(runner, listen.host, listen.port)
            except OSError as exc:
                held = ": another process holds it" if exc.errno == errno.EADDRINUSE else ""
                self._error(
                    f"{_listen_text(listen.host, listen.port, exc)}{held}; running without"
                    " /metrics and /readyz",
                    "metrics-listen",
                )
                continue
            except Exception as exc:  # noqa: BLE001 - the node runs on without metrics
                self._error(f"metrics: {type(exc).__name__}: {exc}"[:300], "metrics-listen")
                return
            log.info("metrics_listening", listen=f"{listen.host}:{listen.port}")
            return

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
    keyless = sorted(keyless_partners(policy, roster, at), key=MEMBERS.index)
    if keyless:
        log.warning(
            "partners_without_keys",
            partners=",".join(keyless),
            reason="the policy releases to them but the roster has no valid encryption key: "
            "their envelopes wait until it has",
        )


def _listen_text(host: str, port: int, exc: OSError) -> str:
    # aiohttp rewords the OSError; the errno says it plainly.
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return f"config key metrics.listen: cannot listen on {host}:{port}: {reason}"
