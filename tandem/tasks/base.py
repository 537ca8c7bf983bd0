"""The Task interface: a stream of training examples, held-out validation and test splits, and a reward.

A task produces `Example`s (prompt, final answer, step-by-step scratchpad). The reference assistant
turn of an example is `format_reasoning(thinking, answer)`, i.e. `<think>…</think><answer>…</answer>`.

Determinism
-----------
Every random draw comes from a `random.Random` seeded with `stable_seed(...)`, a SHA-256 of the
parts, so streams are identical across processes (Python's salted `hash()` is never used).

* `example(index)` (the TRAIN stream) depends on (task params, seed, index) only.
* `test_set(n)` and `validation_set(n)` depend on the task params only (never on the seed): each is
  the first n of one fixed list of distinct prompts drawn from a separate stream (seed part "test").

Three-way split: a fixed fifth of a task's problem space is held out, chosen by a hash of the
prompt (`held_out`), and the same hash divides it in two halves (`split_of`): validation, for
choosing settings (a preset's learning rate, steps...), and test, for the claims, never looked at
while tuning. The train stream skips held-out prompts; each list is the first distinct prompts of
its half in the "test" stream (at most 1000; fewer when the space is small). Both come from
the same generator, so the test split has the train stream's distribution minus repeats: no held-out
problem is of a kind training never shows. (Holding out the first N distinct prompts of a stream
instead, as an earlier version did, swallowed whole small corners of the space, e.g. every one-digit
multiplication, into the test split.)
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

from tandem.errors import ConfigError
from tandem.reasoning import format_reasoning, parse_reasoning

HELD_OUT = 1000          # the longest test (or validation) list (distinct held-out prompts)
HELD_OUT_SHARE = 5       # one prompt in 5 of the problem space is held out: half validation, half test
SPLITS = ("validation", "test")
_MAX_TRAIN_TRIES = 1000  # draws per train example before giving up (only tiny problem spaces)
_TEST_CACHE: dict = {}   # (task class, params hash) -> test examples, per process


def stable_seed(*parts) -> int:
    """A 64-bit seed from `parts` (ints, strings, dicts...), identical in every process."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class Example:
    prompt: str          # the user message text, e.g. "What is 4821 + 937?"
    answer: str          # canonical final answer, e.g. "5758"
    thinking: str        # scratchpad that goes inside <think> ("" for jsonl data without one)
    meta: dict = field(default_factory=dict, compare=False)  # task-specific details

    def completion(self) -> str:
        """The reference assistant text: `<think>\\n…\\n</think>\\n<answer>…</answer>`."""
        return format_reasoning(self.thinking, self.answer)

    def messages(self) -> list[dict]:
        """The example as a chat: one user turn, one assistant turn."""
        return [{"role": "user", "content": self.prompt},
                {"role": "assistant", "content": self.completion()}]


@dataclass
class RewardResult:
    correct: bool
    format_ok: bool
    reward: float        # correctness_weight * correct + format_weight * format_ok


class Task:
    """Base class. Subclasses set `name`, `PARAMS` (defaults) and implement `_generate`."""

    name: str = "task"
    PARAMS: dict = {}    # parameter name -> default value

    def __init__(self, seed: int = 0, **params):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"task seed must be an integer, got {seed!r}")
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            allowed = ", ".join(sorted(self.PARAMS)) or "(none)"
            raise ConfigError(f"unknown parameter {unknown[0]!r} for task {self.name!r}; "
                              f"allowed: {allowed}")
        self.seed = seed
        self.params = {**self.PARAMS, **params}
        self._validate()

    # ---- to implement -------------------------------------------------------------------------

    def _validate(self) -> None:
        """Check self.params; raise ConfigError with a one-line message."""

    def _generate(self, rng: random.Random) -> Example:
        """One random example drawn with `rng`."""
        raise NotImplementedError

    def _space_size(self) -> int | None:
        """Rough number of distinct prompts (None: effectively unlimited)."""
        return None

    def check_answer(self, answer: str | None, example: Example) -> bool:
        raise NotImplementedError

    # ---- helpers for subclasses ---------------------------------------------------------------

    def _int_param(self, key: str, lo: int, hi: int) -> int:
        value = self.params[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"task {self.name!r}: {key} must be an integer from {lo} to {hi}, "
                              f"got {value!r}")
        return value

    def _bool_param(self, key: str) -> bool:
        value = self.params[key]
        if not isinstance(value, bool):
            raise ConfigError(f"task {self.name!r}: {key} must be true or false, got {value!r}")
        return value

    # ---- public API ---------------------------------------------------------------------------

    def split_of(self, prompt: str) -> str:
        """"train", "validation" or "test": a hash of (task name, prompt), so the split does not move
        when the task's parameters change (a model trained on 2-digit problems and tested on 3-digit
        ones never sees a test prompt in training)."""
        bucket = stable_seed("held-out", self.name, prompt) % (2 * HELD_OUT_SHARE)
        return "test" if bucket == 0 else "validation" if bucket == HELD_OUT_SHARE else "train"

    def held_out(self, prompt: str) -> bool:
        """Whether `prompt` is kept out of training (validation or test)."""
        return self.split_of(prompt) != "train"

    def held_out_size(self) -> int:
        """The most prompts test_set (or validation_set) returns (a tenth of a small problem space)."""
        space = self._space_size()
        return HELD_OUT if space is None else max(1, min(HELD_OUT, space // (2 * HELD_OUT_SHARE)))

    def _held_out_list(self, split: str) -> list[Example]:
        key = (type(self), stable_seed(self.name, self.params), split)
        if key not in _TEST_CACHE:  # a split depends only on (task, params): share it
            want = self.held_out_size()
            rng = random.Random(stable_seed("test", self.name, self.params))
            examples: list[Example] = []
            seen: set[str] = set()
            tries = 0
            while len(examples) < want and tries < 40 * HELD_OUT_SHARE * want + 100:
                tries += 1
                ex = self._generate(rng)
                if ex.prompt not in seen and self.split_of(ex.prompt) == split:
                    seen.add(ex.prompt)
                    examples.append(ex)
            _TEST_CACHE[key] = examples
        return _TEST_CACHE[key]

    def test_set(self, n: int = 200) -> list[Example]:
        """The first n examples of the fixed test list (fewer if held_out_size() < n): for claims."""
        return list(self._held_out_list("test")[:max(0, n)])

    def validation_set(self, n: int = 200) -> list[Example]:
        """The first n examples of the fixed validation list, disjoint from the test one: for tuning."""
        return list(self._held_out_list("validation")[:max(0, n)])

    def example(self, index: int) -> Example:
        """Training example number `index`: deterministic in (params, seed, index), never a test prompt."""
        rng = random.Random(stable_seed("train", self.name, self.params, self.seed, index))
        for _ in range(_MAX_TRAIN_TRIES):
            ex = self._generate(rng)
            if not self.held_out(ex.prompt):
                return ex
        raise ConfigError(f"task {self.name!r} with {self.params} has too few distinct problems "
                          f"to hold out a test split; widen its parameters")

    def reward(self, completion: str, example: Example, correctness_weight: float = 1.0,
               format_weight: float = 0.1) -> RewardResult:
        """Score a model completion: correctness of its <answer> plus a bonus for strict format."""
        if not isinstance(completion, str):
            completion = ""
        parsed = parse_reasoning(completion)
        try:
            correct = bool(self.check_answer(parsed.answer, example))
        except Exception:  # a checker must never crash a training step on garbage output
            correct = False
        format_ok = bool(parsed.format_ok)
        return RewardResult(correct, format_ok,
                            correctness_weight * float(correct) + format_weight * float(format_ok))

    def corpus(self, n: int) -> list[str]:
        """n training texts (prompt, newline, reference completion) for fitting a tokenizer."""
        return [f"{ex.prompt}\n{ex.completion()}" for ex in (self.example(i) for i in range(n))]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.params.items()))
        return f"{type(self).__name__}(seed={self.seed}{', ' if args else ''}{args})"
