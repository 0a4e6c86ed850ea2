"""rlhfzoo.plugins.actor_critic: per-token rewards (KL in the reward or in the loss), GAE, truncation
penalties, empty responses, reward normalisation, the KL guard, the pretraining mix, and the
trainer stopping on non-finite rewards and exploding KL. Tiny scratch policies only."""

import dataclasses

import pytest
import torch
from pydantic import ValidationError

from rlhfzoo import hookimpl, kernels
from rlhfzoo.config import load_config
from rlhfzoo.data.collate import Collator
from rlhfzoo.plugins.actor_critic import ExperienceConfig
from rlhfzoo.interfaces import RewardSource
from rlhfzoo.ops import gae, last_index, masked_mean
from rlhfzoo.plugins.a2c import A2C
from rlhfzoo.plugins.ppo import PPOClip
from rlhfzoo.plugins.sentiment import SentimentTask
from rlhfzoo.policy import HFPolicy, HFPolicyConfig
from rlhfzoo.registry import registry
from rlhfzoo.testing import TINY_POLICY
from rlhfzoo.trainer import NonFiniteError, Trainer, TrainingError


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    task = SentimentTask()
    cfg = {k: v for k, v in TINY_POLICY.items() if k != "name"}
    policy = HFPolicy(HFPolicyConfig(**{**cfg, "max_new_tokens": 6, "value_head": True}), task=task)
    reference = policy.frozen_copy()
    with torch.no_grad():  # the policy has moved away from the reference: KL > 0
        g = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        policy.module.value_head.bias.fill_(0.3)
    prompts = task.examples("prompts")[:6]
    torch.manual_seed(0)
    rollout = policy.generate(prompts)
    return task, policy, reference, rollout


def scores_of(n):
    return torch.linspace(-1, 1, n)


def test_kl_in_the_reward_and_the_score_on_the_last_token(tiny):
    _, policy, reference, rollout = tiny
    cfg = dict(kl_coef=0.3, kl_estimator="k1", kl_penalty="reward", whiten_advantages=False, gamma=0.9, lam=0.8)
    obj = PPOClip(PPOClip.Config(adaptive_kl=False, **cfg))
    s = scores_of(len(rollout.prompts))
    exp = obj.make_experience(rollout, s, policy, reference)
    mask = rollout.response_mask[:, 1:].float()
    ref = reference.logprobs(rollout.sequences, rollout.attention_mask) * mask
    k1 = (rollout.logprobs - ref) * mask
    expected = -0.3 * k1
    last = last_index(mask)
    expected[torch.arange(len(s)), last] += s
    assert torch.allclose(exp.rewards, expected, atol=1e-6)
    assert (exp.rewards[mask == 0] == 0).all()
    adv, ret = gae(expected, exp.values, mask, 0.9, 0.8)
    assert torch.allclose(exp.advantages, adv, atol=1e-6) and torch.allclose(exp.returns, ret, atol=1e-6)
    assert exp.metrics["kl"] == pytest.approx(k1.sum(-1).mean().item(), abs=1e-5) and exp.metrics["kl"] > 0
    assert exp.metrics["kl_coef"] == 0.3
    assert all(isinstance(v, float) for v in exp.metrics.values())


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_estimators_in_the_reward(tiny, estimator):
    _, policy, reference, rollout = tiny
    obj = A2C(A2C.Config(kl_coef=0.5, kl_penalty="reward", kl_estimator=estimator, whiten_advantages=False))
    exp = obj.make_experience(rollout, torch.zeros(len(rollout.prompts)), policy, reference)
    mask = exp.mask
    k = kernels.token_kl(exp.old_logprobs, exp.ref_logprobs, estimator) * mask
    assert torch.allclose(exp.rewards, -0.5 * k, atol=1e-6)
    assert (k[mask.bool()] >= 0).all()


def test_kl_in_the_loss(tiny):
    _, policy, reference, rollout = tiny
    obj = A2C(A2C.Config(kl_coef=0.7, kl_penalty="loss", kl_estimator="k3", whiten_advantages=False))
    s = scores_of(len(rollout.prompts))
    exp = obj.make_experience(rollout, s, policy, reference)
    only_score = torch.zeros_like(exp.rewards)
    only_score[torch.arange(len(s)), last_index(exp.mask)] = s
    assert torch.allclose(exp.rewards, only_score)  # no KL in the reward
    batch = obj.groups(exp, torch.arange(len(s)))[0]
    with_kl = obj.loss(batch, policy, reference)
    lp = policy.logprobs(batch.sequences.input_ids, batch.sequences.attention_mask)
    kl = masked_mean(kernels.token_kl(lp, batch.extra["ref_logprobs"], "k3"), batch.extra["mask"]).item()
    assert with_kl.metrics["kl_loss"] == pytest.approx(kl, abs=1e-6) and kl > 0
    no_kl = A2C(A2C.Config(kl_coef=0.0, kl_penalty="loss", kl_estimator="k3", whiten_advantages=False))
    no_kl.kl_ctl.value = 0.0
    base = no_kl.loss(batch, policy, reference)
    assert with_kl.loss.item() - base.loss.item() == pytest.approx(0.7 * kl, abs=1e-5)


def test_k1_in_the_loss_is_refused():
    with pytest.raises(ValidationError, match="zero expected gradient"):
        ExperienceConfig(kl_penalty="loss", kl_estimator="k1")
    ExperienceConfig(kl_penalty="loss", kl_estimator="k1", kl_coef=0.0)  # no penalty: fine
    assert all(f.description for f in ExperienceConfig.model_fields.values())


def test_truncated_responses_are_penalised_and_counted(tiny):
    _, policy, reference, rollout = tiny
    B = len(rollout.prompts)
    finished = torch.tensor([i % 2 == 0 for i in range(B)])
    ro = dataclasses.replace(rollout, finished=finished)
    s = torch.full((B,), 0.25)
    plain = PPOClip(PPOClip.Config(whiten_advantages=False, kl_coef=0.0))
    penal = PPOClip(PPOClip.Config(whiten_advantages=False, kl_coef=0.0, truncation_penalty=0.5))
    e0, e1 = plain.make_experience(ro, s, policy, reference), penal.make_experience(ro, s, policy, reference)
    assert torch.allclose(e1.scores, torch.where(finished, 0.25, -0.25))
    assert torch.allclose(e0.scores, s)
    assert e0.metrics["truncated"] == e1.metrics["truncated"] == float((~finished).sum())
    penal.make_experience(ro, s, policy, reference)
    extra = penal.after_iteration({})
    assert extra["truncated_total"] == 2 * float((~finished).sum())
    assert extra["truncated_rate"] == pytest.approx(float((~finished).float().mean()))


def test_empty_responses_get_no_credit_and_a_finite_loss(tiny):
    _, policy, reference, rollout = tiny
    ro = dataclasses.replace(rollout, sequences=rollout.sequences.clone(), attention_mask=rollout.attention_mask.clone(),
                             response_mask=rollout.response_mask.clone(), logprobs=rollout.logprobs.clone())
    # Row 0: no response token at all (an empty generation); row 1: EOS straight away.
    gen = ro.response_mask[0].nonzero().squeeze(-1)
    ro.response_mask[0, gen] = 0
    ro.attention_mask[0, gen] = 0
    ro.logprobs[0] = 0
    first = ro.response_mask[1].nonzero().squeeze(-1)
    ro.sequences[1, first[0]] = policy.tokenizer.eos_token_id
    ro.response_mask[1, first[1:]] = 0
    ro.attention_mask[1, first[1:]] = 0
    ro.logprobs[1] = policy.logprobs(ro.sequences[1:2], ro.attention_mask[1:2])[0] * ro.response_mask[1, 1:]
    obj = PPOClip()
    exp = obj.make_experience(ro, torch.ones(len(ro.prompts)), policy, reference)
    assert exp.metrics["empty_responses"] == 1.0
    assert (exp.advantages[0] == 0).all() and (exp.rewards[0] == 0).all()
    assert exp.mask[1].sum() == 1  # the EOS alone: one token, credited with the score minus its KL penalty
    k1 = (exp.old_logprobs[1] - exp.ref_logprobs[1]).sum().item()
    assert exp.rewards[1].sum().item() == pytest.approx(1.0 - obj.kl_ctl.value * k1, abs=1e-5)
    out = obj.loss(obj.groups(exp, torch.arange(len(ro.prompts)))[0], policy, reference)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    policy.module.zero_grad(set_to_none=True)


def test_reward_normalisation_and_clipping(tiny):
    _, policy, reference, rollout = tiny
    B = len(rollout.prompts)
    obj = PPOClip(PPOClip.Config(normalize_rewards=True, reward_clip=1.0, kl_coef=0.0))
    s1 = torch.linspace(0, 10, B)
    e1 = obj.make_experience(rollout, s1, policy, reference)
    z = (s1 - s1.mean()) / s1.std()
    assert torch.allclose(e1.scores, z.clamp(-1, 1), atol=1e-5)
    assert e1.metrics["score"] == pytest.approx(s1.mean().item())  # the raw score is what gets logged
    s2 = torch.full((B,), 20.0)
    e2 = obj.make_experience(rollout, s2, policy, reference)
    both = torch.cat([s1, s2]).double()
    expected = ((20.0 - both.mean()) / both.std()).clamp(-1, 1).item()
    assert e2.scores.tolist() == pytest.approx([expected] * B, abs=1e-5)
    restored = PPOClip(obj.config)
    restored.load_state_dict(obj.state_dict())
    assert restored.reward_moments.state_dict() == obj.reward_moments.state_dict()


def test_max_kl_raises_a_training_error_naming_the_iteration(tiny):
    _, policy, reference, rollout = tiny
    obj = PPOClip(PPOClip.Config(max_kl=1e-4))
    with pytest.raises(TrainingError, match=r"at iteration 1, above max_kl=0.0001"):
        obj.make_experience(rollout, torch.zeros(len(rollout.prompts)), policy, reference)
    assert PPOClip(PPOClip.Config(max_kl=1e3)).make_experience(rollout, torch.zeros(len(rollout.prompts)), policy, reference)


def test_pretraining_mix_adds_the_demonstrations_nll(tiny):
    task, policy, reference, rollout = tiny
    obj = PPOClip(PPOClip.Config(ptx_coef=2.0, ptx_batch_size=4))
    obj.setup(policy, task)  # the demonstrations come from the task, collated as `prepare` says
    obj.prepare(task.examples("prompts"), Collator(policy.tokenizer, max_length=64), reference)
    exp = obj.make_experience(rollout, torch.zeros(len(rollout.prompts)), policy, reference)
    batch = obj.groups(exp, torch.arange(len(rollout.prompts)))[0]
    ptx = batch.extra["ptx"]
    assert len(ptx) == 4
    with_ptx = obj.loss(batch, policy, reference)
    nll = -masked_mean(policy.logprobs(ptx.input_ids, ptx.attention_mask), ptx.response_mask[:, 1:]).item()
    assert with_ptx.metrics["ptx_nll"] == pytest.approx(nll, abs=1e-5)
    del batch.extra["ptx"]
    without = obj.loss(batch, policy, reference)
    assert with_ptx.loss.item() - without.loss.item() == pytest.approx(2.0 * nll, abs=1e-4)


def test_minibatches_cover_every_row_once_per_epoch(tiny):
    _, policy, reference, rollout = tiny
    obj = PPOClip(PPOClip.Config(epochs=3, minibatch_size=4, micro_batch_size=2))
    exp = obj.make_experience(rollout, torch.zeros(len(rollout.prompts)), policy, reference)
    groups = list(obj.minibatches(exp, policy))
    B = len(rollout.prompts)
    per_epoch = -(-B // 4)
    assert len(groups) == 3 * per_epoch
    for e in range(3):
        rows = [i for g in groups[e * per_epoch : (e + 1) * per_epoch] for b in g for i in b.index.tolist()]
        assert sorted(rows) == list(range(B))
    assert all(len(b) <= 2 for g in groups for b in g)
    assert len(list(A2C().minibatches(exp, policy))) == 1  # A2C: one step per batch


# ------------------------------------------------------------------------------ through the trainer


class NaNOnSecondCall(RewardSource):
    name = "tests-nan-on-second-call"

    def __init__(self, config=None, task=None):
        super().__init__(config, task)
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += 1
        r = torch.zeros(len(responses))
        if self.calls >= 2:
            r[1] = float("nan")
        return r


class TestRewards:
    @hookimpl
    def register_reward_sources(self, register):
        register(NaNOnSecondCall)


def online_run(out, reward="gold", **algorithm):
    registry.register_plugin(TestRewards(), name="tests_online_rewards", package="tests")
    return load_config(data={
        "task": {"name": "sentiment"},
        "policy": {**TINY_POLICY, "max_new_tokens": 6},
        "algorithm": {"name": "ppo-clip", **algorithm},
        "reward": {"name": reward},
        "train": {"steps": 3, "batch_size": 4, "lr": 5e-2, "eval_prompts": 0, "progress": False, "save_every": 1},
        "output_dir": str(out),
    })


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_non_finite_rewards_stop_the_trainer_with_a_message(tmp_path):
    out = tmp_path / "nan"
    trainer = Trainer(online_run(out, reward="tests-nan-on-second-call"), log=lambda *_: None)
    with pytest.raises(NonFiniteError, match=r"non-finite rewards at iteration 2 for responses \[1\]"):
        trainer.fit()
    assert checkpoints(out) == ["step-000001"]
    assert not (out / "summary.json").exists()


def test_exploding_kl_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "kl"
    trainer = Trainer(online_run(out, max_kl=1e-3, adaptive_kl=False), log=lambda *_: None)
    with pytest.raises(TrainingError, match=r"KL to the reference is .* at iteration 2, above max_kl=0.001"):
        trainer.fit()
    assert checkpoints(out) == ["step-000001"]
    assert not (out / "summary.json").exists()
    # The checkpoint resumes: the objective's iteration counter and KL controller come back with it.
    again = Trainer(online_run(out, max_kl=1e-3, adaptive_kl=False), log=lambda *_: None)
    again.prepare_output(resume=True, overwrite=False)
    assert again.step == 1 and again.objective.iteration == 1
