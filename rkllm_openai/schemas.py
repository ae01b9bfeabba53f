"""OpenAI wire shapes: request models, response typed dicts, and request → engine translation.

Requests are validated with pydantic and translated with the accept / ignore / reject policy of docs/openai-api.md §1.6.

Policy: a field that would change the response's shape or contract if ignored (`n>1`, `logprobs`, `echo`, `suffix`,
`best_of>1`, non-text content parts, an invalid `tool_choice`) is rejected with 400 and the `param` naming it; a field
that only changes sampling or bookkeeping (`seed`, `user`, `metadata`, `logit_bias`, `store`, `service_tier`, …) is
ignored with a debug log line. Every problem becomes one `OpenAIError` with a bounded, specific message.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rkllm_engine.types import ChatMessage, ChatRequest, CompletionRequest, Priority, Sampling, ToolCall

_LOGGER = logging.getLogger(__name__)

MAX_STOP_STRINGS: Final = 4
# The OpenAI spec's default for /v1/completions (docs/openai-api.md §1.4).
LEGACY_COMPLETION_DEFAULT_MAX_TOKENS: Final = 16
# vLLM caps validation output the same way so a huge bad body cannot produce a huge error (docs/openai-api.md §1.7).
MAX_REPORTED_ERRORS: Final = 5
MAX_ERROR_PART_CHARS: Final = 200
TOOL_NAME_PATTERN: Final = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_PYDANTIC_TYPE_TAGS: Final = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "tuple"})


class OpenAIError(Exception):
    """A problem the API answers with an OpenAI-shaped error body (and status) instead of a completion."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        error_type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.error_type = error_type
        self.headers = headers or {}

    def body(self) -> ErrorBody:
        """The error as OpenAI's `{"error": {message, type, param, code}}` (all four keys, docs/openai-api.md §2.7)."""
        return error_body(self.message, self.error_type, self.param, self.code)


# ---------------------------------------------------------------------------------------------------------------------
# Response shapes (typed dicts: the JSON must carry explicit nulls and omit optional keys exactly as specified)
# ---------------------------------------------------------------------------------------------------------------------


class ErrorDetail(TypedDict):
    """OpenAI `Error`: all four keys present; `code` a string or null."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(TypedDict):
    """OpenAI `ErrorResponse`."""

    error: ErrorDetail


class PromptTokensDetails(TypedDict):
    """How many prompt tokens were reused from the resident KV cache."""

    cached_tokens: int


class UsageObject(TypedDict):
    """OpenAI `CompletionUsage`."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionObject(TypedDict):
    """A complete function call: `arguments` is JSON text."""

    name: str
    arguments: str


class ToolCallObject(TypedDict):
    """A complete tool call in a non-streamed message."""

    id: str
    type: Literal["function"]
    function: FunctionObject


class AssistantMessageObject(TypedDict):
    """The non-streamed assistant message; `refusal` is always present (null)."""

    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: NotRequired[list[ToolCallObject]]
    reasoning_content: NotRequired[str]


class ChatChoiceObject(TypedDict):
    """One non-streamed choice; `logprobs` is always null (logprobs are rejected)."""

    index: int
    message: AssistantMessageObject
    logprobs: None
    finish_reason: str


class ChatCompletionObject(TypedDict):
    """OpenAI `CreateChatCompletionResponse`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoiceObject]
    usage: UsageObject


class FunctionDelta(TypedDict, total=False):
    """The function part of a tool-call delta: the name once, then argument fragments."""

    name: str
    arguments: str


class ToolCallDelta(TypedDict):
    """One entry of `delta.tool_calls`: always an `index`; `id`/`type` only in the call's first entry."""

    index: int
    id: NotRequired[str]
    type: NotRequired[Literal["function"]]
    function: FunctionDelta


class ChunkDelta(TypedDict, total=False):
    """A streamed delta: `role` only in the first chunk, `{}` in the finish chunk."""

    role: Literal["assistant"]
    content: str | None
    reasoning_content: str
    tool_calls: list[ToolCallDelta]


class ChunkChoiceObject(TypedDict):
    """One streamed choice; `finish_reason` is null until the finish chunk."""

    index: int
    delta: ChunkDelta
    logprobs: None
    finish_reason: str | None


class ChatCompletionChunkObject(TypedDict):
    """OpenAI `CreateChatCompletionStreamResponse`; the usage chunk has `choices: []` and `usage`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoiceObject]
    usage: NotRequired[UsageObject]


class TextChoiceObject(TypedDict):
    """One legacy completion choice (streamed and not: the same shape, docs/openai-api.md §2.5)."""

    text: str
    index: int
    logprobs: None
    finish_reason: str | None


class TextCompletionObject(TypedDict):
    """OpenAI `CreateCompletionResponse`, also each streamed legacy event."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoiceObject]
    usage: NotRequired[UsageObject]


class ModelObject(TypedDict):
    """OpenAI `Model`, plus vLLM's harmless `max_model_len`."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: NotRequired[int]


class ModelListObject(TypedDict):
    """OpenAI `ListModelsResponse`."""

    object: Literal["list"]
    data: list[ModelObject]


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> ErrorBody:
    """An OpenAI error body."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------------------
# Request models
# ---------------------------------------------------------------------------------------------------------------------


class _Lenient(BaseModel):
    """Unknown keys are kept (and logged as ignored) instead of failing: clients send many optional fields."""

    model_config = ConfigDict(extra="allow")


class ContentPart(_Lenient):
    """One content part; only `text` (and an assistant `refusal`) can reach a text-only model."""

    type: str
    text: str | None = None
    refusal: str | None = None


class FunctionCallIn(_Lenient):
    """A previous call's function, as the client sends it back in history."""

    name: str
    # The spec says a JSON string; some clients send the object itself, which is just as unambiguous.
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Lenient):
    """A previous tool call in an assistant message."""

    id: str | None = None
    type: str = "function"
    function: FunctionCallIn


class MessageIn(_Lenient):
    """One message of any role; role-specific rules are checked in `chat_messages` for specific errors."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class FunctionDefinition(_Lenient):
    """A function tool's definition."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Lenient):
    """A tool offered to the model; only `type: "function"` exists for chat completions."""

    type: str
    function: FunctionDefinition


class StreamOptions(_Lenient):
    """`stream_options`; only `include_usage` changes anything (`include_obfuscation` is ignored)."""

    include_usage: bool | None = None


class JsonSchemaSpec(_Lenient):
    """`response_format.json_schema`."""

    name: str
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Lenient):
    """`response_format`: text, json_object or json_schema."""

    type: str
    json_schema: JsonSchemaSpec | None = None


class _SamplingFields(_Lenient):
    """Sampling knobs shared by chat and legacy completions; ranges as in the OpenAI spec."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # llama.cpp/vLLM extension
    repeat_penalty: float | None = Field(default=None, gt=0)  # llama.cpp's name
    repetition_penalty: float | None = Field(default=None, gt=0)  # vLLM's name
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    model: str | None = None

    def sampling(self) -> Sampling:
        """The engine's per-request sampling."""
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repeat_penalty=self.repeat_penalty if self.repeat_penalty is not None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
        )

    def stop_strings(self) -> list[str]:
        """`stop` as a list (a string or up to 4 strings; empty strings are dropped)."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > MAX_STOP_STRINGS:
            raise OpenAIError(
                f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop", code="invalid_value"
            )
        return [stop for stop in stops if stop]

    def check_common(self) -> None:
        """Reject what this one-choice server cannot honour; log what it ignores."""
        if self.n is not None and self.n != 1:
            raise OpenAIError(
                f"n={self.n} is not supported: this server returns exactly one choice (omit n or set it to 1)",
                param="n",
                code="unsupported_parameter",
            )
        if self.logit_bias:
            # Non-empty logit_bias changes results, but the runtime has no logit API; ignoring it (with a warning)
            # is friendlier than failing clients that always send it (docs/openai-api.md §1.1).
            _LOGGER.warning("logit_bias is not supported by the RKLLM runtime and was ignored")
        if self.model_extra:
            _LOGGER.debug("fields present in the request but ignored: %s", ", ".join(sorted(self.model_extra)))

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)


class ChatCompletionRequestIn(_SamplingFields):
    """`POST /v1/chat/completions` (docs/openai-api.md §1.1)."""

    messages: list[MessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None


class CompletionRequestIn(_SamplingFields):
    """`POST /v1/completions` (legacy, docs/openai-api.md §1.4)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=LEGACY_COMPLETION_DEFAULT_MAX_TOKENS, ge=1)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and translation
# ---------------------------------------------------------------------------------------------------------------------


def _loc_to_param(loc: tuple[int | str, ...]) -> str:
    """`("messages", 0, "content", "str")` → `messages[0].content` (union-branch tags are dropped)."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part not in _PYDANTIC_TYPE_TAGS and not part[:1].isupper():
            param += f".{part}" if param else part
    return param


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_PART_CHARS else text[: MAX_ERROR_PART_CHARS - 1] + "…"


def _validation_error(err: ValidationError) -> OpenAIError:
    """One bounded error naming the first offending fields (one line per field, at most MAX_REPORTED_ERRORS)."""
    parts: list[str] = []
    params: list[str] = []
    missing_first = False
    for detail in err.errors(include_url=False):
        param = _loc_to_param(tuple(detail["loc"])) or "body"
        if param in params:
            continue
        if not params:
            missing_first = detail["type"] == "missing"
        params.append(param)
        message = str(detail["msg"])
        if detail["type"] != "missing" and "input" in detail:
            message += f" (got {_clip(json.dumps(detail['input'], default=str))})"
        parts.append(_clip(f"{param}: {message}"))
        if len(parts) >= MAX_REPORTED_ERRORS:
            break
    return OpenAIError(
        "invalid request: " + "; ".join(parts),
        param=params[0] if params else None,
        code="missing_required_parameter" if missing_first else "invalid_value",
    )


# Bounds on what a body may be, checked before anything recursive touches it (docs/robustness.md §3).
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
MAX_JSON_DEPTH: Final = 100
# One JSON token at a time, strings whole (escapes included), so brackets inside strings are not counted.
_JSON_STRUCTURE: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_UTF8_BOM: Final = b"\xef\xbb\xbf"


def body_too_large(size: int | None) -> OpenAIError:
    """The 413 for a body over `MAX_BODY_BYTES` (`size` None when it was not announced)."""
    announced = f" ({size} bytes)" if size is not None else ""
    return OpenAIError(
        f"the request body{announced} is larger than the {MAX_BODY_BYTES // (1024 * 1024)} MiB this server accepts",
        status=413,
        code="request_too_large",
    )


def json_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of the JSON text `raw`, counted without recursion; stops counting once past `limit`."""
    depth = deepest = 0
    for match in _JSON_STRUCTURE.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def clean_strings(value: Any, path: str = "") -> Any:
    """Every string of a parsed body as the runtime can take it (docs/robustness.md §3).

    A NUL character is refused with a 400 naming where it is (the runtime reads C strings: it would cut the
    text there without a word); a lone UTF-16 surrogate (half of an emoji cut by a client) is replaced with
    U+FFFD, as a browser's TextEncoder does.
    """
    if isinstance(value, str):
        if "\x00" in value:
            where = path or "the request body"
            raise OpenAIError(
                f"{where} contains a NUL character (\\u0000), which this model cannot read", param=path or None
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
        return value
    if isinstance(value, list):
        return [clean_strings(item, f"{path}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        return {
            clean_strings(key, path): clean_strings(item, f"{path}.{key}" if path else str(key))
            for key, item in value.items()
        }
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, whatever the Content-Type (curl -d sends form-urlencoded, §1.7).

    Bounded before it is parsed: UTF-8 only (strict: an encoded surrogate is invalid UTF-8), at most
    `MAX_JSON_DEPTH` levels of nesting (Python's parser would otherwise recurse until RecursionError), no NaN or
    Infinity; then `clean_strings`.
    """
    if len(raw) > MAX_BODY_BYTES:
        raise body_too_large(len(raw))
    if not raw.strip():
        raise OpenAIError("the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = raw.removeprefix(_UTF8_BOM).decode("utf-8")
    except UnicodeDecodeError as err:
        raise OpenAIError(
            f"the request body is not valid UTF-8 (byte {err.start}: {err.reason}); send JSON encoded as UTF-8",
            code="invalid_encoding",
        ) from err
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise OpenAIError(
            f"the request body nests JSON more than {MAX_JSON_DEPTH} levels deep; this server accepts at most "
            f"{MAX_JSON_DEPTH}",
            code="invalid_json",
        )
    try:
        body = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as err:
        raise OpenAIError(f"the request body is not valid JSON: {_clip(str(err))}", code="invalid_json") from err
    if not isinstance(body, dict):
        raise OpenAIError(
            f"the request body must be a JSON object, got a JSON {type(body).__name__}", code="invalid_json"
        )
    cleaned: dict[str, Any] = clean_strings(body)
    return cleaned


def _content_text(content: str | list[ContentPart] | None, param: str, *, allow_refusal: bool = False) -> str | None:
    """Join text parts with newlines; any non-text part is refused while the model is text-only (§1.2)."""
    if content is None or isinstance(content, str):
        return content
    texts: list[str] = []
    for index, part in enumerate(content):
        if part.type == "text" and part.text is not None:
            texts.append(part.text)
        elif allow_refusal and part.type == "refusal" and part.refusal is not None:
            texts.append(part.refusal)
        elif part.type == "text":
            raise OpenAIError(f"{param}[{index}]: a text part needs a 'text' string", param=f"{param}[{index}].text")
        else:
            raise OpenAIError(
                f"{param}[{index}]: content parts of type {part.type!r} are not supported; this model only reads text",
                param=f"{param}[{index}]",
                code="unsupported_content",
            )
    return "\n".join(texts)


def _arguments_text(arguments: str | dict[str, Any]) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def chat_messages(messages: list[MessageIn]) -> list[ChatMessage]:
    """OpenAI messages → engine messages: developer → system, parts joined, tool names looked up by call id."""
    result: list[ChatMessage] = []
    call_names: dict[str, str] = {}
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.role
        if role in ("system", "developer"):
            text = _content_text(message.content, f"{where}.content")
            if text is None:
                raise OpenAIError(f"{where}: a {role} message needs content", param=f"{where}.content")
            result.append(ChatMessage(role="system", content=text))
        elif role == "user":
            text = _content_text(message.content, f"{where}.content")
            if text is None:
                raise OpenAIError(f"{where}: a user message needs content", param=f"{where}.content")
            result.append(ChatMessage(role="user", content=text))
        elif role == "assistant":
            text = _content_text(message.content, f"{where}.content", allow_refusal=True)
            calls: list[ToolCall] = []
            for call_index, call in enumerate(message.tool_calls or []):
                if call.type != "function":
                    raise OpenAIError(
                        f"{where}.tool_calls[{call_index}]: only type 'function' is supported, got {call.type!r}",
                        param=f"{where}.tool_calls[{call_index}].type",
                    )
                call_id = call.id or f"call_{index}_{call_index}"
                call_names[call_id] = call.function.name
                calls.append(
                    ToolCall(id=call_id, name=call.function.name, arguments=_arguments_text(call.function.arguments))
                )
            if text is None and not calls:
                raise OpenAIError(
                    f"{where}: an assistant message needs content or tool_calls", param=f"{where}.content"
                )
            result.append(ChatMessage(role="assistant", content=text, tool_calls=tuple(calls)))
        elif role == "tool":
            text = _content_text(message.content, f"{where}.content")
            if text is None:
                raise OpenAIError(f"{where}: a tool message needs content", param=f"{where}.content")
            if message.tool_call_id is None:
                # Lenient like llama.cpp: Qwen/Hermes templates do not use the id (docs/openai-api.md §1.2).
                _LOGGER.debug("%s: tool message without tool_call_id", where)
            name = call_names.get(message.tool_call_id or "") or message.name
            result.append(ChatMessage(role="tool", content=text, tool_call_id=message.tool_call_id, name=name))
        elif role == "function":
            raise OpenAIError(
                f"{where}: the deprecated 'function' role is not supported; send role 'tool' with tool_call_id",
                param=f"{where}.role",
            )
        else:
            raise OpenAIError(
                f"{where}: unknown role {role!r} (expected system, developer, user, assistant or tool)",
                param=f"{where}.role",
            )
    return result


def _tool_definitions(tools: list[ToolDefinition] | None) -> list[dict[str, Any]]:
    """Validated tools as plain OpenAI dicts (`tools: []` means no tools in this project, §1.3)."""
    result: list[dict[str, Any]] = []
    for index, tool in enumerate(tools or []):
        if tool.type != "function":
            raise OpenAIError(
                f"tools[{index}].type must be 'function', got {tool.type!r}", param=f"tools[{index}].type"
            )
        name = tool.function.name
        if not TOOL_NAME_PATTERN.match(name):
            raise OpenAIError(
                f"tools[{index}].function.name {_clip(repr(name))} must be 1-64 characters of a-z, A-Z, 0-9, _ or -",
                param=f"tools[{index}].function.name",
            )
        function: dict[str, Any] = {"name": name}
        if tool.function.description is not None:
            function["description"] = tool.function.description
        function["parameters"] = tool.function.parameters or {"type": "object", "properties": {}}
        result.append({"type": "function", "function": function})
    return result


def _tool_choice(choice: str | dict[str, Any] | None, tools_sent: bool, tool_names: list[str]) -> str:
    """`tool_choice` → the engine's value, with vLLM's rule set (docs/openai-api.md §1.3) and `tools: []` = no tools."""
    if choice is None:
        return "auto" if tool_names else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise OpenAIError(
                f"tool_choice {_clip(repr(choice))} is not valid: use 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        if choice == "none":
            return "none"
        if not tools_sent:
            raise OpenAIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
        if choice == "required" and not tool_names:
            raise OpenAIError("tool_choice 'required' needs at least one tool in `tools`", param="tool_choice")
        return choice if tool_names else "none"
    choice_type = choice.get("type")
    if choice_type == "allowed_tools":
        raise OpenAIError(
            "tool_choice of type 'allowed_tools' is not supported; send only the allowed tools in `tools`",
            param="tool_choice.type",
            code="unsupported_parameter",
        )
    if choice_type != "function":
        raise OpenAIError(
            f"tool_choice.type must be 'function', got {_clip(repr(choice_type))}", param="tool_choice.type"
        )
    function = choice.get("function")
    if not isinstance(function, dict):
        raise OpenAIError("tool_choice.function is missing", param="tool_choice.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise OpenAIError("tool_choice.function.name is missing or empty", param="tool_choice.function.name")
    if not tools_sent:
        raise OpenAIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if name not in tool_names:
        raise OpenAIError(
            f"The tool specified in `tool_choice` ({_clip(name)}) does not match any of the specified `tools`",
            param="tool_choice",
        )
    return name


def _json_instruction(response_format: ResponseFormat | None) -> tuple[bool, str | None]:
    """(json_mode, schema instruction) of `response_format`; best effort, the runtime has no grammar (§3.5)."""
    if response_format is None or response_format.type == "text":
        return False, None
    if response_format.type == "json_object":
        return True, None
    if response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None:
            raise OpenAIError(
                "response_format of type 'json_schema' needs a 'json_schema' object",
                param="response_format.json_schema",
            )
        if spec.schema_ is None:
            return True, None
        schema = json.dumps(spec.schema_, ensure_ascii=False, separators=(",", ":"))
        return True, f"The JSON object must match this JSON schema ({spec.name}): {schema}"
    raise OpenAIError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {_clip(repr(response_format.type))}",
        param="response_format.type",
    )


def _enable_thinking(request: ChatCompletionRequestIn) -> bool:
    """Qwen3 thinking: `chat_template_kwargs.enable_thinking` turns it on; `reasoning_effort: "none"` forces it off."""
    if request.reasoning_effort == "none":
        return False
    kwargs = request.chat_template_kwargs or {}
    return kwargs.get("enable_thinking") is True


@dataclass(frozen=True, slots=True)
class ParsedChat:
    """A validated chat request: the engine request plus what only the HTTP layer needs."""

    request: ChatRequest
    model: str | None
    stream: bool
    include_usage: bool
    client_tools_sent: bool  # a non-empty `tools` list (refused for agent models)


@dataclass(frozen=True, slots=True)
class ParsedCompletion:
    """A validated legacy completion request."""

    request: CompletionRequest
    model: str | None
    stream: bool
    include_usage: bool


def _validate[ModelT: BaseModel](model: type[ModelT], body: dict[str, Any]) -> ModelT:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise _validation_error(err) from err


def parse_chat_request(body: dict[str, Any]) -> ParsedChat:
    """Validate a chat completion body and translate it into a `ChatRequest` (raises OpenAIError)."""
    request = _validate(ChatCompletionRequestIn, body)
    request.check_common()
    if request.logprobs:
        raise OpenAIError(
            "logprobs are not supported by the RKLLM runtime", param="logprobs", code="unsupported_parameter"
        )
    if request.top_logprobs:
        raise OpenAIError(
            "top_logprobs is not supported (logprobs are not available)",
            param="top_logprobs",
            code="unsupported_parameter",
        )
    if request.functions is not None or request.function_call is not None:
        raise OpenAIError(
            "the deprecated functions/function_call fields are not supported; use tools and tool_choice",
            param="functions" if request.functions is not None else "function_call",
            code="unsupported_parameter",
        )
    if request.modalities and any(modality != "text" for modality in request.modalities):
        raise OpenAIError(
            "only the 'text' output modality is supported", param="modalities", code="unsupported_parameter"
        )
    tools = _tool_definitions(request.tools)
    tool_names = [tool["function"]["name"] for tool in tools]
    tool_choice = _tool_choice(request.tool_choice, request.tools is not None, tool_names)
    json_mode, schema_instruction = _json_instruction(request.response_format)
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    chat = ChatRequest(
        messages=chat_messages(request.messages),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=request.parallel_tool_calls is not False,
        sampling=request.sampling(),
        max_new_tokens=max_tokens,
        stop=request.stop_strings(),
        enable_thinking=_enable_thinking(request),
        dynamic_context=schema_instruction,
        priority=Priority.API,
        json_mode=json_mode,
    )
    return ParsedChat(
        request=chat,
        model=request.model,
        stream=bool(request.stream),
        include_usage=request.include_usage,
        client_tools_sent=bool(tools),
    )


def _prompt_text(prompt: str | list[str] | list[int] | list[list[int]]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and all(isinstance(item, str) for item in prompt):
        raise OpenAIError(
            f"prompt holds {len(prompt)} prompts; this server generates one at a time: send one prompt per request",
            param="prompt",
            code="unsupported_parameter",
        )
    if not prompt:
        raise OpenAIError("prompt is empty", param="prompt")
    raise OpenAIError(
        "token-id prompts are not supported; send the prompt as text", param="prompt", code="unsupported_parameter"
    )


def parse_completion_request(body: dict[str, Any]) -> ParsedCompletion:
    """Validate a legacy completion body and translate it into a `CompletionRequest` (raises OpenAIError)."""
    request = _validate(CompletionRequestIn, body)
    request.check_common()
    if request.echo:
        raise OpenAIError("echo is not supported", param="echo", code="unsupported_parameter")
    if request.suffix:
        raise OpenAIError("suffix (fill-in-the-middle) is not supported", param="suffix", code="unsupported_parameter")
    if request.best_of is not None and request.best_of != 1:
        raise OpenAIError(
            f"best_of={request.best_of} is not supported: this server generates one completion",
            param="best_of",
            code="unsupported_parameter",
        )
    if request.logprobs:
        raise OpenAIError(
            "logprobs are not supported by the RKLLM runtime", param="logprobs", code="unsupported_parameter"
        )
    prompt = _prompt_text(request.prompt)
    if not prompt:
        raise OpenAIError("prompt is empty", param="prompt")
    completion = CompletionRequest(
        prompt=prompt,
        sampling=request.sampling(),
        max_new_tokens=request.max_tokens,
        stop=request.stop_strings(),
        priority=Priority.API,
    )
    return ParsedCompletion(
        request=completion, model=request.model, stream=bool(request.stream), include_usage=request.include_usage
    )
