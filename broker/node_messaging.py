"""The node's messaging: its NATS connection, the publisher and receiver on it, a paused inbox.

``Messaging`` connects to the hub (and keeps trying while it is away), then runs
the publisher (``broker.publisher``), the receiver (``broker.receiver``) and the
audit traffic (``broker.auditnet``) on that connection, and records each send in
the audit log before the outbox calls it done. The receiver takes nothing while
``NodeBase`` says the inbox is paused (a twin, our clock off the hub's): it waits
here until the cause is gone. Part of ``broker.node.Node``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.protocol.parser import AUTHORIZATION_VIOLATION

from broker.errors import MsmtError
from broker.hubwatch import LAG_EVERY_S
from broker.log import get_logger
from broker.natsclient import TlsOnlyClient
from broker.natsconfig import inbox_durable, inbox_prefix, inbox_stream
from broker.node_base import HOUSEKEEPING_S, NodeBase
from broker.publisher import Publisher, read_inbox_seq, sent_event
from broker.receiver import Receiver
from broker.store import OutboxItem

log = get_logger("node")

_HUB_TROUBLE: Final = "hub"
"""One condition for the log's once-a-minute rule: in an outage, nats-py's
connection errors and the inbox's timeouts alternate, and would each be logged."""
PAUSED_LOG_EVERY_S: Final = 60.0
"""While the inbox is paused for a twin, a line says so this often."""


_REFUSAL_CLOSE: Final = (ConnectionResetError, BrokenPipeError, nats.errors.UnexpectedEOF)
"""How nats-py reports the hub closing a connection it refused, which may come before
the reason (``-ERR 'Authorization Violation'``) or instead of it."""


_LATE_REPLY: Final = 'permissions violation for publish to "_r_.'
"""How nats-py words the hub's refusal of a reply to an imported service's request,
lower-cased as it gives every server error: our answer to a partner's proof request."""


def credentials_refused(exc: Exception) -> bool:
    """Whether nats-py reported the hub refusing the node's NATS user (``Authorization Violation``).

    nats-py raises its ``AuthorizationError`` only for a refusal on a live
    connection; at a connect, the one that matters here, the hub's line comes as
    a plain ``nats.errors.Error`` naming it.
    """
    return isinstance(exc, nats.errors.AuthorizationError) or (
        AUTHORIZATION_VIOLATION in str(exc).lower()
    )


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


class Messaging(NodeBase):
    """The node's NATS side: the connection, the publisher, the receiver, a paused inbox."""

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

    def _refusal_echo(self, exc: Exception) -> bool:
        """Whether ``exc`` is the hub closing a connection it has just refused (left unsaid).

        Its reset comes ahead of the reason at times; as for a refused TLS handshake,
        it is left unsaid, else it took last_error from the refusal's text. Any other
        failure, or one long after the last refusal, ends the refusal (said once).
        """
        if isinstance(exc, _REFUSAL_CLOSE) and self._refused_recently():
            return True
        self._refusal_over(type(exc).__name__)
        return False

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
            self._credentials_accepted()
            log.info("nats_reconnected")

        async def error(exc: Exception) -> None:
            nonlocal tls_failed
            if isinstance(exc, nats.errors.SlowConsumerError):
                # Messages dropped on a subscription's bound (the audit subjects': a
                # partner's flood). Expected then, and no fault of the hub's: its own
                # line once a minute per subject, never over last_error, where it hid
                # a real inbox error (a review).
                self._dropped(exc.subject)
                return
            if credentials_refused(exc):
                self._credentials_refused()
                return
            if self._refusal_echo(exc):
                return
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
            except (nats.errors.Error, OSError, ValueError) as exc:
                # ValueError: a line past asyncio's 64 KiB limit (not a NATS server: a
                # review's stopped the node), retried as any other bad hub is.
                if credentials_refused(exc):
                    self._credentials_refused()
                elif not self._refusal_echo(exc):
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
            self._credentials_accepted()
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
            read_inbox_seq(self._inbox_seq),
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
                self._unserved_since = None
                await self._pause_inbox()
                continue
            self._inbox_halt.clear()
            unserved = False
            try:
                await receiver.run(self._inbox_halt)
                unserved = receiver.unserved
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
                # While the hub refuses our user, what the inbox meets follows from that.
                if not self._refused_recently():
                    text = f"inbox: {type(exc).__name__} {exc}".strip()
                    self._error(text, same_as=_HUB_TROUBLE)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 1.0)
            if unserved:
                self._inbox_unserved()
            else:
                # Any other end breaks the streak: 503s apart (an election, then the hub
                # away, then another) must not add up to UNSERVED_AFTER_S (a review).
                self._unserved_since = None

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
