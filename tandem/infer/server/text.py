"""Generated tokens to text: incremental detokenization, stop strings, thinking vs answer, and
the token strings and bytes that logprobs show."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from tandem.reasoning import REASONING_TAGS, THINK_CLOSE, THINK_OPEN


class TextStream:
    """One choice's decoded text, released piece by piece as tokens arrive.

    Incremental detokenization is `tokenizers`' DecodeStream (the prefix-window scheme vLLM uses,
    in Rust): text comes out only as whole characters, so a character split over several
    byte-level tokens is released once, whole; an incomplete character at the very end of a
    generation is dropped. Text that could be the start of a stop string is held back until it is
    ruled out; when a stop string appears, the text is cut before it and `stopped` is set.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer.tokenizer, stops
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.held = ""                    # decoded, not released: it could start a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The text this token releases. Work per token is bounded by the longest stop string:
        a stop string can only begin inside the held text, so only that is searched."""
        if self.stopped:
            return ""
        piece = self.decoder.step(self.tok, token_id) or ""
        if not self.stops:
            return piece
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return text[:min(hits)]
        keep = len(text) - _held(text, self.stops)
        self.held = text[keep:]
        return text[:keep]

    def flush(self) -> str:
        """The held-back rest, at the end of the generation."""
        out, self.held = self.held, ""
        return out


def _held(text: str, words) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `words`."""
    best = 0
    for word in words:
        i = text.find(word[0], max(0, len(text) - len(word) + 1))
        while i >= 0 and len(text) - i > best:
            if word.startswith(text[i:]):
                best = len(text) - i
                break
            i = text.find(word[0], i + 1)
    return best


class ReasoningSplitter:
    """Routes streamed text: inside <think>…</think> to reasoning, the rest to content.

    Tags are dropped and each segment between tags is trimmed at both ends (a trailing blank is
    held until more text shows it is interior), so pushing text in any pieces gives the same
    result as pushing it whole.
    """

    def __init__(self):
        self.buf = ""              # text not routed yet: a possible partial tag, trailing blanks
        self.thinking = False
        self.fresh = True          # at the start of a segment: drop leading blanks

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, content) released by this text."""
        out = {True: "", False: ""}
        self.buf += text
        while "<" in self.buf:                                   # every tag starts with "<"
            found = [(i, tag) for tag in REASONING_TAGS if (i := self.buf.find(tag)) >= 0]
            if not found:
                break
            i, tag = min(found)
            out[self.thinking] += self._segment(self.buf[:i], end=True)
            self.thinking = tag == THINK_OPEN if tag in (THINK_OPEN, THINK_CLOSE) else False
            self.buf, self.fresh = self.buf[i + len(tag):], True
        if final:
            out[self.thinking] += self._segment(self.buf, end=True)
            self.buf = ""
        else:
            keep = len(self.buf) - (_held(self.buf, REASONING_TAGS) if "<" in self.buf else 0)
            body = self.buf[:keep]
            ready = len(body.rstrip())
            out[self.thinking] += self._segment(body[:ready], end=False)
            self.buf = self.buf[ready:]
        return out[True], out[False]

    def _segment(self, text: str, end: bool) -> str:
        if self.fresh:
            text = text.lstrip()
            self.fresh = not text
        return text.rstrip() if end else text


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning_content, content) of a whole completion, as the stream would give them."""
    return ReasoningSplitter().push(text, final=True)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


class TokenInfo:
    """Token id -> (display string, bytes) for logprobs, cached. A token that is only part of a
    UTF-8 character is displayed as "bytes:\\xe6\\x97" (as OpenAI does); `bytes` is always exact."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            piece = self.tok.tokenizer.id_to_token(token_id) or ""
            if piece and all(c in BYTE_DECODER for c in piece):       # byte-level BPE (tandem, Qwen2)
                raw = bytes(BYTE_DECODER[c] for c in piece)
            else:
                raw = self.tok.decode([token_id], skip_special=False).encode()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:        # part of a character: OpenAI's "bytes:\\x.." spelling
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self.cache[token_id] = (text, list(raw))
        return self.cache[token_id]

