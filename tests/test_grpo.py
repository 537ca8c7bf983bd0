"""GRPO: the loss against hand-computed numbers, rewards that raise, sync determinism and exact resume."""

import json
import math

import pytest
import torch

from conftest import run_tandem
from tandem.config import load_config
from tandem.model import weights_fingerprint
from tandem.runs import prepare_run, read_metrics, read_summary
from tandem.tasks import TASKS
from tandem.tasks.arithmetic import AdditionTask
from tandem.train.checkpoint import latest_valid, load_checkpoint
from tandem.train.grpo import safe_reward, train_grpo
from tandem.train.grpo_loss import build_batch, group_advantages, grpo_loss, informative, mismatch, token_weights

# Two sequences of 2 and 1 completion tokens; advantages +1 and -1.
LOGP = [-1.0, -2.0, -0.5]
OLD = [-1.2, -1.5, -0.5]
ADV = [1.0, 1.0, -1.0]
LENGTHS = [2, 1]


def _loss(norm, **kw):
    logp = torch.tensor(LOGP, requires_grad=True)
    terms = grpo_loss(logp, torch.tensor(OLD), torch.tensor(ADV), token_weights(LENGTHS, norm, 4), **kw)
    return logp, terms


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5])          # two groups of 3
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)          # unbiased std of (1, 0, 0)
    group = group_advantages(rewards, 3, "group", eps=0.0 + 1e-12)
    assert group[:3].tolist() == pytest.approx([(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std], rel=1e-5)
    assert group[3:].tolist() == [0.0, 0.0, 0.0]                     # equal rewards: no signal
    none = group_advantages(rewards, 3, "none")
    assert none.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], abs=1e-6)
    batch = group_advantages(rewards, 3, "batch", eps=1e-12)
    assert batch.tolist() == pytest.approx((none / rewards.std()).tolist(), rel=1e-5)


@pytest.mark.parametrize("norm,expected_weights", [
    ("grpo", [1 / 4, 1 / 4, 1 / 2]),        # 1 / (|o_i| * n_seqs)
    ("dapo", [1 / 3, 1 / 3, 1 / 3]),        # 1 / all tokens
    ("dr_grpo", [1 / 8, 1 / 8, 1 / 8]),     # 1 / (n_seqs * max_new_tokens = 2 * 4)
])
def test_loss_normalisations_and_symmetric_clip_by_hand(norm, expected_weights):
    assert token_weights(LENGTHS, norm, 4).tolist() == pytest.approx(expected_weights)
    logp, terms = _loss(norm, clip_eps=0.2)
    # ratios e^0.2 = 1.2214 (clipped to 1.2: A > 0 and above 1 + eps), e^-0.5 = 0.6065 (below 1 - eps
    # but A > 0, so min() keeps the unclipped value), e^0 = 1 with A = -1.
    per_token = [-1.2, -math.exp(-0.5), 1.0]
    assert float(terms.loss.detach()) == pytest.approx(sum(w * l for w, l in zip(expected_weights, per_token)), rel=1e-6)
    assert terms.clip_frac == pytest.approx(1 / 3)
    terms.loss.backward()
    # d loss / d logp_t = -c_t * A_t * ratio_t where unclipped, 0 where the clip is active.
    assert logp.grad.tolist() == pytest.approx([0.0, -expected_weights[1] * math.exp(-0.5), expected_weights[2]],
                                               rel=1e-6)


def test_clip_higher_truncated_importance_weight_and_k3_kl_by_hand():
    rollout = [-1.0, -1.6, -3.0]
    ref = [-1.5, -2.0, -0.4]
    logp = torch.tensor(LOGP, requires_grad=True)
    terms = grpo_loss(logp, torch.tensor(OLD), torch.tensor(ADV), token_weights(LENGTHS, "dapo", 4),
                      clip_eps=0.2, clip_eps_high=0.28, logp_rollout=torch.tensor(rollout), tis_cap=2.0,
                      logp_ref=torch.tensor(ref), kl_coef=0.1)
    surrogate = [math.exp(0.2), math.exp(-0.5), -1.0]                 # 1.2214 < 1 + 0.28: not clipped
    tis = [math.exp(-0.2), math.exp(0.1), 2.0]                        # e^2.5 = 12.2 truncated to C = 2
    kl = [math.exp(d) - d - 1 for d in (-0.5, 0.0, 0.1)]              # k3 with d = ref - logp
    per_token = [-w * s + 0.1 * k for w, s, k in zip(tis, surrogate, kl)]
    assert float(terms.loss.detach()) == pytest.approx(sum(per_token) / 3, rel=1e-6)
    assert terms.clip_frac == 0.0
    assert terms.tis_mean == pytest.approx(sum(tis) / 3, rel=1e-6) and terms.tis_capped == pytest.approx(1 / 3)
    assert terms.kl_ref == pytest.approx(sum(kl) / 3, rel=1e-6)


def test_gspo_uses_one_clipped_ratio_per_sequence_by_hand():
    """rl.loss = gspo: sequence 0's tokens (log ratios +0.2, -0.5) both carry the geometric mean
    e^-0.15 = 0.861, clipped to 1 - 0.1 (A > 0, below the lower bound: min() keeps it unclipped);
    sequence 1's one token ratio 1. The gradient of a token is c_t * A * s_i (s_i inside the clip)."""
    weights = token_weights(LENGTHS, "grpo", 4)
    logp = torch.tensor(LOGP, requires_grad=True)
    terms = grpo_loss(logp, torch.tensor(OLD), torch.tensor(ADV), weights, clip_eps=0.1,
                      sequence_lengths=LENGTHS)
    s0 = math.exp((0.2 - 0.5) / 2)
    assert float(terms.loss.detach()) == pytest.approx(-(0.25 + 0.25) * s0 + 0.5 * 1.0, rel=1e-6)
    terms.loss.backward()
    assert logp.grad.tolist() == pytest.approx([-0.25 * s0, -0.25 * s0, 0.5], rel=1e-6)
    # above the upper bound with A > 0 the clip bites for every token of the sequence: no gradient
    logp = torch.tensor([-0.9, -1.4, -0.5], requires_grad=True)                # log ratios +0.3, +0.1
    terms = grpo_loss(logp, torch.tensor(OLD), torch.tensor(ADV), weights, clip_eps=3e-4, clip_eps_high=4e-4,
                      sequence_lengths=LENGTHS)
    terms.loss.backward()
    assert logp.grad.tolist()[:2] == [0.0, 0.0] and terms.clip_frac == pytest.approx(2 / 3)


def test_first_update_is_the_policy_gradient():
    """With logp_old = logp (mu = 1) the ratio is 1 and the gradient is -c_t * A_t."""
    logp = torch.tensor(LOGP, requires_grad=True)
    weights = token_weights(LENGTHS, "grpo", 4)
    grpo_loss(logp, logp.detach(), torch.tensor(ADV), weights, clip_eps=0.2).loss.backward()
    assert logp.grad.tolist() == pytest.approx((-weights * torch.tensor(ADV)).tolist())


def test_uniform_groups_are_filtered():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.1, 0.1, 0.1, 0.1])   # groups of 4: mixed, uniform
    assert informative(rewards, 4) == [0, 1, 2, 3]
    assert informative(torch.zeros(6), 3) == []


def test_batch_layout_and_mismatch():
    batch = build_batch([[5, 6, 7], [5, 6]], [[8, 9], [4]], [[-0.1, -0.2], [-0.3]], torch.tensor([1.0, -1.0]),
                        "grpo", 4, pad_id=0, device="cpu")
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 4, 0, 0]]
    assert batch.target_mask.tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch.advantages.tolist() == [1.0, 1.0, -1.0] and batch.tokens == 8
    second = batch.select([1])
    assert second.lengths == [1] and second.logp_rollout.tolist() == pytest.approx([-0.3])
    assert second.input_ids.tolist() == [[5, 6, 4]] and second.target_mask.tolist() == [[False, True]]
    gap = mismatch(torch.tensor([-0.1, -0.2, -0.3]), torch.tensor([-0.1, -0.4, -0.2]))
    assert gap["mismatch"] == pytest.approx(0.1) and gap["mismatch_max"] == pytest.approx(0.2)
    assert gap["mismatch_kl"] > 0


# -----------------------------------------------------------------------------------------------
# Training runs on a smoke-sized model (trainer in this process)


class CharReward(AdditionTask):
    """Rewards the share of '1' characters in a completion: a random smoke model earns a spread of
    rewards under it, so GRPO steps move the weights."""
    name = "charcount"

    def reward(self, completion, example, correctness_weight=1.0, format_weight=0.1):
        from tandem.tasks import RewardResult
        return RewardResult(False, False, completion.count("1") / max(1, len(completion)))


class FlakyReward(CharReward):
    name = "flaky"
    calls = 0

    def reward(self, completion, example, correctness_weight=1.0, format_weight=0.1):
        FlakyReward.calls += 1
        if FlakyReward.calls % 3 == 0:
            raise ZeroDivisionError("user reward code blew up")
        return super().reward(completion, example)


RL = ["run.threads=1", "rollout.threads=1", "rl.steps=3", "rl.prompts_per_step=2", "rl.group_size=4",
      "rl.max_new_tokens=12", "rl.max_prompt_len=32", "rl.lr=0.01", "rl.checkpoint_every=1", "rl.log_every=1"]


@pytest.fixture(scope="module")
def init_model(tmp_path_factory):
    """A smoke SFT checkpoint (10 steps) to start RL from."""
    from tandem.pipeline import build_tasks, ensure_tokenizer
    from tandem.train.sft import train_sft
    cfg = load_config(preset="smoke", overrides=["sft.steps=10", "run.threads=1"])
    run_dir = prepare_run(tmp_path_factory.mktemp("init") / "sft", cfg)
    tasks = build_tasks(cfg)
    train_sft(cfg, run_dir, ensure_tokenizer(cfg, run_dir, tasks), tasks, progress=False)
    return run_dir


@pytest.fixture
def test_tasks(monkeypatch):
    monkeypatch.setitem(TASKS, "charcount", CharReward)
    monkeypatch.setitem(TASKS, "flaky", FlakyReward)


def _rl(run_dir, init, overrides, stop_after=None):
    cfg = load_config(preset="smoke", overrides=RL + overrides)
    return train_grpo(cfg, prepare_run(run_dir, cfg), init, progress=False, stop_after=stop_after)


def _fingerprint(run_dir):
    return weights_fingerprint(load_checkpoint(latest_valid(run_dir / "checkpoints" / "rl"))["model"])


def test_a_raising_reward_scores_zero_and_training_goes_on(tmp_path, init_model, test_tasks):
    result, error = safe_reward(FlakyReward(), "x", None, 1.0, 0.1)
    result, error = safe_reward(FlakyReward(), "x", None, 1.0, 0.1)
    result, error = safe_reward(FlakyReward(), "x", None, 1.0, 0.1)  # the third call raises
    assert result.reward == 0.0 and "ZeroDivisionError" in error
    stats = _rl(tmp_path / "run", init_model, ['rl.tasks=["flaky"]', "rollout.workers=0"])
    assert stats["reward_errors"] > 0 and stats["samples"] == 3 * 8
    steps = [m["step"] for m in read_metrics(tmp_path / "run", "rl")]
    assert steps == [1, 2, 3]
    assert sum(m["reward_errors"] for m in read_metrics(tmp_path / "run", "rl")) == stats["reward_errors"]
    assert read_summary(tmp_path / "run")["rl_totals"]["reward_errors"] == stats["reward_errors"]


def test_sync_mode_is_deterministic_and_resumes_bitwise(tmp_path, init_model, test_tasks):
    """Two runs with a real rollout worker process (bf16): one straight, one interrupted after
    step 2 and resumed; same final weights, bit for bit, and the same logged rewards."""
    overrides = ['rl.tasks=["charcount"]', "rl.mode=sync", "rollout.workers=1", "rollout.dtype=bf16"]
    straight = _rl(tmp_path / "a", init_model, overrides)
    assert straight["init_fingerprint"] != _fingerprint(tmp_path / "a")        # the weights moved
    _rl(tmp_path / "b", init_model, overrides, stop_after=2)
    resumed = _rl(tmp_path / "b", init_model, overrides)
    assert resumed["resumed_from"] == 2
    assert _fingerprint(tmp_path / "a") == _fingerprint(tmp_path / "b")
    rewards = lambda run: [(m["step"], m["reward"], m["mismatch"]) for m in read_metrics(run, "rl")]  # noqa: E731
    assert rewards(tmp_path / "a") == rewards(tmp_path / "b")
    assert all(m["mismatch"] > 0 for m in read_metrics(tmp_path / "a", "rl"))  # bf16 worker vs fp32 trainer


def test_gspo_trains_and_its_first_step_equals_grpo_with_per_sequence_means(tmp_path, init_model, test_tasks):
    """With one update per batch every ratio is 1, so GSPO's first step is the policy gradient
    with each sequence's tokens averaged: the same weights as GRPO with loss_norm = grpo. The
    next steps differ (the clip); a bad rl.loss is one line."""
    common = ['rl.tasks=["charcount"]', "rl.mode=sync", "rollout.workers=0", "rl.steps=1"]
    _rl(tmp_path / "gspo", init_model, common + ["rl.loss=gspo"])
    _rl(tmp_path / "grpo", init_model, common + ["rl.loss_norm=grpo"])
    assert _fingerprint(tmp_path / "gspo") == _fingerprint(tmp_path / "grpo")
    result = run_tandem("rl", "--init", init_model, "--preset", "smoke", "--set", "rl.loss=ppo",
                        "--out", tmp_path / "bad")
    assert result.returncode == 2 and "rl.loss" in result.stderr and not (tmp_path / "bad").exists()


def test_a_bf16_trainer_resumes_bitwise(tmp_path, init_model, test_tasks):
    """rl.dtype=bf16 (autocast over fp32 master weights and AdamW moments), rollouts colocated:
    interrupted after step 1 and resumed == straight, bit for bit; the master weights stay fp32."""
    overrides = ['rl.tasks=["charcount"]', "rl.mode=sync", "rollout.workers=0", "rl.dtype=bf16", "rl.steps=2"]
    straight = _rl(tmp_path / "a", init_model, overrides)
    _rl(tmp_path / "b", init_model, overrides, stop_after=1)
    resumed = _rl(tmp_path / "b", init_model, overrides)
    assert resumed["resumed_from"] == 1 and straight["dtype"] == "bf16"
    final = load_checkpoint(latest_valid(tmp_path / "a" / "checkpoints" / "rl"))
    assert all(t.dtype == torch.float32 for t in final["model"].values())
    assert straight["init_fingerprint"] != _fingerprint(tmp_path / "a")
    assert _fingerprint(tmp_path / "a") == _fingerprint(tmp_path / "b")


def test_the_pipeline_runs_grpo_between_two_evals(smoke_run):
    """`tandem pipeline --preset smoke` (the shared CLI fixture): SFT -> eval "sft" -> GRPO -> eval "rl"."""
    summary = read_summary(smoke_run)
    assert set(summary["evals"]) >= {"sft", "rl"}
    assert summary["evals"]["sft"].keys() == summary["evals"]["rl"].keys()
    # the "rl" eval scores RL's final checkpoint: `tandem eval` of that checkpoint gives the same figures
    rl_checkpoint = latest_valid(smoke_run / "checkpoints" / "rl")
    for task, recorded in summary["evals"]["rl"].items():
        result = run_tandem("eval", "--model", rl_checkpoint, "--task", task, "--n", str(recorded["n"]),
                            "--batch-size", "16", "--max-new-tokens", "48", "--json")
        assert result.returncode == 0, result.stderr
        again = json.loads(result.stdout)
        assert (again["accuracy"], again["format_rate"], again["avg_tokens"]) == \
            (recorded["accuracy"], recorded["format_rate"], recorded["avg_tokens"])
    assert summary["rl"]["steps"] == 3 and summary["rl"]["rollout"]["dtype"] == "bf16"
    ledger = {(row["phase"], row["device_kind"]) for row in summary["ledger"]}
    assert {("rollout", "cpu"), ("policy_update", "cpu"), ("weight_sync", "cpu"), ("sft", "cpu")} <= ledger
    report = (smoke_run / "report.md").read_text()
    for stage, what in (("sft", "SFT"), ("rl", "Policy update")):   # MFU against the run's measured peaks
        mfu = summary[stage]["mfu"]
        assert set(mfu) == {"fp32", summary[stage]["dtype"]} and all(0 < share < 10 for share in mfu.values())
        assert f"{what} MFU: {mfu['fp32']:.1%} of the fp32" in report
    for plot in ("rl_reward.png", "rl_accuracy.png", "rl_length.png", "rl_mismatch.png"):
        assert f"(plots/{plot})" in report and (smoke_run / "plots" / plot).is_file()


def test_rl_starts_from_an_hf_folder(tmp_path, init_model):
    """--init may be an HF Llama folder (here the SFT model exported by tandem.export): same weights."""
    from tandem.publish import export_model
    export_model(init_model, tmp_path / "hf", fmt="hf", progress=False)
    stats = _rl(tmp_path / "run", tmp_path / "hf", ["rl.steps=1", "rollout.workers=0"])
    sft = weights_fingerprint(load_checkpoint(latest_valid(init_model / "checkpoints" / "sft"))["model"])
    assert stats["init"] == str(tmp_path / "hf") and stats["init_fingerprint"] == sft
    assert latest_valid(tmp_path / "run" / "checkpoints" / "rl").name == "step_000001"


def test_the_kl_reference_is_kept_in_the_compute_dtype(tmp_path, init_model, test_tasks, monkeypatch):
    """kl_coef > 0 with rl.dtype=bf16: the frozen reference lives in bf16 (half the memory), so its
    KL to the fp32-master policy is small but not zero at step 1, and finite throughout."""
    from tandem.train import grpo
    seen = []
    build = grpo.PolicyUpdate.__init__

    def spy(self, model, reference, *args, **kwargs):
        seen.append((model.lm_head.weight.dtype, reference.lm_head.weight.dtype))
        build(self, model, reference, *args, **kwargs)
    monkeypatch.setattr(grpo.PolicyUpdate, "__init__", spy)
    _rl(tmp_path / "run", init_model, ['rl.tasks=["charcount"]', "rollout.workers=0", "rl.steps=2",
                                       "rl.kl_coef=0.1", "rl.dtype=bf16"])
    assert seen and all(dtypes == (torch.float32, torch.bfloat16) for dtypes in seen)
    kl = [m["kl_ref"] for m in read_metrics(tmp_path / "run", "rl")]
    assert len(kl) == 2 and kl[0] > 0 and all(math.isfinite(x) for x in kl)
