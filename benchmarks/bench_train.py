"""Training throughput: tandem's SFT step vs HF transformers' LlamaForCausalLM, same run.

    python benchmarks/bench_train.py [--threads 2] [--repeats 5] [--steps 20] [--device cpu] [--write]

Both sides get the same model config (the `tiny` preset), the same initial weights, the same
real SFT batches (task examples, right-padded, loss on assistant tokens only: -100 labels for HF)
and AdamW with the same hyper-parameters. Reported: median tokens/s over repeats (each repeat
times `--steps` optimizer steps after a warm-up) and the ratio tandem / HF.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import environment, median, table, write_section  # noqa: E402
from tandem import accel  # noqa: E402
from tandem.config import load_config  # noqa: E402
from tandem.pipeline import build_tasks  # noqa: E402
from tandem.tokenizer import train_tokenizer  # noqa: E402
from tandem.train.sft import assistant_loss_sum, build_optimizer, example_for, make_batch, new_model  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="auto|cpu|cuda[:i]|npu[:i]|... (default cpu)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = accel.resolve_device(args.device)
    cfg = load_config(preset="tiny")
    tasks = build_tasks(cfg)
    tokenizer = train_tokenizer([t for task in tasks for t in task.corpus(1000)], cfg.tokenizer.vocab_size)
    ours = new_model(cfg, tokenizer.vocab_size, device, seed=0)
    theirs = hf_twin(ours).to(device)
    s = cfg.sft
    batches = [make_batch([example_for(tasks, i * s.batch_size + j) for j in range(s.batch_size)],
                          tokenizer, s.max_seq_len, device) for i in range(args.steps)]
    tokens = sum(b.input_ids.numel() for b in batches)

    def step_ours(opt, batch):
        loss = assistant_loss_sum(ours, batch) / batch.target_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step_hf(opt, batch):
        labels = batch.input_ids.clone()
        labels[:, 1:][~batch.target_mask] = -100
        labels[:, 0] = -100
        loss = theirs(input_ids=batch.input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    runs = {"tandem": (step_ours, build_optimizer(ours, s)), "transformers": (step_hf, build_optimizer(theirs, s))}
    rates = {name: [] for name in runs}
    for name, (step, opt) in runs.items():  # warm-up
        step(opt, batches[0])
    for _ in range(args.repeats):
        for name, (step, opt) in runs.items():  # interleaved, so both see the same machine load
            start = accel.timer(device)
            for batch in batches:
                step(opt, batch)
            rates[name].append(tokens / (accel.timer(device) - start))
    ours_rate, hf_rate = median(rates["tandem"]), median(rates["transformers"])
    shape = f"on {accel.device_name(device)}, batch {s.batch_size}, padded length {batches[0].input_ids.shape[1]}, {ours.config.num_parameters():,} params"
    body = table(["implementation", "median tokens/s", "ratio"],
                 [["tandem SFT step", f"{ours_rate:,.0f}", f"**{ours_rate / hf_rate:.2f}x**"],
                  ["transformers LlamaForCausalLM", f"{hf_rate:,.0f}", "1.00x"]])
    ratio = ours_rate / hf_rate
    verdict = "met" if ratio >= 1.5 else "MISSED"
    body = (f"{body}\n\n`tiny` preset model, {shape}; {environment(args.threads)}; {args.repeats} repeats x "
            f"{args.steps} steps, interleaved; load average {os.getloadavg()[0]:.1f} during the run. "
            f"Target: >= 1.5x ({verdict}). At this size a step is compute-bound (matmuls are ~55% of it); "
            "tandem saves only the work HF spends on logits of non-assistant positions, so the two are "
            "about level. Closing the gap needs padding-free batches (not done yet).")
    print(body)
    if args.write:
        write_section("bench_train", "Training throughput vs transformers", body)


if __name__ == "__main__":
    main()
