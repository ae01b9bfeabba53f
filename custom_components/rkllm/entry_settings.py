"""An entry's stored settings: the engine configuration they make, the model id, the model file check.

Shared by setup (`__init__.py`) and the config flow, so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from homeassistant.util import slugify

from rkllm_engine.engine import EngineConfig, WorkerLocation

from .const import (
    ABI_PROFILE_AUTO,
    CONF_ABI_PROFILE,
    CONF_CONTEXT_LENGTH,
    CONF_CPU_CORES,
    CONF_LIBRARY_PATH,
    CONF_MODEL_PATH,
    CONF_NPU_DOMAIN_ID,
    CONF_PLATFORM,
    CONF_SLOTS,
    CONF_WATCHDOG_S,
    CONF_WORKER,
    CONF_WORKER_ENV,
    CONF_WORKER_HOST,
    CONF_WORKER_PORT,
    CONF_WORKER_SECRET,
    CONF_WORKER_TLS_FINGERPRINT,
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_CPU_CORES,
    DEFAULT_NPU_DOMAIN_ID,
    DEFAULT_WATCHDOG_S,
    SLOTS_AUTO,
    WORKER_REMOTE,
)
from .develop import is_development_model

# The smallest published RKLLM models (Qwen2 0.5B w8a8) are about 0.5 GB. A ".rkllm" file under 16 MiB is a
# placeholder, an HTML error page saved under the model's name, or a truncated download - never a model.
MIN_RKLLM_MODEL_BYTES: Final = 16 * 1024 * 1024


def engine_config_from_entry(data: Mapping[str, Any]) -> EngineConfig:
    """Translate the entry's stored settings into the engine's configuration."""
    profile = data.get(CONF_ABI_PROFILE, ABI_PROFILE_AUTO)
    worker = WorkerLocation()
    if data.get(CONF_WORKER) == WORKER_REMOTE:
        worker = WorkerLocation(
            host=data[CONF_WORKER_HOST],
            port=int(data[CONF_WORKER_PORT]),
            secret=data[CONF_WORKER_SECRET],
            tls_fingerprint=data.get(CONF_WORKER_TLS_FINGERPRINT) or None,
        )
    context_length = int(data.get(CONF_CONTEXT_LENGTH, DEFAULT_CONTEXT_LENGTH))
    platform = str(data.get(CONF_PLATFORM) or "").upper() or None
    return EngineConfig(
        library_path=data[CONF_LIBRARY_PATH],
        model_path=data[CONF_MODEL_PATH],
        profile=None if profile == ABI_PROFILE_AUTO else profile,
        context_length=context_length,
        # The runtime-wide cap (the only one on 1.2.x); each agent asks for its own smaller budget per request.
        max_new_tokens=max(1, context_length // 2),
        cpu_cores=int(data.get(CONF_CPU_CORES, DEFAULT_CPU_CORES)),
        npu_domain_id=int(data.get(CONF_NPU_DOMAIN_ID, DEFAULT_NPU_DOMAIN_ID)),
        platform=platform,
        worker=worker,
        env={str(key): str(value) for key, value in dict(data.get(CONF_WORKER_ENV) or {}).items()},
        watchdog_min_s=float(data.get(CONF_WATCHDOG_S, DEFAULT_WATCHDOG_S)),
        slots=None if str(data.get(CONF_SLOTS, SLOTS_AUTO)) == SLOTS_AUTO else int(data[CONF_SLOTS]),
    )


def model_id_for(model_path: str) -> str:
    """The model id clients see in /v1/models: the slug of the model file's stem."""
    return slugify(Path(model_path).stem, separator="-") or "rkllm"


def model_file_problem(path: str) -> tuple[str, str] | None:
    """(form error key, one-line reason) when `path` cannot be an RKLLM model, else None. Blocking I/O.

    [Inf] A real model has no documented magic number we could check without the runtime (the runtime's own
    check prints "invalid rknn llm model magic", docs/runtime.md §7), so the check is: a readable regular file
    with the `.rkllm` extension and at least MIN_RKLLM_MODEL_BYTES (on a development machine the emulator's model
    files pass too: develop.py).
    """
    model = Path(path)
    if not path or not model.is_file():
        return "model_not_found", "no such file"
    try:
        with model.open("rb") as stream:
            stream.read(1)  # a file the worker could not read fails here, with the reason
        size = model.stat().st_size
    except OSError as err:
        return "model_not_found", f"not readable: {err.strerror or err}"
    if is_development_model(path):
        return None
    if model.suffix.lower() != ".rkllm":
        return "not_rkllm_model", "not a .rkllm file (convert the model with rkllm-toolkit)"
    if size < MIN_RKLLM_MODEL_BYTES:
        return "not_rkllm_model", f"only {size} bytes: a truncated download or not a model"
    return None
