"""Plans the runtime calls for a request so the static prefix (system + tools) stays resident in the KV cache.

The strategy and the hardware assumptions it rests on are written up in docs/HISTORY.md.
In short: the planner mirrors what the runtime's KV holds (the "resident transcript").
A request that extends it by exactly one input group (a user message, or the tool
results for the last calls) is a *continue*: one ``keep_history=1`` run of just that
group. A different history with the same system prompt and tools is a *rebuild*:
clear the KV but keep the system prompt, then send the history flattened into one
compact user turn. A changed system prompt or tool list (or a state that is not
known) is a *reset*: ``set_function_tools`` first, then as a rebuild. Forced tool
choice on a ChatML model uses a custom template that ends inside a ``<tool_call>``
(a *prefill*), and a legacy completion uses an empty template (*raw*).

The planner is pure: `PromptPlanner.plan` only reads the mirror, the caller executes
the plan, then reports back with `on_run_finished` (or `invalidate` on any failure).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rkllm_engine.output import ParseResult
from rkllm_engine.types import ChatMessage, ChatRequest, CompletionRequest, InvalidRequestError

CHATML = "chatml"
EMULATOR_MODEL_HEADER = "rkllm-emulator-model 1"
TOOL_RESPONSE_TAG = "tool_response"  # the official value; matches Qwen's <tool_response> (docs/runtime.md §4.8)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # what Qwen's template uses when there is no system message
DEFAULT_CHARS_PER_TOKEN = 3.0  # conservative: English BPE text averages about 4 characters per token

REQUIRED_TOOL_OPENING = '<tool_call>\n{"name": "'
CHATML_USER_PREFIX = "<|im_start|>user\n"
CHATML_ASSISTANT_POSTFIX = "<|im_end|>\n<|im_start|>assistant\n"
HISTORY_HEADER = "Conversation so far:"
TOOL_RESULTS_CLOSING = "Reply to the user's last message using the tool results above."
JSON_MODE_INSTRUCTION = "Reply with one JSON object only, no code fences."
REQUIRED_TOOL_INSTRUCTION = "Answer with at least one tool call."
# [Inf] The runtime parses the tools JSON with a nesting limit (the emulator's is 64 for the whole array); one tool
# object nested at most this deep keeps every request far below it (docs/robustness.md §3).
MAX_TOOL_SCHEMA_DEPTH = 32

# Qwen 2.5's tools block (docs/openai-api.md §3.1); each tool is one JSON line between the tags.
_TOOLS_BLOCK_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_BLOCK_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
_TURN_OVERHEAD_TOKENS = 5  # role markers around one turn, e.g. "<|im_start|>user\n" … "<|im_end|>\n"
_SYSTEM_ROLES = frozenset({"system", "developer"})
_THINK_BLOCK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)


def named_tool_opening(name: str) -> str:
    """The prefill for a named tool choice: the model only writes the arguments object."""
    return '<tool_call>\n{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '


def template_family(model_path: str | Path) -> str | None:
    """Return "chatml" for Qwen models and emulator model files, else None (family unknown).

    Only a ChatML family gets prefill-forced tool calls; the check is by file name
    because a .rkllm file does not expose its template through the C API.
    """
    path = Path(model_path)
    if "qwen" in path.name.lower():
        return CHATML
    try:
        with path.open("rb") as model_file:
            first_line = model_file.readline(64)
    except OSError:
        return None
    if first_line.rstrip(b"\r\n").decode("utf-8", "replace") == EMULATOR_MODEL_HEADER:
        return CHATML
    return None


def render_chatml_system(system_prompt: str, tools: list[dict[str, Any]]) -> str:
    """The ChatML system turn with the tools block, as Qwen 2.5's template renders it (docs/openai-api.md §3.1)."""
    body = system_prompt
    if tools:
        lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        body += _TOOLS_BLOCK_HEAD + lines + _TOOLS_BLOCK_TAIL
    return f"<|im_start|>system\n{body}<|im_end|>\n"


# --- plan steps ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetFunctionTools:
    """``rkllm_set_function_tools(system_prompt, tools_json, "tool_response")``."""

    system_prompt: str
    tools_json: str


@dataclass(frozen=True, slots=True)
class SetChatTemplate:
    """``rkllm_set_chat_template(system_prompt, prefix, postfix)``: only for forced calls and raw completions."""

    system_prompt: str
    prefix: str
    postfix: str


@dataclass(frozen=True, slots=True)
class ClearKV:
    """``rkllm_clear_kv_cache(keep_system_prompt)``."""

    keep_system_prompt: bool


@dataclass(frozen=True, slots=True)
class RunTurn:
    """One ``rkllm_run`` with PROMPT input."""

    role: Literal["user", "tool"]
    text: str
    keep_history: bool
    enable_thinking: bool


PrepStep = SetFunctionTools | SetChatTemplate | ClearKV
PlanMode = Literal["continue", "rebuild", "reset", "forced", "raw"]


# --- the mirror ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserTurn:
    """A user turn as the client sent it (dynamic context and instructions are not part of it)."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    """One tool result; compared by its canonical content only (names and call ids vary between clients)."""

    canonical: str
    name: str | None = field(compare=False)
    value: Any = field(compare=False)  # what goes to the runtime: parsed JSON object/array, else the string


@dataclass(frozen=True, slots=True)
class ToolTurn:
    """The results answering one assistant turn's calls, in the order of those calls."""

    results: tuple[ToolResult, ...]


@dataclass(frozen=True, slots=True)
class AssistantTurn:
    """An assistant turn, compared semantically: content without think blocks, calls by name and parsed arguments."""

    content: str
    calls: tuple[tuple[str, str], ...]  # (name, canonical arguments JSON)
    display_calls: tuple[tuple[str, str], ...] = field(compare=False, default=())


Turn = UserTurn | ToolTurn | AssistantTurn


@dataclass(frozen=True, slots=True)
class ResidentState:
    """What the runtime holds once a plan's input is prefilled: the planner's mirror of the KV cache."""

    template: Literal["builtin", "custom", "raw"]
    template_key: tuple[str, ...]  # builtin: (system, tools_json); custom: (system, prefix, postfix); raw: ()
    tool_names: tuple[str, ...]
    history: tuple[Turn, ...] | None  # builtin only: the conversation the KV represents; None = not known
    tokens: int  # estimated tokens in the KV


@dataclass(frozen=True, slots=True)
class PromptPlan:
    """What the engine executes for one request: `prep` calls in order, then `turn`.

    `estimated_prompt_tokens` is the estimated KV fill once the turn is prefilled
    (static prefix + resident history + the new turn). `resident_after_input` is the
    planner's bookkeeping, handed back through `PromptPlanner.on_run_finished`.
    """

    prep: tuple[PrepStep, ...]
    turn: RunTurn
    prefill: str
    tools_enabled: bool
    forced_tool: str | None  # the tool named by tool_choice (None for auto/none/required)
    mode: PlanMode
    estimated_prompt_tokens: int
    resident_after_input: ResidentState | None = field(default=None, repr=False, compare=False)


# --- request normalisation -------------------------------------------------------------------------------------------


def _prefix_key(template: str, template_key: tuple[str, ...]) -> str:
    digest = hashlib.sha256("\x00".join(template_key).encode("utf-8", "replace")).hexdigest()[:16]
    return f"{template}:{digest}"


def _canonical_json(text: str) -> str:
    """Compact, key-sorted JSON when `text` is JSON, else the stripped text: equal meaning → equal string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _compact_arguments(text: str) -> str:
    try:
        return json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
    except json.JSONDecodeError:
        return text.strip()


def _visible_content(content: str | None) -> str:
    """Assistant content as a user saw it: without think blocks and surrounding whitespace."""
    text = _THINK_BLOCK_RE.sub("", content or "")
    if "</think>" in text:  # the template opened the block: everything before the close is reasoning
        text = text.rsplit("</think>", 1)[1]
    return text.strip()


def _tool_result(message: ChatMessage, name: str | None) -> ToolResult:
    content = message.content or ""
    try:
        parsed = json.loads(content)
    except json.JSONDecodeError:
        parsed = None
    value: Any = parsed if isinstance(parsed, dict | list) else content
    return ToolResult(canonical=_canonical_json(content), name=name, value=value)


@dataclass(slots=True)
class _Conversation:
    """A chat request split into system prompt, history turns and the new input group."""

    system_prompt: str
    history: tuple[Turn, ...]
    new_group: UserTurn | ToolTurn


def _assistant_turn(message: ChatMessage) -> AssistantTurn:
    return AssistantTurn(
        content=_visible_content(message.content),
        calls=tuple((call.name, _canonical_json(call.arguments)) for call in message.tool_calls),
        display_calls=tuple((call.name, _compact_arguments(call.arguments)) for call in message.tool_calls),
    )


def _tool_turn(messages: list[ChatMessage], answered: ChatMessage | None) -> ToolTurn:
    """Merge consecutive tool messages, ordered by the call order of the assistant message they answer."""
    call_ids = [call.id for call in answered.tool_calls] if answered else []
    names = {call.id: call.name for call in answered.tool_calls} if answered else {}

    def position(message: ChatMessage) -> int:
        if message.tool_call_id in call_ids:
            return call_ids.index(message.tool_call_id)
        return len(call_ids)  # unknown ids keep their relative order, after the known ones

    ordered = sorted(messages, key=position)
    return ToolTurn(tuple(_tool_result(m, m.name or names.get(m.tool_call_id or "")) for m in ordered))


def _split_conversation(messages: list[ChatMessage]) -> _Conversation:
    system_parts: list[str] = []
    turns: list[Turn] = []
    pending_users: list[str] = []
    pending_tools: list[ChatMessage] = []
    last_assistant: ChatMessage | None = None

    def close_groups() -> None:
        if pending_users:
            turns.append(UserTurn("\n\n".join(pending_users)))
            pending_users.clear()
        if pending_tools:
            turns.append(_tool_turn(list(pending_tools), last_assistant))
            pending_tools.clear()

    for index, message in enumerate(messages):
        role: str = message.role
        if role in _SYSTEM_ROLES:
            if message.content and message.content.strip():
                system_parts.append(message.content.strip())
        elif role == "user":
            if message.content is None:
                raise InvalidRequestError(f"messages[{index}]: a user message needs text content")
            if pending_tools:
                close_groups()
            pending_users.append(message.content.strip())
        elif role == "tool":
            if pending_users:
                close_groups()
            pending_tools.append(message)
        elif role == "assistant":
            close_groups()
            turns.append(_assistant_turn(message))
            last_assistant = message
        else:
            raise InvalidRequestError(f"messages[{index}]: unknown role {role!r}")
    close_groups()

    if not any(isinstance(turn, UserTurn | ToolTurn) for turn in turns):
        raise InvalidRequestError("messages contain no user or tool message")
    new_group = turns[-1]
    if isinstance(new_group, AssistantTurn):
        raise InvalidRequestError(
            "the last message is an assistant message; the runtime can only answer a user or tool message"
        )
    return _Conversation(
        system_prompt="\n\n".join(system_parts) or DEFAULT_SYSTEM_PROMPT,
        history=tuple(turns[:-1]),
        new_group=new_group,
    )


def nesting_depth(value: Any) -> int:
    """How deeply JSON-like `value` nests (a scalar is 0, `{}` and `[]` are 1), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _tool_names(tools: list[Any]) -> tuple[str, ...]:
    """Validate OpenAI function tools (untrusted JSON, whatever the annotation says) and return their names.

    A tool the runtime could not take is the request's fault and is refused naming it: its parameters schema
    may nest at most `MAX_TOOL_SCHEMA_DEPTH` levels (docs/robustness.md §3).
    """
    names: list[str] = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidRequestError(
                f'tools[{index}]: expected {{"type": "function", "function": {{...}}}}', param=f"tools[{index}]"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(
                f"tools[{index}]: the function has no name", param=f"tools[{index}].function.name"
            )
        depth = nesting_depth(tool)
        if depth > MAX_TOOL_SCHEMA_DEPTH:
            raise InvalidRequestError(
                f"tools[{index}] ({name}) nests {depth} levels deep; the runtime takes tools nested at most "
                f"{MAX_TOOL_SCHEMA_DEPTH} levels",
                param=f"tools[{index}].function.parameters",
            )
        names.append(name)
    return tuple(names)


# --- flattening ----------------------------------------------------------------------------------------------------


def _tool_results_json(turn: ToolTurn) -> str:
    """The tool turn's text: one JSON array of ``{"name", "content"}`` (docs/runtime.md §4.8)."""
    items = [
        {"name": result.name, "content": result.value} if result.name else {"content": result.value}
        for result in turn.results
    ]
    return json.dumps(items, ensure_ascii=False, separators=(",", ":"))


def _result_text(result: ToolResult) -> str:
    if isinstance(result.value, str):
        return result.value
    return json.dumps(result.value, ensure_ascii=False, separators=(",", ":"))


def _transcript_lines(turn: Turn) -> list[str]:
    """One turn in the compact transcript format documented in docs/HISTORY.md."""
    if isinstance(turn, UserTurn):
        return [f"User: {turn.text}"]
    if isinstance(turn, ToolTurn):
        return [
            f"Tool result ({result.name}): {_result_text(result)}"
            if result.name
            else f"Tool result: {_result_text(result)}"
            for result in turn.results
        ]
    lines = [f"Assistant: {turn.content}"] if turn.content else []
    lines += [f"Assistant called {name} with {arguments}" for name, arguments in turn.display_calls]
    return lines


def _units(history: tuple[Turn, ...]) -> list[list[Turn]]:
    """History split into trimmable rounds: a user turn and every turn up to the next user turn.

    A round keeps each call with its results and each answer with its question, so
    trimming never leaves a result without its call or an answer without its question.
    """
    units: list[list[Turn]] = []
    for turn in history:
        if units and not isinstance(turn, UserTurn):
            units[-1].append(turn)
        else:
            units.append([turn])
    return units


@dataclass(frozen=True, slots=True)
class _TurnSettings:
    """What a continue plan carries over from the request unchanged."""

    tools_enabled: bool
    forced_tool: str | None
    enable_thinking: bool
    static_key: tuple[str, str]
    tool_names: tuple[str, ...]


@dataclass(slots=True)
class _Budget:
    chars_per_token: float

    def tokens(self, text: str) -> int:
        return math.ceil(len(text) / self.chars_per_token)


class PromptPlanner:
    """Decides how each request reaches the runtime, and mirrors what the KV cache holds.

    `template_family` ("chatml" or None) decides whether forced tool calls can be
    prefilled; `context_length` and `default_max_new_tokens` bound the prompt;
    `chars_per_token` tunes the token estimate (chars / 3 by default, conservative).
    """

    def __init__(
        self,
        *,
        template_family: str | None,
        context_length: int,
        default_max_new_tokens: int,
        chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
    ) -> None:
        if context_length <= 0:
            raise ValueError(f"context_length must be positive, got {context_length}")
        if chars_per_token <= 0:
            raise ValueError(f"chars_per_token must be positive, got {chars_per_token}")
        self._family = template_family
        self._context_length = context_length
        self._default_max_new_tokens = default_max_new_tokens
        self._budget = _Budget(chars_per_token)
        self._state: ResidentState | None = None  # None: not known (start, abort, crash, error)

    @property
    def resident_tokens_estimate(self) -> int:
        """Estimated tokens the KV cache holds now (0 when the state is not known)."""
        return self._state.tokens if self._state else 0

    @property
    def resident_key(self) -> str | None:
        """What the KV's prompt prefix is, comparable with `affinity_key` (None while not known)."""
        return None if self._state is None else _prefix_key(self._state.template, self._state.template_key)

    def affinity_key(self, request: ChatRequest | CompletionRequest) -> str:
        """The prompt prefix `request` would keep resident: requests with the same key reuse each other's KV.

        The scheduler sends a request to a slot whose `resident_key` equals it (docs/voice.md §2).
        """
        if isinstance(request, CompletionRequest):
            return _prefix_key("raw", ())
        tools_enabled = bool(request.tools) and request.tool_choice != "none"
        tools_json = json.dumps(request.tools if tools_enabled else [], ensure_ascii=False, separators=(",", ":"))
        try:
            system_prompt = _split_conversation(request.messages).system_prompt
        except InvalidRequestError:
            system_prompt = ""
        return _prefix_key("builtin", (system_prompt, tools_json))

    @property
    def resident_tool_names(self) -> tuple[str, ...]:
        """Names of the tools in the resident static prefix (for metrics and /health)."""
        return self._state.tool_names if self._state else ()

    def invalidate(self) -> None:
        """Forget the mirror after an abort, crash, error, pause or restart: the next plan resets."""
        self._state = None

    def on_run_finished(self, plan: PromptPlan, output: ParseResult) -> None:
        """The run of `plan` completed: the KV now holds its input and the output."""
        after = plan.resident_after_input
        if after is None or output.stop_matched:
            # A stop string aborts the run mid-turn: [Inf] the KV then holds a partial turn (docs/runtime.md §4.3).
            self.invalidate()
            return
        if after.history is None:
            self._state = after
            return
        if output.truncated_call:
            # [Inf] max_new_tokens ended the run inside a call: the KV holds half a call the client never sees,
            # so the next request rebuilds the history (the static prefix is still valid) (docs/runtime.md §4.6).
            self._state = ResidentState(after.template, after.template_key, after.tool_names, None, after.tokens)
            return
        produced = AssistantTurn(
            content=output.text.strip(),
            calls=tuple((call.name, _canonical_json(call.arguments)) for call in output.tool_calls),
            display_calls=tuple((call.name, _compact_arguments(call.arguments)) for call in output.tool_calls),
        )
        generated = output.reasoning + output.text + "".join(c.name + c.arguments for c in output.tool_calls)
        self._state = ResidentState(
            template=after.template,
            template_key=after.template_key,
            tool_names=after.tool_names,
            history=(*after.history, produced),
            tokens=after.tokens + self._budget.tokens(generated) + _TURN_OVERHEAD_TOKENS,
        )

    def plan(self, request: ChatRequest | CompletionRequest) -> PromptPlan:
        """Plan the runtime calls for `request`; raises InvalidRequestError for a request that cannot be served."""
        if isinstance(request, CompletionRequest):
            return self._plan_raw(request)
        return self._plan_chat(request)

    # -- completion ---------------------------------------------------------------------------------------------------

    def _plan_raw(self, request: CompletionRequest) -> PromptPlan:
        if not request.prompt:
            raise InvalidRequestError("prompt is empty")
        # [Inf] empty template strings make the runtime pass the prompt through untouched (docs/runtime.md §4.7).
        already_raw = self._state is not None and self._state.template == "raw"
        prep: tuple[PrepStep, ...] = () if already_raw else (SetChatTemplate("", "", ""),)
        return PromptPlan(
            prep=prep,
            turn=RunTurn(role="user", text=request.prompt, keep_history=False, enable_thinking=False),
            prefill="",
            tools_enabled=False,
            forced_tool=None,
            mode="raw",
            estimated_prompt_tokens=self._budget.tokens(request.prompt),
            # [Inf] keep_history=0 leaves only the (empty) system prompt in the KV after the run (§4.6).
            resident_after_input=ResidentState("raw", (), (), None, 0),
        )

    # -- chat ---------------------------------------------------------------------------------------------------------

    def _plan_chat(self, request: ChatRequest) -> PromptPlan:
        tool_names = _tool_names(request.tools)
        choice = request.tool_choice
        forced_tool: str | None = None
        if choice == "required" and not tool_names:
            raise InvalidRequestError("tool_choice 'required' needs at least one tool in tools")
        if choice not in ("auto", "none", "required"):
            if choice not in tool_names:
                raise InvalidRequestError(f"tool_choice names the tool {choice!r}, which is not in tools")
            forced_tool = choice
        conversation = _split_conversation(request.messages)
        max_new_tokens = request.max_new_tokens or self._default_max_new_tokens
        tools_enabled = bool(tool_names) and choice != "none"

        if self._family == CHATML and (choice == "required" or forced_tool is not None):
            return self._plan_forced(request, conversation, forced_tool, max_new_tokens)

        instructions: list[str] = []
        if choice == "required":
            instructions.append(REQUIRED_TOOL_INSTRUCTION)
        elif forced_tool is not None:
            instructions.append(f"Answer with a call of the tool {forced_tool}.")
        if request.json_mode:
            instructions.append(JSON_MODE_INSTRUCTION)

        tools = request.tools if tools_enabled else []
        tools_json = json.dumps(tools, ensure_ascii=False, separators=(",", ":"))
        static_key = (conversation.system_prompt, tools_json)
        static_names = tool_names if tools_enabled else ()
        static_tokens = self._static_tokens(conversation.system_prompt, tools_json, bool(tools))

        state = self._state
        same_static = state is not None and state.template == "builtin" and state.template_key == static_key
        if same_static and state is not None and state.history is not None:
            settings = _TurnSettings(tools_enabled, forced_tool, request.enable_thinking, static_key, static_names)
            continued = self._plan_continue(request, conversation, state, instructions, max_new_tokens, settings)
            if continued is not None:
                return continued

        mode: PlanMode = "rebuild" if same_static else "reset"
        prep: tuple[PrepStep, ...] = (ClearKV(keep_system_prompt=True),)
        if mode == "reset":
            prep = (SetFunctionTools(conversation.system_prompt, tools_json), *prep)
        text, history = self._flattened_turn(
            conversation,
            request.dynamic_context,
            instructions,
            closing=TOOL_RESULTS_CLOSING,
            budget=self._context_length - max_new_tokens - static_tokens,
        )
        tokens = static_tokens + self._budget.tokens(text) + _TURN_OVERHEAD_TOKENS
        return PromptPlan(
            prep=prep,
            turn=RunTurn(role="user", text=text, keep_history=True, enable_thinking=request.enable_thinking),
            prefill="",
            tools_enabled=tools_enabled,
            forced_tool=forced_tool,
            mode=mode,
            estimated_prompt_tokens=tokens,
            resident_after_input=ResidentState(
                "builtin", static_key, static_names, (*history, conversation.new_group), tokens
            ),
        )

    def _plan_continue(
        self,
        request: ChatRequest,
        conversation: _Conversation,
        state: ResidentState,
        instructions: list[str],
        max_new_tokens: int,
        settings: _TurnSettings,
    ) -> PromptPlan | None:
        """One keep_history=1 run of just the new group, when the history is exactly what the KV holds."""
        if conversation.history != state.history:
            return None
        group = conversation.new_group
        if isinstance(group, UserTurn):
            role: Literal["user", "tool"] = "user"
            parts = [request.dynamic_context, group.text] if request.dynamic_context else [group.text]
        else:
            role = "tool"
            # No dynamic context here: it came with the user turn that started this exchange and is in the KV.
            parts = [_tool_results_json(group)]
        text = "\n\n".join([*parts, *instructions])
        tokens = state.tokens + self._budget.tokens(text) + _TURN_OVERHEAD_TOKENS
        if tokens + max_new_tokens > self._context_length:
            return None  # the runtime would shift the window; a trimmed rebuild keeps control of what is dropped
        return PromptPlan(
            prep=(),
            turn=RunTurn(role=role, text=text, keep_history=True, enable_thinking=settings.enable_thinking),
            prefill="",
            tools_enabled=settings.tools_enabled,
            forced_tool=settings.forced_tool,
            mode="continue",
            estimated_prompt_tokens=tokens,
            resident_after_input=ResidentState(
                "builtin", settings.static_key, settings.tool_names, (*state.history, group), tokens
            ),
        )

    def _plan_forced(
        self,
        request: ChatRequest,
        conversation: _Conversation,
        forced_tool: str | None,
        max_new_tokens: int,
    ) -> PromptPlan:
        """Forced tool choice on ChatML: a custom template whose assistant prefix opens the call (prefill)."""
        opening = named_tool_opening(forced_tool) if forced_tool is not None else REQUIRED_TOOL_OPENING
        system = render_chatml_system(conversation.system_prompt, request.tools)
        postfix = CHATML_ASSISTANT_POSTFIX + opening
        template_key = (system, CHATML_USER_PREFIX, postfix)
        state = self._state
        already_set = state is not None and state.template == "custom" and state.template_key == template_key
        # [Inf] set_chat_template strings are tokenized with special tokens, like the official Qwen demo values,
        # and a later set_function_tools restores the built-in template (docs/runtime.md §4.7).
        prep: tuple[PrepStep, ...] = () if already_set else (SetChatTemplate(system, CHATML_USER_PREFIX, postfix),)
        system_tokens = self._budget.tokens(system)
        instructions = [JSON_MODE_INSTRUCTION] if request.json_mode else []
        text, _ = self._flattened_turn(
            conversation,
            request.dynamic_context,
            instructions,
            closing=None,
            budget=self._context_length - max_new_tokens - system_tokens,
        )
        tokens = system_tokens + self._budget.tokens(text + opening) + _TURN_OVERHEAD_TOKENS
        names = _tool_names(request.tools)
        return PromptPlan(
            prep=prep,
            # [Inf] enable_thinking is ignored once a custom template is set (I#429, docs/runtime.md §4.6).
            turn=RunTurn(role="user", text=text, keep_history=False, enable_thinking=request.enable_thinking),
            prefill=opening,
            tools_enabled=True,
            forced_tool=forced_tool,
            mode="forced",
            estimated_prompt_tokens=tokens,
            # [Inf] keep_history=0: after the run only the system prompt stays in the KV (§4.6).
            resident_after_input=ResidentState("custom", template_key, names, None, system_tokens),
        )

    # -- helpers -----------------------------------------------------------------------------------------------------

    def _static_tokens(self, system_prompt: str, tools_json: str, has_tools: bool) -> int:
        rendered = system_prompt + (tools_json + _TOOLS_BLOCK_HEAD + _TOOLS_BLOCK_TAIL if has_tools else "")
        return self._budget.tokens(rendered) + _TURN_OVERHEAD_TOKENS

    def _flattened_turn(
        self,
        conversation: _Conversation,
        dynamic_context: str | None,
        instructions: list[str],
        *,
        closing: str | None,
        budget: int,
    ) -> tuple[str, tuple[Turn, ...]]:
        """The whole conversation as one user turn; oldest history units are dropped until it fits `budget`.

        Returns the text and the history turns the mirror records (all of them: the
        client's view of the conversation, which trimming does not change).
        """
        group = conversation.new_group
        history = conversation.history
        if isinstance(group, UserTurn):
            round_start = len(history)
            final = group.text
        else:
            # The current round (the user's question, the calls, their results) is never trimmed:
            # it is what the model must answer now.
            round_start = max((i for i, turn in enumerate(history) if isinstance(turn, UserTurn)), default=0)
            final = closing or ""
        kept_tail = [*history[round_start:], group] if isinstance(group, ToolTurn) else []
        trimmable = history[:round_start]
        tail_lines = [line for turn in kept_tail for line in _transcript_lines(turn)]

        def compose(units: list[list[Turn]]) -> str:
            lines = [line for unit in units for turn in unit for line in _transcript_lines(turn)] + tail_lines
            parts = [dynamic_context] if dynamic_context else []
            if lines:
                parts.append(HISTORY_HEADER + "\n" + "\n".join(lines))
            parts += [part for part in (final, *instructions) if part]
            return "\n\n".join(parts)

        units = _units(trimmable)
        start = 0
        text = compose(units)
        while start < len(units) and self._budget.tokens(text) + _TURN_OVERHEAD_TOKENS > budget:
            start += 1
            text = compose(units[start:])
        return text, conversation.history
