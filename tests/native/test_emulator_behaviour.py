"""The emulator behaves as rkllm_native/emulator/MODEL_FORMAT.md documents, in both ABI flavours.

These tests drive the C library with their own calls through the binding's ctypes declarations
(`rkllm_native.abi`), not through its runtime layer (tested in test_binding_*). Expected token counts are computed
from the documented tokenizer and template (§4, §5), so a drift between the specification and the C code fails here.
"""

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rkllm_native import abi
from rkllm_native.build import Profile, emulator_library

PROFILES: tuple[Profile, ...] = ("v12x", "v130")
NORMAL, WAITING, FINISH, ERROR = 0, 1, 2, 3

# ---------------------------------------------------------------------------------------------------------------
# The documented tokenizer and template (MODEL_FORMAT.md §4-§5), re-implemented to predict token counts.


_PUNCT = rb"[\x00-\x08\x0e-\x1f!-/:-@\[-`{-\x7f]"  # ASCII that is neither a letter, a digit nor whitespace
_PIECE_RUN = re.compile(
    rb"(?P<word> ?[A-Za-z0-9]+)"
    rb"|(?P<punct> ?" + _PUNCT + rb"+)"
    rb"|(?P<space>[\t-\r ]+(?= (?:[A-Za-z0-9]|" + _PUNCT + rb"))|[\t-\r ]+)"
    rb"|(?P<other>[\x80-\xff]+)"
)


_SPECIAL = re.compile(rb"(<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|</?tool_call>|</?think>)")


def pieces(text: str, chars_per_token: int = 6) -> list[bytes]:
    """§5: Qwen's added tokens are one piece each; the rest as `_plain_pieces`."""
    out: list[bytes] = []
    for segment in _SPECIAL.split(text.encode()):
        if _SPECIAL.fullmatch(segment):
            out.append(segment)
        else:
            out += _plain_pieces(segment, chars_per_token)
    return out


def _plain_pieces(text: bytes, chars_per_token: int) -> list[bytes]:
    """A space before a word or punctuation run rides along; punctuation pairs up; the rest cut by length."""
    out: list[bytes] = []
    for match in _PIECE_RUN.finditer(text):
        run = match.group()
        prefix = run[:1] if match.lastgroup in ("word", "punct") and run[:1] == b" " else b""
        body = run[len(prefix) :]
        step = min(2, chars_per_token) if match.lastgroup == "punct" else chars_per_token
        cuts = [body[cut : cut + step] for cut in range(0, len(body), step)]
        out += [prefix + cuts[0], *cuts[1:]]
    return out


def ntok(text: str) -> int:
    return len(pieces(text))


def system_part(system: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""


def user_turn(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


DEFAULT_SYSTEM = "You are a helpful assistant."

# ---------------------------------------------------------------------------------------------------------------
# Both ABI flavours as the binding declares them (rkllm_native.abi); the calls below are the tests' own.

_LIBRARIES: dict[Profile, abi.BoundLibrary] = {}


def load(profile: Profile) -> abi.BoundLibrary:
    if profile not in _LIBRARIES:
        _LIBRARIES[profile] = abi.PROFILES[profile].bind(ctypes.CDLL(str(emulator_library(profile))))
    return _LIBRARIES[profile]


@dataclass
class Event:
    state: int
    text: bytes | None
    token_id: int
    perf: tuple[float, int, float, int, float] | None = None
    hidden: tuple[int, int] | None = None


@dataclass
class RunResult:
    rc: int
    events: list[Event]

    @property
    def text(self) -> str:
        return b"".join(e.text or b"" for e in self.events if e.state == NORMAL).decode()

    @property
    def finish(self) -> Event | None:
        finishes = [e for e in self.events if e.state == FINISH]
        assert len(finishes) <= 1
        return finishes[0] if finishes else None

    @property
    def prefill_tokens(self) -> int:
        assert self.finish is not None
        assert self.finish.perf is not None
        return self.finish.perf[1]


@dataclass
class Session:
    """One emulator handle with an event-recording callback."""

    profile: Profile
    model: Path
    max_context_len: int = 4096
    max_new_tokens: int = 256
    n_keep: int = -1
    n_batch: int = 1
    cpus: tuple[int, int] = (4, 0xF0)
    skip_special_token: bool = True
    on_event: Callable[["Session", Event], int] | None = None
    events: list[list[Event]] = field(default_factory=list)
    userdata_seen: list[int | None] = field(default_factory=list)
    init_rc: int = 0
    handle: ctypes.c_void_p = field(default_factory=ctypes.c_void_p)

    def __post_init__(self) -> None:
        self.abi_profile = abi.PROFILES[self.profile]
        self.lib = load(self.profile)
        self._callback = abi.LLMResultCallback(self._on_result)
        self.param = self.abi_profile.param_struct()
        self.param.model_path = str(self.model).encode()
        self.param.max_context_len = self.max_context_len
        self.param.max_new_tokens = self.max_new_tokens
        self.param.n_keep = self.n_keep
        self.param.top_k = 1
        self.param.top_p = 0.9
        self.param.temperature = 0.8
        self.param.repeat_penalty = 1.1
        self.param.skip_special_token = self.skip_special_token
        self.param.extend_param.n_batch = self.n_batch
        self.param.extend_param.enabled_cpus_num, self.param.extend_param.enabled_cpus_mask = self.cpus
        if self.profile == "v130":
            self.callbacks = abi.RKLLMCallback(result_callback=self._callback, result_userdata=0x5EED)
            self.init_rc = self.lib.init(
                ctypes.byref(self.handle), ctypes.byref(self.param), ctypes.byref(self.callbacks)
            )
        else:
            self.init_rc = self.lib.init(ctypes.byref(self.handle), ctypes.byref(self.param), self._callback)

    def _on_result(self, result: Any, userdata: int | None, state: int) -> int:
        self.userdata_seen.append(userdata)
        for index in range(self.n_batch):
            item = result[index]
            text = item.text
            perf = None
            if state == FINISH:
                p = item.perf
                perf = (p.prefill_time_ms, p.prefill_tokens, p.generate_time_ms, p.generate_tokens, p.memory_usage_mb)
            hidden = None
            if item.last_hidden_layer.embd_size:
                hidden = (item.last_hidden_layer.embd_size, item.last_hidden_layer.num_tokens)
            self.events[index].append(Event(state, text, item.token_id, perf, hidden))
        if self.on_event is not None:
            return self.on_event(self, self.events[0][-1])
        return 0

    def make_input(self, text: str | None, role: str = "user", thinking: bool = False) -> Any:
        item = self.abi_profile.input_struct()
        item.role = role.encode()
        item.enable_thinking = thinking
        item.input_type = 0
        item.prompt_input = text.encode() if text is not None else None
        return item

    def make_infer(self, keep_history: bool = False, **extra: Any) -> Any:
        infer = self.abi_profile.infer_param_struct()
        infer.keep_history = int(keep_history)
        for key, value in extra.items():
            setattr(infer, key, value)
        return infer

    def run(
        self,
        text: str | list[str] | None,
        role: str = "user",
        *,
        keep_history: bool = False,
        thinking: bool = False,
        userdata: int | None = None,
        **infer: Any,
    ) -> RunResult | list[RunResult]:
        texts = text if isinstance(text, list) else [text]
        inputs = self.abi_profile.input_struct * len(texts)
        array = inputs(*(self.make_input(t, role, thinking) for t in texts))
        self.events = [[] for _ in range(self.n_batch)]
        self.userdata_seen = []
        rc = self.lib.run(self.handle, array, ctypes.byref(self.make_infer(keep_history, **infer)), userdata)
        results = [RunResult(rc, events) for events in self.events]
        return results if isinstance(text, list) else results[0]

    def one(self, text: str | None, role: str = "user", **kwargs: Any) -> RunResult:
        result = self.run(text, role, **kwargs)
        assert isinstance(result, RunResult)
        return result

    def kv(self) -> list[int]:
        sizes = (ctypes.c_int * self.n_batch)()
        assert self.lib.get_kv_cache_size(self.handle, sizes) == 0
        return list(sizes)

    def set_tools(self, system: str, tools_json: str) -> int:
        return int(
            self.lib.set_function_tools(self.handle, system.encode(), tools_json.encode(), b"tool_response")
        )

    def set_template(self, system: str, prefix: str, postfix: str) -> int:
        return int(self.lib.set_chat_template(self.handle, system.encode(), prefix.encode(), postfix.encode()))

    def close(self) -> None:
        if self.handle:
            assert self.lib.destroy(self.handle) == 0
            self.handle = ctypes.c_void_p()


@pytest.fixture
def write_model(tmp_path: Path) -> Callable[..., Path]:
    def write(body: str = "", name: str = "test.model") -> Path:
        path = tmp_path / name
        path.write_text("rkllm-emulator-model 1\nspeed = 0\n" + body, encoding="utf-8")
        return path

    return write


@pytest.fixture
def sessions() -> Iterator[Callable[..., Session]]:
    opened: list[Session] = []

    def open_session(profile: Profile, model: Path, **options: Any) -> Session:
        session = Session(profile, model, **options)
        opened.append(session)
        return session

    yield open_session
    for session in opened:
        session.close()


TOOLS = '[{"type":"function","function":{"name":"intent__HassTurnOn","parameters":{}}}]'
ASSIST_RULES = (
    'answer user "turn on*" = <tool_call>\\n{"name": "{{tool:HassTurnOn}}", "arguments": {"name": "Kitchen Light"}}'
    "\\n</tool_call>\n"
    'answer user "turn on*" = Which device?\n'
)

# ---------------------------------------------------------------------------------------------------------------
# init


@pytest.mark.parametrize("profile", PROFILES)
def test_init_prints_runtime_lines_and_takes_the_load_time(
    profile: Profile,
    write_model: Callable[..., Path],
    sessions: Callable[..., Session],
    capfd: pytest.CaptureFixture[str],
) -> None:
    model = write_model("speed = 1\nload_time_ms = 150\nmax_context_limit = 8192\n")
    started = time.monotonic()
    session = sessions(profile, model)
    elapsed = time.monotonic() - started
    assert session.init_rc == 0
    assert session.handle
    assert elapsed >= 0.15  # the load time is slept (a lower bound: load only lengthens it)
    version = "1.3.0" if profile == "v130" else "1.2.3"
    assert capfd.readouterr().out.splitlines() == [
        f"I rkllm: rkllm-runtime version: {version}, rknpu driver version: 0.9.8, platform: RK3588",
        f"I rkllm: loading rkllm model from {model}",
        "I rkllm: rkllm-toolkit version: 1.2.1, max_context_limit: 8192, npu_core_num: 3, target_platform: RK3588",
        "I rkllm: Enabled cpus num: 4",
    ]


@pytest.mark.parametrize(
    ("model_body", "options", "line"),
    [
        ("", {"n_batch": 0}, "E rkllm: The n_batch must be between 1 and 100, but got 0"),
        ("", {"n_keep": 4096}, "E rkllm: The n_keep must be less than the max_context_len"),
        (
            "max_context_limit = 2048\n",
            {},
            "E rkllm: max_context[4096] must be less than the model's max_context_limit[2048]",
        ),
        (
            "",
            {"cpus": (4, 0x70)},
            "E rkllm: Mismatch between enabled CPUs mask and expected count. Please check the configuration.",
        ),
        (
            "",
            {"cpus": (2, 0x30)},
            "E rkllm: The number of enabled CPUs must be greater than or equal to the number of NPU cores.",
        ),
        ("host_platform = RK3576\n", {}, "E rkllm: the model's target_platform does not match the real platform"),
        (
            "toolkit_version = 9.0.0\n",
            {},
            "E rkllm: The rkllm-runtime version is lower than the rkllm-toolkit version. "
            "Please update rkllm-runtime to 9.0.0 or higher.",
        ),
        ("fault = init_fail\n", {}, "E rkllm: emulated init failure (fault = init_fail in {model})"),
        (
            "chars_per_token = 0\n",
            {},
            "E rkllm: emulator model {model}:3: chars_per_token must be between 1 and 64, got 0",
        ),
        ("answer user hi = x\n", {}, "E rkllm: emulator model {model}:3: expected a double-quoted pattern"),
    ],
)
def test_init_rejects_bad_settings_with_one_specific_line(
    model_body: str,
    options: dict[str, Any],
    line: str,
    write_model: Callable[..., Path],
    sessions: Callable[..., Session],
    capfd: pytest.CaptureFixture[str],
) -> None:
    model = write_model(model_body)
    session = sessions("v12x", model, **options)
    assert session.init_rc == -1
    assert not session.handle
    errors = [text for text in capfd.readouterr().out.splitlines() if text.startswith("E ")]
    assert errors[0] == line.format(model=model)


def test_missing_model_file_names_the_path(
    tmp_path: Path, sessions: Callable[..., Session], capfd: pytest.CaptureFixture[str]
) -> None:
    session = sessions("v130", tmp_path / "nope.model")
    assert session.init_rc == -1
    assert f"E rkllm: failed to open model file '{tmp_path / 'nope.model'}': No such file or directory" in (
        capfd.readouterr().out.splitlines()
    )


def test_old_driver_only_warns(
    write_model: Callable[..., Path], sessions: Callable[..., Session], capfd: pytest.CaptureFixture[str]
) -> None:
    session = sessions("v12x", write_model("driver_version = 0.9.6\n"))
    assert session.init_rc == 0
    out = capfd.readouterr().out.splitlines()
    assert "I rkllm: rkllm-runtime version: 1.2.3, rknpu driver version: 0.9.6, platform: RK3588" in out
    assert "W rkllm: Warning: Your rknpu driver version is too low, please upgrade to 0.9.8" in out


# ---------------------------------------------------------------------------------------------------------------
# answers and templates


@pytest.mark.parametrize("profile", PROFILES)
def test_tool_rule_names_the_offered_tool_and_is_skipped_without_it(
    profile: Profile, write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    session = sessions(profile, write_model(ASSIST_RULES))
    assert session.one("turn on the kitchen light").text == "Which device?"
    assert session.set_tools("You control a home.", TOOLS) == 0
    result = session.one("turn on the kitchen light")
    assert result.rc == 0
    assert (
        result.text
        == '<tool_call>\n{"name": "intent__HassTurnOn", "arguments": {"name": "Kitchen Light"}}\n</tool_call>'
    )


def test_tool_results_match_rules_and_after_clauses(
    write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    rules = (
        'answer tool "*\\"error\\"*" = Sorry.\n'
        'answer tool "*action_done*" after "*turn off*" = It is off.\n'
        'answer tool "*action_done*" = It is on.\n'
        "default_answer = Echo {{input}}\n"
    )
    session = sessions("v130", write_model(rules))
    done = '[{"content":{"response_type":"action_done"}}]'
    assert session.one('[{"content":{"error":"MatchFailedError"}}]', "tool").text == "Sorry."
    assert session.one(done, "tool").text == "It is on."
    assert session.one("Please TURN OFF the light").text == "Echo Please TURN OFF the light"
    assert session.one(done, "tool").text == "It is off."


@pytest.mark.parametrize("profile", PROFILES)
def test_keep_history_prefills_only_the_new_turn(
    profile: Profile, write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    session = sessions(profile, write_model("default_answer = ok\n"))
    first = session.one("hello there", keep_history=True)
    assert first.prefill_tokens == ntok(system_part(DEFAULT_SYSTEM) + user_turn("hello there"))
    # the answer "ok" stays in the KV; its end-of-turn token is prefilled with the next appended turn (§6)
    assert session.kv() == [first.prefill_tokens + 1]
    second = session.one("and again", keep_history=True)
    assert second.prefill_tokens == 1 + ntok(user_turn("and again"))
    assert session.kv() == [first.prefill_tokens + 1 + second.prefill_tokens + 1]
    tool = session.one('{"ok": true}', "tool", keep_history=True)
    assert tool.prefill_tokens == 1 + ntok(user_turn('<tool_response>\n{"ok": true}\n</tool_response>'))


def test_keep_history_0_keeps_only_the_system_prompt_and_reuses_it(
    write_model: Callable[..., Path], sessions: Callable[..., Session], capfd: pytest.CaptureFixture[str]
) -> None:
    session = sessions("v12x", write_model())
    system = ntok(system_part(DEFAULT_SYSTEM))
    assert session.one("first question").prefill_tokens == system + ntok(user_turn("first question"))
    assert session.kv() == [system]
    capfd.readouterr()
    assert session.one("second").prefill_tokens == ntok(user_turn("second"))
    total = system + ntok(user_turn("second"))
    assert f"I rkllm: kv cache matches {system} / {total} tokens of prompt" in capfd.readouterr().out.splitlines()
    assert session.lib.clear_kv_cache(session.handle, 0, None, None) == 0
    assert session.kv() == [0]
    assert session.one("third").prefill_tokens == system + ntok(user_turn("third"))


def test_function_tools_render_the_qwen_tools_block(
    write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    session = sessions("v130", write_model())
    assert session.set_tools("You control a home.", TOOLS) == 0
    tool_line = '{"type":"function","function":{"name":"intent__HassTurnOn","parameters":{}}}'
    system = (
        "<|im_start|>system\nYou control a home.\n\n# Tools\n\nYou may call one or more functions to assist with "
        "the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tool_line}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n"
    )
    assert session.one("hi").prefill_tokens == ntok(system + user_turn("hi"))
    assert session.set_tools("x", "{not json") == -1
    assert session.set_tools("x", '{"type": "function"}') == -1


def test_thinking_model_thinks_only_when_asked(
    write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    session = sessions("v130", write_model("calibration = qwen3-1.7b-rk3588\nspeed = 0\ndefault_answer = Hi.\n"))
    thinking = session.one("hello", thinking=True)
    assert thinking.text == "<think>\nLet me think about this request.\n</think>\n\nHi."
    plain = session.one("hello")
    assert plain.text == "Hi."
    # Qwen3 without a default system prompt; thinking off adds the empty think block to the prompt.
    assert plain.prefill_tokens == ntok(user_turn("hello") + "<think>\n\n</think>\n\n")


@pytest.mark.parametrize(
    ("postfix", "expected"),
    [
        (
            '<tool_call>\n{"name": "',
            'intent__HassTurnOn", "arguments": {"name": "Kitchen Light"}}\n</tool_call>',
        ),
        ('<tool_call>\n{"name": "intent__HassTurnOn", "arguments": ', '{"name": "Kitchen Light"}}\n</tool_call>'),
        ('<tool_call>\n{"name": "other_tool", "arguments": ', "{}}\n</tool_call>"),
        ("{", '"text": "Which device?"}'),
    ],
)
def test_custom_template_prefill_is_continued(
    postfix: str, expected: str, write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    session = sessions("v12x", write_model(ASSIST_RULES))
    assert session.set_tools("You control a home.", TOOLS) == 0
    text = "turn on the lamp" if postfix != "{" else "turn on"
    assert session.set_template(qwen_system_with_tools(TOOLS), "<|im_start|>user\n", postfix) == 0
    if postfix == "{":
        session.set_tools("no tools", "[]")
        session.set_template("", "", postfix)
    result = session.one(text)
    assert result.text == expected
    # set_function_tools brings the built-in template back: no continuation any more
    assert session.set_tools("You control a home.", TOOLS) == 0
    assert session.one("turn on the lamp").text.startswith("<tool_call>\n")


def qwen_system_with_tools(tools_json: str) -> str:
    """A ChatML system turn with Qwen 2.5's tools block, as an engine that renders its own template writes it."""
    lines = "".join(f"\n{json.dumps(tool)}" for tool in json.loads(tools_json))
    return (
        "<|im_start|>system\nYou control a home.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        f"user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>{lines}"
        "\n</tools>\n<|im_end|>\n"
    )


def test_forced_call_names_only_the_tools_of_the_template_it_runs(
    write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    """A custom template brings its own tools: the list of an earlier set_function_tools is not offered any more.

    (LangChain's standard tests once got a call of a tool from the previous request this way.)
    """
    session = sessions("v130", write_model(ASSIST_RULES))
    assert session.set_tools("You control a home.", TOOLS) == 0
    other = '[{"type": "function", "function": {"name": "magic_function_no_args", "parameters": {}}}]'
    postfix = '<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "'
    assert session.set_template(qwen_system_with_tools(other), "<|im_start|>user\n", postfix) == 0
    result = session.one("turn on the lamp")
    assert "intent__HassTurnOn" not in result.text
    assert result.text == 'magic_function_no_args", "arguments": {}}\n</tool_call>'


def test_forced_call_finds_the_tools_in_a_qwen_system_prompt(
    write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    """The tools come from the real block, not the empty pair in Qwen's own wording (after tools "[]")."""
    session = sessions("v130", write_model(ASSIST_RULES))
    assert session.set_tools("no tools", "[]") == 0
    tool = '{"type": "function", "function": {"name": "intent__HassTurnOn", "parameters": {}}}'
    system = (
        "<|im_start|>system\nYou control a home.\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tool}\n</tools>\n<|im_end|>\n"
    )
    postfix = '<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "'
    assert session.set_template(system, "<|im_start|>user\n", postfix) == 0
    result = session.one("turn on the lamp")
    assert result.text == 'intent__HassTurnOn", "arguments": {"name": "Kitchen Light"}}\n</tool_call>'


def test_empty_custom_template_sends_the_raw_prompt(
    write_model: Callable[..., Path], sessions: Callable[..., Session], capfd: pytest.CaptureFixture[str]
) -> None:
    session = sessions("v130", write_model())
    capfd.readouterr()
    assert session.set_template("", "", "") == 0
    out = capfd.readouterr().out.splitlines()
    assert out[0].startswith("W rkllm: Calling rkllm_set_chat_template will disable the internal automatic")
    assert session.one("Once upon a time").prefill_tokens == ntok("Once upon a time")


# ---------------------------------------------------------------------------------------------------------------
# callbacks, UTF-8, pause, abort


@pytest.mark.parametrize(("split", "profile"), [("waiting", "v12x"), ("raw", "v130")])
def test_split_utf8_characters(
    split: str, profile: Profile, write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    # 4-byte pieces cut the 3-byte characters (§5): 4 + 4 + 1 bytes, then "!".
    session = sessions(profile, write_model(f"utf8_split = {split}\nchars_per_token = 4\ndefault_answer = 日本語!\n"))
    result = session.one("x")
    states = [(e.state, e.text) for e in result.events if e.state != FINISH]
    raw = "日本語".encode()
    if split == "waiting":
        assert states == [(WAITING, None), (WAITING, None), (NORMAL, raw), (NORMAL, b"!")]
    else:
        assert states == [(NORMAL, raw[:4]), (NORMAL, raw[4:8]), (NORMAL, raw[8:]), (NORMAL, b"!")]
    assert [e.token_id for e in result.events[:3]] == [e.token_id for e in result.events[:3] if e.token_id >= 0]
    assert result.finish is not None
    assert result.finish.perf is not None
    assert result.finish.perf[3] == 4  # four generated tokens whatever the delivery


@pytest.mark.parametrize("profile", PROFILES)
def test_pause_keeps_the_kv_and_allows_a_ranged_clear(
    profile: Profile, write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    session = sessions(profile, write_model("default_answer = one two three four five\n"))
    session.on_event = lambda s, e: 1 if e.state == NORMAL and e.text == b" two" else 0
    result = session.one("count")
    assert result.rc == 0
    assert result.text == "one two"
    assert result.finish is None
    prompt = ntok(system_part(DEFAULT_SYSTEM) + user_turn("count"))
    generated = ntok("one two")
    assert session.kv() == [prompt + generated]
    start, end = (ctypes.c_int * 1)(prompt), (ctypes.c_int * 1)(prompt + generated)
    assert session.lib.clear_kv_cache(session.handle, 1, start, end) == 0
    assert session.kv() == [prompt]
    session.on_event = None
    resumed = session.one("go on")  # resumes on the kept KV: only the new turn is prefilled
    assert resumed.prefill_tokens == ntok(user_turn("go on"))
    assert session.lib.clear_kv_cache(session.handle, 1, start, end) == -1  # not paused any more


@pytest.mark.parametrize("profile", PROFILES)
def test_abort_from_another_thread_ends_the_run_without_finish(
    profile: Profile,
    write_model: Callable[..., Path],
    sessions: Callable[..., Session],
    capfd: pytest.CaptureFixture[str],
) -> None:
    answer = " ".join(["word"] * 200)  # 400 tokens at 20 tok/s: 20 s unless aborted
    session = sessions(
        profile, write_model(f"speed = 1\nload_time_ms = 0\ndecode_tokens_per_s = 20\ndefault_answer = {answer}\n")
    )
    seen_running: list[int] = []
    first_token = threading.Event()

    def on_event(s: Session, event: Event) -> int:
        first_token.set()
        return 0

    def abort_after_the_first_token() -> None:
        assert first_token.wait(30)
        seen_running.append(session.lib.is_running(session.handle))
        session.lib.abort(session.handle)

    session.on_event = on_event
    aborter = threading.Thread(target=abort_after_the_first_token)
    aborter.start()
    result = session.one("talk")
    aborter.join()
    assert seen_running == [1]
    assert session.lib.is_running(session.handle) == 0
    assert result.rc == 0
    assert result.finish is None  # ended by the abort, not at the answer's end
    assert 0 < len(result.events) < ntok(answer)
    assert "I rkllm: rkllm_run was aborted" in capfd.readouterr().out.splitlines()
    assert session.kv() == [ntok(system_part(DEFAULT_SYSTEM))]  # keep_history=0: back to the system prompt


def test_abort_delay_is_honoured(write_model: Callable[..., Path], sessions: Callable[..., Session]) -> None:
    session = sessions(
        "v12x",
        write_model(
            "speed = 1\nload_time_ms = 0\ndecode_tokens_per_s = 200\nabort_delay_ms = 300\ndefault_answer = "
            + "a " * 400
            + "\n"
        ),
    )
    aborted_at: list[float] = []

    def abort_on_first(s: Session, event: Event) -> int:
        if not aborted_at:
            aborted_at.append(time.monotonic())
            s.lib.abort(s.handle)
        return 0

    session.on_event = abort_on_first
    result = session.one("go")
    delay = time.monotonic() - aborted_at[0]
    assert result.rc == 0
    assert result.finish is None
    assert delay >= 0.3  # the abort took effect only after its delay (a lower bound: load only lengthens it)


@pytest.mark.parametrize("profile", PROFILES)
def test_second_run_on_a_busy_handle_is_refused(
    profile: Profile,
    write_model: Callable[..., Path],
    sessions: Callable[..., Session],
    capfd: pytest.CaptureFixture[str],
) -> None:
    session = sessions(profile, write_model("default_answer = a b c\n"))
    nested: list[int] = []

    def reenter(s: Session, event: Event) -> int:
        if not nested:
            item = s.make_input("nested")
            nested.append(s.lib.run(s.handle, ctypes.byref(item), ctypes.byref(s.make_infer()), None))
            nested.append(s.lib.is_running(s.handle))
        return 0

    session.on_event = reenter
    result = session.one("outer")
    assert nested == [-1, 1]
    assert result.text == "a b c"
    assert "E rkllm: rkllm_run: another rkllm_run is already running on this handle" in capfd.readouterr().out


@pytest.mark.parametrize("profile", PROFILES)
def test_run_async_returns_at_once_and_delivers_from_its_thread(
    profile: Profile, write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    session = sessions(
        profile, write_model("speed = 1\nload_time_ms = 0\ndecode_tokens_per_s = 100\ndefault_answer = a b c d e\n")
    )
    release = threading.Event()
    finished = threading.Event()
    delivered_on: set[int] = set()

    def on_event(s: Session, event: Event) -> int:
        delivered_on.add(threading.get_ident())
        assert release.wait(30)  # the run cannot end before the test lets it
        if event.state == FINISH:
            finished.set()
        return 0

    session.on_event = on_event
    item = session.make_input("hi")
    session.events = [[]]
    assert (
        session.lib.run_async(session.handle, ctypes.byref(item), ctypes.byref(session.make_infer()), None) == 0
    )
    # Order, not duration: run_async returned while its run was held in a callback, so it did not wait for it.
    assert session.lib.is_running(session.handle) == 1
    assert not finished.is_set()
    release.set()
    assert finished.wait(30)
    assert delivered_on
    assert threading.get_ident() not in delivered_on  # from the run's own thread
    deadline = time.monotonic() + 30  # is_running drops when the run's thread is done (no event tells when)
    while session.lib.is_running(session.handle) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.lib.is_running(session.handle) == 0
    assert RunResult(0, session.events[0]).text == "a b c d e"
    assert session.events[0][-1].state == FINISH


def test_handles_are_independent_and_run_in_parallel(
    write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    # npu_sharing off: this is about the handles' independence; sharing one NPU is test_emulator_npu.py's
    timing = "speed = 1\nload_time_ms = 0\ndecode_tokens_per_s = 25\nnpu_sharing = false\n"
    first = sessions("v130", write_model(timing + "default_answer = a b c d e f g h i j\n", name="one.model"))
    second = sessions("v130", write_model(timing + "default_answer = k l m n o p q r s t\n", name="two.model"))
    first.set_template("", "", "")  # only the first handle changes its template
    # Each run waits in its first callback until the other run is in its own: only side by side can both get there
    # (one after the other, the barrier breaks). A rendezvous, not a stopwatch.
    meet = threading.Barrier(2, timeout=30)
    met: list[str] = []

    def rendezvous(s: Session, event: Event) -> int:
        if len(s.events[0]) == 1:
            meet.wait()
            met.append("met")
        return 0

    first.on_event = second.on_event = rendezvous
    results: dict[str, RunResult] = {}
    threads = [
        threading.Thread(target=lambda s=session, n=name: results.__setitem__(n, s.one("go", keep_history=True)))
        for name, session in (("first", first), ("second", second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert met == ["met", "met"]
    assert (results["first"].text, results["second"].text) == ("a b c d e f g h i j", "k l m n o p q r s t")
    answer_tokens = ntok("a b c d e f g h i j")
    assert answer_tokens == 10
    assert first.kv() == [ntok("go") + answer_tokens]  # the end-of-turn token waits for the next turn (§6)
    assert second.kv() == [ntok(system_part(DEFAULT_SYSTEM) + user_turn("go")) + answer_tokens]


MODELS_DIR = Path(__file__).resolve().parents[2] / "rkllm_native" / "emulator" / "models"
# The engine sends tool results as one compact JSON array of {"name", "content"} (rkllm_engine/prompting.py);
# the contents are Home Assistant's real results (tests/fixtures/assist/tool_results_*.json).
TURN_ON_CONTENT = {
    "speech": {},
    "response_type": "action_done",
    "data": {
        "targets": [],
        "success": [{"name": "Kitchen Light", "type": "entity", "id": "light.kitchen"}],
        "failed": [],
    },
}
ERROR_CONTENT = {"error": "MatchFailedError", "error_text": "no device named Bathroom Fan"}


def tool_results(name: str, content: dict[str, Any]) -> str:
    return json.dumps([{"name": name, "content": content}], separators=(",", ":"))


@pytest.mark.parametrize("prefix", ["", "intent__"])
@pytest.mark.parametrize(
    ("model", "done"),
    [
        ("qwen2.5-1.5b-assist.model", "Done, the kitchen light is on."),
        ("qwen3-1.7b-assist.model", "The kitchen light is now on."),
    ],
)
def test_assist_demo_models_drive_a_tool_round_trip(
    model: str, done: str, prefix: str, sessions: Callable[..., Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_EMULATOR_SPEED", "0")
    session = sessions("v12x", MODELS_DIR / model)
    names = [prefix + name for name in ("HassTurnOn", "HassTurnOff")] + ["homeassistant__GetLiveContext"]
    tools = [{"type": "function", "function": {"name": name, "parameters": {}}} for name in names]
    assert session.set_tools("You control a home.", json.dumps(tools)) == 0
    call = session.one("Turn on the kitchen light", keep_history=True).text
    assert call.startswith('<tool_call>\n{"name": "' + prefix + 'HassTurnOn", "arguments": {"name": "Kitchen Light"')
    assert call.endswith("}\n</tool_call>")
    assert session.one(tool_results(names[0], TURN_ON_CONTENT), "tool", keep_history=True).text == done
    live = session.one("What is the temperature outside?", keep_history=True).text
    assert '"name": "homeassistant__GetLiveContext", "arguments": {}' in live
    assert session.one(tool_results(names[0], ERROR_CONTENT), "tool", keep_history=True).text.startswith("Sorry")


def test_chat_demo_model_answers_without_tools(
    sessions: Callable[..., Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_EMULATOR_SPEED", "0")
    session = sessions("v130", MODELS_DIR / "qwen2-0.5b-chat.model")
    assert session.one("tell me a joke").text == "Why did the NPU cross the road? To prefill the other side."
    assert session.one("anything else").text == "You said: anything else"


# ---------------------------------------------------------------------------------------------------------------
# context window


@pytest.mark.parametrize("profile", PROFILES)
def test_prompt_longer_than_the_context_is_an_error(
    profile: Profile,
    write_model: Callable[..., Path],
    sessions: Callable[..., Session],
    capfd: pytest.CaptureFixture[str],
) -> None:
    session = sessions(profile, write_model(), max_context_len=64)
    text = "word " * 60
    result = session.one(text)
    prompt = ntok(system_part(DEFAULT_SYSTEM) + user_turn(text))
    line = f"the length of prompt is greater than max context (prompt: {prompt} tokens, max context: 64)"
    assert result.rc == -1
    assert [(e.state, e.text) for e in result.events] == [(ERROR, line.encode())]
    assert f"E rkllm: {line}" in capfd.readouterr().out.splitlines()


def test_full_history_is_shifted_from_n_keep(
    write_model: Callable[..., Path], sessions: Callable[..., Session], capfd: pytest.CaptureFixture[str]
) -> None:
    system = ntok(system_part(DEFAULT_SYSTEM))
    turn = ntok(user_turn("tell me more"))
    # three turns + answers fit, a fourth not; each later turn also prefills the previous answer's end of turn
    context = system + 3 * (turn + 2) + turn // 2
    session = sessions("v12x", write_model("default_answer = fine\n"), max_context_len=context)
    sizes = []
    for _ in range(4):
        assert session.one("tell me more", keep_history=True).rc == 0
        sizes.append(session.kv()[0])
    assert sizes[:3] == [system + turn + 1, system + 2 * (turn + 2) - 1, system + 3 * (turn + 2) - 1]
    assert sizes[2] + turn > context  # the fourth turn does not fit: history after the system prompt goes
    assert sizes[3] <= context
    shifts = [line for line in capfd.readouterr().out.splitlines() if "context to be full" in line]
    assert shifts
    assert f"delete the kv cache in [{system}, " in shifts[0]


def test_context_that_cannot_make_room_is_an_error(
    write_model: Callable[..., Path], sessions: Callable[..., Session], capfd: pytest.CaptureFixture[str]
) -> None:
    session = sessions("v130", write_model("default_answer = fine\n"), max_context_len=64, n_keep=40)
    session.one("short", keep_history=True)
    result = session.one("word " * 30, keep_history=True)
    assert result.rc == -1
    assert result.events[-1].state == ERROR
    assert "E rkllm: the context is not enough! history_s: " in capfd.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# per-run options, prompt cache, LoRA, modes


def test_v130_run_options(
    write_model: Callable[..., Path], sessions: Callable[..., Session], capfd: pytest.CaptureFixture[str]
) -> None:
    session = sessions("v130", write_model("default_answer = one two three four five six\n"))
    capped = session.one("x", max_new_tokens=3)
    assert capped.text == "one two three"  # three tokens: "one", " two", " three"
    assert capped.finish is not None
    assert capped.finish.perf is not None
    assert capped.finish.perf[3] == 3
    assert set(session.userdata_seen) == {0x5EED}  # NULL run userdata falls back to result_userdata
    session.one("x", userdata=0xABC)
    assert set(session.userdata_seen) == {0xABC}
    bad = abi.RKLLMSamplingParam(top_k=1, top_p=1.5, temperature=0.8, repeat_penalty=1.1)
    result = session.one("x", sampling_params=ctypes.pointer(bad))
    assert result.rc == -1
    assert result.events == []
    assert "E rkllm: rkllm_run: invalid sampling_params: top_p must be in [0, 1], got 1.5" in capfd.readouterr().out
    good = abi.RKLLMSamplingParam(top_k=1, top_p=0.9, temperature=0.8, repeat_penalty=1.1)
    assert session.one("x", sampling_params=ctypes.pointer(good)).text == "one two three four five six"


def test_v12x_uses_the_init_max_new_tokens(write_model: Callable[..., Path], sessions: Callable[..., Session]) -> None:
    session = sessions("v12x", write_model("default_answer = one two six ten\n"), max_new_tokens=3)
    assert session.one("x").text == "one two six"


@pytest.mark.parametrize("profile", PROFILES)
def test_prompt_cache_round_trip(
    profile: Profile,
    tmp_path: Path,
    write_model: Callable[..., Path],
    sessions: Callable[..., Session],
    capfd: pytest.CaptureFixture[str],
) -> None:
    model = write_model()
    cache = tmp_path / "system.cache"
    first = sessions(profile, model)
    params = abi.RKLLMPromptCacheParam(save_prompt_cache=1, prompt_cache_path=str(cache).encode())
    assert first.one("question one", prompt_cache_params=ctypes.pointer(params)).rc == 0
    assert cache.stat().st_size == 12 + 4 * ntok(system_part(DEFAULT_SYSTEM) + user_turn("question one"))

    second = sessions(profile, model)
    assert second.lib.load_prompt_cache(second.handle, str(tmp_path / "missing").encode()) == -1
    assert second.lib.load_prompt_cache(second.handle, str(cache).encode()) == 0
    shared = ntok(system_part(DEFAULT_SYSTEM) + "<|im_start|>user\nquestion")  # " one" / " two" differ
    total = ntok(system_part(DEFAULT_SYSTEM) + user_turn("question two"))
    assert second.one("question two").prefill_tokens == total - shared
    out = capfd.readouterr().out.splitlines()
    assert f"E rkllm: prompt cache file '{tmp_path / 'missing'}' does not exist" in out
    assert f"I rkllm: kv cache matches {shared} / {total} tokens of prompt" in out


def test_lora_adapters_must_exist_and_be_loaded(
    tmp_path: Path, write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    session = sessions("v12x", write_model())
    adapter_file = tmp_path / "adapter.rkllm"
    missing = abi.RKLLMLoraAdapter(str(tmp_path / "none").encode(), b"style", 1.0)
    assert session.lib.load_lora(session.handle, ctypes.byref(missing)) == -1
    adapter_file.write_bytes(b"lora")
    present = abi.RKLLMLoraAdapter(str(adapter_file).encode(), b"style", 1.0)
    assert session.lib.load_lora(session.handle, ctypes.byref(present)) == 0
    unknown = session.one("x", lora_params=ctypes.pointer(abi.RKLLMLoraParam(b"other")))
    assert (unknown.rc, unknown.events) == (-1, [])
    assert session.one("x", lora_params=ctypes.pointer(abi.RKLLMLoraParam(b"style"))).rc == 0


def test_hidden_layer_mode_returns_the_turn_embeddings(
    write_model: Callable[..., Path], sessions: Callable[..., Session]
) -> None:
    session = sessions("v130", write_model("hidden_size = 64\n"))
    result = session.one("embed me", mode=1)
    assert result.rc == 0
    assert [(e.state, e.hidden) for e in result.events] == [(NORMAL, (64, ntok(user_turn("embed me")))), (FINISH, None)]


def test_bad_inputs_fail_without_callbacks(
    write_model: Callable[..., Path], sessions: Callable[..., Session], capfd: pytest.CaptureFixture[str]
) -> None:
    session = sessions("v12x", write_model())
    assert session.one("x", role="system").events == []
    assert session.one(None).rc == -1
    out = capfd.readouterr().out.splitlines()
    assert 'E rkllm: rkllm_run: unsupported role \'system\' (expected "user" or "tool")' in out
    assert "E rkllm: rkllm_run: prompt_input is NULL" in out


def test_batch_elements_run_side_by_side(write_model: Callable[..., Path], sessions: Callable[..., Session]) -> None:
    session = sessions("v130", write_model('answer user "a" = one two six\ndefault_answer = x\n'), n_batch=2)
    first, second = session.run(["a", "b"], keep_history=True)  # type: ignore[misc]
    assert (first.text, second.text) == ("one two six", "x")
    finished_after_one = [-1] * (ntok("one two six") - 1)
    assert [e.token_id for e in second.events if e.state == NORMAL][1:] == finished_after_one
    assert session.kv() == [
        ntok(system_part(DEFAULT_SYSTEM) + user_turn("a")) + ntok("one two six"),
        ntok(system_part(DEFAULT_SYSTEM) + user_turn("b")) + 1,
    ]


# ---------------------------------------------------------------------------------------------------------------
# timing and resources


def test_timing_follows_the_calibration(write_model: Callable[..., Path], sessions: Callable[..., Session]) -> None:
    # qwen2.5-1.5b-rk3588: 338 tok/s prefill, 16.69 tok/s decode; speed 10 keeps the test short.
    answer = " ".join(["go"] * 20)  # 20 tokens: "go", " go", …
    session = sessions(
        "v12x", write_model(f"calibration = qwen2.5-1.5b-rk3588\nspeed = 10\ndefault_answer = {answer}\n")
    )
    text = "word " * 150
    started = time.monotonic()
    result = session.one(text)
    elapsed = time.monotonic() - started
    assert result.finish is not None
    assert result.finish.perf is not None
    prefill_ms, prefill_tokens, generate_ms, generate_tokens, memory = result.finish.perf
    assert generate_tokens == ntok(answer) == 20
    assert memory == 1689
    prefill_rate, generate_rate = prefill_tokens / (prefill_ms / 1000), generate_tokens / (generate_ms / 1000)
    print(f"\ncalibrated x10: prefill {prefill_rate:.0f} tok/s (3380), decode {generate_rate:.1f} tok/s (166.9)")
    # Never faster than the calibration, and the sleeps really happen: lower bounds on time, which a loaded
    # machine only lengthens. How close to the calibration it runs is measured, not asserted (it is a speed).
    assert prefill_rate <= 338 * 10 * 1.01
    assert generate_rate <= 16.69 * 10 * 1.01
    assert elapsed >= (prefill_tokens / 3380 + generate_tokens / 166.9) * 0.99


def test_memory_is_stable_over_many_runs(write_model: Callable[..., Path], sessions: Callable[..., Session]) -> None:
    session = sessions("v130", write_model(ASSIST_RULES))
    session.set_tools("You control a home.", TOOLS)

    def resident_kb() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

    for _ in range(100):
        session.one("turn on the kitchen light", keep_history=False)
    before = resident_kb()
    for _ in range(500):
        session.one("turn on the kitchen light", keep_history=False)
    assert resident_kb() - before < 512


# ---------------------------------------------------------------------------------------------------------------
# faults (in a child process: they crash or hang on purpose)

FAULT_SCRIPT = """
import sys, threading, time
from pathlib import Path
from tests.native.test_emulator_behaviour import Session
session = Session(sys.argv[1], Path(sys.argv[2]))
assert session.init_rc == 0
if sys.argv[3] == "hang":
    worker = threading.Thread(target=session.one, args=("x",), daemon=True)
    worker.start()
    deadline = time.monotonic() + 20
    while sum(len(events) for events in session.events) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # the two tokens before the hang came (no event to wait on across the C boundary)
    session.lib.abort(session.handle)
    time.sleep(0.5)  # a hang is observed as a run that outlives an abort (load only makes it look longer)
    print("running", session.lib.is_running(session.handle), "alive", worker.is_alive(), flush=True)
    import os
    os._exit(0)
result = session.one("x")
print("rc", result.rc, "states", [e.state for e in result.events], flush=True)
"""


@pytest.mark.parametrize(
    ("fault", "mode", "expected_output", "expected_code"),
    [
        ("crash_after_tokens:2", "run", "", -signal.SIGSEGV),
        ("hang_after_tokens:2", "hang", "running 1 alive True", 0),
        ("error_after_tokens:2", "run", "rc -1 states [0, 0, 3]", 0),
    ],
)
def test_faults(
    fault: str, mode: str, expected_output: str, expected_code: int, write_model: Callable[..., Path]
) -> None:
    model = write_model(f"fault = {fault}\ndefault_answer = a b c d\n")
    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", FAULT_SCRIPT, "v130", str(model), mode],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
    )
    assert child.returncode == expected_code, child.stderr
    lines = [line for line in child.stdout.splitlines() if not line.startswith(("I rkllm", "E rkllm"))]
    assert lines == ([expected_output] if expected_output else [])
    if fault.startswith("error"):
        assert "E rkllm: emulated fault: runtime error after 2 generated tokens" in child.stdout
