"""Repair issues: problems a user must fix outside Home Assistant, raised where they are seen, cleared when fixed.

Setup problems (library missing or unsupported, model built for another SoC) are raised by `__init__` through
`async_raise_setup_issue` and cleared by `async_clear_setup_issues` once setup succeeds. While the entry runs,
`async_track_issues` watches the engine: its metrics (restarts, error state) and the runtime's own log lines,
the only place the runtime names driver and platform problems (docs/runtime.md §7, Appendix A).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from homeassistant.components.repairs import ConfirmRepairFlow, RepairsFlow
from homeassistant.config_entries import ConfigEntry
from homeassistant.core import CALLBACK_TYPE, HomeAssistant, callback
from homeassistant.data_entry_flow import FlowResult
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.event import async_call_later
from homeassistant.loader import IntegrationNotLoaded, async_get_loaded_integration

from rkllm_engine.types import EngineMetrics, EngineState
from rkllm_native import logparse

from .const import (
    CONF_MODEL_PATH,
    DOMAIN,
    ISSUE_LIBRARY_MISSING,
    ISSUE_LIBRARY_UNSUPPORTED,
    ISSUE_MODEL_LOAD_FAILED,
    ISSUE_MODEL_PLATFORM_MISMATCH,
    ISSUE_MODEL_TOOLKIT_NEWER,
    ISSUE_PATH_NOT_ALLOWED,
    LOGGER,
)
from .data import RkllmConfigEntry

ISSUE_NPU_DRIVER_TOO_OLD = "npu_driver_too_old"
ISSUE_WORKER_CRASH_LOOP = "worker_crash_loop"

# Raised by setup; a successful setup proves each of them fixed (the library loaded, the model initialised).
SETUP_ISSUES = (
    ISSUE_LIBRARY_MISSING,
    ISSUE_LIBRARY_UNSUPPORTED,
    ISSUE_MODEL_PLATFORM_MISMATCH,
    ISSUE_PATH_NOT_ALLOWED,
    ISSUE_MODEL_TOOLKIT_NEWER,
    ISSUE_MODEL_LOAD_FAILED,
)
ALL_ISSUES = (*SETUP_ISSUES, ISSUE_NPU_DRIVER_TOO_OLD, ISSUE_WORKER_CRASH_LOOP)
# Issues whose fix flow retries: it reloads the entry (the user fixed the cause, or wants a fresh worker).
RETRY_ISSUES = (ISSUE_WORKER_CRASH_LOOP, ISSUE_MODEL_LOAD_FAILED)

# Worker failures in a row without one request served: a loop, not a one-off crash.
CRASH_LOOP_RESTARTS = 3
# Issue data marking a crash loop the engine gave up on: setup refuses to start until the user retries.
GAVE_UP = "gave_up"

LOADED_STATES = frozenset({EngineState.IDLE, EngineState.GENERATING})
# While the worker (re)loads or has failed, its lines can change without any metric changing.
RECHECK_STATES = frozenset({EngineState.LOADING, EngineState.ERROR})
NOT_LOADED_RECHECK_S = 2.0

# The placeholders each issue's text uses; a missing one is filled so the text never shows a raw `{name}`.
_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    ISSUE_LIBRARY_MISSING: ("title", "path", "error"),
    ISSUE_LIBRARY_UNSUPPORTED: ("title", "path", "version", "error"),
    ISSUE_MODEL_PLATFORM_MISMATCH: ("title", "model", "platform", "error"),
    ISSUE_PATH_NOT_ALLOWED: ("title", "path", "flag", "worker", "error"),
    ISSUE_MODEL_TOOLKIT_NEWER: (
        "title",
        "model",
        "library",
        "toolkit_version",
        "runtime_version",
        "required_version",
        "release",
        "error",
    ),
    ISSUE_NPU_DRIVER_TOO_OLD: ("title", "driver_version", "required_version"),
    ISSUE_WORKER_CRASH_LOOP: ("title", "failures", "restarts", "error"),
    ISSUE_MODEL_LOAD_FAILED: ("title", "model", "error"),
}
UNKNOWN_PLACEHOLDER = "unknown"

_SEVERITIES: dict[str, ir.IssueSeverity] = {
    ISSUE_LIBRARY_MISSING: ir.IssueSeverity.ERROR,
    ISSUE_LIBRARY_UNSUPPORTED: ir.IssueSeverity.ERROR,
    ISSUE_MODEL_PLATFORM_MISMATCH: ir.IssueSeverity.ERROR,
    ISSUE_PATH_NOT_ALLOWED: ir.IssueSeverity.ERROR,
    ISSUE_MODEL_TOOLKIT_NEWER: ir.IssueSeverity.ERROR,
    ISSUE_NPU_DRIVER_TOO_OLD: ir.IssueSeverity.WARNING,
    ISSUE_WORKER_CRASH_LOOP: ir.IssueSeverity.ERROR,
    ISSUE_MODEL_LOAD_FAILED: ir.IssueSeverity.ERROR,
}


def issue_id_for(key: str, entry_id: str) -> str:
    """Issues are per entry: two runtimes on one host can have different problems."""
    return f"{key}_{entry_id}"


def _learn_more_url(hass: HomeAssistant) -> str | None:
    """The README's troubleshooting section, found from the manifest's documentation link."""
    try:
        documentation = async_get_loaded_integration(hass, DOMAIN).documentation
    except IntegrationNotLoaded:
        return None
    return f"{documentation.split('#', 1)[0]}#troubleshooting" if documentation else None


@callback
def _async_create_issue(
    hass: HomeAssistant, entry_id: str, key: str, placeholders: dict[str, str], *, gave_up: bool = False
) -> None:
    """Create or update one translated issue of this entry (creating an identical issue again is a no-op)."""
    fixable = key in RETRY_ISSUES
    placeholders = {name: placeholders.get(name) or UNKNOWN_PLACEHOLDER for name in _PLACEHOLDERS[key]}
    data: dict[str, str | int | float | None] = {"entry_id": entry_id}
    if gave_up:
        data[GAVE_UP] = 1
    ir.async_create_issue(
        hass,
        DOMAIN,
        issue_id_for(key, entry_id),
        data=data if fixable else None,
        is_fixable=fixable,
        learn_more_url=_learn_more_url(hass),
        severity=_SEVERITIES.get(key, ir.IssueSeverity.ERROR),
        translation_key=key,
        translation_placeholders=placeholders,
    )


@callback
def _async_delete_issue(hass: HomeAssistant, entry_id: str, key: str) -> None:
    """Delete one issue of this entry if it exists."""
    ir.async_delete_issue(hass, DOMAIN, issue_id_for(key, entry_id))


async def async_raise_setup_issue(
    hass: HomeAssistant, entry: ConfigEntry, key: str, placeholders: dict[str, str]
) -> None:
    """Raise a setup problem (`library_missing`, `library_unsupported`, `model_platform_mismatch`, …) for `entry`.

    `placeholders` fill the translated text: `library_missing` uses `path` and `error`; `library_unsupported`
    uses `path`, `version` and `error`; `model_platform_mismatch` uses `model`, `platform` and `error`;
    `path_not_allowed` uses `path`, `flag`, `worker` and `error`;
    `model_toolkit_newer` uses `model`, `library`, `toolkit_version`, `runtime_version`, `required_version`,
    `release` and `error`. The entry title is added; a missing value reads "unknown".
    """
    if key not in _PLACEHOLDERS:
        raise ValueError(f"unknown rkllm repair issue {key!r}: expected one of {', '.join(_PLACEHOLDERS)}")
    _async_create_issue(hass, entry.entry_id, key, {"title": entry.title, **placeholders})


async def async_clear_setup_issues(hass: HomeAssistant, entry: ConfigEntry) -> None:
    """Setup succeeded: the library loaded and the model initialised, so every setup issue is fixed."""
    for key in SETUP_ISSUES:
        _async_delete_issue(hass, entry.entry_id, key)


@callback
def async_take_gave_up(hass: HomeAssistant, entry_id: str) -> str | None:
    """The error of a crash loop the engine just gave up on, once: the setup that follows fails with it.

    The tracker reloads the entry when the engine gives up, so the entry shows an error state instead of staying
    loaded with a dead engine. Only that one setup is refused: the issue stays (without the mark) until a load
    succeeds, and any retry (the fix flow, a reload, a changed setting, a restart of Home Assistant) starts the
    engine again.
    """
    issue = ir.async_get(hass).async_get_issue(DOMAIN, issue_id_for(ISSUE_WORKER_CRASH_LOOP, entry_id))
    if issue is None or not (issue.data or {}).get(GAVE_UP):
        return None
    placeholders = dict(issue.translation_placeholders or {})
    _async_create_issue(hass, entry_id, ISSUE_WORKER_CRASH_LOOP, placeholders)
    return placeholders.get("error") or UNKNOWN_PLACEHOLDER


@callback
def async_delete_entry_issues(hass: HomeAssistant, entry_id: str) -> None:
    """The entry was removed: none of its issues can be fixed any more (call from `async_remove_entry`)."""
    for key in ALL_ISSUES:
        _async_delete_issue(hass, entry_id, key)


class EngineIssueTracker:
    """Turns engine snapshots and runtime lines into issues; every decision is re-made from what is seen now.

    Log rules look only at the lines of the latest `rkllm_init` (after its version line), so an old warning
    from before a driver upgrade cannot keep an issue alive, and nothing is decided once those lines have
    left the engine's ring. The worker flushes init output before it replies (rkllm_native/worker.py), so a
    loaded engine has already delivered every line its init printed.

    Runtime lines are not engine events: a restart that fails the same way as the previous attempt changes no
    metric. So while the engine is not loaded (LOADING, ERROR) the lines are re-read every
    `NOT_LOADED_RECHECK_S`; once it is loaded, metric changes alone drive the checks.
    """

    def __init__(self, hass: HomeAssistant, entry: RkllmConfigEntry) -> None:
        self._hass = hass
        self._entry_id = entry.entry_id
        self._title = entry.title
        self._model_path = str(entry.data.get(CONF_MODEL_PATH, ""))
        self._engine = entry.runtime_data.engine
        self._reload_scheduled = False
        self._cancel_recheck: CALLBACK_TYPE | None = None
        self._available = True  # tracking starts once setup has loaded the model

    @callback
    def evaluate(self, metrics: EngineMetrics) -> None:
        """Re-check every engine-driven issue against one snapshot (the engine's listener)."""
        self._log_availability(metrics)
        self._check_init_log(metrics)
        self._check_crash_loop(metrics)
        if metrics.state in RECHECK_STATES:
            if self._cancel_recheck is None:
                self._cancel_recheck = async_call_later(self._hass, NOT_LOADED_RECHECK_S, self._async_recheck)
        else:
            self.stop_rechecks()

    @callback
    def _async_recheck(self, _now: datetime) -> None:
        self._cancel_recheck = None
        self.evaluate(self._engine.metrics)

    @callback
    def stop_rechecks(self) -> None:
        """Cancel a pending re-read (the entry unloads, or the engine is loaded again)."""
        if self._cancel_recheck is not None:
            self._cancel_recheck()
            self._cancel_recheck = None

    def _log_availability(self, metrics: EngineMetrics) -> None:
        """Log once when the engine stops serving (crash, failed restart) and once when it serves again."""
        if metrics.state is EngineState.STOPPED:
            return  # a deliberate stop (unload) is not an outage
        available = metrics.state in LOADED_STATES
        if self._available and not available:
            LOGGER.warning(
                "The NPU engine of %s is unavailable (%s): %s",
                self._title,
                metrics.state.value,
                metrics.last_error or "no reason reported",
            )
        elif available and not self._available:
            LOGGER.info("The NPU engine of %s is available again", self._title)
        self._available = available

    def _check_init_log(self, metrics: EngineMetrics) -> None:
        init = logparse.latest_init_findings(self._engine.recent_log())
        if init is None:
            return
        loaded = metrics.state in LOADED_STATES

        if loaded:
            # [Inf] A platform mismatch makes rkllm_init fail (docs/runtime.md §7), so a loaded model matches this SoC.
            _async_delete_issue(self._hass, self._entry_id, ISSUE_MODEL_PLATFORM_MISMATCH)
        elif init.platform_mismatch:
            _async_create_issue(
                self._hass,
                self._entry_id,
                ISSUE_MODEL_PLATFORM_MISMATCH,
                {
                    "title": self._title,
                    "model": self._model_path,
                    "platform": init.platform or metrics.platform or "",
                    "error": init.platform_mismatch,
                },
            )

        driver = init.driver_version or metrics.driver_version
        required = init.required_driver_version
        if required is not None and not (driver and logparse.version_tuple(driver) >= logparse.version_tuple(required)):
            _async_create_issue(
                self._hass,
                self._entry_id,
                ISSUE_NPU_DRIVER_TOO_OLD,
                {"title": self._title, "driver_version": driver or "", "required_version": required},
            )
        elif loaded:
            # [Inf] The runtime prints the warning during init, before rkllm_init returns (docs/runtime.md §7);
            # a loaded runtime whose init printed none accepts this driver.
            _async_delete_issue(self._hass, self._entry_id, ISSUE_NPU_DRIVER_TOO_OLD)

    def _check_crash_loop(self, metrics: EngineMetrics) -> None:
        """The same figures as /health: failures in a row (`consecutive_failures`) and restarts since the load.

        When the engine gives up (state ERROR), the issue marks it and the entry is reloaded, so the entry shows
        the error state and setup refuses to start until the user retries (the fix flow) or changes a setting.
        """
        if metrics.state is EngineState.STOPPED:
            return  # unloading: nothing about the worker's health can be learned from a deliberate stop
        gave_up = metrics.state is EngineState.ERROR
        if gave_up or metrics.consecutive_failures >= CRASH_LOOP_RESTARTS:
            _async_create_issue(
                self._hass,
                self._entry_id,
                ISSUE_WORKER_CRASH_LOOP,
                {
                    "title": self._title,
                    "failures": str(metrics.consecutive_failures),
                    "restarts": str(metrics.restarts),
                    "error": metrics.last_error or self._engine.last_problem() or "not reported",
                },
                gave_up=gave_up,
            )
            if gave_up and not self._reload_scheduled:
                self._reload_scheduled = True
                LOGGER.error("%s: %s; the entry stops until it is retried", self._title, metrics.last_error)
                self._hass.config_entries.async_schedule_reload(self._entry_id)
        elif metrics.state in LOADED_STATES:
            _async_delete_issue(self._hass, self._entry_id, ISSUE_WORKER_CRASH_LOOP)


@callback
def async_track_issues(hass: HomeAssistant, entry: RkllmConfigEntry) -> Callable[[], None]:
    """Watch the entry's engine and keep its runtime issues in sync; returns the function that stops watching."""
    tracker = EngineIssueTracker(hass, entry)
    remove_listener = entry.runtime_data.engine.add_listener(tracker.evaluate)
    tracker.evaluate(entry.runtime_data.engine.metrics)

    @callback
    def stop_tracking() -> None:
        remove_listener()
        tracker.stop_rechecks()

    return stop_tracking


class RestartEngineRepairFlow(ConfirmRepairFlow):
    """Retry: reload the entry with a fresh worker, a fresh runtime and the failure counters at zero."""

    def __init__(self, entry_id: str, issue_key: str) -> None:
        super().__init__()
        self._entry_id = entry_id
        self._issue_key = issue_key

    async def async_step_confirm(self, user_input: dict[str, str] | None = None) -> FlowResult:
        """Reload on confirm; if it fails again, setup or the tracker raises the issue again."""
        if user_input is not None and self.hass.config_entries.async_get_entry(self._entry_id) is not None:
            _async_delete_issue(self.hass, self._entry_id, self._issue_key)
            await self.hass.config_entries.async_reload(self._entry_id)
        return await super().async_step_confirm(user_input)


async def async_create_fix_flow(
    hass: HomeAssistant, issue_id: str, data: dict[str, str | int | float | None] | None
) -> RepairsFlow:
    """The repairs platform entry point; issues that a retry can fix reload the entry (others need the user)."""
    entry_id = data.get("entry_id") if data else None
    for key in RETRY_ISSUES:
        if issue_id.startswith(f"{key}_") and isinstance(entry_id, str):
            return RestartEngineRepairFlow(entry_id, key)
    return ConfirmRepairFlow()
