"""`tandem chat`: a terminal chat with a model, thinking shown dimmed (registered by tandem/cli/__init__.py).

    tandem chat --model runs/demo                  # each message answered on its own
    tandem chat --model path/to/Qwen2.5-0.5B-Instruct --multi-turn

Single-turn by default: tandem's tasks train single-turn models, and a conversation in the prompt
throws them off (asked "23*7" after two other questions, the demo model answers 623; alone, 161).
--multi-turn sends the whole conversation, dropping the oldest turns (with a note) when it no
longer leaves room for a reply in the model's context.

Keys: Enter sends (an empty line does nothing); Ctrl-C during a reply stops it between two decode
steps and the session goes on; Ctrl-C at the prompt clears the line; Ctrl-D or /exit leaves.
/reset forgets the conversation, /help lists the commands. Line editing and history come from
readline when stdin is a terminal. A mistake (a message too long for the context) prints one
`error:` line and the chat goes on.

`fit_new_tokens` is also how `tandem generate` sizes its reply.
"""

from __future__ import annotations

import re
import signal
import sys

from tandem.errors import TandemError

DEFAULT_NEW_TOKENS = 256
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")   # never sent to the terminal: a model can emit them
HELP = ("/help this list, /reset forget the conversation, /exit leave (or Ctrl-D); "
        "Ctrl-C stops a reply or clears the line")


def fit_new_tokens(requested: int | None, prompt_len: int, max_len: int, what: str = "the prompt") -> int:
    """Tokens the reply may take. --max-new-tokens when given (an error naming the most that fits
    when it does not), else DEFAULT_NEW_TOKENS cut to the room the prompt leaves in the context."""
    if requested is not None and requested < 1:
        raise TandemError(f"--max-new-tokens must be >= 1, got {requested}")
    room = max_len - prompt_len
    if room < 1:
        raise TandemError(f"{what} is {prompt_len} tokens but the model's context is {max_len}; shorten it")
    if requested is None:
        return min(DEFAULT_NEW_TOKENS, room)
    if requested > room:
        raise TandemError(f"--max-new-tokens {requested} does not fit: {what} takes {prompt_len} of the model's "
                          f"{max_len} tokens of context; lower --max-new-tokens to at most {room}")
    return requested


def _reply(engine, prompt: list[int], params, stop: list):
    """Generate one reply through add/step, checking `stop` between steps (finish_reason
    "cancelled" once something is in it), so a step is never cut in half."""
    rid = engine.add(prompt, params)
    while not stop:
        for out in engine.step():
            if out.finished:
                return out.generation
    return engine.cancel(rid)


class ChatSession:
    """The conversation and one turn of it; cmd_chat drives it from input()."""

    def __init__(self, engine, tokenizer, args):
        self.engine, self.tok, self.args = engine, tokenizer, args
        self.history: list[dict] = []
        self.dim, self.plain = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")

    def banner(self) -> str:
        if self.args.multi_turn:
            mode = (f"multi-turn: the conversation is kept (oldest turns dropped when it outgrows the "
                    f"{self.engine.max_len}-token context)")
        else:
            mode = ("single-turn: each message is answered on its own, as the model was trained "
                    "(--multi-turn keeps the conversation)")
        return f"tandem chat, {mode}\n{HELP}"

    def _prompt(self) -> tuple[list[int], str]:
        """(prompt, what it holds) for the last user message. In multi-turn mode the oldest turns
        are dropped until a reply of --max-new-tokens (default: half the context) fits after it;
        not when the message alone is too long (that is an error, and the conversation stays)."""
        max_len = self.engine.max_len
        want = self.args.max_new_tokens or min(DEFAULT_NEW_TOKENS, max_len // 2)
        kept = self.history
        prompt = self.tok.encode_prompt(kept)
        while len(prompt) + want > max_len and len(kept) > 1:
            kept = kept[2:]                  # without the oldest user message and its reply
            prompt = self.tok.encode_prompt(kept)
        dropped = (len(self.history) - len(kept)) // 2
        if dropped and len(prompt) < max_len:
            self.history = kept
            print(f"(dropped the {dropped} oldest turn{'s' if dropped > 1 else ''} to fit the "
                  f"{max_len}-token context)")
        return prompt, "the message" if len(kept) == 1 else "the conversation"

    def turn(self, line: str) -> None:
        """Answer one message (prints the reply, or an error line; the session goes on). Ctrl-C
        only raises a flag while the turn runs: the reply stops at the next decode step."""
        stop: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda *_: stop.append(1))
        try:
            self._turn(line, stop)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _turn(self, line: str, stop: list) -> None:
        from tandem.infer.engine import SamplingParams
        from tandem.reasoning import parse_reasoning
        if not self.args.multi_turn:
            self.history = []
        self.history.append({"role": "user", "content": line})
        try:
            prompt, what = self._prompt()
            max_new = fit_new_tokens(self.args.max_new_tokens, len(prompt), self.engine.max_len, what)
            params = SamplingParams(max_new_tokens=max_new, temperature=self.args.temperature,
                                    top_k=self.args.top_k, top_p=self.args.top_p, seed=self.args.seed,
                                    stop_token_ids=(self.tok.eos_id,), logprobs=False)
            generation = _reply(self.engine, prompt, params, stop)
        except TandemError as exc:
            self.history.pop()
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return
        text = _CONTROL.sub("\ufffd", self.tok.decode([t for t in generation.token_ids if t != self.tok.eos_id]))
        if generation.finish_reason == "cancelled":
            self.history.pop()               # an unfinished turn is not part of the conversation
            print(f"{self.dim}{text}{self.plain}\n(reply stopped)", flush=True)
            return
        parsed = parse_reasoning(text)
        if parsed.thinking:
            print(f"{self.dim}thinking: {parsed.thinking}{self.plain}")
        print(f"tandem> {parsed.answer if parsed.answer is not None else text}", flush=True)
        self.history.append({"role": "assistant", "content": text})


def cmd_chat(args) -> int:
    from tandem.infer.engine import Engine
    from tandem.loading import load_model
    loaded = load_model(args.model, args.device, args.dtype)
    session = ChatSession(Engine(loaded.model, max_batch=1), loaded.tokenizer, args)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    print(session.banner(), flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:                     # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:            # Ctrl-C at the prompt: drop the line, ask again
            print()
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/help":
            print(HELP)
        elif line == "/reset":
            session.history = []
            print("(conversation cleared)")
        elif line.startswith("/") and " " not in line:
            print(f"unknown command {line}; {HELP}")
        else:
            session.turn(line)
