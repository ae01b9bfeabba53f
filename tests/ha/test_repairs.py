"""Repair issues: raised from what the runtime and the worker really do, and gone once the problem is fixed."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Event, HomeAssistant, callback
from homeassistant.helpers import issue_registry as ir
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rkllm.const import DOMAIN
from custom_components.rkllm.repairs import (
    _PLACEHOLDERS,
    CRASH_LOOP_RESTARTS,
    async_raise_setup_issue,
    issue_id_for,
)
from rkllm_engine.engine import Engine
from rkllm_engine.types import ChatMessage, ChatRequest, EngineError, EngineState
from tests.ha.conftest import entry_data
from tests.waits import wait_for_metrics

INTEGRATION_DIR = Path(__file__).resolve().parents[2] / "custom_components" / "rkllm"
LEARN_MORE = "https://github.com/rkllm/rkllm#troubleshooting"
GOOD_MODEL = ()
CRASHING_MODEL = ("fault = crash_after_tokens:0",)


def write_model(path: Path, *extra_lines: str) -> Path:
    """An emulator model file (rkllm_native/emulator/MODEL_FORMAT.md); `extra_lines` set platform, driver, faults."""
    lines = [
        "rkllm-emulator-model 1",
        "calibration = qwen2.5-1.5b-rk3588",
        'answer user "*" = The kitchen light is on.',
        *extra_lines,
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def setup_entry(hass: HomeAssistant, library: str, model: Path) -> MockConfigEntry:
    """Add an entry for `library` + `model` and try to set it up (it may fail: that is what some tests check)."""
    entry = MockConfigEntry(domain=DOMAIN, title="board", data=entry_data(library, model))
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    return entry


async def reload(hass: HomeAssistant, entry: MockConfigEntry) -> None:
    """What a user does after fixing the problem (Settings > Devices & services > Reload)."""
    await hass.config_entries.async_reload(entry.entry_id)
    await hass.async_block_till_done()


async def unload(hass: HomeAssistant, entry: MockConfigEntry) -> None:
    """Stop the entry's worker so none outlives the test."""
    if entry.state is ConfigEntryState.LOADED:
        await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_block_till_done()


def issue(hass: HomeAssistant, key: str, entry: MockConfigEntry) -> ir.IssueEntry | None:
    return ir.async_get(hass).async_get_issue(DOMAIN, issue_id_for(key, entry.entry_id))


async def wait_for_issue(hass: HomeAssistant, key: str, entry: MockConfigEntry, present: bool) -> None:
    """Wait until the issue exists (or is gone); the tracker re-reads the runtime's lines while it reloads."""
    changed = asyncio.Event()

    @callback
    def registry_updated(_event: Event[ir.EventIssueRegistryUpdatedData]) -> None:
        changed.set()

    remove = hass.bus.async_listen(ir.EVENT_REPAIRS_ISSUE_REGISTRY_UPDATED, registry_updated)
    try:
        async with asyncio.timeout(30):
            while (issue(hass, key, entry) is not None) != present:
                await changed.wait()
                changed.clear()
    finally:
        remove()


def chat(text: str) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage(role="user", content=text)])


async def crash_the_worker(engine: Engine) -> None:
    """Send a request to a model that crashes on its first token; wait until the worker was relaunched."""
    restarts = engine.metrics.restarts
    with pytest.raises(EngineError, match="crash"):
        await engine.submit(chat("turn on the kitchen light")).collect()
    await wait_for_metrics(engine, lambda metrics: metrics.restarts > restarts or metrics.state is EngineState.ERROR)


# ---------------------------------------------------------------------------------------------------------------
# The NPU driver warning
# ---------------------------------------------------------------------------------------------------------------


async def test_old_npu_driver_raises_a_warning_until_the_driver_is_upgraded(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path
) -> None:
    model = write_model(tmp_path / "old-driver.model", "driver_version = 0.9.6")
    entry = await setup_entry(hass, emulator_lib, model)
    try:
        # The runtime still loads: a warning, not a failure.
        assert entry.state is ConfigEntryState.LOADED
        raised = issue(hass, "npu_driver_too_old", entry)
        assert raised is not None
        assert raised.severity is ir.IssueSeverity.WARNING
        assert raised.translation_key == "npu_driver_too_old"
        assert raised.translation_placeholders == {
            "title": "board",
            "driver_version": "0.9.6",
            "required_version": "0.9.8",
        }
        assert raised.learn_more_url == LEARN_MORE
        assert not raised.is_fixable

        # The board gets the newer driver (the emulator reads it from the model file at the next load).
        write_model(model, "driver_version = 0.9.8")
        await reload(hass, entry)
        assert entry.state is ConfigEntryState.LOADED
        assert issue(hass, "npu_driver_too_old", entry) is None
    finally:
        await unload(hass, entry)


# ---------------------------------------------------------------------------------------------------------------
# A model converted for another SoC
# ---------------------------------------------------------------------------------------------------------------


async def test_model_for_another_soc_fails_setup_with_an_issue_a_matching_model_clears(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path
) -> None:
    # The board is an RK3576; the model was converted for the RK3588.
    model = write_model(tmp_path / "rk3588.model", "platform = RK3588", "host_platform = RK3576")
    entry = await setup_entry(hass, emulator_lib, model)
    try:
        assert entry.state is ConfigEntryState.SETUP_ERROR
        raised = issue(hass, "model_platform_mismatch", entry)
        assert raised is not None
        assert raised.severity is ir.IssueSeverity.ERROR
        placeholders = raised.translation_placeholders or {}
        assert placeholders["model"] == str(model)
        assert "target_platform does not match the real platform" in placeholders["error"]
        assert raised.learn_more_url == LEARN_MORE

        write_model(model, "platform = RK3576", "host_platform = RK3576")
        await reload(hass, entry)
        assert entry.state is ConfigEntryState.LOADED
        assert issue(hass, "model_platform_mismatch", entry) is None
    finally:
        await unload(hass, entry)


async def test_model_swapped_for_another_soc_while_running_is_reported_after_the_restart(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path
) -> None:
    model = write_model(tmp_path / "assist.model", *CRASHING_MODEL)
    entry = await setup_entry(hass, emulator_lib, model)
    try:
        assert entry.state is ConfigEntryState.LOADED
        engine = entry.runtime_data.engine
        # Someone copies a model for another chip over the file; the worker crashes and reloads it.
        write_model(model, "platform = RK3588", "host_platform = RK3576")
        restarts = engine.metrics.restarts
        with pytest.raises(EngineError, match="crash"):
            await engine.submit(chat("turn on the kitchen light")).collect()
        await wait_for_issue(hass, "model_platform_mismatch", entry, present=True)
        raised = issue(hass, "model_platform_mismatch", entry)
        assert raised is not None
        assert (raised.translation_placeholders or {})["platform"] == "RK3576"
        assert engine.metrics.restarts == restarts, "the restart failed, so it is not counted"

        # The right model goes back; the next relaunch loads it and the issue disappears by itself.
        write_model(model, *GOOD_MODEL)
        await wait_for_issue(hass, "model_platform_mismatch", entry, present=False)
        assert engine.metrics.state is EngineState.IDLE
    finally:
        await unload(hass, entry)


# ---------------------------------------------------------------------------------------------------------------
# Worker crash loop
# ---------------------------------------------------------------------------------------------------------------


async def test_worker_crash_loop_is_raised_and_clears_once_a_request_is_answered(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path
) -> None:
    model = write_model(tmp_path / "crashing.model", *CRASHING_MODEL)
    entry = await setup_entry(hass, emulator_lib, model)
    try:
        engine = entry.runtime_data.engine
        for _ in range(CRASH_LOOP_RESTARTS - 1):
            await crash_the_worker(engine)
        # Two crashes in a row may be bad luck; the third is a loop.
        assert issue(hass, "worker_crash_loop", entry) is None
        await crash_the_worker(engine)
        raised = issue(hass, "worker_crash_loop", entry)
        assert raised is not None
        assert raised.severity is ir.IssueSeverity.ERROR
        assert raised.is_fixable
        placeholders = raised.translation_placeholders or {}
        assert placeholders["restarts"] == str(CRASH_LOOP_RESTARTS)
        # The worker died of a segfault (the emulated crash), and the issue says so.
        assert "SIGSEGV" in placeholders["error"]

        # The model is fixed on disk, but the running worker still has the crashing one loaded: one more crash,
        # and the relaunch loads the fixed file. Still a loop until a request is answered.
        write_model(model, *GOOD_MODEL)
        await crash_the_worker(engine)
        await wait_for_metrics(engine, lambda metrics: metrics.state is EngineState.IDLE)
        assert issue(hass, "worker_crash_loop", entry) is not None
        text, _finished = await engine.submit(chat("turn on the kitchen light")).collect()
        assert text == "The kitchen light is on."
        await hass.async_block_till_done()
        assert issue(hass, "worker_crash_loop", entry) is None
    finally:
        await unload(hass, entry)


async def test_crash_loop_fix_flow_restarts_the_engine(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, emulator_lib: str, tmp_path: Path
) -> None:
    model = write_model(tmp_path / "crashing.model", *CRASHING_MODEL)
    entry = await setup_entry(hass, emulator_lib, model)
    try:
        engine = entry.runtime_data.engine
        for _ in range(CRASH_LOOP_RESTARTS):
            await crash_the_worker(engine)
        raised = issue(hass, "worker_crash_loop", entry)
        assert raised is not None
        write_model(model, *GOOD_MODEL)

        # The user opens the repair and confirms: the entry reloads with a fresh worker.
        assert await async_setup_component(hass, "repairs", {})
        client = await hass_client()
        response = await client.post("/api/repairs/issues/fix", json={"handler": DOMAIN, "issue_id": raised.issue_id})
        assert response.status == 200
        flow = await response.json()
        assert flow["step_id"] == "confirm"
        assert flow["description_placeholders"]["title"] == "board"
        response = await client.post(f"/api/repairs/issues/fix/{flow['flow_id']}", json={})
        assert response.status == 200
        assert (await response.json())["type"] == "create_entry"
        await hass.async_block_till_done()

        assert entry.state is ConfigEntryState.LOADED
        new_engine = entry.runtime_data.engine
        assert new_engine is not engine
        assert new_engine.metrics.restarts == 0
        assert issue(hass, "worker_crash_loop", entry) is None
        text, _finished = await new_engine.submit(chat("turn on the kitchen light")).collect()
        assert text == "The kitchen light is on."
    finally:
        await unload(hass, entry)


async def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = write_model(tmp_path / "crashing.model", *CRASHING_MODEL)
    entry = await setup_entry(hass, emulator_lib, model)
    try:
        engine = entry.runtime_data.engine
        await crash_the_worker(engine)
        await wait_for_metrics(engine, lambda metrics: metrics.state is EngineState.IDLE)
        await crash_the_worker(engine)
        await wait_for_metrics(engine, lambda metrics: metrics.state is EngineState.IDLE)
    finally:
        await unload(hass, entry)

    messages = [record.getMessage() for record in caplog.records if record.name == "custom_components.rkllm"]
    outages = [message for message in messages if "is unavailable" in message]
    recoveries = [message for message in messages if "is available again" in message]
    # One warning per outage (not one per metric change while it lasts), naming the cause; none for the unload.
    assert len(outages) == 2
    assert outages[0].startswith("The NPU engine of board is unavailable (loading): the rkllm worker crashed")
    assert recoveries == ["The NPU engine of board is available again"] * 2


# ---------------------------------------------------------------------------------------------------------------
# Library problems found at setup
# ---------------------------------------------------------------------------------------------------------------


async def test_missing_library_raises_an_issue_that_installing_it_clears(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path
) -> None:
    library = tmp_path / "lib" / "librkllmrt.so"
    entry = await setup_entry(hass, str(library), write_model(tmp_path / "assist.model"))
    try:
        assert entry.state is ConfigEntryState.SETUP_ERROR
        raised = issue(hass, "library_missing", entry)
        assert raised is not None
        assert raised.severity is ir.IssueSeverity.ERROR
        assert (raised.translation_placeholders or {})["path"] == str(library)

        library.parent.mkdir()
        shutil.copy(emulator_lib, library)
        await reload(hass, entry)
        assert entry.state is ConfigEntryState.LOADED
        assert issue(hass, "library_missing", entry) is None
    finally:
        await unload(hass, entry)


async def test_file_that_is_not_the_runtime_raises_library_unsupported(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path
) -> None:
    library = tmp_path / "librkllmrt.so"
    library.write_text("not a shared library\n", encoding="utf-8")
    entry = await setup_entry(hass, str(library), write_model(tmp_path / "assist.model"))
    try:
        assert entry.state is ConfigEntryState.SETUP_ERROR
        raised = issue(hass, "library_unsupported", entry)
        assert raised is not None
        placeholders = raised.translation_placeholders or {}
        assert placeholders["path"] == str(library)
        assert placeholders["version"]
        assert str(library) in placeholders["error"]

        shutil.copy(emulator_lib, library)
        await reload(hass, entry)
        assert entry.state is ConfigEntryState.LOADED
        assert issue(hass, "library_unsupported", entry) is None
    finally:
        await unload(hass, entry)


async def test_unknown_issue_key_is_refused_with_the_known_ones(
    hass: HomeAssistant, emulator_lib: str, tmp_path: Path
) -> None:
    entry = MockConfigEntry(domain=DOMAIN, title="board", data=entry_data(emulator_lib, tmp_path / "m.model"))
    with pytest.raises(ValueError, match="unknown rkllm repair issue 'driver_gone': expected one of library_missing"):
        await async_raise_setup_issue(hass, entry, "driver_gone", {})


# ---------------------------------------------------------------------------------------------------------------
# The texts users read
# ---------------------------------------------------------------------------------------------------------------


def test_every_issue_text_uses_exactly_the_placeholders_it_is_given() -> None:
    strings = json.loads((INTEGRATION_DIR / "strings.json").read_text(encoding="utf-8"))
    english = json.loads((INTEGRATION_DIR / "translations" / "en.json").read_text(encoding="utf-8"))
    assert strings["issues"] == english["issues"]
    assert set(strings["issues"]) == set(_PLACEHOLDERS)
    for key, names in _PLACEHOLDERS.items():
        texts: dict[str, Any] = strings["issues"][key]
        assert texts["title"]
        fixable_texts = texts.get("fix_flow", {}).get("step", {}).get("confirm", {})
        body = texts.get("description") or fixable_texts.get("description")
        assert body, f"{key} has no description"
        used = set(re.findall(r"\{(\w+)\}", " ".join([texts["title"], body, fixable_texts.get("title", "")])))
        assert used == set(names), key
