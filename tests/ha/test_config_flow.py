"""Config flow and subentry flows, on the real emulator library and worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from homeassistant.config_entries import SOURCE_REAUTH, SOURCE_RECONFIGURE, SOURCE_USER, ConfigEntryState
from homeassistant.const import CONF_LLM_HASS_API, CONF_NAME
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import llm
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rkllm import config_flow
from custom_components.rkllm.compat import HAS_AI_TASK
from custom_components.rkllm.config_flow import (
    RkllmConfigFlow,
    detect_platform,
    development_library,
    model_file_problem,
)
from custom_components.rkllm.const import (
    CONF_ABI_PROFILE,
    CONF_CONTEXT_LENGTH,
    CONF_ENABLE_THINKING,
    CONF_LIBRARY_PATH,
    CONF_MAX_HISTORY,
    CONF_MAX_NEW_TOKENS,
    CONF_MAX_TOOL_ITERATIONS,
    CONF_MODEL_PATH,
    CONF_PLATFORM,
    CONF_PROMPT,
    CONF_REPEAT_PENALTY,
    CONF_TEMPERATURE,
    CONF_TOP_K,
    CONF_TOP_P,
    CONF_WORKER,
    CONF_WORKER_HOST,
    CONF_WORKER_PORT,
    CONF_WORKER_SECRET,
    DOMAIN,
    SUBENTRY_AI_TASK,
    SUBENTRY_CONVERSATION,
)
from custom_components.rkllm.entry_settings import MIN_RKLLM_MODEL_BYTES
from rkllm_engine.client import InitSpec, WorkerClient, WorkerLocation
from rkllm_native import protocol
from tests.ha.conftest import ASSIST_MODEL, FAST_ENV, RemoteWorker, entry_data, fake_library, free_tcp_port
from tests.ha_shared import flow_input


async def start_files_step(hass: HomeAssistant) -> Any:
    """Open the flow and choose "I have the files" in its menu (the other choice downloads them)."""
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.MENU
    assert result["menu_options"] == ["files", "download"]
    return await hass.config_entries.flow.async_configure(result["flow_id"], {"next_step_id": "files"})


@pytest.fixture(autouse=True)
def fast_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries created by the flow have no dev env; the worker inherits this one instead."""
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)


async def test_user_step_suggests_emulator_and_detected_values(hass: HomeAssistant) -> None:
    """On a machine without librkllmrt the form proposes the built emulator library."""
    result = await start_files_step(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "files"
    suggested = {str(key): key.description["suggested_value"] for key in result["data_schema"].schema}
    assert suggested[CONF_LIBRARY_PATH] == str(development_library())
    assert suggested[CONF_PLATFORM] == (detect_platform() or "rk3588")
    assert suggested[CONF_ABI_PROFILE] == "auto"
    assert suggested[CONF_WORKER] == "local"


async def test_local_entry_is_created_with_an_assist_agent(
    hass: HomeAssistant, emulator_lib: str, assist_model: Path
) -> None:
    """A valid local setup creates the entry and its first conversation agent, preset to the Assist API."""
    result = await start_files_step(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], flow_input(emulator_lib, assist_model))
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == assist_model.stem
    assert result["data"][CONF_MODEL_PATH] == str(assist_model)
    assert CONF_WORKER_SECRET not in result["data"]
    entry = result["result"]
    (subentry,) = entry.subentries.values()
    assert subentry.subentry_type == SUBENTRY_CONVERSATION
    assert subentry.data[CONF_LLM_HASS_API] == [llm.LLM_API_ASSIST]
    assert subentry.data[CONF_PROMPT] == llm.DEFAULT_INSTRUCTIONS_PROMPT
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data.runtime_version == "1.2.3"


@pytest.mark.parametrize(
    ("case", "field", "error"),
    [
        ("library_missing", CONF_LIBRARY_PATH, "library_not_found"),
        ("library_not_elf", CONF_LIBRARY_PATH, "not_rkllm_library"),
        ("library_other_so", CONF_LIBRARY_PATH, "not_rkllm_library"),
        ("library_other_arch", CONF_LIBRARY_PATH, "library_wrong_architecture"),
        ("runtime_too_old", CONF_LIBRARY_PATH, "unsupported_runtime"),
        ("runtime_too_new", CONF_LIBRARY_PATH, "unknown_runtime_version"),
        ("runtime_unmarked", CONF_LIBRARY_PATH, "version_undetectable"),
        ("profile_mismatch", CONF_ABI_PROFILE, "profile_mismatch"),
        ("model_missing", CONF_MODEL_PATH, "model_not_found"),
        ("model_too_small", CONF_MODEL_PATH, "not_rkllm_model"),
        ("model_wrong_kind", CONF_MODEL_PATH, "not_rkllm_model"),
    ],
)
async def test_each_validation_error_is_shown_on_its_field(
    hass: HomeAssistant, emulator_lib: str, assist_model: Path, tmp_path: Path, case: str, field: str, error: str
) -> None:
    """Every problem is a translated error on the field at fault; fixing it then creates the entry."""
    library, model, profile = emulator_lib, str(assist_model), "auto"
    if case == "library_missing":
        library = str(tmp_path / "missing" / "librkllmrt.so")
    elif case == "library_not_elf":
        library = fake_library(tmp_path / "readme.so", b"just text", elf=False)
    elif case == "library_other_so":
        library = fake_library(tmp_path / "libother.so", b"other_symbol")
    elif case == "library_other_arch":
        library = fake_library(tmp_path / "librkllmrt-arm.so", b"rkllm_init", machine=40)
    elif case == "runtime_too_old":
        library = fake_library(tmp_path / "librkllmrt-old.so", b"RKLLM SDK (version: 1.1.4 | target: Linux)")
    elif case == "runtime_too_new":
        library = fake_library(tmp_path / "librkllmrt-new.so", b"RKLLM SDK (version: 1.4.0 | target: Linux)")
    elif case == "runtime_unmarked":
        library = fake_library(tmp_path / "librkllmrt-x.so", b"rkllm_init\0rkllm_set_function_tools")
    elif case == "profile_mismatch":
        profile = "v130"
    elif case == "model_missing":
        model = str(tmp_path / "missing.rkllm")
    elif case == "model_too_small":
        (tmp_path / "tiny.rkllm").write_bytes(b"\0" * 1024)
        model = str(tmp_path / "tiny.rkllm")
    elif case == "model_wrong_kind":
        (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\0" * 1024)
        model = str(tmp_path / "model.gguf")

    result = await start_files_step(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], flow_input(library, model, **{CONF_ABI_PROFILE: profile})
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {field: error}
    assert result["description_placeholders"]["error_detail"]

    result = await hass.config_entries.flow.async_configure(result["flow_id"], flow_input(emulator_lib, assist_model))
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY


def test_model_check_accepts_a_real_sized_rkllm_file(tmp_path: Path) -> None:
    """The real-model check is extension + size (there is no documented magic to read without the runtime)."""
    model = tmp_path / "Qwen2.5-1.5B-rk3588-w8a8.rkllm"
    with model.open("wb") as stream:
        stream.truncate(MIN_RKLLM_MODEL_BYTES)
    assert model_file_problem(str(model)) is None
    assert model_file_problem(str(tmp_path / "nothing.rkllm")) == ("model_not_found", "no such file")


def test_platform_is_read_from_the_device_tree(tmp_path: Path) -> None:
    compatible = tmp_path / "compatible"
    compatible.write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    assert detect_platform(str(compatible)) == "rk3588"
    compatible.write_bytes(b"rockchip,rv1126b-evb\0rockchip,rv1126b\0")
    assert detect_platform(str(compatible)) == "rv1126b"
    compatible.write_bytes(b"raspberrypi,4-model-b\0brcm,bcm2711\0")
    assert detect_platform(str(compatible)) is None
    assert detect_platform(str(tmp_path / "absent")) is None


async def test_same_model_twice_is_aborted(
    hass: HomeAssistant, mock_config_entry: MockConfigEntry, emulator_lib: str, assist_model: Path
) -> None:
    result = await start_files_step(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], flow_input(emulator_lib, assist_model))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"


async def test_reconfigure_changes_the_runtime_and_reloads(
    hass: HomeAssistant, loaded_entry: MockConfigEntry, emulator_lib_v130: str, assist_model: Path, tmp_path: Path
) -> None:
    """Reconfigure validates like the user step, then restarts the engine with the new settings."""
    old_engine = loaded_entry.runtime_data.engine
    result = await loaded_entry.start_reconfigure_flow(hass)
    assert result["step_id"] == "reconfigure"
    suggested = {str(key): key.description["suggested_value"] for key in result["data_schema"].schema}
    assert suggested[CONF_MODEL_PATH] == str(assist_model)

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], flow_input(str(tmp_path / "gone.so"), assist_model)
    )
    assert result["errors"] == {CONF_LIBRARY_PATH: "library_not_found"}

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], flow_input(emulator_lib_v130, assist_model, **{CONF_CONTEXT_LENGTH: 2048})
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert loaded_entry.state is ConfigEntryState.LOADED
    assert loaded_entry.data[CONF_CONTEXT_LENGTH] == 2048
    assert loaded_entry.runtime_data.engine is not old_engine
    assert loaded_entry.runtime_data.abi_profile == "v130"
    assert loaded_entry.runtime_data.engine.metrics.context_length == 2048


async def test_reconfigure_to_another_configured_model_is_aborted(
    hass: HomeAssistant, loaded_entry: MockConfigEntry, emulator_lib: str, tmp_path: Path, assist_model: Path
) -> None:
    other_model = tmp_path / "other.model"
    other_model.write_bytes(assist_model.read_bytes())  # noqa: ASYNC240 - a tiny test file
    MockConfigEntry(domain=DOMAIN, data={CONF_MODEL_PATH: str(other_model)}).add_to_hass(hass)
    result = await loaded_entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], flow_input(emulator_lib, other_model))
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"


async def _start_remote_flow(hass: HomeAssistant, library: str, model: Path | str) -> dict[str, Any]:
    result = await start_files_step(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], flow_input(library, model, **{CONF_WORKER: "remote"})
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "remote"
    return dict(result)


async def test_remote_worker_entry(
    hass: HomeAssistant, remote_worker: RemoteWorker, emulator_lib: str, assist_model: Path
) -> None:
    """A remote worker that accepts the secret and loads the model gives an entry that sets up over TCP."""
    result = await _start_remote_flow(hass, emulator_lib, assist_model)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {
            CONF_WORKER_HOST: remote_worker.host,
            CONF_WORKER_PORT: remote_worker.port,
            CONF_WORKER_SECRET: remote_worker.secret,
        },
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_WORKER_HOST] == remote_worker.host
    assert result["data"][CONF_WORKER_PORT] == remote_worker.port
    entry = result["result"]
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data.engine.metrics.runtime_version == "1.2.3"


@pytest.mark.parametrize(
    ("case", "errors"),
    [
        ("wrong_secret", {CONF_WORKER_SECRET: "invalid_auth"}),
        ("unreachable", {"base": "cannot_connect"}),
        ("busy", {"base": "worker_busy"}),
        ("other_protocol_version", {"base": "worker_version_mismatch"}),
    ],
)
async def test_remote_probe_failure_is_shown_by_its_reason(
    hass: HomeAssistant,
    remote_worker: RemoteWorker,
    emulator_lib: str,
    assist_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    errors: dict[str, str],
) -> None:
    """The probe's typed reason picks the form error; the form stays open with the one-line detail."""
    host, port, secret = remote_worker.host, remote_worker.port, remote_worker.secret
    holder = WorkerClient(WorkerLocation(host=host, port=port, secret=secret))
    if case == "wrong_secret":
        secret = "wrong"
    elif case == "unreachable":
        port = free_tcp_port()
    elif case == "busy":  # another client holds the worker's only session
        await holder.start(InitSpec(emulator_lib, str(assist_model), None, {}))
    elif case == "other_protocol_version":
        monkeypatch.setattr(protocol, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)  # this side only
    try:
        result = await _start_remote_flow(hass, emulator_lib, assist_model)
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_WORKER_HOST: host, CONF_WORKER_PORT: port, CONF_WORKER_SECRET: secret}
        )
    finally:
        await holder.stop()
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "remote"
    assert result["errors"] == errors
    assert result["description_placeholders"]["error_detail"]


async def test_remote_probe_loads_nothing_and_setup_reports_a_model_missing_there(
    hass: HomeAssistant, remote_worker: RemoteWorker, emulator_lib: str, tmp_path: Path
) -> None:
    """The probe only proves host, port and secret; the model path on the worker is checked by the setup."""
    result = await _start_remote_flow(hass, emulator_lib, tmp_path / "not-on-the-worker.model")
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {
            CONF_WORKER_HOST: remote_worker.host,
            CONF_WORKER_PORT: remote_worker.port,
            CONF_WORKER_SECRET: remote_worker.secret,
        },
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    entry = result["result"]
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.error_reason_translation_key == "setup_model_invalid"


def _options(**overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        CONF_TEMPERATURE: 0.2,
        CONF_TOP_P: 0.8,
        CONF_TOP_K: 20,
        CONF_REPEAT_PENALTY: 1.05,
        CONF_MAX_NEW_TOKENS: 256,
        CONF_ENABLE_THINKING: False,
    }
    options.update(overrides)
    return options


async def test_add_conversation_agent(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    """A new agent gets its own entity; adding it does not restart the model."""
    engine = loaded_entry.runtime_data.engine
    result = await hass.config_entries.subentries.async_init(
        (loaded_entry.entry_id, SUBENTRY_CONVERSATION), context={"source": SOURCE_USER}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "set_options"
    api_selector = next(key for key in result["data_schema"].schema if str(key) == CONF_LLM_HASS_API)
    options = result["data_schema"].schema[api_selector].config["options"]
    assert {option["value"] for option in options} == {api.id for api in llm.async_get_apis(hass)}

    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"],
        _options(
            **{
                CONF_NAME: "Kitchen helper",
                CONF_PROMPT: "Answer in one sentence.",
                CONF_LLM_HASS_API: [],
                CONF_MAX_HISTORY: 2,
                CONF_MAX_TOOL_ITERATIONS: 3,
            }
        ),
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Kitchen helper"
    assert CONF_LLM_HASS_API not in result["data"]
    assert result["data"][CONF_TOP_K] == 20
    assert hass.states.get("conversation.kitchen_helper") is not None
    assert loaded_entry.runtime_data.engine is engine


async def test_reconfigure_conversation_agent(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    (subentry,) = loaded_entry.subentries.values()
    result = await hass.config_entries.subentries.async_init(
        (loaded_entry.entry_id, SUBENTRY_CONVERSATION),
        context={"source": SOURCE_RECONFIGURE, "subentry_id": subentry.subentry_id},
    )
    assert result["step_id"] == "set_options"
    assert CONF_NAME not in {str(key) for key in result["data_schema"].schema}
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"],
        _options(**{CONF_PROMPT: "Be brief.", CONF_LLM_HASS_API: [], CONF_MAX_HISTORY: 1, CONF_MAX_TOOL_ITERATIONS: 2}),
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    updated = loaded_entry.subentries[subentry.subentry_id]
    assert updated.data[CONF_PROMPT] == "Be brief."
    assert CONF_LLM_HASS_API not in updated.data
    # Without an LLM API the agent can no longer control the home.
    state = hass.states.get("conversation.assist_on_npu")
    assert state is not None
    assert not state.attributes.get("supported_features")


async def test_subentry_flow_needs_a_loaded_runtime(hass: HomeAssistant, mock_config_entry: MockConfigEntry) -> None:
    result = await hass.config_entries.subentries.async_init(
        (mock_config_entry.entry_id, SUBENTRY_CONVERSATION), context={"source": SOURCE_USER}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "entry_not_loaded"


async def test_ai_task_subentry_only_where_home_assistant_has_ai_tasks(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    types = RkllmConfigFlow.async_get_supported_subentry_types(loaded_entry)
    assert (SUBENTRY_AI_TASK in types) is HAS_AI_TASK
    if not HAS_AI_TASK:
        return
    result = await hass.config_entries.subentries.async_init(
        (loaded_entry.entry_id, SUBENTRY_AI_TASK), context={"source": SOURCE_USER}
    )
    fields = {str(key) for key in result["data_schema"].schema}
    assert CONF_PROMPT not in fields
    assert CONF_LLM_HASS_API not in fields
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"], _options(**{CONF_NAME: "Data generator"})
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert hass.states.get("ai_task.data_generator") is not None


def _remote_entry_data(library: str, model: Path, host: str, port: int, secret: str) -> dict[str, Any]:
    return entry_data(
        library,
        model,
        **{CONF_WORKER: "remote", CONF_WORKER_HOST: host, CONF_WORKER_PORT: port, CONF_WORKER_SECRET: secret},
    )


async def test_reauth_asks_for_the_new_secret_and_loads_the_entry(
    hass: HomeAssistant, remote_worker: RemoteWorker, emulator_lib: str, assist_model: Path
) -> None:
    """The worker's secret changed: setup starts reauth, a wrong answer stays on the form, the right one loads."""
    data = _remote_entry_data(emulator_lib, assist_model, remote_worker.host, remote_worker.port, "old secret")
    entry = MockConfigEntry(domain=DOMAIN, title=assist_model.stem, data=data)
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_ERROR
    (flow,) = entry.async_get_active_flows(hass, {SOURCE_REAUTH})

    result = await hass.config_entries.flow.async_configure(flow["flow_id"])
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reauth_confirm"
    assert [str(key) for key in result["data_schema"].schema] == [CONF_WORKER_SECRET, "worker_tls_fingerprint"]
    assert result["description_placeholders"]["worker"] == f"{remote_worker.host}:{remote_worker.port}"
    assert result["description_placeholders"]["name"] == assist_model.stem

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {CONF_WORKER_SECRET: "still wrong"})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_WORKER_SECRET: "invalid_auth"}
    assert "refused the secret" in result["description_placeholders"]["error_detail"]
    assert entry.data[CONF_WORKER_SECRET] == "old secret"

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_WORKER_SECRET: remote_worker.secret}
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    assert entry.data == {**data, CONF_WORKER_SECRET: remote_worker.secret}
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data.engine.metrics.runtime_version == "1.2.3"


async def test_reauth_against_a_worker_that_is_down_keeps_the_old_secret(
    hass: HomeAssistant, emulator_lib: str, assist_model: Path, socket_enabled: None
) -> None:
    """A secret that cannot be checked is not saved: the form names the unreachable worker instead."""
    data = _remote_entry_data(emulator_lib, assist_model, "127.0.0.1", free_tcp_port(), "old secret")
    entry = MockConfigEntry(domain=DOMAIN, data=data)
    entry.add_to_hass(hass)
    result = await entry.start_reauth_flow(hass)
    assert result["step_id"] == "reauth_confirm"
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {CONF_WORKER_SECRET: "new secret"})
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}
    assert "refused the connection" in result["description_placeholders"]["error_detail"]
    assert entry.data[CONF_WORKER_SECRET] == "old secret"


async def test_user_step_suggests_an_installed_runtime_and_model(
    hass: HomeAssistant, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a board with librkllmrt installed, the form proposes it and the first .rkllm model in the model folders."""
    library = tmp_path / "lib" / "librkllmrt.so"
    library.parent.mkdir()
    library.write_bytes(b"")
    models = tmp_path / "models"
    models.mkdir()
    for name in ("qwen2.5-3b.rkllm", "qwen2.5-1.5b.rkllm", "notes.txt"):
        (models / name).write_bytes(b"")
    monkeypatch.setattr(config_flow, "LIBRARY_CANDIDATES", (str(tmp_path / "absent.so"), str(library)))
    monkeypatch.setattr(config_flow, "MODEL_DIRECTORIES", (str(tmp_path / "no-such-folder"), str(models)))
    result = await start_files_step(hass)
    suggested = {str(key): key.description["suggested_value"] for key in result["data_schema"].schema}
    assert suggested[CONF_LIBRARY_PATH] == str(library)
    assert suggested[CONF_MODEL_PATH] == str(models / "qwen2.5-1.5b.rkllm")

    # No model in any folder (only other files): the field stays empty rather than naming a non-model.
    (models / "qwen2.5-3b.rkllm").unlink()
    (models / "qwen2.5-1.5b.rkllm").unlink()
    result = await start_files_step(hass)
    suggested = {str(key): key.description["suggested_value"] for key in result["data_schema"].schema}
    assert suggested[CONF_LIBRARY_PATH] == str(library)
    assert suggested[CONF_MODEL_PATH] == ""


def test_model_check_reads_past_comments_and_names_an_unreadable_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Comment and blank lines before the emulator header are allowed; a file that cannot be read says why."""
    model = tmp_path / "commented.model"
    model.write_text("# my test model\n\n" + ASSIST_MODEL, encoding="utf-8")
    assert model_file_problem(str(model)) is None
    model.write_text("# my test model\nname = no header\n" + ASSIST_MODEL, encoding="utf-8")
    problem = model_file_problem(str(model))
    assert problem is not None
    assert problem[0] == "not_rkllm_model"

    real_open = Path.open

    def open_denied(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path == model:  # tests run as root, where chmod 000 does not stop a read
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_denied)
    assert model_file_problem(str(model)) == ("model_not_found", "not readable: Permission denied")


async def test_reconfigure_of_a_loaded_remote_entry_keeps_its_worker(
    hass: HomeAssistant, remote_worker: RemoteWorker, emulator_lib: str, assist_model: Path
) -> None:
    """The loaded entry holds the worker's only session; saving the same worker must not fail as "busy"."""
    data = _remote_entry_data(emulator_lib, assist_model, remote_worker.host, remote_worker.port, remote_worker.secret)
    entry = MockConfigEntry(domain=DOMAIN, title=assist_model.stem, data=data)
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()

    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], flow_input(emulator_lib, assist_model, **{CONF_WORKER: "remote", CONF_CONTEXT_LENGTH: 2048})
    )
    assert result["step_id"] == "remote"
    schema = result["data_schema"].schema
    suggested = {str(key): key.description["suggested_value"] for key in schema if key.description}
    assert suggested == {
        CONF_WORKER_HOST: remote_worker.host,
        CONF_WORKER_PORT: remote_worker.port,
        CONF_WORKER_SECRET: remote_worker.secret,
    }
    result = await hass.config_entries.flow.async_configure(result["flow_id"], suggested)
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data.engine.metrics.context_length == 2048


async def test_reconfigure_fixes_a_failed_entry_and_loads_it(
    hass: HomeAssistant, emulator_lib: str, assist_model: Path, tmp_path: Path
) -> None:
    """An entry that failed setup has no update listener; reconfigure reloads it itself."""
    entry = MockConfigEntry(domain=DOMAIN, data=entry_data(str(tmp_path / "absent.so"), assist_model))
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_ERROR

    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(result["flow_id"], flow_input(emulator_lib, assist_model))
    await hass.async_block_till_done()
    assert result["reason"] == "reconfigure_successful"
    assert entry.data[CONF_LIBRARY_PATH] == emulator_lib
    assert entry.state is ConfigEntryState.LOADED


async def test_agent_with_the_assist_api_keeps_it_as_a_list(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    """An agent saved with Assist selected can control the home."""
    result = await hass.config_entries.subentries.async_init(
        (loaded_entry.entry_id, SUBENTRY_CONVERSATION), context={"source": SOURCE_USER}
    )
    result = await hass.config_entries.subentries.async_configure(
        result["flow_id"],
        _options(
            **{
                CONF_NAME: "House keeper",
                CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
                CONF_MAX_HISTORY: 2,
                CONF_MAX_TOOL_ITERATIONS: 3,
            }
        ),
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_LLM_HASS_API] == [llm.LLM_API_ASSIST]
    state = hass.states.get("conversation.house_keeper")
    assert state is not None
    assert state.attributes.get("supported_features")


def test_without_the_development_hook_the_emulator_is_neither_suggested_nor_accepted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A real installation (no RKLLM_DEVELOP) knows nothing of the emulator: its model files are not models."""
    monkeypatch.delenv("RKLLM_DEVELOP", raising=False)
    monkeypatch.setattr(config_flow, "LIBRARY_CANDIDATES", (str(tmp_path / "absent.so"),))
    assert development_library() is None
    assert config_flow.suggest_library_path() == str(tmp_path / "absent.so")
    model = tmp_path / "assist.model"
    model.write_text(ASSIST_MODEL)
    not_a_model = ("not_rkllm_model", "not a .rkllm file (convert the model with rkllm-toolkit)")
    assert model_file_problem(str(model)) == not_a_model
    monkeypatch.setenv("RKLLM_DEVELOP", "1")
    assert model_file_problem(str(model)) is None
