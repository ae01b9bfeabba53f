"""Conversation agents served as OpenAI models: the API views run the very same turn as Assist.

`agent_models` lists one model per loaded conversation agent; `async_run_agent` answers an OpenAI-style history
with that agent's `async_handle_turn` - the same LLM API tools, permission checks, tool loop and error mapping
as an Assist turn, executed server-side with the caller's context.

How an OpenAI history maps onto Home Assistant's chat log (every request is its own chat session; the client
owns the history, HA's 5-minute conversation memory is not used):
- `system`/`developer` messages are joined into the turn's `extra_system_prompt`, which HA appends after the
  agent's own instructions and the LLM API prompt;
- `user` → UserContent; `assistant` → AssistantContent (its `tool_calls` become ToolInputs with the client's
  ids); `tool` → ToolResultContent (JSON content is decoded, other text is wrapped as `{"result": text}`);
- the last message must be a `user` message: it is the turn's input (`ConversationInput.text`);
- the agent's tools are its LLM APIs; tools sent by the client are not used for agent models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from homeassistant.components import conversation
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import chat_session, intent, llm
from homeassistant.util import slugify

from rkllm_engine.types import ChatMessage, Priority, Usage

from .compat import build_conversation_input, tool_result_content
from .const import AGENT_MODEL_PREFIX, DOMAIN, LOGGER
from .conversation import RkllmConversationEntity


class AgentRequestError(HomeAssistantError):
    """The request cannot be run as given (for HTTP: 400 with this message)."""


@dataclass(frozen=True, slots=True)
class AgentModel:
    """One conversation agent as /v1/models lists it."""

    model_id: str  # e.g. "rkllm-agent-living-room"
    entity_id: str  # conversation.xxx
    title: str
    llm_apis: tuple[str, ...]
    entry_id: str
    subentry_id: str


AgentDeltaKind = Literal["text", "reasoning", "tool_call", "tool_result"]


@dataclass(frozen=True, slots=True)
class AgentDelta:
    """Something the agent did while answering: visible text, reasoning, a tool call or a tool's result."""

    kind: AgentDeltaKind
    text: str = ""
    tool_call_id: str | None = None
    tool_name: str | None = None
    tool_args: dict[str, Any] | None = None
    tool_result: Any = None


@dataclass(frozen=True, slots=True)
class AgentResult:
    """The final answer of a turn and the tokens it cost (summed over every engine call of the tool loop)."""

    text: str
    usage: Usage
    conversation_id: str
    tool_calls: int


def _loaded_agents(hass: HomeAssistant) -> dict[str, RkllmConversationEntity]:
    """The conversation agents of every loaded entry (each entry's runtime data holds its own)."""
    agents: dict[str, RkllmConversationEntity] = {}
    for entry in hass.config_entries.async_loaded_entries(DOMAIN):
        agents.update(
            (entity_id, agent)
            for entity_id, agent in entry.runtime_data.agents.items()
            if isinstance(agent, RkllmConversationEntity)
        )
    return agents


def agent_models(hass: HomeAssistant) -> list[AgentModel]:
    """Every loaded conversation agent as a model; ids are slugs of the agent names, unique among them."""
    agents = sorted(_loaded_agents(hass).values(), key=lambda agent: (agent.subentry.title, agent.entity_id))
    slugs = [slugify(agent.subentry.title, separator="-") or agent.subentry.subentry_id for agent in agents]
    models: list[AgentModel] = []
    for agent, slug in zip(agents, slugs, strict=True):
        unique_slug = slug if slugs.count(slug) == 1 else f"{slug}-{agent.subentry.subentry_id[-6:].lower()}"
        models.append(
            AgentModel(
                model_id=f"{AGENT_MODEL_PREFIX}{unique_slug}",
                entity_id=agent.entity_id,
                title=agent.subentry.title,
                llm_apis=tuple(agent.settings.llm_apis),
                entry_id=agent.entry.entry_id,
                subentry_id=agent.subentry.subentry_id,
            )
        )
    return models


def _tool_result_data(content: str | None) -> Any:
    """A tool message's content as the chat log stores results: decoded JSON object, else wrapped text."""
    text = content or ""
    try:
        decoded = json.loads(text)
    except ValueError:
        return {"result": text}
    return decoded if isinstance(decoded, dict) else {"result": decoded}


def _tool_args(arguments: str) -> dict[str, Any]:
    try:
        decoded = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return decoded if isinstance(decoded, dict) else {}


def history_to_chat_content(
    messages: Sequence[ChatMessage], agent_id: str
) -> tuple[str | None, list[conversation.Content], str]:
    """(extra system prompt, earlier content, final user text) of an OpenAI history; AgentRequestError if unusable."""
    if not messages or messages[-1].role != "user" or not (messages[-1].content or "").strip():
        raise AgentRequestError("the last message must be a user message with text")
    system_parts: list[str] = []
    content: list[conversation.Content] = []
    call_names: dict[str, str] = {}
    for message in messages[:-1]:
        if message.role == "system":
            if message.content:
                system_parts.append(message.content)
        elif message.role == "user":
            content.append(conversation.UserContent(content=message.content or ""))
        elif message.role == "assistant":
            calls = [
                llm.ToolInput(tool_name=call.name, tool_args=_tool_args(call.arguments), id=call.id)
                for call in message.tool_calls
            ]
            call_names.update((call.id, call.name) for call in message.tool_calls)
            if message.content or calls:
                content.append(
                    conversation.AssistantContent(agent_id=agent_id, content=message.content, tool_calls=calls or None)
                )
        elif message.role == "tool":
            if message.tool_call_id is None or message.tool_call_id not in call_names:
                raise AgentRequestError("a tool message must answer a tool call of an earlier assistant message")
            content.append(
                tool_result_content(
                    agent_id=agent_id,
                    tool_call_id=message.tool_call_id,
                    tool_name=message.name or call_names[message.tool_call_id],
                    data=_tool_result_data(message.content),
                )
            )
    return ("\n\n".join(system_parts) or None), content, messages[-1].content or ""


class _DeltaReporter:
    """Turns chat-log deltas into AgentDeltas for the caller; a failing callback never breaks the turn."""

    def __init__(self, on_delta: Callable[[AgentDelta], None]) -> None:
        self._on_delta = on_delta
        self.tool_calls = 0

    def __call__(self, chat_log: conversation.ChatLog, delta: dict[str, Any]) -> None:
        for item in self._convert(delta):
            try:
                self._on_delta(item)
            except Exception:  # noqa: BLE001 - a caller's bug must not abort the user's turn
                LOGGER.exception("Agent delta callback failed")

    def _convert(self, delta: dict[str, Any]) -> list[AgentDelta]:
        if delta.get("role") == "tool_result" or "tool_result" in delta:
            return [
                AgentDelta(
                    kind="tool_result",
                    tool_call_id=delta.get("tool_call_id"),
                    tool_name=delta.get("tool_name"),
                    tool_result=delta.get("tool_result"),
                )
            ]
        items: list[AgentDelta] = []
        if thinking := delta.get("thinking_content"):
            items.append(AgentDelta(kind="reasoning", text=thinking))
        if text := delta.get("content"):
            items.append(AgentDelta(kind="text", text=text))
        for call in delta.get("tool_calls") or ():
            self.tool_calls += 1
            items.append(
                AgentDelta(kind="tool_call", tool_call_id=call.id, tool_name=call.tool_name, tool_args=call.tool_args)
            )
        return items


async def async_run_agent(
    hass: HomeAssistant,
    entity_id: str,
    messages: list[ChatMessage],
    *,
    context: Context,
    on_delta: Callable[[AgentDelta], None],
) -> AgentResult:
    """Answer `messages` as the agent `entity_id`; raises HomeAssistantError subclasses (translated).

    Engine failures raise `entity.EngineTurnError` (with `.code` and `.retry_after_s`), unusable input raises
    AgentRequestError, an unknown agent a translated HomeAssistantError.
    """
    agent = _loaded_agents(hass).get(entity_id)
    if agent is None:
        raise HomeAssistantError(
            translation_domain=DOMAIN, translation_key="agent_not_found", translation_placeholders={"agent": entity_id}
        )
    extra_system_prompt, earlier, text = history_to_chat_content(messages, entity_id)
    reporter = _DeltaReporter(on_delta)
    with (
        chat_session.async_get_chat_session(hass) as session,
        conversation.async_get_chat_log(hass, session, None, chat_log_delta_listener=reporter) as chat_log,
    ):
        chat_log.content.extend(earlier)
        chat_log.async_add_user_content(conversation.UserContent(content=text))
        user_input = build_conversation_input(
            text=text,
            context=context,
            conversation_id=session.conversation_id,
            language=hass.config.language,
            agent_id=entity_id,
            extra_system_prompt=extra_system_prompt,
        )
        result, usage = await agent.async_handle_turn(user_input, chat_log, priority=Priority.API)
    speech = result.response.speech.get("plain", {}).get("speech", "")
    if result.response.response_type == intent.IntentResponseType.ERROR:
        raise HomeAssistantError(speech or "the agent could not answer")
    return AgentResult(
        text=speech,
        usage=usage.as_usage(),
        conversation_id=session.conversation_id,
        tool_calls=reporter.tool_calls,
    )
