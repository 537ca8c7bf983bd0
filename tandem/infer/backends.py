"""Inference backends: one interface over tandem's engine, transformers and llama.cpp.

    with open_backend("torch:cpu:bf16", "runs/demo") as backend:
        outs = backend.generate(["<|im_start|>user\\nWhat is 2 + 3?<|im_end|>\\n<|im_start|>assistant\\n"],
                                SamplingParams(max_new_tokens=64, stop_token_ids=(backend.eos_id,)))
        outs[0].text, outs[0].token_ids, outs[0].logprobs, outs[0].finish_reason
        backend.score(prompt_ids, completion_ids)                # log p of each completion token
        backend.next_token_logprobs(prompt_ids, completion_ids)  # full [len, vocab] log-softmax rows

Backend specs (`parse_backend`):

    torch[:DEVICE[:DTYPE]]   tandem's Engine (KV cache, continuous batching) on any device accel.py
                             knows: torch:cpu:fp32 (default), torch:cpu:bf16, torch:auto:bf16, ...
    hf[:DEVICE[:DTYPE]]      transformers' AutoModelForCausalLM on an HF folder; a tandem run is
                             exported to a temporary HF folder first (pip install 'tandem[hf]')
    llamacpp[:f32|f16|q8_0]  llama-cpp-python on a .gguf file (pip install 'tandem[llamacpp]'); a run
                             or HF folder is exported to a temporary GGUF of that type first. It
                             runs in a child process: a crash of llama.cpp on this CPU is a
                             one-line error ("llama.cpp crashed (signal 11, SIGSEGV) ...; try ...")

Every backend tokenizes text prompts with ITS OWN tokenizer (transformers' from tokenizer.json,
llama.cpp's from the GGUF), because that is part of what differs between runtimes; token ids are
shared (exports keep the vocabulary), so one backend can score another's tokens. logprobs are
always log-softmax of the raw logits (temperature 1), as in the engine.

`next_token_logprobs(prompt_ids, completion_ids)` returns, per sequence, a float32 [len(completion),
vocab] tensor whose row t is the distribution that predicted completion token t; with top_k > 0, a
(values, indices) pair of its k largest entries instead. The parity gate compares these rows.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from tandem.errors import TandemError
from tandem.infer.engine import SamplingParams
from tandem.progress import keep_alive

KINDS = ("torch", "hf", "llamacpp")
DTYPES = ("fp32", "bf16", "fp16")
GGUF_TYPES = ("f32", "f16", "q8_0")
GGUF_FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0"}   # GGUF general.file_type (llama.cpp's LLAMA_FTYPE_*)
# backend -> (import name, distribution name, pip extra)
PACKAGES = {"hf": ("transformers", "transformers", "hf"),
            "llamacpp": ("llama_cpp", "llama_cpp_python", "llamacpp")}
SPEC_HELP = ("torch[:DEVICE[:DTYPE]] (e.g. torch:cpu:bf16), hf[:DEVICE[:DTYPE]] (e.g. hf:cpu:fp32) "
             "or llamacpp[:f32|f16|q8_0]")


class BackendError(TandemError):
    """A backend spec is malformed, or a backend cannot run the given model."""


class BackendMissing(BackendError):
    """The package a backend needs is not installed (the message names the pip extra)."""


@dataclass(frozen=True)
class BackendSpec:
    kind: str                 # torch | hf | llamacpp
    device: str = "cpu"       # torch/hf: any device spec accel.py resolves (cpu, auto, ...)
    dtype: str = "fp32"       # torch/hf: compute dtype
    gguf_type: str = "f16"    # llamacpp: the GGUF type a non-GGUF model is exported to first

    def __str__(self) -> str:
        if self.kind == "llamacpp":
            return f"llamacpp:{self.gguf_type}"
        return f"{self.kind}:{self.device}:{self.dtype}"

    @property
    def precision(self) -> str:
        """Numeric class for default parity thresholds: fp32 | fp16 | bf16 | q8_0."""
        if self.kind == "llamacpp":
            return {"f32": "fp32", "f16": "fp16", "q8_0": "q8_0"}[self.gguf_type]
        return self.dtype


def parse_backend(text: str | BackendSpec) -> BackendSpec:
    """'torch:cpu:bf16' -> BackendSpec; BackendError (one line, with the grammar) when malformed."""
    if isinstance(text, BackendSpec):
        return text
    parts = [p.strip().lower() for p in str(text or "").split(":")]
    kind = parts[0]
    if kind not in KINDS:
        raise BackendError(f"unknown backend '{text}'; use {SPEC_HELP}")
    if kind == "llamacpp":
        if len(parts) > 2 or (len(parts) == 2 and parts[1] not in GGUF_TYPES):
            raise BackendError(f"bad backend '{text}': llamacpp takes an optional GGUF type, one of "
                               f"{', '.join(GGUF_TYPES)} (e.g. llamacpp:q8_0)")
        return BackendSpec("llamacpp", gguf_type=parts[1] if len(parts) == 2 else "f16")
    if len(parts) > 3 or any(not p for p in parts[1:]):
        raise BackendError(f"bad backend '{text}'; use {SPEC_HELP}")
    device = parts[1] if len(parts) > 1 else "cpu"
    dtype = parts[2] if len(parts) > 2 else "fp32"
    if dtype not in DTYPES:
        raise BackendError(f"bad backend '{text}': unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return BackendSpec(kind, device, dtype)


def check_installed(spec: BackendSpec) -> None:
    """BackendMissing naming the pip extra when the backend's package is absent."""
    if spec.kind in PACKAGES:
        module, dist, extra = PACKAGES[spec.kind]
        if importlib.util.find_spec(module) is None:
            raise BackendMissing(f"backend '{spec.kind}' needs the {dist} package: pip install 'tandem[{extra}]'")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class Completion:
    """One generated completion. token_ids include the stop token when finish_reason == "stop"."""
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str                 # "stop" | "length"
    text: str = ""                     # the completion decoded by the backend (turn markers dropped)
    top_logprobs: list = field(default_factory=list)


def chat_prompt_text(messages: list[dict]) -> str:
    """tandem's ChatML prompt text (same as ChatTokenizer.apply_chat_template, generation prompt on)."""
    from tandem.tokenizer import IM_END, IM_START
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + f"{IM_START}assistant\n"


def _log_softmax_rows(logits: torch.Tensor, top_k: int):
    rows = logits.float().log_softmax(-1)
    if top_k:
        values, indices = rows.topk(min(top_k, rows.shape[-1]), dim=-1)
        return values, indices
    return rows


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from a [vocab] logits row: greedy at temperature 0, else temperature/top-k/top-p."""
    if params.temperature == 0:
        return int(logits.argmax())
    x = logits.float() / params.temperature
    if params.top_k:
        kth = x.topk(min(params.top_k, x.numel())).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def routed_experts(model: torch.nn.Module, forward: Callable[[], object]) -> torch.Tensor | None:
    """Run `forward()` and return the experts each MoE router of `model` chose per token, [tokens,
    MoE layers, top-k] with the ids sorted per token; None for a model without routers. A router is
    a module named `*.mlp.gate` that returns a tuple holding an integer tensor of expert ids:
    tandem's DeepSeek-V3 Router and transformers' DeepseekV3TopkRouter alike."""
    chosen: list[torch.Tensor] = []

    def keep_ids(_module, _inputs, output):
        ids = [t for t in output if isinstance(t, torch.Tensor) and not t.is_floating_point()] \
            if isinstance(output, tuple) else []
        if ids:
            chosen.append(ids[0].reshape(-1, ids[0].shape[-1]).sort(-1).values.cpu())

    handles = [module.register_forward_hook(keep_ids) for name, module in model.named_modules()
               if name.endswith("mlp.gate")]
    if not handles:
        return None
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(chosen, 1) if chosen else None


class Backend:
    """The common interface. Subclasses implement _generate_ids and _logits."""

    spec: BackendSpec
    eos_id: int
    vocab_size: int
    max_len: int          # context length: prompt + completion tokens at most

    def __init__(self):
        self._tmp: Path | None = None

    # --- tokenization -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of already chat-formatted text (turn markers parsed as special tokens)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of ids, turn markers dropped, reasoning tags kept."""
        raise NotImplementedError

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation up to the assistant header, in tandem's ChatML format."""
        return self.encode(chat_prompt_text(messages))

    # --- generation and scoring ---------------------------------------------------------------

    def generate(self, prompts: list, params: SamplingParams | None = None) -> list[Completion]:
        """Complete each prompt (chat-formatted text or token ids); results in input order."""
        params = params or SamplingParams()
        ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        outs = self._generate_ids(ids, params)
        for out in outs:
            out.text = self.decode([t for t in out.token_ids if t not in params.stop_token_ids])
        return outs

    def next_token_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], top_k: int = 0):
        """Per sequence: [len(completion), vocab] log-softmax rows (or top-k (values, indices))."""
        out = []
        for prompt, completion in zip(prompt_ids, completion_ids):
            keep_alive()  # per sequence: the export gate's watchdog (progress.py)
            if not prompt:
                raise BackendError("a prompt must hold at least one token")
            seq = list(prompt) + list(completion)
            if not completion:
                out.append(_log_softmax_rows(torch.zeros(0, self.vocab_size), top_k))
                continue
            logits = self._logits(seq)[len(prompt) - 1:len(seq) - 1]
            out.append(_log_softmax_rows(logits, top_k))
        return out

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence: float32 log p(completion token t | everything before it)."""
        rows = self.next_token_logprobs(prompt_ids, completion_ids)
        return [r.gather(1, torch.tensor(c, dtype=torch.long).view(-1, 1)).view(-1) if len(c) else torch.zeros(0)
                for r, c in zip(rows, completion_ids)]

    def routing(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[torch.Tensor] | None:
        """Per sequence: the experts every MoE layer chose for the tokens whose rows
        next_token_logprobs returns, [len(completion), MoE layers, top-k] (ids sorted per token);
        None when the model has no routers or this backend cannot show them (llama.cpp)."""
        module = self._module()
        if module is None:
            return None
        out = []
        for prompt, completion in zip(prompt_ids, completion_ids):
            keep_alive()
            seq = list(prompt) + list(completion)
            chosen = routed_experts(module, lambda: self._logits(seq))
            if chosen is None:
                return None
            out.append(chosen[len(prompt) - 1:len(seq) - 1])
        return out

    def _module(self) -> torch.nn.Module | None:
        """The torch model _logits runs, where there is one (routing() hooks its routers)."""
        return None

    def _generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        raise NotImplementedError

    def _logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] logits of a full (uncached) forward over ids."""
        raise NotImplementedError

    def _gguf_file(self, model_path) -> Path:
        """The GGUF file to run: `model_path` itself if it is one (or an export holding one), else
        a temporary GGUF export of it (removed by close())."""
        from tandem.export.gguf import find_gguf, is_gguf
        path = Path(model_path)
        if not path.exists():
            raise BackendError(f"model path not found: {path}")
        file = find_gguf(path) if is_gguf(path) else None
        if file is None:
            self._tmp, file = _export_temp(path, "gguf", self.spec.gguf_type)
        return file

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def describe(self) -> str:
        return str(self.spec)


# -----------------------------------------------------------------------------------------------
# torch: tandem's own engine


class TorchBackend(Backend):
    def __init__(self, spec: BackendSpec, model_path, max_batch: int = 32, seed: int = 0):
        super().__init__()
        from tandem.infer.engine import Engine
        from tandem.loading import load_model
        self.spec = spec
        loaded = load_model(model_path, spec.device, spec.dtype)
        self.model, self.tokenizer, self.info = loaded.model, loaded.tokenizer, loaded.info
        self.engine = Engine(self.model, max_batch=max_batch, seed=seed)
        self.eos_id, self.vocab_size = self.tokenizer.eos_id, self.model.config.vocab_size
        self.max_len = self.engine.max_len
        self.device = self.model.lm_head.weight.device

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.tokenizer.decode(ids)

    def _generate_ids(self, prompts, params):
        gens = self.engine.generate(prompts, params)
        return [Completion(list(g.prompt_ids), list(g.token_ids), list(g.logprobs), g.finish_reason,
                           top_logprobs=list(g.top_logprobs)) for g in gens]

    def _logits(self, ids):
        with torch.inference_mode():
            return self.model(torch.tensor([ids], device=self.device))[0].float().cpu()

    def _module(self):
        return self.model

    def score(self, prompt_ids, completion_ids):
        return self.engine.score([list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)],
                                 [len(p) for p in prompt_ids])


# -----------------------------------------------------------------------------------------------
# hf: transformers on an HF folder


def _export_temp(model_path, fmt: str, gguf_type: str = "f16") -> tuple[Path, Path]:
    """Export a tandem model to a fresh temp folder; returns (temp folder, model path in it)."""
    from tandem.loading import load_weights
    config, weights, tokenizer, _ = load_weights(model_path)
    tmp = Path(tempfile.mkdtemp(prefix=f"tandem-{fmt}-"))
    try:
        if fmt == "hf":
            from tandem.export.hf import write_hf
            write_hf(config, weights, tokenizer, tmp)
            return tmp, tmp
        from tandem.export.gguf import GGUF_FILE, write_gguf
        write_gguf(config, weights, tokenizer, tmp / GGUF_FILE, out_type=gguf_type)
        return tmp, tmp / GGUF_FILE
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_plain_hf(path: Path) -> bool:
    from tandem.loading import find_checkpoint, is_hf_folder
    return path.is_dir() and is_hf_folder(path) and find_checkpoint(path) is None


class HFBackend(Backend):
    def __init__(self, spec: BackendSpec, model_path, seed: int = 0):
        super().__init__()
        check_installed(spec)
        import transformers
        from tandem import accel
        from tandem.tokenizer import ChatTokenizer
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.spec, self.seed = spec, seed
        device = accel.resolve_device(spec.device)
        dtype = accel.resolve_dtype(spec.dtype, device)
        path = Path(model_path)
        if not path.exists():
            raise BackendError(f"model path not found: {path}")
        if _is_plain_hf(path):
            folder = path
        else:
            self._tmp, folder = _export_temp(path, "hf")
        self.folder = folder
        self.tokenizer = ChatTokenizer.load(folder)
        self.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), **{dtype_kw: dtype})
        self.model = self.model.to(device).eval()
        # transformers renamed past_key_values -> cache (5.x); use whichever this version takes
        import inspect
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.device = device
        self.eos_id = self.tokenizer.eos_id
        self.vocab_size = self.model.config.vocab_size
        self.max_len = self.model.config.max_position_embeddings

    def encode(self, text):
        return list(self.hf_tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids):
        return self.hf_tokenizer.decode(list(ids), skip_special_tokens=True)

    def _generate_ids(self, prompts, params):
        """One prompt at a time (no padding), through the model's own KV cache (past_key_values):
        the same forward transformers' generate() runs, without its per-step machinery."""
        outs = []
        stops = set(params.stop_token_ids)
        for i, prompt in enumerate(prompts):
            keep_alive()
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else self.seed + i)
            tokens, lps, reason = [], [], "length"
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True)
                for _ in range(params.max_new_tokens):
                    logits = out.logits[0, -1].float().cpu()
                    token = sample_token(logits, params, generator)
                    tokens.append(token)
                    lps.append(float(logits.log_softmax(-1)[token]))
                    if token in stops:
                        reason = "stop"
                        break
                    past = getattr(out, self._cache_kw)
                    out = self.model(input_ids=torch.tensor([[token]], device=self.device), use_cache=True,
                                     **{self._cache_kw: past})
            outs.append(Completion(list(prompt), tokens, lps if params.logprobs else [], reason))
        return outs

    def _logits(self, ids):
        with torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float().cpu()

    def _module(self):
        return self.model


# -----------------------------------------------------------------------------------------------
# llamacpp: llama-cpp-python on a GGUF


class LlamaCppBackend(Backend):
    """llama.cpp through llama-cpp-python. Greedy decoding and scoring go through `Llama.eval`
    with logits for every position (logits_all), so this backend reads the same quantities as the
    others; sampling uses `sample_token` on llama.cpp's logits."""

    def __init__(self, spec: BackendSpec, model_path, seed: int = 0):
        super().__init__()
        check_installed(spec)
        from llama_cpp import Llama
        self.spec, self.seed = spec, seed
        file = self.file = self._gguf_file(model_path)
        meta = _gguf_meta(file)
        arch = meta.get("general.architecture", "llama")
        n_ctx = int(meta.get(f"{arch}.context_length", 2048))
        self.llm = Llama(model_path=str(file), n_ctx=n_ctx, logits_all=True, verbose=False, seed=seed,
                         n_threads=torch.get_num_threads(), n_batch=min(512, n_ctx))
        self.eos_id = int(self.llm.token_eos())
        self.vocab_size = int(self.llm.n_vocab())
        self.n_ctx = self.max_len = n_ctx

    def encode(self, text):
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def decode(self, ids):
        try:
            raw = self.llm.detokenize(list(ids), special=False)
        except TypeError:  # older llama-cpp-python without `special`
            raw = self.llm.detokenize(list(ids))
        return raw.decode("utf-8", errors="replace")

    def _row(self, position: int) -> torch.Tensor:
        import numpy as np
        return torch.from_numpy(np.array(self.llm.scores[position], dtype=np.float32, copy=True))

    def _generate_ids(self, prompts, params):
        outs = []
        stops = set(params.stop_token_ids)
        for i, prompt in enumerate(prompts):
            keep_alive()
            seed = params.seed if params.seed is not None else self.seed + i
            generator = torch.Generator().manual_seed(seed)
            self.llm.reset()
            self.llm.eval(list(prompt))
            tokens, lps, reason = [], [], "length"
            for _ in range(params.max_new_tokens):
                if self.llm.n_tokens >= self.n_ctx:
                    break
                logits = self._row(self.llm.n_tokens - 1)
                token = sample_token(logits, params, generator)
                tokens.append(token)
                lps.append(float(logits.log_softmax(-1)[token]))
                if token in stops:
                    reason = "stop"
                    break
                self.llm.eval([token])
            outs.append(Completion(list(prompt), tokens, lps if params.logprobs else [], reason))
        return outs

    def _logits(self, ids):
        self.llm.reset()
        self.llm.eval(list(ids))
        return torch.stack([self._row(i) for i in range(len(ids))])

    def close(self):
        llm = getattr(self, "llm", None)
        if llm is not None and hasattr(llm, "close"):
            try:
                llm.close()
            except Exception:
                pass
        self.llm = None
        super().close()


class LlamaCppProcess(Backend):
    """The llamacpp backend as open_backend gives it: LlamaCppBackend in a child process
    (tandem/isolate.py), so a crash in llama.cpp's native code (a segfault in a quantised kernel
    on some CPUs) is a one-line BackendError naming what to try instead, not the end of tandem.
    A run or HF folder is exported to a temporary GGUF here, in the parent, so a crash cannot
    leave that folder behind."""

    def __init__(self, spec: BackendSpec, model_path, seed: int = 0):
        super().__init__()
        check_installed(spec)
        from tandem.isolate import Child
        self.spec = spec
        file = self._gguf_file(model_path)
        kind = GGUF_FILE_TYPES.get(_gguf_meta(file).get("general.file_type"), spec.gguf_type)
        others = " or ".join(f"llamacpp:{t}" for t in GGUF_TYPES if t != kind)
        try:
            self.child = Child(LlamaCppBackend, spec, file, seed, what="llama.cpp",
                               subject=f"{kind} ({file.name}) on this CPU", hint=f"; try {others}")
            self.eos_id = self.child.call("__getattribute__", "eos_id")
            self.vocab_size = self.child.call("__getattribute__", "vocab_size")
        except BaseException:
            self.close()
            raise

    def encode(self, text):
        return self.child.call("encode", text)

    def decode(self, ids):
        return self.child.call("decode", list(ids))

    def _generate_ids(self, prompts, params):
        return self.child.call("_generate_ids", prompts, params)

    def _logits(self, ids):
        return self.child.call("_logits", list(ids))

    def close(self):
        child = getattr(self, "child", None)
        if child is not None:
            self.child = None
            child.close()
        super().close()


def _gguf_meta(file: Path) -> dict:
    try:
        from tandem.export.gguf import read_gguf_metadata
        return read_gguf_metadata(file)
    except TandemError:
        return {}


# -----------------------------------------------------------------------------------------------
# Factory and discovery


def open_backend(spec: str | BackendSpec, model_path, max_batch: int = 32, seed: int = 0) -> Backend:
    """A ready backend for `model_path` (a run, checkpoint, HF folder, or .gguf for llamacpp)."""
    spec = parse_backend(spec)
    check_installed(spec)
    if spec.kind == "torch":
        from tandem.export.gguf import is_gguf
        if is_gguf(model_path) and not (Path(model_path) / "config.json").is_file():
            raise BackendError(f"{model_path} is a GGUF file; only the llamacpp backend runs it "
                               "(e.g. --target llamacpp)")
        return TorchBackend(spec, model_path, max_batch=max_batch, seed=seed)
    if spec.kind == "hf":
        return HFBackend(spec, model_path, seed=seed)
    return LlamaCppProcess(spec, model_path, seed=seed)


def available_backends(gguf_probe: Callable[[str], str] | None = None) -> list[dict]:
    """What `tandem doctor` lists: each backend, whether it is installed, and what it can run.
    Where llama-cpp-python is installed (or `gguf_probe` is given: tests), its entry has
    "on_this_cpu": whether llama.cpp runs each GGUF type here (infer/gguf_probe.py)."""
    from tandem import accel
    torch_runs = [f"torch:{dev}:{dt}" for dev in accel.available_devices() for dt in accel.supported_dtypes(dev)]
    out = [{"backend": "torch", "installed": True, "version": torch.__version__, "runs": torch_runs,
            "reads": "tandem runs and checkpoints, HF Llama/Qwen2 folders"}]
    hf_version = _version("transformers")
    out.append({"backend": "hf", "installed": hf_version is not None, "version": hf_version,
                "runs": [r.replace("torch:", "hf:", 1) for r in torch_runs] if hf_version else [],
                "reads": "HF folders (a tandem run is exported to a temp folder first)",
                "install": "pip install 'tandem[hf]'"})
    cpp_version = _version("llama_cpp_python")
    gguf_version = _version("gguf")
    out.append({"backend": "llamacpp", "installed": cpp_version is not None, "version": cpp_version,
                "runs": [f"llamacpp:{t}" for t in GGUF_TYPES] if cpp_version else [],
                "reads": ".gguf files (a run is exported to a temp GGUF first; needs gguf "
                         f"{'installed' if gguf_version else 'missing'})",
                "install": "pip install 'tandem[llamacpp]'"})
    if cpp_version or gguf_probe:
        from tandem.infer.gguf_probe import gguf_health, run_gguf
        out[-1]["on_this_cpu"] = gguf_health(gguf_probe or run_gguf)
    return out
