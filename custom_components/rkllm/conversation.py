"""Conversation platform: one Assist agent per `conversation` subentry, answering on the NPU."""

from __future__ import annotations

from typing import Literal

from homeassistant.components import conversation
from homeassistant.components.conversation.models import AbstractConversationAgent
from homeassistant.config_entries import ConfigSubentry
from homeassistant.const import MATCH_ALL
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from rkllm_engine.types import Priority

from .compat import apis_requiring_admin, async_provide_llm_data, result_from_chat_log
from .const import DOMAIN, SUBENTRY_CONVERSATION
from .data import RkllmConfigEntry
from .entity import RkllmBaseLLMEntity, TurnUsage

# Every turn waits for the single NPU slot; HA must not run entity updates in parallel for us.
PARALLEL_UPDATES = 0

# Loaded agents by entity id, for `agent_api` (agents served as OpenAI models).


async def async_setup_entry(
    hass: HomeAssistant,
    config_entry: RkllmConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add one conversation entity per conversation subentry."""
    for subentry in config_entry.subentries.values():
        if subentry.subentry_type != SUBENTRY_CONVERSATION:
            continue
        async_add_entities([RkllmConversationEntity(config_entry, subentry)], config_subentry_id=subentry.subentry_id)


class RkllmConversationEntity(
    conversation.ConversationEntity,
    AbstractConversationAgent,
    RkllmBaseLLMEntity,
):
    """An Assist conversation agent backed by the rkllm engine."""

    _attr_supports_streaming = True

    def __init__(self, entry: RkllmConfigEntry, subentry: ConfigSubentry) -> None:
        super().__init__(entry, subentry)
        if self.settings.llm_apis:
            self._attr_supported_features = conversation.ConversationEntityFeature.CONTROL

    @property
    def supported_languages(self) -> list[str] | Literal["*"]:
        """Any language: the model decides what it understands."""
        return MATCH_ALL

    async def async_added_to_hass(self) -> None:
        """Register as agent (for `agent_id=<entry_id>` callers) and for the agent models API."""
        await super().async_added_to_hass()
        conversation.async_set_agent(self.hass, self.entry, self)
        self.entry.runtime_data.agents[self.entity_id] = self

    async def async_will_remove_from_hass(self) -> None:
        """Unregister."""
        self.entry.runtime_data.agents.pop(self.entity_id, None)
        conversation.async_unset_agent(self.hass, self.entry)
        await super().async_will_remove_from_hass()

    async def _async_handle_message(
        self,
        user_input: conversation.ConversationInput,
        chat_log: conversation.ChatLog,
    ) -> conversation.ConversationResult:
        """Answer one Assist turn."""
        result, _usage = await self.async_handle_turn(user_input, chat_log)
        return result

    async def async_handle_turn(
        self,
        user_input: conversation.ConversationInput,
        chat_log: conversation.ChatLog,
        priority: Priority = Priority.CONVERSATION,
    ) -> tuple[conversation.ConversationResult, TurnUsage]:
        """The whole turn (Assist and agent models alike): permissions, LLM data, tool loop, result.

        Assist turns are voice (`Priority.CONVERSATION`); the agent models of the API pass `Priority.API`, so API
        clients never get voice's place in the NPU queue (docs/voice.md §1).
        """
        settings = self.settings
        user_id = user_input.context.user_id
        if user_id is not None and (admin_only := apis_requiring_admin(self.hass, settings.llm_apis)):
            user = await self.hass.auth.async_get_user(user_id)
            if user is None or not user.is_admin:
                raise HomeAssistantError(
                    translation_domain=DOMAIN,
                    translation_key="admin_required",
                    translation_placeholders={"apis": ", ".join(admin_only)},
                )
        try:
            await async_provide_llm_data(chat_log, user_input, settings.llm_apis, settings.prompt)
        except conversation.ConverseError as err:
            return err.as_conversation_result(), TurnUsage()
        usage = await self._async_handle_chat_log(chat_log, priority=priority)
        return result_from_chat_log(user_input, chat_log), usage
