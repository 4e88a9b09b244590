"""One connection's upload: the `upload` frame, the binary frames after it, `cancel_upload`.

One upload at a time. Its binary frames count against its announced size, not the
connection's rate limits; binary frames with no upload are refused, and the connection is closed
with 1008 if it keeps sending them. A refused upload's remaining bytes (the client had sent them
before it heard) are dropped quietly, and so are the bytes of an `upload` refused at once (too
large, over the quota): a client need not wait for a go-ahead. See docs/attachments.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from websockets.frames import CloseCode

from ..errors import BadFrame, CortexError, Internal, Unavailable
from ..pipeline.files import Files, Upload
from ..protocol import Ack, AttachmentEvent, CancelUpload, ErrorEvent
from ..protocol import Upload as UploadFrame

log = logging.getLogger("cortex.server")

# Binary frames in a row with no upload before the connection is closed (1008).
STRAY_STRIKES = 3


class UploadSlot:
    """The upload in progress on one connection, if any."""

    def __init__(
        self,
        files: Files | None,
        owner: str,
        *,
        deliver: Callable[[str], None],
        close: Callable[[int, str], None],
    ) -> None:
        self.files = files
        self.owner = owner
        self.deliver = deliver
        self.close = close
        self.upload: Upload | None = None
        self.request_id: str | None = None
        self._finishing: asyncio.Task[None] | None = None  # an upload's last checks
        self._drain = 0  # bytes of a refused upload still on their way: dropped quietly
        self._strikes = 0

    @property
    def busy(self) -> bool:
        return self.upload is not None

    async def begin(self, frame: UploadFrame) -> None:
        if self.files is None:
            raise Unavailable("this server takes no attachments")
        if self.upload is not None:
            raise BadFrame("an upload is in progress: send its bytes, or cancel_upload")
        if self._finishing is not None:
            raise BadFrame("the last upload is still being checked: wait for its answer")
        self._drain = 0
        try:
            self.upload = await self.files.begin(
                self.owner, filename=frame.filename, size=frame.size
            )
        except CortexError:
            # The client may send the bytes without waiting for an answer: drop them quietly
            # (up to twice the largest upload: an announced size is no licence for more).
            self._drain = min(frame.size, 2 * self.files.settings.max_attachment_bytes)
            raise
        self.request_id = frame.request_id

    async def cancel(self, frame: CancelUpload) -> None:
        await self.abort()
        self.deliver(Ack(request_id=frame.request_id).encode())

    async def abort(self) -> None:
        """Drop the upload in progress and what it stored (a cancel, a closed connection)."""
        upload, self.upload = self.upload, None
        if upload is not None:
            await upload.discard()
        finishing = self._finishing
        if finishing is not None:
            finishing.cancel()
            await asyncio.gather(finishing, return_exceptions=True)

    async def binary(self, data: bytes) -> None:
        """The next bytes of the upload, or a stray frame."""
        upload = self.upload
        if upload is None:
            if self._drain >= len(data):
                self._drain -= len(data)
                return
            self._drain = 0
            self._strikes += 1
            if self._strikes >= STRAY_STRIKES:
                self.close(CloseCode.POLICY_VIOLATION, "binary frames with no upload")
                return
            self._error(BadFrame("binary frame with no upload: send an upload frame first"), None)
            return
        self._strikes = 0
        try:
            await upload.write(data)
        except Exception as exc:
            self.upload = None
            self._drain = max(0, upload.size - upload.received)
            await self._failed(upload, exc, self.request_id)
            return
        if upload.complete:
            # The last checks (a PDF's text: seconds) run beside the connection's other frames.
            self.upload = None
            self._finishing = asyncio.create_task(self._finish(upload, self.request_id))

    async def _finish(self, upload: Upload, request_id: str | None) -> None:
        try:
            attachment = await upload.finish()
        except asyncio.CancelledError:
            await asyncio.shield(upload.discard())  # the connection closed meanwhile
            raise
        except Exception as exc:
            await self._failed(upload, exc, request_id)
            return
        finally:
            self._finishing = None
        self.deliver(AttachmentEvent(attachment=attachment, request_id=request_id).encode())

    async def _failed(self, upload: Upload, exc: Exception, request_id: str | None) -> None:
        await upload.discard()
        if not isinstance(exc, CortexError):
            log.exception("upload failed", exc_info=exc)
            exc = Internal("internal error while storing the upload")
        self._error(exc, request_id)

    def _error(self, exc: CortexError, request_id: str | None) -> None:
        self.deliver(ErrorEvent(code=exc.code, message=exc.message, request_id=request_id).encode())
