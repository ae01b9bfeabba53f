"""Chat log ⇄ engine messages: content conversion, history trimming, the sent transcript and tool arguments.

How the chat log maps onto a request:
- The rendered system prompt is split: the date/time line(s) HA renders from `llm.BASE_PROMPT` (2025.4) or
  `llm.DATE_TIME_PROMPT` (2025.8+) - "Current time is HH:MM:SS. Today's date is YYYY-MM-DD." - are detected by
  that rendered pattern and moved to `ChatRequest.dynamic_context`, so the static prefix (instructions, Assist
  API prompt, tools) stays identical between requests and resident in the NPU's KV cache. A custom prompt that
  renders other changing values keeps them in the prefix (and pays a full prefill each time).
- History is trimmed to the last `max_history` user turns; cuts happen only at user messages, so an assistant
  tool call and its results always stay together, and tool results whose call was cut are dropped.
- Tool results go back as JSON; a failed target match becomes one sentence built from the error's fields (see
  `permissions.py`, which sees the error), other long error texts are cut to MAX_TOOL_ERROR_CHARS.
"""

from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final

from homeassistant.components import conversation
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import intent, llm

from rkllm_engine.types import ChatMessage, ToolCall

from .compat import schema_to_json_schema, tool_result_payload
from .const import DOMAIN

# HA's rendered date/time prompt (helpers/llm.py BASE_PROMPT / DATE_TIME_PROMPT), one line. This reads the prompt
# HA renders for the model, not an error text.
DATE_TIME_LINE: Final = re.compile(
    r"^Current time is \d{1,2}:\d{2}(?::\d{2})?\. Today's date is \d{4}-\d{2}-\d{2}\.[ \t]*(?:\n|$)", re.MULTILINE
)
# Errors longer than this are shortened before the model reads them.
MAX_TOOL_ERROR_CHARS: Final = 200


class SentTranscript:
    """What the engine saw of recent tool calls and results, by call id, so history is re-sent byte for byte.

    The chat log keeps repaired call arguments (empty values dropped), and Home Assistant later writes the spoken
    answer into the intent response a tool result refers to (2025.8+). Re-sending either in its changed form
    would make the history differ from the runtime's resident KV state, so the engine would rebuild the whole
    conversation instead of continuing it. It also holds the short sentence of a failed target match, recorded
    where the error is still an object (the chat log keeps only its text). Bounded: only the last turns matter.
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

    def remember_match_failure(self, call_id: str, sentence: str) -> None:
        """Record the sentence the model reads instead of a call's MatchFailedError text."""
        self._put(("match_failure", call_id), sentence)

    def match_failure(self, call_id: str) -> str | None:
        """The recorded sentence for a call's failed target match, if any."""
        return self._texts.get(("match_failure", call_id))

    def result_text(self, call_id: str, render: Callable[[], str]) -> str:
        """The result text first sent for this call (rendered and remembered on first use)."""
        key = ("result", call_id)
        if (text := self._texts.get(key)) is None:
            text = render()
            self._put(key, text)
        return text


def split_dynamic_context(system_prompt: str) -> tuple[str, str | None]:
    """(static prompt, dynamic context): HA's rendered date/time line(s) move out of the cacheable prefix."""
    found = [match.group(0).strip() for match in DATE_TIME_LINE.finditer(system_prompt)]
    if not found:
        return system_prompt, None
    static = DATE_TIME_LINE.sub("", system_prompt).strip("\n")
    return static, "\n".join(found)


def _capitalised(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}"


def short_match_failure(err: intent.MatchFailedError) -> str | None:
    """One sentence a small model can act on for a failed target match, from the error's fields (not its text).

    None when the error carries no reason (the caller then keeps Home Assistant's text, cut to length).
    """
    reason = err.result.no_match_reason
    if reason is None:
        return None
    constraints = err.constraints
    name, area, floor = constraints.name, constraints.area_name, constraints.floor_name
    domain_names = constraints.domains
    if domain_names is not None and not isinstance(domain_names, list | tuple):
        domain_names = sorted(domain_names)
    domains = " or ".join(domain_names or ()) or None
    no_match_name = err.result.no_match_name
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
        "FEATURE": f"{_capitalised(target)} does not support this action",
        "STATE": f"{_capitalised(target)} is not in a state that allows this action",
        "ASSISTANT": f"{_capitalised(target)} is not exposed to the voice assistant",
        "INVALID_AREA": f"No area named {no_match_name or area}",
        "INVALID_FLOOR": f"No floor named {no_match_name or floor}",
        "DUPLICATE_NAME": f"Several entities are named {no_match_name or name}; also name the area",
        "MULTIPLE_TARGETS": "Several entities match; name exactly one",
    }
    return sentences.get(reason.name, f"No matching entity{where}")


def shorten_tool_result(data: Any, is_error: bool, match_failure: str | None = None) -> Any:
    """The tool result as the model should read it: a failed match's sentence, or a long error text cut short."""
    if not is_error or not isinstance(data, dict):
        return data
    text = data.get("error_text")
    if not isinstance(text, str):
        return data
    short = match_failure
    if short is None and len(text) > MAX_TOOL_ERROR_CHARS:
        short = text[: MAX_TOOL_ERROR_CHARS - 1].rstrip() + "…"
    if short is None:
        return data
    return {**data, "error_text": short}


def json_text(value: Any) -> str:
    """Compact JSON as the model reads it (non-ASCII kept, unknown types as strings)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _tool_result_text(item: conversation.ToolResultContent, match_failure: str | None) -> str:
    data, is_error = tool_result_payload(item)
    return json_text(shorten_tool_result(data, is_error, match_failure))


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
                    arguments=sent.arguments(call.id) or json_text(call.tool_args),
                )
                for call in item.tool_calls or ()
            )
            if item.content or calls:
                messages.append(ChatMessage(role="assistant", content=item.content, tool_calls=calls))
        elif isinstance(item, conversation.ToolResultContent):
            render = functools.partial(_tool_result_text, item, sent.match_failure(item.tool_call_id))
            messages.append(
                ChatMessage(
                    role="tool",
                    content=sent.result_text(item.tool_call_id, render),
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
