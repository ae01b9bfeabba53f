"""Every Home Assistant API difference between 2025.4 and today, feature-detected in one place.

Nothing here compares version numbers: each shim checks whether the newer API exists (docs/home-assistant.md §2.3-2.4)
and falls back to the 2025.4 one. Other modules never touch a version-specific attribute directly.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from typing import Any, Final, cast

import voluptuous as vol
from homeassistant.components import conversation
from homeassistant.const import Platform
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import intent, llm

from .const import DOMAIN

_LOGGER = logging.getLogger(__name__)

# 2025.7+: the AI Task platform (and with it the `ai_task_data` subentry type).
HAS_AI_TASK: Final = hasattr(Platform, "AI_TASK")

# 2025.8+ (by 2026.2): assistant deltas may carry `thinking_content`; before that the key is unknown and ignored.
SUPPORTS_THINKING_DELTA: Final = "thinking_content" in getattr(
    conversation.AssistantContentDeltaDict, "__annotations__", {}
)

# Only `async_converse`'s error handling is needed from the final result; a missing assistant message is an error.
_NO_RESPONSE_KEY: Final = "no_response"


def entry_platforms() -> list[Platform]:
    """Platforms of a config entry: AI Task only where Home Assistant has it."""
    platforms = [Platform.CONVERSATION, Platform.SENSOR]
    if HAS_AI_TASK:
        platforms.append(Platform("ai_task"))
    return platforms


def llm_api_ids(value: object) -> list[str]:
    """Normalise a stored `llm_hass_api` option (list, legacy single string, or absent) to a list of ids."""
    if isinstance(value, str):
        return [value] if value and value != "none" else []
    if isinstance(value, list | tuple):
        return [item for item in value if isinstance(item, str) and item]
    return []


def build_conversation_input(
    *,
    text: str,
    context: Context,
    conversation_id: str | None,
    language: str,
    agent_id: str,
    device_id: str | None = None,
    extra_system_prompt: str | None = None,
) -> conversation.ConversationInput:
    """Build a ConversationInput by keyword, filling fields that only newer releases have (`satellite_id`)."""
    values: dict[str, Any] = {
        "text": text,
        "context": context,
        "conversation_id": conversation_id,
        "device_id": device_id,
        "language": language,
        "agent_id": agent_id,
        "extra_system_prompt": extra_system_prompt,
    }
    field_names = {field.name for field in dataclasses.fields(conversation.ConversationInput)}
    if "satellite_id" in field_names:
        values["satellite_id"] = None
    return conversation.ConversationInput(**{key: value for key, value in values.items() if key in field_names})


def llm_context_of(user_input: conversation.ConversationInput) -> llm.LLMContext:
    """The LLM context of a turn, built by keyword so removed/added fields do not matter."""
    as_llm_context = getattr(user_input, "as_llm_context", None)
    if as_llm_context is not None:
        return cast(llm.LLMContext, as_llm_context(DOMAIN))
    values: dict[str, Any] = {
        "platform": DOMAIN,
        "context": user_input.context,
        "user_prompt": user_input.text,
        "language": user_input.language,
        "assistant": conversation.DOMAIN,
        "device_id": user_input.device_id,
    }
    field_names = {field.name for field in dataclasses.fields(llm.LLMContext)}
    return llm.LLMContext(**{key: value for key, value in values.items() if key in field_names})


async def async_provide_llm_data(
    chat_log: conversation.ChatLog,
    user_input: conversation.ConversationInput,
    api_ids: list[str],
    prompt: str | None,
) -> None:
    """Render the system prompt and attach the LLM API(s) to the chat log; raises conversation.ConverseError.

    2025.7+ has `async_provide_llm_data(llm_context, apis, prompt, extra_system_prompt)` taking a list. 2025.4 only
    has `async_update_llm_data`, which takes a single API id (a list raises TypeError there), so only the first
    selected API is used on that line. An empty list always means "no API" (a `[]` would raise "No APIs provided").
    """
    provide = getattr(chat_log, "async_provide_llm_data", None)
    if provide is not None:
        await provide(llm_context_of(user_input), api_ids or None, prompt, user_input.extra_system_prompt)
        return
    if len(api_ids) > 1:
        _LOGGER.warning(
            "This Home Assistant release supports one LLM API per agent; using %s and ignoring %s",
            api_ids[0],
            ", ".join(api_ids[1:]),
        )
    await chat_log.async_update_llm_data(DOMAIN, user_input, api_ids[0] if api_ids else None, prompt)


def _openapi_converter() -> Callable[..., Any]:
    """probatio.to_openapi (2026.9+, voluptuous replaced) or voluptuous_openapi.convert (before)."""
    try:
        module = importlib.import_module("probatio")
        return cast(Callable[..., Any], module.to_openapi)
    except (ImportError, AttributeError):
        module = importlib.import_module("voluptuous_openapi")
        return cast(Callable[..., Any], module.convert)


# Resolved at import time (HA imports integrations in an executor): importing inside the event loop is a
# blocking call HA warns about.
_OPENAPI_CONVERT = _openapi_converter()


def schema_to_json_schema(schema: vol.Schema | Any, custom_serializer: Callable[[Any], Any] | None) -> dict[str, Any]:
    """Convert a voluptuous/probatio schema to a JSON-schema object (`{"type": "object", "properties": …}`)."""
    converted = _OPENAPI_CONVERT(schema, custom_serializer=custom_serializer)
    if not isinstance(converted, dict):
        return {"type": "object", "properties": {}}
    result = dict(converted)
    result.setdefault("type", "object")
    if result["type"] == "object":
        result.setdefault("properties", {})
    return result


def selector_serializer() -> Callable[[Any], Any]:
    """HA's selector → JSON-schema serializer (public since 2025.8, private before)."""
    namespace = vars(llm)
    serializer = namespace.get("selector_serializer") or namespace["_selector_serializer"]
    return cast(Callable[[Any], Any], serializer)


def tool_result_payload(content: conversation.ToolResultContent) -> tuple[Any, bool]:
    """(data, is_error) of a tool result: `content.result` (2026.10+ ToolResult) or the plain `tool_result` dict."""
    result = getattr(content, "result", None)
    if result is not None and hasattr(result, "data"):
        return result.data, bool(getattr(result, "error", False))
    data: Any = content.tool_result
    return data, isinstance(data, dict) and "error" in data


def tool_result_content(
    *, agent_id: str, tool_call_id: str, tool_name: str, data: Any, is_error: bool = False
) -> conversation.ToolResultContent:
    """A ToolResultContent for the chat log, whichever field this release takes.

    2026.10+ takes `result=llm.ToolResult(data, error)` and no longer accepts `tool_result`; before, `tool_result`
    is the plain dict. Built by keyword from a dict so the type check passes against either release.
    """
    field_names = {field.name for field in dataclasses.fields(conversation.ToolResultContent)}
    tool_result_class = getattr(llm, "ToolResult", None)
    payload: dict[str, Any] = (
        {"result": tool_result_class(data=data, error=is_error)}
        if "result" in field_names and tool_result_class is not None
        else {"tool_result": data}
    )
    return conversation.ToolResultContent(agent_id=agent_id, tool_call_id=tool_call_id, tool_name=tool_name, **payload)


def unwrap_tool(tool: llm.Tool) -> llm.Tool:
    """The tool behind a merged-API namespace wrapper (2025.5+ prefixes tools of several APIs)."""
    inner = getattr(tool, "tool", None)
    return inner if isinstance(inner, llm.Tool) else tool


def intent_handler_for_tool(hass: HomeAssistant, tool: llm.Tool) -> intent.IntentHandler | None:
    """The intent handler a tool runs, or None for tools that are not intents (GetLiveContext, scripts …).

    Tools are matched by the registered intent type rather than by class, so the check survives tools moving
    between modules (2026.9) and domain prefixes (`intent__HassTurnOn`).
    """
    name = unwrap_tool(tool).name
    candidates = {name, name.rpartition("__")[2]}
    for handler in intent.async_get(hass):
        if handler.intent_type in candidates:
            return handler
    return None


def apis_requiring_admin(hass: HomeAssistant, api_ids: list[str]) -> list[str]:
    """Names of the selected APIs that are admin-only (`API.requires_admin`, 2026.11+; never true before)."""
    return [
        api.name
        for api in llm.async_get_apis(hass)
        if api.id in api_ids and bool(getattr(api, "requires_admin", False))
    ]


def _last_intent_response(
    user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
) -> intent.IntentResponse | None:
    """Rebuild the IntentResponse of this turn's last intent tool from its dict (2025.4 keeps only the dict).

    Core's `async_get_result_from_chat_log` (later releases) returns that tool's original response, so callers of
    `/api/conversation/process` see the matched entities; this gives 2025.4 the same result.
    """
    turn_start = max(
        (i for i, content in enumerate(chat_log.content) if isinstance(content, conversation.UserContent)), default=0
    )
    for content in reversed(chat_log.content[turn_start:]):
        if not isinstance(content, conversation.ToolResultContent):
            continue
        data, is_error = tool_result_payload(content)
        if is_error or not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            continue
        try:
            response_type = intent.IntentResponseType(data.get("response_type"))
        except ValueError:
            continue
        if response_type is intent.IntentResponseType.ERROR:
            continue

        def targets(key: str, found: dict[str, Any] = data["data"]) -> list[intent.IntentResponseTarget]:
            return [
                intent.IntentResponseTarget(
                    name=str(item.get("name", "")),
                    type=intent.IntentResponseTargetType(item.get("type", "entity")),
                    id=item.get("id"),
                )
                for item in found.get(key, [])
                if isinstance(item, dict)
            ]

        response = intent.IntentResponse(language=user_input.language)
        response.response_type = response_type
        response.async_set_targets(targets("targets"))
        response.async_set_results(targets("success"), targets("failed"))
        return response
    return None


def result_from_chat_log(
    user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
) -> conversation.ConversationResult:
    """The turn's ConversationResult: core's helper when present, else the 2025.4 construction (§1.2 step 4).

    A turn that produced no assistant message is a translated error instead of core's untranslated one.
    """
    last = chat_log.content[-1]
    if not isinstance(last, conversation.AssistantContent):
        raise HomeAssistantError(translation_domain=DOMAIN, translation_key=_NO_RESPONSE_KEY)
    from_chat_log = getattr(conversation, "async_get_result_from_chat_log", None)
    if from_chat_log is not None:
        return cast(conversation.ConversationResult, from_chat_log(user_input, chat_log))
    response = _last_intent_response(user_input, chat_log) or intent.IntentResponse(language=user_input.language)
    response.async_set_speech(last.content or "")
    return conversation.ConversationResult(
        response=response,
        conversation_id=chat_log.conversation_id,
        continue_conversation=chat_log.continue_conversation,
    )


def assistant_delta(
    *,
    role: bool = False,
    content: str | None = None,
    tool_calls: list[llm.ToolInput] | None = None,
    thinking: str | None = None,
) -> conversation.AssistantContentDeltaDict | None:
    """One delta for `ChatLog.async_add_delta_content_stream`; thinking only where the delta dict supports it.

    Returns None when nothing would be added (e.g. a thinking piece on a release without `thinking_content`).
    """
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = tool_calls
    if thinking and SUPPORTS_THINKING_DELTA:
        delta["thinking_content"] = thinking
    if not delta:
        return None
    return cast(conversation.AssistantContentDeltaDict, delta)


def report_flow_progress(flow: object, fraction: float) -> bool:
    """Move a config flow's progress bar where Home Assistant has one (`FlowHandler.async_update_progress`).

    2025.4 has no progress fraction; there the progress step's text carries the percentage instead. Returns
    whether a bar was updated.
    """
    update: Callable[[float], None] | None = getattr(flow, "async_update_progress", None)
    if update is None:
        return False
    update(min(1.0, max(0.0, fraction)))
    return True


# 2026.10 made `str(MatchFailedError)` a sentence (and moved the dump of its fields to `repr`); before, the text a
# tool result carries is that dump, so the model reads our sentence built from the error's fields instead.
MATCH_FAILURE_TEXT_IS_SENTENCE: Final = "__repr__" in vars(intent.MatchFailedError)
