"""Quick confirmations: one successful device action is answered with Home Assistant's own sentence, in one round.

Every turn runs on the real engine; the number of engine requests of a turn is counted on the way to the engine.
Anything that is not exactly one successful device action must still get the model's own answer (a second round).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from homeassistant.components import conversation
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity
from homeassistant.const import STATE_ON
from homeassistant.core import Context, HomeAssistant, State
from homeassistant.helpers import area_registry as ar
from homeassistant.helpers import chat_session, intent
from homeassistant.helpers import entity_registry as er
from homeassistant.setup import async_setup_component
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_homeassistant_custom_component.common import MockConfigEntry, setup_test_component_platform

from custom_components.rkllm.agent_api import AgentDelta, agent_models, async_run_agent
from custom_components.rkllm.config_flow import default_conversation_options, subentry_schema
from custom_components.rkllm.confirmation import (
    DEVICE_ACTION_INTENTS,
    language_responses_from,
    load_language_responses,
    pick_block,
    render_confirmation,
)
from custom_components.rkllm.const import CONF_QUICK_CONFIRMATIONS, SUBENTRY_CONVERSATION
from custom_components.rkllm.entity import AgentSettings
from rkllm_engine.types import ChatMessage, ChatRequest
from tests.ha.conftest import KITCHEN_LIGHT, conversation_subentry
from tests.ha_shared import KitchenLight

AGENT = "conversation.assist_on_npu"
HALL_LIGHT = "light.hall_light"
THERMOMETER = "sensor.kitchen_thermometer"
BEEP_INTENT = "RkllmTestBeep"  # an intent this integration knows nothing about (an intent_script)
# Its tool's name: Home Assistant 2026.10+ offers intent scripts through intent_script's LLM tools platform, named
# "intent_script__<intent>"; older lines offer every registered intent under its own name.
BEEP_TOOL = (
    f"intent_script__{BEEP_INTENT}"
    if importlib.util.find_spec("homeassistant.components.intent_script.llm") is not None
    else BEEP_INTENT
)


def _call(tool: str, arguments: dict[str, Any]) -> str:
    """A scripted Hermes-style call in the model file (`{{tool:X}}` finds a prefixed name too)."""
    body = json.dumps({"name": "{{tool:" + tool + "}}", "arguments": arguments}, ensure_ascii=False)
    return "<tool_call>\\n" + body + "\\n</tool_call>"


MODEL_ANSWER = "Done, the kitchen light is on."
MODEL = "\n".join(
    [
        "rkllm-emulator-model 1",
        "name = ha-test-quick-confirmations",
        "calibration = qwen2.5-1.5b-rk3588",
        "max_context_limit = 4096",
        'answer user "*turn on the kitchen light" = ' + _call("HassTurnOn", {"name": "Kitchen Light"}),
        'answer user "*schalte das küchenlicht ein" = ' + _call("HassTurnOn", {"name": "Kitchen Light"}),
        'answer user "*allume la lumière de la cuisine" = ' + _call("HassTurnOn", {"name": "Kitchen Light"}),
        'answer user "*hall lights on" = ' + _call("HassTurnOn", {"area": "Hall", "domain": ["light"]}),
        'answer user "*everything in the kitchen on" = ' + _call("HassTurnOn", {"area": "Kitchen"}),
        'answer user "*turn on both lights" = '
        + _call("HassTurnOn", {"name": "Kitchen Light"})
        + "\\n"
        + _call("HassTurnOn", {"name": "Hall Light"}),
        'answer user "*turn on the bathroom fan" = ' + _call("HassTurnOn", {"name": "Bathroom Fan"}),
        'answer user "*what is on" = ' + _call("GetLiveContext", {}),
        'answer user "*beep" = ' + _call(BEEP_TOOL, {}),
        'answer tool "*\\"error\\"*" = Sorry, that did not work.',
        'answer tool "*\\"failed\\":[{*" = The light is on; the thermometer cannot be switched.',
        'answer tool "*Live Context*" = The kitchen light is off.',
        'answer tool "*action_done*" = ' + MODEL_ANSWER,
        "default_answer = You said: {{input}}",
        "",
    ]
)


class HallLight(KitchenLight):
    """A second working light, alone in the Hall."""

    _attr_name = "Hall Light"
    _attr_unique_id = "hall-light"


@pytest.fixture
def assist_model(tmp_path: Path) -> Path:
    """This module's model (replaces the conftest's)."""
    path = tmp_path / "qwen2.5-1.5b-quick.model"
    path.write_text(MODEL, encoding="utf-8")
    return path


@pytest.fixture
async def lights(hass: HomeAssistant) -> None:
    """Kitchen Light and a thermometer in the Kitchen, Hall Light in the Hall; lights off; all exposed to Assist."""
    setup_test_component_platform(hass, "light", [KitchenLight(), HallLight()])
    assert await async_setup_component(hass, "light", {"light": {"platform": "test"}})
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(hass, "conversation", {})
    await hass.async_block_till_done()
    areas = ar.async_get(hass)
    entities = er.async_get(hass)
    kitchen = areas.async_create("Kitchen")
    hall = areas.async_create("Hall")
    thermometer = entities.async_get_or_create(
        "sensor", "test", "kitchen-thermometer", suggested_object_id="kitchen_thermometer"
    )
    assert thermometer.entity_id == THERMOMETER
    hass.states.async_set(THERMOMETER, "21", {"friendly_name": "Kitchen Thermometer", "unit_of_measurement": "°C"})
    for entity_id, area in ((KITCHEN_LIGHT, kitchen), (THERMOMETER, kitchen), (HALL_LIGHT, hall)):
        entities.async_update_entity(entity_id, area_id=area.id)
        async_expose_entity(hass, "conversation", entity_id, True)
    # An intent that switches the kitchen light on and reports done, without being a device action rkllm knows.
    beep = {
        "description": "Beeps",
        "action": [{"action": "light.turn_on", "target": {"entity_id": KITCHEN_LIGHT}}],
        "speech": {"text": "Beep"},
    }
    assert await async_setup_component(hass, "intent_script", {"intent_script": {BEEP_INTENT: beep}})


@pytest.fixture
def submitted(loaded_entry: MockConfigEntry, monkeypatch: pytest.MonkeyPatch) -> list[ChatRequest]:
    """Every request the agent hands to the (real) engine, recorded on the way through."""
    engine = loaded_entry.runtime_data.engine
    requests: list[ChatRequest] = []
    submit = engine.submit

    def recording_submit(request: Any) -> Any:
        requests.append(request)
        return submit(request)

    monkeypatch.setattr(engine, "submit", recording_submit)
    return requests


async def converse(
    hass: HomeAssistant, text: str, *, language: str = "en", conversation_id: str | None = None
) -> conversation.ConversationResult:
    """One Assist turn in `language` (the pipeline's conversation language), keyword arguments only."""
    result: conversation.ConversationResult = await conversation.async_converse(
        hass, text=text, conversation_id=conversation_id, context=Context(), language=language, agent_id=AGENT
    )
    return result


def run_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The engine's one debug line per run (slot, plan mode, tokens, TTFT, decode rate)."""
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("slot ")]


def speech(result: conversation.ConversationResult) -> str:
    return str(result.response.speech["plain"]["speech"])


def turn_content(hass: HomeAssistant, conversation_id: str) -> list[conversation.Content]:
    """The chat log of a conversation, as Home Assistant keeps it for the next turn."""
    with (
        chat_session.async_get_chat_session(hass, conversation_id) as session,
        conversation.async_get_chat_log(hass, session) as chat_log,
    ):
        return list(chat_log.content)


# --- Confirmed with Home Assistant's sentence, one engine request ----------------------------------------------


@pytest.mark.parametrize(
    ("language", "text", "sentence"),
    [
        ("en", "turn on the kitchen light", ("Turned on the light",)),
        # Home Assistant's German data answered with the device's name up to 2026.2 and with "Licht" for a light
        # since 2026.10 (a light block): either is its own sentence, never the model's.
        ("de", "Schalte das Küchenlicht ein", ("Kitchen Light eingeschaltet", "Licht eingeschaltet")),
        ("fr", "Allume la lumière de la cuisine", ("Allumé",)),
    ],
)
@pytest.mark.usefixtures("lights", "loaded_entry")
async def test_one_device_action_is_confirmed_in_the_conversation_language(
    hass: HomeAssistant, submitted: list[ChatRequest], language: str, text: str, sentence: tuple[str, ...]
) -> None:
    result = await converse(hass, text, language=language)

    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON
    assert speech(result) in sentence
    assert len(submitted) == 1  # the tool call's round only: no second model round
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    assert [target.id for target in result.response.success_results] == [KITCHEN_LIGHT]
    # The chat log stays valid for the next turn and for Home Assistant: call, result, then the answer.
    content = turn_content(hass, result.conversation_id)
    call, tool_result, answer = content[-3:]
    assert isinstance(call, conversation.AssistantContent)
    assert call.tool_calls is not None
    assert len(call.tool_calls) == 1
    assert isinstance(tool_result, conversation.ToolResultContent)
    assert tool_result.tool_call_id == call.tool_calls[0].id
    assert isinstance(answer, conversation.AssistantContent)
    assert answer.content == speech(result)
    assert not answer.tool_calls


@pytest.mark.parametrize(
    ("language", "sentence"), [("en", "Turned on the lights"), ("de", "Licht eingeschaltet"), ("fr", "Allumé")]
)
@pytest.mark.usefixtures("lights", "loaded_entry")
async def test_an_area_command_gets_the_languages_area_sentence(
    hass: HomeAssistant, submitted: list[ChatRequest], language: str, sentence: str
) -> None:
    """The response key follows the language's own sentences ("lights_area" in English, "light" in German)."""
    result = await converse(hass, "hall lights on", language=language)
    assert hass.states.get(HALL_LIGHT).state == STATE_ON
    assert speech(result) == sentence
    assert len(submitted) == 1


@pytest.mark.usefixtures("lights", "loaded_entry")
async def test_the_next_turn_after_a_confirmation_rebuilds_and_sees_it(
    hass: HomeAssistant, submitted: list[ChatRequest], caplog: pytest.LogCaptureFixture
) -> None:
    """The model never generated the confirmation, so the next turn re-sends the history (static prefix kept)."""
    caplog.set_level(logging.DEBUG, logger="rkllm_engine.engine")  # one line per run names its plan mode
    first = await converse(hass, "turn on the kitchen light")
    assert speech(first) == "Turned on the light"
    second_turn = len(run_lines(caplog))
    second = await converse(hass, "say something else", conversation_id=first.conversation_id)
    assert speech(second).endswith("say something else")
    modes = [line.split("plan ", 1)[1].split(",", 1)[0] for line in run_lines(caplog)[second_turn:]]
    assert modes == ["rebuild"]  # not "reset": the static prefix stayed resident
    history = submitted[-1].messages
    assert [message.role for message in history] == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert history[-2].content == "Turned on the light"


@pytest.mark.usefixtures("lights")
async def test_the_confirmation_is_the_turns_first_spoken_text(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    """The voice response time (command → first spoken text) is reported for a turn the model never spoke in."""
    engine = loaded_entry.runtime_data.engine
    assert engine.metrics.last_voice_response_s is None
    await converse(hass, "turn on the kitchen light")
    assert engine.metrics.last_voice_response_s is not None
    assert engine.metrics.last_voice_response_s > 0


@pytest.mark.usefixtures("lights", "loaded_entry")
async def test_an_agent_model_streams_the_confirmation_and_reports_usage(hass: HomeAssistant) -> None:
    """Agents served as OpenAI models get the sentence as text deltas, and the turn's tokens are still counted."""
    (model,) = agent_models(hass)
    deltas: list[AgentDelta] = []
    result = await async_run_agent(
        hass,
        model.entity_id,
        [ChatMessage(role="user", content="turn on the kitchen light")],
        context=Context(),
        on_delta=deltas.append,
    )
    assert result.text == "Turned on the light"
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens > 0
    kinds = [delta.kind for delta in deltas]
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("text")
    assert "".join(delta.text for delta in deltas if delta.kind == "text") == "Turned on the light"


# --- Everything else: the model answers (a second round) --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        # An action that failed for some of its targets (a thermometer cannot be turned on).
        ("everything in the kitchen on", "The light is on; the thermometer cannot be switched."),
        # An action that failed altogether (no such device).
        ("turn on the bathroom fan", "Sorry, that did not work."),
        # A query.
        ("what is on", "The kitchen light is off."),
        # Two calls in one round.
        ("turn on both lights", MODEL_ANSWER),
        # An intent that is not a device action this integration knows.
        ("beep", MODEL_ANSWER),
    ],
)
@pytest.mark.usefixtures("lights", "loaded_entry")
async def test_anything_but_one_successful_device_action_is_answered_by_the_model(
    hass: HomeAssistant, submitted: list[ChatRequest], text: str, answer: str
) -> None:
    result = await converse(hass, text)
    assert speech(result) == answer
    assert len(submitted) == 2
    assert submitted[-1].messages[-1].role == "tool"


@pytest.mark.usefixtures("lights", "loaded_entry")
async def test_two_calls_in_one_round_both_run_before_the_model_answers(
    hass: HomeAssistant, submitted: list[ChatRequest]
) -> None:
    await converse(hass, "turn on both lights")
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON
    assert hass.states.get(HALL_LIGHT).state == STATE_ON
    assert len(submitted[0].messages) < len(submitted[1].messages)
    assert [message.role for message in submitted[1].messages[-2:]] == ["tool", "tool"]


@pytest.mark.usefixtures("lights", "loaded_entry")
async def test_a_language_without_response_templates_is_answered_by_the_model(
    hass: HomeAssistant, submitted: list[ChatRequest]
) -> None:
    result = await converse(hass, "turn on the kitchen light", language="tlh")
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON
    assert speech(result) == MODEL_ANSWER
    assert len(submitted) == 2


@pytest.mark.parametrize("subentries", [[conversation_subentry(quick_confirmations=False)]])
@pytest.mark.usefixtures("lights", "loaded_entry")
async def test_with_the_option_off_the_model_always_answers(hass: HomeAssistant, submitted: list[ChatRequest]) -> None:
    result = await converse(hass, "turn on the kitchen light")
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON
    assert speech(result) == MODEL_ANSWER
    assert len(submitted) == 2


@pytest.mark.usefixtures("lights", "loaded_entry")
async def test_a_partly_failed_action_really_reports_the_failed_target(
    hass: HomeAssistant, submitted: list[ChatRequest]
) -> None:
    """The partial failure above is Home Assistant's own: the light comes on, the thermometer is a failed target."""
    await converse(hass, "everything in the kitchen on")
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON
    result = json.loads(submitted[-1].messages[-1].content or "")
    # One failed target. (Which id it carries is Home Assistant's business: it pairs the states with the service
    # calls in completion order, so the light and the thermometer can swap names in the result.)
    assert len(result["data"]["failed"]) == 1
    named = {target["id"] for key in ("success", "failed") for target in result["data"][key]}
    assert {KITCHEN_LIGHT, THERMOMETER} <= named


# --- The option --------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("lights")  # a Home Assistant with Assist loaded: the form offers its LLM API
async def test_the_option_is_on_by_default_also_for_agents_created_before_it(hass: HomeAssistant) -> None:
    assert default_conversation_options()[CONF_QUICK_CONFIRMATIONS] is True
    older = {key: value for key, value in default_conversation_options().items() if key != CONF_QUICK_CONFIRMATIONS}
    assert AgentSettings.from_options(older).quick_confirmations is True
    # The agent form shows it switched on for such an agent, and keeps it on when saved unchanged.
    schema = subentry_schema(hass, SUBENTRY_CONVERSATION, is_new=False)
    assert schema(older)[CONF_QUICK_CONFIRMATIONS] is True
    assert AgentSettings.from_options({CONF_QUICK_CONFIRMATIONS: False}).quick_confirmations is False


# --- Choosing and rendering the sentence -----------------------------------------------------------------------


def test_every_device_action_intent_has_an_english_template_or_is_documented_as_missing() -> None:
    """The intent list is decided from home-assistant-intents; only intents without any template go to the model."""
    english = load_language_responses("en-US")
    assert english is not None
    assert english.language == "en"
    without_template = DEVICE_ACTION_INTENTS - english.templates.keys()
    assert without_template <= {"HassToggle", "HassStopMoving", "HassFanSetSpeed", "HassMediaPlayerMute",
                                "HassMediaPlayerUnmute", "HassSetVolumeRelative", "HassLawnMowerStartMowing",
                                "HassLawnMowerDock"}  # fmt: skip
    assert {"HassTurnOn", "HassTurnOff", "HassLightSet", "HassClimateSetTemperature"} <= english.templates.keys()
    assert load_language_responses("tlh") is None


def test_the_response_key_follows_the_call_and_the_matched_domain() -> None:
    english = load_language_responses("en")
    assert english is not None
    light = [State("light.kitchen", "on")]

    def key(intent_type: str, arguments: dict[str, Any], states: list[State]) -> str | None:
        block = pick_block(english, intent_type, arguments, states)
        return block.response if block is not None else None

    assert key("HassTurnOn", {"name": "Kitchen Light"}, light) == "default"
    assert key("HassTurnOn", {"area": "Kitchen", "domain": ["light"]}, light) == "lights_area"
    # "all the lights": 2025.4's data has a block without an area slot ("light_all"); 2026.10's has none, so the
    # block whose area comes from the satellite's context fits best.
    has_light_all = any(block.response == "light_all" for block in english.blocks["HassTurnOn"])
    assert key("HassTurnOn", {"domain": ["light"]}, light) == ("light_all" if has_light_all else "lights_area")
    assert key("HassTurnOn", {"name": "Garage Door"}, [State("cover.garage", "opening")]) == "cover"
    assert key("HassTurnOn", {"name": "Front Door"}, [State("lock.front", "locked")]) == "lock"
    assert key("HassLightSet", {"name": "Kitchen Light", "brightness": 50}, light) == "brightness"
    assert key("HassLightSet", {"name": "Kitchen Light", "color": "red"}, light) == "color"
    # An argument no sentence of the intent can say: no key, the model answers.
    assert key("HassTurnOn", {"name": "Kitchen Light", "mood": "cosy"}, light) is None


def test_a_hand_made_language_picks_by_slots_and_domain() -> None:
    responses = language_responses_from(
        "xx",
        {
            "expansion_rules": {"name": "[the] {name}", "area": "[in] {area}"},
            "intents": {
                "HassTurnOn": {
                    "data": [
                        {"sentences": ["on <name> [<area>]"]},
                        {"sentences": ["lights on <area>"], "slots": {"domain": "light"}, "response": "lights"},
                        {"sentences": ["unlock <name>"], "requires_context": {"domain": "lock"}, "response": "lock"},
                    ]
                }
            },
            "responses": {"intents": {"HassTurnOn": {"default": "On", "lights": "Lights on", "lock": "Locked"}}},
        },
    )
    light = [State("light.a", "on")]

    def key(arguments: dict[str, Any], states: list[State], intent_type: str = "HassTurnOn") -> str | None:
        block = pick_block(responses, intent_type, arguments, states)
        return block.response if block is not None else None

    assert key({"area": "Hall", "domain": ["light"]}, light) == "lights"
    assert key({"name": "Lamp"}, light) == "default"
    assert key({"name": "Door"}, [State("lock.a", "locked")]) == "lock"
    assert key({"name": "Lamp"}, light, "HassTurnOff") is None


async def test_templates_that_cannot_be_rendered_give_no_sentence(hass: HomeAssistant) -> None:
    """A failing template, a missing slot, an empty sentence or a "None" from a lookup table: the model answers."""
    light = [State("light.kitchen", "on", {"friendly_name": "Kitchen Light"})]
    assert render_confirmation(hass, "Turned on {{ slots.name }}", {"name": "Kitchen Light"}, light) == (
        "Turned on Kitchen Light"
    )
    assert render_confirmation(hass, "  Turned on\n {{ state.name }} ", {}, light) == "Turned on Kitchen Light"
    assert render_confirmation(hass, "Turned on {{ slots.name }}", {}, light) is None
    assert render_confirmation(hass, "{% if %}", {}, light) is None
    assert render_confirmation(hass, "  ", {}, light) is None
    assert render_confirmation(hass, "Turned on {{ {'fan': 'the fan'}.get(state.domain) }}", {}, light) is None


_SLOT_VALUES = st.one_of(
    st.text(max_size=12), st.integers(-5, 300), st.booleans(), st.lists(st.text(max_size=8), max_size=3), st.none()
)


@settings(max_examples=150, deadline=None)
@given(
    language=st.sampled_from(["en", "de", "fr", "nl", "es"]),
    intent_type=st.sampled_from(sorted(DEVICE_ACTION_INTENTS)),
    arguments=st.dictionaries(
        st.sampled_from(["name", "area", "floor", "domain", "device_class", "brightness", "color", "temperature"]),
        _SLOT_VALUES,
        max_size=4,
    ),
    domain=st.sampled_from(["light", "cover", "lock", "fan", "switch", "climate", "media_player", "scene", "valve"]),
)
def test_picking_a_block_never_fails_on_any_call(
    language: str, intent_type: str, arguments: dict[str, Any], domain: str
) -> None:
    """Whatever a small model puts in a call, choosing the sentence gives a block with a template or None."""
    responses = load_language_responses(language)
    assert responses is not None
    block = pick_block(responses, intent_type, arguments, [State(f"{domain}.thing", "on", {"device_class": "garage"})])
    if block is not None:
        assert block.response in responses.templates[intent_type]
