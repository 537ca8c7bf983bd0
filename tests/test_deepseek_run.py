"""DeepSeek-V3 end to end: the smoke pipeline (SFT -> eval -> GRPO -> eval -> HF export + parity gate) on
a tiny MLA + MoE model, stock transformers loading the export, an HF DeepseekV3 folder imported and
round-tripped bitwise, aux-loss-free balancing, and exact resume of an MoE SFT run."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import run_tandem, tiny_deepseek_config
from tandem.config import load_config
from tandem.errors import ModelError
from tandem.model import weights_fingerprint
from tandem.runs import read_metrics

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# The smoke preset's recipe on a DeepSeek-V3 shape: 4 experts in 2 groups (1 kept), top-2, 1 shared.
MOE = ["model.arch=deepseek_v3", "model.num_key_value_heads=4", "model.q_lora_rank=32", "model.kv_lora_rank=16",
       "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16", "model.n_routed_experts=4",
       "model.n_shared_experts=1", "model.num_experts_per_tok=2", "model.moe_intermediate_size=32",
       "model.first_k_dense_replace=1", "model.n_group=2", "model.topk_group=1", "model.routed_scaling_factor=2.5"]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "moe"
    result = run_tandem("pipeline", "--preset", "smoke", *sets(MOE), "--out", out, timeout=900)
    assert result.returncode == 0, result.stderr
    return out


def test_pipeline_trains_exports_and_gates_an_moe_model(moe_run):
    summary = json.loads((moe_run / "summary.json").read_text())
    assert summary["export"]["hf"]["published"] and summary["export"]["hf"]["passed"]
    assert summary["parity"]["torch:cpu:fp32 vs hf:cpu:fp32"]["metrics"]["logprob_max_abs"] <= 1e-4
    config = json.loads((moe_run / "export" / "hf" / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert (config["scoring_func"], config["topk_method"], config["num_nextn_predict_layers"]) == ("sigmoid", "noaux_tc", 0)
    weights = load_file(str(moe_run / "export" / "hf" / "model.safetensors"))
    bias = weights["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().max() > 0      # balancing moved it while training
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in weights and "model.layers.0.mlp.gate_proj.weight" in weights
    # report.md: each phase's expert load per MoE layer (a heatmap) and its imbalance over training
    for phase in ("sft", "rl"):
        logged = [r for r in read_metrics(moe_run, phase) if "expert_load" in r]
        assert logged and all(len(r["expert_load"]) == 1 and len(r["expert_load"][0]) == 4 for r in logged)
        assert all(r["expert_imbalance"] >= 1.0 for r in logged)
        assert (moe_run / "plots" / f"{phase}_expert_load.png").stat().st_size > 0
    report = (moe_run / "report.md").read_text()
    assert report.count("Expert load, max/mean") == 2 and "plots/rl_expert_imbalance.png" in report


def test_parity_gate_judges_routing_and_fails_an_export_whose_router_moved(moe_run, tmp_path):
    """The gate's routing check: tandem vs its own HF export routes every scored token alike in
    every MoE layer; the same export with one router's selection bias pushed toward one expert
    (the kind of change a bad conversion makes) fails on routing_match."""
    import shutil
    from safetensors.torch import save_file
    from tandem.parity import run_parity
    clean = run_parity(moe_run, "torch:cpu:fp32", "hf", target_model=moe_run / "export" / "hf", n=8, progress=False)
    assert clean["passed"] and clean["metrics"]["routing_match"] == 1.0
    assert clean["metrics"]["routing_layer_match"] == [1.0]            # one MoE layer (layer 0 is dense)
    moved = tmp_path / "moved"
    shutil.copytree(moe_run / "export" / "hf", moved)
    weights = load_file(str(moved / "model.safetensors"))
    weights["model.layers.1.mlp.gate.e_score_correction_bias"][0] += 10.0   # expert 0 now always selected
    save_file(weights, str(moved / "model.safetensors"), metadata={"format": "pt"})
    bad = run_parity(moe_run, "torch:cpu:fp32", "hf", target_model=moved, n=8, progress=False)
    assert bad["metrics"]["routing_match"] < 0.99
    assert any(failure.startswith("routing_match ") for failure in bad["failures"]) and not bad["passed"]
    bf16 = run_parity(moe_run, "torch:cpu:fp32", "torch:cpu:bf16", n=4, progress=False)
    assert 0.0 < bf16["metrics"]["routing_match"] <= 1.0 and bf16["thresholds"]["routing_match"] == 0.9


def test_transformers_loads_the_moe_export_with_same_logits_and_greedy(moe_run):
    from tandem.infer.engine import Engine, SamplingParams
    from tandem.loading import load_model
    folder = moe_run / "export" / "hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    ours = load_model(moe_run)
    tok = ours.tokenizer
    prompts = [tok.encode_prompt([{"role": "user", "content": f"What is {a} + {b}?"}]) for a, b in [(3, 4), (12, 9)]]
    sequences = prompts + torch.randint(0, tok.vocab_size, (3, 30)).tolist()
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            assert (hf(ids).logits - ours.model(ids)).abs().max().item() <= 1e-4
    params = SamplingParams(max_new_tokens=16, stop_token_ids=(tok.eos_id,), logprobs=False)
    for seq, gen in zip(sequences, Engine(ours.model, max_batch=8).generate(sequences, params)):
        out = hf.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        assert out[0, len(seq):].tolist() == gen.token_ids


def _hf_deepseek_folder(path):
    """A random tiny DeepseekV3 saved by transformers itself, with a ChatML tokenizer."""
    from test_deepseek import hf_config
    from tandem.tasks import get_task
    from tandem.tokenizer import train_tokenizer
    tok = train_tokenizer(get_task("addition", max_digits=2).corpus(200), 300)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(hf_config(tiny_deepseek_config(vocab_size=tok.vocab_size)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(path)
    tok.save(path)
    return path


def test_hf_deepseek_folder_imports_runs_alike_and_round_trips_bitwise(tmp_path):
    from tandem.export.hf import import_hf, write_hf
    from tandem.loading import load_model
    src = _hf_deepseek_folder(tmp_path / "src")
    config, weights, tok, info = import_hf(src)
    assert config.is_latent and info["arch"] == "DeepseekV3ForCausalLM"
    out = tmp_path / "out"
    out.mkdir()
    write_hf(config, weights, tok, out)
    original, again = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert weights_fingerprint(original) == weights_fingerprint(again)
    loaded = load_model(src)
    assert loaded.info["fingerprint"] == load_model(out).info["fingerprint"]
    ids = torch.randint(0, tok.vocab_size, (2, 11))
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(src)(ids).logits
        assert (loaded.model(ids) - ref).abs().max() <= 1e-4


def test_import_names_what_it_supports_and_refuses_softmax_routing(tmp_path):
    import shutil
    from tandem.export.hf import import_hf
    src = _hf_deepseek_folder(tmp_path / "src")
    data = json.loads((src / "config.json").read_text())
    for name, edit, needle in [
            ("mixtral", dict(architectures=["MixtralForCausalLM"], model_type="mixtral"),
             "'MixtralForCausalLM'; tandem imports LlamaForCausalLM, Qwen2ForCausalLM, DeepseekV3ForCausalLM only"),
            ("softmax", dict(scoring_func="softmax"), "scoring_func 'softmax' is not supported"),
            ("lite", dict(q_lora_rank=None), "q_lora_rank")]:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        (dst / "config.json").write_text(json.dumps({**data, **edit}))
        with pytest.raises(ModelError) as err:
            import_hf(dst)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_bias_moves_toward_balance_after_an_update_only():
    from test_deepseek import randomised
    from tandem.train.balance import balance_experts, load_metrics
    model = randomised(tiny_deepseek_config(bias_update_speed=0.01)).train()
    router = model.model.layers[1].mlp.gate
    router.e_score_correction_bias.zero_()
    ids = torch.randint(0, 64, (4, 16))
    with torch.no_grad():
        model(ids)                                       # no gradients: not counted
    assert router.load.sum() == 0
    model(ids)
    load = router.load.clone()
    assert load.sum() == 4 * 16 * 2 and load.max() > load.min()
    balance_experts(model, updated=False)              # a skipped step: counts dropped, bias kept
    assert router.load.sum() == 0 and router.e_score_correction_bias.abs().sum() == 0
    model(ids)
    counted = balance_experts(model, updated=True)     # the step's counts, returned for metrics.jsonl
    expected = 0.01 * torch.sign(load.mean() - load)
    assert torch.equal(router.e_score_correction_bias, expected) and router.load.sum() == 0
    assert len(counted) == len(model.routers()) and counted[0] == load.tolist()    # layer 0 is dense
    ratios = [max(layer) * len(layer) / sum(layer) for layer in counted]
    assert load_metrics(counted)["expert_imbalance"] == max(ratios) >= float(load.max() / load.mean())
    assert load_metrics(balance_experts(torch.nn.Linear(2, 2), updated=True)) == {}    # dense: nothing


def test_moe_sft_resume_is_bitwise_exact(tmp_path):
    from tandem.pipeline import build_tasks, ensure_tokenizer
    from tandem.runs import prepare_run
    from tandem.train.checkpoint import latest_valid, load_checkpoint
    from tandem.train.sft import train_sft
    cfg = load_config(preset="smoke", overrides=MOE + ["sft.steps=7", "sft.checkpoint_every=5", "run.threads=1",
                                                       "model.aux_loss_alpha=0.01"])

    def train(run_dir, stop_after=None):
        run_dir = prepare_run(run_dir, cfg)
        tasks = build_tasks(cfg)
        return train_sft(cfg, run_dir, ensure_tokenizer(cfg, run_dir, tasks), tasks, progress=False,
                         stop_after=stop_after)

    def final(run_dir):
        return load_checkpoint(latest_valid(run_dir / "checkpoints" / "sft"))["model"]

    train(tmp_path / "straight")
    train(tmp_path / "resumed", stop_after=3)
    assert train(tmp_path / "resumed")["resumed_from"] == 3
    straight, resumed = final(tmp_path / "straight"), final(tmp_path / "resumed")
    assert weights_fingerprint(straight) == weights_fingerprint(resumed)
    # an odd number of +-gamma steps cannot cancel out: the bias moved (and was restored on resume)
    assert straight["model.layers.1.mlp.gate.e_score_correction_bias"].abs().max() > 0


def test_preflight_knows_which_targets_serve_deepseek_and_its_shape_rules(tmp_path):
    from tandem.preflight import preflight
    folder = _hf_deepseek_folder(tmp_path / "ds")
    cpu = preflight(folder, "cpu")
    assert cpu["ok"] and cpu["arch"] == "DeepseekV3ForCausalLM"
    assert any(c["check"] == "moe_mla_shape" and "8 experts in 4 groups" in c["message"] for c in cpu["checks"])
    vllm = preflight(folder, "vllm", tp=3)
    status = {c["check"]: c["status"] for c in vllm["checks"]}
    assert status["architecture"] == "ok" and status["mla_cache_width_in"] == "warn"
    assert status["moe_tp_divisible"] == "fail" and not any(k.startswith("head_dim") for k in status)
    assert {c["check"]: c["status"] for c in preflight(folder, "vllm", tp=2)["checks"]}["moe_tp_divisible"] == "ok"
    llamacpp = preflight(folder, "llamacpp")
    arch = next(c for c in llamacpp["checks"] if c["check"] == "architecture")
    assert arch["status"] == "fail" and "not implemented yet" in arch["source"]


def test_the_server_and_chat_serve_the_moe_run_unchanged(moe_run):
    import openai
    from test_server import free_port, serve, wait_healthy
    port = free_port()
    proc = serve(str(moe_run), port)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "What is 3 + 4?"}]
        reply = client.chat.completions.create(model="moe", messages=messages, max_tokens=8, temperature=0, n=2)
        assert len(reply.choices) == 2 and reply.usage.completion_tokens > 0
        assert reply.choices[0].message.content == reply.choices[1].message.content   # greedy, batched together
        stream = client.chat.completions.create(model="moe", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert streamed == reply.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    import subprocess
    import sys
    from conftest import ROOT
    chat = subprocess.run([sys.executable, "-m", "tandem.cli", "chat", "--model", str(moe_run), "--max-new-tokens", "8"],
                          input="What is 3 + 4?\n\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert chat.returncode == 0 and "tandem>" in chat.stdout, chat.stderr
