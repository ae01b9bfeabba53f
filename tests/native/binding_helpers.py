"""Helpers for the binding tests: emulator model files and a sink that records every event."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rkllm_native.runtime import PerfStat

MODEL_HEADER = "rkllm-emulator-model 1"


def write_model(directory: Path, *lines: str, name: str = "test.model") -> Path:
    """An emulator model file (rkllm_native/emulator/MODEL_FORMAT.md); no delays unless a line sets them."""
    body = [MODEL_HEADER]
    if not any(line.startswith("speed") for line in lines):
        body.append("speed = 0")
    if not any(line.startswith("load_time_ms") for line in lines):
        body.append("load_time_ms = 0")
    body.extend(lines)
    path = directory / name
    path.write_text("\n".join(body) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class Event:
    """One sink call, with the time it happened and whether run() had already returned."""

    kind: str  # "text", "finish" or "error"
    at: float
    after_return: bool
    text: str = ""
    token_id: int = 0
    perf: PerfStat | None = None


@dataclass
class RecordingSink:
    """Records events; can pause after N texts; sets `first_text` at the first text."""

    pause_after_texts: int | None = None
    events: list[Event] = field(default_factory=list)
    first_text: threading.Event = field(default_factory=threading.Event)
    run_returned: bool = False

    def on_text(self, text: str, token_id: int) -> bool:
        self.events.append(Event("text", time.monotonic(), self.run_returned, text=text, token_id=token_id))
        self.first_text.set()
        return self.pause_after_texts is not None and len(self.texts) >= self.pause_after_texts

    def on_finish(self, perf: PerfStat) -> None:
        self.events.append(Event("finish", time.monotonic(), self.run_returned, perf=perf))

    def on_error(self, message: str) -> None:
        self.events.append(Event("error", time.monotonic(), self.run_returned, text=message))

    @property
    def texts(self) -> list[str]:
        return [event.text for event in self.events if event.kind == "text"]

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]

    @property
    def errors(self) -> list[str]:
        return [event.text for event in self.events if event.kind == "error"]
