"""The Assist conversation agent on the real engine: tool calls change real entities, errors are spoken."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import STATE_OFF, STATE_ON
from homeassistant.core import Context, HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import chat_session, intent, llm
from pytest_homeassistant_custom_component.common import MockConfigEntry, MockUser

from custom_components.rkllm.agent_api import AgentDelta, AgentRequestError, agent_models, async_run_agent
from custom_components.rkllm.chat_content import (
    repair_tool_arguments,
    short_match_failure,
    shorten_tool_result,
    split_dynamic_context,
    trim_history,
)
from custom_components.rkllm.compat import MATCH_FAILURE_TEXT_IS_SENTENCE, SUPPORTS_THINKING_DELTA
from custom_components.rkllm.const import DOMAIN
from custom_components.rkllm.entity import EngineTurnError
from rkllm_engine.types import (
    ChatMessage,
    ChatRequest,
    ContextOverflowError,
    EngineError,
    EngineUnavailableError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
    ToolCall,
    WorkerCrashedError,
)
from tests.ha.conftest import ASSIST_MODEL, KITCHEN_LIGHT, REPO_ROOT, conversation_subentry, entry_data

AGENT = "conversation.assist_on_npu"
DEMO_MODEL = REPO_ROOT / "rkllm_native" / "emulator" / "models" / "qwen2.5-1.5b-assist.model"


def run_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The engine's one debug line per run (slot, plan mode, tokens, TTFT, decode rate)."""
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("slot ")]


def speech(result: conversation.ConversationResult) -> str:
    return str(result.response.speech["plain"]["speech"])


async def converse(
    hass: HomeAssistant, text: str, context: Context | None = None, conversation_id: str | None = None
) -> Any:
    """One Assist turn, called with keyword arguments only (their order changed between releases)."""
    return await conversation.async_converse(
        hass, text=text, conversation_id=conversation_id, context=context or Context(), agent_id=AGENT
    )


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


@pytest.mark.usefixtures("kitchen_light")
async def test_turn_on_the_kitchen_light_with_the_demo_model(hass: HomeAssistant, emulator_lib: str) -> None:
    """The README's demo: voice command → HassTurnOn tool call → the light is on → a spoken answer."""
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="demo",
        data=entry_data(emulator_lib, DEMO_MODEL),
        subentries_data=[conversation_subentry(llm_hass_api=[llm.LLM_API_ASSIST])],
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_OFF

    result = await conversation.async_converse(
        hass, text="Turn on the kitchen light", conversation_id=None, context=Context(), agent_id=AGENT
    )

    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON
    assert result.response.response_type is intent.IntentResponseType.ACTION_DONE
    # The matched entity reaches /api/conversation/process callers on every line (2025.4 rebuilds the response).
    assert [target.id for target in result.response.success_results] == [KITCHEN_LIGHT]
    # One device action: Home Assistant's own confirmation (quick_confirmations, on by default).
    assert speech(result) == "Turned on the light"
    assert not result.continue_conversation

    result = await conversation.async_converse(
        hass,
        text="turn off the kitchen light",
        conversation_id=result.conversation_id,
        context=Context(),
        agent_id=AGENT,
    )
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_OFF
    assert speech(result) == "Turned off the light"


@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_static_prompt_prefix_and_dynamic_time(hass: HomeAssistant, submitted: list[ChatRequest]) -> None:
    """The date/time line leaves the system prompt (cacheable prefix) and travels as dynamic context."""
    await converse(hass, "hello there")
    (request,) = submitted
    system = request.messages[0]
    assert system.role == "system"
    assert "Current time is" not in (system.content or "")
    assert "Static Context" in (system.content or "")  # the Assist API prompt stays in the prefix
    tool_names = {tool["function"]["name"].rpartition("__")[2] for tool in request.tools}
    assert tool_names >= {"HassTurnOn", "HassTurnOff"}
    if "GetDateTime" in tool_names:
        # 2025.8+: with a GetDateTime tool HA renders no date/time line at all.
        assert request.dynamic_context is None
    else:
        assert request.dynamic_context is not None
        assert request.dynamic_context.startswith("Current time is ")
    assert request.priority == 0
    assert request.sampling.top_k == 1


@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_tool_error_is_shortened_before_the_model_reads_it(
    hass: HomeAssistant, submitted: list[ChatRequest]
) -> None:
    result = await converse(hass, "turn on the bathroom fan")
    assert speech(result) == "There is no bathroom fan."
    tool_message = submitted[-1].messages[-1]
    assert tool_message.role == "tool"
    payload = json.loads(tool_message.content or "")
    # Up to 2026.9 HA's error text is the error's repr, which we shorten ("No entity named Bathroom Fan"); from
    # 2026.10 HA writes a short sentence itself, which reaches the model unchanged.
    error = intent.MatchFailedError(
        result=intent.MatchTargetsResult(is_match=False, no_match_reason=intent.MatchFailedReason.NAME),
        constraints=intent.MatchTargetsConstraints(name="Bathroom Fan"),
    )
    expected = str(error) if MATCH_FAILURE_TEXT_IS_SENTENCE else short_match_failure(error)
    assert expected in {"No entity named Bathroom Fan", "No entities matched the name (given name 'Bathroom Fan')"}
    assert payload == {"error": "MatchFailedError", "error_text": expected}


@pytest.mark.parametrize("subentries", [[conversation_subentry(quick_confirmations=False)]])
@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_generated_tool_arguments_are_repaired_but_history_keeps_the_original(
    hass: HomeAssistant, submitted: list[ChatRequest]
) -> None:
    """The model sends `"area": ""`; HA gets the call without it, the engine sees its own call back."""
    result = await converse(hass, "turn on the kitchen light")
    assert speech(result) == "Done, the kitchen light is on."
    assistant = submitted[-1].messages[-2]
    (call,) = assistant.tool_calls
    assert json.loads(call.arguments) == {"name": "Kitchen Light", "area": ""}


@pytest.mark.parametrize("subentries", [[conversation_subentry(max_tool_iterations=2)]])
@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_tool_loop_stops_after_max_iterations_with_a_spoken_answer(
    hass: HomeAssistant, submitted: list[ChatRequest]
) -> None:
    """A model that keeps calling tools gets `max_tool_iterations` rounds, then must answer in words."""
    result = await converse(hass, "keep calling tools")
    assert result.response.response_type is not intent.IntentResponseType.ERROR
    assert speech(result)
    assert [request.tool_choice for request in submitted] == ["auto", "auto", "none"]


@pytest.mark.parametrize("subentries", [[conversation_subentry(max_history=1)]])
@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_history_is_trimmed_to_whole_turns(hass: HomeAssistant, submitted: list[ChatRequest]) -> None:
    """With max_history=1 the model sees the previous turn (with its tool call and result) and the new one."""
    first = await converse(hass, "say one")
    await converse(hass, "turn on the kitchen light", conversation_id=first.conversation_id)
    third_turn = len(submitted)
    await converse(hass, "say three", conversation_id=first.conversation_id)
    last = submitted[third_turn].messages
    roles = [message.role for message in last]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "user"]
    assert "turn on the kitchen light" in (last[1].content or "")
    assert last[2].tool_calls[0].id == last[3].tool_call_id
    assert all("say one" not in (message.content or "") for message in last)


def test_trim_history_never_splits_a_call_from_its_result() -> None:
    call = ToolCall(id="c1", name="HassTurnOn", arguments="{}")
    messages = [
        ChatMessage(role="system", content="sys"),
        ChatMessage(role="user", content="u1"),
        ChatMessage(role="assistant", tool_calls=(call,)),
        ChatMessage(role="tool", content="{}", tool_call_id="c1"),
        ChatMessage(role="assistant", content="done"),
        ChatMessage(role="user", content="u2"),
        ChatMessage(role="assistant", content="a2"),
        ChatMessage(role="user", content="u3"),
    ]
    assert [m.content for m in trim_history(messages, 1)] == ["sys", "u2", "a2", "u3"]
    assert trim_history(messages, 2) == messages
    assert trim_history(messages, 0) == messages
    orphan = [ChatMessage(role="user", content="u"), ChatMessage(role="tool", content="{}", tool_call_id="gone")]
    assert trim_history(orphan, 0) == orphan[:1]


def test_dynamic_context_split_on_both_prompt_layouts() -> None:
    old_layout = "Current time is 07:05:09. Today's date is 2025-04-30.\nYou are a voice assistant.\nRules"
    assert split_dynamic_context(old_layout) == (
        "You are a voice assistant.\nRules",
        "Current time is 07:05:09. Today's date is 2025-04-30.",
    )
    new_layout = "You are a voice assistant.\nRules\nCurrent time is 23:59:00. Today's date is 2026-02-01.\n"
    assert split_dynamic_context(new_layout) == (
        "You are a voice assistant.\nRules",
        "Current time is 23:59:00. Today's date is 2026-02-01.",
    )
    assert split_dynamic_context("No time here.") == ("No time here.", None)


def test_match_failure_is_one_sentence_from_the_error_fields() -> None:
    """The sentence comes from MatchFailedError's fields (reason, constraints), not from its English text."""
    error = intent.MatchFailedError(  # what HA raised for "turn on the bathroom fan" (tool_results_2026.2.3.json)
        result=intent.MatchTargetsResult(is_match=False, no_match_reason=intent.MatchFailedReason.NAME),
        constraints=intent.MatchTargetsConstraints(name="Bathroom Fan", assistant="conversation"),
        preferences=intent.MatchTargetsPreferences(),
    )
    sentence = short_match_failure(error)
    assert sentence == "No entity named Bathroom Fan"
    assert shorten_tool_result({"error": "MatchFailedError", "error_text": str(error)}, True, sentence) == {
        "error": "MatchFailedError",
        "error_text": "No entity named Bathroom Fan",
    }
    area_error = intent.MatchFailedError(
        result=intent.MatchTargetsResult(
            is_match=False, no_match_reason=intent.MatchFailedReason.INVALID_AREA, no_match_name="Attic"
        ),
        constraints=intent.MatchTargetsConstraints(area_name="Attic", domains={"light"}),
    )
    assert short_match_failure(area_error) == "No area named Attic"
    unexplained = intent.MatchFailedError(intent.MatchTargetsResult(is_match=False), intent.MatchTargetsConstraints())
    assert short_match_failure(unexplained) is None
    long_error = {"error": "HomeAssistantError", "error_text": "x" * 500}
    assert len(shorten_tool_result(long_error, True)["error_text"]) == 200
    ok = {"speech": {}, "response_type": "action_done"}
    assert shorten_tool_result(ok, False) is ok


def test_tool_arguments_are_repaired_like_core() -> None:
    assert repair_tool_arguments(
        {"name": "Kitchen Light", "area": "", "floor": None, "brightness": 0, "domain": '["light"]', "on": False}
    ) == {"name": "Kitchen Light", "brightness": 0, "domain": ["light"], "on": False}


@pytest.mark.parametrize("subentries", [[conversation_subentry(enable_thinking=True)]])
@pytest.mark.usefixtures("loaded_entry")
async def test_thinking_never_reaches_speech(hass: HomeAssistant) -> None:
    result = await converse(hass, "think about it")
    assert speech(result) == "The answer is 42."
    with (
        chat_session.async_get_chat_session(hass, result.conversation_id) as session,
        conversation.async_get_chat_log(hass, session) as chat_log,
    ):
        answer = chat_log.content[-1]
    assert isinstance(answer, conversation.AssistantContent)
    assert answer.content == "The answer is 42."
    if SUPPORTS_THINKING_DELTA:
        assert "think about this request" in (getattr(answer, "thinking_content", None) or "")


@pytest.mark.parametrize("subentries", [[conversation_subentry(llm_hass_api=[])]])
@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_agent_without_api_offers_no_tools_and_never_fails_on_a_call(
    hass: HomeAssistant, submitted: list[ChatRequest]
) -> None:
    state = hass.states.get(AGENT)
    assert state is not None
    assert not state.attributes.get("supported_features")
    result = await converse(hass, "tool without api")
    assert result.response.response_type is not intent.IntentResponseType.ERROR
    assert "No LLM API" not in speech(result)
    assert submitted[0].tools == []
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_OFF


@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_read_only_user_may_not_switch_the_light(hass: HomeAssistant, hass_read_only_user: MockUser) -> None:
    """The intent's targets are checked against the user's permissions before the tool runs."""
    result = await converse(hass, "turn on the kitchen light", Context(user_id=hass_read_only_user.id))
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_OFF
    assert speech(result) == "I am not allowed to do that for you."


@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_admin_user_may_switch_the_light(hass: HomeAssistant, hass_admin_user: MockUser) -> None:
    result = await converse(hass, "turn on the kitchen light", Context(user_id=hass_admin_user.id))
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON
    assert speech(result) == "Turned on the light"


@dataclass(slots=True, kw_only=True)
class AdminOnlyAPI(llm.API):
    """An API that declares itself admin-only, like HA 2026.11's "Home Assistant" API."""

    requires_admin: bool = True

    async def async_get_api_instance(self, llm_context: llm.LLMContext) -> llm.APIInstance:
        return llm.APIInstance(api=self, api_prompt="Admin tools.", llm_context=llm_context, tools=[])


@pytest.mark.parametrize("subentries", [[conversation_subentry(llm_hass_api=["admin_tools"])]])
async def test_admin_only_api_refuses_a_non_admin_at_once(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, hass_read_only_user: MockUser
) -> None:
    unregister = llm.async_register_api(hass, AdminOnlyAPI(hass=hass, id="admin_tools", name="Admin tools"))
    try:
        assert await hass.config_entries.async_setup(mock_config_entry.entry_id)
        await hass.async_block_till_done()
        result = await converse(hass, "hello", Context(user_id=hass_read_only_user.id))
        assert result.response.response_type is intent.IntentResponseType.ERROR
        assert speech(result) == "Only administrators may use Admin tools with this agent"
        result = await converse(hass, "hello", Context())
        assert result.response.response_type is not intent.IntentResponseType.ERROR
    finally:
        unregister()


@pytest.mark.usefixtures("kitchen_light")
async def test_stopped_engine_gives_a_translated_spoken_error(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    await loaded_entry.runtime_data.engine.stop()
    result = await converse(hass, "turn on the kitchen light")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert speech(result).startswith("The language model is not available right now:")


async def test_prompt_larger_than_the_context_gives_a_translated_spoken_error(
    hass: HomeAssistant, emulator_lib: str, assist_model: Path, kitchen_light: str
) -> None:
    entry = MockConfigEntry(
        domain=DOMAIN,
        data=entry_data(emulator_lib, assist_model, context_length=256),
        subentries_data=[conversation_subentry()],
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    result = await converse(hass, "turn on the kitchen light")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert speech(result).startswith("The conversation is too long for the model's context.")
    assert hass.states.get(kitchen_light).state == STATE_OFF


async def test_worker_crash_gives_a_translated_spoken_error(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path
) -> None:
    """A native crash mid-answer is a sentence for the user, not a traceback (the worker restarts on its own)."""
    model = tmp_path / "crashy.model"
    model.write_text(ASSIST_MODEL + "fault = crash_after_tokens:2\n", encoding="utf-8")
    entry = MockConfigEntry(
        domain=DOMAIN, data=entry_data(emulator_lib, model), subentries_data=[conversation_subentry()]
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    result = await converse(hass, "hello")
    assert result.response.response_type is intent.IntentResponseType.ERROR
    assert speech(result) == "The language model process crashed while answering; it is restarting. Try again"


@pytest.mark.parametrize("subentries", [[conversation_subentry(quick_confirmations=False)]])
@pytest.mark.usefixtures("kitchen_light")
async def test_next_turn_continues_from_the_resident_kv_state(
    hass: HomeAssistant, loaded_entry: MockConfigEntry, caplog: pytest.LogCaptureFixture
) -> None:
    """After a tool call the history is re-sent exactly as the engine saw it, so the next turn is warm.

    HA writes the spoken answer into the intent response a tool result refers to (2025.8+) and the chat log
    keeps repaired arguments; either change would otherwise force a full rebuild of the conversation. (With quick
    confirmations the model never generates the answer, so that next turn rebuilds: test_quick_confirmation.py.)
    """
    caplog.set_level(logging.DEBUG, logger="rkllm_engine.engine")  # one line per run names its plan mode
    first = await converse(hass, "turn on the kitchen light")
    second_turn = len(run_lines(caplog))
    result = await converse(hass, "say something else", conversation_id=first.conversation_id)
    assert speech(result).endswith("say something else")
    modes = [line.split("plan ", 1)[1].split(",", 1)[0] for line in run_lines(caplog)[second_turn:]]
    assert modes == ["continue"]


# --- The same agent served as an OpenAI model (agent_api) ---------------------------------------------------


@pytest.mark.parametrize(
    "subentries",
    [[conversation_subentry("Living room"), conversation_subentry("Living room", llm_hass_api=[])]],
)
@pytest.mark.usefixtures("loaded_entry")
async def test_agent_models_list_every_loaded_agent_with_unique_ids(hass: HomeAssistant) -> None:
    models = agent_models(hass)
    assert len(models) == 2
    assert len({model.model_id for model in models}) == 2
    assert all(model.model_id.startswith("rkllm-agent-living-room-") for model in models)
    assert sorted(model.llm_apis for model in models) == [(), ("assist",)]
    assert {model.entity_id for model in models} == {"conversation.living_room", "conversation.living_room_2"}


@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_agent_model_runs_the_assist_turn_with_server_side_tools(
    hass: HomeAssistant, hass_admin_user: MockUser, submitted: list[ChatRequest]
) -> None:
    (model,) = agent_models(hass)
    assert model.model_id == "rkllm-agent-assist-on-npu"
    deltas: list[AgentDelta] = []
    result = await async_run_agent(
        hass,
        model.entity_id,
        [
            ChatMessage(role="system", content="Always be polite."),
            ChatMessage(role="user", content="turn on the kitchen light"),
        ],
        context=Context(user_id=hass_admin_user.id),
        on_delta=deltas.append,
    )
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_ON
    assert result.text == "Turned on the light"
    assert result.tool_calls == 1
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens > 0
    assert "Always be polite." in (submitted[0].messages[0].content or "")  # client system → extra system prompt
    kinds = [delta.kind for delta in deltas]
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("text")
    call = next(delta for delta in deltas if delta.kind == "tool_call")
    assert (call.tool_name or "").rpartition("__")[2] == "HassTurnOn"
    assert call.tool_args == {"name": "Kitchen Light"}
    assert "".join(delta.text for delta in deltas if delta.kind == "text") == result.text


@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_agent_model_history_is_replayed_warm(hass: HomeAssistant) -> None:
    """A client re-sending the conversation continues from the engine's resident state (cached tokens)."""
    (model,) = agent_models(hass)
    first = await async_run_agent(
        hass, model.entity_id, [ChatMessage(role="user", content="say one")], context=Context(), on_delta=lambda _: None
    )
    history = [
        ChatMessage(role="user", content="say one"),
        ChatMessage(role="assistant", content=first.text),
        ChatMessage(role="user", content="say two"),
    ]
    second = await async_run_agent(hass, model.entity_id, history, context=Context(), on_delta=lambda _: None)
    assert second.text.endswith("say two")
    assert second.usage.cached_tokens > 0


@pytest.mark.usefixtures("kitchen_light", "loaded_entry")
async def test_agent_model_refuses_a_read_only_user_like_assist(
    hass: HomeAssistant, hass_read_only_user: MockUser
) -> None:
    (model,) = agent_models(hass)
    result = await async_run_agent(
        hass,
        model.entity_id,
        [ChatMessage(role="user", content="turn on the kitchen light")],
        context=Context(user_id=hass_read_only_user.id),
        on_delta=lambda _: None,
    )
    assert result.text == "I am not allowed to do that for you."
    assert hass.states.get(KITCHEN_LIGHT).state == STATE_OFF


@pytest.mark.usefixtures("loaded_entry")
@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([ChatMessage(role="system", content="only a system message")], "last message must be a user message"),
        (
            [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="hello")],
            "last message must be a user message",
        ),
        (
            [
                ChatMessage(role="tool", content="{}", tool_call_id="nobody-asked"),
                ChatMessage(role="user", content="hi"),
            ],
            "must answer a tool call",
        ),
    ],
)
async def test_agent_model_rejects_unusable_histories(
    hass: HomeAssistant, messages: list[ChatMessage], problem: str
) -> None:
    (model,) = agent_models(hass)
    with pytest.raises(AgentRequestError, match=problem):
        await async_run_agent(hass, model.entity_id, messages, context=Context(), on_delta=lambda _: None)


@pytest.mark.usefixtures("loaded_entry")
async def test_unknown_agent_is_a_translated_error(hass: HomeAssistant) -> None:
    with pytest.raises(HomeAssistantError) as caught:
        await async_run_agent(
            hass, "conversation.nobody", [ChatMessage(role="user", content="hi")], context=Context(), on_delta=print
        )
    assert caught.value.translation_key == "agent_not_found"
    assert str(caught.value) == "No RKLLM conversation agent conversation.nobody is loaded"


async def test_agent_model_engine_errors_carry_their_code(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    (model,) = agent_models(hass)
    await loaded_entry.runtime_data.engine.stop()
    with pytest.raises(EngineTurnError) as caught:
        await async_run_agent(
            hass, model.entity_id, [ChatMessage(role="user", content="hi")], context=Context(), on_delta=print
        )
    assert caught.value.code == "unavailable"


def test_every_engine_error_has_a_translated_sentence() -> None:
    """Queue full, unavailable, crash, overflow, failure: each engine code maps to its own exception text."""
    strings = json.loads((REPO_ROOT / "custom_components" / "rkllm" / "strings.json").read_text())["exceptions"]
    busy = EngineTurnError(QueueFullError("8 requests are waiting", retry_after_s=3.0))
    assert (busy.code, busy.translation_key, busy.retry_after_s) == ("queue_full", "queue_full", 3.0)
    cases = {
        EngineUnavailableError("loading"): "unavailable",
        WorkerCrashedError("signal 11"): "worker_crashed",
        ContextOverflowError("4100 > 4096"): "context_length_exceeded",
        GenerationError("ERROR state"): "generation_error",
        InvalidRequestError("bad tool"): "invalid_request",
        EngineError("something new"): "generation_error",
    }
    for error, key in cases.items():
        turn_error = EngineTurnError(error)
        assert turn_error.translation_key == key
        assert turn_error.engine_error is error
        assert key in strings
