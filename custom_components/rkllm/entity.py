"""Run a Home Assistant chat log on the engine: the one tool loop behind Assist, AI tasks and agent models.

`async_run_chat_log` turns `chat_log.content` into an engine `ChatRequest`, streams the engine's events back
into the chat log as deltas (which executes the tool calls), and repeats while tool results wait for an answer.
The conversation entity, the AI task entity and `agent_api` (agents served as OpenAI models) all go through it.

How the chat log maps onto a request:
- The rendered system prompt is split: the date/time line(s) HA renders from `llm.BASE_PROMPT` (2025.4) or
  `llm.DATE_TIME_PROMPT` (2025.8+) - "Current time is HH:MM:SS. Today's date is YYYY-MM-DD." - are detected by
  that rendered pattern and moved to `ChatRequest.dynamic_context`, so the static prefix (instructions, Assist
  API prompt, tools) stays identical between requests and resident in the NPU's KV cache. A custom prompt that
  renders other changing values keeps them in the prefix (and pays a full prefill each time).
- History is trimmed to the last `max_history` user turns; cuts happen only at user messages, so an assistant
  tool call and its results always stay together, and tool results whose call was cut are dropped.
- Tool results go back as JSON; long error texts (e.g. a MatchFailedError repr of ~600 characters) are shortened
  to one sentence a small model can act on ("No entity named Bathroom Fan").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import voluptuous as vol
from homeassistant.auth.permissions.const import POLICY_CONTROL
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigSubentry
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import intent, llm
from homeassistant.helpers.entity import Entity
from homeassistant.util.json import JsonObjectType

from rkllm_engine.engine import Engine
from rkllm_engine.types import (
    ChatMessage,
    ChatRequest,
    EngineError,
    Finished,
    Priority,
    QueueFullError,
    ReasoningDelta,
    Sampling,
    TextDelta,
    ToolCall,
    ToolCallEnd,
    ToolCallStart,
    ToolChoice,
    Usage,
)

from .compat import (
    assistant_delta,
    intent_handler_for_tool,
    llm_api_ids,
    schema_to_json_schema,
    selector_serializer,
    tool_result_payload,
)
from .const import (
    CONF_ENABLE_THINKING,
    CONF_MAX_HISTORY,
    CONF_MAX_NEW_TOKENS,
    CONF_MAX_TOOL_ITERATIONS,
    CONF_PROMPT,
    CONF_REPEAT_PENALTY,
    CONF_TEMPERATURE,
    CONF_TOP_K,
    CONF_TOP_P,
    DEFAULT_ENABLE_THINKING,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_TOOL_ITERATIONS,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    DOMAIN,
    LOGGER,
)
from .data import RkllmConfigEntry, RkllmRuntimeData

# HA's rendered date/time prompt (helpers/llm.py BASE_PROMPT / DATE_TIME_PROMPT), one line.
DATE_TIME_LINE: Final = re.compile(
    r"^Current time is \d{1,2}:\d{2}(?::\d{2})?\. Today's date is \d{4}-\d{2}-\d{2}\.[ \t]*(?:\n|$)", re.MULTILINE
)
_CODE_FENCE: Final = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)
# Errors longer than this are shortened before the model reads them.
MAX_TOOL_ERROR_CHARS: Final = 200
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


class SentTranscript:
    """What the engine saw of recent tool calls and results, by call id, so history is re-sent byte for byte.

    The chat log keeps repaired call arguments (empty values dropped), and Home Assistant later writes the spoken
    answer into the intent response a tool result refers to (2025.8+). Re-sending either in its changed form
    would make the history differ from the runtime's resident KV state, so the engine would rebuild the whole
    conversation instead of continuing it. Bounded: only the last few turns matter.
    """

    def __init__(self, max_items: int = 256) -> None:
        self._max_items = max_items
        self._texts: OrderedDict[tuple[str, str], str] = OrderedDict()

    def _put(self, key: tuple[str, str], text: str) -> None:
        self._texts[key] = text
        self._texts.move_to_end(key)
        while len(self._texts) > self._max_items:
            self._texts.popitem(last=False)

    def remember_arguments(self, call_id: str, arguments: str) -> None:
        """Record the arguments text the model generated for a call."""
        self._put(("arguments", call_id), arguments)

    def arguments(self, call_id: str) -> str | None:
        """The generated arguments text, or None for calls this agent did not generate (or forgot)."""
        return self._texts.get(("arguments", call_id))

    def result_text(self, call_id: str, render: Callable[[], str]) -> str:
        """The result text first sent for this call (rendered and remembered on first use)."""
        key = ("result", call_id)
        if (text := self._texts.get(key)) is None:
            text = render()
            self._put(key, text)
        return text


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """An AI task's requested structure: validated after the turn, described to the model in the user turn."""

    schema: vol.Schema
    json_schema: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Chat log → engine messages
# ---------------------------------------------------------------------------------------------------------------


def split_dynamic_context(system_prompt: str) -> tuple[str, str | None]:
    """(static prompt, dynamic context): HA's rendered date/time line(s) move out of the cacheable prefix."""
    found = [match.group(0).strip() for match in DATE_TIME_LINE.finditer(system_prompt)]
    if not found:
        return system_prompt, None
    static = DATE_TIME_LINE.sub("", system_prompt).strip("\n")
    return static, "\n".join(found)


_MATCH_REASON: Final = re.compile(r"no_match_reason=<MatchFailedReason\.(\w+)")
_NO_MATCH_NAME: Final = re.compile(r"no_match_name=(?:'([^']*)'|\"([^\"]*)\")")


def _constraint(text: str, key: str) -> str | None:
    """A string constraint from a MatchTargetsConstraints repr (`name='Bathroom Fan'`)."""
    match = re.search(rf"\b{key}=(?:'([^']*)'|\"([^\"]*)\")", text)
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


def _domains(text: str) -> str | None:
    match = re.search(r"\bdomains=[\[{(]([^\]})]*)[\]})]", text)
    if match is None:
        return None
    names = re.findall(r"'([^']*)'", match.group(1))
    return " or ".join(names) or None


def short_match_failure(text: str) -> str | None:
    """One sentence for HA's MatchFailedError repr, or None when `text` is not one."""
    reason_match = _MATCH_REASON.search(text)
    if reason_match is None:
        return None
    reason = reason_match.group(1)
    name = _constraint(text, "name")
    area = _constraint(text, "area_name")
    floor = _constraint(text, "floor_name")
    domains = _domains(text)
    no_match = _NO_MATCH_NAME.search(text)
    no_match_name = (no_match.group(1) or no_match.group(2)) if no_match else None
    where = f" in area {area}" if area else (f" on floor {floor}" if floor else "")
    target = name or "the requested device"
    sentences = {
        "NAME": f"No entity named {name}{where}" if name else f"No matching entity{where}",
        "AREA": f"No matching entity in area {area}" if area else "No matching entity in that area",
        "FLOOR": f"No matching entity on floor {floor}" if floor else "No matching entity on that floor",
        "DOMAIN": f"No {domains} entity{' named ' + name if name else ''}{where}"
        if domains
        else f"No matching entity of that type{where}",
        "DEVICE_CLASS": f"No matching entity of that device class{where}",
        "FEATURE": f"{target[:1].upper()}{target[1:]} does not support this action",
        "STATE": f"{target[:1].upper()}{target[1:]} is not in a state that allows this action",
        "ASSISTANT": f"{target[:1].upper()}{target[1:]} is not exposed to the voice assistant",
        "INVALID_AREA": f"No area named {no_match_name or area}",
        "INVALID_FLOOR": f"No floor named {no_match_name or floor}",
        "DUPLICATE_NAME": f"Several entities are named {no_match_name or name}; also name the area",
        "MULTIPLE_TARGETS": "Several entities match; name exactly one",
    }
    return sentences.get(reason, f"No matching entity{where}")


def shorten_tool_result(data: Any, is_error: bool) -> Any:
    """The tool result as the model should read it: long error texts become one short sentence."""
    if not is_error or not isinstance(data, dict):
        return data
    text = data.get("error_text")
    if not isinstance(text, str):
        return data
    short = short_match_failure(text)
    if short is None and len(text) > MAX_TOOL_ERROR_CHARS:
        short = text[: MAX_TOOL_ERROR_CHARS - 1].rstrip() + "…"
    if short is None:
        return data
    return {**data, "error_text": short}


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _tool_result_text(item: conversation.ToolResultContent) -> str:
    data, is_error = tool_result_payload(item)
    return _json_text(shorten_tool_result(data, is_error))


def chat_content_to_messages(
    content: list[conversation.Content], sent: SentTranscript | None = None
) -> tuple[list[ChatMessage], str | None]:
    """Convert the chat log to engine messages; returns them and the dynamic context split off the system."""
    sent = sent if sent is not None else SentTranscript()
    messages: list[ChatMessage] = []
    dynamic: str | None = None
    for item in content:
        if isinstance(item, conversation.SystemContent):
            static, found = split_dynamic_context(item.content)
            dynamic = found or dynamic
            if static:
                messages.append(ChatMessage(role="system", content=static))
        elif isinstance(item, conversation.UserContent):
            messages.append(ChatMessage(role="user", content=item.content))
        elif isinstance(item, conversation.AssistantContent):
            calls = tuple(
                ToolCall(
                    id=call.id,
                    name=call.tool_name,
                    arguments=sent.arguments(call.id) or _json_text(call.tool_args),
                )
                for call in item.tool_calls or ()
            )
            if item.content or calls:
                messages.append(ChatMessage(role="assistant", content=item.content, tool_calls=calls))
        elif isinstance(item, conversation.ToolResultContent):
            messages.append(
                ChatMessage(
                    role="tool",
                    content=sent.result_text(item.tool_call_id, functools.partial(_tool_result_text, item)),
                    tool_call_id=item.tool_call_id,
                    name=item.tool_name,
                )
            )
    return messages, dynamic


def trim_history(messages: list[ChatMessage], max_user_turns: int) -> list[ChatMessage]:
    """Keep the system messages and the last `max_user_turns` earlier user turns plus the current one.

    0 keeps everything. Cuts only at user messages, so tool calls and their results stay in one piece; a tool
    result whose assistant call is not kept (a malformed history) is dropped, because chat templates reject it.
    """
    system = [message for message in messages if message.role == "system"]
    conversation_part = [message for message in messages if message.role != "system"]
    if max_user_turns > 0:
        user_positions = [index for index, message in enumerate(conversation_part) if message.role == "user"]
        keep_turns = max_user_turns + 1  # earlier turns + the one being answered
        if len(user_positions) > keep_turns:
            conversation_part = conversation_part[user_positions[-keep_turns] :]
    known_calls: set[str] = set()
    kept: list[ChatMessage] = []
    for message in conversation_part:
        if message.role == "assistant":
            known_calls.update(call.id for call in message.tool_calls)
        if message.role == "tool" and message.tool_call_id not in known_calls:
            continue
        kept.append(message)
    return system + kept


def format_tool(tool: llm.Tool, custom_serializer: Callable[[Any], Any] | None) -> dict[str, Any]:
    """An HA LLM tool as an OpenAI function tool (schema via probatio or voluptuous-openapi)."""
    function: dict[str, Any] = {
        "name": tool.name,
        "parameters": schema_to_json_schema(tool.parameters, custom_serializer),
    }
    if tool.description:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _fix_argument(value: Any) -> Any:
    """Decode string values that small models wrap in JSON text (the string '["light"]' → the list)."""
    if isinstance(value, str) and (
        (value.startswith("[") and value.endswith("]")) or (value.startswith("{") and value.endswith("}"))
    ):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def repair_tool_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Drop None/"" arguments (they fail intent slot validation) and decode JSON-looking strings; keep 0/False."""
    return {key: _fix_argument(value) for key, value in arguments.items() if value is not None and value != ""}


def parse_tool_arguments(tool_name: str, arguments: str) -> dict[str, Any]:
    """The arguments object of a finished call; anything but a JSON object is a translated error."""
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError as err:
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="invalid_tool_arguments",
            translation_placeholders={"tool": tool_name},
        ) from err
    if not isinstance(parsed, dict):
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="invalid_tool_arguments",
            translation_placeholders={"tool": tool_name},
        )
    return repair_tool_arguments(parsed)


# ---------------------------------------------------------------------------------------------------------------
# Permission checks for tool calls
# ---------------------------------------------------------------------------------------------------------------


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple | set):
        return [str(item) for item in value]
    return None


async def async_check_tool_permission(
    hass: HomeAssistant, tool: llm.Tool, tool_input: llm.ToolInput, llm_context: llm.LLMContext
) -> None:
    """Refuse an intent tool call that would control an entity the requesting user may not control.

    Admins and calls without a user (automations, the system) pass. For an intent tool the targets are resolved
    the way the intent will resolve them (`intent.async_match_targets` with the call's name/area/floor/domain/
    device_class and the handler's platforms, exposed entities only); every match must allow POLICY_CONTROL.
    Tools that are not intents (GetLiveContext, scripts) are left to Home Assistant's own service permission
    checks. Raises HomeAssistantError, which the chat log hands to the model as a tool error result.
    """
    context = llm_context.context
    if context is None or context.user_id is None:
        return
    user = await hass.auth.async_get_user(context.user_id)
    if user is None:
        raise HomeAssistantError(f"Not allowed: unknown user {context.user_id}")
    if user.is_admin:
        return
    handler = intent_handler_for_tool(hass, tool)
    if handler is None:
        return
    args = tool_input.tool_args
    domains = _as_list(args.get("domain"))
    platforms = getattr(handler, "platforms", None)
    if domains is None and platforms:
        domains = sorted(platforms)
    constraints = intent.MatchTargetsConstraints(
        name=args.get("name"),
        area_name=args.get("area"),
        floor_name=args.get("floor"),
        domains=domains,
        device_classes=_as_list(args.get("device_class")),
        assistant=llm_context.assistant,
        allow_duplicate_names=True,
    )
    if not any((constraints.name, constraints.area_name, constraints.floor_name, constraints.domains)):
        return
    match = intent.async_match_targets(hass, constraints)
    refused = [
        state.name for state in match.states if not user.permissions.check_entity(state.entity_id, POLICY_CONTROL)
    ]
    if refused:
        raise HomeAssistantError(f"Not allowed for user {user.name}: {', '.join(refused)}")


class PermissionCheckedAPIInstance(llm.APIInstance):
    """An LLM API instance whose tool calls are checked against the requesting user's permissions first."""

    async def async_call_tool(self, tool_input: llm.ToolInput) -> JsonObjectType:
        """Check, then run the tool as Home Assistant would."""
        for tool in self.tools:
            if tool.name == tool_input.tool_name:
                await async_check_tool_permission(self.api.hass, tool, tool_input, self.llm_context)
                break
        return await super().async_call_tool(tool_input)


def with_permission_checks(api_instance: llm.APIInstance) -> llm.APIInstance:
    """The same API instance with permission-checked tool calls (fields copied, so newer fields survive)."""
    if isinstance(api_instance, PermissionCheckedAPIInstance):
        return api_instance
    values = {field.name: getattr(api_instance, field.name) for field in dataclasses.fields(api_instance) if field.init}
    return PermissionCheckedAPIInstance(**values)


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


def _structured_instruction(structure: StructuredOutput) -> str:
    return "Reply with one JSON object only, no code fences, that matches this JSON schema: " + _json_text(
        structure.json_schema
    )


def _with_instruction(messages: list[ChatMessage], instruction: str) -> list[ChatMessage]:
    """Append an instruction to the last user message (the dynamic end of the prompt, not the cached prefix)."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.role == "user":
            updated = dataclasses.replace(message, content=f"{message.content or ''}\n\n{instruction}")
            return [*messages[:index], updated, *messages[index + 1 :]]
    return [*messages, ChatMessage(role="user", content=instruction)]


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
        chat_log.llm_api = with_permission_checks(chat_log.llm_api)
    api = chat_log.llm_api
    serializer = api.custom_serializer if api is not None else None
    tools = [format_tool(tool, serializer) for tool in api.tools] if api is not None else []
    for iteration in range(settings.max_tool_iterations + 1):
        tool_choice: ToolChoice = "auto" if iteration < settings.max_tool_iterations else "none"
        messages, dynamic_context = chat_content_to_messages(chat_log.content, sent)
        messages = trim_history(messages, settings.max_history)
        if structure is not None:
            messages = _with_instruction(messages, _structured_instruction(structure))
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
    engine.end_turn(turn_id)
    return usage


def decode_json_answer(text: str) -> Any:
    """The JSON value of an answer; tolerates code fences and text around one object. Raises ValueError."""
    candidate = text.strip()
    if fenced := _CODE_FENCE.match(candidate):
        candidate = fenced.group(1)
    try:
        return json.loads(candidate)
    except ValueError:
        start, end = candidate.find("{"), candidate.rfind("}")
        if start == -1 or end <= start:
            raise
        return json.loads(candidate[start : end + 1])


def validate_structured_answer(text: str, structure: vol.Schema) -> Any:
    """Decode and validate an answer against the task's structure; HomeAssistantError (translated) if it fails."""
    try:
        data = decode_json_answer(text)
    except ValueError as err:
        LOGGER.error("AI task answer is not JSON: %s", text)
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="structured_output_invalid",
            translation_placeholders={"error": f"not JSON ({err})"},
        ) from err
    try:
        return structure(data)
    except vol.Invalid as err:
        LOGGER.error("AI task answer does not match the structure: %s", text)
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="structured_output_invalid",
            translation_placeholders={"error": str(err)},
        ) from err


def structured_output(structure: vol.Schema, chat_log: conversation.ChatLog) -> StructuredOutput:
    """Describe an AI task's structure as JSON schema with HA's selector serializer."""
    serializer = chat_log.llm_api.custom_serializer if chat_log.llm_api is not None else None
    return StructuredOutput(structure, schema_to_json_schema(structure, serializer or selector_serializer()))


# ---------------------------------------------------------------------------------------------------------------
# The base entity
# ---------------------------------------------------------------------------------------------------------------


def model_description(runtime: RkllmRuntimeData) -> str:
    """The device's model line: the model file and the rkllm-toolkit it was converted with, when reported."""
    if runtime.toolkit_version:
        return f"{runtime.model_name} (rkllm-toolkit {runtime.toolkit_version})"
    return runtime.model_name


def model_source_url(runtime: RkllmRuntimeData) -> str | None:
    """A downloaded model's source page, as the device's link (only web addresses; HA validates the scheme)."""
    source = runtime.model_source
    return source if source and source.startswith(("https://", "http://")) else None


def runtime_device_info(entry: RkllmConfigEntry) -> dr.DeviceInfo:
    """The device of the runtime + model itself (its sensors hang here; each agent has its own device).

    It shows the model and the toolkit that converted it, the runtime version (as the software version) and, for
    a downloaded model, the page it came from.
    """
    runtime = entry.runtime_data
    info = dr.DeviceInfo(
        identifiers={(DOMAIN, entry.entry_id)},
        name=entry.title,
        manufacturer="Rockchip",
        model=model_description(runtime),
        sw_version=runtime.runtime_version,
        entry_type=dr.DeviceEntryType.SERVICE,
    )
    if (source := model_source_url(runtime)) is not None:
        info["configuration_url"] = source
    return info


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
