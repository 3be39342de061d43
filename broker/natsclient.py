"""The nats-py client that a node and ``msmt nats setup`` connect with.

``TlsOnlyClient`` closes the gap ``broker.natstls``'s rule 2 cannot: nats-py
upgrades even a ``tls://`` connection only when the server's INFO asks for TLS,
so a server (or a machine in the middle) that does not would get the CONNECT and
every message after it in plaintext, with the CA and certificate silently
unused. A server error does not close it for good, as nats-py does: the server
decides whether the connection ends (then the client reconnects). Its ``jetstream()`` is an
``AckedJetStream``, whose refused publishes fail their futures. These override
nats-py internals, which tests guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.transport import TcpTransport
from nats.js import JetStreamContext
from nats.protocol.parser import PERMISSIONS_ERR, STALE_CONNECTION

_EOF_WARNING: Final = "returning true from eof_received() has no effect when using ssl"


class _HarmlessEofWarning(logging.Filter):
    """Drops asyncio's warning at the end of every TLS connection nats-py made.

    nats-py upgrades its plaintext stream to TLS (``start_tls``), so asyncio's
    stream protocol still believes it is not over TLS and returns True from
    ``eof_received``, which asyncio's TLS layer then warns about when the server
    closes the session: it changes nothing, and each ``msmt nats`` run from cron
    over ``tls://`` printed it (a review).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for that one message: every other record passes."""
        return record.getMessage() != _EOF_WARNING


logging.getLogger("asyncio").addFilter(_HarmlessEofWarning())


class PlaintextServerError(nats.errors.Error):
    """A server reached through a ``tls://`` URL did not ask for TLS; nothing was sent to it."""


class TlsOnlyClient(Client):
    """A nats-py client that refuses a ``tls://`` server offering plaintext, before CONNECT.

    The refusal is a ``nats.errors.Error``, so nats-py treats it like any failed
    connect or reconnect: reported to ``error_cb``, then the next attempt. A test
    against a plaintext server guards this override of nats-py's internals.
    """

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = self._current_server
        if (
            initial_connection
            and server is not None
            and server.uri.scheme == "tls"
            and not info.get("tls_required")
        ):
            raise PlaintextServerError(
                f"nats: {server.uri.netloc} did not offer TLS on a tls:// URL; "
                "refusing to go on in plaintext"
            )
        await super()._process_info(info, initial_connection)

    async def _process_err(self, err_msg: str) -> None:
        # nats-py closes the client for good on any server error but a stale
        # connection or a permission refused, even with reconnects unlimited: a
        # trial put one corrupted line on a node's connection ("-ERR 'Unknown
        # Protocol Operation'"), and the node neither reconnected nor stopped. Here
        # the reason goes to error_cb and the connection is left to the server: one
        # it closes ends as a lost connection does, and nats-py reconnects; one it
        # keeps open ('Maximum Subscriptions Exceeded') stays usable, where forcing
        # a reconnect met the same error again, twice a second, for ever (a review).
        # A connect in progress fails as nats-py makes it (the caller tries again).
        if (
            not self.options["allow_reconnect"]
            or not self.is_connected
            or STALE_CONNECTION in err_msg
            or PERMISSIONS_ERR in err_msg
        ):
            await super()._process_err(err_msg)
            return
        reason = err_msg.strip("'")  # the server quotes it: -ERR 'Unknown Protocol Operation'
        err = nats.errors.Error(f"nats: {reason}")
        self._err = err
        await self._error_cb(err)

    async def _connect_to_server(self, s: Any) -> None:
        # nats-py keeps one transport for every try and opens each try's stream over
        # the last one's, never closing it: a hub refusing every try (Authorization
        # Violation) left a socket a try, twice a second, for the garbage collector to
        # close (each a ResourceWarning). Whatever stream is open here is one given up.
        # (Attributes of nats-py's TcpTransport, looked up so that a release without
        # them only leaves the sockets to the collector again.)
        old = self._transport
        if isinstance(old, TcpTransport):
            for name in ("_io_writer", "_bare_io_writer"):
                writer = getattr(old, name, None)
                if isinstance(writer, asyncio.StreamWriter) and not writer.is_closing():
                    writer.close()
        await super()._connect_to_server(s)
        transport = self._transport
        if transport is not None and not isinstance(transport.wait_closed, _BoundedWait):
            transport.wait_closed = _BoundedWait(transport.wait_closed)  # type: ignore[method-assign]

    def jetstream(self, **opts: Any) -> JetStreamContext:
        """A JetStream context whose ``publish_async`` futures also carry the hub's refusals."""
        return AckedJetStream(self, **opts)


CLOSE_WAIT_S: Final = 1.0
"""How long closing a connection waits for its stream to say it is closed.

A normal close takes milliseconds, and one cut short still flushes in the
background (the transport was closed, not aborted); after a refused TLS upgrade
every retry of the hub pays it in full."""


class _BoundedWait:
    """A transport's ``wait_closed`` that gives up after ``CLOSE_WAIT_S``.

    After a refused TLS upgrade (a hub certificate that does not verify: another CA,
    a wrong name, expired), the stream nats-py waits on when it closes the connection
    had handed its socket to the TLS layer and never learns that it closed: the wait
    was for ever, inside ``connect()``. A node started then never tried again, even
    once the hub was fixed, and ``msmt nats setup`` hung (an onboarding trial). The
    socket itself is closed before the wait; only the waiting is cut short.
    """

    def __init__(self, wait: Callable[[], Awaitable[None]]) -> None:
        self._wait = wait

    async def __call__(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wait(), CLOSE_WAIT_S)


class AckedJetStream(JetStreamContext):
    """nats-py's JetStream context, with refused publishes failing their futures.

    nats-py's reply handler builds the error with ``APIError.from_error``, which
    raises instead of returning (nats-io/nats.py#985, fix pending in #994): the
    error escapes to the connection's error callback and the publish's future is
    never resolved. A full inbox (``503 maximum bytes exceeded``) then looked to
    the publisher like a hub that did not answer within its timeout.
    """

    async def _handle_async_reply(self, msg: Msg) -> None:
        try:
            await super()._handle_async_reply(msg)
        except (nats.js.errors.Error, ValueError) as exc:
            # The same token nats-py keys its futures by (its reply subject's last token).
            token = msg.subject[len(self._nc._inbox_prefix) + 22 + 2 :]
            future = self._publish_async_futures.get(token)
            if future is not None and not future.done():
                future.set_exception(exc)


def plaintext_refusal_hooked() -> bool:
    """Whether nats-py still has the private method ``TlsOnlyClient`` overrides, as it was.

    The override is of nats-py internals (tested against 2.16); a release that
    renamed the method or changed its parameters would leave it never called.
    """
    try:
        params = list(inspect.signature(Client._process_info).parameters)
    except (AttributeError, TypeError, ValueError):
        return False
    return params == ["self", "info", "initial_connection"]


def nats_version() -> str:
    """The installed nats-py's version, for messages."""
    try:
        return importlib.metadata.version("nats-py")
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"
