"""Config-flow steps that download a compatible model (and, when none is installed, the runtime) with progress.

The user picks a catalogue model for this board (`rkllm_native.catalog.offered_models`: the SoC from the device
tree, runtimes this release supports) or gives a URL. An installed librkllmrt that runs the model is used as it
is; otherwise the rknn-llm release that runs it is fetched too. Files go to `<config>/rkllm/` through
`rkllm_native.fetch` (the same downloader as `python -m rkllm_native.fetch` on a board), run in an executor with a
progress callback and a cancel event: closing the dialog cancels the download and removes the partial file.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import voluptuous as vol
from homeassistant.config_entries import ConfigFlow, ConfigFlowResult
from homeassistant.core import callback
from homeassistant.data_entry_flow import UnknownFlow
from homeassistant.helpers.selector import (
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TextSelector,
)

from rkllm_native import catalog as fetch_catalog
from rkllm_native import detect, fetch
from rkllm_native import soc as soc_detect
from rkllm_native.catalog import Catalog, CatalogError, ModelEntry, RuntimeRelease
from rkllm_native.errors import RkllmError

from .compat import report_flow_progress
from .const import (
    ABI_PROFILE_AUTO,
    CONF_ABI_PROFILE,
    CONF_CONTEXT_LENGTH,
    CONF_CPU_CORES,
    CONF_LIBRARY_PATH,
    CONF_MODEL_PATH,
    CONF_MODEL_SOURCE,
    CONF_NPU_DOMAIN_ID,
    CONF_PLATFORM,
    CONF_WORKER,
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_CPU_CORES,
    DEFAULT_NPU_DOMAIN_ID,
    DEFAULT_PLATFORM,
    DOWNLOAD_FOLDER,
    LOGGER,
    PLATFORMS_SUPPORTED,
    WORKER_LOCAL,
)

CONF_DOWNLOAD_MODEL: Final = "download_model"
CONF_DOWNLOAD_URL: Final = "download_url"
CONF_DOWNLOAD_SHA256: Final = "download_sha256"
CUSTOM_MODEL: Final = "custom_url"

# FetchError.code → the download form's translated error.
_ERROR_KEYS: Final = {
    "network": "download_network",
    "not_found": "download_not_found",
    "http_error": "download_http_error",
    "checksum_mismatch": "download_checksum",
    "size_mismatch": "download_checksum",
    "disk_full": "download_disk_full",
    "incompatible_soc": "download_incompatible_soc",
    "incompatible_runtime": "download_incompatible_runtime",
    "no_runtime_build": "download_no_runtime_build",
    "bad_request": "download_bad_url",
    "cancelled": "download_failed",
}
# The progress text is refreshed at most this often (and on every whole percent); each refresh re-renders the step.
PROGRESS_REFRESH_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class DownloadPlan:
    """What the download step fetches and how the entry will use it, decided before the first byte."""

    folder: Path
    soc: str | None
    model: ModelEntry | None  # None: a custom URL
    url: str
    sha256: str | None
    library_path: str | None  # an installed librkllmrt that runs the model
    library_version: str | None
    runtime: RuntimeRelease | None  # fetched when no installed library runs the model
    variant: str | None

    @property
    def model_file(self) -> str:
        """The model's file name in the download folder."""
        return self.model.file if self.model is not None else fetch.file_name_from_url(self.url)

    @property
    def model_path(self) -> Path:
        """Where the model will be."""
        return self.folder / self.model_file

    @property
    def platform(self) -> str:
        """The entry's NPU platform: the board's SoC, else the one the model is converted for."""
        if self.soc in PLATFORMS_SUPPORTED:
            return str(self.soc)
        if self.model is not None:
            return self.model.socs[0]
        return soc_detect.soc_in_file_name(self.model_file) or DEFAULT_PLATFORM


def installed_runtime(candidates: list[str], accepts: Callable[[str], bool]) -> tuple[str, str] | None:
    """(path, version) of the first readable librkllmrt among `candidates` whose version `accepts`. Blocking."""
    for path in candidates:
        if not Path(path).is_file():
            continue
        try:
            identity = detect.check_library(path)
        except RkllmError:
            continue
        if accepts(identity.version):
            return path, identity.version
    return None


def plan_download(
    catalog: Catalog,
    *,
    folder: Path,
    soc: str | None,
    model_id: str,
    url: str | None,
    sha256: str | None,
    library_candidates: list[str],
) -> DownloadPlan:
    """Check SoC, runtime and URL before downloading; raises FetchError with the reason. Blocking (reads files)."""
    if soc is not None and soc not in PLATFORMS_SUPPORTED:
        raise fetch.FetchError(
            "incompatible_soc",
            f"this board is {soc.upper()}: the RKLLM runtime supports "
            f"{', '.join(item.upper() for item in PLATFORMS_SUPPORTED)} only",
        )
    entry: ModelEntry | None = None
    if model_id == CUSTOM_MODEL:
        if not url:
            raise fetch.FetchError("bad_request", "give the URL of the .rkllm file to download")
        name = fetch.file_name_from_url(url)
        named = soc_detect.soc_in_file_name(name)
        if soc is not None and named is not None and named != soc:
            raise fetch.FetchError(
                "incompatible_soc",
                f"{name} is named for {named.upper()}, but this board is {soc.upper()}: the runtime would refuse "
                f"it; use a model converted for {soc.upper()}",
                file=name,
            )

        def accepts(version: str) -> bool:
            return version in fetch_catalog.SUPPORTED_RUNTIMES

    else:
        entry = catalog.model(model_id)
        if entry is None:
            raise fetch.FetchError("bad_request", f"no model {model_id!r} in the catalogue")
        fetch.check_soc(entry, soc)
        url = entry.url
        sha256 = entry.sha256
        accepts = entry.runs_on_runtime
    installed = installed_runtime(library_candidates, accepts)
    variant = fetch_catalog.machine_variant()
    runtime: RuntimeRelease | None = None
    if installed is None:
        if entry is not None:
            runtime = catalog.runtime_for_model(entry, variant or "linux-aarch64")
        else:  # a custom model: the newest supported runtime (newer runtimes run older models, docs/runtime.md §7)
            runtime = catalog.runtime(fetch_catalog.SUPPORTED_RUNTIMES[-1])
        if runtime is None:
            raise fetch.FetchError(
                "incompatible_runtime",
                f"no librkllmrt release this rkllm supports runs {entry.file if entry else url}",
            )
        if variant is None or variant not in runtime.files:
            import platform

            raise fetch.FetchError(
                "no_runtime_build",
                f"no librkllmrt that runs this model is installed, and Rockchip publishes no build for this CPU "
                f"({platform.machine()}): install the runtime by hand, or run the model on a remote worker on the "
                "board (python -m rkllm_native.fetch there)",
                file=fetch.RUNTIME_FILE_NAME,
            )
    return DownloadPlan(
        folder=folder,
        soc=soc,
        model=entry,
        url=url,
        sha256=sha256.strip().lower() if sha256 else None,
        library_path=installed[0] if installed else None,
        library_version=installed[1] if installed else None,
        runtime=runtime,
        variant=variant,
    )


def run_download(
    plan: DownloadPlan, progress: fetch.ProgressCallback, cancel: threading.Event
) -> tuple[str, str]:
    """Fetch the model (and the runtime when the plan needs one); returns (library path, model path). Blocking."""
    if plan.model is not None:
        model = fetch.fetch_model(plan.model, plan.folder, soc=plan.soc, progress=progress, cancel=cancel)
    else:
        model = fetch.fetch_url(
            plan.url, plan.folder, sha256=plan.sha256, soc=plan.soc, progress=progress, cancel=cancel
        )
    if plan.runtime is None:
        # plan_download chose an installed library when it planned no runtime download.
        return str(plan.library_path), str(model.path)
    runtime = fetch.fetch_runtime(plan.runtime, plan.folder, variant=plan.variant, progress=progress, cancel=cancel)
    return str(runtime.path), str(model.path)


def _size_text(size: int | None) -> str:
    if size is None:
        return "?"
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size} B"


def progress_text(update: fetch.Progress | None) -> str:
    """`312.00 MB of 2.04 GB (15 %)` for the progress step's description."""
    if update is None:
        return "starting"
    fraction = update.fraction
    percent = "" if fraction is None else f" ({fraction * 100:.0f} %)"
    verb = "verified" if update.phase == "verify" else "downloaded"
    return f"{_size_text(update.done)} of {_size_text(update.total)} {verb}{percent}"


class DownloadConfigFlow(ConfigFlow):
    """The download steps of the rkllm config flow (`download` form, `downloading` progress, `download_finish`)."""

    _download_plan: DownloadPlan | None = None
    _download_task: asyncio.Task[tuple[str, str]] | None = None
    _download_cancel: threading.Event | None = None
    _download_error: fetch.FetchError | None = None
    _download_result: tuple[str, str] | None = None
    _download_progress: fetch.Progress | None = None
    _download_refreshed_at: float = 0.0
    _download_refreshed_percent: int = -1

    # Provided by the concrete flow (config_flow.RkllmConfigFlow).
    def _download_library_candidates(self) -> list[str]:
        raise NotImplementedError

    def _download_soc(self) -> str | None:
        raise NotImplementedError

    def _abort_if_model_configured(self, model_path: str) -> None:
        raise NotImplementedError

    async def _async_validate_local(self, data: Mapping[str, Any]) -> tuple[dict[str, str], str]:
        raise NotImplementedError

    def _async_finish(self, data: dict[str, Any]) -> ConfigFlowResult:
        raise NotImplementedError

    async def async_step_download(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Pick a catalogue model for this board, or a URL; check compatibility, then download."""
        errors: dict[str, str] = {}
        detail = ""
        try:
            catalog = await self.hass.async_add_executor_job(fetch_catalog.load_catalog)
        except CatalogError as err:
            LOGGER.error("The rkllm download catalogue cannot be read: %s", err)
            return self.async_abort(reason="catalog_invalid", description_placeholders={"error": str(err)})
        soc = await self.hass.async_add_executor_job(self._download_soc)
        offered = fetch_catalog.offered_models(catalog, soc)
        if self._download_error is not None:  # back from a failed download
            errors["base"] = _ERROR_KEYS.get(self._download_error.code, "download_failed")
            detail = self._download_error.message
            self._download_error = None
        suggested: Mapping[str, Any] = user_input or {}
        if user_input is not None:
            try:
                plan = await self.hass.async_add_executor_job(
                    partial(
                        plan_download,
                        catalog,
                        folder=Path(self.hass.config.path(DOWNLOAD_FOLDER)),
                        soc=soc,
                        model_id=str(user_input.get(CONF_DOWNLOAD_MODEL) or CUSTOM_MODEL),
                        url=(user_input.get(CONF_DOWNLOAD_URL) or "").strip() or None,
                        sha256=(user_input.get(CONF_DOWNLOAD_SHA256) or "").strip() or None,
                        library_candidates=self._download_library_candidates(),
                    )
                )
            except fetch.FetchError as err:
                errors["base"] = _ERROR_KEYS.get(err.code, "download_failed")
                detail = err.message
            else:
                self._abort_if_model_configured(str(plan.model_path))
                self._download_plan = plan
                return await self.async_step_downloading()
        elif offered:
            recommended = next((entry for entry in offered if entry.assist_tools), offered[0])
            suggested = {CONF_DOWNLOAD_MODEL: recommended.id}
        else:
            suggested = {CONF_DOWNLOAD_MODEL: CUSTOM_MODEL}
        options = [SelectOptionDict(value=entry.id, label=entry.label()) for entry in offered]
        options.append(SelectOptionDict(value=CUSTOM_MODEL, label="Another model, from the URL below"))
        schema = vol.Schema(
            {
                vol.Required(CONF_DOWNLOAD_MODEL): SelectSelector(
                    SelectSelectorConfig(options=options, mode=SelectSelectorMode.LIST)
                ),
                vol.Optional(CONF_DOWNLOAD_URL): TextSelector(),
                vol.Optional(CONF_DOWNLOAD_SHA256): TextSelector(),
            }
        )
        return self.async_show_form(
            step_id="download",
            data_schema=self.add_suggested_values_to_schema(schema, suggested),
            errors=errors,
            description_placeholders={
                "soc": soc.upper() if soc else "unknown (no Rockchip device tree)",
                "folder": self.hass.config.path(DOWNLOAD_FOLDER),
                "sources": "\n".join(f"- {entry.name}: {entry.page} (licence: {entry.license})" for entry in offered)
                or "- none for this board",
                "error_detail": detail,
            },
        )

    async def async_step_downloading(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """The progress step: runs the download task; done → the entry, failed → back to the form with the reason."""
        plan = self._download_plan
        if plan is None:  # only reachable by a hand-made request: the form step sets the plan
            return await self.async_step_download()
        if self._download_task is None:
            self._download_cancel = threading.Event()
            self._download_progress = None
            self._download_task = self.hass.async_create_task(
                self._async_download(plan, self._download_cancel), "rkllm download"
            )
        task = self._download_task
        if task.done():
            self._download_task = None
            if task.cancelled():
                return self.async_abort(reason="download_cancelled")
            error = task.exception()
            if error is not None:
                if not isinstance(error, fetch.FetchError):
                    LOGGER.error("Downloading %s failed unexpectedly", plan.url, exc_info=error)
                    error = fetch.FetchError("http_error", f"downloading {plan.model_file} failed: {error}")
                self._download_error = error
                return self.async_show_progress_done(next_step_id="download")
            self._download_result = task.result()
            return self.async_show_progress_done(next_step_id="download_finish")
        update = self._download_progress
        return self.async_show_progress(
            step_id="downloading",
            progress_action="download",
            progress_task=task,
            description_placeholders={
                "file": update.file if update is not None else plan.model_file,
                "progress": progress_text(update),
                "folder": str(plan.folder),
            },
        )

    async def async_step_download_finish(self, user_input: dict[str, Any] | None = None) -> ConfigFlowResult:
        """Both files are in place and verified: check them like a hand-entered setup, then create the entry."""
        plan, result = self._download_plan, self._download_result
        if plan is None or result is None:  # only reachable by a hand-made request
            return await self.async_step_download()
        library, model = result
        data: dict[str, Any] = {
            CONF_LIBRARY_PATH: library,
            CONF_MODEL_PATH: model,
            CONF_PLATFORM: plan.platform,
            CONF_CONTEXT_LENGTH: plan.model.context_length if plan.model else DEFAULT_CONTEXT_LENGTH,
            CONF_CPU_CORES: DEFAULT_CPU_CORES,
            CONF_NPU_DOMAIN_ID: DEFAULT_NPU_DOMAIN_ID,
            CONF_ABI_PROFILE: ABI_PROFILE_AUTO,
            CONF_WORKER: WORKER_LOCAL,
            CONF_MODEL_SOURCE: plan.model.page if plan.model else plan.url,
        }
        errors, detail = await self._async_validate_local(data)
        if errors:
            field, key = next(iter(errors.items()))
            self._download_error = fetch.FetchError(
                "incompatible_runtime", f"{key} ({field}): {detail}", file=plan.model_file
            )
            return await self.async_step_download()
        return self._async_finish(data)

    async def _async_download(self, plan: DownloadPlan, cancel: threading.Event) -> tuple[str, str]:
        """Run the blocking download in an executor; a cancelled task tells the thread to stop and clean up."""
        loop = asyncio.get_running_loop()

        def progress(update: fetch.Progress) -> None:
            loop.call_soon_threadsafe(self._async_on_progress, update)

        try:
            return await self.hass.async_add_executor_job(run_download, plan, progress, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    @callback
    def _async_on_progress(self, update: fetch.Progress) -> None:
        """Keep the newest figures; move the bar and refresh the text about once a second and per whole percent."""
        self._download_progress = update
        fraction = update.fraction
        if fraction is None:
            return
        percent = int(fraction * 100)
        now = time.monotonic()
        if percent == self._download_refreshed_percent and now - self._download_refreshed_at < PROGRESS_REFRESH_S:
            return
        self._download_refreshed_percent = percent
        self._download_refreshed_at = now
        report_flow_progress(self, fraction)
        self.hass.async_create_task(self._async_refresh_progress(), "rkllm download progress")

    async def _async_refresh_progress(self) -> None:
        """Re-run the progress step so its text shows the new figures (the manager tells the frontend)."""
        task = self._download_task
        if task is None or task.done():
            return  # finishing is Home Assistant's own call once the task is done
        with contextlib.suppress(UnknownFlow):
            await self.hass.config_entries.flow.async_configure(self.flow_id)

    @callback
    def async_remove(self) -> None:
        """The dialog was closed or the flow aborted: stop the download (the thread removes the partial file)."""
        if self._download_cancel is not None:
            self._download_cancel.set()
        super().async_remove()

