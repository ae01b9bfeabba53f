"""Setup, unload and reload of an entry: a real worker process per entry, nothing left behind."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import MappingProxyType

import pytest
from homeassistant.config_entries import SOURCE_REAUTH, ConfigEntryState, ConfigSubentry
from homeassistant.const import EVENT_HOMEASSISTANT_STOP
from homeassistant.core import HomeAssistant
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

import custom_components.rkllm as rkllm_init
from custom_components.rkllm.const import (
    CONF_ABI_PROFILE,
    CONF_CONTEXT_LENGTH,
    CONF_WORKER,
    CONF_WORKER_HOST,
    CONF_WORKER_PORT,
    CONF_WORKER_SECRET,
    DOMAIN,
)
from rkllm_engine.types import EngineState
from tests.ha.conftest import (
    ASSIST_MODEL,
    RemoteWorker,
    child_pids,
    conversation_subentry,
    entry_data,
    fake_library,
    free_tcp_port,
)
from tests.ha_shared import device_of


async def _setup(hass: HomeAssistant, entry: MockConfigEntry) -> None:
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()


async def test_setup_starts_the_engine_and_unload_stops_it(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    runtime = loaded_entry.runtime_data
    assert runtime.engine.metrics.state is EngineState.IDLE
    assert runtime.model_name == "qwen2.5-1.5b-ha-test"
    assert runtime.model_id == "qwen2-5-1-5b-ha-test"
    assert runtime.runtime_version == "1.2.3"
    assert runtime.abi_profile == "v12x"
    assert len(child_pids()) == 1

    (subentry,) = loaded_entry.subentries.values()
    device = device_of(hass, subentry.subentry_id, loaded_entry.entry_id)
    assert device is not None
    assert device.name == "Assist on NPU"
    assert device.entry_type is dr.DeviceEntryType.SERVICE
    state = hass.states.get("conversation.assist_on_npu")
    assert state is not None
    assert state.attributes["supported_features"] == 1  # CONTROL: the Assist API is selected

    assert await hass.config_entries.async_unload(loaded_entry.entry_id)
    await hass.async_block_till_done()
    assert loaded_entry.state is ConfigEntryState.NOT_LOADED
    assert runtime.engine.metrics.state is EngineState.STOPPED
    assert child_pids() == set()


async def test_twenty_reloads_leave_no_process_thread_or_task(
    hass: HomeAssistant, loaded_entry: MockConfigEntry
) -> None:
    """Each reload replaces the worker; after 20 cycles and an unload nothing of ours is left running."""
    first_worker = child_pids()
    assert len(first_worker) == 1
    threads_before = len(threading.enumerate())
    tasks_before = len(asyncio.all_tasks())
    seen_workers = set(first_worker)
    for _ in range(20):
        assert await hass.config_entries.async_reload(loaded_entry.entry_id)
        await hass.async_block_till_done()
        assert loaded_entry.state is ConfigEntryState.LOADED
        workers = child_pids()
        assert len(workers) == 1, f"expected exactly one worker, found {workers}"
        seen_workers |= workers
    assert len(seen_workers) == 21  # a fresh process each time
    # asyncio's child watcher threads ("waitpid-N") end with their child; allow one that is still finishing.
    assert len(threading.enumerate()) <= threads_before + 1
    assert len(asyncio.all_tasks()) <= tasks_before

    assert await hass.config_entries.async_unload(loaded_entry.entry_id)
    await hass.async_block_till_done()
    assert child_pids() == set()
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("waitpid-") and thread.is_alive()]
    assert not [task for task in asyncio.all_tasks() if "rkllm" in task.get_name()]


async def test_adding_an_agent_keeps_the_model_loaded(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    """Agent changes reload the platforms only; a data change restarts the engine."""
    engine = loaded_entry.runtime_data.engine
    worker = child_pids()
    second = conversation_subentry("Second agent")
    hass.config_entries.async_add_subentry(
        loaded_entry,
        ConfigSubentry(
            data=MappingProxyType(second["data"]),
            subentry_type=second["subentry_type"],
            title=second["title"],
            unique_id=None,
        ),
    )
    await hass.async_block_till_done()
    assert hass.states.get("conversation.second_agent") is not None
    assert loaded_entry.runtime_data.engine is engine
    assert child_pids() == worker

    hass.config_entries.async_update_entry(loaded_entry, data={**loaded_entry.data, CONF_CONTEXT_LENGTH: 2048})
    await hass.async_block_till_done()
    assert loaded_entry.state is ConfigEntryState.LOADED
    assert loaded_entry.runtime_data.engine is not engine
    assert loaded_entry.runtime_data.engine.metrics.context_length == 2048
    assert child_pids() != worker


async def test_home_assistant_stop_stops_the_worker(hass: HomeAssistant, loaded_entry: MockConfigEntry) -> None:
    """HA does not unload entries when it stops; the worker must still go."""
    assert len(child_pids()) == 1
    hass.bus.async_fire(EVENT_HOMEASSISTANT_STOP)
    await hass.async_block_till_done()
    assert child_pids() == set()
    assert loaded_entry.runtime_data.engine.metrics.state is EngineState.STOPPED


def _issue(hass: HomeAssistant, key: str, entry: MockConfigEntry) -> ir.IssueEntry | None:
    return ir.async_get(hass).async_get_issue(DOMAIN, f"{key}_{entry.entry_id}")


SETUP_ISSUES = ("library_missing", "library_unsupported", "model_platform_mismatch", "model_toolkit_newer")


@pytest.mark.parametrize("worker", ["local", "remote"])
@pytest.mark.parametrize(
    ("case", "translation_key", "issue"),
    [
        ("library_missing", "setup_library_missing", "library_missing"),
        ("library_too_old", "setup_library_unsupported", "library_unsupported"),
        ("profile_mismatch", "setup_library_unsupported", "library_unsupported"),
        ("model_for_another_soc", "setup_model_platform_mismatch", "model_platform_mismatch"),
        ("model_missing", "setup_model_invalid", None),
        ("model_from_newer_toolkit", "setup_model_toolkit_newer", "model_toolkit_newer"),
        ("context_over_model_limit", "setup_model_invalid", None),
    ],
)
async def test_each_permanent_failure_is_a_setup_error_with_its_repair(
    hass: HomeAssistant,
    *,
    request: pytest.FixtureRequest,
    emulator_lib: str,
    assist_model: Path,
    tmp_path: Path,
    worker: str,
    case: str,
    translation_key: str,
    issue: str | None,
) -> None:
    """Retrying cannot fix these, locally or on a remote worker: the worker's typed reason picks error and repair."""
    library, model, overrides = emulator_lib, assist_model, dict[str, object]()
    if case == "library_missing":
        library = str(tmp_path / "librkllmrt.so")
    elif case == "library_too_old":
        library = fake_library(tmp_path / "librkllmrt.so", b"RKLLM SDK (version: 1.1.4 | target: Linux)")
    elif case == "profile_mismatch":
        overrides[CONF_ABI_PROFILE] = "v130"  # the emulator library is 1.2.3 (v12x)
    elif case == "model_for_another_soc":
        model = tmp_path / "rk3576-board.model"
        model.write_text(ASSIST_MODEL + "host_platform = RK3576\n", encoding="utf-8")
    elif case == "model_missing":
        model = tmp_path / "absent.model"
    elif case == "model_from_newer_toolkit":
        model = tmp_path / "new-toolkit.model"
        model.write_text(ASSIST_MODEL + "toolkit_version = 1.9.0\n", encoding="utf-8")
    elif case == "context_over_model_limit":
        overrides[CONF_CONTEXT_LENGTH] = 8192  # the model's max_context_limit is 4096
    if worker == "remote":
        remote: RemoteWorker = request.getfixturevalue("remote_worker")
        overrides |= {
            CONF_WORKER: "remote",
            CONF_WORKER_HOST: remote.host,
            CONF_WORKER_PORT: remote.port,
            CONF_WORKER_SECRET: remote.secret,
        }
    entry = MockConfigEntry(domain=DOMAIN, data=entry_data(library, model, **overrides))
    await _setup(hass, entry)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.error_reason_translation_key == translation_key
    raised = {key for key in SETUP_ISSUES if _issue(hass, key, entry) is not None}
    assert raised == ({issue} if issue else set())
    if case == "library_too_old":
        found = _issue(hass, "library_unsupported", entry)
        assert found is not None
        assert found.translation_placeholders is not None
        assert found.translation_placeholders["version"] == "1.1.4"
    if worker == "local":  # (a remote worker is the fixture's own child and keeps serving)
        assert child_pids() == set()


@pytest.mark.parametrize(
    ("toolkit", "required", "release"),
    [
        ("1.3.0", "1.3.0", "airockchip/rknn-llm release-v1.3.0"),
        (
            "1.9.0",
            "1.9.0",
            "no librkllmrt that rkllm supports is that new yet; convert the model with an older rkllm-toolkit",
        ),
    ],
)
async def test_a_model_from_a_newer_toolkit_gets_a_repair_naming_the_runtime_to_install(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, toolkit: str, required: str, release: str
) -> None:
    """The runtime refuses a model converted with a newer rkllm-toolkit; the repair says which runtime to install."""
    model = tmp_path / "new-toolkit.model"
    model.write_text(ASSIST_MODEL + f"toolkit_version = {toolkit}\n", encoding="utf-8")
    entry = MockConfigEntry(domain=DOMAIN, title="New toolkit", data=entry_data(emulator_lib, model))
    await _setup(hass, entry)

    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.error_reason_translation_key == "setup_model_toolkit_newer"
    issue = _issue(hass, "model_toolkit_newer", entry)
    assert issue is not None
    assert issue.severity is ir.IssueSeverity.ERROR
    assert issue.translation_placeholders == {
        "title": "New toolkit",
        "model": str(model),
        "library": emulator_lib,
        "toolkit_version": toolkit,
        "runtime_version": "1.2.3",  # the v12x emulator
        "required_version": required,
        "release": release,
        "error": (
            "E rkllm: The rkllm-runtime version is lower than the rkllm-toolkit version. Please update rkllm-runtime "
            f"to {toolkit} or higher."
        ),
    }

    # A model the runtime accepts clears it.
    hass.config_entries.async_update_entry(entry, data=entry_data(emulator_lib, tmp_path / "ok.model"))
    (tmp_path / "ok.model").write_text(ASSIST_MODEL, encoding="utf-8")
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert _issue(hass, "model_toolkit_newer", entry) is None


async def test_setup_issues_clear_after_a_successful_setup(
    hass: HomeAssistant, emulator_lib: str, assist_model: Path, tmp_path: Path
) -> None:
    """Fixing the path and reloading removes the repair issue."""
    entry = MockConfigEntry(domain=DOMAIN, data=entry_data(str(tmp_path / "absent.so"), assist_model))
    await _setup(hass, entry)
    assert _issue(hass, "library_missing", entry) is not None
    hass.config_entries.async_update_entry(entry, data=entry_data(emulator_lib, assist_model))
    assert await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert _issue(hass, "library_missing", entry) is None


async def test_an_unreachable_remote_worker_is_not_ready(
    hass: HomeAssistant, emulator_lib: str, assist_model: Path, socket_enabled: None
) -> None:
    """A worker host that is down may come back: HA retries the setup later."""
    data = entry_data(
        emulator_lib,
        assist_model,
        **{
            CONF_WORKER: "remote",
            CONF_WORKER_HOST: "127.0.0.1",
            CONF_WORKER_PORT: free_tcp_port(),
            CONF_WORKER_SECRET: "secret",
        },
    )
    entry = MockConfigEntry(domain=DOMAIN, data=data)
    await _setup(hass, entry)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert entry.error_reason_translation_key == "setup_worker_failed"
    assert not list(entry.async_get_active_flows(hass, {SOURCE_REAUTH}))
    assert not {key for key in SETUP_ISSUES if _issue(hass, key, entry) is not None}


@pytest.mark.parametrize("stored_secret", ["wrong", ""])
async def test_a_refused_secret_fails_setup_and_starts_reauth(
    hass: HomeAssistant, remote_worker: RemoteWorker, emulator_lib: str, assist_model: Path, stored_secret: str
) -> None:
    """Retrying with a secret the worker refuses (or none at all) cannot help: HA asks the user for the new one."""
    data = entry_data(
        emulator_lib,
        assist_model,
        **{
            CONF_WORKER: "remote",
            CONF_WORKER_HOST: remote_worker.host,
            CONF_WORKER_PORT: remote_worker.port,
            CONF_WORKER_SECRET: stored_secret,
        },
    )
    entry = MockConfigEntry(domain=DOMAIN, data=data)
    await _setup(hass, entry)
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.error_reason_translation_key == "setup_secret_refused"
    assert entry.reason is not None
    assert "secret" in entry.reason
    (flow,) = entry.async_get_active_flows(hass, {SOURCE_REAUTH})
    assert flow["step_id"] == "reauth_confirm"
    assert not {key for key in SETUP_ISSUES if _issue(hass, key, entry) is not None}


async def test_model_load_longer_than_the_bound_is_not_ready(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that does not finish loading in time is stopped and retried later, never awaited forever."""
    monkeypatch.setattr(rkllm_init, "ENGINE_START_TIMEOUT_S", 0.5)
    model = tmp_path / "slow.model"
    model.write_text(ASSIST_MODEL + "load_time_ms = 20000\n", encoding="utf-8")
    entry = MockConfigEntry(
        domain=DOMAIN, data=entry_data(emulator_lib, model, worker_env={"RKLLM_EMULATOR_SPEED": "1"})
    )
    await _setup(hass, entry)
    assert entry.state is ConfigEntryState.SETUP_RETRY
    assert child_pids() == set()
