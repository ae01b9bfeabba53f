"""Engine events → OpenAI objects: one translator per endpoint serves both the SSE stream and the plain response.

The non-streamed object is built from the same state the chunks came from, so a client sees the same text, tool
calls and finish reason either way. Delta discipline (docs/openai-api.md §2.2-2.3): `role` only in the first chunk; each
tool call's `index`, `id`, `type` and name once, then only argument fragments; a finish chunk with `delta: {}`; a
usage chunk with `choices: []` only when `stream_options.include_usage` asked for it.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
import time
from typing import Any, Final

from rkllm_engine.types import (
    Event,
    Finished,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)

from .schemas import (
    AssistantMessageObject,
    ChatCompletionChunkObject,
    ChatCompletionObject,
    ChunkDelta,
    ErrorBody,
    TextCompletionObject,
    ToolCallObject,
    UsageObject,
)

_LOGGER = logging.getLogger(__name__)

SSE_DONE: Final = b"data: [DONE]\n\n"
# A comment line: the SDK, browsers' EventSource and other SSE parsers skip it (never a named `event:`, §2.6).
SSE_PING: Final = b": ping\n\n"
SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx (HA add-ons, reverse proxies) must not buffer the stream
}
_ID_ALPHABET: Final = string.ascii_letters + string.digits
_FENCE_CHARS: Final = frozenset("`\n\r\t ")


def new_completion_id(prefix: str) -> str:
    """`chatcmpl-…` / `cmpl-…` plus 32 random alphanumerics, like llama.cpp (docs/openai-api.md §2.1)."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(32))


def sse_event(payload: Any) -> bytes:
    """One SSE event: `data: <one-line JSON>` and a blank line (JSON escapes every newline inside strings)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def sse_error(body: ErrorBody) -> bytes:
    """An error after the stream started: in-band, then the caller sends `[DONE]` (the SDK raises APIError)."""
    return sse_event(body)


def usage_object(usage: Usage) -> UsageObject:
    """The engine's token accounting in OpenAI's shape."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class JsonFenceFilter:
    """Removes a ```json … ``` fence around a JSON answer while it streams (response_format, best effort).

    The start is held until it is clear whether a fence opens; once one did, trailing backticks and whitespace are
    held until more text shows they were content, and a closing fence is dropped at the end.
    """

    def __init__(self) -> None:
        self._head = ""
        self._decided = False
        self._fenced = False
        self._tail = ""

    def feed(self, text: str) -> str:
        """Visible text for this piece (possibly empty while undecided or held)."""
        if not self._decided:
            self._head += text
            stripped = self._head.lstrip()
            if not stripped or ("```".startswith(stripped) and len(stripped) < 3):
                return ""
            if not stripped.startswith("```"):
                self._decided = True
                text, self._head = self._head, ""
                return text
            newline = stripped.find("\n")
            if newline < 0:
                return ""
            self._decided = True
            self._fenced = True
            text, self._head = stripped[newline + 1 :], ""
            return self._hold_tail(text)
        if not self._fenced:
            return text
        return self._hold_tail(text)

    def finish(self) -> str:
        """What was held back, minus a closing fence."""
        if not self._decided:
            text, self._head = self._head, ""
            return text
        tail, self._tail = self._tail, ""
        if self._fenced:
            stripped = tail.rstrip()
            if stripped.endswith("```"):
                return stripped[:-3].rstrip()
        return tail

    def _hold_tail(self, text: str) -> str:
        combined = self._tail + text
        cut = len(combined)
        while cut > 0 and combined[cut - 1] in _FENCE_CHARS:
            cut -= 1
        self._tail = combined[cut:]
        return combined[:cut]


class ChatCompletionTranslator:
    """Engine events → `chat.completion.chunk` dicts; `completion()` gives the `chat.completion` object."""

    def __init__(self, *, model: str, include_usage: bool = False, json_mode: bool = False) -> None:
        """One translator per request; the id and `created` are shared by every chunk."""
        self.id = new_completion_id("chatcmpl-")
        self.created = int(time.time())
        self.model = model
        self._include_usage = include_usage
        self._json_filter = JsonFenceFilter() if json_mode else None
        self._started = False
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, ToolCallObject] = {}
        self.finished: Finished | None = None

    @property
    def text(self) -> str:
        """The visible answer so far."""
        return "".join(self._text)

    def start(self) -> list[ChatCompletionChunkObject]:
        """The first chunk, the only one with `role` (empty list if already sent)."""
        if self._started:
            return []
        self._started = True
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, event: Event) -> list[ChatCompletionChunkObject]:
        """The chunks one engine event becomes (the role chunk first, if not yet sent)."""
        chunks = self.start()
        if isinstance(event, TextDelta):
            text = self._json_filter.feed(event.text) if self._json_filter is not None else event.text
            if text:
                self._text.append(text)
                chunks.append(self._chunk({"content": text}))
        elif isinstance(event, ReasoningDelta):
            self._reasoning.append(event.text)
            chunks.append(self._chunk({"reasoning_content": event.text}))
        elif isinstance(event, ToolCallStart):
            self._calls[event.index] = {
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            chunks.append(
                self._chunk(
                    {
                        "tool_calls": [
                            {
                                "index": event.index,
                                "id": event.id,
                                "type": "function",
                                "function": {"name": event.name, "arguments": ""},
                            }
                        ]
                    }
                )
            )
        elif isinstance(event, ToolCallArgsDelta):
            if (call := self._calls.get(event.index)) is not None:
                call["function"]["arguments"] += event.fragment
            chunks.append(
                self._chunk({"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]})
            )
        elif isinstance(event, ToolCallEnd):
            if (call := self._calls.get(event.index)) is not None:
                call["function"]["arguments"] = event.arguments
        elif isinstance(event, Finished):
            chunks.extend(self._finish(event))
        return chunks

    def completion(self) -> ChatCompletionObject:
        """The non-streamed object (call after `Finished` was fed)."""
        finished = self._require_finished()
        calls = self._final_calls(finished)
        text = self.text
        message: AssistantMessageObject = {
            "role": "assistant",
            # OpenAI sends null content next to tool calls when no text preceded them (docs/openai-api.md §2.1).
            "content": None if calls and not text else text,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finished.finish_reason}],
            "usage": usage_object(finished.usage),
        }

    def _finish(self, finished: Finished) -> list[ChatCompletionChunkObject]:
        self.finished = finished
        chunks: list[ChatCompletionChunkObject] = []
        if self._json_filter is not None:
            if rest := self._json_filter.finish():
                self._text.append(rest)
                chunks.append(self._chunk({"content": rest}))
            self._check_json()
        chunks.append(self._chunk({}, finish_reason=finished.finish_reason))
        if self._include_usage:
            chunks.append(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage_object(finished.usage),
                }
            )
        return chunks

    def _check_json(self) -> None:
        """Best effort: the runtime has no grammar, so a JSON answer is asked for, not enforced (§3.5)."""
        if self._calls:
            return
        try:
            json.loads(self.text)
        except ValueError:
            _LOGGER.warning(
                "response_format asked for JSON but the model's answer is not valid JSON: %.200s", self.text
            )

    def _final_calls(self, finished: Finished) -> list[ToolCallObject]:
        if finished.tool_calls:
            return [
                {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for call in finished.tool_calls
            ]
        return [self._calls[index] for index in sorted(self._calls)]

    def _require_finished(self) -> Finished:
        if self.finished is None:
            raise RuntimeError("the generation has not finished")
        return self.finished

    def _chunk(self, delta: ChunkDelta, finish_reason: str | None = None) -> ChatCompletionChunkObject:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }


class TextCompletionTranslator:
    """Engine events → legacy `text_completion` objects: the stream uses the same object type (§2.5)."""

    def __init__(self, *, model: str, include_usage: bool = False) -> None:
        """One translator per request; the id and `created` are shared by every event."""
        self.id = new_completion_id("cmpl-")
        self.created = int(time.time())
        self.model = model
        self._include_usage = include_usage
        self._text: list[str] = []
        self.finished: Finished | None = None

    def start(self) -> list[TextCompletionObject]:
        """Legacy streams have no role chunk."""
        return []

    def feed(self, event: Event) -> list[TextCompletionObject]:
        """The stream events one engine event becomes (reasoning and tool events do not exist for a raw prompt)."""
        if isinstance(event, TextDelta) and event.text:
            self._text.append(event.text)
            return [self._event(event.text, None)]
        if isinstance(event, Finished):
            self.finished = event
            events = [self._event("", self._finish_reason(event))]
            if self._include_usage:
                events.append(
                    {
                        "id": self.id,
                        "object": "text_completion",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": usage_object(event.usage),
                    }
                )
            return events
        return []

    def completion(self) -> TextCompletionObject:
        """The non-streamed object (call after `Finished` was fed)."""
        if self.finished is None:
            raise RuntimeError("the generation has not finished")
        result = self._event("".join(self._text), self._finish_reason(self.finished))
        result["usage"] = usage_object(self.finished.usage)
        return result

    @staticmethod
    def _finish_reason(finished: Finished) -> str:
        # Legacy completions only know stop | length | content_filter.
        return "length" if finished.finish_reason == "length" else "stop"

    def _event(self, text: str, finish_reason: str | None) -> TextCompletionObject:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
        }
