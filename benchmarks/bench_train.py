"""Training throughput: tandem's SFT step vs HF transformers' LlamaForCausalLM, same run, with MFU.

    python benchmarks/bench_train.py [--threads 2] [--repeats 5] [--steps 20] [--dtypes fp32,bf16]
                                     [--device cpu] [--no-packing] [--profile] [--baseline [REF]] [--write]

Both sides get the same model config (the `tiny` preset), the same initial weights, the same real
SFT examples (loss on assistant tokens only: -100 labels for HF), AdamW with the same
hyper-parameters, and the same precision (--dtypes: each listed one on both sides, bf16 being
autocast over fp32 weights; with several, tandem's bf16 / fp32 ratio is printed too).
tandem runs its trainer's step (tandem.train.sft.forward_backward) on its own batches, packed as
the trainer packs them (sft.packing; --no-packing: right-padded); HF gets right-padded batches.
Tokens/s counts real (non-pad) tokens on both sides, so skipping the pads counts as speed.
Reported: median tokens/s over repeats (each repeat times `--steps` optimizer steps after a
warm-up, the two sides interleaved), the ratio tandem / HF, and each side's MFU: 6 x params x
tokens/s over the matmul peak measured in this run (tandem/peak.py) in fp32 and in the run's dtype.

--baseline [REF] also trains with `train_sft` (the real trainer, tandem's own default packing) on
this tree and on a git worktree of REF (default HEAD~1), interleaved in fresh processes, and
prints tokens/s of both and the ratio (benchmarks/ab.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def hf_twin(model):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation="sdpa"))
    hf.load_state_dict(model.state_dict())
    return hf


def measure_trainer(threads: int, steps: int, dtype: str) -> dict:
    """tokens/s of `train_sft` itself on the `tiny` preset (the A/B side: stable APIs only)."""
    from tandem.config import load_config
    from tandem.pipeline import build_tasks, ensure_tokenizer
    from tandem.runs import prepare_run
    from tandem.train.sft import train_sft
    cfg = load_config(preset="tiny", overrides=[f"sft.steps={steps}", f"sft.checkpoint_every={steps}",
                                                f"run.threads={threads}", f"sft.dtype={dtype}", "sft.log_every=1000"])
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = prepare_run(os.path.join(scratch, "run"), cfg)
        tasks = build_tasks(cfg)
        stats = train_sft(cfg, run_dir, ensure_tokenizer(cfg, run_dir, tasks), tasks, progress=False)
    return {"sft tokens/s": stats["tokens_per_s"]}


def side_by_side(args, device):
    """(rates {(side, dtype): [tokens/s per repeat]}, the model, a line describing the batches, real
    tokens per step). Every side starts from the same weights; all of them run interleaved."""
    import copy
    from tandem.config import load_config
    from tandem.pipeline import build_tasks
    from tandem.tokenizer import train_tokenizer
    from tandem.train.sft import build_optimizer, example_for, forward_backward, make_batch, new_model
    from tandem import accel
    cfg = load_config(preset="tiny")
    tasks = build_tasks(cfg)
    tokenizer = train_tokenizer([t for task in tasks for t in task.corpus(1000)], cfg.tokenizer.vocab_size)
    initial = new_model(cfg, tokenizer.vocab_size, device, seed=0)
    s = cfg.sft
    examples = [[example_for(tasks, i * s.batch_size + j) for j in range(s.batch_size)] for i in range(args.steps)]
    packed = [make_batch(e, tokenizer, s.max_seq_len, device, packed=not args.no_packing) for e in examples]
    padded = [make_batch(e, tokenizer, s.max_seq_len, device, packed=False) for e in examples]
    tokens = sum(b.tokens for b in padded)

    def step_ours(model, amp):
        def step(opt, i):
            forward_backward(model, [packed[i]], amp, packed[i].targets)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def step_hf(model, amp):
        def step(opt, i):
            layout = padded[i].layout
            labels = torch.full_like(layout.input_ids, -100).view(-1)
            labels[layout.predict + 1] = layout.targets
            with torch.autocast(device.type, dtype=amp, enabled=amp != torch.float32):
                loss = model(input_ids=layout.input_ids, labels=labels.view_as(layout.input_ids)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    runs = {}
    for dtype in args.dtypes:
        amp, ours, theirs = accel.DTYPES[dtype], copy.deepcopy(initial), hf_twin(initial).to(device)
        runs[("tandem", dtype)] = (step_ours(ours, amp), build_optimizer(ours, s))
        runs[("transformers", dtype)] = (step_hf(theirs, amp), build_optimizer(theirs, s))
    rates = {name: [] for name in runs}
    for step, opt in runs.values():  # warm-up
        step(opt, 0)
    for _ in range(args.repeats):
        for name, (step, opt) in runs.items():  # interleaved, so all see the same machine load
            start = accel.timer(device)
            for i in range(args.steps):
                step(opt, i)
            rates[name].append(tokens / (accel.timer(device) - start))
    shape = (f"batch {s.batch_size} ({tokens // args.steps:,} real tokens per step; padded width "
             f"{padded[0].layout.input_ids.shape[1]})")
    profiles = {}
    if args.profile:       # where a step's time goes, each side in the first dtype (op_profile)
        from benchmarks.common import op_profile
        for (side, dtype), (step, opt) in runs.items():
            if dtype == args.dtypes[0]:
                profiles[f"{side}, {dtype}"] = op_profile(lambda: [step(opt, i) for i in range(args.steps)], args.steps)
    return rates, initial, shape, tokens // args.steps, profiles


def main() -> None:
    from benchmarks.ab import add_baseline_argument, compare, report
    from benchmarks.common import environment, median, profile_table, table, write_section
    from tandem import accel
    from tandem.model import estimate_train_flops
    from tandem.peak import matmul_peak
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtypes", default="fp32", help="comma-separated precisions, each run by both sides "
                        "(fp32, bf16: autocast over fp32 weights); e.g. fp32,bf16 (default fp32)")
    parser.add_argument("--no-packing", action="store_true", help="tandem on right-padded batches too")
    parser.add_argument("--device", default="cpu", help="auto|cpu|cuda[:i]|npu[:i]|... (default cpu)")
    parser.add_argument("--profile", action="store_true", help="also profile one pass of each side's steps")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    add_baseline_argument(parser)
    args = parser.parse_args()
    args.dtypes = list(dict.fromkeys(args.dtypes.split(",")))
    if not set(args.dtypes) <= {"fp32", "bf16"}:
        parser.error(f"--dtypes takes fp32 and/or bf16, got {','.join(args.dtypes)}")
    torch.set_num_threads(args.threads)
    device = accel.resolve_device(args.device)
    rates, ours, shape, step_tokens, profiles = side_by_side(args, device)
    peaks = {d: matmul_peak(device, d, ours.config, step_tokens, budget_s=0.5) for d in dict.fromkeys(["fp32", *args.dtypes])}

    def mfu(rate: float, dtype: str) -> str:     # against the fp32 peak and the row's own dtype's
        achieved = estimate_train_flops(ours.config, 1) * rate
        return " / ".join(f"{achieved / peaks[d]:.1%} ({d})" for d in dict.fromkeys(["fp32", dtype]))

    layout = "padded" if args.no_packing else "packed (sft.packing)"
    rows, verdicts = [], []
    for dtype in args.dtypes:
        ours_rate, hf_rate = median(rates[("tandem", dtype)]), median(rates[("transformers", dtype)])
        verdicts.append(f"{dtype} {ours_rate / hf_rate:.2f}x ({'met' if ours_rate / hf_rate >= 1.5 else 'MISSED'})")
        rows += [[f"tandem SFT step, {layout}, {dtype}", f"{ours_rate:,.0f}", f"**{ours_rate / hf_rate:.2f}x**", mfu(ours_rate, dtype)],
                 [f"transformers LlamaForCausalLM, padded, {dtype}", f"{hf_rate:,.0f}", "1.00x", mfu(hf_rate, dtype)]]
    body = table(["implementation", "median tokens/s", "vs transformers (same dtype)", "MFU vs measured matmul peak"], rows)
    own = ""
    if len(args.dtypes) > 1:
        first, *rest = args.dtypes
        own = " tandem vs its own " + first + ": " + ", ".join(
            f"{d} {median(rates[('tandem', d)]) / median(rates[('tandem', first)]):.2f}x" for d in rest) + \
            f" (target in bf16 on an AMX/AVX512-BF16 CPU: >= 2x; bf16 units here: {accel.fast_bf16(device)})."
    peak_text = ", ".join(f"{d} {p / 1e9:,.0f} GFLOP/s" for d, p in peaks.items())
    body = (f"{body}\n\n`tiny` preset model ({ours.config.num_parameters():,} params) on {accel.device_name(device)}, "
            f"{shape}; {environment(args.threads)}; {args.repeats} repeats x {args.steps} steps, all rows interleaved; "
            f"load average {os.getloadavg()[0]:.1f} during the run. Tokens/s count real tokens only. MFU: 6 x params x "
            f"tokens/s over the matmul peak measured in this run at the model's shapes ({peak_text}; tandem/peak.py). "
            f"Target vs transformers: >= 1.5x ({'; '.join(verdicts)}).{own}")
    if profiles:
        body += ("\n\nWhere a step's time goes (`--profile`, one pass over the steps under torch.profiler):\n\n"
                 + profile_table(profiles, "optimizer step"))
    if args.baseline:
        result = compare("bench_train.py:measure_trainer",
                         {"threads": args.threads, "steps": args.steps, "dtype": args.dtypes[-1]}, args.baseline, args.ab_rounds)
        body += f"\n\nA/B, `train_sft` on this tree vs `{args.baseline}`:\n\n" + report(result, args.baseline, args.ab_rounds)
    print(body)
    if args.write:
        write_section("bench_train", "Training throughput vs transformers", body)


if __name__ == "__main__":
    main()
