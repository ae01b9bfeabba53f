"""Fixtures for the API tests: a real rkllm entry, HA's HTTP app on a real port, tokens and the `openai` SDK.

The entry runs the real engine, worker and emulator library. HA's HTTP app is served on 127.0.0.1 with HA's
`handler_cancellation=True`, so a client that goes away cancels its handler as in production. Long-lived tokens
exist for an admin and a read-only user; the official `openai` SDK is pointed at the server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from homeassistant.auth.models import TOKEN_TYPE_LONG_LIVED_ACCESS_TOKEN, User
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import CONF_LLM_HASS_API
from homeassistant.core import HomeAssistant
from homeassistant.helpers import llm
from homeassistant.setup import async_setup_component
from openai import AsyncOpenAI
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rkllm.config_flow import default_conversation_options
from custom_components.rkllm.const import CONF_CONTEXT_LENGTH, CONF_WORKER_ENV, DOMAIN, SUBENTRY_CONVERSATION
from custom_components.rkllm.data import RkllmRuntimeData
from rkllm_native.build import emulator_library
from tests.ha_shared import (  # fixtures are registered by the names this conftest holds
    KITCHEN_LIGHT,
    auto_enable_custom_integrations,
    flow_input,
    kitchen_light,
    setup_homeassistant,
    unload_rkllm_entries,
)

__all__ = [
    "KITCHEN_LIGHT",
    "auto_enable_custom_integrations",
    "kitchen_light",
    "setup_homeassistant",
    "unload_rkllm_entries",
]

MODEL_ID = "api-test-model"  # slug of the model file stem below
AGENT_TITLE = "Living Room"
AGENT_MODEL_ID = "rkllm-agent-living-room"
CONTEXT_LENGTH = 4096
# ~3 kB of text: more than the engine's 512-token budget at 4 characters per token, so "long story" runs are cut
# by the budget after about 2.5 s at 200 tokens/s (long enough to disconnect, queue or probe /health meanwhile).
LONG_STORY = " ".join(f"Chapter {number} of the long story goes on and on." for number in range(1, 80))


def _call(tool: str, arguments: str) -> str:
    """A scripted Hermes-style call; `{{tool:X}}` only resolves when the engine offered tool X."""
    return '<tool_call>\\n{"name": "{{tool:' + tool + '}}", "arguments": ' + arguments + "}\\n</tool_call>"


# The emulator's model format: rkllm_native/emulator/MODEL_FORMAT.md. Explicit speeds (no calibration) keep the
# timing of these tests independent of the demo calibrations; RKLLM_EMULATOR_SPEED=1 pins them.
API_MODEL = "\n".join(
    [
        "rkllm-emulator-model 1",
        "name = api-test",
        "max_context_limit = 4096",
        "load_time_ms = 0",
        "prefill_tokens_per_s = 50000",
        "decode_tokens_per_s = 200",
        "chars_per_token = 4",
        "system_prompt = You are a helpful assistant.",
        'answer tool "*sunny*" = It is sunny in Paris.',
        'answer tool "*ot allowed for user*" = I am not allowed to do that for you.',
        'answer tool "*action_done*" = Done, the kitchen light is on.',
        'answer tool "*" = The tool answered.',
        'answer user "*weather in two cities*" = '
        + _call("get_weather", '{"city": "Paris"}')
        + "\\n"
        + _call("get_weather", '{"city": "Berlin"}'),
        'answer user "*weather in Paris*" = Sure.' + _call("get_weather", '{"city": "Paris"}'),
        # A literal tool name: the forced ("required") continuation takes the name from this answer.
        'answer user "*Paris weather report*" = '
        + '<tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>',
        'answer user "*turn on the kitchen light*" = ' + _call("HassTurnOn", '{"name": "Kitchen Light"}'),
        'answer user "*give me json*" = ```json\\n{"color": "blue", "count": 3}\\n```',
        'answer user "*stop words*" = one two STOP three four',
        'answer user "*tell me a long story*" = ' + LONG_STORY,
        'answer user "*Once upon a time*" = there was a tiny NPU that answered every prompt.',
        "default_answer = You said: {{input}}",
        "",
    ]
)


@pytest.fixture(scope="session")
def emulator_lib() -> str:
    """The v1.3.0-flavoured emulator library (per-run max_new_tokens and sampling), built if missing."""
    return str(emulator_library("v130"))


def write_model(directory: Path, text: str = API_MODEL, stem: str = "api-test-model") -> Path:
    """A model file for the emulator; its stem becomes the raw model id."""
    path = directory / f"{stem}.model"
    path.write_text(text, encoding="utf-8")
    return path


def entry_data(library: str, model: Path, **overrides: Any) -> dict[str, Any]:
    """Entry data as the config flow stores it, plus the emulator speed pin."""
    pinned = {CONF_CONTEXT_LENGTH: CONTEXT_LENGTH, CONF_WORKER_ENV: {"RKLLM_EMULATOR_SPEED": "1"}}
    return flow_input(library, model, **{**pinned, **overrides})


def agent_subentry(title: str = AGENT_TITLE) -> dict[str, Any]:
    """A conversation agent with the Assist API, as the subentry flow creates it."""
    data = default_conversation_options()
    data[CONF_LLM_HASS_API] = [llm.LLM_API_ASSIST]
    return {"data": data, "subentry_type": SUBENTRY_CONVERSATION, "title": title, "unique_id": None}


def add_entry(hass: HomeAssistant, library: str, model: Path, **overrides: Any) -> MockConfigEntry:
    """An rkllm entry with one agent, added to hass but not set up."""
    entry = MockConfigEntry(
        domain=DOMAIN,
        title=model.stem,
        data=entry_data(library, model, **overrides),
        subentries_data=[agent_subentry()],
    )
    entry.add_to_hass(hass)
    return entry


@pytest.fixture
async def loaded_entry(hass: HomeAssistant, emulator_lib: str, tmp_path: Path) -> MockConfigEntry:
    """The API test model loaded (engine and worker running); `unload_rkllm_entries` stops it."""
    entry = add_entry(hass, emulator_lib, write_model(tmp_path))
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    return entry


def runtime_of(entry: MockConfigEntry) -> RkllmRuntimeData:
    """The entry's runtime data (engine, model id)."""
    data = entry.runtime_data
    assert isinstance(data, RkllmRuntimeData)
    return data


async def long_lived_token(hass: HomeAssistant, user: User, client_name: str) -> str:
    """A long-lived access token, as a user creates one in their profile."""
    refresh_token = await hass.auth.async_create_refresh_token(
        user, client_name=client_name, token_type=TOKEN_TYPE_LONG_LIVED_ACCESS_TOKEN
    )
    return hass.auth.async_create_access_token(refresh_token)


@pytest.fixture
async def admin_token(hass: HomeAssistant, hass_admin_user: User) -> str:
    """An admin's long-lived token."""
    return await long_lived_token(hass, hass_admin_user, "openai client (admin)")


@pytest.fixture
async def read_only_token(hass: HomeAssistant, hass_read_only_user: User) -> str:
    """A read-only user's long-lived token."""
    return await long_lived_token(hass, hass_read_only_user, "openai client (read-only)")


@dataclass(frozen=True)
class ApiServer:
    """HA's HTTP app on 127.0.0.1: raw HTTP through `client`, SDKs through `base_url`."""

    client: TestClient
    base_url: str
    token: str

    def auth(self, token: str | None = None) -> dict[str, str]:
        """The bearer header an OpenAI client sends."""
        return {"Authorization": f"Bearer {token or self.token}"}


@pytest.fixture
def serve_http(hass: HomeAssistant, aiohttp_client: Any, socket_enabled: None, admin_token: str) -> Any:
    """Start HA's HTTP app on a free 127.0.0.1 port (call after the rkllm entry is set up: it needs `http`)."""

    async def start() -> ApiServer:
        assert await async_setup_component(hass, "http", {})
        # HA's own runner cancels the handler when the client disconnects; the test server must do the same.
        client: TestClient = await aiohttp_client(hass.http.app, server_kwargs={"handler_cancellation": True})
        return ApiServer(client=client, base_url=str(client.make_url("/v1")), token=admin_token)

    return start


@pytest.fixture
async def api(serve_http: Any, loaded_entry: MockConfigEntry) -> ApiServer:
    """The API with the test model loaded."""
    server: ApiServer = await serve_http()
    return server


@pytest.fixture
async def openai_client(api: ApiServer) -> AsyncGenerator[AsyncOpenAI]:
    """The official async SDK with the admin's long-lived token as its api_key (no retries: tests see each answer)."""
    client = AsyncOpenAI(base_url=api.base_url, api_key=api.token, max_retries=0, timeout=60)
    yield client
    await client.close()


def sse_lines(body: str) -> list[str]:
    """The non-empty lines of an SSE body."""
    return [line for line in body.split("\n") if line]


def sse_chunks(body: str) -> list[dict[str, Any]]:
    """The JSON chunks of an SSE body: its `data: {…}` lines, without ping comments and `data: [DONE]`."""
    return [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: {")]


def streamed_content(chunks: list[dict[str, Any]]) -> str:
    """The assistant text of parsed chat chunks, joined as a client does (the usage chunk has no choices)."""
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


@pytest.fixture
def fast_pings(monkeypatch: pytest.MonkeyPatch) -> float:
    """Keep-alive comments every 0.2 s instead of every 10 s."""
    from custom_components.rkllm import http as api_http

    monkeypatch.setattr(api_http, "SSE_PING_INTERVAL_S", 0.2)
    return 0.2
