"""AI tasks (Home Assistant 2025.7+) through the same tool loop; on older releases the platform is not offered."""

from __future__ import annotations

from typing import Any

import pytest
import voluptuous as vol
from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rkllm.compat import HAS_AI_TASK, entry_platforms
from custom_components.rkllm.config_flow import RkllmConfigFlow, default_ai_task_options
from custom_components.rkllm.const import SUBENTRY_AI_TASK
from custom_components.rkllm.structured import decode_json_answer, validate_structured_answer
from tests.ha.conftest import conversation_subentry

AI_TASK_ENTITY = "ai_task.data_generator"


def ai_task_subentry() -> dict[str, Any]:
    return {
        "data": default_ai_task_options(),
        "subentry_type": SUBENTRY_AI_TASK,
        "title": "Data generator",
        "unique_id": None,
    }


@pytest.fixture
def subentries() -> list[dict[str, Any]]:
    return [conversation_subentry(), ai_task_subentry()]


async def _generate(hass: HomeAssistant, instructions: str, structure: vol.Schema | None = None) -> Any:
    from homeassistant.components import ai_task  # type: ignore[attr-defined, unused-ignore]

    return await ai_task.async_generate_data(
        hass, task_name="test", entity_id=AI_TASK_ENTITY, instructions=instructions, structure=structure
    )


@pytest.mark.usefixtures("loaded_entry")
async def test_ai_task_entity_exists_exactly_where_home_assistant_has_ai_tasks(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    """2025.7+: one AI task entity per subentry; before: no platform, no subentry type, nothing half-set-up."""
    assert (Platform("ai_task") in entry_platforms()) if HAS_AI_TASK else len(entry_platforms()) == 2
    assert (SUBENTRY_AI_TASK in RkllmConfigFlow.async_get_supported_subentry_types(loaded_entry)) is HAS_AI_TASK
    assert (hass.states.get(AI_TASK_ENTITY) is not None) is HAS_AI_TASK
    assert hass.states.get("conversation.assist_on_npu") is not None


@pytest.mark.usefixtures("loaded_entry")
async def test_generate_text(hass: HomeAssistant) -> None:
    if not HAS_AI_TASK:
        assert hass.states.get(AI_TASK_ENTITY) is None
        return
    result = await _generate(hass, "think about it")
    assert result.data == "The answer is 42."
    assert result.conversation_id


@pytest.mark.usefixtures("loaded_entry")
async def test_generate_structured_data(hass: HomeAssistant) -> None:
    if not HAS_AI_TASK:
        assert hass.states.get(AI_TASK_ENTITY) is None
        return
    structure = vol.Schema({vol.Required("color"): str, vol.Required("count"): int})
    result = await _generate(hass, "give me json", structure)
    assert result.data == {"color": "blue", "count": 3}


@pytest.mark.usefixtures("loaded_entry")
@pytest.mark.parametrize(
    ("instructions", "structure", "problem"),
    [
        ("give me broken json", vol.Schema({vol.Required("color"): str}), "not JSON"),
        ("give me json", vol.Schema({vol.Required("size"): int}, extra=vol.ALLOW_EXTRA), "required key not provided"),
    ],
)
async def test_invalid_structured_answer_is_a_translated_error(
    hass: HomeAssistant, instructions: str, structure: vol.Schema, problem: str
) -> None:
    if not HAS_AI_TASK:
        assert hass.states.get(AI_TASK_ENTITY) is None
        return
    with pytest.raises(HomeAssistantError) as caught:
        await _generate(hass, instructions, structure)
    assert caught.value.translation_key == "structured_output_invalid"
    assert str(caught.value).startswith("The language model's answer is not valid JSON for the requested structure")
    assert problem in str(caught.value)


def test_json_answers_are_decoded_leniently_but_validated_strictly() -> None:
    assert decode_json_answer('```json\n{"a": 1}\n```') == {"a": 1}
    assert decode_json_answer('Here you go: {"a": [1, 2]} - enjoy') == {"a": [1, 2]}
    with pytest.raises(ValueError, match="Expecting value"):
        decode_json_answer("no json here")
    assert validate_structured_answer('{"count": "3"}', vol.Schema({"count": vol.Coerce(int)})) == {"count": 3}
    with pytest.raises(HomeAssistantError) as caught:
        validate_structured_answer('{"count": "three"}', vol.Schema({"count": int}))
    assert caught.value.translation_key == "structured_output_invalid"
