"""Tests for tandem.tasks: determinism, splits, rewards, scratchpads, countdown parser, JSONL."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.errors import ConfigError, DataError, TandemError
from tandem.reasoning import format_reasoning
from tandem.tasks import TASKS, Example, JsonlTask, RewardResult, Task, get_task
from tandem.tasks.arithmetic import answer_from_lines
from tandem.tasks.countdown import ExpressionError, evaluate_expression

CONFIGS = [
    ("addition", {}),
    ("addition", {"min_digits": 2, "max_digits": 5, "subtraction": False}),
    ("multiplication", {}),
    ("multiplication", {"multiplier_digits": 2}),
    ("countdown", {}),
    ("countdown", {"count": 4, "max_number": 12}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'default'}" for name, p in CONFIGS]


# ---------------------------------------------------------------- registry and params

def test_registry_names():
    assert sorted(TASKS) == ["addition", "countdown", "multiplication"]
    for name, cls in TASKS.items():
        assert cls.name == name and issubclass(cls, Task)


def test_unknown_task_lists_known_names():
    with pytest.raises(ConfigError) as err:
        get_task("foo")
    msg = str(err.value)
    assert "'foo'" in msg and "\n" not in msg
    for name in TASKS:
        assert name in msg
    assert ".jsonl" in msg


def test_unknown_param_names_it_and_allowed():
    with pytest.raises(ConfigError) as err:
        get_task("addition", max_digit=3)
    msg = str(err.value)
    assert "max_digit" in msg and "max_digits" in msg and "subtraction" in msg


@pytest.mark.parametrize("name,params", [
    ("addition", {"min_digits": 0}),
    ("addition", {"min_digits": 3, "max_digits": 2}),
    ("addition", {"subtraction": "yes"}),
    ("multiplication", {"multiplier_digits": 3}),
    ("countdown", {"count": 1}),
    ("countdown", {"max_number": "20"}),
])
def test_bad_param_values(name, params):
    with pytest.raises(ConfigError):
        get_task(name, **params)


def test_bad_seed():
    with pytest.raises(ConfigError):
        get_task("addition", seed="0")


# ---------------------------------------------------------------- determinism and splits

@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_deterministic_across_instances(name, params):
    a, b = get_task(name, seed=3, **params), get_task(name, seed=3, **params)
    assert [a.example(i) for i in range(50)] == [b.example(i) for i in range(50)]
    assert [b.example(i) for i in reversed(range(50))] == [a.example(i) for i in reversed(range(50))]
    assert a.test_set(100) == b.test_set(100)
    # different seeds -> different train streams, same test split
    c = get_task(name, seed=4, **params)
    assert [c.example(i) for i in range(50)] != [a.example(i) for i in range(50)]
    assert c.test_set(100) == a.test_set(100)


def test_deterministic_across_processes():
    code = ("from tandem.tasks import get_task; t = get_task('countdown', seed=7); "
            "print(repr([t.example(i).completion() for i in range(5)])); "
            "print(repr([e.prompt for e in t.test_set(5)]))")
    root = str(Path(__file__).resolve().parents[1])
    outputs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, cwd=root,
                              env={"PYTHONHASHSEED": str(h), "PYTHONPATH": root}).stdout
               for h in (1, 2)}
    assert len(outputs) == 1
    t = get_task("countdown", seed=7)
    assert outputs.pop().splitlines()[0] == repr([t.example(i).completion() for i in range(5)])


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_test_set_is_prefix_and_disjoint_from_train(name, params):
    task = get_task(name, **params)
    test = task.test_set(1000)
    assert len(test) == 1000
    assert task.test_set(200) == test[:200]
    assert task.test_set() == test[:200]
    assert len({ex.prompt for ex in test}) == len(test)
    test_prompts = {ex.prompt for ex in test}
    validation = task.validation_set(1000)
    validation_prompts = {ex.prompt for ex in validation}
    assert len(validation_prompts) == len(validation) > 900 and task.validation_set(50) == validation[:50]
    train_prompts = {task.example(i).prompt for i in range(2000)}
    assert not train_prompts & test_prompts and not train_prompts & validation_prompts
    assert not validation_prompts & test_prompts   # tuning on validation never looks at the test split
    assert {task.split_of(p) for p in test_prompts} == {"test"}
    assert len(train_prompts) > 1000  # the train stream is varied


def test_small_problem_space_still_splits():
    task = get_task("addition", min_digits=1, max_digits=1)
    test = task.test_set(200)
    assert 1 <= len(test) < 200  # only ~155 distinct problems exist; a tenth is the test split
    held = {ex.prompt for ex in test}
    train = {task.example(i).prompt for i in range(500)}
    assert not train & held and len(train) > 50


# ---------------------------------------------------------------- rewards

@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_reference_completion_gets_full_reward(name, params):
    task = get_task(name, seed=1, **params)
    for ex in [task.example(i) for i in range(200)] + task.test_set(100):
        assert isinstance(ex, Example) and ex.prompt and ex.answer and ex.thinking
        assert ex.completion() == format_reasoning(ex.thinking, ex.answer)
        assert ex.messages() == [{"role": "user", "content": ex.prompt},
                                 {"role": "assistant", "content": ex.completion()}]
        result = task.reward(ex.completion(), ex)
        assert isinstance(result, RewardResult)
        assert result.correct and result.format_ok and result.reward == pytest.approx(1.1)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_wrong_answers_and_broken_formats(name):
    task = get_task(name)
    ex = task.example(0)
    wrong = "99999999" if name != "countdown" else "1+1"
    r = task.reward(format_reasoning(ex.thinking, wrong), ex)
    assert (r.correct, r.format_ok, r.reward) == (False, True, pytest.approx(0.1))
    # right answer, broken format: correct but no format bonus
    r = task.reward(f"<answer>{ex.answer}</answer>", ex)
    assert (r.correct, r.format_ok, r.reward) == (True, False, pytest.approx(1.0))
    r = task.reward(ex.completion() + " trailing", ex)
    assert r.correct and not r.format_ok
    r = task.reward(ex.completion() + ex.completion(), ex)
    assert not r.format_ok
    # no answer at all
    for junk in ["", "blah", "<think>unfinished", "<answer></answer>", "\x00" * 50,
                 "<think></think><answer>" + "(" * 5000 + "</answer>", None, 12]:
        r = task.reward(junk, ex)
        assert not r.correct and r.reward <= 0.1 + 1e-9
    # custom weights
    r = task.reward(ex.completion(), ex, correctness_weight=2.0, format_weight=0.5)
    assert r.reward == pytest.approx(2.5)


def test_arithmetic_answer_leniency():
    task = get_task("addition")
    ex = Example("What is 2 + 3?", "5", "3+2+0=5 c0")
    assert task.check_answer(" 5 ", ex) and task.check_answer("+5", ex)
    for bad in [None, "", "5.0", "five", "5_0", "٥", "1" * 5000, "55"]:
        assert not task.check_answer(bad, ex)


# ---------------------------------------------------------------- scratchpads

_ADD = re.compile(r"^(\d)\+(\d)\+([01])=(\d+) c([01])$")
_SUB = re.compile(r"^(\d)-(\d)-([01])=(\d) b([01])$")
_MUL = re.compile(r"^(\d)\*(\d)\+(\d)=(\d+) c(\d)$")


def _check_columns(lines, pattern, a, b, op):
    """Recompute every column line, check carries chain, digits are the operands', and the answer."""
    carry = 0
    width = len(lines)
    xs = str(a).zfill(width)
    ys = str(b).zfill(width) if op != "*" else None
    for k, line in enumerate(lines):
        m = pattern.match(line)
        assert m, line
        x, y, cin, res, cout = map(int, m.groups())
        assert cin == carry, line
        assert x == int(xs[-1 - k]), line
        if op == "+":
            assert y == int(ys[-1 - k]) and res == x + y + cin and cout == res // 10
        elif op == "-":
            assert y == int(ys[-1 - k]) and res == (x - y - cin) % 10 and cout == int(x - y - cin < 0)
        else:
            assert y == b and res == x * y + cin and cout == res // 10
        carry = cout
    assert carry == 0
    expected = {"+": a + b, "-": a - b, "*": a * b}[op]
    assert answer_from_lines(lines) == str(expected)


def test_addition_scratchpad_example():
    task = get_task("addition")
    # find the documented layout on a hand-made instance via the generator's helpers
    from tandem.tasks.arithmetic import addition_lines, subtraction_lines
    assert addition_lines(482, 37) == ["2+7+0=9 c0", "8+3+0=11 c1", "4+0+1=5 c0"]
    assert subtraction_lines(482, 37) == ["2-7-0=5 b1", "8-3-1=4 b0", "4-0-0=4 b0"]
    assert addition_lines(999, 1)[-1] == "0+0+1=1 c0"
    assert answer_from_lines(addition_lines(999, 1)) == "1000"
    assert answer_from_lines(subtraction_lines(100, 99)) == "1"
    assert answer_from_lines(subtraction_lines(5, 5)) == "0"
    assert task.name == "addition"


@pytest.mark.parametrize("params", [{}, {"min_digits": 1, "max_digits": 6}])
def test_addition_scratchpads_recompute(params):
    task = get_task("addition", seed=5, **params)
    ops = set()
    for i in range(600):
        ex = task.example(i)
        a, b, op = ex.meta["a"], ex.meta["b"], ex.meta["op"]
        ops.add(op)
        assert ex.prompt == f"What is {a} {op} {b}?"
        assert int(ex.answer) == (a + b if op == "+" else a - b) and int(ex.answer) >= 0
        assert ex.answer == str(int(ex.answer))  # no leading zeros
        lines = ex.thinking.split("\n")
        assert len(lines) >= max(len(str(a)), len(str(b)))
        _check_columns(lines, _ADD if op == "+" else _SUB, a, b, op)
    assert ops == {"+", "-"}
    plus_only = get_task("addition", subtraction=False)
    assert {plus_only.example(i).meta["op"] for i in range(100)} == {"+"}


def test_digit_counts_in_range():
    task = get_task("addition", min_digits=2, max_digits=4)
    lengths = {len(str(task.example(i).meta[k])) for i in range(300) for k in "ab"}
    assert lengths == {2, 3, 4}


def test_multiplication_scratchpads_recompute():
    task = get_task("multiplication", seed=2)
    for i in range(500):
        ex = task.example(i)
        a, b = ex.meta["a"], ex.meta["b"]
        assert ex.prompt == f"What is {a} * {b}?" and ex.answer == str(a * b) and b < 10
        _check_columns(ex.thinking.split("\n"), _MUL, a, b, "*")


def test_two_digit_multiplication_scratchpads_recompute():
    task = get_task("multiplication", seed=2, multiplier_digits=2)
    for i in range(300):
        ex = task.example(i)
        a, b = ex.meta["a"], ex.meta["b"]
        assert 10 <= b <= 99 and ex.answer == str(a * b)
        lines = ex.thinking.split("\n")
        high, low = divmod(b, 10)
        # block 1: a*low, block 2: a*high, block 3: the sum of the shifted partials
        i1 = lines.index(f"={a * low}")
        assert lines[0] == f"{a}*{low}"
        _check_columns(lines[1:i1], _MUL, a, low, "*")
        assert lines[i1 + 1] == f"{a}*{high}"
        i2 = lines.index(f"={a * high}", i1 + 2)
        _check_columns(lines[i1 + 2:i2], _MUL, a, high, "*")
        assert lines[i2 + 1] == f"{a * low}+{a * high * 10}"
        assert lines[-1] == f"={a * b}"
        _check_columns(lines[i2 + 2:-1], _ADD, a * low, a * high * 10, "+")


_STEP = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


@pytest.mark.parametrize("params", [{}, {"count": 4}])
def test_countdown_scratchpads_recompute(params):
    task = get_task("countdown", seed=9, **params)
    count = params.get("count", 3)
    for i in range(400):
        ex = task.example(i)
        numbers, target = ex.meta["numbers"], ex.meta["target"]
        assert len(numbers) == count and all(1 <= n <= 20 for n in numbers)
        assert ex.prompt == (f"Using the numbers [{', '.join(map(str, numbers))}], make {target}. "
                             "Use each number exactly once with + - * /.")
        pool = list(numbers)
        lines = ex.thinking.split("\n")
        assert len(lines) == count - 1
        for line in lines:
            x, op, y, res = _STEP.match(line).groups()
            x, y, res = int(x), int(y), int(res)
            pool.remove(x)
            pool.remove(y)
            if op == "/":
                assert y > 0 and x % y == 0
            value = {"+": x + y, "-": x - y, "*": x * y, "/": x // max(y, 1)}[op]
            assert value == res and res > 0
            pool.append(res)
        assert pool == [target]
        value, used = evaluate_expression(ex.answer)
        assert value == target and sorted(used) == sorted(numbers)


# ---------------------------------------------------------------- countdown parser

def _cd(numbers, target):
    return Example(f"Using the numbers [{', '.join(map(str, numbers))}], make {target}. "
                   "Use each number exactly once with + - * /.", "", "",
                   meta={"numbers": numbers, "target": target})


def test_countdown_check_answer():
    task = get_task("countdown")
    ex = _cd([3, 7, 12], 15)
    assert task.check_answer("(12-7)*3", ex)
    assert task.check_answer(" ( 12 - 7 ) * 3 ", ex)
    assert task.check_answer("3*(12-7)", ex)
    assert task.check_answer("((12-7))*3", ex)
    # meta is optional: numbers and target are read back from the prompt
    assert task.check_answer("(12-7)*3", Example(ex.prompt, "", ""))
    rejects = [
        "12-7*3",            # wrong value
        "(12-7)*3*1",        # extra number
        "(12-7)*7",          # wrong numbers / reuse
        "(12-12)*3+15",      # reuse and extra
        "(7-3)*3",           # missing 12, reuses 3
        "12+3",              # missing a number
        "15",                # just the target
        "(12-7)*3=15",       # not an expression
        "12/7*3",            # non-exact
        "(12+3)/7",          # non-exact value
        "-(7-12)*3",         # unary minus not allowed
        "(12-7)*3)",
        "((12-7)*3",
        "12 7 3",
        "",
        "__import__('os')",
        "__import__('os').system('true')",
        "2**4",
        "(12-7)*3.0",
        "1" * 300,
        "(" * 40 + "12-7" + ")" * 40 + "*3",
    ]
    for answer in rejects + [None]:
        assert not task.check_answer(answer, ex), answer
    # division: exact result accepted; intermediate fractions allowed if the value is exact
    assert task.check_answer("8/4*3", _cd([8, 4, 3], 6))
    assert task.check_answer("3/2*4", _cd([3, 2, 4], 6))
    assert not task.check_answer("7/2*2", _cd([7, 2, 2], 6))
    assert not task.check_answer("8/(4-4)", _cd([8, 4, 4], 0))
    # duplicates in the multiset
    assert task.check_answer("5+5*2", _cd([5, 5, 2], 15))
    assert not task.check_answer("5+5*5", _cd([5, 2, 5], 30))


def test_evaluate_expression_errors():
    for bad in ["", "1+", "(1", "1)", "a", "1 2", "1//2", "1/0", "0x10"]:
        with pytest.raises(ExpressionError):
            evaluate_expression(bad)
    value, used = evaluate_expression("2*(3+4)-10/5")
    assert value == 12 and used == [2, 3, 4, 10, 5]


# ---------------------------------------------------------------- corpus

@pytest.mark.parametrize("name", sorted(TASKS))
def test_corpus(name):
    task = get_task(name)
    texts = task.corpus(20)
    assert len(texts) == 20
    ex = task.example(3)
    assert texts[3] == f"{ex.prompt}\n{ex.completion()}"


# ---------------------------------------------------------------- JSONL

def _write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def test_jsonl_both_shapes(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": format_reasoning("2+2=4", "4")}]},
        "",
        {"messages": [{"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "  Paris  "}]},
        {"prompt": "What is 3+3?", "answer": "6", "thinking": "3+3=6"},
        {"prompt": "Say yes", "answer": "yes"},
        {"prompt": "Number?", "answer": 7},
    ]
    path = _write(tmp_path, rows)
    task = get_task(str(path), seed=0)
    assert isinstance(task, JsonlTask)
    all_rows = task.train_rows + task.test_rows
    assert len(all_rows) == 5 and len(task.test_rows) == 1
    first, second, third, fourth, fifth = all_rows
    assert (first.prompt, first.thinking, first.answer) == ("What is 2+2?", "2+2=4", "4")
    assert (second.prompt, second.thinking, second.answer) == ("Capital of France?", "", "Paris")
    assert (third.prompt, third.thinking, third.answer) == ("What is 3+3?", "3+3=6", "6")
    assert (fourth.thinking, fourth.answer) == ("", "yes")
    assert fifth.answer == "7"
    assert task.test_set() == [fifth]
    for ex in all_rows:
        r = task.reward(ex.completion(), ex)
        assert r.correct and r.format_ok and r.reward == pytest.approx(1.1)


def test_jsonl_split_and_epochs(tmp_path):
    path = _write(tmp_path, [{"prompt": f"q{i}", "answer": str(i)} for i in range(30)])
    task = JsonlTask(path, seed=1)
    assert [ex.prompt for ex in task.test_set()] == ["q27", "q28", "q29"]
    assert task.test_set(2) == task.test_set()[:2]
    epoch0 = [task.example(i).prompt for i in range(27)]
    epoch1 = [task.example(i).prompt for i in range(27, 54)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"q{i}" for i in range(27))
    assert epoch0 != epoch1  # reshuffled per epoch
    again = JsonlTask(path, seed=1)
    assert [again.example(i).prompt for i in reversed(range(54))] == (epoch0 + epoch1)[::-1]
    assert [JsonlTask(path, seed=2).example(i).prompt for i in range(27)] != epoch0
    assert JsonlTask(path, seed=2).test_set() == task.test_set()


def test_jsonl_single_row_and_duplicate_prompts(tmp_path):
    one = JsonlTask(_write(tmp_path, [{"prompt": "p", "answer": "a"}], "one.jsonl"))
    assert one.test_set() == [one.example(0)] == [one.example(5)]
    dup = JsonlTask(_write(tmp_path, [{"prompt": "same", "answer": "1"}, {"prompt": "x", "answer": "2"},
                                      {"prompt": "same", "answer": "1"}], "dup.jsonl"))
    assert {dup.example(i).prompt for i in range(10)} == {"x"}


def test_jsonl_check_answer_normalises(tmp_path):
    task = JsonlTask(_write(tmp_path, [{"prompt": "p", "answer": "a"}]))
    ex = Example("p", "New  York", "")
    assert task.check_answer("  New York ", ex) and not task.check_answer("new york", ex)
    num = Example("p", "1000", "")
    for ok in ["1000", "1000.0", " 1e3 ", "1,000", "+1000"]:
        assert task.check_answer(ok, num), ok
    for bad in ["100", "1000x", None, "", "1e999999999", "1_000"]:
        assert not task.check_answer(bad, num), bad
    assert task.check_answer("0.5", Example("p", "1/2", ""))


@pytest.mark.parametrize("line,fragment", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "JSON object"),
    ('{"question": "q", "answer": "a"}', "unexpected key"),
    ('{"foo": 1}', "unrecognised keys"),
    ('{"prompt": "q"}', '"answer"'),
    ('{"prompt": 5, "answer": "a"}', '"prompt"'),
    ('{"prompt": "q", "answer": "a", "thinking": 3}', '"thinking"'),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "last message"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "user"),
    ('{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]}',
     "string"),
    ('{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "role"),
])
def test_jsonl_malformed_line_reports_file_and_line(tmp_path, line, fragment):
    path = _write(tmp_path, [{"prompt": "ok", "answer": "1"}, "", line])
    with pytest.raises(DataError) as err:
        JsonlTask(path)
    msg = str(err.value)
    assert f"{path}:3:" in msg and fragment in msg and "\n" not in msg
    assert '"messages"' in msg and '"prompt"' in msg  # names both accepted shapes
    assert isinstance(err.value, TandemError)


def test_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.jsonl"):
        get_task(str(tmp_path / "nope.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=re.escape(f"{empty}:1")):
        JsonlTask(empty)
    with pytest.raises(ConfigError, match="test_fraction"):
        JsonlTask(_write(tmp_path, [{"prompt": "p", "answer": "a"}]), test_fraction=2)
    with pytest.raises(ConfigError, match="allowed: test_fraction"):
        JsonlTask(_write(tmp_path, [{"prompt": "p", "answer": "a"}]), shuffle=True)
