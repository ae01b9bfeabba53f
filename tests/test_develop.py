"""scripts/develop's helpers: the config/ it seeds loads in Home Assistant, and scripts/token's token works."""

from __future__ import annotations

import argparse
import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from homeassistant.auth.providers.homeassistant import HassAuthProvider
from homeassistant.components import conversation
from homeassistant.config_entries import ConfigEntries, ConfigEntryState
from homeassistant.const import REQUIRED_PYTHON_VER
from homeassistant.core import Context, HomeAssistant
from homeassistant.setup import async_setup_component
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.rkllm.config_flow import default_conversation_options
from custom_components.rkllm.const import DOMAIN
from demo import long_lived_token, seed_config
from rkllm_native.build import emulator_library

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO_ROOT / "rkllm_native" / "emulator" / "models" / "qwen2.5-1.5b-assist.model"


def develop_hass() -> Path:
    """The `hass` whose auth script seeds the develop user: this line's own, as scripts/develop runs it.

    Where this release's CLI refuses the interpreter (2026.2.3 installed on Python 3.13.0 for its tests), the
    2025.4.4 line's.
    """
    own = Path(sys.executable).parent / "hass"
    if sys.version_info[:3] >= REQUIRED_PYTHON_VER:
        return own
    floor = REPO_ROOT / ".venv" / "bin" / "hass"
    assert floor.exists(), f"{own} refuses this Python and {floor} is missing: run scripts/setup 2025"
    return floor


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """An empty Home Assistant config directory with the tracked configuration.yaml's stand-in."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "configuration.yaml").write_text("homeassistant:\n", encoding="utf-8")
    return config


def read_entries(config: Path) -> list[dict[str, Any]]:
    content = json.loads((config / ".storage" / "core.config_entries").read_text(encoding="utf-8"))
    entries: list[dict[str, Any]] = content["data"]["entries"]
    return entries


async def test_seeded_entry_loads_in_home_assistant_and_its_agent_answers(
    hass: HomeAssistant,
    hass_storage: dict[str, Any],
    enable_custom_integrations: None,
    config_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RKLLM_EMULATOR_SPEED", "0")  # the worker inherits the environment, like under hass
    library = str(await hass.async_add_executor_job(emulator_library, "v12x"))
    seed_config.seed_config_entry(config_dir / ".storage", library, str(DEMO_MODEL), "rk3588")

    # Home Assistant's own loader reads the seeded file (the same code path as `hass --config config`).
    hass_storage["core.config_entries"] = json.loads(
        (config_dir / ".storage" / "core.config_entries").read_text(encoding="utf-8")
    )
    loader = ConfigEntries(hass, {})
    await loader.async_initialize()
    [entry] = loader.async_entries(DOMAIN)
    assert entry.title == "qwen2.5-1.5b-assist"
    assert entry.data["library_path"] == library
    [agent] = entry.subentries.values()
    assert agent.subentry_type == "conversation"
    assert dict(agent.data) == default_conversation_options()

    assert await async_setup_component(hass, "homeassistant", {})
    await hass.config_entries.async_add(entry)
    await hass.async_block_till_done()
    try:
        assert entry.state is ConfigEntryState.LOADED
        result = await conversation.async_converse(
            hass, text="hello", conversation_id=None, context=Context(), agent_id="conversation.rkllm_conversation"
        )
        speech = result.response.speech["plain"]["speech"]
        assert speech.startswith("Hello! I can turn the kitchen light on or off")
    finally:
        await hass.config_entries.async_unload(entry.entry_id)


def test_seeding_again_keeps_the_entry_and_follows_a_new_library_or_model(config_dir: Path, tmp_path: Path) -> None:
    storage = config_dir / ".storage"
    first = seed_config.seed_config_entry(storage, "/opt/emu.so", "/models/qwen2.5-1.5b-assist.model", "rk3588")
    assert first.startswith("added the rkllm entry 'qwen2.5-1.5b-assist'")
    [seeded] = read_entries(config_dir)

    assert seed_config.seed_config_entry(storage, "/opt/emu.so", "/models/qwen2.5-1.5b-assist.model", "rk3588") == (
        "rkllm entry 'qwen2.5-1.5b-assist' unchanged"
    )

    # RKLLM_LIBRARY/RKLLM_MODEL on a board: the same entry (and its agents) now uses the real files.
    message = seed_config.seed_config_entry(storage, "/usr/lib/librkllmrt.so", "/models/Qwen3-1.7B.rkllm", "rk3576")
    assert message == "rkllm entry now uses /usr/lib/librkllmrt.so and /models/Qwen3-1.7B.rkllm"
    [updated] = read_entries(config_dir)
    assert updated["entry_id"] == seeded["entry_id"]
    assert updated["title"] == "Qwen3-1.7B"
    assert updated["data"]["platform"] == "rk3576"
    assert updated["subentries"] == seeded["subentries"]


def test_slots_are_written_into_the_entry_only_when_asked(config_dir: Path) -> None:
    storage = config_dir / ".storage"
    seed_config.seed_config_entry(storage, "/opt/emu.so", "/models/a.model", "rk3588")
    [entry] = read_entries(config_dir)
    assert "slots" not in entry["data"]

    # bench/voice.py compares slot counts on the same entry: each run sets its own.
    message = seed_config.seed_config_entry(storage, "/opt/emu.so", "/models/a.model", "rk3588", slots="2")
    assert message == "rkllm entry now uses /opt/emu.so and /models/a.model with 2 slot(s)"
    [entry] = read_entries(config_dir)
    assert entry["data"]["slots"] == "2"
    assert seed_config.seed_config_entry(storage, "/opt/emu.so", "/models/a.model", "rk3588", slots="2") == (
        "rkllm entry 'a' unchanged"
    )
    # scripts/develop passes no --slots: a developer's setting stays.
    seed_config.seed_config_entry(storage, "/opt/emu.so", "/models/a.model", "rk3588")
    [entry] = read_entries(config_dir)
    assert entry["data"]["slots"] == "2"


def test_slots_option_takes_auto_or_a_positive_count(config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    library = str(emulator_library("v12x"))
    base = ["--config", str(config_dir), "--library", library, "--model", str(DEMO_MODEL), "--hass", "/nonexistent"]
    for bad in ("0", "two", "-1", "²"):
        with pytest.raises(SystemExit) as exited:
            seed_config.main([*base, "--slots", bad])
        assert exited.value.code == 2
        assert f'argument --slots: must be "auto" or a positive count, got {bad!r}' in capsys.readouterr().err
    assert not (config_dir / ".storage").exists()

    storage = config_dir / ".storage"
    storage.mkdir()
    (config_dir / ".develop_user.json").write_text("{}", encoding="utf-8")  # the user exists: no hass call
    for value, stored in (("auto", "auto"), ("02", "2")):
        assert seed_config.main([*base, "--slots", value]) == 0
        [entry] = read_entries(config_dir)
        assert entry["data"]["slots"] == stored


def test_an_entry_made_in_the_ui_is_left_alone(config_dir: Path) -> None:
    storage = config_dir / ".storage"
    seed_config.seed_config_entry(storage, "/opt/emu.so", "/models/a.model", "rk3588")
    content = json.loads((storage / "core.config_entries").read_text(encoding="utf-8"))
    content["data"]["entries"][0]["entry_id"] = "made-in-the-ui"
    (storage / "core.config_entries").write_text(json.dumps(content), encoding="utf-8")

    message = seed_config.seed_config_entry(storage, "/opt/emu.so", "/models/b.model", "rk3588")

    assert message == "an rkllm entry made in the UI exists; left as it is"
    assert [entry["entry_id"] for entry in read_entries(config_dir)] == ["made-in-the-ui"]


def test_missing_model_is_one_clear_error(config_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    library = emulator_library("v12x")
    missing = config_dir / "nope.model"

    code = seed_config.main(["--config", str(config_dir), "--library", str(library), "--model", str(missing)])

    assert code == 1
    assert capsys.readouterr().err == f"scripts/develop: error: model file {missing} does not exist or is not a file\n"
    assert not (config_dir / ".storage").exists()


@pytest.mark.usefixtures("socket_enabled")
async def test_develop_user_gets_a_long_lived_token_that_opens_the_api(
    hass: HomeAssistant,
    hass_storage: dict[str, Any],
    hass_client_no_auth: ClientSessionGenerator,
    config_dir: Path,
) -> None:
    message = await hass.async_add_executor_job(seed_config.seed_user, config_dir, develop_hass())
    credentials_file = config_dir / ".develop_user.json"
    assert message == f"created user 'dev' (password in {credentials_file})"
    assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
    onboarding = json.loads((config_dir / ".storage" / "onboarding").read_text(encoding="utf-8"))
    assert onboarding["data"]["done"] == ["user", "core_config", "analytics", "integration"]
    # A second run keeps the user and its password.
    assert await hass.async_add_executor_job(seed_config.seed_user, config_dir, develop_hass()) == (
        f"user 'dev' exists (password in {credentials_file})"
    )

    # Home Assistant loads the user `hass --script auth` stored, then serves the login flow and the websocket.
    hass_storage["auth_provider.homeassistant"] = json.loads(
        (config_dir / ".storage" / "auth_provider.homeassistant").read_text(encoding="utf-8")
    )
    provider = HassAuthProvider(hass, hass.auth._store, {"type": "homeassistant"})
    await provider.async_initialize()
    hass.auth._providers[(provider.type, provider.id)] = provider
    for component in ("http", "auth", "websocket_api", "api"):
        assert await async_setup_component(hass, component, {})
    client = await hass_client_no_auth()
    base_url = str(client.make_url("")).rstrip("/")

    args = argparse.Namespace(
        url=base_url,
        username=None,
        password=None,
        credentials=credentials_file,
        name="rkllm develop test",
        lifespan_days=1,
        wait=5.0,
    )
    token = await long_lived_token.fetch_token(args, *long_lived_token.resolve_credentials(args))

    response = await client.get("/api/", headers={"Authorization": f"Bearer {token}"})
    assert response.status == 200
    assert await response.json() == {"message": "API running."}
    refresh_tokens = [
        refresh_token
        for user in await hass.auth.async_get_users()
        for refresh_token in user.refresh_tokens.values()
        if refresh_token.client_name == "rkllm develop test"
    ]
    assert len(refresh_tokens) == 1
    assert refresh_tokens[0].token_type == "long_lived_access_token"


def test_token_without_develop_run_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / ".develop_user.json"

    code = long_lived_token.main(["--credentials", str(missing), "--wait", "0"])

    assert code == 1
    assert capsys.readouterr().err == (
        f"scripts/token: error: {missing} does not exist: run scripts/develop first, or pass --username/--password\n"
    )


def test_develop_password_is_never_taken_for_a_command_line_option() -> None:
    # `hass --script auth add dev <password>`: a password starting with "-" failed about one run in 64.
    passwords = {seed_config.new_password() for _ in range(500)}
    assert len(passwords) == 500
    assert not any(password.startswith("-") for password in passwords)
