"""Idempotent JetStream setup: each member's inbox stream and consumer, and the audit archive.

``msmt nats setup`` runs these with the account's own least-privilege user. Each
step reads what exists, creates what is missing, updates what differs and leaves
the rest alone, so running it twice changes nothing; the result lists every
setting so an operator can see the retention they got.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Literal

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from broker.errors import ConfigError
from broker.keys import AUDIT_ACCOUNT
from broker.log import get_logger
from broker.natsconfig import (
    AUDIT_KINDS,
    AUDIT_STREAM,
    inbox_durable,
    inbox_prefix,
    inbox_stream,
    inbox_subjects,
)
from broker.natstls import TlsOnlyClient

log = get_logger("natsetup")

Action = Literal["created", "updated", "unchanged"]

# Fields we set and therefore compare; everything else stays at the server default.
_STREAM_FIELDS: Final = (
    "subjects",
    "retention",
    "storage",
    "discard",
    "max_age",
    "max_bytes",
    "max_msgs",
    "max_msg_size",
    "duplicate_window",
    "num_replicas",
    "deny_delete",
    "deny_purge",
    "allow_rollup_hdrs",
)
_CONSUMER_FIELDS: Final = (
    "durable_name",
    "ack_policy",
    "deliver_policy",
    "ack_wait",
    "max_deliver",
    "max_ack_pending",
)


@dataclass(frozen=True, slots=True)
class InboxLimits:
    """Retention of a member's inbox: big enough to ride out a long outage of its node.

    ``discard="new"`` makes a full inbox refuse new reports (the sender's outbox
    keeps them and retries) instead of silently dropping unread old ones.
    """

    max_age_days: float = 30.0
    max_bytes: int = 128 * 1024**2
    max_msg_size: int = 512 * 1024
    duplicate_window_s: float = 24 * 3600.0
    replicas: int = 1
    ack_wait_s: float = 30.0
    max_ack_pending: int = 1024


def inbox_stream_config(member: str, limits: InboxLimits) -> StreamConfig:
    """The inbox stream: file storage, limits retention, no deletes or purges, dedup window."""
    return StreamConfig(
        name=inbox_stream(member),
        subjects=inbox_subjects(member),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_age=limits.max_age_days * 86400.0,
        max_bytes=limits.max_bytes,
        max_msgs=-1,
        max_msg_size=limits.max_msg_size,
        duplicate_window=limits.duplicate_window_s,
        num_replicas=limits.replicas,
        deny_delete=True,
        deny_purge=True,
        allow_rollup_hdrs=False,
    )


def inbox_consumer_config(member: str, limits: InboxLimits) -> ConsumerConfig:
    """The node's durable pull consumer: explicit acks, every message from the start."""
    return ConsumerConfig(
        name=inbox_durable(member),
        durable_name=inbox_durable(member),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=limits.ack_wait_s,
        # Never give up on a message: the node terminates bad ones itself, with a reason.
        max_deliver=-1,
        max_ack_pending=limits.max_ack_pending,
    )


def audit_stream_config(replicas: int = 1, max_bytes: int = 256 * 1024**2) -> StreamConfig:
    """The AUDIT archive of every checkpoint and cosignature: kept forever, never deleted."""
    return StreamConfig(
        name=AUDIT_STREAM,
        subjects=[f"msmt.audit.*.{kind}" for kind in AUDIT_KINDS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_age=0.0,
        # Bounded, with discard=new: a full archive refuses, it never drops history.
        max_bytes=max_bytes,
        max_msgs=-1,
        max_msg_size=64 * 1024,
        duplicate_window=120.0,
        num_replicas=replicas,
        deny_delete=True,
        deny_purge=True,
        allow_rollup_hdrs=False,
    )


@dataclass(frozen=True, slots=True)
class SetupResult:
    """What ``ensure_*`` did to one stream or consumer, and the settings now in force."""

    kind: Literal["stream", "consumer"]
    name: str
    action: Action
    settings: dict[str, Any]

    def lines(self) -> list[str]:
        """Human-readable lines: the action, then one ``setting = value`` per field."""
        head = f"{self.kind} {self.name}: {self.action}"
        return [head, *(f"  {k} = {_show(k, v)}" for k, v in self.settings.items())]


def _show(field: str, value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if field in ("max_age", "duplicate_window", "ack_wait") and isinstance(value, int):
        # The JetStream API counts durations in nanoseconds.
        return f"{value / 1e9:g}s"
    return str(value)


def _pick(config: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {f: config.get(f) for f in fields}


async def ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> SetupResult:
    """Create ``wanted`` if missing, update it if it differs; raise ``ConfigError`` on refusal."""
    name = str(wanted.name)
    want = _pick(wanted.as_dict(), _STREAM_FIELDS)
    try:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            info = await js.add_stream(wanted)
            return SetupResult(
                "stream", name, "created", _pick(info.config.as_dict(), _STREAM_FIELDS)
            )
        if _pick(info.config.as_dict(), _STREAM_FIELDS) == want:
            return SetupResult("stream", name, "unchanged", want)
        info = await js.update_stream(wanted)
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        raise ConfigError(f"stream {name}: the server refused the setup ({exc})") from None
    return SetupResult("stream", name, "updated", _pick(info.config.as_dict(), _STREAM_FIELDS))


async def ensure_consumer(js: JetStreamContext, stream: str, wanted: ConsumerConfig) -> SetupResult:
    """Create the durable consumer if missing, update it if it differs."""
    name = str(wanted.durable_name)
    want = _pick(wanted.as_dict(), _CONSUMER_FIELDS)
    try:
        try:
            info = await js.consumer_info(stream, name)
        except nats.js.errors.NotFoundError:
            info = await js.add_consumer(stream, wanted)
            action: Action = "created"
        else:
            if _pick(info.config.as_dict(), _CONSUMER_FIELDS) == want:
                return SetupResult("consumer", name, "unchanged", want)
            info = await js.add_consumer(stream, wanted)
            action = "updated"
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        raise ConfigError(
            f"consumer {stream}/{name}: the server refused the setup ({exc})"
        ) from None
    return SetupResult("consumer", name, action, _pick(info.config.as_dict(), _CONSUMER_FIELDS))


async def connect_account(
    url: str,
    account: str,
    seed: bytes,
    *,
    connect_timeout: int = 5,
    tls: ssl.SSLContext | None = None,
) -> Client:
    """Connect as ``account``'s nkey user with its own reply-inbox prefix (no reconnects).

    ``tls`` (from ``broker.natstls.client_tls_context``) names a private CA and a
    client certificate; without it a ``tls://`` URL uses the system trust store.
    Raises ``ConfigError`` if the server cannot be reached or refuses the
    credentials or the TLS handshake: within two tries of ``connect_timeout``.
    """
    # Every error nats-py reports before the connection is up, in order: a failed
    # socket connect reaches only error_cb, and connect() then raises a bare
    # NoServersError that does not say why.
    failures: list[Exception] = []

    async def error(exc: Exception) -> None:
        # Replaces nats-py's default callback, which prints a traceback to stderr.
        if nc.is_connected:
            log.warning("nats_error", account=account, error=f"{type(exc).__name__} {exc}")
        else:
            failures.append(exc)

    nc = TlsOnlyClient()
    try:
        await nc.connect(
            url,
            nkeys_seed_str=seed.decode(),
            inbox_prefix=inbox_prefix(account),
            connect_timeout=connect_timeout,
            allow_reconnect=False,
            # allow_reconnect=False stops nats-py only once a socket is open: a
            # refused or unanswered socket connect is retried by its server loop,
            # forever when this is 0. With 1 it tries twice, a second apart, then
            # raises; reconnects stay off, so neither setting matters after that.
            max_reconnect_attempts=1,
            reconnect_time_wait=1,
            tls=tls,
            error_cb=error,
        )
    except (nats.errors.Error, OSError) as exc:
        # nats-py leaves the socket open when the first connect fails.
        await nc.close()
        raise ConfigError(
            f"cannot connect to {url} as {account}: {_reason(url, exc, failures, connect_timeout)}"
        ) from None
    return nc


def _reason(url: str, raised: Exception, failures: list[Exception], timeout: int) -> str:
    """One line saying why the connect failed, from what nats-py raised and reported."""
    # A hub refusing the client certificate resets the connection too, and the
    # reset may be what connect raises: the TLS alert is the reason worth naming.
    alerts = [exc for exc in failures if isinstance(exc, ssl.SSLError)]
    cause: Exception = raised
    if alerts:
        cause = alerts[0]
    elif isinstance(raised, nats.errors.NoServersError) and failures:
        cause = failures[-1]
    if isinstance(cause, TimeoutError):
        return f"no answer within {timeout}s"
    reason = " ".join(str(cause).split()) or type(cause).__name__
    if isinstance(cause, ConnectionError) and url.startswith("tls://"):
        # TLS 1.3 lets the client finish its handshake before the hub checks the
        # client certificate, so the hub's alert is often lost in the reset.
        reason += " (a hub that demands a client certificate closes the connection this way)"
    return reason


AUDIT_MAX_BYTES: Final = 256 * 1024**2


async def setup_account(
    url: str,
    account: str,
    seed: bytes,
    limits: InboxLimits | None = None,
    *,
    audit_max_bytes: int = AUDIT_MAX_BYTES,
    tls: ssl.SSLContext | None = None,
) -> list[SetupResult]:
    """Ensure ``account``'s streams and consumers exist as configured (idempotent).

    A member gets its inbox stream and durable consumer; ``AUDIT`` its archive.
    ``tls`` is passed to ``connect_account``. Raises ``ConfigError`` if the
    server is unreachable or refuses a step.
    """
    limits = limits or InboxLimits()
    nc = await connect_account(url, account, seed, tls=tls)
    try:
        js = nc.jetstream()
        if account == AUDIT_ACCOUNT:
            wanted = audit_stream_config(limits.replicas, audit_max_bytes)
            return [await ensure_stream(js, wanted)]
        stream = await ensure_stream(js, inbox_stream_config(account, limits))
        consumer = await ensure_consumer(
            js, inbox_stream(account), inbox_consumer_config(account, limits)
        )
        return [stream, consumer]
    finally:
        await nc.close()
