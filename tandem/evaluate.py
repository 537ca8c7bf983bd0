"""Evaluation on a task's held-out split: test (for claims, the default) or validation (for tuning).

    python -m tandem.cli eval --model runs/demo --task addition --json
    python -m tandem.cli eval --model runs/demo --task addition --split validation   # while tuning
    python -m tandem.cli eval --model runs/demo --task mine.jsonl --split all   # every row of the file

Greedy pass@1 accuracy, the format-compliance rate (`<think>` then `<answer>`), average completion
length in tokens, and (with pass_k > 0) sampled pass@k with the unbiased estimator of
Chen et al. 2021 ("Evaluating Large Language Models Trained on Code"), from n = pass_k samples
per problem (so pass@k here is "any of k samples is right").
"""

from __future__ import annotations

from tandem.errors import TandemError
from tandem.infer.engine import Engine, SamplingParams
from tandem.progress import Progress, keep_alive
from tandem.tasks import Example, JsonlTask, Task
from tandem.tokenizer import ChatTokenizer


def _generate_texts(engine: Engine, tokenizer: ChatTokenizer, examples, params, batch_size: int,
                    bar: Progress | None = None):
    outputs = []
    for start in range(0, len(examples), batch_size):
        keep_alive()  # the pipeline's eval watchdog (progress.py); the engine beats per decode step
        chunk = examples[start:start + batch_size]
        prompts = [tokenizer.encode_prompt([{"role": "user", "content": e.prompt}]) for e in chunk]
        for generation in engine.generate(prompts, params):
            tokens = [t for t in generation.token_ids if t != tokenizer.eos_id]
            outputs.append((tokenizer.decode(tokens), len(generation.token_ids)))
        if bar:
            bar.update(len(chunk))
    return outputs


def eval_examples(task: Task, n: int, split: str = "test") -> list[Example]:
    """What evaluate_task scores: the first n examples of the task's test or validation split, or
    with split "all" the first n rows of a .jsonl file, the rows it trains on included."""
    if split == "test":
        return task.test_set(n)
    if split == "validation":
        return task.validation_set(n)
    if split != "all":
        raise TandemError(f"unknown split '{split}'; use test, validation or all")
    if not isinstance(task, JsonlTask):
        raise TandemError(f"--split all scores every row of a .jsonl file; '{task.name}' is generated, "
                          f"so only its held-out split can be scored (--split test)")
    return task.rows[:max(0, n)]


def evaluate_task(engine: Engine, tokenizer: ChatTokenizer, task: Task, n: int = 200,
                  batch_size: int = 64, max_new_tokens: int = 128, pass_k: int = 0,
                  temperature: float = 0.8, seed: int = 0, keep_samples: int = 4,
                  progress: bool = False, split: str = "test") -> dict:
    """{"task", "split", "n", "accuracy", "format_rate", "avg_tokens", ["pass@k"], "samples"}."""
    examples = eval_examples(task, n, split)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=(tokenizer.eos_id,), logprobs=False)
    bar = Progress(len(examples), f"eval {task.name}", every=max(1, len(examples) // 4), enabled=progress)
    outputs = _generate_texts(engine, tokenizer, examples, greedy, batch_size, bar)
    bar.close()
    rewards = [task.reward(text, example) for (text, _), example in zip(outputs, examples)]
    result = {
        "task": task.name, "split": split, "n": len(examples),
        "accuracy": sum(r.correct for r in rewards) / len(examples),
        "format_rate": sum(r.format_ok for r in rewards) / len(examples),
        "avg_tokens": sum(length for _, length in outputs) / len(examples),
        "samples": [{"prompt": e.prompt, "reference": e.answer, "completion": text, "correct": r.correct}
                    for (text, _), e, r in list(zip(outputs, examples, rewards))[:keep_samples]],
    }
    if pass_k > 0:
        sampled = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                  stop_token_ids=(tokenizer.eos_id,), seed=seed + i, logprobs=False)
                   for i in range(pass_k)]
        hits = [0] * len(examples)
        for params in sampled:
            texts = _generate_texts(engine, tokenizer, examples, params, batch_size)
            for i, ((text, _), example) in enumerate(zip(texts, examples)):
                hits[i] += task.reward(text, example).correct
        result[f"pass@{pass_k}"] = sum(h > 0 for h in hits) / len(examples)
        result["sample_accuracy"] = sum(hits) / (len(examples) * pass_k)
    return result
