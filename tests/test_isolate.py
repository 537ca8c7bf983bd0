"""tandem/isolate.py: a real crash (SIGSEGV from native code) in a real child process becomes a
one-line ChildCrashed while the test process lives on."""

import ctypes
import os
import signal

import pytest
import torch

from tandem.errors import TandemError
from tandem.isolate import Child, ChildCrashed, run_isolated


class Fragile:
    """Stands in for a native library: it works, raises, or dereferences NULL on request."""

    def __init__(self, crash_on_load: bool = False):
        if crash_on_load:
            ctypes.string_at(0)            # a real segfault, in C

    def double(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    def fail(self):
        raise ValueError("bad value in the child")

    def segfault(self):
        ctypes.string_at(0)

    def kill_self(self):
        os.kill(os.getpid(), signal.SIGSEGV)


def test_calls_round_trip_and_exceptions_come_back_as_themselves():
    child = Child(Fragile, what="fragile")
    try:
        assert torch.equal(child.call("double", torch.arange(4.0)), torch.arange(4.0) * 2)
        with pytest.raises(ValueError, match="bad value in the child"):
            child.call("fail")
        assert child.call("double", torch.ones(1)).item() == 2   # still serving after an exception
    finally:
        child.close()


@pytest.mark.parametrize("method", ["segfault", "kill_self"])
def test_a_segfault_while_running_is_one_line_and_the_parent_lives(method):
    child = Child(Fragile, what="llama.cpp", subject="q8_0 on this CPU", hint="; try llamacpp:f16")
    with pytest.raises(ChildCrashed) as err:
        child.call(method)
    message = str(err.value)
    assert message == "llama.cpp crashed (signal 11, SIGSEGV) running q8_0 on this CPU; try llamacpp:f16"
    assert isinstance(err.value, TandemError)                  # so the CLI prints it and exits 2
    with pytest.raises(ChildCrashed, match="closed"):
        child.call("double", torch.ones(1))


def test_a_segfault_while_loading_and_in_a_one_shot_call():
    with pytest.raises(ChildCrashed, match=r"^fragile crashed \(signal 11, SIGSEGV\) loading$"):
        Child(Fragile, True, what="fragile")
    with pytest.raises(ChildCrashed, match=r"^probe crashed \(signal 11, SIGSEGV\) running$"):
        run_isolated(ctypes.string_at, 0, what="probe")
    assert run_isolated(pow, 2, 10, what="probe") == 1024
