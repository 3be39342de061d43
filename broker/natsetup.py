"""Idempotent JetStream setup: each member's inbox stream and consumer, and the audit archive.

``msmt nats setup`` runs these with the account's own least-privilege user. Each
step reads what exists, creates what is missing, updates what differs and leaves
the rest alone, so running it twice changes nothing; the result lists every
setting so an operator can see the retention they got.

An inbox keeps a message only until its node acks or terminates it (interest
retention): a flood of garbage occupies it only while the node has not yet
rejected it. Inboxes made with limits retention (older versions) are switched in
place, keeping every message the node has not acked yet. The shared archive of
older versions (``AUDIT_ARCHIVE``) is retired, with its content, for one archive
stream per member.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Literal, TypeGuard

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
    StreamInfo,
)

from broker.errors import ConfigError
from broker.keys import AUDIT_ACCOUNT
from broker.log import get_logger
from broker.members import MEMBERS
from broker.natsclient import TlsOnlyClient
from broker.natsconfig import (
    ARCHIVE_MAX_BYTES,
    AUDIT_STREAM,
    INBOX_MAX_BYTES,
    MIN_INBOX_AGE_DAYS,
    MIN_MAX_BYTES,
    archive_stream,
    archive_subjects,
    inbox_durable,
    inbox_prefix,
    inbox_stream,
    inbox_subjects,
)
from broker.natstls import display_url

log = get_logger("natsetup")

Action = Literal["created", "updated", "unchanged", "retired"]

# Fields we set and therefore compare; everything else stays at the server default.
_STREAM_FIELDS: Final = (
    "subjects",
    "retention",
    "storage",
    "discard",
    "max_age",
    "max_bytes",
    "max_msgs",
    "max_msgs_per_subject",
    "max_msg_size",
    "duplicate_window",
    "num_replicas",
    "deny_delete",
    "deny_purge",
    "allow_rollup_hdrs",
    # Never set, so compared as absent: a member's user may edit its own inbox, and a
    # red-team member added a source pulling another member's inbox (it stayed idle);
    # setup puts the stream back. A subject transform filed every report under one
    # sender's name (each other's then refused), and no-ack left senders unanswered
    # (a security review).
    "sources",
    "mirror",
    "subject_transform",
    "no_ack",
)
_CONSUMER_FIELDS: Final = (
    "durable_name",
    "ack_policy",
    "deliver_policy",
    "ack_wait",
    "max_deliver",
    "max_ack_pending",
    # Set on the hub, each holds or drops reports (a hostile-hub review's filter made
    # the inbox drop them all): the setup puts them back to none.
    "filter_subject",
    "filter_subjects",
    "headers_only",
)


@dataclass(frozen=True, slots=True)
class InboxLimits:
    """Retention of a member's inbox: big enough to ride out a long outage of its node.

    ``discard="new"`` makes a full inbox refuse new reports (the sender's outbox
    keeps them and retries) instead of silently dropping unread old ones.
    """

    max_age_days: float = 30.0
    max_bytes: int = INBOX_MAX_BYTES
    max_msg_size: int = 512 * 1024
    # Two minutes: the hub keeps every Nats-Msg-Id it saw for the whole window,
    # outside any quota, and nothing bounds an id's size; a hostile member sending
    # junk under 60 KB ids grew the hub by 131 MiB in 5 s, held for the old 24 h
    # (red-team trial). A resend later than this reaches the receiver, which acks
    # the same bytes again as a duplicate and stores nothing.
    duplicate_window_s: float = 120.0
    replicas: int = 1
    ack_wait_s: float = 30.0
    max_ack_pending: int = 1024


def inbox_stream_config(member: str, limits: InboxLimits) -> StreamConfig:
    """The inbox stream: file storage, interest retention, no deletes or purges, dedup window.

    Interest retention removes a message once the node's consumer acks or
    terminates it, so what the node has rejected stops taking space at once (a
    full inbox refuses every partner's reports). Unlike work-queue retention it
    can be switched to in place from the limits retention older versions used.
    The dedup window outlives the messages (``Nats-Msg-Id`` is remembered apart).
    """
    return StreamConfig(
        name=inbox_stream(member),
        subjects=inbox_subjects(member),
        retention=RetentionPolicy.INTEREST,
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


def consumer_alterations(info: object) -> str:
    """What in a JetStream consumer-info answer differs from the inbox consumer we set up.

    Empty when nothing does. Only what can hold or drop reports is looked at: a
    subject filter, headers only, a delivery limit, a pause.
    """
    if not isinstance(info, dict):
        return ""
    config = _config_of(info)
    found = []
    for key in ("filter_subject", "filter_subjects"):
        if config.get(key):
            found.append(f"{key} {config[key]!r:.100}")
    if config.get("headers_only"):
        found.append("headers_only")
    if config.get("max_deliver") not in (None, -1, 0):
        found.append(f"max_deliver {config['max_deliver']!r:.20}")
    if info.get("paused"):
        found.append(f"paused until {config.get('pause_until', '?')!s:.40}")
    return ", ".join(found)


def stream_alterations(info: object, member: str) -> str:
    """What in a JetStream stream-info answer for ``member``'s inbox drops or refuses reports.

    Empty when nothing does. Looked at: subjects other than setup's (partners'
    reports find no stream), a subject transform (reports filed under another
    sender, then refused), retention other than interest (acked reports stay
    until the inbox is full), discard old (a full inbox drops its oldest
    unread), a message limit, a size or age limit under setup's least (reports
    refused; unread ones expire while the node is down), a message size under
    setup's (larger reports refused), no acks to senders, and a sealed stream
    (every report refused). The size and age an operator may choose by option
    (``KEEPABLE``) are left alone above those least values.
    """
    config = _config_of(info)
    found = []
    if "subjects" in config and config["subjects"] != inbox_subjects(member):
        found.append(f"subjects {config['subjects']!r:.100}")
    if config.get("subject_transform"):
        found.append(f"subject_transform {config['subject_transform']!r:.100}")
    if config.get("retention", "interest") != "interest":
        found.append(f"retention {config['retention']!r:.20}")
    if config.get("discard") == "old":
        found.append("discard old")
    for key in ("max_msgs", "max_msgs_per_subject"):
        if _positive(config.get(key)):
            found.append(f"{key} {config[key]}")
    # JetStream's API gives durations in nanoseconds; 0 is no limit.
    age = config.get("max_age")
    if _positive(age) and age < MIN_INBOX_AGE_DAYS * 86400e9:
        found.append(f"max_age {age / 1e9:.0f} s")
    size = config.get("max_bytes")
    if _positive(size) and size < MIN_MAX_BYTES:
        found.append(f"max_bytes {size}")
    size = config.get("max_msg_size")
    if _positive(size) and size < InboxLimits().max_msg_size:
        found.append(f"max_msg_size {size}")
    for key in ("no_ack", "sealed"):
        if config.get(key):
            found.append(key)
    return ", ".join(found)


def _config_of(info: object) -> dict[str, Any]:
    """The ``config`` object of a JetStream info answer, or ``{}`` for anything else."""
    config = info.get("config") if isinstance(info, dict) else None
    return config if isinstance(config, dict) else {}


def _positive(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


ARCHIVE_MAX_MSG_SIZE: Final = 16 * 1024
"""A checkpoint with every member's cosignature is under 2 KiB."""


def audit_stream_config(
    member: str, replicas: int = 1, max_bytes: int = ARCHIVE_MAX_BYTES
) -> StreamConfig:
    """``member``'s archive in AUDIT: its checkpoints and cosignatures, kept forever.

    One stream per member, each with its own bound: only ``member`` may publish
    these subjects, so a member that floods them fills its own archive and no
    one else's.
    """
    return StreamConfig(
        name=archive_stream(member),
        subjects=archive_subjects(member),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        max_age=0.0,
        # Bounded, with discard=new: a full archive refuses, it never drops history.
        max_bytes=max_bytes,
        max_msgs=-1,
        max_msg_size=ARCHIVE_MAX_MSG_SIZE,
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
        return [
            head,
            *(f"  {k} = {_show(k, v)}" for k, v in self.settings.items() if v is not None),
        ]


def _show(field: str, value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if field in ("max_age", "duplicate_window", "ack_wait") and isinstance(value, int):
        # The JetStream API counts durations in nanoseconds. Whole seconds, never
        # "2.592e+06s"; days beside them, and what a zero max_age means (a trial read
        # the archives' "0s" as "kept for no time").
        seconds = value / 1e9
        shown = f"{seconds:.0f}s" if seconds == int(seconds) else f"{seconds}s"
        if field == "max_age" and value == 0:
            return f"{shown} (no age limit)"
        if seconds >= 86400:
            return f"{shown} ({seconds / 86400:g} days)"
        return shown
    return str(value)


def _pick(config: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {f: config.get(f) for f in fields}


SETUP_TIMEOUT: Final = 20.0
"""Seconds ``setup_account`` waits for each JetStream API answer (nats-py's default is 5).

Creating a replicated stream takes the cluster's meta leader and each replica's
server; on a busy cluster 5 s was too little (a test saw an R3 archive time out)."""


def _unanswered(what: str, exc: Exception) -> ConfigError | None:
    # A request that timed out was not refused: the server may yet have done it.
    if not isinstance(exc, nats.errors.TimeoutError):
        return None
    return ConfigError(
        f"{what}: the hub did not answer within {SETUP_TIMEOUT:g} s (a busy or partitioned"
        " cluster?): run the setup again, it changes only what differs"
    )


async def _stream_config(js: JetStreamContext, name: str) -> StreamConfig | None:
    """The configuration of stream ``name`` as the server has it, or ``None`` if missing."""
    try:
        return (await js.stream_info(name)).config
    except nats.js.errors.NotFoundError:
        return None
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        unanswered = _unanswered(f"stream {name}", exc)
        if unanswered is not None:
            raise unanswered from None
        raise ConfigError(f"stream {name}: the server refused the setup ({exc})") from None


_NO_STORAGE: Final = 10047
"""JetStream's ``insufficient storage resources available``: the account quota, or the
server's store, is full (the server's answer does not say which)."""


def _refusal(name: str, wanted: StreamConfig, exc: Exception) -> ConfigError:
    """One line for a refused stream change; a full account quota says what to do."""
    unanswered = _unanswered(f"stream {name}", exc)
    if unanswered is not None:
        return unanswered
    if isinstance(exc, nats.js.errors.APIError) and exc.err_code == _NO_STORAGE:
        need = int(wanted.max_bytes or 0) * int(wanted.num_replicas or 1)
        return ConfigError(
            f"stream {name}: the account's storage quota on the hub has no room for "
            f"max_bytes x replicas = {need} bytes: use a smaller --max-bytes or "
            "--replicas, or ask the hub operator for a larger quota (or a larger JetStream "
            "store: the server's own may be smaller than the quotas, see its 'Max Storage')"
        )
    return ConfigError(f"stream {name}: the server refused the setup ({exc})")


_NO_PEERS: Final = 10005
"""JetStream's ``no suitable peers for placement``: the cluster has fewer servers online
than the stream's replicas, for good or only for now (one still starting, or late with
a heartbeat under load); the server's answer does not say which."""

PLACEMENT_WAIT: Final = 20.0
"""Seconds ``ensure_stream`` keeps asking while the hub cannot yet place a stream's replicas.

A cluster counts as healthy once a majority of its servers is up, so a setup run
just after start (deploy/provision.sh) could be refused a three-replica stream
for the moment the last server takes to join."""


async def _placed(
    change: Callable[[StreamConfig], Awaitable[StreamInfo]], wanted: StreamConfig, wait: float
) -> StreamInfo:
    """``change(wanted)``, asked again for up to ``wait`` s while the hub has no servers for it.

    Raises ``ConfigError`` if the placement is still refused then; any other
    error propagates for ``_refusal`` to word.
    """
    deadline = time.monotonic() + wait
    delay = 0.1
    while True:
        try:
            return await change(wanted)
        except nats.js.errors.APIError as exc:
            if exc.err_code != _NO_PEERS:
                raise
        if time.monotonic() + delay > deadline:
            replicas = int(wanted.num_replicas or 1)
            raise ConfigError(
                f"stream {wanted.name}: the hub has no {replicas} servers online to place "
                f"{replicas} replicas on (still refused after {wait:g} s): start the cluster's "
                "missing servers, or use a smaller --replicas (at most the cluster's size)"
            )
        if delay == 0.1:  # the first refusal: say why setup pauses
            log.info("stream_placement_waiting", stream=wanted.name, replicas=wanted.num_replicas)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


KEEPABLE: Final = frozenset({"num_replicas", "max_bytes", "max_age"})
"""Stream settings an operator sets by option, which a re-run without it keeps (``keep``)."""


_KEPT_FROM: Final = {"max_bytes": MIN_MAX_BYTES, "max_age": MIN_INBOX_AGE_DAYS * 86400.0}
"""The least value of a setting that a re-run keeps: what ``msmt nats setup``'s options allow."""


def _keepable(field: str, current: Any, wanted: Any) -> bool:
    """Whether a re-run keeps the stream's own ``current`` value of ``field`` over ``wanted``.

    Not below what the options allow: a size or age set smaller by other means (the
    member's own credentials, the hub) drops or refuses reports, and the node says
    to run setup, which must then put it back. Never an age where ``wanted`` keeps
    all (an archive): a kept age would expire its history.
    """
    if not current:
        return False
    if field == "max_age" and not wanted:
        return False
    return bool(current >= _KEPT_FROM.get(field, 0))


async def ensure_stream(
    js: JetStreamContext,
    wanted: StreamConfig,
    *,
    keep: frozenset[str] = frozenset(),
    placement_wait: float = PLACEMENT_WAIT,
) -> SetupResult:
    """Create ``wanted`` if missing, update it if it differs; raise ``ConfigError`` on refusal.

    An existing stream keeps its own value of each setting named in ``keep`` (of
    ``KEEPABLE``): a re-run without ``--replicas`` or ``--max-bytes`` must not
    quietly undo what an operator set on purpose. A placement the hub refuses for
    want of servers is asked again for up to ``placement_wait`` seconds.
    """
    name = str(wanted.name)
    current = await _stream_config(js, name)
    if current is not None:
        kept = {
            f: getattr(current, f)
            for f in keep & KEEPABLE
            if _keepable(f, getattr(current, f), getattr(wanted, f))
        }
        wanted = dataclasses.replace(wanted, **kept)
    want = _pick(wanted.as_dict(), _STREAM_FIELDS)
    try:
        if current is None:
            info = await _placed(js.add_stream, wanted, placement_wait)
            return SetupResult(
                "stream", name, "created", _pick(info.config.as_dict(), _STREAM_FIELDS)
            )
        if _pick(current.as_dict(), _STREAM_FIELDS) == want:
            return SetupResult("stream", name, "unchanged", want)
        info = await _placed(js.update_stream, wanted, placement_wait)
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        raise _refusal(name, wanted, exc) from None
    return SetupResult("stream", name, "updated", _pick(info.config.as_dict(), _STREAM_FIELDS))


async def ensure_inbox(
    js: JetStreamContext,
    member: str,
    limits: InboxLimits,
    *,
    keep: frozenset[str] = frozenset(),
    placement_wait: float = PLACEMENT_WAIT,
) -> list[SetupResult]:
    """Ensure ``member``'s inbox stream and its node's consumer; return both results.

    Interest retention drops a message that arrives while the stream has no
    consumer, so a new inbox starts with limits retention, gets its consumer and
    only then switches. An inbox of an older version (limits retention) is
    switched in place the same way: the server then drops what the consumer has
    acked or terminated and keeps everything else. A work-queue inbox (made by
    hand) cannot be switched: that raises ``ConfigError`` saying so.
    """
    wanted = inbox_stream_config(member, limits)
    name = str(wanted.name)
    current = await _stream_config(js, name)
    retention = RetentionPolicy.LIMITS
    if current is not None and current.retention is not None:
        retention = RetentionPolicy(current.retention)
    if retention == RetentionPolicy.WORK_QUEUE:
        raise ConfigError(
            f"stream {name} has work-queue retention, which JetStream cannot change to "
            "interest in place: let the node drain it, delete it on the hub and run setup again"
        )
    stream = await ensure_stream(
        js,
        dataclasses.replace(wanted, retention=retention),
        keep=keep,
        placement_wait=placement_wait,
    )
    consumer = await ensure_consumer(js, name, inbox_consumer_config(member, limits))
    if retention != wanted.retention:
        switched = await ensure_stream(js, wanted, keep=keep, placement_wait=placement_wait)
        if current is not None:
            log.warning("inbox_retention_switched", stream=name, was=str(retention.value))
        action: Action = "created" if stream.action == "created" else "updated"
        stream = SetupResult("stream", name, action, switched.settings)
    return [stream, consumer]


RETIRED_SUBJECT: Final = f"msmt.retired.{AUDIT_STREAM}"
"""What the shared archive of older versions listens on once retired: a subject no
user may publish, so it keeps its content and takes nothing new."""


async def retire_shared_archive(js: JetStreamContext) -> SetupResult | None:
    """Free the subjects of the shared ``AUDIT_ARCHIVE`` for the per-member archives.

    The old stream is kept with everything in it (readable as before, never
    deleted); only its subjects change. Returns ``None`` if there is no such stream.
    """
    current = await _stream_config(js, AUDIT_STREAM)
    if current is None:
        return None
    if current.subjects == [RETIRED_SUBJECT]:
        return SetupResult(
            "stream", AUDIT_STREAM, "unchanged", _pick(current.as_dict(), _STREAM_FIELDS)
        )
    retired = dataclasses.replace(current, subjects=[RETIRED_SUBJECT])
    try:
        info = await js.update_stream(retired)
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        raise _refusal(AUDIT_STREAM, retired, exc) from None
    log.warning("shared_archive_retired", stream=AUDIT_STREAM, messages=info.state.messages)
    return SetupResult(
        "stream", AUDIT_STREAM, "retired", _pick(info.config.as_dict(), _STREAM_FIELDS)
    )


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
        unanswered = _unanswered(f"consumer {stream}/{name}", exc)
        if unanswered is not None:
            raise unanswered from None
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
    except (nats.errors.Error, OSError, ValueError) as exc:
        # nats-py leaves the socket open when the first connect fails. ValueError: a
        # first line longer than asyncio's 64 KiB limit (a review's fake server).
        await nc.close()
        raise ConfigError(
            f"cannot connect to {display_url(url)} as {account}: "
            f"{_reason(url, exc, failures, connect_timeout)}"
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
    if isinstance(cause, ValueError) and not isinstance(cause, ssl.SSLError):
        # Not a certificate error, which is a ValueError too.
        return "it sent a line longer than 64 KiB: not a NATS server"
    reason = " ".join(str(cause).split()) or type(cause).__name__
    if isinstance(cause, ssl.SSLCertVerificationError) and url.startswith("nats://"):
        # The hub asked for TLS, and nats-py tried it against the system's CAs: the
        # certificate error alone did not say what to give (a trial's hub operator).
        reason += " (the hub requires TLS: give a tls:// URL and its CA with --tls-ca)"
    if (
        isinstance(cause, ConnectionError)
        and not isinstance(cause, ConnectionRefusedError)  # nothing listens: no hub to demand
        and url.startswith("tls://")
    ):
        # TLS 1.3 lets the client finish its handshake before the hub checks the
        # client certificate, so the hub's alert is often lost in the reset.
        reason += " (a hub that demands a client certificate closes the connection this way)"
    return reason


AUDIT_MAX_BYTES: Final = ARCHIVE_MAX_BYTES
"""Default ``max_bytes`` of each member's archive stream (``--max-bytes`` for ``AUDIT``)."""


async def setup_account(
    url: str,
    account: str,
    seed: bytes,
    limits: InboxLimits | None = None,
    *,
    audit_max_bytes: int = AUDIT_MAX_BYTES,
    tls: ssl.SSLContext | None = None,
    keep: frozenset[str] = frozenset(),
    placement_wait: float = PLACEMENT_WAIT,
) -> list[SetupResult]:
    """Ensure ``account``'s streams and consumers exist as configured (idempotent).

    A member gets its inbox stream and durable consumer; ``AUDIT`` one archive
    stream per member (``audit_max_bytes`` each), after retiring the shared
    archive of older versions. ``tls`` is passed to ``connect_account``. With
    ``keep`` (of ``KEEPABLE``) a stream that exists keeps those settings (a new one
    gets ``limits``' and ``audit_max_bytes``). A replicated stream the hub cannot
    place yet is asked again for up to ``placement_wait`` seconds (``ensure_stream``).
    Raises ``ConfigError`` if the server is unreachable or refuses a step.
    """
    limits = limits or InboxLimits()
    nc = await connect_account(url, account, seed, tls=tls)
    try:
        js = nc.jetstream(timeout=SETUP_TIMEOUT)
        if account == AUDIT_ACCOUNT:
            retired = await retire_shared_archive(js)
            results = [] if retired is None else [retired]
            for member in MEMBERS:
                wanted = audit_stream_config(member, limits.replicas, audit_max_bytes)
                results.append(
                    await ensure_stream(js, wanted, keep=keep, placement_wait=placement_wait)
                )
            return results
        return await ensure_inbox(js, account, limits, keep=keep, placement_wait=placement_wait)
    finally:
        await nc.close()
