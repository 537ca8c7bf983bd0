"""`tandem chat` driven through a real pseudo-terminal, as a person at a keyboard drives it.

The child gets the pty as its controlling terminal, so Ctrl-C (byte 0x03) reaches it as SIGINT
through the terminal's line discipline, Ctrl-D (0x04) as end of input, and arrow keys as escape
sequences that readline must turn into cursor moves. The models are untrained (built here) with
the end-of-turn token's output row zeroed, so a reply never stops early: it runs to its length
limit, which makes "stop a reply in the middle" and "the conversation outgrows the context"
happen every time.
"""

import fcntl
import json
import os
import re
import select
import subprocess
import sys
import termios
import time

import pytest
import torch

from conftest import ROOT
from tandem.model import ModelConfig, Transformer
from tandem.tokenizer import train_tokenizer
from tandem.train.checkpoint import save_checkpoint

PROMPT = b"you> "


def _save_model(root, context: int) -> str:
    """An untrained model that never ends its turn, saved as a committed tandem checkpoint."""
    tok = train_tokenizer([f"What is {a} + {b}? <think>{a}+{b}</think><answer>{a + b}</answer>"
                           for a in range(20) for b in range(10)], vocab_size=300)
    config = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         tie_word_embeddings=False)
    model = Transformer(config)
    model.reset_parameters(seed=0)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] = 0   # its logit is 0: below the largest of the others
    tok.save(root / "tokenizer")
    files = {name: root / "tokenizer" / name for name in ("tokenizer.json", "tokenizer_config.json")}
    files["model_config.json"] = json.dumps(config.to_dict()).encode()
    return str(save_checkpoint(root / "checkpoints", 1, model.checkpoint_state(), {"phase": "sft"},
                               extra_files=files))


class Terminal:
    """`tandem chat ARGS` on a new pty; send() types, expect() waits for output."""

    def __init__(self, *args):
        self.master, slave = os.openpty()

        def take_terminal():                  # a new session whose controlling terminal is the pty
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "chat", *args], stdin=slave,
                                     stdout=slave, stderr=slave, cwd=ROOT, env=env, preexec_fn=take_terminal)
        os.close(slave)
        self.seen = b""                        # what the chat printed that no expect() consumed yet
        self.transcript = b""                  # everything it printed (shown when an expect fails)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, needle: bytes, timeout: float = 120) -> bytes:
        """Read until `needle` appears after what earlier expects consumed; returns the text up to it."""
        deadline = time.time() + timeout
        while needle not in self.seen:
            left = deadline - time.time()
            assert left > 0 and self.proc.poll() is None, \
                f"no {needle!r} after {timeout} s (exit {self.proc.poll()}) in:\n{self.transcript[-4000:]!r}"
            if select.select([self.master], [], [], min(left, 1))[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:                # the child closed the pty
                    continue
                self.seen += data
                self.transcript += data
        before, _, self.seen = self.seen.partition(needle)
        return before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal():
    opened = []

    def start(*args):
        opened.append(Terminal(*args))
        return opened[-1]
    yield start
    for t in opened:
        t.close()


def _cancel_line(chat: Terminal, text: bytes) -> None:
    """Type `text`, then Ctrl-C: the line is dropped and the prompt comes back. Ctrl-C comes a
    moment after the echo, as from a person: CPython's readline loses a SIGINT that lands while it
    is not waiting for a key (between drawing one and waiting for the next), until the next key."""
    chat.send(text)
    chat.expect(text)
    time.sleep(0.5)
    chat.send(b"\x03")
    chat.expect(PROMPT)


def test_chat_keeps_going_through_errors_resets_and_trims_the_conversation(tmp_path, terminal):
    model = _save_model(tmp_path, context=128)
    chat = terminal("--model", model, "--multi-turn")
    assert b"multi-turn" in chat.expect(PROMPT, timeout=300)

    chat.send(b"What is 4 + 5?\r")
    assert b"tandem>" in chat.expect(PROMPT)
    chat.send(b"What is 6 + 2?\r")                     # turn 1 + its reply no longer leave room
    assert b"dropped the 1 oldest turn" in chat.expect(PROMPT)

    chat.send(b"What is 12 + 3? " * 40 + b"\r")        # longer than the whole context
    reply = chat.expect(PROMPT)
    assert re.search(rb"error: the message is \d+ tokens but the model's context is 128", reply), reply
    chat.send(b"\r")                                   # an empty line does nothing
    assert chat.expect(PROMPT).strip() == b""

    chat.send(b"/reset\r")
    assert b"conversation cleared" in chat.expect(PROMPT)
    chat.send(b"What is 7 + 1?\r")
    reply = chat.expect(PROMPT)
    assert b"tandem>" in reply and b"dropped" not in reply

    chat.send(b"/hep\x1b[Dl\r")                        # readline: Left arrow, then insert: /help
    assert b"/reset forget the conversation" in chat.expect(PROMPT)
    _cancel_line(chat, b"half a message")

    chat.send(b"/exit\r")
    assert chat.proc.wait(60) == 0


def test_ctrl_c_stops_a_reply_and_ctrl_d_leaves(tmp_path, terminal):
    model = _save_model(tmp_path, context=16384)
    chat = terminal("--model", model, "--max-new-tokens", "16000")
    assert b"single-turn" in chat.expect(PROMPT, timeout=300)
    chat.send(b"What is 4 + 5?\r")
    chat.expect(b"\n")                                 # the message was read; the reply is being generated
    time.sleep(1.0)
    chat.send(b"\x03")
    assert b"(reply stopped)" in chat.expect(PROMPT, timeout=60)
    _cancel_line(chat, b"What is 1 + 1?")              # the session is still there
    chat.send(b"\x04")                                 # Ctrl-D at an empty prompt
    assert chat.proc.wait(60) == 0
