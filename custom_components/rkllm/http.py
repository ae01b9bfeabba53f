"""The OpenAI-compatible API and `/health` on Home Assistant's own HTTP server.

Routes: `POST /v1/chat/completions` (and its alias `POST /v1/`), `POST /v1/completions`, `GET /v1/models`,
`GET /v1/models/{model_id}`, `GET /health`. Views are registered once per Home Assistant run (they cannot be
unregistered) and look up the loaded config entry on every request, so a reload never leaves a stale engine behind.

Decisions (README "OpenAI-compatible API" documents them for users):
- Auth: the bearer key is a Home Assistant access token (a long-lived token works unchanged as the OpenAI
  `api_key`). The views check authentication themselves so a failure is an OpenAI-shaped 401, and report it to
  HA's ban accounting (`process_wrong_login`), exactly as an authenticated view would. `/health` is public.
- CORS: allowed from any origin. Browser-based OpenAI clients need it; the bearer token is never sent implicitly by
  a browser (it is not a cookie), so another site cannot use a user's session through these routes.
- Models: the raw model (client tools come back as `tool_calls`) and one model per conversation agent (Home
  Assistant's tools run server-side with the caller's rights). An unknown model id in a completion request is
  served by the raw model (lenient single-model mode, docs/openai-api.md §1.1); `GET /v1/models/{unknown}` is 404.
- Errors are decided before the first byte when possible: for a stream the response is prepared only when the
  first event arrives or the first keep-alive is due, so queue-full (429), unavailable (503) and context overflow
  (400) get their status code; later errors go in-band followed by `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final, Protocol

from aiohttp import web
from homeassistant.components.http.ban import process_wrong_login
from homeassistant.components.http.const import KEY_HASS_USER
from homeassistant.config_entries import SIGNAL_CONFIG_ENTRY_CHANGED, ConfigEntry, ConfigEntryChange, ConfigEntryState
from homeassistant.core import Context, HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers.dispatcher import async_dispatcher_connect
from homeassistant.helpers.http import KEY_AUTHENTICATED, KEY_HASS, HomeAssistantView
from homeassistant.util.hass_dict import HassKey

from rkllm_engine.engine import Engine, Generation
from rkllm_engine.types import (
    ChatRequest,
    CompletionRequest,
    ContextOverflowError,
    EngineError,
    EngineMetrics,
    EngineState,
    EngineUnavailableError,
    Event,
    Finished,
    InvalidRequestError,
    Perf,
    QueueFullError,
    ReasoningDelta,
    TextDelta,
    WorkerHungError,
)
from rkllm_openai.schemas import (
    MAX_BODY_BYTES,
    ModelListObject,
    ModelObject,
    OpenAIError,
    ParsedChat,
    body_too_large,
    parse_body,
    parse_chat_request,
    parse_completion_request,
)
from rkllm_openai.stream import (
    SSE_DONE,
    SSE_HEADERS,
    SSE_PING,
    ChatCompletionTranslator,
    TextCompletionTranslator,
    sse_error,
    sse_event,
)

from .agent_api import AgentDelta, AgentRequestError, agent_models, async_run_agent
from .const import DOMAIN
from .data import RkllmRuntimeData

_LOGGER = logging.getLogger(__name__)

DATA_VIEWS: Final[HassKey[_ViewState]] = HassKey(f"{DOMAIN}_http_views")
# Keep-alive comment while a stream is silent (queued or prefilling): below common proxy idle timeouts (30-60 s).
SSE_PING_INTERVAL_S: Final = 10.0
# Retry-After while the model loads or the worker restarts: a model load takes seconds (docs/runtime.md §10.2).
UNAVAILABLE_RETRY_AFTER_S: Final = 10
OWNED_BY: Final = "rkllm"
AGENT_TEXT_SEPARATOR: Final = "\n\n"
NO_RESULT_MESSAGE: Final = "the generation ended without a result"


# ---------------------------------------------------------------------------------------------------------------------
# Registration and per-process state
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _ViewState:
    """Per-process state of the views: when each engine's entry finished loading (`created` of its model)."""

    loaded_at: weakref.WeakKeyDictionary[Engine, int]


@callback
def async_register_views(hass: HomeAssistant) -> None:
    """Register the API views once per Home Assistant run (views cannot be unregistered)."""
    if DATA_VIEWS in hass.data:
        return
    state = _ViewState(loaded_at=weakref.WeakKeyDictionary())
    hass.data[DATA_VIEWS] = state

    @callback
    def _entry_changed(change: ConfigEntryChange, entry: ConfigEntry) -> None:
        if entry.domain != DOMAIN or entry.state is not ConfigEntryState.LOADED:
            return
        data = getattr(entry, "runtime_data", None)
        if isinstance(data, RkllmRuntimeData):
            state.loaded_at.setdefault(data.engine, int(time.time()))

    # Lives as long as Home Assistant, like the views.
    async_dispatcher_connect(hass, SIGNAL_CONFIG_ENTRY_CHANGED, _entry_changed)
    for view in (ChatCompletionsView(), CompletionsView(), ModelsView(), ModelView(), HealthView()):
        hass.http.register_view(view)


def _loaded_at(hass: HomeAssistant, engine: Engine) -> int:
    state = hass.data.get(DATA_VIEWS)
    if state is None:
        return int(time.time())
    return state.loaded_at.setdefault(engine, int(time.time()))


def _loaded_runtimes(hass: HomeAssistant) -> list[RkllmRuntimeData]:
    """Runtime data of every loaded entry, in entry order."""
    runtimes: list[RkllmRuntimeData] = []
    for entry in hass.config_entries.async_loaded_entries(DOMAIN):
        data = getattr(entry, "runtime_data", None)
        if isinstance(data, RkllmRuntimeData):
            runtimes.append(data)
    return runtimes


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


def _error_response(error: OpenAIError) -> web.Response:
    return HomeAssistantView.json(error.body(), error.status, headers=error.headers or None)


def _internal_error(message: str) -> OpenAIError:
    return OpenAIError(message, status=HTTPStatus.INTERNAL_SERVER_ERROR, error_type="server_error")


def _no_model_error() -> OpenAIError:
    return OpenAIError(
        "no RKLLM model is loaded: set up the RKLLM integration (or wait until its model has loaded)",
        status=HTTPStatus.SERVICE_UNAVAILABLE,
        error_type="unavailable_error",
        code="model_not_loaded",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
    )


def engine_error(err: EngineError, *, prompt_param: str) -> OpenAIError:
    """The HTTP answer to an engine failure (status table of docs/openai-api.md §2.7)."""
    if isinstance(err, QueueFullError):
        return OpenAIError(
            str(err),
            status=HTTPStatus.TOO_MANY_REQUESTS,
            error_type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, math.ceil(err.retry_after_s)))},
        )
    if isinstance(err, EngineUnavailableError):
        return OpenAIError(
            str(err),
            status=HTTPStatus.SERVICE_UNAVAILABLE,
            error_type="unavailable_error",
            code="model_not_loaded",
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )
    if isinstance(err, ContextOverflowError):
        message = str(err)
        if err.context_length is not None:
            message = f"This model's maximum context length is {err.context_length} tokens: {message}"
        return OpenAIError(message, param=prompt_param, code="context_length_exceeded")
    if isinstance(err, WorkerHungError):
        return OpenAIError(
            str(err),
            status=HTTPStatus.SERVICE_UNAVAILABLE,
            error_type="unavailable_error",
            code=err.code,
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )
    if isinstance(err, InvalidRequestError):
        return OpenAIError(str(err), param=err.param, code="invalid_value")
    return OpenAIError(str(err), status=HTTPStatus.INTERNAL_SERVER_ERROR, error_type="server_error", code=err.code)


def _agent_error(err: HomeAssistantError) -> OpenAIError:
    """An agent turn's failure: the engine's own error when there is one, else a 400/500 with HA's message."""
    engine_err = getattr(err, "engine_error", None)
    if isinstance(engine_err, EngineError):
        return engine_error(engine_err, prompt_param="messages")
    if isinstance(err, AgentRequestError):
        return OpenAIError(f"agent models: {err}", param="messages")
    return OpenAIError(
        str(err) or type(err).__name__, status=HTTPStatus.INTERNAL_SERVER_ERROR, error_type="server_error"
    )


async def _read_body(request: web.Request) -> bytes:
    """The body, refused with an OpenAI-shaped 413 past `MAX_BODY_BYTES` (aiohttp's own limit answers in text)."""
    announced = request.content_length
    if announced is not None and announced > MAX_BODY_BYTES:
        raise body_too_large(announced)
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise body_too_large(announced)
    return bytes(body)


async def _check_auth(request: web.Request) -> web.Response | None:
    """None when authenticated; else the OpenAI-shaped 401, counted as a failed login like HA's own views."""
    if request.get(KEY_AUTHENTICATED, False):
        return None
    await process_wrong_login(request)
    error = OpenAIError(
        "missing or invalid API key: send a Home Assistant long-lived access token as the bearer key "
        "(Authorization: Bearer <token>)",
        status=HTTPStatus.UNAUTHORIZED,
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )
    return _error_response(error)


# ---------------------------------------------------------------------------------------------------------------------
# Event sources: the engine's Generation, or an agent turn reporting deltas
# ---------------------------------------------------------------------------------------------------------------------


class _Timeout:
    """Nothing arrived within the wait; the same wait continues on the next call."""


TIMEOUT: Final = _Timeout()


class EventSource(Protocol):
    """Engine events of one request; `close` cancels what is still running and frees the NPU slot."""

    async def next_event(self, wait_s: float | None) -> Event | _Timeout | None:
        """The next event, None after the last one, TIMEOUT when nothing arrived in time; raises EngineError."""

    async def close(self) -> None:
        """Stop the request (dequeue or abort) and wait until the slot is free."""

    def commit(self) -> None:
        """The response started (headers sent): from now on a voice request must not shed this one."""


class GenerationSource:
    """Events of an engine `Generation`; a wait that times out keeps the pending `__anext__` for the next call.

    (`asyncio.wait_for` would cancel `__anext__`, which cancels the whole generation.)
    """

    def __init__(self, generation: Generation) -> None:
        """Wrap a submitted generation."""
        self._generation = generation
        self._pending: asyncio.Task[Event | None] | None = None

    async def _next(self) -> Event | None:
        try:
            event: Event = await anext(self._generation)
        except StopAsyncIteration:
            return None
        return event

    async def next_event(self, wait_s: float | None) -> Event | _Timeout | None:
        """See `EventSource.next_event`."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._next())
        done, _ = await asyncio.wait({self._pending}, timeout=wait_s)
        if not done:
            return TIMEOUT
        task, self._pending = self._pending, None
        return task.result()

    async def close(self) -> None:
        """See `EventSource.close`."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await self._generation.cancel()

    def commit(self) -> None:
        """See `EventSource.commit`."""
        self._generation.commit()


class AgentSource:
    """Events of a conversation agent's turn: its visible text and reasoning, then a Finished with its usage.

    Tool calls run server-side and are not shown as `tool_calls`; text that follows a tool result is separated
    from earlier text by a blank line.
    """

    def __init__(self, hass: HomeAssistant, entity_id: str, parsed: ParsedChat, context: Context) -> None:
        """Start the agent turn at once (it queues for the NPU like any request)."""
        self._queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()
        self._text_seen = False
        self._after_tool = False

        def on_delta(delta: AgentDelta) -> None:
            if delta.kind == "text" and delta.text:
                if self._after_tool and self._text_seen:
                    self._queue.put_nowait(TextDelta(AGENT_TEXT_SEPARATOR))
                self._after_tool = False
                self._text_seen = True
                self._queue.put_nowait(TextDelta(delta.text))
            elif delta.kind == "reasoning" and delta.text:
                self._queue.put_nowait(ReasoningDelta(delta.text))
            elif delta.kind in ("tool_call", "tool_result"):
                self._after_tool = True

        async def run() -> None:
            try:
                result = await async_run_agent(
                    hass, entity_id, parsed.request.messages, context=context, on_delta=on_delta
                )
            except (HomeAssistantError, EngineError) as err:
                self._queue.put_nowait(err)
                return
            except Exception as err:
                _LOGGER.exception("agent turn for %s failed unexpectedly", entity_id)
                self._queue.put_nowait(_internal_error(f"the agent turn failed: {type(err).__name__}: {err}"))
                return
            if not self._text_seen and result.text:
                self._queue.put_nowait(TextDelta(result.text))
            self._queue.put_nowait(Finished(finish_reason="stop", usage=result.usage, perf=Perf()))
            self._queue.put_nowait(None)

        self._task = hass.async_create_background_task(run(), name="rkllm-api-agent-turn")

    async def next_event(self, wait_s: float | None) -> Event | _Timeout | None:
        """See `EventSource.next_event`; HomeAssistantError is raised as the matching OpenAIError."""
        try:
            item = await asyncio.wait_for(self._queue.get(), wait_s)
        except TimeoutError:
            return TIMEOUT
        if isinstance(item, EngineError):
            raise item
        if isinstance(item, HomeAssistantError):
            raise _agent_error(item)
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        """See `EventSource.close`: cancelling the turn cancels its engine generation."""
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    def commit(self) -> None:
        """See `EventSource.commit`: an agent turn's requests run at API priority and may still be shed."""


# ---------------------------------------------------------------------------------------------------------------------
# Responding: one loop for plain and streamed answers
# ---------------------------------------------------------------------------------------------------------------------


class Translator(Protocol):
    """ChatCompletionTranslator or TextCompletionTranslator."""

    finished: Finished | None

    def start(self) -> Sequence[Any]:
        """Chunks sent when the stream opens."""

    def feed(self, event: Event) -> Sequence[Any]:
        """Chunks for one event."""

    def completion(self) -> Any:
        """The non-streamed object."""


def _as_openai_error(err: Exception, prompt_param: str) -> OpenAIError:
    """Any failure of a request as the OpenAI error a client gets (unexpected ones are logged with a trace)."""
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, EngineError):
        return engine_error(err, prompt_param=prompt_param)
    _LOGGER.error("request failed unexpectedly", exc_info=err)
    return _internal_error(f"the request failed: {type(err).__name__}: {err}")


async def _respond_plain(source: EventSource, translator: Translator, prompt_param: str) -> web.Response:
    """Consume every event, then answer with the complete object (or the error's status)."""
    try:
        while (event := await source.next_event(None)) is not None:
            if not isinstance(event, _Timeout):
                translator.feed(event)
    except Exception as err:  # noqa: BLE001 - every failure becomes an OpenAI-shaped answer
        return _error_response(_as_openai_error(err, prompt_param))
    if translator.finished is None:
        return _error_response(_internal_error(NO_RESULT_MESSAGE))
    return HomeAssistantView.json(translator.completion())


async def _respond_stream(
    request: web.Request, source: EventSource, translator: Translator, prompt_param: str
) -> web.StreamResponse:
    """SSE: wait for the first event (or the first keep-alive) before the headers, so early errors keep a status."""
    try:
        first = await source.next_event(SSE_PING_INTERVAL_S)
    except Exception as err:  # noqa: BLE001 - every failure becomes an OpenAI-shaped answer
        return _error_response(_as_openai_error(err, prompt_param))

    response = web.StreamResponse(status=HTTPStatus.OK, headers=SSE_HEADERS)
    source.commit()
    await response.prepare(request)
    try:
        for chunk in translator.start():
            await response.write(sse_event(chunk))
        event = first
        while True:
            if isinstance(event, _Timeout):
                await response.write(SSE_PING)
            elif event is None:
                if translator.finished is None:
                    await response.write(sse_error(_internal_error(NO_RESULT_MESSAGE).body()))
                break
            else:
                for chunk in translator.feed(event):
                    await response.write(sse_event(chunk))
            try:
                event = await source.next_event(SSE_PING_INTERVAL_S)
            except Exception as err:  # noqa: BLE001 - after the headers, errors go in-band
                await response.write(sse_error(_as_openai_error(err, prompt_param).body()))
                break
        await response.write(SSE_DONE)
        await response.write_eof()
    except ConnectionResetError:
        # The client went away; `close()` (by the caller) aborts the run and frees the slot.
        _LOGGER.debug("client disconnected from the stream %s", request.path)
    return response


async def _respond(
    request: web.Request, source: EventSource, translator: Translator, *, stream: bool, prompt_param: str
) -> web.StreamResponse:
    """Answer from `source` and always close it (a cancelled handler = a client that went away)."""
    try:
        if stream:
            return await _respond_stream(request, source, translator, prompt_param)
        return await _respond_plain(source, translator, prompt_param)
    finally:
        await source.close()


# ---------------------------------------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------------------------------------


def _submit(
    runtime: RkllmRuntimeData, engine_request: ChatRequest | CompletionRequest, prompt_param: str
) -> GenerationSource:
    """Admission before any byte: queue full → 429, not loaded → 503, request the engine refuses → 400."""
    try:
        return GenerationSource(runtime.engine.submit(engine_request))
    except EngineError as err:
        raise engine_error(err, prompt_param=prompt_param) from err


def _raw_runtime(hass: HomeAssistant, model: str | None) -> RkllmRuntimeData:
    """The runtime serving `model`: the one whose raw id matches, else the first (lenient single-model mode)."""
    runtimes = _loaded_runtimes(hass)
    if not runtimes:
        raise _no_model_error()
    for runtime in runtimes:
        if runtime.model_id == model:
            return runtime
    if model:
        _LOGGER.debug("unknown model %r requested; serving %s", model, runtimes[0].model_id)
    return runtimes[0]


def _agent_entity(hass: HomeAssistant, model: str | None) -> tuple[str, str] | None:
    """(entity_id, model id) of the conversation agent served as `model`, if it is one."""
    if not model:
        return None
    for agent in agent_models(hass):
        if agent.model_id == model:
            return agent.entity_id, agent.model_id
    return None


def _check_agent_request(parsed: ParsedChat) -> None:
    """Agent models run Home Assistant's tools themselves and answer in speech text: refuse what they cannot honour."""
    if parsed.client_tools_sent:
        raise OpenAIError(
            "agent models call Home Assistant's tools server-side and do not accept client tools; send client "
            "tools to the raw model instead (see GET /v1/models)",
            param="tools",
            code="unsupported_parameter",
        )
    if parsed.request.json_mode:
        raise OpenAIError(
            "response_format JSON is not supported by agent models; use the raw model",
            param="response_format",
            code="unsupported_parameter",
        )


class _TokenView(HomeAssistantView):
    """An OpenAI endpoint: its handler checks the token (`_check_auth`) so a client gets an OpenAI-shaped 401."""

    requires_auth = False
    cors_allowed = True


class ChatCompletionsView(_TokenView):
    """`POST /v1/chat/completions` and the alias `POST /v1/`."""

    url = "/v1/chat/completions"
    extra_urls = ["/v1/"]  # noqa: RUF012 - HomeAssistantView declares it as a plain class attribute
    name = "api:rkllm:chat_completions"

    async def post(self, request: web.Request) -> web.StreamResponse:
        """Answer a chat completion, streamed or not."""
        if (denied := await _check_auth(request)) is not None:
            return denied
        hass = request.app[KEY_HASS]
        try:
            parsed = parse_chat_request(parse_body(await _read_body(request)))
            source, model_id = self._source(hass, request, parsed)
        except OpenAIError as err:
            return _error_response(err)
        translator = ChatCompletionTranslator(
            model=model_id, include_usage=parsed.include_usage, json_mode=parsed.request.json_mode
        )
        return await _respond(request, source, translator, stream=parsed.stream, prompt_param="messages")

    @staticmethod
    def _source(hass: HomeAssistant, request: web.Request, parsed: ParsedChat) -> tuple[EventSource, str]:
        agent = _agent_entity(hass, parsed.model)
        if agent is not None:
            _check_agent_request(parsed)
            if not _loaded_runtimes(hass):
                raise _no_model_error()
            user = request.get(KEY_HASS_USER)
            context = Context(user_id=user.id if user is not None else None)
            entity_id, model_id = agent
            return AgentSource(hass, entity_id, parsed, context), model_id
        runtime = _raw_runtime(hass, parsed.model)
        return _submit(runtime, parsed.request, "messages"), runtime.model_id


def _refuse_agent_model(hass: HomeAssistant, model: str | None) -> None:
    """Legacy completions take a raw prompt, which an agent (a chat turn with tools) cannot answer."""
    if _agent_entity(hass, model) is not None:
        raise OpenAIError(
            "agent models only answer chat completions; use /v1/chat/completions or the raw model", param="model"
        )


class CompletionsView(_TokenView):
    """`POST /v1/completions` (legacy): the raw prompt, no chat template."""

    url = "/v1/completions"
    name = "api:rkllm:completions"

    async def post(self, request: web.Request) -> web.StreamResponse:
        """Answer a legacy completion, streamed or not."""
        if (denied := await _check_auth(request)) is not None:
            return denied
        hass = request.app[KEY_HASS]
        try:
            parsed = parse_completion_request(parse_body(await _read_body(request)))
            _refuse_agent_model(hass, parsed.model)
            runtime = _raw_runtime(hass, parsed.model)
            source = _submit(runtime, parsed.request, "prompt")
        except OpenAIError as err:
            return _error_response(err)
        translator = TextCompletionTranslator(model=runtime.model_id, include_usage=parsed.include_usage)
        return await _respond(request, source, translator, stream=parsed.stream, prompt_param="prompt")


def _model_objects(hass: HomeAssistant) -> list[ModelObject]:
    """The raw model of every loaded entry, then every conversation agent."""
    objects: list[ModelObject] = []
    created_by_entry: dict[str, int] = {}
    context_by_entry: dict[str, int] = {}
    for entry in hass.config_entries.async_loaded_entries(DOMAIN):
        data = getattr(entry, "runtime_data", None)
        if not isinstance(data, RkllmRuntimeData):
            continue
        created = _loaded_at(hass, data.engine)
        context_length: int = data.engine.metrics.context_length or data.engine.config.context_length
        created_by_entry[entry.entry_id] = created
        context_by_entry[entry.entry_id] = context_length
        objects.append(
            {
                "id": data.model_id,
                "object": "model",
                "created": created,
                "owned_by": OWNED_BY,
                "max_model_len": context_length,
            }
        )
    for agent in agent_models(hass):
        if agent.entry_id not in created_by_entry:
            continue
        objects.append(
            {
                "id": agent.model_id,
                "object": "model",
                "created": created_by_entry[agent.entry_id],
                "owned_by": OWNED_BY,
                "max_model_len": context_by_entry[agent.entry_id],
            }
        )
    return objects


class ModelsView(_TokenView):
    """`GET /v1/models`."""

    url = "/v1/models"
    name = "api:rkllm:models"

    async def get(self, request: web.Request) -> web.Response:
        """List the raw model(s) and the agent models; an empty list when nothing is loaded."""
        if (denied := await _check_auth(request)) is not None:
            return denied
        body: ModelListObject = {"object": "list", "data": _model_objects(request.app[KEY_HASS])}
        return self.json(body)


class ModelView(_TokenView):
    """`GET /v1/models/{model_id}`."""

    url = "/v1/models/{model_id}"
    name = "api:rkllm:model"

    async def get(self, request: web.Request, model_id: str) -> web.Response:
        """One model, or 404 `model_not_found`."""
        if (denied := await _check_auth(request)) is not None:
            return denied
        for model in _model_objects(request.app[KEY_HASS]):
            if model["id"] == model_id:
                return self.json(model)
        return _error_response(
            OpenAIError(
                f"The model '{model_id}' does not exist",
                status=HTTPStatus.NOT_FOUND,
                param="model",
                code="model_not_found",
            )
        )


# ---------------------------------------------------------------------------------------------------------------------
# Health
# ---------------------------------------------------------------------------------------------------------------------


_ENTRY_LOADING_STATES: Final = frozenset(
    {ConfigEntryState.SETUP_IN_PROGRESS, ConfigEntryState.SETUP_RETRY, ConfigEntryState.NOT_LOADED}
)


def _health(hass: HomeAssistant) -> tuple[dict[str, Any], int]:
    """The original API's health shape plus model and worker facts; 200 while idle or busy, else 503."""
    entries = [entry for entry in hass.config_entries.async_entries(DOMAIN) if not entry.disabled_by]
    for entry in entries:
        data = getattr(entry, "runtime_data", None)
        if entry.state is ConfigEntryState.LOADED and isinstance(data, RkllmRuntimeData):
            return _engine_health(data, data.engine.metrics)
    loading = any(entry.state in _ENTRY_LOADING_STATES for entry in entries)
    reason = "the model is loading" if loading else "no RKLLM model is set up"
    if entries and not loading:
        failed = entries[0]
        reason = f"the RKLLM entry failed to set up: {failed.reason or failed.state.value}"
    body: dict[str, Any] = {
        "status": "loading" if loading else "unhealthy",
        "generation_status": "idle",
        "tools_loaded": [],
        "model": None,
        "worker_state": None,
        "queue_depth": 0,
        "error": reason,
    }
    return body, HTTPStatus.SERVICE_UNAVAILABLE


def _engine_health(data: RkllmRuntimeData, metrics: EngineMetrics) -> tuple[dict[str, Any], int]:
    """200 only while `healthy` (a request would be served now); every other status says why, with a 503."""
    status = metrics.health
    code = HTTPStatus.OK if status == "healthy" else HTTPStatus.SERVICE_UNAVAILABLE
    body: dict[str, Any] = {
        "status": status,
        "generation_status": "generating" if metrics.state is EngineState.GENERATING else "idle",
        # The tools in the resident prompt prefix: what the model can call right now.
        "tools_loaded": list(metrics.tools_loaded),
        "model": data.model_id,
        "worker_state": metrics.state.value,
        "queue_depth": metrics.queue_depth,
        "runtime_version": metrics.runtime_version,
        "abi_profile": metrics.abi_profile,
        "restarts": metrics.restarts,
        "consecutive_failures": metrics.consecutive_failures,
        "watchdog_fired": metrics.watchdog_fired,
        "requests_served": metrics.requests_served,
        # The runtime contexts (docs/voice.md): what each serves and does, and the tools of its resident prefix.
        "slots": [
            {"index": slot.index, "role": slot.role, "state": slot.state, "tools_loaded": list(slot.tools_loaded)}
            for slot in metrics.slots
        ],
        "voice_response_s": metrics.last_voice_response_s,
    }
    if (reason := metrics.health_reason) is not None:
        body["error"] = reason
    return body, code


class HealthView(HomeAssistantView):
    """`GET /health`: public, so container and uptime probes work without a token (and without ban accounting)."""

    url = "/health"
    name = "api:rkllm:health"
    requires_auth = False
    cors_allowed = True

    @callback
    def get(self, request: web.Request) -> web.Response:
        """Never runs inference: a snapshot of the engine's metrics."""
        body, status = _health(request.app[KEY_HASS])
        return self.json(body, status)


__all__: Final[list[str]] = [
    "ChatCompletionsView",
    "CompletionsView",
    "HealthView",
    "ModelView",
    "ModelsView",
    "async_register_views",
    "engine_error",
]
