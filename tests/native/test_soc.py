"""SoC detection from the device tree, shared by the engine, the config flow and the fetch command."""

from __future__ import annotations

from pathlib import Path

import pytest

from rkllm_engine import engine
from rkllm_native import soc


@pytest.mark.parametrize(
    ("compatible", "expected"),
    [
        (b"radxa,rock-5b\0rockchip,rk3588\0", "rk3588"),
        (b"friendlyelec,nanopi-r6s\0rockchip,rk3588s\0", "rk3588"),  # RK3588S runs RK3588 models
        (b"rockchip,rk3576-evb\0rockchip,rk3576\0", "rk3576"),
        (b"rockchip,rv1126b-evb\0rockchip,rv1126b\0", "rv1126b"),
        (b"pine64,quartz64-a\0rockchip,rk3566\0", "rk3566"),  # a Rockchip chip without RKLLM support keeps its name
        (b"raspberrypi,5-model-b\0brcm,bcm2712\0", None),
        (b"", None),
    ],
)
def test_the_soc_is_read_from_the_compatible_list(compatible: bytes, expected: str | None) -> None:
    assert soc.soc_from_compatible(compatible) == expected


def test_a_machine_without_a_device_tree_has_no_soc(tmp_path: Path) -> None:
    assert soc.local_soc(tmp_path / "absent") is None
    present = tmp_path / "compatible"
    present.write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    assert soc.local_soc(present) == "rk3588"


def test_the_engine_names_the_soc_the_way_the_runtime_prints_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "local_soc", lambda: "rk3576")
    assert engine.local_platform() == "RK3576"
    monkeypatch.setattr(engine, "local_soc", lambda: None)
    assert engine.local_platform() is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen2.5-1.5B-Instruct-rk3588-w8a8-opt-0-hybrid-ratio-0.0.rkllm", "rk3588"),
        ("qwen3-vl-2b-instruct_w8a8_rk3576.rkllm", "rk3576"),
        ("Qwen2.5-3B-Instruct_w4a16_RK3576.rkllm", "rk3576"),
        ("model.rkllm", None),
        ("rk3588-and-rk3576.rkllm", None),  # two SoCs named: no conclusion
        ("rk35880.rkllm", None),
    ],
)
def test_a_model_file_name_may_name_its_soc(name: str, expected: str | None) -> None:
    assert soc.soc_in_file_name(name) == expected
