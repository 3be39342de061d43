"""What every part of the running node shares: its state, its last error, readiness, a paused inbox.

``NodeBase`` holds the constructor and the state that the node's parts read and
write, how an error is recorded (``_error``: logged once a minute per condition,
shown in ``msmt status``), ``ready`` (what ``/readyz`` and ``msmt_ready`` say), and
why the inbox takes nothing now (a twin, our clock against the hub's), which the
auditnet and ``HubWatch`` callbacks wired in the constructor decide. Apart so that
each part stays one sitting's read: ``broker.node_messaging`` (NATS, the publisher,
the receiver) and ``broker.node_housekeeping`` (the once-a-second round). Part of
``broker.node.Node``.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from nats.aio.client import Client

from broker.auditlog import AuditLog
from broker.auditnet import AuditNet
from broker.config import NodeConfig
from broker.hubwatch import INBOX_STREAM_STATE, HubWatch
from broker.inbound import Inbound
from broker.intake import Intake
from broker.keys import nats_public
from broker.log import Throttle, get_logger
from broker.metrics import Metrics
from broker.note import excerpt
from broker.planloop import PlanLoop
from broker.planner import Planner, keyless_partners
from broker.planpool import PlanPool
from broker.publisher import PARTNER_INBOX_SEQ_STATE, Publisher, RunDb
from broker.receiver import Receiver
from broker.roster import format_time
from broker.store import Store

log = get_logger("node")

T = TypeVar("T")
HOUSEKEEPING_S: Final = 1.0
OUTBOX_AGE_EVERY_S: Final = 15.0
"""How often ``msmt_outbox_oldest_seconds`` is measured (a query over the waiting rows)."""
WRITE_FAILED_S: Final = 60.0
"""How long after a failed store or audit-log write the node reads as not ready (``ready``)."""
_PAUSED: Final = {
    "twin": "inbox paused: a twin takes reports from it (msmt status)",
    "clock": "inbox paused: this node's clock is too far off the hub's (msmt status)",
}
STATUS_EVERY_S: Final = 30.0
"""Longest time between status writes when nothing changed (``updated_at``'s freshness)."""
EXPIRY_WARNING: Final = timedelta(days=14)
"""A credential expiring sooner than this is logged at start (``credential_expires_soon``)."""
NATS_REFUSED: Final = "the hub refuses this node's NATS credentials (msmt status)"
"""Why ``ready`` says no while the hub refuses our NATS user (``_credentials_refused``)."""
_HUB_SILENT: Final = "the hub server does not answer JetStream requests (msmt status)"
INBOX_UNSERVED: Final = (
    "the hub's JetStream does not serve this node's account: restart every hub server (msmt status)"
)
"""Why ``ready`` says no while nothing serves our inbox consumer (``_inbox_unserved``)."""
UNSERVED_AFTER_S: Final = 20.0
"""How long pulls go unserved (503, the consumer answered for) before ``inbox_unserved``
says so: a hub cluster electing the consumer's leader may answer 503 for a moment."""
REFUSAL_ECHO_S: Final = 12.0
"""How long after the hub's last refusal a lost connection is taken for its echo (the hub
closing what it refused, at times ahead of its reason). Over twice the longest wait
between tries (5 s): past it, tries fail for another reason, and the refusal is over."""


class NodeBase:
    """``broker.node.Node``'s state, its last error, whether it is ready, why it takes nothing."""

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
        # Series by partner for the roster's members only (a partial deployment).
        self.metrics = Metrics(config.member, {key.member for key in planner.roster})
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
            store.state().get(INBOX_STREAM_STATE, ""),
        )
        # Each partner's inbox, the highest sequence its acks gave (``Publisher``'s).
        self._inbox_seq = store.state().get(PARTNER_INBOX_SEQ_STATE, "")
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
        self.plan_loop.keyless = lambda: keyless_partners(
            planner.policy, planner.roster, datetime.now(UTC)
        )
        self._intakes: list[Intake] = []
        # Tries the metrics port again while another process holds it (``Node``).
        self._metrics_waiting: asyncio.Task[None] | None = None
        self._last_error = ""
        self._last_error_at = ""  # when it last happened, so a stale error reads as one
        # While the hub refuses our NATS user: since when, and why (msmt status).
        self._nats_refused = ""
        self._refusals = 0  # the hub's refusals since then
        self._refused_last = 0.0  # time.monotonic() of the last one
        self._unserved = False  # the hub answers for our inbox consumer, but serves no pull
        self._unserved_since: float | None = None  # time.monotonic() of the first such pull
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
        # The roster, key, policy and build this run starts with, recorded with the
        # first status write once it has started (housekeeping): msmt status shows
        # them as in force, which a start refused before then never was.
        self.started_facts: dict[str, str] = {}

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
        self._last_error_at = utc_now_text()

    def _credentials_refused(self) -> None:
        # The hub refused our NATS user (Authorization Violation): its users lack this
        # seed's key (the member suspended, the custodian's accept not loaded, or a
        # nats.nk other than the one recorded). Only the hub's or the node's operator
        # can mend it; nats-py tries again every half second, and a later reload may
        # let it in. Said once when it starts and once when it ends: the once-a-minute
        # node_error gave hours of lines that named no cause. The status, the gauge
        # and /readyz say it meanwhile, and last_error keeps it.
        self._refusals += 1
        self._refused_last = time.monotonic()
        now = utc_now_text()
        if not self._nats_refused:
            user = nats_public(self.seed, str(self.config.seed_path))
            text = (
                "the hub refused this node's NATS credentials (Authorization Violation):"
                f" the hub's nats-users.json must list {self.member}'s NATS key {user}"
                f" (the public key of {self.config.seed_path}) and every hub server be"
                " reloaded with it (restarted, if the hub had no account for"
                f" {self.member}: a member that joins or returns); a suspended member is"
                " refused until it returns"
                " (docs/KEYS.md). Retrying every 0.5 s"
            )
            self._nats_refused = f"since {now}: {text}"
            self.metrics.nats_refused.set(1)
            log.error("nats_credentials_refused", error=text, nats_user=user)
        self._last_error = self._nats_refused.partition(": ")[2]
        self._last_error_at = now

    def _refused_recently(self) -> bool:
        """Whether the hub refused our NATS user within ``REFUSAL_ECHO_S``."""
        return bool(self._nats_refused) and (time.monotonic() - self._refused_last < REFUSAL_ECHO_S)

    def _credentials_accepted(self) -> None:
        # Connected: a refusal, if one stood, is over (said once, as it began).
        self._refusal_over(None)

    def _refusal_over(self, failing: str | None) -> None:
        # A refusal, if one stood, is over: connected (``failing`` None), or the tries
        # now fail for another reason, which must be said as itself (a review: a hub
        # that then reset every connection, or went down, still read as refusing).
        if not self._nats_refused:
            return
        since = self._nats_refused.partition(": ")[0].removeprefix("since ")
        if failing is None:
            log.warning("nats_credentials_accepted", refused_since=since, refusals=self._refusals)
        else:
            log.warning(
                "nats_credentials_refusal_over",
                refused_since=since,
                refusals=self._refusals,
                now=failing,
            )
        self._nats_refused, self._refusals = "", 0
        self.metrics.nats_refused.set(0)

    def _inbox_unserved(self) -> None:
        # The hub answered for our inbox consumer (its info), then no pull found a
        # responder (503), and every publish of ours gets no stream response: nothing
        # serves JetStream in our account. Seen on nats-server 2.15 for an account a
        # configuration reload added (a member that joins, or returns after a
        # suspension) until the servers restart. Said once until a pull is served.
        text = (
            f"the hub answers for {self.member}'s inbox consumer but no JetStream serves"
            f" its pulls (503 no responders), nor this node's publishes: the hub's"
            f" account {self.member} was most likely added by a configuration reload (a"
            " member that joins, or returns after a suspension), which nats-server serves"
            " only after a restart. The hub operator restarts every hub server, one at a"
            " time (docs/KEYS.md); nothing is lost meanwhile. Retrying"
        )
        now = time.monotonic()
        if self._unserved_since is None:
            self._unserved_since = now
        if now - self._unserved_since < UNSERVED_AFTER_S:
            return
        if not self._unserved:
            self._unserved = True
            log.error("inbox_unserved", error=text)
        self._last_error = text
        self._last_error_at = utc_now_text()

    def _check_served(self) -> None:
        # A pull the hub answered ends what ``_inbox_unserved`` said.
        if self.receiver is None or not self.receiver.serving:
            return
        self._unserved_since = None
        if self._unserved:
            self._unserved = False
            log.warning("inbox_served")

    def _dropped(self, subject: str) -> None:
        # By subject kind (msmt.audit.<M>.checkpoint: <M> is the flooder's own log).
        unlogged = self._error_log.check("messages_dropped", subject)
        if unlogged is not None:
            log.warning(
                "messages_dropped",
                subject=excerpt(subject),
                reason="arriving faster than this node takes them; the rest of a flood is dropped",
                **({"unlogged_before": unlogged} if unlogged else {}),
            )

    def ready(self) -> str | None:
        """Why the node is not ready, or ``None`` when it is."""
        if self.nc is None or not self.nc.is_connected:
            return NATS_REFUSED if self._nats_refused else "not connected to NATS"
        if self._paused_for:
            return _PAUSED[self._paused_for]
        # The hub's JetStream: silent, or answering but serving none of our pulls.
        unserved = _HUB_SILENT if self.hub.silent >= 2 else self._unserved and INBOX_UNSERVED
        if unserved:
            return unserved
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
        since = self._inbox_paused.partition(": ")[0] or f"since {utc_now_text()}"
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


def utc_now_text() -> str:
    """Now, as the status and the log show every time: RFC 3339 UTC."""
    # As every other time we show (roster, feeds, audit): RFC 3339 with "Z".
    return format_time(datetime.now(UTC))
