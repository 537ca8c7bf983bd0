"""`JsonlTask`: the user's own data, one JSON object per line, in either of two shapes:

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "answer": "...", "thinking": "..."}        ("thinking" optional)

Chat shape: the last message must be the assistant's; the prompt is the last user message (earlier
turns are dropped). If the assistant text contains an `<answer>…</answer>` block it is split with
`parse_reasoning` into thinking and answer; otherwise the whole text is the answer and thinking is "".
Roles must be "system", "user" or "assistant". In the flat shape "answer" may also be a JSON number.
Blank lines are skipped; anything else that is wrong raises DataError naming PATH:LINE.

Split: the last ~10% of rows (`test_fraction`, at least one row) are the fixed test split, in file
order (`rows` keeps them all, for `tandem eval --split all`); `example(i)` cycles over the other rows, reshuffled every epoch (seeded). Train rows whose
prompt also appears in the test split are dropped. With a single row, that row is used for both.
"""

from __future__ import annotations

import json
import os
import random
import re
from fractions import Fraction

from tandem.errors import ConfigError, DataError, TandemError
from tandem.reasoning import parse_reasoning
from tandem.tasks.base import Example, Task, stable_seed

SHAPES = ('each line must be {"messages": [{"role": "user", "content": ...}, '
          '{"role": "assistant", "content": ...}]} or {"prompt": ..., "answer": ...} '
          '(optional "thinking")')
_ROLES = ("system", "user", "assistant")
_SPACE = re.compile(r"\s+")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?(/\d+)?")


def _normalise(text: str) -> str:
    return _SPACE.sub(" ", text.strip())


def _as_number(text: str) -> Fraction | None:
    """The exact number `text` spells ("42", "-1.50", "3/4", "1e3", "1,000"), else None."""
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if len(text) > 100 or not _NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(answer: str | None, reference: str) -> bool:
    """Normalised exact match: strip, collapse whitespace; numbers compared by value."""
    if not isinstance(answer, str):
        return False
    a, b = _normalise(answer), _normalise(reference)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and x == y


def _row(obj, where: str) -> Example:
    """One parsed JSON line -> Example; DataError(where: what is wrong; shapes) otherwise."""
    def bad(what: str) -> DataError:
        return DataError(f"{where}: {what}; {SHAPES}")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        extra = sorted(set(obj) - {"messages"})
        if extra:
            raise bad(f"unexpected key {extra[0]!r} next to \"messages\"")
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad('"messages" must be a non-empty list')
        for k, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                    or not isinstance(msg.get("content"), str):
                raise bad(f'message {k} must be an object with string "role" and "content"')
            if msg["role"] not in _ROLES:
                raise bad(f"message {k} has role {msg['role']!r}; roles are {', '.join(_ROLES)}")
        if messages[-1]["role"] != "assistant":
            raise bad("the last message must have role \"assistant\"")
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users or not users[-1].strip():
            raise bad("there must be a non-empty \"user\" message")
        content = messages[-1]["content"]
        parsed = parse_reasoning(content)
        if parsed.answer is not None:
            thinking, answer = parsed.thinking, parsed.answer
        else:
            thinking, answer = "", content.strip()
        if not answer:
            raise bad("the assistant answer is empty")
        return Example(prompt=users[-1].strip(), answer=answer, thinking=thinking)
    if "prompt" in obj or "answer" in obj:
        extra = sorted(set(obj) - {"prompt", "answer", "thinking"})
        if extra:
            raise bad(f"unexpected key {extra[0]!r}")
        prompt, answer, thinking = obj.get("prompt"), obj.get("answer"), obj.get("thinking", "")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad('"prompt" must be a non-empty string')
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise bad('"answer" must be a non-empty string')
        if not isinstance(thinking, str):
            raise bad('"thinking" must be a string')
        return Example(prompt=prompt.strip(), answer=answer.strip(), thinking=thinking.strip())
    keys = ", ".join(repr(k) for k in sorted(obj)) or "none"
    raise bad(f"unrecognised keys ({keys})")


def load_jsonl(path: str | os.PathLike) -> list[Example]:
    """All rows of a JSONL file as Examples (see module docstring); DataError on any problem."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise DataError(f"file {what}: {path} (expected a .jsonl file with one JSON object "
                        f"per line)")
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            lineno = 0
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column "
                                    f"{err.colno}); {SHAPES}") from None
                rows.append(_row(obj, f"{path}:{lineno}"))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the file as UTF-8 JSONL") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    if not rows:
        raise DataError(f"{path}:1: the file has no examples; {SHAPES}")
    return rows


class JsonlTask(Task):
    """Examples read from a user's JSONL file."""

    name = "jsonl"
    PARAMS = {"test_fraction": 0.1}

    def __init__(self, path: str | os.PathLike, seed: int = 0, **params):
        super().__init__(seed, **params)
        self.path = os.fspath(path)
        self.name = self.path
        self.rows = rows = load_jsonl(self.path)
        if len(rows) == 1:
            # A single row cannot be split: it serves as both the train and the test example.
            self.test_rows, self.train_rows = rows, rows
            self.held_out_prompts = {rows[0].prompt}
        else:
            n_test = min(len(rows) - 1, max(1, round(len(rows) * self.params["test_fraction"])))
            self.test_rows = rows[len(rows) - n_test:]
            self.held_out_prompts = {ex.prompt for ex in self.test_rows}
            train = [ex for ex in rows[:len(rows) - n_test] if ex.prompt not in self.held_out_prompts]
            # If every train prompt is also a test prompt, there is nothing disjoint to train on:
            # fall back to the train rows as they are rather than fail.
            self.train_rows = train or rows[:len(rows) - n_test]
        self._order_epoch, self._order = -1, []

    def _validate(self) -> None:
        fraction = self.params["test_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                or not 0 < fraction < 1:
            raise ConfigError(f"test_fraction must be a number between 0 and 1, got {fraction!r}")

    def held_out_size(self) -> int:
        return len(self.test_rows)

    def held_out(self, prompt: str) -> bool:
        return prompt in self.held_out_prompts  # the file's own split (above), not the prompt-hash one

    def test_set(self, n: int = 200) -> list[Example]:
        return list(self.test_rows[:max(0, n)])

    def validation_set(self, n: int = 200) -> list[Example]:
        raise TandemError(f"{self.path} has no validation split (its held-out rows are its test split); "
                          "tune on a separate .jsonl file, or evaluate with --split test")

    def example(self, index: int) -> Example:
        """Train row for `index`: epoch index // rows, in a shuffled order fixed by (seed, epoch)."""
        epoch, offset = divmod(index, len(self.train_rows))
        if epoch != self._order_epoch:
            order = list(range(len(self.train_rows)))
            random.Random(stable_seed("jsonl", self.seed, epoch)).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self.train_rows[self._order[offset]]

    def check_answer(self, answer: str | None, example: Example) -> bool:
        return answers_match(answer, example.answer)

    def __repr__(self) -> str:
        return f"JsonlTask({self.path!r}, seed={self.seed})"
