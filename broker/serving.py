"""The node's two HTTP listeners (intake socket, metrics port), held to a bound.

Each connection holds a file descriptor from the moment it is accepted, and
aiohttp lets one sit without a request for an hour: a security review held
half-sent requests open until a node whose descriptor limit was 256 had none
left, and it could then open neither its store nor the spool, nor reconnect to
the hub. The
intake socket is open to every feed's container, token or not (the token is
checked only once the headers are in), and the metrics port to every local user.

So ``BoundedRunner`` closes a connection that has not sent a whole request's
headers within ``HEADER_TIMEOUT_S`` (and one idle that long between requests),
and takes at most ``connection_cap()`` connections at once: one more is closed
as soon as it is accepted, logged once a minute (``connections_full``). A
connection is counted from the moment its protocol is handed out, not from when
aiohttp registers it: asyncio accepts up to a backlog of connections in one go
and registers them later, and a second review let 1,014 in past a cap of 256 so.
A refused request (``refusals_close``) closes its connection: a client without a
token keeps no slot by asking again.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler

from broker.log import Throttle, get_logger

log = get_logger("node")

HEADER_TIMEOUT_S: Final = 10.0
"""Seconds a connection has to send a request's headers, or stay idle between requests."""

CONNECTIONS_MAX: Final = 512
"""The most connections one listener takes at once, however high the descriptor limit."""


def connection_cap() -> int:
    """Connections one listener takes at once: a quarter of the descriptor limit, at most 512.

    The rest stay free for the store, the audit log, the spool, the hub and the
    other listener, whatever the limit the node was started with.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return CONNECTIONS_MAX
    return max(8, min(CONNECTIONS_MAX, soft // 4))


DESCRIPTORS_MIN: Final = 64
"""The least descriptor limit a node starts under.

An idle node holds about 21 (the store and the audit log with their ``-wal`` and ``-shm``
files, the spool, the hub, the planning worker's pipes, the log); under 64 each listener's
cap (``connection_cap``, at least 8) leaves too few for a spool batch or a reconnect. Under
16 the planning worker's pipe could not be made: a traceback (a review)."""


def descriptor_limit_problem() -> str | None:
    """Why this process's descriptor limit is too low for a node, or ``None`` if it is not."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= DESCRIPTORS_MIN:
        return None
    return (
        f"the descriptor limit (ulimit -n) is {soft}, too low for a node, which needs at least"
        f" {DESCRIPTORS_MIN}: raise it (LimitNOFILE= in a systemd unit, ulimit -n in a shell)"
    )


HANDED_OUT_S: Final = 5.0
"""A protocol handed out and not registered by then never got its connection: not counted."""


class _Closed(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class BoundedRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are bounded in number and in time to their headers.

    ``listener`` names it in the log (``intake``, ``metrics``); ``cap`` may be
    lowered before a site starts.
    """

    def __init__(self, app: web.Application, *, listener: str, **kwargs: Any) -> None:
        # aiohttp starts its keep-alive timer as a connection opens and does not
        # restart it for a part of a request: past it, a connection still waiting
        # for its request's headers is closed. Between requests it is the idle limit.
        super().__init__(app, keepalive_timeout=HEADER_TIMEOUT_S, **kwargs)
        self.listener = listener
        self.cap = connection_cap()
        self._throttle = Throttle()
        # Protocols handed out and not yet among the server's connections, with when.
        self._handed: dict[RequestHandler, float] = {}

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        made = server.connection_made

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            # Counted among the server's connections from now on, and no longer once
            # it closes. Left among those handed out, a connection made and closed
            # between two accepts counted HANDED_OUT_S more: back-to-back requests
            # past cap / HANDED_OUT_S a second were refused (a low-file-limit trial:
            # health checks twice a second against a cap of 8).
            self._handed.pop(handler, None)
            made(handler, transport)

        server.connection_made = connection_made  # type: ignore[method-assign]
        return server

    def open_connections(self) -> int:
        """Connections open or about to be: the server's, and those handed out since."""
        real = self._server
        if real is None:
            return 0
        now = asyncio.get_running_loop().time()
        registered = set(real.connections)
        for handler, at in list(self._handed.items()):
            if handler in registered or now - at > HANDED_OUT_S:
                del self._handed[handler]
        return len(registered) + len(self._handed)

    # The sites take their protocol factory from this property (and only they do;
    # the runner's own shutdown uses the server itself): a factory that counts.
    @property
    def server(self) -> Any:
        """The protocol factory the sites serve with: the server's, past the cap a closed one."""
        real = self._server
        if real is None:
            return None

        def protocol() -> asyncio.BaseProtocol:
            if self.open_connections() < self.cap:
                handler = real()
                self._handed[handler] = asyncio.get_running_loop().time()
                return handler
            unlogged = self._throttle.check("connections_full", self.listener)
            if unlogged is not None:
                log.warning(
                    "connections_full",
                    listener=self.listener,
                    limit=self.cap,
                    reason="a connection over the limit was closed: too many are open at once",
                    **({"unlogged_before": unlogged} if unlogged else {}),
                )
            return _Closed()

        return protocol


@web.middleware
async def refusals_close(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Close the connection after a refused request (a 4xx answer), so it holds no slot."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            exc.force_close()
        raise
    if 400 <= response.status < 500:
        response.force_close()
    return response
