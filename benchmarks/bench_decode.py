"""Decode throughput: tandem's Engine vs transformers' LlamaForCausalLM.generate(), same weights.

Builds a small tandem Transformer (~0.85M parameters: vocab 512, hidden 128, 4 layers, 4 heads,
2 kv heads, intermediate 384), copies its state_dict into an HF LlamaForCausalLM built from the
equivalent LlamaConfig (checked: same logits), then times greedy generation of exactly
--new-tokens tokens after a --prompt-len-token prompt (no stop tokens, HF eos disabled and
min_new_tokens = max_new_tokens) at each batch size. Each measurement is repeated --repeats times
after a warm-up, ours and HF interleaved; the table reports medians, plus the range of the ratios
of neighbouring runs (a gauge of how noisy the shared machine was). Tokens/s counts generated
tokens (batch x new tokens) over the wall time of the whole generate() call, prefill included.
Our side runs `Engine.generate()` with default SamplingParams (so it also computes logprobs); the
Engine (its KV cache and fused weights) is built once per batch size, outside the timing, as a
server would.

    .venv/bin/python benchmarks/bench_decode.py                  # print the table
    .venv/bin/python benchmarks/bench_decode.py --threads 1 --write   # also update BENCHMARKS.md
    .venv/bin/python benchmarks/bench_decode.py --device cuda         # both sides on an accelerator
    .venv/bin/python benchmarks/bench_decode.py --baseline [REF]      # also this tree vs git REF (HEAD~1)
    .venv/bin/python benchmarks/bench_decode.py --profile             # also where a batch-1 token's time goes

llama.cpp (third column, at batch 1, when llama-cpp-python is installed): the same weights written
by tandem's GGUF export in f32 (with a BPE tokenizer trained for the export: the prompts are token
ids, so it only fills the vocabulary table), the same thread count, greedy decoding of the same
prompt driven token by token from Python (argmax of llama.cpp's logits). Reported: llama.cpp's own
timer (llama_perf_context: decode time of the generated tokens, prompt excluded, no Python), the
wall time of the Python-driven loop (prefill included, as ours), and whether the tokens equal ours.

--baseline [REF] times `Engine.generate` of this tree and of a git worktree of REF (default
HEAD~1) in fresh processes, interleaved (benchmarks/ab.py), and prints the ratio.

Targets: ours >= 4x HF at batch 1 and >= 2x at batch 32; ours >= 1.0x llama.cpp's own timer at batch 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tandem import accel  # noqa: E402
from tandem.infer.engine import Engine, SamplingParams  # noqa: E402
from tandem.model import ModelConfig, Transformer, count_parameters  # noqa: E402

SECTION = "bench_decode"      # BENCHMARKS.md markers: <!-- bench_decode:start --> ... <!-- bench_decode:end -->
TARGETS = {1: 4.0, 32: 2.0}
LLAMACPP_TARGET = 1.0


def tandem_model(seed: int = 0) -> Transformer:
    config = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    ours = Transformer(config)
    ours.reset_parameters(seed=seed)
    return ours.eval()


def build_models(seed: int = 0):
    import transformers
    ours = tandem_model(seed)
    config = ours.config
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hf_config)
    hf.load_state_dict(ours.state_dict(), strict=True)
    hf.eval()
    probe = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(probe) - hf(probe).logits).abs().max().item()
    return config, ours, hf, diff


def time_ours(engine: Engine, prompts, new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens)
    start = accel.timer(engine.device)
    gens = engine.generate(prompts, params)
    elapsed = accel.timer(engine.device) - start
    assert all(len(g.token_ids) == new_tokens for g in gens)
    return elapsed


def measure_engine(threads: int, batches: list[int], prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Median tokens/s of Engine.generate per batch size (the A/B side: stable APIs only)."""
    torch.set_num_threads(threads)
    ours, figures = tandem_model(), {}
    for batch in batches:
        prompts = torch.randint(0, 512, (batch, prompt_len), generator=torch.Generator().manual_seed(batch)).tolist()
        engine = Engine(ours, max_batch=batch, max_len=prompt_len + new_tokens)
        time_ours(engine, prompts, new_tokens)
        figures[f"batch {batch} tok/s"] = batch * new_tokens / statistics.median(
            [time_ours(engine, prompts, new_tokens) for _ in range(repeats)])
    return figures


class LlamaCpp:
    """The same weights in llama.cpp (module doc): greedy decoding of token ids, timed two ways."""

    def __init__(self, model: Transformer, folder: Path, threads: int):
        import llama_cpp
        from tandem.export.gguf import write_gguf
        from tandem.tokenizer import train_tokenizer
        texts = [f"{a} + {b} = {a + b}" for a in range(60) for b in range(60)]
        tokenizer = train_tokenizer(texts, model.config.vocab_size)
        path = folder / "model.gguf"
        write_gguf(model.config, model.checkpoint_state(), tokenizer, path, out_type="f32")
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.max_position_embeddings,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.version = llama_cpp.__version__

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """(tokens, wall seconds of the Python-driven loop, llama.cpp's own decode seconds per token)."""
        import numpy as np
        llm, lib = self.llm, self.lib
        llm.reset()
        lib.llama_perf_context_reset(llm._ctx.ctx)
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = []
        for _ in range(new_tokens):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            tokens.append(int(logits.argmax()))
            if len(tokens) < new_tokens:
                llm.eval([tokens[-1]])
        wall = time.perf_counter() - start
        perf = lib.llama_perf_context(llm._ctx.ctx)
        return tokens, wall, perf.t_eval_ms / 1000 / max(1, perf.n_eval)


def llamacpp_lines(ours: Transformer, args) -> list[str]:
    """Batch 1 against llama.cpp, as table lines ([] when llama-cpp-python is not installed)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp column skipped: llama-cpp-python is not installed (pip install 'tandem[llamacpp]')")
        return []
    engine = Engine(ours, max_batch=1, max_len=args.prompt_len + args.new_tokens)
    prompts = torch.randint(0, ours.config.vocab_size, (1, args.prompt_len),
                            generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as folder:
        cpp = LlamaCpp(ours.cpu(), Path(folder), torch.get_num_threads())
        mine = engine.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens))[0].token_ids
        cpp.generate(prompts[0], args.new_tokens)                  # warm-up
        walls, own, t_ours = [], [], []
        for _ in range(args.repeats):
            tokens, wall, per_token = cpp.generate(prompts[0], args.new_tokens)
            walls.append(wall)
            own.append(per_token)
            t_ours.append(time_ours(engine, prompts, args.new_tokens))
    ours_tps, own_tps = args.new_tokens / statistics.median(t_ours), 1 / statistics.median(own)
    verdict = "met" if ours_tps / own_tps >= LLAMACPP_TARGET else "MISSED"
    return ["", "| batch 1 | llama.cpp, own timer (tok/s) | llama.cpp, Python-driven wall (tok/s) | tandem Engine "
            "(tok/s) | ours / llama.cpp own timer | same tokens | target |", "|---:|---:|---:|---:|---:|---:|---:|",
            f"| 1 | {own_tps:,.0f} | {args.new_tokens / statistics.median(walls):,.0f} | {ours_tps:,.0f} | "
            f"{ours_tps / own_tps:.2f}x | {'yes' if tokens == mine else 'no'} | >= {LLAMACPP_TARGET}x ({verdict}) |",
            "", f"llama-cpp-python {cpp.version}, f32 GGUF of the same weights (tandem's export), "
            f"{torch.get_num_threads()} thread(s) on both sides; llama.cpp's own timer counts decode steps "
            "only (no prompt, no Python), ours the whole generate() call."]


def profile_lines(ours: Transformer, args) -> list[str]:
    """Where a batch-1 decode token's time goes (benchmarks/common.op_profile over one
    `Engine.generate()`), beside its unprofiled wall time."""
    from benchmarks.common import op_profile, profile_table
    engine = Engine(ours, max_batch=1, max_len=args.prompt_len + args.new_tokens)
    prompts = torch.randint(0, ours.config.vocab_size, (1, args.prompt_len),
                            generator=torch.Generator().manual_seed(1)).tolist()
    time_ours(engine, prompts, args.new_tokens)
    per_token = statistics.median(time_ours(engine, prompts, args.new_tokens) for _ in range(5)) / args.new_tokens
    profile = op_profile(lambda: time_ours(engine, prompts, args.new_tokens), args.new_tokens)
    return ["", f"Profile of batch-1 decode ({torch.get_num_threads()} thread(s), `--profile`): "
            f"{per_token * 1e6:,.0f} us per token unprofiled.", "",
            profile_table({"tandem Engine, batch 1": profile}, "generated token")]


def baseline_lines(args, batches: list[int]) -> list[str]:
    """Engine.generate on this tree vs git ref args.baseline (benchmarks/ab.py), as table lines."""
    from benchmarks.ab import compare, report
    result = compare("bench_decode.py:measure_engine",
                     {"threads": args.threads, "batches": batches, "prompt_len": args.prompt_len,
                      "new_tokens": args.new_tokens, "repeats": args.repeats}, args.baseline, args.ab_rounds)
    return ["", f"A/B, `Engine.generate` on this tree vs `{args.baseline}`:", "", report(result, args.baseline, args.ab_rounds)]


def time_hf(hf, input_ids: torch.Tensor, new_tokens: int) -> float:
    start = accel.timer(input_ids.device)
    with torch.inference_mode():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    elapsed = accel.timer(input_ids.device) - start
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="auto|cpu|cuda[:i]|npu[:i]|... (default cpu)")
    parser.add_argument("--profile", action="store_true", help="also profile batch-1 decode: where a token's time goes")
    parser.add_argument("--write", action="store_true", help="update the bench_decode section of BENCHMARKS.md")
    from benchmarks.ab import add_baseline_argument
    add_baseline_argument(parser)
    args = parser.parse_args(argv)

    import transformers
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    config, ours, hf, diff = build_models()
    device = accel.resolve_device(args.device)
    ours, hf = ours.to(device), hf.to(device)
    print(f"model: {count_parameters(ours):,} parameters; max |logit diff| tandem vs HF on the same weights: {diff:.2e}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device={accel.device_name(device)} threads={torch.get_num_threads()} torch={torch.__version__} transformers={transformers.__version__} "
          f"prompt_len={args.prompt_len} new_tokens={args.new_tokens} repeats={args.repeats} "
          f"(load average {load:.1f} on {os.cpu_count()} cpus)")

    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        input_ids = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=g).to(device)
        prompts = input_ids.tolist()
        engine = Engine(ours, max_batch=batch, max_len=args.prompt_len + args.new_tokens)
        time_ours(engine, prompts, args.new_tokens)           # warm up both
        time_hf(hf, input_ids, args.new_tokens)
        t_ours, t_hf = [], []
        for _ in range(args.repeats):                          # interleave to share the noise
            t_ours.append(time_ours(engine, prompts, args.new_tokens))
            t_hf.append(time_hf(hf, input_ids, args.new_tokens))
        tokens = batch * args.new_tokens
        ours_tps, hf_tps = tokens / statistics.median(t_ours), tokens / statistics.median(t_hf)
        paired = sorted(h / o for o, h in zip(t_ours, t_hf))     # each run against its neighbour
        rows.append((batch, hf_tps, ours_tps, ours_tps / hf_tps, paired))
        print(f"batch {batch}: HF {hf_tps:,.0f} tok/s, ours {ours_tps:,.0f} tok/s, ratio {ours_tps / hf_tps:.2f}x "
              f"(paired runs: {', '.join(f'{r:.2f}' for r in paired)})", flush=True)

    lines = ["| batch | HF generate (tok/s) | tandem Engine (tok/s) | ours / HF | paired runs min-max | target |",
             "|---:|---:|---:|---:|---:|---:|"]
    for batch, hf_tps, ours_tps, ratio, paired in rows:
        target = TARGETS.get(batch)
        mark = "" if target is None else f">= {target}x {'(met)' if ratio >= target else '(MISSED)'}"
        lines.append(f"| {batch} | {hf_tps:,.0f} | {ours_tps:,.0f} | {ratio:.2f}x | "
                     f"{paired[0]:.2f}-{paired[-1]:.2f}x | {mark} |")
    if device.type == "cpu":
        lines += llamacpp_lines(ours, args)
    if args.profile:
        lines += profile_lines(ours, args)
    if args.baseline:
        lines += baseline_lines(args, batches)
    table = "\n".join(lines)
    print()
    print(table)

    if args.write:
        from benchmarks.common import BENCHMARKS_MD, environment, write_section
        body = "\n".join([
            f"Greedy decoding, {count_parameters(ours):,}-parameter Llama-shaped model (vocab 512, hidden 128, "
            f"4 layers, 4 heads, 2 kv heads, intermediate 384), the same weights on both sides, prompt "
            f"{args.prompt_len} tokens, exactly {args.new_tokens} new tokens per sequence, tokens/s = generated "
            f"tokens / wall time of the whole generate() call (prefill included), median of {args.repeats} "
            f"interleaved runs after a warm-up. Ours: `Engine.generate()` with default SamplingParams "
            f"(logprobs on); HF: `LlamaForCausalLM.generate(do_sample=False, min_new_tokens=max_new_tokens)`.",
            "",
            f"Environment: {environment(torch.get_num_threads())}, cpu ({os.cpu_count()} cores visible, "
            f"1-min load average {load:.1f} when the run started: the machine is shared, numbers are noisy).",
            "",
            table,
        ])
        command = "python benchmarks/bench_decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(SECTION, "Decode throughput: tandem Engine vs transformers generate()", body,
                      command.strip())
        print(f"\nwrote {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
