"""The worker process over its raw protocol, on the C emulator: what the client (and a remote user) relies on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rkllm_native import protocol
from rkllm_native.build import emulator_library
from rkllm_native.worker import merge_text_events

REPO_ROOT = Path(__file__).resolve().parents[2]
COUNT_ANSWER = "one two three four five six seven eight nine ten eleven twelve"


def write_model(path: Path, *, decode_tokens_per_s: float = 2000, extra: str = "") -> Path:
    """A tiny emulator model (rkllm_native/emulator/MODEL_FORMAT.md): instant load, fast prefill."""
    path.write_text(
        textwrap.dedent(
            f"""\
            rkllm-emulator-model 1
            name = worker-test
            load_time_ms = 5
            prefill_tokens_per_s = 100000
            decode_tokens_per_s = {decode_tokens_per_s}
            max_context_limit = 8192
            answer user "count" = {COUNT_ANSWER}
            default_answer = Hello from the emulator.
            """
        )
        + extra
    )
    return path


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


class WorkerConn:
    """A local worker on a socketpair, driven frame by frame; events seen while waiting are kept in order."""

    def __init__(self, models_dir: Path) -> None:
        self.sock, child = socket.socketpair()
        # The allow-list: the emulator library and the test's own model directory, as a local child gets them.
        allow = ["--library", str(emulator_library("v12x")), "--models-dir", str(models_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rkllm_native.worker", "--fd", str(child.fileno()), *allow],
            pass_fds=(child.fileno(),),
            env=worker_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        child.close()
        self.sock.settimeout(10)
        self.events: list[dict[str, Any]] = []
        self.next_id = 0

    def send(self, op: str, **fields: Any) -> int:
        self.next_id += 1
        protocol.send_frame(self.sock, protocol.request(op, self.next_id, **fields))
        return self.next_id

    def receive(self) -> dict[str, Any]:
        message = protocol.recv_frame(self.sock)
        assert message is not None, "the worker closed the connection"
        self.events.append(message)
        return message

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        request_id = self.send(op, **fields)
        while True:
            message = self.receive()
            if message.get("ev") == "reply" and message["id"] == request_id:
                return message

    def until_run_end(self, run_id: int) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        while True:
            message = self.receive()
            seen.append(message)
            assert message.get("ok") is not False, f"request failed: {message}"
            if message.get("ev") in ("finish", "run_error") and message["run"] == run_id:
                return seen

    def init(self, model: Path, **params: Any) -> dict[str, Any]:
        library = str(emulator_library("v12x"))
        return self.request("init", library_path=library, model_path=str(model), profile=None, params=params)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[WorkerConn]:
    conn = WorkerConn(tmp_path)
    yield conn
    conn.close()


def run_text(events: list[dict[str, Any]], run_id: int) -> str:
    return "".join(
        text for e in events if e.get("ev") == "text" and e["run"] == run_id for text, _ in protocol.text_pieces(e)
    )


def test_init_reports_runtime_facts_and_runtime_stdout_arrives_as_log_events(
    worker: WorkerConn, tmp_path: Path
) -> None:
    model = write_model(tmp_path / "m.model")
    hello = worker.request("hello", version=protocol.PROTOCOL_VERSION)
    assert hello["ok"]
    assert hello["mode"] == "local"
    assert hello["pid"] == worker.proc.pid
    assert hello["initialized"] is False

    reply = worker.init(model, max_context_len=1024)
    assert reply["ok"], reply
    assert (reply["version"], reply["profile"], reply["driver_version"], reply["platform"]) == (
        "1.2.3",
        "v12x",
        "0.9.8",
        "RK3588",
    )
    assert reply["max_context_limit"] == 8192  # parsed from the runtime's own init line
    logs = [e["line"] for e in worker.events if e.get("ev") == "log"]
    assert f"I rkllm: loading rkllm model from {model}" in logs
    assert any(line.startswith("I rkllm: rkllm-runtime version: 1.2.3") for line in logs)
    # The same spec again reuses the loaded runtime (a reconnecting remote client must not pay a reload).
    again = worker.init(model, max_context_len=1024)
    assert again["reused"] is True
    assert again["max_context_limit"] == 8192


def test_run_replies_accepted_then_streams_text_then_finishes_with_perf(worker: WorkerConn, tmp_path: Path) -> None:
    worker.init(write_model(tmp_path / "m.model"))
    request_id = worker.send("run", run=1, role="user", text="count to twelve", keep_history=False)
    events = worker.until_run_end(1)
    non_log = [e for e in events if e.get("ev") != "log"]
    assert non_log[0] == {"ev": "reply", "id": request_id, "ok": True, "accepted": True, "run": 1}
    assert run_text(events, 1) == COUNT_ANSWER
    finish = events[-1]
    assert finish["ev"] == "finish"
    assert finish["aborted"] is False
    assert finish["perf"]["generate_tokens"] > 0
    assert finish["perf"]["prefill_tokens"] > 0
    stats = worker.request("stats")
    assert stats["runs_served"] == 1
    assert stats["pid"] == worker.proc.pid
    assert stats["rss"] > 0


def test_abort_mid_decode_ends_the_run_promptly_and_nothing_leaks_into_the_next(
    worker: WorkerConn, tmp_path: Path
) -> None:
    # 5 tok/s: the 9 tokens left take 1.8 s, so "aborted" (not a natural finish) shows the abort ended the run.
    worker.init(write_model(tmp_path / "m.model", decode_tokens_per_s=5))
    worker.send("run", run=1, role="user", text="count to twelve")
    pieces = 0
    while pieces < 3:
        event = worker.receive()
        if event.get("ev") == "text":
            pieces += len(protocol.text_pieces(event))
    assert worker.request("abort", run=1)["was_running"] is True
    events = worker.until_run_end(1)
    assert events[-1]["ev"] == "finish"
    assert events[-1]["aborted"] is True

    worker.send("run", run=2, role="user", text="say hello")
    second = worker.until_run_end(2)
    assert run_text(second, 2) == "Hello from the emulator."
    assert all(e.get("run") in (None, 2) for e in second)


def test_requests_that_cannot_be_served_get_one_specific_error(worker: WorkerConn, tmp_path: Path) -> None:
    def error(reply: dict[str, Any]) -> tuple[str, str]:
        assert reply["ok"] is False
        return reply["error"]["kind"], reply["error"]["message"]

    kind, message = error(worker.request("hello", version=99))
    assert kind == "version_mismatch"
    assert f"client speaks 99, worker speaks {protocol.PROTOCOL_VERSION}" in message
    kind, message = error(worker.request("run", run=1, role="user", text="hi"))
    assert (kind, message) == ("not_initialized", "the runtime is not initialised yet (send 'init' first)")
    kind, message = error(worker.request("frobnicate"))
    assert kind == "bad_request"
    assert message.startswith("unknown op 'frobnicate'; known: abort, check_paths, clear_kv_cache")
    missing = tmp_path / "missing.model"
    kind, message = error(worker.init(missing))
    assert kind == "init_failed"
    assert str(missing) in message
    kind, message = error(worker.init(write_model(tmp_path / "m.model"), max_context=10))
    assert kind == "bad_request"
    assert message.startswith("unknown runtime parameter(s) max_context; known: base_domain_id")

    assert worker.init(tmp_path / "m.model")["ok"]
    kind, message = error(worker.request("run", run=1, role="assistant", text="hi"))
    assert (kind, message) == ("invalid_input", "run role must be 'user' or 'tool', got 'assistant'")
    kind, message = error(worker.request("run", role="user", text="hi"))
    assert (kind, message) == ("bad_request", "'run' needs an integer 'run'")
    assert worker.request("abort", run=42)["was_running"] is False


def test_second_run_while_one_is_running_is_refused_as_busy(worker: WorkerConn, tmp_path: Path) -> None:
    worker.init(write_model(tmp_path / "m.model", decode_tokens_per_s=20))
    worker.send("run", run=1, role="user", text="count")
    busy = worker.request("run", run=2, role="user", text="count")
    assert busy["ok"] is False
    assert busy["error"] == {"kind": "busy", "message": "busy: run 1 is still in progress"}
    kv = worker.request("get_kv_cache_size")
    assert kv["error"]["kind"] == "busy"
    worker.request("abort", run=1)
    worker.until_run_end(1)
    assert worker.request("get_kv_cache_size")["ok"]


def test_prompt_longer_than_the_context_is_a_context_overflow_with_numbers(worker: WorkerConn, tmp_path: Path) -> None:
    worker.init(write_model(tmp_path / "m.model"), max_context_len=64)
    worker.send("run", run=1, role="user", text="word " * 400)
    end = worker.until_run_end(1)[-1]
    assert end["ev"] == "run_error"
    assert end["kind"] == "context_overflow"
    assert end["max_context"] == 64
    assert end["prompt_tokens"] > 64
    assert "the length of prompt is greater than max context" in end["message"]


def test_runtime_error_state_becomes_run_error_with_the_runtime_message(worker: WorkerConn, tmp_path: Path) -> None:
    worker.init(write_model(tmp_path / "m.model", extra="fault = error_after_tokens:2\n"))
    worker.send("run", run=1, role="user", text="count")
    events = worker.until_run_end(1)
    partial = run_text(events, 1)
    assert partial
    assert COUNT_ANSWER.startswith(partial)
    assert len(partial) < len(COUNT_ANSWER)
    end = events[-1]
    assert end["ev"] == "run_error"
    assert end["kind"] == "runtime_error"
    assert "emulated fault: runtime error after 2 generated tokens" in end["message"]


def test_init_failure_carries_the_runtimes_error_line(worker: WorkerConn, tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.model", extra="fault = init_fail\n")
    reply = worker.init(model)
    assert reply["ok"] is False
    assert reply["error"]["kind"] == "init_failed"
    assert f"E rkllm: emulated init failure (fault = init_fail in {model})" in reply["error"]["message"]


def test_worker_exits_cleanly_when_the_control_socket_closes(worker: WorkerConn, tmp_path: Path) -> None:
    worker.init(write_model(tmp_path / "m.model"))
    worker.sock.close()
    assert worker.proc.wait(10) == 0


def test_shutdown_op_replies_then_exits(worker: WorkerConn, tmp_path: Path) -> None:
    worker.init(write_model(tmp_path / "m.model"))
    assert worker.request("shutdown") == {"ev": "reply", "id": worker.next_id, "ok": True, "exiting": True}
    assert worker.proc.wait(10) == 0


def test_sigterm_during_a_run_aborts_and_exits_zero(worker: WorkerConn, tmp_path: Path) -> None:
    worker.init(write_model(tmp_path / "m.model", decode_tokens_per_s=20))
    worker.send("run", run=1, role="user", text="count")
    while worker.receive().get("ev") != "text":
        pass
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(10) == 0
    assert worker.proc.stderr is not None
    assert b"SIGTERM: aborting, releasing the runtime, exiting" in worker.proc.stderr.read()


def test_local_worker_dies_with_its_parent_even_if_the_socket_stays_open(tmp_path: Path) -> None:
    # The parent hands its socket end to a sleeper and exits once the worker is up, so only PR_SET_PDEATHSIG can
    # end the worker.
    parent_script = textwrap.dedent(
        """
        import os, socket, subprocess, sys
        mine, child = socket.socketpair()
        command = [sys.executable, "-m", "rkllm_native.worker", "--fd", str(child.fileno())]
        worker = subprocess.Popen([*command, "--parent-pid", str(os.getpid())], pass_fds=(child.fileno(),),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        keeper = subprocess.Popen(["sleep", "30"], pass_fds=(mine.fileno(),),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from rkllm_native import protocol
        protocol.send_frame(mine, protocol.request("hello", 1, version=protocol.PROTOCOL_VERSION))
        assert protocol.recv_frame(mine)["ok"]  # the worker is up (and past prctl) before this parent exits
        print(worker.pid, keeper.pid, flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", parent_script], env=worker_env(), capture_output=True, text=True, check=True, timeout=20
    )
    worker_pid, keeper_pid = (int(pid) for pid in result.stdout.split())
    try:
        deadline = time.monotonic() + 30  # a wait, not a bound: the kernel signals the worker at once
        while time.monotonic() < deadline and process_alive(worker_pid):
            time.sleep(0.05)
        assert not process_alive(worker_pid), "the worker outlived its parent"
    finally:
        os.kill(keeper_pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_remote_mode_refuses_to_start_without_a_readable_secret(tmp_path: Path) -> None:
    missing = tmp_path / "secret"
    result = subprocess.run(
        [
            *(sys.executable, "-m", "rkllm_native.worker", "--listen", "127.0.0.1:0", "--secret-file", str(missing)),
            *("--library", str(emulator_library("v12x")), "--models-dir", str(tmp_path)),
        ],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"rkllm-worker: secret file {missing} does not exist"


def test_queued_text_events_of_one_run_merge_into_one_batched_frame() -> None:
    frames = [
        protocol.text_event(1, "a", 1),
        protocol.text_event(1, "b", 2),
        protocol.log_event("I rkllm: x"),
        protocol.text_event(1, "c", 3),
        protocol.text_event(2, "d", 4),
        protocol.text_event(2, "e", 5),
        {"ev": "finish", "run": 2},
    ]
    merged = merge_text_events(frames)
    assert merged == [
        protocol.text_batch_event(1, [("a", 1), ("b", 2)]),
        protocol.log_event("I rkllm: x"),
        protocol.text_event(1, "c", 3),
        protocol.text_batch_event(2, [("d", 4), ("e", 5)]),
        {"ev": "finish", "run": 2},
    ]
    flat = [piece for frame in merged if frame.get("ev") == "text" for piece in protocol.text_pieces(frame)]
    assert flat == [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5)]
