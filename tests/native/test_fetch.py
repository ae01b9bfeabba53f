"""The downloader and the fetch command against a local server with Hugging Face's and GitHub's URL shapes."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from demo.model_hub import ModelHub
from rkllm_native import catalog as fetch_catalog
from rkllm_native import fetch
from rkllm_native.catalog import Catalog, ModelEntry, SizeRange, load_catalog
from rkllm_native.detect import git_blob_sha1

REPO = "rkllm-test/Qwen2.5-1.5B-Instruct-RK3588"
REV = "0123456789abcdef0123456789abcdef01234567"
FILE = "Qwen2.5-1.5B-Instruct-rk3588-w8a8.rkllm"
PAYLOAD = bytes(range(256)) * 1200  # 307 kB, a few chunks of the hub and of the downloader
FAST = fetch.DownloadOptions(timeout_s=10, retries=3, retry_delays_s=(0.0,))


# The hub listens on 127.0.0.1; Home Assistant's test plugin blocks sockets unless a test asks for them.
pytestmark = pytest.mark.usefixtures("socket_enabled")


@pytest.fixture
def hub() -> Iterator[ModelHub]:
    with ModelHub() as server:
        yield server


def model_entry(hub: ModelHub, *, sha256: str | None = None, socs: tuple[str, ...] = ("rk3588",)) -> ModelEntry:
    hosted = hub.add_hf(REPO, REV, FILE, PAYLOAD)
    return ModelEntry(
        id="test-model",
        name="Test model",
        file=FILE,
        url=hub.hf_url(REPO, REV, FILE),
        page=f"https://huggingface.co/{REPO}/blob/{REV}/{FILE}",
        sha256=sha256 or hosted.sha256,
        size=SizeRange.exact(len(PAYLOAD)),
        socs=socs,
        toolkit_version="1.2.1",
        runtime_min="1.2.1",
        runtime_max="1.3.0",
        quantization="w8a8",
        context_length=4096,
        license="test",
        assist_tools=True,
    )


def mirrors(hub: ModelHub) -> dict[str, str]:
    return fetch_catalog.parse_mirrors(hub.mirrors)


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_a_catalogue_model_downloads_through_the_redirect_with_progress(hub: ModelHub, tmp_path: Path) -> None:
    entry = model_entry(hub)
    events: list[fetch.Progress] = []

    result = fetch.fetch_model(
        entry, tmp_path, soc="rk3588", progress=events.append, mirrors=mirrors(hub), options=FAST
    )

    assert result.path == tmp_path / FILE
    assert result.path.read_bytes() == PAYLOAD
    assert result.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert files_in(tmp_path) == [FILE]  # no .part left
    # Hugging Face's shape: resolve → 302 → CDN.
    assert [path.split("/")[1] for path, _ in hub.requests] == ["hf", "cdn"]
    downloads = [event for event in events if event.phase == "download"]
    assert downloads[0].done == 0
    assert downloads[-1].done == downloads[-1].total == len(PAYLOAD)
    assert [event.done for event in downloads] == sorted(event.done for event in downloads)
    assert len(downloads) > 2


def test_a_dropped_connection_resumes_with_a_range_request(hub: ModelHub, tmp_path: Path) -> None:
    entry = model_entry(hub)
    hub.drop_after[FILE] = 100_000

    result = fetch.fetch_model(entry, tmp_path, soc=None, mirrors=mirrors(hub), options=FAST)

    assert result.path.read_bytes() == PAYLOAD
    ranges = [header for path, header in hub.requests if path.startswith("/cdn/")]
    assert ranges == [None, "bytes=100000-"]


def test_a_partial_file_from_an_earlier_run_is_continued(hub: ModelHub, tmp_path: Path) -> None:
    entry = model_entry(hub)
    (tmp_path / (FILE + ".part")).write_bytes(PAYLOAD[:50_000])

    result = fetch.fetch_model(entry, tmp_path, soc=None, mirrors=mirrors(hub), options=FAST)

    assert result.path.read_bytes() == PAYLOAD
    assert [header for path, header in hub.requests if path.startswith("/cdn/")] == ["bytes=50000-"]


def test_a_model_whose_published_hash_differs_is_refused_before_downloading(hub: ModelHub, tmp_path: Path) -> None:
    entry = model_entry(hub, sha256="0" * 64)

    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_model(entry, tmp_path, soc=None, mirrors=mirrors(hub), options=FAST)

    assert caught.value.code == "checksum_mismatch"
    assert FILE in caught.value.message
    assert "nothing was downloaded" in caught.value.message
    assert files_in(tmp_path) == []


def test_corrupted_bytes_fail_the_checksum_and_the_file_is_removed(hub: ModelHub, tmp_path: Path) -> None:
    entry = model_entry(hub)  # the catalogue knows the real hash
    hub.add_hf(REPO, REV, FILE, PAYLOAD[:-1] + b"\x00")  # the CDN now sends other bytes of the same size …
    hub.published_sha256[FILE] = entry.sha256  # … while the redirect still claims the real hash

    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_model(entry, tmp_path, soc=None, mirrors=mirrors(hub), options=FAST)

    assert caught.value.code == "checksum_mismatch"
    assert f"{FILE} has SHA-256" in caught.value.message
    assert "removed" in caught.value.message
    assert files_in(tmp_path) == []


def test_not_enough_free_space_is_refused_before_the_first_byte(
    hub: ModelHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = model_entry(hub)
    monkeypatch.setattr(fetch, "free_bytes", lambda _directory: 10 * 1024 * 1024)

    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_model(entry, tmp_path, soc=None, mirrors=mirrors(hub), options=FAST)

    assert caught.value.code == "disk_full"
    assert str(tmp_path / FILE) in caught.value.message
    assert "free space" in caught.value.message
    assert files_in(tmp_path) == []


def test_a_disk_filling_up_during_the_download_is_disk_full_and_removes_the_part(
    hub: ModelHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = model_entry(hub)
    written: list[int] = []

    def fill_up(stream: IO[bytes], data: bytes) -> None:
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(data))
        stream.write(data)

    monkeypatch.setattr(fetch, "write_chunk", fill_up)

    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_model(entry, tmp_path, soc=None, mirrors=mirrors(hub), options=FAST)

    assert caught.value.code == "disk_full"
    assert FILE in caught.value.message
    assert files_in(tmp_path) == []


def test_cancel_stops_the_transfer_and_removes_the_partial_file(hub: ModelHub, tmp_path: Path) -> None:
    hub.bytes_per_s = 100_000  # three seconds for the whole file
    entry = model_entry(hub)
    cancel = threading.Event()

    def cancel_after_some_bytes(update: fetch.Progress) -> None:
        if update.done > 20_000:
            cancel.set()

    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_model(
            entry,
            tmp_path,
            soc=None,
            mirrors=mirrors(hub),
            progress=cancel_after_some_bytes,
            cancel=cancel,
            options=FAST,
        )

    assert caught.value.code == "cancelled"
    assert files_in(tmp_path) == []


def test_a_missing_file_is_not_found_naming_file_and_url(hub: ModelHub, tmp_path: Path) -> None:
    entry = model_entry(hub)
    hub.missing.add(f"/hf/{REPO}/resolve/{REV}/{FILE}")

    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_model(entry, tmp_path, soc=None, mirrors=mirrors(hub), options=FAST)

    assert caught.value.code == "not_found"
    assert "404" in caught.value.message
    assert FILE in caught.value.message
    assert files_in(tmp_path) == []


def test_a_model_for_another_soc_is_refused_without_a_request(hub: ModelHub, tmp_path: Path) -> None:
    entry = model_entry(hub)

    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_model(entry, tmp_path, soc="rk3576", mirrors=mirrors(hub), options=FAST)

    assert caught.value.code == "incompatible_soc"
    assert caught.value.message.startswith(f"{FILE} is converted for RK3588, but this board is RK3576")
    assert hub.requests == []


def test_an_unreachable_server_is_a_network_error_and_keeps_the_part(tmp_path: Path) -> None:
    with ModelHub() as closed:
        port = closed.port
    (tmp_path / (FILE + ".part")).write_bytes(b"partial")

    with pytest.raises(fetch.FetchError) as caught:
        fetch.download(f"http://127.0.0.1:{port}/hf/x/y/resolve/main/{FILE}", tmp_path / FILE, options=FAST)

    assert caught.value.code == "network"
    assert "check the network" in caught.value.message
    assert (tmp_path / (FILE + ".part")).read_bytes() == b"partial"  # kept for the next attempt to resume


def test_a_verified_file_already_in_place_is_not_downloaded_again(hub: ModelHub, tmp_path: Path) -> None:
    entry = model_entry(hub)
    fetch.fetch_model(entry, tmp_path, soc=None, mirrors=mirrors(hub), options=FAST)
    hub.requests.clear()

    again = fetch.fetch_model(entry, tmp_path, soc=None, mirrors=mirrors(hub), options=FAST)

    assert again.reused
    assert hub.requests == []


def runtime_release() -> fetch_catalog.RuntimeRelease:
    release = load_catalog(extra=[]).runtime("1.2.3")
    assert release is not None
    return release


def test_a_runtime_comes_from_its_release_and_is_checked_by_git_blob_sha1(hub: ModelHub, tmp_path: Path) -> None:
    library = b"\x7fELF" + b"\x00" * 4096 + b"RKLLM SDK (version: 1.2.3 | target: Linux | build: fixture)"
    release = runtime_release()
    hub.add_github("airockchip/rknn-llm", release.tag, release.files["linux-aarch64"], library)

    result = fetch.fetch_runtime(
        release,
        tmp_path,
        variant="linux-aarch64",
        mirrors=mirrors(hub),
        expected_blob_sha1=git_blob_sha1(library),
        options=FAST,
    )

    assert result.path == tmp_path / "runtime" / "1.2.3" / "librkllmrt.so"
    assert result.path.read_bytes() == library
    assert hub.requests == [(f"/gh/airockchip/rknn-llm/release-v1.2.3/{release.files['linux-aarch64']}", None)]


def test_a_runtime_that_is_not_the_official_build_is_removed(hub: ModelHub, tmp_path: Path) -> None:
    release = runtime_release()
    hub.add_github("airockchip/rknn-llm", release.tag, release.files["linux-aarch64"], b"\x7fELF not the real one")

    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_runtime(release, tmp_path, variant="linux-aarch64", mirrors=mirrors(hub), options=FAST)

    assert caught.value.code == "checksum_mismatch"
    assert "is not the official build (expected 0084abc34ab43359cfa9fd5d4c92ece34127dbd0)" in caught.value.message
    assert not fetch.runtime_path(tmp_path, "1.2.3").exists()
    assert files_in(tmp_path / "runtime" / "1.2.3") == []


def test_a_cpu_without_an_official_build_gets_no_runtime_download(tmp_path: Path) -> None:
    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_runtime(runtime_release(), tmp_path, variant="linux-riscv64", options=FAST)

    assert caught.value.code == "no_runtime_build"


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


@pytest.fixture
def command_catalog(hub: ModelHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelEntry:
    """A catalogue file with the hub's model, found by the command through RKLLM_FETCH_CATALOG/MIRRORS."""
    entry = model_entry(hub)
    document = {
        "format": 1,
        "runtimes": [],
        "models": [
            {
                "id": entry.id,
                "name": entry.name,
                "file": entry.file,
                "url": entry.url,
                "page": entry.page,
                "sha256": entry.sha256,
                "size_bytes": len(PAYLOAD),
                "socs": list(entry.socs),
                "toolkit_version": entry.toolkit_version,
                "runtime_min": entry.runtime_min,
                "runtime_max": entry.runtime_max,
                "quantization": entry.quantization,
                "license": entry.license,
                "assist_tools": True,
            }
        ],
    }
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    monkeypatch.setenv(fetch_catalog.ENV_EXTRA_CATALOGS, str(path))
    monkeypatch.setenv(fetch_catalog.ENV_MIRRORS, hub.mirrors)
    return entry


def test_the_command_downloads_a_model_and_says_where_it_is(
    command_catalog: ModelEntry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "models"

    code = fetch.main(["--model", command_catalog.id, "--dir", str(target), "--no-runtime", "--soc", "rk3588"])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines() == [
        f"model: {target / FILE}",
        f"remote worker: pass --models-dir {target} so it may open these files",
    ]
    # Not a terminal: one progress line per 10 %, ending at 100 %.
    lines = err.splitlines()
    assert lines[-1] == f"downloading {FILE}: 307.20 kB of 307.20 kB 100.0 %"
    assert len(lines) >= 3
    assert (target / FILE).read_bytes() == PAYLOAD


def test_the_command_refuses_a_model_for_another_soc(
    command_catalog: ModelEntry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = fetch.main(["--model", command_catalog.id, "--dir", str(tmp_path / "m"), "--no-runtime", "--soc", "rk3576"])

    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err == (
        f"rkllm fetch: error: {FILE} is converted for RK3588, but this board is RK3576: the runtime would refuse it; "
        "pick a model converted for RK3576\n"
    )


def test_the_command_refuses_a_runtime_download_for_a_cpu_rockchip_does_not_build_for(
    command_catalog: ModelEntry, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("platform.machine", lambda: "x86_64")

    code = fetch.main(["--model", command_catalog.id, "--dir", str(tmp_path / "m"), "--soc", "rk3588"])

    _out, err = capsys.readouterr()
    assert code == 1
    assert "publishes no librkllmrt build for this CPU (x86_64)" in err
    assert "--no-runtime" in err
    assert not (tmp_path / "m").exists()  # refused before any download


def test_the_command_lists_the_models_for_this_board_first(
    command_catalog: ModelEntry, capsys: pytest.CaptureFixture[str]
) -> None:
    code = fetch.main(["--list", "--soc", "rk3576"])

    out, _err = capsys.readouterr()
    assert code == 0
    assert out.startswith("board SoC: RK3576\n")
    assert f"{command_catalog.id}\n" in out
    assert "(not for this board: RK3576)" in out
    assert "source: https://huggingface.co/c01zaut/Qwen2.5-1.5B-Instruct-RK3588-1.1.4/blob/main/" in out
    assert "runtimes: 1.2.1 (release-v1.2.1), 1.2.2 (release-v1.2.2), 1.2.3 (release-v1.2.3)" in out


def test_the_command_needs_something_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        fetch.main([])
    assert exited.value.code == 2
    assert "give --list, --model ID, --url URL or --runtime VERSION" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------


def test_the_shipped_catalogue_cites_a_page_a_hash_and_a_size_for_every_model() -> None:
    shipped: Catalog = load_catalog(extra=[])
    assert shipped.models
    for entry in shipped.models:
        assert entry.page.startswith("https://huggingface.co/")
        assert entry.url.startswith("https://huggingface.co/")
        assert "/resolve/" in entry.url
        assert entry.url.endswith("/" + entry.file)
        assert len(entry.sha256) == 64
        assert entry.size.low > 16 * 1024 * 1024
        assert entry.runtimes(), entry.id
    # Every runtime release is verifiable against the official blob table for the boards' CPU.
    for release in shipped.runtimes:
        assert release.blob_sha1("linux-aarch64") is not None
        assert release.url("linux-aarch64").startswith("https://raw.githubusercontent.com/airockchip/rknn-llm/")


def test_offered_models_follow_the_board_and_the_supported_runtimes() -> None:
    shipped = load_catalog(extra=[])
    rk3588 = [entry.id for entry in fetch_catalog.offered_models(shipped, "rk3588")]
    assert "qwen2.5-1.5b-instruct-rk3588-w8a8" in rk3588
    assert fetch_catalog.offered_models(shipped, "rk3576") == []
    assert len(fetch_catalog.offered_models(shipped, None)) == len(shipped.models)
    too_new = dataclasses.replace(shipped.models[0], toolkit_version="1.4.0", runtime_max="1.4.0")
    assert fetch_catalog.offered_models(Catalog((too_new,), shipped.runtimes), None) == []


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("2.04 GB", 2_035_000_000, 2_049_999_999),
        ("1.8 GB", 1_750_000_000, 1_899_999_999),
        ("783 MB", 782_500_000, 783_999_999),
        ("1234 Bytes", 1234, 1234),
    ],
)
def test_a_published_size_covers_what_its_display_can_stand_for(text: str, low: int, high: int) -> None:
    size = SizeRange.parse(text)
    assert (size.low, size.high) == (low, high)


def test_the_runtime_a_newer_toolkit_needs_is_read_from_the_runtimes_refusal() -> None:
    line = (
        "E rkllm: The rkllm-runtime version is lower than the rkllm-toolkit version. Please update rkllm-runtime "
        "to 1.3.0 or higher."
    )
    assert fetch_catalog.toolkit_version_refused(line) == "1.3.0"
    assert fetch_catalog.toolkit_version_refused("E rkllm: invalid rkllm model!") is None
    release = load_catalog(extra=[]).runtime_at_least("1.2.2")
    assert release is not None
    assert release.version == "1.2.2"
    assert load_catalog(extra=[]).runtime_at_least("1.9.0") is None
    assert fetch_catalog.toolkit_newer_than_runtime("1.3.0", "1.2.3")
    assert not fetch_catalog.toolkit_newer_than_runtime("1.2.1", "1.2.3")
    assert not fetch_catalog.toolkit_newer_than_runtime(None, "1.2.3")
