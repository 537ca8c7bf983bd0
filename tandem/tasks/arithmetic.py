"""`addition` and `multiplication`: integer arithmetic with a column-by-column scratchpad.

Scratchpads are built for tiny transformers: one short line per column, same shape every time,
single digits separated by single symbols, and every line only needs the two digits of its column
plus the carry (or borrow) written at the end of the line above.

Addition, "What is 482 + 37?" (operands right-aligned, the shorter padded with 0):

    2+7+0=9 c0        x+y+carry_in=sum c<carry_out>
    8+3+0=11 c1
    4+0+1=5 c0

Subtraction, "What is 482 - 37?" (a >= b, so the result is never negative):

    2-7-0=5 b1        x-y-borrow_in=digit b<borrow_out>  (here 12-7-0=5, borrow 1)
    8-3-1=4 b0
    4-0-0=4 b0

Multiplication by a one-digit m, "What is 482 * 7?":

    2*7+0=14 c1       x*m+carry_in=value c<carry_out>
    8*7+1=57 c5
    4*7+5=33 c3
    0*7+3=3 c0

The rule linking scratchpad and answer is the same for all three: the answer is the LAST DIGIT of
each line's result (the number after "="), read from the bottom line up, with leading zeros
dropped. A carry left after the leftmost column gets one more column with a 0 digit (the
"0*7+3=3 c0" line above; "0+0+1=1 c0" for addition), so every line contributes exactly one digit.

For a two-digit multiplier, e.g. "What is 482 * 37?", the scratchpad is the two partial products
(each headed by what it computes and closed by "=value"), then their sum in the addition format:

    482*7
    2*7+0=14 c1
    ...
    =3374
    482*3
    ...
    =1446
    3374+14460
    4+0+0=4 c0
    ...
    =17834
"""

from __future__ import annotations

import random
import re

from tandem.tasks.base import Example, Task

_INT = re.compile(r"[+-]?[0-9]{1,100}")


def parse_int(text: str | None) -> int | None:
    """The integer written in `text` (surrounding spaces allowed), else None. Never raises."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    return int(text) if _INT.fullmatch(text) else None


def _count(digits: int) -> int:
    """How many numbers have exactly `digits` digits (0 counts as a 1-digit number)."""
    return 10 if digits == 1 else 9 * 10 ** (digits - 1)


def random_number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """Digit count uniform in [min_digits, max_digits], then a uniform number with that many digits."""
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def answer_from_lines(lines: list[str]) -> str:
    """The answer a scratchpad spells: last digit of each line's result, bottom line first."""
    text = "".join(line.split("=")[1].split(" ")[0][-1] for line in reversed(lines))
    return text.lstrip("0") or "0"


def addition_lines(a: int, b: int) -> list[str]:
    """Column lines for a + b (a, b >= 0), rightmost column first."""
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a).zfill(width), str(b).zfill(width)
    lines, carry = [], 0
    for x, y in zip(reversed(xs), reversed(ys)):
        total = int(x) + int(y) + carry
        lines.append(f"{x}+{y}+{carry}={total} c{total // 10}")
        carry = total // 10
    if carry:
        lines.append(f"0+0+{carry}={carry} c0")
    return lines


def subtraction_lines(a: int, b: int) -> list[str]:
    """Column lines for a - b (a >= b >= 0), rightmost column first."""
    if a < b:
        raise ValueError("subtraction_lines needs a >= b")
    width = len(str(a))
    xs, ys = str(a), str(b).zfill(width)
    lines, borrow = [], 0
    for x, y in zip(reversed(xs), reversed(ys)):
        digit = int(x) - int(y) - borrow
        new_borrow = 1 if digit < 0 else 0
        digit += 10 * new_borrow
        lines.append(f"{x}-{y}-{borrow}={digit} b{new_borrow}")
        borrow = new_borrow
    return lines


def multiply_lines(a: int, m: int) -> list[str]:
    """Column lines for a * m with a one-digit m (0..9), rightmost digit of a first."""
    if not 0 <= m <= 9:
        raise ValueError("multiply_lines needs a one-digit multiplier")
    lines, carry = [], 0
    for x in reversed(str(a)):
        value = int(x) * m + carry
        lines.append(f"{x}*{m}+{carry}={value} c{value // 10}")
        carry = value // 10
    if carry:
        lines.append(f"0*{m}+{carry}={carry} c0")
    return lines


class AdditionTask(Task):
    """Add (and, for half the problems, subtract) two non-negative integers."""

    name = "addition"
    PARAMS = {"min_digits": 1, "max_digits": 3, "subtraction": True}

    def _validate(self) -> None:
        self.min_digits = self._int_param("min_digits", 1, 30)
        self.max_digits = self._int_param("max_digits", self.min_digits, 30)
        self.subtraction = self._bool_param("subtraction")

    def _space_size(self) -> int:
        n = sum(_count(d) for d in range(self.min_digits, self.max_digits + 1))
        return n * n + (n * (n + 1) // 2 if self.subtraction else 0)

    def _generate(self, rng: random.Random) -> Example:
        a = random_number(rng, self.min_digits, self.max_digits)
        b = random_number(rng, self.min_digits, self.max_digits)
        if self.subtraction and rng.random() < 0.5:
            a, b = max(a, b), min(a, b)
            op, result, lines = "-", a - b, subtraction_lines(a, b)
        else:
            op, result, lines = "+", a + b, addition_lines(a, b)
        return Example(prompt=f"What is {a} {op} {b}?", answer=str(result),
                       thinking="\n".join(lines), meta={"a": a, "b": b, "op": op})

    def check_answer(self, answer: str | None, example: Example) -> bool:
        value = parse_int(answer)
        return value is not None and value == int(example.answer)


class MultiplicationTask(Task):
    """Multiply an integer by a one- or two-digit integer."""

    name = "multiplication"
    PARAMS = {"min_digits": 1, "max_digits": 3, "multiplier_digits": 1}

    def _validate(self) -> None:
        self.min_digits = self._int_param("min_digits", 1, 30)
        self.max_digits = self._int_param("max_digits", self.min_digits, 30)
        self.multiplier_digits = self._int_param("multiplier_digits", 1, 2)

    def _space_size(self) -> int:
        n = sum(_count(d) for d in range(self.min_digits, self.max_digits + 1))
        return n * _count(self.multiplier_digits)

    def _generate(self, rng: random.Random) -> Example:
        a = random_number(rng, self.min_digits, self.max_digits)
        m = random_number(rng, self.multiplier_digits, self.multiplier_digits)
        if m < 10:
            lines = multiply_lines(a, m)
        else:
            high, low = divmod(m, 10)
            p_low, p_high = a * low, a * high * 10
            lines = [f"{a}*{low}", *multiply_lines(a, low), f"={p_low}",
                     f"{a}*{high}", *multiply_lines(a, high), f"={a * high}",
                     f"{p_low}+{p_high}", *addition_lines(p_low, p_high), f"={p_low + p_high}"]
        return Example(prompt=f"What is {a} * {m}?", answer=str(a * m),
                       thinking="\n".join(lines), meta={"a": a, "b": m, "op": "*"})

    def check_answer(self, answer: str | None, example: Example) -> bool:
        value = parse_int(answer)
        return value is not None and value == int(example.answer)
