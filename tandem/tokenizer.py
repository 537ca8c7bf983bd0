"""Byte-level BPE tokenizer (HF `tokenizers`), chat template and the assistant-token mask.

    tok = train_tokenizer(texts, vocab_size=512)      # BPE learned on the task corpus
    tok.save(folder)                                  # tokenizer.json + tokenizer_config.json
    tok = ChatTokenizer.load(folder)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids, mask = tok.encode_chat(messages)             # mask = 1 on assistant tokens (SFT loss)

The chat format is ChatML (as Qwen2 uses), so the same Jinja template ships in
tokenizer_config.json and `transformers.AutoTokenizer.apply_chat_template` renders exactly our
prompts:

    <|im_start|>user
    What is 12 + 7?<|im_end|>
    <|im_start|>assistant
    <think>
    ...
    </think>
    <answer>19</answer><|im_end|>

Digits are split one per token before BPE: arithmetic is learnable only when the model sees each
digit (a simplification that costs a little sequence length on other numbers). The reasoning
tags are ordinary added tokens (not "special"), so every runtime (transformers, llama.cpp) prints
them and the reasoning can be parsed back out; the turn markers are special.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tandem.errors import ModelError
from tandem.reasoning import REASONING_TAGS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # torch and tokenizers share 2 cores

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ROLES = ("system", "user", "assistant")


def train_tokenizer(texts: list[str], vocab_size: int) -> "ChatTokenizer":
    """Learn a byte-level BPE on `texts` (deterministic for the same texts and size)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in REASONING_TAGS])
    return ChatTokenizer(tokenizer)


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the chat template and the ids tandem needs."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = self._id(PAD)
        self.im_start_id = self._id(IM_START)
        self.eos_id = self._id(IM_END)  # end of an assistant turn = end of generation

    def _id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelError(f"tokenizer lacks the token {token}; it was not made by tandem "
                             "or for a ChatML model")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        """Text of `ids`; turn markers dropped, reasoning tags kept."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Same output as the Jinja CHAT_TEMPLATE rendered by transformers."""
        text = ""
        for message in messages:
            text += f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n"
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation up to and including the assistant header."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True))

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Ids of a whole conversation and a mask that is 1 on every assistant token.

        Each assistant turn is trained on its content and its closing <|im_end|> (so the model
        learns to stop); headers, user and system turns are masked out.
        """
        ids, mask = [], []
        for message in messages:
            if message["role"] == "assistant":
                header = self.encode(f"{IM_START}assistant\n")
                body = self.encode(message["content"]) + [self.eos_id]
                ids += header + body
                mask += [0] * len(header) + [1] * len(body)
                trailer = self.encode("\n")
                ids += trailer
                mask += [0] * len(trailer)
            else:
                piece = self.encode(self.apply_chat_template([message]))
                ids += piece
                mask += [0] * len(piece)
        return ids, mask

    def save(self, folder: str | Path) -> None:
        """tokenizer.json plus an HF tokenizer_config.json carrying the chat template."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "ChatTokenizer":
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ModelError(f"no tokenizer.json in {folder}; is it a tandem run or an HF model folder?")
        return cls(Tokenizer.from_file(str(path)))


def hf_tokenizer_config() -> dict:
    """tokenizer_config.json for transformers: fast tokenizer, ChatML template, eos = <|im_end|>."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": IM_END,
        "pad_token": PAD,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
