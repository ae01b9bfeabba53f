"""AI Task platform (Home Assistant 2025.7+): generate text or structured data through the same tool loop.

Only forwarded where `Platform.AI_TASK` exists (compat.entry_platforms). A requested structure is described to
the model as JSON schema in the user turn and the request runs in JSON mode; the answer must decode to a JSON
object that passes the task's schema, else the task fails with a translated error.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from homeassistant.components import ai_task, conversation  # type: ignore[attr-defined, unused-ignore]
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from rkllm_engine.types import Priority

from .const import DOMAIN, SUBENTRY_AI_TASK
from .data import RkllmConfigEntry
from .entity import AgentSettings, RkllmBaseLLMEntity
from .structured import structured_output, validate_structured_answer

PARALLEL_UPDATES = 0


async def async_setup_entry(
    hass: HomeAssistant,
    config_entry: RkllmConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add one AI task entity per `ai_task_data` subentry."""
    for subentry in config_entry.subentries.values():
        if subentry.subentry_type != SUBENTRY_AI_TASK:
            continue
        async_add_entities([RkllmTaskEntity(config_entry, subentry)], config_subentry_id=subentry.subentry_id)


class RkllmTaskEntity(ai_task.AITaskEntity, RkllmBaseLLMEntity):  # type: ignore[misc, unused-ignore]
    """Generates data for AI tasks on the NPU."""

    _attr_supported_features = ai_task.AITaskEntityFeature.GENERATE_DATA

    @property
    def settings(self) -> AgentSettings:
        """This task's options; no quick confirmations: a task's result is data for automations, not speech."""
        return dataclasses.replace(super().settings, quick_confirmations=False)

    async def _async_generate_data(
        self, task: ai_task.GenDataTask, chat_log: conversation.ChatLog
    ) -> ai_task.GenDataTaskResult:
        """Answer the task's chat log; decode and validate when a structure was requested."""
        structure = structured_output(task.structure, chat_log) if task.structure else None
        # Nobody waits for an AI task in real time: it runs with background priority, never on the voice slot.
        await self._async_handle_chat_log(chat_log, structure, priority=Priority.BACKGROUND)
        last = chat_log.content[-1]
        if not isinstance(last, conversation.AssistantContent):
            raise HomeAssistantError(translation_domain=DOMAIN, translation_key="no_response")
        text = last.content or ""
        data: Any = text if task.structure is None else validate_structured_answer(text, task.structure)
        return ai_task.GenDataTaskResult(conversation_id=chat_log.conversation_id, data=data)
