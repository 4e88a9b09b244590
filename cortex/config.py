"""Settings: every value is an environment variable `CORTEX_*` (also read from `.env`).

`Settings()` is built once in `cli.main()` and passed down; tests build their own.
The seed design's names `LLM_DEFAULT_MODEL`, `LLM_USE_MOCK` and `LLM_TIMEOUT` are accepted as
aliases so that deployments written against it keep working.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MOCK_MODEL = "mock"
"""The built-in model: deterministic, no key, no network, same streaming path as real ones."""

# Which default model to pick when a provider key is present but no model is named.
_KEY_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("OPENAI_API_KEY", "gpt-4o-mini"),
    ("ANTHROPIC_API_KEY", "anthropic/claude-3-5-haiku-latest"),
    ("GEMINI_API_KEY", "gemini/gemini-1.5-flash"),
    ("MISTRAL_API_KEY", "mistral/mistral-small-latest"),
    ("GROQ_API_KEY", "groq/llama-3.1-8b-instant"),
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""The chat page, shipped inside the package (a wheel installs it unpacked beside the code)."""

CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Cortex configuration. Field `x` is read from `CORTEX_X`."""

    model_config = SettingsConfigDict(
        env_prefix="CORTEX_", env_file=".env", extra="ignore", populate_by_name=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    database_url: str = "sqlite+aiosqlite:///./cortex.db"

    default_model: str | None = Field(
        default=None, validation_alias=AliasChoices("CORTEX_DEFAULT_MODEL", "LLM_DEFAULT_MODEL")
    )
    use_mock: bool | None = Field(
        default=None, validation_alias=AliasChoices("CORTEX_USE_MOCK", "LLM_USE_MOCK")
    )
    llm_timeout: float = Field(
        default=120.0, gt=0, validation_alias=AliasChoices("CORTEX_LLM_TIMEOUT", "LLM_TIMEOUT")
    )
    llm_api_base: str | None = None
    llm_api_key: str | None = None
    allowed_models: CsvList = Field(default_factory=list)
    fallback_models: CsvList = Field(default_factory=list)
    num_retries: int = Field(default=2, ge=0, le=10)
    stream_idle_timeout: float = Field(default=60.0, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    system_prompt: str = "You are a helpful assistant."
    litellm_remote_cost_map: bool = False
    # Read OpenAI-format streams directly (cortex/llm/direct.py); off: LiteLLM reads every one.
    llm_fast_path: bool = True

    max_message_chars: int = Field(default=32_000, gt=0)
    max_reply_chars: int = Field(default=200_000, ge=1000)  # a reply stops there (too_large)
    max_frame_bytes: int = Field(default=1_048_576, ge=1024)
    checkpoint_ms: int = Field(default=500, ge=10)
    # A reply's deltas go out at most this often (the words in between are joined into the next
    # frame, at exact offsets): each frame costs every subscriber a socket write.
    delta_interval_ms: int = Field(default=50, ge=0, le=1000)
    history_page_max: int = Field(default=200, ge=1)
    send_queue_max: int = Field(default=1024, ge=8)
    send_buffer_bytes: int = Field(default=8 * 1_048_576, ge=65_536)
    rate_per_s: float = Field(default=20.0, gt=0)
    rate_burst: int = Field(default=60, ge=1)
    rate_strikes: int = Field(default=20, ge=1)
    # Bytes a connection may send a second, and in a burst (frames of an upload aside).
    rate_bytes_per_s: int = Field(default=1_048_576, ge=1024)
    rate_bytes_burst: int = Field(default=4 * 1_048_576, ge=1024)
    max_connections: int = Field(default=10_000, ge=1)
    uvloop: bool = True  # `cortex serve` runs on uvloop when it is installed

    max_tool_rounds: int = Field(default=5, ge=1, le=50)
    tool_timeout: float = Field(default=30.0, gt=0)
    tools: CsvList | None = None
    tool_modules: CsvList = Field(default_factory=list)
    shutdown_grace_s: float = Field(default=10.0, ge=0)

    # MCP servers (docs/tools.md): an `mcpServers` JSON file, connected at start.
    mcp_config: Path | None = None
    mcp_connect_timeout: float = Field(default=10.0, gt=0)  # connect + initialize + list tools
    mcp_backoff_s: float = Field(default=1.0, gt=0)  # first reconnect delay; doubles up to 60 s
    tool_result_max_chars: int = Field(default=20_000, ge=100)  # an MCP result is cut there

    # Scale-out (docs/scaling.md): Redis carries events between processes and holds each
    # conversation's reply lease; without it one process serves everything.
    redis_url: SecretStr | None = None
    reply_lease_s: float = Field(default=15.0, ge=1)
    sweep_interval_s: float = Field(default=5.0, gt=0)

    # Attachments (docs/attachments.md): the bytes live in the database, in chunk rows.
    max_attachment_bytes: int = Field(default=20 * 1_048_576, ge=1024)
    max_attachments: int = Field(default=10, ge=1, le=100)
    attachment_quota_bytes: int = Field(default=500 * 1_048_576, ge=1024)
    attachment_ttl_s: float = Field(default=86_400.0, gt=0)  # uploads no message refers to
    vision_models: CsvList = Field(default_factory=list)  # models that take images (`*`: any)

    static_dir: Path = STATIC_DIR
    log_level: str = "INFO"

    # Operations (docs/operations.md).
    log_format: Literal["text", "json"] = "text"
    log_content: bool = False  # message and reply text in logs: off unless asked for
    auto_title: bool = False  # ask the model for a short title after a conversation's first reply
    metrics_public: bool = False  # /metrics without any token (a private network scrapes it)
    metrics_token: SecretStr | None = None  # the one bearer token /metrics accepts, when set

    # Access (docs/auth.md). `auth_tokens` is a SecretStr so that a repr of the settings (a log
    # line, a traceback) never shows a token.
    auth: Literal["auto", "token", "none"] = "auto"
    auth_tokens: SecretStr | None = None
    allowed_origins: CsvList = Field(default_factory=list)
    auth_recheck_s: float = Field(default=30.0, gt=0)

    @field_validator("auth", "log_format", mode="before")
    @classmethod
    def _lower_auth(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator(
        "allowed_models", "fallback_models", "tools", "tool_modules", "vision_models", mode="before"
    )
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def model(self, environ: Mapping[str, str] | None = None) -> str:
        """The model a reply uses when the conversation names none.

        Mock when asked for, or when no model is set and no provider key is present, so that a
        fresh install answers at once.
        """
        if self.use_mock:
            return MOCK_MODEL
        if self.default_model:
            return self.default_model
        env = os.environ if environ is None else environ
        for key, model in _KEY_DEFAULTS:
            if env.get(key):
                return model
        return MOCK_MODEL

    def is_model_allowed(self, model: str, environ: Mapping[str, str] | None = None) -> bool:
        """A client may only pick the default, a fallback, the mock, or an allowed model."""
        if "*" in self.allowed_models:
            return True
        return model in {
            self.model(environ),
            MOCK_MODEL,
            *self.fallback_models,
            *self.allowed_models,
        }
