"""Puts the packages a release zip vendors on `sys.path` (scripts/build_release).

`rkllm_native`, `rkllm_engine` and `rkllm_openai` are not on PyPI, so the release zip carries them in this
directory. A checkout or a pip install has them on `sys.path` already, and then this module changes nothing.
The worker child process finds the same directory: the engine's client puts the parent of `rkllm_native` on its
PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Final

VENDOR_DIR: Final = Path(__file__).resolve().parent
VENDORED_PACKAGES: Final = ("rkllm_native", "rkllm_engine", "rkllm_openai")


def vendored_packages_present() -> bool:
    """True in a release zip: the packages sit next to this file."""
    return all((VENDOR_DIR / name / "__init__.py").is_file() for name in VENDORED_PACKAGES)


def use_vendored_packages() -> bool:
    """Add this directory to sys.path when a package is missing and the zip carries it; True when added."""
    if not vendored_packages_present() or str(VENDOR_DIR) in sys.path:
        return False
    if all(importlib.util.find_spec(name) is not None for name in VENDORED_PACKAGES):
        return False
    # First on the path, so both packages come from the same release even if one is installed elsewhere.
    sys.path.insert(0, str(VENDOR_DIR))
    return True


use_vendored_packages()
