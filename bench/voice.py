"""Voice latency on a shared NPU: an Assist voice command while OpenAI API clients use the same model.

Run from the repository root with the project venv's Python, after `scripts/setup` (it has Home Assistant,
aiohttp and the emulator; nothing else is needed):

    .venv/bin/python bench/voice.py [--quick] [--slots 1,2] [--reps 5] [--speed 1]

For each slot count it starts a real Home Assistant (`.venv/bin/hass --skip-pip`, like scripts/develop: the
tracked configuration.yaml with the demo home, an rkllm entry seeded by demo/seed_config.py with `--slots`) in a
temporary config directory on a free port, then measures "turn on the kitchen light" the way a voice satellite
experiences it: `assist_pipeline/run` over the websocket (text input, intent stage only, no TTS offline), timed
from sending the command to the first `intent-progress` event carrying spoken text (`chat_log_delta.content`,
"first delta") and to `intent-end` ("end to end"). After every command the kitchen light must be on; the bench
turns it off again. Home Assistant is stopped at the end, on an error and on Ctrl-C, with every process it
started; config/ and port 8123 are never touched.

Scenarios per slot count (each voice command is a new conversation):
- cold: the first command after start (the Assist prompt is prefilled);
- warm: the same command again with nothing else running (median of --reps runs);
- after API: right after one raw, non-streamed `/v1/chat/completions` request with another system prompt (a
  writing assistant asked for a 100-word paragraph), which evicts the Assist prefix from a single KV context;
- under load: while 4 and while 16 API streams (the writing prompt, long answers capped at --api-tokens) are
  running or queued, started just before the command; API requests refused with 429 are counted, the streams
  are closed once the voice command has ended. "api run" is one such stream alone, for reference.

The model is the emulator's demo model `rkllm_native/emulator/models/qwen2.5-1.5b-assist.model` (Qwen2.5-1.5B
RK3588 timing: prefill 338 tok/s, decode 16.69 tok/s) at emulator speed 1, so the figures are emulated board
seconds (plus Home Assistant's own time). The bench runs a copy of it with extra answer rules, same
calibration: its scripted answer to anything but home commands is one short sentence, so two rules answer the
writing requests (a 100-word paragraph, a 330-word essay); and when an API request evicted the Assist
conversation between the tool call and its answer, the engine re-sends the round as one user turn, which the
demo model's `*turn on*kitchen light*` rule takes for a new command (it calls the tool again, up to
max_tool_iterations), so a rule placed before it answers that turn the way the tool-result rule does.
The `rounds` column counts the agent's model rounds (2 = the call, then the answer).
With --speed N every emulated delay is N times shorter: use it only to check the bench runs (the tests do).

The last line is the summary for the last slot count of --slots (2 by default); the others' figures follow as
`slots<N>_…` keys.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402 - after the sys.path set-up above
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from types import FrameType, SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402

from demo.long_lived_token import create_long_lived_token, load_credentials, login  # noqa: E402
from rkllm_native.build import emulator_library  # noqa: E402

PROG = "bench/voice.py"
DEMO_MODEL = REPO_ROOT / "rkllm_native" / "emulator" / "models" / "qwen2.5-1.5b-assist.model"
TRACKED_CONFIGURATION = REPO_ROOT / "config" / "configuration.yaml"
DEMO_HOME_INCLUDE = "!include ../demo/home.yaml"
COMMAND = "turn on the kitchen light"
KITCHEN_LIGHT = "light.kitchen_light"
DEVELOP_PORT = 8123
API_LOADS = (4, 16)

WRITING_SYSTEM = (
    "You are a writing assistant for a small magazine. Write clear, vivid English prose for a general audience. "
    "Keep a warm tone, avoid cliches and lists, and never use headings unless the editor asks for them."
)
SHORT_REQUEST = "Write a 100-word paragraph about autumn in the city."
LONG_REQUEST = "Write an essay about the history of the bicycle for the next issue."
# Answer rules appended to the demo model (rkllm_native/emulator/MODEL_FORMAT.md §3). A `user` rule without a
# wildcard is a substring test; these match only the bench's writing requests, never a home command.
SHORT_ANSWER = (
    "Autumn arrives in the city quietly, first as a change in the light. The afternoons turn amber and slanted, "
    "and the long shadows of the plane trees stretch across the tram lines. Cafes pull their chairs a little "
    "closer to the windows. On the canals, yellow leaves drift past the moored boats like small paper ships. "
    "People walk faster, collars up, yet they linger at the market stalls piled with pumpkins, apples and "
    "chestnuts roasting in iron drums. By six the streetlamps glow against a violet sky, and the whole city "
    "seems to exhale, settling in for the evenings that grow longer."
)
LONG_ANSWER = " ".join(
    [
        "The bicycle began as a curiosity. In 1817 Karl Drais rolled through Mannheim on his running machine, a "
        "wooden frame with two wheels that the rider pushed along with his feet. It had no pedals and no "
        "brakes, but it proved that a person could balance on two wheels in a line, and that idea never went "
        "away.",
        "Half a century later, French workshops fixed pedals and cranks to the front wheel. The velocipede, "
        "soon nicknamed the boneshaker, was heavy and loud on cobblestones, yet it became a fashion in Paris "
        "and London. Riders wanted more speed, and since each turn of the pedals turned the wheel only once, "
        "the front wheel grew. The high wheeler of the 1870s could be five feet tall. It was fast and elegant, "
        "and a fall over its handlebars was dangerous enough to keep most people off it.",
        "The safety bicycle changed everything. John Kemp Starley's Rover of 1885 had two wheels of similar "
        "size and a chain that drove the rear one, so gearing, not wheel size, set the speed. Three years "
        "later John Boyd Dunlop's pneumatic tyre made the ride smooth. Within a decade bicycles were cheap "
        "enough for clerks, workers and students, and they gave women a freedom of movement that reformers "
        "celebrated and critics feared.",
        "The twentieth century added gears, lighter steel and then aluminium and carbon, but the shape stayed "
        "the same. Cars pushed bicycles to the edge of the road for decades, until cities such as Amsterdam "
        "and Copenhagen chose to build for them again. Today the bicycle is once more a serious answer to "
        "congestion, pollution and the simple question of how to get across town, two centuries after Drais "
        "first pushed off.",
    ]
)
WRITING_RULES = (
    "\n# --- bench/voice.py: answers for the writing requests it sends as API load ---\n"
    f'answer user "{SHORT_REQUEST}" = {SHORT_ANSWER}\n'
    f'answer user "{LONG_REQUEST}" = {LONG_ANSWER}\n'
)
# When an API request evicted the Assist conversation between the tool call and its answer, the engine sends the
# whole round again as one user turn ("Conversation so far: ... Tool result (HassTurnOn): ... Reply to the user's
# last message using the tool results above."). The demo model's `"*turn on*kitchen light*"` rule matches that
# turn anywhere and calls the tool again (until max_tool_iterations or a turn that continues the KV), which no
# real model would do; these rules, placed before the demo's user rules, answer it like its tool rules do.
REBUILT_ROUND_CLOSING = "Reply to the user's last message using the tool results above."
REBUILT_ROUND_RULES = (
    "# --- bench/voice.py: a tool round re-sent as one user turn is answered like the tool result itself ---\n"
    f'answer user "*Tool result (*\\"error\\"*{REBUILT_ROUND_CLOSING}*" = '
    "Sorry, I could not do that: Home Assistant did not find a matching device.\n"
    f'answer user "*Tool result (*HassTurnOn*action_done*Kitchen Light*{REBUILT_ROUND_CLOSING}*" = '
    "Done, the kitchen light is on.\n"
)

# Set in the environment of Home Assistant (and so of its worker) to this run's config directory.
WORKDIR_ENV = "RKLLM_VOICE_BENCH_CONFIG"
START_TIMEOUT_S = 180.0
VOICE_TIMEOUT_S = 600.0
SETTLE_MAX_S = 10.0


class BenchError(Exception):
    """The bench cannot go on; the message says what failed and where to look."""


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class VoiceRun:
    """One voice command as the satellite saw it."""

    e2e_s: float | None  # command sent -> intent-end (None: no intent-end)
    first_delta_s: float | None  # command sent -> first intent-progress with spoken text
    speech: str
    light_on: bool
    error: str | None = None  # an `error` event, a refused run or an error response
    rounds: int = 0  # model rounds the agent ran (assistant messages in the chat log): 2 = call, then answer

    @property
    def ok(self) -> bool:
        """The light went on and nothing reported an error."""
        return self.light_on and self.error is None and self.e2e_s is not None

    @property
    def outcome(self) -> str:
        """`ok`, `refused` (the NPU was busy) or `failed`."""
        if self.ok:
            return "ok"
        text = f"{self.error or ''} {self.speech}".lower()
        return "refused" if "busy" in text or "queue" in text else "failed"


@dataclass
class ApiRun:
    """One API request: its HTTP status, how long it took, and whether it ended well."""

    status: int | None = None
    elapsed_s: float | None = None
    completion_tokens: int | None = None
    error: str | None = None
    done: bool = False  # a complete answer ([DONE] or a non-streamed 200)


@dataclass
class LoadRun:
    """The voice command while `streams` API streams run or wait."""

    streams: int
    voice: VoiceRun
    api: list[ApiRun]

    @property
    def rejected(self) -> int:
        """API requests refused with 429."""
        return sum(1 for run in self.api if run.status == 429)

    @property
    def api_errors(self) -> list[str]:
        """Anything but 429 that went wrong on the API side while the voice command ran."""
        return [run.error for run in self.api if run.error is not None and run.status != 429]


@dataclass
class ConfigResult:
    """Every figure of one slot count."""

    slots: str
    cold: VoiceRun | None = None
    warm: list[VoiceRun] = field(default_factory=list)
    after_api: list[tuple[ApiRun, VoiceRun]] = field(default_factory=list)
    api_run: ApiRun | None = None
    loads: list[LoadRun] = field(default_factory=list)


def median(values: list[float | None]) -> float | None:
    """Median of the measured values (None when none was measured)."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


# ---------------------------------------------------------------------------------------------------------------------
# Home Assistant in a temporary config directory
# ---------------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port nobody listens on now (never 8123, which scripts/develop uses)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port != DEVELOP_PORT:
            return port


def bench_model(demo: str) -> str:
    """The demo model with the rebuilt-round rules before its first user rule and the writing rules at the end."""
    lines = demo.splitlines(keepends=True)
    first_user = next((i for i, line in enumerate(lines) if line.startswith("answer user ")), None)
    if first_user is None:
        raise BenchError(f"{DEMO_MODEL} has no `answer user` rule any more; the bench cannot extend it")
    return "".join(lines[:first_user]) + REBUILT_ROUND_RULES + "".join(lines[first_user:]) + WRITING_RULES


def write_config(config: Path, slots: str, library: Path) -> Path:
    """configuration.yaml (the tracked one, demo home included by absolute path), the bench model, the entry."""
    config.mkdir(parents=True, exist_ok=True)
    tracked = TRACKED_CONFIGURATION.read_text(encoding="utf-8")
    if DEMO_HOME_INCLUDE not in tracked:
        raise BenchError(f"{TRACKED_CONFIGURATION} no longer includes the demo home as {DEMO_HOME_INCLUDE!r}")
    home = REPO_ROOT / "demo" / "home.yaml"
    (config / "configuration.yaml").write_text(tracked.replace(DEMO_HOME_INCLUDE, f"!include {home}"), encoding="utf-8")
    # Same file name as the demo model, so the entry title and the raw model id are those of scripts/develop.
    model = config / DEMO_MODEL.name
    model.write_text(bench_model(DEMO_MODEL.read_text(encoding="utf-8")), encoding="utf-8")
    hass = hass_executable()
    seed = subprocess.run(
        [
            str(hass.parent / "python"),  # seed_config imports the integration, so Home Assistant's venv
            str(REPO_ROOT / "demo" / "seed_config.py"),
            "--config",
            str(config),
            "--library",
            str(library),
            "--model",
            str(model),
            "--platform",
            "rk3588",
            "--slots",
            slots,
            "--hass",
            str(hass),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if seed.returncode != 0:
        raise BenchError(f"demo/seed_config.py failed: {(seed.stderr or seed.stdout).strip()}")
    return model


def hass_executable() -> Path:
    """The `hass` scripts/develop runs (.venv, the 2025.4.4 line: its CLI starts on Python 3.13.0), else this venv's.

    The 2026 line's `hass` refuses to start on Python < 3.13.2, so .venv-2026 is only the fallback.
    """
    for hass in (REPO_ROOT / ".venv" / "bin" / "hass", Path(sys.executable).parent / "hass"):
        if hass.is_file():
            return hass
    raise BenchError(f"no Home Assistant found (.venv/bin/hass): run scripts/setup, then {PROG} with .venv/bin/python")


class HassProcess:
    """`hass --skip-pip` in its own process group, so stopping it also ends the rkllm worker it started."""

    def __init__(self, config: Path, port: int, speed: float) -> None:
        self.config = config
        self.port = port
        self.speed = speed
        self.output = config / "hass.out"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """Where this instance answers."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start hass with the repository on PYTHONPATH, as scripts/develop does."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["RKLLM_DEVELOP_HOST"] = "127.0.0.1"
        env["RKLLM_DEVELOP_PORT"] = str(self.port)
        env["RKLLM_EMULATOR_SPEED"] = f"{self.speed:g}"
        env["RKLLM_DEVELOP"] = "1"  # the integration accepts the emulator's model only on a development machine
        # Inherited by the rkllm worker too: whoever looks for leftovers of this run can find them by it.
        env[WORKDIR_ENV] = str(self.config)
        with self.output.open("wb") as output:
            self._process = subprocess.Popen(
                [str(hass_executable()), "--config", str(self.config), "--skip-pip"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )

    def exited(self) -> int | None:
        """The exit code once hass has ended."""
        return None if self._process is None else self._process.poll()

    def stop(self) -> None:
        """SIGTERM (hass stops in seconds), SIGKILL after 30 s; then whatever is left of its process group."""
        process, self._process = self._process, None
        if process is None:
            return
        group = process.pid  # start_new_session: hass leads its own group
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                print(f"{PROG}: Home Assistant did not stop within 30 s; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                process.wait()
        # The worker watches its parent and exits on its own; anything still in the group is ended here.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)

    def tail(self, lines: int = 25) -> str:
        """The end of hass's output, for an error report."""
        try:
            text = self.output.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------------------------------
# Talking to Home Assistant
# ---------------------------------------------------------------------------------------------------------------------


async def _on_chunk_sent(
    _session: aiohttp.ClientSession, context: SimpleNamespace, _params: aiohttp.TraceRequestChunkSentParams
) -> None:
    """Mark an API request as sent (its body is one chunk), so the load is in place before the voice command."""
    sent = getattr(context.trace_request_ctx, "sent", None)
    if isinstance(sent, asyncio.Event):
        sent.set()


class Bench:
    """One running Home Assistant: the websocket a satellite would hold, the API, the light and /health."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, token: str, api_tokens: int) -> None:
        self.session = session
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.token = token
        self.api_tokens = api_tokens
        self.raw_model = ""
        self.pipeline_id = ""
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 1

    # -- setup --------------------------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Authenticate the websocket, find the raw model and the agent, create a pipeline that uses the agent."""
        health, _ = await self.health()
        self.raw_model = str(health.get("model") or "")
        ws_url = self.base_url.replace("http", "ws", 1) + "/api/websocket"
        self._ws = await self.session.ws_connect(ws_url, max_msg_size=0)
        hello = await self._ws.receive_json(timeout=30)
        if hello.get("type") != "auth_required":
            raise BenchError(f"websocket: unexpected greeting {hello}")
        await self._ws.send_json({"type": "auth", "access_token": self.token})
        auth = await self._ws.receive_json(timeout=30)
        if auth.get("type") != "auth_ok":
            raise BenchError(f"websocket authentication failed: {auth}")
        agent = await self._agent_entity()
        created = await self._call(
            {
                "type": "assist_pipeline/pipeline/create",
                "conversation_engine": agent,
                "conversation_language": "en",
                "language": "en",
                "name": "rkllm voice bench",
                "stt_engine": None,
                "stt_language": None,
                "tts_engine": None,
                "tts_language": None,
                "tts_voice": None,
                "wake_word_entity": None,
                "wake_word_id": None,
            }
        )
        self.pipeline_id = str(created["id"])
        await self.light_off()

    async def close(self) -> None:
        """Close the websocket."""
        if self._ws is not None:
            await self._ws.close()

    async def _agent_entity(self) -> str:
        """The conversation entity of the seeded rkllm agent."""
        async with self.session.get(f"{self.base_url}/api/states", headers=self.headers) as response:
            if response.status != 200:
                raise BenchError(f"GET /api/states: HTTP {response.status}")
            states = await response.json()
        agents = [
            state["entity_id"]
            for state in states
            if state["entity_id"].startswith("conversation.") and state["entity_id"] != "conversation.home_assistant"
        ]
        if not agents:
            raise BenchError("no rkllm conversation agent was set up (see the Home Assistant log)")
        if not any(state["entity_id"] == KITCHEN_LIGHT for state in states):
            raise BenchError(f"{KITCHEN_LIGHT} does not exist: the demo home (demo/home.yaml) did not load")
        return str(agents[0])

    async def _call(self, message: dict[str, Any]) -> Any:
        """A websocket command and its result."""
        ws = self._require_ws()
        message_id = self._next_id
        self._next_id += 1
        await ws.send_json({"id": message_id, **message})
        while True:
            answer = await ws.receive_json(timeout=60)
            if answer.get("id") == message_id and answer.get("type") == "result":
                if not answer.get("success"):
                    raise BenchError(f"websocket {message['type']} failed: {answer.get('error')}")
                return answer.get("result")

    def _require_ws(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None:
            raise BenchError("the websocket is not open")
        return self._ws

    # -- state --------------------------------------------------------------------------------------------------------

    async def health(self) -> tuple[dict[str, Any], int]:
        """GET /health (public): the engine's state and queue depth."""
        async with self.session.get(f"{self.base_url}/health") as response:
            body = await response.json(content_type=None)
            return (body if isinstance(body, dict) else {}), response.status

    async def wait_idle(self, timeout_s: float = 600.0) -> None:
        """Until nothing generates and nothing waits, so the next measurement starts from the same place."""
        deadline = time.monotonic() + timeout_s
        while True:
            body, _ = await self.health()
            if body.get("generation_status") == "idle" and not body.get("queue_depth"):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the engine is still busy after {timeout_s:.0f} s: /health says {body}")
            await asyncio.sleep(0.1)

    async def light_is(self, state: str, wait_s: float) -> bool:
        """Whether the kitchen light reaches `state` within `wait_s` (a template light follows within a tick)."""
        deadline = time.monotonic() + wait_s
        while True:
            async with self.session.get(f"{self.base_url}/api/states/{KITCHEN_LIGHT}", headers=self.headers) as rsp:
                current = (await rsp.json()).get("state") if rsp.status == 200 else None
            if current == state:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)

    async def light_off(self) -> None:
        """Turn the kitchen light off through the REST API and wait until it is."""
        async with self.session.post(
            f"{self.base_url}/api/services/light/turn_off", headers=self.headers, json={"entity_id": KITCHEN_LIGHT}
        ) as response:
            if response.status != 200:
                raise BenchError(f"light.turn_off: HTTP {response.status}: {(await response.text())[:200]}")
        if not await self.light_is("off", 10):
            raise BenchError(f"{KITCHEN_LIGHT} did not turn off")

    # -- the voice command --------------------------------------------------------------------------------------------

    async def voice(self) -> VoiceRun:
        """Run the command through the pipeline as a new conversation, check the light, turn it off again."""
        ws = self._require_ws()
        message_id = self._next_id
        self._next_id += 1
        first_delta_s: float | None = None
        e2e_s: float | None = None
        rounds = 0
        speech = ""
        error: str | None = None
        started = time.monotonic()
        await ws.send_json(
            {
                "id": message_id,
                "type": "assist_pipeline/run",
                "start_stage": "intent",
                "end_stage": "intent",
                "input": {"text": COMMAND},
                "pipeline": self.pipeline_id,
            }
        )
        while True:
            message = await ws.receive_json(timeout=VOICE_TIMEOUT_S)
            if message.get("id") != message_id:
                continue
            elapsed = time.monotonic() - started
            if message.get("type") == "result":
                if not message.get("success"):
                    error = f"assist_pipeline/run refused: {message.get('error')}"
                    break
                continue
            event = message.get("event") or {}
            kind, data = event.get("type"), event.get("data") or {}
            if kind == "intent-progress":
                delta = data.get("chat_log_delta") or {}
                rounds += delta.get("role") == "assistant"
                if first_delta_s is None and isinstance(delta.get("content"), str) and delta["content"].strip():
                    first_delta_s = elapsed
            elif kind == "intent-end":
                e2e_s = elapsed
                response = (data.get("intent_output") or {}).get("response") or {}
                speech = str(((response.get("speech") or {}).get("plain") or {}).get("speech") or "")
                if response.get("response_type") == "error":
                    error = speech or "an error response without speech"
            elif kind == "error":
                error = f"{data.get('code')}: {data.get('message')}"
            elif kind == "run-end":
                break
        light_on = await self.light_is("on", 5)
        if light_on:
            await self.light_off()
        return VoiceRun(e2e_s, first_delta_s, speech, light_on, error, rounds)

    # -- API load -----------------------------------------------------------------------------------------------------

    def _chat_body(self, request: str, *, stream: bool) -> dict[str, Any]:
        return {
            "model": self.raw_model,
            "messages": [{"role": "system", "content": WRITING_SYSTEM}, {"role": "user", "content": request}],
            "stream": stream,
            "max_tokens": self.api_tokens,
        }

    async def raw_request(self) -> ApiRun:
        """One non-streamed writing request (a 100-word answer): evicts the Assist prefix from a single context."""
        run = ApiRun()
        started = time.monotonic()
        async with self.session.post(
            f"{self.base_url}/v1/chat/completions",
            headers=self.headers,
            json=self._chat_body(SHORT_REQUEST, stream=False),
        ) as response:
            run.status = response.status
            body = await response.json(content_type=None)
        run.elapsed_s = time.monotonic() - started
        if run.status == 200:
            run.done = True
            run.completion_tokens = (body.get("usage") or {}).get("completion_tokens")
        else:
            run.error = f"HTTP {run.status}: {json.dumps(body)[:200]}"
        return run

    async def stream(self, sent: asyncio.Event, run: ApiRun) -> None:
        """One streamed writing request with a long answer; fills `run` as it goes (the caller may cancel it)."""
        started = time.monotonic()
        try:
            async with self.session.post(
                f"{self.base_url}/v1/chat/completions",
                headers=self.headers,
                json=self._chat_body(LONG_REQUEST, stream=True),
                trace_request_ctx=SimpleNamespace(sent=sent),
            ) as response:
                run.status = response.status
                if response.status != 200:
                    run.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return
                tokens = 0
                async for raw_line in response.content:
                    line = raw_line.decode("utf-8", errors="replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line.removeprefix("data:").strip()
                    if data == "[DONE]":
                        run.done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        run.error = f"in-band error: {json.dumps(chunk['error'])[:200]}"
                    tokens += sum(
                        1 for choice in chunk.get("choices") or () if (choice.get("delta") or {}).get("content")
                    )
                run.completion_tokens = tokens
        finally:
            sent.set()  # a request that failed before its body went out must not hold up the voice command
            run.elapsed_s = time.monotonic() - started

    async def api_run_alone(self) -> ApiRun:
        """One long stream with nothing else running: how long an API client holds the NPU."""
        run = ApiRun()
        await self.stream(asyncio.Event(), run)
        return run

    async def under_load(self, streams: int) -> LoadRun:
        """Start `streams` API streams, let them reach the engine, run the voice command, then close them."""
        runs = [ApiRun() for _ in range(streams)]
        sent = [asyncio.Event() for _ in range(streams)]
        tasks = [asyncio.create_task(self.stream(event, run)) for event, run in zip(sent, runs, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in sent)), 60)
            await self._settle(runs)
            voice = await self.voice()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.wait_idle()
        return LoadRun(streams=streams, voice=voice, api=runs)

    async def _settle(self, runs: list[ApiRun]) -> None:
        """Until the engine generates and its queue and the 429 count stop changing (admission has happened)."""
        deadline = time.monotonic() + SETTLE_MAX_S
        last: tuple[object, ...] | None = None
        stable = 0
        while time.monotonic() < deadline:
            body, _ = await self.health()
            snapshot = (body.get("generation_status"), body.get("queue_depth"), sum(r.status == 429 for r in runs))
            stable = stable + 1 if snapshot == last and snapshot[0] == "generating" else 0
            if stable >= 3:
                return
            last = snapshot
            await asyncio.sleep(0.1)


async def wait_ready(hass: HassProcess, session: aiohttp.ClientSession) -> None:
    """Until /health says the model is loaded (the integration's own endpoint; /api/ answers even in recovery)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if (code := hass.exited()) is not None:
            raise BenchError(f"Home Assistant exited with code {code} while starting")
        try:
            async with session.get(f"{hass.base_url}/health") as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}: {(await response.text())[:200]}"
        except aiohttp.ClientError as err:
            last = repr(err)
        await asyncio.sleep(0.5)
    raise BenchError(f"Home Assistant was not ready after {START_TIMEOUT_S:.0f} s (/health: {last})")


async def measure(hass: HassProcess, slots: str, args: argparse.Namespace) -> ConfigResult:
    """Every scenario on one running Home Assistant."""
    result = ConfigResult(slots=slots)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=VOICE_TIMEOUT_S)
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_on_chunk_sent)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, trace_configs=[trace], connector=connector) as session:
        await wait_ready(hass, session)
        username, password = load_credentials(hass.config / ".develop_user.json")
        access = await login(session, hass.base_url, username, password)
        token = await create_long_lived_token(session, hass.base_url, access, "rkllm voice bench", 1)
        bench = Bench(session, hass.base_url, token, args.api_tokens)
        await bench.open()
        try:
            step = f"{PROG}: slots={slots}:"
            print(f"{step} cold command", file=sys.stderr)
            result.cold = await bench.voice()
            print(f"{step} {args.reps} warm commands", file=sys.stderr)
            for _ in range(args.reps):
                result.warm.append(await bench.voice())
            print(f"{step} {args.after_reps} x (raw /v1 request, then the command)", file=sys.stderr)
            for _ in range(args.after_reps):
                api = await bench.raw_request()
                result.after_api.append((api, await bench.voice()))
            print(f"{step} one API stream alone", file=sys.stderr)
            result.api_run = await bench.api_run_alone()
            await bench.wait_idle()
            for streams in API_LOADS:
                print(f"{step} the command under {streams} API streams", file=sys.stderr)
                result.loads.append(await bench.under_load(streams))
        finally:
            await bench.close()
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    """A figure, or '-' when it was not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def print_row(
    slots: str,
    scenario: str,
    voice: list[VoiceRun],
    warm_e2e: float | None,
    api_s: float | None = None,
    rejected: str = "-",
) -> None:
    """One scenario: medians over its voice commands, their ratio to warm, and what went wrong if anything."""
    e2e = median([run.e2e_s for run in voice])
    ratio = e2e / warm_e2e if e2e is not None and warm_e2e else None
    outcomes = [run.outcome for run in voice]
    outcome = outcomes[0] if len(set(outcomes)) == 1 else ",".join(outcomes)
    if outcome != "ok":
        outcome += f": {next((run.error or run.speech for run in voice if not run.ok), '')[:90]}"
    rounds = max(run.rounds for run in voice)
    print(
        f"{slots:>5}  {scenario:<28} {fmt(e2e):>7} {fmt(median([run.first_delta_s for run in voice])):>13} "
        f"{fmt(ratio):>7} {rounds:>6} {fmt(api_s):>9} {rejected:>7}  {outcome}"
    )


def print_table(results: list[ConfigResult]) -> None:
    """One row per scenario and slot count."""
    header = (
        f"{'slots':>5}  {'scenario':<28} {'e2e_s':>7} {'first_delta_s':>13} {'x_warm':>7} {'rounds':>6} "
        f"{'api_run_s':>9} {'api_429':>7}  voice"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        warm = median([run.e2e_s for run in result.warm])
        if result.cold is not None:
            print_row(result.slots, "cold (first command)", [result.cold], warm)
        print_row(result.slots, f"warm (median of {len(result.warm)})", result.warm, warm)
        if result.after_api:
            print_row(
                result.slots,
                f"after 1 raw /v1 request ({len(result.after_api)})",
                [voice for _, voice in result.after_api],
                warm,
                median([api.elapsed_s for api, _ in result.after_api]),
            )
        api_s = result.api_run.elapsed_s if result.api_run is not None else None
        for load in result.loads:
            print_row(
                result.slots,
                f"{load.streams} API streams",
                [load.voice],
                warm,
                api_s,
                f"{load.rejected}/{load.streams}",
            )
            for error in load.api_errors:
                print(f"{'':>7}  API error during the load: {error}")


def summary(result: ConfigResult, prefix: str = "") -> list[str]:
    """`key=value` figures of one slot count."""
    warm = median([run.e2e_s for run in result.warm])
    after = median([voice.e2e_s for _, voice in result.after_api])
    values: dict[str, str] = {
        "voice_warm_s": fmt(warm, 3),
        "voice_first_delta_s": fmt(median([run.first_delta_s for run in result.warm]), 3),
        "voice_after_api_ratio": fmt(after / warm if after is not None and warm else None, 3),
    }
    for load in result.loads:
        key = "voice_under_load_s" if load.streams == API_LOADS[0] else f"voice_under_load_{load.streams}_s"
        values[key] = fmt(load.voice.e2e_s, 3) if load.voice.ok else load.voice.outcome
    values["slots"] = result.slots
    values["voice_after_api_s"] = fmt(after, 3)
    for load in result.loads:
        suffix = "" if load.streams == API_LOADS[0] else f"_{load.streams}"
        values[f"voice_first_delta_under_load{suffix}_s"] = fmt(load.voice.first_delta_s, 3)
    for load in result.loads:
        values[f"api_429_of_{load.streams}"] = str(load.rejected)
    values["api_run_s"] = fmt(result.api_run.elapsed_s if result.api_run else None, 3)
    voices = [
        *([result.cold] if result.cold else []),
        *result.warm,
        *(voice for _, voice in result.after_api),
        *(load.voice for load in result.loads),
    ]
    values["voice_refused"] = str(sum(1 for run in voices if run.outcome == "refused"))
    values["voice_failed"] = str(sum(1 for run in voices if run.outcome == "failed"))
    return [f"{prefix}{key}={value}" for key, value in values.items() if not (prefix and key == "slots")]


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options; --quick lowers the repetitions."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Run with the project venv: .venv/bin/python bench/voice.py (after scripts/setup).",
    )
    parser.add_argument("--slots", default="1,2", help='comma-separated slot counts to compare (default "1,2")')
    parser.add_argument("--reps", type=int, help="warm commands per slot count, median reported (default 5)")
    parser.add_argument("--after-reps", type=int, help="raw-request-then-command rounds (default 3)")
    parser.add_argument("--api-tokens", type=int, default=256, help="max_tokens of the API requests (default 256)")
    parser.add_argument("--speed", type=float, default=1.0, help="emulator speed; 1 = RK3588 board time (default)")
    parser.add_argument("--quick", action="store_true", help="2 warm commands and 1 after-API round")
    parser.add_argument("--keep", action="store_true", help="keep the temporary config directory (logs) and say where")
    args = parser.parse_args(argv)
    args.reps = args.reps if args.reps is not None else (2 if args.quick else 5)
    args.after_reps = args.after_reps if args.after_reps is not None else (1 if args.quick else 3)
    args.slot_counts = [value.strip() for value in args.slots.split(",") if value.strip()]
    for value in args.slot_counts:
        if value != "auto" and not (value.isascii() and value.isdigit() and int(value) >= 1):
            parser.error(f'--slots: {value!r} is not "auto" or a positive count')
    if not args.slot_counts:
        parser.error("--slots: give at least one slot count")
    if args.reps < 1 or args.after_reps < 1 or args.api_tokens < 1 or args.speed <= 0:
        parser.error("--reps, --after-reps and --api-tokens must be >= 1, --speed > 0")
    return args


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM like Ctrl-C: unwind, so Home Assistant is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace, workdir: Path) -> list[ConfigResult]:
    """Each slot count on its own fresh Home Assistant, stopped before the next starts."""
    library = emulator_library("v12x")
    results: list[ConfigResult] = []
    for slots in args.slot_counts:
        config = workdir / f"slots-{slots}"
        write_config(config, slots, library)
        hass = HassProcess(config, free_port(), args.speed)
        print(f"{PROG}: slots={slots}: starting Home Assistant on {hass.base_url} ({config})", file=sys.stderr)
        try:
            hass.start()
            results.append(asyncio.run(measure(hass, slots, args)))
        except (BenchError, aiohttp.ClientError, TimeoutError, ValueError, KeyError) as err:
            message = f"{type(err).__name__}: {err}" if not isinstance(err, BenchError) else str(err)
            tail = hass.tail()
            raise BenchError(f"slots={slots}: {message}\n--- end of the Home Assistant output ---\n{tail}") from err
        finally:
            hass.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print the table and the one-line summary."""
    args = parse_args(argv)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="rkllm-voice-bench-"))
    try:
        results = run(args, workdir)
    except BenchError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; Home Assistant stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"{PROG}: kept {workdir} (hass.out and home-assistant.log per slot count)", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    wall = time.monotonic() - started
    speed = "RK3588 board seconds" if args.speed == 1 else f"wall seconds at emulator speed x{args.speed:g}"
    print(
        f"voice command {COMMAND!r} through the Assist pipeline (websocket, text, intent stage); "
        f"model {DEMO_MODEL.name} (emulator), {speed}"
    )
    print(
        f"API load: writing-assistant system prompt; raw request = 100-word answer (non-streamed), "
        f"streams = long answers capped at {args.api_tokens} tokens; api_run_s = one stream alone"
    )
    print_table(results)
    print(f"bench wall time {wall:.0f} s")
    main_result, others = results[-1], results[:-1]
    keys = summary(main_result)
    for other in others:
        keys += summary(other, prefix=f"slots{other.slots}_")
    print(" ".join(keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
