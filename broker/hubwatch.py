"""The node's watch on the hub: its inbox lag, whether it answers, and its clock.

Housekeeping asks the hub for the node's inbox consumer every ``LAG_EVERY_S``
(``HubWatch.inbox_lag``). The answer gives the lag (``msmt_inbox_lag``, the
status); its time stamp, the hub's clock, which ours is checked against (a clock
far off pauses the inbox and holds our reports, until it is right); and the
consumer as the hub has it, which must be as ``msmt nats setup`` made it, as must
the stream (every ``STREAM_EVERY_S``). A server that stops answering is left for
another (``SILENT_SWITCH``).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker.log import get_logger
from broker.metrics import Metrics
from broker.natsconfig import inbox_durable, inbox_stream
from broker.natsetup import consumer_alterations, stream_alterations

log = get_logger("node")

INBOX_STREAM_STATE: Final = "inbox_stream"
"""The status fact keeping the inbox stream as last seen (``HubWatch.stream_mark``)."""
LAG_EVERY_S: Final = 5.0
"""Seconds between ``consumer_info`` requests for the inbox-lag gauge and status."""
STREAM_EVERY_S: Final = 30.0
"""Seconds between the inbox stream's info requests (``_check_stream``)."""
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


class HubWatch:
    """What the node knows of the hub: asked by housekeeping, read by the rest of the node.

    ``error(text, condition)`` reports a problem the node's once-a-minute way;
    ``clock_compared(off)`` runs after each comparison of our clock with the hub's,
    with whether ours is too far off (``clock_off`` says why).
    """

    def __init__(
        self,
        member: str,
        servers: int,
        metrics: Metrics,
        connection: Callable[[], Client | None],
        error: Callable[[str, str | None], None],
        clock_compared: Callable[[bool], None],
        stream_mark: str = "",
    ) -> None:
        self._member = member
        self.stream_mark = stream_mark
        """The inbox stream as last seen (``_check_went_back``): kept in the status facts."""
        self._servers = servers
        self._metrics = metrics
        self._connection = connection
        self._error = error
        self._clock_compared = clock_compared
        self.lag: int | None = None
        """The inbox's messages not yet acked, at the last answer; None when unknown."""
        # How many requests in a row got no answer, and how the hub has the inbox
        # "consumer" and "stream" otherwise than ``msmt nats setup`` made them.
        self.silent = 0
        self.altered = {"consumer": "", "stream": ""}
        # Why our clock is too far off the hub's to judge freshness, else empty, and
        # the offset for the status (whole seconds, signed).
        self.clock_off, self.clock_offset = "", "unknown"
        self.clock_checked = asyncio.Event()
        """Set once the clock was compared with the hub's, or the hub did not answer."""
        # Our clock minus the monotonic one at the last comparison: a change says
        # the clock was stepped (NTP, an operator) since, without asking the hub.
        self._clock_base: float | None = None
        self._lag_at, self._stream_at = -LAG_EVERY_S, -STREAM_EVERY_S

    async def inbox_lag(self) -> int | None:
        """The inbox lag, asked of the hub at most every ``LAG_EVERY_S``; None when unknown.

        Each answer also checks the consumer, our clock, and at times the stream.
        """
        # Not every housekeeping tick: the gauge and ``msmt status`` are at most that stale.
        nc = self._connection()
        if nc is None or not nc.is_connected:
            self._lag_at = -LAG_EVERY_S
            return None
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY_S and not self._clock_stepped(now):
            return self.lag
        self._lag_at = now
        # The JetStream API itself, not nats-py's ConsumerInfo: its "ts", the hub's
        # clock, is what the node checks its own against (``_check_clock``).
        subject = (
            f"$JS.API.CONSUMER.INFO.{inbox_stream(self._member)}.{inbox_durable(self._member)}"
        )
        asked = wall_clock()
        reply: Msg | None = None
        try:
            reply = await nc.request(subject, b"", timeout=1.0)
            info = _hub_json(reply.data)
            self.lag = int(info["num_pending"]) + int(info["num_ack_pending"])
            self._check_consumer(info)
        except (nats.errors.Error, TimeoutError, ValueError, KeyError, TypeError) as exc:
            # No answer, or {"error": ...} for an inbox the hub lost: unknown.
            self.lag = None
            await self._heard(nc, _silence(reply, exc))
            return None
        finally:
            self.clock_checked.set()  # as far as the hub lets us: the receiver waits for it
        await self._heard(nc, None)
        answered = wall_clock()
        self._clock_base = answered - time.monotonic()
        self._check_clock(info.get("ts"), asked, answered)
        if now - self._stream_at >= STREAM_EVERY_S:
            self._stream_at = now
            await self._check_stream(nc)
        return self.lag

    async def _heard(self, nc: Client, silence: str | None) -> None:
        # ``silence``: why the hub gave no usable answer (``_silence``), None for
        # an answer. After SILENT_SWITCH in a row, another server: nats-py tries
        # the next in its list, and comes back here if none other is up.
        if silence is None:
            self.silent = 0
            return
        # Counted on across the switch, until a server answers: reset there, the
        # node read as ready on each new connection until two more requests went
        # unanswered, and a cluster without a quorum, every server silent, showed
        # ready a third of the time (a frozen-hub trial: MsmtNotReady 6 minutes late).
        self.silent += 1
        if self.silent % SILENT_SWITCH:
            return
        url = nc.connected_url
        server = f"{url.hostname}:{url.port}" if url is not None else "its server"
        # With one server a new connection to it still helps: a middlebox that
        # dropped the old one's state shows as silence too.
        then = "trying another server" if self._servers > 1 else "reconnecting"
        self._error(
            f"hub: {server} has not answered JetStream requests for"
            f" {SILENT_SWITCH * LAG_EVERY_S:.0f} s ({silence}); {then}",
            "hub-switch",
        )
        await nc.force_reconnect()

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
        self.altered["consumer"] = altered
        if altered:
            self._error(
                f"hub: the inbox consumer {inbox_durable(self._member)} is not as msmt nats setup"
                f" made it: {altered}; reports to this node may be held or dropped there: run"
                f" msmt nats setup --account {self._member}, and ask who changed it"
                " (docs/DEPLOY.md)",
                "consumer",
            )

    async def _check_stream(self, nc: Client) -> None:
        # The inbox stream can be edited with the member's own credentials as well
        # as the hub's: discard old, a short max_age or a message limit drops unread
        # reports there, and a narrowed subject or size refuses partners' reports
        # (their outboxes grow), all while this node reads an empty inbox as quiet.
        subject = f"$JS.API.STREAM.INFO.{inbox_stream(self._member)}"
        try:
            reply = await nc.request(subject, b"", timeout=1.0)
            info = _hub_json(reply.data)
        except (nats.errors.Error, TimeoutError, ValueError):
            return  # the consumer's request says what an unanswering hub is
        if not isinstance(info, dict) or "config" not in info:
            return  # {"error": ...}: a missing stream shows as an unbound consumer
        self._check_went_back(info)
        altered = stream_alterations(info, self._member)
        self.altered["stream"] = altered
        if altered:
            self._error(
                f"hub: the inbox stream {inbox_stream(self._member)} is not as msmt nats setup"
                f" made it: {altered}; reports to this node may be refused or dropped there:"
                f" run msmt nats setup --account {self._member}, and ask who changed it"
                " (docs/DEPLOY.md)",
                "stream",
            )

    def _check_went_back(self, info: dict[str, Any]) -> None:
        # A hub restored from an older copy of its store, or one that lost it and had
        # the inbox made again, has dropped what waited there for this node: in a
        # restore drill every node stayed ready, with no error, and only replay found
        # the reports. The stream's creation time and last sequence never go back
        # otherwise, so the node compares them with what it saw last (its status).
        # It sees only what reached the hub while it watched: reports that came while
        # it was stopped, and went with a copy taken since, only their senders know of
        # (docs/RELIABILITY.md: after a restore every sender resends since the copy).
        state, created = info.get("state"), info.get("created")
        last = state.get("last_seq") if isinstance(state, dict) else None
        waiting = state.get("messages") if isinstance(state, dict) else None
        if type(last) is not int or not isinstance(created, str) or len(created) > 64:
            return  # not a stream info as JetStream writes one: nothing to compare
        seen = _stream_mark(self.stream_mark)
        self.stream_mark = json.dumps(
            {
                "created": created,
                "last_seq": last,
                "messages": waiting if type(waiting) is int else None,
            },
            sort_keys=True,
        )
        if seen is None:
            return
        seen_created, seen_last, seen_waiting = seen
        if created == seen_created and last >= seen_last:
            return
        how = (
            f"was made again (created {created!r}, not {seen_created!r})"
            if created != seen_created
            else f"went back from message {seen_last} to {last}"
        )
        stream = inbox_stream(self._member)
        if created != seen_created and seen_waiting == 0:
            # Drained, deleted and made again, as DEPLOY.md has an operator do for an
            # inbox setup cannot put right (a review: that paged): nothing waited there
            # when last seen, so a line, not the page.
            log.warning(
                "inbox_made_again",
                stream=stream,
                detail=f"{how}; it held nothing when last seen, {STREAM_EVERY_S:.0f} s or"
                " less before",
            )
            return
        self._metrics.inbox_went_back.inc()
        self._error(
            f"hub: the inbox stream {stream} {how}: the hub lost what"
            " waited there for this node (a store restored from a copy, or lost): ask the"
            f" partners to check with msmt audit replay and resend what it lists as"
            f" undelivered to {self._member} (docs/RELIABILITY.md)",
            "stream-went-back",
        )

    def _check_clock(self, hub_time: object, asked: float, answered: float) -> None:
        # Partners refuse reports issued more than MAX_SKEW in their future, and
        # nothing tells the sender: say it here, well before that (docs/NODE.md).
        hub = _parse_hub_time(hub_time)
        if hub is None:
            return
        offset = (asked + answered) / 2 - hub
        self._metrics.clock_offset.set(round(offset, 3))
        # Whole seconds: the status is rewritten when a fact changes, not at each jitter.
        self.clock_offset = f"{round(offset):+d}"
        way = "ahead of" if offset > 0 else "behind"
        self.clock_off = (
            f"this node's clock is {abs(offset):.0f} s {way} the hub's, too far off to judge"
            " the freshness of partners' reports or to sign ours: theirs wait at the hub,"
            " ours in the outbox, until it is synchronised (NTP; if it is right, the hub's"
            " clock is not, or the hub's answers are altered)"
            if abs(offset) > CLOCK_PAUSE_S
            else ""
        )
        self._clock_compared(bool(self.clock_off))
        if abs(offset) > CLOCK_WARN_S:
            self._error(
                f"clock: this node's clock is {abs(offset):.0f} s {way} the hub's; partners"
                " hold reports issued more than 5 minutes in their future and refuse those"
                " older than their freshness window: synchronise it (NTP; if it is right,"
                " the hub's clock is not)",
                "clock",
            )


def _stream_mark(text: str) -> tuple[str, int, int | None] | None:
    # What _check_went_back kept; anything else (none yet, a damaged status) is no mark.
    if len(text) > 512:
        return None  # ours are short: and "[" * 100000 would not parse (a review)
    try:
        mark = json.loads(text)
        created, last, waiting = mark["created"], mark["last_seq"], mark.get("messages")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    if not isinstance(created, str) or type(last) is not int:
        return None
    return created, last, waiting if type(waiting) is int else None


def wall_clock() -> float:
    """Return the node's own clock, as the planner signs with it (a test can move it).

    Read through this module (``hubwatch.wall_clock()``) wherever the node judges
    time against the hub's, so that moving it here moves it for all of them.
    """
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
