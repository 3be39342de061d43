"""How full the hub's streams are: ``msmt nats usage``, for whoever runs the hub.

Every stream ``msmt nats setup`` makes refuses what is published to it once full
(``discard: new``): a member's inbox then refuses partners' reports (they wait in
the partners' outboxes), and a member's audit archive stops archiving its
checkpoints. No node can see the archives, which live in the ``AUDIT`` account, so
the hub's operator asks each account with its own credentials, as setup does, and
may write the figures for node_exporter's textfile collector: the shipped alerts
``MsmtHubStreamFilling``, ``MsmtHubStreamMissing`` and ``MsmtHubUsageStale`` read them
(docs/DEPLOY.md).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nats.errors
import nats.js.errors
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from broker.errors import ConfigError, WriteError
from broker.keys import AUDIT_ACCOUNT
from broker.members import MEMBERS
from broker.natsconfig import AUDIT_STREAM, archive_stream, inbox_stream
from broker.natsetup import RETIRED_SUBJECT, SETUP_TIMEOUT, connect_account

MiB: Final = 1024**2


@dataclass(frozen=True)
class StreamUsage:
    """One stream's fill: bytes and messages held, and its ``max_bytes`` (None: no limit)."""

    name: str
    messages: int
    bytes: int
    max_bytes: int | None
    retired: bool = False
    """The shared archive older versions made: kept, read-only, written to no more."""


@dataclass(frozen=True)
class AccountUsage:
    """One account's JetStream storage against its quota, and each of its streams."""

    account: str
    storage: int
    max_storage: int | None
    streams: tuple[StreamUsage, ...]
    missing: tuple[str, ...] = ()
    """Streams setup makes for the account that the hub does not have."""


def _limit(value: int | None) -> int | None:
    # JetStream says -1 (or 0, for an account) for "no limit".
    return value if value is not None and value > 0 else None


def _streams(account: str) -> tuple[list[str], list[str]]:
    # The streams setup makes for the account, then any it may hold from older versions.
    # Asked by name: the account's user may not list its streams (least privilege).
    if account == AUDIT_ACCOUNT:
        return [archive_stream(m) for m in MEMBERS], [AUDIT_STREAM]
    return [inbox_stream(account)], []


async def account_usage(
    url: str, account: str, seed: bytes, *, tls: ssl.SSLContext | None = None
) -> AccountUsage:
    """Ask the hub for ``account``'s storage and streams, as that account's user.

    Raises ``ConfigError`` if the hub cannot be reached or does not answer.
    """
    wanted, older = _streams(account)
    streams: list[StreamUsage] = []
    missing: list[str] = []
    nc = await connect_account(url, account, seed, tls=tls)
    try:
        jsm = nc.jsm(timeout=SETUP_TIMEOUT)
        info = await jsm.account_info()
        for name in (*wanted, *older):
            try:
                s = await jsm.stream_info(name)
            except nats.js.errors.NotFoundError:
                if name in wanted:
                    missing.append(name)
                continue
            streams.append(
                StreamUsage(
                    name,
                    int(s.state.messages),
                    int(s.state.bytes),
                    _limit(s.config.max_bytes),
                    # Retired once setup moved it to a subject nobody may publish on;
                    # before that, older nodes still fill it like any archive.
                    retired=name in older and s.config.subjects == [RETIRED_SUBJECT],
                )
            )
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"account {account}: the hub did not answer: {reason}") from None
    finally:
        await nc.close()
    return AccountUsage(
        account,
        int(info.storage),
        _limit(info.limits.max_storage),
        tuple(streams),
        tuple(missing),
    )


def _size(value: int, limit: int | None) -> str:
    if limit is None:
        return f"{value / MiB:.1f} MiB (no limit)"
    return f"{value / MiB:.1f} of {limit / MiB:.1f} MiB ({100 * value / limit:.0f} %)"


def usage_lines(usage: AccountUsage) -> list[str]:
    """What ``msmt nats usage`` prints for one account: its storage, then each stream."""
    lines = [f"account {usage.account}: {_size(usage.storage, usage.max_storage)} stored"]
    width = max(map(len, [*(s.name for s in usage.streams), *usage.missing]), default=0)
    lines += [
        f"  {s.name:<{width}}  "
        + (
            f"{s.bytes / MiB:.1f} MiB, {s.messages} messages, retired (kept; nothing is"
            " written to it since msmt nats setup made the per-member archives)"
            if s.retired
            else f"{_size(s.bytes, s.max_bytes)}, {s.messages} messages"
        )
        for s in usage.streams
    ]
    lines += [f"  {name:<{width}}  missing: run msmt nats setup" for name in usage.missing]
    return lines


def usage_registry(usages: Sequence[AccountUsage], at: float) -> CollectorRegistry:
    """The figures as Prometheus gauges, measured at ``at`` (a Unix time)."""
    registry = CollectorRegistry()
    labels = ("account", "stream")
    stream_bytes = Gauge(
        "msmt_hub_stream_bytes", "Bytes a hub stream holds.", labels, registry=registry
    )
    stream_max = Gauge(
        "msmt_hub_stream_max_bytes",
        "A hub stream's max_bytes: past it, it refuses what is published to it.",
        labels,
        registry=registry,
    )
    messages = Gauge(
        "msmt_hub_stream_messages", "Messages a hub stream holds.", labels, registry=registry
    )
    storage = Gauge(
        "msmt_hub_account_storage_bytes",
        "An account's JetStream file storage in use, all replicas.",
        ("account",),
        registry=registry,
    )
    quota = Gauge(
        "msmt_hub_account_max_storage_bytes",
        "An account's JetStream file storage quota.",
        ("account",),
        registry=registry,
    )
    missing = Gauge(
        "msmt_hub_stream_missing",
        "1 for a stream msmt nats setup makes that the hub does not have.",
        labels,
        registry=registry,
    )
    measured = Gauge(
        "msmt_hub_usage_timestamp_seconds",
        "When msmt nats usage last measured the account.",
        ("account",),
        registry=registry,
    )
    for usage in usages:
        for s in usage.streams:
            stream_bytes.labels(usage.account, s.name).set(s.bytes)
            messages.labels(usage.account, s.name).set(s.messages)
            # Not for the retired archive: full or not, it takes nothing more, and
            # nothing would mend an alert on it.
            if s.max_bytes is not None and not s.retired:
                stream_max.labels(usage.account, s.name).set(s.max_bytes)
        for name in usage.missing:
            missing.labels(usage.account, name).set(1)
        storage.labels(usage.account).set(usage.storage)
        if usage.max_storage is not None:
            quota.labels(usage.account).set(usage.max_storage)
        measured.labels(usage.account).set(at)
    return registry


def write_textfile(path: Path, usages: Sequence[AccountUsage], at: float) -> None:
    """Write the figures for node_exporter's textfile collector, replacing the file at once."""
    # prometheus_client writes a file beside it and renames it over, so the collector
    # never reads half a file.
    try:
        write_to_textfile(str(path), usage_registry(usages, at))
    except OSError as exc:
        raise WriteError(f"--textfile: cannot write {path}: {exc.strerror}") from None
