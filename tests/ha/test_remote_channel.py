"""The remote worker's TLS fingerprint, mutual authentication and allow-list as the user meets them in Home Assistant.

Form errors in the remote step, setup errors that start re-authentication, and the repair issue for a path the
worker does not serve; against real worker processes (plain and TLS) and one impostor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from homeassistant.config_entries import SOURCE_REAUTH, ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.rkllm.const import (
    CONF_WORKER,
    CONF_WORKER_HOST,
    CONF_WORKER_PORT,
    CONF_WORKER_SECRET,
    CONF_WORKER_TLS_FINGERPRINT,
    DOMAIN,
)
from rkllm_native import channel, protocol
from tests.ha.conftest import FAST_ENV, RemoteWorker, entry_data
from tests.ha.test_config_flow import start_files_step
from tests.ha_shared import flow_input


@pytest.fixture(autouse=True)
def fast_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in FAST_ENV.items():
        monkeypatch.setenv(key, value)


def remote_fields(worker: RemoteWorker, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        CONF_WORKER_HOST: worker.host,
        CONF_WORKER_PORT: worker.port,
        CONF_WORKER_SECRET: worker.secret,
    }
    if worker.fingerprint:
        fields[CONF_WORKER_TLS_FINGERPRINT] = worker.fingerprint
    fields.update(overrides)
    return {key: value for key, value in fields.items() if value is not None}


async def _remote_step(hass: HomeAssistant, library: str, model: Path | str, fields: dict[str, Any]) -> dict[str, Any]:
    result = await start_files_step(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], flow_input(library, model, **{CONF_WORKER: "remote"})
    )
    assert result["step_id"] == "remote"
    result = await hass.config_entries.flow.async_configure(result["flow_id"], fields)
    await hass.async_block_till_done()
    return dict(result)


async def test_a_tls_worker_is_added_with_the_fingerprint_as_openssl_prints_it(
    hass: HomeAssistant, tls_remote_worker: RemoteWorker, emulator_lib: str, assist_model: Path
) -> None:
    assert tls_remote_worker.fingerprint is not None
    pasted = "sha256 Fingerprint=" + tls_remote_worker.fingerprint.replace(":", "").lower()
    result = await _remote_step(
        hass, emulator_lib, assist_model, remote_fields(tls_remote_worker, **{CONF_WORKER_TLS_FINGERPRINT: pasted})
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_WORKER_TLS_FINGERPRINT] == tls_remote_worker.fingerprint
    entry = result["result"]
    assert entry.state is ConfigEntryState.LOADED
    assert entry.runtime_data.engine.metrics.runtime_version == "1.2.3"


@pytest.mark.parametrize(
    ("case", "errors", "detail"),
    [
        ("not_a_fingerprint", {CONF_WORKER_TLS_FINGERPRINT: "invalid_fingerprint"}, ""),
        ("other_certificate", {CONF_WORKER_TLS_FINGERPRINT: "fingerprint_mismatch"}, "not the pinned"),
        ("tls_worker_without_fingerprint", {CONF_WORKER_TLS_FINGERPRINT: "tls_mismatch"}, "speaks TLS only"),
        ("library_not_served", {"base": "path_not_allowed"}, "add `--library /opt/other/librkllmrt.so`"),
        ("model_not_served", {"base": "path_not_allowed"}, "add `--model /opt/other/model.rkllm`"),
    ],
)
async def test_remote_step_names_what_does_not_match_the_worker(
    hass: HomeAssistant,
    tls_remote_worker: RemoteWorker,
    emulator_lib: str,
    assist_model: Path,
    case: str,
    errors: dict[str, str],
    detail: str,
) -> None:
    library, model = emulator_lib, str(assist_model)
    fields = remote_fields(tls_remote_worker)
    if case == "not_a_fingerprint":
        fields[CONF_WORKER_TLS_FINGERPRINT] = "AB:CD"
    elif case == "other_certificate":
        fields[CONF_WORKER_TLS_FINGERPRINT] = "00:" * 31 + "00"
    elif case == "tls_worker_without_fingerprint":
        del fields[CONF_WORKER_TLS_FINGERPRINT]
    elif case == "library_not_served":
        library = "/opt/other/librkllmrt.so"
    elif case == "model_not_served":
        model = "/opt/other/model.rkllm"
    result = await _remote_step(hass, library, model, fields)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "remote"
    assert result["errors"] == errors
    assert detail in result["description_placeholders"]["error_detail"]


@pytest.fixture
async def impostor(socket_enabled: None) -> AsyncIterator[RemoteWorker]:
    """Something on the worker's address that speaks the handshake but does not know the secret."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await channel.read_frame(reader, None)
            if hello is None:
                return
            nonce = channel.new_nonce()
            channel.write_frame(writer, channel.challenge(nonce), None)
            keys = channel.derive_keys("not the secret", protocol.PROTOCOL_VERSION, channel.nonce_of(hello), nonce)
            await channel.read_frame(reader, None)
            channel.write_frame(writer, {"ev": "auth_ok", "proof": keys.worker_proof.hex()}, None)
            await writer.drain()
            await reader.read()
        except (OSError, protocol.ProtocolError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield RemoteWorker("127.0.0.1", server.sockets[0].getsockname()[1], "correct horse battery staple")
    server.close()
    await server.wait_closed()


async def test_a_worker_that_cannot_prove_the_secret_is_a_secret_error_and_starts_reauth(
    hass: HomeAssistant, impostor: RemoteWorker, emulator_lib: str, assist_model: Path
) -> None:
    result = await _remote_step(hass, emulator_lib, assist_model, remote_fields(impostor))
    assert result["errors"] == {CONF_WORKER_SECRET: "worker_unverified"}
    assert "could not prove it knows the shared secret" in result["description_placeholders"]["error_detail"]

    entry = MockConfigEntry(domain=DOMAIN, data=entry_data(emulator_lib, assist_model, **_remote_data(impostor)))
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.error_reason_translation_key == "setup_worker_unverified"
    (flow,) = entry.async_get_active_flows(hass, {SOURCE_REAUTH})
    assert flow["step_id"] == "reauth_confirm"


def _remote_data(worker: RemoteWorker, **overrides: Any) -> dict[str, Any]:
    return {CONF_WORKER: "remote", **remote_fields(worker, **overrides)}


async def test_a_changed_certificate_starts_reauth_which_takes_the_new_fingerprint(
    hass: HomeAssistant, tls_remote_worker: RemoteWorker, emulator_lib: str, assist_model: Path
) -> None:
    old = "00:" * 31 + "00"
    remote = _remote_data(tls_remote_worker, **{CONF_WORKER_TLS_FINGERPRINT: old})
    data = entry_data(emulator_lib, assist_model, **remote)
    entry = MockConfigEntry(domain=DOMAIN, title=assist_model.stem, data=data)
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.error_reason_translation_key == "setup_fingerprint_mismatch"
    (flow,) = entry.async_get_active_flows(hass, {SOURCE_REAUTH})

    result = await hass.config_entries.flow.async_configure(flow["flow_id"])
    assert result["step_id"] == "reauth_confirm"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_WORKER_SECRET: tls_remote_worker.secret, CONF_WORKER_TLS_FINGERPRINT: old}
    )
    assert result["errors"] == {CONF_WORKER_TLS_FINGERPRINT: "fingerprint_mismatch"}
    assert entry.data[CONF_WORKER_TLS_FINGERPRINT] == old

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {CONF_WORKER_SECRET: tls_remote_worker.secret, CONF_WORKER_TLS_FINGERPRINT: tls_remote_worker.fingerprint},
    )
    await hass.async_block_till_done()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    assert entry.data[CONF_WORKER_TLS_FINGERPRINT] == tls_remote_worker.fingerprint
    assert entry.state is ConfigEntryState.LOADED


async def test_a_path_the_worker_does_not_serve_fails_setup_with_a_repair_naming_path_and_flag(
    hass: HomeAssistant, remote_worker: RemoteWorker, emulator_lib: str
) -> None:
    model = "/opt/rkllm/models/not-served.rkllm"
    entry = MockConfigEntry(domain=DOMAIN, data=entry_data(emulator_lib, model, **_remote_data(remote_worker)))
    entry.add_to_hass(hass)
    await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.error_reason_translation_key == "setup_path_not_allowed"
    issue = ir.async_get(hass).async_get_issue(DOMAIN, f"path_not_allowed_{entry.entry_id}")
    assert issue is not None
    assert issue.translation_placeholders is not None
    assert issue.translation_placeholders["path"] == model
    assert issue.translation_placeholders["flag"] == "--model"
    assert issue.translation_placeholders["worker"] == f"{remote_worker.host}:{remote_worker.port}"
    assert not list(entry.async_get_active_flows(hass, {SOURCE_REAUTH}))
