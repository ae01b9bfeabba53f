"""Which Rockchip SoC this machine is, from the device tree (stdlib only, so the fetch command can use it too).

The kernel lists the board's compatible strings, most specific first and NUL-separated, in
`/proc/device-tree/compatible` (e.g. `radxa,rock-5b`, NUL, `rockchip,rk3588`, NUL). The runtime refuses a model
converted for another SoC (`E rkllm: the model's target_platform does not match the real platform`,
docs/runtime.md §7), so the config flow and `python -m rkllm_native.fetch` check a model's SoC against this
before downloading it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

DEVICE_TREE_COMPATIBLE: Final = "/proc/device-tree/compatible"

# The SoCs the RKLLM runtime supports (docs/runtime.md §7), in the lower-case spelling of rkllm-toolkit's
# `target_platform` and of model file names (`…-rk3588-w8a8.rkllm`).
SUPPORTED_SOCS: Final = ("rk3588", "rk3576", "rk3562", "rv1126b")

# Other Rockchip chips still get a name (RK3566, RV1106 …), so a message can say what the board is.
_ROCKCHIP_CHIP: Final = re.compile(r"^(rk\d{4}|rv\d{4}[a-z]?)")


def soc_from_compatible(raw: bytes) -> str | None:
    """The SoC named by a device-tree `compatible` list: `rockchip,rk3588s` → `rk3588`; None if not Rockchip.

    Supported SoCs are matched by prefix (RK3588S and RK3582 variants run RK3588 models [Inf]: the runtime's
    platform check is per SoC family, docs/runtime.md §7); other Rockchip chips keep their own name.
    """
    other: str | None = None
    for entry in raw.split(b"\0"):
        vendor, _, chip = entry.decode("ascii", "replace").strip().lower().partition(",")
        if vendor != "rockchip":
            continue
        for soc in SUPPORTED_SOCS:
            if chip.startswith(soc):
                return soc
        if other is None and (match := _ROCKCHIP_CHIP.match(chip)) is not None:
            other = match.group(1)
    return other


def local_soc(compatible_path: str | Path = DEVICE_TREE_COMPATIBLE) -> str | None:
    """This machine's SoC (lower case, e.g. `rk3588`), or None without a (Rockchip) device tree."""
    try:
        raw = Path(compatible_path).read_bytes()
    except OSError:
        return None
    return soc_from_compatible(raw)


def soc_in_file_name(name: str) -> str | None:
    """The supported SoC a model file name names (`Qwen2.5-1.5B-Instruct-rk3588-w8a8.rkllm` → `rk3588`), or None.

    Model files carry their target platform in the name by convention (docs/runtime.md §7); a name without one
    says nothing, and the runtime checks the real target at load.
    """
    lowered = name.lower()
    found = [soc for soc in SUPPORTED_SOCS if re.search(rf"(?<![a-z0-9]){soc}(?![0-9])", lowered)]
    return found[0] if len(found) == 1 else None
