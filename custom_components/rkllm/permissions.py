"""Tool calls run with the requesting user's permissions; a failed target match is kept as structured facts.

Home Assistant runs an LLM tool for any user who can talk to the agent; a non-admin user must not switch what
they may not control. The checked API instance wraps every tool call of the chat-log loop (entity.py), so it is
also where a `MatchFailedError` is still an object: its fields (`result.no_match_reason`, `constraints`, …)
become the short sentence the model reads (chat_content.py), never its English text.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from homeassistant.auth.permissions.const import POLICY_CONTROL
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import intent, llm
from homeassistant.util.json import JsonObjectType

from .chat_content import SentTranscript, short_match_failure
from .compat import MATCH_FAILURE_TEXT_IS_SENTENCE, intent_handler_for_tool


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
    """An LLM API instance whose tool calls are checked against the requesting user's permissions first.

    With a transcript, a call that fails with MatchFailedError records the sentence the model reads instead of
    Home Assistant's text (only where that text is the error's field dump: 2026.10+ writes a sentence itself).
    """

    transcript: SentTranscript | None = None  # a plain class attribute, not a dataclass field

    async def async_call_tool(self, tool_input: llm.ToolInput) -> JsonObjectType:
        """Check, then run the tool as Home Assistant would."""
        for tool in self.tools:
            if tool.name == tool_input.tool_name:
                await async_check_tool_permission(self.api.hass, tool, tool_input, self.llm_context)
                break
        try:
            return await super().async_call_tool(tool_input)
        except intent.MatchFailedError as err:
            sentence = None if MATCH_FAILURE_TEXT_IS_SENTENCE else short_match_failure(err)
            if self.transcript is not None and sentence is not None:
                self.transcript.remember_match_failure(tool_input.id, sentence)
            raise


def with_permission_checks(
    api_instance: llm.APIInstance, transcript: SentTranscript | None = None
) -> PermissionCheckedAPIInstance:
    """The same API instance with permission-checked tool calls (fields copied, so newer fields survive)."""
    if isinstance(api_instance, PermissionCheckedAPIInstance):
        checked = api_instance
    else:
        values = {
            field.name: getattr(api_instance, field.name) for field in dataclasses.fields(api_instance) if field.init
        }
        checked = PermissionCheckedAPIInstance(**values)
    if transcript is not None:
        checked.transcript = transcript
    return checked
