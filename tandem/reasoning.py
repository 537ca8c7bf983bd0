"""The R1-style reasoning format: `<think>…</think>` then `<answer>…</answer>`.

An assistant turn is exactly:

    <think>
    step 1
    step 2
    </think>
    <answer>42</answer>

`format_reasoning` writes it (for SFT targets), `parse_reasoning` reads a model's completion back
and says whether it followed the format (the format reward of DeepSeek-R1).
"""

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
REASONING_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

_STRICT = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


def format_reasoning(thinking: str, answer: str) -> str:
    """The assistant text for a worked solution."""
    return f"{THINK_OPEN}\n{thinking.strip()}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer.strip()}{ANSWER_CLOSE}"


@dataclass
class ParsedReasoning:
    thinking: str       # text inside <think> ("" if absent)
    answer: str | None  # text inside the first <answer> (None if absent)
    format_ok: bool     # exactly one think block followed by one answer block, nothing else


def parse_reasoning(text: str) -> ParsedReasoning:
    """Split a completion into thinking and answer, and check the strict format."""
    strict = _STRICT.match(text)
    if strict and all(text.count(tag) == 1 for tag in REASONING_TAGS):
        return ParsedReasoning(strict.group(1).strip(), strict.group(2).strip(), True)
    answer = _ANSWER.search(text)
    think = _THINK.search(text)
    return ParsedReasoning(think.group(1).strip() if think else "",
                           answer.group(1).strip() if answer else None, False)
