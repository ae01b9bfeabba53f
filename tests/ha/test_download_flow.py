"""The config flow's download path: catalogue → progress → a loaded entry, against a local stand-in for the sites."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from homeassistant.config_entries import SOURCE_USER, ConfigEntryState
from homeassistant.core import Event, HomeAssistant
from homeassistant.data_entry_flow import EVENT_DATA_ENTRY_FLOW_PROGRESSED, FlowResultType

from custom_components.rkllm import config_flow
from custom_components.rkllm.const import CONF_LIBRARY_PATH, CONF_MODEL_PATH, CONF_MODEL_SOURCE, CONF_PLATFORM, DOMAIN
from custom_components.rkllm.download_flow import CONF_DOWNLOAD_MODEL, CONF_DOWNLOAD_URL, CUSTOM_MODEL
from demo.model_hub import HostedFile, ModelHub, demo_model_bytes
from rkllm_native import catalog as fetch_catalog
from rkllm_native import detect, fetch
from rkllm_native.build import emulator_library
from tests.ha.conftest import ASSIST_MODEL, FAST_ENV
from tests.ha_shared import device_of

REPO = "rkllm-test/Qwen2.5-1.5B-Assist-RK3588"
REV = "main"
FILE = "qwen2.5-1.5b-assist-rk3588-w8a8.rkllm"
MODEL_ID = "test-qwen2.5-1.5b-assist"
PAGE = f"https://huggingface.co/{REPO}/blob/{REV}/{FILE}"
TIMEOUT_S = 60.0

pytestmark = pytest.mark.usefixtures("socket_enabled")


@pytest.fixture(autouse=True)
def fast_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries created by the flow have no dev env; the worker inherits this one instead."""
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def config_dir(hass: HomeAssistant, tmp_path: Path) -> Path:
    """Home Assistant's configuration folder for this test (downloads go to its rkllm/)."""
    folder = tmp_path / "config"
    folder.mkdir()
    hass.config.config_dir = str(folder)
    return folder


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The device tree's compatible list the flow reads: an RK3588 board unless a test rewrites it."""
    compatible = tmp_path / "compatible"
    compatible.write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    monkeypatch.setattr(config_flow, "DEVICE_TREE_COMPATIBLE", str(compatible))
    return compatible


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModelHub]:
    """The stand-in sites, with a catalogue naming the test model by its huggingface.co URL."""
    with ModelHub() as server:
        model = tmp_path / "assist.model"
        model.write_text(ASSIST_MODEL, encoding="utf-8")
        hosted = server.add_hf(REPO, REV, FILE, demo_model_bytes(model, 200_000))
        catalog = tmp_path / "catalog.json"
        catalog.write_text(json.dumps(catalog_document(server, hosted)), encoding="utf-8")
        monkeypatch.setenv(fetch_catalog.ENV_EXTRA_CATALOGS, str(catalog))
        monkeypatch.setenv(fetch_catalog.ENV_MIRRORS, server.mirrors)
        yield server


def catalog_document(hub: ModelHub, hosted: HostedFile) -> dict[str, Any]:
    return {
        "format": 1,
        "runtimes": [],
        "models": [
            {
                "id": MODEL_ID,
                "name": "Test Qwen2.5 1.5B Assist",
                "file": hosted.name,
                "url": hub.hf_url(REPO, REV, hosted.name),
                "page": PAGE,
                "sha256": hosted.sha256,
                "size_bytes": len(hosted.data),
                "socs": ["rk3588"],
                "toolkit_version": "1.2.1",
                "runtime_min": "1.2.1",
                "runtime_max": "1.3.0",
                "quantization": "w8a8",
                "license": "test",
                "assist_tools": True,
            }
        ],
    }


async def wait_until(condition: Callable[[], bool], limit_s: float = TIMEOUT_S) -> None:
    """Poll a file-system condition (no event tells when a file appears or goes); fails after `limit_s`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not condition():
        assert loop.time() - start < limit_s, f"condition not met within {limit_s} s"
        await asyncio.sleep(0.02)


async def open_download_form(hass: HomeAssistant) -> dict[str, Any]:
    result = await hass.config_entries.flow.async_init(DOMAIN, context={"source": SOURCE_USER})
    assert result["type"] is FlowResultType.MENU
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {"next_step_id": "download"})
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "download"
    return dict(result)


def offered_ids(result: dict[str, Any]) -> list[str]:
    selector = result["data_schema"].schema[CONF_DOWNLOAD_MODEL]
    return [option["value"] for option in selector.config["options"]]


class Frontend:
    """Does what the frontend does on a progress step: on each "progressed" event, fetch the flow's state again."""

    def __init__(self, hass: HomeAssistant, flow_id: str) -> None:
        self.hass = hass
        self.flow_id = flow_id
        self.results: list[dict[str, Any]] = []
        self.fractions: list[float] = []
        self.finished = asyncio.Event()
        self._lock = asyncio.Lock()
        self._unsubscribe = [
            hass.bus.async_listen(EVENT_DATA_ENTRY_FLOW_PROGRESSED, self._async_progressed),
            hass.bus.async_listen("data_entry_flow_progress_update", self._async_fraction),  # newer HA: the bar
        ]

    async def _async_progressed(self, event: Event) -> None:
        if event.data.get("flow_id") != self.flow_id:
            return
        async with self._lock:
            if self.finished.is_set():
                return
            result = dict(await self.hass.config_entries.flow.async_configure(self.flow_id))
            self.results.append(result)
            if result["type"] is not FlowResultType.SHOW_PROGRESS:
                self.finished.set()

    async def _async_fraction(self, event: Event) -> None:
        if event.data.get("flow_id") == self.flow_id:
            self.fractions.append(float(event.data["progress"]))

    async def wait(self) -> dict[str, Any]:
        async with asyncio.timeout(TIMEOUT_S):
            await self.finished.wait()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        return self.results[-1]

    def progress_texts(self) -> list[str]:
        return [
            result["description_placeholders"]["progress"]
            for result in self.results
            if result["type"] is FlowResultType.SHOW_PROGRESS
        ]


async def start_download(hass: HomeAssistant, user_input: dict[str, Any]) -> tuple[dict[str, Any], Frontend]:
    form = await open_download_form(hass)
    frontend = Frontend(hass, form["flow_id"])
    result = dict(await hass.config_entries.flow.async_configure(form["flow_id"], user_input))
    return result, frontend


@pytest.mark.usefixtures("board")
async def test_a_catalogue_model_downloads_with_progress_and_the_entry_loads(
    hass: HomeAssistant, hub: ModelHub, config_dir: Path
) -> None:
    hub.bytes_per_s = 200_000  # about a second: several progress refreshes
    form = await open_download_form(hass)
    assert offered_ids(form) == [
        "qwen2.5-1.5b-instruct-rk3588-w8a8",
        "qwen2.5-3b-instruct-rk3588-w8a8-g128",
        MODEL_ID,
        CUSTOM_MODEL,
    ]
    assert form["description_placeholders"]["soc"] == "RK3588"
    assert PAGE in form["description_placeholders"]["sources"]

    frontend = Frontend(hass, form["flow_id"])
    result = await hass.config_entries.flow.async_configure(form["flow_id"], {CONF_DOWNLOAD_MODEL: MODEL_ID})
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    assert result["step_id"] == "downloading"
    assert result["progress_action"] == "download"
    assert result["description_placeholders"]["file"] == FILE
    final = await frontend.wait()

    assert final["type"] is FlowResultType.CREATE_ENTRY
    texts = frontend.progress_texts()
    assert any(text.endswith("%)") for text in texts), texts
    percents = [int(text.rsplit("(", 1)[1].rstrip(" %)")) for text in texts if text.endswith("%)")]
    assert percents == sorted(percents)
    if hasattr(config_flow.RkllmConfigFlow, "async_update_progress"):  # newer Home Assistant: a real bar too
        assert frontend.fractions
        assert frontend.fractions == sorted(frontend.fractions)

    model_path = config_dir / "rkllm" / FILE
    assert final["data"][CONF_MODEL_PATH] == str(model_path)
    assert final["data"][CONF_LIBRARY_PATH] == str(emulator_library("v12x"))  # the installed runtime runs it
    assert final["data"][CONF_PLATFORM] == "rk3588"
    assert final["data"][CONF_MODEL_SOURCE] == PAGE
    assert sorted(path.name for path in model_path.parent.iterdir()) == [FILE]

    entry = final["result"]
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    device = device_of(hass, entry.entry_id, entry.entry_id)
    assert device is not None
    assert device.model == f"{model_path.stem} (rkllm-toolkit 1.2.1)"
    assert device.sw_version == "1.2.3"
    assert device.configuration_url == PAGE


@pytest.mark.usefixtures("board")
async def test_a_dropped_connection_resumes_inside_the_flow(
    hass: HomeAssistant, hub: ModelHub, config_dir: Path
) -> None:
    hub.drop_after[FILE] = 50_000
    result, frontend = await start_download(hass, {CONF_DOWNLOAD_MODEL: MODEL_ID})
    assert result["type"] is FlowResultType.SHOW_PROGRESS

    final = await frontend.wait()

    assert final["type"] is FlowResultType.CREATE_ENTRY
    assert [header for path, header in hub.requests if path.startswith("/cdn/")] == [None, "bytes=50000-"]
    assert (config_dir / "rkllm" / FILE).stat().st_size == 200_000


@pytest.mark.usefixtures("board")
@pytest.mark.parametrize(
    ("fault", "error", "detail"),
    [
        ("missing", "download_not_found", f"{FILE} is no longer there"),
        ("changed_upstream", "download_checksum", "the catalogue entry is out of date; nothing was downloaded"),
        ("corrupted", "download_checksum", f"{FILE} has SHA-256"),
        ("no_space", "download_disk_full", f"not enough disk space for {{folder}}/{FILE}"),
        ("disk_fills_up", "download_disk_full", f"not enough disk space for {{folder}}/{FILE}"),
    ],
)
async def test_a_failed_download_returns_to_the_form_with_a_translated_error_naming_the_file(
    hass: HomeAssistant,
    hub: ModelHub,
    config_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    error: str,
    detail: str,
) -> None:
    if fault == "missing":
        hub.missing.add(f"/hf/{REPO}/resolve/{REV}/{FILE}")
    elif fault == "changed_upstream":
        hub.published_sha256[FILE] = "f" * 64
    elif fault == "corrupted":
        real = hub._hf[f"{REPO}/{REV}/{FILE}"]
        hub.add_hf(REPO, REV, FILE, real.data[:-1] + b"\n")
        hub.published_sha256[FILE] = real.sha256
    elif fault == "no_space":
        monkeypatch.setattr(fetch, "free_bytes", lambda _folder: 1024)
    elif fault == "disk_fills_up":

        def fill_up(_stream: object, _data: bytes) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(fetch, "write_chunk", fill_up)
    result, frontend = await start_download(hass, {CONF_DOWNLOAD_MODEL: MODEL_ID})
    assert result["type"] is FlowResultType.SHOW_PROGRESS

    form = await frontend.wait()

    assert form["type"] is FlowResultType.FORM
    assert form["step_id"] == "download"
    assert form["errors"] == {"base": error}
    assert detail.format(folder=config_dir / "rkllm") in form["description_placeholders"]["error_detail"]
    folder = config_dir / "rkllm"
    assert not folder.exists() or list(folder.iterdir()) == []  # nothing half-written is left
    assert hass.config_entries.async_entries(DOMAIN) == []


@pytest.mark.usefixtures("board")
async def test_closing_the_dialog_cancels_the_download_and_removes_the_partial_file(
    hass: HomeAssistant, hub: ModelHub, config_dir: Path
) -> None:
    hub.bytes_per_s = 20_000  # ten seconds for the whole file
    part = config_dir / "rkllm" / (FILE + ".part")
    result, _frontend = await start_download(hass, {CONF_DOWNLOAD_MODEL: MODEL_ID})
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    await wait_until(lambda: part.exists() and part.stat().st_size > 0)  # bytes are arriving

    hass.config_entries.flow.async_abort(result["flow_id"])

    await wait_until(lambda: not part.exists())  # the download thread saw the cancel and cleaned up
    await hass.async_block_till_done()
    assert not (config_dir / "rkllm" / FILE).exists()
    assert hass.config_entries.async_entries(DOMAIN) == []


async def test_a_board_with_another_soc_is_offered_no_model_for_rk3588(
    hass: HomeAssistant, hub: ModelHub, config_dir: Path, board: Path
) -> None:
    board.write_bytes(b"rockchip,rk3576-evb\0rockchip,rk3576\0")  # noqa: ASYNC240 - a tiny test file
    form = await open_download_form(hass)
    assert form["description_placeholders"]["soc"] == "RK3576"
    assert offered_ids(form) == [CUSTOM_MODEL]

    result = await hass.config_entries.flow.async_configure(
        form["flow_id"],
        {CONF_DOWNLOAD_MODEL: CUSTOM_MODEL, CONF_DOWNLOAD_URL: hub.hf_url(REPO, REV, FILE)},
    )

    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "download_incompatible_soc"}
    assert result["description_placeholders"]["error_detail"].startswith(
        f"{FILE} is named for RK3588, but this board is RK3576"
    )
    assert hub.requests == []  # refused before any download


@pytest.mark.usefixtures("board")
async def test_a_custom_url_downloads_with_its_sha256_checked(
    hass: HomeAssistant, hub: ModelHub, config_dir: Path
) -> None:
    hosted = hub._hf[f"{REPO}/{REV}/{FILE}"]
    result, frontend = await start_download(
        hass,
        {
            CONF_DOWNLOAD_MODEL: CUSTOM_MODEL,
            CONF_DOWNLOAD_URL: hub.hf_url(REPO, REV, FILE),
            "download_sha256": hosted.sha256.upper(),
        },
    )
    assert result["type"] is FlowResultType.SHOW_PROGRESS

    final = await frontend.wait()

    assert final["type"] is FlowResultType.CREATE_ENTRY
    assert final["data"][CONF_MODEL_SOURCE] == hub.hf_url(REPO, REV, FILE)


@pytest.mark.usefixtures("board")
async def test_without_an_installed_runtime_the_matching_release_is_downloaded_and_verified(
    hass: HomeAssistant, hub: ModelHub, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No librkllmrt on the machine: the newest release that runs the model is fetched and checked by blob SHA-1.

    The stand-in serves the emulator library as the aarch64 build of release-v1.3.0, and the official-hash table is
    told its hash: the flow cannot tell it from the real one, and the entry then loads with it.
    """
    monkeypatch.setattr(config_flow, "development_library", lambda: None)
    monkeypatch.setattr(fetch_catalog, "machine_variant", lambda machine=None: "linux-aarch64")
    library = await hass.async_add_executor_job(Path(emulator_library("v130")).read_bytes)
    release = fetch_catalog.load_catalog(extra=[]).runtime("1.3.0")
    assert release is not None
    hub.add_github("airockchip/rknn-llm", release.tag, release.files["linux-aarch64"], library)
    monkeypatch.setitem(detect.OFFICIAL_BLOB_SHA1["1.3.0"], "linux-aarch64", detect.git_blob_sha1(library))

    result, frontend = await start_download(hass, {CONF_DOWNLOAD_MODEL: MODEL_ID})
    assert result["type"] is FlowResultType.SHOW_PROGRESS
    final = await frontend.wait()

    assert final["type"] is FlowResultType.CREATE_ENTRY
    runtime = config_dir / "rkllm" / "runtime" / "1.3.0" / "librkllmrt.so"
    assert final["data"][CONF_LIBRARY_PATH] == str(runtime)
    assert runtime.read_bytes() == library
    await hass.async_block_till_done()
    assert final["result"].state is ConfigEntryState.LOADED
    assert final["result"].runtime_data.runtime_version == "1.3.0"


@pytest.mark.usefixtures("board")
async def test_a_runtime_that_is_not_the_official_build_is_refused(
    hass: HomeAssistant, hub: ModelHub, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_flow, "development_library", lambda: None)
    monkeypatch.setattr(fetch_catalog, "machine_variant", lambda machine=None: "linux-aarch64")
    release = fetch_catalog.load_catalog(extra=[]).runtime("1.3.0")
    assert release is not None
    hub.add_github("airockchip/rknn-llm", release.tag, release.files["linux-aarch64"], b"\x7fELF tampered")

    result, frontend = await start_download(hass, {CONF_DOWNLOAD_MODEL: MODEL_ID})
    form = await frontend.wait()

    assert result["type"] is FlowResultType.SHOW_PROGRESS
    assert form["errors"] == {"base": "download_checksum"}
    assert "librkllmrt.so (git-blob SHA-1" in form["description_placeholders"]["error_detail"]
    assert not (config_dir / "rkllm" / "runtime" / "1.3.0" / "librkllmrt.so").exists()


@pytest.mark.usefixtures("board")
async def test_a_machine_rockchip_publishes_no_runtime_for_is_told_before_downloading(
    hass: HomeAssistant, hub: ModelHub, config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_flow, "development_library", lambda: None)
    monkeypatch.setattr(fetch_catalog, "machine_variant", lambda machine=None: None)
    form = await open_download_form(hass)

    result = await hass.config_entries.flow.async_configure(form["flow_id"], {CONF_DOWNLOAD_MODEL: MODEL_ID})

    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "download_no_runtime_build"}
    assert "remote worker" in result["description_placeholders"]["error_detail"]
    assert hub.requests == []


@pytest.mark.usefixtures("board")
async def test_a_model_already_configured_is_not_downloaded_again(
    hass: HomeAssistant, hub: ModelHub, config_dir: Path
) -> None:
    _result, frontend = await start_download(hass, {CONF_DOWNLOAD_MODEL: MODEL_ID})
    assert (await frontend.wait())["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    hub.requests.clear()

    form = await open_download_form(hass)
    again = await hass.config_entries.flow.async_configure(form["flow_id"], {CONF_DOWNLOAD_MODEL: MODEL_ID})

    assert again["type"] is FlowResultType.ABORT
    assert again["reason"] == "already_configured"
    assert hub.requests == []
