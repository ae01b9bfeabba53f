"""Tests for the prompt planner (rkllm_engine/prompting.py): KV residency, rebuilds, forced calls, raw completions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rkllm_engine.output import OutputParser, ParseResult
from rkllm_engine.prompting import (
    CHATML,
    DEFAULT_SYSTEM_PROMPT,
    HISTORY_HEADER,
    JSON_MODE_INSTRUCTION,
    REQUIRED_TOOL_INSTRUCTION,
    REQUIRED_TOOL_OPENING,
    TOOL_RESULTS_CLOSING,
    ClearKV,
    PromptPlan,
    PromptPlanner,
    SetChatTemplate,
    SetFunctionTools,
    named_tool_opening,
    render_chatml_system,
    template_family,
)
from rkllm_engine.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    InvalidRequestError,
    ToolCall,
)

ASSIST_DATA = Path(__file__).resolve().parents[1] / "fixtures" / "assist"
SYSTEM = "You are a voice assistant for Home Assistant."
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "intent__HassTurnOn",
            "description": "Turns on/opens a device or entity",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {"name": "homeassistant__GetLiveContext", "description": "Live state", "parameters": {}},
    },
]


def planner(family: str | None = CHATML, context_length: int = 4096, max_new: int = 256) -> PromptPlanner:
    return PromptPlanner(template_family=family, context_length=context_length, default_max_new_tokens=max_new)


def parsed(output: str, *, tools: bool = True, prefill: str = "") -> ParseResult:
    parser = OutputParser(tools_enabled=tools, prefill=prefill)
    parser.feed(output)
    return parser.finish()


def chat(*messages: ChatMessage, **kwargs: Any) -> ChatRequest:
    kwargs.setdefault("tools", TOOLS)
    return ChatRequest(messages=[ChatMessage("system", SYSTEM), *messages], **kwargs)


def user(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def run(p: PromptPlanner, request: ChatRequest, output: str) -> PromptPlan:
    """Plan, 'execute' (the output stands for what the runtime generated) and report back."""
    plan = p.plan(request)
    p.on_run_finished(plan, parsed(output, tools=plan.tools_enabled, prefill=plan.prefill))
    return plan


def prep_types(plan: PromptPlan) -> list[type]:
    return [type(step) for step in plan.prep]


# --- continue ------------------------------------------------------------------------------------------------------


def test_first_request_sets_tools_and_later_turns_only_send_the_new_message() -> None:
    p = planner()
    first = run(p, chat(user("Hello")), "Hi! How can I help?")
    assert first.mode == "reset"
    assert first.prep == (SetFunctionTools(SYSTEM, json.dumps(TOOLS, separators=(",", ":"))), ClearKV(True))
    assert first.turn.text == "Hello"
    assert first.turn.keep_history

    second = p.plan(chat(user("Hello"), ChatMessage("assistant", "Hi! How can I help?"), user("What time is it?")))
    assert second.mode == "continue"
    assert second.prep == ()
    assert (second.turn.role, second.turn.text, second.turn.keep_history) == ("user", "What time is it?", True)
    assert second.estimated_prompt_tokens > first.estimated_prompt_tokens


def test_plan_is_pure() -> None:
    p = planner()
    run(p, chat(user("Hello")), "Hi!")
    before = p.resident_tokens_estimate
    request = chat(user("Hello"), ChatMessage("assistant", "Hi!"), user("Again"))
    assert p.plan(request) == p.plan(request)
    assert p.resident_tokens_estimate == before


def test_chat_log_style_resend_still_continues() -> None:
    """HA's ChatLog re-sends our output in its own form: other ids, re-serialized arguments, think block kept."""
    p = planner()
    first = run(
        p,
        chat(user("Turn on the kitchen light")),
        '<think>The user wants the light on.</think>\nSure. <tool_call>\n{"name": "intent__HassTurnOn", '
        '"arguments": {"name": "Kitchen Light", "domain": ["light"]}}\n</tool_call>',
    )
    assert first.mode == "reset"
    resent = ChatMessage(
        "assistant",
        "<think>The user wants the light on.</think>\n\nSure.  ",
        tool_calls=(ToolCall("01JQ0000CHATLOG", "intent__HassTurnOn", '{"domain":["light"],"name":"Kitchen Light"}'),),
    )
    result = ChatMessage("tool", '{"success": true}', tool_call_id="01JQ0000CHATLOG", name="intent__HassTurnOn")
    plan = p.plan(chat(user("Turn on the kitchen light"), resent, result))
    assert plan.mode == "continue"
    assert plan.prep == ()
    assert plan.turn.role == "tool"
    assert json.loads(plan.turn.text) == [{"name": "intent__HassTurnOn", "content": {"success": True}}]


def test_tool_results_are_merged_in_call_order() -> None:
    p = planner()
    run(
        p,
        chat(user("Light on and what is the state?")),
        '<tool_call>{"name": "intent__HassTurnOn", "arguments": {"name": "Kitchen Light"}}</tool_call>'
        '<tool_call>{"name": "homeassistant__GetLiveContext", "arguments": {}}</tool_call>',
    )
    calls = (
        ToolCall("call_a", "intent__HassTurnOn", '{"name": "Kitchen Light"}'),
        ToolCall("call_b", "homeassistant__GetLiveContext", "{}"),
    )
    request = chat(
        user("Light on and what is the state?"),
        ChatMessage("assistant", None, tool_calls=calls),
        # Sent in reverse order, the second without a name: the planner orders and names them by the calls.
        ChatMessage("tool", "Live Context: Kitchen Light is on", tool_call_id="call_b"),
        ChatMessage("tool", '{"speech": {}, "response_type": "action_done"}', tool_call_id="call_a"),
    )
    plan = p.plan(request)
    assert plan.mode == "continue"
    assert plan.turn.role == "tool"
    assert plan.turn.text == (
        '[{"name":"intent__HassTurnOn","content":{"speech":{},"response_type":"action_done"}},'
        '{"name":"homeassistant__GetLiveContext","content":"Live Context: Kitchen Light is on"}]'
    )


def test_real_assist_prompt_tools_and_tool_result_round_trip() -> None:
    dump = json.loads((ASSIST_DATA / "assist_dump_2026.2.3.json").read_text())
    results = json.loads((ASSIST_DATA / "tool_results_2026.2.3.json").read_text())
    system = dump["default_instructions"] + "\n" + dump["api_prompt"]
    tools = dump["tools"]
    p = planner(context_length=4096, max_new=512)
    base = [ChatMessage("system", system), user("turn on the kitchen light")]
    first = run(
        p,
        ChatRequest(messages=base, tools=tools, dynamic_context="Current time is 18:04."),
        '<tool_call>\n{"name": "HassTurnOn", "arguments": {"name": "Kitchen Light", "domain": ["light"]}}\n'
        "</tool_call>",
    )
    set_tools = first.prep[0]
    assert isinstance(set_tools, SetFunctionTools)
    assert set_tools.system_prompt == system.strip()
    assert json.loads(set_tools.tools_json) == tools
    assert first.turn.text == "Current time is 18:04.\n\nturn on the kitchen light"
    # ≈ 2 k tokens at chars/3 for the ~8 kB of prompt and tools (docs/home-assistant.md §2.7).
    assert 1500 < first.estimated_prompt_tokens < 3500

    call = ToolCall("01JV9", "HassTurnOn", json.dumps({"name": "Kitchen Light", "domain": ["light"]}))
    history = [
        *base,
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", json.dumps(results["turn_on_ok"]), tool_call_id="01JV9", name="HassTurnOn"),
    ]
    second = run(
        p, ChatRequest(messages=history, tools=tools, dynamic_context="Current time is 18:04."), "The light is on."
    )
    assert second.mode == "continue"
    assert json.loads(second.turn.text) == [{"name": "HassTurnOn", "content": results["turn_on_ok"]}]

    third = p.plan(
        ChatRequest(
            messages=[*history, ChatMessage("assistant", "The light is on."), user("what is the temperature outside")],
            tools=tools,
            dynamic_context="Current time is 18:05.",
        )
    )
    assert third.mode == "continue"
    assert third.turn.text == "Current time is 18:05.\n\nwhat is the temperature outside"


# --- rebuild and reset ---------------------------------------------------------------------------------------------


def test_different_history_rebuilds_with_the_system_prompt_kept() -> None:
    p = planner()
    run(p, chat(user("Hello")), "Hi!")
    plan = p.plan(chat(user("Hello"), ChatMessage("assistant", "Something else"), user("And now?")))
    assert plan.mode == "rebuild"
    assert plan.prep == (ClearKV(keep_system_prompt=True),)
    assert plan.turn.keep_history
    assert plan.turn.text == f"{HISTORY_HEADER}\nUser: Hello\nAssistant: Something else\n\nAnd now?"


def test_new_conversation_with_the_same_prefix_is_a_warm_rebuild_of_just_the_message() -> None:
    p = planner()
    run(p, chat(user("turn on the kitchen light")), "Done.")
    plan = p.plan(chat(user("turn off the kitchen light"), dynamic_context="It is 9:00."))
    assert plan.mode == "rebuild"
    assert plan.prep == (ClearKV(True),)
    assert plan.turn.text == "It is 9:00.\n\nturn off the kitchen light"


def test_changed_system_prompt_or_tools_resets() -> None:
    p = planner()
    run(p, chat(user("Hello")), "Hi!")
    other_system = ChatRequest(messages=[ChatMessage("system", "Be brief."), user("Hello")], tools=TOOLS)
    assert prep_types(p.plan(other_system)) == [SetFunctionTools, ClearKV]
    fewer_tools = chat(user("Hello"), ChatMessage("assistant", "Hi!"), user("More"), tools=TOOLS[:1])
    plan = p.plan(fewer_tools)
    assert plan.mode == "reset"
    assert plan.prep[0] == SetFunctionTools(SYSTEM, json.dumps(TOOLS[:1], separators=(",", ":")))


def test_no_tools_still_calls_set_function_tools_with_an_empty_array() -> None:
    p = planner()
    plan = p.plan(ChatRequest(messages=[user("Hi")]))
    assert plan.prep == (SetFunctionTools(DEFAULT_SYSTEM_PROMPT, "[]"), ClearKV(True))
    assert not plan.tools_enabled
    assert p.resident_tool_names == ()


def test_invalidate_forces_a_reset() -> None:
    p = planner()
    run(p, chat(user("Hello")), "Hi!")
    p.invalidate()
    assert p.resident_tokens_estimate == 0
    plan = p.plan(chat(user("Hello"), ChatMessage("assistant", "Hi!"), user("Next")))
    assert plan.mode == "reset"
    assert prep_types(plan) == [SetFunctionTools, ClearKV]
    assert plan.turn.text.startswith(HISTORY_HEADER)


def test_stop_string_abort_forgets_the_kv_and_a_cut_off_call_rebuilds() -> None:
    p = planner()
    plan = p.plan(chat(user("Hello")))
    stopped = OutputParser(tools_enabled=True, stop=["###"])
    stopped.feed("Hi ### there")
    p.on_run_finished(plan, stopped.finish())
    assert p.plan(chat(user("Hello"), ChatMessage("assistant", "Hi"), user("x"))).mode == "reset"

    p = planner()
    plan = p.plan(chat(user("Hello")))
    p.on_run_finished(plan, parsed('<tool_call>{"name": "intent__HassTurnOn", "arguments": {"na'))
    assert p.plan(chat(user("Hello"), ChatMessage("assistant", ""), user("x"))).mode == "rebuild"


def test_dynamic_context_never_enters_the_system_prompt() -> None:
    p = planner(family=CHATML)
    dynamic = "Current time: 21:37, 2026-03-01"
    requests = [
        chat(user("Hi"), dynamic_context=dynamic),
        chat(user("Hi"), dynamic_context=dynamic, tool_choice="required"),
        chat(user("Hi"), dynamic_context=dynamic, tool_choice="intent__HassTurnOn"),
        chat(user("Hi"), ChatMessage("assistant", "Yo"), user("Again"), dynamic_context=dynamic),
    ]
    for request in requests:
        plan = p.plan(request)
        for step in plan.prep:
            if isinstance(step, SetFunctionTools | SetChatTemplate):
                assert dynamic not in step.system_prompt
        assert plan.turn.text.startswith(dynamic + "\n\n")
    run(p, requests[0], "Hello")
    continued = p.plan(chat(user("Hi"), ChatMessage("assistant", "Hello"), user("Next"), dynamic_context="Later"))
    assert continued.mode == "continue"
    assert continued.turn.text == "Later\n\nNext"


def test_several_system_and_developer_messages_are_joined() -> None:
    request = ChatRequest(
        messages=[ChatMessage("system", "Rule one."), user("Hi"), ChatMessage("developer", "Rule two.")],  # type: ignore[arg-type]
    )
    plan = planner().plan(request)
    assert plan.prep[0] == SetFunctionTools("Rule one.\n\nRule two.", "[]")


# --- context budget ------------------------------------------------------------------------------------------------


def test_trimming_drops_oldest_units_and_keeps_call_result_pairs_together() -> None:
    big = "x" * 600
    call = ToolCall("c1", "intent__HassTurnOn", '{"name": "Kitchen Light"}')
    messages = [
        user("old question " + big),
        ChatMessage("assistant", "old answer " + big),
        user("turn on the light"),
        ChatMessage("assistant", None, tool_calls=(call,)),
        ChatMessage("tool", '{"result": "' + big + '"}', tool_call_id="c1"),
        ChatMessage("assistant", "It is on."),
        user("thanks"),
    ]
    everything = planner(context_length=1400, max_new=256).plan(chat(*messages))
    assert everything.turn.text.startswith(HISTORY_HEADER + "\nUser: old question")

    plan = planner(context_length=1000, max_new=256).plan(chat(*messages))
    text = plan.turn.text
    assert "old question" not in text
    assert "old answer" not in text
    assert text == (
        f"{HISTORY_HEADER}\nUser: turn on the light\n"
        'Assistant called intent__HassTurnOn with {"name":"Kitchen Light"}\n'
        f'Tool result (intent__HassTurnOn): {{"result":"{big}"}}\n'
        "Assistant: It is on.\n\nthanks"
    )
    assert plan.estimated_prompt_tokens + 256 <= 1000

    # The call and its result go together (and the answer with its question): here the whole round goes.
    tight = planner(context_length=700, max_new=256).plan(chat(*messages))
    assert tight.turn.text == "thanks"


def test_pending_call_and_results_are_never_trimmed() -> None:
    call = ToolCall("c1", "intent__HassTurnOn", '{"name": "Kitchen Light"}')
    messages = [
        user("old " + "y" * 3000),
        ChatMessage("assistant", "ok"),
        user("turn on the light"),
        ChatMessage("assistant", None, tool_calls=(call,)),
        ChatMessage("tool", '{"success": true}', tool_call_id="c1"),
    ]
    # Even when nothing fits, the current round (question, call, results) stays: the runtime judges the overflow.
    plan = planner(context_length=300, max_new=256).plan(chat(*messages))
    assert plan.mode == "reset"
    assert plan.turn.role == "user"
    assert plan.turn.text == (
        f"{HISTORY_HEADER}\nUser: turn on the light\n"
        'Assistant called intent__HassTurnOn with {"name":"Kitchen Light"}\n'
        'Tool result (intent__HassTurnOn): {"success":true}\n\n' + TOOL_RESULTS_CLOSING
    )
    assert plan.resident_after_input is not None


def test_a_continue_that_would_overflow_becomes_a_trimmed_rebuild() -> None:
    p = planner(context_length=700, max_new=200)
    long_answer = "z" * 900
    run(p, chat(user("Tell me a story")), long_answer)
    plan = p.plan(chat(user("Tell me a story"), ChatMessage("assistant", long_answer), user("Another")))
    assert plan.mode == "rebuild"
    assert long_answer not in plan.turn.text


# --- tool_choice ---------------------------------------------------------------------------------------------------


def test_required_on_chatml_prefills_the_call_opening() -> None:
    p = planner(family=CHATML)
    plan = p.plan(chat(user("Turn on the kitchen light"), tool_choice="required"))
    assert plan.mode == "forced"
    assert plan.prefill == REQUIRED_TOOL_OPENING == '<tool_call>\n{"name": "'
    (template,) = plan.prep
    assert template == SetChatTemplate(
        render_chatml_system(SYSTEM, TOOLS),
        "<|im_start|>user\n",
        '<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "',
    )
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n" + json.dumps(TOOLS[1]) + "\n</tools>" in template.system_prompt
    assert not plan.turn.keep_history
    assert plan.forced_tool is None
    assert plan.tools_enabled
    # What the model continues with completes the call through the parser.
    result = parsed('intent__HassTurnOn", "arguments": {"name": "Kitchen Light"}}\n</tool_call>', prefill=plan.prefill)
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [
        ("intent__HassTurnOn", {"name": "Kitchen Light"})
    ]


def test_named_tool_on_chatml_prefills_name_and_arguments_key() -> None:
    p = planner(family=CHATML)
    plan = p.plan(chat(user("Light on"), tool_choice="intent__HassTurnOn"))
    opening = '<tool_call>\n{"name": "intent__HassTurnOn", "arguments": '
    assert named_tool_opening("intent__HassTurnOn") == opening
    assert plan.prefill == opening
    assert plan.forced_tool == "intent__HassTurnOn"
    template = plan.prep[0]
    assert isinstance(template, SetChatTemplate)
    assert template.postfix.endswith(opening)
    p.on_run_finished(plan, parsed('{"name": "Kitchen Light"}}\n</tool_call>', prefill=plan.prefill))
    # Same forced template again: not set twice. Back to auto: the built-in template is restored.
    assert p.plan(chat(user("Light off"), tool_choice="intent__HassTurnOn")).prep == ()
    after = p.plan(chat(user("Light off")))
    assert after.mode == "reset"
    assert prep_types(after) == [SetFunctionTools, ClearKV]


def test_forced_plan_flattens_the_whole_conversation() -> None:
    plan = planner(family=CHATML).plan(
        chat(user("Hi"), ChatMessage("assistant", "Hello!"), user("Light on please"), tool_choice="required")
    )
    assert plan.turn.text == f"{HISTORY_HEADER}\nUser: Hi\nAssistant: Hello!\n\nLight on please"


def test_unknown_family_gets_an_instruction_and_no_prefill() -> None:
    p = planner(family=None)
    required = p.plan(chat(user("Light on"), tool_choice="required"))
    assert required.prefill == ""
    assert required.mode == "reset"
    assert not any(isinstance(step, SetChatTemplate) for step in required.prep)
    assert required.turn.text == "Light on\n\n" + REQUIRED_TOOL_INSTRUCTION
    named = p.plan(chat(user("Light on"), tool_choice="intent__HassTurnOn"))
    assert named.prefill == ""
    assert named.forced_tool == "intent__HassTurnOn"
    assert named.turn.text.endswith("intent__HassTurnOn.")


def test_tool_choice_none_gives_no_tools_but_keeps_tool_history() -> None:
    call = ToolCall("c1", "intent__HassTurnOn", '{"name": "Kitchen Light"}')
    request = chat(
        user("Light on"),
        ChatMessage("assistant", None, tool_calls=(call,)),
        ChatMessage("tool", '{"success": true}', tool_call_id="c1", name="intent__HassTurnOn"),
        ChatMessage("assistant", "Done."),
        user("Summarise what you did"),
        tool_choice="none",
    )
    plan = planner().plan(request)
    assert not plan.tools_enabled
    assert plan.prep[0] == SetFunctionTools(SYSTEM, "[]")
    assert 'Assistant called intent__HassTurnOn with {"name":"Kitchen Light"}' in plan.turn.text
    assert 'Tool result (intent__HassTurnOn): {"success":true}' in plan.turn.text


def test_json_mode_adds_an_instruction_to_the_user_turn() -> None:
    plan = planner().plan(chat(user("List two colours"), json_mode=True))
    assert plan.turn.text == "List two colours\n\n" + JSON_MODE_INSTRUCTION
    assert plan.prefill == ""


# --- raw completions -----------------------------------------------------------------------------------------------


def test_completion_is_raw_and_the_next_chat_restores_the_template() -> None:
    p = planner()
    run(p, chat(user("Hello")), "Hi!")
    plan = p.plan(CompletionRequest(prompt="def fib(n):"))
    assert plan.mode == "raw"
    assert plan.prep == (SetChatTemplate("", "", ""),)
    assert (plan.turn.role, plan.turn.text, plan.turn.keep_history) == ("user", "def fib(n):", False)
    assert not plan.tools_enabled
    p.on_run_finished(plan, parsed("\n    return n", tools=False))
    assert p.plan(CompletionRequest(prompt="again")).prep == ()
    back = p.plan(chat(user("Hello"), ChatMessage("assistant", "Hi!"), user("More")))
    assert back.mode == "reset"
    assert prep_types(back) == [SetFunctionTools, ClearKV]


# --- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (chat(user("x"), tool_choice="HassTurnOn"), "tool_choice names the tool 'HassTurnOn', which is not in tools"),
        (chat(user("x"), tools=[], tool_choice="required"), "tool_choice 'required' needs at least one tool"),
        (ChatRequest(messages=[ChatMessage("system", "s")]), "messages contain no user or tool message"),
        (ChatRequest(messages=[]), "messages contain no user or tool message"),
        (chat(user("x"), ChatMessage("assistant", "y")), "the last message is an assistant message"),
        (chat(ChatMessage("user", None)), r"messages\[1\]: a user message needs text content"),
        (chat(user("x"), tools=[{"type": "retrieval"}]), r"tools\[0\]: expected"),
        (chat(user("x"), tools=[{"type": "function", "function": {}}]), r"tools\[0\]: the function has no name"),
        (CompletionRequest(prompt=""), "prompt is empty"),
    ],
)
def test_bad_requests_get_one_specific_error(request_: ChatRequest | CompletionRequest, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        planner().plan(request_)


def test_template_family(tmp_path: Path) -> None:
    emulator_model = tmp_path / "assist.model"
    emulator_model.write_text("rkllm-emulator-model 1\nname = demo\n")
    other = tmp_path / "llama-3.2-1b.rkllm"
    other.write_bytes(b"RKLLM\x00\x01binary")
    assert template_family(tmp_path / "Qwen2.5-1.5B-Instruct_W8A8_RK3588.rkllm") == CHATML
    assert template_family(emulator_model) == CHATML
    assert template_family(other) is None
    assert template_family(tmp_path / "missing.rkllm") is None
