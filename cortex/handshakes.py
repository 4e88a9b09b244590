"""The logger handed to websockets: a handshake a client broke is not a server error.

websockets logs every failed opening handshake as "opening handshake failed" at ERROR, with a
traceback. Most of them are the client's doing: a load balancer's TCP health check or a port
scan connects and leaves without a request, a browser gives up on a slow server, something
sends what is not HTTP or not an upgrade. Behind a load balancer that is an ERROR every few
seconds, and real errors drown in it. Those become one Cortex line on `cortex.http`: DEBUG
when the client left before its request was complete (like the health check it usually is),
INFO when it sent something invalid. Any other exception (a bug in Cortex's request handling)
keeps websockets' ERROR and traceback.
"""

from __future__ import annotations

import logging

from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .access import scrubbed_logger
from .logs import event

log_http = logging.getLogger("cortex.http")
FAILED = "opening handshake failed"  # websockets' message, websockets.asyncio.server


class ClientHandshakeFailures(logging.Filter):
    """Drops websockets' record of a handshake the client broke, and logs a Cortex event."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.msg != FAILED or not isinstance(exc, InvalidHandshake | ConnectionClosed):
            return True
        cause = exc.__cause__
        if isinstance(exc, ConnectionClosed):  # it left while its answer was being made
            event(log_http, "handshake abandoned", logging.DEBUG, reason=str(exc))
        elif isinstance(cause, EOFError | ConnectionError):  # it left before its request ended
            event(log_http, "handshake abandoned", logging.DEBUG, reason=str(cause))
        else:
            reason = f"{exc}: {cause}" if cause is not None else str(exc)
            event(log_http, "handshake refused", logging.INFO, reason=reason)
        return False


def websockets_logger() -> logging.Logger:
    """`websockets.server`, with client-broken handshakes taken out, then tokens scrubbed.

    The filter goes first: the scrubber replaces the exception with its scrubbed text.
    """
    logger = logging.getLogger("websockets.server")
    if not any(isinstance(f, ClientHandshakeFailures) for f in logger.filters):
        logger.filters.insert(0, ClientHandshakeFailures())
    return scrubbed_logger("websockets.server")
