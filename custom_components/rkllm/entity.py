"""Run a Home Assistant chat log on the engine: the one tool loop behind Assist, AI tasks and agent models.

`async_run_chat_log` turns `chat_log.content` into an engine `ChatRequest` (chat_content.py), streams the engine's
events back into the chat log as deltas (which executes the tool calls, permission-checked: permissions.py), and
repeats while tool results wait for an answer. The conversation entity, the AI task entity and `agent_api`
(agents served as OpenAI models) all go through it. Structured output (structured.py) and quick confirmations
(confirmation.py) hook into the loop.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from homeassistant.components import conversation
from homeassistant.config_entries import ConfigSubentry
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import llm
from homeassistant.helpers.entity import Entity

from rkllm_engine.engine import Engine
from rkllm_engine.types import (
    ChatRequest,
    EngineError,
    Finished,
    Priority,
    QueueFullError,
    ReasoningDelta,
    Sampling,
    TextDelta,
    ToolCallEnd,
    ToolCallStart,
    ToolChoice,
    Usage,
)

from .chat_content import SentTranscript, chat_content_to_messages, format_tool, parse_tool_arguments, trim_history
from .compat import assistant_delta, llm_api_ids
from .confirmation import async_quick_confirm
from .const import (
    CONF_ENABLE_THINKING,
    CONF_MAX_HISTORY,
    CONF_MAX_NEW_TOKENS,
    CONF_MAX_TOOL_ITERATIONS,
    CONF_PROMPT,
    CONF_QUICK_CONFIRMATIONS,
    CONF_REPEAT_PENALTY,
    CONF_TEMPERATURE,
    CONF_TOP_K,
    CONF_TOP_P,
    DEFAULT_ENABLE_THINKING,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_TOOL_ITERATIONS,
    DEFAULT_QUICK_CONFIRMATIONS,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    DOMAIN,
    LOGGER,
)
from .data import RkllmConfigEntry
from .device import model_description
from .permissions import with_permission_checks
from .structured import StructuredOutput, with_structure_instruction

# Translation keys of the engine's error codes (types.py `EngineError.code`).
ENGINE_ERROR_KEYS: Final = frozenset(
    {
        "queue_full",
        "unavailable",
        "worker_crashed",
        "worker_hung",
        "context_length_exceeded",
        "generation_error",
        "invalid_request",
    }
)


class EngineTurnError(HomeAssistantError):
    """A turn failed in the engine; translated for speech, with the engine's code for HTTP callers."""

    def __init__(self, error: EngineError) -> None:
        code = error.code if error.code in ENGINE_ERROR_KEYS else "generation_error"
        super().__init__(
            translation_domain=DOMAIN, translation_key=code, translation_placeholders={"error": str(error)}
        )
        self.code = code
        self.engine_error = error
        self.retry_after_s: float | None = error.retry_after_s if isinstance(error, QueueFullError) else None


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """The options of one agent (subentry), with defaults for keys an older subentry lacks."""

    prompt: str | None
    llm_apis: list[str]
    sampling: Sampling
    max_new_tokens: int
    enable_thinking: bool
    max_history: int
    max_tool_iterations: int
    quick_confirmations: bool = DEFAULT_QUICK_CONFIRMATIONS

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AgentSettings:
        """Read a subentry's data."""
        return cls(
            prompt=options.get(CONF_PROMPT),
            llm_apis=llm_api_ids(options.get(CONF_LLM_HASS_API)),
            sampling=Sampling(
                temperature=float(options.get(CONF_TEMPERATURE, DEFAULT_TEMPERATURE)),
                top_p=float(options.get(CONF_TOP_P, DEFAULT_TOP_P)),
                top_k=int(options.get(CONF_TOP_K, DEFAULT_TOP_K)),
                repeat_penalty=float(options.get(CONF_REPEAT_PENALTY, DEFAULT_REPEAT_PENALTY)),
            ),
            max_new_tokens=int(options.get(CONF_MAX_NEW_TOKENS, DEFAULT_MAX_NEW_TOKENS)),
            enable_thinking=bool(options.get(CONF_ENABLE_THINKING, DEFAULT_ENABLE_THINKING)),
            max_history=int(options.get(CONF_MAX_HISTORY, DEFAULT_MAX_HISTORY)),
            max_tool_iterations=max(1, int(options.get(CONF_MAX_TOOL_ITERATIONS, DEFAULT_MAX_TOOL_ITERATIONS))),
            quick_confirmations=bool(options.get(CONF_QUICK_CONFIRMATIONS, DEFAULT_QUICK_CONFIRMATIONS)),
        )


@dataclass(slots=True)
class TurnUsage:
    """Token usage summed over every engine call of one turn (a tool loop makes several)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine_calls: int = 0

    def add(self, usage: Usage) -> None:
        """Count one engine call."""
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cached_tokens += usage.cached_tokens
        self.engine_calls += 1

    def as_usage(self) -> Usage:
        """The sum as the engine's Usage type (what the OpenAI views report)."""
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


# ---------------------------------------------------------------------------------------------------------------
# The tool loop
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TurnClock:
    """A conversation turn's clock: from the command to the first spoken text (the voice response sensor)."""

    engine: Engine
    voice: bool
    started: float = dataclasses.field(default_factory=time.monotonic)
    answered: bool = False

    def spoken(self) -> None:
        """The first text of the turn reached the chat log (and the TTS): report it once."""
        if not self.answered:
            self.answered = True
            if self.voice:
                self.engine.record_voice_response(time.monotonic() - self.started)


async def _engine_deltas(
    engine: Engine,
    request: ChatRequest,
    *,
    tools_enabled: bool,
    usage: TurnUsage,
    sent: SentTranscript,
    clock: TurnClock,
) -> AsyncIterator[conversation.AssistantContentDeltaDict]:
    """Stream one engine generation as chat-log deltas: role first, then text, thinking and tool calls."""
    try:
        generation = engine.submit(request)
    except EngineError as err:
        raise EngineTurnError(err) from err
    yield {"role": "assistant"}
    names: dict[int, tuple[str, str]] = {}
    try:
        async with generation:
            async for event in generation:
                delta: conversation.AssistantContentDeltaDict | None = None
                if isinstance(event, TextDelta):
                    delta = assistant_delta(content=event.text)
                    clock.spoken()
                elif isinstance(event, ReasoningDelta):
                    delta = assistant_delta(thinking=event.text)
                elif isinstance(event, ToolCallStart):
                    names[event.index] = (event.id, event.name)
                elif isinstance(event, ToolCallEnd):
                    call_id, name = names.pop(event.index, (f"call_{event.index}", ""))
                    if not tools_enabled:
                        LOGGER.debug("Dropping tool call %s: no LLM API is selected for this agent", name)
                        continue
                    tool_input = llm.ToolInput(
                        tool_name=name, tool_args=parse_tool_arguments(name, event.arguments), id=call_id
                    )
                    sent.remember_arguments(call_id, event.arguments)
                    delta = assistant_delta(tool_calls=[tool_input])
                elif isinstance(event, Finished):
                    usage.add(event.usage)
                if delta is not None:
                    yield delta
    except EngineError as err:
        raise EngineTurnError(err) from err


async def async_run_chat_log(
    hass: HomeAssistant,
    engine: Engine,
    chat_log: conversation.ChatLog,
    *,
    agent_id: str,
    settings: AgentSettings,
    structure: StructuredOutput | None = None,
    priority: Priority = Priority.CONVERSATION,
    sent: SentTranscript | None = None,
) -> TurnUsage:
    """Generate the assistant's answer to the chat log, executing tool calls, until nothing is left to answer.

    Up to `max_tool_iterations` engine calls may call tools; if tool results are still unanswered after that,
    one last call with `tool_choice="none"` makes the model answer in words.
    """
    usage = TurnUsage()
    sent = sent if sent is not None else SentTranscript()
    # One id for the turn's rounds: the engine keeps its slot for the tool results (docs/voice.md §1).
    turn_id = uuid.uuid4().hex
    clock = TurnClock(engine, voice=priority is Priority.CONVERSATION)
    if chat_log.llm_api is not None:
        chat_log.llm_api = with_permission_checks(chat_log.llm_api, sent)
    api = chat_log.llm_api
    serializer = api.custom_serializer if api is not None else None
    tools = [format_tool(tool, serializer) for tool in api.tools] if api is not None else []
    for iteration in range(settings.max_tool_iterations + 1):
        tool_choice: ToolChoice = "auto" if iteration < settings.max_tool_iterations else "none"
        messages, dynamic_context = chat_content_to_messages(chat_log.content, sent)
        messages = trim_history(messages, settings.max_history)
        if structure is not None:
            messages = with_structure_instruction(messages, structure)
        request = ChatRequest(
            messages=messages,
            tools=tools,
            tool_choice=tool_choice if tools else "auto",
            sampling=settings.sampling,
            max_new_tokens=settings.max_new_tokens,
            enable_thinking=settings.enable_thinking,
            dynamic_context=dynamic_context,
            priority=priority,
            json_mode=structure is not None,
            turn_id=turn_id,
        )
        stream = _engine_deltas(
            engine,
            request,
            tools_enabled=api is not None and tool_choice != "none",
            usage=usage,
            sent=sent,
            clock=clock,
        )
        try:
            async for _content in chat_log.async_add_delta_content_stream(agent_id, stream):
                pass
        except BaseException:
            engine.end_turn(turn_id)
            raise
        if not chat_log.unresponded_tool_results:
            break
        if settings.quick_confirmations and structure is None and await async_quick_confirm(hass, chat_log, agent_id):
            clock.spoken()  # Home Assistant's own sentence (confirmation.py) is the turn's first spoken text
            break
    engine.end_turn(turn_id)
    return usage


# ---------------------------------------------------------------------------------------------------------------
# The base entity
# ---------------------------------------------------------------------------------------------------------------


class RkllmBaseLLMEntity(Entity):
    """Base of the conversation and AI task entities: one device per subentry, the shared tool loop."""

    _attr_has_entity_name = True
    _attr_name = None

    def __init__(self, entry: RkllmConfigEntry, subentry: ConfigSubentry) -> None:
        self.entry = entry
        self.subentry = subentry
        self._sent_transcript = SentTranscript()
        self._attr_unique_id = subentry.subentry_id
        runtime = entry.runtime_data
        self._attr_device_info = dr.DeviceInfo(
            identifiers={(DOMAIN, subentry.subentry_id)},
            name=subentry.title,
            manufacturer="Rockchip",
            model=model_description(runtime),
            sw_version=runtime.runtime_version,
            entry_type=dr.DeviceEntryType.SERVICE,
        )

    @property
    def settings(self) -> AgentSettings:
        """This agent's options."""
        return AgentSettings.from_options(self.subentry.data)

    async def _async_handle_chat_log(
        self,
        chat_log: conversation.ChatLog,
        structure: StructuredOutput | None = None,
        priority: Priority = Priority.CONVERSATION,
    ) -> TurnUsage:
        """Answer the chat log with this agent's settings on the entry's engine."""
        return await async_run_chat_log(
            self.hass,
            self.entry.runtime_data.engine,
            chat_log,
            agent_id=self.entity_id,
            settings=self.settings,
            structure=structure,
            priority=priority,
            sent=self._sent_transcript,
        )
