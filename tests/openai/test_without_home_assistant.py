"""The OpenAI translation imports no Home Assistant, so these tests (and a user of the package) need none."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT

CHECK = """
import sys
import rkllm_openai.schemas, rkllm_openai.stream
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("homeassistant", "custom_components"))
print(",".join(loaded))
"""


def test_the_translation_imports_without_home_assistant() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing rkllm_openai loaded {result.stdout.strip()}"
