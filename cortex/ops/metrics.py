"""Prometheus metrics of one Cortex process (`GET /metrics`), on a registry of its own.

Each `Cortex` app builds its own `Metrics` (no import-time global registry), so tests and several
apps in one process never share counters. The hot path stays cheap: frames are counted as plain
integers read at scrape time (no `labels()` lookup or lock per frame or per delta), and per-reply
figures are recorded once, when the reply ends. Every metric is listed in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..protocol import INBOUND_TYPES, OUTBOUND_TYPES

INVALID = "invalid"  # inbound frames that did not parse (bad JSON, unknown type, ...)
RATE_LIMITED = "rate_limited"  # inbound frames refused unread by the per-connection rate limit
OTHER = "other"
UNKNOWN_TOOL = "unknown"  # a tool call naming no registered tool
MAX_LABELS = 64  # past this many distinct models (or tools), further ones count as "other"

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0)
DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TOOL_BUCKETS = (0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0)
_TYPE_PREFIX = '{"type":"'


class Metrics:
    """Every metric Cortex exports, registered on `registry` (a new one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # `*_created` series double the output and Prometheus does not need them. (The switch
        # is the library's, process-wide; it only changes what new metrics expose.)
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in the library
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Gauge("cortex_build_info", "Cortex version", ["version"], registry=r).labels(
            __version__
        ).set(1)
        self.connections_open = Gauge(
            "cortex_connections_open", "WebSocket connections open now", registry=r
        )
        self.connections = Counter(
            "cortex_connections", "WebSocket connections accepted", registry=r
        )
        self.subscriptions = Gauge(
            "cortex_subscriptions", "Subscriptions of connections to conversations", registry=r
        )
        self.replies_in_progress = Gauge(
            "cortex_replies_in_progress", "Conversations generating a reply now", registry=r
        )
        self._frames = _FrameCounts()  # cortex_frames_in_total, cortex_frames_out_total
        r.register(self._frames)
        self.replies = Counter(
            "cortex_replies", "Replies by model and final status", ["model", "status"], registry=r
        )
        self.first_token = Histogram(
            "cortex_reply_first_token_seconds",
            "From the start of a reply to its first streamed text",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "cortex_reply_duration_seconds",
            "From the start of a reply to its end (tool rounds included)",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.provider_errors = Counter(
            "cortex_provider_errors",
            "Model calls that failed, by error code",
            ["model", "code"],
            registry=r,
        )
        self.tokens = Counter(
            "cortex_tokens",
            "Tokens by model; kind is prompt (in) or completion (out)",
            ["model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "cortex_cost_usd",
            "Provider cost in US dollars (priced models only)",
            ["model"],
            registry=r,
        )
        self.tool_calls = Counter(
            "cortex_tool_calls",
            "Tool calls by tool and outcome (ok, error)",
            ["tool", "outcome"],
            registry=r,
        )
        self.tool_seconds = Histogram(
            "cortex_tool_call_seconds",
            "Tool call duration",
            ["tool"],
            buckets=TOOL_BUCKETS,
            registry=r,
        )
        # MCP servers (docs/tools.md); a server name comes from the operator's file, never a
        # client, so it is a bounded label.
        self.mcp_calls = Counter(
            "cortex_mcp_calls",
            "MCP tool calls by server and outcome (ok, error, timeout)",
            ["server", "outcome"],
            registry=r,
        )
        self.mcp_seconds = Histogram(
            "cortex_mcp_call_seconds",
            "MCP tool call duration by server",
            ["server"],
            buckets=TOOL_BUCKETS,
            registry=r,
        )
        self.mcp_reconnects = Counter(
            "cortex_mcp_reconnects", "MCP reconnect attempts by server", ["server"], registry=r
        )
        self.mcp_up = Gauge(
            "cortex_mcp_up", "1 while an MCP server is connected", ["server"], registry=r
        )
        self._db = Histogram(
            "cortex_db_operation_seconds",
            "Database operation latency, by store method",
            ["operation"],
            buckets=DB_BUCKETS,
            registry=r,
        )
        self._db_ops: dict[str, Histogram] = {}
        self._models: set[str] = set()
        self._tools: Container[str] = set()

    # ---- gauges read at scrape time -----------------------------------------------------

    def watch(self, *, subscriptions: Callable[[], float], replies: Callable[[], float]) -> None:
        """Read these gauges from the app's state when scraped, not on every change."""
        self.subscriptions.set_function(subscriptions)
        self.replies_in_progress.set_function(replies)

    # ---- hot path -----------------------------------------------------------------------

    def frame_in(self, kind: str) -> None:
        counts = self._frames.inbound
        counts[kind if kind in counts else INVALID] += 1

    def frame_out(self, frame: str) -> None:
        """Count one encoded frame by its type; every server frame starts with its type."""
        counts = self._frames.outbound
        kind = frame[9 : frame.find('"', 9)] if frame.startswith(_TYPE_PREFIX) else OTHER
        counts[kind if kind in counts else OTHER] += 1

    def observe_db(self, operation: str, seconds: float) -> None:
        child = self._db_ops.get(operation)
        if child is None:
            child = self._db_ops[operation] = self._db.labels(operation)
        child.observe(seconds)

    # ---- once per reply -----------------------------------------------------------------

    def model_label(self, model: str) -> str:
        """The model as a label value; bounded, in case every model is allowed (`*`)."""
        return _bounded(model, self._models)

    def reply(
        self,
        *,
        model: str,
        status: str,
        first_token_s: float | None,
        duration_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float | None,
        error_codes: Iterable[str],
    ) -> None:
        label = self.model_label(model)
        self.replies.labels(label, status).inc()
        if first_token_s is not None:
            self.first_token.labels(label).observe(first_token_s)
        self.duration.labels(label).observe(duration_s)
        self.usage(
            model=model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost_usd,
            error_codes=error_codes,
        )

    def usage(
        self,
        *,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float | None,
        error_codes: Iterable[str] = (),
    ) -> None:
        """Tokens, cost and provider errors of a model call (a reply, or a title request)."""
        label = self.model_label(model)
        if prompt_tokens:
            self.tokens.labels(label, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(label, "completion").inc(completion_tokens)
        if cost_usd:
            self.cost.labels(label).inc(cost_usd)
        for code in error_codes:
            self.provider_errors.labels(label, code).inc()

    def known_tools(self, names: Container[str]) -> None:
        """The tools the server offers: the only names a tool label takes. A live view (the
        registry's `known`) also labels the tools of MCP servers, which connect later."""
        self._tools = names

    def tool_call(self, name: str, ok: bool, seconds: float) -> None:
        # The name comes from the model, which may make one up (under prompt injection, say):
        # only a registered tool is a label of its own.
        label = name if name in self._tools else UNKNOWN_TOOL
        self.tool_calls.labels(label, "ok" if ok else "error").inc()
        self.tool_seconds.labels(label).observe(seconds)

    def mcp_call(self, server: str, outcome: str, seconds: float) -> None:
        self.mcp_calls.labels(server, outcome).inc()
        self.mcp_seconds.labels(server).observe(seconds)

    def mcp_reconnect(self, server: str) -> None:
        self.mcp_reconnects.labels(server).inc()

    def mcp_state(self, server: str, *, up: bool) -> None:
        self.mcp_up.labels(server).set(1 if up else 0)

    # ---- exposition ---------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _bounded(value: str, seen: set[str]) -> str:
    if value in seen:
        return value
    if len(seen) >= MAX_LABELS:
        return OTHER
    seen.add(value)
    return value


class _FrameCounts(Collector):
    """Frames in and out by type, as plain integers read at scrape time.

    Every frame sent to every subscriber is counted, so this is a dict increment (about 30 ns)
    rather than a prometheus-client counter, which takes a lock (about 230 ns). Everything runs on
    the event loop's thread, the scrape included.
    """

    def __init__(self) -> None:
        self.inbound = dict.fromkeys((*sorted(INBOUND_TYPES), INVALID, RATE_LIMITED), 0)
        self.outbound = dict.fromkeys((*OUTBOUND_TYPES, OTHER), 0)

    def collect(self) -> Iterator[Metric]:
        for name, doc, counts in (
            ("cortex_frames_in", "Frames received from clients, by type", self.inbound),
            ("cortex_frames_out", "Frames sent to clients, by type", self.outbound),
        ):
            family = CounterMetricFamily(name, doc, labels=["type"])
            for kind, count in counts.items():
                family.add_metric([kind], count)
            yield family
