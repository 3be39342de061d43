"""Prometheus metrics and health endpoints, served on a loopback port.

Each node has its own ``CollectorRegistry`` (not the process-global one), so
tests can run several nodes in one process. Labels carry only member codes
and rejection reasons, never report content.

* ``/healthz``: 200 while the process serves requests (liveness);
* ``/readyz``: 200 while ``Node.ready`` finds nothing wrong (connected, the hub
  answering, the inbox consumer bound and as set up, the inbox not paused, the store
  and audit log taking writes), else 503 with why;
* ``/metrics``: the Prometheus text format.

A request naming a host that is not this machine's loopback (``Host:``) is
refused with 421: a web page whose name an attacker points at 127.0.0.1 (DNS
rebinding) could otherwise read the node's traffic figures from a browser on it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
from collections.abc import Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from broker import version
from broker.members import MEMBERS
from broker.serving import BoundedRunner, refusals_close
from broker.store_file import STORE_FORMAT

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# Every label value a counter can take, exported at 0 from the start. Prometheus's
# ``increase()`` needs a sample before the first event: a labelled series that
# appears only at its first event, already at 1, never shows an increase, so a
# single fork alarm or a single report refused over a key would go unalerted (and a
# monitoring trial's first 35 schema refusals showed an increase of 0).
ALARM_KINDS = ("fork", "rollback", "twin")
REJECTION_STEPS = (
    "subject",
    "size",
    "budget",
    "format",
    "header",
    "recipient",
    "decrypt",
    "sender",
    "key",
    "signature",
    "disclosures",
    "freshness",
    "replay",
    "schema",
    "markings",
    "internal",
    "cosignature",
    "checkpoint",
)
"""The receiving checklist's steps (docs/NODE.md), and the audit notes a publisher made up."""
INTAKE_REFUSALS = ("schema", "size", "duplicate", "conflict", "unavailable", "token")
"""The intake's answers' reasons, and ``token`` for a request refused for its bearer token."""


def alarm_series(
    member: str | None, members: Collection[str] | None = None
) -> list[tuple[str, str]]:
    """The (kind, log) alarm series a node exports from the start.

    A fork or rollback can be any member's log, ours included (our own key's
    signature on a checkpoint our log lacks); a twin only ours (every member's
    without one). ``members``: the roster's (ours is added), else every MSMT member.
    """
    return [
        (kind, log)
        for kind in ALARM_KINDS
        for log in MEMBERS
        if (members is None or log in members or log == member)
        and (kind != "twin" or member in (None, log))
    ]


class Metrics:
    """The node's counters, gauges and histograms, in one private registry."""

    def __init__(self, member: str | None = None, members: Collection[str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.partners = tuple(
            m for m in MEMBERS if m != member and (members is None or m in members)
        )
        """The partners whose series start at 0: the roster's members (``members``) but us,
        else every other MSMT member. A partial deployment's node showed all ten."""
        r = self.registry
        # Which build runs, as Prometheus's own build_info does: a federation of
        # eleven members runs several at once (docs/DEPLOY.md, "Versions").
        self.build = Info(
            "msmt_build",
            "This build: its version, and the store format it keeps.",
            registry=r,
        )
        self.build.info({"version": version(), "store_format": str(STORE_FORMAT)})
        self.accepted = Counter("msmt_intake_accepted", "Records accepted from feeds.", registry=r)
        self.intake_rejected = Counter(
            "msmt_intake_rejected",
            "Feed records refused, by reason; reason token counts requests refused for their"
            " bearer token.",
            ["reason"],
            registry=r,
        )
        self.published = Counter(
            "msmt_published",
            "Envelopes acknowledged by the hub, by partner.",
            ["partner"],
            registry=r,
        )
        self.received = Counter(
            "msmt_received", "Verified reports stored, by sender.", ["sender"], registry=r
        )
        self.duplicates = Counter(
            "msmt_received_duplicate",
            "Byte-identical redeliveries acked without storing again, by sender.",
            ["sender"],
            registry=r,
        )
        self.budget_used = Gauge(
            "msmt_sender_budget_used_ratio",
            "Of limits.sender_bytes_per_day, how much each sender's envelopes stored this"
            " UTC day take (at 1 its messages are refused, reason budget), by sender.",
            ["sender"],
            registry=r,
        )
        self.held = Counter(
            "msmt_received_held",
            "Inbound deliveries handed back for later because they name a key this node's"
            " roster lacks, or were issued more than 5 minutes ahead of its clock (each"
            " redelivery counts), by sender.",
            ["sender"],
            registry=r,
        )
        self.rejected = Counter(
            "msmt_rejected",
            "Inbound messages refused, by the verification step that failed.",
            ["reason"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "msmt_outbox_depth",
            "Envelopes and reports not yet acknowledged by the hub.",
            registry=r,
        )
        self.outbox_awaiting_key = Gauge(
            "msmt_outbox_awaiting_key",
            "Of msmt_outbox_depth: envelopes not made yet for want of a partner's valid key.",
            registry=r,
        )
        self.outbox_oldest = Gauge(
            "msmt_outbox_oldest_seconds",
            "By partner: seconds since the oldest report waiting for the hub's ack for that"
            " partner (or to be signed again for it) was accepted; 0 when none waits. Envelopes"
            " awaiting the partner's key are not counted. Measured every 15 s.",
            ["partner"],
            registry=r,
        )
        self.partner_inbox_went_back = Counter(
            "msmt_partner_inbox_went_back",
            "Acks for a partner's inbox at or below a sequence an earlier ack gave (kept"
            " across restarts): the hub lost what waited there (a store put back from a"
            " copy, or the inbox made again).",
            ["partner"],
            registry=r,
        )
        self.inbox_went_back = Counter(
            "msmt_hub_inbox_went_back",
            "Times the hub's inbox stream was found made again or gone back to an earlier"
            " message: what waited there for this node was lost (ask partners to resend).",
            registry=r,
        )
        self.inbox_lag = Gauge(
            "msmt_inbox_lag",
            "Messages in the inbox stream not yet processed; NaN while not known (not"
            " connected, the hub not answering, or the inbox consumer missing).",
            registry=r,
        )
        self.inbox_lag.set(math.nan)
        self.publish_latency = Histogram(
            "msmt_publish_latency_seconds",
            "Publish to hub ack.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "msmt_e2e_latency_seconds",
            "Originator's issue time (iat) to verified storage here.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.clock_offset = Gauge(
            "msmt_clock_offset_seconds",
            "This node's clock minus the hub's, measured every 5 s while connected;"
            " NaN until the first comparison, and while not connected.",
            registry=r,
        )
        # Not 0 before the hub has answered: that would read as a perfect clock, where
        # the status says "unknown" (a docs review saw both on a node never connected).
        self.clock_offset.set(math.nan)
        self.connected = Gauge("msmt_nats_connected", "1 while connected to NATS.", registry=r)
        self.nats_refused = Gauge(
            "msmt_nats_credentials_refused",
            "1 from the hub's first refusal of this node's NATS credentials (Authorization"
            " Violation: its user not among the hub's) until it connects again; else 0.",
            registry=r,
        )
        self.spool_stalled = Gauge(
            "msmt_spool_stalled",
            "1 while the spool's last poll ended in a spool_error (the folder unreadable, a"
            " batch not filed, no room to answer one): its batches wait. Else 0.",
            registry=r,
        )
        self.ready = Gauge(
            "msmt_ready",
            "1 while /readyz would answer 200: connected, the hub answering, the inbox"
            " consumer bound and as set up, the inbox not paused, and the store and audit"
            " log taking writes.",
            registry=r,
        )
        # Unattended nodes need a warning before a credential lapses: past it,
        # partners refuse our reports (signing key), cannot encrypt to us
        # (encryption key), or the hub refuses the connection (TLS certificate).
        self.credential_expiry = Gauge(
            "msmt_credential_expiry_timestamp_seconds",
            "When the node's current signing key, encryption key and TLS client "
            "certificate stop being valid (Unix time), by credential.",
            ["credential"],
            registry=r,
        )
        self.audit_alarms = Counter(
            "msmt_audit_alarms",
            "Audit alarms (fork, rollback, twin), by kind and log (its member): once per"
            " conflict, not per checkpoint of it.",
            ["kind", "log"],
            registry=r,
        )
        self.audit_alarm_active = Gauge(
            "msmt_audit_alarm_active",
            "1 while an audit alarm stands: a checkpoint conflicting with it seen within"
            " the last 180 s, by kind and log.",
            ["kind", "log"],
            registry=r,
        )
        # A partner that sends reports but publishes no log (a node built without the
        # audit half, docs/ENVELOPE.md) is otherwise noticed only at the next audit.
        self.witnessed = Gauge(
            "msmt_witnessed_timestamp_seconds",
            "When this node last saw each partner's log at a checkpoint it has cosigned"
            " (a new one, or the log republishing it, at least once a minute while it"
            " runs): Unix time, 0 if not since this node started. By log (its member).",
            ["log"],
            registry=r,
        )
        # Our own log's witnesses: one that stops cosigning it (its node down, the hub
        # not passing our checkpoints on) otherwise shows only at the next audit.
        self.uncosigned = Gauge(
            "msmt_uncosigned_seconds",
            "How long each witness has left this node's audit log uncosigned: seconds"
            " since the first checkpoint published beyond the size it last cosigned (at"
            " most since this node started), 0 once it has cosigned the latest. By"
            " witness (its member).",
            ["witness"],
            registry=r,
        )
        self._start_at_zero(member, members)

    def _start_at_zero(self, member: str | None, members: Collection[str] | None) -> None:
        # Exported at 0 from the start, so the first event is an increase (see above).
        for kind, log in alarm_series(member, members):
            self.audit_alarms.labels(kind=kind, log=log)
            self.audit_alarm_active.labels(kind=kind, log=log)
        for step in REJECTION_STEPS:
            self.rejected.labels(reason=step)
        for reason in INTAKE_REFUSALS:
            self.intake_rejected.labels(reason=reason)
        # Held: for every MSMT member, in the roster or not. A member the roster lacks is
        # what a hold is for (a newer roster elsewhere), and its first hold must be an
        # increase for MsmtReceivedHeld, not a series' first sample (a review).
        for other in MEMBERS:
            if other != member:
                self.held.labels(sender=other)
        for partner in self.partners:
            self.budget_used.labels(sender=partner)
            self.received.labels(sender=partner)
            self.duplicates.labels(sender=partner)
            self.published.labels(partner=partner)
            self.outbox_oldest.labels(partner=partner)
            self.partner_inbox_went_back.labels(partner=partner)

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


def make_app(metrics: Metrics, ready: Callable[[], str | None]) -> web.Application:
    """The health/metrics app; ``ready()`` returns why the node is not ready, or None."""

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        why = ready()
        if why is None:
            return web.Response(text="ready\n")
        return web.Response(text=f"not ready: {why}\n", status=503)

    async def metrics_view(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[refusals_close, _loopback_host])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
    return app


@web.middleware
async def _loopback_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Only a name for this machine's loopback, as a scraper or health check on it
    # uses; none at all (HTTP/1.0) is no browser's.
    host = request.headers.get("Host")
    if host is not None and not is_loopback_host(host):
        return web.Response(status=421, text="not a loopback host name\n")
    return await handler(request)


def is_loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine's loopback: localhost, 127.0.0.0/8, ::1."""
    name = host.strip().lower()
    if name.startswith("["):
        # "[::1]" or "[::1]:PORT", nothing else after the bracket.
        inside, bracket, rest = name[1:].partition("]")
        port = rest[1:]
        if not bracket or (rest and not (rest[0] == ":" and port.isascii() and port.isdecimal())):
            return False
        name = inside
    elif name.count(":") == 1:
        name, _, port = name.partition(":")
        if not (port.isascii() and port.isdecimal()):
            return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def serve_tcp(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` (the config guarantees loopback); return the runner.

    Raises ``OSError`` if it cannot listen there, having let go of what it set up.
    """
    runner = metrics_runner(app)
    await runner.setup()
    try:
        await listen_tcp(runner, host, port)
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def metrics_runner(app: web.Application) -> web.AppRunner:
    """The runner of the metrics app, not set up: its connections bounded (``BoundedRunner``)."""
    return BoundedRunner(app, listener="metrics", handle_signals=False, access_log=None)


async def listen_tcp(runner: web.AppRunner, host: str, port: int) -> None:
    """Have ``runner`` (set up) listen on ``host:port`` too; ``OSError`` if it cannot."""
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        # A site that failed to start stays on the runner otherwise: one more at each
        # try of a held port (a review counted 1,000 after 1,000 tries).
        with contextlib.suppress(RuntimeError):
            await site.stop()
        raise


def listener_uid(port: int) -> int | None:
    """The user owning the TCP socket that listens on ``port`` here, or None (none, or not Linux).

    From ``/proc/net/tcp`` and ``tcp6``, which every user may read and none can forge.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as lines:
                next(lines, None)  # the header
                for line in lines:
                    fields = line.split()
                    # local_address is HEXIP:HEXPORT; state 0A is LISTEN; then uid.
                    listening = len(fields) > 7 and fields[3] == "0A"
                    if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return int(fields[7])
        except (OSError, ValueError, IndexError):
            continue
    return None
