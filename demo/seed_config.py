"""Prepare config/ for scripts/develop: an rkllm entry with an Assist agent, a login user, onboarding done.

Everything is written only when absent, so a developer's own changes (more agents, other entries, a
changed password) survive restarts; only the develop entry's library and model follow RKLLM_LIBRARY /
RKLLM_MODEL. Home Assistant must not be running while this writes its storage.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from custom_components.rkllm.config_flow import RkllmConfigFlow, default_conversation_options  # noqa: E402
from custom_components.rkllm.const import (  # noqa: E402
    ABI_PROFILE_AUTO,
    CONF_ABI_PROFILE,
    CONF_CONTEXT_LENGTH,
    CONF_CPU_CORES,
    CONF_LIBRARY_PATH,
    CONF_MODEL_PATH,
    CONF_NPU_DOMAIN_ID,
    CONF_PLATFORM,
    CONF_WORKER,
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_CONVERSATION_NAME,
    DEFAULT_CPU_CORES,
    DEFAULT_NPU_DOMAIN_ID,
    DEFAULT_PLATFORM,
    DOMAIN,
    PLATFORMS_SUPPORTED,
    SUBENTRY_CONVERSATION,
    WORKER_LOCAL,
)

# Fixed ids: a re-run finds its own entry again instead of adding a second one.
DEVELOP_ENTRY_ID = "01JDEVE10PRKLLMENTRY000000"
DEVELOP_SUBENTRY_ID = "01JDEVE10PRKLLMAGENT000000"
DEVELOP_USERNAME = "dev"
CREDENTIALS_FILE = ".develop_user.json"
# Storage formats HA 2025.4.4 to 2026.11.0 read (docs/toolchain.md "Running hass headless"; develop runs 2026.10.4).
CONFIG_ENTRIES_VERSION = (1, 5)
ONBOARDING_VERSION = 4
ONBOARDING_STEPS = ["user", "core_config", "analytics", "integration"]
# The runtime entry's KV-context count ("auto", "1", "2", …), read by the engine once it has slots; written only
# when --slots is given (bench/voice.py compares 1 and 2 slots). A runtime that does not know the key ignores it.
CONF_SLOTS = "slots"


class SeedError(Exception):
    """config/ cannot be prepared; the message names the file or setting."""


def _read_json(path: Path) -> dict[str, Any] | None:
    """A storage file's content, or None when it does not exist."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise SeedError(f"cannot read {path}: {err}") from err
    if not isinstance(content, dict):
        raise SeedError(f"{path} is not a JSON object")
    return content


def _write_json(path: Path, content: dict[str, Any], *, private: bool = False) -> None:
    """Write atomically (HA may be started right after), 0600 for files holding secrets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    if private:
        temporary.chmod(0o600)
    temporary.replace(path)


def develop_entry(library: str, model: str, platform: str, slots: str | None = None) -> dict[str, Any]:
    """The config entry the config flow would create for this library and model, with its Assist agent."""
    now = datetime.now(UTC).isoformat()
    entry: dict[str, Any] = {
        "entry_id": DEVELOP_ENTRY_ID,
        "domain": DOMAIN,
        "title": Path(model).stem,
        "data": {
            CONF_LIBRARY_PATH: library,
            CONF_MODEL_PATH: model,
            CONF_PLATFORM: platform,
            CONF_CONTEXT_LENGTH: DEFAULT_CONTEXT_LENGTH,
            CONF_CPU_CORES: DEFAULT_CPU_CORES,
            CONF_NPU_DOMAIN_ID: DEFAULT_NPU_DOMAIN_ID,
            CONF_ABI_PROFILE: ABI_PROFILE_AUTO,
            CONF_WORKER: WORKER_LOCAL,
        },
        "options": {},
        "source": "user",
        "unique_id": None,
        "version": RkllmConfigFlow.VERSION,
        "minor_version": RkllmConfigFlow.MINOR_VERSION,
        "disabled_by": None,
        "discovery_keys": {},
        "subentries": [
            {
                "data": default_conversation_options(),
                "subentry_id": DEVELOP_SUBENTRY_ID,
                "subentry_type": SUBENTRY_CONVERSATION,
                "title": DEFAULT_CONVERSATION_NAME,
                "unique_id": None,
            }
        ],
        "pref_disable_new_entities": False,
        "pref_disable_polling": False,
        "created_at": now,
        "modified_at": now,
    }
    if slots is not None:
        entry["data"][CONF_SLOTS] = slots
    return entry


def seed_config_entry(storage: Path, library: str, model: str, platform: str, slots: str | None = None) -> str:
    """Add the develop entry when no rkllm entry exists; point it at `library`/`model` (and `slots`) if it exists."""
    path = storage / "core.config_entries"
    content = _read_json(path)
    if content is None:
        major, minor = CONFIG_ENTRIES_VERSION
        content = {"version": major, "minor_version": minor, "key": "core.config_entries", "data": {"entries": []}}
    entries: list[dict[str, Any]] = content.setdefault("data", {}).setdefault("entries", [])
    ours = next((entry for entry in entries if entry.get("entry_id") == DEVELOP_ENTRY_ID), None)
    if ours is not None:
        wanted = {CONF_LIBRARY_PATH: library, CONF_MODEL_PATH: model, CONF_PLATFORM: platform}
        if slots is not None:
            wanted[CONF_SLOTS] = slots
        if all(ours["data"].get(key) == value for key, value in wanted.items()):
            return f"rkllm entry '{ours['title']}' unchanged"
        ours["data"].update(wanted)
        ours["title"] = Path(model).stem
        ours["modified_at"] = datetime.now(UTC).isoformat()
        _write_json(path, content)
        uses = f"{library} and {model}" if slots is None else f"{library} and {model} with {slots} slot(s)"
        return f"rkllm entry now uses {uses}"
    if any(entry.get("domain") == DOMAIN for entry in entries):
        return "an rkllm entry made in the UI exists; left as it is"
    entries.append(develop_entry(library, model, platform, slots))
    _write_json(path, content)
    return f"added the rkllm entry '{Path(model).stem}' with the agent '{DEFAULT_CONVERSATION_NAME}' (Assist API)"


def new_password() -> str:
    """A random password that is safe as a command-line argument.

    Hex only: a URL-safe token can start with "-", which `hass --script auth add` then parses as an option.
    """
    return secrets.token_hex(12)


def seed_user(config: Path, hass: Path) -> str:
    """Create the login user once (random password in config/.develop_user.json) and mark onboarding done."""
    credentials = config / CREDENTIALS_FILE
    if credentials.exists():
        return f"user '{DEVELOP_USERNAME}' exists (password in {credentials})"
    password = new_password()
    result = subprocess.run(
        [str(hass), "--script", "auth", "--config", str(config), "add", DEVELOP_USERNAME, password],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise SeedError(f"hass --script auth add failed: {detail[-1] if detail else f'exit {result.returncode}'}")
    _write_json(credentials, {"username": DEVELOP_USERNAME, "password": password}, private=True)
    onboarding = config / ".storage" / "onboarding"
    if _read_json(onboarding) is None:
        # The UI then shows the login page (the dev user, an admin on first login) instead of the owner wizard.
        _write_json(
            onboarding,
            {
                "version": ONBOARDING_VERSION,
                "minor_version": 1,
                "key": "onboarding",
                "data": {"done": ONBOARDING_STEPS},
            },
            private=True,
        )
    return f"created user '{DEVELOP_USERNAME}' (password in {credentials})"


def _existing_file(value: str, what: str) -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        raise SeedError(f"{what} {value} does not exist or is not a file")
    return str(path.resolve())


def _slots(value: str) -> str:
    """`auto` or a positive count, kept as the string the entry stores."""
    if value != "auto" and not (value.isascii() and value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f'must be "auto" or a positive count, got {value!r}')
    return value if value == "auto" else str(int(value))


def prepare(args: argparse.Namespace) -> list[str]:
    """Validate the arguments, then seed the entry and the user; returns one message per step."""
    library = _existing_file(args.library, "runtime library")
    model = _existing_file(args.model, "model file")
    platform = args.platform
    if platform is None:
        from custom_components.rkllm.config_flow import detect_platform

        platform = detect_platform() or DEFAULT_PLATFORM
    if platform not in PLATFORMS_SUPPORTED:
        raise SeedError(f"platform {platform!r} is not one of {', '.join(PLATFORMS_SUPPORTED)}")
    config = args.config.resolve()
    if not (config / "configuration.yaml").is_file():
        raise SeedError(f"{config}/configuration.yaml is missing (it is tracked in git: restore it)")
    return [
        seed_config_entry(config / ".storage", library, model, platform, args.slots),
        seed_user(config, args.hass),
    ]


def main(argv: list[str] | None = None) -> int:
    """Print what was prepared, one line each; errors as one line on stderr."""
    parser = argparse.ArgumentParser(prog="demo/seed_config.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "config", help="Home Assistant config directory")
    parser.add_argument("--library", required=True, help="librkllmrt.so (or the emulator library)")
    parser.add_argument("--model", required=True, help=".rkllm model (or an emulator model)")
    parser.add_argument("--platform", help=f"one of {', '.join(PLATFORMS_SUPPORTED)} (default: detected)")
    parser.add_argument(
        "--slots",
        type=_slots,
        help='KV contexts of the runtime entry: "auto" or a count such as 1 or 2 (default: not written)',
    )
    parser.add_argument("--hass", type=Path, default=Path(sys.executable).parent / "hass", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        messages = prepare(args)
    except SeedError as err:
        print(f"scripts/develop: error: {err}", file=sys.stderr)
        return 1
    for message in messages:
        print(f"scripts/develop: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
