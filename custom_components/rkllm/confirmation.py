"""Quick confirmations: one successful device action ends the turn with Home Assistant's own localized sentence.

Why: a warm "turn on the kitchen light" costs two model rounds: round 1 writes the tool call, round 2 reads the
tool result and writes "Done, the kitchen light is on". Round 2 is the prefill of the tool result plus the decode of
the sentence: 0.87 s of a 2.95 s warm turn at the emulator's RK3588 timing (bench/quick_confirmation.py), and the
person hears nothing before it ends. When the round made
exactly one call of a device action intent (DEVICE_ACTION_INTENTS) and Home Assistant reports it done, the sentence
Home Assistant's own (default) agent would have spoken is known without the model: the `home-assistant-intents`
response template of that intent, in the conversation's language.

How the sentence is made, as the default agent makes it (`conversation/default_agent.py`, both HA lines):
- The response *key* comes from the matched sentence's metadata there (`response:`, else "default"). There is no
  sentence here, so `pick_block` chooses the sentence block of the language's intent data that fits the call:
  its domain constraints (`requires_context`/`excludes_context`/fixed `slots`) hold for the matched entities, every
  argument of the call is a slot its sentences can fill, and it leaves the fewest of its slots unfilled (ties: the
  block with a domain constraint, then the first). Key names differ between languages ("lights_area" in English,
  "light" in German), so they are never hard-coded.
- The template is rendered with Home Assistant's template engine and the default agent's variables: `slots` (the
  block's fixed slot values, the call's arguments, and the intent response's speech slots where Home Assistant keeps
  the response object, 2025.8+), `state` (the first matched entity) and `query.matched` / `query.unmatched`.
  Rendering is strict: a template that needs a slot the call does not have fails instead of speaking half a
  sentence.

Anything else is left to the model (`async_quick_confirm` returns False): several calls, another intent, an error or
a failed target, matched entities of several domains, no template for the language or the key, a template that fails
or renders empty or renders "None" (a lookup table without the entity's domain). The option and its trade-off:
docs/home-assistant.md §2.8.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from homeassistant.components import conversation
from homeassistant.core import HomeAssistant, State
from homeassistant.exceptions import TemplateError
from homeassistant.helpers import intent, template
from homeassistant.util import language as language_util

from .compat import intent_handler_for_tool, tool_result_payload
from .const import LOGGER

try:
    from home_assistant_intents import get_intents, get_languages  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - shipped with Home Assistant's conversation integration
    get_intents = get_languages = None

# Intents that act on devices and whose success Home Assistant confirms with a fixed sentence. From the response
# templates of home-assistant-intents 2025.3.28 (HA 2025.4.4) and 2026.1.28 (HA 2026.2.3). Left out on purpose:
# queries (HassGetState, HassClimateGetTemperature, HassGetWeather, dates/times, GetLiveContext), timers, lists,
# HassMediaSearchAndPlay (the sentence names what was found), HassBroadcast and HassRespond. Intents without a
# template in a language (HassToggle, HassStopMoving everywhere; HassFanSetSpeed in French) go to the model.
DEVICE_ACTION_INTENTS: Final = frozenset(
    {
        "HassTurnOn",
        "HassTurnOff",
        "HassToggle",
        "HassLightSet",
        "HassSetPosition",
        "HassStopMoving",
        "HassFanSetSpeed",
        "HassClimateSetTemperature",
        "HassMediaPause",
        "HassMediaUnpause",
        "HassMediaNext",
        "HassMediaPrevious",
        "HassSetVolume",
        "HassSetVolumeRelative",
        "HassMediaPlayerMute",
        "HassMediaPlayerUnmute",
        "HassVacuumStart",
        "HassVacuumReturnToBase",
        "HassLawnMowerStartMowing",
        "HassLawnMowerDock",
    }
)
DEFAULT_RESPONSE: Final = "default"
# Arguments that only steer matching; sentences fill them through fixed slots or context, never as words.
_MATCH_ONLY_ARGUMENTS: Final = frozenset({"domain", "preferred_area_id", "preferred_floor_id"})
_SLOT_REFERENCE: Final = re.compile(r"\{([^{}:]+)(?::([^{}]+))?\}")
_RULE_REFERENCE: Final = re.compile(r"<([^<>]+)>")
_NONE_WORD: Final = re.compile(r"\bNone\b")


# ---------------------------------------------------------------------------------------------------------------
# The language's response templates and sentence blocks (loaded once per language, in an executor)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentenceBlock:
    """What one data block of an intent's sentences says about the calls it stands for, and its response key."""

    response: str
    slots: frozenset[str]  # slots its sentences (or the context) can fill
    domains: frozenset[str] | None  # the matched entities' domain must be one of these (None = any)
    excluded_domains: frozenset[str]
    fixed: Mapping[str, frozenset[str]]  # fixed slot values besides the domain (e.g. device_class: garage)
    required_attributes: Mapping[str, frozenset[str]]  # other requires_context keys, checked on the states
    excluded_attributes: Mapping[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class LanguageResponses:
    """The response templates and sentence blocks of the device action intents in one language."""

    language: str
    templates: Mapping[str, Mapping[str, str]]  # intent → response key → template
    blocks: Mapping[str, tuple[SentenceBlock, ...]]  # intent → its sentence blocks, in file order


def _strings(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset({value})
    if isinstance(value, list | tuple | set | frozenset):
        return frozenset(str(item) for item in value)
    return frozenset()


class _SlotFinder:
    """Slot names a sentence template can fill: `{list}` / `{list:slot}` directly or through `<rules>`."""

    def __init__(self, rules: Mapping[str, str]) -> None:
        self._rules = rules
        self._memo: dict[str, frozenset[str]] = {}

    def slots(self, text: str, local_rules: Mapping[str, str], seen: frozenset[str] = frozenset()) -> set[str]:
        found = {(match.group(2) or match.group(1)).strip() for match in _SLOT_REFERENCE.finditer(text)}
        for match in _RULE_REFERENCE.finditer(text):
            name = match.group(1).strip()
            if name in seen:
                continue
            if name in local_rules:
                found |= self.slots(local_rules[name], local_rules, seen | {name})
            elif name in self._rules:
                if name not in self._memo:
                    self._memo[name] = frozenset(self.slots(self._rules[name], {}, seen | {name}))
                found |= self._memo[name]
        return found


def _attribute_constraints(context: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """Context constraints on the matched states' attributes (e.g. device_class), besides domain and slot copies."""
    return {
        key: _strings(value) for key, value in context.items() if key != "domain" and not isinstance(value, Mapping)
    }


def _block(data: Mapping[str, Any], finder: _SlotFinder) -> SentenceBlock:
    local_rules = {str(key): str(value) for key, value in (data.get("expansion_rules") or {}).items()}
    slots: set[str] = set()
    for sentence in data.get("sentences") or ():
        slots |= finder.slots(str(sentence), local_rules)
    fixed_slots: Mapping[str, Any] = data.get("slots") or {}
    requires: Mapping[str, Any] = data.get("requires_context") or {}
    excludes: Mapping[str, Any] = data.get("excludes_context") or {}
    for key, value in requires.items():
        if isinstance(value, Mapping) and value.get("slot"):  # filled from the context, e.g. the satellite's area
            slots.add(value["slot"] if isinstance(value["slot"], str) else key)
    domains: frozenset[str] | None = None
    for allowed in (requires.get("domain"), fixed_slots.get("domain")):
        if allowed is not None and not isinstance(allowed, Mapping):
            domains = _strings(allowed) if domains is None else domains & _strings(allowed)
    return SentenceBlock(
        response=str(data.get("response") or DEFAULT_RESPONSE),
        slots=frozenset(slots),
        domains=domains,
        excluded_domains=_strings(excludes.get("domain")),
        fixed={key: _strings(value) for key, value in fixed_slots.items() if key != "domain"},
        required_attributes=_attribute_constraints(requires),
        excluded_attributes=_attribute_constraints(excludes),
    )


def language_responses_from(language: str, data: Mapping[str, Any]) -> LanguageResponses:
    """The device action part of one language file of home-assistant-intents."""
    responses: Mapping[str, Any] = (data.get("responses") or {}).get("intents") or {}
    intents: Mapping[str, Any] = data.get("intents") or {}
    finder = _SlotFinder({str(key): str(value) for key, value in (data.get("expansion_rules") or {}).items()})
    templates = {
        name: {str(key): str(value) for key, value in responses[name].items()}
        for name in DEVICE_ACTION_INTENTS
        if isinstance(responses.get(name), Mapping)
    }
    blocks = {
        name: tuple(_block(block, finder) for block in (intents.get(name) or {}).get("data") or ())
        for name in templates
    }
    return LanguageResponses(language, templates, blocks)


@functools.lru_cache(maxsize=8)
def load_language_responses(language: str) -> LanguageResponses | None:
    """The responses for a conversation language ("de-DE" → "de"), None without any. Blocking: reads a file."""
    if get_intents is None or get_languages is None:
        return None
    for candidate in language_util.matches(language, get_languages()):
        data = get_intents(candidate)
        if data:
            return language_responses_from(candidate, data)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Choosing and rendering the sentence
# ---------------------------------------------------------------------------------------------------------------


def _values(value: Any) -> frozenset[str]:
    """An argument's values as strings (a list's items, else the value itself)."""
    return _strings(value) or frozenset({str(value)})


def _block_cost(block: SentenceBlock, arguments: Mapping[str, Any], states: list[State]) -> int | None:
    """How many of the block's slots the call leaves unfilled, or None when the block cannot stand for the call."""
    domains = {state.domain for state in states}
    if block.domains is not None and not domains <= block.domains:
        return None
    if domains & block.excluded_domains:
        return None
    for key, allowed in block.required_attributes.items():
        if not all(str(state.attributes.get(key)) in allowed for state in states):
            return None
    for key, excluded in block.excluded_attributes.items():
        if any(str(state.attributes.get(key)) in excluded for state in states):
            return None
    given = {key for key in arguments if key not in _MATCH_ONLY_ARGUMENTS}
    if not given <= block.slots | block.fixed.keys():
        return None
    cost = len(block.slots - given)
    for key, values in block.fixed.items():
        if key not in arguments:
            cost += 1  # the sentence implies a value ("all", "garage") the call did not ask for
        elif not _values(arguments[key]) & values:
            return None
    return cost


# An intent with templates but no sentences in a language: Home Assistant's default response key.
_DEFAULT_BLOCK: Final = SentenceBlock(
    response=DEFAULT_RESPONSE,
    slots=frozenset(),
    domains=None,
    excluded_domains=frozenset(),
    fixed={},
    required_attributes={},
    excluded_attributes={},
)


def pick_block(
    responses: LanguageResponses, intent_type: str, arguments: Mapping[str, Any], states: list[State]
) -> SentenceBlock | None:
    """The sentence block that best fits the call (module docstring), None if none fits or has a template."""
    templates = responses.templates.get(intent_type) or {}
    blocks = responses.blocks.get(intent_type) or ()
    if not blocks:
        return _DEFAULT_BLOCK if DEFAULT_RESPONSE in templates else None
    best: tuple[int, int, int] | None = None
    best_block: SentenceBlock | None = None
    for index, block in enumerate(blocks):
        if block.response not in templates:
            continue
        cost = _block_cost(block, arguments, states)
        if cost is None:
            continue
        rank = (cost, 0 if block.domains is not None else 1, index)
        if best is None or rank < best:
            best, best_block = rank, block
    return best_block


def speech_slots(
    arguments: Mapping[str, Any], fixed: Mapping[str, frozenset[str]], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The template's `slots`: the block's fixed values, the call's arguments, then the response's speech slots.

    A one-item list counts as its item; a slot with several values has no single word and is left out (a template
    that needs it fails, rendering is strict).
    """
    slots: dict[str, Any] = {key: next(iter(values)) for key, values in fixed.items() if len(values) == 1}
    for key, value in arguments.items():
        if isinstance(value, list | tuple):
            if len(value) == 1:
                slots[key] = value[0]
            continue
        slots[key] = value
    slots.update(extra or {})
    return slots


def render_confirmation(
    hass: HomeAssistant,
    source: str,
    slots: Mapping[str, Any],
    matched: list[State],
    unmatched: list[State] | None = None,
) -> str | None:
    """Render a response template like the default agent's `_build_speech`; None if it fails or says nothing."""
    unmatched = unmatched or []
    first = matched[0] if matched else (unmatched[0] if unmatched else None)
    try:
        rendered = template.Template(source, hass).async_render(
            {
                "slots": dict(slots),
                "state": template.TemplateState(hass, first) if first is not None else None,
                "query": {
                    "matched": [template.TemplateState(hass, state) for state in matched],
                    "unmatched": [template.TemplateState(hass, state) for state in unmatched],
                },
            },
            parse_result=False,
            strict=True,
        )
    except TemplateError as err:
        LOGGER.debug("Response template did not render (%s): %s", err, source)
        return None
    speech = " ".join(str(rendered).split())
    if not speech or _NONE_WORD.search(speech):
        return None
    return speech


# ---------------------------------------------------------------------------------------------------------------
# The chat log
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceAction:
    """The round's one successful device action: what was called and what it matched."""

    intent_type: str
    arguments: Mapping[str, Any]
    matched: list[State]
    speech_slots: Mapping[str, Any]


def _round_call(
    content: list[conversation.Content],
) -> tuple[conversation.AssistantContent, conversation.ToolResultContent] | None:
    """The last round's call and its result when the round made exactly one call."""
    if len(content) < 2:
        return None
    assistant, result = content[-2], content[-1]
    if not isinstance(assistant, conversation.AssistantContent) or not isinstance(
        result, conversation.ToolResultContent
    ):
        return None
    calls = assistant.tool_calls or []
    if len(calls) != 1 or calls[0].id != result.tool_call_id:
        return None
    return assistant, result


def _target_ids(data: Mapping[str, Any], key: str) -> list[str]:
    items = data.get(key)
    return [
        str(item["id"])
        for item in (items if isinstance(items, list) else [])
        if isinstance(item, Mapping) and item.get("type", "entity") == "entity" and item.get("id")
    ]


def device_action(hass: HomeAssistant, chat_log: conversation.ChatLog) -> DeviceAction | None:
    """The round's one successful device action, or None when the model must answer (module docstring)."""
    found = _round_call(chat_log.content)
    api = chat_log.llm_api
    if found is None or api is None:
        return None
    assistant, result = found
    call = (assistant.tool_calls or [])[0]
    tool = next((tool for tool in api.tools if tool.name == call.tool_name), None)
    handler = intent_handler_for_tool(hass, tool) if tool is not None else None
    if handler is None or handler.intent_type not in DEVICE_ACTION_INTENTS:
        return None
    data, is_error = tool_result_payload(result)
    if is_error or not isinstance(data, Mapping):
        return None
    if data.get("response_type") != intent.IntentResponseType.ACTION_DONE.value:
        return None
    targets = data.get("data")
    if not isinstance(targets, Mapping) or targets.get("failed"):
        return None
    original = getattr(data, "original", None)  # 2025.8+: the IntentResponse itself (llm.IntentResponseDict)
    if isinstance(original, intent.IntentResponse) and original.matched_states:
        matched = list(original.matched_states)
        extra = dict(original.speech_slots)
    else:
        matched = [state for entity_id in _target_ids(targets, "success") if (state := hass.states.get(entity_id))]
        extra = {}
    if not matched or len({state.domain for state in matched}) != 1:
        return None
    return DeviceAction(handler.intent_type, dict(call.tool_args), matched, extra)


def confirmation_sentence(hass: HomeAssistant, responses: LanguageResponses, action: DeviceAction) -> str | None:
    """Home Assistant's sentence for the action in the responses' language, None when there is none."""
    block = pick_block(responses, action.intent_type, action.arguments, action.matched)
    if block is None:
        return None
    source = responses.templates[action.intent_type][block.response]
    slots = speech_slots(action.arguments, block.fixed, action.speech_slots)
    return render_confirmation(hass, source, slots, action.matched)


def conversation_language(hass: HomeAssistant, chat_log: conversation.ChatLog) -> str:
    """The turn's language: the conversation input's, which Home Assistant copies into the LLM context."""
    llm_context = chat_log.llm_api.llm_context if chat_log.llm_api is not None else None
    return str(getattr(llm_context, "language", None) or hass.config.language)


async def _sentence_deltas(sentence: str) -> AsyncIterator[conversation.AssistantContentDeltaDict]:
    yield {"role": "assistant"}
    yield {"content": sentence}


async def async_quick_confirm(hass: HomeAssistant, chat_log: conversation.ChatLog, agent_id: str) -> bool:
    """End the turn with Home Assistant's sentence if the last round was one successful device action.

    The sentence goes into the chat log as the assistant's answer after the tool result, through the same delta
    stream as the model's text (the Assist pipeline streams it to text-to-speech, agent models to their client).
    Returns False, having changed nothing, whenever the model should answer instead. Never raises.
    """
    try:
        action = device_action(hass, chat_log)
        if action is None:
            return False
        responses = await hass.async_add_executor_job(load_language_responses, conversation_language(hass, chat_log))
        sentence = confirmation_sentence(hass, responses, action) if responses is not None else None
    except Exception:  # noqa: BLE001 - a confirmation problem must cost the model round, not the turn
        LOGGER.exception("Quick confirmation failed; the model answers instead")
        return False
    if sentence is None:
        LOGGER.debug("No quick confirmation for %s; the model answers", action.intent_type)
        return False
    chat_log.async_trace({"quick_confirmation": {"intent": action.intent_type, "speech": sentence}})
    async for _content in chat_log.async_add_delta_content_stream(agent_id, _sentence_deltas(sentence)):
        pass
    return True
