"""The rkllm integration: an LLM on a Rockchip NPU as Assist agent, AI task and OpenAI-compatible API.

A config entry is one runtime + model, served by one `rkllm_engine.Engine` (a worker process owns the native
runtime). Setup starts the engine and keeps it in `entry.runtime_data`; unload stops it and leaves no process,
thread or task behind.
"""

from __future__ import annotations

# A release zip vendors rkllm_native/rkllm_engine (not on PyPI): put them on sys.path before importing them.
from . import vendor  # noqa: F401

# isort: split

import asyncio
from pathlib import Path
from typing import NoReturn

from homeassistant.config_entries import ConfigEntry
from homeassistant.const import EVENT_HOMEASSISTANT_STOP
from homeassistant.core import Event, HomeAssistant
from homeassistant.exceptions import ConfigEntryAuthFailed, ConfigEntryError, ConfigEntryNotReady
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers.typing import ConfigType

from rkllm_engine.engine import Engine, EngineConfig, start_error
from rkllm_engine.types import EngineError, EngineUnavailableError, RuntimeIncompatibleError
from rkllm_native import catalog as fetch_catalog
from rkllm_native import detect
from rkllm_native.errors import NotRkllmLibraryError, RkllmError

from .compat import entry_platforms
from .const import (
    CONF_LIBRARY_PATH,
    CONF_MODEL_PATH,
    CONF_MODEL_SOURCE,
    CONF_PLATFORM,
    CONF_WORKER,
    DOMAIN,
    ENGINE_START_TIMEOUT_S,
    ISSUE_LIBRARY_MISSING,
    ISSUE_LIBRARY_UNSUPPORTED,
    ISSUE_MODEL_LOAD_FAILED,
    ISSUE_MODEL_PLATFORM_MISMATCH,
    ISSUE_MODEL_TOOLKIT_NEWER,
    ISSUE_PATH_NOT_ALLOWED,
    LOGGER,
    WORKER_REMOTE,
)
from .data import RkllmConfigEntry, RkllmRuntimeData
from .entry_settings import engine_config_from_entry, model_file_problem, model_id_for
from .http import async_register_views

CONFIG_SCHEMA = cv.config_entry_only_config_schema(DOMAIN)

REMOTE_BUSY_RETRIES = 5
REMOTE_BUSY_RETRY_DELAY_S = 0.2
# A remote worker that fails one of these checks cannot be retried into working: only the user knows the right
# secret or certificate fingerprint, so setup asks for them (reauth). Reason → translation key.
_REAUTH_REASONS = {
    "secret_refused": "setup_secret_refused",
    "worker_unverified": "setup_worker_unverified",
    "fingerprint_mismatch": "setup_fingerprint_mismatch",
    "tls_mismatch": "setup_tls_mismatch",
}


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    """Set up the integration itself; per-process things (HTTP views) are registered here, once."""
    async_register_views(hass)
    return True


async def _async_raise_setup_issue(
    hass: HomeAssistant, entry: ConfigEntry, key: str, placeholders: dict[str, str]
) -> None:
    """Raise the repair issue for a permanent setup failure (texts and lifecycle live in repairs.py)."""
    from .repairs import async_raise_setup_issue

    await async_raise_setup_issue(hass, entry, key, placeholders)


async def _async_check_local_files(hass: HomeAssistant, entry: ConfigEntry, config: EngineConfig) -> None:
    """Refuse permanently broken local setups before a worker is spawned, with a repair issue."""
    try:
        await hass.async_add_executor_job(detect.check_library, config.library_path, config.profile)
    except RkllmError as err:
        await _async_raise_start_failure(hass, entry, start_error(err))
    if (problem := await hass.async_add_executor_job(model_file_problem, config.model_path)) is not None:
        message = f"model file {config.model_path}: {problem[1]}"
        raise ConfigEntryError(
            translation_domain=DOMAIN,
            translation_key="setup_model_invalid",
            translation_placeholders={"error": message},
        )


def _library_version(err: RuntimeIncompatibleError) -> str:
    """The version the repair text names: detected, or what the file is instead of librkllmrt."""
    if version := err.details.get("version"):
        return version
    return "not librkllmrt" if err.details.get("code") == NotRkllmLibraryError.code else ""


async def _async_raise_start_failure(hass: HomeAssistant, entry: ConfigEntry, err: EngineError) -> NoReturn:
    """Tell HA how to go on: give up (ConfigEntryError), ask for a new secret (ConfigEntryAuthFailed) or retry.

    ConfigEntryError (+ the repair issue for its reason) when retrying cannot help; ConfigEntryAuthFailed when a
    remote worker refuses the secret (HA starts the reauth flow, which asks for the new one); else
    ConfigEntryNotReady. Decided by the error's type and `reason` (carried from the worker), never by its text.
    """
    message = str(err)
    if isinstance(err, EngineUnavailableError) and err.reason in _REAUTH_REASONS:
        # Retrying with the same secret or fingerprint cannot succeed; the reauth flow asks for the current ones.
        raise ConfigEntryAuthFailed(
            translation_domain=DOMAIN,
            translation_key=_REAUTH_REASONS[err.reason],
            translation_placeholders={"error": message},
        ) from err
    if not isinstance(err, RuntimeIncompatibleError):
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN,
            translation_key="setup_worker_failed",
            translation_placeholders={"error": message},
        ) from err
    library_path = err.details.get("path") or str(entry.data.get(CONF_LIBRARY_PATH))
    if err.reason == "library_missing":
        await _async_raise_setup_issue(hass, entry, ISSUE_LIBRARY_MISSING, {"path": library_path, "error": message})
        translation_key = "setup_library_missing"
    elif err.reason in ("library_unsupported", "profile_mismatch"):
        placeholders = {"path": library_path, "version": _library_version(err), "error": message}
        await _async_raise_setup_issue(hass, entry, ISSUE_LIBRARY_UNSUPPORTED, placeholders)
        translation_key = "setup_library_unsupported"
    elif err.reason == "model_platform_mismatch":
        placeholders = {
            "model": str(entry.data.get(CONF_MODEL_PATH)),
            "platform": str(entry.data.get(CONF_PLATFORM)),
            "error": message,
        }
        await _async_raise_setup_issue(hass, entry, ISSUE_MODEL_PLATFORM_MISMATCH, placeholders)
        translation_key = "setup_model_platform_mismatch"
    elif err.reason == "protocol_mismatch":
        translation_key = "setup_worker_failed"
    elif err.reason == "path_not_allowed":
        placeholders = {
            "path": err.details.get("path", ""),
            "flag": err.details.get("flag", ""),
            "worker": engine_config_from_entry(entry.data).worker.describe(),
            "error": message,
        }
        await _async_raise_setup_issue(hass, entry, ISSUE_PATH_NOT_ALLOWED, placeholders)
        translation_key = "setup_path_not_allowed"
    elif (toolkit := fetch_catalog.toolkit_version_refused(err.details.get("runtime_line", ""))) is not None:
        await _async_raise_toolkit_issue(hass, entry, toolkit, err.details.get("runtime_line", message), None)
        translation_key = "setup_model_toolkit_newer"
    else:  # model_invalid, init_failed: the message names the file or setting to fix; a retry may do after that
        placeholders = {"model": str(entry.data.get(CONF_MODEL_PATH)), "error": message}
        await _async_raise_setup_issue(hass, entry, ISSUE_MODEL_LOAD_FAILED, placeholders)
        translation_key = "setup_model_invalid"
    raise ConfigEntryError(
        translation_domain=DOMAIN,
        translation_key=translation_key,
        translation_placeholders={"error": message},
    ) from err


def _local_runtime_version(library_path: str) -> str | None:
    """The version of a local library file (None when it cannot be read); blocking."""
    try:
        return detect.identify_library(library_path).version
    except RkllmError:
        return None


async def _async_raise_toolkit_issue(
    hass: HomeAssistant, entry: ConfigEntry, toolkit_version: str, error: str, runtime_version: str | None
) -> None:
    """The model needs a newer runtime than the entry's: say which release to install (docs/runtime.md §7)."""
    library = str(entry.data.get(CONF_LIBRARY_PATH, ""))
    if runtime_version is None and entry.data.get(CONF_WORKER) != WORKER_REMOTE:
        runtime_version = await hass.async_add_executor_job(_local_runtime_version, library)
    catalog = await hass.async_add_executor_job(fetch_catalog.load_catalog)
    release = catalog.runtime_at_least(toolkit_version)
    placeholders = {
        "model": str(entry.data.get(CONF_MODEL_PATH)),
        "library": library,
        "toolkit_version": toolkit_version,
        "runtime_version": runtime_version or "",
        "required_version": release.version if release is not None else toolkit_version,
        "release": (
            f"airockchip/rknn-llm {release.tag}"
            if release is not None
            else "no librkllmrt that rkllm supports is that new yet; convert the model with an older rkllm-toolkit"
        ),
        "error": error,
    }
    await _async_raise_setup_issue(hass, entry, ISSUE_MODEL_TOOLKIT_NEWER, placeholders)


async def _async_start_engine_once_busy_clears(engine: Engine) -> None:
    """Start the engine; a remote worker still releasing our previous connection gets a few short retries.

    A remote worker serves one client at a time and frees its slot just after a client leaves, so a setup right
    after the config flow's probe (or a reload) can be told "busy" for a moment.
    """
    for attempt in range(REMOTE_BUSY_RETRIES + 1):
        try:
            await engine.start()
        except EngineUnavailableError as err:
            if attempt == REMOTE_BUSY_RETRIES or err.reason != "worker_busy":
                raise
            await asyncio.sleep(REMOTE_BUSY_RETRY_DELAY_S)
        else:
            return


async def _async_start_engine(hass: HomeAssistant, entry: ConfigEntry, engine: Engine) -> None:
    """Start the engine within a bound; map failures to NotReady (retry later) or Error (+ repair issue)."""
    try:
        async with asyncio.timeout(ENGINE_START_TIMEOUT_S):
            await _async_start_engine_once_busy_clears(engine)
    except TimeoutError as err:
        await engine.stop()
        raise ConfigEntryNotReady(
            translation_domain=DOMAIN,
            translation_key="setup_timeout",
            translation_placeholders={"seconds": f"{ENGINE_START_TIMEOUT_S:.0f}"},
        ) from err
    except EngineError as err:
        await engine.stop()
        await _async_raise_start_failure(hass, entry, err)
    except BaseException:
        # Cancelled setup (HA stopping): never leave a worker behind.
        await engine.stop()
        raise


async def async_setup_entry(hass: HomeAssistant, entry: RkllmConfigEntry) -> bool:
    """Start the engine for this runtime + model and set up the platforms."""
    try:
        config = engine_config_from_entry(entry.data)
    except (KeyError, ValueError) as err:
        raise ConfigEntryError(
            translation_domain=DOMAIN,
            translation_key="setup_model_invalid",
            translation_placeholders={"error": str(err)},
        ) from err
    from .repairs import async_take_gave_up

    if (gave_up := async_take_gave_up(hass, entry.entry_id)) is not None:
        # The engine gave up after a crash loop and the tracker reloaded the entry: it stays in this error state
        # until the user retries (the repair's fix flow, a reload after fixing the cause, a changed setting).
        raise ConfigEntryError(
            translation_domain=DOMAIN,
            translation_key="setup_crash_loop",
            translation_placeholders={"error": gave_up},
        )
    if config.worker.host is None:
        await _async_check_local_files(hass, entry, config)
    engine = Engine(config)
    await _async_start_engine(hass, entry, engine)

    metrics = engine.metrics
    entry.runtime_data = RkllmRuntimeData(
        engine=engine,
        model_name=Path(config.model_path).stem,
        model_id=model_id_for(config.model_path),
        runtime_version=metrics.runtime_version,
        abi_profile=metrics.abi_profile,
        toolkit_version=metrics.toolkit_version,
        model_source=entry.data.get(CONF_MODEL_SOURCE),
        engine_settings=dict(entry.data),
    )

    from .repairs import async_clear_setup_issues, async_track_issues

    try:
        await async_clear_setup_issues(hass, entry)
        if fetch_catalog.toolkit_newer_than_runtime(metrics.toolkit_version, metrics.runtime_version):
            # [Inf] The runtime refuses such models itself (docs/runtime.md §7); one that loads (an ABI override on
            # an unknown version) still gets the issue, since generation may misbehave.
            await _async_raise_toolkit_issue(
                hass,
                entry,
                str(metrics.toolkit_version),
                f"the model reports rkllm-toolkit {metrics.toolkit_version}, the runtime is {metrics.runtime_version}",
                metrics.runtime_version,
            )
        await hass.config_entries.async_forward_entry_setups(entry, entry_platforms())
        entry.async_on_unload(async_track_issues(hass, entry))
    except BaseException:
        await engine.stop()
        raise
    entry.async_on_unload(entry.add_update_listener(_async_entry_updated))

    async def _async_stop_engine_on_shutdown(_event: Event) -> None:
        """Home Assistant does not unload entries when it stops; the worker must not outlive it."""
        await engine.stop()

    entry.async_on_unload(hass.bus.async_listen_once(EVENT_HOMEASSISTANT_STOP, _async_stop_engine_on_shutdown))
    LOGGER.debug(
        "rkllm engine for %s ready (runtime %s, ABI %s, worker %s)",
        config.model_path,
        metrics.runtime_version,
        metrics.abi_profile,
        config.worker.describe(),
    )
    return True


async def async_unload_entry(hass: HomeAssistant, entry: RkllmConfigEntry) -> bool:
    """Unload the platforms, then stop the engine (no worker process, thread or task is left).

    Returns a bool, never None (2025.4 treats None as a failure). The engine is stopped even if a platform
    failed to unload: a worker holding NPU memory must never outlive its entry.
    """
    unloaded = await hass.config_entries.async_unload_platforms(entry, entry_platforms())
    await entry.runtime_data.engine.stop()
    return unloaded


async def async_remove_entry(hass: HomeAssistant, entry: ConfigEntry) -> None:
    """The entry is gone: its repair issues can no longer be fixed."""
    from .repairs import async_delete_entry_issues

    async_delete_entry_issues(hass, entry.entry_id)


async def _async_entry_updated(hass: HomeAssistant, entry: RkllmConfigEntry) -> None:
    """Apply a change: a runtime/model change restarts the engine; an agent change only reloads the platforms.

    Loading a model takes seconds on a board and drops the resident prompt prefix, so adding or editing a
    conversation agent (a subentry) must not restart it.
    """
    if entry.runtime_data.engine_settings != dict(entry.data):
        await hass.config_entries.async_reload(entry.entry_id)
        return
    platforms = entry_platforms()
    if await hass.config_entries.async_unload_platforms(entry, platforms):
        await hass.config_entries.async_forward_entry_setups(entry, platforms)
