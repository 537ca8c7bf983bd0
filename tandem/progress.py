"""Progress for long work: a tqdm bar on a terminal, plain log lines when not a TTY (CI, logs).

The count is the position in the work, never more than the total: a trainer that rolls back
rewinds it, and the steps thrown away are shown separately (`redone=K`).

keep_alive(): long work calls it as it goes (every Progress update does, and Engine.generate at
each decode step); it calls whatever `keeping_alive` installed, which is how the pipeline's eval
and export stages beat the supervisor's heartbeat (resilience/incidents.py: Heartbeat.working).
It must be called from the thread doing the work: a hang there must stop the calls.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable

_alive: list[Callable[[], None]] = []  # installed by keeping_alive, innermost last


def keep_alive() -> None:
    """Long work is still progressing (a no-op unless a stage is `keeping_alive`)."""
    if _alive:
        _alive[-1]()


@contextmanager
def keeping_alive(callback: Callable[[], None]):
    """keep_alive() calls `callback` while the block runs."""
    _alive.append(callback)
    try:
        yield
    finally:
        _alive.remove(callback)


class Progress:
    def __init__(self, total: int, desc: str, start: int = 0, every: int = 10, enabled: bool = True):
        self.total, self.desc, self.every, self.n = total, desc, max(1, every), start
        self.enabled = enabled
        self.redone = 0  # steps rewound (done again after a rollback)
        self.bar = None
        self.started = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, leave=True)

    def rewind(self, to: int) -> None:
        """Back to position `to` (a rollback): those steps will be done again."""
        self.redone += max(0, self.n - to)
        self.n = to
        if self.bar is not None:
            self.bar.n = to
            self.bar.refresh()

    def update(self, n: int = 1, **postfix) -> None:
        keep_alive()
        self.n += n
        if self.redone:
            postfix["redone"] = self.redone
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            fields = " ".join(f"{k}={_short(v)}" for k, v in postfix.items())
            elapsed = time.perf_counter() - self.started
            print(f"[{self.desc}] {self.n}/{self.total} {fields} ({elapsed:.0f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
