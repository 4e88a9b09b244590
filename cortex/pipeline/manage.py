"""Conversation management: rename, delete, configure, and titles asked of the model.

Every change is announced to the conversation's subscribers with a `conversation` event (and to
the client that asked, if it is not subscribed), then acknowledged to that client with `ack`.
A conversation that is not the caller's answers `not_found`, exactly like one that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..config import MOCK_MODEL, Settings
from ..errors import BadFrame, CortexError, NotFound
from ..fanout.hub import Hub, Subscriber, user_topic
from ..ops.telemetry import ReplyTrace, Telemetry
from ..protocol import Ack, Configure, ConversationEvent, Delete, Rename
from ..store.repo import default_title
from .views import conversation_view

if TYPE_CHECKING:
    from ..llm.events import Completion
    from ..store.models import Conversation
    from ..store.repo import Store

log = logging.getLogger("cortex.manage")

TITLE_CHARS = 80
TITLE_TIMEOUT_S = 30.0
TITLE_SOURCE_CHARS = 2000  # of the first message and of the first reply, sent to the model
TITLE_PROMPT = (
    "You write short titles for chat conversations. Answer with the title only: at most six "
    "words, in the language of the conversation, no quotes, no final period."
)


class Completer(Protocol):
    """The part of `LlmService` a title needs: one whole (non-streamed) answer."""

    async def complete(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        system_prompt: str | None = None,
    ) -> Completion: ...


class ConversationManager:
    """Renames, deletes and configures conversations; asks for titles when `auto_title` is on."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        abandon: Callable[[str], Awaitable[None]],
        hub: Hub,
        llm: Completer,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.store = store
        self.abandon = abandon  # stops a conversation's reply before it is deleted
        self.hub = hub
        self.llm = llm
        self.telemetry = telemetry
        self._titles: set[asyncio.Task[None]] = set()
        if settings.auto_title:
            telemetry.reply_listeners.append(self._after_reply)

    async def rename(self, owner: str, frame: Rename, client: Subscriber) -> None:
        title = " ".join(frame.title.split())  # one line: no newlines or tabs in a title
        conv = await self.store.update_conversation(frame.conversation_id, owner=owner, title=title)
        if conv is None:
            raise NotFound("no such conversation")
        self._announce(conv, client)
        client.deliver(Ack(conversation_id=conv.id, request_id=frame.request_id).encode())
        self.telemetry.conversation_changed(
            "rename",
            user=owner,
            conversation_id=conv.id,
            title=title if self.settings.log_content else None,
        )

    async def configure(self, owner: str, frame: Configure, client: Subscriber) -> None:
        changes = frame.changes()
        if not changes:
            raise BadFrame("configure needs at least one of model, system_prompt, temperature")
        model = changes.get("model")
        if model is not None and not self.settings.is_model_allowed(model):
            raise BadFrame(f"model {model!r} is not enabled on this server")
        if "system_prompt" in changes and not (changes["system_prompt"] or "").strip():
            changes["system_prompt"] = None  # empty: back to the server's default prompt
        conv = await self.store.update_conversation(frame.conversation_id, owner=owner, **changes)
        if conv is None:
            raise NotFound("no such conversation")
        self._announce(conv, client)
        client.deliver(Ack(conversation_id=conv.id, request_id=frame.request_id).encode())
        prompt = changes.get("system_prompt")
        self.telemetry.conversation_changed(
            "configure",
            user=owner,
            conversation_id=conv.id,
            model=model if "model" in changes else None,
            temperature=changes.get("temperature"),
            system_prompt_chars=len(prompt) if prompt is not None else None,
            reset=",".join(k for k, v in changes.items() if v is None) or None,
        )

    async def delete(self, owner: str, frame: Delete, client: Subscriber) -> None:
        conversation_id = frame.conversation_id
        if await self.store.get_conversation(conversation_id, owner=owner) is None:
            raise NotFound("no such conversation")
        # Stop the reply first, so that nothing writes to the rows being deleted; its
        # subscribers see it end as `cancelled` before they see the conversation go.
        await self.abandon(conversation_id)
        removed = await self.store.delete_conversation(conversation_id, owner=owner)
        if removed is None:
            raise NotFound("no such conversation")  # deleted meanwhile by another request
        await self.abandon(conversation_id)  # a send that slipped in between
        gone = ConversationEvent(conversation_id=conversation_id, deleted=True).encode()
        subscribed = self.hub.is_subscribed(conversation_id, client)
        self.hub.publish(conversation_id, gone)
        if not subscribed:
            client.deliver(gone)
        self.hub.forget(conversation_id)
        self.hub.publish_except(user_topic(owner), gone, client)  # other tabs drop it too
        client.deliver(Ack(conversation_id=conversation_id, request_id=frame.request_id).encode())
        self.telemetry.conversation_changed(
            "delete", user=owner, conversation_id=conversation_id, messages=removed
        )

    def _announce(self, conv: Conversation, client: Subscriber | None) -> None:
        """Send the conversation's new state to its subscribers (and to `client`)."""
        frame = ConversationEvent(
            conversation_id=conv.id, conversation=conversation_view(conv)
        ).encode()
        if client is not None and not self.hub.is_subscribed(conv.id, client):
            client.deliver(frame)
        self.hub.publish(conv.id, frame)
        self.hub.publish_except(user_topic(conv.owner), frame, client)  # other tabs' sidebars

    # ---- automatic titles ---------------------------------------------------------------

    def _after_reply(self, trace: ReplyTrace) -> None:
        """After the first reply of a conversation, ask for a title in the background."""
        if trace.user_seq != 1 or trace.status != "complete" or trace.model == MOCK_MODEL:
            return
        task = asyncio.create_task(
            self._auto_title(trace.conversation_id, trace.model),
            name=f"title:{trace.conversation_id}",
        )
        self._titles.add(task)
        task.add_done_callback(self._titles.discard)

    async def _auto_title(self, conversation_id: str, model: str) -> None:
        try:
            await self._ask_title(conversation_id, model)
        except CortexError:
            log.warning("could not set an automatic title", exc_info=True)

    async def _ask_title(self, conversation_id: str, model: str) -> None:
        conv = await self.store.get_conversation_any(conversation_id)
        if conv is None:
            return
        if conv.active_leaf_id is None:
            return
        rows = await self.store.context(conversation_id, upto_id=conv.active_leaf_id)
        said = next((r.content for r in rows if r.role == "user"), "")
        answered = next((r.content for r in rows if r.role == "assistant" and r.content), "")
        # Only the title a conversation starts with is replaced: one a user set (before this
        # task read the conversation, or while the model thinks) stays.
        automatic = default_title(said)
        if not said or conv.title != automatic:
            return
        prompt = (
            f"User: {said[:TITLE_SOURCE_CHARS]}\n\nAssistant: {answered[:TITLE_SOURCE_CHARS]}"
            "\n\nTitle of this conversation:"
        )
        started = time.monotonic()
        try:
            async with asyncio.timeout(TITLE_TIMEOUT_S):
                answer = await self.llm.complete(
                    [{"role": "user", "content": prompt}],
                    model=model,
                    system_prompt=TITLE_PROMPT,
                    max_tokens=24,
                    temperature=0.2,
                )
        except (CortexError, TimeoutError) as exc:
            code = exc.code if isinstance(exc, CortexError) else "provider_timeout"
            self.telemetry.completion(
                "title",
                conversation_id=conversation_id,
                model=model,
                seconds=time.monotonic() - started,
                error_code=code,
            )
            return
        usage = answer.usage
        self.telemetry.completion(
            "title",
            conversation_id=conversation_id,
            model=model,
            seconds=time.monotonic() - started,
            prompt_tokens=usage.prompt_tokens if usage is not None else None,
            completion_tokens=usage.completion_tokens if usage is not None else None,
            cost_usd=usage.cost_usd if usage is not None else None,
        )
        title = clean_title(answer.text)
        if not title or title == automatic:
            return
        updated = await self.store.set_title_if(conversation_id, expected=automatic, title=title)
        if updated is None:
            return
        self._announce(updated, None)
        self.telemetry.conversation_changed(
            "auto_title",
            user=updated.owner,
            conversation_id=conversation_id,
            title=title if self.settings.log_content else None,
        )

    async def close(self) -> None:
        """Cancel titles still being asked for (shutdown)."""
        tasks = list(self._titles)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def clean_title(text: str) -> str:
    """A model's answer as a title: its first line, without quotes, labels or a final period."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if line.lower().startswith("title:"):
        line = line[6:].strip()
    line = line.strip("\"'`*#_ “”‘’«»").rstrip(".").strip()
    line = " ".join(line.split())
    if len(line) > TITLE_CHARS:
        line = line[: TITLE_CHARS - 1].rstrip() + "…"
    return line
