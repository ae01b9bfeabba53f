"""A warm voice command with and without quick confirmations: time to the first answer text and to the end.

Run from the repository root with the project venv (no installation needed: the repo root is put on
`sys.path` below):

    .venv/bin/python bench/quick_confirmation.py [--reps 5] [--speed 1]

Setup: a Home Assistant test instance (pytest-homeassistant-custom-component's harness, no pytest run) with an
exposed Kitchen Light, the demo model `rkllm_native/emulator/models/qwen2.5-1.5b-assist.model` (calibration
qwen2.5-1.5b-rk3588: prefill 338 tok/s, decode 16.69 tok/s, docs/runtime.md §10.1) at `--speed` (1 = the
board's timing), and two conversation agents with the Assist API that differ only in `quick_confirmations`.
Each command ("turn on the kitchen light", then "turn off …", alternating) is a new conversation through the
agent's whole turn (`agent_api.async_run_agent`, the code path of Assist): the engine call, Home Assistant
running the intent, then either Home Assistant's sentence (quick) or a second engine call (model). The static
prompt prefix is resident (one warm-up command per agent first), so these are warm commands.

- `first_text_s`: from the turn's start to the first piece of answer text. (Home Assistant's pipeline streams
  text-to-speech only once an answer passes 60 characters; a shorter answer is spoken after the turn ends.)
- `after_tool_s`: from Home Assistant's tool result to that first text (the sentence, or the second round's
  prefill and first token);
- `turn_s`: the whole turn;
- `engine_calls`: engine requests per turn (1 with a quick confirmation, 2 without).

The two agents alternate, so both see the same load from other processes. Times are wall seconds of this
machine; at speed 1 the emulated runtime sleeps the board's prefill and decode times, our own code runs at this
machine's speed.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402 - after the sys.path set-up above
import asyncio  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

from homeassistant import loader  # noqa: E402
from homeassistant.components.homeassistant.exposed_entities import async_expose_entity  # noqa: E402
from homeassistant.core import Context, HomeAssistant  # noqa: E402
from homeassistant.setup import async_setup_component  # noqa: E402
from pytest_homeassistant_custom_component.common import (  # noqa: E402
    MockConfigEntry,
    async_test_home_assistant,
    setup_test_component_platform,
)

from custom_components.rkllm.agent_api import AgentDelta, agent_models, async_run_agent  # noqa: E402
from custom_components.rkllm.config_flow import default_conversation_options  # noqa: E402
from custom_components.rkllm.const import (  # noqa: E402
    CONF_QUICK_CONFIRMATIONS,
    CONF_WORKER_ENV,
    DOMAIN,
    SUBENTRY_CONVERSATION,
)
from rkllm_engine.types import ChatMessage  # noqa: E402
from rkllm_native.build import emulator_library  # noqa: E402
from tests.ha_shared import KITCHEN_LIGHT, KitchenLight, flow_input  # noqa: E402

MODEL = REPO_ROOT / "rkllm_native/emulator/models/qwen2.5-1.5b-assist.model"
COMMANDS = ("turn on the kitchen light", "turn off the kitchen light")
AGENTS = {"quick": True, "model": False}


@dataclass(frozen=True)
class Sample:
    """One turn, in wall seconds."""

    first_text_s: float
    after_tool_s: float  # from the tool result to the first answer text
    turn_s: float
    engine_calls: int
    text: str


def agent_subentry(title: str, quick: bool) -> dict[str, object]:
    """A conversation agent with the Assist API and the default options but `quick_confirmations`."""
    data = default_conversation_options()
    data[CONF_QUICK_CONFIRMATIONS] = quick
    return {"data": data, "subentry_type": SUBENTRY_CONVERSATION, "title": title, "unique_id": None}


async def set_up(hass: HomeAssistant, speed: float, submitted: list[object]) -> dict[str, str]:
    """The light, the entry with both agents (engine requests appended to `submitted`); agent title → entity id."""
    hass.data.pop(loader.DATA_CUSTOM_COMPONENTS)  # load custom_components/ from the repo (phcc's fixture does this)
    assert await async_setup_component(hass, "homeassistant", {})
    setup_test_component_platform(hass, "light", [KitchenLight()])
    assert await async_setup_component(hass, "light", {"light": {"platform": "test"}})
    assert await async_setup_component(hass, "intent", {})
    assert await async_setup_component(hass, "conversation", {})
    await hass.async_block_till_done()
    async_expose_entity(hass, "conversation", KITCHEN_LIGHT, True)
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="bench",
        data=flow_input(
            str(emulator_library("v12x")), MODEL, **{CONF_WORKER_ENV: {"RKLLM_EMULATOR_SPEED": str(speed)}}
        ),
        subentries_data=[agent_subentry(title, quick) for title, quick in AGENTS.items()],
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    engine = entry.runtime_data.engine
    submit = engine.submit

    def counting_submit(request: Any) -> Any:
        submitted.append(request)
        return submit(request)

    engine.submit = counting_submit  # type: ignore[method-assign]
    return {model.title: model.entity_id for model in agent_models(hass)}


async def one_turn(hass: HomeAssistant, entity_id: str, command: str, submitted: list[object]) -> Sample:
    """One command as a new conversation; times from the call to the first text delta and to the end."""
    first_text: list[float] = []
    tool_result: list[float] = []
    requests_before = len(submitted)
    start = time.perf_counter()

    def on_delta(delta: AgentDelta) -> None:
        if delta.kind == "text" and delta.text and not first_text:
            first_text.append(time.perf_counter() - start)
        elif delta.kind == "tool_result" and not tool_result:
            tool_result.append(time.perf_counter() - start)

    result = await async_run_agent(
        hass, entity_id, [ChatMessage(role="user", content=command)], context=Context(), on_delta=on_delta
    )
    turn_s = time.perf_counter() - start
    first = first_text[0] if first_text else turn_s
    after_tool = first - tool_result[0] if tool_result else float("nan")
    return Sample(first, after_tool, turn_s, len(submitted) - requests_before, result.text)


async def run(reps: int, speed: float) -> dict[str, list[Sample]]:
    """Warm both agents up, then alternate them over `reps` commands each."""
    with tempfile.TemporaryDirectory() as config_dir:
        async with async_test_home_assistant(config_dir=config_dir) as hass:
            submitted: list[object] = []
            agents = await set_up(hass, speed, submitted)
            samples: dict[str, list[Sample]] = {title: [] for title in AGENTS}
            for title in AGENTS:  # warm-up: the static prefix becomes resident
                await one_turn(hass, agents[title], COMMANDS[1], submitted)
            for rep in range(reps):
                for title in AGENTS:
                    samples[title].append(await one_turn(hass, agents[title], COMMANDS[rep % 2], submitted))
            for entry in hass.config_entries.async_entries(DOMAIN):
                await hass.config_entries.async_unload(entry.entry_id)
            await hass.async_block_till_done()
            await hass.async_stop(force=True)
    return samples


def main() -> None:
    """Measure and print one line per agent and the difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--speed", type=float, default=1.0)
    args = parser.parse_args()
    samples = asyncio.run(run(args.reps, args.speed))
    print(
        f"model {MODEL.name} (calibration qwen2.5-1.5b-rk3588), warm commands {COMMANDS}, "
        f"speed x{args.speed:g}, reps {args.reps}, medians:"
    )
    medians: dict[str, tuple[float, float]] = {}
    for title, runs in samples.items():
        first = statistics.median(sample.first_text_s for sample in runs)
        turn = statistics.median(sample.turn_s for sample in runs)
        after_tool = statistics.median(sample.after_tool_s for sample in runs)
        medians[title] = (first, turn)
        print(
            f"  {title:6} quick_confirmations={AGENTS[title]!s:5}  first_text_s {first:.2f}  "
            f"after_tool_s {after_tool:.3f}  turn_s {turn:.2f}  "
            f"engine_calls {sorted({sample.engine_calls for sample in runs})}  "
            f"answers {sorted({sample.text for sample in runs})}"
        )
    saved_first = medians["model"][0] - medians["quick"][0]
    saved_turn = medians["model"][1] - medians["quick"][1]
    print(f"  saved by quick confirmations: first_text {saved_first:.2f} s, turn {saved_turn:.2f} s")


if __name__ == "__main__":
    main()
