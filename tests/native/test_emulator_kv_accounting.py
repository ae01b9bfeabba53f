"""Honest usage from the emulator's KV: after a finished keep_history=1 run, KV = reused + prefilled + generated.

The engine reports `cached_tokens` = KV size after the run - `perf.prefill_tokens` - `perf.generate_tokens`
(MODEL_FORMAT.md §6, "Accounting"). These tests pin that identity in every case the emulator models: a
continued conversation, a rebuild on the same system prompt, a switch to another system prompt, a run cut at
max_new_tokens, a pause and its resume, skip_special_token off; and the cases where it cannot hold (abort, a
context shift while decoding, keep_history=0), with what a caller can compute instead. Expected counts come
from the documented tokenizer (test_emulator_behaviour.py re-implements it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rkllm_native.runtime import PerfStat, RunInput, RunOptions, Runtime, RuntimeParams

from .binding_helpers import RecordingSink, write_model
from .test_emulator_behaviour import ntok, pieces, system_part, user_turn

ASSIST = "You are a voice assistant for a smart home. Answer briefly. The kitchen has a light and a fan."
API = "You are a writing assistant. You help with e-mails, letters and stories, in a friendly tone."
ANSWER = "{{input}} is noted, thank you"
_MATCH = re.compile(r"I rkllm: kv cache matches (\d+) / (\d+) tokens of prompt")
_SHIFT = re.compile(r"delete the kv cache in \[(\d+), (\d+)\)")


@dataclass(frozen=True)
class Accounted:
    """One run with the KV size around it and the runtime lines it printed."""

    kv_before: int
    kv_after: int
    perf: PerfStat | None
    texts: list[str]
    log: list[str]

    @property
    def reused(self) -> int:
        """What the engine reports as cached_tokens."""
        assert self.perf is not None
        return self.kv_after - self.perf.prefill_tokens - self.perf.generate_tokens

    @property
    def matched(self) -> int | None:
        """Prefix tokens the runtime said it reused (a fresh prompt), None when it logged no match."""
        found = [int(match.group(1)) for line in self.log if (match := _MATCH.search(line))]
        return found[-1] if found else None


class Account:
    """A Runtime whose runs are measured; the runtime's stdout lines are read per run through capfd."""

    def __init__(self, runtime: Runtime, capfd: pytest.CaptureFixture[str]) -> None:
        self.runtime = runtime
        self.capfd = capfd

    def run(
        self, text: str, *, keep_history: bool = True, max_new_tokens: int = 0, sink: RecordingSink | None = None
    ) -> Accounted:
        self.capfd.readouterr()
        sink = sink if sink is not None else RecordingSink()
        before = self.runtime.get_kv_cache_size()[0]
        outcome = self.runtime.run(
            RunInput(role="user", text=text), RunOptions(keep_history=keep_history, max_new_tokens=max_new_tokens), sink
        )
        after = self.runtime.get_kv_cache_size()[0]
        return Accounted(before, after, outcome.perf, sink.texts, self.capfd.readouterr().out.splitlines())

    def system(self, prompt: str) -> None:
        self.runtime.set_function_tools(prompt, "[]", "tool_response")

    def kv(self) -> int:
        return self.runtime.get_kv_cache_size()[0]


@pytest.fixture
def account(
    binding_profile: str, emulator_lib: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> Iterator[Account]:
    model = write_model(tmp_path, f"default_answer = {ANSWER}")
    with Runtime(emulator_lib) as runtime:
        runtime.init(RuntimeParams(model_path=model, max_new_tokens=-1))
        yield Account(runtime, capfd)


def answer_tokens(text: str) -> int:
    return ntok(ANSWER.replace("{{input}}", text))


def common_prefix(first: str, second: str) -> int:
    """Tokens two texts share from their start (token ids are a hash of the piece's bytes)."""
    count = 0
    for one, other in zip(pieces(first), pieces(second), strict=False):
        if one != other:
            break
        count += 1
    return count


def test_continue_and_both_rebuilds_keep_the_identity(account: Account) -> None:
    account.system(ASSIST)
    cold = account.run("turn on the light")
    assert cold.perf is not None
    assert cold.perf.prefill_tokens == ntok(system_part(ASSIST) + user_turn("turn on the light"))
    assert cold.perf.generate_tokens == answer_tokens("turn on the light")
    assert cold.reused == 0
    # Continue: everything in the KV is reused; the previous answer's end-of-turn token is prefilled now.
    follow = account.run("and the fan")
    assert follow.perf is not None
    assert follow.reused == follow.kv_before == cold.kv_after
    assert follow.perf.prefill_tokens == 1 + ntok(user_turn("and the fan"))
    # Same-prefix rebuild (a new conversation): the system prompt stays prefilled and is reused.
    account.runtime.clear_kv_cache(True)
    assert account.kv() == ntok(system_part(ASSIST))
    fresh = account.run("what time is it")
    assert fresh.perf is not None
    assert fresh.reused == ntok(system_part(ASSIST))
    assert fresh.perf.prefill_tokens == ntok(user_turn("what time is it"))
    # Full rebuild: nothing is reused.
    account.runtime.clear_kv_cache(False)
    empty = account.run("hello")
    assert empty.perf is not None
    assert empty.reused == 0
    assert empty.perf.prefill_tokens == ntok(system_part(ASSIST) + user_turn("hello"))


def test_a_prefix_switch_reuses_nothing_of_the_old_prefix(account: Account) -> None:
    account.system(ASSIST)
    account.run("turn on the light")
    account.run("and the fan")
    # The engine moves this slot to another static prefix and starts a conversation on it (plan "reset").
    account.system(API)
    account.runtime.clear_kv_cache(True)
    assert account.kv() == ntok(system_part(ASSIST))  # the old system prompt is still resident
    switched = account.run("write a letter")
    assert switched.perf is not None
    prompt = system_part(API) + user_turn("write a letter")
    # The two prompts share their first tokens (template header, "You are a"), yet a rebuild keeps none of them.
    assert common_prefix(system_part(ASSIST), prompt) == ntok("<|im_start|>system\nYou are a")
    assert switched.reused == 0
    assert switched.matched is None
    assert switched.perf.prefill_tokens == ntok(prompt)
    assert "I rkllm: the system prompt changed, the kv cache of batch 0 is rebuilt" in switched.log
    # The next turn continues on the new prefix.
    again = account.run("make it shorter")
    assert again.perf is not None
    assert again.reused == switched.kv_after


def test_a_prefix_switch_takes_the_prefill_time_of_the_whole_new_prompt(
    emulator_lib: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    model = write_model(tmp_path, "speed = 1", "prefill_tokens_per_s = 2000", f"default_answer = {ANSWER}")
    long_assist = ASSIST + " Devices: " + ", ".join(f"lamp {n}" for n in range(120))
    long_api = API + " Styles: " + ", ".join(f"style {n}" for n in range(120))
    with Runtime(emulator_lib) as runtime:
        runtime.init(RuntimeParams(model_path=model, max_new_tokens=-1))
        account = Account(runtime, capfd)
        account.system(long_assist)
        warm_up = account.run("turn on lamp 3")
        account.system(long_api)
        runtime.clear_kv_cache(True)
        switched = account.run("write a letter")
    assert warm_up.perf is not None
    assert switched.perf is not None
    prompt = system_part(long_api) + user_turn("write a letter")
    assert switched.perf.prefill_tokens == ntok(prompt) > 300
    expected_ms = switched.perf.prefill_tokens / 2000 * 1000
    # Every prefilled token was paid for (a lower bound on time, which a loaded machine only lengthens).
    assert switched.perf.prefill_time_ms >= expected_ms * 0.95


def test_a_run_cut_at_max_new_tokens_keeps_the_identity_and_the_next_turn_prefills_only_itself(
    binding_profile: str, emulator_lib: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    model = write_model(tmp_path, f"default_answer = {ANSWER}")
    cap = 3
    with Runtime(emulator_lib) as runtime:
        # v1.2.x only knows the init value; v1.3.0 takes it per run (the engine uses both).
        per_run = binding_profile == "v130"
        runtime.init(RuntimeParams(model_path=model, max_new_tokens=-1 if per_run else cap))
        account = Account(runtime, capfd)
        account.system(ASSIST)
        account.run("hello")
        cut = account.run("tell me a long story", max_new_tokens=cap if per_run else 0)
        following = account.run("shorter please")
    assert cut.perf is not None
    assert following.perf is not None
    assert cut.perf.generate_tokens == cap < answer_tokens("tell me a long story")
    assert cut.reused == cut.kv_before
    assert following.reused == following.kv_before == cut.kv_after
    assert following.perf.prefill_tokens == ntok(user_turn("shorter please"))  # no end-of-turn token to close


def test_a_paused_run_resumes_with_the_identity(account: Account) -> None:
    account.system(ASSIST)
    account.run("hello")
    paused = account.run("count to ten", sink=RecordingSink(pause_after_texts=2))
    assert paused.perf is None  # a pause has no FINISH (§7)
    assert paused.kv_after == paused.kv_before + 1 + ntok(user_turn("count to ten")) + 2
    resumed = account.run("go on")
    assert resumed.perf is not None
    assert resumed.reused == resumed.kv_before == paused.kv_after
    assert resumed.perf.prefill_tokens == ntok(user_turn("go on"))


def test_an_aborted_run_has_no_perf_and_leaves_its_partial_turn(
    emulator_lib: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    long_answer = " ".join(["word"] * 100)
    model = write_model(tmp_path, "speed = 1", "decode_tokens_per_s = 200", f"default_answer = {long_answer}")
    with Runtime(emulator_lib) as runtime:
        runtime.init(RuntimeParams(model_path=model, max_new_tokens=-1))
        account = Account(runtime, capfd)
        account.system(ASSIST)
        account.run("hello")

        class AbortingSink(RecordingSink):
            def on_text(self, text: str, token_id: int) -> bool:
                super().on_text(text, token_id)
                if len(self.texts) == 4:
                    runtime.abort()
                return False

        aborted = account.run("talk", sink=AbortingSink())
    # No FINISH, so no perf: what the KV holds is the reused part, the prefilled turn (with the previous answer's
    # end-of-turn token) and exactly the tokens delivered before the abort.
    assert aborted.perf is None
    assert aborted.kv_after == aborted.kv_before + 1 + ntok(user_turn("talk")) + len(aborted.texts)
    assert len(aborted.texts) == 4


def test_skip_special_token_off_delivers_and_counts_the_end_of_turn_token(
    emulator_lib: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    model = write_model(tmp_path, f"default_answer = {ANSWER}")
    with Runtime(emulator_lib) as runtime:
        runtime.init(RuntimeParams(model_path=model, max_new_tokens=-1, skip_special_token=False))
        account = Account(runtime, capfd)
        first = account.run("hello")
        second = account.run("again")
    assert first.perf is not None
    assert second.perf is not None
    assert first.texts[-1] == "<|im_end|>"
    assert first.perf.generate_tokens == answer_tokens("hello") + 1
    assert first.reused == 0
    assert second.reused == first.kv_after
    assert second.perf.prefill_tokens == ntok(user_turn("again"))  # the end-of-turn token is already in the KV


def test_a_context_shift_while_decoding_is_the_one_place_the_kv_is_smaller(
    emulator_lib: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    long_answer = " ".join(["word"] * 60)
    model = write_model(tmp_path, f"default_answer = {long_answer}")
    with Runtime(emulator_lib) as runtime:
        runtime.init(RuntimeParams(model_path=model, max_context_len=128, max_new_tokens=-1))
        account = Account(runtime, capfd)
        account.system("Be brief.")
        account.run("one")
        shifted = account.run("two")
    assert shifted.perf is not None
    shifts = [match.groups() for line in shifted.log if (match := _SHIFT.search(line))]
    deleted = sum(int(end) - int(start) for start, end in shifts)
    assert deleted > 0
    # KV after = reused + prefilled + generated - deleted: the identity under-counts by exactly the deleted tokens.
    assert shifted.reused == shifted.kv_before - deleted


def test_keep_history_0_leaves_only_the_system_prompt_and_logs_its_reuse(account: Account) -> None:
    account.system(ASSIST)
    first = account.run("hello", keep_history=False)
    second = account.run("again", keep_history=False)
    system = ntok(system_part(ASSIST))
    assert first.kv_after == second.kv_after == system  # the turn and its answer are dropped (§6)
    assert second.matched == system  # the reuse is only in the log: the identity is for keep_history=1 runs
    assert second.perf is not None
    assert second.perf.prefill_tokens == ntok(user_turn("again"))
    # After a switch a keep_history=0 run still matches the prefix the two system parts share (and logs it).
    account.system(API)
    switched = account.run("hello", keep_history=False)
    shared = common_prefix(system_part(ASSIST), system_part(API))
    assert switched.matched == shared > 0
    assert switched.perf is not None
    assert switched.perf.prefill_tokens == ntok(system_part(API) + user_turn("hello")) - shared


# One step of a random session: a keep_history run (optionally cut), a clear, or a switch of system prompt.
_STEPS = st.one_of(
    st.tuples(
        st.just("run"),
        st.sampled_from(["hi", "turn on the light", "a much longer question about lamps"]),
        st.sampled_from([0, 0, 2]),
    ),
    st.tuples(st.just("clear"), st.booleans(), st.just(0)),
    st.tuples(st.just("system"), st.sampled_from([ASSIST, API, ""]), st.just(0)),
    st.tuples(st.just("forget"), st.just("bye"), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_STEPS, min_size=1, max_size=12))
def test_the_identity_holds_over_any_sequence_of_runs_clears_and_switches(
    account: Account, binding_profile: str, steps: list[tuple[str, object, int]]
) -> None:
    account.runtime.clear_kv_cache(False)
    account.system(ASSIST)
    for kind, argument, cap in steps:
        if kind == "clear":
            account.runtime.clear_kv_cache(bool(argument))
            continue
        if kind == "system":
            account.system(str(argument))
            continue
        if kind == "forget":
            account.run(str(argument), keep_history=False)
            continue
        per_run_cap = cap if binding_profile == "v130" else 0
        result = account.run(str(argument), max_new_tokens=per_run_cap)
        assert result.perf is not None
        rebuilt = any("is rebuilt" in line for line in result.log)
        if result.matched is not None:
            expected = result.matched  # a fresh prompt: the prefix the runtime matched
        elif rebuilt or result.kv_before == 0:
            expected = 0
        else:
            expected = result.kv_before  # appended: everything before is reused
        assert result.reused == expected, (kind, argument, result)
        assert 0 <= result.reused <= result.kv_before
