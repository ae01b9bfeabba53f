"""The no-progress watchdog: how long one run may stay silent before it is a stall, and before it is ended.

A run that yields no token and no finish holds the NPU for everyone (voice included), and a hung runtime never
ends it by itself (docs/robustness.md §2). The bounds follow the model's measured speed, so a slow board with a
long prompt is not mistaken for a hang and a fast one is not left hanging for minutes:

- expected time of the next step: the prefill of the tokens still to prefill at the measured prefill rate
  (before the first token), else one token at the measured decode rate; before any run was measured,
  conservative rates for the slowest supported boards are used;
- the run is *stalled* (health `degraded`) once it is past that expected time (at least `fire_after / factor`);
- the watchdog *fires* after `max(min_s, factor * expected)`: the engine aborts the run, and the worker client
  kills the worker if the abort is not honoured within its grace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Conservative rates for a run before anything was measured: a 6-8 B model on an RK3576 prefills at a few tens
# of tokens per second and decodes at 2-4 (docs/runtime.md §10); over-estimating only delays the watchdog.
UNMEASURED_PREFILL_TOKENS_PER_S: Final = 30.0
UNMEASURED_DECODE_TOKENS_PER_S: Final = 2.0
DEFAULT_MIN_S: Final = 10.0
DEFAULT_FACTOR: Final = 3.0


@dataclass(frozen=True, slots=True)
class SilenceBound:
    """For the step the run is waiting for: when silence becomes a stall, and when the watchdog fires."""

    expected_s: float
    stall_after_s: float
    fire_after_s: float


@dataclass(frozen=True, slots=True)
class ProgressWatchdog:
    """Bounds for one run; `min_s` and `factor` are the user's settings, the rates the engine's measurements."""

    min_s: float = DEFAULT_MIN_S
    factor: float = DEFAULT_FACTOR
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None

    def __post_init__(self) -> None:
        """Refuse settings that would end every run at once or never."""
        if self.min_s <= 0:
            raise ValueError(f"the watchdog's minimum must be a positive number of seconds, got {self.min_s}")
        if self.factor < 1:
            raise ValueError(f"the watchdog's factor must be at least 1, got {self.factor}")

    def first_token(self, tokens_to_prefill: int) -> SilenceBound:
        """Before the first token: the whole prefill of `tokens_to_prefill` tokens is expected."""
        rate = self.prefill_tokens_per_s or UNMEASURED_PREFILL_TOKENS_PER_S
        return self._bound(max(0, tokens_to_prefill) / rate)

    def next_token(self) -> SilenceBound:
        """Between tokens: one decode step is expected."""
        rate = self.decode_tokens_per_s or UNMEASURED_DECODE_TOKENS_PER_S
        return self._bound(1.0 / rate)

    def _bound(self, expected_s: float) -> SilenceBound:
        fire_after = max(self.min_s, self.factor * expected_s)
        return SilenceBound(
            expected_s=expected_s,
            stall_after_s=min(fire_after, max(expected_s, fire_after / self.factor)),
            fire_after_s=fire_after,
        )
