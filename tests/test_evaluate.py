"""tandem/evaluate.py, which every headline accuracy comes from, scored against a model whose
answers are known: the memorising model of tests/test_server.py answers its one QUESTION with
exactly REPLY (answer 19, in the reasoning format), so every figure below is known in advance.

    PYTHONPATH=. python -m pytest -q tests/test_evaluate.py
"""

import json

import pytest
import torch

from test_server import QUESTION, REPLY, build_tokenizer, memorized_model
from tandem.config import load_config
from tandem.errors import ConfigError, TandemError
from tandem.evaluate import evaluate_task
from tandem.infer.engine import Engine
from tandem.tasks import JsonlTask, get_task


@pytest.fixture(scope="module")
def memo():
    torch.set_num_threads(1)
    tok = build_tokenizer()
    return Engine(memorized_model(tok), max_batch=4), tok


def _task(tmp_path, answers: list[str], test_fraction: float) -> JsonlTask:
    """QUESTION once per answer; the file's last rows are its held-out (test) split."""
    path = tmp_path / "known.jsonl"
    path.write_text("".join(json.dumps({"prompt": QUESTION, "answer": a}) + "\n" for a in answers))
    return JsonlTask(path, test_fraction=test_fraction)


def test_scoring_and_the_held_out_split_with_known_answers(memo, tmp_path):
    engine, tok = memo
    # rows 0-7 train (every one "wrong": 20), rows 8-9 held out: 19 (what the model says) and 21
    task = _task(tmp_path, ["20"] * 8 + ["19", "21"], test_fraction=0.2)
    test = evaluate_task(engine, tok, task, n=10, max_new_tokens=64, keep_samples=10)
    reply_tokens = len(tok.encode(REPLY)) + 1                        # the reply, then <|im_end|>
    assert (test["n"], test["accuracy"], test["format_rate"]) == (2, 0.5, 1.0)
    assert test["avg_tokens"] == reply_tokens
    assert [(s["reference"], s["completion"], s["correct"]) for s in test["samples"]] == [
        ("19", REPLY, True), ("21", REPLY, False)]
    every = evaluate_task(engine, tok, task, n=10, max_new_tokens=64, split="all")
    assert (every["n"], every["accuracy"], every["format_rate"]) == (10, 0.1, 1.0)


def test_a_cut_off_reply_is_neither_formatted_nor_right(memo, tmp_path):
    engine, tok = memo
    task = _task(tmp_path, ["20", "19"], test_fraction=0.5)
    cut = evaluate_task(engine, tok, task, n=1, max_new_tokens=4)
    assert (cut["n"], cut["accuracy"], cut["format_rate"], cut["avg_tokens"]) == (1, 0.0, 0.0, 4)
    assert REPLY.startswith(cut["samples"][0]["completion"]) and cut["samples"][0]["completion"] != REPLY


def test_validation_and_test_splits_score_their_own_prompts(memo):
    engine, tok = memo
    task = get_task("addition")
    for split, expected in (("test", task.test_set(3)), ("validation", task.validation_set(3))):
        result = evaluate_task(engine, tok, task, n=3, max_new_tokens=2, split=split, keep_samples=3)
        assert result["split"] == split and [s["prompt"] for s in result["samples"]] == [e.prompt for e in expected]
    assert not {e.prompt for e in task.test_set(200)} & {e.prompt for e in task.validation_set(200)}
    with pytest.raises(TandemError, match="use test, validation or all"):
        evaluate_task(engine, tok, task, n=1, split="train")
    with pytest.raises(ConfigError, match="eval.split"):
        load_config(preset="smoke", overrides=["eval.split=train"])


def test_a_jsonl_task_has_no_validation_split_and_says_so(memo, tmp_path):
    engine, tok = memo
    with pytest.raises(TandemError, match="no validation split"):
        evaluate_task(engine, tok, _task(tmp_path, ["19", "20"], test_fraction=0.5), n=1, split="validation")
