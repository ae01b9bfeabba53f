"""AI-task structured output: the instruction the model reads and the validation of its answer."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import voluptuous as vol
from homeassistant.components import conversation
from homeassistant.exceptions import HomeAssistantError

from rkllm_engine.output import strip_code_fence
from rkllm_engine.types import ChatMessage

from .chat_content import json_text
from .compat import schema_to_json_schema, selector_serializer
from .const import DOMAIN, LOGGER


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """An AI task's requested structure: validated after the turn, described to the model in the user turn."""

    schema: vol.Schema
    json_schema: dict[str, Any]


def structured_output(structure: vol.Schema, chat_log: conversation.ChatLog) -> StructuredOutput:
    """Describe an AI task's structure as JSON schema with HA's selector serializer."""
    serializer = chat_log.llm_api.custom_serializer if chat_log.llm_api is not None else None
    return StructuredOutput(structure, schema_to_json_schema(structure, serializer or selector_serializer()))


def with_structure_instruction(messages: list[ChatMessage], structure: StructuredOutput) -> list[ChatMessage]:
    """Ask for the structure in the last user message (the dynamic end of the prompt, not the cached prefix)."""
    instruction = "Reply with one JSON object only, no code fences, that matches this JSON schema: " + json_text(
        structure.json_schema
    )
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.role == "user":
            updated = dataclasses.replace(message, content=f"{message.content or ''}\n\n{instruction}")
            return [*messages[:index], updated, *messages[index + 1 :]]
    return [*messages, ChatMessage(role="user", content=instruction)]


def decode_json_answer(text: str) -> Any:
    """The JSON value of an answer; tolerates code fences and text around one object. Raises ValueError."""
    candidate = strip_code_fence(text.strip())
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
