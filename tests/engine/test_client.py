"""WorkerClient on the C emulator: streaming, abort, crash recovery, watchdog, remote auth, and clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rkllm_engine.client import (
    InitSpec,
    RunStream,
    TextPiece,
    WorkerClient,
    WorkerLocation,
    WorkerState,
    start_error,
)
from rkllm_engine.types import (
    ContextOverflowError,
    EngineUnavailableError,
    InvalidRequestError,
    RuntimeIncompatibleError,
    WorkerCrashedError,
)
from rkllm_native import protocol
from rkllm_native.build import emulator_library
from rkllm_native.worker import init_problem

REPO_ROOT = Path(__file__).resolve().parents[2]
COUNT_ANSWER = "one two three four five six seven eight nine ten eleven twelve"
HELLO_ANSWER = "Hello from the emulator."
# The abort takes effect only after 10 min: whether it reaches the worker before or after the hang fault (a race on a
# busy machine), the run does not honour it within the grace, so the test needs no sleep "to let it reach the hang".
ABORT_NEVER_IN_TIME = "abort_delay_ms = 600000\n"


def write_model(path: Path, *, decode_tokens_per_s: float = 2000, fault: str = "none", extra: str = "") -> Path:
    """A tiny emulator model (rkllm_native/emulator/MODEL_FORMAT.md); the emulator reads it at every init."""
    path.write_text(
        textwrap.dedent(
            f"""\
            rkllm-emulator-model 1
            name = client-test
            load_time_ms = 5
            prefill_tokens_per_s = 100000
            decode_tokens_per_s = {decode_tokens_per_s}
            answer user "count" = {COUNT_ANSWER}
            default_answer = {HELLO_ANSWER}
            fault = {fault}
            """
        )
        + extra
    )
    return path


def spec_for(model: Path, **params: object) -> InitSpec:
    return InitSpec(library_path=str(emulator_library("v12x")), model_path=str(model), profile=None, params=params)


def worker_children() -> list[int]:
    """Our child processes that run the worker (a /proc scan: no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and b"rkllm_native.worker" in cmdline and fields[0] != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., WorkerClient]]:
    clients: list[WorkerClient] = []

    def factory(location: WorkerLocation | None = None, **kwargs: object) -> WorkerClient:
        client = WorkerClient(location or WorkerLocation(), **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.stop()


async def collect(stream: RunStream) -> str:
    return "".join([piece.text async for piece in stream])


async def take(stream: RunStream, count: int) -> list[TextPiece]:
    pieces = []
    async for piece in stream:
        pieces.append(piece)
        if len(pieces) == count:
            break
    return pieces


def count_run(client: WorkerClient) -> RunStream:
    return client.run("user", "count to twelve", keep_history=False, enable_thinking=False)


async def test_start_reports_runtime_info_streams_text_and_stop_leaves_no_process(
    make_client: Callable[..., WorkerClient], tmp_path: Path
) -> None:
    lines: list[str] = []
    states: list[WorkerState] = []
    client = make_client(on_log=lines.append, on_state=states.append)
    info = await client.start(spec_for(write_model(tmp_path / "m.model"), max_context_len=2048))
    assert (info.version, info.profile, info.driver_version, info.platform) == ("1.2.3", "v12x", "0.9.8", "RK3588")
    assert info.max_context_limit == 4096
    assert info.pid in worker_children()
    assert client.state is WorkerState.READY

    stream = count_run(client)
    assert await collect(stream) == COUNT_ANSWER
    assert stream.finished is not None
    assert not stream.finished.aborted
    assert stream.finished.perf.generate_tokens > 0
    # Runtime stdout reached us as log lines, never inside the frames.
    assert f"I rkllm: loading rkllm model from {tmp_path / 'm.model'}" in lines
    assert lines == client.recent_log[-len(lines) :]

    stats = await client.call("stats")
    assert stats["pid"] == info.pid
    assert stats["runs_served"] == 1
    assert (await client.call("get_kv_cache_size"))["sizes"][0] > 0
    await client.call("clear_kv_cache", keep_system_prompt=False)
    assert (await client.call("get_kv_cache_size"))["sizes"] == [0]

    await client.stop()
    assert client.state is WorkerState.STOPPED
    assert states == [WorkerState.STARTING, WorkerState.READY, WorkerState.STOPPED]
    assert worker_children() == []
    with pytest.raises(EngineUnavailableError, match=r"the rkllm worker is not running \(stopped\)"):
        count_run(client)


async def test_crash_mid_stream_raises_for_that_run_then_the_worker_restarts_and_serves_again(
    make_client: Callable[..., WorkerClient], tmp_path: Path
) -> None:
    states: list[WorkerState] = []
    client = make_client(on_state=states.append, restart_backoff_s=(0.05,))
    model = write_model(tmp_path / "m.model", fault="crash_after_tokens:3")
    first = await client.start(spec_for(model))
    # The fault lives in the model file and would crash every run; the restart re-reads the fixed file.
    write_model(model)

    pieces: list[TextPiece] = []
    stream = count_run(client)

    async def consume() -> None:
        async for piece in stream:
            pieces.append(piece)

    with pytest.raises(WorkerCrashedError) as crashed:
        await consume()
    assert str(crashed.value) == "the rkllm worker crashed (signal 11 SIGSEGV) during generation; restarting"
    # Up to the 3 tokens before the crash, in order; those still in the worker's outbox die with it (SIGSEGV).
    assert len(pieces) <= 3
    assert COUNT_ANSWER.startswith("".join(piece.text for piece in pieces))
    with pytest.raises(WorkerCrashedError):  # the stream keeps saying how it ended
        await stream.__anext__()

    second = await client.wait_ready(timeout_s=10)
    assert second.pid != first.pid
    assert client.restarts == 1
    assert first.pid not in worker_children()
    assert await collect(count_run(client)) == COUNT_ANSWER
    assert client.consecutive_failures == 0
    assert states == [WorkerState.STARTING, WorkerState.READY, WorkerState.RESTARTING, WorkerState.READY]


async def test_hung_run_is_killed_by_the_watchdog_within_the_grace_and_the_worker_recovers(
    make_client: Callable[..., WorkerClient], tmp_path: Path
) -> None:
    client = make_client(abort_grace_s=0.5, restart_backoff_s=(0.05,))
    model = write_model(tmp_path / "m.model", fault="hang_after_tokens:3", extra=ABORT_NEVER_IN_TIME)
    first = await client.start(spec_for(model))
    write_model(model)

    stream = count_run(client)
    assert len(await take(stream, 3)) == 3  # then the runtime hangs and ignores rkllm_abort
    started = time.monotonic()
    await stream.abort()
    assert time.monotonic() - started >= 0.5  # the grace was given (a lower bound: load only lengthens it)
    with pytest.raises(WorkerCrashedError, match=r"did not honour abort within 0\.5s; worker killed; restarting"):
        await stream.__anext__()
    assert first.pid not in worker_children()

    await client.wait_ready(timeout_s=10)
    assert client.restarts == 1
    assert await collect(count_run(client)) == COUNT_ANSWER


async def test_abort_mid_decode_finishes_promptly_and_no_token_leaks_into_the_next_run(
    make_client: Callable[..., WorkerClient], tmp_path: Path
) -> None:
    client = make_client()
    # 5 tok/s: the 9 tokens left take 1.8 s, so "aborted" (not a natural finish) shows the abort ended the run.
    await client.start(spec_for(write_model(tmp_path / "m.model", decode_tokens_per_s=5)))
    stream = count_run(client)
    await take(stream, 3)
    await asyncio.wait_for(stream.abort(), 30)
    assert stream.finished is not None
    assert stream.finished.aborted
    assert [piece async for piece in stream] == []

    assert await collect(client.run("user", "say hello", keep_history=False, enable_thinking=False)) == HELLO_ANSWER
    assert client.restarts == 0


async def test_cancelling_the_consumer_aborts_the_run_and_the_next_run_is_served(
    make_client: Callable[..., WorkerClient], tmp_path: Path
) -> None:
    client = make_client()
    await client.start(spec_for(write_model(tmp_path / "m.model", decode_tokens_per_s=20)))
    stream = count_run(client)
    first_piece = asyncio.Event()

    async def consume() -> None:
        async for _ in stream:
            first_piece.set()

    task = asyncio.create_task(consume())
    await first_piece.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The next run waits for the slot the cancelled one frees, then streams only its own text.
    hello = client.run("user", "say hello", keep_history=False, enable_thinking=False)
    assert await asyncio.wait_for(collect(hello), 30) == HELLO_ANSWER
    assert stream.done
    assert stream.finished is not None
    assert stream.finished.aborted
    assert (await client.call("stats"))["runs_served"] == 2


async def test_a_crash_loop_ends_in_failed_with_the_reason(
    make_client: Callable[..., WorkerClient], tmp_path: Path
) -> None:
    states: list[WorkerState] = []
    client = make_client(on_state=states.append, restart_backoff_s=(0.05,), max_consecutive_failures=2)
    await client.start(spec_for(write_model(tmp_path / "m.model", fault="crash_after_tokens:1")))
    for _ in range(2):
        await client.wait_ready(timeout_s=10)
        with pytest.raises(WorkerCrashedError, match=r"signal 11 SIGSEGV"):
            await collect(count_run(client))
    assert client.state is WorkerState.FAILED
    assert client.consecutive_failures == 2
    assert states[-1] is WorkerState.FAILED
    message = (
        "the rkllm worker failed 2 times in a row and is not restarted any more; "
        "last failure: the rkllm worker crashed (signal 11 SIGSEGV) during generation"
    )
    with pytest.raises(EngineUnavailableError) as unavailable:
        count_run(client)
    assert str(unavailable.value) == message
    with pytest.raises(EngineUnavailableError):
        await client.wait_ready(timeout_s=1)
    # FAILED is terminal: nothing is left scheduled that could restart the worker behind the caller's back.
    assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []
    assert client.state is WorkerState.FAILED
    assert worker_children() == []


async def test_start_with_a_missing_model_fails_with_the_path_and_leaves_nothing_running(
    make_client: Callable[..., WorkerClient], tmp_path: Path
) -> None:
    client = make_client()
    missing = tmp_path / "missing.model"
    with pytest.raises(RuntimeIncompatibleError) as refused:
        await client.start(spec_for(missing))
    assert refused.value.reason == "model_invalid"
    assert refused.value.details["path"] == str(missing)
    assert str(refused.value).startswith(f"model file {missing}")
    assert client.state is WorkerState.FAILED
    assert worker_children() == []


@pytest.mark.parametrize(
    ("case", "reason", "fact", "value"),
    [
        ("library_missing", "library_missing", "code", "library_not_found"),
        ("library_not_rkllm", "library_unsupported", "code", "not_rkllm_library"),
        ("profile_mismatch", "profile_mismatch", "version", "1.2.3"),
        ("model_for_rk3576", "model_platform_mismatch", protocol.FACT_RUNTIME_PROBLEM, "target_platform_mismatch"),
        ("model_from_newer_toolkit", "model_invalid", protocol.FACT_RUNTIME_PROBLEM, "model_refused"),
        ("context_over_model_limit", "init_failed", "code", "init_failed"),
        ("init_fault", "init_failed", "return_code", "-1"),
    ],
)
async def test_each_permanent_init_failure_arrives_typed_with_its_reason_and_facts(
    make_client: Callable[..., WorkerClient], tmp_path: Path, case: str, reason: str, fact: str, value: str
) -> None:
    """The worker's typed binding error and the runtime's own E line reach the caller as a reason, not as text."""
    library = str(emulator_library("v12x"))
    profile: str | None = None
    params: dict[str, object] = {}
    model = write_model(tmp_path / "m.model")
    if case == "library_missing":
        library = str(tmp_path / "absent" / "librkllmrt.so")
    elif case == "library_not_rkllm":
        (tmp_path / "librkllmrt.so").write_text("not a shared object\n")
        library = str(tmp_path / "librkllmrt.so")
    elif case == "profile_mismatch":
        profile = "v130"
    elif case == "model_for_rk3576":
        write_model(model, extra="host_platform = RK3576\n")
    elif case == "model_from_newer_toolkit":
        write_model(model, extra="toolkit_version = 1.9.0\n")
    elif case == "context_over_model_limit":
        params = {"max_context_len": 8192}
    elif case == "init_fault":
        write_model(model, fault="init_fail")
    client = make_client()
    with pytest.raises(RuntimeIncompatibleError) as refused:
        await client.start(InitSpec(library_path=library, model_path=str(model), profile=profile, params=params))
    assert refused.value.reason == reason
    assert refused.value.details[fact] == value
    assert "\n" not in str(refused.value)
    if case.startswith(("model_", "context_", "init_")):  # the runtime said why: its line travels as a fact
        assert refused.value.details[protocol.FACT_RUNTIME_LINE].startswith("E rkllm: ")
    assert client.state is WorkerState.FAILED
    assert worker_children() == []


@pytest.mark.parametrize("python", ["/bin/false", "/nonexistent/python3"])
async def test_a_worker_that_cannot_start_is_a_transient_worker_start_failure(
    make_client: Callable[..., WorkerClient], tmp_path: Path, python: str
) -> None:
    client = make_client(python=python)
    with pytest.raises(EngineUnavailableError) as unavailable:
        await client.start(spec_for(write_model(tmp_path / "m.model")))
    assert unavailable.value.reason == "worker_start_failed"
    assert client.state is WorkerState.FAILED
    assert worker_children() == []


async def test_another_protocol_version_is_a_permanent_protocol_mismatch(
    make_client: Callable[..., WorkerClient], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)  # this side only
    client = make_client()
    with pytest.raises(RuntimeIncompatibleError) as refused:
        await client.start(spec_for(write_model(tmp_path / "m.model")))
    assert refused.value.reason == "protocol_mismatch"
    assert worker_children() == []


@pytest.mark.parametrize(
    ("lines", "return_code", "problem"),
    [
        (
            ["I rkllm: loading", "E rkllm: the model's target_platform does not match the real platform"],
            "-1",
            protocol.PROBLEM_PLATFORM_MISMATCH,
        ),
        (
            ["E RKNN: failed to malloc npu memory, size: 123", "E rkllm: rkllm_init failed"],
            "-1",
            protocol.PROBLEM_NPU_OUT_OF_MEMORY,
        ),
        (["E RKNN: invalid rknn llm model magic"], "-1", protocol.PROBLEM_MODEL_REFUSED),
        (["E rkllm: invalid rkllm model!"], "-1", protocol.PROBLEM_MODEL_REFUSED),
        ([], "0", protocol.PROBLEM_NPU_OUT_OF_MEMORY),
        (["E rkllm: The n_keep must be less than the max_context_len"], "-1", None),
    ],
)
def test_runtime_lines_of_a_failed_init_are_classified(lines: list[str], return_code: str, problem: str | None) -> None:
    """Board-only failures the emulator cannot produce: the worker still names them from the runtime's lines."""
    assert init_problem(lines, return_code) == problem


def test_npu_out_of_memory_is_transient_and_the_rest_permanent() -> None:
    """Another process may free NPU memory, so that init failure is retried; the others need the user."""
    oom = start_error("init_failed", "rkllm_init failed", {protocol.FACT_RUNTIME_PROBLEM: "npu_out_of_memory"})
    assert isinstance(oom, EngineUnavailableError)
    assert oom.reason == "npu_out_of_memory"
    other = start_error("init_failed", "rkllm_init failed", {})
    assert isinstance(other, RuntimeIncompatibleError)
    assert other.reason == "init_failed"
    assert other.details == {"code": "init_failed"}


async def test_prompt_too_long_is_a_context_overflow_with_numbers(
    make_client: Callable[..., WorkerClient], tmp_path: Path
) -> None:
    client = make_client()
    await client.start(spec_for(write_model(tmp_path / "m.model"), max_context_len=256))
    with pytest.raises(ContextOverflowError) as overflow:
        await collect(client.run("user", "word " * 400, keep_history=False, enable_thinking=False))
    assert overflow.value.context_length == 256
    assert overflow.value.prompt_tokens is not None
    assert overflow.value.prompt_tokens > 256
    assert await collect(count_run(client)) == COUNT_ANSWER  # the worker is fine afterwards


async def test_invalid_requests_are_refused_before_anything_is_sent(
    make_client: Callable[..., WorkerClient], tmp_path: Path
) -> None:
    client = make_client()
    await client.start(spec_for(write_model(tmp_path / "m.model")))
    with pytest.raises(InvalidRequestError, match="run role must be 'user' or 'tool', got 'system'"):
        client.run("system", "hi", keep_history=False, enable_thinking=False)
    with pytest.raises(InvalidRequestError, match="use run"):
        await client.call("run", text="hi")
    with pytest.raises(InvalidRequestError, match="needs a string 'path'"):
        await client.call("load_prompt_cache")


# ---------------------------------------------------------------------------
# Remote worker
# ---------------------------------------------------------------------------


class RemoteWorker:
    """A worker process serving TCP on 127.0.0.1 with a shared secret, as on a glibc host next to HAOS."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port


@pytest.fixture
async def remote_worker(tmp_path: Path, socket_enabled: None) -> AsyncIterator[RemoteWorker]:
    # socket_enabled: HA's test plugin blocks TCP sockets; the remote tests need 127.0.0.1.
    secret_file = tmp_path / "secret"
    secret_file.write_text(f"{REMOTE_SECRET}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "rkllm_native.worker",
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        str(secret_file),
        "--library",
        str(emulator_library("v12x")),
        "--models-dir",
        str(tmp_path),
        "--abort-grace",
        "0.5",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    banner = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
    assert banner.startswith("rkllm-worker: listening on 127.0.0.1:"), banner
    port = int(banner.split("127.0.0.1:")[1].split()[0])
    yield RemoteWorker(process, port)
    if process.returncode is None:
        process.terminate()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), 30)
    if process.returncode is None:
        process.kill()
        await process.wait()
    await process.stderr.read()


REMOTE_SECRET = "correct horse battery staple"


def remote(worker: RemoteWorker, secret: str = REMOTE_SECRET) -> WorkerLocation:
    return WorkerLocation(host="127.0.0.1", port=worker.port, secret=secret)


async def test_remote_worker_with_the_right_secret_serves_and_keeps_the_model_across_reconnects(
    make_client: Callable[..., WorkerClient], remote_worker: RemoteWorker, tmp_path: Path
) -> None:
    spec = spec_for(write_model(tmp_path / "m.model"))
    client = make_client(remote(remote_worker))
    info = await client.start(spec)
    assert info.pid == remote_worker.process.pid
    assert await collect(count_run(client)) == COUNT_ANSWER
    assert any(line.startswith("I rkllm: rkllm-runtime version: 1.2.3") for line in client.recent_log)
    # TCP keepalive: a board that loses power ends the session instead of leaving it open forever.
    assert client._session is not None
    transport_socket = client._session.writer.get_extra_info("socket")
    assert transport_socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    await client.stop()
    assert remote_worker.process.returncode is None  # stop() ends the session, not the remote service

    again = make_client(remote(remote_worker))
    assert (await again.start(spec)).pid == remote_worker.process.pid
    assert (await again.call("stats"))["runs_served"] == 1  # the same loaded runtime, no reload
    assert await collect(count_run(again)) == COUNT_ANSWER


async def test_remote_worker_refuses_a_wrong_secret_with_a_specific_error(
    make_client: Callable[..., WorkerClient], remote_worker: RemoteWorker, tmp_path: Path
) -> None:
    client = make_client(remote(remote_worker, secret="wrong"))
    with pytest.raises(EngineUnavailableError) as refused:
        await client.start(spec_for(write_model(tmp_path / "m.model")))
    assert refused.value.reason == "secret_refused"
    assert str(refused.value) == f"remote rkllm worker 127.0.0.1:{remote_worker.port} refused the secret"
    assert client.state is WorkerState.FAILED


async def test_remote_worker_refuses_a_second_concurrent_client_as_busy(
    make_client: Callable[..., WorkerClient], remote_worker: RemoteWorker, tmp_path: Path
) -> None:
    spec = spec_for(write_model(tmp_path / "m.model"))
    await make_client(remote(remote_worker)).start(spec)
    second = make_client(remote(remote_worker))
    with pytest.raises(EngineUnavailableError) as busy:
        await second.start(spec)
    assert busy.value.reason == "worker_busy"
    assert str(busy.value) == (
        f"remote rkllm worker 127.0.0.1:{remote_worker.port} is busy: another client is connected"
    )


async def test_connection_refused_names_host_and_port(
    make_client: Callable[..., WorkerClient], tmp_path: Path, socket_enabled: None
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = make_client(WorkerLocation(host="127.0.0.1", port=port, secret="x"))
    with pytest.raises(
        EngineUnavailableError, match=f"remote rkllm worker 127.0.0.1:{port} refused the connection"
    ) as e:
        await client.start(spec_for(write_model(tmp_path / "m.model")))
    assert e.value.reason == "worker_unreachable"


async def test_remote_hang_drops_the_connection_and_the_remote_worker_exits_for_its_supervisor(
    make_client: Callable[..., WorkerClient], remote_worker: RemoteWorker, tmp_path: Path
) -> None:
    client = make_client(remote(remote_worker), abort_grace_s=0.5, restart_backoff_s=(30,))
    model = write_model(tmp_path / "m.model", fault="hang_after_tokens:2", extra=ABORT_NEVER_IN_TIME)
    await client.start(spec_for(model))
    stream = count_run(client)
    await take(stream, 2)
    await stream.abort()
    with pytest.raises(WorkerCrashedError, match=r"did not honour abort within 0\.5s; worker killed; reconnecting"):
        await stream.__anext__()
    assert client.state is WorkerState.RESTARTING
    # The remote side got the same grace with the abort and exits, so systemd (Restart=always) starts it fresh.
    assert await asyncio.wait_for(remote_worker.process.wait(), 30) == 75


async def test_probe_says_hello_without_loading_and_frees_the_worker_for_the_real_client(
    make_client: Callable[..., WorkerClient], remote_worker: RemoteWorker, tmp_path: Path
) -> None:
    tasks_before = len(asyncio.all_tasks())
    hello = await WorkerClient.probe(remote(remote_worker), timeout_s=30)
    assert hello.pid == remote_worker.process.pid
    assert hello.protocol_version == protocol.PROTOCOL_VERSION
    assert not hello.initialized  # nothing was loaded
    assert len(asyncio.all_tasks()) <= tasks_before  # the probe leaves no reader or background task

    client = make_client(remote(remote_worker))  # the session the probe held is free again
    await client.start(spec_for(write_model(tmp_path / "m.model")))
    await client.stop()
    assert (await WorkerClient.probe(remote(remote_worker), timeout_s=30)).initialized  # the model stays loaded


async def test_probe_failures_carry_their_reason(
    make_client: Callable[..., WorkerClient], remote_worker: RemoteWorker, tmp_path: Path
) -> None:
    with pytest.raises(EngineUnavailableError) as refused:
        await WorkerClient.probe(remote(remote_worker, secret="wrong"), timeout_s=30)
    assert refused.value.reason == "secret_refused"
    with pytest.raises(EngineUnavailableError) as no_secret:
        await WorkerClient.probe(remote(remote_worker, secret=""), timeout_s=30)
    assert no_secret.value.reason == "secret_refused"

    await make_client(remote(remote_worker)).start(spec_for(write_model(tmp_path / "m.model")))
    with pytest.raises(EngineUnavailableError) as busy:
        await WorkerClient.probe(remote(remote_worker), timeout_s=30)
    assert busy.value.reason == "worker_busy"

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(EngineUnavailableError) as unreachable:
        await WorkerClient.probe(WorkerLocation(host="127.0.0.1", port=port, secret="x"), timeout_s=30)
    assert unreachable.value.reason == "worker_unreachable"
    with pytest.raises(ValueError, match="remote"):
        await WorkerClient.probe(WorkerLocation(), timeout_s=30)


async def test_probe_of_a_worker_speaking_another_protocol_is_a_protocol_mismatch(
    remote_worker: RemoteWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", protocol.PROTOCOL_VERSION + 1)  # this side only
    with pytest.raises(RuntimeIncompatibleError) as refused:
        await WorkerClient.probe(remote(remote_worker), timeout_s=30)
    assert refused.value.reason == "protocol_mismatch"


async def test_probe_of_a_silent_listener_times_out_as_unreachable(socket_enabled: None) -> None:
    """A port that accepts but never speaks (not a worker) gives up within the timeout instead of hanging."""
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # The outer 30 s only catches a hang: the probe itself must give up after its own 0.3 s.
        probe = WorkerClient.probe(WorkerLocation(host="127.0.0.1", port=port, secret="x"), timeout_s=0.3)
        with pytest.raises(EngineUnavailableError) as silent:
            await asyncio.wait_for(probe, 30)
        assert silent.value.reason == "worker_unreachable"
    finally:
        server.close()
        await server.wait_closed()
