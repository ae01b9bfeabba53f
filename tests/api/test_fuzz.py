"""Fuzzing the API as a hostile or careless client would (docs/robustness.md).

No input gets a 5xx, every error is OpenAI-shaped, and the engine keeps serving.

Hypothesis drives both endpoints and the agent model with random JSON, mutated valid requests, random Unicode
(lone surrogates, NULs, right-to-left marks, emoji), raw bytes and deep nesting. It runs in its own thread and sends
each request through the test's event loop, so it shrinks a failing input like any hypothesis test. After every
batch a canary request must be answered within 5 s. Bounded: a fixed number of examples on a fast emulated model.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

from homeassistant.core import HomeAssistant
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .conftest import AGENT_MODEL_ID, MODEL_ID, ApiServer, add_entry, sse_chunks, write_model

EXAMPLES = 1500
BATCH = 20
CANARY_WITHIN_S = 5.0
REQUEST_TIMEOUT_S = 30.0

FUZZ_MODEL = "\n".join(
    [
        "rkllm-emulator-model 1",
        "name = fuzz",
        "max_context_limit = 4096",
        "load_time_ms = 0",
        "prefill_tokens_per_s = 1000000",
        "decode_tokens_per_s = 20000",
        "chars_per_token = 4",
        'answer user "*weather*" = <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\\n</tool_call>",
        "default_answer = You said: {{input}}",
        "",
    ]
)

SPECIAL = ["\x00", "\ud800", "\udfff", "\u202e", "\u200f", "\u200d", "\ufeff", "🙂", "\U0010ffff", "\\", '"', "\n"]
TEXT = st.text(alphabet=st.characters(exclude_categories=()) | st.sampled_from(SPECIAL), max_size=60) | st.just(
    "family 👩\u200d👩\u200d👧 مرحبا"
)
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12
)

MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]), "content": TEXT | JSON},
    optional={"name": TEXT, "tool_call_id": TEXT, "tool_calls": JSON},
)
TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function") | TEXT,
        "function": st.fixed_dictionaries({"name": TEXT}, optional={"parameters": JSON, "description": TEXT}),
    }
)
CHAT = st.fixed_dictionaries(
    {
        "model": st.sampled_from([MODEL_ID, AGENT_MODEL_ID, "no-such-model"]) | TEXT,
        "messages": st.lists(MESSAGE, max_size=4),
    },
    optional={
        "stream": st.booleans() | JSON,
        "max_tokens": st.integers(-5, 64) | JSON,
        "max_completion_tokens": st.integers(-5, 64),
        "temperature": st.floats(allow_nan=False) | JSON,
        "top_p": st.floats(-1, 2) | JSON,
        "stop": TEXT | st.lists(TEXT, max_size=6) | JSON,
        "tools": st.lists(TOOL, max_size=3) | JSON,
        "tool_choice": st.sampled_from(["auto", "none", "required", "get_weather"]) | JSON,
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}]) | JSON,
        "stream_options": JSON,
        "n": st.integers(0, 3),
        "logit_bias": JSON,
        "seed": JSON,
    },
)
COMPLETION = st.fixed_dictionaries(
    {"model": st.sampled_from([MODEL_ID, AGENT_MODEL_ID]) | TEXT, "prompt": TEXT | JSON},
    optional={
        "stream": st.booleans(),
        "max_tokens": st.integers(-5, 64) | JSON,
        "echo": JSON,
        "suffix": JSON,
        "stop": JSON,
    },
)


VALID_TOOL = st.builds(
    lambda name, description: {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": {"type": "object", "properties": {}}},
    },
    st.sampled_from(["get_weather", "get_time", "HassTurnOn"]),
    TEXT,
)
VALID_CHAT = st.fixed_dictionaries(
    {
        "model": st.sampled_from([MODEL_ID, AGENT_MODEL_ID]),
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.just("user"), "content": TEXT | st.just("what is the weather")}),
            min_size=1,
            max_size=3,
        ),
    },
    optional={
        "stream": st.booleans(),
        "max_tokens": st.integers(1, 64),
        "temperature": st.floats(0, 2),
        "stop": st.lists(TEXT, max_size=4),
        "tools": st.lists(VALID_TOOL, max_size=3, unique_by=lambda tool: tool["function"]["name"]),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "response_format": st.just({"type": "json_object"}),
        "stream_options": st.just({"include_usage": True}),
    },
)
VALID_COMPLETION = st.fixed_dictionaries(
    {"model": st.just(MODEL_ID), "prompt": TEXT},
    optional={"stream": st.booleans(), "max_tokens": st.integers(1, 64), "stop": st.lists(TEXT, max_size=4)},
)


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A valid request with one field replaced by random JSON, or removed."""
    body = draw(valid)
    key = draw(st.sampled_from(sorted(body)))
    if draw(st.booleans()):
        del body[key]
    else:
        body[key] = draw(JSON)
    return body


def _deep(depth: int, opener: str) -> bytes:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return (opener * depth + "1" + closer * depth).encode()


def _encode(body: Any, raw_surrogates: bool) -> bytes:
    """JSON text as a client sends it: surrogates escaped, or as (invalid) raw UTF-8 bytes."""
    if raw_surrogates:
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(body).encode()


REQUESTS = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), VALID_CHAT, st.booleans()).map(lambda r: (r[0], _encode(r[1], r[2]))),
    st.tuples(st.just("/v1/completions"), VALID_COMPLETION, st.booleans()).map(lambda r: (r[0], _encode(r[1], r[2]))),
    st.tuples(st.just("/v1/chat/completions"), mutated(VALID_CHAT)).map(lambda r: (r[0], _encode(r[1], False))),
    st.tuples(st.just("/v1/completions"), mutated(VALID_COMPLETION)).map(lambda r: (r[0], _encode(r[1], False))),
    st.tuples(st.just("/v1/chat/completions"), CHAT, st.booleans()).map(lambda r: (r[0], _encode(r[1], r[2]))),
    st.tuples(st.just("/v1/completions"), COMPLETION, st.booleans()).map(lambda r: (r[0], _encode(r[1], r[2]))),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/"]), JSON, st.booleans()).map(
        lambda r: (r[0], _encode(r[1], r[2]))
    ),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), st.binary(max_size=200)),
    st.tuples(
        st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
        st.builds(_deep, st.integers(50, 20_000), st.sampled_from(["[", '{"a":'])),
    ),
)


def assert_error_shape(body: Any) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)


class Fuzzer:
    """Sends hypothesis' requests from its thread through the test's event loop, and checks every answer."""

    def __init__(self, api: ApiServer, loop: asyncio.AbstractEventLoop) -> None:
        self.api = api
        self.loop = loop
        self.sent = 0
        self.statuses: dict[int, int] = {}

    def send(self, path: str, body: bytes) -> None:
        future = asyncio.run_coroutine_threadsafe(self._send(path, body), self.loop)
        future.result(REQUEST_TIMEOUT_S + 5)
        self.sent += 1
        if self.sent % BATCH == 0:
            asyncio.run_coroutine_threadsafe(self.canary(), self.loop).result(CANARY_WITHIN_S + 5)

    async def _send(self, path: str, body: bytes) -> None:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            response = await self.api.client.post(
                path, headers={**self.api.auth(), "Content-Type": "application/json"}, data=body
            )
            self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
            assert response.status < 500, (response.status, await response.text())
            if response.status >= 400:
                assert response.headers["Content-Type"].startswith("application/json")
                assert_error_shape(await response.json())
                return
            assert response.status == 200
            if response.headers["Content-Type"].startswith("text/event-stream"):
                text = await response.text()
                assert text.rstrip().endswith("data: [DONE]"), text
                for chunk in sse_chunks(text):
                    if "error" in chunk:  # an in-band error after the headers must not be a server fault
                        assert_error_shape(chunk)
                        assert chunk["error"]["type"] != "server_error", chunk
            else:
                assert isinstance(await response.json(), dict)

    async def canary(self) -> None:
        """The issue's bound, the only timed check here: the canary is answered within 5 s after every batch."""
        async with asyncio.timeout(CANARY_WITHIN_S):
            response = await self.api.client.post(
                "/v1/chat/completions",
                headers=self.api.auth(),
                json={"model": MODEL_ID, "messages": [{"role": "user", "content": "canary"}]},
            )
            assert response.status == 200
            assert (await response.json())["choices"][0]["message"]["content"] == "You said: canary"


async def test_fuzzed_requests_never_get_a_5xx_and_the_engine_keeps_serving(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, serve_http: Any, kitchen_light: str
) -> None:
    entry = add_entry(hass, emulator_lib, write_model(tmp_path, FUZZ_MODEL))
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    api: ApiServer = await serve_http()
    fuzzer = Fuzzer(api, asyncio.get_running_loop())
    failure: list[BaseException] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(request=REQUESTS)
    def fuzz(request: tuple[str, bytes]) -> None:
        fuzzer.send(*request)

    def run() -> None:
        try:
            fuzz()
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            failure.append(err)

    started = time.monotonic()
    thread = threading.Thread(target=run, name="hypothesis-fuzz")
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join)  # the loop serves the thread's requests
    if failure:
        raise failure[0]
    await fuzzer.canary()
    took = time.monotonic() - started
    statuses = sorted(fuzzer.statuses.items())
    print(f"\nfuzz: {fuzzer.sent} requests in {took:.1f} s, statuses {statuses}")  # for the issue note (run with -s)
    assert fuzzer.sent >= EXAMPLES
