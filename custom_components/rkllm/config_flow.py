"""Config flow: one entry per runtime + model, subentries per conversation agent / AI task.

Local setups are validated without loading anything: the library through `rkllm_native.detect` (file, ELF,
rkllm marker, supported version, profile override) and the model file by a cheap check
(`entry_settings.model_file_problem`). A remote worker is probed (connect, TLS with the pinned fingerprint when
one is given, the mutual proof of the secret, hello, and whether its allow-list serves the library and model;
`rkllm_engine.engine.probe_worker`) without loading anything: the files themselves are checked by the setup that
follows, which raises a repair issue for a permanent problem there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import voluptuous as vol
from homeassistant.config_entries import (
    SOURCE_RECONFIGURE,
    SOURCE_USER,
    ConfigEntry,
    ConfigEntryState,
    ConfigFlowResult,
    ConfigSubentryData,
    ConfigSubentryFlow,
    SubentryFlowResult,
)
from homeassistant.const import CONF_LLM_HASS_API, CONF_NAME
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import llm
from homeassistant.helpers.selector import (
    BooleanSelector,
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TemplateSelector,
    TextSelector,
    TextSelectorConfig,
    TextSelectorType,
)

from rkllm_native import detect
from rkllm_native import soc as soc_detect
from rkllm_native.channel import normalise_fingerprint
from rkllm_native.errors import InvalidProfileError, LibraryNotFoundError, ProfileMismatchError, RkllmError

from .compat import HAS_AI_TASK, llm_api_ids
from .const import (
    ABI_PROFILE_AUTO,
    ABI_PROFILES,
    CONF_ABI_PROFILE,
    CONF_CONTEXT_LENGTH,
    CONF_CPU_CORES,
    CONF_ENABLE_THINKING,
    CONF_LIBRARY_PATH,
    CONF_MAX_HISTORY,
    CONF_MAX_NEW_TOKENS,
    CONF_MAX_TOOL_ITERATIONS,
    CONF_MODEL_PATH,
    CONF_NPU_DOMAIN_ID,
    CONF_PLATFORM,
    CONF_PROMPT,
    CONF_QUICK_CONFIRMATIONS,
    CONF_REPEAT_PENALTY,
    CONF_SLOTS,
    CONF_TEMPERATURE,
    CONF_TOP_K,
    CONF_TOP_P,
    CONF_WATCHDOG_S,
    CONF_WORKER,
    CONF_WORKER_HOST,
    CONF_WORKER_PORT,
    CONF_WORKER_SECRET,
    CONF_WORKER_TLS_FINGERPRINT,
    DEFAULT_AI_TASK_NAME,
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_CONVERSATION_NAME,
    DEFAULT_CPU_CORES,
    DEFAULT_ENABLE_THINKING,
    DEFAULT_MAX_HISTORY,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_TOOL_ITERATIONS,
    DEFAULT_NPU_DOMAIN_ID,
    DEFAULT_PLATFORM,
    DEFAULT_QUICK_CONFIRMATIONS,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    DEFAULT_WATCHDOG_S,
    DEFAULT_WORKER_PORT,
    DOMAIN,
    DOWNLOAD_FOLDER,
    MAX_CONTEXT_LENGTH,
    MIN_CONTEXT_LENGTH,
    PLATFORMS_SUPPORTED,
    SLOT_CHOICES,
    SLOTS_AUTO,
    SUBENTRY_AI_TASK,
    SUBENTRY_CONVERSATION,
    WORKER_LOCAL,
    WORKER_REMOTE,
)
from .develop import development_library, development_model
from .download_flow import DownloadConfigFlow
from .entry_settings import engine_config_from_entry, model_file_problem

# The usual places librkllmrt.so is installed to (Rockchip's install script, distro packages, Armbian/Ubuntu
# Rockchip images, rkllama-style /opt layouts); the first that exists is suggested.
LIBRARY_CANDIDATES: Final = (
    "/usr/lib/librkllmrt.so",
    "/usr/local/lib/librkllmrt.so",
    "/usr/lib/aarch64-linux-gnu/librkllmrt.so",
    "/usr/lib64/librkllmrt.so",
    "/opt/rkllm/lib/librkllmrt.so",
    "/opt/rkllm/librkllmrt.so",
    "/opt/rknn-llm/rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so",
)
MODEL_DIRECTORIES: Final = ("/opt/rkllm/models", "/usr/share/rkllm/models", "/opt/rkllm")
DEVICE_TREE_COMPATIBLE: Final = soc_detect.DEVICE_TREE_COMPATIBLE

# Errors of `detect.check_library` that have their own translated form error (their `code`).
_LIBRARY_ERROR_KEYS: Final = frozenset(
    {
        "library_not_found",
        "library_load_failed",
        "library_wrong_architecture",
        "not_rkllm_library",
        "unsupported_runtime",
        "unknown_runtime_version",
        "version_undetectable",
    }
)

# The remote form's (field, error key) for each reason the probe gives (rkllm_engine.types); others are
# ("base", "cannot_connect").
_REMOTE_ERROR_KEYS: Final = {
    "secret_refused": (CONF_WORKER_SECRET, "invalid_auth"),
    "worker_unverified": (CONF_WORKER_SECRET, "worker_unverified"),
    "fingerprint_mismatch": (CONF_WORKER_TLS_FINGERPRINT, "fingerprint_mismatch"),
    "tls_mismatch": (CONF_WORKER_TLS_FINGERPRINT, "tls_mismatch"),
    "worker_busy": ("base", "worker_busy"),
    "worker_unreachable": ("base", "cannot_connect"),
    "protocol_mismatch": ("base", "worker_version_mismatch"),
    "path_not_allowed": ("base", "path_not_allowed"),
}
# Each probe step (connect, handshake, hello) waits this long; a worker on the LAN answers in milliseconds.
REMOTE_PROBE_TIMEOUT_S: Final = 10.0


def suggest_library_path() -> str:
    """First installed librkllmrt.so, else (development machine) the built emulator, else the usual install path."""
    for candidate in LIBRARY_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    development = development_library()
    return str(development) if development is not None else LIBRARY_CANDIDATES[0]


def suggest_model_path(library_path: str) -> str:
    """A model in the usual locations; with a development library, its demo model (develop.py)."""
    if (demo := development_model(library_path)) is not None:
        return str(demo)
    for directory in MODEL_DIRECTORIES:
        folder = Path(directory)
        if folder.is_dir():
            models = sorted(folder.glob("*.rkllm"))
            if models:
                return str(models[0])
    return ""


def detect_platform(compatible_path: str = DEVICE_TREE_COMPATIBLE) -> str | None:
    """The supported SoC from the device tree's `compatible` list (e.g. `rockchip,rk3588s` → rk3588), else None."""
    found = soc_detect.local_soc(compatible_path)
    return found if found in PLATFORMS_SUPPORTED else None


def _number(minimum: float, maximum: float, step: float = 1) -> NumberSelector:
    return NumberSelector(NumberSelectorConfig(min=minimum, max=maximum, step=step, mode=NumberSelectorMode.BOX))


def _select(options: tuple[str, ...], translation_key: str) -> SelectSelector:
    return SelectSelector(
        SelectSelectorConfig(options=list(options), translation_key=translation_key, mode=SelectSelectorMode.DROPDOWN)
    )


MIN_WATCHDOG_S: Final = 2
MAX_WATCHDOG_S: Final = 600
ENTRY_SCHEMA: Final = vol.Schema(
    {
        vol.Required(CONF_LIBRARY_PATH): TextSelector(),
        vol.Required(CONF_MODEL_PATH): TextSelector(),
        vol.Required(CONF_PLATFORM): _select(PLATFORMS_SUPPORTED, "platform"),
        vol.Required(CONF_CONTEXT_LENGTH): _number(MIN_CONTEXT_LENGTH, MAX_CONTEXT_LENGTH),
        vol.Required(CONF_CPU_CORES): _number(1, 8),
        vol.Required(CONF_NPU_DOMAIN_ID): _number(0, 15),
        vol.Required(CONF_ABI_PROFILE): _select(ABI_PROFILES, "abi_profile"),
        vol.Optional(CONF_SLOTS): _select(SLOT_CHOICES, "slots"),
        vol.Optional(CONF_WATCHDOG_S): _number(MIN_WATCHDOG_S, MAX_WATCHDOG_S),
        vol.Required(CONF_WORKER): _select((WORKER_LOCAL, WORKER_REMOTE), "worker"),
    }
)
REMOTE_SCHEMA: Final = vol.Schema(
    {
        vol.Required(CONF_WORKER_HOST): TextSelector(),
        vol.Required(CONF_WORKER_PORT): _number(1, 65535),
        vol.Required(CONF_WORKER_SECRET): TextSelector(TextSelectorConfig(type=TextSelectorType.PASSWORD)),
        vol.Optional(CONF_WORKER_TLS_FINGERPRINT): TextSelector(),
    }
)
# Reauth asks for what proves the worker: the secret and, for a TLS worker, its certificate fingerprint. Host and
# port stay as configured (reconfigure changes them).
REAUTH_SCHEMA: Final = vol.Schema(
    {
        vol.Required(CONF_WORKER_SECRET): TextSelector(TextSelectorConfig(type=TextSelectorType.PASSWORD)),
        vol.Optional(CONF_WORKER_TLS_FINGERPRINT): TextSelector(),
    }
)
_INT_FIELDS: Final = (CONF_CONTEXT_LENGTH, CONF_CPU_CORES, CONF_NPU_DOMAIN_ID, CONF_WORKER_PORT, CONF_WATCHDOG_S)
_REMOTE_FIELDS: Final = (CONF_WORKER_HOST, CONF_WORKER_PORT, CONF_WORKER_SECRET, CONF_WORKER_TLS_FINGERPRINT)


def _fingerprint_input(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The remote data with the fingerprint as the worker prints it (`AB:CD:…`), or dropped when left empty.

    Returns form errors when the text is not a SHA-256 fingerprint.
    """
    result = dict(data)
    text = str(result.pop(CONF_WORKER_TLS_FINGERPRINT, "") or "").strip()
    if not text:
        return result, {}
    fingerprint = normalise_fingerprint(text)
    if fingerprint is None:
        return result, {CONF_WORKER_TLS_FINGERPRINT: "invalid_fingerprint"}
    result[CONF_WORKER_TLS_FINGERPRINT] = fingerprint
    return result, {}


def _normalise_entry_input(user_input: Mapping[str, Any]) -> dict[str, Any]:
    """Strip paths and turn the number selectors' floats into ints."""
    data = dict(user_input)
    for key in (CONF_LIBRARY_PATH, CONF_MODEL_PATH, CONF_WORKER_HOST):
        if isinstance(data.get(key), str):
            data[key] = data[key].strip()
    for key in _INT_FIELDS:
        if key in data:
            data[key] = int(data[key])
    return data


def default_conversation_options() -> dict[str, Any]:
    """Options of a new conversation agent: the Assist API and the defaults for a small model on the NPU."""
    return {
        CONF_PROMPT: llm.DEFAULT_INSTRUCTIONS_PROMPT,
        CONF_LLM_HASS_API: [llm.LLM_API_ASSIST],
        CONF_TEMPERATURE: DEFAULT_TEMPERATURE,
        CONF_TOP_P: DEFAULT_TOP_P,
        CONF_TOP_K: DEFAULT_TOP_K,
        CONF_REPEAT_PENALTY: DEFAULT_REPEAT_PENALTY,
        CONF_MAX_NEW_TOKENS: DEFAULT_MAX_NEW_TOKENS,
        CONF_ENABLE_THINKING: DEFAULT_ENABLE_THINKING,
        CONF_MAX_HISTORY: DEFAULT_MAX_HISTORY,
        CONF_MAX_TOOL_ITERATIONS: DEFAULT_MAX_TOOL_ITERATIONS,
        CONF_QUICK_CONFIRMATIONS: DEFAULT_QUICK_CONFIRMATIONS,
    }


def default_ai_task_options() -> dict[str, Any]:
    """Options of a new AI task entity (no prompt, no tools, no history)."""
    return {
        CONF_TEMPERATURE: DEFAULT_TEMPERATURE,
        CONF_TOP_P: DEFAULT_TOP_P,
        CONF_TOP_K: DEFAULT_TOP_K,
        CONF_REPEAT_PENALTY: DEFAULT_REPEAT_PENALTY,
        CONF_MAX_NEW_TOKENS: DEFAULT_MAX_NEW_TOKENS,
        CONF_ENABLE_THINKING: DEFAULT_ENABLE_THINKING,
    }


class RkllmConfigFlow(DownloadConfigFlow, domain=DOMAIN):
    """Set up one runtime + model from files already there or downloaded; remote workers get a second step."""

    VERSION = 1
    MINOR_VERSION = 1

    def __init__(self) -> None:
        self._pending: dict[str, Any] = {}

    async def async_step_user(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Two ways in: the runtime and model are already on the machine, or the flow downloads them."""
        return self.async_show_menu(step_id="user", menu_options=["files", "download"])

    async def async_step_files(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Ask for library, model, platform and tuning; validate local setups at once."""
        return await self._async_entry_step("files", user_input)

    def _download_library_candidates(self) -> list[str]:
        """Installed libraries, then runtimes an earlier download fetched (newest first), then a development one."""
        runtimes = Path(self.hass.config.path(DOWNLOAD_FOLDER)) / "runtime"
        fetched = sorted(runtimes.glob("*/librkllmrt.so"), key=lambda path: path.parent.name, reverse=True)
        development = development_library()
        return [
            *LIBRARY_CANDIDATES,
            *(str(path) for path in fetched),
            *([str(development)] if development is not None else []),
        ]

    def _download_soc(self) -> str | None:
        """This board's SoC from the device tree (any Rockchip chip, so an unsupported one can be named)."""
        return soc_detect.local_soc(DEVICE_TREE_COMPATIBLE)

    async def async_step_reconfigure(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Change runtime or model of an existing entry, with the same validation."""
        return await self._async_entry_step("reconfigure", user_input)

    async def _async_entry_step(self, step_id: str, user_input: dict[str, Any] | None) -> ConfigFlowResult:
        errors: dict[str, str] = {}
        detail = ""
        if user_input is not None:
            data = _normalise_entry_input(user_input)
            self._abort_if_model_configured(data[CONF_MODEL_PATH])
            if data[CONF_WORKER] == WORKER_REMOTE:
                self._pending = data
                return await self.async_step_remote()
            errors, detail = await self._async_validate_local(data)
            if not errors:
                return self._async_finish({key: value for key, value in data.items() if key not in _REMOTE_FIELDS})
            suggested: Mapping[str, Any] = user_input
        else:
            suggested = await self._async_suggested_entry_values()
        return self.async_show_form(
            step_id=step_id,
            data_schema=self.add_suggested_values_to_schema(ENTRY_SCHEMA, suggested),
            errors=errors,
            description_placeholders={"error_detail": detail},
        )

    async def async_step_remote(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Host, port and secret of a remote worker; probed (connect, secret, hello) before the entry is made."""
        errors: dict[str, str] = {}
        detail = ""
        if user_input is not None:
            data, errors = _fingerprint_input(_normalise_entry_input({**self._pending, **user_input}))
            if not errors:
                errors, detail = await self._async_probe_remote(data)
            if not errors:
                return self._async_finish(data)
            suggested: Mapping[str, Any] = user_input
        else:
            suggested = {CONF_WORKER_PORT: DEFAULT_WORKER_PORT}
            if self.source == SOURCE_RECONFIGURE:
                existing = self._get_reconfigure_entry().data
                suggested = {key: existing[key] for key in _REMOTE_FIELDS if key in existing} or suggested
        return self.async_show_form(
            step_id="remote",
            data_schema=self.add_suggested_values_to_schema(REMOTE_SCHEMA, suggested),
            errors=errors,
            description_placeholders={"error_detail": detail},
        )

    async def async_step_reauth(self, entry_data: Mapping[str, Any]) -> ConfigFlowResult:
        """Setup found the remote worker refusing the stored secret (ConfigEntryAuthFailed): ask for the new one."""
        return await self.async_step_reauth_confirm()

    async def async_step_reauth_confirm(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Probe the entered secret against the entry's worker; save it and reload only when the worker accepts it."""
        entry = self._get_reauth_entry()
        errors: dict[str, str] = {}
        detail = ""
        if user_input is not None:
            base = {key: value for key, value in entry.data.items() if key != CONF_WORKER_TLS_FINGERPRINT}
            data, errors = _fingerprint_input({**base, **user_input})
            if not errors:
                errors, detail = await self._async_probe_remote(data)
            if not errors:
                return self.async_update_reload_and_abort(entry, data=data)
        suggested = {
            CONF_WORKER_TLS_FINGERPRINT: (user_input or entry.data).get(CONF_WORKER_TLS_FINGERPRINT, ""),
        }
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=self.add_suggested_values_to_schema(REAUTH_SCHEMA, suggested),
            errors=errors,
            description_placeholders={
                "worker": engine_config_from_entry(entry.data).worker.describe(),
                "error_detail": detail,
            },
        )

    def _abort_if_model_configured(self, model_path: str) -> None:
        """One entry per model file; a reconfigure keeping its own path is not a duplicate."""
        if self.source == SOURCE_RECONFIGURE and self._get_reconfigure_entry().data.get(CONF_MODEL_PATH) == model_path:
            return
        self._async_abort_entries_match({CONF_MODEL_PATH: model_path})

    async def _async_suggested_entry_values(self) -> dict[str, Any]:
        if self.source == SOURCE_RECONFIGURE:
            return {CONF_SLOTS: SLOTS_AUTO, CONF_WATCHDOG_S: DEFAULT_WATCHDOG_S, **self._get_reconfigure_entry().data}
        library = await self.hass.async_add_executor_job(suggest_library_path)
        model = await self.hass.async_add_executor_job(suggest_model_path, library)
        platform = await self.hass.async_add_executor_job(detect_platform, DEVICE_TREE_COMPATIBLE)
        return {
            CONF_LIBRARY_PATH: library,
            CONF_MODEL_PATH: model,
            CONF_PLATFORM: platform or DEFAULT_PLATFORM,
            CONF_CONTEXT_LENGTH: DEFAULT_CONTEXT_LENGTH,
            CONF_CPU_CORES: DEFAULT_CPU_CORES,
            CONF_NPU_DOMAIN_ID: DEFAULT_NPU_DOMAIN_ID,
            CONF_ABI_PROFILE: ABI_PROFILE_AUTO,
            CONF_SLOTS: SLOTS_AUTO,
            CONF_WATCHDOG_S: DEFAULT_WATCHDOG_S,
            CONF_WORKER: WORKER_LOCAL,
        }

    async def _async_validate_local(self, data: Mapping[str, Any]) -> tuple[dict[str, str], str]:
        """Form errors (field → key) and the one-line detail for the form's description."""
        override = None if data[CONF_ABI_PROFILE] == ABI_PROFILE_AUTO else data[CONF_ABI_PROFILE]
        errors: dict[str, str] = {}
        details: list[str] = []
        try:
            await self.hass.async_add_executor_job(detect.check_library, data[CONF_LIBRARY_PATH], override)
        except (ProfileMismatchError, InvalidProfileError) as err:
            errors[CONF_ABI_PROFILE] = err.code
            details.append(err.message)
        except LibraryNotFoundError as err:
            errors[CONF_LIBRARY_PATH] = "library_not_found"
            details.append(err.message)
        except RkllmError as err:
            errors[CONF_LIBRARY_PATH] = err.code if err.code in _LIBRARY_ERROR_KEYS else "unsupported_runtime"
            details.append(err.message)
        problem = await self.hass.async_add_executor_job(model_file_problem, data[CONF_MODEL_PATH])
        if problem is not None:
            errors[CONF_MODEL_PATH] = problem[0]
            details.append(f"model file {data[CONF_MODEL_PATH]}: {problem[1]}")
        return errors, " ".join(details)

    async def _async_probe_remote(self, data: Mapping[str, Any]) -> tuple[dict[str, str], str]:
        """Probe the remote worker; map a failure's `reason` onto the remote form's fields."""
        from rkllm_engine.engine import probe_worker
        from rkllm_engine.types import EngineUnavailableError, RuntimeIncompatibleError

        if self.source == SOURCE_RECONFIGURE and self._same_loaded_worker(data):
            # Our own loaded entry holds the worker's only connection; the reload after saving re-checks it.
            return {}, ""
        location = engine_config_from_entry(data).worker
        try:
            await probe_worker(
                location,
                timeout_s=REMOTE_PROBE_TIMEOUT_S,
                library_path=data[CONF_LIBRARY_PATH],
                model_path=data[CONF_MODEL_PATH],
            )
        except (EngineUnavailableError, RuntimeIncompatibleError) as err:
            field, key = _REMOTE_ERROR_KEYS.get(err.reason, ("base", "cannot_connect"))
            return {field: key}, str(err)
        return {}, ""

    def _same_loaded_worker(self, data: Mapping[str, Any]) -> bool:
        entry = self._get_reconfigure_entry()
        return entry.state is ConfigEntryState.LOADED and all(
            entry.data.get(key) == data.get(key) for key in (CONF_WORKER, *_REMOTE_FIELDS)
        )

    def _async_finish(self, data: dict[str, Any]) -> ConfigFlowResult:
        title = Path(data[CONF_MODEL_PATH]).stem or "RKLLM"
        if self.source == SOURCE_RECONFIGURE:
            entry = self._get_reconfigure_entry()
            was_loaded = entry.state is ConfigEntryState.LOADED
            self.hass.config_entries.async_update_entry(entry, title=title, data=data)
            if not was_loaded:
                # A loaded entry reloads through its update listener; a failed one has none.
                self.hass.config_entries.async_schedule_reload(entry.entry_id)
            return self.async_abort(reason="reconfigure_successful")
        return self.async_create_entry(
            title=title,
            data=data,
            subentries=[
                ConfigSubentryData(
                    data=default_conversation_options(),
                    subentry_type=SUBENTRY_CONVERSATION,
                    title=DEFAULT_CONVERSATION_NAME,
                    unique_id=None,
                )
            ],
        )

    @classmethod
    @callback
    def async_get_supported_subentry_types(cls, config_entry: ConfigEntry) -> dict[str, type[ConfigSubentryFlow]]:
        """Conversation agents always; AI task entities where Home Assistant has the AI Task platform."""
        types: dict[str, type[ConfigSubentryFlow]] = {SUBENTRY_CONVERSATION: RkllmSubentryFlow}
        if HAS_AI_TASK:
            types[SUBENTRY_AI_TASK] = RkllmSubentryFlow
        return types


def filter_known_llm_apis(hass: HomeAssistant, selected: list[str]) -> list[str]:
    """Drop API ids that are no longer registered (an integration providing one was removed)."""
    known = {api.id for api in llm.async_get_apis(hass)}
    return [api_id for api_id in selected if api_id in known]


def subentry_schema(hass: HomeAssistant, subentry_type: str, is_new: bool) -> vol.Schema:
    """Fields of a conversation agent or an AI task entity."""
    schema: dict[vol.Marker, Any] = {}
    if is_new:
        schema[vol.Required(CONF_NAME)] = str
    if subentry_type == SUBENTRY_CONVERSATION:
        schema[vol.Optional(CONF_PROMPT)] = TemplateSelector()
        schema[vol.Optional(CONF_LLM_HASS_API)] = SelectSelector(
            SelectSelectorConfig(
                options=[SelectOptionDict(label=api.name, value=api.id) for api in llm.async_get_apis(hass)],
                multiple=True,
            )
        )
    schema.update(
        {
            vol.Required(CONF_TEMPERATURE): _number(0, 2, 0.05),
            vol.Required(CONF_TOP_P): _number(0, 1, 0.05),
            vol.Required(CONF_TOP_K): _number(1, 100),
            vol.Required(CONF_REPEAT_PENALTY): _number(0.5, 2, 0.05),
            vol.Required(CONF_MAX_NEW_TOKENS): _number(1, 8192),
            vol.Required(CONF_ENABLE_THINKING): BooleanSelector(),
        }
    )
    if subentry_type == SUBENTRY_CONVERSATION:
        schema[vol.Required(CONF_MAX_HISTORY)] = _number(0, 100)
        schema[vol.Required(CONF_MAX_TOOL_ITERATIONS)] = _number(1, 20)
        # A default, not only a suggestion: agents created before the option existed show (and keep) it on.
        schema[vol.Required(CONF_QUICK_CONFIRMATIONS, default=DEFAULT_QUICK_CONFIRMATIONS)] = BooleanSelector()
    return vol.Schema(schema)


def _normalise_subentry_input(user_input: Mapping[str, Any]) -> dict[str, Any]:
    """Ints for count fields; `llm_hass_api` kept as a list and omitted when none is selected."""
    data = dict(user_input)
    for key in (CONF_TOP_K, CONF_MAX_NEW_TOKENS, CONF_MAX_HISTORY, CONF_MAX_TOOL_ITERATIONS):
        if key in data:
            data[key] = int(data[key])
    apis = llm_api_ids(data.pop(CONF_LLM_HASS_API, None))
    if apis:
        data[CONF_LLM_HASS_API] = apis
    return data


class RkllmSubentryFlow(ConfigSubentryFlow):
    """Add or edit a conversation agent / AI task entity of a loaded runtime."""

    @property
    def _is_new(self) -> bool:
        return self.source == SOURCE_USER

    def _subentry_type_name(self) -> str:
        """The subentry type this flow handles (the flow's handler is `(entry_id, subentry_type)`)."""
        return str(self.handler[1])

    async def async_step_set_options(self, user_input: dict[str, Any] | None = None) -> SubentryFlowResult:
        """One form for new and existing subentries (new ones also get a name)."""
        entry = self._get_entry()
        if entry.state is not ConfigEntryState.LOADED:
            return self.async_abort(reason="entry_not_loaded")
        subentry_type = self._subentry_type_name()
        if user_input is None:
            if self._is_new:
                suggested: dict[str, Any] = {
                    CONF_NAME: DEFAULT_AI_TASK_NAME if subentry_type == SUBENTRY_AI_TASK else DEFAULT_CONVERSATION_NAME,
                    **(
                        default_ai_task_options()
                        if subentry_type == SUBENTRY_AI_TASK
                        else default_conversation_options()
                    ),
                }
            else:
                suggested = dict(self._get_reconfigure_subentry().data)
            if CONF_LLM_HASS_API in suggested:
                suggested[CONF_LLM_HASS_API] = filter_known_llm_apis(
                    self.hass, llm_api_ids(suggested[CONF_LLM_HASS_API])
                )
            return self.async_show_form(
                step_id="set_options",
                data_schema=self.add_suggested_values_to_schema(
                    subentry_schema(self.hass, subentry_type, self._is_new), suggested
                ),
            )
        data = _normalise_subentry_input(user_input)
        if self._is_new:
            title = str(data.pop(CONF_NAME))
            return self.async_create_entry(title=title, data=data)
        return self.async_update_and_abort(entry, self._get_reconfigure_subentry(), data=data)

    async_step_user = async_step_set_options
    async_step_reconfigure = async_step_set_options
