"""HF export/import: transformers loads our export unchanged (same logits, same greedy answers,
same chat prompts), HF -> tandem -> HF is bitwise, and every bad input is refused cleanly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_tandem
from tandem.errors import ModelError

import transformers
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def _tokenizer():
    from tandem.tasks import get_task
    from tandem.tokenizer import train_tokenizer
    return train_tokenizer(get_task("addition", max_digits=2).corpus(200), 300)


def _hf_folder(path, arch="llama", tied=True, tokenizer=None, **overrides):
    """A random tiny HF model saved by transformers itself, with our ChatML tokenizer."""
    tok = tokenizer or _tokenizer()
    kw = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=tied, **overrides)
    cls, config = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if arch == "llama"
                   else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    torch.manual_seed(0)
    model = cls(config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(path)
    tok.save(path)
    return path


# -----------------------------------------------------------------------------------------------
# Our export, loaded by transformers


def test_pipeline_exports_and_gates_by_default(smoke_run):
    folder = smoke_run / "export" / "hf"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "tandem_export.json"):
        assert (folder / name).is_file(), name
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["export"]["hf"]["published"] and summary["export"]["hf"]["passed"]
    report = summary["parity"]["torch:cpu:fp32 vs hf:cpu:fp32"]
    assert report["passed"] and report["metrics"]["logprob_max_abs"] <= 1e-4
    assert "## Parity: `torch:cpu:fp32` vs `hf:cpu:fp32`" in (smoke_run / "report.md").read_text()
    assert not list(smoke_run.glob("export/.*"))  # no staging leftovers


def test_transformers_loads_export_with_same_logits_prompts_and_greedy(smoke_run):
    from tandem.infer.engine import Engine, SamplingParams
    from tandem.loading import load_model
    from tandem.parity import resolve_task
    folder = smoke_run / "export" / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 10000.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_model(smoke_run)
    tok = ours.tokenizer
    assert (config["eos_token_id"], config["pad_token_id"]) == (tok.eos_id, tok.pad_id)

    examples = resolve_task(smoke_run).test_set(8)
    messages = [[{"role": "user", "content": e.prompt}] for e in examples]
    for m in messages:  # apply_chat_template produces exactly our prompt format, text and ids
        text = hf_tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        assert text == tok.apply_chat_template(m, add_generation_prompt=True)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode_prompt(m)

    sequences = [tok.encode_prompt(m) for m in messages]
    sequences += torch.randint(0, tok.vocab_size, (4, 40)).tolist()
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            diff = (hf(ids).logits - ours.model(ids)).abs().max().item()
            assert diff <= 1e-4, diff

    # greedy answers on the held-out split: transformers' own generate() vs our engine
    params = SamplingParams(max_new_tokens=24, stop_token_ids=(tok.eos_id,), logprobs=False)
    engine_out = Engine(ours.model, max_batch=8).generate(sequences[:8], params)
    for seq, gen in zip(sequences[:8], engine_out):
        out = hf.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                          max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        assert out[0, len(seq):].tolist() == gen.token_ids


def test_export_carries_a_model_card_with_the_runs_evidence(smoke_run):
    from huggingface_hub import ModelCard
    from tandem.parity import METRICS, _fmt
    folder = smoke_run / "export" / "hf"
    summary = json.loads((smoke_run / "summary.json").read_text())
    card = ModelCard.load(folder / "README.md")                 # the Hub's own parser of the front matter
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "tandem" in card.data.tags and "addition" in card.data.tags
    text = card.text
    for stage, by_task in summary["evals"].items():               # held-out accuracies, every stage
        for task, result in by_task.items():
            assert f"| {stage} | {task} | {result['n']} | {result['accuracy']:.1%} |" in text
    gate = summary["parity"]["torch:cpu:fp32 vs hf:cpu:fp32"]     # the gate this export passed
    assert "**PASS**" in text and f"{gate['n']} held-out" in text
    for name in METRICS:
        if name in gate["thresholds"] and name in gate["metrics"]:      # routing: MoE models only
            assert f"| {_fmt(gate['metrics'][name])} | " in text and f" {_fmt(gate['thresholds'][name])} | ok |" in text
    sft = summary["sft"]
    assert f"| SFT | {sft['steps']} | `{sft['device']}` | {sft['seconds']:.1f} | {sft['tokens']:,} |" in text
    assert "## Compute ledger" in text and "README.md" in json.loads((folder / "tandem_export.json").read_text())["files"]
    transformers.AutoModelForCausalLM.from_pretrained(folder)     # stock transformers still loads the folder


def test_inspect_of_export_shows_the_runs_fingerprint(smoke_run):
    from tandem.loading import load_model
    result = run_tandem("inspect", smoke_run / "export" / "hf", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "hf" and data["step"] is None
    assert data["fingerprint"] == load_model(smoke_run).info["fingerprint"]
    bf16 = load_model(smoke_run, dtype="bf16")     # the fingerprint is of the weights, not of the load dtype
    assert bf16.info["fingerprint"] == data["fingerprint"]
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    provenance = json.loads((smoke_run / "export" / "hf" / "tandem_export.json").read_text())
    assert provenance["fingerprint"] == provenance["source_fingerprint"] == data["fingerprint"]


def test_sharded_bf16_export_via_cli(smoke_run, tmp_path):
    out = tmp_path / "sharded"
    result = run_tandem("export", "--model", smoke_run, "--format", "hf", "--out", out,
                        "--max-shard-size", "20KB", "--dtype", "bf16", "--json",
                        "--gate", "torch:cpu:fp32", "--n", "3")
    assert result.returncode == 0, result.stderr
    gate = json.loads(result.stdout)["gate"]
    assert gate["passed"] and gate["thresholds"]["kl_mean"] == 0.01   # bf16 weights: bf16 limits
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    from tandem.export.hf import import_hf
    from tandem.loading import load_weights
    _, weights, _, _ = import_hf(out)
    _, source, _, _ = load_weights(smoke_run)
    assert set(weights) == set(source) and all(torch.equal(weights[k], source[k].bfloat16()) for k in source)


# -----------------------------------------------------------------------------------------------
# Import: HF -> tandem -> HF


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_round_trip_hf_tandem_hf_is_bitwise(tmp_path, arch, tied):
    from tandem.export.hf import import_hf, write_hf
    from tandem.loading import load_model
    src = _hf_folder(tmp_path / "src", arch, tied, rope_theta=50000.0)
    config, weights, tok, info = import_hf(src)
    assert info == {"kind": "hf", "path": str(src), "step": None, "arch": info["arch"], "dtype": "float32"}
    assert (config.arch, config.tie_word_embeddings, config.rope_theta) == (arch, tied, 50000.0)
    out = tmp_path / "out"
    out.mkdir()
    write_hf(config, weights, tok, out, max_shard_size="8KB")   # sharded on the way back
    original, again = load_file(str(src / "model.safetensors")), {}
    for name in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values():
        again.update(load_file(str(out / name)))
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) and original[k].dtype == again[k].dtype for k in original)
    a = json.loads((src / "config.json").read_text())
    b = json.loads((out / "config.json").read_text())
    for key in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings"):
        assert a[key] == b[key], key
    ids = torch.randint(0, tok.vocab_size, (2, 11))
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(src)(ids).logits
        assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits, ref)
        assert torch.equal(load_model(src).model(ids), ref)   # tandem runs the HF model bitwise alike


def _expect_model_error(path, needle):
    from tandem.export.hf import import_hf
    with pytest.raises(ModelError) as err:
        import_hf(path)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_import_refuses_what_it_cannot_run(tmp_path):
    src = _hf_folder(tmp_path / "ok")
    config = json.loads((src / "config.json").read_text())

    def variant(name, edit=None, drop=()):
        import shutil
        dst = tmp_path / name
        shutil.copytree(src, dst)
        if edit:
            data = dict(config)
            edit(data)
            (dst / "config.json").write_text(json.dumps(data))
        for f in drop:
            (dst / f).unlink()
        return dst

    _expect_model_error(variant("gpt2", lambda d: d.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")),
                        "'GPT2LMHeadModel'")
    _expect_model_error(variant("rope", lambda d: d.update(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                            "rope_theta": 1e4})), "rope scaling")
    _expect_model_error(variant("bias", lambda d: d.update(attention_bias=True)), "attention_bias")
    _expect_model_error(variant("noheads", lambda d: d.pop("num_attention_heads")), "num_attention_heads")
    _expect_model_error(variant("noweights", drop=["model.safetensors"]), "no weights")
    _expect_model_error(variant("notok", drop=["tokenizer.json"]), "no tokenizer.json")
    # a shard listed in the index but absent
    sharded = variant("shard")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weights = load_file(str(sharded / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" for k in weights}}
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_model_error(sharded, "model-00002-of-00002.safetensors")
    # a weight missing from the file
    partial = variant("partial")
    weights = load_file(str(partial / "model.safetensors"))
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, str(partial / "model.safetensors"), metadata={"format": "pt"})
    _expect_model_error(partial, "model.layers.1.mlp.up_proj.weight")


def test_import_refuses_a_tokenizer_without_chatml(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    src = _hf_folder(tmp_path / "m")
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain.add_special_tokens(["<|begin_of_text|>", "<|eot_id|>"])
    plain.save(str(src / "tokenizer.json"))
    _expect_model_error(src, "lacks the ChatML markers <|im_start|>, <|im_end|>, <|endoftext|>")
    result = run_tandem("inspect", src)
    assert result.returncode == 2 and "ChatML" in result.stderr and "Traceback" not in result.stderr


# -----------------------------------------------------------------------------------------------
# Bad input and atomicity


def test_export_refusals_are_one_line_and_leave_nothing(smoke_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_tandem("export", "--model", smoke_run, "--out", out)
    assert result.returncode == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"

    empty_run = tmp_path / "fresh"
    (empty_run / "checkpoints" / "sft").mkdir(parents=True)
    (empty_run / "config.json").write_text("{}")
    result = run_tandem("export", "--model", empty_run, "--out", tmp_path / "x")
    assert result.returncode == 2 and "no committed checkpoint" in result.stderr

    for target in (smoke_run, smoke_run.parent):   # --force must never replace the source
        result = run_tandem("export", "--model", smoke_run, "--out", target, "--force")
        assert result.returncode == 2 and "contains it" in result.stderr
    assert (smoke_run / "config.json").is_file()
    result = run_tandem("export", "--model", smoke_run, "--out", out, "--force")  # not an export: kept
    assert result.returncode == 2 and "not an earlier tandem export" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "taken"]  # no .tmp/.old folders


def test_a_failed_export_leaves_nothing_behind(smoke_run, tmp_path, monkeypatch):
    import tandem.export.hf as hf_module
    from tandem.publish import export_model

    def broken(config, weights, tokenizer, folder, **kw):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "write_hf", broken)
    with pytest.raises(OSError):
        export_model(smoke_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
