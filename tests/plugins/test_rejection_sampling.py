"""Rejection-sampling fine-tuning: choosing the best of N per prompt, thresholds, the truncation
penalty, the SFT loss on the kept responses, and the trainer drawing N samples per prompt."""

import dataclasses
import math

import pytest
import torch

from rlhfzoo.config import load_config
from rlhfzoo.plugins.rejection_sampling import RejectionSampling
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import Trainer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def parts():
    task = SentimentTask()
    cfg = {k: v for k, v in TINY_POLICY.items() if k != "name"}
    policy = HFPolicy(HFPolicyConfig(**{**cfg, "max_new_tokens": 6}), task=task)
    prompts = task.examples("prompts")[:3]
    torch.manual_seed(0)
    rollout = policy.generate([p for p in prompts for _ in range(4)])  # N = 4, consecutive
    return policy, rollout


def test_keeps_each_prompts_best(parts):
    policy, rollout = parts
    obj = RejectionSampling(RejectionSampling.Config(n_samples=4))
    scores = torch.tensor([0.1, 0.9, -0.2, 0.3, float("nan"), -1.0, -0.5, -0.9, 0.0, 0.0, 0.7, 0.69])
    kept = obj.make_experience(rollout, scores, policy)
    rows = [1, 6, 10]  # NaN is never chosen
    assert torch.equal(kept.input_ids, rollout.sequences[rows])
    assert torch.equal(kept.response_mask, rollout.response_mask[rows])
    extra = obj.after_iteration({})
    assert extra["kept"] == 3.0 and extra["reward_calls"] == 12.0
    assert extra["best_score"] == pytest.approx((0.9 - 0.5 + 0.7) / 3, abs=1e-6)


def test_thresholds(parts):
    policy, rollout = parts
    scores = torch.tensor([0.1, 0.9, -0.2, 0.3, -0.4, -1.0, -0.5, -0.9, 0.0, 0.0, 0.7, 0.69])
    pct = RejectionSampling(RejectionSampling.Config(n_samples=4, keep_percentile=75))
    kept = pct.make_experience(rollout, scores, policy)  # 75th percentile of the 12 scores ~ 0.35
    assert torch.equal(kept.input_ids, rollout.sequences[[1, 10]])
    floor = RejectionSampling(RejectionSampling.Config(n_samples=4, min_score=0.8))
    assert torch.equal(floor.make_experience(rollout, scores, policy).input_ids, rollout.sequences[[1]])
    assert floor.after_iteration({})["kept_fraction"] == pytest.approx(1 / 3)


def test_truncation_penalty_changes_the_choice(parts):
    policy, rollout = parts
    finished = rollout.finished.clone()
    finished[:] = True
    finished[1] = False  # the highest score is a truncated response
    ro = dataclasses.replace(rollout, finished=finished)
    scores = torch.tensor([0.1, 0.9, -0.2, 0.3] + [0.0] * 8)
    plain = RejectionSampling(RejectionSampling.Config(n_samples=4)).make_experience(ro, scores, policy)
    penal = RejectionSampling(RejectionSampling.Config(n_samples=4, truncation_penalty=1.0))
    kept = penal.make_experience(ro, scores, policy)
    assert torch.equal(plain.input_ids[0], ro.sequences[1]) and torch.equal(kept.input_ids[0], ro.sequences[3])
    assert penal.after_iteration({})["truncated_rate"] == pytest.approx(1 / 12)


def test_rejects_a_rollout_without_n_samples_per_prompt(parts):
    policy, rollout = parts
    obj = RejectionSampling(RejectionSampling.Config(n_samples=5))
    with pytest.raises(ValueError, match="5 consecutive samples per prompt"):
        obj.make_experience(rollout, torch.zeros(12), policy)


def test_loss_is_the_nll_of_the_kept_responses(parts):
    policy, rollout = parts
    obj = RejectionSampling(RejectionSampling.Config(n_samples=4, minibatch_size=2, epochs=2))
    kept = obj.make_experience(rollout, torch.arange(12.0), policy)
    batches = list(obj.minibatches(kept, policy))
    assert len(batches) == 4 and sorted(i for b in batches[:2] for i in b.index.tolist()) == [0, 1, 2]
    out = obj.loss(batches[0], policy)
    seq = batches[0].sequences
    lp = policy.logprobs(seq.input_ids, seq.attention_mask)
    m = seq.response_mask[:, 1:].float()
    assert out.loss.item() == pytest.approx(-(lp * m).sum().item() / m.sum().item(), abs=1e-6)
    assert math.isfinite(out.metrics["nll"])


def test_the_trainer_draws_n_samples_per_prompt(tmp_path):
    cfg = load_config(data={
        "task": {"name": "sentiment"},
        "policy": {**TINY_POLICY, "max_new_tokens": 6},
        "algorithm": {"name": "rejection-sampling", "n_samples": 3, "minibatch_size": 2},
        "reward": {"name": "gold"},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "eval_prompts": 0, "progress": False},
        "output_dir": str(tmp_path / "rs"),
    })
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.prepare_output(resume=False, overwrite=True)
    m = trainer.train_step(0)  # one iteration, ending with the objective's after_iteration
    assert trainer.reward.calls == 12  # 4 prompts x 3 samples, each scored once
    assert m["reward_calls"] == 12.0 and m["kept"] == 4.0 and "loss" in m
    assert trainer.objective.state_dict() == {"reward_calls": 12, "kept_total": 4}
