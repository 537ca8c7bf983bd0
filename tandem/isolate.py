"""Native code that may crash, kept in a child process: a segfault there becomes a one-line error.

    child = Child(LlamaCppBackend, spec, file, what="llama.cpp", subject="q8_0 on this CPU",
                  hint="; try llamacpp:f16")
    child.call("encode", "text")            # runs in the child; its result comes back pickled
    child.close()
    run_isolated(probe, arg, what="...")   # one call in a throwaway child

An object is built by `factory(*args)` in a child process and used through `call(name, *args)`.
If the child dies (killed by a signal: a segfault in a C extension on this CPU), the call raises
ChildCrashed, a TandemError whose one line says what crashed, doing what, and what to try
instead; the parent lives on. An exception raised in the child is raised again in the parent
(as itself when it pickles, else as a RuntimeError naming it). Messages are pickled with plain
pickle, so tensors travel by value. The child is spawned, not forked (a fresh interpreter: it
inherits no threads or device runtime from the parent), so the factory and its arguments must
pickle (module-level names) and starting one costs an interpreter and its imports.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
from typing import Any, Callable

from tandem.errors import TandemError


class ChildCrashed(TandemError):
    """The child process died (a crash in native code), reported as one line; `signum` is the
    number of the signal that killed it (None when it exited or was already closed)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


def _portable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _serve(conn, factory: Callable, args: tuple) -> None:
    """The child: build the object, then answer calls until told to stop (None) or the pipe closes."""
    try:
        obj = factory(*args)
        conn.send_bytes(pickle.dumps(("ok", None)))
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(("error", _portable(exc))))
        return
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        if message is None:
            return
        name, call_args = message
        try:
            reply = ("ok", getattr(obj, name)(*call_args))
        except BaseException as exc:
            reply = ("error", _portable(exc))
        conn.send_bytes(pickle.dumps(reply))


class Child:
    """An object that lives in a child process (see the module docstring)."""

    def __init__(self, factory: Callable, *args, what: str, subject: str = "", hint: str = ""):
        self.what, self.subject, self.hint = what, subject, hint
        context = multiprocessing.get_context("spawn")
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=_serve, args=(theirs, factory, args), daemon=True)
        self.process.start()
        theirs.close()
        self._receive("loading")

    def call(self, name: str, *args) -> Any:
        """obj.name(*args) in the child."""
        if self.process is None:
            raise ChildCrashed(f"{self.what} is closed")
        try:
            self.conn.send_bytes(pickle.dumps((name, args)))
        except (BrokenPipeError, ConnectionResetError):
            self._crashed("running")
        return self._receive("running")

    def _receive(self, doing: str) -> Any:
        try:
            status, value = pickle.loads(self.conn.recv_bytes())
        except (EOFError, ConnectionResetError):
            self._crashed(doing)
        if status == "error":
            raise value
        return value

    def _crashed(self, doing: str) -> None:
        self.process.join(5)
        code = self.process.exitcode
        self.close()
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else "unknown"
            cause = f"crashed (signal {-code}, {name})"
        else:
            cause = f"exited unexpectedly (status {code})"
        subject = f" {self.subject}" if self.subject else ""
        raise ChildCrashed(f"{self.what} {cause} {doing}{subject}{self.hint}",
                           -code if code is not None and code < 0 else None)

    def close(self) -> None:
        """Stop the child (politely, then by force) and forget it."""
        process, self.process = getattr(self, "process", None), None
        if process is None:
            return
        try:
            self.conn.send_bytes(pickle.dumps(None))
        except OSError:
            pass
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
        self.conn.close()


def run_isolated(fn: Callable, *args, what: str, subject: str = "", hint: str = "") -> Any:
    """fn(*args) in a throwaway child; a crash raises ChildCrashed (doing: "running")."""
    child = Child(_Call, fn, what=what, subject=subject, hint=hint)
    try:
        return child.call("run", *args)
    finally:
        child.close()


class _Call:
    def __init__(self, fn: Callable):
        self.run = fn
