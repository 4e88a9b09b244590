"""Why an opening handshake failed, said in one Cortex line, and never as a server error.

Most failed handshakes are the client's doing: a load balancer's TCP health check or a port scan
connects and leaves without a request, a browser gives up on a slow server, something sends what
is not HTTP or not an upgrade. websockets (17+) closes those quietly. Cortex logs one line on
`cortex.http`: DEBUG "handshake abandoned" when the client left before its request was complete
(like the health check it usually is), INFO "handshake refused" when it sent something invalid.
A bug in Cortex's request handling stays websockets' "process_request failed" ERROR.
"""

from __future__ import annotations

import logging
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..ops.logs import event
from ..ops.scrubber import scrubbed_logger

log_http = logging.getLogger("cortex.http")


def report_failure(failure: BaseException | None) -> None:
    """Log why a handshake failed: `failure` is what websockets kept of it (None: the client
    closed the connection before it sent a request)."""
    cause = failure.__cause__ if failure is not None else None
    if failure is None or isinstance(failure, ConnectionClosed):
        reason = str(failure) if failure is not None else "closed before a request"
        event(log_http, "handshake abandoned", logging.DEBUG, reason=reason)
    elif isinstance(cause, EOFError | ConnectionError):  # it left before its request ended
        event(log_http, "handshake abandoned", logging.DEBUG, reason=str(cause))
    else:
        reason = f"{failure}: {cause}" if cause is not None else str(failure)
        event(log_http, "handshake refused", logging.INFO, reason=reason)


class ReportingConnection(ServerConnection):
    """websockets' server connection, which reports a handshake the client broke."""

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        except ConnectionClosed as exc:  # it left while its answer was being sent
            report_failure(exc)
            raise
        failure = self.protocol.handshake_exc
        if failure is not None or self.request is None:
            report_failure(failure)
        # Otherwise the upgrade went through, or a route answered (Cortex logs those itself).


def websockets_logger() -> logging.Logger:
    """`websockets.server`, with tokens scrubbed: it logs request paths (a browser's token is in
    the query) and, at DEBUG, every header (Authorization)."""
    return scrubbed_logger("websockets.server")
