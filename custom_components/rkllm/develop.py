"""Development hook: with RKLLM_DEVELOP=1 the config flow also suggests and accepts the C emulator.

scripts/develop and the test suite set it on machines without an NPU; `rkllm_native.build` (the emulator's own
package) then says where the built library and the demo model are and which model files are the emulator's.
Unset - every real installation - these functions answer "nothing" without importing the emulator package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

DEVELOP_ENV: Final = "RKLLM_DEVELOP"


def development_enabled() -> bool:
    """True on a development machine (RKLLM_DEVELOP=1)."""
    return os.environ.get(DEVELOP_ENV) == "1"


def development_library() -> Path | None:
    """The built emulator library to suggest, or None (not a development machine, or not built)."""
    if not development_enabled():
        return None
    from rkllm_native import build

    return build.built_library("v12x")


def development_model(library_path: str) -> Path | None:
    """The emulator's demo model when `library_path` is the emulator library, else None."""
    library = development_library()
    if library is None or Path(library_path) != library:
        return None
    from rkllm_native import build

    return build.demo_model()


def is_development_model(path: str) -> bool:
    """True for an emulator model file on a development machine (it is neither `.rkllm` nor model-sized)."""
    if not development_enabled():
        return False
    from rkllm_native import build

    return build.is_emulator_model(path)
