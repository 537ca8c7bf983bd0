"""`countdown`: combine the given numbers with + - * / to hit a target.

    prompt:   Using the numbers [3, 7, 12], make 15. Use each number exactly once with + - * /.
    thinking: 12-7=5
              5*3=15
    answer:   (12-7)*3

Instances are always solvable: the generator draws the numbers, then builds a random expression
over them (two values are combined per step; subtraction puts the larger value first so every
intermediate is a positive integer; division only when exact and by a value > 1) and the target
is its value. The scratchpad lists those steps, one per line; the last line's result is the target.

`check_answer` never evaluates Python: a small recursive-descent parser reads integers, + - * /
and parentheses into exact `Fraction`s. An answer is correct when it uses exactly the given
numbers (as a multiset) and its value equals the target exactly. Intermediate fractions are
allowed (e.g. 3/2*4 = 6); only the final value must be exact.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from tandem.tasks.base import Example, Task

MAX_EXPRESSION_CHARS = 256   # longer answers are rejected outright
MAX_DEPTH = 32               # parenthesis nesting limit (keeps the parser's recursion bounded)

_ATOM, _MUL, _ADD = 3, 2, 1
_PREC = {"+": _ADD, "-": _ADD, "*": _MUL, "/": _MUL}
_PROMPT = re.compile(r"numbers \[([0-9,\s]*)\], make ([0-9]+)")


class ExpressionError(ValueError):
    """The text is not a well-formed arithmetic expression."""


def _tokenize(text: str) -> list:
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch in " \t\n":
            i += 1
        elif "0" <= ch <= "9":
            j = i
            while j < len(text) and "0" <= text[j] <= "9":
                j += 1
            if j - i > 12:
                raise ExpressionError("number too long")
            tokens.append(int(text[i:j]))
            i = j
        elif ch in "+-*/()":
            tokens.append(ch)
            i += 1
        else:
            raise ExpressionError(f"unexpected character {ch!r}")
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ; factor := INT | '(' expr ')'"""

    def __init__(self, tokens: list):
        self.tokens, self.pos, self.depth, self.numbers = tokens, 0, 0, []

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self):
        token = self.peek()
        self.pos += 1
        return token

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term()
            value = value + right if op == "+" else value - right
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.factor()
            if op == "*":
                value = value * right
            elif right == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / right
        return value

    def factor(self) -> Fraction:
        token = self.take()
        if isinstance(token, int):
            self.numbers.append(token)
            return Fraction(token)
        if token == "(":
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ExpressionError("parentheses nested too deeply")
            value = self.expr()
            if self.take() != ")":
                raise ExpressionError("missing ')'")
            self.depth -= 1
            return value
        raise ExpressionError(f"expected a number or '(', got {token!r}")


def evaluate_expression(text: str) -> tuple[Fraction, list[int]]:
    """Exact value of an integer expression with + - * / ( ), and the numbers it uses, in order.

    Raises ExpressionError (a ValueError) for anything else. No unary minus.
    """
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError("not a string of reasonable length")
    parser = _Parser(_tokenize(text))
    value = parser.expr()
    if parser.pos != len(parser.tokens):
        raise ExpressionError(f"unexpected {parser.peek()!r} after the expression")
    return value, parser.numbers


def _join(left: tuple[str, int], op: str, right: tuple[str, int]) -> tuple[str, int]:
    """Write `left op right` with the fewest parentheses; each side is (text, precedence)."""
    prec = _PREC[op]
    ltext, lprec = left
    rtext, rprec = right
    if lprec < prec:
        ltext = f"({ltext})"
    if rprec < prec or (rprec == prec and op in "-/"):
        rtext = f"({rtext})"
    return f"{ltext}{op}{rtext}", prec


class CountdownTask(Task):
    """Reach a target from `count` numbers in 1..max_number."""

    name = "countdown"
    PARAMS = {"count": 3, "max_number": 20}

    def _validate(self) -> None:
        self.count = self._int_param("count", 2, 6)
        self.max_number = self._int_param("max_number", 2, 10_000)

    def _space_size(self) -> int:
        return self.max_number ** self.count * self.count

    def _generate(self, rng: random.Random) -> Example:
        numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
        pool = [(n, (str(n), _ATOM)) for n in numbers]
        lines = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (x, xexpr), (y, yexpr) = pool[i], pool[j]
            ops = ["+", "*"]
            if x != y:
                ops.append("-")
            if min(x, y) > 1 and max(x, y) % min(x, y) == 0:
                ops.append("/")
            op = rng.choice(ops)
            if op in "-/" and x < y:
                (x, xexpr), (y, yexpr) = (y, yexpr), (x, xexpr)
            value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
            lines.append(f"{x}{op}{y}={value}")
            pool = [item for k, item in enumerate(pool) if k not in (i, j)]
            pool.append((value, _join(xexpr, op, yexpr)))
        target, (expression, _) = pool[0]
        shown = list(numbers)
        rng.shuffle(shown)
        prompt = (f"Using the numbers [{', '.join(map(str, shown))}], make {target}. "
                  f"Use each number exactly once with + - * /.")
        return Example(prompt=prompt, answer=expression, thinking="\n".join(lines),
                       meta={"numbers": shown, "target": target})

    @staticmethod
    def _instance(example: Example) -> tuple[list[int], int] | None:
        """(numbers, target) from the example's meta, else read back from its prompt."""
        meta = example.meta or {}
        if "numbers" in meta and "target" in meta:
            return [int(n) for n in meta["numbers"]], int(meta["target"])
        found = _PROMPT.search(example.prompt)
        if not found:
            return None
        numbers = [int(n) for n in found.group(1).replace(",", " ").split()]
        return numbers, int(found.group(2))

    def check_answer(self, answer: str | None, example: Example) -> bool:
        instance = self._instance(example)
        if instance is None or not isinstance(answer, str):
            return False
        numbers, target = instance
        try:
            value, used = evaluate_expression(answer)
        except ExpressionError:
            return False
        return sorted(used) == sorted(numbers) and value == target
