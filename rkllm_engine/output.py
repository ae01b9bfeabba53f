"""Incremental parser that turns the runtime's text pieces into engine events.

One parser serves the OpenAI API and the conversation agent, so both see the same
text, reasoning and tool calls (docs/architecture.md, "one event type flows up").

Behaviour, in the order it is applied to the model's output:

1. Stop strings (``stop``) are matched on the raw output (tags included, prefill
   excluded). The stop that *completes* first wins (ties: the one that starts
   first); the output is cut where it starts, `stop_matched` is set and further
   input is ignored. The longest suffix that could start a stop string is held back,
   so no part of a stop string is ever emitted.
2. ``<think>…</think>`` becomes `ReasoningDelta`, never `TextDelta`; whitespace right
   after ``</think>`` is dropped; a stray ``</think>`` in text is dropped.
3. With ``tools_enabled``: ``<tool_call>{json}</tool_call>`` (Hermes/Qwen; ``arguments``
   may be an object or a JSON string, ``parameters`` is accepted for ``arguments``; the
   closing tag may be missing at the end of the output or before the next
   ``<tool_call>``), the XML-like ``<tool_call><function=NAME><parameter=P>V</parameter>
   </function></tool_call>`` and a bare ``<function=NAME>…</function>``. A call is
   emitted only when complete (start, one arguments fragment, end), so nothing is
   ever taken back; a call cut off by the end of the output is never emitted
   (`ParseResult.truncated_call`).
4. Text before the first call streams as it comes. Text after a call is held: it is
   released just before the next valid call (if it is not only whitespace) and dropped
   when no further call follows — like vLLM, which drops text after the calls
   (docs/openai-api.md §3.2). Once `max_tool_calls` calls were kept, later calls are parsed
   but dropped, and so is all later text.
5. A call whose tags are complete but whose body is not a valid call (bad JSON, no
   name, non-object arguments) is not raised: its raw text joins the visible text at
   the place it occurred (so the user sees something) and is listed in
   `ParseResult.malformed_calls` for the caller to log.
6. Model output is checked like client input (docs/robustness.md §5): with `tool_names`
   given, a call must name one of them. A near miss (case, a ``functions.`` prefix, one
   unambiguous close match) is repaired to the offered name; with `forced` (tool_choice
   required or named) any other name is repaired to the most similar offered one (the
   request demands a call of an offered tool; the client checks the arguments). Without
   `forced` any other call is never emitted: its raw text is handled like a malformed
   call. Unknown names are listed in `ParseResult.unknown_calls`.

Any text that might be the start of a tag or of a stop string is held back and
released only when it is known to be plain text (at the latest by `finish`).
"""

from __future__ import annotations

import difflib
import enum
import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rkllm_engine.types import (
    Event,
    ReasoningDelta,
    TextDelta,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"

_CALL_ID_ALPHABET = string.ascii_letters + string.digits
_PARAMETER_RE = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
_FUNCTION_HEAD_RE = re.compile(r"([^>\s]+)>")


def new_tool_call_id() -> str:
    """Return an OpenAI-style call id: ``call_`` plus 24 random alphanumerics (docs/openai-api.md §2.1)."""
    return "call_" + "".join(secrets.choice(_CALL_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True, slots=True)
class ParseResult:
    """What one run produced, once the output has ended.

    `events` holds only the events emitted by `OutputParser.finish` (the flush);
    everything else covers the whole output.
    """

    events: list[Event]
    tool_calls: tuple[ToolCall, ...]
    text: str  # all visible text (what TextDelta events carried)
    reasoning: str  # all ReasoningDelta text
    stop_matched: bool
    truncated_call: bool  # the output ended inside an incomplete call (never emitted)
    malformed_calls: list[str] = field(default_factory=list)  # raw text of complete but invalid calls
    unknown_calls: list[str] = field(default_factory=list)  # names of calls of tools that were not offered


class _Mode(enum.Enum):
    TEXT = "text"
    THINK = "think"
    CALL = "call"  # inside <tool_call>
    FUNCTION = "function"  # inside a bare <function=


class _Incomplete:
    """Marker: the call body has not ended yet."""


_INCOMPLETE = _Incomplete()


class _CallError(ValueError):
    """The call body is complete but is not a valid call."""


def _longest_partial_suffix(text: str, candidates: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `candidates`."""
    longest = max((len(c) for c in candidates), default=0) - 1
    for size in range(min(len(text), longest), 0, -1):
        tail = text[-size:]
        if any(c.startswith(tail) and len(c) > size for c in candidates):
            return size
    return 0


def _json_object_end(text: str) -> int | None:
    """Index just past the object that opens `text` (which starts with "{"), or None if it never closes."""
    depth = 0
    in_string = False
    escaped = False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def _arguments_object(value: Any) -> dict[str, Any]:
    """Normalise an ``arguments`` value (object, JSON string, or absent) into a dict."""
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _CallError(f"arguments string is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise _CallError(f"arguments must be a JSON object, got {type(value).__name__}")
    return value


def _parse_json_call(body: str) -> tuple[str, dict[str, Any]] | _Incomplete:
    """Parse a Hermes body ``{"name": …, "arguments": {…}}``."""
    if not body:
        return _INCOMPLETE
    if not body.startswith("{"):
        raise _CallError("call body does not start with a JSON object")
    end = _json_object_end(body)
    if end is None:
        return _INCOMPLETE
    if body[end:].strip():
        raise _CallError("text after the call's JSON object")
    try:
        call = json.loads(body[:end])
    except json.JSONDecodeError as err:
        raise _CallError(f"call body is not valid JSON: {err}") from err
    name = call.get("name") if isinstance(call, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise _CallError("call has no name")
    arguments = call.get("arguments", call.get("parameters"))
    return name.strip(), _arguments_object(arguments)


def _parameter_value(raw: str) -> Any:
    """Decode one XML-style parameter value: JSON when it parses as JSON, else the string itself."""
    value = raw.removeprefix("\n").removesuffix("\n")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _parse_function_call(after_open: str) -> tuple[str, dict[str, Any]] | _Incomplete:
    """Parse what follows ``<function=``: ``NAME>`` then parameters (or a JSON object), then ``</function>``."""
    close = after_open.rfind(FUNCTION_CLOSE)
    if close < 0:
        return _INCOMPLETE
    if after_open[close + len(FUNCTION_CLOSE) :].strip():
        raise _CallError("text after </function>")
    head = _FUNCTION_HEAD_RE.match(after_open)
    if head is None:
        raise _CallError("<function= has no name")
    inner = after_open[head.end() : close]
    arguments: dict[str, Any] = {}
    for match in _PARAMETER_RE.finditer(inner):
        arguments[match.group(1).strip()] = _parameter_value(match.group(2))
    leftover = _PARAMETER_RE.sub("", inner).strip()
    if leftover:
        if arguments or not leftover.startswith("{"):
            raise _CallError("unexpected text inside <function=…>")
        parsed = _parse_json_arguments(leftover)
        arguments = parsed
    return head.group(1), arguments


def _parse_json_arguments(text: str) -> dict[str, Any]:
    """Parse a JSON arguments object given as the body of ``<function=NAME>{…}</function>``."""
    try:
        return _arguments_object(json.loads(text))
    except json.JSONDecodeError as err:
        raise _CallError(f"function body is not valid JSON: {err}") from err


def _parse_call(body: str) -> tuple[str, dict[str, Any]] | _Incomplete:
    """Parse the body of a ``<tool_call>`` block in either format."""
    stripped = body.strip()
    if stripped.startswith(FUNCTION_OPEN):
        return _parse_function_call(stripped[len(FUNCTION_OPEN) :])
    if FUNCTION_OPEN.startswith(stripped) and stripped:
        return _INCOMPLETE
    return _parse_json_call(stripped)


class OutputParser:
    """Incremental parser for one run's output; see the module docstring for the rules.

    `feed` returns the events that became certain with the new text; `finish`
    flushes what was held back and returns the `ParseResult`.
    """

    def __init__(
        self,
        *,
        tools_enabled: bool,
        stop: Sequence[str] = (),
        prefill: str = "",
        max_tool_calls: int | None = None,
        new_call_id: Callable[[], str] = new_tool_call_id,
        in_think: bool = False,
        tool_names: Sequence[str] | None = None,
        forced: bool = False,
    ) -> None:
        if max_tool_calls is not None and max_tool_calls < 0:
            raise ValueError(f"max_tool_calls must be None or >= 0, got {max_tool_calls}")
        self._tools_enabled = tools_enabled
        self._stops = tuple(s for s in stop if s)
        self._max_tool_calls = max_tool_calls
        self._new_call_id = new_call_id
        self._tool_names = None if tool_names is None else tuple(tool_names)
        self._forced = forced
        self._text_tags: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE)
        if tools_enabled:
            self._text_tags += (TOOL_CALL_OPEN, FUNCTION_OPEN)

        self._stop_tail = ""  # raw output held back because it may start a stop string
        self._stop_matched = False
        self._finished = False

        self._mode = _Mode.THINK if in_think else _Mode.TEXT
        self._buffer = ""  # unconsumed text of the current mode
        self._call_scan_from = 0  # where to resume looking for a closing tag in CALL/FUNCTION mode
        self._strip_leading_whitespace = False
        self._after_call_text = ""  # visible text after the last kept call, released before the next one
        self._calls_closed = False  # max_tool_calls reached: later calls and text are dropped

        self._events: list[Event] = []
        self._text_parts: list[str] = []
        self._reasoning_parts: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self._malformed: list[str] = []
        self._unknown: list[str] = []
        self._truncated_call = False

        if prefill:
            # The prefill is parsed as if the model had written it, but the caller forced it into the
            # prompt and knows it: nothing it produces on its own is emitted or counted as output.
            self._consume(prefill)
            self._events.clear()
            self._text_parts.clear()
            self._reasoning_parts.clear()

    @property
    def stop_matched(self) -> bool:
        """True once a stop string matched; the caller should abort the run."""
        return self._stop_matched

    def feed(self, text: str) -> list[Event]:
        """Add the next piece of model output; return the events it made certain."""
        if self._finished:
            raise RuntimeError("OutputParser.feed() called after finish()")
        if self._stop_matched or not text:
            return []
        if self._stops:
            text = self._filter_stops(text)
        self._consume(text)
        events, self._events = self._events, []
        return events

    def finish(self) -> ParseResult:
        """End of output: flush held-back text, settle an open call, and summarise the run."""
        if self._finished:
            raise RuntimeError("OutputParser.finish() called twice")
        self._finished = True
        if self._stop_tail:
            tail, self._stop_tail = self._stop_tail, ""
            self._consume(tail)
        self._flush_at_end()
        events, self._events = self._events, []
        return ParseResult(
            events=events,
            tool_calls=tuple(self._tool_calls),
            text="".join(self._text_parts),
            reasoning="".join(self._reasoning_parts),
            stop_matched=self._stop_matched,
            truncated_call=self._truncated_call,
            malformed_calls=list(self._malformed),
            unknown_calls=list(self._unknown),
        )

    # -- stage 1: stop strings ------------------------------------------------------------

    def _filter_stops(self, text: str) -> str:
        """Return the part of the output that is certainly before any stop string."""
        window = self._stop_tail + text
        best: tuple[int, int] | None = None  # (end, start) of the stop that completes first
        for stop in self._stops:
            start = window.find(stop)
            if start >= 0:
                candidate = (start + len(stop), start)
                if best is None or candidate < best:
                    best = candidate
        if best is not None:
            self._stop_matched = True
            self._stop_tail = ""
            return window[: best[1]]
        held = _longest_partial_suffix(window, self._stops)
        self._stop_tail = window[len(window) - held :] if held else ""
        return window[: len(window) - held]

    # -- stage 2: tags ----------------------------------------------------------------------

    def _consume(self, text: str) -> None:
        self._buffer += text
        while self._step():
            pass

    def _step(self) -> bool:
        """Process the buffer in the current mode; True when the mode changed and there may be more to do."""
        if self._mode is _Mode.TEXT:
            return self._step_text()
        if self._mode is _Mode.THINK:
            return self._step_think()
        if self._mode is _Mode.CALL:
            return self._step_call()
        return self._step_function()

    def _step_text(self) -> bool:
        buffer = self._buffer
        found: tuple[int, str] | None = None
        for tag in self._text_tags:
            index = buffer.find(tag)
            if index >= 0 and (found is None or index < found[0]):
                found = (index, tag)
        if found is None:
            held = _longest_partial_suffix(buffer, self._text_tags)
            self._emit_text(buffer[: len(buffer) - held])
            self._buffer = buffer[len(buffer) - held :]
            return False
        index, tag = found
        self._emit_text(buffer[:index])
        self._buffer = buffer[index + len(tag) :]
        self._call_scan_from = 0
        if tag == THINK_OPEN:
            self._mode = _Mode.THINK
        elif tag == THINK_CLOSE:
            self._strip_leading_whitespace = True  # a stray close tag (the template opened the block)
        elif tag == TOOL_CALL_OPEN:
            self._mode = _Mode.CALL
        else:
            self._mode = _Mode.FUNCTION
        return True

    def _step_think(self) -> bool:
        buffer = self._buffer
        index = buffer.find(THINK_CLOSE)
        if index < 0:
            held = _longest_partial_suffix(buffer, (THINK_CLOSE,))
            self._emit_reasoning(buffer[: len(buffer) - held])
            self._buffer = buffer[len(buffer) - held :]
            return False
        self._emit_reasoning(buffer[:index])
        self._buffer = buffer[index + len(THINK_CLOSE) :]
        self._mode = _Mode.TEXT
        self._strip_leading_whitespace = True
        return True

    def _step_call(self) -> bool:
        buffer = self._buffer
        close = buffer.find(TOOL_CALL_CLOSE, self._call_scan_from)
        reopen = buffer.find(TOOL_CALL_OPEN, self._call_scan_from)
        if close >= 0 and (reopen < 0 or close < reopen):
            body = buffer[:close]
            self._buffer = buffer[close + len(TOOL_CALL_CLOSE) :]
            self._mode = _Mode.TEXT
            self._settle_call(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE, body, at_end=False)
            return True
        if reopen >= 0:
            # A new call starts before this one was closed: the closing tag is missing.
            body = buffer[:reopen]
            self._buffer = buffer[reopen + len(TOOL_CALL_OPEN) :]
            self._call_scan_from = 0
            self._settle_call(TOOL_CALL_OPEN + body, body, at_end=False)
            return True
        self._call_scan_from = max(0, len(buffer) - len(TOOL_CALL_CLOSE) + 1)
        return False

    def _step_function(self) -> bool:
        buffer = self._buffer
        close = buffer.find(FUNCTION_CLOSE, self._call_scan_from)
        if close < 0:
            self._call_scan_from = max(0, len(buffer) - len(FUNCTION_CLOSE) + 1)
            return False
        body = FUNCTION_OPEN + buffer[: close + len(FUNCTION_CLOSE)]
        self._buffer = buffer[close + len(FUNCTION_CLOSE) :]
        self._mode = _Mode.TEXT
        self._settle_call(body, body, at_end=False)
        return True

    def _flush_at_end(self) -> None:
        """Settle whatever the output ended inside of."""
        buffer, self._buffer = self._buffer, ""
        if self._mode is _Mode.TEXT:
            self._emit_text(buffer)  # a partial tag that never completed is plain text
        elif self._mode is _Mode.THINK:
            self._emit_reasoning(buffer)
        elif self._mode is _Mode.CALL:
            # The budget may cut the closing tag itself ("…}}\n</tool_"): the call before it is whole.
            cut = _longest_partial_suffix(buffer.rstrip(), (TOOL_CALL_CLOSE,))
            body = buffer.rstrip()[:-cut] if cut else buffer
            self._settle_call(TOOL_CALL_OPEN + buffer, body, at_end=True)
        else:
            self._settle_call(FUNCTION_OPEN + buffer, FUNCTION_OPEN + buffer, at_end=True)
        self._mode = _Mode.TEXT
        self._after_call_text = ""  # text after the last call is dropped (docs/openai-api.md §3.2)

    def _settle_call(self, raw: str, body: str, *, at_end: bool) -> None:
        """Emit a complete call, or fall back to text for an invalid one, or note a truncated one."""
        try:
            parsed = _parse_call(body)
        except _CallError:
            self._malformed.append(raw)
            self._emit_text(raw)
            return
        if isinstance(parsed, _Incomplete):
            if at_end:
                self._truncated_call = True
            else:
                self._malformed.append(raw)
                self._emit_text(raw)
            return
        name, arguments = parsed
        offered = self._offered_name(name)
        if offered is None:
            self._unknown.append(name)
            if not self._forced:
                self._malformed.append(raw)
                self._emit_text(raw)
            return
        self._emit_call(offered, arguments)

    def _offered_name(self, name: str) -> str | None:
        """The offered tool a call means, or None when it names none of them (rule 6 of the module docstring)."""
        names = self._tool_names
        if names is None or name in names:
            return name
        by_lower = {offered.lower(): offered for offered in names}
        for candidate in (name.strip(), name.strip().rsplit(".", 1)[-1]):
            if candidate in names:
                return candidate
            if candidate.lower() in by_lower:
                return by_lower[candidate.lower()]
        close = difflib.get_close_matches(name, names, n=2, cutoff=0.85)
        if len(close) == 1:
            return close[0]
        if self._forced and names:
            # The request demands a call of an offered tool and the model wrote a call: the offered name most
            # like the one it wrote (the first offered on a tie) keeps the contract; the client checks arguments.
            return max(names, key=lambda offered: difflib.SequenceMatcher(None, name, offered).ratio())
        return None

    # -- emission -------------------------------------------------------------------------

    def _emit_text(self, text: str) -> None:
        if self._strip_leading_whitespace:
            text = text.lstrip()
            if not text:
                return
            self._strip_leading_whitespace = False
        if not text or self._calls_closed:
            return
        if self._tool_calls:
            self._after_call_text += text
            return
        self._events.append(TextDelta(text))
        self._text_parts.append(text)

    def _emit_reasoning(self, text: str) -> None:
        if text:
            self._events.append(ReasoningDelta(text))
            self._reasoning_parts.append(text)

    def _emit_call(self, name: str, arguments: dict[str, Any]) -> None:
        if self._calls_closed:
            return
        if self._max_tool_calls is not None and len(self._tool_calls) >= self._max_tool_calls:
            self._calls_closed = True  # max_tool_calls == 0: the first call is already one too many
            self._after_call_text = ""
            return
        between, self._after_call_text = self._after_call_text, ""
        if between.strip():
            self._events.append(TextDelta(between))
            self._text_parts.append(between)
        index = len(self._tool_calls)
        call = ToolCall(id=self._new_call_id(), name=name, arguments=json.dumps(arguments, ensure_ascii=False))
        self._tool_calls.append(call)
        self._events.append(ToolCallStart(index=index, id=call.id, name=call.name))
        self._events.append(ToolCallArgsDelta(index=index, fragment=call.arguments))
        self._events.append(ToolCallEnd(index=index, arguments=call.arguments))
        if self._max_tool_calls is not None and len(self._tool_calls) >= self._max_tool_calls:
            self._calls_closed = True
            self._after_call_text = ""


_CODE_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)\n?```\s*$", re.DOTALL)


def strip_code_fence(text: str) -> str:
    """The body of a ```json … ``` fence, or the text unchanged: small models fence JSON even when told not to.

    The one rule for a whole answer (AI-task structured output, OpenAI `response_format`); the OpenAI stream's
    `JsonFenceFilter` applies the same rule piece by piece while the answer streams.
    """
    match = _CODE_FENCE.match(text)
    return match.group(1) if match else text
