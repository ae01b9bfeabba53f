"""Constants of the rkllm integration: the domain, config keys and their defaults."""

from __future__ import annotations

import logging
from typing import Final

DOMAIN: Final = "rkllm"
LOGGER = logging.getLogger(__package__)

# Config entry (one runtime + one model).
CONF_LIBRARY_PATH: Final = "library_path"
CONF_MODEL_PATH: Final = "model_path"
CONF_PLATFORM: Final = "platform"
CONF_CONTEXT_LENGTH: Final = "context_length"
CONF_CPU_CORES: Final = "cpu_cores"
CONF_WATCHDOG_S: Final = "watchdog_s"
CONF_SLOTS: Final = "slots"
CONF_NPU_DOMAIN_ID: Final = "npu_domain_id"
CONF_ABI_PROFILE: Final = "abi_profile"
CONF_WORKER: Final = "worker"
CONF_WORKER_HOST: Final = "worker_host"
CONF_WORKER_PORT: Final = "worker_port"
CONF_WORKER_SECRET: Final = "worker_secret"  # noqa: S105 - a config key, not a secret
# SHA-256 fingerprint of a remote worker's TLS certificate (`AB:CD:…`); set = TLS with that certificate pinned.
CONF_WORKER_TLS_FINGERPRINT: Final = "worker_tls_fingerprint"
# Where a downloaded model came from (its page or URL); shown on the entry's device.
CONF_MODEL_SOURCE: Final = "model_source"
# Extra environment for a local worker (not offered in the UI; used by the dev setup and the tests, e.g.
# {"RKLLM_EMULATOR_SPEED": "50"}).
CONF_WORKER_ENV: Final = "worker_env"

WORKER_LOCAL: Final = "local"
WORKER_REMOTE: Final = "remote"
ABI_PROFILE_AUTO: Final = "auto"
ABI_PROFILES: Final = (ABI_PROFILE_AUTO, "v12x", "v130")
# Runtime contexts ("slots", docs/voice.md): auto = 2 when memory holds the model twice, else 1.
SLOTS_AUTO: Final = "auto"
SLOT_CHOICES: Final = (SLOTS_AUTO, "1", "2", "3", "4")
PLATFORMS_SUPPORTED: Final = ("rk3588", "rk3576", "rk3562", "rv1126b")

DEFAULT_PLATFORM: Final = "rk3588"
DEFAULT_CONTEXT_LENGTH: Final = 4096
MIN_CONTEXT_LENGTH: Final = 512
MAX_CONTEXT_LENGTH: Final = 32768
DEFAULT_CPU_CORES: Final = 4
# Seconds a run may stay silent past max(this, 3 x its expected step) before the watchdog ends it.
DEFAULT_WATCHDOG_S: Final = 10
DEFAULT_NPU_DOMAIN_ID: Final = 0
DEFAULT_WORKER_PORT: Final = 8765

# Subentries (one per conversation agent / AI task entity).
SUBENTRY_CONVERSATION: Final = "conversation"
SUBENTRY_AI_TASK: Final = "ai_task_data"
CONF_PROMPT: Final = "prompt"
CONF_TEMPERATURE: Final = "temperature"
CONF_TOP_P: Final = "top_p"
CONF_TOP_K: Final = "top_k"
CONF_REPEAT_PENALTY: Final = "repeat_penalty"
CONF_MAX_NEW_TOKENS: Final = "max_new_tokens"
CONF_ENABLE_THINKING: Final = "enable_thinking"
CONF_MAX_HISTORY: Final = "max_history"
CONF_MAX_TOOL_ITERATIONS: Final = "max_tool_iterations"
CONF_QUICK_CONFIRMATIONS: Final = "quick_confirmations"

# Sampling defaults follow the official server demo (docs/runtime.md §6); top_k 1 is greedy, which keeps tool
# calls of small models deterministic.
DEFAULT_TEMPERATURE: Final = 0.8
DEFAULT_TOP_P: Final = 0.9
DEFAULT_TOP_K: Final = 1
DEFAULT_REPEAT_PENALTY: Final = 1.1
DEFAULT_MAX_NEW_TOKENS: Final = 512
DEFAULT_ENABLE_THINKING: Final = False
# The Assist prompt alone is 1.5-2 k tokens (docs/home-assistant.md §2.7); a 4 k context leaves room for few turns.
DEFAULT_MAX_HISTORY: Final = 5
# Core uses 10; a 1-3 B model that loops on a failing tool wastes seconds of NPU time per iteration.
DEFAULT_MAX_TOOL_ITERATIONS: Final = 5
# One successful device action is confirmed with Home Assistant's own sentence instead of a second model round
# (confirmation.py; docs/home-assistant.md §2.8).
DEFAULT_QUICK_CONFIRMATIONS: Final = True

DEFAULT_CONVERSATION_NAME: Final = "RKLLM conversation"
DEFAULT_AI_TASK_NAME: Final = "RKLLM AI Task"
DEFAULT_TITLE: Final = "RKLLM"
# Downloads (models, runtimes) go to this folder of the Home Assistant configuration directory.
DOWNLOAD_FOLDER: Final = "rkllm"

# Model load on a board takes seconds (docs/runtime.md §10); a worker that needs longer is treated as not ready.
ENGINE_START_TIMEOUT_S: Final = 120.0
# The config flow's remote probe must answer quickly or the form hangs.
REMOTE_PROBE_TIMEOUT_S: Final = 10.0

# Repair issue keys raised at setup (repairs.py owns the issue texts).
ISSUE_LIBRARY_MISSING: Final = "library_missing"
ISSUE_LIBRARY_UNSUPPORTED: Final = "library_unsupported"
ISSUE_MODEL_PLATFORM_MISMATCH: Final = "model_platform_mismatch"
ISSUE_PATH_NOT_ALLOWED: Final = "path_not_allowed"
ISSUE_MODEL_TOOLKIT_NEWER: Final = "model_toolkit_newer"
ISSUE_MODEL_LOAD_FAILED: Final = "model_load_failed"

AGENT_MODEL_PREFIX: Final = "rkllm-agent-"
