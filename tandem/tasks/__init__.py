"""Tasks: where training examples, test splits and rewards come from.

    task = get_task("addition", seed=0, max_digits=4)
    ex = task.example(0)            # Example(prompt, answer, thinking, meta)
    ex.messages()                   # [{"role": "user", ...}, {"role": "assistant", ...}]
    task.reward(completion, ex)     # RewardResult(correct, format_ok, reward)
    task.test_set(200)              # fixed held-out examples (independent of the seed)

A name ending in ".jsonl" loads the user's own data (see tandem/tasks/jsonl.py).
"""

from __future__ import annotations

from tandem.errors import ConfigError
from tandem.tasks.arithmetic import AdditionTask, MultiplicationTask
from tandem.tasks.base import Example, RewardResult, Task, stable_seed
from tandem.tasks.countdown import CountdownTask
from tandem.tasks.jsonl import JsonlTask

TASKS: dict[str, type[Task]] = {
    "addition": AdditionTask,
    "countdown": CountdownTask,
    "multiplication": MultiplicationTask,
}


def get_task(name: str, seed: int = 0, **params) -> Task:
    """The task called `name` (or a JsonlTask when `name` is a path ending in .jsonl)."""
    if isinstance(name, str) and name.endswith(".jsonl"):
        return JsonlTask(name, seed=seed, **params)
    if not isinstance(name, str) or name not in TASKS:
        known = ", ".join(sorted(TASKS))
        raise ConfigError(f"unknown task {name!r}; known tasks: {known} "
                          f"(or a path to a .jsonl file)")
    return TASKS[name](seed=seed, **params)


__all__ = ["TASKS", "get_task", "Task", "Example", "RewardResult", "AdditionTask",
           "MultiplicationTask", "CountdownTask", "JsonlTask", "stable_seed"]
