"""Our end of the inbox consumer: pull requests, a part batch's wait, a delivery's metadata.

``Pull`` keeps one pull request out at the hub on a private reply subject and gathers
what it delivers; ``Linger`` decides whether a part batch waits for company (pure
logic, fed by ``Pull``); ``published_at``, ``hub_pending`` and ``hold_delay`` read a
delivery's JetStream metadata, which the hub sets. Apart from ``broker.receiver``'s
loop, which takes batches from ``Pull`` and hands them to ``broker.inbound``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from datetime import datetime
from typing import Final

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from broker.log import get_logger

log = get_logger("receiver")

HOLD_BACKOFF_MAX: Final = 15
"""A held message's delay doubles per delivery up to this many times ``hold_seconds``."""

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
    monotonic seconds; this is pure logic, fed by ``Pull``.
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


def published_at(msg: Msg) -> datetime | None:
    """When the hub stored ``msg`` (its JetStream timestamp); ``None`` if not said."""
    meta = _metadata(msg)
    return None if meta is None else meta.timestamp


def hub_pending(msg: Msg) -> int:
    """How many more the hub held for the consumer as it sent ``msg``; 0 if not said."""
    meta = _metadata(msg)
    return 0 if meta is None else int(meta.num_pending)


def hold_delay(hold_seconds: float, msg: Msg) -> float:
    """Seconds until a held message comes again: ``hold_seconds``, doubling, capped.

    The backoff bounds what a sender gains by naming unknown keys: each message
    costs a decryption per delivery, so 1,440 a day at a flat minute, ~100 capped.
    """
    meta = _metadata(msg)
    delivered = 1 if meta is None else int(meta.num_delivered or 1)
    doublings = min(delivered - 1, 4)  # 2**4 is past the cap
    return float(hold_seconds * min(2**doublings, HOLD_BACKOFF_MAX))


class Pull:
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
        # Whether the hub answered a pull request: a delivery, or its end (404, 408).
        # A 503 instead (no responders) with the consumer there: nothing serves it.
        self.served = False
        self.unserved = False
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
            self.served = True
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
            if status in (api.StatusCode.NO_MESSAGES, api.StatusCode.REQUEST_TIMEOUT):
                self.served = True
            elif status == api.StatusCode.SERVICE_UNAVAILABLE:
                # No responders: no JetStream serves the consumer for this account
                # (nats-py put the rest of the status line in the description).
                self.unserved = True
                self.failure = "pull: status 503 (no responders)"
            else:
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
