"""One error root for Cortex; each subclass has a stable wire `code`.

    CortexError
    ├── ProtocolError
    │   ├── BadJson          bad_json      the frame is not JSON text
    │   ├── BadFrame         bad_frame     JSON, but a field is missing or invalid
    │   ├── UnknownType      unknown_type  `type` names no frame
    │   └── TooLarge         too_large     a message longer than the limit
    ├── NotFound             not_found     no such conversation (or not the caller's)
    ├── BadAttachment        bad_attachment   a file refused by its bytes (type, bomb, encoding)
    ├── QuotaExceeded        quota_exceeded   the user's attachments would pass their quota
    ├── Forbidden            forbidden
    ├── RateLimited          rate_limited
    ├── ProviderError        provider_error   the model provider failed
    │   └── ProviderTimeout  provider_timeout the provider stalled or took too long
    ├── Unavailable          unavailable   shutting down: try again (another process)
    ├── ToolError            tool_error
    ├── Internal             internal
    └── StartupError         startup       the server cannot start: bad settings or
        ├── AuthConfigError  auth_config   surroundings, said in one line (exit 2)
        └── DatabaseTooNew   database_too_new

Third-party exceptions are mapped to these at one boundary each (`llm.py` for LiteLLM,
`store/` for SQLAlchemy) with `raise ... from exc`.
"""

from __future__ import annotations


class CortexError(Exception):
    """Root of every error Cortex reports to a client."""

    code = "internal"

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code.replace("_", " "))

    @property
    def message(self) -> str:
        return str(self)


class ProtocolError(CortexError):
    code = "bad_frame"
    request_id: str | None = None  # the frame's, when it could be read (echoed in the error)


class BadJson(ProtocolError):
    code = "bad_json"


class BadFrame(ProtocolError):
    code = "bad_frame"


class UnknownType(ProtocolError):
    code = "unknown_type"


class TooLarge(ProtocolError):
    code = "too_large"


class NotFound(CortexError):
    code = "not_found"


class BadAttachment(CortexError):
    """An uploaded file refused by what its bytes are (attachments: docs/attachments.md)."""

    code = "bad_attachment"


class QuotaExceeded(CortexError):
    code = "quota_exceeded"


class Forbidden(CortexError):
    code = "forbidden"


class RateLimited(CortexError):
    code = "rate_limited"


class ProviderError(CortexError):
    code = "provider_error"


class ProviderTimeout(ProviderError):
    code = "provider_timeout"


class Unavailable(CortexError):
    code = "unavailable"


class ToolError(CortexError):
    code = "tool_error"


class Internal(CortexError):
    code = "internal"


class StartupError(CortexError):
    """The server cannot start (a setting, a folder, a port): `cortex` prints it, exit 2."""

    code = "startup"


class DatabaseTooNew(StartupError):
    """The database is at a revision this Cortex does not know: a newer one migrated it."""

    code = "database_too_new"
